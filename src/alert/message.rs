//! What an alert says: subject, a plain-text part and an HTML part with the
//! same facts, and one remedy line per error class, so on-call staff can act
//! without opening a log.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::outcome::ErrorClass;
use crate::state::{AlertKind, LastSuccess, RunCounts, RunId, ts};
use crate::window::Window;

use super::ErrorDetail;

/// The remedy as a mail about `run` prints it.
pub fn remedy_for(class: Option<ErrorClass>, run: RunId) -> String {
    match class {
        Some(class) => class.remedy().replace("RUN", &run.to_string()),
        None => format!("Read the error above and `nightjar show {run}` for details."),
    }
}

/// Everything a run alert shows.
pub struct Facts<'a> {
    pub job: &'a str,
    pub run: RunId,
    pub trigger: &'a str,
    pub kind: AlertKind,
    /// Failures this mail speaks for (since the last failure mail).
    pub failures: u32,
    /// Failures in a row so far, and the first of them.
    pub streak_failures: u32,
    pub first_failed_run: Option<RunId>,
    pub window: Option<Window>,
    pub full_refresh: bool,
    pub counts: &'a RunCounts,
    pub salesforce_job_ids: &'a [String],
    pub error: Option<&'a ErrorDetail>,
    pub last_success: Option<&'a LastSuccess>,
    pub finished_at: DateTime<Utc>,
    pub public_url: Option<&'a str>,
    pub repeat_after: Duration,
    /// Whether a recovery mail will follow (`[alerts].on`).
    pub on_recovery: bool,
}

/// A rendered email.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

