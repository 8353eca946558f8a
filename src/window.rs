//! Incremental windows: `cursor >= watermark - lookback AND cursor < server_now - settle`.
//!
//! A leaf: `run` plans windows, `salesforce` turns them into SOQL, `alert`
//! and history show them.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

/// The cursor range one run extracts. `start = None` is the first run of a
/// job: everything before `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Option<DateTime<Utc>>,
    pub end: DateTime<Utc>,
}

/// Plans the window from the watermark and Salesforce's clock (never the
/// local one). Consecutive windows overlap by `lookback` and leave no gap.
pub fn plan_window(
    watermark: Option<DateTime<Utc>>,
    server_now: DateTime<Utc>,
    lookback: Duration,
    settle: Duration,
) -> Window {
    let lookback = chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::MAX);
    let settle = chrono::Duration::from_std(settle).unwrap_or(chrono::Duration::MAX);
    let end = server_now.checked_sub_signed(settle).unwrap_or(server_now);
    let start = watermark.map(|w| w.checked_sub_signed(lookback).unwrap_or(w));
    // A watermark ahead of the new end (a clock moved back, or a
    // hand-set watermark) must not move the watermark backwards or
    // skip data; extract from the watermark onwards with an empty window.
    let end = match watermark {
        Some(w) if w > end => w,
        _ => end,
    };
    Window { start, end }
}

/// SOQL datetime literal: unquoted, UTC; milliseconds only when present.
pub fn soql_datetime(t: DateTime<Utc>) -> String {
    if t.timestamp_subsec_millis() == 0 {
        t.to_rfc3339_opts(SecondsFormat::Secs, true)
    } else {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn window_overlaps_by_lookback_and_lags_by_settle() {
        let w = plan_window(
            Some(t("2026-01-01T00:00:00Z")),
            t("2026-01-01T01:00:00Z"),
            Duration::from_secs(600),
            Duration::from_secs(120),
        );
        assert_eq!(w.start, Some(t("2025-12-31T23:50:00Z")));
        assert_eq!(w.end, t("2026-01-01T00:58:00Z"));
    }

    #[test]
    fn consecutive_windows_leave_no_gap() {
        let first = plan_window(None, t("2026-01-01T01:00:00Z"), Duration::ZERO, Duration::from_secs(120));
        let second = plan_window(Some(first.end), t("2026-01-01T02:00:00Z"), Duration::ZERO, Duration::from_secs(120));
        assert_eq!(first.start, None);
        assert_eq!(second.start, Some(first.end));
    }

    #[test]
    fn watermark_never_moves_back() {
        let w = plan_window(Some(t("2026-01-02T00:00:00Z")), t("2026-01-01T00:00:00Z"), Duration::ZERO, Duration::ZERO);
        assert_eq!(w.end, t("2026-01-02T00:00:00Z"));
    }
}
