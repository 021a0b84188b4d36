//! Decision mode behind the real proxies: nginx (`auth_request`) and Caddy (`forward_auth`)
//! run the configs shipped in `deploy/decision/`, in front of a recording upstream, with
//! keyward deciding; and Envoy / Istio HTTP `ext_authz` is spoken exactly as Envoy speaks it.
//!
//! Each proves: an allowed request reaches the app with its identity; no key is 401; a wrong
//! scope is 403; a route rule is 403; path tricks are denied; the rate limit is 429; and a
//! client's forged `x-auth-*` never reaches the app, including a header the key has no value
//! for. A proxy whose binary is not installed is skipped with a message (CI installs both).

mod decision_support;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use decision_support::*;
use support::*;

fn shipped(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/decision")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A proxy process, killed when dropped.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Wait until the proxy accepts connections on `addr` (or fail with its log).
    async fn ready(&mut self, addr: SocketAddr) {
        for _ in 0..400 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("proxy exited ({status}): {}", self.log_text());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("proxy did not listen on {addr}: {}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn installed(binary: &str) -> bool {
    let found = Path::new(binary).exists()
        || Command::new("sh")
            .args(["-c", &format!("command -v {binary}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !found {
        println!("SKIPPED: {binary} is not installed (CI installs it: apt-get install nginx-light caddy)");
    }
    found
}

/// nginx with the shipped `deploy/decision/nginx.conf`, its placeholders substituted,
/// included in a minimal main config that runs it in the foreground from a temp prefix.
fn start_nginx(dir: &Path, keyward: SocketAddr, app: SocketAddr, listen: SocketAddr) -> Running {
    let site = shipped("nginx.conf")
        .replace("${KEYWARD}", &keyward.to_string())
        .replace("${APP}", &app.to_string())
        .replace("${LISTEN}", &listen.to_string());
    assert!(!site.contains("${"), "every placeholder substituted");
    std::fs::write(dir.join("decision.conf"), site).unwrap();
    let d = dir.display();
    let main = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         include {d}/decision.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let log = dir.join("error.log");
    let child = Command::new("/usr/sbin/nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    Running { child, log }
}

/// Caddy with the shipped `deploy/decision/Caddyfile` (its `{$...}` placeholders are Caddy's
/// own environment variables).
fn start_caddy(dir: &Path, keyward: SocketAddr, app: SocketAddr, listen: SocketAddr) -> Running {
    let file = dir.join("Caddyfile");
    std::fs::write(&file, shipped("Caddyfile")).unwrap();
    let log = dir.join("caddy.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&file)
        .env("KEYWARD", keyward.to_string())
        .env("APP", app.to_string())
        .env("LISTEN", listen.to_string())
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir)
        .env("XDG_CONFIG_HOME", dir)
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("start caddy");
    Running { child, log }
}

/// The identity headers a client tries to forge (one the key has, two it has no value for)
/// and their CGI-style aliases, in every mix of separators.
const FORGED: [(&str, &str); 9] = [
    ("x-auth-subject-id", "forged-subject"),
    ("x-auth-enterprise-id", "forged-enterprise"),
    ("x-auth-delegated-by", "forged-delegator"),
    ("x-auth-account-short-id", "forged-short"),
    ("x-auth-key-id", "forged-key"),
    ("x_auth_org_id", "forged-underscore-alias"),
    ("x-auth_org-id", "forged-mixed-alias"),
    ("x_auth-org_id", "forged-mixed-alias-2"),
    ("x-auth.org-id", "forged-dot-alias"),
];

/// What a client sends to make the app read another request than the one authorized
/// (SPEC 8's overrides, the decision protocols' own headers, forwarding headers), and a
/// `Connection` header naming identity headers, which a proxy that honours it would remove
/// after copying keyward's in. None may reach the app as sent.
const REROUTED: [(&str, &str); 30] = [
    // Forwarding headers the proxy strips, in `-` and `_`/`.` spellings.
    ("x_forwarded_host", "forged-forwarded-host-alias"),
    ("x.forwarded.proto", "forged-forwarded-proto-alias"),
    ("true-client-ip", "forged-true-client-ip"),
    ("x-forwarded-path", "forged-forwarded-path"),
    ("x-url-scheme", "forged-url-scheme"),
    ("x-original-uri", "forged-original-uri"),
    // Spellings of the delegation header the proxy strips by keyward's spelling only.
    ("x_delegate_account_id", "forged-delegate-underscore"),
    ("x.delegate.account.id", "forged-delegate-dot"),
    ("x-original-method", "forged-original-method"),
    ("x-forwarded-uri", "forged-forwarded-uri"),
    ("x-forwarded-method", "forged-forwarded-method"),
    ("x-http-method-override", "forged-method-override"),
    ("x-original-url", "forged-original-url"),
    ("x-forwarded-prefix", "forged-prefix"),
    ("x-forwarded-host", "forged-host"),
    ("forwarded", "forged-forwarded"),
    ("x-real-ip", "forged-real-ip"),
    // Forwarding and assertion names keyward takes from no client but a decision does not
    // refuse (a front proxy sets the forwarding family; corporate proxies add
    // X-Authenticated-User): the shipped configs strip them.
    ("x-forwarded", "forged-forwarded-bare"),
    ("x-forwarded-client-cert", "forged-xfcc"),
    ("x-forwarded-tls-client-cert-info", "forged-traefik-cert"),
    ("x-forwarded-protocol", "forged-protocol"),
    ("x-forwarded-https", "forged-https"),
    ("x-arr-ssl", "forged-arr-ssl"),
    ("x-envoy-internal", "forged-envoy-internal"),
    ("x-envoy-external-address", "forged-envoy-address"),
    ("x-authenticated-userid", "forged-kong-user"),
    ("x-authenticated-scope", "forged-kong-scope"),
    ("x-auth-request-redirect", "forged-redirect"),
    // An override keyward takes on auth-request when it names the target decided: nginx
    // clears it both ways.
    ("x-original-url", "forged-original-url"),
    (
        "connection",
        "x-auth-key-id, x-auth-access-type, x-auth-scopes",
    ),
];

/// A name that is not one of keyward's twelve: a proxy that strips by prefix (Caddy, here)
/// removes it; behind one that cannot (nginx), keyward refuses the request.
const FORGED_OTHER: (&str, &str) = ("x-auth-admin", "forged-unknown-name");

fn assert_nothing_forged(seen: &Seen, what: &str) {
    for (name, value) in &seen.headers {
        let v = value.to_str().unwrap_or_default();
        assert!(
            !v.starts_with("forged"),
            "{what}: forged {name}: {v} reached the app ({:?})",
            seen.headers
        );
    }
}

/// Method, path, headers, the statuses that count as refused.
type Refused = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static [u16],
);

/// The scenario every proxy must pass; `front` is the proxy's address.
async fn scenario(front: SocketAddr, up: &Upstream, name: &str, strips_prefix: bool) {
    let url = |p: &str| format!("http://{front}{p}");

    // Allowed, with forged identity headers alongside the key.
    let mut h: Vec<(&str, &str)> = FORGED.to_vec();
    h.push(("x-api-key", PERSONAL_KEY));
    // Every forwarding name keyward strips in proxy mode, so the configs cannot drift
    // from the list (`x-forwarded-for` and the rest are set by the proxy itself).
    let every: Vec<(String, String)> = keyward::header_names::FORWARDING
        .iter()
        .filter(|n| !h.iter().any(|(f, _)| f == *n))
        .map(|n| (n.to_string(), format!("forged-{n}")))
        .collect();
    h.extend(every.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let other = get(
        &url("/v1/other"),
        &[("x-api-key", PERSONAL_KEY), FORGED_OTHER],
    )
    .await;
    match strips_prefix {
        true => {
            assert_eq!(other.status, 200, "{name}: {}", other.text());
            assert!(!up.last().headers.contains_key(FORGED_OTHER.0), "{name}");
        }
        false => assert_eq!(other.status, 400, "{name}: {}", other.text()),
    }
    let r = get(&url("/v1/items?x=1"), &h).await;
    assert_eq!(r.status, 200, "{name}: {}", r.text());
    let seen = up.last();
    assert_eq!(seen.target, "/v1/items?x=1", "{name}");
    let id = |n: &str| {
        seen.headers
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        id("x-auth-subject-id"),
        "65a0c0ffee0000000000beef",
        "{name}"
    );
    assert_eq!(id("x-auth-key-id"), "key_demo_personal", "{name}");
    assert_eq!(
        id("x-auth-account-id"),
        "507f1f77bcf86cd799439012",
        "{name}"
    );
    assert_eq!(id("x-auth-principal-type"), "personal", "{name}");
    assert_eq!(id("x-auth-scopes"), "read", "{name}");
    assert_eq!(id("x-auth-environment"), "production", "{name}");
    assert_eq!(id("x-auth-enterprise-id"), "", "{name}: the key has none");
    assert_eq!(id("x-auth-delegated-by"), "", "{name}: the key has none");
    assert!(!id("x-correlation-id").is_empty(), "{name}");
    assert_nothing_forged(&seen, name);
    assert!(
        seen.headers.get("x-api-key").is_none(),
        "{name}: key kept from the app"
    );
    let served = up.count();

    // Refused: nothing reaches the app.
    let refused: [Refused; 8] = [
        ("GET", "/v1/items", vec![], &[401]),
        (
            "POST",
            "/v1/items",
            vec![("x-api-key", PERSONAL_KEY)],
            &[403],
        ),
        (
            "GET",
            "/admin/users",
            vec![("x-api-key", SERVICE_KEY)],
            &[403],
        ),
        (
            "GET",
            "/public/../admin/users",
            vec![("x-api-key", SERVICE_KEY)],
            &[400, 403],
        ),
        (
            "GET",
            "/v1/%2e%2e/%2e%2e/admin/users",
            vec![("x-api-key", SERVICE_KEY)],
            &[400, 403],
        ),
        (
            "GET",
            "/v1/..%2fadmin/users",
            vec![("x-api-key", SERVICE_KEY)],
            &[400, 403],
        ),
        // Tricks that normalize out of a rule or into a public route: the proxy forwards
        // the path as sent, and an app that does not resolve dot segments would serve it.
        (
            "GET",
            "/admin/%2e%2e/v1/items",
            vec![("x-api-key", PERSONAL_KEY)],
            &[400, 403],
        ),
        ("GET", "/v1/items/../../healthz", vec![], &[400, 401]),
    ];
    for (method, path, headers, statuses) in refused {
        let r = send(method, &url(path), &headers, b"").await;
        assert!(
            statuses.contains(&r.status.as_u16()),
            "{name}: {method} {path}: {} {}",
            r.status,
            r.text()
        );
        if r.status == 401 {
            // One challenge, as keyward's own answer has (nginx copies a 401's challenge
            // itself: a second `add_header` sent it twice).
            let challenges = r.headers.get_all("www-authenticate").iter().count();
            assert_eq!(challenges, 1, "{name}: {method} {path}: {:?}", r.headers);
        }
        if statuses.len() > 1 {
            // A path trick: the proxy may refuse it itself, before asking keyward.
            continue;
        }
        let json = r.headers.get("content-type").and_then(|v| v.to_str().ok());
        assert!(
            json.is_some_and(|t| t.starts_with("application/json")),
            "{name}: {method} {path}: {:?}",
            r.headers
        );
        assert_eq!(r.json()["status"], r.status.as_u16(), "{name}");
        assert!(
            r.headers.contains_key("x-correlation-id"),
            "{name}: {:?}",
            r.headers
        );
    }
    assert_eq!(
        up.count(),
        served,
        "{name}: a refused request reached the app"
    );

    // Overrides and forwarding headers: the request is refused (keyward refuses a
    // client's override it can see), or reaches the app without them and with every
    // identity header keyward sent.
    for forged in REROUTED {
        let before = up.count();
        let r = get(&url("/v1/items"), &[forged, ("x-api-key", PERSONAL_KEY)]).await;
        if r.status == 400 {
            assert_eq!(
                up.count(),
                before,
                "{name}: {forged:?} refused yet forwarded"
            );
            continue;
        }
        assert_eq!(r.status, 200, "{name}: {forged:?}: {}", r.text());
        let seen = up.last();
        assert_nothing_forged(&seen, &format!("{name}: {forged:?}"));
        for identity in ["x-auth-key-id", "x-auth-access-type", "x-auth-scopes"] {
            assert!(
                seen.headers.contains_key(identity),
                "{name}: {forged:?} removed {identity}: {:?}",
                seen.headers
            );
        }
    }

    // A public route needs no key; forged identity is still kept out.
    let r = get(&url("/healthz"), &FORGED).await;
    assert_eq!(r.status, 200, "{name}: {}", r.text());
    assert_nothing_forged(&up.last(), name);

    // The rate limit (burst 2) answers 429 through the proxy.
    for expect in [200, 200, 429] {
        let r = get(&url("/v1/limited"), &[("x-api-key", LIMITED_KEY)]).await;
        assert_eq!(r.status, expect, "{name}: {}", r.text());
        // The quota and both ids reach the client on an allowed request too, once each.
        for h in [
            "ratelimit-limit",
            "ratelimit-remaining",
            "x-correlation-id",
            "x-request-id",
        ] {
            let n = r.headers.get_all(h).iter().count();
            assert_eq!(n, 1, "{name}: {expect}: {h}: {:?}", r.headers);
        }
        if expect == 429 {
            assert!(
                r.headers.contains_key("retry-after"),
                "{name}: {:?}",
                r.headers
            );
        }
    }
}

/// The answer's own headers: a key without a limit gets no quota header (Caddy sent its
/// placeholders' text); the app's own quota is kept and not doubled, as keyward's proxy
/// keeps it; the ids are keyward's, once each, never the app's.
async fn answer_headers(front: SocketAddr, name: &str) {
    let url = |p: &str| format!("http://{front}{p}");
    let r = get(&url("/v1/items"), &[("x-api-key", PERSONAL_KEY)]).await;
    assert_eq!(r.status, 200, "{name}: {}", r.text());
    assert!(
        !r.headers.contains_key("ratelimit-limit"),
        "{name}: {:?}",
        r.headers
    );
    // The metered key's quota headers first: keyward's, once each, where the app sent none.
    let r = get(&url("/v1/items"), &[("x-api-key", METERED_KEY)]).await;
    assert_eq!(r.status, 200, "{name}: {}", r.text());
    for h in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert_eq!(
            r.headers.get_all(h).iter().count(),
            1,
            "{name}: {h}: {:?}",
            r.headers
        );
    }
    for key in [PERSONAL_KEY, METERED_KEY] {
        let r = get(&url("/v1/own"), &[("x-api-key", key)]).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let all = |h: &str| -> Vec<String> {
            r.headers
                .get_all(h)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(all("ratelimit-limit"), ["999"], "{name}: {:?}", r.headers);
        for id in ["x-correlation-id", "x-request-id"] {
            let ids = all(id);
            assert_eq!(ids.len(), 1, "{name}: {id}: {:?}", r.headers);
            assert_ne!(ids[0], "app-made", "{name}: {id}");
        }
    }
}

async fn behind(
    proxy: &str,
    start: fn(&Path, SocketAddr, SocketAddr, SocketAddr) -> Running,
    strips_prefix: bool,
) {
    let up = upstream()
        .route("/ws", Reply::UpgradeEcho)
        .route("/v1/own", Reply::OwnHeaders)
        .spawn()
        .await;
    let d = spawn_decider(None, "").await;
    let dir = tempfile::tempdir().unwrap();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut running = start(dir.path(), d.decision, up.addr, listen);
    running.ready(listen).await;
    scenario(listen, &up, proxy, strips_prefix).await;
    answer_headers(listen, proxy).await;
    websocket(listen, &up, proxy).await;
    drop(running);
    d.shutdown().await;
}

#[tokio::test]
async fn nginx_auth_request_with_the_shipped_config() {
    if installed("/usr/sbin/nginx") {
        behind("nginx", start_nginx, false).await;
    }
}

#[tokio::test]
async fn caddy_forward_auth_with_the_shipped_caddyfile() {
    if installed("caddy") {
        behind("caddy", start_caddy, true).await;
    }
}

/// A WebSocket upgrade a key may make goes through the shipped config as one: the proxy
/// keeps `Upgrade` and a `Connection: Upgrade` of its own (clearing the client's
/// `Connection` outright, as both configs did, broke every upgrade).
async fn websocket(front: SocketAddr, up: &Upstream, name: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Any other upgrade is not passed on: an app that switched to h2c on it would take every
    // later request on that connection without a decision.
    let h2c = get(
        &format!("http://{front}/v1/items"),
        &[
            ("x-api-key", PERSONAL_KEY),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    )
    .await;
    assert_eq!(h2c.status, 200, "{name}: {}", h2c.text());
    let seen = up.last();
    assert!(
        seen.headers.get("upgrade").is_none(),
        "{name}: Upgrade: h2c reached the app: {:?}",
        seen.headers
    );
    // Two protocols (h2c first): Caddy matched `websocket` in the second field and upgraded
    // the app to the first. The app sees `websocket` alone or no upgrade (nginx sends the
    // first value through the shipped config's map), or the request is refused (keyward
    // refuses the decision when the front proxy passes both on).
    let mut s = tokio::net::TcpStream::connect(front).await.unwrap();
    let two = ws_handshake(PERSONAL_KEY)
        .replace("host: app", &format!("host: {front}"))
        .replace(
            "upgrade: websocket\r\n",
            "upgrade: h2c\r\nupgrade: websocket\r\n",
        );
    assert!(two.contains("upgrade: h2c\r\n"), "{two}");
    s.write_all(two.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await.unwrap_or_default().to_lowercase();
    if !head.starts_with("http/1.1 400") {
        assert!(head.starts_with("http/1.1 101"), "{name}: {head}");
        let seen = up.last();
        let upgrades: Vec<_> = seen.headers.get_all("upgrade").iter().collect();
        assert!(
            upgrades.iter().all(|u| *u == "websocket"),
            "{name}: {upgrades:?}"
        );
    }
    drop(s);
    let mut s = tokio::net::TcpStream::connect(front).await.unwrap();
    let handshake = ws_handshake(PERSONAL_KEY).replace("host: app", &format!("host: {front}"));
    s.write_all(handshake.as_bytes()).await.unwrap();
    let head = read_head(&mut s)
        .await
        .expect("closed during the handshake")
        .to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{name}: {head}");
    s.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echoed, b"ping", "{name}");
}
