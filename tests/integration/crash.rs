//! Crash safety: a `nightjar run` killed with SIGKILL while staging and while
//! committing leaves the target and the watermark as they were; the next run
//! completes with every row exactly once.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nightjar::state::RunStatus;

use crate::fixture::{Fixture, FixtureOptions, TargetKind};
use crate::postgres::{TestSchema, pg_url};

const ACCOUNTS: usize = 3_000;

/// Starts `nightjar run accounts` paused at `point`, waits until it gets
/// there, and kills it with SIGKILL.
fn run_and_kill_at(fx: &Fixture, point: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["--config", "nightjar.toml", "run", "accounts"])
        .current_dir(fx.dir.path())
        .env("NIGHTJAR_TEST_PAUSE_AT", point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nightjar starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("paused at") {
                let _ = tx.send(());
            }
        }
    });
    let reached = rx.recv_timeout(Duration::from_secs(120));
    child.kill().expect("SIGKILL delivered");
    let _ = child.wait();
    assert!(reached.is_ok(), "the run never reached the `{point}` pause point");
}

async fn crash_then_recover(target: TargetKind, point: &str, count_rows: impl AsyncFn(&Fixture) -> i64) {
    let fx =
        Fixture::build(FixtureOptions { accounts: ACCOUNTS, page_size: 1_000, target, ..Default::default() }).await;
    fx.advance(60);
    // A run in progress is killed: a process in the middle of the pipeline has to be spawned.
    let pages_before = fx.sandbox.request_log().len();
    tokio::task::block_in_place(|| run_and_kill_at(&fx, point));
    assert!(fx.sandbox.request_log().len() > pages_before, "the killed run talked to the sandbox");
    assert_eq!(fx.state.watermark("accounts").unwrap(), None, "the watermark never gets ahead of the data");
    assert_eq!(count_rows(&fx).await, 0, "nothing of the killed run is visible in the target");

    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    assert_eq!((report.counts.extracted, report.counts.inserted), (ACCOUNTS as u64, ACCOUNTS as u64));
    assert_eq!(count_rows(&fx).await, ACCOUNTS as i64, "every row exactly once");
    assert_eq!(fx.state.watermark("accounts").unwrap(), report.window.map(|w| w.end));
}

fn sqlite_rows(fx: &Fixture) -> i64 {
    let conn = rusqlite::Connection::open(fx.warehouse()).unwrap();
    // The table may not exist yet if the crash came before its creation.
    conn.query_row("SELECT count(*) FROM account", [], |r| r.get(0)).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_a_kill_while_staging() {
    crash_then_recover(TargetKind::Sqlite, "stage", async |fx: &Fixture| sqlite_rows(fx)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_a_kill_while_committing() {
    crash_then_recover(TargetKind::Sqlite, "commit", async |fx: &Fixture| sqlite_rows(fx)).await;
}

async fn postgres_crash(point: &str) {
    let Some(schema) = TestSchema::create(&format!("crash_{point}")).await else { return };
    let target = TargetKind::Postgres { url: pg_url(), table: schema.table() };
    let schema_ref = &schema;
    crash_then_recover(target, point, async |_fx: &Fixture| {
        let exists = schema_ref
            .scalar(&format!(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{}' AND table_name = 'account'",
                schema_ref.name
            ))
            .await;
        if exists == 0 { 0 } else { schema_ref.scalar("SELECT count(*) FROM $S.account").await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_a_kill_while_staging() {
    postgres_crash("stage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_a_kill_while_committing() {
    postgres_crash("commit").await;
}

fn files_rows(fx: &Fixture) -> i64 {
    let path = fx.dir.path().join("state/lake/account.parquet");
    match std::fs::File::open(path) {
        Ok(file) => {
            use polars::prelude::SerReader;
            polars::prelude::ParquetReader::new(file).finish().map(|df| df.height() as i64).unwrap_or(-1)
        }
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_survive_a_kill_while_staging() {
    crash_then_recover(TargetKind::Files { format: "parquet" }, "stage", async |fx: &Fixture| files_rows(fx)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_survive_a_kill_while_committing() {
    crash_then_recover(TargetKind::Files { format: "parquet" }, "commit", async |fx: &Fixture| files_rows(fx)).await;
}
