//! The upstream leg: the per-thread keep-alive pool, the forwarded request, the returned
//! response, and upgrade tunnels.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::conn::Slot;
use super::h1::{self, H1Error};
use super::headers::{self, Identity};
use super::pool::{self, Owner, Pool, PoolConfig};
use super::upload::{self, BodyPace, OutBody, Progress, Upload, UploadError};
use super::upstream_target::{UpstreamStream, UpstreamTarget};
use super::watch::{Guarded, KeyWatch, LastActive, TunnelWatch, Watched};
use super::{Body, RequestBody, UpstreamBody};
use crate::config::{Limits, UpstreamAddr, UpstreamClient};
use crate::metrics::UpstreamErrorKind;

/// Why the upstream leg failed; the status follows from it (connect → 502, timeout → 504).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream connect failed")]
    Connect(#[source] pool::ConnectError),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("bad upstream target")]
    Target(#[source] http::uri::InvalidUri),
    #[error("upstream exchange failed")]
    Exchange(#[source] hyper::Error),
    #[error("upstream exchange failed")]
    Fast(#[source] H1Error),
    /// The upstream switched protocols on a request keyward did not forward as an upgrade.
    #[error("101 Switching Protocols without an allowed upgrade")]
    UnexpectedUpgrade,
    /// A status past 599 (RFC 9110 15: three digits, 100 to 599): clients may refuse it,
    /// or read it as whatever class they guess.
    #[error("status {0} is outside 100-599")]
    Status(u16),
    /// The client's request body failed while it was streamed upstream: the client's fault
    /// (400), not the upstream's.
    #[error("request body from the client failed")]
    RequestBody(#[source] hyper::Error),
    /// The client's request body went `limits.body_stall_timeout` without a byte.
    #[error("request body stalled: no byte for {0:?}")]
    BodyStalled(Duration),
    /// The client's request body fell below `limits.body_min_rate`.
    #[error("request body too slow")]
    BodyTooSlow,
    /// The client went away mid-body (its connection closed or reset).
    #[error("the client went away during its request body")]
    ClientGone,
    /// The client's request body came in chunks too small to be anything but a flood.
    #[error("request body in chunks too small")]
    BodyFragmented,
    /// The key the request was let in with stopped standing while its body streamed up:
    /// answered as that key would be now.
    #[error("the key stopped standing during the request body")]
    KeyGone(crate::auth::Reject),
}

impl ProxyError {
    pub fn kind(&self) -> UpstreamErrorKind {
        match self {
            ProxyError::Connect(_) => UpstreamErrorKind::Connect,
            ProxyError::Timeout(_) => UpstreamErrorKind::Timeout,
            ProxyError::Target(_)
            | ProxyError::Exchange(_)
            | ProxyError::Fast(_)
            | ProxyError::UnexpectedUpgrade
            | ProxyError::Status(_)
            | ProxyError::RequestBody(_)
            | ProxyError::BodyStalled(_)
            | ProxyError::BodyTooSlow
            | ProxyError::BodyFragmented
            | ProxyError::ClientGone
            | ProxyError::KeyGone(_) => UpstreamErrorKind::Other,
        }
    }

    /// Did the upstream fail (counted and logged as an upstream error), or the client?
    pub fn is_upstream_fault(&self) -> bool {
        !matches!(
            self,
            ProxyError::RequestBody(_)
                | ProxyError::BodyStalled(_)
                | ProxyError::BodyTooSlow
                | ProxyError::BodyFragmented
                | ProxyError::ClientGone
                | ProxyError::KeyGone(_)
        )
    }

    pub fn reject(&self) -> crate::auth::Reject {
        match self {
            ProxyError::Timeout(_) => crate::auth::Reject::UpstreamTimeout,
            ProxyError::RequestBody(_) | ProxyError::BodyFragmented => {
                crate::auth::Reject::BadRequest(crate::auth::reject::BadRequest::Body)
            }
            ProxyError::BodyStalled(_) | ProxyError::BodyTooSlow => {
                crate::auth::Reject::BadRequest(crate::auth::reject::BadRequest::BodyStalled)
            }
            ProxyError::KeyGone(reject) => reject.clone(),
            ProxyError::ClientGone => crate::auth::Reject::ClientGone,
            _ => crate::auth::Reject::UpstreamUnavailable,
        }
    }
}

/// An exchange after which the connection may hold bytes that belong to no request or no
/// response, so it is closed rather than pooled:
/// - a request body the app may not have read: an app that answers without reading it
///   reads the body as its next request on the connection, whatever it says (forged
///   `x-auth-*` included; a public route needs no key for it), and that answer goes to the
///   next client sent there. Apps commonly do so on methods that define no meaning for a
///   body (GET, HEAD, DELETE, OPTIONS, TRACE), and naive ones on any method (a handler that
///   answers before reading, an error path). So after any body, unless
///   `upstream_reuse_after_body` says the app reads or drains every body (Go, Node, Java
///   servlet containers, ASP.NET, hyper and uvicorn do), and then only after a POST, PUT
///   or PATCH: a body on any other method (the ones above, WebDAV's, `QUERY`, one the app
///   does not know and refuses through an error path) is closed after even then;
/// - HEAD: an app that answers it as a GET (`do_HEAD = do_GET`) sends a body after the
///   head, and bytes that arrive after the response was taken as complete would answer the
///   next request.
fn may_leave_bytes_behind(req: &Request<RequestBody>, reuse_after_body: bool) -> bool {
    let method = req.method();
    if *method == Method::HEAD {
        return true;
    }
    let body = !http_body::Body::is_end_stream(req.body());
    body && (!reuse_after_body || !matches!(*method, Method::POST | Method::PUT | Method::PATCH))
}

/// The client's `Content-Length` as the number hyper read it as (`05` is 5): forwarded as
/// spelled, a length an app's parser reads otherwise, or refuses, would frame the body there
/// differently from here.
fn canonical_length(req: &mut Request<RequestBody>) {
    // A bodiless request (most) has nothing to frame: no header lookup for it.
    if http_body::Body::is_end_stream(req.body())
        || !req.headers().contains_key(header::CONTENT_LENGTH)
    {
        return;
    }
    if let Some(n) = http_body::Body::size_hint(req.body()).exact() {
        let canonical = HeaderValue::from(n);
        let mut sent = req.headers().get_all(header::CONTENT_LENGTH).iter();
        // Repeated with one value (HTTP/2 lets a client send that): one line, as an
        // HTTP/1.1 client's is; strict apps (Node) refuse two.
        let (first, repeated) = (sent.next(), sent.next().is_some());
        if repeated || first != Some(&canonical) {
            req.headers_mut().insert(header::CONTENT_LENGTH, canonical);
        }
    }
}

/// A response that has no body whatever its headers say (204, 304): an app whose naive code
/// writes one anyway, in a later write, leaves bytes on the connection that would answer
/// the next request sent there, another client's. Its connection is closed after it, as
/// after a HEAD.
fn bodiless_status(status: StatusCode) -> bool {
    matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

/// The app behind keyward, reached over this worker thread's keep-alive pool.
pub struct Upstream {
    /// The `Host` sent when the client's request named none.
    host: HeaderValue,
    /// Also names this upstream's pool on every worker thread.
    pool: Arc<PoolConfig>,
    timeout: Duration,
    /// `limits.body_stall_timeout` and `limits.body_min_rate`: see [`Upload`].
    body_pace: BodyPace,
    /// `Fast`: bodiless requests go through keyward's own HTTP/1.1 client (`h1`).
    client: UpstreamClient,
    /// `upstream_reuse_after_body`: see [`may_leave_bytes_behind`].
    reuse_after_body: bool,
}

impl Upstream {
    /// `upstream` is `None` in decision mode without a proxy listener: never connected to.
    pub fn new(upstream: Option<&UpstreamAddr>, limits: &Limits, client: UpstreamClient) -> Self {
        Self {
            client,
            host: UpstreamTarget::default_host(upstream),
            pool: Arc::new(PoolConfig::new(
                UpstreamTarget::from_config(upstream),
                limits,
            )),
            timeout: limits.upstream_timeout,
            body_pace: BodyPace {
                gap: limits.body_stall_timeout,
                min_rate: limits.body_min_rate,
            },
            reuse_after_body: false,
        }
    }

    /// `upstream_ack_at_once`: acknowledge an answer as its connection goes back to the pool.
    pub fn acking_at_once(mut self, yes: bool) -> Self {
        Arc::make_mut(&mut self.pool).ack_at_once = yes;
        self
    }

    /// `upstream_reuse_across_keys`: let a pooled connection carry any key's requests.
    pub fn reusing_across_keys(mut self, yes: bool) -> Self {
        Arc::make_mut(&mut self.pool).across_keys = yes;
        self
    }

    /// Pool the connection after a request body too (`upstream_reuse_after_body`): for an
    /// app known to read or drain every body.
    pub fn reusing_after_body(mut self, yes: bool) -> Self {
        self.reuse_after_body = yes;
        self
    }

    /// The addresses keyward's listeners were bound to, known only after binding: an
    /// upstream connection that reaches one of them is refused (see
    /// [`UpstreamTarget::connect`]).
    pub fn refuse_loops_to(&mut self, own: Vec<SocketAddr>) {
        Arc::make_mut(&mut self.pool).own_listeners = own;
    }

    /// Which client bodiless requests go through (`upstream_client`).
    pub fn client(&self) -> UpstreamClient {
        self.client
    }

    /// Start the reaper of a worker's idle upstream connections, so a quiet pool does not
    /// hold sockets forever. Each worker calls it once for its pool; it ends with the
    /// worker's runtime.
    pub fn spawn_reaper(&self, pool: Pool) {
        let (cfg, idle) = (Arc::downgrade(&self.pool), self.pool.idle_timeout);
        tokio::spawn(async move {
            // Often enough that connections the upstream closed do not pile up in the pool
            // (checkout skips them but does not sweep).
            let period = idle.clamp(Duration::from_millis(100), Duration::from_secs(5));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Ends once the upstream is gone (only ever in tests: one per `App`).
                let Some(cfg) = cfg.upgrade() else { break };
                pool.reap(&cfg);
            }
        });
    }

    /// A client connection ended: see [`Pool::forget`].
    pub fn forget_conn(&self, pool: &Pool, conn: super::pool::ConnOwner) {
        pool.forget(&self.pool, conn);
    }

    /// The origin-form target sent upstream: the normalized path + query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
        let pq = match query {
            Some(q) if !q.is_empty() => PathAndQuery::try_from(format!("{path}?{q}")),
            _ => PathAndQuery::try_from(path),
        }
        .map_err(ProxyError::Target)?;
        Ok(Uri::from(pq))
    }

    /// Send the prepared request; the response head must arrive within `upstream_timeout`
    /// of the request's last byte (a body is metered, see [`Upload`]: `busy` gives it its
    /// `max_in_flight` slot). Returns the response and the time to its head. `pool` is the
    /// serving worker's. A request without a body that is not an `upgrade` goes on the fast
    /// path when it is on.
    pub async fn send(
        &self,
        pool: &Pool,
        mut req: Request<RequestBody>,
        (identity, conn): (Option<Identity<'_>>, super::pool::ConnOwner),
        upgrade: bool,
        busy: impl FnOnce() -> Option<super::upload::Place>,
        body_watch: impl FnOnce() -> Option<KeyWatch>,
    ) -> Result<(Response<UpstreamBody>, Duration), ProxyError> {
        // An HTTP/1.x body of no stated length is chunked: its chunks are judged (`Upload`).
        let http2 = req.version() == Version::HTTP_2;
        let chunked = !http2 && http_body::Body::size_hint(req.body()).exact().is_none();
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }
        canonical_length(&mut req);
        let owner = self
            .pool
            .owner(identity.as_ref().map(|i| i.key.id.as_str()), conn);
        let start = Instant::now();
        let fast = self.client == UpstreamClient::Fast && !upgrade && h1::fits(&req);
        let reuse = !may_leave_bytes_behind(&req, self.reuse_after_body);
        if !reuse {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        // One clock read for both (each is a `clock_gettime`, ~19 of them per request).
        let head_start = tokio::time::Instant::from_std(start);
        let progress = (!fast && !http_body::Body::is_end_stream(req.body()))
            .then(|| Progress::new(head_start));
        // The stream hyper's exchange went over, to cut it if the request is given up while
        // hyper still drives it ([`UpstreamStream::abort_watched`]).
        let used = std::sync::Mutex::new(None);
        let exchange = async {
            if fast {
                self.exchange_fast(pool, req, identity, (start, owner), reuse)
                    .await
            } else {
                if let Some(identity) = identity {
                    headers::add_identity(req.headers_mut(), identity.headers());
                }
                let req = req.map(|body| match (body, &progress) {
                    (http_body_util::Either::Left(body), Some(progress)) => OutBody::Left(
                        Upload::new(body, self.body_pace, progress.clone(), body_watch())
                            .judging_chunks(chunked),
                    ),
                    _ => OutBody::Right(http_body_util::Empty::new()),
                });
                let resp = self
                    .exchange(pool, req, (start, owner), reuse, &used)
                    .await?;
                Ok(resp.map(http_body_util::Either::Left))
            }
        };
        let mut exchange = std::pin::pin!(exchange);
        // The head is due `upstream_timeout` after the body's last byte: a steady upload
        // longer than that is not cut off (the body's own stall bounds a slow one).
        let answered = loop {
            let from = progress.as_ref().map_or(head_start, |p| p.last());
            match tokio::time::timeout_at(from + self.timeout, exchange.as_mut()).await {
                Ok(answered) => break Some(answered),
                Err(_) if progress.as_ref().is_some_and(|p| p.last() > from) => continue,
                Err(_) => break None,
            }
        };
        let take_used = || used.lock().unwrap_or_else(|e| e.into_inner()).take();
        match answered {
            None => {
                // No answer: what hyper still drives (an upload the app never reads, a
                // connection the app never answers on) is cut with the request, not left
                // holding a socket and its buffers for as long as the app keeps it open.
                if let Some(stream) = take_used() {
                    UpstreamStream::abort_watched(&stream);
                }
                Err(ProxyError::Timeout(self.timeout))
            }
            Some(Err(e)) => Err(e),
            Some(Ok(resp)) if resp.status().as_u16() > 599 => {
                Err(ProxyError::Status(resp.status().as_u16()))
            }
            Some(Ok(mut resp)) => {
                if let Some(progress) = &progress {
                    progress.answered(busy);
                    if !progress.has_ended() {
                        if let Some(stream) = take_used() {
                            let gap = self.body_pace.gap;
                            tokio::spawn(upload::watch_stall(progress.clone(), gap, stream));
                        }
                        // An HTTP/1.1 client's connection closes after an answer that left
                        // its body unread; an HTTP/2 client's stream is reset once the
                        // answer is delivered (`downstream_response`).
                        if http2 {
                            let ends = upload::AnswerEnds::new(progress.clone());
                            resp.extensions_mut().insert(ends);
                        }
                    }
                }
                // keyward answers its client in its own HTTP version, whatever the
                // upstream's: an HTTP/1.0 upstream answer reaches an HTTP/1.1 client as
                // HTTP/1.1 (chunked when it has no length, and kept alive), from hyper's
                // server as from keyward's.
                *resp.version_mut() = Version::HTTP_11;
                Ok((resp, start.elapsed()))
            }
        }
    }

    /// One exchange over a pooled connection. A pooled connection the upstream closed while
    /// idle hands the unsent request back; it is sent once more, on a new connection.
    async fn exchange(
        &self,
        pool: &Pool,
        req: Request<OutBody>,
        (start, owner): (Instant, Owner),
        reuse: bool,
        used: &std::sync::Mutex<Option<Weak<UpstreamStream>>>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut req = req;
        let mut pooled = pool.checkout(&self.pool, start, owner);
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(conn) => conn,
                // Boxed: connecting is rare, and its future would otherwise grow every
                // request's state.
                None => Box::pin(pool::connect(&self.pool))
                    .await
                    .map_err(ProxyError::Connect)?,
            };
            *used.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.stream());
            match conn.sender.try_send_request(req).await {
                Ok(resp) => {
                    if reuse && !bodiless_status(resp.status()) {
                        pool.checkin(&self.pool, conn, start, owner);
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(send_error(e.into_error())),
                },
            }
        }
    }
}

impl Upstream {
    /// One bodiless exchange on the fast path. A pooled connection that fails before any
    /// byte of an answer (the upstream closed it while idle) is replaced by a new one and
    /// the request sent again: always when the head could not be written, and only for an
    /// idempotent method once it was (the upstream may have acted on it).
    async fn exchange_fast(
        &self,
        pool: &Pool,
        req: Request<RequestBody>,
        identity: Option<Identity<'_>>,
        (start, owner): (Instant, Owner),
        reuse: bool,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let (mut parts, _empty) = req.into_parts();
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut pooled = pool.checkout_fast(&self.pool, start, owner);
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(conn) => conn,
                None => Box::pin(pool::connect_fast(&self.pool))
                    .await
                    .map_err(ProxyError::Connect)?,
            };
            let identified = identity.into_iter().flat_map(Identity::headers);
            conn.encode_head(
                &parts.method,
                target,
                parts.headers.iter().chain(identified),
            );
            let written = conn.write_head().await;
            if let Err(e) = written {
                if reused {
                    continue;
                }
                return Err(ProxyError::Fast(H1Error::Io(e)));
            }
            // A reused connection the upstream had closed ends in EOF or, as the request
            // reached a closed socket, in a reset: both mean no answer is coming on it.
            let (mut head, ready) = match conn.read_head(&parts.method, &mut parts.headers).await {
                Ok(Some(parsed)) => parsed,
                Ok(None) | Err(H1Error::Io(_)) if reused && parts.method.is_idempotent() => {
                    continue
                }
                Ok(None) => return Err(ProxyError::Fast(H1Error::Incomplete)),
                Err(e) => return Err(ProxyError::Fast(e)),
            };
            head.keep_alive &= reuse && !bodiless_status(head.status);
            let home = pool::Return::new(pool, &self.pool, start, owner);
            let resp = h1::response(conn, head, ready, home);
            return Ok(resp.map(http_body_util::Either::Right));
        }
    }
}

