//! Responses being written, as the connection watchdog sees them: a response body that
//! waits for the client to take its next frame (an HTTP/2 stream whose flow-control window
//! stays shut, an HTTP/1.1 socket nobody reads) for `limits.write_stall_timeout` is cut
//! off: its body (and with it any upstream connection) is dropped, it stops counting as in
//! flight, and if it is ever polled again it fails, which resets the HTTP/2 stream or
//! closes the HTTP/1.1 connection.
//!
//! hyper polls a response body only when it can write what the body yields (HTTP/2: once
//! the stream has send capacity; HTTP/1.1: once its write buffer has room). So a body that
//! has yielded a frame, or has not been polled yet, and is not polled again, is waiting for
//! the peer; a body whose own source is not ready (`Pending`) is waiting for its source,
//! the upstream: one that waits on it for `limits.upstream_timeout` (an app that stops
//! half-way through a body) is cut off alike, as nginx's `proxy_read_timeout` does.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

use super::Body;

/// `waiting_since` when the response is not waiting for the peer.
const NOT_WAITING: u64 = u64::MAX;

/// The most of keyward's own answers (refusals, the introspection answer, the decision
/// listener's 404: nothing the upstream sent) whose JSON bodies may wait for their clients
/// at once, process-wide. A client needs no key to be refused (and any key to introspect),
/// and one that never reads (HTTP/2 streams under a zero flow-control window: 256 a
/// connection, on thousands of connections) pinned each such stream's state, about 12 KB,
/// for `write_stall_timeout`: gigabytes. Past the budget an answer goes out without its body
/// (status and headers, code-bearing `WWW-Authenticate` included: one HEADERS frame, which
/// flow control does not hold), so its stream ends at once. Each connection has at most
/// [`OWN_ANSWERS_PER_CONNECTION`] of the budget: a client that reads nothing blanks the
/// answers of its own connections, and to take the budget from everyone else it needs 256
/// such connections (the budget, about 50 MB, is spent only by them).
pub const OWN_ANSWERS_WAITING_MAX: usize = 4096;

/// See [`OWN_ANSWERS_WAITING_MAX`].
pub const OWN_ANSWERS_PER_CONNECTION: usize = 16;

/// What holds [`OWN_ANSWERS_WAITING_MAX`]: shared by every listener of a process.
#[derive(Debug, Default, Clone)]
pub struct OwnAnswerBudget(Arc<std::sync::atomic::AtomicUsize>);

/// One refusal's place in the budget, held until its body is written, dropped or cut.
#[derive(Debug)]
pub struct OwnAnswerSlot(Arc<std::sync::atomic::AtomicUsize>);

