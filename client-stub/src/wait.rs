//! Waiting for the I/O runtime from an application thread.
//!
//! A synchronizing call waits a round trip for its reply. Parked, the
//! calling thread is woken by the I/O thread through the kernel, which on
//! an idle (virtual) CPU costs tens of microseconds, a large share of a
//! ~100 µs round trip. So the wait first spins for a bounded time
//! ([`spin_budget`]), polling the future whenever its waker fires, and
//! parks only after that. Spinning needs a spare CPU: with fewer than
//! [`quic::SPIN_MIN_CPUS`] (a Lambda function below ~3.5 GB has one or two)
//! the spinning thread would take the I/O thread's CPU, so it parks at once.

use gpupool_proto::quic;
use std::future::Future;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a waiting thread spins before it parks: `GPUPOOL_SPIN_US`
/// (0 parks at once), else [`quic::default_spin`]. Read once per process.
pub(crate) fn spin_budget() -> Duration {
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        let set = std::env::var("GPUPOOL_SPIN_US").ok().and_then(|v| v.trim().parse().ok());
        set.map_or_else(quic::default_spin, Duration::from_micros)
    })
}

/// Wakes the waiting thread: sets the flag it spins on, and unparks it in
/// case it stopped spinning.
struct Signal {
    woken: AtomicBool,
    thread: Thread,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Runs `fut` to completion on this thread inside `rt`'s context (its
/// timers and I/O are driven by the runtime's own threads), spinning up to
/// `spin` after each pending poll before parking.
pub(crate) fn block_on_spinning<F: Future>(rt: &tokio::runtime::Runtime, fut: F, spin: Duration) -> F::Output {
    let _context = rt.enter();
    let waited = drive(fut, |woken| {
        let start = Instant::now();
        while !woken.swap(false, Ordering::Acquire) {
            if start.elapsed() < spin {
                std::hint::spin_loop();
            } else {
                // A stale unpark token only causes one extra check.
                std::thread::park_timeout(Duration::from_millis(100));
            }
        }
        true
    });
    match waited {
        Some(out) => out,
        None => unreachable!("this wait never gives up"),
    }
}

/// Polls `fut` on this thread without entering a runtime (at process exit
/// this thread's tokio context is gone) until it completes or `deadline`
/// passes. The future must not need a runtime context to make progress
/// (quinn's endpoint and connection events do not).
pub(crate) fn block_on_until<F: Future>(fut: F, deadline: Instant) -> Option<F::Output> {
    drive(fut, |woken| {
        while !woken.swap(false, Ordering::Acquire) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::park_timeout(deadline - now);
        }
        true
    })
}

/// Polls `fut` on this thread with a waker that sets a flag and unparks
/// the thread; after each pending poll `idle` waits for the flag and
/// returns `false` to give up (then `None`).
fn drive<F: Future>(fut: F, mut idle: impl FnMut(&AtomicBool) -> bool) -> Option<F::Output> {
    let signal = Arc::new(Signal { woken: AtomicBool::new(false), thread: std::thread::current() });
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        if !idle(&signal.woken) {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
    }

    #[test]
    fn completes_futures_woken_by_the_runtime_with_and_without_spinning() {
        let rt = runtime();
        for spin in [Duration::ZERO, Duration::from_micros(100), Duration::from_millis(50)] {
            // Woken from a runtime thread, after a timer (needs the context).
            let (tx, rx) = tokio::sync::oneshot::channel();
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = tx.send(7);
            });
            let got = block_on_spinning(&rt, async { tokio::time::timeout(Duration::from_secs(5), rx).await }, spin);
            assert_eq!(got.expect("in time").expect("sent"), 7);
        }
    }

    #[test]
    fn bounded_waits_end_at_their_deadline() {
        let rt = runtime();
        let (tx, rx) = tokio::sync::oneshot::channel();
        rt.spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = tx.send(3);
        });
        let got = block_on_until(rx, Instant::now() + Duration::from_secs(5));
        assert_eq!(got.expect("in time").expect("sent"), 3);
        let start = Instant::now();
        assert!(block_on_until(std::future::pending::<()>(), start + Duration::from_millis(20)).is_none());
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn ready_futures_return_at_once_and_many_waits_in_a_row_work() {
        let rt = runtime();
        assert_eq!(block_on_spinning(&rt, async { 1 }, Duration::ZERO), 1);
        for i in 0..200u32 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            rt.spawn(async move {
                let _ = tx.send(i);
            });
            assert_eq!(block_on_spinning(&rt, rx, Duration::from_micros(20)).expect("sent"), i);
        }
    }
}
