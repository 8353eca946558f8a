//! CSV snapshots, read and written by nightjar itself so that null and
//! empty text stay apart: null is an empty field, empty text is `""` (the
//! convention Polars, DuckDB and Spark read back the same way). Values are
//! in their canonical text ([`Cell::to_text`]); a field is quoted when it is
//! empty text or holds a comma, a quote or a line break. Records end with
//! `\n`. The reader streams: a snapshot is read a batch of rows at a time.

use std::io::{self, BufRead, Write};

use polars::prelude::*;

use super::spill::Layout;
use crate::schema::ColumnType;
use crate::schema::cast::{parse_boolean, parse_date, parse_float, parse_integer, parse_time, parse_timestamp_ms};
use crate::schema::values::{TypedColumn, dtype, typed_columns};

pub(super) fn write_header(out: &mut impl Write, layout: &Layout) -> io::Result<()> {
    for (n, (name, _)) in layout.iter().enumerate() {
        if n > 0 {
            out.write_all(b",")?;
        }
        write_field(out, Some(name))?;
    }
    out.write_all(b"\n")
}

fn write_field(out: &mut impl Write, value: Option<&str>) -> io::Result<()> {
    let Some(value) = value else { return Ok(()) };
    if value.is_empty() || value.bytes().any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r')) {
        out.write_all(b"\"")?;
        out.write_all(value.replace('"', "\"\"").as_bytes())?;
        out.write_all(b"\"")
    } else {
        out.write_all(value.as_bytes())
    }
}

/// Appends every row of `frame` (which has the columns of `layout`).
pub(super) fn write_rows(out: &mut impl Write, frame: &DataFrame, layout: &Layout) -> Result<(), CsvError> {
    let columns: Vec<TypedColumn<'_>> =
        typed_columns(frame, layout.iter().map(|(n, t)| (n.as_str(), *t))).map_err(CsvError::Data)?;
    for i in 0..frame.height() {
        for (n, c) in columns.iter().enumerate() {
            if n > 0 {
                out.write_all(b",")?;
            }
            write_field(out, c.get(i).to_text().as_deref())?;
        }
        out.write_all(b"\n")?;
    }
    Ok(())
}

#[derive(Debug)]
pub(super) enum CsvError {
    Io(io::Error),
    /// The file is not a snapshot nightjar could have written.
    Data(String),
}

impl From<io::Error> for CsvError {
    fn from(e: io::Error) -> Self {
        CsvError::Io(e)
    }
}

/// Reads one record: each field `None` when empty and unquoted. `None` at
/// the end of the input.
pub(super) fn read_record(input: &mut impl BufRead) -> Result<Option<Vec<Option<String>>>, CsvError> {
    let mut line = Vec::new();
    if input.read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    let mut fields = Vec::new();
    let mut field: Vec<u8> = Vec::new();
    let mut quoted = false;
    let mut in_quotes = false;
    let mut i = 0;
    loop {
        if i == line.len() {
            if in_quotes {
                // A quoted line break: the record goes on.
                if input.read_until(b'\n', &mut line)? == 0 {
                    return Err(CsvError::Data("a quoted field is not closed at the end of the file".into()));
                }
                continue;
            }
            break;
        }
        let b = line[i];
        i += 1;
        if in_quotes {
            if b == b'"' {
                if line.get(i) == Some(&b'"') {
                    field.push(b'"');
                    i += 1;
                } else {
                    in_quotes = false;
                }
            } else {
                field.push(b);
            }
            continue;
        }
        match b {
            b'"' if field.is_empty() && !quoted => {
                quoted = true;
                in_quotes = true;
            }
            b',' => {
                fields.push(finish_field(&mut field, &mut quoted)?);
            }
            b'\n' => break,
            b'\r' if line.get(i) == Some(&b'\n') => {}
            _ => field.push(b),
        }
    }
    fields.push(finish_field(&mut field, &mut quoted)?);
    Ok(Some(fields))
}

fn finish_field(field: &mut Vec<u8>, quoted: &mut bool) -> Result<Option<String>, CsvError> {
    let bytes = std::mem::take(field);
    let was_quoted = std::mem::replace(quoted, false);
    if bytes.is_empty() && !was_quoted {
        return Ok(None);
    }
    String::from_utf8(bytes).map(Some).map_err(|_| CsvError::Data("a field is not UTF-8".into()))
}

/// A CSV snapshot being read: its header, then batches of typed rows.
pub(super) struct CsvSnapshot<R: BufRead> {
    input: R,
    pub headers: Vec<String>,
}

