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
/// The largest response head read, by this client and by hyper's (its read-buffer ceiling
/// is set to it). hyper's default, 408 KB, let an app that stalls inside a long head make
/// keyward hold that much per request in flight for `upstream_timeout` (1,024 requests: 486
/// MB). Envoy's default limit is 60 KiB, nginx's `proxy_buffer_size` 4-8 KiB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most informational (1xx) heads skipped before one response's final head: a few `103
/// Early Hints` or `102 Processing` are what apps send.
pub const MAX_INFORMATIONAL: usize = 32;

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
pub fn encode_request<'h>(
    method: &Method,
    target: &str,
    headers: impl IntoIterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    dst: &mut Vec<u8>,
) {
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
#[derive(Clone, Copy, Default)]
pub struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

/// The raw facts of a complete head, before anything is copied.
struct Raw {
    len: usize,
    code: u16,
    version: u8,
    reason: Option<(usize, usize)>,
}

/// Parse the final response head at the front of `buf`, skipping informational (1xx but
/// 101) heads. `Ok(None)`: more bytes are needed. On success the head's bytes are consumed;
/// when the whole `Content-Length` body is already in `buf`, it is consumed too and
/// returned. Both are split off the buffer, not copied.
///
/// `spans` is scratch space kept by the connection, so no request pays for clearing or
/// allocating room for a hundred header positions. The head's headers go into `recycled`
/// (taken, cleared): the request's own map, whose room is no longer needed once it is
/// sent, so the response costs no new map. It is left as it was until a final head is
/// complete.
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
    spans: &mut Vec<Span>,
    recycled: &mut HeaderMap,
    informational: &mut usize,
) -> Result<Option<(Head, Option<Bytes>)>, H1Error> {
    loop {
        let Some(raw) = parse_raw(buf, spans)? else {
            return Ok(None);
        };
        let status = StatusCode::from_u16(raw.code).map_err(|_| H1Error::Status)?;
        if matches!(raw.code, 100 | 102..=199) {
            // Counted across reads: an app that sends 1xx heads without end kept a core
            // busy until `upstream_timeout`.
            *informational += 1;
            if *informational > MAX_INFORMATIONAL {
                return Err(H1Error::TooManyInformational);
            }
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
        // Split off, not copied: the read buffer is shared from its first split on, so
        // this costs a reference count, and the buffer is reclaimed in place once the
        // response has been written downstream.
        let bytes = buf.split_to(raw.len).freeze();
        let (headers, facts) = headers(&bytes, spans, std::mem::take(recycled))?;
        let framing = facts.framing(status, version, method)?;
        let body = match framing {
            Framing::Length(n) if n <= buf.len() as u64 => Some(buf.split_to(n as usize).freeze()),
            _ => None,
        };
        let reason = match raw.reason {
            None => None,
            Some((start, end)) => Some(
                hyper::ext::ReasonPhrase::try_from(bytes.slice(start..end))
                    .map_err(|_| H1Error::Parse(httparse::Error::Status))?,
            ),
        };
        let head = Head {
            status,
            version,
            headers,
            reason,
            framing,
            keep_alive: facts.keep_alive(version)
                && framing != Framing::Close
                && status != StatusCode::SWITCHING_PROTOCOLS,
        };
        return Ok(Some((head, body)));
    }
}

/// httparse over `buf`, with hyper's client settings (no obs-fold, no spaces before the
/// colon, one space between status-line parts).
fn parse_raw(buf: &[u8], spans: &mut Vec<Span>) -> Result<Option<Raw>, H1Error> {
    let mut headers = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut headers,
    );
    match parsed {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        // Complete in one read, but past the bound all the same (hyper's client refuses it).
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => Err(H1Error::HeadTooLarge),
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
            spans.clear();
            spans.extend(res.headers.iter().map(|h| Span {
                name: at(h.name.as_bytes()),
                value: at(h.value),
            }));
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
            }))
        }
    }
}

/// What the framing and connection headers said, gathered while the map is built.
#[derive(Default)]
struct Facts {
    /// A `Transfer-Encoding` line was seen; is `chunked` the last coding of the last one?
    transfer_encoding: Option<bool>,
    /// `None`: no `Content-Length`; `Some(None)`: invalid or conflicting values.
    content_length: Option<Option<u64>>,
    close: bool,
    keep_alive: bool,
}

impl Facts {
    fn see(&mut self, name: &HeaderName, value: &HeaderValue) {
        if *name == header::TRANSFER_ENCODING {
            self.transfer_encoding = Some(last_token_is_chunked(value.as_bytes()));
        } else if *name == header::CONTENT_LENGTH {
            // Every line must hold the same valid number.
            let line = content_length(value.as_bytes());
            self.content_length = Some(match (self.content_length, line) {
                (None, line) => line,
                (Some(Some(seen)), Some(n)) if seen == n => Some(n),
                _ => None,
            });
        } else if *name == header::CONNECTION {
            // A later `keep-alive` never undoes a `close`.
            self.close |= lists(value.as_bytes(), b"close");
            self.keep_alive |= lists(value.as_bytes(), b"keep-alive");
        }
    }

    /// HTTP/1.1 stays open unless told to close; HTTP/1.0 closes unless told to stay open.
    fn keep_alive(&self, version: Version) -> bool {
        !self.close && (version == Version::HTTP_11 || self.keep_alive)
    }

