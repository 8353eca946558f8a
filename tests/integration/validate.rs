//! `nightjar validate` as a user meets it: one broken thing per case, the
//! whole message checked against a golden file (`tests/golden/validate/`).
//! Every check runs before any network call: the project points at a
//! Salesforce that is not there. `NIGHTJAR_BLESS=1` rewrites the files.

use std::path::Path;
use std::process::Command;

/// (case, file to edit, text to replace, replacement)
const CASES: &[(&str, &str, &str, &str)] = &[
    ("from-not-a-field", "mappings/accounts.toml", "from = \"Rating\"", "from = \"Ratings\""),
    (
        "sql-reads-unknown-field",
        "mappings/accounts.toml",
        "sql = \"\\\"BillingCity\\\" || ', ' || \\\"BillingCountry\\\"\"",
        "sql = \"\\\"BillingCity\\\" || ', ' || \\\"ShippingCountry\\\"\"",
    ),
    (
        "sql-does-not-parse",
        "mappings/accounts.toml",
        "sql = \"\\\"BillingCity\\\" || ', ' || \\\"BillingCountry\\\"\"",
        "sql = \"upper(\\\"BillingCity\\\"\"",
    ),
    (
        "filter-reads-unknown-field",
        "mappings/accounts.toml",
        "filter = \"Name NOT LIKE 'Test %'\"",
        "filter = \"Segment <> 'Test'\"",
    ),
    (
        "filter-does-not-parse",
        "mappings/accounts.toml",
        "filter = \"Name NOT LIKE 'Test %'\"",
        "filter = \"Name NOT LIKE\"",
    ),
    (
        "filter-not-a-condition",
        "mappings/accounts.toml",
        "filter = \"Name NOT LIKE 'Test %'\"",
        "filter = \"upper(Name)\"",
    ),
    ("unknown-type", "mappings/accounts.toml", "type = \"decimal(5,2)\"", "type = \"varchar(5)\""),
    ("duplicate-column", "mappings/accounts.toml", "name = \"rating\"", "name = \"phone\""),
    (
        "key-not-required",
        "mappings/accounts.toml",
        "name = \"sf_id\"\nfrom = \"Id\"\ntype = \"text\"\nrequired = true",
        "name = \"sf_id\"\nfrom = \"Id\"\ntype = \"text\"",
    ),
    ("key-not-a-column", "jobs/accounts.toml", "key = [\"sf_id\"]", "key = [\"account_id\"]"),
    ("cursor-not-a-field", "jobs/accounts.toml", "cursor = \"SystemModstamp\"", "cursor = \"LastModifiedDate\""),
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
    for (case, file, from, to) in CASES {
        let dir = tempfile::tempdir().unwrap();
        copy_examples(dir.path());
        let path = dir.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "case {case}: the example {file} no longer contains {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();

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
