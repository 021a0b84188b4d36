//! `identity_headers.include`: only the chosen identity headers reach the app, every
//! inbound identity header is still stripped (chosen or not), and a decision allow still
//! names all of them (SPEC 15), the ones left out empty.

mod decision_support;
mod support;

use decision_support::*;
use keyward::decision::{AUTH_REQUEST, EXT_AUTHZ, FORWARD_AUTH};
use support::*;

const INCLUDE: &str =
    "identity_headers: { include: [subject-id, key-id, delegated-by], echo_to_client: true }\n";

/// The `x-auth-*` headers in `h`, sorted.
fn identity_in(h: &http::HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = h
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("x-auth-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn only_included_headers_reach_the_app_and_forged_ones_never_do() {
    let up = spawn_upstream().await;
    let kw = spawn_proxy(up.addr, INCLUDE).await;
    // Forged: headers left out of `include` (in every spelling), an included one, and an
    // included one keyward does not set for this request (no delegation).
    let forged = [
        ("x-auth-org-id", "evil"),
        ("X_Auth_Scopes", "evil"),
        ("x.auth.account.id", "evil"),
        ("x-auth-environment", "evil"),
        ("x-auth-subject-id", "evil"),
        ("x-auth-delegated-by", "evil"),
    ];
    let mut h = forged.to_vec();
    h.push(("x-api-key", SERVICE_KEY));
    let r = get(&kw.url("/v1/items"), &h).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    for (name, value) in &seen.headers {
        assert_ne!(value, "evil", "forged {name} reached the app");
    }
    assert_eq!(
        identity_in(&seen.headers),
        ["x-auth-key-id", "x-auth-subject-id"]
    );
    assert_eq!(
        seen.headers["x-auth-subject-id"],
        "507f1f77bcf86cd799439015"
    );
    assert_eq!(seen.headers["x-auth-key-id"], "key_demo_service");
    // echo_to_client returns the same choice.
    assert_eq!(
        identity_in(&r.headers),
        ["x-auth-key-id", "x-auth-subject-id"]
    );

    // Delegating: the included delegated-by is sent, the left-out account-id and
    // access-type are not.
    let r = get(
        &kw.url("/v1/items"),
        &[
            ("x-api-key", ENTERPRISE_KEY),
            ("x-delegate-account-id", "507f1f77bc"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(
        identity_in(&seen.headers),
        ["x-auth-delegated-by", "x-auth-key-id", "x-auth-subject-id"]
    );

    // Public routes: nothing added, every forged one gone.
    let r = get(&kw.url("/healthz"), &forged).await;
    assert_eq!(r.status, 200);
    assert!(identity_in(&up.last().headers).is_empty());
    kw.shutdown().await;
}

/// A decision allow names every identity header, the left-out ones empty, so a proxy that
/// copies them still overwrites whatever the client sent under those names.
#[tokio::test]
async fn a_decision_allow_still_names_every_identity_header() {
    let d = spawn_decider(None, INCLUDE).await;
    for endpoint in [AUTH_REQUEST, FORWARD_AUTH, EXT_AUTHZ] {
        let (url, mut h) = match endpoint {
            AUTH_REQUEST => (
                d.url(AUTH_REQUEST),
                vec![
                    ("x-original-method", "GET"),
                    ("x-original-uri", "/v1/items"),
                ],
            ),
            FORWARD_AUTH => (
                d.url(FORWARD_AUTH),
                vec![
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "/v1/items"),
                ],
            ),
            _ => (d.url(&format!("{EXT_AUTHZ}/v1/items")), vec![]),
        };
        h.push(("x-api-key", SERVICE_KEY));
        let r = get(&url, &h).await;
        assert_eq!(r.status, 200, "{endpoint}: {}", r.text());
        for name in IDENTITY {
            let want = match name {
                "x-auth-subject-id" => "507f1f77bcf86cd799439015",
                "x-auth-key-id" => "key_demo_service",
                _ => "",
            };
            assert_eq!(r.headers[name], want, "{endpoint}: {name}");
        }
    }
    d.shutdown().await;
}
