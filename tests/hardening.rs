//! Hostile input through the front door: raw HTTP/1.1 framing attacks over TCP, path
//! tricks, header and connection limits, HTTP/2 limits, and garbage. Every case checks what
//! the client gets back and what the real upstream behind keyward saw.

mod support;
use support::*;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = SERVICE_KEY;

/// What came back on one raw connection.
struct Reply {
    text: String,
    /// The server closed the connection (rather than the wait running out).
    closed: bool,
}

impl Reply {
    /// Read `s` after what `out` already holds, until the server closes (or 5 s pass).
    async fn until_closed(s: &mut TcpStream, mut out: Vec<u8>) -> Reply {
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .is_ok();
        Reply {
            text: String::from_utf8_lossy(&out).into_owned(),
            closed,
        }
    }

    fn status(&self) -> u16 {
        raw_status(&self.text)
    }

    /// Status codes of every response on the connection, in order.
    fn statuses(&self) -> Vec<u16> {
        self.text
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| self.text[i + 9..].get(..3)?.parse().ok())
            .collect()
    }

    fn header(&self, name: &str) -> Option<String> {
        let head = self.text.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> serde_json::Value {
        let body = self.text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
}

/// Send `bytes` on a fresh connection and read until the server closes (or 5 s pass).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    Reply::until_closed(&mut s, Vec::new()).await
}

/// Wait until the upstream has seen a fresh sentinel request, so anything keyward forwarded
/// before it has been recorded, then check that no smuggled request got through.
async fn assert_nothing_smuggled(kw: &Proxy, up: &Upstream) {
    let sentinel = format!("/sentinel-{}", up.count());
    let r = get(&kw.url(&sentinel), &[("x-api-key", KEY)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.requests();
    assert!(seen.iter().any(|s| s.target == sentinel));
    for s in &seen {
        assert!(
            !s.target.contains("smuggled") && !s.target.starts_with("/admin"),
            "upstream saw {} {}",
            s.method,
            s.target
        );
    }
}

fn head(method: &str, target: &str, extra: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: app\r\nx-api-key: {KEY}\r\n{extra}\r\n")
}

/// A complete second request, which must never reach the upstream as a request.
fn smuggled() -> String {
    format!("GET /smuggled HTTP/1.1\r\nHost: app\r\nx-api-key: {KEY}\r\n\r\n")
}

/// CL.TE: Content-Length would swallow the smuggled request as body; chunked ends the body
/// at `0`, after which the smuggled bytes would be the next request.
fn clte() -> String {
    let body = format!("0\r\n\r\n{}", smuggled());
    let lengths = format!(
        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
        body.len()
    );
    head("POST", "/v1/clte", &lengths) + &body
}

/// TE.CL: the same conflict in the other order, the smuggled request inside a chunk.
fn tecl() -> String {
    let hidden = smuggled();
    let chunk = format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len());
    let lengths = "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n";
    head("POST", "/v1/tecl", lengths) + &chunk
}

/// A body in small chunks reaches the app whole, in a few large ones: keyward gathers the
/// data its client has sent before writing it on. Before, each chunk was written upstream
/// on its own (a system call each) and the app parsed as many. And a body in chunks too
/// small for anything but a flood (one byte each, six on the wire) is cut with 400
/// `bad_request` once it owes a thousand chunks beyond its bytes (one per 8): each still
/// cost keyward ~0.6 µs, and four connections at ~140 Mbit/s took both cores, ~130 times
/// the sender's CPU, on a route that needs no key. A body that opens large buys no flood
/// after it; chunks split across reads, or a large chunk after a thousand small ones, pass.
#[tokio::test]
async fn a_body_in_small_chunks_is_forwarded_in_large_ones_and_a_flood_of_tiny_ones_is_cut() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let chunks = |chunk: &str, n: usize| format!("{:x}\r\n{chunk}\r\n", chunk.len()).repeat(n);
    let send = |body: String| {
        let framing = "Transfer-Encoding: chunked\r\nConnection: close\r\n";
        head("POST", "/v1/chunks", framing) + &body + "0\r\n\r\n"
    };
    let r = exchange(kw.addr, send(chunks(&"a".repeat(20), 5_000)).as_bytes()).await;
    assert!(r.text.starts_with("HTTP/1.1 200"), "{}", r.text);
    let seen = up.last();
    assert_eq!(seen.body_len, 100_000);
    assert!(seen.body_frames <= 100, "{} frames", seen.body_frames);

    let passing = [
        chunks(&"b".repeat(16), 1024),
        chunks("b", 1023) + &chunks(&"c".repeat(20_000), 1),
    ];
    for body in passing {
        let r = exchange(kw.addr, send(body).as_bytes()).await;
        assert!(r.text.starts_with("HTTP/1.1 200"), "{}", r.text);
    }
    let floods = [
        chunks("a", 10_000),
        chunks(&"a".repeat(65_536), 1) + &chunks("a", 10_000),
    ];
    for body in floods {
        let r = exchange(kw.addr, send(body).as_bytes()).await;
        assert!(r.text.starts_with("HTTP/1.1 400"), "{}", r.text);
        assert_eq!(r.json()["code"], "bad_request");
    }
}

/// A client that half-closes mid-body (it sends no more, but reads) is gone as far as its
/// request goes (499), and the status line it reads says so: `Client Closed Request`, not
/// hyper's `<none>` for a status without a standard reason.
#[tokio::test]
async fn a_client_that_half_closes_mid_body_reads_a_named_499() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let req = head("POST", "/v1/half", "Content-Length: 100\r\n") + &"a".repeat(50);
    let mut s = TcpStream::connect(kw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let r = Reply::until_closed(&mut s, Vec::new()).await;
    assert!(
        r.text.starts_with("HTTP/1.1 499 Client Closed Request\r\n"),
        "{}",
        r.text
    );
}

/// A length the client spelled with leading zeros (`005`, valid) reaches the app as the
/// number keyward framed the body by: an app whose parser reads it otherwise, or refuses
/// it, would frame the body differently.
#[tokio::test]
async fn content_length_is_forwarded_as_the_number_read() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let req = head(
        "POST",
        "/v1/len",
        "Content-Length: 005\r\nConnection: close\r\n",
    ) + "hello";
    let r = exchange(kw.addr, req.as_bytes()).await;
    assert_eq!(r.statuses(), [200], "{}", r.text);
    let seen = up.last();
    assert_eq!(seen.headers.get("content-length").unwrap(), "5");
    assert_eq!(seen.body_len, 5);
    kw.shutdown().await;
}

/// CONNECT is refused whatever its target and route: keyward is a reverse proxy, and an
/// app handed a CONNECT on a public route (no key) could open a tunnel of its own. The
/// connection closes after the answer, so tunnel bytes are never read as requests.
#[tokio::test]
async fn connect_is_refused_and_closes_the_connection() {
    let up = spawn_upstream().await;
    for server in ["", "http1_server: hyper\n"] {
        let kw = spawn_proxy(up.addr, server).await;
        for (method, target) in [
            ("CONNECT", "/healthz"),
            ("CONNECT", "app:443"),
            ("CONNECT", "/v1/items"),
            ("connect", "/healthz"),
        ] {
            let req = head(method, target, "") + &smuggled();
            let r = exchange(kw.addr, req.as_bytes()).await;
            assert_eq!(r.statuses(), [400], "{server}{target}: {}", r.text);
            assert_eq!(r.json()["code"], "bad_request", "{target}");
            assert_eq!(r.header("connection").as_deref(), Some("close"));
        }
        assert_eq!(up.count(), 0, "{server}");
        kw.shutdown().await;
    }
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_closed() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let hidden = smuggled();
    for (req, target, body_len) in [(clte(), "/v1/clte", 0), (tecl(), "/v1/tecl", hidden.len())] {
        let before = up.count();
        let r = exchange(kw.addr, req.as_bytes()).await;
        // RFC 9112 6.1: Transfer-Encoding wins, Content-Length is dropped, and the
        // connection is closed after the response, so no byte after the chunked body is
        // ever read as a request.
        assert_eq!(r.statuses(), [200], "{}", r.text);
        assert_eq!(r.header("connection").as_deref(), Some("close"));
        assert!(r.closed, "connection must be closed");
        let seen = &up.requests()[before..];
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].target, target);
        assert_eq!(seen[0].body_len, body_len);
        assert!(seen[0].headers.get("content-length").is_none());
    }
    assert_nothing_smuggled(&kw, &up).await;
    kw.shutdown().await;
}

