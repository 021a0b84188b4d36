//! Bounds on the HTTP/2 frames a client may send that ask keyward for work and carry no
//! request: `WINDOW_UPDATE`, `PRIORITY`, `PRIORITY_UPDATE`, `SETTINGS`, `PING` and frames
//! of unknown types. hyper's h2 server takes each of them and parses it, and nothing in h2
//! counts them: a client that opened a connection and sent only `WINDOW_UPDATE`s of
//! increment 1 on stream 0 kept a core busy (89 M frames in 11 s) until
//! `limits.header_read_timeout` closed it, then reconnected.
//!
//! [`H2Guard`] wraps an HTTP/2 connection's IO the way Envoy's codec bounds these frames
//! (`max_inbound_window_update_frames_per_data_frame_sent`,
//! `max_inbound_priority_frames_per_stream`): it reads the 9-byte header of every frame
//! read and written (never a payload: [`Frames`] skips it, across reads as they come),
//! counts, and fails the read that goes past a budget ([`Budget`]), which ends hyper's
//! connection and closes the socket. Only HTTP/2 connections are wrapped.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use super::h1::server::rewind::H2_PREFACE;

/// The length of an HTTP/2 frame header (RFC 9113 §4.1).
const FRAME_HEADER: usize = 9;

// Frame types (RFC 9113 §6, RFC 9218 §7.1).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const SETTINGS: u8 = 0x4;
const RST_STREAM: u8 = 0x3;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const PRIORITY_UPDATE: u8 = 0x10;
// Counted with the unknown types, as every type above CONTINUATION is.
const _: () = assert!(PRIORITY_UPDATE > CONTINUATION);

/// `WINDOW_UPDATE`s any connection may send, whatever it was sent. Clients open their
/// windows as they start (one for the connection, one per stream at most) and the rest go
/// with data received, so a legitimate connection stays far below; a flooding one is cut
/// after 13 KB of frames, its cost then that of opening connections.
pub const WINDOW_UPDATES_BASE: u64 = 1000;

/// `WINDOW_UPDATE`s allowed per DATA frame keyward sent and per HEADERS frame received.
/// Envoy's `max_inbound_window_update_frames_per_data_frame_sent` (10): a receiver sends at
/// most two per DATA frame (its stream's and its connection's), and usually one per many
/// (the `h2` crate and browsers wait for half a window). Per HEADERS frame, for a client
/// that widens each new stream's window as it opens it: a HEADERS frame is a request
/// keyward decodes and decides, dearer than the ten updates it earns.
pub const WINDOW_UPDATES_PER_FRAME: u64 = 10;

/// `PRIORITY`, `PRIORITY_UPDATE`, `SETTINGS`, `PING`, `RST_STREAM`, `GOAWAY`, unknown-type
/// frames and HEADERS that open no stream any connection may send: h2 ignores a reset of a stream it
/// closed, and 52 M `RST_STREAM`s on one took 6.9 s of CPU in 8 s. Browsers send a handful of each on opening (Firefox's priority tree is five
/// `PRIORITY` frames), gRPC a `PING` per window-size probe.
pub const CONTROL_BASE: u64 = 1000;

/// Control frames allowed per HEADERS frame received: Envoy's
/// `max_inbound_priority_frames_per_stream` (100). Reprioritising a stream takes one frame;
/// a hundred leaves room for a page whose tabs and scrolls reorder it again and again.
pub const CONTROL_PER_HEADERS: u64 = 100;

/// Control frames allowed per DATA frame keyward sent: gRPC's bandwidth estimator (grpc-go's
/// `bdpEstimator`) sends a `PING` for each DATA frame it receives while none is out, for
/// the life of a stream of small messages: a watch call was cut after ~1,100 messages.
pub const CONTROL_PER_DATA_SENT: u64 = 1;

/// Control frames allowed per second the connection has been open: keep-alive `PING`s on
/// a connection that carries one long stream for hours (gRPC's shortest keep-alive
/// interval is 10 s) never run out, while a flood gains nothing from it.
pub const CONTROL_PER_SECOND: u64 = 1;

/// Which budget a connection went past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    WindowUpdate,
    Control,
}

