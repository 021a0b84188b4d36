//! Revocations shared by the fleet (SPEC 14): `POST /v1/keys/{id}/disable|enable` on any
//! replica, for any key source.
//!
//! A revocation is scoped to the secret: it names the key's digest (and, for people, the id
//! it was made through) and carries the time it was made. The digest is refused whatever id
//! carries it, now or in a later snapshot; a key rotated to a new secret under the same id
//! is not affected. Redis holds one hash `{prefix}revocations`, digest-hex →
//! `at_us|disabled|id`; enabling (through any id that carries the digest) writes a newer
//! entry with `disabled = 0` (a tombstone), and the newer entry always wins, in Redis (the
//! write script) as here. One entry per digest: a second revoke through the same id after a
//! rotation adds an entry, it does not replace the first.
//!
//! Each replica holds the whole set in memory, swapped whole (`ArcSwap`): the request path
//! reads it without any Redis call. Changes arrive by pub/sub. Every write also moves the
//! hash's [`VERSION`] field, which each replica reads every [`FULL_READ_INTERVAL`]: the set
//! is read whole only when it moved (a message may have been lost), when Redis came back, or
//! at least every [`FULL_READ_EVERY`] (a field changed by hand). So a fleet with a large set
//! reads one field per interval, not the set. A message that lifts a revoke is only a hint:
//! the lift believed is the one read back from the hash. Fail closed: until the set has been read
//! once, the replica is not ready and protected routes answer 503; a replica that loses
//! Redis keeps what it holds; entries Redis lacks (it came back empty) or holds older are
//! written back by every replica that holds them, so a restart un-revokes nothing and a
//! lifted revoke stays lifted.
//!
//! A replica writes back its whole set in one script call ([`WRITE`]), together with the field
//! [`WHOLE`]: so the hash either lacks that field (Redis came back empty and no replica has
//! restored it yet, or a fleet that has never revoked anything) or holds at least one
//! replica's whole set. A newcomer is ready at once only in the second case; in the first it
//! reads again for [`RESTORE_SETTLE`], long enough for every live replica to write back, so
//! it never serves from half a restore (a revoke missing, or one replica's stale entry not
//! yet overwritten by another's newer one).
//!
//! Bounded: the hash is read only up to [`MAX_FIELDS`], and anyone who can write it can
//! fill it with junk. A replica holds the entries of keys in its snapshot, and others (a
//! revoke of a key another replica's or a later snapshot holds; junk) only up to
//! [`MAX_HELD`]. It is behind only when Redis lacks or holds older an entry of its
//! snapshot's keys (so junk held calls for no write-back, and a value it cannot read is not
//! "lacking"); a write-back stores those always and the others only below
//! [`MOST_WRITTEN_BACK`], so a fleet restores what it holds after Redis came back empty
//! without putting the hash past what its newcomers read. A new snapshot calls for a full
//! read at once, for what the bound left out. A write that stores nothing moves no version.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use tracing::{info, warn};

use crate::auth::{Decision, Reject};
use crate::keys::{Digest, Key, KeyStore};

use super::bounded::{BoundedRead, Field};
use super::metrics::Op;
use super::{now_micros, Cluster, ClusterError};

/// The longest a lost pub/sub message can delay a revocation on a replica.
pub const FULL_READ_INTERVAL: Duration = Duration::from_millis(500);

/// The wait before a read is tried again after `failures` in a row: 50 ms, doubling, up to
/// [`FULL_READ_INTERVAL`].
fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(8);
    Duration::from_millis(50)
        .saturating_mul(1 << doublings)
        .min(FULL_READ_INTERVAL)
}

/// A replica whose first read finds the hash without [`WHOLE`] reads again for this long
/// before it is ready: if Redis just came back empty, every live replica writes its set back
/// within a full-read interval or two (sooner when its connection comes back), and a
/// newcomer must not serve before that.
pub const RESTORE_SETTLE: Duration = Duration::from_millis(1200);

/// The hash field that says a replica's whole set has been written (not a digest: every
/// digest field is 64 hex digits, so it can never collide with one).
pub const WHOLE: &str = "whole";

/// The hash field every write moves: `epoch.count`, the epoch taken from Redis's clock when
/// the field is first written, so a hash that came back empty and was written again never
/// repeats a version a replica saw before.
pub const VERSION: &str = "version";

/// A full read at least this often, whatever the version says: a field deleted or written
/// by hand, not through the write script, is seen (and written back) within this. A count
/// that moved is seen at the next poll ([`Revocations::unchanged`]); an edit that keeps
/// the count (a revoke deleted and a junk field added) only by a full read, so a small
/// hash, cheap to read, is read whole more often: [`full_read_every`].
pub const FULL_READ_EVERY: Duration = Duration::from_secs(30);

/// The longest between full reads of a hash of `fields` fields: 2 s, and 10 ms more per
/// field, up to [`FULL_READ_EVERY`] (a hash of a hundred revokes, one short page, every
/// 3 s; one of 2,800 or more every 30 s). A replica started while such an edit stood let
/// the revoked key in until a full read wrote it back (~25 s in a review).
pub fn full_read_every(fields: Option<u64>) -> Duration {
    let Some(fields) = fields else {
        return FULL_READ_EVERY;
    };
    Duration::from_secs(2)
        .saturating_add(
            Duration::from_millis(10).saturating_mul(u32::try_from(fields).unwrap_or(u32::MAX)),
        )
        .min(FULL_READ_EVERY)
}

/// The most fields a full read takes: past it the hash is not read (HLEN, one O(1) call,
/// decides), the set held stays, and the refusal is counted (`op="oversize"`) and said
/// once. Every field is an operator's revoke or lift of one secret through the API, so a
/// real fleet stays far below; the bound is there because Redis may be shared and the hash
/// is anyone's to write: a million junk fields read whole took ~170 ms of Redis (stalling
/// every replica's rate-limit calls past `cluster.timeout`) and ~400 MB here. At the bound a
/// read is [`PAGE`]-field pages of at most `64 + MAX_ENTRY_BYTES` bytes each: ~22 MB in all.
pub const MAX_FIELDS: u64 = 100_000;

/// Fields per page of a full read: each page is a short call for Redis (other clients'
/// calls, the rate limits among them, run between pages) and a short parse here, on the
/// runtime that also accepts the traffic listeners' connections.
const PAGE: u32 = 1000;

/// The longest entry value a read returns: `at_us|disabled|id`, with a u64 stamp and a key
/// id of at most 128 bytes, is at most 151. Longer values (not keyward's) are left in Redis
/// by the page script, so one huge value cannot make a huge reply.
const MAX_ENTRY_BYTES: usize = 160;

/// The longest [`VERSION`] read: the script writes `epoch.count`, 16 digits, a dot and a
/// count, well within this. A longer one (not keyward's) is not sent (see
/// [`super::bounded`]): it counts as a version of its own, and the script's next write
/// replaces it.
const MAX_VERSION_BYTES: usize = 64;

/// The longest pub/sub message parsed: `digest-hex\nentry`. Anyone who can reach Redis can
/// publish; a longer message is counted (`op="oversize"`) and dropped unread.
const MAX_MESSAGE_BYTES: usize = 64 + 1 + MAX_ENTRY_BYTES;

