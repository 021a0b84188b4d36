//! One request, as a flat list of named phases, read top to bottom in [`proxy`]:
//! check the head → [`decide`] (normalize → route → authenticate → rate-limit, shared with
//! the decision listener) → build the upstream request → send it upstream → shape the
//! client's response; [`handle`] then maps any refusal onto its answer and logs the line.
//! Only the upstream exchange (and a rate limit shared through Redis) awaits.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use tracing::{info, warn};

use super::conn::{ConnInfo, Serving, Slot};
use super::forward::{self, ProxyError};
use super::head::check_head;
use super::headers::{self, Identity};
use super::watch::{Decided, KeyWatch, TunnelWatch};
use super::worker::Worker;
use super::{respond, Body, RequestBody, UpstreamBody};
use crate::auth::credential::strip_query_param;
use crate::auth::overrides::overridden;
use crate::auth::ratelimit::{Quota, RateDecision};
use crate::auth::reject::BadRequest;
use crate::auth::{self, AuthRequest, Code, Decision, Principal, Reject, Route};
use crate::keys::Key;
use crate::metrics::Shard;
use crate::App;

/// What the access log line says about a request. The path borrows from the request's
/// target when normalizing left it as it was.
#[derive(Default)]
pub struct Trace<'a> {
    path: Option<Cow<'a, str>>,
    /// The path as the access log shows it, where that differs from `path`: cut where a
    /// query may begin, clipped, and screened for keys ([`Trace::set_path`]).
    logged: Option<String>,
    /// The key presented, once identified (allowed or not).
    key: Option<Arc<Key>>,
    upstream: Option<Duration>,
}

impl<'a> Trace<'a> {
    /// The request's path: normalized once [`decide`] got that far, else as sent.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("-")
    }

    /// The path as logged ([`Trace::set_path`]).
    pub fn logged_path(&self) -> &str {
        self.logged.as_deref().unwrap_or_else(|| self.path())
    }

    /// Keep `path`, and what of it the access log may show, screened for keys while the
    /// request's credentials are at hand ([`crate::auth::Policy::loggable_path`]).
    fn set_path(&mut self, app: &App, path: Cow<'a, str>, head: &Head<'_>) {
        let queries = [head.query.unwrap_or(""), head.app_query.unwrap_or("")];
        self.logged = loggable(&app.policy, &path, Some(head.headers), &queries);
        self.path = Some(path);
    }
}

/// A request ready for the upstream, and what the response needs from the phases before.
struct UpstreamRequest {
    req: Request<RequestBody>,
    /// The client's side of an allowed WebSocket upgrade, the connection slot the tunnel
    /// keeps and when its connection ages (boxed: upgrades are rare, and this travels with
    /// every request).
    upgrade: Option<Box<Upgrade>>,
    /// The client connection's [`crate::proxy::pool::ConnOwner`].
    owner: crate::proxy::pool::ConnOwner,
}

/// See [`UpstreamRequest::upgrade`].
struct Upgrade {
    down: hyper::upgrade::OnUpgrade,
    slot: Option<Slot>,
    aged_at: Option<tokio::time::Instant>,
}

/// Serve one request with what the serving `worker` owns (its upstream connections, its
/// metrics shard). Never fails: every error becomes a response here.
///
/// Every phase but the upstream exchange (and a rate limit shared through Redis) is
/// synchronous, so this future stays small (hyper moves it into place once per request).
pub async fn handle(
    serving: Arc<Serving>,
    req: Request<RequestBody>,
) -> Result<Response<Body>, Infallible> {
    let (app, worker) = (&serving.app, &serving.worker);
    let start = Instant::now();
    let cid = respond::correlation_id(req.headers(), worker.ids(), &app.policy, || {
        [req.uri().query().unwrap_or("")]
    });
    let method = req.method().clone();
    let http2 = req.version() == http::Version::HTTP_2;
    // The target is kept (a reference count, not a copy) so the path can be borrowed while
    // the request itself moves on upstream.
    let target = req.uri().clone();
    let logged = app.policy.logged_method(&method);
    let mut unanswered = Unanswered::new(worker, &app.policy, &cid, logged, &target, start);
    let trace = &mut unanswered.trace;
    let (mut resp, code) = match proxy(&serving, req, &target, &cid, trace).await {
        Ok(resp) => (resp, Code::Ok),
        Err(reject) => (refusal(&reject, &cid, http2), reject.code()),
    };
    headers::set_correlation(resp.headers_mut(), &cid);
    respond::close_if_draining(&mut resp, http2, &app.draining);
    respond::finish_head(&mut resp, &method);
    unanswered.answered();
    let elapsed = start.elapsed();
    worker.metrics().record_request(code, elapsed);
    access_log(
        &cid,
        logged,
        resp.status(),
        code,
        &unanswered.trace,
        elapsed,
    );
    Ok(resp)
}

