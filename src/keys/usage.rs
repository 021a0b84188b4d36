//! Last-used time and request count per key id (SPEC 5). Lives beside the snapshot, not in
//! it, so counts survive reloads. Each thread records into a shard of its own: a busy key
//! is used by every worker at once, and one counter written by all of them moved its cache
//! line between cores on every request. Readers (the admin API, the fleet's flush) merge
//! the shards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;

use super::{Snapshot, Text};

#[derive(Default)]
struct Counter {
    last_used_unix_ms: AtomicU64,
    requests: AtomicU64,
}

/// Shards, one per traffic thread while there are enough (keyward's are fewer than this
/// unless configured past it; then threads share shards, and stay correct).
const SHARDS: usize = 16;

/// Hashed with foldhash, not the standard SipHash: a request looks its key up once in a
/// shard, and SipHash (twice: the shard's lock, then its table) was about 1% of the
/// instructions of a proxied request. Ids come from the snapshot, not from clients.
type Shard = DashMap<Text, Counter, foldhash::fast::RandomState>;

pub struct Usage {
    shards: Box<[Shard]>,
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyUsage {
    pub key_id: String,
    /// RFC 3339, UTC.
    pub last_used: String,
    pub requests: u64,
}

impl Usage {
    /// Record one authenticated request into `shard` (the recording thread's own,
    /// [`crate::proxy::worker::Worker::index`]). The common case takes only a read lock of
    /// it, which no other thread takes.
    pub fn record(&self, id: &Text, now: SystemTime, shard: usize) {
        let ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let shard = &self.shards[shard % SHARDS];
        if let Some(c) = shard.get(id) {
            c.last_used_unix_ms.fetch_max(ms, Ordering::Relaxed);
            c.requests.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let c = shard.entry(id.clone()).or_default();
        c.last_used_unix_ms.fetch_max(ms, Ordering::Relaxed);
        c.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// When the key with this id was last used, and how many requests it made.
    pub fn last_used(&self, id: &str) -> Option<(SystemTime, u64)> {
        let (ms, requests) = self
            .shards
            .iter()
            .filter_map(|shard| {
                let c = shard.get(id)?;
                Some((
                    c.last_used_unix_ms.load(Ordering::Relaxed),
                    c.requests.load(Ordering::Relaxed),
                ))
            })
            .reduce(merge)?;
        let at = UNIX_EPOCH + std::time::Duration::from_millis(ms);
        Some((at, requests))
    }

    /// Forget keys that left the snapshot; the rest keep their history. Frees their
    /// entries; what is reported is filtered by `report` itself (a request that passed on
    /// the previous snapshot may record its key just after this runs).
    pub fn retain(&self, snapshot: &Snapshot) {
        for shard in self.shards.iter() {
            shard.retain(|id, _| snapshot.by_id(id).is_some());
        }
    }

    /// Forget one key's counts (the fleet's, once it has sent them all).
    pub fn forget(&self, id: &Text) {
        for shard in self.shards.iter() {
            shard.remove(id);
        }
    }

    /// Every key of `snapshot` (the one in force) used so far, ordered by id. Keys that left
    /// it are never reported, even in the moment between a swap and its `retain`, or when
    /// a request allowed by the previous snapshot recorded its key after that `retain`.
    pub fn report(&self, snapshot: Option<&Snapshot>) -> Vec<KeyUsage> {
        report_entries(
            snapshot,
            self.counts()
                .into_iter()
                .map(|(id, ms, requests)| (id.to_string(), ms, requests)),
        )
    }

    /// Every key's `(id, last used (ms since the epoch), requests)` counted here so far (the
    /// fleet's usage flush reads this), the shards merged.
    pub fn counts(&self) -> Vec<(Text, u64, u64)> {
        let mut merged: HashMap<Text, (u64, u64)> = HashMap::new();
        for shard in self.shards.iter() {
            for e in shard.iter() {
                let counted = (
                    e.last_used_unix_ms.load(Ordering::Relaxed),
                    e.requests.load(Ordering::Relaxed),
                );
                merged
                    .entry(e.key().clone())
                    .and_modify(|c| *c = merge(*c, counted))
                    .or_insert(counted);
            }
        }
        merged
            .into_iter()
            .map(|(id, (ms, requests))| (id, ms, requests))
            .collect()
    }

    /// How many keys have an entry (in any shard).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.counts().len()
    }
}

/// Two shards' counts of one key: the later use, and the requests of both.
fn merge(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0.max(b.0), a.1.saturating_add(b.1))
}

/// The last instant RFC 3339 can write (9999-12-31T23:59:59.999Z).
const LAST_RFC3339_MS: u64 = 253_402_300_799_999;

/// `t` as RFC 3339 with milliseconds, clamped to year 9999: a last-used time may come from
/// Redis, which any writer can fill, and `humantime` panics past that year.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let last = UNIX_EPOCH + std::time::Duration::from_millis(LAST_RFC3339_MS);
    humantime::format_rfc3339_millis(t.min(last)).to_string()
}

