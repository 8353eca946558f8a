//! Configuration files: `nightjar.toml`, `jobs/*.toml`, `mappings/*.toml`.
//!
//! Loading parses every file and checks the whole set; every problem found
//! is reported at once as `file:line:col: message`, so a data engineer fixes
//! a batch of mistakes in one go instead of one per run.

mod interpolate;
mod model;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use polars::prelude::DataType;
use serde::de::DeserializeOwned;
use thiserror::Error;

pub use interpolate::{EnvString, InterpolationError, Secret, interpolate_with};
pub use model::*;

use crate::transform::{ColumnType, SqlExpr};

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

/// A job with everything it refers to resolved.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub file: SourceFile,
    pub spec: JobFile,
    pub mapping_file: SourceFile,
    pub mapping: MappingFile,
}

/// The whole configuration of one nightjar installation.
#[derive(Debug, Clone)]
pub struct Project {
    /// Directory of `nightjar.toml`; relative paths in the config resolve against it.
    pub root: PathBuf,
    pub config_file: PathBuf,
    pub global: GlobalConfig,
    pub jobs: BTreeMap<String, Job>,
}

impl Project {
    /// Loads `nightjar.toml` and the `jobs/` and `mappings/` beside it.
    pub fn load(config_file: &Path) -> Result<Project, ConfigError> {
        let root = match config_file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut diags = Vec::new();

        let global = match read(config_file) {
            Ok(file) => parse::<GlobalConfig>(&file, &mut diags).map(|g| (file, g)),
            Err(d) => {
                diags.push(d);
                None
            }
        };

        let mut mappings: BTreeMap<String, (SourceFile, MappingFile)> = BTreeMap::new();
        for path in toml_files(&root.join("mappings"), &mut diags) {
            let Ok(file) = read(&path).map_err(|d| diags.push(d)) else { continue };
            if let Some(m) = parse::<MappingFile>(&file, &mut diags) {
                mappings.insert(stem(&path), (file, m));
            }
        }

        let mut jobs = BTreeMap::new();
        for path in toml_files(&root.join("jobs"), &mut diags) {
            let Ok(file) = read(&path).map_err(|d| diags.push(d)) else { continue };
            let Some(spec) = parse::<JobFile>(&file, &mut diags) else { continue };
            let name = stem(&path);
            let mapping_name = spec.transform.mapping.get_ref();
            let Some((mapping_file, mapping)) = mappings.get(mapping_name) else {
                diags.push(at(
                    &file,
                    spec.transform.mapping.span(),
                    format!(
                        "mapping `{mapping_name}` not found; expected {}",
                        root.join("mappings").join(format!("{mapping_name}.toml")).display()
                    ),
                ));
                continue;
            };
            jobs.insert(
                name.clone(),
                Job { name, file, spec, mapping_file: mapping_file.clone(), mapping: mapping.clone() },
            );
        }

        let Some((global_file, global)) = global else {
            return Err(ConfigError::Invalid(diags));
        };
        for job in jobs.values() {
            check_job(job, &global, &mut diags);
        }
        check_connections(&global_file, &global, &mut diags);
        check_alerts(&global_file, &global, &jobs, &mut diags);
        if diags.is_empty() {
            Ok(Project { root, config_file: config_file.to_path_buf(), global, jobs })
        } else {
            Err(ConfigError::Invalid(diags))
        }
    }

    pub fn job(&self, name: &str) -> Result<&Job, ConfigError> {
        self.jobs.get(name).ok_or_else(|| ConfigError::UnknownJob(name.to_string()))
    }

    /// Resolves a path from the config relative to the config's directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() { p.to_path_buf() } else { self.root.join(p) }
    }

    pub fn connection(&self, name: &str) -> Option<&Connection> {
        self.global.connections.get(name).map(|c| c.get_ref())
    }
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

fn check_connections(file: &SourceFile, global: &GlobalConfig, diags: &mut Vec<Diagnostic>) {
    for (name, conn) in &global.connections {
        if let Connection::Salesforce(sf) = conn.get_ref() {
            let needs_secret = matches!(sf.auth, AuthFlow::ClientCredentials | AuthFlow::RefreshToken);
            if needs_secret && sf.client_secret.is_none() {
                diags.push(at(file, conn.span(), format!("connection `{name}`: this auth flow needs `client_secret`")));
            }
            if sf.auth == AuthFlow::JwtBearer && (sf.username.is_none() || sf.private_key_file.is_none()) {
                diags.push(at(
                    file,
                    conn.span(),
                    format!("connection `{name}`: `jwt_bearer` needs `username` and `private_key_file`"),
                ));
            }
            let v = sf.api_version.split_once('.');
            if !v.is_some_and(|(a, b)| {
                !a.is_empty() && !b.is_empty() && (a.to_owned() + b).bytes().all(|c| c.is_ascii_digit())
            }) {
                diags.push(at(
                    file,
                    conn.span(),
                    format!("connection `{name}`: api_version `{}` must look like \"62.0\"", sf.api_version),
                ));
            }
        }
    }
}

