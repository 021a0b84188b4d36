//! Header names that mean something to keyward or to the app behind it, and how a
//! CGI/WSGI or nginx backend reads a name (`_` and `.` as `-`). Shared by the request path
//! (what is stripped, what is set) and the config (what a setting may not name).

use http::header::{self, HeaderName};

use crate::name_set::NameSet;

/// The header a delegating enterprise key names the account it acts for in. Read by keyward
/// and never forwarded.
pub const DELEGATE_HEADER: HeaderName = HeaderName::from_static("x-delegate-account-id");
pub const X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Custom (non-standard) names clients and tracing libraries commonly send: keyward's
/// HTTP/1.1 server reads them without an allocation, as it reads the names it uses itself.
pub const COMMON_CUSTOM: [HeaderName; 16] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("baggage"),
    HeaderName::from_static("b3"),
    HeaderName::from_static("x-b3-traceid"),
    HeaderName::from_static("x-b3-spanid"),
    HeaderName::from_static("x-b3-parentspanid"),
    HeaderName::from_static("x-b3-sampled"),
    HeaderName::from_static("x-amzn-trace-id"),
    HeaderName::from_static("x-cloud-trace-context"),
    HeaderName::from_static("x-requested-with"),
    HeaderName::from_static("sec-fetch-site"),
    HeaderName::from_static("sec-fetch-mode"),
    HeaderName::from_static("sec-fetch-dest"),
    HeaderName::from_static("sec-ch-ua"),
    HeaderName::from_static("sec-ch-ua-platform"),
];

/// The fixed hop-by-hop names (RFC 9110 7.6.1), `Upgrade` last: it is kept for an
/// authenticated WebSocket handshake. `Expect` too: keyward's server answers a client's
/// `100-continue` itself and then streams the body, so an app asked the same would see a
/// body it never asked for, and one that refuses it (417) without reading it would read the
/// body as its next request.
pub static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::EXPECT,
    header::UPGRADE,
];

/// A byte a backend may read as `-` in a header name: any that is not a letter or a digit.
/// CGI/WSGI and nginx backends read `_` and `.` so, and lighttpd's CGI/FastCGI/SCGI every
/// other punctuation a name may hold (`+`, `~`, `!`, ...), since each becomes `_` in the
/// variable name.
#[inline]
pub const fn is_separator(c: u8) -> bool {
    !c.is_ascii_alphanumeric()
}

/// A name spelled with a separator other than `-`: never as a proxy or keyward spells a
/// name, always as an alias a backend reads as one (`remote_user`, `x~forwarded~host`).
#[inline]
pub fn is_respelled(name: &str) -> bool {
    // Asked of every header of every forwarded request: a table lookup a byte.
    !name.bytes().all(|b| PLAIN[usize::from(b)])
}

/// The bytes a name spelled as proxies spell it holds: letters, digits and `-`.
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c == b'-' || c.is_ascii_alphanumeric();
        b += 1;
    }
    t
};

/// Whether two names are one to a CGI/WSGI or nginx backend: equal with every separator
/// ([`is_separator`]) read as `-` on either side.
pub fn same_name(a: &str, b: &str) -> bool {
    let dash = |c: u8| if is_separator(c) { b'-' } else { c };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| dash(x) == dash(y))
}

/// Compare a header name with `target` reading every separator as `-`, as CGI/WSGI and
/// nginx backends do, so `X_Auth_Subject_Id`, `x.auth.subject.id` and `x+auth+subject+id`
/// count as identity headers.
pub fn alias_starts_with(name: &str, target: &str) -> bool {
    name.len() >= target.len()
        && name
            .bytes()
            .zip(target.bytes())
            .all(|(a, b)| a == b || (b == b'-' && is_separator(a)))
}

