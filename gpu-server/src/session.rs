//! One session's tables and the execution of its calls.
//!
//! Every id and address from the wire is resolved here against this
//! session's own tables (mappings, modules, streams, events) before the
//! backend sees it; a failed lookup is a [`CallError`] reply, never a panic.
//! No I/O happens here: the server feeds batches in and sends replies out.
//!
//! Device memory a session may name in copies and memsets is its own
//! mappings plus the module variables it looked up (`ModuleGetGlobal`), each
//! until it is unmapped or its module unloaded; an access must fall inside
//! one of them.

use crate::device::{
    AccessPolicyWindow, BackendSession, CONTEXT_LIMITS, FunctionInfo, LaunchAttrs, LaunchDims, LaunchEvent,
    LaunchEvents, OccupancyQuery, STREAM_ATTRIBUTE_BYTES, STREAM_ATTRIBUTES,
};
use crate::error::CallError;
use crate::host_regions::HostRegions;
use crate::images::ImageCache;
use crate::staging::{self, Staging};
use crate::swap::SessionMemory;
use bytes::Bytes;
use gpupool_proto::payload::{self, Compression};
use gpupool_proto::v1::{self, call::Op, call_result::Value};
use gpupool_proto::{cuda, v1::memcpy_hto_d::Source};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A call that takes at least this long on the server is logged (debug
/// level, with its name): where a program's time goes on the server.
pub(crate) const SLOW_CALL: Duration = Duration::from_millis(100);

mod array;
mod globals;
mod graph;
mod ipc;
mod link;
mod migrate;
mod mirror;
mod swap;
mod tensor_map;
mod vmm;

use crate::device::{ACCESS_READ, ACCESS_READWRITE};
use gpupool_proto::mem_ops::MemOp;
pub use migrate::{Dirty, Exported, PrecopyStart};

/// Limits of one session.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Device memory the session may map, in bytes.
    pub memory_quota: u64,
    /// Size of the reserved address range.
    pub va_size: u64,
    /// Mapping granularity of the device.
    pub granularity: u64,
    /// Largest copy carried inline in a batch.
    pub max_inline_bytes: u64,
    /// Largest module image.
    pub max_image_bytes: u64,
    /// Most streams, events and modules (each) a session may hold.
    pub max_handles: usize,
    /// How many errors one reply lists (the rest are only counted).
    pub max_listed_errors: usize,
    /// Most bytes of device printf output one reply carries.
    pub max_output_bytes: u64,
    /// Whether replies may be lz4-compressed.
    pub compression: Compression,
}

struct LoadedModule<M> {
    functions: Vec<FunctionInfo>,
    module: M,
}

/// A session's state on top of a backend session `S`.
pub struct SessionState<S: BackendSession> {
    // Field order is drop order: handles go before the backend session that
    // owns the address range and context they live in; texture and surface
    // objects before the arrays they read.
    /// Texture and surface objects by their driver handle.
    objects: HashMap<u64, (array::ObjectKind, S::Object)>,
    /// Driver graphs of client graphs with conditional nodes, and their
    /// instantiations (before the modules their kernels come from).
    graphs: graph::Graphs<S::Graph, S::GraphExec>,
    /// Arrays, mipmapped arrays and levels of them by client id.
    arrays: HashMap<u32, array::ArrayEntry<S::Array>>,
    mappings: BTreeMap<u64, (u64, S::Mapping)>,
    /// The application's own VMM mappings (`VmmMap`) by address, then the
    /// physical allocations behind them by client handle.
    vmm_maps: BTreeMap<u64, vmm::VmmMapping<S::Mapping>>,
    vmm_handles: HashMap<u32, vmm::VmmHandle<S::Allocation>>,
    /// Module variables looked up: accessible memory until their module is
    /// unloaded. They live outside the reserved range, in memory the driver
    /// allocated with the module (session/globals.rs).
    globals: globals::Globals,
    modules: HashMap<u32, LoadedModule<S::Module>>,
    streams: HashMap<u32, S::Stream>,
    events: HashMap<u32, S::Event>,
    /// The calls that re-create the state above on another server.
    journal: migrate::Journal,
    /// While a migration pre-copies the session's memory: what the
    /// session's calls may have written since.
    precopy: Option<migrate::Dirty>,
    /// Device memory the session holds (resident or swapped out), which
    /// the quota bounds.
    mapped_bytes: u64,
    /// The session's share of the process's device memory.
    memory: SessionMemory,
    /// The mappings' contents while the session is swapped out.
    swapped: Option<swap::Swapped>,
    /// Where the last swap-out's time went (`swap_rates` prints it).
    last_swap_out: swap::SwapOutTimes,
    /// Mapped host memory's device halves, and the stream they are read on.
    mirrors: mirror::Mirrors,
    mirror_stream: Option<S::Stream>,
    limits: SessionLimits,
    staging: Arc<Staging>,
    /// Host regions the client attached through shared memory (its pinned
    /// memory), which copies may name instead of carrying bytes.
    host_regions: Arc<HostRegions>,
    /// Host regions the current call named by address ([`Self::check_range`]
    /// of a pointer into the program's pinned memory), held until the call
    /// has queued its work (a region's drop then waits for that work).
    held_regions: std::cell::RefCell<Vec<Arc<crate::host_regions::HostRegion>>>,
    images: Arc<ImageCache>,
    /// See [`Self::preloaded_hits`].
    preloaded_hits: u64,
    /// The session exported or opened a CUDA IPC handle: it is bound to
    /// this server and GPU from then on (it refuses to migrate).
    ipc_shared: bool,
    dev: S,
}

impl<S: BackendSession> std::fmt::Debug for SessionState<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionState")
            .field("mappings", &self.mappings.len())
            .field("mapped_bytes", &self.mapped_bytes)
            .field("vmm_maps", &self.vmm_maps.len())
            .field("vmm_handles", &self.vmm_handles.len())
            .field("modules", &self.modules.len())
            .field("globals", &self.globals.len())
            .field("streams", &self.streams.len())
            .field("events", &self.events.len())
            .field("arrays", &self.arrays.len())
            .field("objects", &self.objects.len())
            .finish()
    }
}

impl<S: BackendSession> Drop for SessionState<S> {
    fn drop(&mut self) {
        // Work still queued may touch memory about to be unmapped.
        if let Err(e) = self.dev.synchronize() {
            tracing::warn!(error = %e, "synchronize at session end failed");
        }
    }
}

/// Outcome of one call: an optional result value.
type CallOutcome = Result<Option<Value>, CallError>;

impl<S: BackendSession> SessionState<S> {
    pub fn new(dev: S, limits: SessionLimits, staging: Arc<Staging>, images: Arc<ImageCache>) -> Self {
        Self {
            objects: HashMap::new(),
            graphs: graph::Graphs::default(),
            arrays: HashMap::new(),
            mappings: BTreeMap::new(),
            vmm_maps: BTreeMap::new(),
            vmm_handles: HashMap::new(),
            globals: globals::Globals::default(),
            modules: HashMap::new(),
            streams: HashMap::new(),
            events: HashMap::new(),
            journal: migrate::Journal::default(),
            precopy: None,
            mapped_bytes: 0,
            memory: SessionMemory::detached(),
            swapped: None,
            last_swap_out: swap::SwapOutTimes::default(),
            mirrors: mirror::Mirrors::default(),
            mirror_stream: None,
            limits,
            staging,
            host_regions: Arc::default(),
            held_regions: Default::default(),
            images,
            preloaded_hits: 0,
            ipc_shared: false,
            dev,
        }
    }

    /// Modules this session took from the preloaded set instead of loading
    /// them.
    pub fn preloaded_hits(&self) -> u64 {
        self.preloaded_hits
    }

    /// Serves copies that name host regions from `regions` (the session's
    /// shared-memory attachment adds them).
    pub fn with_host_regions(mut self, regions: Arc<HostRegions>) -> Self {
        self.dev.use_host_regions(regions.clone());
        self.host_regions = regions;
        self
    }

    /// Counts the session's device memory in `memory` (a server's shared
    /// device memory) instead of memory of its own; before any is mapped.
    pub fn with_memory(mut self, memory: SessionMemory) -> Self {
        debug_assert_eq!(self.mapped_bytes, 0, "memory handed over before use");
        self.memory = memory;
        self
    }

    /// The session's share of the device memory.
    pub fn memory(&self) -> &SessionMemory {
        &self.memory
    }

    /// The context limits of the session's context (`CUlimit`, value).
    pub fn limits(&mut self) -> Vec<(u32, u64)> {
        self.dev.limits()
    }

    /// First address of the session's range.
    pub fn va_base(&self) -> u64 {
        self.dev.va_base()
    }

