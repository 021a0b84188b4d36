//! Issue: the authenticating reverse proxy, end to end through the front door.

mod support;
use support::*;

use std::time::Duration;

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

/// method, request headers, expected status, expected code.
type Case = (&'static str, Vec<(&'static str, String)>, u16, &'static str);

fn www(r: &Got) -> String {
    r.headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn every_auth_error_code_through_the_front_door() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let u = kw.url("/v1/items");
    let cases: Vec<Case> = vec![
        ("GET", vec![], 401, "invalid_auth_header"),
        (
            "GET",
            vec![("authorization", "Bearer".into())],
            401,
            "invalid_auth_header",
        ),
        (
            "GET",
            vec![("authorization", "Bearer short".into())],
            401,
            "invalid_auth_header",
        ),
        (
            "GET",
            vec![
                ("authorization", format!("Bearer {SERVICE_KEY}")),
                ("x-api-key", PERSONAL_KEY.into()),
            ],
            401,
            "invalid_auth_header",
        ),
        (
            "GET",
            vec![
                ("authorization", format!("Token {SERVICE_KEY}")),
                ("authorization", format!("Token {SERVICE_KEY}")),
            ],
            401,
            "invalid_auth_header",
        ),
        (
            "GET",
            vec![("x-api-key", "sta_unknown_key_000000000000".into())],
            401,
            "invalid_api_key",
        ),
        (
            "GET",
            vec![("x-api-key", "zzz_unknown_prefix_0000000".into())],
            401,
            "invalid_api_key",
        ),
        (
            "GET",
            vec![("x-api-key", EXPIRED_KEY.into())],
            401,
            "expired_api_key",
        ),
        (
            "GET",
            vec![("x-api-key", DISABLED_KEY.into())],
            401,
            "disabled_api_key",
        ),
        (
            "GET",
            vec![("x-api-key", STAGING_KEY.into())],
            401,
            "wrong_environment",
        ),
        (
            "POST",
            vec![("authorization", format!("Token {PERSONAL_KEY}"))],
            403,
            "insufficient_scope",
        ),
        (
            "GET",
            vec![
                ("x-api-key", SERVICE_KEY.into()),
                ("x-delegate-account-id", "507f1f77bc".into()),
            ],
            403,
            "delegation_not_allowed",
        ),
        (
            "GET",
            vec![
                ("x-api-key", ENTERPRISE_KEY.into()),
                ("x-delegate-account-id", "not_listed".into()),
            ],
            403,
            "delegation_not_allowed",
        ),
    ];
    for (method, headers, status, code) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = send(method, &u, &h, b"").await;
        assert_eq!(r.status, *status, "{method} {headers:?}: {}", r.text());
        assert_eq!(r.headers["content-type"], "application/json");
        let body = r.json();
        assert_eq!(body["code"], *code, "{headers:?}");
        assert_eq!(body["status"], *status);
        assert!(body["error"].is_string());
        assert_eq!(
            body["message"], body["error"],
            "SPEC 6: message repeats error"
        );
        assert_eq!(
            body["correlation_id"],
            r.headers["x-correlation-id"].to_str().unwrap()
        );
        if *status == 401 {
            let w = www(&r);
            if headers.is_empty() {
                assert_eq!(w, r#"Bearer realm="keyward""#);
            } else {
                assert_eq!(
                    w, r#"Bearer realm="keyward", error="invalid_token""#,
                    "{headers:?}"
                );
            }
        }
    }
    assert_eq!(up.count(), 0, "no denied request may reach the upstream");
    kw.shutdown().await;
}

