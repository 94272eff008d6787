//! The shared region: a sealed memfd mapped by the client and by the
//! process that serves its session. The only `unsafe` code of the
//! shared-memory transport is here.
//!
//! The peer may write to the region at any time, also while this process
//! reads it. It cannot shrink it: [`Region::open`] requires the
//! `F_SEAL_SHRINK` seal, so every byte of the mapping stays backed (an
//! access past the end of a shrunk file would raise `SIGBUS`). No Rust
//! reference to the region's bytes is ever made, but for the aligned atomic
//! words of a command ring ([`Region::atomic_u32`]): bytes are copied out of it
//! into memory this process owns (or into it) with `copy_nonoverlapping`
//! on raw pointers, after the range has been checked against the mapping.
//! A peer that races its own writes against a copy only garbles its own
//! data; everything read is validated after the copy, never in place.

#![allow(unsafe_code)]

use crate::ShmError;
use crate::wire::{MAX_REGION_BYTES, MIN_REGION_BYTES};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Copies of at least this many bytes are split over several threads: one
/// core copies pageable memory at 8-10 GiB/s (H100 host, 2026-12-06), well
/// below what the device's DMA from a registered region takes.
const PARALLEL_COPY_BYTES: usize = 4 << 20;

/// Most threads one copy uses.
const MAX_COPY_THREADS: usize = 4;

/// Threads for a copy of `len` bytes: one below [`PARALLEL_COPY_BYTES`],
/// else up to [`MAX_COPY_THREADS`] of the CPUs this process may use.
fn copy_threads(len: usize) -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if len < PARALLEL_COPY_BYTES {
        return 1;
    }
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cpus.clamp(1, MAX_COPY_THREADS)
}

/// Runs `copy` over the pieces of `0..len`: on this thread when one piece
/// covers it, else each piece on a thread of its own ([`copy_threads`]).
fn in_pieces(len: usize, copy: impl Fn(std::ops::Range<usize>) + Sync) {
    let piece = len.div_ceil(copy_threads(len)).max(1);
    if piece >= len {
        copy(0..len);
        return;
    }
    std::thread::scope(|s| {
        for lo in (0..len).step_by(piece) {
            let copy = &copy;
            s.spawn(move || copy(lo..(lo + piece).min(len)));
        }
    });
}

/// Lowest address [`pick_address`] proposes: 16 TiB, far above where a
/// process's executable, heap and (top-down) shared libraries and anonymous
/// mappings lie on x86-64 and arm64 with 48-bit addresses.
const PICK_FROM: usize = 0x1000_0000_0000;
/// End of the span [`pick_address`] proposes from (80 TiB).
const PICK_TO: usize = 0x5000_0000_0000;
/// Alignment of a proposed address (huge-page aligned).
const PICK_ALIGN: usize = 2 << 20;
/// End of the user address space a region's address may reach (47 bits).
pub const USER_ADDRESS_END: u64 = 1 << 47;

/// A random address for a region of `len` bytes in a span that processes
/// rarely use (16-80 TiB), so that two processes can usually both map a
/// region there ([`Region::create_at`], [`Region::open_at`]).
pub fn pick_address(len: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    // RandomState's keys are random per process and differ per instance.
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_usize(len);
    let slots = (PICK_TO - PICK_FROM).saturating_sub(len) / PICK_ALIGN;
    PICK_FROM + (h.finish() as usize % slots.max(1)) * PICK_ALIGN
}

