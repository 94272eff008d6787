//! Entry points of the CUDA 13.0 driver API that gpupool does not
//! implement. Each is exported (programs linked against libcuda find every
//! symbol) and resolvable through `cuGetProcAddress`; a call returns
//! `CUDA_ERROR_NOT_SUPPORTED` and logs the name once.
//!
//! The stubs take no parameters: under the C calling conventions of the
//! platforms gpupool ships for (x86-64 and AArch64 System V), the caller
//! passes and cleans up the arguments, so a callee that ignores them is
//! safe whatever the real signature.
//!
//! The list is the CUDA 13.0 driver API (cudarc's `sys` bindings) minus
//! what the other modules export and the legacy names. It is generated:
//! `GPUPOOL_WRITE_SYMBOLS=1 cargo test -p gpupool-libcuda symbol_lists`
//! rewrites it, and the same test without the variable fails when it is out
//! of date (`proc_address::symbol_lists`, `gpupool_ffi::symbols`).

crate::unsupported! {
    cuArrayGetMemoryRequirements
    cuArrayGetPlane
    cuArrayGetSparseProperties
    cuCoredumpGetAttribute
    cuCoredumpGetAttributeGlobal
    cuCoredumpSetAttribute
    cuCoredumpSetAttributeGlobal
    cuCtxAttach
    cuCtxDetach
    cuCtxDisablePeerAccess
    cuCtxEnablePeerAccess
    cuCtxFromGreenCtx
    cuCtxGetDevResource
    cuCtxGetExecAffinity
    cuDestroyExternalMemory
    cuDestroyExternalSemaphore
    cuDevResourceGenerateDesc
    cuDevSmResourceSplitByCount
    cuDeviceGetDevResource
    cuDeviceGetHostAtomicCapabilities
    cuDeviceGetP2PAtomicCapabilities
    cuDeviceGetP2PAttribute
    cuDeviceGetTexture1DLinearMaxWidth
    cuDeviceRegisterAsyncNotification
    cuDeviceUnregisterAsyncNotification
    cuExternalMemoryGetMappedBuffer
    cuExternalMemoryGetMappedMipmappedArray
    cuFlushGPUDirectRDMAWrites
    cuGraphAddExternalSemaphoresSignalNode
    cuGraphAddExternalSemaphoresWaitNode
    cuGraphExecExternalSemaphoresSignalNodeSetParams
    cuGraphExecExternalSemaphoresWaitNodeSetParams
    cuGraphExternalSemaphoresSignalNodeGetParams
    cuGraphExternalSemaphoresSignalNodeSetParams
    cuGraphExternalSemaphoresWaitNodeGetParams
    cuGraphExternalSemaphoresWaitNodeSetParams
    cuGraphicsMapResources
    cuGraphicsResourceGetMappedMipmappedArray
    cuGraphicsResourceGetMappedPointer_v2
    cuGraphicsResourceSetMapFlags_v2
    cuGraphicsSubResourceGetMappedArray
    cuGraphicsUnmapResources
    cuGraphicsUnregisterResource
    cuGreenCtxCreate
    cuGreenCtxDestroy
    cuGreenCtxGetDevResource
    cuGreenCtxGetId
    cuGreenCtxRecordEvent
    cuGreenCtxStreamCreate
    cuGreenCtxWaitEvent
    cuImportExternalMemory
    cuImportExternalSemaphore
    cuIpcCloseMemHandle
    cuIpcGetMemHandle
    cuIpcOpenMemHandle_v2
    cuLaunchCooperativeKernelMultiDevice
    cuLibraryGetUnifiedFunction
    cuLogsCurrent
    cuLogsDumpToFile
    cuLogsDumpToMemory
    cuLogsRegisterCallback
    cuLogsUnregisterCallback
    cuMemBatchDecompressAsync
    cuMemGetHandleForAddressRange
    cuMemMapArrayAsync
    cuMipmappedArrayGetMemoryRequirements
    cuMipmappedArrayGetSparseProperties
    cuModuleGetSurfRef
    cuModuleGetTexRef
    cuMulticastAddDevice
    cuMulticastBindAddr
    cuMulticastBindMem
    cuMulticastCreate
    cuMulticastGetGranularity
    cuMulticastUnbind
    cuParamSetTexRef
    cuProfilerInitialize
    cuSignalExternalSemaphoresAsync
    cuStreamGetGreenCtx
    cuSurfRefGetArray
    cuSurfRefSetArray
    cuTensorMapEncodeIm2colWide
    cuTexRefCreate
    cuTexRefDestroy
    cuTexRefGetAddressMode
    cuTexRefGetAddress_v2
    cuTexRefGetArray
    cuTexRefGetBorderColor
    cuTexRefGetFilterMode
    cuTexRefGetFlags
    cuTexRefGetFormat
    cuTexRefGetMaxAnisotropy
    cuTexRefGetMipmapFilterMode
    cuTexRefGetMipmapLevelBias
    cuTexRefGetMipmapLevelClamp
    cuTexRefGetMipmappedArray
    cuTexRefSetAddress2D_v3
    cuTexRefSetAddressMode
    cuTexRefSetAddress_v2
    cuTexRefSetArray
    cuTexRefSetBorderColor
    cuTexRefSetFilterMode
    cuTexRefSetFlags
    cuTexRefSetFormat
    cuTexRefSetMaxAnisotropy
    cuTexRefSetMipmapFilterMode
    cuTexRefSetMipmapLevelBias
    cuTexRefSetMipmapLevelClamp
    cuTexRefSetMipmappedArray
    cuWaitExternalSemaphoresAsync
}
