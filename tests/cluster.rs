//! Fleet state through a real Redis (SPEC 14): a shared rate limit, revocations that reach
//! every replica (for a file source), enable lifting a revoke, fleet usage, and no Redis
//! call for an unlimited key. Several keyward replicas in one test, one `redis-server`.

mod cluster_support;
mod support;

use std::time::{Duration, Instant};

use cluster_support::*;
use support::*;

const LIMITED: &str = "sta_cluster_limited_key_0123456789abcdef";
const FREE: &str = "sta_cluster_free_key_0123456789abcdef";
const OTHER: &str = "sta_cluster_other_key_0123456789abcdef";

/// Redis's default user may touch only keys matching `patterns` (an ACL's key patterns).
async fn only_keys(redis: &Redis, patterns: &[&str]) {
    let mut cmd = vec!["ACL", "SETUSER", "default", "resetkeys"];
    cmd.extend(patterns);
    let _: String = redis.cmd(&cmd).await;
}

/// Rights to every key back, and `kw` finds Redis up again.
async fn all_keys_again(redis: &Redis, kw: &Proxy) {
    let _: String = redis.cmd(&["ACL", "SETUSER", "default", "allkeys"]).await;
    eventually("redis up again", || async {
        metric(kw, "keyward_cluster_up").await == Some(1.0)
    })
    .await;
}

/// A snapshot of one key, `LIMITED`, with `rate_limit`.
fn limited(id: &str, rate_limit: &str) -> String {
    snapshot(&[entry(id, LIMITED, Some(rate_limit))])
}

/// A ready replica (`on_error: deny`) whose snapshot is `LIMITED` as `key_l`, limited so.
async fn replica_limited(up: &Upstream, redis: &Redis, rate_limit: &str) -> Proxy {
    ready_replica(up.addr, redis.port, "deny", &limited("key_l", rate_limit)).await
}

/// What the limiter script stores: `tat interval burst`, three whole numbers.
fn is_limiter_state(v: &str) -> bool {
    let parts: Vec<&str> = v.split(' ').collect();
    parts.len() == 3 && parts.iter().all(|p| p.parse::<u64>().is_ok())
}

fn keys() -> String {
    snapshot(&[
        entry(
            "key_limited",
            LIMITED,
            Some("{ per_second: 20, burst: 10 }"),
        ),
        entry("key_free", FREE, None),
        entry("key_other", OTHER, None),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_limit() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    // deny, and a timeout no loaded test machine reaches: every answer is Redis's.
    let config = cluster_yaml_with(redis.port, "deny", "2s");
    let mut fleet = Vec::new();
    for _ in 0..3 {
        let kw = spawn_proxy_with(up.addr, &config, Some(&keys())).await;
        wait_ready(&kw).await;
        fleet.push(kw);
    }
    // Four clients, each cycling through the replicas, for two seconds.
    let start = Instant::now();
    let run_for = Duration::from_secs(2);
    let fleet = std::sync::Arc::new(fleet);
    let mut clients = Vec::new();
    for c in 0..4 {
        let fleet = fleet.clone();
        clients.push(tokio::spawn(async move {
            let (mut allowed, mut limited, mut i) = (0u32, 0u32, c);
            while start.elapsed() < run_for {
                let r = call(&fleet[i % 3], LIMITED).await;
                match r.status.as_u16() {
                    200 => allowed += 1,
                    429 => limited += 1,
                    s => panic!("unexpected {s}: {}", r.text()),
                }
                i += 1;
            }
            (allowed, limited)
        }));
    }
    let (mut allowed, mut limited) = (0, 0);
    for c in clients {
        let (a, l) = c.await.unwrap();
        allowed += a;
        limited += l;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let expected = 10.0 + 20.0 * elapsed;
    let error = (f64::from(allowed) - expected) / expected;
    println!(
        "shared limit: {allowed} allowed, {limited} limited in {elapsed:.2}s over 3 replicas; \
         expected {expected:.1} (burst 10 + 20/s); error {:+.1}%",
        error * 100.0
    );
    assert!(limited > 0, "the load must exceed the limit");
    assert!(error.abs() <= 0.15, "{allowed} allowed vs {expected:.1}");
    let ratelimit_calls = metric(
        &fleet[0],
        "keyward_cluster_call_duration_seconds_count{op=\"ratelimit\"}",
    )
    .await
    .unwrap();
    assert!(ratelimit_calls > 0.0);
    assert_eq!(metric(&fleet[0], "keyward_cluster_up").await, Some(1.0));
}

/// A limiter state another writer left far in the future holds the key back no longer than
/// a full burst would (per_second 20, burst 10: half a second), not for years.
#[tokio::test]
async fn a_limiter_state_left_far_ahead_holds_a_key_no_longer_than_a_burst() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let config = cluster_yaml_with(redis.port, "deny", "2s");
    let kw = spawn_proxy_with(up.addr, &config, Some(&keys())).await;
    wait_ready(&kw).await;
    let _: String = redis
        .cmd(&["SET", "keyward:rl:{key_limited}", "1e30"])
        .await;
    let r = call(&kw, LIMITED).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    eventually("allowed again within a burst's time", || async {
        call(&kw, LIMITED).await.status == 200
    })
    .await;
    // A state that is not a number at all (`nan` parses as one in Lua): read as none, so
    // the shared limit holds (on_error: deny would otherwise answer 503 for good).
    let _: String = redis.cmd(&["SET", "keyward:rl:{key_limited}", "nan"]).await;
    assert_eq!(call(&kw, LIMITED).await.status, 200);
    let n: String = redis.cmd(&["GET", "keyward:rl:{key_limited}"]).await;
    assert!(is_limiter_state(&n), "{n}");
    // A value of another type: replaced, not failed on for good; and unlinked (freed off
    // Redis's main thread), since a large one deleted in place stalls every client.
    let _: i64 = redis.cmd(&["DEL", "keyward:rl:{key_limited}"]).await;
    let _: i64 = redis
        .cmd(&["HSET", "keyward:rl:{key_limited}", "a", "b"])
        .await;
    assert_eq!(call(&kw, LIMITED).await.status, 200);
    assert_eq!(redis.calls("unlink").await, 1);
}

/// Review: replicas that disagree on a key's limit (a reload that has not reached all of
/// them, or a limit lowered and put back) handed an exhausted key a fresh burst: the one
/// with the lower burst cut the shared state to its own burst. What a key spent stays spent,
/// in requests, whichever replica reads it and whatever its limit; a slower rate makes the
/// requests owed take longer, not fewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_another_limit_hand_out_no_fresh_burst() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let roomy = replica_limited(&up, &redis, "{ per_second: 0.01, burst: 6 }").await;
    let lower = replica_limited(&up, &redis, "{ per_second: 0.01, burst: 1 }").await;
    let slower = replica_limited(&up, &redis, "{ per_second: 0.001, burst: 6 }").await;
    for _ in 0..6 {
        assert_eq!(call(&roomy, LIMITED).await.status, 200);
    }
    for kw in [&roomy, &lower, &roomy, &slower, &roomy] {
        let r = call(kw, LIMITED).await;
        assert_eq!(r.status, 429, "{}", r.text());
    }
    // Six requests owed (600 s at 100 s each), read at 1,000 s each: a full burst of the
    // slower limit is spent, and the next request is 1,000 s away (as time, the 600 s owed
    // would have left room for five requests there).
    let r = call(&slower, LIMITED).await;
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((990..=1000).contains(&retry), "{retry}");
    let n: String = redis.cmd(&["GET", "keyward:rl:{key_l}"]).await;
    assert!(is_limiter_state(&n), "{n}");
}

/// Review: a state past 1e17 ms to live (a vanishing rate with a large burst, or one
/// written there) made every check of the key fail: Redis refuses `PX` written with an
/// exponent, and the key got 503 under `deny` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_owing_centuries_is_a_refusal_not_a_failure() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let _: String = redis
        .cmd(&[
            "SET",
            "keyward:rl:{key_limited}",
            "99999999999999999999999999 50000 99999999999999999",
        ])
        .await;
    for _ in 0..3 {
        let r = call(&kw, LIMITED).await;
        assert_eq!(r.status, 429, "{}", r.text());
    }
    let series = "keyward_cluster_errors_total{op=\"ratelimit\"}";
    assert_eq!(metric(&kw, series).await, Some(0.0));
}

/// Review: a rate loosened on one replica (1 request per 50 s → 2 a second) kept the key
/// out at the old rate: the refused check converted what was owed for its answer
/// (`Retry-After: 1`) but left the state to be repaid at the old rate. The converted state
/// is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loosened_rate_lets_a_key_in_at_that_rate() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let slow = replica_limited(&up, &redis, "{ per_second: 0.02, burst: 3 }").await;
    let fast = replica_limited(&up, &redis, "{ per_second: 2, burst: 3 }").await;
    for _ in 0..3 {
        assert_eq!(call(&slow, LIMITED).await.status, 200);
    }
    let r = call(&fast, LIMITED).await;
    assert_eq!(r.status, 429, "{}", r.text());
    // Three requests owed at 0.5 s each: in within about a second and a half, not 150 s.
    let start = Instant::now();
    eventually("let in at the faster rate", || async {
        call(&fast, LIMITED).await.status == 200
    })
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    let n: String = redis.cmd(&["GET", "keyward:rl:{key_l}"]).await;
    assert!(is_limiter_state(&n), "{n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlimited_key_makes_no_redis_call() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    assert_eq!(call(&kw, LIMITED).await.status, 200);
    // The limiter script calls Redis `TIME` once (commands a script runs are counted in
    // commandstats too); besides it, only the revocations' clock read does, once every
    // 10 s at most: a window it falls in is measured again.
    let mut windows = Vec::new();
    for _ in 0..3 {
        let before = redis.calls("time").await;
        allowed(&kw, FREE, 50).await;
        let free = redis.calls("time").await - before;
        assert_eq!(call(&kw, LIMITED).await.status, 200);
        let limited = redis.calls("time").await - before - free;
        windows.push((free, limited));
        if (free, limited) == (0, 1) {
            break;
        }
    }
    assert!(
        windows.contains(&(0, 1)),
        "no limiter call for a free key, one per limited request: {windows:?}"
    );
}

/// The limiter's connections are made by the threads that serve requests, one each (the
/// call never leaves the worker thread), not one per request nor one shared with the
/// background tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limiter_has_one_connection_per_worker_thread() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let config = cluster_yaml(redis.port, "deny") + "workers: 2\n";
    let kw = spawn_proxy_with(up.addr, &config, Some(&keys())).await;
    wait_ready(&kw).await;
    assert_eq!(kw.app.limiter.connections(), 0, "made on first use");
    let clients_before: String = redis.cmd(&["CLIENT", "LIST"]).await;
    // Each call is a new client connection; the kernel spreads them over the workers.
    for _ in 0..40 {
        let r = call(&kw, LIMITED).await;
        assert!(matches!(r.status.as_u16(), 200 | 429), "{}", r.text());
    }
    let n = kw.app.limiter.connections();
    assert!(
        (1..=2).contains(&n),
        "{n} limiter connections for 2 workers"
    );
    let clients_after: String = redis.cmd(&["CLIENT", "LIST"]).await;
    assert_eq!(
        clients_after.lines().count(),
        clients_before.lines().count() + n,
        "no connection per request"
    );
}

