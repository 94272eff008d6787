//! Domain types that own CUDA resources and release them in `Drop`.
//!
//! Ownership encodes the release order the driver needs: every resource
//! holds the primary context ([`Context`]) so it is released before the
//! context is; every [`Mapping`] holds the session's [`Reservation`] so the
//! address range is freed only after the last mapping in it is unmapped.

use super::driver::{self, warn_on_error};
use crate::device::{DeviceResult, Param};
use cudarc::driver::sys::{
    self, CUcontext, CUdevice, CUdeviceptr, CUevent, CUfunction, CUmemGenericAllocationHandle, CUmodule, CUstream,
};
use std::rc::Rc;
use std::sync::Arc;

/// The retained primary context of one device.
#[derive(Debug)]
pub(super) struct Context {
    pub(super) device: CUdevice,
    pub(super) raw: CUcontext,
}

// SAFETY: a primary context is a process-wide driver object; any thread may
// make it current (`cuCtxSetCurrent`) and use it, and the driver serialises
// access internally. `Context` itself only releases it in `Drop`.
unsafe impl Send for Context {}
// SAFETY: as above; `&Context` exposes only the plain handle values.
unsafe impl Sync for Context {}

impl Context {
    /// Retains the primary context of `device` (creating it if needed).
    pub(super) fn retain(device: CUdevice) -> DeviceResult<Self> {
        let mut raw: CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer; `device` came from cuDeviceGet.
        driver::check(unsafe { sys::cuDevicePrimaryCtxRetain(&mut raw, device) }, "cuDevicePrimaryCtxRetain")?;
        Ok(Self { device, raw })
    }

    /// Makes the context current on the calling thread.
    pub(super) fn make_current(&self) -> DeviceResult<()> {
        // SAFETY: `self.raw` is a retained, live primary context.
        driver::check(unsafe { sys::cuCtxSetCurrent(self.raw) }, "cuCtxSetCurrent")
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `Context::retain`; every resource
        // created in the context holds an `Arc<Context>`, so none is left.
        warn_on_error(unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) }, "cuDevicePrimaryCtxRelease_v2");
    }
}

/// A session's reserved device address range.
#[derive(Debug)]
pub(super) struct Reservation {
    pub(super) base: CUdeviceptr,
    pub(super) size: u64,
    _context: Arc<Context>,
}

impl Reservation {
    /// Reserves `size` bytes (a multiple of `alignment`) aligned to
    /// `alignment`, at `want` (0: anywhere). The driver takes the
    /// address as a hint: a range it places elsewhere is given back and
    /// the reservation refused.
    pub(super) fn at(context: Arc<Context>, size: u64, alignment: u64, want: CUdeviceptr) -> DeviceResult<Self> {
        let mut base: CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the context is current on this thread
        // (set by the caller); `want` is only a hint to the driver.
        let r = unsafe { sys::cuMemAddressReserve(&mut base, size as usize, alignment as usize, want, 0) };
        driver::check(r, "cuMemAddressReserve")?;
        let reservation = Self { base, size, _context: context };
        if want != 0 && base != want {
            return Err(crate::error::CallError::out_of_memory(format!(
                "the address range {want:#x} (+{size}) is taken on this device (the driver offered {base:#x})"
            )));
        }
        Ok(reservation)
    }

    pub(super) fn contains(&self, addr: u64, size: u64) -> bool {
        addr >= self.base && addr.checked_add(size).is_some_and(|end| end <= self.base + self.size)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the range came from cuMemAddressReserve with this size;
        // mappings hold an `Rc<Reservation>`, so all are unmapped by now.
        warn_on_error(unsafe { sys::cuMemAddressFree(self.base, self.size as usize) }, "cuMemAddressFree");
    }
}

/// Physical device memory from `cuMemCreate`, mapped nowhere by itself.
/// Every [`Mapping`] of it holds it, so the driver's handle is released
/// after the last mapping is unmapped and the last owner let go.
#[derive(Debug)]
pub struct Allocation {
    handle: CUmemGenericAllocationHandle,
    pub(super) size: u64,
    _context: Arc<Context>,
}

