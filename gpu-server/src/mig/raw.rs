//! Raw NVML calls that nvml-wrapper 0.13 does not wrap (or wraps wrongly): GPU and
//! compute instance create/destroy/list, profile info, possible placements, the
//! instance ids and attributes of a MIG device.
//!
//! This is the only `unsafe` of the MIG code. Every function here takes a safe
//! `Device` borrow and plain ids; the raw GPU- and compute-instance handles NVML hands
//! out never leave a function, so no caller can hold one past the instance's
//! destruction. Function pointers come from `Nvml::lib()`, the table nvml-wrapper
//! loaded; a symbol the installed driver lacks is an error, not a crash.
//!
//! nvml-wrapper's own `possible_placements` sizes a `Vec` by capacity and never sets
//! its length, so it always returns an empty list; [`possible_placements`] replaces it.

use std::ffi::c_uint;
use std::mem;
use std::ptr;

use nvml_wrapper::Device;
use nvml_wrapper::error::{NvmlError, nvml_sym, nvml_try};
use nvml_wrapper_sys::bindings::{
    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, nvmlComputeInstance_t, nvmlComputeInstanceInfo_t,
    nvmlComputeInstanceProfileInfo_t, nvmlDevice_t, nvmlDeviceAttributes_t, nvmlGpuInstance_t, nvmlGpuInstanceInfo_t,
    nvmlGpuInstancePlacement_t, nvmlGpuInstanceProfileInfo_t,
};

use super::profiles::Placement;
use super::{ComputeInstanceInfo, GpuInstanceInfo};

/// A raw call that failed: the NVML function and its error.
#[derive(Debug)]
pub(super) struct Failed {
    pub(super) call: &'static str,
    pub(super) error: NvmlError,
}

type R<T> = Result<T, Failed>;

fn at(call: &'static str) -> impl FnOnce(NvmlError) -> Failed {
    move |error| Failed { call, error }
}

/// What `nvmlDeviceGetGpuInstanceProfileInfo` says of one profile index.
#[derive(Debug, Clone, Copy)]
pub(super) struct GiProfileRaw {
    pub(super) id: u32,
    pub(super) slice_count: u32,
    pub(super) instance_count: u32,
    pub(super) sms: u32,
}

/// What `nvmlGpuInstanceGetComputeInstanceProfileInfo` says of one compute profile index.
#[derive(Debug, Clone, Copy)]
pub(super) struct CiProfileRaw {
    pub(super) id: u32,
    pub(super) slice_count: u32,
    pub(super) instance_count: u32,
}

fn handle(dev: &Device<'_>) -> nvmlDevice_t {
    // SAFETY: `handle` is unsafe only to keep the raw handle out of casual use; it is a
    // copy of a pointer that stays valid while `dev` (and the `Nvml` it borrows) lives,
    // and we only pass it to NVML calls made within that borrow.
    unsafe { dev.handle() }
}

/// Profile info for profile *index* `index` (`NVML_GPU_INSTANCE_PROFILE_*`).
pub(super) fn gi_profile(dev: &Device<'_>, index: u32) -> R<GiProfileRaw> {
    const CALL: &str = "nvmlDeviceGetGpuInstanceProfileInfo";
    let f = nvml_sym(dev.nvml().lib().nvmlDeviceGetGpuInstanceProfileInfo.as_ref()).map_err(at(CALL))?;
    // SAFETY: a plain C struct of integers, for which all-zero is a valid value.
    let mut info: nvmlGpuInstanceProfileInfo_t = unsafe { mem::zeroed() };
    // SAFETY: valid device handle (see `handle`) and a pointer to a live, writable struct of the
    // type the function fills.
    nvml_try(unsafe { f(handle(dev), index, &mut info) }).map_err(at(CALL))?;
    Ok(GiProfileRaw {
        id: info.id,
        slice_count: info.sliceCount,
        instance_count: info.instanceCount,
        sms: info.multiprocessorCount,
    })
}

