//! Strict parsers for the text the Bulk API 2.0 CSV carries. Each returns the
//! reason a value does not fit, which becomes the reject's reason.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, Timelike, Utc};

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
        Ok(_) if finer_than_millis(t) => Err(finer_than_millis_reason(text)),
        // An offset can move a year-0000 or year-9999 instant out of four
        // digits in UTC; its rendering (what the files target writes and
        // reads back) would then not parse, failing every later run.
        Ok(dt) if !(0..=9999).contains(&dt.year()) => Err(format!("`{text}` is outside the years 0000 to 9999 in UTC")),
        Ok(dt) => Ok(dt.timestamp_millis()),
        Err(_) => match NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f") {
            // An instant without an offset is ambiguous; refusing it beats guessing a zone.
            Ok(_) => Err(format!("`{text}` has no UTC offset (expected e.g. 2024-01-31T12:00:00.000Z)")),
            Err(_) => Err(format!("`{text}` is not a timestamp (expected e.g. 2024-01-31T12:00:00.000Z)")),
        },
    }
}

/// Whether the fraction of a second in `t` (the digits after its first
/// `.`) has a non-zero digit past milliseconds, Salesforce's precision.
/// Dropping it would silently change the value.
fn finer_than_millis(t: &str) -> bool {
    t.split_once('.').is_some_and(|(_, rest)| rest.bytes().take_while(u8::is_ascii_digit).skip(3).any(|b| b != b'0'))
}

fn finer_than_millis_reason(text: &str) -> String {
    format!("`{text}` is more precise than milliseconds (Salesforce's precision); keeping it would need rounding")
}

/// Parses a Salesforce date (`2024-01-31`, no offset) into days since 1970-01-01.
pub fn parse_date(text: &str) -> Result<i32, String> {
    let date = NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d")
        .map_err(|_| format!("`{text}` is not a date (expected e.g. 2024-01-31)"))?;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    i32::try_from((date - epoch).num_days()).map_err(|_| format!("`{text}` is out of range for a date"))
}

/// Renders days since 1970-01-01 as `YYYY-MM-DD`.
pub fn format_date(days: i32) -> Option<String> {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    epoch.checked_add_signed(chrono::Duration::days(days.into())).map(|d| d.format("%Y-%m-%d").to_string())
}

/// Parses a Salesforce time (`12:00:00.000Z`, also without millis or `Z`)
/// into nanoseconds since midnight.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let t = t.strip_suffix('Z').unwrap_or(t);
    let time = NaiveTime::parse_from_str(t, "%H:%M:%S%.f")
        .ok()
        // chrono reads a leap second (`23:59:60`) as a nanosecond past 1e9,
        // which would land past the end of the day.
        .filter(|time| time.nanosecond() < 1_000_000_000)
        .ok_or_else(|| format!("`{text}` is not a time (expected e.g. 12:00:00.000Z)"))?;
    if finer_than_millis(t) {
        return Err(finer_than_millis_reason(text));
    }
    Ok(i64::from(time.num_seconds_from_midnight()) * 1_000_000_000 + i64::from(time.nanosecond()))
}

/// Renders nanoseconds since midnight as `HH:MM:SS.fff`.
pub fn format_time(nanos: i64) -> Option<String> {
    let secs = u32::try_from(nanos.div_euclid(1_000_000_000)).ok()?;
    let frac = u32::try_from(nanos.rem_euclid(1_000_000_000)).ok()?;
    NaiveTime::from_num_seconds_from_midnight_opt(secs, frac).map(|t| t.format("%H:%M:%S%.3f").to_string())
}

