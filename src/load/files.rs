//! Files target: one snapshot file per table (`<dir>/<table>.parquet` or
//! `.csv`) holding the table's current state. A run's pages are merged by
//! key into the snapshot with Polars and written under a temp name in the
//! same directory, then atomically renamed over the old file: readers see
//! the old snapshot or the new one, never half of one.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::Utc;
use polars::prelude::*;

use super::merge::{MergePlan, STAGED_CURSOR as CURSOR_COLUMN, STAGED_DELETED as DELETED_COLUMN};
use super::{LoadCounts, LoadError, Target};
use crate::config::{DeleteMode, FileFormat};
use crate::hooks::{HookPoint, SharedHooks};
use crate::schema::cast::{parse_boolean, parse_date, parse_float, parse_integer, parse_time, parse_timestamp_ms};
use crate::schema::{ColumnType, LOADED_AT_COLUMN, MappedPage, RUN_ID_COLUMN, SOFT_DELETE_COLUMN, TargetSchema};
use crate::state::RunId;

pub struct FilesTarget {
    dir: PathBuf,
    format: FileFormat,
    table: String,
    #[allow(dead_code)]
    partition_by: Vec<String>,
    deletes: DeleteMode,
    hooks: SharedHooks,
    run: Option<RunPlan>,
}

struct RunPlan {
    run: RunId,
    schema: TargetSchema,
    /// The snapshot as it was when the run started (None: no file yet).
    snapshot: Option<DataFrame>,
    /// This run's mapped pages, merged at commit.
    pages: Vec<DataFrame>,
}

use crate::schema::values::dtype;

impl FilesTarget {
    pub fn open(
        dir: &Path,
        format: FileFormat,
        table: &str,
        partition_by: Vec<String>,
        hooks: SharedHooks,
    ) -> Result<FilesTarget, LoadError> {
        Ok(FilesTarget {
            dir: dir.to_path_buf(),
            format,
            table: table.to_string(),
            partition_by,
            deletes: DeleteMode::Ignore,
            hooks,
            run: None,
        })
    }

    fn name(&self) -> String {
        format!("files {}", self.path().display())
    }

    pub fn path(&self) -> PathBuf {
        let ext = match self.format {
            FileFormat::Parquet => "parquet",
            FileFormat::Csv => "csv",
        };
        self.dir.join(format!("{}.{ext}", self.table))
    }

    fn polars_err(&self) -> impl Fn(PolarsError) -> LoadError + use<> {
        let target = self.name();
        move |e| {
            let io = match &e {
                PolarsError::IO { error, .. } => Some(error.kind()),
                _ => None,
            };
            LoadError::Polars { target: target.clone(), op: "merging the snapshot", message: e.to_string(), io }
        }
    }

    fn io_err(&self, op: &'static str, path: PathBuf) -> impl Fn(std::io::Error) -> LoadError + use<> {
        let target = self.name();
        move |source| LoadError::Io { target: target.clone(), op, path: path.clone(), source }
    }

    fn soft(&self) -> bool {
        self.deletes == DeleteMode::Soft
    }

    fn temp_prefix(&self) -> String {
        format!(".{}.nightjar-", self.table)
    }

    /// A run killed between writing its temp file and the rename leaves the
    /// temp file behind; it was never visible under the snapshot's name.
    fn remove_stale_temp_files(&self) {
        let prefix = self.temp_prefix();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// The snapshot's columns, in order: mapped columns, `_deleted` (soft),
    /// run id, loaded-at.
    fn typed_layout(&self, schema: &TargetSchema) -> Vec<(String, ColumnType)> {
        let mut cols: Vec<(String, ColumnType)> = schema.columns.iter().map(|c| (c.name.clone(), c.ty)).collect();
        if self.soft() {
            cols.push((SOFT_DELETE_COLUMN.into(), ColumnType::Boolean));
        }
        cols.push((RUN_ID_COLUMN.into(), ColumnType::Integer));
        cols.push((LOADED_AT_COLUMN.into(), ColumnType::Timestamp));
        cols
    }

    fn layout(&self, schema: &TargetSchema) -> Vec<(String, DataType)> {
        self.typed_layout(schema).into_iter().map(|(n, t)| (n, dtype(t))).collect()
    }

    fn read_snapshot(&self, layout: &[(String, DataType)]) -> Result<DataFrame, LoadError> {
        let path = self.path();
        let perr = self.polars_err();
        match self.format {
            FileFormat::Parquet => {
                let file = File::open(&path).map_err(self.io_err("opening", path.clone()))?;
                ParquetReader::new(file).finish().map_err(perr)
            }
            FileFormat::Csv => read_csv(&path, layout).map_err(|message| LoadError::Polars {
                target: self.name(),
                op: "reading the CSV snapshot",
                message,
                io: None,
            }),
        }
    }

    fn write_snapshot(&self, frame: &mut DataFrame, layout: &[(String, ColumnType)]) -> Result<(), LoadError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io_err("creating the directory", self.dir.clone()))?;
        // Same directory, so the rename is atomic on one filesystem.
        let mut tmp = tempfile::Builder::new()
            .prefix(&self.temp_prefix())
            .tempfile_in(&self.dir)
            .map_err(self.io_err("creating a temp file in", self.dir.clone()))?;
        match self.format {
            FileFormat::Parquet => {
                ParquetWriter::new(tmp.as_file_mut()).finish(frame).map_err(self.polars_err())?;
            }
            FileFormat::Csv => write_csv(tmp.as_file_mut(), frame, layout).map_err(|message| LoadError::Polars {
                target: self.name(),
                op: "writing the CSV snapshot",
                message,
                io: None,
            })?,
        }
        tmp.as_file().sync_all().map_err(self.io_err("syncing", tmp.path().to_path_buf()))?;
        self.hooks.reached(HookPoint::BeforeCommit);
        let path = self.path();
        tmp.persist(&path).map_err(|e| self.io_err("renaming the new snapshot to", path.clone())(e.error))?;
        Ok(())
    }
}

