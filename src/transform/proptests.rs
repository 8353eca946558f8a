//! Property tests for the mapping casts (issue 7): every value the Bulk API
//! 2.0 CSV can carry round-trips, and malformed text is an `Err` with a reason
//! (a reject at mapping level), never a panic, a wrong value or a silent null.
//!
//! Expected values are built independently of chrono and of the casts: civil
//! dates are counted by hand, decimals are shifted as digit strings.

use std::ops::RangeInclusive;

use proptest::prelude::*;
use proptest::sample::Index;

use crate::schema::cast::*;

/// Modest case counts keep the suite fast; `PROPTEST_CASES=20000` (read by
/// proptest's default config) asks for a longer run.
fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { default.cases } else { cases };
    // No regression files: others commit to this tree concurrently, and a
    // failure prints its minimal input anyway.
    ProptestConfig { cases, failure_persistence: None, ..default }
}

/// An `Err` must say why; an `Ok` is checked by each property.
fn has_reason<T>(result: &Result<T, String>) -> bool {
    result.as_ref().err().is_none_or(|reason| !reason.trim().is_empty())
}

// ---------------------------------------------------------------- independent references

const MS_PER_DAY: i64 = 86_400_000;

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let (m, d) = (i64::from(m), i64::from(d));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A wall-clock reading, as Salesforce writes it.
#[derive(Debug, Clone, Copy)]
struct Civil {
    y: i64,
    mo: u32,
    d: u32,
    h: u32,
    mi: u32,
    s: u32,
    ms: u32,
}

impl Civil {
    fn epoch_ms(self) -> i64 {
        days_from_civil(self.y, self.mo, self.d) * MS_PER_DAY
            + i64::from((self.h * 60 + self.mi) * 60 + self.s) * 1000
            + i64::from(self.ms)
    }

    /// `YYYY-MM-DDTHH:MM:SS[.SSS]`, no offset.
    fn text(self, millis: bool) -> String {
        let Civil { y, mo, d, h, mi, s, ms } = self;
        let base = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
        if millis { format!("{base}.{ms:03}") } else { base }
    }
}

fn civil(years: RangeInclusive<i64>) -> impl Strategy<Value = Civil> {
    (years, 1u32..=12, 1u32..=31, 0u32..24, 0u32..60, 0u32..60, 0u32..1000).prop_map(|(y, mo, d, h, mi, s, ms)| Civil {
        y,
        mo,
        d: d.min(days_in_month(y, mo)),
        h,
        mi,
        s,
        ms,
    })
}

/// Salesforce's date range is 1700-01-01 ..= 4000-12-31.
const SF_YEARS: RangeInclusive<i64> = 1700..=4000;

fn sf_days() -> RangeInclusive<i32> {
    let first = days_from_civil(1700, 1, 1);
    let last = days_from_civil(4000, 12, 31);
    i32::try_from(first).unwrap()..=i32::try_from(last).unwrap()
}

/// Epoch milliseconds of every instant with a four-digit year (0000..=9999).
fn four_digit_year_ms() -> RangeInclusive<i64> {
    days_from_civil(0, 1, 1) * MS_PER_DAY..=days_from_civil(10_000, 1, 1) * MS_PER_DAY - 1
}

