//! A connection handed to hyper after keyward's server read part of it: the bytes already
//! read come first, then the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io`, with `pre` read back first.
pub struct Rewind<I> {
    pre: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub fn new(pre: Bytes, io: I) -> Self {
        Self { pre, io }
    }
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Are these bytes a connection's first, still short of the HTTP/2 preface and matching
/// it so far? hyper's preface sniff goes on reading then.
pub fn may_be_http2(read: &[u8]) -> bool {
    read.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(read)
}

impl<I> Rewind<I> {
    /// Did the connection open with the whole HTTP/2 preface?
    pub fn is_http2(&self) -> bool {
        self.pre.starts_with(H2_PREFACE)
    }

    /// Do the bytes read so far show HTTP/1 (and not the start of an HTTP/2 preface)?
    /// hyper's preface sniff decides alike on the first byte that differs.
    pub fn is_http1(&self) -> bool {
        let n = self.pre.len().min(H2_PREFACE.len());
        n > 0 && self.pre[..n] != H2_PREFACE[..n]
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pre.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.pre.len().min(buf.remaining());
        buf.put_slice(&self.pre[..n]);
        self.pre.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_the_prefix_then_the_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), a);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn http1_is_known_on_the_first_byte_off_the_http2_preface() {
        let is_http1 = |pre: &'static [u8]| Rewind::new(Bytes::from_static(pre), ()).is_http1();
        assert!(is_http1(b"GET / HTTP/1.1\r\n"));
        assert!(is_http1(b"PRX"));
        assert!(!is_http1(b"PRI * HT"));
        assert!(!is_http1(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"));
        assert!(!is_http1(b""));
    }
}
