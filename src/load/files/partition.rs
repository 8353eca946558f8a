//! Partitioned snapshots: `partition_by = ["column", ...]` keeps one file
//! per distinct value under `<dir>/<table>/`, and a manifest,
//! `<dir>/<table>/_manifest.json`, that says which files make up the
//! snapshot. A run writes the partitions it changes under new names, then
//! replaces the manifest atomically, then deletes the files it replaced: a
//! reader that trusts the manifest sees the whole old snapshot or the whole
//! new one. Files the manifest does not list are a killed run's leftovers.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub(super) const MANIFEST: &str = "_manifest.json";

/// Names longer than this are cut and end with a digest of the whole name
/// (file names are at most 255 bytes on common file systems).
const MAX_NAME: usize = 160;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct Manifest {
    pub table: String,
    pub format: String,
    pub partition_by: Vec<String>,
    /// The run that wrote this manifest.
    pub run: i64,
    /// Rows in all partitions.
    pub rows: u64,
    /// The snapshot's columns and their Polars types, in order.
    pub columns: Vec<ManifestColumn>,
    pub partitions: Vec<ManifestPartition>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct ManifestColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct ManifestPartition {
    /// The partition's name: its values, encoded (see [`partition_name`]).
    pub name: String,
    /// The values of the `partition_by` columns, in canonical text (null: null).
    pub values: Vec<Option<String>>,
    /// The file, relative to the table's directory.
    pub file: String,
    pub rows: u64,
    /// The run that wrote this file.
    pub run: i64,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Option<Manifest>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The name of the partition holding `values` of `columns`: `col=value`
/// pairs joined by `,`. Everything but ASCII letters, digits, `-`, `_` and
/// `.` is percent-encoded (so no `/`, no `..` alone, no control bytes); null
/// is `~`, which no encoded value can be; empty text is nothing. Distinct
/// values give distinct names.
pub(super) fn partition_name(columns: &[String], values: &[Option<&str>]) -> String {
    let mut name = String::new();
    for (n, (column, value)) in columns.iter().zip(values).enumerate() {
        if n > 0 {
            name.push(',');
        }
        encode(&mut name, column);
        name.push('=');
        match value {
            None => name.push('~'),
            Some(v) => encode(&mut name, v),
        }
    }
    if name.len() > MAX_NAME {
        let digest = Sha256::digest(name.as_bytes());
        let mut cut = MAX_NAME - 66;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        name.push('~');
        for b in &digest[..32] {
            let _ = write!(name, "{b:02x}");
        }
    }
    name
}

fn encode(out: &mut String, text: &str) {
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_and_distinct() {
        let cols = vec!["industry".to_string()];
        let name = |v: Option<&str>| partition_name(&cols, &[v]);
        assert_eq!(name(Some("Energy")), "industry=Energy");
        assert_eq!(name(None), "industry=~");
        assert_eq!(name(Some("")), "industry=");
        assert_eq!(name(Some("../x")), "industry=..%2Fx");
        assert_eq!(name(Some("~")), "industry=%7E");
        assert_eq!(name(Some("a b")), "industry=a%20b");
        assert_ne!(name(Some("%20")), name(Some(" ")));
        let long = "é".repeat(200);
        let a = name(Some(&long));
        let b = name(Some(&format!("{long}x")));
        assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME, "{a}");
        assert_ne!(a, b);
        let two = vec!["a".to_string(), "b".to_string()];
        assert_ne!(
            partition_name(&two, &[Some("x,b=y"), Some("z")]),
            partition_name(&two, &[Some("x"), Some("y,b=z")])
        );
        for n in [name(Some("/")), name(Some("..")), name(Some("\0"))] {
            assert!(!n.contains('/') && !n.contains('\0') && n != ".." && n != ".", "{n}");
        }
    }
}
