//! The config document as a whole: defaults, and errors that name their field.

use std::time::Duration;

use super::*;

const MINIMAL: &str = "listen: 127.0.0.1:8080\nupstream: http://127.0.0.1:3000\nenvironment: test\nkeys: { file: k.yaml }\n";

fn err(extra: &str) -> String {
    Config::from_yaml(&format!("{MINIMAL}{extra}"))
        .expect_err("config should be refused")
        .to_string()
}

#[test]
fn shipped_example_is_valid() {
    let c = Config::from_yaml(include_str!("../../config/keyward.yaml")).unwrap();
    assert_eq!(c.environment, "production");
    assert_eq!(c.credentials.len(), 3);
    assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.prefixes["sta_"], vec![PrincipalType::ServiceAccount]);
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.introspection_path.as_deref(), Some("/auth"));
    assert_eq!(c.identity_headers.prefix, "x-auth-");
    assert_eq!(c.admin_listen.port(), 9901);
    assert_eq!(c.scopes.len(), 2);
}

#[test]
fn unknown_field_is_named() {
    assert!(err("colour: blue\n").contains("colour"));
    assert!(err("limits: { max_header_byte: 1 }\n").contains("max_header_byte"));
}

#[test]
fn bad_duration_names_field() {
    let e = err("limits: { upstream_timeout: soon }\n");
    assert!(e.contains("limits.upstream_timeout"), "{e}");
    assert_eq!(
        e.matches("limits.upstream_timeout").count(),
        1,
        "named once: {e}"
    );
    let e = err("limits: { max_connections: -3 }\n");
    assert!(e.starts_with("limits.max_connections: invalid type"), "{e}");
    let e = err("log: { bogus: 1 }\n");
    assert!(e.starts_with("log.bogus: unknown field `bogus`"), "{e}");
    assert_eq!(
        Config::from_yaml(&format!("{MINIMAL}shutdown: {{ drain_delay: 250ms }}\n"))
            .unwrap()
            .shutdown
            .drain_delay,
        Duration::from_millis(250)
    );
}

