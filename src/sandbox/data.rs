//! The emulator's data model: typed values, object schemas, record ids, and
//! the text each value takes in a Bulk API result CSV.
//!
//! Values are stored typed (not as the CSV text) so that SOQL filters compare
//! datetimes as instants and numbers numerically, the way Salesforce does.

use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};

/// The Salesforce field types the sandbox models (describe's `type` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldType {
    Id,
    String,
    TextArea,
    Picklist,
    // Not used by the generated Account; kept so seeded objects can use them.
    #[allow(dead_code)]
    Email,
    Phone,
    Url,
    Boolean,
    Int,
    #[allow(dead_code)]
    Double,
    Currency,
    Percent,
    Date,
    DateTime,
    Reference,
}

/// How a field's values compare in SOQL; several Salesforce types share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Compared case-insensitively, like SOQL does for text.
    Text,
    /// Record ids compare exactly (15-char ids are case-sensitive).
    Id,
    Bool,
    Number,
    Date,
    DateTime,
}

impl FieldType {
    pub(crate) fn api_name(self) -> &'static str {
        match self {
            FieldType::Id => "id",
            FieldType::String => "string",
            FieldType::TextArea => "textarea",
            FieldType::Picklist => "picklist",
            FieldType::Email => "email",
            FieldType::Phone => "phone",
            FieldType::Url => "url",
            FieldType::Boolean => "boolean",
            FieldType::Int => "int",
            FieldType::Double => "double",
            FieldType::Currency => "currency",
            FieldType::Percent => "percent",
            FieldType::Date => "date",
            FieldType::DateTime => "datetime",
            FieldType::Reference => "reference",
        }
    }

    pub(crate) fn soap_type(self) -> &'static str {
        match self.kind() {
            Kind::Id => "tns:ID",
            Kind::Text => "xsd:string",
            Kind::Bool => "xsd:boolean",
            Kind::Number if self == FieldType::Int => "xsd:int",
            Kind::Number => "xsd:double",
            Kind::Date => "xsd:date",
            Kind::DateTime => "xsd:dateTime",
        }
    }

    /// Describe's `length` (characters) for text types, 0 otherwise.
    pub(crate) fn length(self) -> u32 {
        match self {
            FieldType::Id | FieldType::Reference => 18,
            FieldType::TextArea => 32_000,
            FieldType::Email => 80,
            FieldType::Phone => 40,
            FieldType::String | FieldType::Picklist | FieldType::Url => 255,
            _ => 0,
        }
    }

    /// Describe's (precision, scale) for numeric types.
    pub(crate) fn precision_scale(self) -> (u32, u32) {
        match self {
            FieldType::Currency => (18, 2),
            FieldType::Percent => (5, 2),
            FieldType::Double => (18, 0),
            _ => (0, 0),
        }
    }

    pub(crate) fn kind(self) -> Kind {
        match self {
            FieldType::Id | FieldType::Reference => Kind::Id,
            FieldType::String
            | FieldType::TextArea
            | FieldType::Picklist
            | FieldType::Email
            | FieldType::Phone
            | FieldType::Url => Kind::Text,
            FieldType::Boolean => Kind::Bool,
            FieldType::Int | FieldType::Double | FieldType::Currency | FieldType::Percent => Kind::Number,
            FieldType::Date => Kind::Date,
            FieldType::DateTime => Kind::DateTime,
        }
    }

    /// The type name Salesforce uses in "must be of type ..." filter errors.
    pub(crate) fn soql_type_name(self) -> &'static str {
        match self {
            FieldType::Id | FieldType::Reference => "id",
            FieldType::Boolean => "boolean",
            FieldType::Int => "integer",
            FieldType::Double | FieldType::Currency | FieldType::Percent => "double",
            FieldType::Date => "date",
            FieldType::DateTime => "dateTime",
            _ => "string",
        }
    }
}

/// One stored value; a null is `None` in the row, never a variant here.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Text(Box<str>),
    Bool(bool),
    Int(i64),
    Double(f64),
    /// Exact fixed-point number (`units / 10^scale`), so currency keeps its
    /// two decimals in the CSV instead of float noise.
    Decimal {
        units: i64,
        scale: u8,
    },
    Date(NaiveDate),
    DateTime(DateTime<Utc>),
}

impl Value {
    pub(crate) fn text(s: impl Into<Box<str>>) -> Value {
        Value::Text(s.into())
    }

    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Double(d) => Some(*d),
            Value::Decimal { units, scale } => Some(*units as f64 / 10f64.powi(i32::from(*scale))),
            _ => None,
        }
    }

    /// Appends the value as it appears between the quotes of a result CSV.
    pub(crate) fn render_into(&self, out: &mut String) {
        // `write!` into a String cannot fail; the results are ignored for that reason.
        match self {
            Value::Text(s) => out.push_str(s),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::Double(d) => {
                // Rust's Display for f64 never uses exponent notation, which
                // keeps the output "plain decimal text".
                let _ = write!(out, "{d}");
            }
            Value::Decimal { units, scale } => render_decimal(*units, *scale, out),
            Value::Date(d) => {
                let _ = write!(out, "{:04}-{:02}-{:02}", d.year(), d.month(), d.day());
            }
            Value::DateTime(t) => {
                let _ = write!(
                    out,
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                    t.year(),
                    t.month(),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second(),
                    t.timestamp_subsec_millis().min(999)
                );
            }
        }
    }

    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        self.render_into(&mut s);
        s
    }
}

