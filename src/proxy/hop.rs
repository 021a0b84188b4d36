//! keyward's own hop in `Via` (RFC 9110 7.6.3: a gateway sends one in every request it
//! forwards), named with a token drawn once per process. A request that comes back carrying
//! it has looped: the upstream leads back to this very keyward through something no address
//! check sees (a port-forward, a Service, another proxy), and each request would be
//! forwarded again until `limits.max_in_flight` (on a public route: with no key at all). It
//! is refused instead. Another keyward in the chain has a token of its own.

use http::header::{HeaderMap, HeaderValue, VIA};
use http::Version;

pub struct Hop {
    /// `keyward-` and 16 hex digits.
    token: String,
    /// `1.1 <token>` and `2 <token>`: the protocol the request came in with (RFC 9110).
    http1: HeaderValue,
    http2: HeaderValue,
    /// When a loop is said at `warn`: the token reaches the app, and an app that echoes
    /// headers shows it to clients, who can then send it.
    said: crate::logging::Sometimes,
}

impl Default for Hop {
    fn default() -> Self {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        let token = format!("keyward-{}", &hex[..16]);
        // Static values: cloning one per forwarded request touches no reference count (a
        // shared count would be an atomic both worker threads write on every request). Two
        // short strings, once per application, live for the process.
        let value = |proto: &str| {
            let text: &'static str = Box::leak(format!("{proto} {token}").into_boxed_str());
            HeaderValue::from_static(text)
        };
        Self {
            http1: value("1.1"),
            http2: value("2"),
            token,
            said: crate::logging::Sometimes::default(),
        }
    }
}

impl Hop {
    /// Did this request pass through this process before?
    pub fn looped(&self, headers: &HeaderMap) -> bool {
        let token = self.token.as_bytes();
        headers
            .get_all(VIA)
            .iter()
            .any(|v| v.as_bytes().windows(token.len()).any(|w| w == token))
    }

    /// Whether a loop seen now is to be said at `warn`: at most once every 10 s (each is
    /// counted in `keyward_upstream_errors_total{kind="loop"}` all the same).
    pub fn say_loop(&self) -> bool {
        self.said.now()
    }

    /// Add this hop to the request's `Via` (after any hop before it).
    pub fn append(&self, headers: &mut HeaderMap, version: Version) {
        let value = match version {
            Version::HTTP_2 => &self.http2,
            _ => &self.http1,
        };
        headers.append(VIA, value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carrying_this_hop_has_looped_and_another_keywards_has_not() {
        let (a, b) = (Hop::default(), Hop::default());
        let mut h = HeaderMap::new();
        h.append(VIA, HeaderValue::from_static("1.1 edge-proxy"));
        assert!(!a.looped(&h));
        b.append(&mut h, Version::HTTP_11);
        assert!(!a.looped(&h), "another process's hop");
        a.append(&mut h, Version::HTTP_2);
        assert!(a.looped(&h));
        let vias: Vec<_> = h.get_all(VIA).iter().collect();
        assert_eq!(vias.len(), 3);
        assert!(vias[2].to_str().unwrap().starts_with("2 keyward-"));
        assert!(a.say_loop() && !a.say_loop(), "once in 10 s");
    }
}
