//! What the files target keeps on disk while a run merges: typed rows in a
//! compact binary form (one append-only file per hash bucket or partition),
//! key cells compared and hashed by value, and a file writer that remembers
//! the I/O error under whatever a library made of it.
//!
//! A spill file is only ever read by the run that wrote it, so its format
//! is private: per row, per column of the layout, a tag byte and the value
//! (little-endian numbers, length-prefixed UTF-8 text). It keeps every value
//! exactly, nulls apart from empty text, and costs no per-file memory.

use std::fs::File;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use polars::prelude::*;

use crate::schema::ColumnType;
use crate::schema::values::{Cell, TypedColumn, dtype};

/// Column names and types of a frame, in order.
pub(super) type Layout = Vec<(String, ColumnType)>;

const NULL: u8 = 0;
const TEXT: u8 = 1;
const INT: u8 = 2;
const FLOAT: u8 = 3;
const FALSE: u8 = 4;
const TRUE: u8 = 5;
const DATE: u8 = 6;

/// Buffer of each spill writer: many are open at once while rows are
/// spread over buckets, so it stays small.
const SPILL_BUFFER: usize = 32 * 1024;

fn write_cell(out: &mut impl Write, cell: Cell<'_>) -> io::Result<()> {
    match cell {
        Cell::Null => out.write_all(&[NULL]),
        Cell::Text(s) => {
            let len = u32::try_from(s.len()).map_err(|_| io::Error::other("a text value over 4 GiB"))?;
            out.write_all(&[TEXT])?;
            out.write_all(&len.to_le_bytes())?;
            out.write_all(s.as_bytes())
        }
        Cell::Integer(v) | Cell::TimestampMs(v) | Cell::TimeNs(v) => {
            out.write_all(&[INT])?;
            out.write_all(&v.to_le_bytes())
        }
        Cell::Float(v) => {
            out.write_all(&[FLOAT])?;
            out.write_all(&v.to_bits().to_le_bytes())
        }
        Cell::Boolean(v) => out.write_all(&[if v { TRUE } else { FALSE }]),
        Cell::Date(v) => {
            out.write_all(&[DATE])?;
            out.write_all(&v.to_le_bytes())
        }
    }
}

/// An append-only spill file of rows in one layout.
pub(super) struct SpillWriter {
    out: BufWriter<File>,
    pub path: PathBuf,
    pub rows: u64,
}

