//! Differential fuzzing: the fast path against hyper's client on the same byte streams.
//!
//! Each case is one or two scripted upstream responses, generated from HTTP/1.x grammar
//! (status lines, framing headers, chunked bodies, trailers) and then mutated byte by byte,
//! delivered in pieces of random size. Both clients send the same request over an
//! in-memory pipe; the scripted upstream answers each request it reads with the next
//! response, then closes. Both must agree on everything a client of keyward would see:
//! status, version, reason phrase, headers, body bytes, trailers, or that the exchange
//! failed; and on whether a second request on the same connection gets an answer, and
//! which. A case both clients leave waiting for more bytes counts as `Hang` (tokio's clock
//! is paused, so waiting costs nothing).
//!
//! `cargo test h1::differential` runs 4,000 generated cases from a fixed seed; set
//! `KEYWARD_DIFF_CASES` (and `KEYWARD_DIFF_SEED`) for a longer run. `fuzz/` drives the
//! same comparison from libFuzzer's coverage-guided inputs (`Case::from_fuzz`, built with
//! the `fuzzing` feature; see `fuzz/README.md`).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::{Conn, Home};

/// What a client of keyward would see of one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Response {
        status: u16,
        version: http::Version,
        reason: Option<Vec<u8>>,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
        trailers: Option<Vec<(String, Vec<u8>)>>,
    },
    /// The head or the body failed.
    Error,
    /// Still waiting for bytes that will never come.
    Hang,
    /// The second request was not sent: the connection was not reusable.
    NotReused,
}

impl Outcome {
    /// Equal as far as a client is concerned: for the second request, failing on the
    /// connection and not using it both mean no answer came from it.
    fn same(&self, other: &Outcome, second: bool) -> bool {
        let no_answer = |o: &Outcome| matches!(o, Outcome::Error | Outcome::NotReused);
        self == other || (second && no_answer(self) && no_answer(other))
    }
}

/// One or two scripted responses, the request method, and how the bytes are cut up.
#[derive(Debug, Clone)]
pub struct Case {
    method: Method,
    responses: Vec<Vec<u8>>,
    /// Sizes of the pieces each response is written in.
    pieces: Vec<usize>,
}

#[cfg(test)]
/// Deterministic xorshift: no dependency, reproducible from the seed.
pub(crate) struct Rng(pub(crate) u64);

#[cfg(test)]
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

#[cfg(test)]
fn eol(rng: &mut Rng) -> &'static str {
    if rng.chance(4) {
        "\n"
    } else {
        "\r\n"
    }
}

#[cfg(test)]
fn status_line(rng: &mut Rng) -> String {
    let version = rng.pick(&[
        "HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2", "http/1.1", "HTTP/1",
    ]);
    let code = rng.pick(&[
        "200", "200", "200", "204", "304", "100", "103", "101", "206", "404", "500", "999", "000",
        "099", "20", "2000",
    ]);
    let reason = rng.pick(&[
        "OK",
        "OK",
        "",
        "Weird Reason",
        "Not\tOK",
        "\u{80}x",
        " two  spaces",
    ]);
    let sep = if rng.chance(5) { "  " } else { " " };
    format!("{version}{sep}{code} {reason}{}", eol(rng))
}

#[cfg(test)]
const HEADERS: &[&str] = &[
    "content-length: 5",
    "Content-Length: 0",
    "content-length: 10",
    "content-length: 5, 5",
    "content-length: 5,6",
    "content-length: abc",
    "content-length: -1",
    "content-length: +5",
    "content-length:  7 ",
    "content-length: 18446744073709551615",
    "content-length: 00003",
    "content-length:",
    "transfer-encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "transfer-encoding: chunked, gzip",
    "transfer-encoding: identity",
    "transfer-encoding: Chunked",
    "transfer-encoding: chunked ",
    "connection: close",
    "connection: keep-alive",
    "Connection: Keep-Alive, close",
    "connection: upgrade",
    "x-a: b",
    "x-empty:",
    "set-cookie: a=1",
    "set-cookie: b=2",
    "x-tab: a\tb",
    "x-obs: caf\u{e9}",
    "x-fold: a\r\n b",
    "x-space : v",
    "x(bad): v",
    "server: scripted",
    "content-type: application/json",
    "trailer: x-t",
];

