//! The application's own virtual memory management, without a round trip.
//!
//! `cuMemAddressReserve` carves a range out of the session's reserved
//! range (the same free list `cuMemAlloc` draws from; nothing is mapped and
//! the server is not told); `cuMemCreate` picks a handle id here and counts
//! the memory against the quota at once, so an over-quota request fails
//! immediately; `cuMemMap`, `cuMemUnmap`, `cuMemSetAccess` and
//! `cuMemRelease` are checked against these tables and queued. The server
//! checks everything again against its own tables.
//!
//! Physical memory lives while it is referenced (created or retained and
//! not yet released) or mapped, as in CUDA.

use super::{AddressSpace, insert_coalesced};
use crate::error::{ClientError, Result};
use gpupool_proto::v1::{self, call::Op};
use std::collections::{BTreeMap, HashMap};

/// `CUmemAccess_flags`.
pub const ACCESS_NONE: u32 = 0;
pub const ACCESS_READ: u32 = 1;
pub const ACCESS_READWRITE: u32 = 3;

/// A physical allocation of this session (`CUmemGenericAllocationHandle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllocationId(pub u32);

#[derive(Debug, Clone, Copy)]
struct Handle {
    size: u64,
    refs: u32,
    maps: u32,
    /// The server's driver granted compressible memory.
    compressed: bool,
    /// `CUmemAllocationProp::requestedHandleTypes` as the application
    /// asked (reported back; nothing here exports them).
    handle_types: u32,
}

/// One `cuMemMap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    size: u64,
    handle: u32,
    access: u32,
}

#[derive(Debug, Default)]
pub(super) struct Vmm {
    /// start -> size.
    reservations: BTreeMap<u64, u64>,
    handles: HashMap<u32, Handle>,
    next_handle: u32,
    maps: BTreeMap<u64, Mapping>,
}

fn invalid(message: String) -> ClientError {
    ClientError::InvalidValue(message)
}

fn unknown(handle: AllocationId) -> ClientError {
    ClientError::InvalidHandle(format!("allocation handle {} is not live", handle.0))
}

impl Vmm {
    /// The mapping containing `addr`: `(start, size)`.
    pub(super) fn mapping_of(&self, addr: u64) -> Option<(u64, u64)> {
        let (&start, m) = self.maps.range(..=addr).next_back()?;
        (addr - start < m.size).then_some((start, m.size))
    }

    /// `None` when `addr` is in no mapping of the application's; else
    /// whether `len` bytes from it run through accessible mappings without
    /// a gap (a buffer may be made of several allocations).
    pub(super) fn check_access(&self, addr: u64, len: u64) -> Option<Result<()>> {
        let (mut start, _) = self.mapping_of(addr)?;
        let end = addr.saturating_add(len);
        Some(loop {
            let m = self.maps[&start];
            if m.access == ACCESS_NONE {
                break Err(invalid(format!("the mapping at {start:#x} is not accessible yet (cuMemSetAccess)")));
            }
            let next = start + m.size;
            if end <= next {
                break Ok(());
            }
            if !self.maps.contains_key(&next) {
                break Err(invalid(format!("{len} bytes at {addr:#x} run past the mapped memory at {next:#x}")));
            }
            start = next;
        })
    }

    fn reservation_of(&self, addr: u64) -> Option<(u64, u64)> {
        let (&start, &size) = self.reservations.range(..=addr).next_back()?;
        (addr - start < size).then_some((start, size))
    }
}

impl AddressSpace {
    /// The mapping granularity (minimum and recommended alike).
    pub fn granularity(&self) -> u64 {
        self.granule
    }

