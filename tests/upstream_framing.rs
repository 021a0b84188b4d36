//! How keyward reads what the upstream sends back, through both of its HTTP/1.1 clients:
//! the fast path (`upstream_client: fast`, the default, for requests without a body) and
//! hyper's (`upstream_client: hyper`). A scripted upstream on loopback answers each path
//! with exact bytes: every framing (length, chunked with trailers, to the end of the
//! connection, none), responses that run past their own framing (response smuggling),
//! malformed heads and truncated bodies. Each case runs through both clients, which must
//! give the client the same answer, and never answer one request with bytes meant for
//! another.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLIENTS: [&str; 2] = ["fast", "hyper"];

/// What a path is answered with, and whether the upstream then closes the connection.
#[derive(Clone)]
struct Script {
    bytes: Vec<u8>,
    close: bool,
}

/// An upstream that answers each request with its path's script (`next` for any other
/// path) and logs which connection carried which request.
struct Scripted {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<(usize, String)>>>,
}

impl Scripted {
    async fn start(scripts: &[(&str, &[u8], bool)]) -> Scripted {
        let scripts: HashMap<String, Script> = scripts
            .iter()
            .map(|(path, bytes, close)| {
                let script = Script {
                    bytes: bytes.to_vec(),
                    close: *close,
                };
                (path.to_string(), script)
            })
            .collect();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, n, scripts.clone(), seen.clone()));
                n += 1;
            }
        });
        Scripted { addr, log }
    }

    /// The upstream connection each request came on, in order.
    fn connections(&self) -> Vec<usize> {
        self.log.lock().unwrap().iter().map(|(c, _)| *c).collect()
    }
}

async fn serve(
    mut s: TcpStream,
    conn: usize,
    scripts: HashMap<String, Script>,
    log: Arc<Mutex<Vec<(usize, String)>>>,
) {
    loop {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            match s.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => return,
            }
        }
        let line = String::from_utf8_lossy(&head).into_owned();
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        log.lock().unwrap().push((conn, path.clone()));
        // `/reads/*` is an app that reads the body it answers; every other path does not.
        if path.starts_with("/reads/") {
            let length = line
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            let mut body = vec![0u8; length];
            if s.read_exact(&mut body).await.is_err() {
                return;
            }
        }
        let script = scripts.get(&path).cloned().unwrap_or(Script {
            bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext".to_vec(),
            close: false,
        });
        if s.write_all(&script.bytes).await.is_err() || script.close {
            return;
        }
    }
}

/// What the client got: the head as text, the body (de-chunked), and whether the body
/// arrived whole (a chunked body with its last chunk, or as many bytes as announced).
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
    whole: bool,
}

impl Reply {
    /// A yes/no observation carried among the replies (both clients must agree on it too).
    fn flag(yes: bool) -> Reply {
        Reply {
            status: 0,
            head: String::new(),
            body: vec![u8::from(yes)],
            whole: true,
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on its own connection (`connection: close`), read to the end.
async fn request(kw: SocketAddr, method: &str, path: &str) -> Reply {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\nconnection: close\r\n\r\n"
    );
    raw(kw, &req, method == "HEAD").await
}

/// `req` as written, on its own connection, read to the end.
async fn raw(kw: SocketAddr, req: &str, head_only: bool) -> Reply {
    let mut s = TcpStream::connect(kw).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    parse(&out, head_only)
}

fn parse(out: &[u8], head_only: bool) -> Reply {
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |i| i + 4);
    // Without the lines that differ on every request.
    let head: String = String::from_utf8_lossy(&out[..end])
        .split_inclusive("\r\n")
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !["date:", "x-correlation-id:", "x-request-id:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    let status = raw_status(&head);
    let rest = &out[end..];
    let mut reply = Reply {
        status,
        head,
        body: Vec::new(),
        whole: true,
    };
    if head_only {
        return reply;
    }
    if reply.header("transfer-encoding").is_some() {
        let (body, whole) = dechunk(rest);
        reply.body = body;
        reply.whole = whole;
    } else if let Some(len) = reply.header("content-length") {
        reply.body = rest.to_vec();
        reply.whole = len.parse::<usize>().ok() == Some(rest.len());
    } else {
        reply.body = rest.to_vec();
    }
    reply.body = without_correlation_id(reply.body);
    reply
}

/// keyward's own JSON answers carry the request's correlation id: blanked for comparison.
fn without_correlation_id(body: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&body).into_owned();
    let marker = "\"correlation_id\":\"";
    let Some(at) = text.find(marker).map(|i| i + marker.len()) else {
        return body;
    };
    let end = text[at..].find('"').map_or(text.len(), |i| at + i);
    format!("{}{}", &text[..at], &text[end..]).into_bytes()
}

/// A chunked body's data, and whether its last chunk came.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
        let Some(size) = size else {
            return (body, false);
        };
        rest = &rest[eol + 2..];
        if size == 0 {
            return (body, true);
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..rest.len().min(size)]);
            return (body, false);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// keyward in front of `up`, with one worker (so one pool) and the given client.
async fn keyward(up: &Scripted, client: &str) -> Proxy {
    let kw = spawn_proxy(up.addr, &format!("workers: 1\nupstream_client: {client}\n")).await;
    // Each run really goes through the client it names, or the comparison proves nothing.
    let expected = match client {
        "fast" => keyward::config::UpstreamClient::Fast,
        _ => keyward::config::UpstreamClient::Hyper,
    };
    assert_eq!(kw.app.upstream.client(), expected);
    kw
}