/// `[smtp]`, `[alerts]` and each job's `[alerts]`: addresses parse, and
/// whoever asks for email has an SMTP server to send it through.
fn check_alerts(file: &SourceFile, global: &GlobalConfig, jobs: &BTreeMap<String, Job>, diags: &mut Vec<Diagnostic>) {
    let check_address = |f: &SourceFile, a: &toml::Spanned<EnvString>, diags: &mut Vec<Diagnostic>| {
        if let Err(e) = a.get_ref().as_str().parse::<lettre::message::Mailbox>() {
            diags.push(at(
                f,
                a.span(),
                format!(
                    "`{}` is not an email address ({e}); write `name@example.com` or `Name <name@example.com>`",
                    a.get_ref()
                ),
            ));
        }
    };
    if let Some(smtp) = &global.smtp {
        check_address(file, &smtp.from, diags);
        if smtp.host.as_str().trim().is_empty() {
            diags.push(at(file, smtp.from.span(), "[smtp] `host` is empty".into()));
        }
        if let Some(user) = &smtp.username
            && smtp.password.is_none()
        {
            diags.push(at(
                file,
                user.span(),
                "[smtp] `username` is set but `password` is not; set both or neither".into(),
            ));
        }
    }
    let no_smtp = "an email address is set but nightjar.toml has no [smtp] section to send it through";
    for address in global.alerts.iter().flat_map(|a| &a.email) {
        check_address(file, address, diags);
        if global.smtp.is_none() {
            diags.push(at(file, address.span(), no_smtp.into()));
        }
    }
    for job in jobs.values() {
        for address in job.spec.alerts.iter().flat_map(|a| &a.email) {
            check_address(&job.file, address, diags);
            if global.smtp.is_none() {
                diags.push(at(&job.file, address.span(), no_smtp.into()));
            }
        }
    }
}

