//! The crate's one error type, converted to an `nvmlReturn_t` once, at the
//! border (`crate::abi::entry`); and the text `nvmlErrorString` gives for
//! each code.

use nvml_wrapper_sys::bindings as nv;
use std::ffi::CStr;

/// Why an NVML call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `nvmlInit` has not been called, or every init has been shut down.
    #[error("NVML is not initialized")]
    Uninitialized,
    /// The caller broke the call's contract: a null pointer, an unknown
    /// device handle, an index past the device count, a malformed string.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The virtual GPU cannot answer this question from the client.
    #[error("not supported")]
    NotSupported,
    /// No device matches the UUID or PCI bus id asked for.
    #[error("no such device")]
    NotFound,
    /// The caller's buffer cannot hold the answer; `needed` bytes would.
    #[error("buffer too small: {needed} bytes needed")]
    InsufficientSize {
        /// Bytes the answer takes, its terminating NUL included.
        needed: usize,
    },
    /// A versioned struct carries a version this library does not know.
    #[error("struct version {0:#x} is not supported")]
    VersionMismatch(u32),
    /// `libcuda.so.1` cannot be loaded or initialized: the pool is not
    /// reachable, or the library is missing or incomplete.
    #[error("the CUDA driver is not available: {0}")]
    DriverNotLoaded(String),
    /// A driver call failed after initialization; `code` is its raw
    /// `CUresult`, kept so the log says exactly what the driver said.
    #[error("{call} failed with CUDA error {code}")]
    Cuda {
        /// The driver entry point.
        call: &'static str,
        /// Its `CUresult`.
        code: u32,
    },
}

/// `CUresult` values this crate tells apart (cuda.h).
mod cu {
    pub(super) const OUT_OF_MEMORY: u32 = 2;
    pub(super) const NOT_INITIALIZED: u32 = 3;
    pub(super) const DEINITIALIZED: u32 = 4;
    pub(super) const DEVICE_UNAVAILABLE: u32 = 46;
    pub(super) const NO_DEVICE: u32 = 100;
    pub(super) const INVALID_DEVICE: u32 = 101;
    pub(super) const NOT_SUPPORTED: u32 = 801;
}

impl Error {
    /// The `nvmlReturn_t` the application gets.
    pub fn code(&self) -> nv::nvmlReturn_t {
        match self {
            Error::Uninitialized => nv::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED,
            Error::InvalidArgument(_) => nv::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT,
            Error::NotSupported => nv::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
            Error::NotFound => nv::nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
            Error::InsufficientSize { .. } => nv::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE,
            Error::VersionMismatch(_) => nv::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
            Error::DriverNotLoaded(_) => nv::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED,
            Error::Cuda { code, .. } => match *code {
                cu::OUT_OF_MEMORY => nv::nvmlReturn_enum_NVML_ERROR_MEMORY,
                // gpupool's libcuda answers these when the session to the
                // pool is gone: for NVML the GPU has fallen off the bus.
                cu::DEVICE_UNAVAILABLE | cu::DEINITIALIZED => nv::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST,
                cu::NOT_INITIALIZED | cu::NO_DEVICE => nv::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED,
                cu::INVALID_DEVICE => nv::nvmlReturn_enum_NVML_ERROR_GPU_NOT_FOUND,
                cu::NOT_SUPPORTED => nv::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
                _ => nv::nvmlReturn_enum_NVML_ERROR_UNKNOWN,
            },
        }
    }
}

