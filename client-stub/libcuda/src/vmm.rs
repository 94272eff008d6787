//! Virtual memory management for applications: `cuMemAddressReserve`,
//! `cuMemCreate`, `cuMemMap`, `cuMemSetAccess` and their companions.
//!
//! Reservations come out of the session's reserved range and handles are
//! chosen by the client core, so none of these calls waits for the server
//! (`gpupool_client::alloc`): `cuMemCreate` checks the quota here and fails
//! at once when it is exhausted; a failure of the device itself (the server
//! out of memory below the quota) is latched and returned by the next
//! synchronizing call, as for `cuMemAlloc`.
//!
//! One device, pinned device memory only: host locations, managed
//! allocations, GPUDirect RDMA and shareable handles (IPC) answer
//! `CUDA_ERROR_NOT_SUPPORTED` with a debug line saying why. A POSIX file
//! descriptor may be requested (`requestedHandleTypes`): programs that
//! might share an allocation later ask for it up front (XLA's allocator
//! does, and logs a warning when the granularity query refuses it), so the
//! allocation is made and the request reported back; exporting it
//! (`cuMemExportToShareableHandle`) is what answers NOT_SUPPORTED, and the
//! `HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED` attribute stays 0. Compressible
//! memory is asked of the server's driver (the one `cuMemCreate` that waits
//! for the server): as natively, it may come without compression, which
//! `cuMemGetAllocationPropertiesFromHandle` then reports.

use crate::abi::{CuError, CuResult, get, put};
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUdeviceptr, CUmemAccessDesc, CUmemAllocationProp, CUmemLocation};
use gpupool_client::AllocationId;
use std::ffi::{c_uint, c_ulonglong, c_void};

/// Allocation handles are tagged integers, like every other handle: the
/// tag in bits 40..48 (apart from `runtime::Tag`'s kinds), the id below.
const HANDLE_TAG: u64 = 0x20 << 40;
const HANDLE_MASK: u64 = 0xff << 40;

fn handle_of(id: AllocationId) -> c_ulonglong {
    HANDLE_TAG | u64::from(id.0)
}

fn id_of(handle: c_ulonglong) -> CuResult<AllocationId> {
    if handle & HANDLE_MASK != HANDLE_TAG || handle & !HANDLE_MASK > u64::from(u32::MAX) {
        tracing::debug!(handle, "not an allocation handle of this process");
        return Err(CuError::INVALID_VALUE);
    }
    Ok(AllocationId((handle & !HANDLE_MASK) as u32))
}

/// `CUmemAllocationProp` with its enums as plain integers, so a value this
/// library does not know cannot become an invalid enum.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct AllocationProp {
    kind: u32,
    handle_types: u32,
    location_type: u32,
    location_id: i32,
    win32_metadata: usize,
    compression: u8,
    rdma_capable: u8,
    usage: u16,
    reserved: [u8; 4],
}

const _: () = assert!(std::mem::size_of::<AllocationProp>() == std::mem::size_of::<CUmemAllocationProp>());

/// `CUmemLocation` with plain integers.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Location {
    kind: u32,
    id: i32,
}

const _: () = assert!(std::mem::size_of::<Location>() == std::mem::size_of::<CUmemLocation>());

/// `CUmemAccessDesc` with plain integers.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AccessDesc {
    location: Location,
    flags: u32,
}

const _: () = assert!(std::mem::size_of::<AccessDesc>() == std::mem::size_of::<CUmemAccessDesc>());

/// `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`: may be requested (see the
/// module doc); the Windows and fabric handle types may not.
const HANDLE_POSIX_FD: u32 = 1;
const TYPE_PINNED: u32 = 1;
const TYPE_MANAGED: u32 = 2;
const LOCATION_DEVICE: u32 = 1;
/// `CU_MEM_ALLOCATION_COMP_GENERIC`.
const COMP_GENERIC: u8 = 1;

fn not_supported(why: &str) -> CuError {
    tracing::debug!("{why}: CUDA_ERROR_NOT_SUPPORTED");
    CuError::NOT_SUPPORTED
}

/// The session's one device as a memory location.
fn check_location(l: Location) -> CuResult {
    match l.kind {
        LOCATION_DEVICE if l.id == 0 => Ok(()),
        LOCATION_DEVICE => Err(CuError::INVALID_DEVICE),
        2..=4 => Err(not_supported("host memory cannot be mapped into a GPU in another machine")),
        _ => Err(CuError::INVALID_VALUE),
    }
}