/// Run `f` through both clients; both must give the same replies.
async fn both<F, Fut>(scripts: &[(&str, &[u8], bool)], f: F) -> Vec<Reply>
where
    F: Fn(SocketAddr, Arc<Scripted>) -> Fut,
    Fut: std::future::Future<Output = Vec<Reply>>,
{
    let mut results = Vec::new();
    for client in CLIENTS {
        let up = Arc::new(Scripted::start(scripts).await);
        let kw = keyward(&up, client).await;
        let replies = f(kw.addr, up.clone()).await;
        kw.shutdown().await;
        results.push((client, replies));
    }
    let (_, hyper) = results.pop().unwrap();
    let (_, fast) = results.pop().unwrap();
    assert_eq!(fast, hyper, "the fast path and hyper's client disagree");
    fast
}

#[tokio::test]
async fn each_framing_is_forwarded_whole_and_the_connection_reused_when_it_may_be() {
    let cases: &[(&str, &[u8], bool, &str, bool)] = &[
        // (path, response, upstream closes, body, next request on the same connection)
        ("/length", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false, "hello", true),
        (
            "/chunked",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
            false,
            "hello world",
            true,
        ),
        ("/close", b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true, "until the end", false),
        (
            "/http10",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            false,
            "ok",
            false,
        ),
        (
            "/http10-keep-alive",
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
            false,
            "ok",
            true,
        ),
        (
            "/connection-close",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            false,
            "ok",
            false,
        ),
        // A 204 or 304 closes its connection: an app that writes a body after one anyway,
        // in a later write, would answer the next request sent there.
        ("/no-content", b"HTTP/1.1 204 No Content\r\n\r\n", false, "", false),
        ("/not-modified", b"HTTP/1.1 304 Not Modified\r\n\r\n", false, "", false),
        (
            "/informational",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            false,
            "ok",
            true,
        ),
    ];
    for &(path, bytes, close, body, reused) in cases {
        let replies = both(&[(path, bytes, close)], |kw, up| async move {
            let first = request(kw, "GET", path).await;
            let second = request(kw, "GET", "/other").await;
            let conns = up.connections();
            let same = conns.len() == 2 && conns[0] == conns[1];
            let marker = Reply::flag(same);
            vec![first, second, marker]
        })
        .await;
        assert_eq!(
            (
                replies[0].status,
                replies[0].text().as_str(),
                replies[0].whole
            ),
            (
                match path {
                    "/no-content" => 204,
                    "/not-modified" => 304,
                    _ => 200,
                },
                body,
                true
            ),
            "{path}"
        );
        assert_eq!(replies[1].text(), "next", "{path}");
        assert_eq!(
            replies[2].body,
            vec![u8::from(reused)],
            "{path}: connection reuse"
        );
    }
}

/// A response framed by Transfer-Encoding that also carries a Content-Length: the body is
/// the chunked one, and the Content-Length does not reach the client (RFC 9112 6.3), which
/// would cut the body at it (HTTP/1.1) or reset the stream (HTTP/2).
#[tokio::test]
async fn a_content_length_beside_transfer_encoding_is_not_forwarded() {
    let cases: &[(&str, &[u8], bool)] = &[
        (
            "/longer",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
            false,
        ),
        (
            "/shorter",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 50\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
        ),
    ];
    let replies = both(cases, |kw, _| async move {
        vec![
            request(kw, "GET", "/longer").await,
            request(kw, "GET", "/shorter").await,
        ]
    })
    .await;
    for (reply, body) in replies.iter().zip(["hello world", "hello"]) {
        assert_eq!(
            (reply.status, reply.text().as_str(), reply.whole),
            (200, body, true)
        );
        assert_eq!(reply.header("content-length"), None, "{}", reply.head);
    }
}

/// Identity headers are keyward's to send: an app that echoes them (or any spelling of
/// them) on its response does not pass them to the client; other headers pass.
#[tokio::test]
async fn identity_headers_from_the_upstream_do_not_reach_the_client() {
    let cases: &[(&str, &[u8], bool)] = &[(
        "/echo",
        b"HTTP/1.1 200 OK\r\nx-auth-subject-id: evil\r\nX_Auth_Org_Id: evil\r\nx-delegate-account-id: evil\r\nx-app: kept\r\ncontent-length: 2\r\n\r\nok",
        false,
    )];
    let replies = both(cases, |kw, _| async move {
        vec![request(kw, "GET", "/echo").await]
    })
    .await;
    let head = replies[0].head.to_ascii_lowercase();
    assert_eq!(replies[0].status, 200);
    assert!(!head.contains("evil"), "{head}");
    assert!(head.contains("x-app: kept"), "{head}");
}

/// An app's response trailers end its body at keyward, over HTTP/2 as over HTTP/1.1: passed
/// on, they would carry an echoed `x-auth-*` to the client unfiltered, and a
/// connection-specific field among them made HTTP/2 clients reset the stream and lose the
/// whole response.
#[tokio::test]
async fn the_apps_trailers_do_not_reach_an_http2_client() {
    use http_body_util::BodyExt;
    let script: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-auth-subject-id\r\n\r\n2\r\nok\r\n0\r\nx-auth-subject-id: evil\r\nconnection: x\r\nx-t: 1\r\n\r\n";
    for client in CLIENTS {
        let up = Scripted::start(&[("/trailers", script, false)]).await;
        let kw = keyward(&up, client).await;
        let h2: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let req = http::Request::get(kw.url("/trailers"))
            .header("x-api-key", SERVICE_KEY)
            .header("te", "trailers")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = h2.request(req).await.expect("h2c request");
        assert_eq!(resp.status(), 200, "{client}");
        let body = resp.into_body().collect().await.expect("the whole body");
        assert_eq!(body.trailers(), None, "{client}");
        assert_eq!(&body.to_bytes()[..], b"ok", "{client}");
        kw.shutdown().await;
    }
}

