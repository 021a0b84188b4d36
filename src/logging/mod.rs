//! tracing-subscriber setup: JSON (for containers) or pretty, level from the config unless
//! `KEYWARD_LOG` or `RUST_LOG` says otherwise.

use tracing::level_filters::LevelFilter;
use tracing::Subscriber;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

mod json;

/// The filter in force, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterChoice {
    /// `EnvFilter` directives, e.g. `info` or `info,keyward=debug,h2=info`: always with a
    /// bare level, so that every target not named (keyward's own) has one.
    pub directives: String,
    /// `KEYWARD_LOG`, `RUST_LOG` or `log.level`.
    pub source: &'static str,
    /// Variables that were set but are not a filter keyward takes, with their values; they
    /// are skipped.
    pub ignored: Vec<(&'static str, String)>,
    /// The filter as chosen, when it would have silenced keyward's errors and `directives`
    /// is it with them kept ([`keep_keyward_errors`]).
    pub kept_errors_of: Option<String>,
}

/// A level as a filter directive writes it (any case), by its name: `info`, `off`. Digits
/// (`3`) are EnvFilter's too; the empty word, which EnvFilter reads as `error`, is not.
fn level(word: &str) -> Option<&'static str> {
    ["off", "error", "warn", "info", "debug", "trace"]
        .into_iter()
        .enumerate()
        .find(|(n, name)| word.eq_ignore_ascii_case(name) || word == n.to_string())
        .map(|(_, name)| name)
}

/// A target as tracing names one: a Rust path (`keyward::proxy`, `h2`).
fn is_target(s: &str) -> bool {
    let mut segments = s.split("::");
    let first = segments.next().unwrap_or_default();
    let starts_well = first
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    let word =
        |seg: &str| !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    starts_well && word(first) && segments.all(word)
}

/// One directive: a level (`info`), or `target=level`, `target[span]=level`,
/// `[span]=level` (a span as EnvFilter writes it, `name` or `name{field=value}`). `Ok` with
/// its level when it is a bare one.
fn directive(d: &str) -> Result<Option<&'static str>, ()> {
    if let Some(bare) = level(d) {
        return Ok(Some(bare));
    }
    let (selector, lvl) = d.rsplit_once('=').ok_or(())?;
    level(lvl.trim()).ok_or(())?;
    let selector = selector.trim();
    let (target, span) = match selector.split_once('[') {
        Some((target, span)) => (target, Some(span)),
        None => (selector, None),
    };
    if let Some(span) = span {
        let inner = span.strip_suffix(']').ok_or(())?;
        if inner.is_empty() || inner.contains(['[', ']']) {
            return Err(());
        }
    }
    if (target.is_empty() && span.is_some()) || is_target(target) {
        Ok(None)
    } else {
        Err(())
    }
}

/// Whether `value` is a filter keyward takes: comma-separated directives, each a level or
/// `target=level` (see [`directive`]), that EnvFilter parses too. EnvFilter alone takes any
/// bare word as a target (`inf0`, `warnings`) and turns every other target off; such a
/// value is refused, not obeyed. `Ok` with the last bare level, if there is one.
pub fn check_filter(value: &str) -> Result<Option<&'static str>, String> {
    let refused = || "is not a level or a list of target=level directives".to_string();
    let mut bare = None;
    let mut any = false;
    for d in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        any = true;
        if let Some(l) = directive(d).map_err(|()| refused())? {
            bare = Some(l);
        }
    }
    if !any || EnvFilter::try_new(value).is_err() {
        return Err(refused());
    }
    Ok(bare)
}

/// `value` (a filter [`check_filter`] takes) with `default` in front when it has no bare
/// level: without one, EnvFilter turns every target it does not name off, keyward's errors
/// included (`KEYWARD_LOG=h2=debug` would say nothing else).
fn with_default(value: &str, bare: Option<&str>, default: &str) -> String {
    match bare {
        Some(_) => value.to_string(),
        None => format!("{default},{value}"),
    }
}

