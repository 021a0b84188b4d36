//! Decision mode (SPEC 15): keyward as the auth service of a proxy that already fronts the
//! app (nginx `auth_request`, Traefik / Caddy forward auth, Envoy / Istio HTTP `ext_authz`).
//!
//! A thin adapter: each endpoint turns its protocol into the request facts the proxy's own
//! phases take ([`handler::Head`] and the original path), calls [`handler::decide`], and turns
//! the verdict into its answer: `200` with every identity header, or the proxy's own error.
//! No rule lives here, and nothing is ever sent to an upstream.

pub mod screen;
pub mod server;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::auth::path::PathError;
use crate::auth::ratelimit::Quota;
use crate::auth::reject::BadRequest;
use crate::auth::{Code, Principal, Reject};
use crate::keys::IdentityNames;
use crate::proxy::conn::{ConnInfo, Serving};
use crate::proxy::handler::{self, Door, Head, Trace, Verdict};
use crate::proxy::worker::Worker;
use crate::proxy::{headers, respond, Body};
use crate::App;

/// Where the endpoints live on the decision listener.
pub const AUTH_REQUEST: &str = "/v1/decide/auth-request";
pub const FORWARD_AUTH: &str = "/v1/decide/forward-auth";
/// Envoy's `path_prefix`: the original path follows it.
pub const EXT_AUTHZ: &str = "/v1/decide/ext-authz";

const X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
/// ingress-nginx's: `$scheme://$http_host$request_uri`, beside `X-Original-URI`.
const X_ORIGINAL_URL: HeaderName = HeaderName::from_static("x-original-url");
const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
/// The names front proxies carry the original request in.
pub const ORIGINAL_REQUEST: [HeaderName; 4] = [
    X_ORIGINAL_METHOD,
    X_ORIGINAL_URI,
    X_FORWARDED_METHOD,
    X_FORWARDED_URI,
];

/// Which proxy protocol a decision request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// nginx `auth_request`, ingress-nginx `auth-url`.
    AuthRequest,
    /// Traefik ForwardAuth, Caddy `forward_auth`.
    ForwardAuth,
    /// Envoy / Istio HTTP `ext_authz`.
    ExtAuthz,
}

impl Endpoint {
    /// The endpoint a decision request's own path names.
    pub fn of(path: &str) -> Option<Self> {
        match path {
            AUTH_REQUEST => Some(Self::AuthRequest),
            FORWARD_AUTH => Some(Self::ForwardAuth),
            _ if path
                .strip_prefix(EXT_AUTHZ)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')) =>
            {
                Some(Self::ExtAuthz)
            }
            _ => None,
        }
    }
}

/// The request the proxy asks about: its method, path as sent, and query. The path and
/// query are read from a parsed target, never copied out of it.
#[derive(Debug, Clone)]
pub struct Original {
    pub method: Method,
    /// The original target: parsed from the endpoint's header, or (`ext_authz`) the
    /// decision request's own target, whose path starts after `skip` bytes.
    target: http::Uri,
    skip: usize,
}

impl Original {
    /// The original path, as sent.
    pub fn path(&self) -> &str {
        self.target.path().get(self.skip..).unwrap_or_default()
    }

    /// The original query, if any.
    pub fn query(&self) -> Option<&str> {
        self.target.query()
    }
}

impl PartialEq for Original {
    fn eq(&self, other: &Self) -> bool {
        (&self.method, self.path(), self.query()) == (&other.method, other.path(), other.query())
    }
}

impl Eq for Original {}

impl Endpoint {
    /// The override headers (SPEC 8) this endpoint's protocol itself sends, as the front
    /// proxy spells them.
    fn protocol_headers(self) -> &'static [HeaderName] {
        static AUTH_REQUEST: [HeaderName; 3] = [X_ORIGINAL_METHOD, X_ORIGINAL_URI, X_ORIGINAL_URL];
        static FORWARD_AUTH: [HeaderName; 2] = [X_FORWARDED_METHOD, X_FORWARDED_URI];
        match self {
            Self::AuthRequest => &AUTH_REQUEST,
            Self::ForwardAuth => &FORWARD_AUTH,
            Self::ExtAuthz => &[],
        }
    }
}

/// Whether `query` holds the query credential, however its name is spelled, with a value
/// (an unreadable one counts; an empty one, `?api_key=`, is no credential, as the proxy
/// reads it).
fn carries_query_key(app: &App, query: Option<&str>) -> bool {
    let (Some(name), Some(query)) = (app.policy.credential_query(), query) else {
        return false;
    };
    crate::auth::credential::query_param_values(query, name)
        .any(|v| v.is_none_or(|v| !v.is_empty()))
}

