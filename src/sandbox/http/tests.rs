//! End-to-end tests over real HTTP, with reqwest as a stand-in client (the
//! sandbox never depends on nightjar's own client).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::super::data::http_date;
use super::super::{RunningSandbox, Sandbox, SandboxConfig};

const V: &str = "v62.0";

/// The start these tests' dates and query windows are written against.
fn new_year() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().to_utc()
}

async fn start(rows: usize) -> (Sandbox, RunningSandbox, reqwest::Client) {
    let config =
        SandboxConfig { objects: vec![("Account".into(), rows)], start: new_year(), ..SandboxConfig::default() };
    let sandbox = Sandbox::new(config).unwrap();
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

/// The JWT bearer grant with Salesforce's answers to a bad assertion,
/// signed with the test-only key pair in tests/fixtures.
#[tokio::test]
async fn jwt_bearer_grant_verifies_the_assertion() {
    let sandbox = Sandbox::new(SandboxConfig {
        jwt_public_key_pem: Some(include_str!("../../../tests/fixtures/jwt-test-key.pub.pem").to_owned()),
        ..SandboxConfig::default()
    })
    .unwrap();
    let running = sandbox.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = reqwest::Client::new();
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!("../../../tests/fixtures/jwt-test-key.pem")).unwrap();
    let now = chrono::Utc::now().timestamp();
    let base = running.base_url().to_owned();
    let grant = |iss: &str, sub: &str, aud: &str, exp: i64| {
        let claims = json!({ "iss": iss, "sub": sub, "aud": aud, "exp": exp });
        let assertion =
            jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256), &claims, &key).unwrap();
        client
            .post(running.token_url())
            .form(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &assertion)])
            .send()
    };
    let user = "integration@nightjar.sandbox";
    let response = grant("nightjar-sandbox", user, &base, now + 180).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Json = response.json().await.unwrap();
    assert!(body["access_token"].as_str().unwrap().starts_with("00D"));
    assert!(body.get("signature").is_none() && body.get("issued_at").is_none() && body.get("refresh_token").is_none());
    let response = grant("nightjar-sandbox", user, "https://login.salesforce.com", now + 180).await.unwrap();
    assert_eq!(response.status(), 200, "Salesforce's own audience is accepted");

    for (iss, sub, aud, exp, error, description) in [
        ("nightjar-sandbox", user, base.as_str(), now - 10, "invalid_grant", "invalid assertion"),
        ("nightjar-sandbox", user, "https://evil.example", now + 180, "invalid_grant", "audience is invalid"),
        ("someone-else", user, base.as_str(), now + 180, "invalid_client_id", "client identifier invalid"),
        ("nightjar-sandbox", "x@y.z", base.as_str(), now + 180, "invalid_grant", "user hasn't approved this consumer"),
    ] {
        let response = grant(iss, sub, aud, exp).await.unwrap();
        assert_eq!(response.status(), 400);
        let body: Json = response.json().await.unwrap();
        assert_eq!(
            (body["error"].as_str().unwrap(), body["error_description"].as_str().unwrap()),
            (error, description)
        );
    }
    // An assertion signed with another key does not verify.
    let mut forged = grant_body_with_other_key();
    forged.push(("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".into()));
    let response = client.post(running.token_url()).form(&forged).send().await.unwrap();
    assert_eq!(response.status(), 400);
    running.shutdown().await;
}

