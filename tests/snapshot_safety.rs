//! Snapshot safety (SPEC 16) through the front door, for the file source and the control
//! source: the blast-radius guard and its force, the dry run, `keyward diff`, the maximum
//! age, and the bounded per-key series.

mod support;
use support::*;

use std::path::Path;
use std::time::{Duration, SystemTime};

/// Raw key number `i` (a `sta_` service key, as the test config's prefixes want).
fn raw(i: usize) -> String {
    format!("sta_bulk_key_{i:04}_0123456789abcdef")
}

fn sha(i: usize) -> String {
    hex::encode(keyward::keys::digest(raw(i).as_bytes()))
}

/// Entry `i`, with `extra` fields.
fn entry(i: usize, extra: &str) -> String {
    format!(
        "  - {{ id: key_{i}, sha256: {}, type: service_account, subject_id: s{i}, account_id: a, scopes: [read]{extra} }}\n",
        sha(i)
    )
}

/// A snapshot of keys `ids`, each with `extra(i)` fields, and a document header `head`.
fn snapshot(
    head: &str,
    ids: impl IntoIterator<Item = usize>,
    extra: impl Fn(usize) -> String,
) -> String {
    let entries: String = ids.into_iter().map(|i| entry(i, &extra(i))).collect();
    format!("{head}keys:\n{entries}")
}

fn plain(ids: impl IntoIterator<Item = usize>) -> String {
    snapshot("", ids, |_| String::new())
}

/// Keys `ids`, the first `n` of them disabled.
fn first_disabled(ids: std::ops::Range<usize>, n: usize) -> String {
    let from = ids.start;
    snapshot("", ids, |i| {
        if i < from + n {
            ", status: disabled".into()
        } else {
            String::new()
        }
    })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Start keyward with a file source holding `keys`, and `keys_extra` added to `keys:`.
async fn spawn_file(up: std::net::SocketAddr, keys: &str, keys_extra: &str, extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.yaml");
    std::fs::write(&keys_file, keys).unwrap();
    let config = config::ConfigBuilder::new(up, &keys_file)
        .extra(extra)
        .merge_in("keys", &keys_fragment(keys_extra))
        .config();
    start(config, dir).await
}

/// Start keyward with a control source: `state` (written first when `initial` is given).
async fn spawn_control(up: std::net::SocketAddr, initial: Option<&str>, keys_extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    if let Some(text) = initial {
        std::fs::write(&state, text).unwrap();
    }
    let keys_file = dir.path().join("unused.yaml");
    let config = config::ConfigBuilder::new(up, &keys_file)
        .control(&state)
        .merge_in("keys", &keys_fragment(keys_extra))
        .config();
    start(config, dir).await
}

/// `keys_extra` (`", guard: { ... }"`, fields to add to `keys:`) as a flow mapping.
fn keys_fragment(keys_extra: &str) -> String {
    format!("{{ {} }}", keys_extra.trim_start_matches(','))
}

fn state_file(kw: &Proxy) -> std::path::PathBuf {
    kw.dir.path().join("state.yaml")
}

fn guarded_series(source: &str) -> String {
    format!(r#"keyward_snapshot_reloads_total{{result="guarded",source="{source}"}} "#)
}

async fn admin(kw: &Proxy, method: &str, path: &str, body: &str) -> Got {
    let auth = admin_auth();
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/yaml"),
    ];
    send(method, &kw.admin_url(path), &h, body.as_bytes()).await
}

async fn readyz(kw: &Proxy) -> u16 {
    get(&kw.admin_url("/readyz"), &[]).await.status.as_u16()
}

#[tokio::test]
async fn file_source_guarded_reload_keeps_the_old_keys_and_force_takes_it() {
    let up = spawn_upstream().await;
    let kw = spawn_file(up.addr, &plain(0..20), "", "").await;
    assert_eq!(status_with(&kw, &raw(19)).await, 200);

    // 15 of 20 removed: 0.75 > 0.5.
    std::fs::write(kw.keys_file(), plain(0..5)).unwrap();
    let guarded = guarded_series("file");
    eventually("guarded reload counted", || async {
        metric_value(&kw, &guarded).await == 1.0
    })
    .await;
    assert_eq!(
        status_with(&kw, &raw(19)).await,
        200,
        "the last good snapshot stays"
    );
    assert_eq!(readyz(&kw).await, 200);
    assert_eq!(metric_value(&kw, "keyward_snapshot_keys ").await, 20.0);

    // A reload asked for is guarded too, and answers with the counts.
    let r = admin(&kw, "POST", "/v1/snapshot/reload", "").await;
    assert_eq!(r.status, 409, "{}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "snapshot_guard");
    assert_eq!(
        (body["in_force"].as_u64(), body["removed"].as_u64()),
        (Some(20), Some(15))
    );
    assert_eq!(body["limit"], 0.5);
    assert_eq!(metric_value(&kw, &guarded).await, 2.0);
    assert_eq!(status_with(&kw, &raw(19)).await, 200);
    // Without the admin token: refused.
    let r = send(
        "POST",
        &kw.admin_url("/v1/snapshot/reload?force=true"),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);

    let r = admin(&kw, "POST", "/v1/snapshot/reload?force=true", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"], "ok");
    assert_eq!(r.json()["snapshot"]["keys"], 5);
    assert_eq!(
        status_with(&kw, &raw(19)).await,
        401,
        "forced: the file is in force"
    );
    assert_eq!(status_with(&kw, &raw(0)).await, 200);

    // Disabling counts as removing: 11 of 20 disabled is refused as well.
    std::fs::write(kw.keys_file(), plain(0..20)).unwrap();
    assert_eq!(
        admin(&kw, "POST", "/v1/snapshot/reload", "").await.status,
        200
    );
    let disabled = first_disabled(0..20, 11);
    std::fs::write(kw.keys_file(), disabled).unwrap();
    let r = admin(&kw, "POST", "/v1/snapshot/reload", "").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        (r.json()["disabled"].as_u64(), r.json()["removed"].as_u64()),
        (Some(11), Some(0))
    );
    assert_eq!(status_with(&kw, &raw(0)).await, 200);
    kw.shutdown().await;
}

#[tokio::test]
async fn file_source_empty_snapshot_is_refused_even_below_min_keys() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, "").await; // the 6 demo keys, under min_keys (10)
    std::fs::write(kw.keys_file(), "keys: []\n").unwrap();
    let guarded = guarded_series("file");
    eventually("empty file held back", || async {
        metric_value(&kw, &guarded).await == 1.0
    })
    .await;
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    assert_eq!(readyz(&kw).await, 200);
    // Below min_keys, anything short of empty passes.
    let one = DEMO_KEYS
        .split("  - id: key_demo_enterprise")
        .next()
        .unwrap()
        .to_string();
    std::fs::write(kw.keys_file(), one).unwrap();
    eventually("one key left", || async {
        metric_value(&kw, "keyward_snapshot_keys ").await == 1.0
    })
    .await;
    kw.shutdown().await;
}

#[tokio::test]
async fn reload_endpoint_errors_are_named() {
    let up = spawn_upstream().await;
    let kw = spawn_file(up.addr, DEMO_KEYS, "", "").await;
    std::fs::write(kw.keys_file(), "keys: {").unwrap();
    let r = admin(&kw, "POST", "/v1/snapshot/reload", "").await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (422, "bad_snapshot"),
        "{}",
        r.text()
    );
    std::fs::remove_file(kw.keys_file()).unwrap();
    let r = admin(&kw, "POST", "/v1/snapshot/reload?force=true", "").await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (500, "read_failed"),
        "{}",
        r.text()
    );
    assert_eq!(status_with(&kw, SERVICE_KEY).await, 200);
    kw.shutdown().await;

    let kw = spawn_control(up.addr, Some(DEMO_KEYS), "").await;
    let r = admin(&kw, "POST", "/v1/snapshot/reload", "").await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (409, "control_source")
    );
    kw.shutdown().await;
}

