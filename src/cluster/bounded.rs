//! Reads of single hash fields with a size bound, checked in Redis before anything is sent.
//!
//! Redis may be shared, and what it holds is anyone's to write: a plain `HGET` of a field
//! someone set to 100 MiB makes every replica that reads it (the revocation version, twice a
//! second) receive, buffer and parse 100 MiB, hundreds of MB of memory each and a revoke
//! that takes seconds to arrive. [`FIELDS`] asks `HSTRLEN` first (O(1)) and sends a value
//! only within the bound; past it, only its length. The refusal is counted
//! (`op="oversize"`), never an error of the call: junk in Redis is not an outage, and must
//! not mark Redis down.

use super::metrics::Op;
use super::{Cluster, ClusterError};

/// KEYS[1]: a hash. ARGV[1]: the longest value sent; ARGV[2]: `1` to start the reply with
/// `HLEN` (one round trip for a size check and a field); then fields. Per field: its value,
/// nil if there is none, or its length (an integer) if it is longer than ARGV[1]. A key of
/// another type is not keyward's: read as an empty hash (every read failed on it, so a
/// restarted replica was never ready), and replaced by keyward's next write.
const FIELDS: &str = r"
local max = tonumber(ARGV[1])
local out = {}
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then
  if ARGV[2] == '1' then out[1] = 0 end
  for i = 3, #ARGV do out[#out + 1] = false end
  return out
end
if ARGV[2] == '1' then out[1] = redis.call('HLEN', KEYS[1]) end
for i = 3, #ARGV do
  local n = redis.call('HSTRLEN', KEYS[1], ARGV[i])
  if n > max then
    out[#out + 1] = n
  else
    out[#out + 1] = redis.call('HGET', KEYS[1], ARGV[i])
  end
end
return out
";

/// One field as a bounded read found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Absent,
    Value(String),
    /// Longer than the bound (its length): not read.
    Oversize(u64),
}

impl Field {
    pub fn value(&self) -> Option<&str> {
        match self {
            Field::Value(v) => Some(v),
            _ => None,
        }
    }
}

/// Reads single fields within a bound ([`FIELDS`]).
pub struct BoundedRead {
    script: redis::Script,
}

impl Default for BoundedRead {
    fn default() -> Self {
        Self {
            script: redis::Script::new(FIELDS),
        }
    }
}

impl BoundedRead {
    /// `fields` of `hash`, each sent only if at most `max` bytes long; with `len`, the
    /// hash's field count too. A field past the bound is counted as `op="oversize"`.
    pub async fn read(
        &self,
        cluster: &Cluster,
        op: Op,
        hash: &str,
        max: usize,
        len: bool,
        fields: &[&str],
    ) -> Result<(Option<u64>, Vec<Field>), ClusterError> {
        let script = &self.script;
        let reply: Vec<redis::Value> = cluster
            .call(op, |mut c| async move {
                let mut inv = script.key(hash);
                inv.arg(max).arg(if len { "1" } else { "0" });
                for f in fields {
                    inv.arg(*f);
                }
                inv.invoke_async(&mut c).await
            })
            .await?;
        let mut it = reply.into_iter();
        let count = if len {
            match it.next() {
                Some(redis::Value::Int(n)) => Some(u64::try_from(n).unwrap_or(0)),
                _ => return Err(bad_reply()),
            }
        } else {
            None
        };
        let mut out = Vec::with_capacity(fields.len());
        for _ in fields {
            let field = match it.next() {
                Some(redis::Value::Nil) => Field::Absent,
                Some(redis::Value::BulkString(b)) => {
                    Field::Value(String::from_utf8_lossy(&b).into_owned())
                }
                Some(redis::Value::Int(n)) => {
                    cluster.metrics.error(Op::Oversize);
                    Field::Oversize(u64::try_from(n).unwrap_or(0))
                }
                _ => return Err(bad_reply()),
            };
            out.push(field);
        }
        Ok((count, out))
    }
}

fn bad_reply() -> ClusterError {
    ClusterError::Redis(redis::RedisError::from((
        redis::ErrorKind::TypeError,
        "bounded field read reply",
    )))
}