/// Read the original request from the endpoint's own protocol, and nothing else: an
/// `auth-request` call ignores `X-Forwarded-*`, a `forward-auth` call ignores `X-Original-*`.
/// A fragment (`#`) in the original URI is refused, as SPEC 7 refuses it: `http::Uri` would
/// drop it and authorize the path before it, while the front proxy forwards the URI whole.
pub fn original<B>(endpoint: Endpoint, req: &Request<B>) -> Result<Original, Reject> {
    let (method, uri) = match endpoint {
        Endpoint::AuthRequest => (&X_ORIGINAL_METHOD, &X_ORIGINAL_URI),
        Endpoint::ForwardAuth => (&X_FORWARDED_METHOD, &X_FORWARDED_URI),
        Endpoint::ExtAuthz => {
            let original = Original {
                method: req.method().clone(),
                target: req.uri().clone(),
                skip: EXT_AUTHZ.len(),
            };
            if original.path().is_empty() {
                return Err(missing("URI"));
            }
            return Ok(original);
        }
    };
    let method = one(req.headers(), method)
        .and_then(|v| Method::from_bytes(v.as_bytes()).ok())
        .ok_or_else(|| missing("method"))?;
    // As the proxy refuses it: a front proxy would hand the app a tunnel request.
    if crate::proxy::head::is_connect(&method) {
        return Err(Reject::BadRequest(BadRequest::Connect));
    }
    // Parsed as hyper parses a request target, so an absolute-form or odd URI means here
    // what it would mean to the proxy.
    let uri = one(req.headers(), uri).ok_or_else(|| missing("URI"))?;
    if uri.as_bytes().contains(&b'#') {
        return Err(Reject::BadRequest(BadRequest::Path(PathError::Fragment)));
    }
    if endpoint == Endpoint::AuthRequest {
        same_original_url(req.headers(), uri)?;
    }
    let target = http::Uri::try_from(uri.as_bytes()).map_err(|_| missing("URI"))?;
    Ok(Original {
        method,
        target,
        skip: 0,
    })
}

/// ingress-nginx sends `X-Original-URL` on every auth request, beside `X-Original-URI`.
/// An app may route by it (IIS URL Rewrite, Symfony and Laminas behind a trusted proxy),
/// so it is taken only when it names the very target decided: a scheme, a host, then
/// exactly `uri`. Anything else is an override of the client's.
fn same_original_url(headers: &HeaderMap, uri: &HeaderValue) -> Result<(), Reject> {
    if !headers.contains_key(&X_ORIGINAL_URL) {
        return Ok(());
    }
    let url = one(headers, &X_ORIGINAL_URL).ok_or_else(|| missing("URL"))?;
    let rest = [&b"http://"[..], b"https://"]
        .into_iter()
        .find_map(|scheme| url.as_bytes().strip_prefix(scheme));
    let host = rest.and_then(|r| r.strip_suffix(uri.as_bytes()));
    // A host as `Host` carries it: a name, an IPv4 or bracketed IPv6 address, a port. No
    // `%` (`h%2F..%2Fadmin` is a path to an app that decodes the header), no space, no `@`.
    let host_byte = |b: &u8| b.is_ascii_alphanumeric() || b"-._~:[]".contains(b);
    match host {
        Some(h) if !h.is_empty() && h.iter().all(host_byte) => Ok(()),
        _ => Err(missing("URL")),
    }
}

fn missing(what: &'static str) -> Reject {
    Reject::BadRequest(BadRequest::Original(what))
}

/// The header's only value; absent, repeated or empty is none.
fn one<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    let mut values = h.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if !v.is_empty() => Some(v),
        _ => None,
    }
}

/// At most one `Upgrade` protocol, in one field. The proxy listener tunnels only a lone
/// `websocket` and drops any other upgrade; behind a decision the front proxy upgrades the
/// app, and two protocols let it match one and send the other.
fn one_upgrade(h: &HeaderMap) -> Result<(), Reject> {
    let mut values = h.get_all(header::UPGRADE).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes().contains(&b',') => {
            Err(Reject::BadRequest(BadRequest::Upgrade))
        }
        (Some(_), Some(_)) => Err(Reject::BadRequest(BadRequest::Upgrade)),
        _ => Ok(()),
    }
}

