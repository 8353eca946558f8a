//! SQLite target: a temp staging table per run, merged with
//! `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE changed` in one
//! transaction (the merge of `merge.rs`, in SQLite's dialect).
//!
//! rusqlite is synchronous and a commit may wait on another writer's lock
//! for the busy timeout, so every database call runs on the blocking pool:
//! the connection moves into the blocking task and back. A run cancelled
//! mid-call drops the connection with the task, which rolls back whatever
//! it had open.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};

use super::merge::{
    Evolution, MergePlan, MergeTally, STAGED_CURSOR, STAGED_DELETED, STAGED_SEQ, SqlDialect, render_sql,
};
use super::{LoadCounts, LoadError, Target, quote_ident, table_columns};
use crate::hooks::{HookPoint, SharedHooks};
use crate::schema::values::Cell;
use crate::schema::{ColumnType, MappedPage, SOFT_DELETE_COLUMN};
use crate::state::ts;

/// How long a write waits for another writer before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct SqliteTarget {
    path: PathBuf,
    table: String,
    /// `None` only while a call is running on the blocking pool (or after
    /// one was cancelled).
    conn: Option<Connection>,
    run: Option<RunState>,
    hooks: SharedHooks,
}

/// What `prepare` learned, used by `stage` and `commit`.
struct RunState {
    plan: MergePlan,
    stage_table: String,
    evolution: Evolution,
    seq: i64,
}

struct Sqlite;

impl SqlDialect for Sqlite {
    fn changed(&self, old: &[String], new: &[String]) -> String {
        old.iter().zip(new).map(|(a, b)| format!("{a} IS NOT {b}")).collect::<Vec<_>>().join(" OR ")
    }
    fn false_literal(&self) -> &'static str {
        "0"
    }
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

/// A cell as SQLite stores it: the audited typed view, never `AnyValue`.
fn sql_value(cell: Cell<'_>) -> Value {
    match cell {
        Cell::Null => Value::Null,
        Cell::Integer(v) => Value::Integer(v),
        Cell::Float(v) => Value::Real(v),
        Cell::Boolean(v) => Value::Integer(v.into()),
        other => other.to_text().map_or(Value::Null, |t| Value::Text(t.into_owned())),
    }
}

impl SqliteTarget {
    pub async fn open(path: &Path, table: &str, hooks: SharedHooks) -> Result<SqliteTarget, LoadError> {
        let target = format!("sqlite {} table {table}", path.display());
        let path_buf = path.to_path_buf();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, LoadError> {
            if let Some(dir) = path_buf.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| LoadError::Io {
                    target: target.clone(),
                    op: "creating the directory",
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            let wrap = |source| LoadError::Sqlite { target: target.clone(), source };
            let conn = Connection::open(&path_buf).map_err(wrap)?;
            conn.busy_timeout(BUSY_TIMEOUT).map_err(wrap)?;
            conn.pragma_update(None, "journal_mode", "WAL").map_err(wrap)?;
            Ok(conn)
        })
        .await
        .map_err(|e| LoadError::Internal { target: format!("sqlite {}", path.display()), message: e.to_string() })??;
        Ok(SqliteTarget { path: path.to_path_buf(), table: table.to_string(), conn: Some(conn), run: None, hooks })
    }

    fn name(&self) -> String {
        format!("sqlite {} table {}", self.path.display(), self.table)
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Connection, &str) -> Result<T, LoadError> + Send + 'static,
    ) -> Result<T, LoadError> {
        let name = self.name();
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| LoadError::Internal { target: name.clone(), message: "the connection is gone".into() })?;
        let task_name = name.clone();
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut conn, &task_name);
            (conn, result)
        })
        .await
        .map_err(|e| LoadError::Internal { target: name, message: format!("a database call stopped: {e}") })?;
        self.conn = Some(conn);
        result
    }
}