#[test]
fn missing_required_field_is_named() {
    let e = Config::from_yaml("listen: 127.0.0.1:1\nupstream: http://a:1\nkeys: {file: k}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("environment"), "{e}");
}

#[test]
fn upstream_must_be_plain_http_without_path() {
    let base = "listen: 127.0.0.1:8080\nenvironment: t\nkeys: { file: k }\n";
    for u in [
        "https://a:1",
        "http://a:1/app",
        "ftp://a",
        "http://user:pw@a:1",
        // A port that is no number was read as none: port 80.
        "http://127.0.0.1:3000O",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://[::1]:abc",
    ] {
        let e = Config::from_yaml(&format!("{base}upstream: {u}\n")).unwrap_err();
        assert!(e.to_string().starts_with("upstream"), "{u}: {e}");
        assert!(!e.to_string().contains("pw"), "no secret echoed: {e}");
    }
    for u in ["http://app", "http://[::1]:3000", "http://127.0.0.1:3000"] {
        Config::from_yaml(&format!("{base}upstream: {u}\n")).expect(u);
    }
}

#[test]
fn upstream_may_be_an_absolute_unix_socket_path() {
    let base = "listen: 127.0.0.1:8080\nenvironment: t\nkeys: { file: k }\n";
    let c = Config::from_yaml(&format!("{base}upstream: unix:/run/app/app.sock\n")).unwrap();
    let up = c.upstream.unwrap();
    assert_eq!(
        up.unix_path(),
        Some(std::path::Path::new("/run/app/app.sock"))
    );
    for u in ["unix:app.sock", "\"unix:\"", "unix:/run/app/"] {
        let e = Config::from_yaml(&format!("{base}upstream: {u}\n")).unwrap_err();
        assert!(e.to_string().starts_with("upstream: "), "{u}: {e}");
    }
}

#[test]
fn http1_server_is_fast_unless_hyper_is_asked_for() {
    assert_eq!(
        Config::from_yaml(MINIMAL).unwrap().http1_server,
        Http1Server::Fast
    );
    let c = Config::from_yaml(&format!("{MINIMAL}http1_server: hyper\n")).unwrap();
    assert_eq!(c.http1_server, Http1Server::Hyper);
    let e = err("http1_server: nginx\n");
    assert!(e.contains("http1_server"), "{e}");
}

#[test]
fn upstream_client_is_fast_unless_hyper_is_asked_for() {
    assert_eq!(
        Config::from_yaml(MINIMAL).unwrap().upstream_client,
        UpstreamClient::Fast
    );
    let c = Config::from_yaml(&format!("{MINIMAL}upstream_client: hyper\n")).unwrap();
    assert_eq!(c.upstream_client, UpstreamClient::Hyper);
    let e = err("upstream_client: reqwest\n");
    assert!(e.contains("upstream_client"), "{e}");
}

#[test]
fn identity_headers_include_takes_known_suffixes_and_at_least_one() {
    use crate::keys::IdentityField;
    let c = Config::from_yaml(MINIMAL).unwrap();
    assert!(c.identity_headers.include.is_none(), "absent: all of them");
    let c = Config::from_yaml(&format!(
        "{MINIMAL}identity_headers: {{ include: [subject-id, key-id, scopes] }}\n"
    ))
    .unwrap();
    assert_eq!(
        c.identity_headers.include.as_deref(),
        Some(
            &[
                IdentityField::SubjectId,
                IdentityField::KeyId,
                IdentityField::Scopes
            ][..]
        )
    );
    for bad in [
        "[subject-id, nope]",
        "[x-auth-key-id]",
        "[Subject-Id]",
        "[]",
        "subject-id",
    ] {
        let e = err(&format!("identity_headers: {{ include: {bad} }}\n"));
        assert!(e.contains("identity_headers.include"), "{bad}: {e}");
    }
    // The item is named once, exactly, by its place (a quoted value is never shown).
    let e = err("identity_headers: { include: [subject-id, nope] }\n");
    assert!(
        e.starts_with("identity_headers.include[1]: \"…\" is not an identity header"),
        "{e}"
    );
}

#[test]
fn credential_sources_are_checked() {
    assert!(err("credentials: [{ scheme: Token }]\n").contains("credentials[0]"));
    assert!(err("credentials: [{ header: authorization, query: k }]\n").contains("credentials"));
    assert!(err("credentials: []\n").contains("credentials"));
    let c = Config::from_yaml(&format!("{MINIMAL}credentials: [{{ query: api_key }}]\n")).unwrap();
    assert_eq!(
        c.credentials[0],
        CredentialSource::Query {
            name: "api_key".into()
        }
    );
}

#[test]
fn routes_are_checked() {
    assert!(err("routes: [{ path: /a, prefix: /b, public: true }]\n").contains("routes[0]"));
    assert!(err("routes: [{ path: /a }]\n").contains("routes[0]"));
    assert!(err("routes: [{ path: /a, public: true, any_of: [x] }]\n").contains("routes[0].any_of"));
    assert!(err("routes: [{ prefix: /a/../b, any_of: [x] }]\n").contains("routes[0].prefix"));
    assert!(err("routes: [{ prefix: admin, any_of: [x] }]\n").contains("routes[0].prefix"));
}

#[test]
fn scopes_methods_and_prefixes_are_checked() {
    assert!(err("scopes: [{ methods: [GET], any_of: [] }]\n").contains("scopes[0].any_of"));
    assert!(err("scopes: [{ methods: [\"G T\"], any_of: [r] }]\n").contains("scopes[0].methods"));
    assert!(err("prefixes: { sta_: [robot] }\n").contains("prefixes"));
    assert!(err("prefixes: { sta_: [] }\n").contains("prefixes.sta_"));
    let crl = err("tls: { cert: c.pem, key: k.pem, client_crl: ca.crl }\n");
    assert!(crl.contains("tls.client_crl"), "{crl}");
    let twice = err("prefixes:\n  sta_: [service_account]\n  sta_: [personal]\n");
    assert!(
        twice.contains("prefixes") && twice.contains("listed twice"),
        "{twice}"
    );
}

#[test]
fn admin_identity_and_limits_are_checked() {
    assert!(err("limits: { max_connection_age: 0s }\n").contains("limits.max_connection_age"));
    assert!(err("admin: { token_sha256: abc }\n").contains("admin.token_sha256"));
    assert!(err("identity_headers: { prefix: X_Auth }\n").contains("identity_headers.prefix"));
    assert!(err("limits: { max_connections: 0 }\n").contains("limits.max_connections"));
    assert!(err("limits: { max_header_bytes: 10 }\n").contains("limits.max_header_bytes"));
    assert!(err("limits: { h2_stream_window: 100 }\n").contains("limits.h2_stream_window"));
    assert!(
        err("limits: { h2_stream_window: 300000, h2_connection_window: 200000 }\n")
            .contains("limits.h2_connection_window")
    );
    let stall = err("limits: { write_stall_timeout: 0s }\n");
    assert!(stall.starts_with("limits.write_stall_timeout: "), "{stall}");
    assert!(err("log: { level: loud }\n").contains("log.level"));
    assert!(err("log: { format: xml }\n").contains("log.format"));
    assert!(err("environment: \"\"\n").contains("environment"));
    assert!(err("workers: 0\n").contains("workers"));
    assert!(err("workers: 100000\n").contains("workers: must be 1 to 1024"));
    let zero = err("tls: { cert: c.pem, key: k.pem, poll_interval: 0s }\n");
    assert!(zero.starts_with("tls.poll_interval: "), "{zero}");
}

/// `tls.client_verify_depth` is 1 to 8 (4 when absent); anything else stops start (and
/// `keyward check`, which loads the config the same way) naming the field.
#[test]
fn client_verify_depth_is_bounded() {
    for depth in ["0", "9", "300", "-1", "four"] {
        let e = err(&format!(
            "tls: {{ cert: c.pem, key: k.pem, client_verify_depth: {depth} }}\n"
        ));
        assert!(e.starts_with("tls.client_verify_depth: "), "{depth}: {e}");
    }
    let e = err("tls: { cert: c.pem, key: k.pem, client_verify_depth: 9 }\n");
    assert!(e.contains("must be 1 to 8"), "{e}");
    let depth = |extra: &str| {
        let yaml = format!("{MINIMAL}tls: {{ cert: c.pem, key: k.pem{extra} }}\n");
        Config::from_yaml(&yaml)
            .unwrap()
            .tls
            .unwrap()
            .client_verify_depth
    };
    assert_eq!(depth(""), 4);
    assert_eq!(depth(", client_verify_depth: 1"), 1);
    assert_eq!(depth(", client_verify_depth: 8"), 8);
}

/// The error for MINIMAL with `keys: { file: k.yaml, <extra> }`.
fn err_keys(extra: &str) -> String {
    let text = MINIMAL.replace(
        "keys: { file: k.yaml }",
        &format!("keys: {{ file: k.yaml, {extra} }}"),
    );
    Config::from_yaml(&text)
        .expect_err("config should be refused")
        .to_string()
}

#[test]
fn guard_fraction_must_be_in_zero_one() {
    let e = err_keys("guard: { max_removed_fraction: 0 }");
    assert!(e.starts_with("keys.guard.max_removed_fraction"), "{e}");
    let e = err_keys("guard: { max_removed_fraction: 1.5 }");
    assert!(e.starts_with("keys.guard.max_removed_fraction"), "{e}");
    let c = Config::from_yaml(&MINIMAL.replace(
        "keys: { file: k.yaml }",
        "keys: { file: k.yaml, guard: { max_removed_fraction: 1, min_keys: 0 } }",
    ))
    .unwrap();
    assert_eq!(c.keys.guard.max_removed_fraction, 1.0);
    assert_eq!(c.keys.guard.min_keys, 0);
    let defaults = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(defaults.keys.guard, GuardConfig::default());
    assert_eq!(defaults.metrics.per_key_limit, 1000);
    assert!(defaults.keys.max_age.is_none());
}

#[test]
fn guard_min_keys_must_not_be_negative() {
    let e = err_keys("guard: { min_keys: -1 }");
    assert!(e.starts_with("keys.guard.min_keys"), "{e}");
}

#[test]
fn max_age_must_be_a_positive_duration() {
    let e = err_keys("max_age: 0s");
    assert!(e.starts_with("keys.max_age"), "{e}");
    let e = err_keys("max_age: soon");
    assert!(e.starts_with("keys.max_age"), "{e}");
    let c = Config::from_yaml(&MINIMAL.replace(
        "keys: { file: k.yaml }",
        "keys: { file: k.yaml, max_age: 6h }",
    ))
    .unwrap();
    assert_eq!(c.keys.max_age, Some(Duration::from_secs(6 * 3600)));
}

#[test]
fn per_key_limit_must_be_positive() {
    let e = err("metrics: { per_key: true, per_key_limit: 0 }\n");
    assert!(e.starts_with("metrics.per_key_limit"), "{e}");
}

#[test]
fn override_headers_to_allow_are_header_names() {
    let c = Config::from_yaml(&format!(
        "{MINIMAL}allow_override_headers: [X-HTTP-Method-Override]\n"
    ))
    .unwrap();
    assert_eq!(c.allow_override_headers, ["x-http-method-override"]);
    assert!(err("allow_override_headers: [\"a b\"]\n").contains("allow_override_headers"));
}

#[test]
fn keys_need_a_source() {
    let e =
        Config::from_yaml("listen: 127.0.0.1:1\nupstream: http://a:1\nenvironment: t\nkeys: {}\n")
            .unwrap_err();
    assert!(e.to_string().starts_with("keys"), "{e}");
}

#[test]
fn decision_mode_makes_the_proxy_optional() {
    let base = "environment: t\nkeys: { file: k }\n";
    let c = Config::from_yaml(&format!("{base}decision: {{ listen: 127.0.0.1:9002 }}\n")).unwrap();
    assert_eq!(c.decision.unwrap().listen.port(), 9002);
    assert!(c.listen.is_none() && c.upstream.is_none());
    let both = format!("{MINIMAL}decision: {{ listen: 127.0.0.1:9002 }}\n");
    assert!(Config::from_yaml(&both).unwrap().listen.is_some());
    let e = Config::from_yaml(base).unwrap_err().to_string();
    assert!(
        e.starts_with("listen: ") && e.contains("decision.listen"),
        "{e}"
    );
    let e = Config::from_yaml(&format!("{base}listen: 127.0.0.1:1\n")).unwrap_err();
    assert!(e.to_string().starts_with("upstream: "), "{e}");
    let e = Config::from_yaml(&format!("{base}upstream: http://a:1\n")).unwrap_err();
    assert!(e.to_string().starts_with("listen: "), "{e}");
    let e = err("decision: { listen: 127.0.0.1:1, port: 2 }\n");
    assert!(e.contains("port"), "{e}");
    let e = err("decision: {}\n");
    assert!(e.contains("decision") && e.contains("listen"), "{e}");
}

#[test]
fn cluster_defaults_rules_and_env_override() {
    let c = Config::from_yaml(&format!(
        "{MINIMAL}cluster: {{ redis: \"redis://r:6379/0\" }}\n"
    ))
    .unwrap();
    let cl = c.cluster.unwrap();
    assert_eq!(
        (cl.prefix.as_str(), cl.timeout, cl.on_error),
        ("keyward:", Duration::from_millis(50), OnError::Local)
    );
    assert!(err("cluster: { redis: \"http://r:1\" }\n").starts_with("cluster.redis: "));
    assert!(err("cluster: { redis: \"rediss://\" }\n").starts_with("cluster.redis: "));
    let zero = err("cluster: { redis: \"redis://r\", timeout: 0s }\n");
    assert!(zero.starts_with("cluster.timeout: "), "{zero}");
    assert!(err("cluster: { redis: \"redis://r\", on_error: open }\n").contains("on_error"));
    assert!(err("cluster: { redis: \"redis://r\", prefix: \"\" }\n").starts_with("cluster.prefix"));
    // The URL (it may hold a password) is never in an error or in Debug.
    let secret = err("cluster: { redis: \"http://:hunter2@r\" }\n");
    assert!(!secret.contains("hunter2"), "{secret}");
    let mut c = Config::from_yaml(MINIMAL).unwrap();
    c.redis_url_from_env(Some(String::new())).unwrap();
    assert!(c.cluster.is_none(), "an empty variable is unset");
    c.redis_url_from_env(Some("rediss://:pw@r:6380".into()))
        .unwrap();
    let cl = c.cluster.as_ref().unwrap();
    assert_eq!(cl.redis, "rediss://:pw@r:6380");
    assert!(!format!("{cl:?}").contains("pw"));
    let e = c
        .redis_url_from_env(Some("tcp://r".into()))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("KEYWARD_REDIS_URL (cluster.redis): "), "{e}");
}

