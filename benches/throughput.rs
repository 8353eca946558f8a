//! Throughput benchmark: N generated Accounts from the sandbox into Postgres
//! (first load, every row changed, nothing changed) and into SQLite, next to
//! the floors on the same data and machine: the sandbox alone serving the
//! pages, `psql \copy` straight into a table, and `\copy` into staging plus
//! the same kind of merge nightjar issues. It prints ratios, not verdicts.
//!
//! ```sh
//! cargo bench --bench throughput -- --rows 100000      # also 1000000, 5000000
//! cargo bench --bench throughput -- --rows 1000000 --page-size 10000 --repeat 3
//! ```
//!
//! The first load, the sandbox alone and `\copy` straight into the table
//! are each run `--repeat` times (default 3) and their medians compared.
//!
//! Needs `psql` and the Postgres server at `NIGHTJAR_BENCH_POSTGRES_URL`
//! (default postgresql://postgres@127.0.0.1:5432/test); works in the schema
//! `nightjar_bench`, which it drops and recreates.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Rows per result page (`maxRecords`) unless `--page-size` says otherwise.
const DEFAULT_PAGE_SIZE: u32 = 10_000;
const SCHEMA: &str = "nightjar_bench";

struct Measured {
    wall: Duration,
    peak_rss_kb: u64,
    output: String,
    /// `step duration` pairs from `nightjar show`.
    steps: String,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    let rows: usize = flag("--rows").and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let page_size: u32 = flag("--page-size").and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_PAGE_SIZE);
    let repeat: usize = flag("--repeat").and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let url = std::env::var("NIGHTJAR_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
    let bin = env!("CARGO_BIN_EXE_nightjar");
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");

    println!("nightjar throughput benchmark: {rows} Accounts, page size {page_size}, medians of {repeat}");
    let mut sandbox = Sandbox(
        Command::new(bin)
            .args(["sandbox", "--listen", &format!("127.0.0.1:{port}"), "--generate", &format!("Account={rows}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("the sandbox starts"),
    );
    wait_until_up(&base);
    post(&format!("{base}/sandbox/clock/advance?by=1h"));

    write_project(dir.path(), &base, &url, page_size);
    psql(&url, &format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA};"));

    let sandbox_alone = median((0..repeat).map(|_| time_sandbox_alone(&base, page_size)).collect());
    let mut firsts = Vec::new();
    for i in 0..repeat {
        if i > 0 {
            // Back to an empty target: no table, no watermark.
            psql(&url, &format!("DROP TABLE {SCHEMA}.account"));
            nightjar(bin, dir.path(), &["watermark", "pg", "--clear"]);
        }
        firsts.push(run(bin, dir.path(), "pg"));
    }
    let first_walls: Vec<Duration> = firsts.iter().map(|m| m.wall).collect();
    let first_median = median(first_walls.clone());
    let first = firsts.into_iter().find(|m| m.wall == first_median).expect("the median is one of the runs");
    let csv = dir.path().join("rows.csv");
    let cols = psql(
        &url,
        &format!(
            "SELECT string_agg(quote_ident(column_name), ',' ORDER BY ordinal_position) FROM information_schema.columns \
             WHERE table_schema = '{SCHEMA}' AND table_name = 'account' AND column_name NOT LIKE '\\_%'"
        ),
    );
    let cols = cols.trim().to_string();
    psql(&url, &format!("\\copy (SELECT {cols} FROM {SCHEMA}.account) TO '{}' CSV", csv.display()));

    post(&format!("{base}/sandbox/objects/Account/update?count={rows}"));
    post(&format!("{base}/sandbox/clock/advance?by=5m"));
    let changed = run(bin, dir.path(), "pg");
    let unchanged = run(bin, dir.path(), "pg");
    let sqlite = run(bin, dir.path(), "lite");

    let baselines = time_baselines(&url, &cols, &csv, repeat);
    sandbox.stop();
    psql(&url, &format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"));

    let secs = |d: Duration| d.as_secs_f64();
    let floor_first = secs(sandbox_alone).max(secs(baselines.copy_straight));
    let floor_upsert = secs(baselines.copy_stage) + secs(baselines.merge_changed);
    println!();
    println!("{:<34} {:>9} {:>10} {:>12}  ratio", "step", "wall s", "rows/s", "peak RSS MB");
    let line = |name: &str, m: &Measured, floor: Option<(f64, &str)>| {
        let ratio = floor.map(|(f, what)| format!("{:.2}x {what}", secs(m.wall) / f)).unwrap_or_default();
        println!(
            "{:<34} {:>9.2} {:>10.0} {:>12.0}  {ratio}",
            name,
            secs(m.wall),
            rows as f64 / secs(m.wall),
            m.peak_rss_kb as f64 / 1024.0
        );
    };
    line("postgres first load (median)", &first, Some((floor_first, "of max(sandbox alone, \\copy)")));
    line("postgres every row changed", &changed, Some((floor_upsert, "of staging \\copy + merge")));
    line("postgres nothing changed", &unchanged, None);
    line("sqlite first load", &sqlite, None);
    println!();
    println!(
        "floors: sandbox alone {:.2} s; \\copy into the table {:.2} s; \\copy into staging {:.2} s; merge of all-changed rows {:.2} s",
        secs(sandbox_alone),
        secs(baselines.copy_straight),
        secs(baselines.copy_stage),
        secs(baselines.merge_changed)
    );
    println!(
        "first loads: {}",
        first_walls.iter().map(|w| format!("{:.2} s", secs(*w))).collect::<Vec<_>>().join(", ")
    );
    for (name, m) in [("first", &first), ("changed", &changed), ("unchanged", &unchanged), ("sqlite", &sqlite)] {
        println!("{name} steps: {}", m.steps);
        if let Some(last) = m.output.lines().last() {
            println!("{name}: {last}");
        }
    }
}

/// The sandbox process, stopped when the benchmark ends, even on a panic.
struct Sandbox(std::process::Child);

impl Sandbox {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn wait_until_up(base: &str) {
    let start = Instant::now();
    let rt = runtime();
    let http = reqwest::Client::new();
    while rt
        .block_on(http.get(format!("{base}/sandbox/clock")).send())
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        assert!(start.elapsed() < Duration::from_secs(300), "the sandbox did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// POSTs to one of the sandbox's control endpoints.
fn post(url: &str) {
    let status = runtime()
        .block_on(async { reqwest::Client::new().post(url).timeout(Duration::from_secs(600)).send().await })
        .map(|r| r.status())
        .expect("the sandbox answers");
    assert!(status.is_success(), "POST {url}: {status}");
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs (install postgresql-client)");
    assert!(out.status.success(), "psql failed on {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Runs a nightjar command in the project and returns its stdout.
fn nightjar(bin: &str, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(["--config", "nightjar.toml"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("nightjar runs");
    assert!(out.status.success(), "nightjar {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The step timings of the job's latest run, from `nightjar show --json`.
fn steps(bin: &str, dir: &Path, job: &str) -> String {
    let history: serde_json::Value =
        serde_json::from_str(&nightjar(bin, dir, &["history", "--job", job, "--limit", "1", "--json"]))
            .expect("history JSON");
    let Some(id) = history[0]["id"].as_i64() else { return String::new() };
    let show: serde_json::Value =
        serde_json::from_str(&nightjar(bin, dir, &["show", &id.to_string(), "--json"])).expect("show JSON");
    show["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| {
                    format!(
                        "{} {:.2} s",
                        s["step"].as_str().unwrap_or("?"),
                        s["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn write_project(dir: &Path, base: &str, url: &str, page_size: u32) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.join("jobs")).unwrap();
    std::fs::create_dir_all(dir.join("mappings")).unwrap();
    std::fs::copy(root.join("mappings/accounts.toml"), dir.join("mappings/accounts.toml")).unwrap();
    std::fs::write(
        dir.join("nightjar.toml"),
        format!(
            "[state]\npath = \"state/nightjar.db\"\n\n[connections.sandbox]\nkind = \"salesforce\"\nlogin_url = \"{base}\"\n\
             auth = \"client_credentials\"\nclient_id = \"nightjar-sandbox\"\nclient_secret = \"sandbox-secret\"\n\n\
             [connections.pg]\nkind = \"postgres\"\nurl = \"{url}\"\n\n[connections.lite]\nkind = \"sqlite\"\npath = \"state/warehouse.db\"\n"
        ),
    )
    .unwrap();
    let job = std::fs::read_to_string(root.join("jobs/accounts.toml")).unwrap();
    let job = job.replace("page_size = 1000 ", &format!("page_size = {page_size} "));
    for (name, conn, table) in [("pg", "pg", format!("{SCHEMA}.account")), ("lite", "lite", "account".to_string())] {
        let text = job
            .replace("connection = \"local\"", &format!("connection = \"{conn}\""))
            .replace("table = \"account\"", &format!("table = \"{table}\""));
        std::fs::write(dir.join(format!("jobs/{name}.toml")), text).unwrap();
    }
}

/// Runs one job as a user would and samples the process's peak RSS (VmHWM).
fn run(bin: &str, dir: &Path, job: &str) -> Measured {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(["--config", "nightjar.toml", "run", job])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nightjar runs");
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    while child.try_wait().expect("wait works").is_none() {
        if let Ok(status) = std::fs::read_to_string(&status_file)
            && let Some(kb) = status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1))
        {
            peak = peak.max(kb.parse().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let wall = start.elapsed();
    let output = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "nightjar run {job} failed: {output}");
    Measured { wall, peak_rss_kb: peak, output, steps: steps(bin, dir, job) }
}

/// Time to pull every page from the sandbox with nothing downstream.
fn time_sandbox_alone(base: &str, page_size: u32) -> Duration {
    runtime().block_on(async {
        let http = reqwest::Client::new();
        let start = Instant::now();
        let token: serde_json::Value = http
            .post(format!("{base}/services/oauth2/token"))
            .form(&[("grant_type", "client_credentials"), ("client_id", "nightjar-sandbox"), ("client_secret", "sandbox-secret")])
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("token")
            .json()
            .await
            .expect("token JSON");
        let bearer = token["access_token"].as_str().expect("access_token").to_string();
        let api = format!("{base}/services/data/v62.0/jobs/query");
        let fields = "Id, Name, Type, Industry, AnnualRevenue, NumberOfEmployees, Rating, Phone, Website, BillingStreet, \
                      BillingCity, BillingPostalCode, BillingCountry, Description, IsActive__c, Score__c, CreatedDate, SystemModstamp, IsDeleted";
        let job: serde_json::Value = http
            .post(&api)
            .bearer_auth(&bearer)
            .json(&serde_json::json!({"operation": "queryAll", "query": format!("SELECT {fields} FROM Account")}))
            .send()
            .await
            .expect("create")
            .json()
            .await
            .expect("job JSON");
        let id = job["id"].as_str().expect("job id").to_string();
        loop {
            let info: serde_json::Value =
                http.get(format!("{api}/{id}")).bearer_auth(&bearer).send().await.expect("poll").json().await.expect("poll JSON");
            if info["state"] == "JobComplete" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut locator: Option<String> = None;
        loop {
            let mut url = format!("{api}/{id}/results?maxRecords={page_size}");
            if let Some(l) = &locator {
                url.push_str(&format!("&locator={l}"));
            }
            let resp = http.get(url).bearer_auth(&bearer).send().await.expect("page");
            let next = resp.headers().get("Sforce-Locator").and_then(|v| v.to_str().ok()).map(str::to_string);
            let _ = resp.bytes().await.expect("page body");
            match next {
                Some(l) if l != "null" => locator = Some(l),
                _ => break,
            }
        }
        start.elapsed()
    })
}

struct Baselines {
    copy_straight: Duration,
    copy_stage: Duration,
    merge_changed: Duration,
}

fn timed(url: &str, sql: &str) -> Duration {
    let start = Instant::now();
    psql(url, sql);
    start.elapsed()
}

fn time_baselines(url: &str, cols: &str, csv: &Path, repeat: usize) -> Baselines {
    let csv = csv.display();
    let non_key: Vec<&str> = cols.split(',').filter(|c| *c != "sf_id").collect();
    let set: Vec<String> = non_key.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
    let old: Vec<String> = non_key.iter().map(|c| format!("t.{c}")).collect();
    let new: Vec<String> = non_key.iter().map(|c| format!("EXCLUDED.{c}")).collect();
    psql(
        url,
        &format!(
            "CREATE TABLE {SCHEMA}.plain (LIKE {SCHEMA}.account INCLUDING DEFAULTS); ALTER TABLE {SCHEMA}.plain ADD PRIMARY KEY (sf_id); \
             ALTER TABLE {SCHEMA}.plain ALTER COLUMN _nightjar_run_id DROP NOT NULL, ALTER COLUMN _nightjar_loaded_at DROP NOT NULL; \
             CREATE TABLE {SCHEMA}.stage (LIKE {SCHEMA}.account INCLUDING DEFAULTS); \
             ALTER TABLE {SCHEMA}.stage ALTER COLUMN _nightjar_run_id DROP NOT NULL, ALTER COLUMN _nightjar_loaded_at DROP NOT NULL;"
        ),
    );
    let copy_straight = median(
        (0..repeat)
            .map(|_| {
                psql(url, &format!("TRUNCATE {SCHEMA}.plain"));
                timed(url, &format!("\\copy {SCHEMA}.plain ({cols}) FROM '{csv}' CSV"))
            })
            .collect(),
    );
    let copy_stage = timed(url, &format!("\\copy {SCHEMA}.stage ({cols}) FROM '{csv}' CSV"));
    psql(url, &format!("UPDATE {SCHEMA}.stage SET name = name || 'x'"));
    let merge_changed = timed(
        url,
        &format!(
            "INSERT INTO {SCHEMA}.plain AS t ({cols}, _nightjar_run_id, _nightjar_loaded_at) SELECT {cols}, 1, now() FROM {SCHEMA}.stage \
             ON CONFLICT (sf_id) DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({})",
            set.join(", "),
            old.join(", "),
            new.join(", ")
        ),
    );
    Baselines { copy_straight, copy_stage, merge_changed }
}
