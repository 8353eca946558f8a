//! `${NAME}` / `${NAME:-default}` substitution inside string values.
//!
//! Substitution happens per value while deserializing (not on the raw file
//! text) so that comments are never interpolated, every error keeps the span
//! of the value that referenced the variable, and a variable's value can never
//! leak into a TOML syntax error message.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

/// Why a `${...}` reference could not be resolved. Names the variable, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterpolationError {
    Missing(String),
    Unterminated,
    BadName(String),
}

impl fmt::Display for InterpolationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(name) => write!(
                f,
                "environment variable `{name}` is not set; export it, or write `${{{name}:-default}}` to give a default"
            ),
            Self::Unterminated => write!(f, "`${{` without a closing `}}`; write `$${{` for a literal `${{`"),
            Self::BadName(name) => write!(
                f,
                "`{name}` is not a valid environment variable name (letters, digits and `_`, not starting with a digit)"
            ),
        }
    }
}

/// Replaces `${NAME}` and `${NAME:-default}` using `lookup`; `$${` is a literal `${`.
pub fn interpolate_with(raw: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, InterpolationError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail.find('}').ok_or(InterpolationError::Unterminated)?;
            let body = &tail[..end];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(InterpolationError::BadName(name.to_string()));
            }
            match (lookup(name), default) {
                (Some(value), _) if !value.is_empty() || default.is_none() => out.push_str(&value),
                (_, Some(default)) => out.push_str(default),
                (None, None) => return Err(InterpolationError::Missing(name.to_string())),
                (Some(_), None) => unreachable!("guarded by the first arm"),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Interpolates from the process environment.
pub fn interpolate(raw: &str) -> Result<String, InterpolationError> {
    interpolate_with(raw, |name| std::env::var(name).ok())
}

/// A config string with `${ENV}` references resolved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvString(pub String);

impl EnvString {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EnvString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        interpolate(&raw).map(EnvString).map_err(serde::de::Error::custom)
    }
}

/// A secret config value (client secret, password): interpolated like
/// [`EnvString`], but it has no `Display` and its `Debug` is redacted, so it
/// cannot end up in a log line or an error message by accident.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(**redacted**)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        interpolate(&raw).map(Secret::new).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "USER_NAME" => Some("ada".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_known_and_defaults() {
        assert_eq!(interpolate_with("a-${USER_NAME}-b", env).unwrap(), "a-ada-b");
        assert_eq!(interpolate_with("${NOPE:-x}", env).unwrap(), "x");
        assert_eq!(interpolate_with("${EMPTY:-x}", env).unwrap(), "x");
        assert_eq!(interpolate_with("${EMPTY}", env).unwrap(), "");
        assert_eq!(interpolate_with("cost $5 $${HOME}", env).unwrap(), "cost $5 ${HOME}");
    }

    #[test]
    fn missing_variable_names_itself_only() {
        let err = interpolate_with("${SF_SECRET}", env).unwrap_err();
        assert_eq!(err, InterpolationError::Missing("SF_SECRET".into()));
        assert!(err.to_string().contains("`SF_SECRET` is not set"));
        assert_eq!(interpolate_with("${OPEN", env).unwrap_err(), InterpolationError::Unterminated);
        assert_eq!(interpolate_with("${1BAD}", env).unwrap_err(), InterpolationError::BadName("1BAD".into()));
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
