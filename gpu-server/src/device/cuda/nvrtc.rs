//! Compiles the built-in module ([`builtin::SOURCE`]) with NVRTC. NVRTC is
//! loaded only when the built-in module is first needed; a server without
//! it still runs uploaded images.

use super::super::{DeviceResult, builtin};
use crate::error::CallError;
use cudarc::nvrtc::sys::{self, nvrtcProgram, nvrtcResult};
use gpupool_proto::cuda;
use std::ffi::{CStr, CString, c_char, c_int};

/// `CUDA_ERROR_JIT_COMPILER_NOT_FOUND`: the closest driver code for a
/// missing NVRTC library.
const JIT_COMPILER_NOT_FOUND: u32 = 221;
/// `CUDA_ERROR_INVALID_SOURCE`: the built-in source did not compile.
const INVALID_SOURCE: u32 = 300;

const REQUIRED_SYMBOLS: &[&str] = &[
    "nvrtcGetErrorString",
    "nvrtcGetNumSupportedArchs",
    "nvrtcGetSupportedArchs",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
];

/// What to ask NVRTC for, given the device's compute capability and the
/// architectures this NVRTC knows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A cubin for the device's own architecture (no JIT at load).
    Cubin(u32),
    /// PTX for an older virtual architecture, JIT-compiled by the driver:
    /// used when NVRTC predates the device.
    Ptx(u32),
}

fn choose_target(compute_capability: (u32, u32), supported: &[u32]) -> Option<Target> {
    let arch = compute_capability.0 * 10 + compute_capability.1;
    if supported.contains(&arch) {
        return Some(Target::Cubin(arch));
    }
    supported.iter().copied().filter(|&a| a <= arch).max().map(Target::Ptx)
}

impl Target {
    fn option(&self) -> String {
        match self {
            Target::Cubin(a) => format!("--gpu-architecture=sm_{a}"),
            Target::Ptx(a) => format!("--gpu-architecture=compute_{a}"),
        }
    }
}

/// Compiles the built-in kernels for a device of `compute_capability`.
/// Returns an image for `cuModuleLoadData` (a cubin, or NUL-terminated PTX).
pub(super) fn compile_builtin(compute_capability: (u32, u32)) -> DeviceResult<Vec<u8>> {
    check_library()?;
    let supported = supported_archs()?;
    let target = choose_target(compute_capability, &supported).ok_or_else(|| {
        CallError::new(
            cuda::NOT_SUPPORTED,
            format!(
                "NVRTC supports none of the architectures up to compute capability {}.{} (it knows {supported:?})",
                compute_capability.0, compute_capability.1
            ),
        )
    })?;
    if let Target::Ptx(a) = target {
        tracing::warn!(
            "NVRTC does not know sm_{}{}: compiling the built-in module to compute_{a} PTX for the driver to JIT",
            compute_capability.0,
            compute_capability.1
        );
    }
    let program = Program::new(builtin::SOURCE, c"gpupool_builtin.cu")?;
    program.compile(&target.option())?;
    match target {
        Target::Cubin(_) => program.cubin(),
        Target::Ptx(_) => program.ptx(),
    }
}

fn check_library() -> DeviceResult<()> {
    // SAFETY: only tries to dlopen the candidate names of libnvrtc.
    if !unsafe { sys::is_culib_present() } {
        return Err(CallError::new(
            JIT_COMPILER_NOT_FOUND,
            "NVRTC not found: libnvrtc.so could not be loaded, so the built-in module cannot be compiled \
             (install the CUDA NVRTC library; uploaded PTX, cubin and fatbin images still work)",
        ));
    }
    for name in REQUIRED_SYMBOLS {
        // SAFETY: the library is present, so `culib` does not panic; the
        // symbol is looked up, never called.
        let found = unsafe { sys::culib().get::<unsafe extern "C" fn()>(name.as_bytes()).is_ok() };
        if !found {
            return Err(CallError::new(JIT_COMPILER_NOT_FOUND, format!("libnvrtc has no {name}: NVRTC is too old")));
        }
    }
    Ok(())
}

fn check(r: nvrtcResult, what: &str) -> DeviceResult<()> {
    if r == nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: returns a pointer to a static NUL-terminated string for any
    // input (library checked present before any NVRTC call).
    let text = unsafe { sys::nvrtcGetErrorString(r) };
    let text = if text.is_null() {
        format!("NVRTC error {}", r as u32)
    } else {
        // SAFETY: non-null static C string.
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    };
    let code = match r {
        nvrtcResult::NVRTC_ERROR_OUT_OF_MEMORY => cuda::OUT_OF_MEMORY,
        nvrtcResult::NVRTC_ERROR_COMPILATION => INVALID_SOURCE,
        _ => cuda::UNKNOWN,
    };
    Err(CallError::new(code, format!("{what}: {text}")))
}

