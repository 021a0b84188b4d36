//! Front-door test harness: a real recording upstream on loopback, a real keyward on
//! `127.0.0.1:0` in front of it, and plain HTTP clients (hyper, or raw bytes over TCP).
//! Submodules: `child` (the real binary as a child process), `config` (a typed config
//! builder), `prom` (a Prometheus text parser), `promql` (a PromQL scanner) and `promtool`.
#![allow(dead_code)]

pub mod child;
pub mod config;
pub mod prom;
pub mod promql;
pub mod promtool;
pub mod unix_upstream;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub use keyward::demo::DEMO_ADMIN_TOKEN;

pub const SERVICE_KEY: &str = "sta_demo_service_key_0123456789abcdef";
pub const ENTERPRISE_KEY: &str = "ste_demo_enterprise_key_0123456789abcdef";
pub const PERSONAL_KEY: &str = "pat_demo_personal_key_0123456789abcdef";
pub const DISABLED_KEY: &str = "sta_demo_disabled_key_0123456789abcdef";
pub const EXPIRED_KEY: &str = "sta_demo_expired_key_0123456789abcdef";
pub const STAGING_KEY: &str = "sta_demo_staging_key_0123456789abcdef";
pub const DEMO_KEYS: &str = include_str!("../../config/keys.yaml");

#[allow(unused_imports)]
pub use upstream::{spawn_upstream, upstream, Reply, Seen, Upstream, UpstreamBuilder};

/// A keyward instance running in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub app: Arc<keyward::App>,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn keys_file(&self) -> PathBuf {
        self.dir.path().join("keys.yaml")
    }

    /// Trigger shutdown, wait for `run` to return, then for the app to be dropped: it
    /// holds `keys.control.state_file`'s lock, and a restart on the same state file must
    /// find it free. `run` aborts its background tasks as it returns, and an aborted task
    /// lets go of the app only when the runtime next polls it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let app = Arc::downgrade(&self.app);
        drop(self);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the app is still referenced 10 s after shutdown"
            );
            tokio::task::yield_now().await;
        }
    }
}

/// The test config: loopback listeners on port 0, the given upstream, a temp copy of the
/// demo keys, and `extra` YAML merged over it (see [`config::ConfigBuilder`]).
pub fn config_yaml(upstream: SocketAddr, keys_file: &std::path::Path, extra: &str) -> String {
    config::ConfigBuilder::new(upstream, keys_file)
        .extra(extra)
        .yaml()
}

/// Start keyward in front of `upstream` with the demo keys; `extra` adds config fields.
pub async fn spawn_proxy(upstream: SocketAddr, extra: &str) -> Proxy {
    spawn_proxy_with(upstream, extra, Some(DEMO_KEYS)).await
}

/// Like [`spawn_proxy`], with a chosen key file content (`None`: no file at all).
pub async fn spawn_proxy_with(upstream: SocketAddr, extra: &str, keys: Option<&str>) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.yaml");
    if let Some(k) = keys {
        std::fs::write(&keys_file, k).unwrap();
    }
    let config = config::ConfigBuilder::new(upstream, &keys_file)
        .extra(extra)
        .config();
    start(config, dir).await
}

/// Start keyward from a ready config (which may point into `dir`).
pub async fn start(config: keyward::config::Config, dir: tempfile::TempDir) -> Proxy {
    let server = keyward::Keyward::bind(config).await.expect("keyward binds");
    run_bound(server, dir)
}