impl Flood {
    fn as_str(self) -> &'static str {
        match self {
            Self::WindowUpdate => "window_update",
            Self::Control => "control",
        }
    }
}

impl fmt::Display for Flood {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WindowUpdate => f.write_str("HTTP/2 WINDOW_UPDATE frames past their budget"),
            Self::Control => f.write_str("HTTP/2 control frames past their budget"),
        }
    }
}

impl std::error::Error for Flood {}

/// A byte stream's frame headers, read as the bytes come: the payloads are skipped, not
/// kept, and a header split across reads is put together in a 9-byte array.
#[derive(Debug, Clone)]
pub struct Frames {
    /// Bytes still to skip: the client's preface, or the rest of a frame's payload.
    skip: usize,
    head: [u8; FRAME_HEADER],
    /// Bytes of `head` read so far.
    have: usize,
}

impl Frames {
    /// The frames a client sends: after its 24-byte preface (hyper checks that it is one).
    pub fn inbound() -> Self {
        Self::skipping(H2_PREFACE.len())
    }

    /// The frames a server sends: its first bytes are a frame.
    pub fn outbound() -> Self {
        Self::skipping(0)
    }

    fn skipping(skip: usize) -> Self {
        Self {
            skip,
            head: [0; FRAME_HEADER],
            have: 0,
        }
    }

    /// Read `bytes`, calling `frame` with the type and stream of each frame whose header
    /// completes in them; stops at the first error `frame` returns.
    pub fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        mut frame: impl FnMut(u8, u32) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER {
                self.have = 0;
                let [a, b, c, kind, _, s0, s1, s2, s3] = self.head;
                self.skip = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                frame(kind, u32::from_be_bytes([s0 & 0x7f, s1, s2, s3]))?;
            }
        }
        Ok(())
    }
}

/// What one connection sent and was sent, against what it may send.
#[derive(Debug, Clone)]
pub struct Budget {
    /// HEADERS frames that opened a stream (trailers, and frames on streams h2 already
    /// closed, earn nothing: they cost the client a frame header each).
    headers: u64,
    /// The highest stream a HEADERS frame opened: client streams only ever go up.
    last_stream: u32,
    data_sent: u64,
    window_updates: u64,
    control: u64,
    opened: Instant,
}

impl Budget {
    pub fn new(opened: Instant) -> Self {
        Self {
            headers: 0,
            last_stream: 0,
            data_sent: 0,
            window_updates: 0,
            control: 0,
            opened,
        }
    }

    /// A frame of type `kind` on `stream` received: past its budget, which one.
    pub fn received(&mut self, kind: u8, stream: u32) -> Result<(), Flood> {
        match kind {
            HEADERS if stream > self.last_stream => {
                self.last_stream = stream;
                self.headers += 1;
            }
            // Trailers, or a stream h2 already closed (it drops those without a word):
            // 2.2 M empty HEADERS on one stream went by uncounted, each earning PINGs.
            HEADERS | RST_STREAM => return self.control_frame(),
            // A client says it once or twice. While a stream is in flight (one the client
            // holds open with a zero window, say) h2 reads each and keeps the connection:
            // 198 M in 30 s took a core, with no key.
            GOAWAY => return self.control_frame(),
            WINDOW_UPDATE => {
                self.window_updates += 1;
                if self.window_updates > self.window_updates_allowed() {
                    return Err(Flood::WindowUpdate);
                }
            }
            PRIORITY | SETTINGS | PING => return self.control_frame(),
            // Unknown types, ALTSVC and ORIGIN among them, which a server ignores.
            k if k > CONTINUATION => return self.control_frame(),
            // DATA, PUSH_PROMISE, CONTINUATION: bounded by h2 itself (flow control,
            // empty-frame and CONTINUATION limits, a client's PUSH_PROMISE ends the
            // connection).
            _ => {}
        }
        Ok(())
    }

    /// A frame of type `kind` sent.
    pub fn sent(&mut self, kind: u8) {
        if kind == DATA {
            self.data_sent += 1;
        }
    }

    fn window_updates_allowed(&self) -> u64 {
        let earned = self.data_sent.saturating_add(self.headers);
        WINDOW_UPDATES_BASE.saturating_add(WINDOW_UPDATES_PER_FRAME.saturating_mul(earned))
    }

