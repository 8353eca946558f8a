//! Fuzz harnesses: one function per fuzz target in `fuzz/`, each taking the
//! fuzzer's bytes. The same functions replay the committed corpus in an
//! ordinary test (`tests/integration/fuzz_corpus.rs`), so CI checks every
//! input the fuzzer kept without an instrumented build.
//!
//! A harness panics when a property fails; the fuzzer reports a panic as a
//! crash. The properties are what must hold for any input, beyond "no
//! panic": what a parser accepts it must give back unchanged by a round trip
//! through its formatter, and a page it accepts must be whole.

use std::path::Path;

use polars::prelude::*;

use crate::config::{ConfigError, Project};
use crate::salesforce::{PageError, decode_page_within};
use crate::schema::cast::*;
use crate::schema::sql::SqlExpr;

/// The decoded-size cap the page harness uses: small, so that the cap is
/// reached (and checked) by inputs of a fuzzer's size.
const PAGE_CAP: usize = 64 << 10;

/// Accepted pages are checked against every shorter cut only up to this size
/// (the check is quadratic).
const PREFIX_CHECK_MAX: usize = 4 << 10;

/// The result-page decoder. Input: a mode byte, a count byte, then the body.
/// Mode bit 0: the body is fed as a gzip stream as is; bit 1: no
/// `Sforce-NumberOfRecords` header; bit 2: the header's text is the body's
/// first line (so odd header values get fuzzed too).
///
/// Properties of an accepted page: it holds exactly the declared rows; it
/// ends with a line ending; the same page gzipped decodes to the same frame;
/// writing the frame back as CSV and decoding that gives the same frame; and
/// no proper prefix of a page with rows is accepted as a different page (a
/// cut body is never data).
pub fn page(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((&count, rest)) = rest.split_first() else { return };
    let count_text;
    let (declared, body): (Option<&str>, &[u8]) = if mode & 2 != 0 {
        (None, rest)
    } else if mode & 4 != 0 {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let Ok(text) = std::str::from_utf8(&rest[..end]) else { return };
        (Some(text), rest.get(end + 1..).unwrap_or_default())
    } else {
        count_text = count.to_string();
        (Some(count_text.as_str()), rest)
    };
    let gzipped = mode & 1 != 0;
    let decoded = decode_page_within(body, gzipped, declared, PAGE_CAP);
    if gzipped {
        if let Ok(frame) = &decoded {
            assert_whole_page(frame, declared);
        }
        return;
    }
    if body.len() > PAGE_CAP {
        assert!(matches!(decoded, Err(PageError::TooLarge(_)) | Err(PageError::Malformed(_))), "{decoded:?}");
        return;
    }
    // The same body gzipped is the same page, or the same refusal.
    let zipped = decode_page_within(&gzip(body), true, declared, PAGE_CAP);
    match (&decoded, &zipped) {
        (Ok(plain), Ok(zipped)) => assert!(plain.equals_missing(zipped), "gzip changed the page:\n{plain}\n{zipped}"),
        (Err(_), Err(_)) => {}
        _ => panic!("plain and gzipped bodies disagree: {decoded:?} vs {zipped:?}"),
    }
    let Ok(frame) = decoded else { return };
    assert_whole_page(&frame, declared);
    assert!(body.is_empty() || body.ends_with(b"\n"), "a page without its final line ending was accepted");

    let again = decode_page_within(&to_csv(&frame), false, declared, usize::MAX)
        .unwrap_or_else(|e| panic!("the page written back as CSV does not decode: {e}\n{frame}"));
    assert!(again.equals_missing(&frame), "the page written back as CSV decodes differently:\n{frame}\n{again}");
    // A page of no rows carries no data to lose (an empty result may even
    // come as a 0-byte body), so only pages with rows are checked.
    if frame.height() > 0 && body.len() <= PREFIX_CHECK_MAX {
        for cut in (0..body.len()).filter(|&cut| cut > 0 && body[cut - 1] == b'\n') {
            if let Ok(shorter) = decode_page_within(&body[..cut], false, declared, PAGE_CAP) {
                assert!(
                    shorter.equals_missing(&frame),
                    "the page cut at byte {cut} was accepted as a different page:\n{frame}\n{shorter}"
                );
            }
        }
    }
}