/// One page of a full read: `HSCAN` from cursor `ARGV[1]` (`COUNT` `ARGV[2]`), returning
/// the next cursor, how many fields the page held, then field, value, ... for the fields
/// of at most 64 bytes whose value is at most `ARGV[3]` bytes (digests, [`WHOLE`],
/// [`VERSION`]); the others are not sent.
const PAGE_READ: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return {'0', 0} end
local r = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local items = r[2]
local max = tonumber(ARGV[3])
local out = {r[1], #items / 2}
for i = 1, #items, 2 do
  if #items[i] <= 64 and #items[i + 1] <= max then
    out[#out + 1] = items[i]
    out[#out + 1] = items[i + 1]
  end
end
return out
";

/// Store entries, each (digest `ARGV[i]`, `disabled|id` `ARGV[i+1]`, µs `ARGV[i+2]`) from
/// `ARGV[6]` on, and publish each stored one on `ARGV[1]`. Time is Redis's (`TIME`), never
/// a replica's: an entry Redis holds stamped more than `ARGV[3]` µs past Redis's now counts
/// as none. With `ARGV[2]` = `1` (a replica's whole set, written back) an entry is stored
/// only if Redis holds none at least as new (and is not itself stamped past belief), and
/// the field [`WHOLE`] is set too, atomically with them; either way, if anything was
/// written, [`VERSION`] moves. With `0` (one revoke or lift an operator just made) it is
/// always stored, stamped with Redis's now, or just after the entry Redis holds if that
/// one is newer: whatever the clock of the replica it was made on, an operator's latest
/// change is the latest. With `2` (an operator's change made while Redis could not be
/// reached, stored late) it keeps the stamp it was made with (never past Redis's now) and
/// is stored only if Redis holds nothing newer: stamped at its late arrival, an older lift
/// undid a revoke made after it on another replica. A publish Redis refuses (an ACL
/// without the channel) does not undo the write (scripts do not roll back: the entry was
/// stored, the version not moved, and the change retried, re-stamped, for ever): readers
/// learn of it from the version. A key of another type there is not keyward's (the reads take it
/// for an empty hash): it is replaced. Of a whole set, the first `ARGV[5]` entries (the
/// snapshot's keys') are always taken; the others add no field once the hash holds
/// `ARGV[4]` (readers refuse a hash past [`MAX_FIELDS`]); an operator's change always is.
/// Returns how many were stored, the last one's stamp, Redis's now (µs), how many new
/// fields were left out for the bound and how many stored could not be published.
const WRITE: &str = r"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
local mode = string.sub(ARGV[2], 1, 1)
local whole = mode == '1'
local grace = tonumber(string.match(ARGV[2], '^0 (%d+)$') or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local latest = now + tonumber(ARGV[3])
local most = tonumber(ARGV[4])
local known = tonumber(ARGV[5])
local stored, last, left, unpublished = 0, 0, 0, 0
for i = 6, #ARGV, 3 do
  local at = tonumber(ARGV[i + 2])
  local revoke = string.sub(ARGV[i + 1], 1, 2) == '1|'
  -- An operator's change: stamped after what Redis holds (bump), or kept with its stamp
  -- and stored only if newer (late).
  local late = mode == '2' or mode == '3' or (mode == '0' and grace > 0 and now > at + grace)
  local bump = not whole and not late
  local take = true
  if mode == '0' and not late then at = now end
  if late and (mode == '3' or at > now) then
    -- A stamp no learned clock vouches for: a revoke is stored as of now (failing
    -- closed), a lift not at all.
    if revoke then
      at = now
      bump = true
    else
      take = false
    end
  end
  -- A value past MAX_ENTRY_BYTES (160) is not keyward's: counted as none, and replaced,
  -- without copying it into the script.
  local cur = false
  if redis.call('HSTRLEN', KEYS[1], ARGV[i]) <= 160 then cur = redis.call('HGET', KEYS[1], ARGV[i]) end
  local cur_at = cur and tonumber(string.match(cur, '^(%d+)|'))
  if cur_at and cur_at > latest then cur_at = nil end
  if whole and at > latest then
    -- Stamped past belief (a clock that stepped back since): a revoke is stored as of now
    -- (failing closed), a lift not at all.
    if string.sub(ARGV[i + 1], 1, 2) == '1|' then at = now else take = false end
  end
  if take and cur_at and cur_at >= at then
    if bump then at = cur_at + 1 else take = false end
  end
  if take and whole and (i - 6) / 3 >= known and redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 and redis.call('HLEN', KEYS[1]) >= most then
    take = false
    left = left + 1
  end
  if take then
    local entry = string.format('%d', at) .. '|' .. ARGV[i + 1]
    redis.call('HSET', KEYS[1], ARGV[i], entry)
    if type(redis.pcall('PUBLISH', ARGV[1], ARGV[i] .. '\n' .. entry)) == 'table' then
      unpublished = unpublished + 1
    end
    stored = stored + 1
    last = at
  end
end
if whole then redis.call('HSET', KEYS[1], 'whole', '1') end
if stored > 0 then
  -- Past MAX_VERSION_BYTES (64) it is not keyward's: a new epoch replaces it.
  local v = false
  if redis.call('HSTRLEN', KEYS[1], 'version') <= 64 then v = redis.call('HGET', KEYS[1], 'version') end
  local epoch, count = nil, 0
  if v then epoch, count = string.match(v, '^(%d+)%.(%d+)$') end
  if not epoch then
    local t = redis.call('TIME')
    epoch, count = t[1] .. string.format('%06d', tonumber(t[2])), 0
  end
  redis.call('HSET', KEYS[1], 'version', epoch .. '.' .. string.format('%d', tonumber(count) + 1))
end
return {stored, last, now, left, unpublished}
";

/// An operator's change Redis has not stored yet.
struct Pending {
    entry: Entry,
    /// Redis's clock was known when it was made: its stamp can be compared.
    trusted: bool,
    /// Its own write is still on its way: the periodic flush leaves it be (a second copy
    /// sent late was dropped as older than the first, and the change forgotten here).
    sending: bool,
}

/// Marks a change's own write over when dropped ([`Revocations::sent`]).
struct Sending<'a>(&'a Revocations, &'a Digest, &'a Entry);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.sent(self.1, self.2);
    }
}

/// How [`WRITE`] stores what it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// An operator's change, just made: stamped with Redis's now, after what it holds, if
    /// it arrives within `grace_us` of being made (its caller's timeout); later (held on
    /// the way while the caller gave up), as [`Write::Late`]: stamped on arrival, a lift
    /// that reached Redis after a later revoke undid it.
    Now { grace_us: u64 },
    /// A replica's whole set, written back: only what is newer than Redis's.
    Whole,
    /// An operator's change made while Redis could not be reached: with the stamp it was
    /// made with, only if nothing newer is there; `trusted` unless Redis's clock was never
    /// learned when it was made (then a revoke is stored as of now, a lift not at all).
    Late { trusted: bool },
}

impl Write {
    fn arg(self) -> String {
        match self {
            Write::Now { grace_us } => format!("0 {grace_us}"),
            Write::Whole => "1".into(),
            Write::Late { trusted: true } => "2".into(),
            Write::Late { trusted: false } => "3".into(),
        }
    }
}

