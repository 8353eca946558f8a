//! Mapping: turns a page of Salesforce text columns into the typed target
//! schema, rejecting (never nulling) values that do not cast.
//!
//! Casts are done value by value, strictly: a reject must name the column,
//! the value and the reason, which a bulk cast that turns failures into nulls
//! cannot tell us.

#[cfg(test)]
mod proptests;
mod sql;

use polars::prelude::*;
use rayon::prelude::*;
use thiserror::Error;

use crate::config::{ColumnRule, ColumnSource, JobPlan};
use crate::schema::cast;
use crate::schema::{ColumnType, MappedPage, Reject, SqlExpr, TargetSchema};

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

/// What mapping one page gave: the typed rows that passed, and the ones that
/// did not.
#[derive(Debug)]
pub struct MappingOutput {
    pub page: MappedPage,
    pub rejects: Vec<Reject>,
    /// Rows the page had as extracted.
    pub rows_in: usize,
    /// Rows the mapping's `filter` dropped (not rejects: they were not wanted).
    pub rows_filtered: usize,
}

/// A job's mapping, ready to apply to pages.
#[derive(Debug, Clone)]
pub struct Mapping {
    rules: Vec<ColumnRule>,
    filter: Option<SqlExpr>,
    cursor: Option<String>,
    id_field: Option<String>,
    deleted_field: Option<String>,
    schema: TargetSchema,
}

impl Mapping {
    /// The mapping of a compiled job; `config` has checked everything.
    pub fn new(job: &JobPlan) -> Self {
        Mapping {
            rules: job.mapping.columns.clone(),
            filter: job.mapping.filter.clone(),
            cursor: job.source.cursor.clone(),
            id_field: job.source.id_field().map(str::to_string),
            deleted_field: job.source.deleted_field().map(str::to_string),
            schema: job.schema(),
        }
    }

    pub fn schema(&self) -> &TargetSchema {
        &self.schema
    }

    pub fn has_cursor(&self) -> bool {
        self.cursor.is_some()
    }

