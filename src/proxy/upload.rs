//! A request body on its way to the upstream. Two things end with the exchange and not
//! with the response: the upstream connection stays open while the client's body is still
//! being forwarded (an app that answers before reading it, a client that never sends it),
//! so a body still pending when the answer comes holds a `max_in_flight` slot of its own
//! until it ends (before the answer, the request's own slot covers it: one body, one slot);
//! and a body that goes
//! `limits.body_stall_timeout` without a byte, or whose average rate falls below
//! `limits.body_min_rate` after its first `body_stall_timeout`, is cut off, which closes
//! that connection. Its
//! progress also moves the deadline of the response head (`upstream_timeout` counts from the
//! last byte of the body, so a steady upload is never cut off for being long). A body
//! streamed up under a key goes on only while that key stands (a revoke, a disable, an
//! expiry cut it at its next chunk, as they cut a streamed response).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::upstream_target::UpstreamStream;
use super::watch::KeyWatch;
use super::worker::{Busy, Keyless};

/// A request body sent upstream: the client's, metered, or none.
pub type OutBody = http_body_util::Either<Upload, http_body_util::Empty<Bytes>>;

/// Why a body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("request body from the client failed")]
    Client(#[source] hyper::Error),
    #[error("request body stalled: no byte for {0:?}")]
    Stalled(Duration),
    #[error("request body below {0} bytes per second")]
    TooSlow(u64),
    /// The key the request was let in with stopped standing while its body streamed.
    #[error("the key this request was let in with no longer stands")]
    KeyGone(crate::auth::Reject),
    /// The body came in chunks too small to be anything but a flood of them.
    #[error("request body in more than {FRAGMENT_DEBT_MAX} chunks beyond its bytes")]
    Fragmented,
    /// Answered, the body of a request without a key would take a slot of its own past
    /// the half of `limits.max_in_flight` such requests may hold: it is not sent on.
    #[error("request body cut after the answer: no slot left for requests without a key")]
    Overload,
    /// An HTTP/2 client's answer reached it whole before its body ended: the rest of the
    /// body goes nowhere ([`Progress::answer_delivered`]).
    #[error("request body given up: the answer reached the client first")]
    AnswerDelivered,
}

/// How a body must keep moving: a byte at least every `gap`, and after the first `gap` on
/// average `min_rate` bytes per second (0: no rate). Each byte received buys `1 / min_rate`
/// of a second more, so a body trickled a byte per `gap` is cut once its first `gap` is
/// spent, and one sent at the rate or faster never is.
#[derive(Debug, Clone, Copy)]
pub struct BodyPace {
    pub gap: Duration,
    pub min_rate: u64,
}

impl BodyPace {
    /// When a body that began at `start` and has brought `received` bytes by `now` is cut
    /// off, and whether for its rate (else for its gap).
    fn deadline(&self, start: Instant, received: u64, now: Instant) -> (Instant, bool) {
        let by_gap = now + self.gap;
        if self.min_rate == 0 {
            return (by_gap, false);
        }
        let earned = Duration::from_secs_f64(received as f64 / self.min_rate as f64);
        let by_rate = start + self.gap + earned;
        if by_rate < by_gap {
            (by_rate, true)
        } else {
            (by_gap, false)
        }
    }
}

/// The slot a body still arriving after the answer holds, and for a request without a key
/// its place in that half of the budget.
pub type Place = (Busy, Option<Keyless>);

/// When the body last moved, in ms since `origin`, read by the deadline of the response head;
/// whether it ended; and the slot it holds once the answer came before its end.
pub struct Progress {
    origin: Instant,
    last_ms: AtomicU64,
    /// `(ended, slot)`, one lock: the slot is taken only while the body has not ended, and
    /// let go when it ends, whichever comes first.
    held: std::sync::Mutex<(bool, Option<Place>)>,
    /// The answer came and no slot could be taken for the rest of the body: cut it.
    cut: std::sync::atomic::AtomicBool,
    /// The client's body while the upload forwards it, where the answer's end can reach
    /// it: hyper polls an upload only while it can write to the app, so an app that
    /// answered and stopped reading leaves it unpolled in hyper's connection. See
    /// [`Self::answer_delivered`].
    body: std::sync::Mutex<Option<Incoming>>,
    /// Wakes [`watch_stall`] when the answer was delivered with the body still pending.
    delivered: tokio::sync::Notify,
}

