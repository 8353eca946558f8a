//! The Salesforce client: OAuth, Bulk API 2.0 query jobs, result pages.
//!
//! Protocol facts follow `salesforce-bulk-api.md`; this module has its own
//! wire structs and shares none with the sandbox, so a misreading of the
//! protocol on one side shows up as a failure against the other.

mod auth;
mod page;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, header};
use serde::Deserialize;
use serde_json::json;
use thiserror::Error;
use tokio::sync::Mutex;

pub use auth::Session;
pub use page::{Page, parse_csv_page};

use crate::config::SalesforceConnection;

#[derive(Debug, Error)]
pub enum SalesforceError {
    #[error("connection `{connection}`: {message}")]
    Config { connection: String, message: String },
    #[error(
        "connection `{connection}`: login refused: {error}: {description}; check client_id/client_secret and that the app allows this OAuth flow"
    )]
    Auth { connection: String, error: String, description: String },
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
}

fn job_suffix(job_id: &Option<String>) -> String {
    job_id.as_ref().map(|id| format!(" (Salesforce job {id})")).unwrap_or_default()
}

impl SalesforceError {
    /// A short class for history and alerts.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Config { .. } => "config",
            Self::Auth { .. } => "auth",
            Self::Api { error_code, .. } if error_code == "REQUEST_LIMIT_EXCEEDED" => "api_limit",
            Self::Api { status: 401, .. } => "auth",
            Self::Api { status: 403, .. } => "permission",
            Self::Api { .. } | Self::JobFailed { .. } | Self::JobAborted { .. } => "salesforce",
            Self::Transport { .. } => "network",
            Self::Protocol { .. } => "protocol",
        }
    }
}

