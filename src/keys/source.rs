//! Where snapshots come from: the watched file, and the control API's pushed snapshots
//! persisted to `state_file`. Everything here runs off the request path; the result is one
//! atomic swap in the [`KeyStore`](super::KeyStore).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{error, info, warn};

use sha2::{Digest as _, Sha256};

use super::load::Format;
use super::load::{self, ReadError, YAML_MAX_BYTES};
use super::{digest, Snapshot, SnapshotError, Source};
use crate::App;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] SnapshotError),
    #[error("keys come from a file; configure keys.control.state_file to push snapshots")]
    FileSource,
    #[error("keys are pushed (keys.control); use PUT /v1/snapshot?force=true")]
    ControlSource,
    /// Held back by the blast-radius guard (SPEC 16); the counts are in the verdict.
    #[error("{0}")]
    Guarded(Box<super::guard::Verdict>),
}

/// Whether a new snapshot goes through the blast-radius guard or is taken on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Guarded,
    Forced,
}

/// The guard's check of `new` against the snapshot in force, unless forced.
fn admit(app: &App, new: &Snapshot, admission: Admission) -> Result<(), LoadError> {
    if admission == Admission::Forced {
        return Ok(());
    }
    let current = app.store.load();
    super::guard::admit(current.as_deref(), new, &app.config.keys.guard).map_err(LoadError::Guarded)
}

/// Why an emergency revoke failed.
#[derive(Debug, thiserror::Error)]
pub enum DisableError {
    #[error("no snapshot loaded")]
    NoSnapshot,
    #[error("no key with id {0:?}")]
    NotFound(String),
    #[error("keys come from a file: edit the file to disable a key")]
    FileSource,
    #[error("{0}")]
    Load(#[from] LoadError),
}

/// Which source is authoritative, decided once from the config.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `keys.file`, watched and reloaded.
    File(PathBuf),
    /// `keys.control.state_file`; `seed` (`keys.file`) is read only when no state exists yet.
    Control {
        state_file: PathBuf,
        seed: Option<PathBuf>,
    },
}

impl KeySource {
    pub fn from_config(keys: &crate::config::KeysConfig) -> Option<Self> {
        match (&keys.control, &keys.file) {
            (Some(c), seed) => Some(Self::Control {
                state_file: c.state_file.clone(),
                seed: seed.clone(),
            }),
            (None, Some(f)) => Some(Self::File(f.clone())),
            (None, None) => None,
        }
    }
}

/// Run after every install, once the previous snapshot is dropped: the binary uses it to
/// hand the memory a load freed back to the OS at once (`main.rs`). Unset in tests.
static AFTER_INSTALL: OnceLock<fn()> = OnceLock::new();

/// Set the hook run after every snapshot install (the first call wins).
pub fn after_install(hook: fn()) {
    let _ = AFTER_INSTALL.set(hook);
}

/// Publish a validated snapshot: swap, update metrics, prune per-key state of removed keys.
pub fn install(app: &App, mut snapshot: Snapshot) -> Arc<Snapshot> {
    snapshot.set_max_age(app.config.keys.max_age);
    let snapshot = Arc::new(snapshot);
    let previous = app.store.store(snapshot.clone());
    app.usage.retain(&snapshot);
    app.limiter.retain(&snapshot);
    app.metrics.snapshot_loaded(&snapshot);
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
    if let Some(hook) = AFTER_INSTALL.get() {
        hook();
    }
    snapshot
}

fn refused(app: &App, source: Source, what: &LoadError) {
    if let LoadError::Guarded(verdict) = what {
        app.metrics.snapshot_guarded(source);
        warn!(source = source.as_str(), outcome = "guarded", in_force = verdict.in_force, removed = verdict.removed, disabled = verdict.disabled, error = %what, "key snapshot held back by the guard; keeping the last good one");
        return;
    }
    app.metrics.snapshot_failed(source);
    error!(source = source.as_str(), outcome = "error", error = %what, "key snapshot refused; keeping the last good one");
}

