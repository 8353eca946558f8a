//! A local Salesforce emulator: the OAuth token endpoint and Bulk API 2.0
//! query jobs over real HTTP, backed by in-memory tables.
//!
//! It speaks the wire protocol in `salesforce-bulk-api.md` independently of
//! nightjar's client (own serde structs, own CSV writer), so a misreading of
//! the protocol on one side is caught by the other. It keeps its own clock,
//! which starts at the real time and then moves only when told to; record
//! timestamps, job dates and the HTTP `Date` header (unless a clock-skew
//! fault is in force) all come from it, so tests can script "time passes,
//! records change, the next incremental run picks them up" without sleeping.

mod admin;
mod csv_out;
mod data;
mod describe;
mod encoding;
mod faults;
mod generate;
mod http;
mod ingest;
mod jobs;
mod soql;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use faults::{ErrorBody, Fault, FaultAction, FaultRule, FaultTarget, PageFault, parse_faults};

use data::{Row, Schema, Value};
use generate::ObjectSpec;
use jobs::QueryJob;

/// How to build a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Objects to generate and how many rows each, e.g. `[("Account", 2500)]`.
    /// Every known object exists even when not listed, with no rows.
    pub objects: Vec<(String, usize)>,
    /// Seed for the record generator; the same seed, counts and `start`
    /// give the same data.
    pub seed: u64,
    /// Where the sandbox clock starts; by default the real current time,
    /// whole seconds (clients may refuse a server `Date` far from their own
    /// clock, as Salesforce's never is). Generated records are stamped in
    /// the 30 days before it.
    pub start: DateTime<Utc>,
    pub client_id: String,
    pub client_secret: String,
    /// Job-info polls a query job takes to complete: with 2, the first poll
    /// answers `InProgress` and the second `JobComplete`.
    pub polls_until_complete: u32,
    /// Rows per results page when the client sends no `maxRecords`.
    pub default_page_size: usize,
    /// The integration user's username: the JWT bearer flow's `sub`.
    pub username: String,
    /// PEM public key of the certificate "uploaded to the connected app";
    /// JWT bearer assertions must verify against it. `None` refuses them.
    pub jwt_public_key_pem: Option<String>,
    /// Accepted as a JWT `aud` besides Salesforce's login hosts; the
    /// sandbox's base URL when started with [`Sandbox::start`].
    pub audience: String,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            objects: Vec::new(),
            seed: 42,
            start: Utc::now().trunc_subsecs(0),
            client_id: "nightjar-sandbox".to_owned(),
            client_secret: "sandbox-secret".to_owned(),
            polls_until_complete: 2,
            default_page_size: 100_000,
            username: "integration@nightjar.sandbox".to_owned(),
            jwt_public_key_pem: None,
            audience: String::new(),
        }
    }
}

impl SandboxConfig {
    /// Parses a `--generate` spec such as `Account=1000`.
    pub fn parse_generate(spec: &str) -> Result<(String, usize), SandboxError> {
        let invalid =
            |reason: &str| SandboxError::InvalidGenerateSpec { spec: spec.to_owned(), reason: reason.to_owned() };
        let (object, count) =
            spec.split_once('=').ok_or_else(|| invalid("expected OBJECT=COUNT, e.g. Account=1000"))?;
        let object = object.trim();
        let spec_for = generate::find_object(object).ok_or_else(|| SandboxError::UnknownObject {
            name: object.to_owned(),
            known: generate::known_object_names(),
        })?;
        let count = count.trim().parse::<usize>().map_err(|_| invalid("COUNT must be a non-negative whole number"))?;
        Ok((spec_for.name.to_owned(), count))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox has no object named '{name}'; known objects: {known}")]
    UnknownObject { name: String, known: String },
    #[error("invalid generate spec '{spec}': {reason}")]
    InvalidGenerateSpec { spec: String, reason: String },
    #[error("no {object} record with Id '{id}' in the sandbox")]
    UnknownRecord { object: String, id: String },
    #[error("{object} record '{id}' is deleted; only live records can be updated")]
    DeletedRecord { object: String, id: String },
    #[error("invalid sandbox configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid fault spec '{spec}': {reason}")]
    InvalidFaultSpec { spec: String, reason: String },
}

/// One record as (field name, CSV text or `None` for null), in schema order.
pub type Record = Vec<(String, Option<String>)>;

/// One request as the sandbox received it, for tests to inspect.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The body as text (lossy for non-UTF-8 bytes).
    pub body: String,
    /// The `Accept-Encoding` header, if sent.
    pub accept_encoding: Option<String>,
}

