//! keyward: an API-key authentication sidecar.
//!
//! The request path, file by file: [`proxy::server`] accepts → [`proxy::handler`] runs the
//! phases in order: [`proxy::head`] checks the head → [`auth::path`] normalizes →
//! [`auth::policy`] routes → [`auth::decision`] authenticates (with [`auth::credential`] and
//! the [`keys::KeyStore`] snapshot) → [`auth::ratelimit`] → [`proxy::headers`] builds the
//! upstream request → [`proxy::forward`] sends it over a [`proxy::pool`] connection →
//! [`proxy::respond`] writes keyward's own answers.
//! The admin listener ([`admin`]) serves health, [`metrics`] and the control API. In decision
//! mode, [`decision`] answers an existing proxy's auth question through the same phases.
//! [`app::App`] is the state they share; [`runtime`] binds the listeners, runs the worker
//! threads and drains on shutdown.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod decision;
pub mod demo;
pub mod keygen;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod runtime;
pub mod tls;

use std::net::SocketAddr;

pub use app::App;
pub use runtime::{Keyward, Signals};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}
