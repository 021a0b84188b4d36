//! Observability through the front door (SPEC 10 and 11): `/metrics` moves code by code,
//! dashboards and alerts name real series, and `promtool check metrics` accepts a live
//! scrape. The real binary's logs are checked in `observability_logs.rs`.

mod support;
use support::prom::*;
use support::promql::*;
use support::promtool::*;
use support::*;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyward::auth::Code;

// --- metrics, in process -------------------------------------------------------------------

/// method, path, request headers, expected status, expected code.
type CodeCase = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    u16,
    Code,
);

/// A case whose one header is the API key `key`, as most are.
fn keyed(
    method: &'static str,
    path: &'static str,
    key: &'static str,
    status: u16,
    code: Code,
) -> CodeCase {
    (method, path, vec![("x-api-key", key)], status, code)
}

/// An upstream that answers `/slow` after `ms` milliseconds.
async fn slow_upstream(ms: u64) -> Upstream {
    upstream()
        .route("/slow", Reply::After(Duration::from_millis(ms)))
        .spawn()
        .await
}

/// Wait until the series `name` with `labels` on the `/metrics` page at `metrics` is `want`.
async fn eventually_at(what: &str, metrics: &str, name: &str, labels: &[(&str, &str)], want: f64) {
    eventually(what, || async move {
        scrape(metrics).await.get(name, labels) == want
    })
    .await;
}

/// A GET of `/slow` with the service key, spawned, once keyward counts it in flight.
async fn slow_request_in_flight(kw: &Proxy) -> tokio::task::JoinHandle<Got> {
    let url = kw.url("/slow");
    let slow = tokio::spawn(async move { get(&url, &[("x-api-key", SERVICE_KEY)]).await });
    let what = "in_flight = 1 while the slow request runs";
    let metrics = kw.admin_url("/metrics");
    eventually_at(what, &metrics, "keyward_in_flight_requests", &[], 1.0).await;
    slow
}

