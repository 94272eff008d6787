//! Initialization, error strings and system-wide queries.
//!
//! The driver version: NVIDIA's NVML reports the kernel driver's version
//! (e.g. "580.65.06"). A gpupool client has no kernel driver; the GPU it
//! uses is driven by the server's, whose version the server reads with
//! NVML and sends in the session's `Welcome` (`gpupool_host_facts`), so
//! that is what this NVML reports, as NVML on the GPU's host would:
//! programs parse it (XLA reads it as dotted numbers and logs an error for
//! anything else). Where the server did not say (the emulated device), it
//! reports the CUDA driver API version of `libcuda.so.1`
//! (`cuDriverGetVersion`) as `MAJOR.MINOR.0+gpupool`, e.g.
//! "13.0.0+gpupool": dotted numbers first, and a build tag that semver and
//! Python's `packaging` (PEP 440 local version) both parse, naming what it
//! is, rather than some NVIDIA release number that tools would act on.
//! `nvmlSystemGetNVMLVersion`, whose real form is the CUDA major version
//! followed by the driver version, is "13.580.65.06" or "13.0.0+gpupool".

use crate::abi::{guard, put, put_str};
use crate::error::{Error, error_string};
use crate::state;
use nvml_wrapper_sys::bindings as nv;
use std::ffi::{c_char, c_int, c_uint};

/// The driver (and NVML) version text for a `cuDriverGetVersion` value,
/// where the server's kernel driver version is not known.
pub(crate) fn version_text(cuda_version: i32) -> String {
    format!("{}.{}.0+gpupool", cuda_version / 1000, (cuda_version % 1000) / 10)
}

/// `nvmlSystemGetDriverVersion`'s text.
fn driver_version(system: &state::System) -> String {
    match system.kernel_driver_version() {
        Some(v) => v,
        None => version_text(system.cuda_version),
    }
}

/// `nvmlSystemGetNVMLVersion`'s text: the CUDA major version, then the
/// driver version.
fn nvml_version(system: &state::System) -> String {
    match system.kernel_driver_version() {
        Some(v) => format!("{}.{v}", system.cuda_version / 1000),
        None => version_text(system.cuda_version),
    }
}

/// Every `nvmlInit` flavour: the flags only relax what NVIDIA's NVML
/// checks on the local GPUs (`NO_GPUS`, `NO_ATTACH`); a gpupool process
/// always has the virtual GPU or nothing, so they change nothing here.
fn init(flags: c_uint) -> Result<(), Error> {
    let known = nv::NVML_INIT_FLAG_NO_GPUS | nv::NVML_INIT_FLAG_NO_ATTACH;
    if flags & !known != 0 {
        tracing::debug!(flags, "nvmlInitWithFlags: ignoring unknown flags");
    }
    match state::init() {
        Ok(system) => {
            tracing::debug!(devices = system.gpus.len(), cuda = system.cuda_version, "NVML initialized");
            Ok(())
        }
        Err(e) => {
            // On stderr whatever GPUPOOL_LOG says: a tool that finds no GPU
            // must say why, and NVML's code alone ("Driver Not Loaded")
            // does not name the pool.
            eprintln!(
                "gpupool libnvidia-ml: no GPU: {e}; nvmlInit returns {}",
                error_string(e.code()).to_string_lossy()
            );
            Err(e)
        }
    }
}

exports! {
    fn nvmlInit() {
        init(0)
    }

    fn nvmlInit_v2() {
        init(0)
    }

    fn nvmlInitWithFlags(flags: c_uint) {
        init(flags)
    }

    fn nvmlShutdown() {
        state::shutdown()
    }

    fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) {
        let system = state::system()?;
        // SAFETY: `version` holds `length` bytes per NVML's contract.
        unsafe { put_str(version, length, &driver_version(system)) }
    }

    fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) {
        let system = state::system()?;
        // SAFETY: `version` holds `length` bytes per NVML's contract.
        unsafe { put_str(version, length, &nvml_version(system)) }
    }

    fn nvmlSystemGetCudaDriverVersion(cudaDriverVersion: *mut c_int) {
        let system = state::system()?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(cudaDriverVersion, system.cuda_version) }
    }

    fn nvmlSystemGetCudaDriverVersion_v2(cudaDriverVersion: *mut c_int) {
        let system = state::system()?;
        // SAFETY: out-pointer per NVML's contract.
        unsafe { put(cudaDriverVersion, system.cuda_version) }
    }
}

/// The text of a return code; valid forever, needs no init (NVML's own
/// contract: callers use it to report a failed `nvmlInit`).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: nv::nvmlReturn_t) -> *const c_char {
    guard("nvmlErrorString", c"Unknown Error".as_ptr(), || error_string(result).as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_texts() {
        assert_eq!(version_text(13000), "13.0.0+gpupool");
        assert_eq!(version_text(12080), "12.8.0+gpupool");
    }

    #[test]
    fn error_string_export() {
        // SAFETY: the pointer is to a 'static NUL-terminated string.
        let text = unsafe { std::ffi::CStr::from_ptr(nvmlErrorString(2)) };
        assert_eq!(text, c"Invalid Argument");
    }
}
