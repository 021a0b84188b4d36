//! Snapshot text for the keys unit tests.

use super::{Snapshot, Source};

/// The digest of the raw key `test`.
pub const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// A snapshot of one key, `key_a`, with `extra` lines added to its entry.
pub fn entry(extra: &str) -> String {
    format!(
        "keys:\n  - id: key_a\n    sha256: {SHA}\n    type: service_account\n    subject_id: s1\n    account_id: a1\n    scopes: [read]\n{extra}"
    )
}

/// Why `text` is refused.
pub fn refuse(text: &str) -> String {
    Snapshot::parse(text, Source::File)
        .expect_err("snapshot should be refused")
        .to_string()
}