fn assert_whole_page(frame: &DataFrame, declared: Option<&str>) {
    let declared: usize = declared.and_then(|d| d.trim().parse().ok()).expect("a page was accepted without a count");
    assert_eq!(frame.height(), declared, "the page holds another number of rows than declared");
    for column in frame.columns() {
        assert_eq!(column.dtype(), &DataType::String, "column {} is not text", column.name());
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, bytes).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

/// The frame as Salesforce (and the sandbox) write it: every field quoted,
/// null as `""`.
fn to_csv(frame: &DataFrame) -> Vec<u8> {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut out = String::new();
    if frame.width() == 0 {
        return Vec::new();
    }
    let names: Vec<String> = frame.get_column_names().iter().map(|n| quote(n.as_str())).collect();
    out.push_str(&names.join(","));
    out.push('\n');
    let columns: Vec<&StringChunked> =
        frame.columns().iter().map(|c| c.str().expect("page columns are text")).collect();
    for row in 0..frame.height() {
        let fields: Vec<String> = columns.iter().map(|c| quote(c.get(row).unwrap_or_default())).collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out.into_bytes()
}

/// Every cast. Input: a precision byte, a scale byte, then the text (lossy
/// UTF-8, as the page decoder refuses invalid UTF-8 before any cast).
///
/// Properties: what a cast accepts is the value the text denotes, and its
/// rendering (the form targets store and the files target reads back)
/// parses back to the same value.
pub fn casts(data: &[u8]) {
    let (p, s, text) = match data {
        [p, s, text @ ..] => {
            let p = 1 + p % 38;
            (p, s % (p + 1), String::from_utf8_lossy(text))
        }
        _ => return,
    };
    let text = text.as_ref();
    let t = text.trim();

    if let Ok(v) = parse_integer(text) {
        let (whole, frac) = t.split_once('.').unwrap_or((t, "0"));
        assert!(frac.bytes().all(|b| b == b'0'), "integer {text:?} gave {v} but has a fraction");
        assert_eq!(whole.parse::<i64>(), Ok(v), "integer {text:?}");
        assert_eq!(parse_integer(&v.to_string()), Ok(v));
    }

    if let Ok(v) = parse_float(text) {
        assert!(v.is_finite(), "float {text:?} gave {v}");
        assert_eq!(t.parse::<f64>().map(f64::to_bits), Ok(v.to_bits()), "float {text:?}");
        assert_eq!(parse_float(&v.to_string()).map(f64::to_bits), Ok(v.to_bits()), "float {v} does not round-trip");
    }

    if let Ok(b) = parse_boolean(text) {
        assert!(t.eq_ignore_ascii_case(if b { "true" } else { "false" }), "boolean {text:?} gave {b}");
    }

    if let Ok(days) = parse_date(text) {
        let shown = format_date(days).unwrap_or_else(|| panic!("date {text:?} gave {days}, which does not render"));
        assert_eq!(parse_date(&shown), Ok(days), "date {text:?} renders as {shown:?}, which does not parse back");
    }

    if let Ok(nanos) = parse_time(text) {
        assert!((0..86_400_000_000_000).contains(&nanos), "time {text:?} gave {nanos} ns, not a time of day");
        let shown = format_time(nanos).unwrap_or_else(|| panic!("time {text:?} gave {nanos}, which does not render"));
        assert_eq!(parse_time(&shown), Ok(nanos), "time {text:?} renders as {shown:?}, which parses to another time");
    }

    if let Ok(ms) = parse_timestamp_ms(text) {
        let shown =
            format_timestamp_ms(ms).unwrap_or_else(|| panic!("timestamp {text:?} gave {ms}, which does not render"));
        assert_eq!(
            parse_timestamp_ms(&shown),
            Ok(ms),
            "timestamp {text:?} renders as {shown:?}, which parses to another instant"
        );
    }

    if let Ok(canonical) = parse_decimal(text, p, s) {
        assert_canonical_decimal(&canonical, p, s);
        assert_eq!(parse_decimal(&canonical, p, s).as_ref(), Ok(&canonical), "decimal({p},{s}) not idempotent");
        if !t.contains(['e', 'E']) {
            assert_eq!(decimal_value(t), decimal_value(&canonical), "decimal({p},{s}) {text:?} gave {canonical}");
        }
    }

    if let Ok(kept) = parse_json(text) {
        assert_eq!(kept, text, "JSON is kept as sent");
        let value: serde_json::Value = serde_json::from_str(text).expect("accepted JSON parses");
        assert!(!has_nul(&value), "JSON {text:?} with a NUL character was accepted; Postgres jsonb cannot store it");
    }
}

fn assert_canonical_decimal(c: &str, p: u8, s: u8) {
    let unsigned = c.strip_prefix('-').unwrap_or(c);
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    assert_eq!(frac.len(), usize::from(s), "decimal({p},{s}) gave {c}");
    assert!(int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()), "decimal({p},{s}) gave {c}");
    assert!(int == "0" || !int.starts_with('0'), "decimal({p},{s}) gave {c}");
    let digits = if int == "0" { 0 } else { int.len() };
    assert!(digits + frac.len() <= usize::from(p), "decimal({p},{s}) gave {c}, too many digits");
    assert!(!(c.starts_with('-') && unsigned.bytes().all(|b| b == b'0' || b == b'.')), "negative zero {c}");
}

/// A plain decimal's value as (negative, integer digits, fraction digits),
/// without insignificant zeros.
fn decimal_value(text: &str) -> (bool, String, String) {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let int = int.trim_start_matches('0').to_string();
    let frac = frac.trim_end_matches('0').to_string();
    let zero = int.is_empty() && frac.is_empty();
    (negative && !zero, int, frac)
}

/// The config, job and mapping loader. Input: files, each introduced by a
/// line `=== PATH` (e.g. `=== jobs/accounts.toml`); `nightjar.toml` is the
/// global config.
///
/// Properties: loading never panics; a refusal names at least one problem,
/// each at a position inside a file that was given (or the config file).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let files = split_files(text);
    let paths: Vec<&str> = files.iter().map(|(p, _)| *p).collect();
    match Project::from_texts(Path::new("nightjar.toml"), &files) {
        Ok(project) => assert!(project.jobs.len() <= paths.iter().filter(|p| p.starts_with("jobs/")).count()),
        Err(ConfigError::Invalid(diags)) => {
            assert!(!diags.is_empty(), "a refusal without a reason");
            for d in &diags {
                let path = d.file.to_string_lossy();
                assert!(d.line >= 1 && d.col >= 1, "{d}");
                // A path given twice is the later text, as in `from_texts`.
                let Some((_, text)) = files.iter().rev().find(|(p, _)| *p == path) else {
                    // Directories and missing files are named as paths.
                    continue;
                };
                let lines = text.split('\n').count();
                assert!(d.line <= lines, "{d}: the file has {lines} lines");
                let line_chars = text.split('\n').nth(d.line - 1).map_or(0, |l| l.chars().count());
                assert!(d.col <= line_chars + 1, "{d}: line {} has {line_chars} characters", d.line);
            }
        }
        Err(e) => panic!("loading gave {e}"),
    }
}