fn supported_archs() -> DeviceResult<Vec<u32>> {
    let mut count: c_int = 0;
    // SAFETY: valid out-pointer.
    check(unsafe { sys::nvrtcGetNumSupportedArchs(&mut count) }, "nvrtcGetNumSupportedArchs")?;
    let mut archs = vec![0 as c_int; usize::try_from(count).unwrap_or(0)];
    if archs.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: `archs` holds exactly the `count` ints NVRTC writes.
    check(unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }, "nvrtcGetSupportedArchs")?;
    Ok(archs.into_iter().filter_map(|a| u32::try_from(a).ok()).collect())
}

/// An NVRTC program, destroyed in `Drop`.
struct Program(nvrtcProgram);

impl Program {
    fn new(source: &str, name: &CStr) -> DeviceResult<Self> {
        let source = CString::new(source).map_err(|_| CallError::invalid_value("kernel source contains a NUL byte"))?;
        let mut program: nvrtcProgram = std::ptr::null_mut();
        // SAFETY: `source` and `name` are NUL-terminated and outlive the
        // call (NVRTC copies them); no headers are passed (count 0, nulls).
        let r = unsafe {
            sys::nvrtcCreateProgram(&mut program, source.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null())
        };
        check(r, "nvrtcCreateProgram")?;
        Ok(Self(program))
    }

    fn compile(&self, arch_option: &str) -> DeviceResult<()> {
        let option =
            CString::new(arch_option).map_err(|_| CallError::invalid_value("NVRTC option contains a NUL byte"))?;
        let pointers: [*const c_char; 1] = [option.as_ptr()];
        // SAFETY: `pointers` holds `len` valid C strings kept alive by
        // `option` for the duration of the call.
        let r = unsafe { sys::nvrtcCompileProgram(self.0, pointers.len() as c_int, pointers.as_ptr()) };
        if r == nvrtcResult::NVRTC_SUCCESS {
            return Ok(());
        }
        let log = self.log();
        check(r, "nvrtcCompileProgram")
            .map_err(|e| CallError::new(e.code, format!("{} ({arch_option}); log:\n{log}", e.message)))
    }

    fn log(&self) -> String {
        let mut size = 0usize;
        // SAFETY: valid out-pointer on a live program.
        if unsafe { sys::nvrtcGetProgramLogSize(self.0, &mut size) } != nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return String::new();
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` has the `size` bytes NVRTC writes (log plus NUL).
        if unsafe { sys::nvrtcGetProgramLog(self.0, buf.as_mut_ptr().cast()) } != nvrtcResult::NVRTC_SUCCESS {
            return String::new();
        }
        String::from_utf8_lossy(buf.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
    }

    fn cubin(&self) -> DeviceResult<Vec<u8>> {
        let mut size = 0usize;
        // SAFETY: valid out-pointer on a compiled program.
        check(unsafe { sys::nvrtcGetCUBINSize(self.0, &mut size) }, "nvrtcGetCUBINSize")?;
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` has the `size` bytes NVRTC writes.
        check(unsafe { sys::nvrtcGetCUBIN(self.0, buf.as_mut_ptr().cast()) }, "nvrtcGetCUBIN")?;
        Ok(buf)
    }

    fn ptx(&self) -> DeviceResult<Vec<u8>> {
        let mut size = 0usize;
        // SAFETY: valid out-pointer on a compiled program.
        check(unsafe { sys::nvrtcGetPTXSize(self.0, &mut size) }, "nvrtcGetPTXSize")?;
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` has the `size` bytes NVRTC writes (PTX plus NUL).
        check(unsafe { sys::nvrtcGetPTX(self.0, buf.as_mut_ptr().cast()) }, "nvrtcGetPTX")?;
        if buf.last() != Some(&0) {
            buf.push(0);
        }
        Ok(buf)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from nvrtcCreateProgram and is destroyed
        // only here.
        let r = unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
        if r != nvrtcResult::NVRTC_SUCCESS {
            tracing::warn!("nvrtcDestroyProgram failed: {r:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_prefers_a_cubin_for_the_device() {
        assert_eq!(choose_target((9, 0), &[75, 80, 86, 89, 90]), Some(Target::Cubin(90)));
        assert_eq!(Target::Cubin(90).option(), "--gpu-architecture=sm_90");
    }

    #[test]
    fn target_falls_back_to_older_ptx() {
        assert_eq!(choose_target((12, 0), &[80, 90, 100]), Some(Target::Ptx(100)));
        assert_eq!(Target::Ptx(100).option(), "--gpu-architecture=compute_100");
        assert_eq!(choose_target((7, 0), &[80, 90]), None);
    }
}
