//! COPY in Postgres' binary format: each mapped column written by its
//! schema type (numeric, date, time, timestamptz and jsonb natively, so the
//! server parses no text), streamed to the server in chunks while the page
//! is still being rendered.

use bytes::Bytes;
use futures_util::SinkExt;
use polars::prelude::*;
use tokio_postgres::Client;

use crate::load::quote_ident;
use crate::schema::ColumnType;
use crate::schema::values::TypedColumn;

/// COPY data goes to the server in chunks of about this size while the rest
/// of the page is still being rendered.
const COPY_CHUNK: usize = 1 << 20;

/// 2000-01-01T00:00:00Z, Postgres' binary epoch, in Unix microseconds and days.
pub(super) const PG_EPOCH_US: i64 = 946_684_800_000_000;
const PG_EPOCH_DAYS: i32 = 10_957;

/// One column of a COPY: the target column's name and where its values come from.
pub(super) struct CopyColumn {
    pub name: String,
    pub value: CopyValue,
}

pub(super) enum CopyValue {
    /// A mapped page column landing as its mapped type (one chunk).
    Mapped(Column, ColumnType),
    /// The staged cursor: epoch milliseconds as `bigint`.
    Cursor(Int64Chunked),
    /// A boolean flag; with `or_false` a null is written as false.
    Flag { flags: BooleanChunked, or_false: bool },
    /// The run id, the same on every row.
    RunId(i64),
    /// The transaction's `now()`, the same on every row.
    LoadedAt,
}

/// Why a COPY failed: the server refused it, or a value could not be written.
pub(super) enum CopyError {
    Db(tokio_postgres::Error),
    Value(String),
}

impl From<tokio_postgres::Error> for CopyError {
    fn from(e: tokio_postgres::Error) -> CopyError {
        CopyError::Db(e)
    }
}

/// The one arrow array of a rechunked column.
fn single<T: PolarsDataType>(ca: &ChunkedArray<T>) -> Result<&T::Array, String> {
    match ca.chunks().len() {
        1 => Ok(ca.downcast_as_array()),
        n => Err(format!("column `{}` has {n} chunks where one was prepared", ca.name())),
    }
}

