//! The one way large snapshots use every core: jobs made on the caller's thread as it
//! reads, worked on one scoped thread per CPU, and the results taken back in order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Mutex};

/// Run `produce` on the caller's thread, and `work` on every job it sends, on one scoped
/// thread per CPU. Returns what `produce` returned and the results in the order the jobs
/// were sent; `None` for a job whose work panicked (where panics unwind; the release build
/// aborts).
///
/// At most two jobs per thread wait at a time, so a producer that reads a document as it
/// goes holds only a few jobs' worth of it.
pub fn map_stream<J: Send, R: Send, P>(
    produce: impl FnOnce(&mut dyn FnMut(J)) -> P,
    work: impl Fn(J) -> R + Sync,
) -> (P, Vec<Option<R>>) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (tx, rx) = mpsc::sync_channel::<(usize, J)>(threads * 2);
    let rx = Mutex::new(rx);
    let (work, rx) = (&work, &rx);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| scope.spawn(move || drain(rx, work)))
            .collect();
        let mut sent = 0;
        let produced = produce(&mut |job| {
            // Workers outlive the sender (a panicking job is caught), so this cannot fail.
            let _ = tx.send((sent, job));
            sent += 1;
        });
        drop(tx);
        let mut results: Vec<Option<R>> = std::iter::repeat_with(|| None).take(sent).collect();
        for done in workers.into_iter().filter_map(|w| w.join().ok()) {
            for (seq, result) in done {
                results[seq] = result;
            }
        }
        (produced, results)
    })
}

/// One worker: jobs until the sender is gone, each result with its job's number.
fn drain<J, R>(
    rx: &Mutex<mpsc::Receiver<(usize, J)>>,
    work: &impl Fn(J) -> R,
) -> Vec<(usize, Option<R>)> {
    let mut done = Vec::new();
    loop {
        // The lock is held only to take a job, never while one is worked on.
        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((seq, job)) = next else {
            return done;
        };
        done.push((seq, catch_unwind(AssertUnwindSafe(|| work(job))).ok()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_the_order_jobs_were_sent() {
        let (produced, out) = map_stream(
            |send| {
                for i in 0..100u32 {
                    send(i);
                }
                "done"
            },
            |i| i * 10,
        );
        assert_eq!(produced, "done");
        assert_eq!(out, (0..100).map(|i| Some(i * 10)).collect::<Vec<_>>());
    }

    #[test]
    fn a_panicking_job_is_none_and_the_rest_go_on() {
        let (_, out) = map_stream(
            |send| (0..10u32).for_each(send),
            |i| {
                assert_ne!(i, 3, "job 3 panics");
                i
            },
        );
        assert_eq!(out.iter().filter(|r| r.is_none()).count(), 1);
        assert_eq!(out[3], None);
        assert_eq!(out[9], Some(9));
        let (_, none) = map_stream(|_send| (), |i: u32| i);
        assert!(none.is_empty());
    }
}
