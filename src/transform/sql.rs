//! SQL in mappings: computed columns (`sql = "..."`) and the row `filter`,
//! parsed and evaluated by Polars' own SQL support over the page's text
//! columns. We never parse SQL ourselves.

use polars::prelude::*;
use polars::sql::sql_expr;

use super::cast::{format_date, format_time, format_timestamp_ms};

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

    /// The type the expression produces over the job's fields, all of which
    /// are text when extracted. Catches type errors (e.g. `Name + 1`) before
    /// a run spends API calls.
    pub fn output_type(&self, fields: &[&str]) -> Result<DataType, String> {
        let schema: Schema = fields.iter().map(|f| Field::new(PlSmallStr::from_str(f), DataType::String)).collect();
        let mut frame = DataFrame::empty_with_schema(&schema).lazy().select([self.expr.clone().alias("out")]);
        let out = frame.collect_schema().map_err(|e| clean_polars_message(&e.to_string()))?;
        out.get("out").cloned().ok_or_else(|| "the expression produced no column".to_string())
    }
}

/// Polars error messages carry a trailing "Resolved plan until failure" dump
/// and error-kind prefixes meant for Python users; keep the first line.
fn clean_polars_message(message: &str) -> String {
    let first = message.lines().find(|l| !l.trim().is_empty()).unwrap_or(message).trim();
    first.strip_prefix("SQLInterface: ").or_else(|| first.strip_prefix("SQLSyntax: ")).unwrap_or(first).to_string()
}

/// Rows an expression could not be evaluated on: (row, Polars' reason).
pub type RowFailures = Vec<(usize, String)>;

/// Evaluates `exprs` over `page`, one output column per expression, each as
/// long as the page. Rows on which Polars cannot evaluate an expression (a
/// strict `CAST` of a bad value, say) are found by bisection and returned
/// with Polars' reason; their outputs are null. A page that evaluates
/// cleanly costs one pass.
pub fn evaluate(page: &DataFrame, exprs: &[(String, Expr)]) -> Result<(Vec<Column>, RowFailures), PolarsError> {
    let mut failures = Vec::new();
    let frames = evaluate_range(page, exprs, 0, page.height(), &mut failures)?;
    let mut out: Option<DataFrame> = None;
    for frame in frames {
        out = Some(match out {
            None => frame,
            Some(mut acc) => {
                acc.vstack_mut_owned(frame)?;
                acc
            }
        });
    }
    let out = match out {
        Some(frame) => frame,
        None => evaluate_slice(page, exprs, 0, 0)?,
    };
    Ok((out.into_columns(), failures))
}

fn evaluate_range(
    page: &DataFrame,
    exprs: &[(String, Expr)],
    offset: usize,
    len: usize,
    failures: &mut RowFailures,
) -> Result<Vec<DataFrame>, PolarsError> {
    match evaluate_slice(page, exprs, offset, len) {
        Ok(frame) => Ok(vec![frame]),
        Err(e) if len == 1 => {
            failures.push((offset, clean_polars_message(&e.to_string())));
            // The row's outputs are null: evaluate the same expressions over
            // an all-null row to get the right column types.
            let nulls = DataFrame::full_null(page.schema().as_ref(), 1);
            let frame = evaluate_slice(&nulls, exprs, 0, 1)?;
            Ok(vec![frame])
        }
        Err(e) if len == 0 => Err(e),
        Err(_) => {
            let half = len / 2;
            let mut left = evaluate_range(page, exprs, offset, half, failures)?;
            let right = evaluate_range(page, exprs, offset + half, len - half, failures)?;
            left.extend(right);
            Ok(left)
        }
    }
}

fn evaluate_slice(page: &DataFrame, exprs: &[(String, Expr)], offset: usize, len: usize) -> PolarsResult<DataFrame> {
    let slice = page.slice(offset as i64, len);
    let selected: Vec<Expr> = exprs.iter().map(|(name, e)| e.clone().alias(name.as_str())).collect();
    let out = slice.lazy().select(selected).collect()?;
    if out.height() == len {
        return Ok(out);
    }
    // An expression without a per-row result (a literal, an aggregate)
    // comes back as one value; it holds for every row.
    if out.height() == 1 {
        let columns = out.columns().iter().map(|c| c.new_from_index(0, len)).collect();
        return DataFrame::new(len, columns);
    }
    polars_bail!(ShapeMismatch: "the expression produced {} rows for {} input rows", out.height(), len)
}

/// Renders an evaluated SQL column as text in the forms Salesforce itself
/// uses, so it goes through the same strict casts as an extracted field.
pub fn as_text(column: &Column) -> Result<StringChunked, String> {
    let series = column.as_materialized_series();
    let name = series.name().clone();
    let render = |values: Vec<Option<String>>| StringChunked::from_iter_options(name.clone(), values.into_iter());
    Ok(match series.dtype() {
        DataType::String => series.str().map_err(|e| e.to_string())?.clone(),
        DataType::Datetime(_, _) => {
            let ms = series.cast(&DataType::Datetime(TimeUnit::Milliseconds, None)).map_err(|e| e.to_string())?;
            let ms = ms.datetime().map_err(|e| e.to_string())?;
            render(ms.physical().iter().map(|v| v.and_then(format_timestamp_ms)).collect())
        }
        DataType::Date => {
            let days = series.date().map_err(|e| e.to_string())?;
            render(days.physical().iter().map(|v| v.and_then(format_date)).collect())
        }
        DataType::Time => {
            let nanos = series.time().map_err(|e| e.to_string())?;
            render(nanos.physical().iter().map(|v| v.and_then(format_time)).collect())
        }
        DataType::Null => StringChunked::full_null(name, series.len()),
        other => {
            let text = series
                .cast(&DataType::String)
                .map_err(|_| format!("the expression produces {other}, which cannot be stored in a column"))?;
            text.str().map_err(|e| e.to_string())?.clone()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page(cols: &[(&str, &[Option<&str>])]) -> DataFrame {
        let height = cols[0].1.len();
        let columns = cols
            .iter()
            .map(|(name, values)| Series::new(PlSmallStr::from_str(name), values.to_vec()).into_column())
            .collect();
        DataFrame::new(height, columns).unwrap()
    }

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
    fn bad_rows_are_isolated_by_bisection() {
        let page = text_page(&[("N", &[Some("1"), Some("x"), Some("3"), None, Some("y")])]);
        let e = SqlExpr::parse("CAST(N AS INTEGER) * 2").unwrap();
        let (cols, failures) = evaluate(&page, &[("d".into(), e.expr)]).unwrap();
        let rows: Vec<usize> = failures.iter().map(|(r, _)| *r).collect();
        assert_eq!(rows, vec![1, 4]);
        assert!(!failures[0].1.is_empty());
        let values: Vec<Option<i64>> = cols[0].cast(&DataType::Int64).unwrap().i64().unwrap().iter().collect();
        assert_eq!(values, vec![Some(2), None, Some(6), None, None]);
    }

    #[test]
    fn typed_results_render_like_salesforce() {
        let page = text_page(&[("D", &[Some("2024-01-31"), None])]);
        let e = SqlExpr::parse("CAST(D AS DATE)").unwrap();
        let (cols, failures) = evaluate(&page, &[("d".into(), e.expr)]).unwrap();
        assert!(failures.is_empty());
        let text: Vec<Option<String>> = as_text(&cols[0]).unwrap().iter().map(|v| v.map(String::from)).collect();
        assert_eq!(text, vec![Some("2024-01-31".to_string()), None]);
    }
}
