//! The HTTP surface: axum routes for the OAuth token endpoint and Bulk API
//! 2.0 query jobs, plus a middleware that logs every request, enforces the
//! bearer token on `/services/data`, and adds the `Date` (sandbox clock) and
//! `Sforce-Limit-Info` headers.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::csv_out::{ColumnDelimiter, CsvStyle, LineEnding};
use super::data::{http_date, make_id};
use super::describe;
use super::encoding::{base64_decode, base64_encode, parse_form};
use super::jobs::{ApiError, NewQueryJob, Operation, PageRequest};
use super::{LoggedRequest, Sandbox};

/// Daily API request allowance reported in `Sforce-Limit-Info` and `/limits`.
const API_REQUEST_LIMIT: u64 = 15_000;
const QUERY_JOB_LIMIT: u64 = 10_000;
/// Bodies are buffered for the request log; nothing legitimate is this big.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
const JSON_CONTENT_TYPE: &str = "application/json;charset=UTF-8";
const CSV_CONTENT_TYPE: &str = "text/csv; charset=UTF-8";

#[derive(Clone)]
struct App {
    sandbox: Sandbox,
    /// What this listener is reachable at; becomes the token's `instance_url`.
    base_url: Arc<str>,
}

pub(crate) fn router(sandbox: Sandbox, base_url: String) -> Router {
    let app = App { sandbox, base_url: base_url.into() };
    Router::new()
        .route("/services/oauth2/token", post(token))
        .route("/services/data/{version}/jobs/query", post(create_job).get(list_jobs))
        .route("/services/data/{version}/jobs/query/{job_id}", get(get_job).patch(abort_job).delete(delete_job))
        .route("/services/data/{version}/jobs/query/{job_id}/results", get(job_results))
        .route("/services/data/{version}/limits", get(limits))
        .route("/services/data/{version}/sobjects", get(global_describe))
        .route("/services/data/{version}/sobjects/{object}/describe", get(describe_object))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), envelope))
        .with_state(app.clone())
        .merge(super::admin::routes(app.sandbox))
}

// ------------------------------------------------------------ responses ---

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, JSON_CONTENT_TYPE)], bytes).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorItem<'a> {
    error_code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &[ErrorItem { error_code: self.code, message: &self.message }])
    }
}

fn api_error(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "API_ERROR", message)
}

/// Salesforce reports JSON problems with a Jackson-style position suffix.
fn bad_json(e: &serde_json::Error) -> ApiError {
    let what = if e.is_data() {
        "Value does not match expected type".to_owned()
    } else {
        let full = e.to_string();
        // serde_json appends its own "at line L column C"; use ours instead.
        match full.rfind(" at line ") {
            Some(i) => full.get(..i).unwrap_or(&full).to_owned(),
            None => full,
        }
    };
    api_error(format!("{what} at [line:{}, column:{}]", e.line(), e.column()))
}

/// `v62.0` → `62.0`; anything else is not a Salesforce API version.
fn parse_version(segment: &str) -> Result<String, ApiError> {
    let version = segment.strip_prefix('v').ok_or_else(ApiError::not_found)?;
    let (major, minor) = version.split_once('.').ok_or_else(ApiError::not_found)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(major) && major.len() <= 3 && digits(minor) && minor.len() == 1 {
        Ok(version.to_owned())
    } else {
        Err(ApiError::not_found())
    }
}

// ----------------------------------------------------------- middleware ---

impl Sandbox {
    fn log_request(&self, request: LoggedRequest) {
        self.lock().log.push(request);
    }

    /// Counts one data request and returns the running total.
    fn count_api_request(&self) -> u64 {
        let mut state = self.lock();
        state.api_requests += 1;
        state.api_requests
    }

    fn has_session(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        // REST also accepts the legacy `OAuth <token>` scheme.
        let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("OAuth ")).map(str::trim);
        token.is_some_and(|t| self.lock().tokens.contains(t))
    }
}

async fn envelope(State(app): State<App>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await;
    app.sandbox.log_request(LoggedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        body: body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default(),
    });
    let path = parts.uri.path();
    let is_data = path == "/services/data" || path.starts_with("/services/data/");
    let usage = is_data.then(|| app.sandbox.count_api_request());

    let mut response = match body {
        Err(_) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "API_ERROR",
            format!("Request body exceeds {MAX_BODY_BYTES} bytes"),
        )
        .into_response(),
        Ok(_) if is_data && !app.sandbox.has_session(&parts.headers) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "INVALID_SESSION_ID", "Session expired or invalid").into_response()
        }
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
    };

    let headers = response.headers_mut();
    // Clients plan extraction windows from this header, so it must be the
    // sandbox clock; hyper only adds its wall-clock Date when none is set.
    if let Ok(date) = HeaderValue::from_str(&http_date(app.sandbox.now())) {
        headers.insert(header::DATE, date);
    }
    if let Some(used) = usage
        && let Ok(value) = HeaderValue::from_str(&format!("api-usage={used}/{API_REQUEST_LIMIT}"))
    {
        headers.insert(HeaderName::from_static("sforce-limit-info"), value);
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED", format!("HTTP Method '{method}' not allowed."))
}

