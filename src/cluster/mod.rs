//! Shared state for a fleet of replicas (SPEC 14): rate limits, revocations and usage in
//! Redis. Each kind of state has one seam with a local implementation and a Redis one,
//! chosen once at start ([`limiter::Limiter`], [`revocations::Revocations`],
//! [`usage::FleetUsage`]); the request path does not know which it has.
//!
//! Every Redis call goes through [`Cluster::call`] (or [`Cluster::call_on`]): bounded by
//! `cluster.timeout`, timed and counted. A failed call is a value ([`ClusterError`]) the
//! caller maps to its policy; it also marks Redis down, so the request path stops waiting
//! on it until the background probe sees it back. Background work shares one multiplexed
//! connection (redis-rs `ConnectionManager`); the rate limiter, on the request path, uses
//! one connection per calling thread ([`thread_conn`]).

pub mod bounded;
pub mod limiter;
pub mod metrics;
pub mod revocations;
pub mod thread_conn;
pub mod usage;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tracing::{info, warn};

use crate::config::ClusterConfig;
use metrics::{ClusterMetrics, Op};

/// How often a replica probes a Redis it believes up (and reconnects its shared connection
/// when it has none): a Redis that starts refusing writes (read-only after a failover, an
/// ACL changed) is marked down within this even when no rate-limited request comes to find
/// it out (`keyward_cluster_up` said 1 meanwhile, and the alert stayed silent).
const PROBE_INTERVAL: Duration = Duration::from_millis(1000);
/// How often a replica probes a Redis it has marked down: while it is down every
/// rate-limited key follows `on_error`, so a Redis back after a short stall is seen soon.
const DOWN_PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// The least time a call off the request path gets (see [`Cluster::background_timeout`]).
pub const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a Redis call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis is not connected")]
    NotConnected,
    #[error("redis call took longer than cluster.timeout")]
    Timeout,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A lift asked for before Redis's clock was ever read: its stamp could not be ordered
    /// against the fleet's changes, so it is not made.
    #[error("redis's clock not read yet")]
    ClockUnknown,
}

impl ClusterError {
    /// This connection was closed under us (Redis closed it as idle past its `timeout`,
    /// restarted, or a proxy dropped it): no word on Redis itself, which a fresh
    /// connection asks.
    pub fn is_dropped(&self) -> bool {
        matches!(self, Self::Redis(e) if e.is_connection_dropped())
    }

    /// The connection is gone (not merely slow): make a new one rather than reuse it.
    pub fn is_broken(&self) -> bool {
        matches!(self, Self::Redis(e)
            if e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error())
    }

    /// Redis cannot be reached or cannot answer anything now (unreachable, slow, loading,
    /// failing over): every call fails alike, whatever it asks. Not a connection dropped
    /// under us ([`Self::is_dropped`]) or not made yet.
    pub fn is_unreachable(&self) -> bool {
        use redis::ErrorKind as K;
        if self.is_dropped() {
            return false;
        }
        match self {
            Self::NotConnected | Self::ClockUnknown => false,
            Self::Timeout => true,
            Self::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || matches!(
                        e.kind(),
                        K::BusyLoadingError | K::TryAgain | K::ClusterDown | K::MasterDown
                    )
            }
        }
    }

    /// Redis cannot serve calls now (unreachable, slow, loading, read-only after a
    /// failover, out of memory, refusing our user), as opposed to refusing one call's data
    /// (a counter that would overflow, a key of the wrong type: values any writer of a
    /// shared Redis can leave). Only an outage marks Redis down, which sends every
    /// rate-limited key to `on_error`; a data error fails its own call alone. Neither is
    /// a connection dropped under us ([`Self::is_dropped`]) or not made yet: a failed
    /// connect is what says Redis is unreachable.
    pub fn is_outage(&self) -> bool {
        use redis::ErrorKind as K;
        self.is_unreachable()
            || matches!(self, Self::Redis(e) if !self.is_dropped() && (
                matches!(e.kind(), K::ReadOnly | K::AuthenticationFailed)
                    || matches!(e.code(), Some("OOM" | "NOPERM" | "NOAUTH" | "MISCONF"))
                    // An ACL refusal inside a script comes back as a plain error.
                    || e.detail().is_some_and(|d| {
                        d.contains("can't run this command") || d.contains("no permissions")
                    })
            ))
    }
}

