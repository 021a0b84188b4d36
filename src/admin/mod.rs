//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and the control API under `/v1`
//! (bearer admin token, compared by SHA-256 digest). Never shares a port with traffic.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::keys::load::Format;
use crate::keys::source::{self, DisableError, KeySource, LoadError};
use crate::keys::{digest, Snapshot};
use crate::logging::{clip, Sometimes, LOGGED_PATH_MAX};

mod slots;

use crate::App;
use slots::{Admitted, Slots};
pub use slots::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER};

/// Largest snapshot accepted by `PUT /v1/snapshot` (about a million keys).
const MAX_SNAPSHOT_BYTES: usize = 512 * 1024 * 1024;

type AdminBody = Full<Bytes>;

/// How long a write to an admin client may stay blocked. A client that pipelines requests
/// and never reads their answers (a full socket buffer) would otherwise hold its slot
/// forever: hyper's head timeout does not run while the server is blocked writing.
const ADMIN_WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// A stream whose writes fail once one has been blocked for [`ADMIN_WRITE_STALL`]: the
/// connection then ends and gives its slot back. While a write is blocked the connection
/// is marked as writing, and is not evicted for a new one.
struct WriteStall<S> {
    inner: S,
    since: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    slot: slots::SlotHandle,
}

impl<S> WriteStall<S> {
    fn new(inner: S, slot: slots::SlotHandle) -> Self {
        Self {
            inner,
            since: None,
            slot,
        }
    }

    /// `poll` of the inner stream, failed once it has been pending for too long.
    fn bounded<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: impl FnOnce(&mut S, &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        match poll(&mut self.inner, cx) {
            Poll::Pending => {
                if self.since.is_none() {
                    self.slot.writing(true);
                }
                let since = self
                    .since
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(ADMIN_WRITE_STALL)));
                match since.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
                    Poll::Pending => Poll::Pending,
                }
            }
            done => {
                if self.since.take().is_some() {
                    self.slot.writing(false);
                }
                done
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteStall<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStall<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut()
            .bounded(cx, |s, cx| std::pin::Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.get_mut()
            .bounded(cx, |s, cx| std::pin::Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What a listener answers: the whole admin API (`admin_listen`), or the probes alone
/// (`probe_listen`), whose connection bounds no client of `/metrics` or `/v1` shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Admin,
    Probes,
}

/// Serve `surface` until `stop` resolves.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    surface: Surface,
    stop: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Slots::default());
    let full = Sometimes::default();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let admitted = slots.admit(peer.ip(), std::time::Instant::now());
        let closed = match &admitted {
            Some((_, Admitted::Free)) => None,
            Some((_, Admitted::Evicted)) => Some("evicted"),
            None => Some("refused"),
        };
        if let Some(why) = closed {
            app.metrics.admin_connection_closed(why);
            if full.now() {
                warn!(
                    %peer,
                    "admin connections full ({MAX_CONNECTIONS} open, or {MAX_CONNECTIONS_PER_PEER} from one address): the one waiting longest for a request is closed for each new one (keyward_admin_connections_closed_total)"
                );
            }
        }
        let Some((slot, _)) = admitted else {
            continue;
        };
        let handle = slot.handle();
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            let handle = handle.clone();
            async move {
                handle.serving(true);
                let resp = match surface {
                    Surface::Admin => route(&app, req).await,
                    Surface::Probes => probes_only(&app, &req),
                };
                handle.serving(false);
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(10))
            .serve_connection(
                TokioIo::new(WriteStall::new(stream, slot.handle())),
                service,
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            tokio::select! {
                done = conn => if let Err(e) = done {
                    debug!(%peer, error = %e, "admin connection error");
                },
                () = slot.evicted() => debug!(%peer, "admin connection closed: its place went to a new one"),
            }
            drop(slot);
        });
        // Let the new connection read its head before the next one is accepted: a flood
        // of connections accepted in a row would otherwise take its place before it had
        // a chance to ask.
        tokio::task::yield_now().await;
    }
    drop(listener);
    // Bounded by the caller, with the rest of what is left after the traffic's grace
    // (`runtime::AFTER_GRACE`): a bound of its own here, 5 s, was longer and never reached.
    graceful.shutdown().await;
}