fn render_decimal(units: i64, scale: u8, out: &mut String) {
    if scale == 0 {
        let _ = write!(out, "{units}");
        return;
    }
    let divisor = 10u128.pow(u32::from(scale));
    let magnitude = u128::from(units.unsigned_abs());
    if units < 0 {
        out.push('-');
    }
    let _ = write!(out, "{}.{:0width$}", magnitude / divisor, magnitude % divisor, width = usize::from(scale));
}

/// A record: one optional value per schema field, in schema order. Shared
/// behind an `Arc` so a query job's snapshot keeps the rows it matched while
/// later updates replace them in the table.
pub(crate) type Row = Arc<[Option<Value>]>;

#[derive(Debug, Clone)]
pub(crate) struct Field {
    pub name: &'static str,
    pub label: &'static str,
    pub ftype: FieldType,
    pub nillable: bool,
    /// Allowed values, for picklist fields.
    pub picklist: &'static [&'static str],
}

#[derive(Debug, Clone)]
pub(crate) struct Schema {
    pub name: &'static str,
    pub key_prefix: &'static str,
    pub fields: Vec<Field>,
}

impl Schema {
    /// Field lookup is case-insensitive, as in SOQL.
    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name.eq_ignore_ascii_case(name))
    }
}

/// Ids look like real ones: key prefix, a fixed pod part, a base-62 serial,
/// and the 3-character case-safe suffix Salesforce computes, so clients that
/// validate 18-char ids accept them.
const ID_POD: &str = "Dx000";
const ID_SERIAL_LEN: usize = 7;
/// Digits in ASCII order so that fixed-width serials sort like numbers.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub(crate) fn make_id(prefix: &str, serial: u64) -> String {
    let mut digits = [b'0'; ID_SERIAL_LEN];
    let mut n = serial;
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    let mut id = String::with_capacity(18);
    id.push_str(prefix);
    id.push_str(ID_POD);
    id.extend(digits.iter().map(|&b| char::from(b)));
    let suffix = case_safe_suffix(&id);
    id.push_str(&suffix);
    id
}

/// Inverse of [`make_id`]; accepts the 15- or 18-character form.
pub(crate) fn id_serial(prefix: &str, id: &str) -> Option<u64> {
    if !(id.len() == 15 || id.len() == 18) || !id.is_ascii() {
        return None;
    }
    let head = id.get(..15)?;
    let rest = head.strip_prefix(prefix)?.strip_prefix(ID_POD)?;
    if id.len() == 18 && id.get(15..)? != case_safe_suffix(head) {
        return None;
    }
    let mut n: u64 = 0;
    for b in rest.bytes() {
        let d = BASE62.iter().position(|&c| c == b)? as u64;
        n = n.checked_mul(62)?.checked_add(d)?;
    }
    Some(n)
}

/// Salesforce's 15→18 character id suffix: one character per 5-character
/// chunk, encoding which positions hold upper-case letters.
pub(crate) fn case_safe_suffix(id15: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    id15.as_bytes()
        .chunks(5)
        .take(3)
        .map(|chunk| {
            let bits = chunk
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_ascii_uppercase())
                .fold(0usize, |acc, (i, _)| acc | (1 << i));
            char::from(ALPHABET[bits])
        })
        .collect()
}

/// `yyyy-MM-ddTHH:mm:ss.SSS+0000`, the form job-info JSON uses.
pub(crate) fn json_timestamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string()
}

/// RFC 7231 IMF-fixdate, for the HTTP `Date` header.
pub(crate) fn http_date(t: DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn ids_round_trip_and_have_the_case_safe_suffix() {
        let id = make_id("001", 12345);
        assert_eq!(id.len(), 18);
        assert!(id.starts_with("001Dx000"));
        assert_eq!(id_serial("001", &id), Some(12345));
        assert_eq!(id_serial("001", &id[..15]), Some(12345));
        assert_eq!(id_serial("005", &id), None);
        // Known value from Salesforce documentation examples.
        assert_eq!(case_safe_suffix("001A0000006Vm9r"), "IAC");
    }

    #[test]
    fn values_render_like_bulk_csv() {
        let t = Utc.with_ymd_and_hms(2024, 1, 31, 12, 0, 0).unwrap();
        assert_eq!(Value::DateTime(t).render(), "2024-01-31T12:00:00.000Z");
        assert_eq!(Value::Date(t.date_naive()).render(), "2024-01-31");
        assert_eq!(Value::Bool(true).render(), "true");
        assert_eq!(Value::Decimal { units: 123450, scale: 2 }.render(), "1234.50");
        assert_eq!(Value::Decimal { units: -5, scale: 2 }.render(), "-0.05");
        assert_eq!(Value::Double(37.25).render(), "37.25");
        assert_eq!(Value::Int(300).render(), "300");
        assert_eq!(json_timestamp(t), "2024-01-31T12:00:00.000+0000");
        assert_eq!(http_date(t), "Wed, 31 Jan 2024 12:00:00 GMT");
    }
}
