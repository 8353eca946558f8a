//! Configuration files: `nightjar.toml`, `jobs/*.toml`, `mappings/*.toml`.
//!
//! Loading parses every file, checks the whole set and compiles it into
//! typed plans ([`Project`], [`JobPlan`]) that runtime code uses. Every
//! problem found is reported at once as `file:line:col: message`, so a data
//! engineer fixes a batch of mistakes in one go instead of one per run; the
//! file model with its spans (`model.rs`) never leaves this module.

mod check;
pub mod identifiers;
mod interpolate;
mod model;
mod plan;
mod schedule;
pub mod soql;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use thiserror::Error;

pub use interpolate::{EnvString, InterpolationError, Secret, interpolate_with};
pub use model::{AlertOn, AuthFlow, DeleteMode, FileFormat, SchemaEvolution, SmtpSecurity};
pub use plan::*;
pub use schedule::Schedule;
pub use soql::check_condition;

use model::{ConnectionFile, GlobalConfig, JobFile, MappingFile, SpannedDuration};

/// One problem in one file, at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.col, self.message)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("unknown job `{0}`; `nightjar validate` lists the jobs found in jobs/")]
    UnknownJob(String),
}

fn render(diags: &[Diagnostic]) -> String {
    diags.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

impl ConfigError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Invalid(d) => d,
            ConfigError::UnknownJob(_) => &[],
        }
    }
}

/// Where a loaded file lives, for `file:line:col` messages.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl Project {
    /// Loads `nightjar.toml` and the `jobs/` and `mappings/` beside it, and
    /// compiles them; every problem of every file is one diagnostic.
    pub fn load(config_file: &Path) -> Result<Project, ConfigError> {
        Self::load_from(config_file, &Disk)
    }

    /// [`Project::load`] over texts in memory: `files` are (path, text)
    /// pairs with the paths the files would have on disk, `config_file`
    /// among them; of a path given twice the later text counts. The fuzz
    /// target's entry point: no disk, no directories.
    pub fn from_texts(config_file: &Path, files: &[(&str, &str)]) -> Result<Project, ConfigError> {
        let files = files.iter().map(|(path, text)| (PathBuf::from(path), text.to_string())).collect();
        Self::load_from(config_file, &InMemory(files))
    }

    fn load_from(config_file: &Path, source: &dyn FileSource) -> Result<Project, ConfigError> {
        // Paths in messages are as the user gave them: `--config proj/nightjar.toml`
        // gives `proj/jobs/x.toml`, the default gives `jobs/x.toml`.
        let root = config_file.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut diags = Vec::new();

        let global = match source.read(config_file) {
            Ok(file) => parse::<GlobalConfig>(&file, &mut diags).map(|g| (file, g)),
            Err(d) => {
                diags.push(d);
                None
            }
        };

        let mut mappings: BTreeMap<String, (SourceFile, MappingFile)> = BTreeMap::new();
        // Mappings that exist but did not read or parse: already reported.
        let mut broken_mappings = std::collections::BTreeSet::new();
        for path in source.toml_files(&root.join("mappings"), &mut diags) {
            let Ok(file) = source.read(&path).map_err(|d| diags.push(d)) else {
                broken_mappings.insert(stem(&path));
                continue;
            };
            match parse::<MappingFile>(&file, &mut diags) {
                Some(m) => {
                    mappings.insert(stem(&path), (file, m));
                }
                None => {
                    broken_mappings.insert(stem(&path));
                }
            }
        }
        let mut job_files = Vec::new();
        for path in source.toml_files(&root.join("jobs"), &mut diags) {
            let Ok(file) = source.read(&path).map_err(|d| diags.push(d)) else { continue };
            if let Some(spec) = parse::<JobFile>(&file, &mut diags) {
                job_files.push((stem(&path), file, spec));
            }
        }

        let Some((global_file, global)) = global else {
            return Err(ConfigError::Invalid(diags));
        };
        let settings = compile_global(&root, &global_file, &global, &mut diags);
        let mut jobs = BTreeMap::new();
        for (name, file, spec) in job_files {
            let mapping_name = spec.transform.mapping.get_ref();
            let mapping = mappings.get(mapping_name).map(|(f, m)| (f, m));
            if mapping.is_none() && !broken_mappings.contains(mapping_name) {
                diags.push(at(
                    &file,
                    spec.transform.mapping.span(),
                    format!(
                        "mapping `{mapping_name}` not found; expected {}",
                        root.join("mappings").join(format!("{mapping_name}.toml")).display()
                    ),
                ));
            }
            let raw = RawJob { name: &name, file: &file, spec: &spec, mapping };
            if let Some(plan) = check::compile_job(&raw, &settings, &mut diags) {
                jobs.insert(name.clone(), plan);
            }
        }
        if !diags.is_empty() {
            // File by file, top to bottom: the order a reader fixes them in.
            diags.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
            diags.dedup();
            return Err(ConfigError::Invalid(diags));
        }
        Ok(Project {
            root,
            config_file: config_file.to_path_buf(),
            state_path: settings.state_path,
            server: settings.server,
            max_concurrent_runs: settings.max_concurrent_runs,
            smtp: settings.smtp,
            alerts: settings.alerts,
            connections: settings.connections,
            jobs,
        })
    }
}

