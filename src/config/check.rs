//! Checking and compiling: each file's values become typed plan values, and
//! whatever would fail every run becomes a diagnostic at its position.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use polars::prelude::DataType;
use toml::Spanned;

use super::identifiers;
use super::model::{GlobalConfig, MappingFile, SalesforceConnectionFile, SmtpConfig};
use super::{
    AlertOn, AlertSettings, AuthFlow, ColumnRule, ColumnSource, Connection, DeleteMode, Diagnostic, JobPlan,
    JobPositions, MappingPlan, Position, RawJob, RetryPlan, SalesforceConnection, Schedule, Settings, SmtpSettings,
    SourceFile, SourcePlan, TargetKind, TargetPlan, at, duration_in, resolve,
};
use crate::schema::{ColumnType, RESERVED_COLUMNS, SqlExpr};

const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(86_400);

pub(super) fn salesforce_connection(
    root: &Path,
    file: &SourceFile,
    name: &str,
    span: Range<usize>,
    sf: &SalesforceConnectionFile,
    diags: &mut Vec<Diagnostic>,
) -> SalesforceConnection {
    let mut problem = |message: String| diags.push(at(file, span.clone(), format!("connection `{name}`: {message}")));
    let needs_secret = matches!(sf.auth, AuthFlow::ClientCredentials | AuthFlow::RefreshToken);
    if needs_secret && sf.client_secret.is_none() {
        problem("this auth flow needs `client_secret`".into());
    }
    if sf.auth == AuthFlow::JwtBearer && (sf.username.is_none() || sf.private_key_file.is_none()) {
        problem("`jwt_bearer` needs `username` and `private_key_file`".into());
    }
    let v = sf.api_version.split_once('.');
    if !v.is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && (a.to_owned() + b).bytes().all(|c| c.is_ascii_digit()))
    {
        problem(format!("api_version `{}` must look like \"62.0\"", sf.api_version));
    }
    let login_url = sf.login_url.as_str().trim().trim_end_matches('/').to_string();
    match reqwest::Url::parse(&login_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
        _ => problem(format!(
            "login_url `{login_url}` is not an http(s) URL; write e.g. \"https://login.salesforce.com\" or your My Domain URL"
        )),
    }
    if !(1..=100).contains(&sf.max_concurrent_jobs) {
        problem(format!(
            "`max_concurrent_jobs` must be between 1 and 100 (Salesforce runs at most 100 bulk jobs at once), got {}",
            sf.max_concurrent_jobs
        ));
    }
    let max_clock_skew =
        duration_in(file, &sf.max_clock_skew, "max_clock_skew", DAY, (Duration::from_secs(60), 30 * DAY), diags);
    SalesforceConnection {
        login_url,
        auth: sf.auth,
        client_id: sf.client_id.clone(),
        client_secret: sf.client_secret.clone(),
        username: sf.username.as_ref().map(|u| u.as_str().to_string()),
        private_key_file: sf.private_key_file.as_ref().map(|p| resolve(root, p.as_str())),
        refresh_token: sf.refresh_token.clone(),
        api_version: sf.api_version.clone(),
        max_concurrent_jobs: sf.max_concurrent_jobs.max(1),
        min_api_remaining: sf.min_api_remaining,
        max_clock_skew,
    }
}

fn check_address(file: &SourceFile, address: &Spanned<super::EnvString>, diags: &mut Vec<Diagnostic>) -> String {
    let text = address.get_ref().as_str().trim().to_string();
    if let Err(e) = text.parse::<lettre::message::Mailbox>() {
        diags.push(at(
            file,
            address.span(),
            format!(
                "`{}` is not an email address ({e}); write `name@example.com` or `Name <name@example.com>`",
                address.get_ref()
            ),
        ));
    }
    text
}