/// Snapshot files are read in pieces of this size.
const READ_BUF: usize = 64 * 1024;

/// A reader that hashes every byte it reads: the digest of a file read as a stream.
struct Hashing<'h, R> {
    inner: R,
    hasher: &'h mut Sha256,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn open<'h>(
    path: &Path,
    hasher: &'h mut Sha256,
) -> Result<BufReader<Hashing<'h, File>>, LoadError> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    Ok(BufReader::with_capacity(
        READ_BUF,
        Hashing {
            inner: file,
            hasher,
        },
    ))
}

fn io_error(path: &Path, source: std::io::Error) -> LoadError {
    LoadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The SHA-256 of a file's content (hex), read in pieces: to tell whether it changed.
fn file_digest(path: &Path) -> Result<String, LoadError> {
    let mut hasher = Sha256::new();
    let mut reader = open(path, &mut hasher)?;
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| io_error(path, e))?;
    drop(reader);
    Ok(hex::encode(hasher.finalize()))
}

/// Read and validate the snapshot in `path`: JSON as a stream (a large document is never
/// held whole, so a reload holds the old snapshot and the new keys but not the file's
/// text), YAML whole. How the syntax is decided, from the document alone, is `load`'s: the
/// same bytes load the same way whether pushed, reloaded or read at start.
pub fn read_file(path: &Path, source: Source) -> Result<Snapshot, LoadError> {
    read_file_as(path, source, Format::Yaml, None)
}

/// [`read_file`] in a declared format ([`Format::Json`]: JSON only); keys equal to those
/// of `prior`, the snapshot in force, are shared with it.
fn read_file_as(
    path: &Path,
    source: Source,
    format: Format,
    prior: Option<&Snapshot>,
) -> Result<Snapshot, LoadError> {
    let mut hasher = Sha256::new();
    let reader = open(path, &mut hasher)?;
    // A document read whole (YAML) is read again from the file, and its digest is that
    // read's; a JSON one's is the stream's, read to its end.
    let mut whole_digest = None;
    let reopen = || {
        let bytes = load::read_bounded(File::open(path)?, YAML_MAX_BYTES)?;
        whole_digest = Some(hex::encode(digest(&bytes)));
        Ok(bytes)
    };
    let built = load::from_reader(reader, format, prior, reopen).map_err(|e| match e {
        ReadError::Invalid(e) => LoadError::Invalid(e),
        ReadError::Io(e) => io_error(path, e),
    })?;
    let digest = whole_digest.unwrap_or_else(|| hex::encode(hasher.finalize()));
    Ok(Snapshot::from_built(built, source, digest)?)
}

/// Load the initial snapshot. A missing or bad source is logged and counted, and keyward
/// starts fail-closed (`503 auth_unavailable`) until a good one arrives.
pub fn load_initial(app: &App) {
    let result = match &app.key_source {
        KeySource::File(path) => load_file(app, path, Source::File),
        KeySource::Control { state_file, seed } => {
            Spool::remove_stale(state_file, STALE_SPOOL);
            if state_file.exists() {
                load_file(app, state_file, Source::Control)
            } else if let Some(seed) = seed {
                load_file(app, seed, Source::File)
            } else {
                info!(state_file = %state_file.display(), "no pushed snapshot yet; waiting for PUT /v1/snapshot");
                return;
            }
        }
    };
    if let Err(e) = result {
        let source = match app.key_source {
            KeySource::File(_) => Source::File,
            KeySource::Control { .. } => Source::Control,
        };
        refused(app, source, &e);
    }
}

fn load_file(app: &App, path: &Path, source: Source) -> Result<Arc<Snapshot>, LoadError> {
    load_file_as(app, path, source, Admission::Guarded)
}

fn load_file_as(
    app: &App,
    path: &Path,
    source: Source,
    admission: Admission,
) -> Result<Arc<Snapshot>, LoadError> {
    let snapshot = read_for(app, path, source, Format::Yaml)?;
    admit(app, &snapshot, admission)?;
    Ok(install(app, snapshot))
}

