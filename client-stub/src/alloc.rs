//! Device address assignment without a round trip.
//!
//! The server reserves an address range for the session; this allocator
//! hands out addresses from it and says which ranges must be mapped or
//! unmapped on the server. Large allocations get whole granules; small ones
//! share granule-sized slabs, so a 4-byte allocation does not cost 2 MiB.
//! Pointers are the real device addresses, also when stored inside structs.

use crate::error::{ClientError, Result};
use std::collections::BTreeMap;

mod vmm;
pub use vmm::{ACCESS_NONE, ACCESS_READ, ACCESS_READWRITE, AllocationId};

/// Alignment of every allocation (what `cuMemAlloc` guarantees).
pub const ALIGN: u64 = 256;

/// A change the server must make before the memory is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapOp {
    Map { addr: u64, size: u64 },
    Unmap { addr: u64 },
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Whole granules mapped for this allocation alone.
    Large { mapped: u64 },
    /// Inside the slab starting at `slab`.
    Small { slab: u64 },
}

#[derive(Debug)]
struct Slab {
    /// Free runs inside the slab: offset -> length.
    free: BTreeMap<u64, u64>,
    used: u64,
}

/// The session's address space.
#[derive(Debug)]
pub struct AddressSpace {
    base: u64,
    size: u64,
    granule: u64,
    quota: u64,
    mapped: u64,
    /// Free address runs: start -> length (granule multiples).
    free: BTreeMap<u64, u64>,
    allocs: BTreeMap<u64, (u64, Kind)>,
    slabs: BTreeMap<u64, Slab>,
    /// Module-scope variables the server resolved for this session
    /// (start -> size): device memory outside the range that copies and
    /// memsets may name.
    globals: BTreeMap<u64, u64>,
    /// The application's own reservations, allocations and mappings
    /// (`cuMemAddressReserve`, `cuMemCreate`, `cuMemMap`).
    vmm: vmm::Vmm,
}

/// Returns `[start, start + len)` to a free list, merged with its neighbours.
fn insert_coalesced(free: &mut BTreeMap<u64, u64>, mut start: u64, mut len: u64) {
    if let Some((&p, &pl)) = free.range(..start).next_back()
        && p + pl == start
    {
        free.remove(&p);
        start = p;
        len += pl;
    }
    if let Some(nl) = free.remove(&(start + len)) {
        len += nl;
    }
    free.insert(start, len);
}

fn round_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