    /// `cuMemAddressReserve`: `size` bytes aligned to `alignment` (0: the
    /// granularity), at `hint` when that range is free. Nothing is mapped.
    pub fn reserve(&mut self, size: u64, alignment: u64, hint: u64) -> Result<u64> {
        let g = self.granule;
        if size == 0 || !size.is_multiple_of(g) {
            return Err(invalid(format!("reservation of {size} bytes is not a multiple of the granularity {g}")));
        }
        if alignment != 0 && !alignment.is_power_of_two() {
            return Err(invalid(format!("alignment {alignment} is not a power of two")));
        }
        let align = alignment.max(g);
        let fits = |run_start: u64, run_len: u64, at: u64| {
            at >= run_start && at.checked_add(size).is_some_and(|end| end <= run_start + run_len)
        };
        let hinted = (hint != 0 && hint.is_multiple_of(align))
            .then(|| self.free.range(..=hint).next_back().filter(|(s, l)| fits(**s, **l, hint)).map(|(s, l)| (*s, *l)))
            .flatten()
            .map(|(s, l)| (s, l, hint));
        let chosen = hinted.or_else(|| {
            self.free.iter().find_map(|(&s, &l)| {
                let at = s.checked_next_multiple_of(align)?;
                fits(s, l, at).then_some((s, l, at))
            })
        });
        let (run_start, run_len, at) =
            chosen.ok_or_else(|| ClientError::OutOfMemory(format!("no free address range of {size} bytes")))?;
        self.free.remove(&run_start);
        if at > run_start {
            self.free.insert(run_start, at - run_start);
        }
        let run_end = run_start + run_len;
        if at + size < run_end {
            self.free.insert(at + size, run_end - at - size);
        }
        self.vmm.reservations.insert(at, size);
        Ok(at)
    }

    /// `cuMemAddressFree`: the whole reservation, with nothing mapped in it.
    pub fn unreserve(&mut self, addr: u64, size: u64) -> Result<()> {
        if self.vmm.reservations.get(&addr) != Some(&size) {
            return Err(invalid(format!("{addr:#x} (+{size}) is not a reservation of this session")));
        }
        if self.vmm.maps.range(addr..addr + size).next().is_some() {
            return Err(invalid(format!("the reservation at {addr:#x} still has mappings")));
        }
        self.vmm.reservations.remove(&addr);
        insert_coalesced(&mut self.free, addr, size);
        Ok(())
    }

    /// `cuMemCreate`: a new handle for `size` bytes, counted against the
    /// quota now; returns the call to send (`compressible`: the
    /// application asked for compressible memory, which the reply grants or
    /// not, [`AddressSpace::set_compressed`]).
    pub fn create(&mut self, size: u64, compressible: bool) -> Result<(AllocationId, Op)> {
        let g = self.granule;
        if size == 0 || !size.is_multiple_of(g) {
            return Err(invalid(format!("allocation of {size} bytes is not a multiple of the granularity {g}")));
        }
        if self.mapped.saturating_add(size) > self.quota {
            return Err(ClientError::OutOfMemory(format!(
                "{size} more bytes would exceed the virtual GPU's {} bytes ({} in use)",
                self.quota, self.mapped
            )));
        }
        self.vmm.next_handle = self.vmm.next_handle.checked_add(1).ok_or_else(|| invalid("out of handles".into()))?;
        let id = self.vmm.next_handle;
        self.vmm.handles.insert(id, Handle { size, refs: 1, maps: 0, compressed: false, handle_types: 0 });
        self.mapped += size;
        Ok((AllocationId(id), Op::VmmCreate(v1::VmmCreate { handle: id, size, compressible })))
    }

    /// Records what the server granted a compressible `create`.
    pub fn set_compressed(&mut self, handle: AllocationId, compressed: bool) {
        if let Some(h) = self.vmm.handles.get_mut(&handle.0) {
            h.compressed = compressed;
        }
    }

    /// Records the shareable handle types the application requested for
    /// `handle` (`cuMemGetAllocationPropertiesFromHandle` reports them).
    pub fn set_handle_types(&mut self, handle: AllocationId, types: u32) {
        if let Some(h) = self.vmm.handles.get_mut(&handle.0) {
            h.handle_types = types;
        }
    }

