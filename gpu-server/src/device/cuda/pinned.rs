//! A session's pinned staging ring for asynchronous host-to-device copies.
//!
//! A client's `cuMemcpyHtoDAsync` from pageable memory reaches the server as
//! bytes in a batch (or staged chunks), which are freed once the call
//! returns. Copied with `cuMemcpyHtoD` and a synchronize, every such copy
//! waited for all the stream's earlier work: a loop of kernels with a small
//! copy now and then drained the GPU at each copy, where natively the copy
//! only queues. Here the bytes go into pinned memory the session owns, the
//! DMA is queued from there on the stream, and an event recorded after it
//! says when that space may be written again. Space is handed out in order
//! around the ring; a copy that finds its space still in flight waits for
//! the oldest copies first (the ring's size bounds what is in flight).
//! Copies up to `SMALL_ASYNC_COPY` (64 KiB) do not come here: the driver
//! stages those from pageable memory itself (`CudaSession::write_async`).

use super::driver::{self, warn_on_error};
use super::resources::{Context, Event};
use crate::device::DeviceResult;
use cudarc::driver::sys::{self, CUstream};
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::Arc;

/// Bytes of pinned memory a session's ring holds.
pub(super) const RING_BYTES: usize = 32 << 20;

/// Largest copy that goes through the ring; larger ones are synchronous.
pub(super) const MAX_RING_COPY: usize = RING_BYTES / 4;

/// A copy in flight: its space in the ring and the event after its DMA.
struct InFlight {
    start: usize,
    end: usize,
    done: Event,
}

pub(super) struct PinnedRing {
    base: *mut u8,
    /// Where the next copy's space starts.
    head: usize,
    in_flight: VecDeque<InFlight>,
    /// Events of finished copies, reused.
    spare: Vec<Event>,
    context: Arc<Context>,
}

impl std::fmt::Debug for PinnedRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedRing").field("head", &self.head).field("in_flight", &self.in_flight.len()).finish()
    }
}

impl PinnedRing {
    /// Allocates the ring's pinned memory (the context is current).
    pub(super) fn new(context: Arc<Context>) -> DeviceResult<Self> {
        let mut base: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current on this thread.
        driver::check(unsafe { sys::cuMemHostAlloc(&mut base, RING_BYTES, 0) }, "cuMemHostAlloc")?;
        Ok(Self { base: base.cast(), head: 0, in_flight: VecDeque::new(), spare: Vec::new(), context })
    }

    /// Queues a copy of `data` (at most [`MAX_RING_COPY`] bytes) to `dst`
    /// on `stream` from the ring; returns without waiting for the DMA.
    pub(super) fn copy(&mut self, stream: CUstream, dst: u64, data: &[u8]) -> DeviceResult<()> {
        let len = data.len();
        debug_assert!(len <= MAX_RING_COPY);
        self.reclaim();
        let start = if self.head + len <= RING_BYTES { self.head } else { 0 };
        let end = start + len;
        // Copies still reading this space are among the oldest: wait for
        // them (and any older ones) in order.
        while self.in_flight.iter().any(|c| c.start < end && start < c.end) {
            let Some(oldest) = self.in_flight.pop_front() else { break };
            // SAFETY: a live event of this context, recorded after its copy.
            driver::check(unsafe { sys::cuEventSynchronize(oldest.done.raw) }, "cuEventSynchronize")?;
            self.spare.push(oldest.done);
        }
        // SAFETY: `[start, end)` lies inside the ring's allocation and no
        // queued copy reads it any more (waited for above).
        let space = unsafe { std::slice::from_raw_parts_mut(self.base.add(start), len) };
        space.copy_from_slice(data);
        let done = match self.spare.pop() {
            Some(e) => e,
            None => Event::new(self.context.clone(), sys::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32)?,
        };
        // SAFETY: the source is pinned memory that stays untouched until
        // `done` completes; the driver validates `dst` and the stream.
        let queued = unsafe { sys::cuMemcpyHtoDAsync_v2(dst, space.as_ptr().cast(), len, stream) };
        if let Err(e) = driver::check(queued, "cuMemcpyHtoDAsync_v2") {
            self.spare.push(done);
            return Err(e);
        }
        // SAFETY: live event and stream of this context.
        driver::check(unsafe { sys::cuEventRecord(done.raw, stream) }, "cuEventRecord")?;
        self.in_flight.push_back(InFlight { start, end, done });
        self.head = end;
        Ok(())
    }

    /// Takes back the space of the oldest copies that have finished.
    fn reclaim(&mut self) {
        while let Some(oldest) = self.in_flight.front() {
            // SAFETY: a live event of this context.
            if unsafe { sys::cuEventQuery(oldest.done.raw) } != sys::CUresult::CUDA_SUCCESS {
                break;
            }
            if let Some(c) = self.in_flight.pop_front() {
                self.spare.push(c.done);
            }
        }
        if self.in_flight.is_empty() {
            self.head = 0;
        }
    }
}

impl Drop for PinnedRing {
    fn drop(&mut self) {
        // Queued copies read the ring until they finish.
        for c in self.in_flight.drain(..) {
            // SAFETY: a live event of this context.
            warn_on_error(unsafe { sys::cuEventSynchronize(c.done.raw) }, "cuEventSynchronize");
        }
        // SAFETY: allocated by cuMemHostAlloc in `new`; no copy reads it now.
        warn_on_error(unsafe { sys::cuMemFreeHost(self.base.cast()) }, "cuMemFreeHost");
    }
}

/// Pinned memory for the synchronous copies between the host and pitched
/// device memory or arrays (`ArrayCopy` with a host end): those go through
/// it in pieces, as one DMA each. Made at the first such copy and grown to
/// the largest piece asked for (at most [`BOUNCE_BYTES`]).
pub(super) struct Bounce {
    base: *mut u8,
    len: usize,
    _context: Arc<Context>,
}

/// Largest piece of a copy between the host and pitched device memory or
/// an array: the most pinned memory a session's [`Bounce`] holds.
pub(super) const BOUNCE_BYTES: usize = 8 << 20;

impl std::fmt::Debug for Bounce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounce").field("len", &self.len).finish()
    }
}

impl Bounce {
    pub(super) fn new(context: Arc<Context>) -> Self {
        Self { base: std::ptr::null_mut(), len: 0, _context: context }
    }

    /// At least `len` (at most [`BOUNCE_BYTES`]) bytes of pinned memory;
    /// no copy may be reading or writing it (every copy through it is
    /// waited for before it returns).
    pub(super) fn get(&mut self, len: usize) -> DeviceResult<&mut [u8]> {
        debug_assert!(len <= BOUNCE_BYTES);
        if self.len < len {
            self.free();
            let mut base: *mut c_void = std::ptr::null_mut();
            // SAFETY: valid out-pointer; the context is current on this thread.
            driver::check(unsafe { sys::cuMemHostAlloc(&mut base, len, 0) }, "cuMemHostAlloc")?;
            (self.base, self.len) = (base.cast(), len);
        }
        // SAFETY: `len` bytes of the allocation, borrowed mutably with `self`.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.base, len) })
    }

    fn free(&mut self) {
        if !self.base.is_null() {
            // SAFETY: allocated by cuMemHostAlloc in `get`; no copy uses it now.
            warn_on_error(unsafe { sys::cuMemFreeHost(self.base.cast()) }, "cuMemFreeHost");
            (self.base, self.len) = (std::ptr::null_mut(), 0);
        }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        self.free();
    }
}
