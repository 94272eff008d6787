//! The device a server executes calls on.
//!
//! [`Backend`] is one GPU or MIG instance (or the emulation of one);
//! [`BackendSession`] is one client session on it, with its own reserved
//! address range. Resources are domain types owned by the session tables
//! (`Mapping`, `Module`, `Stream`, `Event`) and released in their `Drop`.
//! Every address and handle passed in has already been checked against the
//! session's tables by [`crate::session`]; backends still fail cleanly rather
//! than trust that.

pub mod builtin;
pub mod cuda;
pub mod emulated;
pub mod graph;
pub mod texture;

use crate::error::CallError;
use gpupool_shm::region::Region;
use std::collections::BTreeMap;
use std::sync::Arc;

pub use crate::images::ImageKey;
pub use gpupool_proto::mem_ops::{self, MemOp};

/// Modules loaded before any session asked for them: an idle worker loads
/// the images its server's sessions used most recently, and the first
/// session that loads the same image takes the module instead of loading it
/// again (the driver's load is most of a library's first use: ~1 ms per
/// image, hundreds of images for cuBLAS). Each module goes to one session.
#[derive(Debug)]
pub struct Preloaded<M> {
    modules: std::sync::Mutex<std::collections::HashMap<ImageKey, (M, Vec<FunctionInfo>)>>,
}

impl<M> Default for Preloaded<M> {
    fn default() -> Self {
        Self { modules: std::sync::Mutex::default() }
    }
}

impl<M> Preloaded<M> {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<ImageKey, (M, Vec<FunctionInfo>)>> {
        self.modules.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a module of `key` is waiting.
    pub fn contains(&self, key: &ImageKey) -> bool {
        self.lock().contains_key(key)
    }

    /// Keeps `module` for the next session that loads `key`.
    pub fn insert(&self, key: ImageKey, module: M, functions: Vec<FunctionInfo>) {
        self.lock().insert(key, (module, functions));
    }

    /// The waiting module of `key`, which is no longer kept.
    pub fn take(&self, key: &ImageKey) -> Option<(M, Vec<FunctionInfo>)> {
        self.lock().remove(key)
    }

    /// How many modules wait.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Result of a device operation.
pub type DeviceResult<T> = Result<T, CallError>;

/// What a backend reports about the device it drives.
#[derive(Debug, Clone)]
pub struct DeviceDescription {
    pub name: String,
    /// "cuda" or "emulated".
    pub backend: &'static str,
    pub uuid: String,
    pub compute_capability: (u32, u32),
    pub multiprocessor_count: u32,
    /// Total device memory in bytes.
    pub total_memory: u64,
    /// Physical mapping granularity in bytes (a power of two).
    pub granularity: u64,
    /// `(CUdevice_attribute, value)` pairs.
    pub attributes: Vec<(u32, i32)>,
    pub driver_version: u32,
    /// `(CUresult, cuGetErrorString)` for every code the driver knows.
    pub error_strings: Vec<(u32, String)>,
    /// The host's kernel driver version as NVML reports it; empty where
    /// unknown (the emulated device, a host without NVML).
    pub kernel_driver_version: String,
    /// The GPU's PCIe link as NVML reports it, where known.
    pub pcie: Option<gpupool_proto::v1::PcieLink>,
}

/// Parameter layout of one kernel parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    pub offset: u32,
    pub size: u32,
}

/// A kernel of a loaded module, as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionInfo {
    pub name: String,
    pub params: Vec<Param>,
    pub max_threads_per_block: u32,
    /// `(CUfunction_attribute, value)` for every attribute the device
    /// reports, so clients answer `cuFuncGetAttribute` without a round trip.
    pub attributes: BTreeMap<u32, i32>,
    /// Whether `max_threads_per_block` and `attributes` are filled in. A
    /// module of many functions is loaded with only their names and
    /// parameters (reading attributes loads a function, and CUDA loads
    /// functions lazily): [`BackendSession::describe_function`] fills in
    /// one when it is first used.
    pub described: bool,
}

impl FunctionInfo {
    /// Bytes of the whole parameter buffer.
    pub fn params_size(&self) -> u32 {
        self.params.iter().map(|p| p.offset + p.size).max().unwrap_or(0)
    }
}