    /// The shareable handle types requested for a live handle.
    pub fn allocation_handle_types(&self, handle: AllocationId) -> Option<u32> {
        self.vmm.handles.get(&handle.0).filter(|h| h.refs > 0).map(|h| h.handle_types)
    }

    /// Takes back a `create` the server refused: its handle and quota.
    pub fn forget_created(&mut self, handle: AllocationId) {
        if let Some(h) = self.vmm.handles.get_mut(&handle.0)
            && h.maps == 0
        {
            h.refs = 0;
            self.drop_if_unused(handle.0);
        }
    }

    /// Size of a live handle's allocation.
    pub fn allocation_size(&self, handle: AllocationId) -> Option<u64> {
        self.vmm.handles.get(&handle.0).filter(|h| h.refs > 0).map(|h| h.size)
    }

    /// Whether a live handle's allocation is compressible.
    pub fn allocation_compressed(&self, handle: AllocationId) -> Option<bool> {
        self.vmm.handles.get(&handle.0).filter(|h| h.refs > 0).map(|h| h.compressed)
    }

    fn drop_if_unused(&mut self, handle: u32) {
        if let Some(h) = self.vmm.handles.get(&handle)
            && h.refs == 0
            && h.maps == 0
        {
            self.mapped -= h.size;
            self.vmm.handles.remove(&handle);
        }
    }

    /// `cuMemRelease`.
    pub fn release(&mut self, handle: AllocationId) -> Result<Op> {
        let h = self.vmm.handles.get_mut(&handle.0).filter(|h| h.refs > 0).ok_or_else(|| unknown(handle))?;
        h.refs -= 1;
        self.drop_if_unused(handle.0);
        Ok(Op::VmmRelease(v1::VmmRelease { handle: handle.0 }))
    }

    /// `cuMemRetainAllocationHandle`: a new reference to the allocation
    /// mapped at `addr`.
    pub fn retain(&mut self, addr: u64) -> Result<(AllocationId, Op)> {
        let (start, _) = self
            .vmm
            .mapping_of(addr)
            .ok_or_else(|| invalid(format!("{addr:#x} is not in a cuMemMap mapping of this session")))?;
        let handle = self.vmm.maps[&start].handle;
        let h = self.vmm.handles.get_mut(&handle).ok_or_else(|| unknown(AllocationId(handle)))?;
        h.refs = h.refs.checked_add(1).ok_or_else(|| invalid("too many references".into()))?;
        Ok((AllocationId(handle), Op::VmmRetain(v1::VmmRetain { handle })))
    }

    /// `cuMemMap`: `size` bytes of `handle` from `offset` at `addr`, inside
    /// one reservation, overlapping no mapping. Inaccessible until
    /// [`Self::set_access`].
    pub fn map(&mut self, addr: u64, size: u64, offset: u64, handle: AllocationId) -> Result<Op> {
        let g = self.granule;
        let h = *self.vmm.handles.get(&handle.0).filter(|h| h.refs > 0).ok_or_else(|| unknown(handle))?;
        if size == 0 || [addr, size, offset].iter().any(|v| !v.is_multiple_of(g)) {
            return Err(invalid(format!(
                "cuMemMap of {addr:#x} (+{size}) from offset {offset}: not non-empty multiples of the granularity {g}"
            )));
        }
        if offset.checked_add(size).is_none_or(|end| end > h.size) {
            return Err(invalid(format!("{size} bytes from offset {offset} run past the allocation's {}", h.size)));
        }
        let inside = self.vmm.reservation_of(addr).is_some_and(|(s, l)| addr + size <= s + l);
        if !inside {
            return Err(invalid(format!("{addr:#x} (+{size}) is not inside one reservation (cuMemAddressReserve)")));
        }
        let end = addr + size;
        let before = self.vmm.maps.range(..addr).next_back().is_some_and(|(&s, m)| s + m.size > addr);
        if before || self.vmm.maps.range(addr..end).next().is_some() {
            return Err(invalid(format!("{addr:#x} (+{size}) overlaps a mapping")));
        }
        self.vmm.maps.insert(addr, Mapping { size, handle: handle.0, access: ACCESS_NONE });
        if let Some(h) = self.vmm.handles.get_mut(&handle.0) {
            h.maps += 1;
        }
        Ok(Op::VmmMap(v1::VmmMap { addr, size, offset, handle: handle.0 }))
    }

