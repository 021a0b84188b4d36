//! A request body on its way to the upstream. Two things end with the exchange and not
//! with the response: the upstream connection stays open while the client's body is still
//! being forwarded (an app that answers before reading it, a client that never sends it),
//! so a body still pending when the answer comes holds a `max_in_flight` slot of its own
//! until it ends (before the answer, the request's own slot covers it: one body, one slot);
//! and a body that goes
//! `limits.body_stall_timeout` without a byte is cut off, which closes that connection. Its
//! progress also moves the deadline of the response head (`upstream_timeout` counts from the
//! last byte of the body, so a steady upload is never cut off for being long).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::worker::Busy;

/// A request body sent upstream: the client's, metered, or none.
pub type OutBody = http_body_util::Either<Upload, http_body_util::Empty<Bytes>>;

/// Why a body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("request body from the client failed")]
    Client(#[source] hyper::Error),
    #[error("request body stalled: no byte for {0:?}")]
    Stalled(Duration),
}

/// When the body last moved, in ms since `origin`, read by the deadline of the response head;
/// whether it ended; and the slot it holds once the answer came before its end.
pub struct Progress {
    origin: Instant,
    last_ms: AtomicU64,
    /// `(ended, slot)`, one lock: the slot is taken only while the body has not ended, and
    /// let go when it ends, whichever comes first.
    held: std::sync::Mutex<(bool, Option<Busy>)>,
}

impl Progress {
    pub fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            origin: now,
            last_ms: AtomicU64::new(0),
            held: std::sync::Mutex::new((false, None)),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, (bool, Option<Busy>)> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer came: a body not yet ended takes a slot of its own (`slot` is asked only
    /// then), since the request's own ends with the response.
    pub fn answered(&self, slot: impl FnOnce() -> Busy) {
        let mut held = self.held();
        if !held.0 {
            held.1 = Some(slot());
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
}

/// The client's body, forwarded: see the module doc.
pub struct Upload {
    inner: Incoming,
    gap: Duration,
    stall: Pin<Box<Sleep>>,
    progress: Arc<Progress>,
}

impl Upload {
    pub fn new(inner: Incoming, gap: Duration, progress: Arc<Progress>) -> Self {
        Self {
            inner,
            gap,
            stall: Box::pin(tokio::time::sleep(gap)),
            progress,
        }
    }

    fn ended(&mut self) {
        self.progress.ended();
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.progress.touch();
                this.stall.as_mut().reset(Instant::now() + this.gap);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ended();
                Poll::Ready(Some(Err(UploadError::Client(e))))
            }
            Poll::Ready(None) => {
                this.progress.touch();
                this.ended();
                Poll::Ready(None)
            }
            Poll::Pending => match this.stall.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.ended();
                    Poll::Ready(Some(Err(UploadError::Stalled(this.gap))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
