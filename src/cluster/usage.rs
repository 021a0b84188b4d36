//! Usage over the fleet (SPEC 14): each replica counts locally ([`Usage`], no Redis call on
//! the request path) and flushes what it counted since the last flush about once a second,
//! all keys in one call (one script: `HINCRBY` the counts, keep the latest last-used time).
//! `GET /v1/keys/usage` then reads the fleet's totals in one round trip and adds what this
//! replica has not flushed yet.
//!
//! A flush that times out may or may not have landed; it is sent again, so a count can be
//! over by one flush's worth after a Redis failure, never under.
//!
//! A Redis that comes back empty is refilled by the replicas, without double counting: the
//! count hash holds an epoch (field [`EPOCH_FIELD`], set by the first flush into an empty
//! hash), and every flush names the epoch this replica's counts were added under. When the
//! epoch differs (the hash is gone, or this replica has not flushed into it yet), the script
//! adds nothing and answers the epoch in force; the replica then sends its whole totals
//! (counts and last-used times) under it, once. Each replica re-adds only its own counts, so
//! the fleet's total is the sum of the replicas that are still there. A flush runs every
//! second even with nothing new to send, so an idle replica refills an empty Redis too.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::keys::usage::{report_entries, KeyUsage, Usage};
use crate::keys::{Snapshot, Text};

use super::metrics::Op;
use super::{Cluster, ClusterError};

pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// The count hash's field that holds its epoch: not a valid key id (`#`), so never a key's.
pub const EPOCH_FIELD: &str = "#epoch";

/// KEYS[1]: counts hash, KEYS[2]: last-used hash (ms). ARGV[1]: the epoch the counts were
/// added under, ARGV[2]: the epoch to start if the hash has none, ARGV[3]: the epoch field;
/// then id, delta, last_ms, ... Adds only under the epoch named; returns the one in force.
const FLUSH: &str = r"
-- A key of another type is not keyward's (every flush failed on it): replaced.
for _, k in ipairs(KEYS) do
  local kind = redis.call('TYPE', k).ok
  if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', k) end
end
-- The epoch is returned to keyward: one another writer left longer than any this script
-- makes (32 hex digits) is not sent back (nor read), but replaced.
if redis.call('HSTRLEN', KEYS[1], ARGV[3]) > 64 then redis.call('HDEL', KEYS[1], ARGV[3]) end
local epoch = redis.call('HGET', KEYS[1], ARGV[3])
if not epoch then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], ARGV[3], epoch)
end
if epoch ~= ARGV[1] then return epoch end
for i = 4, #ARGV, 3 do
  -- Any writer of a shared Redis can leave a count that would overflow, or is not a
  -- number: saturate the one, restart the other, and let the other keys' counts land.
  local added = redis.pcall('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  if type(added) == 'table' and added.err then
    if string.find(added.err, 'overflow') then
      redis.call('HSET', KEYS[1], ARGV[i], '9223372036854775807')
    else
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
  end
  local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[i]))
  -- NaN, or a time past year 9999, would never be replaced by a real one.
  if not cur or cur ~= cur or cur > 253402300799999 or cur < tonumber(ARGV[i + 2]) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  end
end
return epoch
";

/// Ids per call of a usage report ([`READ`]): each call is short for Redis and its reply
/// small to parse, however many keys the snapshot holds.
const READ_CHUNK: usize = 1000;

/// The longest value a report takes: a u64 count or time has at most 20 digits, an epoch
/// 32. A longer one (another writer's) is not sent.
const MAX_VALUE_BYTES: u32 = 64;

/// KEYS[1]: counts hash, KEYS[2]: last-used hash. ARGV[1]: the epoch field, ARGV[2]: the
/// longest value sent, then ids. Returns the epoch, then count and last-used time per id
/// (nil for none, or for a value longer than ARGV[2]: HSTRLEN first, so a huge one is not
/// even read).
const READ: &str = r"
local max = tonumber(ARGV[2])
local function get(h, f)
  -- A key of another type reads as none (the next flush replaces it).
  if redis.call('TYPE', h).ok ~= 'hash' then return false end
  if redis.call('HSTRLEN', h, f) > max then return false end
  return redis.call('HGET', h, f)
