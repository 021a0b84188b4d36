//! The auth decision: a pure function of the request head, the snapshot, the policy and
//! the clock. No I/O, so every row of the error table is unit-tested here and the whole
//! decision is benchmarked alone.

use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue, Method};

use super::credential::{self, CredentialError};
use super::policy::{Policy, PrefixRule};
use super::reject::{BadRequest, Reject};
use crate::keys::{self, Delegation, Key, PrincipalType, Snapshot, Status};

pub use crate::header_names::DELEGATE_HEADER;

/// Who is calling, once allowed.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: Arc<Key>,
    /// The account acted for, when delegating.
    pub delegated_account: Option<HeaderValue>,
}

impl Principal {
    /// The account the request acts as.
    pub fn effective_account(&self) -> &str {
        self.delegated_account
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or(&self.key.account_id)
    }
}

#[derive(Debug, Clone)]
pub enum Decision {
    Allow(Principal),
    /// Refused; the key when it was found (for the access log), never for key-lookup
    /// failures.
    Deny(Reject, Option<Arc<Key>>),
}

/// What the decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    /// A route rule's extra `any_of` requirement.
    pub route_scopes: Option<&'a [String]>,
    /// Off for introspection, which checks the key, not what it may do.
    pub check_scope: bool,
}

/// SPEC 1 step 6, in order: found → active → time window → environment → delegation → scope.
/// (Rate limiting needs mutable state and is applied by the caller after an `Allow`.)
pub fn decide(
    req: &AuthRequest<'_>,
    snapshot: Option<&Snapshot>,
    policy: &Policy,
    now: SystemTime,
) -> Decision {
    // A snapshot older than `keys.max_age` is as good as none (SPEC 16): one comparison.
    let Some(snapshot) = snapshot.filter(|s| !s.is_stale(now)) else {
        return Decision::Deny(Reject::AuthUnavailable, None);
    };
    let key = match identify(req, snapshot, policy) {
        Ok(key) => key,
        Err(r) => return Decision::Deny(r, None),
    };
    match authorize(req, key, snapshot, policy, now) {
        Ok(delegated_account) => Decision::Allow(Principal {
            key: key.clone(),
            delegated_account,
        }),
        Err(r) => Decision::Deny(r, Some(key.clone())),
    }
}

/// Which key is presented: credential, prefix, digest lookup, prefix/type match. Failures
/// here name no key: an unknown key and a near-miss get the same answer.
fn identify<'s>(
    req: &AuthRequest<'_>,
    snapshot: &'s Snapshot,
    policy: &Policy,
) -> Result<&'s Arc<Key>, Reject> {
    let raw = credential::extract(req.headers, req.query, &policy.credentials).map_err(|e| {
        Reject::InvalidAuthHeader {
            missing: e == CredentialError::Missing,
        }
    })?;
    // Forwarded, a credential header's value keyward did not read (another scheme's) would
    // reach the app beside the identity of the key checked: ambiguous, as two keys are.
    if policy.forward_credential
        && credential::carries_unread_value(req.headers, &policy.credentials)
    {
        return Err(Reject::InvalidAuthHeader { missing: false });
    }
    let prefix = policy.prefix_rule(&raw);
    if prefix == PrefixRule::Unknown {
        return Err(Reject::InvalidApiKey);
    }
    // Unknown and near-miss keys both end here: one hash, one map miss, one answer.
    let key = snapshot
        .lookup(&keys::digest(&raw))
        .ok_or(Reject::InvalidApiKey)?;
    if let PrefixRule::Types(types) = prefix {
        if !types.contains(&key.principal_type) {
            return Err(Reject::InvalidApiKey);
        }
    }
    Ok(key)
}

/// What a known key may do here: state, time window, environment, delegation, scope.
/// Returns the delegated account, if any.
fn authorize(
    req: &AuthRequest<'_>,
    key: &Key,
    snapshot: &Snapshot,
    policy: &Policy,
    now: SystemTime,
) -> Result<Option<HeaderValue>, Reject> {
    check_key_state(key, policy, now)?;
    let delegated_account = delegation(req, key, snapshot, policy)?;
    if req.check_scope {
        check_scopes(key, policy, req.method, req.route_scopes)?;
    }
    Ok(delegated_account)
}