/// Grid, block and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
}

/// Launch attributes (`CUlaunchAttribute`s of `cuLaunchKernelEx`, or a
/// cooperative launch), checked against the session's tables: event
/// attributes are resolved by the caller and passed separately.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LaunchAttrs {
    pub cooperative: bool,
    /// Blocks per cluster; `[0; 3]`: no cluster.
    pub cluster: [u32; 3],
    /// `CUclusterSchedulingPolicy`; 0: the default.
    pub cluster_scheduling_policy: u32,
    pub programmatic_serialization: bool,
    pub priority: Option<i32>,
    /// `CUlaunchMemSyncDomain`.
    pub mem_sync_domain: Option<u32>,
    /// `(default, remote)` domains.
    pub mem_sync_domain_map: Option<(u8, u8)>,
    pub access_policy_window: Option<AccessPolicyWindow>,
    /// Preferred cluster shape; `[0; 3]`: none.
    pub preferred_cluster: [u32; 3],
    /// `CUsynchronizationPolicy`.
    pub synchronization_policy: Option<u32>,
}

impl LaunchAttrs {
    /// `true` when the launch needs `cuLaunchKernelEx` (or the cooperative
    /// entry point) rather than plain `cuLaunchKernel`.
    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}

/// An L2 access policy window (`CUaccessPolicyWindow`), a performance hint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccessPolicyWindow {
    pub base: u64,
    pub num_bytes: u64,
    pub hit_ratio: f32,
    pub hit_prop: u32,
    pub miss_prop: u32,
}

/// An event a launch signals (`PROGRAMMATIC_EVENT`,
/// `LAUNCH_COMPLETION_EVENT`), with its flags.
#[derive(Debug)]
pub struct LaunchEvent<'a, E> {
    pub event: &'a E,
    pub flags: i32,
    /// `triggerAtBlockStart` (programmatic events only).
    pub trigger_at_block_start: bool,
}

/// The events of one launch.
#[derive(Debug)]
pub struct LaunchEvents<'a, E> {
    pub programmatic: Option<LaunchEvent<'a, E>>,
    pub completion: Option<LaunchEvent<'a, E>>,
}

impl<E> Default for LaunchEvents<'_, E> {
    fn default() -> Self {
        Self { programmatic: None, completion: None }
    }
}

/// Context limits (`CUlimit`) a session may read and set: STACK_SIZE,
/// PRINTF_FIFO_SIZE, MALLOC_HEAP_SIZE, DEV_RUNTIME_SYNC_DEPTH,
/// DEV_RUNTIME_PENDING_LAUNCH_COUNT, MAX_L2_FETCH_GRANULARITY,
/// PERSISTING_L2_CACHE_SIZE, SHMEM_SIZE. Later ones (CIG, per-block memory)
/// concern contexts gpupool does not create.
pub const CONTEXT_LIMITS: std::ops::RangeInclusive<u32> = 0..=7;

/// The stream attributes (`CUstreamAttrID`) offered: ACCESS_POLICY_WINDOW,
/// SYNCHRONIZATION_POLICY, PRIORITY, MEM_SYNC_DOMAIN_MAP, MEM_SYNC_DOMAIN.
pub const STREAM_ATTRIBUTES: [u32; 5] = [1, 3, 8, 9, 10];

/// Bytes of a `CUstreamAttrValue` (a union).
pub const STREAM_ATTRIBUTE_BYTES: usize = 64;

/// `CU_LIMIT_PRINTF_FIFO_SIZE`.
pub const LIMIT_PRINTF_FIFO_SIZE: u32 = 1;

/// A TMA descriptor to encode (`cuTensorMapEncodeTiled`/`Im2col`) or
/// re-address (`cuTensorMapReplaceAddress`), checked by the session: rank
/// 1 to 5, vectors of the lengths the rank asks for, the address inside the
/// session's range. Enumerated values stay numbers; the driver checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorMapRequest {
    Tiled {
        common: TensorMapCommon,
        box_dim: Vec<u32>,
    },
    Im2col {
        common: TensorMapCommon,
        lower: Vec<i32>,
        upper: Vec<i32>,
        channels_per_pixel: u32,
        pixels_per_column: u32,
    },
    ReplaceAddress {
        map: [u8; TENSOR_MAP_BYTES],
        global_address: u64,
    },
}

