//! `keyward.yaml` → [`Config`]: parsed once at the edge, then checked by [`Config::validate`].
//!
//! serde_yaml is deprecated upstream, so it is only ever called from [`parse_yaml`]: swapping
//! it for a maintained YAML crate touches this one function.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::keys::PrincipalType;

/// A config problem, always naming the field it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Deserialize YAML (JSON is a subset) reporting the dotted path of a failing field.
pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| located(e.path(), e.inner()))
}

/// An error message led by where in the document it is (`keys[3].scopes: ...`), once:
/// serde_yaml's own message often starts with the same path already. Where its path is
/// shorter (custom errors, unknown fields), the exact one goes first.
pub fn located(path: &serde_path_to_error::Path, e: &impl std::fmt::Display) -> String {
    let path = path.to_string();
    let message = e.to_string();
    let named = message
        .split_once(": ")
        .is_some_and(|(head, _)| head == path);
    if path.is_empty() || path == "." || named {
        message
    } else {
        format!("{path}: {message}")
    }
}

/// More worker threads than this is a typo, not a machine: each one holds a runtime, a
/// listener and an upstream pool.
pub const MAX_WORKERS: usize = 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The proxy listener; optional when `decision.listen` is set (SPEC 15).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de_opt_uri")]
    pub upstream: Option<Uri>,
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    pub environment: String,
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Route, method and host override headers (`X-HTTP-Method-Override`, ...) the app
    /// relies on and may receive; every other one is removed.
    #[serde(default, deserialize_with = "de_header_names")]
    pub allow_override_headers: Vec<HeaderName>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default = "default_credentials")]
    pub credentials: Vec<CredentialSource>,
    #[serde(default)]
    pub forward_credential: bool,
    pub keys: KeysConfig,
    #[serde(default)]
    pub prefixes: BTreeMap<String, Vec<PrincipalType>>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<ScopeRule>,
    #[serde(default)]
    pub routes: Vec<RouteRule>,
    /// Match route rules ignoring ASCII case, for upstreams that route that way (Express,
    /// ASP.NET Core), so `/ADMIN/x` cannot pass a rule for `/admin/`.
    #[serde(default)]
    pub routes_case_insensitive: bool,
    #[serde(default = "default_introspection")]
    pub introspection_path: Option<String>,
    #[serde(default)]
    pub identity_headers: IdentityHeaders,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub shutdown: Shutdown,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Worker threads serving traffic (thread per core); default: one per CPU.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Decision mode (SPEC 15): answer an existing proxy's auth question.
    #[serde(default)]
    pub decision: Option<DecisionConfig>,
    /// Shared state for a fleet of replicas (SPEC 14); off when absent.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionConfig {
    /// The decision listener (`/v1/decide/...`).
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// How often the certificate files are checked for rotation.
    #[serde(default = "one_second", deserialize_with = "de_duration")]
    pub poll_interval: Duration,
}

