//! Nothing partial is committed (invariant 11): a result stream that ends
//! early, a page that does not decode, a page cut at any byte, a locator
//! that loops, an absurd server clock, and a pipeline stage that panics all
//! fail the run (or are fetched again) with the target and the watermark as
//! they were; the next run without the fault loads everything exactly once.

use std::sync::Arc;

use nightjar::hooks::{HookPoint, Hooks};
use nightjar::outcome::ErrorClass;
use nightjar::run::{Engine, RunReport};
use nightjar::salesforce::Clients;
use nightjar::state::RunStatus;
use rusqlite::types::Value;

use crate::fixture::{Fixture, FixtureOptions, fast_retries};

const ROWS: usize = 2_500;
const PAGE: u32 = 1_000;

async fn settled(options: FixtureOptions) -> Fixture {
    let fx = Fixture::build(options).await;
    fx.advance(60);
    fx
}

/// The warehouse table, or nothing when no run ever created it.
fn table_or_empty(fx: &Fixture) -> Vec<Vec<Value>> {
    let conn = rusqlite::Connection::open(fx.warehouse()).expect("the warehouse opens");
    let exists: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'account'", [], |r| r.get(0))
        .expect("sqlite_schema reads");
    if exists == 0 { Vec::new() } else { fx.table() }
}

/// The run failed with `class`, its message holds `fragments`, and history
/// recorded it so.
async fn assert_failed_with(fx: &Fixture, report: &RunReport, class: ErrorClass, fragments: &[&str]) {
    assert_eq!(report.status, RunStatus::Failed, "{:?}", report.error);
    assert_eq!(report.error_class, Some(class), "{:?}", report.error);
    let error = report.error.clone().unwrap_or_default();
    for fragment in fragments {
        assert!(error.contains(fragment), "the error lacks `{fragment}`: {error}");
    }
    let record = fx.state.run(report.run_id).await.unwrap().expect("the run is recorded");
    assert_eq!(record.error_class.as_deref(), Some(class.as_str()));
}

/// A first load, then changes; returns the fixture with the changes
/// waiting in the sandbox and what the target held before.
async fn loaded_then_changed() -> (Fixture, Vec<Vec<Value>>) {
    let fx = settled(FixtureOptions { accounts: ROWS, page_size: PAGE, ..Default::default() }).await;
    let first = fx.run().await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    fx.advance(1);
    fx.sandbox.update_records("Account", 1_500).unwrap();
    fx.sandbox.insert_records("Account", 700).unwrap();
    fx.advance(5);
    let before = fx.table();
    (fx, before)
}

