//! Mapping: turns a page of Salesforce text columns into the typed target
//! schema, rejecting (never nulling) values that do not cast.
//!
//! Casts are done value by value, strictly: a reject must name the column,
//! the value and the reason, which a bulk cast that turns failures into nulls
//! cannot tell us.

mod cast;
#[cfg(test)]
mod proptests;
mod sql;

use std::collections::BTreeMap;

use polars::prelude::*;
use rayon::prelude::*;
use thiserror::Error;

use crate::config::{JobFile, MappingFile};
pub use cast::{
    format_date, format_time, format_timestamp_ms, parse_boolean, parse_date, parse_float, parse_integer, parse_time,
    parse_timestamp_ms,
};
pub use sql::SqlExpr;

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

/// Where a target column's value comes from.
#[derive(Debug, Clone)]
enum ColumnSource {
    /// An extracted field, as text.
    Field(String),
    /// A SQL expression over extracted fields, evaluated by Polars.
    Sql(SqlExpr),
}

#[derive(Debug, Clone)]
struct ColumnRule {
    name: String,
    source: ColumnSource,
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
    /// Rows the mapping's `filter` dropped (not rejects: they were not wanted).
    pub rows_filtered: usize,
}

/// A compiled mapping for one job.
#[derive(Debug, Clone)]
pub struct Mapping {
    rules: Vec<ColumnRule>,
    filter: Option<SqlExpr>,
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
            let source = match (&col.from, &col.sql) {
                (Some(from), None) => ColumnSource::Field(from.get_ref().clone()),
                (None, Some(sql)) => ColumnSource::Sql(
                    SqlExpr::parse(sql.get_ref())
                        .map_err(|e| TransformError::Invalid(format!("column `{name}`: `sql`: {e}")))?,
                ),
                _ => {
                    return Err(TransformError::Invalid(format!(
                        "column `{name}` needs exactly one of `from` or `sql`"
                    )));
                }
            };
            let ty = match &col.type_name {
                Some(t) => ColumnType::parse(t.get_ref()).map_err(TransformError::Invalid)?,
                None => ColumnType::Text,
            };
            rules.push(ColumnRule {
                name,
                source,
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
        let filter = file
            .filter
            .as_ref()
            .map(|f| SqlExpr::parse(f.get_ref()))
            .transpose()
            .map_err(|e| TransformError::Invalid(format!("`filter`: {e}")))?;
        Ok(Mapping {
            rules,
            filter,
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

    /// Maps one page of text columns (as extracted) into the target schema:
    /// the `filter` first, then every column, then the control columns.
    pub fn apply(&self, page: &DataFrame) -> Result<MappedPage, TransformError> {
        let empty;
        let page = if page.width() == 0 && page.height() == 0 {
            // An empty result may arrive as a 0-byte body, without even a
            // header row; map it as a page with no rows.
            empty = self.empty_page()?;
            &empty
        } else {
            page
        };
        let rows_in = page.height();
        let mut rejects: Vec<Reject> = Vec::new();
        let (page, rows_filtered) = match &self.filter {
            Some(filter) => self.apply_filter(page, filter, &mut rejects)?,
            None => (page.clone(), 0),
        };
        let page = &page;
        let height = page.height();
        let text_column = |name: &str| -> Result<&StringChunked, TransformError> {
            let col = page.column(name).map_err(|_| TransformError::MissingColumn(name.to_string()))?;
            Ok(col.str()?)
        };
        let ids = self.id_field.as_deref().map(text_column).transpose()?;
        let record_id = |row: usize| ids.and_then(|ids| ids.get(row)).filter(|id| !id.is_empty()).map(str::to_string);

        // Each column is mapped on its own, in parallel; a row is rejected
        // for the first column, in mapping order, that refuses it.
        let mapped: Vec<Result<MappedColumn, TransformError>> =
            self.rules.par_iter().map(|rule| rule.map(page, height)).collect();
        let mut columns: Vec<Column> = Vec::with_capacity(self.rules.len() + 2);
        let mut keep = vec![true; height];
        let mut row_rejects: Vec<(usize, Reject)> = Vec::new();
        let mut reject = |row: usize, keep: &mut Vec<bool>, column: &str, value: Option<String>, reason: String| {
            if keep[row] {
                keep[row] = false;
                row_rejects
                    .push((row, Reject { record_id: record_id(row), column: column.to_string(), value, reason }));
            }
        };
        for (rule, mapped) in self.rules.iter().zip(mapped) {
            let mapped = mapped?;
            for (row, value, reason) in mapped.refused {
                reject(row, &mut keep, &rule.name, value, reason);
            }
            columns.push(mapped.column);
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
            let mut builder = TypedBuilder::new(ty, output, height);
            for (row, raw) in source.iter().enumerate() {
                match raw {
                    Some(text) if builder.push(text).is_ok() => {}
                    other => {
                        let reason = format!("{label} must be {expected}, got {}", describe(other));
                        reject(row, &mut keep, field, other.map(str::to_string), reason);
                        builder.push_null();
                    }
                }
            }
            columns.push(builder.finish());
        }

        // Columns are checked one after another; report rejects in row order.
        row_rejects.sort_by_key(|(row, _)| *row);
        let any_rejected = !row_rejects.is_empty();
        rejects.extend(row_rejects.into_iter().map(|(_, r)| r));
        let frame = DataFrame::new(height, columns)?;
        let frame = if any_rejected {
            frame.filter(&BooleanChunked::from_slice(PlSmallStr::from_static("keep"), &keep))?
        } else {
            frame
        };
        Ok(MappedPage { frame, rejects, rows_in, rows_filtered })
    }

    /// A page with no rows and every source field the mapping reads.
    fn empty_page(&self) -> Result<DataFrame, TransformError> {
        let mut fields: Vec<&str> = Vec::new();
        for rule in &self.rules {
            match &rule.source {
                ColumnSource::Field(from) => fields.push(from),
                ColumnSource::Sql(sql) => fields.extend(sql.columns.iter().map(String::as_str)),
            }
        }
        fields.extend(self.filter.iter().flat_map(|f| f.columns.iter().map(String::as_str)));
        fields.extend([&self.cursor, &self.id_field, &self.deleted_field].into_iter().flatten().map(String::as_str));
        let mut columns: Vec<Column> = Vec::new();
        for field in fields {
            if !columns.iter().any(|c| c.name().as_str() == field) {
                columns.push(Column::new_empty(PlSmallStr::from_str(field), &DataType::String));
            }
        }
        Ok(DataFrame::new(0, columns)?)
    }

    /// Keeps the rows for which `filter` is true. False and null (SQL's
    /// unknown) drop the row; a row the filter cannot be evaluated on is a
    /// reject, since nobody decided it was unwanted.
    fn apply_filter(
        &self,
        page: &DataFrame,
        filter: &SqlExpr,
        rejects: &mut Vec<Reject>,
    ) -> Result<(DataFrame, usize), TransformError> {
        let (outputs, failures) = sql::evaluate(page, &[("filter".into(), filter.expr.clone())])?;
        let verdict = outputs[0].bool().map_err(|_| {
            TransformError::Invalid(format!("`filter` must be true or false, but it produces {}", outputs[0].dtype()))
        })?;
        let mut keep: Vec<bool> = verdict.iter().map(|v| v == Some(true)).collect();
        let ids = match self.id_field.as_deref() {
            Some(id) => Some(page.column(id).map_err(|_| TransformError::MissingColumn(id.to_string()))?.str()?),
            None => None,
        };
        for (row, error) in &failures {
            keep[*row] = false;
            rejects.push(Reject {
                record_id: ids.and_then(|ids| ids.get(*row)).map(str::to_string),
                column: "filter".into(),
                value: None,
                reason: format!("the mapping's `filter` failed on this row: {error}"),
            });
        }
        let kept = keep.iter().filter(|k| **k).count();
        let filtered = page.height() - kept - failures.len();
        if kept == page.height() {
            return Ok((page.clone(), 0));
        }
        let mask = BooleanChunked::from_slice(PlSmallStr::from_static("keep"), &keep);
        Ok((page.filter(&mask)?, filtered))
    }
}

fn describe(value: Option<&str>) -> String {
    match value {
        None => "null".into(),
        Some(v) => format!("`{v}`"),
    }
}

/// One mapped column, and the rows it refused: (row, value, reason).
struct MappedColumn {
    column: Column,
    refused: Vec<(usize, Option<String>, String)>,
}

impl ColumnRule {
    fn map(&self, page: &DataFrame, height: usize) -> Result<MappedColumn, TransformError> {
        let mut refused = Vec::new();
        let computed;
        let source = match &self.source {
            ColumnSource::Field(from) => {
                page.column(from).map_err(|_| TransformError::MissingColumn(from.to_string()))?.str()?
            }
            ColumnSource::Sql(sql) => {
                let (outputs, failures) = sql::evaluate(page, &[(self.name.clone(), sql.expr.clone())])?;
                for (row, error) in failures {
                    refused.push((row, None, format!("`sql` of column `{}` failed on this row: {error}", self.name)));
                }
                computed = sql::as_text(&outputs[0])
                    .map_err(|e| TransformError::Invalid(format!("column `{}`: `sql`: {e}", self.name)))?;
                &computed
            }
        };
        // Text as extracted needs no copy: the page already holds null for
        // Salesforce's empty fields.
        if self.ty == ColumnType::Text
            && !self.trim
            && self.values.is_none()
            && self.default.is_none()
            && !source.iter().any(|v| v == Some(""))
        {
            if self.required && source.null_count() > 0 {
                for (row, value) in source.iter().enumerate() {
                    if value.is_none() {
                        refused.push((row, None, format!("required column `{}` is null", self.name)));
                    }
                }
            }
            let column = source.clone().with_name(PlSmallStr::from_str(&self.name)).into_series().into_column();
            refused.sort_by_key(|(row, _, _)| *row);
            return Ok(MappedColumn { column, refused });
        }
        let mut builder = TypedBuilder::new(self.ty, &self.name, height);
        for (row, raw) in source.iter().enumerate() {
            match self.prepare(raw) {
                None if self.required => {
                    refused.push((row, None, format!("required column `{}` is null", self.name)));
                    builder.push_null();
                }
                None => builder.push_null(),
                Some(text) => {
                    if let Err(reason) = builder.push(text) {
                        refused.push((row, Some(text.to_string()), reason));
                        builder.push_null();
                    }
                }
            }
        }
        refused.sort_by_key(|(row, _, _)| *row);
        Ok(MappedColumn { column: builder.finish(), refused })
    }

    /// trim, then the value map, then the default for nulls. Salesforce sends
    /// null as an empty field, so empty text is null.
    fn prepare<'a>(&'a self, raw: Option<&'a str>) -> Option<&'a str> {
        let mut value = raw.map(|v| if self.trim { v.trim() } else { v });
        if value == Some("") {
            value = None;
        }
        if let (Some(v), Some(map)) = (value, self.values.as_ref())
            && let Some(mapped) = map.get(v)
        {
            value = Some(mapped.as_str());
        }
        value.or(self.default.as_deref())
    }
}

/// Accumulates one typed column, value by value.
struct TypedBuilder {
    name: PlSmallStr,
    values: TypedValues,
}

enum TypedValues {
    Text(StringChunkedBuilder),
    Integer(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Boolean(Vec<Option<bool>>),
    Timestamp(Vec<Option<i64>>),
    Date(Vec<Option<i32>>),
    Time(Vec<Option<i64>>),
    /// Decimal and JSON: validated, carried as text.
    Checked(StringChunkedBuilder, ColumnType),
}

impl TypedBuilder {
    fn new(ty: ColumnType, name: &str, capacity: usize) -> Self {
        let name = PlSmallStr::from_str(name);
        let text = || StringChunkedBuilder::new(name.clone(), capacity);
        let values = match ty {
            ColumnType::Text => TypedValues::Text(text()),
            ColumnType::Integer => TypedValues::Integer(Vec::with_capacity(capacity)),
            ColumnType::Float => TypedValues::Float(Vec::with_capacity(capacity)),
            ColumnType::Boolean => TypedValues::Boolean(Vec::with_capacity(capacity)),
            ColumnType::Timestamp => TypedValues::Timestamp(Vec::with_capacity(capacity)),
            ColumnType::Date => TypedValues::Date(Vec::with_capacity(capacity)),
            ColumnType::Time => TypedValues::Time(Vec::with_capacity(capacity)),
            ty @ (ColumnType::Decimal { .. } | ColumnType::Json) => TypedValues::Checked(text(), ty),
        };
        TypedBuilder { name, values }
    }

    fn push(&mut self, text: &str) -> Result<(), String> {
        match &mut self.values {
            TypedValues::Text(b) => b.append_value(text),
            TypedValues::Integer(v) => v.push(Some(cast::parse_integer(text)?)),
            TypedValues::Float(v) => v.push(Some(cast::parse_float(text)?)),
            TypedValues::Boolean(v) => v.push(Some(cast::parse_boolean(text)?)),
            TypedValues::Timestamp(v) => v.push(Some(cast::parse_timestamp_ms(text)?)),
            TypedValues::Date(v) => v.push(Some(cast::parse_date(text)?)),
            TypedValues::Time(v) => v.push(Some(cast::parse_time(text)?)),
            TypedValues::Checked(b, ColumnType::Decimal { precision, scale }) => {
                b.append_value(cast::parse_decimal(text, *precision, *scale)?)
            }
            TypedValues::Checked(b, _) => {
                cast::parse_json(text)?;
                b.append_value(text)
            }
        }
        Ok(())
    }

    fn push_null(&mut self) {
        match &mut self.values {
            TypedValues::Text(b) | TypedValues::Checked(b, _) => b.append_null(),
            TypedValues::Integer(v) | TypedValues::Timestamp(v) | TypedValues::Time(v) => v.push(None),
            TypedValues::Date(v) => v.push(None),
            TypedValues::Float(v) => v.push(None),
            TypedValues::Boolean(v) => v.push(None),
        }
    }

    fn finish(self) -> Column {
        let name = self.name;
        let series = match self.values {
            TypedValues::Text(b) | TypedValues::Checked(b, _) => b.finish().into_series(),
            TypedValues::Integer(v) => Series::new(name, v),
            TypedValues::Float(v) => Series::new(name, v),
            TypedValues::Boolean(v) => Series::new(name, v),
            TypedValues::Timestamp(v) => Series::new(name, v).into_datetime(TimeUnit::Milliseconds, None),
            TypedValues::Date(v) => Series::new(name, v).into_date(),
            TypedValues::Time(v) => Series::new(name, v).into_time(),
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

    /// One mapping using every feature, against a frame computed by hand.
    #[test]
    fn every_feature_against_a_hand_computed_frame() {
        let job = JOB.replace(
            r#"fields = ["Id", "Name", "Employees", "Revenue", "Active", "SystemModstamp"]"#,
            r#"fields = ["Id", "Name", "Industry", "Employees", "Revenue", "Amount", "Active", "Day", "At", "Doc", "Email", "SystemModstamp"]"#,
        );
        let mapping = r#"
filter = "Industry IS NULL OR Industry <> 'Internal'"
[[column]]
name = "sf_id"
from = "Id"
type = "text"
required = true
[[column]]
name = "name"
from = "Name"
trim = true
values = { "ACME" = "Acme Corp" }
[[column]]
name = "industry"
from = "Industry"
default = "Unknown"
[[column]]
name = "employees"
from = "Employees"
type = "integer"
[[column]]
name = "revenue"
from = "Revenue"
type = "float"
[[column]]
name = "amount"
from = "Amount"
type = "decimal(10,2)"
[[column]]
name = "active"
from = "Active"
type = "boolean"
[[column]]
name = "day"
from = "Day"
type = "date"
[[column]]
name = "at"
from = "At"
type = "time"
[[column]]
name = "doc"
from = "Doc"
type = "json"
[[column]]
name = "email"
sql = "lower(Email)"
[[column]]
name = "band"
sql = "CASE WHEN CAST(Employees AS INTEGER) >= 100 THEN 'large' ELSE 'small' END"
[[column]]
name = "modified_at"
from = "SystemModstamp"
type = "timestamp"
required = true
"#;
        let (job, mapping) = parse(&job, mapping);
        let m = Mapping::new(&job, &mapping).unwrap();
        let z = Some("2024-01-31T12:00:00.000Z");
        let df = page(&[
            ("Id", &[Some("001A"), Some("001B"), Some("001C"), Some("001D"), Some("001E"), None]),
            ("Name", &[Some("  ACME "), Some("Beta"), Some("Gamma"), Some("Delta"), Some("   "), Some("Zeta")]),
            ("Industry", &[Some("Tech"), Some("Internal"), None, Some("Fin"), None, None]),
            ("Employees", &[Some("250"), Some("1"), Some("12.5"), None, Some("7"), Some("1")]),
            ("Revenue", &[Some("1.5E3"), None, None, None, Some("-2"), None]),
            ("Amount", &[Some("10.5"), None, None, Some("1.234"), Some("-3"), None]),
            ("Active", &[Some("true"), None, None, None, Some("FALSE"), None]),
            ("Day", &[Some("2024-01-31"), None, None, None, None, None]),
            ("At", &[Some("12:30:00.000Z"), None, None, None, Some("08:00:00Z"), None]),
            ("Doc", &[Some(r#"{"a":1}"#), None, None, None, None, None]),
            ("Email", &[Some("A@X.COM"), None, None, None, None, None]),
            ("SystemModstamp", &[z, z, z, z, Some("2024-01-31T13:00:00.000+0000"), z]),
        ]);
        let out = m.apply(&df).unwrap();

        assert_eq!((out.rows_in, out.rows_filtered), (6, 1), "001B is Internal");
        let rejects: Vec<(Option<&str>, &str, Option<&str>)> =
            out.rejects.iter().map(|r| (r.record_id.as_deref(), r.column.as_str(), r.value.as_deref())).collect();
        assert_eq!(
            rejects,
            vec![
                (Some("001C"), "employees", Some("12.5")),
                (Some("001D"), "amount", Some("1.234")),
                (None, "sf_id", None),
            ]
        );
        let col = |name: &str, s: Series| s.with_name(PlSmallStr::from_str(name)).into_column();
        let expected = DataFrame::new(
            2,
            vec![
                col("sf_id", Series::new("".into(), &["001A", "001E"])),
                col("name", Series::new("".into(), &[Some("Acme Corp"), None])),
                col("industry", Series::new("".into(), &["Tech", "Unknown"])),
                col("employees", Series::new("".into(), &[250i64, 7])),
                col("revenue", Series::new("".into(), &[1500.0f64, -2.0])),
                col("amount", Series::new("".into(), &["10.50", "-3.00"])),
                col("active", Series::new("".into(), &[true, false])),
                col("day", Series::new("".into(), &[Some(19_753i32), None]).into_date()),
                col("at", Series::new("".into(), &[45_000_000_000_000i64, 28_800_000_000_000]).into_time()),
                col("doc", Series::new("".into(), &[Some(r#"{"a":1}"#), None])),
                col("email", Series::new("".into(), &[Some("a@x.com"), None])),
                col("band", Series::new("".into(), &["large", "small"])),
                col(
                    "modified_at",
                    Series::new("".into(), &[1_706_702_400_000i64, 1_706_706_000_000])
                        .into_datetime(TimeUnit::Milliseconds, None),
                ),
                col(
                    CURSOR_COLUMN,
                    Series::new("".into(), &[1_706_702_400_000i64, 1_706_706_000_000])
                        .into_datetime(TimeUnit::Milliseconds, None),
                ),
            ],
        )
        .unwrap();
        assert_eq!(out.frame.schema(), expected.schema());
        assert!(out.frame == expected, "got\n{}\nexpected\n{}", out.frame, expected);
    }

    #[test]
    fn a_filter_that_is_not_a_condition_is_an_error() {
        let (job, mapping) = parse(JOB, &format!("filter = \"upper(Name)\"\n{MAPPING}"));
        let m = Mapping::new(&job, &mapping).unwrap();
        let df = page(&[("Id", &[Some("001A")]), ("Name", &[Some("x")])]);
        let err = m.apply(&df).unwrap_err().to_string();
        assert!(err.contains("`filter` must be true or false"), "{err}");
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
