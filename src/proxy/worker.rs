//! What one worker thread owns, handed to every request it serves.

use std::sync::Arc;

use super::pool::Pool;
use super::respond::Ids;
use crate::metrics::Shard;

/// A worker's own state: its keep-alive connections to the upstream, its shard of the
/// request metrics and its correlation-id slab. Each request the worker serves gets a clone (a reference count);
/// nothing in it is written by another worker's requests, so the request path shares no
/// cache line between cores.
#[derive(Clone)]
pub struct Worker(Arc<Owned>);

struct Owned {
    pool: Pool,
    metrics: Arc<Shard>,
    ids: Ids,
    /// This thread's share of `limits.max_in_flight`.
    in_flight_cap: usize,
}

impl Worker {
    pub fn new(metrics: Arc<Shard>, in_flight_cap: usize) -> Self {
        Self(Arc::new(Owned {
            pool: Pool::default(),
            metrics,
            ids: Ids::default(),
            in_flight_cap,
        }))
    }

    /// More requests are in flight on this thread than its share of `limits.max_in_flight`
    /// (the one asking included): it must not open another upstream connection.
    pub fn over_in_flight_cap(&self) -> bool {
        usize::try_from(self.0.metrics.in_flight_here()).unwrap_or(0) > self.0.in_flight_cap
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
