//! Keep-alive HTTP/1.1 connections to the upstream, one pool per worker thread.
//!
//! Each worker runs its own current-thread runtime and owns its [`Pool`], so a pooled
//! connection is driven by the thread that uses it and the pool's lock is never contended.
//! The pool keeps two kinds: hyper's client connections (requests with a body, upgrades)
//! and the fast path's own ([`FastConn`], `h1`). A hyper connection goes back as soon as its
//! response head is in and is handed out again only once hyper reports it ready (the
//! previous response fully read), so a slow download never blocks the next request and no
//! task is spawned per request to wait for that moment. A fast-path connection comes back
//! when its response body has been read to the end.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::h1;
use super::upload::OutBody;
pub use super::upstream_target::ConnectError;
use super::upstream_target::{SharedStream, UpstreamStream, UpstreamTarget};
use crate::config::Limits;

/// How to reach the upstream and how long to keep its connections.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// TCP `host:port` (resolved on every new connection) or a Unix socket file.
    pub target: UpstreamTarget,
    /// keyward's own bound listeners: a connection that reaches one is refused.
    pub own_listeners: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// `upstream_ack_at_once`: see [`super::upstream_target::UpstreamStream::acknowledge`].
    pub ack_at_once: bool,
    /// `upstream_reuse_across_keys`: every connection has one [`Owner`].
    pub across_keys: bool,
    /// Makes a key's id an [`Owner`]: seeded per process, so no client can choose ids
    /// that share one.
    owners: std::hash::RandomState,
}

/// Whose requests a pooled connection carries: a key's (its id, hashed, top bit set), or
/// the requests without a key of one client connection (its [`ConnOwner`], top bit
/// clear). A connection is handed out again only for its owner's requests, so a stray
/// answer (one the app wrote late to an earlier request) reaches the owner's next request,
/// never another key's or another client's. (One owner for every request without a key
/// let a client spraying a public route hand its stray answers, and the answers they
/// displaced, to other anonymous clients: a login page's `Set-Cookie` among them.)
pub type Owner = u64;

/// The owner of a client connection's requests without a key: unique on its worker (whose
/// pool it is), below 2^63.
pub type ConnOwner = u64;

const KEY_OWNER: Owner = 1 << 63;

impl PoolConfig {
    /// The owner of a request made with `key` (a key id), or, without one, on the client
    /// connection `conn`.
    pub fn owner(&self, key: Option<&str>, conn: ConnOwner) -> Owner {
        match key {
            _ if self.across_keys => 0,
            None => conn & !KEY_OWNER,
            Some(id) => std::hash::BuildHasher::hash_one(&self.owners, id) | KEY_OWNER,
        }
    }
}

impl PoolConfig {
    pub fn new(target: UpstreamTarget, limits: &Limits) -> Self {
        Self {
            target,
            own_listeners: Vec::new(),
            connect_timeout: limits.upstream_connect_timeout,
            idle_timeout: limits.upstream_idle_timeout,
            max_idle: limits.upstream_max_idle_per_host,
            ack_at_once: true,
            across_keys: false,
            owners: std::hash::RandomState::new(),
        }
    }
}

/// A fast-path connection to the upstream.
pub type FastConn = Box<h1::Conn<UpstreamStream>>;

/// What a pooled connection can do now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// It may carry a request.
    Ready,
    /// Still finishing its last exchange.
    Busy,
    /// It will never carry one again: dropped where it is found.
    Closed,
}

/// What the pool asks of a connection it holds.
trait Reusable {
    /// May a request of another key take it, once it has been quiet for [`ADOPT_AFTER`]?
    /// Only where "quiet" is known: from when the whole answer was read.
    const LENDABLE: bool;

    fn state(&self) -> State;

    /// Worth a place in the pool on its way back? Whatever is said here, `checkout` asks
    /// [`Reusable::state`] again before the connection carries a request.
    fn worth_keeping(&self) -> bool {
        self.state() != State::Closed
    }
}

impl Reusable for SendRequest<OutBody> {
    const LENDABLE: bool = false;

    fn state(&self) -> State {
        if SendRequest::is_closed(self) {
            State::Closed
        } else if SendRequest::is_ready(self) {
            State::Ready
        } else {
            State::Busy
        }
    }
}