impl<R: BufRead> CsvSnapshot<R> {
    pub fn open(mut input: R) -> Result<CsvSnapshot<R>, CsvError> {
        let headers = read_record(&mut input)?.unwrap_or_default().into_iter().map(|h| h.unwrap_or_default()).collect();
        Ok(CsvSnapshot { input, headers })
    }

    /// The next at most `batch` rows, typed as `layout` says (columns the
    /// file has but `layout` lacks are left out); `None` at the end.
    pub fn next_batch(&mut self, layout: &Layout, batch: usize) -> Result<Option<DataFrame>, CsvError> {
        let mut raw: Vec<Vec<Option<String>>> = vec![Vec::new(); self.headers.len()];
        let mut rows = 0;
        while rows < batch {
            let Some(record) = read_record(&mut self.input)? else { break };
            if record.len() != self.headers.len() {
                return Err(CsvError::Data(format!(
                    "a row has {} fields, the header {}",
                    record.len(),
                    self.headers.len()
                )));
            }
            for (col, value) in raw.iter_mut().zip(record) {
                col.push(value);
            }
            rows += 1;
        }
        if rows == 0 {
            return Ok(None);
        }
        let mut columns = Vec::new();
        for (name, values) in self.headers.iter().zip(raw) {
            let Some((_, ty)) = layout.iter().find(|(n, _)| n == name) else { continue };
            columns.push(typed(name, *ty, values).map_err(|e| CsvError::Data(format!("column `{name}`: {e}")))?);
        }
        DataFrame::new(rows, columns).map(Some).map_err(|e| CsvError::Data(e.to_string()))
    }
}

fn parsed<T>(values: Vec<Option<String>>, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<Option<T>>, String> {
    values.iter().map(|v| v.as_deref().map(&parse).transpose()).collect()
}

/// A column of canonical text values parsed into `ty`.
fn typed(name: &str, ty: ColumnType, values: Vec<Option<String>>) -> Result<Column, String> {
    let name = PlSmallStr::from_str(name);
    let series = match ty {
        ColumnType::Text | ColumnType::Decimal { .. } | ColumnType::Json => Series::new(name, values),
        ColumnType::Integer => Series::new(name, parsed(values, parse_integer)?),
        ColumnType::Float => Series::new(name, parsed(values, parse_float)?),
        ColumnType::Boolean => Series::new(name, parsed(values, parse_boolean)?),
        ColumnType::Timestamp => {
            Series::new(name, parsed(values, parse_timestamp_ms)?).into_datetime(TimeUnit::Milliseconds, None)
        }
        ColumnType::Date => Series::new(name, parsed(values, parse_date)?).into_date(),
        ColumnType::Time => Series::new(name, parsed(values, parse_time)?).into_time(),
    };
    debug_assert_eq!(series.dtype(), &dtype(ty));
    Ok(series.into_column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(text: &str) -> Vec<Vec<Option<String>>> {
        let mut input = std::io::Cursor::new(text.as_bytes());
        std::iter::from_fn(|| read_record(&mut input).unwrap()).collect()
    }

    #[test]
    fn null_and_empty_text_stay_apart() {
        let layout: Layout = vec![("a".into(), ColumnType::Text), ("b".into(), ColumnType::Text)];
        let frame = DataFrame::new(
            3,
            vec![
                Series::new("a".into(), [Some(""), None, Some("x,\"y\"\nz")]).into_column(),
                Series::new("b".into(), [None, Some(""), Some("\u{1f}")]).into_column(),
            ],
        )
        .unwrap();
        let mut out = Vec::new();
        write_header(&mut out, &layout).unwrap();
        write_rows(&mut out, &frame, &layout).unwrap();
        assert_eq!(String::from_utf8(out.clone()).unwrap(), "a,b\n\"\",\n,\"\"\n\"x,\"\"y\"\"\nz\",\u{1f}\n");
        let mut snapshot = CsvSnapshot::open(std::io::Cursor::new(out)).unwrap();
        let back = snapshot.next_batch(&layout, 10).unwrap().unwrap();
        assert!(back.equals_missing(&frame), "{back}");
    }

    #[test]
    fn crlf_and_a_missing_final_newline_read_alike() {
        let want = vec![vec![Some("1".to_string()), None], vec![Some("2".into()), Some("".into())]];
        assert_eq!(records("1,\r\n2,\"\"\r\n"), want);
        assert_eq!(records("1,\n2,\"\""), want);
    }
}
