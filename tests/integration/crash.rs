//! Crash safety: a run killed with SIGKILL while staging and while
//! committing leaves the target and the watermark as they were, on a first
//! load and on the merge path of an incremental run, for every target; the
//! next run completes with exactly the source's data.
//!
//! The run is a child process (this test binary, re-executed) that stops at
//! the point through an injected hook, and is killed there.

use std::path::Path;

use nightjar::state::RunStatus;

use crate::fixture::{Fixture, FixtureOptions, TargetKind, start_paused_child};
use crate::postgres::{TestSchema, pg_url};

const ACCOUNTS: usize = 3_000;

/// What a target holds, read without mercy: any error fails the test.
enum Reader<'a> {
    Sqlite,
    Postgres(&'a TestSchema),
    Parquet,
    /// A partitioned Parquet snapshot, read through its manifest; every
    /// listed file must read and agree with the manifest.
    Partitioned,
    /// A CSV snapshot, read with Polars (all columns as text).
    Csv,
}

impl Reader<'_> {
    /// Every row, rendered as text in key order; `None` when there is no table yet.
    async fn rows(&self, fx: &Fixture) -> Option<Vec<String>> {
        match self {
            Reader::Sqlite => {
                let conn = rusqlite::Connection::open(fx.warehouse()).expect("the warehouse opens");
                let exists: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'account'",
                        [],
                        |r| r.get(0),
                    )
                    .expect("sqlite_schema reads");
                if exists == 0 {
                    return None;
                }
                let mut stmt = conn.prepare("SELECT * FROM account ORDER BY id").expect("the table reads");
                let width = stmt.column_count();
                let rows = stmt
                    .query_map([], |r| {
                        (0..width)
                            .map(|i| r.get::<_, rusqlite::types::Value>(i).map(|v| format!("{v:?}")))
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .expect("the query runs");
                Some(rows.map(|r| r.expect("a row reads").join("|")).collect())
            }
            Reader::Postgres(schema) => {
                let exists = schema
                    .scalar(&format!(
                        "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{}' AND table_name = 'account'",
                        schema.name
                    ))
                    .await;
                if exists == 0 {
                    return None;
                }
                Some(schema.snapshot("id").await)
            }
            Reader::Parquet => {
                let path = fx.dir.path().join("state/lake/account.parquet");
                let bytes = match std::fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                    Err(e) => panic!("{}: {e}", path.display()),
                };
                use polars::prelude::SerReader;
                let df = polars::prelude::ParquetReader::new(std::io::Cursor::new(&bytes))
                    .finish()
                    .unwrap_or_else(|e| panic!("{} does not read: {e}", path.display()));
                let df = df.sort(["id"], Default::default()).expect("sorts");
                Some((0..df.height()).map(|i| format!("{:?}", df.get_row(i).expect("a row").0)).collect())
            }
            Reader::Csv => {
                let path = fx.dir.path().join("state/lake/account.csv");
                if !path.exists() {
                    return None;
                }
                use polars::prelude::{CsvReadOptions, SerReader};
                let df = CsvReadOptions::default()
                    .with_infer_schema_length(Some(0))
                    .try_into_reader_with_file_path(Some(path.clone()))
                    .and_then(|r| r.finish())
                    .unwrap_or_else(|e| panic!("{} does not read: {e}", path.display()));
                let df = df.sort(["id"], Default::default()).expect("sorts");
                Some((0..df.height()).map(|i| format!("{:?}", df.get_row(i).expect("a row").0)).collect())
            }
            Reader::Partitioned => {
                crate::files::read_partitioned(&fx.dir.path().join("state/lake/account")).map(|p| p.rows)
            }
        }
    }
}

fn kill(mut child: std::process::Child) {
    child.kill().expect("SIGKILL delivered");
    let _ = child.wait();
}

fn run_child_and_kill(dir: &Path, point: &str) {
    let child = start_paused_child(dir, point);
    kill(child);
}

/// A first load killed at `point`: nothing visible, no watermark; then a
/// clean run loads every row once.
async fn first_load_crash(target: TargetKind, reader: Reader<'_>, point: &str) {
    let fx =
        Fixture::build(FixtureOptions { accounts: ACCOUNTS, page_size: 1_000, target, ..Default::default() }).await;
    fx.advance(60);
    let requests = fx.sandbox.request_log().len();
    tokio::task::block_in_place(|| run_child_and_kill(fx.dir.path(), point));
    assert!(fx.sandbox.request_log().len() > requests, "the killed run talked to the sandbox");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None, "the watermark never gets ahead of the data");
    let rows = reader.rows(&fx).await.unwrap_or_default();
    assert!(rows.is_empty(), "nothing of the killed run is visible: {} rows", rows.len());

    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    assert_eq!((report.counts.extracted, report.counts.inserted), (ACCOUNTS as u64, ACCOUNTS as u64));
    assert_eq!(reader.rows(&fx).await.map(|r| r.len()), Some(ACCOUNTS), "every row exactly once");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), report.window.map(|w| w.end));
}

