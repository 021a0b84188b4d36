//! The process's budget of HTTP/2 streams (`limits.h2_max_streams`), shared by every
//! connection of every listener.
//!
//! A stream costs memory from its HEADERS until its answer is written, whoever answers
//! it: hyper's task and request for it, and once answered the frames waiting in the h2
//! crate for a socket the client does not read. Neither `max_in_flight` (streams bound for
//! the upstream, until their body is handed over) nor the own answers' budget (until a
//! body is handed over) sees all of that, and `h2_max_concurrent_streams` bounds one
//! connection only: 100 connections of 256 refused streams each, whose client read nothing,
//! held 327 MB. So each HTTP/2 connection is granted its share of streams when it opens
//! (its `SETTINGS_MAX_CONCURRENT_STREAMS`), from this budget, and gives it back when it
//! ends: the streams the process holds are bounded by the budget plus one a connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The shares a connection may be granted below `h2_max_concurrent_streams`, largest
/// first; the last, one stream, is granted whatever is left.
pub const SMALLER_SHARES: [u32; 4] = [64, 16, 4, 1];

/// How long a connection's last request with a key that was let in keeps its share from
/// being taken back: between one and two of these (the budget counts time in generations of
/// this length, advanced only when it is short).
pub const PROOF_LASTS: Duration = Duration::from_secs(10);

/// An HTTP/2 connection holding a share, as the budget sees it when a new connection would
/// get less than a full one.
pub trait Holder: Send + Sync {
    /// The budget's generation in which it last carried a request with a key that was let
    /// in (at any door); 0: never; `u64::MAX` while it may not be taken from (a keyed
    /// answer in flight, or too new to have asked anything yet). One that has not in this
    /// generation or the one before gives its share to a new connection, never-proven ones
    /// and the oldest first: connections that carry no key cost a client nothing (twenty of
    /// them, idle or each holding one keyless answer they never read, left every other
    /// client one stream), and a key revoked or gone quiet must not keep what it held.
    fn proven_in(&self) -> u64;
    /// End it now, its streams with it: its share is taken back.
    fn evict(&self);
}

/// When a connection last carried a key that was let in, in the budget's generations: one
/// store a generation, no clock read a request.
#[derive(Debug)]
pub struct Proof {
    now: Arc<AtomicU64>,
    last: AtomicU64,
    /// Requests with a key let in whose answers are not done (a stream, a long poll): the
    /// connection carries a key as long as one is.
    keyed_in_flight: AtomicUsize,
}

impl Proof {
    /// A request with a key was let in on this connection.
    pub fn vouch(&self) {
        let now = self.now.load(Ordering::Relaxed);
        if self.last.load(Ordering::Relaxed) != now {
            self.last.store(now, Ordering::Relaxed);
        }
    }

    pub fn begin(&self) {
        self.keyed_in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end(&self) {
        self.keyed_in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// The generation the connection last carried a key in: the current one for good while
    /// a keyed answer is in flight (review: a keyed event stream older than 20 s was ended
    /// with its connection).
    pub fn last(&self) -> u64 {
        if self.keyed_in_flight.load(Ordering::Relaxed) > 0 {
            return u64::MAX;
        }
        self.last.load(Ordering::Relaxed)
    }
}

/// Streams not yet granted to a connection (below zero by at most one a connection), and
/// who holds the rest.
#[derive(Clone)]
pub struct StreamBudget(Arc<Inner>);

struct Inner {
    total: isize,
    /// The current generation ([`PROOF_LASTS`]); starts at 2, so that "never" (0) is two
    /// behind.
    generation: Arc<AtomicU64>,
    holders: Mutex<Holders>,
}

/// Everything a grant, a taking back or a giving back changes, under one lock: connections
/// open and close far less often than requests come, and none of this is read per request.
struct Holders {
    /// Streams not granted.
    left: isize,
    /// The next holder's id: ids are given in order, so the oldest holder has the lowest.
    next: u64,
    by_id: HashMap<u64, Held>,
    /// When the generation last moved.
    moved: Instant,
}

struct Held {
    holder: Weak<dyn Holder>,
    taken: isize,
}

impl std::fmt::Debug for StreamBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StreamBudget")
            .field(&self.holders().left)
            .finish()
    }
}

/// A connection's streams, given back to the budget when it is dropped (unless they were
/// taken back from it first).
#[derive(Debug)]
pub struct StreamShare {
    budget: StreamBudget,
    id: u64,
    taken: isize,
}