    /// `cuMemUnmap`: every mapping inside the range, none cut.
    pub fn unmap(&mut self, addr: u64, size: u64) -> Result<Op> {
        let end = addr.checked_add(size).ok_or_else(|| invalid("range overflows".into()))?;
        let mut inside = Vec::new();
        for (&s, m) in self.vmm.maps.range(..end) {
            if s + m.size <= addr {
                continue;
            }
            if s < addr || s + m.size > end {
                return Err(invalid(format!("cuMemUnmap of {addr:#x} (+{size}) would cut the mapping at {s:#x}")));
            }
            inside.push(s);
        }
        if inside.is_empty() {
            return Err(invalid(format!("nothing is mapped at {addr:#x} (+{size})")));
        }
        for s in inside {
            if let Some(m) = self.vmm.maps.remove(&s) {
                if let Some(h) = self.vmm.handles.get_mut(&m.handle) {
                    h.maps -= 1;
                }
                self.drop_if_unused(m.handle);
            }
        }
        Ok(Op::VmmUnmap(v1::VmmUnmap { addr, size }))
    }

    /// `cuMemSetAccess` for the session's device: whole mappings, no gaps.
    pub fn set_access(&mut self, addr: u64, size: u64, flags: u32) -> Result<Op> {
        if !matches!(flags, ACCESS_NONE | ACCESS_READ | ACCESS_READWRITE) {
            return Err(invalid(format!("unknown access flags {flags}")));
        }
        let end = addr.checked_add(size).ok_or_else(|| invalid("range overflows".into()))?;
        if size == 0 {
            return Err(invalid("cuMemSetAccess of 0 bytes".into()));
        }
        let mut at = addr;
        let mut starts = Vec::new();
        while at < end {
            match self.vmm.maps.get(&at) {
                Some(m) if at + m.size <= end => {
                    starts.push(at);
                    at += m.size;
                }
                _ => return Err(invalid(format!("{addr:#x} (+{size}) is not whole mappings without gaps"))),
            }
        }
        for s in starts {
            if let Some(m) = self.vmm.maps.get_mut(&s) {
                m.access = flags;
            }
        }
        Ok(Op::VmmSetAccess(v1::VmmSetAccess { addr, size, flags }))
    }

