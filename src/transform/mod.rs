//! Mapping: turns a page of Salesforce text columns into the typed target
//! schema, rejecting (never nulling) values that do not cast.
//!
//! Casts are done value by value, strictly: a reject must name the column,
//! the value and the reason, which a bulk cast that turns failures into nulls
//! cannot tell us.

mod cast;

use std::collections::BTreeMap;

use polars::prelude::*;
use thiserror::Error;

use crate::config::{JobFile, MappingFile};
pub use cast::{
    format_date, format_time, format_timestamp_ms, parse_boolean, parse_date, parse_float, parse_integer, parse_time,
    parse_timestamp_ms,
};

/// Column carrying each row's cursor value (epoch milliseconds), used to
/// resolve duplicate keys within one extract and dropped before the target.
pub const CURSOR_COLUMN: &str = "_nightjar_cursor";

/// Column carrying Salesforce's `IsDeleted` flag (when the job extracts it),
/// which the target turns into a soft delete, a hard delete, or nothing.
pub const DELETED_COLUMN: &str = "_nightjar_deleted";

#[derive(Debug, Error)]
pub enum TransformError {
    #[error(
        "the extracted page has no column `{0}`; the job's `fields` and the mapping disagree with what Salesforce returned — run `nightjar validate`"
    )]
    MissingColumn(String),
    #[error("mapping: {0}")]
    Invalid(String),
    #[error("building the mapped page failed: {0}")]
    Polars(#[from] PolarsError),
}

/// The types a mapped column can have; each target maps them to its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Text,
    Integer,
    Float,
    Boolean,
    /// UTC instant, millisecond precision (Salesforce's precision).
    Timestamp,
    /// Calendar date without a zone.
    Date,
    /// Time of day without a zone.
    Time,
    /// Exact number with `precision` digits, `scale` of them after the point.
    /// Carried in the frame as canonical text (Polars' decimal type is not
    /// built in yet); targets store it as a native exact type.
    Decimal {
        precision: u8,
        scale: u8,
    },
    /// A JSON document, validated, kept as sent.
    Json,
}

impl ColumnType {
    pub const SUPPORTED: &'static str = "text, integer, float, decimal(p,s), boolean, date, time, timestamp, json";

    pub fn parse(name: &str) -> Result<Self, String> {
        let name = name.trim();
        if let Some(args) = name.strip_prefix("decimal(").and_then(|r| r.strip_suffix(')')) {
            let parsed = args
                .split_once(',')
                .and_then(|(p, s)| Some((p.trim().parse::<u8>().ok()?, s.trim().parse::<u8>().ok()?)));
            return match parsed {
                Some((precision, scale)) if (1..=38).contains(&precision) && scale <= precision => {
                    Ok(Self::Decimal { precision, scale })
                }
                _ => Err(format!(
                    "`{name}`: decimal needs a precision from 1 to 38 and a scale no larger, e.g. decimal(18,2)"
                )),
            };
        }
        match name {
            "text" => Ok(Self::Text),
            "integer" => Ok(Self::Integer),
            "float" => Ok(Self::Float),
            "boolean" => Ok(Self::Boolean),
            "timestamp" => Ok(Self::Timestamp),
            "date" => Ok(Self::Date),
            "time" => Ok(Self::Time),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown type `{other}`; supported: {}", Self::SUPPORTED)),
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
            other => other.base_name().to_string(),
        }
    }

    fn base_name(self) -> &'static str {
        match self {
            Self::Date => "date",
            Self::Time => "time",
            Self::Decimal { .. } => "decimal",
            Self::Json => "json",
            Self::Text => "text",
            Self::Integer => "integer",
            Self::Float => "float",
            Self::Boolean => "boolean",
            Self::Timestamp => "timestamp",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TargetColumn {
    pub name: String,
    pub ty: ColumnType,
    pub nullable: bool,
}

/// What the mapping produces, and what every target creates its table from.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSchema {
    pub columns: Vec<TargetColumn>,
    pub key: Vec<String>,
}

#[derive(Debug, Clone)]
struct ColumnRule {
    name: String,
    from: String,
    ty: ColumnType,
    required: bool,
    trim: bool,
    values: Option<BTreeMap<String, String>>,
    default: Option<String>,
}

/// One rejected row: which record, which column, what value, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub record_id: Option<String>,
    pub column: String,
    pub value: Option<String>,
    pub reason: String,
}