pub(super) fn smtp(file: &SourceFile, smtp: &SmtpConfig, diags: &mut Vec<Diagnostic>) -> SmtpSettings {
    let from = check_address(file, &smtp.from, diags);
    if smtp.host.as_str().trim().is_empty() {
        diags.push(at(file, smtp.from.span(), "[smtp] `host` is empty".into()));
    }
    if let Some(user) = &smtp.username
        && smtp.password.is_none()
    {
        diags.push(at(file, user.span(), "[smtp] `username` is set but `password` is not; set both or neither".into()));
    }
    if smtp.port == Some(0) {
        diags.push(at(file, smtp.from.span(), "[smtp] `port` must not be 0".into()));
    }
    let timeout =
        duration_in(file, &smtp.timeout, "timeout", Duration::from_secs(30), (SECOND, Duration::from_secs(600)), diags);
    SmtpSettings {
        host: smtp.host.as_str().trim().to_string(),
        port: smtp.port.unwrap_or_else(|| smtp.security.default_port()),
        security: smtp.security,
        username: smtp.username.as_ref().map(|u| u.get_ref().as_str().to_string()),
        password: smtp.password.clone(),
        from,
        timeout,
    }
}

pub(super) fn alerts(
    file: &SourceFile,
    global: &GlobalConfig,
    have_smtp: bool,
    diags: &mut Vec<Diagnostic>,
) -> AlertSettings {
    let Some(alerts) = &global.alerts else {
        return AlertSettings {
            email: Vec::new(),
            on_failure: true,
            on_recovery: true,
            repeat_after: Duration::from_secs(6 * 3600),
        };
    };
    let mut email = Vec::new();
    for address in &alerts.email {
        email.push(check_address(file, address, diags));
        if !have_smtp {
            diags.push(at(file, address.span(), NO_SMTP.into()));
        }
    }
    let repeat_after = duration_in(
        file,
        &alerts.repeat_after,
        "repeat_after",
        Duration::from_secs(6 * 3600),
        (Duration::ZERO, 30 * DAY),
        diags,
    );
    AlertSettings {
        email,
        on_failure: alerts.on.contains(&AlertOn::Failure),
        on_recovery: alerts.on.contains(&AlertOn::Recovery),
        repeat_after,
    }
}

const NO_SMTP: &str = "an email address is set but nightjar.toml has no [smtp] section to send it through";

fn unknown_connection(name: &str, settings: &Settings) -> String {
    let known: Vec<&str> = settings.connections.keys().map(String::as_str).collect();
    format!(
        "unknown connection `{name}`; nightjar.toml defines: {}",
        if known.is_empty() { "none".into() } else { known.join(", ") }
    )
}