    /// Bytes currently mapped, resident or swapped out.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped_bytes
    }

    /// Function `function` of loaded module `module`, with its current
    /// attributes (those set since the load included).
    pub fn function_info(&self, module: u32, function: u32) -> Option<&FunctionInfo> {
        self.modules.get(&module)?.functions.get(function as usize)
    }

    /// Executes a batch in order. Failed calls are reported and the rest
    /// still run, as each CUDA call fails on its own.
    pub fn execute_batch(&mut self, batch: v1::Batch) -> v1::BatchReply {
        let mut reply = v1::BatchReply { seq: batch.seq, ..Default::default() };
        let last = batch.calls.len().saturating_sub(1);
        let mut synchronized = false;
        // A swapped-out session comes back before its calls run; when it
        // cannot, every call fails with the reason and nothing is lost.
        let swapped_in = self.swap_in();
        for (i, call) in batch.calls.into_iter().enumerate() {
            let waits = call.op.as_ref().is_some_and(synchronizes);
            let name: &'static str = call.op.as_ref().map_or("none", Into::into);
            // Timed only for the slow-call log: two clock reads per call
            // are a launch loop's cost otherwise.
            let started = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
            let outcome = match (call.op, &swapped_in) {
                (_, Err(e)) => Err(e.clone()),
                (Some(op), Ok(())) => self.execute(op),
                (None, Ok(())) => Err(CallError::invalid_value("call without an operation")),
            };
            if let Some(took) = started.map(|t| t.elapsed())
                && took >= SLOW_CALL
            {
                tracing::debug!(call = name, ms = took.as_millis() as u64, "slow call");
            }
            // A query synchronizes only when it answers "ready".
            synchronized |=
                waits && matches!(&outcome, Ok(None | Some(Value::Ready(true) | Value::Data(_) | Value::Staged(_))));
            match outcome {
                Ok(value) if i == last => reply.result = value.map(|v| v1::CallResult { value: Some(v) }),
                Ok(_) => {}
                Err(e) => {
                    reply.error_count += 1;
                    // The last call's own error is always listed: a waiting client needs it.
                    if reply.errors.len() < self.limits.max_listed_errors || i == last {
                        reply.errors.push(v1::CallError { index: i as u32, code: e.code, message: e.message });
                    }
                }
            }
        }
        if synchronized && !self.mirrors.is_empty() {
            reply.mirrors = self.mirror_changes();
        }
        reply
    }

    /// Executes one call.
    pub fn execute(&mut self, mut op: Op) -> CallOutcome {
        self.swap_in()?;
        self.globals.relocate(&mut op);
        if self.precopy.is_some() {
            self.note_write(&op);
        }
        let lasting = migrate::lasting(&op);
        let outcome = self.execute_op(op);
        self.held_regions.get_mut().clear();
        if let (Some(op), Ok(_)) = (lasting, &outcome) {
            self.journal.record(op);
        }
        outcome
    }

    fn execute_op(&mut self, op: Op) -> CallOutcome {
        match op {
            Op::MemMap(m) => self.mem_map(m.addr, m.size),
            Op::MemUnmap(m) => self.mem_unmap(m.addr),
            Op::MemcpyHtod(c) => self.memcpy_htod(c),
            Op::MemcpyDtoh(c) => self.memcpy_dtoh(c),
            Op::MemcpyDtod(c) => {
                self.check_range(c.dst, c.size, ACCESS_READWRITE)?;
                self.check_range(c.src, c.size, ACCESS_READ)?;
                let stream = stream_of(&self.streams, c.stream)?;
                self.dev.copy(stream, c.dst, c.src, c.size)?;
                Ok(None)
            }
            Op::Memset(m) => {
                if !matches!(m.element_size, 1 | 2 | 4) {
                    return Err(CallError::invalid_value(format!(
                        "memset element size {} is not 1, 2 or 4",
                        m.element_size
                    )));
                }
                let bytes = m
                    .count
                    .checked_mul(u64::from(m.element_size))
                    .ok_or_else(|| CallError::invalid_value("memset size overflows"))?;
                self.check_range(m.dst, bytes, ACCESS_READWRITE)?;
                let stream = stream_of(&self.streams, m.stream)?;
                self.dev.memset(stream, m.dst, m.value, m.element_size, m.count)?;
                Ok(None)
            }
            Op::ModuleLoad(m) => self.module_load(m),
            Op::ModuleUnload(m) => {
                self.modules
                    .remove(&m.module)
                    .ok_or_else(|| CallError::invalid_handle(format!("unknown module {}", m.module)))?;
                // The variables' memory went with the module.
                self.globals.unload(m.module);
                Ok(None)
            }
            Op::ModuleGetGlobal(g) => self.module_get_global(g),
            Op::Occupancy(o) => self.occupancy(o),
            Op::DescribeFunction(d) => self.describe_function(d.module, d.function),
            Op::FuncSetAttribute(a) => {
                let (loaded, index) = function_of_mut(&mut self.modules, a.module, a.function)?;
                let value = self.dev.func_set_attribute(&mut loaded.module, index, a.attribute, a.value)?;
                loaded.functions[index].attributes.insert(a.attribute, value);
                Ok(None)
            }
            Op::Launch(l) => self.launch(l),
            Op::TensorMapEncode(t) => self.tensor_map(t),
            Op::CtxSetLimit(l) => {
                if !CONTEXT_LIMITS.contains(&l.limit) {
                    return Err(CallError::invalid_value(format!("unknown context limit {}", l.limit)));
                }
                Ok(Some(Value::Limit(self.dev.set_limit(l.limit, l.value)?)))
            }
            Op::StreamCreate(s) => {
                new_id(&self.streams, s.stream, "stream", self.limits.max_handles)?;
                let stream = self.dev.stream_create(s.flags, s.priority)?;
                self.streams.insert(s.stream, stream);
                Ok(None)
            }
            Op::StreamDestroy(s) => {
                if s.stream == 0 {
                    return Err(CallError::invalid_handle("the default stream cannot be destroyed"));
                }
                self.streams
                    .remove(&s.stream)
                    .ok_or_else(|| CallError::invalid_handle(format!("unknown stream {}", s.stream)))?;
                Ok(None)
            }
            Op::StreamSetAttribute(a) => {
                if !STREAM_ATTRIBUTES.contains(&a.attribute) {
                    return Err(CallError::not_supported(format!("stream attribute {}", a.attribute)));
                }
                let value: [u8; STREAM_ATTRIBUTE_BYTES] = a.value[..].try_into().map_err(|_| {
                    CallError::invalid_value(format!("a stream attribute value is {STREAM_ATTRIBUTE_BYTES} bytes"))
                })?;
                let stream = stream_of(&self.streams, a.stream)?;
                self.dev.stream_set_attribute(stream, a.attribute, &value)?;
                Ok(None)
            }
            Op::StreamGetAttribute(a) => {
                if !STREAM_ATTRIBUTES.contains(&a.attribute) {
                    return Err(CallError::not_supported(format!("stream attribute {}", a.attribute)));
                }
                let stream = stream_of(&self.streams, a.stream)?;
                let value = self.dev.stream_get_attribute(stream, a.attribute)?;
                Ok(Some(Value::StreamAttribute(value.to_vec().into())))
            }
            Op::StreamSynchronize(s) => {
                let stream = stream_of(&self.streams, s.stream)?;
                self.dev.stream_synchronize(stream)?;
                Ok(None)
            }
            Op::StreamQuery(s) => {
                let stream = stream_of(&self.streams, s.stream)?;
                Ok(Some(Value::Ready(self.dev.stream_query(stream)?)))
            }
            Op::ContextEvent(c) => {
                if c.wait {
                    let event = self.events.get(&c.event).ok_or_else(|| unknown_event(c.event))?;
                    self.dev.context_wait_event(event)?;
                } else {
                    let event = self.events.get_mut(&c.event).ok_or_else(|| unknown_event(c.event))?;
                    self.dev.context_record_event(event)?;
                }
                Ok(None)
            }
            Op::StreamWaitEvent(w) => {
                let event = self.events.get(&w.event).ok_or_else(|| unknown_event(w.event))?;
                let stream = stream_of(&self.streams, w.stream)?;
                self.dev.stream_wait_event(stream, event)?;
                Ok(None)
            }
            Op::StreamMemOps(m) => {
                let ops = MemOp::parse_all(&m.ops).map_err(CallError::invalid_value)?;
                for op in &ops {
                    if let Some((address, size)) = op.word() {
                        let need = if matches!(op, MemOp::Write { .. }) { ACCESS_READWRITE } else { ACCESS_READ };
                        self.check_range(address, size, need)?;
                    }
                }
                let stream = stream_of(&self.streams, m.stream)?;
                self.dev.stream_mem_ops(stream, &ops)?;
                Ok(None)
            }
            Op::EventCreate(e) => {
                if !cuda::event_flags_valid(e.flags) {
                    return Err(CallError::invalid_value(format!("event flags {:#x}", e.flags)));
                }
                new_id(&self.events, e.event, "event", self.limits.max_handles)?;
                let event = self.dev.event_create(e.flags)?;
                self.events.insert(e.event, event);
                Ok(None)
            }
            Op::IpcEventExport(x) => self.ipc_event_export(x.event),
            Op::IpcEventOpen(o) => self.ipc_event_open(o),
            Op::EventDestroy(e) => {
                self.events.remove(&e.event).ok_or_else(|| unknown_event(e.event))?;
                Ok(None)
            }
            Op::EventRecord(r) => {
                let stream = stream_of(&self.streams, r.stream)?;
                let event = self.events.get_mut(&r.event).ok_or_else(|| unknown_event(r.event))?;
                self.dev.event_record(event, stream)?;
                Ok(None)
            }
            Op::EventQuery(q) => {
                let event = self.events.get(&q.event).ok_or_else(|| unknown_event(q.event))?;
                Ok(Some(Value::Ready(self.dev.event_query(event)?)))
            }
            Op::EventSynchronize(q) => {
                let event = self.events.get(&q.event).ok_or_else(|| unknown_event(q.event))?;
                self.dev.event_synchronize(event)?;
                Ok(None)
            }
            Op::EventElapsed(q) => {
                let start = self.events.get(&q.start).ok_or_else(|| unknown_event(q.start))?;
                let end = self.events.get(&q.end).ok_or_else(|| unknown_event(q.end))?;
                Ok(Some(Value::ElapsedMs(self.dev.event_elapsed(start, end)?)))
            }
            Op::ContextSynchronize(_) => {
                self.dev.synchronize()?;
                Ok(None)
            }
            Op::MemGetInfo(_) => Ok(Some(Value::MemInfo(v1::MemInfo {
                free: self.limits.memory_quota - self.mapped_bytes,
                total: self.limits.memory_quota,
            }))),
            // Virtual memory management and the JIT linker (session/vmm.rs, session/link.rs).
            Op::VmmCreate(c) => self.vmm_create(c),
            Op::VmmRelease(r) => self.vmm_release(r.handle),
            Op::VmmRetain(r) => self.vmm_retain(r.handle),
            Op::VmmMap(m) => self.vmm_map(m),
            Op::VmmUnmap(u) => self.vmm_unmap(u.addr, u.size),
            Op::VmmSetAccess(a) => self.vmm_set_access(a),
            Op::JitLink(l) => self.jit_link(l),
            Op::MirrorAdd(m) => self.mirror_add(m),
            Op::MirrorRemove(m) => self.mirror_remove(m.addr),
            // Arrays, textures and surfaces (session/array.rs).
            Op::ArrayCreate(c) => self.array_create(c),
            Op::ArrayLevel(l) => self.array_level(l),
            Op::ArrayDestroy(d) => self.array_destroy(d.array),
            Op::ArrayCopy(c) => self.array_copy(c),
            Op::TexObjectCreate(t) => self.tex_object_create(t),
            Op::TexObjectDestroy(t) => self.object_destroy(array::ObjectKind::Texture, t.object),
            Op::SurfObjectCreate(c) => self.surf_object_create(c),
            Op::SurfObjectDestroy(d) => self.object_destroy(array::ObjectKind::Surface, d.object),
            // Driver graphs with conditional nodes (session/graph.rs).
            Op::GraphHandleCreate(h) => self.graph_handle_create(h),
            Op::GraphInstantiate(g) => self.graph_instantiate(g),
            Op::GraphLaunch(l) => self.graph_launch(l),
            Op::GraphExecDestroy(d) => self.graph_exec_destroy(d.exec),
            Op::GraphDestroy(d) => self.graph_destroy(d.graph),
        }
    }

    /// Checks that `[addr, addr + len)` lies inside one mapping or inside
    /// one looked-up module variable of this session. Never a union of
    /// them: a range running from one into the next is refused, since what
    /// lies between or beyond is not known to be the session's. The one
    /// exception is the application's VMM mappings, which may be placed
    /// side by side to form one buffer: a range may run across such
    /// mappings when they leave no gap, and each must grant `need`
    /// (`ACCESS_READ` or `ACCESS_READWRITE`) through `VmmSetAccess`.
    fn check_range(&self, addr: u64, len: u64, need: u32) -> Result<(), CallError> {
        let end = addr
            .checked_add(len)
            .ok_or_else(|| CallError::invalid_value(format!("range at {addr:#x} of {len} bytes overflows")))?;
        if self.globals.contains(addr, end) {
            return Ok(());
        }
        let base = self.dev.va_base();
        if addr < base || end > base + self.limits.va_size {
            // The program's pinned memory, at the same address here, in
            // the client and on the device (docs/transport.md, "Pinned
            // memory in the region").
            if let Some(region) = self.host_regions.resolve(addr, end) {
                self.held_regions.borrow_mut().push(region);
                return Ok(());
            }
            return Err(CallError::invalid_value(format!(
                "address {addr:#x} (+{len}) is outside this session's range {base:#x}..{:#x}",
                base + self.limits.va_size
            )));
        }
        if let Some(vmm) = self.vmm_check(addr, end, need) {
            return vmm;
        }
        match self.mappings.range(..=addr).next_back() {
            Some((&start, &(size, _))) if end <= start + size => Ok(()),
            _ => Err(CallError::invalid_value(format!(
                "address {addr:#x} (+{len}) is not inside one mapped allocation of this session"
            ))),
        }
    }

    fn mem_map(&mut self, addr: u64, size: u64) -> CallOutcome {
        let g = self.limits.granularity;
        let base = self.dev.va_base();
        if size == 0 || !addr.is_multiple_of(g) || !size.is_multiple_of(g) {
            return Err(CallError::invalid_value(format!(
                "mapping {addr:#x} (+{size}) is not a non-empty multiple of the granularity {g}"
            )));
        }
        let end = addr.checked_add(size).ok_or_else(|| CallError::invalid_value("mapping overflows"))?;
        if addr < base || end > base + self.limits.va_size {
            return Err(CallError::invalid_value(format!(
                "mapping {addr:#x} (+{size}) is outside this session's range"
            )));
        }
        self.charge(size, "mapping")?;
        let before = self.mappings.range(..addr).next_back().is_some_and(|(&s, &(l, _))| s + l > addr);
        let after = self.mappings.range(addr..).next().is_some_and(|(&s, _)| s < end);
        if before || after || self.vmm_overlaps(addr, end) {
            return Err(CallError::invalid_value(format!("mapping {addr:#x} (+{size}) overlaps an existing one")));
        }
        let mapping = self.on_device(size, |dev| dev.map(addr, size))?;
        self.mappings.insert(addr, (size, mapping));
        self.mapped_bytes += size;
        Ok(None)
    }

    /// Takes `size` bytes of the device's memory (swapping idle sessions
    /// out when it is full) and runs `create` with it, giving the bytes
    /// back when it fails. When the device refuses memory the server
    /// counted as free (a GPU's contexts and other processes take some),
    /// and swapping is on, idle sessions make room and `create` runs once
    /// more.
    fn on_device<T>(
        &mut self,
        size: u64,
        mut create: impl FnMut(&mut S) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        self.memory.reserve(size)?;
        let refused = match create(&mut self.dev) {
            Ok(made) => return Ok(made),
            Err(e) => e,
        };
        self.memory.release(size);
        if refused.code != cuda::OUT_OF_MEMORY || !self.memory.device_refused() {
            return Err(refused);
        }
        self.memory.reserve(size)?;
        create(&mut self.dev).inspect_err(|_| self.memory.release(size))
    }

    /// Gives back `size` bytes of memory the session no longer holds.
    fn uncharge(&mut self, size: u64) {
        self.mapped_bytes -= size;
        self.memory.release(size);
    }

    /// Refuses `size` more bytes of device memory beyond the quota (`what`
    /// names them in the error).
    fn charge(&self, size: u64, what: &str) -> Result<(), CallError> {
        if self.mapped_bytes.saturating_add(size) > self.limits.memory_quota {
            return Err(CallError::out_of_memory(format!(
                "{what} of {size} bytes would exceed the session quota of {} bytes ({} in use)",
                self.limits.memory_quota, self.mapped_bytes
            )));
        }
        Ok(())
    }

    fn mem_unmap(&mut self, addr: u64) -> CallOutcome {
        let (size, mapping) = self.mappings.remove(&addr).ok_or_else(|| {
            CallError::invalid_value(format!("{addr:#x} is not the start of a mapping of this session"))
        })?;
        // Pending work may still use the memory.
        self.dev.synchronize()?;
        drop(mapping);
        self.uncharge(size);
        Ok(None)
    }

    fn memcpy_htod(&mut self, c: v1::MemcpyHtoD) -> CallOutcome {
        // (offset, bytes) pieces tiling the copy: a staged upload's chunks
        // go to the device as they arrived, without being assembled first.
        let pieces: Vec<(u64, Bytes)> = match c.source {
            Some(Source::Region(r)) => return self.memcpy_htod_region(c.dst, c.stream, r),
            Some(Source::Inline(p)) => {
                let data = payload::decode(p, self.limits.max_inline_bytes)
                    .map_err(|e| CallError::invalid_value(e.to_string()))?;
                vec![(0, data)]
            }
            Some(Source::Staged(s)) => {
                self.check_range(c.dst, s.size, ACCESS_READWRITE)?;
                self.staging.take_upload_chunks(s.transfer_id, s.size)?
            }
            None => return Err(CallError::invalid_value("copy without a source")),
        };
        let size = pieces.iter().map(|(_, b)| b.len() as u64).sum();
        self.check_range(c.dst, size, ACCESS_READWRITE)?;
        let stream = stream_of(&self.streams, c.stream)?;
        // An asynchronous copy only queues (as from pageable memory
        // natively); with mirrored ranges every copy completes first, as
        // their shadows are compared at each call.
        let queue_only = c.asynchronous && self.mirrors.is_empty();
        for (offset, data) in &pieces {
            if queue_only {
                self.dev.write_async(stream, c.dst + offset, data)?;
            } else {
                self.dev.write(stream, c.dst + offset, data)?;
            }
            // The client's bytes: a mirrored range's shadow takes them, so
            // only later device writes count as changes.
            self.mirrors.note_host_write(c.dst + offset, data);
        }
        Ok(None)
    }

    /// A copy from the client's pinned memory in a host region: straight
    /// from the registered mapping, queued on the stream (not waited for).
    fn memcpy_htod_region(&mut self, dst: u64, stream: u32, r: v1::HostRegionRef) -> CallOutcome {
        let region = self.host_regions.get(r.region)?;
        let (start, len) = region.range(r.offset, r.size)?;
        self.check_range(dst, len as u64, ACCESS_READWRITE)?;
        let stream = stream_of(&self.streams, stream)?;
        if self.mirrors.is_empty() {
            return self.dev.write_from_region(stream, dst, region.region(), start, len).map(|()| None);
        }
        // A mirrored range's shadow takes the client's bytes: they are
        // read once here, then copied as any others.
        let mut data = Vec::new();
        data.try_reserve_exact(len).map_err(|_| CallError::out_of_memory("cannot allocate the copy's host buffer"))?;
        region.region().read_append(start, len, &mut data).map_err(|e| CallError::invalid_value(e.to_string()))?;
        self.dev.write(stream, dst, &data)?;
        self.mirrors.note_host_write(dst, &data);
        Ok(None)
    }

    /// A copy into the client's pinned memory in a host region, queued on
    /// the stream; the client sees the bytes after it synchronizes.
    fn memcpy_dtoh_region(&mut self, src: u64, size: u64, stream: u32, r: v1::HostRegionRef) -> CallOutcome {
        if r.size != size {
            return Err(CallError::invalid_value(format!(
                "a copy of {size} bytes into {} bytes of a host region",
                r.size
            )));
        }
        let region = self.host_regions.get(r.region)?;
        let (start, len) = region.range(r.offset, r.size)?;
        self.check_range(src, size, ACCESS_READ)?;
        let stream = stream_of(&self.streams, stream)?;
        self.dev.read_into_region(stream, src, region.region(), start, len).map(|()| None)
    }

    fn memcpy_dtoh(&mut self, c: v1::MemcpyDtoH) -> CallOutcome {
        if let Some(r) = c.into_region {
            return self.memcpy_dtoh_region(c.src, c.size, c.stream, r);
        }
        self.check_range(c.src, c.size, ACCESS_READ)?;
        let stream = stream_of(&self.streams, c.stream)?;
        if c.size <= self.limits.max_inline_bytes {
            let mut out = Vec::new();
            out.try_reserve_exact(c.size as usize)
                .map_err(|_| CallError::out_of_memory("cannot allocate the copy's host buffer"))?;
            out.resize(c.size as usize, 0);
            self.dev.read(stream, c.src, &mut out)?;
            return Ok(Some(Value::Data(payload::encode(Bytes::from(out), self.limits.compression))));
        }
        // Reserved before the bytes are read: the session's bounds and the
        // host's cap (waiting a bounded time for other sessions to drain).
        let table = self.staging.clone();
        let room = table.room(c.size)?;
        // Staged in pieces read into reused buffers: no buffer as large as
        // the copy, zeroed and faulted in page by page, on this thread.
        let mut pieces = Vec::new();
        for offset in (0..c.size).step_by(staging::PIECE_BYTES) {
            let len = (c.size - offset).min(staging::PIECE_BYTES as u64) as usize;
            let mut buf = staging::buffers()
                .take(len)
                .ok_or_else(|| CallError::out_of_memory("cannot allocate the copy's host buffer"))?;
            self.dev.read(stream, c.src + offset, buf.filled(len))?;
            pieces.push(buf.freeze());
        }
        let id = table.add_download(room, pieces);
        Ok(Some(Value::Staged(v1::StagedRef { transfer_id: id, size: c.size })))
    }

    fn module_load(&mut self, m: v1::ModuleLoad) -> CallOutcome {
        new_id(&self.modules, m.module, "module", self.limits.max_handles)?;
        let key: [u8; 32] =
            m.sha256[..].try_into().map_err(|_| CallError::invalid_value("module hash must be 32 bytes (SHA-256)"))?;
        let started = std::time::Instant::now();
        let sent = match (m.image, m.staged) {
            (Some(p), None) => Some(
                payload::decode(p, self.limits.max_image_bytes)
                    .map_err(|e| CallError::invalid_value(format!("module image: {e}")))?,
            ),
            (None, Some(s)) => {
                if s.size > self.limits.max_image_bytes {
                    return Err(CallError::invalid_value(format!(
                        "module image of {} bytes exceeds the limit of {}",
                        s.size, self.limits.max_image_bytes
                    )));
                }
                Some(self.staging.take_upload(s.transfer_id, s.size)?)
            }
            (None, None) => None,
            (Some(_), Some(_)) => return Err(CallError::invalid_value("module image sent both inline and staged")),
        };
        let received = started.elapsed();
        let (image, cached) = match sent {
            // Loaded as sent; a large image's hash is checked and the image
            // cached for other sessions off this thread (a wrong hash is
            // never cached; a small image with one is refused here).
            Some(bytes) => {
                if !self.images.insert_unchecked(key, bytes.clone()) {
                    return Err(CallError::invalid_value("module image does not match its SHA-256"));
                }
                (bytes, started.elapsed())
            }
            None => {
                let img = self.images.get(&key).ok_or_else(|| {
                    CallError::new(cuda::FILE_NOT_FOUND, "module image not cached on the server; send it")
                })?;
                (Bytes::from_owner(img), started.elapsed())
            }
        };
        // A worker may have loaded this image before the session came.
        let (module, functions) = match self.dev.take_preloaded(&key) {
            Some(loaded) => {
                tracing::debug!(bytes = image.len(), "module image taken from the preloaded set");
                self.preloaded_hits += 1;
                loaded
            }
            None => self.dev.load_module(&image)?,
        };
        // Where a module's first use goes (issue 17): receiving its image,
        // handing it to the cache (cache_us: a large image's hash is checked
        // and the image copied and written off this thread), loading it on
        // the device.
        tracing::debug!(
            bytes = image.len(),
            functions = functions.len(),
            receive_us = received.as_micros() as u64,
            cache_us = cached.saturating_sub(received).as_micros() as u64,
            load_us = started.elapsed().saturating_sub(cached).as_micros() as u64,
            "module loaded"
        );
        let info = v1::ModuleInfo { functions: functions.iter().map(function_info_of).collect() };
        self.modules.insert(m.module, LoadedModule { functions, module });
        Ok(Some(Value::Module(info)))
    }

    fn module_get_global(&mut self, g: v1::ModuleGetGlobal) -> CallOutcome {
        let loaded = self
            .modules
            .get(&g.module)
            .ok_or_else(|| CallError::invalid_handle(format!("unknown module {}", g.module)))?;
        let (addr, size) = self.dev.module_global(&loaded.module, &g.name)?;
        if addr.checked_add(size).is_none() {
            return Err(CallError::new(
                cuda::UNKNOWN,
                format!("the device reported variable {:?} at {addr:#x} with {size} bytes, which overflows", g.name),
            ));
        }
        // An empty variable gives nothing to access.
        if size == 0 {
            return Ok(Some(Value::Global(v1::GlobalInfo { addr: g.at.unwrap_or(addr), size, managed: false })));
        }
        let managed = self.dev.global_is_managed(addr);
        let reserved = globals::Reserved { base: self.dev.va_base(), size: self.limits.va_size };
        let known = self.globals.note(g.module, &g.name, addr, size, managed, g.at, reserved)?;
        Ok(Some(Value::Global(v1::GlobalInfo { addr: known.client, size, managed })))
    }

    fn occupancy(&mut self, o: v1::Occupancy) -> CallOutcome {
        let (loaded, index) = function_of(&self.modules, o.module, o.function)?;
        let query = match v1::OccupancyQuery::try_from(o.query) {
            Ok(v1::OccupancyQuery::ActiveBlocks) => OccupancyQuery::ActiveBlocks {
                block_size: o.block_size,
                dynamic_smem_bytes: o.dynamic_smem_bytes,
                flags: o.flags,
            },
            Ok(v1::OccupancyQuery::PotentialBlockSize) => OccupancyQuery::PotentialBlockSize {
                block_size_limit: o.block_size,
                dynamic_smem_bytes: o.dynamic_smem_bytes,
                flags: o.flags,
            },
            Ok(v1::OccupancyQuery::AvailableDynamicSmem) => {
                OccupancyQuery::AvailableDynamicSmem { num_blocks: o.num_blocks, block_size: o.block_size }
            }
            Ok(v1::OccupancyQuery::ActiveClusters) => {
                let dims = |d: Option<v1::Dim3>| d.map_or([0; 3], |d| [d.x, d.y, d.z]);
                OccupancyQuery::ActiveClusters {
                    grid: dims(o.grid),
                    block: dims(o.block),
                    cluster: dims(o.cluster),
                    dynamic_smem_bytes: o.dynamic_smem_bytes,
                }
            }
            Ok(v1::OccupancyQuery::PotentialClusterSize) => {
                let dims = |d: Option<v1::Dim3>| d.map_or([0; 3], |d| [d.x, d.y, d.z]);
                OccupancyQuery::PotentialClusterSize {
                    grid: dims(o.grid),
                    block: dims(o.block),
                    dynamic_smem_bytes: o.dynamic_smem_bytes,
                }
            }
            Err(_) => return Err(CallError::invalid_value(format!("unknown occupancy query {}", o.query))),
        };
        let answer = self.dev.occupancy(&loaded.module, index, query)?;
        Ok(Some(Value::Occupancy(v1::OccupancyResult { value: answer.value, block_size: answer.block_size })))
    }

    /// Checks a launch against function `l.function` of module `l.module`
    /// (parameter size, dimensions, attributes); returns the function's
    /// index, dimensions and attributes.
    /// Function `function` of `module` as [`v1::FunctionInfo`], described
    /// first when it was loaded undescribed ([`FunctionInfo::described`]):
    /// the answer to `DescribeFunction`.
    fn describe_function(&mut self, module: u32, function: u32) -> CallOutcome {
        let (loaded, index) = function_of_mut(&mut self.modules, module, function)?;
        if !loaded.functions[index].described {
            loaded.functions[index] = self.dev.describe_function(&loaded.module, index)?;
        }
        Ok(Some(Value::Function(function_info_of(&loaded.functions[index]))))
    }

    fn check_launch(&self, l: &v1::Launch) -> Result<(usize, LaunchDims, LaunchAttrs), CallError> {
        let (loaded, index) = function_of(&self.modules, l.module, l.function)?;
        let f = &loaded.functions[index];
        if l.params.len() != f.params_size() as usize {
            return Err(CallError::invalid_value(format!(
                "{} takes {} bytes of parameters, got {}",
                f.name,
                f.params_size(),
                l.params.len()
            )));
        }
        let dim = |d: Option<v1::Dim3>| d.map(|d| [d.x, d.y, d.z]).unwrap_or([0; 3]);
        let dims = LaunchDims { grid: dim(l.grid), block: dim(l.block), shared_mem_bytes: l.shared_mem_bytes };
        if dims.grid.contains(&0) || dims.block.contains(&0) {
            return Err(CallError::invalid_value("grid and block dimensions must be at least 1"));
        }
        // Checked: three 32-bit dimensions multiply past 64 bits.
        let threads = product(dims.block)
            .ok_or_else(|| CallError::invalid_value(format!("block {:?} has too many threads", dims.block)))?;
        // An undescribed function's own limit is the driver's to check (the
        // client describes it before its first launch).
        if f.described && threads > u64::from(f.max_threads_per_block) {
            // Within the device's block limit, the function's own (register)
            // limit is a resource error, as the driver reports it.
            let code = if threads <= 1024 { cuda::LAUNCH_OUT_OF_RESOURCES } else { cuda::INVALID_VALUE };
            return Err(CallError::new(
                code,
                format!("block of {threads} threads exceeds {}'s limit of {}", f.name, f.max_threads_per_block),
            ));
        }
        product(dims.grid)
            .ok_or_else(|| CallError::invalid_value(format!("grid {:?} has too many blocks", dims.grid)))?;
        let attrs = launch_attrs(l.attributes.as_ref().unwrap_or(&v1::LaunchAttributes::default()), dims.grid)?;
        if let Some(w) = attrs.access_policy_window.filter(|w| w.num_bytes > 0) {
            // A hint about the session's own memory: it must lie in its range.
            let base = self.dev.va_base();
            let inside =
                w.base >= base && w.base.checked_add(w.num_bytes).is_some_and(|end| end <= base + self.limits.va_size);
            if !inside {
                return Err(CallError::invalid_value("access policy window outside this session's memory"));
            }
        }
        Ok((index, dims, attrs))
    }

    fn launch(&mut self, l: v1::Launch) -> CallOutcome {
        let (index, dims, attrs) = self.check_launch(&l)?;
        let (loaded, _) = function_of(&self.modules, l.module, l.function)?;
        let a = l.attributes.unwrap_or_default();
        let event = |e: &Option<v1::LaunchEvent>| -> Result<Option<LaunchEvent<'_, S::Event>>, CallError> {
            e.as_ref()
                .map(|e| {
                    let event = self.events.get(&e.event).ok_or_else(|| unknown_event(e.event))?;
                    Ok(LaunchEvent { event, flags: e.flags, trigger_at_block_start: e.trigger_at_block_start })
                })
                .transpose()
        };
        let events =
            LaunchEvents { programmatic: event(&a.programmatic_event)?, completion: event(&a.completion_event)? };
        let stream = stream_of(&self.streams, l.stream)?;
        self.dev.launch(&loaded.module, index, dims, &attrs, events, stream, &l.params)?;
        Ok(None)
    }
}

