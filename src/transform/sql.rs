//! SQL in mappings: computed columns (`sql = "..."`) and the row `filter`,
//! parsed and evaluated by Polars' own SQL support over the page's text
//! columns. We never parse SQL ourselves.

use polars::prelude::*;

use crate::schema::cast::{format_date, format_time, format_timestamp_ms};
use crate::schema::sql::clean_polars_message;

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
    // `validate` refuses aggregates and windows, which compute over the
    // page: a value per page would be silently wrong data. Should one get
    // here anyway, it fails rather than being spread over the rows.
    polars_bail!(ShapeMismatch: "the expression produced {} values for {} rows; it must give one value per row", out.height(), len)
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
    use crate::schema::SqlExpr;

    fn text_page(cols: &[(&str, &[Option<&str>])]) -> DataFrame {
        let height = cols[0].1.len();
        let columns = cols
            .iter()
            .map(|(name, values)| Series::new(PlSmallStr::from_str(name), values.to_vec()).into_column())
            .collect();
        DataFrame::new(height, columns).unwrap()
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
