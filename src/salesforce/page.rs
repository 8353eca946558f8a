//! One page of Bulk API 2.0 query results, decoded strictly.
//!
//! A page is trusted only when it is whole: it decompresses (if gzipped)
//! within a size cap, it ends with its line ending, it is valid RFC 4180
//! CSV with a header row of distinct names, and it holds exactly the rows
//! its `Sforce-NumberOfRecords` header declares. Anything else is a
//! [`PageError`], which the client answers by fetching the same locator
//! again (Salesforce keeps locators stable) and, if that keeps failing, by
//! failing the run. A page is never "mostly" accepted.

use std::io::Read;

use polars::prelude::*;

/// A results page: every column is text, exactly as Salesforce sent it
/// (empty field = null); the mapping decides types.
#[derive(Debug)]
pub struct Page {
    /// 1-based position in the job's result set.
    pub number: u32,
    pub frame: DataFrame,
    /// `Sforce-Locator` of the next page; `None` after the last page.
    pub next_locator: Option<String>,
    /// Bytes of CSV the page decoded from (after decompression).
    pub bytes: usize,
}

/// The largest page nightjar decodes, after decompression. Salesforce caps
/// result pages well below this; a body past it is a gzip bomb or a broken
/// server, and decoding it would exhaust memory.
pub const MAX_PAGE_BYTES: usize = 1 << 30;

/// Why a page body was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    /// The body is cut short (a dropped connection, a proxy): fetch again.
    Truncated(String),
    /// The body is whole but wrong: it may still be worth one more fetch.
    Malformed(String),
    /// Past [`MAX_PAGE_BYTES`]: fetching again will not help.
    TooLarge(String),
}

impl std::fmt::Display for PageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PageError::Truncated(m) | PageError::Malformed(m) | PageError::TooLarge(m) => f.write_str(m),
        }
    }
}

/// Decodes one results page: `body` as received, gzip-compressed when
/// `gzipped`, with the `Sforce-NumberOfRecords` value `declared`.
pub fn decode_page(body: &[u8], gzipped: bool, declared: Option<&str>) -> Result<DataFrame, PageError> {
    decode_page_within(body, gzipped, declared, MAX_PAGE_BYTES)
}

/// [`decode_page`] with a cap of `max_bytes` on the decoded body.
pub fn decode_page_within(
    body: &[u8],
    gzipped: bool,
    declared: Option<&str>,
    max_bytes: usize,
) -> Result<DataFrame, PageError> {
    let declared: usize = match declared.map(str::trim) {
        Some(text) => text.parse().map_err(|_| {
            PageError::Malformed(format!("Sforce-NumberOfRecords `{}` is not a number", text.escape_debug()))
        })?,
        None => return Err(PageError::Malformed("the response has no Sforce-NumberOfRecords header".into())),
    };
    let plain;
    let text: &[u8] = if gzipped {
        plain = gunzip(body, max_bytes)?;
        &plain
    } else {
        body
    };
    if text.len() > max_bytes {
        return Err(PageError::TooLarge(format!(
            "the page is larger than {} MiB; lower the job's page_size",
            max_bytes >> 20
        )));
    }
    let frame = parse_csv_page(text)?;
    if frame.height() != declared {
        // Fewer rows than declared is a body cut at a row boundary.
        let problem = format!("Sforce-NumberOfRecords says {declared} rows but the page holds {}", frame.height());
        return Err(if frame.height() < declared {
            PageError::Truncated(problem)
        } else {
            PageError::Malformed(problem)
        });
    }
    Ok(frame)
}

/// Decompresses a gzip body, refusing one past `max_bytes`.
fn gunzip(body: &[u8], max_bytes: usize) -> Result<Vec<u8>, PageError> {
    let mut plain = Vec::with_capacity(body.len().saturating_mul(4).min(64 << 20).min(max_bytes));
    let limit = max_bytes as u64 + 1;
    flate2::read::GzDecoder::new(body)
        .take(limit)
        .read_to_end(&mut plain)
        .map_err(|e| PageError::Truncated(format!("the gzip-compressed page does not decompress: {e}")))?;
    if plain.len() > max_bytes {
        return Err(PageError::TooLarge(format!(
            "the page decompresses to more than {} MiB; lower the job's page_size",
            max_bytes >> 20
        )));
    }
    Ok(plain)
}

