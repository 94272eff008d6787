//! Thin helpers over cudarc's `driver::sys`: turning `CUresult`s into
//! [`CallError`]s (raw code kept), finding the driver library without
//! letting cudarc panic, and the few raw entry points that cudarc's typed
//! signatures cannot express.

use super::super::{DeviceResult, TENSOR_MAP_BYTES, TensorMapRequest};
use crate::error::CallError;
use cudarc::driver::sys::{self, CUresult};
use gpupool_proto::cuda;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};

/// Every driver entry point this backend calls. cudarc resolves symbols
/// lazily and panics on a missing one, so [`check_driver`] looks them all up
/// before the first call.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuGetErrorName",
    "cuDriverGetVersion",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetUuid_v2",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemGetAllocationGranularity",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
    "cuMemRelease",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyDtoD_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemsetD8_v2",
    "cuMemsetD16_v2",
    "cuMemsetD32_v2",
    "cuMemsetD8Async",
    "cuMemsetD16Async",
    "cuMemsetD32Async",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuModuleGetFunctionCount",
    "cuModuleEnumerateFunctions",
    "cuFuncGetName",
    "cuFuncGetParamInfo",
    "cuFuncGetAttribute",
    "cuFuncSetAttribute",
    "cuModuleGetGlobal_v2",
    "cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags",
    "cuOccupancyMaxPotentialBlockSizeWithFlags",
    "cuOccupancyAvailableDynamicSMemPerBlock",
    "cuFuncLoad",
    "cuLaunchKernel",
    "cuStreamCreateWithPriority",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamQuery",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventElapsedTime_v2",
    "cuEventDestroy_v2",
];

/// Makes sure `libcuda` can be loaded and has every entry point we use, so
/// that no later cudarc call can panic on a missing library or symbol.
pub(super) fn check_driver() -> DeviceResult<()> {
    // SAFETY: `is_culib_present` only tries to dlopen the candidate names
    // and drops what it opened; loading libcuda runs no user-visible code.
    if !unsafe { sys::is_culib_present() } {
        return Err(CallError::new(
            cuda::NO_DEVICE,
            "no CUDA driver found: libcuda.so could not be loaded (is the NVIDIA driver installed and on the library path?)",
        ));
    }
    if let Some(missing) = REQUIRED_SYMBOLS.iter().find(|name| !has_symbol(name)) {
        return Err(CallError::new(
            cuda::NOT_SUPPORTED,
            format!("the CUDA driver is too old: libcuda has no {missing} (gpupool needs a CUDA 12.8 or newer driver)"),
        ));
    }
    Ok(())
}

fn has_symbol(name: &str) -> bool {
    // SAFETY: the library is present (checked by the caller), so `culib`
    // does not panic; the symbol is only looked up, never called, so the
    // pointer type is irrelevant.
    unsafe { sys::culib().get::<unsafe extern "C" fn()>(name.as_bytes()).is_ok() }
}

/// `Ok` on success, else the raw code and `what: CUDA_ERROR_NAME`.
pub(super) fn check(r: CUresult, what: &str) -> DeviceResult<()> {
    if r == CUresult::CUDA_SUCCESS { Ok(()) } else { Err(error(r, what)) }
}

/// The [`CallError`] of a failed driver call.
pub(super) fn error(r: CUresult, what: &str) -> CallError {
    error_of_code(r as u32, what)
}

/// The [`CallError`] of an entry point called through a raw signature.
pub(super) fn error_of_raw(r: c_int, what: &str) -> CallError {
    error_of_code(r as u32, what)
}

fn error_of_code(code: u32, what: &str) -> CallError {
    CallError::new(code, format!("{what}: {}", error_name(code)))
}

/// As [`check`], for entry points called through raw signatures, whose
/// result is a plain int (kept as is: it may be a code cudarc lacks).
fn check_raw(r: c_int, what: &str) -> DeviceResult<()> {
    if r == 0 { Ok(()) } else { Err(error_of_code(r as u32, what)) }
}

/// Logs the failure of a release call made from `Drop`, which has no caller
/// to return it to.
pub(super) fn warn_on_error(r: CUresult, what: &str) {
    if r != CUresult::CUDA_SUCCESS {
        let code = r as u32;
        tracing::warn!(code, "{what} failed while releasing a resource: {}", error_name(code));
    }
}