/// The connection to Redis and its health, shared by the three kinds of state.
pub struct Cluster {
    pub config: ClusterConfig,
    client: redis::Client,
    /// Set once the first connection is made; redis-rs reconnects it from then on.
    conn: ArcSwapOption<ConnectionManager>,
    up: AtomicBool,
    /// How many times Redis has been marked down (see [`Self::downs`]).
    downs: AtomicU64,
    /// Woken when Redis answers again after an outage (the revocation sync runs at once).
    pub back: tokio::sync::Notify,
    /// Woken when a call marks Redis down (the probe runs at once).
    down: tokio::sync::Notify,
    /// See [`Self::probe`].
    probe: redis::Script,
    pub metrics: ClusterMetrics,
    /// When a refused call other than a rate limit was last said at `warn`.
    refusals_said: crate::logging::Sometimes,
}

/// Why the cluster cannot be set up at start. Never repeats the URL: it may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The field (or the environment variable) that set the URL, and why it is refused.
    #[error("{0}: not a usable Redis URL ({1:?})")]
    Url(&'static str, redis::ErrorKind),
    #[error("{0}: {1:?}")]
    Client(&'static str, redis::ErrorKind),
    #[error("metrics: {0}")]
    Metrics(#[source] prometheus::Error),
}

/// Check `config`'s Redis URL without connecting (`keyward check`). The error names where
/// the URL was set and never repeats it.
pub fn check_url(config: &ClusterConfig) -> Result<(), SetupError> {
    redis::Client::open(config.redis.as_str())
        .map(|_| ())
        .map_err(|e| SetupError::Url(config.redis_field(), e.kind()))
}

impl Cluster {
    pub fn new(
        config: &ClusterConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self, SetupError> {
        check_url(config)?;
        let client = redis::Client::open(config.redis.as_str())
            .map_err(|e| SetupError::Client(config.redis_field(), e.kind()))?;
        let metrics = ClusterMetrics::new(registry).map_err(SetupError::Metrics)?;
        Ok(Self {
            config: config.clone(),
            client,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            downs: AtomicU64::new(0),
            back: tokio::sync::Notify::new(),
            down: tokio::sync::Notify::new(),
            probe: redis::Script::new(limiter::GCRA),
            metrics,
            refusals_said: crate::logging::Sometimes::default(),
        })
    }

    /// A Redis key name: `{prefix}{name}`. Per-key names put the key id in a hash tag
    /// (`{...}`) so one key's state stays on one Redis Cluster shard.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.config.prefix)
    }

    /// Redis answered the last call (or probe).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// How many times Redis has gone from up to down. A reader that saw this count before a
    /// call that then succeeded has talked to Redis since every outage counted: the
    /// revocation sync uses it so that an outage its own (slow) full read caused does not
    /// make it read the set whole again as soon as Redis answers.
    pub fn downs(&self) -> u64 {
        self.downs.load(Ordering::Acquire)
    }

    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::AcqRel);
        if was && !up {
            self.downs.fetch_add(1, Ordering::AcqRel);
        }
        self.metrics.up.set(i64::from(up));
        if was != up {
            if up {
                self.back.notify_waiters();
                info!("redis reachable: fleet state shared");
            } else {
                self.down.notify_one();
                warn!("redis unreachable: cluster.on_error applies to rate-limited keys");
            }
        }
    }

    /// One Redis call on the shared connection, which carries only work off the request
    /// path (the revocation set's reads and writes, usage, the probe): bounded by
    /// [`Self::background_timeout`]. Failure marks Redis down.
    pub async fn call<T, F, Fut>(&self, op: Op, f: F) -> Result<T, ClusterError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn.load_full().ok_or(ClusterError::NotConnected)?;
        let deadline = tokio::time::Instant::now() + self.background_timeout();
        let result = self.call_on(op, deadline, (*conn).clone(), f).await;
        let stuck = matches!(result, Err(ClusterError::Timeout));
        if stuck || result.as_ref().is_err_and(ClusterError::is_broken) {
            // Start afresh (the probe reconnects at once) rather than wait out the
            // connection's own reconnect backoff; or, for a call unanswered past the
            // background deadline, the kernel's retransmission timeout (a path that
            // silently stopped carrying anything).
            self.conn.store(None);
        }
        result
    }

    /// One Redis call on `conn`, given up at `deadline`: timed, counted, and Redis marked
    /// down when it fails.
    pub async fn call_on<C, T, F, Fut>(
        &self,
        op: Op,
        deadline: tokio::time::Instant,
        conn: C,
        f: F,
    ) -> Result<T, ClusterError>
    where
        F: FnOnce(C) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let start = Instant::now();
        let result = tokio::time::timeout_at(deadline, f(conn)).await;
        self.metrics.observe(op, start.elapsed());
        let err = match result {
            Ok(Ok(v)) => {
                // Only the probe or a rate-limit call says Redis can serve rate limits (see
                // `Op::proves_up`): reads answer on a Redis out of memory, read-only after
                // a failover, or refusing this user's writes.
                if !self.is_up() && op.proves_up() {
                    self.set_up(true);
                }
                return Ok(v);
            }
            Ok(Err(e)) => ClusterError::Redis(e),
            Err(_) => ClusterError::Timeout,
        };
        self.failed(op, &err);
        Err(err)
    }

    /// A call of `op` failed with `err`: counted, and Redis marked down when `err` says it
    /// cannot serve (see [`ClusterError::is_unreachable`]).
    fn failed(&self, op: Op, err: &ClusterError) {
        // A connection dropped under us is made again by the caller, not a failed call
        // (an idle timeout in Redis would otherwise count errors steadily).
        if !err.is_dropped() {
            self.metrics.error(op);
        }
        if err.is_unreachable() || (op.proves_up() && err.is_outage()) {
            self.set_up(false);
        } else if err.is_outage() {
            // Redis refuses this call, not a rate limit (an ACL without the usage hash or
            // the revocations' channel, a read-only Redis taking no usage): says nothing of
            // whether it can serve rate limits, which the probe asks. Marked down, every
            // such failure sent the fleet's limits local (1.86 times a key's limit).
            if self.refusals_said.now() {
                warn!(op = op.as_str(), error = %err, "redis refuses a call (its rights or state); counted in keyward_cluster_errors_total");
            }
        } else {
            // Counted in keyward_cluster_errors_total{op}; a rate-limit call is one per
            // request, so no line at warn.
            tracing::debug!(op = op.as_str(), error = %err, "redis refused a call's data");
        }
    }

    /// Connect (once) and probe: keeps `up` true while Redis answers. Runs for the life of
    /// the process.
    pub async fn maintain(self: Arc<Self>) {
        // A replica that starts while Redis is down never sees it go from up to down, the
        // change `set_up` reports: the first failed connect since the last success is said.
        let mut said = false;
        // A failed probe's reason, said once per time down (the call that marked it down
        // may have said nothing: a refusal of its data, an ACL's).
        let mut said_probe = false;
        loop {
            if self.conn.load().is_none() {
                match self.connect().await {
                    Ok(c) => {
                        self.conn.store(Some(Arc::new(c)));
                        said = false;
                    }
                    Err(e) => {
                        self.metrics.error(Op::Connect);
                        if !said {
                            // redis-rs retries a refused connect inside the deadline, so a
                            // refusal ends as the deadline.
                            let error = match &e {
                                ClusterError::Timeout => match self.why_no_connection().await {
                                    Some(why) => format!(
                                        "no connection within {} ms: {why}",
                                        self.connect_deadline().as_millis()
                                    ),
                                    None => format!(
                                        "no connection within {} ms (refused, unreachable or slow)",
                                        self.connect_deadline().as_millis()
                                    ),
                                },
                                other => other.to_string(),
                            };
                            warn!(error, "cannot connect to redis; retrying (cluster.on_error applies to rate-limited keys meanwhile)");
                            said = true;
                        }
                        if e.is_outage() || e.is_broken() {
                            self.set_up(false);
                        }
                    }
                }
            }
            if self.conn.load().is_some() {
                match self.probe().await {
                    Ok(()) => {
                        if !self.is_up() {
                            self.set_up(true);
                        }
                        said_probe = false;
                    }
                    Err(e) if !said_probe && !e.is_dropped() => {
                        warn!(error = %e, "redis probe failed (a script's write under the rate-limit keys): cluster.on_error applies to rate-limited keys");
                        said_probe = true;
                    }
                    Err(_) => {}
                }
            }
            let next = if self.is_up() {
                PROBE_INTERVAL
            } else {
                DOWN_PROBE_INTERVAL
            };
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                // Marked down by a call: probe at once.
                () = self.down.notified() => {}
            }
        }
    }

    /// Whether Redis can serve again, asked as the calls that found it down ask: the
    /// rate-limit script itself, on a key under the rate-limit keys (`{prefix}rl:{#probe}`,
    /// a name no key id can give). Not a PING, nor a plain SET elsewhere, nor a script of
    /// its own: a Redis that answers but cannot store (out of memory under `noeviction`, a
    /// read-only replica after a failover), a user without scripting or without rights on
    /// those keys (an ACL's key patterns), or one refused a command the limit's script runs
    /// (`-get`, `-time`) cannot serve a rate limit either, and a probe that passed marked it
    /// up again at once after each call that found it down: a warning and a fleet limit of
    /// N times the limit, with `keyward_cluster_up` at 1.
    async fn probe(&self) -> Result<(), ClusterError> {
        let key = self.key("rl:{#probe}");
        let script = &self.probe;
        self.call(Op::Ping, |mut c| async move {
            // One request a millisecond, a burst of a thousand: never refused, and written
            // back each time, as an allowed request's check is.
            script
                .key(key)
                .arg(1000)
                .arg(1000)
                .invoke_async::<redis::Value>(&mut c)
                .await
                .map(drop)
        })
        .await
    }

    /// `cluster.timeout` bounds what a request waits for (a rate-limit check, on each
    /// worker's own connection). Work off the request path gets at least
    /// [`BACKGROUND_TIMEOUT`]: a full read of a large revocation set takes longer than a
    /// rate-limit check, and one that timed out marked Redis down, which sent every
    /// replica's rate limits local and kept a new replica unready.
    /// How long a call off the request path (a revoke's write) is waited for: past it the
    /// caller has given up, though the call may still reach Redis.
    pub fn call_timeout(&self) -> Duration {
        self.background_timeout()
    }

    fn background_timeout(&self) -> Duration {
        self.config.timeout.max(BACKGROUND_TIMEOUT)
    }

    /// How long the shared connection's connect may take.
    fn connect_deadline(&self) -> Duration {
        self.config.timeout.max(Duration::from_millis(500))
    }

    async fn connect(&self) -> Result<ConnectionManager, ClusterError> {
        let t = self.config.timeout;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(t.max(Duration::from_millis(200)))
            .set_response_timeout(self.background_timeout())
            .set_number_of_retries(1)
            .set_max_delay(100);
        let start = Instant::now();
        let r = tokio::time::timeout(
            self.connect_deadline(),
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        self.metrics.observe(Op::Connect, start.elapsed());
        match r {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ClusterError::Timeout),
        }
    }

    /// Why a connect ran out its deadline, if one plain attempt says: redis-rs retries
    /// inside the deadline whatever failed, so a wrong password (`WRONGPASS`), a refused
    /// `SELECT` or a refused connection all ended as the deadline, and an operator could
    /// not tell a bad credential from the network. Only when it was not said yet (once per
    /// time down). Redis's errors name no password.
    async fn why_no_connection(&self) -> Option<String> {
        let attempt = tokio::time::timeout(
            self.connect_deadline(),
            self.client.get_multiplexed_async_connection(),
        )
        .await;
        match attempt {
            Ok(Err(e)) => Some(ClusterError::from(e).to_string()),
            Ok(Ok(_)) | Err(_) => None,
        }
    }

    /// A dedicated pub/sub connection (subscriptions cannot share the multiplexed one).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, ClusterError> {
        let r = tokio::time::timeout(
            self.config.timeout.max(Duration::from_millis(500)),
            self.client.get_async_pubsub(),
        )
        .await;
        match r {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ClusterError::Timeout),
        }
    }
}

