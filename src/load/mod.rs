//! Targets: where mapped pages land. Every target stages a run's pages and
//! then merges them in ONE transaction ([`merge`] defines what that merge
//! does), so a failed or killed run leaves the target exactly as it was, and
//! a repeated window changes nothing.
//!
//! Adding a target is one file implementing [`Target`] plus one arm in
//! [`open_target`]; `config` must also accept the new connection kind as a
//! target (`config/check.rs`, the `kind` match under "target").

mod files;
pub mod merge;
mod postgres;
mod sqlite;

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Serialize;
use thiserror::Error;

pub use files::FilesTarget;
pub use merge::{MergePlan, MergeTally};
pub use postgres::PostgresTarget;
pub use sqlite::SqliteTarget;

use crate::config::{JobPlan, TargetKind};
use crate::hooks::SharedHooks;
use crate::outcome::ErrorClass;
use crate::schema::{ColumnType, LOADED_AT_COLUMN, MappedPage, RUN_ID_COLUMN, SOFT_DELETE_COLUMN, TargetSchema};

#[derive(Debug, Error)]
pub enum LoadError {
    /// The table and the mapping disagree.
    #[error("target {target}: {message}")]
    Schema { target: String, message: String },
    /// The target cannot be used as configured.
    #[error("target {target}: {message}")]
    Setup { target: String, message: String },
    #[error("target {target}: {source}")]
    Sqlite { target: String, source: rusqlite::Error },
    #[error("target {target}: {message}")]
    Postgres {
        target: String,
        message: String,
        /// The server's SQLSTATE, when the server answered.
        sqlstate: Option<String>,
        /// The connection dropped (no answer at all).
        closed: bool,
    },
    #[error("target {target}: {message}; check the connection's url, that the server runs, and the user's rights")]
    Connect { target: String, message: String },
    #[error("target {target}: {op} {}: {source}", path.display())]
    Io { target: String, op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("target {target}: {op}: {message}")]
    Polars {
        target: String,
        op: &'static str,
        message: String,
        /// The I/O error under Polars' error, if that is what it was.
        io: Option<std::io::ErrorKind>,
    },
    /// A bug: a page that does not match its own schema, a call out of order.
    #[error("target {target}: {message} (a bug in nightjar; please report it)")]
    Internal { target: String, message: String },
}

impl LoadError {
    /// The class history and alerts show, from the error's type: a dropped
    /// connection is `network`, a refused row `target_constraint`, a full
    /// disk `disk`, a changed table `schema_drift`.
    pub fn class(&self) -> ErrorClass {
        match self {
            LoadError::Schema { .. } => ErrorClass::SchemaDrift,
            LoadError::Setup { .. } => ErrorClass::Target,
            LoadError::Connect { .. } => ErrorClass::Network,
            LoadError::Io { .. } => ErrorClass::Disk,
            LoadError::Polars { io: Some(_), .. } => ErrorClass::Disk,
            LoadError::Polars { io: None, .. } => ErrorClass::Target,
            LoadError::Internal { .. } => ErrorClass::Internal,
            LoadError::Sqlite { source, .. } => sqlite_class(source),
            LoadError::Postgres { closed: true, .. } => ErrorClass::Network,
            LoadError::Postgres { sqlstate, .. } => postgres_class(sqlstate.as_deref()),
        }
    }
}

fn sqlite_class(e: &rusqlite::Error) -> ErrorClass {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(
            C::DiskFull
            | C::ReadOnly
            | C::CannotOpen
            | C::PermissionDenied
            | C::SystemIoFailure
            | C::NoLargeFileSupport,
        ) => ErrorClass::Disk,
        Some(C::DatabaseBusy | C::DatabaseLocked | C::ConstraintViolation) => ErrorClass::TargetConstraint,
        Some(C::DatabaseCorrupt | C::NotADatabase) => ErrorClass::Target,
        _ => ErrorClass::Target,
    }
}

/// By SQLSTATE class (PostgreSQL manual, appendix A).
fn postgres_class(sqlstate: Option<&str>) -> ErrorClass {
    let Some(code) = sqlstate else { return ErrorClass::Target };
    match &code[..code.len().min(2)] {
        // connection exception; operator intervention (shutdown, cancel)
        "08" | "57" => ErrorClass::Network,
        // integrity constraint; transaction rollback (deadlock, serialization); lock not available
        "23" | "40" | "55" => ErrorClass::TargetConstraint,
        // insufficient resources (disk full, out of memory); system error (I/O)
        "53" | "58" => ErrorClass::Disk,
        // undefined or mismatched column, table, type
        "42" => ErrorClass::SchemaDrift,
        // invalid authorization
        "28" => ErrorClass::Auth,
        _ => ErrorClass::Target,
    }
}

