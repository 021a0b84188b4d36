//! A worker's connections, as the balancer admits them (`balance`): HTTP/1.1 + h2c
//! (+ TLS), request-head limits, idle connections, and draining.
//!
//! Limits that hold a connection slot are all bounded by time, by one watchdog per
//! connection rather than a timer per request: a connection without a complete first request
//! head within `header_read_timeout` (silent, trickling a slowloris head, or stopped inside
//! the HTTP/2 preface) is shut down and dropped at most a second later, and one with no
//! request in flight for `idle_timeout` after that (keep-alive, or a later head that stalls;
//! HTTP/1.1 or HTTP/2) is shut down.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::balance::Connections;
use super::conn::{ConnInfo, Serving};
use super::head::HYPER_MIN_BUF;
use super::streams::{Holder, StreamBudget};
use super::worker::Worker;
use super::writing::{self, Responses};
use super::{h1, handler, headers, respond, RequestBody};
use crate::auth::Code;
use crate::config::{CredentialSource, Http1Server, Limits};
use crate::tls::TlsAcceptor;
use crate::App;

/// HTTP/2 streams the client reset before keyward accepted them; more is a rapid-reset
/// flood (CVE-2023-44487) and the connection is closed with `ENHANCE_YOUR_CALM`.
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// HTTP/2 streams keyward had to reset because the client broke the protocol on them;
/// more and the connection is closed (CVE-2024-27316-style floods).
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Response bytes an HTTP/2 stream may hold ahead of the client's reading them: one full
/// frame. hyper's default (400 KB a stream) let a client that opened its flow-control
/// windows and never read park that much per stream, up to `limits.max_in_flight` of them
/// (1.6 GB for a few connections on a public route). The kernel's send buffer keeps a fast
/// client's downloads moving; this is only what waits in front of it.
pub const H2_STREAM_SEND_BUFFER: usize = 16 * 1024;

/// Where a listener is in its shutdown (SPEC 12), in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// SIGTERM came: still accepting for `drain_delay`, but every connection is let go as
    /// soon as that loses no request (an HTTP/2 GOAWAY now, HTTP/1.1 after its next
    /// response), so none is closed under a client later.
    Draining,
    /// The listener is closed: connections finish what is in flight, within `grace`.
    Closing,
}

/// The first phase after `told` (`Closing` if the sender is gone).
async fn after(phase: &mut watch::Receiver<Phase>, told: Phase) -> Phase {
    let next = phase.wait_for(|p| *p > told).await;
    next.map_or(Phase::Closing, |p| *p)
}

/// [`after`], or [`Phase::Draining`] once a serving connection is `aged_at`: it is then
/// drained alone (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close` on its next response).
///
/// `None`: the connection is `overdue`, past its age and the grace after it, and is closed
/// whatever it is doing. An HTTP/2 peer that never acknowledges the GOAWAY's PING would
/// otherwise keep opening streams on it for good (and keep what its TLS handshake got).
async fn after_or_aged(
    phase: &mut watch::Receiver<Phase>,
    told: Phase,
    aged_at: Option<Instant>,
    overdue: Duration,
) -> Option<Phase> {
    let (at, then) = match (aged_at, told) {
        (Some(at), Phase::Serving) => (at, Some(Phase::Draining)),
        (Some(at), Phase::Draining) => (at + overdue, None),
        _ => return Some(after(phase, told).await),
    };
    tokio::select! {
        next = after(phase, told) => Some(next),
        () = tokio::time::sleep_until(at) => then,
    }
}

/// How long a connection that never completed a request head may take to close once told.
const UNSERVED_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The HTTP/1.1 + HTTP/2 server settings, built once.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // No HTTP/1 timer: hyper would arm one for every request head, keep-alive idle time
        // included; `serve_conn`'s watchdog bounds heads instead, once per connection
        // (callgrind: 2.6% of the instructions per proxied request).
        .header_read_timeout(None)
        // hyper's read buffer is at least 8 KiB; a smaller `max_header_bytes` is enforced
        // exactly by `check_head`.
        .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_BUF))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        // What a client may send ahead of keyward's reading it, buffered here: hyper's
        // defaults (2 and 5 MiB) let a client on a public route whose app reads slowly
        // park 1.5 MB a connection (`limits.h2_stream_window`, `h2_connection_window`).
        .initial_stream_window_size(limits.h2_stream_window)
        .initial_connection_window_size(limits.h2_connection_window)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(Some(H2_MAX_PENDING_ACCEPT_RESET_STREAMS))
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_send_buf_size(H2_STREAM_SEND_BUFFER);
    builder
}

