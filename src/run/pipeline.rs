//! The pipeline of one run: three stages joined by bounded channels.
//!
//! ```text
//!  download (async task)          map (blocking thread)        stage (the run's task)
//!  result pages, gunzip + CSV  ->  mapping, rejects       ->    target.stage(page)
//!  on the blocking pool            (rayon inside)               state: rejects, progress
//!        \___________ Flow::End(totals) travels last, after every page ____________/
//! ```
//!
//! Memory holds a few pages whatever the extract's size: each channel holds
//! one, each stage works on one. The extract ends with an explicit
//! [`Flow::End`] carrying what Salesforce declared; a stage that sees its
//! input close without it knows its upstream failed. [`run_pipeline`]
//! returns only after every stage has finished, and `Ok` only when every
//! stage finished well and the rows received add up to the rows Salesforce
//! reported: only then may the run commit. A stage that fails or panics
//! fails the run with the page, the Salesforce job and the stage named; the
//! caller rolls the target back and the watermark stays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Progress, RunError};
use crate::hooks::{HookPoint, SharedHooks};
use crate::load::Target;
use crate::salesforce::{Page, ResultPages};
use crate::state::RunCounts;
use crate::state::{RunId, StateStore};
use crate::transform::{Mapping, MappingOutput};

use super::engine::ProgressSink;

/// Pages waiting between two stages: one, so memory stays at a few pages.
const PAGES_IN_FLIGHT: usize = 1;

/// One message of a stage's output: a page, or the end of the extract.
enum Flow<T> {
    Page(T),
    End(Declared),
}

/// What the download stage saw and Salesforce declared, carried to the end.
#[derive(Debug, Clone, Copy)]
struct Declared {
    pages: u32,
    rows: u64,
    reported: u64,
}

/// What the pipeline did, for history.
#[derive(Debug, Clone, Copy, Default)]
pub struct Staged {
    pub transform_time: Duration,
    pub load_time: Duration,
}

/// The stages, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Download,
    Map,
    Stage,
}

impl Stage {
    /// What the stage does, for messages ("mapping of page 3 ...").
    pub fn doing(self) -> &'static str {
        match self {
            Stage::Download => "downloading",
            Stage::Map => "mapping",
            Stage::Stage => "staging",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::Download => "download",
            Stage::Map => "map",
            Stage::Stage => "stage",
        }
    }
}

/// Everything the stage step needs from the run.
pub(super) struct PipelineInput {
    pub job: String,
    pub sf_job: String,
    pub run: RunId,
    pub state: StateStore,
    pub hooks: SharedHooks,
    pub progress: Option<Arc<ProgressSink>>,
}

/// Aborts a spawned stage if the run stops first (timeout, cancel), so
/// nothing of it outlives the run; a no-op once the stage has ended.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the stage step hands back: the target (to commit or abort) and
/// the counts it kept, whatever happened.
struct StageEnd {
    target: Box<dyn Target>,
    counts: RunCounts,
    result: Result<Staged, RunError>,
}

