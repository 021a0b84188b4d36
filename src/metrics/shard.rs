//! The request-path instruments, one shard per worker thread. A worker writes only its own
//! shard's cache lines and a scrape adds the shards up: two workers incrementing the same
//! counters would pass those lines between their cores on every request. And as a shard
//! has one writer, its counts are [`ThreadCount`](crate::thread_count::ThreadCount)s (nine adds a request, none locked).
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

use super::{decision_label, BUCKETS};
use crate::auth::Code;
use crate::thread_count::ThreadCount as Count;

const DECISIONS: [&str; 2] = ["allowed", "denied"];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One histogram's counts in one shard: per bucket (not cumulative; the last slot is above
/// every bound), and the sum in nanoseconds (integer adds, no compare-and-swap loop).
#[derive(Default)]
struct Hist {
    buckets: [Count; BUCKETS.len() + 1],
    sum_nanos: Count,
}

impl Hist {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let at = BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[at].add(1);
        self.sum_nanos
            .add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }
}

/// One worker's request-path instruments. Aligned so two shards never share a cache line.
#[repr(align(128))]
#[derive(Default)]
pub struct Shard {
    requests: [Count; Code::ALL.len()],
    /// By decision: allowed, denied.
    request_duration: [Hist; 2],
    auth_duration: Hist,
    /// By upstream status class, 1xx to 5xx.
    upstream_duration: [Hist; 5],
    /// Requests begun and ended: the gauge is their difference, read `ended` first, so
    /// it is never negative.
    begun: Count,
    ended: Count,
}

impl Shard {
    /// One finished request.
    pub fn record_request(&self, code: Code, elapsed: Duration) {
        self.requests[code.index()].add(1);
        let d = usize::from(decision_label(code) == "denied");
        self.request_duration[d].observe(elapsed);
    }

    pub fn record_auth(&self, elapsed: Duration) {
        self.auth_duration.observe(elapsed);
    }

    pub fn record_upstream(&self, status: u16, elapsed: Duration) {
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        self.upstream_duration[class].observe(elapsed);
    }

    /// Count a request as in flight for as long as the returned guard lives.
    pub fn track_in_flight(self: &Arc<Self>) -> InFlight {
        self.begun.add(1);
        InFlight(self.clone())
    }

    fn in_flight(&self) -> i64 {
        // `ended` is read first: a request that ends between the reads is counted as still
        // in flight, never as a negative.
        let ended = self.ended.get();
        self.begun.get().wrapping_sub(ended) as i64
    }
}

/// Counts one request in `keyward_in_flight_requests` until dropped, so a request whose
/// future is dropped (the client went away mid-flight) does not stay counted forever.
#[must_use = "the request stops counting as in flight when this is dropped"]
pub struct InFlight(Arc<Shard>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.ended.add(1);
    }
}

/// The shards, exported as the four request metric families and the in-flight gauge.
pub(super) struct Sharded {
    shards: Arc<[Arc<Shard>]>,
    descs: [Desc; 5],
}

impl Sharded {
    pub fn new(shards: usize) -> Result<Self, prometheus::Error> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            let labels = labels.iter().map(|l| (*l).to_owned()).collect();
            Desc::new(name.into(), help.into(), labels, Default::default())
        };
        Ok(Self {
            shards: (0..shards.max(1)).map(|_| Arc::default()).collect(),
            descs: [
                desc(
                    "keyward_requests_total",
                    "Requests by auth decision and code.",
                    &["decision", "code"],
                )?,
                desc(
                    "keyward_request_duration_seconds",
                    "Time from request head to response head, by decision.",
                    &["decision"],
                )?,
                desc(
                    "keyward_auth_duration_seconds",
                    "Time spent on the auth decision alone (no upstream).",
                    &[],
                )?,
                desc(
                    "keyward_upstream_duration_seconds",
                    "Time until the upstream's response head, by status class.",
                    &["status_class"],
                )?,
                desc("keyward_in_flight_requests", "Requests being served.", &[])?,
            ],
        })
    }

    /// Shard `i` (wrapping: more workers than shards share some).
    pub fn shard(&self, i: usize) -> Arc<Shard> {
        self.shards[i % self.shards.len()].clone()
    }

    pub fn in_flight(&self) -> i64 {
        self.shards.iter().map(|s| s.in_flight()).sum()
    }

    fn total(&self, f: impl Fn(&Shard) -> &Count) -> u64 {
        self.shards.iter().map(|s| f(s).get()).sum()
    }

    fn histogram(&self, f: impl Fn(&Shard) -> &Hist, labels: Vec<LabelPair>) -> proto::Metric {
        let mut h = proto::Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len());
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.total(|s| &f(s).buckets[i]);
            let mut b = proto::Bucket::default();
            b.set_cumulative_count(cumulative);
            b.set_upper_bound(*bound);
            buckets.push(b);
        }
        // The count is the buckets' sum, so it is never below the last bucket's.
        let count = cumulative + self.total(|s| &f(s).buckets[BUCKETS.len()]);
        h.set_bucket(buckets);
        h.set_sample_count(count);
        h.set_sample_sum(self.total(|s| &f(s).sum_nanos) as f64 / 1e9);
        let mut m = proto::Metric::from_label(labels);
        m.set_histogram(h);
        m
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    let mut out: Vec<LabelPair> = pairs
        .iter()
        .map(|(name, value)| {
            let mut l = LabelPair::default();
            l.set_name((*name).to_owned());
            l.set_value((*value).to_owned());
            l
        })
        .collect();
    out.sort();
    out
}

