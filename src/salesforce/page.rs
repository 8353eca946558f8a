//! One page of Bulk API 2.0 query results as a Polars DataFrame.

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
}

/// Parses a results page (its own header row first) with a real RFC 4180
/// reader: values may hold delimiters, doubled quotes and raw newlines.
/// Values go straight into Polars string builders (no `String` per value).
pub fn parse_csv_page(body: &[u8]) -> Result<DataFrame, String> {
    // An empty result may come as a 0-byte body instead of a header-only CSV.
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return DataFrame::new(0, Vec::new()).map_err(|e| e.to_string());
    }
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(body);
    let headers: Vec<String> =
        reader.headers().map_err(|e| format!("bad CSV header row: {e}"))?.iter().map(str::to_string).collect();
    // A row is rarely under ~100 bytes; a close guess saves regrowth.
    let capacity = body.len() / (headers.len().max(1) * 16).max(100);
    let mut columns: Vec<StringChunkedBuilder> =
        headers.iter().map(|h| StringChunkedBuilder::new(PlSmallStr::from_str(h), capacity)).collect();
    let mut record = csv::StringRecord::new();
    let mut height = 0;
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                for (column, value) in columns.iter_mut().zip(record.iter()) {
                    if value.is_empty() {
                        column.append_null();
                    } else {
                        column.append_value(value);
                    }
                }
                height += 1;
            }
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                return Err(format!("bad CSV at line {line} of the page: {e}"));
            }
        }
    }
    let columns = columns.into_iter().map(|b| b.finish().into_series().into_column()).collect();
    DataFrame::new(height, columns).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awkward_values_survive() {
        let body =
            "\"Id\",\"Name\",\"Note\"\n\"001\",\"Acme, \"\"Inc\"\"\",\"line1\nline2 \u{fc}\"\n\"002\",\"\",\"NA\"\n";
        let df = parse_csv_page(body.as_bytes()).unwrap();
        assert_eq!(df.height(), 2);
        let name: Vec<Option<&str>> = df.column("Name").unwrap().str().unwrap().iter().collect();
        assert_eq!(name, vec![Some("Acme, \"Inc\""), None]);
        let note: Vec<Option<&str>> = df.column("Note").unwrap().str().unwrap().iter().collect();
        assert_eq!(note, vec![Some("line1\nline2 \u{fc}"), Some("NA")]);
    }

    #[test]
    fn header_only_and_empty_bodies() {
        let df = parse_csv_page(b"\"Id\",\"Name\"\n").unwrap();
        assert_eq!((df.height(), df.width()), (0, 2));
        assert_eq!(parse_csv_page(b"").unwrap().height(), 0);
    }

    #[test]
    fn ragged_rows_are_an_error() {
        let err = parse_csv_page(b"\"Id\",\"Name\"\n\"1\"\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }
}
