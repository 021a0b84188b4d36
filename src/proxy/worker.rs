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
}

impl Worker {
    pub fn new(metrics: Arc<Shard>) -> Self {
        Self(Arc::new(Owned {
            pool: Pool::default(),
            metrics,
            ids: Ids::default(),
        }))
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
