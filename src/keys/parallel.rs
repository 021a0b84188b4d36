//! The one way large snapshots use every core: split the work into contiguous parts, run
//! each on a scoped thread, and take the results back in order.

/// `items` cut into contiguous runs, one per CPU (fewer when there are fewer items), each
/// with the index of its first item.
pub fn runs<T>(items: &[T]) -> Vec<(usize, &[T])> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = items.len().div_ceil(cpus).max(1);
    items
        .chunks(size)
        .enumerate()
        .map(|(i, run)| (i * size, run))
        .collect()
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
        let items: Vec<u32> = (0..1_000).collect();
        let runs = runs(&items);
        assert!(!runs.is_empty() && runs.len() <= 1_000);
        let mut next = 0;
        for (first, run) in &runs {
            assert_eq!(*first, next, "contiguous, in order");
            assert_eq!(run[0] as usize, *first);
            next += run.len();
        }
        assert_eq!(next, items.len(), "every item in one run");
        assert!(super::runs::<u32>(&[]).is_empty());
    }
}
