//! The CUDA driver API this library reads the GPU through.
//!
//! NVML here opens no session of its own: it loads `libcuda.so.1` — in a
//! gpupool process that is gpupool's stub, already loaded by the CUDA
//! runtime or loaded now — and asks it, so the process keeps one session
//! and NVML's memory figures include the process's own allocations.
//!
//! [`Driver`] is the handful of calls NVML needs, as safe methods; the core
//! ([`crate::state`], [`crate::gpu`]) is tested against a fake of it.
//! [`LibCuda`] is the real one.

use crate::error::Error;
use gpupool_ffi::host_facts::{self, HostFacts};
use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};

/// A driver call's failure: the entry point and its raw `CUresult`.
pub(crate) type CuResult<T> = Result<T, Error>;

/// `CUdevice_attribute` values NVML needs (cuda.h).
pub(crate) mod attr {
    use std::ffi::c_int;

    pub(crate) const MULTIPROCESSOR_COUNT: c_int = 16;
    pub(crate) const PCI_BUS_ID: c_int = 33;
    pub(crate) const PCI_DEVICE_ID: c_int = 34;
    pub(crate) const PCI_DOMAIN_ID: c_int = 50;
    pub(crate) const COMPUTE_CAPABILITY_MAJOR: c_int = 75;
    pub(crate) const COMPUTE_CAPABILITY_MINOR: c_int = 76;
}

/// The driver calls NVML answers from. `dev` is a `CUdevice` from
/// [`Driver::device`].
pub(crate) trait Driver: Send + Sync {
    /// `cuInit(0)`: for gpupool, opens (or finds open) the session.
    fn init(&self) -> CuResult<()>;
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    fn version(&self) -> CuResult<i32>;
    /// `cuDeviceGetCount`.
    fn device_count(&self) -> CuResult<i32>;
    /// `cuDeviceGet`: the `CUdevice` of an ordinal.
    fn device(&self, ordinal: i32) -> CuResult<i32>;
    /// `cuDeviceGetName`.
    fn name(&self, dev: i32) -> CuResult<String>;
    /// `cuDeviceGetUuid_v2`: the 16 UUID bytes.
    fn uuid(&self, dev: i32) -> CuResult<[u8; 16]>;
    /// `cuDeviceTotalMem_v2`, in bytes.
    fn total_mem(&self, dev: i32) -> CuResult<u64>;
    /// `cuDeviceGetAttribute`.
    fn attribute(&self, dev: i32, attrib: c_int) -> CuResult<i32>;
    /// `(free, total)` bytes from `cuMemGetInfo_v2` in the device's primary
    /// context.
    fn mem_info(&self, dev: i32) -> CuResult<(u64, u64)>;
    /// `gpupool_host_facts` (`gpupool_ffi::host_facts`): the server's
    /// kernel driver version and the GPU's PCIe link. `None` from a
    /// `libcuda.so.1` without it (not gpupool's).
    fn host_facts(&self, dev: i32) -> CuResult<Option<HostFacts>>;
}

/// `CUcontext`: opaque to NVML.
type CuContext = *mut c_void;

// The signatures are spelled with C integer types rather than cudarc's
// `sys` types: cudarc's `CUresult` is a Rust enum, and a code the driver
// returns that the enum lacks would be undefined behaviour; a raw `c_uint`
// keeps every code, as STYLE.md asks results to be lossless.
type InitFn = unsafe extern "C" fn(c_uint) -> c_uint;
type IntOutFn = unsafe extern "C" fn(*mut c_int) -> c_uint;
type DeviceGetFn = unsafe extern "C" fn(*mut c_int, c_int) -> c_uint;
type NameFn = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_uint;
type UuidFn = unsafe extern "C" fn(*mut [u8; 16], c_int) -> c_uint;
type TotalMemFn = unsafe extern "C" fn(*mut usize, c_int) -> c_uint;
type AttributeFn = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_uint;
type RetainFn = unsafe extern "C" fn(*mut CuContext, c_int) -> c_uint;
type PushFn = unsafe extern "C" fn(CuContext) -> c_uint;
type MemInfoFn = unsafe extern "C" fn(*mut usize, *mut usize) -> c_uint;
type PopFn = unsafe extern "C" fn(*mut CuContext) -> c_uint;
type ReleaseFn = unsafe extern "C" fn(c_int) -> c_uint;
type HostFactsFn = unsafe extern "C" fn(c_int, *mut HostFacts, usize) -> c_uint;