/// Redis closes connections it finds idle (its `timeout`), a restart or a proxy drops them:
/// the next call on such a connection fails at once. It is made again on a fresh
/// connection, and Redis is not marked down for it, so no rate-limited request is answered
/// by `on_error` (here `deny`: 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_redis_closes_are_replaced_without_a_refusal() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let keys = limited("key_roomy", "{ per_second: 1000, burst: 1000 }");
    let config = cluster_yaml_with(redis.port, "deny", "2s") + "workers: 2\n";
    let kw = spawn_proxy_with(up.addr, &config, Some(&keys)).await;
    wait_ready(&kw).await;
    for round in 0..3 {
        for _ in 0..10 {
            assert_eq!(call(&kw, LIMITED).await.status, 200, "round {round}");
        }
        let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "normal"]).await;
        assert!(killed >= 1, "round {round}: no connection to close");
        for _ in 0..20 {
            let r = call(&kw, LIMITED).await;
            assert_eq!(r.status, 200, "round {round}: {}", r.text());
        }
        assert_eq!(metric(&kw, "keyward_cluster_up").await, Some(1.0));
    }
}

/// A TCP relay to `port` that can be told to stop carrying anything on the connections it
/// has (no reset, no FIN: a path that silently died, a NAT entry dropped), while new
/// connections go through. Returns its port and the switch: every connection opened
/// before the switch is set stalls.
async fn stalling_relay(port: u16) -> (u16, std::sync::Arc<dyn Fn() + Send + Sync>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let (opened, stall_below) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let pipe = |mut from: tokio::net::tcp::OwnedReadHalf,
                mut to: tokio::net::tcp::OwnedWriteHalf,
                id: u64,
                stall: Arc<AtomicU64>| async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if id < stall.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let (count, stall) = (opened.clone(), stall_below.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let id = count.fetch_add(1, Ordering::SeqCst);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, id, stall.clone()));
            tokio::spawn(pipe(sr, cw, id, stall.clone()));
        }
    });
    let switch = move || stall_below.store(opened.load(Ordering::SeqCst), Ordering::SeqCst);
    (relay_port, Arc::new(switch))
}

/// Connections to Redis that stop answering (not closed: silent) are replaced once a call
/// on them times out. Before, a worker's limiter connection stuck so was kept until the
/// kernel gave up on it, minutes later: every rate-limited request waited `cluster.timeout`
/// and went to `on_error` (here `deny`: 503), while the probe kept finding Redis up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_stop_answering_are_replaced() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let (relay, stall) = stalling_relay(redis.port).await;
    let keys = limited("key_roomy", "{ per_second: 1000, burst: 1000 }");
    let config = cluster_yaml_with(relay, "deny", "200ms") + "workers: 1\n";
    let kw = spawn_proxy_with(up.addr, &config, Some(&keys)).await;
    wait_ready(&kw).await;
    allowed(&kw, LIMITED, 5).await;
    stall();
    let start = Instant::now();
    let refused = std::sync::atomic::AtomicU32::new(0);
    eventually("limits decided by Redis again", || async {
        let r = call(&kw, LIMITED).await;
        if r.status == 503 {
            refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        r.status == 200
    })
    .await;
    let refused = refused.into_inner();
    // The first call on the stuck connection times out (503, on_error: deny); a few
    // more may while the shared connection is replaced too.
    assert!(refused >= 1, "the stall was never met");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    allowed(&kw, LIMITED, 20).await;
}

/// Revoke on one replica, poll the others until they refuse the key: the time to effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_reaches_every_replica_and_enable_lifts_it() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(ready_replica(up.addr, redis.port, "local", &keys()).await);
    }
    let mut samples = Vec::new();
    for round in 0..20 {
        let here = &fleet[round % 3];
        for (action, want) in [("disable", 401), ("enable", 200)] {
            let t0 = Instant::now();
            let r = admin_post(here, "key_other", action).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json()["scope"], "fleet");
            // It names the snapshot the id was resolved in.
            assert_eq!(r.json()["snapshot"]["keys"], 3, "{}", r.text());
            for (i, kw) in fleet.iter().enumerate() {
                loop {
                    let r = call(kw, OTHER).await;
                    if r.status == want {
                        if want == 401 {
                            assert_eq!(r.code(), "disabled_api_key");
                        }
                        break;
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(2),
                        "replica {i}: {action}"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if i != round % 3 {
                    samples.push(t0.elapsed());
                }
            }
            // Other keys never notice.
            assert_eq!(call(here, FREE).await.status, 200);
        }
    }
    let p50 = percentile(&mut samples, 50.0);
    let p99 = percentile(&mut samples, 99.0);
    println!(
        "revoke/enable to effect on the other replicas: {} samples, p50 {p50:?}, p99 {p99:?}",
        samples.len()
    );
    // SPEC 14 promises 1 s; on an idle loopback p99 is a few ms (README, Fleet figures).
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    let lag = metric(&fleet[1], "keyward_revocation_lag_seconds_count").await;
    assert!(
        lag.unwrap_or(0.0) > 0.0,
        "the lag histogram counts arrivals"
    );
}

/// A file source: the revoke names id and digest, so the key rotated under the same id in
/// the file is not affected; the revoked digest stays refused while it is in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_with_a_file_source_scopes_to_the_digest() {
    const ROTATED: &str = "sta_cluster_rotated_key_0123456789abcdef";
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(
        r.status,
        200,
        "file source is no 409 with cluster: {}",
        r.text()
    );
    eventually("revoked on b", || async {
        call(&b, OTHER).await.code() == "disabled_api_key"
    })
    .await;
    // The entry is the digest's (a field of the hash), naming the id it was made through;
    // no Redis key name holds the digest or the raw key.
    let stored: Option<String> = redis
        .cmd(&["HGET", "keyward:revocations", &sha(OTHER)])
        .await;
    let stored = stored.unwrap();
    assert!(stored.ends_with("|1|key_other"), "{stored}");
    let names: Vec<String> = redis.cmd(&["KEYS", "*"]).await;
    assert!(names.iter().all(|n| n.starts_with("keyward:")), "{names:?}");
    assert!(names
        .iter()
        .all(|n| !n.contains(&sha(OTHER)) && !n.contains(OTHER)));
    // Rotate key_other to a new secret in both replicas' files.
    let rotated = snapshot(&[
        entry("key_free", FREE, None),
        entry("key_other", ROTATED, None),
    ]);
    for kw in [&a, &b] {
        std::fs::write(kw.keys_file(), &rotated).unwrap();
    }
    for kw in [&a, &b] {
        eventually("rotated key allowed", || async {
            call(kw, ROTATED).await.status == 200
        })
        .await;
        assert_eq!(call(kw, OTHER).await.code(), "invalid_api_key");
    }
    // Unknown ids are refused.
    let r = admin_post(&a, "key_nope", "disable").await;
    assert_eq!((r.status.as_u16(), r.code()), (404, "unknown_key".into()));
}

/// A revoke is scoped to the secret: the revoked secret re-issued under a new id in a later
/// snapshot is refused as disabled on every replica (SPEC 14: 401 `disabled_api_key`), and
/// `enable` of the id that now carries it lifts the revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_secret_stays_revoked_under_a_new_id_until_enabled() {
    const MARKER: &str = "sta_cluster_marker_key_0123456789abcdef";
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    assert_eq!(admin_post(&a, "key_other", "disable").await.status, 200);
    eventually("revoked on b", || async {
        call(&b, OTHER).await.code() == "disabled_api_key"
    })
    .await;
    // The next snapshot has no key_other: its secret is key_reissued's now.
    let reissued = snapshot(&[
        entry("key_free", FREE, None),
        entry("key_reissued", OTHER, None),
        entry("key_marker", MARKER, None),
    ]);
    for kw in [&a, &b] {
        std::fs::write(kw.keys_file(), &reissued).unwrap();
    }
    for kw in [&a, &b] {
        eventually("new snapshot in force", || async {
            call(kw, MARKER).await.status == 200
        })
        .await;
        let r = call(kw, OTHER).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (401, "disabled_api_key".into()),
            "the revoked secret under a new id"
        );
        assert_eq!(call(kw, FREE).await.status, 200);
    }
    // The old id is gone from the snapshot: enable goes through the id that carries it.
    let r = admin_post(&b, "key_other", "enable").await;
    assert_eq!((r.status.as_u16(), r.code()), (404, "unknown_key".into()));
    let r = admin_post(&b, "key_reissued", "enable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    for kw in [&a, &b] {
        eventually("lifted everywhere", || async {
            call(kw, OTHER).await.status == 200
        })
        .await;
    }
    let stored: Option<String> = redis
        .cmd(&["HGET", "keyward:revocations", &sha(OTHER)])
        .await;
    assert!(stored.unwrap().ends_with("|0|key_reissued"));
}

#[tokio::test]
async fn without_a_cluster_enable_is_refused_and_file_disable_stays_409() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy_with(up.addr, "", Some(&keys())).await;
    let r = admin_post(&kw, "key_other", "enable").await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "cluster_required".into())
    );
    let r = admin_post(&kw, "key_other", "disable").await;
    assert_eq!((r.status.as_u16(), r.code()), (409, "file_source".into()));
    let usage = get(
        &kw.admin_url("/v1/keys/usage"),
        &[("authorization", &admin_auth())],
    )
    .await;
    assert_eq!(usage.json()["scope"], "replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_reported_for_the_whole_fleet() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(ready_replica(up.addr, redis.port, "local", &keys()).await);
    }
    for (i, kw) in fleet.iter().enumerate() {
        for _ in 0..=i {
            assert_eq!(call(kw, FREE).await.status, 200);
        }
    }
    // Before any flush the asking replica adds its own unflushed counts; after, Redis
    // holds all of them. Either way every replica reports 1 + 2 + 3.
    for kw in &fleet {
        let r = get(
            &kw.admin_url("/v1/keys/usage"),
            &[("authorization", &admin_auth())],
        )
        .await;
        assert_eq!(r.json()["scope"], "fleet");
    }
    eventually("fleet total on every replica", || async {
        let mut all = true;
        for kw in fleet.iter() {
            let r = get(
                &kw.admin_url("/v1/keys/usage"),
                &[("authorization", &admin_auth())],
            )
            .await;
            let keys = r.json()["keys"].clone();
            let free = keys
                .as_array()
                .and_then(|k| k.iter().find(|e| e["key_id"] == "key_free").cloned());
            all &= free.is_some_and(|f| f["requests"] == 6);
        }
        all
    })
    .await;
    let count = redis.hget("keyward:usage:count", "key_free").await;
    assert_eq!(count.as_deref(), Some("6"));
}

