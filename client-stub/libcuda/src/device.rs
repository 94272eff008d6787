//! Initialization, the driver version, error strings and the one device
//! (ordinal 0): the virtual GPU the session was given.

use crate::abi::{CuError, CuResult, c_str, intern, put, put_str};
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUdevice, CUdevprop, CUresult, CUuuid};
use gpupool_ffi::host_facts::HostFacts;
use gpupool_proto::v1;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint};

/// CUDA version this library implements (cuda.h's `CUDA_VERSION`).
pub(crate) const API_VERSION: c_int = 13000;

/// One past the highest `CUdevice_attribute` of CUDA 13.0.
const ATTRIBUTE_MAX: u32 = 148;

/// Attributes a remote GPU cannot offer, whatever the server's card says:
/// a GPU in another machine cannot reach host memory directly (mapped host
/// memory is mirrored instead, see `mapped.rs`), and there is no
/// shareable memory handle here. IPC events are offered between sessions
/// of one tenant on one server (`IPC_EVENT_SUPPORTED` is the card's;
/// docs/ipc.md).
const REMOTE_ZERO: &[u32] = &[
    18,  // INTEGRATED
    86,  // HOST_NATIVE_ATOMIC_SUPPORTED
    88,  // PAGEABLE_MEMORY_ACCESS
    91,  // CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM
    100, // PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES
    101, // DIRECT_MANAGED_MEM_ACCESS_FROM_HOST
    103, // HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
    104, // HANDLE_TYPE_WIN32_HANDLE_SUPPORTED
    105, // HANDLE_TYPE_WIN32_KMT_HANDLE_SUPPORTED
    110, // GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED (cuMemCreate refuses the flag)
    112, // SPARSE_CUDA_ARRAY_SUPPORTED
    113, // READ_ONLY_HOST_REGISTER_SUPPORTED
    114, // TIMELINE_SEMAPHORE_INTEROP_SUPPORTED
    115, // MEMORY_POOLS_SUPPORTED
    116, // GPU_DIRECT_RDMA_SUPPORTED
    117, // GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS
    119, // MEMPOOL_SUPPORTED_HANDLE_TYPES
    121, // DEFERRED_MAPPING_CUDA_ARRAY_SUPPORTED
    124, // DMA_BUF_SUPPORTED
    128, // HANDLE_TYPE_FABRIC_SUPPORTED
    129, // UNIFIED_FUNCTION_POINTERS
    132, // MULTICAST_SUPPORTED
    133, // MPS_ENABLED
    135, // NUMA_CONFIG
];

/// Device attributes as the application sees them: the server's, minus
/// what cannot work remotely (the server already reports the virtual GPU's
/// memory figures).
pub(crate) fn visible_attributes(device: &v1::DeviceInfo) -> HashMap<u32, i32> {
    let mut attrs: HashMap<u32, i32> = device.attributes.clone().into_iter().collect();
    for a in REMOTE_ZERO {
        attrs.insert(*a, 0);
    }
    // Stream-ordered allocator: client-side pools (`mempool.rs`), none
    // exportable (MEMPOOL_SUPPORTED_HANDLE_TYPES stays 0 above).
    attrs.insert(115, 1); // MEMORY_POOLS_SUPPORTED
    // Addresses are unified: device ranges never overlap host memory
    // (the session's range is reserved in this process too).
    attrs.insert(41, 1); // UNIFIED_ADDRESSING
    // Mapped host memory is mirrored by device memory (`mapped.rs`), and
    // managed memory is mapped memory with one address (`managed.rs`):
    // coherent at synchronization; the host may use managed memory while
    // kernels run (other ranges than theirs), as on a local GPU.
    attrs.insert(19, 1); // CAN_MAP_HOST_MEMORY
    attrs.insert(83, 1); // MANAGED_MEMORY
    attrs.insert(89, 1); // CONCURRENT_MANAGED_ACCESS
    // cuMemCreate & co. work on the session's range (`vmm.rs`); the
    // handle-type attributes stay 0: no shareable handles across a network.
    attrs.insert(102, 1); // VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
    attrs.insert(75, device.compute_capability_major as i32);
    attrs.insert(76, device.compute_capability_minor as i32);
    attrs.insert(16, device.multiprocessor_count as i32);
    attrs
}

/// `ordinal 0` is the only device.
pub(crate) fn check_device(dev: CUdevice) -> CuResult {
    if dev == 0 { Ok(()) } else { Err(CuError::INVALID_DEVICE) }
}

/// The device UUID as 16 bytes, from its `GPU-xxxxxxxx-...` text form.
pub(crate) fn uuid_bytes(text: &str) -> [u8; 16] {
    let hex_digits: String = text.trim_start_matches("GPU-").trim_start_matches("MIG-").replace('-', "");
    let mut out = [0u8; 16];
    if let Ok(bytes) = hex::decode(&hex_digits)
        && bytes.len() == 16
    {
        out.copy_from_slice(&bytes);
    }
    out
}