/// The most fields a whole set's write-back leaves the hash with by entries of keys in no
/// snapshot of its writer (junk, or revokes of keys since removed): half of [`MAX_FIELDS`],
/// so those of the snapshots' keys, which are always written, fit in the rest.
const MOST_WRITTEN_BACK: u64 = MAX_FIELDS / 2;

/// How many entries the set held takes from Redis for secrets no key of the snapshot
/// carries (about 200 bytes each).
const MAX_HELD: usize = MAX_FIELDS as usize;

/// How far ahead of Redis's clock an entry's stamp is believed. A lift stamped later than
/// that is not taken (a forged or broken one could otherwise un-revoke a key for good); a
/// revoke is, whatever its stamp (fail closed), but it does not win the ordering: any
/// later entry replaces it (so an operator's lift takes, everywhere), and it is never
/// written back (a stamp Lua cannot hold exactly would come back mangled).
const FUTURE_BOUND: Duration = Duration::from_secs(3600);

fn latest_believable(now_us: u64) -> u64 {
    now_us.saturating_add(FUTURE_BOUND_US)
}

const FUTURE_BOUND_US: u64 = FUTURE_BOUND.as_secs() * 1_000_000;

/// How often a replica reads Redis's clock when no write has told it.
const CLOCK_READ_EVERY: Duration = Duration::from_secs(10);

/// Redis's clock as this replica reckons it: its own, corrected by the offset learned on
/// the last call that returned Redis's `TIME`. Every stamp is Redis's, so every replica
/// must judge stamps by Redis's clock: one whose clock ran hours behind took the fleet's
/// latest lift for a forgery from the future, and stamped its own revoke hours in the past,
/// where every other replica's write-back undid it (one ahead did the reverse).
#[derive(Default)]
struct RedisClock {
    /// Redis's clock as last learned, and when by this host's monotonic clock (a step of
    /// this host's wall clock after learning it moves nothing).
    anchor: Mutex<Option<(std::time::Instant, u64)>>,
}

/// The longest call Redis's clock is learned from once known: a reading is off by up to
/// half the call's round trip, and a call held on the way (1.9 s) put this replica's
/// reckoning a second ahead, so that a write held past its caller's timeout still looked
/// on time.
const LEARN_WITHIN: Duration = Duration::from_millis(100);

impl RedisClock {
    fn now(&self) -> u64 {
        match *self.anchor.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((at, redis_us)) => {
                redis_us.saturating_add(u64::try_from(at.elapsed().as_micros()).unwrap_or(0))
            }
            None => now_micros(),
        }
    }

    /// Redis said `redis_us` in answer to a call sent at `sent`: taken as of the call's
    /// middle, if the call was quick enough (a first reading from a call held on the way
    /// skewed it as much as a later one).
    fn learn(&self, redis_us: u64, sent: std::time::Instant) {
        let took = sent.elapsed();
        if took > LEARN_WITHIN {
            return;
        }
        let mut anchor = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
        *anchor = Some((sent + took / 2, redis_us));
    }

    /// Has Redis's clock ever been learned? Before, stamps are this host's clock alone.
    fn ever_learned(&self) -> bool {
        self.anchor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn due(&self) -> bool {
        self.anchor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|(at, _)| at.elapsed() >= CLOCK_READ_EVERY)
    }
}

/// One secret's latest revoke or enable (the set is keyed by its digest, which is
/// therefore not in here and never in a log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key id the revoke or enable was made through.
    pub id: Box<str>,
    pub disabled: bool,
    /// When it was made, µs since the epoch, by Redis's clock (the write script stamps it;
    /// one made while Redis was unreachable, by this replica's reckoning of that clock).
    pub at_us: u64,
}

impl Entry {
    /// How Redis holds it (the script writes it alike, from [`Self::state`] and a stamp).
    #[cfg(test)]
    fn encode(&self) -> String {
        format!("{}|{}", self.at_us, self.state())
    }

    /// The entry without its stamp: `disabled|id`.
    fn state(&self) -> String {
        format!("{}|{}", u8::from(self.disabled), self.id)
    }

    fn decode(s: &str) -> Option<Self> {
        let mut parts = s.splitn(3, '|');
        let at_us = parts.next()?.parse().ok()?;
        let disabled = match parts.next()? {
            "1" => true,
            "0" => false,
            _ => return None,
        };
        let id = parts.next().filter(|id| !id.is_empty())?;
        Some(Self {
            id: id.into(),
            disabled,
            at_us,
        })
    }

    /// Newer wins; at the same instant a revoke beats an enable (fail closed).
    fn supersedes(&self, other: &Entry) -> bool {
        (self.at_us, self.disabled) > (other.at_us, other.disabled)
    }
}

type Set = HashMap<Digest, Entry>;

/// A digest as its Redis hash field (hex); `None` for a field that is not one.
fn field_digest(field: &str) -> Option<Digest> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(field, &mut digest).ok()?;
    Some(digest)
}

/// The revocation set of this replica: the seam's local side is an empty set that is
/// always ready (no `cluster`); with Redis it is filled and kept in step as described above.
pub struct Revocations {
    cluster: Option<Arc<Cluster>>,
    /// The keys in force: their entries are held and written back first.
    store: Arc<KeyStore>,
    /// Entries were left out of a write-back for the bound, and that was logged.
    said_bounded: AtomicBool,
    /// When a refused publish was last said.
    said_unpublished: crate::logging::Sometimes,
    set: ArcSwap<Set>,
    /// Moved after each replacement of `set` (see [`Self::generation`]).
    generation: AtomicU64,
    /// The set has been read from Redis at least once.
    loaded: AtomicBool,
    /// Serializes merges (copy, change, swap). Never held across an await.
    merging: Mutex<()>,
    /// When a read before the first complete one found the hash without [`WHOLE`] (see
    /// [`RESTORE_SETTLE`]).
    unrestored_since: Mutex<Option<std::time::Instant>>,
    /// What the last full read found ([`VERSION`], and how many fields the hash held), and
    /// when it ran.
    last_full: Mutex<Option<LastFull>>,
    /// Redis came back since the last full read: read whole next time.
    full_read_due: AtomicBool,
    /// [`Cluster::downs`] as it was when the last full read (or refusal) last talked to
    /// Redis: Redis coming back from an outage counted in it does not call for another.
    read_after_downs: std::sync::atomic::AtomicU64,
    /// The hash was found past [`MAX_FIELDS`] and that was logged; cleared by a read.
    said_oversize: AtomicBool,
    /// A field or message past its bound was logged (once for the life of the process:
    /// each one is counted in `op="oversize"`).
    said_oversize_field: AtomicBool,
    fields: BoundedRead,
    script: redis::Script,
    page: redis::Script,
    clock: RedisClock,
    /// Revokes and lifts an operator made here that Redis has not stored yet (it was
    /// unreachable), and whether Redis's clock was known when each was made: stored once it
    /// answers with the stamp it was made with if so ([`Write::Late`]), and meanwhile never
    /// replaced here by what other replicas hold. (Stamped by Redis on arrival, a lift made
    /// before a revoke on another replica undid it; a stamp of a clock never learned
    /// cannot be trusted either way.)
    pending: Mutex<HashMap<Digest, Pending>>,
}

/// What a full read found.
/// What a full read saw, for [`Revocations::unchanged`] to compare with.
struct LastFull {
    version: Field,
    /// The hash's field count (HLEN); `None` for a hash too large to read.
    fields: Option<u64>,
    at: std::time::Instant,
}

