//! Revocations shared by the fleet (SPEC 14): `POST /v1/keys/{id}/disable|enable` on any
//! replica, for any key source.
//!
//! A revocation names the key's id *and* digest (a key rotated under the same id is not
//! affected) and carries the time it was made. Redis holds one hash `{prefix}revocations`,
//! id → `at_us|disabled|digest-hex`; enabling writes a newer entry with `disabled = 0` (a
//! tombstone), and the newer entry always wins, in Redis (the write script) as here.
//!
//! Each replica holds the whole set in memory, swapped whole (`ArcSwap`): the request path
//! reads it without any Redis call. Changes arrive by pub/sub, and a full read every
//! [`FULL_READ_INTERVAL`] covers lost messages. Fail closed: until the set has been read
//! once, the replica is not ready and protected routes answer 503; a replica that loses
//! Redis keeps what it holds; entries Redis lacks (it came back empty) or holds older are
//! written back by every replica that holds them, so a restart un-revokes nothing and a
//! lifted revoke stays lifted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use tracing::{info, warn};

use crate::auth::{Decision, Reject};
use crate::keys::{Digest, Key};

use super::metrics::Op;
use super::{now_micros, Cluster, ClusterError};

/// The longest a lost pub/sub message can delay a revocation on a replica.
pub const FULL_READ_INTERVAL: Duration = Duration::from_millis(500);

/// A replica whose first read finds no revocation at all waits this long, reading again,
/// before it is ready: if Redis just came back empty, the replicas that hold the set write
/// it back within a full-read interval or two, and a newcomer must not serve before that.
pub const EMPTY_SET_SETTLE: Duration = Duration::from_millis(1200);

/// Store `ARGV[2]` under `ARGV[1]` unless Redis holds an entry at least as new
/// (`ARGV[3]`, µs), and publish it on `ARGV[4]`. Returns 1 when stored.
const WRITE: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local at = tonumber(string.match(cur, '^(%d+)|'))
  if at and at >= tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[1] .. '\n' .. ARGV[2])
return 1
";

/// One key id's latest revoke or enable.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub digest: Digest,
    pub disabled: bool,
    /// When it was made, µs since the epoch, by the clock of the replica that made it.
    pub at_us: u64,
}

/// The digest is left out: it never goes to a log.
impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("disabled", &self.disabled)
            .field("at_us", &self.at_us)
            .finish_non_exhaustive()
    }
}

impl Entry {
    fn encode(&self) -> String {
        format!(
            "{}|{}|{}",
            self.at_us,
            u8::from(self.disabled),
            hex::encode(self.digest)
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let mut parts = s.splitn(3, '|');
        let at_us = parts.next()?.parse().ok()?;
        let disabled = match parts.next()? {
            "1" => true,
            "0" => false,
            _ => return None,
        };
        let mut digest = [0u8; 32];
        hex::decode_to_slice(parts.next()?, &mut digest).ok()?;
        Some(Self {
            digest,
            disabled,
            at_us,
        })
    }

    /// Newer wins; at the same instant a revoke beats an enable (fail closed).
    fn supersedes(&self, other: &Entry) -> bool {
        (self.at_us, self.disabled) > (other.at_us, other.disabled)
    }
}

type Set = HashMap<Box<str>, Entry>;

/// The revocation set of this replica: the seam's local side is an empty set that is
/// always ready (no `cluster`); with Redis it is filled and kept in step as described above.
pub struct Revocations {
    cluster: Option<Arc<Cluster>>,
    set: ArcSwap<Set>,
    /// The set has been read from Redis at least once.
    loaded: AtomicBool,
    /// Serializes merges (copy, change, swap). Never held across an await.
    merging: Mutex<()>,
    /// When the first read found Redis without any revocation (see [`EMPTY_SET_SETTLE`]).
    empty_since: Mutex<Option<std::time::Instant>>,
    write: redis::Script,
}

/// Where a merged entry came from: only entries from another replica count in the lag.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Here,
    Remote,
    /// The first read: entries made long ago are not lag.
    Initial,
}

impl Revocations {
    pub fn new(cluster: Option<&Arc<Cluster>>) -> Self {
        Self {
            cluster: cluster.cloned(),
            set: ArcSwap::from_pointee(Set::new()),
            loaded: AtomicBool::new(false),
            merging: Mutex::new(()),
            empty_since: Mutex::new(None),
            write: redis::Script::new(WRITE),
        }
    }

    /// Shared revocations are on (`cluster` configured).
    pub fn is_shared(&self) -> bool {
        self.cluster.is_some()
    }