/// Run a bound keyward (for a test whose start may be refused: it binds itself).
pub fn run_bound(server: keyward::Keyward, dir: tempfile::TempDir) -> Proxy {
    let addr = server.local_addr();
    let admin = server.admin_addr();
    let app = server.app.clone();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Proxy {
        addr,
        admin,
        app,
        dir,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 client (pooled), for well-formed requests.
pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Send a request with headers and an optional body; read the whole response.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Got {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
    let resp = client().request(req).await.expect("request");
    read(resp).await
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Got {
    send("GET", url, headers, b"").await
}

pub async fn read(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// An h2c (prior knowledge) GET.
pub async fn get_h2c(url: &str, headers: &[(&str, &str)]) -> Got {
    send_h2c("GET", url, headers).await
}

/// An h2c (prior knowledge) request without a body.
pub async fn send_h2c(method: &str, url: &str, headers: &[(&str, &str)]) -> Got {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client
        .request(b.body(Empty::new()).unwrap())
        .await
        .expect("h2c request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    read(resp).await
}

/// Write raw bytes on a fresh connection and read until the server closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Read one whole response whose body has a `content-length` (what keyward and the test
/// upstream send for a GET), however the bytes arrive; panics if the peer closes first.
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if len.is_some_and(|n| body.len() >= n) {
                return text;
            }
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before a whole response: {text:?}");
        out.extend_from_slice(&buf[..n]);
    }
}

/// Read until a whole response head has arrived; `None` if the peer closes first. Bytes
/// after the head (a body, tunnelled data) may come with it.
pub async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A WebSocket handshake for the test upstream's `/ws`, presenting `key`.
pub fn ws_handshake(key: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nhost: app\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nx-api-key: {key}\r\n\r\n"
    )
}

/// The status code of the first response in a raw HTTP/1.1 reply.
pub fn raw_status(reply: &str) -> u16 {
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A WebSocket through keyward at `addr` to `up`'s `/ws` echo: a wrong key's handshake is
/// refused with 401 before the upstream sees anything; the service key's switches
/// protocols and `message` comes back through the tunnel. Returns what the upstream saw.
pub async fn websocket_round_trip(addr: SocketAddr, up: &Upstream, message: &[u8]) -> Seen {
    let wrong = ws_handshake("sta_wrong_key_00000000000");
    let reply = raw(addr, wrong.as_bytes(), Duration::from_secs(2)).await;
    assert_eq!(raw_status(&reply), 401);
    assert_eq!(up.count(), 0);

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(ws_handshake(SERVICE_KEY).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s)
        .await
        .expect("closed during handshake")
        .to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(message).await.unwrap();
    let mut echoed = vec![0u8; message.len()];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, message);
    up.last()
}

/// The admin bearer header.
pub fn admin_auth() -> String {
    format!("Bearer {DEMO_ADMIN_TOKEN}")
}

/// Wait (bounded) until `cond` holds, polling; for state with no push signal, such as a
/// file watcher picking up a change. The bound is generous: on two cores shared with the
/// rest of the suite a background task can wait seconds for its turn, and a passing test
/// returns as soon as the state is there.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Replace a file the way a careful writer (and the kubelet) does: write aside, rename.
pub fn replace_file(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A loopback address nothing listens on (bound, then released): an upstream that refuses.
pub fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The status `key` gets on a protected path.
pub async fn status_with(kw: &Proxy, key: &str) -> u16 {
    get(&kw.url("/v1/x"), &[("x-api-key", key)])
        .await
        .status
        .as_u16()
}

/// The value of one series (name and labels as exposed, then a space) on `/metrics`; 0 when
/// it is absent.
pub async fn metric_value(kw: &Proxy, series: &str) -> f64 {
    let text = get(&kw.admin_url("/metrics"), &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A stream whose response body can never be sent: the client advertised a zero window.
pub struct Stalled {
    pub status: u16,
    /// Ends when keyward closes the connection.
    pub conn: tokio::task::JoinHandle<()>,
    /// The client and the unread body, kept so that the client itself closes nothing.
    _held: (h2::client::SendRequest<Bytes>, h2::RecvStream),
}

/// An HTTP/2 client that advertises `INITIAL_WINDOW_SIZE = 0`, so no response body can
/// ever be sent to it, sends one GET and waits for the response head.
pub async fn zero_window_get(addr: SocketAddr, path: &str, key: Option<&str>) -> Stalled {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let (resp, _) = client
        .send_request(req.body(()).unwrap(), true)
        .expect("send");
    let resp = resp.await.expect("response head");
    Stalled {
        status: resp.status().as_u16(),
        conn,
        _held: (client, resp.into_body()),
    }
}