/// hyper's HTTP/1.1 server alone, with the same settings as [`http_builder`]'s: for a
/// connection keyward's own server handed over.
pub fn http1_builder(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_BUF))
        .max_headers(limits.max_headers);
    builder
}

/// Both of hyper's servers, for a listener. `floods` counts the HTTP/2 connections closed
/// for their control frames (`keyward_h2_floods_total`).
pub fn hyper_servers(
    limits: &Limits,
    streams: StreamBudget,
    floods: prometheus::IntCounter,
) -> h1::server::Hyper {
    let shares = super::streams::shares(limits.h2_max_concurrent_streams);
    let http2 = shares
        .iter()
        .map(|&n| {
            let mut builder = http_builder(limits);
            builder.http2().max_concurrent_streams(n);
            builder.http2_only()
        })
        .collect();
    h1::server::Hyper {
        http1: http1_builder(limits),
        http2,
        shares,
        streams,
        floods,
    }
}

/// Serve `connections` until `phase` turns [`Phase::Closing`] (or they end), then wait up
/// to `grace` for open connections (and tunnels) to finish; [`Phase::Draining`] is passed
/// on to each. Each arrives admitted: it holds its `max_connections` slot.
/// `door` answers each request: the proxy's [`super::handler::handle`], or the decision
/// listener's. Both get the same connection limits, watchdog (head, idle and write-stall
/// bounds) and drain. `worker` is what the serving thread owns; every request gets it.
pub async fn serve<D, F>(
    app: Arc<App>,
    worker: Worker,
    mut connections: Connections,
    tls: Option<TlsAcceptor>,
    mut phase: watch::Receiver<Phase>,
    grace: Duration,
    door: D,
) where
    D: Fn(Arc<Serving>, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<super::Body>, std::convert::Infallible>> + Send + 'static,
{
    let hyper = Arc::new(hyper_servers(
        &app.config.limits,
        app.h2_streams.clone(),
        app.metrics.h2_floods(),
    ));
    let fast = fast_server(&app.config).map(Arc::new);
    // Every connection task (and tunnel) holds a receiver: `drain_tx.closed()` resolves
    // when all are gone.
    let (drain_tx, drain_rx) = watch::channel(Phase::Serving);
    loop {
        let told = *drain_tx.borrow();
        let next_phase = after(&mut phase, told);
        let (stream, admitted) = tokio::select! {
            accepted = connections.next() => match accepted {
                Some(Ok(accepted)) => accepted,
                None => break,
                Some(Err(e)) => {
                    warn!(error = %e, "cannot register a connection");
                    continue;
                }
            },
            next = next_phase => match next {
                Phase::Closing => break,
                _ => {
                    let _ = drain_tx.send(next);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let hyper = hyper.clone();
        let fast = fast.clone();
        let drain = drain_rx.clone();
        let tls = tls.clone();
        let door = door.clone();
        let worker = worker.clone();
        let owner = worker.next_conn_owner();
        tokio::spawn(async move {
            // Whatever way the connection ends, its own upstream connections go with it.
            let _forget = Forget {
                app: app.clone(),
                worker: worker.clone(),
                owner,
            };
            // The slot and the worker's open count go with the last copy of the
            // connection's `ConnInfo` (a WebSocket tunnel holds one).
            let peer = admitted.peer;
            match tls {
                None => {
                    let conn = ConnInfo::new(peer, false, owner).holding(
                        admitted,
                        drain.clone(),
                        app.h2_streams.proof(),
                    );
                    let server = Server {
                        hyper: &hyper,
                        fast: fast.as_deref(),
                        agreed: h1::server::Agreed::Nothing,
                    };
                    serve_conn(app, worker, server, drain, stream, conn, door).await;
                }
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        let conn = ConnInfo::new(peer, true, owner).holding(
                            admitted,
                            drain.clone(),
                            app.h2_streams.proof(),
                        );
                        let server = Server {
                            hyper: &hyper,
                            fast: fast.as_deref(),
                            agreed: h1::server::Agreed::from_alpn(
                                stream.get_ref().1.alpn_protocol(),
                            ),
                        };
                        serve_conn(app, worker, server, drain, stream, conn, door).await;
                    }
                    Err(e) => debug!(%peer, error = %e, "TLS handshake failed"),
                },
            }
        });
    }
    drop(connections);
    drop(drain_rx);
    info!("listener closed; waiting for in-flight requests");
    let _ = drain_tx.send(Phase::Closing);
    tokio::select! {
        () = drain_tx.closed() => info!("all connections finished"),
        () = tokio::time::sleep(grace) => {
            worker.cut_off();
            warn!(?grace, "grace period over; closing remaining connections");
        }
    }
}

/// Drops a client connection's own idle upstream connections when its task ends
/// ([`crate::proxy::pool::Pool::forget`]).
struct Forget {
    app: Arc<App>,
    worker: Worker,
    owner: super::pool::ConnOwner,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.app
            .upstream
            .forget_conn(self.worker.pool(), self.owner);
    }
}

/// keyward's HTTP/1.1 server settings, when `http1_server` is `fast`: the read bound
/// hyper's server has, and the custom names keyward reads from requests (the credential
/// headers first, then the correlation, forwarding and delegation ones, and the original
/// request's for a decision), read without an allocation.
pub fn fast_server(config: &crate::config::Config) -> Option<h1::server::Settings> {
    if config.http1_server != Http1Server::Fast {
        return None;
    }
    // Each list is its owner's: what keyward itself reads, keeps or replaces.
    let mut names: Vec<HeaderName> = [respond::X_REQUEST_ID, respond::X_CORRELATION_ID]
        .into_iter()
        .chain(headers::SET_FORWARDED)
        .chain([crate::auth::decision::DELEGATE_HEADER])
        .chain(crate::decision::ORIGINAL_REQUEST)
        .chain(crate::header_names::COMMON_CUSTOM)
        .collect();
    for source in &config.credentials {
        match source {
            CredentialSource::Scheme { header, .. } | CredentialSource::Header { header } => {
                if !names.contains(header) {
                    names.insert(0, header.clone());
                }
            }
            CredentialSource::Query { .. } => {}
        }
    }
    Some(h1::server::Settings {
        max_buf: config.limits.max_header_bytes.max(HYPER_MIN_BUF),
        max_headers: config.limits.max_headers,
        names: h1::server::KnownNames::new(names),
    })
}

/// The servers a connection is read with.
struct Server<'a> {
    hyper: &'a h1::server::Hyper,
    fast: Option<&'a h1::server::Settings>,
    agreed: h1::server::Agreed,
}

