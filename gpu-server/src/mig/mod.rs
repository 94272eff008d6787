//! MIG discovery and layout through NVML.
//!
//! The server serves either whole GPUs (MIG off) or MIG instances (MIG on); a
//! worker bound to one of them gets `CUDA_VISIBLE_DEVICES` set to the
//! instance's UUID before `cuInit` (one process sees one MIG device before
//! driver R570). This module finds what there is to serve and, where asked,
//! brings a GPU's MIG layout to a configured list of profiles:
//! - [`profiles`]: the profile tables (ids, indices, names, slices, memory,
//!   SMs, placements) as data, and [`Layout::plan`], the placement search
//!   shared with the balancer and the Terraform validation;
//! - [`MigControl`]: the small NVML surface the rest needs, implemented by
//!   [`RealNvml`] (nvml-wrapper plus raw calls for what it does not wrap) and
//!   by [`SimulatedNvml`] (the tables, for tests and for machines whose MIG
//!   mode must not change);
//! - [`discover()`]: what to serve, as [`ServedGpu`]s;
//! - [`Planner`]: converges a GPU's instances to a desired layout, idempotently,
//!   never destroying busy instances and never toggling MIG mode itself.

use std::fmt;

mod discover;
mod planner;
pub mod profiles;
// Raw NVML calls for what nvml-wrapper does not wrap: the only unsafe code of the crate's MIG
// support, fenced in one file, each block with its SAFETY note.
#[allow(unsafe_code)]
mod raw;
mod real;
mod sim;

pub use discover::{ServedGpu, ServedInstance, discover};
pub use planner::{Plan, PlanAction, PlanReport, Planner};
pub use profiles::{GiProfile, GpuModel, Layout, LayoutError, ModelSpec, Placement};
pub use real::RealNvml;
pub use sim::{SimGpuSpec, SimulatedNvml};

use nvml_wrapper_sys::bindings as nv;

/// MIG mode of a MIG-capable GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigMode {
    /// Mode in effect now.
    pub current: bool,
    /// Mode after the next GPU reset (differs from `current` while a change is pending).
    pub pending: bool,
}

/// One physical GPU as NVML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML index.
    pub index: u32,
    /// `GPU-…` UUID.
    pub uuid: String,
    /// Product name, e.g. `"NVIDIA H100 80GB HBM3"`.
    pub name: String,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// SMs of the whole GPU when known (see [`RealNvml`] for where it comes from).
    pub sms: Option<u32>,
    /// MIG mode; `None` when the GPU does not support MIG.
    pub mig: Option<MigMode>,
}

impl GpuInfo {
    /// Whether MIG mode is on now.
    pub fn mig_enabled(&self) -> bool {
        self.mig.is_some_and(|m| m.current)
    }

    /// The model's profile table, when the name is one we know.
    pub fn model(&self) -> Option<GpuModel> {
        GpuModel::from_nvml_name(&self.name)
    }
}

/// A GPU instance (a MIG partition of memory and SMs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GpuInstanceInfo {
    /// GPU instance id, unique on its GPU while it exists (NVML picks it).
    pub id: u32,
    /// NVML profile id (see [`GiProfile::id`]).
    pub profile_id: u32,
    /// Memory slices it occupies.
    pub placement: Placement,
}

/// A compute instance inside a GPU instance: what a MIG device (and a CUDA context) runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ComputeInstanceInfo {
    /// Id of the GPU instance it belongs to.
    pub gpu_instance_id: u32,
    /// Compute instance id, unique within its GPU instance.
    pub id: u32,
    /// NVML compute-instance profile id.
    pub profile_id: u32,
}

/// A MIG device: the CUDA-visible face of one compute instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigDeviceInfo {
    /// `MIG-…` UUID, what `CUDA_VISIBLE_DEVICES` takes.
    pub uuid: String,
    /// GPU instance it belongs to.
    pub gpu_instance_id: u32,
    /// Compute instance it is.
    pub compute_instance_id: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// SMs, when NVML reports them.
    pub sms: Option<u32>,
}

