//! Spools: a new state file written beside the old one and put in its place by a rename,
//! so a crash leaves the old file or the new one, never half of either.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::info;

use super::load_error::{io_error, LoadError};

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
        let target = resolved(state_file).map_err(|e| io_error(state_file, e))?;
        let dir = parent_dir(&target);
        std::fs::create_dir_all(dir).map_err(|e| io_error(state_file, e))?;
        let path = dir.join(format!(
            "{}{}",
            Self::prefix(&target),
            uuid::Uuid::new_v4().simple()
        ));
        // Owner-only, as the state file it becomes: it holds every digest and identity.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
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

    /// Remove the spools of `state_file`, left by a process that stopped in the middle of a
    /// push: called at start, under the [`StateLock`], so no other process writes one. (Kept
    /// for an hour, as they were, a few pushes cut short filled a small state volume.)
    pub(super) fn remove_leftovers(state_file: &Path) {
        // A link another user owns: not followed (the start refuses it).
        let Ok(target) = resolved(state_file) else {
            return;
        };
        let prefix = Self::prefix(&target);
        let Ok(entries) = std::fs::read_dir(parent_dir(&target)) else {
            return;
        };
        for entry in entries.flatten() {
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix));
            if ours && std::fs::remove_file(entry.path()).is_ok() {
                info!(file = %entry.path().display(), "removed the spool of an unfinished push");
            }
        }
    }

    /// Make the written file `target`, atomically: fsync, rename, fsync the directory. A
    /// crash leaves the old file or the new one, never half of either.
    pub(super) fn commit(mut self, state_file: &Path) -> Result<(), LoadError> {
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error(&self.path, e))?;
        let target = resolved(state_file).map_err(|e| io_error(state_file, e))?;
        // Never in the place of a FIFO or a device (`/dev/zero` for root): a start refuses
        // one ([`StateLock::take`]); this is for one put there since.
        if let Some(kind) = crate::regular_file::other_kind(&target) {
            let e = std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{kind}, not a regular file: not replaced"),
            );
            return Err(io_error(state_file, e));
        }
        std::fs::rename(&self.path, &target).map_err(|e| io_error(state_file, e))?;
        self.committed = true;
        if let Ok(d) = File::open(parent_dir(&target)) {
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

/// Where `state_file` is written: the file a symlink there points to, so the link stays and
/// its target (a file on a persistent volume, say) gets every push. Renamed over, the link
/// itself became a plain file, its target kept the old snapshot, and a start that found the
/// link again loaded that. A path that is no symlink is its own target.
///
/// A link is followed only when keyward's user or root owns it, as the kernel's
/// `protected_symlinks` does: one another local user planted (in a sticky `/tmp`, say, or
/// since the start) would choose where keyward writes, and a rename does not meet that
/// protection. Such a link, or a loop of links, is an error: the write fails.
pub(super) fn resolved(state_file: &Path) -> std::io::Result<PathBuf> {
    match walk(state_file) {
        Ok(target) => Ok(target),
        Err(Walk::Io(e)) => Err(e),
        Err(Walk::Foreign { path, uid }) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} (on the way to the state file) is owned by uid {uid}, not by keyward's user (uid {}) or root: not followed",
                path.display(),
                euid()
            ),
        )),
    }
}

/// Why [`walk`] stopped.
enum Walk {
    /// A symlink on the way is owned by `uid`, neither keyward's user nor root.
    Foreign { path: PathBuf, uid: u32 },
    /// A loop, or a link that cannot be read.
    Io(std::io::Error),
}

