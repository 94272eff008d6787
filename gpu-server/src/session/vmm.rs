//! The application's own virtual memory management: physical allocations
//! under client-chosen handles (`VmmCreate`), mapped (`VmmMap`) at
//! addresses of the session's range the client reserved for them, made
//! accessible with `VmmSetAccess`.
//!
//! The rules are CUDA's, checked against this session's tables before the
//! backend sees anything: sizes, offsets and addresses are multiples of
//! the granularity; a mapping lies inside the session's range and overlaps
//! no other mapping (of either kind); an allocation's memory counts against
//! the quota from its creation until its last reference is released and
//! its last mapping unmapped (a released handle's memory stays while it is
//! mapped, as in CUDA). The client's own reservations are its business:
//! the server only knows the session's whole range.

use super::{CallOutcome, SessionState, new_id};
use crate::device::{ACCESS_NONE, ACCESS_READ, ACCESS_READWRITE, BackendSession};
use crate::error::CallError;
use gpupool_proto::v1;
use gpupool_proto::v1::call_result::Value;

/// One `VmmMap`.
#[derive(Debug)]
pub(super) struct VmmMapping<M> {
    size: u64,
    handle: u32,
    /// Where in the allocation the mapping starts.
    offset: u64,
    access: u32,
    mapping: M,
}

/// One `VmmCreate`: its memory, references and mappings.
#[derive(Debug)]
pub(super) struct VmmHandle<A> {
    size: u64,
    refs: u32,
    maps: u32,
    /// The driver granted compressible memory (asked for by the
    /// application); swap and migration re-create it so.
    compressed: bool,
    allocation: A,
}

fn unknown_handle(handle: u32) -> CallError {
    CallError::invalid_handle(format!("unknown allocation handle {handle}"))
}

impl<S: BackendSession> SessionState<S> {
    /// `true` when `[start, end)` overlaps one of the application's VMM
    /// mappings.
    pub(super) fn vmm_overlaps(&self, start: u64, end: u64) -> bool {
        let before = self.vmm_maps.range(..start).next_back().is_some_and(|(&s, m)| s + m.size > start);
        before || self.vmm_maps.range(start..).next().is_some_and(|(&s, _)| s < end)
    }

    /// `None` when `addr` is in no VMM mapping; else whether `[addr, end)`
    /// runs through gap-free VMM mappings that each grant `need`.
    pub(super) fn vmm_check(&self, addr: u64, end: u64, need: u32) -> Option<Result<(), CallError>> {
        let (&first, m) = self.vmm_maps.range(..=addr).next_back()?;
        if first + m.size <= addr {
            return None;
        }
        let (mut start, mut m) = (first, m);
        Some(loop {
            if m.access & need != need {
                let wanted = if need == ACCESS_READWRITE { "write" } else { "read" };
                break Err(CallError::invalid_value(format!(
                    "the mapping at {start:#x} does not allow the device to {wanted} (set its access with cuMemSetAccess)"
                )));
            }
            let next = start + m.size;
            if end <= next {
                break Ok(());
            }
            match self.vmm_maps.get(&next) {
                Some(following) => (start, m) = (next, following),
                None => {
                    break Err(CallError::invalid_value(format!(
                        "{} bytes at {addr:#x} run past the mapped memory at {next:#x}",
                        end - addr
                    )));
                }
            }
        })
    }

    fn check_granular(&self, what: &str, values: &[(&str, u64)]) -> Result<(), CallError> {
        let g = self.limits.granularity;
        match values.iter().find(|(_, v)| !v.is_multiple_of(g)) {
            Some((name, v)) => Err(CallError::invalid_value(format!(
                "{what}: {name} {v:#x} is not a multiple of the granularity {g:#x}"
            ))),
            None => Ok(()),
        }
    }

