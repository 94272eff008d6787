//! Managed memory: `cuMemAllocManaged`, prefetch, advice, range attributes
//! and `cuStreamAttachMemAsync`.
//!
//! A managed allocation is mapped host memory with one address
//! (`mapped.rs`): host pages at the device half's address, mirrored by the
//! client core. Host writes reach the device before the next call; device
//! writes (kernels, memsets, copies) are in host memory when a
//! synchronizing call returns, which is when a program may read them under
//! CUDA's rules. Prefetching and advice change where pages live on a local
//! GPU; here both halves always exist, so they are checked, remembered for
//! `cuMemRangeGetAttribute`, and otherwise change nothing.
//!
//! Not offered: managed ranges larger than the mirror limit (64 MiB per
//! session in all; `cuMemAllocManaged` answers out of memory), host access
//! to data a running kernel writes before the program synchronizes (native
//! CUDA on x86 gives no such guarantee either), `__managed__` variables.

use crate::abi::{CuError, CuResult, put};
use crate::mapped::Advice;
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUdevice, CUdeviceptr, CUmemLocation, CUstream};
use std::ffi::{c_int, c_uint, c_void};

/// `CU_DEVICE_CPU`: the host as a prefetch or advice target.
const HOST: c_int = -1;
/// `CU_DEVICE_INVALID`: no location.
const INVALID: c_int = -2;

/// `CUmemLocationType`: `DEVICE` 1, `HOST` 2 (the NUMA kinds 3-4 count as
/// the host: this process's memory is the host half).
pub(crate) fn location_ordinal(location: CUmemLocation) -> CuResult<c_int> {
    match location.type_ as u32 {
        1 if location.id == 0 => Ok(0),
        1 => Err(CuError::INVALID_DEVICE),
        2..=4 => Ok(HOST),
        _ => Err(CuError::INVALID_VALUE),
    }
}

fn device_ordinal(device: CUdevice) -> CuResult<c_int> {
    match device {
        0 | HOST => Ok(device),
        _ => Err(CuError::INVALID_DEVICE),
    }
}

/// The managed allocation holding the range, or `INVALID_VALUE`.
pub(crate) fn managed(rt: &Runtime, ptr: CUdeviceptr, count: usize) -> CuResult<usize> {
    if count == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    crate::mapped::managed_range(rt, ptr as usize, count).map(|(start, _)| start).ok_or(CuError::INVALID_VALUE)
}

/// Prefetch of `[ptr, ptr + count)` to `target` ordered on stream `h`.
pub(crate) fn prefetch(ptr: CUdeviceptr, count: usize, target: c_int, flags: c_uint, h: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    if flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // The stream must be one of ours (checked as every queued call's is).
    crate::capture::route(rt, h)?;
    let start = managed(rt, ptr, count)?;
    crate::mapped::advise(rt, start, |a| a.last_prefetch = Some(target));
    Ok(())
}

/// `cuMemAdvise` values.
pub(crate) fn advise(ptr: CUdeviceptr, count: usize, advice: c_uint, target: c_int) -> CuResult {
    let rt = Runtime::with_context()?;
    let start = managed(rt, ptr, count)?;
    let change: fn(&mut Advice, c_int) = match advice {
        1 => |a, _| a.read_mostly = true,
        2 => |a, _| a.read_mostly = false,
        3 => |a, t| a.preferred = Some(t),
        4 => |a, _| a.preferred = None,
        5 => |a, t| {
            if t == HOST { a.accessed_by_host = true } else { a.accessed_by_device = true }
        },
        6 => |a, t| {
            if t == HOST { a.accessed_by_host = false } else { a.accessed_by_device = false }
        },
        _ => return Err(CuError::INVALID_VALUE),
    };
    crate::mapped::advise(rt, start, |a| change(a, target));
    Ok(())
}