#[tokio::test]
async fn control_source_guarded_push_is_409_and_leaves_the_state_file_and_force_takes_it() {
    let up = spawn_upstream().await;
    let kw = spawn_control(up.addr, Some(&plain(0..20)), "").await;
    assert_eq!(status_with(&kw, &raw(19)).await, 200);
    let before = std::fs::read(state_file(&kw)).unwrap();

    let r = admin(&kw, "PUT", "/v1/snapshot", &plain(0..5)).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "snapshot_guard");
    assert_eq!(body["message"], body["error"]);
    assert_eq!(body["in_force"], 20);
    assert_eq!(body["removed"], 15);
    assert_eq!(body["disabled"], 0);
    assert_eq!(body["fraction"], 0.75);
    assert_eq!(body["limit"], 0.5);
    assert_eq!(
        std::fs::read(state_file(&kw)).unwrap(),
        before,
        "state file untouched"
    );
    let left: Vec<_> = std::fs::read_dir(kw.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        // The running keyward's claim on the state file, not a spool.
        .filter(|n| !n.to_string_lossy().ends_with(".lock"))
        .collect();
    assert_eq!(left.len(), 1, "no spool left: {left:?}");
    assert_eq!(status_with(&kw, &raw(19)).await, 200);
    assert_eq!(metric_value(&kw, &guarded_series("control")).await, 1.0);

    // Disabling 11 of 20 is refused the same way.
    let disabled = first_disabled(0..20, 11);
    let r = admin(&kw, "PUT", "/v1/snapshot", &disabled).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["disabled"], 11);
    assert_eq!(status_with(&kw, &raw(0)).await, 200);

    let r = admin(&kw, "PUT", "/v1/snapshot?force=true", &plain(0..5)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["keys"], 5);
    assert_eq!(
        std::fs::read_to_string(state_file(&kw)).unwrap(),
        plain(0..5)
    );
    assert_eq!(status_with(&kw, &raw(19)).await, 401);
    assert_eq!(status_with(&kw, &raw(4)).await, 200);
    kw.shutdown().await;
}

/// A refusal under the window names the version in force now as `version_in_force`, and
/// the version its counts are of (the one in force when the window began) as
/// `since_version`. Before, `version_in_force` named the window's (1 with 3 in force).
#[tokio::test]
async fn a_refusal_under_the_window_names_the_version_in_force() {
    let up = spawn_upstream().await;
    let versioned = |v: u64, ids: std::ops::Range<usize>| {
        snapshot(&format!("version: {v}\n"), ids, |_| String::new())
    };
    let kw = spawn_control(up.addr, Some(&versioned(1, 0..20)), "").await;
    for (v, ids) in [(2, 0..20), (3, 0..10)] {
        let r = admin(&kw, "PUT", "/v1/snapshot", &versioned(v, ids)).await;
        assert_eq!(r.status, 200, "{v}: {}", r.text());
    }
    let r = admin(&kw, "PUT", "/v1/snapshot", &versioned(4, 0..6)).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "snapshot_guard");
    assert_eq!(body["version_in_force"], 3, "{body}");
    assert_eq!(body["version"], 4, "{body}");
    assert!(
        body["since_version"].as_u64().is_some_and(|v| v < 3),
        "{body}"
    );
    kw.shutdown().await;
}

/// Pushes within the guard's window are judged together: adding a hundred new keys, then
/// keeping only those, removed every key clients used in two steps that each removed less
/// than half of the keys then in force. The second is refused (and so is its dry run),
/// counted against the snapshot in force before the first; forced, it starts a window of
/// its own.
#[tokio::test]
async fn pushes_within_the_window_are_judged_together() {
    let up = spawn_upstream().await;
    let kw = spawn_control(up.addr, Some(&plain(0..20)), "").await;
    let r = admin(&kw, "PUT", "/v1/snapshot", &plain(0..120)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", &plain(20..120)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["guard"]["would_refuse"], true, "{}", r.text());
    let r = admin(&kw, "PUT", "/v1/snapshot", &plain(20..120)).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "snapshot_guard");
    assert_eq!(body["removed"], 20);
    assert!(body["since_secs"].is_u64(), "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("judged together"),
        "{body}"
    );
    assert_eq!(status_with(&kw, &raw(0)).await, 200);
    // Small steps that stay within the share pass.
    let r = admin(&kw, "PUT", "/v1/snapshot", &plain(5..120)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Forced, the snapshot is the window's new start.
    let r = admin(&kw, "PUT", "/v1/snapshot?force=true", &plain(20..120)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(0)).await, 401);
    let r = admin(&kw, "PUT", "/v1/snapshot", &plain(20..121)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    kw.shutdown().await;

    // Keys disabled through the API are the operator's own word: the pipeline's next push,
    // which keeps them disabled, is not counted as disabling them.
    let kw = spawn_control(up.addr, Some(&plain(0..10)), "").await;
    for i in 0..6 {
        let r = admin(&kw, "POST", &format!("/v1/keys/key_{i}/disable"), "").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let mirrored = first_disabled(0..11, 6);
    let r = admin(&kw, "PUT", "/v1/snapshot", &mirrored).await;
    assert_eq!(r.status, 200, "{}", r.text());
    kw.shutdown().await;
}

/// A snapshot that locks every client out later rather than now is refused like one that
/// does it now: every key expiring in seconds, or a rate limit of one request in hours
/// (both were accepted with nothing locked out, then answered 401 and 429 to everyone).
#[tokio::test]
async fn a_push_that_expires_or_starves_every_key_soon_is_refused() {
    let up = spawn_upstream().await;
    let kw = spawn_control(up.addr, Some(&plain(0..20)), "").await;
    let soon = rfc3339(SystemTime::now() + std::time::Duration::from_secs(8));
    let expiring = snapshot("", 0..20, |_| format!(", expires_at: {soon}"));
    let starved = snapshot("", 0..20, |_| {
        ", rate_limit: { per_second: 0.0001, burst: 1 }".into()
    });
    for (what, body) in [("expiring", &expiring), ("starved", &starved)] {
        let r = admin(&kw, "PUT", "/v1/snapshot", body).await;
        assert_eq!(r.status, 409, "{what}: {}", r.text());
        assert_eq!(r.json()["code"], "snapshot_guard", "{what}");
        assert_eq!(r.json()["locked_out"], 20, "{what}");
    }
    // An expiry well past the horizon, and a slow but usable limit, are changes like any.
    let later = rfc3339(SystemTime::now() + std::time::Duration::from_secs(2 * 3600));
    let fine = snapshot("", 0..20, |_| {
        format!(", expires_at: {later}, rate_limit: {{ per_second: 0.5, burst: 1 }}")
    });
    let r = admin(&kw, "PUT", "/v1/snapshot", &fine).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(3)).await, 200);
    kw.shutdown().await;
}

