//! One session's tables and the execution of its calls.
//!
//! Every id and address from the wire is resolved here against this
//! session's own tables (mappings, modules, streams, events) before the
//! backend sees it; a failed lookup is a [`CallError`] reply, never a panic.
//! No I/O happens here: the server feeds batches in and sends replies out.

use crate::device::{BackendSession, FunctionInfo, LaunchDims};
use crate::error::CallError;
use crate::images::{ImageCache, key_of};
use crate::staging::Staging;
use bytes::Bytes;
use gpupool_proto::payload::{self, Compression};
use gpupool_proto::v1::{self, call::Op, call_result::Value};
use gpupool_proto::{cuda, v1::memcpy_hto_d::Source};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

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
    // owns the address range and context they live in.
    mappings: BTreeMap<u64, (u64, S::Mapping)>,
    modules: HashMap<u32, LoadedModule<S::Module>>,
    streams: HashMap<u32, S::Stream>,
    events: HashMap<u32, S::Event>,
    mapped_bytes: u64,
    limits: SessionLimits,
    staging: Arc<Staging>,
    images: Arc<ImageCache>,
    dev: S,
}

impl<S: BackendSession> std::fmt::Debug for SessionState<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionState")
            .field("mappings", &self.mappings.len())
            .field("mapped_bytes", &self.mapped_bytes)
            .field("modules", &self.modules.len())
            .field("streams", &self.streams.len())
            .field("events", &self.events.len())
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
            mappings: BTreeMap::new(),
            modules: HashMap::new(),
            streams: HashMap::new(),
            events: HashMap::new(),
            mapped_bytes: 0,
            limits,
            staging,
            images,
            dev,
        }
    }

    /// First address of the session's range.
    pub fn va_base(&self) -> u64 {
        self.dev.va_base()
    }

    /// Bytes currently mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped_bytes
    }

    /// Executes a batch in order. Failed calls are reported and the rest
    /// still run, as each CUDA call fails on its own.
    pub fn execute_batch(&mut self, batch: v1::Batch) -> v1::BatchReply {
        let mut reply = v1::BatchReply { seq: batch.seq, ..Default::default() };
        let last = batch.calls.len().saturating_sub(1);
        for (i, call) in batch.calls.into_iter().enumerate() {
            let outcome = match call.op {
                Some(op) => self.execute(op),
                None => Err(CallError::invalid_value("call without an operation")),
            };
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
        reply
    }

    /// Executes one call.
    pub fn execute(&mut self, op: Op) -> CallOutcome {
        match op {
            Op::MemMap(m) => self.mem_map(m.addr, m.size),
            Op::MemUnmap(m) => self.mem_unmap(m.addr),
            Op::MemcpyHtod(c) => self.memcpy_htod(c),
            Op::MemcpyDtoh(c) => self.memcpy_dtoh(c),
            Op::MemcpyDtod(c) => {
                self.check_range(c.dst, c.size)?;
                self.check_range(c.src, c.size)?;
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
                self.check_range(m.dst, bytes)?;
                let stream = stream_of(&self.streams, m.stream)?;
                self.dev.memset(stream, m.dst, m.value, m.element_size, m.count)?;
                Ok(None)
            }
            Op::ModuleLoad(m) => self.module_load(m),
            Op::ModuleUnload(m) => {
                self.modules
                    .remove(&m.module)
                    .ok_or_else(|| CallError::invalid_handle(format!("unknown module {}", m.module)))?;
                Ok(None)
            }
            Op::Launch(l) => self.launch(l),
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
            Op::StreamSynchronize(s) => {
                let stream = stream_of(&self.streams, s.stream)?;
                self.dev.stream_synchronize(stream)?;
                Ok(None)
            }
            Op::StreamQuery(s) => {
                let stream = stream_of(&self.streams, s.stream)?;
                Ok(Some(Value::Ready(self.dev.stream_query(stream)?)))
            }
            Op::StreamWaitEvent(w) => {
                let event = self.events.get(&w.event).ok_or_else(|| unknown_event(w.event))?;
                let stream = stream_of(&self.streams, w.stream)?;
                self.dev.stream_wait_event(stream, event)?;
                Ok(None)
            }
            Op::EventCreate(e) => {
                new_id(&self.events, e.event, "event", self.limits.max_handles)?;
                let event = self.dev.event_create(e.flags)?;
                self.events.insert(e.event, event);
                Ok(None)
            }
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
        }
    }

    /// Checks that `[addr, addr + len)` lies inside one mapping of this session.
    fn check_range(&self, addr: u64, len: u64) -> Result<(), CallError> {
        let end = addr
            .checked_add(len)
            .ok_or_else(|| CallError::invalid_value(format!("range at {addr:#x} of {len} bytes overflows")))?;
        let base = self.dev.va_base();
        if addr < base || end > base + self.limits.va_size {
            return Err(CallError::invalid_value(format!(
                "address {addr:#x} (+{len}) is outside this session's range {base:#x}..{:#x}",
                base + self.limits.va_size
            )));
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
        if self.mapped_bytes + size > self.limits.memory_quota {
            return Err(CallError::out_of_memory(format!(
                "mapping {size} bytes would exceed the session quota of {} bytes ({} in use)",
                self.limits.memory_quota, self.mapped_bytes
            )));
        }
        let before = self.mappings.range(..addr).next_back().is_some_and(|(&s, &(l, _))| s + l > addr);
        let after = self.mappings.range(addr..).next().is_some_and(|(&s, _)| s < end);
        if before || after {
            return Err(CallError::invalid_value(format!("mapping {addr:#x} (+{size}) overlaps an existing one")));
        }
        let mapping = self.dev.map(addr, size)?;
        self.mappings.insert(addr, (size, mapping));
        self.mapped_bytes += size;
        Ok(None)
    }

    fn mem_unmap(&mut self, addr: u64) -> CallOutcome {
        let (size, mapping) = self.mappings.remove(&addr).ok_or_else(|| {
            CallError::invalid_value(format!("{addr:#x} is not the start of a mapping of this session"))
        })?;
        // Pending work may still use the memory.
        self.dev.synchronize()?;
        drop(mapping);
        self.mapped_bytes -= size;
        Ok(None)
    }

    fn memcpy_htod(&mut self, c: v1::MemcpyHtoD) -> CallOutcome {
        let data: Bytes = match c.source {
            Some(Source::Inline(p)) => {
                payload::decode(p, self.limits.max_inline_bytes).map_err(|e| CallError::invalid_value(e.to_string()))?
            }
            Some(Source::Staged(s)) => {
                self.check_range(c.dst, s.size)?;
                Bytes::from(self.staging.take_upload(s.transfer_id, s.size)?)
            }
            None => return Err(CallError::invalid_value("copy without a source")),
        };
        self.check_range(c.dst, data.len() as u64)?;
        let stream = stream_of(&self.streams, c.stream)?;
        self.dev.write(stream, c.dst, &data)?;
        Ok(None)
    }

    fn memcpy_dtoh(&mut self, c: v1::MemcpyDtoH) -> CallOutcome {
        self.check_range(c.src, c.size)?;
        let inline = c.size <= self.limits.max_inline_bytes;
        if !inline {
            self.staging.check_room(c.size)?;
        }
        let mut out = Vec::new();
        out.try_reserve_exact(c.size as usize)
            .map_err(|_| CallError::out_of_memory("cannot allocate the copy's host buffer"))?;
        out.resize(c.size as usize, 0);
        let stream = stream_of(&self.streams, c.stream)?;
        self.dev.read(stream, c.src, &mut out)?;
        let out = Bytes::from(out);
        if inline {
            Ok(Some(Value::Data(payload::encode(out, self.limits.compression))))
        } else {
            let id = self.staging.add_download(out);
            Ok(Some(Value::Staged(v1::StagedRef { transfer_id: id, size: c.size })))
        }
    }

    fn module_load(&mut self, m: v1::ModuleLoad) -> CallOutcome {
        new_id(&self.modules, m.module, "module", self.limits.max_handles)?;
        let key: [u8; 32] =
            m.sha256[..].try_into().map_err(|_| CallError::invalid_value("module hash must be 32 bytes (SHA-256)"))?;
        let image = match m.image {
            Some(p) => {
                let bytes = payload::decode(p, self.limits.max_image_bytes)
                    .map_err(|e| CallError::invalid_value(format!("module image: {e}")))?;
                if key_of(&bytes) != key {
                    return Err(CallError::invalid_value("module image does not match its SHA-256"));
                }
                let img: Arc<[u8]> = Arc::from(&bytes[..]);
                self.images.insert(key, img.clone());
                img
            }
            None => self.images.get(&key).ok_or_else(|| {
                CallError::new(cuda::FILE_NOT_FOUND, "module image not cached on the server; send it")
            })?,
        };
        let (module, functions) = self.dev.load_module(&image)?;
        let info = v1::ModuleInfo {
            functions: functions
                .iter()
                .map(|f| v1::FunctionInfo {
                    name: f.name.clone(),
                    params: f.params.iter().map(|p| v1::ParamInfo { offset: p.offset, size: p.size }).collect(),
                    params_size: f.params_size(),
                    max_threads_per_block: f.max_threads_per_block,
                })
                .collect(),
        };
        self.modules.insert(m.module, LoadedModule { functions, module });
        Ok(Some(Value::Module(info)))
    }

    fn launch(&mut self, l: v1::Launch) -> CallOutcome {
        let loaded = self
            .modules
            .get(&l.module)
            .ok_or_else(|| CallError::invalid_handle(format!("unknown module {}", l.module)))?;
        let f = loaded
            .functions
            .get(l.function as usize)
            .ok_or_else(|| CallError::invalid_handle(format!("module {} has no function {}", l.module, l.function)))?;
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
        let threads = dims.block.iter().map(|&d| u64::from(d)).product::<u64>();
        if threads > u64::from(f.max_threads_per_block) {
            return Err(CallError::invalid_value(format!(
                "block of {threads} threads exceeds {}'s limit of {}",
                f.name, f.max_threads_per_block
            )));
        }
        let stream = stream_of(&self.streams, l.stream)?;
        self.dev.launch(&loaded.module, l.function as usize, dims, stream, &l.params)?;
        Ok(None)
    }
}

fn stream_of<T>(streams: &HashMap<u32, T>, id: u32) -> Result<Option<&T>, CallError> {
    if id == 0 {
        return Ok(None);
    }
    streams.get(&id).map(Some).ok_or_else(|| CallError::invalid_handle(format!("unknown stream {id}")))
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
mod tests {
    use super::*;
    use crate::device::Backend;
    use crate::device::emulated::{EmulatedDevice, GRANULARITY};

    fn session() -> SessionState<crate::device::emulated::EmulatedSession> {
        let dev = EmulatedDevice::new(1 << 30);
        let limits = SessionLimits {
            memory_quota: 8 * GRANULARITY,
            va_size: 16 * GRANULARITY,
            granularity: GRANULARITY,
            max_inline_bytes: 1 << 16,
            max_image_bytes: 1 << 20,
            max_handles: 4,
            max_listed_errors: 2,
            compression: Compression::Auto,
        };
        let s = dev.open_session(limits.va_size).expect("session");
        SessionState::new(s, limits, Arc::new(Staging::new(1 << 24, 8)), Arc::new(ImageCache::new(None, 1 << 20)))
    }

    fn code(r: CallOutcome) -> u32 {
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
            Op::MemcpyDtoh(v1::MemcpyDtoH { src: b, size: 4, stream: 0 }),
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
}
