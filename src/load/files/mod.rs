//! Files target: a table's current state as a Parquet or CSV snapshot,
//! either one file (`<dir>/<table>.parquet` or `.csv`) or, with
//! `partition_by`, one file per partition value under `<dir>/<table>/` and a
//! manifest ([`partition`]).
//!
//! Memory follows the page size, not the table: a run's pages are staged as
//! Parquet files in a temp directory of the run inside the connection's
//! directory. The commit is a grace hash merge: the staged rows and the old
//! snapshot are spread over N buckets on disk by a hash of their key
//! *values* ([`spill`]), then each bucket is merged on its own ([`merge`]'s
//! rules) and written out, one bucket after another, to a new file under a
//! temp name that is fsynced and atomically renamed over the old one (for a
//! partitioned snapshot: new partition files, then the manifest). A killed
//! run leaves its temp files, which the next run of the table removes.

mod csv;
mod partition;
mod spill;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::Utc;
use polars::io::parquet::write::{BatchedWriter, ParquetCompression, StatisticsOptions};
use polars::prelude::*;
use tempfile::{NamedTempFile, TempDir};

use self::partition::{MANIFEST, Manifest, ManifestColumn, ManifestPartition, partition_name};
use self::spill::{
    KeyCell, Layout, RecordingFile, SpillError, SpillWriter, bucket_of, key_of, read_spill, read_spill_all, same,
};
use super::merge::{MergePlan, MergeTally, STAGED_CURSOR, STAGED_DELETED};
use super::{LoadCounts, LoadError, Target};
use crate::config::{DeleteMode, FileFormat};
use crate::hooks::{HookPoint, SharedHooks};
use crate::schema::values::{Cell, TypedColumn, dtype, typed_columns};
use crate::schema::{ColumnType, LOADED_AT_COLUMN, MappedPage, RUN_ID_COLUMN, SOFT_DELETE_COLUMN, TargetSchema};
use crate::state::RunId;

/// A bucket holds about this many rows (staged and old together), or the
/// largest page if that is bigger: the merge holds one bucket at a time.
const BUCKET_ROWS: u64 = 10_000;
/// At most this many buckets (each an open file while rows are spread).
const MAX_BUCKETS: u64 = 512;
/// Rows per batch when a file is read back to be written out.
const BATCH_ROWS: usize = 50_000;
/// Open partition spill files at most; more are closed and reopened.
const MAX_OPEN_PARTITIONS: usize = 64;

pub struct FilesTarget {
    /// `None` only while a blocking task holds it.
    core: Option<Core>,
    name: String,
}

/// The target's state, moved to the blocking pool for every call.
struct Core {
    name: String,
    dir: PathBuf,
    format: FileFormat,
    table: String,
    partition_by: Vec<String>,
    hooks: SharedHooks,
    run: Option<RunState>,
}

struct RunState {
    plan: MergePlan,
    /// The snapshot's columns: mapped, `_deleted` (soft), run id, loaded-at.
    layout: Layout,
    /// This run's staging and spill files; removed when dropped.
    temp: TempDir,
    old: OldSnapshot,
    pages: Vec<PathBuf>,
    staged_rows: u64,
    largest_page: u64,
}

/// The snapshot as the run found it.
enum OldSnapshot {
    None,
    Single { path: PathBuf, rows: u64 },
    Partitioned(Manifest),
}

impl FilesTarget {
    pub fn open(
        dir: &Path,
        format: FileFormat,
        table: &str,
        partition_by: Vec<String>,
        hooks: SharedHooks,
    ) -> Result<FilesTarget, LoadError> {
        let mut core = Core {
            name: String::new(),
            dir: dir.to_path_buf(),
            format,
            table: table.to_string(),
            partition_by,
            hooks,
            run: None,
        };
        core.name = format!("files {}", core.path().display());
        Ok(FilesTarget { name: core.name.clone(), core: Some(core) })
    }

    /// The snapshot file (unpartitioned) or directory (partitioned).
    pub fn path(&self) -> PathBuf {
        self.core.as_ref().map(Core::path).unwrap_or_default()
    }

    /// Runs `f` on the blocking pool: Parquet I/O and fsync stay off the
    /// async workers. A panic in `f` is resumed here, as if it happened in
    /// the caller.
    async fn blocking<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Core) -> Result<T, LoadError> + Send + 'static,
    ) -> Result<T, LoadError> {
        let mut core = self.core.take().ok_or_else(|| LoadError::Internal {
            target: self.name.clone(),
            message: "a previous call to the target panicked".into(),
        })?;
        let joined = tokio::task::spawn_blocking(move || {
            let result = f(&mut core);
            (core, result)
        })
        .await;
        match joined {
            Ok((core, result)) => {
                self.core = Some(core);
                result
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                Err(LoadError::Internal { target: self.name.clone(), message: format!("a file task stopped: {e}") })
            }
        }
    }
}

#[async_trait]
impl Target for FilesTarget {
    async fn prepare(&mut self, plan: &MergePlan) -> Result<(), LoadError> {
        let plan = plan.clone();
        self.blocking(move |core| core.prepare(plan)).await
    }

    async fn stage(&mut self, page: MappedPage) -> Result<(), LoadError> {
        self.blocking(move |core| core.stage(page)).await
    }

    async fn commit(&mut self) -> Result<LoadCounts, LoadError> {
        self.blocking(Core::commit).await
    }

