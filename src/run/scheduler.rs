//! `nightjar serve`: runs enabled jobs on their schedules.
//!
//! tokio-cron-scheduler only ticks this loop, once a second, in UTC; each
//! job's fire times come from its compiled [`Schedule`] (croner in the job's
//! own time zone, so DST changes do not shift them).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use thiserror::Error;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler, JobSchedulerError};

use crate::backoff::Backoff;
use crate::config::{Project, Schedule};
use crate::outcome::{RunStatus, Trigger};
use crate::state::{StateError, StateStore};

use super::{Attempt, Engine, RunError, run_job_attempt};

/// How long a shutdown waits for runs in flight before it stops them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// How often the alert sender looks at the outbox while serving.
const ALERT_POLL: Duration = Duration::from_secs(30);

/// How long shutdown waits for the alert sender to notice it.
const SENDER_STOP: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("the scheduler failed: {0}")]
    Scheduler(#[from] JobSchedulerError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Every enabled job with a schedule.
pub fn schedules(project: &Project) -> Vec<(String, Schedule)> {
    project
        .jobs
        .values()
        .filter(|j| j.enabled)
        .filter_map(|j| j.schedule.clone().map(|s| (j.name.clone(), s)))
        .collect()
}

/// What every run task of `serve` shares.
#[derive(Clone)]
struct Runner {
    engine: Arc<Engine>,
    project: Arc<Project>,
    state: StateStore,
    permits: Arc<Semaphore>,
    in_flight: Arc<Mutex<HashSet<String>>>,
    stopping: watch::Receiver<bool>,
    cancel: watch::Receiver<bool>,
}

impl Runner {
    /// Starts a run series for `name` unless one is still going, in which
    /// case the skip is recorded.
    fn start(&self, runs: &mut JoinSet<()>, name: &str, trigger: Trigger) {
        let fresh = self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        let (runner, name) = (self.clone(), name.to_string());
        if !fresh {
            runs.spawn(async move {
                skip(&runner.state, &name, trigger, "the previous run of this job was still going").await;
            });
            return;
        }
        runs.spawn(async move {
            let _permit = runner.permits.clone().acquire_owned().await;
            run_series(
                &runner.engine,
                &runner.project,
                &runner.state,
                &name,
                trigger,
                runner.stopping.clone(),
                runner.cancel.clone(),
            )
            .await;
            runner.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
        });
    }
}

/// The next fire time of every schedule, from `now`.
fn next_times(schedules: &[(String, Schedule)], now: DateTime<Utc>) -> HashMap<String, DateTime<Utc>> {
    let next: HashMap<String, DateTime<Utc>> =
        schedules.iter().filter_map(|(name, s)| s.next_after(now).map(|t| (name.clone(), t))).collect();
    for (name, at) in &next {
        tracing::info!(job = %name, next = %crate::state::ts(*at), "scheduled");
    }
    next
}

/// Jobs with `catch_up = true` whose last scheduled time passed after their
/// last run started: nightjar was down then. A job that never ran has
/// missed nothing (a fresh install runs on its schedule).
async fn missed(
    project: &Project,
    state: &StateStore,
    schedules: &[(String, Schedule)],
    now: DateTime<Utc>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, schedule) in schedules {
        if !project.jobs.get(name).is_some_and(|j| j.catch_up) {
            continue;
        }
        let Some(due) = schedule.last_at_or_before(now) else { continue };
        match state.last_run_started(name).await {
            Ok(Some(last)) if last < due => {
                tracing::info!(job = %name, missed = %crate::state::ts(due), "catching up a missed scheduled time");
                out.push(name.clone());
            }
            Ok(_) => {}
            Err(e) => tracing::error!(job = %name, error = %e, "cannot tell whether a scheduled time was missed"),
        }
    }
    out
}

