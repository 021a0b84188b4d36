//! The decision listener: plain HTTP/1.1 + h2c, served by the proxy listener's connection
//! code ([`server::serve`]): the same limits (`max_connections`, `header_read_timeout`,
//! `idle_timeout`, `write_stall_timeout`, `max_header_bytes`, HTTP/2 stream limits) and the
//! same draining on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::proxy::balance::Connections;
use crate::proxy::server;
use crate::proxy::worker::Worker;

use crate::App;

/// Accept until `stop` resolves, then give open connections up to `grace` to finish. The
/// proxy listener's connection serving, with the decision endpoints as the front door: the
/// same `max_connections` (slots of its own), head, idle and write-stall bounds, so a
/// caller that stops reading (an HTTP/2 window of zero) cannot pin a decision.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let slots = server::connection_slots(&app.config.limits);
    let door = |app, worker, _conn, req| super::handle(app, worker, req);
    let worker = Worker::new(app.metrics.spare_shard());
    let connections = Connections::Listener(listener);
    server::serve(app, worker, connections, None, slots, stop, grace, door).await;
}

/// Run [`serve`] on its own multi-threaded runtime (one thread per worker), so decisions
/// are spread over the CPUs like the proxy's traffic. Returns when the listener has drained.
pub async fn serve_on_threads(
    app: Arc<App>,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) {
    let workers = app.workers();
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot move the decision listener");
            return;
        }
    };
    let joined = tokio::task::spawn_blocking(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("keyward-decision")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the decision runtime");
                return;
            }
        };
        rt.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(app, listener, stop, grace).await,
                Err(e) => tracing::error!(error = %e, "cannot register the decision listener"),
            }
        });
    });
    let _ = joined.await;
}