    async fn abort(&mut self) -> Result<(), LoadError> {
        // Staging lives in the run's temp directory, removed with it.
        self.blocking(|core| {
            core.run = None;
            Ok(())
        })
        .await
    }
}

fn extension(format: FileFormat) -> &'static str {
    match format {
        FileFormat::Parquet => "parquet",
        FileFormat::Csv => "csv",
    }
}

fn format_from(name: &str) -> Option<FileFormat> {
    match name {
        "parquet" => Some(FileFormat::Parquet),
        "csv" => Some(FileFormat::Csv),
        _ => None,
    }
}

/// Fsyncs a directory, so a rename in it survives a power cut.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Core {
    fn path(&self) -> PathBuf {
        if self.partition_by.is_empty() {
            self.dir.join(format!("{}.{}", self.table, extension(self.format)))
        } else {
            self.dir.join(&self.table)
        }
    }

    fn single_path(&self) -> PathBuf {
        self.dir.join(format!("{}.{}", self.table, extension(self.format)))
    }

    fn table_dir(&self) -> PathBuf {
        self.dir.join(&self.table)
    }

    fn io_err(&self, op: &'static str, path: &Path) -> impl Fn(std::io::Error) -> LoadError + use<> {
        let (target, path) = (self.name.clone(), path.to_path_buf());
        move |source| LoadError::Io { target: target.clone(), op, path: path.clone(), source }
    }

    /// A Polars error while reading or writing `path`: the I/O error under
    /// it (seen by `recorder`, or wrapped by Polars) when there is one.
    fn polars_err(
        &self,
        op: &'static str,
        path: &Path,
        recorder: Option<&RecordingFile>,
    ) -> impl Fn(PolarsError) -> LoadError + use<> {
        let (target, path, recorder) = (self.name.clone(), path.to_path_buf(), recorder.cloned());
        move |e| {
            let io = recorder.as_ref().and_then(RecordingFile::take_error).or_else(|| match &e {
                PolarsError::IO { error, .. } => Some(match error.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(error.kind(), error.to_string()),
                }),
                _ => None,
            });
            match io {
                Some(source) => LoadError::Io { target: target.clone(), op, path: path.clone(), source },
                None => LoadError::Polars { target: target.clone(), op, message: e.to_string(), io: None },
            }
        }
    }

    fn spill_err(&self, op: &'static str, path: &Path) -> impl Fn(SpillError) -> LoadError + use<> {
        let io = self.io_err(op, path);
        let polars = self.polars_err(op, path, None);
        move |e| match e {
            SpillError::Io(e) => io(e),
            SpillError::Polars(e) => polars(e),
        }
    }

    fn csv_err(&self, op: &'static str, path: &Path) -> impl Fn(csv::CsvError) -> LoadError + use<> {
        let io = self.io_err(op, path);
        let (target, path) = (self.name.clone(), path.to_path_buf());
        move |e| match e {
            csv::CsvError::Io(e) => io(e),
            csv::CsvError::Data(message) => LoadError::Polars {
                target: target.clone(),
                op,
                message: format!("{}: {message}", path.display()),
                io: None,
            },
        }
    }

    fn internal(&self, message: &str) -> LoadError {
        LoadError::Internal { target: self.name.clone(), message: message.into() }
    }

    fn temp_prefix(&self) -> String {
        format!(".{}.nightjar-", self.table)
    }

    /// A run killed before its rename leaves its temp files and run
    /// directory behind (never visible under the snapshot's name), and for a
    /// partitioned snapshot, partition files no manifest lists.
    fn remove_stale_files(&self, manifest: Option<&Manifest>) {
        let prefix = self.temp_prefix();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let path = entry.path();
                let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            }
        }
        if self.partition_by.is_empty() {
            return;
        }
        let listed: HashSet<&str> =
            manifest.map(|m| m.partitions.iter().map(|p| p.file.as_str()).collect()).unwrap_or_default();
        for entry in std::fs::read_dir(self.table_dir()).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(".parquet") || name.ends_with(".csv") || name.starts_with("._manifest");
            if ours && !listed.contains(name.as_str()) && entry.path().is_file() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The snapshot's columns: mapped, `_deleted` (soft), run id, loaded-at.
    fn layout(schema: &TargetSchema, soft: bool) -> Layout {
        let mut cols: Layout = schema.columns.iter().map(|c| (c.name.clone(), c.ty)).collect();
        if soft {
            cols.push((SOFT_DELETE_COLUMN.into(), ColumnType::Boolean));
        }
        cols.push((RUN_ID_COLUMN.into(), ColumnType::Integer));
        cols.push((LOADED_AT_COLUMN.into(), ColumnType::Timestamp));
        cols
    }

    /// Staged pages: the mapped columns, each row's cursor and deleted flag.
    fn staged_layout(schema: &TargetSchema) -> Layout {
        let mut cols: Layout = schema.columns.iter().map(|c| (c.name.clone(), c.ty)).collect();
        cols.push((STAGED_CURSOR.into(), ColumnType::Integer));
        cols.push((STAGED_DELETED.into(), ColumnType::Boolean));
        cols
    }

    fn prepare(&mut self, plan: MergePlan) -> Result<(), LoadError> {
        self.run = None;
        let layout = Self::layout(&plan.schema, plan.soft());
        let manifest_path = self.table_dir().join(MANIFEST);
        let manifest = Manifest::read(&manifest_path).map_err(|message| LoadError::Setup {
            target: self.name.clone(),
            message: format!("{} does not read: {message}", manifest_path.display()),
        })?;
        let setup = |message: String| LoadError::Setup { target: self.name.clone(), message };
        let (old, existing) = if self.partition_by.is_empty() {
            if manifest.is_some() {
                return Err(setup(format!(
                    "{} holds a partitioned snapshot but the job has no `partition_by`; set it as before, or move the directory away",
                    self.table_dir().display()
                )));
            }
            self.remove_stale_files(None);
            let path = self.single_path();
            if path.exists() {
                let (existing, rows) = self.describe_file(&path, self.format, &layout)?;
                (OldSnapshot::Single { path, rows }, Some(existing))
            } else {
                (OldSnapshot::None, None)
            }
        } else {
            if self.single_path().exists() {
                return Err(setup(format!(
                    "{} is an unpartitioned snapshot but the job has `partition_by`; remove `partition_by`, or move the file away",
                    self.single_path().display()
                )));
            }
            self.remove_stale_files(manifest.as_ref());
            match manifest {
                Some(m) if m.partition_by != self.partition_by || format_from(&m.format) != Some(self.format) => {
                    return Err(setup(format!(
                        "the snapshot is partitioned by {:?} as {}, the job says {:?} as {}; change the job back, or move {} away",
                        m.partition_by,
                        m.format,
                        self.partition_by,
                        extension(self.format),
                        self.table_dir().display()
                    )));
                }
                Some(m) => {
                    let existing = m.columns.iter().map(|c| (c.name.clone(), c.ty.clone())).collect();
                    (OldSnapshot::Partitioned(m), Some(existing))
                }
                None => (OldSnapshot::None, None),
            }
        };
        match existing {
            Some(existing) => {
                // Added columns are filled as each old row is read (`conform`).
                plan.evolution(&self.name, "file", &existing, |t| dtype(t).to_string())?;
            }
            None if !plan.create => {
                return Err(setup("the snapshot does not exist and the job has `create = false`".into()));
            }
            None => {}
        }
        std::fs::create_dir_all(&self.dir).map_err(self.io_err("creating the directory", &self.dir))?;
        let temp = tempfile::Builder::new()
            .prefix(&self.temp_prefix())
            .tempdir_in(&self.dir)
            .map_err(self.io_err("creating the run's temp directory in", &self.dir))?;
        self.run = Some(RunState { plan, layout, temp, old, pages: Vec::new(), staged_rows: 0, largest_page: 0 });
        Ok(())
    }

    /// An existing single-file snapshot's columns (name, Polars type) and
    /// row count (for CSV, an upper bound: its line count).
    fn describe_file(
        &self,
        path: &Path,
        format: FileFormat,
        layout: &Layout,
    ) -> Result<(Vec<(String, String)>, u64), LoadError> {
        let file = File::open(path).map_err(self.io_err("opening", path))?;
        match format {
            FileFormat::Parquet => {
                let perr = self.polars_err("reading the snapshot", path, None);
                let mut reader = ParquetReader::new(file);
                let rows = reader.num_rows().map_err(&perr)? as u64;
                let empty = reader.with_slice(Some((0, 0))).finish().map_err(&perr)?;
                let existing = empty.columns().iter().map(|c| (c.name().to_string(), c.dtype().to_string())).collect();
                Ok((existing, rows))
            }
            FileFormat::Csv => {
                let snapshot =
                    csv::CsvSnapshot::open(BufReader::new(file)).map_err(self.csv_err("reading the snapshot", path))?;
                let existing = snapshot
                    .headers
                    .iter()
                    .map(|h| {
                        let ty = layout.iter().find(|(n, _)| n == h).map_or(DataType::String, |(_, t)| dtype(*t));
                        (h.clone(), ty.to_string())
                    })
                    .collect();
                let rows = count_lines(path).map_err(self.io_err("reading", path))?;
                Ok((existing, rows))
            }
        }
    }

    fn stage(&mut self, page: MappedPage) -> Result<(), LoadError> {
        let run = self
            .run
            .as_mut()
            .ok_or_else(|| LoadError::Internal { target: self.name.clone(), message: "stage before prepare".into() })?;
        let number = page.number;
        let height = page.height();
        let path = run.temp.path().join(format!("page-{:06}.parquet", run.pages.len() + 1));
        let deleted = page.deleted_mask();
        let mut frame = page.rows;
        let cursor = page.cursor.unwrap_or_else(|| Int64Chunked::full_null("c".into(), height));
        let pushed = frame
            .with_column(cursor.with_name(STAGED_CURSOR.into()).into_series().into_column())
            .and_then(|f| f.with_column(deleted.with_name(STAGED_DELETED.into()).into_series().into_column()))
            .map(|_| ());
        let name = self.name.clone();
        pushed.map_err(|e| LoadError::Polars {
            target: name,
            op: "staging a page",
            message: e.to_string(),
            io: None,
        })?;
        let file = File::create(&path).map_err(self.io_err("creating", &path))?;
        let recorder = RecordingFile::new(file);
        let perr = self.polars_err("writing the staged page", &path, Some(&recorder));
        frame.rechunk_mut();
        // Single-threaded, here and below: one page at a time is the memory
        // bound, not one page per thread.
        ParquetWriter::new(recorder.clone())
            .set_parallel(false)
            .with_compression(ParquetCompression::Lz4Raw)
            .with_statistics(StatisticsOptions::empty())
            .finish(&mut frame)
            .map_err(perr)?;
        recorder.finish().map_err(self.io_err("writing", &path))?;
        let internal = self.internal("the run is gone");
        let run = self.run.as_mut().ok_or(internal)?;
        run.pages.push(path);
        run.staged_rows += height as u64;
        run.largest_page = run.largest_page.max(height as u64);
        self.hooks.reached(HookPoint::PageStaged(number));
        Ok(())
    }

    fn commit(&mut self) -> Result<LoadCounts, LoadError> {
        let run = self.run.take().ok_or_else(|| self.internal("commit before prepare"))?;
        if run.staged_rows == 0 {
            return Ok(LoadCounts::default());
        }
        let old_rows = match &run.old {
            OldSnapshot::None => 0,
            OldSnapshot::Single { rows, .. } => *rows,
            OldSnapshot::Partitioned(m) => m.rows,
        };
        let per_bucket = BUCKET_ROWS.max(run.largest_page);
        let buckets = (run.staged_rows + old_rows).div_ceil(per_bucket).clamp(1, MAX_BUCKETS) as usize;
        let staged_layout = Self::staged_layout(&run.plan.schema);
        let key: Vec<(String, ColumnType)> = run
            .plan
            .schema
            .key
            .iter()
            .map(|k| run.plan.schema.column(k).map(|c| (k.clone(), c.ty)))
            .collect::<Option<_>>()
            .ok_or_else(|| self.internal("a key column is not in the schema"))?;

        // 1. Spread the staged rows and the old snapshot over the buckets.
        let staged = self.spread(&run, "staged", buckets, &key, &staged_layout, |core, each| {
            for page in &run.pages {
                let perr = core.polars_err("reading the staged page", page, None);
                let file = File::open(page).map_err(core.io_err("opening", page))?;
                let frame = ParquetReader::new(file).read_parallel(ParallelStrategy::None).finish().map_err(perr)?;
                each(frame)?;
            }
            Ok(())
        })?;
        let old = self.spread(&run, "old", buckets, &key, &run.layout, |core, each| core.each_old_batch(&run, each))?;

        // 2. Merge bucket by bucket into the new snapshot.
        let loaded_at = Utc::now().timestamp_millis();
        let mut tally = MergeTally::default();
        let mut sink = if self.partition_by.is_empty() {
            Sink::Single {
                writer: self.snapshot_writer(&self.dir, &self.temp_prefix(), "", &run.layout)?,
                changed: false,
            }
        } else {
            Sink::Partitioned(PartitionSpills::new(run.temp.path().join("partitions"), &self.partition_by))
        };
        for b in 0..buckets {
            let (sp, op) = (&staged[b], &old[b]);
            let s = read_spill_all(sp, &staged_layout).map_err(self.spill_err("reading", sp))?;
            let o = read_spill_all(op, &run.layout).map_err(self.spill_err("reading", op))?;
            let merged = merge_bucket(&run.plan, &run.layout, &s, &o, run.plan.run, loaded_at, &mut tally)
                .map_err(|e| self.polars_err("merging the snapshot", sp, None)(e))?;
            drop((s, o));
            match &mut sink {
                Sink::Single { writer, changed } => {
                    *changed |= merged.changed;
                    writer.write(self, merged.output)?;
                }
                Sink::Partitioned(spills) => {
                    // A partition that loses a row is touched as well as one that gains one.
                    let lost = partition_names(&merged.dropped, &self.partition_by, &run.layout)
                        .map_err(|m| self.internal(&m))?;
                    spills.touched.extend(lost);
                    spills.write(self, &merged.output, &run.layout, merged.new_from)?;
                }
            }
            let _ = std::fs::remove_file(sp);
            let _ = std::fs::remove_file(op);
        }
        let counts = tally.counts();

        // 3. Make the new snapshot visible, atomically.
        match sink {
            Sink::Single { writer, changed } => {
                if !changed {
                    // Nothing changed: the file is left byte-for-byte as it was.
                    return Ok(counts);
                }
                let tmp = writer.finish(self)?;
                self.hooks.reached(HookPoint::BeforeCommit);
                let path = self.single_path();
                tmp.persist(&path).map_err(|e| self.io_err("renaming the new snapshot to", &path)(e.error))?;
                sync_dir(&self.dir).map_err(self.io_err("syncing the directory", &self.dir))?;
            }
            Sink::Partitioned(spills) => self.publish_partitions(&run, spills)?,
        }
        Ok(counts)
    }

    /// Spreads the rows `source` yields over `buckets` spill files by the
    /// hash of their key; returns the files' paths (a bucket with no rows
    /// has a path but no file).
    fn spread(
        &self,
        run: &RunState,
        side: &str,
        buckets: usize,
        key: &[(String, ColumnType)],
        layout: &Layout,
        source: impl FnOnce(&Core, &mut dyn FnMut(DataFrame) -> Result<(), LoadError>) -> Result<(), LoadError>,
    ) -> Result<Vec<PathBuf>, LoadError> {
        let paths: Vec<PathBuf> = (0..buckets).map(|b| run.temp.path().join(format!("{side}-{b:04}.rows"))).collect();
        let mut writers: Vec<Option<SpillWriter>> = (0..buckets).map(|_| None).collect();
        let mut each = |frame: DataFrame| -> Result<(), LoadError> {
            let columns =
                typed_columns(&frame, layout.iter().map(|(n, t)| (n.as_str(), *t))).map_err(|m| self.internal(&m))?;
            let keys =
                typed_columns(&frame, key.iter().map(|(n, t)| (n.as_str(), *t))).map_err(|m| self.internal(&m))?;
            for i in 0..frame.height() {
                let b = if buckets == 1 { 0 } else { bucket_of(&keys, i, buckets) };
                if writers[b].is_none() {
                    let opened =
                        SpillWriter::append_to(&paths[b]).map_err(|e| self.io_err("creating", &paths[b])(e))?;
                    writers[b] = Some(opened);
                }
                let writer = writers[b].as_mut().ok_or_else(|| self.internal("a bucket file is not open"))?;
                writer.append(&columns, i).map_err(|e| self.io_err("writing", &paths[b])(e))?;
            }
            Ok(())
        };
        source(self, &mut each)?;
        for w in writers.into_iter().flatten() {
            let path = w.path.clone();
            w.finish().map_err(self.io_err("writing", &path))?;
        }
        Ok(paths)
    }

    /// Every row of the old snapshot, in batches, in the run's layout.
    fn each_old_batch(
        &self,
        run: &RunState,
        each: &mut dyn FnMut(DataFrame) -> Result<(), LoadError>,
    ) -> Result<(), LoadError> {
        match &run.old {
            OldSnapshot::None => Ok(()),
            OldSnapshot::Single { path, .. } => self.each_file_batch(path, self.format, &run.layout, each),
            OldSnapshot::Partitioned(m) => {
                for p in &m.partitions {
                    self.each_file_batch(&self.table_dir().join(&p.file), self.format, &run.layout, each)?;
                }
                Ok(())
            }
        }
    }

    fn each_file_batch(
        &self,
        path: &Path,
        format: FileFormat,
        layout: &Layout,
        each: &mut dyn FnMut(DataFrame) -> Result<(), LoadError>,
    ) -> Result<(), LoadError> {
        let open = || File::open(path).map_err(self.io_err("opening", path));
        let perr = self.polars_err("reading the snapshot", path, None);
        match format {
            FileFormat::Parquet => {
                let mut reader = ParquetReader::new(open()?);
                let metadata = reader.get_metadata().map_err(&perr)?.clone();
                let mut offset = 0;
                // One row group at a time: a snapshot nightjar wrote has one per bucket.
                for group in &metadata.row_groups {
                    let rows = group.num_rows();
                    let mut reader = ParquetReader::new(open()?);
                    reader.set_metadata(metadata.clone());
                    // Over row groups, not none: only that strategy skips
                    // the groups outside the slice instead of decoding them.
                    let frame = reader
                        .read_parallel(ParallelStrategy::RowGroups)
                        .with_slice(Some((offset, rows)))
                        .finish()
                        .map_err(&perr)?;
                    offset += rows;
                    each(conform(frame, layout).map_err(&perr)?)?;
                }
                Ok(())
            }
            FileFormat::Csv => {
                let cerr = self.csv_err("reading the snapshot", path);
                let mut snapshot = csv::CsvSnapshot::open(BufReader::new(open()?)).map_err(&cerr)?;
                while let Some(frame) = snapshot.next_batch(layout, BATCH_ROWS).map_err(&cerr)? {
                    each(conform(frame, layout).map_err(&perr)?)?;
                }
                Ok(())
            }
        }
    }

    /// A writer of a new snapshot file in `dir`, named `<prefix>XXXXXX<suffix>`.
    fn snapshot_writer(
        &self,
        dir: &Path,
        prefix: &str,
        suffix: &str,
        layout: &Layout,
    ) -> Result<SnapshotWriter, LoadError> {
        std::fs::create_dir_all(dir).map_err(self.io_err("creating the directory", dir))?;
        // Same directory as the snapshot, so the rename is atomic.
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .suffix(suffix)
            .tempfile_in(dir)
            .map_err(self.io_err("creating a temp file in", dir))?;
        let file = tmp.as_file().try_clone().map_err(self.io_err("opening", tmp.path()))?;
        let recorder = RecordingFile::new(file);
        let kind = match self.format {
            FileFormat::Parquet => {
                let schema: Schema =
                    layout.iter().map(|(n, t)| Field::new(PlSmallStr::from_str(n), dtype(*t))).collect();
                let writer = ParquetWriter::new(recorder.clone())
                    .set_parallel(false)
                    .batched(&schema)
                    .map_err(self.polars_err("writing", tmp.path(), Some(&recorder)))?;
                WriterKind::Parquet(Box::new(writer))
            }
            FileFormat::Csv => {
                let mut out = recorder.clone();
                csv::write_header(&mut out, layout).map_err(self.io_err("writing", tmp.path()))?;
                WriterKind::Csv(out)
            }
        };
        Ok(SnapshotWriter { tmp, recorder, kind, layout: layout.clone(), rows: 0 })
    }

    /// Writes the touched partitions' new files, then the manifest (the
    /// commit point), then removes the files it replaced.
    fn publish_partitions(&self, run: &RunState, mut spills: PartitionSpills) -> Result<(), LoadError> {
        spills.close_all(self)?;
        let columns: Vec<ManifestColumn> =
            run.layout.iter().map(|(n, t)| ManifestColumn { name: n.clone(), ty: dtype(*t).to_string() }).collect();
        let old = match &run.old {
            OldSnapshot::Partitioned(m) => {
                if m.columns != columns {
                    // Schema evolution: every file must have the new columns.
                    spills.touched.extend(m.partitions.iter().map(|p| p.name.clone()));
                }
                m.partitions.clone()
            }
            _ => Vec::new(),
        };
        if spills.touched.is_empty() {
            // Nothing changed: every file and the manifest stay as they were.
            return Ok(());
        }
        let table_dir = self.table_dir();
        let mut partitions: Vec<ManifestPartition> =
            old.iter().filter(|p| !spills.touched.contains(&p.name)).cloned().collect();
        let mut touched: Vec<&String> = spills.touched.iter().collect();
        touched.sort();
        for name in touched {
            let Some(spill) = spills.partitions.get(name) else { continue };
            let prefix = format!("{name}.{}.", run.plan.run);
            let mut writer =
                self.snapshot_writer(&table_dir, &prefix, &format!(".{}", extension(self.format)), &run.layout)?;
            read_spill(&spill.path, &run.layout, BATCH_ROWS, self.spill_err("reading", &spill.path), |frame| {
                writer.write(self, frame)
            })?;
            let rows = writer.rows;
            if rows == 0 {
                continue;
            }
            let tmp = writer.finish(self)?;
            let (_, path) = tmp.keep().map_err(|e| self.io_err("keeping", &table_dir)(e.error))?;
            let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            partitions.push(ManifestPartition {
                name: name.clone(),
                values: spill.values.clone(),
                file,
                rows,
                run: run.plan.run,
            });
        }
        partitions.sort_by(|a, b| a.name.cmp(&b.name));
        let manifest = Manifest {
            table: self.table.clone(),
            format: extension(self.format).into(),
            partition_by: self.partition_by.clone(),
            run: run.plan.run,
            rows: partitions.iter().map(|p| p.rows).sum(),
            columns,
            partitions,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| self.internal(&e.to_string()))?;
        let mut tmp = tempfile::Builder::new()
            .prefix("._manifest.")
            .tempfile_in(&table_dir)
            .map_err(self.io_err("creating a temp file in", &table_dir))?;
        use std::io::Write as _;
        tmp.write_all(&json).map_err(self.io_err("writing", tmp.path()))?;
        tmp.as_file().sync_all().map_err(self.io_err("syncing", tmp.path()))?;
        // Partition files are in place; the run becomes visible with the manifest.
        sync_dir(&table_dir).map_err(self.io_err("syncing the directory", &table_dir))?;
        self.hooks.reached(HookPoint::BeforeCommit);
        let path = table_dir.join(MANIFEST);
        tmp.persist(&path).map_err(|e| self.io_err("renaming the new manifest to", &path)(e.error))?;
        sync_dir(&table_dir).map_err(self.io_err("syncing the directory", &table_dir))?;
        let listed: HashSet<&str> = manifest.partitions.iter().map(|p| p.file.as_str()).collect();
        for p in &old {
            if !listed.contains(p.file.as_str()) {
                let _ = std::fs::remove_file(table_dir.join(&p.file));
            }
        }
        Ok(())
    }
}