impl Allocation {
    /// Creates `size` bytes (a multiple of the granularity, checked by the
    /// caller) of pinned memory on the context's device.
    pub(super) fn create(context: Arc<Context>, size: u64) -> DeviceResult<Self> {
        let prop = allocation_prop(device_location(context.device));
        let mut handle: CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer and a fully initialised property struct.
        driver::check(unsafe { sys::cuMemCreate(&mut handle, size as usize, &prop, 0) }, "cuMemCreate")?;
        Ok(Self { handle, size, _context: context })
    }

    /// [`Self::create`] with compression asked for; `true` when the driver
    /// granted it (it may not: limited compression resources, or a size
    /// that is not a multiple of the compressible granularity, which then
    /// gets plain memory, as the application would natively).
    pub(super) fn create_compressible(context: Arc<Context>, size: u64) -> DeviceResult<(Self, bool)> {
        let mut prop = allocation_prop(device_location(context.device));
        prop.allocFlags.compressionType = COMP_GENERIC;
        let mut handle: CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer and a fully initialised property struct.
        let r = unsafe { sys::cuMemCreate(&mut handle, size as usize, &prop, 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            tracing::debug!(?r, size, "compressible cuMemCreate refused; plain memory instead");
            return Ok((Self::create(context, size)?, false));
        }
        let allocation = Self { handle, size, _context: context };
        let mut granted = allocation_prop(device_location(allocation._context.device));
        // SAFETY: valid out-pointer; the handle is live.
        driver::check(
            unsafe { sys::cuMemGetAllocationPropertiesFromHandle(&mut granted, allocation.handle) },
            "cuMemGetAllocationPropertiesFromHandle",
        )?;
        Ok((allocation, granted.allocFlags.compressionType == COMP_GENERIC))
    }
}

/// `CU_MEM_ALLOCATION_COMP_GENERIC`.
const COMP_GENERIC: u8 = 1;

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: the handle came from cuMemCreate and is released only
        // here; mappings of it hold an `Rc<Allocation>`, so none is left.
        warn_on_error(unsafe { sys::cuMemRelease(self.handle) }, "cuMemRelease");
    }
}

/// Device memory mapped at a fixed address of the session's range.
#[derive(Debug)]
pub struct Mapping {
    addr: CUdeviceptr,
    size: u64,
    // Field order is drop order: `Drop` unmaps, then the memory may be
    // released, then the reservation freed.
    _allocation: Rc<Allocation>,
    _reservation: Rc<Reservation>,
}

impl Mapping {
    /// Maps `size` bytes of `allocation` from `offset` at `addr`, with no
    /// access yet. Sizes, offset and address are multiples of the
    /// granularity, the range lies inside `reservation` and inside the
    /// allocation (checked by the caller).
    pub(super) fn new(
        reservation: Rc<Reservation>,
        allocation: Rc<Allocation>,
        offset: u64,
        addr: u64,
        size: u64,
    ) -> DeviceResult<Self> {
        // SAFETY: `[addr, addr + size)` lies inside the live reservation
        // and `[offset, offset + size)` inside the live allocation.
        let r = unsafe { sys::cuMemMap(addr, size as usize, offset as usize, allocation.handle, 0) };
        driver::check(r, "cuMemMap")?;
        // From here on, `Drop` unmaps.
        Ok(Self { addr, size, _allocation: allocation, _reservation: reservation })
    }

    /// Sets `device`'s access to the whole mapping (`CUmemAccess_flags`:
    /// 0, 1 or 3, checked here).
    pub(super) fn set_access(&self, device: CUdevice, flags: u32) -> DeviceResult<()> {
        use sys::CUmemAccess_flags as F;
        let flags = match flags {
            0 => F::CU_MEM_ACCESS_FLAGS_PROT_NONE,
            1 => F::CU_MEM_ACCESS_FLAGS_PROT_READ,
            3 => F::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            other => return Err(crate::error::CallError::invalid_value(format!("unknown access flags {other}"))),
        };
        let access = sys::CUmemAccessDesc { location: device_location(device), flags };
        // SAFETY: the range is mapped (it is this mapping); one descriptor is passed.
        driver::check(unsafe { sys::cuMemSetAccess(self.addr, self.size as usize, &access, 1) }, "cuMemSetAccess")
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped in `Mapping::new` and is unmapped
        // only here; the physical memory is released afterwards, with the
        // last `Rc<Allocation>`.
        warn_on_error(unsafe { sys::cuMemUnmap(self.addr, self.size as usize) }, "cuMemUnmap");
    }
}

