//! Targets: where mapped pages land. Every target stages a run's pages and
//! then merges them in ONE transaction, so a failed or killed run leaves the
//! target exactly as it was, and a repeated window changes nothing.

mod sqlite;

use async_trait::async_trait;
use polars::prelude::*;
use serde::Serialize;
use thiserror::Error;

pub use sqlite::SqliteTarget;

use crate::config::{Connection, Job, Project};
use crate::state::RunId;
use crate::transform::TargetSchema;

/// Bookkeeping columns every target table gets.
pub const RUN_ID_COLUMN: &str = "_nightjar_run_id";
pub const LOADED_AT_COLUMN: &str = "_nightjar_loaded_at";

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("target {target}: {source}")]
    Sqlite { target: String, source: rusqlite::Error },
    #[error("target {target}: {message}")]
    Schema { target: String, message: String },
    #[error("target {target}: cannot create directory for {path}: {source}")]
    Dir { target: String, path: String, source: std::io::Error },
    #[error("target {target}: {message}")]
    Unsupported { target: String, message: String },
    #[error("target {target}: {stage} called out of order (after a commit or abort)")]
    OutOfOrder { target: String, stage: &'static str },
}

impl LoadError {
    pub fn class(&self) -> &'static str {
        match self {
            LoadError::Schema { .. } => "schema_drift",
            LoadError::Sqlite { .. } => "target_constraint",
            _ => "target",
        }
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

/// A place mapped pages are loaded into. Adding a target is one file
/// implementing this plus one line in [`open_target`].
#[async_trait]
pub trait Target: Send {
    /// Creates the table from the schema if allowed and missing (or checks
    /// it), and opens this run's staging area.
    async fn prepare(&mut self, schema: &TargetSchema, run: RunId) -> Result<(), LoadError>;
    /// Adds one mapped page to staging. Nothing is visible to readers yet.
    async fn stage(&mut self, page: &DataFrame) -> Result<(), LoadError>;
    /// Merges staging into the table in one transaction.
    async fn commit(&mut self) -> Result<LoadCounts, LoadError>;
    /// Drops staging; the table stays as it was before the run.
    async fn abort(&mut self) -> Result<(), LoadError>;
}

/// Opens the job's target.
pub fn open_target(project: &Project, job: &Job) -> Result<Box<dyn Target>, LoadError> {
    let spec = &job.spec.target;
    let name = spec.connection.get_ref();
    match project.connection(name) {
        Some(Connection::Sqlite(c)) => {
            Ok(Box::new(SqliteTarget::open(&project.resolve(c.path.as_str()), spec.table.get_ref(), spec.create)?))
        }
        Some(other) => Err(LoadError::Unsupported {
            target: name.clone(),
            message: format!("{} targets are not supported by this build yet", other.kind()),
        }),
        None => Err(LoadError::Unsupported { target: name.clone(), message: "unknown connection".into() }),
    }
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
}
