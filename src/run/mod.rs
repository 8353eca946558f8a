//! One run of one job, from window planning to the watermark.
//!
//! The order of effects is the product's core promise: the target commit
//! happens in one transaction, and only after it succeeded does the
//! watermark move (written together with the run's closing row).

mod recover;
mod scheduler;
mod window;

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use thiserror::Error;
use tokio::sync::mpsc;

pub use recover::recover_abandoned;
pub use scheduler::{SHUTDOWN_GRACE, Schedule, ServeError, retry_delay, run_series, schedules, serve};
pub use window::{Window, build_soql, plan_window, soql_datetime};

use crate::config::{AuthFlow, ConfigError, Connection, Job, Project};
use crate::load::{LoadError, open_target};
use crate::salesforce::{JobGuard, RunClient, SalesforceClient, SalesforceError};
use crate::state::{LockHolder, RunCounts, RunEnd, RunId, RunStatus, StateError, StateStore};
use crate::transform::{MappedPage, Mapping, TransformError};

/// Receives `(job, pages, rows)` after each staged page. `nightjar run`
/// sets one to draw progress; `serve` leaves it unset (history is its record).
pub type ProgressSink = dyn Fn(&str, u64, u64) + Send + Sync;

static PROGRESS: std::sync::OnceLock<Box<ProgressSink>> = std::sync::OnceLock::new();

/// Installs the process's progress sink; only the first call takes effect.
pub fn report_progress_to(sink: Box<ProgressSink>) -> bool {
    PROGRESS.set(sink).is_ok()
}

/// Mapped pages waiting for the target: page N+1 downloads and maps while
/// page N is staged, and memory stays at a few pages.
const PAGES_IN_FLIGHT: usize = 1;

/// A page after mapping, on its way to the target.
struct MappedPageOf {
    number: u32,
    mapped: MappedPage,
    took: std::time::Duration,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Salesforce(#[from] SalesforceError),
    #[error("{0}")]
    Transform(#[from] TransformError),
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("{0}")]
    State(#[from] StateError),
    #[error(
        "{rejected} of {extracted} rows were rejected, more than max_reject_ratio = {max}; see `nightjar show {run} --rejects`, fix the data or the mapping, and run again"
    )]
    TooManyRejects { run: RunId, rejected: u64, extracted: u64, max: f64 },
    #[error("job `{job}`: {message}")]
    Job { job: String, message: String },
    /// Another run of the job is in flight (this or another process); this
    /// attempt did not start and left no history row.
    #[error("{0}; this attempt did not run")]
    Locked(LockHolder),
    /// The job's `timeout` passed: the run was stopped, its Salesforce job
    /// aborted and the target left as it was.
    #[error("the run took longer than the job's timeout ({}) and was stopped; nothing was committed", humantime::format_duration(*.0))]
    TimedOut(std::time::Duration),
    /// Stopped from outside (`serve` shutting down past its grace period).
    #[error("the run was stopped because nightjar was shutting down; nothing was committed")]
    Cancelled,
}

impl RunError {
    /// The error class that history and alerts show.
    pub fn class(&self) -> &'static str {
        match self {
            RunError::Config(_) | RunError::Job { .. } => "config",
            RunError::Salesforce(e) => e.class(),
            // Salesforce sent other columns than the job asked for: the org changed.
            RunError::Transform(TransformError::MissingColumn(_)) => "schema_drift",
            RunError::Transform(_) => "transform",
            RunError::Load(e) => e.class(),
            RunError::State(_) => "state",
            RunError::TooManyRejects { .. } => "data_rejects",
            RunError::Locked(_) => "locked",
            RunError::TimedOut(_) => "timeout",
            RunError::Cancelled => "cancelled",
        }
    }
}

/// How a run ended, for the caller to print.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_id: RunId,
    pub job: String,
    pub status: RunStatus,
    pub counts: RunCounts,
    pub window: Option<Window>,
    pub salesforce_job_ids: Vec<String>,
    pub error: Option<String>,
}