/// An incremental run (some rows changed, some new, over several pages)
/// killed at `point`: the target is exactly as before, row for row, and the
/// watermark unmoved; the next run brings exactly the source's changes.
async fn incremental_crash(target: TargetKind, reader: Reader<'_>, point: &str) {
    let fx = Fixture::build(FixtureOptions { accounts: ACCOUNTS, page_size: 500, target, ..Default::default() }).await;
    fx.advance(60);
    let first = fx.run().await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    let before = reader.rows(&fx).await.expect("the first run made the table");
    let watermark = fx.state.watermark("accounts").await.unwrap();
    assert!(watermark.is_some());

    fx.advance(1);
    let updated = fx.sandbox.update_records("Account", 1_200).unwrap();
    let inserted = fx.sandbox.insert_records("Account", 300).unwrap();
    fx.advance(5);
    tokio::task::block_in_place(|| run_child_and_kill(fx.dir.path(), point));
    assert_eq!(reader.rows(&fx).await.as_ref(), Some(&before), "the target is exactly as before the killed run");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), watermark, "the watermark did not move");

    let next = fx.run().await;
    assert_eq!(next.status, RunStatus::Succeeded, "{:?}", next.error);
    assert_eq!(
        (next.counts.inserted, next.counts.updated),
        (inserted.len() as u64, updated.len() as u64),
        "exactly the source's changes, once"
    );
    let after = reader.rows(&fx).await.expect("the table is there");
    assert_eq!(after.len(), ACCOUNTS + inserted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_a_kill_while_staging_a_first_load() {
    first_load_crash(TargetKind::Sqlite, Reader::Sqlite, "stage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_a_kill_while_committing_a_first_load() {
    first_load_crash(TargetKind::Sqlite, Reader::Sqlite, "commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_a_kill_while_staging_an_incremental_run() {
    incremental_crash(TargetKind::Sqlite, Reader::Sqlite, "stage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_a_kill_while_committing_an_incremental_merge() {
    incremental_crash(TargetKind::Sqlite, Reader::Sqlite, "commit").await;
}

async fn postgres_crash(point: &str, incremental: bool) {
    let name = format!("crash_{point}_{}", if incremental { "incr" } else { "first" });
    let Some(schema) = TestSchema::create(&name).await else { return };
    let target = TargetKind::Postgres { url: pg_url(), table: schema.table() };
    if incremental {
        incremental_crash(target, Reader::Postgres(&schema), point).await;
    } else {
        first_load_crash(target, Reader::Postgres(&schema), point).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_a_kill_while_staging_a_first_load() {
    postgres_crash("stage", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_a_kill_while_committing_a_first_load() {
    postgres_crash("commit", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_a_kill_while_staging_an_incremental_run() {
    postgres_crash("stage", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_a_kill_while_committing_an_incremental_merge() {
    postgres_crash("commit", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_survive_a_kill_while_staging_a_first_load() {
    first_load_crash(TargetKind::Files { format: "parquet" }, Reader::Parquet, "stage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_survive_a_kill_while_committing_a_first_load() {
    first_load_crash(TargetKind::Files { format: "parquet" }, Reader::Parquet, "commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_survive_a_kill_while_staging_an_incremental_run() {
    incremental_crash(TargetKind::Files { format: "parquet" }, Reader::Parquet, "stage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_survive_a_kill_while_committing_an_incremental_merge() {
    incremental_crash(TargetKind::Files { format: "parquet" }, Reader::Parquet, "commit").await;
}

/// The incremental crash of a files job with `partition_by = ["industry"]`:
/// after the kill, every file the manifest lists reads and holds what the
/// manifest says, and the snapshot is the one before the run; the next run
/// completes with exactly the source's changes and removes the killed
/// run's files.
async fn partitioned_crash(point: &str) {
    let mut fx = Fixture::build(FixtureOptions {
        accounts: ACCOUNTS,
        page_size: 500,
        target: TargetKind::Files { format: "parquet" },
        ..Default::default()
    })
    .await;
    crate::files::partition_job(&mut fx, "industry");
    let table = fx.dir.path().join("state/lake/account");
    let reader = Reader::Partitioned;
    fx.advance(60);
    let first = fx.run().await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    let before = reader.rows(&fx).await.expect("the first run wrote a manifest");
    assert_eq!(before.len(), ACCOUNTS);
    let watermark = fx.state.watermark("accounts").await.unwrap();

    fx.advance(1);
    let updated = fx.sandbox.update_records("Account", 1_200).unwrap();
    let inserted = fx.sandbox.insert_records("Account", 300).unwrap();
    fx.advance(5);
    tokio::task::block_in_place(|| run_child_and_kill(fx.dir.path(), point));
    assert_eq!(reader.rows(&fx).await.as_ref(), Some(&before), "the snapshot is exactly as before the killed run");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), watermark, "the watermark did not move");

    let next = fx.run().await;
    assert_eq!(next.status, RunStatus::Succeeded, "{:?}", next.error);
    assert_eq!((next.counts.inserted, next.counts.updated), (inserted.len() as u64, updated.len() as u64));
    let after = crate::files::read_partitioned(&table).expect("a manifest");
    assert_eq!(after.rows.len(), ACCOUNTS + inserted.len());
    let listed: std::collections::BTreeSet<String> = after.files.values().map(|(f, _)| f.clone()).collect();
    assert_eq!(crate::files::data_files(&table), listed, "the killed run's files are gone");
    let source: std::collections::BTreeSet<String> =
        fx.sandbox.records("Account").unwrap().iter().map(|r| r[0].1.clone().unwrap()).collect();
    assert_eq!(source.len(), after.rows.len());
    assert!(source.iter().all(|id| after.rows.iter().any(|r| r.contains(id.as_str()))), "every source row is there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_files_survive_a_kill_while_staging_an_incremental_run() {
    partitioned_crash("stage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_files_survive_a_kill_while_committing_an_incremental_merge() {
    partitioned_crash("commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_files_survive_a_kill_while_committing_an_incremental_merge() {
    incremental_crash(TargetKind::Files { format: "csv" }, Reader::Csv, "commit").await;
}
