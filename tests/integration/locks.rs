//! One run per job at a time across processes, and crash recovery: two
//! `nightjar run` at once run the job once; a run left `running` by a
//! killed process is marked `abandoned` (with an alert) by the next start.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nightjar::state::{HistoryFilter, OutboxFilter, RunStatus};

use crate::fixture::{Fixture, FixtureOptions};

const ACCOUNTS: usize = 3_000;

/// `nightjar run accounts` in the middle of its pipeline: the sandbox holds
/// back the second result page, and the run has staged the first (its
/// progress line on stderr says so). No hook: the real binary as shipped.
fn start_mid_run(fx: &Fixture) -> Child {
    fx.sandbox.add_faults("delay:ms=600000,on=results,nth=2").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["--config", "nightjar.toml", "run", "accounts"])
        .current_dir(fx.dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nightjar starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let staged = line.contains("1 page(s)") && line.contains("rows staged");
            let _ = tx.send((staged, line));
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok((true, _)) => break,
            Ok((false, line)) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the first run never staged its first page:\n{}", seen.join("\n"));
            }
        }
    }
    // The delayed page must not hold up the next run of the test.
    fx.sandbox.clear_faults();
    child
}

fn run_cli(fx: &Fixture) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["--config", "nightjar.toml", "run", "accounts"])
        .current_dir(fx.dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("nightjar runs")
}

fn kill(mut child: Child) {
    child.kill().expect("SIGKILL delivered");
    let _ = child.wait();
}

async fn fixture() -> Fixture {
    let fx = Fixture::build(FixtureOptions { accounts: ACCOUNTS, page_size: 1_000, ..Default::default() }).await;
    fx.advance(60);
    fx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_a_running_job_is_refused_and_names_the_holder() {
    let fx = fixture().await;
    let first = tokio::task::block_in_place(|| start_mid_run(&fx));
    let first_pid = first.id();

    let second = tokio::task::block_in_place(|| run_cli(&fx));
    // The same process trying again (the library call `serve` makes) is refused too.
    let same_process =
        nightjar::run::run_job(&fx.engine, &fx.project, &fx.state, "accounts", nightjar::outcome::Trigger::Manual)
            .await;
    kill(first);

    let err = String::from_utf8_lossy(&second.stderr).into_owned();
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("already running: pid {first_pid} on ")) && err.contains("since"), "{err}");
    match same_process {
        Err(nightjar::run::RunError::Locked(holder)) => assert_eq!(holder.pid, first_pid),
        other => panic!("expected the lock to refuse the run, got {other:?}"),
    }
    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    assert_eq!(history.len(), 1, "only the first attempt is a run: {history:?}");
    assert_eq!(history[0].status, RunStatus::Running, "it was killed, nothing closed it yet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_way_is_marked_abandoned_and_the_next_run_completes() {
    let fx = fixture().await;
    // Someone to mail, so the abandoned run's alert is queued.
    let config = fx.dir.path().join("nightjar.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!(
            "{text}\n[smtp]\nhost = \"127.0.0.1\"\nport = 9\nsecurity = \"none\"\nfrom = \"etl@example.com\"\n\n[alerts]\nemail = [\"oncall@example.com\"]\n"
        )).unwrap();

    let first = tokio::task::block_in_place(|| start_mid_run(&fx));
    kill(first);
    let killed = fx.state.history(HistoryFilter::default()).await.unwrap();
    assert_eq!(killed.len(), 1);
    let sf_jobs = killed[0].salesforce_job_ids.clone();
    assert_eq!(sf_jobs.len(), 1, "the killed run had created its Bulk job");

    let next = tokio::task::block_in_place(|| run_cli(&fx));
    let err = String::from_utf8_lossy(&next.stderr).into_owned();
    assert!(next.status.success(), "{err}");
    assert!(err.contains(&format!("marked run(s) {} abandoned", killed[0].id)), "{err}");

    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    let statuses: Vec<RunStatus> = history.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![RunStatus::Succeeded, RunStatus::Abandoned], "newest first");
    assert_eq!(history[1].error_class.as_deref(), Some("abandoned"));
    assert_eq!(history[0].counts.inserted, ACCOUNTS as u64, "the next run loads every row");
    let conn = rusqlite::Connection::open(fx.warehouse()).unwrap();
    let rows: i64 = conn.query_row("SELECT count(*) FROM account", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, ACCOUNTS as i64, "every row exactly once");

    let alerts = fx.state.outbox(OutboxFilter::default()).await.unwrap();
    assert!(
        alerts.iter().any(|a| a.run_id == Some(killed[0].id) && a.kind.as_str() == "abandoned"),
        "an alert is queued for the abandoned run: {alerts:?}"
    );
    let aborted = fx.sandbox.request_log().iter().any(|r| r.method == "PATCH" && r.path.contains(&sf_jobs[0]));
    assert!(aborted, "the abandoned run's Salesforce job was aborted");
}
