//! API keys: the immutable [`Snapshot`], the [`KeyStore`] that publishes it, where
//! snapshots come from ([`source`]), and per-key state that outlives a snapshot ([`usage`]).

pub mod diff;
pub mod guard;
mod index;
pub mod load;
pub mod review;
pub mod snapshot;
pub mod source;
pub mod store;
pub mod usage;

pub use snapshot::IdentityError;
pub use snapshot::{
    digest, Delegation, Digest, IdentityNames, Key, PrincipalType, RateLimit, Snapshot,
    SnapshotDoc, SnapshotError, Source, Status, Text,
};
pub use store::KeyStore;