    pub(super) fn vmm_create(&mut self, c: v1::VmmCreate) -> CallOutcome {
        new_id(&self.vmm_handles, c.handle, "allocation handle", self.limits.max_handles)?;
        if c.size == 0 {
            return Err(CallError::invalid_value("cuMemCreate of 0 bytes"));
        }
        self.check_granular("cuMemCreate", &[("size", c.size)])?;
        self.charge(c.size, "an allocation")?;
        let (allocation, compressed) = if c.compressible {
            self.on_device(c.size, |dev| dev.create_compressible(c.size))?
        } else {
            (self.on_device(c.size, |dev| dev.create(c.size))?, false)
        };
        self.vmm_handles.insert(c.handle, VmmHandle { size: c.size, refs: 1, maps: 0, compressed, allocation });
        self.mapped_bytes += c.size;
        // Only an application that asked needs the answer (and waits).
        Ok(c.compressible.then_some(Value::Compressed(compressed)))
    }

    /// Forgets `handle` once nothing references or maps it; its memory
    /// then leaves the quota.
    fn vmm_drop_if_unused(&mut self, handle: u32) {
        if let Some(h) = self.vmm_handles.get(&handle)
            && h.refs == 0
            && h.maps == 0
        {
            let size = h.size;
            self.vmm_handles.remove(&handle);
            self.uncharge(size);
        }
    }

    pub(super) fn vmm_release(&mut self, handle: u32) -> CallOutcome {
        let h = self.vmm_handles.get_mut(&handle).filter(|h| h.refs > 0).ok_or_else(|| unknown_handle(handle))?;
        h.refs -= 1;
        self.vmm_drop_if_unused(handle);
        Ok(None)
    }

    pub(super) fn vmm_retain(&mut self, handle: u32) -> CallOutcome {
        let h = self.vmm_handles.get_mut(&handle).ok_or_else(|| unknown_handle(handle))?;
        h.refs = h.refs.checked_add(1).ok_or_else(|| CallError::invalid_value("too many references"))?;
        Ok(None)
    }

    pub(super) fn vmm_map(&mut self, m: v1::VmmMap) -> CallOutcome {
        let h = self.vmm_handles.get(&m.handle).filter(|h| h.refs > 0).ok_or_else(|| unknown_handle(m.handle))?;
        if m.size == 0 {
            return Err(CallError::invalid_value("cuMemMap of 0 bytes"));
        }
        self.check_granular("cuMemMap", &[("address", m.addr), ("size", m.size), ("offset", m.offset)])?;
        if m.offset.checked_add(m.size).is_none_or(|end| end > h.size) {
            return Err(CallError::invalid_value(format!(
                "cuMemMap: {} bytes from offset {:#x} run past the allocation's {} bytes",
                m.size, m.offset, h.size
            )));
        }
        let base = self.dev.va_base();
        let end = m.addr.checked_add(m.size).ok_or_else(|| CallError::invalid_value("cuMemMap range overflows"))?;
        if m.addr < base || end > base + self.limits.va_size {
            return Err(CallError::invalid_value(format!(
                "cuMemMap: {:#x} (+{}) is outside this session's range {base:#x}..{:#x}",
                m.addr,
                m.size,
                base + self.limits.va_size
            )));
        }
        let cut = self.mappings.range(..end).next_back().is_some_and(|(&s, &(l, _))| s + l > m.addr);
        if cut || self.vmm_overlaps(m.addr, end) {
            return Err(CallError::invalid_value(format!(
                "cuMemMap: {:#x} (+{}) overlaps memory mapped already",
                m.addr, m.size
            )));
        }
        let mapping = self.dev.map_allocation(&h.allocation, m.offset, m.addr, m.size)?;
        let entry = VmmMapping { size: m.size, handle: m.handle, offset: m.offset, access: ACCESS_NONE, mapping };
        self.vmm_maps.insert(m.addr, entry);
        if let Some(h) = self.vmm_handles.get_mut(&m.handle) {
            h.maps += 1;
        }
        Ok(None)
    }

