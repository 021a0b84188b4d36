//! Why a snapshot document is refused.

/// A refused snapshot: which entry, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot: {0}")]
    Parse(String),
    #[error("keys[{index}] id={id}: {field}: {reason}")]
    Entry {
        index: usize,
        id: String,
        field: &'static str,
        reason: String,
    },
}
