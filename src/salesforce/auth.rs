//! OAuth 2.0 against Salesforce's token endpoint, through the `oauth2` crate.
//!
//! oauth2's own reqwest integration pins reqwest 0.12; we hand it a closure
//! over our reqwest 0.13 client instead, so the process has one HTTP stack.

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, ExtraTokenFields, RequestTokenError,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

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
type OAuthClient<HasTokenUrl = EndpointNotSet> = oauth2::Client<
    BasicErrorResponse,
    SalesforceTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
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
}

/// Requests a new access token for the connection.
pub async fn login(
    http: &reqwest::Client,
    connection: &str,
    conn: &SalesforceConnection,
) -> Result<Session, SalesforceError> {
    let token_url = format!("{}/services/oauth2/token", conn.login_url.as_str().trim_end_matches('/'));
    let token_url = TokenUrl::new(token_url.clone()).map_err(|e| SalesforceError::Config {
        connection: connection.to_string(),
        message: format!("login_url gives an invalid token URL `{token_url}`: {e}"),
    })?;
    let mut client: OAuthClient<EndpointSet> = OAuthClient::new(ClientId::new(conn.client_id.expose().to_string()))
        .set_auth_type(AuthType::RequestBody)
        .set_token_uri(token_url);
    if let Some(secret) = &conn.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose().to_string()));
    }

    let send = |request: oauth2::HttpRequest| {
        let http = http.clone();
        async move {
            let (parts, body) = request.into_parts();
            let response =
                http.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
            let mut builder = oauth2::http::Response::builder().status(response.status());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let body = response.bytes().await?.to_vec();
            Ok::<_, TokenHttpError>(builder.body(body)?)
        }
    };

    let result = match conn.auth {
        AuthFlow::ClientCredentials => client.exchange_client_credentials().request_async(&send).await,
        other => {
            return Err(SalesforceError::Config {
                connection: connection.to_string(),
                message: format!("auth flow {other:?} is not implemented in this build; use client_credentials"),
            });
        }
    };
    match result {
        Ok(token) => Ok(Session {
            access_token: Secret::new(token.access_token().secret().clone()),
            instance_url: token.extra_fields().instance_url.trim_end_matches('/').to_string(),
        }),
        Err(RequestTokenError::ServerResponse(err)) => Err(SalesforceError::Auth {
            connection: connection.to_string(),
            error: err.error().as_ref().to_string(),
            description: err.error_description().cloned().unwrap_or_default(),
        }),
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
