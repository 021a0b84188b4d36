//! keyward's own HTTP/1.1 server for the common request: an HTTP/1.1 head without a body
//! and without any header hyper's server gives a meaning of its own (`request`). It reads
//! the head with httparse, hands the request to the same service hyper would, and writes
//! the answer by hyper's rules (`response`), with no dispatcher task state, no per-request
//! buffer and no allocation for the credential header's name.
//!
//! The first request it does not take (a body, an upgrade, `Connection: close`, HTTP/1.0, an
//! HTTP/2 preface, anything invalid) hands the whole connection to hyper with every byte
//! read so far put back in front (`rewind`): hyper then serves, or refuses, the rest, so
//! no input reaches a decision hyper would not have made. `differential` runs both servers
//! on the same byte streams.

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod differential;
pub mod request;
pub mod response;
pub mod rewind;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Weak;
use std::task::Poll;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, Request, Response};
use http_body::Body;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::codec::may_end_head;
use crate::proxy::h2_guard::H2Guard;
use crate::proxy::streams::Holder;
use crate::proxy::RequestBody;
use request::Parsed;
pub use rewind::Rewind;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper's read-buffer size, what a read takes at most.
const READ_CHUNK: usize = 8 * 1024;

/// A new connection's first read: most heads fit (nginx's `client_header_buffer_size`),
/// and a connection that sends little or nothing holds no more (10,000 idle connections
/// each holding 8 KB were a third of the memory they took).
const FIRST_READ: usize = 1024;

/// What keyward's server needs to know, fixed per listener.
#[derive(Debug, Clone)]
pub struct Settings {
    /// hyper's `max_buf_size`: a head that does not fit goes to hyper, which refuses it.
    pub max_buf: usize,
    pub max_headers: usize,
    /// Lower-case custom names read without an allocation.
    pub names: KnownNames,
}

/// Custom names a request's header names are matched against before `http` builds one
/// (an allocation each): indexed by length and first byte, so a name is compared with the
/// one or two known names that could be it, not with all of them (a standard name, most of
/// a request's, with none). Names past the 64th are not indexed: built by `http`, as
/// unknown ones are.
#[derive(Debug, Clone)]
pub struct KnownNames {
    names: Vec<HeaderName>,
    by_len: [u64; 64],
    by_first: [u64; 256],
}

impl KnownNames {
    pub fn new(names: Vec<HeaderName>) -> Self {
        let mut known = KnownNames {
            names,
            by_len: [0; 64],
            by_first: [0; 256],
        };
        for (i, name) in known.names.iter().enumerate().take(64) {
            let n = name.as_str().as_bytes();
            if let (Some(len), Some(&first)) = (known.by_len.get_mut(n.len()), n.first()) {
                *len |= 1 << i;
                known.by_first[usize::from(first)] |= 1 << i;
            }
        }
        known
    }

    /// The known name `raw` spells, in any case.
    pub fn find(&self, raw: &[u8]) -> Option<&HeaderName> {
        let (&len, &first) = (self.by_len.get(raw.len())?, raw.first()?);
        let mut candidates = len & self.by_first[usize::from(first.to_ascii_lowercase())];
        while candidates != 0 {
            let name = &self.names[candidates.trailing_zeros() as usize];
            if name.as_str().as_bytes().eq_ignore_ascii_case(raw) {
                return Some(name);
            }
            candidates &= candidates - 1;
        }
        None
    }
}

/// How keyward's server left a connection.
enum Ended<I> {
    /// Closed, cleanly or not.
    Closed(Result<(), BoxError>),
    /// hyper's from here on, with what was read put back. `served`: a request was
    /// already answered, so the connection is HTTP/1.1 whatever bytes come next (an HTTP/2
    /// preface there is a malformed HTTP/1 request to hyper, not a switch of protocol).
    HandOff { io: Rewind<I>, served: bool },
}

/// hyper's servers, configured once per listener: HTTP/1.1, and HTTP/2 once the preface
/// (or the handshake's ALPN) says so, with as many streams as the connection's share.
pub struct Hyper {
    pub http1: http1::Builder,
    /// hyper's server limited to HTTP/2, for each share of streams in `shares`.
    pub http2: Vec<auto::Builder<TokioExecutor>>,
    /// The shares of streams an HTTP/2 connection may be granted, largest first.
    pub shares: Vec<u32>,
    /// What the shares are granted from, every listener's.
    pub streams: crate::proxy::streams::StreamBudget,
    /// `keyward_h2_floods_total`: HTTP/2 connections closed by their [`H2Guard`].
    pub floods: prometheus::IntCounter,
}

/// The protocol a connection's TLS handshake agreed on (ALPN). Once agreed, the
/// connection speaks it and nothing else (RFC 7301 §3.2), as Envoy's and nginx's do: bytes
/// of the other protocol are a protocol error, not a reason to switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Agreed {
    /// Plain TCP, or a handshake without ALPN: the connection's first bytes decide.
    #[default]
    Nothing,
    Http1,
    Http2,
}