#[tokio::test]
async fn requests_total_moves_code_by_code() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let before = scrape(&kw.admin_url("/metrics")).await;

    let unknown = "sta_unknown_key_0123456789abcdef";
    let cases: Vec<CodeCase> = vec![
        ("GET", "/v1/items", vec![], 401, Code::InvalidAuthHeader),
        keyed("GET", "/v1/items", unknown, 401, Code::InvalidApiKey),
        keyed("GET", "/v1/items", EXPIRED_KEY, 401, Code::ExpiredApiKey),
        keyed("GET", "/v1/items", DISABLED_KEY, 401, Code::DisabledApiKey),
        keyed("GET", "/v1/items", STAGING_KEY, 401, Code::WrongEnvironment),
        keyed(
            "POST",
            "/v1/items",
            PERSONAL_KEY,
            403,
            Code::InsufficientScope,
        ),
        (
            "GET",
            "/v1/items",
            vec![
                ("x-api-key", SERVICE_KEY),
                ("x-delegate-account-id", "507f1f77bc"),
            ],
            403,
            Code::DelegationNotAllowed,
        ),
        keyed("GET", "/a%2Fb", SERVICE_KEY, 400, Code::BadRequest),
        keyed("GET", "/v1/items", SERVICE_KEY, 200, Code::Ok),
    ];
    for (method, path, headers, status, code) in &cases {
        let mid = scrape(&kw.admin_url("/metrics")).await;
        let r = send(method, &kw.url(path), headers, b"").await;
        assert_eq!(r.status, *status, "{method} {path}: {}", r.text());
        if *code != Code::Ok {
            assert_eq!(r.code(), code.as_str());
        }
        let after = scrape(&kw.admin_url("/metrics")).await;
        assert_requests_moved(&mid, &after, &[(*code, 1.0)]);
    }

    let after = scrape(&kw.admin_url("/metrics")).await;
    let h = |name: &str, labels: &[(&str, &str)]| delta(&before, &after, name, labels);
    // Eight denials and one allowed request, each timed once.
    assert_eq!(
        h(
            "keyward_request_duration_seconds_count",
            &[("decision", "denied")]
        ),
        8.0
    );
    assert_eq!(
        h(
            "keyward_request_duration_seconds_count",
            &[("decision", "allowed")]
        ),
        1.0
    );
    assert_eq!(
        h(
            "keyward_request_duration_seconds_bucket",
            &[("decision", "denied"), ("le", "+Inf")]
        ),
        8.0
    );
    assert!(
        h(
            "keyward_request_duration_seconds_sum",
            &[("decision", "allowed")]
        ) > 0.0
    );
    // Every request that reached the decision (all but the refused path).
    assert_eq!(h("keyward_auth_duration_seconds_count", &[]), 8.0);
    assert!(h("keyward_auth_duration_seconds_sum", &[]) > 0.0);
    // One upstream exchange, answered 200.
    assert_eq!(
        h(
            "keyward_upstream_duration_seconds_count",
            &[("status_class", "2xx")]
        ),
        1.0
    );
    for class in ["1xx", "3xx", "4xx", "5xx"] {
        assert_eq!(
            h(
                "keyward_upstream_duration_seconds_count",
                &[("status_class", class)]
            ),
            0.0
        );
    }
    for kind in ["connect", "timeout", "other"] {
        assert_eq!(h("keyward_upstream_errors_total", &[("kind", kind)]), 0.0);
    }
    assert_eq!(after.get("keyward_in_flight_requests", &[]), 0.0);
    assert_eq!(up.count(), 1, "only the allowed request reaches the app");
    kw.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_count_as_allowed_with_their_kind() {
    // Connection refused: 502, kind="connect".
    let kw = spawn_proxy(closed_port(), "").await;
    let before = scrape(&kw.admin_url("/metrics")).await;
    let r = get(&kw.url("/v1/items"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.code(), "upstream_unavailable");
    let after = scrape(&kw.admin_url("/metrics")).await;
    assert_requests_moved(&before, &after, &[(Code::UpstreamUnavailable, 1.0)]);
    let d = |name: &str, labels: &[(&str, &str)]| delta(&before, &after, name, labels);
    assert_eq!(
        d("keyward_upstream_errors_total", &[("kind", "connect")]),
        1.0
    );
    assert_eq!(
        d("keyward_upstream_errors_total", &[("kind", "timeout")]),
        0.0
    );
    assert_eq!(
        d(
            "keyward_request_duration_seconds_count",
            &[("decision", "allowed")]
        ),
        1.0
    );
    assert_eq!(d("keyward_auth_duration_seconds_count", &[]), 1.0);
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        let l = [("status_class", class)];
        assert_eq!(d("keyward_upstream_duration_seconds_count", &l), 0.0);
    }
    kw.shutdown().await;

    // No answer within upstream_timeout: 504, kind="timeout".
    let up = slow_upstream(5000).await;
    let kw = spawn_proxy(up.addr, "limits: { upstream_timeout: 100ms }\n").await;
    let before = scrape(&kw.admin_url("/metrics")).await;
    let r = get(&kw.url("/slow"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.code(), "upstream_timeout");
    let after = scrape(&kw.admin_url("/metrics")).await;
    assert_requests_moved(&before, &after, &[(Code::UpstreamTimeout, 1.0)]);
    assert_eq!(
        delta(
            &before,
            &after,
            "keyward_upstream_errors_total",
            &[("kind", "timeout")]
        ),
        1.0
    );
    kw.shutdown().await;
}

#[tokio::test]
async fn rate_limited_and_auth_unavailable_are_counted() {
    let up = spawn_upstream().await;
    let limited = format!(
        "version: 3\nkeys:\n  - id: key_limited\n    sha256: {}\n    type: service_account\n    \
         subject_id: s1\n    account_id: a1\n    scopes: [read]\n    status: active\n    \
         rate_limit: {{ per_second: 0.001, burst: 1 }}\n",
        sha256_hex(SERVICE_KEY)
    );
    let kw = spawn_proxy_with(up.addr, "", Some(&limited)).await;
    let before = scrape(&kw.admin_url("/metrics")).await;
    let r = get(&kw.url("/v1/items"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 200);
    let r = get(&kw.url("/v1/items"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.code(), "rate_limited");
    let after = scrape(&kw.admin_url("/metrics")).await;
    assert_requests_moved(
        &before,
        &after,
        &[(Code::Ok, 1.0), (Code::RateLimited, 1.0)],
    );
    assert_eq!(after.get("keyward_snapshot_keys", &[]), 1.0);
    assert_eq!(after.get("keyward_snapshot_version", &[]), 3.0);
    kw.shutdown().await;

    // No snapshot at all: fail closed, and the failed initial load is counted.
    let kw = spawn_proxy_with(up.addr, "", None).await;
    let before = scrape(&kw.admin_url("/metrics")).await;
    assert_eq!(before.get("keyward_snapshot_keys", &[]), 0.0);
    assert_eq!(
        before.get(
            "keyward_snapshot_reloads_total",
            &[("source", "file"), ("result", "error")]
        ),
        1.0
    );
    assert_eq!(
        before.get(
            "keyward_snapshot_reloads_total",
            &[("source", "file"), ("result", "ok")]
        ),
        0.0
    );
    assert_eq!(
        before.get("keyward_snapshot_last_reload_timestamp_seconds", &[]),
        0.0
    );
    let r = get(&kw.url("/v1/items"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "auth_unavailable");
    let after = scrape(&kw.admin_url("/metrics")).await;
    assert_requests_moved(&before, &after, &[(Code::AuthUnavailable, 1.0)]);
    kw.shutdown().await;
}

#[tokio::test]
async fn in_flight_counts_requests_being_served() {
    let up = slow_upstream(400).await;
    let kw = spawn_proxy(up.addr, "").await;
    let metrics = kw.admin_url("/metrics");
    assert_eq!(
        scrape(&metrics)
            .await
            .get("keyward_in_flight_requests", &[]),
        0.0
    );
    let slow = slow_request_in_flight(&kw).await;
    assert_eq!(slow.await.unwrap().status, 200);
    let after = scrape(&metrics).await;
    assert_eq!(after.get("keyward_in_flight_requests", &[]), 0.0);
    assert_eq!(
        after.get(
            "keyward_upstream_duration_seconds_count",
            &[("status_class", "2xx")]
        ),
        1.0
    );
    // The slow exchange lands in a bucket at or above 0.25 s, not below.
    assert_eq!(
        after.get(
            "keyward_upstream_duration_seconds_bucket",
            &[("status_class", "2xx"), ("le", "0.25")]
        ),
        0.0
    );
    kw.shutdown().await;
}

#[tokio::test]
async fn in_flight_returns_to_zero_when_the_client_goes_away() {
    let up = slow_upstream(2000).await;
    let kw = spawn_proxy(up.addr, "").await;
    let metrics = kw.admin_url("/metrics");
    let slow = slow_request_in_flight(&kw).await;
    // The client goes away: its connection closes and keyward drops the request.
    slow.abort();
    let _ = slow.await;
    let what = "in_flight back to 0 after the client left";
    eventually_at(what, &metrics, "keyward_in_flight_requests", &[], 0.0).await;
    kw.shutdown().await;
}

#[tokio::test]
async fn snapshot_gauges_follow_loads_and_refusals() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let metrics = kw.admin_url("/metrics");
    let ok = [("source", "file"), ("result", "ok")];
    let error = [("source", "file"), ("result", "error")];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();

    let s = scrape(&metrics).await;
    assert_eq!(s.get("keyward_snapshot_keys", &[]), 6.0);
    assert_eq!(s.get("keyward_snapshot_version", &[]), 1.0);
    assert_eq!(s.get("keyward_snapshot_reloads_total", &ok), 1.0);
    assert_eq!(s.get("keyward_snapshot_reloads_total", &error), 0.0);
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(s.get("keyward_build_info", &version), 1.0);
    for result in ["ok", "error"] {
        let l = [("source", "control"), ("result", result)];
        assert_eq!(s.get("keyward_snapshot_reloads_total", &l), 0.0);
    }
    let loaded = s.get("keyward_snapshot_last_reload_timestamp_seconds", &[]);
    assert!(
        (now - 60.0..=now + 60.0).contains(&loaded),
        "last reload {loaded}, now {now}"
    );

    // A bad file is refused and counted; the last good snapshot stays.
    let bad = DEMO_KEYS.replace("id: key_demo_personal", "id: key_demo_service");
    replace_file(&kw.keys_file(), &bad);
    let what = "the bad snapshot is counted";
    eventually_at(
        what,
        &metrics,
        "keyward_snapshot_reloads_total",
        &error,
        1.0,
    )
    .await;
    let s = scrape(&metrics).await;
    assert_eq!(s.get("keyward_snapshot_keys", &[]), 6.0);
    assert_eq!(s.get("keyward_snapshot_version", &[]), 1.0);
    assert_eq!(s.get("keyward_snapshot_reloads_total", &ok), 1.0);
    let r = get(&kw.url("/v1/items"), &[("x-api-key", PERSONAL_KEY)]).await;
    assert_eq!(r.status, 200, "the last good snapshot is still in force");

    // A good file with a new version and one key fewer.
    let cut = DEMO_KEYS.find("  - id: key_demo_staging").unwrap();
    let next = DEMO_KEYS[..cut].replace("version: 1", "version: 2");
    replace_file(&kw.keys_file(), &next);
    eventually_at(
        "version 2 is loaded",
        &metrics,
        "keyward_snapshot_version",
        &[],
        2.0,
    )
    .await;
    let s = scrape(&metrics).await;
    assert_eq!(s.get("keyward_snapshot_keys", &[]), 5.0);
    assert_eq!(s.get("keyward_snapshot_reloads_total", &ok), 2.0);
    assert_eq!(s.get("keyward_snapshot_reloads_total", &error), 1.0);
    assert!(s.get("keyward_snapshot_last_reload_timestamp_seconds", &[]) >= loaded);
    kw.shutdown().await;
}

#[tokio::test]
async fn per_key_expiry_is_opt_in() {
    let up = spawn_upstream().await;

    let kw = spawn_proxy(up.addr, "").await;
    let s = scrape(&kw.admin_url("/metrics")).await;
    assert!(!s.has_family("keyward_key_expiry_timestamp_seconds"));
    assert!(!s.text.contains("key_id"), "no key ids by default");
    assert!(!s.text.contains("key_demo_"), "no key ids by default");
    kw.shutdown().await;

    let kw = spawn_proxy(up.addr, "metrics: { per_key: true }\n").await;
    let s = scrape(&kw.admin_url("/metrics")).await;
    // 2025-01-01T00:00:00Z; the other demo keys have no expires_at and export nothing.
    assert_eq!(
        s.get(
            "keyward_key_expiry_timestamp_seconds",
            &[("key_id", "key_demo_expired")]
        ),
        1_735_689_600.0
    );
    let expiry_series = s
        .samples
        .keys()
        .filter(|k| k.starts_with("keyward_key_expiry_timestamp_seconds{"))
        .count();
    assert_eq!(expiry_series, 1, "{}", s.text);
    kw.shutdown().await;
}

// --- dashboard and alerts against the real exposition ---------------------------------------
#[tokio::test]
async fn dashboard_and_alerts_use_real_metric_names_and_labels() {
    let up = spawn_upstream().await;
    // With `cluster` (no Redis needed to export its series) for the fleet panels and alert,
    // and `tls` for the certificate's expiry.
    let certs = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (certs.path().join("tls.crt"), certs.path().join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    // And a client CA with its revocation list, for the list's `nextUpdate`.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca.self_signed(&ca_key).unwrap();
    let crl = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2024, 1, 1),
        next_update: rcgen::date_time_ymd(2090, 1, 1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&ca, &ca_key)
    .unwrap();
    let (ca_file, crl_file) = (certs.path().join("ca.crt"), certs.path().join("ca.crl"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&crl_file, crl.pem().unwrap()).unwrap();
    let extra = format!(
        "metrics: {{ per_key: true }}\ncluster: {{ redis: \"redis://127.0.0.1:1/0\" }}\ntls: {{ cert: {}, key: {}, client_ca: {}, client_crl: {} }}\n",
        cert_file.display(),
        key_file.display(),
        ca_file.display(),
        crl_file.display()
    );
    let kw = spawn_proxy(up.addr, &extra).await;
    let scrape = scrape(&kw.admin_url("/metrics")).await;
    kw.shutdown().await;
    let exported = exported(&scrape);
    let all_labels: std::collections::BTreeSet<&str> = exported
        .values()
        .flat_map(|l| l.keys().map(String::as_str))
        .chain(TARGET_LABELS)
        .collect();

    // Every query of the dashboard, every alert expression and annotation.
    let mut exprs: Vec<(String, String)> = Vec::new();
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../deploy/grafana/keyward-dashboard.json")).unwrap();
    fn walk(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition" | "legendFormat", serde_json::Value::String(s)) => {
                            out.push((format!("dashboard {k}"), s.clone()))
                        }
                        ("query", serde_json::Value::String(s)) if s.contains("keyward_") => {
                            out.push(("dashboard query".into(), s.clone()))
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    let rules: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../deploy/prometheus/alerts.yaml")).unwrap();
    let mut alerts = Vec::new();
    for group in rules["spec"]["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_string();
            exprs.push((name.clone(), rule["expr"].as_str().unwrap().to_string()));
            for (_, a) in rule["annotations"].as_mapping().unwrap() {
                exprs.push((name.clone(), a.as_str().unwrap().to_string()));
            }
            alerts.push(name);
        }
    }
    for alert in [
        "KeywardAuthUnavailable",
        "KeywardSnapshotReloadFailing",
        "KeywardSnapshotStale",
        "KeywardDeniedRatioHigh",
        "KeywardUpstreamErrors",
        "KeywardKeyExpiringSoon",
        "KeywardTlsCertExpiringSoon",
        "KeywardTlsCrlStale",
    ] {
        assert!(alerts.iter().any(|a| a == alert), "{alert} missing");
    }

    let mut checked = 0;
    for (origin, expr) in &exprs {
        let (selectors, labels) = promql_refs(expr);
        for sel in &selectors {
            let Some(known) = exported.get(&sel.name) else {
                panic!("{origin}: {} is not exported by keyward: {expr}", sel.name);
            };
            for (label, op, value) in &sel.matchers {
                if TARGET_LABELS.contains(&label.as_str()) {
                    continue;
                }
                let values = known.get(label).unwrap_or_else(|| {
                    panic!("{origin}: {} has no label {label}: {expr}", sel.name)
                });
                if op == "=" || op == "!=" {
                    assert!(
                        values.contains(value),
                        "{origin}: {}{{{label}=\"{value}\"}} never exported (values: {values:?})",
                        sel.name
                    );
                }
            }
            checked += 1;
        }
        for label in labels {
            assert!(
                label == "le" || all_labels.contains(label.as_str()),
                "{origin}: label {label} is neither keyward's nor a target label: {expr}"
            );
        }
    }
    assert!(checked > 30, "only {checked} selectors found");

    // The unit tests' input series must be series keyward really exports.
    let tests: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../deploy/prometheus/alerts.test.yaml")).unwrap();
    for test in tests["tests"].as_sequence().unwrap() {
        for input in test["input_series"].as_sequence().unwrap() {
            let series = input["series"].as_str().unwrap();
            let (selectors, _) = promql_refs(series);
            let sel = &selectors[0];
            let own: Vec<(&str, &str)> = sel
                .matchers
                .iter()
                .filter(|(l, _, _)| !TARGET_LABELS.contains(&l.as_str()))
                .map(|(l, _, v)| (l.as_str(), v.as_str()))
                .collect();
            if sel.name == "keyward_key_expiry_timestamp_seconds" {
                assert_eq!(own.len(), 1, "{series}");
                assert_eq!(own[0].0, "key_id", "{series}");
                continue;
            }
            let key = self::series(&sel.name, &own);
            assert!(
                scrape.samples.contains_key(&key),
                "alerts.test.yaml: {series} is not a series keyward exports ({key})"
            );
        }
    }
}

// --- promtool ------------------------------------------------------------------------------

#[tokio::test]
async fn promtool_accepts_a_live_scrape() {
    if !promtool_available() {
        return;
    }
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "metrics: { per_key: true }\n").await;
    for key in [SERVICE_KEY, EXPIRED_KEY, "sta_unknown_key_0123456789abcdef"] {
        get(&kw.url("/v1/items"), &[("x-api-key", key)]).await;
    }
    get(&kw.url("/v1/items"), &[]).await;
    let s = scrape(&kw.admin_url("/metrics")).await;
    assert!(
        s.get(
            "keyward_requests_total",
            &[("code", "ok"), ("decision", "allowed")]
        ) >= 1.0
    );
    promtool_check_metrics(&s.text);
    kw.shutdown().await;

    // A fresh instance without traffic or keys, where every histogram is still empty.
    let kw = spawn_proxy_with(up.addr, "", None).await;
    promtool_check_metrics(&scrape(&kw.admin_url("/metrics")).await.text);
    kw.shutdown().await;
}

// --- logging -------------------------------------------------------------------------------

#[test]
fn log_filter_comes_from_keyward_log_then_rust_log_then_config() {
    use keyward::logging::choose_filter;
    let c = choose_filter("info", None, None);
    assert_eq!((c.directives.as_str(), c.source), ("info", "log.level"));
    let c = choose_filter("info", Some("debug"), Some("warn"));
    assert_eq!((c.directives.as_str(), c.source), ("debug", "KEYWARD_LOG"));
    // Without a bare level, the config's is the default (else targets not named are off).
    let c = choose_filter("info", None, Some("keyward=debug,h2=info"));
    assert_eq!(
        (c.directives.as_str(), c.source),
        ("info,keyward=debug,h2=info", "RUST_LOG")
    );
    // Empty counts as unset (an empty filter would silence everything).
    let c = choose_filter("warn", Some(" "), Some(""));
    assert_eq!((c.directives.as_str(), c.source), ("warn", "log.level"));
    assert!(c.ignored.is_empty());
    // A filter that does not parse is skipped, and reported.
    let c = choose_filter("warn", Some("keyward=loud"), Some("error"));
    assert_eq!((c.directives.as_str(), c.source), ("error", "RUST_LOG"));
    assert_eq!(c.ignored, vec![("KEYWARD_LOG", "keyward=loud".to_string())]);
}

/// A client that gives up while the upstream is slow gets no answer, but its request is
/// counted (`client_closed_request`, decision `allowed`) and logged (status 499, by the
/// same access-log call as every answer), and leaves nothing in flight: otherwise the slowness that made clients leave would leave no trace.
#[tokio::test]
async fn a_request_its_client_abandons_is_counted_and_logged() {
    use tokio::io::AsyncWriteExt;
    let up = slow_upstream(3000).await;
    let kw = spawn_proxy(up.addr, "").await;
    let before = scrape(&kw.admin_url("/metrics")).await;
    let mut client = tokio::net::TcpStream::connect(kw.addr).await.unwrap();
    let head = format!(
        "GET /slow HTTP/1.1\r\nhost: x\r\nx-api-key: {SERVICE_KEY}\r\nx-correlation-id: gave-up-1\r\n\r\n"
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let kw_ref = &kw;
    eventually("the request waits on the upstream", || async move {
        metric_value(kw_ref, "keyward_in_flight_requests ").await == 1.0
    })
    .await;
    drop(client);
    eventually("the abandoned request is counted", || async move {
        metric_value(kw_ref, "keyward_in_flight_requests ").await == 0.0
    })
    .await;
    let after = scrape(&kw.admin_url("/metrics")).await;
    assert_requests_moved(&before, &after, &[(Code::ClientClosed, 1.0)]);
    assert_eq!(
        Code::ClientClosed.status().as_u16(),
        499,
        "logged as nginx does"
    );
    kw.shutdown().await;
}
