//! The CSV writer for query results, written by hand rather than with the
//! `csv` crate so that the sandbox and the client (which reads with `csv`)
//! don't share an implementation: a misreading of Salesforce's dialect on
//! one side then shows up as a failure on the other.
//!
//! Dialect (salesforce-bulk-api.md §1.12): every field double-quoted, quotes
//! doubled, embedded CR/LF kept raw, null written as `""`, records ended by
//! the job's line ending.

use super::data::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnDelimiter {
    Comma,
    Tab,
    Pipe,
    Semicolon,
    Caret,
    Backquote,
}

impl ColumnDelimiter {
    pub(crate) fn parse(name: &str) -> Option<ColumnDelimiter> {
        Some(match name {
            "COMMA" => ColumnDelimiter::Comma,
            "TAB" => ColumnDelimiter::Tab,
            "PIPE" => ColumnDelimiter::Pipe,
            "SEMICOLON" => ColumnDelimiter::Semicolon,
            "CARET" => ColumnDelimiter::Caret,
            "BACKQUOTE" => ColumnDelimiter::Backquote,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            ColumnDelimiter::Comma => "COMMA",
            ColumnDelimiter::Tab => "TAB",
            ColumnDelimiter::Pipe => "PIPE",
            ColumnDelimiter::Semicolon => "SEMICOLON",
            ColumnDelimiter::Caret => "CARET",
            ColumnDelimiter::Backquote => "BACKQUOTE",
        }
    }

    pub(crate) fn char(self) -> char {
        match self {
            ColumnDelimiter::Comma => ',',
            ColumnDelimiter::Tab => '\t',
            ColumnDelimiter::Pipe => '|',
            ColumnDelimiter::Semicolon => ';',
            ColumnDelimiter::Caret => '^',
            ColumnDelimiter::Backquote => '`',
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineEnding {
    Lf,
    Crlf,
}

impl LineEnding {
    pub(crate) fn parse(name: &str) -> Option<LineEnding> {
        match name {
            "LF" => Some(LineEnding::Lf),
            "CRLF" => Some(LineEnding::Crlf),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            LineEnding::Lf => "LF",
            LineEnding::Crlf => "CRLF",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            LineEnding::Lf => "\n",
            LineEnding::Crlf => "\r\n",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CsvStyle {
    pub delimiter: ColumnDelimiter,
    pub line_ending: LineEnding,
}

impl Default for CsvStyle {
    fn default() -> Self {
        CsvStyle { delimiter: ColumnDelimiter::Comma, line_ending: LineEnding::Lf }
    }
}

pub(crate) fn write_header<'a>(out: &mut String, names: impl IntoIterator<Item = &'a str>, style: CsvStyle) {
    for (i, name) in names.into_iter().enumerate() {
        if i > 0 {
            out.push(style.delimiter.char());
        }
        write_quoted_text(out, name);
    }
    out.push_str(style.line_ending.as_str());
}

pub(crate) fn write_record<'a>(out: &mut String, values: impl IntoIterator<Item = Option<&'a Value>>, style: CsvStyle) {
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(style.delimiter.char());
        }
        match value {
            None => out.push_str("\"\""),
            Some(Value::Text(s)) => write_quoted_text(out, s),
            // Non-text renderings never contain quotes, so they skip escaping.
            Some(other) => {
                out.push('"');
                other.render_into(out);
                out.push('"');
            }
        }
    }
    out.push_str(style.line_ending.as_str());
}

fn write_quoted_text(out: &mut String, text: &str) {
    out.push('"');
    let mut parts = text.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for part in parts {
        out.push_str("\"\"");
        out.push_str(part);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(rows: &[Vec<Option<Value>>], style: CsvStyle) -> String {
        let mut out = String::new();
        write_header(&mut out, ["Id", "Name", "Note"], style);
        for row in rows {
            write_record(&mut out, row.iter().map(Option::as_ref), style);
        }
        out
    }

    #[test]
    fn quotes_every_field_doubles_quotes_and_keeps_newlines_raw() {
        let rows = vec![vec![Some(Value::text("001")), Some(Value::text("Say \"hi\", then\nleave")), None]];
        assert_eq!(
            render(&rows, CsvStyle::default()),
            "\"Id\",\"Name\",\"Note\"\n\"001\",\"Say \"\"hi\"\", then\nleave\",\"\"\n"
        );
    }

    #[test]
    fn crlf_ends_records_but_embedded_newlines_keep_their_bytes() {
        let style = CsvStyle { delimiter: ColumnDelimiter::Comma, line_ending: LineEnding::Crlf };
        let rows = vec![vec![Some(Value::text("a\nb")), Some(Value::text("c\r\nd")), Some(Value::Bool(false))]];
        assert_eq!(render(&rows, style), "\"Id\",\"Name\",\"Note\"\r\n\"a\nb\",\"c\r\nd\",\"false\"\r\n");
    }

    #[test]
    fn tab_delimiter_applies_to_header_and_data() {
        let style = CsvStyle { delimiter: ColumnDelimiter::Tab, line_ending: LineEnding::Lf };
        let rows = vec![vec![Some(Value::text("x\ty")), Some(Value::Int(7)), Some(Value::text("NA"))]];
        assert_eq!(render(&rows, style), "\"Id\"\t\"Name\"\t\"Note\"\n\"x\ty\"\t\"7\"\t\"NA\"\n");
    }

    #[test]
    fn output_parses_back_with_an_rfc4180_reader() {
        let rows = vec![
            vec![Some(Value::text("1")), Some(Value::text("München, \"Zentrum\"\n2. OG")), None],
            vec![Some(Value::text("2")), Some(Value::text("東京 🚀")), Some(Value::text("null"))],
        ];
        let text = render(&rows, CsvStyle::default());
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let parsed: Vec<Vec<String>> =
            reader.records().map(|r| r.unwrap().iter().map(str::to_owned).collect()).collect();
        assert_eq!(parsed[0][1], "München, \"Zentrum\"\n2. OG");
        assert_eq!(parsed[0][2], "");
        assert_eq!(parsed[1][1], "東京 🚀");
        assert_eq!(parsed[1][2], "null");
    }

    #[test]
    fn option_names_parse() {
        for name in ["COMMA", "TAB", "PIPE", "SEMICOLON", "CARET", "BACKQUOTE"] {
            assert_eq!(ColumnDelimiter::parse(name).map(ColumnDelimiter::name), Some(name));
        }
        assert_eq!(ColumnDelimiter::parse("comma"), None);
        assert_eq!(LineEnding::parse("CRLF"), Some(LineEnding::Crlf));
    }
}