/// With `keys.max_age`, a snapshot stamped so long ago that it goes stale within the hour
/// fails every request closed: the guard counts each key it keeps as locked out.
#[tokio::test]
async fn a_push_that_goes_stale_at_once_is_refused() {
    let up = spawn_upstream().await;
    let stamped = |t: SystemTime| {
        plain(0..12).replace("keys:", &format!("generated_at: {}\nkeys:", rfc3339(t)))
    };
    let kw = spawn_control(up.addr, Some(&stamped(SystemTime::now())), ", max_age: 1h").await;
    assert_eq!(status_with(&kw, &raw(3)).await, 200);
    let old = stamped(SystemTime::now() - Duration::from_secs(2 * 3600));
    let r = admin(&kw, "PUT", "/v1/snapshot", &old).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["locked_out"], 12);
    assert_eq!(status_with(&kw, &raw(3)).await, 200);
    kw.shutdown().await;

    // A short max_age and a first stamped snapshot over an unstamped one: fresh, taken.
    let kw = spawn_control(up.addr, Some(&plain(0..12)), ", max_age: 30m").await;
    let r = admin(&kw, "PUT", "/v1/snapshot", &stamped(SystemTime::now())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(3)).await, 200);
    kw.shutdown().await;
}

#[tokio::test]
async fn control_source_empty_push_is_refused_even_below_min_keys() {
    let up = spawn_upstream().await;
    let kw = spawn_control(up.addr, Some(&plain(0..2)), "").await;
    let r = admin(&kw, "PUT", "/v1/snapshot", "keys: []\n").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["reason"], "empty");
    assert_eq!(status_with(&kw, &raw(1)).await, 200);
    // Guard settings of the config: everything may go but the last key.
    kw.shutdown().await;
    let kw = spawn_control(
        up.addr,
        Some(&plain(0..20)),
        ", guard: { max_removed_fraction: 1, min_keys: 0 }",
    )
    .await;
    assert_eq!(
        admin(&kw, "PUT", "/v1/snapshot", &plain(0..1)).await.status,
        200
    );
    assert_eq!(
        admin(&kw, "PUT", "/v1/snapshot", "keys: []\n").await.status,
        409
    );
    assert_eq!(
        admin(&kw, "PUT", "/v1/snapshot?force=true", "keys: []\n")
            .await
            .status,
        200
    );
    assert_eq!(
        readyz(&kw).await,
        200,
        "an empty snapshot taken on purpose is a snapshot"
    );
    kw.shutdown().await;
}

/// A stale writer (a retried job, a second pipeline) would undo every change since its
/// version, an emergency revoke included: an older `version` pushed is refused until forced,
/// and so are the version in force enabling a key revoked since and a push without a version.
#[tokio::test]
async fn an_older_version_is_refused_as_a_rollback_until_forced() {
    let up = spawn_upstream().await;
    let kw = spawn_control(
        up.addr,
        Some(&snapshot("version: 7\n", 0..3, |_| String::new())),
        "",
    )
    .await;
    let r = admin(&kw, "POST", "/v1/keys/key_2/disable", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v8 = snapshot("version: 8\n", 0..4, |i| {
        if i == 2 {
            ", status: disabled".into()
        } else {
            String::new()
        }
    });
    assert_eq!(admin(&kw, "PUT", "/v1/snapshot", &v8).await.status, 200);
    let before = std::fs::read(state_file(&kw)).unwrap();

    let v7 = snapshot("version: 7\n", 0..3, |_| String::new());
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", &v7).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["guard"]["reason"], "rollback");
    assert_eq!(
        r.json()["enabled"],
        serde_json::json!(["key_2"]),
        "the revoke it would lift"
    );
    assert_eq!(
        (
            r.json()["version_in_force"].as_u64(),
            r.json()["version"].as_u64()
        ),
        (Some(8), Some(7))
    );
    let r = admin(&kw, "PUT", "/v1/snapshot", &v7).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let body = r.json();
    assert_eq!(
        (body["code"].as_str(), body["reason"].as_str()),
        (Some("snapshot_guard"), Some("rollback"))
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("version 7 is older than version 8"),
        "{body}"
    );
    assert_eq!(
        std::fs::read(state_file(&kw)).unwrap(),
        before,
        "state file untouched"
    );
    assert_eq!(status_with(&kw, &raw(2)).await, 401, "the revoke holds");
    assert_eq!(status_with(&kw, &raw(3)).await, 200);
    assert_eq!(metric_value(&kw, &guarded_series("control")).await, 1.0);
    // The same version again is not a rollback, as long as it lifts no revoke made since.
    assert_eq!(admin(&kw, "PUT", "/v1/snapshot", &v8).await.status, 200);
    let r = admin(&kw, "POST", "/v1/keys/key_3/disable", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(&kw, "PUT", "/v1/snapshot", &v8).await;
    assert_eq!(
        r.status,
        409,
        "a retried push of v8 would lift it: {}",
        r.text()
    );
    assert_eq!(r.json()["reason"], "rollback");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("version 8 is the version in force"),
        "{}",
        r.text()
    );
    assert_eq!(status_with(&kw, &raw(3)).await, 401, "the revoke holds");
    // Nor by renaming the revoked key (the same secret under a new id).
    let renamed = v8.replace("id: key_3,", "id: key_3b,");
    assert_ne!(renamed, v8);
    let r = admin(&kw, "PUT", "/v1/snapshot", &renamed).await;
    assert_eq!(r.status, 409, "a rename at v8 would lift it: {}", r.text());
    assert_eq!(status_with(&kw, &raw(3)).await, 401, "the revoke holds");
    // Nor by moving the revoked secret into another key's id (neither an added key nor an
    // enabled one: it passed, and the revoked secret got in as key_1).
    let moved = v8.replace(&entry(3, ""), "").replace(&sha(1), &sha(3));
    assert!(!moved.contains("key_3") && moved.contains(&sha(3)));
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", &moved).await;
    assert_eq!(r.json()["guard"]["reason"], "rollback", "{}", r.text());
    let r = admin(&kw, "PUT", "/v1/snapshot", &moved).await;
    assert_eq!(r.status, 409, "a move at v8 would lift it: {}", r.text());
    assert_eq!(status_with(&kw, &raw(3)).await, 401, "the revoke holds");
    // Nor may a push without a version follow a versioned one (which would then let any
    // older version in).
    let unversioned = snapshot("", 0..4, |_| String::new());
    let r = admin(&kw, "PUT", "/v1/snapshot", &unversioned).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("has no version"),
        "{}",
        r.text()
    );
    assert_eq!(status_with(&kw, &raw(3)).await, 401);

    let r = admin(&kw, "PUT", "/v1/snapshot?force=true", &v7).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(2)).await, 200, "taken on purpose");
    assert_eq!(status_with(&kw, &raw(3)).await, 401);
    kw.shutdown().await;

    // A file is the operator's own (and has no disable through the API to undo): an older
    // version there is taken.
    let kw = spawn_file(
        up.addr,
        &snapshot("version: 12\n", 0..3, |_| String::new()),
        "",
        "",
    )
    .await;
    // The dry run judges it as the file's reload will: not a rollback.
    let v11 = snapshot("version: 11\n", 0..3, |_| String::new());
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", &v11).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["guard"]["would_refuse"], false, "{}", r.text());
    std::fs::write(kw.keys_file(), &v11).unwrap();
    eventually("the older file is loaded", || async {
        metric_value(&kw, "keyward_snapshot_version ").await == 11.0
    })
    .await;
    kw.shutdown().await;
}

