//! The cluster's instruments (SPEC 14), registered in the App's own registry. Every `op`
//! series is created up front and indexed, so recording is an atomic add.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// What a Redis call was for (`op` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Connect,
    Ping,
    RateLimit,
    Revoke,
    ReadRevocations,
    Subscribe,
    UsageFlush,
    UsageRead,
    /// Not a failed call: a read keyward refused because what Redis holds is past its
    /// bound (Redis may be shared, its values are anyone's to write). Its own series, so
    /// junk in Redis is told apart from an outage.
    Oversize,
}

impl Op {
    const ALL: [Op; 9] = [
        Op::Connect,
        Op::Ping,
        Op::RateLimit,
        Op::Revoke,
        Op::ReadRevocations,
        Op::Subscribe,
        Op::UsageFlush,
        Op::UsageRead,
        Op::Oversize,
    ];

    /// A call whose success shows Redis can serve rate limits: the probe (a script's write
    /// under the rate-limit keys) and a rate-limit call. Not any write: a usage flush or a
    /// revoke passed where an ACL refused the rate-limit keys (or on a replica where an
    /// empty flush writes nothing), and marked Redis up after every refused limit call.
    pub fn proves_up(self) -> bool {
        matches!(self, Op::Ping | Op::RateLimit)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Connect => "connect",
            Op::Ping => "ping",
            Op::RateLimit => "ratelimit",
            Op::Revoke => "revoke",
            Op::ReadRevocations => "read_revocations",
            Op::Subscribe => "subscribe",
            Op::UsageFlush => "usage_flush",
            Op::UsageRead => "usage_read",
            Op::Oversize => "oversize",
        }
    }
}

/// From 50 µs (a loopback round trip) to 1 s (past any sane `cluster.timeout`).
const CALL_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Revoke-to-effect: SPEC 14 promises 1 s.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

pub struct ClusterMetrics {
    pub up: IntGauge,
    errors: Vec<IntCounter>,
    durations: Vec<Histogram>,
    pub revocation_lag: Histogram,
}

impl ClusterMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let up = IntGauge::new(
            "keyward_cluster_up",
            "1 while Redis (cluster.redis) answers, 0 otherwise",
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "keyward_cluster_errors_total",
                "Redis calls that failed or timed out, by operation",
            ),
            &["op"],
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "keyward_cluster_call_duration_seconds",
                "Duration of Redis calls, by operation",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["op"],
        )?;
        let revocation_lag = Histogram::with_opts(
            HistogramOpts::new(
                "keyward_revocation_lag_seconds",
                "From a revoke or enable on one replica to its effect on this one",
            )
            .buckets(LAG_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(durations.clone()))?;
        registry.register(Box::new(revocation_lag.clone()))?;
        Ok(Self {
            up,
            errors: Op::ALL
                .iter()
                .map(|op| errors.with_label_values(&[op.as_str()]))
                .collect(),
            durations: Op::ALL
                .iter()
                .map(|op| durations.with_label_values(&[op.as_str()]))
                .collect(),
            revocation_lag,
        })
    }

    pub fn observe(&self, op: Op, took: Duration) {
        self.durations[op as usize].observe(took.as_secs_f64());
    }

    pub fn error(&self, op: Op) {
        self.errors[op as usize].inc();
    }
}