    /// RFC 9112 §6.3, as hyper's client applies it.
    fn framing(
        &self,
        status: StatusCode,
        version: Version,
        method: &Method,
    ) -> Result<Framing, H1Error> {
        if matches!(status.as_u16(), 101 | 204 | 304) || method == Method::HEAD {
            return Ok(Framing::Empty);
        }
        if let Some(chunked) = self.transfer_encoding {
            if version == Version::HTTP_10 {
                return Err(H1Error::TransferEncoding10);
            }
            return Ok(if chunked {
                Framing::Chunked
            } else {
                Framing::Close
            });
        }
        match self.content_length {
            None => Ok(Framing::Close),
            Some(Some(0)) => Ok(Framing::Empty),
            Some(Some(n)) if n <= u64::MAX - 2 => Ok(Framing::Length(n)),
            Some(_) => Err(H1Error::ContentLength),
        }
    }
}

/// One `Content-Length` line: one number, or a comma-separated list of the same number.
pub(super) fn content_length(line: &[u8]) -> Option<u64> {
    // Visible ASCII only, as `HeaderValue::to_str` requires.
    if !line
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return None;
    }
    let mut length = None;
    for part in line.split(|&b| b == b',') {
        let n = digits(part.trim_ascii())?;
        if *length.get_or_insert(n) != n {
            return None;
        }
    }
    length
}

/// Visible ASCII and tabs only, as `HeaderValue::to_str` requires.
fn visible(line: &[u8]) -> bool {
    line.iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

pub(super) fn digits(s: &[u8]) -> Option<u64> {
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
pub(crate) fn last_token_is_chunked(line: &[u8]) -> bool {
    line.iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        && line
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Does this `Connection` line list `token`? Never unless it is visible ASCII (what
/// `HeaderValue::to_str`, which hyper reads it with, accepts).
pub(crate) fn lists(line: &[u8], token: &[u8]) -> bool {
    visible(line)
        && line
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The head's header lines as `http` types, in order. Values share `bytes`; standard names
/// are `http`'s own constants.
fn headers(
    bytes: &Bytes,
    spans: &[Span],
    mut headers: HeaderMap,
) -> Result<(HeaderMap, Facts), H1Error> {
    headers.clear();
    headers.reserve(spans.len());
    let mut facts = Facts::default();
    for s in spans {
        let name = HeaderName::from_bytes(&bytes[s.name.0..s.name.1])
            .map_err(|_| H1Error::Parse(httparse::Error::HeaderName))?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(s.value.0..s.value.1))
            .map_err(|_| H1Error::Parse(httparse::Error::HeaderValue))?;
        facts.see(&name, &value);
        headers.append(name, value);
    }
    Ok((headers, facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8], method: Method) -> Result<Option<(Head, Option<Bytes>)>, H1Error> {
        let mut buf = BytesMut::from(bytes);
        parse_response(
            &mut buf,
            &method,
            &mut Vec::new(),
            &mut HeaderMap::new(),
            &mut 0,
        )
    }

    fn head(bytes: &str) -> Head {
        parse(bytes.as_bytes(), Method::GET).unwrap().unwrap().0
    }

    #[test]
    fn the_request_head_is_written_as_hyper_writes_it() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("app"));
        headers.append("x-a", HeaderValue::from_static("1"));
        let mut out = Vec::new();
        encode_request(&Method::DELETE, "/a?b=c", &headers, &mut out);
        assert_eq!(
            out,
            b"DELETE /a?b=c HTTP/1.1\r\nhost: app\r\nx-a: 1\r\n\r\n"
        );
    }

    #[test]
    fn a_length_body_already_read_comes_with_its_head() {
        let (h, body) = parse(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.framing, body.as_deref()),
            (Framing::Length(2), Some(&b"ok"[..]))
        );
        assert!(h.keep_alive);
        let (h, body) = parse(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, body), (Framing::Length(5), None));
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-len", Method::GET)
            .unwrap()
            .is_none());
    }

    #[test]
    fn framing_follows_rfc_9112_in_hypers_order() {
        let cases = [
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n",
                Framing::Empty,
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", Framing::Empty),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
                Framing::Chunked,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                Framing::Close,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\n\r\n",
                Framing::Length(7),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Framing::Empty,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::Close),
        ];
        for (bytes, framing) in cases {
            assert_eq!(head(bytes).framing, framing, "{bytes:?}");
        }
        let h = parse(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.0.framing, Framing::Empty);
    }

    #[test]
    fn ambiguous_lengths_are_refused() {
        for bytes in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(parse(bytes.as_bytes(), Method::GET).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn informational_heads_are_skipped_but_101_is_not() {
        let h = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(h.status, StatusCode::CREATED);
        let h = head("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n");
        assert_eq!((h.status.as_u16(), h.keep_alive), (101, false));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        let ka = |s: &str| head(s).keep_alive;
        assert!(ka("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(!ka(
            "HTTP/1.1 200 OK\r\nconnection: Keep-Alive, close\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!ka("HTTP/1.1 200 OK\r\nconnection: close\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"));
        assert!(!ka("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(ka(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(
            !ka("HTTP/1.1 200 OK\r\n\r\n"),
            "a body to the end of the connection"
        );
    }

    #[test]
    fn a_non_canonical_reason_is_kept() {
        let h = head("HTTP/1.1 200 Fine\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(h.reason.as_ref().map(|r| r.as_bytes()), Some(&b"Fine"[..]));
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .reason
            .is_none());
    }

    #[test]
    fn a_head_is_parsed_again_only_once_a_blank_line_can_have_arrived() {
        let buf = b"HTTP/1.1 200 OK\r\nx-a: b\r\n\r\n";
        assert!(!may_end_head(&buf[..20], 10));
        assert!(may_end_head(buf, 20));
        assert!(may_end_head(b"HTTP/1.1 200 OK\n\n", 15));
    }
}