#[tokio::test]
async fn conflicting_or_malformed_content_length_is_refused() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let hidden = smuggled();
    for cl in [
        "Content-Length: 0\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 0\r\n",
        "Content-Length: 0, 5\r\n",
        "Content-Length: 5, 5\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: -5\r\n",
        "Content-Length: 0x5\r\n",
        "Content-Length: 5.0\r\n",
        "Content-Length: 99999999999999999999999\r\n",
    ] {
        let req = head("POST", "/v1/cl", cl) + "hello" + &hidden;
        let r = exchange(kw.addr, req.as_bytes()).await;
        assert_eq!(r.statuses(), [400], "{cl:?}: {}", r.text);
        assert!(r.closed, "{cl:?}");
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    // Identical repeated values are one length (RFC 9110 8.6), not a conflict.
    let req = head(
        "POST",
        "/v1/same",
        "Content-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n",
    ) + "hello";
    let r = exchange(kw.addr, req.as_bytes()).await;
    assert_eq!(r.statuses(), [200], "{}", r.text);
    assert_eq!(up.last().body_len, 5);
    assert_nothing_smuggled(&kw, &up).await;
    kw.shutdown().await;
}

#[tokio::test]
async fn transfer_encoding_other_than_final_chunked_is_refused() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    for (version, te) in [
        ("HTTP/1.1", "Transfer-Encoding: chunked, identity\r\n"),
        ("HTTP/1.1", "Transfer-Encoding: identity\r\n"),
        ("HTTP/1.1", "Transfer-Encoding: xchunked\r\n"),
        ("HTTP/1.1", "Transfer-Encoding : chunked\r\n"),
        ("HTTP/1.1", "Transfer-Encoding:\x0bchunked\r\n"),
        ("HTTP/1.0", "Transfer-Encoding: chunked\r\n"),
    ] {
        let req = format!(
            "POST /v1/te {version}\r\nHost: app\r\nx-api-key: {KEY}\r\n{te}\r\n0\r\n\r\n{}",
            smuggled()
        );
        let r = exchange(kw.addr, req.as_bytes()).await;
        assert_eq!(r.statuses(), [400], "{te:?}: {}", r.text);
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    kw.shutdown().await;
}

#[tokio::test]
async fn obs_fold_is_refused() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    for fold in [
        "X-Folded: a\r\n b\r\n",
        "X-Folded: a\r\n\tb\r\n",
        // A fold that would hide a Transfer-Encoding from a lenient front proxy.
        "X-Folded: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
    ] {
        let req = head("POST", "/v1/fold", fold) + "abc";
        let r = exchange(kw.addr, req.as_bytes()).await;
        assert_eq!(r.statuses(), [400], "{fold:?}: {}", r.text);
        assert!(r.closed);
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    kw.shutdown().await;
}

#[tokio::test]
async fn bare_lf_in_the_head_is_reframed_and_in_chunks_refused() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    // RFC 9112 2.2 lets a recipient read a bare LF as a line end; keyward re-frames the
    // request with CRLF, so the upstream sees exactly one well-formed request.
    let req = format!("GET /v1/lf HTTP/1.1\nHost: app\nx-api-key: {KEY}\nConnection: close\n\n");
    let r = exchange(kw.addr, req.as_bytes()).await;
    assert_eq!(r.statuses(), [200], "{}", r.text);
    let seen = up.last();
    assert_eq!(seen.target, "/v1/lf");
    assert_eq!(up.count(), 1);
    // In chunked framing a bare LF is refused: the body is not forwarded as a guess.
    let req = head("POST", "/v1/lf-chunk", "Transfer-Encoding: chunked\r\n")
        + "3\nabc\n0\n\n"
        + &smuggled();
    let r = exchange(kw.addr, req.as_bytes()).await;
    assert_eq!(r.status(), 400, "{}", r.text);
    assert_eq!(r.json()["code"], "bad_request");
    assert!(r.closed);
    assert_nothing_smuggled(&kw, &up).await;
    kw.shutdown().await;
}

#[tokio::test]
async fn nul_and_cr_in_header_fields_are_refused() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    for bad in [
        "X-Nul: a\0b\r\n",
        "X-Cr: a\rb\r\n",
        "X-Cr: a\rTransfer-Encoding: chunked\r\n",
        "X-Nul\0: a\r\n",
        "X-Tail: a\r\r\n",
        "X-Empty-Name\r\n",
        ": no-name\r\n",
        "X Space: a\r\n",
    ] {
        let req = head("GET", "/v1/ctl", bad);
        let r = exchange(kw.addr, req.as_bytes()).await;
        assert_eq!(r.statuses(), [400], "{bad:?}: {}", r.text);
        assert!(r.closed, "{bad:?}");
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    kw.shutdown().await;
}

#[tokio::test]
async fn overflowing_chunk_size_is_refused() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    for size in ["ffffffffffffffffff1", "10000000000000000", "-1", "1 2", "g"] {
        let req = head("POST", "/v1/chunk", "Transfer-Encoding: chunked\r\n")
            + &format!("{size}\r\nx\r\n0\r\n\r\n")
            + &smuggled();
        let r = exchange(kw.addr, req.as_bytes()).await;
        // The client's body is broken: its fault (400), never reported as an upstream error.
        assert_eq!(r.statuses(), [400], "{size:?}: {}", r.text);
        assert_eq!(r.json()["code"], "bad_request", "{size:?}");
        assert!(r.closed, "{size:?}");
    }
    let metrics = get(&kw.admin_url("/metrics"), &[]).await.text();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("keyward_upstream_errors_total{") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Unauthenticated, the body is never read: 401 before any framing error.
    let req = "POST /v1/chunk HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n";
    let r = exchange(kw.addr, req.as_bytes()).await;
    assert_eq!(r.status(), 401, "{}", r.text);
    assert_nothing_smuggled(&kw, &up).await;
    kw.shutdown().await;
}

