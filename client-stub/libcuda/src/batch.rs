//! Batched memory operations (CUDA 12.8 and 13): `cuMemcpyBatchAsync` (12.8's
//! form with `failIdx` and 13.0's without),
//! `cuMemcpy3DBatchAsync`, `cuMemPrefetchBatchAsync`,
//! `cuMemDiscardBatchAsync` and `cuMemDiscardAndPrefetchBatchAsync`.
//!
//! A batch is checked as a whole first, as the driver checks it (one
//! attribute or location per run of operations, indices starting at 0 and
//! rising, flags CUDA defines), so a bad batch queues nothing; then each
//! operation goes as the single call it stands for on the same stream. The
//! driver may run the operations of a batch in any order: in stream order,
//! one after another, is one of those orders.
//!
//! Copies whose source may only be read during the call
//! (`CU_MEMCPY_SRC_ACCESS_ORDER_DURING_API_CALL`) and whose source is not
//! host memory (host sources are read into the batch when queued) are
//! waited for before the call returns.

use crate::abi::{CuError, CuResult};
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUDA_MEMCPY3D_BATCH_OP, CUdeviceptr, CUmemLocation, CUmemcpyAttributes, CUstream};
use std::ffi::c_ulonglong;

/// `CU_MEMCPY_SRC_ACCESS_ORDER_*`.
const ORDER_STREAM: u32 = 1;
const ORDER_DURING_API_CALL: u32 = 2;
const ORDER_ANY: u32 = 3;
/// `CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE`, a hint.
const FLAG_PREFER_OVERLAP: u32 = 1;
/// `CU_STREAM_LEGACY`.
const STREAM_LEGACY: usize = 1;

/// The `count` entries at `p`; none when `count` is 0.
///
/// # Safety
/// `p` points to `count` readable entries (the CUDA API's arrays).
unsafe fn entries<'a, T>(p: *const T, count: usize) -> CuResult<&'a [T]> {
    if count == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, count) })
}

/// Which of `runs` applies to each of `count` operations: `starts[k]` is
/// the first operation run `k` applies to; the first is 0, each is above
/// the one before and below `count`, and there are at most `count` runs.
fn run_of_each(starts: &[usize], count: usize) -> CuResult<Vec<usize>> {
    let rising = starts.windows(2).all(|w| w[0] < w[1]);
    if count == 0
        || starts.is_empty()
        || starts.len() > count
        || starts[0] != 0
        || !rising
        || starts[starts.len() - 1] >= count
    {
        return Err(CuError::INVALID_VALUE);
    }
    let mut run = Vec::with_capacity(count);
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(count);
        run.extend(std::iter::repeat_n(k, end - start));
    }
    Ok(run)
}

/// The batch calls' stream rule: not the legacy stream (`0` is the legacy
/// stream except in a per-thread-default-stream build).
fn check_stream(h: CUstream, per_thread: bool) -> CuResult {
    match h as usize {
        STREAM_LEGACY => Err(CuError::INVALID_VALUE),
        0 if !per_thread => Err(CuError::INVALID_VALUE),
        _ => Ok(()),
    }
}

fn check_order(order: u32, flags: u32) -> CuResult {
    if !matches!(order, ORDER_STREAM | ORDER_DURING_API_CALL | ORDER_ANY) || flags & !FLAG_PREFER_OVERLAP != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    Ok(())
}

/// Waits for `h` when a copy of the batch must have read its source by
/// the time the call returns. A batch captured into a graph reads its
/// sources when the graph runs, as every captured copy does: nothing to
/// wait for (and a capturing stream may not be synchronized).
fn finish_reads(wait: bool, route: &crate::capture::Route, h: CUstream) -> CuResult {
    if wait && matches!(route, crate::capture::Route::Send(_)) { crate::stream::synchronize(h) } else { Ok(()) }
}

