//! Header surgery on the forwarded request and the returned response (SPEC 8), in place on
//! the `HeaderMap` so repeated headers such as `Set-Cookie` survive.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::conn::ConnInfo;

use crate::config::Cidr;
use crate::header_names::{
    alias_starts_with, is_forwarding, may_be_listed, override_entry, same_name, DELEGATE_HEADER,
    HOP_BY_HOP,
};
use crate::keys::{IdentityNames, Key};

pub use super::respond::{X_CORRELATION_ID, X_REQUEST_ID};
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// The forwarding names `set_forwarded` keeps, appends to or replaces.
pub const SET_FORWARDED: [HeaderName; 4] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REAL_IP,
];
/// Remove hop-by-hop headers (RFC 9110 7.6.1): those a `Connection` header names, and the
/// fixed list (`Connection`, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Expect`,
/// `Upgrade`, `Proxy-*`). With `keep_upgrade`, the `Upgrade` header survives and `Connection: upgrade`
/// is re-added, for an authenticated WebSocket handshake.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // `Upgrade` is the last fixed name.
    let fixed = &HOP_BY_HOP[..HOP_BY_HOP.len() - usize::from(keep_upgrade)];
    let (present, proxy) = scan_hop_by_hop(headers, fixed);
    // `Connection` is the first fixed name.
    if present & 1 != 0 {
        remove_connection_options(headers);
    }
    for (i, name) in fixed.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if proxy {
        let listed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Which of the `fixed` names are present (bit i for `fixed[i]`), and whether any `Proxy-*`
/// is. One pass over the names: most requests carry none, nearly every response just
/// `Connection: keep-alive`, and a scan is cheaper than the hashed lookup a removal costs.
fn scan_hop_by_hop(headers: &HeaderMap, fixed: &[HeaderName]) -> (u8, bool) {
    let (mut present, mut proxy) = (0u8, false);
    for name in headers.keys() {
        // Every hop-by-hop name starts with one of these letters: most names are out at once.
        match name.as_str().as_bytes().first() {
            Some(b'c' | b'k' | b't' | b'e' | b'u') => {
                if let Some(i) = fixed.iter().position(|h| h == name) {
                    present |= 1 << i;
                }
            }
            Some(b'p') => proxy |= name.as_str().starts_with("proxy-"),
            _ => {}
        }
    }
    (present, proxy)
}

/// Remove the headers the `Connection` options name, except `Host`. The fixed names
/// (`Upgrade` included) are left to the caller, which knows if they are present.
fn remove_connection_options(headers: &mut HeaderMap) {
    // Nearly every message names only `keep-alive` or `close`, or nothing beyond the fixed
    // names: then no name is built and nothing more is removed.
    let named = |token: &&str| {
        !(token.is_empty()
            || token.eq_ignore_ascii_case("host")
            || HOP_BY_HOP
                .iter()
                .any(|h| token.eq_ignore_ascii_case(h.as_str())))
    };
    let mut listed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim).filter(named) {
            // A token that is no header name names no header there is.
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                listed.push(name);
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
}

/// Join several `Cookie` fields into one, separated by "; " (RFC 9113 8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined: Vec<u8> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

fn is_trusted_alias(name: &str, identity_prefix: &str) -> bool {
    alias_starts_with(name, identity_prefix)
        || (name.len() == DELEGATE_HEADER.as_str().len()
            && alias_starts_with(name, DELEGATE_HEADER.as_str()))
}

/// A name that reads as an identity header, the delegation header or a forwarding header
/// once `_` and `.` are read as `-`, but is not spelled with `-` where keyward spells it. Behind a decision
/// (SPEC 15) the front proxy overwrites or strips only the names as keyward spells them,
/// and a CGI/WSGI app would read this one as that.
pub fn is_misspelled_trusted(name: &HeaderName, identity_prefix: &str) -> bool {
    let n = name.as_str();
    // Most names start with a letter no list starts with, and have neither `_` nor `.`:
    // both are looked at before the alias tests, which compare the name with every
    // forwarding and asserted name.
    let first = n.as_bytes().first().copied().unwrap_or_default();
    let listed = may_be_listed(first)
        || identity_prefix
            .as_bytes()
            .first()
            .is_some_and(|p| p.eq_ignore_ascii_case(&first));
    if !listed || !crate::header_names::is_respelled(n) {
        return false;
    }
    let trusted = is_trusted_alias(n, identity_prefix);
    if !(trusted || is_forwarding(n)) {
        return false;
    }
    if !trusted {
        // Every forwarding name is spelled with `-` alone: one with `_` or `.` is an alias,
        // which front proxies pass on (nginx drops it, Caddy and Envoy do not) and
        // CGI/WSGI apps read as the real one (`X_Forwarded_Host`: host poisoning).
        return true;
    }
    let delegate = DELEGATE_HEADER;
    let canonical = if alias_starts_with(n, identity_prefix) {
        identity_prefix
    } else {
        delegate.as_str()
    };
    !n.starts_with(canonical)
}

/// Remove every header a client could use to impersonate keyward: identity headers and
/// their `_`/`.` aliases, and the delegation header (consumed by keyward).
pub fn strip_trusted(headers: &mut HeaderMap, identity_prefix: &str) {
    if !headers
        .keys()
        .any(|n| is_trusted_alias(n.as_str(), identity_prefix))
    {
        return;
    }
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_trusted_alias(n.as_str(), identity_prefix))
        .cloned()
        .collect();
    for n in doomed {
        headers.remove(n);
    }
}

