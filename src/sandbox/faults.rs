//! Fault injection: what real orgs do to clients on a bad day, on demand.
//!
//! A fault spec (`nightjar sandbox --faults SPEC`, or [`Sandbox::add_faults`]
//! from tests) is a `;`-separated list of faults, each `KIND[:OPTION,...]`
//! with options `key=value`:
//!
//! ```text
//! expire-session[:on=WHERE,nth=N,times=K]  expire every session and answer 401 INVALID_SESSION_ID
//!                                          "Session expired or invalid" (a refresh cures it)
//! rest-api-scope[:on=..,nth=..,times=..]   401 INVALID_SESSION_ID "This session is not valid for
//!                                          use with the REST API" (a refresh does not cure it)
//! limit-exceeded[:on=..,nth=..,times=..]   403 REQUEST_LIMIT_EXCEEDED "TotalRequests Limit exceeded."
//! http:code=503[,body=html|empty|json][,on=..,nth=..,times=..]
//!                                          answer with that status (5xx, 429, 420, ...) and body
//! drop[:on=..,nth=..,times=..]             send the real response's headers and half its body,
//!                                          then drop the connection
//! delay:ms=N[,on=..,nth=..,times=..]       answer N milliseconds late
//! fail-job[:times=K,message=TEXT]          the next K query jobs end Failed with errorMessage TEXT
//!                                          (message last: it may contain `,` and `=`, not `;`)
//! slow-jobs:polls=N                        query jobs need N polls to complete
//! api-budget:max=N[,used=U]                DailyApiRequests allowance N, U already used; past it
//!                                          every data call but /limits answers REQUEST_LIMIT_EXCEEDED
//! end-early[:nth=N,times=K]                a results page says `Sforce-Locator: null` although rows
//!                                          remain (the job's numberRecordsProcessed still counts them)
//! bad-page[:nth=N,times=K]                 one data row of a results page lacks its last field (has
//!                                          an extra one if there is one column); row count unchanged
//! truncate:at=B[,nth=N,times=K]            a results page's CSV is cut after B bytes, then gzipped if
//!                                          asked; Content-Length fits, Sforce-NumberOfRecords does not
//! truncate-wire:at=B[,nth=N,times=K]       like truncate, but the cut is made after gzip: complete
//!                                          HTTP framing around a cut gzip stream
//! repeat-locator[:nth=N,times=K]           a results page's Sforce-Locator leads back to that same
//!                                          page, so a client that follows it never gets further
//! clock-skew:by=[+|-]DURATION              from now on the HTTP Date header is the sandbox clock plus
//!                                          DURATION (humantime: by=-3650d, by=+90m); data keeps the clock
//! ```
//!
//! `on` picks the requests a fault counts: `any` (default), `token`,
//! `create`, `poll`, `results`, `abort`, `limits`, `describe`, or a path
//! fragment starting with `/`. The results-page faults (`end-early`,
//! `bad-page`, `truncate`, `truncate-wire`, `repeat-locator`) take no `on`:
//! they count `results` requests. The fault hits matching requests number
//! `nth` (default 1) through `nth + times - 1` (default `times=1`), counted
//! from when it was added; a large `times` makes it persistent. Example:
//!
//! ```text
//! http:code=503,body=html,on=results,times=2;expire-session:on=results,nth=2;api-budget:max=500
//! ```

use std::time::Duration;

use super::SandboxError;

/// Which requests a fault watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultTarget {
    Any,
    Token,
    Create,
    Poll,
    Results,
    Abort,
    Limits,
    Describe,
    /// Requests whose path contains this text.
    Path(String),
}

/// The kind of endpoint a request hits, as faults see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Token,
    Create,
    Poll,
    Results,
    Abort,
    Limits,
    Describe,
    Other,
}

impl Endpoint {
    pub(crate) fn classify(method: &str, path: &str) -> Endpoint {
        if path.starts_with("/services/oauth2/") {
            return Endpoint::Token;
        }
        let Some(rest) = path.strip_prefix("/services/data/") else {
            return Endpoint::Other;
        };
        let rest = rest.split_once('/').map_or("", |(_, r)| r);
        if rest == "limits" {
            Endpoint::Limits
        } else if rest.starts_with("sobjects") {
            Endpoint::Describe
        } else if rest == "jobs/query" && method == "POST" {
            Endpoint::Create
        } else if rest.starts_with("jobs/query/") && rest.ends_with("/results") {
            Endpoint::Results
        } else if rest.starts_with("jobs/query/") && method == "PATCH" {
            Endpoint::Abort
        } else if rest.starts_with("jobs/query/") && method == "GET" {
            Endpoint::Poll
        } else {
            Endpoint::Other
        }
    }
}