/// Runs the schedules until `stop` resolves, then stops starting runs and
/// waits up to `grace` for the ones in flight; runs still going after that
/// are cancelled (recorded `cancelled`, nothing committed). With `config`, SIGHUP reloads the jobs
/// from it: a valid set replaces the schedules, an invalid one is logged and
/// the old schedules stay. A change to the job, mapping or config files
/// (checked every second) reloads the same way.
pub async fn serve(
    engine: Arc<Engine>,
    project: Arc<Project>,
    state: StateStore,
    config: Option<PathBuf>,
    grace: Duration,
    stop: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    // First, so a SIGHUP from here on reloads instead of killing the process.
    let mut hangup = Hangup::new();
    let mut schedules = schedules(&project);
    let closed = super::recover_abandoned(&engine, &project, &state).await?;
    if !closed.is_empty() {
        tracing::warn!(runs = ?closed, "marked runs left running by a dead process abandoned");
    }
    if schedules.is_empty() {
        tracing::warn!("no enabled job has a schedule; serve is idle");
    }
    let start = Utc::now();
    let mut next = next_times(&schedules, start);

    // The scheduler only wakes this loop; a full channel means a wake-up is
    // already pending, so a dropped tick loses nothing.
    let (tick_tx, mut tick_rx) = mpsc::channel::<()>(1);
    let mut scheduler = JobScheduler::new().await?;
    scheduler
        .add(CronJob::new_async("* * * * * *", move |_, _| {
            let tx = tick_tx.clone();
            Box::pin(async move {
                let _ = tx.try_send(());
            })
        })?)
        .await?;
    scheduler.start().await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    // Separate from the sender's: retries stop at once, mail goes on until
    // the runs in flight are done.
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let limit = project.max_concurrent_runs.max(1) as usize;
    let mut runner = Runner {
        engine: engine.clone(),
        project: project.clone(),
        state: state.clone(),
        permits: Arc::new(Semaphore::new(limit)),
        in_flight: Arc::default(),
        stopping: stopping_rx,
        cancel: cancel_rx,
    };
    let mut runs = JoinSet::new();
    for name in missed(&project, &state, &schedules, start).await {
        runner.start(&mut runs, &name, Trigger::CatchUp);
    }

    let sender = match crate::alert::mailer(&project) {
        Ok(mailer) => {
            let state = state.clone();
            let mut stop_rx = stop_rx.clone();
            Some(tokio::spawn(async move {
                let policy = crate::alert::RetryPolicy::default();
                let stopped = async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                };
                crate::alert::run_sender(&state, &mailer, &policy, ALERT_POLL, stopped).await;
            }))
        }
        Err(e) => {
            tracing::info!(reason = %e, "no alert sender");
            None
        }
    };

    let mut seen = config.as_deref().map(fingerprint).unwrap_or_default();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hangup.recv() => {
                if let Some(path) = &config {
                    seen = fingerprint(path);
                    reload(path, "SIGHUP", &mut runner, &mut schedules, &mut next);
                }
            }
            Some(()) = tick_rx.recv() => {
                if let Some(path) = &config {
                    let now_seen = fingerprint(path);
                    if now_seen != seen {
                        seen = now_seen;
                        reload(path, "changed files", &mut runner, &mut schedules, &mut next);
                    }
                }
                let now = Utc::now();
                for (name, schedule) in &schedules {
                    if next.get(name).is_none_or(|due| *due > now) {
                        continue;
                    }
                    // Several fire times missed at once (a suspended host)
                    // make one run, not one per missed time.
                    match schedule.next_after(now) {
                        Some(t) => next.insert(name.clone(), t),
                        None => next.remove(name),
                    };
                    runner.start(&mut runs, name, Trigger::Schedule);
                }
            }
            Some(done) = runs.join_next(), if !runs.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a scheduled run's task ended abnormally");
                }
            }
        }
    }

    tracing::info!(in_flight = runs.len(), "shutting down: no new runs");
    let _ = stopping_tx.send(true);
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!(error = %e, "stopping the scheduler failed");
    }
    let drained = tokio::time::timeout(grace, async { while runs.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        // Cancelled runs close their own rows (`cancelled`), abort their
        // Bulk jobs and roll back their targets; that takes moments.
        tracing::warn!(left = runs.len(), "grace period over; cancelling the runs still going");
        let _ = cancel_tx.send(true);
        while runs.join_next().await.is_some() {}
    }
    let _ = stop_tx.send(true);
    if let Some(mut sender) = sender {
        // The sender stops between and within passes; should a send still
        // hang, shutdown does not wait on it (the alert stays pending).
        if tokio::time::timeout(SENDER_STOP, &mut sender).await.is_err() {
            sender.abort();
        }
    }
    Ok(())
}

