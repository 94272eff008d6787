//! Device queries. Each checks its handle against those handed out
//! (`crate::state`) before anything else, then its out-pointers.
//!
//! What the client cannot know is said so, not made up:
//! - utilization: no server query exists yet, so
//!   `nvmlDeviceGetUtilizationRates` is `NVML_ERROR_NOT_SUPPORTED`;
//! - processes: those using the GPU run on the server's machine, where
//!   this process's pid means nothing; the lists are empty;
//! - MIG: the virtual GPU is shown as a whole GPU, MIG disabled;
//! - minor number: there is no `/dev/nvidiaN` on the client; the index is
//!   given, the number a single-GPU machine's device node would have.

use crate::abi::{c_str, get, log_unsupported, put, put_str};
use crate::error::Error;
use crate::gpu::Gpu;
use crate::state::{self, System};
use gpupool_ffi::host_facts::HostFacts;
use nvml_wrapper_sys::bindings as nv;
use std::ffi::{c_char, c_int, c_uint};

/// `nvmlMemory_v2`: `NVML_STRUCT_VERSION(Memory, 2)`, the struct's size
/// with the version in the top byte.
const MEMORY_V2: c_uint = size_of::<nv::nvmlMemory_v2_t>() as c_uint | (2 << 24);

/// `nvmlGpuFabricInfo_v2` and `_v3` (`nvmlGpuFabricInfoV_t`'s versions).
const FABRIC_INFO_V2: c_uint = size_of::<nv::nvmlGpuFabricInfo_v2_t>() as c_uint | (2 << 24);
const FABRIC_INFO_V3: c_uint = size_of::<nv::nvmlGpuFabricInfo_v3_t>() as c_uint | (3 << 24);

/// What the fabric queries say of the virtual GPU: not part of an NVLink
/// fabric (a session's GPU reaches no other GPU over NVLink; multi-node
/// NVLink cliques are not offered), as NVML says of a GPU outside one.
const NO_FABRIC: nv::nvmlGpuFabricState_t = nv::NVML_GPU_FABRIC_STATE_NOT_SUPPORTED as nv::nvmlGpuFabricState_t;

/// The device a handle names, between init and shutdown.
fn gpu(device: nv::nvmlDevice_t) -> Result<(&'static System, &'static Gpu), Error> {
    let system = state::system()?;
    Ok((system, system.gpu(device)?))
}

/// Puts the handle of `found` in `device`.
///
/// # Safety
/// `device` is null or valid for writing a handle.
unsafe fn put_handle(device: *mut nv::nvmlDevice_t, found: &'static Gpu) -> Result<(), Error> {
    // SAFETY: the caller's contract.
    unsafe { put(device, System::handle_of(found)) }
}

/// The running-process lists: always empty (see the module doc), which
/// fits any array, so `infos` is never written.
///
/// # Safety
/// `info_count` is null or valid for reading and writing a `c_uint`.
unsafe fn no_processes(device: nv::nvmlDevice_t, info_count: *mut c_uint) -> Result<(), Error> {
    gpu(device)?;
    // SAFETY: the caller's contract.
    unsafe { put(info_count, 0) }
}

/// Puts one figure of the device's PCIe link ([`Gpu::pcie`]) in `out`.
///
/// # Safety
/// `out` is null or valid for writing a `c_uint`.
unsafe fn put_pcie(device: nv::nvmlDevice_t, out: *mut c_uint, figure: fn(&HostFacts) -> u32) -> Result<(), Error> {
    let (_, g) = gpu(device)?;
    // SAFETY: the caller's contract.
    unsafe { put(out, g.pcie(figure)?) }
}