/// `=== PATH` lines start files; text before the first is ignored.
pub fn split_files(text: &str) -> Vec<(&str, &str)> {
    let mut files: Vec<(&str, &str)> = Vec::new();
    // (path, offset of its text) of the file being read.
    let mut current: Option<(&str, usize)> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if let Some(path) = line.strip_prefix("=== ") {
            if let Some((name, start)) = current {
                files.push((name, &text[start..offset]));
            }
            current = Some((path.trim(), offset + line.len()));
        }
        offset += line.len();
    }
    if let Some((name, start)) = current {
        files.push((name, &text[start..]));
    }
    files
}

/// Source fields every SQL expression is checked over, besides the ones it
/// reads, so that both known and unknown fields are exercised.
const SQL_FIELDS: [&str; 6] = ["Id", "Name", "Amount", "CreatedDate", "IsDeleted", "Owner.Email"];

/// The mapping's SQL checker. Input: the expression text.
///
/// Properties: parsing and checking never panic; an expression that passes
/// `check` is a row expression whose declared type is the type it produces,
/// one value per row, on a page of real values (or a clean error for a
/// value-dependent failure).
pub fn sql(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(expr) = SqlExpr::parse(text) else { return };
    let mut fields: Vec<&str> = SQL_FIELDS.to_vec();
    for column in &expr.columns {
        if !fields.contains(&column.as_str()) {
            fields.push(column);
        }
    }
    let Ok(ty) = expr.check(&fields) else { return };
    let values = ["001000000000001AAA", "Acme", "12.50", "2024-01-31T12:00:00.000Z", "true", ""];
    let columns = fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let v = values[i % values.len()];
            Series::new(PlSmallStr::from_str(f), &[Some(v), None, Some("0")]).into_column()
        })
        .collect();
    let page = DataFrame::new(3, columns).expect("probe page");
    if let Ok(out) = page.lazy().select([expr.expr.clone().alias("out")]).collect() {
        assert_eq!(out.height(), 3, "`{text}` passed check but gave {} values for 3 rows", out.height());
        let got = out.column("out").expect("out column").dtype();
        assert_eq!(got, &ty, "`{text}` passed check as {ty} but produced {got}");
    }
}

/// The SOQL `where` checker, given as `check` (it lives in `config`).
///
/// Property: a condition the checker accepts cannot escape the parentheses
/// nightjar wraps it in to add the incremental window: outside string
/// literals its parentheses balance and never close more than they opened,
/// and its string literals are closed.
pub fn soql_where(data: &[u8], check: impl Fn(&str) -> Result<(), String>) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match check(text) {
        Ok(()) => {
            let mut depth = 0i64;
            let mut in_string = false;
            let mut chars = text.chars();
            while let Some(c) = chars.next() {
                match (in_string, c) {
                    (true, '\\') => {
                        chars.next();
                    }
                    (true, '\'') => in_string = false,
                    (false, '\'') => in_string = true,
                    (false, '(') => depth += 1,
                    (false, ')') => {
                        depth -= 1;
                        assert!(depth >= 0, "`{text}` was accepted but closes a parenthesis it did not open");
                    }
                    _ => {}
                }
            }
            assert!(!in_string, "`{text}` was accepted with an unclosed string literal");
            assert_eq!(depth, 0, "`{text}` was accepted with unbalanced parentheses");
        }
        Err(reason) => assert!(!reason.trim().is_empty(), "`{text}` was refused without a reason"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_files_finds_each_file() {
        let files =
            split_files("ignored\n=== nightjar.toml\na = 1\n=== jobs/x.toml\nb = 2\nc = 3\n=== mappings/m.toml");
        assert_eq!(
            files,
            vec![("nightjar.toml", "a = 1\n"), ("jobs/x.toml", "b = 2\nc = 3\n"), ("mappings/m.toml", "")]
        );
    }
}