/// Checks a number fits `decimal(precision, scale)` exactly and returns it
/// in canonical form with `scale` decimals. Extra fractional digits that are
/// not zero would need rounding, which is a reject, not a silent change.
pub fn parse_decimal(text: &str, precision: u8, scale: u8) -> Result<String, String> {
    let t = text.trim();
    let bad = || format!("`{text}` is not a decimal number");
    let (negative, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        // Exponent forms (1.5E7) are what Salesforce may send for large
        // doubles. The point is moved in the digits themselves: going
        // through f64 would round.
        let plain = without_exponent(t).ok_or_else(bad)?;
        return parse_decimal(&plain, precision, scale).map_err(|e| e.replace(&plain, text));
    }
    let int = int.trim_start_matches('0');
    let scale = usize::from(scale);
    let (kept, dropped) = frac.split_at(frac.len().min(scale));
    if dropped.bytes().any(|b| b != b'0') {
        return Err(format!("`{text}` has more than {scale} decimal places"));
    }
    if int.len() > usize::from(precision) - scale {
        return Err(format!("`{text}` does not fit decimal({precision},{scale})"));
    }
    let mut out = String::with_capacity(int.len() + scale + 2);
    let zero = int.is_empty() && kept.bytes().all(|b| b == b'0');
    if negative && !zero {
        out.push('-');
    }
    out.push_str(if int.is_empty() { "0" } else { int });
    if scale > 0 {
        out.push('.');
        out.push_str(kept);
        out.extend(std::iter::repeat_n('0', scale - kept.len()));
    }
    Ok(out)
}