/// [`resolved`]: the symlinks from `state_file` followed one by one (each owner checked),
/// to the path that is no symlink, in its directory's canonical path (the last name is
/// not resolved again: a link put there meanwhile is not followed unchecked).
fn walk(state_file: &Path) -> Result<PathBuf, Walk> {
    use std::os::unix::fs::MetadataExt;
    let mut path = state_file.to_owned();
    // As many as the kernel follows before it answers ELOOP.
    for _ in 0..40 {
        foreign_on_the_way(&path)?;
        let link = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => m,
            _ if path == state_file => return Ok(path),
            _ => {
                let canonical = path.file_name().and_then(|name| {
                    let dir = std::fs::canonicalize(parent_dir(&path)).ok()?;
                    Some(dir.join(name))
                });
                return Ok(canonical.unwrap_or(path));
            }
        };
        if !trusted_owner(link.uid()) {
            return Err(Walk::Foreign {
                path,
                uid: link.uid(),
            });
        }
        let next = std::fs::read_link(&path).map_err(Walk::Io)?;
        path = parent_dir(&path).join(next);
    }
    Err(Walk::Io(std::io::Error::from_raw_os_error(libc::ELOOP)))
}

/// The directories on the way to `path` (review 55): a symlinked directory another user
/// owns (`/tmp/pub/d -> their choice`, swapped at will), or a directory holding the file
/// that another user owns (they may replace or delete the file: a start then falls back to
/// the seed, undoing revokes), chooses what keyward loads or where it writes as surely as
/// a link to the file. Every symlink among `path`'s ancestors must be keyward's or root's,
/// and so must the directory the file is in (canonical). A directory not there yet is
/// keyward's to create.
fn foreign_on_the_way(path: &Path) -> Result<(), Walk> {
    use std::os::unix::fs::MetadataExt;
    for dir in path
        .ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty())
    {
        if let Ok(m) = std::fs::symlink_metadata(dir) {
            if m.file_type().is_symlink() && !trusted_owner(m.uid()) {
                return Err(Walk::Foreign {
                    path: dir.to_owned(),
                    uid: m.uid(),
                });
            }
        }
    }
    if let Ok(m) = std::fs::metadata(parent_dir(path)) {
        if !trusted_owner(m.uid()) {
            return Err(Walk::Foreign {
                path: parent_dir(path).to_owned(),
                uid: m.uid(),
            });
        }
    }
    Ok(())
}

/// Whether a state file, or a symlink to it, owned by `uid` is keyward's: its effective
/// user's or root's. Another user's decides what keyward loads or where it writes.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

/// keyward's effective uid.
#[allow(unsafe_code)]
fn euid() -> u32 {
    // SAFETY: geteuid takes no argument, cannot fail, and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Where anyone local but the owner could write `state_file`'s content, loaded at the next
/// start as keys: the file (its target, for a symlink) writable by group or others, or a
/// directory holding it or its link writable by others without the sticky bit (they may
/// replace the file, or create it). Each with what is open. Paths and modes only, never
/// the content. Not refused: Kubernetes' `emptyDir` directories are 0777.
pub fn open_to_others(state_file: &Path) -> Vec<(PathBuf, Open)> {
    use std::os::unix::fs::PermissionsExt;
    let mut open = Vec::new();
    let target = resolved(state_file).unwrap_or_else(|_| state_file.to_owned());
    if let Ok(m) = std::fs::metadata(&target) {
        let mode = m.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            open.push((target.clone(), Open::File(mode)));
        }
    }
    let mut dirs = vec![parent_dir(state_file).to_owned()];
    let target_dir = parent_dir(&target).to_owned();
    if !dirs.contains(&target_dir) {
        dirs.push(target_dir);
    }
    for dir in dirs {
        let Ok(m) = std::fs::metadata(&dir) else {
            continue;
        };
        let mode = m.permissions().mode() & 0o7777;
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            open.push((dir, Open::Dir(mode)));
        }
    }
    open
}

/// What is open to others about a state file: the file's own mode, or a directory's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// The file (or its target) is writable by group or others: something other than
    /// keyward, which writes it 0600, made it so.
    File(u32),
    /// A directory holding it is writable by others without the sticky bit: every
    /// Kubernetes `emptyDir` is (0777), so this alone is said at `info`.
    Dir(u32),
}