/// What a commit did to the target table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LoadCounts {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
}

/// A place mapped pages are loaded into. A run calls `prepare`, `stage`
/// for every page, then `commit` (or `abort`); a dropped target that did not
/// commit leaves the table as it was.
#[async_trait]
pub trait Target: Send {
    /// Creates the table if allowed and missing (or checks it against the
    /// plan), and opens this run's staging area.
    async fn prepare(&mut self, plan: &MergePlan) -> Result<(), LoadError>;
    /// Adds one mapped page to staging. Nothing is visible to readers yet.
    async fn stage(&mut self, page: MappedPage) -> Result<(), LoadError>;
    /// Merges staging into the table in one transaction.
    async fn commit(&mut self) -> Result<LoadCounts, LoadError>;
    /// Drops staging; the table stays as it was before the run.
    async fn abort(&mut self) -> Result<(), LoadError>;
}

/// Opens the job's target. `hooks` lets tests stop a commit mid-way.
pub async fn open_target(job: &JobPlan, hooks: SharedHooks) -> Result<Box<dyn Target>, LoadError> {
    let connection = &job.target.connection;
    Ok(match &job.target.kind {
        TargetKind::Sqlite { path, table } => Box::new(SqliteTarget::open(path, table, hooks).await?),
        TargetKind::Postgres { url, schema, table } => {
            Box::new(PostgresTarget::connect(connection, url.expose(), schema.clone(), table, hooks).await?)
        }
        TargetKind::Files { dir, format, table, partition_by } => {
            Box::new(FilesTarget::open(dir, *format, table, partition_by.clone(), hooks)?)
        }
    })
}

/// Column definitions of a new target table: the mapped columns (NOT NULL
/// where required), the soft-delete flag when wanted, the bookkeeping
/// columns, and the primary key on the job's key.
pub(crate) fn table_columns(
    schema: &TargetSchema,
    type_name: impl Fn(ColumnType) -> String,
    soft_delete: Option<&str>,
    run_id_type: &str,
    loaded_at_type: &str,
) -> String {
    let mut defs: Vec<String> = schema
        .columns
        .iter()
        .map(|c| {
            let not_null = if c.nullable { "" } else { " NOT NULL" };
            format!("{} {}{not_null}", quote_ident(&c.name), type_name(c.ty))
        })
        .collect();
    if let Some(def) = soft_delete {
        defs.push(format!("{} {def}", quote_ident(SOFT_DELETE_COLUMN)));
    }
    defs.push(format!("{} {run_id_type} NOT NULL", quote_ident(RUN_ID_COLUMN)));
    defs.push(format!("{} {loaded_at_type} NOT NULL", quote_ident(LOADED_AT_COLUMN)));
    let key: Vec<String> = schema.key.iter().map(|k| quote_ident(k)).collect();
    defs.push(format!("PRIMARY KEY ({})", key.join(", ")));
    defs.join(", ")
}

/// Double-quotes an identifier; nothing from a config or a record is ever
/// spliced into SQL unquoted.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("account"), "\"account\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn error_classes_come_from_the_error_type() {
        let pg = |sqlstate: &str| LoadError::Postgres {
            target: "t".into(),
            message: "m".into(),
            sqlstate: Some(sqlstate.into()),
            closed: false,
        };
        assert_eq!(pg("23505").class(), ErrorClass::TargetConstraint);
        assert_eq!(pg("53100").class(), ErrorClass::Disk);
        assert_eq!(pg("08006").class(), ErrorClass::Network);
        assert_eq!(pg("42703").class(), ErrorClass::SchemaDrift);
        let dropped = LoadError::Postgres { target: "t".into(), message: "m".into(), sqlstate: None, closed: true };
        assert_eq!(dropped.class(), ErrorClass::Network);
        let full = LoadError::Io {
            target: "t".into(),
            op: "writing",
            path: "x".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert_eq!(full.class(), ErrorClass::Disk);
        assert!(full.to_string().contains("writing x"), "{full}");
    }
}
