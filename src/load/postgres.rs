//! Postgres target: pages are `COPY`ed into a temp staging table; the commit
//! resolves duplicate keys to the newest row (`DISTINCT ON`), upserts with
//! `ON CONFLICT (key) DO UPDATE ... WHERE ... IS DISTINCT FROM ...`, applies
//! deletes and adds new columns, all in one transaction.

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::SinkExt;
use polars::prelude::*;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use super::{
    LOADED_AT_COLUMN, LoadCounts, LoadError, RUN_ID_COLUMN, SOFT_DELETE_COLUMN, Target, TargetOptions, pause_point,
    plan_evolution, quote_ident, staged_columns, table_columns,
};
use crate::config::DeleteMode;
use crate::state::RunId;
use crate::transform::{CURSOR_COLUMN, ColumnType, DELETED_COLUMN, TargetColumn, TargetSchema, format_timestamp_ms};

/// Arrival order in staging: among rows with one key and one cursor value,
/// the later one wins.
const SEQ_COLUMN: &str = "_nightjar_seq";

pub struct PostgresTarget {
    connection: String,
    client: Client,
    driver: JoinHandle<()>,
    options: TargetOptions,
    schema_name: Option<String>,
    table_name: String,
    run: Option<RunPlan>,
}

struct RunPlan {
    run: RunId,
    schema: TargetSchema,
    stage: String,
    /// Mapped columns the table lacks, added inside the commit transaction.
    add_columns: Vec<TargetColumn>,
    add_soft_delete: bool,
}

/// The type a column is created with.
fn pg_type(ty: ColumnType) -> String {
    match ty {
        ColumnType::Decimal { precision, scale } => format!("numeric({precision},{scale})"),
        other => pg_reported_type(other).to_string(),
    }
}

/// The type as `information_schema.columns.data_type` reports it.
fn pg_reported_type(ty: ColumnType) -> &'static str {
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

/// Appends one CSV field for `COPY ... (FORMAT csv)`: NULL is an unquoted
/// empty field, every value is quoted (so an empty string stays a string).
fn push_field(buf: &mut Vec<u8>, value: &AnyValue<'_>, as_epoch_ms: bool) {
    let quoted = push_quoted;
    match value {
        AnyValue::Null => {}
        AnyValue::String(s) => quoted(buf, s),
        AnyValue::StringOwned(s) => quoted(buf, s),
        AnyValue::Int64(v) => buf.extend_from_slice(v.to_string().as_bytes()),
        AnyValue::Float64(v) => buf.extend_from_slice(v.to_string().as_bytes()),
        AnyValue::Boolean(v) => buf.extend_from_slice(if *v { b"t" } else { b"f" }),
        AnyValue::Datetime(ms, TimeUnit::Milliseconds, _) if as_epoch_ms => {
            buf.extend_from_slice(ms.to_string().as_bytes())
        }
        AnyValue::Datetime(ms, TimeUnit::Milliseconds, _) => {
            if let Some(t) = format_timestamp_ms(*ms) {
                quoted(buf, &t);
            }
        }
        other => quoted(buf, &other.to_string()),
    }
}