/// Where a credential is read from: `{header, scheme?}` or `{query}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawCredentialSource")]
pub enum CredentialSource {
    /// `Authorization: <scheme> <key>`-style header (scheme compared case-insensitively).
    Scheme { header: HeaderName, scheme: String },
    /// The whole header value is the key (`X-API-KEY`).
    Header { header: HeaderName },
    /// A query parameter (off by default: query strings end up in logs).
    Query { name: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentialSource {
    header: Option<String>,
    scheme: Option<String>,
    query: Option<String>,
}

impl TryFrom<RawCredentialSource> for CredentialSource {
    type Error = String;
    fn try_from(raw: RawCredentialSource) -> Result<Self, String> {
        match (raw.header, raw.scheme, raw.query) {
            (Some(h), scheme, None) => {
                let header = HeaderName::try_from(h.to_ascii_lowercase())
                    .map_err(|_| format!("header: {h:?} is not a valid header name"))?;
                match scheme {
                    Some(s) if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                        Err(format!("scheme: {s:?} must be a single word"))
                    }
                    Some(scheme) => Ok(Self::Scheme { header, scheme }),
                    None => Ok(Self::Header { header }),
                }
            }
            (None, None, Some(q)) if !q.is_empty() => Ok(Self::Query { name: q }),
            _ => Err(
                "exactly one of `header` (with optional `scheme`) or `query` is required".into(),
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub control: Option<ControlConfig>,
    /// How often the file's content hash is checked.
    #[serde(default = "one_second", deserialize_with = "de_duration")]
    pub poll_interval: Duration,
    /// The blast-radius guard on new snapshots (SPEC 16).
    #[serde(default)]
    pub guard: GuardConfig,
    /// A snapshot whose `generated_at` is older than this fails closed (SPEC 16).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_age: Option<Duration>,
}

/// `keys.guard`: a new snapshot that removes or disables more than `max_removed_fraction`
/// of the keys in force (when at least `min_keys` are) is refused unless forced.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    pub max_removed_fraction: f64,
    pub min_keys: usize,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            max_removed_fraction: 0.5,
            min_keys: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    pub state_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeRule {
    #[serde(deserialize_with = "de_methods")]
    pub methods: Vec<Method>,
    pub any_of: Vec<String>,
}

/// A path rule. Exactly one of `path` (exact match) or `prefix`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub any_of: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaders {
    pub prefix: String,
    pub echo_to_client: bool,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        Self {
            prefix: "x-auth-".into(),
            echo_to_client: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// SHA-256 (hex) of the control API bearer token. Absent: the control API refuses all.
    pub token_sha256: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// How long a connection that has served a request may sit with none in flight.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub upstream_connect_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub upstream_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    #[serde(deserialize_with = "de_duration")]
    pub upstream_idle_timeout: Duration,
    pub upstream_max_idle_per_host: usize,
    /// How long a response may wait for the client to take its next bytes (HTTP/2 flow
    /// control window, or an unread HTTP/1.1 socket) before it is cut off.
    #[serde(deserialize_with = "de_duration")]
    pub write_stall_timeout: Duration,
    /// How long an upgraded (WebSocket) tunnel may move no byte either way before it is
    /// closed.
    #[serde(deserialize_with = "de_duration")]
    pub tunnel_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            // nginx's keepalive_timeout: longer than the 60 s idle timeout of common load
            // balancers, so the client side closes first.
            idle_timeout: Duration::from_secs(75),
            upstream_connect_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            h2_max_concurrent_streams: 256,
            upstream_idle_timeout: Duration::from_secs(60),
            upstream_max_idle_per_host: 256,
            write_stall_timeout: Duration::from_secs(30),
            tunnel_idle_timeout: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    #[serde(deserialize_with = "de_duration")]
    pub drain_delay: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub grace: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            drain_delay: Duration::from_secs(5),
            grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Export `keyward_key_expiry_timestamp_seconds{key_id}` (one series per key).
    pub per_key: bool,
    /// At most this many of those series: the keys expiring soonest.
    pub per_key_limit: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            per_key: false,
            per_key_limit: 1000,
        }
    }
}

/// `cluster` (SPEC 14): where replicas share rate limits, revocations and usage.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` (TLS); credentials in the URL or `KEYWARD_REDIS_URL`.
    pub redis: String,
    /// Every Redis key keyward writes starts with it.
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
    /// One Redis call; past it the call has failed.
    #[serde(default = "default_cluster_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_error: OnError,
}

impl ClusterConfig {
    fn with_url(redis: String) -> Self {
        Self {
            redis,
            prefix: default_cluster_prefix(),
            timeout: default_cluster_timeout(),
            on_error: OnError::default(),
        }
    }
}

/// The URL may hold a password: `Debug` leaves it out.
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

/// What a rate-limited key gets while Redis is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Enforce the limit per replica.
    #[default]
    Local,
    /// 503 `auth_unavailable`.
    Deny,
}

fn default_cluster_prefix() -> String {
    "keyward:".into()
}

fn default_cluster_timeout() -> Duration {
    Duration::from_millis(50)
}

/// An IP network for `trusted_proxies`: `10.0.0.0/8`, `::1/128` or a bare address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (s.as_str(), None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Self { addr, bits })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

/// `Authorization: Token`, `Authorization: Bearer`, then `X-API-KEY` (SPEC 2's default).
pub fn default_credentials() -> Vec<CredentialSource> {
    let auth = HeaderName::from_static("authorization");
    vec![
        CredentialSource::Scheme {
            header: auth.clone(),
            scheme: "Token".into(),
        },
        CredentialSource::Scheme {
            header: auth,
            scheme: "Bearer".into(),
        },
        CredentialSource::Header {
            header: HeaderName::from_static("x-api-key"),
        },
    ]
}