impl std::fmt::Display for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Open::File(mode) => write!(f, "file mode {mode:04o}: writable by group or others"),
            Open::Dir(mode) => write!(
                f,
                "directory mode {mode:04o}: writable by others, without the sticky bit"
            ),
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// How long a start waits for another process to let go of the state file: a rolling
/// update on one volume starts the new pod while the old one still drains, and refusing at
/// once sent the new one into a crash loop. Past it the start is refused as before.
pub const STATE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// `keys.control.state_file`'s claim by this process: exclusive advisory locks (`flock`)
/// on the state file's directory and on `<state_file>.lock`, held until dropped (for the
/// binary, until it exits).
///
/// A state file is one replica's. Two processes writing the same one each rewrite it
/// whole from their own snapshot, so the later write silently undoes the other's push or
/// revoke, and the next start loads what is left (a revoked key active again).
///
/// The lock that decides is the one on the directory, found through its canonical path
/// (symlinks resolved, a symlink to the state file included), so every name of the state
/// file meets the same lock. A lock file alone is bypassed when it is deleted while its
/// holder runs (the next process makes a new one and locks that), and a symlinked
/// directory gave it another path; a directory cannot be unlinked while it holds the state
/// file, and its lock is on the inode, whatever name reached it. Checking afterwards that a
/// lock file is still in place could only notice the loss, not undo a second writer that
/// already started. So it is one state file per directory. (A hard link to the state file
/// elsewhere needs no lock: the first write replaces the file by a rename, which leaves
/// the link behind as a file of its own.) The file lock is kept for a keyward of an earlier
/// release (which locks only it) during a rolling update, and alone guards a filesystem
/// that refuses `flock` on a directory (NFS emulates `flock` with POSIX locks, which need a
/// file open for writing): said at warn. The kernel lets go of both when the process dies,
/// however it dies, so there is nothing stale to clean up.
#[derive(Debug)]
pub struct StateLock {
    _held: Vec<File>,
}

/// Why [`StateLock::take`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error(
        "{field} {state_file}: another keyward holds it (its directory {dir} \
         or {lock} is locked; waited {waited_s} s); a state file is one replica's: give each \
         instance its own directory"
    )]
    Held {
        field: &'static str,
        state_file: PathBuf,
        dir: PathBuf,
        lock: PathBuf,
        waited_s: u64,
    },
    /// The state file is there and is not a regular file (or a symlink to one): it cannot
    /// be loaded, and the first write would rename a snapshot over it.
    #[error(
        "{field} {state_file}: {kind}, not a regular file: name a regular file, or a path \
         that does not exist yet"
    )]
    NotRegular {
        field: &'static str,
        state_file: PathBuf,
        kind: &'static str,
    },
    /// The state file, a symlink to it, or the link's target is another local user's: it
    /// would choose the keys keyward loads, or where it writes.
    #[error(
        "{field} {state_file}: {path} is owned by uid {uid}, not by keyward's user (uid \
         {euid}) or root: another local user would choose the keys keyward loads or where \
         it writes; remove it, or give it to keyward's user"
    )]
    Foreign {
        field: &'static str,
        state_file: PathBuf,
        path: PathBuf,
        uid: u32,
        euid: u32,
    },
    #[error("{field} {state_file}: cannot lock {lock}: {source}")]
    Io {
        field: &'static str,
        state_file: PathBuf,
        lock: PathBuf,
        source: std::io::Error,
    },
}

impl StateLock {
    /// Claim `state_file` (the setting `field` names) for this process, waiting up to
    /// [`STATE_LOCK_WAIT`] for another holder to let go; refused when it is there and is
    /// not a regular file ([`Self::usable`]). Its directory is created if
    /// missing, as a first push would. The wait is awaited, not blocked on: a SIGTERM
    /// meanwhile ends the start (`Keyward::bind` is dropped), as it would a running one.
    pub async fn take(state_file: &Path, field: &'static str) -> Result<StateLock, StateLockError> {
        Self::take_within(state_file, field, STATE_LOCK_WAIT).await
    }

