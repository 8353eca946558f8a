//! Replays every committed fuzz input (fuzz/corpus/<target>/ and the crash
//! inputs kept in fuzz/regressions/<target>/) through the fuzz targets'
//! harness functions, uninstrumented: the properties the fuzzer checked keep
//! holding for every input it found interesting, on every CI run.

use std::path::PathBuf;

use nightjar::fuzzing;

/// The corpus and regression inputs of `target`, sorted by path.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut found = Vec::new();
    for dir in [fuzz.join("corpus").join(target), fuzz.join("regressions").join(target)] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.expect("listing the corpus").path();
            if path.is_file() {
                let bytes = std::fs::read(&path).expect("reading a corpus file");
                found.push((path, bytes));
            }
        }
    }
    found.sort();
    found
}

/// Runs `harness` over every input of `target`, naming the input that fails.
fn replay(target: &str, harness: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let inputs = inputs(target);
    assert!(inputs.len() >= 10, "fuzz/corpus/{target} holds {} inputs; is the corpus committed?", inputs.len());
    let mut failed = Vec::new();
    for (path, bytes) in &inputs {
        if std::panic::catch_unwind(|| harness(bytes)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{} of {} {target} inputs fail:\n{}", failed.len(), inputs.len(), failed.join("\n"));
}

#[test]
fn page_corpus_replays() {
    replay("page", fuzzing::page);
}

#[test]
fn cast_corpus_replays() {
    replay("cast", fuzzing::casts);
}

#[test]
fn config_corpus_replays() {
    replay("config", fuzzing::config);
}

#[test]
fn sql_corpus_replays() {
    replay("sql", fuzzing::sql);
}

#[test]
fn soql_where_corpus_replays() {
    replay("soql_where", |d| fuzzing::soql_where(d, nightjar::config::check_condition));
}