#[tokio::test]
async fn insufficient_scope_lists_required_scopes() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let r = send(
        "DELETE",
        &kw.url("/v1/items/1"),
        &[("x-api-key", PERSONAL_KEY)],
        b"",
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["required"], serde_json::json!(["write"]));
    assert_eq!(
        www(&r),
        r#"Bearer realm="keyward", error="insufficient_scope", scope="write""#
    );
    // A method no `scopes` rule names: no scope grants it, and RFC 6750's `scope` lists
    // one or more, so the challenge has none (it was `scope=""`).
    let r = send(
        "PURGE",
        &kw.url("/v1/items/1"),
        &[("x-api-key", SERVICE_KEY)],
        b"",
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["required"], serde_json::json!([]));
    assert_eq!(
        www(&r),
        r#"Bearer realm="keyward", error="insufficient_scope""#
    );
    // A route rule adds its own requirement on top of the method's.
    let r = get(&kw.url("/admin/users"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["required"], serde_json::json!(["admin"]));
    let r = get(&kw.url("/admin"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(
        r.status, 403,
        "the bare directory is covered by the prefix rule"
    );
    let r = get(&kw.url("/admin/users"), &[("x-api-key", ENTERPRISE_KEY)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 1);
    kw.shutdown().await;
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    // A port with nothing listening: bind, note, drop.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let kw = spawn_proxy(closed, "").await;
    let r = get(&kw.url("/x"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.code(), "upstream_unavailable");
    kw.shutdown().await;

    let up = upstream()
        .route("/slow", Reply::After(Duration::from_secs(3)))
        .spawn()
        .await;
    let kw = spawn_proxy(up.addr, "limits: { upstream_timeout: 200ms }\n").await;
    let r = get(&kw.url("/slow"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.code(), "upstream_timeout");
    kw.shutdown().await;
}

/// An upstream that reaches keyward's own listener by a name validation cannot see through
/// (`127.1` is 127.0.0.1 to the resolver, not to an IP parser) is refused at connect: one
/// 502, not a request looping back in thousands of times.
#[tokio::test]
async fn an_upstream_that_resolves_to_keywards_own_listener_is_refused() {
    for own in ["listen", "admin_listen"] {
        let port = closed_port().port();
        let dir = tempfile::tempdir().unwrap();
        let keys_file = dir.path().join("keys.yaml");
        std::fs::write(&keys_file, DEMO_KEYS).unwrap();
        let config = support::config::ConfigBuilder::new(closed_port(), &keys_file)
            .set(own, &format!("127.0.0.1:{port}"))
            .set("upstream", &format!("http://127.1:{port}"))
            .config();
        let kw = support::start(config, dir).await;
        let r = get(&kw.url("/x"), &[("x-api-key", SERVICE_KEY)]).await;
        assert_eq!(r.status, 502, "{own}");
        assert_eq!(r.code(), "upstream_unavailable");
        let errors = metric_value(&kw, "keyward_upstream_errors_total{kind=\"connect\"}").await;
        assert_eq!(errors, 1.0, "one refused connect, no loop ({own})");
        kw.shutdown().await;
    }
}

/// An upstream that leads back to keyward through something no address check sees (a
/// port-forward, a Service, another proxy: here a TCP relay) would forward each request
/// again and again, with no key on a public route. keyward names itself in `Via`, so the
/// request that comes back is refused: the client gets one 502, the relay carries one
/// request, and the app behind nothing.
#[tokio::test]
async fn a_request_that_loops_back_through_the_upstream_is_refused_once() {
    use tokio::io::AsyncWriteExt;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let (target_tx, target_rx) = tokio::sync::watch::channel(None::<std::net::SocketAddr>);
    let relayed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = relayed.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = relay.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut rx = target_rx.clone();
            tokio::spawn(async move {
                let target = *rx.wait_for(|t| t.is_some()).await.unwrap();
                let mut out = tokio::net::TcpStream::connect(target.unwrap())
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                let _ = out.shutdown().await;
            });
        }
    });
    let kw = spawn_proxy(relay_addr, "").await;
    target_tx.send(Some(kw.addr)).unwrap();
    // `/healthz` is public: the looped request needs no key to be forwarded again.
    let r = get(&kw.url("/healthz"), &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.code(), "upstream_unavailable");
    let loops = metric_value(&kw, "keyward_upstream_errors_total{kind=\"loop\"}").await;
    assert_eq!(loops, 1.0);
    assert_eq!(relayed.load(std::sync::atomic::Ordering::SeqCst), 1);
    // An app behind keyward sees keyward's hop in Via, after the client's.
    let up = spawn_upstream().await;
    let kw2 = spawn_proxy(up.addr, "").await;
    let r = get(
        &kw2.url("/v1/x"),
        &[("x-api-key", SERVICE_KEY), ("via", "1.1 edge")],
    )
    .await;
    assert_eq!(r.status, 200);
    let vias: Vec<_> = up.last().headers.get_all("via").iter().cloned().collect();
    assert_eq!(vias.len(), 2, "{vias:?}");
    assert!(
        vias[1].to_str().unwrap().starts_with("1.1 keyward-"),
        "{vias:?}"
    );
    kw2.shutdown().await;
    kw.shutdown().await;
}

/// The identity headers are added by the client that sends the request: keyward's own for a
/// bodiless request (written into the head), hyper's for a request with a body or with
/// `upstream_client: hyper` (in the map). Each way the app gets the key's values, each
/// header exactly once, and none of the client's forgeries.
#[tokio::test]
async fn identity_arrives_once_through_either_upstream_client() {
    let up = spawn_upstream().await;
    for (config, method, body) in [
        ("", "GET", &b""[..]),
        ("", "POST", &b"a body goes through hyper's client"[..]),
        ("upstream_client: hyper\n", "GET", &b""[..]),
    ] {
        let kw = spawn_proxy(up.addr, config).await;
        let headers = [
            ("x-api-key", SERVICE_KEY),
            ("x-auth-subject-id", "evil"),
            ("X-Auth-Key-Id", "evil"),
            ("x-auth-org-id", "evil"),
        ];
        let r = send(method, &kw.url("/v1/items"), &headers, body).await;
        assert_eq!(r.status, 200, "{config}{method}: {}", r.text());
        let seen = up.last();
        for (name, want) in [
            ("x-auth-subject-id", "507f1f77bcf86cd799439015"),
            ("x-auth-key-id", "key_demo_service"),
            ("x-auth-org-id", "org_123"),
            ("x-auth-environment", "production"),
            (
                "x-correlation-id",
                r.headers["x-correlation-id"].to_str().unwrap(),
            ),
        ] {
            let values: Vec<_> = seen.headers.get_all(name).iter().collect();
            assert_eq!(values, [want], "{config}{method}: {name}");
        }
        assert_eq!(seen.body_len, body.len(), "{config}{method}");
        kw.shutdown().await;
    }
}

#[tokio::test]
async fn forged_identity_headers_are_stripped_in_every_spelling() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let forged = [
        ("x-auth-subject-id", "evil"),
        ("X-Auth-Account-Id", "evil"),
        ("X_Auth_Subject_Id", "evil"),
        ("x.auth.subject.id", "evil"),
        ("x-auth_key_id", "evil"),
        ("x-auth-made-up", "evil"),
        ("x_delegate_account_id", "evil"),
        // lighttpd's CGI/FastCGI makes every punctuation in a name `_`.
        ("x+auth+subject+id", "evil"),
        ("x~auth~scopes", "evil"),
        ("x!delegate!account!id", "evil"),
        ("x~api~key", "evil"),
        ("x~forwarded~host", "evil"),
        ("x~original~url", "evil"),
        ("remote~user", "evil"),
    ];
    let mut h: Vec<(&str, &str)> = forged.to_vec();
    h.push(("x-api-key", SERVICE_KEY));
    h.push(("connection", "x-auth-subject-id, x-auth-account-id"));
    let r = get(&kw.url("/v1/me"), &h).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    for (name, value) in seen.headers.iter() {
        assert_ne!(value, "evil", "forged {name} reached the upstream");
    }
    // keyward's own values arrive even though the client's Connection header named them.
    assert_eq!(
        seen.headers["x-auth-subject-id"],
        "507f1f77bcf86cd799439015"
    );
    assert_eq!(
        seen.headers["x-auth-account-id"],
        "507f1f77bcf86cd799439012"
    );
    assert!(seen.headers.get("x-auth-made-up").is_none());

    // Public routes need no key, and still lose forged identity.
    let r = get(&kw.url("/healthz"), &forged).await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(seen.target, "/healthz");
    assert!(
        seen.headers.keys().all(|k| !k.as_str().contains("auth")),
        "{:?}",
        seen.headers
    );
    for (name, value) in seen.headers.iter() {
        assert_ne!(value, "evil", "forged {name} reached the upstream");
    }
    kw.shutdown().await;
}

#[tokio::test]
async fn delegation_sets_effective_account() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let r = get(
        &kw.url("/v1/items"),
        &[
            ("authorization", &format!("Bearer {ENTERPRISE_KEY}")),
            ("x-delegate-account-id", "507f1f77bc"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = up.last().headers;
    assert_eq!(h["x-auth-account-id"], "507f1f77bc");
    assert_eq!(h["x-auth-access-type"], "delegated");
    assert_eq!(h["x-auth-delegated-by"], "68c584136b9b08b8fc53a85e");
    assert_eq!(h["x-auth-enterprise-id"], "68c584136b9b08b8fc53a85e");
    assert_eq!(h["x-auth-principal-type"], "enterprise_service_account");
    assert!(
        h.get("x-delegate-account-id").is_none(),
        "delegation header is consumed"
    );
    assert!(h.get("authorization").is_none());
    kw.shutdown().await;
}

/// Review: with `delegate_accounts: ["*"]` a client names any account, and keyward asserts
/// it to the app as `x-auth-account-id` (and logs it): the caller's own raw key or digest,
/// or another key's, went there. Such an account is refused (400) as a malformed header.
/// And an account the snapshot may list (`/` in it) can be named.
#[tokio::test]
async fn a_delegated_account_that_is_key_material_is_refused() {
    let up = spawn_upstream().await;
    let keys = DEMO_KEYS.replacen(
        r#"delegate_accounts: ["507f1f77bc"]"#,
        r#"delegate_accounts: ["*"]"#,
        1,
    );
    assert_ne!(keys, DEMO_KEYS);
    let kw = spawn_proxy_with(up.addr, "", Some(&keys)).await;
    let hex_of = |raw: &str| hex::encode(keyward::keys::digest(raw.as_bytes()));
    let b64_of = |raw: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(keyward::keys::digest(raw.as_bytes()))
    };
    let bearer = format!("Bearer {ENTERPRISE_KEY}");
    let as_account = |account: String| {
        let bearer = bearer.clone();
        let url = kw.url("/v1/items");
        async move {
            get(
                &url,
                &[
                    ("authorization", &bearer),
                    ("x-delegate-account-id", &account),
                ],
            )
            .await
        }
    };
    let b64_raw = |raw: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    };
    for account in [
        ENTERPRISE_KEY.to_string(),
        hex_of(ENTERPRISE_KEY),
        hex_of(ENTERPRISE_KEY).to_uppercase(),
        b64_of(ENTERPRISE_KEY),
        format!("x_{ENTERPRISE_KEY}"),
        SERVICE_KEY.to_string(),
        hex_of(SERVICE_KEY),
        ENTERPRISE_KEY[4..30].to_string(),
        // Round 2: a labelled digest, another key without its prefix, a key written in
        // hex or base64.
        format!("sha256:{}", hex_of(ENTERPRISE_KEY)),
        SERVICE_KEY[4..].to_string(),
        hex::encode(SERVICE_KEY),
        b64_raw(SERVICE_KEY),
        // Round 3: a digest behind any separator, or before a suffix.
        format!("sha256_{}", hex_of(SERVICE_KEY)),
        format!("sha256/{}", hex_of(SERVICE_KEY)),
        format!("{}.x", b64_of(SERVICE_KEY)),
    ] {
        let before = up.count();
        let r = as_account(account.clone()).await;
        assert_eq!(r.status, 400, "{account}: {}", r.text());
        assert_eq!(r.code(), "bad_request");
        assert!(!r.text().contains(&account), "{}", r.text());
        assert_eq!(up.count(), before, "{account} reached the app");
    }
    // Ordinary accounts, a prefix inside a word among them (`costa_rica` holds `sta_`).
    for account in [
        "acme/child-7",
        "507f1f77bc",
        "a.b:c-d_e",
        "costa_rica",
        "vista_ste_team",
        "costa_rica_operations_team",
        "compat_layer_team_production",
        "waste_management_division_01",
    ] {
        let r = as_account(account.to_string()).await;
        assert_eq!(r.status, 200, "{account}: {}", r.text());
        assert_eq!(up.last().headers["x-auth-account-id"], account);
    }
    kw.shutdown().await;
}

#[tokio::test]
async fn path_tricks_are_refused_or_denied_never_forwarded() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let tricks = [
        ("/v1/../admin/users", 403),
        ("//admin/users", 403),
        ("/x/%2e%2e/admin/users", 403),
        ("/%61dmin/users", 403),
        ("/admin%2fusers", 400),
        ("/admin%2Fusers", 400),
        ("/admin%5cusers", 400),
        ("/admin;jsessionid=1/users", 400),
        ("/../admin/users", 400),
        ("/admin/%00", 400),
        ("/admin/%zz", 400),
        ("http://evil.example/admin/users", 403),
    ];
    for (target, want) in tricks {
        let req = format!(
            "GET {target} HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\nconnection: close\r\n\r\n"
        );
        let reply = raw(kw.addr, req.as_bytes(), std::time::Duration::from_secs(5)).await;
        assert_eq!(raw_status(&reply), want, "{target}: {reply}");
        let code = if want == 400 {
            "bad_request"
        } else {
            "insufficient_scope"
        };
        assert!(reply.contains(code), "{target}: {reply}");
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    // What is authorized is what is forwarded: the normalized path.
    let req = format!(
        "GET /v1/./a//b/../c?q=%2e%2e HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\nconnection: close\r\n\r\n"
    );
    let reply = raw(kw.addr, req.as_bytes(), std::time::Duration::from_secs(5)).await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert_eq!(up.last().target, "/v1/a/c?q=%2e%2e");
    kw.shutdown().await;
}

/// A fragment in a request target is refused (SPEC 7): `http::Uri` would drop it and
/// authorize the path before it, while an app or a front proxy reading the raw target may
/// read more (`/v1/x#/../admin`). Where hyper's server reads the head (a body announced,
/// `http1_server: hyper`) the fragment is dropped instead: the path before it is what is
/// authorized and what is forwarded.
#[tokio::test]
async fn fragment_in_target_is_refused_not_a_bypass() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let wait = std::time::Duration::from_secs(5);
    let send_raw = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nhost: a\r\nx-api-key: {SERVICE_KEY}\r\nconnection: close\r\n\r\n")
    };
    for target in ["/v1/x#/../admin", "/admin/x#frag", "/healthz#"] {
        let reply = raw(kw.addr, send_raw(target).as_bytes(), wait).await;
        assert_eq!(raw_status(&reply), 400, "{target}: {reply}");
        assert!(reply.contains("bad_request"), "{reply}");
    }
    // Kept alive: answered, closed, and what follows is never read as a request.
    let smuggled = "GET /admin/x HTTP/1.1\r\nhost: a\r\nx-auth-subject-id: forged\r\n\r\n";
    let req = format!("GET /healthz#x HTTP/1.1\r\nhost: a\r\n\r\n{smuggled}");
    let reply = raw(kw.addr, req.as_bytes(), wait).await;
    assert_eq!(raw_status(&reply), 400, "{reply}");
    assert_eq!(reply.matches("HTTP/1.1").count(), 1, "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );
    assert_eq!(up.count(), 0);
    // A head with a body goes to hyper's server, which drops the fragment: the path before
    // it is what is authorized and forwarded, and the body is read as a body.
    let req = format!(
        "POST /healthz#x HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let reply = raw(kw.addr, req.as_bytes(), wait).await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert_eq!((up.count(), up.last().target.as_str()), (1, "/healthz"));
    assert_eq!(up.last().body_len, smuggled.len());
    kw.shutdown().await;

    let kw = spawn_proxy(up.addr, "http1_server: hyper\n").await;
    let reply = raw(kw.addr, send_raw("/v1/x#/../admin").as_bytes(), wait).await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert_eq!(up.last().target, "/v1/x");
    let reply = raw(kw.addr, send_raw("/admin/x#frag").as_bytes(), wait).await;
    assert_eq!(raw_status(&reply), 403, "{reply}");
    kw.shutdown().await;
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let up = upstream()
        .route("/big", Reply::Bytes(6_000_000))
        .spawn()
        .await;
    let kw = spawn_proxy(up.addr, "").await;
    let body = vec![7u8; 8 * 1024 * 1024];
    let r = send(
        "POST",
        &kw.url("/upload"),
        &[("x-api-key", SERVICE_KEY)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().body_len, body.len());
    let r = get(&kw.url("/big"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 6_000_000);
    kw.shutdown().await;
}

#[tokio::test]
async fn h2c_is_served() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let r = get_h2c(&kw.url("/v1/h2"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(seen.target, "/v1/h2");
    assert_eq!(seen.headers["x-auth-key-id"], "key_demo_service");
    let r = get_h2c(&kw.url("/v1/h2"), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "invalid_auth_header");
    kw.shutdown().await;
}

#[tokio::test]
async fn websocket_upgrade_is_authenticated_then_tunnelled() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let seen = websocket_round_trip(kw.addr, &up, b"ping through the tunnel").await;
    assert_eq!(
        seen.headers["x-auth-subject-id"],
        "507f1f77bcf86cd799439015"
    );
    kw.shutdown().await;
}

/// An open tunnel still counts against `limits.max_connections`: with one slot, a second
/// client is turned away until the tunnel closes.
#[tokio::test]
async fn websocket_tunnel_holds_its_connection_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "limits: { max_connections: 1 }\n").await;
    let mut s = tokio::net::TcpStream::connect(kw.addr).await.unwrap();
    s.write_all(ws_handshake(SERVICE_KEY).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.expect("closed during handshake");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The tunnel works, so hyper's connection task has handed the socket over.
    s.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    s.read_exact(&mut echoed).await.unwrap();

    let req = format!(
        "GET /v1/x HTTP/1.1\r\nhost: app\r\nconnection: close\r\nx-api-key: {SERVICE_KEY}\r\n\r\n"
    );
    let reply = raw(kw.addr, req.as_bytes(), std::time::Duration::from_secs(2)).await;
    assert!(
        reply.is_empty(),
        "second client served while the tunnel is open: {reply}"
    );

    drop(s);
    let addr = kw.addr;
    let req = &req;
    eventually("the closed tunnel frees its slot", || async move {
        raw_status(&raw(addr, req.as_bytes(), std::time::Duration::from_secs(2)).await) == 200
    })
    .await;
    kw.shutdown().await;
}

#[tokio::test]
async fn introspection_answers_locally() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let r = get(
        &kw.url("/auth"),
        &[
            ("x-api-key", ENTERPRISE_KEY),
            ("x-correlation-id", "intro-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = r.json();
    assert_eq!(b["principal_type"], "enterprise_service_account");
    assert_eq!(b["subject_id"], "68c5841f6b9b08b8fc53a001");
    assert_eq!(b["account_id"], "68c584136b9b08b8fc53a85e");
    assert_eq!(b["enterprise_id"], "68c584136b9b08b8fc53a85e");
    assert_eq!(b["key_id"], "key_demo_enterprise");
    assert_eq!(b["scopes"], serde_json::json!(["read", "write", "admin"]));
    assert_eq!(b["environment"], "production");
    assert_eq!(b["correlation_id"], "intro-1");
    assert!(b["expires_at"].is_null());
    assert!(b.get("org_id").is_some());
    let r = get(&kw.url("/auth"), &[("x-api-key", EXPIRED_KEY)]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "expired_api_key");
    let r = get(&kw.url("/auth"), &[]).await;
    assert_eq!(r.code(), "invalid_auth_header");
    assert_eq!(up.count(), 0, "introspection never reaches the upstream");
    // Introspection is `GET` (and `HEAD`, SPEC 9); another method on the path is the app's
    // (a login form's `POST /auth`), routed and scope-checked like any other request.
    let r = send("HEAD", &kw.url("/auth"), &[("x-api-key", SERVICE_KEY)], b"").await;
    assert_eq!((r.status.as_u16(), up.count()), (200, 0));
    let r = send(
        "POST",
        &kw.url("/auth"),
        &[("x-api-key", SERVICE_KEY)],
        b"{}",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().target, "/auth");
    let r = send(
        "POST",
        &kw.url("/auth"),
        &[("x-api-key", PERSONAL_KEY)],
        b"{}",
    )
    .await;
    assert_eq!(r.code(), "insufficient_scope");
    kw.shutdown().await;
}

#[tokio::test]
async fn introspection_can_be_turned_off() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "introspection_path: null\n").await;
    let r = get(&kw.url("/auth"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("upstream ok"), "{}", r.text());
    assert_eq!(up.last().target, "/auth");
    // An ordinary protected path: no key, no pass.
    assert_eq!(get(&kw.url("/auth"), &[]).await.status, 401);
    kw.shutdown().await;
}

#[tokio::test]
async fn correlation_id_is_taken_or_minted() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let r = get(
        &kw.url("/x"),
        &[("x-api-key", SERVICE_KEY), ("x-request-id", "req-42")],
    )
    .await;
    assert_eq!(r.headers["x-correlation-id"], "req-42");
    assert_eq!(up.last().headers["x-correlation-id"], "req-42");
    let r = get(&kw.url("/x"), &[("x-correlation-id", "bad id with spaces")]).await;
    let cid = r.headers["x-correlation-id"].to_str().unwrap().to_string();
    assert_eq!(cid.len(), 36, "{cid}");
    assert_eq!(r.json()["correlation_id"], cid.as_str());
    kw.shutdown().await;
}

#[tokio::test]
async fn forward_credential_and_echo_to_client_options() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(
        up.addr,
        "forward_credential: true\nidentity_headers: { prefix: x-auth-, echo_to_client: true }\n",
    )
    .await;
    let r = get(
        &kw.url("/x"),
        &[("authorization", &format!("Token {SERVICE_KEY}"))],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.last().headers["authorization"],
        format!("Token {SERVICE_KEY}").as_str()
    );
    assert_eq!(r.headers["x-auth-key-id"], "key_demo_service");
    kw.shutdown().await;
}

/// `x_api_key` and `x.api.key` are `X-API-KEY` to a CGI/WSGI or nginx backend, but never
/// read by keyward: whether or not the credential is forwarded, the app gets only the key
/// keyward checked.
#[tokio::test]
async fn spellings_of_a_credential_header_never_reach_the_app() {
    let up = spawn_upstream().await;
    for forward in [false, true] {
        let kw = spawn_proxy(up.addr, &format!("forward_credential: {forward}\n")).await;
        let other = "sta_not_the_key_keyward_checked_0123";
        let r = get(
            &kw.url("/x"),
            &[
                ("x-api-key", SERVICE_KEY),
                ("x_api_key", other),
                ("x.api.key", other),
                ("X_Api.Key", other),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = up.last();
        let names: Vec<&str> = seen.headers.keys().map(|n| n.as_str()).collect();
        assert!(
            !names
                .iter()
                .any(|n| *n != "x-api-key" && n.replace(['_', '.'], "-") == "x-api-key"),
            "{names:?}"
        );
        assert_eq!(
            seen.headers.get("x-api-key").is_some(),
            forward,
            "{names:?}"
        );
        kw.shutdown().await;
    }
}

/// With `forward_credential: true` the app gets the credential headers as sent: a value in
/// one that no configured scheme reads (a bare word, another scheme's, `Basic`, `Digest`)
/// reached it beside the identity of the key checked, and an app reading its key from
/// `Authorization` acted as whatever key that value held (revoked, another's, a key
/// without a prefix, or one behind an encoding). No scan of the value tells a key in it
/// (and one cost ~50 times a request's CPU), so any such value is refused as ambiguous:
/// 401 `invalid_auth_header`. The key checked, sent twice, passes.
#[tokio::test]
async fn a_second_key_in_a_credential_header_is_never_forwarded_unchecked() {
    use base64::Engine as _;
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "forward_credential: true\n").await;
    let basic = |login: &str| {
        let login = base64::engine::general_purpose::STANDARD.encode(login);
        format!("Basic {login}")
    };
    for authorization in [
        PERSONAL_KEY.to_string(),
        format!("ApiKey {DISABLED_KEY}"),
        format!("Digest username=\"{DISABLED_KEY}\", realm=\"app\""),
        basic(&format!("u:{DISABLED_KEY}")),
        basic("alice:pw"),
        format!("AWS4-HMAC-SHA256 Credential={DISABLED_KEY}/20240101/us-east-1/s3/aws4_request"),
    ] {
        let headers = [
            ("x-api-key", SERVICE_KEY),
            ("authorization", &authorization),
        ];
        let r = get(&kw.url("/x"), &headers).await;
        assert_eq!(r.status, 401, "{authorization}: {}", r.text());
        assert_eq!(r.code(), "invalid_auth_header", "{authorization}");
    }
    let same = format!("Token {SERVICE_KEY}");
    let headers = [("x-api-key", SERVICE_KEY), ("authorization", &same)];
    let r = get(&kw.url("/x"), &headers).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().headers["authorization"], same.as_str());
    kw.shutdown().await;
}

#[tokio::test]
async fn query_credential_when_enabled_is_not_forwarded() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(
        up.addr,
        "credentials: [{ header: x-api-key }, { query: api_key }]\n",
    )
    .await;
    let r = get(&kw.url(&format!("/x?a=1&api_key={SERVICE_KEY}&b=2")), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().target, "/x?a=1&b=2");
    // An escaped name is the same parameter to the app: read, and stripped, as such.
    let r = get(&kw.url(&format!("/x?a=1&api%5Fkey={SERVICE_KEY}")), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().target, "/x?a=1");
    let other = "sta_not_the_key_keyward_checked_0123";
    let r = get(
        &kw.url(&format!("/x?api_key={SERVICE_KEY}&api%5fkey={other}")),
        &[],
    )
    .await;
    assert_eq!(r.code(), "invalid_auth_header", "{}", r.text());
    // Names as PHP and Rails read them, and `;` as a separator, as some parsers take it.
    for name in [
        "api.key",
        "api+key",
        "api_key[]",
        "api_key%5B%5D",
        "%20api_key",
        "api[key",
        "API_KEY",
        // As Rack 2 (leading brackets and a trailing `]` dropped), `qs` with `allowDots`
        // and ASP.NET's System.Web (`%uXXXX`) read them.
        "]api_key",
        "api_key]",
        "[[api_key",
        ".api_key",
        ".api_key]",
        "api%u005Fkey",
        // As PHP decodes a name, escape by escape (`%00` cuts it, `+` is a space).
        "+api_key%00%",
    ] {
        let r = get(&kw.url(&format!("/x?a=1&{name}={SERVICE_KEY}")), &[]).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(up.last().target, "/x?a=1", "{name}");
    }
    let r = get(&kw.url(&format!("/x?a=1;api_key={SERVICE_KEY}")), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().target, "/x?a=1");
    // A key to PHP (`%00` cuts the name) that an app decoding before splitting reads as no
    // parameter at all: read two ways, refused.
    let before = up.count();
    let r = get(&kw.url(&format!("/x?api_key%00%26%={SERVICE_KEY}")), &[]).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(up.count(), before);
    kw.shutdown().await;
}

