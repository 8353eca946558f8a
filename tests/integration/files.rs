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

/// Issue 13: composite keys are compared by value. Joined as display text
/// with U+001F, (`x"<US>"y`, `z`) and (`x`, `y"<US>"z`) both read
/// `"x"<US>"y"<US>"z"`, and the second row replaced the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_that_would_collide_as_joined_text_stay_two_rows() {
    use nightjar::config::{DeleteMode, FileFormat};
    use nightjar::load::{FilesTarget, LoadCounts, Target};
    use nightjar::schema::{ColumnType, MappedPage, TargetColumn, TargetSchema};

    use crate::postgres::merge_plan;

    let schema = TargetSchema {
        columns: vec![
            TargetColumn { name: "k1".into(), ty: ColumnType::Text, nullable: false },
            TargetColumn { name: "k2".into(), ty: ColumnType::Text, nullable: false },
            TargetColumn { name: "v".into(), ty: ColumnType::Integer, nullable: true },
        ],
        key: vec!["k1".into(), "k2".into()],
    };
    let keys = [("x\"\u{1f}\"y", "z"), ("x", "y\"\u{1f}\"z")];
    let page = |rows: &[(&str, &str)], v: i64| MappedPage {
        number: 1,
        rows: DataFrame::new(
            rows.len(),
            vec![
                Series::new("k1".into(), rows.iter().map(|r| r.0).collect::<Vec<_>>()).into_column(),
                Series::new("k2".into(), rows.iter().map(|r| r.1).collect::<Vec<_>>()).into_column(),
                Series::new("v".into(), vec![v; rows.len()]).into_column(),
            ],
        )
        .unwrap(),
        cursor: Some(Int64Chunked::from_slice("c".into(), &vec![1; rows.len()])),
        deleted: None,
    };
    for format in [FileFormat::Parquet, FileFormat::Csv] {
        let dir = tempfile::tempdir().unwrap();
        let open = || FilesTarget::open(dir.path(), format, "pairs", Vec::new(), nightjar::hooks::none()).unwrap();
        // Both keys in one page, then each again in a run of its own.
        // Each run: its rows, their value, the counts it must report.
        type Run<'a> = (&'a [(&'a str, &'a str)], i64, LoadCounts);
        let runs: [Run<'_>; 3] = [
            (&keys, 1, LoadCounts { inserted: 2, ..Default::default() }),
            (&keys[..1], 2, LoadCounts { updated: 1, ..Default::default() }),
            (&keys[1..], 2, LoadCounts { updated: 1, ..Default::default() }),
        ];
        for (run, (rows, v, want)) in runs.into_iter().enumerate() {
            let mut target = open();
            target.prepare(&merge_plan(schema.clone(), DeleteMode::Ignore, run as i64 + 1)).await.unwrap();
            target.stage(page(rows, v)).await.unwrap();
            assert_eq!(target.commit().await.unwrap(), want, "{format:?} run {}", run + 1);
        }
        let path = open().path();
        let df = match format {
            FileFormat::Parquet => ParquetReader::new(std::fs::File::open(&path).unwrap()).finish().unwrap(),
            FileFormat::Csv => CsvReadOptions::default()
                .with_infer_schema_length(Some(0))
                .try_into_reader_with_file_path(Some(path.clone()))
                .unwrap()
                .finish()
                .unwrap(),
        };
        let mut stored: Vec<(String, String)> = (0..df.height())
            .map(|i| {
                let cell = |c: &str| df.column(c).unwrap().str().unwrap().get(i).unwrap().to_string();
                (cell("k1"), cell("k2"))
            })
            .collect();
        stored.sort();
        let mut want: Vec<(String, String)> = keys.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        want.sort();
        assert_eq!(stored, want, "{format:?}: both keys are kept, byte for byte");
    }
}

/// Pages of one row (Polars makes their columns scalar columns) merge like
/// any others, into Parquet and CSV, on a first load and incrementally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_pages_merge_into_parquet_and_csv_snapshots() {
    for format in ["parquet", "csv"] {
        let fx = Fixture::build(FixtureOptions {
            accounts: 7,
            page_size: 1,
            target: TargetKind::Files { format },
            ..Default::default()
        })
        .await;
        fx.advance(60);
        let first = fx.run().await;
        assert_eq!(first.status, RunStatus::Succeeded, "{format}: {:?}", first.error);
        assert_eq!((first.counts.inserted, first.counts.pages), (7, 7), "{format}");
        fx.advance(1);
        fx.sandbox.update_records("Account", 2).unwrap();
        fx.sandbox.insert_records("Account", 1).unwrap();
        fx.advance(5);
        let next = fx.run().await;
        assert_eq!(next.status, RunStatus::Succeeded, "{format}: {:?}", next.error);
        assert_eq!((next.counts.updated, next.counts.inserted, next.counts.pages), (2, 1, 3), "{format}");
        let df = read(&fx, format);
        assert_eq!(df.height(), 8, "{format}");
        let source: std::collections::BTreeSet<String> =
            fx.sandbox.records("Account").unwrap().iter().map(|r| r[0].1.clone().unwrap()).collect();
        let stored: std::collections::BTreeSet<String> =
            df.column("id").unwrap().str().unwrap().iter().map(|v| v.unwrap().to_string()).collect();
        assert_eq!(stored, source, "{format}");
    }
}

/// A files job's `partition_by`, added to the fixture's job.
pub fn partition_job(fx: &mut Fixture, column: &str) {
    let job = fx.dir.path().join("jobs/accounts.toml");
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("{text}partition_by = [\"{column}\"]\n")).unwrap();
    fx.reload();
}

