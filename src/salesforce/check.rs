//! `nightjar check` and `nightjar validate --online`: log in to each
//! Salesforce connection, read its limits, and check through describe that
//! every job's object and fields exist, before a nightly run finds out.

use std::collections::HashMap;

use reqwest::Method;
use serde::Deserialize;

use super::{Call, RunClient, SalesforceClient, SalesforceError, json_body};
use crate::config::{AuthFlow, Connection, Diagnostic, JobPlan, Project};
use crate::state::StateStore;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectDescribe {
    pub name: String,
    pub fields: Vec<FieldDescribe>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldDescribe {
    pub name: String,
    #[serde(default)]
    pub relationship_name: Option<String>,
    #[serde(default)]
    pub reference_to: Vec<String>,
}

impl RunClient {
    /// An object's describe, or `None` when the org has no such object (or
    /// the integration user cannot see it).
    pub async fn describe(&self, object: &str) -> Result<Option<ObjectDescribe>, SalesforceError> {
        let call = Call {
            method: Method::GET,
            path: format!("/sobjects/{object}/describe"),
            query: Vec::new(),
            body: None,
            accept: "application/json",
            job_id: None,
        };
        let context = format!("describing {object}");
        let result = self
            .call(&call, move |response| {
                let context = context.clone();
                async move { json_body::<ObjectDescribe>(response, &context).await }
            })
            .await;
        match result {
            Ok(describe) => Ok(Some(describe)),
            Err(SalesforceError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[derive(Deserialize)]
struct VersionEntry {
    version: String,
}

impl RunClient {
    /// The API versions the org offers (`GET /services/data/`), oldest first.
    pub async fn api_versions(&self) -> Result<Vec<String>, SalesforceError> {
        let (_, session) = self.client.session().await?;
        let url = format!("{}/services/data/", session.instance_url);
        let transport = |e: reqwest::Error| SalesforceError::Transport {
            context: "listing the org's API versions".into(),
            message: e.to_string(),
        };
        let response = self
            .client
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(transport)?;
        if !response.status().is_success() {
            return Err(super::api_error(response, None, None).await);
        }
        let list: Vec<VersionEntry> = response.json().await.map_err(transport)?;
        Ok(list.into_iter().map(|v| v.version).collect())
    }
}

/// Problems with one job's object and fields, as diagnostics pointing into
/// the job file. Describes are cached per object for the whole check.
pub async fn check_job_fields(
    client: &RunClient,
    job: &JobPlan,
    cache: &mut HashMap<String, Option<ObjectDescribe>>,
) -> Result<Vec<Diagnostic>, SalesforceError> {
    let source = &job.source;
    let object = &source.object;
    let mut diags = Vec::new();
    let Some(describe) = cached(client, object, cache).await? else {
        diags.push(job.diagnostic(
            job.positions.object,
            format!("object `{object}` does not exist in the org (or the integration user cannot see it)"),
        ));
        return Ok(diags);
    };
    // The cursor is one of the fields (config checks that).
    for (i, name) in source.fields.iter().enumerate() {
        let problem = match name.split_once('.') {
            None => (!describe.fields.iter().any(|f| f.name.eq_ignore_ascii_case(name)))
                .then(|| format!("field `{name}` does not exist on {} (check its API name)", describe.name)),
            Some((relationship, parent_field)) => {
                let lookup = describe
                    .fields
                    .iter()
                    .find(|f| f.relationship_name.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(relationship)));
                match lookup {
                    None => Some(format!(
                        "`{name}`: {} has no relationship `{relationship}` (custom ones end in `__r`)",
                        describe.name
                    )),
                    // Polymorphic lookups point at several objects; the field
                    // only needs to exist on one of them.
                    Some(lookup) => {
                        let mut found = false;
                        for parent in &lookup.reference_to {
                            if let Some(parent) = cached(client, parent, cache).await?
                                && parent.fields.iter().any(|f| f.name.eq_ignore_ascii_case(parent_field))
                            {
                                found = true;
                            }
                        }
                        (!found).then(|| {
                            format!(
                                "`{name}`: field `{parent_field}` does not exist on {}",
                                lookup.reference_to.join(" or ")
                            )
                        })
                    }
                }
            }
        };
        if let Some(message) = problem {
            diags.push(job.diagnostic(job.positions.fields.get(i).copied().unwrap_or_default(), message));
        }
    }
    Ok(diags)
}

async fn cached(
    client: &RunClient,
    object: &str,
    cache: &mut HashMap<String, Option<ObjectDescribe>>,
) -> Result<Option<ObjectDescribe>, SalesforceError> {
    if let Some(hit) = cache.get(object) {
        return Ok(hit.clone());
    }
    let describe = client.describe(object).await?;
    cache.insert(object.to_string(), describe.clone());
    Ok(describe)
}

/// A client for a check: its own token, with the stored refresh token when
/// the connection uses the refresh_token flow.
pub async fn check_client(
    name: &str,
    conn: &crate::config::SalesforceConnection,
    state: Option<&StateStore>,
) -> Result<RunClient, SalesforceError> {
    let client = SalesforceClient::new(name, conn)?;
    if conn.auth == AuthFlow::RefreshToken
        && let Some(state) = state
    {
        let stored = state
            .refresh_token(name)
            .await
            .map_err(|e| SalesforceError::Config { connection: name.into(), message: e.to_string() })?;
        client.set_refresh_token(stored);
    }
    Ok(client.for_run())
}

fn flow_name(flow: AuthFlow) -> &'static str {
    match flow {
        AuthFlow::ClientCredentials => "client_credentials",
        AuthFlow::JwtBearer => "jwt_bearer",
        AuthFlow::RefreshToken => "refresh_token",
    }
}

/// What `nightjar check` found; `ok` is false on any problem.
pub struct CheckReport {
    pub lines: Vec<String>,
    pub ok: bool,
}

/// Checks the named connection, or every Salesforce connection.
pub async fn check(project: &Project, only: Option<&str>, state: Option<&StateStore>) -> CheckReport {
    let mut lines = Vec::new();
    let mut ok = true;
    let mut names: Vec<&String> = project
        .connections
        .iter()
        .filter(|(name, conn)| matches!(conn, Connection::Salesforce(_)) && only.is_none_or(|o| o == name.as_str()))
        .map(|(name, _)| name)
        .collect();
    names.sort();
    if names.is_empty() {
        let what = only.map_or("no Salesforce connections in the config".to_string(), |o| {
            format!("no Salesforce connection named `{o}` in the config")
        });
        return CheckReport { lines: vec![what], ok: false };
    }
    for name in names {
        let Some(Connection::Salesforce(conn)) = project.connection(name) else { continue };
        let client = match check_client(name, conn, state).await {
            Ok(client) => client,
            Err(e) => {
                lines.push(format!("connection `{name}`: FAILED: {e}"));
                ok = false;
                continue;
            }
        };
        let limits = match client.limits().await {
            Ok(limits) => limits,
            Err(e) => {
                lines.push(format!("connection `{name}`: FAILED: {e}"));
                ok = false;
                continue;
            }
        };
        let versions = match client.api_versions().await {
            Ok(versions) => versions,
            Err(e) => {
                lines.push(format!("connection `{name}`: FAILED: {e}"));
                ok = false;
                continue;
            }
        };
        let newest = versions.last().map_or("none".to_string(), |v| format!("v{v}"));
        lines.push(format!(
            "connection `{name}`: authenticated ({}), API v{} (the org offers up to {newest}), {} of {} daily API requests left",
            flow_name(conn.auth),
            conn.api_version,
            limits.daily_api_remaining,
            limits.daily_api_max
        ));
        if !versions.contains(&conn.api_version) {
            lines.push(format!(
                "connection `{name}`: api_version {} is not offered by the org (newest: {newest}); set api_version to one it offers",
                conn.api_version
            ));
            ok = false;
        }
        if let Err(e) = client.check_budget(&limits) {
            lines.push(format!("connection `{name}`: WARNING: {e}"));
            ok = false;
        }
        let mut cache = HashMap::new();
        for job in project.jobs.values().filter(|j| &j.source.connection == name) {
            match check_job_fields(&client, job, &mut cache).await {
                Ok(diags) if diags.is_empty() => lines.push(format!(
                    "  job `{}`: {} and its {} field(s) exist",
                    job.name,
                    job.source.object,
                    job.source.fields.len()
                )),
                Ok(diags) => {
                    ok = false;
                    for d in diags {
                        lines.push(format!("  job `{}`: {d}", job.name));
                    }
                }
                Err(e) => {
                    ok = false;
                    lines.push(format!("  job `{}`: FAILED: {e}", job.name));
                }
            }
        }
    }
    CheckReport { lines, ok }
}

/// `validate --online`: the field checks of every job, as diagnostics.
pub async fn validate_online(
    project: &Project,
    state: Option<&StateStore>,
) -> Result<Vec<Diagnostic>, SalesforceError> {
    let mut diags = Vec::new();
    let mut clients: HashMap<String, (RunClient, HashMap<String, Option<ObjectDescribe>>)> = HashMap::new();
    for job in project.jobs.values() {
        let name = &job.source.connection;
        let Some(Connection::Salesforce(conn)) = project.connection(name) else { continue };
        if !clients.contains_key(name) {
            clients.insert(name.clone(), (check_client(name, conn, state).await?, HashMap::new()));
        }
        if let Some((client, cache)) = clients.get_mut(name) {
            diags.extend(check_job_fields(client, job, cache).await?);
        }
    }
    Ok(diags)
}
