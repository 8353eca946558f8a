//! The Salesforce client: OAuth, Bulk API 2.0 query jobs, result pages,
//! limits and describe.
//!
//! Resilience lives in `RunClient::call`: a 401 INVALID_SESSION_ID renews
//! the connection's shared token once and repeats the same request (same
//! locator); 5xx/429/timeouts/dropped or truncated bodies back off
//! exponentially with jitter (backon), bounded per request and per run;
//! other 4xx, REQUEST_LIMIT_EXCEEDED included, fail at once.
//!
//! Protocol facts follow `salesforce-bulk-api.md`; this module has its own
//! wire structs and shares none with the sandbox, so a misreading of the
//! protocol on one side shows up as a failure against the other.

mod auth;
mod check;
mod page;
mod results;
mod soql;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, header};
use serde::Deserialize;
use serde_json::json;
use thiserror::Error;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

pub use auth::{LoginOutcome, Session, login_with_browser};
pub use check::{CheckReport, FieldDescribe, ObjectDescribe, check, check_client, check_job_fields, validate_online};
pub use page::{MAX_PAGE_BYTES, Page, PageError, decode_page, decode_page_within, parse_csv_page};
pub use results::ResultPages;
pub use soql::build_soql;

use crate::backoff::Backoff;
use crate::config::{SalesforceConnection, Secret};
use crate::outcome::ErrorClass;

#[derive(Debug, Error)]
pub enum SalesforceError {
    #[error("connection `{connection}`: {message}")]
    Config { connection: String, message: String },
    #[error("connection `{connection}`: login refused (HTTP {status} {error}: {description}); {hint}")]
    Auth { connection: String, status: u16, error: String, description: String, hint: String },
    #[error("Salesforce answered HTTP {status} {error_code}: {message}{}; {hint}", job_suffix(.job_id))]
    Api { status: u16, error_code: String, message: String, job_id: Option<String>, hint: String },
    #[error(
        "Salesforce query job {job_id} failed: {message}; fix the cause (often the job's `where` or fields) and run again"
    )]
    JobFailed { job_id: String, message: String },
    #[error("Salesforce query job {job_id} was aborted in the org; run again")]
    JobAborted { job_id: String },
    #[error("network error while {context}: {message}; check connectivity to Salesforce and run again")]
    Transport { context: String, message: String },
    #[error("unexpected response while {context}: {message}")]
    Protocol { context: String, message: String },
    #[error("{last} (gave up after {attempts} attempts{})", if *.run_budget_spent { "; the run's retry budget is spent" } else { "" })]
    GaveUp { attempts: u32, run_budget_spent: bool, last: Box<SalesforceError> },
    #[error(
        "connection `{connection}`: only {remaining} of {max} daily API requests remain, below min_api_remaining = {min}; the run did not start. Salesforce frees capacity as calls older than 24 hours age out: run later, or lower min_api_remaining"
    )]
    ApiBudgetLow { connection: String, remaining: u64, max: u64, min: u64 },
    #[error(
        "connection `{connection}`: Salesforce's clock (its Date header) says {server}, this machine's says {local}: more than max_clock_skew ({max}) apart, so no window can be planned on it; the run did not start"
    )]
    Clock { connection: String, server: String, local: String, max: String },
    #[error("{context}: {message} (a bug in nightjar; please report it)")]
    Internal { context: String, message: String },
}

fn job_suffix(job_id: &Option<String>) -> String {
    job_id.as_ref().map(|id| format!(" (Salesforce job {id})")).unwrap_or_default()
}

