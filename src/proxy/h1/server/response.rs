//! Writing a response to a request keyward's server read, by hyper's server's rules for
//! such a request (HTTP/1.1, not HEAD or CONNECT): the same status line, the same framing
//! headers (`Content-Length` from the body's exact size or the header, else chunked), the
//! same `date`, `connection: close` when the connection is closing, and the same bodiless
//! statuses. `differential` holds the two servers to each other; `tests` covers what it
//! leaves out.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::proxy::h1::codec::{digits, last_token_is_chunked, lists};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a response could not be written whole; the connection is closed without more.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing to the client failed")]
    Io(#[from] io::Error),
    #[error("response body failed")]
    Body(#[source] BoxError),
    #[error("response body ended before its content-length")]
    Short,
    #[error("invalid response framing headers")]
    Framing,
    #[error("the client left before the response was complete")]
    Gone,
}

impl WriteError {
    /// How a connection watched while a request was in flight ends: a read error as that
    /// error, the client's end as a clean close.
    pub(super) fn into_end(self) -> io::Result<()> {
        match self {
            Self::Io(e) => Err(e),
            _ => Ok(()),
        }
    }
}

/// How the body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoder {
    Length(u64),
    Chunked,
}

/// What hyper knows of a body's length before it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Already at its end.
    Empty,
    Exact(u64),
    Unknown,
}

fn known<B: Body>(body: &B) -> Known {
    if body.is_end_stream() {
        Known::Empty
    } else {
        body.size_hint()
            .exact()
            .map_or(Known::Unknown, Known::Exact)
    }
}

/// The `date` value, formatted once a second.
#[derive(Default)]
pub struct Date {
    second: u64,
    text: String,
}

impl Date {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.text.is_empty() || second != self.second {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        self.text.as_bytes()
    }
}

/// Statuses whose response never has a body (for a method other than HEAD and CONNECT).
fn bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The connection's buffers a response is written with.
pub struct Buffers<'a> {
    /// Bytes the client sent meanwhile (the connection is watched for its leaving while
    /// the body waits on its source, as hyper does).
    pub read: &'a mut BytesMut,
    pub write: &'a mut BytesMut,
    /// Receives the response's emptied header map (kept for the next request's headers).
    pub spare: &'a mut HeaderMap,
    pub date: &'a mut Date,
}

/// Write `resp`; `keep_alive` is false once the connection is closing. Returns whether the
/// connection must close after it.
pub async fn write<I, B>(
    io: &mut I,
    resp: Response<B>,
    keep_alive: bool,
    bufs: &mut Buffers<'_>,
) -> Result<bool, WriteError>
where
    I: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = resp.into_parts();
    bufs.write.clear();
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    let head = encode_head(
        parts.status,
        reason.map(hyper::ext::ReasonPhrase::as_bytes),
        &mut parts.headers,
        known(&body),
        keep_alive,
        bufs.write,
        bufs.date,
    );
    parts.headers.clear();
    *bufs.spare = parts.headers;
    let (encoder, last) = head?;
    if encoder == Encoder::Length(0) {
        drop(body);
        io.write_all(bufs.write).await?;
        io.flush().await?;
    } else {
        write_body(io, body, encoder, bufs).await?;
    }
    Ok(last)
}

/// The status line and header fields into `dst`: hyper's `Server::encode_headers` for an
/// HTTP/1.1 request other than HEAD or CONNECT. `reason`: a reason phrase other than the
/// canonical one (hyper's `ReasonPhrase`, which keyward's upstream client sets as hyper's
/// does), written as it is.
fn encode_head(
    status: StatusCode,
    reason: Option<&[u8]>,
    headers: &mut HeaderMap,
    body: Known,
    keep_alive: bool,
    dst: &mut BytesMut,
    date: &mut Date,
) -> Result<(Encoder, bool), WriteError> {
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        // hyper answers a 1xx response with an empty 500 and closes.
        headers.clear();
        status_line(StatusCode::INTERNAL_SERVER_ERROR, None, dst);
        dst.put_slice(b"content-length: 0\r\n");
        put_date(dst, date);
        return Ok((Encoder::Length(0), true));
    }
    let mut last = !keep_alive || status == StatusCode::SWITCHING_PROTOCOLS;
    if !keep_alive && !headers.get_all(header::CONNECTION).iter().any(closes) {
        headers.append(header::CONNECTION, HeaderValue::from_static("close"));
    }
    status_line(status, reason, dst);
    let mut fields = Fields::default();
    let mut current: Option<&HeaderName> = None;
    for (name, value) in headers.iter() {
        if current != Some(name) {
            fields.end_line(dst);
            current = Some(name);
        }
        fields.field(name, value, status, body, &mut last, dst)?;
    }
    fields.end_line(dst);
    let mut encoder = match fields.encoder {
        Some(encoder) => encoder,
        None => implicit_length(status, body, dst),
    };
    if bodiless(status) {
        encoder = Encoder::Length(0);
    }
    if fields.date {
        dst.put_slice(b"\r\n");
    } else {
        put_date(dst, date);
    }
    Ok((encoder, last))
}

