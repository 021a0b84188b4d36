//! Per-key rate limits (GCRA), state in a `DashMap` keyed by key id so it survives snapshot
//! reloads for unchanged keys and needs no global lock.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::keys::{Key, RateLimit, Snapshot, Text};

/// Outcome of a limited request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again (`RateLimit-Reset`).
    pub reset_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateDecision {
    Unlimited,
    Allowed(Quota),
    Limited { quota: Quota, retry_after_secs: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    limit: RateLimit,
    /// Theoretical arrival time, in nanoseconds since the limiter's epoch.
    tat: u128,
}

pub struct RateLimiter {
    epoch: Instant,
    cells: DashMap<Text, Cell>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            cells: DashMap::new(),
        }
    }
}

impl RateLimiter {
    pub fn check(&self, key: &Key, now: Instant) -> RateDecision {
        let Some(limit) = key.rate_limit() else {
            return RateDecision::Unlimited;
        };
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos();
        let interval = interval_ns(&limit);
        if interval == 0 {
            // More than one request a nanosecond: never limited. (Checked before the state:
            // with no tolerance at all, a thread that read the clock just before another
            // would find the state ahead of its `now` and be refused.)
            return RateDecision::Allowed(Quota {
                limit: limit.burst,
                remaining: limit.burst,
                reset_secs: 0,
            });
        }
        let tolerance = interval.saturating_mul(u128::from(limit.burst));
        let mut cell = self
            .cells
            .entry(key.id.clone())
            .or_insert(Cell { limit, tat: now_ns });
        if cell.limit != limit {
            // The key's limit changed in a reload: what it has spent stays spent, counted
            // in requests, whatever the new limit (as the shared limiter does). Starting
            // afresh, or keeping no more than the new burst, would hand a key being
            // throttled for abuse a fresh burst: at once, or once its limit is lowered and
            // put back. Kept as time instead, a slower rate would make the same time owed
            // fewer requests.
            let owed = cell.tat.saturating_sub(now_ns);
            cell.tat = now_ns.saturating_add(rescale(owed, interval_ns(&cell.limit), interval));
            cell.limit = limit;
        }
        let new_tat = cell.tat.max(now_ns).saturating_add(interval);
        let ahead = new_tat - now_ns;
        let secs = |ns: u128| {
            Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
                .as_secs_f64()
                .ceil() as u64
        };
        if ahead > tolerance {
            // Empty: the quota "resets" (holds a request again) when a retry would pass.
            let retry_after_secs = secs(ahead - tolerance).max(1);
            let quota = Quota {
                limit: limit.burst,
                remaining: 0,
                reset_secs: retry_after_secs,
            };
            return RateDecision::Limited {
                quota,
                retry_after_secs,
            };
        }
        cell.tat = new_tat;
        let remaining = u32::try_from((tolerance - ahead) / interval.max(1)).unwrap_or(u32::MAX);
        RateDecision::Allowed(Quota {
            limit: limit.burst,
            remaining,
            reset_secs: secs(ahead),
        })
    }

    /// Give back what [`check`](Self::check) charged for a request it allowed that was then
    /// not served (refused for another reason), so the key's budget holds only what it used.
    /// Under GCRA a charge moves the cell's time one interval on; moving it back is exact
    /// whatever came in between, and a time moved back past `now` is a full bucket, never
    /// more.
    pub fn refund(&self, key: &Key) {
        let Some(limit) = key.rate_limit() else {
            return;
        };
        let interval = interval_ns(&limit);
        if let Some(mut cell) = self.cells.get_mut(&key.id) {
            cell.tat = cell.tat.saturating_sub(interval);
        }
    }

    /// Drop state of keys no longer in the snapshot.
    pub fn retain(&self, snapshot: &Snapshot) {
        self.cells.retain(|id, _| snapshot.by_id(id).is_some());
    }
}

/// The emission interval in nanoseconds. `as` saturates (a huge rate gives 0); a vanishing
/// one is capped at ~584 years per request, which keeps every sum far from overflowing
/// (they saturate anyway).
fn interval_ns(limit: &RateLimit) -> u128 {
    ((1e9 / limit.per_second) as u128).min(u128::from(u64::MAX))
}