/// `-1.25E3` -> `-1250`, `5E-3` -> `0.005`, exactly; None if `text` is not
/// a number with an exponent.
fn without_exponent(text: &str) -> Option<String> {
    let (mantissa, exponent) = text.split_once(['e', 'E'])?;
    let exponent: i64 = exponent.strip_prefix('+').unwrap_or(exponent).parse().ok()?;
    let (sign, digits) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa.strip_prefix('+').unwrap_or(mantissa)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty()) || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Far beyond any decimal(38,s); refusing keeps the padding bounded.
    // (`unsigned_abs`: `i64::MIN.abs()` overflows.)
    if exponent.unsigned_abs() > 400 {
        return None;
    }
    let all: String = format!("{int}{frac}");
    let point = int.len() as i64 + exponent;
    let (int, frac) = if point <= 0 {
        (String::from("0"), format!("{}{all}", "0".repeat((-point) as usize)))
    } else if point as usize >= all.len() {
        (format!("{all}{}", "0".repeat(point as usize - all.len())), String::new())
    } else {
        let (i, f) = all.split_at(point as usize);
        (i.to_string(), f.to_string())
    };
    Some(if frac.is_empty() { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") })
}

/// Checks a value is JSON that every target can store; the text is kept as
/// sent.
pub fn parse_json(text: &str) -> Result<String, String> {
    let value = serde_json::from_str::<serde_json::Value>(text).map_err(|e| format!("`{text}` is not JSON: {e}"))?;
    // Postgres `jsonb` refuses a NUL in any string, and one such value
    // would fail the whole load; as a reject it costs only its row.
    if has_nul(&value) {
        return Err(format!("`{text}` holds a NUL character (\\u0000), which Postgres jsonb cannot store"));
    }
    Ok(text.to_string())
}

/// Whether any string or key of `value` holds a NUL character.
pub fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
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
    fn dates_and_times() {
        assert_eq!(parse_date("1970-01-02"), Ok(1));
        assert_eq!(parse_date("1969-12-31"), Ok(-1));
        assert_eq!(format_date(parse_date("2024-02-29").unwrap()).as_deref(), Some("2024-02-29"));
        assert!(parse_date("2024-02-30").is_err());
        assert!(parse_date("2024-01-31T00:00:00Z").is_err(), "a datetime is not a date");
        assert_eq!(parse_time("12:00:00.000Z"), Ok(43_200_000_000_000));
        assert_eq!(parse_time("00:00:01"), Ok(1_000_000_000));
        assert_eq!(format_time(parse_time("23:59:59.250Z").unwrap()).as_deref(), Some("23:59:59.250"));
        assert!(parse_time("25:00:00").is_err());
        assert!(parse_time("23:59:60").is_err(), "no leap seconds past the end of the day");
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_decimal("1498212971.32", 18, 2).as_deref(), Ok("1498212971.32"));
        assert_eq!(parse_decimal("7", 18, 2).as_deref(), Ok("7.00"));
        assert_eq!(parse_decimal("-0.50", 4, 2).as_deref(), Ok("-0.50"));
        assert_eq!(parse_decimal("-0.00", 4, 2).as_deref(), Ok("0.00"));
        assert_eq!(parse_decimal("12.500", 5, 2).as_deref(), Ok("12.50"));
        assert_eq!(parse_decimal("2.5E7", 18, 2).as_deref(), Ok("25000000.00"));
        assert_eq!(parse_decimal("-1.25e-2", 18, 4).as_deref(), Ok("-0.0125"));
        assert!(parse_decimal("1.0E-7", 18, 0).unwrap_err().contains("more than 0 decimal places"));
        assert!(parse_decimal("1.23456789012345678E17", 18, 0).is_ok(), "no f64 rounding on the way");
        assert!(parse_decimal("1E400000", 38, 0).is_err());
        // The exponent's absolute value used to overflow (a panic, or in a
        // build without overflow checks an attempt to pad with 2^63 zeros).
        assert!(parse_decimal("1e-9223372036854775808", 38, 2).is_err());
        assert!(parse_decimal("1e9223372036854775807", 38, 2).is_err());
        assert!(parse_decimal("12.345", 18, 2).unwrap_err().contains("more than 2 decimal places"));
        assert!(parse_decimal("1000", 5, 2).unwrap_err().contains("does not fit decimal(5,2)"));
        assert!(parse_decimal("1,5", 5, 2).is_err());
        assert!(parse_decimal("NaN", 5, 2).is_err());
        assert!(parse_decimal(".", 5, 2).is_err());
    }

    #[test]
    fn json_is_validated_and_kept() {
        assert_eq!(parse_json("{\"a\": [1, 2]}").as_deref(), Ok("{\"a\": [1, 2]}"));
        assert!(parse_json("{a: 1}").is_err());
    }

    /// Postgres jsonb cannot store U+0000: one such value used to fail the
    /// whole Postgres load instead of rejecting its row.
    #[test]
    fn json_with_a_nul_escape_is_refused_with_the_reason() {
        for text in [r#""a\u0000b""#, r#"{"k": ["x", "\u0000"]}"#, r#"{"\u0000": 1}"#] {
            let err = parse_json(text).unwrap_err();
            assert!(err.contains("NUL") && err.contains("jsonb"), "{text}: {err}");
        }
        assert!(parse_json(r#"{"k": "\u0001 \\u0000"}"#).is_ok(), "an escaped backslash before u0000 is no NUL");
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

    /// Times and timestamps carry milliseconds; a finer value used to lose
    /// its extra digits silently (`12:00:00.0001` was stored as `12:00:00.000`).
    #[test]
    fn sub_millisecond_digits_are_refused_not_dropped() {
        for text in ["12:00:00.0001", "12:00:00.1234Z"] {
            assert!(parse_time(text).unwrap_err().contains("more precise than milliseconds"), "{text}");
        }
        for text in ["2024-01-31T12:00:00.1239Z", "2024-01-31T12:00:00.0001+01:00"] {
            assert!(parse_timestamp_ms(text).unwrap_err().contains("more precise than milliseconds"), "{text}");
        }
        // Zeros past the milliseconds change nothing.
        assert_eq!(parse_time("00:00:01.250000Z"), Ok(1_250_000_000));
        assert_eq!(parse_timestamp_ms("2024-01-31T12:00:00.123000Z"), Ok(1_706_702_400_123));
    }

    /// An offset that moves an instant out of the years 0000 to 9999 in UTC
    /// used to be accepted; its rendering does not parse back, so a files
    /// snapshot holding it failed every later run.
    #[test]
    fn timestamps_outside_four_digit_utc_years_are_refused() {
        for text in ["0000-01-01T00:00:00.000+01:00", "9999-12-31T23:59:59.999-01:00"] {
            assert!(parse_timestamp_ms(text).unwrap_err().contains("outside the years 0000 to 9999"), "{text}");
        }
        for text in ["0000-01-01T01:00:00.000+01:00", "9999-12-31T23:59:59.999Z"] {
            let ms = parse_timestamp_ms(text).unwrap();
            assert_eq!(parse_timestamp_ms(&format_timestamp_ms(ms).unwrap()), Ok(ms), "{text}");
        }
    }
}