enum Read {
    /// Every field, read while the version stayed the one given, and the hash's field
    /// count (HLEN) then: the fields kept may be fewer (a value past its bound is left out).
    Whole(HashMap<String, String>, Field, u64),
    /// The hash holds more than [`MAX_FIELDS`] fields: not read.
    Oversize(Field),
    /// The version moved during the read (a write raced it): these fields, not to be
    /// taken as the whole hash.
    Raced(HashMap<String, String>),
}

/// Where a merged entry came from: only another replica's change, published, counts in the
/// lag (a full read also finds entries made long ago).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Here,
    /// A full read, after the first.
    Remote,
    /// A published change.
    Event,
    /// The first read.
    Initial,
}

impl Revocations {
    pub fn new(cluster: Option<&Arc<Cluster>>, store: Arc<KeyStore>) -> Self {
        Self {
            cluster: cluster.cloned(),
            store,
            said_bounded: AtomicBool::new(false),
            said_unpublished: crate::logging::Sometimes::default(),
            set: ArcSwap::from_pointee(Set::new()),
            generation: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            merging: Mutex::new(()),
            unrestored_since: Mutex::new(None),
            last_full: Mutex::new(None),
            full_read_due: AtomicBool::new(false),
            read_after_downs: std::sync::atomic::AtomicU64::new(u64::MAX),
            said_oversize: AtomicBool::new(false),
            said_oversize_field: AtomicBool::new(false),
            fields: BoundedRead::default(),
            script: redis::Script::new(WRITE),
            page: redis::Script::new(PAGE_READ),
            clock: RedisClock::default(),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Shared revocations are on (`cluster` configured).
    pub fn is_shared(&self) -> bool {
        self.cluster.is_some()
    }

    /// Ready to decide: no cluster, or the set has been read once.
    /// How many times the set was replaced: one that moved since it was read has seen a
    /// revoke or a lift applied.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn is_ready(&self) -> bool {
        self.cluster.is_none() || self.loaded.load(Ordering::Acquire)
    }

    /// The key's secret is revoked, whatever id carries it. One map lookup, no I/O.
    pub fn is_revoked(&self, key: &Key) -> bool {
        let set = self.set.load();
        !set.is_empty() && set.get(key.digest()).is_some_and(|e| e.disabled)
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
    /// next full read that reaches Redis writes it there. `None`: a later change to the key
    /// reached Redis first, and holds (here too). A lift is refused while Redis's clock has
    /// never been read ([`ClusterError::ClockUnknown`]): its stamp could not be ordered.
    pub async fn set(&self, key: &Key, disabled: bool) -> Result<Option<Entry>, ClusterError> {
        let digest = *key.digest();
        if let Some(cluster) = &self.cluster {
            if !self.clock.ever_learned() {
                let _ = self.read_clock(cluster).await;
                if !self.clock.ever_learned() && !disabled {
                    return Err(ClusterError::ClockUnknown);
                }
            }
        }
        let now = self.clock.now();
        // Stamped after the entry held, unless that one is stamped past belief (any entry
        // replaces such a one).
        let previous = self
            .set
            .load()
            .get(&digest)
            .map(|e| e.at_us)
            .filter(|&at| at <= latest_believable(now))
            .unwrap_or(0);
        let mut entry = Entry {
            id: Box::from(&*key.id),
            disabled,
            at_us: now.max(previous.saturating_add(1)),
        };
        self.merge([(digest, entry.clone())], Origin::Here);
        let Some(cluster) = &self.cluster else {
            return Err(ClusterError::NotConnected);
        };
        self.pend(digest, entry.clone());
        // Late once its caller has given up, if the stamp can say when that was (less the
        // most the stamp may be off, so that the judgement leans to late).
        let grace_us = if self.clock.ever_learned() {
            cluster
                .call_timeout()
                .saturating_sub(LEARN_WITHIN)
                .as_micros() as u64
        } else {
            0
        };
        let stored = {
            // Over when the write is, or when this call is dropped (its caller gone).
            let _sending = Sending(self, &digest, &entry);
            self.store(cluster, &digest, &entry, Write::Now { grace_us })
                .await?
        };
        self.stored(&digest, &entry);
        let Some(stamped) = stored else {
            // It reached Redis after a later change (held on the way): that one stands.
            self.forget(&digest, &entry);
            self.full_read_due.store(true, Ordering::Release);
            info!(
                key_id = &*key.id,
                disabled, "revocation reached redis after a later change; that one holds"
            );
            return Ok(None);
        };
        if stamped != entry.at_us {
            // Redis held a newer entry (another replica's clock is ahead): this one was
            // stamped after it, and holds here too under that stamp.
            entry.at_us = stamped;
            self.merge([(digest, entry.clone())], Origin::Here);
        }
        info!(
            key_id = &*key.id,
            disabled, "revocation stored for the fleet"
        );
        Ok(Some(entry))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An operator's change is held as not yet stored until Redis has it.
    fn pend(&self, digest: Digest, entry: Entry) {
        let trusted = self.clock.ever_learned();
        let sending = true;
        self.pending().insert(
            digest,
            Pending {
                entry,
                trusted,
                sending,
            },
        );
    }

    /// `entry`'s own write is over (stored or not): the flush may send it now.
    fn sent(&self, digest: &Digest, entry: &Entry) {
        if let Some(p) = self.pending().get_mut(digest) {
            if p.entry == *entry {
                p.sending = false;
            }
        }
    }

    /// Redis stored `entry`: no longer pending, unless a later change was made meanwhile.
    fn stored(&self, digest: &Digest, entry: &Entry) {
        let mut pending = self.pending();
        if pending
            .get(digest)
            .is_some_and(|p| p.entry.disabled == entry.disabled)
        {
            pending.remove(digest);
        }
    }

    /// Store the changes made here while Redis was unreachable, each with the stamp it was
    /// made with, unless Redis holds a change made after it (on another replica, or this
    /// one's own that reached Redis after all): then that one stands, here too, read at once.
    async fn flush_pending(&self, cluster: &Cluster) -> Result<(), ClusterError> {
        let waiting: Vec<(Digest, Entry, bool)> = self
            .pending()
            .iter()
            .filter(|(_, p)| !p.sending)
            .map(|(d, p)| (*d, p.entry.clone(), p.trusted))
            .collect();
        for (digest, mut entry, trusted) in waiting {
            let stamped = self
                .store(cluster, &digest, &entry, Write::Late { trusted })
                .await?;
            self.stored(&digest, &entry);
            let Some(stamped) = stamped else {
                // Redis's entry decides, here too: the next read takes it even if the one
                // held here is stamped later (by a clock that could not be trusted).
                self.forget(&digest, &entry);
                self.full_read_due.store(true, Ordering::Release);
                info!(
                    key_id = &*entry.id,
                    disabled = entry.disabled,
                    "revocation made while redis was unreachable superseded by a later change in redis; that one holds"
                );
                continue;
            };
            entry.at_us = stamped;
            self.merge([(digest, entry.clone())], Origin::Here);
            info!(
                key_id = &*entry.id,
                disabled = entry.disabled,
                "revocation made while redis was unreachable stored for the fleet"
            );
        }
        Ok(())
    }

    /// Store one operator's revoke or lift; returns the stamp it was stored with.
    async fn store(
        &self,
        cluster: &Cluster,
        digest: &Digest,
        entry: &Entry,
        mode: Write,
    ) -> Result<Option<u64>, ClusterError> {
        let (stored, stamped, _) = self.write(cluster, [(digest, entry)], mode, 0).await?;
        Ok((stored > 0).then(|| u64::try_from(stamped).unwrap_or(entry.at_us)))
    }

    /// Run [`WRITE`] on `entries`; `whole`: they are this replica's whole set. How many
    /// were stored, and the last one's stamp.
    /// `known`: how many of the first `entries` are the snapshot's keys' (always taken).
    async fn write<'a>(
        &self,
        cluster: &Cluster,
        entries: impl IntoIterator<Item = (&'a Digest, &'a Entry)>,
        mode: Write,
        known: usize,
    ) -> Result<(i64, i64, u64), ClusterError> {
        let mut call = self.script.key(cluster.key("revocations"));
        call.arg(cluster.key("revocations:events"))
            .arg(mode.arg())
            .arg(FUTURE_BOUND_US)
            .arg(MOST_WRITTEN_BACK)
            .arg(known);
        for (digest, entry) in entries {
            call.arg(hex::encode(digest))
                .arg(entry.state())
                .arg(entry.at_us);
        }
        let call = &call;
        let sent = std::time::Instant::now();
        let (stored, last, redis_now, left, unpublished) = cluster
            .call(Op::Revoke, |mut c| async move {
                call.invoke_async::<(i64, i64, u64, u64, u64)>(&mut c).await
            })
            .await?;
        self.clock.learn(redis_now, sent);
        if left > 0 {
            self.bounded(cluster, "written back", left);
        }
        if unpublished > 0 {
            cluster.metrics.error(Op::Subscribe);
            if self.said_unpublished.now() {
                warn!(
                    channel = cluster.key("revocations:events"),
                    "redis refused to publish a stored revocation (an ACL without the channel?): other replicas take it from their next read (within a second), not at once"
                );
            }
        }
        Ok((stored, last, left))
    }

    /// Read Redis's clock if no call has told it for [`CLOCK_READ_EVERY`].
    async fn read_clock(&self, cluster: &Cluster) -> Result<(), ClusterError> {
        if !self.clock.due() {
            return Ok(());
        }
        let sent = std::time::Instant::now();
        let (secs, micros): (u64, u64) = cluster
            .call(Op::ReadRevocations, |mut c| async move {
                redis::cmd("TIME").query_async(&mut c).await
            })
            .await?;
        let redis_now = secs.saturating_mul(1_000_000).saturating_add(micros);
        self.clock.learn(redis_now, sent);
        Ok(())
    }

    /// Whether `digest` is a key of the snapshot in force.
    fn known(&self, digest: &Digest) -> bool {
        self.store
            .guard()
            .as_ref()
            .is_some_and(|s| s.lookup(digest).is_some())
    }

    /// Entries were left out for the bounds: counted (`op="oversize"`) and said once.
    fn bounded(&self, cluster: &Cluster, what: &'static str, entries: u64) {
        cluster.metrics.error(Op::Oversize);
        if !self.said_bounded.swap(true, Ordering::AcqRel) {
            warn!(
                what,
                entries,
                max = MAX_FIELDS,
                "revocations past the bound left out (junk in redis, not keyward's writing?); entries of keys in the snapshot are kept first"
            );
        }
    }

    /// Drop the entry held for `digest` if it is still `entry` (a change Redis did not
    /// store: the next read takes Redis's, whatever the stamps).
    fn forget(&self, digest: &Digest, entry: &Entry) {
        let _guard = self.merging.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.set.load_full();
        if current
            .get(digest)
            .is_some_and(|held| held.disabled == entry.disabled)
        {
            let mut next = (*current).clone();
            next.remove(digest);
            self.set.store(Arc::new(next));
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Merge entries into the set (newer wins) and swap it if anything changed.
    fn merge(&self, entries: impl IntoIterator<Item = (Digest, Entry)>, origin: Origin) {
        let _guard = self.merging.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.set.load_full();
        let mut next: Option<Set> = None;
        let now = self.clock.now();
        let latest = latest_believable(now);
        let pending = self.pending();
        for (digest, entry) in entries {
            if origin != Origin::Here && !entry.disabled && entry.at_us > latest {
                continue;
            }
            // The operator's change made here stands until Redis stores it, but for a revoke
            // made after it (failing closed: a pending lift older than a revoke in Redis
            // would lose there anyway).
            if origin != Origin::Here {
                if let Some(p) = pending.get(&digest) {
                    if !(entry.disabled && entry.at_us > p.entry.at_us) {
                        continue;
                    }
                }
            }
            // From Redis, what a key of the snapshot carries, and what no key carries only up
            // to a bound (junk fills the hash; a revoke kept for a key a later snapshot may
            // add is refused at once, not after the read the new snapshot calls for).
            let set_len = next.as_ref().map_or(current.len(), HashMap::len);
            if origin != Origin::Here && set_len >= MAX_HELD && !self.known(&digest) {
                continue;
            }
            let set = next.as_ref().unwrap_or(&current);
            // This replica's own change, as Redis stored it: its stamp is Redis's, even one
            // below the stamp it was made with (a clock that could not be trusted).
            let restamped = |cur: &Entry| origin == Origin::Here && cur.disabled == entry.disabled;
            if set.get(&digest).is_some_and(|cur| {
                *cur == entry || (!restamped(cur) && cur.at_us <= latest && !entry.supersedes(cur))
            }) {
                continue;
            }
            if origin == Origin::Event {
                if let Some(c) = &self.cluster {
                    let lag = now.saturating_sub(entry.at_us) as f64 / 1e6;
                    c.metrics.revocation_lag.observe(lag);
                }
            }
            next.get_or_insert_with(|| (*current).clone())
                .insert(digest, entry);
        }
        drop(pending);
        if let Some(next) = next {
            self.set.store(Arc::new(next));
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// One pub/sub message: `digest-hex\nentry`. A revoke is taken at once (failing
    /// closed gives a publisher nothing a writer of the hash could not take anyway). A lift
    /// is only a hint: anyone who can reach Redis can publish, so the entry believed is the
    /// one the hash holds, read back; if it cannot be read, the next full read decides.
    async fn on_message(&self, cluster: &Cluster, payload: &str) {
        let Some((field, value)) = payload.split_once('\n') else {
            return;
        };
        let (Some(digest), Some(entry)) = (field_digest(field), Entry::decode(value)) else {
            return;
        };
        if entry.disabled {
            self.merge([(digest, entry)], Origin::Event);
            return;
        }
        let hash = cluster.key("revocations");
        let stored = self.field(cluster, &hash, field, MAX_ENTRY_BYTES).await;
        if let Some(entry) = stored
            .ok()
            .as_ref()
            .and_then(Field::value)
            .and_then(Entry::decode)
        {
            self.merge([(digest, entry)], Origin::Event);
        }
    }

    /// Read the whole set from Redis, take what is newer there, write back what is newer
    /// here (Redis restarted empty, or a revoke made while it was unreachable).
    pub async fn sync(&self) -> Result<(), ClusterError> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let hash = cluster.key("revocations");
        self.read_clock(cluster).await?;
        // A flush that fails (its write refused or held) does not keep the set from being
        // read: a revoke made elsewhere still arrives.
        if let Err(e) = self.flush_pending(cluster).await {
            tracing::debug!(error = %e, "pending revocations not stored yet");
        }
        if self.unchanged(cluster, &hash).await? {
            return Ok(());
        }
        let (remote, version, len) = match self.read_whole(cluster, &hash).await? {
            Read::Whole(remote, version, len) => (remote, version, len),
            Read::Oversize(version) => {
                // Not read again before the version moves or FULL_READ_EVERY: checking
                // costs one O(1) call, and the set held stays in force meanwhile.
                self.read_as(version, None);
                return Ok(());
            }
            Read::Raced(remote) => {
                // Newer wins, so what was read can be taken; the rest is read next time
                // (the version held differs from the one now in Redis).
                self.merge(decode(remote), self.origin());
                return Ok(());
            }
        };
        self.read_as(version, Some(len));
        let whole = remote.contains_key(WHOLE);
        // Every digest Redis holds a value for, readable or not: one it holds something for
        // is not one it lacks (a value the script takes for an entry, but this side cannot
        // read, kept every replica writing back and reading whole in a loop).
        let present: std::collections::HashSet<Digest> =
            remote.keys().filter_map(|f| field_digest(f)).collect();
        let remote = decode(remote);
        let origin = self.origin();
        self.merge(remote.iter().map(|(d, e)| (*d, e.clone())), origin);
        if origin == Origin::Initial && self.settling(whole) {
            return Ok(());
        }
        self.loaded.store(true, Ordering::Release);
        let now = self.clock.now();
        let latest = latest_believable(now);
        // A revoke stamped past belief (Redis's clock stepped back, or an older release's
        // replica ran ahead) is held as of now: written back with its stamp it was left out
        // (a restored hash lacked it), and Redis's copy of it counts as nothing.
        let future: Vec<(Digest, Entry)> = self
            .set
            .load()
            .iter()
            .filter(|(_, e)| e.disabled && e.at_us > latest)
            .map(|(d, e)| {
                (
                    *d,
                    Entry {
                        at_us: now,
                        ..e.clone()
                    },
                )
            })
            .collect();
        if !future.is_empty() {
            self.merge(future, Origin::Here);
        }
        let ours = self.set.load_full();
        // Lifts stamped past belief are held here as they came but never written back.
        let believable = || ours.iter().filter(|(_, e)| e.at_us <= latest);
        // Behind: Redis lacks, or holds older, an entry of a key of the snapshot. (Others
        // held go back only with a write-back that happens anyway, as after Redis came back
        // empty, so junk held calls for none; an equal stamp is no reason either: the
        // script keeps what it holds then, and writing back again and again changed
        // nothing.)
        let behind = believable()
            .filter(|(d, _)| self.known(d))
            .any(|(digest, entry)| {
                !present.contains(digest)
                    || remote
                        .get(digest)
                        .is_some_and(|r| r.at_us <= latest && r.at_us < entry.at_us)
            });
        if whole && !behind {
            return Ok(());
        }
        // Redis lacks something: write back the whole set (the snapshot's keys' entries),
        // so a reader never sees half.
        // The snapshot's keys' entries first, always taken; then the others this replica
        // holds (a revoke of a key another replica's snapshot holds, which this one may be
        // the last to hold), only below half the bound.
        let mut back: Vec<_> = believable().collect();
        back.sort_by_key(|(digest, _)| !self.known(digest));
        let known = back.iter().take_while(|(d, _)| self.known(d)).count();
        let (stored, _, _) = self.write(cluster, back, Write::Whole, known).await?;
        info!(
            stored,
            held = ours.len(),
            "revocations written back to redis"
        );
        Ok(())
    }

    /// One field of the revocation hash, sent only within `max` bytes ([`super::bounded`]).
    async fn field(
        &self,
        cluster: &Cluster,
        hash: &str,
        field: &str,
        max: usize,
    ) -> Result<Field, ClusterError> {
        let (_, mut fields) = self
            .fields
            .read(cluster, Op::ReadRevocations, hash, max, false, &[field])
            .await?;
        self.said_field(hash, &fields);
        Ok(fields.pop().unwrap_or(Field::Absent))
    }

    /// Say once that something past its bound was left unread (its place, never its
    /// contents); every one is counted in `op="oversize"`.
    fn said_field(&self, place: &str, fields: &[Field]) {
        let Some(bytes) = fields.iter().find_map(|f| match f {
            Field::Oversize(n) => Some(*n),
            _ => None,
        }) else {
            return;
        };
        if !self.said_oversize_field.swap(true, Ordering::AcqRel) {
            warn!(
                place,
                bytes,
                "a revocation value or message in redis is too large to read (not keyward's writing?); ignored"
            );
        }
    }

    fn origin(&self) -> Origin {
        if self.loaded.load(Ordering::Acquire) {
            Origin::Remote
        } else {
            Origin::Initial
        }
    }

    /// Read the hash in pages ([`PAGE_READ`]), bounded by [`MAX_FIELDS`]: its size is
    /// checked first (HLEN, with the version, in one round trip), and a scan that finds
    /// more than the bound (the hash grew meanwhile) is refused too. A scan is not one
    /// atomic read as HGETALL was: the version is read again after it, and a read it moved
    /// under is [`Read::Raced`], never taken as the whole hash (the [`WHOLE`] field must not
    /// vouch for entries a racing write-back added after their page was read).
    async fn read_whole(&self, cluster: &Cluster, hash: &str) -> Result<Read, ClusterError> {
        let (len, version) = self.version(cluster, hash, true).await?;
        let len = len.unwrap_or(0);
        if len > MAX_FIELDS {
            return Ok(self.refuse(cluster, hash, len, version));
        }
        let mut remote = HashMap::new();
        let mut cursor = String::from("0");
        let mut scanned: u64 = 0;
        loop {
            let page = &self.page;
            let (name, from) = (hash.to_owned(), cursor.clone());
            let reply: Vec<String> = cluster
                .call(Op::ReadRevocations, |mut c| async move {
                    page.key(name)
                        .arg(from)
                        .arg(PAGE)
                        .arg(MAX_ENTRY_BYTES)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            let mut it = reply.into_iter();
            let (Some(next), Some(n)) = (it.next(), it.next()) else {
                return Err(ClusterError::Redis(redis::RedisError::from((
                    redis::ErrorKind::TypeError,
                    "revocation page reply",
                ))));
            };
            // A scan returns a field more than once if the hash is rehashed under it: bound
            // what was scanned, not only what is kept.
            scanned = scanned.saturating_add(n.parse().unwrap_or(u64::MAX));
            if scanned > MAX_FIELDS.saturating_mul(2) {
                return Ok(self.refuse(cluster, hash, scanned, version));
            }
            while let (Some(field), Some(value)) = (it.next(), it.next()) {
                remote.insert(field, value);
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        // Sampled before the last call: an outage during the scan (its own slowness, say)
        // is one this read has seen past.
        let downs = cluster.downs();
        let now = self
            .field(cluster, hash, VERSION, MAX_VERSION_BYTES)
            .await?;
        if now != version {
            return Ok(Read::Raced(remote));
        }
        self.read_after_downs.store(downs, Ordering::Release);
        if self.said_oversize.swap(false, Ordering::AcqRel) {
            info!(hash, "revocation hash back within bounds; read whole");
        }
        Ok(Read::Whole(remote, version, len))
    }

    /// Refuse a hash past the bound: count it, say it once (its name, never its contents),
    /// and keep the set held.
    fn refuse(&self, cluster: &Cluster, hash: &str, fields: u64, version: Field) -> Read {
        cluster.metrics.error(Op::Oversize);
        self.read_after_downs
            .store(cluster.downs(), Ordering::Release);
        if !self.said_oversize.swap(true, Ordering::AcqRel) {
            warn!(
                hash,
                fields,
                max = MAX_FIELDS,
                "revocation hash too large to read (not keyward's writing?); keeping the revocations held"
            );
        }
        Read::Oversize(version)
    }

    /// Whether the set can be left unread this time: it has been read whole, Redis has not
    /// come back since, the last full read is younger than [`FULL_READ_EVERY`], and neither
    /// [`VERSION`] nor the hash's field count has moved since (both in one round trip,
    /// HLEN being O(1)). A hash without the version field (never written, or back empty)
    /// is always read whole. The count catches what the version cannot: a field deleted
    /// by hand or by another writer, leaving the version as it was (a revoke lost so, say
    /// by a failover to a Redis replica that lagged, or an `HDEL`), which waited for
    /// [`FULL_READ_EVERY`] to be written back, while a replica started meanwhile let the
    /// revoked key in.
    async fn unchanged(&self, cluster: &Cluster, hash: &str) -> Result<bool, ClusterError> {
        if !self.loaded.load(Ordering::Acquire) || self.full_read_due.swap(false, Ordering::AcqRel)
        {
            return Ok(false);
        }
        let (seen, count) = match &*self.last_full.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(last)
                if last.version != Field::Absent
                    && last.at.elapsed() < full_read_every(last.fields) =>
            {
                (last.version.clone(), last.fields)
            }
            _ => return Ok(false),
        };
        // An oversized version is compared by its length: junk that stays put does not call
        // for a full read every interval, and keyward's next write replaces it.
        // A hash too large to read has no count to compare: its version alone is read.
        let (len, now) = self.version(cluster, hash, count.is_some()).await?;
        Ok(now == seen && count.is_none_or(|count| len == Some(count)))
    }

    /// [`VERSION`] (bounded), and with `count` the hash's field count (HLEN), in one
    /// round trip.
    async fn version(
        &self,
        cluster: &Cluster,
        hash: &str,
        count: bool,
    ) -> Result<(Option<u64>, Field), ClusterError> {
        let (len, mut fields) = self
            .fields
            .read(
                cluster,
                Op::ReadRevocations,
                hash,
                MAX_VERSION_BYTES,
                count,
                &[VERSION],
            )
            .await?;
        self.said_field(hash, &fields);
        Ok((len, fields.pop().unwrap_or(Field::Absent)))
    }

    /// Note what a full read (or a refusal of one) found.
    fn read_as(&self, version: Field, fields: Option<u64>) {
        *self.last_full.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastFull {
            version,
            fields,
            at: std::time::Instant::now(),
        });
    }

    /// Before the first complete read: true while the hash has lacked [`WHOLE`] for less
    /// than [`RESTORE_SETTLE`].
    fn settling(&self, whole: bool) -> bool {
        let mut since = self
            .unrestored_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if whole {
            return false;
        }
        let first = *since.get_or_insert_with(std::time::Instant::now);
        first.elapsed() < RESTORE_SETTLE
    }

    /// Full reads every [`FULL_READ_INTERVAL`], for the life of the process.
    pub async fn run_sync(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            match self.sync().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(error = %e, "revocation read failed; keeping the set held");
                }
            }
            // After a failure, not tried again at the first sign that Redis answers: its
            // probe may pass where the read's script is refused (an ACL without scripting),
            // and each such sign at once was a read, a failure and a log line in a tight
            // loop (12k Redis calls a second over a fleet of four). Doubling from 50 ms.
            let retry_at =
                (failures > 0).then(|| tokio::time::Instant::now() + retry_after(failures));
            // Not ready until the first read: try again soon (not as soon while the hash is
            // refused as too large: that is not going away in 50 ms).
            let wait = if self.loaded.load(Ordering::Acquire)
                || self.said_oversize.load(Ordering::Acquire)
            {
                FULL_READ_INTERVAL
            } else {
                Duration::from_millis(50)
            };
            match &self.cluster {
                Some(c) => {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        // Redis may have restarted, or failed over to a copy that lags.
                        () = c.back.notified() => {
                            if let Some(at) = retry_at {
                                tokio::time::sleep_until(at).await;
                            }
                            self.on_back(c);
                        }
                    }
                }
                None => return,
            }
        }
    }

    /// A new snapshot is in force: the next read is whole, so a revoke of a key it adds (made
    /// while no snapshot here held it, and so not taken) is in force within a read interval.
    pub fn snapshot_changed(&self) {
        self.full_read_due.store(true, Ordering::Release);
    }

    /// Redis answers again: it may have restarted, or failed over to a copy that lags, so
    /// the next read is whole; unless the last full read talked to Redis after its last
    /// outage (as when that read's own slowness marked it down): reading whole again at once
    /// would repeat what made it slow, in a loop.
    fn on_back(&self, cluster: &Cluster) {
        if cluster.downs() != self.read_after_downs.load(Ordering::Acquire) {
            self.full_read_due.store(true, Ordering::Release);
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
                            // Bounded before it is copied or parsed: anyone can publish.
                            let bytes = msg.get_payload_bytes();
                            if bytes.len() > MAX_MESSAGE_BYTES {
                                cluster.metrics.error(Op::Oversize);
                                self.said_field(&channel, &[Field::Oversize(bytes.len() as u64)]);
                                continue;
                            }
                            if let Ok(payload) = std::str::from_utf8(bytes) {
                                self.on_message(&cluster, payload).await;
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

/// The hash's fields that are digests with a well-formed entry; the others are not
/// keyward's (or are [`WHOLE`] and [`VERSION`]) and are dropped.
fn decode(remote: HashMap<String, String>) -> Set {
    remote
        .into_iter()
        .filter_map(|(field, v)| Some((field_digest(&field)?, Entry::decode(&v)?)))
        .collect()
}

/// The guard (SPEC 16) judges keys revoked by the fleet as not usable.
impl crate::keys::diff::Revoked for Revocations {
    fn is_revoked(&self, key: &Key) -> bool {
        Revocations::is_revoked(self, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_us: u64, disabled: bool, id: &str) -> Entry {
        Entry {
            id: id.into(),
            disabled,
            at_us,
        }
    }

    #[test]
    fn entries_round_trip_and_bad_ones_are_dropped() {
        let e = entry(1_765_000_000_000_123, true, "key_a|b");
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        for bad in ["", "1|1", "1|1|", "x|1|k", "1|2|k"] {
            assert_eq!(Entry::decode(bad), None, "{bad:?}");
        }
        assert_eq!(field_digest(&"ab".repeat(32)), Some([0xab; 32]));
        for bad in ["key_a", "zz", &"0".repeat(62)] {
            assert_eq!(field_digest(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_outage_the_full_read_saw_past_does_not_call_for_another() {
        let config = crate::config::ClusterConfig {
            redis: "redis://127.0.0.1:1/0".into(),
            prefix: "t:".into(),
            timeout: Duration::from_millis(50),
            on_error: crate::config::OnError::Local,
            redis_from_env: false,
        };
        let c = Arc::new(Cluster::new(&config, &prometheus::Registry::new()).unwrap());
        let r = Revocations::new(Some(&c), Arc::default());
        c.set_up(true);
        // A full read ended before an outage: Redis coming back calls for a whole read.
        r.read_after_downs.store(c.downs(), Ordering::Release);
        c.set_up(false);
        c.set_up(true);
        r.on_back(&c);
        assert!(r.full_read_due.swap(false, Ordering::AcqRel));
        // An outage during a full read (its own slowness) that then ended: not again.
        c.set_up(false);
        c.set_up(true);
        r.read_after_downs.store(c.downs(), Ordering::Release);
        r.on_back(&c);
        assert!(!r.full_read_due.load(Ordering::Acquire));
        assert_eq!(c.downs(), 2, "one count per outage, not per failed call");
        c.set_up(false);
        c.set_up(false);
        assert_eq!(c.downs(), 3);
    }

    #[test]
    fn the_clock_is_redis_s_as_last_learned() {
        let clock = RedisClock::default();
        assert!(clock.due(), "never learned");
        // Not from a slow call, even the first (a call held on the way skews it).
        let held = std::time::Instant::now() - Duration::from_secs(2);
        clock.learn(now_micros() + 3_600_000_000, held);
        assert!(!clock.ever_learned(), "a slow first reading is no reading");
        let local = now_micros();
        assert!(
            clock.now().abs_diff(local) < 1_000_000,
            "the host's until told"
        );
        let two_hours = 7_200 * 1_000_000;
        // Redis two hours ahead of this host (this host's clock two hours behind).
        let sent = std::time::Instant::now();
        clock.learn(local + two_hours, sent);
        assert!(!clock.due());
        assert!(clock.now().abs_diff(local + two_hours) < 1_000_000);
        // And behind it.
        clock.learn(local - two_hours, std::time::Instant::now());
        assert!(clock.now().abs_diff(local - two_hours) < 1_000_000);
        // A slow call (held on the way) teaches nothing once the clock is known.
        let slow = std::time::Instant::now() - Duration::from_secs(2);
        clock.learn(local + two_hours, slow);
        assert!(clock.now().abs_diff(local - two_hours) < 1_000_000);
    }

    #[test]
    fn newer_wins_and_a_tie_fails_closed() {
        assert!(entry(2, false, "a").supersedes(&entry(1, true, "a")));
        assert!(!entry(1, true, "a").supersedes(&entry(2, false, "a")));
        assert!(entry(5, true, "a").supersedes(&entry(5, false, "b")));
        assert!(!entry(5, false, "b").supersedes(&entry(5, true, "a")));
    }

    fn snapshot(keys: &[(&str, u8)]) -> crate::keys::Snapshot {
        let mut text = String::from("keys:\n");
        for (id, d) in keys {
            text += &format!(
                "  - {{ id: {id}, sha256: {}, type: personal, subject_id: s, account_id: a }}\n",
                hex::encode([*d; 32])
            );
        }
        crate::keys::Snapshot::parse(&text, crate::keys::Source::File).unwrap()
    }

    /// A store whose snapshot holds keys of these digests (`[d; 32]`): entries from Redis
    /// are taken only for them.
    fn holding(keys: &[(&str, u8)]) -> Arc<KeyStore> {
        let store = Arc::new(KeyStore::new());
        store.store(Arc::new(snapshot(keys)));
        store
    }

    /// What Redis holds for a secret no key of the snapshot carries is taken only up to
    /// [`MAX_HELD`] (junk fills the hash); the snapshot's keys' entries always are, and so is
    /// an operator's change made here.
    #[test]
    fn entries_of_no_key_are_held_up_to_a_bound() {
        let r = Revocations::new(None, holding(&[("k", 1)]));
        let junk = (0..MAX_HELD as u64 + 5).map(|i| {
            let mut d = [0xaa; 32];
            d[..8].copy_from_slice(&i.to_be_bytes());
            (d, entry(10, true, "junk"))
        });
        r.merge(junk, Origin::Remote);
        assert_eq!(r.set.load().len(), MAX_HELD);
        r.merge([([1; 32], entry(10, true, "k"))], Origin::Remote);
        assert!(r.set.load().contains_key(&[1; 32]), "the snapshot's key");
        r.merge([([9; 32], entry(10, true, "x"))], Origin::Here);
        assert!(
            r.set.load().contains_key(&[9; 32]),
            "an operator's change here"
        );
    }

    #[test]
    fn a_change_made_here_and_not_yet_stored_is_not_replaced_by_other_replicas() {
        let r = Revocations::new(None, holding(&[("k", 7)]));
        let digest = [7u8; 32];
        let now = now_micros();
        let revoke = entry(now - 7_200_000_000, true, "k");
        r.merge([(digest, revoke.clone())], Origin::Here);
        r.pend(digest, revoke.clone());
        // Another replica's lift, newer than this replica's stamp (its clock is behind).
        r.merge([(digest, entry(now, false, "k"))], Origin::Remote);
        assert!(r.set.load()[&digest].disabled, "the pending revoke stands");
        // Once Redis stored it (under Redis's stamp), entries from elsewhere apply again.
        let stamped = entry(now + 1, true, "k");
        r.merge([(digest, stamped.clone())], Origin::Here);
        r.stored(&digest, &stamped);
        r.merge([(digest, entry(now + 2, false, "k"))], Origin::Remote);
        assert!(!r.set.load()[&digest].disabled, "a later lift takes");
    }

    #[test]
    fn a_revoke_follows_the_secret_not_the_id() {
        let r = Revocations::new(None, holding(&[("k", 1), ("k2", 2)]));
        r.merge([([1; 32], entry(10, true, "k"))], Origin::Here);
        r.merge([([1; 32], entry(5, false, "k"))], Origin::Remote);
        assert!(r.set.load()[&[1; 32]].disabled, "an older enable loses");
        r.merge([([1; 32], entry(20, false, "k"))], Origin::Remote);
        assert!(!r.set.load()[&[1; 32]].disabled, "a newer enable wins");

        r.merge([([1; 32], entry(30, true, "k"))], Origin::Remote);
        // Rotated under the same id: the new secret is not revoked.
        let rotated = snapshot(&[("k", 2)]);
        assert!(!r.is_revoked(rotated.by_id("k").unwrap()));
        // The revoked secret under another id is.
        let reissued = snapshot(&[("k2", 1)]);
        assert!(r.is_revoked(reissued.by_id("k2").unwrap()));
        // A second revoke through the same id, after the rotation, keeps the first.
        r.merge([([2; 32], entry(40, true, "k"))], Origin::Here);
        assert!(r.is_revoked(rotated.by_id("k").unwrap()));
        assert!(r.is_revoked(reissued.by_id("k2").unwrap()));
        // Enabling through the new id lifts the secret's revoke.
        r.merge([([1; 32], entry(50, false, "k2"))], Origin::Here);
        assert!(!r.is_revoked(reissued.by_id("k2").unwrap()));
        assert!(
            r.is_ready(),
            "without a cluster the (empty) set is always ready"
        );
    }
}
