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

impl SnapshotError {
    /// Entry `index` refused for `field`: its id shown unless it could be a secret (see
    /// [`super::validate::may_be_a_secret`]), whatever refused it.
    pub fn entry(index: usize, id: &str, field: &'static str, reason: String) -> Self {
        let id = if super::validate::may_be_a_secret(id) {
            "(withheld)".to_string()
        } else {
            id.to_string()
        };
        SnapshotError::Entry {
            index,
            id,
            field,
            reason,
        }
    }
}
