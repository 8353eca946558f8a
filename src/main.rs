//! The `nightjar` command line: parses arguments and calls into the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use nightjar::commands::{history_table, run_details};
use nightjar::config::{ConfigError, Project};
use nightjar::outcome::Trigger;
use nightjar::run::{Engine, RunError, recover_abandoned, run_job};
use nightjar::sandbox::{Sandbox, SandboxConfig};
use nightjar::state::{HistoryFilter, OutboxFilter, OutboxStatus, RunStatus, StateStore};

/// Exit code for configuration errors (DESIGN.md).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(name = "nightjar", version, about = "Scheduled batch ETL from Salesforce into your warehouse")]
struct Cli {
    /// Global config file; jobs/ and mappings/ are read from its directory.
    #[arg(long, global = true, default_value = "nightjar.toml")]
    config: PathBuf,
    /// State DB (run history, watermarks); overrides [state].path.
    #[arg(long, global = true)]
    state: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run jobs now; exit 0 if all succeeded, 1 if any failed.
    Run {
        /// Job names (file stems in jobs/).
        jobs: Vec<String>,
        /// Run every enabled job.
        #[arg(long, conflicts_with = "jobs")]
        all: bool,
    },
    /// The scheduler daemon: runs enabled jobs on their schedules until
    /// SIGTERM or SIGINT, then waits for runs in flight.
    Serve {
        /// How long to wait for runs in flight on shutdown, e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
    },
    /// Run history, newest first.
    History {
        #[arg(long)]
        job: Option<String>,
        /// running | succeeded | failed | cancelled | abandoned
        #[arg(long)]
        status: Option<String>,
        /// Only runs started since: an RFC 3339 time, a date (UTC), or a
        /// duration ago such as `24h` or `7d`.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show or move a job's watermark; a change is recorded in history.
    Watermark {
        job: String,
        /// New watermark (RFC 3339, e.g. 2026-01-01T00:00:00Z): the next run
        /// extracts from here (minus lookback).
        #[arg(long, conflicts_with = "clear")]
        set: Option<String>,
        /// Forget the watermark: the next run extracts everything.
        #[arg(long)]
        clear: bool,
    },
    /// One run in detail.
    Show {
        run: i64,
        /// Also list the rows the mapping rejected.
        #[arg(long)]
        rejects: bool,
        #[arg(long)]
        json: bool,
    },
    /// Check every config, job and mapping file; errors as file:line:col.
    Validate {
        /// Also log in to each Salesforce connection and check that every
        /// job's object and fields exist (via describe).
        #[arg(long)]
        online: bool,
    },
    /// Log in to Salesforce connections: API version, limits left, and
    /// whether each job's object and fields exist; exit 1 on any problem.
    Check {
        /// Only this connection (default: every Salesforce connection).
        connection: Option<String>,
    },
    /// OAuth logins for `auth = "refresh_token"` connections.
    Auth {
        #[command(subcommand)]
        action: AuthAction,
    },
    /// Run the local Salesforce emulator.
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:8178")]
        listen: SocketAddr,
        /// Objects to generate, e.g. Account=1000 (repeatable).
        #[arg(long = "generate", value_name = "OBJ=N")]
        generate: Vec<String>,
        /// Faults to inject, e.g. 'http:code=503,on=results,times=2;expire-session:on=poll'
        /// (grammar: src/sandbox/faults.rs).
        #[arg(long, value_name = "SPEC")]
        faults: Option<String>,
        /// PEM public key that JWT bearer assertions must verify against.
        #[arg(long, value_name = "FILE")]
        jwt_public_key: Option<PathBuf>,
        /// Where the sandbox clock starts, e.g. 2026-01-01T00:00:00Z (default: now).
        #[arg(long, value_name = "RFC3339", value_parser = chrono::DateTime::parse_from_rfc3339)]
        start: Option<chrono::DateTime<chrono::FixedOffset>>,
    },
    /// Run the example jobs against an in-process sandbox, twice, and show the history.
    Demo,
    /// The alert outbox (pending, sent, failed emails), newest first.
    Alerts {
        #[command(subcommand)]
        action: Option<AlertsAction>,
        #[arg(long)]
        job: Option<String>,
        /// pending | sent | failed
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuthAction {
    /// The OAuth web-server flow with PKCE: open the printed URL, log in,
    /// and the refresh token is stored in the state DB (never printed).
    Login {
        connection: String,
        /// Loopback port of the redirect URI `http://localhost:PORT/oauth/callback`,
        /// which must be registered as a callback URL of the connected app.
        #[arg(long, default_value_t = 1717)]
        port: u16,
    },
}

#[derive(Subcommand)]
enum AlertsAction {
    /// Send a test email now, to check the [smtp] settings.
    Test {
        /// Recipient (repeatable); default: [alerts].email.
        #[arg(long)]
        to: Vec<String>,
    },
    /// Try every pending email in the outbox once, now, whatever its backoff.
    Send,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(config) = e.downcast_ref::<ConfigError>() {
                eprintln!("{config}");
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn alerts_command(
    config: &std::path::Path,
    state_path: &Option<PathBuf>,
    action: Option<AlertsAction>,
    job: Option<String>,
    status: Option<String>,
    limit: u32,
    json: bool,
) -> Result<ExitCode> {
    match action {
        Some(AlertsAction::Test { to }) => {
            let project = Project::load(config)?;
            let sent_to = nightjar::alert::send_test(&project, &to).await?;
            println!("test email sent to {}", sent_to.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Some(AlertsAction::Send) => {
            let project = Project::load(config)?;
            let state = open_state(state_path, Some(&project)).await?;
            let mailer = nightjar::alert::mailer(&project)?;
            let policy = nightjar::alert::RetryPolicy::default();
            let done = nightjar::alert::deliver_pending_now(&state, &mailer, &policy).await?;
            println!("alerts: {} sent, {} to retry, {} given up", done.sent, done.retrying, done.given_up);
            if let Some(e) = &done.last_error {
                eprintln!("alerts: last error: {e}");
            }
            Ok(if done.retrying + done.given_up > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        None => {
            let project = if state_path.is_none() { Some(Project::load(config)?) } else { None };
            let state = open_state(state_path, project.as_ref()).await?;
            let status = match status {
                Some(s) => Some(
                    OutboxStatus::parse(&s)
                        .with_context(|| format!("unknown status `{s}`; use pending, sent or failed"))?,
                ),
                None => None,
            };
            let entries = state.outbox(OutboxFilter { job, status, limit: Some(limit) }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                println!("no alerts yet");
            } else {
                println!("{}", nightjar::alert::outbox_table(&entries));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// After `nightjar run`: one delivery try for what the runs queued; what
/// fails stays in the outbox for the next sender (`serve`, `alerts send`).
async fn deliver_alerts_once(project: &Project, state: &StateStore) {
    // Each send is bounded by the [smtp] timeout; the pass as a whole too,
    // so a black-holed SMTP server delays `run`'s exit by one timeout at
    // most. What is not sent stays in the outbox.
    let bound =
        project.smtp.as_ref().map_or(std::time::Duration::ZERO, |s| s.timeout) + std::time::Duration::from_secs(2);
    let pass = tokio::time::timeout(bound, nightjar::alert::deliver_once(project, state)).await;
    let Ok(pass) = pass else {
        eprintln!(
            "alerts: the SMTP server did not answer in time; the email(s) stay in the outbox, see `nightjar alerts`"
        );
        return;
    };
    match pass {
        Ok(Some(done)) if done.retrying + done.given_up > 0 => eprintln!(
            "alerts: {} email(s) not sent yet ({}); they stay in the outbox, see `nightjar alerts`",
            done.retrying + done.given_up,
            done.last_error.as_deref().unwrap_or("unknown error")
        ),
        Ok(_) => {}
        Err(e) => eprintln!("alerts: cannot deliver the outbox now ({e}); see `nightjar alerts`"),
    }
}

/// Progress of `nightjar run`: a spinner per job with pages and rows on a
/// terminal, a plain line per page otherwise (logs and CI keep a record).
struct RunProgress {
    tty: bool,
    bars: std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
}

impl RunProgress {
    fn new() -> std::sync::Arc<RunProgress> {
        use std::io::IsTerminal;
        std::sync::Arc::new(RunProgress { tty: std::io::stderr().is_terminal(), bars: Default::default() })
    }

    /// The engine's progress sink, drawing on this.
    fn sink(self: &std::sync::Arc<Self>) -> std::sync::Arc<nightjar::run::ProgressSink> {
        let progress = self.clone();
        std::sync::Arc::new(move |job: &str, pages: u64, rows: u64| progress.update(job, pages, rows))
    }

    fn update(&self, job: &str, pages: u64, rows: u64) {
        if !self.tty {
            eprintln!("{job}: {pages} page(s), {rows} rows staged");
            return;
        }
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bars.entry(job.to_string()).or_insert_with(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            let style = indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.set_prefix(job.to_string());
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        bar.set_message(format!("{pages} page(s), {rows} rows staged"));
    }

    fn finish(&self, job: &str) {
        if let Some(bar) = self.bars.lock().unwrap_or_else(|e| e.into_inner()).remove(job) {
            bar.finish_and_clear();
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn open_state(cli_state: &Option<PathBuf>, project: Option<&Project>) -> Result<StateStore> {
    let path = match (cli_state, project) {
        (Some(p), _) => p.clone(),
        (None, Some(project)) => project.state_path.clone(),
        (None, None) => PathBuf::from("state/nightjar.db"),
    };
    Ok(StateStore::open(&path).await?)
}

/// `--since`: an RFC 3339 time, a UTC date, or a duration back from `now`.
fn parse_since(s: &str, now: chrono::DateTime<chrono::Utc>) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    let ago = humantime::parse_duration(s)
        .with_context(|| format!("--since `{s}`: use an RFC 3339 time, a date (2026-01-01) or a duration (24h, 7d)"))?;
    // Far enough back means "everything"; never an overflow.
    Ok(chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| now.checked_sub_signed(ago))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC))
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Closes runs a dead process left `running` before new ones start.
async fn recover(engine: &Engine, project: &Project, state: &StateStore) -> Result<()> {
    let closed = recover_abandoned(engine, project, state).await?;
    if !closed.is_empty() {
        let ids: Vec<String> = closed.iter().map(|id| id.to_string()).collect();
        eprintln!("marked run(s) {} abandoned: their process is gone (see `nightjar show RUN`)", ids.join(", "));
    }
    Ok(())
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate { online } => {
            let project = Project::load(&cli.config)?;
            if online {
                let state = open_state(&cli.state, Some(&project)).await.ok();
                let diags = nightjar::salesforce::validate_online(&project, state.as_ref()).await?;
                if !diags.is_empty() {
                    return Err(ConfigError::Invalid(diags).into());
                }
            }
            println!(
                "{}: ok ({} job(s): {})",
                cli.config.display(),
                project.jobs.len(),
                project.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { jobs, all } => {
            let project = Project::load(&cli.config)?;
            let state = open_state(&cli.state, Some(&project)).await?;
            let names: Vec<String> =
                if all { project.jobs.values().filter(|j| j.enabled).map(|j| j.name.clone()).collect() } else { jobs };
            if names.is_empty() {
                anyhow::bail!("name at least one job, or pass --all");
            }
            for name in &names {
                project.job(name)?;
            }
            let progress = RunProgress::new();
            let engine = Engine::new().with_progress(progress.sink());
            recover(&engine, &project, &state).await?;
            let mut failed = false;
            for name in &names {
                let outcome = run_job(&engine, &project, &state, name, Trigger::Manual).await;
                progress.finish(name);
                let report = match outcome {
                    Ok(report) => report,
                    Err(RunError::Locked(holder)) => {
                        failed = true;
                        eprintln!("run {name}: not started — {holder}");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let c = &report.counts;
                match &report.error {
                    None => eprintln!(
                        "run {} {}: succeeded — extracted {}, inserted {}, updated {}, deleted {}, unchanged {}, rejected {}",
                        report.run_id, name, c.extracted, c.inserted, c.updated, c.deleted, c.unchanged, c.rejected
                    ),
                    Some(e) => {
                        failed = true;
                        eprintln!("run {} {}: failed — {e}", report.run_id, name);
                    }
                }
            }
            deliver_alerts_once(&project, &state).await;
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Serve { grace } => {
            let project = Project::load(&cli.config)?;
            let state = open_state(&cli.state, Some(&project)).await?;
            let grace = grace.unwrap_or(nightjar::run::SHUTDOWN_GRACE);
            eprintln!(
                "serve: running {} scheduled job(s); SIGTERM or Ctrl-C stops",
                nightjar::run::schedules(&project).len()
            );
            let engine = std::sync::Arc::new(Engine::new());
            let project = std::sync::Arc::new(project);
            nightjar::run::serve(engine, project, state, Some(cli.config.clone()), grace, shutdown_signal()).await?;
            eprintln!("serve: stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::History { job, status, since, limit, json } => {
            let project = if cli.state.is_none() { Some(Project::load(&cli.config)?) } else { None };
            let state = open_state(&cli.state, project.as_ref()).await?;
            let status = match status {
                Some(s) => Some(RunStatus::parse(&s).with_context(|| {
                    format!("unknown status `{s}`; use running, succeeded, failed, cancelled or abandoned")
                })?),
                None => None,
            };
            let since = since.as_deref().map(|s| parse_since(s, chrono::Utc::now())).transpose()?;
            let runs = state.history(HistoryFilter { job, status, limit: Some(limit), min_id: None, since }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else if runs.is_empty() {
                println!("no runs yet");
            } else {
                println!("{}", history_table(&runs));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { run, rejects, json } => {
            let project = if cli.state.is_none() { Some(Project::load(&cli.config)?) } else { None };
            let state = open_state(&cli.state, project.as_ref()).await?;
            let record =
                state.run(run).await?.with_context(|| format!("no run {run}; `nightjar history` lists runs"))?;
            let rejected = if rejects { Some(state.rejects(run).await?) } else { None };
            let steps = state.steps(run).await?;
            if json {
                #[derive(serde::Serialize)]
                struct Shown<'a> {
                    run: &'a nightjar::state::RunRecord,
                    steps: &'a [nightjar::state::StepRecord],
                    rejects: Option<&'a [nightjar::state::RejectRecord]>,
                }
                let shown = Shown { run: &record, steps: &steps, rejects: rejected.as_deref() };
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                print!("{}", run_details(&record, &steps, rejected.as_deref()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watermark { job, set, clear } => {
            let project = Project::load(&cli.config)?;
            project.job(&job)?;
            let state = open_state(&cli.state, Some(&project)).await?;
            if set.is_none() && !clear {
                match state.watermark(&job).await? {
                    Some(wm) => println!("{job}: {}", nightjar::state::ts(wm)),
                    None => println!("{job}: no watermark (the next run extracts everything)"),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let value = match &set {
                Some(s) => Some(
                    chrono::DateTime::parse_from_rfc3339(s)
                        .with_context(|| format!("`{s}` is not an RFC 3339 time such as 2026-01-01T00:00:00Z"))?
                        .with_timezone(&chrono::Utc),
                ),
                None => None,
            };
            // Moving the watermark under a run in flight would be overwritten
            // by that run's commit, or skew its window: hold the job's lock.
            let now = chrono::Utc::now();
            let lock = match state.try_lock_job(&job, now).await? {
                Ok(lock) => lock,
                Err(holder) => {
                    eprintln!("watermark {job}: not changed — {holder}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let before = state.watermark(&job).await?;
            let entry = state.set_watermark_manually(&job, value, now).await?;
            lock.release().await?;
            let show =
                |w: Option<chrono::DateTime<chrono::Utc>>| w.map_or_else(|| "(none)".into(), nightjar::state::ts);
            println!("{job}: watermark {} -> {} (history entry {entry})", show(before), show(value));
            Ok(ExitCode::SUCCESS)
        }
        Command::Sandbox { listen, generate, faults, jwt_public_key, start } => {
            let mut config = SandboxConfig::default();
            if let Some(start) = start {
                config.start = start.to_utc();
            }
            for spec in &generate {
                config.objects.push(SandboxConfig::parse_generate(spec)?);
            }
            if let Some(path) = &jwt_public_key {
                config.jwt_public_key_pem =
                    Some(std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?);
            }
            let sandbox = Sandbox::new(config.clone())?;
            if let Some(spec) = &faults {
                sandbox.add_faults(spec)?;
                println!("sandbox: injecting faults: {spec}");
            }
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            let addr = listener.local_addr()?;
            println!("sandbox: listening on http://{addr} (client_id `{}`); Ctrl-C stops it", config.client_id);
            println!(
                "sandbox: change data and time between runs with e.g.\n  curl -X POST 'http://{addr}/sandbox/objects/Account/update?count=10'\n  curl -X POST 'http://{addr}/sandbox/clock/advance?by=5m'"
            );
            tokio::select! {
                served = sandbox.serve(listener) => served?,
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Alerts { action, job, status, limit, json } => {
            alerts_command(&cli.config, &cli.state, action, job, status, limit, json).await
        }
        Command::Check { connection } => {
            let project = Project::load(&cli.config)?;
            let state = open_state(&cli.state, Some(&project)).await.ok();
            let report = nightjar::salesforce::check(&project, connection.as_deref(), state.as_ref()).await;
            for line in &report.lines {
                println!("{line}");
            }
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Auth { action: AuthAction::Login { connection, port } } => {
            let project = Project::load(&cli.config)?;
            let Some(nightjar::config::Connection::Salesforce(conn)) = project.connection(&connection) else {
                anyhow::bail!("no Salesforce connection named `{connection}` in {}", cli.config.display());
            };
            let state = open_state(&cli.state, Some(&project)).await?;
            let outcome = nightjar::salesforce::login_with_browser(&connection, conn, port, |url| {
                eprintln!("Open this URL in a browser and log in to `{connection}`:\n\n  {url}\n");
            })
            .await?;
            state
                .store_refresh_token(
                    &connection,
                    outcome.refresh_token.clone(),
                    &outcome.instance_url,
                    chrono::Utc::now(),
                )
                .await?;
            eprintln!(
                "logged in to `{connection}` ({}); the refresh token is stored in {} (mode 0600)",
                outcome.instance_url,
                state.path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            let project = Project::load(&cli.config)?;
            let state = open_state(&cli.state, Some(&project)).await?;
            let mut out = std::io::stdout();
            nightjar::demo::run_demo(&Engine::new(), &project, &state, &mut out).await?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
