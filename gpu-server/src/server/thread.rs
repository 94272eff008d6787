//! A session's thread: it owns the session's device state
//! ([`crate::session::SessionState`]) and executes its batches in order,
//! blocking on the device, while the transport's tasks move frames.

use super::metrics::{Metrics, add, gauge};
use crate::device::{Backend, BackendSession};
use crate::error::CallError;
use crate::images::ImageCache;
use crate::session::{Exported, SessionLimits, SessionState};
use crate::staging::Staging;
use crate::swap::{MemoryUse, SessionMemory};
use gpupool_proto::v1;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// A queued batch's hold: its share of the queue's byte budget and its
/// count in the server's queued-batches and queued-bytes gauges, all given
/// back once the batch ran (or was dropped with its session).
#[derive(Debug)]
pub(crate) struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// What the decoded batch holds in memory, counted apart from the
    /// permit so that the gauge shows what the budget bounds.
    bytes: u64,
    metrics: Arc<Metrics>,
    /// When the batch was read.
    at: std::time::Instant,
}

impl Admitted {
    pub(crate) fn new(permit: tokio::sync::OwnedSemaphorePermit, bytes: u64, metrics: Arc<Metrics>) -> Self {
        add(&metrics.batches_queued, 1);
        add(&metrics.batch_bytes_queued, bytes);
        Self { _permit: permit, bytes, metrics, at: std::time::Instant::now() }
    }