/// Framing a client would refuse is not passed on: a `Content-Length` on a 204 (an HTTP/2
/// client reset the stream over it, losing the whole answer), a list of one length
/// (`2, 2`), a status past 599 (502: clients may refuse it or guess its class).
#[tokio::test]
async fn framing_a_client_would_refuse_is_not_passed_on() {
    use http_body_util::BodyExt;
    let scripts: &[(&str, &[u8], bool)] = &[
        (
            "/no-content",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            false,
        ),
        (
            "/listed",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok",
            false,
        ),
        (
            "/six-hundred",
            b"HTTP/1.1 600 OK\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
    ];
    for client in CLIENTS {
        let up = Scripted::start(scripts).await;
        let kw = keyward(&up, client).await;
        let h2: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let get = |path: &str| {
            http::Request::get(kw.url(path))
                .header("x-api-key", SERVICE_KEY)
                .body(http_body_util::Empty::new())
                .unwrap()
        };
        let resp = h2.request(get("/no-content")).await.expect("h2c 204");
        assert_eq!(resp.status(), 204, "{client}");
        assert!(!resp.headers().contains_key("content-length"), "{client}");
        let resp = h2.request(get("/listed")).await.expect("h2c listed length");
        assert_eq!(resp.headers()["content-length"], "2", "{client}");
        let body = resp.into_body().collect().await.expect("the body");
        assert_eq!(&body.to_bytes()[..], b"ok", "{client}");
        let r = request(kw.addr, "GET", "/listed").await;
        let head = r.head.to_ascii_lowercase();
        assert!(head.contains("content-length: 2\r\n"), "{client}: {head}");
        assert!(!head.contains("2, 2"), "{client}: {head}");
        let r = request(kw.addr, "GET", "/six-hundred").await;
        assert_eq!(r.status, 502, "{client}");
        kw.shutdown().await;
    }
}

/// An app that answers without reading the request body (common for a GET, whose body has
/// no meaning; naive apps do it on any method) reads that body as its next request on the
/// connection, forged `x-auth-*` and all, and its answer would go to the next client keyward
/// sends there. So the upstream connection of a request with a body is closed after the
/// exchange (by default: see `upstream_reuse_after_body`).
#[tokio::test]
async fn a_body_the_app_may_not_read_closes_its_upstream_connection_after_the_exchange() {
    let cases: &[(&str, &[u8], bool)] = &[(
        "/smuggled",
        b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled",
        false,
    )];
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
        let replies = both(cases, |kw, up| async move {
            // Left open, so the next request sent on the connection completes it.
            let smuggled =
                "GET /smuggled HTTP/1.1\r\nhost: app\r\nx-auth-subject-id: forged\r\nx-pad: ";
            let req = format!(
                "{method} /v1/items HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{smuggled}",
                smuggled.len()
            );
            let first = raw(kw, &req, false).await;
            // Another client's request with a body: sent over the same pool.
            let next = format!(
                "POST /v1/after HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
            );
            let next = raw(kw, &next, false).await;
            let conns = up.connections();
            let log = up.log.lock().unwrap().clone();
            let after = log.iter().find(|(_, p)| p == "/v1/after").map(|(c, _)| *c);
            let marker = Reply::flag(after != Some(conns[0]));
            vec![first, next, marker]
        })
        .await;
        assert_eq!(
            (replies[0].status, replies[0].text().as_str()),
            (200, "next"),
            "{method}"
        );
        assert_eq!(
            replies[1].text(),
            "next",
            "{method}: another client got the body's answer"
        );
        assert_eq!(
            replies[2].body,
            [1],
            "{method}: the connection was used again"
        );
    }
}

/// `upstream_reuse_after_body: true` (an app that reads or drains every body) keeps the
/// connection after a POST, PUT or PATCH body, and after no other: a body on a method that
/// gives it no meaning, a WebDAV one, or one the app does not know (and may refuse through
/// an error path that never reads the body) still closes it.
#[tokio::test]
async fn upstream_reuse_after_body_pools_the_connection_after_a_body_the_app_reads() {
    let up = Scripted::start(&[]).await;
    let kw = spawn_proxy(up.addr, "workers: 1\nupstream_reuse_after_body: true\n").await;
    // Keyless on a public route (which takes any method), or with a key; both requests on
    // one client connection (requests without a key pool only within theirs).
    let send = |method: &str, path: &str| {
        let key = if path.starts_with("/public/") {
            String::new()
        } else {
            format!("x-api-key: {SERVICE_KEY}\r\n")
        };
        format!("{method} {path} HTTP/1.1\r\nhost: app\r\n{key}content-length: 5\r\n\r\nhello")
    };
    for (method, pooled, path) in [
        ("POST", true, "/reads/"),
        ("PUT", true, "/reads/"),
        ("PATCH", true, "/reads/"),
        ("GET", false, "/reads/"),
        ("POST", true, "/public/reads/"),
        ("PROPFIND", false, "/public/reads/"),
        ("QUERY", false, "/public/reads/"),
        ("FOO", false, "/public/reads/"),
    ] {
        let after_path = format!("{path}after");
        let path = format!("{path}{method}");
        let mut client = TcpStream::connect(kw.addr).await.unwrap();
        client
            .write_all(send(method, &path).as_bytes())
            .await
            .unwrap();
        assert_eq!(parse(&read_one(&mut client).await, false).status, 200);
        // Requests with a body of one key (or none, on one client connection) share one
        // pool (bodiless ones go through another).
        let after = send("POST", &after_path);
        client.write_all(after.as_bytes()).await.unwrap();
        assert_eq!(parse(&read_one(&mut client).await, false).status, 200);
        let log = up.log.lock().unwrap().clone();
        let [.., (body_conn, p), (after_conn, _)] = log.as_slice() else {
            panic!("{log:?}");
        };
        assert_eq!(*p, path);
        assert_eq!(body_conn == after_conn, pooled, "{method}: {log:?}");
    }
    kw.shutdown().await;
}

