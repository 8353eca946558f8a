//! The `nightjar` binary as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

fn nightjar(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("nightjar runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A copy of the repository's example installation in a temp dir.
fn example_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("nightjar.toml"), dir.path().join("nightjar.toml")).unwrap();
    for sub in ["jobs", "mappings"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(root.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(sub).join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

#[test]
fn validate_accepts_the_examples() {
    let dir = example_project();
    let out = nightjar(dir.path(), &["validate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("accounts"));
}

#[test]
fn validate_names_file_line_and_column_of_an_unknown_key() {
    let dir = example_project();
    let job = dir.path().join("jobs/accounts.toml");
    let text = std::fs::read_to_string(&job).unwrap();
    // Line 3 gets a misspelt key.
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(2, "schedual = \"0 0 * * * *\"");
    std::fs::write(&job, lines.join("\n")).unwrap();

    let out = nightjar(dir.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("jobs/accounts.toml:3:1:"), "{err}");
    assert!(err.contains("schedual"), "{err}");
}

#[test]
fn validate_names_a_mapping_source_that_the_job_does_not_extract() {
    let dir = example_project();
    let mapping = dir.path().join("mappings/accounts.toml");
    let text = std::fs::read_to_string(&mapping).unwrap();
    std::fs::write(&mapping, text.replacen("from = \"Rating\"", "from = \"Ratings__c\"", 1)).unwrap();
    let line = text.lines().position(|l| l.contains("from = \"Rating\"")).unwrap() + 1;

    let out = nightjar(dir.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("mappings/accounts.toml:{line}:")), "{err}");
    assert!(err.contains("Ratings__c") && err.contains("not among the fields of job `accounts`"), "{err}");
}

#[test]
fn a_missing_environment_variable_names_itself() {
    let dir = example_project();
    let config = dir.path().join("nightjar.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("${SF_CLIENT_SECRET:-sandbox-secret}", "${NIGHTJAR_TEST_UNSET_SECRET}"))
        .unwrap();
    let out = nightjar(dir.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("nightjar.toml:") && err.contains("NIGHTJAR_TEST_UNSET_SECRET"), "{err}");
}

/// Parses the demo's `run N job: succeeded — extracted X rows in P pages; inserted I, updated U, ...` lines.
fn run_lines(out: &str) -> Vec<(u64, u64, u64, u64, u64)> {
    let number = |line: &str, label: &str| -> u64 {
        let rest = &line[line.find(label).unwrap_or_else(|| panic!("{label} in {line}")) + label.len()..];
        rest.trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    out.lines()
        .filter(|l| l.trim_start().starts_with("run ") && l.contains("extracted"))
        .map(|l| {
            (
                number(l, "extracted"),
                number(l, "inserted"),
                number(l, "updated"),
                number(l, "deleted"),
                number(l, "unchanged"),
            )
        })
        .collect()
}

#[test]
fn demo_runs_twice_and_the_warehouse_holds_what_it_printed() {
    let dir = example_project();
    let out = nightjar(dir.path(), &["demo"]);
    let text = stdout(&out);
    assert!(out.status.success(), "demo failed:\n{text}\n{}", stderr(&out));

    let runs = run_lines(&text);
    assert_eq!(runs.len(), 2, "{text}");
    let (extracted1, inserted1, _, _, _) = runs[0];
    let (extracted2, inserted2, updated2, deleted2, _) = runs[1];
    assert_eq!(extracted1, nightjar::demo::DEMO_RECORDS as u64);
    assert_eq!(inserted1, extracted1);
    assert_eq!(inserted2, nightjar::demo::DEMO_INSERTS as u64);
    assert_eq!(updated2, nightjar::demo::DEMO_UPDATES as u64);
    assert_eq!(deleted2, nightjar::demo::DEMO_DELETES as u64);
    assert_eq!(extracted2, inserted2 + updated2 + deleted2, "the second run moved only changed, new and deleted rows");

    let history_start = text.find("history").expect("history printed");
    assert_eq!(text[history_start..].matches("succeeded").count(), 2, "{text}");

    let conn = rusqlite::Connection::open(dir.path().join("state/warehouse.db")).unwrap();
    let rows: i64 = conn.query_row("SELECT count(*) FROM account", [], |r| r.get(0)).unwrap();
    assert_eq!(rows as u64, inserted1 + inserted2);
    let second_run_rows: i64 = conn
        .query_row(
            "SELECT count(*) FROM account WHERE _nightjar_run_id = (SELECT max(_nightjar_run_id) FROM account)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(second_run_rows as u64, inserted2 + updated2 + deleted2);
    let soft_deleted: i64 =
        conn.query_row("SELECT count(*) FROM account WHERE _deleted = 1", [], |r| r.get(0)).unwrap();
    assert_eq!(soft_deleted as u64, deleted2, "deletes arrive as soft deletes");

    // `nightjar history` reads the same state afterwards.
    let history = nightjar(dir.path(), &["history", "--json"]);
    assert!(history.status.success(), "{}", stderr(&history));
    let runs: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 2);

    // The demo can be run again and tells the same story.
    let again = nightjar(dir.path(), &["demo"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(run_lines(&stdout(&again)), runs_of(&text));
}

fn runs_of(text: &str) -> Vec<(u64, u64, u64, u64, u64)> {
    run_lines(text)
}

/// Without a terminal, `nightjar run` reports each staged page on a plain line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reports_progress_as_plain_lines_without_a_terminal() {
    let fx = crate::fixture::Fixture::new(2_500, 1_000).await;
    fx.advance(60);
    let dir = fx.dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || nightjar(&dir, &["run", "accounts"])).await.unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    for (pages, rows) in [(1, 1_000), (2, 2_000), (3, 2_500)] {
        assert!(err.contains(&format!("accounts: {pages} page(s), {rows} rows staged")), "{err}");
    }
    assert!(err.contains("succeeded — extracted 2500"), "{err}");
}
