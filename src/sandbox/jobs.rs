//! Bulk API 2.0 query jobs: creation (query compiled and result set fixed
//! at that moment), the poll-driven state machine, abort, delete, and
//! result pages. The HTTP layer only translates to and from the wire.

use std::sync::Arc;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::csv_out::{self, CsvStyle};
use super::data::{Row, json_timestamp, make_id};
use super::encoding::{base64_decode, base64_encode};
use super::faults::PageFault;
use super::{Sandbox, is_deleted, soql};

/// An error answered as `[{"errorCode": code, "message": message}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    pub(crate) fn not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "The requested resource does not exist")
    }

    fn internal(what: &str) -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN_EXCEPTION",
            format!("An unexpected error occurred in the sandbox: {what}"),
        )
    }
}

impl From<soql::SoqlError> for ApiError {
    fn from(e: soql::SoqlError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.code, e.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Query,
    QueryAll,
}

impl Operation {
    pub(crate) fn parse(name: &str) -> Option<Operation> {
        match name {
            "query" => Some(Operation::Query),
            "queryAll" => Some(Operation::QueryAll),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Operation::Query => "query",
            Operation::QueryAll => "queryAll",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobState {
    UploadComplete,
    InProgress,
    JobComplete,
    Failed,
    Aborted,
}

impl JobState {
    fn name(self) -> &'static str {
        match self {
            JobState::UploadComplete => "UploadComplete",
            JobState::InProgress => "InProgress",
            JobState::JobComplete => "JobComplete",
            JobState::Failed => "Failed",
            JobState::Aborted => "Aborted",
        }
    }

    fn is_terminal(self) -> bool {
        matches!(self, JobState::JobComplete | JobState::Failed | JobState::Aborted)
    }
}

pub(crate) struct QueryJob {
    id: String,
    operation: Operation,
    object: &'static str,
    created: DateTime<Utc>,
    modstamp: DateTime<Utc>,
    /// As in the URL it was created under, e.g. `62.0`.
    api_version: String,
    style: CsvStyle,
    state: JobState,
    polls: u32,
    /// Set when fault injection chose this job to fail.
    fail_with: Option<String>,
    error_message: Option<String>,
    header: Arc<[String]>,
    columns: Arc<[usize]>,
    /// The result set, fixed at creation.
    results: Arc<Vec<Row>>,
}

/// The integration user every job is created by.
fn job_owner() -> String {
    make_id("005", 1)
}

/// Which job-info shape a response uses; Salesforce's differ by endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Create,
    Abort,
    List,
    Full,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobInfo {
    id: String,
    operation: &'static str,
    object: &'static str,
    created_by_id: String,
    created_date: String,
    system_modstamp: String,
    state: &'static str,
    concurrency_mode: &'static str,
    content_type: &'static str,
    api_version: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    line_ending: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    column_delimiter: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    number_records_processed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_processing_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_pk_chunking_supported: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<String>,
}

impl QueryJob {
    fn info(&self, view: View) -> JobInfo {
        let full = view == View::Full;
        let options = matches!(view, View::Create | View::List | View::Full);
        let processed = if self.state == JobState::JobComplete { self.results.len() as u64 } else { 0 };
        JobInfo {
            id: self.id.clone(),
            operation: self.operation.name(),
            object: self.object,
            created_by_id: job_owner(),
            created_date: json_timestamp(self.created),
            system_modstamp: json_timestamp(self.modstamp),
            state: self.state.name(),
            concurrency_mode: "Parallel",
            content_type: "CSV",
            api_version: self.api_version.parse().unwrap_or(0.0),
            job_type: matches!(view, View::List | View::Full).then_some("V2Query"),
            line_ending: options.then_some(self.style.line_ending.name()),
            column_delimiter: options.then_some(self.style.delimiter.name()),
            number_records_processed: full.then_some(processed),
            retries: full.then_some(0),
            // A plausible, deterministic figure; nothing measures it.
            total_processing_time: full.then(|| if self.state.is_terminal() { 25 + processed / 100 } else { 0 }),
            is_pk_chunking_supported: full.then_some(true),
            error_message: if full { self.error_message.clone() } else { None },
        }
    }
}

pub(crate) struct NewQueryJob {
    pub api_version: String,
    pub operation: Operation,
    pub query: String,
    pub style: CsvStyle,
}

pub(crate) struct PageRequest<'a> {
    pub api_version: &'a str,
    pub job_id: &'a str,
    pub max_records: Option<usize>,
    pub locator: Option<&'a str>,
    /// A fault to serve this page with; the byte-level ones are the HTTP
    /// layer's, the rest change what this page says.
    pub fault: Option<PageFault>,
}

pub(crate) struct ResultPage {
    pub body: String,
    /// Next page's locator, or the literal `null` on the last page.
    pub locator: String,
    pub records: usize,
}

/// Rendering pages larger than this moves off the async worker threads.
const INLINE_RENDER_ROWS: usize = 2_000;

/// Locators are opaque to clients; here they are base64 of the row offset
/// (like Salesforce's own `MTAwMDA` = "10000").
fn encode_locator(offset: usize) -> String {
    base64_encode(offset.to_string().as_bytes(), false)
}

fn decode_locator(locator: &str) -> Option<usize> {
    let bytes = base64_decode(locator)?;
    std::str::from_utf8(&bytes).ok()?.parse().ok()
}

/// Appends each relationship column's value (the parent's field, or null
/// when the lookup is null or dangling) to a copy of the row.
fn with_parent_values(row: &Row, parents: &[(soql::Join, &'static str, Arc<Vec<Row>>)]) -> Row {
    let mut extended = row.to_vec();
    for (join, key_prefix, parent_rows) in parents {
        let value = row
            .get(join.fk_col)
            .and_then(Option::as_ref)
            .and_then(|id| super::data::id_serial(key_prefix, &id.render()))
            .and_then(|serial| usize::try_from(serial.checked_sub(1)?).ok())
            .and_then(|position| parent_rows.get(position))
            .and_then(|parent| parent.get(join.parent_col).cloned().flatten());
        extended.push(value);
    }
    Row::from(extended)
}

impl Sandbox {
    pub(crate) async fn create_query_job(&self, new: NewQueryJob) -> Result<JobInfo, ApiError> {
        let (query, rows, deleted_col, parents) = {
            let state = self.lock();
            let query = soql::compile(&new.query, |name| state.table(name).map(|t| &t.schema))?;
            let table = state.table(query.object).ok_or_else(|| ApiError::internal("compiled query names no table"))?;
            let mut parents = Vec::with_capacity(query.joins.len());
            for join in &query.joins {
                let parent = state.table(join.parent).ok_or_else(|| ApiError::internal("a join names no table"))?;
                parents.push((join.clone(), parent.schema.key_prefix, Arc::clone(&parent.rows)));
            }
            (query, Arc::clone(&table.rows), table.system.deleted, parents)
        };
        let object = query.object;
        let header: Arc<[String]> = query.header.clone().into();
        let columns: Arc<[usize]> = query.columns.clone().into();
        let include_deleted = new.operation == Operation::QueryAll;
        // The scan can take a while on large tables; it works on a snapshot,
        // so it runs without the lock and off the async workers.
        let results = tokio::task::spawn_blocking(move || {
            let hits = query.execute(&rows, |row| include_deleted || !is_deleted(deleted_col, row));
            if parents.is_empty() { hits } else { hits.iter().map(|row| with_parent_values(row, &parents)).collect() }
        })
        .await
        .map_err(|_| ApiError::internal("query evaluation stopped"))?;

        let mut state = self.lock();
        state.jobs_created += 1;
        let id = make_id("750", state.jobs_created);
        let fail_with = if state.failures_pending > 0 {
            state.failures_pending -= 1;
            Some(state.failure_message.clone())
        } else {
            None
        };
        let now = state.clock;
        let job = QueryJob {
            id: id.clone(),
            operation: new.operation,
            object,
            created: now,
            modstamp: now,
            api_version: new.api_version,
            style: new.style,
            state: JobState::UploadComplete,
            polls: 0,
            fail_with,
            error_message: None,
            header,
            columns,
            results: Arc::new(results),
        };
        let info = job.info(View::Create);
        state.jobs.insert(id, job);
        Ok(info)
    }

    /// Job info; each call is one poll and may advance the job's state.
    pub(crate) fn poll_query_job(&self, job_id: &str) -> Result<JobInfo, ApiError> {
        let mut state = self.lock();
        let (now, polls_needed) = (state.clock, state.config.polls_until_complete);
        let job = state.jobs.get_mut(job_id).ok_or_else(ApiError::not_found)?;
        if !job.state.is_terminal() {
            job.polls = job.polls.saturating_add(1);
            let next = if job.polls < polls_needed {
                JobState::InProgress
            } else if let Some(message) = job.fail_with.take() {
                // An empty message models the Failed jobs that carry none.
                job.error_message = (!message.is_empty()).then_some(message);
                JobState::Failed
            } else {
                JobState::JobComplete
            };
            if next != job.state {
                job.state = next;
                job.modstamp = now;
            }
        }
        Ok(job.info(View::Full))
    }

    pub(crate) fn abort_query_job(&self, job_id: &str) -> Result<JobInfo, ApiError> {
        let mut state = self.lock();
        let now = state.clock;
        let job = state.jobs.get_mut(job_id).ok_or_else(ApiError::not_found)?;
        if job.state.is_terminal() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALIDJOBSTATE",
                "Aborting already Completed Job not allowed",
            ));
        }
        job.state = JobState::Aborted;
        job.modstamp = now;
        Ok(job.info(View::Abort))
    }