/// Where the loader reads files from.
trait FileSource {
    fn read(&self, path: &Path) -> Result<SourceFile, Diagnostic>;
    fn toml_files(&self, dir: &Path, diags: &mut Vec<Diagnostic>) -> Vec<PathBuf>;
}

struct Disk;

impl FileSource for Disk {
    fn read(&self, path: &Path) -> Result<SourceFile, Diagnostic> {
        read(path)
    }
    fn toml_files(&self, dir: &Path, diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
        toml_files(dir, diags)
    }
}

/// Files by path; a directory is the files whose parent it is.
struct InMemory(BTreeMap<PathBuf, String>);

impl FileSource for InMemory {
    fn read(&self, path: &Path) -> Result<SourceFile, Diagnostic> {
        match self.0.get(path) {
            Some(text) => Ok(SourceFile { path: path.to_path_buf(), text: text.clone() }),
            None => Err(Diagnostic {
                file: path.to_path_buf(),
                line: 1,
                col: 1,
                message: "cannot read: no such file".into(),
            }),
        }
    }
    fn toml_files(&self, dir: &Path, _: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
        let in_dir = |p: &&PathBuf| p.parent() == Some(dir) && p.extension().is_some_and(|x| x == "toml");
        self.0.keys().filter(in_dir).cloned().collect()
    }
}

/// A job's files as parsed, before compiling.
pub(crate) struct RawJob<'a> {
    pub name: &'a str,
    pub file: &'a SourceFile,
    pub spec: &'a JobFile,
    /// The job's mapping file and its contents; `None` when it is missing
    /// or broken (reported already).
    pub mapping: Option<(&'a SourceFile, &'a MappingFile)>,
}

/// `nightjar.toml` compiled; what jobs are checked against.
pub(crate) struct Settings {
    pub state_path: PathBuf,
    pub server: ServerSettings,
    pub max_concurrent_runs: u32,
    pub smtp: Option<SmtpSettings>,
    pub alerts: AlertSettings,
    pub connections: BTreeMap<String, Connection>,
}

/// Resolves a path from the config relative to the config's directory.
pub(crate) fn resolve(root: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() { p.to_path_buf() } else { root.join(p) }
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn read(path: &Path) -> Result<SourceFile, Diagnostic> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(SourceFile { path: path.to_path_buf(), text }),
        Err(e) => Err(Diagnostic {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            message: format!("cannot read: {e}; pass --config PATH or run from the project directory"),
        }),
    }
}

fn toml_files(dir: &Path, diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            diags.push(Diagnostic { file: dir.to_path_buf(), line: 1, col: 1, message: format!("cannot list: {e}") });
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

fn parse<T: DeserializeOwned>(file: &SourceFile, diags: &mut Vec<Diagnostic>) -> Option<T> {
    match toml::from_str::<T>(&file.text) {
        Ok(v) => Some(v),
        Err(e) => {
            diags.push(at(file, e.span().unwrap_or(0..0), e.message().trim().to_string()));
            None
        }
    }
}

/// A diagnostic at a byte range of a file.
pub fn at(file: &SourceFile, span: Range<usize>, message: String) -> Diagnostic {
    let (line, col) = line_col(&file.text, span.start);
    Diagnostic { file: file.path.clone(), line, col, message }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let col = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, col)
}

/// A duration setting: its value or `default`, refused (with a reason) when
/// outside `min..=max`. Zero and absurd values are mistakes, never coerced.
pub(crate) fn duration_in(
    file: &SourceFile,
    value: &Option<SpannedDuration>,
    key: &str,
    default: Duration,
    range: (Duration, Duration),
    diags: &mut Vec<Diagnostic>,
) -> Duration {
    let Some(value) = value else { return default };
    let d = value.get_ref().0;
    let (min, max) = range;
    if d < min || d > max {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        diags.push(at(
            file,
            value.span(),
            format!("`{key}` must be between {} and {}, got {}", show(min), show(max), show(d)),
        ));
    }
    d
}

