//! The snapshot diff that the blast-radius guard runs on every reload and push (SPEC 16),
//! over large snapshots: against a re-read whose unchanged keys are shared with the
//! snapshot in force (what a reload builds), against one whose keys are all separate
//! copies, and with 1% of the keys changed.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use keyward::config::GuardConfig;
use keyward::keys::diff::{diff, Here};
use keyward::keys::guard::admit;
use keyward::keys::{Snapshot, Source};

/// `n` keys; every `changed_every`-th one with a different scope list.
fn snapshot_yaml(n: usize, changed_every: Option<usize>) -> String {
    let mut s = String::with_capacity(n * 200);
    s.push_str("keys:\n");
    for i in 0..n {
        let d = hex::encode(keyward::keys::digest(format!("key-{i}").as_bytes()));
        let scopes = match changed_every {
            Some(k) if i % k == 0 => "[read]",
            _ => "[read, write]",
        };
        s.push_str(&format!(
            "  - {{ id: key_{i}, sha256: {d}, type: service_account, subject_id: subj_{i}, account_id: acct_1, scopes: {scopes} }}\n"
        ));
    }
    s
}

fn bench_diff(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot_diff");
    group.sample_size(10);
    for n in [10_000usize, 200_000] {
        let old = Snapshot::parse(&snapshot_yaml(n, None), Source::File).unwrap();
        let copies = Snapshot::parse(&snapshot_yaml(n, None), Source::File).unwrap();
        let changed = Snapshot::parse(&snapshot_yaml(n, Some(100)), Source::File).unwrap();
        let guard = GuardConfig::default();
        group.bench_with_input(BenchmarkId::new("same_keys_shared", n), &n, |b, _| {
            b.iter(|| black_box(admit(Some(&old), &old, &guard, Here::unknown())))
        });
        group.bench_with_input(BenchmarkId::new("same_keys_copies", n), &n, |b, _| {
            b.iter(|| black_box(admit(Some(&old), &copies, &guard, Here::unknown())))
        });
        group.bench_with_input(BenchmarkId::new("one_percent_changed", n), &n, |b, _| {
            b.iter(|| black_box(diff(&old, &changed, Here::unknown())))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_diff);
criterion_main!(benches);