/// `libcuda.so.1`, loaded, with the entry points NVML uses.
#[derive(Debug)]
pub(crate) struct LibCuda {
    /// Kept so the entry points stay mapped; never unloaded, as the CUDA
    /// runtime and the application use the same library.
    _lib: Library,
    cu_init: InitFn,
    cu_driver_get_version: IntOutFn,
    cu_device_get_count: IntOutFn,
    cu_device_get: DeviceGetFn,
    cu_device_get_name: NameFn,
    cu_device_get_uuid_v2: UuidFn,
    cu_device_total_mem_v2: TotalMemFn,
    cu_device_get_attribute: AttributeFn,
    cu_device_primary_ctx_retain: RetainFn,
    cu_ctx_push_current_v2: PushFn,
    cu_mem_get_info_v2: MemInfoFn,
    cu_ctx_pop_current_v2: PopFn,
    cu_device_primary_ctx_release_v2: ReleaseFn,
    gpupool_host_facts: Option<HostFactsFn>,
}

/// The soname every CUDA driver, gpupool's included, is loaded by.
const LIBCUDA: &str = "libcuda.so.1";

/// `Ok` for `CUDA_SUCCESS`, else the call's error.
fn check(call: &'static str, code: c_uint) -> CuResult<()> {
    if code == 0 { Ok(()) } else { Err(Error::Cuda { call, code }) }
}

impl LibCuda {
    /// Loads `libcuda.so.1` and resolves every entry point NVML uses.
    pub(crate) fn load() -> Result<LibCuda, Error> {
        // RTLD_GLOBAL, as the CUDA runtime loads it: if NVML is the first to
        // load the driver, the runtime's later dlopen finds the same copy.
        // SAFETY: loading the CUDA driver runs its initializers, which are
        // safe to run in any process that uses CUDA (gpupool's stub defers
        // all work to cuInit).
        let lib = unsafe { Library::open(Some(LIBCUDA), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(|e| Error::DriverNotLoaded(format!("cannot load {LIBCUDA}: {e}")))?;
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: the symbol is the CUDA driver API entry point of
                // that name; its type alias spells cuda.h's signature.
                let s = unsafe { lib.get(concat!($name, "\0").as_bytes()) };
                *s.map_err(|e| Error::DriverNotLoaded(format!("{LIBCUDA} lacks {}: {e}", $name)))?
            }};
        }
        Ok(LibCuda {
            cu_init: sym!("cuInit"),
            cu_driver_get_version: sym!("cuDriverGetVersion"),
            cu_device_get_count: sym!("cuDeviceGetCount"),
            cu_device_get: sym!("cuDeviceGet"),
            cu_device_get_name: sym!("cuDeviceGetName"),
            cu_device_get_uuid_v2: sym!("cuDeviceGetUuid_v2"),
            cu_device_total_mem_v2: sym!("cuDeviceTotalMem_v2"),
            cu_device_get_attribute: sym!("cuDeviceGetAttribute"),
            cu_device_primary_ctx_retain: sym!("cuDevicePrimaryCtxRetain"),
            cu_ctx_push_current_v2: sym!("cuCtxPushCurrent_v2"),
            cu_mem_get_info_v2: sym!("cuMemGetInfo_v2"),
            cu_ctx_pop_current_v2: sym!("cuCtxPopCurrent_v2"),
            cu_device_primary_ctx_release_v2: sym!("cuDevicePrimaryCtxRelease_v2"),
            // SAFETY: the symbol, where present, has the signature
            // `gpupool_ffi::host_facts` documents.
            gpupool_host_facts: unsafe { lib.get::<HostFactsFn>(host_facts::SYMBOL.as_bytes()) }.ok().map(|s| *s),
            _lib: lib,
        })
    }
}

impl Driver for LibCuda {
    fn init(&self) -> CuResult<()> {
        // SAFETY: cuInit takes flags by value.
        check("cuInit", unsafe { (self.cu_init)(0) })
    }

