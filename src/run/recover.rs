//! Crash recovery: runs left `running` by a process that died.
//!
//! Called when `run` and `serve` start. Such a run committed nothing past
//! its watermark (the target commit and the watermark are atomic), so
//! recovery only has to close its history row, free its Salesforce job and
//! tell someone.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Engine, OwnedFacts, source_client};
use crate::alert::{ErrorDetail, JobAlerts, Outcome, queue_for_run};
use crate::config::Project;
use crate::outcome::ErrorClass;
use crate::state::{OrphanedRun, RunId, StateError, StateStore};
use crate::window::Window;

/// How long one abort of an orphaned Salesforce job may take: recovery
/// must not hold up the runs that come after it.
const ABORT_TIMEOUT: Duration = Duration::from_secs(15);

/// Marks every run of this host whose process is gone `abandoned`, aborts
/// its Salesforce jobs (best effort) and queues an alert with the same
/// transaction. Returns the runs it closed.
pub async fn recover_abandoned(
    engine: &Engine,
    project: &Project,
    state: &StateStore,
) -> Result<Vec<RunId>, StateError> {
    let mut closed = Vec::new();
    for OrphanedRun { run, pid } in state.orphaned_runs().await? {
        abort_salesforce_jobs(engine, project, state, &run.job, &run.salesforce_job_ids).await;
        let message = format!(
            "the process running it ({}) ended before the run closed; nothing past the previous watermark was committed",
            pid.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"))
        );
        let now = Utc::now();
        let window = run
            .window_end
            .as_deref()
            .and_then(parse)
            .map(|end| Window { start: run.window_start.as_deref().and_then(parse), end });
        // A job deleted from jobs/ since has no alert settings left to honour.
        let alert = project.jobs.get(&run.job).map(|job| {
            let facts = OwnedFacts {
                job: run.job.clone(),
                run: run.id,
                trigger: run.trigger.clone(),
                outcome: Outcome::Abandoned,
                window,
                full_refresh: job.source.cursor.is_none(),
                counts: run.counts.clone(),
                salesforce_job_ids: run.salesforce_job_ids.clone(),
                error: Some(ErrorDetail { class: ErrorClass::Abandoned, message: message.clone(), salesforce: None }),
                finished_at: now,
            };
            (JobAlerts::for_job(project, job), facts)
        });
        let done = state
            .abandon_run_with(run.id, &message, now, move |conn| match &alert {
                Some((settings, facts)) => queue_for_run(conn, settings, &facts.view()).map(drop),
                None => Ok(()),
            })
            .await?;
        if done {
            tracing::warn!(job = %run.job, run = run.id, "run left running by a dead process marked abandoned");
            closed.push(run.id);
        }
    }
    Ok(closed)
}

fn parse(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// Aborts the Bulk jobs a dead run left behind, so they stop using the
/// org's job slots; failures are logged, never fatal.
async fn abort_salesforce_jobs(engine: &Engine, project: &Project, state: &StateStore, job: &str, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let Some(job) = project.jobs.get(job) else { return };
    let client = match source_client(engine, project, state, job).await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(job = %job.name, error = %e, "cannot abort the abandoned run's Salesforce jobs");
            return;
        }
    };
    for id in ids {
        match tokio::time::timeout(ABORT_TIMEOUT, client.abort_job(id)).await {
            Ok(Ok(())) => tracing::info!(job = %job.name, sf_job = %id, "aborted the abandoned run's Salesforce job"),
            Ok(Err(e)) => tracing::warn!(job = %job.name, sf_job = %id, error = %e, "could not abort a Salesforce job"),
            Err(_) => tracing::warn!(job = %job.name, sf_job = %id, "aborting a Salesforce job timed out"),
        }
    }
}
