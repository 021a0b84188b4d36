//! Path normalization and its contract: an accepted path starts with `/`, holds no dot
//! segment and no `//`, is a fixed point, and is exactly the path forwarded upstream.
#![no_main]

use std::sync::OnceLock;

use keyward::auth::path::normalize;
use keyward::config::{Limits, UpstreamAddr, UpstreamClient};
use keyward::proxy::forward::Upstream;
use libfuzzer_sys::fuzz_target;

fn upstream() -> &'static Upstream {
    static UPSTREAM: OnceLock<Upstream> = OnceLock::new();
    UPSTREAM.get_or_init(|| {
        let addr = UpstreamAddr::Http(http::Uri::from_static("http://127.0.0.1:9"));
        Upstream::new(Some(&addr), &Limits::default(), UpstreamClient::Fast)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(out) = normalize(input) else {
        return;
    };
    assert!(out.starts_with('/'), "{input:?} -> {out:?}");
    assert!(!out.contains("//"), "{input:?} -> {out:?}");
    assert!(
        !out.contains("/./") && !out.contains("/../"),
        "{input:?} -> {out:?}"
    );
    assert!(
        !out.ends_with("/.") && !out.ends_with("/.."),
        "{input:?} -> {out:?}"
    );
    assert_eq!(normalize(&out).as_deref(), Ok(&*out), "{input:?}");
    // For anything hyper could deliver as a request path, the forwarded URI carries the
    // normalized path unchanged.
    if http::uri::PathAndQuery::try_from(input).is_ok() {
        let uri = upstream()
            .uri(&out, Some("q=1"))
            .unwrap_or_else(|e| panic!("{input:?} -> {out:?}: {e}"));
        assert_eq!(uri.path(), out);
    }
});
