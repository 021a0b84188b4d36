//! Where snapshots come from: the watched file, and the control API's pushed snapshots
//! persisted to `state_file`. Everything here runs off the request path; the result is one
//! atomic swap in the [`KeyStore`].
//!
//! The sources act on a [`Host`]: the store they publish into and the per-key state and
//! metrics an install updates. The application implements it; keys knows nothing of it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::error::SnapshotError;
use super::load::Format;
pub use super::load_error::{DisableError, LoadError};
pub use super::read::read_file;
use super::read::{file_digest, read_file_as};
use super::snapshot::{Snapshot, Source};
pub use super::spool::{persist, Spool, StateLock, StateLockError};
use super::store::KeyStore;
use crate::config::KeysConfig;
use crate::file_watch::{self, Taken, Watch, Watched, SETTLE};

/// What the key sources act on. Implemented by the application.
pub trait Host: Send + Sync + 'static {
    /// Where snapshots are published.
    fn key_store(&self) -> &KeyStore;
    /// Which source is authoritative.
    fn key_source(&self) -> &KeySource;
    /// The state that outlives one load: the commit lock and the after-install hook.
    fn key_loader(&self) -> &KeyLoader;
    /// `keys`: the guard, `max_age` and `poll_interval`.
    fn keys_config(&self) -> &KeysConfig;
    /// The sidecar's environment and scope rules, now: the guard counts the keys usable here.
    fn here(&self) -> super::diff::Here<'_>;
    /// `snapshot` was just published: prune per-key state of removed keys, update metrics.
    fn installed(&self, snapshot: &Snapshot);
    /// A snapshot from `source` was refused as invalid or unreadable (count it).
    fn snapshot_failed(&self, source: Source);
    /// A snapshot from `source` was held back by the guard (count it).
    fn snapshot_guarded(&self, source: Source);
    /// The snapshot in force from `source`, not persisted before, was persisted now
    /// without an install (a retried disable): a refusal counted for it no longer holds.
    fn snapshot_persisted(&self, _source: Source) {}
}

/// `Arc<App>` is a host wherever `App` is.
impl<T: Host + ?Sized> Host for Arc<T> {
    fn key_store(&self) -> &KeyStore {
        (**self).key_store()
    }
    fn key_source(&self) -> &KeySource {
        (**self).key_source()
    }
    fn key_loader(&self) -> &KeyLoader {
        (**self).key_loader()
    }
    fn keys_config(&self) -> &KeysConfig {
        (**self).keys_config()
    }
    fn here(&self) -> super::diff::Here<'_> {
        (**self).here()
    }
    fn installed(&self, snapshot: &Snapshot) {
        (**self).installed(snapshot)
    }
    fn snapshot_failed(&self, source: Source) {
        (**self).snapshot_failed(source)
    }
    fn snapshot_guarded(&self, source: Source) {
        (**self).snapshot_guarded(source)
    }
    fn snapshot_persisted(&self, source: Source) {
        (**self).snapshot_persisted(source)
    }
}

/// The key sources' state that outlives one load, owned by the host.
#[derive(Debug, Default)]
pub struct KeyLoader {
    /// Taken while a new snapshot is persisted and installed, so that the state file and
    /// the snapshot in force always come from the same push or revoke.
    commit: Mutex<()>,
    /// Run after every install, once the previous snapshot is dropped: the binary uses it
    /// to hand the memory a load freed back to the OS at once (`main.rs`).
    after_install: Option<fn()>,
    /// What the guard also judges a snapshot against: see [`super::guard::WINDOW`].
    history: Mutex<History>,
}

/// The snapshots replaced within the last [`super::guard::WINDOW`], oldest first, each with
/// when it was replaced: the first is the one in force a window ago, which the guard also
/// judges a new snapshot against (a sliding window: steps on either side of a fixed edge
/// were judged apart). At most [`HISTORY`] are kept: the oldest and the newest.
#[derive(Debug, Default)]
struct History {
    replaced: std::collections::VecDeque<Replaced>,
}

/// A snapshot replaced within the window.
#[derive(Debug)]
struct Replaced {
    snapshot: Arc<Snapshot>,
    at: Instant,
    /// Ids of keys disabled through the API since it was replaced: judged as a baseline, it
    /// counts them as disabled too, so a later push that keeps them disabled is not charged
    /// for them (the revoke is the operator's own word), while the changes pushed before and
    /// after still count (a revoke that started the window afresh let a push after it
    /// escape the changes before it).
    disabled: DisabledIds,
}

/// Key ids disabled through the API.
type DisabledIds = std::collections::HashSet<Box<str>>;

/// A window's baseline: the snapshot, how long ago it was replaced, and the ids disabled
/// through the API since.
type Baseline = (Arc<Snapshot>, Duration, DisabledIds);

/// Most snapshots a window keeps (frequent pushes share their unchanged keys, not their
/// indexes).
const HISTORY: usize = 8;

impl History {
    /// Drop what was replaced longer than a window ago.
    fn prune(&mut self, now: Instant) {
        while self
            .replaced
            .front()
            .is_some_and(|r| now.saturating_duration_since(r.at) >= super::guard::WINDOW)
        {
            self.replaced.pop_front();
        }
    }

    fn push(&mut self, previous: Arc<Snapshot>, now: Instant) {
        self.prune(now);
        if self.replaced.len() >= HISTORY {
            // The oldest stays: it is what the window is judged against.
            self.replaced.remove(1);
        }
        self.replaced.push_back(Replaced {
            snapshot: previous,
            at: now,
            disabled: DisabledIds::default(),
        });
    }