/// Reads the configuration again; a valid one replaces the schedules (runs
/// in flight keep the definitions they started with), an invalid one is
/// logged with its errors and changes nothing.
fn reload(
    config: &Path,
    why: &str,
    runner: &mut Runner,
    schedules: &mut Vec<(String, Schedule)>,
    next: &mut HashMap<String, DateTime<Utc>>,
) {
    let loaded = Project::load(config).map_err(|e| e.to_string()).map(|p| {
        let s = self::schedules(&p);
        (p, s)
    });
    match loaded {
        Ok((project, new)) => {
            tracing::info!(why, jobs = new.len(), "reloaded the job definitions");
            runner.project = Arc::new(project);
            *schedules = new;
            *next = next_times(schedules, Utc::now());
        }
        Err(e) => tracing::error!(why, error = %e, "the new configuration is invalid; keeping the old schedules"),
    }
}

/// Name, size and modification time of the config file and every file in
/// `jobs/` and `mappings/` beside it: a change to any of them reloads.
fn fingerprint(config: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let stat = |path: PathBuf| {
        let meta = std::fs::metadata(&path).ok();
        let (len, modified) = meta.map_or((0, None), |m| (m.len(), m.modified().ok()));
        (path, len, modified)
    };
    let mut out = vec![stat(config.to_path_buf())];
    let dir = config.parent().unwrap_or(Path::new("."));
    for sub in ["jobs", "mappings"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else { continue };
        out.extend(entries.filter_map(Result::ok).map(|e| stat(e.path())));
    }
    out.sort();
    out
}

/// SIGHUP, where there is one.
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn new() -> Hangup {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
            if let Err(e) = &signal {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload needs a restart");
            }
            Hangup { signal: signal.ok() }
        }
        #[cfg(not(unix))]
        Hangup {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            signal.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

/// Records a scheduled time that did not run, and says so in the log.
async fn skip(state: &StateStore, job: &str, trigger: Trigger, reason: &str) {
    tracing::warn!(job, reason, "skipping this scheduled time");
    if let Err(e) = state.record_skipped(job, trigger, &format!("skipped: {reason}"), Utc::now()).await {
        tracing::error!(job, error = %e, "could not record the skipped run");
    }
}

/// A job's retries never wait longer than this between attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(6 * 3600);

/// One scheduled time: the run, and its retries per the job's `retries`
/// (`attempts` counts every attempt, the first included). Each attempt is
/// a history row of its own, linked to the first; only the last failure
/// is alerted. `stopping` ends the series between attempts; `cancel`
/// stops the attempt in flight.
pub async fn run_series(
    engine: &Engine,
    project: &Project,
    state: &StateStore,
    name: &str,
    trigger: Trigger,
    mut stopping: watch::Receiver<bool>,
    cancel: watch::Receiver<bool>,
) {
    let retries = project.jobs.get(name).and_then(|j| j.retries);
    let attempts = retries.map_or(1, |r| r.attempts.max(1));
    let mut first_run = None;
    for number in 1..=attempts {
        let attempt = Attempt { number, last: number == attempts, first_run };
        let trigger = if number == 1 { trigger } else { Trigger::Retry };
        let mut cancel = cancel.clone();
        let cancelled = async move {
            let _ = cancel.wait_for(|c| *c).await;
        };
        let report = match run_job_attempt(engine, project, state, name, trigger, attempt, cancelled).await {
            Ok(report) => report,
            Err(RunError::Locked(holder)) => {
                skip(state, name, trigger, &holder.to_string()).await;
                return;
            }
            Err(e) => {
                tracing::error!(job = %name, error = %e, "scheduled run could not be recorded");
                return;
            }
        };
        first_run.get_or_insert(report.run_id);
        if report.status != RunStatus::Failed || number == attempts {
            if report.error.is_some() {
                tracing::warn!(job = %name, run = report.run_id, attempt = number, "scheduled run failed");
            }
            return;
        }
        let Some(r) = &retries else { return };
        let delay = Backoff::new(r.backoff, MAX_RETRY_DELAY).delay(number);
        tracing::warn!(job = %name, run = report.run_id, attempt = number, retry_in = ?delay, "run failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}
