//! A throwaway nightjar installation (config, job, mapping, state) wired to
//! an in-process sandbox.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nightjar::config::Project;
use nightjar::outcome::Trigger;
use nightjar::run::{Engine, RunReport, run_job};
use nightjar::salesforce::{Clients, RetryPolicy};
use nightjar::sandbox::{RunningSandbox, Sandbox, SandboxConfig};
use nightjar::state::StateStore;
use rusqlite::types::Value;

/// Every Account field the generator makes, extracted as-is.
pub const FIELDS: &[&str] = &[
    "Id",
    "Name",
    "Type",
    "Industry",
    "AnnualRevenue",
    "NumberOfEmployees",
    "Rating",
    "Phone",
    "Website",
    "BillingStreet",
    "BillingCity",
    "BillingPostalCode",
    "BillingCountry",
    "Description",
    "IsActive__c",
    "CustomerSince__c",
    "Score__c",
    "CreatedDate",
    "LastModifiedDate",
    "SystemModstamp",
    "IsDeleted",
    "OwnerId",
];

/// Where the fixture's job loads.
#[derive(Clone)]
pub enum TargetKind {
    Sqlite,
    /// A Postgres URL and a schema-qualified table name.
    Postgres {
        url: String,
        table: String,
    },
    /// A snapshot file `state/lake/account.<format>`.
    Files {
        format: &'static str,
    },
}

/// Knobs for [`Fixture::build`]; [`Fixture::new`] takes the defaults.
#[derive(Clone)]
pub struct FixtureOptions {
    pub accounts: usize,
    pub page_size: u32,
    pub target: TargetKind,
    /// `soft`, `hard` or `ignore`; anything but `ignore` also extracts with queryAll.
    pub deletes: &'static str,
    pub schema_evolution: &'static str,
    /// The fields the job extracts (and maps as text, SystemModstamp as
    /// timestamp); default [`FIELDS`]. Must include `Id` and `SystemModstamp`.
    pub fields: &'static [&'static str],
    /// Where the sandbox clock starts (default: now); tests that compare two
    /// sandboxes' data give both the same.
    pub sandbox_start: Option<chrono::DateTime<chrono::Utc>>,
}

impl Default for FixtureOptions {
    fn default() -> Self {
        FixtureOptions {
            accounts: 100,
            page_size: 1_000,
            target: TargetKind::Sqlite,
            deletes: "ignore",
            schema_evolution: "fail",
            fields: FIELDS,
            sandbox_start: None,
        }
    }
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub sandbox: Sandbox,
    /// Held for the fixture's lifetime: the sandbox serves while it lives.
    #[allow(dead_code)]
    pub running: RunningSandbox,
    pub project: Project,
    pub state: StateStore,
    /// What runs of this fixture share (Salesforce clients, hooks).
    pub engine: Engine,
}

/// Short backoffs so fault tests take seconds, with the production bounds
/// on attempts.
pub fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        backoff: nightjar::backoff::Backoff::new(Duration::from_millis(20), Duration::from_millis(200)),
        ..RetryPolicy::default()
    }
}

/// Column name in the warehouse for a Salesforce field.
pub fn column_for(field: &str) -> String {
    field.to_ascii_lowercase()
}

impl Fixture {
    /// A sandbox with `accounts` generated Accounts, and a job `accounts`
    /// that maps every field as text (SystemModstamp as timestamp) with the
    /// given page size, no lookback and a 2-minute settle.
    pub async fn new(accounts: usize, page_size: u32) -> Fixture {
        Fixture::build(FixtureOptions { accounts, page_size, ..FixtureOptions::default() }).await
    }