/// A request whose answer was never made: hyper drops the service's future when its client
/// goes away (a closed connection, an HTTP/2 reset), typically while the upstream is slow.
/// It is still counted (`client_closed_request`, nginx's 499) and logged, or the slowness
/// that made clients give up would leave no trace.
pub struct Unanswered<'a> {
    worker: &'a Worker,
    cid: &'a HeaderValue,
    /// As logged ([`crate::auth::Policy::logged_method`]).
    method: &'a str,
    target: &'a http::Uri,
    /// Screens the logged path (the request's headers are gone by the time it is logged).
    policy: &'a crate::auth::Policy,
    start: Instant,
    armed: bool,
    /// What the phases learnt of the request (its path, its key): the line of a request
    /// given up after its key was identified names the key, as an answered one does.
    pub trace: Trace<'a>,
}

impl<'a> Unanswered<'a> {
    pub fn new(
        worker: &'a Worker,
        policy: &'a crate::auth::Policy,
        cid: &'a HeaderValue,
        method: &'a str,
        target: &'a http::Uri,
        start: Instant,
    ) -> Self {
        Self {
            worker,
            cid,
            method,
            target,
            policy,
            start,
            armed: true,
            trace: Trace::default(),
        }
    }

    /// The answer is made: counting and logging it is the caller's.
    pub fn answered(&mut self) {
        self.armed = false;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let elapsed = self.start.elapsed();
        let code = match self.worker.was_cut_off() {
            true => Code::CutAtShutdown,
            false => Code::ClientClosed,
        };
        self.worker.metrics().record_request(code, elapsed);
        let mut trace = std::mem::take(&mut self.trace);
        if trace.path.is_none() {
            let path = self.target.path();
            trace.logged = loggable(self.policy, path, None, &[]);
            trace.path = Some(Cow::Borrowed(path));
        }
        access_log(self.cid, self.method, code.status(), code, &trace, elapsed);
    }
}

/// The phases, in order. The normalized path is both what is authorized and what is
/// forwarded.
async fn proxy<'a>(
    serving: &Arc<Serving>,
    req: Request<RequestBody>,
    target: &'a http::Uri,
    cid: &HeaderValue,
    trace: &mut Trace<'a>,
) -> Result<Response<Body>, Reject> {
    let Serving { app, worker, conn } = &**serving;
    check_head(&req, &app.config.limits)?;
    let head = Head::of(&req);
    let decided = Decided::now(app);
    let verdict = decide(app, worker, Door::Proxy, &head, target.path(), trace).await?;
    // An HTTP/2 connection carries a key while this request's answer is in flight (what
    // the stream budget reads; an HTTP/1.1 connection holds no share, and pays nothing).
    let keyed = match verdict {
        Verdict::Public => None,
        _ if req.version() != http::Version::HTTP_2 => None,
        _ => conn.vouch(),
    };
    let (principal, quota) = match verdict {
        Verdict::Introspection(principal, quota) => {
            return Ok(introspect(app, &principal, quota, cid))
        }
        Verdict::Public => (None, None),
        Verdict::Protected(principal, quota) => (Some(principal), quota),
    };
    let out = upstream_request(app, conn, req, target, trace, cid)?;
    let identity = principal.as_ref().map(|p| Identity {
        key: &p.key,
        names: &app.names,
        delegated: p.delegated_account.as_ref(),
    });
    // A watch holds the connection's keyed-in-flight share only with the answer: one in an
    // upload lives as long as hyper's upstream connection holds the body (an app that stops
    // reading it), which may be long after this connection closed (review 31).
    let key_watch = |keyed: Option<&crate::proxy::conn::KeyedInFlight>| {
        let key = principal.as_ref().map(|p| p.key.clone());
        key.map(|key| KeyWatch::new(app.clone(), key, decided, keyed.cloned()))
    };
    let upload_watch = || key_watch(None);
    let resp = send_upstream(app, worker, out, identity, trace, cid, upload_watch).await?;
    let resp = forward::downstream_response(resp, key_watch(keyed.as_ref()));
    Ok(client_response(app, resp, principal.as_ref(), quota))
}

