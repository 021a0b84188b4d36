//! The one place the current snapshot lives.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::Snapshot;

/// Holds the current snapshot. Readers take one `load()` per request and make every
/// decision from it; writers swap a whole, already-validated snapshot. A request in flight
/// keeps the snapshot it started with alive through its `Arc`.
#[derive(Default)]
pub struct KeyStore {
    current: ArcSwapOption<Snapshot>,
    /// Moved after each swap: a watcher tells a change by one load, not a snapshot's.
    generation: std::sync::atomic::AtomicU64,
}

impl KeyStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current snapshot, `None` until one valid snapshot has been loaded.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// A cheap borrow for the hot path (no reference-count traffic).
    pub fn guard(&self) -> arc_swap::Guard<Option<Arc<Snapshot>>> {
        self.current.load()
    }

    /// Publish a validated snapshot; returns the one it replaced.
    pub fn store(&self, snapshot: Arc<Snapshot>) -> Option<Arc<Snapshot>> {
        let old = self.current.swap(Some(snapshot));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        old
    }

    /// How many snapshots were published: one that moved since it was read has seen a swap.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Source;

    #[test]
    fn starts_empty_then_swaps_whole() {
        let store = KeyStore::new();
        assert!(!store.is_loaded());
        let first = Arc::new(Snapshot::empty(Source::File));
        assert!(store.store(first.clone()).is_none());
        let held = store.load().unwrap();
        let second = Arc::new(Snapshot::empty(Source::Control));
        let old = store.store(second).unwrap();
        assert!(Arc::ptr_eq(&old, &first));
        // A reader that loaded before the swap still sees its own snapshot.
        assert_eq!(held.source, Source::File);
        assert_eq!(store.load().unwrap().source, Source::Control);
    }
}