impl FaultTarget {
    fn matches(&self, endpoint: Endpoint, path: &str) -> bool {
        match self {
            FaultTarget::Any => true,
            FaultTarget::Token => endpoint == Endpoint::Token,
            FaultTarget::Create => endpoint == Endpoint::Create,
            FaultTarget::Poll => endpoint == Endpoint::Poll,
            FaultTarget::Results => endpoint == Endpoint::Results,
            FaultTarget::Abort => endpoint == Endpoint::Abort,
            FaultTarget::Limits => endpoint == Endpoint::Limits,
            FaultTarget::Describe => endpoint == Endpoint::Describe,
            FaultTarget::Path(fragment) => path.contains(fragment.as_str()),
        }
    }
}

/// What the body of an injected error status looks like; edges and proxies
/// answer with HTML or nothing, Salesforce itself with a JSON error array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorBody {
    Html,
    Empty,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    ExpireSession,
    RestApiScope,
    LimitExceeded,
    Status {
        code: u16,
        body: ErrorBody,
    },
    /// Headers and half the body, then the connection drops.
    Drop,
    Delay(Duration),
    /// A results page served, but wrong.
    Page(PageFault),
}

/// How a results page goes wrong while the response around it looks fine;
/// each is something a client can only catch by checking what it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFault {
    /// `Sforce-Locator: null` although rows remain.
    EndEarly,
    /// The first data row a field short (or over, on a one-column page);
    /// a page without rows is served as it is.
    BadPage,
    /// The CSV cut after this many bytes, before any gzip.
    Truncate(usize),
    /// The bytes sent cut after this many, after any gzip.
    TruncateWire(usize),
    /// The next-page locator leads back to this page.
    RepeatLocator,
}

/// One injected fault: `action` on matching requests `nth ..= nth+times-1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    pub action: FaultAction,
    pub on: FaultTarget,
    pub nth: u32,
    pub times: u32,
    /// Matching requests seen so far.
    seen: u32,
}

impl FaultRule {
    pub fn new(action: FaultAction, on: FaultTarget) -> FaultRule {
        FaultRule { action, on, nth: 1, times: 1, seen: 0 }
    }

    /// Hit the `nth` matching request first (1-based).
    pub fn nth(mut self, nth: u32) -> FaultRule {
        self.nth = nth.max(1);
        self
    }

    pub fn times(mut self, times: u32) -> FaultRule {
        self.times = times;
        self
    }

    /// Counts a request; `true` when this one is hit.
    fn observe(&mut self, endpoint: Endpoint, path: &str) -> bool {
        if !self.on.matches(endpoint, path) {
            return false;
        }
        self.seen = self.seen.saturating_add(1);
        self.seen >= self.nth && self.seen - self.nth < self.times
    }

    fn spent(&self) -> bool {
        self.seen >= self.nth.saturating_add(self.times).saturating_sub(1)
    }
}

/// One parsed item of a fault spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Rule(FaultRule),
    FailJobs { times: u32, message: String },
    SlowJobs { polls: u32 },
    ApiBudget { max: u64, used: u64 },
    ClockSkew { by: chrono::TimeDelta },
}

/// The faults in force; the first rule that hits a request decides it.
#[derive(Debug, Default)]
pub(crate) struct FaultBook {
    rules: Vec<FaultRule>,
    /// Added to the sandbox clock for the `Date` header only: record
    /// timestamps and job dates stay on the clock, as a server whose
    /// clock is wrong still stores what it stores.
    date_skew: chrono::TimeDelta,
}

impl FaultBook {
    pub(crate) fn add(&mut self, rule: FaultRule) {
        self.rules.push(rule);
    }

    /// Every rule counts the request (so `nth` means the same thing whatever
    /// else is configured); spent rules are dropped.
    pub(crate) fn hit(&mut self, method: &str, path: &str) -> Option<FaultAction> {
        let endpoint = Endpoint::classify(method, path);
        let mut chosen = None;
        for rule in &mut self.rules {
            if rule.observe(endpoint, path) && chosen.is_none() {
                chosen = Some(rule.action.clone());
            }
        }
        self.rules.retain(|r| !r.spent());
        chosen
    }

