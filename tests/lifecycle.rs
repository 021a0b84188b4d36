//! Key snapshot lifecycle: reload from file (change, symlink swap, SIGHUP), bad files, the
//! control API, fail-closed start, usage tracking, reload storms, graceful shutdown.

mod support;
use support::child::Keyward;
use support::*;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NEW_KEY: &str = "sta_rotated_key_0123456789abcdef";

/// The demo keys plus one more, with a new version.
fn keys_with_new_key(version: u64) -> String {
    let digest = hex::encode(keyward::keys::digest(NEW_KEY.as_bytes()));
    DEMO_KEYS.replace("version: 1", &format!("version: {version}"))
        + &format!(
            "  - id: key_rotated\n    sha256: {digest}\n    type: service_account\n    subject_id: s_rot\n    account_id: a_rot\n    scopes: [read]\n"
        )
}

/// A key whose id has a `/` in it (`team/ci`).
const TEAM_KEY: &str = "sta_team_ci_key_0123456789abcdef0";

#[tokio::test]
async fn file_change_is_reloaded_and_bad_file_keeps_last_good() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    assert_eq!(status_with(&kw, NEW_KEY).await, 401);
    std::fs::write(kw.keys_file(), keys_with_new_key(2)).unwrap();
    eventually("new key accepted", || async {
        status_with(&kw, NEW_KEY).await == 200
    })
    .await;
    // The metrics are published just after the swap that lets the key in.
    eventually("version 2 published", || async {
        metric_value(&kw, "keyward_snapshot_version ").await == 2.0
    })
    .await;

    // A broken file is refused whole; the last good snapshot stays in force.
    let errors = r#"keyward_snapshot_reloads_total{result="error",source="file"} "#;
    let before = metric_value(&kw, errors).await;
    let broken = keys_with_new_key(3).replace("type: personal", "type: robot");
    std::fs::write(kw.keys_file(), broken).unwrap();
    eventually("reload error counted", || async {
        metric_value(&kw, errors).await > before
    })
    .await;
    assert_eq!(status_with(&kw, NEW_KEY).await, 200);
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    assert_eq!(metric_value(&kw, "keyward_snapshot_version ").await, 2.0);

    // Removing a key revokes it on the next reload.
    std::fs::write(kw.keys_file(), DEMO_KEYS).unwrap();
    eventually("rotated key removed", || async {
        status_with(&kw, NEW_KEY).await == 401
    })
    .await;
    kw.shutdown().await;
}

#[cfg(unix)]
#[tokio::test]
async fn kubernetes_style_symlink_swap_is_seen() {
    use std::os::unix::fs::symlink;
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // The kubelet layout: keys.yaml -> ..data/keys.yaml, ..data -> ..v1 (swapped by rename).
    let v1 = dir.path().join("..v1");
    let v2 = dir.path().join("..v2");
    std::fs::create_dir(&v1).unwrap();
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v1.join("keys.yaml"), DEMO_KEYS).unwrap();
    std::fs::write(v2.join("keys.yaml"), keys_with_new_key(5)).unwrap();
    symlink("..v1", dir.path().join("..data")).unwrap();
    let link = dir.path().join("keys.yaml");
    symlink("..data/keys.yaml", &link).unwrap();
    let yaml = config_yaml(up.addr, &link, "");
    let config = keyward::config::Config::from_yaml(&yaml).unwrap();
    let kw = start(config, dir).await;
    assert_eq!(status_with(&kw, NEW_KEY).await, 401);
    let tmp = kw.dir.path().join("..data_tmp");
    symlink("..v2", &tmp).unwrap();
    std::fs::rename(&tmp, kw.dir.path().join("..data")).unwrap();
    eventually("swapped Secret seen", || async {
        status_with(&kw, NEW_KEY).await == 200
    })
    .await;
    kw.shutdown().await;
}

#[tokio::test]
async fn fail_closed_until_a_snapshot_arrives() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy_with(up.addr, "", None).await;
    let r = get(&kw.url("/v1/x"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "auth_unavailable");
    assert_eq!(get(&kw.admin_url("/readyz"), &[]).await.status, 503);
    assert_eq!(get(&kw.admin_url("/healthz"), &[]).await.status, 200);
    // Public routes need no snapshot.
    assert_eq!(get(&kw.url("/healthz"), &[]).await.status, 200);
    assert_eq!(up.count(), 1);

    std::fs::write(kw.keys_file(), DEMO_KEYS).unwrap();
    eventually("ready once the file appears", || async {
        get(&kw.admin_url("/readyz"), &[]).await.status == 200
    })
    .await;
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    kw.shutdown().await;
}

async fn spawn_control(up: std::net::SocketAddr, state: &std::path::Path, seed: bool) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.yaml");
    if seed {
        std::fs::write(&keys_file, DEMO_KEYS).unwrap();
    }
    let config = config::ConfigBuilder::new(up, &keys_file)
        .control(state)
        .config();
    start(config, dir).await
}

/// [`spawn_control`] on `snapshot.yaml` in a directory of its own, in front of a new
/// upstream: the start of most control API tests. The directory lives as long as it is held.
async fn control_proxy(seed: bool) -> (Upstream, tempfile::TempDir, std::path::PathBuf, Proxy) {
    let up = spawn_upstream().await;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("snapshot.yaml");
    let kw = spawn_control(up.addr, &state, seed).await;
    (up, state_dir, state, kw)
}

