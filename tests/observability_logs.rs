//! The real binary's logs (SPEC 11): what `keyward run` writes never carries a raw key, a
//! full digest or an email, and its log level comes from config, then the environment.

mod support;
use support::child::Keyward;
use support::prom::*;
use support::*;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use keyward::auth::Code;

/// method, path, request headers, expected status.
type ExtraCase = (&'static str, &'static str, Vec<(&'static str, String)>, u16);

/// `keyward run` with the demo keys and `extra` config (a `log:` line at least) in front of
/// `upstream`, with these environment variables; returns once `/readyz` answers 200.
async fn start(upstream: SocketAddr, extra: &str, env: &[(&str, &str)]) -> Keyward {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, DEMO_KEYS).unwrap();
    let config = config::ConfigBuilder::new(upstream, &keys)
        .routes(&[
            "{ path: /healthz, public: true }",
            "{ prefix: /admin/, any_of: [admin] }",
        ])
        .shutdown("0s", "2s")
        .remove("log")
        .extra(extra)
        .yaml();
    Keyward::start(dir, &config, env).await
}

fn json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
        })
        .collect()
}

fn with_message<'a>(logs: &'a [serde_json::Value], message: &str) -> Vec<&'a serde_json::Value> {
    logs.iter().filter(|l| l["message"] == message).collect()
}

/// `key`'s SHA-256 digest in unpadded base64url.
fn digest_base64url(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(keyward::keys::digest(key.as_bytes()))
}