async fn serve_conn<I, D, F>(
    app: Arc<App>,
    worker: Worker,
    server: Server<'_>,
    mut drain: watch::Receiver<Phase>,
    io: I,
    conn: ConnInfo,
    door: D,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Fn(Arc<Serving>, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<super::Body>, std::convert::Infallible>> + Send + 'static,
{
    // Until its first request a connection gets `header_read_timeout`; once it has served
    // one, a keep-alive client may hold it idle for `idle_timeout`.
    let (first_request, idle_timeout) = (
        app.config.limits.header_read_timeout,
        app.config.limits.idle_timeout,
    );
    let stall = writing::Bounds {
        peer: app.config.limits.write_stall_timeout,
        source: app.config.limits.upstream_timeout,
    };
    let peer = conn.peer;
    let accounts = worker.clone();
    // `limits.max_connection_age`: closed as at the end of a drain, this connection alone.
    let aged_at = app
        .config
        .limits
        .max_connection_age
        .map(|age| Instant::now() + age);
    // Set once the connection is that old: its HTTP/1.1 responses say `Connection: close`,
    // so a client is told before the close, not surprised by it between two requests.
    let aged = aged_at.map(|_| Arc::new(AtomicBool::new(false)));
    // Its tunnel, if it becomes one, closes at the same age.
    let conn = ConnInfo { aged_at, ..conn };
    // An aged connection gets a drain's grace to finish what it is doing, then is closed.
    let overdue = app.config.shutdown.grace;
    let aged_service = aged.clone();
    let activity = Arc::new(Activity::new(
        first_request,
        idle_timeout,
        app.own_answers.clone(),
    ));
    // Closes the connection gracefully (whichever server reads it) when set.
    let close = Arc::new(h1::server::Close::default());
    let holder: Arc<dyn Holder> = Arc::new(H2Holder {
        activity: activity.clone(),
        slot: conn.slot.clone(),
        close: close.clone(),
    });
    let requests = activity.clone();
    let serving = Arc::new(Serving {
        app,
        worker: worker.clone(),
        conn,
    });
    let service = move |req: Request<RequestBody>| {
        // In flight from the request head until the response body is done, dropped or cut
        // off: for the idle cut-off and for `keyward_in_flight_requests` alike.
        let worker = &serving.worker;
        let mut in_flight = requests.begin(worker.metrics().track_in_flight(), worker.busy());
        let requests = requests.clone();
        let http2 = req.version() == http::Version::HTTP_2;
        let aged = aged_service.clone();
        let (door, serving) = (door.clone(), serving.clone());
        // The door's future is made in place, inside this one: made out here and moved in,
        // its 4.6 KB were copied twice more a request.
        async move {
            let mut resp = door(serving, req).await?;
            if let Some(aged) = aged {
                respond::close_if_draining(&mut resp, http2, &aged);
            }
            let refused = resp.extensions().get::<respond::Refused>().is_some();
            if !refused {
                requests.allowed.store(true, Ordering::Release);
            }
            if refused || resp.extensions().get::<respond::Local>().is_some() {
                // keyward's own answer holds no upstream connection, however long the
                // client takes to read it: it stops counting against max_in_flight, and
                // counts against the own answers' budget instead (or goes out bodiless).
                in_flight.busy = None;
                in_flight.own_answer = requests.own_answer();
                if in_flight.own_answer.is_none() {
                    respond::without_body(&mut resp);
                }
            }
            let (parts, body) = resp.into_parts();
            let body = requests.responses.track(body, in_flight);
            Ok::<_, std::convert::Infallible>(Response::from_parts(parts, body))
        }
    };
    let connection = h1::server::serve_connection(
        io,
        service,
        server.fast,
        server.hyper,
        server.agreed,
        &close,
        Arc::downgrade(&holder),
    );
    tokio::pin!(connection);
    let mut closing = false;
    let mut told = Phase::Serving;
    let side = Arc::new(SideWaker::default());
    let result = loop {
        let drained = after_or_aged(&mut drain, told, aged_at, overdue);
        let watchdog = activity.idle_for(stall);
        tokio::pin!(drained, watchdog);
        let event = next_event(connection.as_mut(), drained, watchdog, closing, &side).await;
        let unserved = match event {
            Event::Ended(result) => break Some(result),
            Event::Drain(None) => {
                debug!(peer = %peer, "connection past max_connection_age and grace; closing");
                break None;
            }
            Event::Drain(Some(Phase::Draining)) => {
                // HTTP/2 gets its GOAWAY now; HTTP/1.1 responses say `Connection: close`.
                if let Some(aged) = &aged {
                    aged.store(true, Ordering::Release);
                }
                close.go_away();
                told = Phase::Draining;
                false
            }
            Event::Drain(Some(_)) => {
                // keyward's server between requests shuts the stream down when polled next;
                // otherwise the request in flight finishes first.
                close.request();
                closing = true;
                activity.touch();
                false
            }
            Event::Watchdog(wake) => {
                if wake == Wake::Stalled {
                    // Every response left was cut off: the peer reads nothing, so a
                    // graceful close (which needs it to) is not tried.
                    debug!(peer = %peer, "every response stalled; closing");
                    break None;
                }
                if closing {
                    // A graceful close needs the peer (HTTP/2 waits for a PING ack); one
                    // that never answers is not waited for.
                    break None;
                }
                debug!(peer = %peer, "connection idle; closing");
                let between = close.request();
                closing = true;
                activity.touch();
                // keyward's server shuts the stream down when polled next.
                !between && !activity.has_served()
            }
        };
        if unserved {
            // No complete request head within `header_read_timeout`. An HTTP/2 client that
            // only opened the connection gets its GOAWAY; hyper would go on waiting for a
            // half-sent HTTP/1 head, which gets a moment more, not another
            // `header_read_timeout`.
            let grace = first_request.min(UNSERVED_CLOSE_GRACE);
            break tokio::time::timeout(grace, connection.as_mut()).await.ok();
        }
    };
    match result {
        Some(Err(e)) => {
            if let Some((status, code)) = refused_head(&*e) {
                handler::refused_head(&accounts, status, code);
            }
            debug!(peer = %peer, error = %e, "connection ended with an error")
        }
        None => debug!(peer = %peer, "connection dropped"),
        Some(Ok(())) => {}
    }
}

/// What ended a wait of the connection's loop.
enum Event<R> {
    Ended(R),
    /// The listener moved on to this phase (or, `None`, the connection is overdue).
    Drain(Option<Phase>),
    Watchdog(Wake),
}

/// Wakes the connection's task for the drain signal and the watchdog, and notes that they
/// need polling.
#[derive(Default)]
struct SideWaker {
    woken: AtomicBool,
    task: std::sync::Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Wait for the connection to end, the drain signal (unless `closing`) or the watchdog.
/// The connection is polled on every wake of the task; the drain signal and the watchdog
/// only when their own wakers fired (and once at first): a keep-alive request wakes the
/// task a few times, and polling all three each time (a `watch` registration, a timer and a
/// `Notify`) cost about 700 instructions per request.
async fn next_event<C, D, W>(
    mut connection: Pin<&mut C>,
    mut drained: Pin<&mut D>,
    mut watchdog: Pin<&mut W>,
    closing: bool,
    side: &Arc<SideWaker>,
) -> Event<C::Output>
where
    C: Future,
    D: Future<Output = Option<Phase>>,
    W: Future<Output = Wake>,
{
    side.woken.store(true, Ordering::SeqCst);
    let side_waker = std::task::Waker::from(side.clone());
    // The task's waker as last handed to `side`: the same task polls with the same waker,
    // so the lock is taken once, not on every poll (two atomic operations a wake).
    let mut handed: Option<std::task::Waker> = None;
    std::future::poll_fn(|cx| {
        if !handed.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *side.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
            handed = Some(waker);
        }
        if let Poll::Ready(result) = connection.as_mut().poll(cx) {
            return Poll::Ready(Event::Ended(result));
        }
        if side.woken.swap(false, Ordering::SeqCst) {
            let mut side_cx = Context::from_waker(&side_waker);
            if !closing {
                if let Poll::Ready(phase) = drained.as_mut().poll(&mut side_cx) {
                    return Poll::Ready(Event::Drain(phase));
                }
            }
            if let Poll::Ready(wake) = watchdog.as_mut().poll(&mut side_cx) {
                return Poll::Ready(Event::Watchdog(wake));
            }
        }
        Poll::Pending
    })
    .await
}

/// Requests in flight on one connection, and since when it has had none.
///
/// The watchdog is a sleeper that wakes at least every `check` (a quarter of the write-stall
/// bound) and otherwise at the idle deadline. A request starting or ending does not wake it:
/// it reads the state when it wakes. Only a request whose end brings the idle deadline
/// before the watchdog's next wake (an idle timeout shorter than `check`) notifies it. So a
/// keep-alive request costs no timer of its own and no wake-up of the watchdog.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// Has a request head arrived yet?
    served: AtomicBool,
    /// Has a request been answered other than by a refusal? Until then the connection
    /// gets `header_read_timeout`, not `idle_timeout`, between requests.
    allowed: AtomicBool,
    /// The responses being written, which a stalled peer may not hold for ever.
    responses: Responses<InFlight>,
    /// Wakes the watchdog when a deadline moved before its next wake.
    changed: tokio::sync::Notify,
    /// Nanoseconds after `start` at which the connection last became idle.
    idle_since: AtomicU64,
    /// Nanoseconds after `start` at which the watchdog wakes next.
    wake_at: AtomicU64,
    /// `header_read_timeout` and `idle_timeout`, for the deadline a request's end sets.
    timeouts: (Duration, Duration),
    /// keyward's own answers of this connection whose bodies wait for the client (see
    /// [`writing::OWN_ANSWERS_PER_CONNECTION`]).
    own_waiting: AtomicUsize,
    /// The process-wide budget of those, held here so a request clones no reference to it
    /// (its count is written by every worker).
    own_answers: writing::OwnAnswerBudget,
}

/// How long a new connection is left alone by the stream budget: the time for its first
/// request to arrive and be decided (review: keyed clients that all connected at once ended
/// each other before their first answer). A client with no key can keep new connections
/// to smaller shares by opening `h2_max_streams / h2_max_concurrent_streams` connections
/// this often (README).
const NEW_FOR: Duration = Duration::from_secs(1);

/// An HTTP/2 connection as the stream budget sees it.
struct H2Holder {
    activity: Arc<Activity>,
    slot: Option<super::conn::Slot>,
    close: Arc<h1::server::Close>,
}

impl Holder for H2Holder {
    fn proven_in(&self) -> u64 {
        if self.activity.start.elapsed() < NEW_FOR {
            return u64::MAX;
        }
        self.slot.as_ref().map_or(0, |s| s.proof.last())
    }

    fn evict(&self) {
        self.close.evict();
    }
}

/// Held while a request is being served, with its count in the process-wide gauge and,
/// unless keyward refused it, against `limits.max_in_flight`.
struct InFlight {
    activity: Arc<Activity>,
    _counted: crate::metrics::InFlight,
    busy: Option<super::worker::Busy>,
    /// keyward's own answer's place in [`writing::OwnAnswerBudget`] while its body waits.
    own_answer: Option<writing::OwnAnswerSlot>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.activity;
        if self.own_answer.take().is_some() {
            a.own_waiting.fetch_sub(1, Ordering::AcqRel);
        }
        a.touch();
        if a.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            let deadline = a.idle_since.load(Ordering::SeqCst) + nanos(a.timeout());
            if deadline < a.wake_at.load(Ordering::SeqCst) {
                a.changed.notify_one();
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Activity {
    /// `first` bounds the wait for a request head until one was allowed, `then` after.
    fn new(first: Duration, then: Duration, own_answers: writing::OwnAnswerBudget) -> Self {
        let start = Instant::now();
        Self {
            start,
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            allowed: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            wake_at: AtomicU64::new(0),
            responses: Responses::new(start),
            changed: tokio::sync::Notify::new(),
            timeouts: (first, then),
            own_waiting: AtomicUsize::new(0),
            own_answers,
        }
    }

    /// A place for one more of keyward's own answers waiting on this connection: within
    /// [`writing::OWN_ANSWERS_PER_CONNECTION`] here and the process-wide budget.
    fn own_answer(&self) -> Option<writing::OwnAnswerSlot> {
        let waiting = self.own_waiting.fetch_add(1, Ordering::AcqRel);
        let slot = (waiting < writing::OWN_ANSWERS_PER_CONNECTION)
            .then(|| self.own_answers.take())
            .flatten();
        if slot.is_none() {
            self.own_waiting.fetch_sub(1, Ordering::AcqRel);
        }
        slot
    }

    fn begin(
        self: &Arc<Self>,
        metric: crate::metrics::InFlight,
        busy: super::worker::Busy,
    ) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.served.store(true, Ordering::Release);
        InFlight {
            activity: self.clone(),
            _counted: metric,
            busy: Some(busy),
            own_answer: None,
        }
    }

    /// Has a complete request head arrived?
    fn has_served(&self) -> bool {
        self.served.load(Ordering::Acquire)
    }

    /// The idle bound in force: `first` until a request was allowed, `then` after.
    fn timeout(&self) -> Duration {
        if self.allowed.load(Ordering::SeqCst) {
            self.timeouts.1
        } else {
            self.timeouts.0
        }
    }

    fn since_start(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.start))
    }

    /// Restart the idle clock now.
    fn touch(&self) {
        let now = self.since_start(Instant::now());
        self.idle_since.store(now, Ordering::SeqCst);
    }

    /// Resolves once the connection has had no request in flight for the idle bound in
    /// force, or, with nothing in flight, once a response was cut off for waiting `stall`
    /// on the peer.
    async fn idle_for(&self, stall: writing::Bounds) -> Wake {
        // Stalled responses are looked for a few times per bound: cut off within 1.25 of it.
        let check = (stall.peer.min(stall.source) / 4).max(Duration::from_millis(10));
        loop {
            let now = Instant::now();
            // The next wake is published before the state is read, so a request that ends
            // meanwhile either sees it (and notifies, if its deadline comes sooner) or ended
            // before the read below (which then sees its deadline).
            let mut wake = now + check;
            self.wake_at.store(self.since_start(wake), Ordering::SeqCst);
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                if self.responses.any_cut() {
                    // Responses were cut off earlier while others went on; those are done.
                    return Wake::Stalled;
                }
                let since = self.idle_since.load(Ordering::SeqCst);
                let deadline = self.start + Duration::from_nanos(since) + self.timeout();
                if deadline <= now {
                    return Wake::Idle;
                }
                if deadline < wake {
                    wake = deadline;
                    self.wake_at.store(self.since_start(wake), Ordering::SeqCst);
                }
            } else {
                self.responses.cut_stalled(stall);
            }
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = self.changed.notified() => {}
            }
        }
    }
}

