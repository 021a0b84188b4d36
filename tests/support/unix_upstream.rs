//! The recording upstream of [`super::upstream`], listening on a Unix socket file instead of
//! TCP (`upstream: unix:/path`). Same routes and [`Seen`] records; a socket peer has no
//! address, so [`Seen::peer`] is `0.0.0.0:N`, N the ordinal of the accepted connection
//! (requests on one connection share it).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;

use super::upstream::{serve_conn, Seen, Upstream, UpstreamBuilder};

impl UpstreamBuilder {
    /// Serve on a new socket file at `path` (its directory must exist). The returned
    /// upstream's `addr` is `0.0.0.0:0`: it has no TCP address.
    pub async fn spawn_unix(self, path: &Path) -> Upstream {
        let listener = UnixListener::bind(path).unwrap();
        let seen: Arc<std::sync::Mutex<Vec<Seen>>> = Arc::default();
        let routes = Arc::new(self.routes);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            let mut accepted: u16 = 0;
            while let Ok((stream, _)) = listener.accept().await {
                accepted += 1;
                let peer = SocketAddr::from(([0, 0, 0, 0], accepted));
                tokio::spawn(serve_conn(stream, seen2.clone(), routes.clone(), peer));
            }
        });
        Upstream {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            seen,
        }
    }
}