/// The framing attacks above, each sent after a plain GET on the same connection: keyward's
/// own server answers the GET and hands the rest of the connection to hyper's, with the bytes
/// it already read. Whether the attack comes in the same write as the GET or after its
/// answer, it must get exactly what it gets on a connection of its own, and smuggle nothing.
#[tokio::test]
async fn framing_attacks_after_a_plain_request_get_what_they_get_alone() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let hidden = smuggled();
    let attacks = [
        clte(),
        tecl(),
        head(
            "POST",
            "/v1/cl",
            "Content-Length: 0\r\nContent-Length: 5\r\n",
        ) + "hello"
            + &hidden,
        head("POST", "/v1/cl", "Content-Length: 0, 5\r\n") + "hello" + &hidden,
        head("POST", "/v1/te", "Transfer-Encoding: chunked, identity\r\n") + "0\r\n\r\n" + &hidden,
        head(
            "POST",
            "/v1/fold",
            "X-Folded: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        ) + "abc"
            + &hidden,
        head("GET", "/v1/ctl", "X-Cr: a\rTransfer-Encoding: chunked\r\n") + &hidden,
        head("GET", "/v1/ctl", "X-Nul: a\0b\r\n") + &hidden,
        head("POST", "/v1/chunk", "Transfer-Encoding: chunked\r\n") + "3\nabc\n0\n\n" + &hidden,
        head("POST", "/v1/chunk", "Transfer-Encoding: chunked\r\n")
            + "ffffffffffffffffff1\r\nx\r\n0\r\n\r\n"
            + &hidden,
    ];
    let first = head("GET", "/v1/first", "");
    for attack in &attacks {
        let before = up.count();
        let alone = exchange(kw.addr, attack.as_bytes()).await;
        let forwarded_alone: Vec<_> = up.requests()[before..]
            .iter()
            .map(|s| s.target.clone())
            .collect();
        let mut expected = vec![200];
        expected.extend(alone.statuses());

        let before = up.count();
        let together = exchange(kw.addr, format!("{first}{attack}").as_bytes()).await;
        assert_eq!(
            together.statuses(),
            expected,
            "{attack:?}: {}",
            together.text
        );
        assert_eq!(together.closed, alone.closed, "{attack:?}");

        let split = after_an_answer(kw.addr, &first, attack).await;
        assert_eq!(split.statuses(), expected, "{attack:?}: {}", split.text);
        assert_eq!(split.closed, alone.closed, "{attack:?}");

        // The upstream saw the plain GETs and what the attack alone let through, no more.
        let mut forwarded = vec!["/v1/first".to_string()];
        forwarded.extend(forwarded_alone.iter().cloned());
        forwarded.push("/v1/first".to_string());
        forwarded.extend(forwarded_alone);
        let seen: Vec<_> = up.requests()[before..]
            .iter()
            .map(|s| s.target.clone())
            .collect();
        assert_eq!(seen, forwarded, "{attack:?}");
    }
    assert_nothing_smuggled(&kw, &up).await;
    kw.shutdown().await;
}

/// Send `first`, read its whole answer, then send `then` on the same connection and read
/// until the server closes (or 5 s pass). The reply holds both answers.
async fn after_an_answer(addr: SocketAddr, first: &str, then: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(first.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut s))
        .await
        .expect("an answer to the first request");
    s.write_all(then.as_bytes()).await.unwrap();
    Reply::until_closed(&mut s, answer.into_bytes()).await
}

/// An HTTP/2 preface after an HTTP/1.1 request is a malformed HTTP/1 request, as it is to
/// hyper's server, never a switch to HTTP/2: what follows it would otherwise reach the app
/// framed unlike anything in front of keyward read it. Whether it comes in the same write
/// or after the first answer, with either server.
#[tokio::test]
async fn an_http2_preface_after_an_http1_request_does_not_switch_protocols() {
    let up = spawn_upstream().await;
    let mut h2 = h2_hello();
    h2.extend(frame(HEADERS, 0x4 | 0x1, 1, &h2_get_block("/v1/h2", KEY)));
    let first = head("GET", "/v1/first", "");
    for server in ["fast", "hyper"] {
        let kw = spawn_proxy(up.addr, &format!("http1_server: {server}\n")).await;
        for apart in [false, true] {
            let before = up.count();
            let mut s = TcpStream::connect(kw.addr).await.unwrap();
            let out = if apart {
                s.write_all(first.as_bytes()).await.unwrap();
                let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut s))
                    .await
                    .expect("an answer to the first request");
                s.write_all(&h2).await.unwrap();
                answer.into_bytes()
            } else {
                s.write_all(&[first.as_bytes(), &h2].concat())
                    .await
                    .unwrap();
                Vec::new()
            };
            let reply = Reply::until_closed(&mut s, out).await;
            let statuses = reply.statuses();
            assert_eq!(
                statuses.first(),
                Some(&200),
                "{server} {apart}: {}",
                reply.text
            );
            assert!(
                statuses[1..].iter().all(|&s| s == 400),
                "{server} {apart}: {}",
                reply.text
            );
            assert!(reply.closed, "{server} {apart}: still open: {}", reply.text);
            let seen = targets_since(&up, before);
            assert_eq!(seen, ["/v1/first"], "{server} {apart}");
        }
        kw.shutdown().await;
    }
}

/// The targets the upstream has seen since it had seen `before` requests.
fn targets_since(up: &Upstream, before: usize) -> Vec<String> {
    up.requests()[before..]
        .iter()
        .map(|s| s.target.clone())
        .collect()
}

/// A request pipelined before the client's end of stream is not run upstream, as hyper's
/// server decides too: the client has left and can take no answer, and its retry would
/// repeat the request's effect.
#[tokio::test]
async fn a_request_pipelined_before_the_clients_end_is_not_forwarded() {
    let up = spawn_upstream().await;
    let bytes = head("GET", "/v1/first", "") + &head("DELETE", "/v1/second", "");
    for server in ["fast", "hyper"] {
        let kw = spawn_proxy(up.addr, &format!("http1_server: {server}\n")).await;
        for _ in 0..5 {
            let before = up.count();
            let mut s = TcpStream::connect(kw.addr).await.unwrap();
            s.write_all(bytes.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            let reply = Reply::until_closed(&mut s, Vec::new()).await;
            assert_eq!(reply.statuses(), [200], "{server}: {}", reply.text);
            assert!(reply.closed, "{server}");
            let seen = targets_since(&up, before);
            assert_eq!(seen, ["/v1/first"], "{server}");
        }
        kw.shutdown().await;
    }
}

#[tokio::test]
async fn absolute_form_target_is_authorized_by_its_path() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    for (target, status, code) in [
        ("http://app/admin/x", 403, "insufficient_scope"),
        ("http://app/admin", 403, "insufficient_scope"),
        ("http://app:80/a/../admin/x", 403, "insufficient_scope"),
        ("http://app/%2e%2e/admin/x", 400, "bad_request"),
        ("http://app/admin%2fx", 400, "bad_request"),
        ("http://app", 401, ""),
        ("*", 400, "bad_request"),
    ] {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: other\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n"
        );
        let r = exchange(kw.addr, req.as_bytes()).await;
        if status == 401 {
            // `http://app` is the path `/`: protected, allowed, forwarded as `/`.
            assert_eq!(r.status(), 200, "{target}: {}", r.text);
            assert_eq!(up.last().target, "/");
            continue;
        }
        assert_eq!(r.status(), status, "{target}: {}", r.text);
        assert_eq!(r.json()["code"], code, "{target}");
    }
    let r = exchange(
        kw.addr,
        format!("CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status(), 400, "{}", r.text);
    // An allowed absolute-form request is forwarded by its normalized path, and the
    // target's authority is the host (RFC 9112 3.2.2).
    let req = format!("GET http://app/v1/./x HTTP/1.1\r\nHost: other\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n");
    let r = exchange(kw.addr, req.as_bytes()).await;
    assert_eq!(r.status(), 200, "{}", r.text);
    let seen = up.last();
    assert_eq!(seen.target, "/v1/x");
    assert_eq!(seen.headers["host"], "app");
    // No path but a query: the path is `/`, and `/` is what the app is asked for (the
    // fast client sent `GET ?x=1`, the target's path and query as the URI holds them).
    let req = format!(
        "GET http://app?x=1 HTTP/1.1\r\nHost: app\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n"
    );
    let r = exchange(kw.addr, req.as_bytes()).await;
    assert_eq!(r.status(), 200, "{}", r.text);
    assert_eq!(up.last().target, "/?x=1");
    // No Host beside an absolute-form target: refused as without one (RFC 9112 3.2).
    let req =
        format!("GET http://app/v1/x HTTP/1.1\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n");
    let r = exchange(kw.addr, req.as_bytes()).await;
    assert_eq!(r.status(), 400, "{}", r.text);
    assert_nothing_smuggled(&kw, &up).await;
    kw.shutdown().await;
}

/// An absolute-form target whose path is empty but for a fragment (`http://h#`) is the
/// path `/`, and `/` is what the app is asked for by either client, with or without a
/// body (it got an empty target, `GET  HTTP/1.1`, which a lenient app read as HTTP/0.9).
#[tokio::test]
async fn an_absolute_form_target_without_a_path_is_forwarded_as_the_root() {
    let up = spawn_upstream().await;
    for client in ["fast", "hyper"] {
        let kw = spawn_proxy(up.addr, &format!("upstream_client: {client}\n")).await;
        for (head, body) in [
            ("GET http://app# HTTP/1.1\r\n", ""),
            ("GET http://app:80#x HTTP/1.1\r\n", ""),
            ("POST http://app# HTTP/1.1\r\nContent-Length: 3\r\n", "abc"),
        ] {
            let req =
                format!("{head}Host: app\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n{body}");
            let r = exchange(kw.addr, req.as_bytes()).await;
            assert_eq!(r.status(), 200, "{client}: {head}: {}", r.text);
            assert_eq!(up.last().target, "/", "{client}: {head}");
        }
        kw.shutdown().await;
    }
}

#[tokio::test]
async fn more_than_max_headers_gets_431() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let fields = |n: usize| (0..n).map(|i| format!("X-H{i}: v\r\n")).collect::<String>();
    // Well under the limit (keyward adds its own identity headers before forwarding, and
    // the test upstream has hyper's default limit of 100 too).
    let ok = head("GET", "/v1/many", &(fields(80) + "Connection: close\r\n"));
    let r = exchange(kw.addr, ok.as_bytes()).await;
    assert_eq!(r.status(), 200, "{}", r.text);
    // Host and x-api-key count: 99 more make 101 (the default limit is 100).
    let over = head("GET", "/v1/too-many", &fields(99));
    let r = exchange(kw.addr, over.as_bytes()).await;
    assert_eq!(r.statuses(), [431], "{}", r.text);
    assert!(
        r.header("x-correlation-id").is_none(),
        "refused by the parser"
    );
    assert!(r.closed);
    assert!(up.requests().iter().all(|s| s.target != "/v1/too-many"));
    kw.shutdown().await;
}

