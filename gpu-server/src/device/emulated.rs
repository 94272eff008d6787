//! The emulated device: device memory in host memory and the built-in
//! reference kernels. It stands in where no GPU exists (CI, laptops) so that
//! the whole data path runs end to end; it says so whenever it is chosen.
//! Streams complete work at once, so queries are always ready and events
//! carry host timestamps.
//!
//! Images other than the built-in module load as modules without functions
//! (see `EmulatedSession::load_module`); occupancy answers come from a
//! simple model of the advertised multiprocessor (see `SmLimits`).

use super::{
    ACCESS_NONE, ACCESS_READ, ACCESS_READWRITE, Backend, BackendSession, DeviceDescription, DeviceResult,
    FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES, FUNC_ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT, FunctionInfo, ImageKey,
    ImageKind, LIMIT_PRINTF_FIFO_SIZE, LaunchAttrs, LaunchDims, LaunchEvents, LinkOutput, LinkRequest, MemOp,
    Occupancy, OccupancyQuery, Preloaded, builtin, fatbin_wrapper_error, image_kind, texture,
};
use crate::error::CallError;
use crate::host_regions::{HostRegion, HostRegions};
use gpupool_proto::cuda;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Mapping granularity of the emulated device (what an H100 reports).
pub const GRANULARITY: u64 = 2 << 20;
/// Where the first session's range starts; later sessions follow it. Low in
/// the address space, below where Linux places executables, heaps and
/// mappings on x86-64 and AArch64, so that the client can reserve the same
/// range in its own process (unified addressing): at 0x7f00_0000_0000 it
/// collided with shared libraries in processes with many of them (Python).
const VA_START: u64 = 0x1000_0000_0000;
/// Where the built-in module's variables go, below every session's range:
/// a place that differs from process to process (from the process id), as
/// a driver's choice may, so that a migrated session finds its variables
/// elsewhere on its target (module by module, [`VARIABLES_STEP`] apart).
fn variables_start() -> u64 {
    0x0800_0000_0000 + (u64::from(std::process::id()) & 0xfff) * (1 << 28)
}
const VARIABLES_STEP: u64 = 64 << 10;
/// The largest cluster CUDA guarantees on every GPU with clusters (a
/// kernel may opt in to more on some).
const PORTABLE_CLUSTER_SIZE: i64 = 8;

// Device attributes (`CUdevice_attribute`) the model reads.
const DEV_MAX_THREADS_PER_BLOCK: u32 = 1;
const DEV_MAX_SHARED_MEMORY_PER_BLOCK: u32 = 8;
const DEV_WARP_SIZE: u32 = 10;
const DEV_MULTIPROCESSOR_COUNT: u32 = 16;
const DEV_MAX_THREADS_PER_MULTIPROCESSOR: u32 = 39;
const DEV_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: u32 = 81;
const DEV_MAX_REGISTERS_PER_MULTIPROCESSOR: u32 = 82;
const DEV_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: u32 = 97;
const DEV_MAX_BLOCKS_PER_MULTIPROCESSOR: u32 = 106;
const DEV_RESERVED_SHARED_MEMORY_PER_BLOCK: u32 = 111;

/// Registers per thread every emulated kernel reports (`NUM_REGS`).
const NUM_REGS: u32 = 32;
/// PTX and binary version every emulated kernel reports (sm_90).
const KERNEL_VERSION: i32 = 90;
/// Shared memory is allocated to blocks in units of this many bytes.
const SMEM_GRANULE: u32 = 128;
/// `CU_OCCUPANCY_DISABLE_CACHING_OVERRIDE`, the only occupancy flag.
const OCCUPANCY_DISABLE_CACHING_OVERRIDE: u32 = 1;

/// Context limits (`CUlimit`, default) as an H200 with driver 580 reports
/// them for a new context: STACK_SIZE 1 KiB, PRINTF_FIFO_SIZE 1 MiB,
/// MALLOC_HEAP_SIZE 8 MiB, DEV_RUNTIME_SYNC_DEPTH 2,
/// DEV_RUNTIME_PENDING_LAUNCH_COUNT 2048, MAX_L2_FETCH_GRANULARITY 64 B,
/// PERSISTING_L2_CACHE_SIZE 0, SHMEM_SIZE 0. The emulated device keeps what
/// a session sets (the GPU program `ctx_limits` prints the real ones).
pub const DEFAULT_LIMITS: [(u32, u64); 8] =
    [(0, 1024), (1, 1 << 20), (2, 8 << 20), (3, 2), (4, 2048), (5, 64), (6, 0), (7, 0)];

/// Largest printf FIFO the emulated device holds (host memory).
const MAX_PRINTF_FIFO: u64 = 1 << 30;

/// An emulated GPU with `total_memory` bytes: allocations and arrays of
/// all its sessions together fail with `OUT_OF_MEMORY` beyond it, as on a
/// GPU.
#[derive(Debug)]
pub struct EmulatedDevice {
    description: DeviceDescription,
    sm: SmLimits,
    next_base: AtomicU64,
    used: Arc<AtomicU64>,
    /// The ranges of open sessions (base, size), so that a session opened
    /// at a given range (a migrated one) never overlaps another.
    ranges: Arc<std::sync::Mutex<BTreeMap<u64, u64>>>,
    /// Modules loaded before a session asked for them.
    preloaded: Arc<Preloaded<Module>>,
    /// Where the next built-in module's variables go.
    next_variables: Arc<AtomicU64>,
    /// See [`super::EAGER_DESCRIBE_MAX`]: the built-in module's seven
    /// functions load undescribed below that, as a GPU loads a library of
    /// many kernels.
    eager_describe_max: AtomicUsize,
}

/// Bytes of the emulated device's memory taken by one allocation or array;
/// given back when the last holder of it goes.
#[derive(Debug)]
struct Charge {
    used: Arc<AtomicU64>,
    bytes: u64,
}

