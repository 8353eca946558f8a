//! `nightjar serve`: runs enabled jobs on their schedules.
//!
//! tokio-cron-scheduler only ticks, once a second, in UTC. Each job's next
//! fire time is computed here with croner in the job's own time zone
//! (chrono-tz), because the scheduler turns a time zone into a fixed UTC
//! offset when a job is created: a `0 0 6 * * *` Europe/Berlin job would
//! fire at 07:00 local after the spring DST change. Computing the instant
//! from local wall-clock time each time keeps it at 06:00 all year.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use thiserror::Error;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler, JobSchedulerError};

use crate::config::Project;
use crate::state::{StateError, StateStore};

use super::{Attempt, RunError, run_job_attempt};
use crate::state::RunStatus;

/// How long a shutdown waits for runs in flight before it stops them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// How often the alert sender looks at the outbox while serving.
const ALERT_POLL: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("jobs/{job}.toml: schedule `{schedule}`: {message} (6 fields, seconds first, e.g. \"0 30 2 * * *\")")]
    Schedule { job: String, schedule: String, message: String },
    #[error("jobs/{job}.toml: unknown timezone `{timezone}`; use an IANA name such as \"Europe/Berlin\" or \"UTC\"")]
    Timezone { job: String, timezone: String },
    #[error("the scheduler failed: {0}")]
    Scheduler(#[from] JobSchedulerError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// A job's cron expression in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses a 6-field cron expression (seconds first) the way
    /// tokio-cron-scheduler does: day-of-month and day-of-week are ANDed.
    /// `timezone` is an IANA name; `None` means UTC.
    pub fn parse(job: &str, expr: &str, timezone: Option<&str>) -> Result<Schedule, ServeError> {
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expr)
            .map_err(|e| ServeError::Schedule { job: job.into(), schedule: expr.into(), message: e.to_string() })?;
        let tz = match timezone {
            None => Tz::UTC,
            Some(name) => {
                name.parse::<Tz>().map_err(|_| ServeError::Timezone { job: job.into(), timezone: name.into() })?
            }
        };
        Ok(Schedule { cron, tz })
    }

    /// The latest fire time at or before `now`.
    pub fn last_at_or_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&now.with_timezone(&self.tz), true).ok().map(|t| t.with_timezone(&Utc))
    }

    /// The first fire time strictly after `after`, evaluated on the wall
    /// clock of the job's time zone (so DST changes move the UTC instant).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&after.with_timezone(&self.tz), false).ok().map(|t| t.with_timezone(&Utc))
    }
}

/// Every enabled job with a schedule, parsed; the first bad one is an error.
pub fn schedules(project: &Project) -> Result<Vec<(String, Schedule)>, ServeError> {
    let mut out = Vec::new();
    for job in project.jobs.values().filter(|j| j.spec.enabled) {
        let Some(expr) = &job.spec.schedule else { continue };
        let tz = job.spec.timezone.as_ref().map(|t| t.get_ref().as_str());
        out.push((job.name.clone(), Schedule::parse(&job.name, expr.get_ref(), tz)?));
    }
    Ok(out)
}

/// What every run task of `serve` shares.
#[derive(Clone)]
struct Runner {
    project: Arc<Project>,
    state: Arc<StateStore>,
    permits: Arc<Semaphore>,
    in_flight: Arc<Mutex<HashSet<String>>>,
    stopping: watch::Receiver<bool>,
    cancel: watch::Receiver<bool>,
}