/// keyward's answer to a refused request; `Connection: close` where the refusal asks for it
/// (HTTP/1 only: HTTP/2 has no such header).
fn refusal(reject: &Reject, cid: &HeaderValue, http2: bool) -> Response<Body> {
    let mut resp = respond::error(reject, cid.to_str().unwrap_or_default());
    if reject.closes_connection() && !http2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The introspection answer (SPEC 9): who the key is, with its quota.
fn introspect(
    app: &App,
    principal: &Principal,
    quota: Option<Quota>,
    cid: &HeaderValue,
) -> Response<Body> {
    let body = introspection_body(app, principal, cid);
    let mut resp = respond::json(StatusCode::OK, &body);
    resp.extensions_mut().insert(respond::Local);
    if let Some(quota) = quota {
        set_rate_limit_headers(resp.headers_mut(), &quota);
    }
    resp
}

/// The request facts every front door turns its protocol into: the original method, the
/// headers the credential and the delegation are read from, the query a credential may be
/// read from, and the original query (what the app reads, a `_method` in it too).
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a http::Method,
    pub headers: &'a http::HeaderMap,
    pub query: Option<&'a str>,
    pub app_query: Option<&'a str>,
}

impl<'a> Head<'a> {
    fn of<B>(req: &'a Request<B>) -> Self {
        Self {
            method: req.method(),
            headers: req.headers(),
            query: req.uri().query(),
            app_query: req.uri().query(),
        }
    }
}

/// Which front door asks. Only the proxy answers the introspection path itself; behind a
/// decision (SPEC 15) the front proxy sends every allowed request on to the app, so there
/// the introspection path is routed, and its scopes checked, like any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Proxy,
    Decision,
}

/// What the phases decided for an allowed request.
pub enum Verdict {
    /// A public route: no key asked for.
    Public,
    /// The introspection path, with a valid key (its scopes are not checked).
    Introspection(Principal, Option<Quota>),
    /// A protected route the key may use; the key's quota after this request.
    Protected(Principal, Option<Quota>),
}

/// Does the request hide the query credential's parameter where keyward's own split of the
/// query does not see it, but an app that decodes its URL (and NFKC-normalizes it) before
/// splitting it does: after a `?` in the path (`%3F`, a fullwidth `？`), or in the query
/// behind an encoded separator (`a=1%26api_key=`)? That app would read a key keyward never
/// checked (on a public route, with none asked for). Asked only with a query credential.
fn hides_query_key(app: &App, path: &str, query: Option<&str>) -> bool {
    use auth::credential::assigned_values;
    let Some(name) = app.policy.credential_query() else {
        return false;
    };
    // At each `?` and `&` of the path, in every reading of it: parsers that search the whole
    // URL for `?name=` or `&name=` (Hono before 4.10.5) read `/x&api_key=K` too, and a
    // `#` (`/x%23&api_key=K`) does not stop a search.
    let in_path = app_readings(path).iter().any(|reading| {
        reading.contains(['?', '&'])
            && !assigned_values(&reading.replace('?', "&"), name, false, false).is_empty()
    });
    in_path || query.is_some_and(|raw| query_hides_key(raw, name))
}

/// The ways an app may read `s` before it splits it: as sent, percent-decoded (and
/// NFKC-normalized), with `%uXXXX` decoded too, as ASP.NET's `UrlDecode` and JavaScript's
/// `unescape` do, and decoded twice. None is cut at a `#`: a cut only takes values away.
fn app_readings(s: &str) -> Vec<Cow<'_, str>> {
    let mut readings = vec![Cow::Borrowed(s)];
    if let Cow::Owned(u) = auth::credential::decode_u_escapes(s) {
        readings.push(Cow::Owned(auth::path::as_decoded(&u).into_owned()));
    }
    // Only the readings that differ from the text as sent: a plain one costs nothing more.
    if let Cow::Owned(once) = auth::path::as_decoded(s) {
        // Decoded twice (`%2526` is `&` to an app, or a rewrite layer in front of it, that
        // decodes before its parser decodes again).
        if let Cow::Owned(twice) = auth::path::as_decoded(&once) {
            readings.push(Cow::Owned(twice));
        }
        readings.push(Cow::Owned(once));
    }
    readings
}

