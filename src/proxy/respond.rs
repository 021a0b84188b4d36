//! Responses keyward writes itself: the one place a [`Reject`] becomes what the client sees,
//! and the correlation id every response carries.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{Either, Full};

use super::Body;
use crate::auth::policy::Policy;
use crate::auth::ratelimit::Quota;
use crate::auth::Reject;

pub use crate::header_names::{X_CORRELATION_ID, X_REQUEST_ID};

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(bytes))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// keyward's own answer to a `HEAD` carries its headers alone. hyper's HTTP/1 server drops
/// a body it is handed for a HEAD, but its HTTP/2 server sends it, and clients then reset
/// the stream (PROTOCOL_ERROR): a 401 or the introspection answer never arrived. (An
/// upstream's answer to a HEAD has no body already.)
pub fn finish_head(resp: &mut Response<Body>, method: &http::Method) {
    if *method == http::Method::HEAD && matches!(resp.body(), Either::Right(_)) {
        *resp.body_mut() = Either::Right(Full::new(Bytes::new()));
    }
}

/// While draining (SPEC 12), an HTTP/1 response says `Connection: close`, and its
/// connection closes after it: the client reconnects (here while the listener still
/// accepts, elsewhere once endpoints update) rather than write its next request onto a
/// connection keyward closes at the end of `drain_delay`. A switch of protocols keeps its
/// `Connection: upgrade`; HTTP/2 has no such header (its connections get a GOAWAY). One
/// atomic load per HTTP/1 request.
pub fn close_if_draining<B>(resp: &mut Response<B>, http2: bool, draining: &AtomicBool) {
    if !http2
        && draining.load(Ordering::Acquire)
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Marks a response keyward refused the request with (a response extension): a connection
/// that has only ever been refused is held to `header_read_timeout`, not `idle_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Refused;

/// Marks an answer keyward made itself without refusing (introspection): like a refusal,
/// it holds no upstream connection and counts against the own answers' budget, not
/// `max_in_flight` (a key's zero-window `/auth` streams held every slot, and every
/// upstream-bound request got 502).
#[derive(Debug, Clone, Copy)]
pub struct Local;

/// One of keyward's own answers sent as its status and headers alone: past [`super::writing::OwnAnswerBudget`],
/// a body no client may be reading must not hold a stream open.
pub fn without_body(resp: &mut Response<Body>) {
    *resp.body_mut() = Either::Right(Full::new(Bytes::new()));
    resp.headers_mut().remove(http::header::CONTENT_TYPE);
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
}

/// The JSON error of SPEC 6 with its RFC 6750 challenge and retry headers.
pub fn error(reject: &Reject, correlation_id: &str) -> Response<Body> {
    let mut resp = json(reject.status(), &reject.body(correlation_id));
    resp.extensions_mut().insert(Refused);
    if let Some(reason) = reject.code().reason_phrase() {
        resp.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(reason));
    }
    let h = resp.headers_mut();
    if let Some(challenge) = reject.www_authenticate() {
        h.insert(header::WWW_AUTHENTICATE, challenge);
    }
    if let Reject::RateLimited {
        retry_after_secs,
        quota,
    } = reject
    {
        h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        set_quota(h, quota);
    }
    resp
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` for a key's quota.
pub fn set_quota(h: &mut HeaderMap, quota: &Quota) {
    h.insert("ratelimit-limit", HeaderValue::from(quota.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(quota.remaining));
    h.insert("ratelimit-reset", HeaderValue::from(quota.reset_secs));
}

/// Take the caller's `x-correlation-id` (else `x-request-id`) if it is 1..128 characters of
/// `[A-Za-z0-9._:-]`, could not be a key (`policy`; `queries` gives those the request
/// carries, asked only when it sent an id) and holds nothing shaped like a digest or a
/// generated key ([`digest_shaped`](crate::auth::policy::digest_shaped)), otherwise mint a UUID v4 from the worker's `ids`. (Not looked up in the snapshot: whether an id comes back would tell any client,
/// on a public route and uncounted, whether a string is a key.)
pub fn correlation_id<'q, Q: AsRef<[&'q str]>>(
    headers: &HeaderMap,
    ids: &Ids,
    policy: &Policy,
    queries: impl Fn() -> Q,
) -> HeaderValue {
    [&X_CORRELATION_ID, &X_REQUEST_ID]
        .into_iter()
        .filter_map(|name| headers.get(name))
        .find(|v| {
            valid_correlation_id(v.as_bytes())
                && !crate::auth::policy::digest_shaped(v.as_bytes())
                && !policy.could_be_a_key(v.as_bytes(), headers, queries().as_ref())
        })
        .cloned()
        .unwrap_or_else(|| ids.mint())
}

/// Minted correlation ids, written side by side into one shared buffer: an id is a slice of
/// it (a reference count, cloned into the four headers that carry it), and a request costs
/// no allocation of its own (one buffer holds [`IDS_PER_SLAB`] ids). The buffer is freed
/// once every id cut from it is gone.
#[derive(Default)]
pub struct Ids(std::sync::Mutex<bytes::BytesMut>);

const IDS_PER_SLAB: usize = 112;

impl Ids {
    pub fn mint(&self) -> HeaderValue {
        const LEN: usize = uuid::fmt::Hyphenated::LENGTH;
        let mut buf = [0u8; LEN];
        uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        // Uncontended: only the worker that owns it mints from it. A panic elsewhere while
        // it was held leaves the slab whole (every change is one call).
        let mut slab = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slab.capacity() < LEN {
            *slab = bytes::BytesMut::with_capacity(LEN * IDS_PER_SLAB);
        }
        slab.extend_from_slice(&buf);
        HeaderValue::from_maybe_shared(slab.split().freeze())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

fn valid_correlation_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let shipped = include_str!("../../config/keyward.yaml");
        Policy::new(&crate::config::Config::from_yaml(shipped).unwrap())
    }

    #[test]
    fn correlation_id_rules() {
        let policy = policy();
        let correlation_id = |h: &HeaderMap, ids: &Ids| correlation_id(h, ids, &policy, || []);
        let mut h = HeaderMap::new();
        let ids = Ids::default();
        let minted = correlation_id(&h, &ids);
        assert_eq!(minted.len(), 36);
        h.insert("x-request-id", HeaderValue::from_static("req-1"));
        assert_eq!(correlation_id(&h, &ids), "req-1");
        h.insert("x-correlation-id", HeaderValue::from_static("corr:2"));
        assert_eq!(correlation_id(&h, &ids), "corr:2");
        h.insert("x-correlation-id", HeaderValue::from_static("bad value"));
        assert_eq!(correlation_id(&h, &ids), "req-1");
        h.insert(
            "x-request-id",
            HeaderValue::from_str(&"a".repeat(129)).unwrap(),
        );
        assert_eq!(correlation_id(&h, &ids).len(), 36);
    }

    /// A key sent as the correlation id (the request's own, or any with a key prefix) would
    /// be logged, echoed and forwarded: a fresh id is minted instead.
    #[test]
    fn a_correlation_id_that_could_be_a_key_is_replaced() {
        let policy = policy();
        let ids = Ids::default();
        let key = "k3y-0123456789abcdef";
        for (name, value) in [
            ("x-api-key", key.to_string()),
            ("authorization", format!("Bearer {key}")),
            // Not the last token; a respelled credential header.
            ("authorization", format!("Bearer {key} extra")),
            ("authorization", format!("Token {key} Bearer")),
            ("x_api_key", key.to_string()),
            ("x.api.key", key.to_string()),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_str(&value).unwrap());
            h.insert(
                "x-request-id",
                HeaderValue::from_static("k3y-0123456789abcdef"),
            );
            assert_eq!(correlation_id(&h, &ids, &policy, || []).len(), 36, "{name}");
            // Part of the key is key material too; an unrelated id is kept.
            h.insert("x-request-id", HeaderValue::from_static("0123456789abcdef"));
            assert_eq!(correlation_id(&h, &ids, &policy, || []).len(), 36, "{name}");
            h.insert("x-request-id", HeaderValue::from_static("req-7f3a9c0d"));
            assert_eq!(
                correlation_id(&h, &ids, &policy, || []),
                "req-7f3a9c0d",
                "{name}"
            );
        }
        // Most of the key, with something before or after it.
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        for id in [
            "abck3y-0123456789ab",
            "y-0123456789abcdefzz",
            "x3y-0123456789ab",
        ] {
            h.insert("x-request-id", HeaderValue::from_static(id));
            assert_eq!(correlation_id(&h, &ids, &policy, || []).len(), 36, "{id}");
        }
        // A tab before the token.
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer\tk3y-0123456789abcdef"),
        );
        h.insert(
            "x-request-id",
            HeaderValue::from_static("k3y-0123456789abcdef"),
        );
        assert_eq!(correlation_id(&h, &ids, &policy, || []).len(), 36);
        // An id holding the key, or a key prefix anywhere.
        h.insert(
            "x-request-id",
            HeaderValue::from_static("req-k3y-0123456789abcdef.1"),
        );
        assert_eq!(correlation_id(&h, &ids, &policy, || []).len(), 36);
        // A short id is no key, whatever it is part of.
        h.insert("x-request-id", HeaderValue::from_static("k3y"));
        assert_eq!(correlation_id(&h, &ids, &policy, || []), "k3y");
        // The shipped config reads no query credential: a query is no credential there.
        let mut h = HeaderMap::new();
        h.insert(
            "x-request-id",
            HeaderValue::from_static("k3y-0123456789abcdef"),
        );
        let q = ["a=1&api%5Fkey=k3y-0123456789abcdef"];
        assert_eq!(
            correlation_id(&h, &ids, &policy, || q),
            "k3y-0123456789abcdef"
        );
        let mut h = HeaderMap::new();
        h.insert(
            "x-correlation-id",
            HeaderValue::from_static("id.sta_leaked_key_0123456789"),
        );
        assert_eq!(correlation_id(&h, &ids, &policy, || []).len(), 36);
    }

    /// A digest (hex or base64) or a generated key is key material whether or not the
    /// request carries its key: a fresh id is minted for it.
    #[test]
    fn a_correlation_id_shaped_like_a_digest_or_a_generated_key_is_replaced() {
        use base64::Engine as _;
        use sha2::Digest as _;
        let policy = policy();
        let ids = Ids::default();
        let digest = sha2::Sha256::digest(b"k3y-0123456789abcdef");
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
        for id in [
            hex.clone(),
            hex.to_uppercase(),
            format!("req.{hex}"),
            format!("{}.{}", &hex[..32], &hex[32..]),
            hex.as_bytes()
                .chunks(2)
                .map(|p| String::from_utf8_lossy(p).to_uppercase())
                .collect::<Vec<_>>()
                .join(":"),
            b64.clone(),
            format!("trace:{b64}:1"),
            "sta_".to_string() + &"Zm9v".repeat(11),
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-correlation-id", HeaderValue::from_str(&id).unwrap());
            let got = correlation_id(&h, &ids, &policy, || []);
            assert_ne!(got, id.as_str(), "{id}");
            assert_eq!(got.len(), 36, "{id}");
        }
        // Ids people use are kept: a UUID, a W3C traceparent, a ULID, dotted parts.
        for id in [
            "0e87e821-c93c-4642-a69c-8ac40478239e",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "svc.checkout.4bf92f3577b34da6a3ce929d0e0e4736.7",
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-correlation-id", HeaderValue::from_static(id));
            assert_eq!(correlation_id(&h, &ids, &policy, || []), id);
        }
    }

    #[test]
    fn minted_ids_are_distinct_uuids_across_slabs() {
        let ids = Ids::default();
        let none = HeaderMap::new();
        let minted: Vec<HeaderValue> = (0..3 * IDS_PER_SLAB)
            .map(|_| correlation_id(&none, &ids, &policy(), || []))
            .collect();
        let distinct: std::collections::HashSet<_> = minted.iter().collect();
        assert_eq!(distinct.len(), minted.len());
        for id in &minted {
            let parsed = uuid::Uuid::parse_str(id.to_str().unwrap()).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
        }
        // An id outlives its slab's other ids and the slab itself.
        let kept = minted[0].clone();
        drop(minted);
        drop(ids);
        assert_eq!(kept.len(), 36);
    }

    #[test]
    fn error_carries_challenge_and_retry() {
        let r = error(
            &Reject::RateLimited {
                retry_after_secs: 3,
                quota: Quota {
                    limit: 10,
                    remaining: 0,
                    reset_secs: 3,
                },
            },
            "c",
        );
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(r.headers()["ratelimit-limit"], "10");
        assert_eq!(r.headers()["ratelimit-remaining"], "0");
        assert_eq!(r.headers()["ratelimit-reset"], "3");
        let r = error(&Reject::InvalidApiKey, "c");
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(r.headers().contains_key("www-authenticate"));
    }
}
