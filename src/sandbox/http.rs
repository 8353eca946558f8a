//! The HTTP surface: axum routes for the OAuth token endpoint and Bulk API
//! 2.0 query jobs, plus a middleware that logs every request, enforces the
//! bearer token on `/services/data`, and adds the `Date` (sandbox clock) and
//! `Sforce-Limit-Info` headers.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::csv_out::{ColumnDelimiter, CsvStyle, LineEnding};
use super::data::{http_date, make_id};
use super::describe;
use super::encoding::{base64_decode, base64_encode, parse_form};
use super::faults::{Endpoint, ErrorBody, FaultAction, PageFault};
use super::ingest::{IngestOperation, NewIngestJob, ResultKind};
use super::jobs::{ApiError, NewQueryJob, Operation, PageRequest};
use super::{LoggedRequest, Sandbox};

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
    {
        let mut state = sandbox.lock();
        if state.config.audience.is_empty() {
            state.config.audience = base_url.clone();
        }
    }
    let app = App { sandbox, base_url: base_url.into() };
    Router::new()
        .route("/services/oauth2/token", post(token))
        .route("/services/oauth2/authorize", get(authorize))
        .route("/services/oauth2/revoke", post(revoke))
        .route("/services/data/{version}/jobs/query", post(create_job).get(list_jobs))
        .route("/services/data/{version}/jobs/query/{job_id}", get(get_job).patch(abort_job).delete(delete_job))
        .route("/services/data/{version}/jobs/query/{job_id}/results", get(job_results))
        .route("/services/data", get(versions))
        .route("/services/data/", get(versions))
        .route("/services/data/{version}/jobs/ingest", post(create_ingest_job).get(list_ingest_jobs))
        .route(
            "/services/data/{version}/jobs/ingest/{job_id}",
            get(get_ingest_job).patch(patch_ingest_job).delete(delete_ingest_job),
        )
        .route("/services/data/{version}/jobs/ingest/{job_id}/batches", axum::routing::put(upload_ingest_data))
        .route("/services/data/{version}/jobs/ingest/{job_id}/{results}", get(ingest_results))
        .route("/services/data/{version}/jobs/ingest/{job_id}/{results}/", get(ingest_results))
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

    /// Counts one data request against the daily allowance; returns (used,
    /// max) and whether the allowance was already spent, in which case the
    /// request is refused and not counted (as Salesforce refuses, not bills, it).
    fn count_api_request(&self, exempt: bool) -> (u64, u64, bool) {
        let mut state = self.lock();
        let spent = state.api_requests >= state.api_request_limit;
        if !spent || exempt {
            state.api_requests += 1;
        }
        (state.api_requests, state.api_request_limit, spent && !exempt)
    }

    fn has_session(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        // REST also accepts the legacy `OAuth <token>` scheme.
        let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("OAuth ")).map(str::trim);
        token.is_some_and(|t| self.lock().tokens.contains(t))
    }

    /// The sandbox clock as the `Date` header tells it: off by any injected
    /// skew, saturating rather than failing on an absurd one.
    fn date_header_time(&self) -> DateTime<Utc> {
        let state = self.lock();
        let skew = state.faults.date_skew();
        state.clock.checked_add_signed(skew).unwrap_or(if skew < TimeDelta::zero() {
            DateTime::<Utc>::MIN_UTC
        } else {
            DateTime::<Utc>::MAX_UTC
        })
    }
}

