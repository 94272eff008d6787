//! [`MigControl`] over the real NVML, through nvml-wrapper 0.13.
//!
//! nvml-wrapper loads `libnvidia-ml.so.1` at run time, so this compiles and links
//! everywhere; [`RealNvml::open`] fails cleanly where the library or a GPU is missing.
//! What nvml-wrapper wraps (device lookup, UUID, name, memory, MIG mode, MIG device
//! handles) is used from it; the rest goes through the fenced raw calls of `raw`.
//!
//! SM count of a whole GPU: NVML has no direct call. We take it from the profile
//! tables for known models ([`ModelSpec::sms`](super::ModelSpec::sms)); for other models
//! with MIG on, from the full-GPU profile's info (SMs usable by MIG instances); otherwise
//! it is `None` and the server uses CUDA's `MULTIPROCESSOR_COUNT` attribute.

use nvml_wrapper::Device;
use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper_sys::bindings::{
    NVML_COMPUTE_INSTANCE_PROFILE_COUNT, NVML_DEVICE_MIG_ENABLE, NVML_GPU_INSTANCE_PROFILE_7_SLICE,
    NVML_GPU_INSTANCE_PROFILE_COUNT, nvmlReturn_t,
};

use super::profiles::{GpuModel, Placement};
use super::raw::{self, Failed};
use super::{ComputeInstanceInfo, GpuInfo, GpuInstanceInfo, MigControl, MigDeviceInfo, MigError, MigMode};

const MIB: u64 = 1024 * 1024;

/// The real NVML.
#[derive(Debug)]
pub struct RealNvml {
    nvml: Nvml,
}

impl RealNvml {
    /// Loads and initialises NVML; fails when the library, the driver or every GPU is missing.
    pub fn open() -> Result<Self, MigError> {
        let nvml = Nvml::init().map_err(|e| MigError::Unavailable(format!("cannot initialise NVML: {e}")))?;
        let count = nvml.device_count().map_err(|e| MigError::Unavailable(format!("cannot count GPUs: {e}")))?;
        if count == 0 {
            return Err(MigError::Unavailable("NVML reports no GPU".into()));
        }
        Ok(Self { nvml })
    }

    /// The underlying nvml-wrapper handle, for queries this trait does not cover.
    pub fn nvml(&self) -> &Nvml {
        &self.nvml
    }

    fn device(&self, gpu: u32) -> Result<Device<'_>, MigError> {
        self.nvml.device_by_index(gpu).map_err(|e| match e {
            NvmlError::InvalidArg | NvmlError::NotFound => MigError::NoSuchGpu(gpu),
            e => to_mig(gpu, "nvmlDeviceGetHandleByIndex_v2", e),
        })
    }

    /// MIG mode, or `None` where the GPU does not support MIG.
    fn mig_mode(&self, gpu: u32, dev: &Device<'_>) -> Result<Option<MigMode>, MigError> {
        match dev.mig_mode() {
            Ok(m) => Ok(Some(MigMode {
                current: m.current == NVML_DEVICE_MIG_ENABLE,
                pending: m.pending == NVML_DEVICE_MIG_ENABLE,
            })),
            Err(NvmlError::NotSupported) => Ok(None),
            Err(e) => Err(to_mig(gpu, "nvmlDeviceGetMigMode", e)),
        }
    }

    /// The device, if MIG is on; `NotSupported` (as NVML's instance calls answer) if not.
    fn mig_device(&self, gpu: u32, call: &'static str) -> Result<Device<'_>, MigError> {
        let dev = self.device(gpu)?;
        if !self.mig_mode(gpu, &dev)?.is_some_and(|m| m.current) {
            return Err(MigError::NotSupported { gpu, call });
        }
        Ok(dev)
    }

    /// Every GPU-instance profile the device supports, one per profile id.
    fn gi_profiles(&self, gpu: u32, dev: &Device<'_>) -> Result<Vec<raw::GiProfileRaw>, MigError> {
        let mut out: Vec<raw::GiProfileRaw> = Vec::new();
        for index in 0..NVML_GPU_INSTANCE_PROFILE_COUNT {
            match raw::gi_profile(dev, index) {
                Ok(p) if !out.iter().any(|q| q.id == p.id) => out.push(p),
                Ok(_) => {}
                // Indices this GPU or driver does not have.
                Err(Failed { error: NvmlError::NotSupported | NvmlError::InvalidArg, .. }) => {}
                Err(f) => return Err(failed(gpu, f)),
            }
        }
        Ok(out)
    }

    fn ci_profiles(&self, gpu: u32, dev: &Device<'_>, gi: u32) -> Result<Vec<raw::CiProfileRaw>, MigError> {
        let mut out: Vec<raw::CiProfileRaw> = Vec::new();
        for index in 0..NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
            match raw::ci_profile(dev, gi, index) {
                Ok(p) if !out.iter().any(|q| q.id == p.id) => out.push(p),
                Ok(_) => {}
                Err(Failed { error: NvmlError::NotSupported | NvmlError::InvalidArg, .. }) => {}
                Err(f) => return Err(failed(gpu, f)),
            }
        }
        Ok(out)
    }

    fn whole_gpu_sms(&self, dev: &Device<'_>, name: &str, mig: Option<MigMode>) -> Option<u32> {
        if let Some(model) = GpuModel::from_nvml_name(name) {
            return Some(model.spec().sms);
        }
        if mig.is_some_and(|m| m.current) {
            return raw::gi_profile(dev, NVML_GPU_INSTANCE_PROFILE_7_SLICE).ok().map(|p| p.sms);
        }
        None
    }
}