/// A page after mapping: typed rows that passed, and the ones that did not.
#[derive(Debug)]
pub struct MappedPage {
    /// Target columns in schema order, plus [`CURSOR_COLUMN`] when the job has
    /// a cursor and [`DELETED_COLUMN`] when it extracts `IsDeleted`.
    pub frame: DataFrame,
    pub rejects: Vec<Reject>,
    pub rows_in: usize,
}

/// A compiled mapping for one job.
#[derive(Debug, Clone)]
pub struct Mapping {
    rules: Vec<ColumnRule>,
    cursor: Option<String>,
    id_field: Option<String>,
    deleted_field: Option<String>,
    key: Vec<String>,
}

impl Mapping {
    /// Compiles a validated job + mapping. `nightjar validate` reports the
    /// same problems with file positions; this only guards against misuse.
    pub fn new(job: &JobFile, file: &MappingFile) -> Result<Self, TransformError> {
        let mut rules = Vec::with_capacity(file.columns.len());
        for col in &file.columns {
            let name = col.name.get_ref().clone();
            if col.sql.is_some() {
                return Err(TransformError::Invalid(format!("column `{name}`: `sql` columns are not supported yet")));
            }
            let from = col
                .from
                .as_ref()
                .map(|f| f.get_ref().clone())
                .ok_or_else(|| TransformError::Invalid(format!("column `{name}` has no `from`")))?;
            let ty = match &col.type_name {
                Some(t) => ColumnType::parse(t.get_ref()).map_err(TransformError::Invalid)?,
                None => ColumnType::Text,
            };
            rules.push(ColumnRule {
                name,
                from,
                ty,
                required: col.required,
                trim: col.trim,
                values: col.values.clone(),
                default: col.default.clone(),
            });
        }
        let fields: Vec<&str> = job.source.fields.get_ref().iter().map(|f| f.get_ref().as_str()).collect();
        let id_field = fields.iter().find(|f| f.eq_ignore_ascii_case("Id")).map(|f| f.to_string());
        let deleted_field = fields.iter().find(|f| f.eq_ignore_ascii_case("IsDeleted")).map(|f| f.to_string());
        Ok(Mapping {
            rules,
            cursor: job.source.cursor.as_ref().map(|c| c.get_ref().clone()),
            id_field,
            deleted_field,
            key: job.target.key.get_ref().clone(),
        })
    }

    pub fn schema(&self) -> TargetSchema {
        TargetSchema {
            columns: self
                .rules
                .iter()
                .map(|r| TargetColumn { name: r.name.clone(), ty: r.ty, nullable: !r.required })
                .collect(),
            key: self.key.clone(),
        }
    }

    pub fn has_cursor(&self) -> bool {
        self.cursor.is_some()
    }