    /// Key `id` was disabled through the API: every snapshot the window may still judge
    /// against has it disabled too.
    fn disabled(&mut self, id: &str, now: Instant) {
        self.prune(now);
        for r in &mut self.replaced {
            r.disabled.insert(id.into());
        }
    }
}

impl KeyLoader {
    /// `after_install` runs after every snapshot install.
    pub fn new(after_install: Option<fn()>) -> Self {
        Self {
            commit: Mutex::new(()),
            after_install,
            history: Mutex::new(History::default()),
        }
    }

    fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot in force a window ago, if another has replaced it since, with how long
    /// ago that was and the keys disabled through the API since.
    fn baseline_now(&self) -> Option<Baseline> {
        let now = Instant::now();
        let mut history = self.history();
        history.prune(now);
        let r = history.replaced.front()?;
        let age = now.saturating_duration_since(r.at);
        Some((r.snapshot.clone(), age, r.disabled.clone()))
    }

    /// `previous` was just replaced.
    fn note_install(&self, previous: Option<&Arc<Snapshot>>) {
        if let Some(previous) = previous {
            self.history().push(previous.clone(), Instant::now());
        }
    }

    /// Key `id` was disabled through the API (the snapshot in force was replaced by one
    /// that differs from it only there, and is not kept in the window): the window goes on,
    /// its baselines counting the key as disabled.
    fn note_disabled(&self, id: &str) {
        self.history().disabled(id, Instant::now());
    }

    /// The snapshot in force now is the operator's own word (forced): later snapshots are
    /// judged from it, not from before it.
    fn forget_history(&self) {
        self.history().replaced.clear();
    }

    fn committing(&self) -> MutexGuard<'_, ()> {
        self.commit.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a new snapshot goes through the blast-radius guard or is taken on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Guarded,
    Forced,
}

/// The guard's check of `new` against the snapshot in force, unless forced.
fn admit(host: &impl Host, new: &Snapshot, admission: Admission) -> Result<(), LoadError> {
    if admission == Admission::Forced {
        return Ok(());
    }
    let current = host.key_store().load();
    let guard = &host.keys_config().guard;
    super::guard::admit(current.as_deref(), new, guard, host.here()).map_err(LoadError::Guarded)?;
    match window_verdict(host, new) {
        Some(verdict) => Err(LoadError::Guarded(verdict)),
        None => Ok(()),
    }
}

/// The guard's refusal of `new` against the snapshot in force when this window's changes
/// began ([`super::guard::WINDOW`]), if it refuses; `None` when no window is open or the
/// snapshot in force began it. Pushes and dry runs alike.
pub fn window_verdict(host: &impl Host, new: &Snapshot) -> Option<Box<super::guard::Verdict>> {
    let current = host.key_store().load();
    let (baseline, age, disabled) = host.key_loader().baseline_now()?;
    if current.as_ref().is_none_or(|c| Arc::ptr_eq(c, &baseline)) {
        return None;
    }
    let here = host.here();
    let also = DisabledSince {
        ids: &disabled,
        revoked: here.revoked,
    };
    let here = super::diff::Here {
        revoked: Some(&also),
        ..here
    };
    let guard = &host.keys_config().guard;
    super::guard::admit_since(&baseline, age, current.as_deref(), new, guard, here).err()
}

/// The keys disabled through the API since a baseline was replaced, refused there as the
/// fleet's revokes are (and those, if any): not usable, so neither counted nor charged.
struct DisabledSince<'a> {
    ids: &'a DisabledIds,
    revoked: Option<&'a dyn super::diff::Revoked>,
}

impl super::diff::Revoked for DisabledSince<'_> {
    fn is_revoked(&self, key: &super::Key) -> bool {
        self.ids.contains(key.id.as_str()) || self.revoked.is_some_and(|r| r.is_revoked(key))
    }
}

/// Which source is authoritative, decided once from the config.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `keys.file`, watched and reloaded; each snapshot accepted from it is kept in
    /// `state_file` (`keys.state_file`), if set, for the next start.
    File {
        path: PathBuf,
        state_file: Option<PathBuf>,
    },
    /// `keys.control.state_file`; `seed` (`keys.file`) is read only when no state exists yet.
    Control {
        state_file: PathBuf,
        seed: Option<PathBuf>,
    },
}

impl KeySource {
    /// The state file this source keeps, and the setting that names it.
    pub fn state_file(&self) -> Option<(&std::path::Path, &'static str)> {
        match self {
            Self::Control { state_file, .. } => Some((state_file, "keys.control.state_file")),
            Self::File {
                state_file: Some(state_file),
                ..
            } => Some((state_file, "keys.state_file")),
            Self::File { .. } => None,
        }
    }

    pub fn from_config(keys: &KeysConfig) -> Option<Self> {
        match (&keys.control, &keys.file) {
            (Some(c), seed) => Some(Self::Control {
                state_file: c.state_file.clone(),
                seed: seed.clone(),
            }),
            (None, Some(f)) => Some(Self::File {
                path: f.clone(),
                state_file: keys.state_file.clone(),
            }),
            (None, None) => None,
        }
    }
}

/// Publish a validated snapshot: swap, update metrics, prune per-key state of removed keys.
/// The snapshot it replaces joins the guard's window.
pub fn install(host: &impl Host, snapshot: Snapshot) -> Arc<Snapshot> {
    publish(host, snapshot, Window::Keeps)
}

/// What an install does to the guard's window ([`super::guard::WINDOW`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    /// The snapshot replaced joins it.
    Keeps,
    /// It does not: a key disabled through the API, whose snapshot differs from the one
    /// replaced only there ([`KeyLoader::note_disabled`] carries the disable to the window).
    Disable,
}