    /// One more control frame. The clock is read only once the count passes what HEADERS
    /// frames earned.
    fn control_frame(&mut self) -> Result<(), Flood> {
        self.control += 1;
        let earned = CONTROL_BASE
            .saturating_add(CONTROL_PER_HEADERS.saturating_mul(self.headers))
            .saturating_add(CONTROL_PER_DATA_SENT.saturating_mul(self.data_sent));
        if self.control <= earned {
            return Ok(());
        }
        let age = self.opened.elapsed().as_secs();
        if self.control <= earned.saturating_add(CONTROL_PER_SECOND.saturating_mul(age)) {
            Ok(())
        } else {
            Err(Flood::Control)
        }
    }
}

/// An HTTP/2 connection's IO, counting the frames read and written: a read that takes the
/// client past a [`Budget`] fails, and so does every read after it.
pub struct H2Guard<I> {
    io: I,
    inbound: Frames,
    outbound: Frames,
    budget: Budget,
    flooded: Option<Flood>,
    /// `keyward_h2_floods_total`.
    floods: IntCounter,
}

impl<I> H2Guard<I> {
    /// `io` carries an HTTP/2 connection from its first byte, the client's preface.
    pub fn new(io: I, floods: IntCounter) -> Self {
        Self {
            io,
            inbound: Frames::inbound(),
            outbound: Frames::outbound(),
            budget: Budget::new(Instant::now()),
            flooded: None,
            floods,
        }
    }

    /// Count what was read; past a budget, the error the read ends with (logged and
    /// counted once).
    fn check_read(&mut self, read: &[u8]) -> io::Result<()> {
        let budget = &mut self.budget;
        if let Err(flood) = self
            .inbound
            .feed(read, |kind, stream| budget.received(kind, stream))
        {
            self.flooded = Some(flood);
            self.floods.inc();
            // The budget's name and counts only: nothing the client chose the value of.
            debug!(
                budget = flood.as_str(),
                window_updates = self.budget.window_updates,
                control = self.budget.control,
                "HTTP/2 connection closed: frames past their budget"
            );
        }
        self.flooded.map_or(Ok(()), flood_error)
    }

    /// Count the frames of what was written: `n` bytes from the front of `bufs`.
    fn written(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let budget = &mut self.budget;
        for buf in bufs {
            if n == 0 {
                break;
            }
            let part = &buf[..n.min(buf.len())];
            n -= part.len();
            let _ = self.outbound.feed(part, |kind, _| {
                budget.sent(kind);
                Ok::<(), std::convert::Infallible>(())
            });
        }
    }
}

fn flood_error(flood: Flood) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::InvalidData, flood))
}

