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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
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

/// A mapped shared region.
#[derive(Debug)]
pub struct Region {
    map: memmap2::MmapRaw,
    fd: OwnedFd,
}

impl Region {
    /// Creates a region of `len` bytes (the client's): a memfd, sized and
    /// sealed against shrinking, growing and further seals, then mapped.
    pub fn create(name: &str, len: usize) -> Result<Self, ShmError> {
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
        Self::map(fd, len)
    }

    /// Maps a region received from a peer, when it is a memfd sealed
    /// against shrinking of exactly `len` bytes (`len` within the bounds of
    /// [`crate::wire::Attach`]).
    pub fn open(fd: OwnedFd, len: u64) -> Result<Self, ShmError> {
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
        Self::map(fd, len as usize)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Self, ShmError> {
        let file = std::fs::File::from(fd);
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| ShmError::Region(format!("cannot map the region: {e}")))?;
        Ok(Self { map, fd: file.into() })
    }

    /// The region's bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
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
        self.map.as_mut_ptr()
    }

    /// Whether `[start, start + len)` lies within the mapping (overflow
    /// checked).
    pub fn contains(&self, start: usize, len: usize) -> bool {
        self.range(start, len).is_ok()
    }

    fn range(&self, start: usize, len: usize) -> Result<(), ShmError> {
        match start.checked_add(len) {
            Some(end) if end <= self.map.len() => Ok(()),
            _ => Err(ShmError::Protocol(format!("bytes [{start}, +{len}) outside the region of {}", self.map.len()))),
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
        Ok(unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(offset).cast::<u32>()) })
    }

    /// As [`Self::atomic_u32`], for a 64-bit word.
    pub fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, ShmError> {
        self.word(offset, std::mem::size_of::<u64>())?;
        // SAFETY: as in `atomic_u32`, for an 8-byte aligned word.
        Ok(unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(offset).cast::<u64>()) })
    }

    fn word(&self, offset: usize, size: usize) -> Result<(), ShmError> {
        self.range(offset, size)?;
        if !offset.is_multiple_of(size) || !(self.map.as_ptr() as usize).is_multiple_of(size) {
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
                    self.map.as_mut_ptr().add(start + piece.start),
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
                    self.map.as_ptr().add(start + piece.start),
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
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), spare.as_mut_ptr().cast::<u8>(), len);
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