/// `KEYWARD_LOG` first, then `RUST_LOG`, then the config's `log.level`. An empty variable
/// counts as unset (an empty filter would silence everything); one that [`check_filter`]
/// refuses is skipped and reported. A filter without a bare level gets the config's (else
/// `info`) as its default. Whatever it says, keyward's own errors are kept
/// ([`keep_keyward_errors`]).
pub fn choose_filter(
    config_level: &str,
    keyward_log: Option<&str>,
    rust_log: Option<&str>,
) -> FilterChoice {
    let config = check_filter(config_level.trim());
    let default = config.clone().ok().flatten().unwrap_or("info");
    let mut ignored = Vec::new();
    let mut chosen = None;
    for (source, value) in [("KEYWARD_LOG", keyward_log), ("RUST_LOG", rust_log)] {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            continue;
        };
        match check_filter(value) {
            Ok(bare) => {
                chosen = Some((with_default(value, bare, default), source));
                break;
            }
            Err(_) => ignored.push((source, value.to_string())),
        }
    }
    let (directives, source) = chosen.unwrap_or_else(|| {
        let directives = match config {
            Ok(bare) => with_default(config_level.trim(), bare, default),
            // Config::validate refuses it; a caller that did not validate gets `info`.
            Err(_) => "info".to_string(),
        };
        (directives, "log.level")
    });
    match keep_keyward_errors(&directives) {
        Some(kept) => FilterChoice {
            directives: kept,
            source,
            ignored,
            kept_errors_of: Some(directives),
        },
        None => FilterChoice {
            directives,
            source,
            ignored,
            kept_errors_of: None,
        },
    }
}

/// Whether EnvFilter would apply a directive for `target` to keyward's own lines (targets
/// `keyward` and `keyward::...`): it matches targets by string prefix, so `key` is one too.
fn reaches_keyward(target: &str) -> bool {
    target.starts_with("keyward") || "keyward".starts_with(target)
}

/// `directives` (a filter [`check_filter`] takes) with keyward's own targets held at
/// `error` at least, or `None` when it already holds them there. README promises that
/// keyward's errors always show (a key snapshot refused, a listener that failed), and only
/// `off` is below `error`: a `keyward=off` or `keyward::keys=off` becomes `...=error`; a
/// bare `off`, or `off` for a target that is a prefix of `keyward` (`key=off`), stays, for
/// the targets it also reaches (dependencies may be turned off), and `keyward=error` is
/// added unless a `keyward=` directive of its own is there. A span directive
/// (`keyward[request]=off`) only ever lets lines through in EnvFilter, so it stays.
pub fn keep_keyward_errors(directives: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut raised = false;
    let mut bare_off = false;
    let mut prefix_off = false;
    let mut own = false;
    for d in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        if let Some(bare) = level(d) {
            // The last bare level is the one EnvFilter keeps.
            bare_off = bare == "off";
            out.push(d.to_string());
            continue;
        }
        let static_target = d
            .rsplit_once('=')
            .filter(|(selector, _)| !selector.contains('['))
            .map(|(target, lvl)| (target.trim(), level(lvl.trim())));
        match static_target {
            Some((target, lvl)) if reaches_keyward(target) => {
                if target == "keyward" {
                    own = true;
                }
                if lvl != Some("off") {
                    out.push(d.to_string());
                } else if target.starts_with("keyward") {
                    raised = true;
                    out.push(format!("{target}=error"));
                } else {
                    prefix_off = true;
                    out.push(d.to_string());
                }
            }
            _ => out.push(d.to_string()),
        }
    }
    if (bare_off || prefix_off) && !own {
        raised = true;
        out.push("keyward=error".to_string());
    }
    raised.then(|| out.join(","))
}