/// Checks one job with its mapping against the settings, and compiles it.
/// Every problem is pushed to `diags`; `None` when there was any.
pub(super) fn compile_job(raw: &RawJob<'_>, settings: &Settings, diags: &mut Vec<Diagnostic>) -> Option<JobPlan> {
    let before = diags.len();
    let spec = raw.spec;
    let jf = raw.file;
    // A job whose mapping is missing or broken still has its own parts
    // checked, so one `validate` reports them too.
    let no_mapping = (SourceFile { path: Default::default(), text: String::new() }, MappingFile::default());
    let (mf, mapping) = raw.mapping.unwrap_or((&no_mapping.0, &no_mapping.1));
    let have_mapping = raw.mapping.is_some();

    // ---- when
    let cron = spec.schedule.as_ref().and_then(|s| {
        Schedule::parse_cron(s.get_ref()).map_err(|e| diags.push(at(jf, s.span(), e))).ok().map(|c| (c, s.get_ref()))
    });
    let tz = match &spec.timezone {
        Some(tz) => Schedule::parse_timezone(tz.get_ref()).map_err(|e| diags.push(at(jf, tz.span(), e))).ok(),
        None => Some(chrono_tz::Tz::UTC),
    };
    let schedule = match (cron, tz) {
        (Some((cron, expr)), Some(tz)) => {
            let schedule = Schedule::new(cron, tz, expr);
            if schedule.next_after(chrono::Utc::now()).is_none()
                && let Some(s) = &spec.schedule
            {
                diags.push(at(jf, s.span(), format!("schedule `{expr}` never fires; check the day and month fields")));
            }
            Some(schedule)
        }
        _ => None,
    };
    let timeout = spec
        .timeout
        .as_ref()
        .map(|t| duration_in(jf, &Some(t.clone()), "timeout", Duration::ZERO, (SECOND, 7 * DAY), diags));
    let retries = spec.retries.as_ref().map(|r| {
        let attempts = &r.get_ref().attempts;
        if !(1..=100).contains(attempts.get_ref()) {
            diags.push(at(
                jf,
                attempts.span(),
                "`retries.attempts` counts every attempt, the first included: 1 to 100".into(),
            ));
        }
        let backoff = duration_in(
            jf,
            &Some(r.get_ref().backoff.clone()),
            "retries.backoff",
            Duration::ZERO,
            (Duration::from_millis(1), DAY),
            diags,
        );
        RetryPlan { attempts: (*attempts.get_ref()).max(1), backoff }
    });

    // ---- source
    let source = &spec.source;
    let source_conn = source.connection.get_ref();
    match settings.connections.get(source_conn) {
        None => diags.push(at(jf, source.connection.span(), unknown_connection(source_conn, settings))),
        Some(Connection::Salesforce(_)) => {}
        Some(other) => diags.push(at(
            jf,
            source.connection.span(),
            format!(
                "connection `{source_conn}` is a {} connection; a source must be `kind = \"salesforce\"`",
                other.kind()
            ),
        )),
    }
    // Identifiers go into the SOQL as written: checked against Salesforce's
    // rules, so nothing but a name can reach the query.
    if let Err(problem) = identifiers::salesforce_name(source.object.get_ref()) {
        diags.push(at(
            jf,
            source.object.span(),
            format!("object `{}` is not a Salesforce API name: {problem}", source.object.get_ref().escape_debug()),
        ));
    }
    for f in source.fields.get_ref() {
        if let Err(problem) = identifiers::salesforce_field_path(f.get_ref()) {
            diags.push(at(
                jf,
                f.span(),
                format!(
                    "field `{}` is not a Salesforce field name or relationship path (`Owner.Email`): {problem}",
                    f.get_ref().escape_debug()
                ),
            ));
        }
    }
    if let Some(condition) = &source.where_clause
        && !condition.get_ref().trim().is_empty()
        && let Err(problem) = super::soql::check_condition(condition.get_ref())
    {
        diags.push(at(jf, condition.span(), format!("`where` is not one SOQL condition: {problem}")));
    }
    let fields: Vec<&str> = source.fields.get_ref().iter().map(|f| f.get_ref().as_str()).collect();
    if fields.is_empty() {
        diags.push(at(jf, source.fields.span(), "`fields` is empty; list the Salesforce fields to extract".into()));
    }
    let mut seen = HashSet::new();
    for f in source.fields.get_ref() {
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
    if let Some(cursor) = &source.cursor
        && let Err(problem) = identifiers::salesforce_field_path(cursor.get_ref())
    {
        diags.push(at(
            jf,
            cursor.span(),
            format!("cursor `{}` is not a Salesforce field name: {problem}", cursor.get_ref().escape_debug()),
        ));
    } else if let Some(cursor) = &source.cursor
        && !fields.contains(&cursor.get_ref().as_str())
    {
        diags.push(at(
            jf,
            cursor.span(),
            format!("cursor `{}` is not among the job's `fields`{}", cursor.get_ref(), field_hint(cursor.get_ref())),
        ));
    }
    let lookback = duration_in(jf, &source.lookback, "lookback", Duration::ZERO, (Duration::ZERO, 30 * DAY), diags);
    let settle = duration_in(jf, &source.settle, "settle", Duration::from_secs(120), (Duration::ZERO, DAY), diags);
    let page_size = match &source.page_size {
        Some(p) if !(1..=1_000_000).contains(p.get_ref()) => {
            diags.push(at(jf, p.span(), "`page_size` must be between 1 and 1000000 rows".into()));
            1
        }
        Some(p) => *p.get_ref(),
        None => 10_000,
    };
    let target = &spec.target;
    // Deletes are only seen through queryAll's IsDeleted flag.
    if target.deletes != DeleteMode::Ignore {
        let has_flag = fields.iter().any(|f| f.eq_ignore_ascii_case("IsDeleted"));
        if !source.include_deleted || !has_flag {
            diags.push(at(
                jf,
                target.table.span(),
                format!(
                    "`deletes = \"{}\"` needs `include_deleted = true` and `IsDeleted` in `fields` under [source], or `deletes = \"ignore\"`",
                    if target.deletes == DeleteMode::Soft { "soft" } else { "hard" }
                ),
            ));
        }
    }
    let max_reject_ratio = match &spec.transform.max_reject_ratio {
        Some(r) if r.get_ref().is_nan() || !(0.0..=1.0).contains(r.get_ref()) => {
            diags.push(at(jf, r.span(), "`max_reject_ratio` must be between 0 and 1".into()));
            0.0
        }
        Some(r) => *r.get_ref(),
        None => 0.0,
    };

    // ---- mapping
    // SQL is parsed and checked by Polars over the job's fields (all text
    // when extracted), so mistakes surface here, not mid-run.
    let check_sql = |what: &str, sql: &Spanned<String>, diags: &mut Vec<Diagnostic>| -> Option<(SqlExpr, DataType)> {
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
                        raw.name,
                        field_hint(column)
                    ),
                ));
            }
        }
        if !all_known {
            return None;
        }
        match parsed.check(&fields) {
            Ok(ty) => Some((parsed, ty)),
            Err(e) => {
                diags.push(at(mf, sql.span(), format!("{what}: the SQL cannot be evaluated over text fields: {e}")));
                None
            }
        }
    };
    let filter = mapping.filter.as_ref().and_then(|filter| {
        let (expr, ty) = check_sql("`filter`", filter, diags)?;
        if ty != DataType::Boolean {
            diags.push(at(
                mf,
                filter.span(),
                format!(
                    "`filter` must be a condition (true or false), but it produces {ty}; e.g. `Industry <> 'Internal'`"
                ),
            ));
        }
        Some(expr)
    });
    if have_mapping && mapping.columns.is_empty() {
        diags.push(Diagnostic {
            file: mf.path.clone(),
            line: 1,
            col: 1,
            message: "the mapping has no [[column]]; map at least the key column".into(),
        });
    }
    let mut names: Vec<(String, Range<usize>)> = Vec::new();
    let mut columns = Vec::with_capacity(mapping.columns.len());
    for col in &mapping.columns {
        let name = col.name.get_ref();
        if let Some(problem) = column_name_problem(name) {
            diags.push(at(mf, col.name.span(), format!("column `{}`: {problem}", name.escape_debug())));
        }
        if let Some((other, _)) = names.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            let message = if other == name {
                format!("column `{name}` is defined twice; target column names must be unique, rename one")
            } else {
                format!(
                    "column `{name}` differs from column `{other}` only in case; SQLite, Postgres unquoted names and many tools treat them as one column, rename one"
                )
            };
            diags.push(at(mf, col.name.span(), message));
        }
        names.push((name.clone(), col.name.span()));
        let source = match (&col.from, &col.sql) {
            (Some(_), Some(sql)) => {
                diags.push(at(
                    mf,
                    sql.span(),
                    format!("column `{name}` has both `from` and `sql`; keep one (`sql` may read the field itself)"),
                ));
                None
            }
            (Some(from), None) if !fields.contains(&from.get_ref().as_str()) => {
                diags.push(at(
                    mf,
                    from.span(),
                    format!(
                        "column `{name}`: `from = \"{}\"` is not among the fields of job `{}`{}",
                        from.get_ref(),
                        raw.name,
                        field_hint(from.get_ref())
                    ),
                ));
                None
            }
            (Some(from), None) => Some(ColumnSource::Field(from.get_ref().clone())),
            (None, Some(sql)) => check_sql(&format!("column `{name}`"), sql, diags).map(|(e, _)| ColumnSource::Sql(e)),
            (None, None) => {
                diags.push(at(
                    mf,
                    col.name.span(),
                    format!("column `{name}` needs `from` (a Salesforce field) or `sql` (an expression over fields)"),
                ));
                None
            }
        };
        let ty = match &col.type_name {
            Some(t) => ColumnType::parse(t.get_ref())
                .map_err(|msg| diags.push(at(mf, t.span(), format!("column `{name}`: {msg}"))))
                .ok(),
            None => Some(ColumnType::Text),
        };
        if let (Some(source), Some(ty)) = (source, ty) {
            columns.push(ColumnRule {
                name: name.clone(),
                source,
                ty,
                required: col.required,
                trim: col.trim,
                values: col.values.clone(),
                default: col.default.clone(),
            });
        }
    }

    // ---- target
    let key: Vec<String> = target.key.get_ref().iter().map(|k| k.get_ref().clone()).collect();
    if key.is_empty() {
        diags.push(at(jf, target.key.span(), "`key` is empty; name the target column(s) that identify a row".into()));
    }
    for k in target.key.get_ref().iter().filter(|_| have_mapping) {
        match mapping.columns.iter().find(|c| c.name.get_ref() == k.get_ref()) {
            None => diags.push(at(
                jf,
                k.span(),
                format!(
                    "key column `{k}` is not a column of mapping `{}`; add a [[column]] named `{k}` there or change `key`",
                    spec.transform.mapping.get_ref(),
                    k = k.get_ref()
                ),
            )),
            Some(c) if !c.required => diags.push(at(
                mf,
                c.name.span(),
                format!(
                    "column `{}` is part of the target key of job `{}`, so it must be `required = true`",
                    k.get_ref(),
                    raw.name
                ),
            )),
            Some(_) => {}
        }
    }
    let table = target.table.get_ref();
    let target_conn = target.connection.get_ref();
    let kind = match settings.connections.get(target_conn) {
        None => {
            diags.push(at(jf, target.connection.span(), unknown_connection(target_conn, settings)));
            None
        }
        Some(Connection::Sqlite { path }) => {
            if let Err(problem) = identifiers::sqlite_table(table) {
                diags.push(at(jf, target.table.span(), format!("table `{}`: {problem}", table.escape_debug())));
            }
            Some(TargetKind::Sqlite { path: path.clone(), table: table.clone() })
        }
        Some(Connection::Postgres { url }) => {
            let (schema, name) = match table.split_once('.') {
                Some((s, t)) => (Some(s.to_string()), t.to_string()),
                None => (None, table.clone()),
            };
            for (what, part) in [("schema", schema.as_deref()), ("table", Some(name.as_str()))] {
                if let Some(Err(problem)) = part.map(identifiers::postgres_identifier) {
                    diags.push(at(
                        jf,
                        target.table.span(),
                        format!(
                            "{what} `{}` of `table = \"{}\"`: {problem}",
                            part.unwrap_or("").escape_debug(),
                            table.escape_debug()
                        ),
                    ));
                }
            }
            for col in &mapping.columns {
                let name = col.name.get_ref();
                // Other problems of the name are reported for every target.
                if name.len() > identifiers::POSTGRES_MAX_IDENTIFIER
                    && let Err(problem) = identifiers::postgres_identifier(name)
                {
                    diags.push(at(
                        mf,
                        col.name.span(),
                        format!("column `{name}`, which job `{}` loads into Postgres: {problem}", raw.name),
                    ));
                }
            }
            Some(TargetKind::Postgres { url: url.clone(), schema, table: name })
        }
        Some(Connection::Files { dir, format }) => {
            if let Err(problem) = identifiers::file_name(table) {
                diags.push(at(
                    jf,
                    target.table.span(),
                    format!("table `{}` names the snapshot file in {}: {problem}", table.escape_debug(), dir.display()),
                ));
            }
            let partition_by: Vec<String> = target.partition_by.iter().map(|p| p.get_ref().clone()).collect();
            for p in &target.partition_by {
                if let Err(problem) = identifiers::file_name(p.get_ref()) {
                    diags.push(at(
                        jf,
                        p.span(),
                        format!("`partition_by` column `{}`: {problem}", p.get_ref().escape_debug()),
                    ));
                } else if have_mapping && !mapping.columns.iter().any(|c| c.name.get_ref() == p.get_ref()) {
                    diags.push(at(
                        jf,
                        p.span(),
                        format!("`partition_by` column `{}` is not a column of the mapping", p.get_ref()),
                    ));
                }
            }
            Some(TargetKind::Files { dir: dir.clone(), format: *format, table: table.clone(), partition_by })
        }
        Some(other) => {
            diags.push(at(
                jf,
                target.connection.span(),
                format!(
                    "connection `{target_conn}` is a {} connection; a target must be `sqlite`, `postgres` or `files`",
                    other.kind()
                ),
            ));
            None
        }
    };
    if !target.partition_by.is_empty() && !matches!(kind, Some(TargetKind::Files { .. }) | None) {
        diags.push(at(
            jf,
            target.partition_by[0].span(),
            "`partition_by` is for files targets; remove it or load into a files connection".into(),
        ));
    }

    let mut alert_emails = Vec::new();
    for address in spec.alerts.iter().flat_map(|a| &a.email) {
        alert_emails.push(check_address(jf, address, diags));
        if settings.smtp.is_none() {
            diags.push(at(jf, address.span(), NO_SMTP.into()));
        }
    }

    if diags.len() > before {
        return None;
    }
    Some(JobPlan {
        name: raw.name.to_string(),
        file: jf.path.clone(),
        description: spec.description.clone(),
        schedule,
        enabled: spec.enabled,
        timeout,
        retries,
        catch_up: spec.catch_up,
        source: SourcePlan {
            connection: source_conn.clone(),
            object: source.object.get_ref().clone(),
            fields: fields.iter().map(|f| f.to_string()).collect(),
            condition: source.where_clause.as_ref().map(|w| w.get_ref().trim().to_string()).filter(|w| !w.is_empty()),
            cursor: source.cursor.as_ref().map(|c| c.get_ref().clone()),
            lookback,
            settle,
            include_deleted: source.include_deleted,
            page_size,
        },
        mapping: MappingPlan { name: spec.transform.mapping.get_ref().clone(), filter, columns },
        max_reject_ratio,
        target: TargetPlan {
            connection: target_conn.clone(),
            kind: kind?,
            key,
            deletes: target.deletes,
            create: target.create,
            schema_evolution: target.schema_evolution,
        },
        alert_emails,
        positions: JobPositions {
            object: position(jf, source.object.span()),
            fields: source.fields.get_ref().iter().map(|f| position(jf, f.span())).collect(),
        },
    })
}

fn position(file: &SourceFile, span: Range<usize>) -> Position {
    let d = at(file, span, String::new());
    Position { line: d.line, col: d.col }
}

/// What is wrong with a target column name, if anything.
fn column_name_problem(name: &str) -> Option<String> {
    if let Err(problem) = identifiers::printable_name(name) {
        return Some(problem);
    }
    if RESERVED_COLUMNS.iter().any(|r| r.eq_ignore_ascii_case(name))
        || name.to_ascii_lowercase().starts_with("_nightjar")
    {
        return Some(format!(
            "`{name}` is a name nightjar writes itself ({}); rename the column",
            RESERVED_COLUMNS.join(", ")
        ));
    }
    None
}
