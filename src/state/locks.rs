//! Job locks: one run per job at a time, across every process that shares
//! the state file (`serve`, `nightjar run`, a second `serve`).
//!
//! A lock is a row in `job_locks`, taken in an IMMEDIATE transaction so two
//! processes cannot both see "free". A process that dies keeps its row; the
//! next taker on the same host sees the pid is gone and takes it over. On
//! another host liveness cannot be checked, so such a lock is reported, not
//! broken.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

use super::{RunId, StateDb, StateError, ts};

/// Who holds a job's lock, for the message of the attempt that was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockHolder {
    pub job: String,
    pub run_id: Option<RunId>,
    pub pid: u32,
    pub host: String,
    pub since: String,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job `{}` is already running: pid {} on {} since {}", self.job, self.pid, self.host, self.since)?;
        if let Some(run) = self.run_id {
            write!(f, " (run {run})")?;
        }
        Ok(())
    }
}

/// This machine's name, as locks and runs record it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "localhost".into())
}

/// Whether a process of this host is alive. Where that cannot be told
/// (no /proc), every process counts as alive: a lock is then never broken
/// wrongly, at worst it needs a manual `DELETE`.
pub fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    // A zombie (killed, not yet reaped by its parent) runs nothing any more.
    match std::fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Proof of a held job lock: who took it and when. [`super::StateStore`]
/// wraps it in a guard that releases it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken {
    pub job: String,
    pub pid: u32,
    pub acquired_at: String,
}

impl StateDb {
    /// Takes `job`'s lock, or says who holds it. A stale lock (its process
    /// is dead, on this host) is taken over.
    pub fn try_lock_job(&self, job: &str, now: DateTime<Utc>) -> Result<Result<LockToken, LockHolder>, StateError> {
        let host = host_name();
        let pid = std::process::id();
        let acquired_at = ts(now);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let held = tx
            .query_row("SELECT run_id, pid, host, acquired_at FROM job_locks WHERE job = ?1", [job], |r| {
                Ok(LockHolder {
                    job: job.to_string(),
                    run_id: r.get(0)?,
                    pid: r.get(1)?,
                    host: r.get(2)?,
                    since: r.get(3)?,
                })
            })
            .optional()?;
        if let Some(holder) = held {
            if holder.host != host || pid_alive(holder.pid) {
                return Ok(Err(holder));
            }
            tracing::warn!(job, pid = holder.pid, since = %holder.since, "taking over the lock of a process that died");
        }
        tx.execute(
            "INSERT INTO job_locks (job, run_id, pid, host, acquired_at) VALUES (?1, NULL, ?2, ?3, ?4)
             ON CONFLICT (job) DO UPDATE SET run_id = NULL, pid = excluded.pid, host = excluded.host,
                 acquired_at = excluded.acquired_at",
            params![job, pid, host, acquired_at],
        )?;
        tx.commit()?;
        drop(conn);
        Ok(Ok(LockToken { job: job.to_string(), pid, acquired_at }))
    }

    /// Names the run the lock is for, so a refused attempt can say which.
    pub fn set_lock_run(&self, lock: &LockToken, run: RunId) -> Result<(), StateError> {
        self.conn().execute(
            "UPDATE job_locks SET run_id = ?2 WHERE job = ?1 AND pid = ?3 AND acquired_at = ?4",
            params![lock.job, run, lock.pid, lock.acquired_at],
        )?;
        Ok(())
    }

    /// Releases a lock this process holds (a lock taken over since is left alone).
    pub fn release_lock(&self, lock: &LockToken) -> Result<(), StateError> {
        self.conn().execute(
            "DELETE FROM job_locks WHERE job = ?1 AND pid = ?2 AND acquired_at = ?3",
            params![lock.job, lock.pid, lock.acquired_at],
        )?;
        Ok(())
    }

    /// Who holds `job`'s lock now, if anyone.
    pub fn lock_holder(&self, job: &str) -> Result<Option<LockHolder>, StateError> {
        Ok(self
            .conn()
            .query_row("SELECT run_id, pid, host, acquired_at FROM job_locks WHERE job = ?1", [job], |r| {
                Ok(LockHolder {
                    job: job.to_string(),
                    run_id: r.get(0)?,
                    pid: r.get(1)?,
                    host: r.get(2)?,
                    since: r.get(3)?,
                })
            })
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_held_lock_refuses_a_second_taker_and_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateDb::open(&dir.path().join("state.db")).unwrap();
        let lock = store.try_lock_job("accounts", t0()).unwrap().expect("free lock is taken");
        let run = store.open_run("accounts", "manual", t0()).unwrap();
        store.set_lock_run(&lock, run).unwrap();
        let holder = store.try_lock_job("accounts", t0()).unwrap().expect_err("second taker is refused");
        assert_eq!(
            (holder.pid, holder.run_id, holder.since.as_str()),
            (std::process::id(), Some(run), "2026-01-01T00:00:00.000Z")
        );
        assert!(store.try_lock_job("contacts", t0()).unwrap().is_ok(), "locks are per job");
        store.release_lock(&lock).unwrap();
        assert_eq!(store.lock_holder("accounts").unwrap(), None);
        assert!(store.try_lock_job("accounts", t0()).unwrap().is_ok());
    }

    #[test]
    fn a_dead_process_lock_is_taken_over_but_not_another_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateDb::open(&dir.path().join("state.db")).unwrap();
        // A pid above Linux's pid_max (2^22) never names a live process.
        let dead = 5_000_000;
        store
            .conn()
            .execute(
                "INSERT INTO job_locks (job, pid, host, acquired_at) VALUES ('a', ?1, ?2, 'x'), ('b', ?1, 'elsewhere', 'x')",
                params![dead, host_name()],
            )
            .unwrap();
        let lock = store.try_lock_job("a", t0()).unwrap().expect("stale lock is taken over");
        assert_eq!(store.lock_holder("a").unwrap().map(|h| h.pid), Some(std::process::id()));
        store.release_lock(&lock).unwrap();
        let other = store.try_lock_job("b", t0()).unwrap().expect_err("another host's lock is kept");
        assert_eq!(other.host, "elsewhere");
    }
}
