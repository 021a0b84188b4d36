//! The accepted connection a request arrived on, and what admitting it took (its
//! `max_connections` slot, its place in its worker's open count).

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;

/// What admitting a connection took, shared by the connection and its tunnel: both count
/// until the last copy goes.
pub type Slot = Arc<super::balance::Admitted>;

/// The accepted connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's address as the `X-Forwarded-For` value: formatted once per connection,
    /// not once per request.
    pub peer_ip: HeaderValue,
    /// The connection's `max_connections` slot. A WebSocket tunnel holds it too: the
    /// upgraded connection outlives hyper's connection task and must still count.
    pub slot: Option<Slot>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let peer_ip = HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer,
            tls,
            peer_ip,
            slot: None,
        }
    }

    /// The same connection, holding what admitting it took for as long as any copy of it
    /// (or of its tunnel) lives.
    pub fn holding(mut self, admitted: super::balance::Admitted) -> Self {
        self.slot = Some(Arc::new(admitted));
        self
    }
}