/// `true` for `CUDA_SUCCESS`, `false` for `CUDA_ERROR_NOT_READY`, else the
/// error: the answer of the `*Query` calls.
pub(super) fn check_ready(r: CUresult, what: &str) -> DeviceResult<bool> {
    match r {
        CUresult::CUDA_SUCCESS => Ok(true),
        CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        other => Err(error(other, what)),
    }
}

/// The driver's name of `code` (`CUDA_ERROR_OUT_OF_MEMORY`), or a made-up
/// one for codes the driver does not know.
fn error_name(code: u32) -> String {
    type GetErrorName = unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int;
    // The raw entry point takes the code as a plain int, so codes that
    // cudarc's `CUresult` enum lacks can still be named.
    // SAFETY: only called after `check_driver` succeeded (every error comes
    // from a driver call), so the library is loaded; the signature matches
    // `CUresult cuGetErrorName(CUresult, const char**)`, an enum being an
    // int in the C ABI.
    let get = unsafe { sys::culib().get::<GetErrorName>(b"cuGetErrorName") };
    let Ok(get) = get else {
        return format!("CUDA_ERROR_{code}");
    };
    let mut name: *const c_char = std::ptr::null();
    // SAFETY: `name` is a valid out-pointer; the driver stores a pointer to
    // a static NUL-terminated string on success.
    let r = unsafe { get(code as c_int, &mut name) };
    if r != 0 || name.is_null() {
        return format!("unknown CUDA error {code}");
    }
    // SAFETY: non-null on success, pointing at a static C string.
    unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

/// `cuDeviceGetAttribute` with the attribute as a plain integer: the
/// attribute table covers every number the driver answers, including ones
/// newer than cudarc's enum (building an enum from an unlisted number would
/// be undefined behaviour). Returns `None` where the driver refuses.
pub(super) fn device_attribute(device: sys::CUdevice, attribute: u32) -> Option<i32> {
    type GetAttribute = unsafe extern "C" fn(*mut c_int, c_int, sys::CUdevice) -> c_int;
    // SAFETY: called after `check_driver` (library loaded); the signature
    // matches `CUresult cuDeviceGetAttribute(int*, CUdevice_attribute,
    // CUdevice)`, enums being ints in the C ABI.
    let get = unsafe { sys::culib().get::<GetAttribute>(b"cuDeviceGetAttribute") }.ok()?;
    let attribute = c_int::try_from(attribute).ok()?;
    let mut value: c_int = 0;
    // SAFETY: `value` is a valid out-pointer; an unknown attribute makes
    // the driver return CUDA_ERROR_INVALID_VALUE, nothing worse.
    let r = unsafe { get(&mut value, attribute, device) };
    (r == 0).then_some(value)
}

/// `cuGetErrorString` for every code in `codes` the driver knows, with
/// the codes as plain integers (same reason as [`device_attribute`]).
pub(super) fn error_strings(codes: std::ops::Range<u32>) -> Vec<(u32, String)> {
    type GetErrorString = unsafe extern "C" fn(c_int, *mut *const std::ffi::c_char) -> c_int;
    // SAFETY: called after `check_driver`; the signature matches
    // `CUresult cuGetErrorString(CUresult, const char**)`.
    let Ok(get) = (unsafe { sys::culib().get::<GetErrorString>(b"cuGetErrorString") }) else {
        return Vec::new();
    };
    let text = |code: u32| {
        let mut text: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: valid out-pointer; unknown codes return an error.
        let r = unsafe { get(c_int::try_from(code).ok()?, &mut text) };
        if r != 0 || text.is_null() {
            return None;
        }
        // SAFETY: the driver returns a static NUL-terminated string.
        Some(unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy().into_owned())
    };
    codes.filter_map(|c| text(c).map(|t| (c, t))).collect()
}

/// `cuFuncGetAttribute` with the attribute as a plain integer, for the
/// same reason as [`device_attribute`]. Returns `None` where the driver
/// refuses (an attribute this driver does not know, or one that does not
/// apply). `function` must be a loaded function of a live module.
pub(super) fn function_attribute(function: sys::CUfunction, attribute: u32) -> Option<i32> {
    type GetAttribute = unsafe extern "C" fn(*mut c_int, c_int, sys::CUfunction) -> c_int;
    // SAFETY: called after `check_driver` (library loaded); the signature
    // matches `CUresult cuFuncGetAttribute(int*, CUfunction_attribute,
    // CUfunction)`, enums being ints in the C ABI.
    let get = unsafe { sys::culib().get::<GetAttribute>(b"cuFuncGetAttribute") }.ok()?;
    let attribute = c_int::try_from(attribute).ok()?;
    let mut value: c_int = 0;
    // SAFETY: `value` is a valid out-pointer and `function` a live handle
    // (caller's contract); an unknown attribute makes the driver return
    // CUDA_ERROR_INVALID_VALUE, nothing worse.
    let r = unsafe { get(&mut value, attribute, function) };
    (r == 0).then_some(value)
}

/// `cuFuncSetAttribute` with the attribute as a plain integer: it comes
/// from the wire, and building cudarc's enum from a number it does not list
/// would be undefined behaviour. The driver validates attribute and value.
/// `function` must be a loaded function of a live module.
pub(super) fn set_function_attribute(function: sys::CUfunction, attribute: u32, value: i32) -> DeviceResult<()> {
    type SetAttribute = unsafe extern "C" fn(sys::CUfunction, c_int, c_int) -> c_int;
    let what = "cuFuncSetAttribute";
    let attribute = c_int::try_from(attribute)
        .map_err(|_| CallError::invalid_value(format!("{what}: no function attribute {attribute}")))?;
    // SAFETY: called after `check_driver` (library loaded); the signature
    // matches `CUresult cuFuncSetAttribute(CUfunction, CUfunction_attribute,
    // int)`, enums being ints in the C ABI.
    let set = unsafe { sys::culib().get::<SetAttribute>(b"cuFuncSetAttribute") }
        .map_err(|_| CallError::new(cuda::NOT_SUPPORTED, format!("libcuda has no {what}")))?;
    // SAFETY: `function` is a live handle (caller's contract); an unknown
    // attribute or a value out of range makes the driver return
    // CUDA_ERROR_INVALID_VALUE.
    check_raw(unsafe { set(function, attribute, value) }, what)
}

/// `cuModuleGetGlobal_v2`: address and size of the module variable `name`.
/// `module` must be a live module of the current context.
pub(super) fn module_global(module: sys::CUmodule, name: &CStr) -> DeviceResult<(u64, u64)> {
    let (mut addr, mut size): (sys::CUdeviceptr, usize) = (0, 0);
    // SAFETY: valid out-pointers; `name` is NUL-terminated and outlives the
    // call; `module` is live (caller's contract). A missing name is
    // CUDA_ERROR_NOT_FOUND.
    let r = unsafe { sys::cuModuleGetGlobal_v2(&mut addr, &mut size, module, name.as_ptr()) };
    check(r, "cuModuleGetGlobal_v2")?;
    Ok((addr, size as u64))
}

/// Whether `addr` is managed memory (`CU_POINTER_ATTRIBUTE_IS_MANAGED`);
/// `false` where the driver cannot say.
pub(super) fn is_managed(addr: u64) -> bool {
    let mut managed: c_uint = 0;
    // SAFETY: the attribute is a 32-bit boolean written to a valid
    // out-pointer; any address may be asked about.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&mut managed as *mut c_uint).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_MANAGED,
            addr,
        )
    };
    r == sys::CUresult::CUDA_SUCCESS && managed != 0
}