fn family(desc: &Desc, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(desc.fq_name.clone());
    f.set_help(desc.help.clone());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn value_metric(labels: Vec<LabelPair>, value: f64, kind: MetricType) -> proto::Metric {
    let mut m = proto::Metric::from_label(labels);
    if kind == MetricType::COUNTER {
        let mut c = proto::Counter::default();
        c.set_value(value);
        m.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    }
    m
}

/// [`Sharded`] as the registry holds it: the `Metrics` keeps the other handle.
pub(super) struct Registered(pub Arc<Sharded>);

impl Collector for Registered {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

impl Sharded {
    fn collect(&self) -> Vec<MetricFamily> {
        let [requests, request_duration, auth, upstream, in_flight] = &self.descs;
        let counts = Code::ALL
            .iter()
            .map(|c| {
                let l = labels(&[("decision", decision_label(*c)), ("code", c.as_str())]);
                let n = self.total(|s| &s.requests[c.index()]);
                value_metric(l, n as f64, MetricType::COUNTER)
            })
            .collect();
        let by_decision = DECISIONS
            .iter()
            .enumerate()
            .map(|(i, d)| self.histogram(|s| &s.request_duration[i], labels(&[("decision", d)])))
            .collect();
        let by_class = STATUS_CLASSES
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.histogram(|s| &s.upstream_duration[i], labels(&[("status_class", c)]))
            })
            .collect();
        let flying = value_metric(vec![], self.in_flight() as f64, MetricType::GAUGE);
        vec![
            family(requests, MetricType::COUNTER, counts),
            family(request_duration, MetricType::HISTOGRAM, by_decision),
            family(
                auth,
                MetricType::HISTOGRAM,
                vec![self.histogram(|s| &s.auth_duration, vec![])],
            ),
            family(upstream, MetricType::HISTOGRAM, by_class),
            family(in_flight, MetricType::GAUGE, vec![flying]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_add_up_at_scrape() {
        let m = Sharded::new(3).unwrap();
        let (a, b) = (m.shard(0), m.shard(1));
        a.record_request(Code::Ok, Duration::from_micros(30));
        b.record_request(Code::Ok, Duration::from_secs(20));
        b.record_request(Code::InvalidApiKey, Duration::from_micros(10));
        let held = [a.track_in_flight(), m.shard(2).track_in_flight()];
        assert_eq!(m.in_flight(), 2);
        drop(held);
        assert_eq!(m.in_flight(), 0);
        let families = m.collect();
        let ok = families[0]
            .get_metric()
            .iter()
            .find(|x| x.get_label().iter().any(|l| l.value() == "ok"))
            .unwrap();
        assert_eq!(ok.get_counter().get_value(), 2.0);
        let allowed = &families[1].get_metric()[0];
        let h = allowed.get_histogram();
        assert_eq!(h.get_sample_count(), 2);
        assert!((h.get_sample_sum() - 20.00003).abs() < 1e-9);
        // 30 µs is in the 50 µs bucket and every one above; 20 s only in +Inf (the count).
        assert_eq!(h.get_bucket()[0].cumulative_count(), 0);
        assert_eq!(h.get_bucket()[1].cumulative_count(), 1);
        assert_eq!(h.get_bucket().last().unwrap().cumulative_count(), 1);
    }
}
