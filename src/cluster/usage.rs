//! Usage over the fleet (SPEC 14): each replica counts locally ([`Usage`], no Redis call on
//! the request path) and flushes what it counted since the last flush about once a second,
//! in one call while it counted at most [`FLUSH_CHUNK`] keys (one script: `HINCRBY` the
//! counts, keep the latest last-used time); more go as several calls, one after another.
//! `GET /v1/keys/usage` then reads the fleet's totals in one round trip and adds what this
//! replica has not had acknowledged yet.
//!
//! Flushes are idempotent. Each call is a batch with a sequence number of this replica's
//! (a random id per process); the script keeps the highest one applied
//! (`{prefix}usage:seq:{id}`) and applies a batch only once. A batch sent and not
//! acknowledged (an error, a timeout: it may have landed) is kept in flight and sent again
//! next time as it was, before anything newer. Before, it was sent again merged with newer
//! counts: a flush that timed out but landed was counted twice, and one slower than the
//! deadline (a whole-totals resend of a large snapshot) landed every second and always
//! timed out, so the fleet's counts climbed without bound while that script held Redis for
//! seconds. A report may still count a batch that landed but is not acknowledged twice
//! (never none of it): it adds what this replica has not had acknowledged.
//!
//! A Redis that comes back empty is refilled by the replicas, without double counting: the
//! count hash holds an epoch (field [`EPOCH_FIELD`], set by the first flush into an empty
//! hash), and every flush names the epoch this replica's counts were added under. When the
//! epoch differs (the hash is gone, or this replica has not flushed into it yet), the script
//! adds nothing and answers the epoch in force; the replica then drops its batch in flight
//! (it was not applied under the new epoch) and sends its whole totals (counts and
//! last-used times) under it, once. Each replica re-adds only its own counts, so the
//! fleet's total is the sum of the replicas that are still there. A flush runs every second
//! even with nothing new to send, so an idle replica refills an empty Redis too.

use std::collections::{HashMap, HashSet};
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

/// Keys per flush call. Redis runs one script at a time and this one costs about 4 µs a
/// key: 1000 keys hold Redis a few ms, so other clients' calls (every replica's rate-limit
/// checks above all, under a 50 ms `cluster.timeout`) wait no longer than that behind a
/// flush, and each call stays far inside the background deadline. A whole-totals resend of
/// 500k keys in one call held Redis for about 2 s and always timed out. Fewer keys than
/// this counted in a second (the usual case) still go in one call.
pub const FLUSH_CHUNK: usize = 1000;

/// How long Redis keeps a replica's highest applied sequence number after its last flush:
/// far longer than a batch waits to be sent again (a flush a second while Redis answers),
/// and a replica gone for good leaves no key behind for long.
const SEQ_TTL: Duration = Duration::from_secs(3600);

/// The longest mark the script reads (`{seq}:{tag}`: a u64 has at most 20 digits, the tag
/// 32 hex digits); a longer value (another writer's) reads as none.
const SEQ_MAX_BYTES: u32 = 64;

/// KEYS[1]: counts hash, KEYS[2]: last-used hash (ms), KEYS[3]: the highest sequence number
/// of this replica's applied. ARGV[1]: the epoch the counts were added under, ARGV[2]: the
/// epoch to start if the hash has none, ARGV[3]: the epoch field, ARGV[4]: this batch's
/// sequence number, ARGV[5]: KEYS[3]'s expiry (ms), ARGV[6]: the longest mark read,
/// ARGV[7]: this process's tag; then id, delta, last_ms, ... Adds only under the epoch
/// named, and only a batch numbered above KEYS[3]'s mark; returns the epoch in force.
const FLUSH: &str = r"
-- A key of another type is not keyward's (every flush failed on it): replaced.
for i = 1, 2 do
  local kind = redis.call('TYPE', KEYS[i]).ok
  if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[i]) end
