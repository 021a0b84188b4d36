//! Observability through the front door (SPEC 10 and 11): `/metrics` moves code by code,
//! `promtool check metrics` accepts a live scrape, and neither the metrics nor the logs of
//! the real binary ever carry a raw key, a full digest or an email.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keyward::auth::Code;
use sha2::{Digest, Sha256};

// --- a tiny Prometheus text parser ---------------------------------------------------------

/// One `/metrics` scrape: the text, and every sample by its normalized series name
/// (`name{a="1",b="2"}`, labels sorted).
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels = labels.to_vec();
    labels.sort();
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

fn parse_sample(line: &str) -> (String, f64) {
    let (head, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("not a sample: {line}"));
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("bad value: {line}"));
    let Some((name, rest)) = head.split_once('{') else {
        return (head.to_string(), value);
    };
    let body = rest
        .strip_suffix('}')
        .unwrap_or_else(|| panic!("unterminated labels: {line}"));
    let mut labels = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"").expect("label name");
        let end = after.find('"').expect("label value");
        labels.push((k.trim_start_matches(','), &after[..end]));
        rest = &after[end + 1..];
    }
    (series(name, &labels), value)
}

impl Scrape {
    fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(parse_sample)
            .collect();
        Scrape { text, samples }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = series(name, labels);
        *self
            .samples
            .get(&key)
            .unwrap_or_else(|| panic!("{key} not exported:\n{}", self.text))
    }

    fn has_family(&self, name: &str) -> bool {
        self.samples
            .keys()
            .any(|k| k == name || k.starts_with(&format!("{name}{{")))
    }
}

async fn scrape(admin: &str) -> Scrape {
    let r = get(admin, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Scrape::parse(r.text())
}

/// The `decision` label SPEC 10 puts next to each code: upstream failures happen after auth
/// said yes, so they count as allowed.
fn decision(code: Code) -> &'static str {
    match code {
        Code::Ok | Code::UpstreamUnavailable | Code::UpstreamTimeout => "allowed",
        _ => "denied",
    }
}

fn requests(s: &Scrape, code: Code) -> f64 {
    s.get(
        "keyward_requests_total",
        &[("code", code.as_str()), ("decision", decision(code))],
    )
}

/// Exactly the listed codes moved, by the listed amounts; every other code series stayed.
fn assert_requests_moved(before: &Scrape, after: &Scrape, moved: &[(Code, f64)]) {
    for code in Code::ALL {
        let want = moved
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0.0, |(_, n)| *n);
        let got = requests(after, code) - requests(before, code);
        assert_eq!(
            got,
            want,
            "keyward_requests_total{{code={:?}}} moved by {got}, expected {want}",
            code.as_str()
        );
    }
}

fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.get(name, labels) - before.get(name, labels)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Replace a file the way a careful writer (and the kubelet) does: write aside, rename.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

// --- metrics, in process -------------------------------------------------------------------