/// A `;`-separated query key is a key to Rack 2, Perl's CGI and older Python `parse_qs`:
/// beside a header key it is ambiguous, even when keys are forwarded, so the app never
/// receives a key keyward did not check.
#[tokio::test]
async fn a_semicolon_separated_query_key_beside_a_header_key_is_ambiguous() {
    let up = spawn_upstream().await;
    let other = "sta_not_the_key_keyward_checked_0123";
    for forward in [false, true] {
        let kw = spawn_proxy(
            up.addr,
            &format!("credentials: [{{ header: x-api-key }}, {{ query: api_key }}]\nforward_credential: {forward}\n"),
        )
        .await;
        let before = up.requests().len();
        for target in [
            format!("/x?x=1;api_key={other}"),
            format!("/x?x=1;API_KEY={other}&y=2"),
            format!("/x?api_key={SERVICE_KEY};x=1"),
        ] {
            let r = get(&kw.url(&target), &[("x-api-key", SERVICE_KEY)]).await;
            assert_eq!(r.status, 401, "forward {forward} {target}: {}", r.text());
            assert_eq!(r.code(), "invalid_auth_header", "{target}");
        }
        assert_eq!(up.requests().len(), before, "forward {forward}");
        kw.shutdown().await;
    }
}

/// With a query credential, its parameter after an encoded `?` in the path is what an app
/// that decodes its URL before splitting it reads as the query: a key keyward never
/// checked, on a protected route beside the one it did, or on a public one with none asked
/// for. Refused (400); other parameters there are not.
#[tokio::test]
async fn a_query_key_hidden_after_an_encoded_question_mark_is_refused() {
    let up = spawn_upstream().await;
    let other = "sta_not_the_key_keyward_checked_0123";
    let kw = spawn_proxy(
        up.addr,
        "credentials: [{ header: x-api-key }, { query: api_key }]\nforward_credential: true\n",
    )
    .await;
    let before = up.requests().len();
    for target in [
        format!("/x%3Fapi_key={other}"),
        format!("/x%3fx=1%26api_key%3D{other}"),
        format!("/public/x%3FAPI_KEY={other}"),
        // `?`, `&`, `_`, `=` as NFKC makes them.
        format!("/public/x%EF%BC%9Fapi_key={other}"),
        format!("/x%EF%B9%96api_key={other}"),
        format!("/x%3Fa=1%EF%BC%86api_key={other}"),
        format!("/x%3Fapi%EF%BC%BFkey={other}"),
        format!("/x%3Fapi_key%EF%BC%9D{other}"),
        // Behind an encoded separator in the query itself.
        format!("/x?a=1%26api_key={other}"),
        format!("/public/x?api_key%3D{other}"),
        format!("/x?a=1%3Bapi_key={other}"),
        // Beside the name in the query as keyward reads it.
        format!("/public/x?api_key&x=%26api_key={other}"),
        format!("/x?api_key={SERVICE_KEY}&x=%26api_key={other}"),
        // Where parsers that search the whole URL for `&api_key=` find it.
        format!("/public/&api_key={other}&"),
        format!("/x/y&api_key={other}"),
        // At a `?` inside the query, where the same parsers find `?api_key=`.
        format!("/public/x?y=1?api_key={other}"),
        format!("/x?y=1?api_key={other}"),
        format!("/x?y=1%3Fapi_key={other}"),
        // A decoded `#` cutting the real parameter off where a decoded `&` adds one: the
        // counts were equal and the hidden key reached the app.
        format!("/public/x?y=%26api_key%3D{other}&z=%23&api_key=junkjunkjunk"),
        format!("/x?y=%26api_key%3D{other}&z=%23&api_key={SERVICE_KEY}"),
        format!("/x?y=%EF%BC%86api_key%3D{other}&z=%EF%BC%83&api_key={SERVICE_KEY}"),
        // `%uXXXX`, as ASP.NET's `UrlDecode` and JavaScript's `unescape` read it.
        format!("/x?y=%u0026api_key%u003D{other}&api_key={SERVICE_KEY}"),
        format!("/public/x?y=%u0026api_key%u003D{other}"),
        // An encoded `#` in the path does not stop a search of the URL for `&api_key=`.
        format!("/public/x%23&api_key={other}"),
        format!("/public/x%23%26api_key={other}"),
        // Decoded twice.
        format!("/public/x?a=1%2526api_key%253D{other}"),
        format!("/public/x%2526api_key={other}"),
        // A hidden second copy of the very key keyward read: the copy it strips is the
        // one it read, and the hidden one reached the app.
        format!("/x?api_key={SERVICE_KEY}&y=1?api_key={SERVICE_KEY}"),
        format!("/x?api_key={SERVICE_KEY}&x=%u0026api_key%u003D{SERVICE_KEY}"),
        format!("/x?api_key={SERVICE_KEY}&next=%2Fcb%3Fapi_key%3D{SERVICE_KEY}"),
    ] {
        let r = get(&kw.url(&target), &[("x-api-key", SERVICE_KEY)]).await;
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        let r = get(&kw.url(&target), &[]).await;
        assert_eq!(r.status, 400, "{target} without a key: {}", r.text());
    }
    // In the host, which an app that builds its URL from `Host` searches too: no host
    // holds `&` or `=` (nor any other sub-delim), so it is refused as a bad host.
    for host in [format!("x&api_key={other}&"), "a,b.example".to_owned()] {
        let req = format!("GET /public/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw(kw.addr, req.as_bytes(), std::time::Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{host}: {answer}");
        let absolute = format!(
            "GET http://{host}/public/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let answer = raw(
            kw.addr,
            absolute.as_bytes(),
            std::time::Duration::from_secs(5),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "absolute-form {host}: {answer}"
        );
    }
    assert_eq!(up.requests().len(), before);
    // A `?` in a path's words, and separators in a query's values, are not keys.
    for target in [
        "/x%3Fpage=2",
        "/docs/What%3F%20API%20key",
        "/x?q=api_key%20rotation",
        "/x?next=/a?b=1",
        "/x?next=%2Fa%3Fb%3D1&q=%26",
    ] {
        let r = get(&kw.url(target), &[("x-api-key", SERVICE_KEY)]).await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
    }
    // An encoded `#` in a value before the key hides nothing (it was refused: the decoded
    // reading, cut there, counted one key fewer).
    for target in [
        format!("/x?color=%23ff0000&api_key={SERVICE_KEY}"),
        format!("/x?next=%2Fpage%23sec&api_key={SERVICE_KEY}"),
    ] {
        let target = target.as_str();
        let r = get(&kw.url(target), &[("x-api-key", SERVICE_KEY)]).await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
    }
    kw.shutdown().await;
}