fn send_error(e: hyper::Error) -> ProxyError {
    match upload_error(&e) {
        Some(UploadError::Stalled(gap)) => ProxyError::BodyStalled(*gap),
        Some(UploadError::TooSlow(_)) => ProxyError::BodyTooSlow,
        Some(UploadError::KeyGone(reject)) => ProxyError::KeyGone(reject.clone()),
        Some(UploadError::Client(inner)) if client_went_away(inner) => ProxyError::ClientGone,
        Some(UploadError::Client(_)) => ProxyError::RequestBody(e),
        Some(UploadError::Fragmented) => ProxyError::BodyFragmented,
        Some(UploadError::Overload | UploadError::AnswerDelivered) => ProxyError::Exchange(e),
        None => ProxyError::Exchange(e),
    }
}

/// Did the client's body break off because its connection ended (closed or reset), rather
/// than for its framing? Then the client is gone, not wrong: 499, not a `denied` 400.
fn client_went_away(e: &hyper::Error) -> bool {
    use std::io::ErrorKind as K;
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
            );
        }
        src = err.source();
    }
    false
}

/// The request body's own error, if that is why hyper failed the exchange (every body sent
/// upstream is an [`Upload`], so a client's failure or stall is found here).
fn upload_error<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e UploadError> {
    let mut src = Some(e);
    while let Some(err) = src {
        if let Some(u) = err.downcast_ref::<UploadError>() {
            return Some(u);
        }
        src = err.source();
    }
    None
}

