//! OAuth 2.0 against Salesforce's token endpoint, through the `oauth2` crate
//! where it has the grant (client credentials, refresh token, authorization
//! code with PKCE); the JWT bearer grant (RFC 7523), which it lacks, is a
//! signed assertion POSTed by hand.
//!
//! oauth2's own reqwest integration pins reqwest 0.12; we hand it a closure
//! over our reqwest 0.13 client instead, so the process has one HTTP stack.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    ExtraTokenFields, PkceCodeChallenge, RedirectUrl, RefreshToken, RequestTokenError, Scope, StandardRevocableToken,
    StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::SalesforceError;
use crate::config::{AuthFlow, SalesforceConnection, Secret};

/// Salesforce adds these to the standard token response; `instance_url` is
/// where every data call must go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SalesforceTokenFields {
    pub instance_url: String,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub issued_at: Option<String>,
}

impl ExtraTokenFields for SalesforceTokenFields {}

type SalesforceTokenResponse = StandardTokenResponse<SalesforceTokenFields, BasicTokenType>;

/// oauth2's typestate client; the token endpoint is set right after `new`.
type OAuthClient<HasAuthUrl = EndpointNotSet, HasTokenUrl = EndpointNotSet> = oauth2::Client<
    BasicErrorResponse,
    SalesforceTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    HasAuthUrl,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    HasTokenUrl,
>;

/// An access token and the instance it is valid for.
#[derive(Clone)]
pub struct Session {
    pub access_token: Secret,
    pub instance_url: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("instance_url", &self.instance_url).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenHttpError {
    #[error("{0}")]
    Transport(#[from] reqwest::Error),
    #[error("{0}")]
    Http(#[from] oauth2::http::Error),
    /// 5xx and 429 from the token endpoint: transient, retried like any call.
    #[error("the token endpoint answered HTTP {0}")]
    Unavailable(u16),
}

/// JWT bearer assertions may live at most this long (Salesforce allows ~3 minutes).
const ASSERTION_LIFETIME_SECS: i64 = 180;
const JWT_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

fn base_url(conn: &SalesforceConnection) -> &str {
    conn.login_url.as_str().trim_end_matches('/')
}

fn oauth_client(
    connection: &str,
    conn: &SalesforceConnection,
) -> Result<OAuthClient<EndpointSet, EndpointSet>, SalesforceError> {
    let config_error = |message: String| SalesforceError::Config { connection: connection.to_string(), message };
    let token_url = format!("{}/services/oauth2/token", base_url(conn));
    let token_url = TokenUrl::new(token_url.clone())
        .map_err(|e| config_error(format!("login_url gives an invalid token URL `{token_url}`: {e}")))?;
    let auth_url = format!("{}/services/oauth2/authorize", base_url(conn));
    let auth_url = AuthUrl::new(auth_url.clone())
        .map_err(|e| config_error(format!("login_url gives an invalid authorize URL `{auth_url}`: {e}")))?;
    let mut client = OAuthClient::new(ClientId::new(conn.client_id.expose().to_string()))
        .set_auth_type(AuthType::RequestBody)
        .set_auth_uri(auth_url)
        .set_token_uri(token_url);
    if let Some(secret) = &conn.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose().to_string()));
    }
    Ok(client)
}

