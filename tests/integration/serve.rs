//! `nightjar serve` as deployed: a seconds-level schedule fires the job
//! through the same pipeline as `nightjar run`, and SIGTERM stops the
//! daemon after the run in flight.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nightjar::state::{HistoryFilter, RunStatus};

use crate::fixture::Fixture;

/// Polls `done` until it holds or `limit` passes; a bound on waiting, not
/// an assertion on how long anything takes.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_a_scheduled_job_and_drains_on_sigterm() {
    let fx = Fixture::new(50, 1_000).await;
    fx.advance(60);
    let job = fx.dir.path().join("jobs/accounts.toml");
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("schedule = \"*/2 * * * * *\"\ntimezone = \"Europe/Berlin\"\n{text}")).unwrap();

    let log = std::fs::File::create(fx.dir.path().join("serve.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["--config", "nightjar.toml", "serve", "--grace", "30s"])
        .current_dir(fx.dir.path())
        .env("RUST_LOG", "nightjar=info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("nightjar serve starts");
    let log_text = || std::fs::read_to_string(fx.dir.path().join("serve.log")).unwrap_or_default();

    let scheduled_run = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), || {
            let runs = fx.history_blocking(HistoryFilter { status: Some(RunStatus::Succeeded), ..Default::default() });
            runs.iter().any(|r| r.trigger == "schedule")
        })
    });
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(term.success());
    let exited = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), || child.try_wait().is_ok_and(|s| s.is_some()))
    });
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(scheduled_run, "no scheduled run succeeded:\n{}", log_text());
    assert!(exited && status.success(), "serve did not stop cleanly on SIGTERM ({status}):\n{}", log_text());

    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    assert!(history.iter().all(|r| r.status != RunStatus::Running), "the run in flight finished: {history:?}");
    let first = history.iter().rev().find(|r| r.trigger == "schedule").unwrap();
    assert_eq!(first.counts.inserted, 50, "the scheduled run loaded the data");
}

/// Puts `lines` at the top of the fixture's job file (top-level keys).
fn job_header(fx: &mut Fixture, lines: &str) {
    let job = fx.dir.path().join("jobs/accounts.toml");
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("{lines}\n{text}")).unwrap();
    fx.reload();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_its_timeout_is_cancelled_its_bulk_job_aborted_and_nothing_committed() {
    let mut fx = Fixture::new(50, 1_000).await;
    fx.advance(60);
    job_header(&mut fx, "timeout = \"1s\"");
    // The query job never completes within the timeout.
    fx.sandbox.add_faults("slow-jobs:polls=100000").unwrap();
    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Cancelled, "{:?}", report.error);
    let run = fx.state.run(report.run_id).await.unwrap().unwrap();
    assert_eq!(run.error_class.as_deref(), Some("timeout"));
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None, "the watermark did not move");
    let sf_job = run.salesforce_job_ids.first().cloned().expect("the Bulk job was created before the timeout");
    let aborted = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(30), || {
            fx.sandbox.request_log().iter().any(|r| r.method == "PATCH" && r.path.contains(&sf_job))
        })
    });
    assert!(aborted, "the timed-out run's Bulk job was aborted");
    let conn = rusqlite::Connection::open(fx.warehouse()).unwrap();
    let rows: i64 = conn.query_row("SELECT count(*) FROM account", [], |r| r.get(0)).unwrap_or(0);
    assert_eq!(rows, 0, "nothing reached the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried_as_a_run_of_its_own_linked_to_the_first() {
    let mut fx = Fixture::new(50, 1_000).await;
    fx.advance(60);
    job_header(&mut fx, "retries = { attempts = 3, backoff = \"50ms\" }");
    fx.sandbox.fail_next_query_jobs(1, "INVALID_FIELD: no such column");
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let (_cancel, cancel) = tokio::sync::watch::channel(false);
    nightjar::run::run_series(
        &fx.engine,
        &fx.project,
        &fx.state,
        "accounts",
        nightjar::outcome::Trigger::Schedule,
        stopping,
        cancel,
    )
    .await;

    let mut history = fx.state.history(HistoryFilter::default()).await.unwrap();
    history.reverse();
    let series: Vec<(RunStatus, &str, u32, Option<i64>)> =
        history.iter().map(|r| (r.status, r.trigger.as_str(), r.attempt, r.retry_of)).collect();
    let first = history[0].id;
    assert_eq!(
        series,
        vec![(RunStatus::Failed, "schedule", 1, None), (RunStatus::Succeeded, "retry", 2, Some(first))],
        "one failure, then a retry that succeeds; no third attempt"
    );
    assert_eq!(history[1].counts.inserted, 50);
}

