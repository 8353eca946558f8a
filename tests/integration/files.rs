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
        fx.state.clear_watermark("accounts").unwrap();
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
