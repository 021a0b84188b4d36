//! The accepted connection a request arrived on, and what admitting it took (its
//! `max_connections` slot, its place in its worker's open count).

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;
use tokio::sync::watch;

use super::balance::Admitted;
use super::server::Phase;
use super::streams::Proof;
use super::worker::Worker;

/// What an open connection holds, shared by the connection and its tunnel: both count
/// until the last copy goes.
pub type Slot = Arc<Held>;

/// A connection's admission, and its receiver of the worker's drain signal: the worker
/// waits (up to `grace`) for every receiver to go, so a tunnel that outlives its
/// connection's task is in flight like a request, though never told to close.
#[derive(Debug)]
pub struct Held {
    _admitted: Admitted,
    _drain: watch::Receiver<Phase>,
    /// When the connection last carried a request with a key that was let in: an HTTP/2
    /// connection's share of streams may go to a new connection once that is long enough
    /// ago ([`super::streams::Holder`]).
    pub proof: Proof,
}

/// What every request of one connection is served with, shared as one reference count a
/// request: counting the app, the worker and the connection each (the app's count written
/// by every worker) cost several locked operations a request, one of them contended.
pub struct Serving {
    pub app: Arc<crate::App>,
    pub worker: Worker,
    pub conn: ConnInfo,
}

/// The accepted connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// Whose upstream connections this connection's requests without a key use: its own
    /// (`Worker::next_conn_owner`).
    pub owner: super::pool::ConnOwner,
    /// The peer's address as the `X-Forwarded-For` value: formatted once per connection,
    /// not once per request.
    pub peer_ip: HeaderValue,
    /// The connection's `max_connections` slot. A WebSocket tunnel holds it too: the
    /// upgraded connection outlives hyper's connection task and must still count.
    pub slot: Option<Slot>,
    /// When the connection reaches `limits.max_connection_age`: its tunnel closes then.
    pub aged_at: Option<tokio::time::Instant>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool, owner: super::pool::ConnOwner) -> Self {
        let peer_ip = HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer,
            tls,
            owner,
            peer_ip,
            slot: None,
            aged_at: None,
        }
    }

    /// The same connection, holding what admitting it took, and its worker's drain open,
    /// for as long as any copy of it (or of its tunnel) lives.
    pub fn holding(
        mut self,
        admitted: Admitted,
        drain: watch::Receiver<Phase>,
        proof: Proof,
    ) -> Self {
        self.slot = Some(Arc::new(Held {
            _admitted: admitted,
            _drain: drain,
            proof,
        }));
        self
    }

    /// A request with a key was let in on this connection: it counts as carrying one
    /// until what is returned (held with the answer, to its end) and its copies are gone.
    pub fn vouch(&self) -> Option<KeyedInFlight> {
        let held = self.slot.as_ref()?;
        held.proof.vouch();
        held.proof.begin();
        Some(KeyedInFlight(held.clone()))
    }
}

/// A request with a key in flight on its connection (see [`ConnInfo::vouch`]).
#[derive(Debug)]
pub struct KeyedInFlight(Slot);

impl Clone for KeyedInFlight {
    fn clone(&self) -> Self {
        self.0.proof.begin();
        Self(self.0.clone())
    }
}

impl Drop for KeyedInFlight {
    fn drop(&mut self) {
        self.0.proof.end();
    }
}