fn closes(value: &HeaderValue) -> bool {
    lists(value.as_bytes(), b"close")
}

/// hyper's status line: `reason` when given, else the status code's canonical one.
fn status_line(status: StatusCode, reason: Option<&[u8]>, dst: &mut BytesMut) {
    if status == StatusCode::OK && reason.is_none() {
        dst.put_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    let canonical = || status.canonical_reason().unwrap_or("<none>").as_bytes();
    dst.put_slice(b"HTTP/1.1 ");
    dst.put_slice(status.as_str().as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(reason.unwrap_or_else(canonical));
    dst.put_slice(b"\r\n");
}

fn put_date(dst: &mut BytesMut, date: &mut Date) {
    dst.put_slice(b"date: ");
    dst.put_slice(date.now());
    dst.put_slice(b"\r\n\r\n");
}

/// The framing header hyper adds when the response named none.
fn implicit_length(status: StatusCode, body: Known, dst: &mut BytesMut) -> Encoder {
    match body {
        Known::Unknown if bodiless(status) => Encoder::Length(0),
        Known::Unknown => {
            dst.put_slice(b"transfer-encoding: chunked\r\n");
            Encoder::Chunked
        }
        Known::Empty | Known::Exact(0) => {
            if !bodiless(status) {
                dst.put_slice(b"content-length: 0\r\n");
            }
            Encoder::Length(0)
        }
        Known::Exact(n) if bodiless(status) => Encoder::Length(n),
        Known::Exact(n) => {
            dst.put_slice(b"content-length: ");
            dst.put_slice(itoa::Buffer::new().format(n).as_bytes());
            dst.put_slice(b"\r\n");
            Encoder::Length(n)
        }
    }
}

/// The header fields hyper writes as one line (`content-length`, `transfer-encoding`,
/// `connection`, `trailer`) and what they decided.
#[derive(Default)]
struct Fields {
    /// A line is open: further values of its name join it.
    open: bool,
    /// The open `transfer-encoding` line does not end in `chunked`: hyper appends it.
    must_chunk: bool,
    /// The encoder the framing headers chose (hyper's `wrote_len`).
    encoder: Option<Encoder>,
    content_length: Option<u64>,
    date: bool,
}

impl Fields {
    fn end_line(&mut self, dst: &mut BytesMut) {
        if self.open {
            dst.put_slice(if self.must_chunk {
                b", chunked\r\n"
            } else {
                b"\r\n"
            });
        }
        self.open = false;
        self.must_chunk = false;
    }

    /// One header field; `last` turns true on a `connection: close`.
    fn field(
        &mut self,
        name: &HeaderName,
        value: &HeaderValue,
        status: StatusCode,
        body: Known,
        last: &mut bool,
        dst: &mut BytesMut,
    ) -> Result<(), WriteError> {
        match *name {
            header::CONTENT_LENGTH => return self.content_length(value, body, dst),
            header::TRANSFER_ENCODING => {
                if self.encoder.is_some() && !self.open {
                    return Err(WriteError::Framing);
                }
                if bodiless(status) {
                    return Ok(());
                }
                self.encoder = Some(Encoder::Chunked);
                self.must_chunk = !last_token_is_chunked(value.as_bytes());
                self.join(b"transfer-encoding: ", value, dst);
                return Ok(());
            }
            header::CONNECTION => {
                *last |= closes(value);
                self.join(b"connection: ", value, dst);
                return Ok(());
            }
            header::TRAILER => {
                if !bodiless(status) {
                    self.join(b"trailer: ", value, dst);
                }
                return Ok(());
            }
            header::DATE => self.date = true,
            _ => {}
        }
        dst.put_slice(name.as_str().as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
        Ok(())
    }

    /// The first value opens `prefix`'s line; later values of the name join it.
    fn join(&mut self, prefix: &[u8], value: &HeaderValue, dst: &mut BytesMut) {
        if self.open {
            dst.put_slice(b", ");
        } else {
            dst.put_slice(prefix);
            self.open = true;
        }
        dst.put_slice(value.as_bytes());
    }

    fn content_length(
        &mut self,
        value: &HeaderValue,
        body: Known,
        dst: &mut BytesMut,
    ) -> Result<(), WriteError> {
        if self.encoder.is_some() && !self.open {
            return Err(WriteError::Framing);
        }
        match body {
            // An empty body: hyper leaves the header out.
            Known::Empty => {}
            Known::Exact(n) => {
                if !self.open {
                    self.encoder = Some(Encoder::Length(n));
                    self.open = true;
                    dst.put_slice(b"content-length: ");
                    dst.put_slice(value.as_bytes());
                }
            }
            Known::Unknown => {
                let n = digits(value.as_bytes()).ok_or(WriteError::Framing)?;
                match self.content_length {
                    Some(prev) if prev != n => return Err(WriteError::Framing),
                    Some(_) => {}
                    None => {
                        self.encoder = Some(Encoder::Length(n));
                        self.content_length = Some(n);
                        self.open = true;
                        dst.put_slice(b"content-length: ");
                        dst.put_slice(value.as_bytes());
                    }
                }
            }
        }
        Ok(())
    }
}

/// How much of the body is buffered, at most, before it is written: hyper's server, too,
/// takes no more from the body while its write buffer is full.
const HIGH_WATER: usize = 64 * 1024;

/// The body after the head in `bufs.write`, and all of it written and flushed. As hyper
/// does, the body is polled only while the buffer has room, written as it comes (so a
/// streamed response is not held back), and a client that leaves meanwhile ends it. That
/// is also what lets the connection's watchdog cut off a response the client does not
/// read (`proxy::writing`): its last poll yielded a frame that cannot be written.
async fn write_body<I, B>(
    io: &mut I,
    body: B,
    encoder: Encoder,
    bufs: &mut Buffers<'_>,
) -> Result<(), WriteError>
where
    I: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut framing = Framing {
        remaining: match encoder {
            Encoder::Length(n) => Some(n),
            Encoder::Chunked => None,
        },
        done: false,
    };
    let mut written = 0;
    // Dropped as soon as it is done (hyper drops it then too): the request stops counting
    // as in flight before its last bytes go out.
    let mut body = Some(body);
    std::future::poll_fn(|cx| loop {
        let wbuf = &mut *bufs.write;
        let mut progress = false;
        while let Some(source) = body.as_mut().filter(|_| wbuf.len() - written < HIGH_WATER) {
            match Pin::new(source).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(frame) => framing.take(frame, wbuf)?,
            }
            progress = true;
            if framing.done {
                body = None;
            }
        }
        if !framing.done && bufs.read.is_empty() {
            if let Poll::Ready(left) = poll_watch(io, cx, bufs.read) {
                left?;
                progress = true;
            }
        }
        if written < wbuf.len() {
            match Pin::new(&mut *io).poll_write(cx, &wbuf[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()))
                }
                Poll::Ready(Ok(n)) => {
                    written += n;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {}
            }
            if written == wbuf.len() {
                wbuf.clear();
                written = 0;
            }
        }
        if written == 0 && wbuf.is_empty() {
            // Everything taken so far is out: flushed (TLS), then done or waiting.
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(())) if framing.done => return Poll::Ready(Ok(())),
                _ => {}
            }
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await
}

/// Where the body's framing stands.
struct Framing {
    /// Bytes still owed for a `Content-Length` body; `None` when chunked.
    remaining: Option<u64>,
    /// The body has ended (or its length is written: hyper stops reading it then).
    done: bool,
}

impl Framing {
    /// Encode one polled frame (or the body's end) into `wbuf`.
    fn take<E: Into<BoxError>>(
        &mut self,
        frame: Option<Result<http_body::Frame<Bytes>, E>>,
        wbuf: &mut BytesMut,
    ) -> Result<(), WriteError> {
        let data = match frame {
            None => return self.end(wbuf),
            Some(Err(e)) => return Err(WriteError::Body(e.into())),
            // Trailers: hyper sends none to a request without `TE: trailers`.
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => return Ok(()),
            },
        };
        match &mut self.remaining {
            Some(left) => {
                // Past the length, hyper writes no more.
                let n = usize::try_from(*left).map_or(data.len(), |l| l.min(data.len()));
                *left -= n as u64;
                wbuf.put_slice(&data[..n]);
                self.done = *left == 0;
            }
            None => {
                put_chunk_size(wbuf, data.len());
                wbuf.put_slice(&data);
                wbuf.put_slice(b"\r\n");
            }
        }
        Ok(())
    }

    fn end(&mut self, wbuf: &mut BytesMut) -> Result<(), WriteError> {
        match self.remaining {
            Some(0) => {}
            Some(_) => return Err(WriteError::Short),
            None => wbuf.put_slice(b"0\r\n\r\n"),
        }
        self.done = true;
        Ok(())
    }
}