/// method, path, request headers, expected status, expected code.
type CodeCase = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    u16,
    Code,
);
/// method, path, request headers, expected status.
type ExtraCase = (&'static str, &'static str, Vec<(&'static str, String)>, u16);

#[tokio::test]
async fn requests_total_moves_code_by_code() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let before = scrape(&kw.admin_url("/metrics")).await;

    let unknown = "sta_unknown_key_0123456789abcdef";
    let cases: Vec<CodeCase> = vec![
        ("GET", "/v1/items", vec![], 401, Code::InvalidAuthHeader),
        (
            "GET",
            "/v1/items",
            vec![("x-api-key", unknown)],
            401,
            Code::InvalidApiKey,
        ),
        (
            "GET",
            "/v1/items",
            vec![("x-api-key", EXPIRED_KEY)],
            401,
            Code::ExpiredApiKey,
        ),
        (
            "GET",
            "/v1/items",
            vec![("x-api-key", DISABLED_KEY)],
            401,
            Code::DisabledApiKey,
        ),
        (
            "GET",
            "/v1/items",
            vec![("x-api-key", STAGING_KEY)],
            401,
            Code::WrongEnvironment,
        ),
        (
            "POST",
            "/v1/items",
            vec![("x-api-key", PERSONAL_KEY)],
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
        (
            "GET",
            "/a%2Fb",
            vec![("x-api-key", SERVICE_KEY)],
            400,
            Code::BadRequest,
        ),
        (
            "GET",
            "/v1/items",
            vec![("x-api-key", SERVICE_KEY)],
            200,
            Code::Ok,
        ),
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
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "limits: { upstream_timeout: 100ms }\n").await;
    let before = scrape(&kw.admin_url("/metrics")).await;
    let r = get(&kw.url("/slow/5000"), &[("x-api-key", SERVICE_KEY)]).await;
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
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let metrics = kw.admin_url("/metrics");
    assert_eq!(
        scrape(&metrics)
            .await
            .get("keyward_in_flight_requests", &[]),
        0.0
    );
    let url = kw.url("/slow/400");
    let slow = tokio::spawn(async move { get(&url, &[("x-api-key", SERVICE_KEY)]).await });
    eventually("in_flight = 1 while the slow request runs", || {
        let metrics = metrics.clone();
        async move {
            scrape(&metrics)
                .await
                .get("keyward_in_flight_requests", &[])
                == 1.0
        }
    })
    .await;
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
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let metrics = kw.admin_url("/metrics");
    let url = kw.url("/slow/2000");
    let slow = tokio::spawn(async move { get(&url, &[("x-api-key", SERVICE_KEY)]).await });
    eventually("in_flight = 1 while the slow request runs", || {
        let metrics = metrics.clone();
        async move {
            scrape(&metrics)
                .await
                .get("keyward_in_flight_requests", &[])
                == 1.0
        }
    })
    .await;
    // The client goes away: its connection closes and keyward drops the request.
    slow.abort();
    let _ = slow.await;
    eventually("in_flight back to 0 after the client left", || {
        let metrics = metrics.clone();
        async move {
            scrape(&metrics)
                .await
                .get("keyward_in_flight_requests", &[])
                == 0.0
        }
    })
    .await;
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
    eventually("the bad snapshot is counted", || {
        let metrics = metrics.clone();
        async move {
            scrape(&metrics)
                .await
                .get("keyward_snapshot_reloads_total", &error)
                == 1.0
        }
    })
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
    eventually("version 2 is loaded", || {
        let metrics = metrics.clone();
        async move { scrape(&metrics).await.get("keyward_snapshot_version", &[]) == 2.0 }
    })
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

/// Labels Prometheus adds from the scrape target, not keyward.
const TARGET_LABELS: [&str; 4] = ["job", "instance", "pod", "namespace"];

/// A selector `name{label op "value", ...}` found in a PromQL expression.
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `keyward_*` selector in `expr`, and every label named in `by`/`without`/`on`/
/// `ignoring` groupings and in `{{label}}` templates.
fn promql_refs(expr: &str) -> (Vec<Selector>, Vec<String>) {
    let mut selectors = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("keyward_") {
        let preceded = rest[..i].chars().next_back().is_some_and(is_ident);
        let tail = &rest[i..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let mut after = &tail[end..];
        let mut matchers = Vec::new();
        if let Some(body) = after.strip_prefix('{') {
            let close = body.find('}').expect("closing brace");
            for m in body[..close]
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
            {
                let op_at = m.find(['=', '!']).expect("matcher operator");
                let (label, tail) = m.split_at(op_at);
                let op_len = tail.find('"').expect("quoted value");
                let value = tail[op_len..].trim_matches('"');
                matchers.push((
                    label.trim().to_string(),
                    tail[..op_len].to_string(),
                    value.to_string(),
                ));
            }
            after = &body[close + 1..];
        }
        if !preceded {
            selectors.push(Selector { name, matchers });
        }
        rest = after;
    }
    let mut labels = Vec::new();
    for word in ["by", "without", "on", "ignoring"] {
        let mut rest = expr;
        while let Some(i) = rest.find(&format!("{word} (")) {
            let preceded = rest[..i].chars().next_back().is_some_and(is_ident);
            let body = &rest[i + word.len() + 2..];
            let close = body.find(')').unwrap();
            if !preceded {
                labels.extend(body[..close].split(',').map(|l| l.trim().to_string()));
            }
            rest = &body[close..];
        }
    }
    let mut rest = expr;
    while let Some(i) = rest.find("{{") {
        let body = &rest[i + 2..];
        let close = body.find("}}").unwrap();
        let inner = body[..close].trim();
        if let Some(label) = inner.strip_prefix("$labels.") {
            labels.push(label.to_string());
        } else if inner.chars().all(is_ident) && !["end", "else"].contains(&inner) {
            // A Grafana legend `{{label}}` (Go template keywords aside).
            labels.push(inner.to_string());
        }
        rest = &body[close..];
    }
    (selectors, labels)
}

/// What keyward exports: metric name (with `_bucket`/`_count`/`_sum`) → label → values.
type Exported = BTreeMap<String, BTreeMap<String, std::collections::BTreeSet<String>>>;

fn exported(s: &Scrape) -> Exported {
    let mut out = Exported::new();
    for key in s.samples.keys() {
        let (name, labels) = key.split_once('{').unwrap_or((key, "}"));
        let entry = out.entry(name.to_string()).or_default();
        let labels = labels.strip_suffix('}').unwrap();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap();
            entry
                .entry(k.to_string())
                .or_default()
                .insert(v.trim_matches('"').to_string());
        }
    }
    out
}

#[tokio::test]
async fn dashboard_and_alerts_use_real_metric_names_and_labels() {
    let up = spawn_upstream().await;
    // With `cluster` (no Redis needed to export its series) for the fleet panels and alert.
    let extra = "metrics: { per_key: true }\ncluster: { redis: \"redis://127.0.0.1:1/0\" }\n";
    let kw = spawn_proxy(up.addr, extra).await;
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

fn promtool_available() -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required in CI (Debian package `prometheus`)"
        );
        eprintln!("skipped: promtool not on PATH (apt-get install prometheus)");
    }
    found
}

fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- scrape ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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
    let c = choose_filter("info", None, Some("keyward=debug,h2=info"));
    assert_eq!(
        (c.directives.as_str(), c.source),
        ("keyward=debug,h2=info", "RUST_LOG")
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

// --- the real binary -----------------------------------------------------------------------

/// `keyward run` as a child process, its stderr (the logs) and stdout collected line by line.
struct Binary {
    child: Option<Child>,
    addr: SocketAddr,
    admin: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl Drop for Binary {
    /// A failed test must not leave its keyward running.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> SocketAddr {
    closed_port()
}

fn collect(
    pipe: impl std::io::Read + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let lines2 = lines.clone();
    let handle = std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            lines2.lock().unwrap().push(line);
        }
    });
    (lines, handle)
}