/// An upper bound of a CSV file's rows: its line count.
fn count_lines(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut lines = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
}

/// `frame` (read from an old snapshot) with exactly `layout`'s columns, in
/// order and type: columns added by schema evolution are null (`_deleted`
/// false), columns the mapping no longer has are left out.
fn conform(frame: DataFrame, layout: &Layout) -> PolarsResult<DataFrame> {
    let height = frame.height();
    let mut columns = Vec::with_capacity(layout.len());
    for (name, ty) in layout {
        let want = dtype(*ty);
        let column = match frame.column(name) {
            Ok(c) if c.dtype() == &want => c.clone(),
            Ok(c) => c.cast(&want)?,
            Err(_) if name == SOFT_DELETE_COLUMN => {
                Series::new(PlSmallStr::from_str(name), vec![false; height]).into_column()
            }
            Err(_) => Series::full_null(PlSmallStr::from_str(name), height, &want).into_column(),
        };
        columns.push(column);
    }
    DataFrame::new(height, columns)
}

/// What one bucket's merge produced.
struct BucketMerge {
    /// The bucket's rows of the new snapshot: kept old rows, then written rows.
    output: DataFrame,
    /// Anything written or removed.
    changed: bool,
    /// The old rows the merge replaced or removed.
    dropped: DataFrame,
    /// Where in `output` the written rows start.
    new_from: usize,
}

