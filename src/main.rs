//! The `keyward` command: wiring only. All behaviour lives in the library.

use std::io::{self, Read, StdoutLock, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keyward::config::redact::shown_path;
use keyward::config::{Config, ConfigError};
use keyward::keys::source::{LoadError, StateLock};
use keyward::keys::{IdentityError, IdentityNames, PrincipalType, Source};
use keyward::{cluster, demo, keygen, logging, tls, Keyward, StartError};

/// jemalloc instead of glibc's malloc: hyper allocates a fresh read buffer per message, and
/// glibc served those 8 KiB blocks through `malloc_consolidate`. The proxy spends about 4%
/// less CPU per request, and snapshots load faster.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start (`_RJEM_MALLOC_CONF` still overrides them).
/// One-page slabs for objects up to 512 bytes: a snapshot load keeps small objects (keys,
/// identity values) and frees the parse's garbage around them, and jemalloc's multi-page
/// slabs (7 pages for the 224-byte class a `Key` takes) could not be carved from those
/// freed, scattered pages, so every slab of new keys took fresh memory. Measured with a
/// 200k-key YAML snapshot: load peak 149–184 MB without, 114–118 MB with.
#[allow(non_upper_case_globals, unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
static malloc_conf: &[u8; 19] = b"slab_sizes:1-512:1\0";

/// After a snapshot install, return the pages the load freed (parse trees, the previous
/// snapshot) to the OS now. jemalloc would otherwise keep them until its decay ran on the
/// same arena, which an idle loader thread never does, and its background purge thread
/// raises the peak of a large load instead (200k keys: 440 MB against 334 MB).
#[allow(unsafe_code)]
fn release_freed_memory() {
    // jemalloc's MALLCTL_ARENAS_ALL: the purge applies to every arena.
    const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";
    let none = std::ptr::null_mut();
    // SAFETY: both controls take no input and give no output, so every pointer is null.
    unsafe {
        tikv_jemalloc_sys::mallctl(c"thread.tcache.flush".as_ptr(), none, none.cast(), none, 0);
        tikv_jemalloc_sys::mallctl(PURGE_ALL.as_ptr(), none, none.cast(), none, 0);
    }
}

/// Raise the soft limit on open files to the hard one, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do: every connection, client or upstream, is a descriptor, and a
/// shell's or systemd's default soft limit of 1024 is far below `limits.max_connections`.
/// The limit in force after, if it could be read.
#[allow(unsafe_code)]
fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes, and setrlimit reads, only the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // An unlimited hard limit cannot be the soft one (the kernel's nr_open caps
            // it): then the soft limit stays as it was.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// No core file: one holds what the process held, raw keys in request headers included,
/// and the node's core handler (systemd-coredump, a crash collector) keeps it where the
/// pod's owners do not control who reads it. A crash is still logged and counted by the
/// orchestrator. Whether it took.
#[allow(unsafe_code)]
fn forbid_core_dumps() -> bool {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads only the struct it is given.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) == 0 }
}

/// Warn when the open-files limit cannot hold what the limits allow: a client connection
/// each, an upstream connection per request in flight, and some for listeners, files and
/// Redis. Past it, accepts (the admin listener's, probes included) and upstream connects
/// fail with "too many open files".
fn check_open_files(config: &Config, limit: Option<u64>) {
    let l = &config.limits;
    let listeners = usize::from(config.listen.is_some()) + usize::from(config.decision.is_some());
    let wanted =
        (listeners * l.max_connections + l.max_in_flight + keyward::admin::MAX_CONNECTIONS + 64)
            as u64;
    if let Some(limit) = limit.filter(|&n| n < wanted) {
        tracing::warn!(
            open_files_limit = limit,
            wanted,
            "the open-files limit (ulimit -n) is below limits.max_connections (per traffic listener) + limits.max_in_flight + the admin listener's 256: raise it, or lower those"
        );
    }
}