#[cfg(test)]
fn chunked_body(rng: &mut Rng) -> String {
    let mut out = String::new();
    for _ in 0..rng.below(4) {
        let len = rng.below(12);
        let data: String = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let size = match rng.below(6) {
            0 => format!("{len:X}"),
            1 => format!("{len:x};ext=1"),
            2 => format!("{len:x} "),
            3 => format!("0{len:x}"),
            4 => format!("{:x}", len + rng.below(3)),
            _ => format!("{len:x}"),
        };
        out.push_str(&format!("{size}{}{data}{}", eol(rng), eol(rng)));
    }
    if rng.chance(85) {
        out.push_str(&format!("0{}", eol(rng)));
        if rng.chance(25) {
            out.push_str(&format!("x-t: 1{}", eol(rng)));
        }
        if rng.chance(90) {
            out.push_str(eol(rng));
        }
    }
    out
}

#[cfg(test)]
/// A response: well-formed half the time (framing that matches its body), hostile
/// otherwise (any framing headers, any body, then mutated bytes).
fn response(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(50) {
        well_formed(rng)
    } else {
        hostile(rng)
    }
}

#[cfg(test)]
fn well_formed(rng: &mut Rng) -> Vec<u8> {
    let version = if rng.chance(85) {
        "HTTP/1.1"
    } else {
        "HTTP/1.0"
    };
    let code: &str = rng.pick(&["200", "200", "201", "204", "304", "404", "500", "100"]);
    let mut s = format!("{version} {code} OK\r\n");
    if code == "100" {
        s.push_str("\r\nHTTP/1.1 200 OK\r\n");
    }
    for _ in 0..rng.below(3) {
        let h: &str = rng.pick(&[
            "x-a: b",
            "set-cookie: a=1",
            "server: s",
            "connection: keep-alive",
            "connection: close",
        ]);
        s.push_str(h);
        s.push_str("\r\n");
    }
    let body: String = (0..rng.below(40))
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    match rng.below(3) {
        0 if version == "HTTP/1.1" => {
            s.push_str("transfer-encoding: chunked\r\n\r\n");
            if !body.is_empty() {
                s.push_str(&format!("{:x}\r\n{body}\r\n", body.len()));
            }
            s.push_str("0\r\n");
            if rng.chance(20) {
                s.push_str("x-t: 1\r\n");
            }
            s.push_str("\r\n");
        }
        1 => s.push_str(&format!("\r\n{body}")),
        _ => s.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len())),
    }
    s.into_bytes()
}

#[cfg(test)]
fn hostile(rng: &mut Rng) -> Vec<u8> {
    let mut s = status_line(rng);
    for _ in 0..rng.below(5) {
        let header: &str = rng.pick(HEADERS);
        s.push_str(header);
        s.push_str(eol(rng));
    }
    s.push_str(eol(rng));
    if s.to_ascii_lowercase().contains("chunked") && rng.chance(80) {
        s.push_str(&chunked_body(rng));
    } else {
        s.push_str(&"0123456789abc"[..rng.below(14)]);
    }
    let mut bytes = s.into_bytes();
    if rng.chance(30) {
        for _ in 0..1 + rng.below(3) {
            mutate(rng, &mut bytes);
        }
    }
    bytes
}

#[cfg(test)]
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let at = rng.below(bytes.len() + 1);
    match rng.below(5) {
        0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
        1 if at < bytes.len() => {
            bytes.remove(at);
        }
        2 => bytes.truncate(at),
        _ => {
            let b = rng.pick(b"\r\n :;0a\t\x00\x7f\xff");
            bytes.insert(at, b);
        }
    }
}

#[cfg(test)]
fn case(rng: &mut Rng) -> Case {
    let method = if rng.chance(15) {
        Method::HEAD
    } else {
        Method::GET
    };
    let mut responses = vec![response(rng)];
    if rng.chance(50) {
        responses.push(if rng.chance(50) {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
        } else {
            response(rng)
        });
    }
    let pieces = (0..8).map(|_| 1 + rng.below(24)).collect();
    Case {
        method,
        responses,
        pieces,
    }
}

