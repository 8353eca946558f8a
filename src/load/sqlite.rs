//! SQLite target: a temp staging table per run, merged with
//! `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE changed` in one transaction.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::Utc;
use polars::prelude::*;
use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};

use super::{
    LOADED_AT_COLUMN, LoadCounts, LoadError, RUN_ID_COLUMN, SOFT_DELETE_COLUMN, Target, TargetOptions, pause_point,
    plan_evolution, quote_ident, staged_columns, table_columns,
};
use crate::config::DeleteMode;
use crate::state::{RunId, ts};
use crate::transform::{
    CURSOR_COLUMN, ColumnType, DELETED_COLUMN, TargetColumn, TargetSchema, format_date, format_time,
    format_timestamp_ms,
};

pub struct SqliteTarget {
    path: PathBuf,
    table: String,
    options: TargetOptions,
    conn: Connection,
    run: Option<RunPlan>,
}

/// What `prepare` learned, used by `stage` and `commit`.
struct RunPlan {
    run: RunId,
    schema: TargetSchema,
    stage_table: String,
    /// Mapped columns the table lacks, added inside the commit transaction.
    add_columns: Vec<TargetColumn>,
    add_soft_delete: bool,
}

fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text => "TEXT",
        ColumnType::Integer | ColumnType::Boolean => "INTEGER",
        ColumnType::Float => "REAL",
        // RFC 3339 UTC with milliseconds: sorts and compares correctly as text.
        ColumnType::Timestamp => "TEXT",
        // ISO dates and times sort as text too. Decimals stay TEXT: SQLite's
        // NUMERIC affinity would turn them into lossy floating point.
        ColumnType::Date | ColumnType::Time | ColumnType::Decimal { .. } | ColumnType::Json => "TEXT",
    }
}

fn sql_value(value: AnyValue<'_>) -> Value {
    match value {
        AnyValue::Null => Value::Null,
        AnyValue::String(s) => Value::Text(s.to_string()),
        AnyValue::StringOwned(s) => Value::Text(s.to_string()),
        AnyValue::Int64(v) => Value::Integer(v),
        AnyValue::Int32(v) => Value::Integer(v.into()),
        AnyValue::Float64(v) => Value::Real(v),
        AnyValue::Boolean(v) => Value::Integer(v.into()),
        AnyValue::Datetime(ms, TimeUnit::Milliseconds, _) => {
            format_timestamp_ms(ms).map(Value::Text).unwrap_or(Value::Null)
        }
        AnyValue::Date(days) => format_date(days).map(Value::Text).unwrap_or(Value::Null),
        AnyValue::Time(nanos) => format_time(nanos).map(Value::Text).unwrap_or(Value::Null),
        other => Value::Text(other.to_string()),
    }
}