    pub async fn build(options: FixtureOptions) -> Fixture {
        let mut config =
            SandboxConfig { objects: vec![("Account".into(), options.accounts)], ..SandboxConfig::default() };
        if let Some(start) = options.sandbox_start {
            config.start = start;
        }
        let sandbox = Sandbox::new(config.clone()).expect("sandbox config is valid");
        let running = sandbox.start(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("sandbox listens");
        let dir = tempfile::tempdir().expect("temp dir");
        write_project(dir.path(), running.base_url(), &config, &options);
        let project =
            Project::load(&dir.path().join("nightjar.toml")).unwrap_or_else(|e| panic!("fixture config: {e}"));
        let state = StateStore::open(&dir.path().join("state/nightjar.db")).await.expect("state opens");
        let engine = Engine::new().with_clients(Clients::with_policy(fast_retries()));
        Fixture { dir, sandbox, running, project, state, engine }
    }

    /// A REST session on the sandbox, as any API client gets one (client
    /// credentials): the access token and the data API base of the org.
    pub async fn api_session(&self) -> (String, String) {
        let config = SandboxConfig::default();
        let token: serde_json::Value = reqwest::Client::new()
            .post(self.running.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", config.client_id.as_str()),
                ("client_secret", config.client_secret.as_str()),
            ])
            .send()
            .await
            .expect("token request")
            .json()
            .await
            .expect("token response");
        let access = token["access_token"].as_str().expect("a token").to_string();
        let instance = token["instance_url"].as_str().expect("instance_url");
        (access, format!("{instance}/services/data/v62.0"))
    }

    pub async fn run(&self) -> RunReport {
        run_job(&self.engine, &self.project, &self.state, "accounts", Trigger::Manual).await.expect("run is recorded")
    }

    /// Re-reads the config files (after a test edited them).
    pub fn reload(&mut self) {
        self.project =
            Project::load(&self.dir.path().join("nightjar.toml")).unwrap_or_else(|e| panic!("fixture config: {e}"));
    }

    /// History as filtered, read from synchronous test code (inside
    /// `block_in_place`); empty on an error.
    pub fn history_blocking(&self, filter: nightjar::state::HistoryFilter) -> Vec<nightjar::state::RunRecord> {
        tokio::runtime::Handle::current().block_on(self.state.history(filter)).unwrap_or_default()
    }

    pub fn advance(&self, minutes: u64) {
        self.sandbox.advance_clock(Duration::from_secs(minutes * 60));
    }

    pub fn warehouse(&self) -> PathBuf {
        self.dir.path().join("state/warehouse.db")
    }

    /// The whole target table, ordered by key, every column.
    pub fn table(&self) -> Vec<Vec<Value>> {
        let conn = rusqlite::Connection::open(self.warehouse()).expect("warehouse opens");
        let mut stmt = conn.prepare("SELECT * FROM account ORDER BY id").expect("table exists");
        let width = stmt.column_count();
        let rows = stmt
            .query_map([], |r| (0..width).map(|i| r.get::<_, Value>(i)).collect::<Result<Vec<_>, _>>())
            .expect("query runs");
        rows.map(|r| r.expect("row reads")).collect()
    }

    pub fn column_names(&self) -> Vec<String> {
        let conn = rusqlite::Connection::open(self.warehouse()).expect("warehouse opens");
        let stmt = conn.prepare("SELECT * FROM account").expect("table exists");
        stmt.column_names().into_iter().map(str::to_string).collect()
    }
}