/// An authorization code waiting to be exchanged, with its PKCE challenge.
struct PendingCode {
    challenge: Option<String>,
    redirect_uri: String,
}

/// Schema positions of the fields the sandbox itself maintains.
#[derive(Debug, Clone, Copy)]
struct SystemFields {
    created: Option<usize>,
    last_modified: Option<usize>,
    modstamp: Option<usize>,
    deleted: Option<usize>,
}

impl SystemFields {
    fn of(schema: &Schema) -> SystemFields {
        SystemFields {
            created: schema.index_of("CreatedDate"),
            last_modified: schema.index_of("LastModifiedDate"),
            modstamp: schema.index_of("SystemModstamp"),
            deleted: schema.index_of("IsDeleted"),
        }
    }
}

struct Table {
    spec: &'static ObjectSpec,
    schema: Schema,
    /// Shared with query-job snapshots; a change after a job was created
    /// copies the row list (`Arc::make_mut`), so the job keeps its view.
    rows: Arc<Vec<Row>>,
    system: SystemFields,
    /// Update rounds so far; each round draws fresh deterministic changes.
    epoch: u64,
}

impl Table {
    fn is_deleted(&self, row: &[Option<Value>]) -> bool {
        is_deleted(self.system.deleted, row)
    }

    /// Row position of an id; ids encode their position, so no index is kept.
    fn position(&self, id: &str) -> Option<usize> {
        let serial = data::id_serial(self.schema.key_prefix, id)?;
        let position = usize::try_from(serial.checked_sub(1)?).ok()?;
        (position < self.rows.len()).then_some(position)
    }

    fn stamp(&self, row: &mut [Option<Value>], now: DateTime<Utc>, created: bool) {
        let targets =
            [self.system.last_modified, self.system.modstamp, if created { self.system.created } else { None }];
        for i in targets.into_iter().flatten() {
            if let Some(slot) = row.get_mut(i) {
                *slot = Some(Value::DateTime(now));
            }
        }
    }

    fn resolve_ids(&self, ids: &[String]) -> Result<Vec<usize>, SandboxError> {
        ids.iter()
            .map(|id| {
                self.position(id)
                    .ok_or_else(|| SandboxError::UnknownRecord { object: self.schema.name.to_owned(), id: id.clone() })
            })
            .collect()
    }
}

fn is_deleted(deleted_col: Option<usize>, row: &[Option<Value>]) -> bool {
    deleted_col.and_then(|i| row.get(i)) == Some(&Some(Value::Bool(true)))
}

struct State {
    config: SandboxConfig,
    clock: DateTime<Utc>,
    tables: Vec<Table>,
    /// Keyed by job id; ids grow with a fixed-width serial, so this is
    /// creation order.
    jobs: BTreeMap<String, QueryJob>,
    ingest_jobs: ingest::IngestJobs,
    jobs_created: u64,
    tokens: HashSet<String>,
    refresh_tokens: HashSet<String>,
    /// Every access and refresh token ever issued, so tests can prove none
    /// leaked into logs, errors or history.
    issued: Vec<String>,
    /// Authorization codes not yet exchanged.
    auth_codes: HashMap<String, PendingCode>,
    api_requests: u64,
    /// The org's DailyApiRequests allowance; past it, data calls are refused.
    api_request_limit: u64,
    faults: faults::FaultBook,
    log: Vec<LoggedRequest>,
    failures_pending: u32,
    failure_message: String,
    /// Tokens are unpredictable on purpose, unlike the data.
    token_rng: fastrand::Rng,
}

