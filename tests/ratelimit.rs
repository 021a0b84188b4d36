//! Per-key rate limits through the front door: GCRA per key id, 429 `rate_limited` with
//! `Retry-After` and `RateLimit-*` headers, and state that survives snapshot reloads.

mod support;
use support::*;

const LIMITED: &str = "sta_ratelimit_burst_key_0123456789abcdef";
const SLOW: &str = "sta_ratelimit_slow_key_0123456789abcdef";
const CHANGED: &str = "sta_ratelimit_changed_key_0123456789abcdef";
const FREE: &str = "sta_ratelimit_free_key_0123456789abcdef";
const ADDED: &str = "sta_ratelimit_added_key_0123456789abcdef";

fn sha(raw: &str) -> String {
    hex::encode(keyward::keys::digest(raw.as_bytes()))
}

fn entry(id: &str, raw: &str, rate_limit: Option<&str>) -> String {
    let limit = rate_limit.map_or(String::new(), |l| format!(", rate_limit: {l}"));
    format!(
        "  - {{ id: {id}, sha256: {}, type: service_account, subject_id: s_{id}, account_id: acc_1, scopes: [read, write], status: active{limit} }}\n",
        sha(raw)
    )
}

/// The snapshot: `changed_burst` is the burst of `key_changed`, `extra` one more entry.
fn keys_yaml(version: u32, changed_burst: u32, extra: &str) -> String {
    format!(
        "version: {version}\nkeys:\n{}{}{}{}{extra}",
        entry("key_limited", LIMITED, Some("{ per_second: 1, burst: 3 }")),
        entry("key_slow", SLOW, Some("{ per_second: 0.01, burst: 2 }")),
        entry(
            "key_changed",
            CHANGED,
            Some(&format!("{{ per_second: 0.01, burst: {changed_burst} }}"))
        ),
        entry("key_free", FREE, None),
    )
}

async fn call(kw: &Proxy, key: &str, path: &str) -> Got {
    get(&kw.url(path), &[("x-api-key", key)]).await
}

fn header(r: &Got, name: &str) -> String {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name}: {:?}", r.headers))
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn burst_is_served_then_429_with_retry_after_and_ratelimit_headers() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy_with(up.addr, "", Some(&keys_yaml(1, 1, ""))).await;

    for remaining in ["2", "1", "0"] {
        let r = call(&kw, LIMITED, "/v1/limited").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(header(&r, "ratelimit-limit"), "3");
        assert_eq!(header(&r, "ratelimit-remaining"), remaining);
        let reset: u64 = header(&r, "ratelimit-reset").parse().unwrap();
        assert!((1..=3).contains(&reset), "{reset}");
    }
    let r = call(&kw, LIMITED, "/v1/limited").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(header(&r, "content-type"), "application/json");
    assert_eq!(header(&r, "retry-after"), "1");
    assert_eq!(header(&r, "ratelimit-limit"), "3");
    assert_eq!(header(&r, "ratelimit-remaining"), "0");
    assert_eq!(header(&r, "ratelimit-reset"), "1");
    let body = r.json();
    assert_eq!(body["status"], 429);
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["error"], "Rate limit exceeded");
    assert_eq!(body["retry_after"], 1);
    assert_eq!(body["correlation_id"], header(&r, "x-correlation-id"));
    assert!(r.headers.get("www-authenticate").is_none());
    // The limited request never reached the upstream.
    let limited = up
        .requests()
        .iter()
        .filter(|s| s.target == "/v1/limited")
        .count();
    assert_eq!(limited, 3);

    // Buckets are per key: another key is not affected, and a key without a limit carries
    // no RateLimit headers.
    let r = call(&kw, FREE, "/v1/free").await;
    assert_eq!(r.status, 200);
    assert!(r.headers.get("ratelimit-limit").is_none());
    // Refused requests (bad key) do not spend the bucket of a real one.
    let r = call(&kw, "sta_not_a_real_key_0123456789abcdef", "/v1/x").await;
    assert_eq!(r.status, 401);
    // Introspection is a request by the key: limited like any other, quota shown.
    let r = call(&kw, LIMITED, "/auth").await;
    assert_eq!((r.status.as_u16(), r.code()), (429, "rate_limited".into()));
    let r = call(&kw, SLOW, "/auth").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "ratelimit-remaining"), "1");
    assert_eq!(call(&kw, SLOW, "/v1/slow").await.status, 200);
    assert_eq!(call(&kw, SLOW, "/auth").await.status, 429);
    kw.shutdown().await;
}

async fn snapshot_digest(kw: &Proxy) -> String {
    let auth = admin_auth();
    let r = get(&kw.admin_url("/v1/snapshot"), &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["digest"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn limit_state_survives_a_snapshot_reload() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy_with(up.addr, "", Some(&keys_yaml(1, 1, ""))).await;

    // Spend the slow key (2 per 200 s) and the key whose limit is about to change.
    for _ in 0..2 {
        assert_eq!(call(&kw, SLOW, "/v1/slow").await.status, 200);
    }
    assert_eq!(call(&kw, SLOW, "/v1/slow").await.status, 429);
    assert_eq!(call(&kw, CHANGED, "/v1/changed").await.status, 200);
    assert_eq!(call(&kw, CHANGED, "/v1/changed").await.status, 429);
    assert_eq!(call(&kw, ADDED, "/v1/added").await.status, 401);

    // Reload: a new version, one more key, and a new burst for key_changed only.
    let before = snapshot_digest(&kw).await;
    let next = keys_yaml(2, 2, &entry("key_added", ADDED, None));
    std::fs::write(kw.keys_file(), next).unwrap();
    let kw_ref = &kw;
    let before_ref = &before;
    eventually("the file watcher loads the new snapshot", || async move {
        snapshot_digest(kw_ref).await != *before_ref
    })
    .await;
    assert_eq!(call(&kw, ADDED, "/v1/added").await.status, 200);

    // The unchanged key is still limited: its GCRA state lives outside the snapshot.
    let r = call(&kw, SLOW, "/v1/slow").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code(), "rate_limited");
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(retry > 90, "{retry}");
    // A key whose burst was raised gets what the raise adds, not a fresh burst: what it
    // spent stays spent (so lowering a limit never hands a key a fresh burst either).
    let r = call(&kw, CHANGED, "/v1/changed").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(header(&r, "ratelimit-limit"), "2");
    assert_eq!(call(&kw, CHANGED, "/v1/changed").await.status, 429);
    kw.shutdown().await;
}
