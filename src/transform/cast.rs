//! Strict parsers for the text the Bulk API 2.0 CSV carries. Each returns the
//! reason a value does not fit, which becomes the reject's reason.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

pub fn parse_integer(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if let Ok(v) = t.parse::<i64>() {
        return Ok(v);
    }
    // Salesforce renders some whole numbers with a trailing `.0`; accept that,
    // but never round away a real fraction.
    if let Some((int, frac)) = t.split_once('.')
        && !frac.is_empty()
        && frac.bytes().all(|b| b == b'0')
        && let Ok(v) = int.parse::<i64>()
    {
        return Ok(v);
    }
    Err(format!("`{text}` is not an integer (64-bit, no fraction)"))
}

pub fn parse_float(text: &str) -> Result<f64, String> {
    let t = text.trim();
    // Rust also accepts `inf`/`NaN`; Salesforce never sends them, so they are bad data.
    let looks_numeric = t.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'));
    match t.parse::<f64>() {
        Ok(v) if looks_numeric && v.is_finite() => Ok(v),
        _ => Err(format!("`{text}` is not a finite number")),
    }
}

pub fn parse_boolean(text: &str) -> Result<bool, String> {
    match text.trim() {
        t if t.eq_ignore_ascii_case("true") => Ok(true),
        t if t.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(format!("`{text}` is not a boolean (true or false)")),
    }
}

/// Parses a UTC instant in any form Salesforce emits (`...000Z`, `+0000`,
/// `+00:00`, with or without milliseconds) into epoch milliseconds.
pub fn parse_timestamp_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let parsed = DateTime::parse_from_rfc3339(t)
        .or_else(|_| DateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .map(|dt| dt.with_timezone(&Utc));
    match parsed {
        Ok(dt) => Ok(dt.timestamp_millis()),
        Err(_) => match NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f") {
            // An instant without an offset is ambiguous; refusing it beats guessing a zone.
            Ok(_) => Err(format!("`{text}` has no UTC offset (expected e.g. 2024-01-31T12:00:00.000Z)")),
            Err(_) => Err(format!("`{text}` is not a timestamp (expected e.g. 2024-01-31T12:00:00.000Z)")),
        },
    }
}

/// Renders epoch milliseconds the way Salesforce writes datetimes in CSV.
pub fn format_timestamp_ms(ms: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms).map(|dt| dt.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers() {
        assert_eq!(parse_integer("300"), Ok(300));
        assert_eq!(parse_integer("-7"), Ok(-7));
        assert_eq!(parse_integer("12.00"), Ok(12));
        assert!(parse_integer("12.5").is_err());
        assert!(parse_integer("1e3").is_err());
        assert!(parse_integer("99999999999999999999").is_err());
        assert!(parse_integer("abc").is_err());
    }

    #[test]
    fn floats() {
        assert_eq!(parse_float("1.5"), Ok(1.5));
        assert_eq!(parse_float("2.5E7"), Ok(2.5e7));
        assert!(parse_float("NaN").is_err());
        assert!(parse_float("inf").is_err());
        assert!(parse_float("1,5").is_err());
    }

    #[test]
    fn booleans() {
        assert_eq!(parse_boolean("true"), Ok(true));
        assert_eq!(parse_boolean("FALSE"), Ok(false));
        assert!(parse_boolean("yes").is_err());
        assert!(parse_boolean("1").is_err());
    }

    #[test]
    fn timestamps_in_every_salesforce_form() {
        let expected = 1_706_702_400_123;
        for form in [
            "2024-01-31T12:00:00.123Z",
            "2024-01-31T12:00:00.123+0000",
            "2024-01-31T12:00:00.123+00:00",
            "2024-01-31T13:00:00.123+01:00",
        ] {
            assert_eq!(parse_timestamp_ms(form), Ok(expected), "{form}");
        }
        assert_eq!(parse_timestamp_ms("2024-01-31T12:00:00Z"), Ok(1_706_702_400_000));
        assert!(parse_timestamp_ms("2024-01-31T12:00:00").unwrap_err().contains("no UTC offset"));
        assert!(parse_timestamp_ms("2024-02-30T12:00:00Z").is_err());
        assert!(parse_timestamp_ms("yesterday").is_err());
        assert_eq!(format_timestamp_ms(expected).as_deref(), Some("2024-01-31T12:00:00.123Z"));
    }
}
