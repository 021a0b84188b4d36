//! One file watcher, for the key file and the TLS files: files that may be rewritten in
//! place, renamed over, or swapped through a symlink (Kubernetes mounts a ConfigMap or a
//! Secret through a `..data` symlink that is repointed at once).
//!
//! Polled, not notified: every interval (or when a trigger fires, e.g. SIGHUP) each path is
//! `stat`ed with symlinks followed, and the files are read and their content hashed when a
//! stat changed, when triggered, or every `full_check_every` polls (for filesystems whose
//! timestamps are too coarse to show a quick rewrite). What is watched is acted on only
//! when the content hash differs from the last one acted on and two looks in a row found
//! the same new content (a file rewritten in place may be read half-written, and half a
//! key file can parse: a key cut before its `status: disabled` line would be let in). A
//! trigger acts even on content already acted on, but also only once two looks
//! [`SETTLE`] apart agree. Reading, hashing and acting run off the async threads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

/// How long a triggered look waits for a second look to agree with it (at most one poll
/// interval): a SIGHUP sent by a tool that reacts to the first write of a file rewritten in
/// place would otherwise load the half written so far.
pub const SETTLE: Duration = Duration::from_millis(250);

/// What a [`Watch`] watches, and what it does on a change.
pub trait Watched: Send + Sync + 'static {
    /// A hash of the files' content, compared between looks.
    type Digest: PartialEq + Send + 'static;
    /// What a look read (handed to [`changed`](Self::changed), so what is acted on is
    /// exactly what was hashed, where the watched thing wants that).
    type Content: Send + 'static;
    type Error: Send + 'static;

    /// The files whose `stat` is checked on every poll.
    fn paths(&self) -> &[PathBuf];

    /// Read the files and hash their content (blocking).
    fn read(&self) -> Result<(Self::Digest, Self::Content), Self::Error>;

    /// The content changed (or a look was triggered): act on it (blocking).
    fn changed(&self, content: Self::Content) -> Taken<Self::Digest>;

    /// The files could not be read. `report` is true on the first failure after a good
    /// read and on triggered looks, so a missing file is not reported on every poll.
    fn unreadable(&self, error: Self::Error, report: bool);
}

/// What came of acting on new content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken<D> {
    /// Acted on as read: taken, or refused (content refused is not acted on again until
    /// it changes).
    AsRead,
    /// What was taken was read again and is newer than what was hashed: its digest.
    Other(D),
    /// Not acted on yet, and not refused for good (a certificate not valid yet, a file
    /// rewritten since the looks agreed on it): look again at the next poll.
    Later,
}

/// A polling watcher over a [`Watched`]; [`run`](Self::run) until dropped.
pub struct Watch<W: Watched> {
    watched: Arc<W>,
    interval: Duration,
    full_check_every: u32,
    trigger: Option<Arc<Notify>>,
    last: Option<W::Digest>,
    /// The files' stamps when the watch was made: a change after that is seen.
    stamps: Vec<Option<Stamp>>,
}

impl<W: Watched> Watch<W> {
    /// Poll every `interval`, reading the files on every poll; `last` is the digest of the
    /// content already acted on, if any.
    pub fn new(watched: W, interval: Duration, last: Option<W::Digest>) -> Self {
        Self {
            stamps: stamps(watched.paths()),
            watched: Arc::new(watched),
            interval: interval.max(Duration::from_millis(1)),
            full_check_every: 1,
            trigger: None,
            last,
        }
    }

    /// Read the files only when a `stat` changed, or once in `polls` polls.
    pub fn stat_first(mut self, polls: u32) -> Self {
        self.full_check_every = polls.max(1);
        self
    }

    /// Also look (and act even if nothing changed) whenever `trigger` fires.
    pub fn triggered_by(mut self, trigger: Arc<Notify>) -> Self {
        self.trigger = Some(trigger);
        self
    }