/// A syntactically valid RS256 assertion whose signature is garbage.
fn grant_body_with_other_key() -> Vec<(&'static str, String)> {
    let header = super::super::encoding::base64_encode(br#"{"alg":"RS256","typ":"JWT"}"#, false);
    let claims = super::super::encoding::base64_encode(br#"{"iss":"nightjar-sandbox","sub":"integration@nightjar.sandbox","aud":"https://login.salesforce.com","exp":99999999999}"#, false);
    vec![("assertion", format!("{header}.{claims}.c2lnbmF0dXJl"))]
}

/// The web-server flow: authorize redirects with a code, the exchange
/// checks the PKCE verifier, refresh tokens work until revoked.
#[tokio::test]
async fn authorization_code_with_pkce_refresh_and_revoke() {
    use sha2::Digest;
    let (sandbox, running, _) = start(1).await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let verifier = "a-verifier-of-at-least-forty-three-characters-0123456789";
    let challenge = super::base64url(&sha2::Sha256::digest(verifier.as_bytes()));
    let redirect = "http://localhost:1717/oauth/callback";
    let authorize = |challenge: String| {
        client
            .get(format!("{}/services/oauth2/authorize", running.base_url()))
            .query(&[
                ("response_type", "code"),
                ("client_id", "nightjar-sandbox"),
                ("redirect_uri", redirect),
                ("code_challenge", challenge.as_str()),
                ("code_challenge_method", "S256"),
                ("state", "xyz"),
            ])
            .send()
    };
    let code_of = |response: reqwest::Response| {
        assert_eq!(response.status(), 302);
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        assert!(location.starts_with(redirect) && location.ends_with("&state=xyz"), "{location}");
        let code = location.split("code=").nth(1).unwrap().split('&').next().unwrap().to_owned();
        super::super::encoding::form_decode(&code)
    };
    let exchange = |code: String, verifier: Option<&str>| {
        let mut form = vec![
            ("grant_type", "authorization_code".to_owned()),
            ("code", code),
            ("client_id", "nightjar-sandbox".into()),
            ("client_secret", "sandbox-secret".into()),
            ("redirect_uri", redirect.into()),
        ];
        if let Some(v) = verifier {
            form.push(("code_verifier", v.into()));
        }
        client.post(running.token_url()).form(&form).send()
    };
    let oauth_error = |body: Json| {
        (body["error"].as_str().unwrap().to_owned(), body["error_description"].as_str().unwrap().to_owned())
    };

    let code = code_of(authorize(challenge.clone()).await.unwrap());
    let wrong = exchange(code, Some("not-the-verifier")).await.unwrap();
    assert_eq!(oauth_error(wrong.json().await.unwrap()).0, "invalid_request");
    let code = code_of(authorize(challenge.clone()).await.unwrap());
    let missing = exchange(code, None).await.unwrap();
    assert_eq!(oauth_error(missing.json().await.unwrap()), ("invalid_grant".into(), "invalid code verifier".into()));

    let code = code_of(authorize(challenge.clone()).await.unwrap());
    let ok = exchange(code.clone(), Some(verifier)).await.unwrap();
    assert_eq!(ok.status(), 200);
    let body: Json = ok.json().await.unwrap();
    let refresh = body["refresh_token"].as_str().unwrap().to_owned();
    let again = exchange(code, Some(verifier)).await.unwrap();
    assert_eq!(oauth_error(again.json().await.unwrap()).0, "invalid_grant", "codes are single-use");

    let refresh_grant = || {
        client
            .post(running.token_url())
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
                ("client_id", "nightjar-sandbox"),
                ("client_secret", "sandbox-secret"),
            ])
            .send()
    };
    assert_eq!(refresh_grant().await.unwrap().status(), 200);
    let revoke = |token: String| {
        client.post(format!("{}/services/oauth2/revoke", running.base_url())).form(&[("token", token)]).send()
    };
    assert_eq!(revoke(refresh.clone()).await.unwrap().status(), 200);
    assert_eq!(revoke(refresh.clone()).await.unwrap().status(), 400, "unknown tokens are invalid_token");
    let refused = refresh_grant().await.unwrap();
    assert_eq!(
        oauth_error(refused.json().await.unwrap()),
        ("invalid_grant".into(), "expired access/refresh token".into())
    );
    assert!(sandbox.issued_tokens().contains(&refresh));
    running.shutdown().await;
}

