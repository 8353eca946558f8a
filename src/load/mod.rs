//! Targets: where mapped pages land. Every target stages a run's pages and
//! then merges them in ONE transaction, so a failed or killed run leaves the
//! target exactly as it was, and a repeated window changes nothing.

mod files;
mod postgres;
mod sqlite;

use async_trait::async_trait;
use polars::prelude::*;
use serde::Serialize;
use thiserror::Error;

pub use files::FilesTarget;
pub use postgres::PostgresTarget;
pub use sqlite::SqliteTarget;

use crate::config::{Connection, DeleteMode, Job, Project, SchemaEvolution};
use crate::state::RunId;
use crate::transform::{CURSOR_COLUMN, ColumnType, DELETED_COLUMN, TargetColumn, TargetSchema};

/// Bookkeeping columns every target table gets.
pub const RUN_ID_COLUMN: &str = "_nightjar_run_id";
pub const LOADED_AT_COLUMN: &str = "_nightjar_loaded_at";
/// Soft-delete flag, present when the job's `deletes = "soft"`.
pub const SOFT_DELETE_COLUMN: &str = "_deleted";

/// How the job wants its target table treated.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    pub table: String,
    pub create: bool,
    pub deletes: DeleteMode,
    pub schema_evolution: SchemaEvolution,
}

impl TargetOptions {
    pub fn for_job(job: &Job) -> TargetOptions {
        let t = &job.spec.target;
        TargetOptions {
            table: t.table.get_ref().clone(),
            create: t.create,
            deletes: t.deletes,
            schema_evolution: t.schema_evolution,
        }
    }
}

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
    #[error("target {target}: {message}; check the connection's url, that the server runs, and the user's rights")]
    Connect { target: String, message: String },
    #[error("target {target}: {message}")]
    Postgres { target: String, message: String },
}

impl LoadError {
    pub fn class(&self) -> &'static str {
        match self {
            LoadError::Schema { .. } => "schema_drift",
            LoadError::Sqlite { .. } | LoadError::Postgres { .. } => "target_constraint",
            LoadError::Connect { .. } => "network",
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
pub async fn open_target(project: &Project, job: &Job) -> Result<Box<dyn Target>, LoadError> {
    let options = TargetOptions::for_job(job);
    let name = job.spec.target.connection.get_ref();
    match project.connection(name) {
        Some(Connection::Sqlite(c)) => Ok(Box::new(SqliteTarget::open(&project.resolve(c.path.as_str()), options)?)),
        Some(Connection::Postgres(c)) => Ok(Box::new(PostgresTarget::connect(name, c.url.expose(), options).await?)),
        Some(Connection::Files(c)) => {
            Ok(Box::new(FilesTarget::open(&project.resolve(c.path.as_str()), c.format, options)?))
        }
        Some(other) => Err(LoadError::Unsupported {
            target: name.clone(),
            message: format!("{} targets are not supported by this build yet", other.kind()),
        }),
        None => Err(LoadError::Unsupported { target: name.clone(), message: "unknown connection".into() }),
    }
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

/// The columns of a mapped page a target stages, in order: the schema's
/// columns, then the cursor and deleted-flag columns when the page has them.
pub(crate) fn staged_columns<'a>(
    target: &str,
    schema: &TargetSchema,
    page: &'a DataFrame,
) -> Result<(Vec<&'a str>, Vec<&'a Column>), LoadError> {
    let mut names: Vec<&str> = Vec::with_capacity(schema.columns.len() + 2);
    let mut columns = Vec::with_capacity(schema.columns.len() + 2);
    for c in &schema.columns {
        let column = page.column(&c.name).map_err(|_| LoadError::Schema {
            target: target.to_string(),
            message: format!("the mapped page lacks column `{}`", c.name),
        })?;
        names.push(column.name().as_str());
        columns.push(column);
    }
    for extra in [CURSOR_COLUMN, DELETED_COLUMN] {
        if let Ok(column) = page.column(extra) {
            names.push(column.name().as_str());
            columns.push(column);
        }
    }
    Ok((names, columns))
}

/// How an existing table must change to take this run's mapping.
pub(crate) struct Evolution {
    /// Mapped columns the table lacks; added inside the commit transaction.
    pub add_columns: Vec<TargetColumn>,
    pub add_soft_delete: bool,
}

/// Compares an existing table (`existing`: column name and type as the
/// target reports it) with the mapping. Missing columns are added under
/// `schema_evolution = "add_columns"`; any other difference stops the run
/// with a message listing every difference and what to do.
pub(crate) fn plan_evolution(
    target: &str,
    noun: &str,
    schema: &TargetSchema,
    existing: &[(String, String)],
    type_name: impl Fn(ColumnType) -> String,
    options: &TargetOptions,
) -> Result<Evolution, LoadError> {
    let has = |name: &str| existing.iter().any(|(n, _)| n == name);
    let mut problems = Vec::new();
    let mut add_columns = Vec::new();
    for c in &schema.columns {
        match existing.iter().find(|(name, _)| *name == c.name) {
            None => add_columns.push(c.clone()),
            Some((_, ty)) if *ty != type_name(c.ty) => problems.push(format!(
                "column `{}` is {ty} in the {noun} but {} ({}) in the mapping",
                c.name,
                type_name(c.ty),
                c.ty.name()
            )),
            Some(_) => {}
        }
    }
    for bookkeeping in [RUN_ID_COLUMN, LOADED_AT_COLUMN] {
        if !has(bookkeeping) {
            problems.push(format!("column `{bookkeeping}` is missing (the {noun} was not created by nightjar)"));
        }
    }
    let add_soft_delete = options.deletes == DeleteMode::Soft && !has(SOFT_DELETE_COLUMN);
    let evolve = options.schema_evolution == SchemaEvolution::AddColumns;
    if !evolve {
        problems.extend(add_columns.iter().map(|c| format!("column `{}` is mapped but not in the {noun}", c.name)));
        if add_soft_delete {
            problems.push(format!("column `{SOFT_DELETE_COLUMN}` (for deletes = \"soft\") is not in the {noun}"));
        }
    }
    if problems.is_empty() {
        return Ok(Evolution { add_columns, add_soft_delete });
    }
    let remedy = if evolve {
        format!("fix the mapping's types or the {noun}")
    } else {
        format!("set `schema_evolution = \"add_columns\"` on the job, or change the {noun} yourself")
    };
    Err(LoadError::Schema {
        target: target.to_string(),
        message: format!("the {noun} differs from the mapping: {}; {remedy}", problems.join("; ")),
    })
}

/// A test hook: with `NIGHTJAR_TEST_PAUSE_AT=<point>` in the environment, a
/// run stops at that point (`stage`: after the first page is staged;
/// `commit`: inside the commit transaction, just before COMMIT) and waits,
/// so the crash tests can SIGKILL the process exactly there.
///
/// It blocks the thread on purpose: it is called while a database
/// transaction is open, and the process is about to be killed anyway.
pub fn pause_point(point: &str) {
    if std::env::var("NIGHTJAR_TEST_PAUSE_AT").is_ok_and(|p| p == point) {
        eprintln!("nightjar: paused at {point} (NIGHTJAR_TEST_PAUSE_AT)");
        std::thread::sleep(std::time::Duration::from_secs(3600));
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
