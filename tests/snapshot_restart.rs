//! What was accepted survives a restart: a snapshot accepted by a push (any content type,
//! YAML block or flow, JSON, a UTF-8 byte order mark, CRLF line ends) or by a file reload
//! is the one loaded at the next start; a document without `keys` is refused and the last
//! good snapshot stays; a refused push answers a short error that does not echo its body.

mod support;
use support::*;

use std::path::Path;

const ROTATED_KEY: &str = "sta_restart_key_0123456789abcdef";

async fn ready(kw: &Proxy) -> u16 {
    get(&kw.admin_url("/readyz"), &[]).await.status.as_u16()
}

fn sha(key: &str) -> String {
    hex::encode(keyward::keys::digest(key.as_bytes()))
}

/// One snapshot (version 3, the key `key` under id `id`) in each style a push or a file
/// may use: the style's name and its text.
fn styles(id: &str, key: &str) -> Vec<(&'static str, String)> {
    let sha = sha(key);
    let block = format!(
        "# a snapshot\nversion: 3\nkeys:\n  - id: {id}\n    sha256: {sha}\n    type: service_account\n    subject_id: s1\n    account_id: a1\n    scopes: [read]\n"
    );
    let flow = format!(
        "{{version: 3, keys: [{{id: {id}, sha256: {sha}, type: service_account, subject_id: s1, account_id: a1, scopes: [read]}}]}}"
    );
    let json = serde_json::json!({"version": 3, "keys": [{"id": id, "sha256": sha,
        "type": "service_account", "subject_id": "s1", "account_id": "a1", "scopes": ["read"]}]});
    let json_pretty = serde_json::to_string_pretty(&json).unwrap();
    vec![
        ("yaml block", block.clone()),
        ("yaml flow", flow.clone()),
        (
            "yaml flow, json keys",
            flow.replace("version:", "\"version\":"),
        ),
        ("json", json.to_string()),
        ("json, pretty", json_pretty.clone()),
        ("yaml block, bom", format!("\u{feff}{block}")),
        ("yaml flow, bom", format!("\u{feff}{flow}")),
        ("json, bom", format!("\u{feff}{json}")),
        ("yaml block, crlf", block.replace('\n', "\r\n")),
        ("yaml flow, crlf", flow.replace(", ", ",\r\n")),
        ("json, crlf", json_pretty.replace('\n', "\r\n")),
    ]
}

async fn spawn_control(up: std::net::SocketAddr, state: &Path) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("no-seed.yaml");
    let config = config::ConfigBuilder::new(up, &keys_file)
        .control(state)
        .config();
    start(config, dir).await
}

async fn push(kw: &Proxy, content_type: Option<&str>, body: &[u8]) -> Got {
    let auth = admin_auth();
    let mut h = vec![("authorization", auth.as_str())];
    if let Some(ct) = content_type {
        h.push(("content-type", ct));
    }
    send("PUT", &kw.admin_url("/v1/snapshot"), &h, body).await
}

/// Every style, pushed with every content type that accepts it, then keyward restarted on
/// the same state file: the key still authenticates and keyward is ready.
#[tokio::test]
async fn every_accepted_push_is_loaded_at_the_next_start() {
    let up = spawn_upstream().await;
    let mut matrix = Vec::new();
    for (style, text) in styles("key_pushed", ROTATED_KEY) {
        let json = style.starts_with("json");
        let mut types = vec![None, Some("application/yaml"), Some("text/plain")];
        if json {
            types.push(Some("application/json"));
        }
        for content_type in types {
            let case = format!("{style}, content-type {content_type:?}");
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state/snapshot");
            let kw = spawn_control(up.addr, &state).await;
            assert_eq!(status_with(&kw, ROTATED_KEY).await, 503, "{case}");
            let r = push(&kw, content_type, text.as_bytes()).await;
            assert_eq!(r.status, 200, "{case}: {}", r.text());
            assert_eq!(status_with(&kw, ROTATED_KEY).await, 200, "{case}");
            let digest = r.json()["digest"].clone();
            kw.shutdown().await;

            let kw = spawn_control(up.addr, &state).await;
            assert_eq!(ready(&kw).await, 200, "{case}: ready after restart");
            assert_eq!(
                status_with(&kw, ROTATED_KEY).await,
                200,
                "{case}: after restart"
            );
            let info = get(
                &kw.admin_url("/v1/snapshot"),
                &[("authorization", &admin_auth())],
            )
            .await
            .json();
            assert_eq!(info["version"], 3, "{case}");
            assert_eq!(info["digest"], digest, "{case}: same content");
            kw.shutdown().await;
            matrix.push(case);
        }
    }
    assert_eq!(matrix.len(), 11 * 3 + 4);
}

