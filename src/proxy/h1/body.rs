//! A response body read from a fast-path connection. The connection goes home (back to the
//! worker's pool) the moment its last byte is read, if the response allows another request
//! and nothing unasked-for followed it; a body dropped before its end closes it.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::chunked::{Decoder, Step};
use super::{Conn, Framing, H1Error, Head};

/// The response for a parsed `head`: its status, version, headers and reason phrase, and
/// the body that reads the rest from `conn` (`ready`: a body that came whole with the
/// head) and sends `conn` `home` when it may carry another request.
pub fn response<T, H>(
    conn: Box<Conn<T>>,
    head: Head,
    ready: Option<Bytes>,
    home: H,
) -> http::Response<ResponseBody<T, H>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Home<T>,
{
    let body = ResponseBody::new(conn, head.framing, ready, head.keep_alive, home);
    let mut resp = http::Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    if let Some(reason) = head.reason {
        resp.extensions_mut().insert(reason);
    }
    resp
}

/// Where a connection goes once its response is read: the serving worker's pool.
pub trait Home<T>: Send + Unpin + 'static {
    fn take_back(self, conn: Box<Conn<T>>);
}

/// How the rest of the body is delimited.
enum Rest {
    Length(u64),
    Chunked(Decoder),
    Close,
}

enum State<T, H> {
    /// The whole body was in the buffer with the head (or there is none).
    Ready(Option<Bytes>),
    Reading {
        conn: Box<Conn<T>>,
        rest: Rest,
        keep_alive: bool,
        home: H,
    },
    /// The body broke; the error is yielded on the next poll, so what was already yielded
    /// is written to the client first (as with hyper's client, whose body arrives through
    /// a channel).
    Broken(H1Error),
    Done,
}

pub struct ResponseBody<T, H> {
    state: State<T, H>,
}

/// Send `conn` home if another request may follow on it.
fn finish<T, H: Home<T>>(conn: Box<Conn<T>>, keep_alive: bool, home: H) {
    if keep_alive && conn.rbuf.is_empty() {
        home.take_back(conn);
    }
}

impl<T, H> ResponseBody<T, H>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Home<T>,
{
    /// The body after `framing`'s head; `ready` is a body that came whole with the head.
    pub fn new(
        conn: Box<Conn<T>>,
        framing: Framing,
        ready: Option<Bytes>,
        keep_alive: bool,
        home: H,
    ) -> Self {
        let rest = match (framing, ready) {
            (_, Some(bytes)) => {
                finish(conn, keep_alive, home);
                return Self::ready(Some(bytes));
            }
            (Framing::Empty, None) => {
                finish(conn, keep_alive, home);
                return Self::ready(None);
            }
            (Framing::Length(n), None) => Rest::Length(n),
            (Framing::Chunked, None) => Rest::Chunked(Decoder::default()),
            (Framing::Close, None) => Rest::Close,
        };
        Self {
            state: State::Reading {
                conn,
                rest,
                keep_alive,
                home,
            },
        }
    }

    fn ready(bytes: Option<Bytes>) -> Self {
        Self {
            state: State::Ready(bytes.filter(|b| !b.is_empty())),
        }
    }

    /// The body is over: the connection goes home or is closed.
    fn end(&mut self, reusable: bool) {
        if let State::Reading {
            conn,
            keep_alive,
            home,
            ..
        } = std::mem::replace(&mut self.state, State::Done)
        {
            finish(conn, keep_alive && reusable, home);
        }
    }

    fn fail(
        &mut self,
        e: H1Error,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.end(false);
        self.state = State::Broken(e);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T, H> http_body::Body for ResponseBody<T, H>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Home<T>,
{
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let (conn, rest) = match &mut this.state {
                State::Ready(bytes) => {
                    let frame = bytes.take().map(|b| Ok(Frame::data(b)));
                    this.state = State::Done;
                    return Poll::Ready(frame);
                }
                State::Done => return Poll::Ready(None),
                State::Broken(_) => {
                    let State::Broken(e) = std::mem::replace(&mut this.state, State::Done) else {
                        return Poll::Ready(None);
                    };
                    return Poll::Ready(Some(Err(e)));
                }
                State::Reading { conn, rest, .. } => (conn, rest),
            };
            match rest {
                Rest::Length(0) => {
                    this.end(true);
                    return Poll::Ready(None);
                }
                Rest::Length(left) if !conn.rbuf.is_empty() => {
                    let n =
                        usize::try_from(*left).map_or(conn.rbuf.len(), |l| l.min(conn.rbuf.len()));
                    *left -= n as u64;
                    let data = conn.rbuf.split_to(n).freeze();
                    if *left == 0 {
                        this.end(true);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Rest::Chunked(decoder) => match decoder.decode(&mut conn.rbuf) {
                    Err(e) => return this.fail(e, cx),
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Trailers(t)) => {
                        this.end(true);
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Step::End) => {
                        this.end(true);
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                },
                Rest::Close if !conn.rbuf.is_empty() => {
                    let data = conn.rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Rest::Length(_) | Rest::Close => {}
            }
            let close_delimited = matches!(rest, Rest::Close);
            match ready!(conn.poll_fill(cx)) {
                Err(e) => return this.fail(H1Error::Io(e), cx),
                Ok(0) if close_delimited => {
                    this.end(false);
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(H1Error::Incomplete, cx),
                Ok(_) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Ready(bytes) => bytes.is_none(),
            State::Done => true,
            State::Broken(_) => false,
            State::Reading { rest, .. } => matches!(rest, Rest::Length(0)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Ready(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            State::Done => SizeHint::with_exact(0),
            State::Broken(_) => SizeHint::default(),
            State::Reading {
                rest: Rest::Length(n),
                ..
            } => SizeHint::with_exact(*n),
            State::Reading { .. } => SizeHint::default(),
        }
    }
}
