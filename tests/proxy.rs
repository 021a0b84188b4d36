//! Issue: the authenticating reverse proxy, end to end through the front door.

mod common;
use common::*;

#[tokio::test]
async fn allowed_request_reaches_upstream_with_identity() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let r = get(&kw.url("/v1/items?x=1"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.target, "/v1/items?x=1");
    let h = &seen.headers;
    assert_eq!(h["x-auth-subject-id"], "507f1f77bcf86cd799439015");
    assert_eq!(h["x-auth-account-id"], "507f1f77bcf86cd799439012");
    assert_eq!(h["x-auth-principal-type"], "service_account");
    assert_eq!(h["x-auth-access-type"], "access");
    assert_eq!(h["x-auth-key-id"], "key_demo_service");
    assert_eq!(h["x-auth-scopes"], "read write");
    assert_eq!(h["x-auth-environment"], "production");
    assert_eq!(h["x-auth-subject-email"], "ci-bot@example.com");
    assert_eq!(h["x-auth-account-short-id"], "d3396ea1f");
    assert_eq!(h["x-auth-org-id"], "org_123");
    assert!(h.get("x-auth-enterprise-id").is_none());
    assert!(
        h.get("x-api-key").is_none(),
        "credential must not be forwarded"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    let cid = r.headers["x-correlation-id"].clone();
    assert_eq!(r.headers["x-request-id"], cid);
    assert_eq!(h["x-correlation-id"], cid);
    assert_eq!(h["x-request-id"], cid);
    // Repeated upstream response headers survive.
    assert_eq!(r.headers.get_all("set-cookie").iter().count(), 2);
    kw.shutdown().await;
}
