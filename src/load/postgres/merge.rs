//! The merge path: pages are `COPY`ed into a temp staging table, and the
//! commit renders the merge of `load/merge.rs` in Postgres' dialect, in one
//! transaction.

use tokio_postgres::error::SqlState;

use super::copy::{CopyColumn, CopyValue, copy};
use super::{PostgresTarget, RunState, copy_error};
use crate::hooks::HookPoint;
use crate::load::merge::{MergeSql, MergeTally, STAGED_CURSOR, STAGED_DELETED, SqlDialect, render_sql};
use crate::load::{LoadCounts, LoadError, quote_ident};
use crate::schema::MappedPage;

pub(super) struct Postgres;

impl SqlDialect for Postgres {
    fn changed(&self, old: &[String], new: &[String]) -> String {
        // One row comparison: Postgres evaluates it without a chain of ORs.
        format!("({}) IS DISTINCT FROM ({})", old.join(", "), new.join(", "))
    }
    fn false_literal(&self) -> &'static str {
        "false"
    }
}

/// The page's mapped columns, one chunk each, in schema order.
pub(super) fn mapped_columns(state: &RunState, page: &MappedPage) -> Result<Vec<CopyColumn>, String> {
    state
        .plan
        .schema
        .columns
        .iter()
        .map(|c| {
            let column = page.rows.column(&c.name).map_err(|_| format!("the mapped page lacks column `{}`", c.name))?;
            Ok(CopyColumn { name: c.name.clone(), value: CopyValue::Mapped(column.rechunk(), c.ty) })
        })
        .collect()
}

impl PostgresTarget {
    fn merge_sql(&self, state: &RunState, returning: &str) -> MergeSql {
        let stage = format!("pg_temp.{}", quote_ident(&state.stage));
        render_sql(&state.plan, &Postgres, &self.qualified(), &stage, "$1::bigint", "now()", returning)
    }

    /// COPYs rows into the staging table: mapped columns, cursor, deleted flag.
    pub(super) async fn stage_rows(&self, state: &mut RunState, page: &MappedPage) -> Result<(), LoadError> {
        if page.height() == 0 {
            return Ok(());
        }
        self.create_stage(state).await?;
        let internal = |message| LoadError::Internal { target: self.name(), message };
        let mut columns = mapped_columns(state, page).map_err(internal)?;
        if let Some(cursor) = &page.cursor {
            columns.push(CopyColumn {
                name: STAGED_CURSOR.into(),
                value: CopyValue::Cursor(cursor.rechunk().into_owned()),
            });
        }
        if let Some(flags) = &page.deleted {
            columns.push(CopyColumn {
                name: STAGED_DELETED.into(),
                value: CopyValue::Flag { flags: flags.rechunk().into_owned(), or_false: false },
            });
        }
        let stage = format!("pg_temp.{}", quote_ident(&state.stage));
        copy(&self.client, &stage, &columns, page.height(), 0).await.map_err(|e| copy_error(&self.name(), e))?;
        state.staged_rows += page.height() as u64;
        state.staged_deleted += page.deleted_count() as u64;
        Ok(())
    }

    /// Merges the staging table into the table inside the open transaction.
    /// `first`: this is a first load's fallback; rows already in the table
    /// came from this extract, and the named column holds their cursor.
    pub(super) async fn merge(&self, state: &RunState, first: Option<Option<&str>>) -> Result<MergeTally, LoadError> {
        let table = self.qualified();
        let plan = &state.plan;
        let deleted =
            if plan.soft() { format!("t.{}", quote_ident(crate::schema::SOFT_DELETE_COLUMN)) } else { "false".into() };
        let returning = format!(" RETURNING (t.xmax = 0) AS inserted, {deleted} AS deleted");
        let sql = self.merge_sql(state, &returning);
        let counted = |source: &str| {
            format!(
                "WITH written AS ({}) SELECT count(*), count(*) FILTER (WHERE inserted AND NOT deleted), count(*) FILTER (WHERE deleted) FROM written",
                (sql.upsert_from)(source)
            )
        };
        let stage = format!("pg_temp.{}", quote_ident(&state.stage));
        let err = self.err();
        let tally = |row: tokio_postgres::Row, considered: i64, hard: u64| MergeTally {
            considered: considered.max(0) as u64,
            written: row.get::<_, i64>(0).max(0) as u64,
            written_new_live: row.get::<_, i64>(1).max(0) as u64,
            written_deleted: row.get::<_, i64>(2).max(0) as u64,
            hard_deleted: hard,
        };

        // Most extracts hold each key once: upsert straight from staging and
        // let Postgres say otherwise (a row affected twice is a cardinality
        // violation), then keep the newest per key and upsert again. With
        // deleted rows and deletes = hard|ignore the live-only filter could
        // hide a duplicate, so those always resolve first.
        let straight = first.is_none() && (plan.soft() || state.staged_deleted == 0);
        if straight {
            self.sql("SAVEPOINT nightjar_merge").await?;
            match self.client.query_one(&counted(&stage), &[&plan.run]).await {
                Ok(row) => {
                    self.sql("RELEASE SAVEPOINT nightjar_merge").await?;
                    return Ok(tally(row, state.staged_rows as i64, 0));
                }
                Err(e) if e.code() == Some(&SqlState::CARDINALITY_VIOLATION) => {
                    self.sql("ROLLBACK TO SAVEPOINT nightjar_merge").await?;
                }
                Err(e) => return Err(err(e)),
            }
        }
        let latest_name = quote_ident(&format!("{}_latest", state.stage));
        let latest = format!("pg_temp.{latest_name}");
        self.sql(&format!("CREATE TEMP TABLE {latest_name} ON COMMIT DROP AS {}", sql.newest)).await?;
        let key_match: Vec<String> =
            plan.schema.key.iter().map(|k| format!("t.{k} = l.{k}", k = quote_ident(k))).collect();
        let key_match = key_match.join(" AND ");
        if let Some(Some(cursor_col)) = first {
            // A first load's own rows that are newer than a staged one win.
            self.sql(&format!(
                "DELETE FROM {latest} AS l USING {table} AS t WHERE {key_match}
                 AND t.{c} > 'epoch'::timestamptz + l.{cursor} * interval '1 millisecond'",
                c = quote_ident(cursor_col),
                cursor = quote_ident(STAGED_CURSOR),
            ))
            .await?;
        }
        let considered: i64 = self
            .client
            .query_one(&format!("SELECT count(*) FROM {latest} s WHERE {}", sql.considered), &[])
            .await
            .map_err(&err)?
            .get(0);
        let row = self.client.query_one(&counted(&latest), &[&plan.run]).await.map_err(&err)?;
        // Hard deletes; in a first load, deleted records also remove the
        // older rows of their key that this load wrote (deletes = ignore).
        let hard = if plan.deletes == crate::config::DeleteMode::Hard || (first.is_some() && !plan.soft()) {
            self.client.execute(&(sql.hard_delete_from)(&latest), &[]).await.map_err(&err)?
        } else {
            0
        };
        Ok(tally(row, considered, hard))
    }

    pub(super) async fn commit_merge(&mut self, state: &RunState) -> Result<LoadCounts, LoadError> {
        self.begin().await?;
        self.evolve(&state.evolution).await?;
        let tally = if state.staged_rows > 0 { self.merge(state, None).await? } else { MergeTally::default() };
        if state.stage_ready {
            self.sql(&format!("DROP TABLE pg_temp.{}", quote_ident(&state.stage))).await?;
        }
        self.hooks.reached(HookPoint::BeforeCommit);
        self.commit_transaction().await?;
        Ok(tally.counts())
    }
}