    /// The batch starts now: counts the time it waited since it was read.
    fn starts(&self) {
        let waited = self.at.elapsed();
        add(&self.metrics.batch_wait_us, u64::try_from(waited.as_micros()).unwrap_or(u64::MAX));
        if waited > super::metrics::WAITED {
            add(&self.metrics.batches_waited, 1);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.batches_queued.fetch_sub(1, Relaxed);
        self.metrics.batch_bytes_queued.fetch_sub(self.bytes, Relaxed);
    }
}

/// Work for a session's worker thread, in command-stream order.
pub(crate) enum Work {
    /// A batch and its share of the queue's byte budget, given back once
    /// the batch ran.
    Batch(v1::Batch, Admitted),
    /// A reply the reader made itself (a rejected frame), kept in order.
    Reply(Box<v1::BatchReply>),
    /// Another session needs device memory: swap this one out
    /// ([`crate::swap`]); queued behind the work already queued.
    SwapOut,
    /// The session moves to another server: read its state out, after
    /// the work queued before ([`crate::session::Exported`]).
    Migrate(oneshot::Sender<Result<Exported, CallError>>),
    /// Read a piece of an exported session's memory (address, length).
    ExportMemory(u64, u64, oneshot::Sender<Result<Vec<u8>, CallError>>),
    /// A migration begins to pre-copy the session's memory while it runs:
    /// track its writes from now on; answers its mappings.
    PrecopyStart(oneshot::Sender<Result<crate::session::PrecopyStart, CallError>>),
    /// Part of a session that moves here.
    Import(Import, oneshot::Sender<Result<(), CallError>>),
    /// Answered once the work queued before it ran.
    Flush(oneshot::Sender<()>),
}

/// Part of a migrated session's state, rebuilt on its thread.
#[derive(Debug)]
pub(crate) enum Import {
    /// Calls that re-create its mappings and handles; all must succeed.
    Calls(v1::Batch),
    /// Contents of its memory at an address.
    Memory(u64, bytes::Bytes),
    /// A piece of a mirrored range's shadow at an address.
    Mirror(u64, bytes::Bytes),
}

/// How a session's work queue takes swap-out requests: without blocking,
/// and without keeping the queue open once the session's reader is gone.
pub(crate) fn swap_asker(work: &mpsc::Sender<Work>) -> crate::swap::AskSwapOut {
    let work = work.downgrade();
    Box::new(move || work.upgrade().is_some_and(|tx| tx.try_send(Work::SwapOut).is_ok()))
}

/// What a session thread reports once its device session is open: the
/// first address of its range and its context's limits.
pub(crate) type SessionReady = (u64, Vec<(u32, u64)>);

/// The session thread: opens the device session, reports it on `ready`,
/// then executes the work in order and sends each reply, until the reader
/// is gone.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<B: Backend>(
    device: Arc<B>,
    limits: SessionLimits,
    staging: Arc<Staging>,
    images: Arc<ImageCache>,
    metrics: Arc<Metrics>,
    mut work: WorkQueue,
    replies: mpsc::Sender<v1::BatchReply>,
    ready: oneshot::Sender<Result<SessionReady, CallError>>,
    memory: SessionMemory,
    base: Option<u64>,
    host_regions: Arc<crate::host_regions::HostRegions>,
) {
    let opened = match base {
        Some(base) => device.open_session_at(limits.va_size, base),
        None => device.open_session(limits.va_size),
    };
    let dev = match opened {
        Ok(d) => d,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // Device printf output per reply: with the largest inline copy, a
    // reply stays within a frame.
    let max_output = usize::try_from(limits.max_output_bytes).unwrap_or(usize::MAX);
    let mut state = SessionState::new(dev, limits, staging, images).with_memory(memory).with_host_regions(host_regions);
    let context_limits = state.limits();
    if ready.send(Ok((state.va_base(), context_limits))).is_err() {
        return;
    }
    let mut counted = MemoryUse::default();
    while let Some(item) = work.next() {
        let reply = match item {
            Work::Batch(batch, admitted) => {
                // A metered session waits out its hold first (worker
                // processes of shared leases, `crate::share`).
                let gate = crate::share::gate();
                if let Some(g) = gate {
                    g.before_batch();
                }
                admitted.starts();
                let started = std::time::Instant::now();
                let calls = batch.calls.len();
                state.memory().begin_batch();
                let mut reply = state.execute_batch(batch);
                state.memory().end_batch();
                let busy = started.elapsed();
                if busy >= crate::session::SLOW_CALL {
                    // With its calls' own lines: time outside them (swapping
                    // in, mapped memory's changes) shows as the difference.
                    tracing::debug!(calls, ms = busy.as_millis() as u64, "slow batch");
                }
                if let Some(g) = gate {
                    g.after_batch(busy);
                }
                add(&metrics.busy_us, u64::try_from(busy.as_micros()).unwrap_or(u64::MAX));
                if let Some(capture) = crate::device_output::installed() {
                    reply.device_output = capture.collect(max_output).into();
                }
                if let Some(capture) = crate::device_output::installed_stderr() {
                    // Within the same bound as the printf output: the rest
                    // follows in later replies.
                    reply.device_errors = capture.collect(max_output.saturating_sub(reply.device_output.len())).into();
                }
                add(&metrics.call_errors, u64::from(reply.error_count));
                let lost = reply.errors.iter().filter(|e| crate::CallError::ends_context(e.code)).count();
                add(&metrics.context_lost_errors, lost as u64);
                reply
            }
            Work::Reply(reply) => *reply,
            Work::SwapOut => {
                let swapped = state.swap_out();
                if let Err(e) = &swapped {
                    tracing::info!(error = %e, "session not swapped out");
                }
                // Counted before the answer wakes the session waiting for it.
                counted = count_memory(&metrics, counted, &state);
                // Nothing freed (only arrays left, say): not asked again
                // before its next batch.
                state.memory().answered(matches!(swapped, Ok(n) if n > 0));
                continue;
            }
            Work::Flush(out) => {
                let _ = out.send(());
                continue;
            }
            Work::ExportMemory(addr, len, out) => {
                let _ = out.send(state.export_memory(addr, len));
                continue;
            }
            Work::PrecopyStart(out) => {
                let _ = out.send(state.precopy_start());
                continue;
            }
            Work::Migrate(out) => {
                let _ = out.send(state.export());
                counted = count_memory(&metrics, counted, &state);
                continue;
            }
            Work::Import(item, done) => {
                let imported = match item {
                    Import::Calls(batch) => {
                        let reply = state.execute_batch(batch);
                        match reply.errors.into_iter().next() {
                            Some(e) => Err(CallError::new(e.code, format!("call {}: {}", e.index, e.message))),
                            None => Ok(()),
                        }
                    }
                    Import::Memory(addr, data) => state.import_memory(addr, &data),
                    Import::Mirror(addr, data) => state.import_mirror(addr, &data),
                };
                counted = count_memory(&metrics, counted, &state);
                let _ = done.send(imported);
                continue;
            }
        };
        counted = count_memory(&metrics, counted, &state);
        if replies.blocking_send(reply).is_err() {
            break;
        }
    }
    // The session's memory goes with it.
    count_memory_use(&metrics, counted, MemoryUse::default());
    add(&metrics.modules_preloaded_used, state.preloaded_hits());
}

/// Moves the memory gauges from what was counted to what the session
/// holds now, and counts what it swapped out or in; returns the new count.
fn count_memory<S: BackendSession>(metrics: &Metrics, counted: MemoryUse, state: &SessionState<S>) -> MemoryUse {
    let now = MemoryUse { resident: state.resident_bytes(), swapped: state.swapped_bytes() };
    count_memory_use(metrics, counted, now);
    add(&metrics.swapped_out_bytes, now.swapped.saturating_sub(counted.swapped));
    add(&metrics.swapped_in_bytes, counted.swapped.saturating_sub(now.swapped));
    now
}

fn count_memory_use(metrics: &Metrics, before: MemoryUse, now: MemoryUse) {
    gauge(&metrics.memory_mapped, before.resident, now.resident);
    gauge(&metrics.memory_swapped, before.swapped, now.swapped);
}

/// The session thread's side of its work channel.
pub(crate) struct WorkQueue {
    pub(crate) rx: mpsc::Receiver<Work>,
    /// How long to poll for the next item before sleeping
    /// ([`ServerConfig::session_spin`]).
    pub(crate) spin: std::time::Duration,
}

impl WorkQueue {
    /// The next item, `None` once the session's reader is gone.
    fn next(&mut self) -> Option<Work> {
        let start = std::time::Instant::now();
        loop {
            match self.rx.try_recv() {
                Ok(item) => return Some(item),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) if start.elapsed() < self.spin => std::hint::spin_loop(),
                Err(mpsc::error::TryRecvError::Empty) => return self.rx.blocking_recv(),
            }
        }
    }
}