impl Agreed {
    /// From the ALPN protocol the handshake selected, if any.
    pub fn from_alpn(protocol: Option<&[u8]>) -> Self {
        match protocol {
            Some(b"h2") => Self::Http2,
            Some(b"http/1.1") => Self::Http1,
            _ => Self::Nothing,
        }
    }
}

/// Serve one connection: keyward's server first when `fast` is given, hyper's (HTTP/1.1
/// or HTTP/2) from the first request it does not take. [`Close::request`] closes the
/// connection gracefully: at once between requests, after the response in flight;
/// [`Close::go_away`] closes an HTTP/2 one so (GOAWAY) and leaves HTTP/1.1 alone.
/// `agreed` binds the connection to the protocol its TLS handshake chose; `holder` is the
/// connection as the HTTP/2 stream budget sees it.
pub async fn serve_connection<I, S, F, B>(
    io: I,
    service: S,
    fast: Option<&Settings>,
    hyper: &Hyper,
    agreed: Agreed,
    close: &Close,
    holder: Weak<dyn Holder>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Fn(Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    // keyward's server reads HTTP/1.1 alone.
    let fast = fast.filter(|_| agreed != Agreed::Http2);
    let (io, http1) = match fast {
        Some(settings) => match serve(io, &service, settings, close).await {
            Ended::Closed(result) => return result,
            Ended::HandOff { io, served } => {
                let http1 = served || agreed == Agreed::Http1 || io.is_http1();
                (io, http1)
            }
        },
        // Nothing to sniff: the handshake said which.
        None if agreed != Agreed::Nothing => {
            (Rewind::new(Bytes::new(), io), agreed == Agreed::Http1)
        }
        None => match sniff(io, close).await? {
            Some(io) => (io, false),
            None => return Ok(()),
        },
    };
    let to_hyper = service_fn(move |req: Request<Incoming>| service(req.map(Either::Left)));
    if agreed == Agreed::Http2 || (!http1 && io.is_http2()) {
        // Its streams, granted for as long as it is open.
        let (i, _share) = hyper.streams.grant(&hyper.shares, holder);
        // Not `auto`'s upgradeable connection, which reads the protocol from the bytes
        // whatever it is limited to. HTTP/2 has no upgrades to serve. Its control frames
        // are counted (HTTP/1.1 pays nothing for it).
        let io = H2Guard::new(io, hyper.floods.clone());
        let conn = hyper.http2[i].serve_connection(TokioIo::new(io), to_hyper);
        tokio::select! {
            biased;
            // Dropped unfinished: the socket closes and every stream's task goes.
            () = close.evict.notified() => Ok(()),
            ended = drive(conn, close, true) => ended,
        }
    } else {
        // HTTP/1.1, or bytes that ended inside the preface (both readers above read until
        // the bytes leave it, or fill it, or end): hyper's HTTP/1.1 server, which refuses
        // them. Never `auto`, which would read on and could take HTTP/2 without a share.
        let conn = hyper.http1.serve_connection(TokioIo::new(io), to_hyper);
        drive(conn.with_upgrades(), close, false)
            .await
            .map_err(Into::into)
    }
}

/// For hyper's server alone: read the connection's first bytes until they show whether it
/// opens with the HTTP/2 preface (as hyper's own sniff reads them), to be read again by
/// hyper. `None`: told to close first (the stream is then shut down).
async fn sniff<I>(mut io: I, close: &Close) -> io::Result<Option<Rewind<I>>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut read = BytesMut::with_capacity(rewind::H2_PREFACE.len());
    while read.is_empty() || rewind::may_be_http2(&read) {
        let Some(n) = closable(pin!(io.read_buf(&mut read)), close).await else {
            return io.shutdown().await.map(|()| None);
        };
        if n? == 0 {
            break;
        }
    }
    Ok(Some(Rewind::new(read.freeze(), io)))
}

/// A hyper connection that can be told to finish gracefully.
trait Graceful: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B> Graceful for auto::Connection<'_, I, S, TokioExecutor>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: 'static,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        auto::Connection::graceful_shutdown(self);
    }
}

/// Asks a connection to close gracefully, whichever server reads it. Checked, not awaited,
/// by keyward's server between requests: waiting for a head costs no registration.
#[derive(Default)]
pub struct Close {
    requested: AtomicBool,
    /// Draining: an HTTP/2 connection closes gracefully now.
    going_away: AtomicBool,
    /// Wakes hyper's side.
    notify: Notify,
    /// keyward's server is waiting for a request head.
    between: AtomicBool,
    /// Ends an HTTP/2 connection at once ([`Close::evict`]).
    evict: Notify,
}

