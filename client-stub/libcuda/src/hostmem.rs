//! Host memory: "pinned" allocations (plain page-aligned memory here; the
//! bytes travel over the network either way) and the reservation that keeps
//! host memory out of the device address range.

use crate::abi::{CuError, CuResult};
use std::alloc::Layout;
use std::sync::OnceLock;

pub(crate) const PAGE: usize = 4096;

/// The range [`reserve_device_range`] holds, `(base, size)`.
static RESERVED: OnceLock<(usize, usize)> = OnceLock::new();

/// `true` when `[addr, addr + len)` lies in the device range reserved in
/// this process, so its pages may be made host memory ([`map_fixed`]).
pub(crate) fn in_reserved(addr: usize, len: usize) -> bool {
    RESERVED.get().is_some_and(|&(base, size)| addr >= base && addr.checked_add(len).is_some_and(|e| e <= base + size))
}

/// `mmap` of private anonymous memory at `addr` with `prot` and `flags`.
///
/// # Safety
/// As `mmap`'s: with `MAP_FIXED` the caller owns whatever the range held.
unsafe fn map_anonymous(addr: usize, len: usize, prot: libc::c_int, flags: libc::c_int) -> *mut libc::c_void {
    // SAFETY: the caller's contract.
    unsafe { libc::mmap(addr as *mut libc::c_void, len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags, -1, 0) }
}

/// Makes `[addr, addr + len)`, page-aligned and inside the reserved device
/// range, readable and writable zeroed host memory.
pub(crate) fn map_fixed(addr: usize, len: usize) -> CuResult<()> {
    if !in_reserved(addr, len) || !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the pages lie in this process's own inaccessible reservation
    // (checked above), so replacing them cannot disturb memory the process
    // uses.
    let got = unsafe { map_anonymous(addr, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_FIXED) };
    if got == libc::MAP_FAILED { Err(CuError(2)) } else { Ok(()) }
}

/// Gives pages from [`map_fixed`] back to the reservation.
pub(crate) fn unmap_fixed(addr: usize, len: usize) {
    // SAFETY: the pages came from `map_fixed`; they become inaccessible
    // reservation again.
    unsafe { map_anonymous(addr, len, libc::PROT_NONE, libc::MAP_NORESERVE | libc::MAP_FIXED) };
}

/// Reserves the session's device address range in this process, inaccessible,
/// so that no host allocation can ever land inside it: a pointer is then a
/// device pointer exactly when it lies in a device range, which is what
/// unified addressing (`cuMemcpy`, `cudaMemcpyDefault`) relies on.
pub(crate) fn reserve_device_range((base, size): (u64, u64)) {
    if size == 0 {
        return;
    }
    // SAFETY: an anonymous, inaccessible, non-reserving mapping at a fixed
    // address that must not replace anything (MAP_FIXED_NOREPLACE): it
    // cannot disturb memory the process uses.
    let got = unsafe {
        map_anonymous(base as usize, size as usize, libc::PROT_NONE, libc::MAP_NORESERVE | libc::MAP_FIXED_NOREPLACE)
    };
    if got != libc::MAP_FAILED && got as u64 == base {
        let _ = RESERVED.set((base as usize, size as usize));
    } else {
        if got != libc::MAP_FAILED {
            // An old kernel treated the address as a hint: give it back.
            // SAFETY: unmapping exactly the mapping just made.
            unsafe { libc::munmap(got, size as usize) };
        }
        tracing::warn!(
            base = format_args!("{base:#x}"),
            size,
            "could not reserve the device address range in this process; host memory there would be taken for device memory"
        );
    }
}

/// Makes `[addr, addr + len)` (page-aligned, outside the reserved device
/// range) zeroed host memory at exactly that address, for the host half of
/// a managed module variable whose address the server's driver chose.
/// Refuses (`OUT_OF_MEMORY`) where this process already has memory there:
/// nothing is ever replaced.
pub(crate) fn map_exact(addr: usize, len: usize) -> CuResult<()> {
    if !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 || in_reserved(addr, len) {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping: it
    // fails instead, so no memory the process uses can be disturbed.
    let got = unsafe { map_anonymous(addr, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_FIXED_NOREPLACE) };
    if got == libc::MAP_FAILED {
        return Err(CuError(2));
    }
    if got as usize != addr {
        // An old kernel took the address as a hint: give the pages back.
        // SAFETY: unmapping exactly the mapping just made.
        unsafe { libc::munmap(got, len) };
        return Err(CuError(2));
    }
    Ok(())
}

/// Unmaps pages from [`map_exact`].
pub(crate) fn unmap_exact(addr: usize, len: usize) {
    // SAFETY: the pages came from `map_exact` and nothing refers to them
    // any more (their variable's module is gone).
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

/// Allocates `size` bytes of zeroed, page-aligned host memory.
pub(crate) fn alloc(size: usize) -> CuResult<*mut u8> {
    if size == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let layout = Layout::from_size_align(size, PAGE).map_err(|_| CuError(2))?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() { Err(CuError(2)) } else { Ok(p) }
}

/// Frees memory from [`alloc`] of `size` bytes.
///
/// # Safety
/// `p` came from [`alloc`] with this `size` and is not used afterwards.
pub(crate) unsafe fn free(p: *mut u8, size: usize) {
    if let Ok(layout) = Layout::from_size_align(size, PAGE) {
        // SAFETY: same pointer and layout as the allocation.
        unsafe { std::alloc::dealloc(p, layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_allocations() {
        let p = alloc(10_000).expect("alloc");
        assert_eq!(p as usize % PAGE, 0);
        // SAFETY: 10 000 bytes were just allocated at `p`.
        unsafe {
            assert!(std::slice::from_raw_parts(p, 10_000).iter().all(|&b| b == 0));
            free(p, 10_000);
        }
        assert_eq!(alloc(0), Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn reserved_range_is_kept_from_host_memory() {
        let base = 0x6e00_0000_0000u64;
        reserve_device_range((base, 64 << 20));
        // A hint inside the reserved range is not honoured.
        // SAFETY: an anonymous mapping with a hint, unmapped below.
        let p = unsafe {
            libc::mmap(base as *mut _, 4096, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(p, libc::MAP_FAILED);
        assert!(!(base..base + (64 << 20)).contains(&(p as u64)));
        // SAFETY: the page mapped above.
        unsafe { libc::munmap(p, 4096) };
    }
}