    pub(super) fn vmm_unmap(&mut self, addr: u64, size: u64) -> CallOutcome {
        let end = addr.checked_add(size).ok_or_else(|| CallError::invalid_value("cuMemUnmap range overflows"))?;
        let inside: Vec<u64> = self
            .vmm_maps
            .range(..end)
            .filter(|(s, m)| **s + m.size > addr)
            .map(|(&s, m)| {
                if s < addr || s + m.size > end {
                    Err(CallError::invalid_value(format!(
                        "cuMemUnmap of {addr:#x} (+{size}) would cut the mapping at {s:#x} (+{})",
                        m.size
                    )))
                } else {
                    Ok(s)
                }
            })
            .collect::<Result<_, _>>()?;
        if inside.is_empty() {
            return Err(CallError::invalid_value(format!("cuMemUnmap: nothing is mapped at {addr:#x} (+{size})")));
        }
        // Pending work may still use the memory.
        self.dev.synchronize()?;
        for start in inside {
            if let Some(m) = self.vmm_maps.remove(&start) {
                drop(m.mapping);
                if let Some(h) = self.vmm_handles.get_mut(&m.handle) {
                    h.maps -= 1;
                }
                self.vmm_drop_if_unused(m.handle);
            }
        }
        Ok(None)
    }

    pub(super) fn vmm_set_access(&mut self, a: v1::VmmSetAccess) -> CallOutcome {
        if !matches!(a.flags, ACCESS_NONE | ACCESS_READ | ACCESS_READWRITE) {
            return Err(CallError::invalid_value(format!("cuMemSetAccess: unknown access flags {}", a.flags)));
        }
        let end =
            a.addr.checked_add(a.size).ok_or_else(|| CallError::invalid_value("cuMemSetAccess range overflows"))?;
        if a.size == 0 {
            return Err(CallError::invalid_value("cuMemSetAccess of 0 bytes"));
        }
        // Whole mappings without gaps, from the first byte to the last.
        let mut starts = Vec::new();
        let mut at = a.addr;
        while at < end {
            match self.vmm_maps.get(&at) {
                Some(m) if at + m.size <= end => {
                    starts.push(at);
                    at += m.size;
                }
                _ => {
                    return Err(CallError::invalid_value(format!(
                        "cuMemSetAccess: {:#x} (+{}) is not made of whole mappings without gaps (at {at:#x})",
                        a.addr, a.size
                    )));
                }
            }
        }
        for start in starts {
            if let Some(m) = self.vmm_maps.get_mut(&start) {
                self.dev.set_access(&m.mapping, a.flags)?;
                m.access = a.flags;
            }
        }
        Ok(None)
    }
}

/// Most references to one VMM allocation a migration re-creates (one
/// `VmmRetain` call each).
const MAX_EXPORTED_REFS: u32 = 1_024;

/// The application's VMM allocations, exported for a migration
/// ([`SessionState::vmm_export`]).
#[derive(Debug, Default)]
pub(super) struct VmmExport {
    pub(super) before: Vec<v1::call::Op>,
    pub(super) after: Vec<v1::call::Op>,
    /// (address, size) of the mapping of all of each allocation.
    pub(super) contents: Vec<(u64, u64)>,
}

/// An application VMM allocation swapped out (`session/swap.rs`): its
/// contents, references and mappings.
#[derive(Debug)]
pub(super) struct SwappedVmm {
    handle: u32,
    refs: u32,
    compressed: bool,
    contents: super::swap::Contents,
    /// (address, size, offset, access) of each mapping of it.
    maps: Vec<(u64, u64, u64, u32)>,
}

/// VMM tables re-created by [`restore`]: allocations by handle, mappings
/// by address.
pub(super) type RestoredVmm<S> =
    (Vec<(u32, VmmHandle<<S as BackendSession>::Allocation>)>, Vec<(u64, VmmMapping<<S as BackendSession>::Mapping>)>);

impl<S: BackendSession> SessionState<S> {
    /// Bytes of the application's VMM allocations.
    pub(super) fn vmm_bytes(&self) -> u64 {
        self.vmm_handles.values().map(|h| h.size).sum()
    }