/// An upstream that stops half-way through a body holds the client no longer than
/// `limits.upstream_timeout` without a byte: the response is cut off (the client sees it
/// incomplete and the connection closed), as nginx's `proxy_read_timeout` does.
#[tokio::test]
async fn an_upstream_that_stops_mid_body_is_cut_off_at_upstream_timeout() {
    let scripts: &[(&str, &[u8], bool)] = &[(
        "/hang",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab",
        false,
    )];
    for client in CLIENTS {
        let up = Scripted::start(scripts).await;
        let extra = format!(
            "workers: 1\nupstream_client: {client}\nlimits: {{ upstream_timeout: 300ms }}\n"
        );
        let kw = spawn_proxy(up.addr, &extra).await;
        let started = std::time::Instant::now();
        let reply = request(kw.addr, "GET", "/hang").await;
        let took = started.elapsed();
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "ab"),
            "{client}"
        );
        assert!(!reply.whole, "{client}: the cut is visible");
        assert!(took < Duration::from_secs(3), "{client}: held for {took:?}");
        kw.shutdown().await;
    }
}

/// An app that answers HEAD as GET (`do_HEAD = do_GET`) sends a body after the head; bytes
/// that arrive after the response was taken as complete would answer the next request on
/// the connection. So a HEAD's upstream connection is closed after it, through both clients.
#[tokio::test]
async fn a_head_closes_its_upstream_connection() {
    let cases: &[(&str, &[u8], bool)] =
        &[("/h", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false)];
    let replies = both(cases, |kw, up| async move {
        let head = request(kw, "HEAD", "/h").await;
        let next = request(kw, "GET", "/v1/next").await;
        let conns = up.connections();
        let marker = Reply::flag(conns.len() == 2 && conns[0] != conns[1]);
        vec![head, next, marker]
    })
    .await;
    assert_eq!(replies[0].status, 200);
    assert_eq!(replies[1].text(), "next");
    assert_eq!(replies[2].body, [1], "the HEAD's connection was used again");
}

/// keyward's server answers a client's `Expect: 100-continue` itself and streams the body
/// on: the app is not asked again (an app that refused with 417 without reading the body
/// would read it as its next request), and gets the body.
#[tokio::test]
async fn expect_is_answered_by_keyward_and_not_forwarded() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let mut s = TcpStream::connect(kw.addr).await.unwrap();
    let head = format!(
        "POST /v1/items HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\ncontent-length: 5\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).await.unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(b"hello").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let seen = up.last();
    assert_eq!(seen.body_len, 5);
    assert!(seen.headers.get("expect").is_none(), "{:?}", seen.headers);
    kw.shutdown().await;
}

