//! Failure and recovery emails end to end: runs against the sandbox queue
//! alerts in the state DB, and nightjar's sender delivers them over SMTP to a
//! real server on loopback (`smtp.rs`), where the tests read them back.

mod smtp;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nightjar::alert::{RetryPolicy, deliver_once, mailer, remedy_for, run_sender};
use nightjar::config::Project;
use nightjar::run::RunReport;
use nightjar::state::{OutboxFilter, OutboxStatus, RunStatus};

use crate::fixture::Fixture;
use smtp::{Received, SmtpServer, closed_port};

const FROM: &str = "etl@example.com";
const ONCALL: &str = "oncall@example.com";
const JOB_OWNER: &str = "sales-ops@example.com";
const PUBLIC_URL: &str = "https://etl.example.com";

fn append(path: &Path, text: &str) {
    let mut current = std::fs::read_to_string(path).expect("file reads");
    current.push_str(text);
    std::fs::write(path, current).expect("file writes");
}

fn replace_in(path: &Path, from: &str, to: &str) {
    let current = std::fs::read_to_string(path).expect("file reads");
    assert!(current.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, current.replace(from, to)).expect("file writes");
}

fn reload(fx: &mut Fixture) {
    fx.project = Project::load(&fx.dir.path().join("nightjar.toml")).unwrap_or_else(|e| panic!("config: {e}"));
}

/// Points the fixture at the SMTP server on `port`, mails `ONCALL` for every
/// job and `JOB_OWNER` for `accounts`. `alerts_extra` goes into `[alerts]`.
fn configure(fx: &mut Fixture, port: u16, smtp_extra: &str, alerts_extra: &str) {
    append(
        &fx.dir.path().join("nightjar.toml"),
        &format!(
            r#"
[server]
public_url = "{PUBLIC_URL}"

[smtp]
host = "127.0.0.1"
port = {port}
security = "none"
from = "nightjar <{FROM}>"
{smtp_extra}

[alerts]
email = ["{ONCALL}"]
{alerts_extra}
"#
        ),
    );
    append(&fx.dir.path().join("jobs/accounts.toml"), &format!("\n[alerts]\nemail = [\"{JOB_OWNER}\"]\n"));
    reload(fx);
}

/// What `nightjar run` does: the run, then one delivery try.
async fn run_and_deliver(fx: &Fixture) -> RunReport {
    let report = fx.run().await;
    deliver_once(&fx.project, &fx.state).await.expect("the outbox is readable");
    report
}

async fn setup(accounts: usize) -> (Fixture, SmtpServer) {
    let mut fx = Fixture::new(accounts, 1_000).await;
    let smtp = SmtpServer::start();
    configure(&mut fx, smtp.port(), "", "");
    fx.advance(60);
    (fx, smtp)
}

/// Runs the job (set up by the caller to fail) and checks that its mail names
/// `class` and that class's remedy, in both parts.
async fn expect_class_mail(fx: &Fixture, smtp: &SmtpServer, class: &str) -> Received {
    let before = smtp.messages().len();
    let report = run_and_deliver(fx).await;
    assert_eq!(report.status, RunStatus::Failed, "the run must fail");
    let record = fx.state.run(report.run_id).await.unwrap().expect("run recorded");
    assert_eq!(record.error_class.as_deref(), Some(class), "{:?}", record.error);
    let mails = smtp.wait_for(before + 1, Duration::from_secs(10));
    assert_eq!(mails.len(), before + 1, "one mail for the failure; outbox: {:?}", outbox_summary(fx).await);
    let mail = mails.last().expect("a mail").clone();
    assert_eq!(mail.subject(), format!("[nightjar] FAILED accounts — {class}"));
    assert_eq!(mail.field("Error class").as_deref(), Some(class));
    let remedy = remedy_for(nightjar::outcome::ErrorClass::parse(class), report.run_id);
    assert_eq!(mail.field("What to do").as_deref(), Some(remedy.as_str()), "{}", mail.text());
    assert!(mail.html().contains(&nightjar::alert::escape(&remedy)), "{}", mail.html());
    mail
}