    /// For each VMM allocation, the address of a mapping of all of it (its
    /// contents are read there); refused when one is not mapped whole, as
    /// then the session's range does not reach all of its memory.
    fn vmm_whole(&self) -> Result<Vec<(u32, u64)>, CallError> {
        self.vmm_handles
            .iter()
            .map(|(&id, h)| {
                self.vmm_maps
                    .iter()
                    .find(|(_, m)| m.handle == id && m.offset == 0 && m.size == h.size)
                    .map(|(&addr, _)| (id, addr))
                    .ok_or_else(|| {
                        CallError::not_supported(format!(
                            "VMM allocation {id} is not mapped whole anywhere, so it is not swapped out"
                        ))
                    })
            })
            .collect()
    }

    /// The application's VMM allocations as calls that re-create them on a
    /// migration's target (`session/migrate.rs`): `before` the contents
    /// come, each allocation, every mapping of it, and read-write access on
    /// the mapping of all of it that the contents are written through;
    /// `after` them, each mapping's access as the application left it and
    /// each allocation's references. Also the address and size of those
    /// whole mappings, which the contents are read from here. Refused when
    /// an allocation is not mapped whole anywhere, or that mapping is not
    /// readable (the contents could not be read without changing it).
    pub(super) fn vmm_export(&self) -> Result<VmmExport, CallError> {
        use v1::call::Op;
        let mut out = VmmExport::default();
        for (id, addr) in self.vmm_whole()? {
            let (Some(h), Some(whole)) = (self.vmm_handles.get(&id), self.vmm_maps.get(&addr)) else { continue };
            if whole.access & ACCESS_READ == 0 {
                return Err(CallError::not_supported(format!(
                    "VMM allocation {id} is mapped whole only without read access, so it cannot be read out"
                )));
            }
            if h.refs > MAX_EXPORTED_REFS {
                return Err(CallError::not_supported(format!("VMM allocation {id} has {} references", h.refs)));
            }
            out.before.push(Op::VmmCreate(v1::VmmCreate { handle: id, size: h.size, compressible: h.compressed }));
            for (&at, m) in self.vmm_maps.iter().filter(|(_, m)| m.handle == id) {
                out.before.push(Op::VmmMap(v1::VmmMap { addr: at, size: m.size, offset: m.offset, handle: id }));
                if m.access != ACCESS_NONE {
                    out.after.push(Op::VmmSetAccess(v1::VmmSetAccess { addr: at, size: m.size, flags: m.access }));
                }
            }
            let open = v1::VmmSetAccess { addr, size: h.size, flags: ACCESS_READWRITE };
            out.before.push(Op::VmmSetAccess(open));
            // `VmmCreate` makes one reference.
            match h.refs {
                0 => out.after.push(Op::VmmRelease(v1::VmmRelease { handle: id })),
                n => out.after.extend((1..n).map(|_| Op::VmmRetain(v1::VmmRetain { handle: id }))),
            }
            out.contents.push((addr, h.size));
        }
        Ok(out)
    }

    /// Checks that every VMM allocation can be read whole.
    pub(super) fn vmm_swappable(&self) -> Result<(), CallError> {
        self.vmm_whole().map(drop)
    }

    /// Reads every VMM allocation through a mapping of all of it (readable
    /// for the copy, then as the application left it). Changes nothing.
    pub(super) fn vmm_read_all(&mut self, store: &mut super::swap::Store) -> Result<Vec<SwappedVmm>, CallError> {
        let mut out = Vec::with_capacity(self.vmm_handles.len());
        for (id, addr) in self.vmm_whole()? {
            let (Some(h), Some(whole)) = (self.vmm_handles.get(&id), self.vmm_maps.get(&addr)) else { continue };
            let opened = whole.access & ACCESS_READ == 0;
            if opened {
                self.dev.set_access(&whole.mapping, ACCESS_READ)?;
            }
            let dev = &mut self.dev;
            let read = store.save(h.size, |offset, buf| dev.read_bulk(addr + offset, buf));
            if opened {
                self.dev.set_access(&whole.mapping, whole.access)?;
            }
            let contents = read?;
            let maps = self
                .vmm_maps
                .iter()
                .filter(|(_, m)| m.handle == id)
                .map(|(&addr, m)| (addr, m.size, m.offset, m.access))
                .collect();
            out.push(SwappedVmm { handle: id, refs: h.refs, compressed: h.compressed, contents, maps });
        }
        Ok(out)
    }

