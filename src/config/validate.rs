//! [`Config::validate`]: every rule serde cannot express, in a fixed order (the first
//! problem is the one reported). Errors name the field.

use std::net::{IpAddr, SocketAddr};

use http::Uri;

use super::error::{invalid, ConfigError};
use super::rules::{check_route_path, validate_routes, validate_scopes};
use super::upstream::{validate_unix_path, UpstreamAddr};
use super::{Config, CredentialSource, MAX_WORKERS};
use crate::header_names::{
    alias_eq, alias_starts_with, claimed_by_prefix, same_name, taken_for_credential, OVERRIDES,
    UNAUTHORIZABLE,
};

/// Two sources that read the same thing: the same header (however spelled with `_`, `.`
/// or `-`, which backends read as one) with the same scheme, or the same parameter.
fn same_source(a: &CredentialSource, b: &CredentialSource) -> bool {
    use CredentialSource as C;
    match (a, b) {
        (C::Header { header: x }, C::Header { header: y }) => same_name(x.as_str(), y.as_str()),
        (
            C::Scheme {
                header: x,
                scheme: s,
            },
            C::Scheme {
                header: y,
                scheme: t,
            },
        ) => same_name(x.as_str(), y.as_str()) && s.eq_ignore_ascii_case(t),
        (C::Query { name: x }, C::Query { name: y }) => crate::auth::credential::is_param(x, y),
        _ => false,
    }
}

