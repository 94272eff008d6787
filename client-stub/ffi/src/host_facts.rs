//! `gpupool_host_facts`: how the stub's `libnvidia-ml.so.1` asks the
//! stub's `libcuda.so.1` for what NVIDIA's NVML on the GPU's host says and
//! the CUDA driver API has no call for (the kernel driver's version, the
//! GPU's PCIe link). The server reads them when it opens the device and
//! sends them in the session's `Welcome`.
//!
//! ```c
//! CUresult gpupool_host_facts(CUdevice dev, HostFacts *out, size_t size);
//! ```
//! `size` is `sizeof(HostFacts)` as the caller knows it; a library of
//! another layout answers `CUDA_ERROR_INVALID_VALUE` rather than write
//! past it. The function is not a CUDA entry point and is not offered by
//! `cuGetProcAddress`; NVIDIA's libcuda lacks it, so NVML looks it up and
//! does without it.

use std::ffi::c_char;

/// The symbol's name.
pub const SYMBOL: &str = "gpupool_host_facts";

/// Bytes of the driver version text, its NUL included (NVML's
/// `NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE`).
pub const DRIVER_VERSION_BYTES: usize = 80;

/// The answer. Every figure is 0 (the text empty) where the server does
/// not know it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// NUL-terminated, e.g. "580.159.04".
    pub kernel_driver_version: [c_char; DRIVER_VERSION_BYTES],
    pub pcie_max_generation: u32,
    pub pcie_max_width: u32,
    pub pcie_current_generation: u32,
    pub pcie_current_width: u32,
    /// `nvmlDeviceGetPcieLinkMaxSpeed`'s value (MT/s per lane).
    pub pcie_max_speed: u32,
    /// `nvmlDeviceGetPcieSpeed`'s value.
    pub pcie_current_speed: u32,
}

impl Default for HostFacts {
    fn default() -> Self {
        HostFacts {
            kernel_driver_version: [0; DRIVER_VERSION_BYTES],
            pcie_max_generation: 0,
            pcie_max_width: 0,
            pcie_current_generation: 0,
            pcie_current_width: 0,
            pcie_max_speed: 0,
            pcie_current_speed: 0,
        }
    }
}

impl HostFacts {
    /// Sets the driver version, cut to fit with its NUL; a text with a NUL
    /// inside ends there.
    pub fn set_kernel_driver_version(&mut self, text: &str) {
        let bytes = text.as_bytes();
        let n = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len()).min(DRIVER_VERSION_BYTES - 1);
        self.kernel_driver_version = [0; DRIVER_VERSION_BYTES];
        for (dst, src) in self.kernel_driver_version.iter_mut().zip(&bytes[..n]) {
            *dst = *src as c_char;
        }
    }

    /// The driver version; `None` where empty.
    pub fn kernel_driver_version(&self) -> Option<String> {
        let n = self.kernel_driver_version.iter().position(|b| *b == 0).unwrap_or(DRIVER_VERSION_BYTES);
        let bytes: Vec<u8> = self.kernel_driver_version[..n].iter().map(|b| *b as u8).collect();
        (n > 0).then(|| String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_version_round_trips_and_is_bounded() {
        let mut f = HostFacts::default();
        assert_eq!(f.kernel_driver_version(), None);
        f.set_kernel_driver_version("580.159.04");
        assert_eq!(f.kernel_driver_version().as_deref(), Some("580.159.04"));
        f.set_kernel_driver_version(&"9".repeat(500));
        assert_eq!(f.kernel_driver_version().map(|s| s.len()), Some(DRIVER_VERSION_BYTES - 1));
        f.set_kernel_driver_version("1.2\0.3");
        assert_eq!(f.kernel_driver_version().as_deref(), Some("1.2"));
        f.set_kernel_driver_version("");
        assert_eq!(f.kernel_driver_version(), None);
    }
}