/// Parses a results page (its own header row first) with a real RFC 4180
/// reader: values may hold delimiters, doubled quotes and raw newlines.
/// Values go straight into Polars string builders (no `String` per value).
pub fn parse_csv_page(body: &[u8]) -> Result<DataFrame, PageError> {
    // An empty result may come as a 0-byte body instead of a header-only CSV.
    if body.is_empty() {
        return DataFrame::new(0, Vec::new()).map_err(|e| PageError::Malformed(e.to_string()));
    }
    // Every record Salesforce writes ends with the job's line ending, the
    // last one too. Without it the body was cut, possibly inside a quoted
    // value, which a CSV reader would otherwise accept as a shorter value.
    if body.last() != Some(&b'\n') {
        return Err(PageError::Truncated("the page does not end with a line ending (it was cut short)".into()));
    }
    check_quoting(body)?;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(body);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| PageError::Malformed(format!("bad CSV header row: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = headers.iter().find(|h| !seen.insert(h.as_str())) {
        return Err(PageError::Malformed(format!("the header row names column `{}` twice", twice.escape_debug())));
    }
    // A row is rarely under ~100 bytes; a close guess saves regrowth.
    let capacity = body.len() / (headers.len().max(1) * 16).max(100);
    let mut columns: Vec<StringChunkedBuilder> =
        headers.iter().map(|h| StringChunkedBuilder::new(PlSmallStr::from_str(h), capacity)).collect();
    let mut record = csv::ByteRecord::new();
    let mut height = 0;
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                for (column, value) in columns.iter_mut().zip(record.iter()) {
                    if value.is_empty() {
                        column.append_null();
                    } else {
                        let value = std::str::from_utf8(value)
                            .map_err(|e| PageError::Malformed(format!("row {} is not UTF-8: {e}", height + 1)))?;
                        column.append_value(value);
                    }
                }
                height += 1;
            }
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                return Err(PageError::Malformed(format!("bad CSV at line {line} of the page: {e}")));
            }
        }
    }
    let columns = columns.into_iter().map(|b| b.finish().into_series().into_column()).collect();
    DataFrame::new(height, columns).map_err(|e| PageError::Malformed(e.to_string()))
}