/// The NVML surface the server needs for MIG, so that real and simulated topologies
/// are interchangeable. GPUs are named by NVML index, instances by their ids.
///
/// Errors follow NVML's: creating on an overlapping or disallowed placement is
/// [`MigError::InsufficientResources`], destroying an instance with processes (or a
/// GPU instance that still has compute instances) is [`MigError::InUse`], instance
/// calls on a GPU with MIG off are [`MigError::NotSupported`].
pub trait MigControl: fmt::Debug + Send + Sync {
    /// Every GPU, in index order.
    fn gpus(&self) -> Result<Vec<GpuInfo>, MigError>;

    /// One GPU.
    fn gpu(&self, gpu: u32) -> Result<GpuInfo, MigError> {
        self.gpus()?.into_iter().find(|g| g.index == gpu).ok_or(MigError::NoSuchGpu(gpu))
    }

    /// GPU instances of a GPU, by id.
    fn gpu_instances(&self, gpu: u32) -> Result<Vec<GpuInstanceInfo>, MigError>;

    /// Compute instances of one GPU instance, by id.
    fn compute_instances(&self, gpu: u32, gpu_instance: u32) -> Result<Vec<ComputeInstanceInfo>, MigError>;

    /// Every placement the profile may take on this GPU, whether free or not (NVML's
    /// `nvmlDeviceGetGpuInstancePossiblePlacements_v2`).
    fn possible_placements(&self, gpu: u32, profile_id: u32) -> Result<Vec<Placement>, MigError>;

    /// Creates a GPU instance of `profile_id` at `placement`.
    fn create_gpu_instance(&self, gpu: u32, profile_id: u32, placement: Placement)
    -> Result<GpuInstanceInfo, MigError>;

    /// Creates a compute instance spanning the whole GPU instance (its full-size compute profile).
    fn create_compute_instance(&self, gpu: u32, gpu_instance: u32) -> Result<ComputeInstanceInfo, MigError>;

    /// Destroys a compute instance.
    fn destroy_compute_instance(&self, gpu: u32, gpu_instance: u32, compute_instance: u32) -> Result<(), MigError>;

    /// Destroys a GPU instance; its compute instances must be destroyed first.
    fn destroy_gpu_instance(&self, gpu: u32, gpu_instance: u32) -> Result<(), MigError>;

    /// MIG devices of a GPU (empty when MIG is off).
    fn mig_devices(&self, gpu: u32) -> Result<Vec<MigDeviceInfo>, MigError>;

    /// Whether processes run on the GPU instance (on any of its compute instances); NVML
    /// refuses to destroy it, or them, while they do.
    fn gpu_instance_in_use(&self, gpu: u32, gpu_instance: u32) -> Result<bool, MigError>;
}

