//! Why a snapshot document is refused.

use super::secret::{may_be_a_secret, WITHHELD};

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
    /// [`may_be_a_secret`]), whatever refused it.
    pub fn entry(index: usize, id: &str, field: &'static str, reason: String) -> Self {
        let id = if may_be_a_secret(id) {
            WITHHELD.to_string()
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

    /// The entry's id, when this names one that is shown.
    pub fn shown_id(&self) -> Option<&str> {
        match self {
            SnapshotError::Entry { id, .. } if id != WITHHELD && id != "(invalid)" => Some(id),
            _ => None,
        }
    }

    /// Show the entry's id no more (it turned out to be a secret).
    pub fn withhold_id(&mut self) {
        if let SnapshotError::Entry { id, .. } = self {
            *id = WITHHELD.into();
        }
    }
}