exports! {
    fn nvmlDeviceGetCount(deviceCount: *mut c_uint) {
        let system = state::system()?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(deviceCount, system.gpus.len() as c_uint) }
    }

    fn nvmlDeviceGetCount_v2(deviceCount: *mut c_uint) {
        // SAFETY: same contract.
        unsafe { put(deviceCount, state::system()?.gpus.len() as c_uint) }
    }

    fn nvmlDeviceGetHandleByIndex(index: c_uint, device: *mut nv::nvmlDevice_t) {
        let found = state::system()?.by_index(index)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_handle(device, found) }
    }

    fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut nv::nvmlDevice_t) {
        let found = state::system()?.by_index(index)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_handle(device, found) }
    }

    fn nvmlDeviceGetHandleByUUID(uuid: *const c_char, device: *mut nv::nvmlDevice_t) {
        let system = state::system()?;
        // SAFETY: NUL-terminated per NVML's contract.
        let found = system.by_uuid(unsafe { c_str(uuid) }?)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_handle(device, found) }
    }

    fn nvmlDeviceGetHandleByPciBusId(pciBusId: *const c_char, device: *mut nv::nvmlDevice_t) {
        let system = state::system()?;
        // SAFETY: NUL-terminated per NVML's contract.
        let found = system.by_pci_bus_id(unsafe { c_str(pciBusId) }?)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_handle(device, found) }
    }

    fn nvmlDeviceGetHandleByPciBusId_v2(pciBusId: *const c_char, device: *mut nv::nvmlDevice_t) {
        let system = state::system()?;
        // SAFETY: NUL-terminated per NVML's contract.
        let found = system.by_pci_bus_id(unsafe { c_str(pciBusId) }?)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_handle(device, found) }
    }

    fn nvmlDeviceGetName(device: nv::nvmlDevice_t, name: *mut c_char, length: c_uint) {
        let (_, g) = gpu(device)?;
        // SAFETY: `name` holds `length` bytes per NVML's contract.
        unsafe { put_str(name, length, &g.name) }
    }

    fn nvmlDeviceGetUUID(device: nv::nvmlDevice_t, uuid: *mut c_char, length: c_uint) {
        let (_, g) = gpu(device)?;
        // SAFETY: `uuid` holds `length` bytes per NVML's contract.
        unsafe { put_str(uuid, length, &g.uuid) }
    }

    fn nvmlDeviceGetIndex(device: nv::nvmlDevice_t, index: *mut c_uint) {
        let (_, g) = gpu(device)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(index, g.index) }
    }

    fn nvmlDeviceGetMinorNumber(device: nv::nvmlDevice_t, minorNumber: *mut c_uint) {
        let (_, g) = gpu(device)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(minorNumber, g.index) }
    }

    /// The PCI device id is not known to the driver API: `pciDeviceId`
    /// carries NVIDIA's vendor id (0x10DE) in its low half and 0 as the
    /// device id; the subsystem id is 0.
    fn nvmlDeviceGetPciInfo_v3(device: nv::nvmlDevice_t, pci: *mut nv::nvmlPciInfo_t) {
        let (_, g) = gpu(device)?;
        let info = nv::nvmlPciInfo_t {
            busIdLegacy: crate::abi::c_array(&g.pci.bus_id_legacy()),
            domain: g.pci.domain,
            bus: g.pci.bus,
            device: g.pci.device,
            pciDeviceId: 0x10DE,
            pciSubSystemId: 0,
            busId: crate::abi::c_array(&g.pci.bus_id()),
        };
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(pci, info) }
    }

    fn nvmlDeviceGetMemoryInfo(device: nv::nvmlDevice_t, memory: *mut nv::nvmlMemory_t) {
        let (system, g) = gpu(device)?;
        if memory.is_null() {
            return Err(Error::InvalidArgument("null pointer"));
        }
        let m = system.memory(g)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(memory, nv::nvmlMemory_t { total: m.total, free: m.free, used: m.used }) }
    }

    /// Nothing is reserved by a system on the client's side: `reserved` is 0.
    fn nvmlDeviceGetMemoryInfo_v2(device: nv::nvmlDevice_t, memory: *mut nv::nvmlMemory_v2_t) {
        let (system, g) = gpu(device)?;
        // SAFETY: `version` is the struct's first field, set by the caller
        // (NVML's contract); only it is read.
        let version = unsafe { get(memory.cast::<c_uint>().cast_const()) }?;
        if version != MEMORY_V2 {
            return Err(Error::VersionMismatch(version));
        }
        let m = system.memory(g)?;
        let out = nv::nvmlMemory_v2_t { version, total: m.total, reserved: 0, free: m.free, used: m.used };
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(memory, out) }
    }

    fn nvmlDeviceGetCudaComputeCapability(device: nv::nvmlDevice_t, major: *mut c_int, minor: *mut c_int) {
        let (_, g) = gpu(device)?;
        if major.is_null() || minor.is_null() {
            return Err(Error::InvalidArgument("null pointer"));
        }
        // SAFETY: out-pointers per NVML's contract.
        unsafe {
            put(major, g.compute_capability.0)?;
            put(minor, g.compute_capability.1)
        }
    }

    fn nvmlDeviceGetMigMode(device: nv::nvmlDevice_t, currentMode: *mut c_uint, pendingMode: *mut c_uint) {
        gpu(device)?;
        if currentMode.is_null() || pendingMode.is_null() {
            return Err(Error::InvalidArgument("null pointer"));
        }
        // SAFETY: out-pointers per NVML's contract.
        unsafe {
            put(currentMode, nv::NVML_DEVICE_MIG_DISABLE)?;
            put(pendingMode, nv::NVML_DEVICE_MIG_DISABLE)
        }
    }

    fn nvmlDeviceIsMigDeviceHandle(device: nv::nvmlDevice_t, isMigDevice: *mut c_uint) {
        gpu(device)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(isMigDevice, 0) }
    }

    /// Known gap: the server has no utilization query yet.
    fn nvmlDeviceGetUtilizationRates(device: nv::nvmlDevice_t, utilization: *mut nv::nvmlUtilization_t) {
        gpu(device)?;
        if utilization.is_null() {
            return Err(Error::InvalidArgument("null pointer"));
        }
        log_unsupported("nvmlDeviceGetUtilizationRates");
        Err(Error::NotSupported)
    }

    fn nvmlDeviceGetComputeRunningProcesses(
        device: nv::nvmlDevice_t,
        infoCount: *mut c_uint,
        _infos: *mut nv::nvmlProcessInfo_v1_t,
    ) {
        // SAFETY: per NVML's contract.
        unsafe { no_processes(device, infoCount) }
    }

    fn nvmlDeviceGetComputeRunningProcesses_v2(
        device: nv::nvmlDevice_t,
        infoCount: *mut c_uint,
        _infos: *mut nv::nvmlProcessInfo_v2_t,
    ) {
        // SAFETY: per NVML's contract.
        unsafe { no_processes(device, infoCount) }
    }

    fn nvmlDeviceGetComputeRunningProcesses_v3(
        device: nv::nvmlDevice_t,
        infoCount: *mut c_uint,
        _infos: *mut nv::nvmlProcessInfo_t,
    ) {
        // SAFETY: per NVML's contract.
        unsafe { no_processes(device, infoCount) }
    }

    fn nvmlDeviceGetGraphicsRunningProcesses(
        device: nv::nvmlDevice_t,
        infoCount: *mut c_uint,
        _infos: *mut nv::nvmlProcessInfo_v1_t,
    ) {
        // SAFETY: per NVML's contract.
        unsafe { no_processes(device, infoCount) }
    }

    fn nvmlDeviceGetGraphicsRunningProcesses_v2(
        device: nv::nvmlDevice_t,
        infoCount: *mut c_uint,
        _infos: *mut nv::nvmlProcessInfo_v2_t,
    ) {
        // SAFETY: per NVML's contract.
        unsafe { no_processes(device, infoCount) }
    }

    fn nvmlDeviceGetGraphicsRunningProcesses_v3(
        device: nv::nvmlDevice_t,
        infoCount: *mut c_uint,
        _infos: *mut nv::nvmlProcessInfo_t,
    ) {
        // SAFETY: per NVML's contract.
        unsafe { no_processes(device, infoCount) }
    }

    fn nvmlDeviceGetMPSComputeRunningProcesses(
        device: nv::nvmlDevice_t,
        infoCount: *mut c_uint,
        _infos: *mut nv::nvmlProcessInfo_v1_t,
    ) {
        // SAFETY: per NVML's contract.
        unsafe { no_processes(device, infoCount) }
    }

    fn nvmlDeviceGetMPSComputeRunningProcesses_v2(
        device: nv::nvmlDevice_t,
        infoCount: *mut c_uint,
        _infos: *mut nv::nvmlProcessInfo_v2_t,
    ) {
        // SAFETY: per NVML's contract.
        unsafe { no_processes(device, infoCount) }
    }

    fn nvmlDeviceGetMPSComputeRunningProcesses_v3(
        device: nv::nvmlDevice_t,
        infoCount: *mut c_uint,
        _infos: *mut nv::nvmlProcessInfo_t,
    ) {
        // SAFETY: per NVML's contract.
        unsafe { no_processes(device, infoCount) }
    }

    fn nvmlDeviceGetMultiGpuBoard(device: nv::nvmlDevice_t, multiGpuBool: *mut c_uint) {
        gpu(device)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(multiGpuBool, 0) }
    }

    fn nvmlDeviceGetBrand(device: nv::nvmlDevice_t, type_: *mut nv::nvmlBrandType_t) {
        let (_, g) = gpu(device)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(type_, crate::gpu::brand(&g.name)) }
    }

    fn nvmlDeviceGetArchitecture(device: nv::nvmlDevice_t, arch: *mut nv::nvmlDeviceArchitecture_t) {
        let (_, g) = gpu(device)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(arch, g.architecture()) }
    }

    fn nvmlDeviceGetNumGpuCores(device: nv::nvmlDevice_t, numCores: *mut c_uint) {
        let (_, g) = gpu(device)?;
        if numCores.is_null() {
            return Err(Error::InvalidArgument("null pointer"));
        }
        let cores = g.cores().ok_or(Error::NotSupported)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(numCores, cores) }
    }

    /// Disabled: the virtual GPU exists only while a client's session
    /// does; nothing keeps it initialized between clients.
    fn nvmlDeviceGetPersistenceMode(device: nv::nvmlDevice_t, mode: *mut nv::nvmlEnableState_t) {
        gpu(device)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(mode, nv::nvmlEnableState_enum_NVML_FEATURE_DISABLED) }
    }

    /// Default: the process may create any number of contexts on it.
    fn nvmlDeviceGetComputeMode(device: nv::nvmlDevice_t, mode: *mut nv::nvmlComputeMode_t) {
        gpu(device)?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(mode, nv::nvmlComputeMode_enum_NVML_COMPUTEMODE_DEFAULT) }
    }

    /// Each value's own `nvmlReturn` says whether it was read; the call
    /// succeeds when the handle and the array are good, as NVML's does.
    /// No field is offered: each is NOT_SUPPORTED, as NVML on the server's
    /// H100 answers the NVLink link count (and a session's virtual GPU has
    /// no NVLink, NVSwitch or C2C link to another GPU anyway); programs
    /// that ask (XLA does, for the NVLink figures) carry on without them.
    fn nvmlDeviceGetFieldValues(device: nv::nvmlDevice_t, valuesCount: c_int, values: *mut nv::nvmlFieldValue_t) {
        gpu(device)?;
        let count = usize::try_from(valuesCount).map_err(|_| Error::InvalidArgument("negative count"))?;
        if count > 0 && values.is_null() {
            return Err(Error::InvalidArgument("null pointer"));
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        for i in 0..count {
            // SAFETY: `values` holds `valuesCount` entries (NVML's
            // contract); only the fields NVML writes are written.
            let v = unsafe { &mut *values.add(i) };
            v.timestamp = now;
            v.latencyUsec = 0;
            v.nvmlReturn = nv::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
        }
        Ok(())
    }

    fn nvmlDeviceGetGpuFabricInfo(device: nv::nvmlDevice_t, gpuFabricInfo: *mut nv::nvmlGpuFabricInfo_t) {
        gpu(device)?;
        let out = nv::nvmlGpuFabricInfo_t {
            clusterUuid: [0; 16],
            status: nv::nvmlReturn_enum_NVML_SUCCESS,
            cliqueId: 0,
            state: NO_FABRIC,
        };
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(gpuFabricInfo, out) }
    }

    /// Versions 2 and 3 of the struct, as the caller's `version` says.
    fn nvmlDeviceGetGpuFabricInfoV(device: nv::nvmlDevice_t, gpuFabricInfo: *mut nv::nvmlGpuFabricInfoV_t) {
        gpu(device)?;
        // SAFETY: `version` is the struct's first field, set by the caller
        // (NVML's contract); only it is read.
        let version = unsafe { get(gpuFabricInfo.cast::<c_uint>().cast_const()) }?;
        let (clusterUuid, status, cliqueId, state, healthMask) = ([0; 16], nv::nvmlReturn_enum_NVML_SUCCESS, 0, NO_FABRIC, 0);
        match version {
            FABRIC_INFO_V3 => {
                let out = nv::nvmlGpuFabricInfo_v3_t { version, clusterUuid, status, cliqueId, state, healthMask, healthSummary: 0 };
                // SAFETY: out-pointer per NVML's contract, of the version's size.
                unsafe { put(gpuFabricInfo, out) }
            }
            FABRIC_INFO_V2 => {
                let out = nv::nvmlGpuFabricInfo_v2_t { version, clusterUuid, status, cliqueId, state, healthMask };
                // SAFETY: as above: the caller's struct is version 2's.
                unsafe { put(gpuFabricInfo.cast::<nv::nvmlGpuFabricInfo_v2_t>(), out) }
            }
            _ => Err(Error::VersionMismatch(version)),
        }
    }

    // The PCIe link of the server's GPU, as the server's NVML reports it
    // (`gpupool_host_facts`); NOT_SUPPORTED where it did not. For a client
    // in another machine the network, not this link, bounds its copies;
    // the figures are the GPU's, as NVML on its host gives them. The
    // current generation, width and speed are those the server read when
    // it opened the device (NVML reads them at each call: an idle link
    // may train down).

    fn nvmlDeviceGetMaxPcieLinkGeneration(device: nv::nvmlDevice_t, maxLinkGen: *mut c_uint) {
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_pcie(device, maxLinkGen, |h| h.pcie_max_generation) }
    }

    fn nvmlDeviceGetMaxPcieLinkWidth(device: nv::nvmlDevice_t, maxLinkWidth: *mut c_uint) {
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_pcie(device, maxLinkWidth, |h| h.pcie_max_width) }
    }

    fn nvmlDeviceGetCurrPcieLinkGeneration(device: nv::nvmlDevice_t, currLinkGen: *mut c_uint) {
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_pcie(device, currLinkGen, |h| h.pcie_current_generation) }
    }

    fn nvmlDeviceGetCurrPcieLinkWidth(device: nv::nvmlDevice_t, currLinkWidth: *mut c_uint) {
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_pcie(device, currLinkWidth, |h| h.pcie_current_width) }
    }

    fn nvmlDeviceGetPcieLinkMaxSpeed(device: nv::nvmlDevice_t, maxSpeed: *mut c_uint) {
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_pcie(device, maxSpeed, |h| h.pcie_max_speed) }
    }

    fn nvmlDeviceGetPcieSpeed(device: nv::nvmlDevice_t, pcieSpeed: *mut c_uint) {
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put_pcie(device, pcieSpeed, |h| h.pcie_current_speed) }
    }
}