/// The filter `KEYWARD_LOG` and `RUST_LOG` in this process's environment would make of
/// `config_level`.
pub fn choose_from_env(config_level: &str) -> FilterChoice {
    let keyward_log = std::env::var("KEYWARD_LOG").ok();
    let rust_log = std::env::var("RUST_LOG").ok();
    choose_filter(config_level, keyward_log.as_deref(), rust_log.as_deref())
}

/// What an ignored variable's value may show: a variable set by mistake may hold anything,
/// so it is redacted as config messages are, and cut short.
pub fn shown_value(value: &str) -> String {
    crate::config::excerpt(&clip(value, 64))
}

/// Libraries that, at debug or trace level, echo request bytes they could not parse (h2's
/// "malformed headers: malformed path ..." carries the whole `:path`, query credential
/// included; a malformed `:authority` or `:scheme` and, at trace, a `TE` value are echoed
/// the same way; rustls and hyper log protocol details). And at `warn` they say what any
/// client makes them say, once per connection and before any authentication: rustls's
/// "Illegal SNI extension" for an IP literal in SNI, "Sending warning alert" for a
/// renegotiation, h2's "locally-reset streams reached limit". They are held at `error`
/// whatever `KEYWARD_LOG`, `RUST_LOG` or `log.level` say: SPEC 11 promises no key in the
/// logs at any level, and an operator's `warn` alerts must not be a client's to trip
/// (keyward logs failed handshakes itself, at `debug`).
pub const CAPPED_TARGETS: [&str; 6] = [
    "h2",
    "hyper",
    "hyper_util",
    "rustls",
    "tokio_rustls",
    "tower",
];

/// The filter that holds [`CAPPED_TARGETS`] at `error` and lets everything else through to
/// the user's filter.
pub fn dependency_cap() -> Targets {
    CAPPED_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, target| t.with_target(*target, LevelFilter::ERROR),
    )
}

/// The subscriber: `directives` (a user's filter), then [`dependency_cap`], which no
/// directive can lift, writing to `writer`.
pub fn subscriber<W>(
    format: LogFormat,
    directives: &str,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"));
    // A line that cannot be written is lost, not reported: tracing-subscriber reports it
    // with `eprintln!`, which panics when stderr is what failed (a log pipe that closed, a
    // full disk), and with `panic = "abort"` the sidecar died on its next log line.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .log_internal_errors(false);
    match format {
        // The stock JSON formatter's line (`json().flatten_event(true)
        // .with_current_span(false)`), written for a fraction of its cost ([`json`]).
        LogFormat::Json => Box::new(
            builder
                .fmt_fields(JsonFields::new())
                .event_format(json::JsonLine)
                .finish()
                .with(dependency_cap()),
        ),
        // Colour only for a terminal: escape codes in a file or a log shipper are noise.
        LogFormat::Pretty => Box::new(
            builder
                .compact()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .finish()
                .with(dependency_cap()),
        ),
    }
}

/// How many log lines wait for stderr at most; past it a line is dropped, not waited for.
const LOG_QUEUE_LINES: usize = 16 * 1024;

/// How many bytes of lines the writer thread gathers into one `write` to stderr. It writes
/// what it has whenever the queue is empty, so a line still reaches stderr at once when
/// there is no other; under load one system call carries many lines instead of one each.
/// No more than `PIPE_BUF`: a write to a pipe that size or smaller is never interleaved
/// with another process's (or a panic message's) write to it.
const LOG_BATCH_BYTES: usize = 4096;

/// What [`init`] leaves running: the filter it chose, and the thread that writes the lines
/// to stderr (what is queued is written when this is dropped).
pub struct Logging {
    pub choice: FilterChoice,
    _writer: tracing_appender::non_blocking::WorkerGuard,
}

