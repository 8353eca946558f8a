//! The Postgres target against the server on this machine
//! (`NIGHTJAR_TEST_POSTGRES_URL`, default postgresql://postgres@127.0.0.1:5432/test).
//! Each test works in a schema of its own, dropped afterwards. Under CI
//! (`CI` set) an unreachable server fails the tests; elsewhere they skip loudly.

use std::sync::atomic::{AtomicU32, Ordering};

use nightjar::config::{DeleteMode, SchemaEvolution};
use nightjar::load::{PostgresTarget, Target, TargetOptions};
use nightjar::state::RunStatus;
use nightjar::transform::{CURSOR_COLUMN, ColumnType, TargetColumn, TargetSchema};
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
    fx.state.clear_watermark("accounts").unwrap();
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

/// A mapped page `(id, v, cursor)`, as the transform stage hands it to a target.
pub fn page(ids: &[&str], values: &[i64], cursors: &[i64]) -> DataFrame {
    let id = Series::new("id".into(), ids.to_vec()).into_column();
    let v = Series::new("v".into(), values.to_vec()).into_column();
    let c =
        Series::new(CURSOR_COLUMN.into(), cursors.to_vec()).into_datetime(TimeUnit::Milliseconds, None).into_column();
    DataFrame::new(ids.len(), vec![id, v, c]).unwrap()
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
    let options = TargetOptions {
        table: schema.table(),
        create: true,
        deletes: DeleteMode::Ignore,
        schema_evolution: SchemaEvolution::Fail,
    };
    let target_schema = id_value_schema();
    let mut target = PostgresTarget::connect("test", &pg_url(), options).await.unwrap();
    target.prepare(&target_schema, 1).await.unwrap();
    target.stage(&page(&["a", "a", "b"], &[1, 2, 10], &[10, 20, 5])).await.unwrap();
    target.stage(&page(&["a", "b", "b"], &[3, 11, 12], &[15, 5, 4])).await.unwrap();
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
        fx.state.clear_watermark("accounts").unwrap();
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
        fx.state.clear_watermark("accounts").unwrap();
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
