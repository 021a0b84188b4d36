//! `keys`: where snapshots come from and the guard on new ones (SPEC 16).

use std::path::{Path, PathBuf};
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
    /// (SPEC 5). Left out, it is kept beside `file` when keyward may write there; `null`
    /// keeps nothing. The control source keeps its own in `control.state_file`.
    #[serde(default)]
    pub state_file: StateFileSetting,
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

/// `keys.state_file` as written. SPEC 5 promises that a restart never loses what a reload
/// accepted, so leaving the field out keeps the snapshot where the key file already is
/// trusted to be: its own directory. Only an explicit `null` keeps nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StateFileSetting {
    /// Left out: `<keys.file>.kept`, when that directory can be written and locked;
    /// otherwise nothing is kept, said at warn (a read-only Secret mount).
    #[default]
    BesideFile,
    /// `null`: nothing is kept; a start takes what `keys.file` holds then.
    Off,
    /// A path: kept there, and a start that cannot claim it is refused.
    At(PathBuf),
}

impl StateFileSetting {
    /// The path the config names, if it names one.
    pub fn named(&self) -> Option<&Path> {
        match self {
            Self::At(path) => Some(path),
            Self::BesideFile | Self::Off => None,
        }
    }
}

impl<'de> Deserialize<'de> for StateFileSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<PathBuf>::deserialize(d)? {
            Some(path) => Self::At(path),
            None => Self::Off,
        })
    }
}

/// The kept snapshot's path when `keys.state_file` is left out: `<keys.file>.kept`.
pub fn kept_beside(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".kept");
    PathBuf::from(name)
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
