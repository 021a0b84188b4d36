//! The small sections: `decision`, `tls`, `identity_headers`, `admin`, `log`, `metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::yaml::{de_duration, one_second};
use crate::keys::IdentityField;

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
    /// PEM certificate revocation lists of the `client_ca` authorities: a client whose
    /// certificate, or an intermediate of whose chain, one of them lists is refused, and one
    /// a certificate of whose chain has no list from its issuer is refused too (an unknown
    /// status is not a good one). Watched and reloaded with the rest.
    #[serde(default)]
    pub client_crl: Option<PathBuf>,
    /// The most intermediates a client may send with its certificate (1 to 8): a longer
    /// chain is refused before any path is built from it (see `tls::chain`).
    #[serde(default = "default_client_verify_depth")]
    pub client_verify_depth: u8,
    /// How often the certificate files are checked for rotation.
    #[serde(default = "one_second", deserialize_with = "de_duration")]
    pub poll_interval: Duration,
}

fn default_client_verify_depth() -> u8 {
    crate::tls::DEFAULT_VERIFY_DEPTH
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaders {
    pub prefix: String,
    pub echo_to_client: bool,
    /// The identity headers the app uses (suffixes: `subject-id`, `key-id`, ...); only
    /// those are sent. Absent: all of them. Inbound `<prefix>*` headers are stripped either way.
    pub include: Option<Vec<IdentityField>>,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        Self {
            prefix: "x-auth-".into(),
            echo_to_client: false,
            include: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// SHA-256 (hex) of the control API bearer token. Absent: the control API refuses all.
    pub token_sha256: Option<String>,
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