/// The scripted upstream: reads a request head, writes the next response in pieces, and
/// closes after the last. `written` counts the responses written in full.
async fn upstream(mut io: DuplexStream, case: Case, written: Arc<Mutex<usize>>) {
    for response in &case.responses {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            match io.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => return,
            }
        }
        let mut rest = &response[..];
        let mut piece = case.pieces.iter().cycle();
        while !rest.is_empty() {
            let n = (*piece.next().unwrap_or(&1)).min(rest.len());
            if io.write_all(&rest[..n]).await.is_err() {
                return;
            }
            rest = &rest[n..];
            tokio::task::yield_now().await;
        }
        *written.lock().unwrap() += 1;
    }
    let _ = io.shutdown().await;
    // Hold the pipe open until the client lets go, as a socket would.
    let mut sink = Vec::new();
    let _ = io.read_to_end(&mut sink).await;
}

fn pairs(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// Collect a response into an outcome, within a (virtual) deadline.
async fn outcome<B>(resp: http::Response<B>) -> Outcome
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    let mut trailers = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
            Err(_) => return Outcome::Hang,
            Ok(None) => break,
            Ok(Some(Err(_))) => return Outcome::Error,
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(pairs(&t));
                    }
                }
            },
        }
    }
    Outcome::Response {
        status: parts.status.as_u16(),
        version: parts.version,
        reason: parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| r.as_bytes().to_vec()),
        headers: pairs(&parts.headers),
        body: data,
        trailers,
    }
}

/// Let every task run until all wait (the clock is paused: this costs no time).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

async fn via_hyper(case: &Case) -> (Outcome, Outcome) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let written = Arc::new(Mutex::new(0));
    let up = tokio::spawn(upstream(server, case.clone(), written.clone()));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client))
            .await
            .expect("handshake over a pipe");
    let driver = tokio::spawn(conn);
    let request = |method: &Method| {
        Request::builder()
            .method(method.clone())
            .uri("/")
            .header("host", "upstream")
            .body(Empty::new())
            .expect("request")
    };
    let mut exchange = |method: Method| {
        let req = request(&method);
        let sent = sender.send_request(req);
        async move {
            match tokio::time::timeout(Duration::from_secs(30), sent).await {
                Err(_) => Outcome::Hang,
                Ok(Err(_)) => Outcome::Error,
                Ok(Ok(resp)) => outcome(resp).await,
            }
        }
    };
    let first = exchange(case.method.clone()).await;
    let second = if case.responses.len() < 2 {
        Outcome::NotReused
    } else {
        settle().await;
        match tokio::time::timeout(Duration::from_secs(30), sender.ready()).await {
            Ok(Ok(())) if sender.is_ready() => {
                let req = request(&Method::GET);
                match tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await
                {
                    Err(_) => Outcome::Hang,
                    Ok(Err(_)) => Outcome::Error,
                    Ok(Ok(resp)) => outcome(resp).await,
                }
            }
            _ => Outcome::NotReused,
        }
    };
    drop(sender);
    driver.abort();
    up.abort();
    (first, second)
}

/// The fast path's pool, for one connection.
#[derive(Clone, Default)]
struct Slot(Arc<Mutex<Option<Box<Conn<DuplexStream>>>>>);

impl Home<DuplexStream> for Slot {
    fn take_back(self, conn: Box<Conn<DuplexStream>>) {
        *self.0.lock().unwrap() = Some(conn);
    }
}

impl Conn<DuplexStream> {
    /// The pool's check before reuse: nothing to read, not closed.
    fn idle_and_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(self.poll_fill(&mut cx), Poll::Pending)
    }
}

async fn fast_exchange(mut conn: Box<Conn<DuplexStream>>, method: &Method, slot: &Slot) -> Outcome {
    let mut headers = HeaderMap::new();
    headers.insert("host", "upstream".parse().expect("value"));
    if conn.send_head(method, "/", &headers).await.is_err() {
        return Outcome::Error;
    }
    let read = tokio::time::timeout(
        Duration::from_secs(30),
        conn.read_head(method, &mut headers),
    )
    .await;
    match read {
        Err(_) => Outcome::Hang,
        Ok(Err(_) | Ok(None)) => Outcome::Error,
        Ok(Ok(Some((head, ready)))) => {
            outcome(super::response(conn, head, ready, slot.clone())).await
        }
    }
}