impl AddressSpace {
    /// `[base, base + size)` with mapping granule `granule` and `quota`
    /// bytes of mapped memory at most.
    pub fn new(base: u64, size: u64, granule: u64, quota: u64) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(base, size);
        }
        Self {
            base,
            size,
            granule,
            quota,
            mapped: 0,
            free,
            allocs: BTreeMap::new(),
            slabs: BTreeMap::new(),
            globals: BTreeMap::new(),
            vmm: vmm::Vmm::default(),
        }
    }

    /// The reserved range `(base, size)`.
    pub fn range(&self) -> (u64, u64) {
        (self.base, self.size)
    }

    /// Records a module variable at `[addr, addr + size)` as device memory.
    pub fn add_global(&mut self, addr: u64, size: u64) {
        self.globals.insert(addr, size);
    }

    /// Forgets a module variable (its module was unloaded).
    pub fn remove_global(&mut self, addr: u64) {
        self.globals.remove(&addr);
    }

    /// The allocation or module variable containing `addr`: `(start, size)`.
    pub fn block_of(&self, addr: u64) -> Option<(u64, u64)> {
        let alloc = self.allocs.range(..=addr).next_back().map(|(&s, &(size, _))| (s, size));
        let global = self.globals.range(..=addr).next_back().map(|(&s, &size)| (s, size));
        let mapped = self.vmm.mapping_of(addr);
        [alloc, global, mapped].into_iter().flatten().find(|&(start, size)| addr - start < size.max(1))
    }

    /// `true` when `addr` is device memory of this session: inside the
    /// reserved range or a resolved module variable. Everything else is a
    /// host address.
    pub fn is_device(&self, addr: u64) -> bool {
        self.contains(addr) || self.block_of(addr).is_some()
    }

    /// Bytes mapped on the server.
    pub fn mapped(&self) -> u64 {
        self.mapped
    }

    /// The quota.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// `true` when `addr` lies in this session's range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }

    /// Size of the allocation starting at `addr`.
    pub fn size_of(&self, addr: u64) -> Option<u64> {
        self.allocs.get(&addr).map(|(s, _)| *s)
    }

    /// Checks an access of `len` bytes at `addr`. Inside this session's
    /// range it must lie within one live allocation; addresses outside the
    /// range are left to the server, which refuses them.
    pub fn check_access(&self, addr: u64, len: u64) -> Result<()> {
        if !self.contains(addr) {
            return Ok(());
        }
        if let Some(checked) = self.vmm.check_access(addr, len) {
            return checked;
        }
        let fits = self
            .block_of(addr)
            .is_some_and(|(start, size)| addr.checked_add(len).is_some_and(|end| end <= start + size));
        if fits {
            Ok(())
        } else {
            Err(ClientError::InvalidValue(format!("{len} bytes at {addr:#x} exceed the allocation they start in")))
        }
    }

    fn take_granules(&mut self, len: u64) -> Result<u64> {
        if self.mapped.saturating_add(len) > self.quota {
            return Err(ClientError::OutOfMemory(format!(
                "{len} more bytes would exceed the virtual GPU's {} bytes ({} in use)",
                self.quota, self.mapped
            )));
        }
        let (&start, &run) = self
            .free
            .iter()
            .find(|(_, l)| **l >= len)
            .ok_or_else(|| ClientError::OutOfMemory(format!("no free address range of {len} bytes")))?;
        self.free.remove(&start);
        if run > len {
            self.free.insert(start + len, run - len);
        }
        self.mapped += len;
        Ok(start)
    }

    fn give_granules(&mut self, start: u64, len: u64) {
        self.mapped -= len;
        insert_coalesced(&mut self.free, start, len);
    }

    /// Allocates `size` bytes; returns the address and the server-side
    /// mapping to queue before the memory is used.
    pub fn alloc(&mut self, size: u64) -> Result<(u64, Option<MapOp>)> {
        if size == 0 {
            return Err(ClientError::InvalidValue("allocation of 0 bytes".into()));
        }
        let padded = round_up(size, ALIGN).ok_or_else(|| ClientError::OutOfMemory("size overflows".into()))?;
        if padded <= self.granule / 4 {
            return self.alloc_small(size, padded);
        }
        let len = round_up(size, self.granule).ok_or_else(|| ClientError::OutOfMemory("size overflows".into()))?;
        let addr = self.take_granules(len)?;
        self.allocs.insert(addr, (size, Kind::Large { mapped: len }));
        Ok((addr, Some(MapOp::Map { addr, size: len })))
    }

    fn alloc_small(&mut self, size: u64, padded: u64) -> Result<(u64, Option<MapOp>)> {
        for (&slab_addr, slab) in self.slabs.iter_mut() {
            if let Some((&off, &run)) = slab.free.iter().find(|(_, l)| **l >= padded) {
                slab.free.remove(&off);
                if run > padded {
                    slab.free.insert(off + padded, run - padded);
                }
                slab.used += padded;
                let addr = slab_addr + off;
                self.allocs.insert(addr, (size, Kind::Small { slab: slab_addr }));
                return Ok((addr, None));
            }
        }
        let slab_addr = self.take_granules(self.granule)?;
        let mut free = BTreeMap::new();
        if self.granule > padded {
            free.insert(padded, self.granule - padded);
        }
        self.slabs.insert(slab_addr, Slab { free, used: padded });
        self.allocs.insert(slab_addr, (size, Kind::Small { slab: slab_addr }));
        Ok((slab_addr, Some(MapOp::Map { addr: slab_addr, size: self.granule })))
    }

    /// Frees the allocation at `addr`; returns the unmapping to queue, if any.
    pub fn free(&mut self, addr: u64) -> Result<Option<MapOp>> {
        let (size, kind) = self
            .allocs
            .remove(&addr)
            .ok_or_else(|| ClientError::InvalidValue(format!("{addr:#x} is not an allocation of this session")))?;
        match kind {
            Kind::Large { mapped } => {
                self.give_granules(addr, mapped);
                Ok(Some(MapOp::Unmap { addr }))
            }
            Kind::Small { slab: slab_addr } => {
                let padded = size.div_ceil(ALIGN) * ALIGN;
                let Some(slab) = self.slabs.get_mut(&slab_addr) else {
                    return Err(ClientError::InvalidValue("allocation's slab is gone".into()));
                };
                insert_coalesced(&mut slab.free, addr - slab_addr, padded);
                slab.used -= padded;
                if slab.used == 0 {
                    self.slabs.remove(&slab_addr);
                    self.give_granules(slab_addr, self.granule);
                    return Ok(Some(MapOp::Unmap { addr: slab_addr }));
                }
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: u64 = 2 << 20;

    #[test]
    fn small_allocations_share_a_slab() {
        let mut a = AddressSpace::new(0x1000_0000, 64 * G, G, 8 * G);
        let (p, op) = a.alloc(4).expect("alloc");
        assert_eq!(op, Some(MapOp::Map { addr: p, size: G }));
        let (q, op) = a.alloc(100).expect("alloc");
        assert_eq!((q, op), (p + ALIGN, None));
        assert_eq!(a.free(p).expect("free"), None);
        assert_eq!(a.free(q).expect("free"), Some(MapOp::Unmap { addr: p }));
        assert_eq!(a.mapped(), 0);
    }

    #[test]
    fn quota_enforced_without_round_trip() {
        let mut a = AddressSpace::new(0, 64 * G, G, 4 * G);
        a.alloc(3 * G).expect("fits");
        assert!(matches!(a.alloc(2 * G), Err(ClientError::OutOfMemory(_))));
        assert!(matches!(a.free(12345), Err(ClientError::InvalidValue(_))));
    }

    #[test]
    fn globals_are_device_memory() {
        let mut a = AddressSpace::new(1 << 40, 64 * G, G, 8 * G);
        let (p, _) = a.alloc(1000).expect("alloc");
        assert_eq!(a.block_of(p + 999), Some((p, 1000)));
        assert_eq!(a.block_of(p + 1000), None);
        assert!(!a.is_device(0x5000));
        a.add_global(0x5000, 64);
        assert!(a.is_device(0x5000) && a.is_device(0x503f) && !a.is_device(0x5040));
        assert_eq!(a.block_of(0x5010), Some((0x5000, 64)));
        a.remove_global(0x5000);
        assert!(!a.is_device(0x5000));
    }

    proptest! {
        // Live allocations never overlap, stay in range, and mapped memory
        // never exceeds the quota.
        #[test]
        fn no_overlap(ops in proptest::collection::vec((1u64..(3 * G), any::<bool>()), 1..60)) {
            let mut a = AddressSpace::new(1 << 40, 32 * G, G, 16 * G);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (size, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (addr, _) = live.remove(0);
                    a.free(addr).expect("free live");
                } else if let Ok((addr, _)) = a.alloc(size) {
                    prop_assert!(a.contains(addr) && a.contains(addr + size - 1));
                    for &(o, os) in &live {
                        prop_assert!(addr + size <= o || o + os <= addr, "overlap");
                    }
                    live.push((addr, size));
                }
                prop_assert!(a.mapped() <= a.quota());
            }
        }
    }
}
