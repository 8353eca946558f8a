//! The file formats: `nightjar.toml`, `jobs/*.toml`, `mappings/*.toml`.
//!
//! Every struct denies unknown keys: a typo in a job file must be an error,
//! not a silently ignored setting.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::interpolate::{EnvString, Secret};

/// A duration written the human way (`"90s"`, `"10m"`, `"2h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        humantime::parse_duration(raw.trim()).map(HumanDuration).map_err(|e| {
            serde::de::Error::custom(format!("`{raw}` is not a duration ({e}); write e.g. \"90s\", \"10m\", \"2h\""))
        })
    }
}

/// A duration with where it was written, for diagnostics.
pub type SpannedDuration = Spanned<HumanDuration>;

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
    pub connections: BTreeMap<String, Spanned<ConnectionFile>>,
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_concurrent_runs: Option<Spanned<u32>>,
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
    /// Bounds each wait of one SMTP conversation (connect, greeting, TLS, replies).
    pub timeout: Option<SpannedDuration>,
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
    pub repeat_after: Option<SpannedDuration>,
}

impl AlertsConfig {
    fn default_on() -> Vec<AlertOn> {
        vec![AlertOn::Failure, AlertOn::Recovery]
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
pub enum ConnectionFile {
    Salesforce(SalesforceConnectionFile),
    Postgres(PostgresConnectionFile),
    Sqlite(SqliteConnectionFile),
    Files(FilesConnectionFile),
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
pub struct SalesforceConnectionFile {
    pub login_url: EnvString,
    pub auth: AuthFlow,
    pub client_id: Secret,
    pub client_secret: Option<Secret>,
    pub username: Option<EnvString>,
    pub private_key_file: Option<EnvString>,
    /// For `auth = "refresh_token"`; when absent, the token `nightjar auth
    /// login` stored in the state DB is used.
    pub refresh_token: Option<Secret>,
    #[serde(default = "SalesforceConnectionFile::default_api_version")]
    pub api_version: String,
    #[serde(default = "SalesforceConnectionFile::default_max_concurrent_jobs")]
    pub max_concurrent_jobs: u32,
    #[serde(default)]
    pub min_api_remaining: u64,
    /// How far Salesforce's clock (its `Date` header, which windows are
    /// planned on) may be from this machine's before a run refuses to start.
    pub max_clock_skew: Option<SpannedDuration>,
}

impl SalesforceConnectionFile {
    fn default_api_version() -> String {
        "62.0".into()
    }
    fn default_max_concurrent_jobs() -> u32 {
        2
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConnectionFile {
    pub url: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConnectionFile {
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
pub struct FilesConnectionFile {
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
    pub timeout: Option<SpannedDuration>,
    pub retries: Option<Spanned<Retries>>,
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
    pub attempts: Spanned<u32>,
    pub backoff: SpannedDuration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub connection: Spanned<String>,
    pub object: Spanned<String>,
    pub fields: Spanned<Vec<Spanned<String>>>,
    #[serde(rename = "where")]
    pub where_clause: Option<Spanned<String>>,
    /// The datetime field that windows are planned on; `None` means a full
    /// refresh every run.
    pub cursor: Option<Spanned<String>>,
    pub lookback: Option<SpannedDuration>,
    pub settle: Option<SpannedDuration>,
    #[serde(default)]
    pub include_deleted: bool,
    /// Rows per result page (`maxRecords`); Salesforce may send fewer.
    pub page_size: Option<Spanned<u32>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    pub mapping: Spanned<String>,
    #[serde(default)]
    pub max_reject_ratio: Option<Spanned<f64>>,
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
    pub key: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub deletes: DeleteMode,
    #[serde(default = "yes")]
    pub create: bool,
    #[serde(default)]
    pub schema_evolution: SchemaEvolution,
    /// Files targets: one snapshot file per value of these columns.
    #[serde(default)]
    pub partition_by: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobAlerts {
    #[serde(default)]
    pub email: Vec<Spanned<EnvString>>,
}

// ---------------------------------------------------------------- mappings/NAME.toml

#[derive(Debug, Clone, Default, Deserialize)]
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