/// Read what the client sends while it waits for its answer or while the answer is
/// written: `Ready(Err)` once it has left (`Gone`: the end of its stream), `Ready(Ok)`
/// after keeping what it sent in `read` (a pipelined request).
pub(super) fn poll_watch<I: AsyncRead + Unpin>(
    io: &mut I,
    cx: &mut Context<'_>,
    read: &mut BytesMut,
) -> Poll<Result<(), WriteError>> {
    let mut scratch = [0u8; 256];
    let mut buf = ReadBuf::new(&mut scratch);
    match Pin::new(io).poll_read(cx, &mut buf) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
        Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(Err(WriteError::Gone)),
        Poll::Ready(Ok(())) => {
            read.extend_from_slice(buf.filled());
            Poll::Ready(Ok(()))
        }
    }
}

/// A chunk's size line, in upper-case hex as hyper writes it.
fn put_chunk_size(dst: &mut BytesMut, len: usize) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = len;
    loop {
        at -= 1;
        digits[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    dst.put_slice(&digits[at..]);
    dst.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `encode_head` makes of these fields: the head it writes (its `date` value
    /// blanked), its encoder and `last`.
    fn encode(
        status: u16,
        fields: &[(&str, &str)],
        body: Known,
        keep_alive: bool,
    ) -> Result<(String, Encoder, bool), WriteError> {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let mut dst = BytesMut::new();
        let status = StatusCode::from_u16(status).unwrap();
        let (encoder, last) = encode_head(
            status,
            None,
            &mut headers,
            body,
            keep_alive,
            &mut dst,
            &mut Date::default(),
        )?;
        let text = String::from_utf8(dst.to_vec()).unwrap();
        // The `date` value is the clock's (29 bytes, as RFC 9110 formats it).
        let blanked = match text.find("date: ") {
            Some(i) => format!("{}-{}", &text[..i + 6], &text[i + 6 + 29..]),
            None => text,
        };
        Ok((blanked, encoder, last))
    }

    /// [`encode`] of a head it writes.
    fn head(
        status: u16,
        fields: &[(&str, &str)],
        body: Known,
        keep_alive: bool,
    ) -> (String, Encoder, bool) {
        encode(status, fields, body, keep_alive).unwrap_or_else(|e| panic!("refused: {e:?}"))
    }

    #[test]
    fn an_exact_body_gets_its_length_and_the_connection_stays() {
        let (h, e, last) = head(200, &[("x-a", "1")], Known::Exact(5), true);
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: -\r\n\r\n"
        );
        assert_eq!((e, last), (Encoder::Length(5), false));
    }

    #[test]
    fn an_unknown_length_is_chunked_and_a_transfer_coding_ends_in_chunked_alone() {
        let (h, e, _) = head(200, &[], Known::Unknown, true);
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: -\r\n\r\n"
        );
        assert_eq!(e, Encoder::Chunked);
        // hyper appends `, chunked` to the later `connection` line as well; not here.
        let fields = [("transfer-encoding", "gzip"), ("connection", "x-a")];
        let (h, e, _) = head(200, &fields, Known::Unknown, true);
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\nconnection: x-a\r\ndate: -\r\n\r\n"
        );
        assert_eq!(e, Encoder::Chunked);
    }

    #[test]
    fn closing_adds_one_connection_close() {
        let (h, _, last) = head(200, &[], Known::Empty, false);
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\ndate: -\r\n\r\n"
        );
        assert!(last);
        let (h, _, last) = head(401, &[("connection", "close")], Known::Empty, false);
        assert_eq!(h.matches("close").count(), 1, "{h}");
        assert!(last);
        // A response that says close closes a keep-alive connection too.
        let (_, _, last) = head(400, &[("connection", "Close")], Known::Empty, true);
        assert!(last);
    }

    #[test]
    fn bodiless_statuses_write_no_body_and_a_1xx_becomes_an_empty_500() {
        let (h, e, _) = head(204, &[], Known::Exact(3), true);
        assert_eq!(h, "HTTP/1.1 204 No Content\r\ndate: -\r\n\r\n");
        assert_eq!(e, Encoder::Length(0));
        let (h, e, last) = head(103, &[("x-a", "1")], Known::Exact(3), true);
        assert_eq!(
            h,
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\ndate: -\r\n\r\n"
        );
        assert_eq!((e, last), (Encoder::Length(0), true));
    }

    #[test]
    fn a_named_length_frames_an_unknown_body_and_conflicting_ones_are_refused() {
        let (h, e, _) = head(200, &[("content-length", "7")], Known::Unknown, true);
        assert_eq!(h, "HTTP/1.1 200 OK\r\ncontent-length: 7\r\ndate: -\r\n\r\n");
        assert_eq!(e, Encoder::Length(7));
        let lengths = [("content-length", "7"), ("content-length", "8")];
        let refused = encode(200, &lengths, Known::Unknown, true);
        assert!(matches!(refused, Err(WriteError::Framing)));
    }

    #[test]
    fn chunk_sizes_are_upper_case_hex() {
        for (len, line) in [(1, "1\r\n"), (255, "FF\r\n"), (4096, "1000\r\n")] {
            let mut dst = BytesMut::new();
            put_chunk_size(&mut dst, len);
            assert_eq!(&dst[..], line.as_bytes());
        }
    }
}