    /// Drops the VMM mappings and allocations once their contents are
    /// read; their bytes still count against the quota (swapped).
    pub(super) fn vmm_drop_all(&mut self) {
        self.vmm_maps.clear();
        self.vmm_handles.clear();
    }

    /// Puts re-created VMM tables back.
    pub(super) fn vmm_put_back(&mut self, (handles, maps): RestoredVmm<S>) {
        self.vmm_handles.extend(handles);
        self.vmm_maps.extend(maps);
    }
}

/// Re-creates swapped VMM allocations and their mappings at the same
/// addresses, offsets and access, with the same contents.
pub(super) fn restore<S: BackendSession>(
    dev: &mut S,
    swapped: &[SwappedVmm],
    store: &super::swap::Store,
) -> Result<RestoredVmm<S>, CallError> {
    let (mut handles, mut maps) = (Vec::with_capacity(swapped.len()), Vec::new());
    for v in swapped {
        let size = v.contents.len();
        // Compression may not be granted again: the contents are the same
        // either way.
        let (allocation, compressed) =
            if v.compressed { dev.create_compressible(size)? } else { (dev.create(size)?, false) };
        for &(addr, map_size, offset, access) in &v.maps {
            let mapping = dev.map_allocation(&allocation, offset, addr, map_size)?;
            if offset == 0 && map_size == size {
                dev.set_access(&mapping, ACCESS_READWRITE)?;
                store.load(&v.contents, |at, piece| dev.write_bulk(addr + at, piece))?;
            }
            // Right after mapping, a range is inaccessible (ACCESS_NONE).
            if access != ACCESS_NONE || (offset == 0 && map_size == size) {
                dev.set_access(&mapping, access)?;
            }
            maps.push((addr, VmmMapping { size: map_size, handle: v.handle, offset, access, mapping }));
        }
        let refs = v.refs;
        handles.push((v.handle, VmmHandle { size, refs, maps: v.maps.len() as u32, compressed, allocation }));
    }
    Ok((handles, maps))
}

