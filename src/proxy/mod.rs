//! The traffic listener and the upstream leg.
//!
//! `server` accepts connections, `handler` runs a request's phases, `headers` prepares what
//! is forwarded, `forward` talks to the upstream over `pool`'s connections, `respond` writes keyward's own answers.

pub mod conn;
pub mod forward;
pub mod handler;
pub mod head;
pub mod headers;
pub mod pool;
pub mod respond;
pub mod server;
pub mod tunnel;
pub mod writing;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// A response body: the upstream's, streamed, or one keyward wrote.
pub type Body = Either<Incoming, Full<Bytes>>;