fn write_project(dir: &Path, base_url: &str, sandbox: &SandboxConfig, options: &FixtureOptions) {
    let page_size = options.page_size;
    let target_connection = match &options.target {
        TargetKind::Sqlite => "[connections.wh]\nkind = \"sqlite\"\npath = \"state/warehouse.db\"\n".to_string(),
        TargetKind::Postgres { url, .. } => format!("[connections.wh]\nkind = \"postgres\"\nurl = \"{url}\"\n"),
        TargetKind::Files { format } => {
            format!("[connections.wh]\nkind = \"files\"\npath = \"state/lake\"\nformat = \"{format}\"\n")
        }
    };
    let table = match &options.target {
        TargetKind::Sqlite | TargetKind::Files { .. } => "account".to_string(),
        TargetKind::Postgres { table, .. } => table.clone(),
    };
    let include_deleted = options.deletes != "ignore";
    let (deletes, evolution) = (options.deletes, options.schema_evolution);
    std::fs::create_dir_all(dir.join("jobs")).unwrap();
    std::fs::create_dir_all(dir.join("mappings")).unwrap();
    std::fs::write(
        dir.join("nightjar.toml"),
        format!(
            r#"[state]
path = "state/nightjar.db"

[connections.org]
kind = "salesforce"
login_url = "{base_url}"
auth = "client_credentials"
client_id = "{}"
client_secret = "{}"

{target_connection}"#,
            sandbox.client_id, sandbox.client_secret
        ),
    )
    .unwrap();
    let fields = options.fields.iter().map(|f| format!("\"{f}\"")).collect::<Vec<_>>().join(", ");
    std::fs::write(
        dir.join("jobs/accounts.toml"),
        format!(
            r#"[source]
connection = "org"
object = "Account"
fields = [{fields}]
cursor = "SystemModstamp"
settle = "2m"
page_size = {page_size}
include_deleted = {include_deleted}

[transform]
mapping = "accounts"

[target]
connection = "wh"
table = "{table}"
key = ["id"]
deletes = "{deletes}"
schema_evolution = "{evolution}"
"#
        ),
    )
    .unwrap();
    let mut mapping = String::new();
    for f in options.fields {
        let ty = if *f == "SystemModstamp" { "timestamp" } else { "text" };
        let required = *f == "Id";
        mapping.push_str(&format!(
            "[[column]]\nname = \"{}\"\nfrom = \"{f}\"\ntype = \"{ty}\"\nrequired = {required}\n\n",
            column_for(f)
        ));
    }
    std::fs::write(dir.join("mappings/accounts.toml"), mapping).unwrap();
}

/// Where a child run stops: `stage` after its first page is staged,
/// `commit` inside the target's commit, just before it becomes visible.
struct PauseAt(&'static str);

impl nightjar::hooks::Hooks for PauseAt {
    fn reached(&self, point: nightjar::hooks::HookPoint) {
        let here = match point {
            nightjar::hooks::HookPoint::PageStaged(1) => "stage",
            nightjar::hooks::HookPoint::BeforeCommit => "commit",
            _ => return,
        };
        if here == self.0 {
            eprintln!("nightjar test child: paused at {here}");
            // Blocks the thread on purpose: a transaction may be open, and
            // the process is about to be killed.
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Starts a run of job `accounts` of the project in `dir` in a child process
/// (this test binary, re-executed into [`paused_run_child`]) that stops at
/// `point` (`stage` or `commit`); returns once it is there, for the caller
/// to SIGKILL. The hook is injected by the child, not built into nightjar.
pub fn start_paused_child(dir: &Path, point: &str) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "fixture::paused_run_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("NIGHTJAR_TEST_CHILD_DIR", dir)
        .env("NIGHTJAR_TEST_CHILD_PAUSE", point)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the child starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.contains("paused at") => return child,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the child run never reached `{point}`:\n{}", seen.join("\n"));
            }
        }
    }
}

/// The child of [`start_paused_child`]; does nothing when run directly.
#[test]
#[ignore = "the crash tests run it in a child process"]
fn paused_run_child() {
    let (Ok(dir), Ok(point)) = (std::env::var("NIGHTJAR_TEST_CHILD_DIR"), std::env::var("NIGHTJAR_TEST_CHILD_PAUSE"))
    else {
        return;
    };
    let point: &'static str = if point == "commit" { "commit" } else { "stage" };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let dir = PathBuf::from(dir);
        let project = Project::load(&dir.join("nightjar.toml")).expect("the project loads");
        let state = StateStore::open(&dir.join("state/nightjar.db")).await.expect("state opens");
        let engine = Engine::new().with_hooks(std::sync::Arc::new(PauseAt(point)));
        let report = run_job(&engine, &project, &state, "accounts", Trigger::Manual).await;
        panic!("the child run was meant to stop at {point}, but ended: {report:?}");
    });
}