fn text(status: StatusCode, body: &'static str) -> Response<AdminBody> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<AdminBody> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response<AdminBody> {
    let message = message.to_string();
    // `message` repeats `error`, as on the traffic listener (SPEC 6).
    json(
        status,
        json!({"status": status.as_u16(), "code": code, "error": &message, "message": &message}),
    )
}

/// `/healthz` and `/readyz`, answered alike on the admin and the probe listener.
fn probe(app: &Arc<App>, req: &Request<Incoming>) -> Option<Response<AdminBody>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => Some(text(StatusCode::OK, "ok\n")),
        (&Method::GET | &Method::HEAD, "/readyz") => Some(readyz(app)),
        _ => None,
    }
}

/// The probe listener answers the probes and nothing else.
fn probes_only(app: &Arc<App>, req: &Request<Incoming>) -> Response<AdminBody> {
    probe(app, req).unwrap_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            "only /healthz and /readyz here",
        )
    })
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Response<AdminBody> {
    if let Some(r) = probe(app, &req) {
        return r;
    }
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            app.metrics.set_ready(app.is_ready());
            let mut r = Response::new(Full::new(Bytes::from(app.metrics.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (_, p) if p.starts_with("/v1/") => {
            if !authorized(app, &req) {
                let (method, path) = logged(app, &method, &path);
                warn!(target: "keyward::admin", method = &*method, path = &*path, status = 401u16, outcome = "unauthorized", "admin request refused");
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "admin token required",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="keyward-admin""#),
                );
                return r;
            }
            // The audit line says what a call asked for: a forced push and a dry run differ
            // only in their flags (the query itself is not logged: it is the caller's text).
            let flags = Flags::of(&req, &[DRY_RUN, FORCE]).unwrap_or_default();
            let r = control(app, req).await;
            let (method, path) = logged(app, &method, &path);
            info!(target: "keyward::admin", method = &*method, path = &*path, dry_run = flags.dry_run, force = flags.force, status = r.status().as_u16(), outcome = outcome(r.status()), "admin request");
            r
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    }
}

/// The `outcome` of an admin call in its log line.
fn outcome(status: StatusCode) -> &'static str {
    if status.is_success() {
        "ok"
    } else if status.is_client_error() {
        "refused"
    } else {
        "error"
    }
}

fn readyz(app: &App) -> Response<AdminBody> {
    let readiness = app.readiness();
    let status = match readiness {
        crate::app::Readiness::Ready => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(status, readiness.line())
}

/// `Authorization: Bearer <token>` whose SHA-256 equals `admin.token_sha256`. Compared in
/// constant time; without a configured token every call is refused.
fn authorized(app: &App, req: &Request<Incoming>) -> bool {
    let Some(expected) = app.config.admin.token_sha256.as_deref() else {
        return false;
    };
    let mut want = [0u8; 32];
    if hex::decode_to_slice(expected, &mut want).is_err() {
        return false;
    }
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Some(token) = value
        .as_bytes()
        .split_at_checked(7)
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|(_, t)| t)
    else {
        return false;
    };
    digest(token).ct_eq(&want).into()
}

/// The method and path an admin log line carries: clipped as the access log's are (a
/// caller without the token chooses both); a path only when it is an endpoint, and the id
/// of `/v1/keys/{id}/disable|enable` only when the snapshot in force has it: an operator
/// revoking a leaked key may paste the key itself where its id goes, or into a path that
/// is no endpoint at all.
fn logged<'a>(app: &App, method: &'a Method, path: &'a str) -> (Cow<'a, str>, Cow<'a, str>) {
    const ENDPOINTS: [&str; 3] = ["/v1/snapshot", "/v1/snapshot/reload", "/v1/keys/usage"];
    let method = Cow::Borrowed(app.policy.logged_method(method));
    if ENDPOINTS.contains(&path) {
        return (method, Cow::Borrowed(path));
    }
    if let Some((id, action)) = path
        .strip_prefix("/v1/keys/")
        .and_then(|rest| rest.rsplit_once('/'))
        .filter(|(_, action)| matches!(*action, "disable" | "enable"))
    {
        let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy();
        if app.store.load().is_some_and(|s| s.by_id(&id).is_some()) {
            return (method, clip(path, LOGGED_PATH_MAX));
        }
        return (method, Cow::Owned(format!("/v1/keys/…/{action}")));
    }
    // No endpoint: the caller's text, which may be a key pasted in the wrong place.
    (method, Cow::Borrowed("/v1/…"))
}