#[tokio::test]
async fn forwarded_headers_trust_only_configured_proxies() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let h = [
        ("x-api-key", SERVICE_KEY),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("host", "app.example"),
    ];
    get(&kw.url("/x"), &h).await;
    let seen = up.last().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "app.example");
    assert_eq!(seen["host"], "app.example");
    kw.shutdown().await;

    let kw = spawn_proxy(up.addr, "trusted_proxies: [127.0.0.0/8]\n").await;
    get(&kw.url("/x"), &h).await;
    let seen = up.last().headers;
    assert_eq!(seen["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    // From a trusted proxy too, only the names as a proxy spells them: no front proxy sets
    // `remote_user` or `x_forwarded_host`, which CGI/WSGI and lighttpd apps read as the real.
    let spelled = [
        ("x-api-key", SERVICE_KEY),
        ("remote-user", "alice"),
        ("remote_user", "admin"),
        ("x_forwarded_host", "evil.example"),
        ("x~remote~user", "admin"),
        ("x.ssl.client.s.dn", "CN=admin"),
    ];
    get(&kw.url("/x"), &spelled).await;
    let seen = up.last().headers;
    assert_eq!(seen["remote-user"], "alice");
    for (name, _) in &spelled[2..] {
        assert!(seen.get(*name).is_none(), "{name} reached the app");
    }
    kw.shutdown().await;
}

/// An upstream that answers one request per connection and then closes it, without saying
/// so: the pooled connection keyward kept is dead by the next request, which must still
/// reach the upstream (on a new connection), never fail with 502.
#[tokio::test]
async fn upstream_closing_kept_alive_connections_is_not_an_error() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let kw = spawn_proxy(addr, "workers: 1\n").await;
    for i in 0..20 {
        let r = get(&kw.url("/x"), &[("x-api-key", SERVICE_KEY)]).await;
        assert_eq!((i, r.status.as_u16(), r.text()), (i, 200, "ok".into()));
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 20);
    kw.shutdown().await;
}

