//! One accept loop for the proxy listener, handing each connection to the worker thread
//! that has the fewest open. With a socket per worker (`SO_REUSEPORT`) the kernel spreads
//! connections by a hash of their addresses, so a few long-lived connections (an ingress's
//! or a mesh's keep-alive pool) often land on one worker while another idles; Envoy's
//! `exact_balance` is the same remedy. Only connection set-up crosses threads: a
//! connection's requests stay on the worker it was handed to.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::warn;

/// An accepted connection on its way to a worker, not yet registered with its runtime.
type Handoff = (std::net::TcpStream, SocketAddr, Open);

/// Counts a connection as open on its worker until dropped (when the connection ends).
pub struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a worker's connections come from: a listener of its own (the decision listener's
/// runtime), or the balancer.
pub enum Connections {
    Listener(TcpListener),
    Handed(mpsc::UnboundedReceiver<Handoff>),
}

impl Connections {
    /// The next connection, with its open-count guard; `None` once no more will come.
    pub async fn next(&mut self) -> Option<io::Result<(TcpStream, SocketAddr, Option<Open>)>> {
        match self {
            Self::Listener(l) => Some(l.accept().await.map(|(s, peer)| (s, peer, None))),
            Self::Handed(rx) => {
                let (stream, peer, open) = rx.recv().await?;
                Some(TcpStream::from_std(stream).map(|s| (s, peer, Some(open))))
            }
        }
    }
}

/// The sending ends, one per worker, with each worker's count of open connections.
pub struct Balancer {
    workers: Vec<(mpsc::UnboundedSender<Handoff>, Arc<AtomicUsize>)>,
}

impl Balancer {
    /// A balancer over `n` workers and, for each, where it receives its connections.
    pub fn new(n: usize) -> (Self, Vec<Connections>) {
        let (workers, receivers) = (0..n.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                ((tx, Arc::default()), Connections::Handed(rx))
            })
            .unzip();
        (Self { workers }, receivers)
    }

    /// Accept until `stop` resolves, handing each connection to the worker with the fewest
    /// open; then drop the listener (new connections are refused) and the senders (each
    /// worker's [`Connections::next`] ends).
    pub async fn run(self, listener: TcpListener, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut stop => break,
            };
            match accepted.and_then(|(s, peer)| Ok((s.into_std()?, peer))) {
                Ok((stream, peer)) => self.hand(stream, peer),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn hand(&self, stream: std::net::TcpStream, peer: SocketAddr) {
        let least = self
            .workers
            .iter()
            .filter(|(tx, _)| !tx.is_closed())
            .min_by_key(|(_, open)| open.load(Ordering::Relaxed));
        if let Some((tx, open)) = least {
            // A worker that has just stopped drops it: the connection is closed.
            let _ = tx.send((stream, peer, Open::new(open)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_worker_with_fewest_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (balancer, mut workers) = Balancer::new(2);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(balancer.run(listener, async {
            let _ = stop_rx.await;
        }));
        let mut clients = Vec::new();
        let mut held = [Vec::new(), Vec::new()];
        for i in 0..6 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            // Each new connection goes to the less loaded worker: alternately, here.
            let (_, _, open) = workers[i % 2].next().await.unwrap().unwrap();
            held[i % 2].push(open);
        }
        // Worker 0's connections end: the next ones go to it until it catches up.
        held[0].clear();
        for _ in 0..3 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (_, _, open) = workers[0].next().await.unwrap().unwrap();
            held[0].push(open);
        }
        let _ = stop_tx.send(());
        run.await.unwrap();
        assert!(workers[1].next().await.is_none(), "the senders are gone");
    }
}
