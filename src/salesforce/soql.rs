//! The SOQL a job sends: its fields, its object, its own condition and the
//! window. Every part was checked by `config` (identifiers against
//! Salesforce's rules, the condition as one expression that cannot reach
//! outside its parentheses).

use crate::config::SourcePlan;
use crate::window::{Window, soql_datetime};

/// Builds the job's SOQL. No ORDER BY: it disables Salesforce's chunking of
/// large queries.
pub fn build_soql(source: &SourcePlan, window: Option<Window>) -> String {
    let mut conditions = Vec::new();
    if let Some(condition) = source.condition.as_deref() {
        conditions.push(format!("({condition})"));
    }
    if let (Some(cursor), Some(window)) = (source.cursor.as_deref(), window) {
        if let Some(start) = window.start {
            conditions.push(format!("{cursor} >= {}", soql_datetime(start)));
        }
        conditions.push(format!("{cursor} < {}", soql_datetime(window.end)));
    }
    let mut soql = format!("SELECT {} FROM {}", source.fields.join(", "), source.object);
    if !conditions.is_empty() {
        soql.push_str(" WHERE ");
        soql.push_str(&conditions.join(" AND "));
    }
    soql
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::{DateTime, Utc};

    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn source(fields: &[&str], condition: Option<&str>, cursor: Option<&str>) -> SourcePlan {
        SourcePlan {
            connection: "sf".into(),
            object: "Account".into(),
            fields: fields.iter().map(|f| f.to_string()).collect(),
            condition: condition.map(str::to_string),
            cursor: cursor.map(str::to_string),
            lookback: Duration::ZERO,
            settle: Duration::ZERO,
            include_deleted: false,
            page_size: 10,
        }
    }

    #[test]
    fn soql_carries_the_window_and_the_job_filter() {
        let w = Window { start: Some(t("2026-01-01T00:00:00Z")), end: t("2026-01-01T00:58:00.250Z") };
        let soql = build_soql(&source(&["Id", "Name"], Some("Type != 'Test'"), Some("SystemModstamp")), Some(w));
        assert_eq!(
            soql,
            "SELECT Id, Name FROM Account WHERE (Type != 'Test') AND SystemModstamp >= 2026-01-01T00:00:00Z \
             AND SystemModstamp < 2026-01-01T00:58:00.250Z"
        );
        assert_eq!(build_soql(&source(&["Id"], None, None), None), "SELECT Id FROM Account");
    }
}