impl Close {
    /// End an HTTP/2 connection now, its streams with it: its share of the stream budget
    /// went to another connection. Not a GOAWAY: a client that never acknowledges one
    /// (or its PING) would go on opening streams on a share it no longer holds.
    pub fn evict(&self) {
        self.evict.notify_one();
    }

    /// Ask the connection to close. `true`: keyward's server is between requests or inside
    /// a head, with nothing in flight and nothing left to write, so the next poll of the
    /// connection shuts its stream down and ends it, as hyper's graceful shutdown would at
    /// once; `false`: it ends after the request in flight (or hyper's side was told).
    pub fn request(&self) -> bool {
        self.requested.store(true, Ordering::SeqCst);
        self.notify.notify_one();
        self.between.load(Ordering::SeqCst)
    }

    /// Draining has started: an HTTP/2 connection gets its GOAWAY now, its streams in
    /// flight finish and the client opens a new connection for the next ones. An HTTP/1.1
    /// connection, which has no way to say so between requests, is left open: its
    /// responses say `Connection: close` (`respond::close_if_draining`).
    pub fn go_away(&self) {
        self.going_away.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Should a connection (`http2` or not) be shut down gracefully now?
    fn due(&self, http2: bool) -> bool {
        self.requested() || http2 && self.going_away.load(Ordering::SeqCst)
    }
}

/// Run `conn` to its end, asking it to finish gracefully once a close is due. It is polled
/// first: until hyper has read the bytes handed back, a shutdown would close it unserved.
async fn drive<C: Graceful>(conn: C, close: &Close, http2: bool) -> C::Output {
    let mut conn = pin!(conn);
    loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => return result,
            () = close.notify.notified() => {}
        }
        if close.due(http2) {
            break;
        }
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Serve `io` until it closes, a close is requested with no request in flight, or a
/// request comes that hyper must serve. `service` answers every request.
async fn serve<I, S, F, B>(mut io: I, service: &S, settings: &Settings, close: &Close) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Fn(Request<RequestBody>) -> F,
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut conn = Conn {
        buf: BytesMut::new(),
        wbuf: BytesMut::new(),
        spare: HeaderMap::new(),
        spans: Vec::new(),
        date: response::Date::default(),
        first: true,
    };
    loop {
        let req = match conn.read_head(&mut io, settings, close).await {
            Head::Request(req) => req,
            Head::HandOff => {
                let served = !conn.first;
                return Ended::HandOff {
                    io: Rewind::new(conn.buf.freeze(), io),
                    served,
                };
            }
            Head::Closed(result) => return Ended::Closed(result.map_err(Into::into)),
            // As hyper's graceful shutdown does: a clean end (TLS `close_notify`, then FIN).
            Head::Closing => return Ended::Closed(io.shutdown().await.map_err(Into::into)),
        };
        // A target with a fragment is refused; its connection ends with the answer.
        let fragment = req.extensions().get::<request::Fragment>().is_some();
        // Built in place: the service's future is not moved once started.
        let answer = pin!(service(req));
        let resp = match conn.answer(&mut io, answer).await {
            Ok(resp) => resp,
            Err(ended) => return Ended::Closed(ended.map_err(Into::into)),
        };
        let keep_alive = !close.requested() && !fragment;
        let written = response::write(&mut io, resp, keep_alive, &mut conn.buffers()).await;
        match written {
            Ok(false) => {}
            Ok(true) => return Ended::Closed(io.shutdown().await.map_err(Into::into)),
            Err(e) => return Ended::Closed(Err(e.into())),
        }
    }
}

// The request is moved once, to the service; boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Head {
    Request(Request<RequestBody>),
    HandOff,
    Closed(io::Result<()>),
    /// A close was requested while no request was in flight: shut the stream down.
    Closing,
}

/// `read`, or `None` once a close is requested while it waits. The close is requested by
/// the task that polls this connection, which polls it again at once: no waker is needed.
async fn closable<F: Future>(mut read: Pin<&mut F>, close: &Close) -> Option<F::Output> {
    std::future::poll_fn(|cx| match read.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending if close.requested() => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    })
    .await
}

/// A connection's buffers, kept from request to request.
struct Conn {
    /// Bytes read and not yet parsed.
    buf: BytesMut,
    wbuf: BytesMut,
    /// The last response's emptied header map, for the next request's headers.
    spare: HeaderMap,
    /// Scratch for the header positions of the head being read.
    spans: Vec<request::Span>,
    date: response::Date,
    /// No head read yet: hyper first reads until the bytes leave the HTTP/2 preface.
    first: bool,
}

