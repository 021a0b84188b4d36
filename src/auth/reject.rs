//! The error table of SPEC 6, in one place: every client-visible failure is a [`Reject`],
//! and its status, code, message and `WWW-Authenticate` follow from one `match`.

use http::{HeaderValue, StatusCode};

use super::path::PathError;

/// The `code` of a response, as used in error bodies, logs and the `code` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Ok,
    InvalidAuthHeader,
    InvalidApiKey,
    ExpiredApiKey,
    DisabledApiKey,
    WrongEnvironment,
    InsufficientScope,
    DelegationNotAllowed,
    RateLimited,
    UpstreamUnavailable,
    UpstreamTimeout,
    AuthUnavailable,
    BadRequest,
    HeadersTooLarge,
    /// The client went away before its answer was ready (nginx's 499): no response was
    /// sent, but the request is counted and logged.
    ClientClosed,
    /// keyward closed the connection unanswered: the request was still in flight when
    /// `shutdown.grace` ran out (nginx's 444). Counted and logged apart from the client's
    /// own 499, or a shutdown that cut requests off looked like clients giving up.
    CutAtShutdown,
}

impl Code {
    /// Every code, in a fixed order (metrics pre-create one series each).
    pub const ALL: [Code; 16] = [
        Code::Ok,
        Code::InvalidAuthHeader,
        Code::InvalidApiKey,
        Code::ExpiredApiKey,
        Code::DisabledApiKey,
        Code::WrongEnvironment,
        Code::InsufficientScope,
        Code::DelegationNotAllowed,
        Code::RateLimited,
        Code::UpstreamUnavailable,
        Code::UpstreamTimeout,
        Code::AuthUnavailable,
        Code::BadRequest,
        Code::HeadersTooLarge,
        Code::ClientClosed,
        Code::CutAtShutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::InvalidAuthHeader => "invalid_auth_header",
            Code::InvalidApiKey => "invalid_api_key",
            Code::ExpiredApiKey => "expired_api_key",
            Code::DisabledApiKey => "disabled_api_key",
            Code::WrongEnvironment => "wrong_environment",
            Code::InsufficientScope => "insufficient_scope",
            Code::DelegationNotAllowed => "delegation_not_allowed",
            Code::RateLimited => "rate_limited",
            Code::UpstreamUnavailable => "upstream_unavailable",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::AuthUnavailable => "auth_unavailable",
            Code::BadRequest => "bad_request",
            Code::HeadersTooLarge => "request_header_fields_too_large",
            Code::ClientClosed => "client_closed_request",
            Code::CutAtShutdown => "cut_at_shutdown",
        }
    }

    /// Position in [`Code::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The status the code is answered (or, `ClientClosed` and `CutAtShutdown`, logged) with.
    pub fn status(self) -> StatusCode {
        match self {
            Code::Ok => StatusCode::OK,
            Code::InvalidAuthHeader
            | Code::InvalidApiKey
            | Code::ExpiredApiKey
            | Code::DisabledApiKey
            | Code::WrongEnvironment => StatusCode::UNAUTHORIZED,
            Code::InsufficientScope | Code::DelegationNotAllowed => StatusCode::FORBIDDEN,
            Code::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Code::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Code::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::BadRequest => StatusCode::BAD_REQUEST,
            Code::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            // nginx's: no answer was sent.
            Code::ClientClosed => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            // nginx's "closed without a response".
            Code::CutAtShutdown => {
                StatusCode::from_u16(444).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }

    /// The reason phrase of a status with no standard one (hyper writes `<none>` for it),
    /// for a client still reading one: 499 to a client that only half-closed.
    pub fn reason_phrase(self) -> Option<&'static [u8]> {
        match self {
            Code::ClientClosed => Some(b"Client Closed Request"),
            _ => None,
        }
    }
}

