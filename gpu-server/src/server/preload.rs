//! Module images loaded by a waiting worker before its session comes.
//!
//! A worker process opens its device context ahead of a session (a warm
//! worker); it then loads the module images its server's sessions used most
//! recently (the image directory's newest files, up to
//! `ServerConfig::image_preload_bytes`), and looks again every 250 ms for
//! images the programs before it are still writing, so the next program that uses the
//! same libraries finds their modules loaded: the driver's load is most of a
//! library's first use (~1 ms per image, hundreds of images for cuBLAS;
//! `bench/results/*-module-load-cost.md`). A session takes each module at
//! most once ([`crate::device::Preloaded`]); the preload stops when the
//! session is assigned, so it never competes with the session's calls for
//! long.

use super::metrics::{Metrics, add};
use super::state::AnyDevice;
use crate::images::ImageCache;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What a worker preloads, and into which device.
#[derive(Debug)]
pub(crate) struct Preloader {
    pub(super) device: AnyDevice,
    pub(super) images: Arc<ImageCache>,
    pub(super) budget: u64,
    pub(super) metrics: Arc<Metrics>,
}

/// How often a waiting worker looks for images written since its last look
/// (the program before the next one may still be loading its libraries
/// when the next one's worker starts).
const RESCAN: Duration = Duration::from_millis(250);

impl Preloader {
    /// Loads images, and again as new ones appear, until the budget is used
    /// or `stop` is set; returns how many modules it loaded. Blocking: run
    /// it on a thread of its own.
    pub(crate) fn run(&self, stop: &AtomicBool) -> u64 {
        let started = Instant::now();
        let (mut loaded, mut bytes) = (0u64, 0u64);
        // Every image tried, loaded or not (one another device's code, say,
        // is not tried again).
        let mut tried = HashSet::new();
        'scan: while !stop.load(Ordering::Acquire) {
            for key in self.images.recent_on_disk(self.budget) {
                if stop.load(Ordering::Acquire) {
                    break 'scan;
                }
                if !tried.insert(key) {
                    continue;
                }
                let Some(image) = self.images.get_for_preload(&key) else { continue };
                if bytes.saturating_add(image.len() as u64) > self.budget {
                    break 'scan;
                }
                match self.device.preload_module(&key, &image) {
                    Ok(true) => {
                        loaded += 1;
                        bytes += image.len() as u64;
                        add(&self.metrics.modules_preloaded, 1);
                    }
                    Ok(false) => {}
                    Err(e) => tracing::debug!(error = %e, "module image not preloaded"),
                }
            }
            std::thread::sleep(RESCAN);
        }
        tracing::debug!(
            modules = loaded,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "module images preloaded"
        );
        loaded
    }
}