/// Answer one decision request. Never fails: every error becomes a response here.
pub async fn handle<B>(
    serving: Arc<Serving>,
    req: Request<B>,
    prepared: Arc<Prepared>,
    caller_trusted: bool,
) -> Result<Response<Body>, Infallible> {
    let Serving { app, worker, conn } = &*serving;
    let start = Instant::now();
    // The original's query may be in either protocol's header, or the request's own.
    let header_query = |name: &HeaderName| {
        let uri = req.headers().get(name).and_then(|v| v.to_str().ok());
        uri.and_then(|u| u.split_once('?')).map_or("", |(_, q)| q)
    };
    let queries = || {
        [
            req.uri().query().unwrap_or(""),
            header_query(&X_ORIGINAL_URI),
            header_query(&X_FORWARDED_URI),
        ]
    };
    let cid = respond::correlation_id(req.headers(), worker.ids(), &app.policy, queries);
    let http2 = req.version() == http::Version::HTTP_2;
    let asked_with = req.method().clone();
    let Some(endpoint) = Endpoint::of(req.uri().path()) else {
        let mut resp = not_found(&cid);
        headers::set_correlation(resp.headers_mut(), &cid);
        respond::close_if_draining(&mut resp, http2, &app.draining);
        respond::finish_head(&mut resp, &asked_with);
        return Ok(resp);
    };
    // The original request lives here, so the trace can borrow its path.
    let original = crate::proxy::head::check_head(&req, &app.config.limits)
        .and_then(
            |()| match crate::proxy::head::valid_forwarded_host(req.headers()) {
                true => Ok(()),
                false => Err(Reject::BadRequest(BadRequest::Host)),
            },
        )
        .and_then(|()| {
            prepared
                .screen
                .check(endpoint, req.headers(), &app.names, caller_trusted)
        })
        .and_then(|()| one_upgrade(req.headers()))
        .and_then(|()| original(endpoint, &req));
    let mut method = req.method().clone();
    // The decision request's own target: an abandoned one is logged as such.
    let target = req.uri().clone();
    let mut unanswered = handler::Unanswered::new(
        worker,
        &app.policy,
        &cid,
        app.policy.logged_method(&asked_with),
        &target,
        start,
    );
    let mut trace = Trace::default();
    let result = match &original {
        Ok(original) => {
            method = original.method.clone();
            decide(
                app,
                (worker, conn),
                &req,
                original,
                (&prepared.allow, &cid),
                &mut trace,
            )
            .await
        }
        Err(reject) => Err(reject.clone()),
    };
    // An allow answer carries the correlation id from its template; a refusal gets it here.
    let (mut resp, code) = match result {
        Ok(allowed) => (allowed, Code::Ok),
        Err(reject) => {
            let mut resp = respond::error(&reject, cid.to_str().unwrap_or_default());
            if reject.closes_connection() && !http2 {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            headers::set_correlation(resp.headers_mut(), &cid);
            (resp, reject.code())
        }
    };
    respond::close_if_draining(&mut resp, http2, &app.draining);
    respond::finish_head(&mut resp, &asked_with);
    unanswered.answered();
    let elapsed = start.elapsed();
    worker.metrics().record_request(code, elapsed);
    let logged = app.policy.logged_method(&method);
    handler::access_log(&cid, logged, resp.status(), code, &trace, elapsed);
    Ok(resp)
}

/// The proxy's phases on the original request.
async fn decide<'a, B>(
    app: &App,
    (worker, conn): (&Worker, &ConnInfo),
    req: &Request<B>,
    original: &'a Original,
    answer: (&AllowHead, &HeaderValue),
    trace: &mut Trace<'a>,
) -> Result<Response<Body>, Reject> {
    let (head_of_allow, cid) = answer;
    if !app.config.forward_credential && carries_query_key(app, original.query()) {
        return Err(Reject::BadRequest(BadRequest::QueryKey));
    }
    let head = Head {
        method: &original.method,
        headers: req.headers(),
        // A key in the query string would reach the app with the URI the front proxy
        // forwards whole: unless keys may be forwarded, it is not read here.
        query: original.query().filter(|_| app.config.forward_credential),
        app_query: original.query(),
    };
    let path = original.path();
    Ok(
        match handler::decide(app, worker, Door::Decision, &head, path, trace).await? {
            Verdict::Public => allowed(head_of_allow, &app.names, None, None, cid),
            Verdict::Introspection(p, quota) | Verdict::Protected(p, quota) => {
                // A decision's answer is its head: an HTTP/2 connection carried a key.
                if req.version() == http::Version::HTTP_2 {
                    drop(conn.vouch());
                }
                allowed(head_of_allow, &app.names, Some(&p), quota.as_ref(), cid)
            }
        }
        .map(|()| Either::Right(Full::new(Bytes::new()))),
    )
}

