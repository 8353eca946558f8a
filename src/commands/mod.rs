//! What the CLI prints: history tables, run details, validation results.
//! Rendering lives here (not in `main.rs`) so tests can check it.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use crate::state::{RejectRecord, RunRecord, StepRecord, WATERMARK_TRIGGER};

fn count(n: u64) -> String {
    n.to_string()
}

fn short_ts(ts: &Option<String>) -> String {
    // `2026-01-01T00:58:00.123Z` -> `2026-01-01 00:58:00`: the table is for people.
    ts.as_deref().map(|t| t.replace('T', " ").chars().take(19).collect()).unwrap_or_default()
}

fn duration(ms: Option<i64>) -> String {
    match ms {
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => String::new(),
    }
}

/// The history as a readable table, newest first.
pub fn history_table(runs: &[RunRecord]) -> String {
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "run",
        "job",
        "status",
        "trigger",
        "started (UTC)",
        "took",
        "window start",
        "window end",
        "extracted",
        "inserted",
        "updated",
        "deleted",
        "unchanged",
        "rejected",
        "error",
    ]);
    for r in runs {
        let error = r.error.as_deref().map(|e| e.chars().take(120).collect::<String>()).unwrap_or_default();
        table.add_row(vec![
            r.id.to_string(),
            r.job.clone(),
            r.status.as_str().to_string(),
            r.trigger.clone(),
            short_ts(&Some(r.started_at.clone())),
            duration(r.duration_ms),
            if r.window_start.is_none() && r.window_end.is_some() { "(all)".into() } else { short_ts(&r.window_start) },
            short_ts(&r.window_end),
            count(r.counts.extracted),
            count(r.counts.inserted),
            count(r.counts.updated),
            count(r.counts.deleted),
            count(r.counts.unchanged),
            count(r.counts.rejected),
            error,
        ]);
    }
    table.to_string()
}

/// One run in detail, with the time each step took.
pub fn run_details(r: &RunRecord, steps: &[StepRecord], rejects: Option<&[RejectRecord]>) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<18}{v}\n"));
    line(&mut out, "run", r.id.to_string());
    line(&mut out, "job", r.job.clone());
    line(&mut out, "status", r.status.as_str().into());
    line(&mut out, "trigger", r.trigger.clone());
    if r.attempt > 1 {
        let first = r.retry_of.map(|id| format!(" (retry of run {id})")).unwrap_or_default();
        line(&mut out, "attempt", format!("{}{first}", r.attempt));
    }
    line(&mut out, "started", r.started_at.clone());
    line(&mut out, "finished", r.finished_at.clone().unwrap_or_default());
    if r.trigger == WATERMARK_TRIGGER {
        // Not a run: a manual `nightjar watermark` change, kept in history.
        line(&mut out, "watermark before", r.watermark_before.clone().unwrap_or_else(|| "(none)".into()));
        line(&mut out, "watermark after", r.watermark_after.clone().unwrap_or_else(|| "(cleared)".into()));
        return out;
    }
    line(&mut out, "took", duration(r.duration_ms));
    line(
        &mut out,
        "window",
        format!(
            "{} .. {}",
            r.window_start.as_deref().unwrap_or("(beginning)"),
            r.window_end.as_deref().unwrap_or("(full refresh)")
        ),
    );
    line(&mut out, "watermark before", r.watermark_before.clone().unwrap_or_else(|| "(none)".into()));
    line(&mut out, "watermark after", r.watermark_after.clone().unwrap_or_else(|| "(unchanged)".into()));
    let c = &r.counts;
    line(
        &mut out,
        "rows",
        format!(
            "pages {} extracted {} filtered {} rejected {} inserted {} updated {} unchanged {} deleted {}",
            c.pages, c.extracted, c.filtered, c.rejected, c.inserted, c.updated, c.unchanged, c.deleted
        ),
    );
    line(&mut out, "salesforce jobs", r.salesforce_job_ids.join(", "));
    line(&mut out, "api calls", c.api_calls.to_string());
    if !steps.is_empty() {
        let parts: Vec<String> =
            steps.iter().map(|s| format!("{} {}", s.step, duration(Some(s.duration_ms)))).collect();
        line(&mut out, "steps", parts.join(", "));
    }
    if let Some(e) = &r.error {
        line(&mut out, "error class", r.error_class.clone().unwrap_or_default());
        line(&mut out, "error", e.clone());
    }
    if let Some(rejects) = rejects {
        let kept = rejects.len();
        let cap = crate::state::REJECTS_KEPT_PER_RUN;
        out.push_str(&format!("\nrejects: {} rows rejected, {kept} kept (at most {cap} per run)\n", r.counts.rejected));
        let mut table = Table::new();
        table.load_style(UTF8_FULL_CONDENSED).set_header(vec!["record", "column", "value", "reason"]);
        for rj in rejects {
            table.add_row(vec![
                rj.record_id.clone().unwrap_or_default(),
                rj.column.clone(),
                rj.value.clone().unwrap_or_else(|| "(null)".into()),
                rj.reason.clone(),
            ]);
        }
        out.push_str(&table.to_string());
        out.push('\n');
    }
    out
}