    /// Refuse a `state_file` that is there and is not a regular file (a FIFO, a device, a
    /// directory, a socket, or a symlink to one); one another local user owns (the file, a
    /// symlink on the way, or its target: see [`resolved`]); and a path whose directory
    /// cannot be found (a loop of links, a file named as a directory): [`Self::take`]
    /// does, and `keyward check`, which takes no lock and creates nothing.
    pub fn usable(state_file: &Path, field: &'static str) -> Result<(), StateLockError> {
        use std::os::unix::fs::MetadataExt;
        if let Some(kind) = crate::regular_file::other_kind(state_file) {
            return Err(StateLockError::NotRegular {
                field,
                state_file: state_file.to_owned(),
                kind,
            });
        }
        let io = |source| StateLockError::Io {
            field,
            state_file: state_file.to_owned(),
            lock: parent_dir(state_file).to_owned(),
            source,
        };
        let foreign = |path, uid| StateLockError::Foreign {
            field,
            state_file: state_file.to_owned(),
            path,
            uid,
            euid: euid(),
        };
        let target = match walk(state_file) {
            Ok(target) => target,
            Err(Walk::Foreign { path, uid }) => return Err(foreign(path, uid)),
            Err(Walk::Io(e)) => return Err(io(e)),
        };
        if let Ok(m) = std::fs::symlink_metadata(&target) {
            if !trusted_owner(m.uid()) {
                return Err(foreign(target, m.uid()));
            }
        }
        match Self::dir(state_file) {
            Ok(_) => Ok(()),
            // Its directory is not there yet: a start creates it, as a first push would.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::fs::symlink_metadata(parent_dir(state_file))
                        .is_err_and(|p| p.kind() == std::io::ErrorKind::NotFound) =>
            {
                Ok(())
            }
            Err(e) => Err(io(e)),
        }
    }

    /// [`Self::take`], waiting up to `wait`.
    pub async fn take_within(
        state_file: &Path,
        field: &'static str,
        wait: Duration,
    ) -> Result<StateLock, StateLockError> {
        Self::usable(state_file, field)?;
        let lock = Self::path(state_file);
        let io = |path: &Path, source| StateLockError::Io {
            field,
            state_file: state_file.to_owned(),
            lock: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(parent_dir(state_file)).map_err(|e| io(&lock, e))?;
        let dir_path = Self::dir(state_file).map_err(|e| io(parent_dir(state_file), e))?;
        let dir = File::open(&dir_path).map_err(|e| io(&dir_path, e))?;
        let file = open_lock_file(&lock).map_err(|e| io(&lock, e))?;
        let mut held = Vec::with_capacity(2);
        let mut busy = false;
        match dir.try_lock() {
            Ok(()) => held.push(dir),
            Err(std::fs::TryLockError::WouldBlock) => {
                busy = true;
                held.push(dir);
            }
            Err(std::fs::TryLockError::Error(e)) if unsupported(&e) => {
                tracing::warn!(
                    dir = %dir_path.display(),
                    error = %e,
                    "this filesystem refuses a lock on the state file's directory; only {} guards it (deleting it lets a second keyward in)",
                    lock.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&dir_path, e)),
        }
        if let Some(file) = file {
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => busy = true,
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock, e)),
            }
            held.push(file);
        }
        if !busy {
            return Ok(StateLock { _held: held });
        }
        tracing::warn!(
            state_file = %state_file.display(),
            wait_s = wait.as_secs(),
            "waiting for the state file lock held by another keyward"
        );
        // The wait is a blocking flock on a thread of its own: it returns the moment the
        // holder lets go. Nothing is held while waiting, and the locks are taken in one
        // order (directory, then file): a waiter holding the file while waiting for the
        // directory would deadlock with another holding the directory while waiting for the
        // file. Given up on, the thread still holds the files; whenever it gets the locks
        // it finds nobody to hand them to and drops them, letting go at once.
        for f in &held {
            f.unlock().map_err(|e| io(&lock, e))?;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("state-lock".into())
            .spawn(move || {
                let locked = held.iter().try_for_each(File::lock).map(|()| held);
                let _ = tx.send(locked);
            })
            .map_err(|e| io(&lock, e))?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(Ok(held))) => {
                tracing::info!(state_file = %state_file.display(), "state file lock taken");
                Ok(StateLock { _held: held })
            }
            Ok(Ok(Err(e))) => Err(io(&lock, e)),
            Ok(Err(_)) | Err(_) => Err(StateLockError::Held {
                field,
                state_file: state_file.to_owned(),
                dir: dir_path,
                lock,
                waited_s: wait.as_secs(),
            }),
        }
    }

    /// `<state_file>.lock`, beside it.
    pub fn path(state_file: &Path) -> PathBuf {
        let mut name = state_file.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// The directory that holds the state file, by its canonical path: through a symlink
    /// to the state file (if there is one) and any symlinked directory on the way.
    /// A symlink whose target does not exist yet is followed too: its target's directory
    /// is where every write goes ([`resolved`]), so the lock must be there (locked in the
    /// link's directory, two instances given links to one file both started).
    fn dir(state_file: &Path) -> std::io::Result<PathBuf> {
        let target = resolved(state_file)?;
        match std::fs::canonicalize(&target) {
            Ok(file) => Ok(parent_dir(&file).to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::canonicalize(parent_dir(&target))
            }
            Err(e) => Err(e),
        }
    }
}