fn default_scopes() -> Vec<ScopeRule> {
    vec![
        ScopeRule {
            methods: vec![Method::GET, Method::HEAD, Method::OPTIONS],
            any_of: vec!["read".into(), "write".into()],
        },
        ScopeRule {
            methods: vec![Method::POST, Method::PUT, Method::PATCH, Method::DELETE],
            any_of: vec!["write".into()],
        },
    ]
}

fn default_introspection() -> Option<String> {
    Some("/auth".into())
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

/// `10s`, `250ms`, `1m 30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 10s or 250ms ({e})"))
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

fn de_uri<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Uri, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<Uri>()
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a URL ({e})")))
}

fn de_header_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<HeaderName>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|n| {
            HeaderName::try_from(n.to_ascii_lowercase())
                .map_err(|_| serde::de::Error::custom(format!("{n:?} is not a header name")))
        })
        .collect()
}

fn de_opt_uri<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Uri>, D::Error> {
    de_uri(d).map(Some)
}

fn de_methods<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Method>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| serde::de::Error::custom(format!("{m:?} is not an HTTP method")))
        })
        .collect()
}

impl Config {
    /// Read, parse and validate a config file. Relative paths inside it (such as
    /// `keys.file`) are relative to the working directory, like the shipped example.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_yaml(&text)?;
        config.redis_url_from_env(std::env::var("KEYWARD_REDIS_URL").ok())?;
        Ok(config)
    }

    /// `KEYWARD_REDIS_URL` (credentials stay out of the config file): replaces
    /// `cluster.redis`, or turns `cluster` on with its defaults. Empty means unset.
    pub fn redis_url_from_env(&mut self, url: Option<String>) -> Result<(), ConfigError> {
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
            return Ok(());
        };
        match &mut self.cluster {
            Some(c) => c.redis = url,
            None => self.cluster = Some(ClusterConfig::with_url(url)),
        }
        self.validate_cluster()
    }

    /// Parse and validate config text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = parse_yaml(text).map_err(ConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// Every rule that serde cannot express. Errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_upstream()?;
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
        self.validate_scopes()?;
        self.validate_routes()?;
        if let Some(p) = &self.introspection_path {
            check_route_path("introspection_path", p)?;
        }
        self.validate_identity_prefix()?;
        if let Some(t) = &self.admin.token_sha256 {
            if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("admin.token_sha256", "must be 64 hex characters"));
            }
        }
        self.validate_limits()?;
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

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        // Never echo the URL: it may hold a password.
        let rest = ["redis://", "rediss://"].iter().find_map(|scheme| {
            let head = c.redis.get(..scheme.len())?;
            head.eq_ignore_ascii_case(scheme)
                .then(|| &c.redis[scheme.len()..])
        });
        if rest.map_or(true, str::is_empty) {
            return Err(invalid(
                "cluster.redis",
                "must be a redis:// or rediss:// URL with a host",
            ));
        }
        if c.timeout.is_zero() {
            return Err(invalid("cluster.timeout", "must be greater than zero"));
        }
        if c.prefix.is_empty() || c.prefix.contains(['{', '}']) {
            return Err(invalid(
                "cluster.prefix",
                "must not be empty nor contain `{` or `}`",
            ));
        }
        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), ConfigError> {
        match (self.listen, &self.upstream, &self.decision) {
            (Some(_), Some(u), _) => Self::validate_upstream_url(u),
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

    fn validate_scopes(&self) -> Result<(), ConfigError> {
        for (i, rule) in self.scopes.iter().enumerate() {
            if rule.methods.is_empty() {
                return Err(invalid(format!("scopes[{i}].methods"), "must not be empty"));
            }
            if rule.any_of.is_empty() {
                return Err(invalid(format!("scopes[{i}].any_of"), "must not be empty"));
            }
        }
        Ok(())
    }

    fn validate_routes(&self) -> Result<(), ConfigError> {
        for (i, r) in self.routes.iter().enumerate() {
            let field = format!("routes[{i}]");
            match (&r.path, &r.prefix) {
                (Some(p), None) => check_route_path(&format!("{field}.path"), p)?,
                (None, Some(p)) => check_route_path(&format!("{field}.prefix"), p)?,
                _ => return Err(invalid(field, "set exactly one of `path` or `prefix`")),
            }
            if r.public && !r.any_of.is_empty() {
                return Err(invalid(
                    format!("{field}.any_of"),
                    "a public route takes no scopes",
                ));
            }
            if !r.public && r.any_of.is_empty() {
                return Err(invalid(field, "set `public: true` or a non-empty `any_of`"));
            }
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
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let durations = [
            ("limits.header_read_timeout", l.header_read_timeout),
            ("limits.idle_timeout", l.idle_timeout),
            (
                "limits.upstream_connect_timeout",
                l.upstream_connect_timeout,
            ),
            ("limits.upstream_timeout", l.upstream_timeout),
            ("limits.write_stall_timeout", l.write_stall_timeout),
            ("limits.tunnel_idle_timeout", l.tunnel_idle_timeout),
        ];
        for (field, d) in durations {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        if l.max_header_bytes < 1024 {
            return Err(invalid("limits.max_header_bytes", "must be at least 1024"));
        }
        let counts = [
            ("limits.max_headers", l.max_headers),
            ("limits.max_connections", l.max_connections),
            (
                "limits.h2_max_concurrent_streams",
                l.h2_max_concurrent_streams as usize,
            ),
        ];
        for (field, n) in counts {
            if n == 0 {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        Ok(())
    }
}

fn check_route_path(field: &str, p: &str) -> Result<(), ConfigError> {
    let normalized = crate::auth::path::normalize(p).ok();
    if !p.starts_with('/') || normalized.as_deref() != Some(p) {
        return Err(invalid(
            field,
            format!("{p:?} must be an absolute, already-normalized path"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listen: 127.0.0.1:8080\nupstream: http://127.0.0.1:3000\nenvironment: test\nkeys: { file: k.yaml }\n";

    fn err(extra: &str) -> String {
        Config::from_yaml(&format!("{MINIMAL}{extra}"))
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn shipped_example_is_valid() {
        let c = Config::from_yaml(include_str!("../config/keyward.yaml")).unwrap();
        assert_eq!(c.environment, "production");
        assert_eq!(c.credentials.len(), 3);
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.prefixes["sta_"], vec![PrincipalType::ServiceAccount]);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.introspection_path.as_deref(), Some("/auth"));
        assert_eq!(c.identity_headers.prefix, "x-auth-");
        assert_eq!(c.admin_listen.port(), 9901);
        assert_eq!(c.scopes.len(), 2);
    }

    #[test]
    fn unknown_field_is_named() {
        assert!(err("colour: blue\n").contains("colour"));
        assert!(err("limits: { max_header_byte: 1 }\n").contains("max_header_byte"));
    }

    #[test]
    fn bad_duration_names_field() {
        let e = err("limits: { upstream_timeout: soon }\n");
        assert!(e.contains("limits.upstream_timeout"), "{e}");
        assert_eq!(
            e.matches("limits.upstream_timeout").count(),
            1,
            "named once: {e}"
        );
        let e = err("limits: { max_connections: -3 }\n");
        assert!(e.starts_with("limits.max_connections: invalid type"), "{e}");
        let e = err("log: { bogus: 1 }\n");
        assert!(
            e.starts_with("log.bogus: log: unknown field `bogus`"),
            "{e}"
        );
        assert_eq!(
            Config::from_yaml(&format!("{MINIMAL}shutdown: {{ drain_delay: 250ms }}\n"))
                .unwrap()
                .shutdown
                .drain_delay,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn missing_required_field_is_named() {
        let e = Config::from_yaml("listen: 127.0.0.1:1\nupstream: http://a:1\nkeys: {file: k}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("environment"), "{e}");
    }

    #[test]
    fn upstream_must_be_plain_http_without_path() {
        let base = "listen: 127.0.0.1:8080\nenvironment: t\nkeys: { file: k }\n";
        for u in [
            "https://a:1",
            "http://a:1/app",
            "ftp://a",
            "http://user:pw@a:1",
        ] {
            let e = Config::from_yaml(&format!("{base}upstream: {u}\n")).unwrap_err();
            assert!(e.to_string().starts_with("upstream"), "{u}: {e}");
            assert!(!e.to_string().contains("pw"), "no secret echoed: {e}");
        }
    }

    #[test]
    fn credential_sources_are_checked() {
        assert!(err("credentials: [{ scheme: Token }]\n").contains("credentials[0]"));
        assert!(err("credentials: [{ header: authorization, query: k }]\n").contains("credentials"));
        assert!(err("credentials: []\n").contains("credentials"));
        let c =
            Config::from_yaml(&format!("{MINIMAL}credentials: [{{ query: api_key }}]\n")).unwrap();
        assert_eq!(
            c.credentials[0],
            CredentialSource::Query {
                name: "api_key".into()
            }
        );
    }

    #[test]
    fn routes_are_checked() {
        assert!(err("routes: [{ path: /a, prefix: /b, public: true }]\n").contains("routes[0]"));
        assert!(err("routes: [{ path: /a }]\n").contains("routes[0]"));
        assert!(
            err("routes: [{ path: /a, public: true, any_of: [x] }]\n").contains("routes[0].any_of")
        );
        assert!(err("routes: [{ prefix: /a/../b, any_of: [x] }]\n").contains("routes[0].prefix"));
        assert!(err("routes: [{ prefix: admin, any_of: [x] }]\n").contains("routes[0].prefix"));
    }

    #[test]
    fn scopes_methods_and_prefixes_are_checked() {
        assert!(err("scopes: [{ methods: [GET], any_of: [] }]\n").contains("scopes[0].any_of"));
        assert!(
            err("scopes: [{ methods: [\"G T\"], any_of: [r] }]\n").contains("scopes[0].methods")
        );
        assert!(err("prefixes: { sta_: [robot] }\n").contains("prefixes"));
        assert!(err("prefixes: { sta_: [] }\n").contains("prefixes.sta_"));
    }

    #[test]
    fn admin_identity_and_limits_are_checked() {
        assert!(err("admin: { token_sha256: abc }\n").contains("admin.token_sha256"));
        assert!(err("identity_headers: { prefix: X_Auth }\n").contains("identity_headers.prefix"));
        assert!(err("limits: { max_connections: 0 }\n").contains("limits.max_connections"));
        assert!(err("limits: { max_header_bytes: 10 }\n").contains("limits.max_header_bytes"));
        let stall = err("limits: { write_stall_timeout: 0s }\n");
        assert!(stall.starts_with("limits.write_stall_timeout: "), "{stall}");
        assert!(err("log: { level: loud }\n").contains("log.level"));
        assert!(err("log: { format: xml }\n").contains("log.format"));
        assert!(err("environment: \"\"\n").contains("environment"));
        assert!(err("workers: 0\n").contains("workers"));
        assert!(err("workers: 100000\n").contains("workers: must be 1 to 1024"));
        let zero = err("tls: { cert: c.pem, key: k.pem, poll_interval: 0s }\n");
        assert!(zero.starts_with("tls.poll_interval: "), "{zero}");
    }

    /// The error for MINIMAL with `keys: { file: k.yaml, <extra> }`.
    fn err_keys(extra: &str) -> String {
        let text = MINIMAL.replace(
            "keys: { file: k.yaml }",
            &format!("keys: {{ file: k.yaml, {extra} }}"),
        );
        Config::from_yaml(&text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn guard_fraction_must_be_in_zero_one() {
        let e = err_keys("guard: { max_removed_fraction: 0 }");
        assert!(e.starts_with("keys.guard.max_removed_fraction"), "{e}");
        let e = err_keys("guard: { max_removed_fraction: 1.5 }");
        assert!(e.starts_with("keys.guard.max_removed_fraction"), "{e}");
        let c = Config::from_yaml(&MINIMAL.replace(
            "keys: { file: k.yaml }",
            "keys: { file: k.yaml, guard: { max_removed_fraction: 1, min_keys: 0 } }",
        ))
        .unwrap();
        assert_eq!(c.keys.guard.max_removed_fraction, 1.0);
        assert_eq!(c.keys.guard.min_keys, 0);
        let defaults = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(defaults.keys.guard, GuardConfig::default());
        assert_eq!(defaults.metrics.per_key_limit, 1000);
        assert!(defaults.keys.max_age.is_none());
    }

    #[test]
    fn guard_min_keys_must_not_be_negative() {
        let e = err_keys("guard: { min_keys: -1 }");
        assert!(e.starts_with("keys.guard.min_keys"), "{e}");
    }

    #[test]
    fn max_age_must_be_a_positive_duration() {
        let e = err_keys("max_age: 0s");
        assert!(e.starts_with("keys.max_age"), "{e}");
        let e = err_keys("max_age: soon");
        assert!(e.starts_with("keys.max_age"), "{e}");
        let c = Config::from_yaml(&MINIMAL.replace(
            "keys: { file: k.yaml }",
            "keys: { file: k.yaml, max_age: 6h }",
        ))
        .unwrap();
        assert_eq!(c.keys.max_age, Some(Duration::from_secs(6 * 3600)));
    }

    #[test]
    fn per_key_limit_must_be_positive() {
        let e = err("metrics: { per_key: true, per_key_limit: 0 }\n");
        assert!(e.starts_with("metrics.per_key_limit"), "{e}");
    }

    #[test]
    fn override_headers_to_allow_are_header_names() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}allow_override_headers: [X-HTTP-Method-Override]\n"
        ))
        .unwrap();
        assert_eq!(c.allow_override_headers, ["x-http-method-override"]);
        assert!(err("allow_override_headers: [\"a b\"]\n").contains("allow_override_headers"));
    }

    #[test]
    fn keys_need_a_source() {
        let e = Config::from_yaml(
            "listen: 127.0.0.1:1\nupstream: http://a:1\nenvironment: t\nkeys: {}\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("keys"), "{e}");
    }

    #[test]
    fn decision_mode_makes_the_proxy_optional() {
        let base = "environment: t\nkeys: { file: k }\n";
        let c =
            Config::from_yaml(&format!("{base}decision: {{ listen: 127.0.0.1:9002 }}\n")).unwrap();
        assert_eq!(c.decision.unwrap().listen.port(), 9002);
        assert!(c.listen.is_none() && c.upstream.is_none());
        let both = format!("{MINIMAL}decision: {{ listen: 127.0.0.1:9002 }}\n");
        assert!(Config::from_yaml(&both).unwrap().listen.is_some());
        let e = Config::from_yaml(base).unwrap_err().to_string();
        assert!(
            e.starts_with("listen: ") && e.contains("decision.listen"),
            "{e}"
        );
        let e = Config::from_yaml(&format!("{base}listen: 127.0.0.1:1\n")).unwrap_err();
        assert!(e.to_string().starts_with("upstream: "), "{e}");
        let e = Config::from_yaml(&format!("{base}upstream: http://a:1\n")).unwrap_err();
        assert!(e.to_string().starts_with("listen: "), "{e}");
        let e = err("decision: { listen: 127.0.0.1:1, port: 2 }\n");
        assert!(e.contains("port"), "{e}");
        let e = err("decision: {}\n");
        assert!(e.contains("decision") && e.contains("listen"), "{e}");
    }

    #[test]
    fn cidr_matching() {
        let net = Cidr::try_from("10.0.0.0/8".to_string()).unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let one = Cidr::try_from("::1".to_string()).unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(Cidr::try_from("10.0.0.0/33".to_string()).is_err());
        let all = Cidr::try_from("0.0.0.0/0".to_string()).unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn cluster_defaults_rules_and_env_override() {
        let c = Config::from_yaml(&format!(
            "{MINIMAL}cluster: {{ redis: \"redis://r:6379/0\" }}\n"
        ))
        .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(
            (cl.prefix.as_str(), cl.timeout, cl.on_error),
            ("keyward:", Duration::from_millis(50), OnError::Local)
        );
        assert!(err("cluster: { redis: \"http://r:1\" }\n").starts_with("cluster.redis: "));
        assert!(err("cluster: { redis: \"rediss://\" }\n").starts_with("cluster.redis: "));
        let zero = err("cluster: { redis: \"redis://r\", timeout: 0s }\n");
        assert!(zero.starts_with("cluster.timeout: "), "{zero}");
        assert!(err("cluster: { redis: \"redis://r\", on_error: open }\n").contains("on_error"));
        assert!(
            err("cluster: { redis: \"redis://r\", prefix: \"\" }\n").starts_with("cluster.prefix")
        );
        // The URL (it may hold a password) is never in an error or in Debug.
        let secret = err("cluster: { redis: \"http://:hunter2@r\" }\n");
        assert!(!secret.contains("hunter2"), "{secret}");
        let mut c = Config::from_yaml(MINIMAL).unwrap();
        c.redis_url_from_env(Some(String::new())).unwrap();
        assert!(c.cluster.is_none(), "an empty variable is unset");
        c.redis_url_from_env(Some("rediss://:pw@r:6380".into()))
            .unwrap();
        let cl = c.cluster.as_ref().unwrap();
        assert_eq!(cl.redis, "rediss://:pw@r:6380");
        assert!(!format!("{cl:?}").contains("pw"));
        assert!(c.redis_url_from_env(Some("tcp://r".into())).is_err());
    }
}