/// What a run learned along the way; kept even when it fails, for history.
#[derive(Default)]
struct Progress {
    counts: RunCounts,
    /// The run client's request counter, once there is a client.
    api_calls: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    window: Option<Window>,
    salesforce_job_ids: Vec<String>,
}

/// Which attempt of a series a run is (retries, issue 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub number: u32,
    /// A failed last attempt is alerted; earlier ones are not.
    pub last: bool,
    /// The series' first run, for every attempt after it.
    pub first_run: Option<RunId>,
}

impl Attempt {
    pub const ONLY: Attempt = Attempt { number: 1, last: true, first_run: None };
}

/// Runs one job now. A failure is recorded in history and reported in the
/// returned report; `Err` means the run could not even be recorded, or
/// ([`RunError::Locked`]) another run of the job holds its lock.
pub async fn run_job(
    project: &Project,
    state: &StateStore,
    job_name: &str,
    trigger: &str,
) -> Result<RunReport, RunError> {
    run_job_attempt(project, state, job_name, trigger, Attempt::ONLY, std::future::pending()).await
}

/// [`run_job`] as one attempt of a series of retries. When `cancel`
/// resolves first, the run stops like a timed-out one (Bulk job aborted,
/// target rolled back) and is recorded `cancelled`.
pub async fn run_job_attempt(
    project: &Project,
    state: &StateStore,
    job_name: &str,
    trigger: &str,
    attempt: Attempt,
    cancel: impl std::future::Future<Output = ()>,
) -> Result<RunReport, RunError> {
    let job = project.job(job_name)?;
    let alerts = crate::alert::AlertSettings::for_job(project, job);
    // Held until the run row is closed; dropping it (also when this future
    // is dropped) releases it.
    let lock = state.try_lock_job(job_name, Utc::now())?.map_err(RunError::Locked)?;
    let run = state.open_run_attempt(job_name, trigger, attempt.number, attempt.first_run, Utc::now())?;
    lock.set_run(run)?;
    tracing::info!(job = job_name, run, attempt = attempt.number, "run started");
    let mut progress = Progress::default();
    // On timeout the pipeline future is dropped: the Bulk job's guard aborts
    // it and the target's open transaction (or staging) is rolled back.
    let pipeline = async {
        match job.spec.timeout {
            Some(limit) => tokio::time::timeout(limit, execute(project, state, job, run, &mut progress))
                .await
                .unwrap_or(Err(RunError::TimedOut(limit))),
            None => execute(project, state, job, run, &mut progress).await,
        }
    };
    let result = tokio::select! {
        result = pipeline => result,
        _ = cancel => Err(RunError::Cancelled),
    };
    let (status, watermark, error_class, error) = match &result {
        Ok(watermark) => (RunStatus::Succeeded, *watermark, None, None),
        Err(e @ (RunError::TimedOut(_) | RunError::Cancelled)) => {
            (RunStatus::Cancelled, None, Some(e.class().to_string()), Some(e.to_string()))
        }
        Err(e) => (RunStatus::Failed, None, Some(e.class().to_string()), Some(e.to_string())),
    };
    if let Some(calls) = &progress.api_calls {
        progress.counts.api_calls = calls.load(std::sync::atomic::Ordering::Relaxed);
    }
    let end = RunEnd {
        status,
        counts: progress.counts.clone(),
        salesforce_job_ids: progress.salesforce_job_ids.clone(),
        error_class,
        error: error.clone(),
    };
    let finished_at = Utc::now();
    let facts = crate::alert::RunFacts {
        job: job_name,
        run,
        trigger,
        outcome: match crate::alert::Outcome::of(&result) {
            crate::alert::Outcome::Failed { .. } => crate::alert::Outcome::Failed { last_attempt: attempt.last },
            other => other,
        },
        window: progress.window,
        full_refresh: job.spec.source.cursor.is_none(),
        counts: &end.counts,
        salesforce_job_ids: &end.salesforce_job_ids,
        error: result.as_ref().err().map(crate::alert::ErrorDetail::from_run_error),
        finished_at,
    };
    // The alert commits with the run row and the watermark, or not at all.
    state.finish_run_with(run, &end, watermark, finished_at, |conn| {
        crate::alert::queue_for_run(conn, &alerts, &facts).map(drop)
    })?;
    drop(lock);
    match &error {
        None => tracing::info!(job = job_name, run, extracted = end.counts.extracted, "run succeeded"),
        Some(e) => tracing::error!(job = job_name, run, error = %e, "run failed"),
    }
    Ok(RunReport {
        run_id: run,
        job: job_name.to_string(),
        status,
        counts: progress.counts,
        window: progress.window,
        salesforce_job_ids: progress.salesforce_job_ids,
        error,
    })
}