/// `<state_file>.lock`, opened to be locked. On a read-only volume (remounted so after an
/// error, or mounted so) it is opened read-only, or left out when it does not exist (the
/// directory's lock then guards alone): `flock` needs no write access, and a start that
/// refused there turned a state file it can read into a crash loop. Pushes then fail
/// with `persist_failed`, as they do when the volume turns read-only while keyward runs.
///
/// Never through a symlink (`O_NOFOLLOW`): the lock file is created with keyward's rights,
/// and a link another user planted there, in a shared directory where the kernel's
/// `protected_symlinks` is off, made a root keyward create an empty file wherever the link
/// pointed (review 72). A link there refuses the start, naming it.
fn open_lock_file(lock: &Path) -> std::io::Result<Option<File>> {
    let writable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(lock);
    match writable {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            tracing::warn!(lock = %lock.display(), "the state file's volume is read-only: the snapshot there loads, pushes and revokes cannot be persisted");
            let read_only = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(lock);
            match read_only {
                Ok(file) => Ok(Some(file)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// `flock` on a directory refused by the filesystem (not: held by another).
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP)
    )
}

/// What [`keep_copy`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Copied {
    /// The state file holds the content `digest` names.
    Kept,
    /// The file no longer holds that content (rewritten since it was read): nothing kept.
    Rewritten,
    /// The state file is the file itself (through a link or `..`): nothing to keep.
    SameFile,
}

