//! The decision listener: plain HTTP/1.1 + h2c, with the proxy listener's limits
//! (`max_connections`, `header_read_timeout`, `max_header_bytes`, HTTP/2 stream limits) and
//! the same draining on shutdown.
//!
//! Its callers are proxies holding a few keep-alive connections each, not the internet, so
//! hyper's own HTTP/1 head timer bounds a request head here (idle keep-alive included), and
//! `hyper_util`'s graceful shutdown drains it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::App;

/// Accept until `stop` resolves, then give open connections up to `grace` to finish.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let limits = &app.config.limits;
    let mut builder = crate::proxy::server::http_builder(limits);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    // The decision listener's own `max_connections` slots.
    let slots = crate::proxy::server::connection_slots(limits);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "decision listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "decision listener: max_connections reached; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service =
            service_fn(move |req: hyper::Request<Incoming>| super::handle(app.clone(), req));
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "decision connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    info!("decision listener closed; waiting for in-flight decisions");
    tokio::select! {
        () = graceful.shutdown() => info!("all decision connections finished"),
        () = tokio::time::sleep(grace) => warn!(?grace, "grace period over; closing remaining decision connections"),
    }
}

/// Run [`serve`] on its own multi-threaded runtime (one thread per worker), so decisions
/// are spread over the CPUs like the proxy's traffic. Returns when the listener has drained.
pub async fn serve_on_threads(
    app: Arc<App>,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) {
    let workers = app
        .config
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
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