    /// Ready to decide: no cluster, or the set has been read once.
    pub fn is_ready(&self) -> bool {
        self.cluster.is_none() || self.loaded.load(Ordering::Acquire)
    }

    /// The key (this id with this digest) is revoked. One map lookup, no I/O.
    pub fn is_revoked(&self, key: &Key) -> bool {
        let set = self.set.load();
        !set.is_empty()
            && set
                .get(&*key.id)
                .is_some_and(|e| e.disabled && &e.digest == key.digest())
    }

    /// Apply the set to a decision: fail closed until it is read; a revoked key is
    /// refused as disabled, whatever else the decision said about it.
    pub fn overlay(&self, decision: Decision) -> Decision {
        if !self.is_ready() {
            return Decision::Deny(Reject::AuthUnavailable, None);
        }
        match decision {
            Decision::Allow(p) if self.is_revoked(&p.key) => {
                Decision::Deny(Reject::DisabledApiKey, Some(p.key))
            }
            Decision::Deny(_, Some(key)) if self.is_revoked(&key) => {
                Decision::Deny(Reject::DisabledApiKey, Some(key))
            }
            d => d,
        }
    }

    /// Revoke (`disabled`) or lift a revoke of `key`: applied here at once, then stored in
    /// Redis and published. If Redis cannot be reached the change still holds here, and the
    /// next full read that reaches Redis writes it there.
    pub async fn set(&self, key: &Key, disabled: bool) -> Result<Entry, ClusterError> {
        let previous = self.set.load().get(&*key.id).map_or(0, |e| e.at_us);
        let entry = Entry {
            digest: *key.digest(),
            disabled,
            at_us: now_micros().max(previous + 1),
        };
        self.merge([(Box::<str>::from(&*key.id), entry)], Origin::Here);
        let Some(cluster) = &self.cluster else {
            return Err(ClusterError::NotConnected);
        };
        self.store(cluster, &key.id, &entry).await?;
        info!(
            key_id = &*key.id,
            disabled, "revocation stored for the fleet"
        );
        Ok(entry)
    }

    async fn store(&self, cluster: &Cluster, id: &str, entry: &Entry) -> Result<(), ClusterError> {
        let (hash, channel) = (
            cluster.key("revocations"),
            cluster.key("revocations:events"),
        );
        let script = &self.write;
        let value = entry.encode();
        cluster
            .call(Op::Revoke, |mut c| async move {
                script
                    .key(hash)
                    .arg(id)
                    .arg(value)
                    .arg(entry.at_us)
                    .arg(channel)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|_| ())
    }

    /// Merge entries into the set (newer wins) and swap it if anything changed.
    fn merge(&self, entries: impl IntoIterator<Item = (Box<str>, Entry)>, origin: Origin) {
        let _guard = self.merging.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.set.load_full();
        let mut next: Option<Set> = None;
        let now = now_micros();
        for (id, entry) in entries {
            let set = next.as_ref().unwrap_or(&current);
            if set.get(&id).is_some_and(|cur| !entry.supersedes(cur)) {
                continue;
            }
            if origin == Origin::Remote {
                if let Some(c) = &self.cluster {
                    let lag = now.saturating_sub(entry.at_us) as f64 / 1e6;
                    c.metrics.revocation_lag.observe(lag);
                }
            }
            next.get_or_insert_with(|| (*current).clone())
                .insert(id, entry);
        }
        if let Some(next) = next {
            self.set.store(Arc::new(next));
        }
    }

    /// One pub/sub message: `id\nentry`.
    fn on_message(&self, payload: &str) {
        let Some((id, value)) = payload.split_once('\n') else {
            return;
        };
        if let Some(entry) = Entry::decode(value) {
            self.merge([(Box::<str>::from(id), entry)], Origin::Remote);
        }
    }

    /// Read the whole set from Redis, take what is newer there, write back what is newer
    /// here (Redis restarted empty, or a revoke made while it was unreachable).
    pub async fn sync(&self) -> Result<(), ClusterError> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let hash = cluster.key("revocations");
        let remote: HashMap<String, String> = cluster
            .call(Op::ReadRevocations, |mut c| async move {
                redis::cmd("HGETALL").arg(hash).query_async(&mut c).await
            })
            .await?;
        let remote: Set = remote
            .into_iter()
            .filter_map(|(id, v)| Some((id.into_boxed_str(), Entry::decode(&v)?)))
            .collect();
        let origin = if self.loaded.load(Ordering::Acquire) {
            Origin::Remote
        } else {
            Origin::Initial
        };
        self.merge(remote.iter().map(|(k, v)| (k.clone(), *v)), origin);
        if origin == Origin::Initial && self.settling(remote.is_empty()) {
            return Ok(());
        }
        self.loaded.store(true, Ordering::Release);
        let ours = self.set.load_full();
        for (id, entry) in ours.iter() {
            if remote.get(id).is_none_or(|r| entry.supersedes(r)) {
                self.store(cluster, id, entry).await?;
                info!(key_id = &**id, "revocation written back to redis");
            }
        }
        Ok(())
    }

