//! The admin listener's connection bound.
//!
//! Probes, scrapes and the control API need few connections; without a bound, clients that
//! open connections and send nothing (each held for the head timeout) take every file
//! descriptor, and the proxy listener can no longer accept. A bound alone, though, let any
//! local process hold every place with connections that never send a request head,
//! re-opened as each timed out: everything in the pod shares the loopback address (the app
//! beside keyward, the operator's port-forward, a local scraper), so one such process shut
//! out the emergency revoke, the scrapes and, without `probe_listen`, the probes. So when
//! the bound is reached, the connection that has waited longest for a request head gives
//! its place to the new one: a client that sends its request at once is served, and one
//! that only holds connections holds none for long.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

/// Most admin connections open at once. Past it a new connection takes the place of the
/// one that has waited longest for a request, or is closed at accept if every one is
/// serving a request.
pub const MAX_CONNECTIONS: usize = 256;

/// Most admin connections open at once from one address: one client holding every place
/// would keep the kubelet's probes (from the node's address) out, and the pod would be
/// taken out of its Service, then restarted.
pub const MAX_CONNECTIONS_PER_PEER: usize = 32;

/// The open admin connections of one listener.
#[derive(Default)]
pub struct Slots(Mutex<Open>);

#[derive(Default)]
struct Open {
    next: u64,
    conns: HashMap<u64, Conn>,
}

struct Conn {
    peer: IpAddr,
    /// Since when it has waited for a request head; `None` while it serves one.
    waiting_since: Option<Instant>,
    /// Serving a request, and writing an answer its client has not taken yet: either
    /// keeps it from eviction (a scrape's large answer to a slow reader was cut midway).
    in_service: bool,
    writing: bool,
    evict: Arc<Notify>,
}

/// How a new connection got its place.
#[derive(Debug, PartialEq, Eq)]
pub enum Admitted {
    Free,
    /// The connection that had waited longest for a request was closed to make room.
    Evicted,
}

impl Slots {
    fn open(&self) -> MutexGuard<'_, Open> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection from `peer`, made if need be by closing the connection
    /// that has waited longest for a request: the peer's own when it holds
    /// [`MAX_CONNECTIONS_PER_PEER`], any when [`MAX_CONNECTIONS`] are open. `None` when
    /// every connection in the way is serving a request.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, now: Instant) -> Option<(Slot, Admitted)> {
        let mut open = self.open();
        let from_peer = open.conns.values().filter(|c| c.peer == peer).count();
        let admitted = if from_peer >= MAX_CONNECTIONS_PER_PEER {
            open.evict_longest_waiting(|c| c.peer == peer)?
        } else if open.conns.len() >= MAX_CONNECTIONS {
            open.evict_longest_waiting(|_| true)?
        } else {
            Admitted::Free
        };
        let id = open.next;
        open.next += 1;
        let evict = Arc::new(Notify::new());
        open.conns.insert(
            id,
            Conn {
                peer,
                waiting_since: Some(now),
                in_service: false,
                writing: false,
                evict: evict.clone(),
            },
        );
        let slot = Slot {
            handle: SlotHandle {
                slots: self.clone(),
                id,
            },
            evict,
        };
        Some((slot, admitted))
    }
}

impl Open {
    /// The connection waiting longest for a request goes; if none is waiting, one whose
    /// answer its client is not taking (the write stall bound ends it anyway, and a client
    /// that holds places by reading nothing must not shut anyone out either); one serving
    /// a request never does.
    fn evict_longest_waiting(&mut self, among: impl Fn(&Conn) -> bool) -> Option<Admitted> {
        let waiting = self
            .conns
            .iter()
            .filter(|(_, c)| among(c))
            .filter_map(|(id, c)| Some((*id, c.waiting_since?)))
            .min_by_key(|&(_, since)| since)
            .map(|(id, _)| id);
        let id = waiting.or_else(|| {
            self.conns
                .iter()
                .find(|(_, c)| among(c) && c.writing && !c.in_service)
                .map(|(id, _)| *id)
        })?;
        let conn = self.conns.remove(&id)?;
        // Stored if its task is not waiting on it yet.
        conn.evict.notify_one();
        Some(Admitted::Evicted)
    }
}

/// A connection's place; given back when it is dropped.
pub struct Slot {
    handle: SlotHandle,
    evict: Arc<Notify>,
}

impl Slot {
    /// What the connection's requests mark themselves with.
    pub fn handle(&self) -> SlotHandle {
        self.handle.clone()
    }