/// Microseconds since the Unix epoch, by this host's clock.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        let at = |url: &str| crate::config::ClusterConfig::with_url(url.into());
        assert!(check_url(&at("redis://127.0.0.1:6379/0")).is_ok());
        assert!(check_url(&at("rediss://:secret@example.com:6380")).is_ok());
        let e = check_url(&at("redis://:secret@[::1"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
        assert!(e.starts_with("cluster.redis: "), "{e}");
        let from_env = crate::config::ClusterConfig {
            redis_from_env: true,
            ..at("redis://u:secret@host:99999")
        };
        let e = check_url(&from_env).unwrap_err().to_string();
        assert!(e.starts_with("KEYWARD_REDIS_URL (cluster.redis): "), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[tokio::test]
    async fn a_call_before_any_connection_fails_fast_as_a_value() {
        let config = crate::config::ClusterConfig {
            redis: "redis://127.0.0.1:1".into(),
            prefix: "t:".into(),
            timeout: Duration::from_millis(50),
            on_error: crate::config::OnError::Local,
            redis_from_env: false,
        };
        let c = Cluster::new(&config, &prometheus::Registry::new()).unwrap();
        let r = c
            .call(Op::Ping, |mut c| async move {
                redis::cmd("PING").query_async::<String>(&mut c).await
            })
            .await;
        assert!(matches!(r, Err(ClusterError::NotConnected)));
        assert!(!c.is_up());
        assert_eq!(c.key("rl:{k}"), "t:rl:{k}");
    }
}