/// Bytes past the end of a response (after its length, after a 204, 304 or HEAD head)
/// are never read as the answer to the next request: the connection is dropped.
#[tokio::test]
async fn bytes_past_a_response_never_answer_the_next_request() {
    const SMUGGLED: &str = "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled";
    let cases: &[(&str, &str, &str)] = &[
        (
            "GET",
            "/length",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ),
        (
            "GET",
            "/no-content",
            "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
        ),
        ("GET", "/not-modified", "HTTP/1.1 304 Not Modified\r\n\r\n"),
        (
            "HEAD",
            "/head",
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n",
        ),
        (
            "GET",
            "/chunked",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
    ];
    for &(method, path, response) in cases {
        let bytes = format!("{response}{SMUGGLED}").into_bytes();
        let replies = both(&[(path, &bytes, false)], |kw, _up| async move {
            let first = request(kw, method, path).await;
            let mut next = Vec::new();
            for _ in 0..3 {
                next.push(request(kw, "GET", "/other").await);
            }
            let mut all = vec![first];
            all.extend(next);
            all
        })
        .await;
        assert!(replies[0].status < 400, "{path}: {:?}", replies[0]);
        for r in &replies[1..] {
            assert_eq!((r.status, r.text().as_str()), (200, "next"), "{path}");
        }
    }
}

/// An app that answers `/double` twice, in two writes, with Nagle on its socket (the
/// default): its second answer is held until its first is acknowledged. Acknowledged only
/// with keyward's next request (a delayed ACK riding on it), the held answer arrived as that
/// request's: another client's, in two exchanges of three. Acknowledged as the connection
/// goes back to the pool, it arrives while the connection is idle, and the connection is
/// dropped there. `/late` answers again 200 ms after its first answer: no check before reuse
/// can see an answer not yet written.
async fn spawn_double_answering_app() -> SocketAddr {
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end + 4);
                    // A body (keyward sends it with a length) is read and set aside.
                    let length = head.lines().find_map(|l| {
                        l.strip_prefix("content-length:")?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    });
                    while buf.len() < length.unwrap_or(0) {
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    buf.drain(..length.unwrap_or(0));
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let first = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                        path.len()
                    );
                    if s.write_all(first.as_bytes()).await.is_err() {
                        return;
                    }
                    let late = path.contains("/late/");
                    if late {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    if path.starts_with("/double") || late {
                        let second = "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON";
                        if s.write_all(second.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_apps_second_answer_held_by_nagle_never_answers_the_next_request() {
    let app = spawn_double_answering_app().await;
    // Without a body on keyward's own client; with one (kept alive after it) on hyper's,
    // whose connection is ready for the next request as soon as its task has read the
    // answer; and hyper's client throughout.
    for (config, method, body) in [
        ("", "GET", ""),
        ("upstream_reuse_after_body: true", "POST", "data"),
        ("upstream_client: hyper", "GET", ""),
    ] {
        let kw = spawn_proxy(app, &format!("workers: 1\n{config}\n")).await;
        let send = |path: String| {
            let req = format!(
                "{method} {path} HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            async move { raw(kw.addr, &req, false).await }
        };
        let mut crossed = 0;
        for i in 0..30 {
            let a = send(format!("/double/{i}")).await;
            assert_eq!(a.status, 200, "{method}");
            let b = send(format!("/echo/{i}")).await;
            if b.text() != format!("/echo/{i}") {
                crossed += 1;
            }
        }
        assert!(
            crossed <= 1,
            "{config} {method}: {crossed} of 30 answers were another request's"
        );
        kw.shutdown().await;
    }
}

/// An answer the app writes late to one key's request (after its connection went back to
/// the pool) answers the next request on that connection: with connections kept to one key
/// (the default), that is the same key's, never another key's or a keyless client's.
#[tokio::test]
async fn a_late_second_answer_never_reaches_another_key_or_a_keyless_client() {
    let app = spawn_double_answering_app().await;
    let get = |addr: SocketAddr, path: &str, key: Option<&str>| {
        let key = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nhost: app\r\n{key}connection: close\r\n\r\n");
        async move { raw(addr, &req, false).await }
    };
    // A pool of one is full with the first key's connection: still not another key's
    // until it has been quiet for a second.
    for (across_keys, idle) in [(false, 256), (false, 1), (true, 256)] {
        let kw = spawn_proxy(
            app,
            &format!(
                "workers: 1\nupstream_reuse_across_keys: {across_keys}\n\
                 limits: {{ upstream_max_idle_per_host: {idle} }}\n"
            ),
        )
        .await;
        let a = get(kw.addr, "/late/a", Some(SERVICE_KEY)).await;
        assert_eq!(a.text(), "/late/a");
        // Within the 200 ms before the app's second answer.
        let b = get(kw.addr, "/echo/b", Some(PERSONAL_KEY)).await;
        let c = get(kw.addr, "/public/c", None).await;
        if across_keys {
            // What a shared pool does: the next request on the connection gets the stray.
            assert_eq!(b.text(), "POISON", "across keys");
        } else {
            assert_eq!(b.text(), "/echo/b");
            assert_eq!(c.text(), "/public/c");
        }
        kw.shutdown().await;
    }
}

/// Requests without a key are each client connection's own: a late answer to one
/// anonymous client's request never answers another anonymous client's (one owner for
/// all of them handed a stray answer, and the answer it displaced, to the next client on
/// a public route: 3 of 5 tries in review 71).
#[tokio::test]
async fn a_late_second_answer_to_one_keyless_client_never_reaches_another() {
    let app = spawn_double_answering_app().await;
    let kw = spawn_proxy(app, "workers: 1\n").await;
    let get = |path: &str| {
        let req = format!("GET {path} HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n");
        async move { raw(kw.addr, &req, false).await }
    };
    for i in 0..3 {
        let a = get(&format!("/public/late/{i}")).await;
        assert_eq!(a.text(), format!("/public/late/{i}"));
        // Within the 200 ms before the app's second answer to the first client.
        let b = get(&format!("/public/echo/{i}")).await;
        assert_eq!(
            b.text(),
            format!("/public/echo/{i}"),
            "another client's stray"
        );
    }
    kw.shutdown().await;
}

/// An app that answers a WebSocket handshake by switching to another protocol (`h2c`) would
/// make the tunnel a connection keyward never sees another request of: 502, no tunnel.
#[tokio::test]
async fn a_switch_to_anything_but_websocket_is_502() {
    let switches: [&[u8]; 3] = [
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket, h2c\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\r\n",
    ];
    for switch in switches {
        let replies = both(&[("/ws", switch, false)], |kw, _up| async move {
            let handshake = ws_handshake(SERVICE_KEY)
                .replace("\r\n\r\n", "\r\nconnection: upgrade, close\r\n\r\n");
            vec![raw(kw, &handshake, false).await]
        })
        .await;
        assert_eq!(
            replies[0].status,
            502,
            "{:?}: {:?}",
            String::from_utf8_lossy(switch),
            replies[0]
        );
    }
}

/// A head keyward cannot trust is a 502, never forwarded in part.
#[tokio::test]
async fn a_malformed_or_ambiguous_head_is_502() {
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let too_many = format!("HTTP/1.1 200 OK\r\n{many}content-length: 2\r\n\r\nok");
    // Past the head's bound (8 KiB + 100 x 4 KiB, hyper's): whole in one write, and one
    // that never ends (held open: it was buffered until `upstream_timeout`, without bound).
    let big = "a".repeat(500_000);
    let too_large = format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 2\r\n\r\nok");
    let endless = format!("HTTP/1.1 200 OK\r\nx-endless: {big}{big}");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "/conflicting-lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello".to_vec(),
        ),
        (
            "/two-lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello".to_vec(),
        ),
        (
            "/bad-length",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello".to_vec(),
        ),
        (
            "/te-in-http10",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "/obs-fold",
            b"HTTP/1.1 200 OK\r\nx-a: b\r\n c\r\ncontent-length: 0\r\n\r\n".to_vec(),
        ),
        (
            "/space-before-colon",
            b"HTTP/1.1 200 OK\r\nx-a : b\r\ncontent-length: 0\r\n\r\n".to_vec(),
        ),
        (
            "/bad-status",
            b"HTTP/1.1 99 Low\r\ncontent-length: 0\r\n\r\n".to_vec(),
        ),
        ("/http09", b"hello\r\n\r\n".to_vec()),
        (
            "/unasked-upgrade",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n".to_vec(),
        ),
        ("/too-many-headers", too_many.into_bytes()),
        ("/too-large-head", too_large.into_bytes()),
        ("/endless-head", endless.into_bytes()),
    ];
    for (path, bytes) in &cases {
        let replies = both(&[(path, bytes, false)], |kw, _up| async move {
            vec![
                request(kw, "GET", path).await,
                request(kw, "GET", "/other").await,
            ]
        })
        .await;
        assert_eq!(replies[0].status, 502, "{path}: {:?}", replies[0]);
        assert!(
            replies[0].text().contains("upstream_unavailable"),
            "{path}: {:?}",
            replies[0]
        );
        assert_eq!(replies[1].text(), "next", "{path}");
    }
}

/// A few informational heads before the answer are skipped; past 32 (an app that sends them
/// without end kept a core busy until `upstream_timeout`), the fast client gives up: 502.
#[tokio::test]
async fn informational_heads_are_skipped_up_to_a_bound() {
    let hints = |n: usize| {
        let mut out = "HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n".repeat(n);
        out.push_str("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        out.into_bytes()
    };
    let (few, many) = (hints(3), hints(40));
    let scripts: &[(&str, &[u8], bool)] = &[("/few", &few, false), ("/many", &many, true)];
    let up = Scripted::start(scripts).await;
    let kw = keyward(&up, "fast").await;
    let r = request(kw.addr, "GET", "/few").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let r = request(kw.addr, "GET", "/many").await;
    assert_eq!(r.status, 502, "{r:?}");
    kw.shutdown().await;
}

/// A body that breaks after the head was forwarded cuts the client's response short: the
/// client never sees a complete body that was not.
#[tokio::test]
async fn a_body_that_breaks_midway_is_cut_short_for_the_client() {
    let cases: &[(&str, &[u8])] = &[
        ("/short", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"),
        (
            "/bad-chunk",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nmore\r\n0\r\n\r\n",
        ),
        (
            "/unfinished-chunks",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ),
    ];
    for &(path, bytes) in cases {
        let replies = both(&[(path, bytes, true)], |kw, _up| async move {
            vec![
                request(kw, "GET", path).await,
                request(kw, "GET", "/other").await,
            ]
        })
        .await;
        assert_eq!(replies[0].status, 200, "{path}");
        assert!(!replies[0].whole, "{path}: {:?}", replies[0]);
        assert_eq!(replies[1].text(), "next", "{path}");
    }
}

/// The status line's reason phrase and a HEAD response's length reach the client as the
/// upstream wrote them.
#[tokio::test]
async fn reason_phrase_and_head_length_pass_through() {
    let scripts: &[(&str, &[u8], bool)] = &[
        (
            "/reason",
            b"HTTP/1.1 200 Fine Thanks\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        (
            "/head",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
            false,
        ),
    ];
    let replies = both(scripts, |kw, _up| async move {
        vec![
            request(kw, "GET", "/reason").await,
            request(kw, "HEAD", "/head").await,
        ]
    })
    .await;
    assert!(
        replies[0].head.starts_with("HTTP/1.1 200 Fine Thanks\r\n"),
        "{:?}",
        replies[0]
    );
    assert_eq!(replies[1].header("content-length").as_deref(), Some("10"));
}

/// Read one response off a kept-alive connection, by its framing: a length, chunks, or
/// (neither) to the end of the connection.
async fn read_one(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) {
            let reply = parse(&out[..end], true);
            let body = &out[end..];
            let done = if let Some(len) = reply.header("content-length") {
                len.parse::<usize>().is_ok_and(|n| body.len() >= n)
            } else if reply.header("transfer-encoding").is_some() {
                dechunk(body).1
            } else {
                false
            };
            if done {
                return out;
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return out,
        }
    }
}

/// A client that keeps its connection alive is served by keyward's own server, which must
/// write the status line and framing hyper's server writes: the upstream's reason phrase
/// (a non-canonical one, none at all), and an HTTP/1.0 answer without a length passed on
/// as HTTP/1.1, chunked, on a connection that stays open.
#[tokio::test]
async fn kept_alive_clients_get_the_same_answers_from_either_server() {
    let scripts: &[(&str, &[u8], bool)] = &[
        (
            "/reason",
            b"HTTP/1.1 599 Weird\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        (
            "/no-reason",
            b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        ("/http10", b"HTTP/1.0 200 OK\r\n\r\nuntil the end", true),
    ];
    let up = Scripted::start(scripts).await;
    let mut seen = Vec::new();
    for server in ["fast", "hyper"] {
        let kw = spawn_proxy(up.addr, &format!("http1_server: {server}\n")).await;
        let mut s = TcpStream::connect(kw.addr).await.unwrap();
        let mut replies = Vec::new();
        for path in ["/reason", "/no-reason", "/http10", "/other"] {
            let req =
                format!("GET {path} HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            replies.push(parse(&read_one(&mut s).await, false));
        }
        kw.shutdown().await;
        let lines: Vec<_> = replies
            .iter()
            .map(|r| r.head.lines().next().unwrap_or("").to_string())
            .collect();
        assert_eq!(
            lines,
            [
                "HTTP/1.1 599 Weird",
                "HTTP/1.1 200 ",
                "HTTP/1.1 200 OK",
                "HTTP/1.1 200 OK"
            ],
            "{server}"
        );
        assert_eq!(
            replies[2].header("transfer-encoding").as_deref(),
            Some("chunked"),
            "{server}"
        );
        assert_eq!(replies[2].text(), "until the end", "{server}");
        assert!(replies[2].whole, "{server}");
        assert_eq!(
            replies[3].text(),
            "next",
            "{server}: the connection stayed open"
        );
        seen.push(replies);
    }
    assert_eq!(seen[0], seen[1], "keyward's server and hyper's disagree");
}

/// Read one request head from `s`; `None` at the end of the connection.
async fn read_head(s: &mut TcpStream) -> Option<()> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(())
}

/// An idle pooled connection that receives bytes nobody asked for is finished: it is never
/// used again, however few the bytes. (The fast client's probe read them a byte at a time
/// and reused the connection once they were gone; a response the app wrote later then
/// answered another client's request.) Here the app writes `JUNK` on its idle connection,
/// then answers whatever it is asked next with a stray response.
#[tokio::test]
async fn an_idle_connection_that_receives_bytes_is_never_reused() {
    for client in CLIENTS {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (junk_tx, junk_rx) = tokio::sync::oneshot::channel::<()>();
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut first, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                read_head(&mut first).await?;
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst";
                first.write_all(ok).await.ok()?;
                junk_rx.await.ok()?;
                first.write_all(b"JUNK").await.ok()?;
                sent_tx.send(()).ok()?;
                read_head(&mut first).await?;
                let stray = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nSTRAY";
                first.write_all(stray).await.ok()
            });
            // Every other connection carries one exchange, so the first stays the only
            // pooled one and every later request looks at it first.
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    read_head(&mut s).await?;
                    let next =
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 4\r\n\r\nnext";
                    s.write_all(next).await.ok()
                });
            }
        });
        let kw = spawn_proxy(addr, &format!("workers: 1\nupstream_client: {client}\n")).await;
        assert_eq!(request(kw.addr, "GET", "/first").await.text(), "first");
        junk_tx.send(()).unwrap();
        sent_rx.await.unwrap();
        // No signal says keyward's reactor has seen the bytes arrive: give it a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..8 {
            let r = request(kw.addr, "GET", &format!("/n{i}")).await;
            assert_eq!(r.text(), "next", "{client}: request {i}");
        }
        kw.shutdown().await;
    }
}

