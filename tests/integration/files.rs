//! The files target: one Parquet or CSV snapshot per table, merged by key,
//! replaced atomically.

use std::path::PathBuf;

use nightjar::state::RunStatus;
use polars::prelude::*;

use crate::fixture::{Fixture, FixtureOptions, TargetKind};

fn snapshot_path(fx: &Fixture, format: &str) -> PathBuf {
    fx.dir.path().join(format!("state/lake/account.{format}"))
}

/// The snapshot as a DataFrame, whatever its format.
fn read(fx: &Fixture, format: &str) -> DataFrame {
    let path = snapshot_path(fx, format);
    match format {
        "parquet" => ParquetReader::new(std::fs::File::open(path).unwrap()).finish().unwrap(),
        _ => nightjar::salesforce::parse_csv_page(&std::fs::read(path).unwrap()).unwrap(),
    }
}

fn count_where(df: &DataFrame, column: &str, value: bool) -> usize {
    df.column(column).unwrap().bool().unwrap().iter().filter(|v| *v == Some(value)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_merge_by_key_and_reruns_leave_the_file_byte_for_byte() {
    for format in ["parquet", "csv"] {
        let fx = Fixture::build(FixtureOptions {
            accounts: 500,
            page_size: 200,
            target: TargetKind::Files { format },
            deletes: "soft",
            ..Default::default()
        })
        .await;
        fx.advance(60);
        let first = fx.run().await;
        assert_eq!(first.status, RunStatus::Succeeded, "{format}: {:?}", first.error);
        assert_eq!((first.counts.inserted, first.counts.pages), (500, 3), "{format}");
        let bytes = std::fs::read(snapshot_path(&fx, format)).unwrap();
        assert_eq!(read(&fx, format).height(), 500);

        // The same window again: not a byte changes.
        fx.state.clear_watermark("accounts").await.unwrap();
        let again = fx.run().await;
        assert_eq!(again.status, RunStatus::Succeeded, "{format}: {:?}", again.error);
        assert_eq!((again.counts.unchanged, again.counts.inserted, again.counts.updated), (500, 0, 0), "{format}");
        assert_eq!(std::fs::read(snapshot_path(&fx, format)).unwrap(), bytes, "{format}: rerun rewrote the file");

        // Changes, additions and deletes merge by key.
        fx.advance(1);
        let changed = fx.sandbox.update_records("Account", 6).unwrap();
        fx.sandbox.insert_records("Account", 4).unwrap();
        let gone: Vec<String> = fx
            .sandbox
            .records("Account")
            .unwrap()
            .iter()
            .map(|r| r[0].1.clone().unwrap())
            .filter(|id| !changed.contains(id))
            .take(2)
            .collect();
        fx.sandbox.delete_records("Account", &gone).unwrap();
        fx.advance(5);
        let incr = fx.run().await;
        assert_eq!(incr.status, RunStatus::Succeeded, "{format}: {:?}", incr.error);
        assert_eq!((incr.counts.updated, incr.counts.inserted, incr.counts.deleted), (6, 4, 2), "{format}");
        let df = read(&fx, format);
        assert_eq!(df.height(), 504, "{format}: one row per key");
        let ids: std::collections::HashSet<String> =
            df.column("id").unwrap().str().unwrap().iter().map(|v| v.unwrap().to_string()).collect();
        assert_eq!(ids.len(), 504);
        if format == "parquet" {
            assert_eq!(count_where(&df, "_deleted", true), 2);
        } else {
            let flags = df.column("_deleted").unwrap().str().unwrap().iter().filter(|v| *v == Some("true")).count();
            assert_eq!(flags, 2);
        }
        let leftovers: Vec<_> = std::fs::read_dir(fx.dir.path().join("state/lake")).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "{format}: only the snapshot is in the directory");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_schema_evolution() {
    for (mode, ok) in [("fail", false), ("add_columns", true)] {
        let mut fx = Fixture::build(FixtureOptions {
            accounts: 30,
            target: TargetKind::Files { format: "parquet" },
            schema_evolution: mode,
            ..Default::default()
        })
        .await;
        fx.advance(60);
        assert_eq!(fx.run().await.status, RunStatus::Succeeded);
        let mapping = fx.dir.path().join("mappings/accounts.toml");
        let mut text = std::fs::read_to_string(&mapping).unwrap();
        text.push_str("[[column]]\nname = \"rating_again\"\nfrom = \"Rating\"\n");
        std::fs::write(&mapping, text).unwrap();
        fx.reload();
        fx.advance(1);
        fx.sandbox.update_records("Account", 2).unwrap();
        fx.advance(5);
        let report = fx.run().await;
        if ok {
            assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
            let df = read(&fx, "parquet");
            assert!(df.column("rating_again").is_ok());
            assert_eq!(df.height(), 30);
        } else {
            assert_eq!(report.status, RunStatus::Failed);
            assert!(report.error.unwrap().contains("column `rating_again` is mapped but not in the file"));
        }
    }
}

/// Invariant 4 for the SQLite and files targets: the same key twice in one
/// extract resolves to the highest cursor (on a tie, the later row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_in_one_extract_resolve_to_the_newest_row_in_sqlite_and_files() {
    use nightjar::config::{DeleteMode, FileFormat};
    use nightjar::load::{FilesTarget, SqliteTarget, Target};

    use crate::postgres::{id_value_schema, merge_plan, page};

    let dir = tempfile::tempdir().unwrap();
    let hooks = nightjar::hooks::none;
    let targets: Vec<(&str, Box<dyn Target>)> = vec![
        ("sqlite", Box::new(SqliteTarget::open(&dir.path().join("w.db"), "account", hooks()).await.unwrap())),
        (
            "files",
            Box::new(
                FilesTarget::open(&dir.path().join("lake"), FileFormat::Parquet, "account", Vec::new(), hooks())
                    .unwrap(),
            ),
        ),
    ];
    for (kind, mut target) in targets {
        target.prepare(&merge_plan(id_value_schema(), DeleteMode::Ignore, 1)).await.unwrap();
        target.stage(page(&["a", "a", "b"], &[1, 2, 10], &[10, 20, 5])).await.unwrap();
        target.stage(page(&["a", "b", "b"], &[3, 11, 12], &[15, 5, 4])).await.unwrap();
        let counts = target.commit().await.unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!((counts.inserted, counts.updated), (2, 0), "{kind}");
        let values: Vec<(String, i64)> = match kind {
            "sqlite" => {
                let conn = rusqlite::Connection::open(dir.path().join("w.db")).unwrap();
                let mut stmt = conn.prepare("SELECT id, v FROM account ORDER BY id").unwrap();
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
            }
            _ => {
                let df = ParquetReader::new(std::fs::File::open(dir.path().join("lake/account.parquet")).unwrap())
                    .finish()
                    .unwrap();
                let ids = df.column("id").unwrap().str().unwrap().clone();
                let vs = df.column("v").unwrap().i64().unwrap().clone();
                let mut rows: Vec<(String, i64)> =
                    ids.iter().zip(vs.iter()).map(|(i, v)| (i.unwrap().to_string(), v.unwrap())).collect();
                rows.sort();
                rows
            }
        };
        assert_eq!(values, vec![("a".to_string(), 2), ("b".to_string(), 11)], "{kind}");
    }
}
