//! What the configuration compiles into: typed, checked values that runtime
//! code uses. The file model (`model.rs`, with its spans and raw strings)
//! never leaves `config`; by the time a [`JobPlan`] exists, its cron is
//! parsed, its SOQL identifiers and `where` are checked, its mapping's SQL
//! is parsed and type-checked, and its target is resolved.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::interpolate::Secret;
use super::model::{AuthFlow, DeleteMode, FileFormat, SchemaEvolution, SmtpSecurity};
use super::schedule::Schedule;
use crate::schema::{ColumnType, SqlExpr, TargetColumn, TargetSchema};

/// One job, ready to run.
#[derive(Debug, Clone)]
pub struct JobPlan {
    /// The file stem of `jobs/NAME.toml`.
    pub name: String,
    /// The job file, as found (relative to where `--config` points).
    pub file: PathBuf,
    pub description: Option<String>,
    /// `None`: the job runs only when asked (`nightjar run`).
    pub schedule: Option<Schedule>,
    pub enabled: bool,
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPlan>,
    pub catch_up: bool,
    pub source: SourcePlan,
    pub mapping: MappingPlan,
    pub max_reject_ratio: f64,
    pub target: TargetPlan,
    /// Recipients this job adds to the global `[alerts] email`.
    pub alert_emails: Vec<String>,
    /// Where things were written, for checks that find problems later
    /// (`validate --online`).
    pub positions: JobPositions,
}

/// A line and column (1-based) in a job file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub line: usize,
    pub col: usize,
}

/// Positions in the job file of what `validate --online` may report on.
#[derive(Debug, Clone, Default)]
pub struct JobPositions {
    pub object: Position,
    /// One per field of `SourcePlan::fields`, in order.
    pub fields: Vec<Position>,
}

impl JobPlan {
    /// A diagnostic at `at` in this job's file.
    pub fn diagnostic(&self, at: Position, message: String) -> super::Diagnostic {
        super::Diagnostic { file: self.file.clone(), line: at.line, col: at.col, message }
    }
}

impl JobPlan {
    /// The target table's shape, from the mapping and the key.
    pub fn schema(&self) -> TargetSchema {
        TargetSchema {
            columns: self
                .mapping
                .columns
                .iter()
                .map(|c| TargetColumn { name: c.name.clone(), ty: c.ty, nullable: !c.required })
                .collect(),
            key: self.target.key.clone(),
        }
    }

    /// Attempts per scheduled time, the first included.
    pub fn attempts(&self) -> u32 {
        self.retries.as_ref().map_or(1, |r| r.attempts)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPlan {
    /// Every attempt, the first included; at least 1.
    pub attempts: u32,
    pub backoff: Duration,
}

/// Where the rows come from: one Salesforce object, some of its fields, a window.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    pub connection: String,
    /// An sObject API name, checked against Salesforce's identifier rules.
    pub object: String,
    /// Field API names or relationship paths (`Owner.Email`), checked.
    pub fields: Vec<String>,
    /// The job's own `where`, checked to be one SOQL condition that cannot
    /// reach outside its parentheses; ANDed with the window.
    pub condition: Option<String>,
    /// The datetime field windows are planned on; `None`: full refresh.
    pub cursor: Option<String>,
    pub lookback: Duration,
    pub settle: Duration,
    /// queryAll: deleted records arrive with `IsDeleted = true`.
    pub include_deleted: bool,
    /// Rows per result page (`maxRecords`).
    pub page_size: u32,
}

impl SourcePlan {
    /// The field holding record ids, if extracted (rejects name their record).
    pub fn id_field(&self) -> Option<&str> {
        self.fields.iter().find(|f| f.eq_ignore_ascii_case("Id")).map(String::as_str)
    }