/// A stopping replica sends what it counted since its last flush before it ends: every
/// scale-down or rolling update lost up to a second of each stopping replica's usage.
#[tokio::test]
async fn a_stopping_replica_flushes_its_last_counts() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    allowed(&kw, FREE, 5).await;
    kw.shutdown().await;
    let n = redis.hget("keyward:usage:count", "key_free").await;
    assert_eq!(n.as_deref(), Some("5"));
}

/// A dry run's `would_deny_recently_used` is the fleet's (SPEC 16 with SPEC 14): a key
/// used only on another replica is listed when a push would remove it.
#[tokio::test]
async fn a_dry_run_lists_keys_used_on_other_replicas() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    assert_eq!(call(&a, FREE).await.status, 200);
    let asked = || async {
        let without_free = snapshot(&[
            entry(
                "key_limited",
                LIMITED,
                Some("{ per_second: 20, burst: 10 }"),
            ),
            entry("key_other", OTHER, None),
        ]);
        let r = send(
            "PUT",
            &b.admin_url("/v1/snapshot?dry_run=true"),
            &[("authorization", &admin_auth())],
            without_free.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    // Replica b saw no request of key_free; once a has flushed, b's dry run names it.
    eventually("b's dry run lists a key used on a", || async {
        let review = asked().await;
        assert_eq!(
            review["removed"],
            serde_json::json!(["key_free"]),
            "{review}"
        );
        review["would_deny_recently_used"]
            .as_array()
            .is_some_and(|used| used.iter().any(|u| u["key_id"] == "key_free"))
    })
    .await;
}

/// `keyward check` validates `cluster` (and `KEYWARD_REDIS_URL`), naming the field and
/// never printing the URL, which may hold a password.
#[test]
fn keyward_check_validates_the_cluster_config() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.yaml");
    std::fs::write(&keys_file, keys()).unwrap();
    let up: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let check = |cluster: &str, env: Option<&str>| {
        let cfg = dir.path().join("keyward.yaml");
        std::fs::write(&cfg, config_yaml(up, &keys_file, cluster)).unwrap();
        let mut c = support::child::command(&["check", "--config"]);
        c.arg(&cfg);
        if let Some(url) = env {
            c.env("KEYWARD_REDIS_URL", url);
        }
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = check(&cluster_yaml(6379, "deny"), None);
    assert!(ok, "{text}");
    let (ok, text) = check("cluster: { redis: \"http://:hunter2@r:1\" }\n", None);
    assert!(!ok && text.contains("cluster.redis"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let (ok, text) = check("cluster: { redis: \"redis://r\", timeout: 0ms }\n", None);
    assert!(!ok && text.contains("cluster.timeout"), "{text}");
    let (ok, text) = check("", Some("memcached://:hunter2@r"));
    assert!(!ok && text.contains("cluster.redis"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let (ok, text) = check("", Some("rediss://:pw@r:6380/0"));
    assert!(ok, "{text}");
}

/// Usage reaches Redis in one call per flush (about one a second), however many requests and
/// keys were counted: never a call per request or per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_flushed_in_one_call_a_second() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let scripts = || async { redis.calls("evalsha").await + redis.calls("eval").await };
    // Full reads counted from before the first script count to after the last: one that
    // straddles either is subtracted whole, never counted as flushes.
    let reads = redis.calls("hlen").await;
    let (before, start) = (scripts().await, Instant::now());
    for _ in 0..50 {
        for key in [FREE, OTHER] {
            assert_eq!(call(&kw, key).await.status, 200);
        }
    }
    eventually("both keys flushed", || async {
        let counts: std::collections::HashMap<String, String> =
            redis.cmd(&["HGETALL", "keyward:usage:count"]).await;
        counts.get("key_free").map(String::as_str) == Some("50")
            && counts.get("key_other").map(String::as_str) == Some("50")
    })
    .await;
    // Unlimited keys and no revokes: every script call here is a usage flush, or one of
    // the revocation set's full reads, three scripts each (its size and version: the one
    // HLEN; a page; the version again).
    let scripts = scripts().await - before;
    let reads = redis.calls("hlen").await - reads;
    let calls = scripts.saturating_sub(3 * reads);
    let seconds = start.elapsed().as_secs_f64();
    println!("100 requests over 2 keys: {calls} flush calls in {seconds:.1}s");
    assert!(
        (calls as f64) <= seconds.ceil() + 2.0,
        "{calls} calls in {seconds:.1}s"
    );
    // One call carries every key: each flush's HINCRBYs run inside it.
    assert!(redis.calls("hincrby").await >= 2);
}

/// Reviews 30 and 33: a key removed from the snapshot and put back before the next flush
/// restarted its local count at zero, which was then measured against its old flushed
/// total: what it counted after that was never flushed, and its last use stayed frozen in
/// the fleet. And what it had counted since the last flush was lost with the removal.
#[tokio::test]
async fn a_key_removed_and_put_back_between_flushes_keeps_counting() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    allowed(&kw, OTHER, 5).await;
    flushed(&redis, "key_other", 5).await;
    // Counted, not flushed yet, when the key goes.
    allowed(&kw, OTHER, 3).await;
    let without = snapshot(&[
        entry(
            "key_limited",
            LIMITED,
            Some("{ per_second: 20, burst: 10 }"),
        ),
        entry("key_free", FREE, None),
    ]);
    let auth = admin_auth();
    // Both reloads asked for at once: well within one flush interval.
    for body in [without, keys()] {
        std::fs::write(kw.keys_file(), body).unwrap();
        let url = kw.admin_url("/v1/snapshot/reload");
        let r = send("POST", &url, &[("authorization", auth.as_str())], b"").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    allowed(&kw, OTHER, 2).await;
    flushed(&redis, "key_other", 10).await;
}

/// `series` of `kw`'s usage flushes: calls made (`count`) or failed (`errors`).
async fn flush_metric(kw: &Proxy, errors: bool) -> f64 {
    let series = if errors {
        "keyward_cluster_errors_total{op=\"usage_flush\"}"
    } else {
        "keyward_cluster_call_duration_seconds_count{op=\"usage_flush\"}"
    };
    metric(kw, series).await.unwrap_or(0.0)
}

/// The fleet's request count for `id` in `kw`'s `GET /v1/keys/usage`.
async fn fleet_requests(kw: &Proxy, id: &str) -> Option<u64> {
    let r = get(
        &kw.admin_url("/v1/keys/usage"),
        &[("authorization", &admin_auth())],
    )
    .await;
    let body = r.json();
    assert_eq!(body["scope"], "fleet", "{body}");
    body["keys"]
        .as_array()?
        .iter()
        .find(|k| k["key_id"] == id)?["requests"]
        .as_u64()
}

/// A flush that times out on keyward's side may still land in Redis; it is then applied
/// once. Redis is held (`DEBUG SLEEP 4`) while counted requests wait to flush: the flush
/// sent in the first second waits past the 2 s background deadline, times out, and runs
/// when Redis wakes. Before, the next flush sent the same counts again (with newer ones)
/// and the fleet counted them twice; a flush slower than the deadline did so every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_that_times_out_but_lands_is_counted_once() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    allowed(&kw, FREE, 5).await;
    flushed(&redis, "key_free", 5).await;
    // Just after a flush, so the next one (in a second) carries what is counted now and
    // finds Redis asleep.
    let calls = flush_metric(&kw, false).await;
    eventually("a flush", || async {
        flush_metric(&kw, false).await > calls
    })
    .await;
    // Unlimited: counted without a Redis call.
    allowed(&kw, FREE, 7).await;
    let sleeper = redis.sleep_in_background(4.0);
    sleeper.await.unwrap();
    assert!(
        flush_metric(&kw, true).await >= 1.0,
        "no flush timed out while Redis slept"
    );
    // Two flush calls after Redis woke: the timed-out batch was sent again, and another.
    let calls = flush_metric(&kw, false).await;
    eventually("two more flushes", || async {
        flush_metric(&kw, false).await >= calls + 2.0
    })
    .await;
    let count = redis.hget("keyward:usage:count", "key_free").await;
    assert_eq!(
        count.as_deref(),
        Some("12"),
        "the timed-out flush counted once"
    );
    assert_eq!(fleet_requests(&kw, "key_free").await, Some(12));
    let seq: Vec<String> = redis.cmd(&["KEYS", "keyward:usage:seq:*"]).await;
    assert_eq!(seq.len(), 1, "{seq:?}");
    let ttl: i64 = redis.cmd(&["PTTL", &seq[0]]).await;
    assert!(ttl > 0 && ttl <= 3_600_000, "{ttl}");
}

/// Review 36: a replica stopped while Redis stalled lost what it counted since its last
/// flush, though Redis answered again within the 2 s a stopping replica waits for it. Its
/// shutdown waited for the flush the stall held, until that flush's own deadline; the one
/// last flush after it found the connection the timeout had closed, and gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopping_while_redis_stalls_still_sends_its_last_counts() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    allowed(&kw, FREE, 5).await;
    flushed(&redis, "key_free", 5).await;
    let sleeper = redis.sleep_in_background(2.8);
    allowed(&kw, FREE, 7).await;
    // A flush starts within a second and the stall holds it (the scenario is timed: Redis
    // gives no sign of what it holds while it sleeps). The replica stops while it is held,
    // 1.7 s before Redis wakes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    kw.shutdown().await;
    sleeper.await.unwrap();
    let count = redis.hget("keyward:usage:count", "key_free").await;
    assert_eq!(
        count.as_deref(),
        Some("12"),
        "the stopping replica's last counts"
    );
}

/// Review 36: the sequence mark is read only as this replica writes it. A number-like
/// value another writer left (`1e15`, or a number ahead of any this replica sent) was
/// believed, and every later batch was taken as applied: counted nowhere, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_mark_another_writer_left_holds_no_counts_back() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let mut sent = 0;
    for mark in ["1e15", "900000000000", " 7 ", "0x7fffffff"] {
        allowed(&kw, FREE, 3).await;
        sent += 3;
        let want = sent.to_string();
        eventually("counts flushed", || async {
            redis.hget("keyward:usage:count", "key_free").await == Some(want.clone())
        })
        .await;
        let seq: Vec<String> = redis.cmd(&["KEYS", "keyward:usage:seq:*"]).await;
        assert_eq!(seq.len(), 1, "{seq:?}");
        let _: () = redis.cmd(&["SET", &seq[0], mark]).await;
    }
    allowed(&kw, FREE, 3).await;
    flushed(&redis, "key_free", 15).await;
}

/// Review 36: a count hash whose epoch field another writer removed (or made too long to
/// read) was taken for an empty Redis, and every replica added its whole totals on top of
/// the counts still there: the fleet's totals doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_removed_from_a_counted_hash_counts_nothing_twice() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    allowed(&kw, FREE, 5).await;
    flushed(&redis, "key_free", 5).await;
    let long = "x".repeat(65);
    for (i, tamper) in [["HDEL", "#epoch", ""], ["HSET", "#epoch", long.as_str()]]
        .iter()
        .enumerate()
    {
        let old = redis.hget("keyward:usage:count", "#epoch").await;
        let args: Vec<&str> = [tamper[0], "keyward:usage:count", tamper[1], tamper[2]]
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect();
        let _: i64 = redis.cmd(&args).await;
        assert_eq!(call(&kw, FREE).await.status, 200);
        let want = (6 + i).to_string();
        eventually("the totals under a new epoch, once", || async {
            let epoch = redis.hget("keyward:usage:count", "#epoch").await;
            let count = redis.hget("keyward:usage:count", "key_free").await;
            epoch.is_some()
                && epoch != old
                && epoch.map(|e| e.len()) != Some(65)
                && count == Some(want.clone())
        })
        .await;
    }
    let calls = flush_metric(&kw, false).await;
    eventually("another flush", || async {
        flush_metric(&kw, false).await >= calls + 2.0
    })
    .await;
    let count = redis.hget("keyward:usage:count", "key_free").await;
    assert_eq!(count.as_deref(), Some("7"));
}

