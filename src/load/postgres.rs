//! Postgres target.
//!
//! Every run works in ONE transaction on the target, so a failed or killed
//! run leaves the table exactly as it was. Two ways in:
//!
//! - **First load** (the table is created by this run, or exists and is
//!   empty): pages are `COPY`ed straight into the table, each under a
//!   savepoint, with no staging and no merge. A duplicate key (the primary
//!   key refuses the page) or, with `deletes = hard|ignore`, deleted rows
//!   send the rest of the extract to a staging table, which the commit merges
//!   in, the highest cursor winning (invariant 4). That needs the cursor in
//!   the table: a mapped `timestamp` column equal to the cursor, checked page
//!   by page; without one the first load stages everything.
//! - **Merge** (the table has rows): pages are `COPY`ed into a temp staging
//!   table; the commit resolves duplicate keys to the newest row
//!   (`DISTINCT ON`, only when there are duplicates), upserts with
//!   `ON CONFLICT (key) DO UPDATE ... WHERE ... IS DISTINCT FROM ...`,
//!   applies deletes and adds new columns.
//!
//! COPY data is binary, rendered column-typed and streamed in chunks while
//! it is produced; a page with a column type the binary writer does not know
//! goes as CSV text instead.

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::SinkExt;
use polars::prelude::*;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::{
    LOADED_AT_COLUMN, LoadCounts, LoadError, RUN_ID_COLUMN, SOFT_DELETE_COLUMN, Target, TargetOptions, pause_point,
    plan_evolution, quote_ident, table_columns,
};
use crate::config::DeleteMode;
use crate::state::RunId;
use crate::transform::{CURSOR_COLUMN, ColumnType, DELETED_COLUMN, TargetColumn, TargetSchema, format_timestamp_ms};

/// Arrival order in staging: among rows with one key and one cursor value,
/// the later one wins.
const SEQ_COLUMN: &str = "_nightjar_seq";

/// COPY data goes to the server in chunks of about this size while the rest
/// of the page is still being rendered.
const COPY_CHUNK: usize = 1 << 20;

/// 2000-01-01T00:00:00Z, Postgres' binary epoch, in Unix microseconds and days.
const PG_EPOCH_US: i64 = 946_684_800_000_000;
const PG_EPOCH_DAYS: i32 = 10_957;

pub struct PostgresTarget {
    connection: String,
    client: Client,
    driver: JoinHandle<()>,
    options: TargetOptions,
    schema_name: Option<String>,
    table_name: String,
    run: Option<RunPlan>,
    /// A transaction is open on the connection (BEGIN sent, no COMMIT yet).
    in_transaction: bool,
}

struct RunPlan {
    run: RunId,
    schema: TargetSchema,
    stage: String,
    /// Mapped columns the table lacks, added inside the commit transaction.
    add_columns: Vec<TargetColumn>,
    add_soft_delete: bool,
    /// The staging table exists.
    stage_ready: bool,
    /// Rows staged, and how many of them are deleted records.
    staged_rows: u64,
    staged_deleted: u64,
    /// Set when this run is a first load (transaction open since `prepare`).
    first: Option<FirstLoad>,
}