/// Install the global subscriber (a second call installs nothing). Lines go to stderr from
/// a thread of their own, through a
/// bounded queue that drops what it cannot hold: written from the request path, a stderr
/// its reader stopped reading (a stalled log collector) blocked every task that logged
/// once the pipe's 64 KiB were full, and ~50 refused requests stalled all traffic and the
/// control API while the probes still said ready.
pub fn init(format: LogFormat, level: &str) -> Logging {
    let choice = choose_from_env(level);
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .thread_name("keyward-log")
        .finish(std::io::BufWriter::with_capacity(
            LOG_BATCH_BYTES,
            std::io::stderr(),
        ));
    let _ = subscriber(format, &choice.directives, writer.clone()).try_init();
    for (variable, value) in &choice.ignored {
        let value = shown_value(value);
        tracing::warn!(variable, value, "log filter does not parse; ignored");
    }
    if let Some(chosen) = &choice.kept_errors_of {
        // Said past the filter, which would take it for one of the lines it turns off.
        let once = subscriber(format, "warn", writer);
        tracing::subscriber::with_default(once, || {
            tracing::warn!(
                filter = %chosen,
                source = choice.source,
                in_force = %choice.directives,
                "log filter would silence keyward's errors; they are kept"
            );
        });
    }
    Logging {
        choice,
        _writer: guard,
    }
}

/// Longest path and method a log line carries (the access log's and the admin listener's).
/// Both are the client's to choose (a 16 KiB path, an 8,000-character method): written
/// whole, every refused request would cost as many bytes of log as the client sent.
pub const LOGGED_PATH_MAX: usize = 1024;
pub const LOGGED_METHOD_MAX: usize = 32;