/// Never run: compiles only while every implemented export has exactly the
/// signature nvml.h gives it (the bindings' function-pointer types).
#[cfg(test)]
fn signatures_match(lib: Option<&mut nv::NvmlLib>) {
    use crate::system::*;
    let Some(l) = lib else { return };
    l.nvmlInit = Ok(nvmlInit);
    l.nvmlInit_v2 = Ok(nvmlInit_v2);
    l.nvmlInitWithFlags = Ok(nvmlInitWithFlags);
    l.nvmlShutdown = Ok(nvmlShutdown);
    l.nvmlErrorString = Ok(nvmlErrorString);
    l.nvmlSystemGetDriverVersion = Ok(nvmlSystemGetDriverVersion);
    l.nvmlSystemGetNVMLVersion = Ok(nvmlSystemGetNVMLVersion);
    l.nvmlSystemGetCudaDriverVersion = Ok(nvmlSystemGetCudaDriverVersion);
    l.nvmlSystemGetCudaDriverVersion_v2 = Ok(nvmlSystemGetCudaDriverVersion_v2);
    l.nvmlDeviceGetCount = Ok(nvmlDeviceGetCount);
    l.nvmlDeviceGetCount_v2 = Ok(nvmlDeviceGetCount_v2);
    l.nvmlDeviceGetHandleByIndex = Ok(nvmlDeviceGetHandleByIndex);
    l.nvmlDeviceGetHandleByIndex_v2 = Ok(nvmlDeviceGetHandleByIndex_v2);
    l.nvmlDeviceGetHandleByUUID = Ok(nvmlDeviceGetHandleByUUID);
    l.nvmlDeviceGetHandleByPciBusId = Ok(nvmlDeviceGetHandleByPciBusId);
    l.nvmlDeviceGetHandleByPciBusId_v2 = Ok(nvmlDeviceGetHandleByPciBusId_v2);
    l.nvmlDeviceGetName = Ok(nvmlDeviceGetName);
    l.nvmlDeviceGetUUID = Ok(nvmlDeviceGetUUID);
    l.nvmlDeviceGetIndex = Ok(nvmlDeviceGetIndex);
    l.nvmlDeviceGetMinorNumber = Ok(nvmlDeviceGetMinorNumber);
    l.nvmlDeviceGetPciInfo_v3 = Ok(nvmlDeviceGetPciInfo_v3);
    l.nvmlDeviceGetMemoryInfo = Ok(nvmlDeviceGetMemoryInfo);
    l.nvmlDeviceGetMemoryInfo_v2 = Ok(nvmlDeviceGetMemoryInfo_v2);
    l.nvmlDeviceGetCudaComputeCapability = Ok(nvmlDeviceGetCudaComputeCapability);
    l.nvmlDeviceGetMigMode = Ok(nvmlDeviceGetMigMode);
    l.nvmlDeviceIsMigDeviceHandle = Ok(nvmlDeviceIsMigDeviceHandle);
    l.nvmlDeviceGetUtilizationRates = Ok(nvmlDeviceGetUtilizationRates);
    l.nvmlDeviceGetComputeRunningProcesses = Ok(nvmlDeviceGetComputeRunningProcesses);
    l.nvmlDeviceGetComputeRunningProcesses_v2 = Ok(nvmlDeviceGetComputeRunningProcesses_v2);
    l.nvmlDeviceGetComputeRunningProcesses_v3 = Ok(nvmlDeviceGetComputeRunningProcesses_v3);
    l.nvmlDeviceGetGraphicsRunningProcesses = Ok(nvmlDeviceGetGraphicsRunningProcesses);
    l.nvmlDeviceGetGraphicsRunningProcesses_v2 = Ok(nvmlDeviceGetGraphicsRunningProcesses_v2);
    l.nvmlDeviceGetGraphicsRunningProcesses_v3 = Ok(nvmlDeviceGetGraphicsRunningProcesses_v3);
    l.nvmlDeviceGetMPSComputeRunningProcesses = Ok(nvmlDeviceGetMPSComputeRunningProcesses);
    l.nvmlDeviceGetMPSComputeRunningProcesses_v2 = Ok(nvmlDeviceGetMPSComputeRunningProcesses_v2);
    l.nvmlDeviceGetMPSComputeRunningProcesses_v3 = Ok(nvmlDeviceGetMPSComputeRunningProcesses_v3);
    l.nvmlDeviceGetMultiGpuBoard = Ok(nvmlDeviceGetMultiGpuBoard);
    l.nvmlDeviceGetBrand = Ok(nvmlDeviceGetBrand);
    l.nvmlDeviceGetArchitecture = Ok(nvmlDeviceGetArchitecture);
    l.nvmlDeviceGetNumGpuCores = Ok(nvmlDeviceGetNumGpuCores);
    l.nvmlDeviceGetPersistenceMode = Ok(nvmlDeviceGetPersistenceMode);
    l.nvmlDeviceGetComputeMode = Ok(nvmlDeviceGetComputeMode);
    l.nvmlDeviceGetFieldValues = Ok(nvmlDeviceGetFieldValues);
    l.nvmlDeviceGetGpuFabricInfo = Ok(nvmlDeviceGetGpuFabricInfo);
    l.nvmlDeviceGetGpuFabricInfoV = Ok(nvmlDeviceGetGpuFabricInfoV);
    l.nvmlDeviceGetMaxPcieLinkGeneration = Ok(nvmlDeviceGetMaxPcieLinkGeneration);
    l.nvmlDeviceGetMaxPcieLinkWidth = Ok(nvmlDeviceGetMaxPcieLinkWidth);
    l.nvmlDeviceGetCurrPcieLinkGeneration = Ok(nvmlDeviceGetCurrPcieLinkGeneration);
    l.nvmlDeviceGetCurrPcieLinkWidth = Ok(nvmlDeviceGetCurrPcieLinkWidth);
    l.nvmlDeviceGetPcieLinkMaxSpeed = Ok(nvmlDeviceGetPcieLinkMaxSpeed);
    l.nvmlDeviceGetPcieSpeed = Ok(nvmlDeviceGetPcieSpeed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_have_nvml_signatures() {
        signatures_match(None);
    }

    #[test]
    fn memory_v2_version() {
        // nvml.h: nvmlMemory_v2 is sizeof(nvmlMemory_v2_t) | 2 << 24, 40 bytes.
        assert_eq!(MEMORY_V2, 0x0200_0028);
    }

    #[test]
    fn fabric_info_versions() {
        // nvml.h: sizeof(nvmlGpuFabricInfo_v2_t) | 2 << 24, v3 likewise.
        assert_eq!(FABRIC_INFO_V2, 0x0200_0024);
        assert_eq!(FABRIC_INFO_V3, 0x0300_0028);
    }

    #[test]
    fn calls_before_init_and_bad_handles() {
        // No init in unit tests (it would load libcuda.so.1): every device
        // call is NVML_ERROR_UNINITIALIZED, checked before its pointers.
        let mut n = 0;
        let mut h: nv::nvmlDevice_t = std::ptr::null_mut();
        // SAFETY: live locals and null pointers, which the calls check.
        unsafe {
            assert_eq!(nvmlDeviceGetCount_v2(&mut n), nv::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED);
            assert_eq!(nvmlDeviceGetHandleByIndex_v2(0, &mut h), nv::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED);
            let forged = (&mut n as *mut c_uint).cast();
            assert_eq!(nvmlDeviceGetIndex(forged, &mut n), nv::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED);
            assert_eq!(crate::system::nvmlShutdown(), nv::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED);
        }
    }
}
