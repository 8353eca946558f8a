//! The merge, defined once: what a run's commit does to the target table.
//!
//! Every target renders this in its own dialect (SQL for SQLite and
//! Postgres, Polars for files), but the meaning is fixed here:
//!
//! 1. **Newest per key.** Within one extract a key may arrive more than once
//!    (a record changed while the query ran, or windows overlap). The row
//!    with the highest cursor wins; among equal cursors, the one that arrived
//!    last (invariant 4).
//! 2. **Deletes.** A deleted record (`IsDeleted = true`) sets the row's
//!    `_deleted` flag (`soft`), removes the row (`hard`), or is skipped
//!    (`ignore`); only `soft` writes deleted records.
//! 3. **Change detection.** A row is written only if its key is new or one
//!    of the [`compared`](MergePlan::compared) columns differs (null-safe);
//!    an unchanged row keeps its `_nightjar_run_id` and
//!    `_nightjar_loaded_at`, so a repeated window rewrites nothing.
//! 4. **Counts.** From a [`MergeTally`], [`MergeTally::counts`] derives
//!    inserted / updated / unchanged / deleted the same way for every target.
//! 5. **One transaction.** Schema evolution, the upsert and the deletes are
//!    visible together or not at all.

use crate::config::{DeleteMode, JobPlan, SchemaEvolution};
use crate::schema::{ColumnType, LOADED_AT_COLUMN, RUN_ID_COLUMN, SOFT_DELETE_COLUMN, TargetColumn, TargetSchema};
use crate::state::RunId;

use super::{LoadCounts, LoadError, quote_ident};

/// What one run's commit does to its target table.
#[derive(Debug, Clone)]
pub struct MergePlan {
    pub run: RunId,
    pub schema: TargetSchema,
    pub deletes: DeleteMode,
    /// Create the table when it is missing.
    pub create: bool,
    pub schema_evolution: SchemaEvolution,
    /// Pages carry each row's cursor (the job has one).
    pub has_cursor: bool,
}

impl MergePlan {
    pub fn for_job(job: &JobPlan, run: RunId) -> MergePlan {
        MergePlan {
            run,
            schema: job.schema(),
            deletes: job.target.deletes,
            create: job.target.create,
            schema_evolution: job.target.schema_evolution,
            has_cursor: job.source.cursor.is_some(),
        }
    }

    pub fn soft(&self) -> bool {
        self.deletes == DeleteMode::Soft
    }

    /// The columns whose difference makes a row "changed": every mapped
    /// column but the key, and the soft-delete flag.
    pub fn compared(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.schema.value_columns().map(|c| c.name.as_str()).collect();
        if self.soft() {
            out.push(SOFT_DELETE_COLUMN);
        }
        out
    }

    /// Whether a staged row is written at all (rule 2): live rows always,
    /// deleted ones only as soft deletes.
    pub fn writes(&self, deleted: bool) -> bool {
        !deleted || self.soft()
    }
}

/// What a target observed while merging; [`Self::counts`] turns it into
/// history's counts the same way for every target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeTally {
    /// Distinct keys the merge considered writing (after rule 1 and 2).
    pub considered: u64,
    /// Of those, rows written (inserted or changed).
    pub written: u64,
    /// Of the written, live rows with a key the table did not have.
    pub written_new_live: u64,
    /// Of the written, rows that now carry the soft-delete flag.
    pub written_deleted: u64,
    /// Rows removed by `deletes = "hard"`.
    pub hard_deleted: u64,
}

impl MergeTally {
    pub fn counts(&self) -> LoadCounts {
        LoadCounts {
            inserted: self.written_new_live,
            updated: self.written.saturating_sub(self.written_new_live + self.written_deleted),
            unchanged: self.considered.saturating_sub(self.written),
            deleted: self.written_deleted + self.hard_deleted,
        }
    }
}

/// How an existing table must change to take this run's mapping.
#[derive(Debug, Clone, Default)]
pub struct Evolution {
    /// Mapped columns the table lacks; added inside the commit transaction.
    pub add_columns: Vec<TargetColumn>,
    pub add_soft_delete: bool,
}

