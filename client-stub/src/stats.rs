//! What the calling thread's calls did: how many were queued and how many
//! waited for the server. The drop-in libcuda compares these counts around
//! each CUDA entry point to tell, per entry point, the calls answered
//! locally from those queued and those that waited (`GPUPOOL_CALL_STATS`),
//! which is how waits on the hot path are found and proved gone; and the
//! time spent waiting (for replies and bulk transfers), which tells the
//! server's share of a slow call from the stub's own work.

use std::cell::Cell;

/// Counts of one thread, only ever growing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// Calls put in the batch queue without waiting.
    pub queued: u64,
    /// Times the thread waited for a reply (a synchronizing call, or the
    /// queue's bound making it read answers before sending more).
    pub waited: u64,
    /// Nanoseconds spent blocked on the server: reading replies and moving
    /// bulk bytes.
    pub wait_nanos: u64,
}

thread_local! {
    static COUNTS: Cell<CallCounts> = const { Cell::new(CallCounts { queued: 0, waited: 0, wait_nanos: 0 }) };
}

/// The calling thread's counts (zero on a thread that is exiting).
pub fn thread_counts() -> CallCounts {
    COUNTS.try_with(Cell::get).unwrap_or_default()
}

fn bump(f: impl FnOnce(&mut CallCounts)) {
    let _ = COUNTS.try_with(|c| {
        let mut v = c.get();
        f(&mut v);
        c.set(v);
    });
}

pub(crate) fn note_queued() {
    bump(|c| c.queued += 1);
}

pub(crate) fn note_waited() {
    bump(|c| c.waited += 1);
}

/// Runs `f`, a wait for the server, adding its time to the thread's.
pub(crate) fn waiting<T>(f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    bump(|c| c.wait_nanos = c.wait_nanos.saturating_add(nanos));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_thread() {
        let start = thread_counts();
        note_queued();
        note_waited();
        note_waited();
        waiting(|| std::thread::sleep(std::time::Duration::from_millis(2)));
        let now = thread_counts();
        assert_eq!((now.queued - start.queued, now.waited - start.waited), (1, 2));
        assert!(now.wait_nanos - start.wait_nanos >= 2_000_000);
        let other = std::thread::spawn(thread_counts).join().unwrap();
        assert_eq!(other, CallCounts::default());
    }
}
