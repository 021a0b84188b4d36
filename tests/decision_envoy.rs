//! Envoy / Istio HTTP `ext_authz` against keyward's decision listener, spoken exactly as
//! Envoy speaks it (Envoy itself is not installed in CI). From Envoy's API reference,
//! https://www.envoyproxy.io/docs/envoy/latest/api-v3/extensions/filters/http/ext_authz/v3/ext_authz.proto
//! (`HttpService`, `AuthorizationRequest`, `AuthorizationResponse`):
//!
//! - the check request keeps the original method; its path is `path_prefix` followed by the
//!   original path (query included); the body is not sent (`Content-Length: 0`);
//! - it carries `Host`, `Method`, `Path`, `Content-Length` and `Authorization` always, and
//!   the headers that `authorization_request.allowed_headers` matches (the shipped snippet,
//!   `deploy/decision/envoy.yaml`, matches every name: what keyward is not shown it cannot
//!   refuse, and Envoy passes it on to the app);
//! - on a 2xx, the response headers matched by `authorization_response.allowed_upstream_headers`
//!   are set on the original request ("coexistent headers will be overridden") and the
//!   request goes on to the app;
//! - otherwise the client gets the check response: its status, body and headers.
//!
//! `envoy()` below does exactly those steps, so the test proves what Envoy would deliver.

mod decision_support;
mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body_util::Full;

use decision_support::*;
use support::*;

/// `authorization_request.allowed_headers` of the shipped snippet: `safe_regex: ".*"`. Host
/// and Content-Length travel as the check request's own.
fn allowed_in_check(name: &str) -> bool {
    name != "host" && name != "content-length"
}

/// `authorization_response.allowed_upstream_headers` of the shipped snippet.
fn allowed_upstream(name: &str) -> bool {
    name.starts_with("x-auth-") || name == "x-correlation-id" || name == "x-request-id"
}

/// What a client gets when Envoy, with keyward as its HTTP ext_authz service, fronts `app`.
async fn envoy(
    keyward: SocketAddr,
    app: SocketAddr,
    method: &str,
    target: &str,
    from_client: &[(&str, &str)],
) -> Got {
    let mut original = HeaderMap::new();
    for (k, v) in from_client {
        original.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    // The check request: original method, path_prefix + original path, no body.
    let mut check = Request::builder()
        .method(method)
        .uri(format!("http://{keyward}/v1/decide/ext-authz{target}"))
        .header("host", "app.example")
        .header("content-length", "0");
    for (name, v) in original
        .iter()
        .filter(|(n, _)| allowed_in_check(n.as_str()))
    {
        check = check.header(name, v);
    }
    let answer = read(
        client()
            .request(check.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("check request"),
    )
    .await;
    if !answer.status.is_success() {
        return answer;
    }
    // Allowed: copy the allowed upstream headers over the original ones, then proxy.
    for (name, value) in &answer.headers {
        if allowed_upstream(name.as_str()) {
            original.insert(name.clone(), value.clone());
        }
    }
    let mut forward = Request::builder()
        .method(method)
        .uri(format!("http://{app}{target}"));
    for (name, value) in &original {
        forward = forward.header(name, value);
    }
    read(
        client()
            .request(forward.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect("upstream request"),
    )
    .await
}

#[tokio::test]
async fn envoy_http_ext_authz_as_envoy_sends_it() {
    let up = spawn_upstream().await;
    let d = spawn_decider(None, "").await;
    let go = |method: &'static str, target: &'static str, h: Vec<(&'static str, &'static str)>| {
        let (k, a) = (d.decision, up.addr);
        async move { envoy(k, a, method, target, &h).await }
    };
    let forged = [
        ("x-auth-subject-id", "forged-subject"),
        ("x-auth-enterprise-id", "forged-enterprise"),
        ("x-auth-delegated-by", "forged-delegator"),
    ];

    // Allowed: the identity reaches the app, forged values are overwritten (the key has no
    // enterprise id and delegates for no one: those names come back empty).
    let mut h = forged.to_vec();
    h.push((
        "authorization",
        "Bearer pat_demo_personal_key_0123456789abcdef",
    ));
    let r = go("GET", "/v1/items?x=1", h).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.target, "/v1/items?x=1");
    assert_eq!(
        seen.headers["x-auth-subject-id"],
        "65a0c0ffee0000000000beef"
    );
    assert_eq!(seen.headers["x-auth-key-id"], "key_demo_personal");
    assert_eq!(seen.headers["x-auth-enterprise-id"], "");
    assert_eq!(seen.headers["x-auth-delegated-by"], "");
    assert!(seen
        .headers
        .values()
        .all(|v| !v.to_str().unwrap().starts_with("forged")));
    let served = up.count();

    // A spelling of the delegation or an identity header, a header a backend routes by, an
    // override, another gateway's assertion: Envoy would pass each to the app as sent, so it
    // goes to keyward, which refuses the request.
    for forged in [
        ("x_delegate_account_id", "forged-delegate"),
        ("x.auth.org.id", "forged-org"),
        ("script_name", "/v1"),
        ("path_info", "/admin/users"),
        ("x-http-method-override", "DELETE"),
        ("x-original-url", "/admin/users"),
        ("proxy", "http://attacker.example"),
        ("remote_user", "admin"),
        ("x-forwarded-user", "admin"),
        ("gap-auth", "admin@example.com"),
    ] {
        let h = vec![("x-api-key", ENTERPRISE_KEY), forged];
        let r = go("GET", "/v1/items", h).await;
        assert_eq!(r.status, 400, "{forged:?}: {}", r.text());
        assert_eq!(r.code(), "bad_request", "{forged:?}");
    }
    assert_eq!(up.count(), served, "a refused request reached the app");

    // No key, wrong scope, a route rule, path tricks: keyward's answer goes to the client.
    let service = ("x-api-key", SERVICE_KEY);
    let cases = [
        ("GET", "/v1/items", vec![], 401, "invalid_auth_header"),
        (
            "POST",
            "/v1/items",
            vec![("x-api-key", PERSONAL_KEY)],
            403,
            "insufficient_scope",
        ),
        (
            "GET",
            "/admin/users",
            vec![service],
            403,
            "insufficient_scope",
        ),
        // Not in normal form: the front proxy would forward it as sent (SPEC 7, 15).
        (
            "GET",
            "/public/../admin/users",
            vec![service],
            400,
            "bad_request",
        ),
        (
            "GET",
            "/admin/../v1/items",
            vec![("x-api-key", PERSONAL_KEY)],
            400,
            "bad_request",
        ),
        ("GET", "/v1/items/../../healthz", vec![], 400, "bad_request"),
        (
            "GET",
            "/v1/%2e%2e/%2e%2e/admin",
            vec![service],
            400,
            "bad_request",
        ),
        ("GET", "/v1/%2Fadmin", vec![service], 400, "bad_request"),
    ];
    for (method, target, h, status, code) in cases {
        let r = go(method, target, h).await;
        assert_eq!(r.status, status, "{method} {target}: {}", r.text());
        assert_eq!(r.code(), code, "{method} {target}");
    }
    assert_eq!(up.count(), served, "a refused request reached the app");

    // The rate limit: 429 with Retry-After, as keyward answers it.
    for expect in [200, 200, 429] {
        let r = go("GET", "/v1/limited", vec![("x-api-key", LIMITED_KEY)]).await;
        assert_eq!(r.status, expect, "{}", r.text());
    }
    d.shutdown().await;
}