/// Headers that tell an app where a request came from or how it arrived, which only a
/// proxy in `trusted_proxies` may set: besides `x-forwarded-*` (every one of them: `-ssl`,
/// `-scheme`, `-port`, `-prefix`, `-server`, `-uri`, ... which Rack, Spring and others
/// read), the client-address headers of CDNs and load balancers, and the HTTPS markers of
/// IIS/ARR and nginx setups.
pub const FORWARDING: [&str; 28] = [
    "forwarded",
    "x-forwarded",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "x-proxyuser-ip",
    "front-end-https",
    "x-url-scheme",
    "x-scheme",
    "x-arr-ssl",
    // Cloudflare's scheme (`{"scheme":"https"}`) and a common nginx HTTPS marker.
    "cf-visitor",
    "x-ssl",
    // Envoy's own: whether the request came from inside, and the client address it trusts.
    "x-envoy-internal",
    "x-envoy-external-address",
    // The client address other CDNs and platforms pass on (the `request-ip` npm package
    // reads `forwarded-for` and App Engine's too).
    "cf-connecting-ipv6",
    "cf-pseudo-ipv4",
    "fly-client-ip",
    "x-azure-clientip",
    "x-azure-socketip",
    "x-azure-fdid",
    "x-vercel-forwarded-for",
    "x-nf-client-connection-ip",
    "forwarded-for",
];
pub const FORWARDING_PREFIX: &str = "x-forwarded-";
pub const ENVOY_PREFIX: &str = "x-envoy-";

/// Headers that make an app (or a framework in front of it) route by something other than
/// the request line: a URL or path override (IIS/Symfony/Laravel `X-Original-URL`,
/// `X-Rewrite-URL`), a method override (`X-HTTP-Method-Override` and its variants), a host
/// override, the Next.js internal-subrequest marker (CVE-2025-29927), or the WSGI path
/// gunicorn takes from its loopback peer by default (`SCRIPT_NAME`, `PATH_INFO`: the path
/// served is the request's without that prefix, or that one) and the Flask recipe's
/// `X-Script-Name`. keyward authorized the request line; none of these may change what the
/// app serves, so they are removed from every request unless named in
/// `allow_override_headers` (which may not name the WSGI ones: see [`UNAUTHORIZABLE`]).
pub const OVERRIDES: [&str; 19] = [
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-override-url",
    "x-envoy-original-path",
    "x-original-method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-host",
    "x-original-host",
    "x-http-host-override",
    "x-forwarded-method",
    // Traefik's ForwardAuth carries the original URI in it; an app that reads it (as
    // `x-original-uri`) serves that path, not the request line's.
    "x-forwarded-uri",
    "x-middleware-subrequest",
    "script-name",
    "x-script-name",
    "path-info",
    // "httpoxy" (CVE-2016-5385): CGI and FastCGI backends (PHP-FPM, Go's net/http/cgi,
    // wsgiref) turn it into `HTTP_PROXY`, the proxy their own outbound calls then use.
    "proxy",
];

/// [`OVERRIDES`] whose effect keyward cannot authorize (a prefix the app strips, a path
/// that replaces the request's, the app's outbound proxy): never let through, whatever
/// `allow_override_headers` says.
pub const UNAUTHORIZABLE: [&str; 4] = ["script-name", "x-script-name", "path-info", "proxy"];

/// Names that frame or route the request on its hop: their `_`/`.` aliases are dropped even
/// with `headers_with_underscores: forward` (`Transfer_Encoding` is `HTTP_TRANSFER_ENCODING`
/// to a CGI/WSGI server that folds names, and Puma before 6.4.3 framed bodies by it).
pub const FRAMING: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "host",
    "te",
    "upgrade",
    "keep-alive",
    "trailer",
    "expect",
];

/// `name` equals `target` reading `_` and `.` as `-`.
pub fn alias_eq(name: &str, target: &str) -> bool {
    name.len() == target.len() && alias_starts_with(name, target)
}