/// What `POST /v1/keys/{id}/{action}` asks. Key ids may contain `/`, so the id is all
/// between `/v1/keys/` and the last segment, written raw or percent-encoded (`%2F`).
enum KeyAction {
    Disable(String),
    Enable(String),
}

impl KeyAction {
    fn of(path: &str) -> Option<Self> {
        let (id, action) = path.strip_prefix("/v1/keys/")?.rsplit_once('/')?;
        let id = percent_encoding::percent_decode_str(id)
            .decode_utf8()
            .ok()?;
        if id.is_empty() {
            return None;
        }
        match action {
            "disable" => Some(Self::Disable(id.into_owned())),
            "enable" => Some(Self::Enable(id.into_owned())),
            _ => None,
        }
    }
}

async fn control(app: &Arc<App>, req: Request<Incoming>) -> Response<AdminBody> {
    let path = req.uri().path().to_owned();
    if req.method() == Method::POST {
        if let Some(action) = KeyAction::of(&path) {
            // It takes no parameter: one given (`?force=true`, a typo) is refused, as the
            // snapshot endpoints refuse theirs, rather than ignored.
            if let Err(e) = Flags::of(&req, &[]) {
                return error(StatusCode::BAD_REQUEST, "bad_request", e);
            }
            return key_action(app, action).await;
        }
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["v1", "snapshot"]) => match app.store.load() {
            Some(s) => json(StatusCode::OK, snapshot_info(&s)),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                "no key snapshot loaded",
            ),
        },
        (&Method::PUT, ["v1", "snapshot"]) => match Flags::of(&req, &[DRY_RUN, FORCE]) {
            Err(e) => error(StatusCode::BAD_REQUEST, "bad_request", e),
            Ok(f) => {
                let Some(_turn) = push_turn(app).await else {
                    return error(
                        StatusCode::CONFLICT,
                        "push_in_progress",
                        "another snapshot push is being read; try again",
                    );
                };
                match f.dry_run {
                    true => dry_run(app, req).await,
                    false => put_snapshot(app, req, f.admission()).await,
                }
            }
        },
        (&Method::POST, ["v1", "snapshot", "reload"]) => match Flags::of(&req, &[FORCE]) {
            Err(e) => error(StatusCode::BAD_REQUEST, "bad_request", e),
            Ok(f) => reload(app, f.admission()).await,
        },
        (&Method::GET, ["v1", "keys", "usage"]) => usage(app).await,
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    }
}

/// This push's turn ([`App::pushes`]), waited for a while: `None` when another push still
/// holds it (a large one, or a client sending its body slowly).
async fn push_turn(app: &App) -> Option<tokio::sync::SemaphorePermit<'_>> {
    let wait = std::time::Duration::from_secs(5);
    tokio::time::timeout(wait, app.pushes.acquire())
        .await
        .ok()?
        .ok()
}

/// A fleet revoke (or its lifting) with `cluster`; without it, disable edits the snapshot.
async fn key_action(app: &Arc<App>, action: KeyAction) -> Response<AdminBody> {
    let shared = app.revocations.is_shared();
    match action {
        KeyAction::Disable(id) if shared => revoke(app, &id, true).await,
        KeyAction::Enable(id) if shared => revoke(app, &id, false).await,
        KeyAction::Enable(_) => error(
            StatusCode::CONFLICT,
            "cluster_required",
            "enable lifts a fleet revoke and needs `cluster`; without it, edit the snapshot",
        ),
        KeyAction::Disable(id) => disable(app, id).await,
    }
}

fn snapshot_info(s: &Snapshot) -> serde_json::Value {
    json!({
        "version": s.version,
        "keys": s.len(),
        "digest": s.content_digest,
        "source": s.source.as_str(),
        "loaded_at": humantime::format_rfc3339_millis(s.loaded_at).to_string(),
        "generated_at": s.generated_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
    })
}

/// The format of a pushed body, by its `content-type`.
fn body_format(req: &Request<Incoming>) -> Format {
    let json_body = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if json_body {
        Format::Json
    } else {
        Format::Yaml
    }
}