/// Remove the credential headers before forwarding (unless `forward` keeps them), and their
/// `_`/`.` spellings always: keyward never reads those, and a CGI/WSGI or nginx backend
/// reads one as the credential header itself, a key keyward did not check.
pub fn strip_credentials(headers: &mut HeaderMap, credentials: &[HeaderName], forward: bool) {
    let (mut exact, mut spelled) = (false, false);
    for n in headers.keys() {
        for c in credentials {
            exact |= n == c;
            spelled |= n != c && same_name(n.as_str(), c.as_str());
        }
    }
    if exact && !forward {
        for c in credentials {
            headers.remove(c);
        }
    }
    // Rare (a client that sends them on purpose): only then is a list of names made.
    if spelled {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|n| {
                credentials
                    .iter()
                    .any(|c| *n != c && same_name(n.as_str(), c.as_str()))
            })
            .cloned()
            .collect();
        for n in names {
            headers.remove(n);
        }
    }
}

/// A forwarding or asserted name is kept only from a trusted proxy, and then only as a
/// proxy spells it (with `-`): no front proxy sets `remote_user` or `x~forwarded~host`, which
/// CGI/WSGI and lighttpd backends read as the real ones.
fn forwarding_not_kept(name: &str, peer_trusted: bool) -> bool {
    !peer_trusted || crate::header_names::is_respelled(name)
}

fn is_override(name: &HeaderName, allowed: &[HeaderName]) -> bool {
    override_of(name, allowed).is_some()
}

/// The override `name` is (its [`OVERRIDES`] entry, whichever of `-`, `_`, `.` it is
/// spelled with), unless it is one of the `allowed` names, exactly as spelled.
pub fn override_of(name: &HeaderName, allowed: &[HeaderName]) -> Option<&'static str> {
    // Every override starts with `x`, `s` or `p`: most names are out at once.
    let first = name.as_str().as_bytes().first();
    if !matches!(first, Some(b'x' | b's' | b'p')) || allowed.contains(name) {
        return None;
    }
    override_entry(name.as_str())
}

/// Remove what a client could use to change how the app reads the request: route, method
/// and host overrides always (except the `allowed` names, exactly as spelled), and every
/// forwarding header when the peer is not a trusted proxy. `_` and `.` spellings go too,
/// since CGI/WSGI and nginx backends read them as the same header.
///
/// With `drop_respelled` (`headers_with_underscores: drop`), every other name spelled with a
/// separator but `-` goes too (an `allowed` override as spelled excepted); without it, those
/// that alias a framing name still go.
pub fn strip_untrusted(
    headers: &mut HeaderMap,
    peer_trusted: bool,
    allowed: &[HeaderName],
    drop_respelled: bool,
) {
    let doomed = |n: &HeaderName| {
        // Every name of the lists starts with a letter `may_be_listed` admits.
        let listed = n
            .as_str()
            .as_bytes()
            .first()
            .copied()
            .is_some_and(may_be_listed)
            && ((forwarding_not_kept(n.as_str(), peer_trusted) && is_forwarding(n.as_str()))
                || is_override(n, allowed));
        listed
            || (crate::header_names::is_respelled(n.as_str())
                && (drop_respelled || is_framing_alias(n.as_str()))
                && !allowed.contains(n))
    };
    if !headers.keys().any(doomed) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for n in names {
        headers.remove(n);
    }
}