impl SwappedVmm {
    pub(super) fn bytes(&self) -> u64 {
        self.contents.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::device::emulated::{EmulatedDevice, EmulatedSession, GRANULARITY as G};
    use crate::device::{ACCESS_READ, ACCESS_READWRITE, Backend};
    use crate::images::ImageCache;
    use crate::session::{CallOutcome, SessionLimits, SessionState};
    use crate::staging::Staging;
    use bytes::Bytes;
    use gpupool_proto::payload::{self, Compression};
    use gpupool_proto::v1::{self, call::Op, call_result::Value, memcpy_hto_d::Source};
    use gpupool_proto::{BUILTIN_MODULE, cuda};
    use std::sync::Arc;

    fn session() -> SessionState<EmulatedSession> {
        let limits = SessionLimits {
            memory_quota: 8 * G,
            va_size: 16 * G,
            granularity: G,
            max_inline_bytes: 8 << 20,
            max_image_bytes: 1 << 20,
            max_handles: 8,
            max_listed_errors: 2,
            compression: Compression::Off,
            max_output_bytes: 1 << 20,
        };
        let dev = EmulatedDevice::new(1 << 30).open_session(limits.va_size).expect("session");
        SessionState::new(dev, limits, Arc::new(Staging::new(1 << 26, 8)), Arc::new(ImageCache::new(None, 1 << 20)))
    }

    fn code(r: CallOutcome) -> u32 {
        r.map(|_| 0).unwrap_or_else(|e| e.code)
    }

    fn create(s: &mut SessionState<EmulatedSession>, handle: u32, size: u64) -> u32 {
        code(s.execute(Op::VmmCreate(v1::VmmCreate { handle, size, compressible: false })))
    }

    fn map(s: &mut SessionState<EmulatedSession>, addr: u64, size: u64, offset: u64, handle: u32) -> u32 {
        code(s.execute(Op::VmmMap(v1::VmmMap { addr, size, offset, handle })))
    }

    fn access(s: &mut SessionState<EmulatedSession>, addr: u64, size: u64, flags: u32) -> u32 {
        code(s.execute(Op::VmmSetAccess(v1::VmmSetAccess { addr, size, flags })))
    }

    fn unmap(s: &mut SessionState<EmulatedSession>, addr: u64, size: u64) -> u32 {
        code(s.execute(Op::VmmUnmap(v1::VmmUnmap { addr, size })))
    }

    fn release(s: &mut SessionState<EmulatedSession>, handle: u32) -> u32 {
        code(s.execute(Op::VmmRelease(v1::VmmRelease { handle })))
    }

    fn htod(s: &mut SessionState<EmulatedSession>, dst: u64, data: Vec<u8>) -> u32 {
        let inline = payload::encode(Bytes::from(data), Compression::Off);
        code(s.execute(Op::MemcpyHtod(v1::MemcpyHtoD {
            dst,
            source: Some(Source::Inline(inline)),
            ..Default::default()
        })))
    }

    fn dtoh(s: &mut SessionState<EmulatedSession>, src: u64, size: u64) -> Result<Vec<u8>, u32> {
        match s.execute(Op::MemcpyDtoh(v1::MemcpyDtoH { src, size, stream: 0, into_region: None })) {
            Ok(Some(Value::Data(p))) => Ok(payload::decode(p, size).expect("payload").to_vec()),
            Ok(other) => panic!("unexpected copy result {other:?}"),
            Err(e) => Err(e.code),
        }
    }

    #[test]
    fn compressible_memory_is_asked_for_and_works_as_any_other() {
        let mut s = session();
        let b = s.va_base();
        let ask = |handle, compressible| Op::VmmCreate(v1::VmmCreate { handle, size: G, compressible });
        // Only a request for compression gets (and waits for) an answer:
        // the emulated device grants none, as a driver without it would.
        assert_eq!(s.execute(ask(1, true)), Ok(Some(Value::Compressed(false))));
        assert_eq!(s.execute(ask(2, false)), Ok(None));
        assert_eq!(code(s.execute(ask(1, true))), cuda::INVALID_VALUE, "handle taken");
        assert_eq!(release(&mut s, 2), 0);
        assert_eq!(map(&mut s, b, G, 0, 1), 0);
        assert_eq!(access(&mut s, b, G, ACCESS_READWRITE), 0);
        assert_eq!(htod(&mut s, b + 64, vec![9; 32]), 0);
        assert_eq!(dtoh(&mut s, b + 64, 32), Ok(vec![9; 32]));
        let export = s.vmm_export().expect("export");
        assert!(
            export.before.iter().any(|op| matches!(op, Op::VmmCreate(c) if c.handle == 1 && !c.compressible)),
            "a migration asks for what was granted: {:?}",
            export.before
        );
    }

    #[test]
    fn two_mappings_of_one_allocation_alias() {
        let mut s = session();
        let b = s.va_base();
        assert_eq!(create(&mut s, 1, 2 * G), 0);
        assert_eq!(s.mapped_bytes(), 2 * G, "physical memory counts at creation");
        assert_eq!(map(&mut s, b, 2 * G, 0, 1), 0);
        assert_eq!(map(&mut s, b + 4 * G, G, G, 1), 0, "the second half, elsewhere");
        assert_eq!(htod(&mut s, b, vec![1; 8]), cuda::INVALID_VALUE, "no access yet");
        assert_eq!(access(&mut s, b, 2 * G, ACCESS_READWRITE), 0);
        assert_eq!(access(&mut s, b + 4 * G, G, ACCESS_READ), 0);
        assert_eq!(htod(&mut s, b + G + 16, vec![7; 8]), 0);
        assert_eq!(dtoh(&mut s, b + 4 * G + 16, 8), Ok(vec![7; 8]), "seen through the alias");
        assert_eq!(htod(&mut s, b + 4 * G, vec![1; 8]), cuda::INVALID_VALUE, "read-only alias");
        let memset = Op::Memset(v1::Memset { dst: b + G, value: 0x55, element_size: 1, count: 16, stream: 0 });
        assert_eq!(code(s.execute(memset)), 0);
        assert_eq!(dtoh(&mut s, b + 4 * G, 4), Ok(vec![0x55; 4]));

        // Release while mapped: the memory stays until the last unmap.
        assert_eq!(release(&mut s, 1), 0);
        assert_eq!(release(&mut s, 1), cuda::INVALID_HANDLE, "no reference left");
        assert_eq!(map(&mut s, b + 8 * G, G, 0, 1), cuda::INVALID_HANDLE, "released handles cannot be mapped");
        assert_eq!(dtoh(&mut s, b + 4 * G, 4), Ok(vec![0x55; 4]));
        assert_eq!(s.mapped_bytes(), 2 * G);
        // A retain through a mapped address brings a reference back.
        assert_eq!(code(s.execute(Op::VmmRetain(v1::VmmRetain { handle: 1 }))), 0);
        assert_eq!(unmap(&mut s, b, 2 * G), 0);
        assert_eq!(unmap(&mut s, b + 4 * G, G), 0);
        assert_eq!(s.mapped_bytes(), 2 * G, "still referenced");
        assert_eq!(dtoh(&mut s, b, 4), Err(cuda::INVALID_VALUE), "unmapped");
        assert_eq!(release(&mut s, 1), 0);
        assert_eq!(s.mapped_bytes(), 0);
        assert_eq!(code(s.execute(Op::VmmRetain(v1::VmmRetain { handle: 1 }))), cuda::INVALID_HANDLE);
    }

    #[test]
    fn a_buffer_of_two_allocations_is_one_range() {
        let mut s = session();
        let b = s.va_base();
        assert_eq!(create(&mut s, 1, G), 0);
        assert_eq!(create(&mut s, 2, G), 0);
        assert_eq!(map(&mut s, b, G, 0, 1), 0);
        assert_eq!(map(&mut s, b + G, G, 0, 2), 0);
        assert_eq!(access(&mut s, b, 2 * G, ACCESS_READWRITE), 0, "one call over both");
        let data: Vec<u8> = (0..64).collect();
        assert_eq!(htod(&mut s, b + G - 32, data.clone()), 0, "a copy across the seam");
        assert_eq!(dtoh(&mut s, b + G - 32, 64), Ok(data));

        // A built-in kernel across the seam: vector_add of 2 f32 on each side.
        let image = payload::encode(Bytes::from_static(BUILTIN_MODULE), Compression::Off);
        let key = crate::images::key_of(BUILTIN_MODULE);
        let load = v1::ModuleLoad { module: 1, sha256: Bytes::copy_from_slice(&key), image: Some(image), staged: None };
        assert_eq!(code(s.execute(Op::ModuleLoad(load))), 0);
        let ones: Vec<u8> = [1f32; 4].iter().flat_map(|f| f.to_le_bytes()).collect();
        assert_eq!(htod(&mut s, b + G - 8, ones), 0);
        let mut params = Vec::new();
        for p in [b + G - 8, b + G - 8, b + G - 8] {
            params.extend_from_slice(&p.to_le_bytes());
        }
        params.extend_from_slice(&4u32.to_le_bytes());
        let launch = v1::Launch {
            module: 1,
            function: 1,
            grid: Some(v1::Dim3 { x: 1, y: 1, z: 1 }),
            block: Some(v1::Dim3 { x: 32, y: 1, z: 1 }),
            params: Bytes::from(params),
            ..Default::default()
        };
        let expected = s.function_info(1, 1).expect("vector_add").params_size() as usize;
        assert_eq!(launch.params.len(), expected);
        assert_eq!(code(s.execute(Op::Launch(launch))), 0);
        let twos: Vec<u8> = [2f32; 4].iter().flat_map(|f| f.to_le_bytes()).collect();
        assert_eq!(dtoh(&mut s, b + G - 8, 16), Ok(twos));

        // Unmapping both at once, then growing in place by mapping a third.
        assert_eq!(unmap(&mut s, b + G / 2, G), cuda::INVALID_VALUE, "would cut both");
        assert_eq!(unmap(&mut s, b, 2 * G), 0);
        assert_eq!(unmap(&mut s, b, 2 * G), cuda::INVALID_VALUE, "nothing left");
    }

    #[test]
    fn bad_input_is_refused() {
        let mut s = session();
        let b = s.va_base();
        let end = b + 16 * G;
        assert_eq!(create(&mut s, 1, G + 1), cuda::INVALID_VALUE, "not granular");
        assert_eq!(create(&mut s, 1, 0), cuda::INVALID_VALUE);
        assert_eq!(create(&mut s, 0, G), cuda::INVALID_VALUE, "id 0 reserved");
        assert_eq!(create(&mut s, 1, 9 * G), cuda::OUT_OF_MEMORY, "quota");
        assert_eq!(create(&mut s, 1, 2 * G), 0);
        assert_eq!(create(&mut s, 1, G), cuda::INVALID_VALUE, "handle in use");
        assert_eq!(map(&mut s, b, G, 0, 7), cuda::INVALID_HANDLE, "unknown handle");
        assert_eq!(map(&mut s, b + 1, G, 0, 1), cuda::INVALID_VALUE, "address not granular");
        assert_eq!(map(&mut s, b, G, 1, 1), cuda::INVALID_VALUE, "offset not granular");
        assert_eq!(map(&mut s, b, G, 2 * G, 1), cuda::INVALID_VALUE, "past the allocation");
        assert_eq!(map(&mut s, b - G, G, 0, 1), cuda::INVALID_VALUE, "below the range");
        assert_eq!(map(&mut s, end, G, 0, 1), cuda::INVALID_VALUE, "above the range");
        assert_eq!(map(&mut s, u64::MAX - G + 1, G, 0, 1), cuda::INVALID_VALUE, "overflow");
        assert_eq!(map(&mut s, b, 0, 0, 1), cuda::INVALID_VALUE);
        assert_eq!(map(&mut s, b, 2 * G, 0, 1), 0);
        assert_eq!(map(&mut s, b + G, G, 0, 1), cuda::INVALID_VALUE, "double map");
        assert_eq!(code(s.mem_map(b + G, G)), cuda::INVALID_VALUE, "cuMemAlloc over a VMM mapping");
        assert_eq!(code(s.mem_map(b + 2 * G, G)), 0);
        assert_eq!(map(&mut s, b + 2 * G, G, 0, 1), cuda::INVALID_VALUE, "VMM over a cuMemAlloc mapping");
        assert_eq!(access(&mut s, b, G, ACCESS_READWRITE), cuda::INVALID_VALUE, "half a mapping");
        assert_eq!(access(&mut s, b, 3 * G, ACCESS_READWRITE), cuda::INVALID_VALUE, "runs into other memory");
        assert_eq!(access(&mut s, b, 2 * G, 2), cuda::INVALID_VALUE, "unknown flags");
        assert_eq!(unmap(&mut s, b + 2 * G, G), cuda::INVALID_VALUE, "not a VMM mapping");
        assert_eq!(release(&mut s, 9), cuda::INVALID_HANDLE);
        // The session still works.
        assert_eq!(access(&mut s, b, 2 * G, ACCESS_READWRITE), 0);
        assert_eq!(htod(&mut s, b + 2 * G - 4, vec![1; 8]), cuda::INVALID_VALUE, "runs into a cuMemAlloc mapping");
        assert_eq!(htod(&mut s, b + 2 * G - 4, vec![1; 4]), 0);
        assert_eq!(s.mapped_bytes(), 3 * G);
    }

    #[test]
    fn session_end_releases_everything() {
        let mut s = session();
        let b = s.va_base();
        assert_eq!(create(&mut s, 1, G), 0);
        assert_eq!(map(&mut s, b, G, 0, 1), 0);
        assert_eq!(map(&mut s, b + G, G, 0, 1), 0);
        assert_eq!(access(&mut s, b, 2 * G, ACCESS_READWRITE), 0);
        drop(s);
    }
}
