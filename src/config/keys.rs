//! `keys`: where snapshots come from and the guard on new ones (SPEC 16).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::yaml::{de_duration, de_opt_duration, one_second};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub control: Option<ControlConfig>,
    /// File source: every snapshot accepted from `file` is kept here too (written
    /// atomically), and a start whose `file` is refused (invalid, or held back by the
    /// guard against this one) loads this one: what was accepted survives a restart
    /// (SPEC 5). The control source keeps its own in `control.state_file`.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
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
