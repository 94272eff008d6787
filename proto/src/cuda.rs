//! `CUresult` values that gpupool servers send back. They are the CUDA
//! driver's own numbers, so a code passes unchanged from the server's driver to
//! the application.

/// A raw `CUresult`.
pub type CuResult = u32;

pub const SUCCESS: CuResult = 0;
pub const INVALID_VALUE: CuResult = 1;
pub const OUT_OF_MEMORY: CuResult = 2;
pub const NOT_INITIALIZED: CuResult = 3;
pub const DEVICE_UNAVAILABLE: CuResult = 46;
pub const NO_DEVICE: CuResult = 100;
pub const INVALID_IMAGE: CuResult = 200;
pub const INVALID_CONTEXT: CuResult = 201;
pub const FILE_NOT_FOUND: CuResult = 301;
pub const INVALID_HANDLE: CuResult = 400;
pub const NOT_FOUND: CuResult = 500;
pub const NOT_READY: CuResult = 600;
pub const ILLEGAL_ADDRESS: CuResult = 700;
pub const LAUNCH_OUT_OF_RESOURCES: CuResult = 701;
pub const ASSERT: CuResult = 710;
pub const COOPERATIVE_LAUNCH_TOO_LARGE: CuResult = 720;
pub const NOT_PERMITTED: CuResult = 800;
pub const NOT_SUPPORTED: CuResult = 801;
pub const INVALID_CLUSTER_SIZE: CuResult = 912;
pub const UNKNOWN: CuResult = 999;

/// `CU_EVENT_DISABLE_TIMING`: an event that records no time.
pub const EVENT_DISABLE_TIMING: u32 = 0x2;

/// `CU_EVENT_INTERPROCESS`: an event other processes may open (IPC).
pub const EVENT_INTERPROCESS: u32 = 0x4;

/// Whether an event may be created with `flags`, as the driver decides:
/// only `CU_EVENT_BLOCKING_SYNC` (1), `CU_EVENT_DISABLE_TIMING` (2) and
/// `CU_EVENT_INTERPROCESS` (4), the last only with timing disabled.
pub fn event_flags_valid(flags: u32) -> bool {
    flags & !0x7 == 0 && (flags & EVENT_INTERPROCESS == 0 || flags & EVENT_DISABLE_TIMING != 0)
}

/// Whether `code` means the context is lost: a sticky error after which
/// every later call of the context fails too (700 illegal address, 710
/// assert, 714 hardware stack error, 715 illegal instruction, 716
/// misaligned address, 717 invalid address space, 718 invalid PC, 719
/// launch failed), or, under MPS, 810: the MPS server ended the client.
pub fn ends_context(code: CuResult) -> bool {
    matches!(code, 700 | 710 | 714..=719 | 810)
}

/// The name CUDA gives a code (`cuGetErrorName`), for the codes gpupool uses.
pub fn name(code: CuResult) -> &'static str {
    match code {
        SUCCESS => "CUDA_SUCCESS",
        INVALID_VALUE => "CUDA_ERROR_INVALID_VALUE",
        OUT_OF_MEMORY => "CUDA_ERROR_OUT_OF_MEMORY",
        NOT_INITIALIZED => "CUDA_ERROR_NOT_INITIALIZED",
        DEVICE_UNAVAILABLE => "CUDA_ERROR_DEVICE_UNAVAILABLE",
        NO_DEVICE => "CUDA_ERROR_NO_DEVICE",
        INVALID_IMAGE => "CUDA_ERROR_INVALID_IMAGE",
        INVALID_CONTEXT => "CUDA_ERROR_INVALID_CONTEXT",
        FILE_NOT_FOUND => "CUDA_ERROR_FILE_NOT_FOUND",
        INVALID_HANDLE => "CUDA_ERROR_INVALID_HANDLE",
        NOT_FOUND => "CUDA_ERROR_NOT_FOUND",
        NOT_READY => "CUDA_ERROR_NOT_READY",
        ILLEGAL_ADDRESS => "CUDA_ERROR_ILLEGAL_ADDRESS",
        ASSERT => "CUDA_ERROR_ASSERT",
        LAUNCH_OUT_OF_RESOURCES => "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        COOPERATIVE_LAUNCH_TOO_LARGE => "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE",
        INVALID_CLUSTER_SIZE => "CUDA_ERROR_INVALID_CLUSTER_SIZE",
        NOT_PERMITTED => "CUDA_ERROR_NOT_PERMITTED",
        NOT_SUPPORTED => "CUDA_ERROR_NOT_SUPPORTED",
        UNKNOWN => "CUDA_ERROR_UNKNOWN",
        _ => "CUDA_ERROR_(other)",
    }
}
