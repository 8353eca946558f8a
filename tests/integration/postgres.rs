//! The Postgres target against the server on this machine
//! (`NIGHTJAR_TEST_POSTGRES_URL`, default postgresql://postgres@127.0.0.1:5432/test).
//! Each test works in a schema of its own, dropped afterwards. Under CI
//! (`CI` set) an unreachable server fails the tests; elsewhere they skip loudly.

use std::sync::atomic::{AtomicU32, Ordering};

use nightjar::config::{DeleteMode, SchemaEvolution};
use nightjar::load::{MergePlan, PostgresTarget, Target};
use nightjar::schema::{ColumnType, MappedPage, TargetColumn, TargetSchema};
use nightjar::state::RunStatus;
use polars::prelude::*;

use crate::fixture::{Fixture, FixtureOptions, TargetKind};

pub fn pg_url() -> String {
    std::env::var("NIGHTJAR_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

/// A schema of the test's own; dropped when the guard drops.
pub struct TestSchema {
    pub name: String,
    client: tokio_postgres::Client,
}

impl TestSchema {
    /// `None` (with a loud message) when Postgres is unreachable outside CI.
    pub async fn create(test: &str) -> Option<TestSchema> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let url = pg_url();
        let client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((client, driver)) => {
                tokio::spawn(driver);
                client
            }
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("Postgres at {url} is unreachable ({e}); CI must run the Postgres tests (.ci/run starts it)")
            }
            Err(e) => {
                eprintln!(
                    "\n*** SKIPPING {test}: Postgres at {url} is unreachable ({e}).\n*** Start it (pg_ctlcluster ... start) or set NIGHTJAR_TEST_POSTGRES_URL to run the Postgres tests.\n"
                );
                return None;
            }
        };
        let name = format!("nj_{}_{}_{}", test, std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE; CREATE SCHEMA \"{name}\""))
            .await
            .unwrap();
        Some(TestSchema { name, client })
    }

    pub fn table(&self) -> String {
        format!("{}.account", self.name)
    }

    /// The whole table as JSON text, one row per line, ordered by key.
    pub async fn snapshot(&self, key: &str) -> Vec<String> {
        let sql = format!("SELECT row_to_json(t)::text FROM \"{}\".account t ORDER BY \"{key}\"", self.name);
        self.client.query(&sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
    }

    pub async fn text_rows(&self, sql: &str) -> Vec<String> {
        self.client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        self.client.query_one(&sql.replace("$S", &format!("\"{}\"", self.name)), &[]).await.unwrap().get(0)
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (pg_url(), self.name.clone());
        // Drop runs outside async context; a short-lived runtime on its own thread does the cleanup.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok((client, driver)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    tokio::spawn(driver);
                    let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")).await;
                }
            });
        })
        .join();
    }
}