/// What gpupool allocates: pinned memory of device 0, nothing else.
fn check_prop(p: AllocationProp) -> CuResult {
    match p.kind {
        TYPE_PINNED => {}
        TYPE_MANAGED => return Err(not_supported("managed VMM allocations are not offered by a remote GPU")),
        _ => return Err(CuError::INVALID_VALUE),
    }
    check_location(Location { kind: p.location_type, id: p.location_id })?;
    if p.handle_types & !HANDLE_POSIX_FD != 0 {
        return Err(not_supported(
            "Windows and fabric allocation handles are not offered; request CU_MEM_HANDLE_TYPE_NONE or POSIX_FILE_DESCRIPTOR",
        ));
    }
    if p.compression > COMP_GENERIC {
        return Err(CuError::INVALID_VALUE);
    }
    if p.rdma_capable != 0 {
        return Err(not_supported("GPUDirect RDMA-capable VMM memory is not offered"));
    }
    if p.usage != 0 {
        return Err(not_supported("tile-pool (sparse array) VMM memory is not offered"));
    }
    Ok(())
}

fn read_prop(prop: *const CUmemAllocationProp) -> CuResult<AllocationProp> {
    // SAFETY: `prop` points to a CUmemAllocationProp (CUDA contract);
    // `AllocationProp` has its layout with integers in place of enums.
    unsafe { get(prop.cast::<AllocationProp>()) }
}

