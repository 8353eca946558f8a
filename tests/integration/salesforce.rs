//! The Salesforce client against a sandbox that misbehaves on purpose:
//! expired sessions, throttling, 5xx, dropped connections, failed and slow
//! jobs, a spent API budget, and every auth flow. Each run either loads
//! every row exactly once or fails with the documented message, leaving the
//! watermark where it was, within a bounded number of requests.

use std::path::Path;
use std::time::Duration;

use nightjar::config::{Connection, Project, SalesforceConnection};
use nightjar::run::RunReport;
use nightjar::salesforce::{Clients, RetryPolicy, SalesforceClient};
use nightjar::sandbox::{ErrorBody, FaultAction, FaultRule, FaultTarget, LoggedRequest};
use nightjar::state::RunStatus;
use rusqlite::types::Value;

use crate::fixture::{Fixture, fast_retries};

const PAGE: u32 = 1_000;
const ROWS: usize = 2_500;
const PAGES: usize = 3;

fn connection(fx: &Fixture) -> SalesforceConnection {
    match fx.project.connection("org") {
        Some(Connection::Salesforce(conn)) => conn.clone(),
        _ => panic!("the fixture has a Salesforce connection `org`"),
    }
}

/// A fixture whose data has settled (its engine's clients retry fast).
async fn fixture() -> Fixture {
    let fx = Fixture::new(ROWS, PAGE).await;
    fx.advance(60);
    fx
}

/// Rewrites the connection's auth settings and reloads the project.
fn reconfigure(fx: &mut Fixture, auth_lines: &str) {
    let path = fx.dir.path().join("nightjar.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("auth = \"client_credentials\"\n"));
    std::fs::write(&path, text.replace("auth = \"client_credentials\"\n", auth_lines)).unwrap();
    fx.project = Project::load(&path).unwrap_or_else(|e| panic!("reconfigured project: {e}"));
}

fn requests(fx: &Fixture, pred: impl Fn(&LoggedRequest) -> bool) -> Vec<LoggedRequest> {
    fx.sandbox.request_log().into_iter().filter(|r| pred(r)).collect()
}

fn is_token(r: &LoggedRequest) -> bool {
    r.path == "/services/oauth2/token"
}
fn is_create(r: &LoggedRequest) -> bool {
    r.method == "POST" && r.path.ends_with("/jobs/query")
}
fn is_poll(r: &LoggedRequest) -> bool {
    r.method == "GET" && r.path.contains("/jobs/query/") && !r.path.ends_with("/results")
}
fn is_results(r: &LoggedRequest) -> bool {
    r.path.ends_with("/results")
}
fn is_data(r: &LoggedRequest) -> bool {
    r.path.starts_with("/services/data/")
}

/// Ids in the warehouse (empty when the table was never created).
fn warehouse_ids(fx: &Fixture) -> Vec<String> {
    let Ok(conn) = rusqlite::Connection::open(fx.warehouse()) else { return Vec::new() };
    let Ok(mut stmt) = conn.prepare("SELECT id FROM account ORDER BY id") else { return Vec::new() };
    stmt.query_map([], |r| r.get::<_, Value>(0))
        .unwrap()
        .map(|v| match v.unwrap() {
            Value::Text(s) => s,
            other => panic!("id is text, got {other:?}"),
        })
        .collect()
}

/// Every live sandbox record is in the warehouse exactly once.
fn assert_every_row_once(fx: &Fixture) {
    let mut expected: Vec<String> = fx
        .sandbox
        .records("Account")
        .unwrap()
        .into_iter()
        .filter(|r| !r.iter().any(|(k, v)| k == "IsDeleted" && v.as_deref() == Some("true")))
        .map(|r| r[0].1.clone().unwrap())
        .collect();
    expected.sort();
    let ids = warehouse_ids(fx);
    assert_eq!(ids.len(), expected.len(), "row count");
    assert_eq!(ids, expected, "every live record exactly once");
}