fn publish(host: &impl Host, mut snapshot: Snapshot, window: Window) -> Arc<Snapshot> {
    snapshot.set_max_age(
        host.keys_config().max_age,
        host.key_store().load().as_deref(),
    );
    let snapshot = Arc::new(snapshot);
    let previous = host.key_store().store(snapshot.clone());
    if window == Window::Keeps {
        host.key_loader().note_install(previous.as_ref());
    }
    host.installed(&snapshot);
    info!(
        source = snapshot.source.as_str(),
        outcome = "ok",
        keys = snapshot.len(),
        version = snapshot.version,
        digest = &snapshot.content_digest[..12],
        previous_keys = previous.as_ref().map(|p| p.len()),
        "key snapshot loaded"
    );
    drop(previous);
    if host.keys_config().max_age.is_some() && snapshot.generated_at.is_none() {
        warn!(
            version = snapshot.version,
            "keys.max_age is set but this snapshot has no generated_at: its age is unknown, so it never goes stale"
        );
    }
    if let Some(hook) = host.key_loader().after_install {
        hook();
    }
    snapshot
}

fn refused(host: &impl Host, source: Source, what: &LoadError) {
    if let LoadError::Guarded(verdict) = what {
        host.snapshot_guarded(source);
        warn!(source = source.as_str(), outcome = "guarded", in_force = verdict.sides.in_force, removed = verdict.removed, disabled = verdict.disabled, locked_out = verdict.locked_out, error = %what, "key snapshot held back by the guard; keeping the last good one");
        return;
    }
    host.snapshot_failed(source);
    if host.key_store().is_loaded() {
        error!(source = source.as_str(), outcome = "error", error = %what, "key snapshot refused; keeping the last good one");
    } else {
        // Nothing in force: every protected route answers 503 until a snapshot loads. (One
        // an earlier release accepted may hold what this one refuses, such as a time
        // without a zone: `keyward check` names it.)
        error!(source = source.as_str(), outcome = "error", error = %what, "key snapshot refused and none is in force: protected routes answer 503 auth_unavailable until one loads (keyward check names what to fix)");
    }
}

/// Load the initial snapshot. A missing or bad source is logged and counted, and keyward
/// starts fail-closed (`503 auth_unavailable`) until a good one arrives.
pub fn load_initial(host: &impl Host) {
    if let Some((state_file, field)) = host.key_source().state_file() {
        warn_if_open_to_others(state_file, field);
    }
    let result = match host.key_source() {
        KeySource::File {
            path,
            state_file: Some(state_file),
        } => load_file_over_kept(host, path, state_file),
        KeySource::File { path, .. } => load_key_file(host, path),
        KeySource::Control { state_file, seed } => {
            Spool::remove_leftovers(state_file);
            if state_file.exists() {
                load_file(host, state_file, Source::Control)
            } else if let Some(seed) = seed {
                load_file(host, seed, Source::File)
            } else {
                info!(state_file = %state_file.display(), "no pushed snapshot yet; waiting for PUT /v1/snapshot");
                return;
            }
        }
    };
    if let Err(e) = result {
        let source = match host.key_source() {
            KeySource::File { .. } => Source::File,
            KeySource::Control { .. } => Source::Control,
        };
        refused(host, source, &e);
    }
}

/// At start: a state file anyone local but its owner could write (or replace, or create)
/// is loaded as keys at the next start. Warned, naming the path and its mode, never the
/// content; not refused (Kubernetes' `emptyDir` directories are 0777).
fn warn_if_open_to_others(state_file: &Path, field: &'static str) {
    for (path, what) in super::spool::open_to_others(state_file) {
        match what {
            super::spool::Open::File(_) => {
                warn!(setting = field, path = %path.display(), mode = %what, "{field} could be written by other local users, whose keys the next start would load: make it 0600 in a directory only keyward's user writes (or one with the sticky bit)")
            }
            // The shipped Deployment's emptyDir is 0777: a warning at every start would
            // teach operators to ignore warnings. It is one only if other containers mount it.
            super::spool::Open::Dir(_) => {
                info!(setting = field, path = %path.display(), mode = %what, "{field}'s directory could be written by other local users, who could replace the file the next start loads: mount it in keyward's container alone (a Kubernetes emptyDir is 0777)")
            }
        }
    }
}

fn load_file(host: &impl Host, path: &Path, source: Source) -> Result<Arc<Snapshot>, LoadError> {
    load_file_as(host, path, source, Admission::Guarded, None)
}

/// `keys.file` at start, once it holds still ([`settled`]): a start while it was being
/// rewritten in place loaded the half written so far (3 starts of 8 under a writer that
/// rewrote it in a loop).
fn load_key_file(host: &impl Host, path: &Path) -> Result<Arc<Snapshot>, LoadError> {
    settled(path).and_then(|digest| {
        load_file_as(host, path, Source::File, Admission::Guarded, Some(&digest))
    })
}

/// A file source's start with `keys.state_file`: the snapshot last accepted from the file
/// (kept there) first, then the file through the guard against it. A file refused at
/// start (a bad or guarded Secret rolled out, the pod restarted) leaves the last accepted
/// snapshot in force, as it would have while running; without the state file the start
/// took whatever the file held, or nothing.
fn load_file_over_kept(
    host: &impl Host,
    path: &Path,
    state_file: &Path,
) -> Result<Arc<Snapshot>, LoadError> {
    Spool::remove_leftovers(state_file);
    if state_file.exists() {
        if let Err(e) = load_file(host, state_file, Source::File) {
            // Damaged or tampered with: the file alone decides, as on a first start.
            warn!(state_file = %state_file.display(), error = %e, "keys.state_file unreadable; loading keys.file alone");
        }
    }
    let kept = host.key_store().load().map(|s| s.content_digest.clone());
    if kept.is_some() && file_digest(path).ok() == kept {
        return Ok(host.key_store().load().expect("loaded above"));
    }
    load_key_file(host, path)
}