async fn put_snapshot(
    app: &Arc<App>,
    req: Request<Incoming>,
    admission: source::Admission,
) -> Response<AdminBody> {
    let format = body_format(&req);
    // Refused before the body is read: it may be hundreds of megabytes.
    let KeySource::Control { state_file, .. } = &app.key_source else {
        return error(StatusCode::CONFLICT, "file_source", LoadError::FileSource);
    };
    let (spool, file) = match source::Spool::create(state_file) {
        Ok(created) => created,
        Err(e) => return persist_failed(app, e),
    };
    if let Err(e) = write_body(req.into_body(), MAX_SNAPSHOT_BYTES, file).await {
        let path = spool.path().to_owned();
        return body_error(e, |source| {
            persist_failed(app, LoadError::Io { path, source })
        });
    }
    // Parsing a large snapshot is CPU work: keep it off the async workers.
    let app2 = app.clone();
    let result =
        tokio::task::spawn_blocking(move || source::apply_pushed(&app2, spool, format, admission))
            .await
            .unwrap_or_else(|e| {
                Err(LoadError::Io {
                    path: "state_file".into(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
    match result {
        Ok(s) => json(StatusCode::OK, snapshot_info(&s)),
        Err(LoadError::Invalid(e)) => {
            app.metrics.snapshot_failed(crate::keys::Source::Control);
            warn!(error = %e, "pushed snapshot refused; keeping the last good one");
            error(StatusCode::BAD_REQUEST, "bad_snapshot", e)
        }
        Err(LoadError::Guarded(verdict)) => {
            app.metrics.snapshot_guarded(crate::keys::Source::Control);
            warn!(in_force = verdict.sides.in_force, removed = verdict.removed, disabled = verdict.disabled, locked_out = verdict.locked_out, error = %verdict, "pushed snapshot held back by the guard; keeping the last good one");
            guarded(&verdict)
        }
        Err(e @ (LoadError::FileSource | LoadError::ControlSource)) => {
            error(StatusCode::CONFLICT, "file_source", e)
        }
        // A push never reads the key file.
        Err(e @ (LoadError::Io { .. } | LoadError::Unsettled)) => persist_failed(app, e),
    }
}

/// 409 `snapshot_guard` with the guard's verdict and counts, as the dry run shows them
/// (SPEC 16).
fn guarded(verdict: &crate::keys::guard::Verdict) -> Response<AdminBody> {
    let status = StatusCode::CONFLICT;
    let mut body = serde_json::to_value(verdict).unwrap_or_default();
    body["status"] = json!(status.as_u16());
    body["code"] = json!("snapshot_guard");
    let message = verdict.to_string();
    // `message` repeats `error`, as on every error body (SPEC 6).
    body["message"] = json!(&message);
    body["error"] = json!(message);
    json(status, body)
}

const DRY_RUN: &str = "dry_run";

fn query_decode(s: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy()
}
const FORCE: &str = "force";

/// The flags of a control call, read strictly: a call meant as a dry run must never install
/// because its flag was spelled `True` (as Python's urlencode writes it) or `dry-run`. Each
/// flag is given bare (`?dry_run`) or as `true`/`1`/`false`/`0` in any case, at most once;
/// any other value, and any other parameter, is a 400 naming it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Flags {
    dry_run: bool,
    force: bool,
}

impl Flags {
    fn of(req: &Request<Incoming>, allowed: &[&str]) -> Result<Flags, String> {
        let mut flags = Flags::default();
        let mut seen: Vec<String> = Vec::new();
        let query = req.uri().query().unwrap_or("");
        for (i, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
            let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
            let (k, v) = (query_decode(k), query_decode(v));
            let Some(name) = allowed.iter().find(|a| **a == k) else {
                let takes = match allowed {
                    [] => "none".to_string(),
                    _ => allowed.join(", "),
                };
                // The name is not quoted: a script that put a key or a digest there would
                // find it in the answer, and in whatever logs the answer.
                return Err(format!(
                    "unknown query parameter #{} (this endpoint takes: {takes})",
                    i + 1
                ));
            };
            if seen.iter().any(|s| s == name) {
                return Err(format!("query parameter {name} given twice"));
            }
            seen.push((*name).to_string());
            let on = match v.to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(format!("query parameter {name} must be true or false")),
            };
            match *name {
                DRY_RUN => flags.dry_run = on,
                _ => flags.force = on,
            }
        }
        Ok(flags)
    }

    /// `force` takes a snapshot the guard would refuse.
    fn admission(&self) -> source::Admission {
        if self.force {
            source::Admission::Forced
        } else {
            source::Admission::Guarded
        }
    }
}

/// `POST /v1/snapshot/reload[?force=true]`: read the key file now (file source).
async fn reload(app: &Arc<App>, admission: source::Admission) -> Response<AdminBody> {
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || source::reload_file(&app2, admission))
        .await
        .unwrap_or_else(|e| {
            Err(LoadError::Io {
                path: "keys.file".into(),
                source: std::io::Error::other(e.to_string()),
            })
        });
    match result {
        Ok(s) => json(
            StatusCode::OK,
            json!({"result": "ok", "forced": admission == source::Admission::Forced,
                   "snapshot": snapshot_info(&s)}),
        ),
        Err(LoadError::Guarded(verdict)) => guarded(&verdict),
        Err(e @ LoadError::ControlSource) => error(StatusCode::CONFLICT, "control_source", e),
        Err(e @ LoadError::Unsettled) => error(StatusCode::CONFLICT, "file_changing", e),
        Err(e @ LoadError::Invalid(_)) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, "bad_snapshot", e)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "read_failed", e),
    }
}