end
local out = {get(KEYS[1], ARGV[1])}
for i = 3, #ARGV do
  out[#out + 1] = get(KEYS[1], ARGV[i])
  out[#out + 1] = get(KEYS[2], ARGV[i])
end
return out
";

/// Flushes this replica's counts and reads the fleet's.
pub struct FleetUsage {
    cluster: Arc<Cluster>,
    /// The epoch of the count hash this replica's counts were added under, and per key id
    /// the request count already added to it.
    flushed: Mutex<Flushed>,
    script: redis::Script,
    read: redis::Script,
}

#[derive(Default)]
struct Flushed {
    epoch: String,
    counts: HashMap<Text, u64>,
    /// Keys counted here that the snapshot in force no longer has: their local counts are
    /// kept until a flush has sent all of them, then forgotten ([`FleetUsage::retain`]).
    leaving: std::collections::HashSet<Text>,
}

/// `(id, delta, last_ms)` to send: keys counted since their last flush.
fn pending(counts: &[(Text, u64, u64)], flushed: &HashMap<Text, u64>) -> Vec<(Text, u64, u64)> {
    counts
        .iter()
        .filter_map(|(id, last, n)| {
            let delta = n.saturating_sub(flushed.get(id).copied().unwrap_or(0));
            (delta > 0).then(|| (id.clone(), delta, *last))
        })
        .collect()
}

impl FleetUsage {
    pub fn new(cluster: &Arc<Cluster>) -> Self {
        Self {
            cluster: cluster.clone(),
            flushed: Mutex::new(Flushed::default()),
            script: redis::Script::new(FLUSH),
            read: redis::Script::new(READ),
        }
    }

    fn hashes(&self) -> (String, String) {
        (
            self.cluster.key("usage:count"),
            self.cluster.key("usage:last"),
        )
    }

    /// Keys that left `snapshot` keep their local counts until a flush has sent all of
    /// them, and are forgotten then ([`FleetUsage::sent`]): forgotten at once, what they
    /// counted since the last flush was lost, and a key put back before the next flush
    /// restarted at zero against its old flushed total, so nothing it counted after was
    /// sent either (reviews 30 and 33). Put back in time, a key simply goes on counting.
    pub fn retain(&self, usage: &Usage, snapshot: &Snapshot) {
        let mut flushed = self.lock();
        flushed.leaving = usage
            .counts()
            .into_iter()
            .map(|(id, _, _)| id)
            .filter(|id| snapshot.by_id(id).is_none())
            .collect();
    }

    /// Send what was counted since the last flush, in one call (two when Redis has a new
    /// epoch: the whole totals go again, under it). Returns the keys sent.
    pub async fn flush(&self, usage: &Usage) -> Result<usize, ClusterError> {
        let (epoch, todo) = self.todo(usage);
        let current = self.send(&epoch, &todo).await?;
        if current == epoch {
            self.sent(usage, &epoch, &todo);
            return Ok(todo.len());
        }
        // An empty Redis (or this replica's first flush): everything it counted, once.
        {
            let mut flushed = self.lock();
            flushed.epoch.clone_from(&current);
            flushed.counts.clear();
        }
        let (epoch, todo) = self.todo(usage);
        if self.send(&epoch, &todo).await? == epoch {
            self.sent(usage, &epoch, &todo);
            if !todo.is_empty() {
                tracing::info!(
                    keys = todo.len(),
                    "usage totals written to a new redis epoch"
                );
            }
        }
        Ok(todo.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Flushed> {
        self.flushed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch flushed under and what to send: keys counted since their last flush.
    fn todo(&self, usage: &Usage) -> (String, Vec<(Text, u64, u64)>) {
        let mut flushed = self.lock();
        let counts = usage.counts();
        // Keys no longer counted here: their flushed totals go too.
        let present: std::collections::HashSet<&Text> =
            counts.iter().map(|(id, _, _)| id).collect();
        flushed.counts.retain(|id, _| present.contains(id));
        (flushed.epoch.clone(), pending(&counts, &flushed.counts))
    }

    /// Record what `send` added under `epoch` (unless the epoch moved on meanwhile); keys
    /// that left the snapshot and have now sent all they counted are forgotten.
    fn sent(&self, usage: &Usage, epoch: &str, todo: &[(Text, u64, u64)]) {
        let mut flushed = self.lock();
        if flushed.epoch != epoch {
            return;
        }
        for (id, delta, _) in todo {
            *flushed.counts.entry(id.clone()).or_insert(0) += delta;
        }
        if flushed.leaving.is_empty() {
            return;
        }
        let done: Vec<Text> = usage
            .counts()
            .into_iter()
            .filter(|(id, _, n)| {
                flushed.leaving.contains(id) && flushed.counts.get(id).copied().unwrap_or(0) >= *n
            })
            .map(|(id, _, _)| id)
            .collect();
        for id in done {
            usage.forget(&id);
            flushed.counts.remove(&id);
            flushed.leaving.remove(&id);
        }
    }

    /// One script call: adds `todo` if Redis's epoch is `epoch`; returns Redis's epoch.
    async fn send(&self, epoch: &str, todo: &[(Text, u64, u64)]) -> Result<String, ClusterError> {
        let (count, last) = self.hashes();
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let script = &self.script;
        self.cluster
            .call(Op::UsageFlush, |mut c| async move {
                let mut inv = script.key(count);
                inv.key(last).arg(epoch).arg(fresh).arg(EPOCH_FIELD);
                for (id, delta, ms) in todo {
                    inv.arg(&**id).arg(*delta).arg(*ms);
                }
                inv.invoke_async::<String>(&mut c).await
            })
            .await
    }

    /// The fleet's usage: Redis totals plus what this replica has not flushed yet.
    ///
    /// Only the snapshot's keys are reported, so only their fields are read ([`READ`], in
    /// chunks of [`READ_CHUNK`] ids): what else the hashes hold (Redis may be shared; a
    /// million fields another writer left) costs nothing. Values are text parsed field by
    /// field: one another writer left costs that field, not the whole report.
    pub async fn report(
        &self,
        usage: &Usage,
        snapshot: Option<&Snapshot>,
    ) -> Result<Vec<KeyUsage>, ClusterError> {
        let Some(snapshot) = snapshot else {
            return Ok(Vec::new());
        };
        // What this replica has not flushed is read before Redis' totals: a flush landing
        // in between is then counted twice (over by one flush, for this report), where read
        // after, it was in neither and the report went backward (review 33).
        let (flushed_epoch, since_flush, all_local) = {
            let flushed = self.lock();
            let local = usage.counts();
            (
                flushed.epoch.clone(),
                pending(&local, &flushed.counts),
                pending(&local, &HashMap::new()),
            )
        };
        let (count, last) = self.hashes();
        let ids: Vec<&str> = snapshot.keys().map(|k| &*k.id).collect();
        let mut epoch = None;
        let mut merged: HashMap<String, (u64, u64)> = HashMap::new();
        for chunk in ids.chunks(READ_CHUNK) {
            let (count, last, read) = (&count, &last, &self.read);
            let reply: Vec<Option<String>> = self
                .cluster
                .call(Op::UsageRead, |mut c| async move {
                    let mut inv = read.key(count);
                    inv.key(last).arg(EPOCH_FIELD).arg(MAX_VALUE_BYTES);
                    for id in chunk {
                        inv.arg(*id);
                    }
                    inv.invoke_async(&mut c).await
                })
                .await?;
            let mut it = reply.into_iter();
            // The first chunk's epoch: a new one between chunks (Redis emptied meanwhile)
            // at worst counts this replica's unflushed requests once more.
            let first = it.next().flatten();
            epoch = epoch.or(Some(first));
            for id in chunk {
                let (n, ms) = (it.next().flatten(), it.next().flatten());
                if n.is_none() && ms.is_none() {
                    continue;
                }
                // Redis' totals are anyone's to write: a count that is no number (`-5`)
                // reads as none, and the key stays listed with its last use (it vanished
                // from the report, and its last use with it).
                let n = n.and_then(|v| v.parse().ok()).unwrap_or(0);
                let ms = ms.and_then(|v| v.parse().ok()).unwrap_or(0);
                merged.insert((*id).to_owned(), (ms, n));
            }
        }
        let epoch = epoch.flatten();
        let unflushed = if epoch.as_deref() == Some(flushed_epoch.as_str()) {
            since_flush
        } else {
            // Redis lost what this replica flushed (or has not had it yet): all of it.
            all_local
        };
        for (id, delta, ms) in unflushed {
            let e = merged.entry(id.to_string()).or_insert((0, 0));
            e.0 = e.0.max(ms);
            // Redis' totals are anyone's to write: saturate rather than wrap.
            e.1 = e.1.saturating_add(delta);
        }
        Ok(report_entries(
            Some(snapshot),
            merged.into_iter().map(|(id, (ms, n))| (id, ms, n)),
        ))
    }

    /// Flush every [`FLUSH_INTERVAL`] until `stop`, then once more: a flush is never cut
    /// half done (Redis would have counted what this replica would send again).
    pub async fn run(self: Arc<Self>, usage: &Usage, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            let last = tokio::select! {
                () = tokio::time::sleep(FLUSH_INTERVAL) => false,
                () = &mut stop => true,
            };
            if let Err(e) = self.flush(usage).await {
                tracing::debug!(error = %e, "usage flush failed; retried next time");
            }
            if last {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_was_counted_since_the_last_flush_is_sent() {
        let a = Text::for_test("a");
        let b = Text::for_test("b");
        let counts = vec![(a.clone(), 10, 5), (b.clone(), 20, 3)];
        let mut flushed = HashMap::new();
        flushed.insert(a.clone(), 5);
        flushed.insert(b.clone(), 3);
        assert!(pending(&counts, &flushed).is_empty());
        flushed.insert(a.clone(), 2);
        flushed.remove(&b);
        let got = pending(&counts, &flushed);
        assert_eq!(got, vec![(a, 3, 10), (b, 3, 20)]);
    }
}
