//! A first load into an empty table, inside the run's one transaction:
//! pages go straight into the table with `COPY`, each under a savepoint,
//! while that stays correct; what cannot go there goes to staging and is
//! merged at commit.

use polars::prelude::*;
use tokio_postgres::error::SqlState;

use super::copy::{CopyColumn, CopyError, CopyValue, PG_EPOCH_US, copy};
use super::merge::mapped_columns;
use super::{PostgresTarget, RunState, copy_error};
use crate::hooks::HookPoint;
use crate::load::{LoadCounts, LoadError, quote_ident};
use crate::schema::{ColumnType, LOADED_AT_COLUMN, MappedPage, RUN_ID_COLUMN, SOFT_DELETE_COLUMN, TargetSchema};

/// The bookkeeping of a first load.
pub(super) struct FirstLoad {
    /// Pages still go straight into the table.
    direct: bool,
    /// The mapped column that holds the cursor, once the first page showed
    /// it: `Some(None)` when pages carry no cursor at all.
    cursor_column: Option<Option<String>>,
    /// Rows written straight into the table: live ones and soft-deleted ones.
    live: u64,
    soft_deleted: u64,
    /// `now()` of the transaction in binary timestamptz form (µs since
    /// 2000): the bookkeeping `_nightjar_loaded_at`.
    loaded_at_us: i64,
    pages: u64,
}

/// The mapped `timestamp` column whose values equal the page's cursor on
/// every row, if any.
fn cursor_column_of(schema: &TargetSchema, page: &MappedPage) -> Option<String> {
    let cursor = page.cursor.as_ref()?;
    schema
        .columns
        .iter()
        .filter(|c| c.ty == ColumnType::Timestamp)
        .find(|c| page.rows.column(&c.name).is_ok_and(|col| same_instants(col, cursor)))
        .map(|c| c.name.clone())
}

fn same_instants(column: &Column, cursor: &Int64Chunked) -> bool {
    match column.as_materialized_series().datetime() {
        Ok(a) if a.time_unit() == TimeUnit::Milliseconds => {
            a.physical().iter().zip(cursor.iter()).all(|(x, y)| x == y && x.is_some())
        }
        _ => false,
    }
}