/// One range attribute into `data` (`size` bytes).
///
/// # Safety
/// `data` is valid for writing `size` bytes.
unsafe fn range_attribute(data: *mut c_void, size: usize, attribute: c_uint, advice: Advice) -> CuResult {
    let int = |v: c_int| -> CuResult {
        if size != 4 {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: the caller's contract; 4 bytes checked above.
        unsafe { put(data.cast::<c_int>(), v) }
    };
    // Location type and id: DEVICE 1, HOST 2, INVALID 0.
    let kind = |o: Option<c_int>| match o {
        Some(HOST) => 2,
        Some(_) => 1,
        None => 0,
    };
    let id = |o: Option<c_int>| o.filter(|&v| v != HOST).unwrap_or(0);
    match attribute {
        1 => int(c_int::from(advice.read_mostly)),
        2 => int(advice.preferred.unwrap_or(INVALID)),
        3 => {
            // An array of ordinals, the rest filled with CU_DEVICE_INVALID.
            if !size.is_multiple_of(4) {
                return Err(CuError::INVALID_VALUE);
            }
            let mut list: Vec<c_int> = Vec::new();
            if advice.accessed_by_device {
                list.push(0);
            }
            if advice.accessed_by_host {
                list.push(HOST);
            }
            let n = size / 4;
            for i in 0..n {
                // SAFETY: `i < size / 4`, within the caller's buffer.
                unsafe { data.cast::<c_int>().add(i).write_unaligned(list.get(i).copied().unwrap_or(INVALID)) };
            }
            Ok(())
        }
        4 => int(advice.last_prefetch.unwrap_or(INVALID)),
        5 => int(kind(advice.preferred)),
        6 => int(id(advice.preferred)),
        7 => int(kind(advice.last_prefetch)),
        8 => int(id(advice.last_prefetch)),
        _ => Err(CuError::INVALID_VALUE),
    }
}

fn advice_of(rt: &Runtime, ptr: CUdeviceptr, count: usize) -> CuResult<Advice> {
    let (_, m) = crate::mapped::managed_range(rt, ptr as usize, count).ok_or(CuError::INVALID_VALUE)?;
    Ok(m.managed.unwrap_or_default())
}

/// `cuStreamAttachMemAsync`: which streams may touch a managed range
/// matters for a local GPU's page migration only.
fn attach(h: CUstream, ptr: CUdeviceptr, length: usize, flags: c_uint) -> CuResult {
    let rt = Runtime::with_context()?;
    if !matches!(flags, 1 | 2 | 4) {
        return Err(CuError::INVALID_VALUE);
    }
    crate::capture::route(rt, h)?;
    // Length 0: the whole allocation.
    crate::mapped::managed_range(rt, ptr as usize, length.max(1)).map(drop).ok_or(CuError::INVALID_VALUE)
}

crate::exports! {
    fn cuMemAllocManaged(dptr: *mut CUdeviceptr, bytesize: usize, flags: c_uint) {
        // CU_MEM_ATTACH_GLOBAL or CU_MEM_ATTACH_HOST.
        if !matches!(flags, 1 | 2) {
            return Err(CuError::INVALID_VALUE);
        }
        let rt = Runtime::with_context()?;
        crate::capture::check_unsafe(false)?;
        let p = crate::mapped::alloc_managed(rt, bytesize)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(dptr, p as CUdeviceptr) }
    }

    fn cuMemPrefetchAsync_v2(ptr: CUdeviceptr, count: usize, location: CUmemLocation, flags: c_uint, h: CUstream) {
        prefetch(ptr, count, location_ordinal(location)?, flags, h)
    }

    fn cuMemPrefetchAsync_v2_ptsz(ptr: CUdeviceptr, count: usize, location: CUmemLocation, flags: c_uint, h: CUstream) {
        prefetch(ptr, count, location_ordinal(location)?, flags, h)
    }

    fn cuMemAdvise_v2(ptr: CUdeviceptr, count: usize, advice: c_uint, location: CUmemLocation) {
        advise(ptr, count, advice, location_ordinal(location)?)
    }

    fn cuMemRangeGetAttribute(data: *mut c_void, size: usize, attribute: c_uint, ptr: CUdeviceptr, count: usize) {
        let rt = Runtime::with_context()?;
        if data.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let advice = advice_of(rt, ptr, count)?;
        // SAFETY: the caller's buffer of `size` bytes.
        unsafe { range_attribute(data, size, attribute, advice) }
    }

    fn cuMemRangeGetAttributes(
        data: *mut *mut c_void,
        sizes: *mut usize,
        attributes: *mut c_uint,
        n: usize,
        ptr: CUdeviceptr,
        count: usize,
    ) {
        let rt = Runtime::with_context()?;
        if n == 0 || data.is_null() || sizes.is_null() || attributes.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let advice = advice_of(rt, ptr, count)?;
        for i in 0..n {
            // SAFETY: three arrays of `n` entries per the CUDA API.
            let (d, size, attribute) = unsafe { (*data.add(i), *sizes.add(i), *attributes.add(i)) };
            if d.is_null() {
                return Err(CuError::INVALID_VALUE);
            }
            // SAFETY: entry `i`'s buffer of `size` bytes.
            unsafe { range_attribute(d, size, attribute, advice)? };
        }
        Ok(())
    }

    fn cuStreamAttachMemAsync(h: CUstream, ptr: CUdeviceptr, length: usize, flags: c_uint) {
        attach(h, ptr, length, flags)
    }

    fn cuStreamAttachMemAsync_ptsz(h: CUstream, ptr: CUdeviceptr, length: usize, flags: c_uint) {
        attach(h, ptr, length, flags)
    }
}

/// The pre-CUDA-12.2 signatures (a device ordinal, `CU_DEVICE_CPU` for the
/// host), reached through `cuGetProcAddress` for older versions and by
/// symbol.
pub mod legacy {
    use super::*;

    crate::exports! {
        fn cuMemPrefetchAsync(ptr: CUdeviceptr, count: usize, device: CUdevice, h: CUstream) {
            prefetch(ptr, count, device_ordinal(device)?, 0, h)
        }

        fn cuMemPrefetchAsync_ptsz(ptr: CUdeviceptr, count: usize, device: CUdevice, h: CUstream) {
            prefetch(ptr, count, device_ordinal(device)?, 0, h)
        }

        fn cuMemAdvise(ptr: CUdeviceptr, count: usize, advice: c_uint, device: CUdevice) {
            advise(ptr, count, advice, device_ordinal(device)?)
        }
    }
}