/// An upstream that drops a kept-alive connection as the next request reaches it (here with
/// a reset) leaves no answer on it. keyward's own client sends a request that may be
/// repeated (GET) again on a new connection, as nginx and hyper's client do for a reused
/// connection; one that may not (POST) gets its 502. (An app that closed after every
/// answer without saying so got 502 for 7 to 11% of its requests under 8 clients.)
#[tokio::test]
async fn a_reused_connection_reset_under_a_request_is_retried_when_the_method_allows() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                read_head(&mut s).await?;
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst";
                s.write_all(ok).await.ok()?;
                read_head(&mut s).await?;
                // Closed with the request unanswered: a reset, not a clean end.
                s.set_zero_linger().ok()
            });
        }
    });
    let kw = spawn_proxy(addr, "workers: 1\nupstream_client: fast\n").await;
    assert_eq!(request(kw.addr, "GET", "/a").await.text(), "first");
    let again = request(kw.addr, "GET", "/b").await;
    assert_eq!((again.status, again.text().as_str()), (200, "first"));
    // The connection of /b is pooled now; a POST on it is not sent twice.
    let post = request(kw.addr, "POST", "/c").await;
    assert_eq!(post.status, 502, "{post:?}");
    kw.shutdown().await;
}

/// A request body on its way upstream holds an upstream connection for as long as it is
/// being read, whenever the response ends: it counts against `max_in_flight` until then,
/// and a body that goes `limits.body_stall_timeout` without a byte is cut off. (Counted
/// only until the response ended, bodies announced and never sent to an app that answers
/// without reading them held upstream connections past `max_in_flight`, until the file
/// descriptors ran out.)
#[tokio::test]
async fn a_body_still_being_read_holds_its_slot_until_it_stalls() {
    let up = Scripted::start(&[]).await;
    let kw = spawn_proxy(
        up.addr,
        "workers: 1\nlimits: { max_in_flight: 1, body_stall_timeout: 700ms }\n",
    )
    .await;
    // A body announced and never sent; the app answers without reading it.
    let mut pending = TcpStream::connect(kw.addr).await.unwrap();
    let head = format!(
        "POST /answers HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\ncontent-length: 1000\r\n\r\n"
    );
    pending.write_all(head.as_bytes()).await.unwrap();
    assert!(read_head(&mut pending).await.is_some(), "answered");
    let held = request(kw.addr, "GET", "/other").await;
    assert_eq!(held.status, 502, "the body's slot is held: {}", held.text());
    let started = std::time::Instant::now();
    eventually("the stalled body lets its slot go", || async {
        request(kw.addr, "GET", "/other").await.status == 200
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    kw.shutdown().await;
}

/// A body that stops arriving before the app answered is refused 400 once it has gone
/// `limits.body_stall_timeout` without a byte; one that keeps arriving is forwarded however
/// long it takes, `upstream_timeout` counting from its last byte.
#[tokio::test]
async fn a_stalled_body_is_400_and_a_steady_one_outlasts_upstream_timeout() {
    let up = Scripted::start(&[]).await;
    let kw = spawn_proxy(
        up.addr,
        "workers: 1\nlimits: { upstream_timeout: 1s, body_stall_timeout: 700ms, body_min_rate: 40 }\n",
    )
    .await;
    let start = |len: usize| {
        format!(
            "POST /reads/x HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
        )
    };
    let mut stalled = TcpStream::connect(kw.addr).await.unwrap();
    stalled
        .write_all(format!("{}0123456789", start(100)).as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut out)).await;
    let r = parse(&out, false);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("bad_request"), "{}", r.text());

    let mut steady = TcpStream::connect(kw.addr).await.unwrap();
    steady.write_all(start(120).as_bytes()).await.unwrap();
    for _ in 0..12 {
        steady.write_all(b"0123456789").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), steady.read_to_end(&mut out)).await;
    let r = parse(&out, false);
    assert_eq!(
        r.status,
        200,
        "a 2.4 s upload with upstream_timeout 1s: {}",
        r.text()
    );
    kw.shutdown().await;
}

