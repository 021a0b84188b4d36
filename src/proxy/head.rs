//! The request head's own limits, checked before any phase reads it: size, transfer
//! coding, and one well-defined host. Shared by the proxy and the decision listener.

use http::header::{self, HeaderValue};
use http::{Method, Request, Version};

use crate::auth::path::PathError;
use crate::auth::reject::BadRequest;
use crate::auth::Reject;
use crate::config::Limits;

/// hyper's smallest HTTP/1 read buffer: it also caps the request head.
pub const HYPER_MIN_BUF: usize = 8192;

/// Limits on the request head that hold for HTTP/1.1 and HTTP/2 alike: the size of the
/// head (`limits.max_header_bytes`, measured here for HTTP/1), and one
/// well-defined host. The host the upstream is sent (`Host`) is the request target's
/// authority (absolute-form, or HTTP/2 `:authority`) when there is one, else the `Host`
/// field; whichever it is, it must be a valid `host[:port]` without user info, and there
/// must be no second candidate a front proxy or the upstream could read instead: HTTP/1.1
/// needs exactly one `Host` (RFC 9112 3.2; with an absolute-form target it is ignored, as
/// 3.2.2 says, but must still be there, single and valid), and HTTP/2 allows at most one `host`
/// field, which must name the same host as `:authority` when both are present (RFC 9113
/// 8.3.1).
pub fn check_head<B>(req: &Request<B>, limits: &Limits) -> Result<(), Reject> {
    const HOST: Reject = Reject::BadRequest(BadRequest::Host);
    // HTTP/2 enforces the limit itself (`max_header_list_size`). hyper's HTTP/1 buffer
    // does not, exactly: it is at least 8 KiB, and it refuses a head only once the buffer
    // is full without one, so a head that arrives with the read that overfills it (up to
    // twice the limit on a kept-alive connection) gets through. Measured here.
    if req
        .extensions()
        .get::<crate::proxy::h1::server::request::Fragment>()
        .is_some()
    {
        return Err(Reject::BadRequest(BadRequest::Path(PathError::Fragment)));
    }
    if is_connect(req.method()) {
        return Err(Reject::BadRequest(BadRequest::Connect));
    }
    let http1 = matches!(req.version(), Version::HTTP_10 | Version::HTTP_11);
    if http1 && head_size(req) > limits.max_header_bytes {
        return Err(Reject::HeadersTooLarge);
    }
    // HTTP/1's parser counts fields against `max_headers`; HTTP/2's bounds only the size of
    // the list, so an app with a field-count limit of its own would get what keyward let
    // through. Cookie crumbs count as the one `Cookie` line they are forwarded as.
    if !http1 {
        let crumbs = req.headers().get_all(header::COOKIE).iter().count();
        if req.headers().len() - crumbs.saturating_sub(1) > limits.max_headers {
            return Err(Reject::HeadersTooLarge);
        }
    }
    if http1 && !single_chunked(req.headers()) {
        return Err(Reject::BadRequest(BadRequest::TransferCoding));
    }
    let authority = req.uri().authority();
    if authority.is_some_and(|a| !valid_authority(a.as_str().as_bytes())) {
        return Err(HOST);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(HOST),
        (Some(host), None) if !valid_host(host) => return Err(HOST),
        (host, _) => host,
    };
    match (http1, host, authority) {
        // RFC 9112 3.2: an HTTP/1.1 request without `Host` is refused, whatever its target.
        (true, None, _) if req.version() == Version::HTTP_11 => Err(HOST),
        (false, Some(host), Some(authority))
            if !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
        {
            Err(HOST)
        }
        _ => Ok(()),
    }
}

/// `CONNECT`, in any case (an app that ignores a method's case would take `connect` as it):
/// keyward is a reverse proxy, and never hands an app a tunnel request.
pub fn is_connect(method: &Method) -> bool {
    method.as_str().eq_ignore_ascii_case("CONNECT")
}

/// No `Transfer-Encoding`, or exactly one `chunked` coding (RFC 9112 6.1). hyper refuses a
/// list that does not end in `chunked`, but accepts `gzip, chunked`, strips the chunks and
/// hands on a body that is still gzip-coded; keyward would forward it with the hop-by-hop
/// `Transfer-Encoding` removed, so the upstream would read it as plain. Refused instead.
fn single_chunked(headers: &http::HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    match (codings.next(), codings.next()) {
        (None, _) => true,
        (Some(only), None) => only.eq_ignore_ascii_case(b"chunked"),
        _ => false,
    }
}