/// Key of row `i` as one string (values joined by a unit separator).
fn row_key(columns: &[&Column], i: usize) -> Result<String, PolarsError> {
    let mut key = String::new();
    for (n, c) in columns.iter().enumerate() {
        if n > 0 {
            key.push('\u{1f}');
        }
        key.push_str(&c.get(i)?.to_string());
    }
    Ok(key)
}

#[async_trait]
impl Target for FilesTarget {
    async fn prepare(&mut self, merge: &MergePlan) -> Result<(), LoadError> {
        self.deletes = merge.deletes;
        let schema = &merge.schema;
        let run = merge.run;
        let layout = self.layout(schema);
        self.remove_stale_temp_files();
        let snapshot = if self.path().exists() {
            let mut old = self.read_snapshot(&layout)?;
            let existing: Vec<(String, String)> =
                old.columns().iter().map(|c| (c.name().to_string(), c.dtype().to_string())).collect();
            let evolution = merge.evolution(&self.name(), "file", &existing, |t| dtype(t).to_string())?;
            let added = evolution.add_columns.iter().map(|c| (c.name.clone(), dtype(c.ty)));
            let soft = evolution.add_soft_delete.then(|| (SOFT_DELETE_COLUMN.to_string(), DataType::Boolean));
            for (name, ty) in added.chain(soft) {
                let fill = if ty == DataType::Boolean && name == SOFT_DELETE_COLUMN {
                    Series::new(name.as_str().into(), vec![false; old.height()])
                } else {
                    Series::full_null(name.as_str().into(), old.height(), &ty)
                };
                old.with_column(fill.into_column()).map_err(self.polars_err())?;
            }
            let names: Vec<&str> = layout.iter().map(|(n, _)| n.as_str()).collect();
            Some(old.select(names).map_err(self.polars_err())?)
        } else if !merge.create {
            return Err(LoadError::Setup {
                target: self.name(),
                message: "the snapshot file does not exist and the job has `create = false`".into(),
            });
        } else {
            None
        };
        self.run = Some(RunPlan { run, schema: schema.clone(), snapshot, pages: Vec::new() });
        Ok(())
    }

    async fn stage(&mut self, page: MappedPage) -> Result<(), LoadError> {
        let name = self.name();
        let perr = self.polars_err();
        let plan = self
            .run
            .as_mut()
            .ok_or_else(|| LoadError::Internal { target: name, message: "stage before prepare".into() })?;
        let number = page.number;
        let mut frame = page.rows;
        if let Some(cursor) = page.cursor {
            frame.with_column(cursor.with_name(CURSOR_COLUMN.into()).into_series().into_column()).map_err(&perr)?;
        }
        if let Some(deleted) = page.deleted {
            frame.with_column(deleted.with_name(DELETED_COLUMN.into()).into_series().into_column()).map_err(&perr)?;
        }
        plan.pages.push(frame);
        self.hooks.reached(HookPoint::PageStaged(number));
        Ok(())
    }

