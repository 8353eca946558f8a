//! One job end to end: sandbox -> Bulk API 2.0 -> Polars -> mapping -> SQLite,
//! with windows, watermarks and history.

use nightjar::state::{HistoryFilter, RunStatus};
use rusqlite::types::Value;

use crate::fixture::{FIELDS, Fixture, FixtureOptions, column_for};

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Text(s) => Some(s.clone()),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Every live sandbox record equals its warehouse row, field by field.
fn assert_round_trip(fx: &Fixture) {
    let names = fx.column_names();
    let table = fx.table();
    let mut records = fx.sandbox.records("Account").expect("Account exists");
    records.retain(|r| !r.iter().any(|(k, v)| k == "IsDeleted" && v.as_deref() == Some("true")));
    records.sort_by(|a, b| a[0].1.cmp(&b[0].1));
    assert_eq!(table.len(), records.len(), "every live record is loaded once");
    let mut awkward = 0;
    for (row, record) in table.iter().zip(&records) {
        for (field, value) in record {
            if !FIELDS.contains(&field.as_str()) {
                continue;
            }
            let idx = names.iter().position(|n| *n == column_for(field)).expect("column exists");
            let stored = text(&row[idx]);
            assert_eq!(stored, *value, "record {:?} field {field}", record[0].1);
            if value.as_deref().is_some_and(|v| v.contains(['\n', ',', '"']) || !v.is_ascii()) {
                awkward += 1;
            }
        }
    }
    assert!(awkward > 100, "the data exercises commas, quotes, newlines and non-ASCII ({awkward} values)");
}