/// `PUT /v1/snapshot?dry_run=true`: validate the body and answer its diff against the
/// snapshot in force, the guard's verdict and the recently used keys it would deny.
/// Nothing is installed, persisted or counted; the spool is removed. Works for either source.
/// "Recently used" is the fleet's with `cluster` (this replica's alone if Redis cannot be
/// read), as `GET /v1/keys/usage` reports it.
async fn dry_run(app: &Arc<App>, req: Request<Incoming>) -> Response<AdminBody> {
    let format = body_format(&req);
    let spool_beside = match &app.key_source {
        KeySource::Control { state_file, .. } => state_file.clone(),
        KeySource::File { .. } => std::env::temp_dir().join("keyward-dry-run"),
    };
    // A dry run installs nothing: a read-only state volume must not stop it.
    let created = source::Spool::create(&spool_beside)
        .or_else(|_| source::Spool::create(&std::env::temp_dir().join("keyward-dry-run")));
    let (spool, file) = match created {
        Ok(created) => created,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", e),
    };
    if let Err(e) = write_body(req.into_body(), MAX_SNAPSHOT_BYTES, file).await {
        return body_error(e, |e| {
            error(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", e)
        });
    }
    let fleet = fleet_last_used(app).await;
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || {
        let new = source::read_pushed(&app2, &spool, format)?;
        drop(spool);
        let current = app2.store.load();
        let last_used = |id: &str| match &fleet {
            Some(fleet) => fleet.get(id).copied(),
            None => app2.usage.last_used(id),
        };
        let mut review = crate::keys::review::dry_run(
            current.as_deref(),
            &new,
            &app2.config.keys.guard,
            &last_used,
            crate::keys::source::Host::here(&*app2),
        );
        if !review.guard.would_refuse {
            if let Some(verdict) = source::window_verdict(&app2, &new) {
                review.guard = *verdict;
            }
        }
        Ok::<_, LoadError>(review)
    })
    .await;
    match result {
        Ok(Ok(review)) => {
            let mut body = serde_json::to_value(&review).unwrap_or_default();
            body["dry_run"] = json!(true);
            json(StatusCode::OK, body)
        }
        Ok(Err(e @ LoadError::Invalid(_))) => error(StatusCode::BAD_REQUEST, "bad_snapshot", e),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "read_failed", e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "read_failed", e),
    }
}

