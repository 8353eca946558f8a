//! The file formats: `nightjar.toml`, `jobs/*.toml`, `mappings/*.toml`.
//!
//! Every struct denies unknown keys: a typo in a job file must be an error,
//! not a silently ignored setting.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::interpolate::{EnvString, Secret};

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = String::deserialize(d)?;
    humantime::parse_duration(raw.trim()).map_err(|e| {
        serde::de::Error::custom(format!("`{raw}` is not a duration ({e}); write e.g. \"90s\", \"10m\", \"2h\""))
    })
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

// ---------------------------------------------------------------- nightjar.toml

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalConfig {
    #[serde(default)]
    pub state: StateConfig,
    pub server: Option<ServerConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    pub smtp: Option<SmtpConfig>,
    pub alerts: Option<AlertsConfig>,
    #[serde(default)]
    pub connections: BTreeMap<String, Spanned<Connection>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    #[serde(default = "StateConfig::default_path")]
    pub path: EnvString,
}

impl StateConfig {
    fn default_path() -> EnvString {
        EnvString("state/nightjar.db".into())
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig { path: Self::default_path() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: Option<EnvString>,
    pub trigger_token: Option<Secret>,
    pub public_url: Option<EnvString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "LimitsConfig::default_max_concurrent_runs")]
    pub max_concurrent_runs: u32,
}

impl LimitsConfig {
    fn default_max_concurrent_runs() -> u32 {
        4
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { max_concurrent_runs: Self::default_max_concurrent_runs() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: EnvString,
    /// Defaults by `security`: 25, 587 or 465.
    pub port: Option<u16>,
    #[serde(default)]
    pub security: SmtpSecurity,
    pub username: Option<Spanned<EnvString>>,
    pub password: Option<Secret>,
    pub from: Spanned<EnvString>,
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain text; only for a relay on the same host or network.
    None,
    /// Plain connect, then STARTTLS, required (not opportunistic).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
}

impl SmtpSecurity {
    pub fn default_port(self) -> u16 {
        match self {
            SmtpSecurity::None => 25,
            SmtpSecurity::Starttls => 587,
            SmtpSecurity::Tls => 465,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    #[serde(default)]
    pub email: Vec<Spanned<EnvString>>,
    #[serde(default = "AlertsConfig::default_on")]
    pub on: Vec<AlertOn>,
    /// While a job keeps failing, at most one email per this interval.
    #[serde(default = "AlertsConfig::default_repeat_after", deserialize_with = "de_duration")]
    pub repeat_after: Duration,
}

impl AlertsConfig {
    fn default_on() -> Vec<AlertOn> {
        vec![AlertOn::Failure, AlertOn::Recovery]
    }
    fn default_repeat_after() -> Duration {
        Duration::from_secs(6 * 3600)
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig { email: Vec::new(), on: Self::default_on(), repeat_after: Self::default_repeat_after() }
    }
}

/// Which events send email.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertOn {
    Failure,
    Recovery,
}

/// A named endpoint: a Salesforce org to extract from, or a place to load into.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Connection {
    Salesforce(SalesforceConnection),
    Postgres(PostgresConnection),
    Sqlite(SqliteConnection),
    Files(FilesConnection),
}

impl Connection {
    pub fn kind(&self) -> &'static str {
        match self {
            Connection::Salesforce(_) => "salesforce",
            Connection::Postgres(_) => "postgres",
            Connection::Sqlite(_) => "sqlite",
            Connection::Files(_) => "files",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFlow {
    ClientCredentials,
    JwtBearer,
    RefreshToken,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceConnection {
    pub login_url: EnvString,
    pub auth: AuthFlow,
    pub client_id: Secret,
    pub client_secret: Option<Secret>,
    pub username: Option<EnvString>,
    pub private_key_file: Option<EnvString>,
    /// For `auth = "refresh_token"`; when absent, the token `nightjar auth
    /// login` stored in the state DB is used.
    pub refresh_token: Option<Secret>,
    #[serde(default = "SalesforceConnection::default_api_version")]
    pub api_version: String,
    #[serde(default = "SalesforceConnection::default_max_concurrent_jobs")]
    pub max_concurrent_jobs: u32,
    #[serde(default)]
    pub min_api_remaining: u64,
}

impl SalesforceConnection {
    fn default_api_version() -> String {
        "62.0".into()
    }
    fn default_max_concurrent_jobs() -> u32 {
        2
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConnection {
    pub url: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConnection {
    pub path: EnvString,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Parquet,
    Csv,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConnection {
    pub path: EnvString,
    pub format: FileFormat,
}

// ---------------------------------------------------------------- jobs/NAME.toml

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub description: Option<String>,
    pub schedule: Option<Spanned<String>>,
    pub timezone: Option<Spanned<String>>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    #[serde(default)]
    pub catch_up: bool,
    pub source: Source,
    pub transform: TransformSpec,
    pub target: TargetSpec,
    pub alerts: Option<JobAlerts>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    pub attempts: u32,
    #[serde(deserialize_with = "de_duration")]
    pub backoff: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub connection: Spanned<String>,
    pub object: Spanned<String>,
    pub fields: Spanned<Vec<Spanned<String>>>,
    #[serde(rename = "where")]
    pub where_clause: Option<String>,
    /// The datetime field that windows are planned on; `None` means a full
    /// refresh every run.
    pub cursor: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub lookback: Duration,
    #[serde(default = "Source::default_settle", deserialize_with = "de_duration")]
    pub settle: Duration,
    #[serde(default)]
    pub include_deleted: bool,
    /// Rows per result page (`maxRecords`); Salesforce may send fewer.
    #[serde(default = "Source::default_page_size")]
    pub page_size: u32,
}

impl Source {
    fn default_settle() -> Duration {
        Duration::from_secs(120)
    }
    fn default_page_size() -> u32 {
        10_000
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    pub mapping: Spanned<String>,
    #[serde(default)]
    pub max_reject_ratio: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeleteMode {
    Soft,
    Hard,
    #[default]
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchemaEvolution {
    AddColumns,
    #[default]
    Fail,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub connection: Spanned<String>,
    pub table: Spanned<String>,
    pub key: Spanned<Vec<String>>,
    #[serde(default)]
    pub deletes: DeleteMode,
    #[serde(default = "yes")]
    pub create: bool,
    #[serde(default)]
    pub schema_evolution: SchemaEvolution,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobAlerts {
    #[serde(default)]
    pub email: Vec<Spanned<EnvString>>,
}

// ---------------------------------------------------------------- mappings/NAME.toml

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    pub filter: Option<Spanned<String>>,
    #[serde(rename = "column", default)]
    pub columns: Vec<ColumnFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnFile {
    pub name: Spanned<String>,
    pub from: Option<Spanned<String>>,
    pub sql: Option<Spanned<String>>,
    #[serde(rename = "type")]
    pub type_name: Option<Spanned<String>>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub trim: bool,
    pub values: Option<BTreeMap<String, String>>,
    pub default: Option<String>,
}

/// Where a loaded file lives, for `file:line:col` messages.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}
