//! keyward: an API-key authentication sidecar.
//!
//! The request path, file by file: [`proxy::server`] accepts → [`proxy::handler`] runs the
//! phases in order: [`proxy::head`] checks the head → [`path`] normalizes →
//! [`auth::policy`] routes → [`auth::decision`] authenticates (with [`auth::credential`] and
//! the [`keys::KeyStore`] snapshot) → [`auth::ratelimit`] → [`proxy::headers`] builds the
//! upstream request → [`proxy::forward`] sends it over a [`proxy::pool`] connection
//! ([`proxy::h1`] for a request without a body) →
//! [`proxy::respond`] writes keyward's own answers.
//! The admin listener ([`admin`]) serves health, [`metrics`] and the control API. In decision
//! mode, [`decision`] answers an existing proxy's auth question through the same phases.
//! [`app::App`] is the state they share; [`runtime`] binds the listeners, runs the worker
//! threads and drains on shutdown.

// One module drives libyaml itself (`keys::nesting`, which says why); nothing else may.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod decision;
pub mod demo;
pub mod file_watch;
pub mod header_names;
mod key_host;
pub mod keygen;
pub mod keys;
pub mod logging;
pub mod metrics;
mod name_set;
pub mod path;
pub mod proxy;
pub mod regular_file;
pub mod runtime;
pub mod thread_count;
pub mod tls;

use std::net::SocketAddr;

pub use app::App;
pub use runtime::{Keyward, Signals};

/// Why keyward could not start. Each variant says which step failed and keeps the
/// underlying error as its `source()`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity header names or the environment value cannot be built.
    #[error(transparent)]
    Identity(#[from] keys::IdentityError),
    #[error("keys: no source configured")]
    NoKeySource,
    /// The state file is claimed by another keyward, cannot be locked, or is not a
    /// regular file.
    #[error(transparent)]
    StateFile(#[from] keys::source::StateLockError),
    #[error("metrics: {0}")]
    Metrics(#[source] prometheus::Error),
    #[error(transparent)]
    Cluster(#[from] cluster::SetupError),
    /// The first snapshot load did not finish (its thread panicked or was cancelled).
    #[error("snapshot load: {0}")]
    SnapshotLoad(#[source] tokio::task::JoinError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}