/// After a failed incremental run: the target is as before, row for row,
/// and the watermark did not move; then a clean run brings the changes.
async fn assert_untouched_then_recovered(
    fx: &Fixture,
    before: &[Vec<Value>],
    watermark: Option<chrono::DateTime<chrono::Utc>>,
) {
    assert_eq!(fx.table(), before, "the target is byte for byte as before");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), watermark, "the watermark did not move");
    fx.sandbox.clear_faults();
    let next = fx.run().await;
    assert_eq!(next.status, RunStatus::Succeeded, "{:?}", next.error);
    assert_eq!((next.counts.inserted, next.counts.updated), (700, 1_500), "the changes, exactly once");
    assert_eq!(next.counts.reported, Some(next.counts.extracted), "rows received = rows reported");
    assert_eq!(fx.table().len(), ROWS + 700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_end_early_fail_the_run_as_extract_incomplete() {
    // A first load: nothing may appear.
    let fx = settled(FixtureOptions { accounts: ROWS, page_size: PAGE, ..Default::default() }).await;
    fx.sandbox.add_faults("end-early:nth=1").unwrap();
    let report = fx.run().await;
    let sf_job = report.salesforce_job_ids[0].clone();
    assert_failed_with(
        &fx,
        &report,
        ErrorClass::ExtractIncomplete,
        &[&sf_job, &format!("reported {ROWS} rows"), "ended after 1000 rows in 1 page(s)"],
    )
    .await;
    assert_eq!(report.counts.reported, Some(ROWS as u64), "history keeps what Salesforce reported");
    assert!(table_or_empty(&fx).is_empty(), "a failed first load leaves nothing");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None);
    let next = fx.run().await;
    assert_eq!(next.status, RunStatus::Succeeded, "{:?}", next.error);
    assert_eq!(next.counts.inserted, ROWS as u64);

    // An incremental run: the target stays exactly as it was.
    let (fx, before) = loaded_then_changed().await;
    let watermark = fx.state.watermark("accounts").await.unwrap();
    fx.sandbox.add_faults("end-early:nth=2").unwrap();
    let report = fx.run().await;
    assert_failed_with(&fx, &report, ErrorClass::ExtractIncomplete, &["ended after 2000 rows in 2 page(s)"]).await;
    assert_untouched_then_recovered(&fx, &before, watermark).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_never_decodes_fails_the_run_naming_the_page_and_job() {
    let (fx, before) = loaded_then_changed().await;
    let watermark = fx.state.watermark("accounts").await.unwrap();
    // Page 2 of 3 is ragged every time it is fetched.
    fx.sandbox.add_faults("bad-page:nth=2,times=1000").unwrap();
    let report = fx.run().await;
    let sf_job = report.salesforce_job_ids[0].clone();
    assert_failed_with(&fx, &report, ErrorClass::Protocol, &["page 2", &sf_job, "bad CSV", "gave up after 5 attempts"])
        .await;
    assert_untouched_then_recovered(&fx, &before, watermark).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_cut_once_is_fetched_again_and_a_page_always_cut_fails() {
    let (fx, before) = loaded_then_changed().await;
    let watermark = fx.state.watermark("accounts").await.unwrap();
    // Cut inside a record, then whole on the second try: the run succeeds.
    fx.sandbox.add_faults("truncate:at=5000,nth=2").unwrap();
    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    assert_eq!((report.counts.inserted, report.counts.updated), (700, 1_500));
    let refetched = fx.sandbox.request_log().iter().filter(|r| r.path.ends_with("/results")).count();
    assert_eq!(refetched, 3 + 3 + 1, "three pages each run, one of them twice");

    // Always cut: the run fails and commits nothing.
    let (fx, before2) = loaded_then_changed().await;
    let watermark2 = fx.state.watermark("accounts").await.unwrap();
    fx.sandbox.add_faults("truncate-wire:at=3000,nth=1,times=1000").unwrap();
    let report = fx.run().await;
    assert_failed_with(&fx, &report, ErrorClass::Protocol, &["page 1", "gave up"]).await;
    assert_untouched_then_recovered(&fx, &before2, watermark2).await;
    drop((before, watermark));
}

/// Every byte offset of a 3-row page, plain (the CSV cut) and gzipped (the
/// compressed stream cut): each cut page is fetched again, and the run ends
/// with exactly the source's rows; no cut ever commits different data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_cut_at_any_byte_never_commits_different_data() {
    const FIELDS: &[&str] = &["Id", "Name", "Description", "SystemModstamp"];
    let fx = settled(FixtureOptions { accounts: 3, page_size: 10, fields: FIELDS, ..Default::default() }).await;
    let reference = {
        let report = fx.run().await;
        assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
        fx.table()
    };
    // How long the page is: the sandbox's own bytes, as nightjar received them.
    let page_len = {
        let (token, base) = fx.api_session().await;
        let client = reqwest::Client::builder().no_gzip().build().unwrap();
        let job: serde_json::Value = client
            .post(format!("{base}/jobs/query"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"operation": "query", "query": format!("SELECT {} FROM Account", FIELDS.join(", "))}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = job["id"].as_str().unwrap();
        // The sandbox completes jobs after a poll or two.
        for _ in 0..5 {
            client.get(format!("{base}/jobs/query/{id}")).bearer_auth(&token).send().await.unwrap();
        }
        let body = client.get(format!("{base}/jobs/query/{id}/results")).bearer_auth(&token).send().await.unwrap();
        body.bytes().await.unwrap().len()
    };
    assert!(page_len > 100, "a page of three rows and four fields: {page_len} bytes");
    for kind in ["truncate", "truncate-wire"] {
        for at in 0..page_len {
            fx.state.clear_watermark("accounts").await.unwrap();
            fx.sandbox.add_faults(&format!("{kind}:at={at},nth=1")).unwrap();
            let report = fx.run().await;
            assert_eq!(report.status, RunStatus::Succeeded, "{kind} at byte {at}: {:?}", report.error);
            assert_eq!(report.counts.extracted, 3, "{kind} at byte {at}");
            assert_eq!(fx.table(), reference, "{kind} at byte {at}: the data is the source's");
            fx.sandbox.clear_faults();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locator_that_loops_fails_at_once_instead_of_running_forever() {
    let (fx, before) = loaded_then_changed().await;
    let watermark = fx.state.watermark("accounts").await.unwrap();
    fx.sandbox.add_faults("repeat-locator:nth=1,times=1000").unwrap();
    let report = tokio::time::timeout(std::time::Duration::from_secs(60), fx.run()).await.expect("the run ends");
    assert_failed_with(&fx, &report, ErrorClass::Protocol, &["already read", "loop"]).await;
    let results = fx.sandbox.request_log().iter().filter(|r| r.path.ends_with("/results")).count();
    assert!(results <= 3 + 2, "stopped at the first repeat, after {results} result requests");
    assert_untouched_then_recovered(&fx, &before, watermark).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_clock_far_from_ours_is_refused_not_a_watermark() {
    for skew in ["+3650d", "-3650d", "+2d"] {
        let fx = settled(FixtureOptions { accounts: 10, ..Default::default() }).await;
        fx.sandbox.add_faults(&format!("clock-skew:by={skew}")).unwrap();
        let report = fx.run().await;
        assert_failed_with(&fx, &report, ErrorClass::Clock, &["Date header", "max_clock_skew"]).await;
        assert!(report.salesforce_job_ids.is_empty(), "{skew}: no query job was created");
        assert_eq!(fx.state.watermark("accounts").await.unwrap(), None, "{skew}");
        assert!(table_or_empty(&fx).is_empty(), "{skew}");
    }
}

/// A test hook that panics when the pipeline reaches `at`.
struct PanicAt(HookPoint);

impl Hooks for PanicAt {
    fn reached(&self, point: HookPoint) {
        if point == self.0 {
            panic!("injected test panic at {point:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_stage_that_panics_fails_the_run_and_commits_nothing() {
    for (point, stage) in [
        (HookPoint::PageDownloaded(2), "download"),
        (HookPoint::PageMapped(2), "map"),
        (HookPoint::PageStaged(2), "stage"),
    ] {
        let (mut fx, before) = loaded_then_changed().await;
        let watermark = fx.state.watermark("accounts").await.unwrap();
        fx.engine =
            Engine::new().with_clients(Clients::with_policy(fast_retries())).with_hooks(Arc::new(PanicAt(point)));
        let report = fx.run().await;
        let sf_job = report.salesforce_job_ids[0].clone();
        // The SQLite target stages on the blocking pool, so a panic there
        // surfaces as the target's own failure, still naming page and job.
        let names_stage = if stage == "stage" {
            "staging of page 2 of Salesforce query job".to_string()
        } else {
            format!("the {stage} stage stopped unexpectedly at page 2")
        };
        assert_failed_with(&fx, &report, ErrorClass::Internal, &[&names_stage, &sf_job, "injected test panic"]).await;
        fx.engine = Engine::new().with_clients(Clients::with_policy(fast_retries()));
        assert_untouched_then_recovered(&fx, &before, watermark).await;
    }
}
