//! One Redis connection per thread that checks shared rate limits.
//!
//! A redis-rs multiplexed connection runs a driver task on the runtime that made it. The
//! request path runs on per-worker current-thread runtimes (`runtime::serve_on_workers`), so
//! with one connection made on the main runtime every limiter call crossed threads twice
//! (the request to the driver, the reply back), each a futex wake-up and a context switch.
//! Here each thread that calls the limiter gets its own connection, made lazily from that
//! thread, so its driver runs on the same runtime as the requests that use it.
//!
//! The connections are held by their owner ([`ThreadConns`], in the limiter), keyed by
//! thread id. Connecting runs as a task on the caller's runtime; a request waits for it no
//! longer than its own deadline (`cluster.timeout`), and a failed connect is retried after a
//! backoff, so the request path never waits on a Redis that is not there: the caller applies
//! `cluster.on_error` meanwhile.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use dashmap::DashMap;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::metrics::Op;
use super::Cluster;

/// The first retry after a failed connect; doubled on each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The longest a connect may take: the request does not wait for it past its deadline, but
/// the connect goes on, so a slow but working Redis is connected to eventually.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The connection of one thread.
#[derive(Default)]
struct Slot {
    state: Mutex<State>,
    /// Woken when a connect ends (either way).
    changed: Notify,
}

#[derive(Default)]
enum State {
    /// Not connected: connect on the next call.
    #[default]
    Idle,
    /// The last `failures` connects failed: the next one not before `retry_at`.
    Backoff {
        retry_at: Instant,
        failures: u32,
    },
    /// A connect is under way; `waited_out` once a caller waited for it to its deadline:
    /// the callers after it do not wait for the same connect (a Redis that takes
    /// connections and answers nothing made every limited request wait its whole deadline,
    /// for as long as each connect took, 500 ms).
    Connecting {
        waited_out: bool,
    },
    Up(MultiplexedConnection),
}

/// What a caller does next, decided under the slot's lock (never held across an await).
enum Next {
    Use(MultiplexedConnection),
    Wait,
    Connect(u32),
    GiveUp,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next(&self, now: Instant) -> Next {
        let mut state = self.lock();
        let failures = match &*state {
            State::Up(c) => return Next::Use(c.clone()),
            State::Connecting { waited_out: false } => return Next::Wait,
            State::Connecting { waited_out: true } => return Next::GiveUp,
            State::Backoff { retry_at, .. } if now < *retry_at => return Next::GiveUp,
            State::Backoff { failures, .. } => *failures,
            State::Idle => 0,
        };
        *state = State::Connecting { waited_out: false };
        Next::Connect(failures)
    }
}

/// Why [`ThreadConns::get`] gave no connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoConnection {
    /// The last connect failed and the next is not due yet, or a caller already waited the
    /// connect under way out. Not waited for.
    BackingOff,
    /// A connect did not end within the caller's deadline (a Redis that takes connections
    /// but answers nothing, or a thread too busy to finish it): this caller waited it out.
    TimedOut,
}

/// The limiter's connections, one per calling thread.
pub struct ThreadConns {
    cluster: Arc<Cluster>,
    slots: DashMap<ThreadId, Arc<Slot>, foldhash::fast::RandomState>,
}

impl ThreadConns {
    pub fn new(cluster: &Arc<Cluster>) -> Self {
        Self {
            cluster: cluster.clone(),
            slots: DashMap::default(),
        }
    }

