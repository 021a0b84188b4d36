//! What one worker thread owns, handed to every request it serves.

use std::sync::Arc;

use super::pool::Pool;
use super::respond::Ids;
use crate::metrics::Shard;
use crate::thread_count::ThreadCount;

/// A worker's own state: its keep-alive connections to the upstream, its shard of the
/// request metrics and its correlation-id slab. Each request the worker serves gets a clone (a reference count);
/// nothing in it is written by another worker's requests, so the request path shares no
/// cache line between cores.
#[derive(Clone)]
pub struct Worker(Arc<Owned>);

struct Owned {
    /// The thread's place among every traffic thread (proxy and decision doors): its key
    /// usage shard.
    index: usize,
    pool: Pool,
    metrics: Arc<Shard>,
    ids: Ids,
    /// This thread's share of `limits.max_in_flight`.
    in_flight_cap: usize,
    /// Requests of this thread that may hold an upstream connection: from the head until
    /// the response body ends, unless keyward refused the request itself; and open tunnels.
    /// Only this thread changes it.
    busy: ThreadCount,
    /// Of those, requests without a key (and their bodies after the answer): at most half
    /// the share, whatever keyed requests hold.
    keyless: ThreadCount,
    /// Client connections accepted so far: each one's requests without a key own the
    /// upstream connections they use ([`super::pool::ConnOwner`]).
    conns: ThreadCount,
    /// Set when `shutdown.grace` ran out: the requests still in flight are being cut off,
    /// not given up by their clients ([`crate::auth::Code::CutAtShutdown`]).
    cut: std::sync::atomic::AtomicBool,
}

impl Worker {
    pub fn new(metrics: Arc<Shard>, in_flight_cap: usize, index: usize) -> Self {
        Self(Arc::new(Owned {
            index,
            pool: Pool::default(),
            metrics,
            ids: Ids::default(),
            in_flight_cap,
            busy: ThreadCount::default(),
            keyless: ThreadCount::default(),
            conns: ThreadCount::default(),
            cut: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Count a request (or a tunnel) against `limits.max_in_flight` while the guard lives.
    pub fn busy(&self) -> Busy {
        self.0.busy.add(1);
        Busy(self.clone())
    }

    /// More requests hold this thread's upstream connections than its share of
    /// `limits.max_in_flight` (the one asking included): it must not open another. A
    /// request keyward refused does not count, however long its answer takes to write;
    /// one on a public route does, since it holds an upstream connection like any other.
    pub fn over_in_flight_cap(&self) -> bool {
        self.0.busy.get() > self.0.in_flight_cap as u64
    }

    /// A place for a request without a key (a public route's) bound for the upstream, held
    /// until its answer ends: within the share, and within half of it for such requests
    /// however many keyed ones there are. Keyed requests always have the other half (24
    /// connections of zero-window HTTP/2 streams to a public `/healthz` held every slot,
    /// and every keyed request got 502, with no key at all); and keyed load never shuts
    /// public routes out (a first version counted every request against the half).
    pub fn keyless(&self) -> Option<Keyless> {
        let half = self.0.in_flight_cap.div_ceil(2);
        if self.over_in_flight_cap() || self.0.keyless.get() >= half as u64 {
            return None;
        }
        self.0.keyless.add(1);
        Some(Keyless {
            _place: Arc::new(KeylessPlace(self.clone())),
        })
    }

    /// The owner of a new client connection's requests without a key, on this worker's
    /// pool: never one before it (a stray answer to an earlier client's request stays
    /// that client's).
    pub fn next_conn_owner(&self) -> super::pool::ConnOwner {
        self.0.conns.add(1);
        self.0.conns.get()
    }

    /// `shutdown.grace` ran out: what is still in flight is cut off by keyward.
    pub fn cut_off(&self) {
        self.0.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Was what is still in flight cut off by keyward ([`Self::cut_off`])?
    pub fn was_cut_off(&self) -> bool {
        self.0.cut.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The thread's place among every traffic thread.
    pub fn index(&self) -> usize {
        self.0.index
    }

    /// This worker's upstream connections.
    pub fn pool(&self) -> &Pool {
        &self.0.pool
    }

    /// Where this worker mints correlation ids.
    pub fn ids(&self) -> &Ids {
        &self.0.ids
    }

    /// This worker's shard of the request metrics.
    pub fn metrics(&self) -> &Arc<Shard> {
        &self.0.metrics
    }
}

/// A request without a key counted in its half of `limits.max_in_flight` until the last
/// clone is dropped (it travels in the response's extensions to the body it ends with).
#[derive(Clone)]
pub struct Keyless {
    _place: Arc<KeylessPlace>,
}

struct KeylessPlace(Worker);

impl Drop for KeylessPlace {
    fn drop(&mut self) {
        self.0 .0.keyless.sub(1);
    }
}

/// One request or tunnel counted against `limits.max_in_flight` until dropped.
pub struct Busy(Worker);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0 .0.busy.sub(1);
    }
}