impl StreamBudget {
    pub fn new(total: usize) -> Self {
        let total = isize::try_from(total).unwrap_or(isize::MAX);
        Self(Arc::new(Inner {
            total,
            generation: Arc::new(AtomicU64::new(2)),
            holders: Mutex::new(Holders {
                left: total,
                next: 0,
                by_id: HashMap::new(),
                moved: Instant::now(),
            }),
        }))
    }

    /// A new connection's record of carrying keys, read when the budget is short.
    pub fn proof(&self) -> Proof {
        Proof {
            now: self.0.generation.clone(),
            last: AtomicU64::new(0),
            keyed_in_flight: AtomicUsize::new(0),
        }
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, Holders> {
        // Every change under the lock is one call: a panic elsewhere leaves it whole.
        self.0.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first of `shares` (largest first, the last granted in any case) the budget has
    /// room for, once shares of unproven connections are taken back when there is no room
    /// for the first: its index and the share itself, held for `holder`.
    pub fn grant(&self, shares: &[u32], holder: Weak<dyn Holder>) -> (usize, StreamShare) {
        // The largest share the whole budget holds: a budget smaller than a full share
        // never has room for one, and is not emptied trying.
        let want = shares
            .iter()
            .map(|&n| n as isize)
            .find(|&n| n <= self.0.total)
            .unwrap_or(1);
        // Under the lock from the taking back to the taking: what one new connection's
        // taking back freed goes to it, not to another one arriving at the same time.
        let mut holders = self.holders();
        if holders.left < want {
            self.take_back(want, &mut holders);
        }
        // The first share there is room for; the last whatever is left.
        let i = shares
            .iter()
            .position(|&n| n as isize <= holders.left)
            .unwrap_or(shares.len() - 1);
        let taken = shares[i] as isize;
        holders.left -= taken;
        let id = holders.next;
        holders.next += 1;
        holders.by_id.insert(id, Held { holder, taken });
        let share = StreamShare {
            budget: self.clone(),
            id,
            taken,
        };
        (i, share)
    }

    /// Take back the shares of connections that carried no key in this generation or the
    /// one before, never-proven and oldest first, until `want` is left or none is; each is
    /// ended.
    fn take_back(&self, want: isize, holders: &mut Holders) {
        let now = Instant::now();
        if now.duration_since(holders.moved) >= PROOF_LASTS {
            self.0.generation.fetch_add(1, Ordering::Relaxed);
            holders.moved = now;
        }
        let generation = self.0.generation.load(Ordering::Relaxed);
        // (generation last keyed, id): never-keyed first, then the oldest.
        let mut unproven: Vec<(u64, u64)> = holders
            .by_id
            .iter()
            .filter_map(|(&id, h)| {
                let proven_in = h.holder.upgrade()?.proven_in();
                (proven_in.saturating_add(2) <= generation).then_some((proven_in, id))
            })
            .collect();
        // Nobody is ended for nothing: only if what they hold makes up the room wanted.
        let freed: isize = unproven.iter().map(|(_, id)| holders.by_id[id].taken).sum();
        if holders.left + freed < want {
            return;
        }
        unproven.sort_unstable();
        for (_, id) in unproven {
            if holders.left >= want {
                break;
            }
            if let Some(held) = holders.by_id.remove(&id) {
                holders.left += held.taken;
                if let Some(h) = held.holder.upgrade() {
                    h.evict();
                }
            }
        }
    }

    /// Streams not granted.
    #[cfg(test)]
    fn left(&self) -> isize {
        self.holders().left
    }
}

impl StreamShare {
    pub fn streams(&self) -> usize {
        self.taken as usize
    }
}

impl Drop for StreamShare {
    fn drop(&mut self) {
        // Gone from the holders if its share was taken back: nothing to give then.
        let mut holders = self.budget.holders();
        if let Some(held) = holders.by_id.remove(&self.id) {
            holders.left += held.taken;
        }
    }
}

/// What each connection may be granted: `full` (`h2_max_concurrent_streams`), then the
/// smaller shares below it.
pub fn shares(full: u32) -> Vec<u32> {
    std::iter::once(full)
        .chain(SMALLER_SHARES.into_iter().filter(|&n| n < full))
        .collect()
}

/// A holder whose share is never taken back (tests, and connections no budget pressure
/// should end).
pub struct Keeps;

impl Holder for Keeps {
    fn proven_in(&self) -> u64 {
        u64::MAX
    }
    fn evict(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_shrink_as_the_budget_runs_low_and_come_back() {
        let shares = shares(256);
        assert_eq!(shares, [256, 64, 16, 4, 1]);
        let budget = StreamBudget::new(300);
        let keeps: Arc<dyn Holder> = Arc::new(Keeps);
        let grant = || budget.grant(&shares, Arc::downgrade(&keeps));
        let (i, a) = grant();
        assert_eq!((i, a.streams()), (0, 256));
        let (_, b) = grant();
        assert_eq!(b.streams(), 16);
        let (_, c) = grant();
        assert_eq!(c.streams(), 16);
        let (_, d) = grant();
        assert_eq!(d.streams(), 4);
        let (_, e) = grant();
        assert_eq!(e.streams(), 4);
        let (_, f) = grant();
        assert_eq!(f.streams(), 4);
        assert_eq!(budget.left(), 0);
        // Nothing left: one stream all the same, past the budget.
        let (i, g) = grant();
        assert_eq!((i, g.streams()), (4, 1));
        assert_eq!(budget.left(), -1);
        for share in [a, b, c, d, e, f, g] {
            drop(share);
        }
        assert_eq!(budget.left(), 300);
        assert_eq!(grant().1.streams(), 256);
    }

    struct Idle(std::sync::atomic::AtomicBool);

    impl Holder for Idle {
        fn proven_in(&self) -> u64 {
            0
        }
        fn evict(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Review: connections that never carried a key took every full share, and each new
    /// connection was offered one stream. The oldest unproven ones give theirs back, are
    /// ended, and give nothing twice when they go.
    #[test]
    fn unproven_connections_give_their_shares_back_oldest_first() {
        let shares = shares(256);
        let budget = StreamBudget::new(512);
        let idle: Vec<Arc<Idle>> = (0..2).map(|_| Arc::new(Idle(Default::default()))).collect();
        let held: Vec<StreamShare> = idle
            .iter()
            .map(|h| {
                let h: Arc<dyn Holder> = h.clone();
                budget.grant(&shares, Arc::downgrade(&h)).1
            })
            .collect();
        assert_eq!(budget.left(), 0);
        let keeps: Arc<dyn Holder> = Arc::new(Keeps);
        let (i, fresh) = budget.grant(&shares, Arc::downgrade(&keeps));
        assert_eq!((i, fresh.streams()), (0, 256));
        assert!(idle[0].0.load(Ordering::SeqCst), "the oldest is ended");
        assert!(!idle[1].0.load(Ordering::SeqCst));
        drop(held);
        drop(fresh);
        assert_eq!(budget.left(), 512);
    }

    struct Proven(AtomicU64);

    impl Holder for Proven {
        fn proven_in(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
        fn evict(&self) {
            self.0.store(u64::MAX, Ordering::SeqCst);
        }
    }

    /// Review: a connection that once carried a key kept its share for good, even once the
    /// key was revoked. It keeps it for one to two generations after its last key.
    #[test]
    fn a_connection_that_carried_a_key_keeps_its_share_only_while_it_does() {
        let shares = shares(256);
        let budget = StreamBudget::new(256);
        let proven = Arc::new(Proven(AtomicU64::new(2)));
        let holder: Arc<dyn Holder> = proven.clone();
        let _held = budget.grant(&shares, Arc::downgrade(&holder)).1;
        let keeps: Arc<dyn Holder> = Arc::new(Keeps);
        // A new connection's share, given back at once.
        let granted = || budget.grant(&shares, Arc::downgrade(&keeps)).1.streams();
        assert_eq!(granted(), 1, "proven this generation: kept");
        // As long ago as two generations: the next grant moves it one on.
        budget.holders().moved -= PROOF_LASTS * 2;
        assert_eq!(granted(), 1, "proven the generation before: kept");
        budget.holders().moved -= PROOF_LASTS;
        assert_eq!(granted(), 256, "two generations on: taken back");
        assert_eq!(proven.0.load(Ordering::SeqCst), u64::MAX, "and ended");
    }

    #[test]
    fn a_small_full_share_is_not_repeated() {
        assert_eq!(shares(16), [16, 4, 1]);
        assert_eq!(shares(1), [1]);
    }
}
