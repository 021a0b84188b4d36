//! The bytes of one exchange: the request head keyward writes, the response head it parses,
//! and how the response body is framed (RFC 9112 §6.3, in the order hyper's client applies
//! it, so both clients read every response the same way).

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

use super::H1Error;

/// The most header lines a response head may carry (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// The largest response head read (hyper's client read-buffer ceiling).
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;

/// How the body after a response head ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: HEAD, 1xx, 204, 304, or `Content-Length: 0`.
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: …, chunked`.
    Chunked,
    /// Neither: the body runs to the end of the connection.
    Close,
}

/// A parsed final response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// A reason phrase other than the status code's canonical one, passed on as hyper does.
    pub reason: Option<hyper::ext::ReasonPhrase>,
    pub framing: Framing,
    /// May the connection carry another request once this body is read?
    pub keep_alive: bool,
}

/// Write `method target HTTP/1.1`, the headers as they are, and the blank line.
pub fn encode_request(method: &Method, target: &str, headers: &HeaderMap, dst: &mut Vec<u8>) {
    dst.clear();
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(target.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
}

/// Can the bytes read since `prev` (the length at the last partial parse) end a head? A
/// blank line (`\r\n\r\n`, `\n\n` or `\n\r\n`) must appear in them. Saves parsing a
/// slowly arriving head again on every read, and makes a malformed head that never ends
/// wait for more, exactly as hyper's client does.
pub fn may_end_head(buf: &[u8], prev: usize) -> bool {
    let bytes = &buf[prev.saturating_sub(3).min(buf.len())..];
    bytes.iter().enumerate().any(|(i, &b)| {
        let rest = &bytes[i + 1..];
        match b {
            b'\r' => rest.starts_with(b"\n\r\n"),
            b'\n' => rest.starts_with(b"\n") || rest.starts_with(b"\r\n"),
            _ => false,
        }
    })
}

/// Where one header line's name and value sit in the head.
#[derive(Clone, Copy)]
struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

/// The raw facts of a complete head, before anything is copied.
struct Raw {
    len: usize,
    code: u16,
    version: u8,
    reason: Option<(usize, usize)>,
    count: usize,
}

/// Parse the final response head at the front of `buf`, skipping informational (1xx but
/// 101) heads. `Ok(None)`: more bytes are needed. On success the head's bytes are consumed;
/// when `take_body` allows and the whole `Content-Length` body is already in `buf`, it is
/// consumed too and returned, sharing one allocation with the head.
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
    take_body: bool,
) -> Result<Option<(Head, Option<Bytes>)>, H1Error> {
    loop {
        let mut spans = [Span {
            name: (0, 0),
            value: (0, 0),
        }; MAX_HEADERS];
        let Some(raw) = parse_raw(buf, &mut spans)? else {
            return Ok(None);
        };
        let status = StatusCode::from_u16(raw.code).map_err(|_| H1Error::Status)?;
        if matches!(raw.code, 100 | 102..=199) {
            buf.advance(raw.len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let version = if raw.version == 1 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let spans = &spans[..raw.count];
        let framing = framing(buf, spans, status, version, method)?;
        let body_len = match framing {
            Framing::Length(n) if take_body => usize::try_from(n)
                .ok()
                .filter(|n| raw.len.checked_add(*n).is_some_and(|end| end <= buf.len())),
            _ => None,
        };
        let end = raw.len + body_len.unwrap_or(0);
        let bytes = Bytes::copy_from_slice(&buf[..end]);
        buf.advance(end);
        let head = build(&bytes, &raw, spans, status, version, framing)?;
        let body = body_len.map(|_| bytes.slice(raw.len..end));
        return Ok(Some((head, body)));
    }
}

/// httparse over `buf`, with hyper's client settings (no obs-fold, no spaces before the
/// colon, one space between status-line parts).
fn parse_raw(buf: &[u8], spans: &mut [Span; MAX_HEADERS]) -> Result<Option<Raw>, H1Error> {
    let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed =
        httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut res, buf, &mut headers);
    match parsed {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(H1Error::Parse(e)),
        Ok(httparse::Status::Complete(len)) => {
            let base = buf.as_ptr() as usize;
            // An empty slice need not point into `buf`.
            let at = |s: &[u8]| {
                if s.is_empty() {
                    return (0, 0);
                }
                let start = s.as_ptr() as usize - base;
                (start, start + s.len())
            };
            for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
                *span = Span {
                    name: at(h.name.as_bytes()),
                    value: at(h.value),
                };
            }
            let reason = res.reason.filter(|r| {
                StatusCode::from_u16(res.code.unwrap_or(0))
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    != Some(*r)
            });
            Ok(Some(Raw {
                len,
                code: res.code.unwrap_or(0),
                version: res.version.unwrap_or(1),
                // An empty reason has no address in the buffer worth keeping.
                reason: reason.map(|r| at(r.as_bytes())),
                count: res.headers.len(),
            }))
        }
    }
}

/// The values of every header line named `name`, as raw bytes.
fn values<'a>(
    buf: &'a [u8],
    spans: &'a [Span],
    name: &'a HeaderName,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    spans
        .iter()
        .filter(move |s| buf[s.name.0..s.name.1].eq_ignore_ascii_case(name.as_str().as_bytes()))
        .map(move |s| &buf[s.value.0..s.value.1])
}

/// RFC 9112 §6.3, as hyper's client applies it.
fn framing(
    buf: &[u8],
    spans: &[Span],
    status: StatusCode,
    version: Version,
    method: &Method,
) -> Result<Framing, H1Error> {
    if matches!(status.as_u16(), 101 | 204 | 304) || method == Method::HEAD {
        return Ok(Framing::Empty);
    }
    if let Some(last) = values(buf, spans, &header::TRANSFER_ENCODING).last() {
        if version == Version::HTTP_10 {
            return Err(H1Error::TransferEncoding10);
        }
        return Ok(if last_token_is_chunked(last) {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let mut lengths = values(buf, spans, &header::CONTENT_LENGTH).peekable();
    if lengths.peek().is_none() {
        return Ok(Framing::Close);
    }
    match content_length(lengths) {
        Some(0) => Ok(Framing::Empty),
        Some(n) if n <= u64::MAX - 2 => Ok(Framing::Length(n)),
        _ => Err(H1Error::ContentLength),
    }
}

/// Every `Content-Length` value (comma-separated lists included) must be the same number.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<u64> {
    let mut length = None;
    for line in values {
        // Visible ASCII only, as `HeaderValue::to_str` requires.
        if !line.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
            return None;
        }
        for part in line.split(|&b| b == b',') {
            let n = digits(part.trim_ascii())?;
            if *length.get_or_insert(n) != n {
                return None;
            }
        }
    }
    length
}

fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

/// Is `chunked` the last coding of this `Transfer-Encoding` line?
fn last_token_is_chunked(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok_and(|s| {
        s.rsplit(',')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
    }) && line.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// Does any `Connection` line list `token`?
fn connection_has(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|s| {
        s.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// The head as `http` types. Values share `bytes`; names are `http`'s own constants for the
/// standard ones.
fn build(
    bytes: &Bytes,
    raw: &Raw,
    spans: &[Span],
    status: StatusCode,
    version: Version,
    framing: Framing,
) -> Result<Head, H1Error> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut keep_alive = version == Version::HTTP_11;
    let mut saw_close = false;
    for s in spans {
        let name = HeaderName::from_bytes(&bytes[s.name.0..s.name.1])
            .map_err(|_| H1Error::Parse(httparse::Error::HeaderName))?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(s.value.0..s.value.1))
            .map_err(|_| H1Error::Parse(httparse::Error::HeaderValue))?;
        if name == header::CONNECTION {
            if saw_close || connection_has(&value, "close") {
                saw_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = connection_has(&value, "keep-alive");
            }
        }
        headers.append(name, value);
    }
    let reason = match raw.reason {
        None => None,
        Some((start, end)) => Some(
            hyper::ext::ReasonPhrase::try_from(bytes.slice(start..end))
                .map_err(|_| H1Error::Parse(httparse::Error::Status))?,
        ),
    };
    let keep_alive = keep_alive && framing != Framing::Close && status != StatusCode::SWITCHING_PROTOCOLS;
    Ok(Head {
        status,
        version,
        headers,
        reason,
        framing,
        keep_alive,
    })
}
