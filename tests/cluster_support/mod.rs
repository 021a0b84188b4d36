//! Fleet test harness: a real `redis-server` on a free loopback port (no persistence),
//! killed when dropped, and keyward replicas sharing it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// A `redis-server` child process on `127.0.0.1:port`.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Redis {
    /// Start on a free port and wait until it answers.
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// Start on `port` (empty: no RDB, no AOF) and wait until it answers PING.
    pub async fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // DEBUG SLEEP makes a slow Redis.
            .args(["--enable-debug-command", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt install redis-server)");
        let r = Self {
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.ping().await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// `DEBUG SLEEP secs` on a connection of its own: Redis answers no one meanwhile. The
    /// task ends when Redis wakes.
    pub fn sleep_in_background(&self, secs: f64) -> tokio::task::JoinHandle<()> {
        let client = self.client();
        tokio::spawn(async move {
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let _: () = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(secs)
                .query_async(&mut c)
                .await
                .unwrap();
        })
    }

    async fn ping(&self) -> redis::RedisResult<String> {
        let mut c = self.client().get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async(&mut c).await
    }

    /// Run one command.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.unwrap()
    }

    /// `HGET hash field`.
    pub async fn hget(&self, hash: &str, field: &str) -> Option<String> {
        self.cmd(&["HGET", hash, field]).await
    }

    /// `calls` of one command in `INFO commandstats` (0 if never called).
    pub async fn calls(&self, command: &str) -> u64 {
        let info: String = self.cmd(&["INFO", "commandstats"]).await;
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL and wait: the server is gone, its data with it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn sha(raw: &str) -> String {
    hex::encode(keyward::keys::digest(raw.as_bytes()))
}

/// One snapshot entry; `rate_limit` like `{ per_second: 1, burst: 3 }`.
pub fn entry(id: &str, raw: &str, rate_limit: Option<&str>) -> String {
    let limit = rate_limit.map_or(String::new(), |l| format!(", rate_limit: {l}"));
    format!(
        "  - {{ id: {id}, sha256: {}, type: service_account, subject_id: s_{id}, account_id: acc_1, scopes: [read, write], status: active{limit} }}\n",
        sha(raw)
    )
}

pub fn snapshot(entries: &[String]) -> String {
    format!("version: 1\nkeys:\n{}", entries.concat())
}

/// The `cluster` section for `port`, with a timeout a busy test machine does not reach
/// (the tests kill Redis to make it fail; a slow call is `cluster::limiter`'s unit of
/// policy, not theirs).
pub fn cluster_yaml(port: u16, on_error: &str) -> String {
    cluster_yaml_with(port, on_error, "1s")
}

pub fn cluster_yaml_with(port: u16, on_error: &str, timeout: &str) -> String {
    format!("cluster: {{ redis: \"redis://127.0.0.1:{port}/0\", timeout: {timeout}, on_error: {on_error} }}\n")
}

/// A replica sharing Redis on `port`, not yet necessarily ready.
pub async fn replica(up: SocketAddr, port: u16, on_error: &str, keys: &str) -> Proxy {
    spawn_proxy_with(up, &cluster_yaml(port, on_error), Some(keys)).await
}

/// A replica, once `/readyz` says it has read the fleet's revocations.
pub async fn ready_replica(up: SocketAddr, port: u16, on_error: &str, keys: &str) -> Proxy {
    let kw = replica(up, port, on_error, keys).await;
    wait_ready(&kw).await;
    kw
}

pub async fn wait_ready(kw: &Proxy) {
    eventually("replica ready", || async {
        get(&kw.admin_url("/readyz"), &[]).await.status == 200
    })
    .await;
}

pub async fn call(kw: &Proxy, key: &str) -> Got {
    get(&kw.url("/v1/thing"), &[("x-api-key", key)]).await
}

/// `POST /v1/keys/{id}/{action}` on the admin listener.
pub async fn admin_post(kw: &Proxy, id: &str, action: &str) -> Got {
    let auth = admin_auth();
    send(
        "POST",
        &kw.admin_url(&format!("/v1/keys/{id}/{action}")),
        &[("authorization", auth.as_str())],
        b"",
    )
    .await
}

/// One sample's line of the metrics text, parsed (`name{labels} value`).
pub async fn metric(kw: &Proxy, series: &str) -> Option<f64> {
    let text = get(&kw.admin_url("/metrics"), &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The p-th percentile (0..=100) of `samples`, nearest rank.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}