/// `s` cut to at most `max` bytes (on a character boundary), ending in `…` when cut.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &s[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a subscriber under test wrote.
    #[derive(Clone, Default)]
    pub(super) struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Buffer {
        pub(super) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn a_filter_that_would_silence_keyward_is_ignored_or_given_a_default() {
        // EnvFilter takes each of these (a bare word is a target), and with no bare level
        // it turns every other target, keyward's own, off.
        for typo in [
            "inf0",
            "warnings",
            "garbage level",
            "info;x",
            "h2",
            "info,x",
            "h2=",
        ] {
            let c = choose_filter("warn", Some(typo), None);
            assert_eq!(
                (c.directives.as_str(), c.source),
                ("warn", "log.level"),
                "{typo}"
            );
            assert_eq!(c.ignored, vec![("KEYWARD_LOG", typo.to_string())]);
            let c = choose_filter("info", None, Some(typo));
            assert_eq!(c.ignored, vec![("RUST_LOG", typo.to_string())]);
        }
        // Without a bare level, the config's (else info) is the default.
        let c = choose_filter("warn", Some("h2=debug"), None);
        assert_eq!(
            (c.directives.as_str(), c.source),
            ("warn,h2=debug", "KEYWARD_LOG")
        );
        let c = choose_filter("h2=info", None, None);
        assert_eq!(
            (c.directives.as_str(), c.source),
            ("info,h2=info", "log.level")
        );
        let c = choose_filter("debug,h2=info", None, Some("keyward[request]=trace"));
        assert_eq!(c.directives, "debug,keyward[request]=trace");
        let c = choose_filter("info", Some("keyward::proxy=debug, error"), None);
        assert_eq!(c.directives, "keyward::proxy=debug, error");
        // What is shown of an ignored value is bounded.
        assert!(shown_value(&"x".repeat(10_000)).chars().count() < 100);
    }

    #[test]
    fn keyward_errors_are_written_under_a_filter_for_another_target() {
        let buf = Buffer::default();
        let directives = choose_filter("info", Some("h2=debug"), None).directives;
        let sub = subscriber(LogFormat::Json, &directives, buf.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::error!(target: "keyward::keys::source", "snapshot refused");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(out.contains("snapshot refused"), "{out}");
    }

    #[test]
    fn no_filter_silences_keyward_errors() {
        for (filter, kept) in [
            ("off", "off,keyward=error"),
            ("0", "0,keyward=error"),
            ("keyward=off", "info,keyward=error"),
            ("error,keyward=off", "error,keyward=error"),
            ("keyward::keys=off", "info,keyward::keys=error"),
            (
                "keyward::keys::source=OFF",
                "info,keyward::keys::source=error",
            ),
            ("warn,key=off", "warn,key=off,keyward=error"),
            (
                "off,keyward::proxy=debug",
                "off,keyward::proxy=debug,keyward=error",
            ),
            ("off,h2=off,keyward=off", "off,h2=off,keyward=error"),
        ] {
            let c = choose_filter("info", Some(filter), None);
            assert_eq!(c.directives, kept, "{filter}");
            assert!(c.kept_errors_of.is_some(), "{filter}");
            let buf = Buffer::default();
            let sub = subscriber(LogFormat::Json, &c.directives, buf.clone());
            tracing::subscriber::with_default(sub, || {
                tracing::error!(target: "keyward::keys::source", "snapshot refused");
                tracing::error!(target: "keyward::proxy", "proxy error");
            });
            let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            assert!(out.contains("snapshot refused"), "{filter}: {out}");
            assert!(out.contains("proxy error"), "{filter}: {out}");
        }
        // The config's level too, and a default it gives a filter without a bare level.
        let c = choose_filter("error,keyward=off", None, None);
        assert_eq!(
            (c.directives.as_str(), c.kept_errors_of.as_deref()),
            ("error,keyward=error", Some("error,keyward=off"))
        );
        let c = choose_filter("off", Some("h2=debug"), None);
        assert_eq!(c.directives, "off,h2=debug,keyward=error");
        // What keeps keyward's errors already, dependencies turned off included, is left.
        for filter in [
            "error",
            "error,h2=off,hyper=off",
            "off,keyward=warn",
            "keyward[request]=off",
            "info,keyward::proxy=debug",
        ] {
            let c = choose_filter("info", Some(filter), None);
            assert_eq!(c.kept_errors_of, None, "{filter}");
        }
        let c = choose_filter("info", Some("error,keyward[request]=off"), None);
        let buf = Buffer::default();
        let sub = subscriber(LogFormat::Json, &c.directives, buf.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::error!(target: "keyward::keys::source", "snapshot refused");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(out.contains("snapshot refused"), "{out}");
    }

    #[test]
    fn no_filter_lifts_the_dependency_cap() {
        for directives in [
            "trace",
            "trace,h2=trace,hyper=trace,rustls=trace",
            "trace,h2::proto=trace",
        ] {
            let buf = Buffer::default();
            let sub = subscriber(LogFormat::Json, directives, buf.clone());
            tracing::subscriber::with_default(sub, || {
                tracing::debug!(target: "h2::proto::streams", "malformed path SECRET-1");
                tracing::trace!(target: "hyper::proto::h1", "SECRET-2");
                tracing::debug!(target: "rustls::server", "SECRET-3");
                // What any client makes them say, once per connection: not a warning.
                tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI CLIENT-1");
                tracing::warn!(target: "rustls::common_state", "warning alert CLIENT-2");
                tracing::warn!(target: "h2::proto::streams", "reached limit CLIENT-3");
                tracing::error!(target: "h2::codec", "kept error");
                tracing::trace!(target: "keyward::proxy", "keyward trace");
            });
            let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            assert!(!out.contains("SECRET"), "{directives}: {out}");
            assert!(!out.contains("CLIENT"), "{directives}: {out}");
            assert!(out.contains("kept error"), "{directives}: {out}");
            assert!(out.contains("keyward trace"), "{directives}: {out}");
        }
    }
}

/// Whether something seen now is to be said: at most once every 10 s, so that what a
/// client can make happen at will cannot flood the log (what is not said is counted in a
/// metric by the caller).
#[derive(Default)]
pub struct Sometimes(std::sync::atomic::AtomicU64);

impl Sometimes {
    pub fn now(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.0.load(Ordering::Relaxed);
        now >= last.saturating_add(10)
            && self
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}
