//! One run of one job, from window planning to the watermark.
//!
//! The order of effects is the product's core promise: the pipeline
//! (`pipeline.rs`) stages every page, the target commits in one transaction
//! only after every pipeline stage finished well and the rows add up, and
//! only after that commit does the watermark move (written together with
//! the run's closing row and its alert).

mod engine;
mod pipeline;
mod recover;
mod scheduler;

use std::time::Instant;

use chrono::{DateTime, Utc};
use thiserror::Error;

pub use engine::{Engine, ProgressSink};
pub use pipeline::Stage;
pub use recover::recover_abandoned;
pub use scheduler::{SHUTDOWN_GRACE, ServeError, run_series, schedules, serve};

use crate::alert::{ErrorDetail, JobAlerts, Outcome, RunFacts, SalesforceDetail};
use crate::config::{AuthFlow, ConfigError, Connection, JobPlan, Project};
use crate::load::{LoadError, MergePlan, open_target};
use crate::outcome::{ErrorClass, RunStatus, Trigger};
use crate::salesforce::{JobGuard, ResultPages, RunClient, SalesforceError, build_soql};
use crate::state::{LockHolder, RunCounts, RunEnd, RunId, StateError, StateStore};
use crate::transform::{Mapping, TransformError};
use crate::window::{Window, plan_window};

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
    /// Salesforce's results did not add up to what its job reported.
    #[error(
        "Salesforce query job {sf_job} reported {reported} rows (numberRecordsProcessed) but its results ended after {received} rows in {pages} page(s); nothing was committed and the watermark did not move"
    )]
    ExtractIncomplete { sf_job: String, reported: u64, received: u64, pages: u32 },
    /// A pipeline stage stopped unexpectedly (a panic: a bug).
    #[error(
        "the {} stage stopped unexpectedly at page {page} of Salesforce query job {sf_job}: {message}; nothing was committed",
        stage.name()
    )]
    StageFailed { stage: Stage, page: u32, sf_job: String, message: String },
    /// What went wrong with one page in the map or stage step.
    #[error("{} of page {page} of Salesforce query job {sf_job}: {source}", stage.doing())]
    AtPage { stage: Stage, page: u32, sf_job: String, source: Box<RunError> },
    /// A stage's input ended without the end-of-extract message: the stage
    /// before it failed (that failure is the one reported).
    #[error("the {} stage ended before the extract did", .0.name())]
    UpstreamGone(Stage),
    #[error("{0} (a bug in nightjar; please report it)")]
    Internal(String),
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
    pub fn class(&self) -> ErrorClass {
        match self {
            RunError::Config(_) | RunError::Job { .. } => ErrorClass::Config,
            RunError::Salesforce(e) => e.class(),
            // Salesforce sent other columns than the job asked for: the org changed.
            RunError::Transform(TransformError::MissingColumn(_)) => ErrorClass::SchemaDrift,
            RunError::Transform(_) => ErrorClass::Transform,
            RunError::Load(e) => e.class(),
            RunError::State(_) => ErrorClass::State,
            RunError::TooManyRejects { .. } => ErrorClass::DataRejects,
            RunError::ExtractIncomplete { .. } => ErrorClass::ExtractIncomplete,
            RunError::StageFailed { .. } | RunError::UpstreamGone(_) | RunError::Internal(_) => ErrorClass::Internal,
            RunError::AtPage { source, .. } => source.class(),
            RunError::Locked(_) => ErrorClass::Locked,
            RunError::TimedOut(_) => ErrorClass::Timeout,
            RunError::Cancelled => ErrorClass::Cancelled,
        }
    }

    /// Whether this only says that an earlier stage ended the pipeline.
    fn is_upstream_gone(&self) -> bool {
        matches!(self, RunError::UpstreamGone(_))
    }

    /// The error as an alert shows it.
    pub fn detail(&self) -> ErrorDetail {
        let salesforce = match self {
            RunError::Salesforce(e) => e.salesforce_said().map(|(code, message, job_id)| SalesforceDetail {
                code: code.map(str::to_string),
                message: message.to_string(),
                job_id: job_id.map(str::to_string),
            }),
            RunError::ExtractIncomplete { sf_job, .. }
            | RunError::StageFailed { sf_job, .. }
            | RunError::AtPage { sf_job, .. } => {
                Some(SalesforceDetail { code: None, message: self.to_string(), job_id: Some(sf_job.clone()) })
            }
            _ => None,
        };
        ErrorDetail { class: self.class(), message: self.to_string(), salesforce }
    }

    /// How the run ended, as alerting sees it (as a last attempt).
    fn outcome(&self) -> Outcome {
        match self {
            RunError::Salesforce(SalesforceError::ApiBudgetLow { .. }) => Outcome::SkippedBudget,
            RunError::TimedOut(_) => Outcome::TimedOut,
            RunError::Cancelled => Outcome::Cancelled,
            _ => Outcome::Failed { last_attempt: true },
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
    pub error_class: Option<ErrorClass>,
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

/// Which attempt of a series a run is (retries).
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
    engine: &Engine,
    project: &Project,
    state: &StateStore,
    job_name: &str,
    trigger: Trigger,
) -> Result<RunReport, RunError> {
    run_job_attempt(engine, project, state, job_name, trigger, Attempt::ONLY, std::future::pending()).await
}

/// [`run_job`] as one attempt of a series of retries. When `cancel`
/// resolves first, the run stops like a timed-out one (Bulk job aborted,
/// target rolled back) and is recorded `cancelled`.
pub async fn run_job_attempt(
    engine: &Engine,
    project: &Project,
    state: &StateStore,
    job_name: &str,
    trigger: Trigger,
    attempt: Attempt,
    cancel: impl std::future::Future<Output = ()>,
) -> Result<RunReport, RunError> {
    let job = project.job(job_name)?;
    let alerts = JobAlerts::for_job(project, job);
    // Released when the run row is closed; dropped (a cancelled future), it
    // is released in the background.
    let lock = state.try_lock_job(job_name, Utc::now()).await?.map_err(RunError::Locked)?;
    let run = state.open_run_attempt(job_name, trigger, attempt.number, attempt.first_run, Utc::now()).await?;
    lock.set_run(run).await?;
    tracing::info!(job = job_name, run, attempt = attempt.number, "run started");
    let mut progress = Progress::default();
    // On timeout the pipeline future is dropped: the Bulk job's guard aborts
    // it, the pipeline's tasks stop, and the target's open transaction (or
    // staging) is rolled back.
    let pipeline = async {
        match job.timeout {
            Some(limit) => tokio::time::timeout(limit, execute(engine, project, state, job, run, &mut progress))
                .await
                .unwrap_or(Err(RunError::TimedOut(limit))),
            None => execute(engine, project, state, job, run, &mut progress).await,
        }
    };
    let result = tokio::select! {
        result = pipeline => result,
        _ = cancel => Err(RunError::Cancelled),
    };
    let (status, watermark) = match &result {
        Ok(watermark) => (RunStatus::Succeeded, *watermark),
        Err(RunError::TimedOut(_) | RunError::Cancelled) => (RunStatus::Cancelled, None),
        Err(_) => (RunStatus::Failed, None),
    };
    if let Some(calls) = &progress.api_calls {
        progress.counts.api_calls = calls.load(std::sync::atomic::Ordering::Relaxed);
    }
    let error = result.as_ref().err();
    let end = RunEnd {
        status,
        counts: progress.counts.clone(),
        salesforce_job_ids: progress.salesforce_job_ids.clone(),
        error_class: error.map(|e| e.class().as_str().to_string()),
        error: error.map(ToString::to_string),
    };
    let finished_at = Utc::now();
    let outcome = match error.map(RunError::outcome) {
        None => Outcome::Succeeded,
        Some(Outcome::Failed { .. }) => Outcome::Failed { last_attempt: attempt.last },
        Some(other) => other,
    };
    let facts = OwnedFacts {
        job: job_name.to_string(),
        run,
        trigger: trigger.as_str().to_string(),
        outcome,
        window: progress.window,
        full_refresh: job.source.cursor.is_none(),
        counts: end.counts.clone(),
        salesforce_job_ids: end.salesforce_job_ids.clone(),
        error: error.map(RunError::detail),
        finished_at,
    };
    // The alert commits with the run row and the watermark, or not at all.
    state
        .finish_run_with(run, end.clone(), watermark, finished_at, move |conn| {
            crate::alert::queue_for_run(conn, &alerts, &facts.view()).map(drop)
        })
        .await?;
    lock.release().await?;
    match &end.error {
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
        error: end.error,
        error_class: error.map(RunError::class),
    })
}