/// `nightjar serve` in the fixture's directory, logging to serve.log, once
/// it has planned its schedules (and listens for SIGHUP).
struct Serve {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Serve {
    fn start(fx: &Fixture) -> Serve {
        Serve::start_with_grace(fx, "30s")
    }

    fn start_with_grace(fx: &Fixture, grace: &str) -> Serve {
        let log = fx.dir.path().join("serve.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nightjar"))
            .args(["--config", "nightjar.toml", "serve", "--grace", grace])
            .current_dir(fx.dir.path())
            .env("RUST_LOG", "nightjar=info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("nightjar serve starts");
        let serve = Serve { child, log };
        assert!(wait_until(Duration::from_secs(60), || serve.log().contains("scheduled")), "{}", serve.log());
        serve
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(sent.success());
    }

    /// SIGTERM, then the exit status once it stopped.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        if !wait_until(Duration::from_secs(60), || self.child.try_wait().is_ok_and(|s| s.is_some())) {
            let _ = self.child.kill();
        }
        self.child.wait().unwrap()
    }
}

fn runs_with(fx: &Fixture, trigger: &str, status: RunStatus) -> usize {
    let history = fx.history_blocking(HistoryFilter::default());
    history.iter().filter(|r| r.trigger == trigger && r.status == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_schedule_and_keeps_the_old_one_on_an_invalid_edit() {
    let mut fx = Fixture::new(20, 1_000).await;
    fx.advance(60);
    // Once a year: never within this test.
    job_header(&mut fx, "schedule = \"0 0 0 1 1 *\"");
    let job = fx.dir.path().join("jobs/accounts.toml");
    let original = std::fs::read_to_string(&job).unwrap();
    tokio::task::block_in_place(|| {
        let serve = Serve::start(&fx);
        std::fs::write(&job, original.replace("0 0 0 1 1 *", "*/2 * * * * *")).unwrap();
        serve.signal("HUP");
        let ran = wait_until(Duration::from_secs(60), || runs_with(&fx, "schedule", RunStatus::Succeeded) >= 1);
        assert!(ran, "the new schedule never fired:\n{}", serve.log());

        std::fs::write(&job, original.replace("0 0 0 1 1 *", "every tuesday")).unwrap();
        serve.signal("HUP");
        let rejected = wait_until(Duration::from_secs(60), || serve.log().contains("keeping the old schedules"));
        assert!(rejected, "the invalid edit was not rejected:\n{}", serve.log());
        assert!(serve.log().contains("every tuesday"), "the log names what is wrong:\n{}", serve.log());
        let before = runs_with(&fx, "schedule", RunStatus::Succeeded);
        let still = wait_until(Duration::from_secs(60), || runs_with(&fx, "schedule", RunStatus::Succeeded) > before);
        assert!(still, "the old (every two seconds) schedule stayed in force:\n{}", serve.log());
        let log = serve.log();
        assert!(serve.stop().success(), "{log}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_scheduled_time_is_caught_up_once_at_start() {
    let mut fx = Fixture::new(20, 1_000).await;
    fx.advance(60);
    job_header(&mut fx, "schedule = \"0 0 0 * * *\"\ncatch_up = true");
    // The last run was long before last midnight: that midnight was missed.
    // Its process died long ago too (a pid above Linux's pid_max is never alive).
    let old = fx
        .state
        .open_run(
            "accounts",
            nightjar::outcome::Trigger::Schedule,
            chrono::DateTime::from_timestamp(946_684_800, 0).unwrap(),
        )
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(fx.dir.path().join("state/nightjar.db")).unwrap();
    conn.execute("UPDATE runs SET pid = 5000000 WHERE id = ?1", [old]).unwrap();
    tokio::task::block_in_place(|| {
        let serve = Serve::start(&fx);
        let caught_up = wait_until(Duration::from_secs(60), || runs_with(&fx, "catch_up", RunStatus::Succeeded) == 1);
        let log = serve.log();
        assert!(serve.stop().success(), "{log}");
        assert!(caught_up, "no catch-up run:\n{log}");
    });
    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    assert_eq!(history.iter().filter(|r| r.trigger == "catch_up").count(), 1, "one run, not one per missed day");
    assert_eq!(
        history.iter().find(|r| r.status == RunStatus::Abandoned).map(|r| r.id),
        Some(old),
        "the old row was recovered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_while_the_job_still_runs_is_skipped_and_recorded() {
    let mut fx = Fixture::new(20, 1_000).await;
    fx.advance(60);
    job_header(&mut fx, "schedule = \"* * * * * *\"");
    // The first run's first poll answers late, so ticks come while it runs.
    fx.sandbox.add_faults("delay:ms=4000,on=poll").unwrap();
    tokio::task::block_in_place(|| {
        let serve = Serve::start(&fx);
        let skipped = wait_until(Duration::from_secs(60), || {
            let history = fx.history_blocking(HistoryFilter::default());
            history.iter().any(|r| r.error_class.as_deref() == Some("skipped"))
        });
        let log = serve.log();
        assert!(serve.stop().success(), "{log}");
        assert!(skipped, "no skip recorded:\n{log}");
    });
    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    let skip = history.iter().find(|r| r.error_class.as_deref() == Some("skipped")).unwrap();
    assert_eq!(skip.status, RunStatus::Cancelled);
    assert!(skip.error.as_deref().is_some_and(|e| e.contains("still going")), "{skip:?}");
    assert!(history.iter().all(|r| r.status != RunStatus::Running), "the run in flight finished before exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_period_cancels_the_run_and_leaves_target_and_watermark_alone() {
    let mut fx = Fixture::new(20, 1_000).await;
    fx.advance(60);
    job_header(&mut fx, "schedule = \"*/2 * * * * *\"");
    // The run hangs in its first poll for far longer than the grace period.
    fx.sandbox.add_faults("delay:ms=600000,on=poll").unwrap();
    tokio::task::block_in_place(|| {
        let serve = Serve::start_with_grace(&fx, "1s");
        let in_flight = wait_until(Duration::from_secs(60), || {
            let history = fx.history_blocking(HistoryFilter::default());
            history.iter().any(|r| r.status == RunStatus::Running && !r.salesforce_job_ids.is_empty())
        });
        assert!(in_flight, "no run got to its Bulk job:\n{}", serve.log());
        let log_before = serve.log();
        let status = serve.stop();
        assert!(status.success(), "serve did not exit cleanly ({status}):\n{log_before}");
    });
    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].status, RunStatus::Cancelled);
    assert_eq!(history[0].error_class.as_deref(), Some("cancelled"));
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None, "the watermark did not move");
    let conn = rusqlite::Connection::open(fx.warehouse()).unwrap();
    let rows: i64 = conn.query_row("SELECT count(*) FROM account", [], |r| r.get(0)).unwrap_or(0);
    assert_eq!(rows, 0, "the target is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_mid_run_recovers_on_restart_and_the_next_run_completes() {
    let mut fx = Fixture::new(30, 1_000).await;
    fx.advance(60);
    job_header(&mut fx, "schedule = \"*/2 * * * * *\"");
    // Only the first poll hangs: the run is in flight when serve is killed.
    fx.sandbox.add_faults("delay:ms=600000,on=poll").unwrap();
    tokio::task::block_in_place(|| {
        let mut serve = Serve::start(&fx);
        let in_flight = wait_until(Duration::from_secs(60), || {
            let history = fx.history_blocking(HistoryFilter::default());
            history.iter().any(|r| r.status == RunStatus::Running && !r.salesforce_job_ids.is_empty())
        });
        assert!(in_flight, "no run got to its Bulk job:\n{}", serve.log());
        serve.child.kill().expect("SIGKILL delivered");
        let _ = serve.child.wait();

        let serve = Serve::start(&fx);
        let recovered = wait_until(Duration::from_secs(60), || runs_with(&fx, "schedule", RunStatus::Succeeded) >= 1);
        let log = serve.log();
        assert!(serve.stop().success(), "{log}");
        assert!(recovered, "no run succeeded after the restart:\n{log}");
    });
    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    let oldest = history.last().unwrap();
    assert_eq!(oldest.status, RunStatus::Abandoned, "{history:?}");
    let conn = rusqlite::Connection::open(fx.warehouse()).unwrap();
    let rows: i64 = conn.query_row("SELECT count(*) FROM account", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 30, "complete data after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_job_file_is_reloaded_without_a_signal() {
    let mut fx = Fixture::new(20, 1_000).await;
    fx.advance(60);
    job_header(&mut fx, "schedule = \"0 0 0 1 1 *\"");
    let job = fx.dir.path().join("jobs/accounts.toml");
    let original = std::fs::read_to_string(&job).unwrap();
    tokio::task::block_in_place(|| {
        let serve = Serve::start(&fx);
        std::fs::write(&job, original.replace("0 0 0 1 1 *", "*/2 * * * * *")).unwrap();
        let ran = wait_until(Duration::from_secs(60), || runs_with(&fx, "schedule", RunStatus::Succeeded) >= 1);
        let log = serve.log();
        assert!(serve.stop().success(), "{log}");
        assert!(ran, "the edited schedule never fired:\n{log}");
        assert!(log.contains("changed files"), "{log}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_rejects_a_bad_schedule_or_timezone_with_exit_2() {
    let fx = Fixture::new(1, 1_000).await;
    let job = fx.dir.path().join("jobs/accounts.toml");
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("schedule = \"0 30 2 * * *\"\ntimezone = \"Europe/Atlantis\"\n{text}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["--config", "nightjar.toml", "validate"])
        .current_dir(fx.dir.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("jobs/accounts.toml:2:12: unknown timezone `Europe/Atlantis`"), "{err}");
}

/// A target commit that waits on a lock does not hold up `serve`: on a
/// single-threaded runtime (where one blocking call would stop everything),
/// a job whose SQLite commit waits 20 s for another writer's lock does not
/// keep a second job with a 1-second schedule from firing on time.
#[tokio::test(flavor = "current_thread")]
async fn a_commit_blocked_by_a_lock_does_not_delay_other_jobs_ticks() {
    let mut fx = Fixture::new(50, 1_000).await;
    fx.advance(60);
    // The blocked job has loaded once: its next run only waits at commit.
    assert_eq!(fx.run().await.status, RunStatus::Succeeded);
    fx.sandbox.update_records("Account", 5).unwrap();
    fx.advance(3);
    // A second job on the same org, every second, into a warehouse of its own.
    let root = fx.dir.path();
    let config = root.join("nightjar.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[connections.other]\nkind = \"sqlite\"\npath = \"state/other.db\"\n"))
        .unwrap();
    let job = std::fs::read_to_string(root.join("jobs/accounts.toml")).unwrap();
    std::fs::write(
        root.join("jobs/ticker.toml"),
        format!("schedule = \"* * * * * *\"\n{}", job.replace("connection = \"wh\"", "connection = \"other\"")),
    )
    .unwrap();
    std::fs::write(root.join("jobs/accounts.toml"), format!("schedule = \"* * * * * *\"\n{job}")).unwrap();
    fx.reload();

    // Another writer holds the warehouse for 20 s (readers are not blocked,
    // so the run gets as far as its commit).
    let warehouse = fx.warehouse();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(warehouse).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let since = chrono::Utc::now();
        locked_tx.send(since).unwrap();
        std::thread::sleep(Duration::from_secs(20));
        conn.execute_batch("COMMIT").unwrap();
        (since, chrono::Utc::now())
    });
    let locked_at = locked_rx.recv().unwrap();

    let engine = std::sync::Arc::new(nightjar::run::Engine::new());
    let project = std::sync::Arc::new(fx.project.clone());
    let stop = tokio::time::sleep(Duration::from_secs(26));
    nightjar::run::serve(engine, project, fx.state.clone(), None, Duration::from_secs(30), stop).await.unwrap();
    let (_, released_at) = holder.join().unwrap();

    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    let started = |r: &nightjar::state::RunRecord| {
        chrono::DateTime::parse_from_rfc3339(&r.started_at).unwrap().with_timezone(&chrono::Utc)
    };
    // The ticker kept its one-second schedule while the lock was held.
    let mut ticks: Vec<_> = history
        .iter()
        .filter(|r| r.job == "ticker" && r.trigger == "schedule" && r.error_class.is_none())
        .map(started)
        .filter(|t| *t >= locked_at && *t <= released_at)
        .collect();
    ticks.sort();
    assert!(ticks.len() >= 15, "only {} ticker runs in the 20 s the lock was held: {history:#?}", ticks.len());
    let worst = ticks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(worst <= chrono::Duration::milliseconds(2_500), "a tick came {worst} after the one before");
    // The blocked job waited for the lock, then committed.
    let blocked = history
        .iter()
        .filter(|r| r.job == "accounts" && r.trigger == "schedule" && r.status == RunStatus::Succeeded)
        .min_by_key(|r| r.id)
        .expect("the blocked job's run succeeded once the lock was gone");
    let finished = chrono::DateTime::parse_from_rfc3339(blocked.finished_at.as_deref().unwrap()).unwrap();
    assert!(finished >= released_at, "it committed only after the lock was released");
    assert!(
        started(blocked) < released_at,
        "it was waiting while the lock was held: {:#?}",
        history.iter().filter(|r| r.job == "accounts").collect::<Vec<_>>()
    );
    assert_eq!(blocked.counts.updated, 5);
}
