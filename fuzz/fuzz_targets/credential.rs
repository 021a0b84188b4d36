//! Credential extraction over a header map and query built from the input: one line per
//! header (`name: value`), a first line starting with `?` is the query string.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use keyward::auth::credential::{extract, strip_query_param, MAX_KEY_LEN, MIN_KEY_LEN};
use keyward::config::CredentialSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    let mut query = None;
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        if i == 0 && line.first() == Some(&b'?') {
            query = std::str::from_utf8(&line[1..]).ok();
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    let mut sources = keyward::config::default_credentials();
    sources.push(CredentialSource::Query {
        name: "api_key".into(),
    });
    if let Ok(key) = extract(&headers, query, &sources) {
        assert!((MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()), "{key:?}");
        assert!(key.iter().all(|b| (0x21..0x7f).contains(b)), "{key:?}");
    }
    if let Some(q) = query {
        let stripped = strip_query_param(q, "api_key");
        assert!(stripped.len() <= q.len());
        assert!(!stripped
            .split('&')
            .any(|p| p == "api_key" || p.starts_with("api_key=")));
    }
});