/// hyper's server answers a head it cannot read itself (400, 431, 414) and no service
/// runs: each is still counted under its code, with both servers, or a client sending
/// broken or oversized heads would leave no trace on the dashboards.
#[tokio::test]
async fn heads_the_parser_refuses_are_counted() {
    let up = spawn_upstream().await;
    for server in ["fast", "hyper"] {
        let kw = spawn_proxy(up.addr, &format!("http1_server: {server}\n")).await;
        let fields = (0..120)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>();
        let big = format!("X-Big: {}\r\n", "a".repeat(17_000));
        for (req, status) in [
            (head("GET", "/v1/many", &fields), 431),
            (head("GET", "/v1/big", &big), 431),
            (head("GET", "/v1/x", "Bad Name: v\r\n"), 400),
            ("GET /v1/\x01 HTTP/1.1\r\nHost: a\r\n\r\n".to_string(), 400),
        ] {
            let r = exchange(kw.addr, req.as_bytes()).await;
            assert_eq!(r.statuses(), [status], "{server}: {}", r.text);
        }
        for code in ["request_header_fields_too_large", "bad_request"] {
            let series = format!("keyward_requests_total{{code=\"{code}\",decision=\"denied\"}}");
            // Counted as the connection ends, which the client may see first.
            eventually(&format!("{server}: two {code}"), || async {
                metric_value(&kw, &series).await == 2.0
            })
            .await;
        }
        kw.shutdown().await;
    }
}

#[tokio::test]
async fn oversized_header_section_gets_431() {
    let up = spawn_upstream().await;
    // Default limit (16 KiB): refused by hyper's parser before keyward sees the request.
    let kw = spawn_proxy(up.addr, "").await;
    let big = head(
        "GET",
        "/v1/big",
        &format!("X-Big: {}\r\n", "a".repeat(17_000)),
    );
    let r = exchange(kw.addr, big.as_bytes()).await;
    assert_eq!(r.statuses(), [431], "{}", r.text);
    assert!(r.closed);
    let fits = head(
        "GET",
        "/v1/fits",
        &format!("X-Big: {}\r\nConnection: close\r\n", "a".repeat(15_000)),
    );
    let r = exchange(kw.addr, fits.as_bytes()).await;
    assert_eq!(r.status(), 200, "{}", r.text);
    // On a kept-alive connection hyper's buffer may take a head up to twice its size
    // whole; the limit holds there too, after a request keyward's server took and after
    // one it handed to hyper's (a body), and with hyper's server throughout.
    let over = head(
        "GET",
        "/v1/big",
        &format!("X-Big: {}\r\n", "a".repeat(20_000)),
    );
    for server in ["fast", "hyper"] {
        let kw = spawn_proxy(up.addr, &format!("http1_server: {server}\n")).await;
        for first in [
            head("GET", "/v1/first", ""),
            head("POST", "/v1/first", "Content-Length: 2\r\n") + "hi",
        ] {
            let r = after_an_answer(kw.addr, &first, &over).await;
            assert_eq!(r.statuses(), [200, 431], "{server}: {}", r.text);
            assert!(r.closed, "{server}");
        }
        kw.shutdown().await;
    }
    kw.shutdown().await;

    // A limit below hyper's 8 KiB minimum buffer is enforced exactly by keyward.
    let kw = spawn_proxy(up.addr, "limits: { max_header_bytes: 2048 }\n").await;
    let big = head(
        "GET",
        "/v1/big",
        &format!("X-Big: {}\r\n", "a".repeat(3000)),
    );
    let r = exchange(kw.addr, big.as_bytes()).await;
    assert_eq!(r.statuses(), [431], "{}", r.text);
    assert_eq!(r.json()["code"], "request_header_fields_too_large");
    assert!(r.header("x-correlation-id").is_some());
    assert!(r.closed);
    let fits = head(
        "GET",
        "/v1/fits",
        &format!("X-Big: {}\r\nConnection: close\r\n", "a".repeat(1500)),
    );
    let r = exchange(kw.addr, fits.as_bytes()).await;
    assert_eq!(r.status(), 200, "{}", r.text);
    assert!(up.requests().iter().all(|s| s.target != "/v1/big"));
    kw.shutdown().await;
}

#[tokio::test]
async fn host_header_must_be_single_and_valid() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    for hosts in [
        "",
        "Host: a\r\nHost: b\r\n",
        "Host: a\r\nHost: a\r\n",
        "Host: a/b\r\n",
        "Host: user@a\r\n",
        "Host: \r\n",
    ] {
        let req = format!("GET /v1/host HTTP/1.1\r\n{hosts}x-api-key: {KEY}\r\n\r\n");
        let r = exchange(kw.addr, req.as_bytes()).await;
        assert_eq!(r.status(), 400, "{hosts:?}: {}", r.text);
        assert_eq!(r.json()["code"], "bad_request");
        assert_eq!(r.header("connection").as_deref(), Some("close"));
        assert!(r.closed);
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    // HTTP/1.0 may omit Host.
    let req = format!("GET /v1/host HTTP/1.0\r\nx-api-key: {KEY}\r\n\r\n");
    let r = exchange(kw.addr, req.as_bytes()).await;
    assert_eq!(r.status(), 200, "{}", r.text);
    kw.shutdown().await;
}