/// What a gateway in front asserts about the client, which an app behind one trusts as it
/// trusts keyward's identity headers, so only a proxy in `trusted_proxies` may set them:
/// the client certificate a TLS terminator verified (nginx's and HAProxy's `X-SSL-Client-*`
/// and `SSL-Client-*`, IIS/ARR, RFC 9440 `Client-Cert`, AWS ALB's mTLS headers) and the
/// identity other authentication gateways send (Authelia and Authentik `Remote-*` and
/// `X-Authentik-*`, the Kubernetes authenticating proxy `X-Remote-*`, Grafana
/// `X-WEBAUTH-*`, Kong's consumer and `X-Authenticated-*` headers, APISIX `X-Userinfo`,
/// oauth2-proxy `X-Auth-Request-*`, Vouch, mod_auth_openidc `OIDC_CLAIM_*`, Pomerium,
/// Cloudflare Access, Google IAP and Cloud Endpoints, AWS ALB OIDC, Azure App Service). An app moved from one of those to keyward keeps
/// reading them: a client must not be able to send them through.
pub const ASSERTED: [&str; 50] = [
    // oauth2-proxy's identity (its `X-Forwarded-*` names, and `GAP-Auth`).
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "gap-auth",
    "x-remote-groups",
    "x-client-cert",
    "x-client-certificate",
    "x-client-verify",
    "x-client-dn",
    "x-arr-clientcert",
    "client-cert",
    "client-cert-chain",
    "remote-user",
    "remote-groups",
    "remote-email",
    "remote-name",
    "x-remote-user",
    "x-remote-group",
    "x-remote-uid",
    "x-credential-identifier",
    "x-credential-username",
    "x-remote-user-id",
    "x-iisnode-auth_user",
    "x-userinfo",
    "x-endpoint-api-userinfo",
    "x-apigateway-api-userinfo",
    // Google IAP's signed assertion (beside `x-goog-authenticated-user-*`).
    "x-goog-iap-jwt-assertion",
    // nginx recipes for the verified certificate's fields, beside `x-client-dn`.
    "x-client-s-dn",
    "x-client-i-dn",
    "x-client-subject",
    "x-client-serial",
    "x-client-verified",
    "cert-subject",
    "x-cert-subject",
    // Linkerd's mTLS identity of the calling workload, Dapr's calling app.
    "l5d-client-id",
    "l5d-server-id",
    "dapr-caller-app-id",
    // OIDC tokens a gateway passes on (APISIX openid-connect, kong-oidc).
    "x-id-token",
    "x-access-token",
    "x-jwt-payload",
    "x-jwt-assertion",
    // API Gateway through serverless-express (the authorizer's claims), AWS Verified
    // Access, Teleport, Shibboleth's principal, and common bare names.
    "x-apigateway-event",
    "x-apigateway-context",
    "teleport-jwt-assertion",
    "eppn",
    "x-user",
    "x-tailscale-user",
    "x-kong-consumer",
];

/// Name prefixes of [`ASSERTED`] families, and of `x-forwarded-*` and `x-envoy-*` (first).
pub const ASSERTED_PREFIXES: [&str; 31] = [
    FORWARDING_PREFIX,
    // Envoy's request headers (retries, timeouts, the original destination, tracing): a
    // sidecar in front of the app acts on them. Stripped like forwarding headers; a
    // decision lets them through (Envoy itself sends some to an ext_authz service).
    ENVOY_PREFIX,
    // The client certificate a TLS terminator verified, and what it read from it: nginx
    // and HAProxy configs (`X-SSL-Client-*`, `X-SSL-Subject`), Google's load balancers
    // (`X-Client-Cert-Present`, `-Hash`, `-Spiffe`, ...), Cloudflare (`Cf-Cert-*`,
    // `Cf-Client-Cert-*`), AWS (`X-Amzn-Mtls-*`), Traefik and others (`X-Tls-Client-Cert`).
    "x-ssl-",
    "ssl-client-",
    "x-client-cert-",
    "cf-cert-",
    "cf-client-cert-",
    "x-tls-client-",
    "x-mtls-client-",
    "x-amzn-mtls-",
    "x-remote-extra-",
    "x-webauth-",
    "x-consumer-",
    "x-anonymous-consumer",
    "x-authenticated-",
    "x-authentik-",
    "x-vouch-",
    "x-auth-request-",
    "x-pomerium-",
    "cf-access-",
    "x-goog-authenticated-user-",
    "x-amzn-oidc-",
    // Tailscale `serve`: the tailnet user it authenticated.
    "tailscale-user-",
    "x-ms-client-principal",
    "x-ms-token-",
    // WebLogic's proxy plug-in (`WL-Proxy-Client-Cert`, `-SSL`, `-Remote-User`), the F5
    // iRule convention (`SSLClientCert`, `SSLClientCertStatus`), mod_auth_openidc's
    // tokens and claims (`OIDC-Access-Token`, `OIDC_CLAIM_*`: `oidc-` covers both), App
    // Engine's user, AWS Verified Access's user context, Shibboleth's attributes.
    "wl-proxy-",
    "sslclientcert",
    "oidc-",
    "x-appengine-user-",
    "x-amzn-ava-",
    "shib-",
];