/// [`RunFacts`] with owned fields, to move onto the state thread.
struct OwnedFacts {
    job: String,
    run: RunId,
    trigger: String,
    outcome: Outcome,
    window: Option<Window>,
    full_refresh: bool,
    counts: RunCounts,
    salesforce_job_ids: Vec<String>,
    error: Option<ErrorDetail>,
    finished_at: DateTime<Utc>,
}

impl OwnedFacts {
    fn view(&self) -> RunFacts<'_> {
        RunFacts {
            job: &self.job,
            run: self.run,
            trigger: &self.trigger,
            outcome: self.outcome,
            window: self.window,
            full_refresh: self.full_refresh,
            counts: &self.counts,
            salesforce_job_ids: &self.salesforce_job_ids,
            error: self.error.clone(),
            finished_at: self.finished_at,
        }
    }
}

/// The client of the job's source connection, with the refresh token that
/// `nightjar auth login` stored, if the connection uses one.
pub(crate) async fn source_client(
    engine: &Engine,
    project: &Project,
    state: &StateStore,
    job: &JobPlan,
) -> Result<RunClient, RunError> {
    let name = &job.source.connection;
    let Some(Connection::Salesforce(conn)) = project.connection(name) else {
        return Err(RunError::Job {
            job: job.name.clone(),
            message: format!("source connection `{name}` is not a Salesforce connection"),
        });
    };
    let shared = engine.clients.get(name, conn)?;
    if conn.auth == AuthFlow::RefreshToken {
        shared.set_refresh_token(state.refresh_token(name).await?);
    }
    Ok(shared.for_run())
}