/// The arguments of a usage flush call (a script call naming the epoch field), from one
/// `SLOWLOG` entry (which keeps 32 of them).
fn flush_call(entry: &redis::Value) -> Option<Vec<String>> {
    let redis::Value::Array(fields) = entry else {
        return None;
    };
    let redis::Value::Array(args) = fields.get(3)? else {
        return None;
    };
    let args: Vec<String> = args
        .iter()
        .map(|v| match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        })
        .collect();
    let flush = args[0].eq_ignore_ascii_case("evalsha") && args.iter().any(|a| a == "#epoch");
    flush.then_some(args)
}

/// Review 38: a copy of a flush delivered late (bytes a closed connection still had in
/// flight, retransmitted after the replica sent the next flush) was applied again: the
/// mark, ahead of its number, was taken for another writer's. The call that carried a
/// count, sent again as Redis first received it after two more flushes, adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_copy_of_a_flush_is_not_applied_again() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let _: String = redis
        .cmd(&["CONFIG", "SET", "slowlog-log-slower-than", "0"])
        .await;
    let _: String = redis
        .cmd(&["CONFIG", "SET", "slowlog-max-len", "1000"])
        .await;
    allowed(&kw, FREE, 4).await;
    flushed(&redis, "key_free", 4).await;
    let log: Vec<redis::Value> = redis.cmd(&["SLOWLOG", "GET", "1000"]).await;
    // The newest call that carried the key: the one applied.
    let applied = log
        .iter()
        .filter_map(flush_call)
        .find(|args| args.iter().any(|a| a == "key_free"))
        .expect("the flush that carried key_free");
    let calls = flush_metric(&kw, false).await;
    eventually("two more flushes", || async {
        flush_metric(&kw, false).await >= calls + 2.0
    })
    .await;
    let args: Vec<&str> = applied.iter().map(String::as_str).collect();
    let _: String = redis.cmd(&args).await;
    let count = redis.hget("keyward:usage:count", "key_free").await;
    assert_eq!(
        count.as_deref(),
        Some("4"),
        "the late copy was applied again"
    );
}

/// `n` requests with `key` on `kw`, each allowed.
async fn allowed(kw: &Proxy, key: &str, n: usize) {
    for _ in 0..n {
        assert_eq!(call(kw, key).await.status, 200);
    }
}

/// Wait until Redis holds `n` as the fleet's request count of key `id`.
async fn flushed(redis: &Redis, id: &str, n: u64) {
    let want = n.to_string();
    eventually(&format!("{n} requests of {id} flushed"), || async {
        redis.hget("keyward:usage:count", id).await.as_deref() == Some(want.as_str())
    })
    .await;
}

/// Keys a flush call carries, from one `SLOWLOG` entry (`None`: not a usage flush). An
/// entry keeps 32 arguments, the last one `... (N more arguments)`; the keys' triples
/// `(id, delta, last_ms)` end the call, from the first id on.
fn flush_keys(entry: &redis::Value) -> Option<usize> {
    let args = flush_call(entry)?;
    let more = args
        .last()?
        .strip_prefix("... (")
        .and_then(|r| r.strip_suffix(" more arguments)"))
        .and_then(|n| n.parse::<usize>().ok());
    let argc = more.map_or(args.len(), |n| args.len() - 1 + n);
    let Some(first) = args.iter().position(|a| a.starts_with("key_")) else {
        return Some(0);
    };
    // A usage report's read (ids one after another) is no flush.
    args.get(first + 1)?.parse::<u64>().ok()?;
    Some((argc - first) / 3)
}