crate::exports! {
    /// Minimum and recommended are both the session's granularity.
    fn cuMemGetAllocationGranularity(granularity: *mut usize, prop: *const CUmemAllocationProp, option: c_uint) {
        let rt = Runtime::get()?;
        if option > 1 {
            return Err(CuError::INVALID_VALUE);
        }
        check_prop(read_prop(prop)?)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(granularity, rt.session.granularity() as usize) }
    }

    fn cuMemAddressReserve(ptr: *mut CUdeviceptr, size: usize, alignment: usize, addr: CUdeviceptr, flags: c_ulonglong) {
        let rt = Runtime::get()?;
        if flags != 0 || ptr.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let at = rt.session.address_reserve(size as u64, alignment as u64, addr)?;
        // SAFETY: out-pointer per the CUDA API (checked above).
        unsafe { put(ptr, at) }
    }

    fn cuMemAddressFree(ptr: CUdeviceptr, size: usize) {
        let rt = Runtime::get()?;
        rt.session.address_free(ptr, size as u64).map_err(CuError::from)
    }

    fn cuMemCreate(handle: *mut c_ulonglong, size: usize, prop: *const CUmemAllocationProp, flags: c_ulonglong) {
        let rt = Runtime::get()?;
        if flags != 0 || handle.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let p = read_prop(prop)?;
        check_prop(p)?;
        let id = if p.compression == COMP_GENERIC {
            rt.session.mem_create_compressible(size as u64)?
        } else {
            rt.session.mem_create(size as u64)?
        };
        if p.handle_types != 0 {
            rt.session.set_allocation_handle_types(id, p.handle_types);
        }
        // SAFETY: out-pointer per the CUDA API (checked above).
        unsafe { put(handle, handle_of(id)) }
    }

    fn cuMemRelease(handle: c_ulonglong) {
        let rt = Runtime::get()?;
        rt.session.mem_release(id_of(handle)?).map_err(CuError::from)
    }

    fn cuMemMap(ptr: CUdeviceptr, size: usize, offset: usize, handle: c_ulonglong, flags: c_ulonglong) {
        let rt = Runtime::get()?;
        if flags != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        rt.session.mem_map(ptr, size as u64, offset as u64, id_of(handle)?).map_err(CuError::from)
    }

    fn cuMemUnmap(ptr: CUdeviceptr, size: usize) {
        let rt = Runtime::get()?;
        rt.session.mem_unmap(ptr, size as u64).map_err(CuError::from)
    }

    /// The one device's entry decides (the last one, if it is repeated).
    fn cuMemSetAccess(ptr: CUdeviceptr, size: usize, desc: *const CUmemAccessDesc, count: usize) {
        let rt = Runtime::get()?;
        if desc.is_null() || count == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let mut flags = None;
        for i in 0..count {
            // SAFETY: `desc` holds `count` CUmemAccessDesc (CUDA contract);
            // `AccessDesc` has their layout with plain integers.
            let d = unsafe { get(desc.cast::<AccessDesc>().add(i)) }?;
            check_location(d.location)?;
            flags = Some(d.flags);
        }
        let flags = flags.ok_or(CuError::INVALID_VALUE)?;
        rt.session.mem_set_access(ptr, size as u64, flags).map_err(CuError::from)
    }

    fn cuMemGetAccess(flags: *mut c_ulonglong, location: *const CUmemLocation, ptr: CUdeviceptr) {
        let rt = Runtime::get()?;
        // SAFETY: `location` points to a CUmemLocation (CUDA contract).
        check_location(unsafe { get(location.cast::<Location>()) }?)?;
        let access = rt.session.mem_access(ptr).ok_or(CuError::INVALID_VALUE)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(flags, u64::from(access)) }
    }

    fn cuMemGetAllocationPropertiesFromHandle(prop: *mut CUmemAllocationProp, handle: c_ulonglong) {
        let rt = Runtime::get()?;
        let id = id_of(handle)?;
        let compressed = rt.session.allocation_compressed(id).ok_or(CuError::INVALID_VALUE)?;
        let p = AllocationProp {
            kind: TYPE_PINNED,
            handle_types: rt.session.allocation_handle_types(id).unwrap_or(0),
            location_type: LOCATION_DEVICE,
            compression: if compressed { COMP_GENERIC } else { 0 },
            ..AllocationProp::default()
        };
        // SAFETY: out-pointer per the CUDA API; same layout as CUmemAllocationProp.
        unsafe { put(prop.cast::<AllocationProp>(), p) }
    }

    fn cuMemRetainAllocationHandle(handle: *mut c_ulonglong, addr: *mut c_void) {
        let rt = Runtime::get()?;
        if handle.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let id = rt.session.mem_retain(addr as u64)?;
        // SAFETY: out-pointer per the CUDA API (checked above).
        unsafe { put(handle, handle_of(id)) }
    }

    fn cuMemExportToShareableHandle(shareable: *mut c_void, handle: c_ulonglong, kind: c_uint, flags: c_ulonglong) {
        let _ = (shareable, handle, kind, flags);
        Err(not_supported("cuMemExportToShareableHandle: allocations cannot be shared with other processes (no IPC between sessions)"))
    }

    fn cuMemImportFromShareableHandle(handle: *mut c_ulonglong, os_handle: *mut c_void, kind: c_uint) {
        let _ = (handle, os_handle, kind);
        Err(not_supported("cuMemImportFromShareableHandle: allocation handles cannot be shared across a network (no IPC)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_match_cuda_layouts() {
        assert_eq!(
            std::mem::offset_of!(AllocationProp, location_type),
            std::mem::offset_of!(CUmemAllocationProp, location)
        );
        assert_eq!(
            std::mem::offset_of!(AllocationProp, win32_metadata),
            std::mem::offset_of!(CUmemAllocationProp, win32HandleMetaData)
        );
        assert_eq!(
            std::mem::offset_of!(AllocationProp, compression),
            std::mem::offset_of!(CUmemAllocationProp, allocFlags)
        );
        assert_eq!(std::mem::offset_of!(AccessDesc, flags), std::mem::offset_of!(CUmemAccessDesc, flags));
    }

    #[test]
    fn handles_round_trip_and_foreign_values_are_refused() {
        let h = handle_of(AllocationId(7));
        assert_eq!(id_of(h), Ok(AllocationId(7)));
        assert_eq!(id_of(7), Err(CuError::INVALID_VALUE));
        assert_eq!(id_of(crate::runtime::handle(crate::runtime::Tag::Stream, 7) as u64), Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn attributes_say_vmm_without_shareable_handles() {
        let mut device = gpupool_proto::v1::DeviceInfo::default();
        // What a server might report: no VMM (the emulated device lists
        // nothing), shareable handles and compression (a GPU).
        device.attributes.extend([(103, 1), (107, 1), (128, 1)]);
        let a = crate::device::visible_attributes(&device);
        assert_eq!(a.get(&102), Some(&1), "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED");
        assert_eq!(a.get(&107), Some(&1), "GENERIC_COMPRESSION_SUPPORTED: the server's driver decides");
        for zero in [103, 104, 105, 128] {
            assert_eq!(a.get(&zero), Some(&0), "attribute {zero}");
        }
    }

    #[test]
    fn only_pinned_device_memory_without_sharing() {
        let ok = AllocationProp { kind: TYPE_PINNED, location_type: LOCATION_DEVICE, ..Default::default() };
        assert_eq!(check_prop(ok), Ok(()));
        assert_eq!(check_prop(AllocationProp { handle_types: 1, ..ok }), Ok(()), "POSIX_FILE_DESCRIPTOR");
        for other in [2, 4, 8, 1 | 8] {
            assert_eq!(
                check_prop(AllocationProp { handle_types: other, ..ok }),
                Err(CuError::NOT_SUPPORTED),
                "{other}"
            );
        }
        assert_eq!(check_prop(AllocationProp { location_id: 1, ..ok }), Err(CuError::INVALID_DEVICE));
        assert_eq!(check_prop(AllocationProp { location_type: 2, ..ok }), Err(CuError::NOT_SUPPORTED));
        assert_eq!(check_prop(AllocationProp { kind: 0, ..ok }), Err(CuError::INVALID_VALUE));
        assert_eq!(check_prop(AllocationProp { compression: COMP_GENERIC, ..ok }), Ok(()), "compressible");
        assert_eq!(check_prop(AllocationProp { compression: 2, ..ok }), Err(CuError::INVALID_VALUE));
    }
}
