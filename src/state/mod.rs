//! The state DB (SQLite, WAL): run history, watermarks, rejects, job locks,
//! the alert outbox.
//!
//! It is the single source of truth for history; `run`, `history` and
//! `serve` open it at the same time, hence WAL and a busy timeout. Schema
//! changes are migrations so an older state file upgrades in place.
//!
//! [`StateDb`] is the synchronous store; [`StateStore`] is the handle async
//! code uses: every call runs on one dedicated thread that owns the
//! connection, so a slow or locked state DB never stalls the async workers.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};
use serde::Serialize;
use thiserror::Error;

mod handle;
mod locks;
mod outbox;
pub use handle::{JobLock, StateStore};
pub use locks::*;
pub use outbox::*;

pub use crate::outcome::RunStatus;

/// Rejected rows kept per run; the rest are counted, not stored, so one bad
/// deploy cannot fill the disk.
pub const REJECTS_KEPT_PER_RUN: usize = 1000;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state DB {path}: {source}; check the path and its permissions (--state or [state].path)")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("state DB {path}: upgrading the schema failed: {source}")]
    Migrate { path: PathBuf, source: rusqlite_migration::Error },
    #[error("state DB {path}: cannot create its directory: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("state DB {path}: cannot restrict it to its owner (mode 0600): {source}")]
    Permissions { path: PathBuf, source: std::io::Error },
    #[error("state DB: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state DB holds an unreadable timestamp `{0}`")]
    BadTimestamp(String),
    #[error(
        "state DB {path}: {reason}; it is not a nightjar state DB, so nothing was written to it: move it away or point --state / [state].path elsewhere"
    )]
    Foreign { path: PathBuf, reason: String },
    #[error(
        "state DB {path} has schema version {found}, newer than this nightjar knows ({known}); run a newer nightjar"
    )]
    TooNew { path: PathBuf, found: i64, known: usize },
    #[error("state DB: the state thread stopped ({0}); restart nightjar")]
    Gone(String),
}

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/001_runs_watermarks.sql"),
    include_str!("migrations/002_alert_outbox.sql"),
    include_str!("migrations/003_oauth_tokens.sql"),
    include_str!("migrations/004_job_locks.sql"),
    include_str!("migrations/005_rows_filtered.sql"),
    include_str!("migrations/006_rows_reported.sql"),
];

fn migrations() -> Migrations<'static> {
    Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect())
}

/// `PRAGMA application_id` of a nightjar state DB ("NJAR"): tells our file
/// from any other SQLite database.
const APPLICATION_ID: i64 = 0x4E4A_4152;

pub type RunId = i64;

/// Row counts of one run, as history shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunCounts {
    pub pages: u64,
    pub extracted: u64,
    /// Dropped by the mapping's `filter`.
    pub filtered: u64,
    pub rejected: u64,
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    /// Salesforce API requests made, retries included.
    pub api_calls: u64,
    /// Rows Salesforce said the query produced (`numberRecordsProcessed`);
    /// `extracted` must equal it for a run to commit.
    pub reported: Option<u64>,
}

/// How a run ended, written when it closes.
#[derive(Debug, Clone)]
pub struct RunEnd {
    pub status: RunStatus,
    pub counts: RunCounts,
    pub salesforce_job_ids: Vec<String>,
    pub error_class: Option<String>,
    pub error: Option<String>,
}

/// One row of history.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub id: RunId,
    pub job: String,
    pub status: RunStatus,
    pub trigger: String,
    /// 1 for a first attempt; retries of a failed run count up.
    pub attempt: u32,
    /// A retry's first attempt.
    pub retry_of: Option<RunId>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
    pub window_start: Option<String>,
    pub window_end: Option<String>,
    pub watermark_before: Option<String>,
    pub watermark_after: Option<String>,
    pub counts: RunCounts,
    pub salesforce_job_ids: Vec<String>,
    pub error_class: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub job: Option<String>,
    pub status: Option<RunStatus>,
    pub limit: Option<u32>,
    /// Only runs with an id at least this (the demo prints its own runs).
    pub min_id: Option<RunId>,
    /// Only runs started at or after this.
    pub since: Option<DateTime<Utc>>,
}

/// Time spent in one step of a run (plan, extract, transform, load, commit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    pub step: String,
    pub started_at: String,
    pub duration_ms: i64,
}