async fn outbox_summary(fx: &Fixture) -> Vec<(OutboxStatus, u32, Option<String>)> {
    let rows = fx.state.outbox(OutboxFilter::default()).await.unwrap();
    rows.into_iter().map(|r| (r.status, r.attempts, r.last_error)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_mail_carries_the_facts_and_a_recovery_mail_follows_the_next_success() {
    let (fx, smtp) = setup(50).await;
    fx.sandbox.fail_next_query_jobs(1, "QUERY_TIMEOUT: Your query request was running for too long.");
    let failed = run_and_deliver(&fx).await;
    assert_eq!(failed.status, RunStatus::Failed);

    let mails = smtp.wait_for(1, Duration::from_secs(10));
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.subject(), "[nightjar] FAILED accounts — query_timeout");
    assert_eq!(mail.from, FROM);
    assert_eq!(mail.to, vec![ONCALL.to_string(), JOB_OWNER.to_string()], "global and job recipients");
    let run = failed.run_id.to_string();
    assert_eq!(mail.field("Job").as_deref(), Some("accounts"));
    assert_eq!(mail.field("Run").as_deref(), Some(run.as_str()));
    assert_eq!(mail.field("Trigger").as_deref(), Some("manual"));
    let window = mail.field("Window").expect("window line");
    // The window ends `settle` (2m) before Salesforce's clock.
    let end = nightjar::state::ts(fx.sandbox.now() - chrono::Duration::minutes(2));
    assert!(window.starts_with(&format!("(beginning) .. {}", &end[..19])), "{window} (expected end {end})");
    assert!(mail.field("Rows so far").expect("rows line").starts_with("0 extracted"), "{}", mail.text());
    let sf_job = &failed.salesforce_job_ids[0];
    let salesforce = mail.field("Salesforce").expect("Salesforce line");
    assert!(salesforce.contains("QUERY_TIMEOUT: Your query request was running for too long."), "{salesforce}");
    assert!(salesforce.contains(&format!("job {sf_job}")), "{salesforce}");
    assert_eq!(
        mail.field("What to do"),
        Some(remedy_for(nightjar::outcome::ErrorClass::parse("query_timeout"), failed.run_id))
    );
    assert_eq!(mail.field("Last success").as_deref(), Some("(none yet)"));
    let link = format!("{PUBLIC_URL}/runs/{run}");
    assert_eq!(mail.field("Run page").as_deref(), Some(link.as_str()));
    let html = mail.html();
    assert!(html.contains(&format!("<a href=\"{link}\">")), "{html}");
    assert!(html.contains(sf_job.as_str()) && html.contains("query_timeout"), "{html}");

    // The next run succeeds: one recovery mail.
    fx.advance(5);
    let ok = run_and_deliver(&fx).await;
    assert_eq!(ok.status, RunStatus::Succeeded, "{:?}", ok.error);
    let mails = smtp.wait_for(2, Duration::from_secs(10));
    assert_eq!(mails.len(), 2);
    assert_eq!(mails[1].subject(), "[nightjar] RECOVERED accounts");
    let before = mails[1].field("Failed before").expect("failed-before line");
    assert!(before.starts_with(&format!("1 failed run(s) in a row since run {run}")), "{before}");
    assert_eq!(mails[1].field("Rows").expect("rows").split(',').next(), Some("50 extracted"));

    // Further successes are quiet.
    fx.advance(5);
    assert_eq!(run_and_deliver(&fx).await.status, RunStatus::Succeeded);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(smtp.messages().len(), 2, "no mail for a success after a success");

    // A new failure mails again at once and names the last good run and watermark.
    fx.sandbox.fail_next_query_jobs(1, "InvalidBatch: Failed to process query");
    let third = expect_class_mail(&fx, &smtp, "salesforce").await;
    let last = third.field("Last success").expect("last success line");
    let watermark = fx.state.watermark("accounts").await.unwrap().expect("watermark");
    assert!(last.starts_with(&format!("run {}", failed.run_id + 2)), "{last}");
    assert!(last.ends_with(&nightjar::state::ts(watermark)), "{last}");

    let outbox = fx.state.outbox(OutboxFilter::default()).await.unwrap();
    assert_eq!(outbox.len(), 3);
    assert!(outbox.iter().all(|a| a.status == OutboxStatus::Sent && a.attempts == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_down_then_up_delivers_the_mail_exactly_once_and_the_outbox_shows_the_attempts() {
    let mut fx = Fixture::new(20, 1_000).await;
    let addr = closed_port();
    configure(&mut fx, addr.port(), "", "");
    fx.advance(60);
    fx.sandbox.fail_next_query_jobs(1, "InvalidBatch: boom");
    assert_eq!(fx.run().await.status, RunStatus::Failed);
    let queued = fx.state.outbox(OutboxFilter::default()).await.unwrap();
    assert_eq!((queued.len(), queued[0].status, queued[0].attempts), (1, OutboxStatus::Pending, 0));

    let mailer = mailer(&fx.project).expect("smtp configured");
    let policy = RetryPolicy {
        backoff: nightjar::backoff::Backoff::new(Duration::from_millis(50), Duration::from_millis(100)),
        max_attempts: 1_000,
        lease: Duration::from_secs(10),
        batch: 10,
    };
    let server: Mutex<Option<SmtpServer>> = Mutex::new(None);
    let state = &fx.state;
    let script = async {
        // Some refused attempts, then the server comes up on that port.
        let deadline = Instant::now() + Duration::from_secs(20);
        while state.outbox(OutboxFilter::default()).await.unwrap()[0].attempts < 4 {
            assert!(Instant::now() < deadline, "the sender keeps retrying");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        *server.lock().unwrap() = Some(SmtpServer::start_on(addr).expect("the port is free again"));
        while state.outbox(OutboxFilter::default()).await.unwrap()[0].status != OutboxStatus::Sent {
            assert!(Instant::now() < deadline, "the mail goes out once the server is up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // More passes: a sent alert never goes out again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    run_sender(state, &mailer, &policy, Duration::from_millis(20), script).await;

    let server = server.lock().unwrap().take().expect("server started");
    let mails = server.wait_for(1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(server.messages().len(), 1, "exactly once");
    assert_eq!(mails[0].subject(), "[nightjar] FAILED accounts — salesforce");
    let row = &fx.state.outbox(OutboxFilter::default()).await.unwrap()[0];
    assert_eq!(row.status, OutboxStatus::Sent);
    assert!(row.attempts >= 5, "4 refused + 1 accepted, got {}", row.attempts);
    let error = row.last_error.as_deref().unwrap_or_default();
    assert!(error.contains(&format!("127.0.0.1:{}", addr.port())) && error.contains("refused"), "{error}");

    // `nightjar alerts` shows the same.
    let out = nightjar(fx.dir.path(), &["alerts", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed[0]["status"], "sent");
    assert_eq!(listed[0]["attempts"], row.attempts);
    assert_eq!(listed[0]["kind"], "failed");
    let table = nightjar(fx.dir.path(), &["alerts"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("sent"), "{table:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_is_marked_failed_after_the_last_attempt_and_listed_as_such() {
    let mut fx = Fixture::new(5, 1_000).await;
    configure(&mut fx, closed_port().port(), "", "");
    fx.advance(60);
    fx.sandbox.fail_next_query_jobs(1, "InvalidBatch: boom");
    assert_eq!(fx.run().await.status, RunStatus::Failed);
    let mailer = mailer(&fx.project).expect("smtp configured");
    let policy = RetryPolicy {
        backoff: nightjar::backoff::Backoff::new(Duration::ZERO, Duration::ZERO),
        max_attempts: 2,
        ..RetryPolicy::default()
    };
    let first = nightjar::alert::deliver_due(&fx.state, &mailer, &policy).await.unwrap();
    assert_eq!((first.sent, first.retrying, first.given_up), (0, 1, 0));
    let second = nightjar::alert::deliver_due(&fx.state, &mailer, &policy).await.unwrap();
    assert_eq!((second.sent, second.retrying, second.given_up), (0, 0, 1));
    assert_eq!(outbox_summary(&fx).await[0].0, OutboxStatus::Failed);
    let after = nightjar::alert::deliver_due(&fx.state, &mailer, &policy).await.unwrap();
    assert_eq!(after, nightjar::alert::Delivery::default(), "a failed alert is left for a person");

    let out = nightjar(fx.dir.path(), &["alerts", "--status", "failed", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(listed[0]["attempts"], 2);
    assert!(listed[0]["last_error"].as_str().is_some_and(|e| e.contains("refused")), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_failures_within_repeat_after_send_one_mail_and_one_repeat_after_the_interval() {
    let mut fx = Fixture::new(20, 1_000).await;
    let smtp = SmtpServer::start();
    let repeat = Duration::from_secs(3);
    configure(&mut fx, smtp.port(), "", "repeat_after = \"3s\"");
    fx.advance(60);
    // Jobs end at their first poll, so ten runs fit well inside repeat_after.
    fx.sandbox.add_faults("slow-jobs:polls=1").expect("fault spec");
    fx.sandbox.fail_next_query_jobs(11, "InvalidBatch: boom");

    let first = run_and_deliver(&fx).await;
    let first_mail_at = Instant::now();
    assert_eq!(first.status, RunStatus::Failed);
    for _ in 1..10 {
        assert_eq!(run_and_deliver(&fx).await.status, RunStatus::Failed);
    }
    assert!(
        first_mail_at.elapsed() < repeat,
        "the ten runs took {:?}, longer than repeat_after",
        first_mail_at.elapsed()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(smtp.messages().len(), 1, "one mail for ten failures");
    assert_eq!(fx.state.outbox(OutboxFilter::default()).await.unwrap().len(), 1);

    // After the interval the next failure mails again, counting the ones in between.
    tokio::time::sleep(repeat.saturating_sub(first_mail_at.elapsed()) + Duration::from_millis(300)).await;
    assert_eq!(run_and_deliver(&fx).await.status, RunStatus::Failed);
    let mails = smtp.wait_for(2, Duration::from_secs(10));
    assert_eq!(mails.len(), 2);
    assert_eq!(mails[1].subject(), "[nightjar] FAILED accounts — salesforce");
    let failures = mails[1].field("Failures").expect("failures line");
    assert_eq!(
        failures,
        format!("10 failures since the last email; 11 failed runs in a row since run {}", first.run_id)
    );
}

fn nightjar(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .arg("--config")
        .arg(dir.join("nightjar.toml"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "trace")
        .output()
        .expect("nightjar runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_mail_a_log_line_or_the_state_db() {
    const SF_SECRET: &str = "sandbox-secret";
    const SMTP_PASSWORD: &str = "smtp-pw-7f3a9c1e55";
    const TRIGGER_TOKEN: &str = "trigger-tok-90d1b2";
    let mut fx = Fixture::new(20, 1_000).await;
    let smtp = SmtpServer::start_with_password(SMTP_PASSWORD);
    // The first login is refused, so an SMTP error also passes through the outbox.
    smtp.refuse_logins(1);
    let config = fx.dir.path().join("nightjar.toml");
    configure(&mut fx, smtp.port(), &format!("username = \"nightjar\"\npassword = \"{SMTP_PASSWORD}\""), "");
    replace_in(&config, "[server]\n", &format!("[server]\ntrigger_token = \"{TRIGGER_TOKEN}\"\n"));
    // Log in with a refresh token (and the client secret) from the config.
    let refresh_token = fx.sandbox.issue_refresh_token();
    replace_in(
        &config,
        "auth = \"client_credentials\"",
        &format!("auth = \"refresh_token\"\nrefresh_token = \"{refresh_token}\""),
    );
    reload(&mut fx);
    assert!(std::fs::read_to_string(&config).unwrap().contains(SF_SECRET), "the fixture logs in with the known secret");
    fx.advance(60);
    fx.sandbox.fail_next_query_jobs(1, "InvalidBatch: boom");

    let mut outputs = Vec::new();
    let run = nightjar(fx.dir.path(), &["run", "accounts"]);
    assert_eq!(run.status.code(), Some(1), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stderr).contains("not sent yet"), "{}", String::from_utf8_lossy(&run.stderr));
    outputs.push(run);
    let send = nightjar(fx.dir.path(), &["alerts", "send"]);
    assert!(send.status.success(), "{}", String::from_utf8_lossy(&send.stderr));
    outputs.push(send);
    let test = nightjar(fx.dir.path(), &["alerts", "test"]);
    assert!(test.status.success(), "{}", String::from_utf8_lossy(&test.stderr));
    outputs.push(test);
    for args in [&["alerts", "--json"][..], &["alerts"], &["history", "--json"], &["show", "1", "--json"]] {
        outputs.push(nightjar(fx.dir.path(), args));
    }

    let mails = smtp.wait_for(2, Duration::from_secs(10));
    assert_eq!(mails.len(), 2, "the failure mail and the test mail");
    assert_eq!(mails[1].subject(), "[nightjar] test email");
    assert!(smtp.logins().iter().any(|(user, pw)| user == "nightjar" && pw == SMTP_PASSWORD), "the password was used");
    let row = &fx.state.outbox(OutboxFilter::default()).await.unwrap()[0];
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("535")), "{:?}", row.last_error);
    let logins = fx.sandbox.request_log().into_iter().filter(|r| r.path.ends_with("/oauth2/token"));
    assert!(logins.into_iter().any(|r| r.body.contains("grant_type=refresh_token")), "the refresh token was used");

    let mut texts: Vec<(String, String)> = Vec::new();
    for out in &outputs {
        texts.push(("stdout".into(), String::from_utf8_lossy(&out.stdout).into_owned()));
        texts.push(("stderr".into(), String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    assert!(texts.iter().any(|(_, t)| t.contains("alert email")), "trace logs were captured");
    for mail in &mails {
        texts.push((format!("mail {}", mail.subject()), format!("{}\n{}\n{}", mail.raw, mail.text(), mail.html())));
    }
    let state_dir = fx.dir.path().join("state");
    for entry in std::fs::read_dir(&state_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("nightjar.db")) {
            texts.push((
                path.display().to_string(),
                String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned(),
            ));
        }
    }
    for (source, text) in &texts {
        for secret in [SF_SECRET, refresh_token.as_str(), SMTP_PASSWORD, TRIGGER_TOKEN] {
            assert!(!text.contains(secret), "`{secret}` appears in {source}");
        }
    }
}

// ------------------------------------------------------------ one test per error class

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_auth_wrong_client_secret() {
    let (mut fx, smtp) = setup(10).await;
    replace_in(&fx.dir.path().join("nightjar.toml"), "client_secret = \"sandbox-secret\"", "client_secret = \"wrong\"");
    reload(&mut fx);
    let mail = expect_class_mail(&fx, &smtp, "auth").await;
    assert!(mail.field("Salesforce").is_some_and(|s| s.contains("invalid_client")), "{}", mail.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_api_limit_request_limit_exceeded() {
    let (fx, smtp) = setup(10).await;
    fx.sandbox.add_faults("limit-exceeded:on=create,times=50").expect("fault spec");
    let mail = expect_class_mail(&fx, &smtp, "api_limit").await;
    assert!(mail.field("Salesforce").is_some_and(|s| s.contains("REQUEST_LIMIT_EXCEEDED")), "{}", mail.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_permission_forbidden() {
    let (fx, smtp) = setup(10).await;
    fx.sandbox.add_faults("http:code=403,body=json,on=create,times=50").expect("fault spec");
    expect_class_mail(&fx, &smtp, "permission").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_query_timeout_failed_query_job() {
    let (fx, smtp) = setup(10).await;
    fx.sandbox.fail_next_query_jobs(1, "QUERY_TIMEOUT: Your query request was running for too long.");
    let mail = expect_class_mail(&fx, &smtp, "query_timeout").await;
    assert!(mail.field("Salesforce").is_some_and(|s| s.contains("job 750")), "{}", mail.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_schema_drift_mapping_adds_a_column_the_table_lacks() {
    let (mut fx, smtp) = setup(10).await;
    assert_eq!(run_and_deliver(&fx).await.status, RunStatus::Succeeded);
    append(
        &fx.dir.path().join("mappings/accounts.toml"),
        "[[column]]\nname = \"name_again\"\nfrom = \"Name\"\ntype = \"text\"\n",
    );
    reload(&mut fx);
    fx.advance(5);
    expect_class_mail(&fx, &smtp, "schema_drift").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_schema_drift_a_field_gone_from_the_org() {
    let (mut fx, smtp) = setup(10).await;
    replace_in(&fx.dir.path().join("jobs/accounts.toml"), "fields = [\"Id\", ", "fields = [\"Retired__c\", \"Id\", ");
    reload(&mut fx);
    let mail = expect_class_mail(&fx, &smtp, "schema_drift").await;
    assert!(mail.field("Salesforce").is_some_and(|s| s.contains("error code INVALID_FIELD")), "{}", mail.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_target_constraint_table_refuses_rows() {
    let (fx, smtp) = setup(10).await;
    assert_eq!(run_and_deliver(&fx).await.status, RunStatus::Succeeded);
    let conn = rusqlite::Connection::open(fx.warehouse()).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER no_new_accounts BEFORE INSERT ON account BEGIN SELECT RAISE(ABORT, 'no new accounts'); END;",
    )
    .unwrap();
    drop(conn);
    fx.advance(1);
    fx.sandbox.insert_records("Account", 3).unwrap();
    fx.advance(5);
    let mail = expect_class_mail(&fx, &smtp, "target_constraint").await;
    assert!(mail.field("Error").is_some_and(|e| e.contains("no new accounts")), "{}", mail.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_data_rejects_too_many_rejected_rows() {
    let (mut fx, smtp) = setup(10).await;
    let mapping = fx.dir.path().join("mappings/accounts.toml");
    replace_in(
        &mapping,
        "name = \"name\"\nfrom = \"Name\"\ntype = \"text\"",
        "name = \"name\"\nfrom = \"Name\"\ntype = \"integer\"",
    );
    reload(&mut fx);
    let mail = expect_class_mail(&fx, &smtp, "data_rejects").await;
    assert!(mail.field("Rows so far").is_some_and(|r| r.contains("10 rejected")), "{}", mail.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_skipped_for_api_budget_mails_as_skipped_with_the_api_limit_remedy() {
    let (mut fx, smtp) = setup(10).await;
    replace_in(
        &fx.dir.path().join("nightjar.toml"),
        "client_secret = \"sandbox-secret\"",
        "client_secret = \"sandbox-secret\"\nmin_api_remaining = 1000",
    );
    reload(&mut fx);
    fx.sandbox.add_faults("api-budget:max=1500,used=1000").expect("fault spec");
    let report = run_and_deliver(&fx).await;
    assert_eq!(report.status, RunStatus::Failed);
    let mails = smtp.wait_for(1, Duration::from_secs(10));
    assert_eq!(mails.len(), 1, "{:?}", outbox_summary(&fx).await);
    assert_eq!(mails[0].subject(), "[nightjar] SKIPPED accounts — api_limit");
    assert_eq!(
        mails[0].field("What to do"),
        Some(remedy_for(nightjar::outcome::ErrorClass::parse("api_limit"), report.run_id))
    );
    assert!(mails[0].text().contains("skipped: the org's API budget is too low"), "{}", mails[0].text());
    assert_eq!(
        fx.state.outbox(OutboxFilter::default()).await.unwrap()[0].kind,
        nightjar::state::AlertKind::SkippedBudget
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_network_salesforce_unreachable() {
    let (mut fx, smtp) = setup(10).await;
    let closed = closed_port();
    let config = fx.dir.path().join("nightjar.toml");
    replace_in(&config, fx.running.base_url(), &format!("http://{closed}"));
    reload(&mut fx);
    expect_class_mail(&fx, &smtp, "network").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_points_at_bad_alert_settings() {
    let fx = Fixture::new(1, 1_000).await;
    let config = fx.dir.path().join("nightjar.toml");
    let lines = std::fs::read_to_string(&config).unwrap().lines().count();
    append(&config, "\n[alerts]\nemail = [\"not an address\"]\n");
    let out = nightjar(fx.dir.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let at = format!("nightjar.toml:{}:10: ", lines + 3);
    assert!(err.contains(&format!("{at}`not an address` is not an email address")), "{err}");
    assert!(err.contains(&format!("{at}an email address is set but nightjar.toml has no [smtp] section")), "{err}");

    replace_in(&config, "not an address", "oncall@example.com");
    append(&config, "\n[smtp]\nhost = \"127.0.0.1\"\nsecurity = \"ssl\"\nfrom = \"etl@example.com\"\n");
    let out = nightjar(fx.dir.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("nightjar.toml:{}:12: ", lines + 7)) && err.contains("ssl"), "{err}");
    assert!(err.contains("none") && err.contains("starttls") && err.contains("tls"), "{err}");
}