/// The guard counts the keys a client can use on this sidecar now: a snapshot that binds
/// every key to another environment, or leaves every key scopes no `scopes` rule accepts,
/// is refused; keys already
/// unusable (disabled, bound elsewhere) do not dilute the fraction; and a snapshot that
/// makes them usable again is not refused.
#[tokio::test]
async fn the_guard_counts_the_keys_usable_here_and_never_refuses_the_fix() {
    let up = spawn_upstream().await;
    // The test config's environment is `production`.
    let kw = spawn_control(up.addr, Some(&plain(0..12)), "").await;
    let push = |body: String, force: bool| {
        let kw = &kw;
        async move {
            let path = if force {
                "/v1/snapshot?force=true"
            } else {
                "/v1/snapshot"
            };
            admin(kw, "PUT", path, &body).await
        }
    };
    let staging = snapshot("", 0..12, |_| ", environment: staging".into());
    let r = push(staging.clone(), false).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        (r.json()["locked_out"].as_u64(), r.json()["usable"].as_u64()),
        (Some(12), Some(0))
    );
    let no_scopes = snapshot("", 0..12, |_| ", scopes: []".into())
        .replace(", scopes: [read], scopes: []", ", scopes: []");
    let r = push(no_scopes, false).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["locked_out"], 12);
    // Scopes no `scopes` rule accepts lock out as surely as none.
    let bogus = plain(0..12).replace("scopes: [read]", "scopes: [bogus]");
    let r = push(bogus, false).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["locked_out"], 12);
    assert_eq!(status_with(&kw, &raw(3)).await, 200);

    // Taken on purpose, then undone: the fix locks nobody out, so it is not refused.
    assert_eq!(push(staging, true).await.status, 200);
    assert_eq!(status_with(&kw, &raw(3)).await, 401, "bound elsewhere");
    let r = push(plain(0..12), false).await;
    assert_eq!(r.status, 200, "the fix passes: {}", r.text());
    assert_eq!(status_with(&kw, &raw(3)).await, 200);

    // 12 usable keys beside 20 disabled ones: removing the 12 is removing every usable key.
    let diluted = snapshot("", 0..32, |i| {
        if i >= 12 {
            ", status: disabled".into()
        } else {
            String::new()
        }
    });
    assert_eq!(push(diluted, false).await.status, 200);
    let r = push(snapshot("", 12..32, |_| ", status: disabled".into()), false).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let counts = ["in_force", "usable_in_force", "removed"].map(|f| r.json()[f].as_u64());
    assert_eq!(counts, [Some(32), Some(12), Some(12)]);
    // `min_keys` counts the keys in force: 9 usable beside 21 disabled are under it in
    // usable keys, and keeping only the disabled ones still removes every usable key.
    let nine = snapshot("", 0..30, |i| {
        if i >= 9 {
            ", status: disabled".into()
        } else {
            String::new()
        }
    });
    assert_eq!(push(nine, true).await.status, 200);
    let r = push(snapshot("", 9..30, |_| ", status: disabled".into()), false).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["usable_in_force"], 9);
    kw.shutdown().await;
}

/// A snapshot with no usable key (every key disabled, expired, not yet valid or bound to
/// another environment) lets nobody in, as an empty one does, and is refused as one in
/// place of a snapshot with a usable key, whatever `min_keys` says: for a push, its dry
/// run and a file alike; force takes it (review: three keys all disabled went live below
/// `min_keys`, the dry run saying `would_refuse: false`).
/// A snapshot whose keys are all given a scope no rule asks for lets nobody in, as an
/// empty one: refused as empty below `min_keys` too (review 53: `scopes: [bogus]` on every
/// key went live, and every request got 403). Forced, it goes. A rotation of every digest
/// lets the new secrets in, and passes.
#[tokio::test]
async fn a_snapshot_keeping_no_key_in_force_usable_is_refused_as_empty() {
    let up = spawn_upstream().await;
    let rotated: String = (0..3)
        .map(|i| {
            format!(
                "  - {{ id: key_{i}, sha256: {}, type: service_account, subject_id: s{i}, account_id: a, scopes: [read] }}\n",
                sha(i + 100)
            )
        })
        .collect();
    let cases = [(
        "every key locked out by its scopes",
        snapshot("", 0..3, |_| String::new()).replace("scopes: [read]", "scopes: [bogus]"),
    )];
    let kw = spawn_control(up.addr, Some(&plain(0..3)), "").await;
    for (what, body) in &cases {
        let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", body).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(r.json()["guard"]["reason"], "empty", "{what}: {}", r.text());
        let r = admin(&kw, "PUT", "/v1/snapshot", body).await;
        assert_eq!(r.status, 409, "{what}: {}", r.text());
        assert_eq!(r.json()["reason"], "empty", "{what}");
        assert_eq!(status_with(&kw, &raw(0)).await, 200, "{what}: in force");
    }
    // One key kept: it passes (below min_keys, the fraction rule does not apply).
    let kept = snapshot("", 0..3, |i| {
        if i == 0 {
            String::new()
        } else {
            ", status: disabled".into()
        }
    });
    let r = admin(&kw, "PUT", "/v1/snapshot", &kept).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(&kw, "PUT", "/v1/snapshot?force=true", &cases[0].1).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(0)).await, 403);
    // A rotation of every digest lets the new secrets in: below min_keys it passes.
    let r = admin(&kw, "PUT", "/v1/snapshot", &format!("keys:\n{rotated}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(100)).await, 200);
    kw.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_with_no_usable_key_is_refused_as_empty() {
    let up = spawn_upstream().await;
    let past = rfc3339(SystemTime::now() - Duration::from_secs(3600));
    let ahead = rfc3339(SystemTime::now() + Duration::from_secs(3600));
    let none_usable = [
        (
            "disabled",
            snapshot("", 0..3, |_| ", status: disabled".into()),
        ),
        (
            "expired",
            snapshot("", 0..3, |_| format!(", expires_at: {past}")),
        ),
        (
            "not yet valid",
            snapshot("", 0..3, |_| format!(", not_before: {ahead}")),
        ),
        (
            "another environment",
            snapshot("", 0..3, |_| ", environment: staging".into()),
        ),
    ];
    // Three keys: below min_keys (10), where only the empty rule applies.
    let kw = spawn_control(up.addr, Some(&plain(0..3)), "").await;
    for (n, (what, body)) in none_usable.iter().enumerate() {
        let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", body).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(
            r.json()["guard"]["would_refuse"],
            true,
            "{what}: {}",
            r.text()
        );
        assert_eq!(r.json()["guard"]["reason"], "empty", "{what}");
        let r = admin(&kw, "PUT", "/v1/snapshot", body).await;
        assert_eq!(r.status, 409, "{what}: {}", r.text());
        let b = r.json();
        assert_eq!(
            (b["code"].as_str(), b["reason"].as_str()),
            (Some("snapshot_guard"), Some("empty")),
            "{what}"
        );
        assert_eq!(
            (b["usable_in_force"].as_u64(), b["usable"].as_u64()),
            (Some(3), Some(0))
        );
        assert!(
            b["error"].as_str().unwrap().contains("is usable here"),
            "{what}: {b}"
        );
        let guarded = guarded_series("control");
        assert_eq!(metric_value(&kw, &guarded).await, (n + 1) as f64, "{what}");
        assert_eq!(status_with(&kw, &raw(1)).await, 200, "{what}: kept");
    }
    let r = admin(&kw, "PUT", "/v1/snapshot?force=true", &none_usable[0].1).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(1)).await, 401, "forced: taken");
    // In place of a snapshot that let nobody in, it is no loss.
    let r = admin(&kw, "PUT", "/v1/snapshot", &none_usable[1].1).await;
    assert_eq!(r.status, 200, "{}", r.text());
    kw.shutdown().await;

    // A file source: the watcher and a reload asked for hold it back alike.
    let kw = spawn_file(up.addr, &plain(0..3), "", "").await;
    std::fs::write(kw.keys_file(), &none_usable[0].1).unwrap();
    let guarded = guarded_series("file");
    eventually("the file is held back", || async {
        metric_value(&kw, &guarded).await >= 1.0
    })
    .await;
    let r = admin(&kw, "POST", "/v1/snapshot/reload", "").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        (r.json()["code"].as_str(), r.json()["reason"].as_str()),
        (Some("snapshot_guard"), Some("empty"))
    );
    assert_eq!(status_with(&kw, &raw(1)).await, 200, "kept");
    let r = admin(&kw, "POST", "/v1/snapshot/reload?force=true", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(1)).await, 401, "forced: taken");
    kw.shutdown().await;
}

