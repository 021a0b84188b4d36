//! Decision mode (SPEC 15) through its front door: the three endpoints over HTTP, each
//! answer compared with what the proxy listener of the same keyward answers for the same
//! request, and the listener's limits and shutdown.

mod decision_support;
mod support;

use std::time::Duration;

use decision_support::*;
use keyward::decision::{AUTH_REQUEST, EXT_AUTHZ, FORWARD_AUTH};
use support::*;

/// A decision request for `method path` (path with its query) through `endpoint`.
fn ask(
    d: &Decider,
    endpoint: &str,
    method: &'static str,
    path: &str,
) -> (&'static str, String, Vec<(&'static str, String)>) {
    match endpoint {
        AUTH_REQUEST => (
            "GET",
            d.url(AUTH_REQUEST),
            vec![
                ("x-original-method", method.to_string()),
                ("x-original-uri", path.to_string()),
            ],
        ),
        FORWARD_AUTH => (
            "GET",
            d.url(FORWARD_AUTH),
            vec![
                ("x-forwarded-method", method.to_string()),
                ("x-forwarded-uri", path.to_string()),
            ],
        ),
        _ => (method, d.url(&format!("{EXT_AUTHZ}{path}")), vec![]),
    }
}

async fn decide(
    d: &Decider,
    endpoint: &str,
    method: &'static str,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let (m, url, mut h) = ask(d, endpoint, method, path);
    let mut all: Vec<(&str, &str)> = h.iter_mut().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(headers);
    send(m, &url, &all, b"").await
}

const ENDPOINTS: [&str; 3] = [AUTH_REQUEST, FORWARD_AUTH, EXT_AUTHZ];

fn header(r: &Got, name: &str) -> String {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.headers))
}