/// Errors of MIG discovery and layout.
#[derive(Debug, thiserror::Error)]
pub enum MigError {
    /// NVML could not be loaded or initialised, or a function is missing from the
    /// installed driver, or there is no GPU.
    #[error("NVML unavailable: {0}")]
    Unavailable(String),
    /// No GPU has this index.
    #[error("no GPU with index {0}")]
    NoSuchGpu(u32),
    /// MIG mode is off on the GPU; enabling it is the operator's (or boot unit's) job.
    #[error(
        "MIG mode is disabled on GPU {gpu}: enable it before boot (nvidia-smi -i {gpu} -mig 1); we never toggle it"
    )]
    MigDisabled {
        /// GPU index.
        gpu: u32,
    },
    /// The GPU or driver does not support the call (no MIG, or MIG off): `NVML_ERROR_NOT_SUPPORTED`.
    #[error("{call} is not supported on GPU {gpu}")]
    NotSupported {
        /// GPU index.
        gpu: u32,
        /// NVML function.
        call: &'static str,
    },
    /// The placement overlaps an instance, is not allowed for the profile, or no
    /// instance of the profile is left: `NVML_ERROR_INSUFFICIENT_RESOURCES`.
    #[error("{call} on GPU {gpu}: insufficient resources")]
    InsufficientResources {
        /// GPU index.
        gpu: u32,
        /// NVML function.
        call: &'static str,
    },
    /// The instance has processes, or a GPU instance still has compute instances: `NVML_ERROR_IN_USE`.
    #[error("{call} on GPU {gpu}: in use")]
    InUse {
        /// GPU index.
        gpu: u32,
        /// NVML function.
        call: &'static str,
    },
    /// The GPU or compute instance does not exist: `NVML_ERROR_NOT_FOUND`.
    #[error("{call} on GPU {gpu}: not found")]
    NotFound {
        /// GPU index.
        gpu: u32,
        /// NVML function.
        call: &'static str,
    },
    /// A profile id or placement NVML does not accept: `NVML_ERROR_INVALID_ARGUMENT`.
    #[error("{call} on GPU {gpu}: invalid argument")]
    InvalidArgument {
        /// GPU index.
        gpu: u32,
        /// NVML function.
        call: &'static str,
    },
    /// Creating or destroying instances needs root: `NVML_ERROR_NO_PERMISSION`.
    #[error("{call} on GPU {gpu}: no permission (MIG changes need root)")]
    NoPermission {
        /// GPU index.
        gpu: u32,
        /// NVML function.
        call: &'static str,
    },
    /// Any other NVML failure, with the raw `nvmlReturn_t`.
    #[error("{call} failed: {} (NVML error {code})", nvml_code_name(*code))]
    Nvml {
        /// NVML function.
        call: &'static str,
        /// Raw `nvmlReturn_t`.
        code: u32,
    },
    /// The GPU is not a model with a profile table, so layouts cannot be planned for it.
    #[error("GPU {gpu} ({name}) has no known MIG profile table")]
    UnknownModel {
        /// GPU index.
        gpu: u32,
        /// NVML name.
        name: String,
    },
    /// The layout asked for is invalid for the model.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A simulated-topology spec could not be parsed.
    #[error("bad simulated GPU spec {spec:?}: {reason}")]
    BadSpec {
        /// The spec (or the part of it at fault).
        spec: String,
        /// What is wrong.
        reason: String,
    },
}

impl MigError {
    /// The error for NVML return code `code` from `call` on GPU `gpu`: the codes callers
    /// act on get their own variant, the rest keep the raw code.
    pub fn from_nvml_code(gpu: u32, call: &'static str, code: u32) -> MigError {
        match code {
            nv::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED => MigError::NotSupported { gpu, call },
            nv::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES => MigError::InsufficientResources { gpu, call },
            nv::nvmlReturn_enum_NVML_ERROR_IN_USE => MigError::InUse { gpu, call },
            nv::nvmlReturn_enum_NVML_ERROR_NOT_FOUND => MigError::NotFound { gpu, call },
            nv::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT => MigError::InvalidArgument { gpu, call },
            nv::nvmlReturn_enum_NVML_ERROR_NO_PERMISSION => MigError::NoPermission { gpu, call },
            _ => MigError::Nvml { call, code },
        }
    }

    /// The `nvmlReturn_t` this error stands for, where it stands for one.
    pub fn nvml_code(&self) -> Option<u32> {
        Some(match self {
            MigError::NotSupported { .. } => nv::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
            MigError::InsufficientResources { .. } => nv::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES,
            MigError::InUse { .. } => nv::nvmlReturn_enum_NVML_ERROR_IN_USE,
            MigError::NotFound { .. } => nv::nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
            MigError::InvalidArgument { .. } => nv::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT,
            MigError::NoPermission { .. } => nv::nvmlReturn_enum_NVML_ERROR_NO_PERMISSION,
            MigError::Nvml { code, .. } => *code,
            _ => return None,
        })
    }
}

