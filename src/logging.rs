//! tracing-subscriber setup: JSON (for containers) or pretty, level from the config unless
//! `KEYWARD_LOG` or `RUST_LOG` says otherwise.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The filter in force, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterChoice {
    /// `EnvFilter` directives, e.g. `info` or `keyward=debug,h2=info`.
    pub directives: String,
    /// `KEYWARD_LOG`, `RUST_LOG` or `log.level`.
    pub source: &'static str,
    /// Variables that were set but did not parse, with their values; they are skipped.
    pub ignored: Vec<(&'static str, String)>,
}

/// `KEYWARD_LOG` first, then `RUST_LOG`, then the config's `log.level`. An empty variable
/// counts as unset (an empty filter would silence everything); one that does not parse is
/// skipped and reported.
pub fn choose_filter(
    config_level: &str,
    keyward_log: Option<&str>,
    rust_log: Option<&str>,
) -> FilterChoice {
    let mut ignored = Vec::new();
    for (source, value) in [("KEYWARD_LOG", keyward_log), ("RUST_LOG", rust_log)] {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            continue;
        };
        if EnvFilter::try_new(value).is_ok() {
            return FilterChoice {
                directives: value.to_string(),
                source,
                ignored,
            };
        }
        ignored.push((source, value.to_string()));
    }
    FilterChoice {
        directives: config_level.to_string(),
        source: "log.level",
        ignored,
    }
}

/// Install the global subscriber. Safe to call twice (the second call is ignored).
pub fn init(format: LogFormat, level: &str) -> FilterChoice {
    let keyward_log = std::env::var("KEYWARD_LOG").ok();
    let rust_log = std::env::var("RUST_LOG").ok();
    let choice = choose_filter(level, keyward_log.as_deref(), rust_log.as_deref());
    let filter = EnvFilter::try_new(&choice.directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    for (variable, value) in &choice.ignored {
        tracing::warn!(variable, value, "log filter does not parse; ignored");
    }
    choice
}