/// Every placement profile *id* `profile_id` may take.
pub(super) fn possible_placements(dev: &Device<'_>, profile_id: u32) -> R<Vec<Placement>> {
    const CALL: &str = "nvmlDeviceGetGpuInstancePossiblePlacements_v2";
    let f = nvml_sym(dev.nvml().lib().nvmlDeviceGetGpuInstancePossiblePlacements_v2.as_ref()).map_err(at(CALL))?;
    let mut count: c_uint = 0;
    // SAFETY: a null buffer asks NVML for the count only (nvml.h); `count` is a live c_uint.
    nvml_try(unsafe { f(handle(dev), profile_id, ptr::null_mut(), &mut count) }).map_err(at(CALL))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
    // SAFETY: `buf` holds `count` initialised placements; NVML writes at most `count` of them
    // and stores how many it wrote in `count`.
    nvml_try(unsafe { f(handle(dev), profile_id, buf.as_mut_ptr(), &mut count) }).map_err(at(CALL))?;
    buf.truncate(count as usize);
    Ok(buf.into_iter().map(|p| Placement::new(p.start, p.size)).collect())
}

fn gi_info(dev: &Device<'_>, gi: nvmlGpuInstance_t) -> R<GpuInstanceInfo> {
    const CALL: &str = "nvmlGpuInstanceGetInfo";
    let f = nvml_sym(dev.nvml().lib().nvmlGpuInstanceGetInfo.as_ref()).map_err(at(CALL))?;
    // SAFETY: integers and a device pointer; all-zero (a null pointer) is a valid value.
    let mut info: nvmlGpuInstanceInfo_t = unsafe { mem::zeroed() };
    // SAFETY: `gi` was just returned by NVML for this device and not destroyed since; `info` is
    // a live, writable struct of the type the function fills.
    nvml_try(unsafe { f(gi, &mut info) }).map_err(at(CALL))?;
    Ok(GpuInstanceInfo {
        id: info.id,
        profile_id: info.profileId,
        placement: Placement::new(info.placement.start, info.placement.size),
    })
}

fn gi_by_id(dev: &Device<'_>, id: u32) -> R<nvmlGpuInstance_t> {
    const CALL: &str = "nvmlDeviceGetGpuInstanceById";
    let f = nvml_sym(dev.nvml().lib().nvmlDeviceGetGpuInstanceById.as_ref()).map_err(at(CALL))?;
    let mut gi: nvmlGpuInstance_t = ptr::null_mut();
    // SAFETY: valid device handle; `gi` is a live out-pointer for one handle.
    nvml_try(unsafe { f(handle(dev), id, &mut gi) }).map_err(at(CALL))?;
    Ok(gi)
}

/// GPU instances of profile *id* `profile_id`; `capacity` is the profile's instance count.
pub(super) fn gpu_instances(dev: &Device<'_>, profile_id: u32, capacity: u32) -> R<Vec<GpuInstanceInfo>> {
    const CALL: &str = "nvmlDeviceGetGpuInstances";
    let f = nvml_sym(dev.nvml().lib().nvmlDeviceGetGpuInstances.as_ref()).map_err(at(CALL))?;
    // NVML wants room for every instance the profile allows (its instanceCount); a little
    // more costs nothing and guards against a driver that reports fewer.
    let cap = capacity.max(8);
    let mut handles: Vec<nvmlGpuInstance_t> = vec![ptr::null_mut(); cap as usize];
    let mut count: c_uint = cap;
    // SAFETY: `handles` has room for `cap` handles; NVML writes at most that many and stores
    // how many in `count`.
    nvml_try(unsafe { f(handle(dev), profile_id, handles.as_mut_ptr(), &mut count) }).map_err(at(CALL))?;
    handles.truncate((count as usize).min(cap as usize));
    handles.into_iter().map(|gi| gi_info(dev, gi)).collect()
}

/// One GPU instance, by id.
pub(super) fn gpu_instance(dev: &Device<'_>, id: u32) -> R<GpuInstanceInfo> {
    let gi = gi_by_id(dev, id)?;
    gi_info(dev, gi)
}

