//! Names that reach another system: Salesforce API names in the SOQL, and
//! table and column names in each target. Each is checked against the
//! rules of the system it reaches, because a name that system refuses (or
//! quietly changes) fails every run, or worse, every run but the first.

/// Salesforce's suffixes for custom and special sObjects and fields
/// (`Score__c`, `Account__r`, `Event__e`, `Setting__mdt`, ...).
const SALESFORCE_SUFFIXES: &[&str] = &[
    "c",
    "r",
    "e",
    "b",
    "x",
    "xo",
    "mdt",
    "kav",
    "ka",
    "feed",
    "history",
    "share",
    "tag",
    "changeevent",
    "chn",
    "dlm",
    "dll",
    "pc",
    "pr",
    "latitude__s",
    "longitude__s",
];

/// The longest API name Salesforce gives anything (40 characters plus a
/// namespace and a suffix); longer is a typo or pasted text.
const SALESFORCE_MAX_NAME: usize = 100;

/// An sObject or field API name: letters, digits and single underscores,
/// starting with a letter, not ending with an underscore; `__` only to set
/// off a namespace prefix (`ns__`) and a suffix (`__c`, `__r`, ...).
pub fn salesforce_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > SALESFORCE_MAX_NAME {
        return Err(format!("the name is longer than {SALESFORCE_MAX_NAME} characters"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(format!(
            "`{}` is not allowed in a Salesforce API name (letters, digits and underscores only)",
            c.escape_debug()
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err("a Salesforce API name starts with a letter".into());
    }
    if name.ends_with('_') {
        return Err("a Salesforce API name does not end with an underscore".into());
    }
    // Geolocation compound parts (`Location__latitude__s`) carry a two-part suffix.
    let lower = name.to_ascii_lowercase();
    let (stem, suffix) = match SALESFORCE_SUFFIXES.iter().find(|s| lower.ends_with(&format!("__{s}"))) {
        Some(s) => (&name[..name.len() - s.len() - 2], Some(*s)),
        None => (name, None),
    };
    let parts: Vec<&str> = stem.split("__").collect();
    let bad_parts = parts.iter().any(|p| p.is_empty() || p.starts_with('_') || p.ends_with('_'));
    if bad_parts || parts.len() > 2 || (parts.len() == 2 && suffix.is_none()) {
        return Err("a double underscore only sets off a namespace (`ns__`) or a suffix such as `__c` or `__r`".into());
    }
    Ok(())
}

/// A field as SOQL names it: an API name, or a relationship path of them
/// (`Owner.Email`, `Parent__r.Name`).
pub fn salesforce_field_path(path: &str) -> Result<(), String> {
    let segments: Vec<&str> = path.split('.').collect();
    for (i, segment) in segments.iter().enumerate() {
        salesforce_name(segment).map_err(|e| {
            if segments.len() > 1 { format!("segment {} `{segment}` of the path: {e}", i + 1) } else { e }
        })?;
        let relationship = i + 1 < segments.len();
        if relationship && segment.to_ascii_lowercase().ends_with("__c") {
            return Err(format!(
                "`{segment}` is a lookup field; a path follows its relationship, `{}__r`",
                &segment[..segment.len() - 3]
            ));
        }
    }
    Ok(())
}

/// Postgres keeps 63 bytes of an identifier (NAMEDATALEN - 1) and cuts the
/// rest with only a notice: the table is created under the cut name, and
/// every later run looks for the full name and fails.
pub const POSTGRES_MAX_IDENTIFIER: usize = 63;

/// A name any target must be able to hold: not empty, no control
/// characters (NUL ends a C string in every driver).
pub fn printable_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("the name is empty".into());
    }
    if name.chars().any(char::is_control) {
        return Err("the name contains a control character (NUL, newline, ...); use printable characters".into());
    }
    Ok(())
}

pub fn postgres_identifier(name: &str) -> Result<(), String> {
    printable_name(name)?;
    if name.len() > POSTGRES_MAX_IDENTIFIER {
        return Err(format!(
            "it is {} bytes; Postgres keeps only the first {POSTGRES_MAX_IDENTIFIER} bytes of a name, so the first run would create it under a cut name and every later run fail",
            name.len()
        ));
    }
    Ok(())
}

pub fn sqlite_table(name: &str) -> Result<(), String> {
    printable_name(name)?;
    if name.to_ascii_lowercase().starts_with("sqlite_") {
        return Err("names starting with `sqlite_` are reserved by SQLite".into());
    }
    Ok(())
}

/// A name that becomes a file name inside the connection's directory: one
/// plain path component, so the snapshot (and its temp files, `.<name>...`)
/// cannot land anywhere else.
pub fn file_name(name: &str) -> Result<(), String> {
    printable_name(name)?;
    if name.contains(['/', '\\']) {
        return Err(
            "the name contains a path separator; it must be a plain file name inside the connection's directory".into(),
        );
    }
    if name.starts_with('.') {
        return Err(
            "the name starts with `.`; such names are hidden, and `..` leaves the connection's directory".into()
        );
    }
    if name.contains(':') {
        return Err("the name contains `:`, which some file systems refuse".into());
    }
    // Room for the extension and the temp-file prefix and suffix.
    if name.len() > 200 {
        return Err("the name is longer than 200 bytes; file systems allow 255 for the whole file name".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salesforce_names_follow_salesforce_rules() {
        for ok in [
            "Id",
            "Account",
            "Score__c",
            "npe01__One2OneContact__c",
            "Parent__r",
            "Order_Event__e",
            "Setting__mdt",
            "AccountHistory",
            "Location__latitude__s",
            "X1",
        ] {
            assert_eq!(salesforce_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1Name", "_Name", "Name_", "Bad__Name", "a__b__c__c", "Na me", "Name;", "Ñame", "A___c"] {
            assert!(salesforce_name(bad).is_err(), "{bad}");
        }
        assert!(salesforce_name(&"A".repeat(101)).is_err());
    }

    #[test]
    fn field_paths_follow_relationships() {
        for ok in ["Owner.Email", "Account.Owner.Name", "Parent__r.Score__c", "Name"] {
            assert_eq!(salesforce_field_path(ok), Ok(()), "{ok}");
        }
        for bad in ["Owner.", ".Email", "Owner..Email", "Parent__c.Name", "Owner.Email)"] {
            assert!(salesforce_field_path(bad).is_err(), "{bad}");
        }
        assert!(salesforce_field_path("Parent__c.Name").unwrap_err().contains("Parent__r"));
    }

    #[test]
    fn target_names() {
        assert!(postgres_identifier(&"a".repeat(63)).is_ok());
        assert!(postgres_identifier(&"a".repeat(64)).is_err());
        // Bytes, not characters: 32 two-byte characters are 64 bytes.
        assert!(postgres_identifier(&"é".repeat(32)).is_err());
        assert!(sqlite_table("sqlite_master").is_err());
        for bad in ["", " ", "a/b", "..", "../x", ".hidden", "a\\b", "a\0b", "c:x"] {
            assert!(file_name(bad).is_err(), "{bad:?}");
        }
        assert!(file_name("accounts-2024_v1").is_ok());
    }
}