/// Sequential requests share one upstream connection: the pool hands a connection back
/// once its response is read, instead of opening one per request.
#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "workers: 1\n").await;
    for _ in 0..10 {
        let r = get(&kw.url("/x"), &[("x-api-key", SERVICE_KEY)]).await;
        assert_eq!(r.status, 200);
    }
    let peers: std::collections::HashSet<_> = up.requests().iter().map(|s| s.peer).collect();
    assert_eq!(
        peers.len(),
        1,
        "one upstream connection for sequential requests"
    );
    kw.shutdown().await;
}

/// A key sent as the correlation id too (by mistake, or to get it logged) would be logged,
/// echoed and forwarded raw: an id that is part of the request's credential (header or
/// query, however the query name is spelled) or starts with a key prefix is replaced.
#[tokio::test]
async fn a_correlation_id_that_could_be_a_key_is_replaced() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(
        up.addr,
        "credentials: [{ header: authorization, scheme: Bearer }, { header: x-api-key }, { query: api_key }]\n",
    )
    .await;
    let minted = |r: &Got| {
        let id = r.headers["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 36, "{id}");
        id
    };
    let bearer = format!("Bearer {SERVICE_KEY}");
    for (target, h) in [
        ("/v1/a", vec![("x-api-key", SERVICE_KEY)]),
        ("/v1/b", vec![("authorization", bearer.as_str())]),
        (&*format!("/v1/c?API_KEY={SERVICE_KEY}"), vec![]),
    ] {
        let mut h = h.clone();
        h.push(("x-request-id", SERVICE_KEY));
        let r = get(&kw.url(target), &h).await;
        assert_eq!(r.status, 200, "{target}");
        let id = minted(&r);
        assert_eq!(up.last().headers["x-request-id"], id.as_str());
    }
    // Another key, by its prefix, even on a refusal.
    let r = get(&kw.url("/v1/d"), &[("x-request-id", PERSONAL_KEY)]).await;
    assert_eq!(r.status, 401);
    minted(&r);
    // An ordinary id is kept (one sharing a run of 8 bytes with the key is not: the test
    // key's `0123456789abcdef` is no random secret's).
    let r = get(
        &kw.url("/v1/e"),
        &[
            ("x-api-key", SERVICE_KEY),
            ("x-request-id", "req-7f3a9c0d-e51b"),
        ],
    )
    .await;
    assert_eq!(r.headers["x-request-id"], "req-7f3a9c0d-e51b");
    kw.shutdown().await;
}