impl SqliteTarget {
    pub fn open(path: &Path, options: TargetOptions) -> Result<SqliteTarget, LoadError> {
        let table = options.table.clone();
        let target = format!("sqlite {} table {table}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LoadError::Dir {
                target: target.clone(),
                path: path.display().to_string(),
                source,
            })?;
        }
        let wrap = |source| LoadError::Sqlite { target: target.clone(), source };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(wrap)?;
        Ok(SqliteTarget { path: path.to_path_buf(), table, options, conn, run: None })
    }

    fn name(&self) -> String {
        format!("sqlite {} table {}", self.path.display(), self.table)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> LoadError + '_ {
        move |source| LoadError::Sqlite { target: self.name(), source }
    }

    fn existing_columns(&self) -> Result<Vec<(String, String)>, LoadError> {
        let mut stmt = self.conn.prepare("SELECT name, type FROM pragma_table_info(?1)").map_err(self.err())?;
        let rows = stmt
            .query_map([&self.table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    fn soft(&self) -> bool {
        self.options.deletes == DeleteMode::Soft
    }
}

#[async_trait]
impl Target for SqliteTarget {
    async fn prepare(&mut self, schema: &TargetSchema, run: RunId) -> Result<(), LoadError> {
        let table = quote_ident(&self.table);
        let existing = self.existing_columns()?;
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
            let soft = self.soft().then_some("INTEGER NOT NULL DEFAULT 0");
            let defs = table_columns(schema, |t| sql_type(t).to_string(), soft, "INTEGER", "TEXT");
            self.conn.execute(&format!("CREATE TABLE IF NOT EXISTS {table} ({defs})"), []).map_err(self.err())?;
        } else {
            // SQLite reports declared types in the case they were written.
            let existing: Vec<(String, String)> =
                existing.into_iter().map(|(n, t)| (n, t.to_ascii_uppercase())).collect();
            let evolution =
                plan_evolution(&self.name(), "table", schema, &existing, |t| sql_type(t).to_string(), &self.options)?;
            add_columns = evolution.add_columns;
            add_soft_delete = evolution.add_soft_delete;
        }

        // A temp table lives only as long as this connection: a killed run
        // leaves no staging behind.
        let stage_table = format!("_nightjar_stage_{run}");
        let mut defs: Vec<String> =
            schema.columns.iter().map(|c| format!("{} {}", quote_ident(&c.name), sql_type(c.ty))).collect();
        defs.push(format!("{} INTEGER", quote_ident(CURSOR_COLUMN)));
        defs.push(format!("{} INTEGER", quote_ident(DELETED_COLUMN)));
        let key: Vec<String> = schema.key.iter().map(|k| quote_ident(k)).collect();
        defs.push(format!("PRIMARY KEY ({})", key.join(", ")));
        let stage = quote_ident(&stage_table);
        self.conn
            .execute_batch(&format!(
                "DROP TABLE IF EXISTS temp.{stage}; CREATE TEMP TABLE {stage} ({});",
                defs.join(", ")
            ))
            .map_err(self.err())?;
        self.run = Some(RunPlan { run, schema: schema.clone(), stage_table, add_columns, add_soft_delete });
        Ok(())
    }

    async fn stage(&mut self, page: &DataFrame) -> Result<(), LoadError> {
        let name = self.name();
        let plan = self.run.as_ref().ok_or_else(|| LoadError::OutOfOrder { target: name.clone(), stage: "stage" })?;
        let (names, columns) = staged_columns(&name, &plan.schema, page)?;
        let has_cursor = names.contains(&CURSOR_COLUMN);
        let quoted: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
        let key: Vec<String> = plan.schema.key.iter().map(|k| quote_ident(k)).collect();
        let set: Vec<String> = quoted.iter().map(|q| format!("{q} = excluded.{q}")).collect();
        // Two rows with one key in one extract: the higher cursor wins
        // (on a tie, the later row), so the merge never sees a key twice.
        let keep_newest = if has_cursor {
            let c = quote_ident(CURSOR_COLUMN);
            format!(" WHERE excluded.{c} >= {c} OR {c} IS NULL")
        } else {
            String::new()
        };
        let sql = format!(
            "INSERT INTO temp.{} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}{keep_newest}",
            quote_ident(&plan.stage_table),
            quoted.join(", "),
            vec!["?"; quoted.len()].join(", "),
            key.join(", "),
            set.join(", "),
        );
        let wrap = |source| LoadError::Sqlite { target: name.clone(), source };
        let tx = self.conn.unchecked_transaction().map_err(wrap)?;
        {
            let mut insert = tx.prepare(&sql).map_err(wrap)?;
            let mut row: Vec<Value> = Vec::with_capacity(columns.len());
            for i in 0..page.height() {
                row.clear();
                for col in &columns {
                    let value =
                        col.get(i).map_err(|e| LoadError::Schema { target: name.clone(), message: e.to_string() })?;
                    row.push(sql_value(value));
                }
                insert.execute(params_from_iter(row.iter())).map_err(wrap)?;
            }
        }
        tx.commit().map_err(wrap)?;
        Ok(())
    }

    async fn commit(&mut self) -> Result<LoadCounts, LoadError> {
        let name = self.name();
        let plan = self.run.take().ok_or_else(|| LoadError::OutOfOrder { target: name.clone(), stage: "commit" })?;
        let table = quote_ident(&self.table);
        let soft = self.soft();
        let deletes = self.options.deletes;
        let stage = format!("temp.{}", quote_ident(&plan.stage_table));
        let cols: Vec<String> = plan.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let key: Vec<String> = plan.schema.key.iter().map(|k| quote_ident(k)).collect();
        let key_match: Vec<String> = key.iter().map(|k| format!("t.{k} = s.{k}")).collect();
        let flag = format!("COALESCE(s.{}, 0)", quote_ident(DELETED_COLUMN));
        let soft_col = quote_ident(SOFT_DELETE_COLUMN);
        let run_col = quote_ident(RUN_ID_COLUMN);
        let loaded_col = quote_ident(LOADED_AT_COLUMN);

        let mut insert_cols = cols.clone();
        let mut select_cols: Vec<String> = cols.iter().map(|c| format!("s.{c}")).collect();
        let mut compared: Vec<String> = cols.iter().filter(|c| !key.contains(c)).cloned().collect();
        if soft {
            insert_cols.push(soft_col.clone());
            select_cols.push(flag.clone());
            compared.push(soft_col.clone());
        }
        let mut set: Vec<String> = compared.iter().map(|c| format!("{c} = excluded.{c}")).collect();
        set.push(format!("{run_col} = excluded.{run_col}"));
        set.push(format!("{loaded_col} = excluded.{loaded_col}"));
        // Unchanged rows are left alone, so re-running a window rewrites nothing.
        let changed = if compared.is_empty() {
            "false".to_string()
        } else {
            compared.iter().map(|c| format!("{table}.{c} IS NOT excluded.{c}")).collect::<Vec<_>>().join(" OR ")
        };
        // Soft mode loads deleted rows with the flag set; the other modes load live rows only.
        let live_only = if soft { String::new() } else { format!(" AND {flag} = 0") };
        let merge = format!(
            "INSERT INTO {table} ({ins}, {run_col}, {loaded_col}) SELECT {sel}, ?1, ?2 FROM {stage} s WHERE true{live_only} \
             ON CONFLICT ({key}) DO UPDATE SET {set} WHERE {changed}",
            ins = insert_cols.join(", "),
            sel = select_cols.join(", "),
            key = key.join(", "),
            set = set.join(", "),
        );
        let exists = format!("EXISTS (SELECT 1 FROM {table} t WHERE {})", key_match.join(" AND "));
        let count = |cond: &str| format!("SELECT count(*) FROM {stage} s WHERE {cond}");
        let considered = count(&format!("true{live_only}"));
        let new_live = count(&format!("NOT {exists} AND {flag} = 0"));
        // Soft mode: deleted rows that are new, or that flip a live row's flag.
        let new_deleted = count(&format!("NOT {exists} AND {flag} = 1"));
        let flips = count(&format!(
            "{flag} = 1 AND EXISTS (SELECT 1 FROM {table} t WHERE {} AND t.{soft_col} = 0)",
            key_match.join(" AND ")
        ));
        let hard_delete = {
            let m: Vec<String> = key.iter().map(|k| format!("{table}.{k} = s.{k}")).collect();
            format!(
                "DELETE FROM {table} WHERE EXISTS (SELECT 1 FROM {stage} s WHERE {} AND {flag} = 1)",
                m.join(" AND ")
            )
        };

        let err = |source| LoadError::Sqlite { target: name.clone(), source };
        let tx = self.conn.unchecked_transaction().map_err(err)?;
        for c in &plan.add_columns {
            tx.execute(&format!("ALTER TABLE {table} ADD COLUMN {} {}", quote_ident(&c.name), sql_type(c.ty)), [])
                .map_err(err)?;
        }
        if plan.add_soft_delete {
            tx.execute(&format!("ALTER TABLE {table} ADD COLUMN {soft_col} INTEGER NOT NULL DEFAULT 0"), [])
                .map_err(err)?;
        }
        let scalar = |sql: &str| -> Result<i64, LoadError> { tx.query_row(sql, [], |r| r.get(0)).map_err(err) };
        let total = scalar(&considered)?;
        let inserted = scalar(&new_live)?;
        let soft_deleted = if soft { scalar(&new_deleted)? + scalar(&flips)? } else { 0 };
        let written = tx.execute(&merge, rusqlite::params![plan.run, ts(Utc::now())]).map_err(err)? as i64;
        let hard_deleted =
            if deletes == DeleteMode::Hard { tx.execute(&hard_delete, []).map_err(err)? as i64 } else { 0 };
        tx.execute_batch(&format!("DROP TABLE {stage}")).map_err(err)?;
        pause_point("commit");
        tx.commit().map_err(err)?;
        Ok(LoadCounts {
            inserted: inserted as u64,
            updated: (written - inserted - soft_deleted).max(0) as u64,
            unchanged: (total - written).max(0) as u64,
            deleted: (soft_deleted + hard_deleted) as u64,
        })
    }

    async fn abort(&mut self) -> Result<(), LoadError> {
        if let Some(plan) = self.run.take() {
            let sql = format!("DROP TABLE IF EXISTS temp.{}", quote_ident(&plan.stage_table));
            self.conn.execute_batch(&sql).map_err(self.err())?;
        }
        Ok(())
    }
}