/// The location of `device`'s memory.
pub(super) fn device_location(device: CUdevice) -> sys::CUmemLocation {
    sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: device }
}

/// Properties of a pinned allocation on `location`'s device.
pub(super) fn allocation_prop(location: sys::CUmemLocation) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location,
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// One kernel of a loaded module: its handle and the parameter layout the
/// driver reported at load.
#[derive(Debug)]
pub(super) struct Kernel {
    pub(super) raw: CUfunction,
    pub(super) params: Vec<Param>,
    pub(super) params_size: usize,
}

/// A loaded module; its kernels are indexed as returned by `load_module`.
#[derive(Debug)]
pub struct Module {
    raw: CUmodule,
    pub(super) kernels: Vec<Kernel>,
    _context: Arc<Context>,
}

impl Module {
    /// Loads `image` (a cubin, fatbin, or NUL-terminated PTX) into the
    /// current context.
    pub(super) fn load(context: Arc<Context>, image: &[u8]) -> DeviceResult<Self> {
        let mut raw: CUmodule = std::ptr::null_mut();
        // SAFETY: valid out-pointer; `image` is a complete image in the
        // form the driver expects (PTX terminated by NUL, checked by the
        // caller) and outlives the call, which copies what it needs.
        driver::check(unsafe { sys::cuModuleLoadData(&mut raw, image.as_ptr().cast()) }, "cuModuleLoadData")?;
        Ok(Self { raw, kernels: Vec::new(), _context: context })
    }

    /// Address and size of the module variable `name` (`__device__` or
    /// `__constant__`); `CUDA_ERROR_NOT_FOUND` when there is none.
    pub(super) fn global(&self, name: &std::ffi::CStr) -> DeviceResult<(u64, u64)> {
        driver::module_global(self.raw, name)
    }

    /// Every function of the module, in the driver's order.
    pub(super) fn functions(&self) -> DeviceResult<Vec<CUfunction>> {
        let mut count: std::ffi::c_uint = 0;
        // SAFETY: valid out-pointer on a live module.
        driver::check(unsafe { sys::cuModuleGetFunctionCount(&mut count, self.raw) }, "cuModuleGetFunctionCount")?;
        let mut functions: Vec<CUfunction> = vec![std::ptr::null_mut(); count as usize];
        if count > 0 {
            // SAFETY: `functions` has room for exactly `count` handles.
            let r = unsafe { sys::cuModuleEnumerateFunctions(functions.as_mut_ptr(), count, self.raw) };
            driver::check(r, "cuModuleEnumerateFunctions")?;
        }
        Ok(functions)
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: the module came from cuModuleLoadData and is unloaded
        // only here; its function handles die with it (they live in `self`).
        warn_on_error(unsafe { sys::cuModuleUnload(self.raw) }, "cuModuleUnload");
    }
}

/// A stream created by the session.
#[derive(Debug)]
pub struct Stream {
    pub(super) raw: CUstream,
    _context: Arc<Context>,
}

impl Stream {
    pub(super) fn new(context: Arc<Context>, flags: u32, priority: i32) -> DeviceResult<Self> {
        let mut raw: CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current on this thread.
        let r = unsafe { sys::cuStreamCreateWithPriority(&mut raw, flags, priority) };
        driver::check(r, "cuStreamCreateWithPriority")?;
        Ok(Self { raw, _context: context })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the stream came from cuStreamCreateWithPriority and is
        // destroyed only here (pending work still completes).
        warn_on_error(unsafe { sys::cuStreamDestroy_v2(self.raw) }, "cuStreamDestroy_v2");
    }
}

/// An event created by the session.
#[derive(Debug)]
pub struct Event {
    pub(super) raw: CUevent,
    _context: Arc<Context>,
}