impl Binary {
    /// Start with the demo keys and `extra` config (a `log:` line at least) in front of
    /// `upstream`, with these environment variables; return once `/readyz` answers 200.
    async fn start(upstream: SocketAddr, extra: &str, env: &[(&str, &str)]) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.yaml");
        std::fs::write(&keys, DEMO_KEYS).unwrap();
        let (addr, admin) = (free_port(), free_port());
        let config = format!(
            "listen: {addr}\n\
             admin_listen: {admin}\n\
             upstream: http://{upstream}\n\
             environment: production\n\
             keys: {{ file: {keys}, poll_interval: 50ms }}\n\
             prefixes: {{ sta_: [service_account], ste_: [enterprise_service_account], pat_: [personal] }}\n\
             routes:\n  - {{ path: /healthz, public: true }}\n  - {{ prefix: /admin/, any_of: [admin] }}\n\
             admin: {{ token_sha256: {token} }}\n\
             shutdown: {{ drain_delay: 0s, grace: 2s }}\n\
             {extra}",
            keys = keys.display(),
            token = sha256_hex(DEMO_ADMIN_TOKEN),
        );
        let config_path = dir.path().join("keyward.yaml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env_remove("KEYWARD_LOG")
            .env_remove("RUST_LOG")
            .env_remove("KEYWARD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("keyward binary starts");
        let (stderr, e) = collect(child.stderr.take().unwrap());
        let (stdout, o) = collect(child.stdout.take().unwrap());
        let mut bin = Binary {
            child: Some(child),
            addr,
            admin,
            stderr,
            stdout,
            readers: vec![e, o],
            dir,
        };
        bin.wait_ready().await;
        bin
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Poll `/readyz` (the readiness signal) until 200; fail early if the process exits.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let url: http::Uri = self.admin_url("/readyz").parse().unwrap();
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                self.join_readers();
                panic!(
                    "keyward exited before it was ready ({status}):\n{}",
                    self.stderr.lock().unwrap().join("\n")
                );
            }
            let req = http::Request::get(url.clone())
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(2), client().request(req)).await
            {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "keyward not ready:\n{}",
                self.stderr.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// SIGTERM, then wait (bounded) for the exit; returns its status and the log lines.
    async fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>, Vec<String>) {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(kill.success(), "kill -TERM {pid}");
        let readers = std::mem::take(&mut self.readers);
        let wait = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            for r in readers {
                let _ = r.join();
            }
            status
        });
        let status = tokio::time::timeout(Duration::from_secs(15), wait)
            .await
            .expect("keyward exits within 15 s of SIGTERM")
            .unwrap()
            .unwrap();
        let stderr = self.stderr.lock().unwrap().clone();
        let stdout = self.stdout.lock().unwrap().clone();
        (status, stderr, stdout)
    }
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
    let bin = Binary::start(
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

    let (listen, admin_addr) = (bin.addr.to_string(), bin.admin.to_string());
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
    for req in &seen_by_app {
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
        let bin = Binary::start(
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
