//! What the calling thread's calls did: how many were queued and how many
//! waited for the server. The drop-in libcuda compares these counts around
//! each CUDA entry point to tell, per entry point, the calls answered
//! locally from those queued and those that waited (`GPUPOOL_CALL_STATS`),
//! which is how waits on the hot path are found and proved gone.

use std::cell::Cell;

/// Counts of one thread, only ever growing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// Calls put in the batch queue without waiting.
    pub queued: u64,
    /// Times the thread waited for a reply (a synchronizing call, or the
    /// queue's bound making it read answers before sending more).
    pub waited: u64,
}

thread_local! {
    static COUNTS: Cell<CallCounts> = const { Cell::new(CallCounts { queued: 0, waited: 0 }) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_thread() {
        let start = thread_counts();
        note_queued();
        note_waited();
        note_waited();
        let now = thread_counts();
        assert_eq!((now.queued - start.queued, now.waited - start.waited), (1, 2));
        let other = std::thread::spawn(thread_counts).join().unwrap();
        assert_eq!(other, CallCounts::default());
    }
}