fn assert_succeeded(report: &RunReport) {
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
}

/// A failed run: its error contains every fragment, the watermark did not
/// move and nothing reached the warehouse.
async fn assert_failed(fx: &Fixture, report: &RunReport, fragments: &[&str]) -> String {
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error.clone().unwrap_or_default();
    for fragment in fragments {
        assert!(error.contains(fragment), "error lacks `{fragment}`: {error}");
    }
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None, "the watermark stays put");
    assert!(warehouse_ids(fx).is_empty(), "nothing was committed");
    let history = fx.state.run(report.run_id).await.unwrap().unwrap();
    assert_eq!(history.error.as_deref(), Some(error.as_str()), "history says why");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_mid_poll_and_mid_download_renew_once_and_resume() {
    let fx = fixture().await;
    fx.sandbox.inject(FaultRule::new(FaultAction::ExpireSession, FaultTarget::Poll));
    fx.sandbox.inject(FaultRule::new(FaultAction::ExpireSession, FaultTarget::Results).nth(2));
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
    assert!(fx.state.watermark("accounts").await.unwrap().is_some());

    // One login, then one renewal per expiry; nothing started over.
    assert_eq!(requests(&fx, is_token).len(), 3);
    assert_eq!(requests(&fx, is_create).len(), 1);
    let results = requests(&fx, is_results);
    assert_eq!(results.len(), PAGES + 1, "only the refused page is fetched twice");
    assert_eq!(results[1].query, results[2].query, "the retry uses the same locator");
    assert!(results[1].query.as_deref().unwrap_or_default().contains("locator="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_not_valid_for_rest_fails_with_its_remedy_without_looping() {
    let fx = fixture().await;
    fx.sandbox.inject(FaultRule::new(FaultAction::RestApiScope, FaultTarget::Create).times(10));
    let report = fx.run().await;
    assert_failed(
        &fx,
        &report,
        &["HTTP 401", "INVALID_SESSION_ID", "not valid for use with the REST API", "`api` scope"],
    )
    .await;
    assert_eq!(requests(&fx, is_token).len(), 1, "no refresh for this 401");
    assert_eq!(requests(&fx, is_create).len(), 1, "no retry either");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_5xx_and_429_are_retried_and_every_row_arrives_once() {
    let fx = fixture().await;
    fx.sandbox.inject(FaultRule::new(FaultAction::Status { code: 429, body: ErrorBody::Empty }, FaultTarget::Create));
    fx.sandbox.inject(FaultRule::new(FaultAction::Status { code: 502, body: ErrorBody::Json }, FaultTarget::Poll));
    fx.sandbox.inject(
        FaultRule::new(FaultAction::Status { code: 503, body: ErrorBody::Html }, FaultTarget::Results).nth(2).times(2),
    );
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
    assert_eq!(requests(&fx, is_create).len(), 2);
    assert_eq!(requests(&fx, is_results).len(), PAGES + 2);
    assert_eq!(requests(&fx, is_token).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_page_refetches_the_same_locator() {
    let fx = fixture().await;
    fx.sandbox.inject(FaultRule::new(FaultAction::Drop, FaultTarget::Results).nth(2));
    fx.sandbox.inject(FaultRule::new(FaultAction::Drop, FaultTarget::Results).nth(4));
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
    let results = requests(&fx, is_results);
    assert_eq!(results.len(), PAGES + 2);
    assert_eq!(results[1].query, results[2].query, "page 2 again, same locator");
    assert_eq!(results[3].query, results[4].query, "page 3 again, same locator");
    assert_eq!(report.counts.pages, PAGES as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_retry_bound_fails_after_bounded_attempts() {
    let fx = fixture().await;
    fx.sandbox.add_faults("http:code=503,body=empty,on=results,times=1000").unwrap();
    let report = fx.run().await;
    let error = assert_failed(&fx, &report, &["HTTP 503", "gave up after 5 attempts"]).await;
    assert!(error.contains(&report.salesforce_job_ids[0]), "names the Salesforce job: {error}");
    let retries = RetryPolicy::default().per_request as usize;
    assert_eq!(requests(&fx, is_results).len(), 1 + retries, "one request, {retries} retries, no more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_limit_exceeded_fails_at_once_and_says_when_it_comes_back() {
    let fx = fixture().await;
    fx.sandbox.inject(FaultRule::new(FaultAction::LimitExceeded, FaultTarget::Poll).times(10));
    let report = fx.run().await;
    let error = assert_failed(
        &fx,
        &report,
        &[
            "HTTP 403",
            "REQUEST_LIMIT_EXCEEDED",
            "TotalRequests Limit exceeded",
            "daily API request limit is spent",
            "24 hours",
        ],
    )
    .await;
    assert!(error.contains(&report.salesforce_job_ids[0]), "names the Salesforce job: {error}");
    assert_eq!(requests(&fx, is_poll).len(), 1, "no retry of a spent limit");
    assert!(requests(&fx, is_results).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_budget_that_runs_out_mid_run_stops_it_and_limits_agree_with_the_header() {
    let fx = fixture().await;
    // Enough for /limits, create and a few polls/pages, not for the whole run.
    fx.sandbox.add_faults("api-budget:max=100,used=95").unwrap();
    let report = fx.run().await;
    assert_failed(&fx, &report, &["REQUEST_LIMIT_EXCEEDED", "daily API request limit is spent"]).await;
    let (used, max) = fx.sandbox.api_usage();
    assert_eq!((used, max), (100, 100));
    let refused = requests(&fx, is_data).len() as u64 - (used - 95);
    assert_eq!(refused, 1, "the first refused call ends the run");
    let client = fx.engine.clients.get("org", &connection(&fx)).unwrap();
    assert_eq!(client.api_usage(), Some((100, 100)), "Sforce-Limit-Info is tracked");
    let limits = client.for_run().limits().await.unwrap();
    assert_eq!((limits.daily_api_max, limits.daily_api_remaining), (100, 0), "/limits agrees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_guard_keeps_a_run_from_starting() {
    let mut fx = fixture().await;
    reconfigure(&mut fx, "auth = \"client_credentials\"\nmin_api_remaining = 1000\n");
    fx.sandbox.add_faults("api-budget:max=15000,used=14500").unwrap();
    let report = fx.run().await;
    let error = assert_failed(
        &fx,
        &report,
        &["only 499 of 15000 daily API requests remain", "min_api_remaining = 1000", "did not start"],
    )
    .await;
    assert!(!error.is_empty());
    assert_eq!(fx.state.run(report.run_id).await.unwrap().unwrap().error_class.as_deref(), Some("api_limit"));
    assert!(requests(&fx, is_create).is_empty(), "no Bulk job was created");
    assert_eq!(requests(&fx, is_data).len(), 1, "one /limits call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_fails_the_run_with_its_message_and_a_slow_one_just_takes_longer() {
    let fx = fixture().await;
    fx.sandbox.add_faults("fail-job:message=Unexpected exception encountered in query processing").unwrap();
    let report = fx.run().await;
    let error = assert_failed(&fx, &report, &["Unexpected exception encountered in query processing"]).await;
    assert!(error.contains(&report.salesforce_job_ids[0]));
    assert!(requests(&fx, is_results).is_empty());

    fx.sandbox.add_faults("slow-jobs:polls=5").unwrap();
    let before = requests(&fx, is_poll).len();
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
    assert_eq!(requests(&fx, is_poll).len() - before, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_a_connection_share_one_token() {
    let fx = fixture().await;
    assert_succeeded(&fx.run().await);
    fx.sandbox.update_records("Account", 10).unwrap();
    fx.advance(5);
    assert_succeeded(&fx.run().await);
    assert_every_row_once(&fx);
    assert_eq!(requests(&fx, is_token).len(), 1, "the second run reused the first run's token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_max_concurrent_jobs_slots_per_connection() {
    let fx = fixture().await;
    let client = fx.engine.clients.get("org", &connection(&fx)).unwrap();
    let (a, b) = (client.for_run(), client.for_run());
    let first = a.job_slot().await;
    let second = b.job_slot().await;
    // The fixture's connection allows 2 (the default); a third waits.
    let third = tokio::time::timeout(Duration::from_millis(200), a.job_slot()).await;
    assert!(third.is_err(), "a third Bulk job waits for a slot");
    drop(first);
    let third = tokio::time::timeout(Duration::from_secs(5), b.job_slot()).await;
    assert!(third.is_ok(), "a freed slot is taken");
    drop(second);
}

fn key_path(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_gets_a_token_and_a_wrong_user_gets_a_hint() {
    let mut fx = fixture().await;
    fx.sandbox.set_jwt_public_key(&std::fs::read_to_string(key_path("jwt-test-key.pub.pem")).unwrap());
    reconfigure(
        &mut fx,
        &format!(
            "auth = \"jwt_bearer\"\nusername = \"integration@nightjar.sandbox\"\nprivate_key_file = \"{}\"\n",
            key_path("jwt-test-key.pem")
        ),
    );
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
    let tokens = requests(&fx, is_token);
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].body.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"));
    assert!(!tokens[0].body.contains("client_secret"), "no secret travels with a JWT");

    let path = fx.dir.path().join("nightjar.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace("integration@nightjar.sandbox", "someone@else.example");
    std::fs::write(&path, text).unwrap();
    fx.project = Project::load(&path).unwrap();
    let client = SalesforceClient::new("org", &connection(&fx)).unwrap();
    let err = client.for_run().limits().await.unwrap_err().to_string();
    assert!(err.contains("invalid_grant") && err.contains("user hasn't approved this consumer"), "{err}");
    assert!(err.contains("HTTP 400") && err.contains("pre-authorized"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_flow_and_a_revoked_token_says_to_log_in_again() {
    let mut fx = fixture().await;
    let refresh = fx.sandbox.issue_refresh_token();
    fx.state
        .store_refresh_token("org", nightjar::config::Secret::new(refresh.clone()), "x", chrono::Utc::now())
        .await
        .unwrap();
    reconfigure(&mut fx, "auth = \"refresh_token\"\n");
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
    let watermark = fx.state.watermark("accounts").await.unwrap();
    assert!(requests(&fx, is_token)[0].body.contains("grant_type=refresh_token"));

    fx.sandbox.revoke_refresh_tokens();
    fx.sandbox.expire_sessions();
    fx.sandbox.update_records("Account", 5).unwrap();
    fx.advance(5);
    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error.unwrap_or_default();
    for fragment in ["invalid_grant", "expired access/refresh token", "HTTP 400", "run `nightjar auth login org`"] {
        assert!(error.contains(fragment), "error lacks `{fragment}`: {error}");
    }
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), watermark, "the watermark stays put");
    assert!(!error.contains(&refresh), "the refresh token is never quoted");
    // One login, one renewal attempt after the 401, nothing more.
    assert_eq!(requests(&fx, is_token).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkce_login_stores_a_refresh_token_that_runs_use() {
    let mut fx = fixture().await;
    reconfigure(&mut fx, "auth = \"refresh_token\"\n");
    let conn = connection(&fx);
    let outcome = nightjar::salesforce::login_with_browser("org", &conn, 0, |url| {
        // The "browser": follows the authorize page's redirect to the loopback callback.
        let url = url.to_string();
        tokio::spawn(async move {
            let page = reqwest::get(&url).await.expect("authorize answers").text().await.unwrap();
            assert!(page.contains("login received"), "{page}");
        });
    })
    .await
    .unwrap();
    fx.state
        .store_refresh_token("org", outcome.refresh_token.clone(), &outcome.instance_url, chrono::Utc::now())
        .await
        .unwrap();

    let authorize = requests(&fx, |r| r.path == "/services/oauth2/authorize");
    let query = authorize[0].query.clone().unwrap_or_default();
    assert!(query.contains("code_challenge_method=S256") && query.contains("code_challenge="), "{query}");
    let exchange = requests(&fx, is_token);
    assert!(exchange[0].body.contains("grant_type=authorization_code") && exchange[0].body.contains("code_verifier="));

    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
    assert!(requests(&fx, is_token)[1].body.contains("grant_type=refresh_token"));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(fx.state.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the state file holding the refresh token is private");
    }
}

/// The `nightjar` binary, logging at debug level, against a sandbox that
/// expires the session mid-download and then refuses a revoked refresh
/// token: no token, secret or key appears in stdout, stderr, history or
/// the state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_output_history_or_the_state_file() {
    let mut fx = fixture().await;
    fx.sandbox.set_jwt_public_key(&std::fs::read_to_string(key_path("jwt-test-key.pub.pem")).unwrap());
    fx.sandbox.inject(FaultRule::new(FaultAction::ExpireSession, FaultTarget::Results).nth(2));
    let nightjar = |dir: &Path, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nightjar"))
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "nightjar=debug")
            .output()
            .expect("nightjar runs")
    };
    let mut captured = String::new();
    fn capture(into: &mut String, out: std::process::Output) -> bool {
        into.push_str(&String::from_utf8_lossy(&out.stdout));
        into.push_str(&String::from_utf8_lossy(&out.stderr));
        out.status.success()
    }
    // client_credentials, with a session that expires mid-download.
    assert!(capture(&mut captured, nightjar(fx.dir.path(), &["run", "accounts"])), "{captured}");
    // JWT bearer.
    let jwt_lines = format!(
        "auth = \"jwt_bearer\"\nusername = \"integration@nightjar.sandbox\"\nprivate_key_file = \"{}\"\n",
        key_path("jwt-test-key.pem")
    );
    reconfigure(&mut fx, &jwt_lines);
    fx.advance(5);
    assert!(capture(&mut captured, nightjar(fx.dir.path(), &["run", "accounts"])), "{captured}");
    assert!(capture(&mut captured, nightjar(fx.dir.path(), &["check"])), "{captured}");
    // A revoked refresh token.
    let path = fx.dir.path().join("nightjar.toml");
    let refresh = fx.sandbox.issue_refresh_token();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&jwt_lines, &format!("auth = \"refresh_token\"\nrefresh_token = \"{refresh}\"\n"));
    std::fs::write(&path, text).unwrap();
    fx.sandbox.revoke_refresh_tokens();
    fx.advance(5);
    assert!(!capture(&mut captured, nightjar(fx.dir.path(), &["run", "accounts"])), "{captured}");
    assert!(captured.contains("nightjar auth login org"), "{captured}");
    for out in [nightjar(fx.dir.path(), &["history", "--json"]), nightjar(fx.dir.path(), &["show", "3", "--json"])] {
        capture(&mut captured, out);
    }

    let state_file = std::fs::read(fx.state.path()).unwrap();
    let wal = std::fs::read(format!("{}-wal", fx.state.path().display())).unwrap_or_default();
    let state_text = String::from_utf8_lossy(&state_file).into_owned() + &String::from_utf8_lossy(&wal);
    let private_key = std::fs::read_to_string(key_path("jwt-test-key.pem")).unwrap();
    let key_body: String = private_key.lines().nth(1).unwrap().to_string();
    let mut secrets = fx.sandbox.issued_tokens();
    assert!(secrets.len() >= 3, "tokens were issued: {}", secrets.len());
    secrets.push("sandbox-secret".into());
    secrets.push(key_body);
    for secret in &secrets {
        assert!(!captured.contains(secret.as_str()), "a secret leaked into the output");
        assert!(!state_text.contains(secret.as_str()), "a secret leaked into the state file");
    }
    assert!(captured.contains("session expired; renewing it"), "the debug log was captured: {captured}");
}

/// Adds `extra` to the job's fields (mapped as text columns named like the
/// field, lower-cased) and reloads the project.
fn add_fields(fx: &mut Fixture, extra: &[&str]) {
    let job = fx.dir.path().join("jobs/accounts.toml");
    let text = std::fs::read_to_string(&job).unwrap();
    let quoted: Vec<String> = extra.iter().map(|f| format!(", \"{f}\"")).collect();
    let text: Vec<String> = text
        .lines()
        .map(|l| match l.strip_prefix("fields = [").and_then(|l| l.strip_suffix(']')) {
            Some(list) => format!("fields = [{list}{}]", quoted.concat()),
            None => l.to_string(),
        })
        .collect();
    std::fs::write(&job, text.join("\n")).unwrap();
    let mapping = fx.dir.path().join("mappings/accounts.toml");
    let mut text = std::fs::read_to_string(&mapping).unwrap();
    for f in extra {
        text.push_str(&format!(
            "\n[[column]]\nname = \"{}\"\nfrom = \"{f}\"\ntype = \"text\"\n",
            f.to_ascii_lowercase().replace('.', "_")
        ));
    }
    std::fs::write(&mapping, text).unwrap();
    fx.project = Project::load(&fx.dir.path().join("nightjar.toml")).unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relationship_fields_load_the_parents_value_and_check_verifies_them() {
    let mut fx = fixture().await;
    add_fields(&mut fx, &["Owner.Email"]);
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);

    let emails: std::collections::HashMap<String, String> = fx
        .sandbox
        .records("User")
        .unwrap()
        .into_iter()
        .map(|u| {
            let get = |name: &str| u.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.clone()).unwrap();
            (get("Id"), get("Email"))
        })
        .collect();
    let conn = rusqlite::Connection::open(fx.warehouse()).unwrap();
    let mut stmt = conn.prepare("SELECT ownerid, owner_email FROM account").unwrap();
    let pairs: Vec<(String, String)> =
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
    assert_eq!(pairs.len(), ROWS);
    for (owner, email) in &pairs {
        assert_eq!(Some(email), emails.get(owner), "Owner.Email of owner {owner}");
    }

    let report = nightjar::salesforce::check(&fx.project, Some("org"), Some(&fx.state)).await;
    assert!(report.ok, "{:?}", report.lines);
    assert!(report.lines.iter().any(|l| l.contains("23 field(s) exist")), "{:?}", report.lines);

    add_fields(&mut fx, &["Owner.Nope", "Colour__c"]);
    let report = nightjar::salesforce::check(&fx.project, Some("org"), Some(&fx.state)).await;
    assert!(!report.ok);
    let text = report.lines.join("\n");
    assert!(text.contains("field `Nope` does not exist on User"), "{text}");
    assert!(text.contains("field `Colour__c` does not exist on Account"), "{text}");
    assert!(text.contains("jobs/accounts.toml:"), "points into the job file: {text}");
    let diags = nightjar::salesforce::validate_online(&fx.project, Some(&fx.state)).await.unwrap();
    assert_eq!(diags.len(), 2, "{diags:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_aborts_its_bulk_job_and_history_names_it() {
    let fx = fixture().await;
    fx.sandbox.add_faults("slow-jobs:polls=100000").unwrap();
    // Dropping the run's future is what a timeout or a cancel does.
    let cancelled = tokio::time::timeout(Duration::from_millis(1500), fx.run()).await;
    assert!(cancelled.is_err(), "the job never completes, so the run is still polling");
    let job_id = {
        let created = requests(&fx, is_create);
        assert_eq!(created.len(), 1);
        let history = fx.state.history(Default::default()).await.unwrap();
        assert_eq!(history[0].status, RunStatus::Running);
        assert_eq!(history[0].salesforce_job_ids.len(), 1, "history names the Salesforce job");
        history[0].salesforce_job_ids[0].clone()
    };
    let mut aborted = Vec::new();
    for _ in 0..50 {
        aborted = requests(&fx, |r| r.method == "PATCH" && r.path.ends_with(&job_id));
        if !aborted.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(aborted.len(), 1, "the Bulk job was aborted");
    assert!(aborted[0].body.contains("Aborted"));
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None);
    assert!(warehouse_ids(&fx).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_retry_budget_bounds_retries_across_requests() {
    let mut fx = fixture().await;
    fx.engine =
        nightjar::run::Engine::new().with_clients(Clients::with_policy(RetryPolicy { per_run: 3, ..fast_retries() }));
    // Each request fails within its own bound, but together they need more
    // retries than the run may spend.
    fx.sandbox.add_faults("http:code=503,on=create,times=2;http:code=500,on=poll,times=2").unwrap();
    let report = fx.run().await;
    assert_failed(&fx, &report, &["HTTP 500", "the run's retry budget is spent"]).await;
    assert_eq!(requests(&fx, is_create).len(), 3, "create: two retries");
    assert_eq!(requests(&fx, is_poll).len(), 2, "poll: the third retry of the run is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_is_briefly_down_is_retried() {
    let fx = fixture().await;
    fx.sandbox.add_faults("http:code=503,body=html,on=token,times=2").unwrap();
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
    assert_eq!(requests(&fx, is_token).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_an_api_version_the_org_does_not_offer() {
    let mut fx = fixture().await;
    let report = nightjar::salesforce::check(&fx.project, None, Some(&fx.state)).await;
    assert!(report.ok, "{:?}", report.lines);
    assert!(report.lines[0].contains("API v62.0 (the org offers up to v66.0)"), "{:?}", report.lines);
    reconfigure(&mut fx, "auth = \"client_credentials\"\napi_version = \"99.0\"\n");
    let report = nightjar::salesforce::check(&fx.project, Some("org"), Some(&fx.state)).await;
    assert!(!report.ok);
    assert!(
        report.lines.iter().any(|l| l.contains("api_version 99.0 is not offered by the org")),
        "{:?}",
        report.lines
    );
    let report = nightjar::salesforce::check(&fx.project, Some("nope"), Some(&fx.state)).await;
    assert!(!report.ok && report.lines[0].contains("no Salesforce connection named `nope`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_meets_a_down_token_endpoint_is_retried() {
    let fx = fixture().await;
    fx.sandbox.add_faults("expire-session:on=results,nth=2;http:code=503,on=token,nth=2").unwrap();
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
    assert_eq!(requests(&fx, is_token).len(), 3, "login, refused renewal, renewal");
    assert_eq!(requests(&fx, is_results).len(), PAGES + 1);
}

/// `nightjar sandbox --faults` as a user starts it: the spec is parsed and
/// the faults hit the requests they name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_command_injects_faults_from_its_spec() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["sandbox", "--listen", "127.0.0.1:0", "--faults", "http:code=503,body=html,on=token;api-budget:max=50"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("nightjar sandbox starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut base = None;
    for _ in 0..5 {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("sandbox: listening on ") {
            base = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    let base = base.expect("the sandbox prints its address");
    let http = reqwest::Client::new();
    let token = |http: &reqwest::Client| {
        http.post(format!("{base}/services/oauth2/token")).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "nightjar-sandbox"),
            ("client_secret", "sandbox-secret"),
        ])
    };
    let first = token(&http).send().await.unwrap();
    assert_eq!(first.status(), 503);
    assert!(first.text().await.unwrap().contains("<html>"));
    let second: serde_json::Value = token(&http).send().await.unwrap().json().await.unwrap();
    let access = second["access_token"].as_str().unwrap().to_string();
    let limits: serde_json::Value = http
        .get(format!("{base}/services/data/v62.0/limits"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(limits["DailyApiRequests"]["Max"], 50);
    assert_eq!(limits["DailyApiRequests"]["Remaining"], 49);
    child.kill().unwrap();
    child.wait().unwrap();

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["sandbox", "--listen", "127.0.0.1:0", "--faults", "http:code=200"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("invalid fault spec 'http:code=200'") && stderr.contains("400-599"), "{stderr}");
}

/// `nightjar auth login` as a user runs it: it prints the authorize URL,
/// the "browser" approves, and the refresh token lands in the state DB
/// (mode 0600) without ever being printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_login_command_stores_the_refresh_token_without_printing_it() {
    use std::io::{BufRead, BufReader, Read};
    let mut fx = fixture().await;
    reconfigure(&mut fx, "auth = \"refresh_token\"\n");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["auth", "login", "org", "--port", "0"])
        .current_dir(fx.dir.path())
        .env("RUST_LOG", "nightjar=debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nightjar auth login starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut printed = String::new();
    let url = loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "no URL printed: {printed}");
        printed.push_str(&line);
        if let Some(url) = line.trim().strip_prefix("http") {
            break format!("http{url}");
        }
    };
    let page = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(page.contains("login received"));
    let status = child.wait().unwrap();
    stderr.read_to_string(&mut printed).unwrap();
    child.stdout.take().unwrap().read_to_string(&mut printed).unwrap();
    assert!(status.success(), "{printed}");
    assert!(printed.contains("the refresh token is stored in"), "{printed}");

    let stored = fx.state.refresh_token("org").await.unwrap().expect("a refresh token is stored");
    for token in fx.sandbox.issued_tokens() {
        assert!(!printed.contains(&token), "a token was printed");
    }
    assert!(fx.sandbox.issued_tokens().contains(&stored.expose().to_string()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(fx.state.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let report = fx.run().await;
    assert_succeeded(&report);
    assert_every_row_once(&fx);
}

/// Result pages come gzip-compressed exactly when the client asks (as
/// Salesforce does), and nightjar asks: a run decompresses every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_pages_are_gzipped_when_asked_and_nightjar_asks() {
    use std::io::Read;

    let fx = Fixture::new(300, 1_000).await;
    let http = reqwest::Client::new();
    let (access, api) = fx.api_session().await;
    let access = access.as_str();
    let base = format!("{api}/jobs/query");
    let job: serde_json::Value = http
        .post(&base)
        .bearer_auth(access)
        .json(&serde_json::json!({"operation": "query", "query": "SELECT Id, Name, Description FROM Account"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    for _ in 0..50 {
        let info: serde_json::Value =
            http.get(format!("{base}/{id}")).bearer_auth(access).send().await.unwrap().json().await.unwrap();
        if info["state"] == "JobComplete" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let results = format!("{base}/{id}/results");
    let plain = http.get(&results).bearer_auth(access).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get("content-encoding").is_none(), "not asked, not compressed");
    let plain = plain.bytes().await.unwrap();
    let zipped = http.get(&results).bearer_auth(access).header("Accept-Encoding", "gzip").send().await.unwrap();
    assert_eq!(zipped.headers().get("content-encoding").map(|v| v.to_str().unwrap()), Some("gzip"));
    let zipped = zipped.bytes().await.unwrap();
    assert!(zipped.len() * 2 < plain.len(), "{} compressed vs {} plain bytes", zipped.len(), plain.len());
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&zipped[..]).read_to_end(&mut unzipped).unwrap();
    assert_eq!(unzipped, plain.to_vec());

    // nightjar asks for every page compressed, and loads every row.
    fx.advance(3);
    let report = fx.run().await;
    assert_eq!(report.counts.inserted, 300, "{:?}", report.error);
    let pages: Vec<LoggedRequest> = fx.sandbox.request_log().into_iter().filter(is_results).collect();
    assert!(pages.len() > 2, "the test fetched 2 pages, the run at least one more");
    for page in &pages[2..] {
        assert_eq!(page.accept_encoding.as_deref(), Some("gzip"), "{}", page.path);
    }
}