impl Charge {
    /// Takes `bytes` of a device of `total` bytes whose use is `used`.
    fn take(used: &Arc<AtomicU64>, total: u64, bytes: u64) -> DeviceResult<Rc<Self>> {
        used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| now.checked_add(bytes).filter(|n| *n <= total))
            .map_err(|now| {
            CallError::out_of_memory(format!(
                "emulated device memory is full: {bytes} bytes asked, {now} of {total} in use"
            ))
        })?;
        Ok(Rc::new(Self { used: used.clone(), bytes }))
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The advertised multiprocessor, as the occupancy model and the attribute
/// checks use it. The model, deterministic and close to CUDA's occupancy
/// calculator for kernels without static shared memory:
/// - a block of `b` threads takes `w = ceil(b / warp_size)` warps, `w *
///   warp_size * NUM_REGS` registers and `round_up(dynamic + reserved, 128)`
///   bytes of shared memory;
/// - resident blocks = min(warps per SM / w, registers per SM / registers
///   per block, shared memory per SM / shared memory per block, blocks per
///   SM); 0 when `b` exceeds the kernel's block limit or the dynamic shared
///   memory exceeds its `MAX_DYNAMIC_SHARED_SIZE_BYTES`;
/// - the preferred carveout is a hint and the model ignores it (the whole
///   shared memory of the SM counts), as it ignores the caching flag.
#[derive(Debug, Clone, Copy)]
struct SmLimits {
    sm_count: u32,
    warp_size: u32,
    max_threads_per_block: u32,
    max_shared_per_block: u32,
    max_shared_per_block_optin: u32,
    max_threads: u32,
    max_blocks: u32,
    registers: u32,
    shared: u32,
    reserved_shared_per_block: u32,
}

impl SmLimits {
    fn from_attributes(attributes: &[(u32, i32)]) -> Self {
        // Floors of 1 keep every division of the model defined.
        let get = |a: u32| {
            attributes.iter().find(|(k, _)| *k == a).and_then(|(_, v)| u32::try_from(*v).ok()).unwrap_or(0).max(1)
        };
        Self {
            sm_count: get(DEV_MULTIPROCESSOR_COUNT),
            warp_size: get(DEV_WARP_SIZE),
            max_threads_per_block: get(DEV_MAX_THREADS_PER_BLOCK),
            max_shared_per_block: get(DEV_MAX_SHARED_MEMORY_PER_BLOCK),
            max_shared_per_block_optin: get(DEV_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
            max_threads: get(DEV_MAX_THREADS_PER_MULTIPROCESSOR),
            max_blocks: get(DEV_MAX_BLOCKS_PER_MULTIPROCESSOR),
            registers: get(DEV_MAX_REGISTERS_PER_MULTIPROCESSOR),
            shared: get(DEV_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
            reserved_shared_per_block: get(DEV_RESERVED_SHARED_MEMORY_PER_BLOCK),
        }
    }

    /// Attributes of a built-in kernel at load time.
    fn function_attributes(&self, f: &FunctionInfo) -> BTreeMap<u32, i32> {
        let max_threads = i32::try_from(f.max_threads_per_block).unwrap_or(i32::MAX);
        let max_dynamic_shared = i32::try_from(self.max_shared_per_block).unwrap_or(i32::MAX);
        BTreeMap::from([
            (0, max_threads),        // MAX_THREADS_PER_BLOCK
            (1, 0),                  // SHARED_SIZE_BYTES (no static shared memory)
            (2, 0),                  // CONST_SIZE_BYTES
            (3, 0),                  // LOCAL_SIZE_BYTES
            (4, NUM_REGS as i32),    // NUM_REGS
            (5, KERNEL_VERSION),     // PTX_VERSION
            (6, KERNEL_VERSION),     // BINARY_VERSION
            (7, 0),                  // CACHE_MODE_CA
            (8, max_dynamic_shared), // MAX_DYNAMIC_SHARED_SIZE_BYTES (the 48 KiB default, as on a GPU)
            (9, -1),                 // PREFERRED_SHARED_MEMORY_CARVEOUT (no preference)
            (10, 0),                 // CLUSTER_SIZE_MUST_BE_SET
            (11, 0),                 // REQUIRED_CLUSTER_WIDTH
            (12, 0),                 // REQUIRED_CLUSTER_HEIGHT
            (13, 0),                 // REQUIRED_CLUSTER_DEPTH
            (14, 0),                 // NON_PORTABLE_CLUSTER_SIZE_ALLOWED
            (15, 0),                 // CLUSTER_SCHEDULING_POLICY_PREFERENCE
        ])
    }

    /// The kernel's block limit and dynamic shared memory limit.
    fn kernel_limits(attributes: &BTreeMap<u32, i32>) -> (u32, u64) {
        let get = |a: u32| attributes.get(&a).and_then(|&v| u32::try_from(v).ok()).unwrap_or(0);
        (get(0), u64::from(get(FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES)))
    }

    /// Blocks a multiprocessor holds when shared memory is not the limit.
    fn blocks_by_threads(&self, block_size: u32) -> u32 {
        // Callers pass at least one thread; the floor keeps a 0 harmless.
        let warps = block_size.div_ceil(self.warp_size).max(1);
        let by_warps = (self.max_threads / self.warp_size) / warps;
        let by_registers = self.registers / warps.saturating_mul(self.warp_size).saturating_mul(NUM_REGS);
        by_warps.min(by_registers).min(self.max_blocks)
    }

    /// Resident blocks of `block_size` threads (at least 1) and
    /// `dynamic_shared` bytes each, for a kernel with `attributes`.
    fn active_blocks(&self, attributes: &BTreeMap<u32, i32>, block_size: u32, dynamic_shared: u64) -> u32 {
        let (max_threads, max_dynamic_shared) = Self::kernel_limits(attributes);
        if block_size > max_threads || dynamic_shared > max_dynamic_shared {
            return 0;
        }
        let per_block = (dynamic_shared + u64::from(self.reserved_shared_per_block))
            .next_multiple_of(u64::from(SMEM_GRANULE))
            .max(1);
        let by_shared = u32::try_from(u64::from(self.shared) / per_block).unwrap_or(u32::MAX);
        self.blocks_by_threads(block_size).min(by_shared)
    }

    /// The block size (a multiple of the warp size, or the limit) with the
    /// most resident threads, the largest on ties, as CUDA searches:
    /// `(minimal grid size for a full device, block size)`.
    fn potential_block_size(&self, attributes: &BTreeMap<u32, i32>, limit: u32, dynamic_shared: u64) -> (i64, i32) {
        let (kernel_max, _) = Self::kernel_limits(attributes);
        let mut max = kernel_max.min(self.max_threads_per_block);
        if limit > 0 {
            max = max.min(limit);
        }
        let (mut best_blocks, mut best_size, mut best_threads) = (0u32, 0u32, 0u32);
        let mut candidate = max.next_multiple_of(self.warp_size);
        while candidate > 0 {
            let size = candidate.min(max);
            let blocks = self.active_blocks(attributes, size, dynamic_shared);
            if blocks * size > best_threads {
                (best_blocks, best_size, best_threads) = (blocks, size, blocks * size);
            }
            if best_threads >= self.max_threads {
                break;
            }
            candidate -= self.warp_size;
        }
        (i64::from(best_blocks) * i64::from(self.sm_count), i32::try_from(best_size).unwrap_or(i32::MAX))
    }

    /// The most dynamic shared memory a block may use so that `num_blocks`
    /// blocks of `block_size` threads are resident together (0 when they
    /// never are), capped by the kernel's dynamic shared memory limit.
    fn available_dynamic_shared(&self, attributes: &BTreeMap<u32, i32>, num_blocks: u32, block_size: u32) -> u64 {
        let (max_threads, max_dynamic_shared) = Self::kernel_limits(attributes);
        if block_size > max_threads || num_blocks > self.blocks_by_threads(block_size) {
            return 0;
        }
        let per_block = (self.shared / num_blocks.max(1)) / SMEM_GRANULE * SMEM_GRANULE;
        u64::from(per_block.saturating_sub(self.reserved_shared_per_block)).min(max_dynamic_shared)
    }
}

impl EmulatedDevice {
    /// Modules of more than `n` functions load undescribed (no attributes
    /// until `describe_function`), as on a GPU ([`super::EAGER_DESCRIBE_MAX`]).
    pub fn describe_eagerly_up_to(&self, n: usize) {
        self.eager_describe_max.store(n, Ordering::Relaxed);
    }

    pub fn new(total_memory: u64) -> Self {
        tracing::warn!("emulated device selected: no GPU is in use; kernels run as CPU reference code");
        let sms = 132;
        let attributes = vec![
            (1, 1024),     // MAX_THREADS_PER_BLOCK
            (2, 1024),     // MAX_BLOCK_DIM_X
            (3, 1024),     // MAX_BLOCK_DIM_Y
            (4, 64),       // MAX_BLOCK_DIM_Z
            (5, i32::MAX), // MAX_GRID_DIM_X
            (6, 65535),    // MAX_GRID_DIM_Y
            (7, 65535),    // MAX_GRID_DIM_Z
            (8, 49152),    // MAX_SHARED_MEMORY_PER_BLOCK
            (10, 32),      // WARP_SIZE
            (12, 65536),   // MAX_REGISTERS_PER_BLOCK
            (16, sms),     // MULTIPROCESSOR_COUNT
            (39, 2048),    // MAX_THREADS_PER_MULTIPROCESSOR
            (75, 9),       // COMPUTE_CAPABILITY_MAJOR
            (76, 0),       // COMPUTE_CAPABILITY_MINOR
            (81, 233472),  // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
            (82, 65536),   // MAX_REGISTERS_PER_MULTIPROCESSOR
            (97, 232448),  // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
            (106, 32),     // MAX_BLOCKS_PER_MULTIPROCESSOR
            (111, 1024),   // RESERVED_SHARED_MEMORY_PER_BLOCK
            // Stream memory operations run here in full (a wait must be
            // met when it is queued: see `stream_mem_ops`).
            (122, 1), // CAN_USE_64_BIT_STREAM_MEM_OPS
            (123, 1), // CAN_USE_STREAM_WAIT_VALUE_NOR
            // Events shared between worker processes (docs/ipc.md).
            (125, 1), // IPC_EVENT_SUPPORTED
        ];
        let sm = SmLimits::from_attributes(&attributes);
        Self {
            description: DeviceDescription {
                name: "gpupool emulated device (no GPU)".into(),
                backend: "emulated",
                uuid: "GPU-00000000-0000-0000-0000-e30000000000".into(),
                compute_capability: (9, 0),
                multiprocessor_count: sms as u32,
                total_memory,
                granularity: GRANULARITY,
                attributes,
                driver_version: 13000,
                error_strings: Vec::new(),
                kernel_driver_version: String::new(),
                pcie: None,
            },
            sm,
            next_base: AtomicU64::new(VA_START),
            used: Arc::default(),
            ranges: Arc::default(),
            preloaded: Arc::default(),
            next_variables: Arc::new(AtomicU64::new(variables_start())),
            eager_describe_max: AtomicUsize::new(super::EAGER_DESCRIBE_MAX),
        }
    }
}

impl Backend for EmulatedDevice {
    type Session = EmulatedSession;

    fn description(&self) -> &DeviceDescription {
        &self.description
    }

    fn open_session(&self, va_size: u64) -> DeviceResult<EmulatedSession> {
        let size = va_size.div_ceil(GRANULARITY) * GRANULARITY;
        loop {
            let base = self.next_base.fetch_add(size + GRANULARITY, Ordering::Relaxed);
            // Skips ranges taken by sessions opened at a given range.
            if let Ok(session) = self.open_session_at(size, base) {
                return Ok(session);
            }
        }
    }

    fn open_session_at(&self, va_size: u64, base: u64) -> DeviceResult<EmulatedSession> {
        let size = va_size.div_ceil(GRANULARITY) * GRANULARITY;
        let end = base.checked_add(size).filter(|_| base.is_multiple_of(GRANULARITY) && size > 0);
        let end = end.ok_or_else(|| CallError::invalid_value(format!("range {base:#x} (+{va_size}) is not usable")))?;
        {
            let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
            let before = ranges.range(..end).next_back().is_some_and(|(&b, &s)| b + s > base);
            if before {
                return Err(CallError::out_of_memory(format!(
                    "the address range {base:#x} (+{size}) is taken on this device"
                )));
            }
            ranges.insert(base, size);
        }
        Ok(EmulatedSession {
            _range: RangeHold { ranges: self.ranges.clone(), base },
            base,
            memory: Rc::default(),
            epoch: Instant::now(),
            sm: self.sm,
            limits: BTreeMap::from(DEFAULT_LIMITS),
            output: builtin::DeviceOutput { capacity: 1 << 20, ..Default::default() },
            next_object: 0,
            default_stream: Stream::default(),
            used: self.used.clone(),
            total: self.description.total_memory,
            preloaded: self.preloaded.clone(),
            next_variables: self.next_variables.clone(),
            variables: BTreeMap::new(),
            unloaded: Arc::default(),
            host: None,
            eager_describe_max: self.eager_describe_max.load(Ordering::Relaxed),
        })
    }

    /// The built-in image is never preloaded (it is always at hand).
    fn preload_module(&self, key: &ImageKey, image: &[u8]) -> DeviceResult<bool> {
        if builtin::is_builtin(image) || self.preloaded.contains(key) {
            return Ok(false);
        }
        let (module, functions) = load_foreign(image)?;
        self.preloaded.insert(*key, module, functions);
        Ok(true)
    }
}

/// A session's hold on its address range.
#[derive(Debug)]
struct RangeHold {
    ranges: Arc<std::sync::Mutex<BTreeMap<u64, u64>>>,
    base: u64,
}

impl Drop for RangeHold {
    fn drop(&mut self) {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.base);
    }
}

/// Physical memory: shared by every mapping of it, so that two mappings
/// of one allocation alias as on a GPU.
type Phys = Rc<RefCell<Vec<u8>>>;

/// A mapped range: a view of `len` bytes of `phys` from `offset`.
#[derive(Debug)]
struct Region {
    phys: Phys,
    /// Keeps the memory counted while this view lives.
    _charge: Rc<Charge>,
    offset: usize,
    len: usize,
    access: u32,
}

/// The session's mapped ranges by start address.
type Store = Rc<RefCell<BTreeMap<u64, Region>>>;

/// One session's memory and handles on the emulated device.
#[derive(Debug)]
pub struct EmulatedSession {
    /// Gives the range back to the device when the session goes.
    _range: RangeHold,
    base: u64,
    memory: Store,
    epoch: Instant,
    sm: SmLimits,
    limits: BTreeMap<u32, u64>,
    /// Device printf output and assert messages waiting for the next
    /// synchronization.
    pub(crate) output: builtin::DeviceOutput,
    /// The last texture or surface object handle given out.
    next_object: u64,
    /// The default stream's attributes.
    default_stream: Stream,
    /// The device's memory in use by all sessions, and its size.
    used: Arc<AtomicU64>,
    total: u64,
    /// The device's modules loaded ahead of sessions.
    preloaded: Arc<Preloaded<Module>>,
    next_variables: Arc<AtomicU64>,
    /// The variables of the built-in modules loaded, and those of modules
    /// gone, to unmap.
    variables: BTreeMap<u64, Mapping>,
    unloaded: Arc<std::sync::Mutex<Vec<u64>>>,
    /// The program's pinned memory the device reaches at its addresses.
    host: Option<Arc<HostRegions>>,
    /// See [`EmulatedDevice::describe_eagerly_up_to`].
    eager_describe_max: usize,
}

impl EmulatedSession {
    /// Unmaps the variables of modules that went.
    fn unmap_unloaded(&mut self) {
        let gone = std::mem::take(&mut *self.unloaded.lock().unwrap_or_else(|e| e.into_inner()));
        for addr in gone {
            self.variables.remove(&addr);
        }
    }

