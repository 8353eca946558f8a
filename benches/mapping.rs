//! Mapping benchmark: the cost of mapping one big results page (the
//! example job's mapping over N generated Accounts) next to the time Polars
//! needs to read the same CSV page. Issue 7's bar: mapping <= 2x the read.
//!
//! ```sh
//! cargo bench --bench mapping -- --rows 1000000
//! ```
//!
//! Prints the median of 3 runs of each step; no verdicts, ratios only.

use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use nightjar::config::Project;
use nightjar::salesforce::parse_csv_page;
use nightjar::sandbox::{Sandbox, SandboxConfig};
use nightjar::transform::Mapping;
use polars::prelude::*;

fn median(mut f: impl FnMut() -> Duration) -> Duration {
    let mut times: Vec<Duration> = (0..3).map(|_| f()).collect();
    times.sort();
    times[1]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let project = Project::load(&root.join("nightjar.toml")).expect("the example project loads");
    let job = project.job("accounts").expect("the example job exists");
    let fields: Vec<String> = job.source.fields.clone();
    let mapping = Mapping::new(job);

    // The page as the sandbox would send it: every value quoted, null empty.
    let clock = Instant::now();
    let sandbox = Sandbox::new(SandboxConfig { objects: vec![("Account".into(), rows)], ..SandboxConfig::default() })
        .expect("sandbox config");
    let mut writer = csv::WriterBuilder::new().quote_style(csv::QuoteStyle::Always).from_writer(Vec::new());
    writer.write_record(&fields).expect("header");
    for record in sandbox.records("Account").expect("Accounts") {
        let value =
            |name: &str| record.iter().find(|(f, _)| f == name).and_then(|(_, v)| v.clone()).unwrap_or_default();
        writer.write_record(fields.iter().map(|f| value(f))).expect("row");
    }
    let csv = writer.into_inner().expect("csv");
    drop(sandbox);
    eprintln!("generated {rows} rows, {:.0} MB of CSV in {:.1?}", csv.len() as f64 / 1e6, clock.elapsed());

    let polars_read = median(|| {
        let clock = Instant::now();
        let frame = CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(0))
            .into_reader_with_file_handle(Cursor::new(csv.as_slice()))
            .finish()
            .expect("Polars reads the page");
        assert_eq!(frame.height(), rows);
        clock.elapsed()
    });
    let mut page = None;
    let nightjar_parse = median(|| {
        let clock = Instant::now();
        let frame = parse_csv_page(&csv).expect("nightjar parses the page");
        let took = clock.elapsed();
        page = Some(frame);
        took
    });
    let page = page.expect("parsed");
    let mut out = None;
    let map = median(|| {
        let clock = Instant::now();
        let mapped = mapping.apply(1, &page).expect("the page maps");
        let took = clock.elapsed();
        out = Some(mapped);
        took
    });
    let out = out.expect("mapped");
    println!("rows                          {rows}");
    println!("CSV page                      {:.0} MB, {} columns", csv.len() as f64 / 1e6, fields.len());
    println!("Polars CSV read (all text)    {:.3} s", polars_read.as_secs_f64());
    println!("nightjar page parse           {:.3} s", nightjar_parse.as_secs_f64());
    println!(
        "nightjar mapping              {:.3} s  ({} loaded, {} rejected, {} filtered)",
        map.as_secs_f64(),
        out.page.height(),
        out.rejects.len(),
        out.rows_filtered
    );
    println!("mapping / Polars read         {:.2}x  (bar: <= 2x)", map.as_secs_f64() / polars_read.as_secs_f64());
}
