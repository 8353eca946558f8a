//! A job's `schedule` in its `timezone`, compiled once.
//!
//! tokio-cron-scheduler only ticks `serve`, once a second, in UTC. Each
//! job's fire times are computed here with croner in the job's own time zone
//! (chrono-tz), because the scheduler turns a time zone into a fixed UTC
//! offset when a job is created: a `0 0 6 * * *` Europe/Berlin job would fire
//! at 07:00 local after the spring DST change. Computing the instant from
//! local wall-clock time each time keeps it at 06:00 all year.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// A job's cron expression in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
    expr: String,
}

impl Schedule {
    /// Parses a 6-field cron expression (seconds first) the way
    /// tokio-cron-scheduler does: day-of-month and day-of-week are ANDed.
    pub fn parse_cron(expr: &str) -> Result<Cron, String> {
        CronParser::builder()
            .seconds(Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expr)
            .map_err(|e| format!("schedule `{expr}`: {e} (6 fields, seconds first, e.g. \"0 30 2 * * *\")"))
    }

    /// An IANA time zone name.
    pub fn parse_timezone(name: &str) -> Result<Tz, String> {
        name.parse::<Tz>()
            .map_err(|_| format!("unknown timezone `{name}`; use an IANA name such as \"Europe/Berlin\" or \"UTC\""))
    }

    pub fn new(cron: Cron, tz: Tz, expr: &str) -> Schedule {
        Schedule { cron, tz, expr: expr.to_string() }
    }

    /// Parses both parts at once (tests and the scheduler's own checks).
    pub fn parse(expr: &str, timezone: Option<&str>) -> Result<Schedule, String> {
        let cron = Self::parse_cron(expr)?;
        let tz = timezone.map(Self::parse_timezone).transpose()?.unwrap_or(Tz::UTC);
        Ok(Schedule::new(cron, tz, expr))
    }

    pub fn expr(&self) -> &str {
        &self.expr
    }

    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The latest fire time at or before `now`.
    pub fn last_at_or_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&now.with_timezone(&self.tz), true).ok().map(|t| t.with_timezone(&Utc))
    }

    /// The first fire time strictly after `after`, evaluated on the wall
    /// clock of the job's time zone (so DST changes move the UTC instant).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&after.with_timezone(&self.tz), false).ok().map(|t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_local_schedule_keeps_its_wall_clock_time_across_dst_changes() {
        // Berlin: CET (UTC+1) until 2026-03-29 01:00Z, CEST (UTC+2) until 2026-10-25 01:00Z.
        let s = Schedule::parse("0 0 6 * * *", Some("Europe/Berlin")).unwrap();
        let spring: Vec<DateTime<Utc>> =
            std::iter::successors(s.next_after(at("2026-03-27T12:00:00Z")), |t| s.next_after(*t)).take(3).collect();
        assert_eq!(
            spring,
            vec![at("2026-03-28T05:00:00Z"), at("2026-03-29T04:00:00Z"), at("2026-03-30T04:00:00Z")],
            "06:00 local before and after the spring change"
        );
        let autumn: Vec<DateTime<Utc>> =
            std::iter::successors(s.next_after(at("2026-10-23T12:00:00Z")), |t| s.next_after(*t)).take(3).collect();
        assert_eq!(autumn, vec![at("2026-10-24T04:00:00Z"), at("2026-10-25T05:00:00Z"), at("2026-10-26T05:00:00Z")]);
    }

    #[test]
    fn no_timezone_means_utc_and_seconds_are_required() {
        let s = Schedule::parse("*/2 * * * * *", None).unwrap();
        assert_eq!(s.next_after(at("2026-01-01T00:00:01Z")), Some(at("2026-01-01T00:00:02Z")));
        let five = Schedule::parse("0 2 * * *", None).unwrap_err();
        assert!(five.contains("schedule `0 2 * * *`"), "{five}");
        let tz = Schedule::parse("0 0 2 * * *", Some("Mars/Olympus")).unwrap_err();
        assert!(tz.contains("unknown timezone `Mars/Olympus`"), "{tz}");
    }
}
