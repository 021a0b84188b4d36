//! Last-used time and request count per key id (SPEC 5). Lives beside the snapshot, not in
//! it, so counts survive reloads; updated with atomics under a `DashMap` shard read lock.

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

#[derive(Default)]
pub struct Usage {
    by_id: DashMap<Text, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyUsage {
    pub key_id: String,
    /// RFC 3339, UTC.
    pub last_used: String,
    pub requests: u64,
}

impl Usage {
    /// Record one authenticated request. The common case takes only a shard read lock.
    pub fn record(&self, id: &Text, now: SystemTime) {
        let ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Some(c) = self.by_id.get(id) {
            c.last_used_unix_ms.fetch_max(ms, Ordering::Relaxed);
            c.requests.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let c = self.by_id.entry(id.clone()).or_default();
        c.last_used_unix_ms.fetch_max(ms, Ordering::Relaxed);
        c.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// When the key with this id was last used, and how many requests it made.
    pub fn last_used(&self, id: &str) -> Option<(SystemTime, u64)> {
        let c = self.by_id.get(id)?;
        let ms = c.last_used_unix_ms.load(Ordering::Relaxed);
        let at = UNIX_EPOCH + std::time::Duration::from_millis(ms);
        Some((at, c.requests.load(Ordering::Relaxed)))
    }

    /// Forget keys that left the snapshot; the rest keep their history. Frees their
    /// entries; what is reported is filtered by `report` itself (a request that passed on
    /// the previous snapshot may record its key just after this runs).
    pub fn retain(&self, snapshot: &Snapshot) {
        self.by_id.retain(|id, _| snapshot.by_id(id).is_some());
    }

    /// Every key of `snapshot` (the one in force) used so far, ordered by id. Keys that left
    /// it are never reported, even in the moment between a swap and its `retain`, or when
    /// a request allowed by the previous snapshot recorded its key after that `retain`.
    pub fn report(&self, snapshot: Option<&Snapshot>) -> Vec<KeyUsage> {
        report_entries(
            snapshot,
            self.by_id.iter().map(|e| {
                (
                    e.key().to_string(),
                    e.last_used_unix_ms.load(Ordering::Relaxed),
                    e.requests.load(Ordering::Relaxed),
                )
            }),
        )
    }

    /// Every key's `(id, last used (ms since the epoch), requests)` counted here so far (the
    /// fleet's usage flush reads this).
    pub fn counts(&self) -> Vec<(Text, u64, u64)> {
        self.by_id
            .iter()
            .map(|e| {
                (
                    e.key().clone(),
                    e.last_used_unix_ms.load(Ordering::Relaxed),
                    e.requests.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
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
        u.record(&a, t);
        u.record(&a, t);
        u.record(&gone, t);
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        let r = u.report(Some(&s));
        assert_eq!(
            r.len(),
            1,
            "a key not in the snapshot in force is not reported"
        );
        assert_eq!(r[0].requests, 2);
        assert_eq!(r[0].last_used, "2026-01-01T00:00:00.000Z");
        assert_eq!(u.by_id.len(), 2);
        u.retain(&s);
        assert_eq!(u.by_id.len(), 1, "retain frees the entries of removed keys");
        // A request allowed by the previous snapshot records its key after the retain.
        u.record(&gone, t);
        assert_eq!(u.report(Some(&s)).len(), 1);
        assert!(u.report(None).is_empty());
    }
}