/// `x * y * z`, or `None` past 64 bits.
/// A function's description as a client receives it.
fn function_info_of(f: &FunctionInfo) -> v1::FunctionInfo {
    v1::FunctionInfo {
        name: f.name.clone(),
        params: f.params.iter().map(|p| v1::ParamInfo { offset: p.offset, size: p.size }).collect(),
        params_size: f.params_size(),
        max_threads_per_block: f.max_threads_per_block,
        attributes: f.attributes.iter().map(|(&k, &v)| (k, v)).collect(),
        undescribed: !f.described,
    }
}

fn product(d: [u32; 3]) -> Option<u64> {
    u64::from(d[0]).checked_mul(u64::from(d[1]))?.checked_mul(u64::from(d[2]))
}

/// Largest cluster the driver allows with NON_PORTABLE_CLUSTER_SIZE_ALLOWED
/// (8 without); the device refuses what the function does not allow.
const MAX_CLUSTER_BLOCKS: u64 = 16;

/// The launch attributes from the wire, shapes checked against `grid`.
fn launch_attrs(a: &v1::LaunchAttributes, grid: [u32; 3]) -> Result<LaunchAttrs, CallError> {
    let dim = |d: Option<v1::Dim3>| d.map(|d| [d.x, d.y, d.z]).unwrap_or([0; 3]);
    let cluster_size = |c: [u32; 3], what: &str| -> Result<(), CallError> {
        if c == [0; 3] {
            return Ok(());
        }
        let bad = || CallError::new(cuda::INVALID_CLUSTER_SIZE, format!("{what} {c:?} does not fit grid {grid:?}"));
        if c.contains(&0) || c.iter().zip(grid).any(|(&c, g)| g % c != 0) {
            return Err(bad());
        }
        match product(c) {
            Some(n) if n <= MAX_CLUSTER_BLOCKS => Ok(()),
            _ => Err(bad()),
        }
    };
    let cluster = dim(a.cluster);
    cluster_size(cluster, "cluster")?;
    let preferred_cluster = dim(a.preferred_cluster);
    cluster_size(preferred_cluster, "preferred cluster")?;
    let byte = |v: u32| u8::try_from(v).map_err(|_| CallError::invalid_value(format!("memory sync domain {v}")));
    let mem_sync_domain_map = match a.mem_sync_domain_map {
        Some(m) => Some((byte(m.default_domain)?, byte(m.remote_domain)?)),
        None => None,
    };
    let access_policy_window = a.access_policy_window.map(|w| AccessPolicyWindow {
        base: w.base,
        num_bytes: w.num_bytes,
        hit_ratio: w.hit_ratio,
        hit_prop: w.hit_prop,
        miss_prop: w.miss_prop,
    });
    Ok(LaunchAttrs {
        cooperative: a.cooperative,
        cluster,
        cluster_scheduling_policy: a.cluster_scheduling_policy,
        programmatic_serialization: a.programmatic_serialization,
        priority: a.priority,
        mem_sync_domain: a.mem_sync_domain,
        mem_sync_domain_map,
        access_policy_window,
        preferred_cluster,
        synchronization_policy: a.synchronization_policy,
    })
}