#[tokio::test]
async fn path_tricks_never_reach_admin_routes() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    for (target, status, code) in [
        ("/a/../admin/x", 403, "insufficient_scope"),
        ("//admin/x", 403, "insufficient_scope"),
        ("/./admin/x", 403, "insufficient_scope"),
        ("/x/%2e%2e/admin/x", 403, "insufficient_scope"),
        ("/x/%2E%2e/admin/x", 403, "insufficient_scope"),
        ("/%61dmin/x", 403, "insufficient_scope"),
        ("/admin", 403, "insufficient_scope"),
        ("/admin/", 403, "insufficient_scope"),
        // Rails, Symfony and Spring's suffix matching route a format to the same handler;
        // IIS drops a trailing dot.
        ("/admin.json", 403, "insufficient_scope"),
        ("/admin.", 403, "insufficient_scope"),
        ("/admin.json/", 403, "insufficient_scope"),
        ("/admin./x", 403, "insufficient_scope"),
        ("/admin%20", 403, "insufficient_scope"),
        ("/admin%20/x", 403, "insufficient_scope"),
        ("/public/../admin/x", 403, "insufficient_scope"),
        ("/healthz/../admin/x", 403, "insufficient_scope"),
        ("/%2e%2e/admin", 400, "bad_request"),
        ("/..", 400, "bad_request"),
        ("/admin%2fx", 400, "bad_request"),
        ("/admin%2Fx", 400, "bad_request"),
        ("/admin%5cx", 400, "bad_request"),
        ("/admin%5Cx", 400, "bad_request"),
        ("/admin;x/y", 400, "bad_request"),
        ("/admin%3bx/y", 400, "bad_request"),
        ("/admin%00/x", 400, "bad_request"),
        ("/admin%zz", 400, "bad_request"),
        ("/public%2f..%2fadmin/x", 400, "bad_request"),
        // IIS drops a segment's trailing dots and spaces: `..` to it.
        ("/healthz/..%20/admin/x", 400, "bad_request"),
        ("/healthz/.%20./admin/x", 400, "bad_request"),
        ("/healthz/%20../admin/x", 400, "bad_request"),
        // An app that decodes its URL before splitting it ends the path at `?` or `#`:
        // authorized as `/admin` too.
        ("/admin%3F", 403, "insufficient_scope"),
        ("/admin%23x", 403, "insufficient_scope"),
        ("/..%3F", 400, "bad_request"),
        // A `？` or `＼` NFKC makes, taken as data: dot segments after it climb to `/admin`.
        (
            "/public/a%EF%BC%9F/%E2%80%A5/%E2%80%A5/admin/x",
            403,
            "insufficient_scope",
        ),
        (
            "/public/x%EF%BC%BCy/%E2%80%A5/%E2%80%A5/admin/z",
            403,
            "insufficient_scope",
        ),
        // An app that NFKC-normalizes reads these as `..`, `/` and `admin`.
        ("/public/%E2%80%A5/admin/x", 403, "insufficient_scope"),
        (
            "/public/x%EF%BC%8F..%EF%BC%8F..%EF%BC%8Fadmin/x",
            403,
            "insufficient_scope",
        ),
        (
            "/%EF%BD%81%EF%BD%84%EF%BD%8D%EF%BD%89%EF%BD%8E/x",
            403,
            "insufficient_scope",
        ),
    ] {
        let req = head("GET", target, "Connection: close\r\n");
        let r = exchange(kw.addr, req.as_bytes()).await;
        assert_eq!(r.status(), status, "{target}: {}", r.text);
        assert_eq!(r.json()["code"], code, "{target}");
    }
    // A raw backslash (hyper lets it through; some upstreams read it as `/`).
    for target in ["/admin\\x", "/x\\..\\admin\\x"] {
        let r = exchange(
            kw.addr,
            head("GET", target, "Connection: close\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status(), 400, "{target}: {}", r.text);
        assert_eq!(r.json()["detail"], "backslash in path", "{target}");
    }
    // A fragment is never part of the path that is matched or forwarded.
    let r = exchange(
        kw.addr,
        head("GET", "/v1/x#/../../admin/x", "Connection: close\r\n").as_bytes(),
    )
    .await;
    // Refused: `http::Uri` would drop it (tests/proxy.rs has the rest).
    assert_eq!(r.status(), 400, "{}", r.text);
    assert_nothing_smuggled(&kw, &up).await;
    // The query never takes part in route matching.
    let r = exchange(
        kw.addr,
        head("GET", "/v1/x?/../admin/x", "Connection: close\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text);
    assert_eq!(up.last().target, "/v1/x?/../admin/x");
    // An admin key reaches the same normalized path.
    let r = exchange(
        kw.addr,
        format!("GET /x/%2e%2e/admin/x HTTP/1.1\r\nHost: app\r\nx-api-key: {ENTERPRISE_KEY}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text);
    assert_eq!(up.last().target, "/admin/x");
    kw.shutdown().await;
}

/// Frameworks decode `%3A` to `:`, `%40` to `@`, `%2B` to `+` (every character that may
/// stand as itself in a path): a rule holding one meets both spellings, whichever it is
/// written in, on the proxy and the decision listener alike.
#[tokio::test]
async fn a_route_rule_meets_both_spellings_of_a_reserved_character() {
    let up = spawn_upstream().await;
    let routes = "routes:\n  - { prefix: \"/v1/items:purge\", any_of: [admin] }\n  \
                  - { prefix: \"/v1/%40admin/\", any_of: [admin] }\n  \
                  - { path: \"/v1/a+b\", any_of: [admin] }\n";
    let kw = spawn_proxy(up.addr, routes).await;
    // Other paths are as they were; an encoded `%` or space is data, not a delimiter.
    for (target, status) in [
        ("/v1/items:purge", 403),
        ("/v1/items%3Apurge", 403),
        ("/v1/items%3apurge", 403),
        ("/v1/items%3Apurge.json", 403),
        ("/v1/@admin/x", 403),
        ("/v1/%40admin/x", 403),
        ("/v1/a+b", 403),
        ("/v1/a%2Bb", 403),
        ("/v1/items:list", 200),
        ("/v1/a%2Cb", 200),
        ("/v1/items%253Apurge", 200),
        ("/v1/a%20b", 200),
    ] {
        let r = exchange(
            kw.addr,
            head("GET", target, "Connection: close\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status(), status, "{target}: {}", r.text);
        if status == 403 {
            assert_eq!(r.json()["code"], "insufficient_scope", "{target}");
        }
    }
    // The key that holds the scope gets through, and the path goes on as it was sent.
    let r = exchange(
        kw.addr,
        format!("GET /v1/items%3Apurge HTTP/1.1\r\nHost: app\r\nx-api-key: {ENTERPRISE_KEY}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text);
    assert_eq!(up.last().target, "/v1/items%3Apurge");
    kw.shutdown().await;
}

#[tokio::test]
async fn h2c_upgrade_is_not_tunnelled_but_websocket_is() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    // An h2c upgrade through an authenticating proxy would hand the client an HTTP/2
    // connection to the upstream that keyward never sees again. It is forwarded as a plain
    // request without the upgrade.
    let h2c = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n";
    let r = exchange(kw.addr, head("GET", "/v1/h2c", h2c).as_bytes()).await;
    assert_eq!(r.statuses(), [200], "{}", r.text);
    let seen = up.last();
    assert_eq!(seen.target, "/v1/h2c");
    for h in ["upgrade", "connection", "http2-settings"] {
        assert!(
            seen.headers.get(h).is_none(),
            "{h} forwarded: {:?}",
            seen.headers
        );
    }
    // An upstream that switches protocols anyway (the test upstream's /ws always does) is
    // not passed on: no tunnel is ever opened without an allowed upgrade.
    let r = exchange(kw.addr, head("GET", "/ws", h2c).as_bytes()).await;
    assert_eq!(r.statuses(), [502], "{}", r.text);
    assert!(up.last().headers.get("upgrade").is_none());
    for upgrade in ["h2c, websocket", "websocket, h2c", "websocket/13 h2c"] {
        let req = head(
            "GET",
            "/v1/up",
            &format!("Connection: Upgrade\r\nUpgrade: {upgrade}\r\nConnection: close\r\n"),
        );
        let r = exchange(kw.addr, req.as_bytes()).await;
        assert_eq!(r.status(), 200, "{upgrade}: {}", r.text);
        assert!(up.last().headers.get("upgrade").is_none(), "{upgrade}");
    }
    // A WebSocket handshake is a GET without a body (RFC 6455 4.1): with a body, or by
    // another method, the request goes as a plain one, and a 101 to it is no answer.
    let ws = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: close\r\n";
    for (method, body) in [
        ("POST", "Content-Length: 2\r\n\r\nhi"),
        ("GET", "Content-Length: 2\r\n\r\nhi"),
        (
            "POST",
            "Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        ),
        ("PUT", "Content-Length: 0\r\n\r\n"),
    ] {
        let req =
            format!("{method} /v1/up HTTP/1.1\r\nHost: app\r\nx-api-key: {KEY}\r\n{ws}{body}");
        let r = exchange(kw.addr, req.as_bytes()).await;
        assert_eq!(r.status(), 200, "{method} {body}: {}", r.text);
        let seen = up.last();
        assert!(seen.headers.get("upgrade").is_none(), "{method} {body}");
        let req = format!("{method} /ws HTTP/1.1\r\nHost: app\r\nx-api-key: {KEY}\r\n{ws}{body}");
        let r = exchange(kw.addr, req.as_bytes()).await;
        assert_eq!(r.statuses(), [502], "{method} {body}: {}", r.text);
    }
    // WebSocket is the allowed upgrade: authenticated at the handshake, then tunnelled.
    let req = head(
        "GET",
        "/ws",
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    );
    let mut s = TcpStream::connect(kw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let got = read_head(&mut s).await.expect("closed before the 101");
    assert_eq!(raw_status(&got), 101);
    assert_eq!(up.last().headers["upgrade"], "websocket");
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    kw.shutdown().await;
}

/// Open a connection, send `first`, optionally keep trickling header lines, and return
/// how long the server took to close it (`None`: still open after `max`).
async fn time_to_close(
    addr: SocketAddr,
    first: &[u8],
    trickle: bool,
    max: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(first).await.unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < max {
        if trickle && s.write_all(b"X-Slow: 1\r\n").await.is_err() {
            return Some(start.elapsed());
        }
        let read = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return Some(start.elapsed());
        }
    }
    None
}

#[tokio::test]
async fn slowloris_is_cut_at_header_read_timeout() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "limits: { header_read_timeout: 200ms }\n").await;
    let max = Duration::from_secs(3);
    let partial = format!("GET /v1/slow HTTP/1.1\r\nHost: app\r\nx-api-key: {KEY}\r\n");
    // A head that trickles in a line at a time never completes in time.
    let took = time_to_close(kw.addr, partial.as_bytes(), true, max)
        .await
        .expect("slowloris connection left open");
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // A head that stops half way.
    let took = time_to_close(kw.addr, partial.as_bytes(), false, max)
        .await
        .expect("stalled head left open");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(up.count(), 0);
    kw.shutdown().await;
}

/// Past `header_read_timeout` a connection whose head never completed gets at most one more
/// second, not another full timeout: hyper would go on waiting for the rest of the head
/// after a graceful shutdown.
#[tokio::test]
async fn a_stalled_first_head_is_dropped_a_second_after_its_timeout() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "limits: { header_read_timeout: 3s }\n").await;
    let partial = format!("GET /v1/stalled HTTP/1.1\r\nHost: app\r\nx-api-key: {KEY}\r\n");
    let took = time_to_close(kw.addr, partial.as_bytes(), false, Duration::from_secs(8))
        .await
        .expect("stalled head left open");
    // About 4 s; twice the timeout (6 s) was the bound before.
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(up.count(), 0);
    kw.shutdown().await;
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let up = spawn_upstream().await;
    let limits = "limits: { header_read_timeout: 200ms, idle_timeout: 300ms }\n";
    let kw = spawn_proxy(up.addr, limits).await;
    let max = Duration::from_secs(3);
    let h2_idle = h2_hello();
    let keep_alive = head("GET", "/v1/idle", "");
    let then_stalled = format!("{keep_alive}GET /v1/stalled HTTP/1.1\r\nHo");
    for (what, first) in [
        ("no bytes at all", &b""[..]),
        ("one byte", b"P"),
        ("half the HTTP/2 preface", &PREFACE[..16]),
        ("HTTP/2 preface and SETTINGS, then nothing", &h2_idle),
        (
            "HTTP/1.1 keep-alive after a response",
            keep_alive.as_bytes(),
        ),
        (
            "HTTP/1.1 keep-alive, then half a head",
            then_stalled.as_bytes(),
        ),
    ] {
        let took = time_to_close(kw.addr, first, false, max).await;
        let took = took.unwrap_or_else(|| panic!("{what}: still open after {max:?}"));
        assert!(took < Duration::from_secs(2), "{what}: {took:?}");
    }
    // HTTP/2 after a request: idle again, told to go away, and closed even though this
    // client never acknowledges the GOAWAY's PING.
    let start = Instant::now();
    let mut s = TcpStream::connect(kw.addr).await.unwrap();
    let mut hello = h2_hello();
    hello.extend(frame(
        HEADERS,
        0x4 | 0x1,
        1,
        &h2_get_block("/v1/h2-idle", KEY),
    ));
    s.write_all(&hello).await.unwrap();
    let mut answered = false;
    let goaway = read_frames(&mut s, |kind, _, stream, _| {
        answered |= kind == HEADERS && stream == 1;
        (kind == GOAWAY).then_some(())
    })
    .await;
    assert!(answered, "no response on stream 1");
    assert!(goaway.is_some(), "no GOAWAY");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "HTTP/2 connection left open");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(up.last().target, "/v1/h2-idle");
    kw.shutdown().await;
}

/// An HTTP/2 client that opens a connection and sends no request within
/// `header_read_timeout` is told to go away (GOAWAY, so it knows nothing was processed),
/// not just cut off; a half-sent HTTP/1 head gets no such courtesy.
#[tokio::test]
async fn unused_h2_connection_is_told_to_go_away() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "limits: { header_read_timeout: 200ms }\n").await;
    let mut s = TcpStream::connect(kw.addr).await.unwrap();
    s.write_all(&h2_hello()).await.unwrap();
    let goaway = read_frames(&mut s, |kind, _, _, _| (kind == GOAWAY).then_some(())).await;
    assert!(goaway.is_some(), "closed without a GOAWAY");
    assert_eq!(up.count(), 0);
    kw.shutdown().await;
}

/// A keep-alive client may idle between requests for `idle_timeout`, longer than the
/// `header_read_timeout` a new connection gets for its first request.
#[tokio::test]
async fn keep_alive_outlives_header_read_timeout_up_to_idle_timeout() {
    let up = spawn_upstream().await;
    let limits = "limits: { header_read_timeout: 200ms, idle_timeout: 10s }\n";
    let kw = spawn_proxy(up.addr, limits).await;
    let mut s = TcpStream::connect(kw.addr).await.unwrap();
    for i in 0..2 {
        s.write_all(head("GET", &format!("/v1/kept-{i}"), "").as_bytes())
            .await
            .unwrap();
        let reply = read_head(&mut s).await.expect("connection closed");
        assert_eq!(raw_status(&reply), 200, "request {i}");
        // Idle for three header_read_timeouts: the subject of the test, not a wait.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(up.count(), 2);
    kw.shutdown().await;
}

#[tokio::test]
async fn max_connections_refuses_the_extra_connection() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "limits: { max_connections: 2 }\n").await;
    // Two keep-alive connections, each proven accepted by a full exchange.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(kw.addr).await.unwrap();
        s.write_all(head("GET", &format!("/v1/held-{i}"), "").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(raw_status(&String::from_utf8_lossy(&buf[..n])), 200);
        held.push(s);
    }
    // The third is accepted by the kernel and closed at once, unanswered.
    let r = exchange(kw.addr, head("GET", "/v1/third", "").as_bytes()).await;
    assert!(r.closed, "extra connection left open");
    assert_eq!(r.text, "", "extra connection was served");
    assert!(up.requests().iter().all(|s| s.target != "/v1/third"));
    // The held connections still work.
    held[0]
        .write_all(head("GET", "/v1/again", "").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = held[0].read(&mut buf).await.unwrap();
    assert_eq!(raw_status(&String::from_utf8_lossy(&buf[..n])), 200);
    // Closing one frees its slot.
    drop(held.pop());
    let addr = kw.addr;
    eventually("a slot frees up", || async move {
        let r = exchange(
            addr,
            head("GET", "/v1/after", "Connection: close\r\n").as_bytes(),
        )
        .await;
        r.status() == 200
    })
    .await;
    kw.shutdown().await;

    // Regression: a limit above tokio's semaphore maximum panicked the accept loop. The
    // config now refuses any past a million (config::tests); the highest it takes serves.
    let kw = spawn_proxy(up.addr, "limits: { max_connections: 1000000 }\n").await;
    let r = get(&kw.url("/v1/unbounded"), &[("x-api-key", KEY)]).await;
    assert_eq!(r.status, 200);
    kw.shutdown().await;
}

/// An app that keeps every connection open and reads no request body: with `answer`, it
/// reads each request's head and sends that; without, it reads and sends nothing.
async fn spawn_holding_app(
    answer: Option<&'static [u8]>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((mut s, _)) = app.accept().await {
            if let Some(answer) = answer {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).await.unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = s.write_all(answer).await;
            }
            sockets.push(s);
        }
    });
    (addr, held)
}