/// Symfony, Laravel, Spring and Express read a `_method` query parameter (ASP.NET MVC an
/// `X-HTTP-Method-Override` one) as the method of a POST: keyward cannot take it out of the
/// query, so the method it names is authorized too.
#[tokio::test]
async fn a_method_parameter_in_a_posts_query_is_authorized_too() {
    let up = spawn_upstream().await;
    let scopes = "scopes: [{ methods: [GET, HEAD, OPTIONS], any_of: [read, write] }, { methods: [POST, PUT, PATCH], any_of: [write] }, { methods: [DELETE], any_of: [admin] }]\n";
    let kw = spawn_proxy(up.addr, scopes).await;
    let writer = [("x-api-key", SERVICE_KEY)];
    let post = |target: &str, h: &[(&str, &str)]| {
        let url = kw.url(target);
        let h: Vec<(String, String)> = h
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            send("POST", &url, &h, b"").await
        }
    };
    assert_eq!(post("/v1/items", &writer).await.status, 200);
    for target in [
        "/v1/items?_method=DELETE",
        "/v1/items?a=1&%5Fmethod=delete",
        "/v1/items?_METHOD=DELETE",
        "/v1/items?X-HTTP-Method-Override=DELETE",
        // Behind an encoded `?`, `&` or `=`, where an app that decodes its URL before
        // splitting it reads the parameter.
        "/v1/items%3F_method=DELETE",
        "/v1/items%EF%BC%9F_method=DELETE",
        "/v1/items?a=1%26_method=DELETE",
        "/v1/items?a=%26_method%3DDELETE",
        // A name ASP.NET (System.Web) decodes from `%uXXXX` escapes.
        "/v1/items?X%u002DHTTP-Method-Override=DELETE",
        // As `qs` with `allowDots` reads it.
        "/v1/items?._method=DELETE",
        "/v1/items?._method]=DELETE",
        "/v1/items?+_method%00%=DELETE",
    ] {
        let r = post(target, &writer).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (403, "insufficient_scope".into()),
            "{target}"
        );
    }
    let r = post("/v1/items?_method=DELETE&_method=GET", &writer).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("_method"), "{}", r.text());
    let before = up.count();
    // A key that may DELETE; an empty one.
    assert_eq!(
        post("/v1/items?_method=DELETE", &[("x-api-key", ENTERPRISE_KEY)])
            .await
            .status,
        200
    );
    assert_eq!(post("/v1/items?_method=", &writer).await.status, 200);
    assert_eq!(up.count(), before + 2);
    // On other methods too: Hono's `methodOverride` reads it on every method but GET.
    for method in ["GET", "HEAD", "OPTIONS"] {
        let r = send(
            method,
            &kw.url("/v1/items?_method=DELETE"),
            &[("x-api-key", PERSONAL_KEY)],
            b"",
        )
        .await;
        assert_eq!(r.status, 403, "{method}");
    }
    assert_eq!(up.count(), before + 2);
    kw.shutdown().await;
}

