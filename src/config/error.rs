//! [`ConfigError`]: every config problem names the field it is about.

use std::path::PathBuf;

use super::yaml::YamlError;

/// A config problem, always naming the field it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Parse(#[from] YamlError),
    /// Redacted where shown: the field's path and the reason may quote what was written
    /// (a map key, a value), which may be a secret pasted into the wrong place.
    #[error("{}", super::redact(&format!("{field}: {reason}")))]
    Invalid { field: String, reason: String },
    /// What the YAML pass refuses before the document is parsed (nesting too deep, a tag):
    /// `field` is the path to it or its line (redacted where shown, a key of the document
    /// may be a secret), `reason` is keyward's own words.
    #[error("{}: {reason}", super::redact(field))]
    Refused { field: String, reason: String },
}

pub(super) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}