impl MergePlan {
    /// Compares an existing table (`existing`: column name and type as the
    /// target reports it) with the mapping. Missing columns are added under
    /// `schema_evolution = "add_columns"`; any other difference stops the run
    /// with a message listing every difference and what to do.
    pub fn evolution(
        &self,
        target: &str,
        noun: &str,
        existing: &[(String, String)],
        type_name: impl Fn(ColumnType) -> String,
    ) -> Result<Evolution, LoadError> {
        let has = |name: &str| existing.iter().any(|(n, _)| n == name);
        let mut problems = Vec::new();
        let mut add_columns = Vec::new();
        for c in &self.schema.columns {
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
        let add_soft_delete = self.soft() && !has(SOFT_DELETE_COLUMN);
        let evolve = self.schema_evolution == SchemaEvolution::AddColumns;
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
}

/// The SQL a dialect needs to render the merge.
pub trait SqlDialect {
    /// Some column of `old` differs from its partner in `new`, nulls
    /// comparing equal to each other.
    fn changed(&self, old: &[String], new: &[String]) -> String;
    /// The literal for false in a boolean column.
    fn false_literal(&self) -> &'static str;
}

/// The merge's SQL, rendered once for every SQL target from a
/// [`MergePlan`]. Staging tables hold the mapped columns plus
/// [`STAGED_CURSOR`] (epoch ms), [`STAGED_DELETED`] and [`STAGED_SEQ`]
/// (arrival order).
pub struct MergeSql {
    /// `SELECT` of the newest row per key from `stage` (rule 1).
    pub newest: String,
    /// Upsert from `{source}` (staging, or its newest rows) with change
    /// detection (rule 3), binding `$run` and `$loaded_at` as given by the
    /// caller's placeholders.
    pub upsert_from: Box<dyn Fn(&str) -> String + Send + Sync>,
    /// Hard deletes of the keys deleted in `{source}`.
    pub hard_delete_from: Box<dyn Fn(&str) -> String + Send + Sync>,
    /// `WHERE` of the rows the merge considers (rule 2), over alias `s`.
    pub considered: String,
}

/// Staging's extra columns.
pub const STAGED_CURSOR: &str = "_nightjar_cursor";
pub const STAGED_DELETED: &str = "_nightjar_deleted";
pub const STAGED_SEQ: &str = "_nightjar_seq";

/// Renders the merge of `plan` into `table` (already quoted/qualified) in
/// `dialect`. `run` and `loaded_at` are the SQL of the run id and load time
/// (placeholders or literals); `returning` is appended to the upsert.
pub fn render_sql(
    plan: &MergePlan,
    dialect: &(dyn SqlDialect + Sync),
    table: &str,
    stage: &str,
    run: &str,
    loaded_at: &str,
    returning: &str,
) -> MergeSql {
    let cols: Vec<String> = plan.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let key: Vec<String> = plan.schema.key.iter().map(|k| quote_ident(k)).collect();
    let flag = format!("COALESCE(s.{}, {})", quote_ident(STAGED_DELETED), dialect.false_literal());
    let soft_col = quote_ident(SOFT_DELETE_COLUMN);
    let run_col = quote_ident(RUN_ID_COLUMN);
    let loaded_col = quote_ident(LOADED_AT_COLUMN);

    let mut insert_cols = cols.clone();
    let mut select_cols: Vec<String> = cols.iter().map(|c| format!("s.{c}")).collect();
    if plan.soft() {
        insert_cols.push(soft_col.clone());
        select_cols.push(flag.clone());
    }
    let compared: Vec<String> = plan.compared().into_iter().map(quote_ident).collect();
    let mut set: Vec<String> = compared.iter().map(|c| format!("{c} = excluded.{c}")).collect();
    set.push(format!("{run_col} = excluded.{run_col}"));
    set.push(format!("{loaded_col} = excluded.{loaded_col}"));
    let changed = if compared.is_empty() {
        "false".to_string()
    } else {
        let old: Vec<String> = compared.iter().map(|c| format!("t.{c}")).collect();
        let new: Vec<String> = compared.iter().map(|c| format!("excluded.{c}")).collect();
        dialect.changed(&old, &new)
    };
    let considered = if plan.soft() { "true".to_string() } else { format!("NOT {flag}") };
    let newest = format!(
        "SELECT * FROM (SELECT s.*, row_number() OVER (PARTITION BY {partition} ORDER BY s.{cursor} DESC NULLS LAST, s.{seq} DESC) AS _nightjar_rank FROM {stage} s) ranked WHERE _nightjar_rank = 1",
        partition = key.iter().map(|k| format!("s.{k}")).collect::<Vec<_>>().join(", "),
        cursor = quote_ident(STAGED_CURSOR),
        seq = quote_ident(STAGED_SEQ),
    );
    let upsert_from = {
        let (table, run, loaded_at, returning, considered) =
            (table.to_string(), run.to_string(), loaded_at.to_string(), returning.to_string(), considered.clone());
        let (ins, sel, key, set) = (insert_cols.join(", "), select_cols.join(", "), key.join(", "), set.join(", "));
        Box::new(move |source: &str| {
            format!(
                "INSERT INTO {table} AS t ({ins}, {run_col}, {loaded_col}) SELECT {sel}, {run}, {loaded_at} FROM {source} s WHERE {considered} \
                 ON CONFLICT ({key}) DO UPDATE SET {set} WHERE {changed}{returning}"
            )
        }) as Box<dyn Fn(&str) -> String + Send + Sync>
    };
    let hard_delete_from = {
        let table = table.to_string();
        let key_match: Vec<String> = key.iter().map(|k| format!("t.{k} = s.{k}")).collect();
        let key_match = key_match.join(" AND ");
        let flag = flag.clone();
        Box::new(move |source: &str| {
            format!("DELETE FROM {table} AS t WHERE EXISTS (SELECT 1 FROM {source} s WHERE {key_match} AND {flag})")
        }) as Box<dyn Fn(&str) -> String + Send + Sync>
    };
    MergeSql { newest, upsert_from, hard_delete_from, considered }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_derived_the_same_way_for_every_target() {
        let tally = MergeTally { considered: 10, written: 6, written_new_live: 3, written_deleted: 1, hard_deleted: 2 };
        assert_eq!(tally.counts(), LoadCounts { inserted: 3, updated: 2, unchanged: 4, deleted: 3 });
        assert_eq!(MergeTally::default().counts(), LoadCounts::default());
    }
}
