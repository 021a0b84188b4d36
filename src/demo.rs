//! `keyward demo`: the shipped config and demo keys in front of a built-in echo upstream,
//! so a newcomer can see every decision with curl.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::Digest as _;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, LogFormat, UpstreamAddr};

pub const DEMO_CONFIG: &str = include_str!("../config/keyward.yaml");
pub const DEMO_KEYS: &str = include_str!("../config/keys.yaml");
/// The demo admin token (its digest is in the shipped config).
pub const DEMO_ADMIN_TOKEN: &str = "keyward-demo-admin-token";

/// Is `token_sha256` the digest of [`DEMO_ADMIN_TOKEN`]? The shipped example config uses it
/// so the README's curl lines work; anywhere else it is a published password.
pub fn is_demo_token(token_sha256: Option<&str>) -> bool {
    let demo = hex::encode(sha2::Sha256::digest(DEMO_ADMIN_TOKEN.as_bytes()));
    token_sha256.is_some_and(|t| t.eq_ignore_ascii_case(&demo))
}

/// The raw demo keys and what each shows. Demo only: their digests are public.
pub const DEMO_KEY_LIST: &[(&str, &str)] = &[
    (
        "sta_demo_service_key_0123456789abcdef",
        "service account, read+write → 200",
    ),
    (
        "ste_demo_enterprise_key_0123456789abcdef",
        "enterprise key, admin scope, may delegate to 507f1f77bc",
    ),
    (
        "pat_demo_personal_key_0123456789abcdef",
        "personal key, read only → POST is 403 insufficient_scope",
    ),
    (
        "sta_demo_disabled_key_0123456789abcdef",
        "disabled → 401 disabled_api_key",
    ),
    (
        "sta_demo_expired_key_0123456789abcdef",
        "expired → 401 expired_api_key",
    ),
    (
        "sta_demo_staging_key_0123456789abcdef",
        "bound to staging → 401 wrong_environment",
    ),
];

/// An upstream that answers every request with a JSON echo of what it received.
pub async fn spawn_echo(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(echo))
                    .await;
            });
        }
    });
    Ok(local)
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let body = serde_json::json!({
        "upstream": "keyward demo echo",
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers_received": headers,
    });
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// The shipped config pointed at the echo upstream and a copy of the demo keys.
pub fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    keys_file: &Path,
) -> Result<Config, ConfigError> {
    let mut c = Config::from_yaml(DEMO_CONFIG)?;
    c.listen = Some(listen);
    c.admin_listen = admin;
    c.upstream = Some(UpstreamAddr::Http(
        format!("http://{upstream}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| ConfigError::Invalid {
                field: "upstream".into(),
                reason: e.to_string(),
            })?,
    ));
    c.keys.file = Some(keys_file.to_owned());
    c.log.format = LogFormat::Pretty;
    c.shutdown.drain_delay = std::time::Duration::ZERO;
    c.shutdown.grace = std::time::Duration::from_secs(2);
    Ok(c)
}

/// The walkthrough printed at start: every command works as printed.
pub fn instructions(listen: SocketAddr, admin: SocketAddr, keys_file: &Path) -> String {
    let base = format!("http://{listen}");
    let adm = format!("http://{admin}");
    let mut s = String::new();
    s.push_str(&format!(
        "\nkeyward demo: listening on {base} (admin {adm}), echo upstream behind it.\n\
         Demo keys ({} — edit it and keyward reloads within a second):\n",
        keys_file.display()
    ));
    for (key, what) in DEMO_KEY_LIST {
        s.push_str(&format!("  {key}  {what}\n"));
    }
    let svc = DEMO_KEY_LIST[0].0;
    let ent = DEMO_KEY_LIST[1].0;
    let pat = DEMO_KEY_LIST[2].0;
    s.push_str(&format!(
        r#"
Try:
  curl -i {base}/hello                                        # 401 invalid_auth_header
  curl -i -H 'X-API-Key: {svc}' {base}/hello                  # 200, echo shows x-auth-* headers
  curl -i -H 'Authorization: Bearer sta_not_a_real_key_0000' {base}/hello   # 401 invalid_api_key
  curl -i -X POST -H 'Authorization: Token {pat}' {base}/items   # 403 insufficient_scope
  curl -i -H 'X-API-Key: {svc}' {base}/admin/users           # 403 (needs admin scope)
  curl -i -H 'X-API-Key: {ent}' -H 'x-delegate-account-id: 507f1f77bc' {base}/admin/users   # 200, delegated
  curl -i -H 'X-API-Key: {svc}' -H 'X-Auth-Subject-Id: forged' {base}/hello   # forged header is stripped
  curl -i --path-as-is -H 'X-API-Key: {svc}' '{base}/a/../../admin'   # 400 bad_request
  curl -s -H 'X-API-Key: {svc}' {base}/auth                  # introspection
  curl -s {adm}/metrics | grep keyward_requests_total
  curl -s -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' {adm}/v1/snapshot
  curl -s -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' {adm}/v1/keys/usage
Press Ctrl-C to stop.
"#
    ));
    s
}