async fn envelope(State(app): State<App>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await;
    app.sandbox.log_request(LoggedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        body: body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default(),
        accept_encoding: parts.headers.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).map(str::to_owned),
    });
    let path = parts.uri.path().to_owned();
    // The versions list (`/services/data/`) needs no session and is not
    // counted, like Salesforce's.
    let is_data = path.starts_with("/services/data/") && path != "/services/data/";
    let endpoint = Endpoint::classify(parts.method.as_str(), &path);
    let fault = app.sandbox.lock().faults.hit(parts.method.as_str(), &path);
    // /limits stays readable when the allowance is spent, so a client can
    // find out why it is being refused.
    let usage = is_data.then(|| app.sandbox.count_api_request(endpoint == Endpoint::Limits));

    let mut response = match (body, fault) {
        (Err(_), _) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "API_ERROR",
            format!("Request body exceeds {MAX_BODY_BYTES} bytes"),
        )
        .into_response(),
        (Ok(_), Some(FaultAction::ExpireSession)) => {
            app.sandbox.expire_sessions();
            ApiError::new(StatusCode::UNAUTHORIZED, "INVALID_SESSION_ID", "Session expired or invalid").into_response()
        }
        (Ok(_), Some(FaultAction::RestApiScope)) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "This session is not valid for use with the REST API",
        )
        .into_response(),
        (Ok(_), Some(FaultAction::LimitExceeded)) => limit_exceeded(),
        (Ok(_), Some(FaultAction::Status { code, body })) => injected_status(code, body),
        (Ok(_), _) if usage.is_some_and(|(_, _, refused)| refused) => limit_exceeded(),
        (Ok(_), _) if is_data && !app.sandbox.has_session(&parts.headers) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "INVALID_SESSION_ID", "Session expired or invalid").into_response()
        }
        (Ok(bytes), fault) => {
            if let Some(FaultAction::Delay(pause)) = fault {
                tokio::time::sleep(pause).await;
            }
            // Only the results handler knows the page well enough to spoil it.
            if let Some(FaultAction::Page(page_fault)) = fault {
                parts.extensions.insert(page_fault);
            }
            let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
            if fault == Some(FaultAction::Drop) { drop_mid_body(response).await } else { response }
        }
    };

    let headers = response.headers_mut();
    // Clients plan extraction windows from this header, so it must be the
    // sandbox clock (skewed only on request); hyper only adds its wall-clock
    // Date when none is set.
    if let Ok(date) = HeaderValue::from_str(&http_date(app.sandbox.date_header_time())) {
        headers.insert(header::DATE, date);
    }
    if let Some((used, max, _)) = usage
        && let Ok(value) = HeaderValue::from_str(&format!("api-usage={used}/{max}"))
    {
        headers.insert(HeaderName::from_static("sforce-limit-info"), value);
    }
    response
}

fn limit_exceeded() -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.").into_response()
}

/// An error status as an edge, a proxy or Salesforce itself would send it.
fn injected_status(code: u16, body: ErrorBody) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    match body {
        ErrorBody::Empty => status.into_response(),
        ErrorBody::Html => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=UTF-8")],
            format!(
                "<html><head><title>{code} Service Unavailable</title></head><body><h1>We are down for \
                 maintenance</h1><p>Please try again later.</p></body></html>"
            ),
        )
            .into_response(),
        ErrorBody::Json => {
            let (error_code, message) = match code {
                503 => ("SERVER_UNAVAILABLE", "Server temporarily unavailable; please retry."),
                429 => ("REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded."),
                _ => (
                    "UNKNOWN_EXCEPTION",
                    "An unexpected error occurred. Please include this ErrorId if you contact support: 1234567-89 (-1)",
                ),
            };
            ApiError::new(status, error_code, message).into_response()
        }
    }
}

/// Sends the response's headers and the first half of its body, then fails
/// the body stream, which makes hyper drop the connection mid-transfer.
async fn drop_mid_body(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES).await.unwrap_or_default();
    let half = bytes.slice(..bytes.len() / 2);
    parts.headers.remove(header::CONTENT_LENGTH);
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(half),
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "sandbox fault: connection dropped")),
    ];
    Response::from_parts(parts, Body::from_stream(futures_util::stream::iter(chunks)))
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
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
    scope: &'static str,
    instance_url: String,
    id: String,
    token_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    issued_at: Option<String>,
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

