//! Reading a request head, for the requests keyward's server takes: HTTP/1.1, an
//! origin-form target, a method whose answer always has a body (not HEAD, not CONNECT),
//! and no header hyper's server gives a meaning of its own (no body announced beyond
//! `Content-Length: 0`, no `Transfer-Encoding`, `Upgrade`, `Expect` or `TE`, no
//! `Connection` that lists `close`; `Connection: keep-alive`, which many clients send,
//! changes nothing on HTTP/1.1).
//! Everything else, invalid heads included, is hyper's: the parse says so and the
//! connection is handed over with every byte it read.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{Either, Empty};

use super::{KnownNames, Settings};
use crate::proxy::h1::codec::lists;
use crate::proxy::RequestBody;

/// Most header fields a head keyward's server reads may have (`limits.max_headers`'
/// default); more goes to hyper, which applies the configured limit.
const MAX_HEADERS: usize = 100;
/// hyper's longest request target (longer gets its 414).
const MAX_URI_LEN: usize = u16::MAX as usize - 1;

/// What the bytes read so far hold.
// The request is moved once, to the service; boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A request keyward's server serves; its head is gone from the buffer.
    Request(Request<RequestBody>),
    /// hyper's to serve (or refuse); the buffer is as read.
    HandOff,
}

/// Marks a request whose target carried a fragment (`#`): refused by
/// [`crate::proxy::head::check_head`], the connection closed after the answer.
#[derive(Debug, Clone, Copy)]
pub struct Fragment;

/// Where a header's name and value lie in the buffer.
#[derive(Clone, Copy, Default)]
pub struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

/// Parse the head at the start of `buf`. `headers` is an emptied map to fill (kept from
/// the last response for its capacity), left as it is unless a request is returned;
/// `spans` is scratch, kept for its capacity.
pub fn parse(
    buf: &mut BytesMut,
    settings: &Settings,
    headers: &mut HeaderMap,
    spans: &mut Vec<Span>,
) -> Parsed {
    spans.clear();
    let (len, method, target, fragment) = match locate(buf, settings.max_headers, spans) {
        Located::Partial => return Parsed::Partial,
        Located::HandOff => return Parsed::HandOff,
        Located::Head {
            len,
            method,
            target,
            fragment,
        } => (len, method, target, fragment),
    };
    let head = buf.split_to(len).freeze();
    match build(&head, method, target, spans, settings, headers) {
        Some(mut req) => {
            if fragment {
                req.extensions_mut().insert(Fragment);
            }
            Parsed::Request(req)
        }
        None => {
            // `http` refused what httparse took: hyper decides (and refuses) instead.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            headers.clear();
            Parsed::HandOff
        }
    }
}

enum Located {
    Partial,
    HandOff,
    Head {
        len: usize,
        method: Method,
        target: (usize, usize),
        fragment: bool,
    },
}

/// Find the head's parts with httparse (hyper's parser, with hyper's settings).
fn locate(buf: &[u8], max_headers: usize, spans: &mut Vec<Span>) -> Located {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    // More fields than fit is an error here: hyper then reads the head with its own bound.
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut slots[..max_headers.min(MAX_HEADERS)],
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Located::Partial,
        Err(_) => return Located::HandOff,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Located::HandOff;
    };
    let Some(method) = served_method(method) else {
        return Located::HandOff;
    };
    if !path.starts_with('/') || path.len() > MAX_URI_LEN {
        return Located::HandOff;
    }
    // A target with a fragment is marked, to be refused (`check_head`), and the connection
    // closes after its answer whatever the answer (`serve`): `http::Uri` drops the fragment
    // and would authorize the path before it, where an app or a front proxy that reads the
    // raw target may see more (`/public#/../admin`). A `Connection: close` on it is no reason
    // to hand it over; a body announced still is (hyper reads it, dropping the fragment).
    let fragment = path.as_bytes().contains(&b'#');
    let mut zero_length = false;
    for header in req.headers.iter() {
        match meaning(header.name.as_bytes()) {
            Meaning::None => {}
            Meaning::Connection if fragment => {}
            Meaning::ContentLength if !zero_length && header.value == b"0" => zero_length = true,
            // On HTTP/1.1 hyper's server reads `Connection` for `close` alone (as
            // `HeaderValue::to_str` sees the line); any other token changes nothing.
            Meaning::Connection if !lists(header.value, b"close") => {}
            Meaning::ContentLength | Meaning::Connection | Meaning::Hyper => {
                return Located::HandOff
            }
        }
        spans.push(Span {
            name: range(buf, header.name.as_bytes()),
            value: range(buf, header.value),
        });
    }
    Located::Head {
        len,
        method,
        target: range(buf, path.as_bytes()),
        fragment,
    }
}