/// What both encodings take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMapCommon {
    pub data_type: u32,
    pub global_address: u64,
    pub global_dim: Vec<u64>,
    pub global_strides: Vec<u64>,
    pub element_strides: Vec<u32>,
    pub interleave: u32,
    pub swizzle: u32,
    pub l2_promotion: u32,
    pub oob_fill: u32,
}

/// Bytes of a `CUtensorMap`.
pub const TENSOR_MAP_BYTES: usize = 128;

/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
pub const FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES: u32 = 8;
/// `CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT`.
pub const FUNC_ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT: u32 = 9;

/// An occupancy question about one function, as the CUDA occupancy
/// calculator asks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OccupancyQuery {
    /// Resident blocks per multiprocessor for blocks of `block_size`
    /// threads (`cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags`).
    ActiveBlocks { block_size: u32, dynamic_smem_bytes: u64, flags: u32 },
    /// The block size with the highest occupancy, at most
    /// `block_size_limit` (0: the function's limit), for a fixed dynamic
    /// shared memory size (`cuOccupancyMaxPotentialBlockSizeWithFlags`).
    PotentialBlockSize { block_size_limit: u32, dynamic_smem_bytes: u64, flags: u32 },
    /// Dynamic shared memory a block may use so that `num_blocks` blocks of
    /// `block_size` threads fit on one multiprocessor
    /// (`cuOccupancyAvailableDynamicSMemPerBlock`).
    AvailableDynamicSmem { num_blocks: u32, block_size: u32 },
    /// Clusters of `cluster` blocks that can be resident at once for a
    /// launch of this shape (`cuOccupancyMaxActiveClusters`).
    ActiveClusters { grid: [u32; 3], block: [u32; 3], cluster: [u32; 3], dynamic_smem_bytes: u64 },
    /// The largest cluster size a launch of this shape can have
    /// (`cuOccupancyMaxPotentialClusterSize`).
    PotentialClusterSize { grid: [u32; 3], block: [u32; 3], dynamic_smem_bytes: u64 },
}

/// Answer to an [`OccupancyQuery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    /// Blocks per multiprocessor, minimal grid size, or bytes, by query.
    pub value: i64,
    /// The block size found by `PotentialBlockSize`; 0 for the others.
    pub block_size: i32,
}

/// `CUmemAccess_flags`: what the session's device may do through a mapping.
pub const ACCESS_NONE: u32 = 0;
/// Read only.
pub const ACCESS_READ: u32 = 1;
/// Read and write.
pub const ACCESS_READWRITE: u32 = 3;

/// One input of a JIT link (`cuLinkAddData`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInput {
    /// A `CUjitInputType` (checked: 0..=5).
    pub kind: u32,
    pub name: String,
    pub data: bytes::Bytes,
    /// Scalar `CUjit_option`s for this input (checked against
    /// [`link_option_is_scalar`]).
    pub options: Vec<(u32, u64)>,
}

/// A JIT link to run: the linker's scalar options, its inputs and the
/// sizes of the log buffers to fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRequest {
    pub options: Vec<(u32, u64)>,
    pub inputs: Vec<LinkInput>,
    pub info_log_bytes: usize,
    pub error_log_bytes: usize,
}

/// What a JIT link produced: the image or the driver's error, and the logs
/// either way.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkOutput {
    pub cubin: Result<Vec<u8>, CallError>,
    pub info_log: Vec<u8>,
    pub error_log: Vec<u8>,
    pub wall_time_ms: f32,
    /// `CU_JIT_THREADS_PER_BLOCK` as written back (0: not asked).
    pub threads_per_block: u32,
}

/// `CUjit_option`s whose value is a plain number in its `void*` slot, safe
/// to hand to the driver from the wire. Left out: the log buffers and wall
/// time (the server supplies its own), and the options that carry host
/// pointers of the application (global symbol tables, referenced names).
pub fn link_option_is_scalar(option: u32) -> bool {
    matches!(option, 0 | 1 | 7..=16 | 20..=24 | 29..=33)
}