/// Copy the file `from` to `state_file` atomically, through a [`Spool`], if its content is
/// `digest` (SHA-256, hex) as it is copied.
pub(super) fn keep_copy(from: &Path, state_file: &Path, digest: &str) -> Result<Copied, LoadError> {
    use sha2::{Digest as _, Sha256};
    // The state file made (through a link or `..`) into the file itself: a copy renamed
    // over it would undo a rewrite made meanwhile. (The config check refuses it at start.)
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    let target = resolved(state_file).map_err(|e| io_error(state_file, e))?;
    if canonical(from).is_some_and(|f| Some(f) == canonical(&target)) {
        return Ok(Copied::SameFile);
    }
    let (spool, mut file) = Spool::create(state_file)?;
    let mut source = crate::regular_file::open(from, super::read::FILE_MAX_BYTES)
        .map_err(|e| io_error(from, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = std::io::Read::read(&mut source, &mut buf).map_err(|e| io_error(from, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(|e| io_error(spool.path(), e))?;
    }
    drop(file);
    if hex::encode(hasher.finalize()) != digest {
        return Ok(Copied::Rewritten);
    }
    spool.commit(state_file)?;
    Ok(Copied::Kept)
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

    /// A state file writable by group or others, or a directory writable by others
    /// without the sticky bit, is named (the path, never the content); 0600 in a 0700
    /// directory, or in a sticky 1777 one, is not.
    #[test]
    fn a_state_file_others_could_write_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let state = dir.join("state.yaml");
        persist(&state, b"keys: []\n").unwrap();
        mode(&dir, 0o700);
        assert!(
            open_to_others(&state).is_empty(),
            "0600, written by keyward"
        );
        mode(&state, 0o620);
        let open = open_to_others(&state);
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(open[0].0, state);
        assert_eq!(open[0].1, Open::File(0o620), "{open:?}");
        mode(&state, 0o600);
        mode(&dir, 0o1777);
        assert!(open_to_others(&state).is_empty(), "sticky");
        mode(&dir, 0o777);
        let open = open_to_others(&state);
        assert_eq!(open.iter().map(|o| &o.0).collect::<Vec<_>>(), [&dir]);
        std::fs::remove_file(&state).unwrap();
        assert_eq!(
            open_to_others(&state).len(),
            1,
            "missing: anyone may create it"
        );
        mode(&dir, 0o700);
    }

    /// A second claim of a state file, from another open file as another process makes,
    /// is refused naming the setting, until the first is dropped.
    #[tokio::test]
    async fn a_state_file_is_claimed_by_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("sub/state.yaml");
        let first = StateLock::take(&state, "keys.control.state_file")
            .await
            .unwrap();
        assert!(StateLock::path(&state).exists());
        let short = Duration::from_millis(50);
        let e = StateLock::take_within(&state, "keys.control.state_file", short)
            .await
            .unwrap_err();
        assert!(matches!(e, StateLockError::Held { .. }), "{e}");
        let said = e.to_string();
        assert!(
            said.contains("keys.control.state_file") && said.contains("another keyward"),
            "{said}"
        );
        // Replacing the state file (as every push does) does not loosen the claim.
        persist(&state, b"keys: []\n").unwrap();
        assert!(
            StateLock::take_within(&state, "keys.control.state_file", short)
                .await
                .is_err()
        );
        drop(first);
        StateLock::take_within(&state, "keys.control.state_file", short)
            .await
            .expect("free once the holder lets go");
    }

    /// A FIFO (or a symlink to one) put in the state file's place while keyward runs is
    /// not renamed over: the write fails, and the FIFO is left as it was.
    #[test]
    fn a_write_never_replaces_what_is_not_a_regular_file() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        for state in [&fifo, &link] {
            let e = persist(state, b"keys: []\n").unwrap_err();
            assert!(
                e.to_string()
                    .contains("a FIFO, not a regular file: not replaced"),
                "{e}"
            );
            assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "no spool left behind");
    }

    /// The claim is on the state, not on a name: deleting the lock file, or reaching the
    /// state file through a symlinked directory or a symlink to it, does not get a second
    /// claim; a claim given up on lets go at once when it gets the lock late.
    #[tokio::test]
    async fn a_claim_holds_whatever_name_reaches_the_state_file() {
        let short = Duration::from_millis(50);
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        let state = real.join("state.yaml");
        let first = StateLock::take(&state, "keys.control.state_file")
            .await
            .unwrap();
        persist(&state, b"keys: []\n").unwrap();
        std::fs::remove_file(StateLock::path(&state)).unwrap();
        assert!(
            StateLock::take_within(&state, "keys.control.state_file", short)
                .await
                .is_err(),
            "lock file deleted"
        );
        let linked_dir = dir.path().join("linked");
        std::os::unix::fs::symlink(&real, &linked_dir).unwrap();
        assert!(StateLock::take_within(
            &linked_dir.join("state.yaml"),
            "keys.control.state_file",
            short
        )
        .await
        .is_err());
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let linked_file = other.join("state.yaml");
        std::os::unix::fs::symlink(&state, &linked_file).unwrap();
        assert!(
            StateLock::take_within(&linked_file, "keys.control.state_file", short)
                .await
                .is_err()
        );
        drop(first);
        // The claims given up on above may still be taking the lock on their threads:
        // they let go as soon as they find nobody waiting.
        StateLock::take_within(
            &linked_dir.join("state.yaml"),
            "keys.control.state_file",
            Duration::from_secs(10),
        )
        .await
        .expect("free once the holder and the abandoned waits let go");
    }

    #[test]
    fn a_spool_and_the_state_file_it_becomes_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("snapshot.yaml");
        persist(&state, b"keys: []\n").unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
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
        let (old, f) = Spool::create(&state).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        let other = dir.path().join(".other.yaml.tmp-1");
        std::fs::write(&other, "x").unwrap();
        Spool::remove_leftovers(&state);
        assert!(!old.path().exists(), "an old spool of this state file goes");
        assert!(
            !fresh.path().exists(),
            "and a recent one: under the state lock, no other process writes one"
        );
        assert!(other.exists(), "another file's spool is not ours");
    }

    /// The lock file is never opened through a symlink: one planted there (by another
    /// user, in a shared directory) made keyward create its target (review 72).
    #[tokio::test]
    async fn the_lock_file_is_never_opened_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("snap.yaml");
        let elsewhere = dir.path().join("created-through-the-link");
        std::os::unix::fs::symlink(&elsewhere, StateLock::path(&state)).unwrap();
        let taken =
            StateLock::take_within(&state, "keys.control.state_file", Duration::from_millis(50))
                .await;
        assert!(matches!(taken, Err(StateLockError::Io { .. })), "{taken:?}");
        assert!(!elsewhere.exists(), "created through the link");
    }

    #[tokio::test]
    async fn a_link_to_a_state_file_not_written_yet_meets_the_same_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        std::fs::create_dir_all(&one).unwrap();
        std::fs::create_dir_all(&two).unwrap();
        let state = one.join("snap.yaml");
        let link = two.join("snap.yaml");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        let _held =
            StateLock::take_within(&state, "keys.control.state_file", Duration::from_millis(50))
                .await
                .unwrap();
        let second =
            StateLock::take_within(&link, "keys.control.state_file", Duration::from_millis(50))
                .await;
        assert!(
            matches!(second, Err(StateLockError::Held { .. })),
            "{second:?}"
        );
    }

    #[test]
    fn a_symlinked_state_file_is_written_through_to_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        let target = volume.join("snap.yaml");
        std::fs::write(&target, "old").unwrap();
        let state = dir.path().join("state.yaml");
        std::os::unix::fs::symlink(&target, &state).unwrap();
        persist(&state, b"new").unwrap();
        assert!(
            std::fs::symlink_metadata(&state)
                .unwrap()
                .file_type()
                .is_symlink(),
            "the link stays a link"
        );
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"new",
            "its target is written"
        );
        // A push cut short leaves its spool beside the target; the start removes it there.
        let (spool, _f) = Spool::create(&state).unwrap();
        let volume = std::fs::canonicalize(&volume).unwrap();
        assert_eq!(spool.path().parent(), Some(volume.as_path()));
        let left = volume.join(".snap.yaml.tmp-left");
        std::fs::write(&left, "x").unwrap();
        Spool::remove_leftovers(&state);
        assert!(!left.exists());
    }
}