/// A disable through the API is no way around the window. A disable of a key disabled
/// already installs nothing and says so (it installed a new snapshot and started the
/// window afresh: 20 keys, a push of 10, a no-op disable, then a push of 5 was accepted
/// where 20, 10, 5 is refused). A real disable leaves the window's earlier pushes counting,
/// its baseline counting the key as disabled too (a push that keeps it disabled is not
/// charged for it).
#[tokio::test]
async fn a_disable_never_starts_the_window_afresh() {
    let up = spawn_upstream().await;
    // key_0 disabled from the start: 20 usable keys of 21.
    let kw = spawn_control(up.addr, Some(&first_disabled(0..21, 1)), "").await;
    let r = admin(&kw, "PUT", "/v1/snapshot", &first_disabled(0..11, 1)).await;
    assert_eq!(r.status, 200, "10 of 20 removed: {}", r.text());
    let in_force = admin(&kw, "GET", "/v1/snapshot", "").await.json();
    let noop = admin(&kw, "POST", "/v1/keys/key_0/disable", "").await;
    assert_eq!(noop.status, 200, "{}", noop.text());
    // 5 of the 10 removed now, 15 of the 20 since the window began.
    let r = admin(&kw, "PUT", "/v1/snapshot", &first_disabled(0..6, 1)).await;
    assert_eq!(
        r.status,
        409,
        "the no-op disable reset the window: {}",
        r.text()
    );
    assert!(r.json()["since_secs"].is_u64(), "{}", r.text());
    assert_eq!(r.json()["removed"], 15);
    assert_eq!(status_with(&kw, &raw(7)).await, 200);
    // The no-op installed nothing, and said the key was disabled already.
    let body = noop.json();
    assert_eq!(body["already_disabled"], true, "{body}");
    assert_eq!(body["status"], "disabled");
    let now = admin(&kw, "GET", "/v1/snapshot", "").await.json();
    for field in ["digest", "loaded_at"] {
        assert_eq!(now[field], in_force[field], "{field}");
        assert_eq!(body["snapshot"][field], in_force[field], "{field}");
    }
    kw.shutdown().await;

    // A real disable: the pushes before it still count; the key it disabled is not charged.
    let kw = spawn_control(up.addr, Some(&plain(0..20)), "").await;
    let r = admin(&kw, "PUT", "/v1/snapshot", &plain(0..10)).await;
    assert_eq!(r.status, 200, "10 of 20 removed: {}", r.text());
    let disable = admin(&kw, "POST", "/v1/keys/key_0/disable", "").await;
    assert_eq!(disable.status, 200, "{}", disable.text());
    assert_eq!(status_with(&kw, &raw(0)).await, 401);
    // Against the snapshot in force: 4 of its 9 usable keys removed. Against the window's
    // baseline, key_0 disabled there too: 14 of 19.
    let r = admin(&kw, "PUT", "/v1/snapshot", &first_disabled(0..6, 1)).await;
    assert_eq!(r.status, 409, "the disable reset the window: {}", r.text());
    let b = r.json();
    assert!(b["since_secs"].is_u64(), "{b}");
    let counts = ["usable_in_force", "removed", "disabled"].map(|f| b[f].as_u64());
    assert_eq!(counts, [Some(19), Some(14), Some(0)], "{b}");
    assert_eq!(
        disable.json()["already_disabled"],
        false,
        "{}",
        disable.text()
    );
    // A push that keeps the revoke, within the share since the window began, passes.
    let r = admin(&kw, "PUT", "/v1/snapshot", &first_disabled(0..11, 1)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(0)).await, 401);
    assert_eq!(status_with(&kw, &raw(9)).await, 200);
    kw.shutdown().await;
}

/// A state file others could write is named at start, at `warn`, by its path, never its
/// content: anyone local who can write there chooses the keys the next start loads. Not
/// refused (Kubernetes' `emptyDir` directories are 0777); keyward's own writes stay 0600.
#[tokio::test]
async fn a_state_file_others_could_write_is_warned_of_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let state = state_dir.join("state.yaml");
    std::fs::write(&state, plain(0..3)).unwrap();
    let mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    mode(&state, 0o666);
    mode(&state_dir, 0o777);
    let config = config::ConfigBuilder::new(up.addr, &dir.path().join("unused.yaml"))
        .control(&state)
        .yaml();
    let kw = support::child::Keyward::start(dir, &config, &[("KEYWARD_LOG", "info")]).await;
    let r = send(
        "GET",
        &kw.admin_url("/v1/snapshot"),
        &[("authorization", admin_auth().as_str())],
        b"",
    )
    .await;
    assert_eq!(r.json()["keys"], 3, "loaded all the same: {}", r.text());
    let said = |level: &str, path: &Path| {
        kw.logs().into_iter().any(|l| {
            let l: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            l["level"] == level
                && l["setting"] == "keys.control.state_file"
                && l["path"] == path.display().to_string()
        })
    };
    assert!(said("WARN", &state), "file 0666:\n{}", kw.logs().join("\n"));
    // A 0777 directory is every Kubernetes emptyDir: said, not warned of.
    assert!(
        said("INFO", &state_dir),
        "dir 0777:\n{}",
        kw.logs().join("\n")
    );
    let logs = kw.logs().join("\n");
    assert!(!logs.contains(&sha(1)), "never the content: {logs}");
    // A revoke rewrites it owner-only.
    let r = send(
        "POST",
        &kw.admin_url("/v1/keys/key_1/disable"),
        &[("authorization", admin_auth().as_str())],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let written = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(written, 0o600);
    kw.terminate().await;

    // Owner-only, in a directory with the sticky bit: not a word.
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let state = state_dir.join("state.yaml");
    std::fs::write(&state, plain(0..3)).unwrap();
    mode(&state, 0o600);
    mode(&state_dir, 0o1777);
    let config = config::ConfigBuilder::new(up.addr, &dir.path().join("unused.yaml"))
        .control(&state)
        .yaml();
    let kw = support::child::Keyward::start(dir, &config, &[]).await;
    let (_, stderr, _) = kw.terminate().await;
    assert!(
        !stderr.iter().any(|l| l.contains("\"setting\"")),
        "{}",
        stderr.join("\n")
    );
}

