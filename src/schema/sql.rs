//! SQL in mappings (`sql = "..."` columns and the row `filter`): parsed and
//! checked by Polars' own SQL support. We never parse SQL ourselves.
//!
//! A mapping expression is evaluated one page at a time, so it must be a
//! row expression: an aggregate (`max(x)`) or a window (`... OVER ()`) would
//! compute a different value for every page of the same extract, which is
//! silently wrong data. [`SqlExpr::check`] refuses them before any run.

use polars::prelude::*;
use polars::sql::sql_expr;

/// A parsed SQL expression, with the source columns it reads.
#[derive(Debug, Clone)]
pub struct SqlExpr {
    pub text: String,
    pub expr: Expr,
    /// Source columns referenced, in order of first use.
    pub columns: Vec<String>,
}

impl SqlExpr {
    /// Parses `text` as one SQL expression. The error is Polars' own message,
    /// which names the token it stumbled on.
    pub fn parse(text: &str) -> Result<Self, String> {
        let expr = sql_expr(text).map_err(|e| clean_polars_message(&e.to_string()))?;
        let mut columns: Vec<String> = Vec::new();
        for name in expr.clone().meta().root_names() {
            if !columns.iter().any(|c| c == name.as_str()) {
                columns.push(name.to_string());
            }
        }
        if columns.is_empty() {
            return Err(format!("`{text}` reads no source column; a constant belongs in `default`"));
        }
        Ok(SqlExpr { text: text.to_string(), expr, columns })
    }

    /// Refuses what cannot be a per-row expression: aggregates, windows and
    /// sub-queries compute over the page, not the row.
    pub fn check_row_expression(&self) -> Result<(), String> {
        for node in &self.expr {
            let what = match node {
                Expr::Agg(_) | Expr::Len => "an aggregate",
                Expr::Over { .. } => "a window function (OVER)",
                Expr::SubPlan(..) => "a sub-query",
                Expr::Explode { .. } | Expr::Filter { .. } | Expr::Slice { .. } | Expr::Gather { .. } => {
                    "a function that changes the number of rows"
                }
                _ => continue,
            };
            return Err(format!(
                "`{}` uses {what}; a mapping expression is evaluated one page at a time, so it must compute each row from that row alone",
                self.text
            ));
        }
        Ok(())
    }

    /// The type the expression produces over the job's fields, all of which
    /// are text when extracted. Catches type errors (e.g. `Name + 1`) before
    /// a run spends API calls.
    pub fn output_type(&self, fields: &[&str]) -> Result<DataType, String> {
        let schema = text_schema(fields);
        let out = self.guarded(|| {
            let mut frame = DataFrame::empty_with_schema(&schema).lazy().select([self.expr.clone().alias("out")]);
            frame.collect_schema().map_err(|e| clean_polars_message(&e.to_string()))
        })?;
        out.get("out").cloned().ok_or_else(|| "the expression produced no column".to_string())
    }

    /// Everything `validate` can know without data: a row expression whose
    /// type resolves over the job's text fields, that evaluates on an empty
    /// page and on a page of nulls to one value per row, and that does not
    /// fail on every sample of Salesforce text. An expression that fails
    /// any of these would fail on every page. Returns the output type.
    pub fn check(&self, fields: &[&str]) -> Result<DataType, String> {
        self.check_row_expression()?;
        let ty = self.output_type(fields)?;
        let schema = text_schema(fields);
        for probe in [DataFrame::empty_with_schema(&schema), DataFrame::full_null(&schema, 1)] {
            self.evaluate(probe)?;
        }
        // A failure on some samples only is a value's problem (that row is
        // rejected at run time). The same failure on every sample does not
        // depend on the value: a type error Polars finds only when it runs
        // (`"Name" + 1`), a cast of a constant, an unsupported cast.
        let mut failures = Vec::new();
        for sample in PROBE_VALUES {
            let probe = one_row(fields, sample).map_err(|e| clean_polars_message(&e.to_string()))?;
            match self.evaluate(probe) {
                Ok(()) => return Ok(ty),
                Err(e) => failures.push(e),
            }
        }
        match failures.first() {
            Some(first) if failures.iter().all(|f| f == first) => Err(format!(
                "`{}` fails on every value ({} samples of Salesforce text tried, the same error each time): {first}",
                self.text,
                PROBE_VALUES.len()
            )),
            _ => Ok(ty),
        }
    }