/// A Bulk API 2.0 ingest job end to end (§2): create Open, upload once,
/// close, poll to JobComplete, result CSVs, and the rows in the table.
#[tokio::test]
async fn ingest_job_lifecycle_and_results() {
    let (sandbox, running, client) = start(3).await;
    let token = token(&client, &running).await;
    let ingest_url = format!("{}/services/data/{V}/jobs/ingest", running.base_url());
    let existing = sandbox.records("Account").unwrap()[0][0].1.clone().unwrap();

    let create = |operation: &str| {
        client
            .post(&ingest_url)
            .bearer_auth(&token)
            .json(&json!({"object": "Account", "operation": operation, "contentType": "CSV", "lineEnding": "LF"}))
            .send()
    };
    let response = create("insert").await.unwrap();
    assert_eq!(response.status(), 200);
    let info: Json = response.json().await.unwrap();
    assert_eq!(info["state"], "Open");
    let id = info["id"].as_str().unwrap().to_owned();
    assert_eq!(info["contentUrl"], format!("services/data/v62.0/jobs/ingest/{id}/batches"));

    let csv = "Name,AnnualRevenue,Description\n\"Acme, Inc\",1250.5,\"multi\nline\"\n,10,no name\n";
    let put = |body: &'static str| {
        client
            .put(format!("{ingest_url}/{id}/batches"))
            .bearer_auth(&token)
            .header("content-type", "text/csv")
            .body(body)
            .send()
    };
    let uploaded = put(csv).await.unwrap();
    assert_eq!(uploaded.status(), 201);
    assert!(uploaded.text().await.unwrap().is_empty());
    assert_eq!(error_code(put(csv).await.unwrap()).await.1, "INVALIDJOBSTATE", "data is uploaded once");
    let close = client
        .patch(format!("{ingest_url}/{id}"))
        .bearer_auth(&token)
        .json(&json!({"state": "UploadComplete"}))
        .send()
        .await
        .unwrap();
    assert_eq!(close.status(), 200);
    let mut info = Json::Null;
    for _ in 0..5 {
        info = client.get(format!("{ingest_url}/{id}")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        if info["state"] == "JobComplete" {
            break;
        }
    }
    assert_eq!(info["state"], "JobComplete");
    assert_eq!((info["numberRecordsProcessed"].as_u64(), info["numberRecordsFailed"].as_u64()), (Some(2), Some(1)));
    assert_eq!(info["jobType"], "V2Ingest");

    let results = |kind: &str| client.get(format!("{ingest_url}/{id}/{kind}/")).bearer_auth(&token).send();
    let ok = results("successfulResults").await.unwrap().text().await.unwrap();
    let (header, rows) = parse_csv(&ok, b',');
    assert_eq!(header, ["sf__Id", "sf__Created", "Name", "AnnualRevenue", "Description"]);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0][1].as_str(), rows[0][2].as_str(), rows[0][4].as_str()), ("true", "Acme, Inc", "multi\nline"));
    let new_id = rows[0][0].clone();
    let failed = results("failedResults").await.unwrap().text().await.unwrap();
    let (header, rows) = parse_csv(&failed, b',');
    assert_eq!(&header[..2], ["sf__Id", "sf__Error"]);
    assert_eq!(rows[0][1], "REQUIRED_FIELD_MISSING:Required fields are missing: [Name]:Name --");
    let unprocessed = results("unprocessedrecords").await.unwrap().text().await.unwrap();
    assert_eq!(parse_csv(&unprocessed, b',').1.len(), 0);

    let records = sandbox.records("Account").unwrap();
    let inserted = records.iter().find(|r| r[0].1.as_deref() == Some(new_id.as_str())).expect("the new row exists");
    let field =
        |r: &[(String, Option<String>)], name: &str| r.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.clone());
    assert_eq!(field(inserted, "AnnualRevenue").as_deref(), Some("1250.50"));
    assert_eq!(field(inserted, "CreatedDate"), Some(super::super::data::Value::DateTime(sandbox.now()).render()));

    // Update then delete the first generated row; #N/A sets null, empty leaves as is.
    for (operation, body) in [
        ("update", format!("Id,Name,Description,Phone\n{existing},Renamed,#N/A,\n")),
        ("delete", format!("Id\n{existing}\n")),
    ] {
        let info: Json = create(operation).await.unwrap().json().await.unwrap();
        let job = info["id"].as_str().unwrap().to_owned();
        let put =
            client.put(format!("{ingest_url}/{job}/batches")).bearer_auth(&token).body(body).send().await.unwrap();
        assert_eq!(put.status(), 201);
        client
            .patch(format!("{ingest_url}/{job}"))
            .bearer_auth(&token)
            .json(&json!({"state": "UploadComplete"}))
            .send()
            .await
            .unwrap();
        for _ in 0..3 {
            client.get(format!("{ingest_url}/{job}")).bearer_auth(&token).send().await.unwrap();
        }
        if operation == "update" {
            let row = sandbox
                .records("Account")
                .unwrap()
                .into_iter()
                .find(|r| r[0].1.as_deref() == Some(existing.as_str()))
                .unwrap();
            assert_eq!(field(&row, "Name").as_deref(), Some("Renamed"));
            assert_eq!(field(&row, "Description"), None);
            assert!(field(&row, "Phone").is_some(), "an empty cell leaves the value unchanged");
        }
    }
    let row =
        sandbox.records("Account").unwrap().into_iter().find(|r| r[0].1.as_deref() == Some(existing.as_str())).unwrap();
    assert_eq!(field(&row, "IsDeleted").as_deref(), Some("true"));

    let list: Json = client.get(&ingest_url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["records"].as_array().unwrap().len(), 3);
    let deleted = client.delete(format!("{ingest_url}/{id}")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = client.get(format!("{ingest_url}/{id}")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(error_code(gone).await.0, 404);
    running.shutdown().await;
}

// ------------------------------------------------------ results-page faults ---

/// A completed query job over `rows` Accounts; returns its results URL too.
async fn completed_job(rows: usize, query: &str) -> (Sandbox, RunningSandbox, reqwest::Client, String, String) {
    let (sandbox, running, client) = start(rows).await;
    let token = token(&client, &running).await;
    let created: Json =
        create(&client, &running, &token, json!({"operation": "query", "query": query})).await.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(poll_to_end(&client, &running, &token, &id).await["state"], "JobComplete");
    let results_url = format!("{}/{id}/results", jobs_url(&running));
    (sandbox, running, client, token, results_url)
}

/// One results page exactly as it came over the wire: status, headers and
/// the body bytes (the client has no gzip support, so nothing is undone).
async fn wire_page(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    max_records: usize,
    locator: Option<&str>,
    gzip: bool,
) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let mut request = client.get(url).bearer_auth(token).query(&[("maxRecords", max_records.to_string())]);
    if let Some(l) = locator {
        request = request.query(&[("locator", l)]);
    }
    if gzip {
        request = request.header("Accept-Encoding", "gzip");
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap().to_vec();
    assert_eq!(headers["content-length"].to_str().unwrap(), body.len().to_string(), "framing fits what is sent");
    (headers, body)
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers[name].to_str().unwrap()
}

fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out)?;
    Ok(out)
}