/// A column seen through its concrete type, so rendering a page for COPY
/// does not go through a dynamically typed value per cell.
enum Cells<'a> {
    Text(&'a StringChunked),
    Integer(&'a Int64Chunked),
    Float(&'a Float64Chunked),
    Boolean(&'a BooleanChunked),
    /// Epoch milliseconds rendered as an RFC 3339 UTC timestamp.
    Timestamp(&'a Int64Chunked),
    /// Epoch milliseconds as a plain number (the staging cursor column).
    EpochMs(&'a Int64Chunked),
    Other(&'a Column),
}

impl<'a> Cells<'a> {
    fn of(col: &'a Column, as_epoch_ms: bool) -> PolarsResult<Cells<'a>> {
        Ok(match col.dtype() {
            DataType::String => Cells::Text(col.str()?),
            DataType::Int64 => Cells::Integer(col.i64()?),
            DataType::Float64 => Cells::Float(col.f64()?),
            DataType::Boolean => Cells::Boolean(col.bool()?),
            DataType::Datetime(TimeUnit::Milliseconds, _) if as_epoch_ms => Cells::EpochMs(col.datetime()?.physical()),
            DataType::Datetime(TimeUnit::Milliseconds, _) => Cells::Timestamp(col.datetime()?.physical()),
            _ => Cells::Other(col),
        })
    }

    fn write(&self, buf: &mut Vec<u8>, i: usize) -> PolarsResult<()> {
        use std::io::Write;
        // Writing into a Vec cannot fail.
        let _ = match self {
            Cells::Text(ca) => {
                if let Some(s) = ca.get(i) {
                    push_quoted(buf, s);
                }
                Ok(())
            }
            Cells::Integer(ca) | Cells::EpochMs(ca) => ca.get(i).map_or(Ok(()), |v| write!(buf, "{v}")),
            Cells::Float(ca) => ca.get(i).map_or(Ok(()), |v| write!(buf, "{v}")),
            Cells::Boolean(ca) => {
                if let Some(v) = ca.get(i) {
                    buf.push(if v { b't' } else { b'f' });
                }
                Ok(())
            }
            Cells::Timestamp(ca) => match ca.get(i).and_then(chrono::DateTime::from_timestamp_millis) {
                Some(t) => write!(buf, "\"{}\"", t.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
                None => Ok(()),
            },
            Cells::Other(col) => {
                push_field(buf, &col.get(i)?, false);
                Ok(())
            }
        };
        Ok(())
    }
}

fn push_quoted(buf: &mut Vec<u8>, text: &str) {
    buf.push(b'"');
    for b in text.bytes() {
        if b == b'"' {
            buf.push(b'"');
        }
        buf.push(b);
    }
    buf.push(b'"');
}

impl PostgresTarget {
    pub async fn connect(connection: &str, url: &str, options: TargetOptions) -> Result<PostgresTarget, LoadError> {
        let target = format!("postgres `{connection}` table {}", options.table);
        // The URL carries the password: report the driver's message only.
        let (client, driver) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|e| LoadError::Connect { target: target.clone(), message: format!("cannot connect: {e}") })?;
        let driver = tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::warn!(error = %e, "postgres connection closed with an error");
            }
        });
        let (schema_name, table_name) = match options.table.split_once('.') {
            Some((schema, table)) => (Some(schema.to_string()), table.to_string()),
            None => (None, options.table.clone()),
        };
        Ok(PostgresTarget {
            connection: connection.to_string(),
            client,
            driver,
            options,
            schema_name,
            table_name,
            run: None,
        })
    }

    fn name(&self) -> String {
        format!("postgres `{}` table {}", self.connection, self.options.table)
    }

    fn err(&self) -> impl Fn(tokio_postgres::Error) -> LoadError + use<> {
        let target = self.name();
        move |e| {
            // The server's own message (with detail) says far more than the driver's summary.
            let message = match e.as_db_error() {
                Some(db) => match db.detail() {
                    Some(detail) => format!("{} ({detail})", db.message()),
                    None => db.message().to_string(),
                },
                None => e.to_string(),
            };
            LoadError::Postgres { target: target.clone(), message }
        }
    }

    fn qualified(&self) -> String {
        match &self.schema_name {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&self.table_name)),
            None => quote_ident(&self.table_name),
        }
    }

    async fn existing_columns(&self) -> Result<Vec<(String, String)>, LoadError> {
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

    fn soft(&self) -> bool {
        self.options.deletes == DeleteMode::Soft
    }
}

#[async_trait]
impl Target for PostgresTarget {
    async fn prepare(&mut self, schema: &TargetSchema, run: RunId) -> Result<(), LoadError> {
        let table = self.qualified();
        let existing = self.existing_columns().await?;
        let mut add_columns = Vec::new();
        let mut add_soft_delete = false;
        if existing.is_empty() {
            if !self.options.create {
                return Err(LoadError::Schema {
                    target: self.name(),
                    message:
                        "the table does not exist and the job has `create = false`; create it or set `create = true`"
                            .into(),
                });
            }
            if let Some(s) = &self.schema_name {
                self.client
                    .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(s)))
                    .await
                    .map_err(self.err())?;
            }
            let soft = self.soft().then_some("boolean NOT NULL DEFAULT false");
            let defs = table_columns(schema, pg_type, soft, "bigint", "timestamp with time zone");
            self.client
                .batch_execute(&format!("CREATE TABLE IF NOT EXISTS {table} ({defs})"))
                .await
                .map_err(self.err())?;
        } else {
            let evolution = plan_evolution(
                &self.name(),
                "table",
                schema,
                &existing,
                |t| pg_reported_type(t).to_string(),
                &self.options,
            )?;
            add_columns = evolution.add_columns;
            add_soft_delete = evolution.add_soft_delete;
        }

        // A temp table dies with the session: a killed run leaves no staging.
        let stage = format!("_nightjar_stage_{run}");
        let mut defs: Vec<String> =
            schema.columns.iter().map(|c| format!("{} {}", quote_ident(&c.name), pg_type(c.ty))).collect();
        defs.push(format!("{} bigint", quote_ident(CURSOR_COLUMN)));
        defs.push(format!("{} boolean", quote_ident(DELETED_COLUMN)));
        defs.push(format!("{} bigserial", quote_ident(SEQ_COLUMN)));
        self.client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS pg_temp.{q}; CREATE TEMP TABLE {q} ({})",
                defs.join(", "),
                q = quote_ident(&stage)
            ))
            .await
            .map_err(self.err())?;
        self.run = Some(RunPlan { run, schema: schema.clone(), stage, add_columns, add_soft_delete });
        Ok(())
    }

    async fn stage(&mut self, page: &DataFrame) -> Result<(), LoadError> {
        let name = self.name();
        let plan = self.run.as_ref().ok_or_else(|| LoadError::OutOfOrder { target: name.clone(), stage: "stage" })?;
        if page.height() == 0 {
            return Ok(());
        }
        let (names, columns) = staged_columns(&name, &plan.schema, page)?;
        let schema_err = |e: PolarsError| LoadError::Schema { target: name.clone(), message: e.to_string() };
        let cells: Vec<Cells<'_>> = columns
            .iter()
            .zip(&names)
            .map(|(col, n)| Cells::of(col, *n == CURSOR_COLUMN))
            .collect::<Result<_, _>>()
            .map_err(schema_err)?;
        let mut buf = Vec::with_capacity(page.height() * 64 * columns.len());
        for i in 0..page.height() {
            for (j, cell) in cells.iter().enumerate() {
                if j > 0 {
                    buf.push(b',');
                }
                cell.write(&mut buf, i).map_err(schema_err)?;
            }
            buf.push(b'\n');
        }
        let quoted: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
        let copy = format!("COPY pg_temp.{} ({}) FROM STDIN (FORMAT csv)", quote_ident(&plan.stage), quoted.join(", "));
        let err = self.err();
        let sink = self.client.copy_in::<_, Bytes>(&copy).await.map_err(&err)?;
        let mut sink = std::pin::pin!(sink);
        sink.send(Bytes::from(buf)).await.map_err(&err)?;
        sink.as_mut().finish().await.map_err(&err)?;
        Ok(())
    }

    async fn commit(&mut self) -> Result<LoadCounts, LoadError> {
        let name = self.name();
        let plan = self.run.take().ok_or_else(|| LoadError::OutOfOrder { target: name.clone(), stage: "commit" })?;
        let table = self.qualified();
        let soft = self.soft();
        let deletes = self.options.deletes;
        let stage = format!("pg_temp.{}", quote_ident(&plan.stage));
        let latest = format!("{}_latest", plan.stage);
        let cols: Vec<String> = plan.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let key: Vec<String> = plan.schema.key.iter().map(|k| quote_ident(k)).collect();
        let non_key: Vec<&String> = cols.iter().filter(|c| !key.contains(c)).collect();
        let flag = format!("COALESCE({}, false)", quote_ident(DELETED_COLUMN));
        let soft_col = quote_ident(SOFT_DELETE_COLUMN);
        let run_col = quote_ident(RUN_ID_COLUMN);
        let loaded_col = quote_ident(LOADED_AT_COLUMN);

        let mut insert_cols = cols.clone();
        let mut select_cols = cols.clone();
        let mut compared: Vec<String> = non_key.iter().map(|c| c.to_string()).collect();
        if soft {
            insert_cols.push(soft_col.clone());
            select_cols.push(flag.clone());
            compared.push(soft_col.clone());
        }
        let mut set: Vec<String> = compared.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        set.push(format!("{run_col} = EXCLUDED.{run_col}"));
        set.push(format!("{loaded_col} = EXCLUDED.{loaded_col}"));
        // Rows whose values did not change are not rewritten: a repeated
        // window leaves the table (and its bookkeeping columns) untouched.
        let changed = if compared.is_empty() {
            "false".to_string()
        } else {
            let old: Vec<String> = compared.iter().map(|c| format!("t.{c}")).collect();
            let new: Vec<String> = compared.iter().map(|c| format!("EXCLUDED.{c}")).collect();
            format!("({}) IS DISTINCT FROM ({})", old.join(", "), new.join(", "))
        };
        let live_only = if soft { String::new() } else { format!(" WHERE NOT {flag}") };
        let returning_deleted = if soft { format!("t.{soft_col}") } else { "false".into() };
        let upsert = format!(
            "WITH written AS (
                INSERT INTO {table} AS t ({ins}, {run_col}, {loaded_col})
                SELECT {sel}, $1::bigint, now() FROM pg_temp.{latest}{live_only}
                ON CONFLICT ({key}) DO UPDATE SET {set} WHERE {changed}
                RETURNING (t.xmax = 0) AS inserted, {returning_deleted} AS deleted
             )
             SELECT count(*) FILTER (WHERE inserted AND NOT deleted),
                    count(*) FILTER (WHERE NOT inserted AND NOT deleted),
                    count(*) FILTER (WHERE deleted)
             FROM written",
            ins = insert_cols.join(", "),
            sel = select_cols.join(", "),
            latest = quote_ident(&latest),
            key = key.join(", "),
            set = set.join(", "),
        );
        // Duplicate keys within one extract: keep the highest cursor, then the
        // last to arrive, so the upsert never touches a row twice.
        let dedupe = format!(
            "CREATE TEMP TABLE {latest} ON COMMIT DROP AS
             SELECT DISTINCT ON ({key}) * FROM {stage}
             ORDER BY {key}, {cursor} DESC NULLS LAST, {seq} DESC",
            latest = quote_ident(&latest),
            key = key.join(", "),
            cursor = quote_ident(CURSOR_COLUMN),
            seq = quote_ident(SEQ_COLUMN),
        );
        let key_match: Vec<String> = key.iter().map(|k| format!("t.{k} = l.{k}")).collect();
        let hard_delete = format!(
            "DELETE FROM {table} AS t USING pg_temp.{} AS l WHERE {} AND {flag}",
            quote_ident(&latest),
            key_match.join(" AND ")
        );
        let considered = format!("SELECT count(*) FROM pg_temp.{}{live_only}", quote_ident(&latest));

        let err = self.err();
        let tx = self.client.transaction().await.map_err(&err)?;
        for c in &plan.add_columns {
            tx.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN {} {}", quote_ident(&c.name), pg_type(c.ty)))
                .await
                .map_err(&err)?;
        }
        if plan.add_soft_delete {
            tx.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN {soft_col} boolean NOT NULL DEFAULT false"))
                .await
                .map_err(&err)?;
        }
        tx.batch_execute(&dedupe).await.map_err(&err)?;
        let total: i64 = tx.query_one(&considered, &[]).await.map_err(&err)?.get(0);
        let row = tx.query_one(&upsert, &[&plan.run]).await.map_err(&err)?;
        let (inserted, updated, soft_deleted): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let hard_deleted =
            if deletes == DeleteMode::Hard { tx.execute(&hard_delete, &[]).await.map_err(&err)? as i64 } else { 0 };
        tx.batch_execute(&format!("DROP TABLE {stage}")).await.map_err(&err)?;
        pause_point("commit");
        tx.commit().await.map_err(&err)?;
        Ok(LoadCounts {
            inserted: inserted as u64,
            updated: updated as u64,
            unchanged: (total - inserted - updated - soft_deleted).max(0) as u64,
            deleted: (soft_deleted + hard_deleted) as u64,
        })
    }

    async fn abort(&mut self) -> Result<(), LoadError> {
        if let Some(plan) = self.run.take() {
            let sql = format!("DROP TABLE IF EXISTS pg_temp.{}", quote_ident(&plan.stage));
            self.client.batch_execute(&sql).await.map_err(self.err())?;
        }
        Ok(())
    }
}

impl Drop for PostgresTarget {
    fn drop(&mut self) {
        // The client's drop closes the session; the driver task then ends on
        // its own, but there is no reason to keep it scheduled.
        self.driver.abort();
    }
}
