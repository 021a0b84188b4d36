//! `keyward.yaml` → [`Config`]: parsed once at the edge, then checked by [`Config::validate`].
//!
//! One file per concern, all re-exported here so `crate::config::X` names every type:
//! [`yaml`] parses (the only caller of serde_yaml), [`redact`] makes parser messages fit to
//! show (no value from the document, no line break), [`error`] is [`ConfigError`], `validate`
//! holds [`Config::validate`]'s cross-field rules in the order they are reported, and each
//! section has its own file: [`credentials`], [`keys`], [`rules`] (`scopes`, `routes`),
//! [`limits`] (`limits`, `shutdown`), [`cluster`], [`cidr`] (`trusted_proxies`) and
//! [`sections`] (the small ones).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use http::HeaderName;
use serde::Deserialize;

use crate::keys::PrincipalType;

pub mod cidr;
pub mod cluster;
pub mod credentials;
pub mod error;
pub mod keys;
pub mod limits;
pub mod redact;
pub mod rules;
pub mod sections;
pub mod upstream;
mod validate;
pub mod yaml;

pub use cidr::Cidr;
pub use cluster::{ClusterConfig, OnError};
pub use credentials::{default_credentials, CredentialSource};
pub use error::ConfigError;
pub use keys::{ControlConfig, GuardConfig, KeysConfig};
pub use limits::{Limits, Shutdown};
pub use redact::{excerpt, redact, MAX_ERROR_CHARS};
pub use rules::{RouteRule, ScopeRule};
pub use sections::{
    AdminConfig, DecisionConfig, IdentityHeaders, LogConfig, LogFormat, MetricsConfig, TlsConfig,
};
pub use upstream::{Http1Server, UpstreamAddr, UpstreamClient};
pub use yaml::{located, parse_duration, parse_yaml, YamlError};

use yaml::de_header_names;

/// More worker threads than this is a typo, not a machine: each one holds a runtime, a
/// listener and an upstream pool.
pub const MAX_WORKERS: usize = 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The proxy listener; optional when `decision.listen` is set (SPEC 15).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// `http://host:port` or `unix:/abs/path.sock`.
    #[serde(default)]
    pub upstream: Option<UpstreamAddr>,
    /// Which HTTP/1.1 client speaks to the upstream for requests without a body.
    #[serde(default)]
    pub upstream_client: UpstreamClient,
    /// Keep the upstream connection after a request with a body (POST, PUT, PATCH): only
    /// for an app that reads or drains every body it answers; off, the connection closes
    /// after each one, so a body the app never read cannot become a request at the app.
    #[serde(default)]
    pub upstream_reuse_after_body: bool,
    /// Acknowledge what the app sent as a connection goes back to the pool
    /// (`TCP_QUICKACK`), so a second answer the app wrote to one request, held by Nagle
    /// until then, arrives while the connection is idle (and the connection is dropped)
    /// rather than as the next client's answer. Costs an ACK a request (about 3.5 µs of
    /// kernel CPU on loopback): off only for an app known to answer each request once.
    #[serde(default = "yes")]
    pub upstream_ack_at_once: bool,
    /// Let a pooled upstream connection carry requests of different keys. Off (the
    /// default), a connection serves one key (or only requests without one): an app that
    /// answers a request twice, the second answer written after the connection went back
    /// to the pool, answers the next request on it with it, and no check before reuse can
    /// see an answer not yet written. Kept to one key, a stray answer reaches that key's
    /// own next request, never another key's or a client's without a key.
    #[serde(default)]
    pub upstream_reuse_across_keys: bool,
    /// Which server reads HTTP/1.1 requests on the proxy and decision listeners.
    #[serde(default)]
    pub http1_server: Http1Server,
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// A listener of its own for `/healthz` and `/readyz` alone (the kubelet's probes), so
    /// clients of `/metrics` and the control API never crowd the probes out.
    #[serde(default)]
    pub probe_listen: Option<SocketAddr>,
    pub environment: String,
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Route, method and host override headers (`X-HTTP-Method-Override`, ...) the app
    /// relies on and may receive; every other one is removed.
    #[serde(default, deserialize_with = "de_header_names")]
    pub allow_override_headers: Vec<HeaderName>,
    /// What becomes of a request header whose name holds `_` or punctuation other than `-`.
    #[serde(default)]
    pub headers_with_underscores: HeadersWithUnderscores,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default = "default_credentials")]
    pub credentials: Vec<CredentialSource>,
    #[serde(default)]
    pub forward_credential: bool,
    pub keys: KeysConfig,
    #[serde(default, deserialize_with = "yaml::de_unique_map")]
    pub prefixes: BTreeMap<String, Vec<PrincipalType>>,
    #[serde(default = "rules::default_scopes")]
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

/// `headers_with_underscores`: no client, browser or proxy spells a header `SCRIPT_NAME`
/// or `X.Forwarded.Host`, but backends read such names as something else: CGI/WSGI and
/// nginx read `_` and `.` as `-` (an alias of a header keyward strips), and gunicorn takes
/// `SCRIPT_NAME` and `PATH_INFO` from its loopback peer as the path to serve. `drop`, the
/// default (nginx's `underscores_in_headers off`, Envoy's `DROP_HEADER`), removes every such
/// name before forwarding; `forward` passes on those keyward does not strip by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadersWithUnderscores {
    #[default]
    Drop,
    Forward,
}

fn yes() -> bool {
    true
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

fn default_introspection() -> Option<String> {
    Some("/auth".into())
}

/// Largest config file read: a config is a page of YAML.
const CONFIG_MAX_BYTES: u64 = 4 * 1024 * 1024;

impl Config {
    /// Read, parse and validate a config file. Relative paths inside it (such as
    /// `keys.file`) are relative to the working directory, like the shipped example.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let bytes = crate::regular_file::read(path, CONFIG_MAX_BYTES).map_err(read_err)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.utf8_error(),
            ))
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
        let cluster = self
            .cluster
            .get_or_insert_with(|| ClusterConfig::with_url(String::new()));
        cluster.redis = url;
        cluster.redis_from_env = true;
        // The value came from the environment, not the file: say so.
        self.validate_cluster().map_err(|e| match e {
            ConfigError::Invalid { field, reason } if field == "cluster.redis" => {
                error::invalid("KEYWARD_REDIS_URL (cluster.redis)", reason)
            }
            other => other,
        })
    }

    /// Parse and validate config text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        refuse_structure(text)?;
        let config: Config = parse_yaml(text)?;
        config.validate()?;
        Ok(config)
    }
}

/// The pass the key snapshot's text goes through too (`keys::nesting`), before the real
/// parse: nesting deeper than 64 levels (serde_yaml reads `[[[[…` in time quadratic in its
/// depth: 100,000 levels took a minute) and tags (serde_yaml ignores those it does not know,
/// and decodes `!!binary`) are refused, naming the path and the line.
fn refuse_structure(text: &str) -> Result<(), ConfigError> {
    let Err(refusal) = crate::keys::nesting::check_config(text.as_bytes()) else {
        return Ok(());
    };
    let reason = refusal.refused.reason("the config");
    let (field, reason) = match (refusal.refused.line_column(), refusal.path.is_empty()) {
        (Some((line, column)), true) => (format!("line {line} column {column}"), reason),
        (Some((line, column)), false) => (
            refusal.path,
            format!("{reason} (line {line} column {column})"),
        ),
        (None, _) => (refusal.path, reason),
    };
    Err(ConfigError::Refused { field, reason })
}

#[cfg(test)]
mod tests;