type OAuthFailure = (&'static str, &'static str);

/// What a grant produces besides the access token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// client_credentials, refresh_token: the full §4.2 shape, no refresh token.
    Plain,
    /// authorization_code: also a refresh token.
    WithRefresh,
    /// JWT bearer: the short shape (no signature, no issued_at).
    Jwt,
}

impl Sandbox {
    fn check_client(&self, client_id: Option<&str>, client_secret: Option<&str>) -> Result<(), OAuthFailure> {
        let state = self.lock();
        if client_id != Some(state.config.client_id.as_str()) {
            return Err(("invalid_client_id", "client identifier invalid"));
        }
        if client_secret != Some(state.config.client_secret.as_str()) {
            return Err(("invalid_client", "invalid client credentials"));
        }
        Ok(())
    }

    fn random_token(&self, len: usize) -> String {
        let mut state = self.lock();
        let rng = &mut state.token_rng;
        (0..len).map(|_| char::from(TOKEN_CHARS[rng.usize(..TOKEN_CHARS.len())])).collect()
    }

    fn mint_token(&self, grant: Grant, base_url: &str) -> TokenResponse {
        let org = make_id("00D", 1);
        let org15 = org.get(..15).unwrap_or(&org).to_owned();
        let access_token = format!("{org15}!{}", self.random_token(96));
        let refresh_token = (grant == Grant::WithRefresh).then(|| format!("5Aep861{}", self.random_token(80)));
        let mut state = self.lock();
        state.tokens.insert(access_token.clone());
        state.issued.push(access_token.clone());
        if let Some(refresh) = &refresh_token {
            state.refresh_tokens.insert(refresh.clone());
            state.issued.push(refresh.clone());
        }
        // Not a real HMAC; clients don't verify it, and its shape matches.
        let signature_bytes: Vec<u8> = (0..32).map(|_| state.token_rng.u8(..)).collect();
        let full = grant != Grant::Jwt;
        TokenResponse {
            access_token,
            refresh_token,
            signature: full.then(|| base64_encode(&signature_bytes, true)),
            scope: if grant == Grant::WithRefresh { "refresh_token api" } else { "api" },
            instance_url: base_url.to_owned(),
            id: format!("{base_url}/id/{org}/{}", make_id("005", 1)),
            token_type: "Bearer",
            issued_at: full.then(|| state.clock.timestamp_millis().to_string()),
        }
    }

    /// A refresh token as a past `auth login` would have left, for tests of
    /// the refresh_token flow.
    pub fn issue_refresh_token(&self) -> String {
        let token = format!("5Aep861{}", self.random_token(80));
        let mut state = self.lock();
        state.refresh_tokens.insert(token.clone());
        state.issued.push(token.clone());
        token
    }

    /// Revokes every refresh token, as an admin revoking the app's access would.
    pub fn revoke_refresh_tokens(&self) {
        self.lock().refresh_tokens.clear();
    }

