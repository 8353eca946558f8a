//! The words run history is written in: how a run started ([`Trigger`]),
//! how it ended ([`RunStatus`]) and, when it failed, what kind of failure it
//! was ([`ErrorClass`], with the remedy on-call staff act on).
//!
//! A leaf module: every stage maps its own errors to a class here, and
//! `state`, `alert` and the CLI read them back, without depending on each
//! other. History stores them as their `as_str()` text.

use std::fmt;

use serde::Serialize;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Abandoned,
}

impl RunStatus {
    pub const ALL: [RunStatus; 5] = [Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled, Self::Abandoned];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Abandoned => "abandoned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `nightjar run` (or a library caller).
    Manual,
    /// A cron tick of `serve`.
    Schedule,
    /// `catch_up = true`: a scheduled time passed while nightjar was down.
    CatchUp,
    /// A later attempt of a failed run (`retries`).
    Retry,
    /// Not a run: a manual `nightjar watermark --set/--clear`, recorded in history.
    Watermark,
    /// `nightjar demo`.
    Demo,
}

impl Trigger {
    pub const ALL: [Trigger; 6] =
        [Self::Manual, Self::Schedule, Self::CatchUp, Self::Retry, Self::Watermark, Self::Demo];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Schedule => "schedule",
            Self::CatchUp => "catch_up",
            Self::Retry => "retry",
            Self::Watermark => "watermark",
            Self::Demo => "demo",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of failure ended a run. Each error of each stage maps to
/// exactly one class, from its type (an HTTP status and Salesforce error
/// code, a Postgres SQLSTATE, an `io::ErrorKind`), never from where it
/// happened to be raised; each class has one remedy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The job's files are invalid (what `validate` reports).
    Config,
    /// Salesforce refused the login or the session.
    Auth,
    /// The org's API request allowance is spent (or below `min_api_remaining`).
    ApiLimit,
    /// The integration user lacks a permission.
    Permission,
    /// The Bulk query ran too long in Salesforce.
    QueryTimeout,
    /// The org, the mapping and the target disagree (a field, column or type changed).
    SchemaDrift,
    /// Salesforce reported an error of its own (a failed or aborted query job, ...).
    Salesforce,
    /// Salesforce answered in a way the protocol does not allow.
    Protocol,
    /// Salesforce's results ended short of (or beyond) the rows its job reported.
    ExtractIncomplete,
    /// Salesforce's clock (its `Date` header) is implausibly far from ours.
    Clock,
    /// A host could not be reached, or a connection dropped.
    Network,
    /// The mapping could not be applied to a page.
    Transform,
    /// More rows were rejected than `max_reject_ratio` allows.
    DataRejects,
    /// The target refused the rows: a constraint, a trigger, a lock.
    TargetConstraint,
    /// The target could not be used as configured (missing table with `create = false`, ...).
    Target,
    /// A disk refused a write or read: full, read-only, no permission.
    Disk,
    /// nightjar's own state DB failed.
    State,
    /// The job's `timeout` passed.
    Timeout,
    /// `serve` shut down past its grace period.
    Cancelled,
    /// A scheduled time did not run because the job was still running.
    Skipped,
    /// The process running the run died.
    Abandoned,
    /// Another run of the job held its lock.
    Locked,
    /// A bug in nightjar: a pipeline task stopped unexpectedly.
    Internal,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 23] = [
        Self::Config,
        Self::Auth,
        Self::ApiLimit,
        Self::Permission,
        Self::QueryTimeout,
        Self::SchemaDrift,
        Self::Salesforce,
        Self::Protocol,
        Self::ExtractIncomplete,
        Self::Clock,
        Self::Network,
        Self::Transform,
        Self::DataRejects,
        Self::TargetConstraint,
        Self::Target,
        Self::Disk,
        Self::State,
        Self::Timeout,
        Self::Cancelled,
        Self::Skipped,
        Self::Abandoned,
        Self::Locked,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Auth => "auth",
            Self::ApiLimit => "api_limit",
            Self::Permission => "permission",
            Self::QueryTimeout => "query_timeout",
            Self::SchemaDrift => "schema_drift",
            Self::Salesforce => "salesforce",
            Self::Protocol => "protocol",
            Self::ExtractIncomplete => "extract_incomplete",
            Self::Clock => "clock",
            Self::Network => "network",
            Self::Transform => "transform",
            Self::DataRejects => "data_rejects",
            Self::TargetConstraint => "target_constraint",
            Self::Target => "target",
            Self::Disk => "disk",
            Self::State => "state",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
            Self::Abandoned => "abandoned",
            Self::Locked => "locked",
            Self::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The one-line remedy on-call staff act on. `RUN` stands for the run id.
    pub fn remedy(self) -> &'static str {
        match self {
            Self::Auth => {
                "Salesforce refused the login: check the connection's client_id and client_secret (or key and username), and that the connected app allows this OAuth flow for the integration user."
            }
            Self::ApiLimit => {
                "The org's API request limit is used up: it recovers over a rolling 24 hours, so run again later, or reduce what other integrations spend."
            }
            Self::Permission => {
                "The integration user lacks a permission: grant API Enabled and read access to the object and its fields (profile or permission set), then run again."
            }
            Self::QueryTimeout => {
                "The Salesforce query ran too long: run more often (smaller windows) or add a selective `where` on an indexed field, then run again."
            }
            Self::SchemaDrift => {
                "The Salesforce object, the mapping and the target table no longer agree: compare the job's `fields` and mapping with both, fix the odd one out (or set `schema_evolution = \"add_columns\"`), then run again."
            }
            Self::TargetConstraint => {
                "The target refused the rows (constraint, trigger or lock): fix the table or the mapping's key and required columns, or find who holds the lock, then run again; nothing was committed."
            }
            Self::DataRejects => {
                "More rows were rejected than `max_reject_ratio` allows: see `nightjar show RUN --rejects`, fix the source data or the mapping, then run again."
            }
            Self::Network => {
                "A host could not be reached or a connection dropped: check DNS, firewalls, proxies and the connection's URL; nothing was committed and the next run will try again."
            }
            Self::Timeout => {
                "The run took longer than the job's `timeout`: raise `timeout`, or run more often so each window is smaller."
            }
            Self::Abandoned => {
                "The process running this job died (killed, crashed, or the machine restarted) before the run closed: the target and the watermark are as before the run, and the next run covers the window again."
            }
            Self::Config => "The job's configuration is invalid: run `nightjar validate` and fix what it reports.",
            Self::Transform => {
                "The mapping could not be applied: check the mapping file with `nightjar validate`, then run again."
            }
            Self::Target => {
                "The target could not be used as configured: check the target connection, table and `create` setting, then run again."
            }
            Self::Disk => {
                "A disk refused a read or write (full, read-only, or no permission): free space or fix the permissions of the path in the error, then run again; nothing was committed."
            }
            Self::Protocol => {
                "Salesforce answered in an unexpected way: run again; if it repeats, report it with the output of `nightjar show RUN`."
            }
            Self::ExtractIncomplete => {
                "Salesforce's results did not add up to the rows its query job reported: nothing was committed and the watermark did not move; run again, and if it repeats, give Salesforce support the job id above."
            }
            Self::Clock => {
                "Salesforce's clock (its Date header) is far from this machine's: check this machine's time (NTP) and any proxy in between, or raise the connection's `max_clock_skew`; the run did not start."
            }
            Self::Salesforce => {
                "Salesforce reported an error: act on its error code and message above (often the job's `where` or fields), then run again."
            }
            Self::State => "nightjar's state DB failed: check the disk space and permissions of the state path.",
            Self::Cancelled => {
                "The run was stopped because nightjar was shutting down: nothing was committed; it runs again at its next scheduled time."
            }
            Self::Skipped => {
                "A scheduled time was skipped because the previous run of the job was still going: make runs shorter or the schedule sparser."
            }
            Self::Locked => {
                "Another process was running this job: wait for it to finish (see `nightjar history --job`), or stop it."
            }
            Self::Internal => {
                "nightjar hit a bug (a pipeline task stopped unexpectedly): nothing was committed; run again, and report the error with the output of `nightjar show RUN`."
            }
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_every_class_has_its_own_remedy() {
        let mut remedies = std::collections::HashSet::new();
        for class in ErrorClass::ALL {
            assert_eq!(ErrorClass::parse(class.as_str()), Some(class));
            assert!(remedies.insert(class.remedy()), "{class} shares a remedy");
        }
        for trigger in Trigger::ALL {
            assert_eq!(Trigger::parse(trigger.as_str()), Some(trigger));
        }
        for status in RunStatus::ALL {
            assert_eq!(RunStatus::parse(status.as_str()), Some(status));
        }
    }
}