/// `PUT` of `body` as `content_type` to `url` with the admin token: a snapshot push.
async fn push(url: &str, content_type: &str, body: &[u8]) -> Got {
    let auth = admin_auth();
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", content_type),
    ];
    send("PUT", url, &h, body).await
}

/// An empty `POST` to `url` with the admin token: a revoke, a reload.
async fn admin_post(url: &str) -> Got {
    send("POST", url, &[("authorization", &admin_auth())], b"").await
}

#[tokio::test]
async fn control_api_put_get_disable_and_persistence() {
    let up = spawn_upstream().await;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("state/snapshot.yaml");
    let kw = spawn_control(up.addr, &state, false).await;
    let auth = admin_auth();
    let admin = |p: &str| kw.admin_url(p);

    // Fail closed until pushed.
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 503);
    // No token or a wrong one: 401.
    assert_eq!(get(&admin("/v1/snapshot"), &[]).await.status, 401);
    let wrong = [("authorization", "Bearer not-the-token")];
    assert_eq!(
        send("PUT", &admin("/v1/snapshot"), &wrong, DEMO_KEYS.as_bytes())
            .await
            .status,
        401
    );

    let r = push(
        &admin("/v1/snapshot"),
        "application/yaml",
        DEMO_KEYS.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["keys"], 6);
    assert!(state.exists(), "persisted before answering");
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    assert_eq!(get(&admin("/readyz"), &[]).await.status, 200);

    let info = get(&admin("/v1/snapshot"), &[("authorization", &auth)])
        .await
        .json();
    assert_eq!(info["version"], 1);
    assert_eq!(info["keys"], 6);
    assert_eq!(info["source"], "control");
    assert_eq!(info["digest"].as_str().unwrap().len(), 64);
    assert!(info["loaded_at"].as_str().unwrap().ends_with('Z'));

    // JSON by content-type; an invalid one is refused with the entry named.
    let digest = hex::encode(keyward::keys::digest(NEW_KEY.as_bytes()));
    let json = serde_json::json!({"version": 9, "keys": [
        {"id": "key_json", "sha256": digest, "type": "service_account", "subject_id": "s", "account_id": "a", "scopes": ["read"]},
        {"id": "key_svc", "sha256": hex::encode(keyward::keys::digest(SERVICE_KEY.as_bytes())), "type": "service_account", "subject_id": "s2", "account_id": "a", "scopes": ["read"]},
        {"id": "team/ci", "sha256": hex::encode(keyward::keys::digest(TEAM_KEY.as_bytes())), "type": "service_account", "subject_id": "s3", "account_id": "a", "scopes": ["read"]}
    ]});
    let put_json = async |body: &serde_json::Value| {
        push(
            &admin("/v1/snapshot"),
            "application/json",
            body.to_string().as_bytes(),
        )
        .await
    };
    let r = put_json(&json).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, NEW_KEY).await, 200);
    let mut bad = json.clone();
    bad["keys"][1]["sha256"] = serde_json::json!("nothex");
    let r = put_json(&bad).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("keys[1] id=key_svc: sha256"),
        "{}",
        r.text()
    );
    assert_eq!(
        status_with(&kw, NEW_KEY).await,
        200,
        "last good snapshot stays"
    );

    // Usage is tracked per key id.
    let entry = usage_of(&kw, "key_json").await.unwrap();
    assert!(entry["requests"].as_u64().unwrap() >= 2);

    // Emergency revoke: next request is refused, and it is persisted.
    let r = admin_post(&admin("/v1/keys/key_json/disable")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&kw.url("/v1/x"), &[("x-api-key", NEW_KEY)]).await;
    assert_eq!(r.code(), "disabled_api_key");
    let r = admin_post(&admin("/v1/keys/nope/disable")).await;
    assert_eq!(r.status, 404);
    // An id with a `/` in it, written raw or percent-encoded.
    assert_eq!(status_with(&kw, TEAM_KEY).await, 200);
    for path in ["/v1/keys/team/ci/disable", "/v1/keys/team%2Fci/disable"] {
        let r = admin_post(&admin(path)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json()["key_id"], "team/ci", "{path}");
        let r = get(&kw.url("/v1/x"), &[("x-api-key", TEAM_KEY)]).await;
        assert_eq!(r.code(), "disabled_api_key", "{path}");
    }
    kw.shutdown().await;

    // A restart loads the persisted state, revocation included.
    let kw = spawn_control(up.addr, &state, true).await;
    let r = get(&kw.url("/v1/x"), &[("x-api-key", NEW_KEY)]).await;
    assert_eq!(r.code(), "disabled_api_key");
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    assert_eq!(
        status_with(&kw, PERSONAL_KEY).await,
        401,
        "the seed file is not used once state exists"
    );
    kw.shutdown().await;
}

#[tokio::test]
async fn file_source_refuses_control_writes() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let auth = admin_auth();
    let r = admin_post(&kw.admin_url("/v1/keys/key_demo_service/disable")).await;
    assert_eq!(r.status, 409);
    let r = send(
        "PUT",
        &kw.admin_url("/v1/snapshot"),
        &[("authorization", &auth)],
        DEMO_KEYS.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 409);
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    // /metrics, /healthz and /readyz need no token.
    assert_eq!(get(&kw.admin_url("/metrics"), &[]).await.status, 200);
    kw.shutdown().await;
}