/// A first load into an empty table, inside the run's transaction.
struct FirstLoad {
    /// Pages still go straight into the table.
    direct: bool,
    /// The mapped column that holds the cursor, once the first page showed
    /// it: `Some(None)` when pages carry no cursor at all.
    cursor_column: Option<Option<String>>,
    /// Rows written straight into the table: live ones and soft-deleted ones.
    live: u64,
    soft_deleted: u64,
    /// `now()` of the transaction in binary timestamptz form (µs since 2000),
    /// and as text for the CSV writer: the bookkeeping `_nightjar_loaded_at`.
    loaded_at_us: i64,
    loaded_at_text: String,
    pages: u64,
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

/// One column of a COPY: the target column's name and where its values come from.
struct CopyColumn {
    name: String,
    value: CopyValue,
}

enum CopyValue {
    /// A mapped page column landing as its mapped type.
    Mapped(Column, ColumnType),
    /// The staged cursor: epoch milliseconds as `bigint`.
    CursorMs(Column),
    /// A boolean flag; with `or_false` a null is written as false.
    Flag { column: Column, or_false: bool },
    /// The run id, the same on every row.
    RunId(i64),
    /// The transaction's `now()`, the same on every row.
    LoadedAt,
}

type StrArr = <StringType as PolarsDataType>::Array;
type I64Arr = <Int64Type as PolarsDataType>::Array;
type I32Arr = <Int32Type as PolarsDataType>::Array;
type F64Arr = <Float64Type as PolarsDataType>::Array;
type BoolArr = <BooleanType as PolarsDataType>::Array;

/// A column ready to be written in COPY's binary format: the page's arrow
/// array (one chunk) read by position, no dynamically typed value per cell.
enum Binary<'a> {
    Text(&'a StrArr),
    Jsonb(&'a StrArr),
    Numeric(&'a StrArr),
    Int8(&'a I64Arr),
    Float8(&'a F64Arr),
    Bool(&'a BoolArr),
    BoolOrFalse(&'a BoolArr),
    /// A datetime in the given unit since the Unix epoch -> timestamptz.
    Timestamp(&'a I64Arr, TimeUnit),
    /// Days since the Unix epoch -> date.
    Date(&'a I32Arr),
    /// Nanoseconds since midnight -> time.
    Time(&'a I64Arr),
    ConstInt8(i64),
}

impl<'a> Binary<'a> {
    /// `None` when the page column's dtype is not one the binary writer knows
    /// for the target type; the page then goes as CSV.
    fn of(value: &'a CopyValue, loaded_at_us: i64) -> Option<Binary<'a>> {
        Some(match value {
            CopyValue::Mapped(col, ty) => match (ty, col.dtype()) {
                (ColumnType::Text, DataType::String) => Binary::Text(col.str().ok()?.downcast_as_array()),
                (ColumnType::Json, DataType::String) => Binary::Jsonb(col.str().ok()?.downcast_as_array()),
                (ColumnType::Decimal { .. }, DataType::String) => Binary::Numeric(col.str().ok()?.downcast_as_array()),
                (ColumnType::Integer, DataType::Int64) => Binary::Int8(col.i64().ok()?.downcast_as_array()),
                (ColumnType::Float, DataType::Float64) => Binary::Float8(col.f64().ok()?.downcast_as_array()),
                (ColumnType::Boolean, DataType::Boolean) => Binary::Bool(col.bool().ok()?.downcast_as_array()),
                (ColumnType::Timestamp, DataType::Datetime(unit, _)) => {
                    Binary::Timestamp(col.datetime().ok()?.physical().downcast_as_array(), *unit)
                }
                (ColumnType::Date, DataType::Date) => Binary::Date(col.date().ok()?.physical().downcast_as_array()),
                (ColumnType::Time, DataType::Time) => {
                    Binary::Time(col.as_materialized_series().time().ok()?.physical().downcast_as_array())
                }
                _ => return None,
            },
            CopyValue::CursorMs(col) => match col.dtype() {
                DataType::Datetime(TimeUnit::Milliseconds, _) => {
                    Binary::Int8(col.datetime().ok()?.physical().downcast_as_array())
                }
                DataType::Int64 => Binary::Int8(col.i64().ok()?.downcast_as_array()),
                _ => return None,
            },
            CopyValue::Flag { column, or_false } => {
                let array = column.bool().ok()?.downcast_as_array();
                if *or_false { Binary::BoolOrFalse(array) } else { Binary::Bool(array) }
            }
            CopyValue::RunId(id) => Binary::ConstInt8(*id),
            CopyValue::LoadedAt => Binary::ConstInt8(loaded_at_us),
        })
    }

    fn write(&self, buf: &mut Vec<u8>, i: usize) -> Result<(), String> {
        fn null(buf: &mut Vec<u8>) {
            buf.extend_from_slice(&(-1i32).to_be_bytes());
        }
        fn int8(buf: &mut Vec<u8>, v: i64) {
            buf.extend_from_slice(&8i32.to_be_bytes());
            buf.extend_from_slice(&v.to_be_bytes());
        }
        fn bool1(buf: &mut Vec<u8>, v: bool) {
            buf.extend_from_slice(&1i32.to_be_bytes());
            buf.push(u8::from(v));
        }
        match self {
            Binary::Text(a) => match a.get(i) {
                Some(s) => {
                    buf.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    buf.extend_from_slice(s.as_bytes());
                }
                None => null(buf),
            },
            Binary::Jsonb(a) => match a.get(i) {
                Some(s) => {
                    buf.extend_from_slice(&(s.len() as i32 + 1).to_be_bytes());
                    buf.push(1); // jsonb binary format version
                    buf.extend_from_slice(s.as_bytes());
                }
                None => null(buf),
            },
            Binary::Numeric(a) => match a.get(i) {
                Some(s) => write_numeric(buf, s).ok_or_else(|| s.to_string())?,
                None => null(buf),
            },
            Binary::Int8(a) => match a.get(i) {
                Some(v) => int8(buf, v),
                None => null(buf),
            },
            Binary::Float8(a) => match a.get(i) {
                Some(v) => {
                    buf.extend_from_slice(&8i32.to_be_bytes());
                    buf.extend_from_slice(&v.to_bits().to_be_bytes());
                }
                None => null(buf),
            },
            Binary::Bool(a) => match a.get(i) {
                Some(v) => bool1(buf, v),
                None => null(buf),
            },
            Binary::BoolOrFalse(a) => bool1(buf, a.get(i).unwrap_or(false)),
            Binary::Timestamp(a, unit) => match a.get(i) {
                Some(v) => {
                    let us = match unit {
                        TimeUnit::Milliseconds => v.saturating_mul(1000),
                        TimeUnit::Microseconds => v,
                        TimeUnit::Nanoseconds => v.div_euclid(1000),
                    };
                    int8(buf, us - PG_EPOCH_US)
                }
                None => null(buf),
            },
            Binary::Date(a) => match a.get(i) {
                Some(days) => {
                    buf.extend_from_slice(&4i32.to_be_bytes());
                    buf.extend_from_slice(&(days - PG_EPOCH_DAYS).to_be_bytes());
                }
                None => null(buf),
            },
            Binary::Time(a) => match a.get(i) {
                Some(ns) => int8(buf, ns / 1000),
                None => null(buf),
            },
            Binary::ConstInt8(v) => int8(buf, *v),
        }
        Ok(())
    }
}

/// Writes plain decimal text (`-123.45`, `0.5`, `7`) as a binary `numeric`:
/// base-10000 digits with a weight, a sign and the display scale. `None`
/// for anything else (exponents, NaN, stray characters).
fn write_numeric(buf: &mut Vec<u8>, text: &str) -> Option<()> {
    let bytes = text.as_bytes();
    let (negative, rest) = match bytes.first() {
        Some(b'-') => (true, &bytes[1..]),
        Some(b'+') => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    let (int, frac) = match rest.iter().position(|&b| b == b'.') {
        Some(p) => (&rest[..p], &rest[p + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    if (int.is_empty() && frac.is_empty())
        || !int.iter().chain(frac).all(u8::is_ascii_digit)
        || int.len() + frac.len() > 1000
    {
        return None;
    }
    let int = &int[int.iter().position(|&b| b != b'0').unwrap_or(int.len())..];
    let dscale = frac.len() as i16;
    let int_groups = int.len().div_ceil(4);
    // At most 1000 digits: 252 groups of four, on the stack.
    let mut digits = [0i16; 256];
    let mut n = 0;
    // Integer digits, grouped from the decimal point leftwards.
    let lead = int.len() - int_groups.saturating_sub(1) * 4;
    let mut at = 0;
    for g in 0..int_groups {
        let len = if g == 0 { lead } else { 4 };
        digits[n] = int[at..at + len].iter().fold(0i16, |acc, &b| acc * 10 + i16::from(b - b'0'));
        n += 1;
        at += len;
    }
    // Fraction digits, grouped rightwards and padded with zeros.
    for chunk in frac.chunks(4) {
        let mut d = chunk.iter().fold(0i16, |acc, &b| acc * 10 + i16::from(b - b'0'));
        for _ in chunk.len()..4 {
            d *= 10;
        }
        digits[n] = d;
        n += 1;
    }
    let leading = digits[..n].iter().take_while(|&&d| d == 0).count();
    let trailing = digits[leading..n].iter().rev().take_while(|&&d| d == 0).count();
    let digits = &digits[leading..n - trailing];
    let weight = int_groups as i16 - 1 - leading as i16;
    let (sign, weight) = match (digits.is_empty(), negative) {
        (true, _) => (0u16, 0i16),
        (false, true) => (0x4000, weight),
        (false, false) => (0, weight),
    };
    buf.extend_from_slice(&(8 + 2 * digits.len() as i32).to_be_bytes());
    buf.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    buf.extend_from_slice(&weight.to_be_bytes());
    buf.extend_from_slice(&sign.to_be_bytes());
    buf.extend_from_slice(&dscale.to_be_bytes());
    for d in digits {
        buf.extend_from_slice(&d.to_be_bytes());
    }
    Some(())
}

/// A column seen through its concrete type for `COPY ... (FORMAT csv)`, the
/// fallback for column types the binary writer does not know.
enum Cells<'a> {
    Text(&'a StringChunked),
    Integer(&'a Int64Chunked),
    Float(&'a Float64Chunked),
    Boolean(&'a BooleanChunked),
    BooleanOrFalse(&'a BooleanChunked),
    /// Epoch milliseconds rendered as an RFC 3339 UTC timestamp.
    Timestamp(&'a Int64Chunked),
    /// Epoch milliseconds as a plain number (the staging cursor column).
    EpochMs(&'a Int64Chunked),
    Const(String),
    Other(&'a Column),
}

impl<'a> Cells<'a> {
    fn of(value: &'a CopyValue, run_loaded_at: &str) -> PolarsResult<Cells<'a>> {
        let column = |col: &'a Column, as_epoch_ms: bool| -> PolarsResult<Cells<'a>> {
            Ok(match col.dtype() {
                DataType::String => Cells::Text(col.str()?),
                DataType::Int64 => Cells::Integer(col.i64()?),
                DataType::Float64 => Cells::Float(col.f64()?),
                DataType::Boolean => Cells::Boolean(col.bool()?),
                DataType::Datetime(TimeUnit::Milliseconds, _) if as_epoch_ms => {
                    Cells::EpochMs(col.datetime()?.physical())
                }
                DataType::Datetime(TimeUnit::Milliseconds, _) => Cells::Timestamp(col.datetime()?.physical()),
                _ => Cells::Other(col),
            })
        };
        match value {
            CopyValue::Mapped(col, _) => column(col, false),
            CopyValue::CursorMs(col) => column(col, true),
            CopyValue::Flag { column, or_false: true } => Ok(Cells::BooleanOrFalse(column.bool()?)),
            CopyValue::Flag { column: col, or_false: false } => column(col, false),
            CopyValue::RunId(id) => Ok(Cells::Const(id.to_string())),
            CopyValue::LoadedAt => Ok(Cells::Const(format!("\"{run_loaded_at}\""))),
        }
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
            Cells::BooleanOrFalse(ca) => {
                buf.push(if ca.get(i).unwrap_or(false) { b't' } else { b'f' });
                Ok(())
            }
            Cells::Timestamp(ca) => match ca.get(i).and_then(format_timestamp_ms) {
                Some(t) => write!(buf, "\"{t}\""),
                None => Ok(()),
            },
            Cells::Const(text) => {
                buf.extend_from_slice(text.as_bytes());
                Ok(())
            }
            Cells::Other(col) => {
                push_field(buf, &col.get(i)?);
                Ok(())
            }
        };
        Ok(())
    }
}

/// Appends one CSV field for a value of a type without a typed view: NULL
/// is an unquoted empty field, every value is quoted.
fn push_field(buf: &mut Vec<u8>, value: &AnyValue<'_>) {
    match value {
        AnyValue::Null => {}
        AnyValue::String(s) => push_quoted(buf, s),
        AnyValue::StringOwned(s) => push_quoted(buf, s),
        AnyValue::Boolean(v) => buf.extend_from_slice(if *v { b"t" } else { b"f" }),
        other => push_quoted(buf, &other.to_string()),
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

/// Why a COPY failed: the server refused it, or a value could not be written.
enum CopyError {
    Db(tokio_postgres::Error),
    Value(String),
}

impl From<tokio_postgres::Error> for CopyError {
    fn from(e: tokio_postgres::Error) -> CopyError {
        CopyError::Db(e)
    }
}

/// Rows of `page` selected by `keep` (all when `None`).
fn select_rows(page: &DataFrame, keep: Option<&BooleanChunked>) -> PolarsResult<DataFrame> {
    match keep {
        Some(mask) => page.filter(mask),
        None => Ok(page.clone()),
    }
}

/// The page's deleted-record flags, when it has them.
fn deleted_flags(page: &DataFrame) -> Option<BooleanChunked> {
    let flags = page.column(DELETED_COLUMN).ok()?.bool().ok()?;
    Some(flags.fill_null_with_values(false).unwrap_or_else(|_| flags.clone()))
}

/// The mapped `timestamp` column whose values equal the page's cursor on
/// every row, if any.
fn cursor_column_of(schema: &TargetSchema, page: &DataFrame) -> Option<String> {
    let cursor = page.column(CURSOR_COLUMN).ok()?;
    schema
        .columns
        .iter()
        .filter(|c| c.ty == ColumnType::Timestamp)
        .find(|c| page.column(&c.name).is_ok_and(|col| same_instants(col, cursor)))
        .map(|c| c.name.clone())
}

fn same_instants(a: &Column, b: &Column) -> bool {
    match (a.datetime(), b.datetime()) {
        (Ok(a), Ok(b)) if a.time_unit() == b.time_unit() => {
            a.physical().iter().zip(b.physical().iter()).all(|(x, y)| x == y && x.is_some())
        }
        _ => false,
    }
}

/// What a merge of the staging table did: (inserted, updated, soft-deleted,
/// rows considered, hard-deleted).
type MergeCounts = (i64, i64, i64, i64, i64);

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
            in_transaction: false,
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

    fn copy_err(&self) -> impl Fn(CopyError) -> LoadError + use<> {
        let db = self.err();
        let target = self.name();
        move |e| match e {
            CopyError::Db(e) => db(e),
            CopyError::Value(message) => LoadError::Schema { target: target.clone(), message },
        }
    }

    fn qualified(&self) -> String {
        match &self.schema_name {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&self.table_name)),
            None => quote_ident(&self.table_name),
        }
    }

    async fn sql(&self, sql: &str) -> Result<(), LoadError> {
        self.client.batch_execute(sql).await.map_err(self.err())
    }

    async fn begin(&mut self) -> Result<(), LoadError> {
        self.sql("BEGIN").await?;
        self.in_transaction = true;
        Ok(())
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

    /// Starts the bookkeeping of a first load; the transaction is open.
    async fn first_load(&self) -> Result<FirstLoad, LoadError> {
        // As text, exactly: EXTRACT(EPOCH ...) is a float before Postgres 14.
        let row = self
            .client
            .query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')", &[])
            .await
            .map_err(self.err())?;
        let text: String = row.get(0);
        let at =
            chrono::NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f").map_err(|e| LoadError::Postgres {
                target: self.name(),
                message: format!("unexpected now() from the server: {text}: {e}"),
            })?;
        Ok(FirstLoad {
            direct: true,
            cursor_column: None,
            live: 0,
            soft_deleted: 0,
            loaded_at_us: at.and_utc().timestamp_micros() - PG_EPOCH_US,
            loaded_at_text: format!("{text}Z"),
            pages: 0,
        })
    }

    /// Creates this run's staging table (a temp table: it dies with the
    /// session, so a killed run leaves none behind).
    async fn create_stage(&self, plan: &mut RunPlan) -> Result<(), LoadError> {
        if plan.stage_ready {
            return Ok(());
        }
        let mut defs: Vec<String> =
            plan.schema.columns.iter().map(|c| format!("{} {}", quote_ident(&c.name), pg_type(c.ty))).collect();
        defs.push(format!("{} bigint", quote_ident(CURSOR_COLUMN)));
        defs.push(format!("{} boolean", quote_ident(DELETED_COLUMN)));
        defs.push(format!("{} bigserial", quote_ident(SEQ_COLUMN)));
        self.sql(&format!(
            "DROP TABLE IF EXISTS pg_temp.{q}; CREATE TEMP TABLE {q} ({})",
            defs.join(", "),
            q = quote_ident(&plan.stage)
        ))
        .await?;
        plan.stage_ready = true;
        Ok(())
    }

    /// The mapped columns of a page, in schema order.
    fn mapped_columns(&self, plan: &RunPlan, page: &DataFrame) -> Result<Vec<CopyColumn>, LoadError> {
        plan.schema
            .columns
            .iter()
            .map(|c| {
                let column = page.column(&c.name).map_err(|_| LoadError::Schema {
                    target: self.name(),
                    message: format!("the mapped page lacks column `{}`", c.name),
                })?;
                Ok(CopyColumn { name: c.name.clone(), value: CopyValue::Mapped(column.rechunk(), c.ty) })
            })
            .collect()
    }

    /// A page as the staging table takes it: mapped columns, cursor, deleted flag.
    fn stage_columns(&self, plan: &RunPlan, page: &DataFrame) -> Result<Vec<CopyColumn>, LoadError> {
        let mut columns = self.mapped_columns(plan, page)?;
        if let Ok(c) = page.column(CURSOR_COLUMN) {
            columns.push(CopyColumn { name: CURSOR_COLUMN.into(), value: CopyValue::CursorMs(c.rechunk()) });
        }
        if let Ok(c) = page.column(DELETED_COLUMN) {
            columns.push(CopyColumn {
                name: DELETED_COLUMN.into(),
                value: CopyValue::Flag { column: c.rechunk(), or_false: false },
            });
        }
        Ok(columns)
    }

    /// A page as the target table takes it: mapped columns, the soft-delete
    /// flag, the bookkeeping columns.
    fn table_columns(&self, plan: &RunPlan, page: &DataFrame) -> Result<Vec<CopyColumn>, LoadError> {
        let mut columns = self.mapped_columns(plan, page)?;
        if self.soft()
            && let Ok(c) = page.column(DELETED_COLUMN)
        {
            columns.push(CopyColumn {
                name: SOFT_DELETE_COLUMN.into(),
                value: CopyValue::Flag { column: c.rechunk(), or_false: true },
            });
        }
        columns.push(CopyColumn { name: RUN_ID_COLUMN.into(), value: CopyValue::RunId(plan.run) });
        columns.push(CopyColumn { name: LOADED_AT_COLUMN.into(), value: CopyValue::LoadedAt });
        Ok(columns)
    }

    /// COPYs `height` rows of `columns` into `into`: binary when every column
    /// has a binary form, CSV otherwise; sent in chunks while rendered.
    async fn copy(
        &self,
        into: &str,
        columns: &[CopyColumn],
        height: usize,
        loaded_at: (i64, &str),
    ) -> Result<u64, CopyError> {
        let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
        let binary: Option<Vec<Binary<'_>>> = columns.iter().map(|c| Binary::of(&c.value, loaded_at.0)).collect();
        let format = if binary.is_some() { "binary" } else { "csv" };
        let sql = format!("COPY {into} ({}) FROM STDIN (FORMAT {format})", names.join(", "));
        let sink = self.client.copy_in::<_, Bytes>(&sql).await?;
        let mut sink = std::pin::pin!(sink);
        let mut buf: Vec<u8> = Vec::with_capacity(COPY_CHUNK + (64 << 10));
        match binary {
            Some(fields) => {
                buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
                buf.extend_from_slice(&0i32.to_be_bytes()); // flags
                buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
                let count = (fields.len() as i16).to_be_bytes();
                for i in 0..height {
                    buf.extend_from_slice(&count);
                    for (field, column) in fields.iter().zip(columns) {
                        field.write(&mut buf, i).map_err(|value| {
                            CopyError::Value(format!("column `{}`: `{value}` is not a decimal number", column.name))
                        })?;
                    }
                    if buf.len() >= COPY_CHUNK {
                        let chunk = std::mem::replace(&mut buf, Vec::with_capacity(COPY_CHUNK + (64 << 10)));
                        sink.send(Bytes::from(chunk)).await?;
                    }
                }
                buf.extend_from_slice(&(-1i16).to_be_bytes());
            }
            None => {
                let cells: Vec<Cells<'_>> = columns
                    .iter()
                    .map(|c| Cells::of(&c.value, loaded_at.1))
                    .collect::<PolarsResult<_>>()
                    .map_err(|e| CopyError::Value(e.to_string()))?;
                for i in 0..height {
                    for (j, cell) in cells.iter().enumerate() {
                        if j > 0 {
                            buf.push(b',');
                        }
                        cell.write(&mut buf, i).map_err(|e| CopyError::Value(e.to_string()))?;
                    }
                    buf.push(b'\n');
                    if buf.len() >= COPY_CHUNK {
                        let chunk = std::mem::replace(&mut buf, Vec::with_capacity(COPY_CHUNK + (64 << 10)));
                        sink.send(Bytes::from(chunk)).await?;
                    }
                }
            }
        }
        sink.send(Bytes::from(buf)).await?;
        Ok(sink.as_mut().finish().await?)
    }

    /// COPYs rows into the staging table.
    async fn stage_rows(&self, plan: &mut RunPlan, frame: &DataFrame) -> Result<(), LoadError> {
        if frame.height() == 0 {
            return Ok(());
        }
        self.create_stage(plan).await?;
        let columns = self.stage_columns(plan, frame)?;
        let stage = format!("pg_temp.{}", quote_ident(&plan.stage));
        let loaded_at = plan.first.as_ref().map_or((0, ""), |f| (f.loaded_at_us, f.loaded_at_text.as_str()));
        self.copy(&stage, &columns, frame.height(), loaded_at).await.map_err(self.copy_err())?;
        plan.staged_rows += frame.height() as u64;
        plan.staged_deleted += deleted_flags(frame).map_or(0, |f| f.num_trues()) as u64;
        Ok(())
    }

    /// One page of a first load: straight into the table while that stays
    /// correct; what cannot go there goes to staging.
    async fn stage_first_load(&self, plan: &mut RunPlan, page: &DataFrame) -> Result<(), LoadError> {
        let soft = self.soft();
        let schema_err = |e: PolarsError| LoadError::Schema { target: self.name(), message: e.to_string() };
        let Some(first) = plan.first.as_mut() else {
            return self.stage_rows(plan, page).await;
        };
        if first.direct {
            match &first.cursor_column {
                None => {
                    // Duplicate keys resolve by cursor; the table must carry it.
                    first.cursor_column = Some(if page.column(CURSOR_COLUMN).is_ok() {
                        let found = cursor_column_of(&plan.schema, page);
                        first.direct = found.is_some();
                        found
                    } else {
                        None
                    });
                }
                Some(Some(column)) => {
                    let same = match (page.column(column), page.column(CURSOR_COLUMN)) {
                        (Ok(a), Ok(b)) => same_instants(a, b),
                        _ => false,
                    };
                    first.direct = same;
                }
                Some(None) => {}
            }
        }
        if !first.direct {
            return self.stage_rows(plan, page).await;
        }
        let flags = deleted_flags(page);
        let deleted = flags.as_ref().map_or(0, |f| f.num_trues());
        // deletes = hard|ignore: deleted records never land in a first load,
        // but they must still beat older rows of their key, so they go to
        // staging (merged by cursor at commit). Without a cursor, arrival
        // order decides, which only staging everything from here keeps.
        let (direct_page, staged_part) = match &flags {
            Some(flags) if deleted > 0 && !soft => {
                if !matches!(first.cursor_column, Some(Some(_))) {
                    first.direct = false;
                    return self.stage_rows(plan, page).await;
                }
                let live = !flags;
                (
                    select_rows(page, Some(&live)).map_err(schema_err)?,
                    Some(select_rows(page, Some(flags)).map_err(schema_err)?),
                )
            }
            _ => (page.clone(), None),
        };
        first.pages += 1;
        let savepoint = format!("nightjar_page_{}", first.pages);
        let loaded_at = (first.loaded_at_us, first.loaded_at_text.clone());
        let columns = self.table_columns(plan, &direct_page)?;
        self.sql(&format!("SAVEPOINT {savepoint}")).await?;
        let copied = self.copy(&self.qualified(), &columns, direct_page.height(), (loaded_at.0, &loaded_at.1)).await;
        drop(columns);
        let Some(first) = plan.first.as_mut() else { return Ok(()) };
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
                    Some(rows) => self.stage_rows(plan, &rows).await,
                    None => Ok(()),
                }
            }
            Err(CopyError::Db(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                // A key seen before (or twice in this page): from here on the
                // merge resolves duplicates.
                tracing::debug!(target = %self.name(), "duplicate key in a first load; staging the rest");
                self.sql(&format!("ROLLBACK TO SAVEPOINT {savepoint}")).await?;
                first.direct = false;
                self.stage_rows(plan, page).await
            }
            Err(e) => Err(self.copy_err()(e)),
        }
    }

    /// Merges the staging table into the table inside the open transaction.
    /// `first`: this is a first load's fallback; rows already in the table
    /// came from this extract, and `cursor_column` says which of them are
    /// newer than a staged row.
    async fn merge(&self, plan: &RunPlan, first: Option<Option<&str>>) -> Result<MergeCounts, LoadError> {
        let table = self.qualified();
        let soft = self.soft();
        let deletes = self.options.deletes;
        let stage = format!("pg_temp.{}", quote_ident(&plan.stage));
        let latest = format!("pg_temp.{}", quote_ident(&format!("{}_latest", plan.stage)));
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
        let upsert = |source: &str| {
            format!(
                "WITH written AS (
                    INSERT INTO {table} AS t ({ins}, {run_col}, {loaded_col})
                    SELECT {sel}, $1::bigint, now() FROM {source}{live_only}
                    ON CONFLICT ({key}) DO UPDATE SET {set} WHERE {changed}
                    RETURNING (t.xmax = 0) AS inserted, {returning_deleted} AS deleted
                 )
                 SELECT count(*) FILTER (WHERE inserted AND NOT deleted),
                        count(*) FILTER (WHERE NOT inserted AND NOT deleted),
                        count(*) FILTER (WHERE deleted)
                 FROM written",
                ins = insert_cols.join(", "),
                sel = select_cols.join(", "),
                key = key.join(", "),
                set = set.join(", "),
            )
        };
        let err = self.err();
        let counts = |row: tokio_postgres::Row, total: i64, hard: u64| -> MergeCounts {
            (row.get(0), row.get(1), row.get(2), total, hard as i64)
        };

        // Most extracts hold each key once: upsert straight from staging and
        // let Postgres say otherwise (a row affected twice is a cardinality
        // violation), then resolve duplicates and upsert again. With deleted
        // rows and deletes = hard|ignore the live-only filter could hide a
        // duplicate, so those always resolve first.
        let straight = first.is_none() && (soft || plan.staged_deleted == 0);
        if straight {
            self.sql("SAVEPOINT nightjar_merge").await?;
            match self.client.query_one(&upsert(&stage), &[&plan.run]).await {
                Ok(row) => {
                    self.sql("RELEASE SAVEPOINT nightjar_merge").await?;
                    return Ok(counts(row, plan.staged_rows as i64, 0));
                }
                Err(e) if e.code() == Some(&SqlState::CARDINALITY_VIOLATION) => {
                    self.sql("ROLLBACK TO SAVEPOINT nightjar_merge").await?;
                }
                Err(e) => return Err(err(e)),
            }
        }
        // Duplicate keys within one extract: keep the highest cursor, then the
        // last to arrive, so the upsert never touches a row twice.
        let dedupe = format!(
            "CREATE TEMP TABLE {} ON COMMIT DROP AS
             SELECT DISTINCT ON ({key}) * FROM {stage}
             ORDER BY {key}, {cursor} DESC NULLS LAST, {seq} DESC",
            quote_ident(&format!("{}_latest", plan.stage)),
            key = key.join(", "),
            cursor = quote_ident(CURSOR_COLUMN),
            seq = quote_ident(SEQ_COLUMN),
        );
        self.sql(&dedupe).await?;
        let key_match: Vec<String> = key.iter().map(|k| format!("t.{k} = l.{k}")).collect();
        let key_match = key_match.join(" AND ");
        if let Some(Some(cursor_col)) = first {
            // A first load's own rows that are newer than a staged one win.
            self.sql(&format!(
                "DELETE FROM {latest} AS l USING {table} AS t WHERE {key_match}
                 AND t.{c} > 'epoch'::timestamptz + l.{cursor} * interval '1 millisecond'",
                c = quote_ident(cursor_col),
                cursor = quote_ident(CURSOR_COLUMN),
            ))
            .await?;
        }
        let total: i64 = self
            .client
            .query_one(&format!("SELECT count(*) FROM {latest}{live_only}"), &[])
            .await
            .map_err(&err)?
            .get(0);
        let row = self.client.query_one(&upsert(&latest), &[&plan.run]).await.map_err(&err)?;
        // Hard deletes; in a first load, deleted records also remove the
        // older rows of their key that this load wrote (deletes = ignore).
        let hard = if deletes == DeleteMode::Hard || (first.is_some() && !soft) {
            let sql = format!("DELETE FROM {table} AS t USING {latest} AS l WHERE {key_match} AND {flag}");
            self.client.execute(&sql, &[]).await.map_err(&err)?
        } else {
            0
        };
        Ok(counts(row, total, hard))
    }

    async fn commit_merge(&mut self, plan: &RunPlan) -> Result<LoadCounts, LoadError> {
        let table = self.qualified();
        let soft_col = quote_ident(SOFT_DELETE_COLUMN);
        self.begin().await?;
        for c in &plan.add_columns {
            self.sql(&format!("ALTER TABLE {table} ADD COLUMN {} {}", quote_ident(&c.name), pg_type(c.ty))).await?;
        }
        if plan.add_soft_delete {
            self.sql(&format!("ALTER TABLE {table} ADD COLUMN {soft_col} boolean NOT NULL DEFAULT false")).await?;
        }
        let (inserted, updated, soft_deleted, total, hard_deleted) =
            if plan.staged_rows > 0 { self.merge(plan, None).await? } else { (0, 0, 0, 0, 0) };
        if plan.stage_ready {
            self.sql(&format!("DROP TABLE pg_temp.{}", quote_ident(&plan.stage))).await?;
        }
        pause_point("commit");
        self.sql("COMMIT").await?;
        self.in_transaction = false;
        Ok(LoadCounts {
            inserted: inserted as u64,
            updated: updated as u64,
            unchanged: (total - inserted - updated - soft_deleted).max(0) as u64,
            deleted: (soft_deleted + hard_deleted) as u64,
        })
    }

    async fn commit_first_load(&mut self, plan: &RunPlan, first: &FirstLoad) -> Result<LoadCounts, LoadError> {
        let table = self.qualified();
        let mut counts = LoadCounts { inserted: first.live, updated: 0, unchanged: 0, deleted: first.soft_deleted };
        if plan.staged_rows > 0 {
            let cursor = first.cursor_column.as_ref().and_then(|c| c.as_deref());
            self.merge(plan, Some(cursor)).await?;
            // The table was empty: what is in it now is what this load wrote.
            let sql = if self.soft() {
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
        if plan.stage_ready {
            self.sql(&format!("DROP TABLE pg_temp.{}", quote_ident(&plan.stage))).await?;
        }
        pause_point("commit");
        self.sql("COMMIT").await?;
        self.in_transaction = false;
        Ok(counts)
    }
}

#[async_trait]
impl Target for PostgresTarget {
    async fn prepare(&mut self, schema: &TargetSchema, run: RunId) -> Result<(), LoadError> {
        let table = self.qualified();
        let existing = self.existing_columns().await?;
        let mut plan = RunPlan {
            run,
            schema: schema.clone(),
            stage: format!("_nightjar_stage_{run}"),
            add_columns: Vec::new(),
            add_soft_delete: false,
            stage_ready: false,
            staged_rows: 0,
            staged_deleted: 0,
            first: None,
        };
        if existing.is_empty() {
            if !self.options.create {
                return Err(LoadError::Schema {
                    target: self.name(),
                    message:
                        "the table does not exist and the job has `create = false`; create it or set `create = true`"
                            .into(),
                });
            }
            // Created inside the load's transaction: a failed first load
            // leaves no table behind, let alone rows.
            self.begin().await?;
            if let Some(s) = &self.schema_name {
                self.sql(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(s))).await?;
            }
            let soft = self.soft().then_some("boolean NOT NULL DEFAULT false");
            let defs = table_columns(schema, pg_type, soft, "bigint", "timestamp with time zone");
            self.sql(&format!("CREATE TABLE IF NOT EXISTS {table} ({defs})")).await?;
            plan.first = Some(self.first_load().await?);
        } else {
            let evolution = plan_evolution(
                &self.name(),
                "table",
                schema,
                &existing,
                |t| pg_reported_type(t).to_string(),
                &self.options,
            )?;
            // Writers wait while the table is checked (and, if empty, loaded);
            // readers never do.
            self.begin().await?;
            self.sql(&format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")).await?;
            let has_rows: bool = self
                .client
                .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])
                .await
                .map_err(self.err())?
                .get(0);
            if has_rows {
                self.sql("COMMIT").await?;
                self.in_transaction = false;
                plan.add_columns = evolution.add_columns;
                plan.add_soft_delete = evolution.add_soft_delete;
                self.create_stage(&mut plan).await?;
            } else {
                for c in &evolution.add_columns {
                    self.sql(&format!("ALTER TABLE {table} ADD COLUMN {} {}", quote_ident(&c.name), pg_type(c.ty)))
                        .await?;
                }
                if evolution.add_soft_delete {
                    self.sql(&format!(
                        "ALTER TABLE {table} ADD COLUMN {} boolean NOT NULL DEFAULT false",
                        quote_ident(SOFT_DELETE_COLUMN)
                    ))
                    .await?;
                }
                plan.first = Some(self.first_load().await?);
            }
        }
        self.run = Some(plan);
        Ok(())
    }

    async fn stage(&mut self, page: &DataFrame) -> Result<(), LoadError> {
        let name = self.name();
        let mut plan = self.run.take().ok_or_else(|| LoadError::OutOfOrder { target: name, stage: "stage" })?;
        let result = if page.height() == 0 {
            Ok(())
        } else if plan.first.is_some() {
            self.stage_first_load(&mut plan, page).await
        } else {
            self.stage_rows(&mut plan, page).await
        };
        self.run = Some(plan);
        result
    }

    async fn commit(&mut self) -> Result<LoadCounts, LoadError> {
        let name = self.name();
        let mut plan = self.run.take().ok_or_else(|| LoadError::OutOfOrder { target: name, stage: "commit" })?;
        let result = match plan.first.take() {
            Some(first) => self.commit_first_load(&plan, &first).await,
            None => self.commit_merge(&plan).await,
        };
        if result.is_err() && self.in_transaction {
            self.in_transaction = false;
            if let Err(e) = self.client.batch_execute("ROLLBACK").await {
                tracing::warn!(error = %e, "rolling back the failed commit also failed");
            }
        }
        result
    }

    async fn abort(&mut self) -> Result<(), LoadError> {
        let plan = self.run.take();
        if self.in_transaction {
            self.in_transaction = false;
            // Everything of a first load, staging included, goes with it.
            self.sql("ROLLBACK").await?;
        } else if let Some(plan) = plan
            && plan.stage_ready
        {
            self.sql(&format!("DROP TABLE IF EXISTS pg_temp.{}", quote_ident(&plan.stage))).await?;
        }
        Ok(())
    }
}

impl Drop for PostgresTarget {
    fn drop(&mut self) {
        // The client's drop closes the session (rolling back an open
        // transaction); the driver task then ends on its own, but there is no
        // reason to keep it scheduled.
        self.driver.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (ndigits, weight, sign, dscale, digits) of a binary numeric.
    fn numeric(text: &str) -> Option<(i16, i16, u16, i16, Vec<i16>)> {
        let mut buf = Vec::new();
        write_numeric(&mut buf, text)?;
        let word = |i: usize| i16::from_be_bytes([buf[4 + 2 * i], buf[5 + 2 * i]]);
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert_eq!(len, buf.len() - 4);
        let n = word(0);
        Some((n, word(1), word(2) as u16, word(3), (0..n as usize).map(|i| word(4 + i)).collect()))
    }

    #[test]
    fn decimals_become_base_10000_numerics() {
        assert_eq!(numeric("1234.50"), Some((2, 0, 0, 2, vec![1234, 5000])));
        assert_eq!(numeric("0.05"), Some((1, -1, 0, 2, vec![500])));
        assert_eq!(numeric("-100000"), Some((1, 1, 0x4000, 0, vec![10])));
        assert_eq!(numeric("12345678.9"), Some((3, 1, 0, 1, vec![1234, 5678, 9000])));
        assert_eq!(numeric("0.00001234"), Some((1, -2, 0, 8, vec![1234])));
        assert_eq!(numeric("0"), Some((0, 0, 0, 0, vec![])));
        assert_eq!(numeric("-0.00"), Some((0, 0, 0, 2, vec![])));
        assert_eq!(numeric("7"), Some((1, 0, 0, 0, vec![7])));
        for bad in ["", "-", "1e5", "NaN", "1.2.3", " 1", "."] {
            assert_eq!(numeric(bad), None, "{bad}");
        }
    }
}