impl<I: AsyncRead + Unpin> AsyncRead for H2Guard<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(flood) = self.flooded {
            return Poll::Ready(flood_error(flood));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => Poll::Ready(this.check_read(&buf.filled()[before..])),
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for H2Guard<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written(&[io::IoSlice::new(buf)], n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.written(bufs, n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, 0]);
        f.extend(stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A client's bytes: the preface, then frames of every kind, payloads of several sizes
    /// (one longer than any read below).
    fn client_bytes() -> (Vec<u8>, Vec<u8>) {
        let frames = [
            frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]),
            frame(WINDOW_UPDATE, 0, &[0, 0, 0, 1]),
            frame(HEADERS, 1, &[0x82; 40]),
            frame(DATA, 1, &[7; 300]),
            frame(DATA, 1, &[]),
            frame(PING, 0, &[1; 8]),
            frame(0x77, 0, &[0xff; 3]),
            frame(PRIORITY_UPDATE, 0, &[0, 0, 0, 1, b'u']),
        ];
        let mut bytes = H2_PREFACE.to_vec();
        frames.iter().for_each(|f| bytes.extend(f));
        let kinds = vec![
            SETTINGS,
            WINDOW_UPDATE,
            HEADERS,
            DATA,
            DATA,
            PING,
            0x77,
            PRIORITY_UPDATE,
        ];
        (bytes, kinds)
    }

    fn kinds_of(frames: &mut Frames, pieces: &[&[u8]]) -> Vec<u8> {
        let mut seen = Vec::new();
        for piece in pieces {
            frames
                .feed(piece, |k, _| {
                    seen.push(k);
                    Ok::<(), ()>(())
                })
                .unwrap();
        }
        seen
    }

    #[test]
    fn frames_split_at_every_offset_are_read_alike() {
        let (bytes, kinds) = client_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(kinds_of(&mut Frames::inbound(), &[a, b]), kinds, "at {at}");
        }
    }

    #[test]
    fn frames_read_a_byte_or_a_few_at_a_time_are_read_alike() {
        let (bytes, kinds) = client_bytes();
        for size in [1, 2, 5, 9, 10, 17, 64] {
            let pieces: Vec<&[u8]> = bytes.chunks(size).collect();
            assert_eq!(
                kinds_of(&mut Frames::inbound(), &pieces),
                kinds,
                "size {size}"
            );
        }
    }

    #[test]
    fn a_payload_spanning_reads_is_skipped_not_read_as_frames() {
        // A payload made of what looks like frame headers, delivered across three reads.
        let fake = frame(WINDOW_UPDATE, 0, &[0, 0, 0, 1]).repeat(100);
        let mut bytes = frame(DATA, 1, &fake);
        bytes.extend(frame(PING, 0, &[0; 8]));
        let mut frames = Frames::outbound();
        let (a, rest) = bytes.split_at(20);
        let (b, c) = rest.split_at(700);
        assert_eq!(kinds_of(&mut frames, &[a, b, c]), [DATA, PING]);
    }

    fn flood(budget: &mut Budget, kind: u8, most: u64) -> Result<u64, Flood> {
        for n in 1..=most {
            budget
                .received(kind, 0)
                .inspect_err(|_| assert_eq!(n, most, "cut at {n}, not {most}"))?;
        }
        Ok(most)
    }

    #[test]
    fn window_updates_past_the_budget_are_a_flood() {
        let mut budget = Budget::new(Instant::now());
        assert_eq!(
            flood(&mut budget, WINDOW_UPDATE, WINDOW_UPDATES_BASE + 1),
            Err(Flood::WindowUpdate)
        );
    }

    #[test]
    fn data_sent_and_streams_opened_earn_window_updates() {
        let mut budget = Budget::new(Instant::now());
        for _ in 0..50 {
            budget.sent(DATA);
            budget.sent(HEADERS);
        }
        budget.received(HEADERS, 1).unwrap();
        let allowed = WINDOW_UPDATES_BASE + WINDOW_UPDATES_PER_FRAME * 51;
        assert_eq!(flood(&mut budget, WINDOW_UPDATE, allowed), Ok(allowed));
        assert_eq!(budget.received(WINDOW_UPDATE, 0), Err(Flood::WindowUpdate));
    }

    #[test]
    fn a_long_download_never_runs_out_of_window_updates() {
        // Two updates (stream and connection) for every DATA frame received, the most a
        // receiver sends.
        let mut budget = Budget::new(Instant::now());
        budget.received(HEADERS, 1).unwrap();
        for _ in 0..1_000_000 {
            budget.sent(DATA);
            budget.received(WINDOW_UPDATE, 1).unwrap();
            budget.received(WINDOW_UPDATE, 0).unwrap();
            // And a bandwidth probe for each, as gRPC's estimator sends.
            budget.received(PING, 0).unwrap();
        }
    }

    #[test]
    fn priority_settings_ping_and_unknown_frames_share_one_budget() {
        for kind in [PRIORITY, PRIORITY_UPDATE, SETTINGS, PING, 0x0a, 0x77, 0xff] {
            let mut budget = Budget::new(Instant::now());
            assert_eq!(
                flood(&mut budget, kind, CONTROL_BASE + 1),
                Err(Flood::Control),
                "{kind:#x}"
            );
        }
        let mut budget = Budget::new(Instant::now());
        for kind in [PRIORITY, SETTINGS, PING, 0x77] {
            flood(&mut budget, kind, CONTROL_BASE / 4).unwrap();
        }
        assert_eq!(budget.received(PRIORITY_UPDATE, 0), Err(Flood::Control));
    }

    #[test]
    fn streams_and_time_earn_control_frames() {
        let mut budget = Budget::new(Instant::now());
        for stream in [1, 3, 5] {
            budget.received(HEADERS, stream).unwrap();
        }
        let allowed = CONTROL_BASE + 3 * CONTROL_PER_HEADERS;
        assert_eq!(flood(&mut budget, PRIORITY, allowed), Ok(allowed));
        assert_eq!(budget.received(PING, 0), Err(Flood::Control));
        // Open for an hour: keep-alive PINGs every 10 s for hours are no flood.
        let hour = Duration::from_secs(3600);
        let Some(opened) = Instant::now().checked_sub(hour) else {
            return;
        };
        let mut budget = Budget::new(opened);
        assert_eq!(
            flood(&mut budget, PING, CONTROL_BASE + 3600),
            Ok(CONTROL_BASE + 3600)
        );
    }

    #[test]
    fn frames_that_h2_bounds_itself_are_not_counted() {
        let mut budget = Budget::new(Instant::now());
        for kind in [DATA, 0x5, CONTINUATION] {
            flood(&mut budget, kind, 10 * CONTROL_BASE).unwrap();
        }
    }

    /// Resets, and HEADERS that open no stream (trailers, a stream h2 closed), are control
    /// frames: h2 drops them without a word, and they earn nothing.
    #[test]
    fn resets_and_headers_opening_no_stream_are_control_frames() {
        for (kind, stream) in [(RST_STREAM, 1), (HEADERS, 1), (GOAWAY, 0)] {
            let mut budget = Budget::new(Instant::now());
            budget.received(HEADERS, 1).unwrap();
            let allowed = CONTROL_BASE + CONTROL_PER_HEADERS;
            for n in 1..=allowed {
                budget
                    .received(kind, stream)
                    .unwrap_or_else(|_| panic!("cut at {n}"));
            }
            assert_eq!(budget.received(kind, stream), Err(Flood::Control), "{kind}");
        }
    }

    fn counter() -> IntCounter {
        IntCounter::new("floods", "test").unwrap()
    }

    #[tokio::test]
    async fn a_window_update_flood_fails_the_read_and_every_read_after() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let floods = counter();
        let mut guard = H2Guard::new(server, floods.clone());
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, &[]));
        let update = frame(WINDOW_UPDATE, 0, &[0, 0, 0, 1]);
        for _ in 0..=WINDOW_UPDATES_BASE {
            bytes.extend(&update);
        }
        client.write_all(&bytes).await.unwrap();
        let mut sink = vec![0; 4096];
        let mut read = 0;
        let err = loop {
            match guard.read(&mut sink).await {
                Ok(n) => read += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(read < bytes.len());
        assert!(guard.read(&mut sink).await.is_err());
        assert_eq!(floods.get(), 1);
    }

    #[tokio::test]
    async fn data_written_earns_window_updates_through_the_guard() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = H2Guard::new(server, counter());
        let mut out = frame(SETTINGS, 0, &[]);
        for _ in 0..200 {
            out.extend(frame(DATA, 1, &[0; 100]));
        }
        // Written in pieces that cut headers and payloads alike, some of them vectored.
        for piece in out.chunks(37) {
            let (a, b) = piece.split_at(piece.len() / 2);
            let bufs = [io::IoSlice::new(a), io::IoSlice::new(b)];
            let n = guard.write_vectored(&bufs).await.unwrap();
            if n < piece.len() {
                guard.write_all(&piece[n..]).await.unwrap();
            }
        }
        assert_eq!(guard.budget.data_sent, 200);
        let mut bytes = H2_PREFACE.to_vec();
        let allowed = WINDOW_UPDATES_BASE + 200 * WINDOW_UPDATES_PER_FRAME;
        for _ in 0..allowed {
            bytes.extend(frame(WINDOW_UPDATE, 1, &[0, 0, 0, 1]));
        }
        client.write_all(&bytes).await.unwrap();
        drop(client);
        let mut sink = Vec::new();
        guard.read_to_end(&mut sink).await.unwrap();
        assert_eq!(sink.len(), bytes.len());
    }
}