/// A push declared JSON must be JSON: YAML under that content type is refused, and the
/// last good snapshot stays.
#[tokio::test]
async fn a_push_declared_json_must_be_json() {
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("snapshot");
    let kw = spawn_control(up.addr, &state).await;
    let all = styles("key_pushed", ROTATED_KEY);
    let r = push(&kw, Some("application/json"), all[3].1.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (style, text) in all.iter().filter(|(s, _)| s.starts_with("yaml")) {
        let other = text.replace("key_pushed", "key_other");
        let r = push(&kw, Some("application/json"), other.as_bytes()).await;
        assert_eq!(r.status, 400, "{style}: {}", r.text());
        assert_eq!(r.code(), "bad_snapshot", "{style}");
    }
    kw.shutdown().await;
    let kw = spawn_control(up.addr, &state).await;
    assert_eq!(status_with(&kw, ROTATED_KEY).await, 200);
    kw.shutdown().await;
}

/// A file in every style is read at start, and a file rewritten in every style is read
/// on reload; a start on the reloaded file loads it again.
#[tokio::test]
async fn a_file_in_every_style_is_read_at_start_and_on_reload() {
    let up = spawn_upstream().await;
    let at_start = styles("key_start", SERVICE_KEY);
    let reloaded = styles("key_reloaded", ROTATED_KEY);
    for ((style, text), (next_style, next)) in at_start.iter().zip(reloaded.iter().rev()) {
        let kw = spawn_proxy_with(up.addr, "", Some(text)).await;
        assert_eq!(ready(&kw).await, 200, "{style}: at start");
        assert_eq!(status_with(&kw, SERVICE_KEY).await, 200, "{style}");
        std::fs::write(kw.keys_file(), next).unwrap();
        eventually(&format!("{next_style}: reloaded"), || async {
            status_with(&kw, ROTATED_KEY).await == 200
        })
        .await;
        assert_eq!(status_with(&kw, SERVICE_KEY).await, 401, "{next_style}");
        kw.shutdown().await;
        let kw = spawn_proxy_with(up.addr, "", Some(next)).await;
        assert_eq!(ready(&kw).await, 200, "{next_style}: at start");
        assert_eq!(status_with(&kw, ROTATED_KEY).await, 200, "{next_style}");
        kw.shutdown().await;
    }
}

/// The documents that used to be taken for an empty snapshot.
const WITHOUT_KEYS: &[&str] = &[
    "",
    "\n\n",
    "{}",
    "version: 9\n",
    "# nothing but comments\n# here\n",
    "{\"version\": 9}",
    "version: 9\nkeys:\n  - id: key_half\n    sha256: 9f86d0818",
];

/// A document without `keys` is refused, naming the field, and the last good snapshot
/// stays, pushed or in a file; `keys: []` is an explicit empty snapshot.
#[tokio::test]
async fn keys_is_required_and_the_last_good_snapshot_stays() {
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("snapshot");
    let kw = spawn_control(up.addr, &state).await;
    let good = &styles("key_pushed", ROTATED_KEY)[0].1;
    assert_eq!(push(&kw, None, good.as_bytes()).await.status, 200);
    for text in WITHOUT_KEYS {
        let r = push(&kw, None, text.as_bytes()).await;
        assert_eq!(r.status, 400, "{text:?}: {}", r.text());
        assert!(
            r.json()["error"].as_str().unwrap().contains("keys"),
            "{text:?}: {}",
            r.text()
        );
        assert_eq!(status_with(&kw, ROTATED_KEY).await, 200, "{text:?}");
        assert_eq!(ready(&kw).await, 200, "{text:?}");
    }
    // An explicit empty snapshot is a valid document; replacing keys in force with it is
    // the guard's to refuse (SPEC 16) unless forced.
    let r = push(&kw, None, b"keys: []\n").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["code"], "snapshot_guard");
    let auth = admin_auth();
    let url = kw.admin_url("/v1/snapshot?force=true");
    let r = send(
        "PUT",
        &url,
        &[("authorization", auth.as_str())],
        b"keys: []\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["keys"], 0);
    kw.shutdown().await;

    let kw = spawn_proxy(up.addr, "").await;
    let errors = r#"keyward_snapshot_reloads_total{result="error",source="file"} "#;
    for (n, text) in WITHOUT_KEYS.iter().enumerate() {
        std::fs::write(kw.keys_file(), text).unwrap();
        eventually(&format!("{text:?} refused"), || async {
            let metrics = get(&kw.admin_url("/metrics"), &[]).await.text();
            metrics
                .lines()
                .find_map(|l| {
                    l.strip_prefix(errors)
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
                .is_some_and(|v| v >= (n + 1) as f64)
        })
        .await;
        assert_eq!(status_with(&kw, SERVICE_KEY).await, 200, "{text:?}");
        assert_eq!(ready(&kw).await, 200, "{text:?}");
    }
    kw.shutdown().await;
    // Started on such a file: no snapshot, fail closed.
    let kw = spawn_proxy_with(up.addr, "", Some("version: 9\n")).await;
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 503);
    assert_eq!(ready(&kw).await, 503);
    kw.shutdown().await;
}

/// A large invalid push answers a short error that carries none of the body, whether it
/// looks like JSON or YAML.
#[tokio::test]
async fn a_large_invalid_push_gets_a_short_error_that_does_not_echo_it() {
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let kw = spawn_control(up.addr, &dir.path().join("snapshot")).await;
    let secret = "sta_pasted_raw_key_0123456789abcdefghij";
    let long = secret.repeat(100_000);
    for (content_type, body) in [
        (None, format!("version: {long}\nkeys: []\n")),
        (None, format!("version: \"{long}\"\nkeys: []\n")),
        (None, format!("keys: []\n{long}: 1\n")),
        (None, format!("keys:\n  - id: {long}\n")),
        (None, format!("{{\"keys\": [], \"version\": \"{long}\"}}")),
        (None, format!("{{\"keys\": [], {long}")),
        (Some("application/json"), format!("{{\"{long}\": 1}}")),
        (None, format!("keys: [{{type: {long}}}]\n")),
    ] {
        let r = push(&kw, content_type, body.as_bytes()).await;
        let text = r.text();
        assert_eq!(r.status, 400, "{}", &text[..text.len().min(300)]);
        assert_eq!(r.code(), "bad_snapshot");
        assert!(text.len() < 600, "{} bytes: {}", text.len(), &text[..300]);
        assert!(!text.contains("sta_pasted"), "{text}");
    }
    kw.shutdown().await;
}

/// A parser quotes what it read; however a value or a name is shaped (escaped quotes inside a
/// string, a back-quote or dots inside a name, a line break), the refusal never carries a
/// key or a digest from the document, and no line break.
#[tokio::test]
async fn an_invalid_push_never_echoes_a_key_or_digest_however_it_is_quoted() {
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let kw = spawn_control(up.addr, &dir.path().join("snapshot")).await;
    let key = "sta_demo_service_key_0123456789abcdef";
    let digest = "c6ffcb30297a172f564779bcdcf7d47394ea14a71fcc078d857361dc65a8bf7e";
    let hex32 = "0123456789abcdef0123456789abcdef";
    let entry = format!(r#"{{\"sha256\": \"{digest}\", \"id\": \"key_a\"}}"#);
    for (content_type, body) in [
        // An entry JSON-encoded twice: a string where an object belongs.
        (
            Some("application/json"),
            format!(r#"{{"version": 2, "keys": ["{entry}"]}}"#),
        ),
        (None, format!("version: 'x\"{key}'\nkeys: []\n")),
        (None, format!("keys: []\n\"a`{key}\": 1\n")),
        (None, format!("keys: []\n{hex32}: 1\n")),
        (
            None,
            format!("keys: []\nsta.{}.{}: 1\n", &key[4..], &digest[..20]),
        ),
        (
            None,
            format!("keys: []\n\"x\\n2026 INFO keyward: FORGED {key}\": 1\n"),
        ),
    ] {
        let r = push(&kw, content_type, body.as_bytes()).await;
        let text = r.text();
        assert_eq!(r.status, 400, "{text}");
        assert_eq!(r.code(), "bad_snapshot");
        let message = r.json()["message"].as_str().unwrap().to_string();
        for secret in [key, digest, hex32, &key[4..], &digest[..20]] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(!message.contains(['\n', '\r', '\u{1b}']), "{message:?}");
    }
    kw.shutdown().await;
}

/// `n` service keys `sta_kept_key_<i>_...` from `from`, as a snapshot of `version`.
fn kept_keys(from: usize, n: usize, version: u32) -> String {
    let entries: String = (from..from + n)
        .map(|i| {
            format!(
                "  - {{ id: key_{i}, sha256: {}, type: service_account, subject_id: s{i}, account_id: a1, scopes: [read] }}\n",
                sha(&kept_key(i))
            )
        })
        .collect();
    format!("version: {version}\nkeys:\n{entries}")
}

fn kept_key(i: usize) -> String {
    format!("sta_kept_key_{i:02}_0123456789abcdef")
}

/// With `keys.state_file`, a file source keeps every snapshot it accepted from the file,
/// and a start whose file is refused (held back by the guard, or invalid) loads the last
/// accepted one: as it would have kept it while running. Without it, a restart took what
/// the file held then: a guarded Secret went live at the next pod restart, a broken one
/// left the pod with no snapshot.
#[tokio::test]
async fn a_file_source_with_a_state_file_starts_on_what_it_accepted() {
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let state = dir.path().join("state").join("kept.yaml");
    let start_on = || {
        let config = config::ConfigBuilder::new(up.addr, &keys)
            .set_in("keys", "state_file", &state.display().to_string())
            .config();
        start(config, tempfile::tempdir().unwrap())
    };
    std::fs::write(&keys, kept_keys(0, 12, 1)).unwrap();
    let kw = start_on().await;
    assert_eq!(status_with(&kw, &kept_key(5)).await, 200);
    assert_eq!(
        std::fs::read(&state).unwrap(),
        std::fs::read(&keys).unwrap()
    );
    // Two keys left: the guard holds it back, running and at the next start.
    std::fs::write(&keys, kept_keys(0, 2, 2)).unwrap();
    let guarded = r#"keyward_snapshot_reloads_total{result="guarded",source="file"} "#;
    eventually("the file is held back", || async {
        metric_value(&kw, guarded).await >= 1.0
    })
    .await;
    assert_eq!(status_with(&kw, &kept_key(5)).await, 200);
    kw.shutdown().await;
    let kw = start_on().await;
    assert_eq!(ready(&kw).await, 200);
    assert_eq!(
        status_with(&kw, &kept_key(5)).await,
        200,
        "the kept snapshot"
    );
    assert_eq!(
        metric_value(&kw, guarded).await,
        1.0,
        "the file refused at start"
    );
    kw.shutdown().await;
    // A broken file: the kept snapshot, not "no snapshot".
    std::fs::write(&keys, "keys: [").unwrap();
    let kw = start_on().await;
    assert_eq!(ready(&kw).await, 200);
    assert_eq!(status_with(&kw, &kept_key(5)).await, 200);
    kw.shutdown().await;
    // A file the guard lets through is taken, and kept in its turn.
    std::fs::write(&keys, kept_keys(3, 12, 3)).unwrap();
    let kw = start_on().await;
    assert_eq!(status_with(&kw, &kept_key(14)).await, 200);
    assert_eq!(status_with(&kw, &kept_key(0)).await, 401);
    assert_eq!(
        std::fs::read(&state).unwrap(),
        std::fs::read(&keys).unwrap()
    );
    kw.shutdown().await;
}