impl SpillWriter {
    /// Opens `path` for appending (created if missing).
    pub fn append_to(path: &Path) -> io::Result<SpillWriter> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(SpillWriter { out: BufWriter::with_capacity(SPILL_BUFFER, file), path: path.to_path_buf(), rows: 0 })
    }

    /// Appends row `i` of `columns` (in the file's layout order).
    pub fn append(&mut self, columns: &[TypedColumn<'_>], i: usize) -> io::Result<()> {
        for c in columns {
            write_cell(&mut self.out, c.get(i))?;
        }
        self.rows += 1;
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// One column being rebuilt from a spill file.
enum Builder {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Date(Vec<Option<i32>>),
}

impl Builder {
    fn of(ty: ColumnType) -> Builder {
        match ty {
            ColumnType::Text | ColumnType::Decimal { .. } | ColumnType::Json => Builder::Text(Vec::new()),
            ColumnType::Integer | ColumnType::Timestamp | ColumnType::Time => Builder::Int(Vec::new()),
            ColumnType::Float => Builder::Float(Vec::new()),
            ColumnType::Boolean => Builder::Bool(Vec::new()),
            ColumnType::Date => Builder::Date(Vec::new()),
        }
    }

    fn into_column(self, name: &str, ty: ColumnType) -> PolarsResult<Column> {
        let name = PlSmallStr::from_str(name);
        let series = match self {
            Builder::Text(v) => Series::new(name, v),
            Builder::Int(v) => Series::new(name, v),
            Builder::Float(v) => Series::new(name, v),
            Builder::Bool(v) => Series::new(name, v),
            Builder::Date(v) => Series::new(name, v),
        };
        Ok(series.cast(&dtype(ty))?.into_column())
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("spill file is corrupt: {what}"))
}

/// Reads one row's cells into `builders`; `Ok(false)` at the end of the file.
fn read_row(input: &mut impl Read, builders: &mut [Builder]) -> io::Result<bool> {
    for (n, builder) in builders.iter_mut().enumerate() {
        let mut tag = [0u8; 1];
        if n == 0 {
            if input.read(&mut tag)? == 0 {
                return Ok(false);
            }
        } else {
            input.read_exact(&mut tag).map_err(|_| corrupt("a row ends early"))?;
        }
        let mut eight = [0u8; 8];
        let mut four = [0u8; 4];
        match (tag[0], builder) {
            (NULL, Builder::Text(v)) => v.push(None),
            (NULL, Builder::Int(v)) => v.push(None),
            (NULL, Builder::Float(v)) => v.push(None),
            (NULL, Builder::Bool(v)) => v.push(None),
            (NULL, Builder::Date(v)) => v.push(None),
            (TEXT, Builder::Text(v)) => {
                input.read_exact(&mut four)?;
                let mut bytes = vec![0u8; u32::from_le_bytes(four) as usize];
                input.read_exact(&mut bytes)?;
                v.push(Some(String::from_utf8(bytes).map_err(|_| corrupt("text that is not UTF-8"))?));
            }
            (INT, Builder::Int(v)) => {
                input.read_exact(&mut eight)?;
                v.push(Some(i64::from_le_bytes(eight)));
            }
            (FLOAT, Builder::Float(v)) => {
                input.read_exact(&mut eight)?;
                v.push(Some(f64::from_bits(u64::from_le_bytes(eight))));
            }
            (FALSE, Builder::Bool(v)) => v.push(Some(false)),
            (TRUE, Builder::Bool(v)) => v.push(Some(true)),
            (DATE, Builder::Date(v)) => {
                input.read_exact(&mut four)?;
                v.push(Some(i32::from_le_bytes(four)));
            }
            _ => return Err(corrupt("a cell of the wrong type")),
        }
    }
    Ok(true)
}

/// Reads a spill file in frames of at most `batch` rows, in file order,
/// handing each to `each`; `wrap` turns a read error into the caller's. A
/// missing file is no rows.
pub(super) fn read_spill<E>(
    path: &Path,
    layout: &Layout,
    batch: usize,
    wrap: impl Fn(SpillError) -> E,
    mut each: impl FnMut(DataFrame) -> Result<(), E>,
) -> Result<(), E> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(wrap(e.into())),
    };
    let mut input = BufReader::with_capacity(256 * 1024, file);
    loop {
        let mut builders: Vec<Builder> = layout.iter().map(|(_, t)| Builder::of(*t)).collect();
        let mut rows = 0;
        while rows < batch && read_row(&mut input, &mut builders).map_err(|e| wrap(e.into()))? {
            rows += 1;
        }
        if rows == 0 {
            return Ok(());
        }
        let frame = builders
            .into_iter()
            .zip(layout)
            .map(|(b, (name, ty))| b.into_column(name, *ty))
            .collect::<PolarsResult<Vec<_>>>()
            .and_then(|columns| DataFrame::new(rows, columns))
            .map_err(|e| wrap(e.into()))?;
        each(frame)?;
        if rows < batch {
            return Ok(());
        }
    }
}

/// Reads a whole spill file into one frame (empty, typed, when missing).
pub(super) fn read_spill_all(path: &Path, layout: &Layout) -> Result<DataFrame, SpillError> {
    let mut frames: Vec<DataFrame> = Vec::new();
    read_spill(
        path,
        layout,
        usize::MAX,
        |e| e,
        |df| {
            frames.push(df);
            Ok(())
        },
    )?;
    match frames.pop() {
        Some(df) => Ok(df),
        None => {
            let columns: Vec<Column> =
                layout.iter().map(|(n, t)| Column::new_empty(PlSmallStr::from_str(n), &dtype(*t))).collect();
            Ok(DataFrame::new(0, columns)?)
        }
    }
}

/// A spill read failed: the disk, or a frame that could not be built.
#[derive(Debug)]
pub(super) enum SpillError {
    Io(io::Error),
    Polars(PolarsError),
}