/// The pipeline proper. Returns the new watermark (the window's upper bound)
/// once the target commit has succeeded.
async fn execute(
    project: &Project,
    state: &StateStore,
    job: &Job,
    run: RunId,
    progress: &mut Progress,
) -> Result<Option<DateTime<Utc>>, RunError> {
    let spec = &job.spec;
    let source = &spec.source;
    let conn_name = source.connection.get_ref();
    let Some(Connection::Salesforce(conn)) = project.connection(conn_name) else {
        return Err(RunError::Job {
            job: job.name.clone(),
            message: format!("source connection `{conn_name}` is not a Salesforce connection"),
        });
    };
    let mapping = Mapping::new(spec, &job.mapping)?;
    let schema = mapping.schema();
    // One client per connection for the whole process: runs share its token
    // and its Bulk job slots; the retry budget is per run.
    let shared = SalesforceClient::shared(conn_name, conn)?;
    if conn.auth == AuthFlow::RefreshToken {
        shared.set_refresh_token(state.refresh_token(conn_name)?);
    }
    let client = shared.for_run();
    progress.api_calls = Some(client.api_calls());

    let started = Utc::now();
    let clock = Instant::now();
    // The limits guard and the server clock come from one /limits call.
    let limits = client.limits().await?;
    client.check_budget(&limits)?;
    let server_now = limits.server_now;
    let watermark = state.watermark(&job.name)?;
    let window = source.cursor.as_ref().map(|_| plan_window(watermark, server_now, source.lookback, source.settle));
    state.set_window(run, window.and_then(|w| w.start), window.map(|w| w.end), watermark)?;
    progress.window = window;
    state.record_step(run, "plan", started, clock.elapsed())?;

    let mut target = open_target(project, job).await?;
    target.prepare(&schema, run).await?;
    let loaded = load_pages(state, job, run, &client, &mapping, &mut *target, window, progress).await;
    let counts = match loaded {
        Ok(()) => {
            let started = Utc::now();
            let clock = Instant::now();
            let result = target.commit().await;
            state.record_step(run, "commit", started, clock.elapsed())?;
            result?
        }
        Err(e) => {
            if let Err(abort) = target.abort().await {
                tracing::warn!(run, error = %abort, "dropping staging after a failure also failed");
            }
            return Err(e);
        }
    };
    progress.counts.inserted = counts.inserted;
    progress.counts.updated = counts.updated;
    progress.counts.unchanged = counts.unchanged;
    progress.counts.deleted = counts.deleted;
    Ok(window.map(|w| w.end))
}