/// Does an app's reading of the query `raw` give the credential parameter a value
/// keyward's split does not read, or a different number of them? Every value an app may
/// read must be one keyward read, value for value (counts alone were cancelled out: a
/// decoded `%23` cut the real parameter off where a decoded `%26` added a hidden one), and
/// as many times (a second copy of the same key, hidden, reached the app after the one
/// keyward read was stripped), in every reading, `?` splitting too (parsers searching for
/// `?api_key=`). A name read one way and not the other counts too (PHP cuts a name at
/// `%00`: `api_key%00%26%=K` is a key to it and no parameter to a decoder).
fn query_hides_key(raw: &str, name: &str) -> bool {
    use auth::credential::assigned_values;
    let as_sent = assigned_values(raw, name, false, false);
    // As a form decodes them (`+` a space) and as a URL decoder does (`+` kept); a set, so
    // that many parameters cost linear time (a list made 1,436 of them cost 9.6 ms).
    let mut read: std::collections::HashSet<Vec<u8>> = assigned_values(raw, name, false, true)
        .into_iter()
        .collect();
    read.extend(
        as_sent
            .iter()
            .map(|v| percent_encoding::percent_decode(v).collect::<Vec<u8>>()),
    );
    app_readings(raw).iter().enumerate().any(|(i, reading)| {
        // The query as sent is split first and its values decoded after (keyward's own
        // reading, without `?` splitting, is skipped); the other readings' values are what
        // the app takes.
        let as_sent_reading = i == 0;
        [false, true]
            .into_iter()
            .filter(|&question| !as_sent_reading || question)
            .filter(|&question| !question || reading.contains('?'))
            .any(|question| {
                let values = assigned_values(reading, name, question, as_sent_reading);
                values.len() != as_sent.len() || values.iter().any(|v| !read.contains(v))
            })
    })
}