    /// Maps page `number` of text columns (as extracted) into the target
    /// schema: the `filter` first, then every column, then the cursor and
    /// deleted flag beside the rows.
    pub fn apply(&self, number: u32, page: &DataFrame) -> Result<MappingOutput, TransformError> {
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
            self.rules.par_iter().map(|rule| map_column(rule, page, height)).collect();
        let mut columns: Vec<Column> = Vec::with_capacity(self.rules.len());
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

        // What the pipeline itself relies on: a value that does not parse
        // rejects the row (Salesforce always fills both fields, so anything
        // else is not trustworthy enough to window or delete on).
        let mut control =
            |field: &str, label: String, ty: ColumnType, expected: &str| -> Result<Column, TransformError> {
                let source = text_column(field)?;
                let mut builder = TypedBuilder::new(ty, field, height);
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
                Ok(builder.finish())
            };
        let cursor = match &self.cursor {
            Some(c) => Some(control(c, format!("cursor `{c}`"), ColumnType::Timestamp, "a datetime")?),
            None => None,
        };
        let deleted = match &self.deleted_field {
            Some(d) => Some(control(d, format!("`{d}`"), ColumnType::Boolean, "true or false")?),
            None => None,
        };

        // Columns are checked one after another; report rejects in row order.
        row_rejects.sort_by_key(|(row, _)| *row);
        let any_rejected = !row_rejects.is_empty();
        rejects.extend(row_rejects.into_iter().map(|(_, r)| r));
        let mask = any_rejected.then(|| BooleanChunked::from_slice(PlSmallStr::from_static("keep"), &keep));
        let keep_rows = |column: Column| -> Result<Column, TransformError> {
            Ok(match &mask {
                Some(mask) => column.filter(mask)?,
                None => column,
            })
        };
        let rows = DataFrame::new(height, columns)?;
        let rows = match &mask {
            Some(mask) => rows.filter(mask)?,
            None => rows,
        };
        let cursor = cursor.map(keep_rows).transpose()?.map(|c| -> Result<Int64Chunked, TransformError> {
            Ok(c.as_materialized_series().datetime()?.physical().clone())
        });
        let deleted = deleted
            .map(keep_rows)
            .transpose()?
            .map(|c| -> Result<BooleanChunked, TransformError> { Ok(c.as_materialized_series().bool()?.clone()) });
        let page = MappedPage { number, rows, cursor: cursor.transpose()?, deleted: deleted.transpose()? };
        Ok(MappingOutput { page, rejects, rows_in, rows_filtered })
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

fn map_column(rule: &ColumnRule, page: &DataFrame, height: usize) -> Result<MappedColumn, TransformError> {
    let mut refused = Vec::new();
    let computed;
    let source = match &rule.source {
        ColumnSource::Field(from) => {
            page.column(from).map_err(|_| TransformError::MissingColumn(from.to_string()))?.str()?
        }
        ColumnSource::Sql(sql) => {
            let (outputs, failures) = sql::evaluate(page, &[(rule.name.clone(), sql.expr.clone())])?;
            for (row, error) in failures {
                refused.push((row, None, format!("`sql` of column `{}` failed on this row: {error}", rule.name)));
            }
            computed = sql::as_text(&outputs[0])
                .map_err(|e| TransformError::Invalid(format!("column `{}`: `sql`: {e}", rule.name)))?;
            &computed
        }
    };
    // Text as extracted needs no copy: the page already holds null for
    // Salesforce's empty fields.
    if rule.ty == ColumnType::Text
        && !rule.trim
        && rule.values.is_none()
        && rule.default.is_none()
        && !source.iter().any(|v| v == Some(""))
    {
        if rule.required && source.null_count() > 0 {
            for (row, value) in source.iter().enumerate() {
                if value.is_none() {
                    refused.push((row, None, format!("required column `{}` is null", rule.name)));
                }
            }
        }
        let column = source.clone().with_name(PlSmallStr::from_str(&rule.name)).into_series().into_column();
        refused.sort_by_key(|(row, _, _)| *row);
        return Ok(MappedColumn { column, refused });
    }
    let mut builder = TypedBuilder::new(rule.ty, &rule.name, height);
    for (row, raw) in source.iter().enumerate() {
        match prepare(rule, raw) {
            None if rule.required => {
                refused.push((row, None, format!("required column `{}` is null", rule.name)));
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
fn prepare<'a>(rule: &'a ColumnRule, raw: Option<&'a str>) -> Option<&'a str> {
    let mut value = raw.map(|v| if rule.trim { v.trim() } else { v });
    if value == Some("") {
        value = None;
    }
    if let (Some(v), Some(map)) = (value, rule.values.as_ref())
        && let Some(mapped) = map.get(v)
    {
        value = Some(mapped.as_str());
    }
    value.or(rule.default.as_deref())
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
    use crate::config::plan_for_tests;
    use crate::schema::TargetColumn;

    fn parse(job: &str, mapping: &str) -> Mapping {
        Mapping::new(&plan_for_tests(job, mapping))
    }

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
        let m = parse(JOB, MAPPING);
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
        let out = m.apply(1, &df).unwrap();
        assert_eq!(out.rows_in, 4);
        assert_eq!(out.page.rows.height(), 2, "rows B (bad integer) and C (null key) are rejected");
        assert_eq!(out.rejects.len(), 2);
        assert_eq!(out.rejects[0].record_id.as_deref(), Some("001B"));
        assert_eq!(out.rejects[0].column, "employees");
        assert_eq!(out.rejects[0].value.as_deref(), Some("12.5"));
        assert!(out.rejects[0].reason.contains("integer"), "{}", out.rejects[0].reason);
        assert_eq!(out.rejects[1].column, "sf_id");
        assert_eq!(out.rejects[1].record_id, None, "an empty Id is no id");
        assert!(out.rejects[1].reason.contains("required"));

        let names: Vec<Option<&str>> = out.page.rows.column("name").unwrap().str().unwrap().iter().collect();
        assert_eq!(names, vec![Some("Acme Corp"), Some("y")]);
        let emp: Vec<Option<i64>> = out.page.rows.column("employees").unwrap().i64().unwrap().iter().collect();
        assert_eq!(emp, vec![Some(12), None]);
        let rev: Vec<Option<f64>> = out.page.rows.column("revenue").unwrap().f64().unwrap().iter().collect();
        assert_eq!(rev, vec![Some(1500.0), Some(4.25)]);
        let cursor: Vec<Option<i64>> = out.page.cursor.as_ref().unwrap().iter().collect();
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
        let m = parse(&job, mapping);
        let stamp = Some("2024-01-31T12:00:00.000Z");
        let df = page(&[
            ("Id", &[Some("001A"), Some("001B"), Some("001C")]),
            ("Day", &[Some("2024-01-31"), None, Some("2024-01-31")]),
            ("At", &[Some("12:30:00.000Z"), None, None]),
            ("Amount", &[Some("1234.5"), Some("12.345"), Some("-3")]),
            ("Doc", &[Some(r#"{"a":1}"#), None, Some("{nope")]),
            ("SystemModstamp", &[stamp, stamp, stamp]),
        ]);
        let out = m.apply(1, &df).unwrap();
        assert_eq!(out.page.rows.height(), 1);
        let reasons: Vec<(&str, &str)> = out.rejects.iter().map(|r| (r.column.as_str(), r.reason.as_str())).collect();
        assert_eq!(reasons.len(), 2);
        assert_eq!(reasons[0].0, "amount");
        assert!(reasons[0].1.contains("more than 2 decimal places"), "{}", reasons[0].1);
        assert_eq!(reasons[1].0, "doc");
        assert_eq!(out.page.rows.column("day").unwrap().dtype(), &DataType::Date);
        assert_eq!(out.page.rows.column("at").unwrap().dtype(), &DataType::Time);
        let amount: Vec<Option<&str>> = out.page.rows.column("amount").unwrap().str().unwrap().iter().collect();
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
        let m = parse(&job, mapping);
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
        let out = m.apply(1, &df).unwrap();

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
            ],
        )
        .unwrap();
        assert_eq!(out.page.rows.schema(), expected.schema());
        assert!(out.page.rows == expected, "got\n{}\nexpected\n{}", out.page.rows, expected);
        let cursor: Vec<Option<i64>> = out.page.cursor.as_ref().unwrap().iter().collect();
        assert_eq!(cursor, vec![Some(1_706_702_400_000), Some(1_706_706_000_000)]);
    }

    #[test]
    fn schema_follows_mapping() {
        let schema = parse(JOB, MAPPING).schema().clone();
        assert_eq!(schema.key, vec!["sf_id".to_string()]);
        assert_eq!(schema.columns[0], TargetColumn { name: "sf_id".into(), ty: ColumnType::Text, nullable: false });
        assert_eq!(schema.columns[5].ty, ColumnType::Timestamp);
    }

    #[test]
    fn missing_source_column_is_an_error_not_a_panic() {
        let m = parse(JOB, MAPPING);
        let df = page(&[("Id", &[Some("001A")])]);
        assert!(matches!(m.apply(1, &df), Err(TransformError::MissingColumn(c)) if c == "Name"));
    }
}