/// Review 31: a keyed request's body that the app stops reading lives on in hyper's upstream
/// connection after the client is gone. Its key watch held the client connection's
/// `max_connections` slot with it, so a key holder and an app that hangs shut the listener
/// to everyone. The slot goes with the client's connection.
#[tokio::test]
async fn an_upload_the_app_never_reads_does_not_hold_its_clients_slot() {
    // The app reads nothing and answers nothing, but keeps every socket open.
    let (app_addr, held) = spawn_holding_app(None).await;
    let kw = spawn_proxy(
        app_addr,
        "limits: { max_connections: 1, upstream_timeout: 500ms, idle_timeout: 1s, header_read_timeout: 1s }\n",
    )
    .await;
    let mut client = TcpStream::connect(kw.addr).await.unwrap();
    let announced = 64 << 20;
    let request = head(
        "POST",
        "/v1/upload",
        &format!("content-length: {announced}\r\n"),
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let (mut rx, mut tx) = client.into_split();
    // Push body until the buffers on the way fill (the app reads none of it).
    let push = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 << 10];
        while tx.write_all(&chunk).await.is_ok() {}
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), rx.read_to_end(&mut answer)).await;
    assert_eq!(raw_status(&String::from_utf8_lossy(&answer)), 504);
    push.abort();
    drop(rx);
    // The client is gone (its connection closes by `idle_timeout` at the latest, hyper
    // waiting on the body the upload holds): its slot serves the next client.
    let addr = kw.addr;
    eventually("the slot frees up", || async move {
        let keyless = "GET /v1/next HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n";
        exchange(addr, keyless.as_bytes()).await.status() == 401
    })
    .await;
    kw.shutdown().await;
    held.abort();
}