    /// Before the first complete read: true while an empty set has been seen for less
    /// than [`EMPTY_SET_SETTLE`].
    fn settling(&self, empty: bool) -> bool {
        let mut since = self.empty_since.lock().unwrap_or_else(|e| e.into_inner());
        if !empty {
            return false;
        }
        let first = *since.get_or_insert_with(std::time::Instant::now);
        first.elapsed() < EMPTY_SET_SETTLE
    }

    /// Full reads every [`FULL_READ_INTERVAL`], for the life of the process.
    pub async fn run_sync(self: Arc<Self>) {
        loop {
            if let Err(e) = self.sync().await {
                tracing::debug!(error = %e, "revocation read failed; keeping the set held");
            }
            // Not ready until the first read: try again soon.
            let wait = if self.loaded.load(Ordering::Acquire) {
                FULL_READ_INTERVAL
            } else {
                Duration::from_millis(50)
            };
            match &self.cluster {
                Some(c) => {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = c.back.notified() => {}
                    }
                }
                None => return,
            }
        }
    }

    /// Subscribe to changes, resubscribing whenever the connection drops.
    pub async fn run_subscriber(self: Arc<Self>) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let channel = cluster.key("revocations:events");
        loop {
            match cluster.pubsub().await {
                Ok(mut ps) => match ps.subscribe(&channel).await {
                    Ok(()) => {
                        let mut messages = ps.on_message();
                        while let Some(msg) = messages.next().await {
                            if let Ok(payload) = msg.get_payload::<String>() {
                                self.on_message(&payload);
                            }
                        }
                        warn!("revocation subscription lost; resubscribing");
                    }
                    Err(e) => {
                        cluster.metrics.error(Op::Subscribe);
                        tracing::debug!(error = %e, "subscribe failed");
                    }
                },
                Err(e) => {
                    cluster.metrics.error(Op::Subscribe);
                    tracing::debug!(error = %e, "pub/sub connect failed");
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_us: u64, disabled: bool, d: u8) -> Entry {
        Entry {
            digest: [d; 32],
            disabled,
            at_us,
        }
    }

    #[test]
    fn entries_round_trip_and_bad_ones_are_dropped() {
        let e = entry(1_765_000_000_000_123, true, 0xcd);
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert!(!format!("{e:?}").contains("cd"), "no digest in Debug");
        for bad in [
            "",
            "1|1",
            "x|1|00",
            "1|2|00",
            "1|1|zz",
            &format!("1|1|{}", "0".repeat(62)),
        ] {
            assert_eq!(Entry::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn newer_wins_and_a_tie_fails_closed() {
        assert!(entry(2, false, 1).supersedes(&entry(1, true, 1)));
        assert!(!entry(1, true, 1).supersedes(&entry(2, false, 1)));
        assert!(entry(5, true, 1).supersedes(&entry(5, false, 1)));
        assert!(!entry(5, false, 1).supersedes(&entry(5, true, 1)));
    }

    #[test]
    fn merge_keeps_the_newer_entry_and_a_rotated_key_is_not_revoked() {
        let r = Revocations::new(None);
        r.merge([("k".into(), entry(10, true, 1))], Origin::Here);
        r.merge([("k".into(), entry(5, false, 1))], Origin::Remote);
        assert!(r.set.load()["k"].disabled, "an older enable loses");
        r.merge([("k".into(), entry(20, false, 1))], Origin::Remote);
        assert!(!r.set.load()["k"].disabled, "a newer enable wins");
        let text = format!(
            "keys:\n  - {{ id: k, sha256: {}, type: personal, subject_id: s, account_id: a }}\n",
            "02".repeat(32)
        );
        let s = crate::keys::Snapshot::parse(&text, crate::keys::Source::File).unwrap();
        let key = s.by_id("k").unwrap();
        r.merge([("k".into(), entry(30, true, 1))], Origin::Remote);
        assert!(!r.is_revoked(key), "revoked digest 01.., key now has 02..");
        r.merge([("k".into(), entry(40, true, 2))], Origin::Remote);
        assert!(r.is_revoked(key));
        assert!(
            r.is_ready(),
            "without a cluster the (empty) set is always ready"
        );
    }
}