/// The merge of one bucket, by [`merge`](super::merge)'s rules: the
/// newest staged row per key, deletes, change detection by value, counts.
fn merge_bucket(
    plan: &MergePlan,
    layout: &Layout,
    staged: &DataFrame,
    old: &DataFrame,
    run: RunId,
    loaded_at: i64,
    tally: &mut MergeTally,
) -> PolarsResult<BucketMerge> {
    let schema = &plan.schema;
    let bad = |m: String| PolarsError::ComputeError(m.into());
    let key: Vec<(&str, ColumnType)> =
        schema.key.iter().filter_map(|k| schema.column(k)).map(|c| (c.name.as_str(), c.ty)).collect();
    let value_cols: Vec<(&str, ColumnType)> = schema.value_columns().map(|c| (c.name.as_str(), c.ty)).collect();
    let s_keys = typed_columns(staged, key.iter().copied()).map_err(bad)?;
    let s_values = typed_columns(staged, value_cols.iter().copied()).map_err(bad)?;
    let s_cursor = TypedColumn::of(staged.column(STAGED_CURSOR)?, ColumnType::Integer).map_err(bad)?;
    let s_deleted = TypedColumn::of(staged.column(STAGED_DELETED)?, ColumnType::Boolean).map_err(bad)?;
    let o_keys = typed_columns(old, key.iter().copied()).map_err(bad)?;
    let o_values = typed_columns(old, value_cols.iter().copied()).map_err(bad)?;
    let o_soft = match plan.soft() {
        true => Some(TypedColumn::of(old.column(SOFT_DELETE_COLUMN)?, ColumnType::Boolean).map_err(bad)?),
        false => None,
    };

    // Rule 1: the newest row per key; highest cursor (a cursor beats none),
    // then the later arrival.
    let mut newest: HashMap<Vec<KeyCell>, (Option<i64>, usize)> = HashMap::with_capacity(staged.height());
    for i in 0..staged.height() {
        let cursor = match s_cursor.get(i) {
            Cell::Integer(v) => Some(v),
            _ => None,
        };
        newest
            .entry(key_of(&s_keys, i))
            .and_modify(|best| {
                if cursor >= best.0 {
                    *best = (cursor, i);
                }
            })
            .or_insert((cursor, i));
    }
    let mut old_at: HashMap<Vec<KeyCell>, usize> = HashMap::with_capacity(old.height());
    for o in 0..old.height() {
        old_at.insert(key_of(&o_keys, o), o);
    }
    let mut picked: Vec<(usize, Option<usize>)> =
        newest.into_iter().map(|(key, (_, i))| (i, old_at.get(&key).copied())).collect();
    drop(old_at);
    picked.sort_unstable();

    let mut dropped = vec![false; old.height()];
    let mut written: Vec<IdxSize> = Vec::new();
    for (i, existing) in picked {
        let deleted = s_deleted.get(i) == Cell::Boolean(true);
        // Rule 2.
        if !plan.writes(deleted) {
            if plan.deletes == DeleteMode::Hard
                && let Some(o) = existing
            {
                dropped[o] = true;
                tally.hard_deleted += 1;
            }
            continue;
        }
        tally.considered += 1;
        // Rule 3, by value, nulls equal to each other.
        let changed = match existing {
            None => true,
            Some(o) => {
                s_values.iter().zip(&o_values).any(|(s, v)| !same(s.get(i), v.get(o)))
                    || o_soft.is_some_and(|f| f.get(o) != Cell::Boolean(deleted))
            }
        };
        if !changed {
            continue;
        }
        tally.written += 1;
        if plan.soft() && deleted {
            tally.written_deleted += 1;
        } else if existing.is_none() {
            tally.written_new_live += 1;
        }
        if let Some(o) = existing {
            dropped[o] = true;
        }
        written.push(i as IdxSize);
    }

    let changed = !written.is_empty() || dropped.iter().any(|d| *d);
    let dropped_rows: Vec<IdxSize> =
        dropped.iter().enumerate().filter(|(_, d)| **d).map(|(o, _)| o as IdxSize).collect();
    let dropped_rows = old.take(&IdxCa::from_vec("idx".into(), dropped_rows))?;
    let keep = BooleanChunked::from_iter_values("keep".into(), dropped.iter().map(|d| !*d));
    let mut output = old.filter(&keep)?;
    let new_from = output.height();
    if !written.is_empty() {
        let height = written.len();
        let rows = staged.take(&IdxCa::from_vec("idx".into(), written))?;
        let mut columns: Vec<Column> = Vec::with_capacity(layout.len());
        for (name, ty) in layout {
            let column = match name.as_str() {
                // Staged flags are never null (`MappedPage::deleted_mask`).
                SOFT_DELETE_COLUMN => rows
                    .column(STAGED_DELETED)?
                    .as_materialized_series()
                    .clone()
                    .with_name(name.as_str().into())
                    .into_column(),
                RUN_ID_COLUMN => Series::new(name.as_str().into(), vec![run; height]).into_column(),
                LOADED_AT_COLUMN => Series::new(name.as_str().into(), vec![loaded_at; height])
                    .into_datetime(TimeUnit::Milliseconds, None)
                    .into_column(),
                other => rows.column(other)?.cast(&dtype(*ty))?,
            };
            columns.push(column);
        }
        output.vstack_mut_owned(DataFrame::new(height, columns)?)?;
    }
    output.rechunk_mut();
    Ok(BucketMerge { output, changed, dropped: dropped_rows, new_from })
}

