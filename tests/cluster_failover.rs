//! Fleet state when Redis fails (SPEC 14): killed under load (`on_error: local` and
//! `deny`), restarted empty (revocations restored by the replicas, nothing revoked let
//! through, a lifted revoke stays lifted), a newcomer that finds half a restore (not ready
//! until a replica's whole set is there), and a replica started while Redis is down (not
//! ready until it has read the revocation set); usage totals written back into a Redis
//! that comes back empty.

mod cluster_support;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster_support::*;
use support::*;

const LIMITED: &str = "sta_failover_limited_key_0123456789abcdef";
const FREE: &str = "sta_failover_free_key_0123456789abcdef";
const REVOKED: &str = "sta_failover_revoked_key_0123456789abcdef";
const LIFTED: &str = "sta_failover_lifted_key_0123456789abcdef";

fn keys() -> String {
    snapshot(&[
        entry(
            "key_limited",
            LIMITED,
            Some("{ per_second: 10000, burst: 10000 }"),
        ),
        entry("key_free", FREE, None),
        entry("key_revoked", REVOKED, None),
        entry("key_lifted", LIFTED, None),
    ])
}

/// Load on `kw` until `stop`: every answer for each key, as (status, code) counts.
fn load(
    kw: &Proxy,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(&'static str, u16, String)>> {
    let url = kw.url("/v1/thing");
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            for key in [LIMITED, FREE, REVOKED] {
                let r = get(&url, &[("x-api-key", key)]).await;
                let code = if r.status == 200 {
                    String::new()
                } else {
                    r.code()
                };
                seen.push((key, r.status.as_u16(), code));
            }
        }
        seen
    })
}

async fn revoke_and_lift(kw: &Proxy) {
    assert_eq!(admin_post(kw, "key_revoked", "disable").await.status, 200);
    assert_eq!(admin_post(kw, "key_lifted", "disable").await.status, 200);
    assert_eq!(admin_post(kw, "key_lifted", "enable").await.status, 200);
}

