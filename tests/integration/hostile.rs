//! Infrastructure at its worst: an SMTP server that accepts and never
//! speaks, a Postgres connection that drops mid-run, a disk that refuses to
//! grow the snapshot, and absurd arguments. nightjar ends in bounded time,
//! classes each failure by what it was, and never panics.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nightjar::outcome::ErrorClass;
use nightjar::state::{HistoryFilter, OutboxFilter, OutboxStatus, RunStatus};

use crate::fixture::{Fixture, FixtureOptions, TargetKind};
use crate::postgres::{TestSchema, pg_url};

/// A TCP server that accepts connections and never sends a byte: an SMTP
/// server that never greets. Accepted sockets stay open until it drops.
struct BlackHole {
    port: u16,
    _accepting: std::thread::JoinHandle<()>,
}

impl BlackHole {
    fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepting = std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().map_while(Result::ok) {
                held.push(stream);
            }
        });
        BlackHole { port, _accepting: accepting }
    }
}

/// A child process that is killed (and reaped) if a test fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fixture, mailing failures through `port` with a 3 s SMTP timeout,
/// and a query job that fails (so there is a failure to mail).
async fn failing_job_mailing_to(port: u16) -> Fixture {
    let mut fx = Fixture::new(20, 1_000).await;
    fx.advance(60);
    let config = fx.dir.path().join("nightjar.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}\n[smtp]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\nfrom = \"etl@example.com\"\ntimeout = \"3s\"\n\n[alerts]\nemail = [\"oncall@example.com\"]\n"
        ),
    )
    .unwrap();
    fx.reload();
    fx.sandbox.fail_next_query_jobs(100, "InvalidBatch: boom");
    fx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_within_the_smtp_timeout_when_the_server_never_greets() {
    let hole = BlackHole::start();
    let fx = failing_job_mailing_to(hole.port).await;
    let started = Instant::now();
    let out = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_nightjar"))
            .args(["--config", "nightjar.toml", "run", "accounts"])
            .current_dir(fx.dir.path())
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    });
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the run failed, and nightjar said so: {err}");
    assert!(took < Duration::from_secs(3 + 10), "`run` took {took:?} with an SMTP server that never greets");
    let outbox = fx.state.outbox(OutboxFilter::default()).await.unwrap();
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    assert_eq!(outbox[0].status, OutboxStatus::Pending, "the alert stays in the outbox for later: {outbox:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_within_its_grace_period_when_the_smtp_server_never_greets() {
    let hole = BlackHole::start();
    let fx = failing_job_mailing_to(hole.port).await;
    let job = fx.dir.path().join("jobs/accounts.toml");
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("schedule = \"* * * * * *\"\n{text}")).unwrap();
    let log = std::fs::File::create(fx.dir.path().join("serve.log")).unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_nightjar"))
            .args(["--config", "nightjar.toml", "serve", "--grace", "2s"])
            .current_dir(fx.dir.path())
            .env("RUST_LOG", "nightjar=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // Failures are queued and the sender is stuck talking to the hole.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let queued = fx.state.outbox(OutboxFilter::default()).await.unwrap();
        if !queued.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no alert was queued");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap().success());
    let mut exited = None;
    while stopping.elapsed() < Duration::from_secs(30) {
        if let Some(status) = child.0.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = stopping.elapsed();
    let mut log = String::new();
    std::fs::File::open(fx.dir.path().join("serve.log")).unwrap().read_to_string(&mut log).unwrap();
    let Some(status) = exited else {
        panic!("serve did not exit within 30 s of SIGTERM:\n{log}");
    };
    assert!(status.success(), "{status}:\n{log}");
    assert!(took < Duration::from_secs(2 + 8), "serve took {took:?} to stop (grace 2 s):\n{log}");
    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    assert!(history.iter().all(|r| r.status != RunStatus::Running), "no run left running: {history:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_connection_dropped_mid_run_is_a_network_failure() {
    let Some(schema) = TestSchema::create("dropped").await else { return };
    let fx = Fixture::build(FixtureOptions {
        accounts: 3_000,
        page_size: 1_000,
        target: TargetKind::Postgres { url: pg_url(), table: schema.table() },
        ..Default::default()
    })
    .await;
    fx.advance(60);
    // The second page comes late: the run sits in its first load, its
    // transaction open, when the server drops its connection.
    fx.sandbox.add_faults("delay:ms=3000,on=results,nth=2").unwrap();
    let run = fx.run();
    let terminate = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let killed = schema
            .scalar(&format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'nightjar run 1 into {}'",
                schema.table()
            ))
            .await;
        assert_eq!(killed, 1, "the run's session was found and ended");
    };
    let (report, ()) = tokio::join!(run, terminate);
    assert_eq!(report.status, RunStatus::Failed);
    assert_eq!(report.error_class, Some(ErrorClass::Network), "{:?}", report.error);
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None);
}

#[test]
fn history_since_an_absurd_duration_lists_everything_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    for since in ["300000years", "18446744073709551615s"] {
        let out = Command::new(env!("CARGO_BIN_EXE_nightjar"))
            .args(["--state", "state.db", "history", "--since", since])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code().is_some_and(|c| c == 0 || c == 1), "{since}: {:?} {err}", out.status);
        assert!(!err.contains("panicked"), "{since}: {err}");
    }
}

/// Issue 13: a disk that refuses to grow the snapshot (here a 1 MB file-size
/// limit, EFBIG "File too large") while the files target writes is class
/// `disk`, naming the operation and the file, never `target` or
/// `schema_drift`; nothing is left behind, the watermark stays, and the
/// next run without the limit loads everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_size_limit_while_writing_parquet_is_a_disk_failure() {
    let fx = Fixture::build(FixtureOptions {
        accounts: 20_000,
        page_size: 5_000,
        target: TargetKind::Files { format: "parquet" },
        ..Default::default()
    })
    .await;
    fx.advance(60);
    let command = format!(
        "trap '' XFSZ; exec prlimit --fsize=1000000 {} --config nightjar.toml run accounts",
        env!("CARGO_BIN_EXE_nightjar")
    );
    let out = tokio::task::block_in_place(|| {
        Command::new("bash").args(["-c", &command]).current_dir(fx.dir.path()).env_remove("RUST_LOG").output().unwrap()
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the run failed, and said so: {err}");
    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    let run = history.first().expect("the run is recorded");
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.error_class.as_deref(), Some(ErrorClass::Disk.as_str()), "{:?}", run.error);
    let message = run.error.clone().unwrap_or_default();
    assert!(message.contains("File too large"), "the I/O error itself: {message}");
    assert!(message.contains("writing ") && message.contains("state/lake/"), "the operation and the path: {message}");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None, "the watermark stays");
    let lake = fx.dir.path().join("state/lake");
    let left: Vec<String> = std::fs::read_dir(&lake)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "no snapshot, no temp files: {left:?}");

    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    assert_eq!(report.counts.inserted, 20_000);
    let df = polars::prelude::ParquetReader::new(std::fs::File::open(lake.join("account.parquet")).unwrap());
    use polars::prelude::SerReader;
    assert_eq!(df.finish().unwrap().height(), 20_000);
}
