//! The shape of loaded data, shared by `config`, `transform` and `load`
//! (a leaf: it depends on none of them).
//!
//! - [`ColumnType`], [`TargetColumn`], [`TargetSchema`]: what a mapping
//!   produces and what every target creates its table from;
//! - [`cast`]: the strict parsers from Salesforce's CSV text to typed values;
//! - [`sql`]: SQL expressions of mappings, parsed and checked by Polars;
//! - [`values`]: the one audited way to read typed cells back out of a
//!   Polars column, whatever its physical form;
//! - [`MappedPage`]: one page after mapping, as it travels to a target.

pub mod cast;
pub mod sql;
pub mod values;

use polars::prelude::*;

pub use sql::SqlExpr;

/// Bookkeeping columns every target table gets.
pub const RUN_ID_COLUMN: &str = "_nightjar_run_id";
pub const LOADED_AT_COLUMN: &str = "_nightjar_loaded_at";
/// Soft-delete flag, present when the job's `deletes = "soft"`.
pub const SOFT_DELETE_COLUMN: &str = "_deleted";

/// Column names a mapping may not use: nightjar writes them itself.
pub const RESERVED_COLUMNS: &[&str] = &[RUN_ID_COLUMN, LOADED_AT_COLUMN, SOFT_DELETE_COLUMN];

/// The types a mapped column can have; each target maps them to its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// built in); targets store it as a native exact type.
    Decimal {
        precision: u8,
        scale: u8,
    },
    /// A JSON document, validated, kept as sent.
    Json,
}

impl ColumnType {
    pub const SUPPORTED: &'static str = "text, integer, float, decimal(p,s), boolean, date, time, timestamp, json";

    /// Every type, for tests that must cover them all.
    pub const ALL: [ColumnType; 9] = [
        ColumnType::Text,
        ColumnType::Integer,
        ColumnType::Float,
        ColumnType::Boolean,
        ColumnType::Timestamp,
        ColumnType::Date,
        ColumnType::Time,
        ColumnType::Decimal { precision: 18, scale: 2 },
        ColumnType::Json,
    ];

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
            Self::Date => "date".into(),
            Self::Time => "time".into(),
            Self::Json => "json".into(),
            Self::Text => "text".into(),
            Self::Integer => "integer".into(),
            Self::Float => "float".into(),
            Self::Boolean => "boolean".into(),
            Self::Timestamp => "timestamp".into(),
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
    /// The columns that identify a row (a subset of `columns`).
    pub key: Vec<String>,
}

impl TargetSchema {
    pub fn column(&self, name: &str) -> Option<&TargetColumn> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn is_key(&self, name: &str) -> bool {
        self.key.iter().any(|k| k == name)
    }

    /// Mapped columns that are not part of the key: the ones a merge
    /// compares to tell a changed row from an unchanged one.
    pub fn value_columns(&self) -> impl Iterator<Item = &TargetColumn> {
        self.columns.iter().filter(|c| !self.is_key(&c.name))
    }
}

/// One rejected row: which record, which column, what value, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub record_id: Option<String>,
    pub column: String,
    pub value: Option<String>,
    pub reason: String,
}

/// One page after mapping, on its way to a target: typed rows in the
/// schema's column order, and beside them (not inside them) what the merge
/// needs to know about each row.
#[derive(Debug, Clone)]
pub struct MappedPage {
    /// 1-based position in the extract.
    pub number: u32,
    /// Exactly the schema's columns, in order, typed per [`values`].
    pub rows: DataFrame,
    /// Each row's cursor (epoch milliseconds), when the job has a cursor:
    /// the newest row of a key wins within one extract.
    pub cursor: Option<Int64Chunked>,
    /// Each row's `IsDeleted`, when the job extracts it.
    pub deleted: Option<BooleanChunked>,
}

impl MappedPage {
    pub fn height(&self) -> usize {
        self.rows.height()
    }

    /// Whether row `i` is a deleted record.
    pub fn is_deleted(&self, i: usize) -> bool {
        self.deleted.as_ref().and_then(|d| d.get(i)).unwrap_or(false)
    }

    /// How many rows are deleted records.
    pub fn deleted_count(&self) -> usize {
        self.deleted.as_ref().map_or(0, |d| d.num_trues())
    }

    /// The rows where `mask` is true, with their cursors and flags.
    pub fn filter(&self, mask: &BooleanChunked) -> PolarsResult<MappedPage> {
        Ok(MappedPage {
            number: self.number,
            rows: self.rows.filter(mask)?,
            cursor: self.cursor.as_ref().map(|c| c.filter(mask)).transpose()?,
            deleted: self.deleted.as_ref().map(|d| d.filter(mask)).transpose()?,
        })
    }

    /// The deleted flags with nulls as false (all false without flags).
    pub fn deleted_mask(&self) -> BooleanChunked {
        match &self.deleted {
            Some(d) => d.fill_null_with_values(false).unwrap_or_else(|_| d.clone()),
            None => BooleanChunked::full("deleted".into(), false, self.height()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_and_name_round_trip() {
        for ty in ColumnType::ALL {
            assert_eq!(ColumnType::parse(&ty.name()), Ok(ty));
        }
        assert!(ColumnType::parse("decimal(2,3)").is_err());
        assert!(ColumnType::parse("decimal(40,2)").is_err());
        assert!(ColumnType::parse("varchar").unwrap_err().contains("supported"));
    }
}