/// COPYs `height` rows of `columns` into `into` (quoted) in binary format.
/// `loaded_at_us` is the bookkeeping load time in Postgres microseconds.
pub(super) async fn copy(
    client: &Client,
    into: &str,
    columns: &[CopyColumn],
    height: usize,
    loaded_at_us: i64,
) -> Result<u64, CopyError> {
    let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
    let fields: Vec<Binary<'_>> = columns
        .iter()
        .map(|c| Binary::of(&c.value, loaded_at_us))
        .collect::<Result<_, _>>()
        .map_err(CopyError::Value)?;
    let sql = format!("COPY {into} ({}) FROM STDIN (FORMAT binary)", names.join(", "));
    let sink = client.copy_in::<_, Bytes>(&sql).await?;
    let mut sink = std::pin::pin!(sink);
    let mut buf: Vec<u8> = Vec::with_capacity(COPY_CHUNK + (64 << 10));
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags
    buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    let count = (fields.len() as i16).to_be_bytes();
    for i in 0..height {
        buf.extend_from_slice(&count);
        for (field, column) in fields.iter().zip(columns) {
            field.write(&mut buf, i).map_err(|value| {
                CopyError::Value(format!("column `{}`: `{value}` is not a decimal number", column.name))
            })?;
        }
        if buf.len() >= COPY_CHUNK {
            let chunk = std::mem::replace(&mut buf, Vec::with_capacity(COPY_CHUNK + (64 << 10)));
            sink.send(Bytes::from(chunk)).await?;
        }
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    sink.send(Bytes::from(buf)).await?;
    Ok(sink.as_mut().finish().await?)
}

type StrArr = <StringType as PolarsDataType>::Array;
type I64Arr = <Int64Type as PolarsDataType>::Array;
type I32Arr = <Int32Type as PolarsDataType>::Array;
type F64Arr = <Float64Type as PolarsDataType>::Array;
type BoolArr = <BooleanType as PolarsDataType>::Array;

/// A column ready to be written in COPY's binary format: the page's arrow
/// array (one chunk) read by position, no dynamically typed value per cell.
enum Binary<'a> {
    Text(&'a StrArr),
    Jsonb(&'a StrArr),
    Numeric(&'a StrArr),
    Int8(&'a I64Arr),
    Float8(&'a F64Arr),
    Bool(&'a BoolArr),
    BoolOrFalse(&'a BoolArr),
    /// Milliseconds since the Unix epoch -> timestamptz.
    Timestamp(&'a I64Arr),
    /// Days since the Unix epoch -> date.
    Date(&'a I32Arr),
    /// Nanoseconds since midnight -> time.
    Time(&'a I64Arr),
    ConstInt8(i64),
}

impl<'a> Binary<'a> {
    /// The binary writer of a column; every value kind has one, since the
    /// column's type was checked against the schema ([`TypedColumn`]).
    fn of(value: &'a CopyValue, loaded_at_us: i64) -> Result<Binary<'a>, String> {
        Ok(match value {
            CopyValue::Mapped(column, ty) => match (TypedColumn::of(column, *ty)?, ty) {
                (TypedColumn::Text(c), ColumnType::Json) => Binary::Jsonb(single(c)?),
                (TypedColumn::Text(c), ColumnType::Decimal { .. }) => Binary::Numeric(single(c)?),
                (TypedColumn::Text(c), _) => Binary::Text(single(c)?),
                (TypedColumn::Integer(c), _) => Binary::Int8(single(c)?),
                (TypedColumn::Float(c), _) => Binary::Float8(single(c)?),
                (TypedColumn::Boolean(c), _) => Binary::Bool(single(c)?),
                (TypedColumn::Timestamp(c), _) => Binary::Timestamp(single(c)?),
                (TypedColumn::Date(c), _) => Binary::Date(single(c)?),
                (TypedColumn::Time(c), _) => Binary::Time(single(c)?),
            },
            CopyValue::Cursor(c) => Binary::Int8(single(c)?),
            CopyValue::Flag { flags, or_false: true } => Binary::BoolOrFalse(single(flags)?),
            CopyValue::Flag { flags, or_false: false } => Binary::Bool(single(flags)?),
            CopyValue::RunId(id) => Binary::ConstInt8(*id),
            CopyValue::LoadedAt => Binary::ConstInt8(loaded_at_us),
        })
    }

    fn write(&self, buf: &mut Vec<u8>, i: usize) -> Result<(), String> {
        fn null(buf: &mut Vec<u8>) {
            buf.extend_from_slice(&(-1i32).to_be_bytes());
        }
        fn int8(buf: &mut Vec<u8>, v: i64) {
            buf.extend_from_slice(&8i32.to_be_bytes());
            buf.extend_from_slice(&v.to_be_bytes());
        }
        fn bool1(buf: &mut Vec<u8>, v: bool) {
            buf.extend_from_slice(&1i32.to_be_bytes());
            buf.push(u8::from(v));
        }
        match self {
            Binary::Text(a) => match a.get(i) {
                Some(s) => {
                    buf.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    buf.extend_from_slice(s.as_bytes());
                }
                None => null(buf),
            },
            Binary::Jsonb(a) => match a.get(i) {
                Some(s) => {
                    buf.extend_from_slice(&(s.len() as i32 + 1).to_be_bytes());
                    buf.push(1); // jsonb binary format version
                    buf.extend_from_slice(s.as_bytes());
                }
                None => null(buf),
            },
            Binary::Numeric(a) => match a.get(i) {
                Some(s) => write_numeric(buf, s).ok_or_else(|| s.to_string())?,
                None => null(buf),
            },
            Binary::Int8(a) => match a.get(i) {
                Some(v) => int8(buf, v),
                None => null(buf),
            },
            Binary::Float8(a) => match a.get(i) {
                Some(v) => {
                    buf.extend_from_slice(&8i32.to_be_bytes());
                    buf.extend_from_slice(&v.to_bits().to_be_bytes());
                }
                None => null(buf),
            },
            Binary::Bool(a) => match a.get(i) {
                Some(v) => bool1(buf, v),
                None => null(buf),
            },
            Binary::BoolOrFalse(a) => bool1(buf, a.get(i).unwrap_or(false)),
            Binary::Timestamp(a) => match a.get(i) {
                Some(ms) => int8(buf, ms.saturating_mul(1000) - PG_EPOCH_US),
                None => null(buf),
            },
            Binary::Date(a) => match a.get(i) {
                Some(days) => {
                    buf.extend_from_slice(&4i32.to_be_bytes());
                    buf.extend_from_slice(&(days - PG_EPOCH_DAYS).to_be_bytes());
                }
                None => null(buf),
            },
            Binary::Time(a) => match a.get(i) {
                Some(ns) => int8(buf, ns / 1000),
                None => null(buf),
            },
            Binary::ConstInt8(v) => int8(buf, *v),
        }
        Ok(())
    }
}

/// Writes plain decimal text (`-123.45`, `0.5`, `7`) as a binary `numeric`:
/// base-10000 digits with a weight, a sign and the display scale. `None`
/// for anything else (exponents, NaN, stray characters).
fn write_numeric(buf: &mut Vec<u8>, text: &str) -> Option<()> {
    let bytes = text.as_bytes();
    let (negative, rest) = match bytes.first() {
        Some(b'-') => (true, &bytes[1..]),
        Some(b'+') => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    let (int, frac) = match rest.iter().position(|&b| b == b'.') {
        Some(p) => (&rest[..p], &rest[p + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    if (int.is_empty() && frac.is_empty())
        || !int.iter().chain(frac).all(u8::is_ascii_digit)
        || int.len() + frac.len() > 1000
    {
        return None;
    }
    let int = &int[int.iter().position(|&b| b != b'0').unwrap_or(int.len())..];
    let dscale = frac.len() as i16;
    let int_groups = int.len().div_ceil(4);
    // At most 1000 digits: 252 groups of four, on the stack.
    let mut digits = [0i16; 256];
    let mut n = 0;
    // Integer digits, grouped from the decimal point leftwards.
    let lead = int.len() - int_groups.saturating_sub(1) * 4;
    let mut at = 0;
    for g in 0..int_groups {
        let len = if g == 0 { lead } else { 4 };
        digits[n] = int[at..at + len].iter().fold(0i16, |acc, &b| acc * 10 + i16::from(b - b'0'));
        n += 1;
        at += len;
    }
    // Fraction digits, grouped rightwards and padded with zeros.
    for chunk in frac.chunks(4) {
        let mut d = chunk.iter().fold(0i16, |acc, &b| acc * 10 + i16::from(b - b'0'));
        for _ in chunk.len()..4 {
            d *= 10;
        }
        digits[n] = d;
        n += 1;
    }
    let leading = digits[..n].iter().take_while(|&&d| d == 0).count();
    let trailing = digits[leading..n].iter().rev().take_while(|&&d| d == 0).count();
    let digits = &digits[leading..n - trailing];
    let weight = int_groups as i16 - 1 - leading as i16;
    let (sign, weight) = match (digits.is_empty(), negative) {
        (true, _) => (0u16, 0i16),
        (false, true) => (0x4000, weight),
        (false, false) => (0, weight),
    };
    buf.extend_from_slice(&(8 + 2 * digits.len() as i32).to_be_bytes());
    buf.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    buf.extend_from_slice(&weight.to_be_bytes());
    buf.extend_from_slice(&sign.to_be_bytes());
    buf.extend_from_slice(&dscale.to_be_bytes());
    for d in digits {
        buf.extend_from_slice(&d.to_be_bytes());
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (ndigits, weight, sign, dscale, digits) of a binary numeric.
    fn numeric(text: &str) -> Option<(i16, i16, u16, i16, Vec<i16>)> {
        let mut buf = Vec::new();
        write_numeric(&mut buf, text)?;
        let word = |i: usize| i16::from_be_bytes([buf[4 + 2 * i], buf[5 + 2 * i]]);
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert_eq!(len, buf.len() - 4);
        let n = word(0);
        Some((n, word(1), word(2) as u16, word(3), (0..n as usize).map(|i| word(4 + i)).collect()))
    }

    #[test]
    fn decimals_become_base_10000_numerics() {
        assert_eq!(numeric("1234.50"), Some((2, 0, 0, 2, vec![1234, 5000])));
        assert_eq!(numeric("0.05"), Some((1, -1, 0, 2, vec![500])));
        assert_eq!(numeric("-100000"), Some((1, 1, 0x4000, 0, vec![10])));
        assert_eq!(numeric("12345678.9"), Some((3, 1, 0, 1, vec![1234, 5678, 9000])));
        assert_eq!(numeric("0.00001234"), Some((1, -2, 0, 8, vec![1234])));
        assert_eq!(numeric("0"), Some((0, 0, 0, 0, vec![])));
        assert_eq!(numeric("-0.00"), Some((0, 0, 0, 2, vec![])));
        assert_eq!(numeric("7"), Some((1, 0, 0, 0, vec![7])));
        for bad in ["", "-", "1e5", "NaN", "1.2.3", " 1", "."] {
            assert_eq!(numeric(bad), None, "{bad}");
        }
    }
}
