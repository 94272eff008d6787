//! Page-aligned, lazily zeroed host memory for a swapped-out session's
//! contents (issue 21). The only `unsafe` code of swapping is here: the
//! allocation itself and the huge-page advice.

#![allow(unsafe_code)]

use crate::error::CallError;

/// Host memory holding swapped contents: page-aligned, so that a backend
/// may pin it for the copy's duration
/// ([`crate::device::BackendSession::read_bulk`]); zeroed by the
/// allocator's fresh pages rather than by a pass that writes every byte;
/// large ones faulted in by several threads (see `prefault`); in huge
/// pages where the kernel gives them.
pub struct HostBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its memory exclusively, as a `Vec<u8>` does.
unsafe impl Send for HostBuffer {}

impl HostBuffer {
    const PAGE: usize = 4096;

    /// A zeroed buffer of `size` bytes, or `OUT_OF_MEMORY`.
    pub fn zeroed(size: u64) -> Result<Self, CallError> {
        let too_large = || CallError::out_of_memory(format!("cannot allocate {size} bytes of swap"));
        let len = usize::try_from(size).map_err(|_| too_large())?;
        if len == 0 {
            return Ok(Self { ptr: std::ptr::NonNull::dangling(), len });
        }
        let layout = Self::layout(len).ok_or_else(too_large)?;
        // SAFETY: the layout's size is non-zero.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(too_large)?;
        // Huge pages make the first touch (the copy's) cheaper; advice
        // only, so its result does not matter.
        // SAFETY: the range is this allocation, page-aligned and whole pages.
        unsafe { libc::madvise(raw.cast(), layout.size(), libc::MADV_HUGEPAGE) };
        let buffer = Self { ptr, len };
        if len >= Self::PREFAULT_MIN {
            buffer.prefault();
        }
        Ok(buffer)
    }

    /// Buffers from this size are faulted in by several threads at once.
    const PREFAULT_MIN: usize = 64 << 20;
    /// At most this many threads fault a buffer in.
    const PREFAULT_THREADS: usize = 8;

    /// Faults every page in, several threads at once. A swap-out's pinning
    /// would otherwise take each of the fresh pages' faults on one thread
    /// (a 4 GiB swap-out spent most of its 2 s there on an H100 host, its
    /// swap-in 0.37 s); the kernel's page faults scale across cores.
    fn prefault(&self) {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(Self::PREFAULT_THREADS);
        let share = self.len.div_ceil(threads).next_multiple_of(Self::PAGE);
        let base = self.ptr.as_ptr() as usize;
        let len = self.len;
        std::thread::scope(|scope| {
            for start in (0..len).step_by(share) {
                let end = (start + share).min(len);
                scope.spawn(move || {
                    for at in (start..end).step_by(Self::PAGE) {
                        // SAFETY: `at` is inside this buffer, which no one
                        // else uses yet; writing the zero it holds only
                        // makes the kernel back the page.
                        unsafe { std::ptr::write_volatile((base + at) as *mut u8, 0) };
                    }
                });
            }
        });
    }

    /// The layout of a buffer of `len` (> 0) bytes: whole pages, `None`
    /// past the address space.
    fn layout(len: usize) -> Option<std::alloc::Layout> {
        let size = len.checked_next_multiple_of(Self::PAGE)?;
        std::alloc::Layout::from_size_align(size, Self::PAGE).ok()
    }
}

impl std::ops::Deref for HostBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` addresses `len` initialized (zeroed) bytes owned by
        // this buffer, or is dangling with `len` 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len).filter(|_| self.len > 0) {
            // SAFETY: allocated by `zeroed` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_page_aligned_and_writable() {
        for size in [0u64, 1, 4095, 4096, 4097, 3 << 20, (64 << 20) + 4097] {
            let mut b = HostBuffer::zeroed(size).expect("allocates");
            assert_eq!(b.len() as u64, size);
            assert!(b.iter().all(|&x| x == 0), "{size} bytes zeroed");
            if size > 0 {
                assert!((b.as_ptr() as usize).is_multiple_of(HostBuffer::PAGE), "page-aligned");
                b[size as usize - 1] = 7;
                assert_eq!(b[size as usize - 1], 7);
            }
        }
        let err = HostBuffer::zeroed(u64::MAX).expect_err("no such memory");
        assert_eq!(err.code, gpupool_proto::cuda::OUT_OF_MEMORY);
    }
}
