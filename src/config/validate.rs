//! [`Config::validate`]: every rule serde cannot express, in a fixed order (the first
//! problem is the one reported). Errors name the field.

use http::Uri;

use super::error::{invalid, ConfigError};
use super::rules::{check_route_path, validate_routes, validate_scopes};
use super::upstream::{validate_unix_path, UpstreamAddr};
use super::{Config, MAX_WORKERS};

impl Config {
    /// Every rule that serde cannot express. Errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_upstream()?;
        self.validate_distinct_listeners()?;
        if self.environment.trim().is_empty() {
            return Err(invalid("environment", "must not be empty"));
        }
        if self.credentials.is_empty() {
            return Err(invalid(
                "credentials",
                "at least one credential source is required",
            ));
        }
        if self.keys.file.is_none() && self.keys.control.is_none() {
            return Err(invalid(
                "keys",
                "set `file` or `control.state_file` (or both) so keys can be loaded",
            ));
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
        validate_routes(&self.routes)?;
        if let Some(p) = &self.introspection_path {
            check_route_path("introspection_path", p)?;
        }
        self.validate_identity_prefix()?;
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
        let level = self.log.level.to_ascii_lowercase();
        let plain_level =
            ["trace", "debug", "info", "warn", "error", "off"].contains(&level.as_str());
        let directives = level.contains('=') || level.contains(',');
        if !(plain_level || directives) || tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a level", self.log.level),
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

    /// Two listeners on one address would fail to bind at start, after `check` said ok;
    /// the admin listener in particular must never share a port with traffic.
    fn validate_distinct_listeners(&self) -> Result<(), ConfigError> {
        let same = |a: std::net::SocketAddr, b: std::net::SocketAddr| a == b && a.port() != 0;
        let decision = self.decision.as_ref().map(|d| d.listen);
        if self.listen.is_some_and(|l| same(l, self.admin_listen)) {
            return Err(invalid("admin_listen", "must differ from `listen`"));
        }
        if decision.is_some_and(|d| same(d, self.admin_listen)) {
            return Err(invalid(
                "admin_listen",
                "must differ from `decision.listen`",
            ));
        }
        if let (Some(l), Some(d)) = (self.listen, decision) {
            if same(l, d) {
                return Err(invalid("decision.listen", "must differ from `listen`"));
            }
        }
        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), ConfigError> {
        match (self.listen, &self.upstream, &self.decision) {
            (Some(_), Some(UpstreamAddr::Http(u)), _) => Self::validate_upstream_url(u),
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
        Ok(())
    }

    fn validate_identity_prefix(&self) -> Result<(), ConfigError> {
        let p = &self.identity_headers.prefix;
        let ok = p.len() >= 2
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(invalid(
                "identity_headers.prefix",
                "must be lowercase letters, digits and '-', like x-auth-",
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