/// Runs the pipeline over `pages` into `target` (prepared). `Ok` means every
/// page is staged and the rows add up; the caller may commit the target it
/// gets back. A target lost to a panicking stage is dropped mid-transaction,
/// which rolls it back.
pub(super) async fn run_pipeline(
    input: PipelineInput,
    pages: ResultPages,
    mapping: Mapping,
    target: Box<dyn Target>,
    progress: &mut Progress,
) -> (Option<Box<dyn Target>>, Result<Staged, RunError>) {
    let sf_job = pages.job_id().to_string();
    let downloading = Arc::new(AtomicU32::new(0));
    let mapping_page = Arc::new(AtomicU32::new(0));
    let staging_page = Arc::new(AtomicU32::new(0));
    let (pages_tx, pages_rx) = mpsc::channel::<Flow<Page>>(PAGES_IN_FLIGHT);
    let (mapped_tx, mapped_rx) = mpsc::channel::<Flow<(MappingOutput, Duration)>>(PAGES_IN_FLIGHT);

    let download: JoinHandle<Result<(), RunError>> =
        tokio::spawn(download(pages, pages_tx, input.hooks.clone(), downloading.clone()));
    let _abort_download = AbortOnDrop(download.abort_handle());
    let map = {
        let (hooks, current, sf_job) = (input.hooks.clone(), mapping_page.clone(), sf_job.clone());
        tokio::task::spawn_blocking(move || map(mapping, pages_rx, mapped_tx, hooks, current, &sf_job))
    };
    let stage = tokio::spawn(stage(input, mapped_rx, target, progress.counts.clone(), staging_page.clone()));
    let _abort_stage = AbortOnDrop(stage.abort_handle());
    // Every stage ends before anything commits: the stage step when its
    // input ends (or it fails, dropping its input, which stops the others).
    let staged = stage.await;
    let downloaded = download.await;
    let mapped = map.await;

    let page = |current: &AtomicU32| current.load(Ordering::Relaxed);
    let mut errors = Vec::new();
    errors.extend(settle(downloaded, Stage::Download, page(&downloading), &sf_job).err());
    errors.extend(settle(mapped, Stage::Map, page(&mapping_page), &sf_job).err());
    let (target, staged) = match staged {
        Ok(StageEnd { target, counts, result }) => {
            progress.counts = counts;
            (Some(target), result.map_err(|e| errors.push(e)).ok())
        }
        Err(e) => {
            errors.extend(settle(Err(e), Stage::Stage, page(&staging_page), &sf_job).err());
            (None, None)
        }
    };
    // The first stage in pipeline order that failed on its own account is
    // the cause; the later ones only saw their input end early.
    let cause = errors.iter().position(|e| !e.is_upstream_gone()).unwrap_or(0);
    if cause < errors.len() {
        return (target, Err(errors.swap_remove(cause)));
    }
    match staged {
        Some(staged) => (target, Ok(staged)),
        None => (target, Err(RunError::Internal("the pipeline ended without a result".into()))),
    }
}

/// A stage's result, with a panic turned into an error naming the stage,
/// the page and the Salesforce job.
fn settle(
    joined: Result<Result<(), RunError>, tokio::task::JoinError>,
    stage: Stage,
    page: u32,
    sf_job: &str,
) -> Result<(), RunError> {
    match joined {
        Ok(result) => result,
        Err(e) => Err(RunError::StageFailed {
            stage,
            page,
            sf_job: sf_job.to_string(),
            message: if e.is_panic() { panic_message(e.into_panic()) } else { e.to_string() },
        }),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload.downcast::<&'static str>().map(|s| s.to_string()).unwrap_or_else(|_| "a panic".into()),
    }
}

/// Stage 1: every result page, downloaded and decoded, then the totals.
async fn download(
    mut pages: ResultPages,
    tx: mpsc::Sender<Flow<Page>>,
    hooks: SharedHooks,
    current: Arc<AtomicU32>,
) -> Result<(), RunError> {
    let mut count = 0;
    while let Some(page) = pages.next_page().await? {
        count = page.number;
        current.store(page.number, Ordering::Relaxed);
        hooks.reached(HookPoint::PageDownloaded(page.number));
        if tx.send(Flow::Page(page)).await.is_err() {
            // The next stage stopped; it knows why.
            return Ok(());
        }
    }
    let rows = pages.rows();
    let Some(reported) = pages.reported() else {
        return Err(RunError::Salesforce(crate::salesforce::SalesforceError::Protocol {
            context: format!("reading query job {}", pages.job_id()),
            message: "the completed job reports no numberRecordsProcessed, so its results cannot be checked".into(),
        }));
    };
    // Everything Salesforce said the job produced, or nothing commits.
    if rows != reported {
        return Err(RunError::ExtractIncomplete {
            sf_job: pages.job_id().to_string(),
            reported,
            received: rows,
            pages: count,
        });
    }
    let _ = tx.send(Flow::End(Declared { pages: count, rows, reported })).await;
    Ok(())
}

