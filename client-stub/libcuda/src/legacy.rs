//! The pre-rename symbols NVIDIA's driver still exports beside the names
//! `cuda.h` maps to (`cuCtxPushCurrent` beside `cuCtxPushCurrent_v2`,
//! `cuMemAlloc` beside `cuMemAlloc_v2`), and the interop entry points
//! (OpenGL, EGL, VDPAU) that cudarc's bindings leave out.
//!
//! Libraries do look these up by symbol: cuBLASLt `dlsym`s a fixed table of
//! driver functions from `libcuda.so.1`, among them the unsuffixed
//! `cuCtxPushCurrent`, `cuCtxPopCurrent`, `cuDevicePrimaryCtxRelease` and
//! `cuDevicePrimaryCtxReset`, and gives up (`cublasCreate` answers
//! `CUBLAS_STATUS_INTERNAL_ERROR`) when one is missing.
//!
//! - A legacy name whose signature is its successor's forwards to it.
//! - A legacy name with a different ABI (the 32-bit `CUdeviceptr` and size
//!   arguments of CUDA 3.1 and earlier, the old graph-node and prefetch
//!   structures) answers `CUDA_ERROR_NOT_SUPPORTED`, as do the interop
//!   entry points: a remote GPU has no display to share buffers with.
//!
//! These symbols stay out of `cuGetProcAddress`'s name table, where they
//! would shadow the `_v2` a base name resolves to; a request for an older
//! version that `cuda.h` mapped to one of them reaches them through
//! [`table`] (see `proc_address`). The list is the symbols NVIDIA's
//! driver exports (`nm -D libcuda.so.1`) minus cudarc's CUDA 13.0 names
//! and the debugger's `cudbg*` hooks.

use cudarc::driver::sys::{CUcontext, CUdevice, CUdeviceptr, CUevent, CUlinkState, CUresult, CUstream};
use std::ffi::{c_char, c_uint, c_void};

/// Exports `$name` with `$target`'s signature, forwarding to it.
macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*) => $target:path;)*) => {
        $(
            /// Same signature and behaviour as its successor.
            ///
            /// # Safety
            /// Pointer arguments follow the CUDA driver API's contract.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
                // SAFETY: the caller's contract is the successor's.
                unsafe { $target($($arg),*) }
            }
        )*
        fn forwarded() -> Vec<(&'static str, usize)> {
            vec![$((stringify!($name), $name as *const () as usize)),*]
        }
    };
}

forward! {
    cuCtxCreate(pctx: *mut CUcontext, flags: c_uint, dev: CUdevice) => crate::context::cuCtxCreate_v2;
    cuCtxDestroy(ctx: CUcontext) => crate::context::cuCtxDestroy_v2;
    cuCtxPushCurrent(ctx: CUcontext) => crate::context::cuCtxPushCurrent_v2;
    cuCtxPopCurrent(pctx: *mut CUcontext) => crate::context::cuCtxPopCurrent_v2;
    cuDevicePrimaryCtxRelease(dev: CUdevice) => crate::context::cuDevicePrimaryCtxRelease_v2;
    cuDevicePrimaryCtxReset(dev: CUdevice) => crate::context::cuDevicePrimaryCtxReset_v2;
    cuDevicePrimaryCtxSetFlags(dev: CUdevice, flags: c_uint) => crate::context::cuDevicePrimaryCtxSetFlags_v2;
    cuEventDestroy(e: CUevent) => crate::stream::cuEventDestroy_v2;
    cuStreamDestroy(s: CUstream) => crate::stream::cuStreamDestroy_v2;
    cuMemHostRegister(p: *mut c_void, bytesize: usize, flags: c_uint) => crate::memory::cuMemHostRegister_v2;
    cuLinkCreate(n: c_uint, options: *mut c_uint, values: *mut *mut c_void, state: *mut CUlinkState) => crate::link::cuLinkCreate_v2;
    cuStreamWaitValue32(h: CUstream, addr: CUdeviceptr, value: u32, flags: c_uint) => crate::mem_ops::cuStreamWaitValue32_v2;
    cuStreamWaitValue32_ptsz(h: CUstream, addr: CUdeviceptr, value: u32, flags: c_uint) => crate::mem_ops::cuStreamWaitValue32_v2_ptsz;
    cuStreamWaitValue64(h: CUstream, addr: CUdeviceptr, value: u64, flags: c_uint) => crate::mem_ops::cuStreamWaitValue64_v2;
    cuStreamWaitValue64_ptsz(h: CUstream, addr: CUdeviceptr, value: u64, flags: c_uint) => crate::mem_ops::cuStreamWaitValue64_v2_ptsz;
    cuStreamWriteValue32(h: CUstream, addr: CUdeviceptr, value: u32, flags: c_uint) => crate::mem_ops::cuStreamWriteValue32_v2;
    cuStreamWriteValue32_ptsz(h: CUstream, addr: CUdeviceptr, value: u32, flags: c_uint) => crate::mem_ops::cuStreamWriteValue32_v2_ptsz;
    cuStreamWriteValue64(h: CUstream, addr: CUdeviceptr, value: u64, flags: c_uint) => crate::mem_ops::cuStreamWriteValue64_v2;
    cuStreamWriteValue64_ptsz(h: CUstream, addr: CUdeviceptr, value: u64, flags: c_uint) => crate::mem_ops::cuStreamWriteValue64_v2_ptsz;
    cuStreamBatchMemOp(h: CUstream, count: c_uint, params: *mut c_void, flags: c_uint) => crate::mem_ops::cuStreamBatchMemOp_v2;
    cuStreamBatchMemOp_ptsz(h: CUstream, count: c_uint, params: *mut c_void, flags: c_uint) => crate::mem_ops::cuStreamBatchMemOp_v2_ptsz;
    cuLinkAddData(state: CUlinkState, kind: c_uint, data: *mut c_void, size: usize, name: *const c_char, n: c_uint, options: *mut c_uint, values: *mut *mut c_void) => crate::link::cuLinkAddData_v2;
    cuLinkAddFile(state: CUlinkState, kind: c_uint, path: *const c_char, n: c_uint, options: *mut c_uint, values: *mut *mut c_void) => crate::link::cuLinkAddFile_v2;
}