    /// Resolves once a new connection has taken this one's place.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.handle.slots.open().conns.remove(&self.handle.id);
    }
}

/// Marks a connection as serving a request or writing an answer (it cannot be evicted), or
/// neither: waiting for a request.
#[derive(Clone)]
pub struct SlotHandle {
    slots: Arc<Slots>,
    id: u64,
}

impl SlotHandle {
    /// A request is being served (`true`) or was answered (`false`).
    pub fn serving(&self, yes: bool) {
        self.mark(|c| c.in_service = yes);
    }

    /// A write is blocked on the client (`true`) or went through (`false`).
    pub fn writing(&self, yes: bool) {
        self.mark(|c| c.writing = yes);
    }

    fn mark(&self, change: impl FnOnce(&mut Conn)) {
        if let Some(c) = self.slots.open().conns.get_mut(&self.id) {
            let busy = c.in_service || c.writing;
            change(c);
            match (busy, c.in_service || c.writing) {
                (false, true) => c.waiting_since = None,
                (true, false) => c.waiting_since = Some(Instant::now()),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[tokio::test]
    async fn the_longest_waiting_connection_of_the_peer_makes_room() {
        let slots = Arc::new(Slots::default());
        let t0 = Instant::now();
        let mut held: Vec<Slot> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|i| {
                let (slot, how) = slots
                    .admit(ip(1), t0 + Duration::from_millis(i as u64))
                    .unwrap();
                assert_eq!(how, Admitted::Free);
                slot
            })
            .collect();
        // The oldest serves a request: the next oldest goes.
        held[0].handle().serving(true);
        let (new, how) = slots.admit(ip(1), t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(how, Admitted::Evicted);
        tokio::time::timeout(Duration::from_secs(1), held[1].evicted())
            .await
            .expect("the second connection was told to close");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), held[0].evicted())
                .await
                .is_err(),
            "a connection serving a request is never evicted"
        );
        // Another address is not in the way.
        assert_eq!(slots.admit(ip(2), t0).unwrap().1, Admitted::Free);
        // When every one of the peer's serves a request, the new one is refused.
        for s in held.iter().chain([&new]) {
            s.handle().serving(true);
        }
        assert!(slots.admit(ip(1), t0).is_none());
        // A place given back is free again.
        held.pop();
        assert_eq!(slots.admit(ip(1), t0).unwrap().1, Admitted::Free);
    }

    /// A connection whose answer its client is not taking goes only when none waits for a
    /// request: a large answer to a slow reader is not cut for a flood, and a client that
    /// reads nothing holds no place for good either.
    #[tokio::test]
    async fn a_connection_writing_an_answer_goes_after_the_waiting_ones() {
        let slots = Arc::new(Slots::default());
        let t0 = Instant::now();
        let held: Vec<Slot> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|_| slots.admit(ip(1), t0).unwrap().0)
            .collect();
        held[0].handle().writing(true);
        for s in &held[2..] {
            s.handle().serving(true);
        }
        // held[1] waits: it goes first.
        let (_a, how) = slots.admit(ip(1), t0).unwrap();
        assert_eq!(how, Admitted::Evicted);
        tokio::time::timeout(Duration::from_secs(1), held[1].evicted())
            .await
            .expect("the waiting one went");
        _a.handle().serving(true);
        // None waits now: the writing one goes.
        let (_b, how) = slots.admit(ip(1), t0).unwrap();
        assert_eq!(how, Admitted::Evicted);
        tokio::time::timeout(Duration::from_secs(1), held[0].evicted())
            .await
            .expect("the writing one went");
        _b.handle().serving(true);
        assert!(slots.admit(ip(1), t0).is_none(), "all serving");
    }

    #[test]
    fn every_place_serving_a_request_refuses_the_new_connection() {
        let slots = Arc::new(Slots::default());
        let t0 = Instant::now();
        let held: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|i| {
                let (slot, _) = slots.admit(ip((i % 200) as u8), t0).unwrap();
                slot.handle().serving(true);
                slot
            })
            .collect();
        assert!(slots.admit(ip(250), t0).is_none());
        // One goes back to waiting: it makes room.
        held[7].handle().serving(false);
        assert_eq!(slots.admit(ip(250), t0).unwrap().1, Admitted::Evicted);
        drop(held);
        assert_eq!(slots.open().conns.len(), 0, "every place given back");
    }
}