/// `cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags`: resident blocks
/// per multiprocessor. `function` must be a loaded function of a live module.
pub(super) fn occupancy_active_blocks(
    function: sys::CUfunction,
    block_size: c_int,
    dynamic_smem: usize,
    flags: c_uint,
) -> DeviceResult<i32> {
    let mut blocks: c_int = 0;
    // SAFETY: valid out-pointer and live function handle; the driver
    // validates the sizes and flags.
    let r = unsafe {
        sys::cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
            &mut blocks,
            function,
            block_size,
            dynamic_smem,
            flags,
        )
    };
    check(r, "cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags")?;
    Ok(blocks)
}

/// `cuOccupancyMaxPotentialBlockSizeWithFlags` with a fixed dynamic shared
/// memory size (no per-block-size callback: it would be client code):
/// `(minimal grid size, block size)`. `function` must be a loaded function
/// of a live module.
pub(super) fn occupancy_potential_block_size(
    function: sys::CUfunction,
    dynamic_smem: usize,
    block_size_limit: c_int,
    flags: c_uint,
) -> DeviceResult<(i32, i32)> {
    let (mut min_grid, mut block): (c_int, c_int) = (0, 0);
    // SAFETY: valid out-pointers and live function handle; a null callback
    // makes the driver use `dynamic_smem` for every block size.
    let r = unsafe {
        sys::cuOccupancyMaxPotentialBlockSizeWithFlags(
            &mut min_grid,
            &mut block,
            function,
            None,
            dynamic_smem,
            block_size_limit,
            flags,
        )
    };
    check(r, "cuOccupancyMaxPotentialBlockSizeWithFlags")?;
    Ok((min_grid, block))
}

