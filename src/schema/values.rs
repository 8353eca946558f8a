//! The one audited way to read typed cells out of a mapped page.
//!
//! A Polars [`Column`] can be backed by a chunked series, a scalar (Polars
//! turns a length-1 column into one) or a partitioned series, and its cells
//! read through `AnyValue` come back as different variants depending on
//! which (`Datetime` vs `DatetimeOwned`, `String` vs `StringOwned`, ...).
//! Code that matches `AnyValue` variants therefore renders the same value
//! differently on a one-row page. Targets never do that: they look at a
//! column through [`TypedColumn`], which materialises whatever backs it and
//! downcasts it to the exact physical array its schema type promises.

use std::borrow::Cow;

use polars::prelude::*;

use super::ColumnType;
use super::cast::{format_date, format_time, format_timestamp_ms};

/// The Polars type a column of `ty` has in a mapped page.
pub fn dtype(ty: ColumnType) -> DataType {
    match ty {
        ColumnType::Text | ColumnType::Decimal { .. } | ColumnType::Json => DataType::String,
        ColumnType::Integer => DataType::Int64,
        ColumnType::Float => DataType::Float64,
        ColumnType::Boolean => DataType::Boolean,
        ColumnType::Timestamp => DataType::Datetime(TimeUnit::Milliseconds, None),
        ColumnType::Date => DataType::Date,
        ColumnType::Time => DataType::Time,
    }
}