/// The error and its causes, `: `-separated, for the log line (error path only).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Is this an HTTP/1.1 WebSocket handshake (`Connection: upgrade` + `Upgrade: websocket`)?
/// Only WebSocket is tunnelled: any other `Upgrade` (above all `h2c`, which would turn the
/// tunnel into an HTTP/2 connection to the upstream that keyward no longer sees) is dropped
/// with the other hop-by-hop headers and the request is forwarded as plain HTTP/1.1. So is
/// a request with a body, or of another method than GET (RFC 6455 4.1): forwarded as an
/// upgrade, it went with `Upgrade` beside the `Connection: close` its body called for, a
/// header a lax app would switch on, and the bytes after a `101` were tunnelled.
pub fn wants_upgrade<B: http_body::Body>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && req.body().is_end_stream()
        && upgrades_to_websocket(req.headers())
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// One `Upgrade` field, naming `websocket` alone: what a handshake keyward forwards carries,
/// and what the app's `101` must answer with (one that switches to another protocol, `h2c`,
/// would make the tunnel a connection to the app keyward never sees a request of).
pub fn upgrades_to_websocket(headers: &http::HeaderMap) -> bool {
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    matches!(
        (upgrades.next(), upgrades.next()),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket")
    )
}

/// After a `101` from the upstream, splice the two upgraded connections together. The
/// tunnel holds the client connection's `slot` until it closes, until it has moved no
/// byte either way for `idle` (`limits.tunnel_idle_timeout`), or until `watch` ends it.
pub fn spawn_tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream_resp: &mut Response<UpstreamBody>,
    slot: Option<Slot>,
    busy: super::worker::Busy,
    idle: Duration,
    watch: TunnelWatch,
) {
    let upstream = hyper::upgrade::on(upstream_resp);
    tokio::spawn(async move {
        // The tunnel holds its connection slot, and its upstream connection counts against
        // max_in_flight, for as long as it is open.
        let _held = (slot, busy);
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let last = LastActive::new();
        let mut down = Watched::new(TokioIo::new(down), last.clone());
        let mut up = Watched::new(TokioIo::new(up), last.clone());
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut down, &mut up) => {
                if let Err(e) = copied {
                    debug!(error = %e, "tunnel closed");
                }
            }
            () = last.idle_for(idle) => debug!(?idle, "tunnel idle; closed"),
            why = watch.ended() => debug!(why, "tunnel closed"),
        }
    });
}

