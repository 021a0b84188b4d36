//! The decision listener: HTTP/1.1 and HTTP/2, over `tls` when it is configured (with
//! client certificates when `client_ca` is, so only the front proxy can ask), served by the
//! proxy listener's connection
//! code ([`crate::proxy::server::serve`]): the same limits (`max_connections`, `header_read_timeout`,
//! `idle_timeout`, `write_stall_timeout`, `max_header_bytes`, HTTP/2 stream limits) and the
//! same draining on shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::proxy::server::Phase;
use crate::proxy::threads::{self, Threads};

use crate::tls::TlsAcceptor;
use crate::App;

/// Serve the decision endpoints until `phase` turns [`Phase::Closing`], then give open
/// connections up to `grace` to finish (draining them from [`Phase::Draining`] on, as the
/// proxy listener does): the proxy listener's threads, balancer and connection serving, with
/// the decision endpoints as the front door. The same `max_connections` (slots of its
/// own), head, idle and write-stall bounds hold, so a caller that stops reading (an HTTP/2
/// window of zero) cannot pin a decision. Its threads have their own metrics shards.
pub async fn serve_on_threads(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    phase: watch::Receiver<Phase>,
    grace: Duration,
) {
    let threads = Threads {
        name: "keyward-decision",
        first_shard: app.workers(),
        upstream: false,
    };
    let prepared = Arc::new(super::Prepared::new(&app));
    let door = move |serving: Arc<crate::proxy::conn::Serving>, req| {
        // A front proxy in `trusted_proxies` may pass on what an edge before it asserted.
        let trusted =
            crate::proxy::headers::is_trusted(&serving.conn, &serving.app.config.trusted_proxies);
        super::handle(serving, req, prepared.clone(), trusted)
    };
    threads::serve_on_threads(app, listener, tls, threads, phase, grace, door).await;
}