/// Does `key`, which let a request in earlier, still stand as it was: in the snapshot in
/// force (not stale) under its digest, unchanged, active, in its time window and its
/// environment? An upgraded tunnel asks while it is open: it carries traffic of its own,
/// which a revoke, an expiry or a narrowed key must stop too.
pub fn still_stands(
    key: &Arc<Key>,
    snapshot: Option<&Snapshot>,
    policy: &Policy,
    now: SystemTime,
) -> Result<(), Reject> {
    let snapshot = snapshot
        .filter(|s| !s.is_stale(now))
        .ok_or(Reject::AuthUnavailable)?;
    let current = snapshot.lookup(key.digest()).ok_or(Reject::InvalidApiKey)?;
    // Its state first: a disabled or expired key is refused as a new request would be
    // (`disabled_api_key`, `expired_api_key`), not as an unknown one.
    check_key_state(current, policy, now)?;
    // Unchanged: a reload keeps the keys it did not change (the same record), and a change
    // to what it grants (scopes narrowed, delegation taken away) ends what was allowed
    // with the old; one to an email or a rate limit does not.
    if !Arc::ptr_eq(current, key) && !current.grants_as(key) {
        return Err(Reject::InvalidApiKey);
    }
    Ok(())
}

fn check_key_state(key: &Key, policy: &Policy, now: SystemTime) -> Result<(), Reject> {
    if key.status == Status::Disabled {
        return Err(Reject::DisabledApiKey);
    }
    let too_early = key.not_before.is_some_and(|nb| now < nb);
    let too_late = key.expires_at.is_some_and(|exp| now >= exp);
    if too_early || too_late {
        return Err(Reject::ExpiredApiKey);
    }
    if key
        .environment()
        .is_some_and(|env| env != policy.environment)
    {
        return Err(Reject::WrongEnvironment);
    }
    Ok(())
}

/// `x-delegate-account-id`: only enterprise keys, only listed accounts (or `*`).
fn delegation(
    req: &AuthRequest<'_>,
    key: &Key,
    snapshot: &Snapshot,
    policy: &Policy,
) -> Result<Option<HeaderValue>, Reject> {
    let mut values = req.headers.get_all(DELEGATE_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Reject::BadRequest(BadRequest::DelegateHeader));
    }
    let account = value
        .to_str()
        .ok()
        .filter(|a| valid_account_id(a))
        .ok_or(Reject::BadRequest(BadRequest::DelegateHeader))?;
    if key.principal_type != PrincipalType::EnterpriseServiceAccount {
        return Err(Reject::DelegationNotAllowed);
    }
    if account == key.account_id.as_str() {
        return Ok(None);
    }
    let allowed = match key.delegation() {
        Delegation::Any => true,
        Delegation::Only(set) => set.contains(account),
        Delegation::None => false,
    };
    let chosen_by_client = matches!(key.delegation(), Delegation::Any);
    if chosen_by_client && names_a_secret(account, req, snapshot, policy) {
        // The account is asserted to the app (`x-auth-account-id`) and answered by `/auth`
        // and a decision: a key or a digest there would reach them all. (An account the
        // snapshot lists was screened with it.)
        return Err(Reject::BadRequest(BadRequest::DelegateHeader));
    }
    if allowed {
        Ok(Some(value.clone()))
    } else {
        Err(Reject::DelegationNotAllowed)
    }
}

/// What a snapshot may list in `delegate_accounts` ([`keys::is_token`]): an account it
/// lists can be named.
fn valid_account_id(a: &str) -> bool {
    keys::is_token(a)
}

/// Could the account a client names under a `*` delegation be key material? One holding a
/// configured prefix followed by what a key's random part is made of, or sharing a run with
/// the request's own credential ([`Policy::shares_a_run_with_a_credential`]), or naming a
/// key of the snapshot: its raw key, with or without its prefix, or its digest (after a
/// `sha256:` style label), or either written in hex or base64. (What a client writes its own
/// secret as beyond these cannot be told from an account: list the accounts instead.)
fn names_a_secret(
    account: &str,
    req: &AuthRequest<'_>,
    snapshot: &Snapshot,
    policy: &Policy,
) -> bool {
    let known = |d: &keys::Digest| snapshot.lookup(d).is_some();
    let names_a_key = |text: &str| {
        keys::names_a_digest(text, known)
            || policy
                .prefixes()
                .any(|p| keys::names_a_digest(&format!("{p}{text}"), known))
    };
    let unlabelled = account.rsplit([':', '=']).next().unwrap_or(account);
    policy.holds_a_prefixed_run(account)
        || policy.shares_a_run_with_a_credential(
            account.as_bytes(),
            req.headers,
            &[req.query.unwrap_or("")],
        )
        || names_a_key(account)
        || names_a_key(unlabelled)
        || labelled_digests(account).any(|d| keys::names_a_digest(d, known))
        || decoded(account).is_some_and(|raw| names_a_key(&raw))
}

/// The parts of `account` a digest may be behind a label or before a suffix, whatever
/// separates them (`sha256_<hex>`, `sha256/<hex>`, `<base64>.x`): every run of 64 hex
/// digits, and the 43 or 44 characters at either end.
fn labelled_digests(account: &str) -> impl Iterator<Item = &str> {
    let hex_runs = account
        .split(|c: char| !c.is_ascii_hexdigit())
        .filter(|run| run.len() == 64);
    let len = account.len();
    let ends = [43, 44]
        .into_iter()
        .filter(move |&n| len > n)
        .flat_map(move |n| [&account[..n], &account[len - n..]]);
    hex_runs.chain(ends)
}