/// ingress-nginx's auth subrequest, header for header as its controller template writes it
/// (`auth-method: GET` adds `X-Original-URI` and `X-Scheme`): decided on the original
/// request. Its `X-Original-URL` may be routed by (IIS, Symfony behind a trusted proxy):
/// taken only when it names the target decided.
#[tokio::test]
async fn ingress_nginx_auth_requests_are_decided() {
    let d = spawn_decider(None, "").await;
    let ingress = |uri: &'static str, url: &'static str| {
        vec![
            ("x-original-uri", uri),
            ("x-scheme", "https"),
            ("x-original-url", url),
            ("x-original-method", "GET"),
            ("x-sent-from", "nginx-ingress-controller"),
            ("x-real-ip", "203.0.113.7"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-auth-request-redirect", uri),
            ("x-request-id", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
            ("x-api-key", PERSONAL_KEY),
        ]
    };
    let url = d.url(AUTH_REQUEST);
    let ok = ingress(
        "/v1/items?page=2",
        "https://api.example.com/v1/items?page=2",
    );
    let r = send("GET", &url, &ok, b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!header(&r, "x-auth-subject-id").is_empty());
    let admin = ingress("/admin/users", "https://api.example.com/admin/users");
    let r = send("GET", &url, &admin, b"").await;
    assert_eq!(r.status, 403, "{}", r.text());
    // A client's X-Original-URL naming another target than the one decided.
    let forged = ingress("/v1/items", "https://api.example.com/admin/users");
    let r = send("GET", &url, &forged, b"").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "bad_request");
    d.shutdown().await;
}

/// A `_method` in a POST's original query makes Symfony, Laravel, Spring or Express serve
/// that method: it is authorized too, as by the proxy.
#[tokio::test]
async fn a_method_parameter_in_the_original_query_is_authorized_too() {
    let scopes = "scopes: [{ methods: [GET, HEAD, OPTIONS], any_of: [read, write] }, { methods: [POST, PUT, PATCH], any_of: [write] }, { methods: [DELETE], any_of: [admin] }]\n";
    let d = spawn_decider(None, scopes).await;
    let writer = [("x-api-key", SERVICE_KEY)];
    for endpoint in ENDPOINTS {
        for uri in [
            "/v1/items?_method=DELETE",
            "/v1/items%3F_method=DELETE",
            "/v1/items?a=1%26_method=DELETE",
        ] {
            let r = decide(&d, endpoint, "POST", uri, &writer).await;
            assert_eq!(r.status, 403, "{endpoint} {uri}: {}", r.text());
        }
        let r = decide(&d, endpoint, "POST", "/v1/items?_method=PATCH", &writer).await;
        assert_eq!(r.status, 200, "{endpoint}: {}", r.text());
    }
    d.shutdown().await;
}

#[tokio::test]
async fn allowed_answers_200_with_every_identity_header_and_never_calls_the_upstream() {
    let up = spawn_upstream().await;
    let d = spawn_decider(Some(up.addr), "").await;
    for endpoint in ENDPOINTS {
        let key = [("x-api-key", SERVICE_KEY), ("x-correlation-id", "corr-1")];
        let r = decide(&d, endpoint, "GET", "/v1/items?x=1", &key).await;
        assert_eq!(r.status, 200, "{endpoint}: {}", r.text());
        assert!(r.body.is_empty(), "{endpoint}");
        for name in IDENTITY {
            assert!(r.headers.contains_key(name), "{endpoint}: {name}");
        }
        assert_eq!(header(&r, "x-auth-subject-id"), "507f1f77bcf86cd799439015");
        assert_eq!(header(&r, "x-auth-key-id"), "key_demo_service");
        assert_eq!(header(&r, "x-auth-access-type"), "access");
        assert_eq!(header(&r, "x-auth-scopes"), "read write");
        assert_eq!(header(&r, "x-auth-environment"), "production");
        assert_eq!(header(&r, "x-auth-org-id"), "org_123");
        // Values the key does not have are present and empty.
        assert_eq!(header(&r, "x-auth-enterprise-id"), "");
        assert_eq!(header(&r, "x-auth-delegated-by"), "");
        assert_eq!(header(&r, "x-correlation-id"), "corr-1");
        assert_eq!(header(&r, "x-request-id"), "corr-1");
        assert!(!r.headers.contains_key("ratelimit-limit"), "no limit");
    }
    // A delegating enterprise key: the delegation header is read as the proxy reads it.
    let r = decide(
        &d,
        FORWARD_AUTH,
        "DELETE",
        "/v1/items/7",
        &[
            ("authorization", &format!("Bearer {ENTERPRISE_KEY}")),
            ("x-delegate-account-id", "507f1f77bc"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "x-auth-account-id"), "507f1f77bc");
    assert_eq!(header(&r, "x-auth-access-type"), "delegated");
    assert_eq!(
        header(&r, "x-auth-delegated-by"),
        "68c584136b9b08b8fc53a85e"
    );
    assert_eq!(
        header(&r, "x-auth-enterprise-id"),
        "68c584136b9b08b8fc53a85e"
    );
    assert_eq!(up.count(), 0, "a decision never contacts the upstream");
    d.shutdown().await;
}

/// Original method, path, request headers: the decision and the proxy must agree.
type Case = (&'static str, &'static str, Vec<(&'static str, String)>);

fn cases() -> Vec<Case> {
    let key = |k: &str| vec![("x-api-key", k.to_string())];
    vec![
        ("GET", "/v1/items", vec![]),
        ("GET", "/v1/items", vec![("authorization", "Bearer".into())]),
        ("GET", "/v1/items", key("sta_unknown_key_000000000000")),
        ("GET", "/v1/items", key(EXPIRED_KEY)),
        ("GET", "/v1/items", key(DISABLED_KEY)),
        ("GET", "/v1/items", key(STAGING_KEY)),
        ("POST", "/v1/items", key(PERSONAL_KEY)),
        ("GET", "/admin/users", key(SERVICE_KEY)),
        ("GET", "/v1/%2fadmin", key(SERVICE_KEY)),
        ("GET", "/v1/a;b", key(SERVICE_KEY)),
        ("GET", "/v1/a%5cb", key(SERVICE_KEY)),
        (
            "GET",
            "/v1/items",
            vec![
                ("x-api-key", SERVICE_KEY.into()),
                ("x-delegate-account-id", "507f1f77bc".into()),
            ],
        ),
        (
            "GET",
            "/v1/items",
            vec![
                ("x-api-key", ENTERPRISE_KEY.into()),
                ("x-delegate-account-id", "not_listed".into()),
            ],
        ),
        ("GET", "/v1/items", key(SERVICE_KEY)),
        ("GET", "/admin/users", key(ENTERPRISE_KEY)),
        ("GET", "/healthz", vec![]),
        ("GET", "/auth", key(PERSONAL_KEY)),
        ("GET", "/auth", vec![]),
    ]
}

#[tokio::test]
async fn every_answer_matches_the_proxy_for_each_endpoint() {
    let up = spawn_upstream().await;
    let d = spawn_decider(Some(up.addr), "").await;
    for (method, path, headers) in cases() {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let proxied = send(method, &d.proxy_url(path), &h, b"").await;
        for endpoint in ENDPOINTS {
            let r = decide(&d, endpoint, method, path, &h).await;
            let what = format!("{endpoint} {method} {path} {headers:?}");
            assert_eq!(r.status, proxied.status, "{what}: {}", r.text());
            assert_eq!(
                r.headers.get("www-authenticate"),
                proxied.headers.get("www-authenticate"),
                "{what}"
            );
            if r.status == 200 {
                assert!(r.body.is_empty(), "{what}");
                continue;
            }
            assert_eq!(header(&r, "content-type"), "application/json", "{what}");
            let (mut got, mut want) = (r.json(), proxied.json());
            for body in [&mut got, &mut want] {
                body.as_object_mut().unwrap().remove("correlation_id");
            }
            assert_eq!(got, want, "{what}");
        }
    }
    d.shutdown().await;
}

#[tokio::test]
async fn public_routes_are_allowed_and_the_introspection_path_is_the_apps() {
    let up = spawn_upstream().await;
    let d = spawn_decider(Some(up.addr), "").await;
    let r = decide(&d, AUTH_REQUEST, "POST", "/public/form", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for name in IDENTITY {
        assert_eq!(header(&r, name), "", "a public route names no one: {name}");
    }
    // The proxy answers its introspection path itself for GET and HEAD (any scopes), and
    // routes another method there like any request; behind a decision the front proxy
    // sends every request on to the app, so the path is routed and the method's scopes
    // are checked as for any other path.
    let read_only = [("x-api-key", PERSONAL_KEY)];
    for endpoint in ENDPOINTS {
        let r = decide(&d, endpoint, "GET", "/auth", &read_only).await;
        assert_eq!(r.status, 200, "{endpoint}: {}", r.text());
        assert_eq!(header(&r, "x-auth-key-id"), "key_demo_personal");
        for path in ["/auth", "/auth?x=1"] {
            let proxied = send("GET", &d.proxy_url(path), &read_only, b"").await;
            assert_eq!(proxied.status, 200, "the proxy's own answer: {path}");
            let proxied = send("DELETE", &d.proxy_url(path), &read_only, b"").await;
            assert_eq!(
                proxied.code(),
                "insufficient_scope",
                "routed by the proxy: {path}"
            );
            let r = decide(&d, endpoint, "DELETE", path, &read_only).await;
            assert_eq!(r.status, 403, "{endpoint} {path}: {}", r.text());
            assert_eq!(r.code(), "insufficient_scope", "{endpoint} {path}");
        }
    }
    d.shutdown().await;
}

/// Behind a decision the front proxy forwards the path as its client sent it, so only a
/// path already in normal form is decided on (SPEC 7: rules match exactly the path that is
/// forwarded). Otherwise a read-only key could reach an app that does not resolve dot
/// segments at `/admin/../v1/items` (authorized as `/v1/items`), and no key at all at
/// `/v1/items/../../healthz` (authorized as the public `/healthz`).
#[tokio::test]
async fn a_path_normalization_would_change_is_refused() {
    let up = spawn_upstream().await;
    let d = spawn_decider(Some(up.addr), "").await;
    let read_only = [("x-api-key", PERSONAL_KEY)];
    let admin = [("x-api-key", SERVICE_KEY)];
    let cases: [(&str, &[(&str, &str)]); 10] = [
        ("/admin/../v1/items", &read_only),
        ("/admin/%2e%2e/v1/items", &read_only),
        ("/admin/.%2E/v1/items", &read_only),
        ("/v1/items/../../healthz", &[]),
        ("/v1/items/%2e%2e/%2e%2e/healthz?x=1", &[]),
        ("/public/../admin/users", &admin),
        ("/v1/%2e%2e/%2e%2e/admin/users", &admin),
        ("//admin/users", &admin),
        ("/v1/./items", &read_only),
        ("/v1/%69tems", &read_only),
    ];
    for endpoint in ENDPOINTS {
        for (path, headers) in cases {
            let r = decide(&d, endpoint, "GET", path, headers).await;
            assert_eq!(r.status, 400, "{endpoint} {path}: {}", r.text());
            assert_eq!(r.code(), "bad_request", "{endpoint} {path}");
        }
        // What an app may read a path as is authorized too: cut at an encoded `?` (`/` is
        // not public), or NFKC-normalized (`‥` is `..`).
        for (path, headers, status) in [
            ("/public/..%3F", &[][..], 401),
            ("/public/%E2%80%A5/admin/users", &[][..], 401),
            ("/public/%E2%80%A5/admin/users", &read_only[..], 403),
            ("/v1/items%3Fx=1", &read_only[..], 200),
            ("/questions/tagged/c%23", &read_only[..], 200),
        ] {
            let r = decide(&d, endpoint, "GET", path, headers).await;
            assert_eq!(r.status, status, "{endpoint} {path}: {}", r.text());
        }
        // The same path in normal form is decided; so is one whose percent-encodings differ
        // from the normal form only in the case of their hex, which every reader decodes alike.
        for path in ["/v1/items", "/v1/caf%c3%a9", "/v1/caf%C3%A9?q=%2e%2e"] {
            let r = decide(&d, endpoint, "GET", path, &read_only).await;
            assert_eq!(r.status, 200, "{endpoint} {path}: {}", r.text());
        }
    }
    assert_eq!(up.count(), 0);
    d.shutdown().await;
}

/// A fragment in the original URI is refused (SPEC 7): parsing would drop it and authorize
/// the path before it, while the front proxy forwards the URI whole, and an app may read
/// `/v1/items#/../../admin/users` as `/admin/users`.
#[tokio::test]
async fn a_fragment_in_the_original_uri_is_refused() {
    let d = spawn_decider(None, "").await;
    for endpoint in [AUTH_REQUEST, FORWARD_AUTH] {
        for (path, key) in [
            ("/v1/items#/../../admin/users", Some(PERSONAL_KEY)),
            ("/healthz#/../admin/users", None),
            ("/v1/items?x=1#frag", Some(PERSONAL_KEY)),
        ] {
            let headers: Vec<_> = key.map(|k| ("x-api-key", k)).into_iter().collect();
            let r = decide(&d, endpoint, "GET", path, &headers).await;
            assert_eq!(r.status, 400, "{endpoint} {path}: {}", r.text());
            assert_eq!(r.code(), "bad_request", "{endpoint} {path}");
        }
    }
    // Envoy's ext_authz sends the original path as its own target: a fragment there is
    // refused too (an ext_authz client that passes the raw target would authorize
    // `/healthz` for an app that reads `/healthz#/../admin/users`).
    for target in ["/healthz#/../admin/users", "/v1/items#x"] {
        let req =
            format!("GET {EXT_AUTHZ}{target} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
        let reply = raw(d.decision, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(raw_status(&reply), 400, "{target}: {reply}");
        assert!(reply.contains("bad_request"), "{target}: {reply}");
    }
    d.shutdown().await;
}

/// The proxy strips a client's route, method and host overrides (SPEC 8); a front proxy
/// would pass them on to the app, so a decision request that carries one is refused: all
/// spellings, except the endpoint's own protocol headers and `allow_override_headers`.
#[tokio::test]
async fn override_headers_of_the_client_are_refused() {
    let key = ("x-api-key", SERVICE_KEY);
    let d = spawn_decider(None, "").await;
    for endpoint in ENDPOINTS {
        for name in [
            "x-http-method-override",
            "X-HTTP-Method",
            "x-original-url",
            "X-Rewrite-URL",
            "x-middleware-subrequest",
            "x_original_url",
            "x.http.method.override",
            // gunicorn's path from its peer, and the Flask recipe's prefix.
            "SCRIPT_NAME",
            "path_info",
            "X-Script-Name",
            // httpoxy: a CGI app's outbound proxy.
            "Proxy",
        ] {
            let r = decide(&d, endpoint, "GET", "/v1/items", &[key, (name, "DELETE")]).await;
            assert_eq!(r.status, 400, "{endpoint} {name}: {}", r.text());
            assert_eq!(r.code(), "bad_request", "{endpoint} {name}");
            // Named as SPEC 8's list spells it; ingress-nginx's own `X-Original-URL` is
            // refused on its endpoint for naming another target than the one decided.
            let canonical = name.to_ascii_lowercase().replace(['_', '.'], "-");
            let said = match (endpoint, name) {
                (AUTH_REQUEST, "x-original-url") => "original URL",
                _ => &canonical,
            };
            assert!(r.text().contains(said), "{}", r.text());
        }
    }
    // Another protocol's headers are the client's here, and so is another spelling.
    for (endpoint, forged) in [
        (FORWARD_AUTH, ("x-original-method", "DELETE")),
        (AUTH_REQUEST, ("x-forwarded-method", "DELETE")),
        (AUTH_REQUEST, ("x-forwarded-uri", "/admin")),
        (EXT_AUTHZ, ("x-forwarded-uri", "/admin")),
        (AUTH_REQUEST, ("x_original_uri", "/admin")),
    ] {
        let r = decide(&d, endpoint, "GET", "/v1/items", &[key, forged]).await;
        assert_eq!(r.status, 400, "{endpoint} {forged:?}: {}", r.text());
    }
    d.shutdown().await;

    let d = spawn_decider(None, "allow_override_headers: [X-HTTP-Method-Override]\n").await;
    let r = decide(
        &d,
        AUTH_REQUEST,
        "GET",
        "/v1/items",
        &[key, ("x-http-method-override", "GET")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // What an allowed override names is authorized too: `x-api-key` of a read-only key.
    let r = decide(
        &d,
        AUTH_REQUEST,
        "GET",
        "/v1/items",
        &[
            ("x-api-key", PERSONAL_KEY),
            ("x-http-method-override", "DELETE"),
        ],
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.code(), "insufficient_scope");
    d.shutdown().await;
}

/// A front proxy upgrades the app on the client's `Upgrade`: with two protocols it may match
/// one and send the other (Caddy matched `websocket` in a second field and upgraded the app
/// to `h2c`, a connection keyward never sees another request of). Refused; one protocol is
/// the front proxy's to pass or drop.
#[tokio::test]
async fn an_upgrade_naming_more_than_one_protocol_is_refused() {
    let key = ("x-api-key", SERVICE_KEY);
    let conn = ("connection", "upgrade");
    let d = spawn_decider(None, "").await;
    for endpoint in ENDPOINTS {
        for (upgrade, status) in [
            (&[("upgrade", "h2c"), ("upgrade", "websocket")][..], 400),
            (
                &[("upgrade", "websocket"), ("upgrade", "websocket")][..],
                400,
            ),
            (&[("upgrade", "websocket, h2c")][..], 400),
            (&[("upgrade", "websocket")][..], 200),
            (&[("upgrade", "h2c")][..], 200),
        ] {
            let mut headers = vec![key, conn];
            headers.extend_from_slice(upgrade);
            let r = decide(&d, endpoint, "GET", "/v1/items", &headers).await;
            assert_eq!(r.status, status, "{endpoint} {upgrade:?}: {}", r.text());
        }
    }
    d.shutdown().await;
}

/// A query key hidden where keyward's split of the query does not see it, but an app that
/// decodes before splitting does (after `%3F` or a fullwidth `？` in the path, behind `%26`
/// in the query), is refused on every endpoint, with a key or without.
#[tokio::test]
async fn a_hidden_query_key_is_refused_on_every_endpoint() {
    let d = spawn_decider(
        None,
        "credentials: [{ header: x-api-key }, { query: api_key }]\nforward_credential: true\n",
    )
    .await;
    let other = "sta_not_the_key_keyward_checked_0123";
    for endpoint in ENDPOINTS {
        for path in [
            format!("/public/x%3Fapi_key={other}"),
            format!("/public/x%EF%BC%9Fapi_key={other}"),
            format!("/public/x?a=1%26api_key={other}"),
        ] {
            for headers in [&[][..], &[("x-api-key", SERVICE_KEY)][..]] {
                let r = decide(&d, endpoint, "GET", &path, headers).await;
                assert_eq!(r.status, 400, "{endpoint} {path}: {}", r.text());
            }
        }
    }
    d.shutdown().await;
}

/// The proxy strips every `_` and `.` spelling of the identity and delegation headers
/// (SPEC 8); a front proxy strips or overwrites only keyward's spelling and passes the rest
/// on, and a CGI/WSGI app reads `X_Delegate_Account_Id` as the real one. A decision request
/// carrying one is refused; keyward's own spelling is the front proxy's to overwrite.
#[tokio::test]
async fn misspelled_identity_delegation_and_forwarding_headers_are_refused() {
    let key = ("x-api-key", ENTERPRISE_KEY);
    let d = spawn_decider(None, "").await;
    for endpoint in ENDPOINTS {
        for name in [
            "x_delegate_account_id",
            "X.Delegate.Account.Id",
            "x-delegate_account-id",
            "x_auth_org_id",
            "x-auth.subject-id",
            "X_Auth-Admin",
            "x_forwarded_host",
            "X.Forwarded.Proto",
            "true_client_ip",
            // A credential header's spelling: the app would read it as the key.
            "x_api_key",
            "X.Api.Key",
            // lighttpd's CGI/FastCGI makes every punctuation in a name `_`.
            "x~auth-subject-id",
            "x+auth+subject+id",
            "x~delegate~account~id",
            "x~api~key",
            "x~forwarded~host",
        ] {
            let r = decide(&d, endpoint, "GET", "/v1/items", &[key, (name, "victim")]).await;
            assert_eq!(r.status, 400, "{endpoint} {name}: {}", r.text());
            assert_eq!(r.code(), "bad_request", "{endpoint} {name}");
        }
        // A name under the prefix keyward does not answer with: the front proxy would
        // pass it on (it overwrites only keyward's twelve).
        for name in ["x-auth-custom_field", "x-auth-role", "X-Auth-User"] {
            let r = decide(&d, endpoint, "GET", "/v1/items", &[key, (name, "forged")]).await;
            assert_eq!(r.status, 400, "{endpoint} {name}: {}", r.text());
        }
        for name in ["x-auth-org-id", "x-delegate-account-idx", "x-forwarded-for"] {
            let r = decide(&d, endpoint, "GET", "/v1/items", &[key, (name, "forged")]).await;
            assert_eq!(r.status, 200, "{endpoint} {name}: {}", r.text());
        }
        // ingress-nginx's own header, on its endpoint only: Envoy, Istio, Traefik and
        // Caddy would pass a client's to the app (an oauth2-proxy redirect target).
        let name = "x-auth-request-redirect";
        let r = decide(&d, endpoint, "GET", "/v1/items", &[key, (name, "/back")]).await;
        let want = if endpoint == AUTH_REQUEST { 200 } else { 400 };
        assert_eq!(r.status, want, "{endpoint} {name}: {}", r.text());
    }
    d.shutdown().await;
}

/// A key in the query string would reach the app inside the URI the front proxy forwards:
/// decisions read it only when keys may be forwarded (`forward_credential: true`), and
/// otherwise refuse a request carrying one (however its name is spelled), which the app
/// would read unchecked.
#[tokio::test]
async fn query_keys_are_read_by_decisions_only_when_keys_may_be_forwarded() {
    let credentials = "credentials: [{ header: x-api-key }, { query: api_key }]\n";
    let path = format!("/v1/items?a=1&api_key={SERVICE_KEY}");
    for (forward, status) in [(false, 400), (true, 200)] {
        let d = spawn_decider(
            None,
            &format!("{credentials}forward_credential: {forward}\n"),
        )
        .await;
        for endpoint in ENDPOINTS {
            let r = decide(&d, endpoint, "GET", &path, &[]).await;
            assert_eq!(
                r.status,
                status,
                "{endpoint} forward {forward}: {}",
                r.text()
            );
        }
        // The header is read either way.
        let r = decide(
            &d,
            AUTH_REQUEST,
            "GET",
            "/v1/items",
            &[("x-api-key", SERVICE_KEY)],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        // A header key beside another key in the query: refused, never half-checked.
        let garbage = "sta_unchecked_garbage_key_zzzzzz";
        for name in [
            "api_key",
            "api%5Fkey",
            "api.key",
            "api_key[]",
            "%20api_key",
            "api[key",
            "API_KEY",
            "x=1;api_key",
            "]api_key",
            ".api_key",
            ".api_key]",
            "+api_key%00%",
        ] {
            let path = format!("/v1/items?{name}={garbage}");
            let key = [("x-api-key", SERVICE_KEY)];
            let r = decide(&d, AUTH_REQUEST, "GET", &path, &key).await;
            let code = if forward {
                "invalid_auth_header"
            } else {
                "bad_request"
            };
            assert_eq!(r.code(), code, "forward {forward} {name}: {}", r.text());
        }
        // Present but empty, or bare: no credential, as the proxy reads it.
        for path in [
            "/v1/items?api_key=",
            "/v1/items?api_key",
            "/v1/items?=api_key=",
        ] {
            let r = decide(&d, AUTH_REQUEST, "GET", path, &[("x-api-key", SERVICE_KEY)]).await;
            assert_eq!(r.status, 200, "forward {forward} {path}: {}", r.text());
        }
        d.shutdown().await;
    }
}

#[tokio::test]
async fn rate_limited_keys_get_ratelimit_headers_then_429() {
    let d = spawn_decider(None, "").await;
    let key = [("x-api-key", LIMITED_KEY)];
    for (endpoint, remaining) in [(AUTH_REQUEST, "1"), (EXT_AUTHZ, "0")] {
        let r = decide(&d, endpoint, "GET", "/v1/x", &key).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(header(&r, "ratelimit-limit"), "2");
        assert_eq!(header(&r, "ratelimit-remaining"), remaining);
    }
    // The bucket is the key's, whichever endpoint asks.
    let r = decide(&d, FORWARD_AUTH, "GET", "/v1/x", &key).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code(), "rate_limited");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(header(&r, "ratelimit-remaining"), "0");
    d.shutdown().await;
}

#[tokio::test]
async fn missing_original_method_or_uri_is_400_and_each_endpoint_reads_only_its_own() {
    let d = spawn_decider(None, "").await;
    let key = ("x-api-key", SERVICE_KEY);
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (AUTH_REQUEST, vec![key]),
        (AUTH_REQUEST, vec![key, ("x-original-uri", "/v1/x")]),
        (AUTH_REQUEST, vec![key, ("x-original-method", "GET")]),
        (
            AUTH_REQUEST,
            vec![
                key,
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/v1/x"),
            ],
        ),
        (FORWARD_AUTH, vec![key, ("x-forwarded-method", "GET")]),
        (FORWARD_AUTH, vec![key, ("x-forwarded-uri", "/v1/x")]),
        (
            FORWARD_AUTH,
            vec![
                key,
                ("x-original-method", "GET"),
                ("x-original-uri", "/v1/x"),
            ],
        ),
        (EXT_AUTHZ, vec![key]),
    ];
    for (endpoint, headers) in cases {
        let r = get(&d.url(endpoint), &headers).await;
        assert_eq!(r.status, 400, "{endpoint} {headers:?}: {}", r.text());
        assert_eq!(r.code(), "bad_request");
        assert!(r.json()["correlation_id"].is_string());
    }
    let r = get(&d.url("/v1/decide/other"), &[key]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "not_found");
    d.shutdown().await;
}

#[tokio::test]
async fn decisions_are_counted_and_logged_like_proxied_requests() {
    let d = spawn_decider(None, "").await;
    let key = [("x-api-key", SERVICE_KEY)];
    assert_eq!(
        decide(&d, AUTH_REQUEST, "GET", "/v1/x", &key).await.status,
        200
    );
    assert_eq!(
        decide(&d, EXT_AUTHZ, "GET", "/admin/x", &key).await.status,
        403
    );
    let m = get(&format!("http://{}/metrics", d.admin), &[])
        .await
        .text();
    let line = |series: &str| {
        m.lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("no {series} in\n{m}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        line(r#"keyward_requests_total{code="ok",decision="allowed"}"#),
        "1"
    );
    assert_eq!(
        line(r#"keyward_requests_total{code="insufficient_scope",decision="denied"}"#),
        "1"
    );
    assert_eq!(line("keyward_auth_duration_seconds_count"), "2");
    assert_eq!(line("keyward_in_flight_requests"), "0");
    d.shutdown().await;
}

#[tokio::test]
async fn decision_listener_speaks_h2c() {
    let d = spawn_decider(None, "").await;
    let r = get_h2c(
        &d.url("/v1/decide/ext-authz/v1/items"),
        &[("authorization", &format!("Token {SERVICE_KEY}"))],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, "x-auth-key-id"), "key_demo_service");
    d.shutdown().await;
}

#[tokio::test]
async fn decision_listener_enforces_head_timeout_and_connection_limit() {
    let d = spawn_decider(None, "limits: { header_read_timeout: 200ms }\n").await;
    // A head that never completes is cut off by header_read_timeout.
    let started = std::time::Instant::now();
    let head = b"GET /v1/decide/auth-request HTTP/1.1\r\nhost: a\r\n";
    let reply = raw(d.decision, head, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(4), "{reply:?}");
    d.shutdown().await;

    let d = spawn_decider(None, "limits: { max_connections: 1 }\n").await;
    // One connection held open (accepted first: the accept loop takes them in order); a
    // second is closed at once, without an answer.
    let held = tokio::net::TcpStream::connect(d.decision).await.unwrap();
    let ask = b"GET /v1/decide/ext-authz/healthz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
    let reply = raw(d.decision, ask, Duration::from_secs(2)).await;
    assert_eq!(reply, "", "over max_connections: closed without an answer");
    // The client saw only a closed connection: the operator sees it counted.
    let metrics = get(&format!("http://{}/metrics", d.admin), &[])
        .await
        .text();
    assert!(
        metrics.contains("keyward_connections_refused_total 1"),
        "{metrics}"
    );
    drop(held);
    // The slot is free again once keyward has seen the close (no push signal: poll).
    eventually("the slot is free again", || async {
        raw_status(&raw(d.decision, ask, Duration::from_millis(500)).await) == 200
    })
    .await;
    d.shutdown().await;
}

#[tokio::test]
async fn decision_only_keyward_has_no_proxy_listener_and_shuts_down() {
    let d = spawn_decider(None, "").await;
    assert!(d.proxy.is_none());
    let addr = d.decision;
    let r = decide(&d, AUTH_REQUEST, "GET", "/healthz", &[]).await;
    assert_eq!(r.status, 200);
    d.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

#[test]
fn keyward_check_accepts_a_decision_only_config() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, keys_yaml()).unwrap();
    let config = dir.path().join("keyward.yaml");
    std::fs::write(&config, decision_config(None, &keys, "")).unwrap();
    let out = support::child::command(&["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/decision/kubernetes/keyward.yaml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let c = keyward::config::Config::from_yaml(&text).expect("shipped decision config");
    assert!(c.listen.is_none() && c.decision.is_some());
}

/// A decision-only `keyward run` names its bound decision and admin ports in its start-up
/// line, says `proxy=none`, and the decision port it names answers.
#[tokio::test]
async fn the_start_up_line_names_the_bound_decision_port() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, keys_yaml()).unwrap();
    let config = decision_config(None, &keys, "");
    let kw = support::child::Keyward::start(dir, &config, &[]).await;
    assert_eq!(kw.proxy, None);
    let decision = kw.decision.expect("decision listener reported");
    assert_ne!(decision.port(), 0);
    assert_ne!(kw.admin.port(), 0);
    let line = format!(
        "keyward listening proxy=none admin={} decision={decision}",
        kw.admin
    );
    assert_eq!(kw.stdout.lock().unwrap().first(), Some(&line));
    let r = get(
        &format!("http://{decision}{FORWARD_AUTH}"),
        &[("x-forwarded-method", "GET"), ("x-forwarded-uri", "/v1/x")],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(!r.code().is_empty(), "keyward's error body: {}", r.text());
}

/// HTTP/2 zero-window pinning on the decision listener (the class of the proxy's finding):
/// a caller that opens no window cannot be sent a denial's body; the stream is cut within
/// `write_stall_timeout`, its connection closed, and its `max_connections` slot serves
/// the next caller.
#[tokio::test]
async fn a_caller_that_reads_nothing_cannot_pin_the_decision_listener() {
    let limits = "limits: { max_connections: 2, write_stall_timeout: 300ms }\n";
    let d = spawn_decider(None, limits).await;
    let started = std::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..2 {
        let stalled = zero_window_get(d.decision, "/v1/decide/ext-authz/v1/items", None).await;
        assert_eq!(stalled.status, 401, "the denial's head");
        held.push(stalled);
    }
    for stalled in held {
        tokio::time::timeout(Duration::from_secs(3), stalled.conn)
            .await
            .expect("a connection whose only stream stalled is closed")
            .unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // A 404 for no endpoint is a refusal too: it waits within the own answers' budget.
    let stalled = zero_window_get(d.decision, "/nope", None).await;
    assert_eq!(stalled.status, 404);
    assert_eq!(d.app.own_answers.waiting(), 1);
    tokio::time::timeout(Duration::from_secs(3), stalled.conn)
        .await
        .expect("closed")
        .unwrap();
    // Both slots serve ordinary callers again.
    for _ in 0..2 {
        let r = get_h2c(
            &d.url("/v1/decide/ext-authz/v1/items"),
            &[("authorization", &format!("Token {SERVICE_KEY}"))],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    d.shutdown().await;
}

/// Draining (SPEC 12) lets the decision listener's connections go as it does the proxy's:
/// during `drain_delay` an HTTP/1.1 keep-alive caller gets `Connection: close` on its next
/// answer and the connection is closed after it, so it reconnects instead of writing onto
/// a connection that is closed later.
#[tokio::test]
async fn draining_closes_decision_keep_alive_connections_after_their_next_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, keys_yaml()).unwrap();
    let config = decision_config(None, &keys, "").replace("drain_delay: 0s", "drain_delay: 2s");
    let kw = support::child::Keyward::start(dir, &config, &[]).await;
    let decision = kw.decision.expect("decision listener reported");
    let ask = format!(
        "GET {FORWARD_AUTH} HTTP/1.1\r\nhost: d\r\nx-forwarded-method: GET\r\nx-forwarded-uri: /v1/x\r\n\r\n"
    );
    let mut s = tokio::net::TcpStream::connect(decision).await.unwrap();
    s.write_all(ask.as_bytes()).await.unwrap();
    let before = read_response(&mut s).await.to_lowercase();
    assert_eq!(raw_status(&before), 401, "{before}");
    assert!(!before.contains("connection: close"), "{before}");

    kw.signal("-TERM");
    eventually("readyz fails", || async { kw.readyz().await == Some(503) }).await;
    s.write_all(ask.as_bytes()).await.unwrap();
    let during = read_response(&mut s).await.to_lowercase();
    assert_eq!(raw_status(&during), 401, "{during}");
    assert!(during.contains("connection: close"), "{during}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "closed after the answer: {closed:?}"
    );
    let (status, logs, _) = kw.wait_exit().await;
    assert!(status.success(), "{status:?}\n{logs:?}");
}

/// What other gateways assert about the client (`Remote-User`, a verified client
/// certificate, Kong's consumer) is stripped by the proxy unless the peer is trusted; a
/// front proxy would pass it to the app, so a decision request carrying one is refused,
/// unless the front proxy asking is in `trusted_proxies`.
#[tokio::test]
async fn other_gateways_assertions_are_refused_unless_the_caller_is_trusted() {
    let key = ("x-api-key", SERVICE_KEY);
    let d = spawn_decider(None, "").await;
    for endpoint in ENDPOINTS {
        for (name, value) in [
            ("remote-user", "admin"),
            ("x-ssl-client-verify", "SUCCESS"),
            ("x-client-cert-present", "true"),
            ("cf-cert-verified", "true"),
            ("x-tls-client-cert", "forged"),
            ("l5d-client-id", "admin.serviceaccount.identity.linkerd"),
            ("oidc-id-token-payload", "{}"),
            ("x-appengine-user-email", "a@example.com"),
            ("x-consumer-username", "admin"),
            ("x-authentik-groups", "admins"),
            ("cf-access-authenticated-user-email", "a@example.com"),
            ("x-forwarded-user", "admin"),
            ("x-forwarded-groups", "admins"),
            ("gap-auth", "admin@example.com"),
        ] {
            let r = decide(&d, endpoint, "GET", "/v1/items", &[key, (name, value)]).await;
            assert_eq!(r.status, 400, "{endpoint} {name}: {}", r.text());
            assert_eq!(r.code(), "bad_request");
        }
        // What front proxies set, and what a corporate forward proxy adds to its users'
        // requests.
        for (name, value) in [
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-client-cert", "By=spiffe://mesh/ns/x"),
            ("x-authenticated-user", "WinNT://corp/alice"),
        ] {
            let r = decide(&d, endpoint, "GET", "/v1/items", &[key, (name, value)]).await;
            assert_eq!(r.status, 200, "{endpoint} {name}: {}", r.text());
        }
    }
    d.shutdown().await;
    let d = spawn_decider(None, "trusted_proxies: [127.0.0.1]\n").await;
    let r = decide(
        &d,
        AUTH_REQUEST,
        "GET",
        "/v1/items",
        &[key, ("remote-user", "admin")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    d.shutdown().await;
}

/// The host the app will be asked for (`X-Forwarded-Host`, which Traefik's and Caddy's
/// forward auth and the shipped nginx config send) is refused when no host could hold it:
/// an app that builds its URL from it and searches the whole URL for `&api_key=` would
/// read a key there.
#[tokio::test]
async fn a_forwarded_host_no_host_could_be_is_refused() {
    let d = spawn_decider(None, "").await;
    let key = [("x-api-key", SERVICE_KEY)];
    for endpoint in ENDPOINTS {
        for host in ["x&api_key=sta_unchecked_garbage_key_zzzzzz&", "a=b"] {
            let h = [key[0], ("x-forwarded-host", host)];
            let r = decide(&d, endpoint, "GET", "/v1/items", &h).await;
            assert_eq!(r.status, 400, "{endpoint} {host}: {}", r.text());
        }
        // A host or a list of them, or none (Caddy sends an empty one for a request
        // without `Host`, an HTTP/1.0 health check).
        for host in [
            "api.example.com:8443",
            "a.example, b.example",
            "",
            "[fe80::1%25eth0]:80",
        ] {
            let h = [key[0], ("x-forwarded-host", host)];
            let r = decide(&d, endpoint, "GET", "/v1/items", &h).await;
            assert_eq!(r.status, 200, "{endpoint} {host:?}: {}", r.text());
        }
    }
    d.shutdown().await;
}