#[test]
fn a_parse_error_keeps_its_path_and_source() {
    let e =
        Config::from_yaml(&format!("{MINIMAL}limits: {{ upstream_timeout: soon }}\n")).unwrap_err();
    let ConfigError::Parse(p) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(p.path(), "limits.upstream_timeout");
    let source = std::error::Error::source(&e);
    assert!(source.is_some_and(|s| s.is::<serde_yaml::Error>()), "{e:?}");
}

#[test]
fn listeners_must_not_share_an_address() {
    let e = err("admin_listen: 127.0.0.1:8080\n");
    assert!(
        e.starts_with("admin_listen: ") && e.contains("`listen`"),
        "{e}"
    );
    let e = err("admin_listen: 127.0.0.1:9002\ndecision: { listen: 127.0.0.1:9002 }\n");
    assert!(
        e.starts_with("admin_listen: ") && e.contains("decision.listen"),
        "{e}"
    );
    let e = err("decision: { listen: 127.0.0.1:8080 }\n");
    assert!(e.starts_with("decision.listen: "), "{e}");
    let e = err("probe_listen: 127.0.0.1:9901\n");
    assert!(
        e.starts_with("probe_listen: ") && e.contains("`admin_listen`"),
        "{e}"
    );
    let e = err("probe_listen: 0.0.0.0:8080\n");
    assert!(
        e.starts_with("probe_listen: ") && e.contains("`listen`"),
        "{e}"
    );
    // Port 0 asks the kernel for a free port each time: never the same.
    let zero = MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0");
    assert!(Config::from_yaml(&format!("{zero}admin_listen: 127.0.0.1:0\n")).is_ok());
}