    /// `cuMemGetAccess`: the flags of the mapping containing `addr`.
    pub fn access_of(&self, addr: u64) -> Option<u32> {
        let (start, _) = self.vmm.mapping_of(addr)?;
        Some(self.vmm.maps[&start].access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 2 << 20;

    fn space() -> AddressSpace {
        AddressSpace::new(1 << 40, 64 * G, G, 8 * G)
    }

    #[test]
    fn reservations_come_from_the_range_and_honour_alignment_and_hints() {
        let mut a = space();
        let r = a.reserve(4 * G, 0, 0).expect("reserve");
        assert!(a.contains(r) && a.contains(r + 4 * G - 1));
        assert_eq!(a.mapped(), 0, "reserving costs no quota");
        let aligned = a.reserve(G, 8 * G, 0).expect("aligned");
        assert!(aligned.is_multiple_of(8 * G));
        let hint = (1 << 40) + 32 * G;
        assert_eq!(a.reserve(2 * G, 0, hint).expect("at the hint"), hint);
        assert_ne!(a.reserve(2 * G, 0, hint).expect("hint taken"), hint, "taken: placed elsewhere");
        assert!(matches!(a.reserve(G + 1, 0, 0), Err(ClientError::InvalidValue(_))));
        assert!(matches!(a.reserve(G, 3 * G, 0), Err(ClientError::InvalidValue(_))));
        assert!(matches!(a.reserve(128 * G, 0, 0), Err(ClientError::OutOfMemory(_))));
        // cuMemAlloc never lands in a reservation.
        let (p, _) = a.alloc(G).expect("alloc");
        assert!(p + G <= r || p >= r + 4 * G);
        assert!(matches!(a.unreserve(r, 2 * G), Err(ClientError::InvalidValue(_))));
        a.unreserve(r, 4 * G).expect("free");
        assert!(matches!(a.unreserve(r, 4 * G), Err(ClientError::InvalidValue(_))));
    }

    #[test]
    fn create_map_access_unmap_release() {
        let mut a = space();
        let r = a.reserve(4 * G, 0, 0).expect("reserve");
        let (h, op) = a.create(2 * G, false).expect("create");
        assert_eq!(op, Op::VmmCreate(v1::VmmCreate { handle: h.0, size: 2 * G, compressible: false }));
        assert_eq!(a.mapped(), 2 * G);
        assert!(matches!(a.create(7 * G, false), Err(ClientError::OutOfMemory(_))), "quota, at once");
        a.map(r, 2 * G, 0, h).expect("map");
        a.map(r + 2 * G, G, G, h).expect("alias of the second half");
        assert!(matches!(a.map(r + G, G, 0, h), Err(ClientError::InvalidValue(_))), "overlap");
        assert!(matches!(a.map(r + 3 * G, 2 * G, 0, h), Err(ClientError::InvalidValue(_))), "past the reservation");
        assert!(matches!(a.map(r + 3 * G, G, 0, AllocationId(99)), Err(ClientError::InvalidHandle(_))));
        assert!(a.check_access(r, 16).is_err(), "no access yet");
        a.set_access(r, 3 * G, ACCESS_READWRITE).expect("access");
        a.check_access(r + 2 * G - 8, 16).expect("across the seam");
        assert!(a.check_access(r + 3 * G - 8, 16).is_err(), "past the end");
        assert_eq!(a.block_of(r + 2 * G + 5), Some((r + 2 * G, G)));
        assert_eq!(a.access_of(r), Some(ACCESS_READWRITE));
        assert!(matches!(a.unreserve(r, 4 * G), Err(ClientError::InvalidValue(_))), "still mapped");

        a.release(h).expect("release");
        assert!(matches!(a.release(h), Err(ClientError::InvalidHandle(_))));
        assert_eq!(a.mapped(), 2 * G, "mapped memory lives on");
        let (again, _) = a.retain(r + 2 * G).expect("retain");
        assert_eq!(again, h);
        assert!(matches!(a.unmap(r + G, G), Err(ClientError::InvalidValue(_))), "would cut");
        a.unmap(r, 3 * G).expect("unmap both");
        assert_eq!(a.mapped(), 2 * G, "retained");
        a.release(h).expect("release the retained reference");
        assert_eq!(a.mapped(), 0);
        a.unreserve(r, 4 * G).expect("free");
    }

    #[test]
    fn compressible_creates_ask_and_a_refused_one_gives_its_quota_back() {
        let mut a = space();
        let (h, op) = a.create(2 * G, true).expect("create");
        assert_eq!(op, Op::VmmCreate(v1::VmmCreate { handle: h.0, size: 2 * G, compressible: true }));
        assert_eq!(a.allocation_compressed(h), Some(false), "not until the server says so");
        a.set_compressed(h, true);
        assert_eq!(a.allocation_compressed(h), Some(true));
        let (refused, _) = a.create(G, true).expect("create");
        assert_eq!(a.mapped(), 3 * G);
        a.forget_created(refused);
        assert_eq!(a.mapped(), 2 * G, "the refused allocation's quota is back");
        assert_eq!(a.allocation_compressed(refused), None);
        assert!(matches!(a.release(refused), Err(ClientError::InvalidHandle(_))));
        a.release(h).expect("release");
        assert_eq!(a.allocation_compressed(h), None);
    }
}