impl Config {
    /// Every rule that serde cannot express. Errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_upstream()?;
        self.validate_distinct_listeners()?;
        if self.environment.trim().is_empty() {
            return Err(invalid("environment", "must not be empty"));
        }
        self.validate_identity_prefix()?;
        self.validate_credentials()?;
        self.validate_allowed_overrides()?;
        if self.keys.file.is_none() && self.keys.control.is_none() {
            return Err(invalid(
                "keys",
                "set `file` or `control.state_file` (or both) so keys can be loaded",
            ));
        }
        if let Some(state) = &self.keys.state_file {
            if self.keys.control.is_some() {
                return Err(invalid(
                    "keys.state_file",
                    "is the file source's; a control source keeps its state in keys.control.state_file",
                ));
            }
            if self
                .keys
                .file
                .as_ref()
                .is_some_and(|file| same_file(file, state))
            {
                return Err(invalid(
                    "keys.state_file",
                    "must not be keys.file itself (it keeps the last snapshot accepted from it)",
                ));
            }
        }
        if self
            .tls
            .as_ref()
            .is_some_and(|t| t.client_crl.is_some() && t.client_ca.is_none())
        {
            return Err(invalid(
                "tls.client_crl",
                "revokes client certificates, which only tls.client_ca asks for",
            ));
        }
        if let Some(depth) = self.tls.as_ref().map(|t| t.client_verify_depth) {
            let range = crate::tls::VERIFY_DEPTH_RANGE;
            if !range.contains(&depth) {
                return Err(invalid(
                    "tls.client_verify_depth",
                    format!(
                        "must be {} to {}: the most intermediates a client may send",
                        range.start(),
                        range.end()
                    ),
                ));
            }
        }
        if self.tls.as_ref().is_some_and(|t| t.poll_interval.is_zero()) {
            return Err(invalid("tls.poll_interval", "must be greater than zero"));
        }
        if self.keys.poll_interval.is_zero() {
            return Err(invalid("keys.poll_interval", "must be greater than zero"));
        }
        self.validate_snapshot_safety()?;
        for (prefix, types) in &self.prefixes {
            if prefix.is_empty() {
                return Err(invalid("prefixes", "a prefix must not be empty"));
            }
            if types.is_empty() {
                return Err(invalid(
                    format!("prefixes.{prefix}"),
                    "list at least one type",
                ));
            }
        }
        validate_scopes(&self.scopes)?;
        validate_routes(&self.routes, self.routes_case_insensitive)?;
        if let Some(p) = &self.introspection_path {
            check_route_path("introspection_path", p)?;
            // keyward answers the introspection path itself: a rule for that path alone
            // would never apply.
            let fold = self.routes_case_insensitive;
            if let Some(i) = self.routes.iter().position(|r| {
                let p = crate::path::delimiters_decoded(p);
                r.path.is_some() && r.compared().matches(&p, fold)
            }) {
                return Err(invalid(
                    "introspection_path",
                    format!("routes[{i}] is a rule for this path, which keyward answers itself"),
                ));
            }
        }
        if let Some(t) = &self.admin.token_sha256 {
            if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("admin.token_sha256", "must be 64 hex characters"));
            }
        }
        self.limits.validate()?;
        self.validate_cluster()?;
        if let Some(n) = self.workers {
            if !(1..=MAX_WORKERS).contains(&n) {
                return Err(invalid(
                    "workers",
                    format!("must be 1 to {MAX_WORKERS} (omit it for one per CPU)"),
                ));
            }
        }
        // What start would refuse to obey (`logging::choose_filter`): a bare word that is no
        // level (`inf0`) turns every target off in EnvFilter, keyward's errors included.
        if let Err(why) = crate::logging::check_filter(self.log.level.trim()) {
            return Err(invalid(
                "log.level",
                format!("{:?} {why}, such as info or info,h2=debug", self.log.level),
            ));
        }
        Ok(())
    }

    /// `keys.guard`, `keys.max_age`, `metrics.per_key_limit` (SPEC 16). `min_keys` is
    /// unsigned: a negative value is refused by the parser, naming the field.
    fn validate_snapshot_safety(&self) -> Result<(), ConfigError> {
        let f = self.keys.guard.max_removed_fraction;
        if !(f > 0.0 && f <= 1.0) {
            return Err(invalid(
                "keys.guard.max_removed_fraction",
                format!("{f} must be greater than 0 and at most 1"),
            ));
        }
        if self.keys.max_age.is_some_and(|a| a.is_zero()) {
            return Err(invalid("keys.max_age", "must be greater than zero"));
        }
        if self.metrics.per_key_limit == 0 {
            return Err(invalid(
                "metrics.per_key_limit",
                "must be at least 1 (turn the series off with metrics.per_key: false)",
            ));
        }
        Ok(())
    }

    /// Two listeners on one port would fail to bind at start, after `check` said ok, when
    /// they share an address or either is a wildcard (`0.0.0.0` and `[::]` take the port on
    /// every address); the admin listener in particular must never share a port with
    /// traffic.
    fn validate_distinct_listeners(&self) -> Result<(), ConfigError> {
        let same = |a: SocketAddr, b: SocketAddr| {
            let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
            a.port() == b.port()
                && a.port() != 0
                && (x == y || x.is_unspecified() || y.is_unspecified())
        };
        let listeners = [
            ("listen", self.listen),
            ("decision.listen", self.decision.as_ref().map(|d| d.listen)),
            ("admin_listen", Some(self.admin_listen)),
            ("probe_listen", self.probe_listen),
        ];
        let configured: Vec<(&str, SocketAddr)> = listeners
            .into_iter()
            .filter_map(|(name, addr)| Some((name, addr?)))
            .collect();
        for (i, &(name, addr)) in configured.iter().enumerate() {
            if let Some((earlier, _)) = configured[..i].iter().find(|(_, a)| same(*a, addr)) {
                return Err(invalid(name, format!("must differ from `{earlier}`")));
            }
        }
        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), ConfigError> {
        match (self.listen, &self.upstream, &self.decision) {
            (Some(_), Some(UpstreamAddr::Http(u)), _) => {
                Self::validate_upstream_url(u)?;
                self.validate_no_loop(u)
            }
            (Some(_), Some(UpstreamAddr::Unix(path)), _) => validate_unix_path(path),
            (Some(_), None, _) => Err(invalid("upstream", "required with `listen`")),
            (None, Some(_), _) => Err(invalid("listen", "required with `upstream`")),
            (None, None, Some(_)) => Ok(()),
            (None, None, None) => Err(invalid(
                "listen",
                "set `listen` and `upstream` (proxy), or `decision.listen` (decision mode), or both",
            )),
        }
    }

    /// An upstream that is one of keyward's own listeners sends each request back in,
    /// thousands of times, until connections run out.
    fn validate_no_loop(&self, u: &Uri) -> Result<(), ConfigError> {
        let host = u
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = u.port_u16().unwrap_or(80);
        // `[::ffff:127.0.0.1]` is 127.0.0.1; `localhost.` is `localhost`.
        let ip: Option<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => Some(ip.to_canonical()),
            Err(_) if host.trim_end_matches('.').eq_ignore_ascii_case("localhost") => None,
            Err(_) => return Ok(()),
        };
        let own = [
            ("listen", self.listen),
            ("admin_listen", Some(self.admin_listen)),
            ("decision.listen", self.decision.as_ref().map(|d| d.listen)),
            ("probe_listen", self.probe_listen),
        ];
        for (name, addr) in own {
            let Some(addr) = addr.filter(|a| a.port() == port && a.port() != 0) else {
                continue;
            };
            let listening = addr.ip().to_canonical();
            // Connecting to 0.0.0.0 or [::] reaches this host's own listeners.
            let reaches = match ip {
                // `localhost`: whichever loopback address it resolves to.
                None => listening.is_loopback() || listening.is_unspecified(),
                Some(ip) if ip.is_unspecified() => {
                    listening.is_loopback() || listening.is_unspecified()
                }
                Some(ip) => ip == listening || listening.is_unspecified() && ip.is_loopback(),
            };
            if reaches {
                return Err(invalid(
                    "upstream",
                    format!("is keyward's own `{name}`: every request would loop back in"),
                ));
            }
        }
        Ok(())
    }

    fn validate_upstream_url(u: &Uri) -> Result<(), ConfigError> {
        if u.scheme_str() != Some("http") {
            return Err(invalid(
                "upstream",
                "must be an http:// URL (the app on loopback)",
            ));
        }
        let Some(authority) = u.authority() else {
            return Err(invalid("upstream", "must name a host and port"));
        };
        if authority.as_str().contains('@') {
            // Credentials in the URL would be sent nowhere (keyward adds no Authorization)
            // and would sit in config dumps and logs.
            return Err(invalid("upstream", "must not carry user:password@"));
        }
        if !matches!(u.path(), "" | "/") || u.query().is_some() {
            return Err(invalid("upstream", "must not carry a path or query"));
        }
        // `http::Uri` reads a port that is no number (`:3000O`, `:99999`) as none, which
        // would send every request, identity headers and all, to port 80.
        let after_host = authority
            .as_str()
            .rsplit_once(']')
            .map_or(authority.as_str(), |(_, rest)| rest);
        if after_host.contains(':') && authority.port_u16().is_none_or(|p| p == 0) {
            return Err(invalid(
                "upstream",
                "has a port that is not a number from 1 to 65535",
            ));
        }
        Ok(())
    }

    /// Each source reads a header or a parameter of its own: not one keyward uses for
    /// something else (the key would be logged, echoed or forwarded as that), not one
    /// another source reads too (every request with it would be ambiguous).
    fn validate_credentials(&self) -> Result<(), ConfigError> {
        if self.credentials.is_empty() {
            return Err(invalid(
                "credentials",
                "at least one credential source is required",
            ));
        }
        let prefix = &self.identity_headers.prefix;
        for (i, source) in self.credentials.iter().enumerate() {
            let field = format!("credentials[{i}]");
            if let Some(j) = self.credentials[..i]
                .iter()
                .position(|s| same_source(s, source))
            {
                return Err(invalid(field, format!("repeats credentials[{j}]")));
            }
            let header = match source {
                CredentialSource::Query { name } => {
                    let plain = name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
                    if !plain {
                        return Err(invalid(
                            format!("{field}.query"),
                            "a parameter name is letters, digits, '-', '.', '_' and '~'",
                        ));
                    }
                    continue;
                }
                CredentialSource::Header { header } | CredentialSource::Scheme { header, .. } => {
                    header
                }
            };
            let name = header.as_str();
            if let Some(why) = taken_for_credential(name) {
                return Err(invalid(
                    format!("{field}.header"),
                    format!("`{name}` {why}; read the key from a header of its own"),
                ));
            }
            if alias_starts_with(name, prefix) {
                return Err(invalid(
                    format!("{field}.header"),
                    format!(
                        "`{name}` starts with identity_headers.prefix, whose headers are stripped"
                    ),
                ));
            }
            let same = |h: &http::HeaderName| same_name(h.as_str(), name);
            let whole = |s: &CredentialSource| matches!(s, CredentialSource::Header { header: h } if same(h));
            let by_scheme = |s: &CredentialSource| matches!(s, CredentialSource::Scheme { header: h, .. } if same(h));
            if self.credentials.iter().any(whole) && self.credentials.iter().any(by_scheme) {
                return Err(invalid(
                    format!("{field}.header"),
                    format!("`{name}` is read both whole and by scheme, so every request with it would be ambiguous"),
                ));
            }
        }
        Ok(())
    }

    /// `allow_override_headers` lets routing overrides through, which keyward would strip;
    /// any other name there does nothing, and a reader would believe it does.
    fn validate_allowed_overrides(&self) -> Result<(), ConfigError> {
        for (i, name) in self.allow_override_headers.iter().enumerate() {
            if !OVERRIDES.iter().any(|o| alias_eq(name.as_str(), o)) {
                return Err(invalid(
                    format!("allow_override_headers[{i}]"),
                    format!(
                        "`{name}` is not a routing override keyward strips (those are {})",
                        OVERRIDES.join(", ")
                    ),
                ));
            }
            if UNAUTHORIZABLE.iter().any(|o| alias_eq(name.as_str(), o)) {
                return Err(invalid(
                    format!("allow_override_headers[{i}]"),
                    format!(
                        "`{name}` makes the app serve a path keyward cannot authorize; it is always removed"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The identity prefix names headers keyward strips from every request and sets
    /// itself: it ends in `-` (so its names read as `<prefix>subject-id`) and claims no
    /// header a client, an app or keyward uses for something else.
    fn validate_identity_prefix(&self) -> Result<(), ConfigError> {
        let p = &self.identity_headers.prefix;
        let shaped = p.len() >= 2
            && p.ends_with('-')
            && p.starts_with(|c: char| c.is_ascii_lowercase())
            && !p.contains("--")
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !shaped {
            return Err(invalid(
                "identity_headers.prefix",
                "must be lowercase letters, digits and '-', ending in '-', like x-auth-",
            ));
        }
        // A credential header under the prefix is the credential's own error.
        if let Some(name) = claimed_by_prefix(p, &[]) {
            return Err(invalid(
                "identity_headers.prefix",
                format!("{p:?} would claim `{name}`, which every request would lose; pick one of its own, like x-auth-"),
            ));
        }
        if self
            .identity_headers
            .include
            .as_ref()
            .is_some_and(Vec::is_empty)
        {
            return Err(invalid(
                "identity_headers.include",
                "list at least one identity header (leave include out to send them all)",
            ));
        }
        Ok(())
    }

    pub(super) fn validate_cluster(&self) -> Result<(), ConfigError> {
        self.cluster.as_ref().map_or(Ok(()), |c| c.validate())
    }
}

/// Two paths that name one file: equal as written, or by their canonical paths (through
/// symlinks and `..`), or the state file's symlink target being the other (which may not
/// exist yet).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    let canon = |p: &std::path::Path| {
        std::fs::canonicalize(p).ok().or_else(|| {
            let link = std::fs::read_link(p).ok()?;
            let target = p.parent().unwrap_or(std::path::Path::new(".")).join(link);
            let dir = std::fs::canonicalize(target.parent()?).ok()?;
            Some(dir.join(target.file_name()?))
        })
    };
    a == b || matches!((canon(a), canon(b)), (Some(x), Some(y)) if x == y)
}