/// A batch's failure, and the operation it came from when it came from
/// one (the `failIdx` of CUDA 12.8's forms).
type Failed = (CuError, Option<usize>);

/// The batch as a whole was refused.
fn whole(e: CuError) -> Failed {
    (e, None)
}

/// The answer of CUDA 12.8's forms: `failIdx` is the failing operation's
/// index, `SIZE_MAX` when the failure is not one operation's.
///
/// # Safety
/// `fail_idx` is null or writable.
unsafe fn with_fail_index(result: Result<(), Failed>, fail_idx: *mut usize) -> CuResult {
    result.map_err(|(e, index)| {
        if !fail_idx.is_null() {
            // SAFETY: per this function's contract.
            unsafe { fail_idx.write(index.unwrap_or(usize::MAX)) };
        }
        e
    })
}

/// `cuMemcpyBatchAsync` (both forms).
///
/// # Safety
/// The arrays hold `count` (`dsts`, `srcs`, `sizes`) and `num_attrs`
/// (`attrs`, `attrs_idxs`) entries, per the CUDA API.
#[allow(clippy::too_many_arguments)]
unsafe fn memcpy_batch(
    dsts: *const CUdeviceptr,
    srcs: *const CUdeviceptr,
    sizes: *const usize,
    count: usize,
    attrs: *const CUmemcpyAttributes,
    attrs_idxs: *const usize,
    num_attrs: usize,
    h: CUstream,
    per_thread: bool,
) -> Result<(), Failed> {
    let rt = Runtime::with_context().map_err(whole)?;
    check_stream(h, per_thread).map_err(whole)?;
    // SAFETY: per this function's contract.
    let (dsts, srcs, sizes, attrs, starts) = unsafe {
        (
            entries(dsts, count).map_err(whole)?,
            entries(srcs, count).map_err(whole)?,
            entries(sizes, count).map_err(whole)?,
            entries(attrs, num_attrs).map_err(whole)?,
            entries(attrs_idxs, num_attrs).map_err(whole)?,
        )
    };
    let run = run_of_each(starts, count).map_err(whole)?;
    for (k, a) in attrs.iter().enumerate() {
        check_order(a.srcAccessOrder as u32, a.flags).map_err(|e| (e, Some(starts[k])))?;
    }
    let route = crate::capture::route(rt, h).map_err(whole)?;
    let mut wait = false;
    for i in 0..count {
        let order = attrs[run[i]].srcAccessOrder as u32;
        wait |= order == ORDER_DURING_API_CALL && sizes[i] > 0 && !crate::memory::read_when_queued(rt, srcs[i]);
        crate::memory::copy_async(rt, dsts[i], srcs[i], sizes[i], h).map_err(|e| (e, Some(i)))?;
    }
    finish_reads(wait, &route, h).map_err(whole)
}

/// `cuMemcpy3DBatchAsync` (both forms).
///
/// # Safety
/// `ops` holds `count` entries, per the CUDA API.
unsafe fn memcpy_3d_batch(
    count: usize,
    ops: *const CUDA_MEMCPY3D_BATCH_OP,
    flags: c_ulonglong,
    h: CUstream,
    per_thread: bool,
) -> Result<(), Failed> {
    let rt = Runtime::with_context().map_err(whole)?;
    check_stream(h, per_thread).map_err(whole)?;
    // SAFETY: per this function's contract.
    let ops = unsafe { entries(ops, count) }.map_err(whole)?;
    if count == 0 || flags != 0 {
        return Err(whole(CuError::INVALID_VALUE));
    }
    let copies = ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            check_order(op.srcAccessOrder as u32, op.flags)
                .and_then(|()| crate::texture::batch_op(rt, op))
                .map_err(|e| (e, Some(i)))
        })
        .collect::<Result<Vec<_>, Failed>>()?;
    let route = crate::capture::route(rt, h).map_err(whole)?;
    let mut wait = false;
    for (i, (op, (copy, src))) in ops.iter().zip(&copies).enumerate() {
        let read = src.is_some_and(|p| crate::memory::read_when_queued(rt, p));
        wait |= op.srcAccessOrder as u32 == ORDER_DURING_API_CALL && !read;
        crate::texture::copy_3d(copy, h).map_err(|e| (e, Some(i)))?;
    }
    finish_reads(wait, &route, h).map_err(whole)
}