impl State {
    fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.schema.name.eq_ignore_ascii_case(name))
    }

    fn table_mut(&mut self, name: &str) -> Result<&mut Table, SandboxError> {
        self.tables
            .iter_mut()
            .find(|t| t.schema.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| SandboxError::UnknownObject { name: name.to_owned(), known: generate::known_object_names() })
    }

    fn table_ref(&self, name: &str) -> Result<&Table, SandboxError> {
        self.table(name)
            .ok_or_else(|| SandboxError::UnknownObject { name: name.to_owned(), known: generate::known_object_names() })
    }
}

/// A handle to one emulated org. Clones share the same state.
#[derive(Clone)]
pub struct Sandbox {
    state: Arc<Mutex<State>>,
}

impl Sandbox {
    pub fn new(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        if config.default_page_size == 0 {
            return Err(SandboxError::InvalidConfig("default_page_size must be at least 1".to_owned()));
        }
        let mut counts: Vec<(&'static ObjectSpec, usize)> = Vec::new();
        for (name, count) in &config.objects {
            let spec = generate::find_object(name).ok_or_else(|| SandboxError::UnknownObject {
                name: name.clone(),
                known: generate::known_object_names(),
            })?;
            if counts.iter().any(|(s, _)| s.name == spec.name) {
                return Err(SandboxError::InvalidConfig(format!("object {} is listed more than once", spec.name)));
            }
            counts.push((spec, *count));
        }
        let tables = generate::OBJECTS
            .iter()
            .map(|spec| {
                let default = if spec.name == "User" { generate::DEFAULT_USERS } else { 0 };
                let count = counts.iter().find(|(s, _)| s.name == spec.name).map_or(default, |(_, n)| *n);
                let schema = (spec.schema)();
                let rows =
                    (0..count as u64).map(|i| Row::from((spec.generate)(config.seed, i, config.start))).collect();
                Table { spec, system: SystemFields::of(&schema), schema, rows: Arc::new(rows), epoch: 0 }
            })
            .collect();
        let state = State {
            clock: config.start,
            config,
            tables,
            jobs: BTreeMap::new(),
            ingest_jobs: BTreeMap::new(),
            jobs_created: 0,
            tokens: HashSet::new(),
            refresh_tokens: HashSet::new(),
            issued: Vec::new(),
            auth_codes: HashMap::new(),
            api_requests: 0,
            api_request_limit: DEFAULT_API_REQUEST_LIMIT,
            faults: faults::FaultBook::default(),
            log: Vec::new(),
            failures_pending: 0,
            failure_message: String::new(),
            token_rng: fastrand::Rng::new(),
        };
        Ok(Sandbox { state: Arc::new(Mutex::new(state)) })
    }

    /// A panic elsewhere while holding the lock leaves the state usable (every
    /// mutation is a single assignment), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Binds and serves in a spawned tokio task; returns once listening.
    pub async fn start(&self, addr: SocketAddr) -> std::io::Result<RunningSandbox> {
        let listener = TcpListener::bind(addr).await?;
        let base_url = base_url_for(listener.local_addr()?);
        let app = http::router(self.clone(), base_url.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(RunningSandbox { base_url, stop: Some(stop), task: Some(task) })
    }

    /// Serves on `listener` until the server fails; for `nightjar sandbox`
    /// in the foreground (wrap it in `tokio::select!` with a signal, or use
    /// [`Sandbox::serve_until`], to stop it).
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        self.serve_until(listener, std::future::pending()).await
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn serve_until(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let base_url = base_url_for(listener.local_addr()?);
        let app = http::router(self.clone(), base_url);
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    }

    /// The sandbox clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.lock().clock
    }

    pub fn advance_clock(&self, by: Duration) {
        let mut state = self.lock();
        let step = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        state.clock = state.clock.checked_add_signed(step).unwrap_or(DateTime::<Utc>::MAX_UTC);
    }

    /// Changes some fields (e.g. Name, AnnualRevenue, Description) of `n`
    /// live records chosen deterministically (all live records if there are
    /// fewer), stamping LastModifiedDate/SystemModstamp with `now()`; returns
    /// their Ids in row order.
    pub fn update_records(&self, object: &str, n: usize) -> Result<Vec<String>, SandboxError> {
        let mut state = self.lock();
        let seed = state.config.seed;
        let table = state.table_mut(object)?;
        let live: Vec<usize> =
            (0..table.rows.len()).filter(|&i| !table.rows.get(i).is_some_and(|r| table.is_deleted(r))).collect();
        let chosen = generate::choose_rows(seed, table.epoch, live, n);
        let ids: Vec<String> = chosen.iter().map(|&p| data::make_id(table.schema.key_prefix, p as u64 + 1)).collect();
        update_positions(&mut state, object, &chosen)?;
        Ok(ids)
    }

    /// Like [`Sandbox::update_records`], for the given Ids. Fails, changing
    /// nothing, if any Id is unknown or deleted.
    pub fn update_records_by_id(&self, object: &str, ids: &[String]) -> Result<(), SandboxError> {
        let mut state = self.lock();
        let table = state.table_ref(object)?;
        let positions = table.resolve_ids(ids)?;
        for (&p, id) in positions.iter().zip(ids) {
            if table.rows.get(p).is_some_and(|r| table.is_deleted(r)) {
                return Err(SandboxError::DeletedRecord { object: table.schema.name.to_owned(), id: id.clone() });
            }
        }
        update_positions(&mut state, object, &positions)
    }

    /// Adds `n` new generated records created at `now()`; returns their Ids.
    pub fn insert_records(&self, object: &str, n: usize) -> Result<Vec<String>, SandboxError> {
        let mut state = self.lock();
        let (seed, start, now) = (state.config.seed, state.config.start, state.clock);
        let table = state.table_mut(object)?;
        let first = table.rows.len() as u64;
        let mut new_rows = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for index in first..first + n as u64 {
            let mut row = (table.spec.generate)(seed, index, start);
            table.stamp(&mut row, now, true);
            ids.push(data::make_id(table.schema.key_prefix, index + 1));
            new_rows.push(Row::from(row));
        }
        Arc::make_mut(&mut table.rows).extend(new_rows);
        Ok(ids)
    }

    /// Soft-deletes records (IsDeleted = true, stamped `now()`); afterwards
    /// only `queryAll` returns them. Deleting a deleted record is a no-op.
    pub fn delete_records(&self, object: &str, ids: &[String]) -> Result<(), SandboxError> {
        let mut state = self.lock();
        let now = state.clock;
        let table = state.table_mut(object)?;
        let positions = table.resolve_ids(ids)?;
        let Some(deleted_col) = table.system.deleted else {
            return Ok(());
        };
        let mut changed = Vec::new();
        for p in positions {
            let Some(old) = table.rows.get(p) else {
                continue;
            };
            if table.is_deleted(old) {
                continue;
            }
            let mut row = old.to_vec();
            if let Some(slot) = row.get_mut(deleted_col) {
                *slot = Some(Value::Bool(true));
            }
            table.stamp(&mut row, now, false);
            changed.push((p, Row::from(row)));
        }
        if !changed.is_empty() {
            let rows = Arc::make_mut(&mut table.rows);
            for (p, row) in changed {
                if let Some(slot) = rows.get_mut(p) {
                    *slot = row;
                }
            }
        }
        Ok(())
    }

    /// Current rows, deleted ones included, as (field, CSV text or None for
    /// null) pairs in schema order.
    pub fn records(&self, object: &str) -> Result<Vec<Record>, SandboxError> {
        let state = self.lock();
        let table = state.table_ref(object)?;
        Ok(table
            .rows
            .iter()
            .map(|row| {
                table
                    .schema
                    .fields
                    .iter()
                    .zip(row.iter())
                    .map(|(f, v)| (f.name.to_owned(), v.as_ref().map(Value::render)))
                    .collect()
            })
            .collect())
    }

    pub fn field_names(&self, object: &str) -> Result<Vec<String>, SandboxError> {
        let state = self.lock();
        let table = state.table_ref(object)?;
        Ok(table.schema.fields.iter().map(|f| f.name.to_owned()).collect())
    }

    /// Every request received so far, oldest first.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.lock().log.clone()
    }

