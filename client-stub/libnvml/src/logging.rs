//! Logs go to stderr, filtered by `GPUPOOL_LOG` (default `warn`), set up
//! once and only if the host program has not installed a subscriber: the
//! same rule as gpupool's libcuda, so one variable steers both.

use std::sync::Once;

pub(crate) fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("GPUPOOL_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    });
}