/// `GET /v1/keys/usage`'s entry for key `id`, if it has one.
async fn usage_of(kw: &Proxy, id: &str) -> Option<serde_json::Value> {
    let usage = get(
        &kw.admin_url("/v1/keys/usage"),
        &[("authorization", &admin_auth())],
    )
    .await
    .json();
    usage["keys"]
        .as_array()?
        .iter()
        .find(|k| k["key_id"] == id)
        .cloned()
}

/// A key used only on the introspection path (to check itself) is a used key.
#[tokio::test]
async fn introspection_counts_as_usage() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let r = get(&kw.url("/auth"), &[("x-api-key", PERSONAL_KEY)]).await;
    assert_eq!(r.status, 200);
    let entry = usage_of(&kw, "key_demo_personal").await;
    assert_eq!(entry.map(|e| e["requests"].clone()), Some(1.into()));
    assert_eq!(up.count(), 0);
    kw.shutdown().await;
}

#[tokio::test]
async fn usage_survives_reload_and_drops_removed_keys() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let auth = admin_auth();
    std::fs::write(kw.keys_file(), keys_with_new_key(2)).unwrap();
    eventually("new key", || async {
        status_with(&kw, NEW_KEY).await == 200
    })
    .await;
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    let usage = || async {
        get(&kw.admin_url("/v1/keys/usage"), &[("authorization", &auth)])
            .await
            .json()["keys"]
            .clone()
    };
    let u = usage().await;
    assert!(u
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["key_id"] == "key_rotated"));
    std::fs::write(
        kw.keys_file(),
        DEMO_KEYS.replace("version: 1", "version: 3"),
    )
    .unwrap();
    eventually("rotated key gone", || async {
        status_with(&kw, NEW_KEY).await == 401
    })
    .await;
    let u = usage().await;
    let ids: Vec<&str> = u
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["key_demo_service"],
        "kept across reload; removed keys drop out"
    );
    assert_eq!(u[0]["requests"], 1);
    kw.shutdown().await;
}

