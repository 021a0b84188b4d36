//! The public listener: accept, connection limit, HTTP/1.1 + h2c (+ TLS), and draining.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::handler::{self, ConnInfo};
use crate::config::Limits;
use crate::tls::TlsAcceptor;
use crate::App;

/// The HTTP/1.1 + HTTP/2 server settings, built once.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(1024));
    builder
}

/// Accept until `stop` resolves, then wait up to `grace` for open connections to finish.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let builder = Arc::new(http_builder(&app.config.limits));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(app.config.limits.max_connections));
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "max_connections reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    let conn = ConnInfo { peer, tls: false };
                    serve_conn(app, &builder, watcher, stream, conn).await;
                }
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        let conn = ConnInfo { peer, tls: true };
                        serve_conn(app, &builder, watcher, stream, conn).await;
                    }
                    Err(e) => debug!(%peer, error = %e, "TLS handshake failed"),
                },
            }
        });
    }
    drop(listener);
    info!("listener closed; waiting for in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => info!("all connections finished"),
        () = tokio::time::sleep(grace) => warn!(?grace, "grace period over; closing remaining connections"),
    }
}

async fn serve_conn<I>(
    app: Arc<App>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    conn: ConnInfo,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handler::handle(app.clone(), conn, req));
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        debug!(peer = %conn.peer, error = %e, "connection ended with an error");
    }
}