/// More keys to flush than one call carries (2,500 used, then all of them again as the
/// whole totals after Redis is emptied) go as several calls of at most `FLUSH_CHUNK`
/// keys: one script over every key held Redis for seconds (about 4 µs a key), longer
/// than the flush deadline and every replica's rate-limit calls. Counts stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_flush_goes_in_chunks_and_counts_exactly() {
    use keyward::cluster::usage::FLUSH_CHUNK;
    const MANY: usize = 2500;
    let raws: Vec<String> = (0..MANY)
        .map(|i| format!("sta_cluster_many_{i:05}_0123456789abcdef"))
        .collect();
    let entries: Vec<String> = raws
        .iter()
        .enumerate()
        .map(|(i, raw)| entry(&format!("key_m{i:05}"), raw, None))
        .collect();
    let redis = Redis::start().await;
    let _: String = redis
        .cmd(&["CONFIG", "SET", "slowlog-log-slower-than", "0"])
        .await;
    let _: String = redis
        .cmd(&["CONFIG", "SET", "slowlog-max-len", "100000"])
        .await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &snapshot(&entries)).await;
    let url = kw.url("/v1/thing");
    let mut tasks = tokio::task::JoinSet::new();
    for part in raws.chunks(MANY / 4) {
        let (url, part) = (url.clone(), part.to_vec());
        tasks.spawn(async move {
            for raw in part {
                assert_eq!(get(&url, &[("x-api-key", &raw)]).await.status, 200);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let exact = || async {
        let counts: std::collections::HashMap<String, String> =
            redis.cmd(&["HGETALL", "keyward:usage:count"]).await;
        counts.len() == MANY + 1
            && counts
                .iter()
                .all(|(id, n)| id == "#epoch" || n.as_str() == "1")
    };
    eventually("every key flushed once", exact).await;
    let _: String = redis.cmd(&["FLUSHALL"]).await;
    eventually("the whole totals written back", exact).await;
    let calls = flush_metric(&kw, false).await;
    eventually("two more flushes", || async {
        flush_metric(&kw, false).await >= calls + 2.0
    })
    .await;
    assert!(exact().await, "counted once");
    assert_eq!(fleet_requests(&kw, "key_m00042").await, Some(1));
    let log: Vec<redis::Value> = redis.cmd(&["SLOWLOG", "GET", "-1"]).await;
    let sizes: Vec<usize> = log.iter().filter_map(flush_keys).collect();
    println!("keys per flush call, newest first: {sizes:?}");
    let largest = sizes.iter().copied().max().unwrap_or(0);
    assert!(
        largest <= FLUSH_CHUNK,
        "a flush call carried {largest} keys"
    );
    let full = sizes.iter().filter(|&&n| n == FLUSH_CHUNK).count();
    assert!(full >= 2, "the totals went in chunks: {sizes:?}");
}

/// Redis' usage hashes are anyone's to write (several deployments may share one Redis): a
/// count that would overflow saturates, a last-used time past year 9999 is clamped, and
/// neither marks Redis down nor stops the other keys' counts or the replica.
#[tokio::test]
async fn usage_values_left_in_redis_neither_crash_nor_mark_redis_down() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let _: i64 = redis
        .cmd(&[
            "HSET",
            "keyward:usage:count",
            "key_free",
            "9223372036854775807",
        ])
        .await;
    for key in [FREE, OTHER] {
        assert_eq!(call(&kw, key).await.status, 200);
    }
    eventually("the other key's count lands", || async {
        let n = redis.hget("keyward:usage:count", "key_other").await;
        n.as_deref() == Some("1")
    })
    .await;
    let n = redis.hget("keyward:usage:count", "key_free").await;
    assert_eq!(n.as_deref(), Some("9223372036854775807"), "saturated");
    // A count that is no number does not take the key out of the report (it did, and its
    // last use with it).
    let _: i64 = redis
        .cmd(&["HSET", "keyward:usage:count", "key_other", "-5"])
        .await;
    let r = get(
        &kw.admin_url("/v1/keys/usage"),
        &[("authorization", &admin_auth())],
    )
    .await;
    let listed = r.json()["keys"]
        .as_array()
        .is_some_and(|k| k.iter().any(|e| e["key_id"] == "key_other"));
    assert!(listed, "{}", r.text());
    assert_eq!(metric(&kw, "keyward_cluster_up").await, Some(1.0));
    // A last-used time past year 9999, left while the key is idle: the report clamps it.
    let _: i64 = redis
        .cmd(&["HSET", "keyward:usage:last", "key_free", "253402300800000"])
        .await;
    let r = get(
        &kw.admin_url("/v1/keys/usage"),
        &[("authorization", &admin_auth())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let free = r.json()["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|e| e["key_id"] == "key_free").cloned())
        .unwrap();
    assert_eq!(free["last_used"], "9999-12-31T23:59:59.999Z");
    // ... and the next flush replaces it with the real time, as it does `nan`.
    assert_eq!(call(&kw, FREE).await.status, 200);
    eventually(
        "a real last-used time replaces one past year 9999",
        || async {
            redis
                .hget("keyward:usage:last", "key_free")
                .await
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|ms| ms < 253_402_300_799_999)
        },
    )
    .await;
    // A field that is not a number, under an id that is not ours: that field is skipped,
    // the fleet's report stands.
    let _: i64 = redis
        .cmd(&["HSET", "keyward:usage:last", "zzz_other_tenant", "abc"])
        .await;
    let r = get(
        &kw.admin_url("/v1/keys/usage"),
        &[("authorization", &admin_auth())],
    )
    .await;
    assert_eq!(r.json()["scope"], "fleet", "{}", r.text());
    // A count that is not a number restarts from this replica's next flush.
    let _: i64 = redis
        .cmd(&["HSET", "keyward:usage:count", "key_other", "lots"])
        .await;
    assert_eq!(call(&kw, OTHER).await.status, 200);
    eventually("a count that was not a number restarts", || async {
        let n = redis.hget("keyward:usage:count", "key_other").await;
        n.as_deref() == Some("1")
    })
    .await;
    assert_eq!(metric(&kw, "keyward_cluster_up").await, Some(1.0));
}

/// An operator's revoke is stored and enforced even when Redis holds a newer lift (another
/// replica's clock runs ahead): it is stamped after it. A lift published with a stamp far
/// in the future (forged, or a broken clock) is not believed, so it cannot un-revoke a key
/// for good; a later lift through the API still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_holds_over_a_lift_stamped_ahead_and_a_forged_one() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    // A lift made 10 s ahead, by a replica whose clock runs fast, not yet seen by `a`.
    let ahead = format!("{}|0|key_other", now_us + 10_000_000);
    let _: i64 = redis
        .cmd(&["HSET", "keyward:revocations", &sha(OTHER), &ahead])
        .await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (name, kw) in [("a", &a), ("b", &b)] {
        eventually(&format!("{name} refuses the revoked key"), || async {
            call(kw, OTHER).await.status == 401
        })
        .await;
    }
    // Past a full read (500 ms) and more: still refused everywhere.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for kw in [&a, &b] {
        assert_eq!(call(kw, OTHER).await.code(), "disabled_api_key");
    }

    // Forged lifts on the channel every replica listens to: from far ahead, and one stamped
    // a moment from now (newer than the revoke, inside the clock-skew bound). A message is
    // a hint: the hash still holds the revoke, so none is believed, now or after full reads.
    let soon = (now_us + 30_000_000).to_string();
    for stamp in ["18446744073709551615", "9000000000000000000", soon.as_str()] {
        let message = format!("{}\n{stamp}|0|key_other", sha(OTHER));
        let _: i64 = redis
            .cmd(&["PUBLISH", "keyward:revocations:events", &message])
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for kw in [&a, &b] {
        assert_eq!(
            call(kw, OTHER).await.status,
            401,
            "a forged lift was believed"
        );
    }
    // The operator's own lift, and revoke again, still work.
    for (action, want) in [("enable", 200), ("disable", 401)] {
        let r = admin_post(&b, "key_other", action).await;
        assert_eq!(r.status, 200, "{}", r.text());
        for kw in [&a, &b] {
            eventually(action, || async { call(kw, OTHER).await.status == want }).await;
        }
    }
}

/// A revoke stamped far in the future (forged, or a broken clock) is held, failing closed,
/// but it does not win the ordering: the operator's lift takes on every replica and on a
/// newcomer, and the stamp is never written back mangled (Lua's numbers cannot hold it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_stamped_far_ahead_fails_closed_and_a_lift_still_takes_everywhere() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let ten_years = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
        + 10 * 365 * 24 * 3600 * 1_000_000;
    // In the hash (read by every full read) and published (a replica subscribed takes it
    // at once; one not subscribed yet misses the message, hence the hash too).
    let forged = format!("{}|1|key_other", u64::MAX);
    let _: i64 = redis
        .cmd(&["HSET", "keyward:revocations", &sha(OTHER), &forged])
        .await;
    let message = format!("{}\n{forged}", sha(OTHER));
    let _: i64 = redis
        .cmd(&["PUBLISH", "keyward:revocations:events", &message])
        .await;
    let stored = format!("{ten_years}|1|key_free");
    let _: i64 = redis
        .cmd(&["HSET", "keyward:revocations", &sha(FREE), &stored])
        .await;
    // Moved as a writer moves it: a replica that has read the set since the message came
    // (which may have set the version) reads it whole again now, not at its 30 s reread.
    if let Some(v) = redis.hget("keyward:revocations", "version").await {
        let (epoch, count) = v.split_once('.').unwrap_or((&v, "0"));
        let next = format!("{epoch}.{}", count.parse::<u64>().unwrap_or(0) + 1000);
        let _: i64 = redis
            .cmd(&["HSET", "keyward:revocations", "version", &next])
            .await;
    }
    for kw in [&a, &b] {
        eventually("both forged revokes held", || async {
            call(kw, OTHER).await.status == 401 && call(kw, FREE).await.status == 401
        })
        .await;
    }
    for id in ["key_other", "key_free"] {
        let r = admin_post(&a, id, "enable").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for kw in [&a, &b] {
        eventually("the lifts take on every replica", || async {
            call(kw, OTHER).await.status == 200 && call(kw, FREE).await.status == 200
        })
        .await;
    }
    // Past a few full reads: still lifted, and nothing mangled in Redis.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = ready_replica(up.addr, redis.port, "local", &keys()).await;
    for kw in [&a, &b, &c] {
        assert_eq!(call(kw, OTHER).await.status, 200);
        assert_eq!(call(kw, FREE).await.status, 200);
    }
    let all: std::collections::HashMap<String, String> =
        redis.cmd(&["HGETALL", "keyward:revocations"]).await;
    assert!(all.values().all(|v| !v.starts_with('-')), "{all:?}");
}

/// The revocation set is read whole in the background without marking Redis down:
/// `cluster.timeout` bounds what a request waits for, not the set's full reads. Here it is
/// 1 ms, far less than reading 20k fields takes. A read that timed out marked Redis down,
/// which sent every replica's rate limits local and kept a new replica unready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocation_set_is_read_without_the_request_timeout() {
    let redis = Redis::start().await;
    // 20k fields that are not digests (a replica skips them), and `whole`.
    let mut args: Vec<String> = ["HSET", "keyward:revocations", "whole", "1"]
        .map(String::from)
        .to_vec();
    for i in 0..20_000 {
        args.push(format!("not-a-digest-{i:05}"));
        args.push("1|1|x".to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let _: i64 = redis.cmd(&refs).await;
    let up = spawn_upstream().await;
    let config = cluster_yaml_with(redis.port, "local", "1ms");
    let kw = spawn_proxy_with(up.addr, &config, Some(&keys())).await;
    wait_ready(&kw).await;
    // Full reads run every 500 ms: none of the next few may fail.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failed = metric(&kw, "keyward_cluster_errors_total{op=\"read_revocations\"}").await;
    assert_eq!(failed.unwrap_or(0.0), 0.0, "a full read failed");
    let count = "keyward_cluster_call_duration_seconds_count{op=\"read_revocations\"}";
    assert!(
        metric(&kw, count).await.unwrap_or(0.0) >= 2.0,
        "full reads ran"
    );
    assert_eq!(call(&kw, FREE).await.status, 200);
}

/// Each replica reads one field (the version) per interval, and the whole set only when it
/// moved: a fleet whose set has grown large does not read it whole twice a second per
/// replica. A change that moves the version is read even without its message (as if the
/// pub/sub message were lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_set_is_read_whole_only_when_its_version_moves() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("a refuses the revoked key", || async {
        call(&a, OTHER).await.status == 401
    })
    .await;
    let version = || async {
        let v = redis.hget("keyward:revocations", "version").await;
        v.expect("the write moved the version")
    };
    let moved = version().await;
    // The read after the write (the version moved) has run once this is seen. A full
    // read scans the hash (HSCAN); a poll reads the version and the field count.
    scans_settled(&redis, "the write's version read").await;
    let before = redis.calls("hscan").await;
    let polls = redis.calls("hget").await;
    let counts = redis.calls("hlen").await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // A hash this small is read whole every 2 s anyway (an edit that keeps its field count
    // is seen so), but not at every poll.
    assert!(
        redis.calls("hscan").await <= before + 1,
        "the set was read whole at every poll with nothing changed"
    );
    assert!(
        redis.calls("hget").await >= polls + 3,
        "the version was read"
    );
    assert!(
        redis.calls("hlen").await >= counts + 3,
        "the field count was read"
    );

    // A revoke written with the version moved but no message published.
    let (epoch, count) = moved.split_once('.').unwrap();
    let next = format!("{epoch}.{}", count.parse::<u64>().unwrap() + 5);
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let revoke = format!("{now_us}|1|key_free");
    let _: i64 = redis
        .cmd(&[
            "HSET",
            "keyward:revocations",
            &sha(FREE),
            &revoke,
            "version",
            &next,
        ])
        .await;
    eventually("a change without its message is read", || async {
        call(&a, FREE).await.status == 401
    })
    .await;
    assert_eq!(call(&a, FREE).await.code(), "disabled_api_key");
}

/// Wait until the hash has gone 600 ms without a full read (an HSCAN): the reads a
/// write or a start called for have run.
async fn scans_settled(redis: &Redis, what: &str) {
    eventually(what, || async {
        let before = redis.calls("hscan").await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        redis.calls("hscan").await == before
    })
    .await;
}

/// Wait for the revocation hash to hold `field` again, failing past `within`.
async fn written_back_within(redis: &Redis, field: &str, within: Duration) {
    let lost = std::time::Instant::now();
    while redis.hget("keyward:revocations", field).await.is_none() {
        assert!(
            lost.elapsed() < within,
            "not written back within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A revoke's field lost from Redis with the version left as it was (an `HDEL` by another
/// writer, a failover to a Redis replica that lagged): a replica holding it writes it back
/// at its next poll (the field count moved), not at its next full read 30 s on: a replica
/// started in that time let the revoked key in (for ~24 s in a review).
#[tokio::test]
async fn a_revoke_lost_from_redis_is_written_back_at_the_next_poll() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("a refuses the revoked key", || async {
        call(&a, OTHER).await.status == 401
    })
    .await;
    // The full read after a's own write (its version moved) has run once the hash stops
    // being scanned.
    scans_settled(&redis, "the write's version read").await;
    let version = redis.hget("keyward:revocations", "version").await;
    let _: i64 = redis
        .cmd(&["HDEL", "keyward:revocations", &sha(OTHER)])
        .await;
    written_back_within(&redis, &sha(OTHER), Duration::from_secs(5)).await;
    assert_ne!(
        redis.hget("keyward:revocations", "version").await,
        version,
        "the write-back moved the version"
    );
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    assert_eq!(call(&b, OTHER).await.code(), "disabled_api_key");
    assert_eq!(call(&a, OTHER).await.code(), "disabled_api_key");

    // Lost with a junk field added in its place, the count unchanged: seen at the next
    // full read, which a hash this small gets every 2 s (it waited 30 s). Once b's own
    // reads after its start have run:
    scans_settled(&redis, "b's reads after its start").await;
    let _: i64 = redis
        .cmd(&[
            "EVAL",
            "redis.call('HDEL', KEYS[1], ARGV[1]); redis.call('HSET', KEYS[1], 'junk-field', 'x'); return 1",
            "1",
            "keyward:revocations",
            &sha(OTHER),
        ])
        .await;
    written_back_within(&redis, &sha(OTHER), Duration::from_secs(6)).await;
}

/// redis-rs retries a connect until its deadline whatever failed, so a wrong password was
/// said as "refused, unreachable or slow": an operator could not tell a bad credential
/// from the network. The reason is said now, and the password never.
#[tokio::test]
async fn a_wrong_redis_password_is_said_as_such_and_never_shown() {
    let redis = Redis::start().await;
    let _: String = redis
        .cmd(&["CONFIG", "SET", "requirepass", "right-secret-1"])
        .await;
    let up = spawn_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.yaml");
    std::fs::write(&keys_file, keys()).unwrap();
    let config = config::ConfigBuilder::new(up.addr, &keys_file)
        .extra(&format!(
            "cluster: {{ redis: \"redis://:wrong-secret-2@127.0.0.1:{}/0\", timeout: 50ms, on_error: local }}\n",
            redis.port
        ))
        .yaml();
    let kw = support::child::Keyward::spawn(dir, &config, &[]).await;
    eventually("the failed connect is said", || async {
        kw.logs()
            .iter()
            .any(|l| l.contains("cannot connect to redis"))
    })
    .await;
    let (_, stderr, _) = kw.terminate().await;
    let logs = stderr.join("\n");
    assert!(logs.contains("AuthenticationFailed"), "{logs}");
    assert!(!logs.contains("wrong-secret-2"), "{logs}");
}

/// `n` fields `field(i)`, each `value`, in `hash`, in pipelined chunks of 5000 (as
/// `redis-cli --pipe` would write them).
async fn fill(redis: &Redis, hash: &str, n: u64, field: impl Fn(u64) -> String, value: &str) {
    let mut c = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut i = 0;
    while i < n {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(hash);
        for j in i..(i + 5000).min(n) {
            cmd.arg(field(j)).arg(value);
        }
        let _: i64 = cmd.query_async(&mut c).await.unwrap();
        i += 5000;
    }
}

/// `n` fields `junk{i}` of 100 bytes each in `hash`.
async fn junk(redis: &Redis, hash: &str, n: u64) {
    fill(redis, hash, n, |j| format!("junk{j}"), &"x".repeat(100)).await;
}

/// Redis may be shared and the revocation hash is anyone's to write: past its bound
/// (`MAX_FIELDS`) it is not read at all (one HLEN decides, no scan, nothing huge parsed
/// here), the set held stays in force, the refusal is counted once per read due, not
/// retried at once, and Redis is never marked down for it. Before, every read due took
/// the whole hash (HGETALL of ~170 ms for 1M fields, 420 MB here), which stalled Redis
/// past `cluster.timeout`, marked it down and, once it was back, read it whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_hash_past_its_bound_is_not_read_and_the_held_set_stays() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let r = admin_post(&kw, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(call(&kw, OTHER).await.status, 401);

    let max = keyward::cluster::revocations::MAX_FIELDS;
    junk(&redis, "keyward:revocations", max + 1).await;
    // The version moved: the next interval's read is due, and refused.
    let _: i64 = redis
        .cmd(&["HSET", "keyward:revocations", "version", "999"])
        .await;
    let oversize = "keyward_cluster_errors_total{op=\"oversize\"}";
    eventually("the read is refused", || async {
        metric(&kw, oversize).await == Some(1.0)
    })
    .await;
    assert_eq!(redis.calls("hgetall").await, 0, "read whole");
    let (scans, sizes) = (redis.calls("hscan").await, redis.calls("hlen").await);
    // Four more intervals (each reads the version: one HGET), with requests all along.
    let polls = redis.calls("hget").await;
    eventually("four more version reads", || async {
        assert_eq!(call(&kw, LIMITED).await.status, 200, "redis marked down");
        assert_eq!(call(&kw, OTHER).await.code(), "disabled_api_key");
        assert_eq!(call(&kw, FREE).await.status, 200);
        redis.calls("hget").await >= polls + 4
    })
    .await;
    assert_eq!(redis.calls("hscan").await, scans, "scanned past the bound");
    assert_eq!(redis.calls("hlen").await, sizes, "refused read retried");
    assert_eq!(metric(&kw, oversize).await, Some(1.0));
    assert_eq!(metric(&kw, "keyward_cluster_up").await, Some(1.0));
    for op in ["ping", "ratelimit", "read_revocations"] {
        let series = format!("keyward_cluster_errors_total{{op=\"{op}\"}}");
        assert_eq!(metric(&kw, &series).await, Some(0.0), "{op}");
    }

    // Back within the bound: read (in pages) again, and the set still holds the revoke.
    let _: i64 = redis.cmd(&["DEL", "keyward:revocations"]).await;
    let r = admin_post(&kw, "key_free", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("read whole again", || async {
        redis.calls("hscan").await > scans
    })
    .await;
    assert_eq!(call(&kw, OTHER).await.code(), "disabled_api_key");
    assert_eq!(call(&kw, FREE).await.code(), "disabled_api_key");
}

/// A replica takes only its snapshot's keys' entries, so a revoke of a key its snapshot
/// lacks is not held; a new snapshot with that key reads the set whole at once, and the
/// key is refused there within the read interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_a_later_snapshot_adds_is_refused_if_the_fleet_revoked_it() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let without = snapshot(&[entry("key_free", FREE, None)]);
    let b = ready_replica(up.addr, redis.port, "deny", &without).await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(call(&b, OTHER).await.code(), "invalid_api_key");
    std::fs::write(b.keys_file(), keys()).unwrap();
    eventually("b refuses the key its new snapshot adds", || async {
        call(&b, OTHER).await.code() == "disabled_api_key"
    })
    .await;
    // Never let in on the way: each answer was a refusal.
}

/// A value the write script takes for an entry but a replica cannot read (or a lift at the
/// same stamp as the revoke held) is not "lacking": it called for a write-back that stored
/// nothing but moved the version, then a full read, in a loop, on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_entry_does_not_loop_write_backs() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let hash = "keyward:revocations";
    let held = redis.hget(hash, &sha(OTHER)).await.expect("stored");
    let stamp = held.split('|').next().unwrap().to_string();
    let _: i64 = redis
        .cmd(&["HSET", hash, &sha(OTHER), &format!("{stamp}|2|key_other")])
        .await;
    let _: i64 = redis.cmd(&["HSET", hash, "version", "1.1"]).await;
    // A full read happens (the version moved); then the version stays put.
    let reads = redis.calls("hscan").await;
    eventually("a full read", || async {
        redis.calls("hscan").await > reads
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let version = redis.hget(hash, "version").await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        redis.hget(hash, "version").await,
        version,
        "written back in a loop"
    );
    assert_eq!(call(&a, OTHER).await.code(), "disabled_api_key");
}

/// A replica holds a revoke of a key its snapshot lacks (another replica's has it), and
/// writes it back when Redis comes back empty: the key's own replica, restarted, refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_held_for_another_replicas_key_is_restored() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let without = snapshot(&[entry("key_free", FREE, None)]);
    let b = ready_replica(up.addr, redis.port, "deny", &without).await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // b holds it (from the event); a stops; Redis comes back empty.
    eventually("b holds the revoke", || async {
        metric(&b, "keyward_revocation_lag_seconds_count")
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    a.shutdown().await;
    let _: String = redis.cmd(&["FLUSHALL"]).await;
    eventually("b wrote it back", || async {
        redis
            .hget("keyward:revocations", &sha(OTHER))
            .await
            .is_some()
    })
    .await;
    let a2 = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    assert_eq!(call(&a2, OTHER).await.code(), "disabled_api_key");
    drop(b);
}

/// `n` well-formed revokes of secrets no snapshot holds (`seed` tells sets apart) in
/// `hash`: junk a replica may take and hold.
async fn junk_revokes(redis: &Redis, hash: &str, n: u64, seed: u64) {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let value = format!("{now_us}|1|junk");
    fill(redis, hash, n, |j| format!("{seed:032x}{j:032x}"), &value).await;
}

/// A replica writes back what it holds of keys outside its snapshot (junk among them) only
/// below half the bound, and its snapshot's keys' entries always. Before, a replica holding
/// a hash's worth of junk wrote it all back over a hash refilled with as much again (200k
/// fields): every newcomer then stayed unready for good, even after the hash was deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_back_never_puts_the_hash_past_what_newcomers_read() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let hash = "keyward:revocations";
    let max = keyward::cluster::revocations::MAX_FIELDS;
    let fill = max - 10;
    junk_revokes(&redis, hash, fill, 1).await;
    let scans = redis.calls("hscan").await;
    let _: i64 = redis.cmd(&["HSET", hash, "version", "1.1"]).await;
    eventually("a read the junk whole", || async {
        redis.calls("hscan").await >= scans + fill / 1000
    })
    .await;
    // As much junk again, swapped in whole (RENAME): a holds entries the hash now lacks.
    junk_revokes(&redis, "junk:next", fill, 2).await;
    let _: i64 = redis.cmd(&["HSET", "junk:next", "version", "2.1"]).await;
    let _: String = redis.cmd(&["RENAME", "junk:next", hash]).await;
    eventually("a wrote back what it could", || async {
        redis.hget(hash, &sha(OTHER)).await.is_some()
    })
    .await;
    let len: u64 = redis.cmd(&["HLEN", hash]).await;
    assert!(len <= max, "{len} fields written");
    let b = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    assert_eq!(call(&b, OTHER).await.code(), "disabled_api_key");
    assert_eq!(call(&b, FREE).await.status, 200);
    // Redis back empty: the revoke of a snapshot key is written back, and of what else the
    // replicas hold (junk here) no more than half the bound.
    let _: i64 = redis.cmd(&["DEL", hash]).await;
    eventually("the revoke written back", || async {
        redis.hget(hash, &sha(OTHER)).await.is_some()
    })
    .await;
    let len: u64 = redis.cmd(&["HLEN", hash]).await;
    assert!(len <= max / 2 + 4, "{len} fields written back");
    let c = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    assert_eq!(call(&c, OTHER).await.code(), "disabled_api_key");
}

/// The revocation key set to another type (by hand, or another program sharing the
/// prefix) is not keyward's: it reads as an empty hash, so a replica started then still
/// gets ready, and the next write replaces it. Before, every read and write failed on it:
/// new replicas stayed unready for good, and revokes stayed local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_key_of_another_type_is_replaced_not_fatal() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let _: String = redis.cmd(&["SET", "keyward:revocations", "junk"]).await;
    let a = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["scope"], "fleet", "{}", r.text());
    assert_eq!(call(&a, OTHER).await.code(), "disabled_api_key");
    let kind: String = redis.cmd(&["TYPE", "keyward:revocations"]).await;
    assert_eq!(kind, "hash");
    let b = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    assert_eq!(call(&b, OTHER).await.code(), "disabled_api_key");
    assert_eq!(call(&b, FREE).await.status, 200);
}