    /// The next `n` query jobs created end in `Failed` with `errorMessage`
    /// set to `message` instead of reaching `JobComplete`.
    pub fn fail_next_query_jobs(&self, n: u32, message: &str) {
        let mut state = self.lock();
        state.failures_pending = n;
        state.failure_message = message.to_owned();
    }

    /// Adds the faults of a spec (grammar in `faults.rs`), e.g.
    /// `http:code=503,on=results,times=2;expire-session:on=poll`.
    pub fn add_faults(&self, spec: &str) -> Result<(), SandboxError> {
        for fault in parse_faults(spec)? {
            self.apply_fault(fault);
        }
        Ok(())
    }

    pub fn apply_fault(&self, fault: Fault) {
        let mut state = self.lock();
        match fault {
            Fault::Rule(rule) => state.faults.add(rule),
            Fault::FailJobs { times, message } => {
                state.failures_pending = times;
                state.failure_message = message;
            }
            Fault::SlowJobs { polls } => state.config.polls_until_complete = polls,
            Fault::ApiBudget { max, used } => {
                state.api_request_limit = max;
                state.api_requests = used;
            }
            Fault::ClockSkew { by } => state.faults.set_date_skew(by),
        }
    }

    /// Adds one request-level fault.
    pub fn inject(&self, rule: FaultRule) {
        self.lock().faults.add(rule);
    }