/// Time `owed` at one request per `from` ns, as the time the same number of requests takes
/// at one per `to` ns.
fn rescale(owed: u128, from: u128, to: u128) -> u128 {
    if owed == 0 || from == 0 {
        return 0;
    }
    // At most a burst of requests is owed: in floating point, saturating on the way back.
    (owed as f64 / from as f64 * to as f64) as u128
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::keys::Source;

    fn key(per_second: f64, burst: u32) -> Arc<Key> {
        let text = format!(
            "keys:\n  - {{ id: k1, sha256: {}, type: personal, subject_id: s, account_id: a, rate_limit: {{ per_second: {per_second}, burst: {burst} }} }}\n",
            "a".repeat(64)
        );
        Snapshot::parse(&text, Source::File)
            .unwrap()
            .by_id("k1")
            .unwrap()
            .clone()
    }

    #[test]
    fn a_refund_gives_back_one_request_and_never_more_than_a_burst() {
        let rl = RateLimiter::default();
        let k = key(1.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(matches!(rl.check(&k, t0), RateDecision::Allowed(_)));
        }
        assert!(matches!(rl.check(&k, t0), RateDecision::Limited { .. }));
        rl.refund(&k);
        assert!(matches!(rl.check(&k, t0), RateDecision::Allowed(q) if q.remaining == 0));
        assert!(matches!(rl.check(&k, t0), RateDecision::Limited { .. }));
        // Refunds past a full bucket add nothing: still a burst of 3.
        for _ in 0..10 {
            rl.refund(&k);
        }
        for _ in 0..3 {
            assert!(matches!(rl.check(&k, t0), RateDecision::Allowed(_)));
        }
        assert!(matches!(rl.check(&k, t0), RateDecision::Limited { .. }));
    }

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::default();
        let k = key(10.0, 5);
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(
                matches!(rl.check(&k, t0), RateDecision::Allowed(q) if q.remaining == 4 - i),
                "{i}"
            );
        }
        match rl.check(&k, t0) {
            RateDecision::Limited {
                retry_after_secs,
                quota,
            } => {
                assert_eq!(retry_after_secs, 1);
                assert_eq!(quota.remaining, 0);
            }
            d => panic!("{d:?}"),
        }
        // 100 ms later one token is back.
        assert!(matches!(
            rl.check(&k, t0 + Duration::from_millis(100)),
            RateDecision::Allowed(_)
        ));
        assert!(matches!(
            rl.check(&k, t0 + Duration::from_millis(100)),
            RateDecision::Limited { .. }
        ));
    }

    #[test]
    fn a_changed_limit_keeps_what_was_spent_and_unlimited_passes() {
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        let k = key(1.0, 1);
        assert!(matches!(rl.check(&k, t0), RateDecision::Allowed(_)));
        assert!(matches!(rl.check(&k, t0), RateDecision::Limited { .. }));
        let k2 = key(1.0, 2);
        assert!(matches!(rl.check(&k2, t0), RateDecision::Allowed(_)));
        // Tightened: what was spent stays spent (no fresh burst), in requests: the two
        // requests spent take 4 s to earn back at the new rate, and the new burst then
        // holds one.
        let k3 = key(0.5, 1);
        assert!(matches!(rl.check(&k3, t0), RateDecision::Limited { .. }));
        let t2 = t0 + Duration::from_secs(2);
        assert!(matches!(rl.check(&k3, t2), RateDecision::Limited { .. }));
        let t4 = t0 + Duration::from_secs(4);
        assert!(matches!(rl.check(&k3, t4), RateDecision::Allowed(_)));
        assert!(matches!(rl.check(&k3, t4), RateDecision::Limited { .. }));
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        let free = s.keys().next().unwrap();
        assert_eq!(rl.check(free, t0), RateDecision::Unlimited);
        rl.retain(&s);
        assert!(rl.cells.is_empty());
    }

    /// Review: a burst lowered and put back, or a rate lowered, handed an exhausted key a
    /// fresh burst (what was owed past the lower burst was dropped; the time owed at the old
    /// rate was worth fewer requests at the slower one).
    #[test]
    fn a_limit_lowered_and_put_back_hands_out_nothing() {
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        let six = key(0.01, 6);
        for _ in 0..6 {
            assert!(matches!(rl.check(&six, t0), RateDecision::Allowed(_)));
        }
        assert!(matches!(rl.check(&six, t0), RateDecision::Limited { .. }));
        assert!(matches!(
            rl.check(&key(0.01, 1), t0),
            RateDecision::Limited { .. }
        ));
        for _ in 0..3 {
            assert!(matches!(rl.check(&six, t0), RateDecision::Limited { .. }));
        }
        // 100 s later one request is earned back, as if the limit had never moved.
        let t100 = t0 + Duration::from_secs(100);
        assert!(matches!(rl.check(&six, t100), RateDecision::Allowed(q) if q.remaining == 0));
        assert!(matches!(rl.check(&six, t100), RateDecision::Limited { .. }));

        // A rate lowered from 1/s to 1/100 s: the 3 requests spent are owed at 100 s each.
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        let t100 = t0 + Duration::from_secs(100);
        let fast = key(1.0, 3);
        for _ in 0..3 {
            assert!(matches!(rl.check(&fast, t0), RateDecision::Allowed(_)));
        }
        let slow = key(0.01, 3);
        for _ in 0..3 {
            assert!(matches!(rl.check(&slow, t0), RateDecision::Limited { .. }));
        }
        assert!(matches!(rl.check(&slow, t100), RateDecision::Allowed(q) if q.remaining == 0));
        // Raised again, what is owed (3 requests, less 2 s at 100 s each) is earned back
        // at the faster rate: one request is free a second later.
        let t102 = t100 + Duration::from_secs(2);
        assert!(matches!(
            rl.check(&fast, t102),
            RateDecision::Limited { .. }
        ));
        let t103 = t102 + Duration::from_secs(1);
        assert!(matches!(rl.check(&fast, t103), RateDecision::Allowed(q) if q.remaining == 0));
    }

    #[test]
    fn extreme_rates_do_not_overflow() {
        // Regression: 1e9 / 1e-300 saturates to u128::MAX and `interval * burst` overflowed.
        let rl = RateLimiter::default();
        let t0 = Instant::now();
        let slow = key(1e-300, u32::MAX);
        for _ in 0..3 {
            assert!(matches!(rl.check(&slow, t0), RateDecision::Allowed(_)));
        }
        let rl = RateLimiter::default();
        let one = key(1e-300, 1);
        assert!(matches!(rl.check(&one, t0), RateDecision::Allowed(_)));
        match rl.check(&one, t0 + Duration::from_secs(3600)) {
            RateDecision::Limited {
                retry_after_secs, ..
            } => assert!(retry_after_secs > 1_000_000),
            d => panic!("{d:?}"),
        }
        // A rate above one per nanosecond never limits.
        let rl = RateLimiter::default();
        let fast = key(1e300, 1);
        for _ in 0..100 {
            assert!(matches!(rl.check(&fast, t0), RateDecision::Allowed(_)));
        }
    }

    #[test]
    fn concurrent_checks_allow_exactly_the_burst() {
        let rl = Arc::new(RateLimiter::default());
        let k = key(0.001, 50);
        let t0 = Instant::now();
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (rl, k) = (rl.clone(), k.clone());
                    s.spawn(move || {
                        (0..100)
                            .filter(|_| matches!(rl.check(&k, t0), RateDecision::Allowed(_)))
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 50);
    }

    #[test]
    fn state_survives_a_reload_that_keeps_the_key() {
        let rl = RateLimiter::default();
        let k = key(0.001, 1);
        let t0 = Instant::now();
        assert!(matches!(rl.check(&k, t0), RateDecision::Allowed(_)));
        // A new snapshot with the same key (same id, same limit) and another key.
        let text = format!(
            "version: 2\nkeys:\n  - {{ id: k1, sha256: {}, type: personal, subject_id: s, account_id: a, rate_limit: {{ per_second: 0.001, burst: 1 }} }}\n  - {{ id: k2, sha256: {}, type: personal, subject_id: s, account_id: a }}\n",
            "a".repeat(64),
            "b".repeat(64)
        );
        let next = Snapshot::parse(&text, Source::File).unwrap();
        rl.retain(&next);
        let reloaded = next.by_id("k1").unwrap();
        assert!(matches!(
            rl.check(reloaded, t0 + Duration::from_secs(1)),
            RateDecision::Limited { .. }
        ));
    }
}