/// A partitioned snapshot as its manifest describes it: every listed file
/// read (any error fails the test), its row count and partition values
/// checked against the manifest. Rows rendered as text, sorted; `None`
/// when there is no manifest yet.
pub fn read_partitioned(table_dir: &std::path::Path) -> Option<Partitioned> {
    let manifest: serde_json::Value = match std::fs::read(table_dir.join("_manifest.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).expect("the manifest is JSON"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("the manifest does not read: {e}"),
    };
    let column = manifest["partition_by"][0].as_str().expect("partition_by").to_string();
    let mut rows = Vec::new();
    let mut files = std::collections::BTreeMap::new();
    let mut total = 0;
    for p in manifest["partitions"].as_array().expect("partitions") {
        let file = p["file"].as_str().expect("a file").to_string();
        let path = table_dir.join(&file);
        let df = ParquetReader::new(std::fs::File::open(&path).unwrap_or_else(|e| panic!("{file}: {e}")))
            .finish()
            .unwrap_or_else(|e| panic!("{file} does not read: {e}"));
        assert_eq!(df.height() as u64, p["rows"].as_u64().unwrap(), "{file}: rows as the manifest says");
        total += df.height();
        let value = p["values"][0].as_str();
        let values = df.column(&column).unwrap().str().unwrap().clone();
        assert!(values.iter().all(|v| v == value), "{file}: every row has the partition's value {value:?}");
        let df = df.sort(["id"], Default::default()).unwrap();
        let mine: Vec<String> = (0..df.height()).map(|i| format!("{:?}", df.get_row(i).unwrap().0)).collect();
        rows.extend(mine.iter().cloned());
        files.insert(p["name"].as_str().unwrap().to_string(), (file, mine));
    }
    assert_eq!(manifest["rows"].as_u64(), Some(total as u64), "the manifest's total");
    rows.sort();
    Some(Partitioned { rows, files })
}

pub struct Partitioned {
    /// Every row, rendered, sorted.
    pub rows: Vec<String>,
    /// Partition name -> (file, its rows rendered, sorted by id).
    pub files: std::collections::BTreeMap<String, (String, Vec<String>)>,
}

/// Files in the table directory other than the manifest.
pub fn data_files(table_dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(table_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "_manifest.json")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_snapshot_rewrites_only_the_partitions_that_changed() {
    let mut fx = Fixture::build(FixtureOptions {
        accounts: 400,
        page_size: 150,
        target: TargetKind::Files { format: "parquet" },
        ..Default::default()
    })
    .await;
    partition_job(&mut fx, "industry");
    let table = fx.dir.path().join("state/lake/account");
    fx.advance(60);
    let first = fx.run().await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    let before = read_partitioned(&table).expect("a manifest");
    assert_eq!(before.rows.len(), 400);
    assert!(before.files.len() > 3, "several partitions: {:?}", before.files.keys());
    assert!(before.files.keys().all(|n| n.starts_with("industry=")), "{:?}", before.files.keys());
    let listed: std::collections::BTreeSet<String> = before.files.values().map(|(f, _)| f.clone()).collect();
    assert_eq!(data_files(&table), listed, "only the listed files are in the directory");
    let mtime = |file: &str| std::fs::metadata(table.join(file)).unwrap().modified().unwrap();
    let mtimes: Vec<_> = before.files.values().map(|(f, _)| (f.clone(), mtime(f))).collect();

    // The same window again: nothing is rewritten, not even the manifest.
    let manifest_bytes = std::fs::read(table.join("_manifest.json")).unwrap();
    fx.state.clear_watermark("accounts").await.unwrap();
    let again = fx.run().await;
    assert_eq!((again.counts.unchanged, again.counts.inserted, again.counts.updated), (400, 0, 0));
    assert_eq!(std::fs::read(table.join("_manifest.json")).unwrap(), manifest_bytes);

    std::thread::sleep(std::time::Duration::from_millis(1100));
    fx.advance(1);
    let changed = fx.sandbox.update_records("Account", 1).unwrap();
    fx.advance(5);
    let next = fx.run().await;
    assert_eq!(next.status, RunStatus::Succeeded, "{:?}", next.error);
    assert_eq!(next.counts.updated, 1);
    let after = read_partitioned(&table).expect("a manifest");
    assert_eq!(after.rows.len(), 400);
    // The partitions whose rows differ are exactly those with a new file;
    // the others keep their file, untouched.
    let mut rewritten = Vec::new();
    let mut differ = Vec::new();
    for (name, (file, rows)) in &after.files {
        if before.files.get(name).is_none_or(|(_, old)| old != rows) {
            differ.push(name.clone());
        }
        match before.files.get(name) {
            Some((old, _)) if old == file => {
                let was = mtimes.iter().find(|(f, _)| f == file).unwrap().1;
                assert_eq!(mtime(file), was, "{name}: an untouched partition keeps its file and mtime");
            }
            _ => rewritten.push(name.clone()),
        }
    }
    assert_eq!(rewritten, differ, "only changed partitions are rewritten");
    assert!(after.rows.iter().filter(|r| r.contains(&changed[0])).count() == 1, "the changed row, once");
    assert!(
        (1..=2).contains(&rewritten.len()),
        "one changed record rewrites its partition (two if it moved): {rewritten:?}"
    );
    assert!(rewritten.len() < before.files.len());
    let listed: std::collections::BTreeSet<String> = after.files.values().map(|(f, _)| f.clone()).collect();
    assert_eq!(data_files(&table), listed, "replaced files are removed");
}