/// Attribute value, like `cuDeviceGetAttribute`: attributes of this CUDA
/// version the server did not report read as 0.
pub(crate) fn attribute(rt: &Runtime, attrib: u32) -> CuResult<i32> {
    if attrib == 0 || attrib >= ATTRIBUTE_MAX {
        return Err(CuError::INVALID_VALUE);
    }
    Ok(rt.attributes.get(&attrib).copied().unwrap_or(0))
}

fn name_of(code: u32) -> Option<String> {
    let r = crate::codes::from_raw(code);
    (r != CUresult::CUDA_ERROR_UNKNOWN || code == 999).then(|| format!("{r:?}"))
}

/// A readable sentence for an error name, e.g. "invalid value".
fn description(name: &str) -> String {
    match name {
        "CUDA_SUCCESS" => "no error".into(),
        n => n.trim_start_matches("CUDA_ERROR_").replace('_', " ").to_lowercase(),
    }
}

crate::exports! {
    fn cuInit(flags: c_uint) {
        if flags != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        Runtime::init().map(drop)
    }

    fn cuDriverGetVersion(version: *mut c_int) {
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(version, API_VERSION) }
    }

    /// An unknown code gets a null string and CUDA_ERROR_INVALID_VALUE.
    fn cuGetErrorName(error: c_uint, p_str: *mut *const c_char) {
        let name = name_of(error);
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(p_str, name.as_deref().map_or(std::ptr::null(), intern)) }?;
        name.map(drop).ok_or(CuError::INVALID_VALUE)
    }

    /// The server driver's own text where the session has it, so output
    /// matches a local GPU's.
    fn cuGetErrorString(error: c_uint, p_str: *mut *const c_char) {
        let served = Runtime::get().ok().and_then(|rt| rt.device.error_strings.get(&error).cloned());
        let text = name_of(error).map(|n| served.unwrap_or_else(|| description(&n)));
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(p_str, text.as_deref().map_or(std::ptr::null(), intern)) }?;
        text.map(drop).ok_or(CuError::INVALID_VALUE)
    }

    fn cuDeviceGetCount(count: *mut c_int) {
        Runtime::get()?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(count, 1) }
    }

    fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) {
        Runtime::get()?;
        check_device(ordinal)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(device, 0) }
    }

    fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        // SAFETY: `name` holds `len` bytes per the CUDA API.
        unsafe { put_str(name, len, &rt.device.name) }
    }

    fn cuDeviceGetUuid(uuid: *mut CUuuid, dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        let bytes = uuid_bytes(&rt.device.uuid).map(|b| b as c_char);
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(uuid, CUuuid { bytes }) }
    }

    fn cuDeviceGetUuid_v2(uuid: *mut CUuuid, dev: CUdevice) {
        // SAFETY: same contract.
        crate::abi::status(unsafe { cuDeviceGetUuid(uuid, dev) })
    }

    fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(bytes, rt.session.mem_get_info().1 as usize) }
    }

    fn cuDeviceGetAttribute(pi: *mut c_int, attrib: c_uint, dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        let v = attribute(rt, attrib)?;
        tracing::trace!(attrib, value = v, "cuDeviceGetAttribute");
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pi, v) }
    }

    fn cuDeviceComputeCapability(major: *mut c_int, minor: *mut c_int, dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        // SAFETY: out-pointers per the CUDA API.
        unsafe {
            put(major, rt.device.compute_capability_major as c_int)?;
            put(minor, rt.device.compute_capability_minor as c_int)
        }
    }

    fn cuDeviceGetProperties(prop: *mut CUdevprop, dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        let a = |n| attribute(rt, n).unwrap_or(0);
        let p = CUdevprop {
            maxThreadsPerBlock: a(1),
            maxThreadsDim: [a(2), a(3), a(4)],
            maxGridSize: [a(5), a(6), a(7)],
            sharedMemPerBlock: a(8),
            totalConstantMemory: a(9),
            SIMDWidth: a(10),
            memPitch: a(11),
            regsPerBlock: a(12),
            clockRate: a(13),
            textureAlign: a(14),
        };
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(prop, p) }
    }

    fn cuDeviceGetPCIBusId(pci_bus_id: *mut c_char, len: c_int, dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        let a = |n| attribute(rt, n).unwrap_or(0);
        let id = format!("{:08X}:{:02X}:{:02X}.0", a(50), a(33), a(34));
        // SAFETY: `pci_bus_id` holds `len` bytes per the CUDA API.
        unsafe { put_str(pci_bus_id, len, &id) }
    }

    fn cuDeviceGetByPCIBusId(dev: *mut CUdevice, pci_bus_id: *const c_char) {
        Runtime::get()?;
        // SAFETY: NUL-terminated per the CUDA API.
        let _ = unsafe { c_str(pci_bus_id) }?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(dev, 0) }
    }

    fn cuDeviceCanAccessPeer(can: *mut c_int, dev: CUdevice, peer: CUdevice) {
        Runtime::get()?;
        check_device(dev)?;
        check_device(peer)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(can, 0) }
    }

    fn cuDeviceGetExecAffinitySupport(pi: *mut c_int, _kind: c_uint, dev: CUdevice) {
        Runtime::get()?;
        check_device(dev)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pi, 0) }
    }

    fn cuDeviceGetLuid(_luid: *mut c_char, _mask: *mut c_uint, dev: CUdevice) {
        Runtime::get()?;
        check_device(dev)?;
        // LUIDs exist on Windows only.
        Err(CuError::NOT_SUPPORTED)
    }
}