    pub(crate) fn set_date_skew(&mut self, by: chrono::TimeDelta) {
        self.date_skew = by;
    }

    pub(crate) fn date_skew(&self) -> chrono::TimeDelta {
        self.date_skew
    }

    pub(crate) fn clear(&mut self) {
        self.rules.clear();
        self.date_skew = chrono::TimeDelta::zero();
    }
}

/// Parses a fault spec (grammar in the module docs).
pub fn parse_faults(spec: &str) -> Result<Vec<Fault>, SandboxError> {
    spec.split(';').map(str::trim).filter(|s| !s.is_empty()).map(parse_one).collect()
}

fn parse_one(item: &str) -> Result<Fault, SandboxError> {
    let bad = |reason: String| SandboxError::InvalidFaultSpec { spec: item.to_owned(), reason };
    let (kind, rest) = item.split_once(':').unwrap_or((item, ""));
    let kind = kind.trim();
    // `message` swallows the rest of the item so it can hold commas.
    let (rest, message) = match rest.find("message=") {
        Some(i) => (rest.get(..i).unwrap_or_default(), rest.get(i + "message=".len()..).map(str::to_owned)),
        None => (rest, None),
    };
    let mut options: Vec<(&str, &str)> = Vec::new();
    for option in rest.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = option.split_once('=').ok_or_else(|| bad(format!("option `{option}` is not key=value")))?;
        options.push((key.trim(), value.trim()));
    }
    let get = |key: &str| options.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let number = |key: &str, default: u64| -> Result<u64, SandboxError> {
        match get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| bad(format!("`{key}` must be a whole number, got `{v}`"))),
        }
    };
    let allowed: &[&str] = match kind {
        "expire-session" | "rest-api-scope" | "limit-exceeded" | "drop" => &["on", "nth", "times"],
        "http" => &["code", "body", "on", "nth", "times"],
        "delay" => &["ms", "on", "nth", "times"],
        "fail-job" => &["times"],
        "slow-jobs" => &["polls"],
        "api-budget" => &["max", "used"],
        "end-early" | "bad-page" | "repeat-locator" => &["nth", "times"],
        "truncate" | "truncate-wire" => &["at", "nth", "times"],
        "clock-skew" => &["by"],
        other => {
            return Err(bad(format!(
                "unknown fault `{other}`; use expire-session, rest-api-scope, limit-exceeded, http, drop, \
                 delay, fail-job, slow-jobs, api-budget, end-early, bad-page, truncate, truncate-wire, \
                 repeat-locator or clock-skew"
            )));
        }
    };
    if let Some((key, _)) = options.iter().find(|(k, _)| !allowed.contains(k)) {
        return Err(bad(format!("`{kind}` takes no option `{key}`; it takes {}", allowed.join(", "))));
    }
    if message.is_some() && kind != "fail-job" {
        return Err(bad(format!("`{kind}` takes no option `message`")));
    }
    let as_u32 = |v: u64, key: &str| u32::try_from(v).map_err(|_| bad(format!("`{key}` is too large")));
    let action = match kind {
        "expire-session" => FaultAction::ExpireSession,
        "rest-api-scope" => FaultAction::RestApiScope,
        "limit-exceeded" => FaultAction::LimitExceeded,
        "drop" => FaultAction::Drop,
        "http" => {
            let code = get("code").ok_or_else(|| bad("`http` needs code=STATUS, e.g. code=503".into()))?;
            let code: u16 = code
                .parse()
                .ok()
                .filter(|c| (400..=599).contains(c))
                .ok_or_else(|| bad(format!("code `{code}` is not an HTTP error status (400-599)")))?;
            let body = match get("body").unwrap_or("json") {
                "html" => ErrorBody::Html,
                "empty" => ErrorBody::Empty,
                "json" => ErrorBody::Json,
                other => return Err(bad(format!("body `{other}` must be html, empty or json"))),
            };
            FaultAction::Status { code, body }
        }
        "delay" => {
            let ms = get("ms").ok_or_else(|| bad("`delay` needs ms=MILLISECONDS".into()))?;
            FaultAction::Delay(Duration::from_millis(number("ms", 0).map_err(|_| bad(format!("bad ms `{ms}`")))?))
        }
        "end-early" => FaultAction::Page(PageFault::EndEarly),
        "bad-page" => FaultAction::Page(PageFault::BadPage),
        "repeat-locator" => FaultAction::Page(PageFault::RepeatLocator),
        "truncate" | "truncate-wire" => {
            if get("at").is_none() {
                return Err(bad(format!("`{kind}` needs at=BYTES, e.g. at=100")));
            }
            let at = usize::try_from(number("at", 0)?).map_err(|_| bad("`at` is too large".into()))?;
            FaultAction::Page(if kind == "truncate" { PageFault::Truncate(at) } else { PageFault::TruncateWire(at) })
        }
        "clock-skew" => {
            let by = get("by").ok_or_else(|| bad("`clock-skew` needs by=DURATION, e.g. by=+3650d".into()))?;
            return Ok(Fault::ClockSkew {
                by: parse_skew(by).ok_or_else(|| {
                    bad(format!("`by` must be a duration with an optional sign, e.g. +3650d, -1d or 90m; got `{by}`"))
                })?,
            });
        }
        "fail-job" => {
            return Ok(Fault::FailJobs {
                times: as_u32(number("times", 1)?, "times")?,
                message: message.unwrap_or_else(|| {
                    "Unexpected exception encountered in query processing. Please contact support with the \
                     following id: 326566388-63578 (-436445966)"
                        .to_owned()
                }),
            });
        }
        "slow-jobs" => {
            let polls = as_u32(number("polls", 0)?, "polls")?;
            if polls == 0 {
                return Err(bad("`slow-jobs` needs polls=N with N >= 1".into()));
            }
            return Ok(Fault::SlowJobs { polls });
        }
        "api-budget" => {
            let max = number("max", 0)?;
            if get("max").is_none() {
                return Err(bad("`api-budget` needs max=N".into()));
            }
            return Ok(Fault::ApiBudget { max, used: number("used", 0)? });
        }
        other => return Err(bad(format!("unknown fault `{other}`"))),
    };
    // Page faults reshape result pages, so results requests are what they count.
    let default_on = if matches!(action, FaultAction::Page(_)) { "results" } else { "any" };
    let on = match get("on").unwrap_or(default_on) {
        "any" => FaultTarget::Any,
        "token" => FaultTarget::Token,
        "create" => FaultTarget::Create,
        "poll" => FaultTarget::Poll,
        "results" => FaultTarget::Results,
        "abort" => FaultTarget::Abort,
        "limits" => FaultTarget::Limits,
        "describe" => FaultTarget::Describe,
        path if path.starts_with('/') => FaultTarget::Path(path.to_owned()),
        other => {
            return Err(bad(format!(
                "on `{other}` must be any, token, create, poll, results, abort, limits, describe or a /path"
            )));
        }
    };
    let nth = as_u32(number("nth", 1)?, "nth")?;
    if nth == 0 {
        return Err(bad("`nth` counts from 1".into()));
    }
    let times = as_u32(number("times", 1)?, "times")?;
    Ok(Fault::Rule(FaultRule::new(action, on).nth(nth).times(times)))
}