/// A spelling of a framing or routing name ([`crate::header_names::FRAMING`]) with a
/// separator other than `-`.
fn is_framing_alias(name: &str) -> bool {
    crate::header_names::FRAMING
        .iter()
        .any(|f| same_name(name, f))
}

/// Is `peer` one of the `trusted_proxies`?
pub fn is_trusted(conn: &ConnInfo, trusted_proxies: &[Cidr]) -> bool {
    trusted_proxies.iter().any(|c| c.contains(conn.peer.ip()))
}

/// Set `x-forwarded-*`. Client-sent values are kept (and appended to) only when the peer is
/// a trusted proxy; otherwise they, `Forwarded` and `X-Real-IP` are replaced or removed.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    host: Option<HeaderValue>,
    trusted_proxies: &[Cidr],
) {
    let trusted = is_trusted(conn, trusted_proxies);
    if trusted {
        let chain = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let value = if chain.is_empty() {
            Ok(conn.peer_ip.clone())
        } else {
            HeaderValue::try_from(format!("{chain}, {}", conn.peer.ip()))
        };
        if let Ok(v) = value {
            headers.insert(X_FORWARDED_FOR, v);
        }
    } else {
        if headers.keys().any(|n| *n == FORWARDED || *n == X_REAL_IP) {
            headers.remove(FORWARDED);
            headers.remove(X_REAL_IP);
        }
        headers.insert(X_FORWARDED_FOR, conn.peer_ip.clone());
    }
    if !trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = if conn.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !trusted || !headers.contains_key(&X_FORWARDED_HOST) {
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h);
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
}

/// Add identity headers last, with `insert` so nothing a client sent can sit beside them.
/// The identity headers an allowed request carries upstream. They are added by whichever
/// client sends it, as late as possible: hyper's client gets them in the request's map,
/// the fast path writes them straight into the request head (no map insert, no growth).
#[derive(Clone, Copy)]
pub struct Identity<'a> {
    pub key: &'a Key,
    pub names: &'a IdentityNames,
    /// The account a delegated request acts for.
    pub delegated: Option<&'a HeaderValue>,
}

impl<'a> Identity<'a> {
    pub fn headers(self) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + 'a {
        self.key.identity_headers(self.names, self.delegated)
    }
}

pub fn add_identity<'a>(
    headers: &mut HeaderMap,
    identity: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    // Room for the identity (at most 12) and the correlation headers, in one growth.
    headers.reserve(14);
    for (name, value) in identity {
        headers.insert(name.clone(), value.clone());
    }
}