end
local kind = redis.call('TYPE', KEYS[3]).ok
if kind ~= 'string' and kind ~= 'none' then redis.call('DEL', KEYS[3]) end
-- The epoch is returned to keyward: one another writer left longer than any this script
-- makes (32 hex digits) is not sent back (nor read), but replaced.
if redis.call('HSTRLEN', KEYS[1], ARGV[3]) > 64 then redis.call('HDEL', KEYS[1], ARGV[3]) end
local epoch = redis.call('HGET', KEYS[1], ARGV[3])
if not epoch then
  -- A new epoch: every replica sends its whole totals under it. Counts already in the
  -- hashes (their epoch field removed or replaced by another writer) would be counted
  -- twice: they go, as they would had Redis come back empty.
  if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then redis.call('UNLINK', KEYS[1], KEYS[2]) end
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], ARGV[3], epoch)
end
if epoch ~= ARGV[1] then return epoch end
-- A batch sent again (its answer was lost), or a copy of it delivered late, may have
-- landed: applied once, whatever this replica sent since. The mark is `{seq}:{tag}`, the
-- tag random per process: anything else another writer left there (`1e15`, hex, a bare
-- number, another tag) reads as none, or believed it held this replica's counts back for
-- good (review 36). Judging a mark by its number alone (one ahead of the batch read as
-- foreign) applied a late copy again once the replica had sent the next batch (review 38).
local done = 0
if redis.call('STRLEN', KEYS[3]) <= tonumber(ARGV[6]) then
  local seq, tag = string.match(redis.call('GET', KEYS[3]) or '', '^(%d+):(%x+)$')
  if seq and tag == ARGV[7] then done = tonumber(seq) end
end
if tonumber(ARGV[4]) <= done then
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
  return epoch
end
redis.call('SET', KEYS[3], ARGV[4] .. ':' .. ARGV[7], 'PX', ARGV[5])
for i = 8, #ARGV, 3 do
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
    /// This replica's id (random per process): names the key that holds its highest
    /// applied sequence number.
    replica: String,
    /// Marks that number as this process's (random per process, never logged): what
    /// another writer left in the key reads as no mark.
    tag: String,
    ledger: Mutex<Ledger>,
    script: redis::Script,
    read: redis::Script,
}

/// A key's `(id, delta, last_ms)` in a batch: requests to add, and its last use.
type Entry = (Text, u64, u64);

/// One flush call: entries added under `epoch`, applied once by their `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Batch {
    seq: u64,
    epoch: String,
    entries: Vec<Entry>,
}

/// What Redis's answer to a batch means for this replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ack {
    /// Applied (by this call or an earlier sending of the batch).
    Counted,
    /// Redis holds another epoch: nothing applied; the whole totals go under it.
    NewEpoch,
}

/// This replica's side of its flushes (no Redis here): what Redis acknowledged, and the
/// batch that may or may not have landed.
#[derive(Default)]
struct Ledger {
    /// The epoch of the count hash this replica's counts were added under.
    epoch: String,
    /// Per key id, the request count Redis acknowledged under `epoch`.
    acked: HashMap<Text, u64>,
    /// The batch sent and not acknowledged (a timeout, an error: it may have landed). Sent
    /// again as it is, before anything newer: its `seq` makes the script apply it once, and
    /// newer counts wait for later batches.
    in_flight: Option<Batch>,
    /// The last sequence number given to a batch.
    seq: u64,
    /// Keys counted here that the snapshot in force no longer has: their local counts are
    /// kept until Redis acknowledged all of them, then forgotten ([`FleetUsage::retain`]).
    leaving: HashSet<Text>,
}

/// `(id, delta, last_ms)` to send: keys counted (`(id, last_ms, requests)`) past `acked`.
fn pending(counts: &[(Text, u64, u64)], acked: &HashMap<Text, u64>) -> Vec<Entry> {
    counts
        .iter()
        .filter_map(|(id, last, n)| {
            let delta = n.saturating_sub(acked.get(id).copied().unwrap_or(0));
            (delta > 0).then(|| (id.clone(), delta, *last))
        })
        .collect()
}

impl Ledger {
    /// The entries of this flush's new batches: what `counts` holds past what Redis
    /// acknowledged, [`FLUSH_CHUNK`] keys a batch. With nothing to send, one empty batch if
    /// `ask` (a flush asks Redis's epoch every time, so an idle replica refills an empty
    /// Redis), else none. Only with no batch in flight: newer counts wait behind it.
    fn plan(&mut self, counts: &[(Text, u64, u64)], ask: bool) -> Vec<Vec<Entry>> {
        debug_assert!(self.in_flight.is_none());
        // Keys no longer counted here (forgotten): their acknowledged totals go too.
        let present: HashSet<&Text> = counts.iter().map(|(id, _, _)| id).collect();
        self.acked.retain(|id, _| present.contains(id));
        let todo = pending(counts, &self.acked);
        if todo.is_empty() {
            return if ask { vec![Vec::new()] } else { Vec::new() };
        }
        todo.chunks(FLUSH_CHUNK).map(<[Entry]>::to_vec).collect()
    }

