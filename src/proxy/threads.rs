//! Thread per core, for both traffic listeners: each worker thread runs its own
//! single-threaded runtime serving the connections the balancer hands it, so a request
//! (and, for the proxy, its upstream connection) stays on one thread and no task is woken
//! across threads.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::balance::Balancer;
use super::server::Phase;
use super::worker::Worker;
use super::{server, RequestBody};
use crate::tls::TlsAcceptor;
use crate::App;

/// How one listener's worker threads are made: their name, the metrics shard of worker
/// `i`, and whether each runs the reaper of its upstream pool.
pub struct Threads {
    pub name: &'static str,
    pub first_shard: usize,
    pub upstream: bool,
}

/// Serve `listener` on `app.workers()` threads until `phase` turns [`Phase::Closing`],
/// then let each drain for up to `grace`. Returns when every thread has finished. Each
/// thread is told of [`Phase::Draining`] at once, and of `Closing` once the listener is
/// closed (so no connection reaches a thread after it stopped taking them).
pub async fn serve_on_threads<D, F>(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    threads: Threads,
    mut phase: watch::Receiver<Phase>,
    grace: Duration,
    door: D,
) where
    D: Fn(Arc<super::conn::Serving>, Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<super::Body>, Infallible>> + Send + 'static,
{
    // The balancer admits connections: `max_connections` is per listener, not per thread.
    let max_connections = app.config.limits.max_connections;
    let workers = app.workers();
    let refused = app.metrics.connections_refused();
    let (balancer, receivers) = Balancer::new(workers, max_connections, refused);
    // `max_in_flight` is per process, split evenly so that each thread checks its own.
    let in_flight_cap = app.config.limits.max_in_flight.div_ceil(workers.max(1));
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    let mut joins = Vec::with_capacity(receivers.len());
    for (i, connections) in receivers.into_iter().enumerate() {
        let (app, tls, door) = (app.clone(), tls.clone(), door.clone());
        let phase_rx = phase_rx.clone();
        let run = move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a worker runtime");
                    return;
                }
            };
            rt.block_on(async move {
                // What this worker owns: its requests use no other pool or shard.
                let index = threads.first_shard + i;
                let worker = Worker::new(app.metrics.shard(index), in_flight_cap, index);
                if threads.upstream {
                    app.upstream.spawn_reaper(worker.pool().clone());
                }
                server::serve(app, worker, connections, tls, phase_rx, grace, door).await;
            });
        };
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{i}", threads.name))
            .spawn(run);
        match spawned {
            Ok(t) => joins.push(t),
            Err(e) => tracing::error!(error = %e, "cannot start a worker thread"),
        }
    }
    let stop = async {
        if phase.wait_for(|p| *p >= Phase::Draining).await.is_ok() {
            let _ = phase_tx.send(Phase::Draining);
        }
        let _ = phase.wait_for(|p| *p == Phase::Closing).await;
    };
    balancer.run(listener, stop).await;
    let _ = phase_tx.send(Phase::Closing);
    let _ = tokio::task::spawn_blocking(move || {
        for t in joins {
            let _ = t.join();
        }
    })
    .await;
}
