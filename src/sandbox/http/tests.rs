//! End-to-end tests over real HTTP, with reqwest as a stand-in client (the
//! sandbox never depends on nightjar's own client).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::super::data::http_date;
use super::super::{RunningSandbox, Sandbox, SandboxConfig};

const V: &str = "v62.0";

async fn start(rows: usize) -> (Sandbox, RunningSandbox, reqwest::Client) {
    let sandbox =
        Sandbox::new(SandboxConfig { objects: vec![("Account".into(), rows)], ..SandboxConfig::default() }).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let running = sandbox.start(addr).await.unwrap();
    (sandbox, running, reqwest::Client::new())
}

async fn token(client: &reqwest::Client, running: &RunningSandbox) -> String {
    let response = client
        .post(running.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "nightjar-sandbox"),
            ("client_secret", "sandbox-secret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Json = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

fn jobs_url(running: &RunningSandbox) -> String {
    format!("{}/services/data/{V}/jobs/query", running.base_url())
}

async fn create(client: &reqwest::Client, running: &RunningSandbox, token: &str, body: Json) -> reqwest::Response {
    client.post(jobs_url(running)).bearer_auth(token).json(&body).send().await.unwrap()
}

async fn error_code(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Json = response.json().await.unwrap();
    (
        status,
        body[0]["errorCode"].as_str().unwrap_or_default().to_owned(),
        body[0]["message"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn poll_to_end(client: &reqwest::Client, running: &RunningSandbox, token: &str, id: &str) -> Json {
    for _ in 0..10 {
        let info: Json = client
            .get(format!("{}/{id}", jobs_url(running)))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if matches!(info["state"].as_str(), Some("JobComplete" | "Failed" | "Aborted")) {
            return info;
        }
    }
    panic!("job {id} never finished");
}

/// Fetches all pages; returns (page bodies, Sforce-NumberOfRecords values).
async fn all_pages(
    client: &reqwest::Client,
    running: &RunningSandbox,
    token: &str,
    id: &str,
    max_records: Option<usize>,
) -> (Vec<String>, Vec<usize>) {
    let mut bodies = Vec::new();
    let mut counts = Vec::new();
    let mut locator: Option<String> = None;
    loop {
        let mut request = client.get(format!("{}/{id}/results", jobs_url(running))).bearer_auth(token);
        if let Some(n) = max_records {
            request = request.query(&[("maxRecords", n.to_string())]);
        }
        if let Some(l) = &locator {
            request = request.query(&[("locator", l)]);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "text/csv; charset=UTF-8");
        counts.push(headers["sforce-numberofrecords"].to_str().unwrap().parse().unwrap());
        let next = headers["sforce-locator"].to_str().unwrap().to_owned();
        bodies.push(response.text().await.unwrap());
        if next == "null" {
            return (bodies, counts);
        }
        assert!(bodies.len() < 100, "pagination does not end");
        locator = Some(next);
    }
}

fn parse_csv(body: &str, delimiter: u8) -> (Vec<String>, Vec<Vec<String>>) {
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).from_reader(body.as_bytes());
    let header = reader.headers().unwrap().iter().map(str::to_owned).collect();
    let rows = reader.records().map(|r| r.unwrap().iter().map(str::to_owned).collect()).collect();
    (header, rows)
}

#[tokio::test]
async fn token_create_poll_and_page_through_results() {
    let (sandbox, running, client) = start(250).await;
    assert!(running.base_url().starts_with("http://127.0.0.1:"));

    // Token: shape per §4.2, Date header from the sandbox clock.
    let response = client
        .post(running.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "nightjar-sandbox"),
            ("client_secret", "sandbox-secret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["date"], "Thu, 01 Jan 2026 00:00:00 GMT");
    let body: Json = response.json().await.unwrap();
    let token = body["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("00D") && token.contains('!'), "{token}");
    assert_eq!(body["instance_url"], running.base_url());
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["issued_at"], sandbox.now().timestamp_millis().to_string());
    assert!(body.get("expires_in").is_none() && body.get("refresh_token").is_none());

    // Query job lifecycle.
    let query = "SELECT Id, Name, Description, BillingCity, BillingPostalCode, AnnualRevenue, \
                 CreatedDate, IsDeleted FROM Account WHERE SystemModstamp < 2026-01-01T00:00:00Z";
    let response = create(
        &client,
        &running,
        &token,
        json!({"operation": "query", "query": query, "contentType": "CSV",
               "columnDelimiter": "COMMA", "lineEnding": "LF"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let limit_info = response.headers()["sforce-limit-info"].to_str().unwrap().to_owned();
    assert!(limit_info.starts_with("api-usage=") && limit_info.ends_with("/15000"));
    let created: Json = response.json().await.unwrap();
    assert_eq!(created["state"], "UploadComplete");
    assert_eq!(created["object"], "Account");
    assert_eq!(created["createdDate"], "2026-01-01T00:00:00.000+0000");
    assert_eq!(created["apiVersion"], 62.0);
    assert!(created.get("jobType").is_none());
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("750") && id.len() == 18, "{id}");

    let results_url = format!("{}/{id}/results", jobs_url(&running));
    let early = client.get(&results_url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(error_code(early).await.1, "INVALIDJOBSTATE");

    let job_url = format!("{}/{id}", jobs_url(&running));
    let first: Json = client.get(&job_url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(first["state"], "InProgress");
    let second: Json = client.get(&job_url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(second["state"], "JobComplete");
    assert_eq!(second["jobType"], "V2Query");
    assert_eq!(second["numberRecordsProcessed"], 250);

    let (pages, counts) = all_pages(&client, &running, &token, &id, Some(100)).await;
    assert_eq!(counts, [100, 100, 50]);
    let expected_header: Vec<String> =
        ["Id", "Name", "Description", "BillingCity", "BillingPostalCode", "AnnualRevenue", "CreatedDate", "IsDeleted"]
            .map(String::from)
            .to_vec();
    let mut rows = Vec::new();
    for (page, count) in pages.iter().zip(&counts) {
        assert!(page.starts_with("\"Id\",\"Name\",\"Description\""));
        let (header, page_rows) = parse_csv(page, b',');
        assert_eq!(header, expected_header);
        assert_eq!(page_rows.len(), *count);
        rows.extend(page_rows);
    }
    // What came over the wire is exactly what the sandbox holds.
    let records = sandbox.records("Account").unwrap();
    assert_eq!(rows.len(), records.len());
    for (row, record) in rows.iter().zip(&records) {
        for (name, value) in expected_header.iter().zip(row) {
            let stored = record.iter().find(|(f, _)| f == name).unwrap().1.clone();
            assert_eq!(value, &stored.unwrap_or_default(), "{name}");
        }
    }
    assert!(rows.iter().any(|r| r[2].contains('\n') && r[2].contains('"')));
    assert!(rows.iter().any(|r| r[2] == "NA"));

    // Locators are stable: the second page again.
    let again = client.get(&results_url).bearer_auth(&token).query(&[("maxRecords", "100")]).send().await.unwrap();
    let locator = again.headers()["sforce-locator"].to_str().unwrap().to_owned();
    let page2 = |l: String| {
        client.get(&results_url).bearer_auth(&token).query(&[("maxRecords", "100".to_owned()), ("locator", l)]).send()
    };
    assert_eq!(page2(locator.clone()).await.unwrap().text().await.unwrap(), pages[1]);
    assert_eq!(page2(locator).await.unwrap().text().await.unwrap(), pages[1]);

    // Default page size: one page, locator null.
    let (pages, counts) = all_pages(&client, &running, &token, &id, None).await;
    assert_eq!((pages.len(), counts[0]), (1, 250));

    // A different API version for results is a conflict.
    let other = client
        .get(format!("{}/services/data/v61.0/jobs/query/{id}/results", running.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 409);

    // Completed jobs can't be aborted; they can be deleted, then they're gone.
    let abort = client.patch(&job_url).bearer_auth(&token).json(&json!({"state": "Aborted"})).send().await.unwrap();
    let (status, code, message) = error_code(abort).await;
    assert_eq!((status, code.as_str()), (400, "INVALIDJOBSTATE"));
    assert_eq!(message, "Aborting already Completed Job not allowed");
    let deleted = client.delete(&job_url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert!(deleted.bytes().await.unwrap().is_empty());
    let gone = client.get(&job_url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(error_code(gone).await, (404, "NOT_FOUND".into(), "The requested resource does not exist".into()));

    running.shutdown().await;
}

#[tokio::test]
async fn auth_errors_and_headers() {
    let (sandbox, running, client) = start(3).await;
    let form = |id: &str, secret: &str, grant: &str| {
        vec![
            ("grant_type".to_owned(), grant.to_owned()),
            ("client_id".to_owned(), id.to_owned()),
            ("client_secret".to_owned(), secret.to_owned()),
        ]
    };
    for (fields, expected) in [
        (form("nightjar-sandbox", "wrong", "client_credentials"), "invalid_client"),
        (form("someone", "sandbox-secret", "client_credentials"), "invalid_client_id"),
        (form("nightjar-sandbox", "sandbox-secret", "password"), "unsupported_grant_type"),
    ] {
        let response = client.post(running.token_url()).form(&fields).send().await.unwrap();
        assert_eq!(response.status(), 400);
        let body: Json = response.json().await.unwrap();
        assert_eq!(body["error"], expected);
    }
    let basic = client
        .post(running.token_url())
        .basic_auth("nightjar-sandbox", Some("sandbox-secret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);

    let no_token = client.get(jobs_url(&running)).send().await.unwrap();
    assert_eq!(error_code(no_token).await, (401, "INVALID_SESSION_ID".into(), "Session expired or invalid".into()));
    let bad_token = client.get(jobs_url(&running)).bearer_auth("00D!nope").send().await.unwrap();
    assert_eq!(bad_token.status(), 401);

    // The Date header follows the sandbox clock, not the wall clock.
    sandbox.advance_clock(Duration::from_secs(86_400 * 30 + 3_723));
    let token = token(&client, &running).await;
    let limits = client
        .get(format!("{}/services/data/{V}/limits", running.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(limits.headers()["date"], "Sat, 31 Jan 2026 01:02:03 GMT");
    assert_eq!(limits.headers()["date"], http_date(sandbox.now()).as_str());
    let usage = limits.headers()["sforce-limit-info"].to_str().unwrap().to_owned();
    assert_eq!(usage, "api-usage=3/15000");
    let body: Json = limits.json().await.unwrap();
    assert_eq!(body["DailyApiRequests"]["Remaining"], 15000 - 3);

    let describe: Json = client
        .get(format!("{}/services/data/{V}/sobjects/account/describe", running.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fields = describe["fields"].as_array().unwrap();
    assert_eq!(fields.len(), sandbox.field_names("Account").unwrap().len());
    let modstamp = fields.iter().find(|f| f["name"] == "SystemModstamp").unwrap();
    assert_eq!((&modstamp["type"], &modstamp["soapType"]), (&json!("datetime"), &json!("xsd:dateTime")));
    let unknown = client
        .get(format!("{}/services/data/{V}/sobjects/Nope/describe", running.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let missing = client.get(format!("{}/nowhere", running.base_url())).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.headers().contains_key("date"));
    let bad_version = client
        .get(format!("{}/services/data/62/jobs/query", running.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_version.status(), 404);
    let wrong_method = client.put(jobs_url(&running)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);

    let log = sandbox.request_log();
    assert_eq!(log[0].method, "POST");
    assert_eq!(log[0].path, "/services/oauth2/token");
    assert!(log[0].body.contains("grant_type=client_credentials"));
    running.shutdown().await;
}

#[tokio::test]
async fn create_errors_options_snapshots_and_faults() {
    let (sandbox, running, client) = start(40).await;
    let token = token(&client, &running).await;

    for (query, code) in [
        ("SELECT Id, BadField FROM Account", "INVALID_FIELD"),
        ("SELECT Id FROM Foo", "INVALID_TYPE"),
        ("SELECT Id FROM Account WHERE", "MALFORMED_QUERY"),
    ] {
        let response = create(&client, &running, &token, json!({"operation": "query", "query": query})).await;
        let (status, got, message) = error_code(response).await;
        assert_eq!((status, got.as_str()), (400, code), "{query}: {message}");
    }
    let bad_json = client
        .post(jobs_url(&running))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"operation\": \"query\", \"query\": 5}")
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_code(bad_json).await;
    assert_eq!((status, code.as_str()), (400, "API_ERROR"));
    assert!(message.starts_with("Value does not match expected type at [line:1, column:"), "{message}");
    let bad_option = create(
        &client,
        &running,
        &token,
        json!({"operation": "query", "query": "SELECT Id FROM Account", "columnDelimiter": "SPACE"}),
    )
    .await;
    assert_eq!(error_code(bad_option).await.1, "API_ERROR");

    // TAB + CRLF apply to header and rows; embedded newlines keep their bytes.
    let response = create(
        &client,
        &running,
        &token,
        json!({"operation": "query", "query": "SELECT Id, Description FROM Account LIMIT 15",
               "columnDelimiter": "TAB", "lineEnding": "CRLF"}),
    )
    .await;
    let created: Json = response.json().await.unwrap();
    assert_eq!(created["columnDelimiter"], "TAB");
    let id = created["id"].as_str().unwrap().to_owned();
    poll_to_end(&client, &running, &token, &id).await;
    let (pages, _) = all_pages(&client, &running, &token, &id, None).await;
    assert!(pages[0].starts_with("\"Id\"\t\"Description\"\r\n"));
    assert!(pages[0].contains("\"\r\n\"001"));
    let (_, rows) = parse_csv(&pages[0], b'\t');
    assert_eq!(rows.len(), 15);
    assert_eq!(rows[13][1], "First line\r\nsecond line after CRLF\r\n");

    // Snapshot: changes after creation don't reach an existing job; query
    // hides deleted rows, queryAll shows them.
    let window = |op: &str| {
        json!({"operation": op, "query":
            "SELECT Id, Name, IsDeleted FROM Account WHERE SystemModstamp >= 2026-01-01T00:00:00Z"})
    };
    let before: Json = create(&client, &running, &token, window("queryAll")).await.json().await.unwrap();
    sandbox.advance_clock(Duration::from_secs(60));
    let changed = sandbox.update_records("Account", 4).unwrap();
    sandbox.delete_records("Account", &changed[..1]).unwrap();
    let live: Json = create(&client, &running, &token, window("query")).await.json().await.unwrap();
    let all: Json = create(&client, &running, &token, window("queryAll")).await.json().await.unwrap();
    let mut counts = Vec::new();
    for job in [&before, &live, &all] {
        let id = job["id"].as_str().unwrap();
        let info = poll_to_end(&client, &running, &token, id).await;
        let (pages, page_counts) = all_pages(&client, &running, &token, id, Some(2)).await;
        assert_eq!(info["numberRecordsProcessed"], page_counts.iter().sum::<usize>());
        counts.push(page_counts.iter().sum::<usize>());
        if job == &before {
            // Empty result: header-only body, count 0, locator null.
            assert_eq!(pages, ["\"Id\",\"Name\",\"IsDeleted\"\n"]);
            assert_eq!(page_counts, [0]);
        }
        if job == &all {
            let deleted: Vec<_> = pages.iter().flat_map(|p| parse_csv(p, b',').1).filter(|r| r[2] == "true").collect();
            assert_eq!(deleted.len(), 1);
            assert_eq!(deleted[0][0], changed[0]);
        }
    }
    assert_eq!(counts, [0, 3, 4]);

    // Fault injection: the next job fails with the given message.
    sandbox.fail_next_query_jobs(1, "Unexpected exception encountered in query processing.");
    let failing: Json = create(&client, &running, &token, window("query")).await.json().await.unwrap();
    let id = failing["id"].as_str().unwrap().to_owned();
    let info = poll_to_end(&client, &running, &token, &id).await;
    assert_eq!(info["state"], "Failed");
    assert_eq!(info["errorMessage"], "Unexpected exception encountered in query processing.");
    let results = client.get(format!("{}/{id}/results", jobs_url(&running))).bearer_auth(&token).send().await.unwrap();
    assert_eq!(error_code(results).await.1, "INVALIDJOBSTATE");

    // Abort before completion; deleting before a terminal state is refused.
    let pending: Json = create(&client, &running, &token, window("query")).await.json().await.unwrap();
    let job_url = format!("{}/{}", jobs_url(&running), pending["id"].as_str().unwrap());
    let refused = client.delete(&job_url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(error_code(refused).await.1, "API_ERROR");
    let aborted: Json = client
        .patch(&job_url)
        .bearer_auth(&token)
        .json(&json!({"state": "Aborted"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(aborted["state"], "Aborted");
    let polled = poll_to_end(&client, &running, &token, pending["id"].as_str().unwrap()).await;
    assert_eq!(polled["state"], "Aborted");
    assert_eq!(client.delete(&job_url).bearer_auth(&token).send().await.unwrap().status(), 204);

    let list: Json = client.get(jobs_url(&running)).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["done"], true);
    assert_eq!(list["records"].as_array().unwrap().len(), 5);
    running.shutdown().await;
}