    /// Removes every request-level fault not yet spent, and any clock skew.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Expires every access token now; the next data call with one gets 401
    /// INVALID_SESSION_ID, as after a session timeout or a logout.
    pub fn expire_sessions(&self) {
        self.lock().tokens.clear();
    }

    /// Every access and refresh token issued so far.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.lock().issued.clone()
    }

    /// Sets the public key (PEM) JWT bearer assertions must verify against.
    pub fn set_jwt_public_key(&self, pem: &str) {
        self.lock().config.jwt_public_key_pem = Some(pem.to_owned());
    }

    /// DailyApiRequests (used, max), as `/limits` and `Sforce-Limit-Info` report them.
    pub fn api_usage(&self) -> (u64, u64) {
        let state = self.lock();
        (state.api_requests, state.api_request_limit)
    }
}

/// DailyApiRequests of a small org (Salesforce's developer-edition figure).
const DEFAULT_API_REQUEST_LIMIT: u64 = 15_000;

fn update_positions(state: &mut State, object: &str, positions: &[usize]) -> Result<(), SandboxError> {
    let (seed, now) = (state.config.seed, state.clock);
    let table = state.table_mut(object)?;
    let epoch = table.epoch;
    table.epoch += 1;
    let mutate = table.spec.mutate;
    let mut changed = Vec::with_capacity(positions.len());
    for &p in positions {
        let Some(old) = table.rows.get(p) else {
            continue;
        };
        let mut row = old.to_vec();
        mutate(&mut row, &mut generate::mutation_rng(seed, epoch, p as u64));
        table.stamp(&mut row, now, false);
        changed.push((p, Row::from(row)));
    }
    let rows = Arc::make_mut(&mut table.rows);
    for (p, row) in changed {
        if let Some(slot) = rows.get_mut(p) {
            *slot = row;
        }
    }
    Ok(())
}