/// Converts an nvml-wrapper error: missing library or symbol is `Unavailable`, the rest
/// keeps its NVML code.
fn to_mig(gpu: u32, call: &'static str, e: NvmlError) -> MigError {
    match e {
        NvmlError::FailedToLoadSymbol(s) => MigError::Unavailable(format!("{call}: driver lacks the symbol: {s}")),
        NvmlError::LibloadingError(e) => MigError::Unavailable(format!("{call}: {e}")),
        NvmlError::DriverNotLoaded | NvmlError::LibraryNotFound => MigError::Unavailable(format!("{call}: {e}")),
        e => MigError::from_nvml_code(gpu, call, nvmlReturn_t::from(e)),
    }
}

fn failed(gpu: u32, f: Failed) -> MigError {
    to_mig(gpu, f.call, f.error)
}

impl MigControl for RealNvml {
    fn gpus(&self) -> Result<Vec<GpuInfo>, MigError> {
        let count = self.nvml.device_count().map_err(|e| to_mig(0, "nvmlDeviceGetCount_v2", e))?;
        (0..count).map(|i| self.gpu(i)).collect()
    }

    fn gpu(&self, gpu: u32) -> Result<GpuInfo, MigError> {
        let dev = self.device(gpu)?;
        let uuid = dev.uuid().map_err(|e| to_mig(gpu, "nvmlDeviceGetUUID", e))?;
        let name = dev.name().map_err(|e| to_mig(gpu, "nvmlDeviceGetName", e))?;
        let memory_bytes = dev.memory_info().map_err(|e| to_mig(gpu, "nvmlDeviceGetMemoryInfo_v2", e))?.total;
        let mig = self.mig_mode(gpu, &dev)?;
        let sms = self.whole_gpu_sms(&dev, &name, mig);
        Ok(GpuInfo { index: gpu, uuid, name, memory_bytes, sms, mig })
    }

    fn gpu_instances(&self, gpu: u32) -> Result<Vec<GpuInstanceInfo>, MigError> {
        let dev = self.mig_device(gpu, "nvmlDeviceGetGpuInstances")?;
        let mut out = Vec::new();
        // NVML lists instances per profile id; the profiles come from their indices.
        for p in self.gi_profiles(gpu, &dev)? {
            out.extend(raw::gpu_instances(&dev, p.id, p.instance_count).map_err(|f| failed(gpu, f))?);
        }
        out.sort_by_key(|g| g.id);
        Ok(out)
    }

    fn compute_instances(&self, gpu: u32, gpu_instance: u32) -> Result<Vec<ComputeInstanceInfo>, MigError> {
        let dev = self.mig_device(gpu, "nvmlGpuInstanceGetComputeInstances")?;
        let mut out = Vec::new();
        for p in self.ci_profiles(gpu, &dev, gpu_instance)? {
            out.extend(raw::compute_instances(&dev, gpu_instance, p.id, p.instance_count).map_err(|f| failed(gpu, f))?);
        }
        out.sort_by_key(|c| c.id);
        Ok(out)
    }

    fn possible_placements(&self, gpu: u32, profile_id: u32) -> Result<Vec<Placement>, MigError> {
        let dev = self.device(gpu)?;
        raw::possible_placements(&dev, profile_id).map_err(|f| failed(gpu, f))
    }

    fn create_gpu_instance(
        &self,
        gpu: u32,
        profile_id: u32,
        placement: Placement,
    ) -> Result<GpuInstanceInfo, MigError> {
        let dev = self.mig_device(gpu, "nvmlDeviceCreateGpuInstanceWithPlacement")?;
        raw::create_gpu_instance(&dev, profile_id, placement).map_err(|f| failed(gpu, f))
    }

    fn create_compute_instance(&self, gpu: u32, gpu_instance: u32) -> Result<ComputeInstanceInfo, MigError> {
        const CALL: &str = "nvmlGpuInstanceCreateComputeInstance";
        let dev = self.mig_device(gpu, CALL)?;
        let gi = raw::gpu_instance(&dev, gpu_instance).map_err(|f| failed(gpu, f))?;
        let slices = self
            .gi_profiles(gpu, &dev)?
            .into_iter()
            .find(|p| p.id == gi.profile_id)
            .map(|p| p.slice_count)
            .ok_or(MigError::NotFound { gpu, call: "nvmlDeviceGetGpuInstanceProfileInfo" })?;
        // The full-size compute profile: as many compute slices as the GPU instance has
        // (failing that, the largest one offered).
        let cis = self.ci_profiles(gpu, &dev, gpu_instance)?;
        let full = cis
            .iter()
            .find(|c| c.slice_count == slices)
            .or_else(|| cis.iter().max_by_key(|c| c.slice_count))
            .ok_or(MigError::NotSupported { gpu, call: "nvmlGpuInstanceGetComputeInstanceProfileInfo" })?;
        raw::create_compute_instance(&dev, gpu_instance, full.id).map_err(|f| failed(gpu, f))
    }