impl Conn {
    fn buffers(&mut self) -> response::Buffers<'_> {
        response::Buffers {
            read: &mut self.buf,
            write: &mut self.wbuf,
            spare: &mut self.spare,
            date: &mut self.date,
        }
    }

    /// Read until a whole head is in, or the connection is done with. As hyper does, a
    /// partial head is parsed again only once the new bytes can end it, and the buffer
    /// never holds more than `max_buf`: hyper, handed the same bytes, decides alike.
    async fn read_head<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        settings: &Settings,
        close: &Close,
    ) -> Head {
        let max_buf = settings.max_buf;
        let mut partial: Option<usize> = None;
        loop {
            let worth_parsing = match partial {
                Some(prev) => may_end_head(&self.buf, prev),
                // hyper reads a new connection until its bytes leave the HTTP/2 preface
                // (or fill it) before it parses anything.
                None => !(self.buf.is_empty() || self.first && rewind::may_be_http2(&self.buf)),
            };
            if worth_parsing {
                match request::parse(&mut self.buf, settings, &mut self.spare, &mut self.spans) {
                    Parsed::Request(req) => {
                        self.first = false;
                        return Head::Request(req);
                    }
                    Parsed::HandOff => return Head::HandOff,
                    Parsed::Partial => {}
                }
            }
            if self.buf.len() >= max_buf {
                return Head::HandOff;
            }
            if worth_parsing {
                partial = Some(self.buf.len());
            }
            // Closing: a connection between requests (or inside a head) ends now, as
            // hyper's graceful shutdown ends it.
            if close.requested() {
                return Head::Closing;
            }
            // Once the last request is gone, this takes back the whole buffer.
            let room = max_buf - self.buf.len();
            let chunk = if self.first && self.buf.capacity() == 0 {
                FIRST_READ
            } else {
                READ_CHUNK
            };
            self.buf.reserve(room.min(chunk));
            close.between.store(true, Ordering::SeqCst);
            let read = {
                let mut limited = (&mut self.buf).limit(room);
                closable(pin!(io.read_buf(&mut limited)), close).await
            };
            close.between.store(false, Ordering::SeqCst);
            let Some(read) = read else {
                return Head::Closing;
            };
            match read {
                // A head cut short: hyper has its say on it (no answer, but an HTTP/2
                // preface cut short is an HTTP/1 request to it, and refused).
                Ok(0) if !self.buf.is_empty() => return Head::HandOff,
                Ok(0) => return Head::Closed(Ok(())),
                Ok(_) => {}
                Err(e) => return Head::Closed(Err(e)),
            }
        }
    }

    /// Wait for the service's answer. The client leaving meanwhile drops the request
    /// (with its upstream exchange), as hyper does; once it has sent more (a pipelined
    /// request), that is kept and the connection no longer watched. As hyper does, the
    /// client's end is looked for once before the service first runs: a client that has
    /// already left (a request pipelined before its FIN) has nothing run on its behalf
    /// upstream. Costs no syscall when the last read drained the socket.
    async fn answer<I, F, B>(
        &mut self,
        io: &mut I,
        mut answer: Pin<&mut F>,
    ) -> Result<Response<B>, io::Result<()>>
    where
        I: AsyncRead + Unpin,
        F: Future<Output = Result<Response<B>, Infallible>>,
    {
        if self.buf.is_empty() {
            let watched =
                std::future::poll_fn(|cx| Poll::Ready(response::poll_watch(io, cx, &mut self.buf)))
                    .await;
            if let Poll::Ready(Err(left)) = watched {
                return Err(left.into_end());
            }
        }
        loop {
            tokio::select! {
                biased;
                resp = answer.as_mut() => return Ok(match resp {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }),
                sent = std::future::poll_fn(|cx| response::poll_watch(io, cx, &mut self.buf)),
                    if self.buf.is_empty() =>
                {
                    if let Err(left) = sent {
                        return Err(left.into_end());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_name_is_found_in_any_case_and_nothing_else_is() {
        let many: Vec<HeaderName> = (0..70)
            .map(|i| HeaderName::from_bytes(format!("x-name-{i:02}").as_bytes()).unwrap())
            .collect();
        let mut names = vec![
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("traceparent"),
        ];
        names.extend(many);
        let known = KnownNames::new(names);
        assert_eq!(
            known.find(b"X-API-Key").map(HeaderName::as_str),
            Some("x-api-key")
        );
        assert_eq!(
            known.find(b"traceparent").map(HeaderName::as_str),
            Some("traceparent")
        );
        assert_eq!(
            known.find(b"x-name-03").map(HeaderName::as_str),
            Some("x-name-03")
        );
        // Past the 64th: left to `http`, as an unknown name is.
        assert_eq!(known.find(b"x-name-65"), None);
        for other in [
            &b"x-api-kez"[..],
            b"x-api-ke",
            b"",
            b"accept",
            b"user-agent",
            &[b'x'; 80],
        ] {
            assert_eq!(known.find(other), None, "{other:?}");
        }
    }
}