/// Review 32: an app that answers before reading a request body and then reads nothing
/// more (keeping its socket open) left the upload with hyper's upstream connection, which
/// polls a body only while it can write: the upload's stall bound never ran, and the
/// `max_in_flight` place it took with the answer was never given back. Two such uploads,
/// and every later request got 502. The upstream connection is cut once the body has not
/// moved for `body_stall_timeout`, and the place comes back.
#[tokio::test]
async fn an_upload_the_app_stopped_reading_gives_its_place_back() {
    // Answers every request at its head, then reads nothing; keeps every socket open.
    let (app_addr, held) =
        spawn_holding_app(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")).await;
    let kw = spawn_proxy(
        app_addr,
        "workers: 1\nlimits: { max_in_flight: 2, body_stall_timeout: 1s }\n",
    )
    .await;
    for i in 0..2 {
        let mut client = TcpStream::connect(kw.addr).await.unwrap();
        let request = head(
            "POST",
            &format!("/v1/upload-{i}"),
            &format!("content-length: {}\r\n", 64 << 20),
        );
        client.write_all(request.as_bytes()).await.unwrap();
        let (mut rx, mut tx) = client.into_split();
        let push = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 << 10];
            while tx.write_all(&chunk).await.is_ok() {}
        });
        let mut answer = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), rx.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(raw_status(&String::from_utf8_lossy(&answer[..n])), 200);
        // Let the body fill the buffers on the way, then go.
        tokio::time::sleep(Duration::from_millis(300)).await;
        push.abort();
    }
    let url = kw.url("/v1/after");
    eventually("the places come back", || async {
        get(&url, &[("x-api-key", KEY)]).await.status == 200
    })
    .await;
    kw.shutdown().await;
    held.abort();
}