async fn pg_fixture(schema: &TestSchema, options: FixtureOptions) -> Fixture {
    Fixture::build(FixtureOptions { target: TargetKind::Postgres { url: pg_url(), table: schema.table() }, ..options })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_load_is_idempotent_and_incremental() {
    let Some(schema) = TestSchema::create("idem").await else { return };
    let fx = pg_fixture(&schema, FixtureOptions { accounts: 1_200, page_size: 500, ..Default::default() }).await;
    fx.advance(60);

    let first = fx.run().await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    assert_eq!((first.counts.extracted, first.counts.inserted, first.counts.pages), (1_200, 1_200, 3));
    let snapshot = schema.snapshot("id").await;
    assert_eq!(snapshot.len(), 1_200);

    // The same window again: byte-for-byte the same table.
    fx.state.clear_watermark("accounts").await.unwrap();
    let again = fx.run().await;
    assert_eq!(again.status, RunStatus::Succeeded, "{:?}", again.error);
    assert_eq!((again.counts.inserted, again.counts.updated, again.counts.unchanged), (0, 0, 1_200));
    assert_eq!(schema.snapshot("id").await, snapshot, "a repeated window rewrites nothing");

    // Only changed rows move, and only they get the new run id.
    fx.advance(1);
    fx.sandbox.update_records("Account", 7).unwrap();
    fx.advance(3);
    let incr = fx.run().await;
    assert_eq!(incr.status, RunStatus::Succeeded, "{:?}", incr.error);
    assert_eq!((incr.counts.extracted, incr.counts.updated, incr.counts.inserted), (7, 7, 0));
    let moved =
        schema.scalar(&format!("SELECT count(*) FROM $S.account WHERE _nightjar_run_id = {}", incr.run_id)).await;
    assert_eq!(moved, 7);
    let ts_type = schema
        .scalar(&format!(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = '{}' AND column_name = 'systemmodstamp' AND data_type = 'timestamp with time zone'",
            schema.name
        ))
        .await;
    assert_eq!(ts_type, 1, "timestamp columns are timestamptz");
}

/// A mapped page `(id, v)` with its cursors, as the transform stage hands it to a target.
pub fn page(ids: &[&str], values: &[i64], cursors: &[i64]) -> MappedPage {
    let id = Series::new("id".into(), ids.to_vec()).into_column();
    let v = Series::new("v".into(), values.to_vec()).into_column();
    MappedPage {
        number: 1,
        rows: DataFrame::new(ids.len(), vec![id, v]).unwrap(),
        cursor: Some(Int64Chunked::from_slice("cursor".into(), cursors)),
        deleted: None,
    }
}

/// What a run of a job with `schema` and `deletes` asks of its target.
pub fn merge_plan(schema: TargetSchema, deletes: DeleteMode, run: i64) -> MergePlan {
    MergePlan { run, schema, deletes, create: true, schema_evolution: SchemaEvolution::Fail, has_cursor: true }
}

/// A Postgres target for `schema.table`.
pub async fn connect(table: &str) -> PostgresTarget {
    let (schema, table) = table.split_once('.').expect("a schema-qualified table");
    PostgresTarget::connect("test", &pg_url(), Some(schema.into()), table, nightjar::hooks::none()).await.unwrap()
}

/// Schema of [`page`]: text key `id`, integer `v`.
pub fn id_value_schema() -> TargetSchema {
    TargetSchema {
        columns: vec![
            TargetColumn { name: "id".into(), ty: ColumnType::Text, nullable: false },
            TargetColumn { name: "v".into(), ty: ColumnType::Integer, nullable: true },
        ],
        key: vec!["id".into()],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_in_one_extract_resolve_to_the_newest_row() {
    let Some(schema) = TestSchema::create("dups").await else { return };
    let target_schema = id_value_schema();
    let mut target = connect(&schema.table()).await;
    target.prepare(&merge_plan(target_schema.clone(), DeleteMode::Ignore, 1)).await.unwrap();
    target.stage(page(&["a", "a", "b"], &[1, 2, 10], &[10, 20, 5])).await.unwrap();
    target.stage(page(&["a", "b", "b"], &[3, 11, 12], &[15, 5, 4])).await.unwrap();
    let counts = target.commit().await.expect("the merge never sees a key twice");
    assert_eq!((counts.inserted, counts.updated), (2, 0));
    let a = schema.scalar("SELECT v FROM $S.account WHERE id = 'a'").await;
    let b = schema.scalar("SELECT v FROM $S.account WHERE id = 'b'").await;
    assert_eq!(a, 2, "highest cursor wins");
    assert_eq!(b, 11, "on a cursor tie the later row wins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_evolution_adds_columns_or_stops_with_the_differences() {
    let Some(schema) = TestSchema::create("evolve").await else { return };
    for (mode, expect_ok) in [("fail", false), ("add_columns", true)] {
        let table = format!("{}_{mode}", schema.table());
        let mut fx = Fixture::build(FixtureOptions {
            accounts: 50,
            target: TargetKind::Postgres { url: pg_url(), table: table.clone() },
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
        fx.state.clear_watermark("accounts").await.unwrap();
        let report = fx.run().await;
        if expect_ok {
            assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
            let quoted = format!("\"{}\".\"account_{mode}\"", schema.name);
            let filled = schema.scalar(&format!("SELECT count(rating_again) FROM {quoted}")).await;
            let ratings = schema.scalar(&format!("SELECT count(rating) FROM {quoted}")).await;
            assert_eq!(filled, ratings, "the new column is added and filled");
        } else {
            assert_eq!(report.status, RunStatus::Failed);
            let error = report.error.unwrap();
            assert!(error.contains("column `rating_again` is mapped but not in the table"), "{error}");
            assert!(error.contains("schema_evolution = \"add_columns\""), "{error}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_soft_and_hard_in_postgres() {
    let Some(schema) = TestSchema::create("deletes").await else { return };
    for mode in ["soft", "hard"] {
        let table = format!("{}_{mode}", schema.table());
        let fx = Fixture::build(FixtureOptions {
            accounts: 40,
            target: TargetKind::Postgres { url: pg_url(), table: table.clone() },
            deletes: mode,
            ..Default::default()
        })
        .await;
        fx.advance(60);
        assert_eq!(fx.run().await.status, RunStatus::Succeeded);
        let ids: Vec<String> =
            fx.sandbox.records("Account").unwrap().iter().take(3).map(|r| r[0].1.clone().unwrap()).collect();
        fx.sandbox.delete_records("Account", &ids).unwrap();
        fx.advance(5);
        let report = fx.run().await;
        assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
        assert_eq!(report.counts.deleted, 3, "{mode}");
        let quoted = format!("\"{}\".\"account_{mode}\"", schema.name);
        let rows = schema.scalar(&format!("SELECT count(*) FROM {quoted}")).await;
        if mode == "soft" {
            assert_eq!(rows, 40);
            assert_eq!(schema.scalar(&format!("SELECT count(*) FROM {quoted} WHERE _deleted")).await, 3);
        } else {
            assert_eq!(rows, 37);
        }
        // The deletes are idempotent too.
        fx.state.clear_watermark("accounts").await.unwrap();
        let again = fx.run().await;
        assert_eq!(again.status, RunStatus::Succeeded, "{:?}", again.error);
        assert_eq!((again.counts.inserted, again.counts.updated), (0, 0), "{mode}");
        assert_eq!(schema.scalar(&format!("SELECT count(*) FROM {quoted}")).await, rows);
    }
}

/// Every mapped type lands as a native Postgres type with its exact value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_columns_land_as_native_postgres_types() {
    let Some(schema) = TestSchema::create("types").await else { return };
    let mut fx = pg_fixture(&schema, FixtureOptions { accounts: 200, ..Default::default() }).await;
    let mapping = r#"
[[column]]
name = "id"
from = "Id"
required = true
[[column]]
name = "revenue"
from = "AnnualRevenue"
type = "decimal(18,2)"
[[column]]
name = "since"
from = "CustomerSince__c"
type = "date"
[[column]]
name = "score"
from = "Score__c"
type = "decimal(5,2)"
[[column]]
name = "employees"
from = "NumberOfEmployees"
type = "integer"
[[column]]
name = "active"
from = "IsActive__c"
type = "boolean"
[[column]]
name = "modified"
from = "SystemModstamp"
type = "timestamp"
"#;
    std::fs::write(fx.dir.path().join("mappings/accounts.toml"), mapping).unwrap();
    fx.reload();
    fx.advance(60);
    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    assert_eq!((report.counts.inserted, report.counts.rejected), (200, 0));

    let types = schema
        .text_rows(&format!(
            "SELECT column_name || ' ' || data_type FROM information_schema.columns WHERE table_schema = '{}' \
             AND table_name = 'account' AND column_name NOT LIKE '\\_%' ORDER BY ordinal_position",
            schema.name
        ))
        .await;
    assert_eq!(
        types,
        [
            "id text",
            "revenue numeric",
            "since date",
            "score numeric",
            "employees bigint",
            "active boolean",
            "modified timestamp with time zone"
        ]
    );
    // Values match what Salesforce sent, exactly (numeric keeps its scale).
    let records = fx.sandbox.records("Account").unwrap();
    let value =
        |r: &Vec<(String, Option<String>)>, f: &str| r.iter().find(|(k, _)| k == f).and_then(|(_, v)| v.clone());
    for record in records.iter().take(50) {
        let id = value(record, "Id").unwrap();
        let row = schema
            .text_rows(&format!(
                "SELECT concat_ws('|', revenue::text, since::text, score::text) FROM \"{}\".account WHERE id = '{id}'",
                schema.name
            ))
            .await;
        let expected_revenue = value(record, "AnnualRevenue");
        let got: Vec<&str> = row[0].split('|').collect();
        if let Some(rev) = expected_revenue {
            assert!(got.contains(&rev.as_str()), "revenue {rev} in {got:?}");
        }
        if let Some(since) = value(record, "CustomerSince__c") {
            assert!(got.contains(&since.as_str()), "date {since} in {got:?}");
        }
    }
}

/// The table as JSON text without the bookkeeping columns, ordered by key.
async fn data_snapshot(schema: &TestSchema, table: &str, key: &str) -> Vec<String> {
    schema
        .text_rows(&format!(
            "SELECT (to_jsonb(t) - '_nightjar_run_id' - '_nightjar_loaded_at')::text FROM \"{}\".\"{table}\" t ORDER BY \"{key}\"",
            schema.name
        ))
        .await
}

/// A first load goes straight into the empty table (no staging, no merge);
/// it must give exactly the table the staging + merge path gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_load_gives_the_same_table_as_the_merge_path() {
    let Some(schema) = TestSchema::create("fastpath").await else { return };
    // Both sandboxes generate the same records only from the same start.
    let start = chrono::Utc::now() - chrono::Duration::hours(1);
    for deletes in ["soft", "hard", "ignore"] {
        let fast_table = format!("fast_{deletes}");
        let merge_table = format!("merge_{deletes}");
        let fixture = |table: &str| {
            Fixture::build(FixtureOptions {
                accounts: 1_500,
                page_size: 400,
                target: TargetKind::Postgres { url: pg_url(), table: format!("{}.{table}", schema.name) },
                deletes,
                sandbox_start: Some(start),
                ..Default::default()
            })
        };
        let fast = fixture(&fast_table).await;
        let merge = fixture(&merge_table).await;
        for fx in [&fast, &merge] {
            // Deleted records in the extract (same ones in both sandboxes).
            let ids: Vec<String> = fx
                .sandbox
                .records("Account")
                .unwrap()
                .iter()
                .skip(10)
                .step_by(97)
                .map(|r| r[0].1.clone().unwrap())
                .collect();
            fx.sandbox.delete_records("Account", &ids).unwrap();
            fx.advance(60);
        }

        // The merge path: the table exists and holds a row (taken out afterwards).
        let first = merge.run().await;
        assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
        let quoted_merge = format!("\"{}\".\"{merge_table}\"", schema.name);
        schema
            .scalar(&format!(
                "WITH d AS (DELETE FROM {quoted_merge} WHERE id <> (SELECT min(id) FROM {quoted_merge}) RETURNING 1) \
                 SELECT count(*) FROM d"
            ))
            .await;
        schema
            .scalar(&format!(
                "WITH u AS (UPDATE {quoted_merge} SET id = 'zzz-sentinel' RETURNING 1) SELECT count(*) FROM u"
            ))
            .await;
        merge.state.clear_watermark("accounts").await.unwrap();
        let merged = merge.run().await;
        assert_eq!(merged.status, RunStatus::Succeeded, "{:?}", merged.error);
        schema
            .scalar(&format!(
                "WITH d AS (DELETE FROM {quoted_merge} WHERE id = 'zzz-sentinel' RETURNING 1) SELECT count(*) FROM d"
            ))
            .await;

        let direct = fast.run().await;
        assert_eq!(direct.status, RunStatus::Succeeded, "{:?}", direct.error);
        let live = 1_500 - 16;
        assert_eq!(direct.counts.extracted, if deletes == "ignore" { live } else { 1_500 } as u64);
        assert_eq!(
            (direct.counts.inserted, direct.counts.updated, direct.counts.unchanged, direct.counts.deleted),
            (merged.counts.inserted, merged.counts.updated, merged.counts.unchanged, merged.counts.deleted),
            "{deletes}: counts"
        );
        let fast_rows = data_snapshot(&schema, &fast_table, "id").await;
        let merge_rows = data_snapshot(&schema, &merge_table, "id").await;
        let expected = if deletes == "soft" { 1_500 } else { live };
        assert_eq!(fast_rows.len(), expected, "{deletes}");
        if fast_rows != merge_rows {
            let diff: Vec<(&String, &String)> =
                fast_rows.iter().zip(&merge_rows).filter(|(a, b)| a != b).take(3).collect();
            panic!(
                "{deletes}: the first load differs from the merge path ({} vs {} rows): {diff:?}",
                fast_rows.len(),
                merge_rows.len()
            );
        }
        // Every row of the first load carries its run id.
        let quoted_fast = format!("\"{}\".\"{fast_table}\"", schema.name);
        let ours = schema
            .scalar(&format!("SELECT count(*) FROM {quoted_fast} WHERE _nightjar_run_id = {}", direct.run_id))
            .await;
        assert_eq!(ours as usize, expected);

        // And the fast-loaded table takes the next incremental run like any other.
        fast.advance(1);
        fast.sandbox.update_records("Account", 5).unwrap();
        fast.advance(3);
        let incr = fast.run().await;
        assert_eq!(incr.status, RunStatus::Succeeded, "{:?}", incr.error);
        assert_eq!((incr.counts.updated, incr.counts.inserted), (5, 0), "{deletes}");
    }
}

/// A mapped page `(id, v, modified)` whose `modified` column is the cursor.
fn page_with_modified(ids: &[&str], values: &[i64], cursors: &[i64], deleted: Option<&[bool]>) -> MappedPage {
    let mut page = page(ids, values, cursors);
    let modified =
        Series::new("modified".into(), cursors.to_vec()).into_datetime(TimeUnit::Milliseconds, None).into_column();
    page.rows.with_column(modified).unwrap();
    page.deleted = deleted.map(|flags| BooleanChunked::from_slice("deleted".into(), flags));
    page
}

fn id_value_modified_schema() -> TargetSchema {
    let mut schema = id_value_schema();
    schema.columns.push(TargetColumn { name: "modified".into(), ty: ColumnType::Timestamp, nullable: false });
    schema
}

/// Key `k` and its value `v` in the test's account table, by key.
async fn values_by_key(schema: &TestSchema) -> Vec<String> {
    schema.text_rows(&format!("SELECT id || '=' || v FROM \"{}\".account ORDER BY id", schema.name)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_across_pages_of_a_first_load_resolve_to_the_highest_cursor() {
    let Some(schema) = TestSchema::create("fastdups").await else { return };
    let mut target = connect(&schema.table()).await;
    target.prepare(&merge_plan(id_value_modified_schema(), DeleteMode::Ignore, 1)).await.unwrap();
    // Page 1 goes straight into the table.
    target.stage(page_with_modified(&["a", "b"], &[1, 10], &[10, 5], None)).await.unwrap();
    // Page 2 repeats a (newer) and b (older): the rest of the load is staged and merged by cursor.
    target.stage(page_with_modified(&["a", "b", "c"], &[3, 11, 20], &[15, 4, 1], None)).await.unwrap();
    target.stage(page_with_modified(&["c", "d"], &[21, 30], &[2, 1], None)).await.unwrap();
    let counts = target.commit().await.unwrap();
    assert_eq!((counts.inserted, counts.updated, counts.unchanged, counts.deleted), (4, 0, 0, 0));
    assert_eq!(values_by_key(&schema).await, ["a=3", "b=10", "c=21", "d=30"]);
}

/// deletes = hard on a first load: a deleted record must not appear, and it
/// still removes an older live row of its key; a newer live row beats it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_records_in_a_first_load_beat_only_older_rows() {
    let Some(schema) = TestSchema::create("fastdel").await else { return };
    for (n, deletes) in [DeleteMode::Hard, DeleteMode::Ignore, DeleteMode::Soft].into_iter().enumerate() {
        let table = format!("{}_{n}", schema.table());
        let mut target = connect(&table).await;
        target.prepare(&merge_plan(id_value_modified_schema(), deletes, 1)).await.unwrap();
        target
            .stage(page_with_modified(&["a", "b", "x"], &[1, 2, 3], &[10, 20, 1], Some(&[false, true, true])))
            .await
            .unwrap();
        target.stage(page_with_modified(&["b", "x"], &[4, 5], &[5, 9], Some(&[false, false]))).await.unwrap();
        let counts = target.commit().await.unwrap();
        let rows = schema
            .text_rows(&format!("SELECT id || '=' || v FROM \"{}\".\"account_{n}\" ORDER BY id", schema.name))
            .await;
        if deletes == DeleteMode::Soft {
            let flagged = schema
                .text_rows(&format!("SELECT id FROM \"{}\".\"account_{n}\" WHERE _deleted ORDER BY id", schema.name))
                .await;
            assert_eq!(rows, ["a=1", "b=2", "x=5"]);
            assert_eq!(flagged, ["b"]);
            assert_eq!((counts.inserted, counts.deleted), (2, 1));
        } else {
            assert_eq!(rows, ["a=1", "x=5"], "{deletes:?}");
            assert_eq!((counts.inserted, counts.deleted), (2, 0), "{deletes:?}");
        }
    }
}

/// A first load that fails leaves nothing behind: no rows in an existing
/// empty table, no table at all when the load was to create it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_load_leaves_nothing_behind() {
    let Some(schema) = TestSchema::create("fastfail").await else { return };
    let table_exists = format!(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{}' AND table_name = 'account'",
        schema.name
    );
    // The load was to create the table: aborted after a page, and dropped mid-load.
    for drop_instead in [false, true] {
        let mut target = connect(&schema.table()).await;
        target.prepare(&merge_plan(id_value_modified_schema(), DeleteMode::Ignore, 1)).await.unwrap();
        target.stage(page_with_modified(&["a", "b"], &[1, 2], &[1, 2], None)).await.unwrap();
        // A page the table cannot take fails the load.
        let bad = page(&["c"], &[3], &[3]);
        assert!(target.stage(bad).await.is_err(), "a page without the mapped `modified` column is refused");
        if drop_instead {
            // The session ends: the server rolls the transaction back.
            drop(target);
        } else {
            target.abort().await.unwrap();
        }
        assert_eq!(schema.scalar(&table_exists).await, 0, "no table is left behind");
    }
    // An existing empty table stays empty.
    let mut target = connect(&schema.table()).await;
    target.prepare(&merge_plan(id_value_modified_schema(), DeleteMode::Ignore, 1)).await.unwrap();
    target.commit().await.unwrap();
    assert_eq!(schema.scalar(&table_exists).await, 1);
    let mut target = connect(&schema.table()).await;
    target.prepare(&merge_plan(id_value_modified_schema(), DeleteMode::Ignore, 2)).await.unwrap();
    target.stage(page_with_modified(&["a", "b"], &[1, 2], &[1, 2], None)).await.unwrap();
    target.stage(page_with_modified(&["a"], &[9], &[5], None)).await.unwrap();
    target.abort().await.unwrap();
    assert_eq!(schema.scalar("SELECT count(*) FROM $S.account").await, 0);
}
