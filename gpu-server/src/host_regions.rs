//! Host regions of a client on this host: the program's pinned memory,
//! which the client allocates inside sealed memfds it attached to its
//! session through shared memory (docs/transport.md, "Pinned memory in the
//! region"). The session's shared-memory attachment maps and registers
//! each one with the driver and adds it here; the session's copies name a
//! region by id with an offset and a length, checked here against the
//! mapping, and run between the registered pages and the device without a
//! pass through a staging buffer.
//!
//! Lifetimes: a region is held by this table and, for the length of one
//! call, by the session thread copying with it. When the attachment ends
//! (the client exited, the session ended or moved) it empties the table;
//! the last holder drops the region, which unregisters it (after the
//! copies queued with it finished) and then unmaps it.

use crate::device::{HostPinner, Pinned};
use crate::error::CallError;
use crate::server::metrics::Metrics;
use gpupool_shm::region::Region;
use gpupool_shm::wire::{self, MAX_HOST_REGIONS};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Host memory one session may have registered at once, over all its host
/// regions: page-locked memory is the host's, shared by every session.
pub const MAX_HOST_REGION_BYTES: u64 = 16 << 30;

/// A client's region, mapped here and registered with the driver.
#[derive(Debug)]
pub struct HostRegion {
    // Field order is drop order: unregistered, then unmapped, then
    // uncounted.
    _pinned: Pinned,
    region: Region,
    _counted: Counted,
    /// The mapping is at the client's address and the device reaches it
    /// there: the program's pointers into it are device addresses.
    addressable: bool,
}

/// Counts a region in the `shm_regions` (mapped) and `shm_registered`
/// gauges while it lives.
#[derive(Debug)]
struct Counted(Option<Arc<Metrics>>);

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.shm_registered.fetch_sub(1, Ordering::Relaxed);
            m.shm_regions.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl HostRegion {
    /// Registers `region` with the driver through `pinner`; `metrics`
    /// count it (`shm_regions`, `shm_registered`) until it drops.
    ///
    /// `at_client_address`: the region is mapped where the client mapped
    /// it ([`Region::open_at`]); when the device reaches it at that same
    /// address too, its range is [`Self::addressable`].
    pub fn new(
        region: Region,
        pinner: &dyn HostPinner,
        registered: Option<Arc<Metrics>>,
        at_client_address: bool,
    ) -> Result<Self, CallError> {
        let (pinned, device) = pinner.pin(&region)?;
        if let Some(m) = &registered {
            m.shm_registered.fetch_add(1, Ordering::Relaxed);
            m.shm_regions.fetch_add(1, Ordering::Relaxed);
        }
        let addressable = at_client_address && device == region.as_ptr() as u64;
        if at_client_address && !addressable {
            tracing::debug!(host = ?region.as_ptr(), device, "host region: the device reaches it at another address");
        }
        Ok(Self { _pinned: pinned, region, _counted: Counted(registered), addressable })
    }

    /// Whether the program's pointers into the region are device addresses
    /// (see [`Self::new`]).
    pub fn addressable(&self) -> bool {
        self.addressable
    }

    /// Whether `[addr, end)` lies in the region, which is
    /// [`Self::addressable`].
    fn holds(&self, addr: u64, end: u64) -> bool {
        let base = self.region.as_ptr() as u64;
        self.addressable && addr >= base && end <= base + self.region.len() as u64 && addr < end
    }

    /// Copies `out.len()` bytes at device address `addr` (inside the
    /// region, [`Self::addressable`]) out of the mapping.
    pub fn load(&self, addr: u64, out: &mut [u8]) -> Result<(), CallError> {
        let start = self.offset_of(addr, out.len())?;
        self.region.read(start, out).map_err(|e| CallError::invalid_value(e.to_string()))
    }

    /// Writes `data` at device address `addr` (as [`Self::load`]).
    pub fn store(&self, addr: u64, data: &[u8]) -> Result<(), CallError> {
        let start = self.offset_of(addr, data.len())?;
        self.region.write(start, data).map_err(|e| CallError::invalid_value(e.to_string()))
    }

    fn offset_of(&self, addr: u64, len: usize) -> Result<usize, CallError> {
        let end = addr.checked_add(len as u64);
        match end {
            Some(end) if self.holds(addr, end) => Ok((addr - self.region.as_ptr() as u64) as usize),
            _ => Err(CallError::invalid_value(format!("{addr:#x} (+{len}) is not in this host region"))),
        }
    }

    /// The mapping.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// `[offset, offset + size)` of the region as `(start, len)`, when it
    /// lies inside the mapping and is not empty.
    pub fn range(&self, offset: u64, size: u64) -> Result<(usize, usize), CallError> {
        wire::host_range(self.region.len(), offset, size).map_err(|e| CallError::invalid_value(e.to_string()))
    }
}