/// A hyper client connection, and its stream as the pool may ask the kernel about it.
pub struct HyperConn {
    pub sender: SendRequest<OutBody>,
    stream: Weak<UpstreamStream>,
}

impl HyperConn {
    /// The connection's stream, to cut it while hyper still drives it.
    pub fn stream(&self) -> Weak<UpstreamStream> {
        self.stream.clone()
    }
}

/// Ready as hyper says, and then only if the kernel holds nothing unasked-for on it: hyper
/// reads an idle connection only when the reactor wakes it, which on a busy worker may be
/// milliseconds after the bytes arrived (as for the fast path's, [`FastConn`]).
/// Not lent to another key: it comes back to the pool with its response head, and when its
/// body ended is hyper's to know.
impl Reusable for HyperConn {
    const LENDABLE: bool = false;

    fn state(&self) -> State {
        match self.sender.state() {
            State::Ready => match self.stream.upgrade() {
                Some(s) if s.idle_and_open() => State::Ready,
                _ => State::Closed,
            },
            other => other,
        }
    }

    /// No system call on the way back: `checkout` probes it before it is used.
    fn worth_keeping(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// An idle fast-path connection is ready unless the upstream closed it or sent bytes
/// nobody asked for; either is for good. (The probe reads a byte: a connection left in
/// the pool after it would be probed again, a byte at a time, until the junk was gone and
/// it looked ready; what the app wrote next would answer another client's request.)
impl Reusable for FastConn {
    const LENDABLE: bool = true;

    fn state(&self) -> State {
        if self.io().idle_and_open() {
            State::Ready
        } else {
            State::Closed
        }
    }

    /// Kept without asking the kernel: `checkout` probes it just before it is used, which
    /// catches everything a probe here would (and what arrives in between). A probe on the
    /// way back too was a second system call per proxied request.
    fn worth_keeping(&self) -> bool {
        true
    }
}

/// A pooled connection, when it last carried a request, whose requests it carries, and
/// when it came back.
struct Pooled<C> {
    sender: C,
    since: Instant,
    owner: Owner,
    back: Instant,
}

/// How long a connection must have been back in the pool, quiet, before a request of
/// another key may take it: an app's late second answer to its last request arrives within
/// that or is a bug slower than any seen (review: 2 ms to 1 s), and arrived, it is found by
/// the check before reuse and the connection dropped.
pub const ADOPT_AFTER: Duration = Duration::from_secs(1);

/// What [`Idle::take`] found.
enum Taken<C> {
    Got(C),
    Removed,
    Busy,
}

/// One worker's idle connections of one kind, most recently used last.
struct Idle<C> {
    conns: VecDeque<Pooled<C>>,
}

impl<C> Default for Idle<C> {
    fn default() -> Self {
        Self {
            conns: VecDeque::new(),
        }
    }
}

impl<C: Reusable> Idle<C> {
    /// The most recently used connection of `owner` that is ready for a request (a closed
    /// one never is); one found idle past `idle_timeout` is dropped and the search goes on.
    /// Busy and closed connections stay for the reaper: no pass over the whole pool per
    /// request. Others' connections are passed over without a look at their state.
    ///
    /// A pool at least half full (of `max_idle`), none of them `owner`'s, hands out the one
    /// idle longest, whoever's, if it has been back for [`ADOPT_AFTER`]: with more keys in
    /// use than the pool holds, a connection per key is opened and closed for nearly every
    /// request (5.6 times the CPU a request with a thousand keys in turn at 60k requests a
    /// second, with a pool of 256), and a connection quiet that long is one whose requests are answered. Half,
    /// not all: the requests in flight hold connections the pool takes back, and one opened
    /// while they are out pushes another out on its return.
    fn checkout(
        &mut self,
        now: Instant,
        idle_timeout: Duration,
        owner: Owner,
        max_idle: usize,
    ) -> Option<C> {
        let mut at = self.conns.len();
        while at > 0 {
            at -= 1;
            if self.conns[at].owner == owner {
                if let Taken::Got(c) = self.take(at, now, idle_timeout) {
                    return Some(c);
                }
            }
        }
        let mut at = 0;
        let crowded = (max_idle / 2).max(1);
        while C::LENDABLE && self.conns.len() >= crowded && at < self.conns.len() {
            // Oldest first: once one came back too recently, so did the rest.
            if now.saturating_duration_since(self.conns[at].back) < ADOPT_AFTER {
                break;
            }
            match self.take(at, now, idle_timeout) {
                Taken::Got(c) => return Some(c),
                Taken::Removed => {}
                Taken::Busy => at += 1,
            }
        }
        None
    }

    /// The connection at `at`, if it is ready and was not idle past `idle_timeout`; a
    /// closed or expired one is removed.
    fn take(&mut self, at: usize, now: Instant, idle_timeout: Duration) -> Taken<C> {
        match self.conns[at].sender.state() {
            State::Busy => return Taken::Busy,
            State::Closed => {
                self.conns.remove(at);
                return Taken::Removed;
            }
            State::Ready => {}
        }
        match self.conns.remove(at) {
            Some(c) if now.duration_since(c.since) < idle_timeout => Taken::Got(c.sender),
            _ => Taken::Removed,
        }
    }

    fn checkin(&mut self, sender: C, now: Instant, max_idle: usize, owner: Owner) {
        if max_idle == 0 || !sender.worth_keeping() {
            return;
        }
        if self.conns.len() >= max_idle {
            self.conns.pop_front();
        }
        self.conns.push_back(Pooled {
            sender,
            since: now,
            owner,
            back: Instant::now(),
        });
    }

    /// Drop connections that are closed, or idle for longer than `idle_timeout`.
    fn reap(&mut self, now: Instant, idle_timeout: Duration) {
        self.conns.retain(|c| match c.sender.state() {
            State::Closed => false,
            State::Busy => true,
            State::Ready => now.duration_since(c.since) < idle_timeout,
        });
    }
}

/// Both kinds of idle connection, each capped at `max_idle`.
#[derive(Default)]
struct Lists {
    hyper: Idle<HyperConn>,
    fast: Idle<FastConn>,
}

/// One worker's keep-alive connections to the upstream. The worker owns it and hands it to
/// each request it serves: no pool is shared between threads. (The mutex is never
/// contended; it is there because hyper's service futures must be `Send`.)
#[derive(Clone, Default)]
pub struct Pool(Arc<Mutex<Lists>>);

impl Pool {
    fn lists(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client connection ended: the idle connections its requests without a key owned
    /// go (closed), since no other request may use them until they are lent. Kept until
    /// their idle timeout, a client with no key that opened one connection after another
    /// left one upstream connection each in the pool (review 72: 256 sequential requests
    /// held every worker of an app that serves 256 connections, and keyed requests got
    /// 504).
    pub fn forget(&self, cfg: &PoolConfig, conn: ConnOwner) {
        if cfg.across_keys {
            return;
        }
        let owner = cfg.owner(None, conn);
        let mut lists = self.lists();
        lists.hyper.conns.retain(|c| c.owner != owner);
        lists.fast.conns.retain(|c| c.owner != owner);
    }

    /// A ready connection, if one is idle. `now` is the caller's clock reading (one per
    /// request is enough).
    pub fn checkout(&self, cfg: &PoolConfig, now: Instant, owner: Owner) -> Option<HyperConn> {
        self.lists()
            .hyper
            .checkout(now, cfg.idle_timeout, owner, cfg.max_idle)
    }

    /// Return a connection whose response head has arrived; it is reused once ready. Its
    /// idle time counts from `used`, when its last request started.
    pub fn checkin(&self, cfg: &PoolConfig, conn: HyperConn, used: Instant, owner: Owner) {
        self.lists().hyper.checkin(conn, used, cfg.max_idle, owner);
    }

    /// An open idle fast-path connection, if there is one.
    pub fn checkout_fast(&self, cfg: &PoolConfig, now: Instant, owner: Owner) -> Option<FastConn> {
        self.lists()
            .fast
            .checkout(now, cfg.idle_timeout, owner, cfg.max_idle)
    }

    /// Close idle connections that outlived `idle_timeout`. Called from a periodic task,
    /// so an idle pool does not hold upstream sockets forever.
    pub fn reap(&self, cfg: &PoolConfig) {
        let now = Instant::now();
        let mut lists = self.lists();
        lists.hyper.reap(now, cfg.idle_timeout);
        lists.fast.reap(now, cfg.idle_timeout);
    }
}

/// Where a fast-path connection goes when its response is read: back to the pool of the
/// worker that used it, its idle time counted from when its request started.
pub struct Return {
    pool: Pool,
    max_idle: usize,
    ack_at_once: bool,
    used: Instant,
    owner: Owner,
}

impl Return {
    pub fn new(pool: &Pool, cfg: &PoolConfig, used: Instant, owner: Owner) -> Self {
        Self {
            pool: pool.clone(),
            max_idle: cfg.max_idle,
            ack_at_once: cfg.ack_at_once,
            used,
            owner,
        }
    }
}

impl h1::Home<UpstreamStream> for Return {
    fn take_back(self, conn: FastConn) {
        if self.ack_at_once {
            conn.io().acknowledge();
        }
        self.pool
            .lists()
            .fast
            .checkin(conn, self.used, self.max_idle, self.owner);
    }
}

/// Open a new connection (TCP with `TCP_NODELAY` and keepalive, or a Unix socket) and
/// start driving it on this thread.
pub async fn connect(cfg: &PoolConfig) -> Result<HyperConn, ConnectError> {
    let stream = SharedStream::new(open(cfg).await?, cfg.ack_at_once);
    let watch = stream.watch();
    Ok(HyperConn {
        sender: drive(TokioIo::new(stream)).await?,
        stream: watch,
    })
}

/// A new connection for the fast path.
pub async fn connect_fast(cfg: &PoolConfig) -> Result<FastConn, ConnectError> {
    Ok(h1::Conn::new(open(cfg).await?))
}

/// Open the stream, within `connect_timeout`.
async fn open(cfg: &PoolConfig) -> Result<UpstreamStream, ConnectError> {
    tokio::time::timeout(cfg.connect_timeout, cfg.target.connect(&cfg.own_listeners))
        .await
        .map_err(|_| ConnectError::Timeout(cfg.connect_timeout))?
}

/// The HTTP/1.1 client over a new connection, driven (upgrades included) by a task on this
/// thread.
async fn drive<T>(io: T) -> Result<SendRequest<OutBody>, ConnectError>
where
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(crate::proxy::h1::codec::MAX_HEAD_BYTES)
        .handshake(io)
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "upstream connection closed");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ready client connection over an in-memory pipe; the server end is returned.
    async fn conn() -> (SendRequest<OutBody>, tokio::io::DuplexStream) {
        let (client, server) = tokio::io::duplex(1024);
        let (sender, conn) = http1::handshake(TokioIo::new(client)).await.unwrap();
        tokio::spawn(conn);
        // Ready once the connection task has run and asked for a request.
        while !sender.is_ready() {
            tokio::task::yield_now().await;
        }
        (sender, server)
    }

    #[tokio::test]
    async fn hands_out_the_most_recent_ready_connection() {
        let mut pool = Idle::<SendRequest<OutBody>>::default();
        let now = Instant::now();
        let idle = Duration::from_secs(60);
        assert!(pool.checkout(now, idle, 0, 8).is_none());
        let (a, _sa) = conn().await;
        let (b, _sb) = conn().await;
        pool.checkin(a, now, 8, 0);
        pool.checkin(b, now, 8, 0);
        assert_eq!(pool.conns.len(), 2);
        assert!(pool.checkout(now, idle, 0, 8).is_some());
        assert_eq!(pool.conns.len(), 1);
    }

    /// An always-ready connection the pool may lend, as the fast path's are.
    struct Lendable;

    impl Reusable for Lendable {
        const LENDABLE: bool = true;

        fn state(&self) -> State {
            State::Ready
        }
    }

    #[tokio::test]
    async fn a_connection_is_handed_out_only_for_its_owners_requests() {
        let mut pool = Idle::<SendRequest<OutBody>>::default();
        let now = Instant::now();
        let idle = Duration::from_secs(60);
        let (a, _sa) = conn().await;
        let (keyless, _sk) = conn().await;
        pool.checkin(a, now, 8, 7);
        pool.checkin(keyless, now, 8, 0);
        assert!(pool.checkout(now, idle, 9, 8).is_none(), "another key's");
        assert!(pool.checkout(now, idle, 7, 8).is_some());
        assert!(pool.checkout(now, idle, 7, 8).is_none());
        assert!(pool.checkout(now, idle, 0, 8).is_some());
        // hyper's connections are never lent, however crowded the pool.
        let (a, _sa) = conn().await;
        pool.checkin(a, now, 2, 7);
        assert!(
            pool.checkout(now + idle / 2, idle, 9, 1).is_none(),
            "hyper's"
        );
        // A crowded pool of lendable ones, none of the key's own: the one idle longest,
        // whoever's, once quiet for ADOPT_AFTER.
        let mut lendable = Idle::<Lendable>::default();
        lendable.checkin(Lendable, now, 2, 7);
        lendable.checkin(Lendable, now + idle / 2, 2, 8);
        assert!(
            lendable.checkout(now, idle, 9, 6).is_none(),
            "under half full"
        );
        assert!(
            lendable.checkout(Instant::now(), idle, 9, 4).is_none(),
            "back too recently"
        );
        assert!(lendable.checkout(now + idle / 2, idle, 9, 4).is_some());
        assert_eq!(lendable.conns.len(), 1);
        assert_eq!(lendable.conns[0].owner, 8, "the longest idle went");
        let cfg = PoolConfig::new(
            UpstreamTarget::Tcp("127.0.0.1:1".into()),
            &crate::config::Limits::default(),
        );
        assert_eq!(cfg.owner(None, 7), 7);
        assert_ne!(
            cfg.owner(None, 7),
            cfg.owner(None, 8),
            "each client connection"
        );
        assert!(
            cfg.owner(Some("key_a"), 7) >= 1 << 63,
            "never a connection's"
        );
        assert_ne!(cfg.owner(Some("key_a"), 7), cfg.owner(Some("key_b"), 7));
        assert_eq!(cfg.owner(Some("key_a"), 7), cfg.owner(Some("key_a"), 8));
        let shared = PoolConfig {
            across_keys: true,
            ..cfg
        };
        assert_eq!(
            shared.owner(Some("key_a"), 7),
            0,
            "upstream_reuse_across_keys"
        );
        assert_eq!(shared.owner(None, 7), 0);
    }

    #[tokio::test]
    async fn idle_expiry_and_the_size_cap_close_connections() {
        let mut pool = Idle::<SendRequest<OutBody>>::default();
        let now = Instant::now();
        let idle = Duration::from_secs(60);
        let mut servers = Vec::new();
        for _ in 0..3 {
            let (s, server) = conn().await;
            servers.push(server);
            pool.checkin(s, now, 2, 0);
        }
        assert_eq!(pool.conns.len(), 2, "the cap drops the oldest");
        assert!(
            pool.checkout(now + idle, idle, 0, 8).is_none(),
            "expired ones are not handed out"
        );
        assert!(pool.conns.is_empty(), "and are dropped on the way");
        // The reaper: an idle connection past the timeout goes, a fresher one stays.
        for since in [now, now + idle] {
            let (s, server) = conn().await;
            servers.push(server);
            pool.checkin(s, since, 2, 0);
        }
        pool.reap(now + idle, idle);
        assert_eq!(pool.conns.len(), 1, "idle past the timeout");
        assert_eq!(pool.conns[0].since, now + idle);
        let (s, _server) = conn().await;
        pool.checkin(s, now, 0, 0);
        assert_eq!(pool.conns.len(), 1, "max_idle 0 keeps nothing more");
    }

    #[tokio::test]
    async fn closed_connections_are_never_handed_out() {
        let mut pool = Idle::<SendRequest<OutBody>>::default();
        let (s, server) = conn().await;
        pool.checkin(s, Instant::now(), 8, 0);
        drop(server);
        // The connection task sees EOF on its next poll; until then it may look ready.
        while pool.conns.iter().any(|c| !c.sender.is_closed()) {
            tokio::task::yield_now().await;
        }
        assert!(pool
            .checkout(Instant::now(), Duration::from_secs(60), 0, 8)
            .is_none());
        pool.reap(Instant::now(), Duration::from_secs(60));
        assert!(pool.conns.is_empty(), "the reaper drops it");
    }
}