/// `+3650d`, `-1d`, `90m`: a humantime duration, negative with a leading `-`.
fn parse_skew(text: &str) -> Option<chrono::TimeDelta> {
    let (negative, magnitude) = match text.as_bytes().first() {
        Some(b'-') => (true, text.get(1..)?),
        Some(b'+') => (false, text.get(1..)?),
        _ => (false, text),
    };
    let by = chrono::TimeDelta::from_std(humantime::parse_duration(magnitude.trim()).ok()?).ok()?;
    Some(if negative { -by } else { by })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let faults = parse_faults(
            "http:code=503,body=html,on=results,times=2; expire-session:on=results,nth=2;api-budget:max=500",
        )
        .unwrap();
        assert_eq!(
            faults,
            vec![
                Fault::Rule(
                    FaultRule::new(FaultAction::Status { code: 503, body: ErrorBody::Html }, FaultTarget::Results)
                        .times(2)
                ),
                Fault::Rule(FaultRule::new(FaultAction::ExpireSession, FaultTarget::Results).nth(2)),
                Fault::ApiBudget { max: 500, used: 0 },
            ]
        );
        let faults = parse_faults("fail-job:times=2,message=Boom, with a comma=yes").unwrap();
        assert_eq!(faults, vec![Fault::FailJobs { times: 2, message: "Boom, with a comma=yes".into() }]);
    }

    #[test]
    fn parses_page_faults_and_clock_skew() {
        let page = |fault| FaultRule::new(FaultAction::Page(fault), FaultTarget::Results);
        let faults = parse_faults(
            "end-early; bad-page:times=1000; truncate:at=120,nth=2; truncate-wire:at=0; repeat-locator:nth=3,times=2",
        )
        .unwrap();
        assert_eq!(
            faults,
            vec![
                Fault::Rule(page(PageFault::EndEarly)),
                Fault::Rule(page(PageFault::BadPage).times(1000)),
                Fault::Rule(page(PageFault::Truncate(120)).nth(2)),
                Fault::Rule(page(PageFault::TruncateWire(0))),
                Fault::Rule(page(PageFault::RepeatLocator).nth(3).times(2)),
            ]
        );
        for (spec, by) in [
            ("clock-skew:by=+3650d", chrono::TimeDelta::days(3650)),
            ("clock-skew:by=-1d", chrono::TimeDelta::days(-1)),
            ("clock-skew:by=90m", chrono::TimeDelta::minutes(90)),
            ("clock-skew:by=-1h 30m", chrono::TimeDelta::minutes(-90)),
        ] {
            assert_eq!(parse_faults(spec).unwrap(), vec![Fault::ClockSkew { by }], "{spec}");
        }
    }

    #[test]
    fn clearing_ends_rules_and_skew() {
        let mut book = FaultBook::default();
        book.add(FaultRule::new(FaultAction::Page(PageFault::EndEarly), FaultTarget::Results).times(5));
        book.set_date_skew(chrono::TimeDelta::days(1));
        book.clear();
        assert_eq!(book.hit("GET", "/services/data/v62.0/jobs/query/750x/results"), None);
        assert_eq!(book.date_skew(), chrono::TimeDelta::zero());
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (spec, reason) in [
            ("explode", "unknown fault `explode`"),
            ("http:code=200", "not an HTTP error status"),
            ("http", "needs code"),
            ("drop:on=everywhere", "on `everywhere`"),
            ("drop:nth=0", "counts from 1"),
            ("delay:ms=5,code=503", "takes no option `code`"),
            ("slow-jobs:polls=x", "whole number"),
            ("expire-session:times", "not key=value"),
            ("truncate", "`truncate` needs at=BYTES"),
            ("truncate-wire:nth=2", "`truncate-wire` needs at=BYTES"),
            ("truncate:at=-1", "`at` must be a whole number"),
            ("end-early:on=poll", "`end-early` takes no option `on`"),
            ("repeat-locator:at=3", "takes no option `at`"),
            ("bad-page:nth=0", "counts from 1"),
            ("clock-skew", "needs by=DURATION"),
            ("clock-skew:by=soon", "`by` must be a duration"),
            ("clock-skew:by=+", "`by` must be a duration"),
            ("clock-skew:by=1d,nth=2", "takes no option `nth`"),
        ] {
            let err = parse_faults(spec).unwrap_err().to_string();
            assert!(err.contains(reason), "{spec}: {err}");
        }
    }

    #[test]
    fn rules_hit_the_nth_matching_requests_only() {
        let mut book = FaultBook::default();
        book.add(FaultRule::new(FaultAction::Drop, FaultTarget::Results).nth(2).times(2));
        let results = "/services/data/v62.0/jobs/query/750x/results";
        let poll = "/services/data/v62.0/jobs/query/750x";
        assert_eq!(book.hit("GET", poll), None);
        assert_eq!(book.hit("GET", results), None);
        assert_eq!(book.hit("GET", results), Some(FaultAction::Drop));
        assert_eq!(book.hit("GET", poll), None);
        assert_eq!(book.hit("GET", results), Some(FaultAction::Drop));
        assert_eq!(book.hit("GET", results), None);
        assert!(book.rules.is_empty(), "spent rules are dropped");
    }

    #[test]
    fn endpoints_are_classified() {
        let v = "/services/data/v62.0";
        assert_eq!(Endpoint::classify("POST", "/services/oauth2/token"), Endpoint::Token);
        assert_eq!(Endpoint::classify("POST", &format!("{v}/jobs/query")), Endpoint::Create);
        assert_eq!(Endpoint::classify("GET", &format!("{v}/jobs/query/750A")), Endpoint::Poll);
        assert_eq!(Endpoint::classify("PATCH", &format!("{v}/jobs/query/750A")), Endpoint::Abort);
        assert_eq!(Endpoint::classify("GET", &format!("{v}/jobs/query/750A/results")), Endpoint::Results);
        assert_eq!(Endpoint::classify("GET", &format!("{v}/limits")), Endpoint::Limits);
        assert_eq!(Endpoint::classify("GET", &format!("{v}/sobjects/Account/describe")), Endpoint::Describe);
    }
}