/// NVML's name for a return code, for messages.
pub fn nvml_code_name(code: u32) -> &'static str {
    match code {
        nv::nvmlReturn_enum_NVML_SUCCESS => "NVML_SUCCESS",
        nv::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED => "NVML_ERROR_UNINITIALIZED",
        nv::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT => "NVML_ERROR_INVALID_ARGUMENT",
        nv::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED => "NVML_ERROR_NOT_SUPPORTED",
        nv::nvmlReturn_enum_NVML_ERROR_NO_PERMISSION => "NVML_ERROR_NO_PERMISSION",
        nv::nvmlReturn_enum_NVML_ERROR_NOT_FOUND => "NVML_ERROR_NOT_FOUND",
        nv::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE => "NVML_ERROR_INSUFFICIENT_SIZE",
        nv::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED => "NVML_ERROR_DRIVER_NOT_LOADED",
        nv::nvmlReturn_enum_NVML_ERROR_LIBRARY_NOT_FOUND => "NVML_ERROR_LIBRARY_NOT_FOUND",
        nv::nvmlReturn_enum_NVML_ERROR_FUNCTION_NOT_FOUND => "NVML_ERROR_FUNCTION_NOT_FOUND",
        nv::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST => "NVML_ERROR_GPU_IS_LOST",
        nv::nvmlReturn_enum_NVML_ERROR_RESET_REQUIRED => "NVML_ERROR_RESET_REQUIRED",
        nv::nvmlReturn_enum_NVML_ERROR_IN_USE => "NVML_ERROR_IN_USE",
        nv::nvmlReturn_enum_NVML_ERROR_MEMORY => "NVML_ERROR_MEMORY",
        nv::nvmlReturn_enum_NVML_ERROR_NO_DATA => "NVML_ERROR_NO_DATA",
        nv::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES => "NVML_ERROR_INSUFFICIENT_RESOURCES",
        nv::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH => "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
        nv::nvmlReturn_enum_NVML_ERROR_NOT_READY => "NVML_ERROR_NOT_READY",
        nv::nvmlReturn_enum_NVML_ERROR_GPU_NOT_FOUND => "NVML_ERROR_GPU_NOT_FOUND",
        nv::nvmlReturn_enum_NVML_ERROR_INVALID_STATE => "NVML_ERROR_INVALID_STATE",
        nv::nvmlReturn_enum_NVML_ERROR_UNKNOWN => "NVML_ERROR_UNKNOWN",
        _ => "unrecognised NVML error",
    }
}

/// What a server serves at start: with a `layout`, every MIG-enabled GPU is
/// first brought to it (nothing runs yet, so only instances NVML reports in
/// use are kept); then [`discover()`] lists the whole GPUs and MIG instances.
pub fn prepare<S: AsRef<str>>(ctl: &dyn MigControl, layout: Option<&[S]>) -> Result<Vec<ServedGpu>, MigError> {
    if let Some(layout) = layout {
        for gpu in ctl.gpus()? {
            if !gpu.mig_enabled() {
                tracing::info!(gpu = gpu.index, "MIG is off: serving the whole GPU, the layout does not apply");
                continue;
            }
            let report = Planner::new(ctl).apply(gpu.index, layout, &|_| false)?;
            tracing::info!(
                gpu = gpu.index,
                actions = report.actions.len(),
                converged = report.converged,
                "MIG layout applied"
            );
            if !report.converged {
                tracing::warn!(gpu = gpu.index, unmet = ?report.unmet, "MIG layout only partly applied: instances in use are in the way");
            }
        }
    }
    discover(ctl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_codes_round_trip() {
        for code in [2, 3, 4, 6, 19, 23, 15, 999, 12345] {
            let e = MigError::from_nvml_code(0, "nvmlTest", code);
            assert_eq!(e.nvml_code(), Some(code), "{e}");
            assert!(!e.to_string().is_empty());
        }
        assert!(matches!(MigError::from_nvml_code(1, "x", 23), MigError::InsufficientResources { gpu: 1, .. }));
        assert!(MigError::Nvml { call: "nvmlX", code: 15 }.to_string().contains("NVML_ERROR_GPU_IS_LOST"));
        assert_eq!(MigError::MigDisabled { gpu: 0 }.nvml_code(), None);
    }
}
