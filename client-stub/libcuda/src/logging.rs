//! Logs go to stderr, filtered by `GPUPOOL_LOG` (default `warn`), set up
//! once and only if the host program has not installed a subscriber.
//!
//! Libraries that unload at process exit (cuBLAS's runtime) still call the
//! driver from their destructors, after thread-local storage is gone; the
//! log subscriber needs it. An exit handler turns logging off first.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

static EXITING: AtomicBool = AtomicBool::new(false);

extern "C" fn mark_exiting() {
    EXITING.store(true, Ordering::SeqCst);
}

/// `false` once the process is exiting: log nothing then.
pub(crate) fn enabled() -> bool {
    !EXITING.load(Ordering::Relaxed)
}

pub(crate) fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("GPUPOOL_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
        // SAFETY: registers a function without captured state; atexit only
        // fails when its table is full, and then logging simply stays on.
        unsafe { libc::atexit(mark_exiting) };
    });
}
