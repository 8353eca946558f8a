//! Table types and DDL: creating the table, checking and evolving it, and
//! the run's staging table.

use super::{PostgresTarget, RunState};
use crate::load::merge::{Evolution, MergePlan, STAGED_CURSOR, STAGED_DELETED, STAGED_SEQ};
use crate::load::{LoadError, quote_ident, table_columns};
use crate::schema::{ColumnType, SOFT_DELETE_COLUMN};

/// The type a column is created with.
pub(super) fn pg_type(ty: ColumnType) -> String {
    match ty {
        ColumnType::Decimal { precision, scale } => format!("numeric({precision},{scale})"),
        other => reported_type(other).to_string(),
    }
}

/// The type as `information_schema.columns.data_type` reports it.
pub(super) fn reported_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text => "text",
        ColumnType::Integer => "bigint",
        ColumnType::Float => "double precision",
        ColumnType::Boolean => "boolean",
        ColumnType::Timestamp => "timestamp with time zone",
        ColumnType::Date => "date",
        ColumnType::Time => "time without time zone",
        ColumnType::Decimal { .. } => "numeric",
        ColumnType::Json => "jsonb",
    }
}

impl PostgresTarget {
    pub(super) async fn existing_columns(&self) -> Result<Vec<(String, String)>, LoadError> {
        let rows = self
            .client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = COALESCE($1, current_schema()) AND table_name = $2
                 ORDER BY ordinal_position",
                &[&self.schema_name, &self.table_name],
            )
            .await
            .map_err(self.err())?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Creates the table (and its schema) inside the open transaction.
    pub(super) async fn create_table(&self, plan: &MergePlan) -> Result<(), LoadError> {
        if let Some(s) = &self.schema_name {
            self.sql(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(s))).await?;
        }
        let soft = plan.soft().then_some("boolean NOT NULL DEFAULT false");
        let defs = table_columns(&plan.schema, pg_type, soft, "bigint", "timestamp with time zone");
        self.sql(&format!("CREATE TABLE IF NOT EXISTS {} ({defs})", self.qualified())).await
    }

    /// Adds what the mapping has and the table lacks, inside the open transaction.
    pub(super) async fn evolve(&self, evolution: &Evolution) -> Result<(), LoadError> {
        let table = self.qualified();
        for c in &evolution.add_columns {
            self.sql(&format!("ALTER TABLE {table} ADD COLUMN {} {}", quote_ident(&c.name), pg_type(c.ty))).await?;
        }
        if evolution.add_soft_delete {
            self.sql(&format!(
                "ALTER TABLE {table} ADD COLUMN {} boolean NOT NULL DEFAULT false",
                quote_ident(SOFT_DELETE_COLUMN)
            ))
            .await?;
        }
        Ok(())
    }

    /// Creates this run's staging table (a temp table: it dies with the
    /// session, so a killed run leaves none behind).
    pub(super) async fn create_stage(&self, state: &mut RunState) -> Result<(), LoadError> {
        if state.stage_ready {
            return Ok(());
        }
        let mut defs: Vec<String> =
            state.plan.schema.columns.iter().map(|c| format!("{} {}", quote_ident(&c.name), pg_type(c.ty))).collect();
        defs.push(format!("{} bigint", quote_ident(STAGED_CURSOR)));
        defs.push(format!("{} boolean", quote_ident(STAGED_DELETED)));
        defs.push(format!("{} bigserial", quote_ident(STAGED_SEQ)));
        self.sql(&format!(
            "DROP TABLE IF EXISTS pg_temp.{q}; CREATE TEMP TABLE {q} ({})",
            defs.join(", "),
            q = quote_ident(&state.stage)
        ))
        .await?;
        state.stage_ready = true;
        Ok(())
    }
}