/// `text` read as hex or base64 (either alphabet, padded or not), when that gives text.
fn decoded(text: &str) -> Option<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    let bytes = hex::decode(text).ok().or_else(|| {
        [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
    })?;
    String::from_utf8(bytes).ok()
}

/// Does `key` hold a scope the method allows, and one of the route rule's (`route_scopes`)?
pub fn check_scopes(
    key: &Key,
    policy: &Policy,
    method: &Method,
    route_scopes: Option<&[String]>,
) -> Result<(), Reject> {
    let method_scopes = policy.method_scopes(method).unwrap_or(&[]);
    if !key.has_any_scope(method_scopes) {
        return Err(Reject::InsufficientScope {
            required: method_scopes.to_vec(),
        });
    }
    if let Some(extra) = route_scopes {
        if !key.has_any_scope(extra) {
            return Err(Reject::InsufficientScope {
                required: extra.to_vec(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::reject::Code;
    use crate::config::Config;
    use crate::keys::Source;
    use std::time::Duration;

    const SERVICE: &str = "sta_demo_service_key_0123456789abcdef";
    const ENTERPRISE: &str = "ste_demo_enterprise_key_0123456789abcdef";
    const PERSONAL: &str = "pat_demo_personal_key_0123456789abcdef";

    struct Fixture {
        policy: Policy,
        snapshot: Snapshot,
    }

    fn fixture() -> Fixture {
        let config = Config::from_yaml(include_str!("../../config/keyward.yaml")).unwrap();
        let snapshot =
            Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        Fixture {
            policy: Policy::new(&config),
            snapshot,
        }
    }

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-06-01T00:00:00Z").unwrap()
    }

    fn run_at(
        f: &Fixture,
        method: Method,
        headers: &[(&'static str, &str)],
        at: SystemTime,
    ) -> Decision {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        let route_scopes = ["admin".to_string()];
        let admin = headers.iter().any(|(k, _)| *k == "x-test-admin-route");
        let req = AuthRequest {
            method: &method,
            headers: &h,
            query: None,
            route_scopes: admin.then_some(&route_scopes[..]),
            check_scope: true,
        };
        decide(&req, Some(&f.snapshot), &f.policy, at)
    }

    fn code(f: &Fixture, method: Method, headers: &[(&'static str, &str)]) -> Code {
        match run_at(f, method, headers, now()) {
            Decision::Allow(_) => Code::Ok,
            Decision::Deny(r, _) => r.code(),
        }
    }

    fn with_key(key: &str) -> Vec<(&'static str, String)> {
        vec![("x-api-key", key.to_string())]
    }

    fn code_key(f: &Fixture, method: Method, key: &str, more: &[(&'static str, &str)]) -> Code {
        let base = with_key(key);
        let mut all: Vec<(&'static str, &str)> =
            base.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(more);
        code(f, method, &all)
    }

    #[test]
    fn allow_and_every_deny_row() {
        let f = fixture();
        assert_eq!(code_key(&f, Method::GET, SERVICE, &[]), Code::Ok);
        assert_eq!(code(&f, Method::GET, &[]), Code::InvalidAuthHeader);
        assert_eq!(
            code_key(&f, Method::GET, "sta_not_a_real_key_at_all", &[]),
            Code::InvalidApiKey
        );
        assert_eq!(
            code_key(&f, Method::GET, "zzz_unknown_prefix_key", &[]),
            Code::InvalidApiKey
        );
        assert_eq!(
            code_key(
                &f,
                Method::GET,
                "sta_demo_expired_key_0123456789abcdef",
                &[]
            ),
            Code::ExpiredApiKey
        );
        assert_eq!(
            code_key(
                &f,
                Method::GET,
                "sta_demo_disabled_key_0123456789abcdef",
                &[]
            ),
            Code::DisabledApiKey
        );
        assert_eq!(
            code_key(
                &f,
                Method::GET,
                "sta_demo_staging_key_0123456789abcdef",
                &[]
            ),
            Code::WrongEnvironment
        );
        assert_eq!(
            code_key(&f, Method::POST, PERSONAL, &[]),
            Code::InsufficientScope
        );
        assert_eq!(
            code_key(
                &f,
                Method::GET,
                SERVICE,
                &[("x-delegate-account-id", "507f1f77bc")]
            ),
            Code::DelegationNotAllowed
        );
        assert_eq!(
            code_key(&f, Method::GET, SERVICE, &[("x-test-admin-route", "1")]),
            Code::InsufficientScope
        );
        assert_eq!(
            code_key(&f, Method::GET, ENTERPRISE, &[("x-test-admin-route", "1")]),
            Code::Ok
        );
        assert_eq!(
            code_key(&f, Method::TRACE, SERVICE, &[]),
            Code::InsufficientScope
        );
    }

    #[test]
    fn no_snapshot_fails_closed() {
        let f = fixture();
        let h = HeaderMap::new();
        let req = AuthRequest {
            method: &Method::GET,
            headers: &h,
            query: None,
            route_scopes: None,
            check_scope: true,
        };
        assert!(matches!(
            decide(&req, None, &f.policy, now()),
            Decision::Deny(Reject::AuthUnavailable, None)
        ));
    }

    #[test]
    fn denials_of_a_known_key_name_it_lookup_failures_do_not() {
        let f = fixture();
        let h = with_key("sta_demo_expired_key_0123456789abcdef");
        let h: Vec<(&'static str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match run_at(&f, Method::GET, &h, now()) {
            Decision::Deny(Reject::ExpiredApiKey, Some(k)) => {
                assert_eq!(&*k.id, "key_demo_expired")
            }
            d => panic!("{d:?}"),
        }
        let h = with_key("sta_not_a_real_key_at_all");
        let h: Vec<(&'static str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert!(matches!(
            run_at(&f, Method::GET, &h, now()),
            Decision::Deny(Reject::InvalidApiKey, None)
        ));
    }

    #[test]
    fn wildcard_delegation_allows_any_account() {
        let mut f = fixture();
        let key = "ste_wildcard_key_0123456789abcdef";
        let text = format!(
            "keys:\n  - {{ id: k_any, sha256: {}, type: enterprise_service_account, subject_id: s, account_id: a, scopes: [read], delegate_accounts: [\"*\"] }}\n",
            hex::encode(keys::digest(key.as_bytes()))
        );
        f.snapshot = Snapshot::parse(&text, Source::File).unwrap();
        let h = [
            ("x-api-key", key),
            ("x-delegate-account-id", "any_child_42"),
        ];
        match run_at(&f, Method::GET, &h, now()) {
            Decision::Allow(p) => assert_eq!(p.effective_account(), "any_child_42"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn near_miss_is_the_same_as_unknown() {
        let f = fixture();
        let mut near = SERVICE.to_string();
        near.pop();
        near.push('0');
        assert_eq!(code_key(&f, Method::GET, &near, &[]), Code::InvalidApiKey);
    }

    #[test]
    fn prefix_must_fit_type() {
        let mut f = fixture();
        // Give the personal key's digest to a key under the sta_ prefix: type mismatch.
        let config = Config::from_yaml(
            &include_str!("../../config/keyward.yaml")
                .replace("pat_: [personal]", "pat_: [service_account]"),
        )
        .unwrap();
        f.policy = Policy::new(&config);
        assert_eq!(
            code_key(&f, Method::GET, PERSONAL, &[]),
            Code::InvalidApiKey
        );
    }

    #[test]
    fn time_window_edges() {
        let f = fixture();
        let expired = "sta_demo_expired_key_0123456789abcdef";
        let nb = humantime::parse_rfc3339("2024-01-01T00:00:00Z").unwrap();
        let exp = humantime::parse_rfc3339("2025-01-01T00:00:00Z").unwrap();
        let h = with_key(expired);
        let h: Vec<(&'static str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let at = |t| matches!(run_at(&f, Method::GET, &h, t), Decision::Allow(_));
        assert!(!at(nb - Duration::from_secs(1)));
        assert!(at(nb));
        assert!(at(exp - Duration::from_secs(1)));
        assert!(!at(exp));
    }

    #[test]
    fn delegation_rules() {
        let f = fixture();
        let h = with_key(ENTERPRISE);
        let mut h: Vec<(&'static str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        h.push(("x-delegate-account-id", "507f1f77bc"));
        match run_at(&f, Method::GET, &h, now()) {
            Decision::Allow(p) => assert_eq!(p.effective_account(), "507f1f77bc"),
            d => panic!("{d:?}"),
        }
        h.pop();
        h.push(("x-delegate-account-id", "someone_else"));
        assert_eq!(code(&f, Method::GET, &h), Code::DelegationNotAllowed);
        h.pop();
        h.push(("x-delegate-account-id", "bad value!"));
        assert_eq!(code(&f, Method::GET, &h), Code::BadRequest);
        h.pop();
        h.push(("x-delegate-account-id", "68c584136b9b08b8fc53a85e"));
        match run_at(&f, Method::GET, &h, now()) {
            Decision::Allow(p) => assert!(p.delegated_account.is_none()),
            d => panic!("{d:?}"),
        }
    }
}