    /// The field holding the deleted flag, if extracted.
    pub fn deleted_field(&self) -> Option<&str> {
        self.fields.iter().find(|f| f.eq_ignore_ascii_case("IsDeleted")).map(String::as_str)
    }
}

/// A compiled mapping: an optional row filter, then one rule per target column.
#[derive(Debug, Clone)]
pub struct MappingPlan {
    /// The mapping's name (`mappings/NAME.toml`).
    pub name: String,
    pub filter: Option<SqlExpr>,
    pub columns: Vec<ColumnRule>,
}

/// How one target column is made.
#[derive(Debug, Clone)]
pub struct ColumnRule {
    pub name: String,
    pub source: ColumnSource,
    pub ty: ColumnType,
    pub required: bool,
    pub trim: bool,
    pub values: Option<BTreeMap<String, String>>,
    pub default: Option<String>,
}

/// Where a target column's value comes from.
#[derive(Debug, Clone)]
pub enum ColumnSource {
    /// An extracted field, as text.
    Field(String),
    /// A SQL expression over extracted fields, evaluated by Polars.
    Sql(SqlExpr),
}

/// Where the rows go.
#[derive(Debug, Clone)]
pub struct TargetPlan {
    pub connection: String,
    pub kind: TargetKind,
    pub key: Vec<String>,
    pub deletes: DeleteMode,
    pub create: bool,
    pub schema_evolution: SchemaEvolution,
}

/// The target, resolved against its connection.
#[derive(Debug, Clone)]
pub enum TargetKind {
    Sqlite {
        path: PathBuf,
        table: String,
    },
    Postgres {
        url: Secret,
        /// `None`: the connection's search path decides.
        schema: Option<String>,
        table: String,
    },
    Files {
        dir: PathBuf,
        format: FileFormat,
        table: String,
        /// Columns whose values split the snapshot into one file each.
        partition_by: Vec<String>,
    },
}

impl TargetKind {
    /// The table as the job names it (`crm.account`, `account`).
    pub fn table_label(&self) -> String {
        match self {
            TargetKind::Postgres { schema: Some(s), table, .. } => format!("{s}.{table}"),
            TargetKind::Sqlite { table, .. } | TargetKind::Postgres { table, .. } | TargetKind::Files { table, .. } => {
                table.clone()
            }
        }
    }
}

/// A named endpoint, compiled: a Salesforce org to extract from, or a
/// place to load into.
#[derive(Debug, Clone)]
pub enum Connection {
    Salesforce(SalesforceConnection),
    Postgres { url: Secret },
    Sqlite { path: PathBuf },
    Files { dir: PathBuf, format: FileFormat },
}

impl Connection {
    pub fn kind(&self) -> &'static str {
        match self {
            Connection::Salesforce(_) => "salesforce",
            Connection::Postgres { .. } => "postgres",
            Connection::Sqlite { .. } => "sqlite",
            Connection::Files { .. } => "files",
        }
    }
}

/// A Salesforce org and how to log in to it.
#[derive(Debug, Clone)]
pub struct SalesforceConnection {
    /// The login (or My Domain) URL, http(s), without a trailing slash.
    pub login_url: String,
    pub auth: AuthFlow,
    pub client_id: Secret,
    pub client_secret: Option<Secret>,
    pub username: Option<String>,
    pub private_key_file: Option<PathBuf>,
    /// For `auth = "refresh_token"`; when absent, the token `nightjar auth
    /// login` stored in the state DB is used.
    pub refresh_token: Option<Secret>,
    pub api_version: String,
    /// Bulk jobs of this connection at once; at least 1.
    pub max_concurrent_jobs: u32,
    pub min_api_remaining: u64,
    /// How far Salesforce's clock may be from this machine's.
    pub max_clock_skew: Duration,
}

/// `[smtp]`, compiled.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub from: String,
    /// Bounds every wait of one SMTP conversation (connect, greeting, TLS, each reply).
    pub timeout: Duration,
}

/// `[alerts]`, compiled.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    pub email: Vec<String>,
    pub on_failure: bool,
    pub on_recovery: bool,
    pub repeat_after: Duration,
}

/// `[server]`, compiled.
#[derive(Debug, Clone, Default)]
pub struct ServerSettings {
    pub listen: Option<String>,
    pub trigger_token: Option<Secret>,
    pub public_url: Option<String>,
}

/// The whole configuration of one nightjar installation.
#[derive(Debug, Clone)]
pub struct Project {
    /// Directory of `nightjar.toml`; relative paths in the config resolve against it.
    pub root: PathBuf,
    pub config_file: PathBuf,
    /// `[state] path`, resolved.
    pub state_path: PathBuf,
    pub server: ServerSettings,
    pub max_concurrent_runs: u32,
    pub smtp: Option<SmtpSettings>,
    pub alerts: AlertSettings,
    pub connections: BTreeMap<String, Connection>,
    pub jobs: BTreeMap<String, JobPlan>,
}

impl Project {
    pub fn job(&self, name: &str) -> Result<&JobPlan, super::ConfigError> {
        self.jobs.get(name).ok_or_else(|| super::ConfigError::UnknownJob(name.to_string()))
    }

    pub fn connection(&self, name: &str) -> Option<&Connection> {
        self.connections.get(name)
    }

    /// Resolves a path from the config relative to the config's directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        super::resolve(&self.root, path)
    }
}
