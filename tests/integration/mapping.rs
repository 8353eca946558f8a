//! The mapping language over sandbox data: values planted through the Bulk
//! API (as someone editing the org would), rejects kept and shown, the
//! reject ratio failing a run, and `sql` columns and `filter` end to end.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nightjar::state::RunStatus;
use rusqlite::types::Value;
use serde_json::{Value as Json, json};

use crate::fixture::{Fixture, FixtureOptions};

fn nightjar(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nightjar"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("nightjar runs")
}

/// Sets `field` on the given records with a Bulk API 2.0 ingest `update` job
/// over HTTP: token, create, upload CSV, UploadComplete, poll.
async fn plant(fx: &Fixture, field: &str, values: &[(&str, &str)]) {
    let http = reqwest::Client::new();
    let (access, api) = fx.api_session().await;
    let access = access.as_str();
    let base = format!("{api}/jobs/ingest");
    let job: Json = http
        .post(&base)
        .bearer_auth(access)
        .json(&json!({"object": "Account", "operation": "update", "contentType": "CSV", "lineEnding": "LF"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().expect("an ingest job id").to_string();
    let mut csv = format!("Id,{field}\n");
    for (record, value) in values {
        csv.push_str(&format!("{record},\"{}\"\n", value.replace('"', "\"\"")));
    }
    let put = http
        .put(format!("{base}/{id}/batches"))
        .bearer_auth(access)
        .header("Content-Type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "upload: {}", put.status());
    let close = http.patch(format!("{base}/{id}")).bearer_auth(access).json(&json!({"state": "UploadComplete"}));
    assert!(close.send().await.unwrap().status().is_success());
    for _ in 0..50 {
        let info: Json =
            http.get(format!("{base}/{id}")).bearer_auth(access).send().await.unwrap().json().await.unwrap();
        match info["state"].as_str() {
            Some("JobComplete") => {
                assert_eq!(info["numberRecordsFailed"], json!(0), "{info}");
                assert_eq!(info["numberRecordsProcessed"], json!(values.len()), "{info}");
                return;
            }
            Some("Failed" | "Aborted") => panic!("ingest job ended {info}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("ingest job {id} did not complete");
}

/// A sandbox record's field as its CSV text (None for null).
fn field(record: &nightjar::sandbox::Record, name: &str) -> Option<String> {
    record.iter().find(|(f, _)| f == name).and_then(|(_, v)| v.clone())
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_bad_values_are_rejected_kept_shown_and_can_fail_the_run() {
    let mut fx = Fixture::build(FixtureOptions { accounts: 120, page_size: 50, ..FixtureOptions::default() }).await;
    let mapping = fx.dir.path().join("mappings/accounts.toml");
    // A mapping that assumed numeric (US) postal codes; three records say otherwise.
    edit(&mapping, "from = \"BillingPostalCode\"\ntype = \"text\"", "from = \"BillingPostalCode\"\ntype = \"integer\"");
    let job = fx.dir.path().join("jobs/accounts.toml");
    edit(&job, "mapping = \"accounts\"", "mapping = \"accounts\"\nmax_reject_ratio = 0.05");
    fx.reload();
    let records = fx.sandbox.records("Account").unwrap();
    let planted_ids: Vec<String> = [4, 41, 98].iter().map(|&row| field(&records[row], "Id").unwrap()).collect();
    let planted: Vec<(&str, &str)> =
        planted_ids.iter().map(String::as_str).zip(["SW1A 1AA", "75008-FR", "n/a"]).collect();
    plant(&fx, "BillingPostalCode", &planted).await;
    fx.advance(3);

    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    assert_eq!((report.counts.extracted, report.counts.rejected, report.counts.inserted), (120, 3, 117));
    let loaded: Vec<String> = fx
        .table()
        .iter()
        .filter_map(|row| match &row[0] {
            Value::Text(id) => Some(id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(loaded.len(), 117);
    for (id, _) in &planted {
        assert!(!loaded.contains(&id.to_string()), "{id} was loaded despite its bad postal code");
    }
    let rejects = fx.state.rejects(report.run_id).await.unwrap();
    assert_eq!(rejects.len(), 3);
    for (reject, (id, value)) in rejects.iter().zip(&planted) {
        assert_eq!(reject.record_id.as_deref(), Some(*id));
        assert_eq!(reject.column, "billingpostalcode");
        assert_eq!(reject.value.as_deref(), Some(*value));
        assert!(reject.reason.contains("is not an integer"), "{}", reject.reason);
    }

    let show = nightjar(fx.dir.path(), &["show", &report.run_id.to_string(), "--rejects"]);
    assert!(show.status.success(), "{}", String::from_utf8_lossy(&show.stderr));
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("3 rows rejected, 3 kept"), "{text}");
    for (id, value) in &planted {
        let line = text.lines().find(|l| l.contains(id)).unwrap_or_else(|| panic!("{id} not in\n{text}"));
        assert!(
            line.contains(value) && line.contains("billingpostalcode") && line.contains("not an integer"),
            "{line}"
        );
    }

    // The same data with no tolerance: the run fails, loads nothing new,
    // keeps the watermark, and history says why.
    edit(&job, "max_reject_ratio = 0.05", "max_reject_ratio = 0");
    fx.reload();
    let watermark = fx.state.watermark("accounts").await.unwrap();
    let cleared = nightjar(fx.dir.path(), &["watermark", "accounts", "--clear"]);
    assert!(cleared.status.success(), "{}", String::from_utf8_lossy(&cleared.stderr));
    let strict = fx.run().await;
    assert_eq!(strict.status, RunStatus::Failed);
    assert_eq!(fx.table().len(), 117, "a failed run changes nothing in the target");
    assert_eq!(fx.state.watermark("accounts").await.unwrap(), None, "the cleared watermark stays cleared");
    assert!(watermark.is_some());
    let history = nightjar(fx.dir.path(), &["history", "--job", "accounts", "--status", "failed"]);
    let text = String::from_utf8_lossy(&history.stdout);
    assert!(text.contains("failed"), "{text}");
    assert!(text.contains("3 of 120 rows were rejected") && text.contains("max_reject_ratio = 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_columns_and_filter_end_to_end() {
    let mut fx = Fixture::build(FixtureOptions { accounts: 200, page_size: 64, ..FixtureOptions::default() }).await;
    let mapping = fx.dir.path().join("mappings/accounts.toml");
    let text = std::fs::read_to_string(&mapping).unwrap();
    std::fs::write(
        &mapping,
        format!(
            "filter = \"Industry IS NULL OR Industry <> 'Banking'\"\n\n{text}\n\
             [[column]]\nname = \"place\"\nsql = \"upper(\\\"BillingCity\\\") || ' / ' || \\\"BillingCountry\\\"\"\n\n\
             [[column]]\nname = \"big\"\nsql = \"CAST(\\\"NumberOfEmployees\\\" AS INTEGER) >= 1000\"\ntype = \"boolean\"\n"
        ),
    )
    .unwrap();
    fx.reload();
    fx.advance(3);

    let records = fx.sandbox.records("Account").unwrap();
    let banking = records.iter().filter(|r| field(r, "Industry").as_deref() == Some("Banking")).count();
    assert!(banking > 0, "the generator makes some Banking accounts");

    let report = fx.run().await;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    assert_eq!(report.counts.filtered, banking as u64);
    assert_eq!(report.counts.inserted, (200 - banking) as u64);
    assert_eq!(report.counts.rejected, 0);

    let conn = rusqlite::Connection::open(fx.warehouse()).unwrap();
    let mut checked = 0;
    for r in &records {
        let id = field(r, "Id").unwrap();
        let id = id.as_str();
        if field(r, "Industry").as_deref() == Some("Banking") {
            let n: i64 = conn.query_row("SELECT count(*) FROM account WHERE id = ?1", [id], |row| row.get(0)).unwrap();
            assert_eq!(n, 0, "{id} is Banking and must be filtered out");
            continue;
        }
        let (place, big): (Option<String>, Option<i64>) = conn
            .query_row("SELECT place, big FROM account WHERE id = ?1", [id], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap();
        let expected_place = match (field(r, "BillingCity"), field(r, "BillingCountry")) {
            (Some(city), Some(country)) => Some(format!("{} / {country}", city.to_uppercase())),
            _ => None,
        };
        assert_eq!(place, expected_place, "{id}");
        let expected_big = field(r, "NumberOfEmployees").map(|n| i64::from(n.parse::<i64>().unwrap() >= 1000));
        assert_eq!(big, expected_big, "{id}");
        checked += 1;
    }
    assert_eq!(checked, 200 - banking);

    let show = nightjar(fx.dir.path(), &["show", &report.run_id.to_string()]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains(&format!("filtered {banking} ")), "{text}");
}
