//! The traffic listener and the upstream leg.
//!
//! `balance` hands accepted connections to worker threads, `server` serves them (`conn`:
//! what a request knows of its connection),
//! `handler` runs a request's phases in order, `head` checks the request head, `headers`
//! builds what is forwarded, `forward` talks to the upstream over `pool`'s connections
//! (`upstream_target`: TCP or a Unix socket; `tunnel` for upgrades; `h1`, keyward's own
//! HTTP/1.1 client for requests without a body, hyper's for the rest), `respond` writes
//! keyward's own answers, `writing` bounds a stalled client, `streams` the HTTP/2 streams held, `h2_guard` the control frames an HTTP/2 client may send, `worker` is what one worker
//! thread owns (its pool, its metrics shard).

pub mod balance;
pub mod conn;
pub mod forward;
pub mod h1;
pub mod h2_guard;
pub mod handler;
pub mod head;
pub mod headers;
pub mod hop;
pub mod pool;
pub mod respond;
pub mod server;
pub mod streams;
pub mod threads;
pub mod upload;
pub mod upstream_target;
pub mod watch;
pub mod worker;
pub mod writing;

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;

/// A request body: hyper's, or none (a request keyward's own HTTP/1.1 server read,
/// which carries no body).
pub type RequestBody = Either<Incoming, Empty<Bytes>>;

/// The upstream's response body, from hyper's client or the fast path's.
pub type UpstreamBody =
    Either<Incoming, h1::ResponseBody<upstream_target::UpstreamStream, pool::Return>>;

/// A response body: the upstream's, streamed, or one keyward wrote.
pub type Body = Either<watch::Guarded<UpstreamBody>, Full<Bytes>>;