impl SalesforceError {
    /// The class history and alerts show, from the HTTP status and
    /// Salesforce's error code.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Config { .. } => ErrorClass::Config,
            Self::Auth { .. } => ErrorClass::Auth,
            Self::Api { error_code, .. } if error_code == "REQUEST_LIMIT_EXCEEDED" => ErrorClass::ApiLimit,
            Self::Api { error_code, .. } if error_code == "QUERY_TIMEOUT" => ErrorClass::QueryTimeout,
            Self::Api { error_code, .. } if error_code == "INVALID_FIELD" => ErrorClass::SchemaDrift,
            Self::Api { status: 401, .. } => ErrorClass::Auth,
            Self::Api { status: 403, .. } => ErrorClass::Permission,
            // Salesforce reports a query that ran too long only in the job's errorMessage.
            Self::JobFailed { message, .. } if is_query_timeout(message) => ErrorClass::QueryTimeout,
            Self::Api { .. } | Self::JobFailed { .. } | Self::JobAborted { .. } => ErrorClass::Salesforce,
            Self::Transport { .. } => ErrorClass::Network,
            Self::Protocol { .. } => ErrorClass::Protocol,
            Self::GaveUp { last, .. } => last.class(),
            Self::ApiBudgetLow { .. } => ErrorClass::ApiLimit,
            Self::Clock { .. } => ErrorClass::Clock,
            Self::Internal { .. } => ErrorClass::Internal,
        }
    }

    /// What Salesforce itself said, when the failure came from it: (error
    /// code, message, job id).
    pub fn salesforce_said(&self) -> Option<(Option<&str>, &str, Option<&str>)> {
        match self {
            Self::Api { error_code, message, job_id, .. } => Some((Some(error_code), message, job_id.as_deref())),
            Self::JobFailed { job_id, message } => Some((None, message, Some(job_id))),
            Self::JobAborted { job_id } => Some((None, "the query job was aborted in the org", Some(job_id))),
            Self::Auth { error, description, .. } => Some((Some(error), description, None)),
            Self::GaveUp { last, .. } => last.salesforce_said(),
            _ => None,
        }
    }
}

fn is_query_timeout(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("query_timeout") || m.contains("timed out") || m.contains("running for too long")
}