    fn jwt_grant(&self, assertion: &str) -> Result<(), OAuthFailure> {
        #[derive(Deserialize)]
        struct Claims {
            iss: String,
            sub: String,
            aud: String,
        }
        let (key, client_id, username) = {
            let state = self.lock();
            (state.config.jwt_public_key_pem.clone(), state.config.client_id.clone(), state.config.username.clone())
        };
        let Some(pem) = key else {
            return Err(("invalid_grant", "invalid assertion"));
        };
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|_| ("invalid_grant", "invalid assertion"))?;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        // Checked below, so each mistake gets Salesforce's own answer.
        validation.validate_aud = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        // exp is checked against the wall clock, like the client's: the
        // sandbox clock only drives data and windows.
        let claims = jsonwebtoken::decode::<Claims>(assertion, &key, &validation)
            .map_err(|_| ("invalid_grant", "invalid assertion"))?
            .claims;
        if claims.iss != client_id {
            return Err(("invalid_client_id", "client identifier invalid"));
        }
        let base_url = self.lock().config.audience.clone();
        let audiences = ["https://login.salesforce.com", "https://test.salesforce.com", base_url.as_str()];
        if !audiences.contains(&claims.aud.trim_end_matches('/')) {
            return Err(("invalid_grant", "audience is invalid"));
        }
        if claims.sub != username {
            return Err(("invalid_grant", "user hasn't approved this consumer"));
        }
        Ok(())
    }

    fn code_grant(
        &self,
        code: Option<&str>,
        redirect_uri: Option<&str>,
        verifier: Option<&str>,
    ) -> Result<(), OAuthFailure> {
        let pending = code.and_then(|c| self.lock().auth_codes.remove(c));
        let Some(pending) = pending else {
            return Err(("invalid_grant", "invalid authorization code"));
        };
        if redirect_uri != Some(pending.redirect_uri.as_str()) {
            return Err(("invalid_grant", "redirect_uri must match configuration"));
        }
        if let Some(challenge) = pending.challenge {
            let Some(verifier) = verifier else {
                return Err(("invalid_grant", "invalid code verifier"));
            };
            use sha2::Digest;
            let digest = sha2::Sha256::digest(verifier.as_bytes());
            if base64url(&digest) != challenge {
                return Err(("invalid_request", "invalid code verifier"));
            }
        }
        Ok(())
    }
}

/// Unpadded base64url, as PKCE challenges are written.
fn base64url(bytes: &[u8]) -> String {
    base64_encode(bytes, false).replace('+', "-").replace('/', "_")
}

async fn token(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let form = parse_form(&String::from_utf8_lossy(&body));
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let basic = basic_credentials(&headers);
    let client_id = field("client_id").or(basic.as_ref().map(|(id, _)| id.as_str()));
    let client_secret = field("client_secret").or(basic.as_ref().map(|(_, s)| s.as_str()));
    let sandbox = &app.sandbox;
    let outcome = match field("grant_type") {
        Some("client_credentials") => sandbox.check_client(client_id, client_secret).map(|()| Grant::Plain),
        Some("refresh_token") => sandbox.check_client(client_id, client_secret).and_then(|()| {
            let known = field("refresh_token").is_some_and(|t| sandbox.lock().refresh_tokens.contains(t));
            if known { Ok(Grant::Plain) } else { Err(("invalid_grant", "expired access/refresh token")) }
        }),
        Some("authorization_code") => sandbox
            .check_client(client_id, client_secret)
            .and_then(|()| sandbox.code_grant(field("code"), field("redirect_uri"), field("code_verifier")))
            .map(|()| Grant::WithRefresh),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => match field("assertion") {
            Some(assertion) => sandbox.jwt_grant(assertion).map(|()| Grant::Jwt),
            None => Err(("invalid_request", "assertion is required")),
        },
        _ => Err(("unsupported_grant_type", "grant type not supported")),
    };
    match outcome {
        Ok(grant) => json_response(StatusCode::OK, &sandbox.mint_token(grant, &app.base_url)),
        Err((error, description)) => oauth_error(error, description),
    }
}

