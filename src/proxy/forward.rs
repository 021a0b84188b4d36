//! The upstream leg: one pooled keep-alive client, the forwarded request, the returned
//! response, and upgrade tunnels.

use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::Body;
use crate::config::Limits;
use crate::metrics::UpstreamErrorKind;

/// Why the upstream leg failed; the status follows from it (connect → 502, timeout → 504).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream connect failed: {0}")]
    Connect(String),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream exchange failed: {0}")]
    Other(String),
    /// The client's request body failed while it was streamed upstream: the client's fault
    /// (400), not the upstream's.
    #[error("request body from the client failed: {0}")]
    RequestBody(String),
}

impl ProxyError {
    pub fn kind(&self) -> UpstreamErrorKind {
        match self {
            ProxyError::Connect(_) => UpstreamErrorKind::Connect,
            ProxyError::Timeout(_) => UpstreamErrorKind::Timeout,
            ProxyError::Other(_) | ProxyError::RequestBody(_) => UpstreamErrorKind::Other,
        }
    }

    /// Did the upstream fail (counted and logged as an upstream error), or the client?
    pub fn is_upstream_fault(&self) -> bool {
        !matches!(self, ProxyError::RequestBody(_))
    }

    pub fn reject(&self) -> crate::auth::Reject {
        match self {
            ProxyError::Timeout(_) => crate::auth::Reject::UpstreamTimeout,
            ProxyError::RequestBody(_) => {
                crate::auth::Reject::BadRequest(crate::auth::reject::BadRequest::Body)
            }
            _ => crate::auth::Reject::UpstreamUnavailable,
        }
    }
}

type UpstreamClient = Client<HttpConnector, Incoming>;

static NEXT_UPSTREAM_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// One pool per worker thread: a pooled connection is then driven by the same thread
    /// that uses it, so forwarding a request wakes no other thread.
    static CLIENTS: std::cell::RefCell<Vec<(u64, UpstreamClient)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The app behind keyward, and the clients that reach it (one pool per worker thread).
pub struct Upstream {
    id: u64,
    authority: Authority,
    limits: Limits,
    timeout: Duration,
}

impl Upstream {
    pub fn new(uri: &Uri, limits: &Limits) -> Self {
        Self {
            id: NEXT_UPSTREAM_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            authority: uri
                .authority()
                .cloned()
                .unwrap_or_else(|| Authority::from_static("127.0.0.1")),
            limits: limits.clone(),
            timeout: limits.upstream_timeout,
        }
    }

    /// This thread's client for this upstream, built on first use.
    fn client(&self) -> UpstreamClient {
        CLIENTS.with(|c| {
            let mut clients = c.borrow_mut();
            if let Some((_, client)) = clients.iter().find(|(id, _)| *id == self.id) {
                return client.clone();
            }
            let client = build_client(&self.limits);
            clients.push((self.id, client.clone()));
            client
        })
    }

    /// The absolute URI the client needs: upstream authority + the normalized path + query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
        let pq = match query {
            Some(q) if !q.is_empty() => PathAndQuery::try_from(format!("{path}?{q}")),
            _ => PathAndQuery::try_from(path),
        }
        .map_err(|e| ProxyError::Other(format!("bad target: {e}")))?;
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| ProxyError::Other(format!("bad target: {e}")))
    }

    /// Send the prepared request; the response head must arrive within `upstream_timeout`.
    /// Returns the response and the time to its head.
    pub async fn send(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Duration), ProxyError> {
        *req.version_mut() = Version::HTTP_11;
        let start = Instant::now();
        match tokio::time::timeout(self.timeout, self.client().request(req)).await {
            Err(_) => Err(ProxyError::Timeout(self.timeout)),
            Ok(Err(e)) if e.is_connect() => Err(ProxyError::Connect(error_chain(&e))),
            Ok(Err(e)) if request_body_failed(&e) => Err(ProxyError::RequestBody(error_chain(&e))),
            Ok(Err(e)) => Err(ProxyError::Other(error_chain(&e))),
            Ok(Ok(resp)) => Ok((resp, start.elapsed())),
        }
    }
}

/// hyper reports a failing request body as a "user" error whose cause is the error the
/// downstream connection gave while reading that body.
fn request_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut src = Some(e);
    while let Some(err) = src {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_user() {
                let cause = std::error::Error::source(h);
                return cause.is_some_and(|c| c.downcast_ref::<hyper::Error>().is_some());
            }
        }
        src = err.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A pooled keep-alive client with `TCP_NODELAY` and the connect timeout.
fn build_client(limits: &Limits) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(limits.upstream_connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(limits.upstream_idle_timeout)
        .pool_max_idle_per_host(limits.upstream_max_idle_per_host)
        .build(connector)
}

/// Is this an HTTP/1.1 WebSocket handshake (`Connection: upgrade` + `Upgrade: websocket`)?
/// Only WebSocket is tunnelled: any other `Upgrade` (above all `h2c`, which would turn the
/// tunnel into an HTTP/2 connection to the upstream that keyward no longer sees) is dropped
/// with the other hop-by-hop headers and the request is forwarded as plain HTTP/1.1.
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    let mut upgrades = req.headers().get_all(header::UPGRADE).iter();
    let websocket = matches!(
        (upgrades.next(), upgrades.next()),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket")
    );
    req.version() == Version::HTTP_11
        && websocket
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// After a `101` from the upstream, splice the two upgraded connections together.
pub fn spawn_tunnel(downstream: hyper::upgrade::OnUpgrade, upstream_resp: &mut Response<Incoming>) {
    let upstream = hyper::upgrade::on(upstream_resp);
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            debug!(error = %e, "tunnel closed");
        }
    });
}

/// The upstream's response, minus hop-by-hop headers (an upgrade keeps its own).
pub fn downstream_response(resp: Response<Incoming>) -> Response<Body> {
    let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let (mut parts, body) = resp.into_parts();
    super::headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    Response::from_parts(parts, http_body_util::Either::Left(body))
}