impl Runner {
    /// Starts a run series for `name` unless one is still going, in which
    /// case the skip is recorded.
    fn start(&self, runs: &mut JoinSet<()>, name: &str, trigger: &'static str) {
        let fresh = self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        if !fresh {
            skip(&self.state, name, trigger, "the previous run of this job was still going");
            return;
        }
        let (runner, name) = (self.clone(), name.to_string());
        runs.spawn(async move {
            let _permit = runner.permits.clone().acquire_owned().await;
            run_series(&runner.project, &runner.state, &name, trigger, runner.stopping.clone(), runner.cancel.clone())
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
fn missed(project: &Project, state: &StateStore, schedules: &[(String, Schedule)], now: DateTime<Utc>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, schedule) in schedules {
        if !project.jobs.get(name).is_some_and(|j| j.spec.catch_up) {
            continue;
        }
        let Some(due) = schedule.last_at_or_before(now) else { continue };
        match state.last_run_started(name) {
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
    project: Arc<Project>,
    state: Arc<StateStore>,
    config: Option<PathBuf>,
    grace: Duration,
    stop: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    // First, so a SIGHUP from here on reloads instead of killing the process.
    let mut hangup = Hangup::new();
    let mut schedules = schedules(&project)?;
    let closed = super::recover_abandoned(&project, &state).await?;
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
    let limit = project.global.limits.max_concurrent_runs.max(1) as usize;
    let mut runner = Runner {
        project: project.clone(),
        state: state.clone(),
        permits: Arc::new(Semaphore::new(limit)),
        in_flight: Arc::default(),
        stopping: stopping_rx,
        cancel: cancel_rx,
    };
    let mut runs = JoinSet::new();
    for name in missed(&project, &state, &schedules, start) {
        runner.start(&mut runs, &name, "catch_up");
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
                    runner.start(&mut runs, name, "schedule");
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
    if let Some(sender) = sender {
        let _ = sender.await;
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
    let loaded = Project::load(config).map_err(|e| e.to_string()).and_then(|p| {
        let s = self::schedules(&p).map_err(|e| e.to_string())?;
        Ok((p, s))
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
fn skip(state: &StateStore, job: &str, trigger: &str, reason: &str) {
    tracing::warn!(job, reason, "skipping this scheduled time");
    if let Err(e) = state.record_skipped(job, trigger, &format!("skipped: {reason}"), Utc::now()) {
        tracing::error!(job, error = %e, "could not record the skipped run");
    }
}

/// The delay before retry number `retry` (1 for the first retry):
/// `backoff` doubled each time, times a jitter in [0.8, 1.2) so jobs that
/// failed together do not retry in lockstep.
pub fn retry_delay(backoff: Duration, retry: u32, jitter: f64) -> Duration {
    let factor = 2f64.powi(retry.saturating_sub(1).min(16) as i32);
    backoff.mul_f64(factor * (0.8 + 0.4 * jitter.clamp(0.0, 1.0)))
}

/// One scheduled time: the run, and its retries per the job's `retries`
/// (`attempts` counts every attempt, the first included). Each attempt is
/// a history row of its own, linked to the first; only the last failure
/// is alerted. `stopping` ends the series between attempts; `cancel`
/// stops the attempt in flight.
pub async fn run_series(
    project: &Project,
    state: &StateStore,
    name: &str,
    trigger: &str,
    mut stopping: watch::Receiver<bool>,
    cancel: watch::Receiver<bool>,
) {
    let retries = project.jobs.get(name).and_then(|j| j.spec.retries.clone());
    let attempts = retries.as_ref().map_or(1, |r| r.attempts.max(1));
    let mut first_run = None;
    for number in 1..=attempts {
        let attempt = Attempt { number, last: number == attempts, first_run };
        let trigger = if number == 1 { trigger } else { "retry" };
        let mut cancel = cancel.clone();
        let cancelled = async move {
            let _ = cancel.wait_for(|c| *c).await;
        };
        let report = match run_job_attempt(project, state, name, trigger, attempt, cancelled).await {
            Ok(report) => report,
            Err(RunError::Locked(holder)) => {
                skip(state, name, trigger, &holder.to_string());
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
        let delay = retry_delay(r.backoff, number, fastrand::f64());
        tracing::warn!(job = %name, run = report.run_id, attempt = number, retry_in = ?delay, "run failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_local_schedule_keeps_its_wall_clock_time_across_dst_changes() {
        // Berlin: CET (UTC+1) until 2026-03-29 01:00Z, CEST (UTC+2) until 2026-10-25 01:00Z.
        let s = Schedule::parse("j", "0 0 6 * * *", Some("Europe/Berlin")).unwrap();
        let spring: Vec<DateTime<Utc>> =
            std::iter::successors(s.next_after(at("2026-03-27T12:00:00Z")), |t| s.next_after(*t)).take(3).collect();
        assert_eq!(
            spring,
            vec![at("2026-03-28T05:00:00Z"), at("2026-03-29T04:00:00Z"), at("2026-03-30T04:00:00Z")],
            "06:00 local before and after the spring change"
        );
        let autumn: Vec<DateTime<Utc>> =
            std::iter::successors(s.next_after(at("2026-10-23T12:00:00Z")), |t| s.next_after(*t)).take(3).collect();
        assert_eq!(autumn, vec![at("2026-10-24T04:00:00Z"), at("2026-10-25T05:00:00Z"), at("2026-10-26T05:00:00Z")]);
    }

    #[test]
    fn retry_delays_double_from_backoff_within_the_jitter() {
        let b = Duration::from_secs(60);
        assert_eq!(retry_delay(b, 1, 0.5), Duration::from_secs(60));
        assert_eq!(retry_delay(b, 2, 0.5), Duration::from_secs(120));
        assert_eq!(retry_delay(b, 3, 0.0), Duration::from_secs(192));
        assert_eq!(retry_delay(b, 1, 1.0), Duration::from_secs(72));
    }

    #[test]
    fn no_timezone_means_utc_and_seconds_are_required() {
        let s = Schedule::parse("j", "*/2 * * * * *", None).unwrap();
        assert_eq!(s.next_after(at("2026-01-01T00:00:01Z")), Some(at("2026-01-01T00:00:02Z")));
        let five = Schedule::parse("j", "0 2 * * *", None).unwrap_err().to_string();
        assert!(five.contains("jobs/j.toml: schedule `0 2 * * *`"), "{five}");
        let tz = Schedule::parse("j", "0 0 2 * * *", Some("Mars/Olympus")).unwrap_err().to_string();
        assert!(tz.contains("unknown timezone `Mars/Olympus`"), "{tz}");
    }
}
