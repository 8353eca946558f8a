//! Bulk API 2.0 ingest jobs (salesforce-bulk-api.md §2): create (Open), one
//! CSV upload, close (UploadComplete), poll to JobComplete, and the three
//! result CSVs. Rows are applied to the tables when the job completes, with
//! per-row errors in Salesforce's `STATUS_CODE:message:fields --` form.
//!
//! Simplifications: `hardDelete` soft-deletes like `delete` (ids encode row
//! positions, so rows are never removed), and any field may serve as the
//! upsert's `externalIdFieldName`.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use super::csv_out::{self, CsvStyle};
use super::data::{FieldType, Row, Value, json_timestamp, make_id};
use super::jobs::ApiError;
use super::{Sandbox, Table};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IngestOperation {
    Insert,
    Update,
    Upsert,
    Delete,
    HardDelete,
}

impl IngestOperation {
    pub(crate) fn parse(name: &str) -> Option<IngestOperation> {
        Some(match name {
            "insert" => IngestOperation::Insert,
            "update" => IngestOperation::Update,
            "upsert" => IngestOperation::Upsert,
            "delete" => IngestOperation::Delete,
            "hardDelete" => IngestOperation::HardDelete,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            IngestOperation::Insert => "insert",
            IngestOperation::Update => "update",
            IngestOperation::Upsert => "upsert",
            IngestOperation::Delete => "delete",
            IngestOperation::HardDelete => "hardDelete",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    UploadComplete,
    InProgress,
    JobComplete,
    Failed,
    Aborted,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Open => "Open",
            State::UploadComplete => "UploadComplete",
            State::InProgress => "InProgress",
            State::JobComplete => "JobComplete",
            State::Failed => "Failed",
            State::Aborted => "Aborted",
        }
    }

    fn is_terminal(self) -> bool {
        matches!(self, State::JobComplete | State::Failed | State::Aborted)
    }
}

pub(crate) struct IngestJob {
    id: String,
    object: &'static str,
    operation: IngestOperation,
    external_id: Option<String>,
    api_version: String,
    style: CsvStyle,
    state: State,
    polls: u32,
    created: DateTime<Utc>,
    modstamp: DateTime<Utc>,
    data: Option<String>,
    error_message: Option<String>,
    header: Vec<String>,
    /// (sf__Id, sf__Created, original values)
    successes: Vec<(String, bool, Vec<String>)>,
    /// (sf__Id, sf__Error, original values)
    failures: Vec<(String, String, Vec<String>)>,
    unprocessed: Vec<Vec<String>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IngestInfo {
    id: String,
    operation: &'static str,
    object: &'static str,
    created_by_id: String,
    created_date: String,
    system_modstamp: String,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id_field_name: Option<String>,
    concurrency_mode: &'static str,
    content_type: &'static str,
    api_version: f64,
    job_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_url: Option<String>,
    line_ending: &'static str,
    column_delimiter: &'static str,
    number_records_processed: u64,
    number_records_failed: u64,
    retries: u32,
    total_processing_time: u64,
    api_active_processing_time: u64,
    apex_processing_time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<String>,
}

impl IngestJob {
    fn info(&self) -> IngestInfo {
        let processed = (self.successes.len() + self.failures.len()) as u64;
        IngestInfo {
            id: self.id.clone(),
            operation: self.operation.name(),
            object: self.object,
            created_by_id: make_id("005", 1),
            created_date: json_timestamp(self.created),
            system_modstamp: json_timestamp(self.modstamp),
            state: self.state.name(),
            external_id_field_name: self.external_id.clone(),
            concurrency_mode: "Parallel",
            content_type: "CSV",
            api_version: self.api_version.parse().unwrap_or(0.0),
            job_type: "V2Ingest",
            // Relative and without a leading slash, as Salesforce sends it.
            content_url: (self.state == State::Open)
                .then(|| format!("services/data/v{}/jobs/ingest/{}/batches", self.api_version, self.id)),
            line_ending: self.style.line_ending.name(),
            column_delimiter: self.style.delimiter.name(),
            number_records_processed: processed,
            number_records_failed: self.failures.len() as u64,
            retries: 0,
            total_processing_time: if self.state.is_terminal() { 30 + processed } else { 0 },
            api_active_processing_time: if self.state.is_terminal() { 20 + processed } else { 0 },
            apex_processing_time: 0,
            error_message: self.error_message.clone(),
        }
    }
}

pub(crate) struct NewIngestJob {
    pub api_version: String,
    pub object: String,
    pub operation: IngestOperation,
    pub external_id: Option<String>,
    pub style: CsvStyle,
}

/// Which result CSV to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResultKind {
    Successful,
    Failed,
    Unprocessed,
}

fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

impl Sandbox {
    pub(crate) fn create_ingest_job(&self, new: NewIngestJob) -> Result<IngestInfo, ApiError> {
        let mut state = self.lock();
        let table = state.table(&new.object).ok_or_else(|| {
            bad_request("INVALIDENTITY", format!("Entity '{}' is not supported by the Bulk API", new.object))
        })?;
        let object = table.schema.name;
        if new.operation == IngestOperation::Upsert {
            let field = new
                .external_id
                .as_deref()
                .ok_or_else(|| bad_request("INVALIDJOB", "externalIdFieldName is required for upsert"))?;
            if table.schema.index_of(field).is_none() {
                return Err(bad_request(
                    "INVALIDJOB",
                    format!("InvalidJob : Field name provided, {field} does not match an External ID for {object}"),
                ));
            }
        }
        state.jobs_created += 1;
        let id = make_id("750", state.jobs_created);
        let now = state.clock;
        let job = IngestJob {
            id: id.clone(),
            object,
            operation: new.operation,
            external_id: new.external_id,
            api_version: new.api_version,
            style: new.style,
            state: State::Open,
            polls: 0,
            created: now,
            modstamp: now,
            data: None,
            error_message: None,
            header: Vec::new(),
            successes: Vec::new(),
            failures: Vec::new(),
            unprocessed: Vec::new(),
        };
        let info = job.info();
        state.ingest_jobs.insert(id, job);
        Ok(info)
    }