/// Creates a GPU instance of profile *id* `profile_id` at `placement`.
pub(super) fn create_gpu_instance(dev: &Device<'_>, profile_id: u32, placement: Placement) -> R<GpuInstanceInfo> {
    const CALL: &str = "nvmlDeviceCreateGpuInstanceWithPlacement";
    let f = nvml_sym(dev.nvml().lib().nvmlDeviceCreateGpuInstanceWithPlacement.as_ref()).map_err(at(CALL))?;
    let at_placement = nvmlGpuInstancePlacement_t { start: placement.start, size: placement.size };
    let mut gi: nvmlGpuInstance_t = ptr::null_mut();
    // SAFETY: valid device handle; `at_placement` lives across the call and is only read;
    // `gi` is a live out-pointer for one handle.
    nvml_try(unsafe { f(handle(dev), profile_id, &at_placement, &mut gi) }).map_err(at(CALL))?;
    gi_info(dev, gi)
}

/// Destroys GPU instance `id`.
pub(super) fn destroy_gpu_instance(dev: &Device<'_>, id: u32) -> R<()> {
    const CALL: &str = "nvmlGpuInstanceDestroy";
    let f = nvml_sym(dev.nvml().lib().nvmlGpuInstanceDestroy.as_ref()).map_err(at(CALL))?;
    let gi = gi_by_id(dev, id)?;
    // SAFETY: `gi` was just looked up and is not used after this call.
    nvml_try(unsafe { f(gi) }).map_err(at(CALL))
}

/// Compute profile info for compute profile *index* `index` within GPU instance `gi_id`.
pub(super) fn ci_profile(dev: &Device<'_>, gi_id: u32, index: u32) -> R<CiProfileRaw> {
    const CALL: &str = "nvmlGpuInstanceGetComputeInstanceProfileInfo";
    let f = nvml_sym(dev.nvml().lib().nvmlGpuInstanceGetComputeInstanceProfileInfo.as_ref()).map_err(at(CALL))?;
    let gi = gi_by_id(dev, gi_id)?;
    // SAFETY: a plain C struct of integers, for which all-zero is a valid value.
    let mut info: nvmlComputeInstanceProfileInfo_t = unsafe { mem::zeroed() };
    // SAFETY: `gi` was just looked up; `info` is a live, writable struct of the type filled.
    nvml_try(unsafe { f(gi, index, NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, &mut info) }).map_err(at(CALL))?;
    Ok(CiProfileRaw { id: info.id, slice_count: info.sliceCount, instance_count: info.instanceCount })
}

fn ci_info(dev: &Device<'_>, ci: nvmlComputeInstance_t) -> R<ComputeInstanceInfo> {
    const CALL: &str = "nvmlComputeInstanceGetInfo_v2";
    let f = nvml_sym(dev.nvml().lib().nvmlComputeInstanceGetInfo_v2.as_ref()).map_err(at(CALL))?;
    // SAFETY: integers and handle pointers; all-zero (null pointers) is a valid value.
    let mut info: nvmlComputeInstanceInfo_t = unsafe { mem::zeroed() };
    // SAFETY: `ci` was just returned by NVML and not destroyed since; `info` is live and writable.
    nvml_try(unsafe { f(ci, &mut info) }).map_err(at(CALL))?;
    let gi = gi_info(dev, info.gpuInstance)?;
    Ok(ComputeInstanceInfo { gpu_instance_id: gi.id, id: info.id, profile_id: info.profileId })
}

/// Compute instances of compute profile *id* `profile_id` in GPU instance `gi_id`.
pub(super) fn compute_instances(
    dev: &Device<'_>,
    gi_id: u32,
    profile_id: u32,
    capacity: u32,
) -> R<Vec<ComputeInstanceInfo>> {
    const CALL: &str = "nvmlGpuInstanceGetComputeInstances";
    let f = nvml_sym(dev.nvml().lib().nvmlGpuInstanceGetComputeInstances.as_ref()).map_err(at(CALL))?;
    let gi = gi_by_id(dev, gi_id)?;
    let cap = capacity.max(8);
    let mut handles: Vec<nvmlComputeInstance_t> = vec![ptr::null_mut(); cap as usize];
    let mut count: c_uint = cap;
    // SAFETY: `gi` was just looked up; `handles` has room for `cap` handles, NVML writes at most
    // that many and stores how many in `count`.
    nvml_try(unsafe { f(gi, profile_id, handles.as_mut_ptr(), &mut count) }).map_err(at(CALL))?;
    handles.truncate((count as usize).min(cap as usize));
    handles.into_iter().map(|ci| ci_info(dev, ci)).collect()
}