fn verb(kind: AlertKind) -> &'static str {
    match kind {
        AlertKind::Failed => "FAILED",
        AlertKind::Abandoned => "ABANDONED",
        AlertKind::TimedOut => "TIMED OUT",
        AlertKind::SkippedBudget => "SKIPPED",
        AlertKind::Recovery => "RECOVERED",
        AlertKind::Test => "TEST",
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

/// Label/value lines; the text and HTML parts are both made from them.
struct Body {
    headline: String,
    rows: Vec<(&'static str, String)>,
    link: Option<String>,
}

impl Body {
    fn text(&self) -> String {
        let mut out = format!("{}\n\n", self.headline);
        for (label, value) in &self.rows {
            let _ = writeln!(out, "{:<15}{}", format!("{label}:"), value.replace('\n', "\n               "));
        }
        if let Some(link) = &self.link {
            let _ = writeln!(out, "{:<15}{link}", "Run page:");
        }
        out.push_str("\n-- \nnightjar\n");
        out
    }

    fn html(&self) -> String {
        let mut out =
            String::from("<!DOCTYPE html>\n<html><body style=\"font-family: sans-serif; font-size: 14px\">\n");
        let _ = writeln!(out, "<p><strong>{}</strong></p>", escape(&self.headline));
        out.push_str("<table cellpadding=\"4\" style=\"border-collapse: collapse\">\n");
        for (label, value) in &self.rows {
            let _ = writeln!(
                out,
                "<tr><th align=\"left\" valign=\"top\">{}</th><td style=\"white-space: pre-wrap\">{}</td></tr>",
                escape(label),
                escape(value)
            );
        }
        if let Some(link) = &self.link {
            let href = escape(link);
            let _ = writeln!(out, "<tr><th align=\"left\">Run page</th><td><a href=\"{href}\">{href}</a></td></tr>");
        }
        out.push_str("</table>\n<p style=\"color: #666\">nightjar</p>\n</body></html>\n");
        out
    }
}

/// Minimal HTML escaping for text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn window_line(f: &Facts<'_>) -> String {
    match f.window {
        Some(w) => format!("{} .. {}", w.start.map(ts).unwrap_or_else(|| "(beginning)".into()), ts(w.end)),
        None if f.full_refresh => "(full refresh: the job has no cursor)".into(),
        None => "(not planned: the run failed before planning its window)".into(),
    }
}

fn last_success_line(f: &Facts<'_>) -> String {
    match f.last_success {
        Some(s) => format!(
            "run {}, finished {}; watermark {}",
            s.run,
            s.finished_at.as_deref().unwrap_or("(unknown)"),
            s.watermark.as_deref().unwrap_or("(none)")
        ),
        None => "(none yet)".into(),
    }
}

fn link(f: &Facts<'_>) -> Option<String> {
    f.public_url.map(|u| format!("{}/runs/{}", u.trim_end_matches('/'), f.run))
}

/// A failure-kind alert (failed, abandoned, timed out, skipped).
pub fn failure(f: &Facts<'_>) -> Rendered {
    let class_name = f.error.map(|e| e.class.as_str()).unwrap_or("unknown");
    let subject = format!("[nightjar] {} {} — {}", verb(f.kind), f.job, class_name);
    let what = match f.kind {
        AlertKind::Abandoned => "was abandoned (its process died while it ran)",
        AlertKind::TimedOut => "timed out",
        AlertKind::SkippedBudget => "was skipped: the org's API budget is too low",
        _ => "failed",
    };
    let mut rows = vec![
        ("Error class", class_name.to_string()),
        ("What to do", remedy_for(f.error.map(|e| e.class), f.run)),
        ("Error", f.error.map(|e| e.message.clone()).unwrap_or_else(|| "(no error message)".into())),
        ("Job", f.job.to_string()),
        ("Run", f.run.to_string()),
        ("Trigger", f.trigger.to_string()),
        ("Finished", ts(f.finished_at)),
        ("Window", window_line(f)),
    ];
    let c = f.counts;
    rows.push((
        "Rows so far",
        format!(
            "{} extracted in {} page(s), {} rejected; nothing was committed, the target is as before",
            c.extracted, c.pages, c.rejected
        ),
    ));
    if let Some(sf) = f.error.and_then(|e| e.salesforce.as_ref()) {
        let mut parts = Vec::new();
        if let Some(code) = &sf.code {
            parts.push(format!("error code {code}"));
        }
        parts.push(format!("message: {}", sf.message));
        if let Some(id) = &sf.job_id {
            parts.push(format!("job {id}"));
        }
        rows.push(("Salesforce", parts.join("; ")));
    }
    if !f.salesforce_job_ids.is_empty() {
        rows.push(("Salesforce jobs", f.salesforce_job_ids.join(", ")));
    }
    let streak = match (f.streak_failures, f.first_failed_run) {
        (n, Some(first)) if n > 1 => format!("{n} failed runs in a row since run {first}"),
        _ => "the first failure after the last success".into(),
    };
    let failures =
        if f.failures > 1 { format!("{} failures since the last email; {streak}", f.failures) } else { streak };
    rows.push(("Failures", failures));
    rows.push(("Last success", last_success_line(f)));
    rows.push((
        "Next email",
        format!(
            "at most one more per {} while the job keeps failing{}",
            human(f.repeat_after),
            if f.on_recovery { ", and one when it recovers" } else { "" }
        ),
    ));
    rows.push(("Details", format!("nightjar show {}", f.run)));
    let body = Body { headline: format!("nightjar: job `{}` {what} (run {}).", f.job, f.run), rows, link: link(f) };
    Rendered { subject, text: body.text(), html: body.html() }
}

/// The first success after failures.
pub fn recovery(f: &Facts<'_>) -> Rendered {
    let subject = format!("[nightjar] RECOVERED {}", f.job);
    let c = f.counts;
    let since = f.first_failed_run.map(|r| format!(" since run {r}")).unwrap_or_default();
    let rows = vec![
        ("Job", f.job.to_string()),
        ("Run", f.run.to_string()),
        ("Trigger", f.trigger.to_string()),
        ("Finished", ts(f.finished_at)),
        ("Failed before", format!("{} failed run(s) in a row{since}", f.failures)),
        ("Window", window_line(f)),
        (
            "Rows",
            format!(
                "{} extracted, {} inserted, {} updated, {} unchanged, {} deleted, {} rejected",
                c.extracted, c.inserted, c.updated, c.unchanged, c.deleted, c.rejected
            ),
        ),
        ("Watermark", f.window.map(|w| ts(w.end)).unwrap_or_else(|| "(full refresh)".into())),
        ("Details", format!("nightjar show {}", f.run)),
    ];
    let body = Body {
        headline: format!("nightjar: job `{}` succeeded again (run {}) after failing.", f.job, f.run),
        rows,
        link: link(f),
    };
    Rendered { subject, text: body.text(), html: body.html() }
}

/// `nightjar alerts test`.
pub fn test_mail(host: &str, port: u16, security: &str, now: DateTime<Utc>) -> Rendered {
    let body = Body {
        headline: "nightjar: this is a test email. If you can read it, the [smtp] settings work.".into(),
        rows: vec![("SMTP server", format!("{host}:{port} ({security})")), ("Sent", ts(now))],
        link: None,
    };
    Rendered { subject: "[nightjar] test email".into(), text: body.text(), html: body.html() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::SalesforceDetail;

    fn facts<'a>(counts: &'a RunCounts, error: Option<&'a ErrorDetail>, ids: &'a [String]) -> Facts<'a> {
        Facts {
            job: "accounts",
            run: 12,
            trigger: "schedule",
            kind: AlertKind::Failed,
            failures: 1,
            streak_failures: 1,
            first_failed_run: Some(12),
            window: None,
            full_refresh: false,
            counts,
            salesforce_job_ids: ids,
            error,
            last_success: None,
            finished_at: DateTime::<Utc>::UNIX_EPOCH,
            public_url: Some("https://etl.example.com/"),
            repeat_after: Duration::from_secs(6 * 3600),
            on_recovery: true,
        }
    }

    #[test]
    fn failure_mail_names_class_remedy_salesforce_details_and_link_in_both_parts() {
        let counts = RunCounts { extracted: 7, pages: 1, ..Default::default() };
        let error = ErrorDetail {
            class: ErrorClass::QueryTimeout,
            message: "Salesforce query job 750X failed: <timed out>".into(),
            salesforce: Some(SalesforceDetail {
                code: None,
                message: "<timed out>".into(),
                job_id: Some("750X".into()),
            }),
        };
        let ids = vec!["750X".to_string()];
        let mail = failure(&facts(&counts, Some(&error), &ids));
        assert_eq!(mail.subject, "[nightjar] FAILED accounts — query_timeout");
        for part in [&mail.text, &mail.html] {
            assert!(part.contains("ran too long"), "{part}");
            assert!(part.contains("750X"), "{part}");
            assert!(part.contains("https://etl.example.com/runs/12"), "{part}");
            assert!(part.contains("7 extracted"), "{part}");
            assert!(part.contains("6h"), "{part}");
        }
        assert!(mail.html.contains("&lt;timed out&gt;") && !mail.html.contains("<timed out>"));
    }
}