#[tokio::test]
async fn end_early_ends_pagination_while_rows_remain() {
    let (sandbox, running, client, token, url) = completed_job(250, "SELECT Id, Name FROM Account").await;
    let (headers, first) = wire_page(&client, &url, &token, 100, None, false).await;
    let next = header(&headers, "sforce-locator").to_owned();
    let (_, expected) = wire_page(&client, &url, &token, 100, Some(&next), false).await;

    sandbox.add_faults("end-early").unwrap();
    let (headers, body) = wire_page(&client, &url, &token, 100, None, false).await;
    assert_eq!(header(&headers, "sforce-locator"), "null", "150 rows remain");
    assert_eq!(header(&headers, "sforce-numberofrecords"), "100");
    assert_eq!(body, first, "the page itself is whole");
    // Only the job's total gives it away.
    let id = url.trim_end_matches("/results").rsplit('/').next().unwrap();
    let info: Json = client
        .get(format!("{}/{id}", jobs_url(&running)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["numberRecordsProcessed"], 250);

    // `nth` counts results requests; the locator itself still works.
    sandbox.add_faults("end-early:nth=2").unwrap();
    let (headers, _) = wire_page(&client, &url, &token, 100, None, false).await;
    assert_eq!(header(&headers, "sforce-locator"), next);
    let (headers, body) = wire_page(&client, &url, &token, 100, Some(&next), false).await;
    assert_eq!((header(&headers, "sforce-locator"), body), ("null", expected));
    running.shutdown().await;
}

#[tokio::test]
async fn bad_page_has_a_ragged_row_under_the_right_count() {
    let (sandbox, running, client, token, url) = completed_job(30, "SELECT Id, IsDeleted FROM Account").await;
    let (_, good) = wire_page(&client, &url, &token, 10, None, false).await;
    let good = String::from_utf8(good).unwrap();
    let mut lines: Vec<&str> = good.split_inclusive('\n').collect();
    assert_eq!(lines.len(), 11);
    let first_id = lines[1].split(',').next().unwrap().to_owned();
    let ragged = format!("{first_id}\n");
    lines[1] = &ragged;
    let expected = lines.concat();

    // Persistent for `times` requests, so a client's retries run out.
    sandbox.add_faults("bad-page:times=3").unwrap();
    for _ in 0..3 {
        let (headers, body) = wire_page(&client, &url, &token, 10, None, false).await;
        assert_eq!(header(&headers, "sforce-numberofrecords"), "10");
        assert_eq!(String::from_utf8(body.clone()).unwrap(), expected);
        let mut strict = csv::Reader::from_reader(&body[..]);
        let error = strict.records().find_map(Result::err).expect("a strict reader refuses the page");
        assert!(matches!(error.kind(), csv::ErrorKind::UnequalLengths { .. }), "{error}");
    }
    let (_, again) = wire_page(&client, &url, &token, 10, None, false).await;
    assert_eq!(again, good.as_bytes(), "spent after 3");

    // Gzipped like any page when asked.
    sandbox.add_faults("bad-page").unwrap();
    let (headers, body) = wire_page(&client, &url, &token, 10, None, true).await;
    assert_eq!(header(&headers, "content-encoding"), "gzip");
    assert_eq!(gunzip(&body).unwrap(), expected.as_bytes());
    running.shutdown().await;

    // One column: a short row would be blank, so it carries an extra field.
    let (sandbox, running, client, token, url) = completed_job(3, "SELECT Id FROM Account").await;
    let (_, good) = wire_page(&client, &url, &token, 10, None, false).await;
    let good = String::from_utf8(good).unwrap();
    sandbox.add_faults("bad-page").unwrap();
    let (_, body) = wire_page(&client, &url, &token, 10, None, false).await;
    let mut lines: Vec<String> = good.split_inclusive('\n').map(str::to_owned).collect();
    lines[1] = lines[1].replace('\n', ",\"\"\n");
    assert_eq!(String::from_utf8(body).unwrap(), lines.concat());
    running.shutdown().await;
}

#[tokio::test]
async fn truncate_cuts_the_csv_then_gzips_it() {
    let (sandbox, running, client, token, url) = completed_job(30, "SELECT Id, IsDeleted FROM Account").await;
    let (headers, good) = wire_page(&client, &url, &token, 10, None, false).await;
    let next = header(&headers, "sforce-locator").to_owned();
    // Inside the last quoted field: `..."fal`, no closing quote, no newline.
    let at = good.len() - 4;
    assert!(good.ends_with(b"\"false\"\n"));

    sandbox.add_faults(&format!("truncate:at={at},times=2")).unwrap();
    let (headers, body) = wire_page(&client, &url, &token, 10, None, false).await;
    assert_eq!(body, &good[..at]);
    assert!(body.ends_with(b",\"fal"));
    assert!(headers.get("content-encoding").is_none());
    assert_eq!(header(&headers, "sforce-numberofrecords"), "10", "counts the whole page");
    assert_eq!(header(&headers, "sforce-locator"), next);
    let (headers, body) = wire_page(&client, &url, &token, 10, None, true).await;
    assert_eq!(header(&headers, "content-encoding"), "gzip");
    assert_eq!(header(&headers, "sforce-numberofrecords"), "10");
    assert_eq!(gunzip(&body).unwrap(), &good[..at], "a complete gzip stream of the cut CSV");

    // Past the end nothing is cut.
    sandbox.add_faults(&format!("truncate:at={},times=2", good.len() + 1)).unwrap();
    assert_eq!(wire_page(&client, &url, &token, 10, None, false).await.1, good);
    assert_eq!(gunzip(&wire_page(&client, &url, &token, 10, None, true).await.1).unwrap(), good);
    running.shutdown().await;
}

#[tokio::test]
async fn truncate_wire_cuts_the_gzip_stream() {
    let (sandbox, running, client, token, url) = completed_job(30, "SELECT Id, IsDeleted FROM Account").await;
    let (_, good) = wire_page(&client, &url, &token, 10, None, false).await;
    let (_, zipped) = wire_page(&client, &url, &token, 10, None, true).await;
    let at = zipped.len() / 2;

    sandbox.add_faults(&format!("truncate-wire:at={at},times=2")).unwrap();
    let (headers, body) = wire_page(&client, &url, &token, 10, None, true).await;
    assert_eq!(header(&headers, "content-encoding"), "gzip");
    assert_eq!(header(&headers, "sforce-numberofrecords"), "10");
    assert_eq!(body, &zipped[..at], "the compressed bytes, cut");
    let error = gunzip(&body).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
    // Not asked for gzip: the same cut as `truncate`.
    let (headers, body) = wire_page(&client, &url, &token, 10, None, false).await;
    assert!(headers.get("content-encoding").is_none());
    assert_eq!(body, &good[..at]);
    assert_eq!(wire_page(&client, &url, &token, 10, None, true).await.1, zipped, "spent after 2");
    running.shutdown().await;
}

#[tokio::test]
async fn repeat_locator_loops_on_the_same_page() {
    let (sandbox, running, client, token, url) = completed_job(250, "SELECT Id, Name FROM Account").await;
    let (headers, first) = wire_page(&client, &url, &token, 100, None, false).await;
    let second_locator = header(&headers, "sforce-locator").to_owned();
    let (headers, second) = wire_page(&client, &url, &token, 100, Some(&second_locator), false).await;
    let third_locator = header(&headers, "sforce-locator").to_owned();

    // From the first page (fetched without a locator), a locator back to it.
    sandbox.add_faults("repeat-locator:times=2").unwrap();
    let (headers, body) = wire_page(&client, &url, &token, 100, None, false).await;
    assert_eq!(body, first);
    let back = header(&headers, "sforce-locator").to_owned();
    assert_ne!(back, "null");
    assert_ne!(back, second_locator);
    let (headers, body) = wire_page(&client, &url, &token, 100, Some(&back), false).await;
    assert_eq!((body, header(&headers, "sforce-locator")), (first.clone(), back.as_str()), "a loop, not an error");
    let (headers, body) = wire_page(&client, &url, &token, 100, Some(&back), false).await;
    assert_eq!((body, header(&headers, "sforce-locator")), (first, second_locator.as_str()), "spent after 2");

    // From a later page, the locator that fetched it.
    sandbox.add_faults("repeat-locator").unwrap();
    let (headers, body) = wire_page(&client, &url, &token, 100, Some(&second_locator), false).await;
    assert_eq!((&body, header(&headers, "sforce-locator")), (&second, second_locator.as_str()));
    let (headers, body) = wire_page(&client, &url, &token, 100, Some(&second_locator), false).await;
    assert_eq!((body, header(&headers, "sforce-locator")), (second, third_locator.as_str()));
    running.shutdown().await;
}

#[tokio::test]
async fn clock_skew_moves_the_date_header_only_and_clear_faults_ends_every_fault() {
    let (sandbox, running, client, token, url) = completed_job(30, "SELECT Id, IsDeleted FROM Account").await;
    let limits_url = format!("{}/services/data/{V}/limits", running.base_url());
    let date = || {
        let sent = client.get(&limits_url).bearer_auth(&token).send();
        async move { sent.await.unwrap().headers()["date"].to_str().unwrap().to_owned() }
    };
    assert_eq!(date().await, "Thu, 01 Jan 2026 00:00:00 GMT");

    sandbox.add_faults("clock-skew:by=+3650d").unwrap();
    assert_eq!(date().await, "Sun, 30 Dec 2035 00:00:00 GMT");
    let token_response = client
        .post(running.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "nightjar-sandbox"),
            ("client_secret", "sandbox-secret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(token_response.headers()["date"], "Sun, 30 Dec 2035 00:00:00 GMT");
    // Data and job dates keep the sandbox clock.
    assert_eq!(sandbox.now(), new_year());
    let created: Json =
        create(&client, &running, &token, json!({"operation": "query", "query": "SELECT Id FROM Account"}))
            .await
            .json()
            .await
            .unwrap();
    assert_eq!(created["createdDate"], "2026-01-01T00:00:00.000+0000");
    sandbox.add_faults("clock-skew:by=-1d").unwrap();
    assert_eq!(date().await, "Wed, 31 Dec 2025 00:00:00 GMT", "a new skew replaces the old");

    let (_, good) = wire_page(&client, &url, &token, 10, None, false).await;
    sandbox
        .add_faults(
            "end-early:times=9;bad-page:times=9;truncate:at=5,times=9;truncate-wire:at=5,times=9;repeat-locator",
        )
        .unwrap();
    sandbox.clear_faults();
    assert_eq!(date().await, "Thu, 01 Jan 2026 00:00:00 GMT");
    let (headers, body) = wire_page(&client, &url, &token, 10, None, false).await;
    assert_eq!(body, good);
    assert_eq!(header(&headers, "sforce-locator"), "MTA");
    running.shutdown().await;
}
