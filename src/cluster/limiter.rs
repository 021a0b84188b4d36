//! The rate-limit seam: the per-replica GCRA ([`RateLimiter`]) or one shared through Redis
//! (GCRA as one Lua script, Redis `TIME` as the clock), chosen once at start.
//!
//! A key without a limit never reaches here (no Redis call). A limited key costs one round
//! trip: `EVALSHA` (redis-rs `Script` falls back to `EVAL` once on `NOSCRIPT`), on the
//! calling thread's own connection ([`ThreadConns`]), so the call does not leave the thread.
//! While Redis is down, slow, or this thread's connection is not up by the request's
//! deadline, `cluster.on_error` decides: `local` enforces the limit on this replica, `deny`
//! refuses (503 `auth_unavailable`).

use std::sync::Arc;
use std::time::Instant;

use crate::auth::ratelimit::{Quota, RateDecision, RateLimiter};
use crate::config::OnError;
use crate::keys::{Key, Snapshot};

use super::metrics::Op;
use super::thread_conn::{NoConnection, ThreadConns};
use super::Cluster;

/// GCRA over microseconds. KEYS[1]: the key's state: its theoretical arrival time, and the
/// emission interval and burst that wrote it (`tat interval burst`).
/// ARGV: emission interval (µs), burst. Returns `allowed remaining retry_after_us reset_us`
/// as one string: one reply value to parse rather than an array of four (the client's reply
/// parser is most of a call's CPU on our side).
pub(super) const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tolerance = interval * burst
-- A state's time to live in ms, as digits: a number argument is sent as `%.17g`, which past
-- 1e17 has an exponent Redis refuses (every check of the key then failed: 503 under deny).
-- At most ~31,700 years.
local function ttl(us)
  return string.format('%.0f', math.min(math.ceil(us / 1000) + 1, 1e15))