/// More runs at once than any org's Bulk API allows jobs is a typo.
const MAX_CONCURRENT_RUNS: u32 = 100;

fn compile_global(root: &Path, file: &SourceFile, global: &GlobalConfig, diags: &mut Vec<Diagnostic>) -> Settings {
    let mut connections = BTreeMap::new();
    for (name, conn) in &global.connections {
        let compiled = match conn.get_ref() {
            ConnectionFile::Salesforce(sf) => {
                Connection::Salesforce(check::salesforce_connection(root, file, name, conn.span(), sf, diags))
            }
            ConnectionFile::Postgres(pg) => Connection::Postgres { url: pg.url.clone() },
            ConnectionFile::Sqlite(s) => Connection::Sqlite { path: resolve(root, s.path.as_str()) },
            ConnectionFile::Files(f) => Connection::Files { dir: resolve(root, f.path.as_str()), format: f.format },
        };
        connections.insert(name.clone(), compiled);
    }
    let max_concurrent_runs = match &global.limits.max_concurrent_runs {
        Some(n) if !(1..=MAX_CONCURRENT_RUNS).contains(n.get_ref()) => {
            diags.push(at(
                file,
                n.span(),
                format!(
                    "`max_concurrent_runs` must be between 1 and {MAX_CONCURRENT_RUNS}, got {}; each run holds a Salesforce job and a target connection",
                    n.get_ref()
                ),
            ));
            1
        }
        Some(n) => *n.get_ref(),
        None => 4,
    };
    let smtp = global.smtp.as_ref().map(|smtp| check::smtp(file, smtp, diags));
    let alerts = check::alerts(file, global, smtp.is_some(), diags);
    let server = global
        .server
        .as_ref()
        .map(|s| ServerSettings {
            listen: s.listen.as_ref().map(|l| l.as_str().to_string()),
            trigger_token: s.trigger_token.clone(),
            public_url: s.public_url.as_ref().map(|u| u.as_str().to_string()).filter(|u| !u.is_empty()),
        })
        .unwrap_or_default();
    Settings {
        state_path: resolve(root, global.state.path.as_str()),
        server,
        max_concurrent_runs,
        smtp,
        alerts,
        connections,
    }
}

/// Compiles a job and its mapping from strings, for unit tests of later stages.
#[cfg(test)]
pub(crate) fn plan_for_tests(job: &str, mapping: &str) -> JobPlan {
    let connections = BTreeMap::from([
        (
            "sf".to_string(),
            Connection::Salesforce(SalesforceConnection {
                login_url: "http://127.0.0.1:9".into(),
                auth: AuthFlow::ClientCredentials,
                client_id: Secret::new("id"),
                client_secret: Some(Secret::new("secret")),
                username: None,
                private_key_file: None,
                refresh_token: None,
                api_version: "62.0".into(),
                max_concurrent_jobs: 1,
                min_api_remaining: 0,
                max_clock_skew: Duration::from_secs(86_400),
            }),
        ),
        ("wh".to_string(), Connection::Sqlite { path: "wh.db".into() }),
    ]);
    let settings = Settings {
        state_path: "state.db".into(),
        server: ServerSettings::default(),
        max_concurrent_runs: 1,
        smtp: None,
        alerts: AlertSettings { email: Vec::new(), on_failure: true, on_recovery: true, repeat_after: Duration::ZERO },
        connections,
    };
    let file = SourceFile { path: "jobs/test.toml".into(), text: job.to_string() };
    let mapping_file = SourceFile { path: "mappings/m.toml".into(), text: mapping.to_string() };
    let spec: JobFile = toml::from_str(job).expect("test job parses");
    let parsed: MappingFile = toml::from_str(mapping).expect("test mapping parses");
    let raw = RawJob { name: "test", file: &file, spec: &spec, mapping: Some((&mapping_file, &parsed)) };
    let mut diags = Vec::new();
    let plan = check::compile_job(&raw, &settings, &mut diags);
    assert!(diags.is_empty(), "test job is valid: {}", render(&diags));
    plan.expect("a valid job compiles")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_chars() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 9), (2, 3));
    }

    #[test]
    fn unknown_key_in_job_is_reported_with_position() {
        let file = SourceFile { path: "jobs/x.toml".into(), text: "descripton = \"typo\"\n".into() };
        let mut diags = Vec::new();
        assert!(parse::<JobFile>(&file, &mut diags).is_none());
        assert_eq!(diags.len(), 1);
        assert_eq!((diags[0].line, diags[0].col), (1, 1));
        assert!(diags[0].message.contains("descripton"), "{}", diags[0].message);
    }
}