impl Progress {
    pub fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            origin: now,
            last_ms: AtomicU64::new(0),
            held: std::sync::Mutex::new((false, None)),
            cut: std::sync::atomic::AtomicBool::new(false),
            body: std::sync::Mutex::new(None),
            delivered: tokio::sync::Notify::new(),
        })
    }

    fn body(&self) -> std::sync::MutexGuard<'_, Option<Incoming>> {
        self.body.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An HTTP/2 client's answer reached it whole (its body was dropped by the server after
    /// its end) while its request body was still being forwarded: the client's body is
    /// dropped, which has h2 reset the stream with `NO_ERROR` (RFC 9113 8.1: stop sending,
    /// keep the answer), and the upstream connection, which has nothing left to carry, is
    /// cut. Before, an app that answered without reading the body left the client's stream
    /// open, its window never granted again, for as long as the app kept its socket (review
    /// 71: past 75 s, the client spinning).
    pub fn answer_delivered(&self) {
        let body = self.body().take();
        if body.is_some() {
            drop(body);
            self.delivered.notify_one();
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, (bool, Option<Place>)> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer came: a body not yet ended takes a slot of its own (`slot` is asked only
    /// then), since the request's own ends with the response; with none to take, the rest
    /// of the body is cut.
    pub fn answered(&self, slot: impl FnOnce() -> Option<Place>) {
        let mut held = self.held();
        if !held.0 {
            held.1 = slot();
            if held.1.is_none() {
                self.cut.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The body ended (whole, failed, cut or dropped): its slot, if it took one, is let go.
    fn ended(&self) {
        let slot = {
            let mut held = self.held();
            held.0 = true;
            held.1.take()
        };
        drop(slot);
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the body last moved (its start if never).
    pub fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Has the body ended (whole, failed, cut or dropped)?
    pub fn has_ended(&self) -> bool {
        self.held().0
    }
}

/// Held with an HTTP/2 client's answer, whose upload was still going when the answer came:
/// dropped with the answer's body, after the server sent its end, it gives the upload up
/// ([`Progress::answer_delivered`]). It travels in the response's extensions, which
/// must be `Clone`: the last copy dropped gives the upload up.
#[derive(Clone)]
pub struct AnswerEnds {
    _delivered: Arc<Delivered>,
}

struct Delivered(Arc<Progress>);

impl AnswerEnds {
    pub fn new(progress: Arc<Progress>) -> Self {
        Self {
            _delivered: Arc::new(Delivered(progress)),
        }
    }
}

impl Drop for Delivered {
    fn drop(&mut self) {
        self.0.answer_delivered();
    }
}

/// Cut the upstream connection of an upload answered before its end once the body has not
/// moved for `gap`. hyper polls a request body only while it can write to the app, so the
/// upload's own stall bound is never looked at when the app answered and then stopped
/// reading: the upload, and the `max_in_flight` place it took with the answer, stayed with
/// hyper's connection for as long as the app kept its socket open (review 32). Ends with the
/// body (looked at once a `gap`).
pub async fn watch_stall(progress: Arc<Progress>, gap: Duration, stream: Weak<UpstreamStream>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(progress.last() + gap) => {}
            // A body that ended meanwhile leaves a connection hyper may pool and hand to
            // another request: only one still owed a body is cut.
            () = progress.delivered.notified() => {
                if !progress.has_ended() {
                    UpstreamStream::abort_watched(&stream);
                }
                return;
            }
        }
        if progress.has_ended() {
            return;
        }
        if progress.last() + gap <= Instant::now() {
            UpstreamStream::abort_watched(&stream);
            return;
        }
    }
}

/// A frame of the client's body, as hyper's server hands it on.
type ClientFrame = Result<Frame<Bytes>, hyper::Error>;

/// The client's body, forwarded: see the module doc.
pub struct Upload {
    pace: BodyPace,
    start: Instant,
    received: u64,
    /// Whether `stall` is the rate's deadline (else the gap's).
    for_rate: bool,
    stall: Pin<Box<Sleep>>,
    progress: Arc<Progress>,
    /// The key the request was let in with (none on a public route): an upload goes on
    /// only while it stands, as a streamed response does.
    watch: Option<KeyWatch>,
    /// What the client's body yielded after data was gathered: a frame of trailers, an
    /// error or its end (`None`), handed on at the next poll.
    held: Option<Option<ClientFrame>>,
    /// Frames the client's body owes, in [`FRAGMENT_BYTES`]ths of a frame (see
    /// [`FRAGMENT_DEBT_MAX`]); `None` when it is not judged.
    owed: Option<u64>,
    /// The client's data not sent on yet: see [`Gathered`].
    gathered: Gathered,
    /// When data gathered under [`GATHER_EARLY`] goes on if no more comes (made the
    /// first time a body's data is held), and whether it is set for what is held now.
    hold: Option<Pin<Box<Sleep>>>,
    holding: bool,
}

/// A chunked HTTP/1.x body owes a frame for every piece hyper's decoder hands on (a chunk,
/// or the part of one a read holds) and pays [`FRAGMENT_BYTES`] of data for each; past
/// [`FRAGMENT_DEBT_MAX`] frames owed it is cut. Each piece costs keyward a pass through the
/// decoder and its channel (~0.6 µs) for as little as six bytes of the sender's
/// (`1\r\na\r\n`, many to a read): four connections of one-byte chunks at ~140 Mbit/s
/// took both cores, on a route that needs no key. Owed, not averaged: a body that opened
/// with 16 MB bought no flood after it, and chunks split across reads (two pieces each)
/// or a large chunk after small ones are not cut. Bodies of a stated length and HTTP/2
/// ones are not judged: each of their frames costs the sender a read's worth of sending
/// (and h2 bounds its own frames).
const FRAGMENT_BYTES: u64 = 8;
const FRAGMENT_DEBT_MAX: u64 = 1024;

/// Most data one frame sent upstream gathers from the client's.
const GATHER_MAX: usize = 64 * 1024;
/// Data gathered past this goes on as soon as no more is ready; under it, it waits up to
/// [`GATHER_WAIT`] for more.
const GATHER_EARLY: usize = 8 * 1024;
/// The longest a byte of the client's is held back (a timer tick: 1 to 2 ms). Only a body
/// that pauses after a small chunk waits it; its end, and large frames, go at once.
const GATHER_WAIT: Duration = Duration::from_millis(1);

/// The client's data frames, gathered into one while more come without a pause: hyper's
/// client writes each frame of a body as a chunk of its own, a system call each, so a body
/// sent in one-byte chunks (six bytes each on the wire) cost keyward ~130 times the
/// sender's CPU, and the app a chunk each. A single frame is passed on without a copy.
#[derive(Default)]
struct Gathered {
    first: Option<Bytes>,
    more: Option<bytes::BytesMut>,
}

impl Gathered {
    fn len(&self) -> usize {
        match (&self.first, &self.more) {
            (_, Some(more)) => more.len(),
            (Some(first), None) => first.len(),
            (None, None) => 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.more.is_none()
    }

    fn push(&mut self, data: Bytes) {
        if let Some(more) = &mut self.more {
            more.extend_from_slice(&data);
            return;
        }
        match self.first.take() {
            None => self.first = Some(data),
            Some(first) => {
                let mut more = bytes::BytesMut::with_capacity((first.len() + data.len()).max(4096));
                more.extend_from_slice(&first);
                more.extend_from_slice(&data);
                self.more = Some(more);
            }
        }
    }

    fn take(&mut self) -> Frame<Bytes> {
        let data = match self.more.take() {
            Some(more) => more.freeze(),
            None => self.first.take().unwrap_or_default(),
        };
        self.first = None;
        Frame::data(data)
    }
}

impl Upload {
    pub fn new(
        inner: Incoming,
        pace: BodyPace,
        progress: Arc<Progress>,
        watch: Option<KeyWatch>,
    ) -> Self {
        let start = Instant::now();
        *progress.body() = Some(inner);
        Self {
            pace,
            start,
            received: 0,
            for_rate: false,
            stall: Box::pin(tokio::time::sleep_until(start + pace.gap)),
            progress,
            watch,
            held: None,
            owed: None,
            gathered: Gathered::default(),
            hold: None,
            holding: false,
        }
    }

    /// The client's next frame: the one held back while data was gathered, else its body's;
    /// `None` once the body was given up ([`Progress::answer_delivered`]).
    fn next_frame(&mut self, cx: &mut Context<'_>) -> Option<Poll<Option<ClientFrame>>> {
        match self.held.take() {
            Some(held) => Some(Poll::Ready(held)),
            None => Some(Pin::new(self.progress.body().as_mut()?).poll_frame(cx)),
        }
    }

    fn ended(&mut self) {
        self.progress.ended();
    }

    /// Judge the body's chunks ([`FRAGMENT_DEBT_MAX`]): for a chunked HTTP/1.x body.
    pub fn judging_chunks(mut self, chunked: bool) -> Self {
        self.owed = chunked.then_some(0);
        self
    }

    /// Has the body come in chunks too small for anything but a flood of them?
    fn fragmented(&self) -> bool {
        self.owed
            .is_some_and(|owed| owed > FRAGMENT_DEBT_MAX * FRAGMENT_BYTES)
    }

    /// Whether the data held has waited [`GATHER_WAIT`] (the timer is set on the first
    /// call for it, and wakes the task when it ends).
    fn hold(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = Instant::now() + GATHER_WAIT;
        let timer = self
            .hold
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if !self.holding {
            self.holding = true;
            timer.as_mut().reset(at);
        }
        timer.as_mut().poll(cx)
    }

    /// `len` bytes (or a frame without data) came from the client: its deadlines move.
    fn moved(&mut self, len: usize) {
        self.progress.touch();
        if let Some(owed) = &mut self.owed {
            *owed = (*owed + FRAGMENT_BYTES).saturating_sub(len as u64);
        }
        self.received = self.received.saturating_add(len as u64);
        let (at, for_rate) = self
            .pace
            .deadline(self.start, self.received, Instant::now());
        self.for_rate = for_rate;
        self.stall.as_mut().reset(at);
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.progress.ended();
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = UploadError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UploadError>>> {
        let this = &mut *self;
        if this.progress.cut.load(Ordering::Relaxed) {
            this.ended();
            return Poll::Ready(Some(Err(UploadError::Overload)));
        }
        loop {
            let Some(next) = this.next_frame(cx) else {
                this.ended();
                return Poll::Ready(Some(Err(UploadError::AnswerDelivered)));
            };
            if !this.gathered.is_empty()
                && !matches!(next, Poll::Ready(Some(Ok(ref f))) if f.is_data())
            {
                // No more data now: what was gathered goes once the client's connection
                // has had the time to decode its next chunks (it hands them on one at a
                // time), or at once when it is enough or the body ended.
                match next {
                    Poll::Pending if this.gathered.len() < GATHER_EARLY => {
                        if this.hold(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    Poll::Pending => {}
                    Poll::Ready(other) => this.held = Some(other),
                }
                this.holding = false;
                return Poll::Ready(Some(Ok(this.gathered.take())));
            }
            match next {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(Err(reject)) = this.watch.as_mut().map(KeyWatch::stands) {
                        this.ended();
                        return Poll::Ready(Some(Err(UploadError::KeyGone(reject))));
                    }
                    this.moved(frame.data_ref().map_or(0, Bytes::len));
                    if this.fragmented() {
                        this.ended();
                        return Poll::Ready(Some(Err(UploadError::Fragmented)));
                    }
                    match frame.into_data() {
                        Ok(data) => {
                            this.gathered.push(data);
                            if this.gathered.len() >= GATHER_MAX {
                                this.holding = false;
                                return Poll::Ready(Some(Ok(this.gathered.take())));
                            }
                        }
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.ended();
                    return Poll::Ready(Some(Err(UploadError::Client(e))));
                }
                Poll::Ready(None) => {
                    this.progress.touch();
                    this.ended();
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    return match this.stall.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            this.ended();
                            Poll::Ready(Some(Err(match this.for_rate {
                                true => UploadError::TooSlow(this.pace.min_rate),
                                false => UploadError::Stalled(this.pace.gap),
                            })))
                        }
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if !self.gathered.is_empty() {
            return false;
        }
        match &self.held {
            Some(held) => held.is_none(),
            None => self
                .progress
                .body()
                .as_ref()
                .is_some_and(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.progress
            .body()
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_cut_by_its_gap_or_once_below_its_rate() {
        let pace = BodyPace {
            gap: Duration::from_secs(30),
            min_rate: 500,
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // A byte early on: due by the end of the first gap (and 2 ms it bought).
        let ms = Duration::from_millis;
        assert_eq!(pace.deadline(t0, 1, t0 + s(2)), (t0 + s(30) + ms(2), true));
        assert_eq!(pace.deadline(t0, 0, t0), (t0 + s(30), false));
        // A byte every 20 s: cut once the first 30 s are spent, not a gap after each byte.
        assert_eq!(pace.deadline(t0, 3, t0 + s(60)), (t0 + s(30) + ms(6), true));
        // At the rate or above, the gap is the bound.
        assert_eq!(
            pace.deadline(t0, 500 * 120, t0 + s(100)),
            (t0 + s(130), false)
        );
        let off = BodyPace {
            min_rate: 0,
            ..pace
        };
        assert_eq!(off.deadline(t0, 3, t0 + s(60)), (t0 + s(90), false));
    }
}
