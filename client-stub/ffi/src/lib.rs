//! What gpupool's drop-in libraries (`libcuda.so.1`, `libnvidia-ml.so.1`)
//! share at their C border: logging to stderr that is safe to call at any
//! time, including from other libraries' destructors at process exit, and
//! the text of a caught panic. Each library links its own copy.
#![allow(unsafe_code)] // atexit only

pub mod host_facts;
pub mod symbols;

use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

static EXITING: AtomicBool = AtomicBool::new(false);

extern "C" fn mark_exiting() {
    EXITING.store(true, Ordering::SeqCst);
}

/// Sets up logging to stderr, filtered by `GPUPOOL_LOG` (default `warn`),
/// once, and only if the host program has not installed a subscriber.
///
/// Libraries that unload at process exit (cuBLAS's runtime) still call the
/// driver from their destructors, after thread-local storage is gone, which
/// the log subscriber needs: an exit handler turns logging off first.
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("GPUPOOL_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        // Every event passes `logging_enabled` first, so that none reaches
        // the formatter (whose buffers are thread-local) once exit began,
        // whichever log line a destructor's driver call comes to.
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .finish()
            .with(tracing_subscriber::filter::filter_fn(|_| logging_enabled()));
        let _ = subscriber.try_init();
        // SAFETY: registers a function without captured state; atexit only
        // fails when its table is full, and then logging simply stays on.
        unsafe { libc::atexit(mark_exiting) };
    });
}

/// Runs `f` when the process exits (C's `atexit`); `false` if the table of
/// exit handlers is full.
pub fn at_exit(f: extern "C" fn()) -> bool {
    // SAFETY: `f` is a plain function without captured state, valid for the
    // life of the process (it lives in this library, which is never unloaded
    // before exit handlers run).
    unsafe { libc::atexit(f) == 0 }
}

/// A thread-local with a destructor: reading it fails once the calling
/// thread's thread-local storage is being destroyed.
struct Alive;

impl Drop for Alive {
    fn drop(&mut self) {}
}

thread_local! {
    static ALIVE: Alive = const { Alive };
}

/// `false` once the process is exiting, or on a thread whose thread-local
/// storage is gone: the subscriber drops every event then. At `exit` the
/// C library destroys the main thread's thread-locals before it runs the
/// exit handlers, and the CUDA runtime's handler (registered after
/// [`init_logging`]'s, so run before it) still calls the driver.
fn logging_enabled() -> bool {
    !EXITING.load(Ordering::Relaxed) && ALIVE.try_with(|_| ()).is_ok()
}

/// `true` the first time `name` is seen, for "logged once by name".
pub fn first_time(name: &'static str) -> bool {
    static SEEN: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    SEEN.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashSet::new).insert(name)
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_and_first_times() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 1)).expect_err("panics");
        assert_eq!(panic_message(p.as_ref()), "boom 1");
        let p = std::panic::catch_unwind(|| panic!("static")).expect_err("panics");
        assert_eq!(panic_message(p.as_ref()), "static");
        assert!(first_time("cuX") && !first_time("cuX") && first_time("cuY"));
        init_logging();
        assert!(logging_enabled());
        // Once exit began no event reaches the formatter: a destructor's
        // driver call that logs must not touch destroyed thread-locals.
        assert!(tracing::enabled!(tracing::Level::ERROR));
        // A thread whose thread-locals are being destroyed logs nothing.
        struct LogsAtExit;
        impl Drop for LogsAtExit {
            fn drop(&mut self) {
                assert!(!logging_enabled(), "thread-locals gone: logging off");
                tracing::error!("dropped before it reaches the formatter");
            }
        }
        thread_local! {
            static LATE: std::cell::RefCell<Option<LogsAtExit>> = const { std::cell::RefCell::new(None) };
        }
        std::thread::spawn(|| {
            // Thread-locals go in reverse order of first use: LATE, used
            // first, is destroyed after ALIVE.
            LATE.with(|l| *l.borrow_mut() = Some(LogsAtExit));
            assert!(logging_enabled());
        })
        .join()
        .expect("the thread's destructors ran without a panic");
        mark_exiting();
        assert!(!tracing::enabled!(tracing::Level::ERROR));
    }
}