    /// Writes the printf output to stdout, as the driver does when the host
    /// synchronizes.
    fn flush_printf(&mut self) {
        if !self.output.stdout.is_empty() {
            crate::device_output::write_stdout(&self.output.stdout);
            self.output.stdout.clear();
        }
    }
}

/// Physical memory of the emulated device (host memory).
#[derive(Debug, Clone)]
pub struct Allocation(Phys, Rc<Charge>);

/// A mapped range; dropping it unmaps it (the host memory goes with the
/// last mapping and allocation of it).
#[derive(Debug)]
pub struct Mapping {
    addr: u64,
    memory: Store,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.memory.borrow_mut().remove(&self.addr);
    }
}

/// A loaded module: the built-in one, or an image the emulator cannot run,
/// which has no functions.
#[derive(Debug)]
pub struct Module {
    /// Each function's attributes, in function order; the settable ones
    /// change with `func_set_attribute`.
    functions: Vec<BTreeMap<u32, i32>>,
    /// The built-in module's variables ([`builtin::VARIABLES`] order),
    /// mapped in the loading session's memory while the module lives.
    variables: Variables,
}

/// Addresses of a module's variables; when the module goes they go back to
/// its session, which unmaps them at its next module load or
/// synchronization (a module is handed between threads, the session's
/// memory is not).
#[derive(Debug, Default)]
struct Variables {
    addrs: Vec<u64>,
    unloaded: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Drop for Variables {
    fn drop(&mut self) {
        self.unloaded.lock().unwrap_or_else(|e| e.into_inner()).append(&mut self.addrs);
    }
}

impl Module {
    fn function(&self, index: usize) -> DeviceResult<&BTreeMap<u32, i32>> {
        self.functions.get(index).ok_or_else(|| no_function(index, self.functions.len()))
    }
}

/// Loads an image other than the built-in one: a module without functions
/// (see [`EmulatedSession::load_module`]).
fn load_foreign(image: &[u8]) -> DeviceResult<(Module, Vec<FunctionInfo>)> {
    if image.is_empty() {
        return Err(CallError::new(cuda::INVALID_IMAGE, "empty module image"));
    }
    if image_kind(image) == ImageKind::FatbinWrapper {
        return Err(fatbin_wrapper_error());
    }
    tracing::debug!(bytes = image.len(), "emulated device: loaded a module image it cannot run, without functions");
    Ok((Module { functions: Vec::new(), variables: Variables::default() }, Vec::new()))
}

fn no_function(index: usize, count: usize) -> CallError {
    CallError::invalid_handle(format!("function {index} does not exist (the module has {count})"))
}

/// A stream; work completes when issued. It keeps the attributes set on
/// it (`cuStreamSetAttribute`) to answer them back.
#[derive(Debug, Default)]
pub struct Stream {
    attributes: RefCell<BTreeMap<u32, [u8; super::STREAM_ATTRIBUTE_BYTES]>>,
    priority: i32,
}

/// A stream attribute's value before any set: the stream's priority, the
/// synchronization policy AUTO (1), the remote memory sync domain 1 in the
/// domain map; zeros otherwise.
fn default_stream_attribute(attribute: u32, priority: i32) -> [u8; super::STREAM_ATTRIBUTE_BYTES] {
    let mut v = [0u8; super::STREAM_ATTRIBUTE_BYTES];
    match attribute {
        3 => v[0] = 1,
        8 => v[..4].copy_from_slice(&priority.to_le_bytes()),
        9 => v[1] = 1,
        _ => {}
    }
    v
}

/// An event: the host time it was last recorded.
#[derive(Debug)]
pub struct Event {
    recorded_ms: Option<f64>,
    /// Not created with `CU_EVENT_DISABLE_TIMING`.
    timing: bool,
    /// Created with `CU_EVENT_INTERPROCESS` (its driver handle, random),
    /// or opened from another process. Work runs as it is queued here, so
    /// every such event is complete and the handle names nothing more.
    interprocess: Option<u128>,
}

/// A CUDA array: host bytes per level, packed (rows of `row_bytes`, then
/// slices); a level names its mipmapped array's storage.
#[derive(Debug, Clone)]
pub struct Array {
    levels: Rc<Vec<RefCell<Vec<u8>>>>,
    level: usize,
    desc: texture::ArrayDesc,
    _charge: Rc<Charge>,
}

/// A texture or surface object: it keeps what it reads alive.
#[derive(Debug)]
pub struct Object {
    _array: Option<Array>,
}

impl Array {
    /// Offset of `(x, y, z)` in this level's bytes.
    fn offset(&self, x: u64, y: u64, z: u64) -> usize {
        let d = &self.desc;
        ((z * d.rows() + y) * d.row_bytes() + x) as usize
    }
}

/// Calls `row` for each row of `extent` at `place`, with where the row lies
/// and its offset in the packed bytes.
fn each_row<A>(place: &texture::Place<A>, extent: texture::Extent, mut row: impl FnMut(RowAt<'_, A>, usize)) {
    let width = extent.width as usize;
    let mut pos = 0;
    for z in 0..extent.depth {
        for y in 0..extent.height {
            let at = match *place {
                texture::Place::Array { ref array, x, y: y0, z: z0 } => RowAt::Array(array, x, y0 + y, z0 + z),
                texture::Place::Device { addr, pitch, height } => RowAt::Device(addr + z * pitch * height + y * pitch),
            };
            row(at, pos);
            pos += width;
        }
    }
}

/// Where one row of a copy lies.
enum RowAt<'a, A> {
    Array(&'a A, u64, u64, u64),
    Device(u64),
}

/// A session's device memory, and the program's pinned memory that the
/// device reaches at its own addresses (host regions mapped at the
/// client's addresses: `crate::host_regions`).
struct Mem<'a>(&'a Store, Option<&'a HostRegions>);

/// One piece of an access: `n` bytes at `off` into the region at `start`.
type Span = (u64, usize, usize);

impl Mem<'_> {
    /// The pieces of an access of `len` bytes at `addr`: it may run across
    /// mappings that follow each other without a gap (a buffer built of
    /// several allocations), each of which must allow `need`.
    fn spans(&self, addr: u64, len: usize, need: u32) -> DeviceResult<Vec<Span>> {
        let map = self.0.borrow();
        let mut spans = Vec::new();
        let (mut at, mut left) = (addr, len);
        while left > 0 {
            let (&start, region) = map.range(..=at).next_back().ok_or_else(|| illegal(addr, len))?;
            let off = usize::try_from(at - start).map_err(|_| illegal(addr, len))?;
            if off >= region.len {
                return Err(illegal(addr, len));
            }
            if region.access & need != need {
                return Err(CallError::new(
                    cuda::ILLEGAL_ADDRESS,
                    format!(
                        "access to {len} bytes at {addr:#x}: the mapping at {start:#x} does not allow it (cuMemSetAccess)"
                    ),
                ));
            }
            let n = left.min(region.len - off);
            spans.push((start, off, n));
            at += n as u64;
            left -= n;
        }
        Ok(spans)
    }
}

fn illegal(addr: u64, len: usize) -> CallError {
    CallError::new(cuda::ILLEGAL_ADDRESS, format!("access to {len} bytes at {addr:#x} outside mapped memory"))
}

impl Mem<'_> {
    /// The device memory's pieces of an access, or else the host region
    /// holding all of it (looked up only when the device memory does not).
    fn place(&self, addr: u64, len: usize, need: u32) -> DeviceResult<Result<Vec<Span>, Arc<HostRegion>>> {
        let not_device = match self.spans(addr, len, need) {
            Ok(spans) => return Ok(Ok(spans)),
            Err(e) => e,
        };
        let host = addr.checked_add(len as u64).and_then(|end| self.1?.resolve(addr, end));
        host.map(Err).ok_or(not_device)
    }
}

impl builtin::Memory for Mem<'_> {
    fn load(&self, addr: u64, out: &mut [u8]) -> DeviceResult<()> {
        let spans = match self.place(addr, out.len(), ACCESS_READ)? {
            Ok(spans) => spans,
            Err(host) => return host.load(addr, out),
        };
        let mut pos = 0;
        for (start, off, n) in spans {
            let map = self.0.borrow();
            let region = &map[&start];
            let phys = region.phys.borrow();
            out[pos..pos + n].copy_from_slice(&phys[region.offset + off..region.offset + off + n]);
            pos += n;
        }
        Ok(())
    }
    fn store(&mut self, addr: u64, data: &[u8]) -> DeviceResult<()> {
        let spans = match self.place(addr, data.len(), ACCESS_READWRITE)? {
            Ok(spans) => spans,
            Err(host) => return host.store(addr, data),
        };
        let mut pos = 0;
        for (start, off, n) in spans {
            let map = self.0.borrow();
            let region = &map[&start];
            let mut phys = region.phys.borrow_mut();
            phys[region.offset + off..region.offset + off + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }
}

impl EmulatedSession {
    fn read_place(&self, src: &texture::Place<Array>, out: &mut [u8], extent: texture::Extent) -> DeviceResult<()> {
        let width = extent.width as usize;
        let mem = Mem(&self.memory, self.host.as_deref());
        let mut result = Ok(());
        each_row(src, extent, |at, pos| {
            let dst = &mut out[pos..pos + width];
            match at {
                RowAt::Array(a, x, y, z) => {
                    let off = a.offset(x, y, z);
                    dst.copy_from_slice(&a.levels[a.level].borrow()[off..off + width]);
                }
                RowAt::Device(addr) => {
                    if result.is_ok() {
                        result = builtin::Memory::load(&mem, addr, dst);
                    }
                }
            }
        });
        result
    }

    fn write_place(&mut self, dst: &texture::Place<Array>, data: &[u8], extent: texture::Extent) -> DeviceResult<()> {
        let width = extent.width as usize;
        let mut mem = Mem(&self.memory, self.host.as_deref());
        let mut result = Ok(());
        each_row(dst, extent, |at, pos| {
            let src = &data[pos..pos + width];
            match at {
                RowAt::Array(a, x, y, z) => {
                    let off = a.offset(x, y, z);
                    a.levels[a.level].borrow_mut()[off..off + width].copy_from_slice(src);
                }
                RowAt::Device(addr) => {
                    if result.is_ok() {
                        result = builtin::Memory::store(&mut mem, addr, src);
                    }
                }
            }
        });
        result
    }
}

impl BackendSession for EmulatedSession {
    type Mapping = Mapping;
    type Array = Array;
    type Object = Object;
    type Graph = std::convert::Infallible;
    type GraphExec = std::convert::Infallible;
    type Allocation = Allocation;
    type Module = Module;
    type Stream = Stream;
    type Event = Event;

    fn va_base(&self) -> u64 {
        self.base
    }

    fn create(&mut self, size: u64) -> DeviceResult<Allocation> {
        let len = usize::try_from(size).map_err(|_| CallError::out_of_memory("allocation too large"))?;
        let charge = Charge::take(&self.used, self.total, size)?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| CallError::out_of_memory(format!("cannot allocate {size} bytes of host memory")))?;
        buf.resize(len, 0);
        Ok(Allocation(Rc::new(RefCell::new(buf)), charge))
    }

    /// Places the view at any address: the session's tables checked it.
    fn map_allocation(&mut self, allocation: &Allocation, offset: u64, addr: u64, size: u64) -> DeviceResult<Mapping> {
        let total = allocation.0.borrow().len();
        let (offset, len) = match (usize::try_from(offset), usize::try_from(size)) {
            (Ok(o), Ok(l)) if o.checked_add(l).is_some_and(|end| end <= total) => (o, l),
            _ => {
                return Err(CallError::invalid_value(format!(
                    "mapping {size} bytes from offset {offset} of an allocation of {total}"
                )));
            }
        };
        let mut memory = self.memory.borrow_mut();
        if memory.contains_key(&addr) {
            return Err(CallError::invalid_value(format!("{addr:#x} is already mapped")));
        }
        let region =
            Region { phys: allocation.0.clone(), _charge: allocation.1.clone(), offset, len, access: ACCESS_NONE };
        memory.insert(addr, region);
        Ok(Mapping { addr, memory: self.memory.clone() })
    }

    fn set_access(&mut self, mapping: &Mapping, flags: u32) -> DeviceResult<()> {
        if !matches!(flags, ACCESS_NONE | ACCESS_READ | ACCESS_READWRITE) {
            return Err(CallError::invalid_value(format!("unknown access flags {flags}")));
        }
        let mut memory = self.memory.borrow_mut();
        let region = memory
            .get_mut(&mapping.addr)
            .ok_or_else(|| CallError::invalid_value(format!("{:#x} is not mapped", mapping.addr)))?;
        region.access = flags;
        Ok(())
    }

    /// The emulated device has no PTX compiler or linker.
    fn link(&mut self, _: &LinkRequest) -> DeviceResult<LinkOutput> {
        Err(CallError::new(
            cuda::NOT_SUPPORTED,
            "JIT linking needs a CUDA device: the emulated device cannot compile or link PTX, cubins or libraries",
        ))
    }

    fn write(&mut self, _: Option<&Stream>, dst: u64, data: &[u8]) -> DeviceResult<()> {
        builtin::Memory::store(&mut Mem(&self.memory, self.host.as_deref()), dst, data)
    }

    /// A copy to the host synchronizes, and so flushes device printf.
    fn read(&mut self, _: Option<&Stream>, src: u64, out: &mut [u8]) -> DeviceResult<()> {
        self.flush_printf();
        builtin::Memory::load(&Mem(&self.memory, self.host.as_deref()), src, out)
    }

    fn copy(&mut self, _: Option<&Stream>, dst: u64, src: u64, size: u64) -> DeviceResult<()> {
        let mut tmp = vec![0u8; size as usize];
        let mut mem = Mem(&self.memory, self.host.as_deref());
        builtin::Memory::load(&mem, src, &mut tmp)?;
        builtin::Memory::store(&mut mem, dst, &tmp)
    }

    fn memset(&mut self, _: Option<&Stream>, dst: u64, value: u32, element_size: u32, count: u64) -> DeviceResult<()> {
        let pattern = &value.to_le_bytes()[..element_size as usize];
        let bytes: Vec<u8> = pattern.iter().copied().cycle().take((count * u64::from(element_size)) as usize).collect();
        builtin::Memory::store(&mut Mem(&self.memory, self.host.as_deref()), dst, &bytes)
    }

    /// The built-in module loads with its reference kernels and its
    /// variables (placed below every session's range). Any other
    /// image (PTX, cubin, fatbin: code the emulator cannot run) loads as a
    /// module with no functions and no variables: the CUDA runtime
    /// registers every fat binary of a program at start, whether or not the
    /// program launches a kernel from it, so refusing the image would fail
    /// programs that only use the built-in kernels or copies. A lookup of a
    /// kernel by name then fails on the client with CUDA_ERROR_NOT_FOUND,
    /// which says clearly what is missing. Empty images and fatbin wrappers
    /// (which point into client memory) are refused as on a GPU.
    fn load_module(&mut self, image: &[u8]) -> DeviceResult<(Module, Vec<FunctionInfo>)> {
        if builtin::is_builtin(image) {
            let mut functions = builtin::functions();
            for f in &mut functions {
                f.attributes = self.sm.function_attributes(f);
            }
            self.unmap_unloaded();
            let mut at = self.next_variables.fetch_add(VARIABLES_STEP, Ordering::Relaxed);
            let mut addrs = Vec::with_capacity(builtin::VARIABLES.len());
            for &(_, size) in builtin::VARIABLES {
                let mapping = self.map(at, size)?;
                self.variables.insert(at, mapping);
                addrs.push(at);
                at += size.next_multiple_of(256);
            }
            let variables = Variables { addrs, unloaded: self.unloaded.clone() };
            let module = Module { functions: functions.iter().map(|f| f.attributes.clone()).collect(), variables };
            if functions.len() > self.eager_describe_max {
                for f in &mut functions {
                    (f.attributes, f.max_threads_per_block, f.described) = (BTreeMap::new(), 0, false);
                }
            }
            return Ok((module, functions));
        }
        load_foreign(image)
    }

    fn take_preloaded(&mut self, key: &ImageKey) -> Option<(Module, Vec<FunctionInfo>)> {
        self.preloaded.take(key)
    }

    /// Cooperative and cluster launches are accepted: the built-in kernels
    /// neither synchronize the grid nor use distributed shared memory. A
    /// cooperative grid must fit on the device at once, as on a GPU
    /// (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE otherwise).
    fn launch(
        &mut self,
        module: &Module,
        function: usize,
        dims: LaunchDims,
        attrs: &LaunchAttrs,
        _: LaunchEvents<'_, Event>,
        _: Option<&Stream>,
        params: &[u8],
    ) -> DeviceResult<()> {
        let attributes = module.function(function)?;
        let threads = dims.block.iter().map(|&d| u64::from(d)).try_fold(1u64, |a, d| a.checked_mul(d));
        let blocks = dims.grid.iter().map(|&d| u64::from(d)).try_fold(1u64, |a, d| a.checked_mul(d));
        let (Some(threads), Some(blocks)) = (threads, blocks) else {
            return Err(CallError::invalid_value("launch dimensions overflow"));
        };
        if attrs.cooperative {
            let block_size = u32::try_from(threads).unwrap_or(u32::MAX);
            let per_sm = self.sm.active_blocks(attributes, block_size, u64::from(dims.shared_mem_bytes));
            let resident = u64::from(per_sm) * u64::from(self.sm.sm_count);
            if blocks > resident {
                return Err(CallError::new(
                    cuda::COOPERATIVE_LAUNCH_TOO_LARGE,
                    format!("cooperative grid of {blocks} blocks exceeds the {resident} that can be resident at once"),
                ));
            }
        }
        let ran = builtin::run(
            function,
            dims,
            params,
            &mut Mem(&self.memory, self.host.as_deref()),
            &mut self.output,
            &module.variables.addrs,
        );
        if !self.output.stderr.is_empty() {
            // The driver writes a failed assert's message to stderr.
            crate::device_output::write_stderr(&self.output.stderr);
            self.output.stderr.clear();
        }
        ran
    }

    fn limits(&mut self) -> Vec<(u32, u64)> {
        self.limits.iter().map(|(&k, &v)| (k, v)).collect()
    }

    /// Keeps the value; the printf FIFO follows PRINTF_FIFO_SIZE, which is
    /// host memory here and therefore bounded ([`MAX_PRINTF_FIFO`]).
    fn tensor_map(&mut self, _request: &super::TensorMapRequest) -> DeviceResult<[u8; super::TENSOR_MAP_BYTES]> {
        Err(CallError::new(
            cuda::NOT_SUPPORTED,
            "tensor maps (TMA descriptors) are encoded by a CUDA driver; the emulated device has none",
        ))
    }

    fn set_limit(&mut self, limit: u32, value: u64) -> DeviceResult<u64> {
        if limit == LIMIT_PRINTF_FIFO_SIZE && value > MAX_PRINTF_FIFO {
            return Err(CallError::out_of_memory(format!(
                "a printf FIFO of {value} bytes exceeds the emulated device's {MAX_PRINTF_FIFO}"
            )));
        }
        let slot = self
            .limits
            .get_mut(&limit)
            .ok_or_else(|| CallError::new(cuda::NOT_SUPPORTED, format!("context limit {limit} is not supported")))?;
        *slot = value;
        if limit == LIMIT_PRINTF_FIFO_SIZE {
            self.output.capacity = usize::try_from(value).unwrap_or(usize::MAX);
        }
        Ok(value)
    }

    /// Neither the built-in module nor the modules without functions have
    /// variables.
    fn module_global(&mut self, module: &Module, name: &str) -> DeviceResult<(u64, u64)> {
        let found = builtin::VARIABLES.iter().zip(&module.variables.addrs).find(|((n, _), _)| *n == name);
        let ((_, size), &addr) = found.ok_or_else(|| {
            CallError::new(cuda::NOT_FOUND, format!("the module has no variable named {name:?} (emulated device)"))
        })?;
        Ok((addr, *size))
    }

    fn occupancy(&mut self, module: &Module, function: usize, query: OccupancyQuery) -> DeviceResult<Occupancy> {
        let attributes = module.function(function)?;
        let check_flags = |flags: u32| {
            if flags & !OCCUPANCY_DISABLE_CACHING_OVERRIDE != 0 {
                return Err(CallError::invalid_value(format!("unknown occupancy flags {flags:#x}")));
            }
            Ok(())
        };
        let positive = |value: u32, what: &str| {
            if value == 0 {
                return Err(CallError::invalid_value(format!("{what} must be at least 1")));
            }
            Ok(value)
        };
        match query {
            OccupancyQuery::ActiveBlocks { block_size, dynamic_smem_bytes, flags } => {
                check_flags(flags)?;
                let block_size = positive(block_size, "block size")?;
                let blocks = self.sm.active_blocks(attributes, block_size, dynamic_smem_bytes);
                Ok(Occupancy { value: i64::from(blocks), block_size: 0 })
            }
            OccupancyQuery::PotentialBlockSize { block_size_limit, dynamic_smem_bytes, flags } => {
                check_flags(flags)?;
                let (min_grid, block_size) =
                    self.sm.potential_block_size(attributes, block_size_limit, dynamic_smem_bytes);
                Ok(Occupancy { value: min_grid, block_size })
            }
            OccupancyQuery::AvailableDynamicSmem { num_blocks, block_size } => {
                let num_blocks = positive(num_blocks, "block count")?;
                let block_size = positive(block_size, "block size")?;
                let bytes = self.sm.available_dynamic_shared(attributes, num_blocks, block_size);
                Ok(Occupancy { value: i64::try_from(bytes).unwrap_or(i64::MAX), block_size: 0 })
            }
            // Resident blocks on the whole device, in whole clusters (the
            // model has no GPC boundaries a cluster must fit in).
            OccupancyQuery::ActiveClusters { block, cluster, dynamic_smem_bytes, .. } => {
                // Checked: three 32-bit dimensions from the wire multiply past 64 bits.
                let product = |d: [u32; 3]| d.iter().try_fold(1u64, |a, &x| a.checked_mul(u64::from(x.max(1))));
                let threads = block.iter().try_fold(1u64, |a, &d| a.checked_mul(u64::from(d))).unwrap_or(u64::MAX);
                let block_size = positive(u32::try_from(threads).unwrap_or(u32::MAX), "block size")?;
                let cluster_blocks = product(cluster).ok_or_else(|| CallError::invalid_value("cluster too large"))?;
                let per_sm = u64::from(self.sm.active_blocks(attributes, block_size, dynamic_smem_bytes));
                let total = per_sm * u64::from(self.sm.sm_count);
                Ok(Occupancy { value: i64::try_from(total / cluster_blocks).unwrap_or(i64::MAX), block_size: 0 })
            }
            // CUDA's portable cluster size when a block fits at all (the
            // model has no GPC a cluster must fit in, and keeps no
            // non-portable-size opt-in), else none.
            OccupancyQuery::PotentialClusterSize { block, dynamic_smem_bytes, .. } => {
                let threads = block.iter().try_fold(1u64, |a, &d| a.checked_mul(u64::from(d))).unwrap_or(u64::MAX);
                let block_size = positive(u32::try_from(threads).unwrap_or(u32::MAX), "block size")?;
                let fits = self.sm.active_blocks(attributes, block_size, dynamic_smem_bytes) > 0;
                Ok(Occupancy { value: if fits { PORTABLE_CLUSTER_SIZE } else { 0 }, block_size: 0 })
            }
        }
    }

    /// Accepts the two attributes CUDA programs set, with CUDA's ranges:
    /// the dynamic shared memory limit (up to the opt-in maximum less the
    /// kernel's static shared memory) and the carveout (-1 for the default,
    /// else a percentage). Other attributes are read-only here.
    /// A built-in function with its current attributes.
    fn describe_function(&mut self, module: &Module, function: usize) -> DeviceResult<FunctionInfo> {
        let count = module.functions.len();
        let attributes = module.functions.get(function).ok_or_else(|| no_function(function, count))?;
        let mut info = builtin::functions().swap_remove(function);
        info.attributes = attributes.clone();
        Ok(info)
    }

    fn func_set_attribute(
        &mut self,
        module: &mut Module,
        function: usize,
        attribute: u32,
        value: i32,
    ) -> DeviceResult<i32> {
        let count = module.functions.len();
        let attributes = module.functions.get_mut(function).ok_or_else(|| no_function(function, count))?;
        let range = match attribute {
            FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES => {
                let static_shared = attributes.get(&1).copied().unwrap_or(0);
                let optin = i32::try_from(self.sm.max_shared_per_block_optin).unwrap_or(i32::MAX);
                0..=optin.saturating_sub(static_shared)
            }
            FUNC_ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT => -1..=100,
            other => {
                return Err(CallError::invalid_value(format!(
                    "function attribute {other} cannot be set on the emulated device"
                )));
            }
        };
        if !range.contains(&value) {
            return Err(CallError::invalid_value(format!(
                "function attribute {attribute}: {value} is outside {}..={}",
                range.start(),
                range.end()
            )));
        }
        attributes.insert(attribute, value);
        Ok(value)
    }

    fn stream_create(&mut self, _flags: u32, priority: i32) -> DeviceResult<Stream> {
        Ok(Stream { priority, ..Stream::default() })
    }
    /// Kept to be read back; the emulator has no cache or scheduling they
    /// would steer.
    fn stream_set_attribute(
        &mut self,
        stream: Option<&Stream>,
        attribute: u32,
        value: &[u8; super::STREAM_ATTRIBUTE_BYTES],
    ) -> DeviceResult<()> {
        let s = stream.unwrap_or(&self.default_stream);
        s.attributes.borrow_mut().insert(attribute, *value);
        Ok(())
    }
    fn stream_get_attribute(
        &mut self,
        stream: Option<&Stream>,
        attribute: u32,
    ) -> DeviceResult<[u8; super::STREAM_ATTRIBUTE_BYTES]> {
        let s = stream.unwrap_or(&self.default_stream);
        let set = s.attributes.borrow().get(&attribute).copied();
        Ok(set.unwrap_or_else(|| default_stream_attribute(attribute, s.priority)))
    }
    fn stream_synchronize(&mut self, _: Option<&Stream>) -> DeviceResult<()> {
        self.flush_printf();
        Ok(())
    }
    fn stream_query(&mut self, _: Option<&Stream>) -> DeviceResult<bool> {
        Ok(true)
    }
    fn stream_wait_event(&mut self, _: Option<&Stream>, _: &Event) -> DeviceResult<()> {
        Ok(())
    }
    /// Everything here runs when it is queued, in order: a write stores
    /// its word at once, and a wait must already be met, since nothing
    /// queued after it could ever meet it. An unmet wait is refused
    /// (CUDA_ERROR_NOT_SUPPORTED, saying why) rather than left to hang.
    fn stream_mem_ops(&mut self, _: Option<&Stream>, ops: &[MemOp]) -> DeviceResult<()> {
        let mut mem = Mem(&self.memory, self.host.as_deref());
        for op in ops {
            match *op {
                MemOp::Wait { address, value, wide, condition, .. } => {
                    let mut word = [0u8; 8];
                    let len = if wide { 8 } else { 4 };
                    builtin::Memory::load(&mem, address, &mut word[..len])?;
                    if !condition.holds(u64::from_le_bytes(word), value, wide) {
                        return Err(CallError::not_supported(format!(
                            "the emulated device runs work as it is queued, so a stream wait at {address:#x} \
                             ({condition:?} {value:#x}) that is not met yet would never end"
                        )));
                    }
                }
                MemOp::Write { address, value, wide, .. } => {
                    let bytes = value.to_le_bytes();
                    builtin::Memory::store(&mut mem, address, &bytes[..if wide { 8 } else { 4 }])?;
                }
                MemOp::FlushRemoteWrites | MemOp::Barrier { .. } => {}
            }
        }
        Ok(())
    }
    fn event_create(&mut self, flags: u32) -> DeviceResult<Event> {
        Ok(Event {
            recorded_ms: None,
            timing: flags & cuda::EVENT_DISABLE_TIMING == 0,
            interprocess: (flags & cuda::EVENT_INTERPROCESS != 0).then(rand::random),
        })
    }
    fn event_ipc_export(&mut self, event: &Event) -> DeviceResult<[u8; gpupool_proto::ipc::HANDLE_BYTES]> {
        let key = event
            .interprocess
            .ok_or_else(|| CallError::invalid_handle("the event was not created with CU_EVENT_INTERPROCESS"))?;
        // The same bytes each time, as the driver's handle of one event.
        let mut handle = [0u8; gpupool_proto::ipc::HANDLE_BYTES];
        handle[..16].copy_from_slice(&key.to_le_bytes());
        Ok(handle)
    }
    fn event_ipc_open(&mut self, handle: &[u8; gpupool_proto::ipc::HANDLE_BYTES]) -> DeviceResult<Event> {
        let key = u128::from_le_bytes(handle[..16].try_into().expect("16 bytes"));
        Ok(Event { recorded_ms: None, timing: false, interprocess: Some(key) })
    }
    fn event_record(&mut self, event: &mut Event, _: Option<&Stream>) -> DeviceResult<()> {
        event.recorded_ms = Some(self.epoch.elapsed().as_secs_f64() * 1e3);
        Ok(())
    }
    fn event_query(&mut self, _: &Event) -> DeviceResult<bool> {
        Ok(true)
    }
    fn event_synchronize(&mut self, _: &Event) -> DeviceResult<()> {
        self.flush_printf();
        Ok(())
    }
    /// Work runs as it is queued here: the context's work so far is done.
    fn context_record_event(&mut self, event: &mut Event) -> DeviceResult<()> {
        event.recorded_ms = Some(self.epoch.elapsed().as_secs_f64() * 1e3);
        Ok(())
    }
    fn context_wait_event(&mut self, _: &Event) -> DeviceResult<()> {
        Ok(())
    }
    fn event_elapsed(&mut self, start: &Event, end: &Event) -> DeviceResult<f32> {
        // The driver's answer for an event that records no time.
        if !start.timing || !end.timing {
            return Err(CallError::invalid_handle("event created with CU_EVENT_DISABLE_TIMING"));
        }
        match (start.recorded_ms, end.recorded_ms) {
            (Some(a), Some(b)) => Ok((b - a) as f32),
            _ => Err(CallError::invalid_handle("event has not been recorded")),
        }
    }
    fn use_host_regions(&mut self, regions: Arc<HostRegions>) {
        self.host = Some(regions);
    }

    fn synchronize(&mut self) -> DeviceResult<()> {
        self.flush_printf();
        self.unmap_unloaded();
        Ok(())
    }

    fn array_create(&mut self, desc: &texture::ArrayDesc, levels: u32) -> DeviceResult<Array> {
        let total = desc.bytes_with_levels(levels).ok_or_else(|| CallError::invalid_value("array size overflows"))?;
        let charge = Charge::take(&self.used, self.total, total)?;
        let storage = (0..levels.max(1))
            .map(|l| {
                let bytes = desc.level(l).bytes().ok_or_else(|| CallError::invalid_value("array size overflows"))?;
                let mut v = Vec::new();
                v.try_reserve_exact(bytes as usize)
                    .map_err(|_| CallError::out_of_memory(format!("cannot allocate an array of {bytes} bytes")))?;
                v.resize(bytes as usize, 0);
                Ok(RefCell::new(v))
            })
            .collect::<DeviceResult<Vec<_>>>()?;
        Ok(Array { levels: Rc::new(storage), level: 0, desc: *desc, _charge: charge })
    }

    fn array_level(&mut self, mipmapped: &Array, level: u32) -> DeviceResult<Array> {
        if level as usize >= mipmapped.levels.len() {
            return Err(CallError::invalid_value(format!("level {level} of {}", mipmapped.levels.len())));
        }
        Ok(Array {
            levels: mipmapped.levels.clone(),
            level: level as usize,
            desc: mipmapped.desc.level(level),
            _charge: mipmapped._charge.clone(),
        })
    }

    fn array_copy(
        &mut self,
        _: Option<&Stream>,
        dst: texture::Place<Array>,
        src: texture::Place<Array>,
        extent: texture::Extent,
    ) -> DeviceResult<()> {
        let mut tmp = vec![0u8; extent.bytes().unwrap_or(0) as usize];
        self.read_place(&src, &mut tmp, extent)?;
        self.write_place(&dst, &tmp, extent)
    }

    fn array_write(
        &mut self,
        _: Option<&Stream>,
        dst: texture::Place<Array>,
        data: &[u8],
        extent: texture::Extent,
    ) -> DeviceResult<()> {
        self.write_place(&dst, data, extent)
    }

    /// A copy to the host synchronizes, and so flushes device printf.
    fn array_read(
        &mut self,
        _: Option<&Stream>,
        src: texture::Place<Array>,
        out: &mut [u8],
        extent: texture::Extent,
    ) -> DeviceResult<()> {
        self.flush_printf();
        self.read_place(&src, out, extent)
    }

    /// Objects get handles of their own; the emulator has no texture unit
    /// to read them with (its kernels are the built-in ones).
    fn texture_create(
        &mut self,
        resource: texture::Resource<Array>,
        _: &texture::TextureDesc,
        _: Option<&texture::ViewDesc>,
    ) -> DeviceResult<(u64, Object)> {
        let array = match resource {
            texture::Resource::Array(a) | texture::Resource::Mipmapped(a) => Some(a),
            texture::Resource::Linear { .. } | texture::Resource::Pitch2d { .. } => None,
        };
        self.next_object += 1;
        Ok((self.next_object, Object { _array: array }))
    }

    fn surface_create(&mut self, array: &Array) -> DeviceResult<(u64, Object)> {
        if array.desc.flags & texture::ARRAY_SURFACE_LDST == 0 {
            return Err(CallError::invalid_value("a surface needs an array made with CUDA_ARRAY3D_SURFACE_LDST"));
        }
        self.next_object += 1;
        Ok((self.next_object, Object { _array: Some(array.clone()) }))
    }
    /// A conditional node's condition is set by device code through a
    /// handle only a real driver reads: there is nothing to emulate it with.
    fn graph_create(&mut self) -> DeviceResult<Self::Graph> {
        Err(CallError::not_supported(
            "conditional graph nodes cannot be emulated (device code sets their condition); they need a GPU",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated session opens on its old range, only where that range
    /// is free; a closed session gives its range back.
    #[test]
    fn a_session_opens_on_a_given_range_only_when_it_is_free() {
        let dev = EmulatedDevice::new(4 * GRANULARITY);
        let size = 4 * GRANULARITY;
        let a = dev.open_session(size).expect("a");
        let base = a.va_base();
        assert!(dev.open_session_at(size, base + GRANULARITY).is_err(), "overlaps a");
        let far = base + (1 << 40);
        let b = dev.open_session_at(size, far).expect("a free range");
        assert_eq!(b.va_base(), far);
        assert!(dev.open_session_at(size, far + 1).is_err(), "not aligned");
        assert!(dev.open_session_at(size, u64::MAX - GRANULARITY + 1).is_err(), "past the end");
        drop(a);
        assert_eq!(dev.open_session_at(size, base).expect("given back").va_base(), base);
    }

    #[test]
    fn memory_of_all_sessions_is_bounded_by_the_device() {
        let dev = EmulatedDevice::new(4 * GRANULARITY);
        let (mut a, mut b) =
            (dev.open_session(8 * GRANULARITY).expect("a"), dev.open_session(8 * GRANULARITY).expect("b"));
        let first = a.map(a.va_base(), 3 * GRANULARITY).expect("fits");
        let e = b.create(2 * GRANULARITY).expect_err("past the device");
        assert_eq!(e.code, cuda::OUT_OF_MEMORY);
        let array = texture::ArrayDesc { width: 1024, height: 1024, depth: 0, format: 0x20, channels: 1, flags: 0 };
        assert!(b.array_create(&array, 0).is_err(), "arrays count too");
        let allocation = b.create(GRANULARITY).expect("fits");
        let alias = b.map_allocation(&allocation, 0, b.va_base(), GRANULARITY).expect("map");
        drop(allocation);
        assert!(a.create(GRANULARITY).is_err(), "a mapping keeps its memory");
        drop(alias);
        drop(first);
        let array = b.array_create(&array, 0).expect("room again");
        let level = b.array_level(&array, 0).expect("level");
        drop(array);
        assert!(a.create(4 * GRANULARITY).is_err(), "a level keeps its array's memory");
        drop(level);
        a.create(4 * GRANULARITY).expect("all free");
    }
}
