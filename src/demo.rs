//! `nightjar demo`: the guided tour. Starts the sandbox in-process, runs the
//! example jobs, changes the sandbox's data, lets its clock pass `settle`,
//! runs again incrementally, and prints what each run moved.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

use crate::commands::history_table;
use crate::config::{Connection, Project, Secret, TargetKind};
use crate::outcome::Trigger;
use crate::run::{Engine, RunError, RunReport, run_job};
use crate::sandbox::{Sandbox, SandboxConfig, SandboxError};
use crate::state::{HistoryFilter, RunStatus, StateError, StateStore};

/// Records the demo's sandbox starts with, per object.
pub const DEMO_RECORDS: usize = 2_500;
/// Records the demo changes, adds and deletes between the two runs.
pub const DEMO_UPDATES: usize = 25;
pub const DEMO_INSERTS: usize = 10;
pub const DEMO_DELETES: usize = 5;

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("demo: no jobs in jobs/; the demo runs the example jobs shipped there")]
    NoJobs,
    #[error("demo: {0}")]
    Sandbox(#[from] SandboxError),
    #[error("demo: starting the sandbox: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo: {0}")]
    Run(#[from] RunError),
    #[error("demo: {0}")]
    State(#[from] StateError),
    #[error("demo: resetting the demo warehouse: {0}")]
    Reset(#[from] rusqlite::Error),
    #[error("demo: run {run} of job `{job}` failed: {error}")]
    RunFailed { run: i64, job: String, error: String },
}

/// What the demo did, for callers (and tests) to check against the warehouse.
#[derive(Debug)]
pub struct DemoSummary {
    pub first: Vec<RunReport>,
    pub second: Vec<RunReport>,
    pub updated_ids: Vec<String>,
    pub inserted_ids: Vec<String>,
    pub deleted_ids: Vec<String>,
}

pub async fn run_demo(
    engine: &Engine,
    project: &Project,
    state: &StateStore,
    out: &mut dyn Write,
) -> Result<DemoSummary, DemoError> {
    if project.jobs.is_empty() {
        return Err(DemoError::NoJobs);
    }
    let objects: BTreeSet<String> = project.jobs.values().map(|j| j.source.object.clone()).collect();

    // The sandbox accepts the credentials the example connection is
    // configured with, so the demo exercises the real login path.
    let mut sandbox_config = SandboxConfig {
        objects: objects.iter().map(|o| (o.clone(), DEMO_RECORDS)).collect(),
        ..SandboxConfig::default()
    };
    let source_connections: BTreeSet<String> = project.jobs.values().map(|j| j.source.connection.clone()).collect();
    if let Some(Connection::Salesforce(sf)) = source_connections.iter().next().and_then(|c| project.connection(c)) {
        sandbox_config.client_id = sf.client_id.expose().to_string();
        if let Some(secret) = &sf.client_secret {
            sandbox_config.client_secret = secret.expose().to_string();
        }
    }
    let sandbox = Sandbox::new(sandbox_config.clone())?;
    let running = sandbox.start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    writeln!(
        out,
        "sandbox: listening on {} with {} generated {}",
        running.base_url(),
        DEMO_RECORDS,
        objects.iter().cloned().collect::<Vec<_>>().join(", ")
    )?;

    // Point every Salesforce source at the in-process sandbox.
    let mut project = project.clone();
    for name in &source_connections {
        if let Some(Connection::Salesforce(sf)) = project.connections.get_mut(name) {
            sf.login_url = running.base_url().to_string();
            sf.client_id = Secret::new(sandbox_config.client_id.clone());
            sf.client_secret = Some(Secret::new(sandbox_config.client_secret.clone()));
        }
    }

    // Start from an empty warehouse so every demo prints the same story.
    for job in project.jobs.values() {
        state.clear_watermark(&job.name).await?;
        if let TargetKind::Sqlite { path, table } = &job.target.kind
            && path.exists()
        {
            let conn = rusqlite::Connection::open(path)?;
            conn.execute(&format!("DROP TABLE IF EXISTS {}", crate::load::quote_ident(table)), [])?;
        }
    }

    // The generated data was last touched just before the sandbox's start;
    // let an hour pass so all of it has settled.
    sandbox.advance_clock(Duration::from_secs(3600));
    let first_id =
        state.history(HistoryFilter { limit: Some(1), ..Default::default() }).await?.first().map_or(0, |r| r.id) + 1;

    writeln!(out, "\nfirst run: full extract of every job")?;
    let first = run_all(engine, &project, state, out).await?;

    let object = objects.iter().next().cloned().unwrap_or_default();
    let updated_ids = sandbox.update_records(&object, DEMO_UPDATES)?;
    let inserted_ids = sandbox.insert_records(&object, DEMO_INSERTS)?;
    // Delete records the demo did not just change, so each count tells one story.
    let deleted_ids: Vec<String> = sandbox
        .records(&object)?
        .into_iter()
        .filter_map(|r| r.into_iter().find(|(k, _)| k == "Id").and_then(|(_, v)| v))
        .filter(|id| !updated_ids.contains(id) && !inserted_ids.contains(id))
        .take(DEMO_DELETES)
        .collect();
    sandbox.delete_records(&object, &deleted_ids)?;
    let settle = project.jobs.values().map(|j| j.source.settle).max().unwrap_or_default();
    sandbox.advance_clock(settle + Duration::from_secs(60));
    writeln!(
        out,
        "\nsandbox: changed {DEMO_UPDATES}, added {DEMO_INSERTS} and deleted {DEMO_DELETES} {object} records; its clock moved {} past settle",
        humantime::format_duration(Duration::from_secs(60))
    )?;

    writeln!(out, "\nsecond run: incremental, only what changed since the watermark")?;
    let second = run_all(engine, &project, state, out).await?;

    let runs = state.history(HistoryFilter { min_id: Some(first_id), ..Default::default() }).await?;
    writeln!(out, "\nhistory (nightjar history):\n{}", history_table(&runs))?;
    running.shutdown().await;
    Ok(DemoSummary { first, second, updated_ids, inserted_ids, deleted_ids })
}

async fn run_all(
    engine: &Engine,
    project: &Project,
    state: &StateStore,
    out: &mut dyn Write,
) -> Result<Vec<RunReport>, DemoError> {
    let mut reports = Vec::new();
    for name in project.jobs.keys() {
        let report = run_job(engine, project, state, name, Trigger::Demo).await?;
        if report.status != RunStatus::Succeeded {
            return Err(DemoError::RunFailed {
                run: report.run_id,
                job: report.job,
                error: report.error.unwrap_or_default(),
            });
        }
        let c = &report.counts;
        writeln!(
            out,
            "  run {} {}: {} — extracted {} rows in {} page(s); inserted {}, updated {}, deleted {}, unchanged {}, rejected {}",
            report.run_id,
            report.job,
            report.status.as_str(),
            c.extracted,
            c.pages,
            c.inserted,
            c.updated,
            c.deleted,
            c.unchanged,
            c.rejected
        )?;
        reports.push(report);
    }
    Ok(reports)
}