    /// Number `entries` as the next batch under this epoch. It is in flight from now until
    /// acknowledged (an empty one has nothing to lose, and is not kept).
    fn start(&mut self, entries: Vec<Entry>) -> Batch {
        self.seq += 1;
        let batch = Batch {
            seq: self.seq,
            epoch: self.epoch.clone(),
            entries,
        };
        if !batch.entries.is_empty() {
            self.in_flight = Some(batch.clone());
        }
        batch
    }

    /// Redis answered `batch` with `epoch`, the one in force. Its own: applied, now or by an
    /// earlier sending. Another: nothing was applied, and what this replica had acknowledged
    /// was under an epoch Redis no longer has; its in-flight batch (never applied under the
    /// new epoch) is dropped, and its whole totals are to go under the new one.
    fn ack(&mut self, batch: &Batch, epoch: &str) -> Ack {
        if self.in_flight.as_ref().is_some_and(|b| b.seq == batch.seq) {
            self.in_flight = None;
        }
        if epoch == batch.epoch {
            if epoch == self.epoch {
                for (id, delta, _) in &batch.entries {
                    let n = self.acked.entry(id.clone()).or_insert(0);
                    *n = n.saturating_add(*delta);
                }
            }
            return Ack::Counted;
        }
        if epoch != self.epoch {
            self.epoch = epoch.to_owned();
            self.acked.clear();
            self.in_flight = None;
        }
        Ack::NewEpoch
    }

    /// Leaving keys whose every count (`counts`: `(id, last_ms, requests)`) Redis has
    /// acknowledged: dropped from the ledger, to be forgotten by [`Usage`].
    fn sent_all(&mut self, counts: &[(Text, u64, u64)]) -> Vec<Text> {
        let done: Vec<Text> = counts
            .iter()
            .filter(|(id, _, n)| {
                self.leaving.contains(id) && self.acked.get(id).copied().unwrap_or(0) >= *n
            })
            .map(|(id, _, _)| id.clone())
            .collect();
        for id in &done {
            self.acked.remove(id);
            self.leaving.remove(id);
        }
        done
    }
}