impl OwnAnswerBudget {
    /// A place for one more refusal body, if the budget has one.
    pub fn take(&self) -> Option<OwnAnswerSlot> {
        let before = self.0.fetch_add(1, Ordering::AcqRel);
        if before >= OWN_ANSWERS_WAITING_MAX {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(OwnAnswerSlot(self.0.clone()))
    }

    /// Refusal bodies waiting now.
    pub fn waiting(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for OwnAnswerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The error a cut-off body yields if hyper polls it again.
#[derive(Debug, thiserror::Error)]
#[error("response cut off: the client took none of it, or the upstream sent none, for its bound")]
pub struct Stalled;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// Made in place once a response and left there: boxing the body would cost an allocation
// a request (none is made today), and `Done` and `Cut` only end it.
#[allow(clippy::large_enum_variant)]
enum State<G> {
    /// Being written: the body, and what keeps the request counted as in flight.
    Writing(Body, G),
    Done,
    Cut,
}

/// One response's body, shared by the connection (which may cut it off) and hyper (which
/// writes it).
pub struct Writing<G> {
    /// The connection's clock origin.
    origin: Instant,
    /// Nanoseconds after `origin` since which the body waits for the peer.
    waiting_since: AtomicU64,
    /// Nanoseconds after `origin` since which the body waits for its source (the upstream).
    source_since: AtomicU64,
    state: Mutex<State<G>>,
}

impl<G> Writing<G> {
    fn nanos(&self, at: Instant) -> u64 {
        Self::nanos_since(self.origin, at)
    }

    fn nanos_since(origin: Instant, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    fn state(&self) -> MutexGuard<'_, State<G>> {
        // A panic while the lock is held cannot leave the state half-changed: every
        // change is one assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cut the response off if it has waited for the peer since before `now - bounds.peer`,
    /// or for its source since before `now - bounds.source`.
    fn cut_if_stalled(&self, now: Instant, bounds: Bounds) -> bool {
        let waited = |since: &AtomicU64, bound: Duration| {
            let since = since.load(Ordering::Acquire);
            since != NOT_WAITING && since <= self.nanos(now).saturating_sub(duration_nanos(bound))
        };
        if !waited(&self.waiting_since, bounds.peer) && !waited(&self.source_since, bounds.source) {
            return false;
        }
        let mut state = self.state();
        if !matches!(*state, State::Writing(..)) {
            return false;
        }
        // Drops the body (and an upstream connection with it) and the in-flight guard.
        *state = State::Cut;
        true
    }
}

/// How long a response may wait: for the peer to take its next frame, and for its source
/// (the upstream) to yield one.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub peer: Duration,
    pub source: Duration,
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The responses of one connection.
pub struct Responses<G> {
    origin: Instant,
    live: Mutex<Live<G>>,
    /// Has any response of this connection been cut off?
    any_cut: AtomicBool,
}

/// The connection's entries. An entry whose [`Tracked`] is gone (only this list holds it)
/// is finished, and is reused for the next response: an HTTP/1.1 connection, one response
/// at a time, allocates one entry in its life.
struct Live<G> {
    list: Vec<Arc<Writing<G>>>,
    /// Prune finished entries when the list reaches this length.
    prune_at: usize,
}

/// Finished entries kept for reuse when the list is pruned.
const SPARES: usize = 2;

fn finished<G>(w: &Arc<Writing<G>>) -> bool {
    Arc::strong_count(w) == 1
}

impl<G> Responses<G> {
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            live: Mutex::new(Live {
                list: Vec::new(),
                prune_at: 8,
            }),
            any_cut: AtomicBool::new(false),
        }
    }

    fn live(&self) -> MutexGuard<'_, Live<G>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Track `body`, holding `guard` until it is finished, dropped or cut off.
    pub fn track(&self, body: Body, guard: G) -> Tracked<G> {
        // Not yet polled: waiting for hyper to start writing it.
        let waiting = Writing::<G>::nanos_since(self.origin, Instant::now());
        let mut live = self.live();
        if let Some(w) = live.list.iter_mut().find(|w| finished(w)) {
            if let Some(entry) = Arc::get_mut(w) {
                *entry.waiting_since.get_mut() = waiting;
                *entry.source_since.get_mut() = NOT_WAITING;
                *entry.state.get_mut().unwrap_or_else(|e| e.into_inner()) =
                    State::Writing(body, guard);
                return Tracked { writing: w.clone() };
            }
        }
        let writing = Arc::new(Writing {
            origin: self.origin,
            waiting_since: AtomicU64::new(waiting),
            source_since: AtomicU64::new(NOT_WAITING),
            state: Mutex::new(State::Writing(body, guard)),
        });
        if live.list.len() >= live.prune_at {
            let mut spares = 0;
            live.list.retain(|w| {
                let keep = !finished(w) || spares < SPARES;
                spares += usize::from(finished(w));
                keep
            });
            live.prune_at = (live.list.len() * 2).max(8);
        }
        live.list.push(writing.clone());
        Tracked { writing }
    }

    /// Cut off every response that has waited for the peer or its source past its bound;
    /// how many were.
    pub fn cut_stalled(&self, bounds: Bounds) -> usize {
        let now = Instant::now();
        let live = self.live();
        let cut = live
            .list
            .iter()
            .filter(|w| !finished(w) && w.cut_if_stalled(now, bounds))
            .count();
        if cut > 0 {
            self.any_cut.store(true, Ordering::Release);
        }
        cut
    }

    /// Has a response of this connection been cut off? Its HTTP/2 stream may linger
    /// (hyper waits for send capacity the peer never gives), so such a connection is
    /// closed, not drained, once nothing else is in flight.
    pub fn any_cut(&self) -> bool {
        self.any_cut.load(Ordering::Acquire)
    }
}

/// A response body as handed to hyper.
pub struct Tracked<G> {
    writing: Arc<Writing<G>>,
}

/// hyper dropped the body (written, or given up on): the source and the in-flight guard go
/// now, and the entry is free for the connection's next response.
impl<G> Drop for Tracked<G> {
    fn drop(&mut self) {
        let left = std::mem::replace(&mut *self.writing.state(), State::Done);
        self.writing
            .waiting_since
            .store(NOT_WAITING, Ordering::Release);
        self.writing
            .source_since
            .store(NOT_WAITING, Ordering::Release);
        drop(left);
    }
}

impl<G> http_body::Body for Tracked<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let writing = &self.writing;
        let mut state = writing.state();
        let body = match &mut *state {
            State::Writing(body, _) => body,
            State::Done => return Poll::Ready(None),
            State::Cut => return Poll::Ready(Some(Err(Stalled.into()))),
        };
        let mut frame = Pin::new(body).poll_frame(cx);
        // The app's trailers end the body here: keyward's HTTP/1.1 server never writes
        // them, and over HTTP/2 they would reach the client unfiltered (an app's echoed
        // `x-auth-*`, or a connection-specific field that makes the client reset the
        // stream and lose the whole response). The upstream side is HTTP/1.1, where apps
        // rarely send any.
        if matches!(&frame, Poll::Ready(Some(Ok(f))) if f.is_trailers()) {
            frame = Poll::Ready(None);
        }
        let (waiting, source) = match &frame {
            // The source is not ready: waiting for it (since the first `Pending` in a row),
            // not for the peer.
            Poll::Pending => {
                let since = writing.source_since.load(Ordering::Acquire);
                let since = match since {
                    NOT_WAITING => writing.nanos(Instant::now()),
                    since => since,
                };
                (NOT_WAITING, since)
            }
            Poll::Ready(Some(Ok(_))) => (writing.nanos(Instant::now()), NOT_WAITING),
            Poll::Ready(None | Some(Err(_))) => {
                *state = State::Done;
                (NOT_WAITING, NOT_WAITING)
            }
        };
        writing.waiting_since.store(waiting, Ordering::Release);
        writing.source_since.store(source, Ordering::Release);
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &*self.writing.state() {
            State::Writing(body, _) => body.is_end_stream(),
            State::Done => true,
            State::Cut => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &*self.writing.state() {
            State::Writing(body, _) => body.size_hint(),
            State::Done => SizeHint::with_exact(0),
            State::Cut => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Either, Full};
    use std::sync::atomic::AtomicUsize;

    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_own_answers_budget_is_bounded() {
        let budget = OwnAnswerBudget::default();
        let slots: Vec<_> = (0..OWN_ANSWERS_WAITING_MAX)
            .map(|_| budget.take().expect("within the budget"))
            .collect();
        assert!(budget.take().is_none());
        assert_eq!(budget.waiting(), OWN_ANSWERS_WAITING_MAX);
        drop(slots);
        assert_eq!(budget.waiting(), 0);
        assert!(budget.take().is_some());
    }

    /// Bounds on the peer only.
    fn peer(bound: Duration) -> Bounds {
        Bounds {
            peer: bound,
            source: Duration::from_secs(3600),
        }
    }

    fn body(text: &'static str) -> Body {
        Either::Right(Full::new(Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test]
    async fn a_body_never_polled_is_cut_and_fails_after() {
        let responses = Responses::new(Instant::now());
        let dropped = Arc::new(AtomicUsize::new(0));
        let tracked = responses.track(body("never read"), Guard(dropped.clone()));
        assert_eq!(responses.cut_stalled(peer(Duration::from_secs(60))), 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(responses.cut_stalled(peer(Duration::from_millis(10))), 1);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "in-flight guard released"
        );
        assert!(tracked.collect().await.is_err());
    }

    #[tokio::test]
    async fn a_finished_body_is_not_cut_and_releases_its_guard() {
        let responses = Responses::new(Instant::now());
        let dropped = Arc::new(AtomicUsize::new(0));
        let tracked = responses.track(body("read"), Guard(dropped.clone()));
        let got = tracked.collect().await.unwrap().to_bytes();
        assert_eq!(got, "read");
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(responses.cut_stalled(peer(Duration::from_millis(1))), 0);
    }

    #[tokio::test]
    async fn a_dropped_body_releases_its_guard_and_its_entry_is_reused() {
        let responses = Responses::new(Instant::now());
        let dropped = Arc::new(AtomicUsize::new(0));
        let first = responses.track(body("given up"), Guard(dropped.clone()));
        let entry = Arc::as_ptr(&first.writing);
        drop(first);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "released when hyper drops it"
        );
        let second = responses.track(body("next"), Guard(dropped.clone()));
        assert_eq!(
            Arc::as_ptr(&second.writing),
            entry,
            "one entry per HTTP/1.1 connection"
        );
        // A finished entry is never cut; the live one is.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(responses.cut_stalled(peer(Duration::from_millis(1))), 1);
        assert_eq!(dropped.load(Ordering::SeqCst), 2);
        assert!(second.collect().await.is_err());
    }

    #[tokio::test]
    async fn finished_entries_are_pruned() {
        let responses = Responses::new(Instant::now());
        for _ in 0..100 {
            let t = responses.track(body("x"), ());
            drop(t);
        }
        assert!(responses.live().list.len() <= 8);
    }
}