/// A run still marked `running` whose process is gone.
#[derive(Debug, Clone)]
pub struct OrphanedRun {
    pub run: RunRecord,
    pub pid: Option<u32>,
}

/// The trigger of the history row that records a manual watermark change.
pub const WATERMARK_TRIGGER: &str = "watermark";

#[derive(Debug, Clone, Serialize)]
pub struct RejectRecord {
    pub record_id: Option<String>,
    pub column: String,
    pub value: Option<String>,
    pub reason: String,
}

/// The synchronous state store; async code uses [`StateStore`].
pub struct StateDb {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// Timestamps in the state DB: RFC 3339 UTC with milliseconds, which sorts as text.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Opens (or with `create_new`, creates) a file readable by its owner only.
fn open_private(path: &Path, create_new: bool) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    if create_new {
        options.create_new(true);
    } else {
        options.create(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Refuses an SQLite file that is not ours (or from a newer nightjar).
fn check_ours(conn: &Connection, path: &Path, created: bool) -> Result<(), StateError> {
    let foreign = |reason: String| StateError::Foreign { path: path.into(), reason };
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| foreign(format!("it is not an SQLite database ({e})")))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| foreign(e.to_string()))?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table'", [], |r| r.get(0))
        .map_err(|e| foreign(e.to_string()))?;
    if app != 0 && app != APPLICATION_ID {
        return Err(foreign(format!("its application_id is {app:#x}, not nightjar's")));
    }
    if version as usize > MIGRATIONS.len() {
        return Err(StateError::TooNew { path: path.into(), found: version, known: MIGRATIONS.len() });
    }
    // State files of nightjar before application_id was set carry our
    // migrations' user_version and a `runs` table.
    if app == 0 && !created && tables > 0 {
        let runs: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'runs'", [], |r| r.get(0))
            .map_err(|e| foreign(e.to_string()))?;
        if version == 0 || runs == 0 {
            return Err(foreign("it holds tables, but not nightjar's".into()));
        }
    }
    Ok(())
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>, StateError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(|_| StateError::BadTimestamp(s.into()))
}

impl StateDb {
    /// Opens (creating and migrating if needed) the state DB at `path`.
    ///
    /// Several processes may open a fresh state DB at once: creation and
    /// migration happen under an exclusive lock on a `.lock` file beside it,
    /// so one migrates and the others find it done. A new file is created
    /// 0600 (its WAL and SHM files take the same mode), since it holds
    /// rejected records and may hold refresh tokens. A file that is empty or
    /// is some other SQLite database is refused, never treated as new.
    pub fn open(path: &Path) -> Result<StateDb, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Dir { path: path.into(), source })?;
        }
        let dir_err = |source| StateError::Dir { path: path.into(), source };
        let mut lock_name = path.as_os_str().to_owned();
        lock_name.push(".lock");
        let lock = open_private(Path::new(&lock_name), false).map_err(dir_err)?;
        lock.lock().map_err(dir_err)?;
        let created = match open_private(path, true) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(source) => return Err(StateError::Dir { path: path.into(), source }),
        };
        if !created && std::fs::metadata(path).map_err(dir_err)?.len() == 0 {
            return Err(StateError::Foreign { path: path.into(), reason: "the file is empty".into() });
        }
        let open_err = |source| StateError::Open { path: path.into(), source };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(open_err)?;
        check_ours(&conn, path, created)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        migrations().to_latest(&mut conn).map_err(|source| StateError::Migrate { path: path.into(), source })?;
        conn.pragma_update(None, "application_id", APPLICATION_ID).map_err(open_err)?;
        drop(lock);
        let db = StateDb { conn: Mutex::new(conn), path: path.to_path_buf() };
        db.restrict_permissions()?;
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // Only the state thread uses it; a panic while holding it cannot
        // leave SQLite half-written (transactions roll back).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn open_run(&self, job: &str, trigger: &str, now: DateTime<Utc>) -> Result<RunId, StateError> {
        self.open_run_attempt(job, trigger, 1, None, now)
    }

    /// Opens attempt `attempt` of a run; a retry names its first attempt.
    pub fn open_run_attempt(
        &self,
        job: &str,
        trigger: &str,
        attempt: u32,
        retry_of: Option<RunId>,
        now: DateTime<Utc>,
    ) -> Result<RunId, StateError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO runs (job, status, trigger, attempt, retry_of, pid, host, started_at)
             VALUES (?1, 'running', ?2, ?3, ?4, ?5, ?6, ?7)",
            params![job, trigger, attempt, retry_of, std::process::id(), host_name(), ts(now)],
        )?;
        Ok(conn.last_insert_rowid())
    }

    pub fn set_window(
        &self,
        run: RunId,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
        watermark_before: Option<DateTime<Utc>>,
    ) -> Result<(), StateError> {
        self.conn().execute(
            "UPDATE runs SET window_start = ?2, window_end = ?3, watermark_before = ?4 WHERE id = ?1",
            params![run, start.map(ts), end.map(ts), watermark_before.map(ts)],
        )?;
        Ok(())
    }

    pub fn record_step(
        &self,
        run: RunId,
        step: &str,
        started: DateTime<Utc>,
        took: Duration,
    ) -> Result<(), StateError> {
        self.conn().execute(
            "INSERT INTO run_steps (run_id, step, started_at, duration_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (run_id, step) DO UPDATE SET duration_ms = duration_ms + excluded.duration_ms",
            params![run, step, ts(started), took.as_millis() as i64],
        )?;
        Ok(())
    }

    /// Keeps rejects up to [`REJECTS_KEPT_PER_RUN`] per run; returns how many were stored.
    pub fn add_rejects(&self, run: RunId, rejects: &[crate::schema::Reject]) -> Result<usize, StateError> {
        let mut conn = self.conn();
        // IMMEDIATE: a read-then-write transaction waits for other writers
        // (busy timeout) instead of failing at once on the upgrade.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let kept: i64 = tx.query_row("SELECT count(*) FROM rejects WHERE run_id = ?1", [run], |r| r.get(0))?;
        let room = REJECTS_KEPT_PER_RUN.saturating_sub(kept as usize);
        {
            let mut insert = tx.prepare(
                "INSERT INTO rejects (run_id, record_id, column_name, value, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for r in rejects.iter().take(room) {
                insert.execute(params![run, r.record_id, r.column, r.value, r.reason])?;
            }
        }
        tx.commit()?;
        Ok(rejects.len().min(room))
    }

    pub fn rejects(&self, run: RunId) -> Result<Vec<RejectRecord>, StateError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT record_id, column_name, value, reason FROM rejects WHERE run_id = ?1 ORDER BY id")?;
        let rows = stmt.query_map([run], |r| {
            Ok(RejectRecord { record_id: r.get(0)?, column: r.get(1)?, value: r.get(2)?, reason: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn watermark(&self, job: &str) -> Result<Option<DateTime<Utc>>, StateError> {
        let value: Option<String> =
            self.conn().query_row("SELECT value FROM watermarks WHERE job = ?1", [job], |r| r.get(0)).optional()?;
        value.map(|v| parse_ts(&v)).transpose()
    }

    pub fn clear_watermark(&self, job: &str) -> Result<(), StateError> {
        self.conn().execute("DELETE FROM watermarks WHERE job = ?1", [job])?;
        Ok(())
    }

    /// Closes a run. A succeeded run may carry the new watermark, which is
    /// written in the same transaction so history and watermark never disagree.
    pub fn finish_run(
        &self,
        run: RunId,
        end: &RunEnd,
        new_watermark: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        self.finish_run_with(run, end, new_watermark, now, |_| Ok(()))
    }

    /// [`Self::finish_run`], plus `also` (e.g. queueing an alert) inside the
    /// same transaction: the run row, the watermark and whatever `also`
    /// writes commit together or not at all.
    pub fn finish_run_with(
        &self,
        run: RunId,
        end: &RunEnd,
        new_watermark: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        also: impl FnOnce(&Connection) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let mut conn = self.conn();
        // IMMEDIATE: a read-then-write transaction waits for other writers
        // (busy timeout) instead of failing at once on the upgrade.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let job: String = tx.query_row("SELECT job FROM runs WHERE id = ?1", [run], |r| r.get(0))?;
        if let Some(wm) = new_watermark {
            tx.execute(
                "INSERT INTO watermarks (job, value, run_id, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (job) DO UPDATE SET value = excluded.value, run_id = excluded.run_id, updated_at = excluded.updated_at",
                params![job, ts(wm), run, ts(now)],
            )?;
        }
        let c = &end.counts;
        tx.execute(
            "UPDATE runs SET status = ?2, finished_at = ?3, watermark_after = ?4,
                 pages = ?5, rows_extracted = ?6, rows_rejected = ?7, rows_inserted = ?8,
                 rows_updated = ?9, rows_unchanged = ?10, rows_deleted = ?11,
                 sf_job_ids = ?12, error_class = ?13, error = ?14, api_calls = ?15, rows_filtered = ?16,
                 rows_reported = ?17
             WHERE id = ?1",
            params![
                run,
                end.status.as_str(),
                ts(now),
                new_watermark.map(ts),
                c.pages as i64,
                c.extracted as i64,
                c.rejected as i64,
                c.inserted as i64,
                c.updated as i64,
                c.unchanged as i64,
                c.deleted as i64,
                end.salesforce_job_ids.join(","),
                end.error_class,
                end.error,
                c.api_calls as i64,
                c.filtered as i64,
                c.reported.map(|n| n as i64),
            ],
        )?;
        also(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Runs, newest first.
    pub fn history(&self, filter: &HistoryFilter) -> Result<Vec<RunRecord>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, job, status, trigger, started_at, finished_at, window_start, window_end,
                    watermark_before, watermark_after, pages, rows_extracted, rows_rejected,
                    rows_inserted, rows_updated, rows_unchanged, rows_deleted, sf_job_ids, error_class, error, attempt, retry_of, api_calls,
                    rows_filtered, rows_reported
             FROM runs
             WHERE (?1 IS NULL OR job = ?1) AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR id >= ?3)
                   AND (?5 IS NULL OR started_at >= ?5)
             ORDER BY id DESC
             LIMIT ?4",
        )?;
        let limit = filter.limit.map_or(-1, i64::from);
        let since = filter.since.map(ts);
        let rows = stmt.query_map(
            params![filter.job, filter.status.map(RunStatus::as_str), filter.min_id, limit, since],
            |r| {
                let status: String = r.get(2)?;
                let ids: String = r.get(17)?;
                Ok(RunRecord {
                    id: r.get(0)?,
                    job: r.get(1)?,
                    status: RunStatus::parse(&status).unwrap_or(RunStatus::Failed),
                    trigger: r.get(3)?,
                    attempt: r.get(20)?,
                    retry_of: r.get(21)?,
                    started_at: r.get(4)?,
                    finished_at: r.get(5)?,
                    duration_ms: None,
                    window_start: r.get(6)?,
                    window_end: r.get(7)?,
                    watermark_before: r.get(8)?,
                    watermark_after: r.get(9)?,
                    counts: RunCounts {
                        pages: r.get::<_, i64>(10)? as u64,
                        extracted: r.get::<_, i64>(11)? as u64,
                        filtered: r.get::<_, i64>(23)? as u64,
                        rejected: r.get::<_, i64>(12)? as u64,
                        inserted: r.get::<_, i64>(13)? as u64,
                        updated: r.get::<_, i64>(14)? as u64,
                        unchanged: r.get::<_, i64>(15)? as u64,
                        deleted: r.get::<_, i64>(16)? as u64,
                        api_calls: r.get::<_, i64>(22)? as u64,
                        reported: r.get::<_, Option<i64>>(24)?.map(|n| n.max(0) as u64),
                    },
                    salesforce_job_ids: ids.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
                    error_class: r.get(18)?,
                    error: r.get(19)?,
                })
            },
        )?;
        let mut out: Vec<RunRecord> = rows.collect::<Result<_, _>>()?;
        for run in &mut out {
            if let (Ok(a), Some(Ok(b))) = (parse_ts(&run.started_at), run.finished_at.as_deref().map(parse_ts)) {
                run.duration_ms = Some((b - a).num_milliseconds());
            }
        }
        Ok(out)
    }

    /// Records a Salesforce job id on a run as soon as the job exists, so a
    /// run that is cancelled or dies before it closes still names its job.
    pub fn add_salesforce_job(&self, run: RunId, job_id: &str) -> Result<(), StateError> {
        self.conn().execute(
            "UPDATE runs SET sf_job_ids = CASE WHEN sf_job_ids = '' THEN ?2 ELSE sf_job_ids || ',' || ?2 END
             WHERE id = ?1",
            params![run, job_id],
        )?;
        Ok(())
    }

    /// Stores a connection's refresh token (from `nightjar auth login`) and
    /// restricts the state file and its WAL/SHM files to the owner (0600).
    pub fn store_refresh_token(
        &self,
        connection: &str,
        token: &crate::config::Secret,
        instance_url: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        self.conn().execute(
            "INSERT INTO oauth_tokens (connection, refresh_token, instance_url, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (connection) DO UPDATE SET refresh_token = excluded.refresh_token,
                 instance_url = excluded.instance_url, updated_at = excluded.updated_at",
            params![connection, token.expose(), instance_url, ts(now)],
        )?;
        self.restrict_permissions()
    }

    pub fn refresh_token(&self, connection: &str) -> Result<Option<crate::config::Secret>, StateError> {
        let value: Option<String> = self
            .conn()
            .query_row("SELECT refresh_token FROM oauth_tokens WHERE connection = ?1", [connection], |r| r.get(0))
            .optional()?;
        Ok(value.map(crate::config::Secret::new))
    }

    #[cfg(unix)]
    fn restrict_permissions(&self) -> Result<(), StateError> {
        use std::os::unix::fs::PermissionsExt;
        let mut paths = vec![self.path.clone()];
        for suffix in ["-wal", "-shm"] {
            let mut name = self.path.clone().into_os_string();
            name.push(suffix);
            paths.push(PathBuf::from(name));
        }
        for path in paths.iter().filter(|p| p.exists()) {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|source| StateError::Permissions { path: path.clone(), source })?;
        }
        Ok(())
    }

    #[cfg(not(unix))]
    fn restrict_permissions(&self) -> Result<(), StateError> {
        Ok(())
    }

    pub fn steps(&self, run: RunId) -> Result<Vec<StepRecord>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT step, started_at, duration_ms FROM run_steps WHERE run_id = ?1 ORDER BY started_at, rowid",
        )?;
        let rows = stmt
            .query_map([run], |r| Ok(StepRecord { step: r.get(0)?, started_at: r.get(1)?, duration_ms: r.get(2)? }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Runs still `running` that were started on this host by a process
    /// that is gone. Runs of other hosts are left alone: whether their
    /// process lives cannot be told from here.
    pub fn orphaned_runs(&self) -> Result<Vec<OrphanedRun>, StateError> {
        let host = host_name();
        let candidates: Vec<(RunId, Option<u32>, Option<String>)> = {
            let conn = self.conn();
            let mut stmt = conn.prepare("SELECT id, pid, host FROM runs WHERE status = 'running' ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (id, pid, run_host) in candidates {
            let ours = run_host.as_deref().is_none_or(|h| h == host);
            if !ours || pid.is_some_and(pid_alive) {
                continue;
            }
            if let Some(run) = self.run(id)? {
                out.push(OrphanedRun { run, pid });
            }
        }
        Ok(out)
    }

    /// Marks a run whose process died `abandoned`, with `also` (the alert)
    /// in the same transaction, and drops the dead process's lock. Returns
    /// false, writing nothing, when the run is no longer `running` (another
    /// process recovered it first).
    pub fn abandon_run_with(
        &self,
        run: RunId,
        error: &str,
        now: DateTime<Utc>,
        also: impl FnOnce(&Connection) -> Result<(), StateError>,
    ) -> Result<bool, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE runs SET status = 'abandoned', finished_at = ?2, error_class = 'abandoned', error = ?3
             WHERE id = ?1 AND status = 'running'",
            params![run, ts(now), error],
        )?;
        if changed == 0 {
            return Ok(false);
        }
        let (pid, host): (Option<u32>, Option<String>) =
            tx.query_row("SELECT pid, host FROM runs WHERE id = ?1", [run], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if let (Some(pid), Some(host)) = (pid, host) {
            tx.execute("DELETE FROM job_locks WHERE pid = ?1 AND host = ?2", params![pid, host])?;
        }
        also(&tx)?;
        tx.commit()?;
        Ok(true)
    }

    /// Records a scheduled time that did not run because the job was still
    /// running: a closed `cancelled` row with error class `skipped`, so the
    /// gap is visible in history (no alert: nothing failed).
    pub fn record_skipped(
        &self,
        job: &str,
        trigger: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<RunId, StateError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO runs (job, status, trigger, pid, host, started_at, finished_at, error_class, error)
             VALUES (?1, 'cancelled', ?2, ?3, ?4, ?5, ?5, 'skipped', ?6)",
            params![job, trigger, std::process::id(), host_name(), ts(now), reason],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// When the job last started a run (manual, scheduled or otherwise;
    /// watermark changes and skips aside), for `catch_up`.
    pub fn last_run_started(&self, job: &str) -> Result<Option<DateTime<Utc>>, StateError> {
        let value: Option<String> = self.conn().query_row(
            "SELECT max(started_at) FROM runs
                 WHERE job = ?1 AND trigger != 'watermark' AND coalesce(error_class, '') != 'skipped'",
            [job],
            |r| r.get(0),
        )?;
        value.map(|v| parse_ts(&v)).transpose()
    }

    /// Moves (or, with `None`, clears) a job's watermark by hand, recorded
    /// as a history row of its own (trigger `watermark`) so a backfill shows
    /// up next to the runs it affects. Returns that row's id.
    pub fn set_watermark_manually(
        &self,
        job: &str,
        value: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<RunId, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let before: Option<String> =
            tx.query_row("SELECT value FROM watermarks WHERE job = ?1", [job], |r| r.get(0)).optional()?;
        tx.execute(
            "INSERT INTO runs (job, status, trigger, pid, host, started_at, finished_at, watermark_before, watermark_after)
             VALUES (?1, 'succeeded', ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
            params![job, WATERMARK_TRIGGER, std::process::id(), host_name(), ts(now), before, value.map(ts)],
        )?;
        let run = tx.last_insert_rowid();
        match value {
            Some(v) => tx.execute(
                "INSERT INTO watermarks (job, value, run_id, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (job) DO UPDATE SET value = excluded.value, run_id = excluded.run_id, updated_at = excluded.updated_at",
                params![job, ts(v), run, ts(now)],
            )?,
            None => tx.execute("DELETE FROM watermarks WHERE job = ?1", [job])?,
        };
        tx.commit()?;
        Ok(run)
    }

    pub fn run(&self, id: RunId) -> Result<Option<RunRecord>, StateError> {
        let filter = HistoryFilter { min_id: Some(id), ..Default::default() };
        Ok(self.history(&filter)?.into_iter().find(|r| r.id == id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        assert!(migrations().validate().is_ok());
    }

    #[test]
    fn an_empty_or_foreign_file_is_refused_not_treated_as_new() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let err = StateDb::open(&empty).err().expect("an empty file is refused").to_string();
        assert!(err.contains("the file is empty"), "{err}");
        assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0, "nothing was written to it");

        let text = dir.path().join("notes.db");
        std::fs::write(&text, b"these are my notes, not a database\n").unwrap();
        let err = StateDb::open(&text).err().expect("a text file is refused").to_string();
        assert!(err.contains("not a nightjar state DB"), "{err}");

        let other = dir.path().join("other.db");
        rusqlite::Connection::open(&other).unwrap().execute_batch("CREATE TABLE customers (id INTEGER)").unwrap();
        let err = StateDb::open(&other).err().expect("another app's database is refused").to_string();
        assert!(err.contains("not nightjar's"), "{err}");
        let tables: i64 = rusqlite::Connection::open(&other)
            .unwrap()
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 1, "no migration ran on it");
    }

    #[test]
    fn concurrent_openers_of_a_fresh_file_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh/state.db");
        let openers: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || StateDb::open(&path).map(|_| ()).map_err(|e| e.to_string()))
            })
            .collect();
        for opener in openers {
            opener.join().unwrap().unwrap();
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_new_state_db_and_its_wal_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let db = StateDb::open(&path).unwrap();
        db.open_run("a", "manual", Utc::now()).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let file = dir.path().join(format!("state.db{suffix}"));
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
    }

    #[test]
    fn watermark_moves_only_with_a_finished_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateDb::open(&dir.path().join("s/state.db")).unwrap();
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let run = store.open_run("accounts", "manual", t0).unwrap();
        assert_eq!(store.watermark("accounts").unwrap(), None);
        let end = RunEnd {
            status: RunStatus::Succeeded,
            counts: RunCounts { extracted: 5, inserted: 5, ..Default::default() },
            salesforce_job_ids: vec!["750A".into()],
            error_class: None,
            error: None,
        };
        store.finish_run(run, &end, Some(t0), t0).unwrap();
        assert_eq!(store.watermark("accounts").unwrap(), Some(t0));
        let h = store.history(&HistoryFilter::default()).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].status, RunStatus::Succeeded);
        assert_eq!(h[0].counts.inserted, 5);
        assert_eq!(h[0].salesforce_job_ids, vec!["750A".to_string()]);
        // Reopening an existing file runs no migration twice.
        drop(store);
        let again = StateDb::open(&dir.path().join("s/state.db")).unwrap();
        assert_eq!(again.watermark("accounts").unwrap(), Some(t0));
    }
}