/// Why a connection's watchdog woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Nothing in flight for the idle timeout.
    Idle,
    /// A response was cut off and nothing else is in flight: the peer takes nothing.
    Stalled,
}

/// The answer hyper's HTTP/1 server wrote itself, for a head it could not read (its
/// `on_error` table: 400, 431 or 414, then the connection closes). No service ran for it,
/// so it is counted and logged here, or a client sending broken or oversized heads would
/// leave no trace. An HTTP/2 preface hyper did not expect gets no answer, so no count.
fn refused_head(e: &(dyn std::error::Error + 'static)) -> Option<(http::StatusCode, Code)> {
    let e = e.downcast_ref::<hyper::Error>()?;
    if !e.is_parse() || e.is_parse_version_h2() {
        return None;
    }
    Some(match e.is_parse_too_large() {
        // hyper's `UriTooLong` and `TooLarge` differ only in what they say.
        true if e.to_string().contains("URI") => (http::StatusCode::URI_TOO_LONG, Code::BadRequest),
        true => (
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Code::HeadersTooLarge,
        ),
        false => (http::StatusCode::BAD_REQUEST, Code::BadRequest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_requests_to_finish() {
        let t = Duration::from_millis(50);
        let bounds = writing::Bounds { peer: t, source: t };
        // Read before the connection's own clock starts: its idle bound counts from then.
        let start = Instant::now();
        let a = Arc::new(Activity::new(t, t, writing::OwnAnswerBudget::default()));
        let metrics = crate::metrics::Metrics::new(false).unwrap();
        let shard = metrics.shard(0);
        assert_eq!(a.idle_for(bounds).await, Wake::Idle);
        assert!(start.elapsed() >= t);
        // A request in flight keeps the connection; the clock restarts when it ends.
        let worker = Worker::new(shard.clone(), 1, 0);
        let held = a.begin(shard.track_in_flight(), worker.busy());
        assert_eq!(metrics.in_flight(), 1);
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.idle_for(bounds).await });
        tokio::time::sleep(t * 3).await;
        assert!(!waiter.is_finished());
        let ended = Instant::now();
        drop(held);
        assert_eq!(metrics.in_flight(), 0);
        assert_eq!(waiter.await.unwrap(), Wake::Idle);
        assert!(ended.elapsed() >= t, "{:?}", ended.elapsed());
    }
}