/// A symlink state file is written through to its target while keyward's user (or root)
/// owns the link. One another local user put there after the start (the directory is a
/// sticky 1777 one) is not followed, as the kernel's `protected_symlinks` would not: the
/// push and the revoke answer `persist_failed`, and what the link names is left as it was,
/// or not created. (The push made the victim a 0600 file holding the snapshot.)
#[tokio::test]
async fn a_state_file_symlink_is_followed_only_while_keyward_owns_it() {
    use std::os::unix::fs::{lchown, symlink, PermissionsExt};
    const NOBODY: u32 = 65534;
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let sticky = dir.path().join("st");
    let volume = dir.path().join("volume");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::create_dir(&volume).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let target = volume.join("snap.yaml");
    std::fs::write(&target, plain(0..20)).unwrap();
    let state = sticky.join("state.yaml");
    symlink(&target, &state).unwrap();
    let victims = dir.path().join("victims");
    std::fs::create_dir(&victims).unwrap();
    let victim = victims.join("victim.txt");
    std::fs::write(&victim, "victim\n").unwrap();
    let config = config::ConfigBuilder::new(up.addr, &dir.path().join("unused.yaml"))
        .control(&state)
        .yaml();
    let kw = support::child::Keyward::start(dir, &config, &[]).await;
    let auth = admin_auth();
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/yaml"),
    ];
    let push = |body: String| {
        let url = kw.admin_url("/v1/snapshot");
        async move { send("PUT", &url, &h, body.as_bytes()).await }
    };
    let r = push(plain(0..21)).await;
    assert_eq!(r.status, 200, "through our link: {}", r.text());
    assert!(std::fs::symlink_metadata(&state)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), plain(0..21));

    let theirs = |to: &Path| {
        std::fs::remove_file(&state).unwrap();
        symlink(to, &state).unwrap();
        lchown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    };
    theirs(&victim);
    let r = push(plain(0..22)).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.code(), "persist_failed", "{}", r.text());
    assert!(r.text().contains("uid 65534"), "{}", r.text());
    let revoke = send(
        "POST",
        &kw.admin_url("/v1/keys/key_1/disable"),
        &[("authorization", auth.as_str())],
        b"",
    )
    .await;
    assert_eq!(revoke.status, 500, "{}", revoke.text());
    assert_eq!(revoke.code(), "persist_failed", "{}", revoke.text());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim\n");
    let beside: Vec<_> = std::fs::read_dir(&victims).unwrap().collect();
    assert_eq!(beside.len(), 1, "no spool beside the victim");

    let nowhere = victims.join("created.yaml");
    theirs(&nowhere);
    let r = push(plain(0..22)).await;
    assert_eq!(r.code(), "persist_failed", "dangling: {}", r.text());
    assert!(
        !nowhere.exists(),
        "a dangling link of theirs creates nothing"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), plain(0..21));
    kw.terminate().await;
}

