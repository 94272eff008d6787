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

use crate::error::CallError;

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

/// One device (GPU, MIG instance or emulation) shared by many sessions.
pub trait Backend: Send + Sync + 'static {
    type Session: BackendSession;

    fn description(&self) -> &DeviceDescription;

    /// Opens a session and reserves `va_size` bytes of device address space
    /// for it. Called on the thread that will run the session's calls.
    fn open_session(&self, va_size: u64) -> DeviceResult<Self::Session>;
}

/// One session's view of the device. Methods run on the session's own
/// worker thread, in call order. `None` as a stream is the default stream.
pub trait BackendSession: 'static {
    type Mapping;
    type Module;
    type Stream;
    type Event;

    /// First address of the reserved range.
    fn va_base(&self) -> u64;
    /// Backs `[addr, addr + size)` with device memory.
    fn map(&mut self, addr: u64, size: u64) -> DeviceResult<Self::Mapping>;
    fn write(&mut self, stream: Option<&Self::Stream>, dst: u64, data: &[u8]) -> DeviceResult<()>;
    fn read(&mut self, stream: Option<&Self::Stream>, src: u64, out: &mut [u8]) -> DeviceResult<()>;
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
    fn launch(
        &mut self,
        module: &Self::Module,
        function: usize,
        dims: LaunchDims,
        stream: Option<&Self::Stream>,
        params: &[u8],
    ) -> DeviceResult<()>;
    fn stream_create(&mut self, flags: u32, priority: i32) -> DeviceResult<Self::Stream>;
    fn stream_synchronize(&mut self, stream: Option<&Self::Stream>) -> DeviceResult<()>;
    /// `true` when all work on the stream has completed.
    fn stream_query(&mut self, stream: Option<&Self::Stream>) -> DeviceResult<bool>;
    fn stream_wait_event(&mut self, stream: Option<&Self::Stream>, event: &Self::Event) -> DeviceResult<()>;
    fn event_create(&mut self, flags: u32) -> DeviceResult<Self::Event>;
    fn event_record(&mut self, event: &mut Self::Event, stream: Option<&Self::Stream>) -> DeviceResult<()>;
    fn event_query(&mut self, event: &Self::Event) -> DeviceResult<bool>;
    fn event_synchronize(&mut self, event: &Self::Event) -> DeviceResult<()>;
    /// Milliseconds between two recorded events.
    fn event_elapsed(&mut self, start: &Self::Event, end: &Self::Event) -> DeviceResult<f32>;
    /// Waits for all work of the session.
    fn synchronize(&mut self) -> DeviceResult<()>;
}