/// A byte now and then resets the stall bound, so a body trickled below
/// `limits.body_min_rate` (to a public route, no key needed) would hold its upstream
/// connection and `max_in_flight` slot for good: it is refused 400 once its first
/// `body_stall_timeout` is spent.
#[tokio::test]
async fn a_trickled_body_is_cut_once_below_the_minimum_rate() {
    let up = Scripted::start(&[]).await;
    let kw = spawn_proxy(
        up.addr,
        "workers: 1\nlimits: { max_in_flight: 1, body_stall_timeout: 700ms, body_min_rate: 40 }\n",
    )
    .await;
    let mut trickle = TcpStream::connect(kw.addr).await.unwrap();
    let head = format!(
        "POST /reads/x HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\ncontent-length: 1000\r\nconnection: close\r\n\r\n"
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    // A byte every 200 ms (5 bytes/s): never a 700 ms gap.
    while started.elapsed() < Duration::from_secs(6) {
        if trickle.write_all(b"x").await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), trickle.read_buf(&mut out)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            _ => {}
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), trickle.read_to_end(&mut out)).await;
    let r = parse(&out, false);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Its slot is free again.
    assert_eq!(request(kw.addr, "GET", "/other").await.status, 200);
    kw.shutdown().await;
}

/// A body being uploaded before the answer counts once, with its request: two uploads at
/// once fit `max_in_flight: 2` (each counted twice, the second was refused 502).
#[tokio::test]
async fn an_upload_counts_once_against_max_in_flight() {
    let up = Scripted::start(&[]).await;
    let kw = spawn_proxy(up.addr, "workers: 1\nlimits: { max_in_flight: 2 }\n").await;
    let head = format!(
        "POST /reads/x HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\ncontent-length: 20\r\nconnection: close\r\n\r\n"
    );
    let mut uploads = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(kw.addr).await.unwrap();
        s.write_all(format!("{head}0123456789").as_bytes())
            .await
            .unwrap();
        uploads.push(s);
    }
    // Both are in flight, half sent, before either finishes.
    eventually("both heads reached the app", || async {
        up.connections().len() == 2
    })
    .await;
    for mut s in uploads {
        s.write_all(b"0123456789").await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let r = parse(&out, false);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    kw.shutdown().await;
}