/// A fleet usage report reads the snapshot's keys' fields, not the hashes whole: a million
/// fields another writer left cost it nothing, and a huge value is not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_report_reads_only_the_snapshots_keys() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    assert_eq!(call(&kw, FREE).await.status, 200);
    flushed(&redis, "key_free", 1).await;
    junk(&redis, "keyward:usage:count", 50_000).await;
    let huge = "7".repeat(1 << 20);
    let _: i64 = redis
        .cmd(&["HSET", "keyward:usage:count", "key_other", &huge])
        .await;
    let r = get(
        &kw.admin_url("/v1/keys/usage"),
        &[("authorization", &admin_auth())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["scope"], "fleet", "{}", r.text());
    let keys = body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{}", r.text());
    assert_eq!(keys[0]["key_id"], "key_free");
    assert_eq!(keys[0]["requests"], 1);
    assert_eq!(redis.calls("hgetall").await, 0, "read whole");
    assert!(r.body.len() < 4096);
}

/// Single fields and messages are read within a bound (Redis is anyone's to write): a
/// version, a stored entry or a published message of megabytes is not sent here, nor
/// parsed; each is counted (`op="oversize"`), Redis is never marked down for it, and a
/// revoke still reaches the other replica at once. Before, every replica read a 100 MiB
/// version whole twice a second (hundreds of MB each, revokes 5 s late), and a published
/// lift made each one read its 100 MiB entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_and_messages_in_redis_are_not_read() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let b = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("b refuses the revoked key", || async {
        call(&b, OTHER).await.status == 401
    })
    .await;
    let oversize = "keyward_cluster_errors_total{op=\"oversize\"}";
    let count = |kw| async move { metric(kw, oversize).await.unwrap_or(0.0) };
    let huge = "1".repeat(4 << 20);
    let events = "keyward:revocations:events";

    // A message past the bound: dropped unparsed.
    let _: i64 = redis.cmd(&["PUBLISH", events, &huge]).await;
    eventually("the message is refused", || async {
        count(&b).await >= 1.0
    })
    .await;

    // A lift whose stored entry is huge: the read back is refused, the revoke holds.
    let _: i64 = redis
        .cmd(&["HSET", "keyward:revocations", &sha(OTHER), &huge])
        .await;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let lift = format!("{}\n{now_us}|0|key_other", sha(OTHER));
    let _: i64 = redis.cmd(&["PUBLISH", events, &lift]).await;
    eventually("the lift's entry is refused", || async {
        count(&b).await >= 2.0
    })
    .await;
    assert_eq!(call(&b, OTHER).await.code(), "disabled_api_key");

    // A huge version: not read, counted; the next write-back replaces it.
    let before = count(&a).await + count(&b).await;
    let _: i64 = redis
        .cmd(&["HSET", "keyward:revocations", "version", &huge])
        .await;
    // By whichever replica reads it first: the other may find it written back already.
    eventually("the version is refused", || async {
        count(&a).await + count(&b).await > before
    })
    .await;
    eventually("written back over the junk", || async {
        redis
            .hget("keyward:revocations", "version")
            .await
            .is_some_and(|v| v.len() < 64)
    })
    .await;
    let t0 = Instant::now();
    let r = admin_post(&a, "key_free", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("b refuses the new revoke", || async {
        call(&b, FREE).await.status == 401
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(call(&b, OTHER).await.code(), "disabled_api_key");
    for kw in [&a, &b] {
        assert_eq!(call(kw, LIMITED).await.status, 200, "redis marked down");
        assert_eq!(metric(kw, "keyward_cluster_up").await, Some(1.0));
        let series = "keyward_cluster_errors_total{op=\"read_revocations\"}";
        assert_eq!(metric(kw, series).await, Some(0.0));
    }
}

/// A limiter state of megabytes (another writer's) is not copied into the script on each
/// check (STRLEN first): it counts as none, and the check's own state replaces it.
#[tokio::test]
async fn a_huge_limiter_state_is_not_read_and_is_replaced() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "deny", &keys()).await;
    let huge = "1".repeat(4 << 20);
    let _: String = redis.cmd(&["SET", "keyward:rl:{key_limited}", &huge]).await;
    let gets = redis.calls("get").await;
    assert_eq!(call(&kw, LIMITED).await.status, 200);
    assert_eq!(redis.calls("get").await, gets, "the state was read");
    let n: String = redis.cmd(&["GET", "keyward:rl:{key_limited}"]).await;
    assert!(is_limiter_state(&n), "{n}");
}