    fn destroy_compute_instance(&self, gpu: u32, gpu_instance: u32, compute_instance: u32) -> Result<(), MigError> {
        let dev = self.mig_device(gpu, "nvmlComputeInstanceDestroy")?;
        raw::destroy_compute_instance(&dev, gpu_instance, compute_instance).map_err(|f| failed(gpu, f))
    }

    fn destroy_gpu_instance(&self, gpu: u32, gpu_instance: u32) -> Result<(), MigError> {
        let dev = self.mig_device(gpu, "nvmlGpuInstanceDestroy")?;
        raw::destroy_gpu_instance(&dev, gpu_instance).map_err(|f| failed(gpu, f))
    }

    fn mig_devices(&self, gpu: u32) -> Result<Vec<MigDeviceInfo>, MigError> {
        let dev = self.device(gpu)?;
        if !self.mig_mode(gpu, &dev)?.is_some_and(|m| m.current) {
            return Ok(Vec::new());
        }
        // nvml-wrapper's `mig_device_count` is nvmlDeviceGetMaxMigDeviceCount: the slots to probe.
        let slots = dev.mig_device_count().map_err(|e| to_mig(gpu, "nvmlDeviceGetMaxMigDeviceCount", e))?;
        let mut out = Vec::new();
        for i in 0..slots {
            let mig = match dev.mig_device_by_index(i) {
                Ok(m) => m,
                // Empty slot.
                Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
                Err(e) => return Err(to_mig(gpu, "nvmlDeviceGetMigDeviceHandleByIndex", e)),
            };
            let uuid = mig.uuid().map_err(|e| to_mig(gpu, "nvmlDeviceGetUUID", e))?;
            let (gpu_instance_id, compute_instance_id) = raw::mig_device_ids(&mig).map_err(|f| failed(gpu, f))?;
            let attrs = raw::attributes(&mig).ok();
            let memory_bytes = match mig.memory_info() {
                Ok(m) => m.total,
                Err(e) => match attrs {
                    Some((_, mib)) => mib * MIB,
                    None => return Err(to_mig(gpu, "nvmlDeviceGetMemoryInfo_v2", e)),
                },
            };
            out.push(MigDeviceInfo {
                uuid,
                gpu_instance_id,
                compute_instance_id,
                memory_bytes,
                sms: attrs.map(|(sms, _)| sms),
            });
        }
        Ok(out)
    }

    fn gpu_instance_in_use(&self, gpu: u32, gpu_instance: u32) -> Result<bool, MigError> {
        let dev = self.mig_device(gpu, "nvmlDeviceGetComputeRunningProcesses_v3")?;
        // NotFound for an instance that does not exist, as the simulation answers.
        raw::gpu_instance(&dev, gpu_instance).map_err(|f| failed(gpu, f))?;
        let slots = dev.mig_device_count().map_err(|e| to_mig(gpu, "nvmlDeviceGetMaxMigDeviceCount", e))?;
        for i in 0..slots {
            let mig = match dev.mig_device_by_index(i) {
                Ok(m) => m,
                Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
                Err(e) => return Err(to_mig(gpu, "nvmlDeviceGetMigDeviceHandleByIndex", e)),
            };
            let (gi, _) = raw::mig_device_ids(&mig).map_err(|f| failed(gpu, f))?;
            if gi != gpu_instance {
                continue;
            }
            let n = mig
                .running_compute_processes_count()
                .map_err(|e| to_mig(gpu, "nvmlDeviceGetComputeRunningProcesses_v3", e))?;
            if n > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where NVML is missing (CI, laptops) `open` fails with `Unavailable`; where it is
    /// present it finds at least one GPU. Either way it must not panic.
    #[test]
    fn open_fails_cleanly_or_finds_gpus() {
        match RealNvml::open() {
            Ok(nvml) => assert!(!nvml.gpus().unwrap().is_empty()),
            Err(e) => assert!(matches!(e, MigError::Unavailable(_)), "{e}"),
        }
    }

    #[test]
    fn error_conversion_keeps_codes() {
        assert!(matches!(to_mig(0, "x", NvmlError::InUse), MigError::InUse { .. }));
        assert!(matches!(to_mig(0, "x", NvmlError::NotSupported), MigError::NotSupported { .. }));
        assert!(matches!(to_mig(0, "x", NvmlError::FailedToLoadSymbol("s".into())), MigError::Unavailable(_)));
        let e = to_mig(3, "nvmlX", NvmlError::GpuLost);
        assert_eq!(e.nvml_code(), Some(15));
        assert!(matches!(to_mig(0, "x", NvmlError::UnexpectedVariant(23)), MigError::InsufficientResources { .. }));
    }
}
