//! Stream memory operations: `cuStreamWaitValue32/64`,
//! `cuStreamWriteValue32/64` and `cuStreamBatchMemOp`, queued on the
//! server's stream (a wait holds the stream's later work there, not the
//! calling thread), or added to a capture as a batch-mem-op node.
//!
//! Checked here by CUDA's rules (`gpupool_proto::mem_ops`, the server checks
//! again), so a bad request fails at its call. A wait on mapped host memory
//! (`cuMemHostAlloc` with DEVICEMAP, managed memory) answers
//! `CUDA_ERROR_NOT_SUPPORTED`: its device half is a mirror that the host's
//! writes reach only before later calls, so a host write meant to release
//! the wait could not (the program would hang); writes to it are fine.

use crate::abi::{CuError, CuResult, get};
use crate::capture::{self, Route};
use crate::graph::Op;
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use gpupool_client::StreamId;
use gpupool_proto::mem_ops::{MemOp, WAIT_32, WAIT_64, WRITE_32, WRITE_64, word_size};
use gpupool_proto::v1;
use std::ffi::{c_uint, c_void};

/// One `CUstreamBatchMemOpParams` (a 48-byte union) as the application
/// gave it: a graph node keeps these, to hand them back.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawMemOp([u64; 6]);

const _: () =
    assert!(std::mem::size_of::<RawMemOp>() == std::mem::size_of::<cudarc::driver::sys::CUstreamBatchMemOpParams>());

impl RawMemOp {
    fn single(kind: u32, address: u64, value: u64, flags: u32) -> Self {
        Self([u64::from(kind), address, value, u64::from(flags), 0, 0])
    }

    /// The operation on the wire. Waits and writes: address at byte 8, the
    /// value at 16 (a 32-bit one in its low half), flags at 24; flushes and
    /// barriers: flags at byte 4.
    fn wire(&self) -> v1::StreamMemOp {
        let kind = self.0[0] as u32;
        match word_size(kind) {
            Some(size) => {
                let value = if size == 8 { self.0[2] } else { self.0[2] & u64::from(u32::MAX) };
                v1::StreamMemOp { kind, address: self.0[1], value, flags: self.0[3] as u32 }
            }
            None => v1::StreamMemOp { kind, address: 0, value: 0, flags: (self.0[0] >> 32) as u32 },
        }
    }
}

/// Checks `ops` (CUDA's rules, and no wait on mirrored host memory).
fn check(rt: &Runtime, ops: &[RawMemOp]) -> CuResult<Vec<v1::StreamMemOp>> {
    let wire: Vec<v1::StreamMemOp> = ops.iter().map(RawMemOp::wire).collect();
    let parsed = MemOp::parse_all(&wire).map_err(|why| {
        tracing::debug!("stream memory operations refused: {why}");
        CuError::INVALID_VALUE
    })?;
    for op in &parsed {
        if let MemOp::Wait { address, .. } = op
            && crate::mapped::mirrors(rt, *address)
        {
            tracing::debug!(
                address,
                "a stream wait on mapped host memory: host writes reach the device half only before later calls, \
                 so they could not end it"
            );
            return Err(CuError::NOT_SUPPORTED);
        }
    }
    Ok(wire)
}

/// Runs checked operations on stream `s` (a graph node's replay too).
pub(crate) fn run(rt: &Runtime, ops: &[RawMemOp], s: StreamId) -> CuResult {
    let wire = check(rt, ops)?;
    rt.session.stream_mem_ops(wire, s).map_err(CuError::from)
}

/// Checks operations for a graph node.
pub(crate) fn node_ops(rt: &Runtime, ops: &[RawMemOp]) -> CuResult<Op> {
    check(rt, ops)?;
    Ok(Op::MemOps(ops.to_vec()))
}

fn submit(h: CUstream, ops: Vec<RawMemOp>) -> CuResult {
    let rt = Runtime::with_context()?;
    match capture::route(rt, h)? {
        Route::Send(s) => run(rt, &ops, s),
        Route::Capture(s) => capture::add(s, node_ops(rt, &ops)?).map(drop),
    }
}