/// Stage 2: maps each page (CPU work, on its own blocking thread).
fn map(
    mapping: Mapping,
    mut rx: mpsc::Receiver<Flow<Page>>,
    tx: mpsc::Sender<Flow<(MappingOutput, Duration)>>,
    hooks: SharedHooks,
    current: Arc<AtomicU32>,
    sf_job: &str,
) -> Result<(), RunError> {
    let mut rows = 0u64;
    while let Some(message) = rx.blocking_recv() {
        match message {
            Flow::Page(page) => {
                current.store(page.number, Ordering::Relaxed);
                let clock = Instant::now();
                let out = mapping.apply(page.number, &page.frame).map_err(|e| RunError::AtPage {
                    stage: Stage::Map,
                    page: page.number,
                    sf_job: sf_job.to_string(),
                    source: Box::new(e.into()),
                })?;
                drop(page);
                rows += out.rows_in as u64;
                hooks.reached(HookPoint::PageMapped(out.page.number));
                if tx.blocking_send(Flow::Page((out, clock.elapsed()))).is_err() {
                    return Ok(());
                }
            }
            Flow::End(declared) => {
                if rows != declared.rows {
                    return Err(RunError::Internal(format!(
                        "the map stage saw {rows} rows but {} were downloaded",
                        declared.rows
                    )));
                }
                let _ = tx.blocking_send(Flow::End(declared));
                return Ok(());
            }
        }
    }
    Err(RunError::UpstreamGone(Stage::Download))
}

/// Stage 3: stages each mapped page into the target, keeps rejects and
/// counts; ends `Ok` only on the end message with matching totals.
async fn stage(
    input: PipelineInput,
    mut rx: mpsc::Receiver<Flow<(MappingOutput, Duration)>>,
    mut target: Box<dyn Target>,
    mut counts: RunCounts,
    current: Arc<AtomicU32>,
) -> StageEnd {
    let result = stage_pages(&input, &mut rx, &mut *target, &mut counts, &current).await;
    StageEnd { target, counts, result }
}

async fn stage_pages(
    input: &PipelineInput,
    rx: &mut mpsc::Receiver<Flow<(MappingOutput, Duration)>>,
    target: &mut dyn Target,
    counts: &mut RunCounts,
    current: &AtomicU32,
) -> Result<Staged, RunError> {
    let mut staged = Staged::default();
    let mut rows_in = 0u64;
    while let Some(message) = rx.recv().await {
        match message {
            Flow::Page((out, took)) => {
                staged.transform_time += took;
                let number = out.page.number;
                current.store(number, Ordering::Relaxed);
                rows_in += out.rows_in as u64;
                counts.pages += 1;
                counts.extracted += out.rows_in as u64;
                counts.filtered += out.rows_filtered as u64;
                counts.rejected += out.rejects.len() as u64;
                let at_page = |e: RunError| RunError::AtPage {
                    stage: Stage::Stage,
                    page: number,
                    sf_job: input.sf_job.clone(),
                    source: Box::new(e),
                };
                if !out.rejects.is_empty() {
                    input.state.add_rejects(input.run, out.rejects).await.map_err(|e| at_page(e.into()))?;
                }
                let clock = Instant::now();
                target.stage(out.page).await.map_err(|e| at_page(e.into()))?;
                staged.load_time += clock.elapsed();
                tracing::debug!(job = %input.job, page = number, rows = out.rows_in, "page staged");
                if let Some(sink) = &input.progress {
                    sink(&input.job, counts.pages, counts.extracted);
                }
            }
            Flow::End(declared) => {
                counts.reported = Some(declared.reported);
                if rows_in != declared.rows || counts.pages != u64::from(declared.pages) {
                    return Err(RunError::Internal(format!(
                        "the stage step saw {rows_in} rows in {} pages but {} rows in {} pages were downloaded",
                        counts.pages, declared.rows, declared.pages
                    )));
                }
                return Ok(staged);
            }
        }
    }
    Err(RunError::UpstreamGone(Stage::Map))
}