// ---------------------------------------------------------------- OAuth ---

#[derive(Serialize)]
struct TokenResponse {
    access_token: String,
    signature: String,
    scope: &'static str,
    instance_url: String,
    id: String,
    token_type: &'static str,
    issued_at: String,
}

#[derive(Serialize)]
struct OAuthError {
    error: &'static str,
    error_description: &'static str,
}

fn oauth_error(error: &'static str, error_description: &'static str) -> Response {
    let mut response = json_response(StatusCode::BAD_REQUEST, &OAuthError { error, error_description });
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `Authorization: Basic base64(urlencode(id):urlencode(secret))`, per
/// RFC 6749 §2.3.1 (the form-encoding is what OAuth libraries send).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?.trim();
    let decoded = String::from_utf8(base64_decode(encoded)?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((super::encoding::form_decode(id), super::encoding::form_decode(secret)))
}

const TOKEN_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._";

impl Sandbox {
    fn issue_token(
        &self,
        client_id: Option<&str>,
        client_secret: Option<&str>,
        base_url: &str,
    ) -> Result<TokenResponse, (&'static str, &'static str)> {
        let mut state = self.lock();
        if client_id != Some(state.config.client_id.as_str()) {
            return Err(("invalid_client_id", "client identifier invalid"));
        }
        if client_secret != Some(state.config.client_secret.as_str()) {
            return Err(("invalid_client", "invalid client credentials"));
        }
        let org = make_id("00D", 1);
        let org15 = org.get(..15).unwrap_or(&org);
        let rng = &mut state.token_rng;
        let opaque: String = (0..96).map(|_| char::from(TOKEN_CHARS[rng.usize(..TOKEN_CHARS.len())])).collect();
        // Not a real HMAC (the sandbox has no crypto dependency); clients
        // don't verify it, and its shape matches.
        let signature_bytes: Vec<u8> = (0..32).map(|_| rng.u8(..)).collect();
        let access_token = format!("{org15}!{opaque}");
        state.tokens.insert(access_token.clone());
        Ok(TokenResponse {
            access_token,
            signature: base64_encode(&signature_bytes, true),
            scope: "api",
            instance_url: base_url.to_owned(),
            id: format!("{base_url}/id/{org}/{}", make_id("005", 1)),
            token_type: "Bearer",
            issued_at: state.clock.timestamp_millis().to_string(),
        })
    }
}

async fn token(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let form = parse_form(&String::from_utf8_lossy(&body));
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if field("grant_type") != Some("client_credentials") {
        return oauth_error("unsupported_grant_type", "grant type not supported");
    }
    let basic = basic_credentials(&headers);
    let client_id = field("client_id").or(basic.as_ref().map(|(id, _)| id.as_str()));
    let client_secret = field("client_secret").or(basic.as_ref().map(|(_, s)| s.as_str()));
    match app.sandbox.issue_token(client_id, client_secret, &app.base_url) {
        Ok(token) => json_response(StatusCode::OK, &token),
        Err((error, description)) => oauth_error(error, description),
    }
}

// ------------------------------------------------------------ query jobs ---

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateJobBody {
    operation: Option<String>,
    query: Option<String>,
    content_type: Option<String>,
    column_delimiter: Option<String>,
    line_ending: Option<String>,
}

async fn create_job(State(app): State<App>, Path(version): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let api_version = parse_version(&version)?;
    let request: CreateJobBody = serde_json::from_slice(&body).map_err(|e| bad_json(&e))?;
    let operation = match request.operation.as_deref() {
        Some(op) => Operation::parse(op)
            .ok_or_else(|| api_error(format!("Invalid operation '{op}'; query jobs take 'query' or 'queryAll'")))?,
        None => return Err(api_error("Missing required field: operation")),
    };
    let query = request.query.ok_or_else(|| api_error("Missing required field: query"))?;
    if let Some(ct) = request.content_type.as_deref()
        && ct != "CSV"
    {
        return Err(api_error(format!("Invalid contentType '{ct}'; only CSV is supported")));
    }
    let delimiter = match request.column_delimiter.as_deref() {
        None => ColumnDelimiter::Comma,
        Some(name) => ColumnDelimiter::parse(name).ok_or_else(|| {
            api_error(format!(
                "Invalid columnDelimiter '{name}'; expected one of BACKQUOTE, CARET, COMMA, \
                 PIPE, SEMICOLON, TAB"
            ))
        })?,
    };
    let line_ending = match request.line_ending.as_deref() {
        None => LineEnding::Lf,
        Some(name) => LineEnding::parse(name)
            .ok_or_else(|| api_error(format!("Invalid lineEnding '{name}'; expected LF or CRLF")))?,
    };
    let info = app
        .sandbox
        .create_query_job(NewQueryJob { api_version, operation, query, style: CsvStyle { delimiter, line_ending } })
        .await?;
    Ok(json_response(StatusCode::OK, &info))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JobList<T> {
    done: bool,
    records: Vec<T>,
    next_records_url: Option<String>,
}

async fn list_jobs(State(app): State<App>, Path(version): Path<String>) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let list = JobList { done: true, records: app.sandbox.list_query_jobs(), next_records_url: None };
    Ok(json_response(StatusCode::OK, &list))
}

async fn get_job(
    State(app): State<App>,
    Path((version, job_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let info = app.sandbox.poll_query_job(&job_id)?;
    Ok(json_response(StatusCode::OK, &info))
}

#[derive(Deserialize)]
struct StateChange {
    state: Option<String>,
}

async fn abort_job(
    State(app): State<App>,
    Path((version, job_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let change: StateChange = serde_json::from_slice(&body).map_err(|e| bad_json(&e))?;
    if change.state.as_deref() != Some("Aborted") {
        return Err(api_error(format!(
            "Invalid state change '{}'; a query job can only be set to Aborted",
            change.state.as_deref().unwrap_or("null")
        )));
    }
    let info = app.sandbox.abort_query_job(&job_id)?;
    Ok(json_response(StatusCode::OK, &info))
}

async fn delete_job(
    State(app): State<App>,
    Path((version, job_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    parse_version(&version)?;
    app.sandbox.delete_query_job(&job_id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn job_results(
    State(app): State<App>,
    Path((version, job_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let api_version = parse_version(&version)?;
    let params = parse_form(query.as_deref().unwrap_or_default());
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let max_records = match param("maxRecords") {
        None => None,
        Some(text) => Some(
            text.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| api_error(format!("maxRecords must be a positive integer, got '{text}'")))?,
        ),
    };
    let page = app
        .sandbox
        .results_page(PageRequest {
            api_version: &api_version,
            job_id: &job_id,
            max_records,
            locator: param("locator"),
        })
        .await?;
    let mut response = (StatusCode::OK, page.body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CSV_CONTENT_TYPE));
    for (name, value) in [("sforce-locator", page.locator), ("sforce-numberofrecords", page.records.to_string())] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    Ok(response)
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Limit {
    max: u64,
    remaining: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Limits {
    daily_api_requests: Limit,
    daily_bulk_v2_query_jobs: Limit,
    #[serde(rename = "DailyBulkV2QueryFileStorageMB")]
    daily_bulk_v2_query_file_storage_mb: Limit,
}

async fn limits(State(app): State<App>, Path(version): Path<String>) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let (requests, jobs) = {
        let state = app.sandbox.lock();
        (state.api_requests, state.jobs_created)
    };
    let limits = Limits {
        daily_api_requests: Limit { max: API_REQUEST_LIMIT, remaining: API_REQUEST_LIMIT.saturating_sub(requests) },
        daily_bulk_v2_query_jobs: Limit { max: QUERY_JOB_LIMIT, remaining: QUERY_JOB_LIMIT.saturating_sub(jobs) },
        daily_bulk_v2_query_file_storage_mb: Limit { max: 976_562, remaining: 976_562 },
    };
    Ok(json_response(StatusCode::OK, &limits))
}

async fn global_describe(State(app): State<App>, Path(version): Path<String>) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let body = {
        let state = app.sandbox.lock();
        describe::global(state.tables.iter().map(|t| &t.schema))
    };
    Ok(json_response(StatusCode::OK, &body))
}

async fn describe_object(
    State(app): State<App>,
    Path((version, object)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let body = {
        let state = app.sandbox.lock();
        let table = state.table(&object).ok_or_else(ApiError::not_found)?;
        describe::object(&table.schema)
    };
    Ok(json_response(StatusCode::OK, &body))
}

#[cfg(test)]
mod tests;