impl Event {
    pub(super) fn new(context: Arc<Context>, flags: u32) -> DeviceResult<Self> {
        let mut raw: CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current on this thread.
        driver::check(unsafe { sys::cuEventCreate(&mut raw, flags) }, "cuEventCreate")?;
        Ok(Self { raw, _context: context })
    }

    /// The event another process exported as `handle` (the driver's bytes;
    /// `cuIpcOpenEventHandle`).
    pub(super) fn open_ipc(
        context: Arc<Context>,
        handle: &[u8; gpupool_proto::ipc::HANDLE_BYTES],
    ) -> DeviceResult<Self> {
        let handle = sys::CUipcEventHandle { reserved: handle.map(|b| b as std::ffi::c_char) };
        let mut raw: CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the handle is passed by value; the
        // context is current on this thread.
        driver::check(unsafe { sys::cuIpcOpenEventHandle(&mut raw, handle) }, "cuIpcOpenEventHandle")?;
        // Destroyed as any event: the driver keeps the exporter's alive.
        Ok(Self { raw, _context: context })
    }

    /// The driver's handle of this event (`cuIpcGetEventHandle`).
    pub(super) fn ipc_handle(&self) -> DeviceResult<[u8; gpupool_proto::ipc::HANDLE_BYTES]> {
        let mut handle = sys::CUipcEventHandle { reserved: [0; gpupool_proto::ipc::HANDLE_BYTES] };
        // SAFETY: valid out-pointer and a live event of this session.
        driver::check(unsafe { sys::cuIpcGetEventHandle(&mut handle, self.raw) }, "cuIpcGetEventHandle")?;
        Ok(handle.reserved.map(|b| b as u8))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event came from cuEventCreate and is destroyed only here.
        warn_on_error(unsafe { sys::cuEventDestroy_v2(self.raw) }, "cuEventDestroy_v2");
    }
}

/// A client's shared host region registered with the driver
/// (`cuMemHostRegister`): copies between it and the device are DMA from
/// and to the client's pages. Dropped before the region is unmapped.
#[derive(Debug)]
pub(super) struct HostRegistration {
    /// The mapping's first byte, as registered.
    base: usize,
    context: Arc<Context>,
}

impl HostRegistration {
    /// Registers `[base, base + len)`.
    ///
    /// # Safety
    /// The range is mapped host memory that stays mapped until the
    /// registration drops.
    pub(super) unsafe fn register(context: Arc<Context>, base: *mut u8, len: usize) -> DeviceResult<Self> {
        // A thread of the shared-memory attachment, not a session's: the
        // primary context is made current here first.
        context.make_current()?;
        // Portable: pinned for every context of the process, whichever the
        // session's copies run in; mapped into the device's address space
        // (where the host pointer is the device pointer, it is one: the
        // program's pinned pointers then work on the device as natively).
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        // SAFETY: the caller guarantees the range is mapped for its
        // lifetime.
        driver::check(unsafe { sys::cuMemHostRegister_v2(base.cast(), len, flags) }, "cuMemHostRegister_v2")?;
        Ok(Self { base: base as usize, context })
    }

    /// The device address of the registered range's first byte.
    pub(super) fn device_address(&self) -> DeviceResult<u64> {
        self.context.make_current()?;
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; `base` is registered (with DEVICEMAP)
        // while `self` lives.
        driver::check(
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, self.base as *mut std::ffi::c_void, 0) },
            "cuMemHostGetDevicePointer_v2",
        )?;
        Ok(device)
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if let Err(e) = self.context.make_current() {
            tracing::warn!(error = %e, "cannot unregister a host region: its context cannot be made current");
            return;
        }
        // Copies queued from or into the region (asynchronous ones from
        // the program's pinned memory) must finish before its pages go.
        // SAFETY: the context is current on this thread.
        warn_on_error(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize");
        // SAFETY: `base` was registered by `register` and is still mapped
        // (the owner unmaps after this drop).
        warn_on_error(unsafe { sys::cuMemHostUnregister(self.base as *mut std::ffi::c_void) }, "cuMemHostUnregister");
    }
}