/// A setting that names a header keyward uses for something else, can never apply, or
/// would do something other than it reads as is refused at start, naming the field.
#[test]
fn settings_that_would_mislead_or_fail_open_are_refused() {
    for (extra, field, why) in [
        // A credential read from a header keyward reads, sets or strips for another purpose.
        (
            "credentials: [{ header: x-correlation-id }]\n",
            "credentials[0].header",
            "correlation id",
        ),
        (
            "credentials: [{ header: X_Request_Id }]\n",
            "credentials[0].header",
            "correlation id",
        ),
        (
            "credentials: [{ header: host }]\n",
            "credentials[0].header",
            "request itself",
        ),
        (
            "credentials: [{ header: transfer-encoding }]\n",
            "credentials[0].header",
            "hop-by-hop",
        ),
        (
            "credentials: [{ header: x-forwarded-user }]\n",
            "credentials[0].header",
            "forwarding",
        ),
        (
            "credentials: [{ header: x-auth-key }]\n",
            "credentials[0].header",
            "identity_headers.prefix",
        ),
        (
            "credentials: [{ header: x-api-key }, { header: x_api_key }]\n",
            "credentials[1]",
            "repeats credentials[0]",
        ),
        (
            "credentials: [{ header: x_api_key }, { header: x-api-key, scheme: Bearer }]\n",
            "credentials[0].header",
            "whole and by scheme",
        ),
        (
            "credentials: [{ header: x-api-key }, { header: x-api-key }]\n",
            "credentials[1]",
            "repeats credentials[0]",
        ),
        (
            "credentials: [{ header: authorization, scheme: Bearer }, { header: authorization }]\n",
            "credentials[0].header",
            "whole and by scheme",
        ),
        (
            "credentials: [{ query: \"a&b=\" }]\n",
            "credentials[0].query",
            "parameter name",
        ),
        // An identity prefix that would claim, and strip, headers the app needs.
        (
            "identity_headers: { prefix: x- }\n",
            "identity_headers.prefix",
            "would claim",
        ),
        (
            "identity_headers: { prefix: content- }\n",
            "identity_headers.prefix",
            "content-",
        ),
        (
            "identity_headers: { prefix: x-auth }\n",
            "identity_headers.prefix",
            "ending in '-'",
        ),
        (
            "identity_headers: { prefix: x-api- }\n",
            "identity_headers.prefix",
            "x-api-key",
        ),
        (
            "credentials: [{ header: x-my-key }]\nidentity_headers: { prefix: x-my- }\n",
            "credentials[0].header",
            "identity_headers.prefix",
        ),
        (
            "identity_headers: { prefix: sec- }\n",
            "identity_headers.prefix",
            "sec-",
        ),
        // Route and scope rules that can never apply, or that read as wildcards.
        (
            "routes: [{ prefix: \"/admin/*\", any_of: [admin] }]\n",
            "routes[0].prefix",
            "not a wildcard",
        ),
        (
            "routes: [{ prefix: /, public: true }, { prefix: /admin/, any_of: [admin] }]\n",
            "routes[1]",
            "never reached: routes[0] (prefix /)",
        ),
        (
            "routes: [{ prefix: /api/, public: true }, { path: /api/admin, any_of: [admin] }]\n",
            "routes[1]",
            "never reached",
        ),
        // In the forms requests meet them: `%40` is `@` to every rule.
        (
            "routes: [{ prefix: /pub@/, public: true }, { prefix: /pub%40/admin/, any_of: [admin] }]\n",
            "routes[1]",
            "never reached: routes[0]",
        ),
        (
            "routes: [{ path: /a%3Ab, public: true }, { path: /a:b, any_of: [admin] }]\n",
            "routes[1]",
            "never reached",
        ),
        // A public rule an app that normalizes or folds case reads as a protected one.
        (
            "routes: [{ path: \"/%EF%BD%81dmin\", public: true }, { path: /admin, any_of: [admin] }]\n",
            "routes[1]",
            "never reached",
        ),
        (
            "routes_case_insensitive: true\nroutes: [{ prefix: \"/adm%C4%B1n/\", public: true }, { prefix: /admin/, any_of: [admin] }]\n",
            "routes[1]",
            "never reached",
        ),
        (
            "routes: [{ prefix: /admin/, any_of: [\"read write\"] }]\n",
            "routes[0].any_of",
            "not a scope",
        ),
        (
            "scopes: [{ methods: [\"*\"], any_of: [read] }]\n",
            "scopes[0].methods",
            "not a wildcard",
        ),
        (
            "scopes: [{ methods: [GET], any_of: [\"\"] }]\n",
            "scopes[0].any_of",
            "not a scope",
        ),
        (
            "scopes: [{ methods: [GET, HEAD, OPTIONS, DELETE], any_of: [read, write] }, { methods: [POST], any_of: [write] }, { methods: [delete], any_of: [admin] }]\n",
            "scopes[2].methods",
            "DELETE is already governed by scopes[0] (any_of read, write)",
        ),
        (
            "introspection_path: /healthz\nroutes: [{ path: /healthz, public: true }]\n",
            "introspection_path",
            "routes[0]",
        ),
        // Listeners and upstream that collide.
        ("upstream: http://127.0.0.1:8080\n", "upstream", "loop"),
        (
            "upstream: http://localhost:9901\n",
            "upstream",
            "admin_listen",
        ),
        (
            "upstream: \"http://[::ffff:127.0.0.1]:8080\"\n",
            "upstream",
            "loop",
        ),
        ("upstream: http://0.0.0.0:8080\n", "upstream", "loop"),
        ("upstream: http://localhost.:8080\n", "upstream", "loop"),
        (
            "admin_listen: \"[::ffff:127.0.0.1]:8080\"\n",
            "admin_listen",
            "differ from `listen`",
        ),
        (
            "admin_listen: 0.0.0.0:8080\n",
            "admin_listen",
            "differ from `listen`",
        ),
        (
            "allow_override_headers: [host]\n",
            "allow_override_headers[0]",
            "not a routing override",
        ),
        (
            "trusted_proxies: [\"10.0.0.0/+8\"]\n",
            "trusted_proxies",
            "prefix length",
        ),
    ] {
        let e = Config::from_yaml(&over_minimal(extra))
            .expect_err(extra)
            .to_string();
        assert!(e.starts_with(field) && e.contains(why), "{extra}: {e}");
    }
    // What stays allowed.
    for ok in [
        "credentials: [{ header: authorization, scheme: Token }, { header: authorization, scheme: Bearer }, { header: x-api-key }, { query: api_key }]\n",
        "identity_headers: { prefix: x-user- }\n",
        "routes: [{ prefix: /admin/, any_of: [admin] }, { prefix: /admin, public: true }, { path: /adm, any_of: [admin] }]\n",
        "allow_override_headers: [X-HTTP-Method-Override]\n",
        "upstream: http://127.0.0.1:3001\nadmin_listen: 127.0.0.1:8081\n",
    ] {
        Config::from_yaml(&over_minimal(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

/// MINIMAL with `extra`'s top-level fields added, replacing MINIMAL's own of the same name.
fn over_minimal(extra: &str) -> String {
    let replaced = |l: &&str| {
        let key = l.split(':').next().unwrap_or_default();
        extra.lines().any(|e| e.starts_with(&format!("{key}:")))
    };
    let kept: String = MINIMAL
        .lines()
        .filter(|l| !replaced(l))
        .map(|l| format!("{l}\n"))
        .collect();
    format!("{kept}{extra}")
}

/// A config check's own messages quote what was written (a map key, a route, a level):
/// a secret pasted there is not shown, and no line break reaches the terminal or a log.
#[test]
fn config_errors_never_show_a_pasted_key_or_a_line_break() {
    let key = "sta_demo_service_key_0123456789abcdef";
    for extra in [
        format!("log: {{ level: \"{key}\" }}\n"),
        format!("prefixes: {{ {key}: [] }}\n"),
        format!("allow_override_headers: [{key}]\n"),
        format!("routes: [{{ path: /a, any_of: [\"{key}!\"] }}]\n"),
        format!(
            "routes: [{{ path: \"/{key}\", any_of: [a] }}, {{ path: \"/{key}\", any_of: [b] }}]\n"
        ),
        format!("introspection_path: \"{key}\"\n"),
        "prefixes: { \"sta_\\nkeyward: FORGED ok\\u001b[31m\": [] }\n".to_string(),
    ] {
        let e = Config::from_yaml(&over_minimal(&extra))
            .expect_err(&extra)
            .to_string();
        assert!(!e.contains(key) && !e.contains(['\n', '\u{1b}']), "{e:?}");
    }
}

#[test]
fn keys_state_file_is_the_file_source_s_and_not_the_file_itself() {
    let base = "listen: 127.0.0.1:8080\nupstream: http://a:1\nenvironment: t\n";
    let c = Config::from_yaml(&format!(
        "{base}keys: {{ file: /k/keys.yaml, state_file: /var/lib/keyward/kept.yaml }}\n"
    ))
    .unwrap();
    assert_eq!(
        c.keys.state_file.as_deref(),
        Some(std::path::Path::new("/var/lib/keyward/kept.yaml"))
    );
    for keys in [
        "{ file: /k/keys.yaml, state_file: /s/a.yaml, control: { state_file: /s/b.yaml } }",
        "{ file: /k/keys.yaml, state_file: /k/keys.yaml }",
    ] {
        let e = Config::from_yaml(&format!("{base}keys: {keys}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("keys.state_file"), "{keys}: {e}");
    }
}

#[test]
fn keys_state_file_may_not_name_keys_file_through_a_link_or_dots() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, "keys: []\n").unwrap();
    let link = dir.path().join("kept.yaml");
    std::os::unix::fs::symlink(&keys, &link).unwrap();
    let dotted = dir.path().join("sub").join("..").join("keys.yaml");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let base = "listen: 127.0.0.1:8080\nupstream: http://a:1\nenvironment: t\n";
    for state in [&link, &dotted] {
        let e = Config::from_yaml(&format!(
            "{base}keys: {{ file: {}, state_file: {} }}\n",
            keys.display(),
            state.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("keys.state_file"), "{}: {e}", state.display());
    }
}

#[test]
fn durations_take_the_config_s_units_only() {
    use super::parse_duration;
    for (text, want) in [
        ("10s", Duration::from_secs(10)),
        ("250ms", Duration::from_millis(250)),
        ("1h30m", Duration::from_secs(5400)),
        ("2d", Duration::from_secs(172_800)),
        (" 0s ", Duration::ZERO),
    ] {
        assert_eq!(parse_duration(text), Ok(want), "{text}");
    }
    // `M` was months, `y` years, to a general parser: a max_age of 90M never failed closed.
    for text in [
        "90M", "1y", "2w", "10 s", "10", "s", "1.5s", "-1s", "10sec", "",
    ] {
        assert!(parse_duration(text).is_err(), "{text}");
    }
    // Ten years at most: a deadline past what the clock holds panicked on the first request.
    assert_eq!(
        parse_duration("3650d"),
        Ok(Duration::from_secs(3650 * 86_400))
    );
    assert!(parse_duration("3650d1ms").is_err());
    let huge = "4294967295d".repeat(25_000);
    assert!(parse_duration(&huge).is_err());
}

/// Every duration and count a deadline or an allocation is made from is bounded, and the
/// refusal names the field (review: `check` passed these and the first request panicked).
#[test]
fn durations_and_header_counts_past_their_bounds_name_the_field() {
    for field in [
        "limits: { idle_timeout: 4294967295d }",
        "limits: { max_connection_age: 3651d }",
        "limits: { upstream_timeout: 999999d }",
        "limits: { body_stall_timeout: 4000d }",
    ] {
        let e = err(&format!("{field}\n"));
        let name = field.split(['{', ':']).nth(1).unwrap().trim();
        assert!(e.contains("longer than 3650d"), "{field}: {e}");
        assert!(e.contains(&format!("limits.{name}")), "{field}: {e}");
    }
    for n in ["18446744073709551615", "10001", "1", "7"] {
        let e = err(&format!("limits: {{ max_headers: {n} }}\n"));
        assert!(
            e.starts_with("limits.max_headers: must be from 8 to 10000"),
            "{n}: {e}"
        );
    }
    // A head of `usize::MAX` bytes was read whole (3 MB of one header answered 401, not 431).
    let e = err("limits: { max_header_bytes: 18446744073709551615 }\n");
    assert!(
        e.starts_with("limits.max_header_bytes: must be from 1024 to 8388608"),
        "{e}"
    );
    for field in [
        "max_connections",
        "max_in_flight",
        "h2_max_streams",
        "h2_max_concurrent_streams",
    ] {
        let e = err(&format!("limits: {{ {field}: 1000001 }}\n"));
        assert!(
            e.starts_with(&format!("limits.{field}: must be at most 1000000")),
            "{e}"
        );
    }
}

/// A byte order mark before the document is YAML's, and taken: it made the first field
/// another name (`missing field environment` for a config that has it on line 3).
#[test]
fn a_byte_order_mark_is_taken() {
    let c = Config::from_yaml(&format!("\u{feff}{MINIMAL}")).unwrap();
    assert_eq!(c.environment, "test");
}

/// A field of a section refused for its value is named once, whole: serde_yaml's own
/// message names the section (`limits.upstream_timeout: limits: ...` before).
#[test]
fn a_refused_duration_names_its_field_once() {
    let e = err("limits: { upstream_timeout: 10 s }\n");
    assert!(e.starts_with("limits.upstream_timeout: "), "{e}");
    assert!(!e.contains("limits: "), "{e}");
    assert!(e.contains("like 10s, 250ms or 90m"), "{e}");
}

/// `MINIMAL` with `environment: test` replaced by `environment`'s line, then `extra`.
fn with_environment(environment: &str, extra: &str) -> String {
    format!(
        "{}{extra}",
        MINIMAL.replacen("environment: test\n", environment, 1)
    )
}

#[test]
fn a_tag_is_refused_naming_the_field_and_the_line() {
    for (text, field, line) in [
        (
            with_environment("environment: !!binary cHJvZHVjdGlvbg==\n", ""),
            "environment",
            3,
        ),
        (
            with_environment("environment: !foo production\n", ""),
            "environment",
            3,
        ),
        (
            format!("{MINIMAL}limits:\n  max_headers: !!str 100\n"),
            "limits.max_headers",
            6,
        ),
        (
            format!("{MINIMAL}trusted_proxies: [10.0.0.0/8, !!str 192.168.0.0/16]\n"),
            "trusted_proxies[1]",
            5,
        ),
        (format!("{MINIMAL}routes: !!seq []\n"), "routes", 5),
    ] {
        let e = Config::from_yaml(&text).expect_err(&text).to_string();
        assert!(e.starts_with(&format!("{field}: tags (`!name`, `%TAG`) are not accepted in the config (line {line} column ")), "{text}: {e}");
    }
    let directive = format!("%TAG !x! tag:example.com,2000:\n---\n{MINIMAL}");
    let e = Config::from_yaml(&directive).unwrap_err().to_string();
    assert!(e.starts_with("line 1 column 1: tags ("), "{e}");
    // A `!` in a value is no tag.
    let c = Config::from_yaml(&with_environment("environment: \"prod!\"\n", "")).unwrap();
    assert_eq!(c.environment, "prod!");
}

#[test]
fn nesting_deeper_than_64_levels_is_refused_at_once_naming_the_place() {
    for depth in [65, 100_000] {
        let text = format!(
            "{MINIMAL}trusted_proxies: {}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let started = std::time::Instant::now();
        let e = Config::from_yaml(&text).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_millis(200), "{depth}");
        assert!(e.starts_with("trusted_proxies[0]"), "{e}");
        assert!(
            e.contains("nested more than 64 levels deep (line 5 column "),
            "{e}"
        );
    }
    // Within the bound the pass lets it through, and the parser says what is wrong.
    let text = format!(
        "{MINIMAL}trusted_proxies: {}{}\n",
        "[".repeat(60),
        "]".repeat(60)
    );
    let e = Config::from_yaml(&text).unwrap_err().to_string();
    assert!(
        e.contains("trusted_proxies") && !e.contains("nested"),
        "{e}"
    );
    // Block nesting is bounded the same way.
    let block = format!("{MINIMAL}routes:\n  {}x\n", "- ".repeat(100));
    assert!(Config::from_yaml(&block)
        .unwrap_err()
        .to_string()
        .contains("nested more than 64"));
}

#[test]
fn a_log_level_is_a_level_or_target_level_directives() {
    for bad in [
        "inf0",
        "warnings",
        "garbage level",
        "info;x",
        "h2",
        "info,x",
        "h2=",
        "a-b=info",
        "=info",
    ] {
        let e = err(&format!("log: {{ level: '{bad}' }}\n"));
        assert!(e.starts_with("log.level: "), "{bad}: {e}");
        assert!(e.contains("not a level"), "{bad}: {e}");
    }
    for good in [
        "info",
        "WARN",
        "h2=info",
        "inf0=info",
        "info,keyward::proxy=debug",
        "keyward[request]=debug",
        "3",
    ] {
        Config::from_yaml(&format!("{MINIMAL}log: {{ level: '{good}' }}\n")).expect(good);
    }
}