/// Where the JWT's `aud` points: Salesforce accepts only its login hosts
/// (sandboxes: test.salesforce.com); anything else (the local sandbox) is
/// its own audience.
pub fn jwt_audience(login_url: &str) -> String {
    let url = login_url.trim_end_matches('/');
    let host = url.split("://").nth(1).unwrap_or(url).split(['/', ':']).next().unwrap_or_default();
    if host == "test.salesforce.com" || host.ends_with(".sandbox.my.salesforce.com") {
        "https://test.salesforce.com".into()
    } else if host.ends_with("salesforce.com") {
        "https://login.salesforce.com".into()
    } else {
        url.to_string()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
}

/// Signs the RS256 assertion with the connection's private key. Errors name
/// the key file, never its contents.
fn jwt_assertion(connection: &str, conn: &SalesforceConnection) -> Result<String, SalesforceError> {
    let config_error = |message: String| SalesforceError::Config { connection: connection.to_string(), message };
    let (Some(username), Some(key_file)) = (&conn.username, &conn.private_key_file) else {
        return Err(config_error("`jwt_bearer` needs `username` and `private_key_file`".into()));
    };
    let key_file = key_file.display();
    let pem = std::fs::read(conn.private_key_file.as_deref().unwrap_or(std::path::Path::new("")))
        .map_err(|e| config_error(format!("cannot read private_key_file `{key_file}`: {e}")))?;
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).map_err(|e| {
        config_error(format!("private_key_file `{key_file}` is not a PEM RSA private key ({e}); use the key whose certificate is uploaded to the connected app"))
    })?;
    let claims = Claims {
        iss: conn.client_id.expose(),
        sub: username.as_str(),
        aud: &jwt_audience(conn.login_url.as_str()),
        exp: chrono::Utc::now().timestamp() + ASSERTION_LIFETIME_SECS,
    };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256), &claims, &key)
        .map_err(|e| config_error(format!("signing the JWT assertion with `{key_file}` failed: {e}")))
}

#[derive(Deserialize)]
struct RawToken {
    access_token: String,
    instance_url: String,
}