fn persist_failed(app: &App, e: LoadError) -> Response<AdminBody> {
    app.metrics.snapshot_failed(crate::keys::Source::Control);
    warn!(error = %e, "pushed snapshot not persisted; keeping the last good one");
    error(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", e)
}

/// Why a pushed body did not reach its spool file.
#[derive(Debug)]
enum BodyError {
    /// Over the limit.
    TooLarge(BoxError),
    /// The client's body broke off before its end (a connection closed mid-body).
    Broken(BoxError),
    Write(std::io::Error),
    /// Nothing arrived for [`BODY_IDLE`], or the whole body took over [`BODY_DEADLINE`].
    Stalled,
}

/// Longest wait for the next piece of a pushed body, and for all of it (512 MiB at under
/// 1 MB/s). A push holds the only turn ([`App::pushes`]): a client that stops sending (a
/// CI runner that vanished without a FIN) would otherwise block every push until restart.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// The answer to a body that could not be written: too large (413), broken off (400),
/// stalled (408), or the disk refused it (`write_failed`).
fn body_error(
    e: BodyError,
    write_failed: impl FnOnce(std::io::Error) -> Response<AdminBody>,
) -> Response<AdminBody> {
    match e {
        BodyError::TooLarge(e) => error(StatusCode::PAYLOAD_TOO_LARGE, "bad_snapshot", e),
        BodyError::Broken(e) => error(StatusCode::BAD_REQUEST, "bad_snapshot", e),
        BodyError::Stalled => error(
            StatusCode::REQUEST_TIMEOUT,
            "body_stalled",
            "the body stopped arriving (10 s without a byte, or 10 min in all)",
        ),
        BodyError::Write(e) => write_failed(e),
    }
}

/// Write the whole body, up to `limit` bytes, to `file` as it arrives: a push is never held
/// in memory, whatever its size.
async fn write_body<B>(body: B, limit: usize, file: std::fs::File) -> Result<(), BodyError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    tokio::time::timeout(BODY_DEADLINE, write_body_paced(body, limit, file))
        .await
        .unwrap_or(Err(BodyError::Stalled))
}

async fn write_body_paced<B>(body: B, limit: usize, file: std::fs::File) -> Result<(), BodyError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let mut file = tokio::fs::File::from_std(file);
    let mut body = std::pin::pin!(Limited::new(body, limit));
    loop {
        let frame = tokio::time::timeout(BODY_IDLE, body.frame())
            .await
            .map_err(|_| BodyError::Stalled)?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| match e.is::<LengthLimitError>() {
            true => BodyError::TooLarge(e),
            false => BodyError::Broken(e),
        })?;
        if let Ok(data) = frame.into_data() {
            file.write_all(data.chunk())
                .await
                .map_err(BodyError::Write)?;
        }
    }
    file.flush().await.map_err(BodyError::Write)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `disable`/`enable` with `cluster`: a fleet revoke (or its lifting) of the key in force
/// under `id`, for any key source (SPEC 14).
async fn revoke(app: &App, id: &str, disabled: bool) -> Response<AdminBody> {
    let Some(snapshot) = app.store.load() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "auth_unavailable",
            "no key snapshot loaded",
        );
    };
    let Some(key) = snapshot.by_id(id) else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_key",
            DisableError::NotFound(id.to_string()),
        );
    };
    let status = if disabled { "disabled" } else { "enabled" };
    match app.revocations.set(key, disabled).await {
        Ok(None) => error(
            StatusCode::CONFLICT,
            "superseded",
            "a later change to this key reached Redis first and holds; read the key's state before repeating the call",
        ),
        Err(crate::cluster::ClusterError::ClockUnknown) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster_unavailable",
            "not applied: Redis's clock has not been read yet, so a lift could not be ordered against the fleet's revokes; repeat the call once Redis answers",
        ),
        Ok(Some(_)) => json(
            StatusCode::OK,
            // The id names the secret of *this* replica's snapshot: say which snapshot, so
            // an operator mid-rotation sees a replica that still runs the old one.
            json!({"key_id": id, "status": status, "scope": "fleet",
                   "snapshot": snapshot_info(&snapshot)}),
        ),
        Err(e) => {
            warn!(key_id = id, error = %e, "revocation not stored in redis yet");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster_unavailable",
                "applied on this replica, in memory: stored for the fleet once Redis is reachable, and lost if this replica restarts first; repeat the call once Redis is back",
            )
        }
    }
}

