//! `cluster` (SPEC 14): the Redis a fleet of replicas shares.

use std::time::Duration;

use serde::Deserialize;

use super::error::{invalid, ConfigError};
use super::yaml::de_duration;

/// `cluster` (SPEC 14): where replicas share rate limits, revocations and usage.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` (TLS); credentials in the URL or `KEYWARD_REDIS_URL`.
    pub redis: String,
    /// Every Redis key keyward writes starts with it.
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
    /// One Redis call; past it the call has failed.
    #[serde(default = "default_cluster_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_error: OnError,
    /// `redis` came from `KEYWARD_REDIS_URL`: what its errors name ([`Self::redis_field`]).
    #[serde(skip)]
    pub redis_from_env: bool,
}

impl ClusterConfig {
    pub fn with_url(redis: String) -> Self {
        Self {
            redis,
            prefix: default_cluster_prefix(),
            timeout: default_cluster_timeout(),
            on_error: OnError::default(),
            redis_from_env: false,
        }
    }

    /// Where `redis` was set, as an error about it names it.
    pub fn redis_field(&self) -> &'static str {
        match self.redis_from_env {
            true => "KEYWARD_REDIS_URL (cluster.redis)",
            false => "cluster.redis",
        }
    }
}

/// The URL may hold a password: `Debug` leaves it out.
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

/// What a rate-limited key gets while Redis is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Enforce the limit per replica.
    #[default]
    Local,
    /// 503 `auth_unavailable`.
    Deny,
}

fn default_cluster_prefix() -> String {
    "keyward:".into()
}

fn default_cluster_timeout() -> Duration {
    Duration::from_millis(50)
}

impl ClusterConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let c = self;
        // Never echo the URL: it may hold a password.
        let rest = ["redis://", "rediss://"].iter().find_map(|scheme| {
            let head = c.redis.get(..scheme.len())?;
            head.eq_ignore_ascii_case(scheme)
                .then(|| &c.redis[scheme.len()..])
        });
        if rest.is_none_or(str::is_empty) {
            return Err(invalid(
                "cluster.redis",
                "must be a redis:// or rediss:// URL with a host",
            ));
        }
        if c.timeout.is_zero() {
            return Err(invalid("cluster.timeout", "must be greater than zero"));
        }
        if c.prefix.is_empty() || c.prefix.contains(['{', '}']) {
            return Err(invalid(
                "cluster.prefix",
                "must not be empty nor contain `{` or `}`",
            ));
        }
        Ok(())
    }
}