/// A shared read-write mapping of a memfd, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, valid from any thread while
// it lives; every access goes through raw pointers checked against `len`.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: no reference into the mapping is held across
// threads but to atomics (`Region::atomic_u32`).
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` anywhere, or exactly at `at` when given
    /// (never replacing a mapping there: `MAP_FIXED_NOREPLACE`).
    fn new(fd: BorrowedFd<'_>, len: usize, at: Option<usize>) -> Result<Self, ShmError> {
        let (hint, flags) = match at {
            Some(a) => (a as *mut std::ffi::c_void, MapFlags::SHARED | MapFlags::FIXED_NOREPLACE),
            None => (std::ptr::null_mut(), MapFlags::SHARED),
        };
        // SAFETY: a new shared mapping of a file this process holds; with
        // FIXED_NOREPLACE the kernel refuses rather than replace anything
        // mapped at `at`, so no existing memory of the process changes.
        let got = unsafe { rustix::mm::mmap(hint, len, ProtFlags::READ | ProtFlags::WRITE, flags, fd, 0) };
        let ptr = match got {
            Ok(p) => p.cast::<u8>(),
            Err(rustix::io::Errno::EXIST) => {
                return Err(ShmError::AddressInUse(format!("{:#x} (+{len}) is mapped already", at.unwrap_or(0))));
            }
            Err(e) => return Err(ShmError::Region(format!("cannot map the region: {e}"))),
        };
        let mapping =
            Self { ptr: NonNull::new(ptr).ok_or_else(|| ShmError::Region("mmap gave address 0".into()))?, len };
        // A kernel without FIXED_NOREPLACE (before 4.17) takes the address
        // as a hint only.
        if let Some(a) = at
            && mapping.ptr.as_ptr() as usize != a
        {
            return Err(ShmError::AddressInUse(format!("{a:#x} (+{len}) could not be mapped there")));
        }
        Ok(mapping)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made; nothing refers into it any
        // more (the region's owner keeps it while copies use it).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            eprintln!("gpupool: unmapping a shared region failed: {e}");
        }
    }
}

/// A mapped shared region.
#[derive(Debug)]
pub struct Region {
    map: Mapping,
    fd: OwnedFd,
}

impl Region {
    /// Creates a region of `len` bytes (the client's): a memfd, sized and
    /// sealed against shrinking, growing and further seals, then mapped.
    pub fn create(name: &str, len: usize) -> Result<Self, ShmError> {
        Self::create_at(name, len, None)
    }

    /// As [`Self::create`], mapped at `at` when given (page aligned; an
    /// [`ShmError::AddressInUse`] when anything is mapped there).
    pub fn create_at(name: &str, len: usize, at: Option<usize>) -> Result<Self, ShmError> {
        if !(MIN_REGION_BYTES..=MAX_REGION_BYTES).contains(&(len as u64)) {
            return Err(ShmError::Region(format!(
                "a region of {len} bytes (from {MIN_REGION_BYTES} to {MAX_REGION_BYTES})"
            )));
        }
        let io = |what: &str| {
            let what = what.to_string();
            move |e: rustix::io::Errno| ShmError::Region(format!("{what}: {e}"))
        };
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(io("memfd_create"))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(io("sizing the memfd"))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(io("sealing the memfd"))?;
        Self::map(fd, len, at)
    }

    /// Maps a region received from a peer, when it is a memfd sealed
    /// against shrinking of exactly `len` bytes (`len` within the bounds of
    /// [`crate::wire::Attach`]).
    pub fn open(fd: OwnedFd, len: u64) -> Result<Self, ShmError> {
        Self::open_at(fd, len, None)
    }

    /// As [`Self::open`], mapped at `at` when given: the address the peer
    /// mapped it at, so that both processes see its bytes at one address
    /// (an [`ShmError::AddressInUse`] when anything is mapped there).
    pub fn open_at(fd: OwnedFd, len: u64, at: Option<u64>) -> Result<Self, ShmError> {
        if !(MIN_REGION_BYTES..=MAX_REGION_BYTES).contains(&len) {
            return Err(ShmError::Region(format!("a region of {len} bytes")));
        }
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(|e| ShmError::Region(format!("the region is not a sealable memfd: {e}")))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(ShmError::Region("the region's memfd is not sealed against shrinking".into()));
        }
        let stat = rustix::fs::fstat(&fd).map_err(|e| ShmError::Region(format!("fstat of the region: {e}")))?;
        if u64::try_from(stat.st_size).ok() != Some(len) {
            return Err(ShmError::Region(format!("the region's memfd holds {} bytes, not {len}", stat.st_size)));
        }
        let at = match at {
            Some(a)
                if !a.is_multiple_of(rustix::param::page_size() as u64)
                    || a.checked_add(len).is_none_or(|end| end > USER_ADDRESS_END) =>
            {
                return Err(ShmError::Region(format!(
                    "a region at {a:#x} (+{len}) is not a page-aligned user address"
                )));
            }
            a => a.map(|a| a as usize),
        };
        Self::map(fd, len as usize, at)
    }

    fn map(fd: OwnedFd, len: usize, at: Option<usize>) -> Result<Self, ShmError> {
        let map = Mapping::new(fd.as_fd(), len, at)?;
        Ok(Self { map, fd })
    }

    /// The region's bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The memfd, to pass to the server.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The mapping's first byte. The pointer is valid for [`Self::len`]
    /// bytes while `self` lives: the client hands it out as the program's
    /// pinned memory, the server registers it with the driver and copies
    /// between it and the device (checked ranges only; never through a
    /// Rust reference).
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    /// Whether `[start, start + len)` lies within the mapping (overflow
    /// checked).
    pub fn contains(&self, start: usize, len: usize) -> bool {
        self.range(start, len).is_ok()
    }

    fn range(&self, start: usize, len: usize) -> Result<(), ShmError> {
        match start.checked_add(len) {
            Some(end) if end <= self.map.len => Ok(()),
            _ => Err(ShmError::Protocol(format!("bytes [{start}, +{len}) outside the region of {}", self.map.len))),
        }
    }

    /// The aligned word at `offset` as an atomic shared with the peer (the
    /// command ring's indices and wake-up words): the only references into
    /// the region ever made, and only to atomics, which the peer may change
    /// at any time without making a read of them undefined.
    pub fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, ShmError> {
        self.word(offset, std::mem::size_of::<u32>())?;
        // SAFETY: the word lies within the mapping, which is page aligned,
        // at an offset that is a multiple of its size (checked by `word`),
        // so it is aligned for `AtomicU32`; it stays mapped and backed (the
        // size is sealed) while `self` lives, which bounds the reference.
        // Every access through it is atomic; the peer's writes to it are
        // writes of shared memory by another process, which an atomic
        // tolerates (a torn or hostile value is validated by the caller).
        Ok(unsafe { AtomicU32::from_ptr(self.map.ptr.as_ptr().add(offset).cast::<u32>()) })
    }

    /// As [`Self::atomic_u32`], for a 64-bit word.
    pub fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, ShmError> {
        self.word(offset, std::mem::size_of::<u64>())?;
        // SAFETY: as in `atomic_u32`, for an 8-byte aligned word.
        Ok(unsafe { AtomicU64::from_ptr(self.map.ptr.as_ptr().add(offset).cast::<u64>()) })
    }

    fn word(&self, offset: usize, size: usize) -> Result<(), ShmError> {
        self.range(offset, size)?;
        if !offset.is_multiple_of(size) || !(self.map.ptr.as_ptr() as usize).is_multiple_of(size) {
            return Err(ShmError::Region(format!("a {size}-byte word at {offset} is not aligned")));
        }
        Ok(())
    }

    /// Copies `src` into the region at `start` (large copies on several
    /// threads, [`copy_threads`]).
    pub fn write(&self, start: usize, src: &[u8]) -> Result<(), ShmError> {
        self.range(start, src.len())?;
        in_pieces(src.len(), |piece| {
            // SAFETY: `piece` lies within [0, src.len()), so [start +
            // piece.start, start + piece.end) lies within the mapping
            // (checked above); the mapping lives as long as `self` and stays
            // backed by the memfd (its size is sealed). `src` is this
            // process's memory and cannot overlap the mapping (no reference
            // into it is ever given out). Pieces are disjoint; concurrent
            // writes by the peer only garble bytes it owns.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src[piece.clone()].as_ptr(),
                    self.map.ptr.as_ptr().add(start + piece.start),
                    piece.len(),
                );
            }
        });
        Ok(())
    }

    /// Copies the region's bytes at `start` into `dst`.
    pub fn read(&self, start: usize, dst: &mut [u8]) -> Result<(), ShmError> {
        self.range(start, dst.len())?;
        // An address, not a reference: the pieces write disjoint parts of
        // `dst` from several threads.
        let out = dst.as_mut_ptr() as usize;
        in_pieces(dst.len(), |piece| {
            // SAFETY: as in `write`, with the roles swapped: the source range
            // lies within the mapping; the destination, `dst`'s bytes
            // [piece.start, piece.end), is this process's own, borrowed
            // mutably for the whole call and written by this piece only.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.map.ptr.as_ptr().add(start + piece.start),
                    (out as *mut u8).add(piece.start),
                    piece.len(),
                );
            }
        });
        Ok(())
    }

    /// Appends `len` bytes of the region at `start` to `dst` (no zeroing of
    /// `dst` first).
    pub fn read_append(&self, start: usize, len: usize, dst: &mut Vec<u8>) -> Result<(), ShmError> {
        self.range(start, len)?;
        dst.try_reserve(len).map_err(|e| ShmError::Region(format!("cannot hold {len} bytes: {e}")))?;
        let spare = dst.spare_capacity_mut();
        // SAFETY: the source range lies within the mapping (checked above);
        // `spare` has room for `len` bytes (reserved above) and is this
        // process's memory. After the copy its first `len` bytes are
        // initialized, so the length may grow by `len`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.ptr.as_ptr().add(start), spare.as_mut_ptr().cast::<u8>(), len);
            dst.set_len(dst.len() + len);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_by_one_mapping_are_read_by_another() {
        let a = Region::create("gpupool-test", 1 << 16).expect("region");
        let fd = a.fd().try_clone_to_owned().expect("dup");
        let b = Region::open(fd, 1 << 16).expect("opened");
        a.write(100, b"hello").expect("write");
        let mut out = [0u8; 5];
        b.read(100, &mut out).expect("read");
        assert_eq!(&out, b"hello");
        let mut buf = Vec::new();
        b.read_append(101, 4, &mut buf).expect("append");
        assert_eq!(&buf[..], b"ello");
        assert!(b.read((1 << 16) - 2, &mut out).is_err(), "past the end");
        assert!(b.write(usize::MAX, b"x").is_err(), "overflow");
    }

    #[test]
    fn large_copies_on_several_threads_land_byte_for_byte() {
        // Past PARALLEL_COPY_BYTES, at an odd offset and an odd length, so
        // the pieces' seams fall mid-word.
        let len = (9 << 20) + 13;
        let region = Region::create("gpupool-test", 16 << 20).expect("region");
        let data: Vec<u8> = (0..len).map(|i| (i * 31 + i / 4093) as u8).collect();
        region.write(7, &data).expect("write");
        let mut back = vec![0u8; len];
        region.read(7, &mut back).expect("read");
        assert!(back == data, "a large copy through the region differs");
        let mut head = [0u8; 7];
        region.read(0, &mut head).expect("read");
        assert_eq!(head, [0; 7], "nothing written before the start");
        assert!(region.write((16 << 20) - len + 1, &data).is_err(), "one byte past the end");
    }

    #[test]
    fn regions_map_at_an_asked_address_or_say_it_is_in_use() {
        let len = 1 << 20;
        let at = pick_address(len);
        assert!((PICK_FROM..PICK_TO).contains(&at) && at.is_multiple_of(PICK_ALIGN));
        let a = Region::create_at("gpupool-test", len, Some(at)).expect("a free address");
        assert_eq!(a.as_ptr() as usize, at);
        let fd = || a.fd().try_clone_to_owned().expect("dup");
        // Mapped there already (here, by `a`): refused, nothing replaced.
        let taken = Region::open_at(fd(), len as u64, Some(at as u64)).unwrap_err();
        assert!(matches!(taken, ShmError::AddressInUse(_)), "{taken}");
        let partly = Region::open_at(fd(), len as u64, Some((at - 4096) as u64)).unwrap_err();
        assert!(matches!(partly, ShmError::AddressInUse(_)), "overlapping the end: {partly}");
        a.write(8, b"still a's").expect("a is intact");
        // Elsewhere: the same bytes at another address.
        let other = at + 2 * len;
        let b = Region::open_at(fd(), len as u64, Some(other as u64)).expect("another free address");
        assert_eq!(b.as_ptr() as usize, other);
        let mut out = [0u8; 9];
        b.read(8, &mut out).expect("read");
        assert_eq!(&out, b"still a's");
        // Not page aligned, or past the user addresses.
        assert!(Region::open_at(fd(), len as u64, Some(other as u64 + 1)).is_err());
        assert!(Region::open_at(fd(), len as u64, Some(USER_ADDRESS_END - 4096)).is_err());
        drop(b);
        // Unmapped with `b`: free again.
        Region::open_at(fd(), len as u64, Some(other as u64)).expect("free after the drop");
    }

    #[test]
    fn unsealed_or_mis_sized_files_are_refused() {
        // A memfd without the shrink seal: the peer could truncate it under
        // the mapping.
        let fd = rustix::fs::memfd_create("gpupool-test", MemfdFlags::CLOEXEC).expect("memfd");
        rustix::fs::ftruncate(&fd, 1 << 16).expect("size");
        assert!(Region::open(fd, 1 << 16).unwrap_err().to_string().contains("sealed"));
        // Sealed, but smaller than claimed.
        let a = Region::create("gpupool-test", 1 << 16).expect("region");
        let fd = a.fd().try_clone_to_owned().expect("dup");
        assert!(Region::open(fd, 1 << 20).unwrap_err().to_string().contains("holds"));
        // Not a memfd at all.
        let file = std::fs::File::open("/proc/self/exe").expect("a file");
        assert!(Region::open(file.into(), 1 << 16).is_err());
    }
}