/// Usage of the whole fleet with `cluster` (this replica's alone if Redis cannot be read).
/// Per key id of the snapshot in force, the fleet's last use and request count; `None`
/// without `cluster`, or when Redis cannot be read.
async fn fleet_last_used(
    app: &App,
) -> Option<std::collections::HashMap<String, (std::time::SystemTime, u64)>> {
    let fleet = app.fleet_usage.as_ref()?;
    let snapshot = app.store.load();
    let keys = match fleet.report(&app.usage, snapshot.as_deref()).await {
        Ok(keys) => keys,
        Err(e) => {
            warn!(error = %e, "fleet usage unavailable; the dry run uses this replica's");
            return None;
        }
    };
    let entries = keys.into_iter().filter_map(|k| {
        let at = humantime::parse_rfc3339(&k.last_used).ok()?;
        Some((k.key_id, (at, k.requests)))
    });
    Some(entries.collect())
}

async fn usage(app: &App) -> Response<AdminBody> {
    let snapshot = app.store.load();
    if let Some(fleet) = &app.fleet_usage {
        match fleet.report(&app.usage, snapshot.as_deref()).await {
            Ok(keys) => return json(StatusCode::OK, json!({ "keys": keys, "scope": "fleet" })),
            Err(e) => warn!(error = %e, "fleet usage unavailable; reporting this replica's"),
        }
    }
    let keys = app.usage.report(snapshot.as_deref());
    json(StatusCode::OK, json!({ "keys": keys, "scope": "replica" }))
}

/// Off the admin thread, as pushes and reloads are: the edit re-serializes, re-parses and
/// persists the whole snapshot (1.6 s at 300k keys), and the admin thread also answers
/// the probes, which would stall for as long in the middle of an incident.
async fn disable(app: &Arc<App>, id: String) -> Response<AdminBody> {
    let app2 = app.clone();
    let id2 = id.clone();
    let done = tokio::task::spawn_blocking(move || source::disable_key(&app2, &id2)).await;
    let Ok(result) = done else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "persist_failed",
            "the disable did not complete",
        );
    };
    let id = id.as_str();
    match result {
        // Idempotent: a key disabled already answers the same, saying so; nothing was
        // installed (the snapshot, its digest and `loaded_at` are the ones in force).
        Ok(d) => json(
            StatusCode::OK,
            json!({"key_id": id, "status": "disabled", "already_disabled": d.already,
                   "snapshot": snapshot_info(&d.snapshot)}),
        ),
        Err(e @ DisableError::FileSource) => error(StatusCode::CONFLICT, "file_source", e),
        Err(e @ DisableError::NotFound(_)) => error(StatusCode::NOT_FOUND, "unknown_key", e),
        Err(e @ DisableError::NoSnapshot) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable", e)
        }
        // Still an error (the revoke would not survive a restart), but one that says the
        // key is disabled now: a client retrying a 500 must not take it for "still open".
        Err(ref e @ DisableError::NotPersisted { ref snapshot, .. }) => {
            let status = StatusCode::INTERNAL_SERVER_ERROR;
            let message = e.to_string();
            json(
                status,
                json!({"status": status.as_u16(), "code": "persist_failed", "error": &message,
                       "message": &message, "key_id": id, "key_status": "disabled",
                       "in_force": true, "persisted": false, "snapshot": snapshot_info(snapshot)}),
            )
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    /// A body arriving in `n` frames of `size` bytes, frame `i` filled with byte `i`.
    fn frames(n: u8, size: usize) -> impl http_body::Body<Data = Bytes, Error = Infallible> {
        StreamBody::new(futures_util::stream::iter(
            (0..n).map(move |i| Ok(http_body::Frame::data(Bytes::from(vec![i; size])))),
        ))
    }

    #[tokio::test]
    async fn a_body_is_written_whole_to_its_spool_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("body");
        let file = std::fs::File::create(&path).unwrap();
        write_body(frames(4, 1000), 10_000, file).await.unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 4000);
        assert!(got
            .chunks(1000)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b as usize == i)));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_before_it_is_all_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("body");
        let file = std::fs::File::create(&path).unwrap();
        let e = write_body(frames(8, 1000), 3500, file).await.unwrap_err();
        assert!(matches!(e, BodyError::TooLarge(_)), "{e:?}");
        assert!(std::fs::metadata(&path).unwrap().len() <= 3500);
    }
}