/// The phases shared by every front door: normalize → route → authenticate → rate-limit.
/// `raw_path` is the path as the client sent it; the normalized path, the one that was
/// authorized, is then [`Trace::path`].
pub async fn decide<'a>(
    app: &App,
    worker: &Worker,
    door: Door,
    head: &Head<'_>,
    raw_path: &'a str,
    trace: &mut Trace<'a>,
) -> Result<Verdict, Reject> {
    // The path, and what an app may read it as (`/admin%3F` as `/admin`).
    let normalized = auth::path::normalize(raw_path)
        .and_then(|path| auth::path::readings(&path).map(|readings| (path, readings)));
    let (path, readings) = match normalized {
        Ok(read) => read,
        Err(e) => {
            trace.set_path(app, Cow::Borrowed(raw_path), head);
            return Err(Reject::BadRequest(BadRequest::Path(e)));
        }
    };
    if hides_query_key(app, &path, head.app_query) {
        trace.set_path(app, Cow::Borrowed(raw_path), head);
        return Err(Reject::BadRequest(BadRequest::KeyInPath));
    }
    let route = match door {
        Door::Proxy => app.policy.route(head.method, &path),
        Door::Decision if !forwarded_as_authorized(raw_path, &path) => {
            trace.set_path(app, Cow::Borrowed(raw_path), head);
            return Err(Reject::BadRequest(BadRequest::NotNormal));
        }
        Door::Decision => app.policy.app_route(&path),
    };
    trace.set_path(app, path, head);
    // What an allowed override header makes the app serve is authorized too.
    let alt = match app.config.allow_override_headers.as_slice() {
        [] => None,
        allowed => {
            let query_key = app.policy.credential_query();
            let unforwarded = query_key.filter(|_| !app.config.forward_credential);
            overridden(
                head.headers,
                allowed,
                head.method,
                trace.path(),
                unforwarded,
            )?
        }
    };
    let alt = auth::overrides::with_query_method(alt, head.app_query, head.method, trace.path())?;
    let alt_route = alt.as_ref().map(|a| app.policy.app_route(&a.path));
    // What the app may read the path as (`/admin.json` as `/admin`) is authorized too.
    let reading = match route {
        Route::Introspection => None,
        _ => app.policy.reading_route(trace.path(), &readings),
    };
    // And what it may read an override's path as.
    let alt_reading = match &alt {
        Some(a) => {
            let readings = auth::path::readings(&a.path)
                .map_err(|e| Reject::BadRequest(BadRequest::Path(e)))?;
            app.policy.reading_route(&a.path, &readings)
        }
        None => None,
    };
    // Introspection asks for a valid key but not its scopes (keyward answers it: an
    // override goes nowhere).
    let (route_scopes, check_scope) = match (route, alt_route) {
        (Route::Introspection, _) => (None, false),
        (Route::Protected { extra }, _) => (extra, true),
        (Route::Public, None | Some(Route::Public))
            if reading.is_none() && alt_reading.is_none() =>
        {
            return Ok(Verdict::Public)
        }
        (Route::Public, None | Some(Route::Public)) => (None, true),
        (Route::Public, Some(Route::Protected { extra })) => (extra, true),
        (Route::Public, Some(Route::Introspection)) => (None, true),
    };
    let now = SystemTime::now();
    let metrics = worker.metrics();
    let principal = authenticate(app, metrics, head, route_scopes, check_scope, now, trace)?;
    if let (true, Some(alt), Some(Route::Protected { extra })) = (check_scope, &alt, alt_route) {
        auth::decision::check_scopes(&principal.key, &app.policy, &alt.method, extra)?;
    }
    if let (true, Some(alt), Some(asks)) = (check_scope, &alt, alt_reading) {
        for any_of in asks {
            auth::decision::check_scopes(&principal.key, &app.policy, &alt.method, Some(any_of))?;
        }
    }
    if let (true, Some(asks)) = (check_scope, reading) {
        for any_of in asks {
            auth::decision::check_scopes(&principal.key, &app.policy, head.method, Some(any_of))?;
        }
    }
    // A question asked with a key is a request by that key: it spends its quota.
    let quota = rate_limit(app, &principal).await?;
    // And it is a use of the key: one used only to check itself is not idle (the dry run
    // warns before removing a recently used key).
    app.usage.record(&principal.key.id, now, worker.index());
    if !check_scope {
        return Ok(Verdict::Introspection(principal, quota));
    }
    Ok(Verdict::Protected(principal, quota))
}

/// Behind a decision the front proxy forwards the path as its client sent it, not the
/// normalized one, and an app that reads `/admin/../v1` or `/v1/%2e%2e/healthz` its own way
/// would reach a route other than the one authorized (SPEC 7: rules match exactly the path
/// that is forwarded). So only a path normalization leaves alone is decided on, up to the
/// case of its percent-encodings' hex (which every reader decodes alike): each other step
/// (decoding, merging slashes, removing dot segments) shortens the path.
fn forwarded_as_authorized(raw: &str, normalized: &str) -> bool {
    raw.len() == normalized.len() && raw.eq_ignore_ascii_case(normalized)
}

#[allow(clippy::too_many_arguments)]
fn authenticate(
    app: &App,
    metrics: &Shard,
    head: &Head<'_>,
    route_scopes: Option<&[String]>,
    check_scope: bool,
    now: SystemTime,
    trace: &mut Trace<'_>,
) -> Result<Principal, Reject> {
    let start = Instant::now();
    let snapshot = app.store.guard();
    let input = AuthRequest {
        method: head.method,
        headers: head.headers,
        query: head.query,
        route_scopes,
        check_scope,
    };
    let decision = auth::decide(&input, snapshot.as_deref(), &app.policy, now);
    let decision = app.revocations.overlay(decision);
    metrics.record_auth(start.elapsed());
    match decision {
        Decision::Allow(p) => {
            trace.key = Some(p.key.clone());
            Ok(p)
        }
        Decision::Deny(r, key) => {
            trace.key = key;
            Err(r)
        }
    }
}