/// A large push is read from disk as a stream, in YAML and in JSON, and one changing a single
/// key changes that key (the rest are kept from the snapshot in force); a refused or broken-off
/// one leaves neither a stray file nor a changed state file behind.
#[tokio::test]
async fn large_pushes_are_spooled_and_refused_ones_leave_nothing_behind() {
    let (_up, state_dir, state, kw) = control_proxy(false).await;
    let entry = |i: usize| {
        serde_json::json!({"id": format!("key_{i}"), "sha256": hex::encode(keyward::keys::digest(format!("sta_bulk_{i}").as_bytes())),
            "type": "service_account", "subject_id": format!("s{i}"), "account_id": "a", "scopes": ["read"]})
    };
    let mut keys: Vec<_> = (0..5_000).map(entry).collect();
    keys.push(serde_json::json!({"id": "key_svc", "sha256": hex::encode(keyward::keys::digest(SERVICE_KEY.as_bytes())),
        "type": "service_account", "subject_id": "svc", "account_id": "a", "scopes": ["read"]}));
    let doc = serde_json::json!({"version": 5, "keys": keys});
    for (content_type, body) in [
        ("application/json", doc.to_string()),
        ("application/yaml", serde_yaml::to_string(&doc).unwrap()),
    ] {
        let r = push(&kw.admin_url("/v1/snapshot"), content_type, body.as_bytes()).await;
        assert_eq!(r.status, 200, "{content_type}: {}", r.text());
        assert_eq!(r.json()["keys"], 5_001);
        assert_eq!(
            std::fs::read_to_string(&state).unwrap(),
            body,
            "{content_type}"
        );
        assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    }
    let stored = std::fs::read(&state).unwrap();
    let mut bad = doc.clone();
    bad["keys"][4_500]["sha256"] = serde_json::json!("nothex");
    let url = kw.admin_url("/v1/snapshot");
    let put_json = async |body: &[u8]| push(&url, "application/json", body).await;
    let r = put_json(bad.to_string().as_bytes()).await;
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("keys[4500] id=key_4500: sha256"),
        "{}",
        r.text()
    );
    let r = put_json(b"{\"keys\": [\"\xff\"]}").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "bad_snapshot");
    assert!(
        r.text().contains("not UTF-8") || r.text().contains("invalid unicode code point"),
        "{}",
        r.text()
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        stored,
        "state file untouched"
    );
    let mut left: Vec<_> = std::fs::read_dir(state_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    // The lock file is the running keyward's claim on the state file, not a spool.
    assert_eq!(
        left,
        ["snapshot.yaml", "snapshot.yaml.lock"],
        "no spool file left behind"
    );
    assert_eq!(
        status_with(&kw, SERVICE_KEY).await,
        200,
        "last good snapshot stays"
    );
    // The keys that did not change are kept from the snapshot in force; the one that did
    // is the push's.
    let mut revoked = doc.clone();
    revoked["keys"][5_000]["status"] = serde_json::json!("disabled");
    let r = put_json(revoked.to_string().as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 401, "changed key");
    assert_eq!(
        status_with(&kw, "sta_bulk_7").await,
        200,
        "unchanged key, kept"
    );
    kw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_loses_no_request() {
    let (_up, _state_dir, _state, kw) = control_proxy(true).await;
    let kw = Arc::new(kw);
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (kw, ok, failed, stop) = (kw.clone(), ok.clone(), failed.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(kw.url("/v1/storm"))
                    .header("x-api-key", SERVICE_KEY)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                match c.request(req).await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let auth = admin_auth();
    let ah = [("authorization", auth.as_str())];
    for v in 0..40u64 {
        let body = keys_with_new_key(v + 10);
        let r = send("PUT", &kw.admin_url("/v1/snapshot"), &ah, body.as_bytes()).await;
        assert_eq!(r.status, 200);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("reload storm: {ok} requests ok, {failed} failed, 40 reloads");
    assert_eq!(failed, 0);
    assert!(ok > 40, "clients made progress during the storm: {ok}");
    assert_eq!(metric_value(&kw, "keyward_snapshot_version ").await, 49.0);
}

// ---- real process, real signals ----

/// The real binary on the test config (with the demo keys), edited by `tweak`.
async fn process(
    upstream: std::net::SocketAddr,
    tweak: impl Fn(config::ConfigBuilder) -> config::ConfigBuilder,
) -> Keyward {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, DEMO_KEYS).unwrap();
    let yaml = tweak(config::ConfigBuilder::new(upstream, &keys)).yaml();
    Keyward::start(dir, &yaml, &[]).await
}

/// Configured on port 0, `keyward run` prints the ports it bound, once, on stdout, and they
/// are the ones that answer.
#[tokio::test]
async fn the_start_up_line_names_the_bound_ports() {
    let up = spawn_upstream().await;
    let p = process(up.addr, |c| c.log("json", "error")).await;
    let (proxy, admin) = (p.addr(), p.admin);
    assert!(proxy.port() != 0 && admin.port() != 0 && proxy != admin);
    assert_eq!(p.decision, None);
    let ok = get(&p.url("/v1/x"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(ok.status, 200);
    let (status, _, stdout) = p.terminate().await;
    assert!(status.success());
    assert_eq!(
        stdout,
        [format!(
            "keyward listening proxy={proxy} admin={admin} decision=none"
        )]
    );
}

#[tokio::test]
async fn sighup_reloads_keys() {
    let up = spawn_upstream().await;
    // Polling every hour: only the signal can explain a reload.
    let p = process(up.addr, |c| c.poll_interval("1h")).await;
    let url = p.url("/v1/x");
    std::fs::write(p.path("keys.yaml"), keys_with_new_key(2)).unwrap();
    assert_eq!(
        get(&url, &[("x-api-key", NEW_KEY)]).await.status,
        401,
        "no reload without the signal"
    );
    p.signal("-HUP");
    eventually("SIGHUP reload", || async {
        get(&url, &[("x-api-key", NEW_KEY)]).await.status == 200
    })
    .await;
}

/// A key file rewritten in place, half written when the reload is asked for (a tool that
/// sends SIGHUP on the first write, or calls the reload endpoint): half a key file can
/// parse, and the new key's `status: disabled` line is its last. Whether asked by signal or
/// by the admin API, the reload waits for the file to hold still, and the key is never let
/// in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_asked_for_mid_write_waits_for_the_file_to_hold_still() {
    use std::io::Write;
    let up = spawn_upstream().await;
    let p = process(up.addr, |c| c.poll_interval("1h")).await;
    let url = p.url("/v1/x");
    for (round, by_signal) in [(2u64, true), (3, false)] {
        let whole = keys_with_new_key(round) + "    status: disabled\n";
        let cut = whole.len() - "    status: disabled\n".len();
        let mut file = std::fs::File::create(p.path("keys.yaml")).unwrap();
        file.write_all(&whole.as_bytes()[..cut]).unwrap();
        file.flush().unwrap();
        let asked = if by_signal {
            p.signal("-HUP");
            None
        } else {
            let reload = p.admin_url("/v1/snapshot/reload");
            Some(tokio::spawn(async move { admin_post(&reload).await }))
        };
        // The rest of the file lands while the reload is under way.
        let writing = Instant::now();
        while writing.elapsed() < Duration::from_millis(120) {
            let r = get(&url, &[("x-api-key", NEW_KEY)]).await;
            assert_eq!(r.status, 401, "round {round}: the half-written key got in");
        }
        file.write_all(&whole.as_bytes()[cut..]).unwrap();
        drop(file);
        if let Some(asked) = asked {
            let r = asked.await.unwrap();
            assert_eq!(r.status, 200, "round {round}: {}", r.text());
        }
        eventually("the whole file loaded", || async {
            get(&url, &[("x-api-key", NEW_KEY)]).await.code() == "disabled_api_key"
        })
        .await;
    }
}

/// A control source has no file to re-read: SIGHUP says so and changes nothing.
#[tokio::test]
async fn sighup_with_a_control_source_is_ignored_and_says_so() {
    let up = spawn_upstream().await;
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("state.yaml");
    std::fs::write(&state_file, DEMO_KEYS).unwrap();
    let p = process(up.addr, |c| c.control(&state_file)).await;
    p.signal("-HUP");
    eventually("the signal logged", || async {
        p.logs()
            .iter()
            .any(|l| l.contains("SIGHUP received: ignored"))
    })
    .await;
    assert!(!p.logs().iter().any(|l| l.contains("reloading keys")));
    let ok = get(&p.url("/v1/x"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(ok.status, 200, "still serving");
}

/// keyward (`tweak`ed) in front of an app that answers `/slow` after `after`: a keyed
/// request to it is in flight at the app when SIGTERM is sent.
async fn slow_request_then_term(
    after: Duration,
    tweak: impl Fn(config::ConfigBuilder) -> config::ConfigBuilder,
) -> (Keyward, tokio::task::JoinHandle<Got>, Upstream) {
    let up = upstream().route("/slow", Reply::After(after)).spawn().await;
    let p = process(up.addr, tweak).await;
    let listen = p.addr();
    let slow = tokio::spawn(async move {
        get(
            &format!("http://{listen}/slow"),
            &[("x-api-key", SERVICE_KEY)],
        )
        .await
    });
    eventually("slow request reached upstream", || async {
        up.count() >= 1
    })
    .await;
    p.signal("-TERM");
    (p, slow, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_finishes_in_flight_requests() {
    let (p, slow, _up) =
        slow_request_then_term(Duration::from_millis(1500), |c| c.shutdown("300ms", "10s")).await;
    eventually("readyz fails at once", || async {
        p.readyz().await == Some(503)
    })
    .await;
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "in-flight request completes");
    let (status, logs, _) = p.wait_exit().await;
    assert!(
        status.success(),
        "exit 0 after SIGTERM: {status:?}\n{logs:?}"
    );
}

/// A request still in flight when `grace` runs out is cut off by keyward: counted and
/// logged as that (444 `cut_at_shutdown`), not as a client that gave up (499
/// `client_closed_request`, review 70), or a shutdown cutting requests off looks like
/// clients leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_off_when_grace_runs_out_is_logged_as_keywards_doing() {
    let (p, slow, _up) = slow_request_then_term(Duration::from_secs(8), |c| {
        c.shutdown("0s", "500ms").set_in("log", "level", "info")
    })
    .await;
    let (status, stderr, stdout) = p.wait_exit().await;
    assert!(status.success(), "{status:?}\n{stderr:?}");
    let lines: Vec<&String> = stderr
        .iter()
        .chain(&stdout)
        .filter(|l| l.contains("/slow"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(r#""status":444"#) && l.contains(r#""code":"cut_at_shutdown""#)),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("client_closed_request")),
        "{lines:?}"
    );
    let _ = slow.await;
}

/// Review 42: after the traffic's grace, the admin listener waited up to 5 s of its own for
/// its requests (one whose head never ends, here), and the last usage flush after it: a
/// stopping process took `drain_delay + grace` and 5 s more, past what a deployment gives
/// it. What is left after the grace ends within one 2 s bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_admin_request_does_not_hold_the_exit_past_the_bound() {
    use tokio::io::AsyncWriteExt as _;
    let up = upstream().spawn().await;
    let p = process(up.addr, |c| c.shutdown("0s", "1s")).await;
    let mut admin = tokio::net::TcpStream::connect(p.admin).await.unwrap();
    admin
        .write_all(b"GET /v1/keys/usage HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    eventually("the admin connection is open", || async {
        p.readyz().await == Some(200)
    })
    .await;
    let start = std::time::Instant::now();
    p.signal("-TERM");
    let (status, logs, _) = p.wait_exit().await;
    let took = start.elapsed();
    assert!(status.success(), "{status:?}\n{logs:?}");
    assert!(
        took < Duration::from_millis(3500),
        "drain 0 s + grace 1 s + 2 s; took {took:?}"
    );
    drop(admin);
}

/// A FIFO or a device swapped in for the key file (through a symlink, as a ConfigMap swap
/// does) is refused like an unreadable file: the watcher neither blocks on it nor reads it
/// forever, and the next good file is loaded by polling as usual.
#[cfg(unix)]
#[tokio::test]
async fn a_fifo_or_device_in_place_of_the_key_file_is_refused_and_watching_goes_on() {
    use std::os::unix::fs::symlink;
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await;
    let keys = kw.keys_file();
    let dir = keys.parent().unwrap().to_path_buf();
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let errors = r#"keyward_snapshot_reloads_total{result="error",source="file"} "#;
    for (n, special) in [fifo.as_path(), std::path::Path::new("/dev/zero")]
        .into_iter()
        .enumerate()
    {
        let before = metric_value(&kw, errors).await;
        let link = dir.join("swap");
        symlink(special, &link).unwrap();
        std::fs::rename(&link, &keys).unwrap();
        eventually("the special file refused", || async {
            metric_value(&kw, errors).await > before
        })
        .await;
        assert_eq!(status_with(&kw, SERVICE_KEY).await, 200, "last good kept");
        // Renamed over the link, as an editor or a deploy tool does.
        let next = dir.join("next");
        let text = if n == 0 {
            keys_with_new_key(2)
        } else {
            DEMO_KEYS.to_string()
        };
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &keys).unwrap();
        let want = if n == 0 { 200 } else { 401 };
        eventually("the next good file loaded", || async {
            status_with(&kw, NEW_KEY).await == want
        })
        .await;
    }
    kw.shutdown().await;
}

// ---- draining: connections are let go before the listener closes ----

/// `GET /v1/x` with the service key on an open HTTP/1.1 connection; the whole response.
async fn keep_alive_get(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncWriteExt;
    let req = format!("GET /v1/x HTTP/1.1\r\nhost: app\r\nx-api-key: {SERVICE_KEY}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    read_response(s).await.to_lowercase()
}

/// Wait for `/readyz` to fail: the drain has started.
async fn draining(p: &Keyward) {
    eventually("readyz fails", || async { p.readyz().await == Some(503) }).await;
}

/// During `drain_delay` an HTTP/1.1 keep-alive connection gets `Connection: close` on its
/// next response and is closed after it (the client reconnects; no request is written onto
/// a connection keyward closes later), while a new connection is still served; whichever
/// HTTP/1.1 server reads it.
#[tokio::test]
async fn draining_closes_http1_keep_alive_connections_after_their_next_response() {
    let servers = ["fast", "hyper"].map(http1_keep_alive_is_let_go);
    futures_util::future::join_all(servers).await;
}

async fn http1_keep_alive_is_let_go(http1_server: &str) {
    use tokio::io::AsyncReadExt;
    let up = spawn_upstream().await;
    let p = process(up.addr, |c| {
        c.shutdown("2s", "5s").set("http1_server", http1_server)
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    let before = keep_alive_get(&mut s).await;
    assert!(before.starts_with("http/1.1 200"), "{before}");
    assert!(!before.contains("connection: close"), "{before}");

    p.signal("-TERM");
    draining(&p).await;
    let during = keep_alive_get(&mut s).await;
    assert!(during.starts_with("http/1.1 200"), "{during}");
    assert!(during.contains("connection: close"), "{during}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "closed by keyward after the response, long before drain_delay ends: {closed:?}"
    );

    // A new connection is still served during drain_delay, and let go the same way.
    let mut fresh = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    let served = keep_alive_get(&mut fresh).await;
    assert!(served.starts_with("http/1.1 200"), "{served}");
    assert!(served.contains("connection: close"), "{served}");
    let (status, logs, _) = p.wait_exit().await;
    assert!(status.success(), "{status:?}\n{logs:?}");
}

/// During `drain_delay` an HTTP/2 (h2c) connection gets a GOAWAY at once: its stream in
/// flight completes, the connection then ends well before `drain_delay` does, and a next
/// request needs a new connection; whichever server read the preface.
#[tokio::test]
async fn draining_sends_http2_connections_a_goaway_and_finishes_their_streams() {
    let servers = ["fast", "hyper"].map(http2_gets_a_goaway);
    futures_util::future::join_all(servers).await;
}

async fn http2_gets_a_goaway(http1_server: &str) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = upstream()
        .route("/slow", Reply::After(Duration::from_millis(600)))
        .spawn()
        .await;
    let p = process(up.addr, |c| {
        c.shutdown("3s", "5s").set("http1_server", http1_server)
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake::<
        _,
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(TokioExecutor::new(), TokioIo::new(tcp))
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let get = |path: &str| {
        http::Request::get(format!("http://{}{path}", p.addr()))
            .header("x-api-key", SERVICE_KEY)
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    let ok = send.send_request(get("/v1/x")).await.unwrap();
    assert_eq!(ok.status(), 200);
    let slow = tokio::spawn(send.send_request(get("/slow")));
    eventually("slow request reached upstream", || async {
        up.requests().iter().any(|s| s.target == "/slow")
    })
    .await;

    p.signal("-TERM");
    let signalled = std::time::Instant::now();
    let slow = slow.await.unwrap().expect("the stream in flight completes");
    assert_eq!(slow.status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(2), conn).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the connection ends cleanly (GOAWAY) well before drain_delay: {ended:?}"
    );
    assert!(signalled.elapsed() < Duration::from_secs(3));
    assert!(
        send.ready().await.is_err(),
        "a next request needs a new connection"
    );
    // Which a new connection still serves during drain_delay.
    let again = get_h2c(&p.url("/v1/x"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(again.status, 200);
    let (status, logs, _) = p.wait_exit().await;
    assert!(status.success(), "{status:?}\n{logs:?}");
}

/// Send `msg` through an open tunnel and read it back.
async fn echo(s: &mut tokio::net::TcpStream, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.expect("the tunnel echoes");
    assert_eq!(back, msg);
}

/// A WebSocket tunnel through keyward at `addr`, open (the upstream echoes).
async fn open_tunnel(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(ws_handshake(SERVICE_KEY).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.expect("a handshake answer");
    assert_eq!(raw_status(&head), 101, "{head}");
    s
}

/// A WebSocket tunnel open at SIGTERM is in flight like a request: it still echoes after
/// `drain_delay`, when the listener has closed, and the process waits for it (up to
/// `grace`), exiting once it closes.
#[tokio::test]
async fn an_open_tunnel_gets_grace_and_the_process_exits_when_it_closes() {
    let up = spawn_upstream().await;
    let p = process(up.addr, |c| c.shutdown("200ms", "10s").log("json", "info")).await;
    let mut s = open_tunnel(p.addr()).await;
    echo(&mut s, b"before").await;

    p.signal("-TERM");
    eventually("drain_delay over: the listener closed", || async {
        p.logs().iter().any(|l| l.contains("listener closed"))
    })
    .await;
    echo(&mut s, b"after drain_delay").await;
    assert!(
        tokio::net::TcpStream::connect(p.addr()).await.is_err(),
        "no new connection once drain_delay is over"
    );
    let logs = p.logs();
    assert!(
        !logs.iter().any(|l| l.contains("keyward stopped")),
        "the process waits for the tunnel: {logs:?}"
    );
    drop(s);
    let closed = std::time::Instant::now();
    let (status, logs, _) = p.wait_exit().await;
    assert!(status.success(), "{status:?}\n{logs:?}");
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "exits once the tunnel closes, not after grace: {:?}",
        closed.elapsed()
    );
}

/// A tunnel still open when `grace` runs out is cut then, and the process exits.
#[tokio::test]
async fn a_tunnel_open_past_grace_is_cut_and_the_process_exits() {
    use tokio::io::AsyncReadExt;
    let up = spawn_upstream().await;
    let p = process(up.addr, |c| c.shutdown("100ms", "1s")).await;
    let mut s = open_tunnel(p.addr()).await;
    echo(&mut s, b"open").await;
    let signalled = std::time::Instant::now();
    p.signal("-TERM");
    let (status, logs, _) = p.wait_exit().await;
    assert!(status.success(), "{status:?}\n{logs:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "the tunnel gets grace: {:?}",
        signalled.elapsed()
    );
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(cut, Ok(Ok(_)) | Ok(Err(_))),
        "the tunnel is cut: {cut:?}"
    );
}

/// A state file is one replica's: a second keyward on the same `keys.control.state_file`
/// does not start beside the first (it would rewrite the file from its own snapshot and
/// undo the first one's revokes): it waits for the lock, saying so (a rolling update's new
/// pod while the old one drains), and starts once the first is gone, on what the first
/// left, its revoke included. Past `STATE_LOCK_WAIT` (30 s) it refuses to start, naming
/// the setting (`keys::spool` tests).
#[tokio::test]
async fn a_second_keyward_on_the_same_state_file_waits_for_the_first() {
    let up = spawn_upstream().await;
    let (_state, a, _dir, second, _) = holder_and_waiter(up.addr).await;
    second_waits_while_the_first_revokes(a, second).await;
}

/// A keyward on a control state file seeded with the demo keys, and a second one on the
/// same file, seen waiting for its lock (and the line that said so).
async fn holder_and_waiter(
    up: std::net::SocketAddr,
) -> (
    tempfile::TempDir,
    Keyward,
    tempfile::TempDir,
    Second,
    String,
) {
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("state.yaml");
    std::fs::write(&state_file, DEMO_KEYS).unwrap();
    let a = process(up, |c| c.control(&state_file)).await;
    let (dir, mut second) = Second::start(up, &state_file);
    let waiting = second.until("waiting for the state file lock").await;
    (state, a, dir, second, waiting)
}

/// A SIGTERM to a keyward waiting for a state file's lock (a pod deleted during a rolling
/// update's wait) ends it at once, with exit 0, as it ends a running one; and the setting
/// named is the source's (`keys.control.state_file` here).
#[tokio::test]
async fn a_sigterm_ends_a_wait_for_the_state_file_lock() {
    let up = spawn_upstream().await;
    let (_state, _a, _dir, mut second, waiting) = holder_and_waiter(up.addr).await;
    assert!(waiting.contains("state_file"), "{waiting}");
    let signalled = std::time::Instant::now();
    let pid = second.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || second.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "{:?}",
        signalled.elapsed()
    );
}

/// An emergency revoke fails closed: when the state file cannot be replaced (here a
/// directory stands in its place, which stops root too), the key is refused from the next
/// request all the same; the answer is still `persist_failed`, saying the revoke is in
/// force but not persisted, and `keyward_snapshot_refused{result="error"}` shows it.
#[tokio::test]
async fn a_revoke_that_cannot_be_persisted_is_in_force_all_the_same() {
    let (_up, _state_dir, state, kw) = control_proxy(true).await;
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("occupied"), "").unwrap();

    let r = admin_post(&kw.admin_url("/v1/keys/key_demo_service/disable")).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.code(), "persist_failed");
    let body = r.json();
    let said = body["error"].as_str().unwrap();
    assert!(
        said.contains("in force") && said.contains("not persisted"),
        "{said}"
    );
    assert_eq!(body["in_force"], true);
    assert_eq!(body["persisted"], false);
    let denied = get(&kw.url("/v1/x"), &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(denied.code(), "disabled_api_key");
    let metrics = get(&kw.admin_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains(r#"keyward_snapshot_refused{result="error",source="control"} 1"#),
        "{metrics}"
    );
    kw.shutdown().await;
}

/// A push of the demo keys sent by hand: its head, announcing the whole body, and only the
/// first `sent` bytes of it.
async fn partial_push(kw: &Proxy, auth: &str, sent: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(kw.admin).await.unwrap();
    let head = format!(
        "PUT /v1/snapshot HTTP/1.1\r\nHost: a\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n",
        DEMO_KEYS.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&DEMO_KEYS.as_bytes()[..sent]).await.unwrap();
    s
}

/// Pushes are read one at a time (each may spool 512 MiB and parse at many times its
/// size): while one is being sent, another (a dry run too) waits a moment, then gets 409
/// `push_in_progress`; a body that stops arriving is answered 408 and gives the turn back.
#[tokio::test]
async fn snapshot_pushes_are_read_one_at_a_time() {
    let (_up, _state_dir, _state, kw) = control_proxy(true).await;
    let auth = admin_auth();
    // A push whose body is still on its way.
    let mut slow = partial_push(&kw, &auth, 10).await;
    let url = kw.admin_url("/v1/snapshot");
    let yaml = "application/yaml";
    eventually("the first push holds the turn", || async {
        let r = push(&format!("{url}?dry_run=true"), yaml, DEMO_KEYS.as_bytes()).await;
        r.status == 409 && r.code() == "push_in_progress"
    })
    .await;
    // A body that stops arriving gives the turn back (10 s without a byte): 408.
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), read_response(&mut slow))
        .await
        .expect("the stalled push is answered");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_stalled"), "{answer}");
    let r = push(&url, yaml, DEMO_KEYS.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    kw.shutdown().await;
}

/// A push whose body breaks off before its `Content-Length` is a bad request (400), not a
/// body too large: nothing is installed, and the next push is read.
#[tokio::test]
async fn a_push_whose_body_breaks_off_is_400_and_changes_nothing() {
    use tokio::io::AsyncWriteExt;
    let (_up, _state_dir, _state, kw) = control_proxy(true).await;
    let auth = admin_auth();
    let url = kw.admin_url("/v1/snapshot");
    let before = get(&url, &[("authorization", auth.as_str())]).await.text();
    let mut cut = partial_push(&kw, &auth, DEMO_KEYS.len() / 2).await;
    cut.shutdown().await.unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), read_response(&mut cut))
        .await
        .expect("the broken push is answered");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("bad_snapshot"), "{answer}");
    assert_eq!(
        get(&url, &[("authorization", auth.as_str())]).await.text(),
        before
    );
    let dry_run = format!("{url}?dry_run=true");
    let r = push(&dry_run, "application/yaml", DEMO_KEYS.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    kw.shutdown().await;
}

/// `limits.max_connection_age` closes each client connection gracefully once it is that
/// old (so a CA removed from `client_ca`, or a scale-out, reaches kept-alive clients): the
/// next HTTP/1.1 response says `Connection: close` and the connection closes after it (a
/// close between two requests would lose the one a client was sending), and a request in
/// flight at that moment gets its whole response.
#[tokio::test]
async fn connections_are_closed_gracefully_at_max_connection_age() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream()
        .route("/slow", Reply::After(std::time::Duration::from_millis(600)))
        .spawn()
        .await;
    let kw = spawn_proxy(up.addr, "limits: { max_connection_age: 300ms }\n").await;
    let req =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a\r\nx-api-key: {SERVICE_KEY}\r\n\r\n");
    let closed = |mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed after the response")
            .unwrap_or(0);
        n == 0
    };
    // Kept alive past its age: the next answer says close, then the connection closes.
    let mut kept = tokio::net::TcpStream::connect(kw.addr).await.unwrap();
    kept.write_all(req("/v1/first").as_bytes()).await.unwrap();
    let first = read_response(&mut kept).await;
    assert!(
        first.starts_with("HTTP/1.1 200") && !first.contains("connection: close"),
        "{first}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    kept.write_all(req("/v1/second").as_bytes()).await.unwrap();
    let second = read_response(&mut kept).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(second.contains("connection: close"), "{second}");
    assert!(closed(kept).await);
    // In flight when it ages: answered whole, then closed.
    let mut busy = tokio::net::TcpStream::connect(kw.addr).await.unwrap();
    busy.write_all(req("/slow").as_bytes()).await.unwrap();
    let answer = read_response(&mut busy).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed(busy).await);
    kw.shutdown().await;
}

/// A second `keyward run` on `state_file` (its own config dir), its output read line by
/// line as it comes: the lock wait happens before the start-up line.
struct Second {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Second {
    fn start(up: std::net::SocketAddr, state_file: &std::path::Path) -> (tempfile::TempDir, Self) {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let yaml = config::ConfigBuilder::new(up, &dir.path().join("keys.yaml"))
            .control(state_file)
            .yaml();
        let config = dir.path().join("keyward.yaml");
        std::fs::write(&config, &yaml).unwrap();
        let mut child = support::child::command(&["run", "--config", config.to_str().unwrap()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let seen = Vec::new();
        (dir, Self { child, lines, seen })
    }

    /// The first line (stdout or stderr) that contains `what`, within 15 s.
    async fn until(&mut self, what: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.contains(what) => return line,
                Ok(Some(line)) => self.seen.push(line),
                _ => panic!(
                    "no line with {what:?}; the process said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Second {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `second` is waiting for `a`'s lock: a revoke on `a`, then `a` stops; `second` then
/// starts on the state file `a` left, and refuses the revoked key.
async fn second_waits_while_the_first_revokes(a: Keyward, mut second: Second) {
    let r = admin_post(&a.admin_url("/v1/keys/key_demo_service/disable")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        second.child.try_wait().unwrap().is_none(),
        "the second one gave up while the first ran"
    );
    let (status, logs, _) = a.terminate().await;
    assert!(status.success(), "{logs:?}");

    let line = second.until("keyward listening").await;
    let bound = support::child::parse_listening(&line).expect("the start-up line");
    let url = format!("http://{}/v1/x", bound.proxy.unwrap());
    let r = get(&url, &[("x-api-key", SERVICE_KEY)]).await;
    assert_eq!(r.code(), "disabled_api_key", "the first one's revoke holds");
}

/// The lock follows the state, not a name: a lock file deleted while its holder runs, or
/// the state file's directory reached through a symlink, does not let a second keyward
/// start beside the first (before, it made a new lock file, locked it and started, and a
/// push on it undid the first one's revoke).
#[tokio::test]
async fn a_deleted_lock_file_or_another_path_does_not_let_a_second_keyward_in() {
    let up = spawn_upstream().await;
    let state = tempfile::tempdir().unwrap();
    let real = state.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let state_file = real.join("state.yaml");
    std::fs::write(&state_file, DEMO_KEYS).unwrap();
    let a = process(up.addr, |c| c.control(&state_file)).await;
    std::fs::remove_file(format!("{}.lock", state_file.display())).unwrap();
    let (_dir, mut second) = Second::start(up.addr, &state_file);
    second.until("waiting for the state file lock").await;
    drop(second);

    let link = state.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (_dir, mut second) = Second::start(up.addr, &link.join("state.yaml"));
    second.until("waiting for the state file lock").await;
    second_waits_while_the_first_revokes(a, second).await;
}
