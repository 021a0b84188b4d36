//! A request body on its way to the upstream. Two things end with the exchange and not
//! with the response: the upstream connection stays open while the client's body is still
//! being forwarded (an app that answers before reading it, a client that never sends it),
//! so the body holds a `max_in_flight` slot of its own until it ends; and a body that goes
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

/// When the body last moved, in ms since `origin`, read by the deadline of the response head.
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Progress {
    pub fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            origin: now,
            last_ms: AtomicU64::new(0),
        })
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
    busy: Option<Busy>,
    gap: Duration,
    stall: Pin<Box<Sleep>>,
    progress: Arc<Progress>,
}

impl Upload {
    pub fn new(inner: Incoming, busy: Busy, gap: Duration, progress: Arc<Progress>) -> Self {
        Self {
            inner,
            busy: Some(busy),
            gap,
            stall: Box::pin(tokio::time::sleep(gap)),
            progress,
        }
    }

    fn ended(&mut self) {
        self.busy = None;
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