/// Checks the body's quotes follow RFC 4180, as Salesforce writes them: a
/// quote opens a field, closes it, or comes doubled inside a quoted one.
/// A CSV reader is lenient about both things this refuses: a body that ends
/// inside a quoted value (cut right after a newline in it) is read as a
/// shorter value, and a stray quote in an unquoted field is kept as text,
/// which can make such a cut look whole to any coarser check.
fn check_quoting(body: &[u8]) -> Result<(), PageError> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        FieldStart,
        Unquoted,
        Quoted,
        /// A quote inside a quoted field: its end, or the first of a pair.
        QuoteInQuoted,
    }
    let mut state = State::FieldStart;
    let mut line = 1;
    for &b in body {
        state = match (state, b) {
            (State::Quoted, b'"') => State::QuoteInQuoted,
            (State::Quoted, _) => State::Quoted,
            (State::QuoteInQuoted, b'"') => State::Quoted,
            (State::FieldStart, b'"') => State::Quoted,
            (_, b',' | b'\r' | b'\n') => State::FieldStart,
            (State::Unquoted | State::FieldStart, _) if b != b'"' => State::Unquoted,
            (State::Unquoted, _) => {
                return Err(PageError::Malformed(format!(
                    "line {line} of the page has a quote inside an unquoted value"
                )));
            }
            (State::QuoteInQuoted | State::FieldStart, _) => {
                return Err(PageError::Malformed(format!("line {line} of the page has text after a closing quote")));
            }
        };
        if b == b'\n' {
            line += 1;
        }
    }
    if state == State::Quoted {
        return Err(PageError::Truncated("the page ends inside a quoted value (it was cut short)".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn awkward_values_survive() {
        let body =
            "\"Id\",\"Name\",\"Note\"\n\"001\",\"Acme, \"\"Inc\"\"\",\"line1\nline2 \u{fc}\"\n\"002\",\"\",\"NA\"\n";
        let df = decode_page(body.as_bytes(), false, Some("2")).unwrap();
        assert_eq!(df.height(), 2);
        let name: Vec<Option<&str>> = df.column("Name").unwrap().str().unwrap().iter().collect();
        assert_eq!(name, vec![Some("Acme, \"Inc\""), None]);
        let note: Vec<Option<&str>> = df.column("Note").unwrap().str().unwrap().iter().collect();
        assert_eq!(note, vec![Some("line1\nline2 \u{fc}"), Some("NA")]);
    }

    #[test]
    fn header_only_and_empty_bodies() {
        let df = decode_page(b"\"Id\",\"Name\"\n", false, Some("0")).unwrap();
        assert_eq!((df.height(), df.width()), (0, 2));
        assert_eq!(decode_page(b"", false, Some("0")).unwrap().height(), 0);
        assert!(decode_page(b"", false, Some("3")).is_err(), "an empty body is no page of three rows");
    }

    #[test]
    fn ragged_rows_are_an_error() {
        let err = decode_page(b"\"Id\",\"Name\"\n\"1\"\n", false, Some("1")).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn a_page_cut_inside_its_last_quoted_field_is_truncated() {
        // The count header is right, the quote never closes, no final newline.
        let cut = b"\"Id\",\"Name\"\n\"001\",\"Acme\"\n\"002\",\"Glob";
        assert!(matches!(decode_page(cut, false, Some("2")), Err(PageError::Truncated(_))));
        assert!(matches!(decode_page(&gzip(cut), true, Some("2")), Err(PageError::Truncated(_))));
        // A newline inside the cut quoted value does not make it whole.
        let cut_after_newline = b"\"Id\",\"Note\"\n\"001\",\"one\ntwo\n";
        assert!(decode_page(cut_after_newline, false, Some("1")).is_err());
    }

    /// Every proper prefix of a 3-row page, plain and gzipped, is refused;
    /// only the whole page decodes, to exactly its rows.
    #[test]
    fn every_truncation_of_a_page_is_refused() {
        let page = "\"Id\",\"Name\",\"Note\"\n\"001\",\"Acme, \"\"Inc\"\"\",\"a\nb\"\n\"002\",\"\",\"x\"\n\"003\",\"Zed\",\"\"\n";
        let whole = decode_page(page.as_bytes(), false, Some("3")).unwrap();
        assert_eq!(whole.height(), 3);
        for cut in 0..page.len() {
            let body = &page.as_bytes()[..cut];
            assert!(decode_page(body, false, Some("3")).is_err(), "plain page cut at byte {cut} was accepted");
        }
        let zipped = gzip(page.as_bytes());
        for cut in 0..zipped.len() {
            assert!(decode_page(&zipped[..cut], true, Some("3")).is_err(), "gzip page cut at byte {cut} was accepted");
        }
        assert!(decode_page(&zipped, true, Some("3")).unwrap().equals_missing(&whole));
    }

    #[test]
    fn counts_that_disagree_are_errors() {
        let page = b"\"Id\"\n\"1\"\n\"2\"\n";
        assert!(matches!(decode_page(page, false, Some("3")), Err(PageError::Truncated(_))));
        assert!(matches!(decode_page(page, false, Some("1")), Err(PageError::Malformed(_))));
        assert!(matches!(decode_page(page, false, None), Err(PageError::Malformed(_))));
        assert!(matches!(decode_page(page, false, Some("two")), Err(PageError::Malformed(_))));
    }

    #[test]
    fn a_gzip_bomb_is_refused_without_decompressing_it_all() {
        let bomb = gzip(&vec![b'a'; (4 << 20) + 10]);
        assert!(matches!(decode_page_within(&bomb, true, Some("1"), 4 << 20), Err(PageError::TooLarge(_))));
        let plain = vec![b'\n'; (4 << 20) + 10];
        assert!(matches!(decode_page_within(&plain, false, Some("1"), 4 << 20), Err(PageError::TooLarge(_))));
    }

    /// Found by fuzzing: stray quotes in unquoted fields kept the number of
    /// quotes even, so a page cut inside its last quoted value (after a
    /// newline in it) was accepted with that value shortened.
    #[test]
    fn a_cut_hidden_by_stray_quotes_is_refused() {
        let whole = b"\"Id\",\"Note\"\na\"b,\"x\ny\"\n";
        assert!(matches!(decode_page(whole, false, Some("1")), Err(PageError::Malformed(_))));
        let cut = b"\"Id\",\"Note\"\na\"b,\"x\n";
        assert!(decode_page(cut, false, Some("1")).is_err());
        let after_closing = b"\"Id\"\n\"a\"b\n";
        assert!(
            decode_page(after_closing, false, Some("1")).unwrap_err().to_string().contains("after a closing quote")
        );
        // Doubled quotes and delimiters inside quoted values are whole.
        let fine = b"\"Id\",\"Note\"\r\n\"1\",\"say \"\"hi\"\", \r\nthen\"\r\n2,\r\n";
        assert_eq!(decode_page(fine, false, Some("2")).unwrap().height(), 2);
    }

    #[test]
    fn duplicate_header_names_are_refused() {
        assert!(decode_page(b"\"Id\",\"Id\"\n\"1\",\"2\"\n", false, Some("1")).is_err());
    }
}