/// Creates a compute instance of compute profile *id* `profile_id` in GPU instance `gi_id`.
pub(super) fn create_compute_instance(dev: &Device<'_>, gi_id: u32, profile_id: u32) -> R<ComputeInstanceInfo> {
    const CALL: &str = "nvmlGpuInstanceCreateComputeInstance";
    let f = nvml_sym(dev.nvml().lib().nvmlGpuInstanceCreateComputeInstance.as_ref()).map_err(at(CALL))?;
    let gi = gi_by_id(dev, gi_id)?;
    let mut ci: nvmlComputeInstance_t = ptr::null_mut();
    // SAFETY: `gi` was just looked up; `ci` is a live out-pointer for one handle.
    nvml_try(unsafe { f(gi, profile_id, &mut ci) }).map_err(at(CALL))?;
    ci_info(dev, ci)
}

/// Destroys compute instance `ci_id` of GPU instance `gi_id`.
pub(super) fn destroy_compute_instance(dev: &Device<'_>, gi_id: u32, ci_id: u32) -> R<()> {
    const BY_ID: &str = "nvmlGpuInstanceGetComputeInstanceById";
    const CALL: &str = "nvmlComputeInstanceDestroy";
    let by_id = nvml_sym(dev.nvml().lib().nvmlGpuInstanceGetComputeInstanceById.as_ref()).map_err(at(BY_ID))?;
    let destroy = nvml_sym(dev.nvml().lib().nvmlComputeInstanceDestroy.as_ref()).map_err(at(CALL))?;
    let gi = gi_by_id(dev, gi_id)?;
    let mut ci: nvmlComputeInstance_t = ptr::null_mut();
    // SAFETY: `gi` was just looked up; `ci` is a live out-pointer for one handle.
    nvml_try(unsafe { by_id(gi, ci_id, &mut ci) }).map_err(at(BY_ID))?;
    // SAFETY: `ci` was just looked up and is not used after this call.
    nvml_try(unsafe { destroy(ci) }).map_err(at(CALL))
}

/// GPU and compute instance ids of a MIG device handle.
pub(super) fn mig_device_ids(mig: &Device<'_>) -> R<(u32, u32)> {
    const GI: &str = "nvmlDeviceGetGpuInstanceId";
    const CI: &str = "nvmlDeviceGetComputeInstanceId";
    let gi_f = nvml_sym(mig.nvml().lib().nvmlDeviceGetGpuInstanceId.as_ref()).map_err(at(GI))?;
    let ci_f = nvml_sym(mig.nvml().lib().nvmlDeviceGetComputeInstanceId.as_ref()).map_err(at(CI))?;
    let (mut gi, mut ci): (c_uint, c_uint) = (0, 0);
    // SAFETY: valid MIG device handle; `gi` is a live c_uint.
    nvml_try(unsafe { gi_f(handle(mig), &mut gi) }).map_err(at(GI))?;
    // SAFETY: as above, for `ci`.
    nvml_try(unsafe { ci_f(handle(mig), &mut ci) }).map_err(at(CI))?;
    Ok((gi, ci))
}

/// SM count and memory (MiB) of a device or MIG device (`nvmlDeviceGetAttributes_v2`).
pub(super) fn attributes(dev: &Device<'_>) -> R<(u32, u64)> {
    const CALL: &str = "nvmlDeviceGetAttributes_v2";
    let f = nvml_sym(dev.nvml().lib().nvmlDeviceGetAttributes_v2.as_ref()).map_err(at(CALL))?;
    // SAFETY: a plain C struct of integers, for which all-zero is a valid value.
    let mut attrs: nvmlDeviceAttributes_t = unsafe { mem::zeroed() };
    // SAFETY: valid device handle; `attrs` is a live, writable struct of the type filled.
    nvml_try(unsafe { f(handle(dev), &mut attrs) }).map_err(at(CALL))?;
    Ok((attrs.multiprocessorCount, attrs.memorySizeMB))
}