/// What a module image is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ImageKind {
    /// An ELF cubin.
    Cubin,
    /// A fat binary (`0xBA55ED50`).
    Fatbin,
    /// A `__fatBinC_Wrapper_t` (`0x466243B1`): it holds a pointer into the
    /// client's memory, meaningless (and dangerous) here.
    FatbinWrapper,
    /// Anything else is taken for PTX text.
    Ptx,
}

/// Classifies a module image by its first four bytes.
pub(crate) fn image_kind(image: &[u8]) -> ImageKind {
    match image.get(..4) {
        Some([0x7f, b'E', b'L', b'F']) => ImageKind::Cubin,
        Some(m) if m == 0xBA55_ED50u32.to_le_bytes() => ImageKind::Fatbin,
        Some(m) if m == 0x4662_43B1u32.to_le_bytes() => ImageKind::FatbinWrapper,
        _ => ImageKind::Ptx,
    }
}

/// The refusal of a `__fatBinC_Wrapper_t` image: the wrapper is the
/// client's, and only the fat binary it points to means anything here.
pub(crate) fn fatbin_wrapper_error() -> CallError {
    CallError::new(
        gpupool_proto::cuda::INVALID_IMAGE,
        "image is a fatbin wrapper (__fatBinC_Wrapper_t), which points into client memory; send the fat binary it points to",
    )
}

/// PTX with a module variable (`counter`, 64 bytes) and a kernel (`bump`)
/// that copies the variable's first word to its pointer argument: for the
/// tests that need a real GPU.
#[cfg(test)]
pub(crate) const GLOBALS_PTX: &[u8] = b".version 8.0
.target sm_75
.address_size 64

.visible .global .align 8 .b8 counter[64];

.visible .entry bump(.param .u64 out)
{
    .reg .b64 %rd<3>;
    .reg .b32 %r<2>;
    ld.param.u64 %rd1, [out];
    cvta.to.global.u64 %rd2, %rd1;
    ld.global.u32 %r1, [counter];
    st.global.u32 [%rd2], %r1;
    ret;
}
";

/// Modules of at most this many functions have them all described at load
/// (no round trip for the client later); larger ones describe each when
/// first used ([`FunctionInfo::described`]). A server setting
/// (`--describe-eagerly-max`). By default none: describing a function loads
/// it, and under CUDA's lazy loading (the server's mode) a function loaded
/// ahead of the one that launches it from the device loses that grid's
/// `printf` (docs/diagnosis.md); described at first use, a module's
/// functions load as natively, when the program first uses them. Measured
/// on an H100 (bench/results/20261207T162500Z-*): cuBLAS's first use
/// loads 300-350 ms faster than under eager loading, and child grids keep
/// their printf.
pub const EAGER_DESCRIBE_MAX: usize = 0;

/// A host range registered with the driver; dropping it unregisters the
/// range (after the copies queued from or into it have finished).
pub type Pinned = Box<dyn std::fmt::Debug + Send + Sync>;

/// Registers the mapping of a client's shared region with the driver
/// (`cuMemHostRegister`), so copies between it and the device are DMA from
/// and to the client's pages. Used from the shared-memory attachment's
/// thread, not the session's.
pub trait HostPinner: Send + Sync + std::fmt::Debug {
    /// Registers all of `region`'s mapping until the returned value drops,
    /// which its owner does before the region is unmapped
    /// ([`crate::host_regions::HostRegion`] holds both in that order).
    /// Also says at which device address the region's first byte is
    /// (under unified addressing, with the host pointer usable as the
    /// device pointer, its own address).
    fn pin(&self, region: &Region) -> DeviceResult<(Pinned, u64)>;
}

/// For a device that copies from any host memory as it is (the emulated
/// one reads and writes the mapping directly, at its own address).
#[derive(Debug)]
pub struct NoPinning;

impl HostPinner for NoPinning {
    fn pin(&self, region: &Region) -> DeviceResult<(Pinned, u64)> {
        Ok((Box::new(()), region.as_ptr() as u64))
    }
}

/// Largest bounce buffer of the default region copies.
const REGION_PIECE: usize = 4 << 20;