/// A request keyward answers itself, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub enum Reject {
    /// No credential (`missing`), or a malformed or ambiguous one.
    InvalidAuthHeader {
        missing: bool,
    },
    /// Unknown key, unknown prefix, or a prefix that does not fit the key's type.
    InvalidApiKey,
    ExpiredApiKey,
    DisabledApiKey,
    WrongEnvironment,
    /// `required`: any one of these scopes would have been enough.
    InsufficientScope {
        required: Vec<String>,
    },
    DelegationNotAllowed,
    RateLimited {
        retry_after_secs: u64,
        quota: super::ratelimit::Quota,
    },
    UpstreamUnavailable,
    UpstreamTimeout,
    AuthUnavailable,
    BadRequest(BadRequest),
    /// The request head is larger than `limits.max_header_bytes` (431; not in SPEC 6).
    HeadersTooLarge,
    /// The client went away while its request was under way (its body broke off at the
    /// connection's end): nothing reaches it; counted and logged as nginx's 499.
    ClientGone,
}

/// What made a request a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("invalid x-delegate-account-id header")]
    DelegateHeader,
    /// HTTP/1.1 without `Host`, or several or an invalid one (RFC 9112 3.2).
    #[error("missing, repeated or invalid Host header")]
    Host,
    /// The client's request body broke off or was malformed (e.g. bad chunked framing).
    #[error("malformed or incomplete request body")]
    Body,
    /// The body went `limits.body_stall_timeout` without a byte (nginx answers 408 there;
    /// SPEC 6's table has 400 for what the client sent wrong).
    #[error("request body stalled")]
    BodyStalled,
    /// `CONNECT`: keyward is a reverse proxy, and an app handed a CONNECT (on a public
    /// route, with no key) could open a tunnel of its own.
    #[error("CONNECT is not proxied")]
    Connect,
    /// A transfer coding other than one `chunked` (`gzip, chunked`): keyward would forward
    /// the body decoded of its chunks but still gzip-coded, with nothing saying so.
    #[error("transfer codings other than a single chunked are not accepted")]
    TransferCoding,
    /// A decision request (SPEC 15) without one original method and one original URI.
    #[error("missing, repeated or invalid original {0}")]
    Original(&'static str),
    /// A decision request carrying a route, method or host override of the client's
    /// (SPEC 8's list, other than the endpoint's own protocol headers): the proxy strips
    /// these, but behind a decision the front proxy would pass them to the app.
    #[error("override header {0} is not accepted")]
    Override(&'static str),
    /// A POST's query carrying a method parameter (`_method`) that names no one method.
    #[error("method parameter {0} in the query is repeated or not one method")]
    MethodParam(&'static str),
    /// A decision request (SPEC 15) carrying an identity, delegation or forwarding header
    /// spelled with `_` or `.`: the front proxy strips or overwrites only the `-` spelling.
    #[error("identity, delegation or forwarding header spelled with '_' or '.' is not accepted")]
    Misspelled,
    /// A decision request (SPEC 15) carrying a header under the identity prefix that is not
    /// one keyward answers with: the front proxy overwrites only those, and would pass this
    /// one to the app.
    #[error(
        "a header under the identity prefix that keyward does not answer with is not accepted"
    )]
    UnknownIdentity,
    /// A decision request (SPEC 15) carrying what another gateway asserts about the client
    /// (`Remote-User`, a verified client certificate) from a front proxy not in
    /// `trusted_proxies`: the front proxy would pass it to the app.
    #[error("another gateway's identity or client-certificate header is not accepted from an untrusted proxy")]
    Asserted,
    /// A decision request (SPEC 15) whose original path normalization would change: the
    /// front proxy forwards it as sent, so what was authorized would not be what the app
    /// reads.
    #[error("the original path is not in normal form (dot segments, '//' or encoded characters)")]
    NotNormal,
    /// A decision request (SPEC 15) whose original URI carries the query credential while
    /// keys may not be forwarded: it is not read, and the front proxy would hand it to the
    /// app, a key keyward did not check.
    #[error("a key in the query string is not accepted here (the front proxy would forward it)")]
    QueryKey,
    /// A decision request (SPEC 15) naming more than one `Upgrade` protocol (two fields, or a
    /// list): a front proxy may take one and the app another (Caddy matched `websocket` in
    /// the second field and upgraded the app to the first, `h2c`: a connection keyward
    /// never sees another request of).
    #[error("more than one Upgrade protocol is not accepted")]
    Upgrade,
    /// The query credential's parameter after an encoded `?` in the path: an app that
    /// decodes its URL before splitting it reads it as the query, a key keyward never
    /// checked (and, on a public route, one no key was asked for).
    #[error("an API key parameter hidden from the query as keyward reads it (after an encoded '?' in the path, or behind an encoded separator) is not accepted")]
    KeyInPath,
}