    /// This thread's connection: at once when it is up, else after a connect that ends
    /// before `deadline`. `None`: not connected by then (the caller applies its policy).
    pub async fn get(&self, deadline: Instant) -> Result<MultiplexedConnection, NoConnection> {
        let id = std::thread::current().id();
        if let Some(slot) = self.slots.get(&id) {
            if let State::Up(c) = &*slot.lock() {
                return Ok(c.clone());
            }
        }
        let slot = self.slots.entry(id).or_default().clone();
        loop {
            let changed = slot.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read: a connect that ends in between still wakes us.
            changed.as_mut().enable();
            match slot.next(Instant::now()) {
                Next::Use(c) => return Ok(c),
                Next::GiveUp => return Err(NoConnection::BackingOff),
                Next::Wait => {}
                Next::Connect(failures) => {
                    tokio::spawn(connect(slot.clone(), self.cluster.clone(), failures));
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                if let State::Connecting { waited_out } = &mut *slot.lock() {
                    *waited_out = true;
                }
                return Err(NoConnection::TimedOut);
            }
        }
    }

    /// This thread's connection broke: connect afresh on the next call.
    pub fn reset(&self) {
        if let Some(slot) = self.slots.get(&std::thread::current().id()) {
            let mut state = slot.lock();
            if matches!(*state, State::Up(_)) {
                *state = State::Idle;
            }
        }
    }

    /// Threads holding a connection (for tests).
    pub fn connected(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(*s.lock(), State::Up(_)))
            .count()
    }
}

/// Connect on this thread's runtime (redis-rs spawns the connection's driver where it is
/// made), then wake the callers waiting for it.
async fn connect(slot: Arc<Slot>, cluster: Arc<Cluster>, failures: u32) {
    let timeout = cluster.config.timeout.max(MIN_CONNECT_TIMEOUT);
    let config = AsyncConnectionConfig::new().set_connection_timeout(timeout);
    let start = std::time::Instant::now();
    let made = cluster
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await;
    let metrics = &cluster.metrics;
    metrics.observe(Op::Connect, start.elapsed());
    let next = match made {
        Ok(c) => State::Up(c),
        Err(e) => {
            metrics.error(Op::Connect);
            tracing::debug!(error = %e, "redis connect for the limiter failed");
            let failures = failures.saturating_add(1);
            State::Backoff {
                retry_at: Instant::now() + backoff(failures),
                failures,
            }
        }
    };
    *slot.lock() = next;
    slot.changed.notify_waiters();
}

/// The wait before the next connect after `failures` failed ones in a row.
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1u32 << doublings)
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_ceiling() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(3), FIRST_BACKOFF * 4);
        assert_eq!(backoff(40), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn one_caller_connects_the_others_wait_and_a_failure_backs_off() {
        let slot = Slot::default();
        let now = Instant::now();
        assert!(matches!(slot.next(now), Next::Connect(0)));
        assert!(
            matches!(slot.next(now), Next::Wait),
            "one connect at a time"
        );
        *slot.lock() = State::Connecting { waited_out: true };
        assert!(
            matches!(slot.next(now), Next::GiveUp),
            "a connect one caller waited out is not waited for again"
        );
        *slot.lock() = State::Backoff {
            retry_at: now + backoff(1),
            failures: 1,
        };
        assert!(
            matches!(slot.next(now), Next::GiveUp),
            "no connect within the backoff"
        );
        let later = now + backoff(1);
        assert!(
            matches!(slot.next(later), Next::Connect(1)),
            "the count goes on"
        );
    }

    #[tokio::test]
    async fn a_refused_connect_gives_up_at_once() {
        let config = crate::config::ClusterConfig {
            redis: "redis://127.0.0.1:1/0".into(),
            prefix: "t:".into(),
            timeout: Duration::from_millis(50),
            on_error: crate::config::OnError::Local,
            redis_from_env: false,
        };
        let cluster = Arc::new(Cluster::new(&config, &prometheus::Registry::new()).unwrap());
        let conns = ThreadConns::new(&cluster);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        // Refused: the connect ends (not the deadline), then the backoff applies at once.
        assert_eq!(
            conns.get(deadline).await.err(),
            Some(NoConnection::BackingOff)
        );
        assert_eq!(
            conns.get(deadline).await.err(),
            Some(NoConnection::BackingOff)
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "did not wait for the deadline"
        );
        assert_eq!(conns.connected(), 0);
    }
}
