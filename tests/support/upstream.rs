//! A real HTTP upstream on loopback, built route by route:
//!
//! ```ignore
//! let up = upstream().route("/slow", Reply::After(Duration::from_secs(2))).spawn().await;
//! ```
//!
//! Every request is recorded ([`Seen`]). A path with no route (the path without its query,
//! matched exactly) answers 200 with `upstream ok, body_len=N`, N being the request body's
//! length, which the upstream reads through without holding it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a route answers. Every 200 carries two `set-cookie` headers and `x-upstream: yes`.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with `upstream ok, body_len=N`.
    Ok,
    /// Wait this long after reading the request, then answer as [`Reply::Ok`].
    After(Duration),
    /// 200 with a body of this many bytes.
    Bytes(usize),
    /// 101: accept the HTTP upgrade, then echo every byte back.
    UpgradeEcho,
    /// As [`Reply::Ok`], with the app's own quota and correlation ids
    /// (`ratelimit-limit: 999`, `ratelimit-remaining: 998`, `x-correlation-id` and
    /// `x-request-id`: `app-made`).
    OwnHeaders,
}

/// Routes for an upstream, by exact path.
#[derive(Debug, Clone, Default)]
pub struct UpstreamBuilder {
    pub(super) routes: Vec<(String, Reply)>,
}

/// An upstream with no routes of its own; see [`spawn_upstream`] for the usual one.
pub fn upstream() -> UpstreamBuilder {
    UpstreamBuilder::default()
}

/// The usual upstream: `/ws` accepts a WebSocket upgrade and echoes; everything else is
/// [`Reply::Ok`].
pub async fn spawn_upstream() -> Upstream {
    upstream().route("/ws", Reply::UpgradeEcho).spawn().await
}

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body_len: usize,
    /// How many data frames the body came in (hyper's: about one per chunk, or per read).
    pub body_frames: usize,
    /// The upstream connection it came on (keyward's side of it).
    pub peer: SocketAddr,
}

/// A running upstream: its address and what it has seen.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.requests()
            .last()
            .cloned()
            .expect("upstream saw no request")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl UpstreamBuilder {
    /// Answer requests for `path` (exactly, query aside) with `reply`.
    pub fn route(mut self, path: &str, reply: Reply) -> Self {
        self.routes.push((path.to_string(), reply));
        self
    }

    pub async fn spawn(self) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let routes = Arc::new(self.routes);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                tokio::spawn(serve_conn(stream, seen2.clone(), routes.clone(), peer));
            }
        });
        Upstream { addr, seen }
    }
}

/// Serve one accepted connection (TCP or a Unix socket), recording what it carries as
/// coming from `peer`.
pub(super) async fn serve_conn<I>(
    io: I,
    seen: Arc<Mutex<Vec<Seen>>>,
    routes: Arc<Vec<(String, Reply)>>,
    peer: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(seen.clone(), routes.clone(), peer, req));
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

async fn handle(
    seen: Arc<Mutex<Vec<Seen>>>,
    routes: Arc<Vec<(String, Reply)>>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let reply = routes
        .iter()
        .find(|(path, _)| path == req.uri().path())
        .map_or(Reply::Ok, |(_, r)| r.clone());
    let method = req.method().to_string();
    let headers = req.headers().clone();
    if let Reply::UpgradeEcho = reply {
        let on = hyper::upgrade::on(&mut req);
        seen.lock().unwrap().push(Seen {
            method,
            target,
            headers,
            body_len: 0,
            body_frames: 0,
            peer,
        });
        tokio::spawn(echo(on));
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
        return Ok(resp);
    }
    // Stream the body through, counting it, without holding it all.
    let (mut body_len, mut body_frames) = (0, 0);
    let mut body = req.into_body();
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            body_len += d.len();
            body_frames += 1;
        }
    }
    seen.lock().unwrap().push(Seen {
        method,
        target,
        headers,
        body_len,
        body_frames,
        peer,
    });
    let body = match reply {
        Reply::Bytes(n) => Bytes::from(vec![b'x'; n]),
        Reply::After(wait) => {
            tokio::time::sleep(wait).await;
            ok_body(body_len)
        }
        Reply::Ok | Reply::UpgradeEcho | Reply::OwnHeaders => ok_body(body_len),
    };
    let mut resp = Response::builder()
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2")
        .header("x-upstream", "yes");
    if matches!(reply, Reply::OwnHeaders) {
        resp = resp
            .header("ratelimit-limit", "999")
            .header("ratelimit-remaining", "998")
            .header("x-correlation-id", "app-made")
            .header("x-request-id", "app-made");
    }
    let resp = resp.body(Full::new(body)).unwrap();
    Ok(resp)
}

fn ok_body(body_len: usize) -> Bytes {
    Bytes::from(format!("upstream ok, body_len={body_len}"))
}

/// Echo bytes over an upgraded connection until either side closes.
async fn echo(on: hyper::upgrade::OnUpgrade) {
    if let Ok(up) = on.await {
        let mut io = TokioIo::new(up);
        let mut buf = [0u8; 1024];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }
}