/// The longest run of hex digits in `s`.
fn longest_hex_run(s: &str) -> usize {
    s.split(|c: char| !c.is_ascii_hexdigit())
        .map(str::len)
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn the_real_binary_never_logs_or_exports_a_secret() {
    let up = spawn_upstream().await;
    let bin = start(
        up.addr,
        "credentials:\n  - { header: authorization, scheme: Token }\n  \
         - { header: authorization, scheme: Bearer }\n  - { header: x-api-key }\n  \
         - { query: api_key }\n\
         log: { format: json, level: trace }\n\
         metrics: { per_key: true }\n",
        &[],
    )
    .await;

    let near_miss = format!("{}0", &SERVICE_KEY[..SERVICE_KEY.len() - 1]);
    let keys: Vec<String> = [
        SERVICE_KEY,
        ENTERPRISE_KEY,
        PERSONAL_KEY,
        DISABLED_KEY,
        EXPIRED_KEY,
        STAGING_KEY,
        "sta_unknown_secret_0123456789abcdef",
        "zzz_unprefixed_secret_0123456789abcdef",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([near_miss])
    .collect();
    let malformed = "sta_malformed_secret_0123456789abcdef";
    let wrong_admin_token = "wrong-admin-token-secret-0123456789";

    // Every request carries its own correlation id, to match it to its access-log line.
    let mut sent: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("obs-{n:03}")
    };
    for key in &keys {
        for source in ["token", "bearer", "x-api-key", "query"] {
            let cid = next_id();
            let (path, auth): (String, Vec<(&str, String)>) = match source {
                "token" => (
                    "/v1/items".into(),
                    vec![("authorization", format!("Token {key}"))],
                ),
                "bearer" => (
                    "/v1/items".into(),
                    vec![("authorization", format!("bearer {key}"))],
                ),
                "x-api-key" => ("/v1/items".into(), vec![("X-API-KEY", key.clone())]),
                _ => (format!("/v1/items?api_key={key}&x=1"), vec![]),
            };
            let mut headers: Vec<(&str, &str)> =
                auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
            headers.push(("x-correlation-id", &cid));
            let r = get(&bin.url(&path), &headers).await;
            assert_eq!(r.headers["x-correlation-id"], cid.as_str());
            sent.insert(cid, ("GET".into(), "/v1/items".into()));
        }
    }
    let h = |v: &[(&'static str, String)], cid: &str| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> =
            v.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        v.push(("x-correlation-id".into(), cid.to_string()));
        v
    };
    let extra: Vec<ExtraCase> = vec![
        // Introspection, answered by keyward.
        (
            "GET",
            "/auth",
            vec![("authorization", format!("Bearer {SERVICE_KEY}"))],
            200,
        ),
        // Scope and delegation denials of recognized keys.
        (
            "POST",
            "/v1/items",
            vec![("x-api-key", PERSONAL_KEY.into())],
            403,
        ),
        (
            "GET",
            "/v1/items",
            vec![
                ("x-api-key", ENTERPRISE_KEY.into()),
                ("x-delegate-account-id", "someone-else".into()),
            ],
            403,
        ),
        // Malformed and ambiguous credentials.
        (
            "GET",
            "/v1/items",
            vec![("authorization", format!("Token {malformed} extra"))],
            401,
        ),
        (
            "GET",
            "/v1/items",
            vec![
                ("authorization", format!("Token {SERVICE_KEY}")),
                ("x-api-key", PERSONAL_KEY.into()),
            ],
            401,
        ),
        // A public route with a key anyway, and a path keyward refuses.
        (
            "GET",
            "/healthz",
            vec![("x-api-key", SERVICE_KEY.into())],
            200,
        ),
        (
            "GET",
            "/a%2Fb",
            vec![("x-api-key", SERVICE_KEY.into())],
            400,
        ),
    ];
    for (method, path, headers, status) in &extra {
        let cid = next_id();
        let hv = h(headers, &cid);
        let hv: Vec<(&str, &str)> = hv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = send(method, &bin.url(path), &hv, b"").await;
        assert_eq!(r.status, *status, "{method} {path}: {}", r.text());
        // A path that cannot be normalized is logged as received.
        sent.insert(cid, (method.to_string(), path.to_string()));
    }
    // A key in the path (an API that takes it there, or a client's mistake): the segment
    // holding it is logged as `[redacted]`, whether or not the request is allowed, with a
    // credential or without, escaped or not, normalized or refused as sent.
    let escaped = SERVICE_KEY.replacen('_', "%5F", 1);
    let in_path = [
        (
            format!("/v1/verify/{SERVICE_KEY}"),
            true,
            200,
            "/v1/verify/[redacted]",
        ),
        (
            format!("/bot{SERVICE_KEY}/getMe"),
            false,
            401,
            "/[redacted]/getMe",
        ),
        (format!("/v1/{escaped}/x"), true, 200, "/v1/[redacted]/x"),
        (
            format!("/a%2Fb/{SERVICE_KEY}"),
            true,
            400,
            "/a%2Fb/[redacted]",
        ),
        // A key's digest, in hex or base64url, is key material too.
        (
            format!(
                "/v1/items/{}",
                hex::encode(keyward::keys::digest(SERVICE_KEY.as_bytes()))
            ),
            true,
            200,
            "/v1/items/[redacted]",
        ),
        (
            format!("/v1/items/{}/x", digest_base64url(SERVICE_KEY)),
            false,
            401,
            "/v1/items/[redacted]/x",
        ),
    ];
    for (path, keyed, status, logged) in &in_path {
        let cid = next_id();
        let mut hv = vec![("x-correlation-id", cid.as_str())];
        if *keyed {
            hv.push(("x-api-key", SERVICE_KEY));
        }
        let r = get(&bin.url(path), &hv).await;
        assert_eq!(r.status, *status, "{path}: {}", r.text());
        if *status == 200 {
            // Only the log is screened: the app gets the path as it was sent.
            let target = up.last().target;
            assert_eq!(target.replace("%5F", "_"), path.replace("%5F", "_"));
        }
        sent.insert(cid, ("GET".into(), logged.to_string()));
    }
    // HTTP/2 (h2c) too: its frame logging must not carry header values either.
    let cid = next_id();
    let r = get_h2c(
        &bin.url("/v1/items"),
        &[("x-api-key", SERVICE_KEY), ("x-correlation-id", &cid)],
    )
    .await;
    assert_eq!(r.status, 200);
    sent.insert(cid, ("GET".into(), "/v1/items".into()));

    // Admin actions: a read, a refused revoke (file source), a wrong token.
    let admin = admin_auth();
    let r = get(
        &bin.admin_url("/v1/snapshot"),
        &[("authorization", admin.as_str())],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        "POST",
        &bin.admin_url("/v1/keys/key_demo_service/disable"),
        &[("authorization", admin.as_str())],
        b"",
    )
    .await;
    assert_eq!(r.status, 409);
    let wrong = format!("Bearer {wrong_admin_token}");
    let r = get(
        &bin.admin_url("/v1/snapshot"),
        &[("authorization", wrong.as_str())],
    )
    .await;
    assert_eq!(r.status, 401);

    // A reload that is refused (a duplicated digest), then a good one.
    let keys_file = bin.dir.path().join("keys.yaml");
    let dup = DEMO_KEYS.replace(
        "451b4043e4598c8b59570fe2073d3749196be7b9db7e0101cac04fdef07f0363",
        &sha256_hex(SERVICE_KEY),
    );
    replace_file(&keys_file, &dup);
    let metrics_url = bin.admin_url("/metrics");
    let error = [("source", "file"), ("result", "error")];
    eventually("the refused reload is counted", || {
        let m = metrics_url.clone();
        async move {
            scrape(&m)
                .await
                .get("keyward_snapshot_reloads_total", &error)
                == 1.0
        }
    })
    .await;
    replace_file(&keys_file, &DEMO_KEYS.replace("version: 1", "version: 2"));
    eventually("version 2 is loaded", || {
        let m = metrics_url.clone();
        async move { scrape(&m).await.get("keyward_snapshot_version", &[]) == 2.0 }
    })
    .await;

    let metrics = scrape(&metrics_url).await;
    let total: f64 = Code::ALL.iter().map(|c| requests(&metrics, *c)).sum();
    assert_eq!(total as usize, sent.len(), "one count per request");
    assert_eq!(metrics.get("keyward_in_flight_requests", &[]), 0.0);

    let (listen, admin_addr) = (bin.addr().to_string(), bin.admin.to_string());
    let (status, stderr, stdout) = bin.terminate().await;
    let logs_text = stderr.join("\n");
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{logs_text}"
    );
    let logs = json_lines(&stderr);

    // --- nothing secret, anywhere ----------------------------------------------------------
    let mut secrets: Vec<String> = keys.clone();
    secrets.extend(keys.iter().map(|k| sha256_hex(k.as_str())));
    secrets.extend([
        malformed.to_string(),
        sha256_hex(malformed),
        DEMO_ADMIN_TOKEN.to_string(),
        wrong_admin_token.to_string(),
        sha256_hex(DEMO_ADMIN_TOKEN),
        "ci-bot@example.com".into(),
        "dev@example.com".into(),
    ]);
    for (what, text) in [
        ("logs", &logs_text),
        ("stdout", &stdout.join("\n")),
        ("/metrics", &metrics.text),
    ] {
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{what} contain {secret:?}");
        }
        assert!(
            !text.contains("@example.com"),
            "{what} contain an email:\n{text}"
        );
        // Not a full digest, nor a truncated one long enough to search for.
        assert!(
            longest_hex_run(text) < 32,
            "{what} contain a long hex string:\n{text}"
        );
    }
    // Nor does the app ever see a key, in any header or in the query.
    let seen_by_app = up.requests();
    assert!(!seen_by_app.is_empty());
    // A key the client itself put in the path is the app's to see (its API takes it).
    let in_path_target = |t: &str| {
        in_path
            .iter()
            .any(|(p, ..)| p.replace("%5F", "_") == t.replace("%5F", "_"))
    };
    for req in &seen_by_app {
        if in_path_target(&req.target) {
            continue;
        }
        let mut text = req.target.clone();
        for (name, value) in &req.headers {
            text.push_str(&format!(
                "\n{name}: {}",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        for key in keys.iter().map(String::as_str).chain([malformed]) {
            assert!(!text.contains(key), "the app saw {key:?}:\n{text}");
        }
    }
    assert!(
        metrics.text.contains(r#"key_id="key_demo_expired""#),
        "per_key is on here: key ids (public) may appear, nothing else"
    );

    // --- one access-log line per request, with the SPEC 11 fields ---------------------------
    let access: Vec<&serde_json::Value> = logs
        .iter()
        .filter(|l| l["target"] == "keyward::access")
        .collect();
    assert_eq!(access.len(), sent.len(), "{logs_text}");
    let mut seen = std::collections::BTreeSet::new();
    for line in &access {
        for field in ["timestamp", "correlation_id", "method", "path", "code"] {
            assert!(line[field].is_string(), "{field} missing: {line}");
        }
        assert!(line["status"].is_u64(), "status: {line}");
        assert!(line["total_ms"].is_f64(), "total_ms: {line}");
        let cid = line["correlation_id"].as_str().unwrap().to_string();
        let (method, path) = sent
            .get(&cid)
            .unwrap_or_else(|| panic!("unknown correlation id: {line}"));
        assert_eq!(line["method"], method.as_str(), "{line}");
        assert_eq!(line["path"], path.as_str(), "{line}");
        // Fields without a value (no key recognized, nothing forwarded) are left out.
        let ok = line["code"] == "ok";
        if ok && path != "/healthz" {
            assert!(line["key_id"].is_string(), "key_id: {line}");
            assert!(line["principal_type"].is_string(), "principal_type: {line}");
        }
        if ok && path != "/auth" {
            assert!(line["upstream_ms"].is_f64(), "upstream_ms: {line}");
        } else {
            assert!(line.get("upstream_ms").is_none(), "upstream_ms: {line}");
        }
        assert!(seen.insert(cid), "two lines for one request");
    }
    let by_cid = |cid: &str| *access.iter().find(|l| l["correlation_id"] == cid).unwrap();
    // obs-001: the service key as `Token`, allowed.
    let first = by_cid("obs-001");
    assert_eq!(first["status"], 200);
    assert_eq!(first["code"], "ok");
    assert_eq!(first["key_id"], "key_demo_service");
    assert_eq!(first["principal_type"], "service_account");
    // obs-013: the disabled key as `Token`.
    let disabled = by_cid("obs-013");
    assert_eq!(disabled["status"], 401);
    assert_eq!(disabled["code"], "disabled_api_key");
    let intro = by_cid(&format!("obs-{:03}", keys.len() * 4 + 1));
    assert_eq!(intro["path"], "/auth");
    assert_eq!(intro["key_id"], "key_demo_service");

    // --- the startup line, reloads, admin actions, shutdown ---------------------------------
    let started = with_message(&logs, "keyward started");
    assert_eq!(started.len(), 1, "{logs_text}");
    let started = started[0];
    assert_eq!(started["listen"], listen.as_str());
    assert_eq!(started["admin"], admin_addr.as_str());
    assert_eq!(started["upstream"], format!("http://{}", up.addr));
    assert_eq!(started["per_key_metrics"].as_bool(), Some(true));
    assert_eq!(started["log_filter"], "trace");
    assert_eq!(started["log_filter_source"], "log.level");
    assert_eq!(started["environment"], "production");

    let loaded = with_message(&logs, "key snapshot loaded");
    assert_eq!(loaded.len(), 2, "initial load and the good reload");
    assert!(loaded
        .iter()
        .all(|l| l["outcome"] == "ok" && l["source"] == "file"));
    assert_eq!(loaded[0]["version"], 1);
    assert_eq!(loaded[1]["version"], 2);
    let refused = with_message(&logs, "key snapshot refused; keeping the last good one");
    assert_eq!(refused.len(), 1, "{logs_text}");
    assert_eq!(refused[0]["outcome"], "error");
    assert!(
        refused[0]["error"]
            .as_str()
            .unwrap()
            .contains("duplicate sha256"),
        "{}",
        refused[0]
    );

    let admin_lines: Vec<&serde_json::Value> = logs
        .iter()
        .filter(|l| l["target"] == "keyward::admin")
        .collect();
    let outcome = |method: &str, path: &str| -> (u64, String) {
        let l = admin_lines
            .iter()
            .find(|l| l["method"] == method && l["path"] == path)
            .unwrap_or_else(|| panic!("no admin line for {method} {path}:\n{logs_text}"));
        (
            l["status"].as_u64().unwrap(),
            l["outcome"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(outcome("GET", "/v1/snapshot"), (200, "ok".into()));
    assert_eq!(
        outcome("POST", "/v1/keys/key_demo_service/disable"),
        (409, "refused".into())
    );
    assert!(
        admin_lines
            .iter()
            .any(|l| l["status"] == 401 && l["outcome"] == "unauthorized"),
        "{logs_text}"
    );

    assert_eq!(with_message(&logs, "SIGTERM received").len(), 1);
    assert_eq!(with_message(&logs, "keyward stopped").len(), 1);
}

#[tokio::test]
async fn the_binary_takes_its_log_level_from_config_then_environment() {
    let up = spawn_upstream().await;
    let started = |lines: &[String]| {
        json_lines(lines)
            .iter()
            .filter(|l| l["message"] == "keyward started")
            .count()
    };
    for (level, env, expect_info) in [
        ("warn", vec![], false),
        (
            "warn",
            vec![("KEYWARD_LOG", "info"), ("RUST_LOG", "off")],
            true,
        ),
        ("error", vec![("RUST_LOG", "info")], true),
        (
            "info",
            vec![("KEYWARD_LOG", "warn"), ("RUST_LOG", "info")],
            false,
        ),
    ] {
        let bin = start(
            up.addr,
            &format!("log: {{ format: json, level: {level} }}\n"),
            &env,
        )
        .await;
        // One request through the traffic listener, so the server loop (and the signal
        // handler with it) is running before SIGTERM.
        assert_eq!(get(&bin.url("/v1/items"), &[]).await.status, 401);
        let (status, stderr, _) = bin.terminate().await;
        assert!(status.success(), "{status}: {stderr:?}");
        assert_eq!(
            started(&stderr) == 1,
            expect_info,
            "level {level}, env {env:?}:\n{}",
            stderr.join("\n")
        );
        if !expect_info {
            assert!(
                json_lines(&stderr)
                    .iter()
                    .all(|l| l["level"] == "WARN" || l["level"] == "ERROR"),
                "{stderr:?}"
            );
        }
    }
}

/// A client chooses how long its path is and what its method is: the access log line
/// carries at most 1 KiB of the path (cut with `…`), so refused requests cannot write as
/// many bytes of log as they send, and a method neither HTTP's own nor named by a scope
/// rule as `OTHER` (a key sent as the method was logged); a refused head leaves a line too.
#[tokio::test]
async fn the_access_log_bounds_what_the_client_chose() {
    let up = spawn_upstream().await;
    let bin = start(up.addr, "log: { format: json, level: info }\n", &[]).await;
    // Not hex: a long run of hex digits could hold a digest, and is logged as `[redacted]`.
    let path = format!("/v1/{}", "p".repeat(12_000));
    let method = "M".repeat(500);
    let r = send(&method, &bin.url(&path), &[], b"").await;
    assert_eq!(r.status, 401);
    let r = send(
        SERVICE_KEY,
        &bin.url("/v1/x"),
        &[("x-api-key", SERVICE_KEY)],
        b"",
    )
    .await;
    assert_eq!(r.status, 403);
    // A key after an encoded `?` is a query to an app that decodes first: not logged.
    let query_in_path = format!("/v1/x%3Fapi_key={SERVICE_KEY}");
    let r = get(&bin.url(&query_in_path), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 200);
    let big = format!(
        "GET /v1/x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(17_000)
    );
    assert!(raw(
        bin.addr(),
        big.as_bytes(),
        std::time::Duration::from_secs(2)
    )
    .await
    .starts_with("HTTP/1.1 431"));
    let (_, stderr, _) = bin.terminate().await;
    let logs = json_lines(&stderr);
    let access: Vec<_> = logs
        .iter()
        .filter(|l| l["target"] == "keyward::access")
        .collect();
    let long = access
        .iter()
        .find(|l| l["status"] == 401)
        .expect("the refused request's line");
    let logged_path = long["path"].as_str().unwrap();
    assert!(
        logged_path.len() <= 1024 + 3 && logged_path.ends_with('…'),
        "{logged_path}"
    );
    assert_eq!(long["method"], "OTHER");
    assert!(
        !stderr.iter().any(|l| l.contains(&SERVICE_KEY[8..])),
        "a key sent as the method, or in the path after an encoded ?, was logged"
    );
    assert!(
        access
            .iter()
            .any(|l| l["status"] == 431 && l["code"] == "request_header_fields_too_large"),
        "{access:?}"
    );
}

/// The admin listener's log lines are bounded as the access log's are (a caller without
/// the token chooses the method and path), and a revoke's key id is logged and answered
/// only when the snapshot has it: an operator may paste the leaked key itself there.
#[tokio::test]
async fn the_admin_log_bounds_what_the_caller_chose_and_never_echoes_an_unknown_id() {
    let up = spawn_upstream().await;
    let bin = start(up.addr, "log: { format: json, level: info }\n", &[]).await;
    let path = format!("/v1/{}", "p".repeat(12_000));
    let method = "M".repeat(500);
    let r = send(&method, &bin.admin_url(&path), &[], b"").await;
    assert_eq!(r.status, 401);
    let r = send(SERVICE_KEY, &bin.admin_url("/v1/snapshot"), &[], b"").await;
    assert_eq!(r.status, 401);
    let auth = admin_auth();
    let pasted = format!("/v1/keys/{SERVICE_KEY}/disable");
    let r = send(
        "POST",
        &bin.admin_url(&pasted),
        &[("authorization", auth.as_str())],
        b"",
    )
    .await;
    assert_eq!(r.status, 409, "a file source: {}", r.text());
    assert!(!r.text().contains(SERVICE_KEY), "{}", r.text());
    // A key or a digest pasted as a query parameter's name is not quoted back.
    let digest = hex::encode(keyward::keys::digest(SERVICE_KEY.as_bytes()));
    for query in [format!("?{SERVICE_KEY}"), format!("?force=true&{digest}=1")] {
        let r = send(
            "POST",
            &bin.admin_url(&format!("/v1/snapshot/reload{query}")),
            &[("authorization", auth.as_str())],
            b"",
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(
            r.text().contains("unknown query parameter #"),
            "{}",
            r.text()
        );
        assert!(!r.text().contains(SERVICE_KEY), "{}", r.text());
        assert!(!r.text().contains(&digest[..16]), "{}", r.text());
    }
    // Paths that are no endpoint, with or without the token.
    for path in [
        format!("/v1/keys/{SERVICE_KEY}"),
        format!("/v1/keys/{SERVICE_KEY}%2Fdisable"),
        format!("/v1/key/{SERVICE_KEY}/disable"),
        format!("/v1/keys/key_demo_service/{SERVICE_KEY}"),
    ] {
        for h in [vec![("authorization", auth.as_str())], vec![]] {
            let r = send("POST", &bin.admin_url(&path), &h, b"").await;
            assert!(!r.text().contains(SERVICE_KEY), "{}", r.text());
        }
    }
    let (_, stderr, _) = bin.terminate().await;
    let logs = json_lines(&stderr);
    let admin: Vec<_> = logs
        .iter()
        .filter(|l| l["target"] == "keyward::admin")
        .collect();
    let refused = with_message(&logs, "admin request refused");
    let line = refused.first().expect("the refused call's line");
    assert!(line["path"].as_str().unwrap().len() <= 1024 + 3, "{line}");
    assert_eq!(line["method"], "OTHER", "{line}");
    assert!(
        admin.iter().any(|l| l["path"] == "/v1/keys/…/disable"),
        "{admin:?}"
    );
    assert!(
        !stderr.iter().any(|l| l.contains(SERVICE_KEY)),
        "the pasted key was logged"
    );
}

/// A client that gives up on an allowed request is counted as gone (499
/// `client_closed_request`, decision `allowed`) and its line names the key it came with,
/// whether it left while the upstream was slow or in the middle of its body. Before, a
/// body broken off by the client's close was a `denied` 400 `bad_request`, and a request
/// left waiting on the upstream was logged without its key.
#[tokio::test]
async fn a_request_its_client_gives_up_is_a_499_naming_its_key() {
    use tokio::io::AsyncWriteExt;
    let up = upstream()
        .route("/slow", Reply::After(std::time::Duration::from_secs(3)))
        .spawn()
        .await;
    let bin = start(up.addr, "log: { format: json, level: info }\n", &[]).await;
    let in_flight = || async {
        scrape(&bin.admin_url("/metrics"))
            .await
            .get("keyward_in_flight_requests", &[])
    };
    let heads = [
        format!("GET /slow HTTP/1.1\r\nhost: x\r\nx-api-key: {SERVICE_KEY}\r\n\r\n"),
        format!(
            "POST /v1/up HTTP/1.1\r\nhost: x\r\nx-api-key: {SERVICE_KEY}\r\ncontent-length: 1000\r\n\r\n0123456789"
        ),
    ];
    for head in heads {
        let mut client = tokio::net::TcpStream::connect(bin.addr()).await.unwrap();
        client.write_all(head.as_bytes()).await.unwrap();
        eventually("the request is under way", || async {
            in_flight().await == 1.0
        })
        .await;
        drop(client);
        eventually("the request is over", || async { in_flight().await == 0.0 }).await;
    }
    let s = scrape(&bin.admin_url("/metrics")).await;
    let gone = [("code", "client_closed_request"), ("decision", "allowed")];
    assert_eq!(s.get("keyward_requests_total", &gone), 2.0, "{}", s.text);
    let refused = [("code", "bad_request"), ("decision", "denied")];
    assert_eq!(s.get("keyward_requests_total", &refused), 0.0, "{}", s.text);
    let (_, stderr, _) = bin.terminate().await;
    let logs = json_lines(&stderr);
    let gone: Vec<_> = logs
        .iter()
        .filter(|l| l["target"] == "keyward::access" && l["status"] == 499)
        .collect();
    assert_eq!(gone.len(), 2, "{logs:?}");
    for line in gone {
        assert_eq!(line["code"], "client_closed_request", "{line}");
        assert_eq!(line["key_id"], "key_demo_service", "{line}");
    }
}