/// The partition name of every row of `frame`.
fn partition_names(frame: &DataFrame, partition_by: &[String], layout: &Layout) -> Result<Vec<String>, String> {
    let columns: Vec<(&str, ColumnType)> = partition_by
        .iter()
        .map(|p| layout.iter().find(|(n, _)| n == p).map(|(n, t)| (n.as_str(), *t)).ok_or(format!("no column `{p}`")))
        .collect::<Result<_, _>>()?;
    let typed = typed_columns(frame, columns)?;
    Ok((0..frame.height())
        .map(|i| {
            let texts: Vec<Option<std::borrow::Cow<'_, str>>> = typed.iter().map(|c| c.get(i).to_text()).collect();
            let values: Vec<Option<&str>> = texts.iter().map(|t| t.as_deref()).collect();
            partition_name(partition_by, &values)
        })
        .collect())
}

/// Where merged buckets go.
enum Sink {
    /// One new snapshot file; `changed` once any bucket changed.
    Single {
        writer: SnapshotWriter,
        changed: bool,
    },
    Partitioned(PartitionSpills),
}

/// A new snapshot file being written, batch after batch.
struct SnapshotWriter {
    tmp: NamedTempFile,
    recorder: RecordingFile,
    kind: WriterKind,
    layout: Layout,
    rows: u64,
}