impl From<io::Error> for SpillError {
    fn from(e: io::Error) -> Self {
        SpillError::Io(e)
    }
}

impl From<PolarsError> for SpillError {
    fn from(e: PolarsError) -> Self {
        SpillError::Polars(e)
    }
}

/// One key cell, owned, compared by value: text by its bytes, numbers by
/// value (a float by its bits, with -0 and 0 one value, as in SQL).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum KeyCell {
    Null,
    Text(Box<str>),
    Int(i64),
    Float(u64),
    Bool(bool),
    Date(i32),
}

impl KeyCell {
    pub fn of(cell: Cell<'_>) -> KeyCell {
        match cell {
            Cell::Null => KeyCell::Null,
            Cell::Text(s) => KeyCell::Text(s.into()),
            Cell::Integer(v) | Cell::TimestampMs(v) | Cell::TimeNs(v) => KeyCell::Int(v),
            Cell::Float(v) => KeyCell::Float(float_bits(v)),
            Cell::Boolean(v) => KeyCell::Bool(v),
            Cell::Date(v) => KeyCell::Date(v),
        }
    }
}

fn float_bits(v: f64) -> u64 {
    if v == 0.0 {
        0
    } else if v.is_nan() {
        f64::NAN.to_bits()
    } else {
        v.to_bits()
    }
}

/// The key of row `i`, as owned cells.
pub(super) fn key_of(keys: &[TypedColumn<'_>], i: usize) -> Vec<KeyCell> {
    keys.iter().map(|c| KeyCell::of(c.get(i))).collect()
}

/// The bucket of row `i` among `buckets`: a hash of its key cells by value,
/// the same for a staged row and a snapshot row with an equal key.
pub(super) fn bucket_of(keys: &[TypedColumn<'_>], i: usize, buckets: usize) -> usize {
    // SipHash with fixed keys: the same key lands in the same bucket on
    // both sides of the merge (a HashMap's random state would not).
    let mut h = DefaultHasher::new();
    for c in keys {
        KeyCell::of(c.get(i)).hash(&mut h);
    }
    (h.finish() % buckets as u64) as usize
}

/// Whether two cells hold the same value, nulls equal to each other (SQL's
/// `IS NOT DISTINCT FROM`), floats by value (-0 equals 0, NaN equals NaN).
pub(super) fn same(a: Cell<'_>, b: Cell<'_>) -> bool {
    match (a, b) {
        (Cell::Float(x), Cell::Float(y)) => x == y || (x.is_nan() && y.is_nan()),
        _ => a == b,
    }
}

/// A file written through a buffer that remembers the first I/O error it
/// saw. Polars turns an I/O error into its own error type (and a buffer
/// dropped mid-way swallows one); this keeps the real one, so a full disk
/// or a file-size limit is reported as what it is, with its path.
#[derive(Clone)]
pub(super) struct RecordingFile(Arc<Mutex<Recording>>);

struct Recording {
    out: BufWriter<File>,
    error: Option<io::Error>,
}

fn copy_of(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

impl RecordingFile {
    pub fn new(file: File) -> RecordingFile {
        RecordingFile(Arc::new(Mutex::new(Recording { out: BufWriter::with_capacity(256 * 1024, file), error: None })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The first I/O error seen, if any.
    pub fn take_error(&self) -> Option<io::Error> {
        self.lock().error.take()
    }

    /// Flushes and syncs to disk; the first error seen at any point wins.
    pub fn finish(&self) -> io::Result<()> {
        let mut rec = self.lock();
        let flushed = rec.out.flush();
        if let Some(e) = rec.error.take() {
            return Err(e);
        }
        flushed?;
        rec.out.get_ref().sync_all()
    }
}

impl Write for RecordingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rec = self.lock();
        rec.out.write(buf).inspect_err(|e| {
            if rec.error.is_none() {
                rec.error = Some(copy_of(e));
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut rec = self.lock();
        rec.out.flush().inspect_err(|e| {
            if rec.error.is_none() {
                rec.error = Some(copy_of(e));
            }
        })
    }
}