    /// Maps one page of text columns (as extracted) into the target schema.
    pub fn apply(&self, page: &DataFrame) -> Result<MappedPage, TransformError> {
        let height = page.height();
        let text_column = |name: &str| -> Result<&StringChunked, TransformError> {
            let col = page.column(name).map_err(|_| TransformError::MissingColumn(name.to_string()))?;
            Ok(col.str()?)
        };
        let ids = self.id_field.as_deref().map(text_column).transpose()?;
        let record_id = |row: usize| ids.and_then(|ids| ids.get(row)).filter(|id| !id.is_empty()).map(str::to_string);

        let mut keep = vec![true; height];
        let mut rejects: Vec<(usize, Reject)> = Vec::new();
        let mut reject = |row: usize, keep: &mut Vec<bool>, column: &str, value: Option<&str>, reason: String| {
            if keep[row] {
                keep[row] = false;
                rejects.push((
                    row,
                    Reject {
                        record_id: record_id(row),
                        column: column.to_string(),
                        value: value.map(str::to_string),
                        reason,
                    },
                ));
            }
        };

        let mut columns: Vec<Column> = Vec::with_capacity(self.rules.len() + 1);
        for rule in &self.rules {
            let source = text_column(&rule.from)?;
            let mut builder = TypedBuilder::new(rule.ty, height);
            for (row, raw) in source.iter().enumerate() {
                let value = rule.prepare(raw);
                match value.as_deref() {
                    None if rule.required => {
                        reject(row, &mut keep, &rule.name, None, format!("required column `{}` is null", rule.name));
                        builder.push_null();
                    }
                    None => builder.push_null(),
                    Some(text) => {
                        if let Err(reason) = builder.push(text) {
                            reject(row, &mut keep, &rule.name, Some(text), reason);
                            builder.push_null();
                        }
                    }
                }
            }
            columns.push(builder.finish(&rule.name));
        }

        // Control columns the pipeline itself relies on: a value that does not
        // parse rejects the row (Salesforce always fills both fields, so
        // anything else is not trustworthy enough to window or delete on).
        let controls = [
            self.cursor
                .as_ref()
                .map(|c| (c, format!("cursor `{c}`"), ColumnType::Timestamp, CURSOR_COLUMN, "a datetime")),
            self.deleted_field
                .as_ref()
                .map(|d| (d, format!("`{d}`"), ColumnType::Boolean, DELETED_COLUMN, "true or false")),
        ];
        for (field, label, ty, output, expected) in controls.into_iter().flatten() {
            let source = text_column(field)?;
            let mut builder = TypedBuilder::new(ty, height);
            for (row, raw) in source.iter().enumerate() {
                match raw {
                    Some(text) if builder.push(text).is_ok() => {}
                    other => {
                        let reason = format!("{label} must be {expected}, got {}", describe(other));
                        reject(row, &mut keep, field, other, reason);
                        builder.push_null();
                    }
                }
            }
            columns.push(builder.finish(output));
        }

        // Columns are checked one after another; report rejects in row order.
        rejects.sort_by_key(|(row, _)| *row);
        let rejects: Vec<Reject> = rejects.into_iter().map(|(_, r)| r).collect();
        let frame = DataFrame::new(height, columns)?;
        let frame = if rejects.is_empty() {
            frame
        } else {
            frame.filter(&BooleanChunked::from_slice(PlSmallStr::from_static("keep"), &keep))?
        };
        Ok(MappedPage { frame, rejects, rows_in: height })
    }
}

fn describe(value: Option<&str>) -> String {
    match value {
        None => "null".into(),
        Some(v) => format!("`{v}`"),
    }
}

impl ColumnRule {
    /// trim, then the value map, then the default for nulls. Salesforce sends
    /// null as an empty field, so empty text is null.
    fn prepare(&self, raw: Option<&str>) -> Option<String> {
        let mut value = raw.map(|v| if self.trim { v.trim() } else { v });
        if value == Some("") {
            value = None;
        }
        let mut value = value.map(|v| match self.values.as_ref().and_then(|m| m.get(v)) {
            Some(mapped) => mapped.clone(),
            None => v.to_string(),
        });
        if value.is_none() {
            value = self.default.clone();
        }
        value
    }
}

/// Accumulates one typed column, value by value.
enum TypedBuilder {
    Text(Vec<Option<String>>),
    Integer(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Boolean(Vec<Option<bool>>),
    Timestamp(Vec<Option<i64>>),
    Date(Vec<Option<i32>>),
    Time(Vec<Option<i64>>),
    /// Decimal and JSON: validated, carried as text.
    Checked(Vec<Option<String>>, ColumnType),
}

impl TypedBuilder {
    fn new(ty: ColumnType, capacity: usize) -> Self {
        match ty {
            ColumnType::Text => Self::Text(Vec::with_capacity(capacity)),
            ColumnType::Integer => Self::Integer(Vec::with_capacity(capacity)),
            ColumnType::Float => Self::Float(Vec::with_capacity(capacity)),
            ColumnType::Boolean => Self::Boolean(Vec::with_capacity(capacity)),
            ColumnType::Timestamp => Self::Timestamp(Vec::with_capacity(capacity)),
            ColumnType::Date => Self::Date(Vec::with_capacity(capacity)),
            ColumnType::Time => Self::Time(Vec::with_capacity(capacity)),
            ty @ (ColumnType::Decimal { .. } | ColumnType::Json) => Self::Checked(Vec::with_capacity(capacity), ty),
        }
    }

    fn push(&mut self, text: &str) -> Result<(), String> {
        match self {
            Self::Text(v) => v.push(Some(text.to_string())),
            Self::Integer(v) => v.push(Some(cast::parse_integer(text)?)),
            Self::Float(v) => v.push(Some(cast::parse_float(text)?)),
            Self::Boolean(v) => v.push(Some(cast::parse_boolean(text)?)),
            Self::Timestamp(v) => v.push(Some(cast::parse_timestamp_ms(text)?)),
            Self::Date(v) => v.push(Some(cast::parse_date(text)?)),
            Self::Time(v) => v.push(Some(cast::parse_time(text)?)),
            Self::Checked(v, ColumnType::Decimal { precision, scale }) => {
                v.push(Some(cast::parse_decimal(text, *precision, *scale)?))
            }
            Self::Checked(v, _) => v.push(Some(cast::parse_json(text)?)),
        }
        Ok(())
    }