/// Cross-file checks for one job: connections exist and fit, and the mapping
/// only uses fields the job extracts.
fn check_job(job: &Job, global: &GlobalConfig, diags: &mut Vec<Diagnostic>) {
    let spec = &job.spec;
    let jf = &job.file;
    let mf = &job.mapping_file;

    let source_conn = spec.source.connection.get_ref();
    match global.connections.get(source_conn).map(|c| c.get_ref()) {
        None => diags.push(at(jf, spec.source.connection.span(), unknown_connection(source_conn, global))),
        Some(Connection::Salesforce(_)) => {}
        Some(other) => diags.push(at(
            jf,
            spec.source.connection.span(),
            format!(
                "connection `{source_conn}` is a {} connection; a source must be `kind = \"salesforce\"`",
                other.kind()
            ),
        )),
    }

    let target_conn = spec.target.connection.get_ref();
    match global.connections.get(target_conn).map(|c| c.get_ref()) {
        None => diags.push(at(jf, spec.target.connection.span(), unknown_connection(target_conn, global))),
        Some(Connection::Sqlite(_) | Connection::Postgres(_) | Connection::Files(_)) => {}
        Some(other) => diags.push(at(
            jf,
            spec.target.connection.span(),
            format!(
                "connection `{target_conn}` is a {} connection; a target must be `sqlite`, `postgres` or `files`",
                other.kind()
            ),
        )),
    }

    let fields: Vec<&str> = spec.source.fields.get_ref().iter().map(|f| f.get_ref().as_str()).collect();
    // Deletes are only seen through queryAll's IsDeleted flag.
    if spec.target.deletes != DeleteMode::Ignore {
        let has_flag = fields.iter().any(|f| f.eq_ignore_ascii_case("IsDeleted"));
        if !spec.source.include_deleted || !has_flag {
            diags.push(at(
                jf,
                spec.target.table.span(),
                format!(
                    "`deletes = \"{}\"` needs `include_deleted = true` and `IsDeleted` in `fields` under [source], or `deletes = \"ignore\"`",
                    if spec.target.deletes == DeleteMode::Soft { "soft" } else { "hard" }
                ),
            ));
        }
    }
    if fields.is_empty() {
        diags.push(at(
            jf,
            spec.source.fields.span(),
            "`fields` is empty; list the Salesforce fields to extract".into(),
        ));
    }
    let mut seen = HashSet::new();
    for f in spec.source.fields.get_ref() {
        if !seen.insert(f.get_ref().to_ascii_lowercase()) {
            diags.push(at(jf, f.span(), format!("field `{}` is listed twice", f.get_ref())));
        }
    }
    let field_hint = |name: &str| -> String {
        match fields.iter().find(|f| f.eq_ignore_ascii_case(name)) {
            Some(f) => format!(" (did you mean `{f}`? names must match the job's `fields` exactly)"),
            None => format!("; add it to `fields` in {}", jf.path.display()),
        }
    };
    if let Some(cursor) = &spec.source.cursor
        && !fields.contains(&cursor.get_ref().as_str())
    {
        diags.push(at(
            jf,
            cursor.span(),
            format!("cursor `{}` is not among the job's `fields`{}", cursor.get_ref(), field_hint(cursor.get_ref())),
        ));
    }
    if spec.transform.max_reject_ratio.is_nan() || !(0.0..=1.0).contains(&spec.transform.max_reject_ratio) {
        diags.push(at(jf, spec.transform.mapping.span(), "`max_reject_ratio` must be between 0 and 1".into()));
    }
    if spec.source.page_size == 0 {
        diags.push(at(jf, spec.source.object.span(), "`page_size` must be at least 1".into()));
    }

    let mapping = &job.mapping;
    // SQL is parsed and type-checked by Polars over the job's fields (all
    // text when extracted), so mistakes surface here, not mid-run.
    let check_sql = |what: &str, sql: &toml::Spanned<String>, diags: &mut Vec<Diagnostic>| -> Option<DataType> {
        let parsed = match SqlExpr::parse(sql.get_ref()) {
            Ok(parsed) => parsed,
            Err(e) => {
                diags.push(at(mf, sql.span(), format!("{what}: the SQL does not parse: {e}")));
                return None;
            }
        };
        let mut all_known = true;
        for column in &parsed.columns {
            if !fields.contains(&column.as_str()) {
                all_known = false;
                diags.push(at(
                    mf,
                    sql.span(),
                    format!(
                        "{what}: the SQL reads `{column}`, which is not among the fields of job `{}`{}",
                        job.name,
                        field_hint(column)
                    ),
                ));
            }
        }
        if !all_known {
            return None;
        }
        match parsed.output_type(&fields) {
            Ok(ty) => Some(ty),
            Err(e) => {
                diags.push(at(mf, sql.span(), format!("{what}: the SQL cannot be evaluated over text fields: {e}")));
                None
            }
        }
    };
    if let Some(filter) = &mapping.filter
        && let Some(ty) = check_sql("`filter`", filter, diags)
        && ty != DataType::Boolean
    {
        diags.push(at(
            mf,
            filter.span(),
            format!(
                "`filter` must be a condition (true or false), but it produces {ty}; e.g. `Industry <> 'Internal'`"
            ),
        ));
    }
    if mapping.columns.is_empty() {
        diags.push(Diagnostic {
            file: mf.path.clone(),
            line: 1,
            col: 1,
            message: "the mapping has no [[column]]; map at least the key column".into(),
        });
    }
    let mut names = HashSet::new();
    for col in &mapping.columns {
        let name = col.name.get_ref();
        if !names.insert(name.as_str()) {
            diags.push(at(
                mf,
                col.name.span(),
                format!("column `{name}` is defined twice; target column names must be unique, rename one"),
            ));
        }
        if let Some(sql) = &col.sql {
            if col.from.is_some() {
                diags.push(at(
                    mf,
                    sql.span(),
                    format!("column `{name}` has both `from` and `sql`; keep one (`sql` may read the field itself)"),
                ));
            }
            check_sql(&format!("column `{name}`"), sql, diags);
        }
        match &col.from {
            Some(from) if !fields.contains(&from.get_ref().as_str()) => diags.push(at(
                mf,
                from.span(),
                format!(
                    "column `{name}`: `from = \"{}\"` is not among the fields of job `{}`{}",
                    from.get_ref(),
                    job.name,
                    field_hint(from.get_ref())
                ),
            )),
            Some(_) => {}
            None if col.sql.is_none() => diags.push(at(
                mf,
                col.name.span(),
                format!("column `{name}` needs `from` (a Salesforce field) or `sql` (an expression over fields)"),
            )),
            None => {}
        }
        if let Some(ty) = &col.type_name
            && let Err(msg) = ColumnType::parse(ty.get_ref())
        {
            diags.push(at(mf, ty.span(), format!("column `{name}`: {msg}")));
        }
    }
    let key = &spec.target.key;
    if key.get_ref().is_empty() {
        diags.push(at(jf, key.span(), "`key` is empty; name the target column(s) that identify a row".into()));
    }
    for k in key.get_ref() {
        match mapping.columns.iter().find(|c| c.name.get_ref() == k) {
            None => diags.push(at(
                jf,
                key.span(),
                format!(
                    "key column `{k}` is not a column of mapping `{}`; add a [[column]] named `{k}` there or change `key`",
                    spec.transform.mapping.get_ref()
                ),
            )),
            Some(c) if !c.required => diags.push(at(
                mf,
                c.name.span(),
                format!(
                    "column `{k}` is part of the target key of job `{}`, so it must be `required = true`",
                    job.name
                ),
            )),
            Some(_) => {}
        }
    }
}

fn unknown_connection(name: &str, global: &GlobalConfig) -> String {
    let known: Vec<&str> = global.connections.keys().map(String::as_str).collect();
    format!(
        "unknown connection `{name}`; nightjar.toml defines: {}",
        if known.is_empty() { "none".into() } else { known.join(", ") }
    )
}

/// Parses a job and a mapping from strings, for unit tests of later stages.
#[cfg(test)]
pub(crate) fn parse_job_and_mapping_for_tests(job: &str, mapping: &str) -> (JobFile, MappingFile) {
    (toml::from_str(job).expect("test job parses"), toml::from_str(mapping).expect("test mapping parses"))
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