/// xorshift64*: a deterministic byte source (no seed file, no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_garbage_connections_leave_it_serving() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "limits: { header_read_timeout: 300ms }\n").await;
    let addr = kw.addr;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let prefixes: [&[u8]; 5] = [
        b"",
        b"GET / HTTP/1.1\r\n",
        b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nX-A: ",
    ];
    let payloads: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            let len = (rng.next() % 2048) as usize + 1;
            let mut p = prefixes[i % prefixes.len()].to_vec();
            p.extend(rng.bytes(len));
            p
        })
        .collect();
    let start = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for p in payloads {
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return;
            };
            let _ = s.write_all(&p).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut sink)).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(
        up.count(),
        0,
        "garbage reached the upstream: {:?}",
        up.requests()
    );
    let r = get(&kw.url("/v1/after-garbage"), &[("x-api-key", KEY)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get_h2c(&kw.url("/v1/after-garbage-h2"), &[("x-api-key", KEY)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    kw.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// HTTP/2

/// One HTTP/2 frame header + payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What an HTTP/2 client sends first: the connection preface and an empty SETTINGS frame.
fn h2_hello() -> Vec<u8> {
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello
}
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;

/// Read frames until `want` returns a value or the connection ends.
async fn read_frames<T>(
    s: &mut TcpStream,
    mut want: impl FnMut(u8, u8, u32, &[u8]) -> Option<T>,
) -> Option<T> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            if let Some(v) = want(buf[3], buf[4], stream, &buf[9..9 + len]) {
                return Some(v);
            }
            buf.drain(..9 + len);
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// HPACK block for `GET http://a{path}` with an `x-api-key`, all literals, no Huffman.
fn h2_get_block(path: &str, key: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x04, path.len() as u8];
    b.extend(path.as_bytes());
    b.extend([0x01, 0x01, b'a', 0x00, 9]);
    b.extend(b"x-api-key");
    b.push(key.len() as u8);
    b.extend(key.as_bytes());
    b
}

#[tokio::test]
async fn h2_settings_advertise_the_configured_limits() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(
        up.addr,
        "limits: { h2_max_concurrent_streams: 7, max_header_bytes: 4096 }\n",
    )
    .await;
    let mut s = TcpStream::connect(kw.addr).await.unwrap();
    s.write_all(&h2_hello()).await.unwrap();
    let settings = read_frames(&mut s, |kind, flags, _, payload| {
        (kind == SETTINGS && flags & 1 == 0).then(|| {
            payload
                .chunks(6)
                .map(|c| {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    )
                })
                .collect::<std::collections::HashMap<_, _>>()
        })
    })
    .await
    .expect("server SETTINGS");
    assert_eq!(
        settings.get(&0x3),
        Some(&7),
        "MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert_eq!(
        settings.get(&0x6),
        Some(&4096),
        "MAX_HEADER_LIST_SIZE: {settings:?}"
    );
    drop(s);
    kw.shutdown().await;
}

#[tokio::test]
async fn h2_header_list_beyond_the_limit_is_refused() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut b = http::Request::get(kw.url("/v1/h2-big")).header("x-api-key", KEY);
    for i in 0..20 {
        b = b.header(format!("x-big-{i}"), "a".repeat(1000));
    }
    // h2 answers 431 on the stream (then resets it); the request never reaches keyward's
    // handler, let alone the upstream.
    let resp = client
        .request(b.body(Empty::new()).unwrap())
        .await
        .expect("a response, not a connection error");
    assert_eq!(resp.status(), 431);
    assert!(up.requests().iter().all(|s| s.target != "/v1/h2-big"));
    let r = get_h2c(&kw.url("/v1/h2-small"), &[("x-api-key", KEY)]).await;
    assert_eq!(r.status, 200);
    kw.shutdown().await;
}

#[tokio::test]
async fn h2_rapid_reset_flood_gets_goaway() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let mut s = TcpStream::connect(kw.addr).await.unwrap();
    let mut flood = h2_hello();
    // GET / with :authority "a": indexed :method, :scheme, :path; literal :authority.
    let block = [0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
    for i in 0..200u32 {
        let id = 2 * i + 1;
        flood.extend(frame(HEADERS, 0x4 | 0x1, id, &block));
        flood.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    s.write_all(&flood).await.unwrap();
    let code = read_frames(&mut s, |kind, _, _, payload| {
        (kind == GOAWAY)
            .then(|| u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]))
    })
    .await
    .expect("GOAWAY");
    assert_eq!(code, 0xb, "ENHANCE_YOUR_CALM expected");
    // The listener is unaffected.
    let r = get_h2c(&kw.url("/v1/after-flood"), &[("x-api-key", KEY)]).await;
    assert_eq!(r.status, 200);
    kw.shutdown().await;
}

/// The admin listener has bounds of its own: clients that open admin connections and send
/// nothing cannot take every file descriptor (the proxy listener would stop accepting). Nor
/// can they shut anyone out by holding every place: everything in a pod shares the loopback
/// address, so past a bound the connection that has waited longest for a request gives its
/// place to the new one, and a client that sends its request at once is served (a local
/// process holding 32 connections shut out the emergency revoke, then every probe).
#[tokio::test]
async fn admin_connections_have_bounds_no_idle_client_can_fill() {
    use keyward::admin::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER};
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let from = |last: u8| async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from(([127, 0, 0, last], 0))).unwrap();
        s.connect(kw.admin).await.unwrap()
    };
    let readyz_from = |last: u8| async move {
        let mut s = from(last).await;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let closed = |mut s: TcpStream| async move {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed, not left waiting")
            .unwrap_or(0);
        n == 0
    };
    let mut held = Vec::new();
    for peer in 0..MAX_CONNECTIONS / MAX_CONNECTIONS_PER_PEER {
        for _ in 0..MAX_CONNECTIONS_PER_PEER {
            let mut s = from(10 + peer as u8).await;
            s.write_all(b"GET /readyz HTTP/1.1\r\n").await.unwrap();
            held.push(s);
        }
        if peer == 0 {
            // One address holds its share: a request from it is still served, and the
            // connection that waited longest is the one closed.
            let r = readyz_from(10).await;
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            assert!(closed(held.remove(0)).await, "the longest waiting went");
            let mut s = from(10).await;
            s.write_all(b"GET /readyz HTTP/1.1\r\n").await.unwrap();
            held.push(s);
        }
    }
    // Every place is taken: a request from anywhere is still served.
    for last in [200, 10] {
        let r = readyz_from(last).await;
        assert!(r.starts_with("HTTP/1.1 200"), "from .{last}: {r}");
    }
    let r = get(&kw.url("/v1/x"), &[("x-api-key", KEY)]).await;
    assert_eq!(r.status, 200, "traffic is not starved");
    let metrics = support::prom::scrape(&format!("http://{}/metrics", kw.admin)).await;
    let evicted = metrics.get(
        "keyward_admin_connections_closed_total",
        &[("why", "evicted")],
    );
    assert!(evicted >= 2.0, "{evicted}");
    drop(held);
    kw.shutdown().await;
}

/// A client that pipelines admin requests and never reads the answers blocks the server's
/// writes, where no head timeout runs: such a write fails after 10 s, and the connection
/// gives its slot back (it held it for good before).
#[tokio::test]
async fn admin_connections_blocked_writing_give_their_slots_back() {
    use keyward::admin::MAX_CONNECTIONS_PER_PEER;
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let peer = SocketAddr::from(([127, 0, 0, 21], 0));
    let connect = || async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.bind(peer).unwrap();
        s.connect(kw.admin).await.unwrap()
    };
    let pipelined = "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n".repeat(2000);
    let mut pinned = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_PEER {
        let mut s = connect().await;
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            s.write_all(pipelined.as_bytes()),
        )
        .await;
        pinned.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = connect().await;
        let _ = s
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        if out.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled connections kept their slots"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(pinned);
    kw.shutdown().await;
}

/// `probe_listen`: the probes on a listener of their own, whose bounds no client of
/// `/metrics` or the control API shares. With every admin slot held, the probes still
/// answer there; nothing but `/healthz` and `/readyz` does.
#[tokio::test]
async fn the_probe_listener_answers_probes_with_the_admin_listener_full() {
    use keyward::admin::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER};
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.yaml");
    std::fs::write(&keys_file, DEMO_KEYS).unwrap();
    let config = support::config::ConfigBuilder::new(up.addr, &keys_file)
        .set("probe_listen", "127.0.0.1:0")
        .config();
    let server = keyward::Keyward::bind(config).await.expect("binds");
    let (probe, admin) = (
        server.probe_addr().expect("a probe listener"),
        server.admin_addr(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let mut held = Vec::new();
    for peer in 0..MAX_CONNECTIONS / MAX_CONNECTIONS_PER_PEER {
        for _ in 0..MAX_CONNECTIONS_PER_PEER {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::from(([127, 0, 0, 10 + peer as u8], 0)))
                .unwrap();
            let mut s = s.connect(admin).await.unwrap();
            s.write_all(b"GET /readyz HTTP/1.1\r\n").await.unwrap();
            held.push(s);
        }
    }
    for (path, status) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 404),
        ("/v1/snapshot", 404),
    ] {
        let r = get(&format!("http://{probe}{path}"), &[]).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
    }
    drop(held);
    let _ = tx.send(());
    task.await.unwrap();
}