/// The run proper. Returns the new watermark (the window's upper bound)
/// once the target commit has succeeded.
async fn execute(
    engine: &Engine,
    project: &Project,
    state: &StateStore,
    job: &JobPlan,
    run: RunId,
    progress: &mut Progress,
) -> Result<Option<DateTime<Utc>>, RunError> {
    let source = &job.source;
    let client = source_client(engine, project, state, job).await?;
    progress.api_calls = Some(client.api_calls());

    let started = Utc::now();
    let clock = Instant::now();
    // The limits guard and the server clock come from one /limits call.
    let limits = client.limits().await?;
    client.check_budget(&limits)?;
    let watermark = state.watermark(&job.name).await?;
    let window =
        source.cursor.as_ref().map(|_| plan_window(watermark, limits.server_now, source.lookback, source.settle));
    state.set_window(run, window.and_then(|w| w.start), window.map(|w| w.end), watermark).await?;
    progress.window = window;
    state.record_step(run, "plan", started, clock.elapsed()).await?;

    let mut target = open_target(job, engine.hooks.clone()).await?;
    target.prepare(&MergePlan::for_job(job, run)).await?;
    let (target, loaded) = extract_and_stage(engine, state, job, run, &client, target, window, progress).await;
    let Some(mut target) = target else {
        // A stage panicked holding the target; dropping it rolled it back.
        return Err(loaded.err().unwrap_or_else(|| RunError::Internal("the target was lost".into())));
    };
    if let Err(e) = loaded {
        if let Err(abort) = target.abort().await {
            tracing::warn!(run, error = %abort, "dropping staging after a failure also failed");
        }
        return Err(e);
    }
    let started = Utc::now();
    let clock = Instant::now();
    let committed = target.commit().await;
    state.record_step(run, "commit", started, clock.elapsed()).await?;
    let counts = committed?;
    progress.counts.inserted = counts.inserted;
    progress.counts.updated = counts.updated;
    progress.counts.unchanged = counts.unchanged;
    progress.counts.deleted = counts.deleted;
    Ok(window.map(|w| w.end))
}