/// `cuOccupancyAvailableDynamicSMemPerBlock`: bytes of dynamic shared
/// memory per block that still let `num_blocks` blocks of `block_size`
/// threads reside on one multiprocessor. `function` must be a loaded
/// function of a live module.
pub(super) fn occupancy_available_dynamic_smem(
    function: sys::CUfunction,
    num_blocks: c_int,
    block_size: c_int,
) -> DeviceResult<usize> {
    let mut bytes: usize = 0;
    // SAFETY: valid out-pointer and live function handle; the driver
    // validates the counts.
    let r = unsafe { sys::cuOccupancyAvailableDynamicSMemPerBlock(&mut bytes, function, num_blocks, block_size) };
    check(r, "cuOccupancyAvailableDynamicSMemPerBlock")?;
    Ok(bytes)
}

/// A launch configuration of this shape for an occupancy query, with at
/// most one attribute (which must outlive the configuration's use).
fn shape_config(
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem: u32,
    attribute: Option<&mut sys::CUlaunchAttribute>,
) -> sys::CUlaunchConfig {
    let num_attrs = u32::from(attribute.is_some());
    sys::CUlaunchConfig {
        gridDimX: grid[0],
        gridDimY: grid[1],
        gridDimZ: grid[2],
        blockDimX: block[0],
        blockDimY: block[1],
        blockDimZ: block[2],
        sharedMemBytes: dynamic_smem,
        hStream: std::ptr::null_mut(),
        attrs: attribute.map_or(std::ptr::null_mut(), std::ptr::from_mut),
        numAttrs: num_attrs,
    }
}

/// `cuOccupancyMaxActiveClusters` for a launch of this shape; a zero
/// `cluster` means the function's own (compile-time) cluster shape.
pub(super) fn occupancy_active_clusters(
    function: sys::CUfunction,
    grid: [u32; 3],
    block: [u32; 3],
    cluster: [u32; 3],
    dynamic_smem: u32,
) -> DeviceResult<i32> {
    // SAFETY: an all-zero launch attribute is a valid value (id 0, IGNORE).
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attribute.value.clusterDim.x = cluster[0];
    attribute.value.clusterDim.y = cluster[1];
    attribute.value.clusterDim.z = cluster[2];
    let with_cluster = cluster.iter().all(|&c| c > 0);
    let config = shape_config(grid, block, dynamic_smem, with_cluster.then_some(&mut attribute));
    let mut clusters: c_int = 0;
    // SAFETY: valid out-pointer, live function and a config whose attribute
    // pointer (if any) outlives the call; the driver validates the shape.
    let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, function, &config) };
    check(r, "cuOccupancyMaxActiveClusters")?;
    Ok(clusters)
}

/// `cuOccupancyMaxPotentialClusterSize` for a launch of this shape.
pub(super) fn occupancy_potential_cluster_size(
    function: sys::CUfunction,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem: u32,
) -> DeviceResult<i32> {
    let config = shape_config(grid, block, dynamic_smem, None);
    let mut size: c_int = 0;
    // SAFETY: valid out-pointer, live function and a config without
    // attributes; the driver validates the shape.
    let r = unsafe { sys::cuOccupancyMaxPotentialClusterSize(&mut size, function, &config) };
    check(r, "cuOccupancyMaxPotentialClusterSize")?;
    Ok(size)
}