/// No client spells a header `SCRIPT_NAME`, but gunicorn takes it (and `PATH_INFO`) from its
/// loopback peer as the path to serve, and CGI/WSGI backends read `_` as `-`: such names are
/// dropped (`headers_with_underscores: drop`, the default), and the WSGI path overrides,
/// `Proxy` (httpoxy) and aliases of framing names in every spelling even when the rest are
/// forwarded.
#[tokio::test]
async fn header_names_with_underscores_are_dropped() {
    let up = spawn_upstream().await;
    let sent = [
        ("x-api-key", SERVICE_KEY),
        ("SCRIPT_NAME", "/v1"),
        ("Script-Name", "/v1"),
        ("X-Script-Name", "/v1"),
        ("x_script_name", "/v1"),
        ("PATH_INFO", "/admin/x"),
        ("path-info", "/admin/x"),
        ("Proxy", "http://evil.example:3128"),
        ("Content_Length", "40"),
        ("Transfer_Encoding", "chunked"),
        ("X_Custom", "1"),
        ("x.custom", "1"),
        ("x-custom", "kept"),
    ];
    let kw = spawn_proxy(up.addr, "").await;
    let r = get(&kw.url("/v1/admin/x"), &sent).await;
    assert_eq!(r.status, 200);
    let seen = up.last().headers;
    let names: Vec<&str> = seen.keys().map(|n| n.as_str()).collect();
    assert!(names.iter().all(|n| !n.contains(['_', '.'])), "{names:?}");
    for (name, _) in &sent[1..8] {
        assert!(!seen.contains_key(*name), "{name} reached the upstream");
    }
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(up.last().target, "/v1/admin/x");
    kw.shutdown().await;

    let kw = spawn_proxy(up.addr, "headers_with_underscores: forward\n").await;
    let r = get(&kw.url("/v1/admin/x"), &sent).await;
    assert_eq!(r.status, 200);
    let seen = up.last().headers;
    assert_eq!(seen["x_custom"], "1");
    // The WSGI path, httpoxy and aliases of framing names go whatever the setting.
    for (name, _) in &sent[1..10] {
        assert!(!seen.contains_key(*name), "{name} reached the upstream");
    }
    kw.shutdown().await;
}