enum WriterKind {
    Parquet(Box<BatchedWriter<RecordingFile>>),
    Csv(RecordingFile),
}

impl SnapshotWriter {
    fn write(&mut self, core: &Core, mut frame: DataFrame) -> Result<(), LoadError> {
        if frame.height() == 0 {
            return Ok(());
        }
        frame.rechunk_mut();
        let path = self.tmp.path().to_path_buf();
        match &mut self.kind {
            WriterKind::Parquet(writer) => {
                writer.write_batch(&frame).map_err(core.polars_err("writing", &path, Some(&self.recorder)))?
            }
            WriterKind::Csv(out) => {
                csv::write_rows(out, &frame, &self.layout).map_err(core.csv_err("writing", &path))?
            }
        }
        self.rows += frame.height() as u64;
        Ok(())
    }

    /// Finishes the file and syncs it to disk; the caller renames it.
    fn finish(self, core: &Core) -> Result<NamedTempFile, LoadError> {
        let path = self.tmp.path().to_path_buf();
        if let WriterKind::Parquet(writer) = &self.kind {
            writer.finish().map_err(core.polars_err("writing", &path, Some(&self.recorder)))?;
        }
        self.recorder.finish().map_err(core.io_err("writing", &path))?;
        Ok(self.tmp)
    }
}

