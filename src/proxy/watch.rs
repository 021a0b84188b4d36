//! What ends an exchange besides its peers, once its request was decided. A streamed
//! response is passed on only while the key it was let in with stands ([`KeyWatch`],
//! [`Guarded`]). An upgraded (WebSocket) tunnel ends at its idle bound (no byte either way
//! for `limits.tunnel_idle_timeout`, so an idle tunnel cannot hold its connection slot for
//! ever: nginx's `proxy_read_timeout`, HAProxy's `timeout tunnel`), at its connection's
//! `max_connection_age`, and when its key ceases to stand ([`TunnelWatch`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a tunnel last moved a byte, shared by its two ends.
#[derive(Clone)]
pub struct LastActive {
    origin: Instant,
    /// Nanoseconds after `origin`.
    at: Arc<AtomicU64>,
}

impl LastActive {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            at: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.at.store(now, Ordering::Release);
    }

    /// Resolves once no byte has moved for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let at = self.at.load(Ordering::Acquire);
            tokio::time::sleep_until(self.origin + Duration::from_nanos(at) + timeout).await;
            if self.at.load(Ordering::Acquire) == at {
                return;
            }
        }
    }
}

impl Default for LastActive {
    fn default() -> Self {
        Self::new()
    }
}

/// How often an open tunnel asks whether its key still stands: a revoke reaches every
/// replica within 1 s (SPEC 14), and so it reaches tunnels.
const RECHECK: Duration = Duration::from_secs(1);

/// The key an exchange was let in with, watched while it goes on: a streamed response
/// (server-sent events, a long download, a gRPC stream) carries data long after its
/// request was decided, and a revoke, an expiry or a narrowed key must stop that too.
/// Judged again only when the snapshot or the revocations changed since it last was
/// (two counters read), or once the clock passes what bounds it in time (the key's
/// `expires_at`, the snapshot's `keys.max_age`).
pub struct KeyWatch {
    /// The app alone, not the connection's `Serving`: a watch may outlive its connection
    /// (an upload hyper's upstream connection stopped reading holds one), and must not hold
    /// the connection's `max_connections` slot and drain receiver with it (review 31).
    app: Arc<crate::app::App>,
    key: Arc<crate::keys::Key>,
    /// The snapshot's and the revocations' generations when last judged.
    seen: (u64, u64),
    /// When the request was decided: a change within [`RECHECK`] of it is judged later.
    decided: Instant,
    /// The first moment the key may stop standing with nothing swapped.
    until: Option<std::time::SystemTime>,
    /// Its connection carries a key while this is watched.
    _keyed: Option<super::conn::KeyedInFlight>,
}

/// What was in force just before a request was decided (see [`KeyWatch::new`]).
#[derive(Debug, Clone, Copy)]
pub struct Decided {
    generations: (u64, u64),
}

impl Decided {
    /// Read before the decision: what changes after it is judged again while streaming.
    /// (Two counters: a public route's request, which no watch follows, pays no more.)
    pub fn now(app: &crate::app::App) -> Self {
        Self {
            generations: KeyWatch::generations(app),
        }
    }
}

impl KeyWatch {
    /// Watch `key`, which was let in by a decision made after `decided` was read: a change
    /// since is judged at a chunk at least [`RECHECK`] after it. (An exchange decided an
    /// instant before a revoke finishes as decided, as a revoke takes effect on the next
    /// request; one that goes on longer is cut within the second, as a tunnel is.)
    pub fn new(
        app: Arc<crate::app::App>,
        key: Arc<crate::keys::Key>,
        decided: Decided,
        keyed: Option<super::conn::KeyedInFlight>,
    ) -> Self {
        let until = Self::until(&app, &key);
        Self {
            app,
            key,
            seen: decided.generations,
            // Read once a watch is made, just after the decision: the grace's start.
            decided: Instant::now(),
            until,
            _keyed: keyed,
        }
    }

