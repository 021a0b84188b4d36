//! The one way large snapshots use every core: split the work into contiguous parts, run
//! each on a scoped thread, and take the results back in order.

/// Threads for `items` units of work: one per CPU, but none with fewer than `per_thread`.
pub fn threads_for(items: usize, per_thread: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.div_ceil(per_thread.max(1)))
        .max(1)
}

/// `f` on every part, each on its own scoped thread (one part runs on the caller's), the
/// results in the parts' order; `None` for a part whose thread panicked.
pub fn map_parts<T: Send, R: Send>(parts: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<Option<R>> {
    if parts.len() <= 1 {
        return parts.into_iter().map(|p| Some(f(p))).collect();
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|p| scope.spawn(move || f(p)))
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order() {
        let out = map_parts((0..8).collect(), |i: u32| i * 10);
        assert_eq!(out, (0..8).map(|i| Some(i * 10)).collect::<Vec<_>>());
        assert_eq!(threads_for(0, 10), 1);
        assert_eq!(threads_for(5, 10), 1);
        assert!(threads_for(1_000, 1) >= 1);
    }
}