/// The Bulk query job, then the pipeline over its results into the target,
/// which comes back unless a stage panicked with it.
#[allow(clippy::too_many_arguments)]
async fn extract_and_stage(
    engine: &Engine,
    state: &StateStore,
    job: &JobPlan,
    run: RunId,
    client: &RunClient,
    target: Box<dyn crate::load::Target>,
    window: Option<Window>,
    progress: &mut Progress,
) -> (Option<Box<dyn crate::load::Target>>, Result<(), RunError>) {
    match query_job(state, job, run, client, window, progress).await {
        // The Bulk job slot is held until its results are staged.
        Ok((info, _slot)) => {
            let load_started = Utc::now();
            let input = pipeline::PipelineInput {
                job: job.name.clone(),
                sf_job: info.id.clone(),
                run,
                state: state.clone(),
                hooks: engine.hooks.clone(),
                progress: engine.progress.clone(),
            };
            let pages = ResultPages::new(client, &info, job.source.page_size);
            let (target, staged) = pipeline::run_pipeline(input, pages, Mapping::new(job), target, progress).await;
            let checked = match staged {
                Ok(staged) => after_staging(state, job, run, load_started, staged, progress).await,
                Err(e) => Err(e),
            };
            (target, checked)
        }
        Err(e) => (Some(target), Err(e)),
    }
}

/// Step timings, then the reject ratio.
async fn after_staging(
    state: &StateStore,
    job: &JobPlan,
    run: RunId,
    load_started: DateTime<Utc>,
    staged: pipeline::Staged,
    progress: &Progress,
) -> Result<(), RunError> {
    state.record_step(run, "transform", load_started, staged.transform_time).await?;
    state.record_step(run, "load", load_started, staged.load_time).await?;
    let c = &progress.counts;
    let max = job.max_reject_ratio;
    if c.rejected > 0 && (c.rejected as f64) > max * (c.extracted as f64) {
        return Err(RunError::TooManyRejects { run, rejected: c.rejected, extracted: c.extracted, max });
    }
    Ok(())
}

/// Creates the Bulk query job and waits until it completes; returns it with
/// its slot among the connection's `max_concurrent_jobs`.
async fn query_job(
    state: &StateStore,
    job: &JobPlan,
    run: RunId,
    client: &RunClient,
    window: Option<Window>,
    progress: &mut Progress,
) -> Result<(crate::salesforce::JobInfo, tokio::sync::OwnedSemaphorePermit), RunError> {
    let source = &job.source;
    let soql = build_soql(source, window);
    tracing::debug!(job = %job.name, %soql, "creating query job");

    let started = Utc::now();
    let clock = Instant::now();
    // At most max_concurrent_jobs Bulk jobs per connection at once.
    let slot = client.job_slot().await;
    let created = client.create_query_job(&soql, source.include_deleted).await?;
    let sf_job = created.id.clone();
    progress.salesforce_job_ids.push(sf_job.clone());
    state.add_salesforce_job(run, &sf_job).await?;
    let mut guard = JobGuard::new(client, &sf_job);
    let waited = client.wait_for_job(&sf_job).await;
    guard.disarm();
    let info = match waited {
        Ok(info) => info,
        Err(e) => {
            if !matches!(e, SalesforceError::JobFailed { .. } | SalesforceError::JobAborted { .. })
                && let Err(abort) = client.abort_job(&sf_job).await
            {
                tracing::warn!(job = %job.name, sf_job = %sf_job, error = %abort, "could not abort the Salesforce job");
            }
            return Err(e.into());
        }
    };
    progress.counts.reported = info.number_records_processed;
    state.record_step(run, "extract", started, clock.elapsed()).await?;
    Ok((info, slot))
}