impl PostgresTarget {
    /// Starts the bookkeeping of a first load; the transaction is open.
    pub(super) async fn start_first_load(&self) -> Result<FirstLoad, LoadError> {
        // As text, exactly: EXTRACT(EPOCH ...) is a float before Postgres 14.
        let row = self
            .client
            .query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')", &[])
            .await
            .map_err(self.err())?;
        let text: String = row.get(0);
        let at =
            chrono::NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f").map_err(|e| LoadError::Internal {
                target: self.name(),
                message: format!("unexpected now() from the server: {text}: {e}"),
            })?;
        Ok(FirstLoad {
            direct: true,
            cursor_column: None,
            live: 0,
            soft_deleted: 0,
            loaded_at_us: at.and_utc().timestamp_micros() - PG_EPOCH_US,
            pages: 0,
        })
    }

    /// One page of a first load: straight into the table while that stays
    /// correct; what cannot go there goes to staging.
    pub(super) async fn stage_first_load(&self, state: &mut RunState, page: &MappedPage) -> Result<(), LoadError> {
        let soft = state.plan.soft();
        let internal = |message: String| LoadError::Internal { target: self.name(), message };
        let Some(first) = state.first.as_mut() else {
            return self.stage_rows(state, page).await;
        };
        if first.direct {
            match &first.cursor_column {
                None => {
                    // Duplicate keys resolve by cursor; the table must carry it.
                    first.cursor_column = Some(if page.cursor.is_some() {
                        let found = cursor_column_of(&state.plan.schema, page);
                        first.direct = found.is_some();
                        found
                    } else {
                        None
                    });
                }
                Some(Some(column)) => {
                    first.direct = match (page.rows.column(column), &page.cursor) {
                        (Ok(a), Some(b)) => same_instants(a, b),
                        _ => false,
                    };
                }
                Some(None) => {}
            }
        }
        if !first.direct {
            return self.stage_rows(state, page).await;
        }
        let flags = page.deleted_mask();
        let deleted = flags.num_trues();
        // deletes = hard|ignore: deleted records never land in a first load,
        // but they must still beat older rows of their key, so they go to
        // staging (merged by cursor at commit). Without a cursor, arrival
        // order decides, which only staging everything from here keeps.
        let (direct_page, staged_part) = if deleted > 0 && !soft {
            if !matches!(first.cursor_column, Some(Some(_))) {
                first.direct = false;
                return self.stage_rows(state, page).await;
            }
            let live = !&flags;
            (
                page.filter(&live).map_err(|e| internal(e.to_string()))?,
                Some(page.filter(&flags).map_err(|e| internal(e.to_string()))?),
            )
        } else {
            (page.clone(), None)
        };
        first.pages += 1;
        let savepoint = format!("nightjar_page_{}", first.pages);
        let loaded_at_us = first.loaded_at_us;
        let mut columns = mapped_columns(state, &direct_page).map_err(internal)?;
        if soft {
            columns.push(CopyColumn {
                name: SOFT_DELETE_COLUMN.into(),
                value: CopyValue::Flag { flags: direct_page.deleted_mask().rechunk().into_owned(), or_false: true },
            });
        }
        columns.push(CopyColumn { name: RUN_ID_COLUMN.into(), value: CopyValue::RunId(state.plan.run) });
        columns.push(CopyColumn { name: LOADED_AT_COLUMN.into(), value: CopyValue::LoadedAt });
        self.sql(&format!("SAVEPOINT {savepoint}")).await?;
        let copied = copy(&self.client, &self.qualified(), &columns, direct_page.height(), loaded_at_us).await;
        drop(columns);
        let Some(first) = state.first.as_mut() else { return Ok(()) };
        match copied {
            Ok(_) => {
                self.sql(&format!("RELEASE SAVEPOINT {savepoint}")).await?;
                if soft {
                    first.soft_deleted += deleted as u64;
                    first.live += (direct_page.height() - deleted) as u64;
                } else {
                    first.live += direct_page.height() as u64;
                }
                match staged_part {
                    Some(rows) => self.stage_rows(state, &rows).await,
                    None => Ok(()),
                }
            }
            Err(CopyError::Db(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                // A key seen before (or twice in this page): from here on the
                // merge resolves duplicates.
                tracing::debug!(target = %self.name(), "duplicate key in a first load; staging the rest");
                self.sql(&format!("ROLLBACK TO SAVEPOINT {savepoint}")).await?;
                first.direct = false;
                self.stage_rows(state, page).await
            }
            Err(e) => Err(copy_error(&self.name(), e)),
        }
    }

    pub(super) async fn commit_first_load(
        &mut self,
        state: &RunState,
        first: &FirstLoad,
    ) -> Result<LoadCounts, LoadError> {
        let table = self.qualified();
        let mut counts = LoadCounts { inserted: first.live, updated: 0, unchanged: 0, deleted: first.soft_deleted };
        if state.staged_rows > 0 {
            let cursor = first.cursor_column.as_ref().and_then(|c| c.as_deref());
            self.merge(state, Some(cursor)).await?;
            // The table was empty: what is in it now is what this load wrote.
            let sql = if state.plan.soft() {
                format!(
                    "SELECT count(*) FILTER (WHERE NOT {c}), count(*) FILTER (WHERE {c}) FROM {table}",
                    c = quote_ident(SOFT_DELETE_COLUMN)
                )
            } else {
                format!("SELECT count(*), 0::bigint FROM {table}")
            };
            let row = self.client.query_one(&sql, &[]).await.map_err(self.err())?;
            let (live, deleted): (i64, i64) = (row.get(0), row.get(1));
            counts.inserted = live as u64;
            counts.deleted = deleted as u64;
        }
        if state.stage_ready {
            self.sql(&format!("DROP TABLE pg_temp.{}", quote_ident(&state.stage))).await?;
        }
        self.hooks.reached(HookPoint::BeforeCommit);
        self.commit_transaction().await?;
        Ok(counts)
    }
}