/// Kill Redis under load, then bring it back; `check` judges every answer.
async fn killed_under_load(on_error: &str, check: fn(&str, u16, &str)) {
    let mut redis = Redis::start().await;
    let up = spawn_upstream().await;
    // A timeout a busy test machine does not reach: the outage is the only failure.
    let config = cluster_yaml_with(redis.port, on_error, "500ms");
    let a = spawn_proxy_with(up.addr, &config, Some(&keys())).await;
    let b = spawn_proxy_with(up.addr, &config, Some(&keys())).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    revoke_and_lift(&a).await;
    eventually("revoked on b", || async {
        call(&b, REVOKED).await.status == 401
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [load(&a, stop.clone()), load(&b, stop.clone())];
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    eventually("cluster down", || async {
        metric(&a, "keyward_cluster_up").await == Some(0.0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = call(&b, LIMITED).await;
    // Replicas that lost Redis stay ready and keep the set they hold.
    assert_eq!(get(&b.admin_url("/readyz"), &[]).await.status, 200);
    let redis = Redis::start_on(redis.port).await;
    eventually("cluster up again", || async {
        metric(&a, "keyward_cluster_up").await == Some(1.0)
            && metric(&b, "keyward_cluster_up").await == Some(1.0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for l in loads {
        for (key, status, code) in l.await.unwrap() {
            check(key, status, &code);
            total += 1;
        }
    }
    assert!(total > 100, "only {total} requests");
    assert_eq!(call(&a, LIMITED).await.status, 200, "shared again");
    // The limiter's own connections came back: its script runs in the new Redis.
    let before = redis.calls("time").await;
    eventually("limiter calls reach the new redis", || async {
        call(&a, LIMITED).await;
        redis.calls("time").await > before
    })
    .await;
    let errors = metric(&a, "keyward_cluster_errors_total{op=\"ratelimit\"}").await;
    println!(
        "{on_error}: {total} requests; during the outage a limited key got {}; ratelimit errors {errors:?}",
        during.status
    );
    drop(redis);
}

fn never_lets_a_revoked_key_through(key: &str, status: u16, code: &str) {
    if key == REVOKED {
        assert_eq!((status, code), (401, "disabled_api_key"));
    }
    if key == FREE {
        assert_eq!(status, 200, "an unlimited key is never affected: {code}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_with_on_error_local() {
    killed_under_load("local", |key, status, code| {
        never_lets_a_revoked_key_through(key, status, code);
        if key == LIMITED {
            assert_eq!(
                status, 200,
                "local: enforced per replica, not refused: {code}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_with_on_error_deny() {
    killed_under_load("deny", |key, status, code| {
        never_lets_a_revoked_key_through(key, status, code);
        if key == LIMITED {
            assert!(
                status == 200 || (status, code) == (503, "auth_unavailable"),
                "deny: {status} {code}"
            );
        }
    })
    .await;
}

/// A key's burst used while Redis decided is used for the limit this replica holds when
/// Redis goes away: the local limit does not start full (a key Redis went up and down
/// under got twice its limit, a fresh budget at each change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_burst_used_while_redis_decided_is_not_granted_again_when_it_goes() {
    const SLOW: &str = "sta_failover_slow_key_0123456789abcdef";
    let mut redis = Redis::start().await;
    let up = spawn_upstream().await;
    let keys = snapshot(&[entry(
        "key_slow",
        SLOW,
        Some("{ per_second: 0.01, burst: 3 }"),
    )]);
    let config = cluster_yaml_with(redis.port, "local", "500ms");
    let kw = spawn_proxy_with(up.addr, &config, Some(&keys)).await;
    wait_ready(&kw).await;
    let statuses = |n| {
        let kw = &kw;
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(call(kw, SLOW).await.status.as_u16());
            }
            out
        }
    };
    assert_eq!(statuses(4).await, [200, 200, 200, 429], "Redis decides");
    redis.kill();
    eventually("cluster down", || async {
        metric(&kw, "keyward_cluster_up").await == Some(0.0)
    })
    .await;
    assert_eq!(statuses(3).await, [429, 429, 429], "no fresh burst locally");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_restored_by_the_replicas() {
    let mut redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    revoke_and_lift(&b).await;
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [load(&a, stop.clone()), load(&b, stop.clone())];
    let port = redis.port;
    redis.kill();
    let redis = Redis::start_on(port).await;
    // A replica started at once, before anything is restored: its first read finds no
    // replica's whole set there, so it waits for the others to write theirs back.
    let c = replica(up.addr, redis.port, "local", &keys()).await;
    wait_ready(&c).await;
    assert_eq!(call(&c, REVOKED).await.code(), "disabled_api_key");
    // The lift: `a` may have read the set between the revoke and the lift and missed the
    // lift's message (it was subscribing), and written its older revoke back first. That
    // fails closed, and the newer tombstone from `b` wins within a full read.
    eventually("a lifted revoke stays lifted", || async {
        call(&c, LIFTED).await.status == 200
    })
    .await;
    // Restored from what the replicas hold: the revoke, and the lift (a newer tombstone).
    let stored = |raw: &'static str| {
        let redis = &redis;
        async move {
            let v: Option<String> = redis.cmd(&["HGET", "keyward:revocations", &sha(raw)]).await;
            v.unwrap_or_default()
        }
    };
    // Each replica writes back what it holds; the one that knew less may have come first.
    eventually("the revoke and the tombstone restored", || async {
        stored(REVOKED).await.ends_with("|1|key_revoked")
            && stored(LIFTED).await.ends_with("|0|key_lifted")
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        for (key, status, code) in l.await.unwrap() {
            never_lets_a_revoked_key_through(key, status, &code);
        }
    }
    eventually("lifted on a", || async {
        call(&a, LIFTED).await.status == 200
    })
    .await;
}

/// A newcomer never serves from half a restore: a hash that holds some revocations but no
/// replica's whole set (Redis came back empty and one revoke was written since, or a
/// restore is under way) keeps it unready until a whole set is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_waits_for_a_whole_set_not_half_a_restore() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let field = |raw: &str, id: &str| (sha(raw), format!("1|1|{id}"));
    let (lifted, lifted_entry) = field(LIFTED, "key_lifted");
    let _: i64 = redis
        .cmd(&["HSET", "keyward:revocations", &lifted, &lifted_entry])
        .await;
    let started = std::time::Instant::now();
    let c = replica(up.addr, redis.port, "local", &keys()).await;
    // Half a set is not enough to be ready. Checked while less than RESTORE_SETTLE (1.2 s)
    // has passed since the replica started (so since its first read, too), however slow the
    // machine: an answer that arrives by then was decided by then.
    let mut checked = 0;
    loop {
        let ready = get(&c.admin_url("/readyz"), &[]).await.status;
        let served = call(&c, FREE).await;
        if started.elapsed() >= Duration::from_millis(1100) {
            break;
        }
        assert_eq!(ready, 503);
        assert_eq!(served.code(), "auth_unavailable");
        checked += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(checked > 0, "the machine was too slow to check anything");
    // The rest of a replica's set arrives, whole.
    let (revoked, revoked_entry) = field(REVOKED, "key_revoked");
    let _: i64 = redis
        .cmd(&[
            "HSET",
            "keyward:revocations",
            &revoked,
            &revoked_entry,
            "whole",
            "1",
        ])
        .await;
    wait_ready(&c).await;
    eventually("the whole set in force", || async {
        call(&c, REVOKED).await.code() == "disabled_api_key"
    })
    .await;
    assert_eq!(call(&c, LIFTED).await.code(), "disabled_api_key");
    assert_eq!(call(&c, FREE).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_redis_is_down_is_not_ready_until_it_reads_the_set() {
    let port = free_port();
    let up = spawn_upstream().await;
    let kw = replica(up.addr, port, "local", &keys()).await;
    for _ in 0..5 {
        let r = get(&kw.admin_url("/readyz"), &[]).await;
        assert_eq!(r.status, 503);
        assert!(r.text().contains("revocations"), "{}", r.text());
        let r = call(&kw, FREE).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (503, "auth_unavailable".into())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A revoke on this replica holds here even though Redis cannot store it yet...
    let r = admin_post(&kw, "key_revoked", "disable").await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (503, "cluster_unavailable".into())
    );
    let redis = Redis::start_on(port).await;
    wait_ready(&kw).await;
    assert_eq!(call(&kw, FREE).await.status, 200);
    assert_eq!(call(&kw, REVOKED).await.code(), "disabled_api_key");
    // ... and reaches Redis once it is there.
    eventually("written back", || async {
        let v: Option<String> = redis
            .cmd(&["HGET", "keyward:revocations", &sha(REVOKED)])
            .await;
        v.is_some()
    })
    .await;
}

/// A Redis that stops answering (`DEBUG SLEEP`): each limited request waits at most
/// `cluster.timeout` once, then the policy applies without waiting; unlimited keys never
/// wait at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_costs_at_most_the_timeout_then_the_policy_applies() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let config = cluster_yaml_with(redis.port, "deny", "100ms");
    let kw = spawn_proxy_with(up.addr, &config, Some(&keys())).await;
    wait_ready(&kw).await;
    assert_eq!(call(&kw, LIMITED).await.status, 200);
    let sleeper = redis.sleep_in_background(2.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = std::time::Instant::now();
    let r = call(&kw, LIMITED).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (503, "auth_unavailable".into())
    );
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    for _ in 0..20 {
        let t = std::time::Instant::now();
        assert_eq!(call(&kw, FREE).await.status, 200);
        assert_eq!(call(&kw, LIMITED).await.status, 503);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "no waiting on a Redis marked down"
        );
    }
    let timeouts = metric(&kw, "keyward_cluster_errors_total{op=\"ratelimit\"}").await;
    assert_eq!(
        timeouts,
        Some(1.0),
        "one call timed out; the rest did not ask"
    );
    sleeper.await.unwrap();
    eventually("limited key shared again", || async {
        call(&kw, LIMITED).await.status == 200
    })
    .await;
}

/// A Redis that stops answering before a worker has a connection of its own to it: the
/// connect hangs (the kernel takes it, Redis answers nothing). A limited request waits its
/// timeout for that connect once; the others apply the policy at once, without waiting
/// for the same connect. Before, each limited request waited `cluster.timeout`, for
/// seconds (every connect hung 500 ms). Not taken for Redis down: a worker too busy to
/// finish its connect in time marked a healthy Redis down over and over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_hung_before_a_worker_connects_costs_one_timeout() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let config = cluster_yaml_with(redis.port, "deny", "100ms");
    let kw = spawn_proxy_with(up.addr, &config, Some(&keys())).await;
    wait_ready(&kw).await;
    let sleeper = redis.sleep_in_background(2.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = std::time::Instant::now();
    for i in 0..10 {
        let r = call(&kw, LIMITED).await;
        assert_eq!(r.status, 503, "{i}: {}", r.text());
    }
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "10 limited requests took {:?}",
        t0.elapsed()
    );
    let waited = metric(&kw, "keyward_cluster_errors_total{op=\"ratelimit\"}").await;
    assert!(waited.is_some_and(|n| n >= 1.0), "{waited:?}");
    sleeper.await.unwrap();
}

/// The fleet's usage report of `key`, asked of `kw`: (requests, last_used).
async fn fleet_usage(kw: &Proxy, key: &str) -> (u64, String) {
    let r = get(
        &kw.admin_url("/v1/keys/usage"),
        &[("authorization", &admin_auth())],
    )
    .await;
    let json = r.json();
    assert_eq!(json["scope"], "fleet", "{json}");
    let entry = json["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|e| e["key_id"] == key).cloned());
    entry.map_or((0, String::new()), |e| {
        (
            e["requests"].as_u64().unwrap_or(0),
            e["last_used"].as_str().unwrap_or_default().to_string(),
        )
    })
}

/// Usage totals survive a Redis that comes back empty: each replica writes back what it
/// counted, once (no double counting), and an idle replica does it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_survive_redis_restarted_empty() {
    let mut redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    for (kw, n) in [(&a, 2), (&b, 3)] {
        for _ in 0..n {
            assert_eq!(call(kw, FREE).await.status, 200);
        }
    }
    eventually("flushed before the restart", || async {
        let v: Option<String> = redis
            .cmd(&["HGET", "keyward:usage:count", "key_free"])
            .await;
        v.as_deref() == Some("5")
    })
    .await;
    let before = fleet_usage(&a, "key_free").await;
    assert_eq!(before.0, 5);
    let port = redis.port;
    redis.kill();
    let redis = Redis::start_on(port).await;
    // Both replicas are idle: they refill the empty Redis on their own.
    eventually("usage written back", || async {
        let v: Option<String> = redis
            .cmd(&["HGET", "keyward:usage:count", "key_free"])
            .await;
        v.as_deref() == Some("5")
    })
    .await;
    let flushes = |kw: &Proxy| {
        let kw = kw.admin_url("/metrics");
        async move {
            let text = get(&kw, &[]).await.text();
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(
                        "keyward_cluster_call_duration_seconds_count{op=\"usage_flush\"} ",
                    )?
                    .parse::<f64>()
                    .ok()
                })
                .unwrap_or(0.0)
        }
    };
    // Two more flushes on each replica after the write-back: nothing is added twice.
    let (fa, fb) = (flushes(&a).await, flushes(&b).await);
    eventually("two more flushes each", || async {
        flushes(&a).await >= fa + 2.0 && flushes(&b).await >= fb + 2.0
    })
    .await;
    let v: Option<String> = redis
        .cmd(&["HGET", "keyward:usage:count", "key_free"])
        .await;
    assert_eq!(v.as_deref(), Some("5"), "no double counting");
    for kw in [&a, &b] {
        assert_eq!(
            fleet_usage(kw, "key_free").await,
            before,
            "count and last use"
        );
    }
    // Counting goes on from there.
    assert_eq!(call(&a, FREE).await.status, 200);
    eventually("counted after the restart", || async {
        fleet_usage(&b, "key_free").await.0 == 6
    })
    .await;
}
