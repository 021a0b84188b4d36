//! Where snapshots come from: the watched file, and the control API's pushed snapshots
//! persisted to `state_file`. Everything here runs off the request path; the result is one
//! atomic swap in the [`KeyStore`](super::KeyStore).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;
use tracing::{error, info};

use super::snapshot::Format;
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
pub fn install(app: &App, snapshot: Snapshot) -> Arc<Snapshot> {
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

fn refused(app: &App, source: Source, what: &dyn std::fmt::Display) {
    app.metrics.snapshot_failed(source);
    error!(source = source.as_str(), outcome = "error", error = %what, "key snapshot refused; keeping the last good one");
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Load the initial snapshot. A missing or bad source is logged and counted, and keyward
/// starts fail-closed (`503 auth_unavailable`) until a good one arrives.
pub fn load_initial(app: &App) {
    let result = match &app.key_source {
        KeySource::File(path) => load_file(app, path, Source::File),
        KeySource::Control { state_file, seed } => {
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
    let text = read(path)?;
    Ok(install(app, Snapshot::parse_owned(text, source)?))
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
        let app2 = app.clone();
        let path2 = path.clone();
        // File I/O, hashing and parsing stay off the async threads.
        let loaded = tokio::task::spawn_blocking(move || {
            read(&path2).map(|text| {
                let digest_hex = hex::encode(digest(text.as_bytes()));
                (text, digest_hex)
            })
        });
        let (text, digest_hex) = match loaded.await {
            Ok(Ok(pair)) => pair,
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
        last_seen = Some(digest_hex);
        let result = tokio::task::spawn_blocking(move || {
            Snapshot::parse_owned(text, Source::File).map(|s| install(&app2, s))
        })
        .await;
        match result {
            Ok(Ok(_)) => {}
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

/// `PUT /v1/snapshot`: validate, persist atomically, then publish.
pub fn apply_pushed(app: &App, body: &[u8], format: Format) -> Result<Arc<Snapshot>, LoadError> {
    let KeySource::Control { state_file, .. } = &app.key_source else {
        return Err(LoadError::FileSource);
    };
    let text = std::str::from_utf8(body)
        .map_err(|_| LoadError::Invalid(SnapshotError::Parse("body is not UTF-8".into())))?;
    let snapshot = Snapshot::parse_as(text, format, Source::Control)?;
    persist(state_file, body)?;
    Ok(install(app, snapshot))
}

/// `POST /v1/keys/{id}/disable`: a new snapshot with that key disabled, persisted first.
pub fn disable_key(app: &App, id: &str) -> Result<Arc<Snapshot>, DisableError> {
    let KeySource::Control { state_file, .. } = &app.key_source else {
        return Err(DisableError::FileSource);
    };
    let current = app.store.load().ok_or(DisableError::NoSnapshot)?;
    if current.by_id(id).is_none() {
        return Err(DisableError::NotFound(id.to_string()));
    }
    let mut doc = current.to_doc();
    for k in doc.keys.iter_mut().filter(|k| &*k.id == id) {
        k.status = Some("disabled".into());
    }
    let text = serde_yaml::to_string(&doc)
        .map_err(|e| LoadError::Invalid(SnapshotError::Parse(e.to_string())))?;
    let snapshot = Snapshot::parse(&text, Source::Control).map_err(LoadError::from)?;
    persist(state_file, text.as_bytes())?;
    info!(key_id = id, "key disabled through the control API");
    Ok(install(app, snapshot))
}

/// Write `bytes` to `path` atomically: temp file in the same directory, fsync, rename,
/// fsync the directory. A crash leaves the old file or the new one, never half of either.
pub fn persist(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("snapshot"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
