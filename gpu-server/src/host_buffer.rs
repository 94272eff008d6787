//! Page-aligned, lazily zeroed host memory for a swapped-out session's
//! contents (issue 21). The only `unsafe` code of swapping is here: the
//! allocation itself and the huge-page advice.
//!
//! Fresh host memory is what makes a swap-out slow: the kernel faults it in
//! at 2.4-3.4 GiB/s (5 GiB/s with 8 threads) on the H100 hosts, where a
//! copy from the device into memory already faulted in runs at 13-16 GiB/s
//! (`bench/results/20261206T054048Z-*-cdp-managed.md`). So a process may
//! keep the buffers of swapped-in contents as spares, up to a bound
//! (`--swap-spare-mib`, [`set_spare_cap`]), and the next swap-out of the
//! same sizes fills them ([`HostBuffer::for_swap`]).

#![allow(unsafe_code)]

use crate::error::CallError;

/// Host memory holding swapped contents: page-aligned, so that a backend
/// may pin it for the copy's duration
/// ([`crate::device::BackendSession::read_bulk`]); zeroed by the
/// allocator's fresh pages rather than by a pass that writes every byte;
/// large ones faulted in by several threads (see `prefault`); in huge
/// pages where the kernel gives them. One from [`HostBuffer::for_swap`] may
/// be a spare holding an earlier swap's bytes, and may become one.
pub struct HostBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Goes to the spares when dropped, if they have room.
    spare: bool,
}

/// Buffers kept for the next swap-out: whole allocations by their size.
struct Spares {
    cap: usize,
    held: usize,
    buffers: Vec<(std::ptr::NonNull<u8>, usize)>,
}

// SAFETY: the spares own their allocations exclusively, as `HostBuffer` does.
unsafe impl Send for Spares {}

static SPARES: std::sync::Mutex<Spares> = std::sync::Mutex::new(Spares { cap: 0, held: 0, buffers: Vec::new() });

fn spares() -> std::sync::MutexGuard<'static, Spares> {
    SPARES.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Bytes of swap buffers this process may keep for the next swap-out
/// (0, the default: none). Lowering it frees what is over.
pub fn set_spare_cap(bytes: u64) {
    let mut s = spares();
    s.cap = usize::try_from(bytes).unwrap_or(usize::MAX);
    while s.held > s.cap {
        let Some((ptr, size)) = s.buffers.pop() else { break };
        s.held -= size;
        free(ptr, size);
    }
}

/// Bytes of spare swap buffers this process holds now.
pub fn spare_bytes() -> u64 {
    spares().held as u64
}

/// Frees an allocation of `size` (> 0, whole pages) bytes at `ptr`.
fn free(ptr: std::ptr::NonNull<u8>, size: usize) {
    if let Ok(layout) = std::alloc::Layout::from_size_align(size, HostBuffer::PAGE) {
        // SAFETY: allocated by `HostBuffer::zeroed` with this layout, and
        // owned by the caller.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
    }
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
            return Ok(Self { ptr: std::ptr::NonNull::dangling(), len, spare: false });
        }
        let layout = Self::layout(len).ok_or_else(too_large)?;
        // SAFETY: the layout's size is non-zero.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(too_large)?;
        // Huge pages make the first touch (the copy's) cheaper; advice
        // only, so its result does not matter.
        // SAFETY: the range is this allocation, page-aligned and whole pages.
        unsafe { libc::madvise(raw.cast(), layout.size(), libc::MADV_HUGEPAGE) };
        let buffer = Self { ptr, len, spare: false };
        if len >= Self::PREFAULT_MIN {
            buffer.prefault();
        }
        Ok(buffer)
    }

    /// A buffer of `size` bytes for contents a swap-out writes whole before
    /// anything reads them: a spare of the same size when the process keeps
    /// one (its bytes are an earlier swap's, faulted in already), else a
    /// zeroed one. Either way it may become a spare when dropped.
    pub fn for_swap(size: u64) -> Result<Self, CallError> {
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        if let Some(size) = Self::layout(len).map(|l| l.size()).filter(|_| len > 0) {
            let mut s = spares();
            if let Some(at) = s.buffers.iter().position(|&(_, n)| n == size) {
                let (ptr, _) = s.buffers.swap_remove(at);
                s.held -= size;
                return Ok(Self { ptr, len, spare: true });
            }
        }
        let mut fresh = Self::zeroed(size)?;
        fresh.spare = true;
        Ok(fresh)
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
        // SAFETY: `ptr` addresses `len` initialized bytes (zeroed, or a
        // spare's earlier contents) owned by this buffer, or is dangling
        // with `len` 0.
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
        let Some(size) = Self::layout(self.len).map(|l| l.size()).filter(|_| self.len > 0) else { return };
        if self.spare {
            let mut s = spares();
            if s.held.checked_add(size).is_some_and(|held| held <= s.cap) {
                s.held += size;
                s.buffers.push((self.ptr, size));
                return;
            }
        }
        free(self.ptr, size);
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

    /// A dropped swap buffer is kept while the cap has room and handed to
    /// the next swap-out of its size; lowering the cap frees the spares.
    /// (The only test that sets the process-wide cap; ordinary buffers,
    /// `HostBuffer::zeroed`, never become spares.)
    #[test]
    fn swap_buffers_are_kept_as_spares_within_the_cap() {
        let size = (3 << 20) + 12_345;
        let first = HostBuffer::for_swap(size).expect("allocates");
        let at = first.as_ptr();
        drop(first);
        assert_eq!(spare_bytes(), 0, "no cap: nothing kept");
        set_spare_cap(8 << 20);
        let mut second = HostBuffer::for_swap(size).expect("allocates");
        second[0] = 9;
        let at = (second.as_ptr(), at);
        drop(second);
        // Other tests' swaps may keep spares too while the cap is up.
        assert!(spare_bytes() >= (size as usize).next_multiple_of(HostBuffer::PAGE) as u64);
        let third = HostBuffer::for_swap(size).expect("reuses");
        assert_eq!(third.as_ptr(), at.0, "the spare came back");
        assert_eq!(third[0], 9, "with the earlier swap's bytes (the next one overwrites them)");
        let other = HostBuffer::for_swap(size + 8192).expect("allocates");
        assert_ne!(other.as_ptr(), at.0, "another size gets a buffer of its own");
        drop(third);
        drop(other);
        assert!(spare_bytes() <= 8 << 20, "the cap holds");
        set_spare_cap(0);
        assert_eq!(spare_bytes(), 0, "a lower cap frees what is over");
    }

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
