//! One accept loop per traffic listener, admitting each connection (`max_connections`)
//! and handing it to the worker thread that has the fewest open. With a socket per worker (`SO_REUSEPORT`) the kernel spreads
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
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

/// An accepted connection on its way to a worker, not yet registered with its runtime.
struct Handoff {
    stream: std::net::TcpStream,
    admitted: Admitted,
}

/// What a connection holds for as long as it is open: its `max_connections` slot and its
/// place in its worker's count of open connections.
#[derive(Debug)]
pub struct Admitted {
    pub peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
    _open: Open,
}

/// Counts a connection as open on its worker until dropped (when the connection ends).
#[derive(Debug)]
struct Open(Arc<AtomicUsize>);

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

/// The connections the balancer hands one worker.
pub struct Connections(mpsc::UnboundedReceiver<Handoff>);

impl Connections {
    /// The next connection, registered with this worker's runtime; `None` once no more
    /// will come (the balancer stopped).
    pub async fn next(&mut self) -> Option<io::Result<(TcpStream, Admitted)>> {
        let Handoff { stream, admitted } = self.0.recv().await?;
        Some(TcpStream::from_std(stream).map(|s| (s, admitted)))
    }
}

/// The sending ends, one per worker, with each worker's count of open connections, and the
/// listener's `max_connections` slots.
pub struct Balancer {
    workers: Vec<(mpsc::UnboundedSender<Handoff>, Arc<AtomicUsize>)>,
    slots: Arc<Semaphore>,
    /// Connections closed at accept because `max_connections` were open: a client sees
    /// only a closed connection, so this is where an operator sees it.
    refused: prometheus::IntCounter,
}

impl Balancer {
    /// A balancer over `n` workers admitting at most `max_connections` at once, and, for
    /// each worker, where it receives its connections.
    pub fn new(
        n: usize,
        max_connections: usize,
        refused: prometheus::IntCounter,
    ) -> (Self, Vec<Connections>) {
        let (workers, receivers) = (0..n.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                ((tx, Arc::default()), Connections(rx))
            })
            .unzip();
        // tokio's semaphore panics above MAX_PERMITS (about 2^61), far beyond any limit.
        let slots = Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)));
        (
            Self {
                workers,
                slots,
                refused,
            },
            receivers,
        )
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

    /// Admit the connection (or close it at `max_connections`) and hand it over.
    fn hand(&self, stream: std::net::TcpStream, peer: SocketAddr) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            self.refused.inc();
            debug!(%peer, "max_connections reached; closing");
            return;
        };
        let least = self
            .workers
            .iter()
            .filter(|(tx, _)| !tx.is_closed())
            .min_by_key(|(_, open)| open.load(Ordering::Relaxed));
        if let Some((tx, open)) = least {
            let admitted = Admitted {
                peer,
                _slot: slot,
                _open: Open::new(open),
            };
            // A worker that has just stopped drops it: the connection is closed.
            let _ = tx.send(Handoff { stream, admitted });
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
        let (balancer, mut workers) = Balancer::new(2, 100, counter());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(balancer.run(listener, async {
            let _ = stop_rx.await;
        }));
        let mut clients = Vec::new();
        let mut held = [Vec::new(), Vec::new()];
        for i in 0..6 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            // Each new connection goes to the less loaded worker: alternately, here.
            let (_, admitted) = workers[i % 2].next().await.unwrap().unwrap();
            held[i % 2].push(admitted);
        }
        // Worker 0's connections end: the next ones go to it until it catches up.
        held[0].clear();
        for _ in 0..3 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (_, admitted) = workers[0].next().await.unwrap().unwrap();
            held[0].push(admitted);
        }
        let _ = stop_tx.send(());
        run.await.unwrap();
        assert!(workers[1].next().await.is_none(), "the senders are gone");
    }

    fn counter() -> prometheus::IntCounter {
        prometheus::IntCounter::new("refused", "test").unwrap()
    }

    #[tokio::test]
    async fn connections_past_max_connections_are_closed_at_accept() {
        use std::io::Read;
        let refused = counter();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (balancer, mut workers) = Balancer::new(1, 1, refused.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(balancer.run(listener, async {
            let _ = stop_rx.await;
        }));
        let _first = std::net::TcpStream::connect(addr).unwrap();
        let held = workers[0].next().await.unwrap().unwrap();
        // The one slot is taken: the next connection is closed without reaching a worker.
        let mut second = std::net::TcpStream::connect(addr).unwrap();
        let read = tokio::task::spawn_blocking(move || second.read(&mut [0u8; 1]));
        assert!(matches!(read.await.unwrap(), Ok(0) | Err(_)), "closed");
        assert_eq!(refused.get(), 1, "counted");
        // Once the first connection ends, its slot admits the next.
        drop(held);
        let _third = std::net::TcpStream::connect(addr).unwrap();
        assert!(workers[0].next().await.unwrap().is_ok());
        let _ = stop_tx.send(());
        run.await.unwrap();
    }
}
