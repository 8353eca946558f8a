//! `nightjar validate` as a user meets it: one broken thing per case, the
//! whole message checked against a golden file (`tests/golden/validate/`).
//! Every check runs before any network call: the project points at a
//! Salesforce that is not there. `NIGHTJAR_BLESS=1` rewrites the files.

use std::path::Path;
use std::process::Command;

/// One edit: (file, text to replace, replacement).
type Edit = (&'static str, &'static str, &'static str);

const SQL_COLUMN: &str = "sql = \"\\\"BillingCity\\\" || ', ' || \\\"BillingCountry\\\"\"";
const FILTER: &str = "filter = \"Name NOT LIKE 'Test %'\"";
const TARGET_LOCAL: &str = "connection = \"local\"";
const LOCAL_CONNECTION: &str = "[connections.local]";

/// (case, edits): one class of mistake per case; a case with several edits
/// also proves that every problem is reported in one pass.
const CASES: &[(&str, &[Edit])] = &[
    ("from-not-a-field", &[("mappings/accounts.toml", "from = \"Rating\"", "from = \"Ratings\"")]),
    (
        "sql-reads-unknown-field",
        &[("mappings/accounts.toml", SQL_COLUMN, "sql = \"\\\"BillingCity\\\" || ', ' || \\\"ShippingCountry\\\"\"")],
    ),
    ("sql-does-not-parse", &[("mappings/accounts.toml", SQL_COLUMN, "sql = \"upper(\\\"BillingCity\\\"\"")]),
    ("filter-reads-unknown-field", &[("mappings/accounts.toml", FILTER, "filter = \"Segment <> 'Test'\"")]),
    ("filter-does-not-parse", &[("mappings/accounts.toml", FILTER, "filter = \"Name NOT LIKE\"")]),
    ("filter-not-a-condition", &[("mappings/accounts.toml", FILTER, "filter = \"upper(Name)\"")]),
    ("unknown-type", &[("mappings/accounts.toml", "type = \"decimal(5,2)\"", "type = \"varchar(5)\"")]),
    ("duplicate-column", &[("mappings/accounts.toml", "name = \"rating\"", "name = \"phone\"")]),
    (
        "key-not-required",
        &[(
            "mappings/accounts.toml",
            "name = \"sf_id\"\nfrom = \"Id\"\ntype = \"text\"\nrequired = true",
            "name = \"sf_id\"\nfrom = \"Id\"\ntype = \"text\"",
        )],
    ),
    ("key-not-a-column", &[("jobs/accounts.toml", "key = [\"sf_id\"]", "key = [\"account_id\"]")]),
    ("cursor-not-a-field", &[("jobs/accounts.toml", "cursor = \"SystemModstamp\"", "cursor = \"LastModifiedDate\"")]),
    // ---- target column names (issue 13)
    (
        "column-name-reserved",
        &[
            ("mappings/accounts.toml", "name = \"rating\"", "name = \"_nightjar_run_id\""),
            ("mappings/accounts.toml", "name = \"website\"", "name = \"_DELETED\""),
        ],
    ),
    ("column-name-case-collision", &[("mappings/accounts.toml", "name = \"rating\"", "name = \"Phone\"")]),
    (
        "column-name-empty-or-control",
        &[
            ("mappings/accounts.toml", "name = \"rating\"", "name = \"\""),
            ("mappings/accounts.toml", "name = \"website\"", "name = \"web\\u0000site\""),
            ("mappings/accounts.toml", "name = \"description\"", "name = \"desc\\nription\""),
        ],
    ),
    (
        "postgres-identifier-too-long",
        &[
            (
                "nightjar.toml",
                LOCAL_CONNECTION,
                "[connections.pg]\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:9/test\"\n\n[connections.local]",
            ),
            ("jobs/accounts.toml", TARGET_LOCAL, "connection = \"pg\""),
            (
                "jobs/accounts.toml",
                "table = \"account\"",
                "table = \"warehouse.accounts_extracted_from_salesforce_every_night_by_nightjar_version_2\"",
            ),
            (
                "mappings/accounts.toml",
                "name = \"billing_postal_code\"",
                "name = \"billing_postal_code_of_the_account_as_entered_by_sales_operations_team\"",
            ),
        ],
    ),
    ("sqlite-table-reserved", &[("jobs/accounts.toml", "table = \"account\"", "table = \"sqlite_account\"")]),
    (
        "files-table-escapes-directory",
        &[
            (
                "nightjar.toml",
                LOCAL_CONNECTION,
                "[connections.lake]\nkind = \"files\"\npath = \"lake\"\nformat = \"parquet\"\n\n[connections.local]",
            ),
            ("jobs/accounts.toml", TARGET_LOCAL, "connection = \"lake\""),
            ("jobs/accounts.toml", "table = \"account\"", "table = \"../../etc/account\""),
        ],
    ),
    (
        "files-partition-not-a-file-name",
        &[
            (
                "nightjar.toml",
                LOCAL_CONNECTION,
                "[connections.lake]\nkind = \"files\"\npath = \"lake\"\nformat = \"csv\"\n\n[connections.local]",
            ),
            ("jobs/accounts.toml", TARGET_LOCAL, "connection = \"lake\""),
            ("jobs/accounts.toml", "table = \"account\"", "table = \".account\""),
            ("jobs/accounts.toml", "create = true", "create = true\npartition_by = [\"..\"]"),
        ],
    ),
    // ---- SOQL
    (
        "where-escapes-its-parentheses",
        &[(
            "jobs/accounts.toml",
            "lookback = \"10m\"",
            "where = \"IsDeleted = false) OR (Id != null\"\nlookback = \"10m\"",
        )],
    ),
    (
        "where-not-a-condition",
        &[(
            "jobs/accounts.toml",
            "lookback = \"10m\"",
            "where = \"Type = 'Customer' AND Industry = 'Media' OR Rating = Hot\"\nlookback = \"10m\"",
        )],
    ),
    (
        "soql-identifiers",
        &[
            ("jobs/accounts.toml", "object = \"Account\"", "object = \"Account WHERE Name != null\""),
            (
                "jobs/accounts.toml",
                "\"IsDeleted\",\n]",
                "\"IsDeleted\", \"Parent__c.Name\", \"Bad__Name\", \"Owner.Email)\",\n]",
            ),
            ("jobs/accounts.toml", "cursor = \"SystemModstamp\"", "cursor = \"SystemModstamp, Id\""),
        ],
    ),
    // ---- when
    (
        "schedule-and-timezone",
        &[
            ("jobs/accounts.toml", "schedule = \"0 30 2 * * *\"", "schedule = \"30 2 * * *\""),
            ("jobs/accounts.toml", "timezone = \"UTC\"", "timezone = \"Europe/Bonn\""),
        ],
    ),
    (
        "schedule-never-fires-on-a-disabled-job",
        &[
            ("jobs/accounts.toml", "schedule = \"0 30 2 * * *\"", "schedule = \"0 30 2 30 2 *\""),
            ("jobs/accounts.toml", "enabled = true", "enabled = false"),
        ],
    ),
    // ---- zero and absurd values
    (
        "zero-and-absurd-values",
        &[
            ("nightjar.toml", LOCAL_CONNECTION, "[limits]\nmax_concurrent_runs = 0\n\n[connections.local]"),
            (
                "jobs/accounts.toml",
                "enabled = true",
                "enabled = true\ntimeout = \"0s\"\nretries = { attempts = 0, backoff = \"1s\" }",
            ),
            ("jobs/accounts.toml", "page_size = 1000", "page_size = 0"),
            ("jobs/accounts.toml", "settle = \"2m\"", "settle = \"400days\""),
        ],
    ),
    ("duration-overflows", &[("jobs/accounts.toml", "lookback = \"10m\"", "lookback = \"99999999999999999999999s\"")]),
    ("page-size-absurd", &[("jobs/accounts.toml", "page_size = 1000", "page_size = 50000000")]),
    (
        "login-url-not-http",
        &[(
            "nightjar.toml",
            "login_url = \"${NIGHTJAR_SANDBOX_URL:-http://127.0.0.1:8178}\"",
            "login_url = \"login.salesforce.com\"",
        )],
    ),
    // ---- SQL that would fail every page
    ("sql-type-error", &[("mappings/accounts.toml", SQL_COLUMN, "sql = \"\\\"Name\\\" + 1\"")]),
    (
        "sql-fails-on-every-row",
        &[
            ("mappings/accounts.toml", SQL_COLUMN, "sql = \"\\\"Name\\\" || CAST('n/a' AS INTEGER)\""),
            ("mappings/accounts.toml", FILTER, "filter = \"CAST(\\\"IsActive__c\\\" AS BOOLEAN)\""),
        ],
    ),
    (
        "sql-aggregate-or-window",
        &[
            ("mappings/accounts.toml", SQL_COLUMN, "sql = \"max(\\\"BillingCity\\\")\""),
            ("mappings/accounts.toml", FILTER, "filter = \"count(Name) OVER (PARTITION BY Type) > 1\""),
        ],
    ),
];

fn copy_examples(to: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("nightjar.toml"), to.join("nightjar.toml")).unwrap();
    for sub in ["jobs", "mappings"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for entry in std::fs::read_dir(root.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, to.join(sub).join(path.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn each_check_names_file_line_column_and_remedy() {
    let bless = std::env::var_os("NIGHTJAR_BLESS").is_some();
    let golden_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/validate");
    let mut mismatches = Vec::new();
    for (case, edits) in CASES {
        let dir = tempfile::tempdir().unwrap();
        copy_examples(dir.path());
        for (file, from, to) in edits.iter() {
            edit(&dir.path().join(file), from, to);
        }

        let out = Command::new(env!("CARGO_BIN_EXE_nightjar"))
            .arg("validate")
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            // Nothing answers here: validate must not need the network.
            .env("NIGHTJAR_SANDBOX_URL", "http://127.0.0.1:9")
            .output()
            .expect("nightjar runs");
        assert_eq!(out.status.code(), Some(2), "case {case}: {}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr).replace(&dir.path().display().to_string(), "<project>");

        let golden = golden_dir.join(format!("{case}.txt"));
        if bless {
            std::fs::write(&golden, &stderr).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("{} is missing; run with NIGHTJAR_BLESS=1", golden.display()));
        if expected != stderr {
            mismatches.push(format!("case {case}:\n--- expected\n{expected}--- got\n{stderr}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} no longer contains {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn compare_or_bless(case: &str, got: &str) {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/validate").join(format!("{case}.txt"));
    if std::env::var_os("NIGHTJAR_BLESS").is_some() {
        std::fs::write(&golden, got).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&golden)
        .unwrap_or_else(|_| panic!("{} is missing; run with NIGHTJAR_BLESS=1", golden.display()));
    assert_eq!(expected, got, "case {case}");
}

/// Issue 12: a bad cron in one job, an unknown time zone in another and a
/// bad SQL expression in a mapping, in a project under `sub/` run from its
/// parent: all three, each at its `sub/...:line:col`, one run, exit 2.
#[test]
fn every_problem_of_every_job_in_one_run_at_the_path_given_by_config() {
    let parent = tempfile::tempdir().unwrap();
    let project = parent.path().join("sub");
    std::fs::create_dir_all(&project).unwrap();
    copy_examples(&project);
    let accounts = project.join("jobs/accounts.toml");
    let second = project.join("jobs/partners.toml");
    std::fs::copy(&accounts, &second).unwrap();
    edit(&accounts, "schedule = \"0 30 2 * * *\"", "schedule = \"0 30 25 * * *\"");
    // The second job is disabled: its schedule still matters the day it is enabled.
    edit(&second, "timezone = \"UTC\"", "timezone = \"Europe/Berlim\"");
    edit(&second, "enabled = true", "enabled = false");
    edit(&second, "table = \"account\"", "table = \"partner\"");
    edit(
        &project.join("mappings/accounts.toml"),
        "sql = \"\\\"BillingCity\\\" || ', ' || \\\"BillingCountry\\\"\"",
        "sql = \"\\\"BillingCity\\\" || ', ' || upper(\\\"BillingCountry\\\", 2)\"",
    );

    let out = Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["--config", "sub/nightjar.toml", "validate"])
        .current_dir(parent.path())
        .env_remove("RUST_LOG")
        .env("NIGHTJAR_SANDBOX_URL", "http://127.0.0.1:9")
        .output()
        .expect("nightjar runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing is reported as ok: {}", String::from_utf8_lossy(&out.stdout));
    for (prefix, what) in [
        ("sub/jobs/accounts.toml:2:12: ", "schedule"),
        ("sub/jobs/partners.toml:3:12: ", "timezone `Europe/Berlim`"),
        ("sub/mappings/accounts.toml:73:7: ", "billing_place"),
    ] {
        assert!(stderr.lines().any(|l| l.starts_with(prefix) && l.contains(what)), "no {prefix}..{what} in:\n{stderr}");
    }
    // The mapping is shared by both jobs; its problem is reported once.
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
    compare_or_bless("issue-12-all-at-once", &stderr);
}

/// The repository's own example project and the demo's project validate.
#[test]
fn the_examples_validate_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(["--config", &dir.path().join("nightjar.toml").display().to_string(), "validate"])
        .env_remove("RUST_LOG")
        .output()
        .expect("nightjar runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 job(s): accounts)"));
}