    async fn commit(&mut self) -> Result<LoadCounts, LoadError> {
        let name = self.name();
        let plan = self
            .run
            .take()
            .ok_or_else(|| LoadError::Internal { target: name.clone(), message: "commit before prepare".into() })?;
        let perr = self.polars_err();
        let layout = self.layout(&plan.schema);
        let soft = self.soft();
        let deletes = self.deletes;

        // Newest row per key across all pages: highest cursor, then last to arrive.
        let mut incoming: Option<DataFrame> = None;
        for page in plan.pages {
            match incoming.as_mut() {
                None => incoming = Some(page),
                Some(df) => {
                    df.vstack_mut_owned(page).map_err(&perr)?;
                }
            }
        }
        let Some(incoming) = incoming.filter(|d| d.height() > 0) else {
            return Ok(LoadCounts::default());
        };
        let key_cols: Vec<&Column> =
            plan.schema.key.iter().map(|k| incoming.column(k)).collect::<Result<_, _>>().map_err(&perr)?;
        let cursor = incoming.column(CURSOR_COLUMN).ok().map(|c| c.to_physical_repr());
        let mut newest: HashMap<String, (Option<i64>, usize)> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        for i in 0..incoming.height() {
            let key = row_key(&key_cols, i).map_err(&perr)?;
            let c = match &cursor {
                Some(c) => c.get(i).map_err(&perr)?.extract::<i64>(),
                None => None,
            };
            match newest.get(&key) {
                Some((best, _)) if c < *best => {}
                Some(_) => {
                    newest.insert(key, (c, i));
                }
                None => {
                    order.push(key.clone());
                    newest.insert(key, (c, i));
                }
            }
        }
        let picked: Vec<IdxSize> = order.iter().map(|k| newest[k].1 as IdxSize).collect();
        let incoming = incoming.take(&IdxCa::from_vec("idx".into(), picked)).map_err(&perr)?;
        let flags: Vec<bool> = match incoming.column(DELETED_COLUMN) {
            Ok(c) => c.bool().map_err(&perr)?.iter().map(|v| v.unwrap_or(false)).collect(),
            Err(_) => vec![false; incoming.height()],
        };

        // Where each incoming key sits in the old snapshot.
        let old = plan.snapshot;
        let mut old_index: HashMap<String, usize> = HashMap::new();
        if let Some(old) = &old {
            let cols: Vec<&Column> =
                plan.schema.key.iter().map(|k| old.column(k)).collect::<Result<_, _>>().map_err(&perr)?;
            for i in 0..old.height() {
                old_index.insert(row_key(&cols, i).map_err(&perr)?, i);
            }
        }
        let compared: Vec<&str> = plan
            .schema
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .filter(|n| !plan.schema.key.iter().any(|k| k == n))
            .collect();
        let mut write_rows: Vec<IdxSize> = Vec::new();
        let mut drop_old: HashSet<usize> = HashSet::new();
        let mut counts = LoadCounts::default();
        let incoming_keys: Vec<&Column> =
            plan.schema.key.iter().map(|k| incoming.column(k)).collect::<Result<_, _>>().map_err(&perr)?;
        for (i, &deleted) in flags.iter().enumerate() {
            let key = row_key(&incoming_keys, i).map_err(&perr)?;
            let existing = old_index.get(&key).copied();
            if deleted && !soft {
                if deletes == DeleteMode::Hard
                    && let Some(o) = existing
                {
                    drop_old.insert(o);
                    counts.deleted += 1;
                }
                continue;
            }
            let changed = match (existing, &old) {
                (Some(o), Some(old)) => {
                    let mut differs = false;
                    for n in &compared {
                        let a = old.column(n).map_err(&perr)?.get(o).map_err(&perr)?;
                        let b = incoming.column(n).map_err(&perr)?.get(i).map_err(&perr)?;
                        if a != b {
                            differs = true;
                            break;
                        }
                    }
                    if soft && !differs {
                        let was = old.column(SOFT_DELETE_COLUMN).map_err(&perr)?.get(o).map_err(&perr)?;
                        differs = was != AnyValue::Boolean(deleted);
                    }
                    differs
                }
                _ => true,
            };
            if !changed {
                counts.unchanged += 1;
                continue;
            }
            if let Some(o) = existing {
                drop_old.insert(o);
            }
            write_rows.push(i as IdxSize);
            match (existing, soft && deleted) {
                (_, true) => counts.deleted += 1,
                (None, false) => counts.inserted += 1,
                (Some(_), false) => counts.updated += 1,
            }
        }
        if write_rows.is_empty() && drop_old.is_empty() {
            // Nothing changed: the file is left byte-for-byte as it was.
            return Ok(counts);
        }

        let height = write_rows.len();
        let rows = incoming.take(&IdxCa::from_vec("idx".into(), write_rows)).map_err(&perr)?;
        let loaded_at = Utc::now().timestamp_millis();
        let mut columns: Vec<Column> = Vec::with_capacity(layout.len());
        for (name, ty) in &layout {
            let column = match name.as_str() {
                SOFT_DELETE_COLUMN => {
                    let flags: Vec<bool> = match rows.column(DELETED_COLUMN) {
                        Ok(c) => c.bool().map_err(&perr)?.iter().map(|v| v.unwrap_or(false)).collect(),
                        Err(_) => vec![false; height],
                    };
                    Series::new(name.as_str().into(), flags).into_column()
                }
                RUN_ID_COLUMN => Series::new(name.as_str().into(), vec![plan.run; height]).into_column(),
                LOADED_AT_COLUMN => Series::new(name.as_str().into(), vec![loaded_at; height])
                    .into_datetime(TimeUnit::Milliseconds, None)
                    .into_column(),
                other => rows.column(other).map_err(&perr)?.cast(ty).map_err(&perr)?,
            };
            columns.push(column);
        }
        let new_rows = DataFrame::new(height, columns).map_err(&perr)?;
        let mut merged = match old {
            Some(old) => {
                let keep: Vec<bool> = (0..old.height()).map(|i| !drop_old.contains(&i)).collect();
                let mut kept = old.filter(&BooleanChunked::from_slice("keep".into(), &keep)).map_err(&perr)?;
                kept.vstack_mut_owned(new_rows).map_err(&perr)?;
                kept
            }
            None => new_rows,
        };
        merged.rechunk_mut();
        self.write_snapshot(&mut merged, &self.typed_layout(&plan.schema))?;
        Ok(counts)
    }