fn existing_columns(
    conn: &Connection,
    table: &str,
    err: &impl Fn(rusqlite::Error) -> LoadError,
) -> Result<Vec<(String, String)>, LoadError> {
    let mut stmt = conn.prepare("SELECT name, type FROM pragma_table_info(?1)").map_err(err)?;
    let rows = stmt.query_map([table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(err)
}

#[async_trait]
impl Target for SqliteTarget {
    async fn prepare(&mut self, plan: &MergePlan) -> Result<(), LoadError> {
        let table = self.table.clone();
        let plan_for_task = plan.clone();
        let (stage_table, evolution) = self
            .blocking(move |conn, name| {
                let plan = plan_for_task;
                let err = |source| LoadError::Sqlite { target: name.to_string(), source };
                let quoted = quote_ident(&table);
                let existing = existing_columns(conn, &table, &err)?;
                let evolution = if existing.is_empty() {
                    if !plan.create {
                        return Err(LoadError::Setup {
                            target: name.to_string(),
                            message: "the table does not exist and the job has `create = false`; create it or set `create = true`".into(),
                        });
                    }
                    let soft = plan.soft().then_some("INTEGER NOT NULL DEFAULT 0");
                    let defs = table_columns(&plan.schema, |t| sql_type(t).to_string(), soft, "INTEGER", "TEXT");
                    conn.execute(&format!("CREATE TABLE IF NOT EXISTS {quoted} ({defs})"), []).map_err(err)?;
                    Evolution::default()
                } else {
                    // SQLite reports declared types in the case they were written.
                    let existing: Vec<(String, String)> =
                        existing.into_iter().map(|(n, t)| (n, t.to_ascii_uppercase())).collect();
                    plan.evolution(name, "table", &existing, |t| sql_type(t).to_string())?
                };
                // A temp table lives only as long as this connection: a killed
                // run leaves no staging behind. Its primary key keeps the
                // newest row of each key (merge rule 1) as pages arrive.
                let stage_table = format!("_nightjar_stage_{}", plan.run);
                let mut defs: Vec<String> = plan
                    .schema
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", quote_ident(&c.name), sql_type(c.ty)))
                    .collect();
                defs.push(format!("{} INTEGER", quote_ident(STAGED_CURSOR)));
                defs.push(format!("{} INTEGER", quote_ident(STAGED_DELETED)));
                defs.push(format!("{} INTEGER", quote_ident(STAGED_SEQ)));
                let key: Vec<String> = plan.schema.key.iter().map(|k| quote_ident(k)).collect();
                defs.push(format!("PRIMARY KEY ({})", key.join(", ")));
                let stage = quote_ident(&stage_table);
                conn.execute_batch(&format!(
                    "DROP TABLE IF EXISTS temp.{stage}; CREATE TEMP TABLE {stage} ({});",
                    defs.join(", ")
                ))
                .map_err(err)?;
                Ok((stage_table, evolution))
            })
            .await?;
        self.run = Some(RunState { plan: plan.clone(), stage_table, evolution, seq: 0 });
        Ok(())
    }

    async fn stage(&mut self, page: MappedPage) -> Result<(), LoadError> {
        let name = self.name();
        let state = self
            .run
            .as_mut()
            .ok_or_else(|| LoadError::Internal { target: name, message: "stage called before prepare".into() })?;
        let plan = state.plan.clone();
        let stage_table = state.stage_table.clone();
        let first_seq = state.seq;
        state.seq += page.height() as i64;
        let hooks = self.hooks.clone();
        let number = page.number;
        self.blocking(move |conn, name| {
            let internal = |message: String| LoadError::Internal { target: name.to_string(), message };
            let columns = crate::schema::values::typed_columns(
                &page.rows,
                plan.schema.columns.iter().map(|c| (c.name.as_str(), c.ty)),
            )
            .map_err(internal)?;
            let mut names: Vec<String> = plan.schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
            names.extend([STAGED_CURSOR, STAGED_DELETED, STAGED_SEQ].map(quote_ident));
            let key: Vec<String> = plan.schema.key.iter().map(|k| quote_ident(k)).collect();
            let set: Vec<String> = names.iter().map(|q| format!("{q} = excluded.{q}")).collect();
            // Merge rule 1 as pages arrive: a key seen again keeps the row
            // with the higher cursor, on a tie the later one.
            let c = quote_ident(STAGED_CURSOR);
            let sql = format!(
                "INSERT INTO temp.{} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {} WHERE excluded.{c} >= {c} OR {c} IS NULL",
                quote_ident(&stage_table),
                names.join(", "),
                vec!["?"; names.len()].join(", "),
                key.join(", "),
                set.join(", "),
            );
            let err = |source| LoadError::Sqlite { target: name.to_string(), source };
            let tx = conn.transaction().map_err(err)?;
            {
                let mut insert = tx.prepare(&sql).map_err(err)?;
                let mut row: Vec<Value> = Vec::with_capacity(names.len());
                for i in 0..page.height() {
                    row.clear();
                    row.extend(columns.iter().map(|c| sql_value(c.get(i))));
                    row.push(page.cursor.as_ref().and_then(|c| c.get(i)).map_or(Value::Null, Value::Integer));
                    row.push(Value::Integer(page.is_deleted(i).into()));
                    row.push(Value::Integer(first_seq + i as i64));
                    insert.execute(params_from_iter(row.iter())).map_err(err)?;
                }
            }
            tx.commit().map_err(err)?;
            hooks.reached(HookPoint::PageStaged(number));
            Ok(())
        })
        .await
    }

    async fn commit(&mut self) -> Result<LoadCounts, LoadError> {
        let name = self.name();
        let state = self
            .run
            .take()
            .ok_or_else(|| LoadError::Internal { target: name, message: "commit called before prepare".into() })?;
        let table = quote_ident(&self.table);
        let hooks = self.hooks.clone();
        self.blocking(move |conn, name| {
            let RunState { plan, stage_table, evolution, .. } = state;
            let stage = format!("temp.{}", quote_ident(&stage_table));
            let sql = render_sql(&plan, &Sqlite, &table, &stage, "?1", "?2", "");
            let err = |source| LoadError::Sqlite { target: name.to_string(), source };
            let flag = format!("COALESCE(s.{}, 0)", quote_ident(STAGED_DELETED));
            let key_match: Vec<String> =
                plan.schema.key.iter().map(|k| format!("t.{k} = s.{k}", k = quote_ident(k))).collect();
            // IMMEDIATE: take the write lock first, waiting (busy timeout)
            // for another writer. A deferred transaction that reads and
            // then writes cannot wait: SQLite refuses its upgrade at once.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
            for c in &evolution.add_columns {
                tx.execute(&format!("ALTER TABLE {table} ADD COLUMN {} {}", quote_ident(&c.name), sql_type(c.ty)), [])
                    .map_err(err)?;
            }
            if evolution.add_soft_delete {
                tx.execute(
                    &format!(
                        "ALTER TABLE {table} ADD COLUMN {} INTEGER NOT NULL DEFAULT 0",
                        quote_ident(SOFT_DELETE_COLUMN)
                    ),
                    [],
                )
                .map_err(err)?;
            }
            let scalar = |sql: &str| -> Result<u64, LoadError> {
                tx.query_row(sql, [], |r| r.get::<_, i64>(0)).map(|n| n.max(0) as u64).map_err(err)
            };
            let considered = scalar(&format!("SELECT count(*) FROM {stage} s WHERE {}", sql.considered))?;
            let new_live = scalar(&format!(
                "SELECT count(*) FROM {stage} s WHERE NOT {flag} AND NOT EXISTS (SELECT 1 FROM {table} t WHERE {})",
                key_match.join(" AND ")
            ))?;
            let upsert = (sql.upsert_from)(&stage);
            let now = ts(Utc::now());
            let (written, written_deleted) = if plan.soft() {
                let returning = format!("{upsert} RETURNING {}", quote_ident(SOFT_DELETE_COLUMN));
                let mut stmt = tx.prepare(&returning).map_err(err)?;
                let mut rows = stmt.query(rusqlite::params![plan.run, now]).map_err(err)?;
                let (mut written, mut deleted) = (0u64, 0u64);
                while let Some(row) = rows.next().map_err(err)? {
                    written += 1;
                    deleted += u64::from(row.get::<_, i64>(0).map_err(err)? != 0);
                }
                (written, deleted)
            } else {
                (tx.execute(&upsert, rusqlite::params![plan.run, now]).map_err(err)? as u64, 0)
            };
            let hard_deleted = if plan.deletes == crate::config::DeleteMode::Hard {
                tx.execute(&(sql.hard_delete_from)(&stage), []).map_err(err)? as u64
            } else {
                0
            };
            tx.execute_batch(&format!("DROP TABLE {stage}")).map_err(err)?;
            hooks.reached(HookPoint::BeforeCommit);
            tx.commit().map_err(err)?;
            Ok(MergeTally { considered, written, written_new_live: new_live, written_deleted, hard_deleted }.counts())
        })
        .await
    }

    async fn abort(&mut self) -> Result<(), LoadError> {
        if let Some(state) = self.run.take()
            && self.conn.is_some()
        {
            let sql = format!("DROP TABLE IF EXISTS temp.{}", quote_ident(&state.stage_table));
            self.blocking(move |conn, name| {
                conn.execute_batch(&sql).map_err(|source| LoadError::Sqlite { target: name.to_string(), source })
            })
            .await?;
        }
        Ok(())
    }
}
