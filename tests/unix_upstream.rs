//! `upstream: unix:/path`: the app listens on a socket file, keyward on 127.0.0.1:0 in
//! front of it. Everything but the connection is as for a TCP upstream.

mod support;
use support::*;

use std::path::Path;
use std::time::Duration;

/// keyward in front of the socket at `path`, with `extra` config.
async fn proxy_to(path: &Path, extra: &str) -> Proxy {
    let yaml = format!("upstream: unix:{}\n{extra}", path.display());
    spawn_proxy(closed_port(), &yaml).await
}

#[tokio::test]
async fn allowed_requests_reach_the_socket_with_identity_and_host() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let up = spawn_upstream_unix(&sock).await;
    let kw = proxy_to(&sock, "").await;

    let r = get(&kw.url("/v1/items?x=1"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "upstream ok, body_len=0");
    let seen = up.last();
    assert_eq!(seen.target, "/v1/items?x=1");
    let h = &seen.headers;
    assert_eq!(h["x-auth-subject-id"], "507f1f77bcf86cd799439015");
    assert_eq!(h["x-auth-key-id"], "key_demo_service");
    assert_eq!(h["x-auth-environment"], "production");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-correlation-id"], r.headers["x-correlation-id"]);
    assert!(h.get("x-api-key").is_none(), "credential not forwarded");
    // The client's Host is what the app sees.
    assert_eq!(h["host"], kw.addr.to_string());

    // Without a Host (HTTP/1.0), the app sees `localhost`: a socket has no host name.
    let reply = raw(
        kw.addr,
        format!("GET /v1/old HTTP/1.0\r\nx-api-key: {SERVICE_KEY}\r\n\r\n").as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    let seen = up.last();
    assert_eq!(seen.target, "/v1/old");
    assert_eq!(seen.headers["host"], "localhost");

    // A bad key is still answered by keyward; the app never sees it.
    let before = up.count();
    let r = get(
        &kw.url("/v1/items"),
        &[("x-api-key", "sta_wrong_key_0000000000")],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "invalid_api_key");
    let r = get(&kw.url("/v1/items"), &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (401, "invalid_auth_header".into())
    );
    assert_eq!(up.count(), before);
    kw.shutdown().await;
}

/// Sequential requests share one socket connection (the keep-alive pool is the same; the
/// test app reads every body, so bodies may share it too).
#[tokio::test]
async fn sequential_requests_reuse_one_socket_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let up = spawn_upstream_unix(&sock).await;
    let kw = proxy_to(&sock, "workers: 1\nupstream_reuse_after_body: true\n").await;
    for i in 0..10 {
        let r = send("POST", &kw.url("/x"), &[("x-api-key", SERVICE_KEY)], b"abc").await;
        assert_eq!((i, r.status.as_u16()), (i, 200), "{}", r.text());
        assert_eq!(r.text(), "upstream ok, body_len=3");
    }
    assert_eq!(up.count(), 10);
    let conns: std::collections::HashSet<_> = up.requests().iter().map(|s| s.peer).collect();
    assert_eq!(
        conns.len(),
        1,
        "one socket connection for sequential requests"
    );
    kw.shutdown().await;
}

/// No socket yet (the app starts after keyward): 502 `upstream_unavailable`, counted as a
/// connect error. Once the app listens, requests pass without a restart.
#[tokio::test]
async fn a_missing_socket_is_502_until_the_app_listens() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let kw = proxy_to(&sock, "").await;
    let r = get(&kw.url("/x"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.code(), "upstream_unavailable");
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(
        metric_value(&kw, "keyward_upstream_errors_total{kind=\"connect\"}").await,
        1.0
    );
    // Denials are still keyward's own, socket or not.
    let r = get(&kw.url("/x"), &[]).await;
    assert_eq!(r.status, 401);

    let up = spawn_upstream_unix(&sock).await;
    let r = get(&kw.url("/x"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.count(), 1);
    kw.shutdown().await;
}

/// A WebSocket handshake is authenticated, then tunnelled over the socket connection.
#[tokio::test]
async fn websocket_upgrade_is_tunnelled_through_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let up = spawn_upstream_unix(&sock).await;
    let kw = proxy_to(&sock, "").await;
    let seen = websocket_round_trip(kw.addr, &up, b"ping over a unix socket").await;
    assert_eq!(seen.headers["x-auth-key-id"], "key_demo_service");
    kw.shutdown().await;
}

/// The usual routes (`/ws` echoes after an upgrade) on a socket file.
async fn spawn_upstream_unix(path: &Path) -> Upstream {
    upstream()
        .route("/ws", Reply::UpgradeEcho)
        .spawn_unix(path)
        .await
}

/// `limits.upstream_timeout` holds over a socket as over TCP: 504 `upstream_timeout`.
#[tokio::test]
async fn a_slow_app_on_a_socket_is_504() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let _up = upstream()
        .route("/slow", Reply::After(Duration::from_secs(3)))
        .spawn_unix(&sock)
        .await;
    let kw = proxy_to(&sock, "limits: { upstream_timeout: 200ms }\n").await;
    let r = get(&kw.url("/slow"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.code(), "upstream_timeout");
    assert_eq!(
        metric_value(&kw, "keyward_upstream_errors_total{kind=\"timeout\"}").await,
        1.0
    );
    kw.shutdown().await;
}