/// Bytes of the request line and header fields, counted as HTTP/1.1 would send them.
fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let fields: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    req.method().as_str().len() + target + fields
}

/// `host[:port]` with a numeric port, no user info, nothing after the authority.
fn valid_host(value: &HeaderValue) -> bool {
    valid_authority(value.as_bytes())
}

/// Is every `X-Forwarded-Host` (each element of a list) a host as [`check_head`] takes
/// one? In a decision it is the host the app will be asked for (Traefik's and Caddy's
/// forward auth send it; the shipped nginx config too), which keyward never sees as a
/// `Host` of its own. An empty element is no host, and passes: Caddy sends an empty one
/// for a request without `Host` (an HTTP/1.0 health check).
pub fn valid_forwarded_host(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(super::headers::X_FORWARDED_HOST)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .all(|host| host.is_empty() || valid_authority(host))
}

/// `[<IPv6 address>]`, with a zone (`%25eth0`, or `%eth0` as sent) at most, and nothing
/// else between or after the brackets.
fn ipv6_literal(host: &str) -> bool {
    let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) else {
        return false;
    };
    let (address, zone) = match inner.split_once('%') {
        Some((a, z)) => (a, Some(z.strip_prefix("25").unwrap_or(z))),
        None => (inner, None),
    };
    let zone_ok = zone.is_none_or(|z| {
        !z.is_empty()
            && z.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    });
    zone_ok && address.parse::<std::net::Ipv6Addr>().is_ok()
}

fn valid_authority(value: &[u8]) -> bool {
    plain_host_port(value) || parsed_authority(value)
}

/// The common case, checked without copying: a name or IPv4 address of letters, digits,
/// `.` and `-`, and maybe a port that fits 16 bits. Anything else is left to `http`'s parser.
fn plain_host_port(value: &[u8]) -> bool {
    let (host, port) = match value.iter().position(|b| *b == b':') {
        Some(at) => (&value[..at], Some(&value[at + 1..])),
        None => (value, None),
    };
    let host_ok = !host.is_empty()
        && host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    let port_ok = port.is_none_or(|p| {
        (1..=5).contains(&p.len())
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p).is_ok_and(|p| p.parse::<u16>().is_ok())
    });
    host_ok && port_ok
}