#[allow(clippy::too_many_arguments)]
async fn load_pages(
    state: &StateStore,
    job: &Job,
    run: RunId,
    client: &RunClient,
    mapping: &Mapping,
    target: &mut dyn crate::load::Target,
    window: Option<Window>,
    progress: &mut Progress,
) -> Result<(), RunError> {
    let source = &job.spec.source;
    let fields: Vec<&str> = source.fields.get_ref().iter().map(|f| f.get_ref().as_str()).collect();
    let soql = build_soql(
        &fields,
        source.object.get_ref(),
        source.where_clause.as_deref(),
        source.cursor.as_ref().map(|c| c.get_ref().as_str()),
        window,
    );
    tracing::debug!(job = %job.name, %soql, "creating query job");

    let started = Utc::now();
    let clock = Instant::now();
    // Held until the results are downloaded: at most max_concurrent_jobs
    // Bulk jobs per connection at once.
    let _slot = client.job_slot().await;
    let created = client.create_query_job(&soql, source.include_deleted).await?;
    let sf_job = created.id.clone();
    progress.salesforce_job_ids.push(sf_job.clone());
    state.add_salesforce_job(run, &sf_job)?;
    let mut guard = JobGuard::new(client, &sf_job);
    let waited = client.wait_for_job(&sf_job).await;
    guard.disarm();
    if let Err(e) = waited {
        if !matches!(e, SalesforceError::JobFailed { .. } | SalesforceError::JobAborted { .. })
            && let Err(abort) = client.abort_job(&sf_job).await
        {
            tracing::warn!(job = %job.name, sf_job = %sf_job, error = %abort, "could not abort the Salesforce job");
        }
        return Err(e.into());
    }
    state.record_step(run, "extract", started, clock.elapsed())?;

    // Download, parse and mapping run ahead in their own task, so they
    // overlap with staging into the target (which mostly waits on the
    // database): page N+1 is fetched and mapped while page N is staged.
    let (tx, mut rx) = mpsc::channel::<Result<MappedPageOf, RunError>>(PAGES_IN_FLIGHT);
    let producer = {
        let client = client.clone();
        let sf_job = sf_job.clone();
        let page_size = source.page_size;
        let mapping = Arc::new(mapping.clone());
        tokio::spawn(async move {
            let mut locator: Option<String> = None;
            let mut number = 1;
            loop {
                let page = match client.results_page(&sf_job, locator.as_deref(), page_size, number).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        break;
                    }
                };
                let next = page.next_locator.clone();
                let mapping = Arc::clone(&mapping);
                // Mapping is CPU work: off the async workers.
                let mapped = tokio::task::spawn_blocking(move || {
                    let clock = Instant::now();
                    let mapped = mapping.apply(&page.frame);
                    drop(page.frame);
                    mapped.map(|mapped| MappedPageOf { number: page.number, mapped, took: clock.elapsed() })
                })
                .await;
                let mapped = match mapped {
                    Ok(result) => result.map_err(RunError::from),
                    Err(join) => Err(RunError::Transform(TransformError::Invalid(format!(
                        "mapping page {number} stopped unexpectedly (a bug in nightjar; please report it): {join}"
                    )))),
                };
                let failed = mapped.is_err();
                if tx.send(mapped).await.is_err() || failed || next.is_none() {
                    break;
                }
                locator = next;
                number += 1;
            }
        })
    };

    let mut transform_time = std::time::Duration::ZERO;
    let mut load_time = std::time::Duration::ZERO;
    let load_started = Utc::now();
    let result = async {
        while let Some(page) = rx.recv().await {
            let MappedPageOf { number, mapped, took } = page?;
            transform_time += took;
            progress.counts.pages += 1;
            progress.counts.extracted += mapped.rows_in as u64;
            progress.counts.filtered += mapped.rows_filtered as u64;
            progress.counts.rejected += mapped.rejects.len() as u64;
            if !mapped.rejects.is_empty() {
                state.add_rejects(run, &mapped.rejects)?;
            }
            let clock = Instant::now();
            target.stage(&mapped.frame).await?;
            crate::load::pause_point("stage");
            load_time += clock.elapsed();
            tracing::debug!(job = %job.name, page = number, rows = mapped.rows_in, "page staged");
            if let Some(sink) = PROGRESS.get() {
                sink(&job.name, progress.counts.pages, progress.counts.extracted);
            }
        }
        Ok::<(), RunError>(())
    }
    .await;
    producer.abort();
    result?;
    state.record_step(run, "transform", load_started, transform_time)?;
    state.record_step(run, "load", load_started, load_time)?;

    let c = &progress.counts;
    let max = job.spec.transform.max_reject_ratio;
    if c.rejected > 0 && (c.rejected as f64) > max * (c.extracted as f64) {
        return Err(RunError::TooManyRejects { run, rejected: c.rejected, extracted: c.extracted, max });
    }
    Ok(())
}