/// The web-server flow's authorize page, approved at once (there is no
/// user to ask): redirects to `redirect_uri` with a single-use code.
/// Only loopback redirect URIs are accepted, as a desktop app registers.
async fn authorize(State(app): State<App>, RawQuery(query): RawQuery) -> Response {
    let params = parse_form(query.as_deref().unwrap_or_default());
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let client_id = app.sandbox.lock().config.client_id.clone();
    if param("client_id") != Some(client_id.as_str()) {
        return oauth_error("invalid_client_id", "client identifier invalid");
    }
    let Some(redirect_uri) = param("redirect_uri") else {
        return oauth_error("invalid_request", "missing required parameter: redirect_uri");
    };
    let loopback = ["http://localhost:", "http://127.0.0.1:", "http://[::1]:"];
    if !loopback.iter().any(|p| redirect_uri.starts_with(p)) {
        return oauth_error("redirect_uri_mismatch", "redirect_uri must match configuration");
    }
    if param("response_type") != Some("code") {
        return oauth_error("unsupported_response_type", "response type not supported");
    }
    if param("code_challenge_method").is_some_and(|m| m != "S256") {
        return oauth_error("invalid_request", "code_challenge_method must be S256");
    }
    let code = format!("aPrx{}", app.sandbox.random_token(48));
    app.sandbox.lock().auth_codes.insert(
        code.clone(),
        super::PendingCode {
            challenge: param("code_challenge").map(str::to_owned),
            redirect_uri: redirect_uri.to_owned(),
        },
    );
    let mut location = format!("{redirect_uri}?code={}", form_encode(&code));
    if let Some(state) = param("state") {
        location.push_str(&format!("&state={}", form_encode(state)));
    }
    match HeaderValue::from_str(&location) {
        Ok(value) => (StatusCode::FOUND, [(header::LOCATION, value)]).into_response(),
        Err(_) => oauth_error("invalid_request", "redirect_uri is not a valid URL"),
    }
}

/// Revokes an access or refresh token: 200 with an empty body, or 400
/// `invalid_token` for a token the org does not know.
async fn revoke(State(app): State<App>, body: Bytes) -> Response {
    let form = parse_form(&String::from_utf8_lossy(&body));
    let token = form.iter().find(|(k, _)| k == "token").map(|(_, v)| v.clone()).unwrap_or_default();
    let mut state = app.sandbox.lock();
    let known = state.tokens.remove(&token) | state.refresh_tokens.remove(&token);
    drop(state);
    if known { StatusCode::OK.into_response() } else { oauth_error("invalid_token", "invalid token") }
}

fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

// ----------------------------------------------------------- ingest jobs ---

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateIngestBody {
    object: Option<String>,
    operation: Option<String>,
    external_id_field_name: Option<String>,
    content_type: Option<String>,
    column_delimiter: Option<String>,
    line_ending: Option<String>,
}

async fn create_ingest_job(
    State(app): State<App>,
    Path(version): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let api_version = parse_version(&version)?;
    let request: CreateIngestBody = serde_json::from_slice(&body).map_err(|e| bad_json(&e))?;
    let object = request.object.ok_or_else(|| api_error("Missing required field: object"))?;
    let operation = match request.operation.as_deref() {
        Some(op) => IngestOperation::parse(op).ok_or_else(|| {
            api_error(format!("Invalid operation '{op}'; use insert, update, upsert, delete or hardDelete"))
        })?,
        None => return Err(api_error("Missing required field: operation")),
    };
    if let Some(ct) = request.content_type.as_deref()
        && ct != "CSV"
    {
        return Err(api_error(format!("Invalid contentType '{ct}'; only CSV is supported")));
    }
    let delimiter = match request.column_delimiter.as_deref() {
        None => ColumnDelimiter::Comma,
        Some(name) => {
            ColumnDelimiter::parse(name).ok_or_else(|| api_error(format!("Invalid columnDelimiter '{name}'")))?
        }
    };
    let line_ending = match request.line_ending.as_deref() {
        None => LineEnding::Lf,
        Some(name) => LineEnding::parse(name).ok_or_else(|| api_error(format!("Invalid lineEnding '{name}'")))?,
    };
    let info = app.sandbox.create_ingest_job(NewIngestJob {
        api_version,
        object,
        operation,
        external_id: request.external_id_field_name,
        style: CsvStyle { delimiter, line_ending },
    })?;
    Ok(json_response(StatusCode::OK, &info))
}

async fn list_ingest_jobs(State(app): State<App>, Path(version): Path<String>) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let list = JobList { done: true, records: app.sandbox.list_ingest_jobs(), next_records_url: None };
    Ok(json_response(StatusCode::OK, &list))
}

