//! [`StateStore`]: the state DB as async code sees it. One thread owns the
//! connection and runs calls in the order they come; a caller awaits its
//! answer without holding an async worker, so a state DB that waits on a
//! lock (its busy timeout) delays only the calls behind it, never `serve`'s
//! ticks, the alert sender or another run's pipeline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{
    HistoryFilter, LockHolder, LockToken, OrphanedRun, OutboxEntry, OutboxFilter, RejectRecord, RunEnd, RunId,
    RunRecord, StateDb, StateError, StepRecord,
};
use crate::config::Secret;
use crate::outcome::Trigger;
use crate::schema::Reject;

type Task = Box<dyn FnOnce(&StateDb) + Send>;

/// A cheap, cloneable handle to the state DB thread.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

struct Inner {
    tasks: mpsc::Sender<Task>,
    path: PathBuf,
}

impl StateStore {
    /// Opens the state DB on its own thread (see [`StateDb::open`]).
    pub async fn open(path: &Path) -> Result<StateStore, StateError> {
        let (tasks, queue) = mpsc::channel::<Task>();
        let (ready, opened) = oneshot::channel();
        let db_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("nightjar-state".into())
            .spawn(move || {
                let db = match StateDb::open(&db_path) {
                    Ok(db) => {
                        let _ = ready.send(Ok(()));
                        db
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                // Ends when every handle is gone, after the calls queued before.
                while let Ok(task) = queue.recv() {
                    // A panicking call fails that call (its answer is
                    // dropped), not the thread.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(&db)));
                }
            })
            .map_err(|e| StateError::Gone(format!("cannot start the state thread: {e}")))?;
        opened.await.map_err(|_| StateError::Gone("it ended while opening".into()))??;
        Ok(StateStore { inner: Arc::new(Inner { tasks, path: path.to_path_buf() }) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the state thread and waits for its answer.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateDb) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let (answer, answered) = oneshot::channel();
        self.inner
            .tasks
            .send(Box::new(move |db| {
                let _ = answer.send(f(db));
            }))
            .map_err(|_| StateError::Gone("no state thread".into()))?;
        answered.await.map_err(|_| StateError::Gone("a state call panicked".into()))?
    }

    /// Runs `f` on the state thread without waiting (a lock released from
    /// a destructor).
    fn send(&self, f: impl FnOnce(&StateDb) + Send + 'static) {
        let _ = self.inner.tasks.send(Box::new(f));
    }

    /// Runs `f` in one write transaction on the state thread.
    pub async fn in_transaction<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        self.call(move |db| db.in_transaction(f)).await
    }

    pub async fn open_run(&self, job: &str, trigger: Trigger, now: DateTime<Utc>) -> Result<RunId, StateError> {
        self.open_run_attempt(job, trigger, 1, None, now).await
    }

    pub async fn open_run_attempt(
        &self,
        job: &str,
        trigger: Trigger,
        attempt: u32,
        retry_of: Option<RunId>,
        now: DateTime<Utc>,
    ) -> Result<RunId, StateError> {
        let job = job.to_string();
        self.call(move |db| db.open_run_attempt(&job, trigger.as_str(), attempt, retry_of, now)).await
    }

    pub async fn set_window(
        &self,
        run: RunId,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
        watermark_before: Option<DateTime<Utc>>,
    ) -> Result<(), StateError> {
        self.call(move |db| db.set_window(run, start, end, watermark_before)).await
    }

    pub async fn record_step(
        &self,
        run: RunId,
        step: &'static str,
        started: DateTime<Utc>,
        took: std::time::Duration,
    ) -> Result<(), StateError> {
        self.call(move |db| db.record_step(run, step, started, took)).await
    }

    pub async fn add_rejects(&self, run: RunId, rejects: Vec<Reject>) -> Result<usize, StateError> {
        self.call(move |db| db.add_rejects(run, &rejects)).await
    }

    pub async fn rejects(&self, run: RunId) -> Result<Vec<RejectRecord>, StateError> {
        self.call(move |db| db.rejects(run)).await
    }

    pub async fn watermark(&self, job: &str) -> Result<Option<DateTime<Utc>>, StateError> {
        let job = job.to_string();
        self.call(move |db| db.watermark(&job)).await
    }

    pub async fn clear_watermark(&self, job: &str) -> Result<(), StateError> {
        let job = job.to_string();
        self.call(move |db| db.clear_watermark(&job)).await
    }

    /// Closes a run, writing the new watermark (if any) and whatever `also`
    /// writes (the run's alert) in the same transaction.
    pub async fn finish_run_with(
        &self,
        run: RunId,
        end: RunEnd,
        new_watermark: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        also: impl FnOnce(&Connection) -> Result<(), StateError> + Send + 'static,
    ) -> Result<(), StateError> {
        self.call(move |db| db.finish_run_with(run, &end, new_watermark, now, also)).await
    }

    pub async fn finish_run(
        &self,
        run: RunId,
        end: RunEnd,
        new_watermark: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        self.finish_run_with(run, end, new_watermark, now, |_| Ok(())).await
    }

    pub async fn history(&self, filter: HistoryFilter) -> Result<Vec<RunRecord>, StateError> {
        self.call(move |db| db.history(&filter)).await
    }

    pub async fn run(&self, id: RunId) -> Result<Option<RunRecord>, StateError> {
        self.call(move |db| db.run(id)).await
    }

    pub async fn steps(&self, run: RunId) -> Result<Vec<StepRecord>, StateError> {
        self.call(move |db| db.steps(run)).await
    }

    pub async fn add_salesforce_job(&self, run: RunId, job_id: &str) -> Result<(), StateError> {
        let job_id = job_id.to_string();
        self.call(move |db| db.add_salesforce_job(run, &job_id)).await
    }

    pub async fn store_refresh_token(
        &self,
        connection: &str,
        token: Secret,
        instance_url: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        let (connection, instance_url) = (connection.to_string(), instance_url.to_string());
        self.call(move |db| db.store_refresh_token(&connection, &token, &instance_url, now)).await
    }

    pub async fn refresh_token(&self, connection: &str) -> Result<Option<Secret>, StateError> {
        let connection = connection.to_string();
        self.call(move |db| db.refresh_token(&connection)).await
    }

    pub async fn orphaned_runs(&self) -> Result<Vec<OrphanedRun>, StateError> {
        self.call(|db| db.orphaned_runs()).await
    }

    pub async fn abandon_run_with(
        &self,
        run: RunId,
        error: &str,
        now: DateTime<Utc>,
        also: impl FnOnce(&Connection) -> Result<(), StateError> + Send + 'static,
    ) -> Result<bool, StateError> {
        let error = error.to_string();
        self.call(move |db| db.abandon_run_with(run, &error, now, also)).await
    }

    pub async fn record_skipped(
        &self,
        job: &str,
        trigger: Trigger,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<RunId, StateError> {
        let (job, reason) = (job.to_string(), reason.to_string());
        self.call(move |db| db.record_skipped(&job, trigger.as_str(), &reason, now)).await
    }

    pub async fn last_run_started(&self, job: &str) -> Result<Option<DateTime<Utc>>, StateError> {
        let job = job.to_string();
        self.call(move |db| db.last_run_started(&job)).await
    }

    pub async fn set_watermark_manually(
        &self,
        job: &str,
        value: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<RunId, StateError> {
        let job = job.to_string();
        self.call(move |db| db.set_watermark_manually(&job, value, now)).await
    }

    pub async fn lock_holder(&self, job: &str) -> Result<Option<LockHolder>, StateError> {
        let job = job.to_string();
        self.call(move |db| db.lock_holder(&job)).await
    }

    /// Takes `job`'s lock, or says who holds it; the returned guard
    /// releases it (see [`JobLock`]).
    pub async fn try_lock_job(&self, job: &str, now: DateTime<Utc>) -> Result<Result<JobLock, LockHolder>, StateError> {
        let name = job.to_string();
        let taken = self.call(move |db| db.try_lock_job(&name, now)).await?;
        Ok(taken.map(|token| JobLock { state: self.clone(), token: Some(token) }))
    }

    pub async fn outbox(&self, filter: OutboxFilter) -> Result<Vec<OutboxEntry>, StateError> {
        self.call(move |db| db.outbox(&filter)).await
    }

    pub async fn claim_due_alerts(
        &self,
        now: DateTime<Utc>,
        lease: std::time::Duration,
        limit: u32,
        ignore_backoff: bool,
    ) -> Result<Vec<OutboxEntry>, StateError> {
        self.call(move |db| db.claim_due_alerts(now, lease, limit, ignore_backoff)).await
    }

    pub async fn mark_alert_sent(&self, id: i64, now: DateTime<Utc>) -> Result<(), StateError> {
        self.call(move |db| db.mark_alert_sent(id, now)).await
    }

    pub async fn mark_alert_attempt_failed(
        &self,
        id: i64,
        now: DateTime<Utc>,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<(), StateError> {
        let error = error.to_string();
        self.call(move |db| db.mark_alert_attempt_failed(id, now, &error, retry_at)).await
    }
}

/// A held job lock. [`JobLock::release`] gives it back and waits; a lock
/// dropped without that (a run future cancelled mid-way) is released on the
/// state thread in the background.
pub struct JobLock {
    state: StateStore,
    token: Option<LockToken>,
}

impl JobLock {
    pub fn job(&self) -> &str {
        self.token.as_ref().map_or("", |t| t.job.as_str())
    }

    /// Names the run the lock is for, so a refused attempt can say which.
    pub async fn set_run(&self, run: RunId) -> Result<(), StateError> {
        let Some(token) = self.token.clone() else { return Ok(()) };
        self.state.call(move |db| db.set_lock_run(&token, run)).await
    }

    pub async fn release(mut self) -> Result<(), StateError> {
        match self.token.take() {
            Some(token) => self.state.call(move |db| db.release_lock(&token)).await,
            None => Ok(()),
        }
    }
}

impl Drop for JobLock {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.state.send(move |db| {
                if let Err(e) = db.release_lock(&token) {
                    tracing::warn!(job = %token.job, error = %e, "could not release the job lock; the next run takes it over");
                }
            });
        }
    }
}