/// `POST /v1/snapshot/reload`: read the key file once now, through the guard unless
/// forced. A refusal is logged and counted as a watched reload's is.
pub fn reload_file(app: &App, admission: Admission) -> Result<Arc<Snapshot>, LoadError> {
    let KeySource::File(path) = &app.key_source else {
        return Err(LoadError::ControlSource);
    };
    load_file_as(app, path, Source::File, admission).inspect_err(|e| refused(app, Source::File, e))
}

/// [`read_file_as`] sharing unchanged keys with `app`'s snapshot in force, which is let go
/// when the read is done: an install right after it then returns to the OS what the
/// replaced snapshot frees.
fn read_for(app: &App, path: &Path, source: Source, format: Format) -> Result<Snapshot, LoadError> {
    let prior = app.store.load();
    read_file_as(path, source, format, prior.as_deref())
}

/// Watch `path`: reload when its content hash changes (polled, so renames and Kubernetes'
/// `..data` symlink swaps are seen) or when `trigger` fires (SIGHUP). Runs until dropped.
pub async fn watch_file(app: Arc<App>, path: PathBuf, trigger: Arc<Notify>) {
    /// Even when `stat` shows no change, the content is re-hashed this often (in polls), for
    /// filesystems whose timestamps are too coarse to show a quick rewrite.
    const FULL_CHECK_EVERY: u32 = 10;
    let mut last_seen = app.store.load().map(|s| s.content_digest.clone());
    let mut last_stamp = stamp(&path);
    let mut polls_since_read = 0;
    let mut read_error_reported = false;
    let mut tick = tokio::time::interval(app.config.keys.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the initial load already covered it.
    tick.tick().await;
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            () = trigger.notified() => true,
        };
        // A `stat` per poll; the file is read and hashed only when it may have changed.
        let now = stamp(&path);
        polls_since_read += 1;
        if !forced && now.is_some() && now == last_stamp && polls_since_read < FULL_CHECK_EVERY {
            continue;
        }
        polls_since_read = 0;
        last_stamp = now;
        let path2 = path.clone();
        // File I/O, hashing and parsing stay off the async threads.
        let hashed = tokio::task::spawn_blocking(move || file_digest(&path2));
        let digest_hex = match hashed.await {
            Ok(Ok(digest_hex)) => digest_hex,
            Ok(Err(e)) => {
                // A missing file is reported once (and on each SIGHUP), not every second.
                if forced || !read_error_reported {
                    refused(&app, Source::File, &e);
                    read_error_reported = true;
                }
                continue;
            }
            Err(_) => continue,
        };
        read_error_reported = false;
        if !forced && last_seen.as_deref() == Some(digest_hex.as_str()) {
            continue;
        }
        // A refused file is not read again until it changes.
        last_seen = Some(digest_hex);
        let (app2, path2) = (app.clone(), path.clone());
        let result =
            tokio::task::spawn_blocking(move || load_file(&app2, &path2, Source::File)).await;
        match result {
            // What was read may be newer than what was hashed a moment before.
            Ok(Ok(snapshot)) => last_seen = Some(snapshot.content_digest.clone()),
            Ok(Err(e)) => refused(&app, Source::File, &e),
            Err(e) => error!(error = %e, "snapshot reload task failed"),
        }
    }
}

/// What `stat` says of the file behind `path`, symlinks followed (so a Kubernetes `..data`
/// swap, which points the path at another inode, shows as a change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
    })
}

/// A spool untouched for this long at start-up is left from a push that never finished.
const STALE_SPOOL: Duration = Duration::from_secs(3600);

/// Taken while a new snapshot is persisted and installed, so that the state file and the
/// snapshot in force always come from the same push or revoke.
static COMMIT: Mutex<()> = Mutex::new(());

fn committing() -> MutexGuard<'static, ()> {
    COMMIT.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file beside the state file that a new snapshot is written to before it replaces the
/// state file by a rename. A pushed body is written here as it arrives, so a push is never
/// held in memory; the file is removed unless it is committed.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    committed: bool,
}