/// Warn when the container's memory limit cannot hold what clients can make keyward hold
/// with no key ([`keyward::runtime::connection_memory`]): connections held with unfinished
/// heads for `header_read_timeout` took a pod past its 256 MiB limit (killed, restarted),
/// and so did HTTP/2 streams answered to a client that reads nothing.
fn check_memory_limit(config: &Config) {
    let Some(limit) = keyward::runtime::memory_limit() else {
        return;
    };
    let needed = keyward::runtime::connection_memory(config);
    if needed > limit {
        tracing::warn!(
            memory_limit_bytes = limit,
            needed_bytes = needed,
            "the memory limit is below what clients can make keyward hold with no key (limits.max_connections unfinished heads of about 180 KB each, per traffic listener; limits.h2_max_streams HTTP/2 streams of up to about 48 KB, plus one a connection; limits.max_in_flight requests of up to limits.h2_stream_window + 128 KiB) + 32 MiB: a client with no key can get the process killed for memory; lower those or raise the limit"
        );
    }
}

/// Why a command failed: printed as `keyward: <message>`, exit status 1.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{}: {source}", shown_path(path))]
    Config { path: PathBuf, source: ConfigError },
    #[error("cannot start runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Cluster(#[from] cluster::SetupError),
    /// A snapshot that cannot be read (the I/O error already names the file).
    #[error(transparent)]
    SnapshotIo(LoadError),
    #[error("{}: {source}", shown_path(file))]
    Snapshot { file: PathBuf, source: LoadError },
    /// The demo's scratch directory or key file.
    #[error(transparent)]
    DemoFiles(std::io::Error),
    #[error("echo upstream: {0}")]
    EchoUpstream(#[source] std::io::Error),
    #[error(transparent)]
    DemoConfig(ConfigError),
    #[error("stdin: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("no key on stdin")]
    NoKeyOnStdin,
    /// More on stdin than any key: not read further, not shown.
    #[error(
        "more than {HASH_INPUT_MAX} bytes on stdin, and a key is at most 512: refused (not read further)"
    )]
    KeyTooLong,
    #[error("randomness: {0}")]
    Randomness(getrandom::Error),
    #[error(transparent)]
    Entry(#[from] keygen::EntryError),
    #[error(transparent)]
    Unusable(#[from] keygen::UnusableKey),
    /// `keys generate --config`: the config's `prefixes` would refuse the key.
    #[error("{}: prefixes: {reason}", shown_path(path))]
    PrefixRefused { path: PathBuf, reason: &'static str },
    /// Stdout could not be written: a closed pipe ends the command quietly
    /// ([`BROKEN_PIPE_STATUS`]), anything else is said.
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// The exit status of a command whose stdout was closed under it (`keyward diff ... | head`):
/// 128 + SIGPIPE, what a shell reports for a command a broken pipe ended, and no other
/// status any subcommand gives (1 is `diff`'s "the guard would refuse"). Nothing is said.
const BROKEN_PIPE_STATUS: u8 = 141;

/// How much of stdin `keys hash` reads: a key is at most 512 bytes (SPEC 3), and a line end
/// or two after it fit. More is refused unread: `keys hash < /dev/zero` grew without end.
const HASH_INPUT_MAX: u64 = 4096;

/// Stdout, locked and line-buffered: every subcommand writes its output here, flushes it
/// and hands back a failed write as an error ([`CliError::Output`]); `println!` panicked on
/// one (`keyward diff ... | head -1`, `> /dev/full`). Each line goes out whole as it is
/// written, so `check`'s lines keep their order with its warnings on stderr, and those
/// before an error come out before it.
fn stdout() -> StdoutLock<'static> {
    io::stdout().lock()
}

/// A line on stderr, `keyward: ...` or `warning: ...`: everything the commands say there
/// goes through here (`say!`). A line that cannot be written is lost: `eprintln!` panicked
/// on a write error (`2>/dev/full`, a closed pipe), and with `panic = "abort"` every command
/// died with status 134 instead of giving its own.
fn say_line(args: std::fmt::Arguments<'_>) {
    let mut line = args.to_string();
    line.push('\n');
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// [`say_line`] with `format!` arguments.
macro_rules! say {
    ($($arg:tt)*) => {
        say_line(format_args!($($arg)*))
    };
}

/// The exit status for a failed write to stdout: [`BROKEN_PIPE_STATUS`] and nothing said
/// for a closed pipe; else `keyward: cannot write the output: ...` and `status`.
fn output_failed(e: io::Error, status: ExitCode) -> ExitCode {
    if e.kind() == io::ErrorKind::BrokenPipe {
        return ExitCode::from(BROKEN_PIPE_STATUS);
    }
    say!("keyward: {}", CliError::Output(e));
    status
}

#[derive(Parser)]
#[command(name = "keyward", version, about = "API-key authentication sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: ConfigArg,
}

#[derive(Args, Clone)]
struct ConfigArg {
    /// Config file.
    #[arg(
        long,
        short,
        env = "KEYWARD_CONFIG",
        default_value = "config/keyward.yaml",
        global = true
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Run,
    /// Validate the config and the key snapshot; exit 1 on the first error.
    Check,
    /// The shipped config and demo keys in front of a built-in echo upstream.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
    /// Key tooling.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// What snapshot NEW changes against OLD (added, removed, changed keys; no digests), and
    /// whether the blast-radius guard would refuse it: exit 1 if so, 2 if a file cannot be
    /// read. The guard settings are the defaults, or keys.guard of an explicit --config.
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random key (once) and its snapshot entry.
    Generate {
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long = "type", value_parser = parse_type)]
        principal_type: PrincipalType,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        account: String,
        #[arg(long)]
        id: Option<String>,
        /// Comma-separated scopes.
        #[arg(long, value_delimiter = ',', default_value = "read")]
        scopes: Vec<String>,
        #[arg(long)]
        environment: Option<String>,
        /// RFC 3339 UTC, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Read a key on stdin, print its SHA-256 digest.
    Hash,
}

#[derive(Debug, thiserror::Error)]
#[error("service_account | enterprise_service_account | personal")]
struct UnknownType;

fn parse_type(s: &str) -> Result<PrincipalType, UnknownType> {
    serde_yaml::from_str(s).map_err(|_| UnknownType)
}

fn main() -> ExitCode {
    let matches = match <Cli as clap::CommandFactory>::command().try_get_matches() {
        Ok(matches) => matches,
        // clap quotes the argument it could not place: a key given where none is read
        // (`keyward keys hash sta_...` instead of on stdin) would be printed.
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::UnknownArgument | clap::error::ErrorKind::InvalidValue
            ) =>
        {
            say!(
                "keyward: an argument was not expected or not valid here (not shown: it may be a key; `keyward keys hash` reads a key on stdin). See `keyward --help`."
            );
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    let config_given =
        matches.value_source("config") != Some(clap::parser::ValueSource::DefaultValue);
    let cli =
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli.run.config),
        Command::Check => check(&cli.run.config),
        Command::Demo { listen, admin } => run_demo(listen, admin),
        Command::Keys(k) => keys(k, config_given.then_some(&cli.run.config)),
        Command::Diff { old, new, json } => {
            return diff(&old, &new, json, config_given.then_some(&cli.run.config))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Output(e)) => output_failed(e, ExitCode::FAILURE),
        Err(e) => {
            say!("keyward: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    // Traffic runs on keyward's own worker threads (see `Keyward::run`); this runtime only
    // carries the admin listener, watchers and signals.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

fn load_config(path: &Path) -> Result<Config, CliError> {
    Config::load(path).map_err(|source| CliError::Config {
        path: path.to_owned(),
        source,
    })
}

fn run(path: &Path) -> Result<(), CliError> {
    let config = load_config(path)?;
    let log = logging::init(config.log.format, &config.log.level);
    serve(config, &log.choice)
}

fn serve(config: Config, log: &logging::FilterChoice) -> Result<(), CliError> {
    check_open_files(&config, raise_open_files_limit());
    check_memory_limit(&config);
    if !forbid_core_dumps() {
        tracing::warn!("could not turn core dumps off (setrlimit RLIMIT_CORE)");
    }
    let rt = runtime()?;
    let result = rt.block_on(async {
        let mut signals = keyward::Signals::install().map_err(CliError::Signals)?;
        let start = Keyward::bind_with(config, Some(release_freed_memory));
        let Some(server) = signals.unless_stopped(start).await else {
            return Ok(());
        };
        let server = server?;
        report_bound(&server);
        if demo::is_demo_token(server.app.config.admin.token_sha256.as_deref()) {
            tracing::warn!(
                "admin.token_sha256 is the digest of the demo token, which README publishes: \
                 anyone who reaches the admin listener may use the control API"
            );
        }
        let c = &server.app.config;
        // Scheme, host and port (or the socket path) only: never userinfo.
        let upstream = c
            .upstream
            .as_ref()
            .map_or_else(String::new, |u| u.to_string());
        tracing::info!(
            listen = %c.listen.map_or_else(|| "none".into(), |_| server.local_addr().to_string()),
            decision = %server.decision_addr().map_or_else(|| "none".into(), |a| a.to_string()),
            admin = %server.admin_addr(),
            upstream,
            environment = %c.environment,
            tls = c.tls.is_some(),
            mtls = c.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            credentials = c.credentials.len(),
            routes = c.routes.len(),
            keys_ready = server.app.store.is_loaded(),
            control_api = c.admin.token_sha256.is_some(),
            per_key_metrics = c.metrics.per_key,
            log_filter = %log.directives,
            log_filter_source = log.source,
            "keyward started"
        );
        let reload = server.app.reload_trigger();
        server.run(signals.shutdown(reload)).await;
        Ok(())
    });
    // A file read stuck in the kernel (an NFS mount that hangs) would otherwise keep the
    // process alive after "keyward stopped".
    rt.shutdown_timeout(SHUTDOWN_LEFTOVERS);
    result
}

/// How long blocking work still running at exit is waited for.
const SHUTDOWN_LEFTOVERS: std::time::Duration = std::time::Duration::from_secs(1);

/// One line on stdout, at every log level, naming the addresses the listeners bound (the real
/// ports when the config says port 0), so a supervisor or test harness need not guess them:
/// `keyward listening proxy=127.0.0.1:41234 admin=127.0.0.1:41235 decision=none`.
fn report_bound(server: &Keyward) {
    use std::io::Write;
    let proxy = server
        .app
        .config
        .listen
        .map_or_else(|| "none".into(), |_| server.local_addr().to_string());
    let decision = server
        .decision_addr()
        .map_or_else(|| "none".into(), |a| a.to_string());
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop the server: the line is a courtesy.
    let _ = writeln!(
        out,
        "keyward listening proxy={proxy} admin={} decision={decision}",
        server.admin_addr()
    );
    let _ = out.flush();
}

fn check(path: &Path) -> Result<(), CliError> {
    let config = load_config(path)?;
    // `run` skips a log filter it cannot take, with a warning in its log; say it here too
    // (the environment is not the config: the exit code stays the config's).
    let log = logging::choose_from_env(&config.log.level);
    for (variable, value) in &log.ignored {
        say!(
            "warning: {variable} is not a log filter keyward takes (a level, or target=level directives); run ignores it: {}",
            logging::shown_value(value)
        );
    }
    // As `run` says at start: a note, not a refusal (of the config's `log.level` either).
    if let Some(chosen) = &log.kept_errors_of {
        say!(
            "warning: log filter {chosen} ({}) would silence keyward's errors; they are kept: run uses {}",
            log.source,
            log.directives
        );
    }
    let mut out = stdout();
    // The same check `run` makes: the environment must be usable as a header value.
    IdentityNames::new(&config.identity_headers.prefix, &config.environment)?;
    if let Some(tls) = &config.tls {
        let checked = tls::check(tls)?;
        for warning in &checked.warnings {
            say!("warning: {warning}");
        }
        match checked.validity {
            Some(v) => {
                let not_after = humantime::format_rfc3339_seconds(v.not_after);
                writeln!(out, "{}: valid until {not_after}: ok", tls.cert.display())
            }
            None => writeln!(
                out,
                "{}: ok, but its validity could not be read (expiry is not checked)",
                tls.cert.display()
            ),
        }
        .map_err(CliError::Output)?;
    }
    if let Some(c) = &config.cluster {
        cluster::check_url(c)?;
    }
    if demo::is_demo_token(config.admin.token_sha256.as_deref()) {
        say!(
            "warning: admin.token_sha256 is the digest of the demo token, which README \
             publishes: set your own (keyward keys hash < token)"
        );
    }
    // As a start refuses it, in its words.
    if let Some(source) = keyward::keys::source::KeySource::from_config(&config.keys) {
        if let Some((state_file, field)) = source.state_file() {
            StateLock::usable(state_file, field).map_err(StartError::from)?;
        }
    }
    let mut files = Vec::new();
    if let Some(c) = &config.keys.control {
        if c.state_file.exists() {
            files.push((c.state_file.clone(), Source::Control));
        }
    }
    // The file source's kept snapshot: what a start loads when keys.file is refused.
    if let Some(kept) = config.keys.state_file.as_ref().filter(|k| k.exists()) {
        files.push((kept.clone(), Source::File));
    }
    if let Some(f) = &config.keys.file {
        files.push((f.clone(), Source::File));
    }
    for (file, source) in files {
        let s = keyward::keys::source::read_file(&file, source)
            .and_then(|s| {
                // As `run` refuses it with `keys.max_age` set.
                if config.keys.max_age.is_some() {
                    keyward::keys::source::stamped_in_the_past(&s, std::time::SystemTime::now())?;
                }
                Ok(s)
            })
            .map_err(|e| match e {
                // An I/O error already names the file.
                LoadError::Io { .. } => CliError::SnapshotIo(e),
                source => CliError::Snapshot {
                    file: file.clone(),
                    source,
                },
            })?;
        let version = s
            .version
            .map_or_else(|| "none".to_string(), |v| v.to_string());
        writeln!(
            out,
            "{}: {} keys, version {version}: ok",
            file.display(),
            s.len()
        )
        .map_err(CliError::Output)?;
    }
    writeln!(out, "{}: ok", path.display()).map_err(CliError::Output)?;
    out.flush().map_err(CliError::Output)
}

/// `keyward diff OLD NEW`: exit 0 when the guard lets NEW replace OLD, 1 when it would
/// refuse it, 2 when a file (or the config) cannot be read or parsed.
fn diff(old: &Path, new: &Path, json: bool, config: Option<&PathBuf>) -> ExitCode {
    let config = match config.map(|p| load_config(p)) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            say!("keyward: {e}");
            return ExitCode::from(2);
        }
    };
    let (guard, here, source) = match &config {
        Some(c) => {
            let pushed = c.keys.control.is_some();
            let source = if pushed {
                Source::Control
            } else {
                Source::File
            };
            (c.keys.guard, keyward::keys::diff::Here::of(c), source)
        }
        None => (
            keyward::config::GuardConfig::default(),
            keyward::keys::diff::Here::unknown(),
            Source::File,
        ),
    };
    let max_age = config.as_ref().and_then(|c| c.keys.max_age);
    match keyward::keys::review::diff_files(old, new, &guard, here, source, max_age) {
        Ok(review) => {
            let text = if json {
                match serde_json::to_string_pretty(&review) {
                    Ok(text) => text + "\n",
                    Err(e) => {
                        say!("keyward: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                review.to_text()
            };
            let mut out = stdout();
            // 2, as for a file that cannot be read: 1 would say the guard refuses NEW.
            if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                return output_failed(e, ExitCode::from(2));
            }
            if review.guard.would_refuse {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            say!("keyward: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_demo(listen: SocketAddr, admin: SocketAddr) -> Result<(), CliError> {
    // A fresh directory of its own, owner-only: a name another user could guess and create
    // first (a pid) would let them swap the watched key file or plant a symlink.
    let dir = std::env::temp_dir().join(format!("keyward-demo-{}", uuid::Uuid::new_v4().simple()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(CliError::DemoFiles)?;
    }
    let result = demo_in(&dir, listen, admin);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The demo, its key file in `dir`.
fn demo_in(dir: &Path, listen: SocketAddr, admin: SocketAddr) -> Result<(), CliError> {
    let keys_file = dir.join("keys.yaml");
    std::fs::write(&keys_file, demo::DEMO_KEYS).map_err(CliError::DemoFiles)?;
    let rt = runtime()?;
    let upstream = rt
        .block_on(demo::spawn_echo(SocketAddr::from(([127, 0, 0, 1], 0))))
        .map_err(CliError::EchoUpstream)?;
    let config = demo::config(listen, admin, upstream, &keys_file).map_err(CliError::DemoConfig)?;
    let _log = logging::init(config.log.format, &config.log.level);
    let mut out = stdout();
    writeln!(out, "{}", demo::instructions(listen, admin, &keys_file))
        .and_then(|()| out.flush())
        .map_err(CliError::Output)?;
    drop(out);
    let result = rt.block_on(async {
        let mut signals = keyward::Signals::install().map_err(CliError::Signals)?;
        let start = Keyward::bind_with(config, Some(release_freed_memory));
        let Some(server) = signals.unless_stopped(start).await else {
            return Ok(());
        };
        let server = server?;
        let reload = server.app.reload_trigger();
        server.run(signals.shutdown(reload)).await;
        Ok(())
    });
    rt.shutdown_timeout(SHUTDOWN_LEFTOVERS);
    result
}

fn keys(cmd: KeysCommand, config: Option<&PathBuf>) -> Result<(), CliError> {
    match cmd {
        KeysCommand::Hash => {
            let mut raw = Vec::new();
            io::stdin()
                .lock()
                .take(HASH_INPUT_MAX + 1)
                .read_to_end(&mut raw)
                .map_err(CliError::Stdin)?;
            if raw.len() as u64 > HASH_INPUT_MAX {
                return Err(CliError::KeyTooLong);
            }
            let raw = String::from_utf8(raw).map_err(|_| {
                CliError::Stdin(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "stream did not contain valid UTF-8",
                ))
            })?;
            if raw.trim_end_matches(['\r', '\n']).is_empty() {
                return Err(CliError::NoKeyOnStdin);
            }
            let digest = keygen::hash_key(&raw)?;
            let mut out = stdout();
            writeln!(out, "{digest}")
                .and_then(|()| out.flush())
                .map_err(CliError::Output)
        }
        KeysCommand::Generate {
            prefix,
            principal_type,
            subject,
            account,
            id,
            scopes,
            environment,
            expires_at,
        } => {
            keygen::check_prefix(&prefix)?;
            if let Some(path) = config {
                fits_prefixes(path, &prefix, principal_type)?;
            }
            let raw = keygen::generate_key(&prefix).map_err(CliError::Randomness)?;
            let new = keygen::NewKey {
                id,
                principal_type,
                subject_id: subject,
                account_id: account,
                scopes,
                environment,
                expires_at,
            };
            let entry = keygen::entry_yaml(&raw, &new)?;
            let mut out = stdout();
            write!(
                out,
                "# The key, shown once. Give it to the client; it is not stored anywhere.\n\
                 {raw}\n\
                 # Snapshot entry (add under `keys:`):\n\
                 {entry}"
            )
            .and_then(|()| out.flush())
            .map_err(CliError::Output)
        }
    }
}

/// With `--config`: would the config's `prefixes` take a key with `prefix` of this type?
/// Checked before the key is made: one printed and then refused at every request is lost.
fn fits_prefixes(path: &Path, prefix: &str, kind: PrincipalType) -> Result<(), CliError> {
    let config = load_config(path)?;
    let policy = keyward::auth::policy::Policy::new(&config);
    let reason = match policy.prefix_rule(prefix.as_bytes()) {
        keyward::auth::policy::PrefixRule::Unrestricted => return Ok(()),
        keyward::auth::policy::PrefixRule::Unknown => "no configured prefix starts this key",
        keyward::auth::policy::PrefixRule::Types(types) if !types.contains(&kind) => {
            "the prefix does not allow this --type"
        }
        keyward::auth::policy::PrefixRule::Types(_) => return Ok(()),
    };
    Err(CliError::PrefixRefused {
        path: path.to_path_buf(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn start_errors_are_typed_and_keep_their_message() {
        let config = Config::from_yaml(
            "listen: 127.0.0.1:0\nupstream: http://127.0.0.1:1\nenvironment: \"a\\x01b\"\nkeys: { file: k.yaml }\n",
        )
        .unwrap();
        let err = keyward::App::new(config).err().unwrap();
        assert!(matches!(
            err,
            StartError::Identity(IdentityError::Environment)
        ));
        let err = CliError::from(err);
        assert_eq!(err.to_string(), "environment is not a valid header value");
    }

    #[test]
    fn a_config_error_names_the_file_and_keeps_its_source() {
        let err = load_config(Path::new("/nonexistent/keyward.yaml")).unwrap_err();
        assert!(matches!(err, CliError::Config { .. }));
        assert!(err
            .to_string()
            .starts_with("/nonexistent/keyward.yaml: cannot read /nonexistent/keyward.yaml: "));
        let source = err.source().and_then(|s| s.source());
        assert!(
            source.is_some_and(|io| io.is::<std::io::Error>()),
            "{err:?}"
        );
    }
}