/// The exact value `text` denotes as canonical `decimal(p,s)` text, or `None`
/// when it is not a number (Rust's float grammar, finite digits only) or does
/// not fit exactly. Shifts digit strings; never goes through a float.
fn exact_decimal(text: &str, p: u8, s: u8) -> Option<String> {
    let t = text.trim();
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(e) => {
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || !all_digits(digits) {
                return None;
            }
            let digits = digits.trim_start_matches('0');
            // Beyond any precision; the exact size no longer matters.
            let magnitude = if digits.len() > 6 { 1_000_000 } else { digits.parse().unwrap_or(0) };
            if e.starts_with('-') { -magnitude } else { magnitude }
        }
    };
    let (p, s) = (usize::from(p), usize::from(s));
    let digits = format!("{int}{frac}");
    let zero = || if s == 0 { "0".to_string() } else { format!("0.{}", "0".repeat(s)) };
    if digits.bytes().all(|b| b == b'0') {
        return Some(zero());
    }
    let point = i64::try_from(int.len()).unwrap() + exponent;
    let len = i64::try_from(digits.len()).unwrap();
    if point > len + 100 || point < -100 {
        return None; // a non-zero value far too large, or with far too many decimals
    }
    let (int_part, frac_part) = if point <= 0 {
        (String::new(), format!("{}{digits}", "0".repeat(usize::try_from(-point).unwrap())))
    } else if point >= len {
        (format!("{digits}{}", "0".repeat(usize::try_from(point - len).unwrap())), String::new())
    } else {
        let at = usize::try_from(point).unwrap();
        (digits[..at].to_string(), digits[at..].to_string())
    };
    let int_part = int_part.trim_start_matches('0');
    let frac_part = frac_part.trim_end_matches('0');
    if frac_part.len() > s || int_part.len() > p - s {
        return None;
    }
    let sign = if negative { "-" } else { "" };
    let int_part = if int_part.is_empty() { "0" } else { int_part };
    Some(if s == 0 {
        format!("{sign}{int_part}")
    } else {
        format!("{sign}{int_part}.{frac_part}{}", "0".repeat(s - frac_part.len()))
    })
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]{s})?` with at most `p - s` integer digits, and no `-0`.
fn is_canonical_decimal(c: &str, p: u8, s: u8) -> bool {
    let (p, s) = (usize::from(p), usize::from(s));
    let (negative, body) = match c.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, c),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) if s > 0 => (i, f),
        None if s == 0 => (body, ""),
        _ => return false,
    };
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    let int_ok = digits(int) && (int == "0" || !int.starts_with('0')) && (int == "0" || int.len() <= p - s);
    let frac_ok = frac.len() == s && (s == 0 || digits(frac));
    let is_zero = body.bytes().all(|b| b == b'0' || b == b'.');
    int_ok && frac_ok && !(negative && is_zero)
}

/// How Java's `Double.toString` (and so Salesforce) writes a double: plain
/// with at least one decimal in [1e-3, 1e7), else `d.dddE[-]n`.
fn java_double(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-3..1e7).contains(&a) {
        let plain = format!("{v}");
        if plain.contains('.') { plain } else { format!("{plain}.0") }
    } else {
        let sci = format!("{v:E}");
        let (mantissa, exponent) = sci.split_once('E').unwrap();
        if mantissa.contains('.') { sci } else { format!("{mantissa}.0E{exponent}") }
    }
}

// ---------------------------------------------------------------- strategies

fn edge_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => any::<i64>(),
        1 => prop::sample::select(vec![0, 1, -1, i64::MIN, i64::MAX, i64::MIN + 1, i64::MAX - 1]),
        1 => -100_000i64..100_000,
    ]
}

fn finite_f64() -> impl Strategy<Value = f64> {
    use prop::num::f64 as class;
    prop_oneof![
        4 => class::POSITIVE | class::NEGATIVE | class::NORMAL | class::SUBNORMAL | class::ZERO,
        2 => -1e9..1e9f64,
        1 => prop::sample::select(vec![0.0, -0.0, f64::MAX, f64::MIN, f64::MIN_POSITIVE, 5e-324, 1e7, 1e-3, 9_999_999.0]),
    ]
}

fn digits(len: RangeInclusive<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(0u8..10, len).prop_map(|ds| ds.into_iter().map(|d| char::from(b'0' + d)).collect())
}

fn any_case(word: &'static str) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<bool>(), word.len()).prop_map(move |upper| {
        word.chars().zip(upper).map(|(c, u)| if u { c.to_ascii_uppercase() } else { c }).collect()
    })
}

/// A `decimal(p,s)` and a value that fits it: (p, s, negative, integer digits, fraction digits).
fn decimal_case() -> impl Strategy<Value = (u8, u8, bool, String, String)> {
    (1u8..=38).prop_flat_map(|p| (Just(p), 0..=p)).prop_flat_map(|(p, s)| {
        (Just(p), Just(s), any::<bool>(), digits(0..=usize::from(p - s)), digits(0..=usize::from(s)))
    })
}

/// Canonical `decimal(p,s)` text of sign, integer and fraction digits, by hand.
fn canonical(s: u8, negative: bool, int: &str, frac: &str) -> String {
    let int_c = int.trim_start_matches('0');
    let int_c = if int_c.is_empty() { "0" } else { int_c };
    let zero = format!("{int}{frac}").bytes().all(|b| b == b'0');
    let sign = if negative && !zero { "-" } else { "" };
    if s == 0 {
        format!("{sign}{int_c}")
    } else {
        format!("{sign}{int_c}.{frac}{}", "0".repeat(usize::from(s) - frac.len()))
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        finite_f64().prop_map(Value::from),
        // parse_json refuses NUL (Postgres jsonb cannot store it).
        any::<String>().prop_map(|s| Value::String(s.replace('\0', ""))),
    ];
    leaf.prop_recursive(3, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..6).prop_map(|entries| Value::Object(
                entries.into_iter().map(|(k, v)| (k.replace('\0', ""), v)).collect()
            )),
        ]
    })
}

fn json_text() -> impl Strategy<Value = String> {
    (json_value(), any::<bool>()).prop_map(|(v, pretty)| {
        if pretty { serde_json::to_string_pretty(&v).unwrap() } else { serde_json::to_string(&v).unwrap() }
    })
}

fn offset_text(minutes: i64, colon: bool) -> String {
    let sign = if minutes < 0 { '-' } else { '+' };
    let (h, m) = (minutes.abs() / 60, minutes.abs() % 60);
    if colon { format!("{sign}{h:02}:{m:02}") } else { format!("{sign}{h:02}{m:02}") }
}

/// A character that often turns a value into a near miss.
fn near_miss_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => prop::sample::select("0123456789-+.:eEZzTt ,x/_".chars().collect::<Vec<_>>()),
        1 => any::<char>(),
    ]
}

/// Replaces, deletes or inserts one character.
fn mutate(text: &str, at: Index, c: char, op: u8) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return c.to_string();
    }
    let i = at.index(chars.len());
    match op % 3 {
        0 => chars[i] = c,
        1 => {
            chars.remove(i);
        }
        _ => chars.insert(i, c),
    }
    chars.into_iter().collect()
}

/// Junk that no cast accepts after a value: letters, but never `e`/`E`
/// (exponents) or `z`/`Z` (a time's optional zone).
fn junk() -> impl Strategy<Value = String> {
    "[a-df-yA-DF-Y#%/;,_!?]{1,3}"
}

// ---------------------------------------------------------------- round trips

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn integers_round_trip(v in edge_i64(), zeros in 1usize..4) {
        prop_assert_eq!(parse_integer(&v.to_string()), Ok(v));
        let whole = format!("{v}.{}", "0".repeat(zeros));
        prop_assert_eq!(parse_integer(&whole), Ok(v), "{}", whole);
    }

    #[test]
    fn floats_round_trip_bit_for_bit(v in finite_f64()) {
        for text in [format!("{v}"), format!("{v:E}"), format!("{v:e}"), java_double(v)] {
            let parsed = parse_float(&text);
            prop_assert_eq!(parsed.map(f64::to_bits), Ok(v.to_bits()), "{}", text);
        }
    }

    #[test]
    fn booleans_round_trip_in_any_case(b in any::<bool>(), t in any_case("true"), f in any_case("false")) {
        prop_assert_eq!(parse_boolean(if b { &t } else { &f }), Ok(b));
    }

    #[test]
    fn dates_round_trip(days in sf_days()) {
        let text = format_date(days).unwrap();
        prop_assert_eq!(parse_date(&text), Ok(days));
        prop_assert_eq!(format_date(parse_date(&text).unwrap()), Some(text));
    }

    #[test]
    fn dates_from_components(y in SF_YEARS, mo in 0u32..=13, d in 0u32..=32) {
        let text = format!("{y:04}-{mo:02}-{d:02}");
        let parsed = parse_date(&text);
        if (1..=12).contains(&mo) && (1..=days_in_month(y, mo)).contains(&d) {
            let days = i32::try_from(days_from_civil(y, mo, d)).unwrap();
            prop_assert_eq!(parsed, Ok(days), "{}", text);
            prop_assert_eq!(format_date(days), Some(text));
        } else {
            prop_assert!(parsed.is_err() && has_reason(&parsed), "{} gave {:?}", text, parsed);
        }
    }

    #[test]
    fn timestamps_round_trip_in_every_utc_form(c in civil(SF_YEARS)) {
        let ms = c.epoch_ms();
        let with_millis = c.text(true);
        for zone in ["Z", "+0000", "+00:00"] {
            let text = format!("{with_millis}{zone}");
            prop_assert_eq!(parse_timestamp_ms(&text), Ok(ms), "{}", text);
        }
        prop_assert_eq!(format_timestamp_ms(ms), Some(format!("{with_millis}Z")));
        // Millis are optional; without them the instant is the whole second.
        let whole_second = ms - i64::from(c.ms);
        for zone in ["Z", "+0000", "+00:00"] {
            let text = format!("{}{zone}", c.text(false));
            prop_assert_eq!(parse_timestamp_ms(&text), Ok(whole_second), "{}", text);
        }
    }

    #[test]
    fn timestamps_with_an_offset_are_the_same_instant(c in civil(SF_YEARS), offset in -14 * 60i64..=14 * 60) {
        let instant = c.epoch_ms() - offset * 60_000;
        for colon in [true, false] {
            let text = format!("{}{}", c.text(true), offset_text(offset, colon));
            prop_assert_eq!(parse_timestamp_ms(&text), Ok(instant), "{}", text);
        }
    }

    #[test]
    fn timestamps_round_trip_over_four_digit_years(ms in four_digit_year_ms()) {
        let text = format_timestamp_ms(ms).unwrap();
        prop_assert_eq!(parse_timestamp_ms(&text), Ok(ms), "{}", text);
    }

    #[test]
    fn any_epoch_ms_formats_then_parses_back_or_is_refused(ms in any::<i64>()) {
        if let Some(text) = format_timestamp_ms(ms) {
            let parsed = parse_timestamp_ms(&text);
            prop_assert!(parsed == Ok(ms) || (parsed.is_err() && has_reason(&parsed)), "{} gave {:?}", text, parsed);
        }
    }

    #[test]
    fn times_round_trip(h in 0u32..24, mi in 0u32..60, s in 0u32..60, ms in 0u32..1000) {
        let nanos = (i64::from((h * 60 + mi) * 60 + s) * 1000 + i64::from(ms)) * 1_000_000;
        let base = format!("{h:02}:{mi:02}:{s:02}");
        for text in [format!("{base}.{ms:03}Z"), format!("{base}.{ms:03}")] {
            prop_assert_eq!(parse_time(&text), Ok(nanos), "{}", text);
        }
        prop_assert_eq!(format_time(nanos), Some(format!("{base}.{ms:03}")));
        let whole_second = nanos - i64::from(ms) * 1_000_000;
        for text in [format!("{base}Z"), base.clone()] {
            prop_assert_eq!(parse_time(&text), Ok(whole_second), "{}", text);
        }
    }

    #[test]
    fn decimals_that_fit_give_the_canonical_form((p, s, negative, int, frac) in decimal_case(), extra_zeros in 0usize..3) {
        let expected = canonical(s, negative, &int, &frac);
        let sign = if negative { "-" } else { "" };
        let int_shown = if int.is_empty() { "0" } else { &int };
        let mut forms = vec![if frac.is_empty() {
            format!("{sign}{int_shown}")
        } else {
            format!("{sign}{int_shown}.{frac}")
        }];
        // Trailing zeros beyond the scale change nothing.
        forms.push(format!("{sign}{int_shown}.{frac}{}", "0".repeat(extra_zeros + 1)));
        if !negative {
            forms.push(format!("+{int_shown}.{frac}0"));
        }
        for text in forms {
            prop_assert_eq!(parse_decimal(&text, p, s), Ok(expected.clone()), "{} as decimal({},{})", text, p, s);
            prop_assert_eq!(exact_decimal(&text, p, s), Some(expected.clone()), "reference, {}", text);
        }
        prop_assert!(is_canonical_decimal(&expected, p, s), "{}", expected);
    }

    /// Salesforce writes large doubles as `1.5E7`. Integers below 2^53 are
    /// exact doubles, so any route through a float keeps them.
    #[test]
    fn decimals_in_exponent_form_that_are_exact_doubles(
        p in 1u8..=38,
        s_seed in any::<Index>(),
        mantissa in digits(1..=15),
        exponent in 7i64..=14,
        negative in any::<bool>(),
    ) {
        let s = u8::try_from(s_seed.index(usize::from(p) + 1)).unwrap();
        let (first, rest) = mantissa.split_at(1);
        let rest = &rest[..rest.len().min(usize::try_from(exponent).unwrap())];
        let rest = if rest.is_empty() { "0" } else { rest };
        let text = format!("{}{first}.{rest}E{exponent}", if negative { "-" } else { "" });
        let expected = exact_decimal(&text, p, s);
        let parsed = parse_decimal(&text, p, s);
        prop_assert_eq!(parsed.clone().ok(), expected, "{} as decimal({},{})", text, p, s);
        prop_assert!(has_reason(&parsed));
    }

    #[test]
    fn json_is_kept_as_sent(text in json_text()) {
        prop_assert_eq!(parse_json(&text), Ok(text.clone()));
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Every double Salesforce can write (exponent form for large and tiny
    /// ones), into any decimal: the result must be the value the text
    /// denotes, or a reject.
    #[test]
    fn decimals_from_any_double_are_exact((p, s) in p_and_s(), v in finite_f64()) {
        let text = java_double(v);
        let parsed = parse_decimal(&text, p, s);
        prop_assert_eq!(parsed.clone().ok(), exact_decimal(&text, p, s), "{} as decimal({},{})", text, p, s);
        prop_assert!(has_reason(&parsed));
    }
}

// ---------------------------------------------------------------- malformed input

/// `Ok` must be the right value; `Err` must carry a reason. Panics fail the
/// property on their own (proptest catches them).
fn check_every_cast(text: &str, p: u8, s: u8) -> Result<(), TestCaseError> {
    let t = text.trim();

    let integer = parse_integer(text);
    let reference = {
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        let unsigned = whole.strip_prefix(['+', '-']).unwrap_or(whole);
        // No fraction, or a non-empty one of zeros (`12.00`, not `12.`).
        let zeros_only = (!t.contains('.') || !frac.is_empty()) && frac.bytes().all(|b| b == b'0');
        let digits_only = !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit());
        if zeros_only && digits_only { whole.parse::<i128>().ok().and_then(|v| i64::try_from(v).ok()) } else { None }
    };
    prop_assert_eq!(integer.clone().ok(), reference, "integer {:?}", text);
    prop_assert!(has_reason(&integer));

    let float = parse_float(text);
    if let Ok(v) = float {
        prop_assert!(v.is_finite(), "float {:?} gave {}", text, v);
        prop_assert!(t.bytes().all(|b| b.is_ascii_digit() || b".+-eE".contains(&b)), "float {:?} gave {}", text, v);
    }
    prop_assert!(has_reason(&float));

    let boolean = parse_boolean(text);
    let reference = match t.to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    };
    prop_assert_eq!(boolean.clone().ok(), reference, "boolean {:?}", text);
    prop_assert!(has_reason(&boolean));

    let date = parse_date(text);
    if let Ok(days) = date {
        let canonical = format_date(days);
        prop_assert!(canonical.is_some(), "date {:?} gave {}, which does not render", text, days);
        prop_assert_eq!(parse_date(&canonical.unwrap()), Ok(days));
    }
    prop_assert!(has_reason(&date));

    let time = parse_time(text);
    if let Ok(nanos) = time {
        prop_assert!(
            (0..86_400 * 1_000_000_000).contains(&nanos),
            "time {:?} gave {} ns, not a time of day",
            text,
            nanos
        );
        prop_assert!(format_time(nanos).is_some());
    }
    prop_assert!(has_reason(&time));

    let timestamp = parse_timestamp_ms(text);
    if let Ok(ms) = timestamp {
        prop_assert!(format_timestamp_ms(ms).is_some(), "timestamp {:?} gave {}", text, ms);
        // chrono is lenient about the offset's shape (`+00 :00` passes), so
        // only ask that one follows the date.
        let has_offset = t.get(10..).is_some_and(|rest| rest.contains(['Z', 'z', '+', '-']));
        prop_assert!(has_offset, "timestamp {:?} has no offset but gave {}", text, ms);
    }
    prop_assert!(has_reason(&timestamp));

    let decimal = parse_decimal(text, p, s);
    if let Ok(c) = &decimal {
        prop_assert!(is_canonical_decimal(c, p, s), "decimal({},{}) {:?} gave {:?}", p, s, text, c);
    }
    if !t.contains(['e', 'E']) {
        prop_assert_eq!(decimal.clone().ok(), exact_decimal(text, p, s), "decimal({},{}) {:?}", p, s, text);
    }
    prop_assert!(has_reason(&decimal));

    let json = parse_json(text);
    if let Ok(kept) = &json {
        prop_assert_eq!(kept, text);
    }
    prop_assert!(has_reason(&json));
    Ok(())
}

/// A valid text of any cast, for mutation.
fn any_valid_text() -> impl Strategy<Value = String> {
    prop_oneof![
        edge_i64().prop_map(|v| v.to_string()),
        finite_f64().prop_map(java_double),
        any::<bool>().prop_map(|b| b.to_string()),
        sf_days().prop_map(|d| format_date(d).unwrap()),
        civil(SF_YEARS).prop_map(|c| format!("{}Z", c.text(true))),
        (civil(SF_YEARS), -840i64..=840).prop_map(|(c, o)| format!("{}{}", c.text(true), offset_text(o, true))),
        (0u32..24, 0u32..60, 0u32..60, 0u32..1000).prop_map(|(h, m, s, ms)| format!("{h:02}:{m:02}:{s:02}.{ms:03}Z")),
        decimal_case().prop_map(|(_, _, negative, int, frac)| {
            let sign = if negative { "-" } else { "" };
            let int = if int.is_empty() { "0" } else { &int };
            if frac.is_empty() { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") }
        }),
        json_text(),
    ]
}

fn p_and_s() -> impl Strategy<Value = (u8, u8)> {
    (1u8..=38).prop_flat_map(|p| (Just(p), 0..=p))
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_text_is_a_reason_or_a_right_value(text in any::<String>(), (p, s) in p_and_s()) {
        check_every_cast(&text, p, s)?;
    }

    #[test]
    fn numberish_text_is_a_reason_or_a_right_value(
        text in "[-+0-9.eE :TZ]{0,14}|[ ]?[-+]?[0-9]{0,25}([.][0-9]{0,12})?([eE][-+]?[0-9]{1,3})?[ ]?",
        (p, s) in p_and_s(),
    ) {
        check_every_cast(&text, p, s)?;
    }

    #[test]
    fn near_misses_are_a_reason_or_a_right_value(
        valid in any_valid_text(),
        at in any::<Index>(),
        c in near_miss_char(),
        op in 0u8..3,
        (p, s) in p_and_s(),
    ) {
        check_every_cast(&mutate(&valid, at, c, op), p, s)?;
    }

    #[test]
    fn trailing_junk_is_refused_by_every_cast(valid in any_valid_text(), junk in junk(), (p, s) in p_and_s()) {
        let text = format!("{valid}{junk}");
        prop_assert!(parse_integer(&text).is_err(), "{}", text);
        prop_assert!(parse_float(&text).is_err(), "{}", text);
        prop_assert!(parse_boolean(&text).is_err(), "{}", text);
        prop_assert!(parse_date(&text).is_err(), "{}", text);
        prop_assert!(parse_time(&text).is_err(), "{}", text);
        prop_assert!(parse_timestamp_ms(&text).is_err(), "{}", text);
        prop_assert!(parse_decimal(&text, p, s).is_err(), "{}", text);
        prop_assert!(parse_json(&text).is_err(), "{}", text);
        check_every_cast(&text, p, s)?;
    }

    #[test]
    fn integers_that_overflow_are_refused(v in any::<i128>(), zeros in 0usize..2) {
        prop_assume!(i64::try_from(v).is_err());
        let text = if zeros == 0 { v.to_string() } else { format!("{v}.0") };
        let parsed = parse_integer(&text);
        prop_assert!(parsed.is_err() && has_reason(&parsed), "{} gave {:?}", text, parsed);
    }

    #[test]
    fn integers_with_a_fraction_are_refused(v in edge_i64(), frac in "[0-9]{0,3}[1-9]") {
        let text = format!("{v}.{frac}");
        prop_assert!(parse_integer(&text).is_err(), "{}", text);
    }

    #[test]
    fn not_a_number_is_refused(
        word in prop::sample::select(vec!["NaN", "nan", "inf", "Inf", "infinity", "Infinity", "INF", "1e400", "1E999", "∞"]),
        sign in prop::sample::select(vec!["", "+", "-"]),
        (p, s) in p_and_s(),
    ) {
        let text = format!("{sign}{word}");
        prop_assert!(parse_float(&text).is_err(), "{}", text);
        prop_assert!(parse_integer(&text).is_err(), "{}", text);
        prop_assert!(parse_decimal(&text, p, s).is_err(), "{}", text);
        check_every_cast(&text, p, s)?;
    }

    #[test]
    fn decimals_with_too_many_decimals_are_refused(
        (p, s, negative, int, frac) in decimal_case(),
        extra in "[0-9]{0,3}[1-9]",
    ) {
        let text = format!("{}{}.{frac}{}{extra}", if negative { "-" } else { "" }, if int.is_empty() { "0" } else { &int },
            "0".repeat(usize::from(s) - frac.len()));
        let parsed = parse_decimal(&text, p, s);
        prop_assert!(parsed.as_ref().is_err_and(|r| r.contains("decimal places")), "{} as decimal({},{}) gave {:?}", text, p, s, parsed);
    }

    #[test]
    fn decimals_with_too_many_digits_are_refused((p, s) in p_and_s(), lead in 1u8..10, more in digits(0..=3)) {
        let int = format!("{lead}{}{more}", "0".repeat(usize::from(p - s)));
        let parsed = parse_decimal(&int, p, s);
        prop_assert!(parsed.as_ref().is_err_and(|r| r.contains("does not fit")), "{} as decimal({},{}) gave {:?}", int, p, s, parsed);
    }

    #[test]
    fn timestamps_with_a_component_out_of_range_are_refused(
        y in SF_YEARS,
        mo in 0u32..=13,
        d in 0u32..=32,
        h in 0u32..=25,
        mi in 0u32..=61,
        // 60 is a leap second; see `leap_seconds_are_refused`.
        s in prop::sample::select((0u32..=59).chain([61, 99]).collect::<Vec<_>>()),
        ms in 0u32..1000,
    ) {
        let c = Civil { y, mo, d, h, mi, s, ms };
        let text = format!("{}Z", c.text(true));
        let valid = (1..=12).contains(&mo) && (1..=days_in_month(y, mo)).contains(&d) && h < 24 && mi < 60 && s < 60;
        let parsed = parse_timestamp_ms(&text);
        if valid {
            prop_assert_eq!(parsed, Ok(c.epoch_ms()), "{}", text);
        } else {
            prop_assert!(parsed.is_err() && has_reason(&parsed), "{} gave {:?}", text, parsed);
        }
    }

    #[test]
    fn timestamps_without_an_offset_are_refused(c in civil(SF_YEARS), millis in any::<bool>()) {
        let text = c.text(millis);
        let parsed = parse_timestamp_ms(&text);
        prop_assert!(parsed.as_ref().is_err_and(|r| r.contains("no UTC offset")), "{} gave {:?}", text, parsed);
    }

    #[test]
    fn times_with_a_component_out_of_range_are_refused(
        h in 0u32..=30,
        mi in 0u32..=70,
        s in prop::sample::select((0u32..=59).chain(61..=70).collect::<Vec<_>>()),
        ms in 0u32..1000,
        zone in any::<bool>(),
    ) {
        let text = format!("{h:02}:{mi:02}:{s:02}.{ms:03}{}", if zone { "Z" } else { "" });
        let parsed = parse_time(&text);
        if h < 24 && mi < 60 && s < 60 {
            prop_assert_eq!(parsed, Ok((i64::from((h * 60 + mi) * 60 + s) * 1000 + i64::from(ms)) * 1_000_000));
        } else {
            prop_assert!(parsed.is_err() && has_reason(&parsed), "{} gave {:?}", text, parsed);
        }
    }
}

/// Salesforce never writes second 60. chrono's parser takes it as a leap
/// second, which `parse_time` turns into nanoseconds at or past 24:00:00 for
/// `23:59:60`: not a time of day. `format_time` then gives `None`, which the
/// SQLite target stores as NULL and the files target as an empty string.
#[test]
fn leap_seconds_are_not_times_of_day() {
    for text in ["23:59:60", "23:59:60.000Z", "23:59:60.999"] {
        let parsed = parse_time(text);
        assert!(parsed.as_ref().is_err_and(|r| !r.is_empty()), "{text} gave {parsed:?}");
    }
}

/// Exponent forms must mean what they say, as plain forms do
/// (`0.0000001` into decimal(18,0) is already a reject).
#[test]
fn decimals_in_exponent_form_are_exact_examples() {
    let rejected = [("1.0E-7", 18, 0), ("1E-20", 18, 2), ("1.00000001E0", 18, 0), ("9.9999999E0", 18, 0)];
    for (text, p, s) in rejected {
        let parsed = parse_decimal(text, p, s);
        assert!(
            parsed.as_ref().is_err_and(|r| r.contains("decimal places")),
            "{text} as decimal({p},{s}) gave {parsed:?}"
        );
    }
    let exact = [
        ("1.23E22", 38, 0, "12300000000000000000000"),
        ("1.0E23", 38, 0, "100000000000000000000000"),
        ("1.0E-4", 38, 20, "0.00010000000000000000"),
    ];
    for (text, p, s, expected) in exact {
        assert_eq!(parse_decimal(text, p, s).as_deref(), Ok(expected), "{text} as decimal({p},{s})");
        assert_eq!(exact_decimal(text, p, s).as_deref(), Some(expected), "reference, {text}");
    }
}

// ---------------------------------------------------------------- mapping level

mod mapping {
    use polars::prelude::{AnyValue, DataFrame, IntoColumn, NamedFrom, PlSmallStr, Series};
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;
    use crate::transform::Mapping;

    const JOB: &str = r#"
[source]
connection = "sf"
object = "Account"
fields = ["Id", "V"]
[transform]
mapping = "m"
[target]
connection = "wh"
table = "t"
key = ["sf_id"]
"#;

    /// A cell as the frame holds it, and as the cast alone would give it.
    #[derive(Debug, Clone, PartialEq)]
    enum Cell {
        Int(i64),
        Float(u64),
        Bool(bool),
        Text(String),
    }

    fn cell(value: AnyValue<'_>) -> Option<Cell> {
        Some(match value {
            AnyValue::Int64(v) | AnyValue::Time(v) | AnyValue::Datetime(v, ..) | AnyValue::DatetimeOwned(v, ..) => {
                Cell::Int(v)
            }
            AnyValue::Date(v) => Cell::Int(i64::from(v)),
            AnyValue::Float64(v) => Cell::Float(v.to_bits()),
            AnyValue::Boolean(v) => Cell::Bool(v),
            AnyValue::String(v) => Cell::Text(v.to_string()),
            AnyValue::StringOwned(v) => Cell::Text(v.to_string()),
            _ => return None,
        })
    }

    /// One mapped type: its name in a mapping, the cast alone, valid texts.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Text,
        Integer,
        Float,
        Boolean,
        Date,
        Time,
        Timestamp,
        Decimal(u8, u8),
        Json,
    }

    impl Kind {
        fn type_name(self) -> String {
            match self {
                Kind::Text => "text".into(),
                Kind::Integer => "integer".into(),
                Kind::Float => "float".into(),
                Kind::Boolean => "boolean".into(),
                Kind::Date => "date".into(),
                Kind::Time => "time".into(),
                Kind::Timestamp => "timestamp".into(),
                Kind::Decimal(p, s) => format!("decimal({p},{s})"),
                Kind::Json => "json".into(),
            }
        }

        fn cast(self, text: &str) -> Result<Cell, String> {
            match self {
                Kind::Text => Ok(Cell::Text(text.to_string())),
                Kind::Integer => parse_integer(text).map(Cell::Int),
                Kind::Float => parse_float(text).map(|v| Cell::Float(v.to_bits())),
                Kind::Boolean => parse_boolean(text).map(Cell::Bool),
                Kind::Date => parse_date(text).map(|v| Cell::Int(i64::from(v))),
                Kind::Time => parse_time(text).map(Cell::Int),
                Kind::Timestamp => parse_timestamp_ms(text).map(Cell::Int),
                Kind::Decimal(p, s) => parse_decimal(text, p, s).map(Cell::Text),
                Kind::Json => parse_json(text).map(Cell::Text),
            }
        }

        fn valid_text(self) -> BoxedStrategy<String> {
            match self {
                Kind::Text => any::<String>().boxed(),
                Kind::Integer => edge_i64().prop_map(|v| v.to_string()).boxed(),
                Kind::Float => finite_f64().prop_map(java_double).boxed(),
                Kind::Boolean => prop_oneof![any_case("true"), any_case("false")].boxed(),
                Kind::Date => sf_days().prop_map(|d| format_date(d).unwrap()).boxed(),
                Kind::Time => {
                    (0i64..MS_PER_DAY).prop_map(|ms| format!("{}Z", format_time(ms * 1_000_000).unwrap())).boxed()
                }
                Kind::Timestamp => (civil(SF_YEARS), -840i64..=840, any::<bool>())
                    .prop_map(|(c, offset, zulu)| {
                        let zone = if zulu { "Z".to_string() } else { offset_text(offset, offset % 2 == 0) };
                        format!("{}{zone}", c.text(true))
                    })
                    .boxed(),
                Kind::Decimal(p, s) => (any::<bool>(), digits(0..=usize::from(p - s)), digits(0..=usize::from(s)))
                    .prop_map(|(negative, int, frac)| {
                        format!("{}{}.{frac}", if negative { "-" } else { "" }, if int.is_empty() { "0" } else { &int })
                    })
                    .boxed(),
                Kind::Json => json_text().boxed(),
            }
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Text),
            Just(Kind::Integer),
            Just(Kind::Float),
            Just(Kind::Boolean),
            Just(Kind::Date),
            Just(Kind::Time),
            Just(Kind::Timestamp),
            p_and_s().prop_map(|(p, s)| Kind::Decimal(p, s)),
            Just(Kind::Json),
        ]
    }

    /// A page for one kind: valid values, near misses and arbitrary text, all non-empty.
    fn page_values(kind: Kind) -> impl Strategy<Value = Vec<String>> {
        let value = prop_oneof![
            3 => kind.valid_text(),
            2 => (kind.valid_text(), any::<Index>(), near_miss_char(), 0u8..3)
                .prop_map(|(v, at, c, op)| mutate(&v, at, c, op)),
            1 => any::<String>(),
        ]
        .prop_map(|v| if v.is_empty() { "x".to_string() } else { v });
        prop::collection::vec(value, 1..24)
    }

    fn mapping(kind: Kind) -> Mapping {
        let file = format!(
            "[[column]]\nname = \"sf_id\"\nfrom = \"Id\"\nrequired = true\n\
             [[column]]\nname = \"v\"\nfrom = \"V\"\ntype = \"{}\"\n",
            kind.type_name()
        );
        Mapping::new(&crate::config::plan_for_tests(JOB, &file))
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Every row is kept with exactly the cast's non-null value, or is a
        /// reject naming the row, the column, the value and the cast's reason.
        #[test]
        fn every_row_is_a_value_or_a_reject((kind, values) in kind().prop_flat_map(|k| (Just(k), page_values(k)))) {
            let mapping = mapping(kind);
            let n = values.len();
            let ids: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
            let page = DataFrame::new(
                n,
                vec![
                    Series::new(PlSmallStr::from_static("Id"), ids.iter().map(String::as_str).collect::<Vec<_>>())
                        .into_column(),
                    Series::new(PlSmallStr::from_static("V"), values.iter().map(String::as_str).collect::<Vec<_>>())
                        .into_column(),
                ],
            )
            .unwrap();
            let out = mapping.apply(1, &page).unwrap();
            prop_assert_eq!(out.rows_in, n);
            prop_assert_eq!(out.page.rows.height() + out.rejects.len(), n);

            let kept: Vec<String> = out
                .page
                .rows
                .column("sf_id")
                .unwrap()
                .str()
                .unwrap()
                .iter()
                .map(|id| id.unwrap_or_default().to_string())
                .collect();
            let column = out.page.rows.column("v").unwrap();
            for (i, (id, text)) in ids.iter().zip(&values).enumerate() {
                let expected = kind.cast(text);
                let rejects: Vec<_> = out.rejects.iter().filter(|r| r.record_id.as_deref() == Some(id)).collect();
                match kept.iter().position(|k| k == id) {
                    Some(row) => {
                        let value = column.get(row).unwrap();
                        prop_assert!(!matches!(value, AnyValue::Null), "row {} ({:?}) kept as null", i, text);
                        prop_assert_eq!(cell(value), expected.ok(), "row {} ({:?}) as {}", i, text, kind.type_name());
                        prop_assert!(rejects.is_empty(), "row {} is kept and rejected", i);
                    }
                    None => {
                        prop_assert_eq!(rejects.len(), 1, "row {} ({:?}) dropped without one reject", i, text);
                        let reject = rejects[0];
                        prop_assert_eq!(&reject.column, "v");
                        prop_assert_eq!(reject.value.as_deref(), Some(text.as_str()));
                        prop_assert!(!reject.reason.trim().is_empty());
                        prop_assert_eq!(Err(reject.reason.clone()), expected, "row {} ({:?})", i, text);
                    }
                }
            }
            // Kept rows stay in page order.
            let order: Vec<usize> = kept.iter().map(|k| ids.iter().position(|id| id == k).unwrap()).collect();
            prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "{:?}", order);
        }
    }
}