#[tokio::test]
async fn dry_run_answers_the_diff_and_installs_nothing() {
    let up = spawn_upstream().await;
    let kw = spawn_control(up.addr, Some(&plain(0..20)), "").await;
    assert_eq!(status_with(&kw, &raw(3)).await, 200, "key_3 is used");
    assert_eq!(status_with(&kw, &raw(18)).await, 200, "key_18 is used");
    let before = std::fs::read(state_file(&kw)).unwrap();
    // Keys 0..11 removed, 16 gets new scopes, 17 a new digest, 18 disabled, 20 added.
    let new: String = format!(
        "keys:\n{}{}{}{}{}{}",
        (12..16).map(|i| entry(i, "")).collect::<String>(),
        entry(16, "").replace("[read]", "[read, write]"),
        entry(17, "").replace(&sha(17), &sha(99)),
        entry(18, ", status: disabled"),
        entry(19, ""),
        entry(20, ""),
    );
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", &new).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["dry_run"], true);
    assert_eq!(body["added"], serde_json::json!(["key_20"]));
    assert_eq!(body["removed"].as_array().unwrap().len(), 12);
    assert_eq!(
        body["changed"],
        serde_json::json!([
            {"id": "key_16", "fields": ["scopes"]},
            {"id": "key_17", "fields": ["sha256"]},
            {"id": "key_18", "fields": ["status"]},
        ])
    );
    assert_eq!(body["guard"]["would_refuse"], true);
    assert_eq!(body["guard"]["removed"], 12);
    assert_eq!(body["guard"]["disabled"], 1);
    let used: Vec<_> = body["would_deny_recently_used"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["key_id"].as_str().unwrap().to_string(),
                u["change"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(used.len(), 2, "{used:?}");
    assert!(
        used.contains(&("key_3".into(), "removed".into())),
        "{used:?}"
    );
    assert!(
        used.contains(&("key_18".into(), "disabled".into())),
        "{used:?}"
    );
    let text = r.text();
    for i in (0..21).chain([99]) {
        assert!(
            !text.contains(&sha(i)) && !text.contains(&raw(i)),
            "no digest, no key"
        );
    }
    // Nothing installed, persisted or counted.
    assert_eq!(status_with(&kw, &raw(3)).await, 200);
    assert_eq!(status_with(&kw, &raw(20)).await, 401);
    assert_eq!(std::fs::read(state_file(&kw)).unwrap(), before);
    assert_eq!(metric_value(&kw, &guarded_series("control")).await, 0.0);
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", "keys: {").await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (400, "bad_snapshot")
    );
    kw.shutdown().await;

    // A file source answers a dry run too (and still refuses real pushes).
    let kw = spawn_file(up.addr, &plain(0..3), "", "").await;
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=1", &plain(1..4)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["added"], serde_json::json!(["key_3"]));
    assert_eq!(r.json()["removed"], serde_json::json!(["key_0"]));
    assert_eq!(r.json()["guard"]["would_refuse"], false);
    assert_eq!(status_with(&kw, &raw(3)).await, 401);
    assert_eq!(
        admin(&kw, "PUT", "/v1/snapshot", &plain(1..4)).await.status,
        409
    );
    kw.shutdown().await;
}

/// A control call meant as a dry run never installs because of how its flag is spelled:
/// `True` (Python's urlencode), `TRUE` and percent-encoded names are read as the flag; any
/// other value (`yes`) or name (`dry-run`, `dryRun`), or a flag given twice, is a 400 that
/// installs nothing, `force` included.
#[tokio::test]
async fn a_dry_run_flag_is_read_strictly_and_never_installs() {
    let up = spawn_upstream().await;
    let kw = spawn_control(up.addr, Some(&plain(0..4)), "").await;
    let before = std::fs::read(state_file(&kw)).unwrap();
    let push = plain(1..4);
    for query in [
        "dry_run=True",
        "dry_run=TRUE",
        "dry%5Frun=1",
        "%64ry_run",
        "force=true&dry_run",
    ] {
        let r = admin(&kw, "PUT", &format!("/v1/snapshot?{query}"), &push).await;
        assert_eq!(r.status, 200, "{query}: {}", r.text());
        assert_eq!(
            r.json()["removed"],
            serde_json::json!(["key_0"]),
            "{query}: a diff"
        );
    }
    for query in [
        "dry_run=yes",
        "dry-run=true",
        "dryRun=true",
        "dry_run=",
        "dry_run=true&dry_run=false",
        "dry_run=true&extra=1",
        "force=yes",
        "force=true&dry-run=true",
    ] {
        let r = admin(&kw, "PUT", &format!("/v1/snapshot?{query}"), &push).await;
        assert_eq!(
            (r.status.as_u16(), r.code().as_str()),
            (400, "bad_request"),
            "{query}: {}",
            r.text()
        );
    }
    let r = admin(&kw, "POST", "/v1/snapshot/reload?force=maybe", "").await;
    assert_eq!(r.status, 400, "{}", r.text());
    // Nothing was installed or persisted: key_0 still works.
    assert_eq!(status_with(&kw, &raw(0)).await, 200);
    assert_eq!(std::fs::read(state_file(&kw)).unwrap(), before);
    kw.shutdown().await;
}

fn keyward_diff(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = support::child::command(args)
        .current_dir(dir)
        .output()
        .expect("run keyward");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
fn keyward_diff_prints_the_diff_and_exits_by_the_guard() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("old.yaml", &plain(0..20));
    // Half removed and one secret replaced: 10 of 20, the most the guard lets through.
    let small = format!(
        "{}{}{}",
        plain(0..9),
        entry(9, "").replace(&sha(9), &sha(99)),
        entry(10, "")
    );
    write("small_change.yaml", &small);
    write("cut.yaml", &plain(0..5));
    write("empty.yaml", "keys: []\n");
    write("bad.yaml", "keys: {");

    let (code, out, _) = keyward_diff(&["diff", "old.yaml", "small_change.yaml"], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("- key_11\n") && out.contains("~ key_9: sha256\n"),
        "{out}"
    );
    assert!(out.contains("passes"), "{out}");

    let (code, out, _) = keyward_diff(&["diff", "old.yaml", "cut.yaml"], dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("removes 15, disables 0 and locks out 0 of 20"),
        "{out}"
    );

    let (code, out, _) = keyward_diff(&["diff", "--json", "old.yaml", "empty.yaml"], dir.path());
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["guard"]["reason"], "empty");
    assert_eq!(json["removed"].as_array().unwrap().len(), 20);

    for (old, new) in [("old.yaml", "small_change.yaml"), ("old.yaml", "cut.yaml")] {
        for json in [true, false] {
            let mut args = vec!["diff", old, new];
            if json {
                args.push("--json");
            }
            let (_, out, err) = keyward_diff(&args, dir.path());
            for i in (0..20).chain([99]) {
                assert!(
                    !out.contains(&sha(i)) && !err.contains(&sha(i)),
                    "no digest in {out}"
                );
            }
        }
    }

    let (code, _, err) = keyward_diff(&["diff", "old.yaml", "bad.yaml"], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("bad.yaml"), "{err}");
    let (code, _, err) = keyward_diff(&["diff", "missing.yaml", "old.yaml"], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("missing.yaml"), "{err}");

    // keys.guard read from an explicit --config.
    let config = "listen: 127.0.0.1:8080\nupstream: http://127.0.0.1:3000\nenvironment: t\n\
                  keys: { file: old.yaml, guard: { max_removed_fraction: 0.8 } }\n";
    write("keyward.yaml", config);
    let args = ["diff", "--config", "keyward.yaml", "old.yaml", "cut.yaml"];
    assert_eq!(keyward_diff(&args, dir.path()).0, 0, "0.75 <= 0.8");
    let args = ["diff", "--config", "nope.yaml", "old.yaml", "cut.yaml"];
    assert_eq!(keyward_diff(&args, dir.path()).0, 2);

    // With a control source's config, NEW is judged as a push: an older version is a
    // rollback, as the sidecar would answer it; with a file source's, it is taken.
    write(
        "v2.yaml",
        &snapshot("version: 2\n", 0..4, |_| String::new()),
    );
    write(
        "v1.yaml",
        &snapshot("version: 1\n", 0..4, |_| String::new()),
    );
    let control = "listen: 127.0.0.1:8080\nupstream: http://127.0.0.1:3000\nenvironment: t\n\
                   keys: { control: { state_file: state.yaml } }\n";
    write("control.yaml", control);
    let (code, out, _) = keyward_diff(
        &["diff", "--config", "control.yaml", "v2.yaml", "v1.yaml"],
        dir.path(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("version 1 is older than version 2"), "{out}");
    let args = ["diff", "--config", "keyward.yaml", "v2.yaml", "v1.yaml"];
    assert_eq!(keyward_diff(&args, dir.path()).0, 0);
}

#[tokio::test]
async fn max_age_fails_closed_until_a_fresh_snapshot_arrives() {
    let up = spawn_upstream().await;
    let old = SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
    let stale = plain(0..3).replace("keys:", &format!("generated_at: {}\nkeys:", rfc3339(old)));
    let kw = spawn_control(up.addr, Some(&stale), ", max_age: 1h").await;
    let r = get(&kw.url("/v1/x"), &[("x-api-key", &raw(0))]).await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (503, "auth_unavailable")
    );
    assert_eq!(readyz(&kw).await, 503);
    // An instance out of its Service gets no traffic to count: what pages is its readiness.
    assert_eq!(metric_value(&kw, "keyward_ready ").await, 0.0);
    let generated = metric_value(&kw, "keyward_snapshot_generated_timestamp_seconds ").await;
    assert_eq!(
        generated,
        humantime::parse_rfc3339(&rfc3339(old))
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    );
    assert_eq!(
        metric_value(&kw, "keyward_snapshot_max_age_seconds ").await,
        3600.0
    );

    let fresh = plain(0..3).replace(
        "keys:",
        &format!("generated_at: {}\nkeys:", rfc3339(SystemTime::now())),
    );
    let r = admin(&kw, "PUT", "/v1/snapshot", &fresh).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(0)).await, 200);
    assert_eq!(readyz(&kw).await, 200);
    assert_eq!(metric_value(&kw, "keyward_ready ").await, 1.0);
    // A snapshot already too old locks every key out: the guard refuses it as empty (as
    // the fraction rule does at `min_keys` keys or more); forced, it fails closed as soon
    // as it is installed (SPEC 16).
    let r = admin(&kw, "PUT", "/v1/snapshot", &stale).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["reason"], "empty", "{}", r.text());
    assert_eq!(readyz(&kw).await, 200);
    let r = admin(&kw, "PUT", "/v1/snapshot?force=true", &stale).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(readyz(&kw).await, 503);
    kw.shutdown().await;

    // File source; the age is checked against the clock on every request, not only at load:
    // a snapshot fresh when loaded turns stale with no reload.
    let about_now = plain(0..3).replace(
        "keys:",
        &format!("generated_at: {}\nkeys:", rfc3339(SystemTime::now())),
    );
    let kw = spawn_file(up.addr, &about_now, ", max_age: 3s", "").await;
    assert_eq!(status_with(&kw, &raw(0)).await, 200);
    assert_eq!(readyz(&kw).await, 200);
    eventually("snapshot turns stale", || async {
        status_with(&kw, &raw(0)).await == 503
    })
    .await;
    assert_eq!(readyz(&kw).await, 503);
    assert_eq!(
        metric_value(
            &kw,
            r#"keyward_snapshot_reloads_total{result="ok",source="file"} "#
        )
        .await,
        1.0
    );
    // Dated an hour ahead (a date typed wrong): refused, since its age would count from
    // when it is first seen, afresh at every restart; the stale one stays, failing closed.
    let ahead = SystemTime::now() + Duration::from_secs(3600);
    let typo = plain(0..3).replace("keys:", &format!("generated_at: {}\nkeys:", rfc3339(ahead)));
    std::fs::write(kw.keys_file(), typo).unwrap();
    let refused = r#"keyward_snapshot_reloads_total{result="error",source="file"} "#;
    eventually("the future stamp is refused", || async {
        metric_value(&kw, refused).await == 1.0
    })
    .await;
    assert_eq!(status_with(&kw, &raw(0)).await, 503);
    // A minute ahead (a generator's clock a little fast): taken, counting from when it is
    // first seen.
    let later = SystemTime::now() + Duration::from_secs(60);
    let renewed = plain(0..3).replace("keys:", &format!("generated_at: {}\nkeys:", rfc3339(later)));
    std::fs::write(kw.keys_file(), renewed).unwrap();
    eventually("fresh file restores auth", || async {
        status_with(&kw, &raw(0)).await == 200
    })
    .await;
    assert_eq!(readyz(&kw).await, 200);

    // A generated_at ahead counts from when it is first seen, and a reload of the same
    // generated_at keeps that deadline: reloading cannot put off failing closed.
    eventually("the renewed snapshot turns stale", || async {
        status_with(&kw, &raw(0)).await == 503
    })
    .await;
    let r = admin(&kw, "POST", "/v1/snapshot/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        status_with(&kw, &raw(0)).await,
        503,
        "a reload does not renew it"
    );
    kw.shutdown().await;

    // Without generated_at a snapshot has no known age and never goes stale.
    let kw = spawn_file(up.addr, &plain(0..3), ", max_age: 1s", "").await;
    assert_eq!(status_with(&kw, &raw(0)).await, 200);
    assert_eq!(
        metric_value(&kw, "keyward_snapshot_generated_timestamp_seconds ").await,
        0.0
    );
    kw.shutdown().await;
}