/// A wildcard bind address is not something a client can connect to, so
/// URLs handed out (base URL, `instance_url`) use loopback instead.
fn base_url_for(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// A sandbox serving in the background; stops when shut down or dropped.
pub struct RunningSandbox {
    pub base_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningSandbox {
    /// Like `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn token_url(&self) -> String {
        format!("{}/services/oauth2/token", self.base_url)
    }

    /// Stops accepting connections and waits (briefly) for in-flight
    /// requests to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            // Clients holding keep-alive connections open can delay a
            // graceful stop indefinitely; don't let them hang the caller.
            if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for RunningSandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A fixed start: generated data follows it, and these tests compare
    /// sandboxes built moments apart.
    fn sandbox(n: usize) -> Sandbox {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        Sandbox::new(SandboxConfig { objects: vec![("Account".into(), n)], start, ..SandboxConfig::default() }).unwrap()
    }

    fn field<'a>(row: &'a [(String, Option<String>)], name: &str) -> Option<&'a str> {
        row.iter().find(|(f, _)| f == name).and_then(|(_, v)| v.as_deref())
    }

    #[test]
    fn parse_generate_spec() {
        assert_eq!(SandboxConfig::parse_generate("account=1000").unwrap(), ("Account".to_owned(), 1000));
        let err = SandboxConfig::parse_generate("Contact=5").unwrap_err();
        assert!(err.to_string().contains("known objects: Account"), "{err}");
        assert!(SandboxConfig::parse_generate("Account").is_err());
        assert!(SandboxConfig::parse_generate("Account=-3").is_err());
    }

    #[test]
    fn the_clock_starts_at_the_real_time_in_whole_seconds() {
        let before = Utc::now().trunc_subsecs(0);
        let start = SandboxConfig::default().start;
        let after = Utc::now();
        assert!(before <= start && start <= after, "{before} <= {start} <= {after}");
        assert_eq!(start.timestamp_subsec_nanos(), 0);
        let sandbox = Sandbox::new(SandboxConfig { start, ..SandboxConfig::default() }).unwrap();
        assert_eq!(sandbox.now(), start);
    }

    #[test]
    fn same_config_same_records() {
        assert_eq!(sandbox(300).records("Account").unwrap(), sandbox(300).records("Account").unwrap());
        assert!(Sandbox::new(SandboxConfig { objects: vec![("Nope".into(), 1)], ..SandboxConfig::default() }).is_err());
    }

    #[test]
    fn changes_are_stamped_with_the_sandbox_clock() {
        let sb = sandbox(100);
        let start = sb.now();
        sb.advance_clock(Duration::from_secs(3600));
        let now = sb.now();
        assert_eq!(now - start, chrono::Duration::hours(1));
        let stamp = data::Value::DateTime(now).render();

        let updated = sb.update_records("Account", 5).unwrap();
        assert_eq!(updated.len(), 5);
        assert_eq!(updated, sandbox(100).update_records("Account", 5).unwrap());
        let inserted = sb.insert_records("Account", 2).unwrap();
        sb.delete_records("Account", &inserted[..1]).unwrap();
        sb.update_records_by_id("Account", &updated[..1]).unwrap();

        let records = sb.records("Account").unwrap();
        assert_eq!(records.len(), 102);
        for row in &records {
            let id = field(row, "Id").unwrap().to_owned();
            let touched = updated.contains(&id) || inserted.contains(&id);
            let modstamp = field(row, "SystemModstamp").unwrap();
            assert_eq!(modstamp == stamp, touched, "{id}");
            assert_eq!(field(row, "IsDeleted") == Some("true"), id == inserted[0]);
        }
        assert!(matches!(sb.update_records_by_id("Account", &inserted[..1]), Err(SandboxError::DeletedRecord { .. })));
        assert!(matches!(
            sb.delete_records("Account", &["001Dx0000000zzzAAA".to_owned()]),
            Err(SandboxError::UnknownRecord { .. })
        ));
        // Updates never pick deleted rows.
        let again = sb.update_records("Account", 1000).unwrap();
        assert_eq!(again.len(), 101);
        assert!(!again.contains(&inserted[0]));
    }

    #[test]
    fn base_url_never_uses_a_wildcard_address() {
        let addr: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(base_url_for(addr), "http://127.0.0.1:8080");
        let addr: SocketAddr = "[::]:81".parse().unwrap();
        assert_eq!(base_url_for(addr), "http://[::1]:81");
    }
}
