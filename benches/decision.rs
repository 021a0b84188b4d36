//! The auth decision alone (extraction, hash, lookup, policy; no I/O), from 1k to 1M keys,
//! and the cost of parsing a large snapshot.

use std::hint::black_box;
use std::time::SystemTime;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use keyward::auth::{decide, AuthRequest, Decision, Policy};
use keyward::config::Config;
use keyward::keys::{Snapshot, Source};

fn raw_key(i: usize) -> String {
    format!("sta_bench_{i:012}_abcdefghijklmnopqrstuvwxyz")
}

/// A snapshot document with `n` service-account keys.
fn snapshot_yaml(n: usize) -> String {
    let mut s = String::with_capacity(n * 200);
    s.push_str("version: 1\nkeys:\n");
    for i in 0..n {
        let d = hex::encode(keyward::keys::digest(raw_key(i).as_bytes()));
        s.push_str(&format!(
            "  - {{ id: key_{i}, sha256: {d}, type: service_account, subject_id: subj_{i}, account_id: acct_1, scopes: [read, write] }}\n"
        ));
    }
    s
}

fn setup(n: usize) -> (Snapshot, Policy) {
    let config = Config::from_yaml(include_str!("../config/keyward.yaml")).unwrap();
    let snapshot = Snapshot::parse(&snapshot_yaml(n), Source::File).unwrap();
    (snapshot, Policy::new(&config))
}

fn bench_decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for n in [1_000usize, 10_000, 100_000, 1_000_000] {
        let (snapshot, policy) = setup(n);
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_str(&raw_key(n / 2)).unwrap());
        let mut unknown = HeaderMap::new();
        unknown.insert(
            "authorization",
            HeaderValue::from_static("Bearer sta_unknown_key_0000000000000000"),
        );
        let now = SystemTime::now();
        fn req(h: &HeaderMap) -> AuthRequest<'_> {
            AuthRequest {
                method: &Method::GET,
                headers: h,
                query: None,
                route_scopes: None,
                check_scope: true,
            }
        }
        group.bench_with_input(BenchmarkId::new("allow", n), &n, |b, _| {
            b.iter(|| {
                let d = decide(black_box(&req(&headers)), Some(&snapshot), &policy, now);
                assert!(matches!(d, Decision::Allow(_)));
                d
            })
        });
        group.bench_with_input(BenchmarkId::new("deny_unknown", n), &n, |b, _| {
            b.iter(|| decide(black_box(&req(&unknown)), Some(&snapshot), &policy, now))
        });
    }
    group.finish();
}

fn bench_snapshot_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot_parse");
    group.sample_size(10);
    for n in [10_000usize, 200_000] {
        let text = snapshot_yaml(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &text, |b, text| {
            b.iter(|| {
                Snapshot::parse(black_box(text), Source::File)
                    .unwrap()
                    .len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decision, bench_snapshot_parse);
criterion_main!(benches);