    pub(crate) fn upload_ingest_data(&self, job_id: &str, body: String) -> Result<(), ApiError> {
        let mut state = self.lock();
        let job = state.ingest_jobs.get_mut(job_id).ok_or_else(ApiError::not_found)?;
        if job.state != State::Open || job.data.is_some() {
            return Err(bad_request(
                "INVALIDJOBSTATE",
                "Job is not in the Open state or data was already uploaded; upload data once, then close the job",
            ));
        }
        job.data = Some(body);
        Ok(())
    }

    pub(crate) fn change_ingest_state(&self, job_id: &str, to: &str) -> Result<IngestInfo, ApiError> {
        let mut state = self.lock();
        let now = state.clock;
        let job = state.ingest_jobs.get_mut(job_id).ok_or_else(ApiError::not_found)?;
        match (to, job.state) {
            ("UploadComplete", State::Open) => job.state = State::UploadComplete,
            ("Aborted", s) if !s.is_terminal() => job.state = State::Aborted,
            (to, from) => {
                return Err(bad_request(
                    "INVALIDJOBSTATE",
                    format!("Job state change from {} to {to} is not allowed", from.name()),
                ));
            }
        }
        job.modstamp = now;
        Ok(job.info())
    }

    /// Job info; each call is one poll. The data is applied on the poll that
    /// completes the job.
    pub(crate) fn poll_ingest_job(&self, job_id: &str) -> Result<IngestInfo, ApiError> {
        let mut state = self.lock();
        let (now, polls_needed) = (state.clock, state.config.polls_until_complete);
        let job = state.ingest_jobs.get_mut(job_id).ok_or_else(ApiError::not_found)?;
        if matches!(job.state, State::UploadComplete | State::InProgress) {
            job.polls = job.polls.saturating_add(1);
            if job.polls < polls_needed {
                job.state = State::InProgress;
                job.modstamp = now;
            } else {
                let mut job = state.ingest_jobs.remove(job_id).ok_or_else(ApiError::not_found)?;
                process(&mut state, &mut job, now);
                job.modstamp = now;
                let info = job.info();
                state.ingest_jobs.insert(job_id.to_owned(), job);
                return Ok(info);
            }
        }
        let job = state.ingest_jobs.get(job_id).ok_or_else(ApiError::not_found)?;
        Ok(job.info())
    }