#[tokio::test]
async fn per_key_limit_bounds_the_expiry_series_to_the_soonest() {
    let up = spawn_upstream().await;
    let keys = snapshot("", 0..30, |i| {
        format!(", expires_at: {}-01-01T00:00:00Z", 2100 - i)
    });
    let kw = spawn_file(
        up.addr,
        &keys,
        "",
        "metrics: { per_key: true, per_key_limit: 4 }\n",
    )
    .await;
    let text = get(&kw.admin_url("/metrics"), &[]).await.text();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("keyward_key_expiry_timestamp_seconds{"))
        .collect();
    assert_eq!(series.len(), 4, "{series:?}");
    for soonest in 26..30 {
        assert!(
            text.contains(&format!("{{key_id=\"key_{soonest}\"}}")),
            "{series:?}"
        );
    }
    kw.shutdown().await;
}

/// A YAML alias replays its anchored node at each use, a tag copies its prefix into each
/// node: a small push that builds millions of strings or gigabytes. Refused whole, naming
/// where.
#[tokio::test]
async fn a_snapshot_with_yaml_aliases_is_refused() {
    let up = spawn_upstream().await;
    let kw = spawn_control(up.addr, Some(&plain(0..2)), "").await;
    let anchored = format!(
        "keys:\n  - {{ id: key_a, sha256: {}, type: service_account, subject_id: s, account_id: a, scopes: &s [read, write] }}\n  - {{ id: key_b, sha256: {}, type: service_account, subject_id: s, account_id: a, scopes: *s }}\n",
        sha(5),
        sha(6)
    );
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", &anchored).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("line 3") && r.text().contains("aliases"),
        "{}",
        r.text()
    );
    let r = admin(&kw, "PUT", "/v1/snapshot", &anchored).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // A tag, or a `%TAG` directive that copies a long prefix into every node: refused too.
    let tagged = format!("%TAG !x! tag:{}\n---\n{}", "A".repeat(64), plain(5..6));
    let r = admin(&kw, "PUT", "/v1/snapshot", &tagged).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("tags"), "{}", r.text());
    // The last good snapshot stays.
    assert_eq!(status_with(&kw, &raw(1)).await, 200);
    assert_eq!(status_with(&kw, &raw(5)).await, 401);
    kw.shutdown().await;
}

/// Keys moved to new ids under the same secrets are a rename, unless the entries they
/// moved into lock their clients out: then the guard counts them as removed, as it counts
/// the same change under the old ids (review: renaming every key with `scopes: []`, a
/// type its prefix refuses, an expiry in seconds or a starving limit was taken with
/// nothing counted, and every client refused). A disabled secret brought back under a new
/// id is named in the dry run's `enabled`.
#[tokio::test]
async fn a_rename_is_no_way_around_the_guard() {
    let up = spawn_upstream().await;
    let kw = spawn_control(up.addr, Some(&plain(0..12)), "").await;
    let moved = |extra: &str, edit: &dyn Fn(String) -> String| {
        edit(snapshot("", 0..12, |_| extra.to_string())).replace("id: key_", "id: moved_")
    };
    let soon = rfc3339(SystemTime::now() + Duration::from_secs(8));
    let same = |s: String| s;
    let variants = [
        ("no scope", moved("", &|s| s.replace("[read]", "[]"))),
        (
            "type",
            moved("", &|s| s.replace("service_account", "personal")),
        ),
        ("expiring", moved(&format!(", expires_at: {soon}"), &same)),
        (
            "starved",
            moved(", rate_limit: { per_second: 0.0001, burst: 1 }", &same),
        ),
    ];
    for (what, body) in &variants {
        let r = admin(&kw, "PUT", "/v1/snapshot", body).await;
        assert_eq!(r.status, 409, "{what}: {}", r.text());
        assert_eq!(r.json()["code"], "snapshot_guard", "{what}");
        assert_eq!(r.json()["removed"], 12, "{what}");
    }
    assert_eq!(status_with(&kw, &raw(3)).await, 200);
    // A plain rename keeps every client in: taken.
    let r = admin(&kw, "PUT", "/v1/snapshot", &moved("", &same)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(3)).await, 200);
    // Disabled through the API, then moved under another id: the dry run names the enable.
    // A parameter the endpoint does not take is refused, not ignored.
    let r = admin(&kw, "POST", "/v1/keys/moved_3/disable?force=true", "").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(status_with(&kw, &raw(3)).await, 200, "nothing disabled");
    let r = admin(&kw, "POST", "/v1/keys/moved_3/disable", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let back = moved("", &same).replace("id: moved_3,", "id: again_3,");
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", &back).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["enabled"],
        serde_json::json!(["again_3"]),
        "{}",
        r.text()
    );
    // Or swapped with another key's secret, both ids staying: named by the id it is under.
    let swapped = moved("", &same)
        .replace(&sha(3), "SHA_3")
        .replace(&sha(4), &sha(3))
        .replace("SHA_3", &sha(4))
        .replace("id: moved_3,", "id: moved_3, status: disabled,");
    let r = admin(&kw, "PUT", "/v1/snapshot?dry_run=true", &swapped).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["enabled"],
        serde_json::json!(["moved_4"]),
        "{}",
        r.text()
    );
    kw.shutdown().await;
}

/// A key in force being rotated out is still let in until the push lands: its raw key as
/// another entry's id is refused like any secret, with the entry refused for anything else
/// too, and never shown (the dry run listed it among `added`, an error printed it).
#[tokio::test]
async fn the_secrets_in_force_are_not_shown_by_the_push_that_replaces_them() {
    let up = spawn_upstream().await;
    let kw = spawn_control(up.addr, Some(&plain(0..12)), "").await;
    let pasted = plain(1..12) + &entry(99, "").replace("key_99", &raw(0));
    for (path, body) in [
        ("/v1/snapshot?dry_run=true", pasted.clone()),
        ("/v1/snapshot", pasted.clone()),
        (
            "/v1/snapshot",
            pasted.replace("scopes: [read]", "scopes: [read], status: paused"),
        ),
    ] {
        let r = admin(&kw, "PUT", path, &body).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(!r.text().contains(&raw(0)), "{path}: {}", r.text());
    }
    assert_eq!(status_with(&kw, &raw(0)).await, 200, "nothing installed");
    kw.shutdown().await;
}