/// One remedy line per error code a user is likely to meet.
fn hint_for(status: u16, code: &str, message: &str) -> String {
    match (status, code) {
        (401, "INVALID_SESSION_ID") if message.contains("not valid for use with the REST API") => {
            "the connected app's token lacks the `api` scope; add it to the app's OAuth scopes".into()
        }
        (401, _) => "the session was refused; check the connection's credentials".into(),
        (_, "REQUEST_LIMIT_EXCEEDED") => {
            "the org's API request limit is spent; it recovers over a rolling 24 hours — run later".into()
        }
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

/// A client for one Salesforce connection. Cheap to share: the session is
/// behind a lock so concurrent users refresh it once.
pub struct SalesforceClient {
    name: String,
    conn: SalesforceConnection,
    http: reqwest::Client,
    session: Mutex<Option<Session>>,
}

/// First and longest pause between polls of a query job.
const POLL_FIRST: Duration = Duration::from_millis(250);
const POLL_MAX: Duration = Duration::from_secs(5);

impl SalesforceClient {
    pub fn new(name: &str, conn: &SalesforceConnection) -> Result<Arc<Self>, SalesforceError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("nightjar/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| SalesforceError::Config { connection: name.into(), message: e.to_string() })?;
        Ok(Arc::new(SalesforceClient { name: name.into(), conn: conn.clone(), http, session: Mutex::new(None) }))
    }

    pub fn connection_name(&self) -> &str {
        &self.name
    }

    async fn session(&self, renew: bool) -> Result<Session, SalesforceError> {
        let mut guard = self.session.lock().await;
        if renew || guard.is_none() {
            *guard = Some(auth::login(&self.http, &self.name, &self.conn).await?);
        }
        guard.clone().ok_or_else(|| SalesforceError::Protocol {
            context: "logging in".into(),
            message: "no session after login".into(),
        })
    }

    fn data_url(&self, session: &Session, path: &str) -> String {
        format!("{}/services/data/v{}{}", session.instance_url, self.conn.api_version, path)
    }

    /// Sends a data request, renewing the session once on an expired-session 401.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
        accept: &str,
        job_id: Option<&str>,
    ) -> Result<reqwest::Response, SalesforceError> {
        let mut renewed = false;
        loop {
            let session = self.session(false).await?;
            let mut request = self
                .http
                .request(method.clone(), self.data_url(&session, path))
                .bearer_auth(session.access_token.expose())
                .header(header::ACCEPT, accept)
                .query(query);
            if let Some(body) = &body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| SalesforceError::Transport {
                context: format!("calling {method} {path}"),
                message: e.to_string(),
            })?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let err = api_error(response, job_id).await;
            let expired = matches!(&err, SalesforceError::Api { status: 401, error_code, message, .. }
                if error_code == "INVALID_SESSION_ID" && !message.contains("not valid for use with the REST API"));
            if expired && !renewed {
                renewed = true;
                self.session(true).await?;
                continue;
            }
            return Err(err);
        }
    }

    /// Salesforce's current time, from the `Date` header of a cheap call.
    /// Windows are planned on it, never on the local clock.
    pub async fn server_now(&self) -> Result<DateTime<Utc>, SalesforceError> {
        let response = self.send(Method::GET, "/limits", &[], None, "application/json", None).await?;
        let date = response.headers().get(header::DATE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let date = date.ok_or_else(|| SalesforceError::Protocol {
            context: "reading Salesforce's clock".into(),
            message: "the response has no Date header".into(),
        })?;
        DateTime::parse_from_rfc2822(&date).map(|d| d.with_timezone(&Utc)).map_err(|e| SalesforceError::Protocol {
            context: "reading Salesforce's clock".into(),
            message: format!("bad Date header `{date}`: {e}"),
        })
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
        let response = self.send(Method::POST, "/jobs/query", &[], Some(body), "application/json", None).await?;
        json_body(response, "creating a query job").await
    }

    pub async fn job_info(&self, job_id: &str) -> Result<JobInfo, SalesforceError> {
        let path = format!("/jobs/query/{job_id}");
        let response = self.send(Method::GET, &path, &[], None, "application/json", Some(job_id)).await?;
        json_body(response, &format!("polling query job {job_id}")).await
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
        let path = format!("/jobs/query/{job_id}");
        let body = json!({ "state": "Aborted" });
        self.send(Method::PATCH, &path, &[], Some(body), "application/json", Some(job_id)).await?;
        Ok(())
    }

    /// Fetches one results page. `locator` is the previous page's `Sforce-Locator`.
    pub async fn results_page(
        &self,
        job_id: &str,
        locator: Option<&str>,
        max_records: u32,
        number: u32,
    ) -> Result<Page, SalesforceError> {
        let path = format!("/jobs/query/{job_id}/results");
        let mut query = vec![("maxRecords", max_records.to_string())];
        if let Some(locator) = locator {
            query.push(("locator", locator.to_string()));
        }
        let response = self.send(Method::GET, &path, &query, None, "text/csv", Some(job_id)).await?;
        let header_text = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let next = header_text("Sforce-Locator");
        let declared = header_text("Sforce-NumberOfRecords");
        let context = format!("downloading page {number} of query job {job_id}");
        let body = response
            .bytes()
            .await
            .map_err(|e| SalesforceError::Transport { context: context.clone(), message: e.to_string() })?;
        let frame =
            parse_csv_page(&body).map_err(|message| SalesforceError::Protocol { context: context.clone(), message })?;
        if let Some(declared) = declared {
            let declared: usize = declared.trim().parse().map_err(|_| SalesforceError::Protocol {
                context: context.clone(),
                message: format!("Sforce-NumberOfRecords `{declared}` is not a number"),
            })?;
            if declared != frame.height() {
                return Err(SalesforceError::Protocol {
                    context,
                    message: format!(
                        "Sforce-NumberOfRecords says {declared} rows but the page holds {}",
                        frame.height()
                    ),
                });
            }
        }
        let next_locator = next.filter(|l| !l.is_empty() && l != "null");
        Ok(Page { number, frame, next_locator })
    }
}

async fn json_body<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    context: &str,
) -> Result<T, SalesforceError> {
    let bytes = response
        .bytes()
        .await
        .map_err(|e| SalesforceError::Transport { context: context.into(), message: e.to_string() })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| SalesforceError::Protocol { context: context.into(), message: e.to_string() })
}

/// Turns a non-2xx response into an error carrying Salesforce's code and message.
async fn api_error(response: reqwest::Response, job_id: Option<&str>) -> SalesforceError {
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
        _ => (
            status.canonical_reason().unwrap_or("error").to_uppercase().replace(' ', "_"),
            String::from_utf8_lossy(&body).chars().take(200).collect::<String>().trim().to_string(),
        ),
    };
    let hint = hint_for(status.as_u16(), &error_code, &message);
    SalesforceError::Api { status: status.as_u16(), error_code, message, job_id: job_id.map(str::to_string), hint }
}