    pub(crate) fn delete_query_job(&self, job_id: &str) -> Result<(), ApiError> {
        let mut state = self.lock();
        let job = state.jobs.get(job_id).ok_or_else(ApiError::not_found)?;
        if !job.state.is_terminal() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "API_ERROR",
                "Error encountered when deleting the job because the job is not terminated",
            ));
        }
        state.jobs.remove(job_id);
        Ok(())
    }

    pub(crate) fn list_query_jobs(&self) -> Vec<JobInfo> {
        let state = self.lock();
        state.jobs.values().map(|j| j.info(View::List)).collect()
    }

    pub(crate) async fn results_page(&self, req: PageRequest<'_>) -> Result<ResultPage, ApiError> {
        let (results, header, columns, style, page_size) = {
            let state = self.lock();
            let job = state.jobs.get(req.job_id).ok_or_else(ApiError::not_found)?;
            if job.api_version != req.api_version {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "API_ERROR",
                    format!(
                        "Job {} was created with API version {}; request its results with \
                         v{} (this request used v{}).",
                        job.id, job.api_version, job.api_version, req.api_version
                    ),
                ));
            }
            if job.state != JobState::JobComplete {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "INVALIDJOBSTATE",
                    format!(
                        "Results are available only when the job state is JobComplete; job {} \
                         is {}.",
                        job.id,
                        job.state.name()
                    ),
                ));
            }
            (
                Arc::clone(&job.results),
                Arc::clone(&job.header),
                Arc::clone(&job.columns),
                job.style,
                state.config.default_page_size,
            )
        };
        let offset = match req.locator {
            None => 0,
            Some(locator) => decode_locator(locator).filter(|&o| o <= results.len()).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "INVALID_LOCATOR", format!("Invalid locator: {locator}"))
            })?,
        };
        let end = offset.saturating_add(req.max_records.unwrap_or(page_size)).min(results.len());
        let records = end.saturating_sub(offset);
        let locator = match req.fault {
            Some(PageFault::EndEarly) => "null".to_owned(),
            // Offset 0 is a real locator too, so the loop also works from
            // the first page, which was fetched without one.
            Some(PageFault::RepeatLocator) => req.locator.map_or_else(|| encode_locator(0), str::to_owned),
            _ if end < results.len() => encode_locator(end),
            _ => "null".to_owned(),
        };
        let bad_page = req.fault == Some(PageFault::BadPage);
        let render = move || {
            // Rough size guess; avoids most regrowth on big pages.
            let mut body = String::with_capacity(64 + records * columns.len() * 24);
            csv_out::write_header(&mut body, header.iter().map(String::as_str), style);
            for (i, row) in results.get(offset..end).unwrap_or_default().iter().enumerate() {
                let values = columns.iter().map(|&c| row.get(c).and_then(Option::as_ref));
                if bad_page && i == 0 {
                    // A field short fails any reader that checks field counts;
                    // on a one-column page that would be a blank line, which
                    // readers skip, so the row gets a field too many instead.
                    if columns.len() > 1 {
                        csv_out::write_record(&mut body, values.take(columns.len() - 1), style);
                    } else {
                        csv_out::write_record(&mut body, values.chain([None]), style);
                    }
                } else {
                    csv_out::write_record(&mut body, values, style);
                }
            }
            body
        };
        let body = if records > INLINE_RENDER_ROWS {
            tokio::task::spawn_blocking(render)
                .await
                .map_err(|_| ApiError::internal("rendering the result page stopped"))?
        } else {
            render()
        };
        Ok(ResultPage { body, locator, records })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_round_trip() {
        assert_eq!(encode_locator(10000), "MTAwMDA");
        assert_eq!(decode_locator(&encode_locator(123)), Some(123));
        assert_eq!(decode_locator("null"), None);
        assert_eq!(decode_locator("%%%"), None);
    }
}