/// One remedy line per error code a user is likely to meet.
fn hint_for(status: u16, code: &str, message: &str) -> String {
    match (status, code) {
        (401, "INVALID_SESSION_ID") if message.contains("not valid for use with the REST API") => {
            "the connected app's token lacks the `api` scope; add it to the app's OAuth scopes".into()
        }
        (401, _) => "the session was refused; check the connection's credentials".into(),
        (_, "REQUEST_LIMIT_EXCEEDED") if message.contains("ConcurrentPerOrgLongTxn") => {
            "too many long-running requests are open in the org at once; run again when other integrations finish"
                .into()
        }
        (_, "REQUEST_LIMIT_EXCEEDED") => "the org's daily API request limit is spent; Salesforce counts calls over a \
             rolling 24 hours, so room comes back as calls made 24 hours ago age out (expect it within 24 hours): \
             run later, or ask for a higher allowance"
            .into(),
        (_, "INVALID_FIELD") => {
            "a field in the job's `fields` or `where` does not exist or is not visible to the integration user".into()
        }
        (_, "INVALID_TYPE") => "the job's `object` does not exist or is not visible to the integration user".into(),
        (_, "MALFORMED_QUERY") => "the job's `where` is not valid SOQL".into(),
        (403, _) => "the integration user lacks a permission (e.g. API Enabled, object read access)".into(),
        (s, _) if s >= 500 => "Salesforce had a server-side problem; run again later".into(),
        _ => "see Salesforce's message above".into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiErrorBody {
    error_code: String,
    message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobInfo {
    pub id: String,
    pub state: String,
    #[serde(default)]
    pub number_records_processed: Option<u64>,
    #[serde(default)]
    pub error_message: Option<String>,
}

/// What `/limits` and the response headers say about the org's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgLimits {
    /// Salesforce's clock (the `Date` header), which windows are planned on.
    pub server_now: DateTime<Utc>,
    pub daily_api_max: u64,
    pub daily_api_remaining: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LimitsBody {
    daily_api_requests: LimitBody,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LimitBody {
    max: u64,
    remaining: u64,
}

/// `Sforce-Limit-Info: api-usage=USED/MAX` (possibly followed by per-app
/// usage, which is ignored).
fn parse_limit_info(value: &str) -> Option<(u64, u64)> {
    let usage = value.split(';').map(str::trim).find_map(|part| part.strip_prefix("api-usage="))?;
    let (used, max) = usage.split_once('/')?;
    Some((used.trim().parse().ok()?, max.trim().parse().ok()?))
}

/// How hard one request and one run push through transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries of one request after its first attempt.
    pub per_request: u32,
    /// Retries shared by every request of one run, so a flapping org cannot
    /// burn the daily API budget.
    pub per_run: u32,
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            per_request: 4,
            per_run: 16,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
        }
    }
}

/// A client for one Salesforce connection, shared by every run of that
/// connection in the process (see [`SalesforceClient::shared`]): one token
/// cache, one view of the API budget, one cap on concurrent Bulk jobs.
pub struct SalesforceClient {
    name: String,
    conn: SalesforceConnection,
    http: reqwest::Client,
    /// The current token and how many times it was renewed; a request that
    /// failed with generation N renews only if nobody renewed since.
    session: Mutex<Option<(u64, Session)>>,
    generations: std::sync::atomic::AtomicU64,
    refresh_token: std::sync::Mutex<Option<Secret>>,
    jobs: Arc<Semaphore>,
    /// Last `Sforce-Limit-Info` seen: (used, max).
    usage: std::sync::Mutex<Option<(u64, u64)>>,
    retry: RetryPolicy,
}

/// First and longest pause between polls of a query job.
const POLL_FIRST: Duration = Duration::from_millis(250);
const POLL_MAX: Duration = Duration::from_secs(5);
/// Between two bytes of a response; a stalled download is a dropped one.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Identifies a connection's settings; credentials enter only as a hash
/// (in memory, never shown) so that changed credentials get a new client.
fn client_key(name: &str, conn: &SalesforceConnection) -> String {
    use std::hash::{Hash, Hasher};
    let mut credentials = std::collections::hash_map::DefaultHasher::new();
    conn.client_id.expose().hash(&mut credentials);
    conn.client_secret.as_ref().map(Secret::expose).hash(&mut credentials);
    conn.refresh_token.as_ref().map(Secret::expose).hash(&mut credentials);
    conn.username.hash(&mut credentials);
    conn.private_key_file.hash(&mut credentials);
    format!(
        "{name}\u{1f}{}\u{1f}{:?}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{:?}\u{1f}{:x}",
        conn.login_url,
        conn.auth,
        conn.api_version,
        conn.max_concurrent_jobs,
        conn.min_api_remaining,
        conn.max_clock_skew,
        credentials.finish()
    )
}

/// The clients of one process, one per connection: every run of a
/// connection shares its token (no login per run) and its Bulk job slots.
/// A connection whose settings changed (a reloaded config) gets a new one.
/// Owned by the engine context that `run` and `serve` pass around.
#[derive(Default)]
pub struct Clients {
    by_connection: std::sync::Mutex<HashMap<String, Arc<SalesforceClient>>>,
    /// Retry policy of the clients made from here on (tests shorten it).
    policy: std::sync::Mutex<Option<RetryPolicy>>,
}

impl Clients {
    pub fn new() -> Clients {
        Clients::default()
    }

    /// Clients made by this registry retry with `policy`.
    pub fn with_policy(policy: RetryPolicy) -> Clients {
        Clients { by_connection: Default::default(), policy: std::sync::Mutex::new(Some(policy)) }
    }

    /// The client of connection `name`.
    pub fn get(&self, name: &str, conn: &SalesforceConnection) -> Result<Arc<SalesforceClient>, SalesforceError> {
        let key = client_key(name, conn);
        let mut clients = self.by_connection.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let policy = self.policy.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or_default();
        let client = SalesforceClient::with_policy(name, conn, policy)?;
        clients.insert(key, client.clone());
        Ok(client)
    }
}

impl SalesforceClient {
    /// A client of its own (own token cache); `nightjar check` and tests use it.
    pub fn new(name: &str, conn: &SalesforceConnection) -> Result<Arc<Self>, SalesforceError> {
        Self::with_policy(name, conn, RetryPolicy::default())
    }

    pub fn with_policy(
        name: &str,
        conn: &SalesforceConnection,
        retry: RetryPolicy,
    ) -> Result<Arc<Self>, SalesforceError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("nightjar/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| SalesforceError::Config { connection: name.into(), message: e.to_string() })?;
        Ok(Arc::new(SalesforceClient {
            name: name.into(),
            conn: conn.clone(),
            http,
            session: Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
            refresh_token: std::sync::Mutex::new(None),
            jobs: Arc::new(Semaphore::new(conn.max_concurrent_jobs.max(1) as usize)),
            usage: std::sync::Mutex::new(None),
            retry,
        }))
    }

    pub fn connection_name(&self) -> &str {
        &self.name
    }

    pub fn api_version(&self) -> &str {
        &self.conn.api_version
    }

    /// The refresh token for `auth = "refresh_token"` connections, when it
    /// comes from the state DB (`nightjar auth login`) rather than the config.
    pub fn set_refresh_token(&self, token: Option<Secret>) {
        if token.is_some() {
            *self.refresh_token.lock().unwrap_or_else(|e| e.into_inner()) = token;
        }
    }

    /// A handle for one run, with its own retry budget.
    pub fn for_run(self: &Arc<Self>) -> RunClient {
        RunClient {
            client: self.clone(),
            retries_left: Arc::new(AtomicU32::new(self.retry.per_run)),
            api_calls: Arc::default(),
        }
    }

    /// Last `Sforce-Limit-Info` seen on any response: (used, max).
    pub fn api_usage(&self) -> Option<(u64, u64)> {
        *self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn session(&self) -> Result<(u64, Session), SalesforceError> {
        let mut guard = self.session.lock().await;
        if let Some(current) = guard.as_ref() {
            return Ok(current.clone());
        }
        let fresh = self.login().await?;
        let generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        *guard = Some((generation, fresh.clone()));
        Ok((generation, fresh))
    }

    /// Replaces the token that failed with generation `seen`, unless another
    /// request already did; concurrent 401s cause one login, not many.
    async fn renew(&self, seen: u64) -> Result<(), SalesforceError> {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_some_and(|(generation, _)| *generation != seen) {
            return Ok(());
        }
        match self.login().await {
            Ok(fresh) => {
                *guard = Some((self.generations.fetch_add(1, Ordering::SeqCst) + 1, fresh));
                Ok(())
            }
            Err(e) => {
                // The old token is dead either way; the next call logs in afresh.
                *guard = None;
                Err(e)
            }
        }
    }

    async fn login(&self) -> Result<Session, SalesforceError> {
        let stored = self.refresh_token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        auth::login(&self.http, &self.name, &self.conn, stored.as_ref()).await
    }

    fn track_usage(&self, headers: &header::HeaderMap) {
        if let Some(usage) = headers.get("sforce-limit-info").and_then(|v| v.to_str().ok()).and_then(parse_limit_info) {
            *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = Some(usage);
        }
    }

    fn data_url(&self, session: &Session, path: &str) -> String {
        format!("{}/services/data/v{}{}", session.instance_url, self.conn.api_version, path)
    }
}

/// One data request, repeatable as many times as retries need.
struct Call {
    method: Method,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<serde_json::Value>,
    accept: &'static str,
    job_id: Option<String>,
}

/// Why one attempt failed, which decides what happens next.
enum Failure {
    /// 401 INVALID_SESSION_ID: renew the token once and repeat the request.
    Expired(SalesforceError),
    /// 5xx, 429, timeouts, dropped connections, truncated bodies: back off and repeat.
    Transient(SalesforceError),
    Fatal(SalesforceError),
}

/// Salesforce's and its edge's transient answers (salesforce-bulk-api.md §3.2).
fn is_transient_status(status: u16) -> bool {
    matches!(status, 406 | 408 | 420 | 429) || status >= 500
}

/// The Salesforce API as one run sees it: every call renews an expired
/// session once and retries transient failures with exponential backoff and
/// jitter, bounded per request and by the run's retry budget.
#[derive(Clone)]
pub struct RunClient {
    client: Arc<SalesforceClient>,
    retries_left: Arc<AtomicU32>,
    /// Requests this run sent, for history (they spend the org's allowance).
    api_calls: Arc<std::sync::atomic::AtomicU64>,
}

impl RunClient {
    /// A live count of the requests this run has sent so far.
    pub fn api_calls(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.api_calls.clone()
    }

    pub fn client(&self) -> &Arc<SalesforceClient> {
        &self.client
    }

    /// Waits for one of the connection's `max_concurrent_jobs` Bulk job
    /// slots; hold the permit until the job's results are downloaded.
    pub async fn job_slot(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(permit) = self.client.jobs.clone().acquire_owned().await {
                return permit;
            }
            // The semaphore is never closed; a closed one would mean no limit.
            tokio::task::yield_now().await;
        }
    }

    fn take_retry(&self) -> bool {
        self.retries_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    async fn call<T, F, Fut>(&self, call: &Call, read: F) -> Result<T, SalesforceError>
    where
        F: Fn(reqwest::Response) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut renewed = false;
        let policy = self.client.retry;
        let mut retries = 0u32;
        let mut next_pause = move || {
            retries += 1;
            (retries <= policy.per_request).then(|| policy.backoff.delay(retries))
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.api_calls.fetch_add(1, Ordering::Relaxed);
            let (generation, outcome) = match self.client.session().await {
                Ok((generation, session)) => (generation, self.attempt(call, &session, &read).await),
                // A token endpoint that is down is as transient as any other.
                Err(e @ SalesforceError::Transport { .. }) => (0, Err(Failure::Transient(e))),
                Err(e) => return Err(e),
            };
            match outcome {
                Ok(value) => return Ok(value),
                Err(Failure::Expired(e)) if !renewed => {
                    renewed = true;
                    tracing::info!(connection = %self.client.name, path = %call.path, "session expired; renewing it and repeating the request");
                    match self.client.renew(generation).await {
                        // The expired-session error is spent: the request is repeated.
                        Ok(()) => drop(e),
                        // A token endpoint that is down is retried like any call.
                        Err(transport @ SalesforceError::Transport { .. }) => {
                            let Some(pause) = next_pause() else {
                                return Err(SalesforceError::GaveUp {
                                    attempts,
                                    run_budget_spent: false,
                                    last: Box::new(transport),
                                });
                            };
                            if !self.take_retry() {
                                return Err(SalesforceError::GaveUp {
                                    attempts,
                                    run_budget_spent: true,
                                    last: Box::new(transport),
                                });
                            }
                            tokio::time::sleep(pause).await;
                        }
                        Err(other) => return Err(other),
                    }
                }
                Err(Failure::Expired(e)) => {
                    return Err(match e {
                        SalesforceError::Api { status, error_code, message, job_id, .. } => SalesforceError::Api {
                            status,
                            error_code,
                            message,
                            job_id,
                            hint: "a freshly issued token was refused too; check that the integration user is active and the connected app's session policies".into(),
                        },
                        other => other,
                    });
                }
                Err(Failure::Transient(e)) => {
                    let Some(pause) = next_pause() else {
                        return Err(SalesforceError::GaveUp { attempts, run_budget_spent: false, last: Box::new(e) });
                    };
                    if !self.take_retry() {
                        return Err(SalesforceError::GaveUp { attempts, run_budget_spent: true, last: Box::new(e) });
                    }
                    tracing::warn!(connection = %self.client.name, path = %call.path, attempt = attempts, error = %e, ?pause, "transient failure; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
    }

    async fn attempt<T, F, Fut>(&self, call: &Call, session: &Session, read: &F) -> Result<T, Failure>
    where
        F: Fn(reqwest::Response) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut request = self
            .client
            .http
            .request(call.method.clone(), self.client.data_url(session, &call.path))
            .bearer_auth(session.access_token.expose())
            .header(header::ACCEPT, call.accept)
            .query(&call.query);
        if call.accept == "text/csv" {
            // Result pages are big, repetitive text: Salesforce gzips them
            // on request, several times smaller on the wire.
            request = request.header(header::ACCEPT_ENCODING, "gzip");
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            Failure::Transient(SalesforceError::Transport {
                context: format!("calling {} {}", call.method, call.path),
                message: e.to_string(),
            })
        })?;
        self.client.track_usage(response.headers());
        if response.status().is_success() {
            return read(response).await;
        }
        let err = api_error(response, call.job_id.as_deref(), self.client.api_usage()).await;
        Err(match &err {
            SalesforceError::Api { status: 401, error_code, message, .. }
                if error_code == "INVALID_SESSION_ID" && !message.contains("not valid for use with the REST API") =>
            {
                Failure::Expired(err)
            }
            SalesforceError::Api { error_code, .. } if error_code == "REQUEST_LIMIT_EXCEEDED" => Failure::Fatal(err),
            SalesforceError::Api { status, .. } if is_transient_status(*status) => Failure::Transient(err),
            _ => Failure::Fatal(err),
        })
    }

    async fn json_call<T: serde::de::DeserializeOwned>(&self, call: Call, context: &str) -> Result<T, SalesforceError> {
        let context = context.to_string();
        self.call(&call, move |response| {
            let context = context.clone();
            async move { json_body(response, &context).await }
        })
        .await
    }

    /// The org's daily API budget and Salesforce's clock, from `/limits`.
    pub async fn limits(&self) -> Result<OrgLimits, SalesforceError> {
        let call = Call {
            method: Method::GET,
            path: "/limits".into(),
            query: Vec::new(),
            body: None,
            accept: "application/json",
            job_id: None,
        };
        self.call(&call, |response| async move {
            let context = "reading the org's limits";
            let date = response.headers().get(header::DATE).and_then(|v| v.to_str().ok()).map(str::to_string);
            let body: LimitsBody = json_body(response, context).await?;
            let date = date.ok_or_else(|| {
                Failure::Fatal(SalesforceError::Protocol {
                    context: "reading Salesforce's clock".into(),
                    message: "the response has no Date header".into(),
                })
            })?;
            let server_now = DateTime::parse_from_rfc2822(&date).map(|d| d.with_timezone(&Utc)).map_err(|e| {
                Failure::Fatal(SalesforceError::Protocol {
                    context: "reading Salesforce's clock".into(),
                    message: format!("bad Date header `{}`: {e}", date.escape_debug()),
                })
            })?;
            // Windows are planned on this clock and the watermark moves to
            // it: an absurd one (a broken proxy, a hostile server) would move
            // the watermark past data never extracted, or far behind.
            let local = Utc::now();
            let max = self.client.conn.max_clock_skew;
            let apart = (server_now - local).abs().to_std().unwrap_or(Duration::MAX);
            if apart > max {
                return Err(Failure::Fatal(SalesforceError::Clock {
                    connection: self.client.name.clone(),
                    server: crate::state::ts(server_now),
                    local: crate::state::ts(local),
                    max: humantime::format_duration(max).to_string(),
                }));
            }
            Ok(OrgLimits {
                server_now,
                daily_api_max: body.daily_api_requests.max,
                daily_api_remaining: body.daily_api_requests.remaining,
            })
        })
        .await
    }

    /// Salesforce's current time, from the `Date` header of a cheap call.
    /// Windows are planned on it, never on the local clock.
    pub async fn server_now(&self) -> Result<DateTime<Utc>, SalesforceError> {
        Ok(self.limits().await?.server_now)
    }

    /// Fails with [`SalesforceError::ApiBudgetLow`] when fewer than the
    /// connection's `min_api_remaining` daily API requests are left.
    pub fn check_budget(&self, limits: &OrgLimits) -> Result<(), SalesforceError> {
        let min = self.client.conn.min_api_remaining;
        if limits.daily_api_remaining < min {
            return Err(SalesforceError::ApiBudgetLow {
                connection: self.client.name.clone(),
                remaining: limits.daily_api_remaining,
                max: limits.daily_api_max,
                min,
            });
        }
        Ok(())
    }

    /// Creates a Bulk API 2.0 query job; `query_all` includes deleted rows.
    pub async fn create_query_job(&self, soql: &str, query_all: bool) -> Result<JobInfo, SalesforceError> {
        let body = json!({
            "operation": if query_all { "queryAll" } else { "query" },
            "query": soql,
            "contentType": "CSV",
            "columnDelimiter": "COMMA",
            "lineEnding": "LF",
        });
        let call = Call {
            method: Method::POST,
            path: "/jobs/query".into(),
            query: Vec::new(),
            body: Some(body),
            accept: "application/json",
            job_id: None,
        };
        self.json_call(call, "creating a query job").await
    }

    pub async fn job_info(&self, job_id: &str) -> Result<JobInfo, SalesforceError> {
        let call = Call {
            method: Method::GET,
            path: format!("/jobs/query/{job_id}"),
            query: Vec::new(),
            body: None,
            accept: "application/json",
            job_id: Some(job_id.to_string()),
        };
        self.json_call(call, &format!("polling query job {job_id}")).await
    }

    /// Polls until the job is `JobComplete`, backing off between polls.
    pub async fn wait_for_job(&self, job_id: &str) -> Result<JobInfo, SalesforceError> {
        let mut pause = POLL_FIRST;
        loop {
            let info = self.job_info(job_id).await?;
            match info.state.as_str() {
                "JobComplete" => return Ok(info),
                "Failed" => {
                    return Err(SalesforceError::JobFailed {
                        job_id: job_id.into(),
                        message: info.error_message.unwrap_or_else(|| "no error message given".into()),
                    });
                }
                "Aborted" => return Err(SalesforceError::JobAborted { job_id: job_id.into() }),
                // UploadComplete and InProgress come in any order; both mean wait.
                _ => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// Aborts a query job still queued or running; best effort on cancel paths.
    pub async fn abort_job(&self, job_id: &str) -> Result<(), SalesforceError> {
        let call = Call {
            method: Method::PATCH,
            path: format!("/jobs/query/{job_id}"),
            query: Vec::new(),
            body: Some(json!({ "state": "Aborted" })),
            accept: "application/json",
            job_id: Some(job_id.to_string()),
        };
        self.call(&call, |_| async { Ok(()) }).await
    }

    /// Fetches one results page. `locator` is the previous page's
    /// `Sforce-Locator`; a page that arrives cut short or malformed is
    /// fetched again with the same locator, which Salesforce keeps stable
    /// for the life of the job, before the run gives up on it.
    pub(crate) async fn results_page(
        &self,
        job_id: &str,
        locator: Option<&str>,
        max_records: u32,
        number: u32,
    ) -> Result<Page, SalesforceError> {
        let mut query = vec![("maxRecords", max_records.to_string())];
        if let Some(locator) = locator {
            query.push(("locator", locator.to_string()));
        }
        let call = Call {
            method: Method::GET,
            path: format!("/jobs/query/{job_id}/results"),
            query,
            body: None,
            accept: "text/csv",
            job_id: Some(job_id.to_string()),
        };
        let job_id = job_id.to_string();
        self.call(&call, move |response| {
            let job_id = job_id.clone();
            async move { read_page(response, &job_id, number).await }
        })
        .await
    }
}

/// Aborts a Bulk job if dropped while armed: a run cancelled or timed out
/// (its future dropped) while the job is still queued or running must not
/// leave the job spending the org's resources.
pub struct JobGuard {
    client: RunClient,
    job_id: String,
    armed: bool,
}

impl JobGuard {
    pub fn new(client: &RunClient, job_id: &str) -> JobGuard {
        JobGuard { client: client.clone(), job_id: job_id.to_string(), armed: true }
    }

    /// The job reached a terminal state; nothing to abort any more.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, job_id) = (self.client.clone(), self.job_id.clone());
        runtime.spawn(async move {
            match client.abort_job(&job_id).await {
                Ok(()) => tracing::info!(sf_job = %job_id, "aborted the Salesforce job of a cancelled run"),
                Err(e) => tracing::warn!(sf_job = %job_id, error = %e, "could not abort the Salesforce job of a cancelled run"),
            }
        });
    }
}

async fn read_page(response: reqwest::Response, job_id: &str, number: u32) -> Result<Page, Failure> {
    let header_text = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let next = header_text("Sforce-Locator");
    let declared = header_text("Sforce-NumberOfRecords");
    let context = format!("downloading page {number} of query job {job_id}");
    let gzipped = header_text("Content-Encoding").is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip"));
    let body = read_body(response, &context, MAX_PAGE_BYTES).await?;
    // gunzip and CSV parsing are CPU work: off the async workers.
    let decoded = tokio::task::spawn_blocking(move || {
        let frame = decode_page(&body, gzipped, declared.as_deref());
        (frame, body.len())
    })
    .await;
    match decoded {
        Ok((Ok(frame), bytes)) => {
            // The last page says `null` (literally); an absent or empty
            // header is read the same way, since there is nothing to follow.
            let next_locator = next.filter(|l| !l.is_empty() && l != "null");
            Ok(Page { number, frame, next_locator, bytes })
        }
        // A cut or garbled body is fetched again with the same locator.
        Ok((Err(e @ (PageError::Truncated(_) | PageError::Malformed(_))), _)) => {
            Err(Failure::Transient(SalesforceError::Protocol { context, message: e.to_string() }))
        }
        Ok((Err(e @ PageError::TooLarge(_)), _)) => {
            Err(Failure::Fatal(SalesforceError::Protocol { context, message: e.to_string() }))
        }
        Err(join) => Err(Failure::Fatal(SalesforceError::Internal {
            context: format!("decoding page {number} of query job {job_id}"),
            message: join.to_string(),
        })),
    }
}

/// Reads a response body, refusing one past `max` bytes (a hostile or
/// broken server must not make nightjar allocate without bound).
async fn read_body(mut response: reqwest::Response, context: &str, max: usize) -> Result<Vec<u8>, Failure> {
    let too_large = || {
        Failure::Fatal(SalesforceError::Protocol {
            context: context.to_string(),
            message: format!("the response is larger than {} MiB; lower the job's page_size", max >> 20),
        })
    };
    let expected = response.content_length().unwrap_or(0);
    if expected > max as u64 {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(expected as usize);
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(Failure::Transient(SalesforceError::Transport {
                    context: context.to_string(),
                    message: e.to_string(),
                }));
            }
        }
    }
}

async fn json_body<T: serde::de::DeserializeOwned>(response: reqwest::Response, context: &str) -> Result<T, Failure> {
    let bytes = response.bytes().await.map_err(|e| {
        Failure::Transient(SalesforceError::Transport { context: context.into(), message: e.to_string() })
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        // A JSON body cut short is a dropped connection; anything else is a misunderstanding.
        let error = SalesforceError::Protocol { context: context.into(), message: e.to_string() };
        if e.is_eof() { Failure::Transient(error) } else { Failure::Fatal(error) }
    })
}

/// Turns a non-2xx response into an error carrying Salesforce's code and message.
async fn api_error(response: reqwest::Response, job_id: Option<&str>, usage: Option<(u64, u64)>) -> SalesforceError {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    // Salesforce sends a JSON array of {errorCode, message}; edges and proxies
    // send HTML or nothing, so fall back to the status line.
    let (error_code, message) = match serde_json::from_slice::<Vec<ApiErrorBody>>(&body) {
        Ok(errors) if !errors.is_empty() => {
            let first = &errors[0];
            let mut message = first.message.clone();
            if errors.len() > 1 {
                message.push_str(&format!(" (and {} more errors)", errors.len() - 1));
            }
            (first.error_code.clone(), message)
        }
        _ => {
            let text = String::from_utf8_lossy(&body);
            let looks_html = text.trim_start().starts_with('<');
            let message = if text.trim().is_empty() {
                "(empty body)".to_string()
            } else if looks_html {
                "(an HTML page, not a Salesforce API answer)".to_string()
            } else {
                text.chars().take(200).collect::<String>().trim().to_string()
            };
            (status.canonical_reason().unwrap_or("error").to_uppercase().replace(' ', "_"), message)
        }
    };
    let mut hint = hint_for(status.as_u16(), &error_code, &message);
    if error_code == "REQUEST_LIMIT_EXCEEDED"
        && let Some((used, max)) = usage
    {
        hint = format!("{hint} (last Sforce-Limit-Info: {used} of {max} used)");
    }
    SalesforceError::Api { status: status.as_u16(), error_code, message, job_id: job_id.map(str::to_string), hint }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_info_parses_plain_and_per_app_forms() {
        assert_eq!(parse_limit_info("api-usage=10018/100000"), Some((10018, 100000)));
        assert_eq!(
            parse_limit_info("api-usage=25/5000; per-app-api-usage=17/250(appName=sample-connected-app)"),
            Some((25, 5000))
        );
        assert_eq!(parse_limit_info("nonsense"), None);
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        for s in [500, 502, 503, 504, 429, 420, 406] {
            assert!(is_transient_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 415] {
            assert!(!is_transient_status(s), "{s}");
        }
    }
}