    fn version(&self) -> CuResult<i32> {
        let mut v = 0;
        // SAFETY: out-pointer to a live local.
        check("cuDriverGetVersion", unsafe { (self.cu_driver_get_version)(&mut v) })?;
        Ok(v)
    }

    fn device_count(&self) -> CuResult<i32> {
        let mut n = 0;
        // SAFETY: out-pointer to a live local.
        check("cuDeviceGetCount", unsafe { (self.cu_device_get_count)(&mut n) })?;
        Ok(n)
    }

    fn device(&self, ordinal: i32) -> CuResult<i32> {
        let mut d = 0;
        // SAFETY: out-pointer to a live local.
        check("cuDeviceGet", unsafe { (self.cu_device_get)(&mut d, ordinal) })?;
        Ok(d)
    }

    fn name(&self, dev: i32) -> CuResult<String> {
        let mut buf = [0 as c_char; 256];
        // SAFETY: `buf` holds the length passed; the driver NUL-terminates
        // within it.
        check("cuDeviceGetName", unsafe { (self.cu_device_get_name)(buf.as_mut_ptr(), buf.len() as c_int, dev) })?;
        // Belt and braces: a driver that filled the buffer without a NUL
        // must not make us read past it.
        buf[buf.len() - 1] = 0;
        // SAFETY: NUL-terminated within `buf` (set just above at the latest).
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }

    fn uuid(&self, dev: i32) -> CuResult<[u8; 16]> {
        let mut bytes = [0u8; 16];
        // SAFETY: `CUuuid` is 16 bytes (`char bytes[16]`); out-pointer to a live local.
        check("cuDeviceGetUuid_v2", unsafe { (self.cu_device_get_uuid_v2)(&mut bytes, dev) })?;
        Ok(bytes)
    }

    fn total_mem(&self, dev: i32) -> CuResult<u64> {
        let mut total = 0usize;
        // SAFETY: out-pointer to a live local.
        check("cuDeviceTotalMem_v2", unsafe { (self.cu_device_total_mem_v2)(&mut total, dev) })?;
        Ok(total as u64)
    }

    fn attribute(&self, dev: i32, attrib: c_int) -> CuResult<i32> {
        let mut v = 0;
        // SAFETY: out-pointer to a live local.
        check("cuDeviceGetAttribute", unsafe { (self.cu_device_get_attribute)(&mut v, attrib, dev) })?;
        Ok(v)
    }

    /// The primary context is retained and pushed only for the query and
    /// then popped and released, so the calling thread's context stack and
    /// the context's reference count are as they were.
    fn mem_info(&self, dev: i32) -> CuResult<(u64, u64)> {
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: out-pointer to a live local.
        check("cuDevicePrimaryCtxRetain", unsafe { (self.cu_device_primary_ctx_retain)(&mut ctx, dev) })?;
        let info = (|| {
            // SAFETY: `ctx` was just returned by the driver.
            check("cuCtxPushCurrent_v2", unsafe { (self.cu_ctx_push_current_v2)(ctx) })?;
            let (mut free, mut total) = (0usize, 0usize);
            // SAFETY: out-pointers to live locals.
            let got = check("cuMemGetInfo_v2", unsafe { (self.cu_mem_get_info_v2)(&mut free, &mut total) });
            let mut popped: CuContext = std::ptr::null_mut();
            // SAFETY: out-pointer to a live local; pops what was pushed above.
            let pop = check("cuCtxPopCurrent_v2", unsafe { (self.cu_ctx_pop_current_v2)(&mut popped) });
            got.and(pop).map(|()| (free as u64, total as u64))
        })();
        // SAFETY: releases the reference retained above.
        let release = check("cuDevicePrimaryCtxRelease_v2", unsafe { (self.cu_device_primary_ctx_release_v2)(dev) });
        let info = info?;
        release?;
        Ok(info)
    }

    fn host_facts(&self, dev: i32) -> CuResult<Option<HostFacts>> {
        let Some(f) = self.gpupool_host_facts else { return Ok(None) };
        let mut facts = HostFacts::default();
        // SAFETY: out-pointer to a live local of the size passed.
        check("gpupool_host_facts", unsafe { f(dev, &mut facts, std::mem::size_of::<HostFacts>()) })?;
        Ok(Some(facts))
    }
}