/// One device (GPU, MIG instance or emulation) shared by many sessions.
pub trait Backend: Send + Sync + 'static {
    type Session: BackendSession;

    fn description(&self) -> &DeviceDescription;

    /// What registers client host regions with this device's driver.
    fn host_pinner(&self) -> Arc<dyn HostPinner> {
        Arc::new(NoPinning)
    }

    /// Opens a session and reserves `va_size` bytes of device address space
    /// for it. Called on the thread that will run the session's calls.
    fn open_session(&self, va_size: u64) -> DeviceResult<Self::Session>;

    /// Opens a session on the range `[base, base + va_size)` exactly (a
    /// migrated session keeps its addresses); refused when any of it is
    /// taken or it is not aligned to the granularity.
    fn open_session_at(&self, va_size: u64, base: u64) -> DeviceResult<Self::Session>;

    /// Loads `image` (SHA-256 `key`, verified by the caller) ahead of the
    /// session that will load it ([`BackendSession::take_preloaded`]);
    /// `Ok(false)` when this device keeps no preloaded modules or already
    /// has one of `key`. Called on any thread.
    fn preload_module(&self, key: &ImageKey, image: &[u8]) -> DeviceResult<bool> {
        let _ = (key, image);
        Ok(false)
    }
}

/// One session's view of the device. Methods run on the session's own
/// worker thread, in call order. `None` as a stream is the default stream.
pub trait BackendSession: 'static {
    /// A mapped range; dropping it unmaps the range (the memory behind it
    /// lives while any mapping of it does).
    type Mapping;
    /// Physical device memory that is mapped with `map_allocation`.
    type Allocation;
    type Module;
    type Stream;
    type Event;
    /// A CUDA array, a mipmapped array or one level of one (which keeps
    /// its mipmapped array alive); dropping it destroys what it owns.
    type Array: Clone;
    /// A texture or surface object; dropping it destroys the object. It
    /// keeps the array it reads alive.
    type Object;
    /// A driver graph holding conditional handles (the server's twin of a
    /// client graph); dropping it destroys the graph and its handles.
    type Graph;
    /// An instantiated [`Self::Graph`]; dropping it destroys it.
    type GraphExec;

    /// First address of the reserved range.
    fn va_base(&self) -> u64;
    /// Backs `[addr, addr + size)` with new device memory, read-write for
    /// the session's device (what `cuMemAlloc` needs).
    fn map(&mut self, addr: u64, size: u64) -> DeviceResult<Self::Mapping> {
        let allocation = self.create(size)?;
        let mapping = self.map_allocation(&allocation, 0, addr, size)?;
        self.set_access(&mapping, ACCESS_READWRITE)?;
        Ok(mapping)
    }
    /// Creates `size` bytes of physical device memory, mapped nowhere.
    fn create(&mut self, size: u64) -> DeviceResult<Self::Allocation>;
    /// [`Self::create`] asking for compressible memory
    /// (`CU_MEM_ALLOCATION_COMP_GENERIC`); `true` with the allocation when
    /// the device granted compression. As a driver may, a device without
    /// it gives plain memory.
    fn create_compressible(&mut self, size: u64) -> DeviceResult<(Self::Allocation, bool)> {
        Ok((self.create(size)?, false))
    }
    /// Maps `size` bytes of `allocation`, starting `offset` bytes into it,
    /// at `addr`. The range is inaccessible until [`Self::set_access`];
    /// the mapping keeps the allocation's memory alive.
    fn map_allocation(
        &mut self,
        allocation: &Self::Allocation,
        offset: u64,
        addr: u64,
        size: u64,
    ) -> DeviceResult<Self::Mapping>;
    /// Sets the session's device's access to a whole mapping
    /// ([`ACCESS_NONE`], [`ACCESS_READ`] or [`ACCESS_READWRITE`]).
    fn set_access(&mut self, mapping: &Self::Mapping, flags: u32) -> DeviceResult<()>;
    /// Links JIT inputs into a cubin with the device's driver.
    fn link(&mut self, request: &LinkRequest) -> DeviceResult<LinkOutput>;
    fn write(&mut self, stream: Option<&Self::Stream>, dst: u64, data: &[u8]) -> DeviceResult<()>;
    fn read(&mut self, stream: Option<&Self::Stream>, src: u64, out: &mut [u8]) -> DeviceResult<()>;
    /// [`Self::write`] for a client's asynchronous copy: ordered on the
    /// stream only, so it may return before the copy has run (a backend
    /// keeps the bytes in its own memory until then); this default is the
    /// synchronous [`Self::write`].
    fn write_async(&mut self, stream: Option<&Self::Stream>, dst: u64, data: &[u8]) -> DeviceResult<()> {
        self.write(stream, dst, data)
    }
    /// [`Self::read`] on the legacy stream of a large range into host
    /// memory the caller owns (a swap-out): a backend may pin `out` for
    /// the copy's duration, so it goes by DMA rather than through the
    /// driver's staging of pageable memory.
    fn read_bulk(&mut self, src: u64, out: &mut [u8]) -> DeviceResult<()> {
        self.read(None, src, out)
    }
    /// [`Self::write`] on the legacy stream from a large range of host
    /// memory (a swap-in), pinned for the copy where the backend can.
    fn write_bulk(&mut self, dst: u64, data: &[u8]) -> DeviceResult<()> {
        self.write(None, dst, data)
    }
    /// Copies `len` bytes at `start` of a client's host region (checked
    /// against its mapping by the caller) to `dst`, ordered on `stream`.
    /// It may return before the copy has run, as `cuMemcpyHtoDAsync` from
    /// pinned memory does: the region stays registered and mapped until its
    /// registration drops, which waits for queued copies. This default
    /// copies through a bounded bounce buffer and returns when done.
    fn write_from_region(
        &mut self,
        stream: Option<&Self::Stream>,
        dst: u64,
        region: &Region,
        start: usize,
        len: usize,
    ) -> DeviceResult<()> {
        let mut buf = Vec::new();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(REGION_PIECE);
            buf.clear();
            region.read_append(start + done, n, &mut buf).map_err(|e| CallError::invalid_value(e.to_string()))?;
            self.write(stream, dst + done as u64, &buf)?;
            done += n;
        }
        Ok(())
    }
    /// Copies `len` bytes at `src` into a client's host region at `start`
    /// (checked by the caller), ordered on `stream`; like
    /// [`Self::write_from_region`] it may return before the copy has run.
    fn read_into_region(
        &mut self,
        stream: Option<&Self::Stream>,
        src: u64,
        region: &Region,
        start: usize,
        len: usize,
    ) -> DeviceResult<()> {
        let mut buf = vec![0u8; len.min(REGION_PIECE)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(REGION_PIECE);
            self.read(stream, src + done as u64, &mut buf[..n])?;
            region.write(start + done, &buf[..n]).map_err(|e| CallError::invalid_value(e.to_string()))?;
            done += n;
        }
        Ok(())
    }
    fn copy(&mut self, stream: Option<&Self::Stream>, dst: u64, src: u64, size: u64) -> DeviceResult<()>;
    /// Sets `count` elements of `element_size` bytes (1, 2 or 4) to `value`.
    fn memset(
        &mut self,
        stream: Option<&Self::Stream>,
        dst: u64,
        value: u32,
        element_size: u32,
        count: u64,
    ) -> DeviceResult<()>;
    /// Loads a module image (PTX, cubin, fatbin, or the built-in module).
    fn load_module(&mut self, image: &[u8]) -> DeviceResult<(Self::Module, Vec<FunctionInfo>)>;
    /// The module of image `key` that [`Backend::preload_module`] loaded,
    /// if one waits: the same as `load_module` of that image would give.
    fn take_preloaded(&mut self, key: &ImageKey) -> Option<(Self::Module, Vec<FunctionInfo>)> {
        let _ = key;
        None
    }
    /// Address and size of the module-scope variable `name`
    /// (`CUDA_ERROR_NOT_FOUND` when the module has none of that name).
    fn module_global(&mut self, module: &Self::Module, name: &str) -> DeviceResult<(u64, u64)>;
    /// Whether the module variable at `addr` is managed memory (a
    /// `__managed__` variable): the client then keeps a host half of it at
    /// the same address. Devices without managed memory have none.
    fn global_is_managed(&mut self, addr: u64) -> bool {
        let _ = addr;
        false
    }
    /// Answers an occupancy query about function `function` of `module`.
    fn occupancy(&mut self, module: &Self::Module, function: usize, query: OccupancyQuery) -> DeviceResult<Occupancy>;
    /// Function `function` of `module` with its attributes (see
    /// [`FunctionInfo::described`]).
    fn describe_function(&mut self, module: &Self::Module, function: usize) -> DeviceResult<FunctionInfo>;
    /// Sets a `CUfunction_attribute` of function `function` of `module` and
    /// returns the attribute's value as the device now reports it.
    fn func_set_attribute(
        &mut self,
        module: &mut Self::Module,
        function: usize,
        attribute: u32,
        value: i32,
    ) -> DeviceResult<i32>;
    /// Launches function `function` of `module`. `dims` and `attrs` have
    /// been checked for overflow and shape by the caller; the device checks
    /// them against its limits.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &mut self,
        module: &Self::Module,
        function: usize,
        dims: LaunchDims,
        attrs: &LaunchAttrs,
        events: LaunchEvents<'_, Self::Event>,
        stream: Option<&Self::Stream>,
        params: &[u8],
    ) -> DeviceResult<()>;
    /// The context limits (`CUlimit`, value) of the session's context, of
    /// [`CONTEXT_LIMITS`] those the device has.
    fn limits(&mut self) -> Vec<(u32, u64)>;
    /// Sets a context limit and returns the value the device now reports
    /// (drivers round some limits up).
    fn set_limit(&mut self, limit: u32, value: u64) -> DeviceResult<u64>;
    /// Encodes a TMA descriptor with the device's driver.
    fn tensor_map(&mut self, request: &TensorMapRequest) -> DeviceResult<[u8; TENSOR_MAP_BYTES]>;
    fn stream_create(&mut self, flags: u32, priority: i32) -> DeviceResult<Self::Stream>;
    fn stream_synchronize(&mut self, stream: Option<&Self::Stream>) -> DeviceResult<()>;
    /// Sets one of [`STREAM_ATTRIBUTES`] to its `CUstreamAttrValue`.
    fn stream_set_attribute(
        &mut self,
        stream: Option<&Self::Stream>,
        attribute: u32,
        value: &[u8; STREAM_ATTRIBUTE_BYTES],
    ) -> DeviceResult<()>;
    /// Reads one of [`STREAM_ATTRIBUTES`].
    fn stream_get_attribute(
        &mut self,
        stream: Option<&Self::Stream>,
        attribute: u32,
    ) -> DeviceResult<[u8; STREAM_ATTRIBUTE_BYTES]>;
    /// `true` when all work on the stream has completed.
    fn stream_query(&mut self, stream: Option<&Self::Stream>) -> DeviceResult<bool>;
    fn stream_wait_event(&mut self, stream: Option<&Self::Stream>, event: &Self::Event) -> DeviceResult<()>;
    /// Runs stream memory operations in order on `stream`: a wait holds
    /// the stream's later work until its word meets the condition. Each
    /// operation's word is session memory (checked by the caller).
    fn stream_mem_ops(&mut self, stream: Option<&Self::Stream>, ops: &[MemOp]) -> DeviceResult<()>;
    fn event_create(&mut self, flags: u32) -> DeviceResult<Self::Event>;
    fn event_record(&mut self, event: &mut Self::Event, stream: Option<&Self::Stream>) -> DeviceResult<()>;
    fn event_query(&mut self, event: &Self::Event) -> DeviceResult<bool>;
    fn event_synchronize(&mut self, event: &Self::Event) -> DeviceResult<()>;
    /// `cuCtxRecordEvent`: `event` captures all work of the session's
    /// context so far.
    fn context_record_event(&mut self, event: &mut Self::Event) -> DeviceResult<()>;
    /// `cuCtxWaitEvent`: all later work of the context waits for the work
    /// `event` captured.
    fn context_wait_event(&mut self, event: &Self::Event) -> DeviceResult<()>;
    /// Milliseconds between two recorded events.
    fn event_elapsed(&mut self, start: &Self::Event, end: &Self::Event) -> DeviceResult<f32>;
    /// `cuIpcGetEventHandle`: the driver's handle of an event created
    /// with `CU_EVENT_INTERPROCESS`, for another process to open.
    fn event_ipc_export(&mut self, event: &Self::Event) -> DeviceResult<[u8; gpupool_proto::ipc::HANDLE_BYTES]> {
        let _ = event;
        Err(CallError::not_supported("CUDA IPC on this device"))
    }
    /// `cuIpcOpenEventHandle`: the event another process exported as
    /// `handle` (the driver's bytes).
    fn event_ipc_open(&mut self, handle: &[u8; gpupool_proto::ipc::HANDLE_BYTES]) -> DeviceResult<Self::Event> {
        let _ = handle;
        Err(CallError::not_supported("CUDA IPC on this device"))
    }
    /// Waits for all work of the session.
    fn synchronize(&mut self) -> DeviceResult<()>;
    /// The session's host regions (the program's pinned memory), for a
    /// device that reaches the addressable ones through its own code rather
    /// than through the driver's mapping (the emulated one).
    fn use_host_regions(&mut self, _regions: Arc<crate::host_regions::HostRegions>) {}

    /// Creates an array of a checked shape; with `levels` > 0 a mipmapped
    /// array of that many levels.
    fn array_create(&mut self, desc: &texture::ArrayDesc, levels: u32) -> DeviceResult<Self::Array>;
    /// Level `level` of a mipmapped array.
    fn array_level(&mut self, mipmapped: &Self::Array, level: u32) -> DeviceResult<Self::Array>;
    /// Copies `extent` between two device-side places, at least one an
    /// array (checked against both by the caller).
    fn array_copy(
        &mut self,
        stream: Option<&Self::Stream>,
        dst: texture::Place<Self::Array>,
        src: texture::Place<Self::Array>,
        extent: texture::Extent,
    ) -> DeviceResult<()>;
    /// Copies packed host bytes (`extent.bytes()` of them) into an array.
    fn array_write(
        &mut self,
        stream: Option<&Self::Stream>,
        dst: texture::Place<Self::Array>,
        data: &[u8],
        extent: texture::Extent,
    ) -> DeviceResult<()>;
    /// Copies from an array into packed host bytes.
    fn array_read(
        &mut self,
        stream: Option<&Self::Stream>,
        src: texture::Place<Self::Array>,
        out: &mut [u8],
        extent: texture::Extent,
    ) -> DeviceResult<()>;
    /// Creates a texture object; its handle is what kernels take.
    fn texture_create(
        &mut self,
        resource: texture::Resource<Self::Array>,
        desc: &texture::TextureDesc,
        view: Option<&texture::ViewDesc>,
    ) -> DeviceResult<(u64, Self::Object)>;
    /// Creates a surface object on an array made for surface loads and
    /// stores.
    fn surface_create(&mut self, array: &Self::Array) -> DeviceResult<(u64, Self::Object)>;
    /// Creates an empty driver graph to hold conditional handles.
    fn graph_create(&mut self) -> DeviceResult<Self::Graph> {
        Err(no_device_graphs())
    }
    /// `cuGraphConditionalHandleCreate` on `graph`: the handle kernels
    /// take to set the condition.
    fn graph_conditional_handle(&mut self, graph: &Self::Graph, default_value: u32, flags: u32) -> DeviceResult<u64> {
        let _ = (graph, default_value, flags);
        Err(no_device_graphs())
    }
    /// Replaces the nodes of `graph` with `body` (checked by the session)
    /// and instantiates it with `flags` (`CUgraphInstantiate_flags`).
    fn graph_instantiate(
        &mut self,
        graph: &mut Self::Graph,
        body: &graph::Body<&Self::Module>,
        flags: u64,
    ) -> DeviceResult<Self::GraphExec> {
        let _ = (graph, body, flags);
        Err(no_device_graphs())
    }
    /// Launches an instantiated graph on `stream`.
    fn graph_launch(&mut self, exec: &Self::GraphExec, stream: Option<&Self::Stream>) -> DeviceResult<()> {
        let _ = (exec, stream);
        Err(no_device_graphs())
    }
}

/// What a backend without driver graphs answers for them.
fn no_device_graphs() -> CallError {
    CallError::not_supported("CUDA graphs with conditional nodes are not supported by this device")
}