/// The report of `(id, last used ms, requests)` entries: only keys of `snapshot` (the one in
/// force), ordered by id.
pub fn report_entries(
    snapshot: Option<&Snapshot>,
    entries: impl Iterator<Item = (String, u64, u64)>,
) -> Vec<KeyUsage> {
    let Some(snapshot) = snapshot else {
        return Vec::new();
    };
    let mut out: Vec<KeyUsage> = entries
        .filter(|(id, _, _)| snapshot.by_id(id).is_some())
        .map(|(key_id, ms, requests)| {
            let t = UNIX_EPOCH + std::time::Duration::from_millis(ms);
            KeyUsage {
                key_id,
                last_used: rfc3339_millis(t),
                requests,
            }
        })
        .collect();
    out.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Source;

    #[test]
    fn counts_and_prunes() {
        let u = Usage::default();
        let a = Text::for_test("key_demo_service");
        let gone = Text::for_test("key_gone");
        let t = humantime::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        u.record(&a, t, 0);
        u.record(&a, t, 0);
        u.record(&gone, t, 0);
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        let r = u.report(Some(&s));
        assert_eq!(
            r.len(),
            1,
            "a key not in the snapshot in force is not reported"
        );
        assert_eq!(r[0].requests, 2);
        assert_eq!(r[0].last_used, "2026-01-01T00:00:00.000Z");
        assert_eq!(u.entries(), 2);
        u.retain(&s);
        assert_eq!(u.entries(), 1, "retain frees the entries of removed keys");
        // A request allowed by the previous snapshot records its key after the retain.
        u.record(&gone, t, 0);
        assert_eq!(u.report(Some(&s)).len(), 1);
        assert!(u.report(None).is_empty());
    }

    /// Threads record into shards of their own (and past 16, share); every reader sees them
    /// merged.
    #[test]
    fn counts_from_many_threads_are_merged() {
        let u = Usage::default();
        let a = Text::for_test("key_demo_service");
        let t0 = humantime::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        std::thread::scope(|scope| {
            for i in 0..20u64 {
                let (u, a) = (&u, &a);
                scope.spawn(move || {
                    for _ in 0..10 {
                        u.record(a, t0 + std::time::Duration::from_secs(i), i as usize);
                    }
                });
            }
        });
        let (at, requests) = u.last_used("key_demo_service").unwrap();
        assert_eq!(requests, 200);
        assert_eq!(at, t0 + std::time::Duration::from_secs(19));
        let counts = u.counts();
        assert_eq!(counts.len(), 1);
        assert_eq!((counts[0].1, counts[0].2), (1_767_225_619_000, 200));
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        assert_eq!(u.report(Some(&s))[0].requests, 200);
        assert_eq!(u.report(Some(&s))[0].last_used, "2026-01-01T00:00:19.000Z");
        assert!(u.last_used("key_other").is_none());
    }
}
