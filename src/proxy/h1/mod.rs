//! keyward's own HTTP/1.1 client for the upstream leg's common exchange: a request without
//! a body (no upgrade), answered with any HTTP/1.x response. It writes the request head in
//! one write, parses the response head with `httparse`, and reads the body (length, chunked
//! or to the end of the connection) from the same buffer, with no connection task, no
//! channel and, for a response already whole in the buffer, one copy. Requests with a body
//! and upgrades go through hyper's client as before.
//!
//! Every framing rule is hyper's client's, in the same order and with the same limits, so
//! the two read every byte stream alike: `tests/upstream_framing.rs` runs one suite of
//! hostile responses through both, and `h1::differential` compares them on generated
//! byte streams.
//!
//! `server` is the other leg: keyward's own HTTP/1.1 server for the common request (no
//! body, nothing hyper's server interprets), which hands a connection to hyper's server at
//! the first request it does not take.

pub mod body;
pub mod chunked;
pub mod codec;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod differential;
pub mod server;

use std::future::Future;
use std::io;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use body::{response, Home, ResponseBody};
pub use codec::{Framing, Head};

/// How much is read at a time.
const READ_CHUNK: usize = 8 * 1024;

/// Why an exchange on the fast path failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("invalid response head: {0}")]
    Parse(httparse::Error),
    #[error("response head larger than {} bytes", codec::MAX_HEAD_BYTES)]
    HeadTooLarge,
    #[error("more than {} informational (1xx) responses", codec::MAX_INFORMATIONAL)]
    TooManyInformational,
    #[error("invalid status code")]
    Status,
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    #[error("Transfer-Encoding in an HTTP/1.0 response")]
    TransferEncoding10,
    #[error("invalid chunked body: {0}")]
    Chunked(&'static str),
    #[error("invalid trailers")]
    Trailers,
    #[error("connection closed before the response was complete")]
    Incomplete,
    #[error("upstream connection failed")]
    Io(#[from] io::Error),
}

/// Does this request go on the fast path? No body (and none announced), and not a
/// CONNECT. Upgrades are the caller's to exclude.
pub fn fits<B: http_body::Body>(req: &Request<B>) -> bool {
    req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && !req.headers().contains_key(http::header::TRANSFER_ENCODING)
}

/// An upstream connection the fast path owns: the stream, what was read past the last
/// response head, and the buffer request heads are written from (kept between requests).
/// It lives boxed (one allocation per connection, not per request), so moving it between
/// the pool, the request and the response body moves a pointer.
pub struct Conn<T> {
    io: T,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// Header positions of the head being parsed (scratch, kept for its capacity).
    spans: Vec<codec::Span>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    pub fn new(io: T) -> Box<Self> {
        Box::new(Self {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::with_capacity(1024),
            spans: Vec::with_capacity(32),
        })
    }

    pub fn io(&self) -> &T {
        &self.io
    }

    /// Send a request head (the request has no body).
    pub async fn send_head<'h>(
        &mut self,
        method: &Method,
        target: &str,
        headers: impl IntoIterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    ) -> io::Result<()> {
        self.encode_head(method, target, headers);
        self.write_head().await
    }

    /// Write a request head into the connection's buffer. Kept apart from
    /// [`write_head`](Self::write_head) so the headers' iterator is not part of any
    /// future's state (hyper moves the request's future into place once per request).
    pub fn encode_head<'h>(
        &mut self,
        method: &Method,
        target: &str,
        headers: impl IntoIterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    ) {
        codec::encode_request(method, target, headers, &mut self.wbuf);
    }

    /// Send the head [`encode_head`](Self::encode_head) wrote.
    pub async fn write_head(&mut self) -> io::Result<()> {
        self.io.write_all(&self.wbuf).await
    }

    /// Read up to the final response head. `Ok(None)`: the connection ended before any
    /// byte of an answer (the request may not have been seen). A `Content-Length` body
    /// already whole in the buffer comes with the head. The head's headers reuse
    /// `recycled` (the sent request's map), untouched unless a head is returned.
    pub async fn read_head(
        &mut self,
        method: &Method,
        recycled: &mut HeaderMap,
    ) -> Result<Option<(Head, Option<Bytes>)>, H1Error> {
        let mut answered = !self.rbuf.is_empty();
        let mut informational = 0;
        // After a partial head, parse again only once the new bytes can end it.
        let mut partial: Option<usize> = None;
        loop {
            let worth_parsing = match partial {
                Some(prev) => codec::may_end_head(&self.rbuf, prev),
                None => !self.rbuf.is_empty(),
            };
            if worth_parsing {
                if let Some(parsed) = codec::parse_response(
                    &mut self.rbuf,
                    method,
                    &mut self.spans,
                    recycled,
                    &mut informational,
                )? {
                    return Ok(Some(parsed));
                }
                partial = (!self.rbuf.is_empty()).then_some(self.rbuf.len());
            } else if partial.is_some() {
                // Looked at: the next look starts at the new bytes (a head that never ends
                // is scanned once, not once per read from where it started).
                partial = Some(self.rbuf.len());
            }
            // Measured on every read, not only when a parse is tried: a head without its
            // blank line (an app that never ends one) is never parsed, and was buffered
            // until `upstream_timeout`, hundreds of megabytes.
            if self.rbuf.len() >= codec::MAX_HEAD_BYTES {
                return Err(H1Error::HeadTooLarge);
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await? {
                0 if answered => return Err(H1Error::Incomplete),
                0 => return Ok(None),
                _ => answered = true,
            }
        }
    }

    /// Read more into the buffer; `Ready(Ok(0))` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        std::pin::pin!(self.io.read_buf(&mut self.rbuf)).poll(cx)
    }
}
