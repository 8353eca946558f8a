//! The sandbox's own control endpoints under `/sandbox/`, so a data team
//! running `nightjar sandbox` can change data and move time between runs
//! without writing code. They are not part of the Salesforce API: no token,
//! no `Date`/`Sforce-Limit-Info` envelope, and not in the request log.
//!
//! ```text
//! GET  /sandbox/clock                          {"now": "..."}
//! POST /sandbox/clock/advance?by=5m            {"now": "..."}
//! POST /sandbox/objects/Account/update?count=10  {"ids": [...]}
//! POST /sandbox/objects/Account/insert?count=10  {"ids": [...]}
//! POST /sandbox/objects/Account/delete?ids=001...,001...  {"ids": [...]}
//! ```

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::{Sandbox, SandboxError};

pub(crate) fn routes(sandbox: Sandbox) -> Router {
    Router::new()
        .route("/sandbox/clock", get(clock))
        .route("/sandbox/clock/advance", post(advance))
        .route("/sandbox/objects/{object}/{action}", post(change))
        .with_state(sandbox)
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

async fn clock(State(sandbox): State<Sandbox>) -> Response {
    Json(json!({ "now": sandbox.now().to_rfc3339() })).into_response()
}

async fn advance(State(sandbox): State<Sandbox>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(by) = q.get("by") else {
        return bad_request("give ?by=DURATION, e.g. ?by=5m".into());
    };
    match humantime::parse_duration(by) {
        Ok(d) => {
            sandbox.advance_clock(d);
            Json(json!({ "now": sandbox.now().to_rfc3339() })).into_response()
        }
        Err(e) => bad_request(format!("`{by}` is not a duration: {e}")),
    }
}

async fn change(
    State(sandbox): State<Sandbox>,
    Path((object, action)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let count = || -> Result<usize, String> {
        q.get("count").ok_or("give ?count=N")?.parse().map_err(|_| "count must be a whole number".to_owned())
    };
    let result: Result<Vec<String>, SandboxError> = match action.as_str() {
        "update" => match count() {
            Ok(n) => sandbox.update_records(&object, n),
            Err(message) => return bad_request(message),
        },
        "insert" => match count() {
            Ok(n) => sandbox.insert_records(&object, n),
            Err(message) => return bad_request(message),
        },
        "delete" => {
            let ids: Vec<String> = q
                .get("ids")
                .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
                .unwrap_or_default();
            if ids.is_empty() {
                return bad_request("give ?ids=ID,ID,...".into());
            }
            sandbox.delete_records(&object, &ids).map(|()| ids)
        }
        other => return bad_request(format!("unknown action `{other}`; use update, insert or delete")),
    };
    match result {
        Ok(ids) => Json(json!({ "ids": ids })).into_response(),
        Err(e) => bad_request(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::super::SandboxConfig;
    use super::*;

    #[tokio::test]
    async fn change_data_and_time_over_http() {
        let config = SandboxConfig { objects: vec![("Account".into(), 20)], ..SandboxConfig::default() };
        let sandbox = Sandbox::new(config).unwrap();
        let running = sandbox.start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let http = reqwest::Client::new();
        let base = running.base_url().to_string();
        let before = sandbox.now();

        let r = http.post(format!("{base}/sandbox/clock/advance?by=5m")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sandbox.now() - before, chrono::Duration::minutes(5));

        let r: serde_json::Value = http
            .post(format!("{base}/sandbox/objects/Account/update?count=3"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<String> = serde_json::from_value(r["ids"].clone()).unwrap();
        assert_eq!(ids.len(), 3);

        let r = http.post(format!("{base}/sandbox/objects/Account/delete?ids={}", ids[0])).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let deleted = sandbox
            .records("Account")
            .unwrap()
            .into_iter()
            .filter(|rec| rec.iter().any(|(k, v)| k == "IsDeleted" && v.as_deref() == Some("true")))
            .count();
        assert_eq!(deleted, 1);

        let r = http.post(format!("{base}/sandbox/objects/Nope/insert?count=1")).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let r = http.post(format!("{base}/sandbox/clock/advance?by=soon")).send().await.unwrap();
        assert_eq!(r.status(), 400);
        running.shutdown().await;
    }
}