/// The blast-radius guard (SPEC 16) counts the keys a client can use: a key the fleet has
/// revoked lets no one in, so a file keeping only the revoked keys removes every usable key
/// and is refused (it was judged as removing half, and installed, locking everyone out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_does_not_count_keys_the_fleet_revoked_as_usable() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let secret = |i: usize| format!("sta_cluster_guard_key_{i:02}_0123456789abcdef");
    let entries: Vec<String> = (0..20)
        .map(|i| entry(&format!("key_{i:02}"), &secret(i), None))
        .collect();
    let kw = ready_replica(up.addr, redis.port, "local", &snapshot(&entries)).await;
    for i in 0..10 {
        let r = admin_post(&kw, &format!("key_{i:02}"), "disable").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    std::fs::write(kw.keys_file(), snapshot(&entries[..10])).unwrap();
    let guarded = r#"keyward_snapshot_reloads_total{result="guarded",source="file"}"#;
    eventually("the file is refused by the guard", || async {
        metric(&kw, guarded).await == Some(1.0)
    })
    .await;
    assert_eq!(call(&kw, &secret(15)).await.status, 200);
    assert_eq!(call(&kw, &secret(3)).await.code(), "disabled_api_key");
}

/// A Redis user without rights on the rate-limit keys (an ACL's key patterns that leave
/// out `rl:*`), or refused a command the limit's script runs (`-get`: a write-only user):
/// every rate-limit call is refused. Redis is marked down and stays so (its probe is the
/// rate-limit script itself, under those keys), so the fleet limit's loss shows
/// (`keyward_cluster_up` 0) and `on_error` applies without a Redis call a request.
/// Before, a plain `SET` probe passed at once (and, after that, a script of one `SET`
/// passed for the `-get` user): Redis was marked up again after each refused call, each
/// request logged a down and an up, and the limit was per replica (three replicas let 117
/// requests through for a fleet limit of 40) with `keyward_cluster_up` at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_refused_the_rate_limit_keys_leaves_redis_down() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let refused = "keyward_cluster_errors_total{op=\"ratelimit\"}";
    let (refuse_keys, refuse_get): (&[&str], &[&str]) = (
        &[
            "resetkeys",
            "~keyward:revocations*",
            "~keyward:usage*",
            "~keyward:probe",
        ],
        &["-get"],
    );
    for (refusal, rights_back) in [(refuse_keys, "allkeys"), (refuse_get, "+get")] {
        let mut cmd = vec!["ACL", "SETUSER", "default"];
        cmd.extend(refusal);
        let _: String = redis.cmd(&cmd).await;
        let before = metric(&kw, refused).await.unwrap_or(0.0);
        for _ in 0..20 {
            call(&kw, LIMITED).await;
        }
        assert_eq!(
            metric(&kw, "keyward_cluster_up").await,
            Some(0.0),
            "{refusal:?}"
        );
        let calls = metric(&kw, refused).await.unwrap_or(0.0) - before;
        assert!(
            calls <= 2.0,
            "{refusal:?}: {calls} refused rate-limit calls for 20 requests"
        );
        // A write the user may make (a revoke) says nothing of the rate-limit keys.
        let action = if rights_back == "allkeys" {
            "disable"
        } else {
            "enable"
        };
        let r = admin_post(&kw, "key_other", action).await;
        assert_eq!(r.status, 200, "{refusal:?}: {}", r.text());
        assert_eq!(
            metric(&kw, "keyward_cluster_up").await,
            Some(0.0),
            "{refusal:?}"
        );
        // Rights back: the probe passes, and the limit is the fleet's again.
        let _: String = redis.cmd(&["ACL", "SETUSER", "default", rights_back]).await;
        eventually("redis up again", || async {
            metric(&kw, "keyward_cluster_up").await == Some(1.0)
        })
        .await;
    }
}

/// With `on_error: deny`, a request refused for Redis (503 `auth_unavailable`) was served
/// nothing and uses none of its key's budget: through an outage longer than a burst every
/// answer is 503 (before, the replica's own cell, charged for each, ran dry and turned them
/// into 429s), and once Redis is back the key gets its whole burst at once (before, this
/// replica alone refused, with 429, what the fleet allowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_for_an_outage_use_none_of_the_budget() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let keys = limited("key_slow", "{ per_second: 0.2, burst: 3 }");
    let kw = ready_replica(up.addr, redis.port, "deny", &keys).await;
    only_keys(&redis, &["~keyward:revocations*"]).await;
    for i in 0..8 {
        let r = call(&kw, LIMITED).await;
        assert_eq!(r.status, 503, "{i}: {}", r.text());
        assert_eq!(r.code(), "auth_unavailable", "{i}");
    }
    all_keys_again(&redis, &kw).await;
    for i in 0..3 {
        let r = call(&kw, LIMITED).await;
        assert_eq!(r.status, 200, "{i}: {}", r.text());
    }
    assert_eq!(call(&kw, LIMITED).await.status, 429);
}

/// A Redis that takes the probe (`SET`) but refuses the read's script (an ACL without
/// scripting): the replica keeps the set it holds and tries again backing off, not at each
/// sign that Redis answers (that was a read, a failure and a log line in a tight loop:
/// thousands a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_read_is_retried_backing_off() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let _: String = redis
        .cmd(&["ACL", "SETUSER", "default", "-eval", "-evalsha"])
        .await;
    let failed = || metric(&kw, "keyward_cluster_errors_total{op=\"read_revocations\"}");
    eventually("reads fail", || async {
        failed().await.unwrap_or(0.0) >= 1.0
    })
    .await;
    let before = failed().await.unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = failed().await.unwrap_or(0.0) - before;
    assert!(during <= 12.0, "{during} failed reads in 2 s");
    // The set held stands meanwhile, and the replica stays ready.
    assert_eq!(call(&kw, FREE).await.status, 200);
    let _: String = redis
        .cmd(&["ACL", "SETUSER", "default", "+eval", "+evalsha"])
        .await;
    let count = "keyward_cluster_call_duration_seconds_count{op=\"read_revocations\"}";
    let reads = metric(&kw, count).await.unwrap_or(0.0);
    eventually("reads succeed again", || async {
        metric(&kw, count).await.unwrap_or(0.0) > reads
    })
    .await;
}