async fn get_ingest_job(
    State(app): State<App>,
    Path((version, job_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    parse_version(&version)?;
    Ok(json_response(StatusCode::OK, &app.sandbox.poll_ingest_job(&job_id)?))
}

async fn patch_ingest_job(
    State(app): State<App>,
    Path((version, job_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let change: StateChange = serde_json::from_slice(&body).map_err(|e| bad_json(&e))?;
    let to = change.state.unwrap_or_default();
    Ok(json_response(StatusCode::OK, &app.sandbox.change_ingest_state(&job_id, &to)?))
}

async fn delete_ingest_job(
    State(app): State<App>,
    Path((version, job_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    parse_version(&version)?;
    app.sandbox.delete_ingest_job(&job_id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn upload_ingest_data(
    State(app): State<App>,
    Path((version, job_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| api_error("InvalidBatch : the uploaded CSV is not valid UTF-8"))?;
    app.sandbox.upload_ingest_data(&job_id, text)?;
    Ok(StatusCode::CREATED.into_response())
}

async fn ingest_results(
    State(app): State<App>,
    Path((version, job_id, results)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    parse_version(&version)?;
    let kind = match results.as_str() {
        "successfulResults" => ResultKind::Successful,
        "failedResults" => ResultKind::Failed,
        "unprocessedrecords" => ResultKind::Unprocessed,
        _ => return Err(ApiError::not_found()),
    };
    let body = app.sandbox.ingest_results(&job_id, kind)?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, CSV_CONTENT_TYPE)], body).into_response())
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
    request_headers: HeaderMap,
    fault: Option<Extension<PageFault>>,
) -> Result<Response, ApiError> {
    let fault = fault.map(|Extension(fault)| fault);
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
            fault,
        })
        .await?;
    // As Salesforce: gzip if and only if the client asked for it.
    let gzip = request_headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| coding.split(';').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("gzip")));
    let mut csv = page.body.into_bytes();
    if let Some(PageFault::Truncate(at)) = fault {
        csv.truncate(at);
    }
    let (mut sent, gzipped) = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        match std::io::Write::write_all(&mut encoder, &csv).and_then(|()| encoder.finish()) {
            Ok(bytes) => (bytes, true),
            // Salesforce may decline to compress; so may we.
            Err(_) => (csv, false),
        }
    } else {
        (csv, false)
    };
    // Cut after compression, the HTTP framing (Content-Length) stays whole
    // and only the gzip stream inside it is broken.
    if let Some(PageFault::TruncateWire(at)) = fault {
        sent.truncate(at);
    }
    let mut response = (StatusCode::OK, sent).into_response();
    let headers = response.headers_mut();
    if gzipped {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CSV_CONTENT_TYPE));
    for (name, value) in [("sforce-locator", page.locator), ("sforce-numberofrecords", page.records.to_string())] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    Ok(response)
}

/// API versions the sandbox answers to; Bulk API 2.0 query needs v47.0+.
const FIRST_VERSION: u32 = 47;
const LAST_VERSION: u32 = 66;

#[derive(Serialize)]
struct VersionEntry {
    label: String,
    url: String,
    version: String,
}

async fn versions() -> Response {
    let list: Vec<VersionEntry> = (FIRST_VERSION..=LAST_VERSION)
        .map(|v| VersionEntry {
            label: format!("API {v}.0"),
            url: format!("/services/data/v{v}.0"),
            version: format!("{v}.0"),
        })
        .collect();
    json_response(StatusCode::OK, &list)
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
    let (requests, max_requests, jobs) = {
        let state = app.sandbox.lock();
        (state.api_requests, state.api_request_limit, state.jobs_created)
    };
    let limits = Limits {
        daily_api_requests: Limit { max: max_requests, remaining: max_requests.saturating_sub(requests) },
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