/// The key's quota after this request (`None`: the key has no limit), 429, or 503 when a
/// shared limit cannot be checked and `cluster.on_error` is `deny`.
async fn rate_limit(app: &App, principal: &Principal) -> Result<Option<Quota>, Reject> {
    if principal.key.rate_limit().is_none() {
        return Ok(None);
    }
    let checked = app.limiter.check(&principal.key).await;
    match checked.map_err(|_| Reject::AuthUnavailable)? {
        RateDecision::Limited {
            quota,
            retry_after_secs,
        } => Err(Reject::RateLimited {
            retry_after_secs,
            quota,
        }),
        RateDecision::Unlimited => Ok(None),
        RateDecision::Allowed(quota) => Ok(Some(quota)),
    }
}

/// `RateLimit-Limit/Remaining/Reset` on an allowed response, unless the upstream set its own.
fn set_rate_limit_headers(h: &mut http::HeaderMap, quota: &Quota) {
    if !h.contains_key("ratelimit-limit") {
        respond::set_quota(h, quota);
    }
}

/// Build the request sent upstream. Order matters: hop-by-hop headers go first, then
/// anything a client could forge; keyward's identity headers go in last, when it is sent
/// ([`forward::Upstream::send`]).
fn upstream_request(
    app: &App,
    conn: &ConnInfo,
    mut req: Request<RequestBody>,
    target: &http::Uri,
    trace: &Trace<'_>,
    cid: &HeaderValue,
) -> Result<UpstreamRequest, Reject> {
    if app.hop.looped(req.headers()) {
        app.metrics
            .record_upstream_error(crate::metrics::UpstreamErrorKind::Loop);
        if app.hop.say_loop() {
            tracing::warn!(
                correlation_id = cid.to_str().unwrap_or_default(),
                "request loop: this request was forwarded by this keyward before (its Via names this process); the upstream leads back here (said at most every 10 s; each counted in keyward_upstream_errors_total{{kind=\"loop\"}})"
            );
        }
        return Err(Reject::UpstreamUnavailable);
    }
    let upgrade = forward::wants_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| {
        Box::new(Upgrade {
            down: hyper::upgrade::on(&mut req),
            slot: conn.slot.clone(),
            aged_at: conn.aged_at,
        })
    });
    let host = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| req.headers().get(header::HOST).cloned());
    let uri = upstream_target(app, target, trace).map_err(|e| upstream_failed(app, &e, cid))?;

    let req_version_is_h2 = req.version() == http::Version::HTTP_2;
    let body = req.body();
    let unknown_length =
        !http_body::Body::is_end_stream(body) && http_body::Body::size_hint(body).exact().is_none();
    let h = req.headers_mut();
    headers::strip_hop_by_hop(h, upgrade);
    headers::strip_trusted(h, &app.config.identity_headers.prefix);
    let peer_trusted = headers::is_trusted(conn, &app.config.trusted_proxies);
    let drop_respelled =
        app.config.headers_with_underscores == crate::config::HeadersWithUnderscores::Drop;
    headers::strip_untrusted(
        h,
        peer_trusted,
        &app.config.allow_override_headers,
        drop_respelled,
    );
    headers::strip_credentials(
        h,
        app.policy.credential_headers(),
        app.config.forward_credential,
    );
    if let Some(host) = &host {
        h.insert(header::HOST, host.clone());
    }
    if req_version_is_h2 {
        // HTTP/2 may split cookies into one field each; HTTP/1.1 allows one Cookie line,
        // so they are joined with "; " (RFC 9113 8.2.3), or an app reads only the first.
        headers::join_cookies(h);
    }
    if unknown_length {
        // A body of unknown length (HTTP/1.1 chunked, HTTP/2 DATA without content-length)
        // goes on chunked. Said explicitly: on a GET, HEAD or CONNECT hyper would otherwise
        // send no body at all, and the app would silently get none.
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    headers::set_forwarded(h, conn, host, &app.config.trusted_proxies);
    let version = if req_version_is_h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    app.hop.append(h, version);
    // The identity headers go in last, added by the client that sends the request.
    headers::set_correlation(h, cid);
    *req.uri_mut() = uri;
    Ok(UpstreamRequest {
        req,
        upgrade: downstream_upgrade,
        owner: conn.owner,
    })
}

