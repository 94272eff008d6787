//! CUDA backend: one GPU (or MIG instance) driven through the CUDA driver
//! API, over cudarc's `driver::sys` and `nvrtc::sys` layers (cudarc's safe
//! layer has no virtual memory management).
//!
//! [`CudaDevice::open`] makes the warm state of a server: the device's
//! retained primary context, its description, and (compiled once, on first
//! use) the built-in module. Each [`CudaSession`] reserves its own device
//! address range (`cuMemAddressReserve`) and backs parts of it on request
//! (`cuMemCreate` + `cuMemMap`), so client pointers are real device
//! addresses. All sessions of a device share its primary context.
//!
//! This module is the crate's FFI fence: `unsafe` is allowed here, each
//! block with a `SAFETY` comment. Resources are the domain types of
//! `resources`, released in `Drop`; errors keep the driver's raw
//! `CUresult`. cudarc resolves driver symbols lazily and panics when the
//! library or a symbol is missing, so `open` checks for both first.
#![allow(unsafe_code)]

mod driver;
mod graph;
pub(crate) mod host_facts;
mod link;
mod nvrtc;
mod pinned;
mod resources;
mod texture;

pub use graph::{Graph, GraphExec};
pub use resources::{Allocation, Event, Mapping, Module, Stream};
pub use texture::{Array, Object};

use super::{
    Backend, BackendSession, CONTEXT_LIMITS, DeviceDescription, DeviceResult, FunctionInfo, HostPinner, ImageKey,
    ImageKind, LaunchAttrs, LaunchDims, LaunchEvents, LinkOutput, LinkRequest, MemOp, Occupancy, OccupancyQuery, Param,
    Pinned, Preloaded, builtin, fatbin_wrapper_error, image_kind, mem_ops,
};
use crate::error::CallError;
use cudarc::driver::sys::{self, CUdevice, CUfunction, CUstream};
use gpupool_proto::cuda;
use gpupool_shm::region::Region;
use resources::{Context, HostRegistration, Kernel, Reservation};
use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// `CUDA_ERROR_INVALID_DEVICE`.
const INVALID_DEVICE: u32 = 101;
/// Attribute numbers probed for the description; the driver refuses the
/// ones it does not know, which are skipped.
const ATTRIBUTE_PROBE: std::ops::RangeInclusive<u32> = 1..=200;
const ATTR_MULTIPROCESSOR_COUNT: u32 = 16;
const ATTR_COMPUTE_CAPABILITY_MAJOR: u32 = 75;
const ATTR_COMPUTE_CAPABILITY_MINOR: u32 = 76;
const ATTR_PCI_BUS_ID: u32 = 33;
const ATTR_PCI_DEVICE_ID: u32 = 34;
const ATTR_PCI_DOMAIN_ID: u32 = 50;
/// `CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED`.
const ATTR_VIRTUAL_MEMORY_MANAGEMENT: u32 = 102;
/// Function attributes reported with each function: every
/// `CUfunction_attribute` the driver headers cudarc was generated from know
/// (`CU_FUNC_ATTRIBUTE_MAX` excluded); ones the driver refuses are skipped.
const FUNCTION_ATTRIBUTES: std::ops::Range<u32> = 0..sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX as u32;
/// Upper bound on `cuFuncGetParamInfo` indices (the parameter buffer is at
/// most 32 764 bytes), so a misbehaving driver cannot loop us forever.
const MAX_PARAMS: usize = 32_768;

/// A GPU (or MIG instance) driven through the CUDA driver API.
#[derive(Debug)]
pub struct CudaDevice {
    inner: Arc<DeviceInner>,
}

struct DeviceInner {
    context: Arc<Context>,
    description: DeviceDescription,
    /// The built-in module compiled for this device: compiled once per
    /// server, under the lock so that concurrent sessions wait for it.
    builtin: Mutex<Option<Arc<[u8]>>>,
    /// Modules loaded before a session asked for them.
    preloaded: Preloaded<SendModule>,
    /// See [`super::EAGER_DESCRIBE_MAX`].
    eager_describe_max: AtomicUsize,
}

/// A module moved between the thread that preloaded it and its session's.
#[derive(Debug)]
struct SendModule(Module);

// SAFETY: a CUmodule and its CUfunctions belong to a context, not to a
// thread: the driver accepts them on any thread where that context is
// current, which every session thread of this device makes it. The module
// is owned by one holder at a time (the preloaded set, then one session).
unsafe impl Send for SendModule {}