/// A prefetch or discard batch: each range checked to be managed memory;
/// `locs` says where each goes (`None`: a discard only).
///
/// # Safety
/// The arrays hold `count` and `num_locs` entries, per the CUDA API.
#[allow(clippy::too_many_arguments)]
unsafe fn managed_batch(
    dptrs: *const CUdeviceptr,
    sizes: *const usize,
    count: usize,
    locs: Option<(*const CUmemLocation, *const usize, usize)>,
    flags: c_ulonglong,
    h: CUstream,
    per_thread: bool,
) -> CuResult {
    let rt = Runtime::with_context()?;
    check_stream(h, per_thread)?;
    // SAFETY: per this function's contract.
    let (dptrs, sizes) = unsafe { (entries(dptrs, count)?, entries(sizes, count)?) };
    if count == 0 || flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let targets = match locs {
        Some((locs, idxs, n)) => {
            // SAFETY: per this function's contract.
            let (locs, starts) = unsafe { (entries(locs, n)?, entries(idxs, n)?) };
            let run = run_of_each(starts, count)?;
            let ordinals = locs.iter().map(|&l| crate::managed::location_ordinal(l)).collect::<CuResult<Vec<_>>>()?;
            Some(run.into_iter().map(|k| ordinals[k]).collect::<Vec<_>>())
        }
        None => None,
    };
    crate::capture::route(rt, h)?;
    let starts = dptrs
        .iter()
        .zip(sizes)
        .map(|(&ptr, &size)| crate::managed::managed(rt, ptr, size))
        .collect::<CuResult<Vec<_>>>()?;
    // A discard leaves the contents indeterminate: keeping them is one
    // such value. A prefetch is a hint the mirrored memory records (as
    // `cuMemPrefetchAsync` does, the range checked once above).
    for (start, target) in starts.into_iter().zip(targets.into_iter().flatten()) {
        crate::mapped::advise(rt, start, |a| a.last_prefetch = Some(target));
    }
    Ok(())
}