/// The response's `Content-Length` as a client may take it: none on a 1xx or a 204 (RFC 9110
/// 8.6: an HTTP/2 client resets the stream over one, and the whole answer is lost), and
/// one value where the app sent a list of the same (`2, 2`, which the upstream client took
/// as 2 but an HTTP/2 client refuses, and an HTTP/1.1 one may read otherwise).
fn one_content_length(headers: &mut http::HeaderMap, status: StatusCode) {
    use http::header::CONTENT_LENGTH;
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        headers.remove(CONTENT_LENGTH);
        return;
    }
    let mut all = headers.get_all(CONTENT_LENGTH).iter();
    let listed = match (all.next(), all.next()) {
        (Some(one), None) => one.as_bytes().contains(&b','),
        (None, _) => false,
        (Some(_), Some(_)) => true,
    };
    if !listed {
        return;
    }
    let values: Option<Vec<u64>> = headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("x").split(','))
        .map(|n| n.trim().parse().ok())
        .collect();
    // The upstream client accepted the response, so the values agree; if not, none goes.
    headers.remove(CONTENT_LENGTH);
    if let Some(values) = values {
        if let Some(&n) = values.first().filter(|n| values.iter().all(|v| v == *n)) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

/// The upstream's response, minus hop-by-hop headers (an upgrade keeps its own).
pub fn downstream_response(
    resp: Response<UpstreamBody>,
    watch: Option<KeyWatch>,
) -> Response<Body> {
    let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let (mut parts, body) = resp.into_parts();
    // The body was framed by Transfer-Encoding, which goes with the hop-by-hop headers: a
    // Content-Length beside it is not the body's, and must not go on (RFC 9112 6.3), or
    // the client would cut the body at it, or an HTTP/2 client reset the stream.
    if parts.headers.contains_key(http::header::TRANSFER_ENCODING) {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    one_content_length(&mut parts.headers, parts.status);
    // An upgrade keeps `Upgrade` and gets `Connection: upgrade` back.
    super::headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    let place = parts.extensions.remove::<super::worker::Keyless>();
    let upload = parts.extensions.remove::<upload::AnswerEnds>();
    Response::from_parts(
        parts,
        http_body_util::Either::Left(Guarded::new(body, watch, place, upload)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_target_and_host_come_from_the_config() {
        let up = |u: &str| {
            let addr: UpstreamAddr = serde_yaml::from_str(u).unwrap();
            Upstream::new(Some(&addr), &Limits::default(), UpstreamClient::Fast)
        };
        let tcp = up("http://127.0.0.1:3000");
        assert_eq!(
            tcp.pool.target,
            UpstreamTarget::Tcp("127.0.0.1:3000".into())
        );
        assert_eq!(tcp.host, "127.0.0.1:3000");
        let unix = up("unix:/run/app/app.sock");
        assert_eq!(
            unix.pool.target,
            UpstreamTarget::Unix("/run/app/app.sock".into())
        );
        assert_eq!(unix.host, "localhost");
    }
}