/// ingress-nginx's own header on every auth subrequest (where to send a browser back to),
/// under oauth2-proxy's `x-auth-request-` family but no identity.
pub const INGRESS_NGINX_REDIRECT: &str = "x-auth-request-redirect";

/// Another gateway's assertion about the client ([`ASSERTED`], [`ASSERTED_PREFIXES`] but
/// `x-forwarded-*`, which every front proxy sets, `x-envoy-*`, which Envoy sets, and
/// `x-authenticated-*`), spelled as that gateway sends it.
pub fn is_asserted(name: &str) -> bool {
    // Asked of every header of every decision: most names are out by their first bytes.
    let could = match name.as_bytes() {
        [b'x', b'-', third, ..] => b"scarwvpgmeufitjk".contains(third),
        [first, ..] => matches!(
            first,
            b'r' | b's' | b'c' | b'o' | b'g' | b't' | b'l' | b'w' | b'd' | b'e'
        ),
        [] => false,
    };
    could
        && (ASSERTED.contains(&name)
            || ASSERTED_PREFIXES[2..].iter().any(|p| name.starts_with(p))
                && name != INGRESS_NGINX_REDIRECT
                && !name.starts_with(CLIENT_SIDE_PREFIX))
}

/// Corporate forward proxies (Blue Coat, Zscaler) add `X-Authenticated-User` to their
/// users' requests: a decision does not refuse the family (the proxy still strips it).
const CLIENT_SIDE_PREFIX: &str = "x-authenticated-";

/// Could a name starting with `first` be in [`FORWARDING`], [`ASSERTED`],
/// [`ASSERTED_PREFIXES`] or [`OVERRIDES`]? Per-request checks rule most names out by it
/// before comparing with every entry (a test keeps it true of every entry).
pub fn may_be_listed(first: u8) -> bool {
    matches!(
        first,
        b'x' | b'f' | b'c' | b't' | b'r' | b's' | b'o' | b'g' | b'p' | b'l' | b'w' | b'd' | b'e'
    )
}

/// A forwarding header ([`FORWARDING`], `x-forwarded-*`) or another assertion a gateway in
/// front makes ([`ASSERTED`]), however spelled.
pub fn is_forwarding(name: &str) -> bool {
    static PREFIXES: NameSet<31> = NameSet::new(ASSERTED_PREFIXES, true);
    static FORWARDING_NAMES: NameSet<28> = NameSet::new(FORWARDING, false);
    static ASSERTED_NAMES: NameSet<50> = NameSet::new(ASSERTED, false);
    PREFIXES.contains(name) || FORWARDING_NAMES.contains(name) || ASSERTED_NAMES.contains(name)
}

/// The override `name` is ([`OVERRIDES`]), however spelled.
pub fn override_entry(name: &str) -> Option<&'static str> {
    static NAMES: NameSet<{ OVERRIDES.len() }> = NameSet::new(OVERRIDES, false);
    NAMES.find(name)
}

/// Names a client or an app commonly sends, which an identity prefix must not start: the
/// prefix's names are stripped from every request, so `content-` would strip
/// `Content-Type` and `x-` every `X-` header.
const COMMON: [&str; 27] = [
    "accept",
    "accept-encoding",
    "accept-language",
    "authorization",
    "cache-control",
    "content-encoding",
    "content-length",
    "content-type",
    "cookie",
    "forwarded",
    "host",
    "if-none-match",
    "origin",
    "proxy-authorization",
    "range",
    "referer",
    "sec-fetch-mode",
    "sec-websocket-key",
    "traceparent",
    "tracestate",
    "user-agent",
    "x-amzn-trace-id",
    "x-api-key",
    "x-b3-traceid",
    "x-forwarded-for",
    "x-real-ip",
    "x-requested-with",
];