/// A response head is read up to 64 KiB, by either client (Envoy's limit is 60 KiB): a
/// longer one is 502. hyper's default, 408 KB, let an app that stalls inside a long head
/// make keyward hold that much for each request in flight.
#[tokio::test]
async fn a_response_head_over_64_kib_is_502_on_either_client() {
    let head = |kb: usize| {
        let mut h = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n".to_vec();
        for i in 0..kb {
            h.extend(format!("x-filler-{i:03}: {}\r\n", "v".repeat(1000)).as_bytes());
        }
        h.extend(b"\r\nok");
        h
    };
    let (fits, over) = (head(60), head(66));
    let scripts: &[(&str, &[u8], bool)] = &[("/fits", &fits, false), ("/over", &over, false)];
    for client in CLIENTS {
        let up = Scripted::start(scripts).await;
        let kw = keyward(&up, client).await;
        let r = request(kw.addr, "GET", "/fits").await;
        assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "{client}");
        assert_eq!(
            request(kw.addr, "GET", "/over").await.status,
            502,
            "{client}"
        );
        kw.shutdown().await;
    }
}

/// An HTTP/2 client's upload that the app answered without reading (a 413 or 401 of its
/// own, say) is given up once the answer is delivered: h2 resets the stream with
/// `NO_ERROR` (RFC 9113 8.1: stop sending, keep the answer). Before, the client's window
/// was never granted again and its stream stayed open for as long as the app kept its
/// socket (review 71: past 75 s, the client spinning); over HTTP/1.1 the client's
/// connection closes after such an answer.
#[tokio::test]
async fn an_h2_upload_the_app_answered_unread_is_reset_with_no_error() {
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = app.accept().await {
            let _ = read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            // Open, never read again.
            held.push(s);
        }
    });
    let kw = spawn_proxy(addr, "").await;
    let tcp = TcpStream::connect(kw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!("http://{}/upload", kw.addr))
        .header("x-api-key", SERVICE_KEY)
        .header("content-length", "50000000")
        .body(())
        .unwrap();
    let (resp, mut body) = client.send_request(req, false).unwrap();
    let sender = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![b'x'; 16384]);
        loop {
            body.reserve_capacity(chunk.len());
            match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                Some(Ok(n)) if n > 0 => {
                    if body.send_data(chunk.slice(..n), false).is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        std::future::poll_fn(|cx| body.poll_reset(cx)).await
    });
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut answer = resp.into_body();
    let data = answer.data().await.unwrap().unwrap();
    assert_eq!(&data[..], b"ok");
    let reset = tokio::time::timeout(Duration::from_secs(5), sender)
        .await
        .expect("the stream is reset once the answer is delivered")
        .unwrap();
    assert_eq!(reset.unwrap(), h2::Reason::NO_ERROR);
}

/// A client connection's own upstream connections (those its requests without a key
/// used) close with it: a client with no key opening one connection after another left
/// one idle upstream connection each in the pool until its idle timeout, and 256 of them
/// held every worker of an app that serves 256 connections (review 72: keyed requests got
/// 504).
#[tokio::test]
async fn a_keyless_client_connection_takes_its_upstream_connections_with_it() {
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = app.local_addr().unwrap();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = open.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            let open = counted.clone();
            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                while read_head(&mut s).await.is_some() {
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        break;
                    }
                }
                open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    let kw = spawn_proxy(addr, "workers: 1\n").await;
    for i in 0..40 {
        let req = format!("GET /public/{i} HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n");
        assert_eq!(raw(kw.addr, &req, false).await.status, 200);
    }
    eventually(
        "the app's connections close with their clients'",
        || async { open.load(std::sync::atomic::Ordering::SeqCst) <= 2 },
    )
    .await;
    kw.shutdown().await;
}