    /// The earlier of the key's expiry and the snapshot's going stale.
    fn until(app: &crate::app::App, key: &crate::keys::Key) -> Option<std::time::SystemTime> {
        let stale_at = app.store.guard().as_ref().and_then(|s| s.stale_at());
        match (key.expires_at, stale_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The snapshot's and the revocations' generations now.
    fn generations(app: &crate::app::App) -> (u64, u64) {
        (app.store.generation(), app.revocations.generation())
    }

    /// Does the key still stand? `Err` names why not.
    pub fn stands(&mut self) -> Result<(), crate::auth::Reject> {
        let now = Self::generations(&self.app);
        let due = self
            .until
            .is_some_and(|t| std::time::SystemTime::now() >= t);
        if (now == self.seen && !due) || self.decided.elapsed() < RECHECK {
            return Ok(());
        }
        self.seen = now;
        self.until = Self::until(&self.app, &self.key);
        judge(&self.app, &self.key)
    }
}

/// Would `key` get in now as it did (the snapshot in force, then the fleet's revocations)?
fn judge(app: &crate::app::App, key: &Arc<crate::keys::Key>) -> Result<(), crate::auth::Reject> {
    let snapshot = app.store.guard();
    let now = std::time::SystemTime::now();
    crate::auth::decision::still_stands(key, snapshot.as_deref(), &app.policy, now)?;
    let principal = crate::auth::Principal {
        key: key.clone(),
        delegated_account: None,
    };
    match app
        .revocations
        .overlay(crate::auth::Decision::Allow(principal))
    {
        crate::auth::Decision::Allow(_) => Ok(()),
        crate::auth::Decision::Deny(reject, _) => Err(reject),
    }
}

/// What a tunnel watches while open: the key it was opened with (none on a public route)
/// and its connection's `max_connection_age` deadline. A tunnel carries traffic of its own
/// that keyward never sees as requests, so what would refuse a new request ends it.
pub struct TunnelWatch {
    pub key: Option<KeyWatch>,
    pub aged_at: Option<Instant>,
}

impl TunnelWatch {
    /// Resolves with why the tunnel must close.
    pub async fn ended(mut self) -> &'static str {
        let aged = async {
            match self.aged_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let refused = async {
            let Some(key) = &mut self.key else {
                return std::future::pending().await;
            };
            let mut tick = tokio::time::interval_at(Instant::now() + RECHECK, RECHECK);
            loop {
                tick.tick().await;
                if let Err(reject) = key.stands() {
                    return reject.code().as_str();
                }
            }
        };
        tokio::select! {
            () = aged => "max_connection_age",
            why = refused => why,
        }
    }
}

/// Why a watched response was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the key this response was let in with no longer stands ({0})")]
pub struct KeyGone(&'static str);

pin_project_lite::pin_project! {
    /// A response body of a request let in with a key: each frame is passed on only while
    /// the key stands ([`KeyWatch`]); then the body fails, which resets the HTTP/2 stream
    /// or closes the HTTP/1.1 connection. A public route's has no key to watch.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        watch: Option<KeyWatch>,
        // A request without a key: its place in that half of the budget, to the body's end.
        place: Option<super::worker::Keyless>,
        // An HTTP/2 client's upload still going: given up when this body is dropped.
        upload: Option<super::upload::AnswerEnds>,
    }
}

impl<B> Guarded<B> {
    pub fn new(
        inner: B,
        watch: Option<KeyWatch>,
        place: Option<super::worker::Keyless>,
        upload: Option<super::upload::AnswerEnds>,
    ) -> Self {
        Self {
            inner,
            watch,
            place,
            upload,
        }
    }
}

impl<B> http_body::Body for Guarded<B>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(Err(reject)) = this.watch.as_mut().map(KeyWatch::stands) {
                    return Poll::Ready(Some(Err(Box::new(KeyGone(reject.code().as_str())))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// One end of a tunnel; every byte read from it counts as activity.
    pub struct Watched<T> {
        #[pin]
        io: T,
        last: LastActive,
    }
}

impl<T> Watched<T> {
    pub fn new(io: T, last: LastActive) -> Self {
        Self { io, last }
    }
}

impl<T: AsyncRead> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let read = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last.touch();
        }
        read
    }
}

impl<T: AsyncWrite> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_keep_it_active_and_silence_ends_it() {
        let last = LastActive::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = Watched::new(a, last.clone());
        let t = Duration::from_millis(60);
        let watcher = {
            let last = last.clone();
            tokio::spawn(async move {
                last.idle_for(t).await;
                Instant::now()
            })
        };
        let mut last_read = Instant::now();
        // Reads every half timeout, for twice the timeout.
        for _ in 0..4 {
            b.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            a.read_exact(&mut one).await.unwrap();
            last_read = Instant::now();
            tokio::time::sleep(t / 2).await;
        }
        let ended = watcher.await.unwrap();
        // The touch comes just before `last_read`: the idle end is a timeout after it.
        assert!(
            ended + Duration::from_millis(5) >= last_read + t,
            "ended {:?} before the last read + timeout",
            (last_read + t).saturating_duration_since(ended)
        );
    }
}