    pub async fn run(mut self) {
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_stamps = std::mem::take(&mut self.stamps);
        let mut polls_since_read = 0;
        let mut error_reported = false;
        // New content seen once, to be acted on when the next look finds it unchanged, and
        // the file untouched since (the same stamps): two looks that each caught a rewrite
        // in place at the same point (the same half) agree on content, never on stamps.
        let mut pending: Option<(W::Digest, Vec<Option<Stamp>>)> = None;
        // A triggered look waiting for its second look.
        let mut settling = false;
        let settle = SETTLE.min(self.interval);
        loop {
            let forced = if std::mem::take(&mut settling) {
                tokio::time::sleep(settle).await;
                true
            } else {
                match &self.trigger {
                    Some(trigger) => tokio::select! {
                        _ = tick.tick() => false,
                        () = trigger.notified() => true,
                    },
                    None => {
                        tick.tick().await;
                        false
                    }
                }
            };
            // A `stat` per poll; the files are read and hashed only when they may have changed.
            let now = stamps(self.watched.paths());
            polls_since_read += 1;
            let seen = now.iter().all(Option::is_some) && now == last_stamps;
            if !forced && seen && polls_since_read < self.full_check_every && pending.is_none() {
                continue;
            }
            polls_since_read = 0;
            last_stamps = now;
            let watched = self.watched.clone();
            let read = tokio::task::spawn_blocking(move || {
                let read = watched.read();
                (read, stamps(watched.paths()))
            });
            let (digest, content) = match read.await {
                Ok((Ok(read), after)) if after == last_stamps => read,
                // Written to as it was read: no look; the next one decides.
                Ok((Ok(_), _)) => {
                    pending = None;
                    settling = forced;
                    continue;
                }
                Ok((Err(e), _)) => {
                    self.watched.unreadable(e, forced || !error_reported);
                    error_reported = true;
                    continue;
                }
                Err(_) => continue,
            };
            error_reported = false;
            if !forced && self.last.as_ref() == Some(&digest) {
                pending = None;
                continue;
            }
            // Changed since the last look (or triggered): acted on once the next look agrees
            // with it (at the next poll, or after `settle` when triggered).
            let look = (digest, last_stamps.clone());
            if !pending.as_ref().is_some_and(|p| agree(p, &look)) {
                pending = Some(look);
                settling = forced;
                continue;
            }
            pending = None;
            // Content that was refused is not acted on again until it changes.
            self.last = Some(look.0);
            let watched = self.watched.clone();
            match tokio::task::spawn_blocking(move || watched.changed(content)).await {
                Ok(Taken::Other(taken)) => self.last = Some(taken),
                Ok(Taken::AsRead) => {}
                Ok(Taken::Later) => {
                    // Read and act again at the next poll, as if it had just settled.
                    pending = self.last.take().map(|d| (d, last_stamps.clone()));
                }
                Err(e) => tracing::error!(error = %e, "watched file reload task failed"),
            }
        }
    }
}

/// Do two looks agree: the same content, each file either untouched between them (the same
/// stamp: two looks that each caught a rewrite in place at the same point read the same
/// half, but never under the same stamp) or replaced by another (a new inode: a rename
/// over it, which is whole; a writer renaming more often than the interval never showed
/// the same stamp twice)?
fn agree<D: PartialEq>(a: &(D, Vec<Option<Stamp>>), b: &(D, Vec<Option<Stamp>>)) -> bool {
    a.0 == b.0
        && a.1.len() == b.1.len()
        && a.1.iter().zip(&b.1).all(|pair| match pair {
            (Some(x), Some(y)) => x.same_or_replaced(y),
            // Gone in both looks: what was read stood without it (the TLS watcher reads the
            // client lists when the certificate is gone mid-rotation).
            (None, None) => true,
            _ => false,
        })
}

/// What `stat` says of the file behind a path, symlinks followed (so a `..data` swap, which
/// points the path at another inode, shows as a change). The change time too: a writer
/// that puts the modification time back still moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    inode: u64,
}

impl Stamp {
    /// The same file untouched, or another put in its place (a new inode: a rename).
    pub fn same_or_replaced(&self, other: &Stamp) -> bool {
        self == other || self.inode != other.inode
    }

    /// Left alone for at least `quiet` by its own times: its last write and change that long
    /// before `now`. A time in the future (copied with `cp -p` from a host whose clock is
    /// ahead, or this clock stepped back) says nothing: the file must then be seen to hold
    /// still, the same stamp twice `quiet` apart.
    pub fn quiet_for(&self, quiet: Duration, now: SystemTime) -> bool {
        let written = self.modified.and_then(|m| now.duration_since(m).ok());
        let changed = SystemTime::UNIX_EPOCH
            .checked_add(Duration::new(
                u64::try_from(self.changed.0).unwrap_or(0),
                u32::try_from(self.changed.1).unwrap_or(0),
            ))
            .and_then(|c| now.duration_since(c).ok());
        written.is_some_and(|w| w >= quiet) && changed.is_some_and(|c| c >= quiet)
    }
}