impl FleetUsage {
    pub fn new(cluster: &Arc<Cluster>) -> Self {
        Self {
            cluster: cluster.clone(),
            replica: uuid::Uuid::new_v4().simple().to_string(),
            tag: uuid::Uuid::new_v4().simple().to_string(),
            ledger: Mutex::new(Ledger::default()),
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

    /// Keys that left `snapshot` keep their local counts until Redis has acknowledged all
    /// of them, and are forgotten then ([`Ledger::sent_all`]): forgotten at once, what they
    /// counted since the last flush was lost, and a key put back before the next flush
    /// restarted at zero against its old flushed total, so nothing it counted after was
    /// sent either (reviews 30 and 33). Put back in time, a key simply goes on counting.
    pub fn retain(&self, usage: &Usage, snapshot: &Snapshot) {
        let mut ledger = self.lock();
        ledger.leaving = usage
            .counts()
            .into_iter()
            .map(|(id, _, _)| id)
            .filter(|id| snapshot.by_id(id).is_none())
            .collect();
    }

    /// Send the batch in flight, if any, then what was counted past what Redis
    /// acknowledged: one call, or one per [`FLUSH_CHUNK`] keys, one after another (Redis
    /// serves other clients between them). When Redis has a new epoch, the whole totals go
    /// under it, once. Stops at the first call that fails (its batch stays in flight).
    /// Returns the keys whose counts were applied.
    pub async fn flush(&self, usage: &Usage) -> Result<usize, ClusterError> {
        let sent = self.send_batches(usage).await;
        self.forget_sent(usage);
        sent
    }

    async fn send_batches(&self, usage: &Usage) -> Result<usize, ClusterError> {
        let mut keys = 0;
        let mut ack = Ack::Counted;
        let in_flight = self.lock().in_flight.clone();
        let asked = in_flight.is_some();
        if let Some(batch) = in_flight {
            ack = self.deliver(&batch).await?;
            if ack == Ack::Counted {
                keys += batch.entries.len();
            }
        }
        if ack == Ack::Counted {
            let (n, a) = self.send_new(usage, !asked).await?;
            keys += n;
            ack = a;
        }
        if ack == Ack::NewEpoch {
            // An empty Redis (or this replica's first flush): everything it counted, once.
            let (n, _) = self.send_new(usage, false).await?;
            keys += n;
            if n > 0 {
                tracing::info!(keys = n, "usage totals written to a new redis epoch");
            }
        }
        Ok(keys)
    }

    /// Send what was counted past what Redis acknowledged, batch after batch, until one
    /// finds a new epoch. Returns the keys applied and how the pass ended.
    async fn send_new(&self, usage: &Usage, ask: bool) -> Result<(usize, Ack), ClusterError> {
        let plan = self.lock().plan(&usage.counts(), ask);
        let mut keys = 0;
        for entries in plan {
            let batch = self.lock().start(entries);
            if self.deliver(&batch).await? == Ack::NewEpoch {
                return Ok((keys, Ack::NewEpoch));
            }
            keys += batch.entries.len();
        }
        Ok((keys, Ack::Counted))
    }

    /// One batch sent and its answer recorded; on failure it stays in flight.
    async fn deliver(&self, batch: &Batch) -> Result<Ack, ClusterError> {
        let epoch = self.send(batch).await?;
        Ok(self.lock().ack(batch, &epoch))
    }

    /// Keys that left the snapshot and have had all their counts acknowledged are forgotten.
    fn forget_sent(&self, usage: &Usage) {
        let mut ledger = self.lock();
        if ledger.leaving.is_empty() {
            return;
        }
        for id in ledger.sent_all(&usage.counts()) {
            usage.forget(&id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One script call: adds `batch` if Redis's epoch is its own and it was not applied
    /// before; returns Redis's epoch.
    async fn send(&self, batch: &Batch) -> Result<String, ClusterError> {
        let (count, last) = self.hashes();
        let seq_key = self.cluster.key(&format!("usage:seq:{}", self.replica));
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let ttl_ms = SEQ_TTL.as_millis() as u64;
        let (script, tag) = (&self.script, &self.tag);
        self.cluster
            .call(Op::UsageFlush, |mut c| async move {
                let mut inv = script.key(count);
                inv.key(last).key(seq_key);
                inv.arg(&batch.epoch).arg(fresh).arg(EPOCH_FIELD);
                inv.arg(batch.seq).arg(ttl_ms).arg(SEQ_MAX_BYTES).arg(tag);
                for (id, delta, ms) in &batch.entries {
                    inv.arg(&**id).arg(*delta).arg(*ms);
                }
                inv.invoke_async::<String>(&mut c).await
            })
            .await
    }

    /// The fleet's usage: Redis totals plus what Redis has not acknowledged of this
    /// replica's counts (the batch in flight included).
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
        // What Redis has not acknowledged is read before Redis' totals: a batch landing in
        // between (or one that landed with its answer lost) is then counted twice for this
        // report, where read after, it was in neither and the report went backward (review
        // 33).
        let (acked_epoch, unacked, all_local) = {
            let ledger = self.lock();
            let local = usage.counts();
            (
                ledger.epoch.clone(),
                pending(&local, &ledger.acked),
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
            // at worst counts this replica's unacknowledged requests once more.
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
        let unacked = if epoch.as_deref() == Some(acked_epoch.as_str()) {
            unacked
        } else {
            // Redis lost what this replica flushed (or has not had it yet): all of it.
            all_local
        };
        for (id, delta, ms) in unacked {
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

    /// Flush every [`FLUSH_INTERVAL`] until `stop`, then send what is left (a batch still
    /// in flight first), tried again every [`LAST_FLUSH_RETRY`] until it lands: the caller
    /// bounds how long. A flush running when `stop` comes is given up, not waited for: its
    /// batch stays in flight and is sent again first, applied once whether or not it had
    /// landed. (Waited for, a flush held by a Redis that stalled spent the whole shutdown
    /// budget; and a last flush tried once found the connection its timeout had closed, so
    /// a replica stopping just after Redis stalled lost what it counted since its last
    /// flush, review 36.)
    pub async fn run(self: Arc<Self>, usage: &Usage, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(FLUSH_INTERVAL) => {}
                () = &mut stop => break,
            }
            tokio::select! {
                r = self.flush(usage) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "usage flush failed; retried next time");
                    }
                }
                () = &mut stop => break,
            }
        }
        while let Err(e) = self.flush(usage).await {
            tracing::debug!(error = %e, "last usage flush failed; retrying");
            tokio::time::sleep(LAST_FLUSH_RETRY).await;
        }
    }
}

/// How often a stopping replica tries its last flush again (the connection a stalled
/// Redis lost is made again meanwhile).
const LAST_FLUSH_RETRY: Duration = Duration::from_millis(100);

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

    fn t(id: &str) -> Text {
        Text::for_test(id)
    }

    /// A ledger past its first flush: Redis's epoch `e1` known, nothing acknowledged.
    fn under_e1() -> Ledger {
        Ledger {
            epoch: "e1".into(),
            ..Ledger::default()
        }
    }

    #[test]
    fn a_batch_not_acknowledged_is_sent_again_as_it_was_before_anything_newer() {
        let mut l = under_e1();
        let [entries] = <[_; 1]>::try_from(l.plan(&[(t("a"), 10, 5)], true)).unwrap();
        let first = l.start(entries);
        assert_eq!((first.seq, first.epoch.as_str()), (1, "e1"));
        assert_eq!(first.entries, vec![(t("a"), 5, 10)]);
        // Timed out: it stays in flight, the same batch, whatever was counted since.
        assert_eq!(l.in_flight.as_ref(), Some(&first));
        let later = [(t("a"), 20, 8), (t("b"), 21, 1)];
        // Not acknowledged: a report adds all of it (a landed batch counts twice, not none).
        assert_eq!(pending(&later, &l.acked).len(), 2);
        assert_eq!(l.ack(&first, "e1"), Ack::Counted);
        assert!(l.in_flight.is_none());
        assert_eq!(l.acked.get(&t("a")), Some(&5));
        // Newer counts go in the next batch, numbered after it.
        let [entries] = <[_; 1]>::try_from(l.plan(&later, true)).unwrap();
        let next = l.start(entries);
        assert_eq!(next.seq, 2);
        let mut got = next.entries.clone();
        got.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        assert_eq!(got, vec![(t("a"), 3, 20), (t("b"), 1, 21)]);
    }

    #[test]
    fn batches_hold_at_most_a_chunk_and_an_idle_flush_asks_once() {
        let mut l = under_e1();
        let counts: Vec<_> = (0..2 * FLUSH_CHUNK + 1)
            .map(|i| (t(&format!("k{i}")), 1, 1))
            .collect();
        let plan = l.plan(&counts, true);
        let sizes: Vec<usize> = plan.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![FLUSH_CHUNK, FLUSH_CHUNK, 1]);
        for entries in plan {
            let b = l.start(entries);
            assert_eq!(l.ack(&b, "e1"), Ack::Counted);
        }
        assert_eq!(l.seq, 3);
        assert_eq!(l.plan(&counts, true), vec![Vec::new()]);
        assert!(l.plan(&counts, false).is_empty());
        // An empty batch has nothing to lose: not kept in flight.
        l.start(Vec::new());
        assert!(l.in_flight.is_none());
    }

    #[test]
    fn a_new_epoch_drops_the_batch_in_flight_and_sends_the_whole_totals() {
        let mut l = under_e1();
        let counts = [(t("a"), 10, 5), (t("b"), 11, 2)];
        for entries in l.plan(&counts, true) {
            let b = l.start(entries);
            l.ack(&b, "e1");
        }
        let more = [(t("a"), 30, 9), (t("b"), 11, 2)];
        let [entries] = <[_; 1]>::try_from(l.plan(&more, true)).unwrap();
        let lost = l.start(entries);
        // Sent again, it finds Redis emptied: nothing applied, the batch dropped.
        assert_eq!(l.ack(&lost, "e2"), Ack::NewEpoch);
        assert!(l.in_flight.is_none());
        assert_eq!(l.epoch, "e2");
        assert!(l.acked.is_empty());
        let [entries] = <[_; 1]>::try_from(l.plan(&more, false)).unwrap();
        let totals = l.start(entries);
        assert_eq!(totals.epoch, "e2");
        assert!(totals.seq > lost.seq);
        let mut got = totals.entries.clone();
        got.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        assert_eq!(got, vec![(t("a"), 9, 30), (t("b"), 2, 11)]);
    }

    #[test]
    fn a_leaving_key_is_forgotten_only_once_every_count_is_acknowledged() {
        let mut l = under_e1();
        let counts = [(t("gone"), 10, 4)];
        l.leaving.insert(t("gone"));
        let [entries] = <[_; 1]>::try_from(l.plan(&counts, true)).unwrap();
        let b = l.start(entries);
        // In flight (a timeout): not acknowledged, so kept.
        assert!(l.sent_all(&counts).is_empty());
        assert_eq!(l.ack(&b, "e1"), Ack::Counted);
        // Counted again (a request the previous snapshot let in) before the next flush.
        let again = [(t("gone"), 12, 5)];
        assert!(l.sent_all(&again).is_empty());
        assert_eq!(l.sent_all(&counts), vec![t("gone")]);
        assert!(l.leaving.is_empty() && l.acked.is_empty());
    }
}