/// After a snapshot from `keys.file` (`path`) is installed: keep it in `keys.state_file`,
/// if set, so a restart loads what was in force. A copy of the file's bytes when the file
/// still holds the content installed; else (rewritten since it was read, and what it holds
/// now may never be installed: broken, or held back by the guard) the installed snapshot
/// itself, as JSON: the state file never lags the snapshot in force, or a restart would
/// bring back a key removed since. A failure is logged and counted as the file source's
/// (`keyward_snapshot_refused{source="file",result="error"}` until the next install): the
/// snapshot is in force, but a restart would not find it.
fn keep_accepted(host: &impl Host, path: &Path, installed: &Snapshot) {
    let KeySource::File {
        path: file,
        state_file: Some(state_file),
    } = host.key_source()
    else {
        return;
    };
    if file != path {
        return;
    }
    let kept = match super::spool::keep_copy(path, state_file, &installed.content_digest) {
        Ok(super::spool::Copied::Rewritten) => serde_json::to_string(&installed.to_doc())
            .map_err(|e| LoadError::Invalid(SnapshotError::Parse(e.to_string())))
            .and_then(|text| persist(state_file, text.as_bytes())),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = kept {
        host.snapshot_failed(Source::File);
        warn!(state_file = %state_file.display(), error = %e, "snapshot in force but not kept in keys.state_file: a restart loads keys.file as it is then");
    }
}

/// Read `path` and install it. With `settled`, the digest two looks [`SETTLE`] apart
/// agreed on, only that content is installed: the file is read again to be loaded, and a
/// rewrite begun since would otherwise be installed though no look saw it whole (half a
/// key file can parse). Anything else is [`LoadError::Unsettled`]: still changing.
fn load_file_as(
    host: &impl Host,
    path: &Path,
    source: Source,
    admission: Admission,
    settled: Option<&str>,
) -> Result<Arc<Snapshot>, LoadError> {
    // One file load at a time, and none while a push or a revoke commits: a reload that
    // read the file first must not install its older content after a later one.
    let _commit = host.key_loader().committing();
    let snapshot = match read_for(host, path, source, Format::Yaml) {
        Ok(snapshot) => snapshot,
        // What failed to load may be a rewrite begun since the looks (half a file does not
        // parse): still changing, not refused.
        Err(e) => match settled {
            Some(d) if file_digest(path).ok().as_deref() != Some(d) => {
                return Err(LoadError::Unsettled)
            }
            _ => return Err(e),
        },
    };
    if settled.is_some_and(|d| d != snapshot.content_digest) {
        return Err(LoadError::Unsettled);
    }
    admit(host, &snapshot, admission)?;
    let installed = install(host, snapshot);
    if admission == Admission::Forced {
        host.key_loader().forget_history();
    }
    if source == Source::File {
        keep_accepted(host, path, &installed);
    }
    Ok(installed)
}

/// `POST /v1/snapshot/reload`: read the key file once now, through the guard unless
/// forced, once its content holds still. A refusal is logged and counted as a watched
/// reload's is.
pub fn reload_file(host: &impl Host, admission: Admission) -> Result<Arc<Snapshot>, LoadError> {
    let KeySource::File { path, .. } = host.key_source() else {
        return Err(LoadError::ControlSource);
    };
    settled(path)
        .and_then(|digest| load_file_as(host, path, Source::File, admission, Some(&digest)))
        .inspect_err(|e| refused(host, Source::File, e))
}

/// How many [`SETTLE`] waits a reload asked for gives a file being written.
const SETTLE_TRIES: u32 = 8;

/// Wait until `path` holds still: a read during which its stamp did not move, found again
/// [`SETTLE`] later with the same content and stamp (or replaced whole by a rename), or of a
/// file its own times say was written well before (at once, as at most starts). A file
/// rewritten in place may be read half-written, and half a key file can parse (a key cut
/// before its `status: disabled` line would be let in); two reads that each caught a
/// rewrite at the same point agree on content, so content alone does not say a file is
/// whole. The digest read: the content the load that follows must find.
fn settled(path: &Path) -> Result<String, LoadError> {
    let mut last: Option<(String, file_watch::Stamp)> = None;
    for _ in 0..=SETTLE_TRIES {
        let look = file_watch::steady(path, || file_digest(path))?;
        if let Some((digest, stamp)) = &look {
            // Left alone for longer than any filesystem's timestamps are coarse, or found
            // again `SETTLE` later untouched (or replaced whole, by a rename).
            let again = last
                .as_ref()
                .is_some_and(|(d, s)| d == digest && s.same_or_replaced(stamp));
            if again || stamp.quiet_for(QUIET_BY_ITS_TIMES, SystemTime::now()) {
                return Ok(digest.clone());
            }
        }
        last = look;
        std::thread::sleep(SETTLE);
    }
    Err(LoadError::Unsettled)
}

/// How long ago a file's own times must say it was written for one look to settle it:
/// more than the coarsest timestamps a filesystem keeps (1 s on ext3, 2 s on FAT), where a
/// file written 10 ms ago can look a second old.
const QUIET_BY_ITS_TIMES: Duration = Duration::from_secs(3);

/// [`read_file_as`] sharing unchanged keys with the snapshot in force, which is let go
/// when the read is done: an install right after it then returns to the OS what the
/// replaced snapshot frees.
fn read_for(
    host: &impl Host,
    path: &Path,
    source: Source,
    format: Format,
) -> Result<Snapshot, LoadError> {
    let prior = host.key_store().load();
    let mut snapshot = read_file_as(path, source, format, prior.as_deref())?;
    // Its deadline with `keys.max_age`, known before the guard judges it.
    let max_age = host.keys_config().max_age;
    if max_age.is_some() {
        stamped_in_the_past(&snapshot, SystemTime::now())?;
    }
    snapshot.set_max_age(max_age, prior.as_deref());
    Ok(snapshot)
}

/// How far ahead of this host's clock a `generated_at` may be: a generator's clock a little
/// fast, not a date typed wrong.
pub const GENERATED_AT_SKEW: Duration = Duration::from_secs(300);

/// With `keys.max_age`, a `generated_at` further ahead than [`GENERATED_AT_SKEW`] is refused:
/// its age would count from when this process first saw it, so a restart (a crash loop, a
/// rolling update) would start it afresh and a source cut off would never go stale.
pub fn stamped_in_the_past(snapshot: &Snapshot, now: SystemTime) -> Result<(), LoadError> {
    match snapshot.generated_at {
        Some(at) if at > now + GENERATED_AT_SKEW => Err(LoadError::Invalid(SnapshotError::Parse(
            "generated_at: is more than 5 minutes ahead of this host's clock (keys.max_age is set: a snapshot from the future would not age)".into(),
        ))),
        _ => Ok(()),
    }
}

/// Watch `path`: reload when its content hash changes (polled, so renames and Kubernetes'
/// `..data` symlink swaps are seen) or when `trigger` fires (SIGHUP). Runs until dropped.
pub async fn watch_file<H: Host>(host: Arc<H>, path: PathBuf, trigger: Arc<Notify>) {
    /// Even when `stat` shows no change, the content is re-hashed this often (in polls), for
    /// filesystems whose timestamps are too coarse to show a quick rewrite.
    const FULL_CHECK_EVERY: u32 = 10;
    let last_seen = host.key_store().load().map(|s| s.content_digest.clone());
    let interval = host.keys_config().poll_interval;
    Watch::new(KeyFile { host, path }, interval, last_seen)
        .stat_first(FULL_CHECK_EVERY)
        .triggered_by(trigger)
        .run()
        .await
}

/// The key file, as the watcher sees it: hashed as a stream, then loaded when it changed,
/// if what is loaded is what the looks agreed on. Not the bytes they read, kept: a key
/// file may be hundreds of megabytes, and a JSON one is read as a stream, never whole.
struct KeyFile<H> {
    host: Arc<H>,
    path: PathBuf,
}

impl<H: Host> Watched for KeyFile<H> {
    type Digest = String;
    /// The digest again: the content [`changed`](Watched::changed) may install.
    type Content = String;
    type Error = LoadError;

    fn paths(&self) -> &[PathBuf] {
        std::slice::from_ref(&self.path)
    }

    fn read(&self) -> Result<(String, String), LoadError> {
        let digest = file_digest(&self.path)?;
        Ok((digest.clone(), digest))
    }

    fn changed(&self, settled: String) -> Taken<String> {
        let loaded = load_file_as(
            &*self.host,
            &self.path,
            Source::File,
            Admission::Guarded,
            Some(&settled),
        );
        match loaded {
            Ok(_) => Taken::AsRead,
            // Rewritten since the looks agreed: not refused, still changing. The next
            // polls wait for the new content to settle.
            Err(LoadError::Unsettled) => {
                info!(file = %self.path.display(), "the key file changed as it was loaded; waiting for it to settle");
                Taken::Later
            }
            Err(e) => {
                refused(&*self.host, Source::File, &e);
                Taken::AsRead
            }
        }
    }

    /// A missing file is reported once (and on each SIGHUP), not every second.
    fn unreadable(&self, error: LoadError, report: bool) {
        if report {
            refused(&*self.host, Source::File, &error);
        }
    }
}

/// `PUT /v1/snapshot`, once the body is in `spool`: validate it (read as a stream, see
/// [`read_file`]), make it the state file, then publish.
pub fn apply_pushed(
    host: &impl Host,
    spool: Spool,
    format: Format,
    admission: Admission,
) -> Result<Arc<Snapshot>, LoadError> {
    let KeySource::Control { state_file, .. } = host.key_source() else {
        return Err(LoadError::FileSource);
    };
    let snapshot = read_pushed(host, &spool, format)?;
    let _commit = host.key_loader().committing();
    // Judged against the snapshot it replaces; a refused one never reaches the state file.
    admit(host, &snapshot, admission)?;
    spool.commit(state_file)?;
    let installed = install(host, snapshot);
    if admission == Admission::Forced {
        host.key_loader().forget_history();
    }
    Ok(installed)
}

/// A pushed body in `spool`, validated (and its unchanged keys shared with the snapshot in
/// force); nothing is installed or persisted.
/// Read by the function that reads the state file at start, so what is accepted here is
/// what loads then.
pub fn read_pushed(host: &impl Host, spool: &Spool, format: Format) -> Result<Snapshot, LoadError> {
    // Judged as its source would judge it: a dry run on a file source is the file's
    // reload (no rollback rule: a file is the operator's own), not a push.
    let source = match host.key_source() {
        KeySource::File { .. } => Source::File,
        KeySource::Control { .. } => Source::Control,
    };
    read_for(host, spool.path(), source, format).map_err(|e| match e {
        LoadError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData => {
            LoadError::Invalid(SnapshotError::Parse("body is not UTF-8".into()))
        }
        e => e,
    })
}

/// What `POST /v1/keys/{id}/disable` did.
#[derive(Debug, Clone)]
pub struct Disabled {
    /// The snapshot in force, with the key disabled.
    pub snapshot: Arc<Snapshot>,
    /// The key was disabled already: nothing was installed.
    pub already: bool,
}

/// `POST /v1/keys/{id}/disable`: a new snapshot with that key disabled, installed, then
/// persisted. An emergency revoke fails closed: it is in force from the install on, even
/// when the state file cannot be written (a full or read-only volume); that failure is
/// logged, counted as the control source's refusal (`keyward_snapshot_refused{result="error"}`
/// holds at 1 until a snapshot persists), and answered as [`DisableError::NotPersisted`].
/// (A push is the other way round, persisted first: one that cannot be persisted is not an
/// emergency, and keeping the snapshot in force keeps memory and state file alike.)
///
/// A key disabled already installs nothing (a new snapshot there reset the guard's window,
/// and let a push after it escape the changes before it): the snapshot in force stays, and
/// is persisted again only if the state file does not hold it (a retry after
/// [`DisableError::NotPersisted`]). A real disable leaves the window open, its baselines
/// counting the key as disabled too ([`KeyLoader::note_disabled`]).
pub fn disable_key(host: &impl Host, id: &str) -> Result<Disabled, DisableError> {
    let KeySource::Control { state_file, .. } = host.key_source() else {
        return Err(DisableError::FileSource);
    };
    // From reading the snapshot in force to installing its successor: a push in between
    // would be lost.
    let _commit = host.key_loader().committing();
    let current = host.key_store().load().ok_or(DisableError::NoSnapshot)?;
    let Some(key) = current.by_id(id) else {
        return Err(DisableError::NotFound(id.to_string()));
    };
    if key.status == super::Status::Disabled {
        return persisted_again(host, state_file, id, current);
    }
    let mut doc = current.to_doc();
    for k in doc.keys.iter_mut().filter(|k| &*k.id == id) {
        k.status = Some("disabled".into());
    }
    // JSON: read as a stream at start, whatever the snapshot's size.
    let text = serde_json::to_string(&doc)
        .map_err(|e| LoadError::Invalid(SnapshotError::Parse(e.to_string())))?;
    let snapshot =
        Snapshot::parse_as(&text, Format::Json, Source::Control).map_err(LoadError::from)?;
    let snapshot = publish(host, snapshot, Window::Disable);
    // The operator's own revoke: a later push that keeps it is not judged as disabling it,
    // and the window's earlier changes still count.
    host.key_loader().note_disabled(id);
    info!(key_id = id, "key disabled through the control API");
    if let Err(error) = persist(state_file, text.as_bytes()) {
        // After the install, whose metrics said the control source is fine.
        host.snapshot_failed(Source::Control);
        error!(key_id = id, error = %error, outcome = "not_persisted", "key disabled in this process but not persisted to keys.control.state_file: a restart would enable it again");
        return Err(DisableError::NotPersisted { error, snapshot });
    }
    Ok(Disabled {
        snapshot,
        already: false,
    })
}

/// A disable of a key disabled in `current` already: nothing is installed. The state file
/// is written again only when it does not hold `current` (its earlier persist failed, or
/// the snapshot in force came from the seed file): a retry of a revoke that was in force
/// but not persisted must not answer 200 while a restart would let the key in.
fn persisted_again(
    host: &impl Host,
    state_file: &Path,
    id: &str,
    current: Arc<Snapshot>,
) -> Result<Disabled, DisableError> {
    if file_digest(state_file).ok().as_deref() != Some(current.content_digest.as_str()) {
        let written = serde_json::to_string(&current.to_doc())
            .map_err(|e| LoadError::Invalid(SnapshotError::Parse(e.to_string())))
            .and_then(|text| persist(state_file, text.as_bytes()));
        if let Err(error) = written {
            host.snapshot_failed(Source::Control);
            error!(key_id = id, error = %error, outcome = "not_persisted", "key disabled in this process but not persisted to keys.control.state_file: a restart would enable it again");
            return Err(DisableError::NotPersisted {
                error,
                snapshot: current,
            });
        }
        host.snapshot_persisted(Source::Control);
        info!(
            key_id = id,
            "key already disabled; the snapshot in force persisted again"
        );
    }
    Ok(Disabled {
        snapshot: current,
        already: true,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::keys::fixtures::entry;
    use crate::keys::Status;

    /// Runs of the after-install hook (this test's only: the hook is a plain `fn`).
    static HOOK_RUNS: AtomicUsize = AtomicUsize::new(0);

    fn count_hook_run() {
        HOOK_RUNS.fetch_add(1, Ordering::SeqCst);
    }

    /// A host with a control source in `dir`, counting what the sources report.
    struct TestHost {
        store: KeyStore,
        source: KeySource,
        loader: KeyLoader,
        config: KeysConfig,
        installed: AtomicUsize,
        failed: AtomicUsize,
    }

    impl TestHost {
        fn control(dir: &Path) -> Self {
            let state = dir.join("state.yaml");
            let yaml = format!("control: {{state_file: {}}}", state.display());
            let config: KeysConfig = serde_yaml::from_str(&yaml).unwrap();
            TestHost {
                store: KeyStore::new(),
                source: KeySource::from_config(&config).unwrap(),
                loader: KeyLoader::new(Some(count_hook_run)),
                config,
                installed: AtomicUsize::new(0),
                failed: AtomicUsize::new(0),
            }
        }
    }

    impl TestHost {
        /// A file source at `dir/keys.yaml`, without the counting hook (its count is
        /// another test's).
        fn file(dir: &Path) -> Self {
            let yaml = format!("file: {}", dir.join("keys.yaml").display());
            let config: KeysConfig = serde_yaml::from_str(&yaml).unwrap();
            TestHost {
                store: KeyStore::new(),
                source: KeySource::from_config(&config).unwrap(),
                loader: KeyLoader::new(None),
                config,
                installed: AtomicUsize::new(0),
                failed: AtomicUsize::new(0),
            }
        }
    }

    impl Host for TestHost {
        fn key_store(&self) -> &KeyStore {
            &self.store
        }
        fn key_source(&self) -> &KeySource {
            &self.source
        }
        fn key_loader(&self) -> &KeyLoader {
            &self.loader
        }
        fn keys_config(&self) -> &KeysConfig {
            &self.config
        }
        fn here(&self) -> crate::keys::diff::Here<'_> {
            crate::keys::diff::Here::unknown()
        }
        fn installed(&self, snapshot: &Snapshot) {
            assert!(std::ptr::eq(
                snapshot,
                &*self.store.load().expect("published first")
            ));
            self.installed.fetch_add(1, Ordering::SeqCst);
        }
        fn snapshot_failed(&self, _: Source) {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
        fn snapshot_guarded(&self, _: Source) {}
    }

    /// The host's hook runs after every install (the initial load, a revoke), once the
    /// snapshot is published; a refused state file is counted and installs nothing.
    #[test]
    fn every_install_reaches_the_host_and_runs_its_after_install_hook() {
        let dir = tempfile::tempdir().unwrap();
        let host = TestHost::control(dir.path());
        let KeySource::Control { state_file, .. } = host.key_source().clone() else {
            unreachable!("a control source")
        };
        std::fs::write(&state_file, "keys: {").unwrap();
        load_initial(&host);
        assert_eq!(host.failed.load(Ordering::SeqCst), 1);
        assert!(!host.store.is_loaded());
        assert_eq!(HOOK_RUNS.load(Ordering::SeqCst), 0);

        persist(&state_file, entry("").as_bytes()).unwrap();
        load_initial(&host);
        assert_eq!(HOOK_RUNS.load(Ordering::SeqCst), 1);
        disable_key(&host, "key_a").unwrap();
        assert_eq!(HOOK_RUNS.load(Ordering::SeqCst), 2);
        assert_eq!(host.installed.load(Ordering::SeqCst), 2);
        let in_force = host.store.load().unwrap();
        assert_eq!(in_force.by_id("key_a").unwrap().status, Status::Disabled);
        // What is in force is what a restart loads.
        let persisted = read_file(&state_file, Source::Control).unwrap();
        assert_eq!(persisted.content_digest, in_force.content_digest);
    }

    /// An emergency revoke fails closed: when the state file cannot be replaced, the key
    /// is disabled in memory all the same, the failure is counted, and the error says the
    /// revoke is in force but not persisted.
    #[test]
    fn a_revoke_that_cannot_be_persisted_is_in_force_all_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut host = TestHost::control(dir.path());
        // Not the counting hook: its count is another test's.
        host.loader = KeyLoader::new(None);
        let KeySource::Control { state_file, .. } = host.key_source().clone() else {
            unreachable!("a control source")
        };
        persist(&state_file, entry("").as_bytes()).unwrap();
        load_initial(&host);
        // A directory in the state file's place: the rename that replaces it fails, even
        // for root (for whom a read-only directory is no obstacle).
        std::fs::remove_file(&state_file).unwrap();
        std::fs::create_dir(&state_file).unwrap();
        std::fs::write(state_file.join("occupied"), "").unwrap();
        let e = disable_key(&host, "key_a").unwrap_err();
        assert!(matches!(e, DisableError::NotPersisted { .. }), "{e}");
        let said = e.to_string();
        assert!(
            said.contains("in force") && said.contains("not persisted"),
            "{said}"
        );
        let in_force = host.store.load().unwrap();
        assert_eq!(in_force.by_id("key_a").unwrap().status, Status::Disabled);
        assert_eq!(host.failed.load(Ordering::SeqCst), 1, "counted");
        // The retry, once the volume is fixed: the key is disabled already, so nothing is
        // installed, but the state file is written, as a restart must find the revoke.
        let installs = host.installed.load(Ordering::SeqCst);
        let e = disable_key(&host, "key_a").unwrap_err();
        assert!(
            matches!(e, DisableError::NotPersisted { .. }),
            "still broken: {e}"
        );
        std::fs::remove_dir_all(&state_file).unwrap();
        let retried = disable_key(&host, "key_a").unwrap();
        assert!(retried.already);
        assert!(
            Arc::ptr_eq(&retried.snapshot, &in_force),
            "nothing installed"
        );
        assert_eq!(host.installed.load(Ordering::SeqCst), installs);
        let persisted = read_file(&state_file, Source::Control).unwrap();
        assert_eq!(persisted.by_id("key_a").unwrap().status, Status::Disabled);
        // And again: the state file holds it, so nothing at all is written.
        let written = std::fs::metadata(&state_file).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(disable_key(&host, "key_a").unwrap().already);
        let again = std::fs::metadata(&state_file).unwrap().modified().unwrap();
        assert_eq!(again, written);
    }

    /// `keys.state_file` keeps the snapshot in force, whatever the file holds by then: a
    /// file rewritten between the load's read and its copy (to content never installed,
    /// broken here) left the state file a snapshot behind, and a restart brought back a
    /// key removed since. A copy that cannot be written is counted.
    #[test]
    fn the_state_file_keeps_what_is_in_force_when_the_file_moved_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let state = dir.path().join("state.yaml");
        let yaml = format!("file: {}\nstate_file: {}", path.display(), state.display());
        let mut host = TestHost::file(dir.path());
        host.config = serde_yaml::from_str(&yaml).unwrap();
        host.source = KeySource::from_config(&host.config).unwrap();
        std::fs::write(&path, entry("")).unwrap();
        load_file_as(&host, &path, Source::File, Admission::Forced, None).unwrap();
        assert_eq!(
            std::fs::read(&state).unwrap(),
            std::fs::read(&path).unwrap()
        );
        // The disabled key's snapshot is read and installed; the file moves on at once.
        std::fs::write(&path, entry("    status: disabled\n")).unwrap();
        let read = read_for(&host, &path, Source::File, Format::Yaml).unwrap();
        let installed = install(&host, read);
        std::fs::write(&path, "keys: [").unwrap();
        keep_accepted(&host, &path, &installed);
        let kept = read_for(&host, &state, Source::File, Format::Yaml).unwrap();
        assert_eq!(kept.by_id("key_a").unwrap().status, Status::Disabled);
        assert_eq!(host.failed.load(Ordering::SeqCst), 0);
        // A state file that cannot be replaced (a directory in its place, even for root).
        std::fs::remove_file(&state).unwrap();
        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("occupied"), "").unwrap();
        keep_accepted(&host, &path, &installed);
        assert_eq!(host.failed.load(Ordering::SeqCst), 1, "counted");
    }

    /// The watcher installs only the content its looks agreed on: a rewrite begun after
    /// they agreed, and read by the load, is not installed but waited for (not refused).
    #[test]
    fn the_watcher_installs_only_the_content_its_looks_agreed_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, entry("")).unwrap();
        let host = Arc::new(TestHost::file(dir.path()));
        let watched = KeyFile {
            host: host.clone(),
            path: path.clone(),
        };
        let (agreed, content) = watched.read().unwrap();
        // Rewritten after the looks: whole, and cut short (as a rewrite in place midway).
        let whole = entry("    status: disabled\n");
        for rewrite in [&whole[..], &whole[..40]] {
            std::fs::write(&path, rewrite).unwrap();
            assert_eq!(watched.changed(content.clone()), Taken::Later, "{rewrite}");
            assert!(!host.store.is_loaded(), "nothing no look agreed on");
            assert_eq!(host.failed.load(Ordering::SeqCst), 0, "not refused");
        }
        // Once it holds still, what the looks agree on is installed.
        std::fs::write(&path, entry("")).unwrap();
        let (settled, content) = watched.read().unwrap();
        assert_eq!(settled, agreed);
        assert_eq!(watched.changed(content), Taken::AsRead);
        assert_eq!(host.store.load().unwrap().content_digest, agreed);
    }

    /// A file whose times are in the future (copied with `cp -p` from a host whose clock is
    /// ahead) settles once seen the same twice: it was refused as "still changing" for good.
    #[test]
    fn a_file_with_times_in_the_future_settles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, entry("")).unwrap();
        let ahead = SystemTime::now() + Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(ahead)
            .unwrap();
        let start = std::time::Instant::now();
        assert_eq!(settled(&path).unwrap(), file_digest(&path).unwrap());
        assert!(start.elapsed() < SETTLE * 3, "{:?}", start.elapsed());
    }

    /// A reload asked for (`POST /v1/snapshot/reload`, after its two reads agreed) installs
    /// only the content they agreed on, and answers "still changing" otherwise.
    #[test]
    fn a_reload_installs_only_the_content_its_reads_agreed_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, entry("")).unwrap();
        let host = TestHost::file(dir.path());
        let agreed = settled(&path).unwrap();
        std::fs::write(&path, entry("    status: disabled\n")).unwrap();
        let e = load_file_as(&host, &path, Source::File, Admission::Forced, Some(&agreed));
        assert!(matches!(e, Err(LoadError::Unsettled)), "{e:?}");
        assert!(!host.store.is_loaded());
        let now = file_digest(&path).unwrap();
        load_file_as(&host, &path, Source::File, Admission::Forced, Some(&now)).unwrap();
        assert_eq!(host.store.load().unwrap().content_digest, now);
    }

    /// A file load waits for the commit in progress (a push, a revoke, another load) and
    /// reads the file only then: a reload that started first cannot install older content
    /// after a later one.
    #[test]
    fn a_file_load_waits_for_the_commit_in_progress_then_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.yaml");
        std::fs::write(&file, entry("")).unwrap();
        let host = Arc::new(TestHost::file(dir.path()));
        let commit = host.key_loader().committing();
        let loading = {
            let host = host.clone();
            std::thread::spawn(move || {
                reload_file(&*host, Admission::Forced).map(|s| s.content_digest.clone())
            })
        };
        // No signal says a thread is blocked: it must still be running a while later.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!loading.is_finished(), "a file load ran during a commit");
        std::fs::write(&file, entry("    status: disabled\n")).unwrap();
        drop(commit);
        let loaded = loading.join().unwrap().unwrap();
        let newest = read_file(&file, Source::File).unwrap();
        assert_eq!(loaded, newest.content_digest);
        assert_eq!(host.installed.load(Ordering::SeqCst), 1);
    }
}