/// The methods keyward's server takes: the common ones whose answer always has a body.
fn served_method(method: &str) -> Option<Method> {
    Some(match method {
        "GET" => Method::GET,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "DELETE" => Method::DELETE,
        "PATCH" => Method::PATCH,
        "OPTIONS" => Method::OPTIONS,
        _ => return None,
    })
}

/// What hyper's server makes of a header field beyond passing it on.
enum Meaning {
    None,
    ContentLength,
    Connection,
    /// Framing, connection or expectation: hyper's to handle.
    Hyper,
}

fn meaning(name: &[u8]) -> Meaning {
    // By length first: most names are out without a comparison.
    let hyper: &[u8] = match name.len() {
        14 if name.eq_ignore_ascii_case(b"content-length") => return Meaning::ContentLength,
        10 if name.eq_ignore_ascii_case(b"connection") => return Meaning::Connection,
        17 => b"transfer-encoding",
        7 => b"upgrade",
        6 => b"expect",
        2 => b"te",
        _ => return Meaning::None,
    };
    if name.eq_ignore_ascii_case(hyper) {
        Meaning::Hyper
    } else {
        Meaning::None
    }
}

/// `part`'s place in `buf` (it is a slice of it).
fn range(buf: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start, start + part.len())
}

/// The request, its target and values sharing `head`.
fn build(
    head: &Bytes,
    method: Method,
    target: (usize, usize),
    spans: &[Span],
    settings: &Settings,
    headers: &mut HeaderMap,
) -> Option<Request<RequestBody>> {
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.1)).ok()?;
    headers.reserve(spans.len());
    for span in spans {
        let name = header_name(&head[span.name.0..span.name.1], &settings.names)?;
        let value = HeaderValue::from_maybe_shared(head.slice(span.value.0..span.value.1)).ok()?;
        headers.append(name, value);
    }
    let mut req = Request::new(Either::Right(Empty::new()));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = std::mem::take(headers);
    Some(req)
}

/// A known custom name is cloned (no allocation); any other goes through `http`.
fn header_name(raw: &[u8], known: &KnownNames) -> Option<HeaderName> {
    known
        .find(raw)
        .cloned()
        .or_else(|| HeaderName::from_bytes(raw).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> KnownNames {
        KnownNames::new(vec![HeaderName::from_static("x-api-key")])
    }

    fn run(raw: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let settings = Settings {
            max_buf: 16 * 1024,
            max_headers: 32,
            names: names(),
        };
        let mut headers = HeaderMap::new();
        (
            parse(&mut buf, &settings, &mut headers, &mut Vec::new()),
            buf,
        )
    }

    #[test]
    fn a_plain_get_is_read_and_leaves_what_follows() {
        let (parsed, rest) =
            run("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nX-Other: v\r\n\r\nGET /next");
        let Parsed::Request(req) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.version(), http::Version::HTTP_11);
        assert_eq!(req.headers()["x-api-key"], "k");
        assert_eq!(req.headers()["x-other"], "v");
        assert_eq!(req.headers()["host"], "x");
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn a_zero_length_is_read() {
        let (parsed, _) = run("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(parsed, Parsed::Request(_)), "{parsed:?}");
    }

    #[test]
    fn connection_without_close_is_read() {
        for value in ["keep-alive", "Keep-Alive, foo", "upgrade-me"] {
            let raw = format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: {value}\r\n\r\n");
            let (parsed, _) = run(&raw);
            let Parsed::Request(req) = parsed else {
                panic!("{value}: {parsed:?}")
            };
            assert_eq!(req.headers()["connection"], value);
        }
    }

    #[test]
    fn a_partial_head_waits() {
        let (parsed, rest) = run("GET / HTTP/1.1\r\nHost: x\r\n");
        assert!(matches!(parsed, Parsed::Partial));
        assert_eq!(rest.len(), 25);
    }

    #[test]
    fn what_hyper_gives_a_meaning_goes_to_hyper_untouched() {
        for raw in [
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 00\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: Foo, CLOSE\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nBad\0: v\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
            "BREW / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let (parsed, rest) = run(raw);
            assert!(matches!(parsed, Parsed::HandOff), "{raw:?}: {parsed:?}");
            assert_eq!(&rest[..], raw.as_bytes(), "{raw:?}");
        }
    }

    #[test]
    fn more_fields_than_allowed_go_to_hyper() {
        let mut raw = String::from("GET / HTTP/1.1\r\n");
        for i in 0..33 {
            raw.push_str(&format!("h{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        assert!(matches!(run(&raw).0, Parsed::HandOff));
    }

    #[test]
    fn a_known_name_in_any_case_is_the_known_name() {
        let known = names();
        let n = header_name(b"X-API-KEY", &known).unwrap();
        assert_eq!(n, "x-api-key");
        assert_eq!(header_name(b"X-Other", &known).unwrap(), "x-other");
        assert!(header_name(b"bad name", &known).is_none());
    }
}