pub fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let (inode, changed) = {
        use std::os::unix::fs::MetadataExt;
        (meta.ino(), (meta.ctime(), meta.ctime_nsec()))
    };
    #[cfg(not(unix))]
    let (inode, changed) = (0, (0, 0));
    Some(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        changed,
        inode,
    })
}

/// `read`, if the file held still while it ran: its stamp before and after, when equal.
/// A file rewritten in place while it is read may be read half-written, and half a key
/// file can parse; a read the stamp moved under is no look at all.
pub fn steady<T, E>(
    path: &Path,
    read: impl FnOnce() -> Result<T, E>,
) -> Result<Option<(T, Stamp)>, E> {
    let before = stamp(path);
    let read = read()?;
    Ok(before
        .filter(|b| stamp(path).as_ref() == Some(b))
        .map(|b| (read, b)))
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<Stamp>> {
    paths.iter().map(|p| stamp(p)).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// Counts reads and records every content acted on.
    struct Probe {
        paths: Vec<PathBuf>,
        reads: AtomicUsize,
        taken: Mutex<Vec<String>>,
        changed: Arc<Notify>,
    }

    impl Watched for Probe {
        type Digest = String;
        type Content = String;
        type Error = std::io::Error;
        fn paths(&self) -> &[PathBuf] {
            &self.paths
        }
        fn read(&self) -> std::io::Result<(String, String)> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let text = std::fs::read_to_string(&self.paths[0])?;
            Ok((text.clone(), text))
        }
        fn changed(&self, content: String) -> Taken<String> {
            self.taken.lock().unwrap().push(content);
            self.changed.notify_one();
            Taken::AsRead
        }
        fn unreadable(&self, _: std::io::Error, _: bool) {}
    }

    fn probe(dir: &Path) -> Probe {
        Probe {
            paths: vec![dir.join("f")],
            reads: AtomicUsize::new(0),
            taken: Mutex::new(Vec::new()),
            changed: Arc::new(Notify::new()),
        }
    }

    /// A directory holding `f` with `text`.
    fn file_holding(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, text).unwrap();
        (dir, file)
    }

    /// A watch of `dir`'s `f` every `ms`, having acted on "one", running: its probe, what
    /// is told of each change, its task.
    fn watching(dir: &Path, ms: u64) -> (Arc<Probe>, Arc<Notify>, tokio::task::JoinHandle<()>) {
        let p = probe(dir);
        let changed = p.changed.clone();
        let watched = Watch::new(p, Duration::from_millis(ms), Some("one".to_string()));
        let probe = watched.watched.clone();
        (probe, changed, tokio::spawn(watched.run()))
    }

    async fn next_change(changed: &Notify) {
        tokio::time::timeout(Duration::from_secs(10), changed.notified())
            .await
            .expect("the change is seen");
    }

    /// Content seen once is not acted on: a file caught half-written (its writer still
    /// busy) is taken only if the next look finds it the same.
    #[tokio::test]
    async fn acts_only_on_content_two_looks_agree_on() {
        let (dir, file) = file_holding("one");
        let (probe, changed, task) = watching(dir.path(), 50);
        let reads = || probe.reads.load(Ordering::SeqCst);
        let before = reads();
        std::fs::write(&file, "half").unwrap();
        // The watcher's next look reads the half; the rest is written before the one after.
        while reads() < before + 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        std::fs::write(&file, "half and the rest").unwrap();
        next_change(&changed).await;
        task.abort();
        assert_eq!(*probe.taken.lock().unwrap(), ["half and the rest"]);
    }

    /// Two looks that each caught a rewrite in place at the same point read the same half:
    /// they agree on content, never on the file's stamp, and nothing is acted on until a
    /// look finds the file untouched since the one before.
    #[tokio::test]
    async fn looks_that_each_caught_a_rewrite_midway_do_not_agree() {
        let (dir, file) = file_holding("one");
        let (probe, changed, task) = watching(dir.path(), 50);
        let reads = || probe.reads.load(Ordering::SeqCst);
        for _ in 0..4 {
            let before = reads();
            // Apart by more than the kernel's timestamp tick, as rewrites are.
            tokio::time::sleep(Duration::from_millis(15)).await;
            std::fs::write(&file, "half").unwrap();
            while reads() == before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        std::fs::write(&file, "half and the rest").unwrap();
        next_change(&changed).await;
        task.abort();
        assert_eq!(*probe.taken.lock().unwrap(), ["half and the rest"]);
    }

    /// A file renamed over more often than the interval has a new inode at every look: two
    /// looks that find the same content in it agree (a rename is whole).
    #[tokio::test]
    async fn a_file_renamed_over_faster_than_the_interval_is_taken() {
        let (dir, _file) = file_holding("one");
        let (probe, changed, task) = watching(dir.path(), 60);
        let renaming = tokio::spawn({
            let dir = dir.path().to_path_buf();
            async move {
                for i in 0.. {
                    let tmp = dir.join(format!("f.{i}"));
                    std::fs::write(&tmp, "two").unwrap();
                    std::fs::rename(&tmp, dir.join("f")).unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        next_change(&changed).await;
        renaming.abort();
        task.abort();
        assert_eq!(*probe.taken.lock().unwrap(), ["two"]);
    }

    /// `steady`: a read the file's stamp moved under is no look; `quiet_for` counts from
    /// the last write.
    #[test]
    fn a_read_is_steady_only_if_the_file_held_still() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "one").unwrap();
        let read = steady(&file, || std::fs::read_to_string(&file)).unwrap();
        let (text, stamp) = read.expect("held still");
        assert_eq!(text, "one");
        let now = SystemTime::now();
        assert!(!stamp.quiet_for(Duration::from_secs(60), now));
        assert!(stamp.quiet_for(Duration::ZERO, now + Duration::from_secs(1)));
        let moved = steady(&file, || {
            std::thread::sleep(Duration::from_millis(15));
            std::fs::write(&file, "two!").map(|()| "read")
        })
        .unwrap();
        assert!(moved.is_none(), "written during the read");
    }

    /// A rewrite in place and a symlink swap are both seen; unchanged content is acted on
    /// once; a trigger acts even when nothing changed.
    #[tokio::test]
    async fn sees_rewrites_and_symlink_swaps_and_acts_once_per_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "one").unwrap();
        std::fs::write(dir.path().join("b"), "two").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("f")).unwrap();
        #[cfg(not(unix))]
        std::fs::write(dir.path().join("f"), "one").unwrap();
        let p = probe(dir.path());
        let changed = p.changed.clone();
        let trigger = Arc::new(Notify::new());
        let watched = Watch::new(p, Duration::from_millis(10), Some("one".to_string()))
            .stat_first(1000)
            .triggered_by(trigger.clone());
        let probe = watched.watched.clone();
        let task = tokio::spawn(watched.run());

        #[cfg(unix)]
        {
            let tmp = dir.path().join("f.new");
            std::os::unix::fs::symlink(dir.path().join("b"), &tmp).unwrap();
            std::fs::rename(&tmp, dir.path().join("f")).unwrap();
        }
        #[cfg(not(unix))]
        std::fs::write(dir.path().join("f"), "two").unwrap();
        next_change(&changed).await;
        std::fs::write(dir.path().join("b"), "three!").unwrap();
        next_change(&changed).await;
        trigger.notify_one();
        next_change(&changed).await;
        task.abort();
        assert_eq!(*probe.taken.lock().unwrap(), ["two", "three!", "three!"]);
    }

    /// With `stat_first`, an unchanged file is not read on every poll.
    #[tokio::test]
    async fn an_unchanged_stat_skips_the_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "one").unwrap();
        let watched =
            Watch::new(probe(dir.path()), Duration::from_millis(5), None).stat_first(1000);
        let probe = watched.watched.clone();
        let task = tokio::spawn(watched.run());
        std::fs::write(dir.path().join("f"), "two").unwrap();
        next_change(&probe.changed).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        task.abort();
        assert_eq!(
            probe.reads.load(Ordering::SeqCst),
            2,
            "read twice (seen, then settled), then stat only"
        );
        assert_eq!(*probe.taken.lock().unwrap(), ["two"]);
    }
}