fn single(h: CUstream, kind: u32, address: CUdeviceptr, value: u64, flags: c_uint) -> CuResult {
    submit(h, vec![RawMemOp::single(kind, address, value, flags)])
}

/// `count` operations at `params` (the batch's own flags must be 0).
///
/// # Safety
/// `params` holds `count` `CUstreamBatchMemOpParams` (CUDA contract).
pub(crate) unsafe fn read(count: c_uint, params: *const c_void) -> CuResult<Vec<RawMemOp>> {
    if params.is_null() && count > 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: per the contract above.
    (0..count as usize).map(|i| unsafe { get(params.cast::<RawMemOp>().add(i)) }).collect()
}

fn batch(h: CUstream, count: c_uint, params: *mut c_void, flags: c_uint) -> CuResult {
    if flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: `params` holds `count` operations (CUDA contract).
    submit(h, unsafe { read(count, params) }?)
}

crate::exports! {
    fn cuStreamWaitValue32_v2(h: CUstream, addr: CUdeviceptr, value: u32, flags: c_uint) {
        single(h, WAIT_32, addr, value.into(), flags)
    }
    fn cuStreamWaitValue32_v2_ptsz(h: CUstream, addr: CUdeviceptr, value: u32, flags: c_uint) {
        single(h, WAIT_32, addr, value.into(), flags)
    }
    fn cuStreamWaitValue64_v2(h: CUstream, addr: CUdeviceptr, value: u64, flags: c_uint) {
        single(h, WAIT_64, addr, value, flags)
    }
    fn cuStreamWaitValue64_v2_ptsz(h: CUstream, addr: CUdeviceptr, value: u64, flags: c_uint) {
        single(h, WAIT_64, addr, value, flags)
    }
    fn cuStreamWriteValue32_v2(h: CUstream, addr: CUdeviceptr, value: u32, flags: c_uint) {
        single(h, WRITE_32, addr, value.into(), flags)
    }
    fn cuStreamWriteValue32_v2_ptsz(h: CUstream, addr: CUdeviceptr, value: u32, flags: c_uint) {
        single(h, WRITE_32, addr, value.into(), flags)
    }
    fn cuStreamWriteValue64_v2(h: CUstream, addr: CUdeviceptr, value: u64, flags: c_uint) {
        single(h, WRITE_64, addr, value, flags)
    }
    fn cuStreamWriteValue64_v2_ptsz(h: CUstream, addr: CUdeviceptr, value: u64, flags: c_uint) {
        single(h, WRITE_64, addr, value, flags)
    }
    fn cuStreamBatchMemOp_v2(h: CUstream, count: c_uint, params: *mut c_void, flags: c_uint) {
        batch(h, count, params, flags)
    }
    fn cuStreamBatchMemOp_v2_ptsz(h: CUstream, count: c_uint, params: *mut c_void, flags: c_uint) {
        batch(h, count, params, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_operations_read_as_cuda_lays_them_out() {
        let wait = RawMemOp::single(WAIT_32, 0x1000, 0xffff_ffff_0000_0007, 1);
        assert_eq!(wait.wire(), v1::StreamMemOp { kind: WAIT_32, address: 0x1000, value: 7, flags: 1 }, "low half");
        let write = RawMemOp::single(WRITE_64, 0x2000, u64::MAX, 1);
        assert_eq!(write.wire().value, u64::MAX);
        // A barrier: its flags right after the 32-bit type.
        let barrier = RawMemOp([6 | 1 << 32, 0, 0, 0, 0, 0]);
        assert_eq!(barrier.wire(), v1::StreamMemOp { kind: 6, address: 0, value: 0, flags: 1 });
        let params = [wait, write, barrier];
        // SAFETY: three operations.
        let back = unsafe { read(3, params.as_ptr().cast()) }.expect("read");
        assert_eq!(back, params);
        // SAFETY: nothing is read.
        assert_eq!(unsafe { read(1, std::ptr::null()) }, Err(CuError::INVALID_VALUE));
    }
}