/// A partitioned run's merged rows, spilled per partition until the
/// touched partitions are written out.
struct PartitionSpills {
    dir: PathBuf,
    partition_by: Vec<String>,
    partitions: HashMap<String, PartitionSpill>,
    open: HashMap<String, SpillWriter>,
    /// Partitions that gain, lose or change a row in this run.
    touched: HashSet<String>,
}

struct PartitionSpill {
    path: PathBuf,
    values: Vec<Option<String>>,
}

impl PartitionSpills {
    fn new(dir: PathBuf, partition_by: &[String]) -> PartitionSpills {
        PartitionSpills {
            dir,
            partition_by: partition_by.to_vec(),
            partitions: HashMap::new(),
            open: HashMap::new(),
            touched: HashSet::new(),
        }
    }

    /// Appends `frame`'s rows to their partitions' spills; rows from
    /// `new_from` on are written by this run and touch their partition.
    fn write(&mut self, core: &Core, frame: &DataFrame, layout: &Layout, new_from: usize) -> Result<(), LoadError> {
        std::fs::create_dir_all(&self.dir).map_err(core.io_err("creating the directory", &self.dir))?;
        let names = partition_names(frame, &self.partition_by, layout).map_err(|m| core.internal(&m))?;
        let columns =
            typed_columns(frame, layout.iter().map(|(n, t)| (n.as_str(), *t))).map_err(|m| core.internal(&m))?;
        let part_cols: Vec<TypedColumn<'_>> = self
            .partition_by
            .iter()
            .filter_map(|p| layout.iter().position(|(n, _)| n == p))
            .map(|at| columns[at])
            .collect();
        for (i, name) in names.into_iter().enumerate() {
            if i >= new_from {
                self.touched.insert(name.clone());
            }
            if !self.open.contains_key(&name) {
                if self.open.len() >= MAX_OPEN_PARTITIONS {
                    self.close_all(core)?;
                }
                let count = self.partitions.len();
                let spill = self.partitions.entry(name.clone()).or_insert_with(|| PartitionSpill {
                    path: self.dir.join(format!("partition-{count:06}.rows")),
                    values: part_cols.iter().map(|c| c.get(i).to_text().map(|t| t.into_owned())).collect(),
                });
                let writer = SpillWriter::append_to(&spill.path).map_err(core.io_err("creating", &spill.path))?;
                self.open.insert(name.clone(), writer);
            }
            let writer = self.open.get_mut(&name).ok_or_else(|| core.internal("a partition spill is not open"))?;
            writer.append(&columns, i).map_err(|e| core.io_err("writing", &writer.path)(e))?;
        }
        Ok(())
    }

