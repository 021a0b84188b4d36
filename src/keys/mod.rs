//! API keys: the immutable [`Snapshot`], the [`KeyStore`] that publishes it, where
//! snapshots come from ([`source`]), and per-key state that outlives a snapshot ([`usage`]).
//!
//! Files, from the leaves up: `text` (a checked identity value), `scopes`, `key` (the key
//! model), `schema` (the document's types), `error`, `validate` (an entry checked and built),
//! `identity` (identity header names and values), `index`, `snapshot`, `entries` (the
//! document as serde reads it), `load` (the one loader; parser messages are made fit to
//! show by `config::redact`), `diff`, `guard`, `store`, `usage`, then where snapshots come from: `spool`,
//! `load_error`, `read` (a snapshot file read and hashed), `review`, `source` (the file and
//! control sources, install, the key file's watch).

pub mod diff;
mod entries;
pub mod error;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod guard;
pub mod identity;
mod index;
pub mod key;
pub mod load;
mod load_error;
pub(crate) mod nesting;
mod read;
pub mod review;
pub mod schema;
mod scopes;
mod secret;
pub mod snapshot;
pub mod source;
mod spool;
pub mod store;
pub mod text;
pub mod usage;
mod validate;

pub use error::SnapshotError;
pub use identity::{IdentityError, IdentityField, IdentityNames};
pub use key::{
    digest, Delegation, Digest, Key, PrincipalType, RateLimit, Status, MAX_KEY_LEN, MIN_KEY_LEN,
};
pub use load::Format;
pub use schema::SnapshotDoc;
pub use secret::names_a_digest;
pub use snapshot::{Snapshot, Source};
pub use store::KeyStore;
pub use text::Text;
pub use validate::is_token;