/// What a decision listener builds once from the configuration: the allow answer's head
/// and the screen of header names a decision refuses.
pub struct Prepared {
    pub allow: AllowHead,
    pub screen: screen::Screen,
}

impl Prepared {
    pub fn new(app: &App) -> Self {
        Self {
            allow: AllowHead::new(&app.names),
            screen: screen::Screen::new(app),
        }
    }
}

/// Headers an allow answer can carry: every identity header, the correlation id, the quota.
const ALLOW_HEADERS: usize = 12 + 2 + 3;

/// The head every allow answer starts from, built once per listener: every identity name
/// (empty), then `x-correlation-id` and `x-request-id`. An answer clones it and fills the
/// values in place, found by position: no header name is hashed per decision.
pub struct AllowHead(HeaderMap);

impl AllowHead {
    pub fn new(names: &IdentityNames) -> Self {
        Self(by_name(allow_slots(names, [None; 12], &EMPTY)))
    }
}

/// A map sized for an allow answer, each header added by name.
fn by_name<'a>(slots: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(ALLOW_HEADERS);
    for (name, value) in slots {
        h.append(name.clone(), value.clone());
    }
    h
}

static EMPTY: HeaderValue = HeaderValue::from_static("");
static CORRELATION: [HeaderName; 2] = [respond::X_CORRELATION_ID, respond::X_REQUEST_ID];

/// Each header of an allow answer before the quota, in order, with its value.
fn allow_slots<'a>(
    names: &'a IdentityNames,
    values: [Option<&'a HeaderValue>; 12],
    cid: &'a HeaderValue,
) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + 'a {
    let identity = identity_names(names)
        .into_iter()
        .zip(values.map(|v| v.unwrap_or(&EMPTY)));
    identity.chain(CORRELATION.iter().map(move |name| (name, cid)))
}

/// `200`, no body, every identity header name (empty where the key has no value, so a proxy
/// that copies them overwrites whatever the client sent), the correlation id, and the quota
/// when limited.
pub fn allowed(
    head: &AllowHead,
    names: &IdentityNames,
    principal: Option<&Principal>,
    quota: Option<&Quota>,
    cid: &HeaderValue,
) -> Response<()> {
    let values = principal.map_or([None; 12], |p| {
        p.key.identity_values(names, p.delegated_account.as_ref())
    });
    let mut h = head.0.clone();
    if !fill(&mut h, allow_slots(names, values, cid)) {
        // Not the template of these names (never, as built): add each header instead.
        h = by_name(allow_slots(names, values, cid));
    }
    if let Some(quota) = quota {
        respond::set_quota(&mut h, quota);
    }
    let mut resp = Response::new(());
    *resp.headers_mut() = h;
    resp
}

/// Set each header of `h`, in order, to the value `wanted` gives for the same name. False
/// when the names or their number differ (the caller then builds the map by name).
fn fill<'a>(
    h: &mut HeaderMap,
    wanted: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) -> bool {
    let mut slots = h.iter_mut();
    for (name, value) in wanted {
        match slots.next() {
            Some((slot_name, slot)) if slot_name == name => {
                if slot != value {
                    *slot = value.clone();
                }
            }
            _ => return false,
        }
    }
    slots.next().is_none()
}

/// Every identity header of SPEC 8, those `identity_headers.include` leaves out too: an
/// allow names each one (empty when not sent), so a copying proxy overwrites a client's.
pub fn identity_names(n: &IdentityNames) -> [&HeaderName; 12] {
    n.all().each_ref()
}