/// One session's host regions by id (from 1), shared by its
/// shared-memory attachment and its session thread. Each is kept with the
/// attachment that added it (its owner), which alone removes it.
#[derive(Debug, Default)]
pub struct HostRegions {
    regions: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    by_id: HashMap<u32, (u64, Arc<HostRegion>)>,
    /// No region may be added (the session is moving away).
    frozen: bool,
}

impl std::ops::Deref for Table {
    type Target = HashMap<u32, (u64, Arc<HostRegion>)>;
    fn deref(&self) -> &Self::Target {
        &self.by_id
    }
}

impl std::ops::DerefMut for Table {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.by_id
    }
}

impl HostRegions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.regions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops regions from being added, for a session about to move to
    /// another server (which cannot map this host's memory). While any is
    /// attached the program's pinned memory lives there and its copies name
    /// it: refused unless the client can be told to stop naming them
    /// (`revocable`: its commands come through a command ring).
    pub fn freeze(&self, revocable: bool) -> Result<(), String> {
        let mut regions = self.lock();
        if !regions.is_empty() && !revocable {
            return Err(format!(
                "the session's pinned memory lives in {} host region(s) shared with its client on this host, which another server cannot map",
                regions.len()
            ));
        }
        regions.frozen = true;
        Ok(())
    }

    /// Lets regions be added again: the move [`Self::freeze`] began for
    /// did not happen (the session stays here).
    pub fn thaw(&self) {
        self.lock().frozen = false;
    }

    /// Whether any region is attached.
    pub fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Whether a region of `len` bytes may be added as `id`: a new id,
    /// within the count and byte bounds.
    pub fn admits(&self, id: u32, len: u64) -> Result<(), CallError> {
        let regions = self.lock();
        if regions.frozen {
            return Err(CallError::not_supported("the session is moving to another server: no host region attaches"));
        }
        if regions.contains_key(&id) {
            return Err(CallError::invalid_value(format!("host region {id} is already attached")));
        }
        if regions.len() >= MAX_HOST_REGIONS {
            return Err(CallError::out_of_memory(format!(
                "the session holds the maximum of {MAX_HOST_REGIONS} host regions"
            )));
        }
        let held: u64 = regions.values().map(|(_, r)| r.region.len() as u64).sum();
        if held.saturating_add(len) > MAX_HOST_REGION_BYTES {
            return Err(CallError::out_of_memory(format!(
                "{len} more bytes of host regions exceed the session's {MAX_HOST_REGION_BYTES} (holding {held})"
            )));
        }
        Ok(())
    }

    /// Adds region `id` for attachment `owner` (checked with
    /// [`Self::admits`] again).
    pub fn insert(&self, owner: u64, id: u32, region: HostRegion) -> Result<(), CallError> {
        self.admits(id, region.region.len() as u64)?;
        self.lock().insert(id, (owner, Arc::new(region)));
        Ok(())
    }

    /// Region `id` for one call, or an error naming it.
    pub fn get(&self, id: u32) -> Result<Arc<HostRegion>, CallError> {
        self.lock()
            .get(&id)
            .map(|(_, r)| r.clone())
            .ok_or_else(|| CallError::invalid_value(format!("host region {id} is not attached to this session")))
    }

    /// Removes `owner`'s region `id`; false when it has none.
    pub fn remove(&self, owner: u64, id: u32) -> bool {
        let removed = {
            let mut regions = self.lock();
            match regions.get(&id) {
                Some((o, _)) if *o == owner => regions.remove(&id),
                _ => None,
            }
        };
        // Dropped outside the lock: unregistering waits for the device.
        removed.is_some()
    }

    /// Removes every region of `owner` (its attachment ended).
    pub fn clear(&self, owner: u64) {
        let gone: Vec<_> = {
            let mut regions = self.lock();
            let ids: Vec<u32> = regions.iter().filter(|(_, (o, _))| *o == owner).map(|(id, _)| *id).collect();
            ids.into_iter().filter_map(|id| regions.remove(&id)).collect()
        };
        drop(gone);
    }

    /// The [`HostRegion::addressable`] region holding all of
    /// `[addr, end)` (non-empty), for one call: the program used a pointer
    /// into its pinned memory as a device address.
    pub fn resolve(&self, addr: u64, end: u64) -> Option<Arc<HostRegion>> {
        self.lock().values().find(|(_, r)| r.holds(addr, end)).map(|(_, r)| r.clone())
    }

    /// Regions attached now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is attached.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::NoPinning;

    fn region(len: usize) -> HostRegion {
        HostRegion::new(Region::create("gpupool-test", len).expect("region"), &NoPinning, None, false).expect("pinned")
    }

    #[test]
    fn ranges_are_checked_against_the_mapping() {
        let r = region(1 << 16);
        assert_eq!(r.range(0, 1 << 16).expect("whole"), (0, 1 << 16));
        assert_eq!(r.range((1 << 16) - 1, 1).expect("last byte"), ((1 << 16) - 1, 1));
        assert!(r.range(1 << 16, 1).is_err(), "past the end");
        assert!(r.range(1, 1 << 16).is_err(), "across the end");
        assert!(r.range(u64::MAX, 2).is_err(), "overflow");
        assert!(r.range(0, 0).is_err(), "empty");
    }

    #[test]
    fn regions_are_bounded_and_unique() {
        let regions = HostRegions::default();
        regions.insert(7, 1, region(4096)).expect("first");
        assert!(regions.insert(7, 1, region(4096)).is_err(), "same id");
        assert!(regions.get(2).is_err(), "unknown id");
        assert!(regions.admits(2, MAX_HOST_REGION_BYTES).is_err(), "over the byte bound");
        for id in 2..=MAX_HOST_REGIONS as u32 {
            regions.insert(if id % 2 == 0 { 8 } else { 7 }, id, region(4096)).expect("within the count");
        }
        assert!(regions.admits(1000, 4096).is_err(), "over the count");
        assert!(!regions.remove(8, 1), "another attachment's");
        assert!(regions.remove(7, 1));
        assert!(!regions.remove(7, 1), "already gone");
        regions.clear(8);
        assert_eq!(regions.len(), MAX_HOST_REGIONS / 2 - 1, "only the odd ids of owner 7 are left");
        regions.clear(7);
        assert!(regions.is_empty());
        regions.freeze(false).expect("empty: may move");
        assert!(regions.admits(1, 4096).is_err(), "frozen");
        regions.thaw();
        assert!(regions.admits(1, 4096).is_ok(), "thawed: the move did not happen");
        let busy = HostRegions::default();
        busy.insert(1, 1, region(4096)).expect("a region");
        assert!(busy.any());
        assert!(busy.freeze(false).is_err(), "pinned memory here and no ring to revoke it: no move");
        assert!(busy.admits(2, 4096).is_ok(), "not frozen by a refused move");
        busy.freeze(true).expect("revocable: may move");
        assert!(busy.admits(2, 4096).is_err(), "frozen");
    }

    #[test]
    fn only_regions_at_the_clients_address_resolve_by_address() {
        let regions = HostRegions::default();
        let at = |len| {
            let a = gpupool_shm::region::pick_address(len);
            Region::create_at("gpupool-test", len, Some(a)).expect("region")
        };
        let same = HostRegion::new(at(1 << 16), &NoPinning, None, true).expect("pinned");
        let elsewhere = HostRegion::new(at(1 << 16), &NoPinning, None, false).expect("pinned");
        let (a, b) = (same.region().as_ptr() as u64, elsewhere.region().as_ptr() as u64);
        assert!(same.addressable() && !elsewhere.addressable());
        regions.insert(1, 1, same).expect("insert");
        regions.insert(1, 2, elsewhere).expect("insert");
        assert!(regions.resolve(a, a + (1 << 16)).is_some(), "all of it");
        assert!(regions.resolve(a + 8, a + 16).is_some(), "inside");
        assert!(regions.resolve(a + 8, a + 8).is_none(), "empty");
        assert!(regions.resolve(a + 8, a + (1 << 16) + 1).is_none(), "past the end");
        assert!(regions.resolve(a - 1, a + 1).is_none(), "before the start");
        assert!(regions.resolve(b, b + 8).is_none(), "not at the client's address");
        let r = regions.resolve(a, a + 8).expect("held");
        r.store(a + 4, b"word").expect("store");
        let mut out = [0u8; 4];
        r.load(a + 4, &mut out).expect("load");
        assert_eq!(&out, b"word");
        assert!(r.store(a + (1 << 16) - 2, b"word").is_err(), "a store past the end");
        regions.clear(1);
        assert!(regions.resolve(a, a + 8).is_none(), "detached");
    }

    #[test]
    fn the_gauge_counts_live_regions() {
        let metrics = Arc::new(Metrics::default());
        let r = HostRegion::new(
            Region::create("gpupool-test", 4096).expect("region"),
            &NoPinning,
            Some(metrics.clone()),
            false,
        )
        .expect("pinned");
        assert_eq!(metrics.shm_registered.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.shm_regions.load(Ordering::Relaxed), 1);
        drop(r);
        assert_eq!(metrics.shm_registered.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.shm_regions.load(Ordering::Relaxed), 0);
    }
}