/// An override header `allow_override_headers` lets through makes the app serve another
/// method or path: that one is authorized too (both must pass), and one an app could read
/// more than one way is refused.
#[tokio::test]
async fn what_an_allowed_override_names_is_authorized_too() {
    let up = spawn_upstream().await;
    let extra = "allow_override_headers: [X-HTTP-Method-Override, X-Original-URL]\n";
    let kw = spawn_proxy(up.addr, extra).await;
    let (m, u) = ("x-http-method-override", "x-original-url");
    let send =
        |key: Option<&'static str>, path: &'static str, over: (&'static str, &'static str)| {
            let url = kw.url(path);
            async move {
                let mut h = vec![over];
                if let Some(k) = key {
                    h.push(("x-api-key", k));
                }
                get(&url, &h).await
            }
        };
    // A read-only key: DELETE needs `write`, `/admin/` needs `admin`.
    let r = send(Some(PERSONAL_KEY), "/v1/items", (m, "delete")).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "insufficient_scope".into())
    );
    let r = send(Some(PERSONAL_KEY), "/v1/items", (u, "/admin/x")).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "insufficient_scope".into())
    );
    // What the app may read the override's path as is authorized too.
    for read_as_admin in ["/admin.json", "/admin./x", "/admin%20"] {
        let r = send(Some(PERSONAL_KEY), "/v1/items", (u, read_as_admin)).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (403, "insufficient_scope".into()),
            "{read_as_admin}"
        );
        let r = send(None, "/public/x", (u, read_as_admin)).await;
        assert_eq!(r.status, 401, "{read_as_admin}");
    }
    // A public path overridden to a protected one needs its key.
    let r = send(None, "/public/x", (u, "/v1/x")).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (401, "invalid_auth_header".into())
    );
    // Ambiguous or not in normal form: refused.
    for over in [
        (m, "DELETE, GET"),
        (u, "/v1/../admin/x"),
        (u, "admin"),
        (u, "/public/x#/../../admin/x"),
    ] {
        let r = send(Some(ENTERPRISE_KEY), "/v1/items", over).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (400, "bad_request".into()),
            "{over:?}"
        );
    }
    assert_eq!(up.count(), 0);
    // What the key may do goes through, override and all.
    let r = send(Some(PERSONAL_KEY), "/v1/items", (m, "GET")).await;
    assert_eq!(r.status, 200);
    let r = send(Some(ENTERPRISE_KEY), "/v1/items", (u, "/admin/x")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().headers[u], "/admin/x");
    kw.shutdown().await;
}