/// Formats a device UUID as NVML and `nvidia-smi` do.
pub(super) fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex = |range: std::ops::Range<usize>| bytes[range].iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
}

/// `cuTensorMapEncodeTiled`, `cuTensorMapEncodeIm2col` or
/// `cuTensorMapReplaceAddress` with the enumerated arguments as plain
/// integers (they come from the wire; the driver validates them). The
/// request's vectors have the lengths its rank asks for (checked by the
/// session).
pub(super) fn tensor_map(request: &TensorMapRequest) -> DeviceResult<[u8; TENSOR_MAP_BYTES]> {
    type Tiled = unsafe extern "C" fn(
        *mut c_void,
        c_uint,
        c_uint,
        *mut c_void,
        *const u64,
        *const u64,
        *const u32,
        *const u32,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
    ) -> c_int;
    type Im2col = unsafe extern "C" fn(
        *mut c_void,
        c_uint,
        c_uint,
        *mut c_void,
        *const u64,
        *const u64,
        *const c_int,
        *const c_int,
        c_uint,
        c_uint,
        *const u32,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
    ) -> c_int;
    type Replace = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;
    // 64-byte aligned, as CUtensorMap is.
    #[repr(C, align(64))]
    struct Map([u8; TENSOR_MAP_BYTES]);
    let mut map = Map([0; TENSOR_MAP_BYTES]);
    let missing = |what: &str| CallError::new(cuda::NOT_SUPPORTED, format!("libcuda has no {what}"));
    let (r, what) = match request {
        TensorMapRequest::Tiled { common: c, box_dim } => {
            let what = "cuTensorMapEncodeTiled";
            // SAFETY: library loaded (every backend call follows
            // `check_driver`); the signature is the C one, enums as ints.
            let f = unsafe { sys::culib().get::<Tiled>(what.as_bytes()) }.map_err(|_| missing(what))?;
            // SAFETY: every array holds what the rank asks for (checked by
            // the caller); `map` is a writable, aligned CUtensorMap.
            let r = unsafe {
                f(
                    map.0.as_mut_ptr().cast(),
                    c.data_type,
                    c.global_dim.len() as c_uint,
                    c.global_address as *mut c_void,
                    c.global_dim.as_ptr(),
                    c.global_strides.as_ptr(),
                    box_dim.as_ptr(),
                    c.element_strides.as_ptr(),
                    c.interleave,
                    c.swizzle,
                    c.l2_promotion,
                    c.oob_fill,
                )
            };
            (r, what)
        }
        TensorMapRequest::Im2col { common: c, lower, upper, channels_per_pixel, pixels_per_column } => {
            let what = "cuTensorMapEncodeIm2col";
            // SAFETY: as above.
            let f = unsafe { sys::culib().get::<Im2col>(what.as_bytes()) }.map_err(|_| missing(what))?;
            // SAFETY: as above; the corners hold rank - 2 entries.
            let r = unsafe {
                f(
                    map.0.as_mut_ptr().cast(),
                    c.data_type,
                    c.global_dim.len() as c_uint,
                    c.global_address as *mut c_void,
                    c.global_dim.as_ptr(),
                    c.global_strides.as_ptr(),
                    lower.as_ptr(),
                    upper.as_ptr(),
                    *channels_per_pixel,
                    *pixels_per_column,
                    c.element_strides.as_ptr(),
                    c.interleave,
                    c.swizzle,
                    c.l2_promotion,
                    c.oob_fill,
                )
            };
            (r, what)
        }
        TensorMapRequest::ReplaceAddress { map: old, global_address } => {
            let what = "cuTensorMapReplaceAddress";
            map.0 = *old;
            // SAFETY: as above.
            let f = unsafe { sys::culib().get::<Replace>(what.as_bytes()) }.map_err(|_| missing(what))?;
            // SAFETY: `map` holds an encoded map the caller gave; the
            // driver rewrites its address field.
            (unsafe { f(map.0.as_mut_ptr().cast(), *global_address as *mut c_void) }, what)
        }
    };
    check_raw(r, what)?;
    Ok(map.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_formats_like_nvml() {
        let bytes: [u8; 16] =
            [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        assert_eq!(format_uuid(&bytes), "GPU-12345678-9abc-def0-0123-456789abcdef");
    }
}