async fn via_fast(case: &Case) -> (Outcome, Outcome) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let written = Arc::new(Mutex::new(0));
    let up = tokio::spawn(upstream(server, case.clone(), written.clone()));
    let slot = Slot::default();
    let first = fast_exchange(Conn::new(client), &case.method, &slot).await;
    let second = if case.responses.len() < 2 {
        Outcome::NotReused
    } else {
        settle().await;
        let conn = slot.0.lock().unwrap().take();
        match conn {
            Some(mut conn) => match conn.idle_and_open() {
                true => fast_exchange(conn, &Method::GET, &Slot::default()).await,
                false => Outcome::NotReused,
            },
            None => Outcome::NotReused,
        }
    };
    up.abort();
    (first, second)
}

fn show(bytes: &[Vec<u8>]) -> Vec<String> {
    bytes
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect()
}

/// Run `case` through both clients, each on a fresh runtime with a paused clock (nothing
/// one leaves behind can touch the other). `Err` describes the disagreement.
pub fn check(case: &Case) -> Result<Kind, String> {
    let run = |f: std::pin::Pin<Box<dyn std::future::Future<Output = (Outcome, Outcome)> + '_>>| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
            .block_on(f)
    };
    let (h1, h2) = run(Box::pin(via_hyper(case)));
    let (f1, f2) = run(Box::pin(via_fast(case)));
    if !(h1.same(&f1, false) && h2.same(&f2, true)) {
        return Err(format!(
            "{:?} {:?} pieces {:?}\nhyper: {h1:?} / {h2:?}\nfast:  {f1:?} / {f2:?}",
            case.method,
            show(&case.responses),
            case.pieces,
        ));
    }
    Ok(match (&h1, &h2) {
        (Outcome::Response { .. }, Outcome::Response { .. }) => "response, reused",
        (Outcome::Response { .. }, _) => "response",
        (Outcome::Error, _) => "error",
        (Outcome::Hang, _) => "hang",
        (Outcome::NotReused, _) => "not reused",
    })
}

/// What the first exchange of an agreed case came to.
pub type Kind = &'static str;

impl Case {
    /// A case from raw fuzzer bytes: the first byte picks the method and whether a second
    /// request follows, the next four the piece sizes, and the rest is the response bytes
    /// (a second response after the first `\0\0`, when there is one).
    pub fn from_fuzz(data: &[u8]) -> Option<Case> {
        let (&flags, rest) = data.split_first()?;
        let (sizes, body) = rest.split_at_checked(4)?;
        let method = if flags & 1 == 1 {
            Method::HEAD
        } else {
            Method::GET
        };
        let mut responses = match body.windows(2).position(|w| w == b"\0\0") {
            Some(at) if flags & 2 == 2 => vec![body[..at].to_vec(), body[at + 2..].to_vec()],
            _ => vec![body.to_vec()],
        };
        responses.retain(|r| !r.is_empty());
        if responses.is_empty() {
            return None;
        }
        let pieces = sizes.iter().map(|&s| 1 + usize::from(s % 64)).collect();
        Some(Case {
            method,
            responses,
            pieces,
        })
    }
}

/// Run generated cases until one disagrees (a panic naming it and the seed), then check
/// the generator reached every kind of outcome in `expected` (or it tests little). The
/// count and seed come from `{env}_CASES` and `{env}_SEED` when set.
#[cfg(test)]
pub(crate) fn run_generated<C>(
    env: &str,
    (cases, seed): (usize, u64),
    generate: impl Fn(&mut Rng) -> C,
    check: impl Fn(&C) -> Result<&'static str, String>,
    expected: &[&str],
) {
    let var = |name: &str| std::env::var(format!("{env}_{name}")).ok();
    let cases: usize = var("CASES").and_then(|v| v.parse().ok()).unwrap_or(cases);
    let seed: u64 = var("SEED").and_then(|v| v.parse().ok()).unwrap_or(seed);
    let mut rng = Rng(seed | 1);
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..cases {
        let case = generate(&mut rng);
        match check(&case) {
            Ok(kind) => *kinds.entry(kind).or_default() += 1,
            Err(e) => panic!("case {i} (seed {seed}) {e}"),
        }
    }
    eprintln!("{cases} cases agree: {kinds:?}");
    for kind in expected {
        assert!(
            kinds.get(kind).copied().unwrap_or(0) > cases / 100,
            "{kind}: {kinds:?}"
        );
    }
}

#[cfg(test)]
#[test]
fn the_fast_path_reads_every_stream_as_hypers_client_does() {
    run_generated(
        "KEYWARD_DIFF",
        (4000, 7_955_017_551_384_324),
        case,
        check,
        &["response, reused", "response", "error", "hang"],
    );
}