fn not_found(cid: &HeaderValue) -> Response<Body> {
    let body = serde_json::json!({
        "status": 404,
        "code": "not_found",
        "error": "Not a decision endpoint",
        "message": "Not a decision endpoint",
        "endpoints": [AUTH_REQUEST, FORWARD_AUTH, format!("{EXT_AUTHZ}/<path>")],
        "correlation_id": cid.to_str().unwrap_or_default(),
    });
    let mut resp = respond::json(StatusCode::NOT_FOUND, &body);
    // A refusal: held to `header_read_timeout`, and to the own answers' budget.
    resp.extensions_mut().insert(respond::Refused);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn orig(m: &str, p: &str, q: Option<&str>) -> Original {
        let target = match q {
            Some(q) => format!("{p}?{q}"),
            None => p.to_owned(),
        };
        Original {
            method: Method::from_bytes(m.as_bytes()).unwrap(),
            target: http::Uri::try_from(target).unwrap(),
            skip: 0,
        }
    }

    #[test]
    fn endpoints_by_path() {
        assert_eq!(Endpoint::of(AUTH_REQUEST), Some(Endpoint::AuthRequest));
        assert_eq!(Endpoint::of(FORWARD_AUTH), Some(Endpoint::ForwardAuth));
        assert_eq!(
            Endpoint::of("/v1/decide/ext-authz/a"),
            Some(Endpoint::ExtAuthz)
        );
        assert_eq!(
            Endpoint::of("/v1/decide/ext-authz"),
            Some(Endpoint::ExtAuthz)
        );
        for other in [
            "/",
            "/v1/decide/ext-authzx",
            "/v1/decide/auth-request/x",
            "/v1/decide",
        ] {
            assert_eq!(Endpoint::of(other), None, "{other}");
        }
    }

    #[test]
    fn each_endpoint_reads_its_own_headers() {
        let both = [
            ("x-original-method", "POST"),
            ("x-original-uri", "/o?x=1"),
            ("x-forwarded-method", "PUT"),
            ("x-forwarded-uri", "/f"),
        ];
        let r = req("GET", AUTH_REQUEST, &both);
        assert_eq!(
            original(Endpoint::AuthRequest, &r),
            Ok(orig("POST", "/o", Some("x=1")))
        );
        assert_eq!(
            original(Endpoint::ForwardAuth, &r),
            Ok(orig("PUT", "/f", None))
        );
        let only_forwarded = req("GET", AUTH_REQUEST, &both[2..]);
        assert_eq!(
            original(Endpoint::AuthRequest, &only_forwarded),
            Err(missing("method"))
        );
        let only_original = req("GET", FORWARD_AUTH, &both[..2]);
        assert_eq!(
            original(Endpoint::ForwardAuth, &only_original),
            Err(missing("method"))
        );
    }

    #[test]
    fn original_must_be_one_valid_method_and_uri() {
        let m = ("x-original-method", "GET");
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[m], "URI"),
            (&[m, ("x-original-uri", "")], "URI"),
            (
                &[m, ("x-original-uri", "/a"), ("x-original-uri", "/b")],
                "URI",
            ),
            (
                &[("x-original-method", "G T"), ("x-original-uri", "/a")],
                "method",
            ),
            (&[m, ("x-original-uri", "/a b")], "URI"),
        ];
        for (headers, what) in cases {
            let r = req("GET", AUTH_REQUEST, headers);
            assert_eq!(
                original(Endpoint::AuthRequest, &r),
                Err(missing(what)),
                "{headers:?}"
            );
        }
        // CONNECT, in any case, is refused as the proxy refuses it.
        for connect in ["CONNECT", "connect"] {
            let r = req(
                "GET",
                AUTH_REQUEST,
                &[("x-original-method", connect), ("x-original-uri", "/a")],
            );
            assert_eq!(
                original(Endpoint::AuthRequest, &r),
                Err(Reject::BadRequest(BadRequest::Connect))
            );
        }
        // ingress-nginx's X-Original-URL: taken when it names the same target.
        let uri = ("x-original-uri", "/v1/x?a=1");
        for url in [
            "http://api.example.com/v1/x?a=1",
            "https://h:8443/v1/x?a=1",
            "http://my_app.local/v1/x?a=1",
        ] {
            let r = req("GET", AUTH_REQUEST, &[m, uri, ("x-original-url", url)]);
            assert_eq!(
                original(Endpoint::AuthRequest, &r),
                Ok(orig("GET", "/v1/x", Some("a=1"))),
                "{url}"
            );
        }
        for url in [
            "http://api.example.com/admin/x",
            "http://api.example.com/v1/x?a=2",
            "http://api.example.com/v1/x?a=1&b",
            "/v1/x?a=1",
            "http:///v1/x?a=1",
            "ftp://h/v1/x?a=1",
            "http://h/p/v1/x?a=1",
            "http://u@h/v1/x?a=1",
            "http://h%2F..%2Fadmin/v1/x?a=1",
            "http://h x/v1/x?a=1",
            "",
        ] {
            let r = req("GET", AUTH_REQUEST, &[m, uri, ("x-original-url", url)]);
            assert_eq!(
                original(Endpoint::AuthRequest, &r),
                Err(missing("URL")),
                "{url}"
            );
        }
        // Absolute form: the path, as hyper would give the proxy.
        let r = req(
            "GET",
            AUTH_REQUEST,
            &[m, ("x-original-uri", "http://h/admin?q")],
        );
        assert_eq!(
            original(Endpoint::AuthRequest, &r),
            Ok(orig("GET", "/admin", Some("q")))
        );
    }

    #[test]
    fn ext_authz_takes_the_path_after_the_prefix_and_its_own_method() {
        let r = req("DELETE", "/v1/decide/ext-authz/a/../b?k=v", &[]);
        assert_eq!(
            original(Endpoint::ExtAuthz, &r),
            Ok(orig("DELETE", "/a/../b", Some("k=v")))
        );
        let r = req("GET", "/v1/decide/ext-authz", &[]);
        assert_eq!(original(Endpoint::ExtAuthz, &r), Err(missing("URI")));
        let r = req("GET", "/v1/decide/ext-authz?x", &[]);
        assert_eq!(original(Endpoint::ExtAuthz, &r), Err(missing("URI")));
    }

    /// The answer filled into the template is, header for header and in order, the one
    /// built by adding each name: for a key with values, delegated, and with headers left
    /// out by `identity_headers.include`.
    #[test]
    fn a_filled_template_is_the_answer_built_by_name() {
        use crate::keys::fixtures::entry;
        use crate::keys::{IdentityField, Snapshot, Source};
        let snapshot = Snapshot::parse(&entry("    org_id: o1\n"), Source::File).unwrap();
        let key = snapshot.by_id("key_a").unwrap().clone();
        let all = IdentityNames::new("x-auth-", "test").unwrap();
        let some = IdentityNames::new("x-auth-", "test")
            .unwrap()
            .including(Some(&[IdentityField::KeyId, IdentityField::AccountId]));
        let cid = HeaderValue::from_static("c-2");
        let pairs = |h: &HeaderMap| -> Vec<(String, String)> {
            h.iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                .collect()
        };
        for names in [&all, &some] {
            let head = AllowHead::new(names);
            for delegated in [None, Some(HeaderValue::from_static("acct_child"))] {
                let p = Principal {
                    key: key.clone(),
                    delegated_account: delegated,
                };
                let values = p.key.identity_values(names, p.delegated_account.as_ref());
                let by_name = by_name(allow_slots(names, values, &cid));
                // The template of these names is filled by position, not rebuilt by name.
                let mut in_place = head.0.clone();
                assert!(fill(&mut in_place, allow_slots(names, values, &cid)));
                assert_eq!(pairs(&in_place), pairs(&by_name));
                let filled = allowed(&head, names, Some(&p), None, &cid);
                assert_eq!(pairs(filled.headers()), pairs(&by_name));
                assert_eq!(filled.headers()["x-auth-key-id"], "key_a");
            }
        }
        // A template of other names is not filled by position: the answer is built by name.
        let other = AllowHead::new(&IdentityNames::new("x-id-", "test").unwrap());
        let mut mismatched = other.0.clone();
        assert!(!fill(&mut mismatched, allow_slots(&all, [None; 12], &cid)));
        let resp = allowed(&other, &all, None, None, &cid);
        assert_eq!(resp.headers().len(), 14);
        assert!(resp.headers().contains_key("x-auth-subject-id"));
        assert!(!resp.headers().contains_key("x-id-subject-id"));
    }

    #[test]
    fn an_allow_names_every_identity_header() {
        let names = IdentityNames::new("x-auth-", "test").unwrap();
        let head = AllowHead::new(&names);
        let cid = HeaderValue::from_static("c-1");
        let resp = allowed(&head, &names, None, None, &cid);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers().len(), 14);
        for name in identity_names(&names) {
            assert_eq!(resp.headers()[name], "", "{name}");
        }
        assert_eq!(resp.headers()["x-correlation-id"], "c-1");
        assert_eq!(resp.headers()["x-request-id"], "c-1");
        let quota = Quota {
            limit: 5,
            remaining: 4,
            reset_secs: 1,
        };
        let resp = allowed(&head, &names, None, Some(&quota), &cid);
        assert_eq!(resp.headers()["ratelimit-remaining"], "4");
        // Headers `identity_headers.include` leaves out are still named, empty.
        let some = names.including(Some(&[crate::keys::IdentityField::KeyId]));
        let resp = allowed(&head, &some, None, None, &cid);
        assert_eq!(resp.headers().len(), 14);
        assert_eq!(resp.headers()["x-auth-subject-id"], "");
    }
}