    fn close_all(&mut self, core: &Core) -> Result<(), LoadError> {
        for (_, w) in self.open.drain() {
            let path = w.path.clone();
            w.finish().map_err(core.io_err("writing", &path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that refuses to grow the file (EFBIG, as under `ulimit -f`)
    /// while Polars writes Parquet: the error is `disk`, with the operation
    /// and the path, not a Polars error.
    #[test]
    fn an_io_error_under_the_parquet_writer_is_a_disk_error_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let core = Core {
            name: "files t".into(),
            dir: dir.path().to_path_buf(),
            format: FileFormat::Parquet,
            table: "t".into(),
            partition_by: Vec::new(),
            hooks: crate::hooks::none(),
            run: None,
        };
        // /dev/full: every write fails with ENOSPC.
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else { return };
        let recorder = RecordingFile::new(full);
        let mut frame = DataFrame::new(
            3,
            vec![Series::new("a".into(), ["x".repeat(400_000), "y".into(), "z".into()]).into_column()],
        )
        .unwrap();
        let path = PathBuf::from("/dev/full");
        let err = ParquetWriter::new(recorder.clone())
            .finish(&mut frame)
            .map_err(core.polars_err("writing", &path, Some(&recorder)))
            .and_then(|_| recorder.finish().map_err(core.io_err("writing", &path)))
            .unwrap_err();
        assert_eq!(err.class(), crate::outcome::ErrorClass::Disk, "{err}");
        assert!(err.to_string().contains("writing /dev/full"), "{err}");
    }
}