    fn push_null(&mut self) {
        match self {
            Self::Text(v) => v.push(None),
            Self::Integer(v) | Self::Timestamp(v) | Self::Time(v) => v.push(None),
            Self::Date(v) => v.push(None),
            Self::Checked(v, _) => v.push(None),
            Self::Float(v) => v.push(None),
            Self::Boolean(v) => v.push(None),
        }
    }

    fn finish(self, name: &str) -> Column {
        let name = PlSmallStr::from_str(name);
        let series = match self {
            Self::Text(v) => Series::new(name, v),
            Self::Integer(v) => Series::new(name, v),
            Self::Float(v) => Series::new(name, v),
            Self::Boolean(v) => Series::new(name, v),
            Self::Timestamp(v) => Series::new(name, v).into_datetime(TimeUnit::Milliseconds, None),
            Self::Date(v) => Series::new(name, v).into_date(),
            Self::Time(v) => Series::new(name, v).into_time(),
            Self::Checked(v, _) => Series::new(name, v),
        };
        series.into_column()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_job_and_mapping_for_tests as parse;

    fn page(cols: &[(&str, &[Option<&str>])]) -> DataFrame {
        let height = cols[0].1.len();
        let columns = cols
            .iter()
            .map(|(name, values)| Series::new(PlSmallStr::from_str(name), values.to_vec()).into_column())
            .collect();
        DataFrame::new(height, columns).unwrap()
    }

    const JOB: &str = r#"
[source]
connection = "sf"
object = "Account"
fields = ["Id", "Name", "Employees", "Revenue", "Active", "SystemModstamp"]
cursor = "SystemModstamp"
[transform]
mapping = "m"
[target]
connection = "wh"
table = "account"
key = ["sf_id"]
"#;

    const MAPPING: &str = r#"
[[column]]
name = "sf_id"
from = "Id"
required = true
[[column]]
name = "name"
from = "Name"
trim = true
values = { "ACME" = "Acme Corp" }
default = "(none)"
[[column]]
name = "employees"
from = "Employees"
type = "integer"
[[column]]
name = "revenue"
from = "Revenue"
type = "float"
[[column]]
name = "active"
from = "Active"
type = "boolean"
[[column]]
name = "modified_at"
from = "SystemModstamp"
type = "timestamp"
"#;

    #[test]
    fn casts_and_rejects_with_reasons() {
        let (job, mapping) = parse(JOB, MAPPING);
        let m = Mapping::new(&job, &mapping).unwrap();
        let df = page(&[
            ("Id", &[Some("001A"), Some("001B"), Some(""), Some("001D")]),
            ("Name", &[Some("  ACME "), Some(""), Some("x"), Some("y")]),
            ("Employees", &[Some("12"), Some("12.5"), Some("1"), Some("")]),
            ("Revenue", &[Some("1.5E3"), Some("2"), Some("3"), Some("4.25")]),
            ("Active", &[Some("true"), Some("false"), Some("true"), Some("false")]),
            (
                "SystemModstamp",
                &[
                    Some("2024-01-31T12:00:00.000Z"),
                    Some("2024-01-31T12:00:00.000+0000"),
                    Some("2024-01-31T12:00:00+00:00"),
                    Some("2024-01-31T13:00:00.001Z"),
                ],
            ),
        ]);
        let out = m.apply(&df).unwrap();
        assert_eq!(out.rows_in, 4);
        assert_eq!(out.frame.height(), 2, "rows B (bad integer) and C (null key) are rejected");
        assert_eq!(out.rejects.len(), 2);
        assert_eq!(out.rejects[0].record_id.as_deref(), Some("001B"));
        assert_eq!(out.rejects[0].column, "employees");
        assert_eq!(out.rejects[0].value.as_deref(), Some("12.5"));
        assert!(out.rejects[0].reason.contains("integer"), "{}", out.rejects[0].reason);
        assert_eq!(out.rejects[1].column, "sf_id");
        assert_eq!(out.rejects[1].record_id, None, "an empty Id is no id");
        assert!(out.rejects[1].reason.contains("required"));

        let names: Vec<Option<&str>> = out.frame.column("name").unwrap().str().unwrap().iter().collect();
        assert_eq!(names, vec![Some("Acme Corp"), Some("y")]);
        let emp: Vec<Option<i64>> = out.frame.column("employees").unwrap().i64().unwrap().iter().collect();
        assert_eq!(emp, vec![Some(12), None]);
        let rev: Vec<Option<f64>> = out.frame.column("revenue").unwrap().f64().unwrap().iter().collect();
        assert_eq!(rev, vec![Some(1500.0), Some(4.25)]);
        let cursor = out.frame.column(CURSOR_COLUMN).unwrap().datetime().unwrap();
        let cursor: Vec<Option<i64>> = cursor.physical().iter().collect();
        assert_eq!(cursor, vec![Some(1_706_702_400_000), Some(1_706_706_000_001)]);
    }

    #[test]
    fn dates_times_decimals_and_json() {
        let job = JOB.replace(
            r#"fields = ["Id", "Name", "Employees", "Revenue", "Active", "SystemModstamp"]"#,
            r#"fields = ["Id", "Day", "At", "Amount", "Doc", "SystemModstamp"]"#,
        );
        let mapping = r#"
[[column]]
name = "sf_id"
from = "Id"
required = true
[[column]]
name = "day"
from = "Day"
type = "date"
[[column]]
name = "at"
from = "At"
type = "time"
[[column]]
name = "amount"
from = "Amount"
type = "decimal(8,2)"
[[column]]
name = "doc"
from = "Doc"
type = "json"
"#;
        let (job, mapping) = parse(&job, mapping);
        let m = Mapping::new(&job, &mapping).unwrap();
        let stamp = Some("2024-01-31T12:00:00.000Z");
        let df = page(&[
            ("Id", &[Some("001A"), Some("001B"), Some("001C")]),
            ("Day", &[Some("2024-01-31"), None, Some("2024-01-31")]),
            ("At", &[Some("12:30:00.000Z"), None, None]),
            ("Amount", &[Some("1234.5"), Some("12.345"), Some("-3")]),
            ("Doc", &[Some(r#"{"a":1}"#), None, Some("{nope")]),
            ("SystemModstamp", &[stamp, stamp, stamp]),
        ]);
        let out = m.apply(&df).unwrap();
        assert_eq!(out.frame.height(), 1);
        let reasons: Vec<(&str, &str)> = out.rejects.iter().map(|r| (r.column.as_str(), r.reason.as_str())).collect();
        assert_eq!(reasons.len(), 2);
        assert_eq!(reasons[0].0, "amount");
        assert!(reasons[0].1.contains("more than 2 decimal places"), "{}", reasons[0].1);
        assert_eq!(reasons[1].0, "doc");
        assert_eq!(out.frame.column("day").unwrap().dtype(), &DataType::Date);
        assert_eq!(out.frame.column("at").unwrap().dtype(), &DataType::Time);
        let amount: Vec<Option<&str>> = out.frame.column("amount").unwrap().str().unwrap().iter().collect();
        assert_eq!(amount, vec![Some("1234.50")]);
        let schema = m.schema();
        assert_eq!(schema.columns[3].ty, ColumnType::Decimal { precision: 8, scale: 2 });
        assert_eq!(schema.columns[3].ty.name(), "decimal(8,2)");
        assert!(ColumnType::parse("decimal(2,3)").is_err());
        assert!(ColumnType::parse("decimal(40,2)").is_err());
    }

    #[test]
    fn schema_follows_mapping() {
        let (job, mapping) = parse(JOB, MAPPING);
        let schema = Mapping::new(&job, &mapping).unwrap().schema();
        assert_eq!(schema.key, vec!["sf_id".to_string()]);
        assert_eq!(schema.columns[0], TargetColumn { name: "sf_id".into(), ty: ColumnType::Text, nullable: false });
        assert_eq!(schema.columns[5].ty, ColumnType::Timestamp);
    }

    #[test]
    fn missing_source_column_is_an_error_not_a_panic() {
        let (job, mapping) = parse(JOB, MAPPING);
        let m = Mapping::new(&job, &mapping).unwrap();
        let df = page(&[("Id", &[Some("001A")])]);
        assert!(matches!(m.apply(&df), Err(TransformError::MissingColumn(c)) if c == "Name"));
    }
}
