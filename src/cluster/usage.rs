//! Usage over the fleet (SPEC 14): each replica counts locally ([`Usage`], no Redis call on
//! the request path) and flushes what it counted since the last flush about once a second,
//! all keys in one call (one script: `HINCRBY` the counts, keep the latest last-used time).
//! `GET /v1/keys/usage` then reads the fleet's totals in one round trip and adds what this
//! replica has not flushed yet.
//!
//! A flush that times out may or may not have landed; it is sent again, so a count can be
//! over by one flush's worth after a Redis failure, never under.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::keys::usage::{report_entries, KeyUsage, Usage};
use crate::keys::{Snapshot, Text};

use super::metrics::Op;
use super::{Cluster, ClusterError};

pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// KEYS[1]: counts hash, KEYS[2]: last-used hash (ms). ARGV: id, delta, last_ms, ...
const FLUSH: &str = r"
for i = 1, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[i]))
  if not cur or cur < tonumber(ARGV[i + 2]) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  end
end
return 1
";

/// Flushes this replica's counts and reads the fleet's.
pub struct FleetUsage {
    cluster: Arc<Cluster>,
    /// Per key id, the request count already added to Redis.
    flushed: Mutex<HashMap<Text, u64>>,
    script: redis::Script,
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
            flushed: Mutex::new(HashMap::new()),
            script: redis::Script::new(FLUSH),
        }
    }

    fn hashes(&self) -> (String, String) {
        (
            self.cluster.key("usage:count"),
            self.cluster.key("usage:last"),
        )
    }

    /// Send what was counted since the last flush, in one call.
    pub async fn flush(&self, usage: &Usage) -> Result<usize, ClusterError> {
        let counts = usage.counts();
        let todo = {
            let mut flushed = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
            // Keys that left the snapshot (and the local map): start them afresh.
            let present: std::collections::HashSet<&Text> =
                counts.iter().map(|(id, _, _)| id).collect();
            flushed.retain(|id, _| present.contains(id));
            pending(&counts, &flushed)
        };
        if todo.is_empty() {
            return Ok(0);
        }
        let (count, last) = self.hashes();
        let script = &self.script;
        let args = &todo;
        self.cluster
            .call(Op::UsageFlush, |mut c| async move {
                let mut inv = script.key(count);
                inv.key(last);
                for (id, delta, ms) in args {
                    inv.arg(&**id).arg(*delta).arg(*ms);
                }
                inv.invoke_async::<i64>(&mut c).await
            })
            .await?;
        let mut flushed = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
        for (id, delta, _) in &todo {
            *flushed.entry(id.clone()).or_insert(0) += delta;
        }
        Ok(todo.len())
    }

    /// The fleet's usage: Redis totals plus what this replica has not flushed yet.
    pub async fn report(
        &self,
        usage: &Usage,
        snapshot: Option<&Snapshot>,
    ) -> Result<Vec<KeyUsage>, ClusterError> {
        let (count, last) = self.hashes();
        let (counts, lasts): (HashMap<String, u64>, HashMap<String, u64>) = self
            .cluster
            .call(Op::UsageRead, |mut c| async move {
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(count)
                    .cmd("HGETALL")
                    .arg(last)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut merged: HashMap<String, (u64, u64)> = counts
            .into_iter()
            .map(|(id, n)| {
                let ms = lasts.get(&id).copied().unwrap_or(0);
                (id, (ms, n))
            })
            .collect();
        let local = usage.counts();
        let unflushed = {
            let flushed = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
            pending(&local, &flushed)
        };
        for (id, delta, ms) in unflushed {
            let e = merged.entry(id.to_string()).or_insert((0, 0));
            e.0 = e.0.max(ms);
            e.1 += delta;
        }
        Ok(report_entries(
            snapshot,
            merged.into_iter().map(|(id, (ms, n))| (id, ms, n)),
        ))
    }

    /// Flush every [`FLUSH_INTERVAL`], for the life of the process.
    pub async fn run(self: Arc<Self>, usage: &Usage) {
        loop {
            tokio::time::sleep(FLUSH_INTERVAL).await;
            if let Err(e) = self.flush(usage).await {
                tracing::debug!(error = %e, "usage flush failed; retried next time");
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