/// The one await: send upstream, and splice an allowed upgrade into a tunnel.
async fn send_upstream(
    app: &App,
    worker: &Worker,
    out: UpstreamRequest,
    identity: Option<Identity<'_>>,
    trace: &mut Trace<'_>,
    cid: &HeaderValue,
    key_watch: impl Fn() -> Option<KeyWatch>,
) -> Result<Response<UpstreamBody>, Reject> {
    let UpstreamRequest {
        req,
        upgrade,
        owner,
    } = out;
    // A place in the budget: a keyed request's share, or a place in the keyless half.
    let admitted = match identity {
        Some(_) => (!worker.over_in_flight_cap()).then_some(None),
        None => worker.keyless().map(Some),
    };
    let Some(keyless) = admitted else {
        app.metrics
            .record_upstream_error(crate::metrics::UpstreamErrorKind::Overload);
        return Err(Reject::UpstreamUnavailable);
    };
    let (mut resp, took) = app
        .upstream
        .send(
            worker.pool(),
            req,
            (identity, owner),
            upgrade.is_some(),
            // The body after the answer: a slot of its own, for a request without a key
            // only within its half of the budget (else it counted twice and such requests
            // took every slot).
            || match identity {
                Some(_) => Some((worker.busy(), None)),
                None => worker.keyless().map(|k| (worker.busy(), Some(k))),
            },
            &key_watch,
        )
        .await
        .map_err(|e| upstream_failed(app, &e, cid))?;
    trace.upstream = Some(took);
    // Held with the answer's body, to its end (see `forward::downstream_response`).
    if let Some(place) = keyless {
        resp.extensions_mut().insert(place);
    }
    worker
        .metrics()
        .record_upstream(resp.status().as_u16(), took);
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Only an allowed upgrade that keyward itself forwarded may switch protocols, and
        // only to WebSocket.
        let Some(Upgrade {
            down,
            slot,
            aged_at,
        }) = upgrade
            .filter(|_| forward::upgrades_to_websocket(resp.headers()))
            .map(|u| *u)
        else {
            return Err(upstream_failed(app, &ProxyError::UnexpectedUpgrade, cid));
        };
        let idle = app.config.limits.tunnel_idle_timeout;
        let watch = TunnelWatch {
            key: key_watch(),
            aged_at,
        };
        forward::spawn_tunnel(down, &mut resp, slot, worker.busy(), idle, watch);
    }
    Ok(resp)
}

/// The upstream's response as the client gets it: hop-by-hop headers gone, identity echoed
/// when configured, the key's quota added.
fn client_response(
    app: &App,
    mut resp: Response<Body>,
    principal: Option<&Principal>,
    quota: Option<Quota>,
) -> Response<Body> {
    // The identity headers are keyward's to send, on a response too: an app that echoes
    // what it received (a debug header) does not pass them to the client.
    headers::strip_trusted(resp.headers_mut(), &app.config.identity_headers.prefix);
    if let Some(p) = principal {
        if app.config.identity_headers.echo_to_client {
            let delegated = p.delegated_account.as_ref();
            let identity = p.key.identity_headers(&app.names, delegated);
            headers::add_identity(resp.headers_mut(), identity);
        }
    }
    if let Some(quota) = quota {
        set_rate_limit_headers(resp.headers_mut(), &quota);
    }
    resp
}

/// The origin-form target sent upstream: the normalized path and the forwarded query. When
/// both are as the client sent them, the client's target is reused (no copy).
fn upstream_target(
    app: &App,
    target: &http::Uri,
    trace: &Trace<'_>,
) -> Result<http::Uri, ProxyError> {
    let query = forwarded_query(app, target.query());
    let unchanged_query = match &query {
        None => true,
        Some(Cow::Borrowed(q)) => !q.is_empty(),
        Some(Cow::Owned(_)) => false,
    };
    if let (Some(Cow::Borrowed(_)), Some(pq)) = (&trace.path, target.path_and_query()) {
        // An absolute-form target without a path keeps `?q` (`http://h?q`) or nothing
        // (`http://h#`, h2's `:path "#"`) as its path and query, which the `http` crate
        // shows as `/` in one place and writes as `?q` or an empty target in others: reused
        // only when it is written with the `/` that was authorized, else built.
        let reused = http::Uri::from(pq.clone());
        if unchanged_query && pq.as_str().starts_with('/') && reused.path().starts_with('/') {
            return Ok(reused);
        }
    }
    app.upstream.uri(trace.path(), query.as_deref())
}