    /// Runs a Polars call on this expression, turning a panic inside Polars
    /// into an error: some ill-typed expressions (an ill-typed sub-expression
    /// repeated, so the common sub-expression pass meets it; list arithmetic
    /// we do not build in) panic inside Polars instead of returning an
    /// error, and `validate` must report them, not crash (found by fuzzing:
    /// `fuzz/regressions/sql/`).
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(format!(
                "`{}` cannot be evaluated: Polars failed on it ({}); rewrite the expression, e.g. with explicit CASTs",
                self.text,
                clean_polars_message(why)
            ))
        })
    }

    /// Evaluates the expression on `page`; it must give one value per row.
    fn evaluate(&self, page: DataFrame) -> Result<(), String> {
        let height = page.height();
        let out = self.guarded(|| {
            page.lazy()
                .select([self.expr.clone().alias("out")])
                .collect()
                .map_err(|e| clean_polars_message(&e.to_string()))
        })?;
        if out.height() != height {
            return Err(format!(
                "`{}` produced {} values for {height} rows; a mapping expression must give one value per row",
                self.text,
                out.height()
            ));
        }
        Ok(())
    }
}

fn text_schema(fields: &[&str]) -> Schema {
    fields.iter().map(|f| Field::new(PlSmallStr::from_str(f), DataType::String)).collect()
}

/// How Salesforce renders each field type in bulk results, and plain words:
/// an expression that works on real data works on one of these.
const PROBE_VALUES: &[&str] = &[
    "1",
    "-2.5",
    "x",
    "Acme, Inc.",
    "true",
    "2024-01-31",
    "2024-01-31T12:30:00.000Z",
    "12:30:00.000Z",
    "",
    "{\"a\": 1}",
];

/// One row with `value` in every field.
fn one_row(fields: &[&str], value: &str) -> PolarsResult<DataFrame> {
    let columns = fields.iter().map(|f| Series::new(PlSmallStr::from_str(f), &[value]).into_column()).collect();
    DataFrame::new(1, columns)
}

/// Polars error messages carry a trailing "Resolved plan until failure" dump
/// and error-kind prefixes meant for Python users; keep the first line.
pub fn clean_polars_message(message: &str) -> String {
    let first = message.lines().find(|l| !l.trim().is_empty()).unwrap_or(message).trim();
    first.strip_prefix("SQLInterface: ").or_else(|| first.strip_prefix("SQLSyntax: ")).unwrap_or(first).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_finds_referenced_columns() {
        let e = SqlExpr::parse(r#"lower("Owner.Email") || '-' || Name"#).unwrap();
        assert_eq!(e.columns, vec!["Owner.Email".to_string(), "Name".to_string()]);
        assert!(SqlExpr::parse("lower(Name").is_err());
        assert!(SqlExpr::parse("'x'").unwrap_err().contains("reads no source column"));
    }

    #[test]
    fn output_type_checks_over_text_fields() {
        let filter = SqlExpr::parse("Industry IS NULL OR Industry <> 'Internal'").unwrap();
        assert_eq!(filter.output_type(&["Industry"]).unwrap(), DataType::Boolean);
        let missing = SqlExpr::parse("upper(Nope)").unwrap();
        assert!(missing.output_type(&["Industry"]).is_err());
    }

    #[test]
    fn aggregates_and_windows_are_not_row_expressions() {
        for text in ["max(Name)", "count(Name)", "sum(CAST(N AS INTEGER)) OVER ()", "Name || max(Name)"] {
            let e = SqlExpr::parse(text).unwrap();
            let err = e.check(&["Name", "N"]).unwrap_err();
            assert!(err.contains("one page at a time") || err.contains("one value per row"), "{text}: {err}");
        }
        let fine = SqlExpr::parse("CAST(N AS INTEGER) * 2").unwrap();
        // Fails on some text only: a reject at run time, not a config error.
        for text in
            ["CAST(N AS INTEGER) + 1", "CAST(N AS INTEGER) + CAST(Name AS DOUBLE)", "strptime(Name, '%d/%m/%Y')"]
        {
            let e = SqlExpr::parse(text).unwrap();
            assert!(e.check(&["Name", "N"]).is_ok(), "{text}: {:?}", e.check(&["Name", "N"]));
        }
        // Fails on every value, whatever it is.
        for text in ["CAST(N AS BOOLEAN)", "Name || CAST('n/a' AS INTEGER)"] {
            let e = SqlExpr::parse(text).unwrap();
            let err = e.check(&["Name", "N"]).unwrap_err();
            assert!(err.contains("every value") || err.contains("n/a"), "{text}: {err}");
        }
        assert_eq!(fine.check(&["Name", "N"]).unwrap(), DataType::Int32);
    }
}