/// What the server's host says that the CUDA driver API does not (the
/// kernel driver's version, the GPU's PCIe link), for gpupool's NVML
/// (`gpupool_ffi::host_facts`).
pub(crate) fn host_facts(device: &v1::DeviceInfo) -> HostFacts {
    let mut facts = HostFacts::default();
    facts.set_kernel_driver_version(&device.kernel_driver_version);
    if let Some(p) = &device.pcie {
        facts.pcie_max_generation = p.max_generation;
        facts.pcie_max_width = p.max_width;
        facts.pcie_current_generation = p.current_generation;
        facts.pcie_current_width = p.current_width;
        facts.pcie_max_speed = p.max_speed;
        facts.pcie_current_speed = p.current_speed;
    }
    facts
}

/// `CUresult gpupool_host_facts(CUdevice dev, HostFacts *out, size_t size)`
/// (`gpupool_ffi::host_facts`): starts the session if none is open, like
/// any device query. Not a CUDA entry point.
///
/// # Safety
/// `out` is null or points to `size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpupool_host_facts(dev: CUdevice, out: *mut HostFacts, size: usize) -> CUresult {
    crate::abi::entry("gpupool_host_facts", || {
        if size != std::mem::size_of::<HostFacts>() {
            return Err(CuError::INVALID_VALUE);
        }
        let rt = Runtime::get()?;
        check_device(dev)?;
        // SAFETY: `out` holds a `HostFacts` (the size says the caller's
        // layout is this one) by the caller's contract.
        unsafe { put(out, host_facts(&rt.device)) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_facts_carry_the_servers_figures() {
        let mut d = v1::DeviceInfo { kernel_driver_version: "580.159.04".into(), ..Default::default() };
        assert_eq!(host_facts(&d).kernel_driver_version().as_deref(), Some("580.159.04"));
        assert_eq!(host_facts(&d).pcie_max_generation, 0, "no link reported");
        d.pcie = Some(v1::PcieLink { max_generation: 5, max_width: 16, max_speed: 32000, ..Default::default() });
        let f = host_facts(&d);
        assert_eq!((f.pcie_max_generation, f.pcie_max_width, f.pcie_max_speed), (5, 16, 32000));
        assert_eq!(host_facts(&v1::DeviceInfo::default()), HostFacts::default());
    }

    #[test]
    fn host_facts_of_another_layout_are_refused() {
        let mut f = HostFacts::default();
        // SAFETY: a live local; the size check comes before any session.
        let r = unsafe { gpupool_host_facts(0, &mut f, std::mem::size_of::<HostFacts>() - 4) };
        assert_eq!(r, CUresult::CUDA_ERROR_INVALID_VALUE);
    }

    #[test]
    fn uuid_text_to_bytes() {
        let b = uuid_bytes("GPU-00010203-0405-0607-0809-0a0b0c0d0e0f");
        assert_eq!(b, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(uuid_bytes("garbage"), [0; 16]);
    }

    #[test]
    fn error_names_and_strings() {
        assert_eq!(name_of(1).as_deref(), Some("CUDA_ERROR_INVALID_VALUE"));
        assert_eq!(name_of(999).as_deref(), Some("CUDA_ERROR_UNKNOWN"));
        assert_eq!(name_of(123_456), None);
        assert_eq!(description("CUDA_ERROR_INVALID_VALUE"), "invalid value");
        assert_eq!(description("CUDA_SUCCESS"), "no error");
    }

    #[test]
    fn remote_attributes_hidden() {
        let mut d = v1::DeviceInfo { compute_capability_major: 9, multiprocessor_count: 132, ..Default::default() };
        d.attributes.insert(88, 1);
        d.attributes.insert(1, 1024);
        let a = visible_attributes(&d);
        assert_eq!(a[&88], 0, "no access to pageable host memory");
        assert_eq!(a[&83], 1, "managed memory is mirrored");
        assert_eq!(a[&19], 1, "mapped host memory is mirrored");
        assert_eq!(a[&1], 1024);
        assert_eq!(a[&41], 1);
        assert_eq!(a[&75], 9);
    }
}