/// Calls after which the program may read what the device wrote: then the
/// reply carries the mirrored ranges' changes.
fn synchronizes(op: &Op) -> bool {
    matches!(
        op,
        Op::StreamSynchronize(_)
            | Op::StreamQuery(_)
            | Op::EventSynchronize(_)
            | Op::EventQuery(_)
            | Op::ContextSynchronize(_)
            | Op::MemcpyDtoh(_)
            | Op::ArrayCopy(v1::ArrayCopy {
                dst: Some(v1::CopyPlace { place: Some(v1::copy_place::Place::Host(_)) }),
                ..
            })
    )
}

fn stream_of<T>(streams: &HashMap<u32, T>, id: u32) -> Result<Option<&T>, CallError> {
    if id == 0 {
        return Ok(None);
    }
    streams.get(&id).map(Some).ok_or_else(|| CallError::invalid_handle(format!("unknown stream {id}")))
}

/// Loaded module `module` and the index of its function `function`.
fn function_of<M>(
    modules: &HashMap<u32, LoadedModule<M>>,
    module: u32,
    function: u32,
) -> Result<(&LoadedModule<M>, usize), CallError> {
    let loaded = modules.get(&module).ok_or_else(|| CallError::invalid_handle(format!("unknown module {module}")))?;
    let index = function as usize;
    if index >= loaded.functions.len() {
        return Err(no_function(module, function));
    }
    Ok((loaded, index))
}

/// As [`function_of`], for changing the function.
fn function_of_mut<M>(
    modules: &mut HashMap<u32, LoadedModule<M>>,
    module: u32,
    function: u32,
) -> Result<(&mut LoadedModule<M>, usize), CallError> {
    let loaded =
        modules.get_mut(&module).ok_or_else(|| CallError::invalid_handle(format!("unknown module {module}")))?;
    let index = function as usize;
    if index >= loaded.functions.len() {
        return Err(no_function(module, function));
    }
    Ok((loaded, index))
}

fn no_function(module: u32, function: u32) -> CallError {
    CallError::invalid_handle(format!("module {module} has no function {function}"))
}

fn unknown_event(id: u32) -> CallError {
    CallError::invalid_handle(format!("unknown event {id}"))
}

