//! Counts that one thread writes and any thread reads. A worker thread's own counters (its
//! metrics shard, its in-flight share) are added to with a load and a store, not a locked
//! read-modify-write: those cost tens of cycles each, and a request made a dozen of them.
//! Debug builds check that a count keeps to one writer (a second would lose adds).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

#[derive(Default)]
pub struct ThreadCount {
    value: AtomicU64,
    #[cfg(debug_assertions)]
    writer: std::sync::OnceLock<std::thread::ThreadId>,
}

impl ThreadCount {
    /// Add `n` (wrapping). Only the count's own thread may.
    pub fn add(&self, n: u64) {
        self.check_writer();
        // No locked instruction either way (plain moves on x86); Release and Acquire order
        // one count's adds before another's for readers that read them in reverse.
        self.value
            .store(self.value.load(Relaxed).wrapping_add(n), Release);
    }

    /// Take `n` away (wrapping). Only the count's own thread may.
    pub fn sub(&self, n: u64) {
        self.add(n.wrapping_neg());
    }

    pub fn get(&self) -> u64 {
        self.value.load(Acquire)
    }

    #[cfg(debug_assertions)]
    fn check_writer(&self) {
        let me = std::thread::current().id();
        let writer = *self.writer.get_or_init(|| me);
        assert_eq!(
            writer, me,
            "a thread's count is written by that thread alone"
        );
    }

    #[cfg(not(debug_assertions))]
    fn check_writer(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_and_takes_away() {
        let c = ThreadCount::default();
        c.add(3);
        c.sub(1);
        assert_eq!(c.get(), 2);
        c.sub(2);
        assert_eq!(c.get(), 0);
    }

    #[test]
    #[cfg(debug_assertions)]
    fn a_second_writer_is_caught() {
        let c = ThreadCount::default();
        c.add(1);
        let other = std::thread::scope(|s| s.spawn(|| c.add(1)).join());
        assert!(
            other.is_err(),
            "another thread's add must panic in debug builds"
        );
        assert_eq!(c.get(), 1);
    }
}
