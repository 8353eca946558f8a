//! `history`, `show` and `watermark` as the user sees them, against golden
//! files. The state DB is written with fixed timestamps (not live runs), so
//! the output is the same on every machine. `NIGHTJAR_BLESS=1` rewrites the
//! golden files after an intended change; review the diff.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nightjar::state::StateDb;

use crate::fixture::Fixture;

/// Three runs of two jobs over two days: a success with steps, a failure,
/// an abandoned run.
const RUNS: &str = r#"
INSERT INTO runs (id, job, status, trigger, attempt, pid, host, started_at, finished_at, window_start, window_end,
                  watermark_before, watermark_after, pages, rows_extracted, rows_rejected, rows_inserted,
                  rows_updated, rows_unchanged, rows_deleted, sf_job_ids, error_class, error, api_calls)
VALUES
 (1, 'accounts', 'succeeded', 'manual', 1, 100, 'etl-1', '2026-01-01T02:00:00.000Z', '2026-01-01T02:00:41.250Z',
  NULL, '2026-01-01T01:58:00.000Z', NULL, '2026-01-01T01:58:00.000Z', 3, 2500, 0, 2500, 0, 0, 0, '750A00000000001AAA',
  NULL, NULL, 9),
 (2, 'contacts', 'failed', 'schedule', 1, 101, 'etl-1', '2026-01-02T02:00:00.000Z', '2026-01-02T02:00:03.500Z',
  NULL, '2026-01-02T01:58:00.000Z', NULL, NULL, 0, 0, 0, 0, 0, 0, 0, '',
  'auth', 'Salesforce login failed: invalid_client (invalid client credentials)', 1),
 (3, 'accounts', 'abandoned', 'schedule', 1, 102, 'etl-1', '2026-01-02T03:00:00.000Z', '2026-01-02T03:10:00.000Z',
  '2026-01-01T01:58:00.000Z', '2026-01-02T02:58:00.000Z', '2026-01-01T01:58:00.000Z', NULL, 1, 1000, 0, 0, 0, 0, 0,
  '750A00000000002AAA', 'abandoned', 'the process running it (pid 102) ended before the run closed', 9);
INSERT INTO run_steps (run_id, step, started_at, duration_ms) VALUES
 (1, 'plan', '2026-01-01T02:00:00.000Z', 120),
 (1, 'extract', '2026-01-01T02:00:00.120Z', 30000),
 (1, 'transform', '2026-01-01T02:00:30.120Z', 2500),
 (1, 'load', '2026-01-01T02:00:30.120Z', 8000),
 (1, 'commit', '2026-01-01T02:00:40.000Z', 1250);
INSERT INTO watermarks (job, value, run_id, updated_at) VALUES
 ('accounts', '2026-01-01T01:58:00.000Z', 1, '2026-01-01T02:00:41.250Z');
"#;

fn state_with_runs(dir: &Path) -> PathBuf {
    let path = dir.join("state.db");
    drop(StateDb::open(&path).expect("state opens"));
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(RUNS).unwrap();
    path
}

fn nightjar(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("nightjar runs")
}

fn stdout_ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("NIGHTJAR_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(actual, expected, "output differs from {} (NIGHTJAR_BLESS=1 rewrites it)", path.display());
}

#[test]
fn history_matches_the_golden_output() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_with_runs(dir.path());
    let state = state.to_str().unwrap();
    golden("history.txt", &stdout_ok(&nightjar(dir.path(), &["--state", state, "history"])));
    golden("history.json", &stdout_ok(&nightjar(dir.path(), &["--state", state, "history", "--json"])));
    golden(
        "history-since.txt",
        &stdout_ok(&nightjar(
            dir.path(),
            &["--state", state, "history", "--since", "2026-01-02", "--job", "accounts", "--limit", "5"],
        )),
    );
    let out = nightjar(dir.path(), &["--state", state, "history", "--since", "yesterday-ish"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since `yesterday-ish`"));
}

#[test]
fn show_matches_the_golden_output() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_with_runs(dir.path());
    let state = state.to_str().unwrap();
    golden("show-1.txt", &stdout_ok(&nightjar(dir.path(), &["--state", state, "show", "1"])));
    golden("show-1.json", &stdout_ok(&nightjar(dir.path(), &["--state", state, "show", "1", "--json"])));
    golden("show-2.txt", &stdout_ok(&nightjar(dir.path(), &["--state", state, "show", "2"])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermark_is_shown_moved_and_cleared_and_each_change_is_in_history() {
    let fx = Fixture::new(10, 1_000).await;
    fx.advance(60);
    let dir = fx.dir.path();
    let wm = |args: &[&str]| {
        let mut all = vec!["--config", "nightjar.toml", "watermark", "accounts"];
        all.extend_from_slice(args);
        stdout_ok(&nightjar(dir, &all))
    };
    let mut out = String::new();
    for args in
        [&[][..], &["--set", "2026-01-01T00:30:00Z"], &[], &["--clear"], &[], &["--set", "2026-01-01T00:30:00Z"]]
    {
        out.push_str(&tokio::task::block_in_place(|| wm(args)));
    }
    golden("watermark.txt", &out);

    let history = fx.state.history(Default::default()).await.unwrap();
    let changes: Vec<(Option<&str>, Option<&str>, &str)> = history
        .iter()
        .map(|r| (r.watermark_before.as_deref(), r.watermark_after.as_deref(), r.trigger.as_str()))
        .collect();
    let at = Some("2026-01-01T00:30:00.000Z");
    assert_eq!(changes, vec![(None, at, "watermark"), (at, None, "watermark"), (None, at, "watermark")]);

    // The next run starts its window at the watermark that was set.
    let report = fx.run().await;
    assert_eq!(report.window.and_then(|w| w.start).map(nightjar::state::ts).as_deref(), at);
    // limits, create, poll, one results page at least.
    let recorded = fx.state.run(report.run_id).await.unwrap().unwrap();
    assert!(recorded.counts.api_calls >= 4, "API calls are counted: {recorded:?}");

    let bad = tokio::task::block_in_place(|| {
        nightjar(dir, &["--config", "nightjar.toml", "watermark", "accounts", "--set", "last tuesday"])
    });
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an RFC 3339 time"));
}