impl Spool {
    /// A new, empty file in `state_file`'s directory (created if missing), with a random
    /// name: pushes may overlap, and processes in containers of a shared volume all have
    /// the same pid.
    pub fn create(state_file: &Path) -> Result<(Spool, File), LoadError> {
        let dir = parent_dir(state_file);
        std::fs::create_dir_all(dir).map_err(|e| io_error(state_file, e))?;
        let path = dir.join(format!(
            "{}{}",
            Self::prefix(state_file),
            uuid::Uuid::new_v4().simple()
        ));
        let file = File::create(&path).map_err(|e| io_error(&path, e))?;
        let spool = Spool {
            path,
            committed: false,
        };
        Ok((spool, file))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name prefix of `state_file`'s spools.
    fn prefix(state_file: &Path) -> String {
        let name = state_file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("snapshot");
        format!(".{name}.tmp-")
    }

    /// Remove spools of `state_file` last written more than `age` ago: left by a process
    /// that stopped in the middle of a push. A push in progress writes its spool every few
    /// milliseconds, so one that old belongs to nobody, even on a volume shared with other
    /// processes.
    fn remove_stale(state_file: &Path, age: Duration) {
        let prefix = Self::prefix(state_file);
        let Ok(entries) = std::fs::read_dir(parent_dir(state_file)) else {
            return;
        };
        for entry in entries.flatten() {
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix));
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|e| e > age));
            if ours && old && std::fs::remove_file(entry.path()).is_ok() {
                info!(file = %entry.path().display(), "removed the spool of an unfinished push");
            }
        }
    }

    /// Make the written file `target`, atomically: fsync, rename, fsync the directory. A
    /// crash leaves the old file or the new one, never half of either.
    fn commit(mut self, target: &Path) -> Result<(), LoadError> {
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error(&self.path, e))?;
        std::fs::rename(&self.path, target).map_err(|e| io_error(target, e))?;
        self.committed = true;
        if let Ok(d) = File::open(parent_dir(target)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `PUT /v1/snapshot`, once the body is in `spool`: validate it (read as a stream, see
/// [`read_file`]), make it the state file, then publish.
pub fn apply_pushed(
    app: &App,
    spool: Spool,
    format: Format,
    admission: Admission,
) -> Result<Arc<Snapshot>, LoadError> {
    let KeySource::Control { state_file, .. } = &app.key_source else {
        return Err(LoadError::FileSource);
    };
    let snapshot = read_pushed(app, &spool, format)?;
    let _commit = committing();
    // Judged against the snapshot it replaces; a refused one never reaches the state file.
    admit(app, &snapshot, admission)?;
    spool.commit(state_file)?;
    Ok(install(app, snapshot))
}

/// A pushed body in `spool`, validated (and its unchanged keys shared with the snapshot in
/// force); nothing is installed or persisted.
/// Read by the function that reads the state file at start, so what is accepted here is
/// what loads then.
pub fn read_pushed(app: &App, spool: &Spool, format: Format) -> Result<Snapshot, LoadError> {
    read_for(app, spool.path(), Source::Control, format).map_err(|e| match e {
        LoadError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData => {
            LoadError::Invalid(SnapshotError::Parse("body is not UTF-8".into()))
        }
        e => e,
    })
}

/// `POST /v1/keys/{id}/disable`: a new snapshot with that key disabled, persisted first.
pub fn disable_key(app: &App, id: &str) -> Result<Arc<Snapshot>, DisableError> {
    let KeySource::Control { state_file, .. } = &app.key_source else {
        return Err(DisableError::FileSource);
    };
    // From reading the snapshot in force to installing its successor: a push in between
    // would be lost.
    let _commit = committing();
    let current = app.store.load().ok_or(DisableError::NoSnapshot)?;
    if current.by_id(id).is_none() {
        return Err(DisableError::NotFound(id.to_string()));
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
    persist(state_file, text.as_bytes())?;
    info!(key_id = id, "key disabled through the control API");
    Ok(install(app, snapshot))
}

/// Write `bytes` to `path` atomically, through a [`Spool`].
pub fn persist(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    let (spool, mut file) = Spool::create(path)?;
    file.write_all(bytes)
        .map_err(|e| io_error(spool.path(), e))?;
    drop(file);
    spool.commit(path)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::keys::{digest, Status};

    fn item(i: usize) -> String {
        format!(
            "  - id: key_{i}\n    sha256: {}\n    type: personal\n    subject_id: s{i}\n    account_id: a\n    scopes: [read]\n",
            hex::encode(digest(format!("secret-{i}").as_bytes()))
        )
    }

    fn yaml(n: usize) -> String {
        format!(
            "version: 4\nkeys:\n{}",
            (0..n).map(item).collect::<String>()
        )
    }

    /// A reload against the snapshot in force keeps the keys that did not change (one copy
    /// of each, not two); a key changed in any field, and a new one, are the file's. YAML
    /// and JSON, large and small, alike.
    #[test]
    fn a_reread_file_shares_the_unchanged_keys_with_the_snapshot_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        for n in [5_000, 10] {
            std::fs::write(&path, yaml(n)).unwrap();
            let prior = read_file(&path, Source::File).unwrap();
            let changed = yaml(n + 1).replace(
                "id: key_7\n    sha256",
                "id: key_7\n    status: disabled\n    sha256",
            );
            let json =
                serde_json::to_string(&Snapshot::parse(&changed, Source::File).unwrap().to_doc())
                    .unwrap();
            for (format, text) in [(Format::Yaml, changed), (Format::Json, json)] {
                std::fs::write(&path, text).unwrap();
                let next = read_file_as(&path, Source::File, format, Some(&prior)).unwrap();
                let case = format!("{n} keys, {format:?}");
                assert_eq!(next.len(), n + 1, "{case}");
                let shared =
                    |id: &str| Arc::ptr_eq(next.by_id(id).unwrap(), prior.by_id(id).unwrap());
                assert!(
                    shared("key_0") && shared("key_9"),
                    "{case}: unchanged keys are shared"
                );
                assert!(!shared("key_7"), "{case}: a changed key is not");
                assert_eq!(
                    next.by_id("key_7").unwrap().status,
                    Status::Disabled,
                    "{case}"
                );
                let new = format!("key_{n}");
                assert!(
                    prior.by_id(&new).is_none() && next.by_id(&new).is_some(),
                    "{case}"
                );
            }
        }
    }

    /// Every shape of file reads to the snapshot its text parses to, with the digest of the
    /// file's bytes (what the watcher compares).
    #[test]
    fn a_file_reads_as_its_text_parses_with_the_digest_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let large = yaml(5_000);
        let json = serde_json::to_string(&Snapshot::parse(&large, Source::File).unwrap().to_doc())
            .unwrap();
        let flow = format!(
            "keys: [{}]\n",
            (0..3_000)
                .map(|i| serde_json::to_string(
                    &Snapshot::parse(&format!("keys:\n{}", item(i)), Source::File)
                        .unwrap()
                        .to_doc()
                        .keys[0]
                )
                .unwrap())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (name, text) in [
            ("large.yaml", large.clone()),
            ("small.yaml", yaml(10)),
            (
                "demo.yaml",
                include_str!("../../config/keys.yaml").to_string(),
            ),
            (
                "demo.json",
                serde_json::to_string(
                    &Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File)
                        .unwrap()
                        .to_doc(),
                )
                .unwrap(),
            ),
            ("large.json", format!("\n  {json}\n")),
            // Nothing but white space in the first read: taken for YAML, which reads JSON.
            (
                "spaced.json",
                format!("{}{json}", " ".repeat(READ_BUF + 10)),
            ),
            ("flow.yaml", flow),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, &text).unwrap();
            let read = read_file(&path, Source::File).unwrap();
            let parsed = Snapshot::parse(&text, Source::File).unwrap();
            assert_eq!(
                read.content_digest,
                hex::encode(digest(text.as_bytes())),
                "{name}"
            );
            assert_eq!(read.content_digest, file_digest(&path).unwrap(), "{name}");
            assert_eq!(read.version, parsed.version, "{name}");
            assert_eq!(read.len(), parsed.len(), "{name}");
            assert!(
                parsed
                    .keys()
                    .all(|k| read.lookup(k.digest()).is_some_and(|r| r.id == k.id)),
                "{name}"
            );
        }
    }

    /// An entry refused far into a large file is named, in YAML and in JSON.
    #[test]
    fn a_refused_entry_far_into_a_large_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let text = yaml(4_000).replacen(
            "  - id: key_3500\n",
            "  - id: key_3500\n    colour: blue\n",
            1,
        );
        std::fs::write(&path, text).unwrap();
        let e = read_file(&path, Source::File).unwrap_err().to_string();
        assert!(e.contains("keys[3500]") && e.contains("colour"), "{e}");
        let doc = Snapshot::parse(&yaml(4_000), Source::File)
            .unwrap()
            .to_doc();
        let at = doc.keys.iter().position(|k| &*k.id == "key_3500").unwrap();
        let json = serde_json::to_string(&doc).unwrap().replacen(
            r#"{"id":"key_3500","#,
            r#"{"id":"key_3500","colour":"blue","#,
            1,
        );
        std::fs::write(&path, json).unwrap();
        let e = read_file(&path, Source::File).unwrap_err().to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(e.contains(&format!("keys[{at}]")), "{e}");
    }

    #[test]
    fn a_spool_is_removed_unless_committed_and_overlapping_ones_never_meet() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("sub/state.yaml");
        let (a, mut fa) = Spool::create(&state).unwrap();
        let (b, _fb) = Spool::create(&state).unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(a.path().parent(), state.parent(), "beside the state file");
        fa.write_all(b"keys: []\n").unwrap();
        drop(fa);
        let b_path = b.path().to_owned();
        drop(b);
        assert!(!b_path.exists(), "an uncommitted spool is removed");
        a.commit(&state).unwrap();
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "keys: []\n");
        persist(&state, b"version: 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "version: 2\n");
        let left: Vec<_> = std::fs::read_dir(state.parent().unwrap())
            .unwrap()
            .collect();
        assert_eq!(left.len(), 1, "only the state file");
    }

    #[test]
    fn spools_left_by_an_unfinished_push_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.yaml");
        let (fresh, _f) = Spool::create(&state).unwrap();
        let (stale, f) = Spool::create(&state).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        let other = dir.path().join(".other.yaml.tmp-1");
        std::fs::write(&other, "x").unwrap();
        File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        Spool::remove_stale(&state, STALE_SPOOL);
        assert!(
            !stale.path().exists(),
            "an old spool of this state file goes"
        );
        assert!(fresh.path().exists(), "a push in progress keeps its spool");
        assert!(other.exists(), "another file's spool is not ours");
    }

    /// A small file refused is refused as its text is.
    #[test]
    fn a_file_is_refused_as_its_text_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "keys: {").unwrap();
        let e = read_file(&path, Source::File).unwrap_err();
        assert!(matches!(e, LoadError::Invalid(_)), "{e}");
        let whole = Snapshot::parse("keys: {", Source::File).unwrap_err();
        assert_eq!(e.to_string(), whole.to_string());
    }

    #[test]
    fn unreadable_files_are_io_errors_naming_the_file_and_bytes_not_utf8_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.yaml");
        let e = read_file(&missing, Source::File).unwrap_err();
        assert!(matches!(e, LoadError::Io { .. }));
        assert!(e.to_string().contains("missing.yaml"), "{e}");
        let binary = dir.path().join("binary.yaml");
        let mut bytes = yaml(3_000).into_bytes();
        bytes.extend_from_slice(b"  - id: \xff\n");
        std::fs::write(&binary, bytes).unwrap();
        let e = read_file(&binary, Source::File).unwrap_err();
        assert!(matches!(e, LoadError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }
}