end
-- A value of another type there (another writer's) would fail every check for good.
-- UNLINK, not DEL: a large one is freed off Redis's main thread, not while every other
-- client (this key's next check among them) waits.
-- STRLEN first: a state this script writes has at most 50 characters, and a longer string
-- (another writer's, up to 512 MB) is not copied into the script on every check: it counts
-- as none, and the SET below replaces it.
local len = redis.pcall('STRLEN', KEYS[1])
local stored = nil
if type(len) == 'table' and len.err then
  redis.call('UNLINK', KEYS[1])
elseif len <= 64 then
  stored = redis.call('GET', KEYS[1])
end
local tat, was_interval, was_burst = nil, nil, nil
if stored then
  local a, b, c = string.match(stored, '^(%d+) (%d+) (%d+)$')
  if a then
    tat, was_interval, was_burst = tonumber(a), tonumber(b), tonumber(c)
  else
    tat = tonumber(stored)
  end
end
tat = tat or now
-- NaN (`nan` parses) compares false with everything: it would never be replaced.
if tat ~= tat or tat < now then tat = now end
-- The key's limit changed (a reload, or replicas that have not all loaded it yet): what it
-- spent stays spent, counted in requests. Kept as time, a slower rate would make the same
-- time owed fewer requests.
-- Written back only when converted or capped: a burst changed alone leaves the state as
-- it reads (what it owes is bounded by the burst it names), and rewriting it on every
-- refused check would be a write a request.
local changed = false
if was_interval and was_interval > 0 and was_interval ~= interval then
  tat = now + (tat - now) / was_interval * interval
  changed = true
end
-- No more is owed than a burst of the limit that wrote the state (a burst lowered keeps
-- what was spent under the higher one) or of this one. A state without its limit (another
-- writer's) holds the key back no longer than a full burst would.
local most = tolerance
if was_burst and was_burst > burst then most = interval * was_burst end
if tat > now + most then
  tat = now + most
  changed = true
end
-- Kept as converted, under this limit (with the requests still owed as its burst when
-- more than this one's): refused checks must not leave the state to be repaid at the
-- old rate.
if changed and tat > now then
  local owed = math.max(burst, math.ceil((tat - now) / interval))
  redis.call('SET', KEYS[1], string.format('%.0f %.0f %.0f', tat, interval, owed), 'PX', ttl(tat - now))
end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > tolerance then
  return string.format('0 0 %.0f %.0f', ahead - tolerance, tat - now)
end
redis.call('SET', KEYS[1], string.format('%.0f %.0f %.0f', new_tat, interval, burst), 'PX', ttl(ahead))
local remaining = 0
if interval > 0 then remaining = math.floor((tolerance - ahead) / interval) end
return string.format('1 %.0f 0 %.0f', remaining, ahead)
";

/// Longest emission interval sent to Redis (~31 years): keeps every sum exact in Lua's
/// doubles however slow a rate is configured.
const MAX_INTERVAL_US: f64 = 1e15;

/// Why a limited key could not be checked (`deny` while Redis is unreachable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

pub enum Limiter {
    Local(RateLimiter),
    Redis(RedisLimiter),
}

pub struct RedisLimiter {
    cluster: Arc<Cluster>,
    script: redis::Script,
    /// One connection per calling thread.
    conns: ThreadConns,
    /// This replica's own cells: charged for every request, the only limit while Redis is
    /// unreachable (`on_error: local`).
    fallback: RateLimiter,
}

impl Limiter {
    pub fn new(cluster: Option<&Arc<Cluster>>) -> Self {
        match cluster {
            None => Self::Local(RateLimiter::default()),
            Some(c) => Self::Redis(RedisLimiter {
                cluster: c.clone(),
                script: redis::Script::new(GCRA),
                conns: ThreadConns::new(c),
                fallback: RateLimiter::default(),
            }),
        }
    }

    /// The key's decision. Unlimited keys answer at once, without any I/O.
    pub async fn check(&self, key: &Key) -> Result<RateDecision, Unavailable> {
        match self {
            Self::Local(l) => Ok(l.check(key, Instant::now())),
            Self::Redis(r) => {
                if key.rate_limit().is_none() {
                    return Ok(RateDecision::Unlimited);
                }
                // Boxed: keeps the request's future small when no Redis call is made.
                Box::pin(r.check(key)).await
            }
        }
    }

    /// Threads with a connection of their own to Redis (0 with the local limiter).
    pub fn connections(&self) -> usize {
        match self {
            Self::Local(_) => 0,
            Self::Redis(r) => r.conns.connected(),
        }
    }

    /// Drop per-replica state of keys no longer in the snapshot.
    pub fn retain(&self, snapshot: &Snapshot) {
        match self {
            Self::Local(l) => l.retain(snapshot),
            Self::Redis(r) => r.fallback.retain(snapshot),
        }
    }
}

impl RedisLimiter {
    /// `{prefix}rl:{<key id>}`: the key id in a hash tag (one Redis Cluster slot). Built
    /// without `format!`, which cost more than the rest of the call's preparation.
    fn state_key(&self, id: &str) -> String {
        let prefix = &self.cluster.config.prefix;
        let mut name = String::with_capacity(prefix.len() + id.len() + 5);
        name.push_str(prefix);
        name.push_str("rl:{");
        name.push_str(id);
        name.push('}');
        name
    }

    async fn check(&self, key: &Key) -> Result<RateDecision, Unavailable> {
        let Some(limit) = key.rate_limit() else {
            return Ok(RateDecision::Unlimited);
        };
        // This replica's own cell is charged for every request, whoever decides it: the
        // limit held here while Redis is unreachable then starts from what the key really
        // used. Charged only while Redis was down, it was full each time Redis went away,
        // and the Redis state was as fresh each time Redis came back: a key that Redis
        // went up and down under got twice its limit, on one replica. A request this cell
        // refuses is past the key's limit on this replica alone: refused without a call.
        let local = self.fallback.check(key, Instant::now());
        if matches!(local, RateDecision::Limited { .. }) {
            return Ok(local);
        }
        if self.cluster.is_up() {
            let deadline = tokio::time::Instant::now() + self.cluster.config.timeout;
            // A connection Redis closed while idle (past its `timeout`, or a restart) fails
            // its next call at once: that call is made again on a fresh connection, within
            // the same deadline, rather than sent to `on_error`. A connection that does not
            // answer in time is replaced too: one stuck on a path that silently stopped
            // (a NAT entry gone, a proxy hung) would otherwise cost every call its whole
            // deadline until the kernel gave up on it, minutes later, while the shared
            // connection's probe kept finding Redis up.
            for attempt in 0..2 {
                let conn = match self.conns.get(deadline).await {
                    Ok(conn) => conn,
                    Err(NoConnection::BackingOff) => break,
                    // Counted, not taken for Redis down: a worker too busy to finish its
                    // connect in time (a local overload) marked a healthy Redis down, over
                    // and over. The requests after this one do not wait for that connect.
                    Err(NoConnection::TimedOut) => {
                        self.cluster.metrics.error(Op::RateLimit);
                        break;
                    }
                };
                match self.evaluate(key, &limit, deadline, conn).await {
                    Ok(Some(decided)) => return Ok(decided),
                    Ok(None) => break,
                    Err(e) if e.is_dropped() => {
                        self.conns.reset();
                        if attempt == 1 {
                            // Dropped again at once: not an idle connection's end but a
                            // Redis (or a path to it) that drops calls. Counted.
                            self.cluster.metrics.error(Op::RateLimit);
                        }
                    }
                    Err(e) => {
                        if e.is_broken() || matches!(e, super::ClusterError::Timeout) {
                            self.conns.reset();
                        }
                        break;
                    }
                }
            }
        }
        match self.cluster.config.on_error {
            OnError::Local => Ok(local),
            OnError::Deny => {
                // Refused (503) without being served: nothing used. Kept charged, a key's
                // cell ran dry through an outage, and turned the 503s into 429s, then
                // refused after Redis came back what the fleet allowed.
                self.fallback.refund(key);
                Err(Unavailable)
            }
        }
    }
}

impl RedisLimiter {
    /// One run of the script for `key` on `conn`. `None`: a reply that does not parse
    /// (counted).
    async fn evaluate(
        &self,
        key: &Key,
        limit: &crate::keys::RateLimit,
        deadline: tokio::time::Instant,
        conn: redis::aio::MultiplexedConnection,
    ) -> Result<Option<RateDecision>, super::ClusterError> {
        let interval = (1e6 / limit.per_second).clamp(0.0, MAX_INTERVAL_US).round();
        // Sized up front: growing the command's buffers cost as much as filling them.
        let mut call = redis::Cmd::with_capacity(6, 128);
        call.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(1)
            .arg(self.state_key(&key.id))
            .arg(interval as u64)
            .arg(limit.burst);
        let script = &self.script;
        let reply = self
            .cluster
            .call_on(Op::RateLimit, deadline, conn, |mut c| async move {
                match call.query_async::<String>(&mut c).await {
                    // A Redis that restarted: load the script once, then again.
                    Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                        script.prepare_invoke().load_async(&mut c).await?;
                        call.query_async(&mut c).await
                    }
                    r => r,
                }
            })
            .await?;
        let decided = parse_reply(&reply).map(|r| decision(limit.burst, r));
        if decided.is_none() {
            self.cluster.metrics.error(Op::RateLimit);
        }
        Ok(decided)
    }
}

/// The script's reply: four whole numbers separated by spaces. Read as doubles (what Lua
/// computed them as) and saturated: a vanishing rate with a large burst owes more
/// microseconds than an `i64` holds, and a reply that did not parse counted as Redis
/// failing (each replica then limited alone; `deny` refused for good).
fn parse_reply(reply: &str) -> Option<(i64, i64, i64, i64)> {
    let whole = |s: &str| {
        let digits = s.strip_prefix('-').unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<f64>().ok().map(|v| v as i64)
    };
    let mut it = reply.split(' ').map(whole);
    let mut next = || it.next()?;
    let parsed = (next()?, next()?, next()?, next()?);
    it.next().is_none().then_some(parsed)
}

/// The script's reply as a decision.
fn decision(
    burst: u32,
    (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64),
) -> RateDecision {
    let secs = |us: i64| u64::try_from(us).unwrap_or(0).div_ceil(1_000_000);
    if allowed == 1 {
        return RateDecision::Allowed(Quota {
            limit: burst,
            remaining: u32::try_from(remaining).unwrap_or(if remaining < 0 { 0 } else { u32::MAX }),
            reset_secs: secs(reset_us),
        });
    }
    let retry_after_secs = secs(retry_us).max(1);
    RateDecision::Limited {
        quota: Quota {
            limit: burst,
            remaining: 0,
            reset_secs: retry_after_secs,
        },
        retry_after_secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_key_puts_the_id_in_a_hash_tag() {
        let config = crate::config::ClusterConfig {
            redis: "redis://127.0.0.1:1/0".into(),
            prefix: "kw:".into(),
            timeout: std::time::Duration::from_millis(50),
            on_error: OnError::Local,
            redis_from_env: false,
        };
        let cluster = Arc::new(Cluster::new(&config, &prometheus::Registry::new()).unwrap());
        let Limiter::Redis(r) = Limiter::new(Some(&cluster)) else {
            panic!("a cluster makes a Redis limiter");
        };
        assert_eq!(r.state_key("key_1"), "kw:rl:{key_1}");
        assert_eq!(r.state_key("key_1"), cluster.key("rl:{key_1}"));
    }

    #[test]
    fn replies_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_reply("1 9 0 100000"), Some((1, 9, 0, 100_000)));
        assert_eq!(parse_reply("0 0 -1 5"), Some((0, 0, -1, 5)));
        // Review: owed past what an i64 holds (a vanishing rate, a large burst) is a
        // decision, not a failed call.
        assert_eq!(
            parse_reply("0 0 10001796642020573184 10001796642020573184"),
            Some((0, 0, i64::MAX, i64::MAX))
        );
        for bad in ["", "1 2 3", "1 2 3 4 5", "1 x 3 4", "1  2 3 4", "1e3 0 0 0"] {
            assert_eq!(parse_reply(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replies_map_to_decisions() {
        assert_eq!(
            decision(10, (1, 9, 0, 100_000)),
            RateDecision::Allowed(Quota {
                limit: 10,
                remaining: 9,
                reset_secs: 1
            })
        );
        assert_eq!(
            decision(10, (0, 0, 2_500_000, 0)),
            RateDecision::Limited {
                quota: Quota {
                    limit: 10,
                    remaining: 0,
                    reset_secs: 3
                },
                retry_after_secs: 3
            }
        );
        // A nonsense reply never panics: it clamps.
        assert!(matches!(
            decision(1, (0, -5, -1, -1)),
            RateDecision::Limited {
                retry_after_secs: 1,
                ..
            }
        ));
        assert!(matches!(
            decision(1, (1, -5, -1, -1)),
            RateDecision::Allowed(Quota { remaining: 0, .. })
        ));
    }
}