/// Exports each entry point twice: as itself and as its `_ptsz` form
/// (per-thread default stream builds), `$per_thread` telling them apart.
macro_rules! with_ptsz {
    ($( $(#[$m:meta])* fn $name:ident / $ptsz:ident ($($arg:ident: $ty:ty),* $(,)?) |$per_thread:ident| $body:block )*) => {
        crate::exports! {
            $(
                $(#[$m])*
                fn $name($($arg: $ty),*) {
                    let $per_thread = false;
                    $body
                }
                fn $ptsz($($arg: $ty),*) {
                    let $per_thread = true;
                    $body
                }
            )*
        }
    };
}

with_ptsz! {
    fn cuMemcpyBatchAsync_v2 / cuMemcpyBatchAsync_v2_ptsz(
        dsts: *mut CUdeviceptr,
        srcs: *mut CUdeviceptr,
        sizes: *mut usize,
        count: usize,
        attrs: *mut CUmemcpyAttributes,
        attrs_idxs: *mut usize,
        num_attrs: usize,
        h: CUstream,
    ) |per_thread| {
        // SAFETY: the CUDA API's arrays.
        unsafe { memcpy_batch(dsts, srcs, sizes, count, attrs, attrs_idxs, num_attrs, h, per_thread) }.map_err(|(e, _)| e)
    }

    /// CUDA 12.8's form, with `failIdx`.
    fn cuMemcpyBatchAsync / cuMemcpyBatchAsync_ptsz(
        dsts: *mut CUdeviceptr,
        srcs: *mut CUdeviceptr,
        sizes: *mut usize,
        count: usize,
        attrs: *mut CUmemcpyAttributes,
        attrs_idxs: *mut usize,
        num_attrs: usize,
        fail_idx: *mut usize,
        h: CUstream,
    ) |per_thread| {
        // SAFETY: the CUDA API's arrays and out-pointer.
        unsafe {
            with_fail_index(memcpy_batch(dsts, srcs, sizes, count, attrs, attrs_idxs, num_attrs, h, per_thread), fail_idx)
        }
    }

    fn cuMemcpy3DBatchAsync_v2 / cuMemcpy3DBatchAsync_v2_ptsz(
        count: usize,
        ops: *mut CUDA_MEMCPY3D_BATCH_OP,
        flags: c_ulonglong,
        h: CUstream,
    ) |per_thread| {
        // SAFETY: the CUDA API's array.
        unsafe { memcpy_3d_batch(count, ops, flags, h, per_thread) }.map_err(|(e, _)| e)
    }

    /// CUDA 12.8's form, with `failIdx`.
    fn cuMemcpy3DBatchAsync / cuMemcpy3DBatchAsync_ptsz(
        count: usize,
        ops: *mut CUDA_MEMCPY3D_BATCH_OP,
        fail_idx: *mut usize,
        flags: c_ulonglong,
        h: CUstream,
    ) |per_thread| {
        // SAFETY: the CUDA API's array and out-pointer.
        unsafe { with_fail_index(memcpy_3d_batch(count, ops, flags, h, per_thread), fail_idx) }
    }

    fn cuMemPrefetchBatchAsync / cuMemPrefetchBatchAsync_ptsz(
        dptrs: *mut CUdeviceptr,
        sizes: *mut usize,
        count: usize,
        locs: *mut CUmemLocation,
        loc_idxs: *mut usize,
        num_locs: usize,
        flags: c_ulonglong,
        h: CUstream,
    ) |per_thread| {
        // SAFETY: the CUDA API's arrays.
        unsafe { managed_batch(dptrs, sizes, count, Some((locs, loc_idxs, num_locs)), flags, h, per_thread) }
    }

    fn cuMemDiscardBatchAsync / cuMemDiscardBatchAsync_ptsz(
        dptrs: *mut CUdeviceptr,
        sizes: *mut usize,
        count: usize,
        flags: c_ulonglong,
        h: CUstream,
    ) |per_thread| {
        // SAFETY: the CUDA API's arrays.
        unsafe { managed_batch(dptrs, sizes, count, None, flags, h, per_thread) }
    }

    fn cuMemDiscardAndPrefetchBatchAsync / cuMemDiscardAndPrefetchBatchAsync_ptsz(
        dptrs: *mut CUdeviceptr,
        sizes: *mut usize,
        count: usize,
        locs: *mut CUmemLocation,
        loc_idxs: *mut usize,
        num_locs: usize,
        flags: c_ulonglong,
        h: CUstream,
    ) |per_thread| {
        // SAFETY: the CUDA API's arrays.
        unsafe { managed_batch(dptrs, sizes, count, Some((locs, loc_idxs, num_locs)), flags, h, per_thread) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_every_operation_once() {
        assert_eq!(run_of_each(&[0], 3), Ok(vec![0, 0, 0]));
        assert_eq!(run_of_each(&[0, 2], 5), Ok(vec![0, 0, 1, 1, 1]));
        assert_eq!(run_of_each(&[0, 1, 2], 3), Ok(vec![0, 1, 2]));
        for bad in [&[][..], &[1], &[0, 0], &[0, 3], &[0, 2, 1]] {
            assert_eq!(run_of_each(bad, 3), Err(CuError::INVALID_VALUE), "{bad:?}");
        }
        assert_eq!(run_of_each(&[0], 0), Err(CuError::INVALID_VALUE), "an empty batch");
    }
}