/// An authority `http` parses whose host is an IP literal or a name of unreserved bytes
/// (letters, digits, `-`, `.`, `_`, `~`). `http` takes a name with RFC 3986's sub-delims
/// (`&`, `=`, `,`, `;`, ...) as well, which no host has: an app that builds its URL from
/// `Host` and searches the whole of it for `&api_key=` (Hono before 4.10.5) read
/// `Host: x&api_key=K&` as the query credential, and `Host: a,b` reads as two hosts to a
/// proxy behind.
fn parsed_authority(value: &[u8]) -> bool {
    if value.is_empty() || value.contains(&b'@') {
        return false;
    }
    let Ok(authority) = http::uri::Authority::try_from(value) else {
        return false;
    };
    let host = authority.host();
    let named = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    if !(named || ipv6_literal(host)) {
        return false;
    }
    // After an IPv6 literal, nothing or a port (`http` takes `[::1]&x` as well).
    match authority.as_str().rsplit_once(']') {
        Some((_, rest)) => {
            rest.is_empty() || (rest.starts_with(':') && authority.port_u16().is_some())
        }
        None => !authority.as_str().contains(':') || authority.port_u16().is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, target: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_rules() {
        let limits = Limits::default();
        let ok = |r: Request<()>| check_head(&r, &limits);
        let v11 = Version::HTTP_11;
        for good in [
            "a.example:8080",
            "a",
            "[::1]:80",
            "[::1]",
            "10.0.0.1",
            "my_service.internal:8080",
            "A.Example",
            "[fe80::1%25eth0]",
            "[::ffff:10.0.0.1]:443",
        ] {
            assert_eq!(ok(req(v11, "/a", &[("host", good)])), Ok(()), "{good}");
        }
        assert_eq!(
            ok(req(v11, "/a", &[])),
            Err(Reject::BadRequest(BadRequest::Host))
        );
        assert_eq!(ok(req(Version::HTTP_10, "/a", &[])), Ok(()));
        // RFC 9112 3.2: without `Host`, whatever the target.
        assert_eq!(
            ok(req(v11, "http://a/x", &[])),
            Err(Reject::BadRequest(BadRequest::Host))
        );
        assert_eq!(
            ok(req(v11, "/a", &[("host", "a"), ("host", "b")])),
            Err(Reject::BadRequest(BadRequest::Host))
        );
        for bad in [
            "",
            "a/b",
            "u@a",
            "a b",
            "a:x",
            "a:",
            "a:99999",
            "a?b",
            "a#b",
            "x&api_key=sta_0123456789&",
            "[::1]&api_key=x&",
            "[x&api_key=K&]",
            "[::1]x",
            "[a]",
            "[]",
            "[v1.&_method=DELETE&]",
            "a,b.example",
            "a=b",
            "a;b",
            "a!b",
            "a%41",
            "a+b:80",
        ] {
            assert_eq!(
                ok(req(v11, "/a", &[("host", bad)])),
                Err(Reject::BadRequest(BadRequest::Host)),
                "{bad:?}"
            );
        }
        const HOST: Result<(), Reject> = Err(Reject::BadRequest(BadRequest::Host));
        // Absolute-form: the target's authority is the host (Host is ignored, but single).
        assert_eq!(ok(req(v11, "http://a/x", &[("host", "b")])), Ok(()));
        assert_eq!(ok(req(v11, "http://u:p@a/x", &[("host", "a")])), HOST);
        assert_eq!(ok(req(v11, "http://a:x/x", &[("host", "a")])), HOST);
        // HTTP/2: :authority, at most one `host`, and the two agree.
        let v2 = Version::HTTP_2;
        assert_eq!(ok(req(v2, "http://a/x", &[])), Ok(()));
        assert_eq!(ok(req(v2, "http://a/x", &[("host", "A")])), Ok(()));
        assert_eq!(ok(req(v2, "http://u@a/x", &[])), HOST);
        assert_eq!(ok(req(v2, "http://a/x", &[("host", "b")])), HOST);
        assert_eq!(ok(req(v2, "/x", &[("host", "a")])), Ok(()));
        assert_eq!(ok(req(v2, "/x", &[("host", "a"), ("host", "a")])), HOST);
        assert_eq!(ok(req(v2, "/x", &[("host", "a b")])), HOST);
        assert_eq!(ok(req(v2, "/x", &[])), Ok(()));
    }

    #[test]
    fn the_plain_host_check_never_accepts_what_the_parser_refuses() {
        for v in [
            "a",
            "a.example",
            "a-b.c:0",
            "a:65535",
            "10.0.0.1:080",
            "a:65536",
            "a:",
            ":80",
            "a:1:2",
            "-",
            ".",
            "a..b",
            "a:-1",
            "a:+1",
            "[::1]:80",
            "a b",
            "a_b",
            "xn--bcher-kva.example",
        ] {
            if plain_host_port(v.as_bytes()) {
                assert!(parsed_authority(v.as_bytes()), "{v}");
            }
        }
        assert!(!plain_host_port(b"a:65536") && !plain_host_port(b"a:"));
    }

    #[test]
    fn only_a_single_chunked_coding_is_accepted() {
        let limits = Limits::default();
        let v11 = Version::HTTP_11;
        for good in ["chunked", "Chunked", " chunked "] {
            let r = req(v11, "/a", &[("host", "a"), ("transfer-encoding", good)]);
            assert_eq!(check_head(&r, &limits), Ok(()), "{good:?}");
        }
        let refused = Err(Reject::BadRequest(BadRequest::TransferCoding));
        for bad in [
            "gzip, chunked",
            "chunked, chunked",
            "identity, chunked",
            "gzip",
            "",
        ] {
            let r = req(v11, "/a", &[("host", "a"), ("transfer-encoding", bad)]);
            assert_eq!(check_head(&r, &limits), refused, "{bad:?}");
        }
        let two = [
            ("host", "a"),
            ("transfer-encoding", "gzip"),
            ("transfer-encoding", "chunked"),
        ];
        assert_eq!(check_head(&req(v11, "/a", &two), &limits), refused);
    }

    #[test]
    fn head_size_is_enforced_exactly() {
        let limits = Limits {
            max_header_bytes: 1024,
            ..Limits::default()
        };
        let value = "v".repeat(1000);
        let fits = req(Version::HTTP_11, "/", &[("host", "a"), ("x", &value)]);
        assert_eq!(head_size(&fits), 3 + 1 + (4 + 1 + 4) + (1 + 1000 + 4));
        assert_eq!(check_head(&fits, &limits), Ok(()));
        let value = "v".repeat(1010);
        let over = req(Version::HTTP_11, "/", &[("host", "a"), ("x", &value)]);
        assert_eq!(check_head(&over, &limits), Err(Reject::HeadersTooLarge));
    }
}
