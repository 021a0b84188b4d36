//! Prometheus instruments (SPEC 10), owned by the `App` in its own
//! `Registry` so several instances can live in one process (tests). Every labelled series on
//! the request path is created up front and indexed, so recording is a few atomic adds, on
//! the recording worker's own [`Shard`].

mod shard;

pub use shard::{InFlight, Shard};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::auth::Code;
use crate::keys::{Snapshot, Source};

/// From 25 µs (a cached auth decision) to 10 s (a slow upstream).
const BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upstream failure kinds (`keyward_upstream_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    /// Refused before any upstream connection: `limits.max_in_flight` reached.
    Overload,
    Other,
    /// Refused before any upstream connection: the request came back to this keyward
    /// through its own upstream (`proxy::hop`).
    Loop,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Overload => "overload",
            Self::Other => "other",
            Self::Loop => "loop",
        }
    }
}

/// `allowed` when auth let the request through (even if the upstream then failed), so the
/// denial ratio measures auth, not the app.
pub fn decision_label(code: Code) -> &'static str {
    match code {
        // A client gone before its answer was waiting on the upstream (or a shared rate
        // limit): it was let through.
        Code::Ok
        | Code::UpstreamUnavailable
        | Code::UpstreamTimeout
        | Code::ClientClosed
        | Code::CutAtShutdown => "allowed",
        _ => "denied",
    }
}

pub struct Metrics {
    registry: Registry,
    /// Requests, their durations and those in flight, one shard per worker.
    requests: Arc<shard::Sharded>,
    upstream_errors: [IntCounter; 5],
    snapshot_keys: IntGauge,
    snapshot_version: IntGauge,
    reloads: IntCounterVec,
    /// 1 while the last snapshot a source offered was refused (by `result`).
    refused: IntGaugeVec,
    last_reload: Gauge,
    key_expiry: Option<GaugeVec>,
    /// `metrics.per_key_limit`: the most `key_expiry` series.
    per_key_limit: usize,
    /// The sidecar's `environment`: keys bound to another one export no expiry series.
    environment: Option<String>,
    generated: Gauge,
    max_age: Gauge,
    ready: IntGauge,
    connections_refused: IntCounter,
    /// HTTP/2 connections closed for control frames past their budget (`proxy::h2_guard`).
    h2_floods: IntCounter,
    /// `evicted` and `refused`, resolved once.
    admin_closed: [IntCounter; 2],
}

/// Why an admin connection was closed to keep the admin listener's bounds.
pub const ADMIN_CLOSED: [&str; 2] = ["evicted", "refused"];

impl Metrics {
    /// One shard: for tests and tools that record from one thread.
    pub fn new(per_key: bool) -> Result<Self, prometheus::Error> {
        Self::sharded(per_key, 1)
    }

    /// `shards` request-path shards: one per worker thread.
    pub fn sharded(per_key: bool, shards: usize) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = Arc::new(shard::Sharded::new(shards)?);
        let upstream_errors_vec = IntCounterVec::new(
            Opts::new(
                "keyward_upstream_errors_total",
                "Failed upstream exchanges by kind.",
            ),
            &["kind"],
        )?;
        let snapshot_keys =
            IntGauge::new("keyward_snapshot_keys", "Keys in the current snapshot.")?;
        let snapshot_version = IntGauge::new(
            "keyward_snapshot_version",
            "The current snapshot's version field (0 when absent).",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "keyward_snapshot_reloads_total",
                "Snapshot loads by source and result.",
            ),
            &["source", "result"],
        )?;
        let refused = IntGaugeVec::new(
            Opts::new(
                "keyward_snapshot_refused",
                "1 while the last snapshot a source offered was refused (result: error or guarded) and the one in force is older; 0 once one loads.",
            ),
            &["source", "result"],
        )?;
        let last_reload = Gauge::new(
            "keyward_snapshot_last_reload_timestamp_seconds",
            "Unix time of the last successful snapshot load.",
        )?;
        let generated = Gauge::new(
            "keyward_snapshot_generated_timestamp_seconds",
            "The current snapshot's generated_at as Unix time (0 when absent).",
        )?;
        let max_age = Gauge::new(
            "keyward_snapshot_max_age_seconds",
            "keys.max_age: past generated_at + this, keyward fails closed (0 when unset).",
        )?;
        let connections_refused = IntCounter::new(
            "keyward_connections_refused_total",
            "Connections closed at accept because limits.max_connections were open (both traffic listeners).",
        )?;
        let h2_floods = IntCounter::new(
            "keyward_h2_floods_total",
            "HTTP/2 connections closed because their client sent WINDOW_UPDATE, PRIORITY, PRIORITY_UPDATE, SETTINGS, PING or unknown-type frames past their budget (both traffic listeners).",
        )?;
        let admin_closed = IntCounterVec::new(
            Opts::new(
                "keyward_admin_connections_closed_total",
                "Admin connections closed to keep the listener's bounds: evicted (the one waiting longest for a request, for a new one) or refused (every one was serving a request).",
            ),
            &["why"],
        )?;
        let ready = IntGauge::new(
            "keyward_ready",
            "1 when keyward can authenticate (what /readyz says), 0 when it fails closed or drains.",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "keyward_build_info",
                "Always 1; the version label says which keyward is running.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let key_expiry = per_key
            .then(|| {
                GaugeVec::new(
                    Opts::new(
                        "keyward_key_expiry_timestamp_seconds",
                        "Unix time at which a key expires (keys with expires_at only).",
                    ),
                    &["key_id"],
                )
            })
            .transpose()?;

        registry.register(Box::new(shard::Registered(requests.clone())))?;
        registry.register(Box::new(upstream_errors_vec.clone()))?;
        registry.register(Box::new(snapshot_keys.clone()))?;
        registry.register(Box::new(snapshot_version.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(last_reload.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(generated.clone()))?;
        registry.register(Box::new(max_age.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(h2_floods.clone()))?;
        registry.register(Box::new(admin_closed.clone()))?;
        if let Some(k) = &key_expiry {
            registry.register(Box::new(k.clone()))?;
        }

        for source in [Source::File, Source::Control] {
            for result in ["ok", "error", "guarded"] {
                reloads.with_label_values(&[source.as_str(), result]);
            }
            for result in REFUSALS {
                refused.with_label_values(&[source.as_str(), result]);
            }
        }
        Ok(Self {
            registry,
            requests,
            upstream_errors: [
                UpstreamErrorKind::Connect,
                UpstreamErrorKind::Timeout,
                UpstreamErrorKind::Overload,
                UpstreamErrorKind::Other,
                UpstreamErrorKind::Loop,
            ]
            .map(|k| upstream_errors_vec.with_label_values(&[k.as_str()])),
            snapshot_keys,
            snapshot_version,
            reloads,
            refused,
            last_reload,
            key_expiry,
            per_key_limit: usize::MAX,
            environment: None,
            generated,
            max_age,
            ready,
            connections_refused,
            h2_floods,
            admin_closed: ADMIN_CLOSED.map(|why| admin_closed.with_label_values(&[why])),
        })
    }

    /// The counter the accept loops count refused connections in.
    pub fn connections_refused(&self) -> IntCounter {
        self.connections_refused.clone()
    }

    /// The counter HTTP/2 connections closed for a flood of control frames count in.
    pub fn h2_floods(&self) -> IntCounter {
        self.h2_floods.clone()
    }

    /// An admin connection closed to keep the admin listener's bounds: `why` is one of
    /// [`ADMIN_CLOSED`].
    pub fn admin_connection_closed(&self, why: &str) {
        if let Some(i) = ADMIN_CLOSED.iter().position(|w| *w == why) {
            self.admin_closed[i].inc();
        }
    }

    /// What `/readyz` says now (set on every scrape and every second).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// `metrics.per_key_limit` and `keys.max_age` (SPEC 16), and the sidecar's
    /// `environment` (which keys can be used here, so which expiries matter).
    pub fn with_snapshot_safety(
        mut self,
        per_key_limit: usize,
        max_age: Option<Duration>,
        environment: &str,
    ) -> Self {
        self.per_key_limit = per_key_limit;
        self.environment = Some(environment.to_owned());
        self.max_age.set(max_age.map_or(0.0, |a| a.as_secs_f64()));
        self
    }

    /// The registry, for instruments owned by other components (the cluster's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The request-path shard of worker `i`.
    pub fn shard(&self, i: usize) -> Arc<Shard> {
        self.requests.shard(i)
    }

    pub fn record_upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }

    /// Requests in flight, over every shard.
    pub fn in_flight(&self) -> i64 {
        self.requests.in_flight()
    }

    /// A snapshot was loaded and published.
    pub fn snapshot_loaded(&self, snapshot: &Snapshot) {
        self.reloads
            .with_label_values(&[snapshot.source.as_str(), "ok"])
            .inc();
        self.set_refused(snapshot.source, None);
        self.snapshot_keys.set(snapshot.len() as i64);
        self.snapshot_version.set(
            snapshot
                .version
                .map_or(0, |v| v.min(i64::MAX as u64) as i64),
        );
        self.last_reload.set(unix_seconds(SystemTime::now()));
        self.generated
            .set(snapshot.generated_at.map_or(0.0, unix_seconds));
        if let Some(expiry) = &self.key_expiry {
            expiry.reset();
            let env = self.environment.as_deref();
            let soonest = soonest_expiring(snapshot, self.per_key_limit, env, SystemTime::now());
            for (id, exp) in soonest {
                expiry.with_label_values(&[id]).set(unix_seconds(exp));
            }
        }
    }

    /// A snapshot was held back by the blast-radius guard; the previous one stays.
    pub fn snapshot_guarded(&self, source: Source) {
        self.reloads
            .with_label_values(&[source.as_str(), "guarded"])
            .inc();
        self.set_refused(source, Some("guarded"));
    }

    /// A snapshot was refused; the previous one stays.
    pub fn snapshot_failed(&self, source: Source) {
        self.reloads
            .with_label_values(&[source.as_str(), "error"])
            .inc();
        self.set_refused(source, Some("error"));
    }

    /// The snapshot in force was persisted again after a failure to (a retried disable):
    /// the refusal no longer holds.
    pub fn snapshot_persisted(&self, source: Source) {
        self.set_refused(source, None);
    }

    /// The counters say a refusal happened; this says it still holds (a bad file is
    /// counted once, then left in place), so an alert can hold on for as long.
    fn set_refused(&self, source: Source, result: Option<&str>) {
        for r in REFUSALS {
            self.refused
                .with_label_values(&[source.as_str(), r])
                .set(i64::from(result == Some(r)));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The `result` labels of `keyward_snapshot_refused`.
const REFUSALS: [&str; 2] = ["error", "guarded"];

/// At most `limit` keys with an `expires_at`: those still valid at `now` first, soonest
/// expiry first, then (if room is left) those already expired, most recent first. Only
/// keys a client could use here: a disabled key, or one bound to another `environment`,
/// would alert about an expiry that denies no one, and take a live key's place.
fn soonest_expiring<'a>(
    snapshot: &'a Snapshot,
    limit: usize,
    environment: Option<&str>,
    now: SystemTime,
) -> Vec<(&'a str, SystemTime)> {
    let here = |k: &crate::keys::Key| {
        k.status == crate::keys::Status::Active
            && match (k.environment(), environment) {
                (Some(bound), Some(env)) => bound == env,
                _ => true,
            }
    };
    let mut keys: Vec<(&str, SystemTime)> = snapshot
        .keys()
        .filter(|k| here(k))
        .filter_map(|k| Some((k.id.as_str(), k.expires_at?)))
        .collect();
    fn rank<'a>(now: SystemTime, &(id, exp): &(&'a str, SystemTime)) -> (bool, Duration, &'a str) {
        match exp.duration_since(now) {
            Ok(ahead) => (false, ahead, id),
            Err(past) => (true, past.duration(), id),
        }
    }
    if keys.len() > limit {
        keys.select_nth_unstable_by_key(limit, |k| rank(now, k));
        keys.truncate(limit);
    }
    keys
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exported_up_front() {
        let m = Metrics::new(false).unwrap();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"keyward_requests_total{code="invalid_api_key",decision="denied"} 0"#)
        );
        assert!(text.contains(r#"keyward_requests_total{code="ok",decision="allowed"} 0"#));
        assert!(text.contains(r#"keyward_upstream_errors_total{kind="timeout"} 0"#));
        assert!(text.contains("keyward_auth_duration_seconds_bucket{le=\"0.000025\"} 0"));
        assert!(!text.contains("keyward_key_expiry_timestamp_seconds"));
        let version = env!("CARGO_PKG_VERSION");
        assert!(text.contains(&format!("keyward_build_info{{version=\"{version}\"}} 1")));
    }

    #[test]
    fn in_flight_guard_decrements_when_dropped() {
        let m = Metrics::sharded(false, 2).unwrap();
        let a = m.shard(0).track_in_flight();
        let b = m.shard(1).track_in_flight();
        assert_eq!(m.in_flight(), 2);
        drop(a);
        assert_eq!(m.in_flight(), 1);
        // A request future dropped mid-flight drops its guard with it.
        let fut = async move {
            let _b = b;
            std::future::pending::<()>().await;
        };
        drop(fut);
        assert_eq!(m.in_flight(), 0);
    }

    #[test]
    fn per_key_exports_only_keys_with_an_expiry() {
        let snapshot = Snapshot::parse(
            include_str!("../config/keys.yaml"),
            crate::keys::Source::File,
        )
        .unwrap();
        let m = Metrics::new(true).unwrap();
        m.snapshot_loaded(&snapshot);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            r#"keyward_key_expiry_timestamp_seconds{key_id="key_demo_expired"} 1735689600"#
        ));
        assert_eq!(
            text.matches("keyward_key_expiry_timestamp_seconds{")
                .count(),
            1
        );
        assert!(text.contains("keyward_snapshot_keys 6"));
        assert!(text.contains("keyward_snapshot_version 1"));
        assert!(text.contains(r#"keyward_snapshot_reloads_total{result="ok",source="file"} 1"#));
        assert!(!text.contains("@example.com"));
    }

    #[test]
    fn per_key_series_are_bounded_to_the_keys_expiring_soonest() {
        // k8 is disabled and k7 bound to another environment: no one can use them here.
        let entry = |i: usize, expires: &str| {
            let unusable = match i {
                8 => ", status: disabled",
                7 => ", environment: staging",
                _ => "",
            };
            format!(
                "  - {{id: k{i}, sha256: {}, type: personal, subject_id: s, account_id: a, expires_at: {expires}{unusable}}}\n",
                hex::encode(crate::keys::digest(format!("key-{i}").as_bytes()))
            )
        };
        let mut text = String::from("generated_at: 2026-06-01T00:00:00Z\nkeys:\n");
        // k0..k9 expire in 2040 + i years; k10 expired long ago; k11 has no expiry.
        for i in 0..10 {
            text += &entry(i, &format!("{}-01-01T00:00:00Z", 2049 - i));
        }
        text += &entry(10, "2001-01-01T00:00:00Z");
        text += "  - {id: k11, sha256: 0000000000000000000000000000000000000000000000000000000000000011, type: personal, subject_id: s, account_id: a}\n";
        let snapshot = Snapshot::parse(&text, crate::keys::Source::File).unwrap();
        let m = Metrics::new(true).unwrap().with_snapshot_safety(
            3,
            Some(Duration::from_secs(3600)),
            "production",
        );
        m.snapshot_loaded(&snapshot);
        let out = String::from_utf8(m.render()).unwrap();
        let series: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("keyward_key_expiry_timestamp_seconds{"))
            .collect();
        assert_eq!(series.len(), 3, "{series:?}");
        for soonest in ["k9", "k6", "k5"] {
            assert!(out.contains(&format!("{{key_id=\"{soonest}\"}}")), "{out}");
        }
        assert!(out.contains("keyward_snapshot_generated_timestamp_seconds 1780272000"));
        assert!(out.contains("keyward_snapshot_max_age_seconds 3600"));
        // Room to spare: every key with an expiry, the expired one too.
        let m = Metrics::new(true)
            .unwrap()
            .with_snapshot_safety(1000, None, "production");
        m.snapshot_loaded(&snapshot);
        let out = String::from_utf8(m.render()).unwrap();
        assert_eq!(
            out.matches("keyward_key_expiry_timestamp_seconds{").count(),
            9
        );
        m.snapshot_guarded(crate::keys::Source::Control);
        let out = String::from_utf8(m.render()).unwrap();
        assert!(
            out.contains(r#"keyward_snapshot_reloads_total{result="guarded",source="control"} 1"#)
        );
        // The refusal holds until the source offers one that loads.
        assert!(out.contains(r#"keyward_snapshot_refused{result="guarded",source="control"} 1"#));
        m.snapshot_failed(crate::keys::Source::Control);
        let out = String::from_utf8(m.render()).unwrap();
        assert!(out.contains(r#"keyward_snapshot_refused{result="guarded",source="control"} 0"#));
        assert!(out.contains(r#"keyward_snapshot_refused{result="error",source="control"} 1"#));
        assert!(out.contains(r#"keyward_snapshot_reloads_total{result="guarded",source="file"} 0"#));
    }

    #[test]
    fn recording_moves_the_right_series() {
        let m = Metrics::sharded(false, 3).unwrap();
        m.shard(1)
            .record_request(Code::InsufficientScope, Duration::from_millis(1));
        m.shard(2).record_upstream(503, Duration::from_millis(2));
        m.record_upstream_error(UpstreamErrorKind::Connect);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text
            .contains(r#"keyward_requests_total{code="insufficient_scope",decision="denied"} 1"#));
        assert!(text.contains(r#"keyward_request_duration_seconds_count{decision="denied"} 1"#));
        assert!(text.contains(r#"keyward_upstream_duration_seconds_count{status_class="5xx"} 1"#));
        assert!(text.contains(r#"keyward_upstream_errors_total{kind="connect"} 1"#));
    }
}