    async fn abort(&mut self) -> Result<(), LoadError> {
        // Nothing was written: staging lived in memory.
        self.run = None;
        Ok(())
    }
}

/// Writes a snapshot as CSV: a header row, null as an empty field, values
/// in their canonical text ([`Cell::to_text`](crate::schema::values::Cell::to_text)).
fn write_csv(file: &mut File, frame: &DataFrame, layout: &[(String, ColumnType)]) -> Result<(), String> {
    let mut writer = csv::Writer::from_writer(std::io::BufWriter::new(file));
    let names: Vec<&str> = layout.iter().map(|(n, _)| n.as_str()).collect();
    writer.write_record(&names).map_err(|e| e.to_string())?;
    let columns = crate::schema::values::typed_columns(frame, layout.iter().map(|(n, t)| (n.as_str(), *t)))?;
    let mut record: Vec<String> = Vec::with_capacity(columns.len());
    for i in 0..frame.height() {
        record.clear();
        record.extend(columns.iter().map(|c| c.get(i).to_text().map(|t| t.into_owned()).unwrap_or_default()));
        writer.write_record(&record).map_err(|e| e.to_string())?;
    }
    writer.flush().map_err(|e| e.to_string())
}

/// Reads a CSV snapshot back into the types of `layout`; columns the file
/// lacks are left out (the caller decides whether that is an error).
fn read_csv(path: &Path, layout: &[(String, DataType)]) -> Result<DataFrame, String> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| e.to_string())?;
    let headers: Vec<String> = reader.headers().map_err(|e| e.to_string())?.iter().map(str::to_string).collect();
    let mut raw: Vec<Vec<Option<String>>> = vec![Vec::new(); headers.len()];
    for record in reader.records() {
        let record = record.map_err(|e| e.to_string())?;
        for (col, value) in raw.iter_mut().zip(record.iter()) {
            col.push(if value.is_empty() { None } else { Some(value.to_string()) });
        }
    }
    let height = raw.first().map_or(0, Vec::len);
    let mut columns = Vec::new();
    for (name, values) in headers.iter().zip(raw) {
        let Some((_, ty)) = layout.iter().find(|(n, _)| n == name) else { continue };
        let parse_err = |e: String| format!("{}: column `{name}`: {e}", path.display());
        let name = PlSmallStr::from_str(name);
        let series = match ty {
            DataType::Int64 => Series::new(
                name,
                values
                    .iter()
                    .map(|v| v.as_deref().map(parse_integer).transpose())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(parse_err)?,
            ),
            DataType::Float64 => Series::new(
                name,
                values
                    .iter()
                    .map(|v| v.as_deref().map(parse_float).transpose())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(parse_err)?,
            ),
            DataType::Boolean => Series::new(
                name,
                values
                    .iter()
                    .map(|v| v.as_deref().map(parse_boolean).transpose())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(parse_err)?,
            ),
            DataType::Datetime(_, _) => Series::new(
                name,
                values
                    .iter()
                    .map(|v| v.as_deref().map(parse_timestamp_ms).transpose())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(parse_err)?,
            )
            .into_datetime(TimeUnit::Milliseconds, None),
            DataType::Date => Series::new(
                name,
                values
                    .iter()
                    .map(|v| v.as_deref().map(parse_date).transpose())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(parse_err)?,
            )
            .into_date(),
            DataType::Time => Series::new(
                name,
                values
                    .iter()
                    .map(|v| v.as_deref().map(parse_time).transpose())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(parse_err)?,
            )
            .into_time(),
            _ => Series::new(name, values),
        };
        columns.push(series.into_column());
    }
    DataFrame::new(height, columns).map_err(|e| e.to_string())
}