/// The text of an NVML return code, worded as NVML words it (programs show
/// it to people; pynvml puts it in its exception messages). An unknown code
/// reads as NVML's "Unknown Error".
pub fn error_string(code: nv::nvmlReturn_t) -> &'static CStr {
    match code {
        nv::nvmlReturn_enum_NVML_SUCCESS => c"Success",
        nv::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        nv::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        nv::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        nv::nvmlReturn_enum_NVML_ERROR_NO_PERMISSION => c"Insufficient Permissions",
        nv::nvmlReturn_enum_NVML_ERROR_ALREADY_INITIALIZED => c"Already Initialized",
        nv::nvmlReturn_enum_NVML_ERROR_NOT_FOUND => c"Not Found",
        nv::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        nv::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_POWER => c"Insufficient External Power",
        nv::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        nv::nvmlReturn_enum_NVML_ERROR_TIMEOUT => c"Timeout",
        nv::nvmlReturn_enum_NVML_ERROR_IRQ_ISSUE => c"Interrupt Request Issue",
        nv::nvmlReturn_enum_NVML_ERROR_LIBRARY_NOT_FOUND => c"NVML Shared Library Not Found",
        nv::nvmlReturn_enum_NVML_ERROR_FUNCTION_NOT_FOUND => c"Function Not Found",
        nv::nvmlReturn_enum_NVML_ERROR_CORRUPTED_INFOROM => c"Corrupted infoROM",
        nv::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        nv::nvmlReturn_enum_NVML_ERROR_RESET_REQUIRED => c"GPU requires restart",
        nv::nvmlReturn_enum_NVML_ERROR_OPERATING_SYSTEM => c"The operating system has blocked the request.",
        nv::nvmlReturn_enum_NVML_ERROR_LIB_RM_VERSION_MISMATCH => c"RM has detected an NVML/RM version mismatch.",
        nv::nvmlReturn_enum_NVML_ERROR_IN_USE => c"In use by another client",
        nv::nvmlReturn_enum_NVML_ERROR_MEMORY => c"Insufficient Memory",
        nv::nvmlReturn_enum_NVML_ERROR_NO_DATA => c"No data",
        nv::nvmlReturn_enum_NVML_ERROR_VGPU_ECC_NOT_SUPPORTED => {
            c"The requested vgpu operation is not available on target device, because ECC is enabled"
        }
        nv::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES => c"Ran out of critical resources, other than memory",
        nv::nvmlReturn_enum_NVML_ERROR_FREQ_NOT_SUPPORTED => c"The requested frequency is not supported",
        nv::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        nv::nvmlReturn_enum_NVML_ERROR_DEPRECATED => c"The requested functionality has been deprecated",
        nv::nvmlReturn_enum_NVML_ERROR_NOT_READY => c"The system is not ready for the request",
        nv::nvmlReturn_enum_NVML_ERROR_GPU_NOT_FOUND => c"No GPUs were found",
        nv::nvmlReturn_enum_NVML_ERROR_INVALID_STATE => c"Resource not in correct state to perform requested operation",
        nv::nvmlReturn_enum_NVML_ERROR_RESET_TYPE_NOT_SUPPORTED => c"Reset type not supported",
        _ => c"Unknown Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(Error::InvalidArgument("x").code(), 2);
        assert_eq!(Error::Uninitialized.code(), 1);
        assert_eq!(Error::NotSupported.code(), 3);
        assert_eq!(Error::InsufficientSize { needed: 9 }.code(), 7);
        assert_eq!(Error::DriverNotLoaded("x".into()).code(), 9);
        assert_eq!(Error::VersionMismatch(1).code(), 25);
        assert_eq!(Error::Cuda { call: "cuMemGetInfo_v2", code: 46 }.code(), 15);
        assert_eq!(Error::Cuda { call: "cuMemGetInfo_v2", code: 2 }.code(), 20);
        assert_eq!(Error::Cuda { call: "cuMemGetInfo_v2", code: 12345 }.code(), 999);
    }

    #[test]
    fn strings() {
        assert_eq!(error_string(0), c"Success");
        assert_eq!(error_string(2), c"Invalid Argument");
        assert_eq!(error_string(3), c"Not Supported");
        assert_eq!(error_string(9), c"Driver Not Loaded");
        assert_eq!(error_string(999), c"Unknown Error");
        assert_eq!(error_string(4242), c"Unknown Error");
        // Every code NVML defines has its own text.
        for code in 1..=30 {
            assert_ne!(error_string(code), c"Unknown Error", "code {code}");
        }
    }
}