    pub(crate) fn list_ingest_jobs(&self) -> Vec<IngestInfo> {
        self.lock().ingest_jobs.values().map(IngestJob::info).collect()
    }

    pub(crate) fn delete_ingest_job(&self, job_id: &str) -> Result<(), ApiError> {
        let mut state = self.lock();
        let job = state.ingest_jobs.get(job_id).ok_or_else(ApiError::not_found)?;
        if !(job.state.is_terminal() || job.state == State::UploadComplete) {
            return Err(bad_request(
                "API_ERROR",
                "Error encountered when deleting the job because the job is not terminated",
            ));
        }
        state.ingest_jobs.remove(job_id);
        Ok(())
    }

    pub(crate) fn ingest_results(&self, job_id: &str, kind: ResultKind) -> Result<String, ApiError> {
        let state = self.lock();
        let job = state.ingest_jobs.get(job_id).ok_or_else(ApiError::not_found)?;
        if !job.state.is_terminal() {
            return Err(bad_request(
                "INVALIDJOBSTATE",
                "Results are available when the job is JobComplete, Failed or Aborted",
            ));
        }
        let style = job.style;
        let mut out = String::new();
        let text = |s: &str| Value::text(s);
        match kind {
            ResultKind::Successful => {
                let names = ["sf__Id", "sf__Created"].into_iter().chain(job.header.iter().map(String::as_str));
                csv_out::write_header(&mut out, names, style);
                for (id, created, values) in &job.successes {
                    let mut row = vec![text(id), text(if *created { "true" } else { "false" })];
                    row.extend(values.iter().map(|v| text(v)));
                    csv_out::write_record(&mut out, row.iter().map(Some), style);
                }
            }
            ResultKind::Failed => {
                let names = ["sf__Id", "sf__Error"].into_iter().chain(job.header.iter().map(String::as_str));
                csv_out::write_header(&mut out, names, style);
                for (id, error, values) in &job.failures {
                    let mut row = vec![text(id), text(error)];
                    row.extend(values.iter().map(|v| text(v)));
                    csv_out::write_record(&mut out, row.iter().map(Some), style);
                }
            }
            ResultKind::Unprocessed => {
                csv_out::write_header(&mut out, job.header.iter().map(String::as_str), style);
                for values in &job.unprocessed {
                    let row: Vec<Value> = values.iter().map(|v| text(v)).collect();
                    csv_out::write_record(&mut out, row.iter().map(Some), style);
                }
            }
        }
        Ok(out)
    }
}

/// Applies an uploaded CSV to its table, row by row.
fn process(state: &mut super::State, job: &mut IngestJob, now: DateTime<Utc>) {
    let data = job.data.take().unwrap_or_default();
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(job.style.delimiter.char() as u8)
        .has_headers(true)
        .from_reader(data.as_bytes());
    let header: Vec<String> = match reader.headers() {
        Ok(h) => h.iter().map(str::to_owned).collect(),
        Err(e) => return fail(job, format!("InvalidBatch : Failed to parse CSV header: {e}")),
    };
    if header.is_empty() || header.iter().all(String::is_empty) {
        return fail(job, "InvalidBatch : No data uploaded".into());
    }
    job.header = header.clone();
    let Ok(table) = state.table_mut(job.object) else {
        return fail(job, "InvalidJob : the object no longer exists".into());
    };
    let mut columns = Vec::with_capacity(header.len());
    for name in &header {
        match table.schema.index_of(name) {
            Some(i) => columns.push(i),
            None => return fail(job, format!("InvalidBatch : Field name not found : {name}")),
        }
    }
    for record in reader.records() {
        let values: Vec<String> = match record {
            Ok(r) => r.iter().map(str::to_owned).collect(),
            Err(e) => return fail(job, format!("InvalidBatch : Failed to parse CSV: {e}")),
        };
        match apply(table, job, &columns, &values, now) {
            Ok((id, created)) => job.successes.push((id, created, values)),
            Err((id, error)) => job.failures.push((id, error, values)),
        }
    }
    job.state = State::JobComplete;
}

fn fail(job: &mut IngestJob, message: String) {
    job.state = State::Failed;
    job.error_message = Some(message);
}

/// One row: `Ok((sf__Id, created))` or `Err((sf__Id, sf__Error))`.
fn apply(
    table: &mut Table,
    job: &IngestJob,
    columns: &[usize],
    values: &[String],
    now: DateTime<Utc>,
) -> Result<(String, bool), (String, String)> {
    let schema = &table.schema;
    let id_col = schema.index_of("Id");
    let given_id = id_col.and_then(|c| columns.iter().position(|&x| x == c)).and_then(|i| values.get(i)).cloned();
    let target = match job.operation {
        IngestOperation::Insert => None,
        IngestOperation::Update | IngestOperation::Delete | IngestOperation::HardDelete => {
            let id = given_id.clone().unwrap_or_default();
            match table.position(&id).filter(|&p| !table.rows.get(p).is_some_and(|r| table.is_deleted(r))) {
                Some(p) => Some(p),
                None if id.is_empty() => {
                    return Err((String::new(), "MISSING_ARGUMENT:Id not specified in an update call:Id --".into()));
                }
                None => {
                    return Err((
                        String::new(),
                        format!("INVALID_CROSS_REFERENCE_KEY:invalid cross reference id:{id} --"),
                    ));
                }
            }
        }
        IngestOperation::Upsert => {
            let key = job.external_id.as_deref().and_then(|f| schema.index_of(f));
            let value = key.and_then(|k| columns.iter().position(|&c| c == k)).and_then(|i| values.get(i));
            match (key, value) {
                (Some(k), Some(v)) if !v.is_empty() => table.rows.iter().position(|r| {
                    !table.is_deleted(r) && r.get(k).and_then(Option::as_ref).is_some_and(|x| x.render() == *v)
                }),
                _ => None,
            }
        }
    };
    if matches!(job.operation, IngestOperation::Delete | IngestOperation::HardDelete) {
        let position = target.unwrap_or_default();
        let id = given_id.unwrap_or_default();
        let mut row = table.rows.get(position).map(|r| r.to_vec()).unwrap_or_default();
        if let Some(slot) = table.system.deleted.and_then(|c| row.get_mut(c)) {
            *slot = Some(Value::Bool(true));
        }
        table.stamp(&mut row, now, false);
        replace_row(table, position, row);
        return Ok((id, false));
    }
    let creating = target.is_none();
    let mut row: Vec<Option<Value>> = match target {
        Some(p) => table.rows.get(p).map(|r| r.to_vec()).unwrap_or_default(),
        None => vec![None; schema.fields.len()],
    };
    let current_id = |row: &[Option<Value>]| {
        id_col.and_then(|c| row.get(c)).and_then(Option::as_ref).map(Value::render).unwrap_or_default()
    };
    for (&col, text) in columns.iter().zip(values) {
        let Some(field) = schema.fields.get(col) else { continue };
        if Some(col) == id_col || is_system(field.name) {
            continue;
        }
        // Empty leaves the value unchanged; #N/A sets null.
        let value = match text.as_str() {
            "" => continue,
            "#N/A" => None,
            text => match parse_value(field.ftype, text) {
                Some(v) => Some(v),
                None => {
                    return Err((
                        current_id(&row),
                        format!(
                            "INVALID_FIELD_FOR_INSERT_UPDATE:{}: invalid value for type {}: {text}:{} --",
                            field.name,
                            field.ftype.api_name(),
                            field.name
                        ),
                    ));
                }
            },
        };
        if let Some(slot) = row.get_mut(col) {
            *slot = value;
        }
    }
    let missing: Vec<&str> = schema
        .fields
        .iter()
        .zip(&row)
        .filter(|(f, v)| v.is_none() && !f.nillable && f.ftype != FieldType::Id && !is_system(f.name))
        .map(|(f, _)| f.name)
        .filter(|name| !matches!(*name, "OwnerId" | "IsActive__c"))
        .collect();
    if let Some(first) = missing.first() {
        return Err((
            current_id(&row),
            format!("REQUIRED_FIELD_MISSING:Required fields are missing: [{}]:{first} --", missing.join(", ")),
        ));
    }
    if creating {
        let position = table.rows.len();
        let id = make_id(table.schema.key_prefix, position as u64 + 1);
        if let Some(slot) = id_col.and_then(|c| row.get_mut(c)) {
            *slot = Some(Value::text(id.clone()));
        }
        for (name, value) in [("IsDeleted", Value::Bool(false)), ("IsActive__c", Value::Bool(false))] {
            if let Some(slot) = table.schema.index_of(name).and_then(|c| row.get_mut(c))
                && slot.is_none()
            {
                *slot = Some(value);
            }
        }
        if let Some(slot) = table.schema.index_of("OwnerId").and_then(|c| row.get_mut(c))
            && slot.is_none()
        {
            *slot = Some(Value::text(make_id("005", 1)));
        }
        table.stamp(&mut row, now, true);
        std::sync::Arc::make_mut(&mut table.rows).push(Row::from(row));
        Ok((id, true))
    } else {
        let position = target.unwrap_or_default();
        table.stamp(&mut row, now, false);
        let id = current_id(&row);
        replace_row(table, position, row);
        Ok((id, false))
    }
}

fn is_system(name: &str) -> bool {
    matches!(name, "CreatedDate" | "LastModifiedDate" | "SystemModstamp" | "IsDeleted")
}

fn replace_row(table: &mut Table, position: usize, row: Vec<Option<Value>>) {
    if let Some(slot) = std::sync::Arc::make_mut(&mut table.rows).get_mut(position) {
        *slot = Row::from(row);
    }
}

/// Input CSV text to a typed value (§2.7): dateTimes with `Z` or an offset,
/// millis optional; dates without offset; booleans `true`/`false`/`1`/`0`.
fn parse_value(ftype: FieldType, text: &str) -> Option<Value> {
    Some(match ftype {
        FieldType::Boolean => match text.to_ascii_lowercase().as_str() {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return None,
        },
        FieldType::Int => Value::Int(text.parse().ok()?),
        FieldType::Double | FieldType::Percent => Value::Double(text.parse().ok().filter(|f: &f64| f.is_finite())?),
        FieldType::Currency => {
            let amount: f64 = text.parse().ok().filter(|f: &f64| f.is_finite())?;
            Value::Decimal { units: (amount * 100.0).round() as i64, scale: 2 }
        }
        FieldType::Date => Value::Date(NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?),
        FieldType::DateTime => Value::DateTime(
            DateTime::parse_from_rfc3339(text)
                .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z"))
                .ok()?
                .with_timezone(&Utc),
        ),
        _ => Value::text(text),
    })
}

/// Ingest jobs by id (creation order, as ids grow).
pub(crate) type IngestJobs = BTreeMap<String, IngestJob>;
