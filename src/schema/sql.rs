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
        let mut frame = DataFrame::empty_with_schema(&schema).lazy().select([self.expr.clone().alias("out")]);
        let out = frame.collect_schema().map_err(|e| clean_polars_message(&e.to_string()))?;
        out.get("out").cloned().ok_or_else(|| "the expression produced no column".to_string())
    }

    /// Everything `validate` can know without data: a row expression whose
    /// type resolves over the job's text fields, and that evaluates on an
    /// empty page and on a probe page (one row of nulls, one of sample
    /// text) to one value per row. An expression that fails here would fail
    /// on every page. Returns the output type.
    pub fn check(&self, fields: &[&str]) -> Result<DataType, String> {
        self.check_row_expression()?;
        let ty = self.output_type(fields)?;
        let schema = text_schema(fields);
        let probes = [
            DataFrame::empty_with_schema(&schema),
            DataFrame::full_null(&schema, 1),
            probe_rows(fields).map_err(|e| clean_polars_message(&e.to_string()))?,
        ];
        for probe in probes {
            let height = probe.height();
            match probe.lazy().select([self.expr.clone().alias("out")]).collect() {
                Ok(out) if out.height() == height => {}
                Ok(out) => {
                    return Err(format!(
                        "`{}` produced {} values for {height} rows; a mapping expression must give one value per row",
                        self.text,
                        out.height()
                    ));
                }
                // A value-dependent failure (a strict CAST of the sample
                // text) is the row's problem, not the expression's.
                Err(_) if height == 2 => {}
                Err(e) => return Err(clean_polars_message(&e.to_string())),
            }
        }
        Ok(ty)
    }
}

fn text_schema(fields: &[&str]) -> Schema {
    fields.iter().map(|f| Field::new(PlSmallStr::from_str(f), DataType::String)).collect()
}

/// Two rows of plausible Salesforce text for every field: digits and a
/// word, so expressions meet both kinds of value.
fn probe_rows(fields: &[&str]) -> PolarsResult<DataFrame> {
    let columns = fields.iter().map(|f| Series::new(PlSmallStr::from_str(f), &["1", "x"]).into_column()).collect();
    DataFrame::new(2, columns)
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
        assert_eq!(fine.check(&["Name", "N"]).unwrap(), DataType::Int32);
    }
}
