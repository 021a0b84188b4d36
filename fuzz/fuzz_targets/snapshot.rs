//! Key snapshot parsing (YAML and JSON), validation, and what is done with a valid one:
//! identity headers, rate-limit state, and the YAML/JSON round trip that the control API
//! relies on to persist an edited snapshot (`POST /v1/keys/{id}/disable`). A document read
//! as a stream (a file, a push) loads exactly as the same bytes held in memory do.
#![no_main]

use std::time::{Duration, Instant};

use keyward::auth::ratelimit::{RateDecision, RateLimiter};
use keyward::keys::load::{self, Format, ReadError};
use keyward::keys::{IdentityNames, Snapshot, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in [Format::Yaml, Format::Json] {
        let held = load::from_slice(data, format, None);
        let mut reader = std::io::BufReader::with_capacity(7, data);
        let streamed = load::from_reader(&mut reader, format, None, || Ok(data.to_vec()));
        match (held, streamed) {
            (Ok((v1, k1)), Ok((v2, k2))) => {
                assert_eq!(v1, v2);
                assert_eq!(k1.len(), k2.len());
                assert!(k1.iter().zip(&k2).all(|(a, b)| **a == **b));
            }
            // Both refuse, for the same reason; serde_json may place a refusal one column
            // further on when it reads from a stream (it has peeked the next byte).
            (Err(a), Err(ReadError::Invalid(b))) => {
                assert_eq!(unplaced(&a.to_string()), unplaced(&b.to_string()))
            }
            (held, streamed) => panic!("held {held:?}, streamed {streamed:?}"),
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let names = IdentityNames::new("x-auth-", "production").expect("valid names");
    let Ok(snapshot) = Snapshot::parse(text, Source::File) else {
        return;
    };
    let limiter = RateLimiter::default();
    let t0 = Instant::now();
    for key in snapshot.keys() {
        assert_eq!(
            snapshot.by_id(&key.id).map(|k| k.id.clone()),
            Some(key.id.clone())
        );
        assert!(key.identity_headers(&names, None).count() >= 7);
        for t in [t0, t0, t0 + Duration::from_secs(3600)] {
            if let RateDecision::Limited {
                retry_after_secs, ..
            } = limiter.check(key, t)
            {
                assert!(retry_after_secs >= 1);
            }
        }
    }
    limiter.retain(&snapshot);

    // What was accepted survives being written back out, in both formats.
    let doc = snapshot.to_doc();
    let yaml = serde_yaml::to_string(&doc).expect("snapshot serializes to YAML");
    let again = Snapshot::parse(&yaml, Source::Control)
        .unwrap_or_else(|e| panic!("YAML round trip refused: {e}\n{yaml}"));
    assert_eq!(again.len(), snapshot.len());
    assert_eq!(again.to_doc().keys.len(), doc.keys.len());
    let json = serde_json::to_string(&doc).expect("snapshot serializes to JSON");
    let again = Snapshot::parse(&json, Source::Control)
        .unwrap_or_else(|e| panic!("JSON round trip refused: {e}\n{json}"));
    assert_eq!(again.len(), snapshot.len());
});

/// An error message without serde's trailing " at line L column C".
fn unplaced(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(at) if message[at..].contains(" column ") => &message[..at],
        _ => message,
    }
}