#[derive(Deserialize)]
struct RawOAuthError {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// What to tell the user for a refused login.
fn auth_hint(connection: &str, flow: AuthFlow, error: &str, description: &str) -> String {
    match (flow, error) {
        (AuthFlow::RefreshToken, "invalid_grant") => format!(
            "the stored refresh token is expired or revoked; run `nightjar auth login {connection}` to log in again"
        ),
        (AuthFlow::JwtBearer, "invalid_grant") if description.contains("audience") => {
            "the assertion's audience is wrong; login_url must be login.salesforce.com, test.salesforce.com or the org's My Domain".into()
        }
        (AuthFlow::JwtBearer, "invalid_grant") => "check `username`, that the user is pre-authorized for the connected app, and that private_key_file matches the app's certificate".into(),
        (_, "invalid_client_id") => "check `client_id` (the connected app's consumer key)".into(),
        (_, "invalid_client") => "check `client_secret` (the connected app's consumer secret)".into(),
        (_, "unsupported_grant_type") => "enable this OAuth flow in the connected app".into(),
        (AuthFlow::ClientCredentials, "invalid_grant") if description.contains("domain") => {
            "client_credentials needs the org's My Domain URL as login_url, not login.salesforce.com".into()
        }
        _ => "check client_id/client_secret and that the connected app allows this OAuth flow".into(),
    }
}

/// Requests a new access token for the connection. `stored_refresh` is the
/// refresh token `nightjar auth login` saved, for `auth = "refresh_token"`.
pub async fn login(
    http: &reqwest::Client,
    connection: &str,
    conn: &SalesforceConnection,
    stored_refresh: Option<&Secret>,
) -> Result<Session, SalesforceError> {
    let client = oauth_client(connection, conn)?;
    let status = Arc::new(AtomicU16::new(0));
    let send = |request: oauth2::HttpRequest| send_with(http.clone(), request, status.clone());
    let result = match conn.auth {
        AuthFlow::ClientCredentials => client.exchange_client_credentials().request_async(&send).await,
        AuthFlow::RefreshToken => {
            let Some(refresh) = stored_refresh.or(conn.refresh_token.as_ref()) else {
                return Err(SalesforceError::Config {
                    connection: connection.to_string(),
                    message: format!(
                        "no refresh token stored for this connection; run `nightjar auth login {connection}` first"
                    ),
                });
            };
            let refresh = RefreshToken::new(refresh.expose().to_string());
            client.exchange_refresh_token(&refresh).request_async(&send).await
        }
        // oauth2 has no RFC 7523 grant; the assertion is POSTed by hand.
        AuthFlow::JwtBearer => return jwt_login(http, connection, conn).await,
    };
    token_result(connection, conn.auth, result, status.load(Ordering::Relaxed)).map(|(session, _)| session)
}

/// Sends oauth2's request with our reqwest client, remembering the status
/// (oauth2's errors don't carry it, and users are shown it).
async fn send_with(
    http: reqwest::Client,
    request: oauth2::HttpRequest,
    status: Arc<AtomicU16>,
) -> Result<oauth2::HttpResponse, TokenHttpError> {
    let (parts, body) = request.into_parts();
    let response = http.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
    status.store(response.status().as_u16(), Ordering::Relaxed);
    if response.status().is_server_error() || response.status().as_u16() == 429 {
        return Err(TokenHttpError::Unavailable(response.status().as_u16()));
    }
    let mut builder = oauth2::http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let body = response.bytes().await?.to_vec();
    Ok(builder.body(body)?)
}

type TokenResult = Result<
    SalesforceTokenResponse,
    RequestTokenError<TokenHttpError, oauth2::StandardErrorResponse<oauth2::basic::BasicErrorResponseType>>,
>;

/// The session and, when the server sent one, the refresh token.
fn token_result(
    connection: &str,
    flow: AuthFlow,
    result: TokenResult,
    status: u16,
) -> Result<(Session, Option<Secret>), SalesforceError> {
    match result {
        Ok(token) => Ok((
            Session {
                access_token: Secret::new(token.access_token().secret().clone()),
                instance_url: token.extra_fields().instance_url.trim_end_matches('/').to_string(),
            },
            token.refresh_token().map(|r| Secret::new(r.secret().clone())),
        )),
        Err(RequestTokenError::ServerResponse(err)) => {
            let error = err.error().as_ref().to_string();
            let description = err.error_description().cloned().unwrap_or_default();
            Err(SalesforceError::Auth {
                connection: connection.to_string(),
                status,
                hint: auth_hint(connection, flow, &error, &description),
                error,
                description,
            })
        }
        Err(RequestTokenError::Request(e)) => Err(SalesforceError::Transport {
            context: format!("requesting a token for connection `{connection}`"),
            message: e.to_string(),
        }),
        // The body is never quoted: a half-understood success response still carries the token.
        Err(RequestTokenError::Parse(e, _body)) => Err(SalesforceError::Protocol {
            context: format!("token response for connection `{connection}`"),
            message: e.to_string(),
        }),
        Err(RequestTokenError::Other(msg)) => Err(SalesforceError::Protocol {
            context: format!("token response for connection `{connection}`"),
            message: msg,
        }),
    }
}

async fn jwt_login(
    http: &reqwest::Client,
    connection: &str,
    conn: &SalesforceConnection,
) -> Result<Session, SalesforceError> {
    let assertion = jwt_assertion(connection, conn)?;
    let url = format!("{}/services/oauth2/token", base_url(conn));
    let transport = |e: reqwest::Error| SalesforceError::Transport {
        context: format!("requesting a token for connection `{connection}`"),
        message: e.without_url().to_string(),
    };
    let response = http
        .post(&url)
        .header(reqwest::header::ACCEPT, "application/json")
        .form(&[("grant_type", JWT_GRANT), ("assertion", assertion.as_str())])
        .send()
        .await
        .map_err(transport)?;
    let status = response.status();
    let body = response.bytes().await.map_err(transport)?;
    if status.is_success() {
        let token: RawToken = serde_json::from_slice(&body).map_err(|e| SalesforceError::Protocol {
            context: format!("token response for connection `{connection}`"),
            message: e.to_string(),
        })?;
        return Ok(Session {
            access_token: Secret::new(token.access_token),
            instance_url: token.instance_url.trim_end_matches('/').to_string(),
        });
    }
    let (error, description) = match serde_json::from_slice::<RawOAuthError>(&body) {
        Ok(e) => (e.error, e.error_description),
        Err(_) => (format!("HTTP_{}", status.as_u16()), String::new()),
    };
    if status.is_server_error() {
        return Err(SalesforceError::Transport {
            context: format!("requesting a token for connection `{connection}`"),
            message: format!("HTTP {status}"),
        });
    }
    Err(SalesforceError::Auth {
        connection: connection.to_string(),
        status: status.as_u16(),
        hint: auth_hint(connection, AuthFlow::JwtBearer, &error, &description),
        error,
        description,
    })
}

/// The result of `nightjar auth login`: a refresh token to store. It has no
/// `Display`; store it, never print it.
pub struct LoginOutcome {
    pub refresh_token: Secret,
    pub instance_url: String,
}

/// The web-server flow with PKCE (S256): listens on `127.0.0.1:port` for the
/// redirect, hands the authorize URL to `open` (print it, or open a browser),
/// waits for the code, and exchanges it for tokens.
pub async fn login_with_browser(
    connection: &str,
    conn: &SalesforceConnection,
    port: u16,
    open: impl FnOnce(&str),
) -> Result<LoginOutcome, SalesforceError> {
    let config_error = |message: String| SalesforceError::Config { connection: connection.to_string(), message };
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| config_error(format!("cannot listen on 127.0.0.1:{port} for the OAuth redirect: {e}")))?;
    let port = listener.local_addr().map_err(|e| config_error(e.to_string()))?.port();
    let redirect = format!("http://localhost:{port}/oauth/callback");
    let client = oauth_client(connection, conn)?.set_redirect_uri(
        RedirectUrl::new(redirect.clone()).map_err(|e| config_error(format!("bad redirect URL: {e}")))?,
    );
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("api".into()))
        .add_scope(Scope::new("refresh_token".into()))
        .set_pkce_challenge(challenge)
        .url();
    open(url.as_str());

    let params = loop {
        let (mut socket, _) = listener.accept().await.map_err(|e| config_error(format!("OAuth redirect: {e}")))?;
        let mut buf = vec![0u8; 16 * 1024];
        let n = socket.read(&mut buf).await.unwrap_or(0);
        let request = String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned();
        let target = request.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or_default().to_string();
        let Some(query) = target.strip_prefix("/oauth/callback?") else {
            // Browsers also ask for /favicon.ico and the like.
            let _ = socket.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
            continue;
        };
        let params: Vec<(String, String)> = oauth2::url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let page = "<html><body><p>nightjar: login received; you can close this window.</p></body></html>";
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
            page.len()
        );
        let _ = socket.write_all(answer.as_bytes()).await;
        break params;
    };
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if let Some(error) = param("error") {
        let description = param("error_description").unwrap_or_default();
        return Err(SalesforceError::Auth {
            connection: connection.to_string(),
            status: 400,
            hint: "the login was not approved; run `nightjar auth login` again and approve access".into(),
            error,
            description,
        });
    }
    if param("state").as_deref() != Some(csrf.secret().as_str()) {
        return Err(config_error(
            "the OAuth redirect carried a different `state` than this login sent; run `nightjar auth login` again"
                .into(),
        ));
    }
    let code = param("code").ok_or_else(|| config_error("the OAuth redirect carried no `code`".into()))?;
    let http = reqwest::Client::new();
    let status = Arc::new(AtomicU16::new(0));
    let send = |request: oauth2::HttpRequest| send_with(http.clone(), request, status.clone());
    let result =
        client.exchange_code(AuthorizationCode::new(code)).set_pkce_verifier(verifier).request_async(&send).await;
    let (session, refresh) = token_result(connection, AuthFlow::RefreshToken, result, status.load(Ordering::Relaxed))?;
    let refresh_token = refresh.ok_or_else(|| {
        config_error(
            "Salesforce issued no refresh token; add the `refresh_token` (offline access) scope to the connected app"
                .into(),
        )
    })?;
    Ok(LoginOutcome { refresh_token, instance_url: session.instance_url })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_follows_the_login_host() {
        assert_eq!(jwt_audience("https://login.salesforce.com"), "https://login.salesforce.com");
        assert_eq!(jwt_audience("https://acme.my.salesforce.com/"), "https://login.salesforce.com");
        assert_eq!(jwt_audience("https://test.salesforce.com"), "https://test.salesforce.com");
        assert_eq!(jwt_audience("https://acme--uat.sandbox.my.salesforce.com"), "https://test.salesforce.com");
        assert_eq!(jwt_audience("http://127.0.0.1:8178"), "http://127.0.0.1:8178");
    }
}
