//! Why a snapshot from a source was not taken, and why an emergency revoke failed.

use std::path::{Path, PathBuf};

use super::error::SnapshotError;
use super::guard::Verdict;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", crate::config::redact::shown_path(path))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] SnapshotError),
    #[error("keys come from a file; configure keys.control.state_file to push snapshots")]
    FileSource,
    #[error("keys are pushed (keys.control); use PUT /v1/snapshot?force=true")]
    ControlSource,
    /// Held back by the blast-radius guard (SPEC 16); the counts are in the verdict.
    #[error("{0}")]
    Guarded(Box<Verdict>),
    /// A reload asked for while the file kept changing: it is being written in place,
    /// and half a key file can parse.
    #[error("the key file kept changing while it was read; write it whole (rename a temporary file over it) and ask again")]
    Unsettled,
}

/// Why an emergency revoke failed.
#[derive(Debug, thiserror::Error)]
pub enum DisableError {
    #[error("no snapshot loaded")]
    NoSnapshot,
    /// The id is not repeated: a raw key pasted where the id goes would be echoed.
    #[error("no key with that id in the snapshot in force")]
    NotFound(String),
    #[error("keys come from a file: edit the file to disable a key")]
    FileSource,
    #[error("{0}")]
    Load(#[from] LoadError),
    /// The key is disabled in this process, but the state file still has it active: a
    /// restart would let it in again until it is disabled again or a snapshot is pushed.
    #[error(
        "key disabled in this process (in force now) but not persisted to keys.control.state_file: \
         a restart would enable it again; {error}"
    )]
    NotPersisted {
        error: LoadError,
        snapshot: std::sync::Arc<super::snapshot::Snapshot>,
    },
}

pub(super) fn io_error(path: &Path, source: std::io::Error) -> LoadError {
    LoadError::Io {
        path: path.to_owned(),
        source,
    }
}
