//! The `nightjar` command line: parses arguments and calls into the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use nightjar::commands::{history_table, run_details};
use nightjar::config::{ConfigError, Project};
use nightjar::run::run_job;
use nightjar::sandbox::{Sandbox, SandboxConfig};
use nightjar::state::{HistoryFilter, RunStatus, StateStore};

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
    /// Run history, newest first.
    History {
        #[arg(long)]
        job: Option<String>,
        /// running | succeeded | failed | cancelled | abandoned
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
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
    Validate,
    /// Run the local Salesforce emulator.
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:8178")]
        listen: SocketAddr,
        /// Objects to generate, e.g. Account=1000 (repeatable).
        #[arg(long = "generate", value_name = "OBJ=N")]
        generate: Vec<String>,
    },
    /// Run the example jobs against an in-process sandbox, twice, and show the history.
    Demo,
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn open_state(cli_state: &Option<PathBuf>, project: Option<&Project>) -> Result<StateStore> {
    let path = match (cli_state, project) {
        (Some(p), _) => p.clone(),
        (None, Some(project)) => project.resolve(project.global.state.path.as_str()),
        (None, None) => PathBuf::from("state/nightjar.db"),
    };
    Ok(StateStore::open(&path)?)
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate => {
            let project = Project::load(&cli.config)?;
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
            let state = open_state(&cli.state, Some(&project))?;
            let names: Vec<String> = if all {
                project.jobs.values().filter(|j| j.spec.enabled).map(|j| j.name.clone()).collect()
            } else {
                jobs
            };
            if names.is_empty() {
                anyhow::bail!("name at least one job, or pass --all");
            }
            for name in &names {
                project.job(name)?;
            }
            let mut failed = false;
            for name in &names {
                let report = run_job(&project, &state, name, "manual").await?;
                let c = &report.counts;
                match &report.error {
                    None => eprintln!(
                        "run {} {}: succeeded — extracted {}, inserted {}, updated {}, unchanged {}, rejected {}",
                        report.run_id, name, c.extracted, c.inserted, c.updated, c.unchanged, c.rejected
                    ),
                    Some(e) => {
                        failed = true;
                        eprintln!("run {} {}: failed — {e}", report.run_id, name);
                    }
                }
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::History { job, status, limit, json } => {
            let project = if cli.state.is_none() { Some(Project::load(&cli.config)?) } else { None };
            let state = open_state(&cli.state, project.as_ref())?;
            let status = match status {
                Some(s) => Some(RunStatus::parse(&s).with_context(|| {
                    format!("unknown status `{s}`; use running, succeeded, failed, cancelled or abandoned")
                })?),
                None => None,
            };
            let runs = state.history(&HistoryFilter { job, status, limit: Some(limit), min_id: None })?;
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
            let state = open_state(&cli.state, project.as_ref())?;
            let record = state.run(run)?.with_context(|| format!("no run {run}; `nightjar history` lists runs"))?;
            let rejected = if rejects { Some(state.rejects(run)?) } else { None };
            if json {
                let value = serde_json::json!({ "run": record, "rejects": rejected });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", run_details(&record, rejected.as_deref()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sandbox { listen, generate } => {
            let mut config = SandboxConfig::default();
            for spec in &generate {
                config.objects.push(SandboxConfig::parse_generate(spec)?);
            }
            let sandbox = Sandbox::new(config.clone())?;
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
        Command::Demo => {
            let project = Project::load(&cli.config)?;
            let state = open_state(&cli.state, Some(&project))?;
            let mut out = std::io::stdout();
            nightjar::demo::run_demo(&project, &state, &mut out).await?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