/// The query as forwarded: unchanged, unless the key may arrive in it and must not leave.
fn forwarded_query<'a>(app: &App, query: Option<&'a str>) -> Option<std::borrow::Cow<'a, str>> {
    let query = query?;
    match app.policy.credential_query() {
        Some(name) if !app.config.forward_credential => {
            Some(std::borrow::Cow::Owned(strip_query_param(query, name)))
        }
        _ => Some(std::borrow::Cow::Borrowed(query)),
    }
}

fn upstream_failed(app: &App, e: &ProxyError, cid: &HeaderValue) -> Reject {
    if e.is_upstream_fault() {
        let correlation_id = cid.to_str().unwrap_or_default();
        warn!(correlation_id, error = %forward::error_chain(e), "upstream request failed");
        app.metrics.record_upstream_error(e.kind());
    }
    e.reject()
}

fn introspection_body(app: &App, p: &Principal, cid: &HeaderValue) -> serde_json::Value {
    let k = &p.key;
    serde_json::json!({
        "principal_type": k.principal_type.as_str(),
        "subject_id": k.subject_id,
        "account_id": p.effective_account(),
        "org_id": k.org_id(),
        "enterprise_id": k.enterprise_id(),
        "key_id": &*k.id,
        "scopes": k.scopes(),
        "environment": app.config.environment,
        "expires_at": k.expires_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "correlation_id": cid.to_str().unwrap_or_default(),
    })
}

/// A request hyper's server refused before it had a head to hand over (see
/// `server::refused_head`): counted under its code and logged, with no method or path to
/// say (neither could be read).
pub fn refused_head(worker: &Worker, status: StatusCode, code: Code) {
    worker.metrics().record_request(code, Duration::ZERO);
    let cid = worker.ids().mint();
    info!(
        target: "keyward::access",
        correlation_id = cid.to_str().unwrap_or_default(),
        method = "-",
        path = "-",
        status = status.as_u16(),
        code = code.as_str(),
        total_ms = 0.0,
    );
}

use crate::logging::{clip, LOGGED_METHOD_MAX, LOGGED_PATH_MAX};

/// The path as logged: up to its first encoded `?` or `#`, or `;`, where an app may see a
/// query begin (`/x%3Fapi_key=<key>`): the query is never logged, that is where keys live.
fn logged_path(path: &str) -> &str {
    let b = path.as_bytes();
    // One pass over the bytes, which most paths end with nothing found.
    let cut = b.iter().enumerate().position(|(i, &c)| {
        c == b';'
            || c == b'%'
                && matches!(
                    b.get(i + 1..i + 3),
                    Some([b'3', b'f' | b'F'] | [b'2', b'3'])
                )
    });
    cut.map_or(path, |at| &path[..at])
}

/// `path` as the access log may show it, if that differs from `path`: cut where a query
/// may begin ([`logged_path`]), clipped to [`LOGGED_PATH_MAX`], then screened for keys
/// (what is screened is what is shown, so a clip cannot bring an unscreened part in).
fn loggable(
    policy: &crate::auth::Policy,
    path: &str,
    headers: Option<&http::HeaderMap>,
    queries: &[&str],
) -> Option<String> {
    let shown = clip(logged_path(path), LOGGED_PATH_MAX);
    match policy.loggable_path(shown, headers, queries) {
        Cow::Borrowed(same) if same.len() == path.len() => None,
        other => Some(other.into_owned()),
    }
}

/// One line per request (SPEC 11). Never headers, never the query: that is where keys live;
/// the method as [`crate::auth::Policy::logged_method`] gives it.
pub fn access_log(
    cid: &HeaderValue,
    method: &str,
    status: StatusCode,
    code: Code,
    trace: &Trace<'_>,
    elapsed: Duration,
) {
    let path = clip(logged_path(trace.logged_path()), LOGGED_PATH_MAX);
    let key = trace.key.as_ref();
    info!(
        target: "keyward::access",
        correlation_id = cid.to_str().unwrap_or_default(),
        method = &*clip(method, LOGGED_METHOD_MAX),
        path = &*path,
        status = status.as_u16(),
        code = code.as_str(),
        key_id = key.map(|k| &*k.id),
        principal_type = key.map(|k| k.principal_type.as_str()),
        upstream_ms = trace.upstream.map(|d| d.as_secs_f64() * 1e3),
        total_ms = elapsed.as_secs_f64() * 1e3,
    );
}