/// Why a request's credential cannot be read from the header `name`: keyward reads, sets
/// or strips it for another purpose, or the connection itself uses it, so the key would
/// be logged, echoed or forwarded as that, or never arrive. `None`: the name is free.
pub fn taken_for_credential(name: &str) -> Option<&'static str> {
    if name == "host" || name == "content-length" || name.starts_with("content-") {
        Some("describes the request itself")
    } else if HOP_BY_HOP.iter().any(|h| h == name) || name.starts_with("proxy-") {
        Some("is hop-by-hop: it is not passed on, and HTTP/2 has no such header")
    } else if alias_eq(name, X_CORRELATION_ID.as_str()) || alias_eq(name, X_REQUEST_ID.as_str()) {
        Some("carries the correlation id, which keyward echoes, forwards and logs")
    } else if alias_eq(name, DELEGATE_HEADER.as_str()) {
        Some("names the account a delegating key acts for")
    } else if is_forwarding(name) {
        Some("is a forwarding header, which keyward sets itself")
    } else if OVERRIDES.iter().any(|o| alias_eq(name, o)) {
        Some("is a routing override, which keyward strips")
    } else {
        None
    }
}

/// A well-known header `prefix` would claim as an identity header (and so strip from every
/// request), besides the `also` names (the credential headers).
pub fn claimed_by_prefix(prefix: &str, also: &[HeaderName]) -> Option<String> {
    let own = [X_CORRELATION_ID, X_REQUEST_ID, DELEGATE_HEADER];
    COMMON
        .iter()
        .chain(&FORWARDING)
        .chain(&OVERRIDES)
        .copied()
        .chain(
            HOP_BY_HOP
                .iter()
                .chain(&own)
                .chain(also)
                .map(HeaderName::as_str),
        )
        .find(|n| alias_starts_with(n, prefix))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    /// `is_asserted` rules names out by their first bytes: every entry must get past that.
    #[test]
    fn every_asserted_name_gets_past_the_first_bytes() {
        for name in ASSERTED {
            assert!(is_asserted(name), "{name}");
        }
        for prefix in ASSERTED_PREFIXES[2..]
            .iter()
            .filter(|p| !p.starts_with(CLIENT_SIDE_PREFIX))
        {
            let name = format!("{prefix}z");
            assert!(is_asserted(&name), "{name}");
        }
        assert!(!is_asserted("x-forwarded-host"));
        assert!(!is_asserted("x-envoy-retry-on"));
        assert!(!is_asserted(INGRESS_NGINX_REDIRECT));
        assert!(!is_asserted("x-api-key"));
    }

    use super::*;

    #[test]
    fn names_taken_for_other_purposes_are_not_credential_sources() {
        for taken in [
            "host",
            "content-length",
            "content-type",
            "transfer-encoding",
            "connection",
            "upgrade",
            "proxy-authorization",
            "x-correlation-id",
            "x_request_id",
            "x-delegate-account-id",
            "x-forwarded-for",
            "x-real-ip",
            "x-original-url",
        ] {
            assert!(taken_for_credential(taken).is_some(), "{taken}");
        }
        for free in ["authorization", "x-api-key", "x-token", "cookie"] {
            assert_eq!(taken_for_credential(free), None, "{free}");
        }
    }

    #[test]
    fn a_prefix_may_not_claim_a_common_header() {
        let api = [HeaderName::from_static("x-my-key")];
        for (prefix, claimed) in [
            ("x-a", "x-amzn-trace-id"),
            ("x-api-", "x-api-key"),
            ("content-", "content-encoding"),
            ("x-forwarded-", "x-forwarded-for"),
            ("x-delegate-", "x-delegate-account-id"),
            ("x-correlation-", "x-correlation-id"),
            ("x-my-", "x-my-key"),
        ] {
            assert_eq!(
                claimed_by_prefix(prefix, &api).as_deref(),
                Some(claimed),
                "{prefix}"
            );
        }
        for free in ["x-auth-", "x-user-", "x-keyward-", "auth-"] {
            assert_eq!(claimed_by_prefix(free, &api), None, "{free}");
        }
    }
}