/// Legacy exports that answer `CUDA_ERROR_NOT_SUPPORTED`.
pub mod not_supported {
    crate::unsupported! {
        // 32-bit device pointers and sizes (CUDA 3.1 and earlier).
        cuArray3DCreate
        cuArray3DGetDescriptor
        cuArrayCreate
        cuArrayGetDescriptor
        cuDeviceTotalMem
        cuGraphicsResourceGetMappedPointer
        cuMemAlloc
        cuMemAllocHost
        cuMemAllocPitch
        cuMemFree
        cuMemGetAddressRange
        cuMemGetInfo
        cuMemHostGetDevicePointer
        cuMemcpy2D
        cuMemcpy2DAsync
        cuMemcpy2DUnaligned
        cuMemcpy3D
        cuMemcpy3DAsync
        cuMemcpyAtoA
        cuMemcpyAtoD
        cuMemcpyAtoH
        cuMemcpyAtoHAsync
        cuMemcpyDtoA
        cuMemcpyDtoD
        cuMemcpyDtoDAsync
        cuMemcpyDtoH
        cuMemcpyDtoHAsync
        cuMemcpyHtoA
        cuMemcpyHtoAAsync
        cuMemcpyHtoD
        cuMemcpyHtoDAsync
        cuMemsetD16
        cuMemsetD2D16
        cuMemsetD2D32
        cuMemsetD2D8
        cuMemsetD32
        cuMemsetD8
        cuModuleGetGlobal
        cuTexRefGetAddress
        cuTexRefSetAddress
        cuTexRefSetAddress2D
        cuTexRefSetAddress2D_v2
        // Older structures or argument lists than their successors'.
        cuMemGetAttribute
        cuMemGetAttribute_v2
        // Same signature as a successor gpupool does not implement either.
        cuGraphicsResourceSetMapFlags
        cuIpcOpenMemHandle
        // Per-thread-default-stream variants of unimplemented functions.
        cuGraphicsMapResources_ptsz
        cuGraphicsUnmapResources_ptsz
        cuMemMapArrayAsync_ptsz
        cuSignalExternalSemaphoresAsync_ptsz
        cuWaitExternalSemaphoresAsync_ptsz
        // Graphics and stream interop: a remote GPU shares no display.
        cuDeviceGetNvSciSyncAttributes
        cuEGLApiInit
        cuEGLStreamConsumerAcquireFrame
        cuEGLStreamConsumerConnect
        cuEGLStreamConsumerConnectWithFlags
        cuEGLStreamConsumerDisconnect
        cuEGLStreamConsumerReleaseFrame
        cuEGLStreamProducerConnect
        cuEGLStreamProducerDisconnect
        cuEGLStreamProducerPresentFrame
        cuEGLStreamProducerReturnFrame
        cuGLCtxCreate
        cuGLCtxCreate_v2
        cuGLGetDevices
        cuGLGetDevices_v2
        cuGLInit
        cuGLMapBufferObject
        cuGLMapBufferObjectAsync
        cuGLMapBufferObjectAsync_v2
        cuGLMapBufferObjectAsync_v2_ptsz
        cuGLMapBufferObject_v2
        cuGLMapBufferObject_v2_ptds
        cuGLRegisterBufferObject
        cuGLSetBufferObjectMapFlags
        cuGLUnmapBufferObject
        cuGLUnmapBufferObjectAsync
        cuGLUnregisterBufferObject
        cuGraphicsEGLRegisterImage
        cuGraphicsGLRegisterBuffer
        cuGraphicsGLRegisterImage
        cuGraphicsResourceGetMappedEglFrame
        cuGraphicsVDPAURegisterOutputSurface
        cuGraphicsVDPAURegisterVideoSurface
        cuVDPAUCtxCreate
        cuVDPAUCtxCreate_v2
        cuVDPAUGetDevice
    }
}

/// Every legacy export, for the version-specific lookups of
/// `cuGetProcAddress`.
pub(crate) fn table() -> Vec<(&'static str, usize)> {
    let mut all = forwarded();
    all.extend(crate::managed::legacy::table());
    all.extend(not_supported::table());
    all
}