fn created_queries(fx: &Fixture) -> Vec<String> {
    fx.sandbox
        .request_log()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs/query"))
        .map(|r| {
            let body: serde_json::Value = serde_json::from_str(&r.body).expect("create body is JSON");
            body["query"].as_str().expect("query is a string").to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_everything_then_only_changes_then_nothing() {
    let fx = Fixture::new(2_500, 1_000).await;
    fx.advance(60);

    // First run: a full extract over several result pages.
    let first = fx.run().await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    assert!(first.counts.pages >= 3, "pages: {}", first.counts.pages);
    assert_eq!(first.counts.extracted, 2_500);
    assert_eq!(first.counts.inserted, 2_500);
    assert_eq!(first.counts.rejected, 0);
    assert_round_trip(&fx);
    let watermark1 = fx.state.watermark("accounts").await.unwrap().expect("watermark set after commit");
    assert_eq!(Some(watermark1), first.window.map(|w| w.end));
    assert_eq!(watermark1, fx.sandbox.now() - chrono::Duration::minutes(2), "upper bound = Salesforce now - settle");

    // Second run: only the 10 changed records move.
    fx.advance(1);
    let changed = fx.sandbox.update_records("Account", 10).unwrap();
    assert_eq!(changed.len(), 10);
    fx.advance(3);
    let second = fx.run().await;
    assert_eq!(second.status, RunStatus::Succeeded, "{:?}", second.error);
    assert_eq!(second.counts.extracted, 10);
    assert_eq!(second.counts.updated, 10);
    assert_eq!(second.counts.inserted, 0);
    assert_round_trip(&fx);
    let queries = created_queries(&fx);
    assert_eq!(queries.len(), 2);
    assert!(!queries[0].contains(">="), "the first window has no lower bound: {}", queries[0]);
    let end2 = second.window.unwrap().end;
    let expected = format!(
        "SystemModstamp >= {} AND SystemModstamp < {}",
        nightjar::window::soql_datetime(watermark1),
        nightjar::window::soql_datetime(end2)
    );
    assert!(queries[1].contains(&expected), "SOQL {} lacks window {expected}", queries[1]);
    assert!(!queries[1].to_ascii_uppercase().contains("ORDER BY"));

    // Third run, nothing changed: the target is untouched, row for row.
    let before = fx.table();
    fx.advance(3);
    let third = fx.run().await;
    assert_eq!(third.status, RunStatus::Succeeded, "{:?}", third.error);
    assert_eq!((third.counts.extracted, third.counts.inserted, third.counts.updated), (0, 0, 0));
    assert_eq!(fx.table(), before, "a run with no changes rewrites nothing");

    // Re-running an already loaded window (watermark moved back) is idempotent.
    fx.state.clear_watermark("accounts").await.unwrap();
    let again = fx.run().await;
    assert_eq!(again.status, RunStatus::Succeeded, "{:?}", again.error);
    assert_eq!(again.counts.extracted, 2_500);
    assert_eq!(again.counts.unchanged, 2_500);
    assert_eq!(fx.table(), before, "loading the same window twice changes nothing");

    let history = fx.state.history(HistoryFilter::default()).await.unwrap();
    assert_eq!(history.len(), 4);
    assert!(history.iter().all(|r| r.status == RunStatus::Succeeded));
    assert!(history.iter().all(|r| r.salesforce_job_ids.len() == 1 && r.salesforce_job_ids[0].starts_with("750")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_query_job_keeps_the_watermark_and_says_why() {
    let fx = Fixture::new(300, 100).await;
    fx.advance(60);
    let first = fx.run().await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    let watermark = fx.state.watermark("accounts").await.unwrap();
    let table = fx.table();

    fx.sandbox.update_records("Account", 5).unwrap();
    fx.advance(5);
    fx.sandbox.fail_next_query_jobs(1, "Unexpected exception encountered in query processing (test)");
    let failed = fx.run().await;
    assert_eq!(failed.status, RunStatus::Failed);
    let error = failed.error.clone().unwrap();
    assert!(error.contains("Unexpected exception encountered in query processing (test)"), "{error}");
    assert!(error.contains(&failed.salesforce_job_ids[0]), "the error names the Salesforce job: {error}");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), watermark, "a failed run leaves the watermark");
    assert_eq!(fx.table(), table, "a failed run leaves the target");

    let history =
        fx.state.history(HistoryFilter { status: Some(RunStatus::Failed), ..Default::default() }).await.unwrap();
    assert_eq!(history.len(), 1);
    assert!(history[0].error.as_deref().unwrap().contains("query processing"));
    assert!(history[0].watermark_after.is_none());

    // The next run picks the changes up: nothing was lost.
    let retry = fx.run().await;
    assert_eq!(retry.status, RunStatus::Succeeded, "{:?}", retry.error);
    assert_eq!(retry.counts.updated, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_fail_the_run_with_a_remedy() {
    let mut fx = Fixture::new(10, 100).await;
    if let Some(nightjar::config::Connection::Salesforce(sf)) = fx.project.connections.get_mut("org") {
        sf.client_secret = Some(nightjar::config::Secret::new("not-the-secret"));
    }
    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error.unwrap();
    assert!(error.contains("login refused") && error.contains("client_secret"), "{error}");
    assert!(!error.contains("not-the-secret"), "secrets never appear in errors");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_soft_and_hard_deletes() {
    for mode in ["soft", "hard"] {
        let fx = Fixture::build(FixtureOptions { accounts: 40, deletes: mode, ..Default::default() }).await;
        fx.advance(60);
        assert_eq!(fx.run().await.status, RunStatus::Succeeded);
        let ids: Vec<String> =
            fx.sandbox.records("Account").unwrap().iter().take(3).map(|r| r[0].1.clone().unwrap()).collect();
        fx.sandbox.delete_records("Account", &ids).unwrap();
        fx.advance(5);
        let report = fx.run().await;
        assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
        assert_eq!((report.counts.deleted, report.counts.updated, report.counts.inserted), (3, 0, 0), "{mode}");
        let conn = rusqlite::Connection::open(fx.warehouse()).unwrap();
        let rows: i64 = conn.query_row("SELECT count(*) FROM account", [], |r| r.get(0)).unwrap();
        if mode == "soft" {
            assert_eq!(rows, 40);
            let flagged: Vec<String> = conn
                .prepare("SELECT id FROM account WHERE _deleted = 1 ORDER BY id")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let mut expected = ids.clone();
            expected.sort();
            assert_eq!(flagged, expected);
        } else {
            assert_eq!(rows, 37);
            let left: i64 = conn
                .query_row("SELECT count(*) FROM account WHERE id IN (?1, ?2, ?3)", [&ids[0], &ids[1], &ids[2]], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(left, 0);
        }
        let before = fx.table();
        fx.state.clear_watermark("accounts").await.unwrap();
        let again = fx.run().await;
        assert_eq!(again.status, RunStatus::Succeeded, "{:?}", again.error);
        assert_eq!((again.counts.inserted, again.counts.updated, again.counts.deleted), (0, 0, 0), "{mode}");
        assert_eq!(fx.table(), before, "re-running the window with deletes changes nothing ({mode})");
    }
}