/// A column seen through its schema type.
#[derive(Clone, Copy)]
pub enum TypedColumn<'a> {
    /// Text, and decimals and JSON, which travel as canonical text.
    Text(&'a StringChunked),
    Integer(&'a Int64Chunked),
    Float(&'a Float64Chunked),
    Boolean(&'a BooleanChunked),
    /// Epoch milliseconds, UTC.
    Timestamp(&'a Int64Chunked),
    /// Days since 1970-01-01.
    Date(&'a Int32Chunked),
    /// Nanoseconds since midnight.
    Time(&'a Int64Chunked),
}

/// One cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    Null,
    Text(&'a str),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    TimestampMs(i64),
    Date(i32),
    TimeNs(i64),
}

impl<'a> TypedColumn<'a> {
    /// Views `column` as `ty`; a column of any other type is an error naming
    /// both (a bug upstream, never data to reinterpret).
    pub fn of(column: &'a Column, ty: ColumnType) -> Result<TypedColumn<'a>, String> {
        let series = column.as_materialized_series();
        let expected = dtype(ty);
        if series.dtype() != &expected {
            return Err(format!(
                "column `{}` is {} in the page but {} ({expected}) in the schema",
                column.name(),
                series.dtype(),
                ty.name()
            ));
        }
        let wrap = |e: PolarsError| format!("column `{}`: {e}", column.name());
        Ok(match ty {
            ColumnType::Text | ColumnType::Decimal { .. } | ColumnType::Json => {
                TypedColumn::Text(series.str().map_err(wrap)?)
            }
            ColumnType::Integer => TypedColumn::Integer(series.i64().map_err(wrap)?),
            ColumnType::Float => TypedColumn::Float(series.f64().map_err(wrap)?),
            ColumnType::Boolean => TypedColumn::Boolean(series.bool().map_err(wrap)?),
            ColumnType::Timestamp => TypedColumn::Timestamp(series.datetime().map_err(wrap)?.physical()),
            ColumnType::Date => TypedColumn::Date(series.date().map_err(wrap)?.physical()),
            ColumnType::Time => TypedColumn::Time(series.time().map_err(wrap)?.physical()),
        })
    }

    pub fn len(&self) -> usize {
        match self {
            TypedColumn::Text(c) => c.len(),
            TypedColumn::Integer(c) | TypedColumn::Timestamp(c) | TypedColumn::Time(c) => c.len(),
            TypedColumn::Float(c) => c.len(),
            TypedColumn::Boolean(c) => c.len(),
            TypedColumn::Date(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cell `i`; out of range reads as null (callers iterate `0..len`).
    pub fn get(&self, i: usize) -> Cell<'a> {
        let cell = match self {
            TypedColumn::Text(c) => c.get(i).map(Cell::Text),
            TypedColumn::Integer(c) => c.get(i).map(Cell::Integer),
            TypedColumn::Float(c) => c.get(i).map(Cell::Float),
            TypedColumn::Boolean(c) => c.get(i).map(Cell::Boolean),
            TypedColumn::Timestamp(c) => c.get(i).map(Cell::TimestampMs),
            TypedColumn::Date(c) => c.get(i).map(Cell::Date),
            TypedColumn::Time(c) => c.get(i).map(Cell::TimeNs),
        };
        cell.unwrap_or(Cell::Null)
    }
}

impl<'a> Cell<'a> {
    pub fn is_null(&self) -> bool {
        matches!(self, Cell::Null)
    }

    /// The canonical text of a value, in the forms Salesforce itself writes
    /// (`2024-01-31T12:00:00.000Z`, `2024-01-31`, `12:00:00.000`, `true`).
    /// Text stores (SQLite, CSV snapshots) and the tests' reference
    /// rendering use exactly this.
    pub fn to_text(&self) -> Option<Cow<'a, str>> {
        match *self {
            Cell::Null => None,
            Cell::Text(s) => Some(Cow::Borrowed(s)),
            Cell::Integer(v) => Some(Cow::Owned(v.to_string())),
            Cell::Float(v) => Some(Cow::Owned(format_float(v))),
            Cell::Boolean(v) => Some(Cow::Borrowed(if v { "true" } else { "false" })),
            Cell::TimestampMs(ms) => format_timestamp_ms(ms).map(Cow::Owned),
            Cell::Date(days) => format_date(days).map(Cow::Owned),
            Cell::TimeNs(ns) => format_time(ns).map(Cow::Owned),
        }
    }
}

/// The shortest text that parses back to the same `f64`.
pub fn format_float(v: f64) -> String {
    // Rust's Display is shortest-round-trip and never uses an exponent.
    v.to_string()
}

/// Each column of `frame` named by `columns`, viewed as its type.
pub fn typed_columns<'a>(
    frame: &'a DataFrame,
    columns: impl IntoIterator<Item = (&'a str, ColumnType)>,
) -> Result<Vec<TypedColumn<'a>>, String> {
    columns
        .into_iter()
        .map(|(name, ty)| {
            let column = frame.column(name).map_err(|_| format!("the mapped page lacks column `{name}`"))?;
            TypedColumn::of(column, ty)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bug this module exists for: a one-row page's columns may be
    /// scalar columns; their cells must read exactly like a chunked column's.
    #[test]
    fn scalar_and_chunked_columns_read_alike() {
        let ms = 1_764_654_911_000i64;
        let chunked = Series::new("t".into(), &[ms]).into_datetime(TimeUnit::Milliseconds, None).into_column();
        let scalar = Column::new_scalar(
            "t".into(),
            Scalar::new(
                DataType::Datetime(TimeUnit::Milliseconds, None),
                AnyValue::Datetime(ms, TimeUnit::Milliseconds, None),
            ),
            1,
        );
        for column in [&chunked, &scalar] {
            let typed = TypedColumn::of(column, ColumnType::Timestamp).unwrap();
            assert_eq!(typed.get(0), Cell::TimestampMs(ms));
            assert_eq!(typed.get(0).to_text().as_deref(), Some("2025-12-02T05:55:11.000Z"));
        }
        let text =
            Column::new_scalar("s".into(), Scalar::new(DataType::String, AnyValue::StringOwned("a\"b".into())), 1);
        assert_eq!(TypedColumn::of(&text, ColumnType::Text).unwrap().get(0), Cell::Text("a\"b"));
    }

    #[test]
    fn a_column_of_another_type_is_refused() {
        let column = Series::new("n".into(), &["1"]).into_column();
        let err = TypedColumn::of(&column, ColumnType::Integer).err().unwrap();
        assert!(err.contains("column `n` is str"), "{err}");
    }

    #[test]
    fn canonical_text() {
        assert_eq!(Cell::Float(1500.0).to_text().as_deref(), Some("1500"));
        assert_eq!(Cell::Float(-0.125).to_text().as_deref(), Some("-0.125"));
        assert_eq!(Cell::Boolean(false).to_text().as_deref(), Some("false"));
        assert_eq!(Cell::Date(0).to_text().as_deref(), Some("1970-01-01"));
        assert_eq!(Cell::TimeNs(45_000_000_000_000).to_text().as_deref(), Some("12:30:00.000"));
        assert_eq!(Cell::Null.to_text(), None);
    }
}