/// Checks that a client-chosen id is free and the table has room.
fn new_id<T>(table: &HashMap<u32, T>, id: u32, kind: &str, max: usize) -> Result<(), CallError> {
    if id == 0 {
        return Err(CallError::invalid_value(format!("{kind} id 0 is reserved")));
    }
    if table.contains_key(&id) {
        return Err(CallError::invalid_value(format!("{kind} id {id} is already in use")));
    }
    if table.len() >= max {
        return Err(CallError::out_of_memory(format!("session holds the maximum of {max} {kind}s")));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    pub(crate) use crate::device::emulated::GRANULARITY;
    use crate::device::emulated::{EmulatedDevice, EmulatedSession};
    use crate::device::{Backend, DeviceResult, FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYN_SMEM, texture};
    use crate::images::key_of;

    pub(crate) fn limits() -> SessionLimits {
        SessionLimits {
            memory_quota: 8 * GRANULARITY,
            va_size: 16 * GRANULARITY,
            granularity: GRANULARITY,
            max_inline_bytes: 1 << 16,
            max_image_bytes: 1 << 20,
            max_handles: 4,
            max_listed_errors: 2,
            max_output_bytes: 1 << 20,
            compression: Compression::Auto,
        }
    }

    fn state<S: BackendSession>(dev: S) -> SessionState<S> {
        SessionState::new(dev, limits(), Arc::new(Staging::new(1 << 24, 8)), Arc::new(ImageCache::new(None, 1 << 20)))
    }

    /// A session on the emulated device whose modules of up to 32
    /// functions are described at load (the built-in module's are, so
    /// tests read their attributes at once; the default, all described at
    /// first use, has its own test: `undescribed_functions_are_described_when_asked`).
    pub(crate) fn session() -> SessionState<EmulatedSession> {
        let dev = EmulatedDevice::new(1 << 30);
        dev.describe_eagerly_up_to(32);
        state(dev.open_session(limits().va_size).expect("session"))
    }

    /// A session on GPU 0 with a quota of 8 granules in 16; `None` (and a
    /// line saying the test is skipped) where there is no CUDA device.
    pub(crate) fn gpu_session() -> Option<SessionState<crate::device::cuda::CudaSession>> {
        gpu_session_of(|g| SessionLimits { granularity: g, va_size: 16 * g, memory_quota: 8 * g, ..limits() })
    }

    /// [`gpu_session`] with the limits `limits` makes from the device's
    /// granularity.
    pub(crate) fn gpu_session_of(
        limits: impl FnOnce(u64) -> SessionLimits,
    ) -> Option<SessionState<crate::device::cuda::CudaSession>> {
        let dev = match crate::device::cuda::CudaDevice::open(0) {
            Err(e) if e.code == cuda::NO_DEVICE => {
                eprintln!("no CUDA device: skipping ({e})");
                return None;
            }
            other => other.expect("open device 0"),
        };
        let limits = limits(dev.description().granularity);
        Some(SessionState::new(
            dev.open_session(limits.va_size).expect("session"),
            limits,
            Arc::new(Staging::new(1 << 24, 8)),
            Arc::new(ImageCache::new(None, 1 << 20)),
        ))
    }

    pub(crate) fn code(r: CallOutcome) -> u32 {
        r.map(|_| 0).unwrap_or_else(|e| e.code)
    }

    #[test]
    fn mapping_rules() {
        let mut s = session();
        let b = s.va_base();
        assert_eq!(code(s.mem_map(b, GRANULARITY)), 0);
        assert_eq!(code(s.mem_map(b, GRANULARITY)), cuda::INVALID_VALUE, "overlap");
        assert_eq!(code(s.mem_map(b + 1, GRANULARITY)), cuda::INVALID_VALUE, "unaligned");
        assert_eq!(code(s.mem_map(b - GRANULARITY, GRANULARITY)), cuda::INVALID_VALUE, "below range");
        assert_eq!(code(s.mem_map(b + GRANULARITY, 8 * GRANULARITY)), cuda::OUT_OF_MEMORY, "quota");
        assert_eq!(code(s.mem_unmap(b + GRANULARITY)), cuda::INVALID_VALUE);
        assert_eq!(code(s.mem_unmap(b)), 0);
        assert_eq!(s.mapped_bytes(), 0);
    }

    fn batch(seq: u64, ops: Vec<Op>) -> v1::Batch {
        v1::Batch { seq, calls: ops.into_iter().map(|op| v1::Call { op: Some(op) }).collect() }
    }

    /// Stream memory operations: writes land in order, a met wait passes,
    /// and what CUDA refuses (or what would never end on the emulated
    /// device) is an error reply that leaves the session working.
    #[test]
    fn stream_memory_operations_write_wait_and_are_checked() {
        let mut s = session();
        let b = s.va_base();
        assert_eq!(code(s.mem_map(b, GRANULARITY)), 0);
        let mem_op = |kind, address, value, flags| v1::StreamMemOp { kind, address, value, flags };
        let ops = |ops: Vec<v1::StreamMemOp>| Op::StreamMemOps(v1::StreamMemOps { stream: 0, ops });
        let batch_ops = vec![
            mem_op(2, b + 8, 0xdead_beef, 0),            // write 32
            mem_op(5, b + 16, 0x0102_0304_0506_0708, 0), // write 64
            mem_op(6, 0, 0, 1),                          // barrier (GPU scope)
            mem_op(1, b + 8, 0xdead_beef, 1),            // wait 32, equal
            mem_op(4, b + 16, 0x0102_0304_0506_0700, 0), // wait 64, >=
            mem_op(3, 0, 0, 0),                          // flush remote writes
        ];
        assert_eq!(code(s.execute(ops(batch_ops))), 0);
        let mut want = 0xdead_beef_u32.to_le_bytes().to_vec();
        want.extend([0; 4]);
        want.extend(0x0102_0304_0506_0708_u64.to_le_bytes());
        assert_eq!(dtoh(&mut s, b + 8, 16), Ok(want));
        // A wait nothing queued after it could meet: refused, not a hang.
        assert_eq!(code(s.execute(ops(vec![mem_op(1, b + 8, 1, 1)]))), cuda::NOT_SUPPORTED);
        for bad in [
            vec![mem_op(2, b + 2, 1, 0)],                                      // unaligned
            vec![mem_op(2, b - 8, 1, 0)],                                      // outside the session
            vec![mem_op(2, b + GRANULARITY, 1, 0)],                            // not mapped
            vec![mem_op(9, b, 1, 0)],                                          // unknown type
            vec![],                                                            // empty
            vec![mem_op(6, 0, 0, 0); gpupool_proto::mem_ops::MAX_MEM_OPS + 1], // too many
        ] {
            assert_eq!(code(s.execute(ops(bad.clone()))), cuda::INVALID_VALUE, "{bad:?}");
        }
        let unknown_stream = Op::StreamMemOps(v1::StreamMemOps { stream: 77, ops: vec![mem_op(6, 0, 0, 0)] });
        assert_ne!(code(s.execute(unknown_stream)), 0);
        assert_eq!(code(s.execute(ops(vec![mem_op(2, b, 5, 0)]))), 0, "still working");
        assert_eq!(code(s.mem_unmap(b)), 0);
    }

    /// Mapped host memory: the device's changes come back with the reply
    /// of a synchronizing batch, once, only the changed chunks, inline up to
    /// the reply's budget and as a location beyond it; bounds are checked.
    #[test]
    fn mirrored_ranges_report_device_changes_at_synchronization() {
        let mut s = session();
        let b = s.va_base();
        assert_eq!(code(s.mem_map(b, GRANULARITY)), 0);
        let add = |addr, size| Op::MirrorAdd(v1::MirrorAdd { addr, size });
        let memset = |dst, count| Op::Memset(v1::Memset { dst, value: 7, element_size: 1, count, stream: 0 });
        let sync = || Op::ContextSynchronize(v1::ContextSynchronize {});
        assert_eq!(code(s.execute(add(b, 3 * 4096))), 0);
        assert_eq!(code(s.execute(add(b + 4096, 16))), cuda::INVALID_VALUE, "overlap");
        assert_eq!(code(s.execute(add(b + GRANULARITY, 16))), cuda::INVALID_VALUE, "not mapped");

        // Without a synchronizing call the reply carries nothing.
        let reply = s.execute_batch(batch(1, vec![memset(b + 4096 + 10, 4)]));
        assert!(reply.errors.is_empty() && reply.mirrors.is_empty(), "{reply:?}");
        let reply = s.execute_batch(batch(2, vec![sync()]));
        assert_eq!(reply.mirrors.len(), 1, "{reply:?}");
        let m = &reply.mirrors[0];
        assert_eq!((m.addr, m.size), (b + 4096, 4096));
        assert_eq!(&m.data[10..14], &[7; 4]);
        assert!(s.execute_batch(batch(3, vec![sync()])).mirrors.is_empty(), "reported once");
        // The client writes zeros (a status word reset), the device writes
        // the same value as before: a change against what the client sent.
        let zeros = payload::encode(Bytes::from(vec![0u8; 4]), Compression::Off);
        let reset = Op::MemcpyHtod(v1::MemcpyHtoD {
            dst: b + 4096 + 10,
            source: Some(Source::Inline(zeros)),
            ..Default::default()
        });
        let reply = s.execute_batch(batch(30, vec![reset, memset(b + 4096 + 10, 4), sync()]));
        assert_eq!(reply.mirrors.len(), 1, "{reply:?}");
        assert_eq!(&reply.mirrors[0].data[10..14], &[7; 4]);

        // Over the inline budget (64 KiB in these limits): located only.
        let big = b + 64 * 1024;
        assert_eq!(code(s.execute(add(big, 128 * 1024))), 0);
        let reply = s.execute_batch(batch(4, vec![memset(big, 128 * 1024), sync()]));
        assert_eq!(reply.mirrors.len(), 1);
        assert_eq!((reply.mirrors[0].size, reply.mirrors[0].data.len()), (128 * 1024, 0));

        // Bounds; removal; a range whose memory is unmapped is dropped.
        assert_eq!(code(s.execute(Op::MirrorRemove(v1::MirrorRemove { addr: b + 1 }))), cuda::INVALID_HANDLE);
        assert_eq!(code(s.execute(Op::MirrorRemove(v1::MirrorRemove { addr: big }))), 0);
        assert_eq!(code(s.mem_unmap(b)), 0);
        assert!(s.execute_batch(batch(5, vec![sync()])).mirrors.is_empty());
        assert!(s.mirrors.is_empty(), "dropped with its memory");
    }

    #[test]
    fn handles_checked() {
        let mut s = session();
        let op = Op::StreamSynchronize(v1::StreamSynchronize { stream: 9 });
        assert_eq!(code(s.execute(op)), cuda::INVALID_HANDLE);
        for id in 1..=4 {
            assert_eq!(code(s.execute(Op::EventCreate(v1::EventCreate { event: id, flags: 0 }))), 0);
        }
        assert_eq!(code(s.execute(Op::EventCreate(v1::EventCreate { event: 5, flags: 0 }))), cuda::OUT_OF_MEMORY);
        assert_eq!(code(s.execute(Op::EventCreate(v1::EventCreate { event: 1, flags: 0 }))), cuda::INVALID_VALUE);
        // Flags the driver refuses are refused before they reach it.
        let mut s = session();
        for flags in [0x8, 0x4, 0x4 | 0x1] {
            let op = Op::EventCreate(v1::EventCreate { event: 1, flags });
            assert_eq!(code(s.execute(op)), cuda::INVALID_VALUE, "flags {flags:#x}");
        }
        assert_eq!(code(s.execute(Op::EventCreate(v1::EventCreate { event: 1, flags: 0x4 | 0x2 }))), 0);
    }

    #[test]
    fn batch_reports_errors_and_keeps_going() {
        let mut s = session();
        let b = s.va_base();
        let calls = vec![
            Op::MemMap(v1::MemMap { addr: b, size: GRANULARITY }),
            Op::Memset(v1::Memset { dst: b + GRANULARITY, value: 1, element_size: 1, count: 1, stream: 0 }),
            Op::Memset(v1::Memset { dst: b, value: 0xab, element_size: 1, count: 4, stream: 0 }),
            Op::Memset(v1::Memset { dst: b, value: 0, element_size: 3, count: 4, stream: 0 }),
            Op::Memset(v1::Memset { dst: b, value: 0, element_size: 1, count: u64::MAX, stream: 0 }),
            Op::MemcpyDtoh(v1::MemcpyDtoH { src: b, size: 4, stream: 0, into_region: None }),
        ];
        let batch = v1::Batch { seq: 7, calls: calls.into_iter().map(|op| v1::Call { op: Some(op) }).collect() };
        let reply = s.execute_batch(batch);
        assert_eq!(reply.seq, 7);
        assert_eq!(reply.error_count, 3);
        assert_eq!(reply.errors.len(), 2);
        assert_eq!(reply.errors[0].index, 1);
        let Some(v1::CallResult { value: Some(Value::Data(p)) }) = reply.result else { panic!("no data") };
        assert_eq!(&payload::decode(p, 16).expect("payload")[..], &[0xab; 4]);
    }

    fn load(s: &mut SessionState<impl BackendSession>, module: u32, image: &'static [u8]) -> CallOutcome {
        s.execute(Op::ModuleLoad(v1::ModuleLoad {
            module,
            sha256: Bytes::copy_from_slice(&key_of(image)),
            image: Some(payload::encode(Bytes::from_static(image), Compression::Off)),
            staged: None,
        }))
    }

    pub(crate) fn load_builtin(s: &mut SessionState<impl BackendSession>, module: u32) -> v1::ModuleInfo {
        match load(s, module, gpupool_proto::BUILTIN_MODULE) {
            Ok(Some(Value::Module(info))) => info,
            other => panic!("built-in module load: {other:?}"),
        }
    }

    fn occupancy(s: &mut SessionState<impl BackendSession>, o: v1::Occupancy) -> Result<(i64, i32), u32> {
        match s.execute(Op::Occupancy(o)) {
            Ok(Some(Value::Occupancy(r))) => Ok((r.value, r.block_size)),
            Ok(other) => panic!("unexpected occupancy result {other:?}"),
            Err(e) => Err(e.code),
        }
    }

    fn set_attribute(s: &mut SessionState<impl BackendSession>, function: u32, attribute: u32, value: i32) -> u32 {
        code(s.execute(Op::FuncSetAttribute(v1::FuncSetAttribute { module: 1, function, attribute, value })))
    }

    #[test]
    fn builtin_module_reports_function_attributes() {
        let mut s = session();
        let info = load_builtin(&mut s, 1);
        let f = &info.functions[1];
        assert_eq!(f.name, "vector_add");
        assert_eq!(f.attributes.get(&0), Some(&1024), "MAX_THREADS_PER_BLOCK");
        assert_eq!(f.attributes.get(&1), Some(&0), "SHARED_SIZE_BYTES");
        assert_eq!(f.attributes.get(&4), Some(&32), "NUM_REGS");
        assert_eq!(f.attributes.get(&5), Some(&90), "PTX_VERSION");
        assert_eq!(f.attributes.get(&MAX_DYN_SMEM), Some(&49152));
        assert_eq!(f.attributes.get(&9), Some(&-1), "PREFERRED_SHARED_MEMORY_CARVEOUT");
    }

    /// A module loaded undescribed (as the GPU backend loads a library of
    /// many kernels): attributes come with `DescribeFunction`, those set
    /// since the load included; the launches need no description.
    #[test]
    fn undescribed_functions_are_described_when_asked() {
        let dev = EmulatedDevice::new(1 << 30);
        dev.describe_eagerly_up_to(0);
        let mut s = state(dev.open_session(limits().va_size).expect("session"));
        let info = load_builtin(&mut s, 1);
        assert!(info.functions.iter().all(|f| f.attributes.is_empty() && f.max_threads_per_block == 0));
        assert!(info.functions.iter().all(|f| f.undescribed), "{info:?}");
        assert_eq!(code(s.execute(empty_launch(dim(1, 1, 1), dim(32, 1, 1), Default::default()))), cuda::SUCCESS);
        assert_eq!(set_attribute(&mut s, 1, MAX_DYN_SMEM, 100_000), cuda::SUCCESS);
        let describe = |s: &mut SessionState<_>, module, function| {
            s.execute(Op::DescribeFunction(v1::DescribeFunction { module, function }))
        };
        let f = match describe(&mut s, 1, 1) {
            Ok(Some(Value::Function(f))) => f,
            other => panic!("DescribeFunction: {other:?}"),
        };
        assert!(!f.undescribed && f.name == "vector_add" && f.max_threads_per_block == 1024, "{f:?}");
        assert_eq!(f.attributes.get(&MAX_DYN_SMEM), Some(&100_000), "the attribute set before");
        assert_eq!(f.attributes.get(&4), Some(&32), "NUM_REGS");
        assert_eq!(f.params_size, info.functions[1].params_size);
        assert!(s.function_info(1, 1).expect("kept").described, "described once, then kept");
        assert_eq!(code(describe(&mut s, 1, 99)), cuda::INVALID_HANDLE, "no such function");
        assert_eq!(code(describe(&mut s, 7, 0)), cuda::INVALID_HANDLE, "no such module");
    }

    fn dim(x: u32, y: u32, z: u32) -> Option<v1::Dim3> {
        Some(v1::Dim3 { x, y, z })
    }

    /// A launch of the built-in `empty` (function 0) of module 1.
    fn empty_launch(grid: Option<v1::Dim3>, block: Option<v1::Dim3>, attributes: v1::LaunchAttributes) -> Op {
        Op::Launch(v1::Launch {
            module: 1,
            function: 0,
            grid,
            block,
            attributes: Some(attributes),
            ..Default::default()
        })
    }

    #[test]
    fn launch_dimensions_are_checked_without_overflow() {
        let mut s = session();
        load_builtin(&mut s, 1);
        let none = v1::LaunchAttributes::default;
        assert_eq!(code(s.execute(empty_launch(dim(1, 1, 1), dim(32, 1, 1), none()))), 0);
        let huge = 1 << 31;
        assert_eq!(code(s.execute(empty_launch(dim(1, 1, 1), dim(huge, huge, huge), none()))), cuda::INVALID_VALUE);
        assert_eq!(
            code(s.execute(empty_launch(dim(u32::MAX, u32::MAX, u32::MAX), dim(1, 1, 1), none()))),
            cuda::INVALID_VALUE
        );
        assert_eq!(code(s.execute(empty_launch(dim(1, 0, 1), dim(1, 1, 1), none()))), cuda::INVALID_VALUE);
        assert_eq!(code(s.execute(empty_launch(None, dim(1, 1, 1), none()))), cuda::INVALID_VALUE);
    }

    #[test]
    fn cooperative_and_cluster_launches() {
        let mut s = session();
        load_builtin(&mut s, 1);
        let cooperative = || v1::LaunchAttributes { cooperative: true, ..Default::default() };
        // 132 SMs x 2 resident blocks of 1024 threads.
        assert_eq!(code(s.execute(empty_launch(dim(264, 1, 1), dim(1024, 1, 1), cooperative()))), 0);
        assert_eq!(
            code(s.execute(empty_launch(dim(265, 1, 1), dim(1024, 1, 1), cooperative()))),
            cuda::COOPERATIVE_LAUNCH_TOO_LARGE
        );
        let cluster = |c: Option<v1::Dim3>| v1::LaunchAttributes { cluster: c, ..Default::default() };
        assert_eq!(code(s.execute(empty_launch(dim(8, 2, 1), dim(32, 1, 1), cluster(dim(4, 2, 1))))), 0);
        assert_eq!(
            code(s.execute(empty_launch(dim(6, 1, 1), dim(32, 1, 1), cluster(dim(4, 1, 1))))),
            cuda::INVALID_CLUSTER_SIZE
        );
        let huge = 1 << 31;
        assert_eq!(
            code(s.execute(empty_launch(dim(huge, 1, 1), dim(32, 1, 1), cluster(dim(huge, 1, 1))))),
            cuda::INVALID_CLUSTER_SIZE
        );
        let event = v1::LaunchAttributes {
            completion_event: Some(v1::LaunchEvent { event: 9, ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(code(s.execute(empty_launch(dim(1, 1, 1), dim(1, 1, 1), event))), cuda::INVALID_HANDLE);
    }

    #[test]
    fn context_limits_are_kept_and_the_printf_fifo_follows() {
        let mut s = session();
        let limits: BTreeMap<u32, u64> = s.limits().into_iter().collect();
        assert_eq!(limits.get(&2), Some(&(8 << 20)), "MALLOC_HEAP_SIZE");
        assert_eq!(limits.len(), 8);
        let set = |s: &mut SessionState<EmulatedSession>, limit, value| {
            s.execute(Op::CtxSetLimit(v1::CtxSetLimit { limit, value }))
        };
        assert!(matches!(set(&mut s, 2, 64 << 20), Ok(Some(Value::Limit(v))) if v == 64 << 20));
        assert_eq!(s.limits().into_iter().find(|(l, _)| *l == 2), Some((2, 64 << 20)));
        assert_eq!(code(set(&mut s, 11, 1)), cuda::INVALID_VALUE);
        // A FIFO of 100 bytes holds two lines of print_ids.
        assert!(set(&mut s, 1, 100).is_ok());
        load_builtin(&mut s, 1);
        let print = Op::Launch(v1::Launch {
            module: 1,
            function: 4,
            grid: dim(1, 1, 1),
            block: dim(8, 1, 1),
            params: 7u32.to_le_bytes().to_vec().into(),
            ..Default::default()
        });
        assert_eq!(code(s.execute(print)), 0);
        assert_eq!(s.dev.output.stdout.len(), 2 * "gpupool printf 7: block 0 thread 0\n".len());
    }

    /// The emulated built-in module's variable: outside the session's
    /// range, one per module, written by its kernel, read by copies.
    #[test]
    fn builtin_module_variables() {
        let mut s = session();
        let info = load_builtin(&mut s, 1);
        assert_eq!(global(&mut s, 1, "counter"), Err(cuda::NOT_FOUND));
        assert_eq!(global(&mut s, 2, "tally"), Err(cuda::INVALID_HANDLE));
        let (tally, size) = global(&mut s, 1, "tally").expect("tally");
        assert_eq!(size, 8);
        let base = s.va_base();
        assert!(tally + size <= base || tally >= base + limits().va_size, "outside the range");
        load_builtin(&mut s, 2);
        let (other, _) = global(&mut s, 2, "tally").expect("tally of module 2");
        assert_ne!(other, tally, "each module its own");
        assert_eq!(htod(&mut s, tally, &[1, 0, 0, 0, 0, 0, 0, 0]), 0);
        let f = info.functions.iter().position(|f| f.name == "tally_add").expect("tally_add") as u32;
        let dims = |x| Some(v1::Dim3 { x, y: 1, z: 1 });
        let add = Op::Launch(v1::Launch {
            module: 1,
            function: f,
            grid: dims(2),
            block: dims(3),
            params: 5u64.to_le_bytes().to_vec().into(),
            ..Default::default()
        });
        assert_eq!(code(s.execute(add)), 0);
        assert_eq!(dtoh(&mut s, tally, 8), Ok(31u64.to_le_bytes().to_vec()), "1 + 6 threads x 5");
        assert_eq!(dtoh(&mut s, other, 8), Ok(vec![0; 8]), "module 2's untouched");
    }

    #[test]
    fn occupancy_queries() {
        let mut s = session();
        load_builtin(&mut s, 1);
        let active = |block_size, dynamic_smem_bytes| v1::Occupancy {
            module: 1,
            function: 1,
            query: v1::OccupancyQuery::ActiveBlocks as i32,
            block_size,
            dynamic_smem_bytes,
            ..Default::default()
        };
        // 8 warps a block: 64 warps (and 64 Ki registers at 32 a thread) an SM.
        assert_eq!(occupancy(&mut s, active(256, 0)), Ok((8, 0)));
        assert_eq!(occupancy(&mut s, active(1024, 0)), Ok((2, 0)));
        // 40000 + 1024 reserved bytes, rounded to 41088: 5 fit in 228 KiB.
        assert_eq!(occupancy(&mut s, active(128, 40_000)), Ok((5, 0)));
        assert_eq!(occupancy(&mut s, active(2048, 0)), Ok((0, 0)), "over the block limit");
        assert_eq!(occupancy(&mut s, active(128, 49_153)), Ok((0, 0)), "over the dynamic smem limit");
        assert_eq!(occupancy(&mut s, active(0, 0)), Err(cuda::INVALID_VALUE));
        assert_eq!(occupancy(&mut s, v1::Occupancy { flags: 2, ..active(256, 0) }), Err(cuda::INVALID_VALUE));

        let potential = |limit| v1::Occupancy {
            module: 1,
            function: 1,
            query: v1::OccupancyQuery::PotentialBlockSize as i32,
            block_size: limit,
            ..Default::default()
        };
        // 1024 threads already fill an SM (2 blocks); 132 SMs.
        assert_eq!(occupancy(&mut s, potential(0)), Ok((264, 1024)));
        // Below 100 threads, 64 fill an SM with 32 blocks.
        assert_eq!(occupancy(&mut s, potential(100)), Ok((32 * 132, 64)));

        let available = |num_blocks, block_size| v1::Occupancy {
            module: 1,
            function: 1,
            query: v1::OccupancyQuery::AvailableDynamicSmem as i32,
            block_size,
            num_blocks,
            ..Default::default()
        };
        // 228 KiB / 4 - 1 KiB reserved = 56 KiB, capped by the 48 KiB default.
        assert_eq!(occupancy(&mut s, available(4, 256)), Ok((49152, 0)));
        assert_eq!(occupancy(&mut s, available(9, 256)), Ok((0, 0)), "only 8 fit by warps");
        assert_eq!(occupancy(&mut s, available(0, 256)), Err(cuda::INVALID_VALUE));

        // Clusters (issue 20, finding 8): a cluster of 2^31 cubed blocks
        // divided by zero in the model once its product wrapped; a cluster
        // of zeros is no cluster.
        let clusters = |cluster: [u32; 3], block: [u32; 3]| v1::Occupancy {
            module: 1,
            function: 1,
            query: v1::OccupancyQuery::ActiveClusters as i32,
            grid: Some(v1::Dim3 { x: 64, y: 1, z: 1 }),
            block: Some(v1::Dim3 { x: block[0], y: block[1], z: block[2] }),
            cluster: Some(v1::Dim3 { x: cluster[0], y: cluster[1], z: cluster[2] }),
            ..Default::default()
        };
        // 8 blocks of 256 threads an SM, 132 SMs: 1056 blocks, 528 pairs.
        assert_eq!(occupancy(&mut s, clusters([2, 1, 1], [256, 1, 1])), Ok((528, 0)));
        assert_eq!(occupancy(&mut s, clusters([0, 0, 0], [256, 1, 1])), Ok((1056, 0)));
        assert_eq!(occupancy(&mut s, clusters([1 << 31; 3], [256, 1, 1])), Err(cuda::INVALID_VALUE));
        assert_eq!(occupancy(&mut s, clusters([2, 1, 1], [1 << 31; 3])), Ok((0, 0)), "a block no SM holds");
        assert_eq!(occupancy(&mut s, clusters([2, 1, 1], [0, 1, 1])), Err(cuda::INVALID_VALUE));
        // The largest cluster: CUDA's portable 8 when a block fits at all.
        let potential = |block: [u32; 3]| v1::Occupancy {
            query: v1::OccupancyQuery::PotentialClusterSize as i32,
            ..clusters([0, 0, 0], block)
        };
        assert_eq!(occupancy(&mut s, potential([256, 1, 1])), Ok((8, 0)));
        assert_eq!(occupancy(&mut s, potential([1 << 31; 3])), Ok((0, 0)), "a block no SM holds");
        assert_eq!(occupancy(&mut s, potential([0, 1, 1])), Err(cuda::INVALID_VALUE));

        assert_eq!(occupancy(&mut s, v1::Occupancy { query: 7, ..active(256, 0) }), Err(cuda::INVALID_VALUE));
        assert_eq!(occupancy(&mut s, v1::Occupancy { function: 9, ..active(256, 0) }), Err(cuda::INVALID_HANDLE));
        assert_eq!(occupancy(&mut s, v1::Occupancy { module: 2, ..active(256, 0) }), Err(cuda::INVALID_HANDLE));
    }

    #[test]
    fn function_attributes_can_be_set_within_cuda_ranges() {
        let mut s = session();
        load_builtin(&mut s, 1);
        assert_eq!(set_attribute(&mut s, 1, MAX_DYN_SMEM, 100_000), 0);
        let attributes = &s.function_info(1, 1).expect("function").attributes;
        assert_eq!(attributes.get(&MAX_DYN_SMEM), Some(&100_000));
        // Other functions keep theirs.
        assert_eq!(s.function_info(1, 0).expect("function").attributes.get(&MAX_DYN_SMEM), Some(&49152));
        // The occupancy model follows: 56 KiB of dynamic smem now allowed.
        let available = v1::Occupancy {
            module: 1,
            function: 1,
            query: v1::OccupancyQuery::AvailableDynamicSmem as i32,
            block_size: 256,
            num_blocks: 4,
            ..Default::default()
        };
        assert_eq!(occupancy(&mut s, available), Ok((57344, 0)));

        assert_eq!(set_attribute(&mut s, 1, MAX_DYN_SMEM, 232_449), cuda::INVALID_VALUE, "over the opt-in limit");
        assert_eq!(set_attribute(&mut s, 1, MAX_DYN_SMEM, -1), cuda::INVALID_VALUE);
        assert_eq!(set_attribute(&mut s, 1, 9, 50), 0);
        assert_eq!(set_attribute(&mut s, 1, 9, -1), 0);
        assert_eq!(set_attribute(&mut s, 1, 9, 101), cuda::INVALID_VALUE);
        assert_eq!(set_attribute(&mut s, 1, 9, -2), cuda::INVALID_VALUE);
        assert_eq!(s.function_info(1, 1).expect("function").attributes.get(&9), Some(&-1));
        assert_eq!(set_attribute(&mut s, 1, 0, 512), cuda::INVALID_VALUE, "read-only");
        assert_eq!(set_attribute(&mut s, 1, u32::MAX, 0), cuda::INVALID_VALUE);
        assert_eq!(set_attribute(&mut s, 9, 9, 0), cuda::INVALID_HANDLE);
        let op = Op::FuncSetAttribute(v1::FuncSetAttribute { module: 2, function: 0, attribute: 9, value: 0 });
        assert_eq!(code(s.execute(op)), cuda::INVALID_HANDLE);
    }

    #[test]
    fn images_the_emulator_cannot_run_load_without_functions() {
        let mut s = session();
        let ptx = b".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry k() { ret; }\n";
        match load(&mut s, 1, ptx) {
            Ok(Some(Value::Module(info))) => assert!(info.functions.is_empty()),
            other => panic!("PTX load: {other:?}"),
        }
        let fatbin: &[u8] = &[0x50, 0xed, 0x55, 0xba, 1, 0, 0x10, 0];
        assert!(matches!(load(&mut s, 2, fatbin), Ok(Some(Value::Module(info))) if info.functions.is_empty()));
        assert_eq!(code(load(&mut s, 3, b"")), cuda::INVALID_IMAGE);
        let wrapper: &[u8] = &[0xb1, 0x43, 0x62, 0x46, 1, 0, 0, 0];
        assert_eq!(code(load(&mut s, 3, wrapper)), cuda::INVALID_IMAGE);

        let launch = v1::Launch {
            module: 1,
            grid: Some(v1::Dim3 { x: 1, y: 1, z: 1 }),
            block: Some(v1::Dim3 { x: 1, y: 1, z: 1 }),
            ..Default::default()
        };
        assert_eq!(code(s.execute(Op::Launch(launch))), cuda::INVALID_HANDLE);
        let get = Op::ModuleGetGlobal(v1::ModuleGetGlobal { module: 1, name: "x".into(), at: None });
        assert_eq!(code(s.execute(get)), cuda::NOT_FOUND);
        assert_eq!(code(s.execute(Op::ModuleUnload(v1::ModuleUnload { module: 1 }))), 0);
    }

    /// The emulated device with module variables: `counter` outside the
    /// session's range, and `edge` right after the range's end, where it
    /// touches the last possible mapping.
    #[derive(Debug)]
    struct WithGlobals {
        inner: EmulatedSession,
        _memory: Vec<crate::device::emulated::Mapping>,
    }

    const COUNTER: u64 = 0x1000;
    const VAR_SIZE: u64 = 64;

    impl WithGlobals {
        fn new() -> Self {
            let mut inner = EmulatedDevice::new(1 << 30).open_session(limits().va_size).expect("session");
            let edge = inner.va_base() + limits().va_size;
            // The emulated `map` places host memory at any address.
            let memory = vec![inner.map(COUNTER, VAR_SIZE).expect("counter"), inner.map(edge, VAR_SIZE).expect("edge")];
            Self { inner, _memory: memory }
        }
    }

    impl BackendSession for WithGlobals {
        type Mapping = <EmulatedSession as BackendSession>::Mapping;
        type Allocation = <EmulatedSession as BackendSession>::Allocation;
        type Module = <EmulatedSession as BackendSession>::Module;
        type Stream = <EmulatedSession as BackendSession>::Stream;
        type Event = <EmulatedSession as BackendSession>::Event;
        type Array = <EmulatedSession as BackendSession>::Array;
        type Object = <EmulatedSession as BackendSession>::Object;
        type Graph = <EmulatedSession as BackendSession>::Graph;
        type GraphExec = <EmulatedSession as BackendSession>::GraphExec;

        fn va_base(&self) -> u64 {
            self.inner.va_base()
        }
        fn map(&mut self, addr: u64, size: u64) -> DeviceResult<Self::Mapping> {
            self.inner.map(addr, size)
        }
        fn create(&mut self, size: u64) -> DeviceResult<Self::Allocation> {
            self.inner.create(size)
        }
        fn map_allocation(&mut self, a: &Self::Allocation, o: u64, addr: u64, n: u64) -> DeviceResult<Self::Mapping> {
            self.inner.map_allocation(a, o, addr, n)
        }
        fn set_access(&mut self, m: &Self::Mapping, flags: u32) -> DeviceResult<()> {
            self.inner.set_access(m, flags)
        }
        fn link(&mut self, r: &crate::device::LinkRequest) -> DeviceResult<crate::device::LinkOutput> {
            self.inner.link(r)
        }
        fn write(&mut self, s: Option<&Self::Stream>, dst: u64, data: &[u8]) -> DeviceResult<()> {
            self.inner.write(s, dst, data)
        }
        fn read(&mut self, s: Option<&Self::Stream>, src: u64, out: &mut [u8]) -> DeviceResult<()> {
            self.inner.read(s, src, out)
        }
        fn copy(&mut self, s: Option<&Self::Stream>, dst: u64, src: u64, size: u64) -> DeviceResult<()> {
            self.inner.copy(s, dst, src, size)
        }
        fn memset(&mut self, s: Option<&Self::Stream>, dst: u64, v: u32, e: u32, n: u64) -> DeviceResult<()> {
            self.inner.memset(s, dst, v, e, n)
        }
        fn load_module(&mut self, image: &[u8]) -> DeviceResult<(Self::Module, Vec<FunctionInfo>)> {
            self.inner.load_module(image)
        }
        fn module_global(&mut self, module: &Self::Module, name: &str) -> DeviceResult<(u64, u64)> {
            match name {
                "counter" => Ok((COUNTER, VAR_SIZE)),
                "edge" => Ok((self.inner.va_base() + limits().va_size, VAR_SIZE)),
                _ => self.inner.module_global(module, name),
            }
        }
        fn occupancy(
            &mut self,
            module: &Self::Module,
            function: usize,
            query: OccupancyQuery,
        ) -> DeviceResult<crate::device::Occupancy> {
            self.inner.occupancy(module, function, query)
        }
        fn describe_function(&mut self, m: &Self::Module, f: usize) -> DeviceResult<FunctionInfo> {
            self.inner.describe_function(m, f)
        }
        fn func_set_attribute(&mut self, m: &mut Self::Module, f: usize, a: u32, v: i32) -> DeviceResult<i32> {
            self.inner.func_set_attribute(m, f, a, v)
        }
        fn launch(
            &mut self,
            module: &Self::Module,
            function: usize,
            dims: LaunchDims,
            attrs: &LaunchAttrs,
            events: LaunchEvents<'_, Self::Event>,
            s: Option<&Self::Stream>,
            params: &[u8],
        ) -> DeviceResult<()> {
            self.inner.launch(module, function, dims, attrs, events, s, params)
        }
        fn limits(&mut self) -> Vec<(u32, u64)> {
            self.inner.limits()
        }
        fn set_limit(&mut self, limit: u32, value: u64) -> DeviceResult<u64> {
            self.inner.set_limit(limit, value)
        }
        fn tensor_map(
            &mut self,
            request: &crate::device::TensorMapRequest,
        ) -> DeviceResult<[u8; crate::device::TENSOR_MAP_BYTES]> {
            self.inner.tensor_map(request)
        }
        fn stream_create(&mut self, flags: u32, priority: i32) -> DeviceResult<Self::Stream> {
            self.inner.stream_create(flags, priority)
        }
        fn stream_synchronize(&mut self, s: Option<&Self::Stream>) -> DeviceResult<()> {
            self.inner.stream_synchronize(s)
        }
        fn stream_query(&mut self, s: Option<&Self::Stream>) -> DeviceResult<bool> {
            self.inner.stream_query(s)
        }
        fn stream_wait_event(&mut self, s: Option<&Self::Stream>, e: &Self::Event) -> DeviceResult<()> {
            self.inner.stream_wait_event(s, e)
        }
        fn stream_mem_ops(&mut self, s: Option<&Self::Stream>, ops: &[MemOp]) -> DeviceResult<()> {
            self.inner.stream_mem_ops(s, ops)
        }
        fn event_create(&mut self, flags: u32) -> DeviceResult<Self::Event> {
            self.inner.event_create(flags)
        }
        fn event_record(&mut self, e: &mut Self::Event, s: Option<&Self::Stream>) -> DeviceResult<()> {
            self.inner.event_record(e, s)
        }
        fn event_query(&mut self, e: &Self::Event) -> DeviceResult<bool> {
            self.inner.event_query(e)
        }
        fn event_synchronize(&mut self, e: &Self::Event) -> DeviceResult<()> {
            self.inner.event_synchronize(e)
        }
        fn context_record_event(&mut self, e: &mut Self::Event) -> DeviceResult<()> {
            self.inner.context_record_event(e)
        }
        fn context_wait_event(&mut self, e: &Self::Event) -> DeviceResult<()> {
            self.inner.context_wait_event(e)
        }
        fn event_elapsed(&mut self, a: &Self::Event, b: &Self::Event) -> DeviceResult<f32> {
            self.inner.event_elapsed(a, b)
        }
        fn synchronize(&mut self) -> DeviceResult<()> {
            self.inner.synchronize()
        }
        fn stream_set_attribute(
            &mut self,
            stream: Option<&Self::Stream>,
            attribute: u32,
            value: &[u8; crate::device::STREAM_ATTRIBUTE_BYTES],
        ) -> DeviceResult<()> {
            self.inner.stream_set_attribute(stream, attribute, value)
        }
        fn stream_get_attribute(
            &mut self,
            stream: Option<&Self::Stream>,
            attribute: u32,
        ) -> DeviceResult<[u8; crate::device::STREAM_ATTRIBUTE_BYTES]> {
            self.inner.stream_get_attribute(stream, attribute)
        }
        fn array_create(&mut self, desc: &texture::ArrayDesc, levels: u32) -> DeviceResult<Self::Array> {
            self.inner.array_create(desc, levels)
        }
        fn array_level(&mut self, mipmapped: &Self::Array, level: u32) -> DeviceResult<Self::Array> {
            self.inner.array_level(mipmapped, level)
        }
        fn array_copy(
            &mut self,
            stream: Option<&Self::Stream>,
            dst: texture::Place<Self::Array>,
            src: texture::Place<Self::Array>,
            extent: texture::Extent,
        ) -> DeviceResult<()> {
            self.inner.array_copy(stream, dst, src, extent)
        }
        fn array_write(
            &mut self,
            stream: Option<&Self::Stream>,
            dst: texture::Place<Self::Array>,
            data: &[u8],
            extent: texture::Extent,
        ) -> DeviceResult<()> {
            self.inner.array_write(stream, dst, data, extent)
        }
        fn array_read(
            &mut self,
            stream: Option<&Self::Stream>,
            src: texture::Place<Self::Array>,
            out: &mut [u8],
            extent: texture::Extent,
        ) -> DeviceResult<()> {
            self.inner.array_read(stream, src, out, extent)
        }
        fn texture_create(
            &mut self,
            resource: texture::Resource<Self::Array>,
            desc: &texture::TextureDesc,
            view: Option<&texture::ViewDesc>,
        ) -> DeviceResult<(u64, Self::Object)> {
            self.inner.texture_create(resource, desc, view)
        }
        fn surface_create(&mut self, array: &Self::Array) -> DeviceResult<(u64, Self::Object)> {
            self.inner.surface_create(array)
        }
    }

    pub(crate) fn global(
        s: &mut SessionState<impl BackendSession>,
        module: u32,
        name: &str,
    ) -> Result<(u64, u64), u32> {
        match s.execute(Op::ModuleGetGlobal(v1::ModuleGetGlobal { module, name: name.into(), at: None })) {
            Ok(Some(Value::Global(g))) => Ok((g.addr, g.size)),
            Ok(other) => panic!("unexpected global result {other:?}"),
            Err(e) => Err(e.code),
        }
    }

    pub(crate) fn htod(s: &mut SessionState<impl BackendSession>, dst: u64, data: &'static [u8]) -> u32 {
        let inline = payload::encode(Bytes::from_static(data), Compression::Off);
        code(s.execute(Op::MemcpyHtod(v1::MemcpyHtoD {
            dst,
            source: Some(Source::Inline(inline)),
            ..Default::default()
        })))
    }

    pub(crate) fn dtoh(s: &mut SessionState<impl BackendSession>, src: u64, size: u64) -> Result<Vec<u8>, u32> {
        match s.execute(Op::MemcpyDtoh(v1::MemcpyDtoH { src, size, stream: 0, into_region: None })) {
            Ok(Some(Value::Data(p))) => Ok(payload::decode(p, size).expect("payload").to_vec()),
            Ok(other) => panic!("unexpected copy result {other:?}"),
            Err(e) => Err(e.code),
        }
    }

    #[test]
    fn looked_up_globals_are_session_memory_until_unload() {
        let mut s = state(WithGlobals::new());
        load_builtin(&mut s, 1);
        assert_eq!(htod(&mut s, COUNTER, &[1; 8]), cuda::INVALID_VALUE, "not looked up yet");
        assert_eq!(global(&mut s, 1, "counter"), Ok((COUNTER, VAR_SIZE)));
        assert_eq!(global(&mut s, 1, "missing"), Err(cuda::NOT_FOUND));

        assert_eq!(htod(&mut s, COUNTER + 8, &[7; 8]), 0);
        assert_eq!(dtoh(&mut s, COUNTER, VAR_SIZE).map(|d| d[8..16].to_vec()), Ok(vec![7; 8]));
        let memset = |dst, count| Op::Memset(v1::Memset { dst, value: 0x11, element_size: 1, count, stream: 0 });
        assert_eq!(code(s.execute(memset(COUNTER, VAR_SIZE))), 0, "the whole variable");
        assert_eq!(code(s.execute(memset(COUNTER, VAR_SIZE + 1))), cuda::INVALID_VALUE, "one byte past it");
        assert_eq!(dtoh(&mut s, COUNTER + VAR_SIZE - 4, 8), Err(cuda::INVALID_VALUE), "straddles the end");
        assert_eq!(dtoh(&mut s, COUNTER - 4, 8), Err(cuda::INVALID_VALUE), "starts before it");

        // Device-to-device between a mapping and the variable.
        let b = s.va_base();
        assert_eq!(code(s.mem_map(b, GRANULARITY)), 0);
        let dtod = |dst, src, size| Op::MemcpyDtod(v1::MemcpyDtoD { dst, src, size, stream: 0 });
        assert_eq!(code(s.execute(dtod(b, COUNTER, VAR_SIZE))), 0);
        assert_eq!(dtoh(&mut s, b, 4), Ok(vec![0x11; 4]));
        assert_eq!(code(s.execute(dtod(b, COUNTER, VAR_SIZE + 1))), cuda::INVALID_VALUE);

        // A variable adjacent to a mapping: each is accessible, a range
        // across both is not.
        let last = b + limits().va_size - GRANULARITY;
        assert_eq!(code(s.mem_map(last, GRANULARITY)), 0);
        let edge = b + limits().va_size;
        assert_eq!(global(&mut s, 1, "edge"), Ok((edge, VAR_SIZE)));
        assert_eq!(htod(&mut s, edge - 4, &[1; 4]), 0);
        assert_eq!(htod(&mut s, edge, &[1; 4]), 0);
        assert_eq!(htod(&mut s, edge - 4, &[1; 8]), cuda::INVALID_VALUE, "straddles mapping and variable");
        assert_eq!(dtoh(&mut s, edge - 4, 8), Err(cuda::INVALID_VALUE));

        // Unloading another module keeps them; unloading theirs forgets them.
        load_builtin(&mut s, 2);
        assert_eq!(code(s.execute(Op::ModuleUnload(v1::ModuleUnload { module: 2 }))), 0);
        assert_eq!(htod(&mut s, COUNTER, &[1; 8]), 0);
        assert_eq!(code(s.execute(Op::ModuleUnload(v1::ModuleUnload { module: 1 }))), 0);
        assert_eq!(htod(&mut s, COUNTER, &[1; 8]), cuda::INVALID_VALUE);
        assert_eq!(htod(&mut s, edge, &[1; 4]), cuda::INVALID_VALUE);
        assert_eq!(htod(&mut s, edge - 4, &[1; 4]), 0, "the mapping stays");
        assert_eq!(global(&mut s, 1, "counter"), Err(cuda::INVALID_HANDLE));
    }

    /// Asynchronous copies (the client's `cuMemcpyHtoDAsync`) only queue:
    /// more of them than the CUDA backend's pinned ring holds at once, to
    /// sixteen places over and over, land in order.
    fn asynchronous_copies_land_in_order(s: &mut SessionState<impl BackendSession>) {
        const PIECE: usize = 64 << 10;
        let b = s.va_base();
        assert_eq!(code(s.mem_map(b, s.limits.granularity)), 0);
        let copies = 592; // 37 MiB through a 32 MiB ring, 37 rounds of 16
        for i in 0..copies {
            let data = payload::encode(Bytes::from(vec![i as u8; PIECE]), Compression::Off);
            let dst = b + (i % 16 * PIECE) as u64;
            let copy = v1::MemcpyHtoD { dst, source: Some(Source::Inline(data)), asynchronous: true, stream: 0 };
            assert_eq!(code(s.execute(Op::MemcpyHtod(copy))), 0, "copy {i}");
        }
        for slot in 0..16 {
            let last = (copies - 16 + slot) as u8;
            let got = dtoh(s, b + (slot * PIECE) as u64, PIECE as u64).expect("read back");
            assert!(got.iter().all(|&x| x == last), "slot {slot}: want {last}, got {}", got[0]);
        }
    }

    #[test]
    fn asynchronous_copies_land_in_order_emulated() {
        asynchronous_copies_land_in_order(&mut session());
    }

    /// The same through the CUDA backend's pinned ring. Skipped where
    /// there is no CUDA device.
    #[test]
    fn asynchronous_copies_land_in_order_on_a_gpu() {
        let Some(mut s) = gpu_session() else { return };
        asynchronous_copies_land_in_order(&mut s);
    }

    /// Module variables through the whole session on a real GPU: the
    /// range check, copies, and a kernel reading what the host wrote.
    /// Skipped where there is no CUDA device.
    #[test]
    fn module_globals_on_a_gpu() {
        let Some(mut s) = gpu_session() else { return };
        let g = s.limits.granularity;
        let info = match load(&mut s, 1, crate::device::GLOBALS_PTX) {
            Ok(Some(Value::Module(info))) => info,
            other => panic!("PTX load: {other:?}"),
        };
        assert_eq!(info.functions[0].name, "bump");
        assert!(info.functions[0].attributes.contains_key(&4), "NUM_REGS reported");

        let counter =
            match s.execute(Op::ModuleGetGlobal(v1::ModuleGetGlobal { module: 1, name: "counter".into(), at: None })) {
                Ok(Some(Value::Global(v))) => v,
                other => panic!("counter: {other:?}"),
            };
        assert_eq!(counter.size, 64);
        let addr = counter.addr;
        assert_eq!(htod(&mut s, addr, &[0x2a, 0, 0, 0]), 0);
        assert_eq!(dtoh(&mut s, addr + 60, 8), Err(cuda::INVALID_VALUE), "straddles the end");

        let b = s.va_base();
        assert_eq!(code(s.mem_map(b, g)), 0);
        assert_eq!(
            code(s.execute(Op::Memset(v1::Memset { dst: b, value: 0, element_size: 4, count: 1, stream: 0 }))),
            0
        );
        let launch = v1::Launch {
            module: 1,
            function: 0,
            grid: Some(v1::Dim3 { x: 1, y: 1, z: 1 }),
            block: Some(v1::Dim3 { x: 1, y: 1, z: 1 }),
            params: Bytes::copy_from_slice(&b.to_le_bytes()),
            ..Default::default()
        };
        assert_eq!(code(s.execute(Op::Launch(launch))), 0);
        assert_eq!(dtoh(&mut s, b, 4), Ok(vec![0x2a, 0, 0, 0]), "the kernel saw the host's write");
        let dtod = Op::MemcpyDtod(v1::MemcpyDtoD { dst: b + 4, src: addr, size: 4, stream: 0 });
        assert_eq!(code(s.execute(dtod)), 0);
        assert_eq!(dtoh(&mut s, b + 4, 4), Ok(vec![0x2a, 0, 0, 0]));

        assert_eq!(code(s.execute(Op::ModuleUnload(v1::ModuleUnload { module: 1 }))), 0);
        assert_eq!(htod(&mut s, addr, &[1; 4]), cuda::INVALID_VALUE, "forgotten with its module");
    }
}
