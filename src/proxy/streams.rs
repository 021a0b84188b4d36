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

use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

/// The shares a connection may be granted below `h2_max_concurrent_streams`, largest
/// first; the last, one stream, is granted whatever is left.
pub const SMALLER_SHARES: [u32; 4] = [64, 16, 4, 1];

/// Streams not yet granted to a connection. Below zero by at most one a connection.
#[derive(Debug, Clone)]
pub struct StreamBudget(Arc<AtomicIsize>);

/// A connection's streams, given back to the budget when it is dropped.
#[derive(Debug)]
pub struct StreamShare {
    left: Arc<AtomicIsize>,
    taken: isize,
}

impl StreamBudget {
    pub fn new(total: usize) -> Self {
        Self(Arc::new(AtomicIsize::new(
            isize::try_from(total).unwrap_or(isize::MAX),
        )))
    }

    /// The first of `shares` (largest first, the last granted in any case) the budget has
    /// room for: its index and the share itself.
    pub fn grant(&self, shares: &[u32]) -> (usize, StreamShare) {
        for (i, &n) in shares.iter().enumerate() {
            let n = n as isize;
            let last = i + 1 == shares.len();
            let mut left = self.0.load(Ordering::Acquire);
            loop {
                if left < n && !last {
                    break;
                }
                match self.0.compare_exchange_weak(
                    left,
                    left - n,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        let share = StreamShare {
                            left: self.0.clone(),
                            taken: n,
                        };
                        return (i, share);
                    }
                    Err(now) => left = now,
                }
            }
        }
        unreachable!("the last share is always granted")
    }

    /// Streams not granted.
    #[cfg(test)]
    fn left(&self) -> isize {
        self.0.load(Ordering::Acquire)
    }
}

impl StreamShare {
    pub fn streams(&self) -> usize {
        self.taken as usize
    }
}

impl Drop for StreamShare {
    fn drop(&mut self) {
        self.left.fetch_add(self.taken, Ordering::AcqRel);
    }
}

/// What each connection may be granted: `full` (`h2_max_concurrent_streams`), then the
/// smaller shares below it.
pub fn shares(full: u32) -> Vec<u32> {
    std::iter::once(full)
        .chain(SMALLER_SHARES.into_iter().filter(|&n| n < full))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_shrink_as_the_budget_runs_low_and_come_back() {
        let shares = shares(256);
        assert_eq!(shares, [256, 64, 16, 4, 1]);
        let budget = StreamBudget::new(300);
        let (i, a) = budget.grant(&shares);
        assert_eq!((i, a.streams()), (0, 256));
        let (_, b) = budget.grant(&shares);
        assert_eq!(b.streams(), 16);
        let (_, c) = budget.grant(&shares);
        assert_eq!(c.streams(), 16);
        let (_, d) = budget.grant(&shares);
        assert_eq!(d.streams(), 4);
        let (_, e) = budget.grant(&shares);
        assert_eq!(e.streams(), 4);
        let (_, f) = budget.grant(&shares);
        assert_eq!(f.streams(), 4);
        assert_eq!(budget.left(), 0);
        // Nothing left: one stream all the same, past the budget.
        let (i, g) = budget.grant(&shares);
        assert_eq!((i, g.streams()), (4, 1));
        assert_eq!(budget.left(), -1);
        for share in [a, b, c, d, e, f, g] {
            drop(share);
        }
        assert_eq!(budget.left(), 300);
        assert_eq!(budget.grant(&shares).1.streams(), 256);
    }

    #[test]
    fn a_small_full_share_is_not_repeated() {
        assert_eq!(shares(16), [16, 4, 1]);
        assert_eq!(shares(1), [1]);
    }
}