/// Changes made on two replicas while Redis was out of their reach are ordered by when they
/// were made, not by when each replica reached Redis again: a lift made before a revoke,
/// stored after it, undid it on every replica (each change was stamped on arrival).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_redis_was_unreachable_keep_the_order_they_were_made_in() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let (port_a, gate_a) = controlled_relay(redis.port).await;
    let (port_b, gate_b) = controlled_relay(redis.port).await;
    let config = |port| cluster_yaml_with(port, "local", "200ms");
    let a = spawn_proxy_with(up.addr, &config(port_a), Some(&keys())).await;
    let b = spawn_proxy_with(up.addr, &config(port_b), Some(&keys())).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    assert_eq!(admin_post(&a, "key_other", "disable").await.status, 200);
    eventually("revoked on b", || async {
        call(&b, OTHER).await.status == 401
    })
    .await;
    let field = sha(OTHER);
    let stored = redis.hget("keyward:revocations", &field).await.unwrap();
    gate_a.send(Path::Cut).unwrap();
    gate_b.send(Path::Cut).unwrap();
    // The lift first, then the revoke: both held where they were made.
    let lift = admin_post(&b, "key_other", "enable").await;
    assert_ne!(lift.status, 200, "{}", lift.text());
    assert_eq!(call(&b, OTHER).await.status, 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let revoke = admin_post(&a, "key_other", "disable").await;
    assert_ne!(revoke.status, 200, "{}", revoke.text());
    // The revoke reaches Redis first, the older lift after it.
    gate_a.send(Path::Open).unwrap();
    eventually("the revoke stored", || async {
        redis.hget("keyward:revocations", &field).await.as_ref() != Some(&stored)
    })
    .await;
    gate_b.send(Path::Open).unwrap();
    eventually("the lift superseded on b", || async {
        call(&b, OTHER).await.status == 401
    })
    .await;
    holds(&redis, &[&a, &b], 401, 20).await;
}

/// A Redis user without rights on the revocations' channel (Redis 7's default for a new
/// ACL user): the publish is refused, but the revoke is stored all the same, and taken by
/// the other replicas from their next read. Before, the stored entry's script failed after
/// writing it, the change was retried, re-stamped, for ever, and a later change on another
/// replica was undone every half second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_redis_refuses_to_publish_is_stored_and_read_by_the_fleet() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let a = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    let _: String = redis
        .cmd(&["ACL", "SETUSER", "default", "resetchannels"])
        .await;
    let r = admin_post(&a, "key_other", "disable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("revoked on b", || async {
        call(&b, OTHER).await.status == 401
    })
    .await;
    let r = admin_post(&b, "key_other", "enable").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually("lifted on a", || async {
        call(&a, OTHER).await.status == 200
    })
    .await;
    holds(&redis, &[&a, &b], 200, 20).await;
    let refused = metric(&a, "keyward_cluster_errors_total{op=\"subscribe\"}").await;
    assert!(refused.unwrap_or(0.0) >= 1.0, "{refused:?}");
}

/// A Redis user refused the usage hash (an ACL listing the rate-limit and revocation keys
/// alone): the usage flush fails, counted, but says nothing of the rate limits, which Redis
/// still serves. Before, each refused flush marked Redis down: every second the fleet's
/// limits went local (1.86 times a key's limit) and, with `on_error: deny`, keys got 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_usage_flush_does_not_mark_redis_down() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let keys = limited("key_roomy", "{ per_second: 100000, burst: 100000 }");
    let kw = spawn_proxy_with(up.addr, &cluster_yaml(redis.port, "deny"), Some(&keys)).await;
    wait_ready(&kw).await;
    only_keys(&redis, &["~keyward:rl:*", "~keyward:revocations*"]).await;
    let start = Instant::now();
    let mut refused = 0;
    while start.elapsed() < Duration::from_millis(3500) {
        if call(&kw, LIMITED).await.status != 200 {
            refused += 1;
        }
    }
    let flushes = metric(&kw, "keyward_cluster_errors_total{op=\"usage_flush\"}").await;
    assert!(
        flushes.unwrap_or(0.0) >= 1.0,
        "no refused flush: {flushes:?}"
    );
    assert_eq!(refused, 0, "requests refused while Redis served the limits");
    assert_eq!(metric(&kw, "keyward_cluster_up").await, Some(1.0));
}

/// A Redis that stops taking writes (a replica now, after a failover) is marked down by the
/// probe within a second or two, with no rate-limited request to find it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_taking_writes_is_marked_down_by_the_probe() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let kw = ready_replica(up.addr, redis.port, "local", &keys()).await;
    assert_eq!(metric(&kw, "keyward_cluster_up").await, Some(1.0));
    let nowhere = free_port().to_string();
    let _: String = redis.cmd(&["REPLICAOF", "127.0.0.1", &nowhere]).await;
    eventually("marked down", || async {
        metric(&kw, "keyward_cluster_up").await == Some(0.0)
    })
    .await;
    let _: String = redis.cmd(&["REPLICAOF", "NO", "ONE"]).await;
    eventually("up again", || async {
        metric(&kw, "keyward_cluster_up").await == Some(1.0)
    })
    .await;
}

/// What a [`controlled_relay`] does with what replicas send toward Redis.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Open,
    /// Held and delivered once open again (a path that stalls without dropping anything:
    /// the kernel keeps retransmitting), closed connections' bytes included.
    Hold,
    /// Every connection closed at its next byte, new ones at once: Redis unreachable from
    /// this replica alone.
    Cut,
}

/// A TCP relay to `port` whose path is switched by the sender returned.
async fn controlled_relay(port: u16) -> (u16, tokio::sync::watch::Sender<Path>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let (switch, path) = tokio::sync::watch::channel(Path::Open);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            if *path.borrow() == Path::Cut {
                continue;
            }
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let mut path = path.clone();
            let mut down_path = path.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut held = Vec::new();
                loop {
                    tokio::select! {
                        read = cr.read(&mut buf) => {
                            let n = read.unwrap_or(0);
                            if n == 0 {
                                while *path.borrow() == Path::Hold {
                                    if path.changed().await.is_err() {
                                        return;
                                    }
                                }
                                if *path.borrow() == Path::Open {
                                    let _ = sw.write_all(&held).await;
                                }
                                return;
                            }
                            held.extend_from_slice(&buf[..n]);
                        }
                        changed = path.changed() => if changed.is_err() { return },
                    }
                    match *path.borrow() {
                        Path::Cut => return,
                        Path::Hold => continue,
                        Path::Open => {}
                    }
                    if sw.write_all(&held).await.is_err() {
                        return;
                    }
                    held.clear();
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    tokio::select! {
                        read = sr.read(&mut buf) => match read {
                            Ok(n @ 1..) => if cw.write_all(&buf[..n]).await.is_err() { return },
                            _ => return,
                        },
                        changed = down_path.changed() => {
                            if changed.is_err() || *down_path.borrow() == Path::Cut {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (relay_port, switch)
}

/// An operator's change whose bytes reach Redis only after its caller gave up (503), and
/// after a later change made on another replica, does not undo that later change: stamped
/// on arrival, a lift held on the way undid a revoke made after it, on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_reaches_redis_after_its_caller_gave_up_does_not_undo_a_later_one() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let (a, hold) = behind_relay(&redis, up.addr).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    assert_eq!(admin_post(&a, "key_other", "disable").await.status, 200);
    eventually("revoked on b", || async {
        call(&b, OTHER).await.status == 401
    })
    .await;
    hold.send(Path::Hold).unwrap();
    let lift = admin_post(&a, "key_other", "enable").await;
    assert_ne!(lift.status, 200, "{}", lift.text());
    let revoke = admin_post(&b, "key_other", "disable").await;
    assert_eq!(revoke.status, 200, "{}", revoke.text());
    hold.send(Path::Open).unwrap();
    eventually("a takes the later revoke", || async {
        call(&a, OTHER).await.status == 401
    })
    .await;
    holds(&redis, &[&a, &b], 401, 30).await;
}

/// For `rounds` × 50 ms, every replica answers `OTHER` with `status`, and Redis's entry
/// for it says the same (revoked for 401, lifted for 200).
async fn holds(redis: &Redis, fleet: &[&Proxy], status: u16, rounds: u32) {
    let field = sha(OTHER);
    let state = if status == 401 { "|1|" } else { "|0|" };
    for _ in 0..rounds {
        for kw in fleet {
            assert_eq!(call(kw, OTHER).await.status, status);
        }
        let entry = redis.hget("keyward:revocations", &field).await.unwrap();
        assert!(entry.contains(state), "{entry}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A write held on the way (1.8 s) and answered at once must not teach a replica Redis's
/// clock: read from that call's middle, its reckoning ran a second ahead, and a lift held
/// past its caller's timeout (503) still looked on time and undid a later revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_call_does_not_skew_the_clock_a_late_write_is_judged_by() {
    let redis = Redis::start().await;
    let up = spawn_upstream().await;
    let (a, path) = behind_relay(&redis, up.addr).await;
    let b = ready_replica(up.addr, redis.port, "local", &keys()).await;
    assert_eq!(admin_post(&a, "key_other", "disable").await.status, 200);
    // A write whose request is held 1.8 s, its answer not.
    path.send(Path::Hold).unwrap();
    let learning = admin_post_spawned(&a, "key_free", "disable");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    path.send(Path::Open).unwrap();
    assert_eq!(learning.await.unwrap(), 200);
    // The lift is held past its caller's timeout; a revoke made on b meanwhile.
    path.send(Path::Hold).unwrap();
    let made = Instant::now();
    let lift = admin_post_spawned(&a, "key_other", "enable");
    tokio::time::sleep(Duration::from_millis(2150).saturating_sub(made.elapsed())).await;
    assert_eq!(admin_post(&b, "key_other", "disable").await.status, 200);
    tokio::time::sleep(Duration::from_millis(2400).saturating_sub(made.elapsed())).await;
    path.send(Path::Open).unwrap();
    assert_ne!(lift.await.unwrap(), 200);
    eventually("a takes the later revoke", || async {
        call(&a, OTHER).await.status == 401
    })
    .await;
    holds(&redis, &[&a, &b], 401, 30).await;
}

/// A replica that reaches Redis through a [`controlled_relay`] (`cluster.timeout` 50 ms),
/// once ready, and the relay's switch.
async fn behind_relay(
    redis: &Redis,
    up: std::net::SocketAddr,
) -> (Proxy, tokio::sync::watch::Sender<Path>) {
    let (port, path) = controlled_relay(redis.port).await;
    let config = cluster_yaml_with(port, "local", "50ms");
    let kw = spawn_proxy_with(up, &config, Some(&keys())).await;
    wait_ready(&kw).await;
    (kw, path)
}

/// [`admin_post`] on a task of its own: its status when it ends.
fn admin_post_spawned(
    kw: &Proxy,
    id: &str,
    action: &str,
) -> tokio::task::JoinHandle<http::StatusCode> {
    let url = kw.admin_url(&format!("/v1/keys/{id}/{action}"));
    tokio::spawn(async move {
        let auth = admin_auth();
        send("POST", &url, &[("authorization", auth.as_str())], b"")
            .await
            .status
    })
}

/// A lift asked for before Redis's clock was ever read could not be ordered against the
/// fleet's revokes: it is refused and not applied (a held lift sent then was never judged
/// late and undid a later revoke everywhere); a revoke is applied here all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lift_before_redis_was_ever_read_is_not_applied() {
    let up = spawn_upstream().await;
    let kw = replica(up.addr, free_port(), "local", &keys()).await;
    let r = admin_post(&kw, "key_other", "enable").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("not applied"), "{}", r.text());
    let r = admin_post(&kw, "key_other", "disable").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("applied on this replica"), "{}", r.text());
}