pub fn set_correlation(headers: &mut HeaderMap, id: &HeaderValue) {
    headers.insert(X_CORRELATION_ID, id.clone());
    headers.insert(X_REQUEST_ID, id.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header_names::{ASSERTED, ASSERTED_PREFIXES, FORWARDING, OVERRIDES};

    /// `strip_untrusted` skips names by their first letter.
    #[test]
    fn every_stripped_name_starts_with_a_letter_looked_at() {
        let lists = [
            &OVERRIDES[..],
            &FORWARDING[..],
            &ASSERTED[..],
            &ASSERTED_PREFIXES[..],
        ];
        for name in lists.into_iter().flatten() {
            assert!(may_be_listed(name.as_bytes()[0]), "{name}");
        }
    }

    /// `override_of` and `strip_untrusted` skip names by their first letter.
    #[test]
    fn every_override_starts_with_a_letter_looked_at() {
        assert!(OVERRIDES
            .iter()
            .all(|o| matches!(o.as_bytes()[0], b'x' | b's' | b'p')));
        let name = |s: &str| HeaderName::from_bytes(s.as_bytes()).unwrap();
        assert_eq!(
            override_of(&name("x_http.method-override"), &[]),
            Some("x-http-method-override")
        );
        assert_eq!(override_of(&name("x-api-key"), &[]), None);
        let allowed = [name("x-http-method")];
        assert_eq!(override_of(&name("x-http-method"), &allowed), None);
        assert_eq!(
            override_of(&name("x_http_method"), &allowed),
            Some("x-http-method")
        );
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// The header names left, sorted.
    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        left
    }

    #[test]
    fn connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "close, X-Foo"),
            ("connection", "x-bar"),
            ("x-foo", "1"),
            ("x-bar", "1"),
            ("keep-alive", "5"),
            ("te", "trailers"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
    }

    #[test]
    fn only_hop_by_hop_names_go_from_a_typical_response() {
        let mut h = map(&[
            ("server", "nginx"),
            ("content-length", "2"),
            ("connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("trailer", "x-checksum"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["content-length", "server"]);
    }

    #[test]
    fn upgrade_handshake_loses_other_connection_options() {
        let mut h = map(&[
            ("connection", "Upgrade, X-Foo"),
            ("x-foo", "1"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("x-foo").is_none() && h.get("te").is_none(), "{h:?}");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn upgrade_kept_when_allowed() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn identity_aliases_go() {
        let mut h = map(&[
            ("x-auth-subject-id", "evil"),
            ("X_Auth_Subject_Id", "evil"),
            ("x.auth.account.id", "evil"),
            ("x-auth_scopes", "evil"),
            ("x-delegate-account-id", "evil"),
            ("x_delegate_account_id", "evil"),
            ("x-authority", "keep"),
            ("x-other", "keep"),
        ]);
        strip_trusted(&mut h, "x-auth-");
        assert_eq!(names(&h), ["x-authority", "x-other"]);
    }

    #[test]
    fn misspelled_trusted_names_are_the_aliases_not_keywards_spelling() {
        let misspelled = |n: &str| {
            is_misspelled_trusted(&HeaderName::from_bytes(n.as_bytes()).unwrap(), "x-auth-")
        };
        for n in [
            "x_auth_org_id",
            "x-auth.key-id",
            "x.auth-custom",
            "x_delegate_account_id",
            "x-delegate.account-id",
            "x_forwarded_host",
            "x.forwarded.proto",
            "true_client_ip",
            "x_real_ip",
        ] {
            assert!(misspelled(n), "{n}");
        }
        for n in [
            "x-forwarded-for",
            "true-client-ip",
            "x-auth-org-id",
            "x-auth-custom_name",
            "x-delegate-account-id",
            "x_delegate_account_idx",
            "x_other",
            "x-authority",
        ] {
            assert!(!misspelled(n), "{n}");
        }
    }

    #[test]
    fn forwarded_headers_from_untrusted_peer_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        let conn = ConnInfo::new("10.0.0.9:5555".parse().unwrap(), false, 1);
        set_forwarded(&mut h, &conn, Some(HeaderValue::from_static("app")), &[]);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app");
        assert!(h.get("forwarded").is_none());
    }

    #[test]
    fn forwarding_and_override_headers_from_untrusted_peers_go() {
        let mut h = map(&[
            ("x-forwarded-ssl", "on"),
            ("x-forwarded-scheme", "https"),
            ("X_Forwarded_Proto", "https"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/admin"),
            ("forwarded", "proto=https"),
            ("x-real-ip", "1.2.3.4"),
            ("true-client-ip", "1.2.3.4"),
            ("front-end-https", "on"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x_http_method", "DELETE"),
            ("x-middleware-subrequest", "middleware"),
            ("x-forwardedness", "keep"),
            ("x-other", "keep"),
        ]);
        strip_untrusted(&mut h, false, &[], false);
        assert_eq!(names(&h), ["x-forwardedness", "x-other"]);
    }

    #[test]
    fn trusted_peers_keep_forwarding_and_allowed_overrides_pass() {
        let mut h = map(&[
            ("x-forwarded-ssl", "on"),
            ("forwarded", "proto=https"),
            ("x-http-method-override", "PATCH"),
            ("x_http_method_override", "DELETE"),
            ("x-original-url", "/admin"),
        ]);
        let allowed = [HeaderName::from_static("x-http-method-override")];
        strip_untrusted(&mut h, true, &allowed, false);
        assert_eq!(
            names(&h),
            ["forwarded", "x-forwarded-ssl", "x-http-method-override"]
        );
    }

    #[test]
    fn trusted_peer_chain_is_appended() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let conn = ConnInfo::new("10.0.0.9:5555".parse().unwrap(), false, 1);
        let trusted = [Cidr::try_from("10.0.0.0/8".to_string()).unwrap()];
        set_forwarded(&mut h, &conn, None, &trusted);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