impl std::fmt::Debug for DeviceInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let compiled = self.builtin.lock().unwrap_or_else(PoisonError::into_inner).is_some();
        f.debug_struct("DeviceInner")
            .field("context", &self.context)
            .field("description", &self.description)
            .field("builtin_compiled", &compiled)
            .finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal` and creates its warm context. Fails with
    /// `CUDA_ERROR_NO_DEVICE` (never a panic) where no driver is installed.
    pub fn open(ordinal: usize) -> DeviceResult<Self> {
        Self::open_with(ordinal, None)
    }

    /// [`CudaDevice::open`] with the host's NVML facts already read (a
    /// worker's, from its supervisor: `WorkerSpec.host_facts`); `None`:
    /// read them now.
    pub fn open_with(ordinal: usize, host: Option<&gpupool_proto::v1::HostFacts>) -> DeviceResult<Self> {
        driver::check_driver()?;
        // SAFETY: the driver library and its symbols are present (checked above).
        driver::check(unsafe { sys::cuInit(0) }, "cuInit")?;
        let index = c_int::try_from(ordinal)
            .map_err(|_| CallError::new(INVALID_DEVICE, format!("device ordinal {ordinal} is out of range")))?;
        let mut device: CUdevice = 0;
        // SAFETY: valid out-pointer; the driver checks the ordinal.
        driver::check(unsafe { sys::cuDeviceGet(&mut device, index) }, "cuDeviceGet")
            .map_err(|e| CallError::new(e.code, format!("device {ordinal}: {}", e.message)))?;

        let name = device_name(device)?;
        let uuid = device_uuid(device)?;
        let mut total_memory: usize = 0;
        // SAFETY: valid out-pointer and device.
        driver::check(unsafe { sys::cuDeviceTotalMem_v2(&mut total_memory, device) }, "cuDeviceTotalMem_v2")?;
        let mut driver_version: c_int = 0;
        // SAFETY: valid out-pointer.
        driver::check(unsafe { sys::cuDriverGetVersion(&mut driver_version) }, "cuDriverGetVersion")?;

        let attributes: Vec<(u32, i32)> =
            ATTRIBUTE_PROBE.filter_map(|a| driver::device_attribute(device, a).map(|v| (a, v))).collect();
        let attribute = |a: u32| attributes.iter().find(|(k, _)| *k == a).map(|(_, v)| *v);
        if attribute(ATTR_VIRTUAL_MEMORY_MANAGEMENT) != Some(1) {
            return Err(CallError::new(
                cuda::NOT_SUPPORTED,
                format!(
                    "device {ordinal} ({name}) does not support CUDA virtual memory management, which gpupool needs to give sessions fixed address ranges"
                ),
            ));
        }
        let non_negative = |a: u32| attribute(a).and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        let compute_capability =
            (non_negative(ATTR_COMPUTE_CAPABILITY_MAJOR), non_negative(ATTR_COMPUTE_CAPABILITY_MINOR));
        let granularity = granularity(device)?;
        let pci = |a: u32| attribute(a).unwrap_or(0);
        let bus_id = host_facts::bus_id(pci(ATTR_PCI_DOMAIN_ID), pci(ATTR_PCI_BUS_ID), pci(ATTR_PCI_DEVICE_ID));
        let host = match host {
            Some(h) => host_facts::pick(h, &bus_id),
            None => host_facts::pick(&host_facts::read_host(), &bus_id),
        };

        // Last, because it is the expensive step (the context is created).
        let started = Instant::now();
        let context = Arc::new(Context::retain(device)?);
        tracing::info!(
            ordinal,
            %name,
            %uuid,
            compute_capability = %format!("{}.{}", compute_capability.0, compute_capability.1),
            total_memory,
            granularity,
            driver_version,
            context_ms = started.elapsed().as_millis() as u64,
            "CUDA device opened"
        );
        let description = DeviceDescription {
            name,
            backend: "cuda",
            uuid,
            compute_capability,
            multiprocessor_count: non_negative(ATTR_MULTIPROCESSOR_COUNT),
            total_memory: total_memory as u64,
            granularity,
            attributes,
            driver_version: u32::try_from(driver_version).unwrap_or(0),
            error_strings: driver::error_strings(0..1100),
            kernel_driver_version: host.kernel_driver_version,
            pcie: host.pcie,
        };
        let preloaded = Preloaded::default();
        let eager_describe_max = AtomicUsize::new(super::EAGER_DESCRIBE_MAX);
        let inner = DeviceInner { context, description, builtin: Mutex::new(None), preloaded, eager_describe_max };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Compiles the built-in module now rather than on its first load, so
    /// that no client pays for NVRTC (about 300 ms).
    pub fn prepare_builtin(&self) -> DeviceResult<()> {
        self.inner.builtin_image().map(drop)
    }
}

impl CudaDevice {
    /// Modules of more than `n` functions load undescribed
    /// ([`super::EAGER_DESCRIBE_MAX`]).
    pub fn describe_eagerly_up_to(&self, n: usize) {
        self.inner.eager_describe_max.store(n, Ordering::Relaxed);
    }
}

impl DeviceInner {
    /// Loads `image` (already prepared for the driver) into the device's
    /// context, which must be current on this thread.
    fn load(&self, image: &[u8], builtin: bool) -> DeviceResult<(Module, Vec<FunctionInfo>)> {
        let mut module = Module::load(self.context.clone(), image)?;
        let functions = module.functions()?;
        // Reading a function's attributes loads it: a library image of
        // hundreds of kernels (cuBLAS) would be loaded whole where CUDA
        // loads the few a program launches. Its functions are described
        // when first used (`describe_function`).
        let lazy = !builtin && functions.len() > self.eager_describe_max.load(Ordering::Relaxed);
        let described = functions
            .into_iter()
            .map(|f| if lazy { layout(f) } else { describe(f) })
            .collect::<DeviceResult<Vec<_>>>()?;
        let described = if builtin {
            order_like_builtin(described)?
        } else {
            let mut described = described;
            described.sort_by(|a, b| a.1.name.cmp(&b.1.name));
            described
        };
        let (kernels, infos): (Vec<Kernel>, Vec<FunctionInfo>) = described.into_iter().unzip();
        module.kernels = kernels;
        Ok((module, infos))
    }

    fn builtin_image(&self) -> DeviceResult<Arc<[u8]>> {
        let mut cache = self.builtin.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(image) = cache.as_ref() {
            return Ok(image.clone());
        }
        let started = Instant::now();
        let image: Arc<[u8]> = nvrtc::compile_builtin(self.description.compute_capability)?.into();
        tracing::info!(
            bytes = image.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compiled the built-in module with NVRTC"
        );
        *cache = Some(image.clone());
        Ok(image)
    }
}

fn device_name(device: CUdevice) -> DeviceResult<String> {
    let mut buf = [0 as c_char; 256];
    // SAFETY: `buf` holds the `len` bytes the driver may write (NUL included).
    driver::check(unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as c_int, device) }, "cuDeviceGetName")?;
    let bytes: Vec<u8> = buf.iter().map(|&c| c as u8).collect();
    let name = CStr::from_bytes_until_nul(&bytes).map(|s| s.to_string_lossy().into_owned());
    Ok(name.unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned()))
}

fn device_uuid(device: CUdevice) -> DeviceResult<String> {
    let mut uuid = sys::CUuuid { bytes: [0; 16] };
    // SAFETY: valid out-pointer and device.
    driver::check(unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, device) }, "cuDeviceGetUuid_v2")?;
    Ok(driver::format_uuid(&uuid.bytes.map(|c| c as u8)))
}

/// The recommended granularity of a pinned allocation on `device`.
fn granularity(device: CUdevice) -> DeviceResult<u64> {
    let prop = resources::allocation_prop(resources::device_location(device));
    let mut granularity: usize = 0;
    // SAFETY: valid out-pointer and a fully initialised property struct.
    let r = unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut granularity,
            &prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
        )
    };
    driver::check(r, "cuMemGetAllocationGranularity")?;
    let granularity = granularity as u64;
    if !granularity.is_power_of_two() {
        return Err(CallError::new(
            cuda::UNKNOWN,
            format!("the driver reported a mapping granularity of {granularity} bytes"),
        ));
    }
    Ok(granularity)
}

/// Registers client host regions with the device's primary context.
#[derive(Debug)]
struct CudaPinner {
    context: Arc<Context>,
}

impl HostPinner for CudaPinner {
    fn pin(&self, region: &Region) -> DeviceResult<(Pinned, u64)> {
        // SAFETY: the region's mapping covers `len` bytes from its first
        // byte and outlives the registration (`HostPinner::pin`'s contract:
        // `HostRegion` drops the registration before the region).
        let registration = unsafe { HostRegistration::register(self.context.clone(), region.as_ptr(), region.len())? };
        let device = registration.device_address()?;
        Ok((Box::new(registration), device))
    }
}

impl Backend for CudaDevice {
    type Session = CudaSession;

    fn description(&self) -> &DeviceDescription {
        &self.inner.description
    }

    fn host_pinner(&self) -> Arc<dyn HostPinner> {
        Arc::new(CudaPinner { context: self.inner.context.clone() })
    }

    fn open_session(&self, va_size: u64) -> DeviceResult<CudaSession> {
        self.open_session_at(va_size, 0)
    }

    /// The built-in image is never preloaded (sessions load it from the
    /// compiled copy).
    fn preload_module(&self, key: &ImageKey, image: &[u8]) -> DeviceResult<bool> {
        if builtin::is_builtin(image) || self.inner.preloaded.contains(key) {
            return Ok(false);
        }
        self.inner.context.make_current()?;
        let prepared = prepare_image(image)?;
        let (module, functions) = self.inner.load(prepared.bytes(), false)?;
        self.inner.preloaded.insert(*key, SendModule(module), functions);
        Ok(true)
    }

    fn open_session_at(&self, va_size: u64, base: u64) -> DeviceResult<CudaSession> {
        self.inner.context.make_current()?;
        let granularity = self.inner.description.granularity;
        if va_size == 0 {
            return Err(CallError::invalid_value("a session needs a non-empty address range"));
        }
        let size = round_up(va_size, granularity)
            .ok_or_else(|| CallError::invalid_value(format!("address range of {va_size} bytes is too large")))?;
        let reservation = Reservation::at(self.inner.context.clone(), size, granularity, base)?;
        Ok(CudaSession {
            device: self.inner.clone(),
            reservation: Rc::new(reservation),
            ring: None,
            small: Vec::new(),
            bounce: None,
        })
    }
}

/// One session on a CUDA device: its reserved address range, on the worker
/// thread where the device's context was made current. Not `Send`: it and
/// its resources stay on that thread.
#[derive(Debug)]
pub struct CudaSession {
    device: Arc<DeviceInner>,
    reservation: Rc<Reservation>,
    /// Pinned staging of asynchronous copies to the device, made at the
    /// first ([`pinned`]).
    ring: Option<pinned::PinnedRing>,
    /// Pageable staging of small asynchronous copies ([`SMALL_ASYNC_COPY`]).
    small: Vec<u8>,
    /// Pinned memory of copies between the host and arrays or pitched
    /// device memory, made at the first.
    bounce: Option<pinned::Bounce>,
}

/// Largest asynchronous copy to the device queued straight from pageable
/// memory: for those the driver copies the bytes to its own staging before
/// `cuMemcpyHtoDAsync` returns and queues nothing else, as for the program's
/// own pageable copy natively. Through the pinned ring each small copy also
/// recorded an event and ran as a DMA of its own: a loop of 10 us kernels
/// with a 4 KiB copy every 10th ran at 2.4x native (H100, 9a42934).
const SMALL_ASYNC_COPY: usize = 64 << 10;

/// Smallest host range a bulk copy pins for its duration: below it the
/// driver's staged pageable copy is as fast as pinning and unpinning.
const PIN_BULK_MIN: usize = 16 << 20;

impl CudaSession {
    /// `size` rounded up to the granularity, as `cuMemCreate` wants it.
    fn allocation_size(&self, size: u64) -> DeviceResult<u64> {
        if size == 0 {
            return Err(CallError::invalid_value("cannot allocate 0 bytes"));
        }
        round_up(size, self.device.description.granularity)
            .ok_or_else(|| CallError::invalid_value("allocation too large"))
    }

    /// Pins `[ptr, ptr + len)` for one synchronous copy when it is large and
    /// page-aligned; `None` (the copy goes as a pageable one) otherwise or
    /// when the driver refuses (the range may be registered already).
    fn pin_for_copy(&self, ptr: *mut u8, len: usize) -> Option<HostRegistration> {
        if len < PIN_BULK_MIN || !(ptr as usize).is_multiple_of(4096) {
            return None;
        }
        // SAFETY: the caller's borrow keeps the range mapped until the
        // registration drops, right after its copy.
        match unsafe { HostRegistration::register(self.device.context.clone(), ptr, len) } {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(error = %e, len, "bulk copy from pageable memory: the range could not be pinned");
                None
            }
        }
    }
}

fn round_up(value: u64, granularity: u64) -> Option<u64> {
    value.checked_next_multiple_of(granularity)
}

fn host_len(size: u64) -> DeviceResult<usize> {
    usize::try_from(size).map_err(|_| CallError::invalid_value(format!("size {size} does not fit in memory")))
}

/// The driver's id of one of [`super::STREAM_ATTRIBUTES`].
fn stream_attribute_id(attribute: u32) -> DeviceResult<sys::CUlaunchAttributeID> {
    use sys::CUlaunchAttributeID as Id;
    Ok(match attribute {
        1 => Id::CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW,
        3 => Id::CU_LAUNCH_ATTRIBUTE_SYNCHRONIZATION_POLICY,
        8 => Id::CU_LAUNCH_ATTRIBUTE_PRIORITY,
        9 => Id::CU_LAUNCH_ATTRIBUTE_MEM_SYNC_DOMAIN_MAP,
        10 => Id::CU_LAUNCH_ATTRIBUTE_MEM_SYNC_DOMAIN,
        other => return Err(CallError::not_supported(format!("stream attribute {other}"))),
    })
}

/// The address of `[start, start + len)` of a host region, checked against
/// its mapping; `None` for an empty range.
fn region_ptr(region: &Region, start: usize, len: usize) -> DeviceResult<Option<*mut c_void>> {
    if !region.contains(start, len) {
        return Err(CallError::invalid_value(format!("bytes [{start}, +{len}) outside the host region")));
    }
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: `start + len` lies within the mapping (checked above).
    Ok(Some(unsafe { region.as_ptr().add(start) }.cast::<c_void>()))
}

fn raw_stream(stream: Option<&Stream>) -> CUstream {
    stream.map_or(std::ptr::null_mut(), |s| s.raw)
}

/// One checked stream memory operation as the driver's batch entry.
fn batch_mem_op(op: &MemOp) -> sys::CUstreamBatchMemOpParams {
    use sys::CUstreamBatchMemOpType as Type;
    // SAFETY: a plain-data union of integers, for which all zeroes is valid.
    let mut p: sys::CUstreamBatchMemOpParams = unsafe { std::mem::zeroed() };
    match *op {
        MemOp::Wait { address, value, wide, condition, flush } => {
            let mut flags = condition as u32;
            if flush {
                flags |= mem_ops::WAIT_FLUSH;
            }
            p.waitValue = sys::CUstreamBatchMemOpParams_union_CUstreamMemOpWaitValueParams_st {
                operation: if wide {
                    Type::CU_STREAM_MEM_OP_WAIT_VALUE_64
                } else {
                    Type::CU_STREAM_MEM_OP_WAIT_VALUE_32
                },
                address,
                __bindgen_anon_1: sys::CUstreamBatchMemOpParams_union_CUstreamMemOpWaitValueParams_st__bindgen_ty_1 {
                    value64: value,
                },
                flags,
                alias: 0,
            };
        }
        MemOp::Write { address, value, wide } => {
            p.writeValue = sys::CUstreamBatchMemOpParams_union_CUstreamMemOpWriteValueParams_st {
                operation: if wide {
                    Type::CU_STREAM_MEM_OP_WRITE_VALUE_64
                } else {
                    Type::CU_STREAM_MEM_OP_WRITE_VALUE_32
                },
                address,
                __bindgen_anon_1: sys::CUstreamBatchMemOpParams_union_CUstreamMemOpWriteValueParams_st__bindgen_ty_1 {
                    value64: value,
                },
                flags: 0,
                alias: 0,
            };
        }
        MemOp::FlushRemoteWrites => {
            p.flushRemoteWrites = sys::CUstreamBatchMemOpParams_union_CUstreamMemOpFlushRemoteWritesParams_st {
                operation: Type::CU_STREAM_MEM_OP_FLUSH_REMOTE_WRITES,
                flags: 0,
            };
        }
        MemOp::Barrier { gpu_scope } => {
            p.memoryBarrier = sys::CUstreamBatchMemOpParams_union_CUstreamMemOpMemoryBarrierParams_st {
                operation: Type::CU_STREAM_MEM_OP_BARRIER,
                flags: u32::from(gpu_scope),
            };
        }
    }
    p
}

/// A module image ready for `cuModuleLoadData`.
#[derive(Debug)]
enum Prepared<'a> {
    Borrowed(&'a [u8]),
    /// PTX with the NUL the driver needs appended.
    Terminated(Vec<u8>),
    /// A binary image copied to 8-byte aligned memory: `len` bytes.
    Aligned(Vec<u64>, usize),
}

impl Prepared<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Prepared::Borrowed(b) => b,
            Prepared::Terminated(v) => v,
            // SAFETY: the `u64` buffer is initialised and holds at least
            // `len` bytes (`len.div_ceil(8)` words); `u8` has no alignment
            // or validity requirements; the slice borrows `self`.
            Prepared::Aligned(words, len) => unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), *len) },
        }
    }
}

/// The image as `cuModuleLoadData` needs it: PTX NUL-terminated, binary
/// images 8-byte aligned (they arrive at any offset of a network buffer).
fn prepare_image(image: &[u8]) -> DeviceResult<Prepared<'_>> {
    if image.is_empty() {
        return Err(CallError::new(cuda::INVALID_IMAGE, "empty module image"));
    }
    match image_kind(image) {
        ImageKind::FatbinWrapper => Err(fatbin_wrapper_error()),
        ImageKind::Ptx if image.last() == Some(&0) => Ok(Prepared::Borrowed(image)),
        ImageKind::Ptx => {
            let mut ptx = Vec::with_capacity(image.len() + 1);
            ptx.extend_from_slice(image);
            ptx.push(0);
            Ok(Prepared::Terminated(ptx))
        }
        ImageKind::Cubin | ImageKind::Fatbin if image.as_ptr().align_offset(8) == 0 => Ok(Prepared::Borrowed(image)),
        ImageKind::Cubin | ImageKind::Fatbin => {
            let words = image
                .chunks(8)
                .map(|chunk| {
                    let mut word = [0u8; 8];
                    word[..chunk.len()].copy_from_slice(chunk);
                    u64::from_ne_bytes(word)
                })
                .collect();
            Ok(Prepared::Aligned(words, image.len()))
        }
    }
}

/// Orders the kernels of the compiled built-in module as
/// [`builtin::functions`] does, which is what clients index by.
fn order_like_builtin<T>(mut found: Vec<(T, FunctionInfo)>) -> DeviceResult<Vec<(T, FunctionInfo)>> {
    let mut ordered = Vec::with_capacity(found.len());
    for expected in builtin::functions() {
        let position = found.iter().position(|(_, f)| f.name == expected.name).ok_or_else(|| {
            CallError::new(
                cuda::NOT_FOUND,
                format!("built-in kernel {} is missing from the compiled module", expected.name),
            )
        })?;
        let item = found.remove(position);
        if item.1.params != expected.params {
            tracing::warn!(
                kernel = %expected.name,
                "built-in kernel's parameter layout differs from the reference ({:?} vs {:?}); using the driver's",
                item.1.params,
                expected.params
            );
        }
        ordered.push(item);
    }
    found.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    ordered.extend(found);
    Ok(ordered)
}

/// One pointer per parameter into `params`, as `cuLaunchKernel` wants them.
fn param_pointers(params: &[u8], layout: &[Param], params_size: usize) -> DeviceResult<Vec<*mut c_void>> {
    if params.len() < params_size {
        return Err(CallError::invalid_value(format!(
            "parameter buffer has {} bytes, the kernel's layout needs {params_size}",
            params.len()
        )));
    }
    // Offsets are in bounds: every `offset + size` is at most `params_size`.
    Ok(layout.iter().map(|p| params.as_ptr().wrapping_add(p.offset as usize).cast_mut().cast()).collect())
}

/// A function's name and parameters (which do not load it), undescribed.
fn layout(function: CUfunction) -> DeviceResult<(Kernel, FunctionInfo)> {
    let mut name: *const c_char = std::ptr::null();
    // SAFETY: valid out-pointer; `function` belongs to a live module.
    driver::check(unsafe { sys::cuFuncGetName(&mut name, function) }, "cuFuncGetName")?;
    let name = if name.is_null() {
        String::new()
    } else {
        // SAFETY: on success the driver returns a NUL-terminated string
        // that lives as long as the module.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    };

    let mut params = Vec::new();
    for index in 0..MAX_PARAMS {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: valid out-pointers; an index past the last parameter
        // makes the driver return CUDA_ERROR_INVALID_VALUE.
        match unsafe { sys::cuFuncGetParamInfo(function, index, &mut offset, &mut size) } {
            sys::CUresult::CUDA_SUCCESS => {
                let too_big = || CallError::new(cuda::UNKNOWN, format!("{name}: parameter {index} out of range"));
                params.push(Param {
                    offset: u32::try_from(offset).map_err(|_| too_big())?,
                    size: u32::try_from(size).map_err(|_| too_big())?,
                });
            }
            sys::CUresult::CUDA_ERROR_INVALID_VALUE => break,
            other => return Err(driver::error(other, &format!("cuFuncGetParamInfo({name})"))),
        }
    }

    let info = FunctionInfo { name, params, max_threads_per_block: 0, attributes: BTreeMap::new(), described: false };
    let kernel = Kernel { raw: function, params: info.params.clone(), params_size: info.params_size() as usize };
    Ok((kernel, info))
}

/// A function's name, parameters and attributes (which loads it).
fn describe(function: CUfunction) -> DeviceResult<(Kernel, FunctionInfo)> {
    let (kernel, mut info) = layout(function)?;
    let name = &info.name;
    // With lazy loading (CUDA's default) attributes need the function loaded.
    // SAFETY: `function` is a handle enumerated from a module this session holds.
    let r = unsafe { sys::cuFuncLoad(function) };
    driver::check(r, &format!("cuFuncLoad({name})"))?;

    let mut max_threads: c_int = 0;
    // SAFETY: valid out-pointer and a loaded function handle.
    let r = unsafe {
        sys::cuFuncGetAttribute(
            &mut max_threads,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
            function,
        )
    };
    driver::check(r, &format!("cuFuncGetAttribute({name})"))?;

    info.attributes =
        FUNCTION_ATTRIBUTES.filter_map(|a| driver::function_attribute(function, a).map(|v| (a, v))).collect();
    info.max_threads_per_block = u32::try_from(max_threads).unwrap_or(0);
    info.described = true;
    Ok((kernel, info))
}

/// The kernel at `function` of `module`.
fn kernel_of(module: &Module, function: usize) -> DeviceResult<&Kernel> {
    module.kernels.get(function).ok_or_else(|| {
        CallError::invalid_handle(format!(
            "function {function} does not exist (the module has {})",
            module.kernels.len()
        ))
    })
}

/// The `CUlimit` numbered `limit`, one of [`CONTEXT_LIMITS`].
fn limit_of(limit: u32) -> DeviceResult<sys::CUlimit> {
    use sys::CUlimit::*;
    Ok(match limit {
        0 => CU_LIMIT_STACK_SIZE,
        1 => CU_LIMIT_PRINTF_FIFO_SIZE,
        2 => CU_LIMIT_MALLOC_HEAP_SIZE,
        3 => CU_LIMIT_DEV_RUNTIME_SYNC_DEPTH,
        4 => CU_LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT,
        5 => CU_LIMIT_MAX_L2_FETCH_GRANULARITY,
        6 => CU_LIMIT_PERSISTING_L2_CACHE_SIZE,
        7 => CU_LIMIT_SHMEM_SIZE,
        other => return Err(CallError::invalid_value(format!("unknown context limit {other}"))),
    })
}

/// A context limit of the current context.
fn get_limit(limit: u32) -> DeviceResult<u64> {
    let raw = limit_of(limit)?;
    let mut value = 0usize;
    // SAFETY: valid out-pointer; a known limit.
    driver::check(unsafe { sys::cuCtxGetLimit(&mut value, raw) }, "cuCtxGetLimit")?;
    Ok(value as u64)
}

/// The `CUlaunchAttribute` list of a launch. Enumerated values from the
/// wire are matched to the driver's enums (an unknown one is
/// CUDA_ERROR_INVALID_VALUE, never a transmute).
fn launch_attributes(
    attrs: &LaunchAttrs,
    events: &LaunchEvents<'_, Event>,
) -> DeviceResult<Vec<sys::CUlaunchAttribute>> {
    use sys::CUlaunchAttributeID::*;
    let bad = |what: &str, v: u32| CallError::invalid_value(format!("launch attribute {what}: unknown value {v}"));
    let mut list = Vec::new();
    let mut push = |id: sys::CUlaunchAttributeID, set: &dyn Fn(&mut sys::CUlaunchAttributeValue)| {
        // SAFETY: the value is a plain C union of integers, pointers and
        // enums whose zero is valid (or is overwritten by `set`).
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        set(&mut value);
        list.push(sys::CUlaunchAttribute { id, pad: [0; 4], value });
    };
    if attrs.cooperative {
        push(CU_LAUNCH_ATTRIBUTE_COOPERATIVE, &|v| v.cooperative = 1);
    }
    if attrs.cluster != [0; 3] {
        let [x, y, z] = attrs.cluster;
        push(CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, &|v| {
            v.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x, y, z }
        });
    }
    if attrs.cluster_scheduling_policy != 0 {
        use sys::CUclusterSchedulingPolicy::*;
        let p = match attrs.cluster_scheduling_policy {
            1 => CU_CLUSTER_SCHEDULING_POLICY_SPREAD,
            2 => CU_CLUSTER_SCHEDULING_POLICY_LOAD_BALANCING,
            other => return Err(bad("cluster scheduling policy", other)),
        };
        push(CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE, &|v| v.clusterSchedulingPolicyPreference = p);
    }
    if attrs.programmatic_serialization {
        push(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, &|v| v.programmaticStreamSerializationAllowed = 1);
    }
    if let Some(p) = attrs.priority {
        push(CU_LAUNCH_ATTRIBUTE_PRIORITY, &|v| v.priority = p);
    }
    let domain = |d: u32| match d {
        0 => Ok(sys::CUlaunchMemSyncDomain::CU_LAUNCH_MEM_SYNC_DOMAIN_DEFAULT),
        1 => Ok(sys::CUlaunchMemSyncDomain::CU_LAUNCH_MEM_SYNC_DOMAIN_REMOTE),
        other => Err(bad("memory sync domain", other)),
    };
    if let Some(d) = attrs.mem_sync_domain {
        let d = domain(d)?;
        push(CU_LAUNCH_ATTRIBUTE_MEM_SYNC_DOMAIN, &|v| v.memSyncDomain = d);
    }
    if let Some((default_, remote)) = attrs.mem_sync_domain_map {
        push(CU_LAUNCH_ATTRIBUTE_MEM_SYNC_DOMAIN_MAP, &|v| {
            v.memSyncDomainMap = sys::CUlaunchMemSyncDomainMap { default_, remote }
        });
    }
    if let Some(w) = attrs.access_policy_window {
        let prop = |p: u32| match p {
            0 => Ok(sys::CUaccessProperty::CU_ACCESS_PROPERTY_NORMAL),
            1 => Ok(sys::CUaccessProperty::CU_ACCESS_PROPERTY_STREAMING),
            2 => Ok(sys::CUaccessProperty::CU_ACCESS_PROPERTY_PERSISTING),
            other => Err(bad("access property", other)),
        };
        let (hit, miss) = (prop(w.hit_prop)?, prop(w.miss_prop)?);
        let num_bytes = host_len(w.num_bytes)?;
        push(CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW, &|v| {
            v.accessPolicyWindow = sys::CUaccessPolicyWindow {
                base_ptr: w.base as *mut c_void,
                num_bytes,
                hitRatio: w.hit_ratio,
                hitProp: hit,
                missProp: miss,
            }
        });
    }
    if attrs.preferred_cluster != [0; 3] {
        let [x, y, z] = attrs.preferred_cluster;
        push(CU_LAUNCH_ATTRIBUTE_PREFERRED_CLUSTER_DIMENSION, &|v| {
            v.preferredClusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_4 { x, y, z }
        });
    }
    if let Some(p) = attrs.synchronization_policy {
        use sys::CUsynchronizationPolicy::*;
        let p = match p {
            1 => CU_SYNC_POLICY_AUTO,
            2 => CU_SYNC_POLICY_SPIN,
            3 => CU_SYNC_POLICY_YIELD,
            4 => CU_SYNC_POLICY_BLOCKING_SYNC,
            other => return Err(bad("synchronization policy", other)),
        };
        push(CU_LAUNCH_ATTRIBUTE_SYNCHRONIZATION_POLICY, &|v| v.syncPolicy = p);
    }
    if let Some(e) = &events.programmatic {
        let (event, flags, trigger) = (e.event.raw, e.flags, c_int::from(e.trigger_at_block_start));
        push(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_EVENT, &|v| {
            v.programmaticEvent =
                sys::CUlaunchAttributeValue_union__bindgen_ty_2 { event, flags, triggerAtBlockStart: trigger }
        });
    }
    if let Some(e) = &events.completion {
        let (event, flags) = (e.event.raw, e.flags);
        push(CU_LAUNCH_ATTRIBUTE_LAUNCH_COMPLETION_EVENT, &|v| {
            v.launchCompletionEvent = sys::CUlaunchAttributeValue_union__bindgen_ty_3 { event, flags }
        });
    }
    Ok(list)
}

/// A count or size from the wire as the C `int` the driver takes.
fn c_int_of(value: u32, what: &str) -> DeviceResult<c_int> {
    c_int::try_from(value).map_err(|_| CallError::invalid_value(format!("{what} {value} is out of range")))
}

impl BackendSession for CudaSession {
    type Mapping = Mapping;
    type Array = Array;
    type Object = Object;
    type Allocation = Rc<Allocation>;
    type Module = Module;
    type Stream = Stream;
    type Event = Event;
    type Graph = Graph;
    type GraphExec = GraphExec;

    fn va_base(&self) -> u64 {
        self.reservation.base
    }

    fn graph_create(&mut self) -> DeviceResult<Graph> {
        Graph::new(self.device.context.clone())
    }

    fn graph_conditional_handle(&mut self, graph: &Graph, default_value: u32, flags: u32) -> DeviceResult<u64> {
        graph.conditional_handle(default_value, flags)
    }

    fn graph_instantiate(
        &mut self,
        graph: &mut Graph,
        body: &super::graph::Body<&Module>,
        flags: u64,
    ) -> DeviceResult<GraphExec> {
        graph.rebuild(body)?;
        graph.instantiate(flags)
    }

    fn graph_launch(&mut self, exec: &GraphExec, stream: Option<&Stream>) -> DeviceResult<()> {
        // SAFETY: a live exec of this session; the stream is null or live.
        driver::check(unsafe { sys::cuGraphLaunch(exec.raw, raw_stream(stream)) }, "cuGraphLaunch")
    }

    /// `size` is rounded up to the granularity (as `cuMemAlloc` would).
    fn create(&mut self, size: u64) -> DeviceResult<Rc<Allocation>> {
        let size = self.allocation_size(size)?;
        Allocation::create(self.device.context.clone(), size).map(Rc::new)
    }

    fn create_compressible(&mut self, size: u64) -> DeviceResult<(Rc<Allocation>, bool)> {
        let size = self.allocation_size(size)?;
        let (allocation, compressed) = Allocation::create_compressible(self.device.context.clone(), size)?;
        Ok((Rc::new(allocation), compressed))
    }

    /// `size` is rounded up to the granularity; `addr` and `offset` must
    /// be multiples of it.
    fn map_allocation(
        &mut self,
        allocation: &Rc<Allocation>,
        offset: u64,
        addr: u64,
        size: u64,
    ) -> DeviceResult<Mapping> {
        let granularity = self.device.description.granularity;
        if size == 0 {
            return Err(CallError::invalid_value("cannot map 0 bytes"));
        }
        if !addr.is_multiple_of(granularity) || !offset.is_multiple_of(granularity) {
            return Err(CallError::invalid_value(format!(
                "mapping address {addr:#x} or offset {offset:#x} is not a multiple of the granularity ({granularity:#x})"
            )));
        }
        let size = round_up(size, granularity).ok_or_else(|| CallError::invalid_value("mapping too large"))?;
        if !self.reservation.contains(addr, size) {
            return Err(CallError::invalid_value(format!(
                "mapping [{addr:#x}, +{size:#x}) is outside the session's range [{:#x}, +{:#x})",
                self.reservation.base, self.reservation.size
            )));
        }
        if offset.checked_add(size).is_none_or(|end| end > allocation.size) {
            return Err(CallError::invalid_value(format!(
                "mapping {size:#x} bytes from offset {offset:#x} of an allocation of {:#x}",
                allocation.size
            )));
        }
        Mapping::new(self.reservation.clone(), allocation.clone(), offset, addr, size)
    }

    fn set_access(&mut self, mapping: &Mapping, flags: u32) -> DeviceResult<()> {
        mapping.set_access(self.device.context.device, flags)
    }

    fn link(&mut self, request: &LinkRequest) -> DeviceResult<LinkOutput> {
        link::link(request)
    }

    fn write(&mut self, stream: Option<&Stream>, dst: u64, data: &[u8]) -> DeviceResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        let src = data.as_ptr().cast::<c_void>();
        match stream {
            None => {
                // SAFETY: `data` is readable for `len` bytes for the whole
                // (synchronous) call; the driver validates `dst`.
                driver::check(unsafe { sys::cuMemcpyHtoD_v2(dst, src, data.len()) }, "cuMemcpyHtoD_v2")?;
                // From pageable memory the copy returns once the bytes are
                // staged; the DMA may still be running, ordered only on the
                // legacy stream. Work the client sends next on a
                // non-blocking stream (a mapped range's host writes are sent
                // this way before it) must see the bytes: wait for the DMA.
                // SAFETY: the null stream is the context's legacy stream.
                driver::check(unsafe { sys::cuStreamSynchronize(std::ptr::null_mut()) }, "cuStreamSynchronize")
            }
            Some(s) => {
                // SAFETY: as above; the stream is synchronised before
                // returning, so the driver is done with `data` when the
                // borrow ends.
                driver::check(
                    unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src, data.len(), s.raw) },
                    "cuMemcpyHtoDAsync_v2",
                )?;
                // SAFETY: live stream owned by this session.
                driver::check(unsafe { sys::cuStreamSynchronize(s.raw) }, "cuStreamSynchronize")
            }
        }
    }

    fn read(&mut self, stream: Option<&Stream>, src: u64, out: &mut [u8]) -> DeviceResult<()> {
        if out.is_empty() {
            return Ok(());
        }
        let dst = out.as_mut_ptr().cast::<c_void>();
        match stream {
            None => {
                // SAFETY: `out` is writable for `len` bytes during the
                // synchronous call; the driver validates `src`.
                driver::check(unsafe { sys::cuMemcpyDtoH_v2(dst, src, out.len()) }, "cuMemcpyDtoH_v2")
            }
            Some(s) => {
                // SAFETY: as above; the stream is synchronised before the
                // mutable borrow of `out` ends.
                driver::check(
                    unsafe { sys::cuMemcpyDtoHAsync_v2(dst, src, out.len(), s.raw) },
                    "cuMemcpyDtoHAsync_v2",
                )?;
                // SAFETY: live stream owned by this session.
                driver::check(unsafe { sys::cuStreamSynchronize(s.raw) }, "cuStreamSynchronize")
            }
        }
    }

    fn write_async(&mut self, stream: Option<&Stream>, dst: u64, data: &[u8]) -> DeviceResult<()> {
        if data.is_empty() || data.len() > pinned::MAX_RING_COPY {
            return self.write(stream, dst, data);
        }
        if data.len() <= SMALL_ASYNC_COPY {
            // A buffer of this session's own: never registered with the
            // driver, so it counts as pageable whatever memory `data` is in.
            self.small.clear();
            self.small.extend_from_slice(data);
            // SAFETY: `small` holds `data.len()` bytes; for pageable memory
            // the driver has copied them to its staging when the call
            // returns, so `small` may be written again at once. The driver
            // validates `dst`.
            let r = unsafe {
                sys::cuMemcpyHtoDAsync_v2(dst, self.small.as_ptr().cast(), self.small.len(), raw_stream(stream))
            };
            return driver::check(r, "cuMemcpyHtoDAsync_v2");
        }
        let ring = match &mut self.ring {
            Some(ring) => ring,
            None => self.ring.insert(pinned::PinnedRing::new(self.device.context.clone())?),
        };
        ring.copy(raw_stream(stream), dst, data)
    }

    fn read_bulk(&mut self, src: u64, out: &mut [u8]) -> DeviceResult<()> {
        let pinned = self.pin_for_copy(out.as_mut_ptr(), out.len());
        self.read(None, src, out)?;
        drop(pinned);
        Ok(())
    }

    fn write_bulk(&mut self, dst: u64, data: &[u8]) -> DeviceResult<()> {
        // Registration only pins the pages; nothing writes through it.
        let pinned = self.pin_for_copy(data.as_ptr().cast_mut(), data.len());
        self.write(None, dst, data)?;
        drop(pinned);
        Ok(())
    }

    /// `cuMemcpyHtoDAsync` straight from the registered region: DMA from
    /// the client's pages, not waited for (as from pinned memory natively).
    fn write_from_region(
        &mut self,
        stream: Option<&Stream>,
        dst: u64,
        region: &Region,
        start: usize,
        len: usize,
    ) -> DeviceResult<()> {
        let Some(src) = region_ptr(region, start, len)? else { return Ok(()) };
        // SAFETY: the range is mapped and registered until the region's
        // registration drops, which synchronizes the context first, so the
        // copy is done with it before the pages go; the driver validates
        // `dst`. The client may write the bytes concurrently: then it
        // garbles only its own copy, as natively.
        driver::check(unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src, len, raw_stream(stream)) }, "cuMemcpyHtoDAsync_v2")
    }

    /// `cuMemcpyDtoHAsync` straight into the registered region.
    fn read_into_region(
        &mut self,
        stream: Option<&Stream>,
        src: u64,
        region: &Region,
        start: usize,
        len: usize,
    ) -> DeviceResult<()> {
        let Some(dst) = region_ptr(region, start, len)? else { return Ok(()) };
        // SAFETY: as in `write_from_region`: mapped and registered until
        // the queued copy has finished; no Rust reference to the bytes
        // exists in this process.
        driver::check(unsafe { sys::cuMemcpyDtoHAsync_v2(dst, src, len, raw_stream(stream)) }, "cuMemcpyDtoHAsync_v2")
    }

    fn copy(&mut self, stream: Option<&Stream>, dst: u64, src: u64, size: u64) -> DeviceResult<()> {
        let len = host_len(size)?;
        if len == 0 {
            return Ok(());
        }
        match stream {
            // SAFETY: device-to-device only; the driver validates both ranges.
            None => driver::check(unsafe { sys::cuMemcpyDtoD_v2(dst, src, len) }, "cuMemcpyDtoD_v2"),
            Some(s) => {
                // SAFETY: as above, on a live stream of this session.
                driver::check(unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, len, s.raw) }, "cuMemcpyDtoDAsync_v2")
            }
        }
    }

    fn memset(
        &mut self,
        stream: Option<&Stream>,
        dst: u64,
        value: u32,
        element_size: u32,
        count: u64,
    ) -> DeviceResult<()> {
        let n = host_len(count)?;
        let what = match (element_size, stream.is_some()) {
            (1, false) => "cuMemsetD8_v2",
            (2, false) => "cuMemsetD16_v2",
            (4, false) => "cuMemsetD32_v2",
            (1, true) => "cuMemsetD8Async",
            (2, true) => "cuMemsetD16Async",
            (4, true) => "cuMemsetD32Async",
            (other, _) => {
                return Err(CallError::invalid_value(format!("memset element size must be 1, 2 or 4, not {other}")));
            }
        };
        // The value is truncated to the element size, as CUDA does.
        let (byte, half) = (value as u8, value as u16);
        // SAFETY: device memory only, validated by the driver; the stream
        // is a live stream of this session (or the default stream).
        let r = unsafe {
            match (element_size, stream) {
                (1, None) => sys::cuMemsetD8_v2(dst, byte, n),
                (2, None) => sys::cuMemsetD16_v2(dst, half, n),
                (1, Some(s)) => sys::cuMemsetD8Async(dst, byte, n, s.raw),
                (2, Some(s)) => sys::cuMemsetD16Async(dst, half, n, s.raw),
                (_, None) => sys::cuMemsetD32_v2(dst, value, n),
                (_, Some(s)) => sys::cuMemsetD32Async(dst, value, n, s.raw),
            }
        };
        driver::check(r, what)
    }

    fn load_module(&mut self, image: &[u8]) -> DeviceResult<(Module, Vec<FunctionInfo>)> {
        if builtin::is_builtin(image) {
            let compiled = self.device.builtin_image()?;
            let prepared = prepare_image(&compiled)?;
            self.device.load(prepared.bytes(), true)
        } else {
            let prepared = prepare_image(image)?;
            self.device.load(prepared.bytes(), false)
        }
    }

    fn take_preloaded(&mut self, key: &ImageKey) -> Option<(Module, Vec<FunctionInfo>)> {
        self.device.preloaded.take(key).map(|(SendModule(m), f)| (m, f))
    }

    fn launch(
        &mut self,
        module: &Module,
        function: usize,
        dims: LaunchDims,
        attrs: &LaunchAttrs,
        events: LaunchEvents<'_, Event>,
        stream: Option<&Stream>,
        params: &[u8],
    ) -> DeviceResult<()> {
        let kernel = kernel_of(module, function)?;
        let mut pointers = param_pointers(params, &kernel.params, kernel.params_size)?;
        let kernel_params = if pointers.is_empty() { std::ptr::null_mut() } else { pointers.as_mut_ptr() };
        let [gx, gy, gz] = dims.grid;
        let [bx, by, bz] = dims.block;
        if attrs.any() || events.programmatic.is_some() || events.completion.is_some() {
            let mut list = launch_attributes(attrs, &events)?;
            let config = sys::CUlaunchConfig {
                gridDimX: gx,
                gridDimY: gy,
                gridDimZ: gz,
                blockDimX: bx,
                blockDimY: by,
                blockDimZ: bz,
                sharedMemBytes: dims.shared_mem_bytes,
                hStream: raw_stream(stream),
                attrs: list.as_mut_ptr(),
                numAttrs: list.len() as u32,
            };
            // SAFETY: as for cuLaunchKernel below; `config.attrs` points to
            // `numAttrs` initialized attributes that outlive the call, and
            // their events are live handles of this session.
            let r = unsafe { sys::cuLaunchKernelEx(&config, kernel.raw, kernel_params, std::ptr::null_mut()) };
            return driver::check(r, "cuLaunchKernelEx");
        }
        // SAFETY: `kernel.raw` belongs to `module`, which is alive; each
        // pointer addresses `size` readable bytes of `params` (checked
        // against the layout the driver reported), and the driver copies
        // the arguments before returning; the stream is null or live.
        let r = unsafe {
            sys::cuLaunchKernel(
                kernel.raw,
                gx,
                gy,
                gz,
                bx,
                by,
                bz,
                dims.shared_mem_bytes,
                raw_stream(stream),
                kernel_params,
                std::ptr::null_mut(),
            )
        };
        driver::check(r, "cuLaunchKernel")
    }

    fn limits(&mut self) -> Vec<(u32, u64)> {
        CONTEXT_LIMITS.filter_map(|l| get_limit(l).ok().map(|v| (l, v))).collect()
    }

    fn tensor_map(&mut self, request: &super::TensorMapRequest) -> DeviceResult<[u8; super::TENSOR_MAP_BYTES]> {
        driver::tensor_map(request)
    }

    fn set_limit(&mut self, limit: u32, value: u64) -> DeviceResult<u64> {
        let raw = limit_of(limit)?;
        let value = usize::try_from(value).map_err(|_| CallError::invalid_value(format!("limit value {value}")))?;
        // SAFETY: a known limit; the session's context is current on this thread.
        driver::check(unsafe { sys::cuCtxSetLimit(raw, value) }, "cuCtxSetLimit")?;
        get_limit(limit)
    }

    fn module_global(&mut self, module: &Module, name: &str) -> DeviceResult<(u64, u64)> {
        let name = CString::new(name)
            .map_err(|_| CallError::invalid_value("a module variable name cannot contain a NUL byte"))?;
        module.global(&name)
    }

    fn global_is_managed(&mut self, addr: u64) -> bool {
        driver::is_managed(addr)
    }

    fn occupancy(&mut self, module: &Module, function: usize, query: OccupancyQuery) -> DeviceResult<Occupancy> {
        let raw = kernel_of(module, function)?.raw;
        match query {
            OccupancyQuery::ActiveBlocks { block_size, dynamic_smem_bytes, flags } => {
                let block_size = c_int_of(block_size, "block size")?;
                let blocks = driver::occupancy_active_blocks(raw, block_size, host_len(dynamic_smem_bytes)?, flags)?;
                Ok(Occupancy { value: i64::from(blocks), block_size: 0 })
            }
            OccupancyQuery::PotentialBlockSize { block_size_limit, dynamic_smem_bytes, flags } => {
                let limit = c_int_of(block_size_limit, "block size limit")?;
                let (min_grid, block_size) =
                    driver::occupancy_potential_block_size(raw, host_len(dynamic_smem_bytes)?, limit, flags)?;
                Ok(Occupancy { value: i64::from(min_grid), block_size })
            }
            OccupancyQuery::AvailableDynamicSmem { num_blocks, block_size } => {
                let bytes = driver::occupancy_available_dynamic_smem(
                    raw,
                    c_int_of(num_blocks, "block count")?,
                    c_int_of(block_size, "block size")?,
                )?;
                Ok(Occupancy { value: i64::try_from(bytes).unwrap_or(i64::MAX), block_size: 0 })
            }
            OccupancyQuery::ActiveClusters { grid, block, cluster, dynamic_smem_bytes } => {
                let smem = u32::try_from(dynamic_smem_bytes)
                    .map_err(|_| CallError::invalid_value("dynamic shared memory does not fit in 32 bits"))?;
                let clusters = driver::occupancy_active_clusters(raw, grid, block, cluster, smem)?;
                Ok(Occupancy { value: i64::from(clusters), block_size: 0 })
            }
            OccupancyQuery::PotentialClusterSize { grid, block, dynamic_smem_bytes } => {
                let smem = u32::try_from(dynamic_smem_bytes)
                    .map_err(|_| CallError::invalid_value("dynamic shared memory does not fit in 32 bits"))?;
                let size = driver::occupancy_potential_cluster_size(raw, grid, block, smem)?;
                Ok(Occupancy { value: i64::from(size), block_size: 0 })
            }
        }
    }

    fn describe_function(&mut self, module: &Module, function: usize) -> DeviceResult<FunctionInfo> {
        describe(kernel_of(module, function)?.raw).map(|(_, info)| info)
    }

    fn func_set_attribute(
        &mut self,
        module: &mut Module,
        function: usize,
        attribute: u32,
        value: i32,
    ) -> DeviceResult<i32> {
        let raw = kernel_of(module, function)?.raw;
        driver::set_function_attribute(raw, attribute, value)?;
        // The driver may adjust what it stores; report what it reads back.
        Ok(driver::function_attribute(raw, attribute).unwrap_or(value))
    }

    fn stream_create(&mut self, flags: u32, priority: i32) -> DeviceResult<Stream> {
        Stream::new(self.device.context.clone(), flags, priority)
    }

    fn stream_set_attribute(
        &mut self,
        stream: Option<&Stream>,
        attribute: u32,
        value: &[u8; super::STREAM_ATTRIBUTE_BYTES],
    ) -> DeviceResult<()> {
        let id = stream_attribute_id(attribute)?;
        // An 8-byte aligned copy of the union for the driver to read.
        let mut words = [0u64; super::STREAM_ATTRIBUTE_BYTES / 8];
        for (w, chunk) in words.iter_mut().zip(value.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        // SAFETY: a live stream of this session (or the legacy stream); the
        // value is a CUstreamAttrValue-sized, aligned buffer alive for the call.
        let r = unsafe { sys::cuStreamSetAttribute(raw_stream(stream), id, words.as_ptr().cast()) };
        driver::check(r, "cuStreamSetAttribute")
    }

    fn stream_get_attribute(
        &mut self,
        stream: Option<&Stream>,
        attribute: u32,
    ) -> DeviceResult<[u8; super::STREAM_ATTRIBUTE_BYTES]> {
        let id = stream_attribute_id(attribute)?;
        let mut words = [0u64; super::STREAM_ATTRIBUTE_BYTES / 8];
        // SAFETY: as above; the driver writes at most the union's size.
        let r = unsafe { sys::cuStreamGetAttribute(raw_stream(stream), id, words.as_mut_ptr().cast()) };
        driver::check(r, "cuStreamGetAttribute")?;
        let mut value = [0u8; super::STREAM_ATTRIBUTE_BYTES];
        for (chunk, w) in value.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Ok(value)
    }

    fn stream_synchronize(&mut self, stream: Option<&Stream>) -> DeviceResult<()> {
        // SAFETY: null (default stream) or a live stream of this session.
        driver::check(unsafe { sys::cuStreamSynchronize(raw_stream(stream)) }, "cuStreamSynchronize")
    }

    fn stream_query(&mut self, stream: Option<&Stream>) -> DeviceResult<bool> {
        // SAFETY: null (default stream) or a live stream of this session.
        driver::check_ready(unsafe { sys::cuStreamQuery(raw_stream(stream)) }, "cuStreamQuery")
    }

    fn stream_wait_event(&mut self, stream: Option<&Stream>, event: &Event) -> DeviceResult<()> {
        // SAFETY: live event and null or live stream of this session.
        driver::check(unsafe { sys::cuStreamWaitEvent(raw_stream(stream), event.raw, 0) }, "cuStreamWaitEvent")
    }

    fn stream_mem_ops(&mut self, stream: Option<&Stream>, ops: &[MemOp]) -> DeviceResult<()> {
        let params: Vec<sys::CUstreamBatchMemOpParams> = ops.iter().map(batch_mem_op).collect();
        // SAFETY: `params` holds `ops.len()` initialised operations whose
        // words are this session's memory (checked by the session); the
        // stream is null or a live stream of this session.
        driver::check(
            unsafe {
                sys::cuStreamBatchMemOp_v2(raw_stream(stream), params.len() as u32, params.as_ptr().cast_mut(), 0)
            },
            "cuStreamBatchMemOp_v2",
        )
    }

    fn event_create(&mut self, flags: u32) -> DeviceResult<Event> {
        Event::new(self.device.context.clone(), flags)
    }

    fn event_ipc_export(&mut self, event: &Event) -> DeviceResult<[u8; gpupool_proto::ipc::HANDLE_BYTES]> {
        event.ipc_handle()
    }

    fn event_ipc_open(&mut self, handle: &[u8; gpupool_proto::ipc::HANDLE_BYTES]) -> DeviceResult<Event> {
        Event::open_ipc(self.device.context.clone(), handle)
    }

    fn event_record(&mut self, event: &mut Event, stream: Option<&Stream>) -> DeviceResult<()> {
        // SAFETY: live event and null or live stream of this session.
        driver::check(unsafe { sys::cuEventRecord(event.raw, raw_stream(stream)) }, "cuEventRecord")
    }

    fn event_query(&mut self, event: &Event) -> DeviceResult<bool> {
        // SAFETY: live event of this session.
        driver::check_ready(unsafe { sys::cuEventQuery(event.raw) }, "cuEventQuery")
    }

    fn event_synchronize(&mut self, event: &Event) -> DeviceResult<()> {
        // SAFETY: live event of this session.
        driver::check(unsafe { sys::cuEventSynchronize(event.raw) }, "cuEventSynchronize")
    }

    fn context_record_event(&mut self, event: &mut Event) -> DeviceResult<()> {
        // SAFETY: the session's live context and a live event made in it.
        driver::check(unsafe { sys::cuCtxRecordEvent(self.device.context.raw, event.raw) }, "cuCtxRecordEvent")
    }

    fn context_wait_event(&mut self, event: &Event) -> DeviceResult<()> {
        // SAFETY: as above.
        driver::check(unsafe { sys::cuCtxWaitEvent(self.device.context.raw, event.raw) }, "cuCtxWaitEvent")
    }

    fn event_elapsed(&mut self, start: &Event, end: &Event) -> DeviceResult<f32> {
        let mut ms = 0f32;
        // SAFETY: valid out-pointer and two live events of this session.
        driver::check(unsafe { sys::cuEventElapsedTime_v2(&mut ms, start.raw, end.raw) }, "cuEventElapsedTime_v2")?;
        Ok(ms)
    }

    /// Waits for the whole context. All sessions of a device share its
    /// primary context, so this also waits for other sessions' work.
    fn synchronize(&mut self) -> DeviceResult<()> {
        // SAFETY: the device's context is current on this thread.
        driver::check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
    }

    fn array_create(&mut self, desc: &super::texture::ArrayDesc, levels: u32) -> DeviceResult<Array> {
        texture::array_create(&self.device.context, desc, levels)
    }

    fn array_level(&mut self, mipmapped: &Array, level: u32) -> DeviceResult<Array> {
        texture::array_level(mipmapped, level)
    }

    fn array_copy(
        &mut self,
        stream: Option<&Stream>,
        dst: super::texture::Place<Array>,
        src: super::texture::Place<Array>,
        extent: super::texture::Extent,
    ) -> DeviceResult<()> {
        texture::array_copy(stream, dst, src, extent)
    }

    fn array_write(
        &mut self,
        stream: Option<&Stream>,
        dst: super::texture::Place<Array>,
        data: &[u8],
        extent: super::texture::Extent,
    ) -> DeviceResult<()> {
        let bounce = self.bounce.get_or_insert_with(|| pinned::Bounce::new(self.device.context.clone()));
        texture::array_write(stream, dst, data, extent, bounce)
    }

    fn array_read(
        &mut self,
        stream: Option<&Stream>,
        src: super::texture::Place<Array>,
        out: &mut [u8],
        extent: super::texture::Extent,
    ) -> DeviceResult<()> {
        let bounce = self.bounce.get_or_insert_with(|| pinned::Bounce::new(self.device.context.clone()));
        texture::array_read(stream, src, out, extent, bounce)
    }

    fn texture_create(
        &mut self,
        resource: super::texture::Resource<Array>,
        desc: &super::texture::TextureDesc,
        view: Option<&super::texture::ViewDesc>,
    ) -> DeviceResult<(u64, Object)> {
        texture::texture_create(resource, desc, view)
    }

    fn surface_create(&mut self, array: &Array) -> DeviceResult<(u64, Object)> {
        texture::surface_create(array)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver_present() -> bool {
        // SAFETY: only tries to dlopen libcuda.
        unsafe { sys::is_culib_present() }
    }

    #[test]
    fn device_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CudaDevice>();
    }

    #[test]
    fn open_without_a_driver_is_an_error_not_a_panic() {
        if driver_present() {
            eprintln!("libcuda is present: skipping the no-driver check");
            return;
        }
        let err = CudaDevice::open(0).expect_err("no driver here");
        assert_eq!(err.code, cuda::NO_DEVICE);
        assert!(err.message.contains("libcuda"), "{}", err.message);
    }

    /// Module variables, function attributes and occupancy on a real GPU;
    /// skipped where there is no CUDA device.
    #[test]
    fn globals_attributes_and_occupancy_on_a_gpu() {
        let dev = match CudaDevice::open(0) {
            Err(e) if e.code == cuda::NO_DEVICE => {
                eprintln!("no CUDA device: skipping ({e})");
                return;
            }
            other => other.expect("open device 0"),
        };
        let mut s = dev.open_session(64 << 20).expect("session");
        let (mut module, functions) = s.load_module(super::super::GLOBALS_PTX).expect("load PTX");
        assert_eq!(functions.len(), 1);
        let f = &functions[0];
        assert_eq!(f.name, "bump");
        eprintln!("bump's attributes: {:?}", f.attributes);
        for a in 0..=9 {
            assert!(f.attributes.contains_key(&a), "attribute {a} missing: {:?}", f.attributes);
        }
        assert_eq!(f.attributes.get(&0), Some(&(f.max_threads_per_block as i32)));

        let (addr, size) = s.module_global(&module, "counter").expect("counter");
        assert_eq!(size, 64);
        assert!(!s.reservation.contains(addr, size), "variables live outside the session's range");
        assert_eq!(s.module_global(&module, "missing").expect_err("missing").code, cuda::NOT_FOUND);
        assert_eq!(s.module_global(&module, "a\0b").expect_err("NUL").code, cuda::INVALID_VALUE);
        s.write(None, addr, &[1, 2, 3, 4]).expect("write variable");
        let mut back = [0u8; 4];
        s.read(None, addr, &mut back).expect("read variable");
        assert_eq!(back, [1, 2, 3, 4]);

        let active = OccupancyQuery::ActiveBlocks { block_size: 256, dynamic_smem_bytes: 0, flags: 0 };
        let blocks = s.occupancy(&module, 0, active).expect("active blocks");
        let potential = OccupancyQuery::PotentialBlockSize { block_size_limit: 0, dynamic_smem_bytes: 0, flags: 0 };
        let best = s.occupancy(&module, 0, potential).expect("potential block size");
        let available = OccupancyQuery::AvailableDynamicSmem { num_blocks: 1, block_size: 256 };
        let smem = s.occupancy(&module, 0, available).expect("available smem");
        eprintln!("occupancy: active {blocks:?}, potential {best:?}, available {smem:?}");
        assert!(blocks.value >= 1 && best.value >= 1 && best.block_size >= 32 && smem.value > 0);
        let too_big = OccupancyQuery::ActiveBlocks { block_size: u32::MAX, dynamic_smem_bytes: 0, flags: 0 };
        assert_eq!(s.occupancy(&module, 0, too_big).expect_err("block size").code, cuda::INVALID_VALUE);
        assert_eq!(s.occupancy(&module, 1, active).expect_err("no function 1").code, cuda::INVALID_HANDLE);

        assert_eq!(s.func_set_attribute(&mut module, 0, 8, 100_000), Ok(100_000));
        assert_eq!(s.func_set_attribute(&mut module, 0, 9, 50), Ok(50));
        let err = s.func_set_attribute(&mut module, 0, 8, 10_000_000).expect_err("too much smem");
        assert_eq!(err.code, cuda::INVALID_VALUE, "{err}");
        let err = s.func_set_attribute(&mut module, 0, 0, 1).expect_err("read-only");
        eprintln!("setting MAX_THREADS_PER_BLOCK: {err}");
        let err = s.func_set_attribute(&mut module, 0, 999, 0).expect_err("unknown attribute");
        assert_eq!(err.code, cuda::INVALID_VALUE, "{err}");
        let smem = s.occupancy(&module, 0, available).expect("available smem");
        eprintln!("available smem after raising the limit: {smem:?}");
    }

    #[test]
    fn open_of_a_missing_ordinal_is_an_error() {
        let err = CudaDevice::open(usize::MAX).expect_err("no such device");
        assert!(err.code == cuda::NO_DEVICE || err.code == INVALID_DEVICE, "{err}");
    }

    #[test]
    fn image_kinds_are_recognised() {
        assert_eq!(image_kind(b"\x7fELF\x02\x01"), ImageKind::Cubin);
        assert_eq!(image_kind(&[0x50, 0xed, 0x55, 0xba, 1, 0]), ImageKind::Fatbin);
        assert_eq!(image_kind(&[0xb1, 0x43, 0x62, 0x46, 1, 0]), ImageKind::FatbinWrapper);
        assert_eq!(image_kind(b".version 8.0\n.target sm_90"), ImageKind::Ptx);
        assert_eq!(image_kind(b"ab"), ImageKind::Ptx);
    }

    #[test]
    fn ptx_is_nul_terminated_once() {
        let ptx = prepare_image(b".version 8.0").expect("ptx");
        assert_eq!(ptx.bytes(), b".version 8.0\0");
        let ptx = prepare_image(b".version 8.0\0").expect("ptx");
        assert!(matches!(ptx, Prepared::Borrowed(_)));
    }

    #[test]
    fn bad_images_are_refused() {
        assert_eq!(prepare_image(b"").expect_err("empty").code, cuda::INVALID_IMAGE);
        let wrapper = [0xb1, 0x43, 0x62, 0x46, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(prepare_image(&wrapper).expect_err("wrapper").code, cuda::INVALID_IMAGE);
    }

    #[test]
    fn binary_images_are_aligned() {
        let mut buf = [0u8; 72];
        // One byte past an 8-byte boundary, so the image is misaligned.
        let start = buf.as_ptr().align_offset(8) + 1;
        buf[start..start + 4].copy_from_slice(b"\x7fELF");
        let image = &buf[start..start + 61];
        assert_ne!(image.as_ptr().align_offset(8), 0);
        let prepared = prepare_image(image).expect("cubin");
        assert_eq!(prepared.bytes(), image);
        assert_eq!(prepared.bytes().as_ptr().align_offset(8), 0);
    }

    #[test]
    fn param_pointers_follow_the_layout() {
        let layout = [Param { offset: 0, size: 4 }, Param { offset: 8, size: 8 }];
        let params = [0u8; 16];
        let pointers = param_pointers(&params, &layout, 16).expect("pointers");
        assert_eq!(pointers.len(), 2);
        assert_eq!(pointers[0] as usize, params.as_ptr() as usize);
        assert_eq!(pointers[1] as usize, params.as_ptr() as usize + 8);
        let err = param_pointers(&params[..12], &layout, 16).expect_err("short buffer");
        assert_eq!(err.code, cuda::INVALID_VALUE);
        assert!(param_pointers(&[], &[], 0).expect("no params").is_empty());
    }

    #[test]
    fn builtin_kernels_are_ordered_like_the_reference() {
        let mut found: Vec<(usize, FunctionInfo)> = builtin::functions().into_iter().enumerate().collect();
        found.reverse();
        let ordered = order_like_builtin(found).expect("all present");
        let names: Vec<_> = ordered.iter().map(|(_, f)| f.name.clone()).collect();
        let expected: Vec<_> = builtin::functions().into_iter().map(|f| f.name).collect();
        assert_eq!(names, expected);
        assert_eq!(ordered.iter().map(|(i, _)| *i).collect::<Vec<_>>(), (0..expected.len()).collect::<Vec<_>>());

        let mut missing: Vec<(usize, FunctionInfo)> = builtin::functions().into_iter().enumerate().collect();
        missing.pop();
        assert_eq!(order_like_builtin(missing).expect_err("one missing").code, cuda::NOT_FOUND);
    }

    #[test]
    fn sizes_round_up_to_the_granularity() {
        assert_eq!(round_up(1, 2 << 20), Some(2 << 20));
        assert_eq!(round_up(2 << 20, 2 << 20), Some(2 << 20));
        assert_eq!(round_up(u64::MAX, 2 << 20), None);
    }
}