impl Reject {
    /// Framing-level refusals: on HTTP/1 the connection is closed after the answer, since
    /// the client's idea of where the next request starts cannot be trusted.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Reject::HeadersTooLarge
                | Reject::BadRequest(
                    BadRequest::Host
                        | BadRequest::TransferCoding
                        | BadRequest::Connect
                        | BadRequest::Path(crate::auth::path::PathError::Fragment)
                )
        )
    }

    pub fn code(&self) -> Code {
        match self {
            Reject::InvalidAuthHeader { .. } => Code::InvalidAuthHeader,
            Reject::InvalidApiKey => Code::InvalidApiKey,
            Reject::ExpiredApiKey => Code::ExpiredApiKey,
            Reject::DisabledApiKey => Code::DisabledApiKey,
            Reject::WrongEnvironment => Code::WrongEnvironment,
            Reject::InsufficientScope { .. } => Code::InsufficientScope,
            Reject::DelegationNotAllowed => Code::DelegationNotAllowed,
            Reject::RateLimited { .. } => Code::RateLimited,
            Reject::UpstreamUnavailable => Code::UpstreamUnavailable,
            Reject::UpstreamTimeout => Code::UpstreamTimeout,
            Reject::AuthUnavailable => Code::AuthUnavailable,
            Reject::BadRequest(_) => Code::BadRequest,
            Reject::HeadersTooLarge => Code::HeadersTooLarge,
            Reject::ClientGone => Code::ClientClosed,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code().status()
    }

    /// The human message. Deliberately generic for key failures: it must not help an
    /// attacker tell a near-miss key from an unknown one.
    pub fn message(&self) -> &'static str {
        match self {
            Reject::InvalidAuthHeader { missing: true } => "Missing API key",
            Reject::InvalidAuthHeader { missing: false } => "Malformed or ambiguous credentials",
            Reject::InvalidApiKey => "Invalid or missing API key",
            Reject::ExpiredApiKey => "API key expired or not yet valid",
            Reject::DisabledApiKey => "API key disabled",
            Reject::WrongEnvironment => "API key not valid in this environment",
            Reject::InsufficientScope { .. } => "API key lacks the scope for this request",
            Reject::DelegationNotAllowed => "API key may not act for this account",
            Reject::RateLimited { .. } => "Rate limit exceeded",
            Reject::UpstreamUnavailable => "Upstream unavailable",
            Reject::UpstreamTimeout => "Upstream timed out",
            Reject::AuthUnavailable => {
                "Authentication unavailable: no usable key snapshot, or shared state (cluster) not ready"
            }
            Reject::BadRequest(BadRequest::Path(_)) => "Request path refused",
            Reject::BadRequest(BadRequest::DelegateHeader) => "Malformed x-delegate-account-id",
            Reject::BadRequest(BadRequest::Host) => "Malformed request head",
            Reject::HeadersTooLarge => "Request header fields too large",
            Reject::ClientGone => "Client closed the request",
            Reject::BadRequest(BadRequest::Body) => "Malformed or incomplete request body",
            Reject::BadRequest(BadRequest::BodyStalled) => "Request body stalled",
            Reject::BadRequest(BadRequest::Connect) => "Method not proxied",
            Reject::BadRequest(BadRequest::TransferCoding) => "Unsupported transfer coding",
            Reject::BadRequest(BadRequest::Original(_)) => "Original method or URI missing",
            Reject::BadRequest(BadRequest::Override(_)) => "Override header refused",
            Reject::BadRequest(BadRequest::MethodParam(_)) => "Method parameter refused",
            Reject::BadRequest(BadRequest::NotNormal) => "Request path refused",
            Reject::BadRequest(BadRequest::Misspelled) => "Misspelled identity or forwarding header refused",
            Reject::BadRequest(BadRequest::QueryKey) => "API key in the query string refused",
            Reject::BadRequest(BadRequest::UnknownIdentity) => "Identity header refused",
            Reject::BadRequest(BadRequest::Asserted) => "Gateway identity header refused",
            Reject::BadRequest(BadRequest::Upgrade) => "Ambiguous upgrade refused",
            Reject::BadRequest(BadRequest::KeyInPath) => "API key in the path refused",
        }
    }

    /// RFC 6750 3: a challenge on every 401, and on 403 insufficient_scope.
    pub fn www_authenticate(&self) -> Option<HeaderValue> {
        match self {
            Reject::InvalidAuthHeader { missing: true } => {
                Some(HeaderValue::from_static(r#"Bearer realm="keyward""#))
            }
            // No scope grants a method no `scopes` rule names: RFC 6750's `scope` lists one
            // or more, so it is left out rather than sent empty.
            Reject::InsufficientScope { required } if required.is_empty() => Some(
                HeaderValue::from_static(r#"Bearer realm="keyward", error="insufficient_scope""#),
            ),
            Reject::InsufficientScope { required } => HeaderValue::from_str(&format!(
                r#"Bearer realm="keyward", error="insufficient_scope", scope="{}""#,
                required.join(" ")
            ))
            .ok(),
            r if r.status() == StatusCode::UNAUTHORIZED => Some(HeaderValue::from_static(
                r#"Bearer realm="keyward", error="invalid_token""#,
            )),
            _ => None,
        }
    }

    /// The JSON error body of SPEC 6.
    pub fn body(&self, correlation_id: &str) -> serde_json::Value {
        let mut body = serde_json::json!({
            "status": self.status().as_u16(),
            "code": self.code().as_str(),
            "error": self.message(),
            // The same text for clients of the `{status, message}` convention (SPEC 6).
            "message": self.message(),
            "correlation_id": correlation_id,
        });
        match self {
            Reject::InsufficientScope { required } => {
                body["required"] = serde_json::json!(required);
            }
            Reject::BadRequest(reason) => {
                body["detail"] = serde_json::json!(reason.to_string());
            }
            Reject::RateLimited {
                retry_after_secs, ..
            } => {
                body["retry_after"] = serde_json::json!(retry_after_secs);
            }
            _ => {}
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_order_matches_index() {
        for (i, c) in Code::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }

    #[test]
    fn challenges_follow_rfc6750() {
        let missing = Reject::InvalidAuthHeader { missing: true }
            .www_authenticate()
            .unwrap();
        assert_eq!(missing, r#"Bearer realm="keyward""#);
        let bad = Reject::InvalidApiKey.www_authenticate().unwrap();
        assert!(bad.to_str().unwrap().contains(r#"error="invalid_token""#));
        let scope = Reject::InsufficientScope {
            required: vec!["write".into(), "admin".into()],
        };
        assert_eq!(
            scope.www_authenticate().unwrap(),
            r#"Bearer realm="keyward", error="insufficient_scope", scope="write admin""#
        );
        assert!(Reject::UpstreamTimeout.www_authenticate().is_none());
        assert!(Reject::DelegationNotAllowed.www_authenticate().is_none());
    }

    #[test]
    fn body_has_contract_fields() {
        let b = Reject::InsufficientScope {
            required: vec!["write".into()],
        }
        .body("cid");
        assert_eq!(b["status"], 403);
        assert_eq!(b["code"], "insufficient_scope");
        assert_eq!(b["correlation_id"], "cid");
        assert_eq!(b["required"][0], "write");
        assert_eq!(b["message"], b["error"]);
        assert_eq!(
            Reject::UpstreamUnavailable.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            Reject::AuthUnavailable.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
