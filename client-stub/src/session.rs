//! The session: a CUDA-driver-shaped API over one connection to a gpu-server.
//!
//! Calls that return nothing the caller needs now (launch, memset, copies
//! from host memory, event record, stream wait, free) are queued and sent
//! with the next flush; calls that must answer flush the queue and wait once.
//! Ids of streams, events and modules, and device addresses, are assigned
//! here without a round trip.

use crate::alloc::{AddressSpace, MapOp};
use crate::batch::CallQueue;
use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::lease::{LeasedGpu, PoolRequest};
use crate::mirror::{MirrorHost, Mirrors};
use crate::transport::{PinnedCopy, Transport};
use bytes::Bytes;
use gpupool_proto::payload::{self, Compression};
use gpupool_proto::v1::{self, call::Op, call_result::Value};
use gpupool_proto::{cuda, v1::memcpy_hto_d::Source};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

mod array;
mod graph;
mod link;
mod vmm;

pub use array::{ArrayEnd, HostSide};
pub use link::{JitInput, JitLinkOutput, JitLinkRequest};

/// A stream of this session (0 is the default stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(pub u32);

impl StreamId {
    /// The default (legacy) stream.
    pub const DEFAULT: StreamId = StreamId(0);
}

/// An event of this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId(pub u32);

/// A loaded module and its functions' parameter layouts.
#[derive(Debug, Clone)]
pub struct Module {
    pub id: u32,
    pub functions: Arc<Vec<Arc<v1::FunctionInfo>>>,
}

/// A kernel of a loaded module.
#[derive(Debug, Clone)]
pub struct Function {
    pub module: u32,
    pub index: u32,
    /// Shared with the module: a handle costs no copy of the layout.
    pub info: Arc<v1::FunctionInfo>,
}

impl Module {
    /// The function named `name` (no round trip: layouts came with the load).
    pub fn function(&self, name: &str) -> Result<Function> {
        let index = self.functions.iter().position(|f| f.name == name).ok_or_else(|| ClientError::Cuda {
            code: cuda::NOT_FOUND,
            message: format!("no function {name} in module"),
        })?;
        Ok(Function { module: self.id, index: index as u32, info: self.functions[index].clone() })
    }
}

/// One kernel argument, packed by the function's parameter layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    /// A device address.
    Ptr(u64),
}

impl KernelArg {
    fn bytes(&self) -> Vec<u8> {
        match *self {
            Self::U32(v) => v.to_le_bytes().to_vec(),
            Self::I32(v) => v.to_le_bytes().to_vec(),
            Self::U64(v) | Self::Ptr(v) => v.to_le_bytes().to_vec(),
            Self::I64(v) => v.to_le_bytes().to_vec(),
            Self::F32(v) => v.to_le_bytes().to_vec(),
            Self::F64(v) => v.to_le_bytes().to_vec(),
        }
    }
}

/// Packs `args` into a parameter buffer laid out as `f` says.
pub fn pack_args(f: &v1::FunctionInfo, args: &[KernelArg]) -> Result<Vec<u8>> {
    if args.len() != f.params.len() {
        return Err(ClientError::InvalidValue(format!(
            "{} takes {} arguments, got {}",
            f.name,
            f.params.len(),
            args.len()
        )));
    }
    let mut buf = vec![0u8; f.params_size as usize];
    for (i, (p, a)) in f.params.iter().zip(args).enumerate() {
        let b = a.bytes();
        if b.len() != p.size as usize {
            return Err(ClientError::InvalidValue(format!(
                "argument {i} of {} is {} bytes, the kernel expects {}",
                f.name,
                b.len(),
                p.size
            )));
        }
        let end = (p.offset + p.size) as usize;
        if end > buf.len() {
            return Err(ClientError::Protocol(format!("parameter {i} of {} lies outside its buffer", f.name)));
        }
        buf[p.offset as usize..end].copy_from_slice(&b);
    }
    Ok(buf)
}

/// Grid and block of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch covering `n` elements with `block` threads per block.
    pub fn for_elements(n: u32, block: u32) -> Self {
        Self { grid: (n.div_ceil(block).max(1), 1, 1), block: (block, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Marks the stream a call gives work to as busy.
fn note_work(st: &mut State, op: &Op) {
    if let Some(s) = work_stream(op) {
        st.busy.insert(s);
    }
}

/// The stream a call adds work to. Exhaustive, so that a new call must
/// say whether a stream synchronization has to wait for it.
fn work_stream(op: &Op) -> Option<u32> {
    match op {
        Op::Launch(l) => Some(l.stream),
        Op::MemcpyHtod(c) => Some(c.stream),
        Op::MemcpyDtoh(c) => Some(c.stream),
        Op::MemcpyDtod(c) => Some(c.stream),
        Op::Memset(m) => Some(m.stream),
        Op::StreamWaitEvent(w) => Some(w.stream),
        Op::EventRecord(r) => Some(r.stream),
        Op::ArrayCopy(c) => Some(c.stream),
        Op::GraphLaunch(l) => Some(l.stream),
        Op::StreamMemOps(m) => Some(m.stream),
        Op::MemMap(_)
        | Op::MemUnmap(_)
        | Op::ModuleLoad(_)
        | Op::ModuleUnload(_)
        | Op::StreamCreate(_)
        | Op::StreamDestroy(_)
        | Op::StreamSynchronize(_)
        | Op::StreamQuery(_)
        | Op::EventCreate(_)
        | Op::EventDestroy(_)
        | Op::EventQuery(_)
        | Op::EventSynchronize(_)
        | Op::EventElapsed(_)
        | Op::ContextSynchronize(_)
        | Op::MemGetInfo(_)
        | Op::ModuleGetGlobal(_)
        | Op::Occupancy(_)
        | Op::FuncSetAttribute(_)
        | Op::DescribeFunction(_)
        | Op::VmmCreate(_)
        | Op::VmmRelease(_)
        | Op::VmmRetain(_)
        | Op::VmmMap(_)
        | Op::VmmUnmap(_)
        | Op::VmmSetAccess(_)
        | Op::JitLink(_)
        | Op::CtxSetLimit(_)
        | Op::TensorMapEncode(_)
        | Op::MirrorAdd(_)
        | Op::MirrorRemove(_)
        | Op::ArrayCreate(_)
        | Op::ArrayLevel(_)
        | Op::ArrayDestroy(_)
        | Op::TexObjectCreate(_)
        | Op::TexObjectDestroy(_)
        | Op::SurfObjectCreate(_)
        | Op::SurfObjectDestroy(_)
        | Op::StreamSetAttribute(_)
        | Op::StreamGetAttribute(_)
        | Op::GraphHandleCreate(_)
        | Op::GraphInstantiate(_)
        | Op::GraphExecDestroy(_)
        | Op::GraphDestroy(_)
        | Op::IpcEventExport(_)
        | Op::IpcEventOpen(_)
        // Neither gives a stream work: the wait holds only later work.
        | Op::ContextEvent(_) => None,
    }
}

/// What a waited call that succeeded says about the streams.
#[derive(Debug, Clone, Copy)]
enum Idle {
    Nothing,
    /// Every stream is idle (a context synchronization).
    All,
    /// The stream is idle (its synchronization; a device-to-host copy on
    /// it, which the server completes only after the stream's work).
    Stream(u32),
    /// The stream is idle when the query answers "ready".
    IfReady(u32),
}

fn idle_after(op: &Op) -> Idle {
    match op {
        Op::ContextSynchronize(_) => Idle::All,
        Op::StreamSynchronize(s) => Idle::Stream(s.stream),
        Op::MemcpyDtoh(c) => Idle::Stream(c.stream),
        Op::ArrayCopy(c) if array::to_host(c) => Idle::Stream(c.stream),
        Op::StreamQuery(s) => Idle::IfReady(s.stream),
        _ => Idle::Nothing,
    }
}

/// One function's occupancy answers by encoded query.
type OccupancyAnswers = HashMap<Vec<u8>, (i64, i32)>;

/// Occupancy answers a session keeps (all dropped when full).
const MAX_OCCUPANCY_ANSWERS: usize = 4096;
/// A module image up to this many times the server's inline bound is tried
/// compressed inline; a larger one goes the bulk path as it is (LZ4 seldom
/// packs machine code more than this).
const INLINE_IMAGE_RATIO: usize = 4;

/// Largest piece of a host-device copy staged whole on the server; larger
/// copies go in pieces (their bytes never all held there at once).
const MAX_COPY_PIECE: u64 = 512 << 20;

/// Smallest piece, whatever the server says: a bulk chunk's size.
const MIN_COPY_PIECE: usize = 4 << 20;

/// Piece of a large upload: each piece's copy to the device is queued as
/// soon as it is staged, so the server copies one piece to the device
/// while the next is being staged (a 512 MiB upload staged whole went to
/// the device only after all of it had arrived).
const PIPELINE_PIECE: usize = 64 << 20;

/// Half of the pinned bounce buffer that carries pageable copies through a
/// host region shared with the server (shared memory only): the client
/// fills one half (or empties it) while the server's DMA reads (or writes)
/// the other, so a pageable copy costs one pass over the caller's bytes, as
/// the driver's own staging does, instead of the staged path's three.
const BOUNCE_HALF: usize = 8 << 20;

/// Uploads through the bounce buffer up to this size go in
/// [`BOUNCE_PIECES`] pieces, each sent as soon as it is written, so that
/// the server's DMA of one overlaps the client's pass over the next (a
/// larger chunk is written by several threads at once instead,
/// `gpupool_shm::region`'s copy threads).
const BOUNCE_SPLIT_MAX: usize = 4 << 20;
/// How many pieces an upload of at most [`BOUNCE_SPLIT_MAX`] goes in.
const BOUNCE_PIECES: usize = 4;
/// The smallest such piece: below it a batch per piece costs more than the
/// overlap gives.
const BOUNCE_PIECE_MIN: usize = 128 << 10;

/// The pieces an upload chunk of `len` bytes is written and sent in.
fn bounce_piece(len: usize) -> usize {
    if len > BOUNCE_SPLIT_MAX { len } else { len.div_ceil(BOUNCE_PIECES).max(BOUNCE_PIECE_MIN) }
}

/// A module variable (`cuModuleGetGlobal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Global {
    /// Its device address.
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// A `__managed__` variable: managed memory on the server, which the
    /// program also reads and writes at `addr` in its own memory (the
    /// drop-in library mirrors it, `Session::mirror_add`).
    pub managed: bool,
}

/// A call sent and not yet waited for: its batch, and what its answer says
/// of the streams.
struct Sent {
    seq: u64,
    idle: Idle,
}

/// The stream a call is ordered on (0 for calls without one): the stream
/// it gives work to, or the one it synchronizes.
fn op_stream(op: &Op) -> u32 {
    match op {
        Op::StreamSynchronize(s) => s.stream,
        Op::StreamQuery(s) => s.stream,
        _ => work_stream(op).unwrap_or(0),
    }
}

fn dim3((x, y, z): (u32, u32, u32)) -> Option<v1::Dim3> {
    Some(v1::Dim3 { x, y, z })
}

/// Host bytes of a copy as they travel.
enum HostBytes {
    Inline(v1::Payload),
    Staged(v1::StagedRef),
}

#[derive(Debug)]
struct State {
    queue: CallQueue,
    space: AddressSpace,
    next_stream: u32,
    next_event: u32,
    next_module: u32,
    next_transfer: u64,
    next_array: u32,
    modules: HashMap<u32, Module>,
    /// Occupancy answers by function and query: the driver's answer
    /// depends only on them and the function's attributes, so a repeated
    /// query needs no round trip. A function's entries go when one of its
    /// attributes is set or its module unloaded.
    occupancy: HashMap<(u32, u32), OccupancyAnswers>,
    /// Module variables resolved so far: (module, name) -> the variable.
    globals: HashMap<(u32, String), Global>,
    /// Set once the connection is gone: every later call fails with it.
    dead: Option<ClientError>,
    /// Set once a call answered a sticky error (the server's context is
    /// lost, [`cuda::ends_context`]): every later call fails with it, as
    /// every later call of a local context does. The connection stays.
    lost: Option<ClientError>,
    /// The session context's limits (`CUlimit` -> value), from the
    /// `Welcome` and updated by each set.
    limits: HashMap<u32, u64>,
    /// Mapped host memory, and device changes too large for their reply,
    /// still to be copied before the synchronizing call returns.
    mirrors: Mirrors,
    mirror_fetch: Vec<(u64, u64)>,
    /// Streams given work since a waited call last saw them idle. A
    /// synchronization of any other stream has nothing to wait for and is
    /// answered here (`.item()`: the copy already waited for the stream).
    busy: HashSet<u32>,
    /// Streams created and not destroyed (0, the default stream, aside):
    /// an unknown stream is the server's to refuse.
    streams: HashSet<u32>,
    /// Events other processes may share (created `INTERPROCESS`, or opened
    /// from an IPC handle): a record on one returns once it reached the
    /// server, since the program orders the other process after it with a
    /// host-side barrier the server cannot see.
    ipc_events: HashSet<u32>,
    /// The batch of a call sent and not yet waited for ([`Session::call_send`];
    /// 0: none), and its answer when another path read its reply first.
    pending: u64,
    early: Option<crate::batch::Answer>,
    /// The pinned bounce buffer (two [`BOUNCE_HALF`]s) once a pageable copy
    /// made one; `Refused` when shared memory could not give it.
    bounce: Bounce,
    /// Bytes pageable copies carried through the bounce buffer.
    bounced_bytes: u64,
}

/// The session's pinned bounce buffer for pageable copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bounce {
    NotYet,
    At(usize),
    Refused,
}

/// Which of the application's streams device output belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Device `printf` (the driver writes it to stdout).
    Stdout,
    /// A failed device assert's message (the driver writes it to stderr).
    Stderr,
}

/// Where device output goes when a synchronizing call returns.
pub type OutputSink = Box<dyn Fn(OutputStream, &[u8]) + Send + Sync>;

struct Sink(OutputSink);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputSink")
    }
}

#[derive(Debug)]
struct Inner {
    transport: Box<dyn Transport>,
    state: Mutex<State>,
    welcome: v1::Welcome,
    /// The device's launch limits, read once from `welcome`.
    launch_limits: crate::launch_check::DeviceLimits,
    compression: Compression,
    /// The balancer's lease the session runs under; dropped after the
    /// transport, so the server sees the session end before the release.
    lease: Option<LeasedGpu>,
    /// Receives device printf output; without one it is held for
    /// [`Session::take_device_output`].
    sink: std::sync::OnceLock<Sink>,
    /// [`ClientConfig::async_copies`].
    async_copies: bool,
    /// [`ClientConfig::download_piece_bytes`].
    download_piece: usize,
}

/// A session on a remote GPU. Cloning shares the session.
#[derive(Debug, Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl Session {
    /// Connects to the server in `config` and opens a session.
    pub fn connect(config: &ClientConfig) -> Result<Self> {
        let transport = crate::rdma::connect(config)?;
        Ok(Self::with_transport(transport, config))
    }

    /// Leases a virtual GPU from the balancer in `request` and opens a
    /// session on it; `template` gives every setting but the server, its
    /// certificate pin and the token, which come from the lease. The lease
    /// is renewed while the session lives and released when it ends.
    pub fn connect_pooled(request: &PoolRequest, template: &ClientConfig) -> Result<Self> {
        let leased = LeasedGpu::allocate(request)?;
        let mut config = leased.client_config(template)?;
        config.token_source = crate::TokenSource::Lease(leased.lease_cell());
        let transport = crate::rdma::connect(&config)?;
        let mut session = Self::with_transport(transport, &config);
        if let Some(inner) = Arc::get_mut(&mut session.inner) {
            inner.lease = Some(leased);
        }
        Ok(session)
    }

    /// Releases the session's lease now (see [`LeasedGpu::release`]); the
    /// server then ends the session. Does nothing without a lease.
    pub fn release_lease(&self) {
        if let Some(l) = &self.inner.lease {
            l.release();
        }
    }

    /// Ends the session's connections at process exit, from an exit
    /// handler: the server then frees the session at once instead of
    /// keeping it for a resume that will never come. Queued calls are not
    /// sent (a process that exits without synchronizing abandons its work
    /// natively too). Waits up to `limit` for the close to leave.
    pub fn close_at_exit(&self, limit: std::time::Duration) {
        self.inner.transport.close_at_exit(limit);
    }

    /// The lease the session runs under, as last renewed.
    pub fn lease(&self) -> Option<gpupool_proto::balancer::Lease> {
        self.inner.lease.as_ref().map(LeasedGpu::lease)
    }

    /// A session over an already connected transport.
    pub fn with_transport(transport: Box<dyn Transport>, config: &ClientConfig) -> Self {
        let welcome = transport.welcome().clone();
        let mut batch = config.batch;
        // A batch must fit in one frame with room for its envelope.
        batch.max_bytes = batch.max_bytes.min((welcome.max_frame_bytes as usize).saturating_sub(64 << 10).max(1024));
        let state = State {
            queue: CallQueue::new(batch),
            space: AddressSpace::new(welcome.va_base, welcome.va_size, welcome.granularity, welcome.memory_quota),
            next_stream: 1,
            next_event: 1,
            next_module: 1,
            next_transfer: 1,
            next_array: 1,
            modules: HashMap::new(),
            occupancy: HashMap::new(),
            globals: HashMap::new(),
            dead: None,
            limits: welcome.device.as_ref().map(|d| d.limits.clone().into_iter().collect()).unwrap_or_default(),
            mirrors: Mirrors::default(),
            mirror_fetch: Vec::new(),
            busy: HashSet::new(),
            streams: HashSet::new(),
            ipc_events: HashSet::new(),
            pending: 0,
            early: None,
            bounce: Bounce::NotYet,
            bounced_bytes: 0,
            lost: None,
        };
        let compression = if config.compression { Compression::Auto } else { Compression::Off };
        Self {
            inner: Arc::new(Inner {
                transport,
                state: Mutex::new(state),
                launch_limits: welcome.device.as_ref().map(crate::launch_check::DeviceLimits::of).unwrap_or_default(),
                welcome,
                compression,
                lease: None,
                sink: std::sync::OnceLock::new(),
                async_copies: config.async_copies,
                download_piece: config.download_piece_bytes,
            }),
        }
    }

    /// Sends device output to `sink` from now on: the thread whose
    /// synchronizing call received it calls `sink` before the call
    /// returns, in order, stdout's first (the drop-in libcuda writes it to
    /// C `stdout` and `stderr`).
    /// Only the first sink set is kept; `false` when one was set already.
    pub fn set_output_sink(&self, sink: OutputSink) -> bool {
        self.inner.sink.set(Sink(sink)).is_ok()
    }

    /// Device printf output received so far and not given to a sink.
    pub fn take_device_output(&self) -> Vec<u8> {
        self.lock().queue.take_output()
    }

    /// Device stderr output (assert messages) received so far and not
    /// given to a sink.
    pub fn take_device_errors(&self) -> Vec<u8> {
        self.lock().queue.take_errors()
    }

    /// Hands received output to the sink, if one is set. Called under the
    /// state lock so that output of concurrent callers stays in order.
    fn deliver_output(&self, st: &mut State) {
        if let Some(sink) = self.inner.sink.get() {
            let out = st.queue.take_output();
            if !out.is_empty() {
                (sink.0)(OutputStream::Stdout, &out);
            }
            let errors = st.queue.take_errors();
            if !errors.is_empty() {
                (sink.0)(OutputStream::Stderr, &errors);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Extra QUIC connections carrying this session's bulk copies (0:
    /// they share the command connection).
    pub fn bulk_connections(&self) -> usize {
        self.inner.transport.bulk_connections()
    }

    /// Bytes of pageable copies carried through shared memory with the
    /// server so far (the pinned bounce buffer, or the bulk slots where
    /// there is none); `None` when copies do not go through it (see
    /// `docs/transport.md`).
    pub fn shared_memory_bytes(&self) -> Option<u64> {
        let bounced = self.lock().bounced_bytes;
        self.inner.transport.shared_memory_bytes().map(|slots| slots + bounced)
    }

    /// Whether the session's commands and copies go over RDMA now
    /// (`docs/rdma.md`); false on QUIC, also after a lost RDMA connection.
    pub fn rdma_attached(&self) -> bool {
        self.inner.transport.rdma_attached()
    }

    /// Whether the session's commands go through a command ring in shared
    /// memory now (docs/transport.md); false on QUIC, also after the ring
    /// ended.
    pub fn shm_commands_attached(&self) -> bool {
        self.inner.transport.shm_commands_attached()
    }

    /// The server's handshake answer: session id, range, quota, device.
    pub fn welcome(&self) -> &v1::Welcome {
        &self.inner.welcome
    }

    /// The virtual GPU as the server describes it.
    pub fn device(&self) -> v1::DeviceInfo {
        self.inner.welcome.device.clone().unwrap_or_default()
    }

    /// `(free, total)` device memory of the virtual GPU, without a round trip.
    pub fn mem_get_info(&self) -> (u64, u64) {
        let st = self.lock();
        (st.space.quota() - st.space.mapped(), st.space.quota())
    }

    // --- queueing --------------------------------------------------------

    fn check_alive(st: &State) -> Result<()> {
        match st.dead.as_ref().or(st.lost.as_ref()) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Whether a sticky error lost the session's context.
    pub fn context_lost(&self) -> bool {
        self.lock().lost.is_some()
    }

    /// After the program reset its lost context (`cuDevicePrimaryCtxReset`):
    /// a local device refuses every later use (`CUDA_ERROR_DEVICE_UNAVAILABLE`
    /// from the new context) until the process restarts; so does this
    /// session. Returns whether the context was lost.
    pub fn reset_lost_context(&self) -> bool {
        let mut st = self.lock();
        if st.lost.is_none() {
            return false;
        }
        st.lost = Some(ClientError::Cuda {
            code: cuda::DEVICE_UNAVAILABLE,
            message: "the device is unavailable: its context was lost to a sticky error".into(),
        });
        true
    }

    fn mark_dead(st: &mut State, e: ClientError) -> ClientError {
        if e.is_fatal() && st.dead.is_none() {
            st.dead = Some(e.clone());
        }
        e
    }

    /// Queues a call; sends a batch if the queue is full. Host writes to
    /// mapped memory go first.
    fn enqueue(&self, st: &mut State, op: Op) -> Result<()> {
        self.push_mirrors(st, op_stream(&op))?;
        self.enqueue_plain(st, op)
    }

    fn enqueue_plain(&self, st: &mut State, op: Op) -> Result<()> {
        Self::check_alive(st)?;
        note_work(st, &op);
        crate::stats::note_queued();
        // Replies are not read here: polling the connection for them on
        // every call contends with the I/O thread for quinn's lock (measured:
        // 29.6 against 24.1 µs per launch paced 20 µs apart). The queue
        // learns that nothing is in flight when a synchronizing call drains
        // it; in between the delay bound cuts.
        if let Some(batch) = st.queue.push(op) {
            self.send(st, &batch)?;
        }
        Ok(())
    }

    fn send(&self, st: &mut State, batch: &v1::Batch) -> Result<()> {
        self.inner.transport.send_batch(batch).map_err(|e| Self::mark_dead(st, e))?;
        // Bounded: read answers before running too far ahead.
        while st.queue.must_drain() {
            if self.take_arrived(st)? == 0 {
                crate::stats::note_waited();
                let reply = self.recv_reply(st)?;
                self.take_reply(st, reply)?;
            }
        }
        Ok(())
    }

    /// Handles a reply no call is waiting for, keeping the answer of the
    /// call sent and not yet waited for ([`Self::call_send`]).
    fn take_reply(&self, st: &mut State, reply: v1::BatchReply) -> Result<()> {
        let answer = st.queue.on_reply(reply, st.pending).map_err(|e| Self::mark_dead(st, e))?;
        if st.pending != 0 && answer.seq == st.pending {
            st.early = Some(answer);
        }
        Ok(())
    }

    /// Handles the replies that have arrived, without waiting; returns how
    /// many there were.
    fn take_arrived(&self, st: &mut State) -> Result<usize> {
        let mut n = 0;
        while st.queue.in_flight() > 0 {
            let Some(reply) = self.inner.transport.try_recv_reply() else { break };
            let reply = reply.map_err(|e| Self::mark_dead(st, e))?;
            let reply = self.apply_mirrors(st, reply);
            self.take_reply(st, reply)?;
            n += 1;
        }
        Ok(n)
    }

    /// Sends `op` after everything queued and waits for its answer. Returns
    /// the call's own error, else the first latched error of earlier calls,
    /// else its result.
    fn call(&self, st: &mut State, op: Op) -> Result<Option<Value>> {
        let sent = self.call_send(st, op);
        let result = sent.and_then(|sent| self.call_wait_inner(st, sent));
        self.after_call(st, result)
    }

    /// What every waited call does before it returns: the device's changes
    /// to mapped memory too large for their reply are fetched, and device
    /// printf output appears (when the synchronizing call returns).
    fn after_call(&self, st: &mut State, mut result: Result<Option<Value>>) -> Result<Option<Value>> {
        if let Err(e @ ClientError::Cuda { code, .. }) = &result
            && cuda::ends_context(*code)
            && st.lost.is_none()
        {
            st.lost = Some(e.clone());
        }
        if !st.mirror_fetch.is_empty() {
            let fetched = self.fetch_mirrors(st);
            result = result.and_then(|v| fetched.map(|()| v));
        }
        self.deliver_output(st);
        result
    }

    /// Sends `op` after everything queued, without waiting for its answer
    /// ([`Self::call_wait`] does; nothing else may be waited for between
    /// the two).
    fn call_send(&self, st: &mut State, op: Op) -> Result<Sent> {
        Self::check_alive(st)?;
        self.push_mirrors(st, op_stream(&op))?;
        note_work(st, &op);
        let idle = idle_after(&op);
        crate::stats::note_waited();
        // A call that fills the queue comes back in the batch `push` cut.
        let batch = match st.queue.push(op) {
            Some(full) => full,
            None => st.queue.cut().ok_or_else(|| ClientError::Protocol("empty batch".into()))?,
        };
        // Set first: the send may read the reply while it drains.
        st.pending = batch.seq;
        st.early = None;
        if let Err(e) = self.send(st, &batch) {
            st.pending = 0;
            return Err(e);
        }
        Ok(Sent { seq: batch.seq, idle })
    }

    /// Waits for the answer of the call [`Self::call_send`] sent.
    fn call_wait(&self, st: &mut State, sent: Sent) -> Result<Option<Value>> {
        let result = self.call_wait_inner(st, sent);
        self.after_call(st, result)
    }

    fn call_wait_inner(&self, st: &mut State, sent: Sent) -> Result<Option<Value>> {
        let early = st.early.take().filter(|a| a.seq == sent.seq);
        let result = match early {
            Some(answer) => answer.result,
            None => loop {
                let reply = match self.recv_reply(st) {
                    Ok(r) => r,
                    Err(e) => {
                        st.pending = 0;
                        return Err(e);
                    }
                };
                let answer = st.queue.on_reply(reply, sent.seq).map_err(|e| Self::mark_dead(st, e));
                match answer {
                    Ok(a) if a.seq == sent.seq => break a.result,
                    Ok(_) => {}
                    Err(e) => {
                        st.pending = 0;
                        return Err(e);
                    }
                }
            },
        };
        st.pending = 0;
        let idle_after = sent.idle;
        let value = result?;
        if let Some(l) = st.queue.take_latched() {
            return Err(l.first);
        }
        match (idle_after, &value) {
            (Idle::All, _) => st.busy.clear(),
            (Idle::Stream(s), _) | (Idle::IfReady(s), Some(Value::Ready(true))) => {
                st.busy.remove(&s);
            }
            _ => {}
        }
        Ok(value)
    }

    /// Reads the next reply; the device's changes to mapped host memory
    /// it carries land in host memory at once (or are noted for a copy).
    fn recv_reply(&self, st: &mut State) -> Result<v1::BatchReply> {
        let reply = crate::stats::waiting(|| self.inner.transport.recv_reply()).map_err(|e| Self::mark_dead(st, e))?;
        Ok(self.apply_mirrors(st, reply))
    }

    /// Lands the device's changes to mapped host memory that `reply`
    /// carries (or notes them for a copy).
    fn apply_mirrors(&self, st: &mut State, mut reply: v1::BatchReply) -> v1::BatchReply {
        for m in std::mem::take(&mut reply.mirrors) {
            if m.data.is_empty() {
                st.mirror_fetch.push((m.addr, m.size));
            } else {
                st.mirrors.apply(m.addr, &m.data);
            }
        }
        reply
    }

    /// Sends host writes to mapped memory as copies ordered on `stream`
    /// (the stream of the call that follows).
    fn push_mirrors(&self, st: &mut State, stream: u32) -> Result<()> {
        if st.mirrors.is_empty() {
            return Ok(());
        }
        for (dst, bytes) in st.mirrors.pushes() {
            self.htod_locked(st, dst, &bytes, StreamId(stream), false)?;
        }
        Ok(())
    }

    /// Copies the device's changes that did not fit their reply.
    fn fetch_mirrors(&self, st: &mut State) -> Result<()> {
        for (addr, size) in std::mem::take(&mut st.mirror_fetch) {
            let mut data = vec![0u8; size as usize];
            self.dtoh_locked(st, &mut data, addr, StreamId(0))?;
            st.mirrors.apply(addr, &data);
        }
        Ok(())
    }

    /// Mirrors `[addr, addr + host.size())`, device memory of this session,
    /// with the host memory `host` (mapped host memory): host writes reach
    /// the device before later calls, device writes reach host memory when
    /// a synchronizing call returns. The device half starts as the host's
    /// bytes.
    pub fn mirror_add(&self, addr: u64, host: Box<dyn MirrorHost>) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let size = host.size() as u64;
        st.space.check_access(addr, size)?;
        self.enqueue_plain(&mut st, Op::MirrorAdd(v1::MirrorAdd { addr, size }))?;
        st.mirrors.add(addr, host);
        self.push_mirrors(&mut st, 0)
    }

    /// Ends the mirror at `addr`, queued.
    pub fn mirror_remove(&self, addr: u64) -> Result<()> {
        let mut st = self.lock();
        if !st.mirrors.remove(addr) {
            return Err(ClientError::InvalidHandle(format!("no mirrored range at {addr:#x}")));
        }
        self.enqueue_plain(&mut st, Op::MirrorRemove(v1::MirrorRemove { addr }))
    }

    /// Sends what is queued without waiting.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        self.flush_locked(&mut st)
    }

    fn flush_locked(&self, st: &mut State) -> Result<()> {
        match st.queue.cut() {
            Some(batch) => self.send(st, &batch),
            None => Ok(()),
        }
    }

    /// Sends an arbitrary call and waits for it (tests and tools).
    pub fn raw_call(&self, op: Op) -> Result<Option<Value>> {
        let mut st = self.lock();
        self.call(&mut st, op)
    }

    /// Queues an arbitrary call (tests and tools).
    pub fn raw_enqueue(&self, op: Op) -> Result<()> {
        let mut st = self.lock();
        self.enqueue(&mut st, op)
    }

    // --- memory ----------------------------------------------------------

    /// Allocates `size` bytes of device memory (`cuMemAlloc`), no round trip.
    pub fn mem_alloc(&self, size: u64) -> Result<u64> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let (addr, op) = st.space.alloc(size)?;
        if let Some(MapOp::Map { addr, size }) = op {
            self.enqueue(&mut st, Op::MemMap(v1::MemMap { addr, size }))?;
        }
        Ok(addr)
    }

    /// Frees an allocation (`cuMemFree`), no round trip.
    pub fn mem_free(&self, addr: u64) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        if let Some(MapOp::Unmap { addr }) = st.space.free(addr)? {
            self.enqueue(&mut st, Op::MemUnmap(v1::MemUnmap { addr }))?;
        }
        Ok(())
    }

    /// Copies host bytes to the device. The bytes are captured before this
    /// returns, so the caller may reuse its buffer; the copy is ordered on
    /// `stream` like every queued call.
    pub fn memcpy_htod(&self, dst: u64, src: &[u8], stream: StreamId) -> Result<()> {
        self.htod_from(dst, src, stream, false)
    }

    /// Copies host bytes to the device, asynchronously where the source is
    /// pinned memory in a host region shared with the server
    /// ([`Self::pinned_alloc`]): the copy is queued naming the region and
    /// the server's DMA reads the bytes when it runs, so the caller must
    /// leave them alone until then (as with pinned memory natively). From
    /// any other memory it is [`Self::memcpy_htod`].
    pub fn memcpy_htod_async(&self, dst: u64, src: &[u8], stream: StreamId) -> Result<()> {
        self.htod_from(dst, src, stream, true)
    }

    fn htod_from(&self, dst: u64, src: &[u8], stream: StreamId, asynchronous: bool) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        self.push_mirrors(&mut st, stream.0)?;
        // Mapped host memory's shadows need the bytes themselves.
        if st.mirrors.is_empty()
            && let Some(region) = self.region_for(&st, src.as_ptr() as usize, src.len())
        {
            st.space.check_access(dst, src.len() as u64)?;
            let op = Op::MemcpyHtod(v1::MemcpyHtoD {
                dst,
                stream: stream.0,
                source: Some(Source::Region(region)),
                asynchronous,
            });
            self.enqueue_plain(&mut st, op)?;
            if !asynchronous {
                // The caller may reuse its buffer once this returns.
                self.call(&mut st, Op::StreamSynchronize(v1::StreamSynchronize { stream: stream.0 }))?;
            }
            return Ok(());
        }
        self.htod_locked(&mut st, dst, src, stream, asynchronous && self.inner.async_copies)?;
        // Into managed or mapped memory: the host half has the bytes at once.
        if !st.mirrors.is_empty() {
            st.mirrors.copy_in(dst, src);
        }
        Ok(())
    }

    /// `asynchronous`: the caller's copy is ordered on the stream only (the
    /// server need not wait for it before the next call).
    fn htod_locked(&self, st: &mut State, dst: u64, src: &[u8], stream: StreamId, asynchronous: bool) -> Result<()> {
        st.space.check_access(dst, src.len() as u64)?;
        // An asynchronous copy goes through the bounce buffer only when no
        // stream has work the copy's waits could be held up by: natively
        // it returns once the bytes are staged, whatever the stream does.
        let done = match self.bounce_for(st, src.len(), asynchronous && !st.busy.is_empty()) {
            Some(bounce) => self.htod_bounced(st, bounce, dst, src, stream)?,
            None => 0,
        };
        st.bounced_bytes += done as u64;
        if done == src.len() {
            return Ok(());
        }
        let (dst, src) = (dst + done as u64, &src[done..]);
        // Staged and not yet copied at most twice the largest piece the
        // server stages whole (half its bound for the session).
        let in_flight = 2 * self.copy_piece();
        let piece = PIPELINE_PIECE.min(self.copy_piece());
        if src.len() <= piece {
            return self.htod_piece(st, dst, src, stream, asynchronous);
        }
        // Pieces, each copy queued once staged: the server copies one to
        // the device while the next is staged. Past `in_flight` staged
        // bytes, the synchronize waits for the copies before (a copy from
        // pageable memory is synchronous anyway).
        let mut staged = 0;
        for (i, part) in src.chunks(piece).enumerate() {
            if staged + part.len() > in_flight {
                self.call(st, Op::StreamSynchronize(v1::StreamSynchronize { stream: stream.0 }))?;
                staged = 0;
            }
            self.htod_piece(st, dst + (i * piece) as u64, part, stream, asynchronous)?;
            staged += part.len();
        }
        Ok(())
    }

    /// The largest copy staged whole on the server: a quarter of what the
    /// server stages for a session (two pieces in flight, with room for
    /// the session's other transfers), at most [`MAX_COPY_PIECE`].
    fn copy_piece(&self) -> usize {
        let staging = self.inner.welcome.max_staging_bytes;
        let piece = if staging == 0 { MAX_COPY_PIECE } else { (staging / 4).min(MAX_COPY_PIECE) };
        usize::try_from(piece).unwrap_or(usize::MAX).max(MIN_COPY_PIECE)
    }

    fn htod_piece(&self, st: &mut State, dst: u64, src: &[u8], stream: StreamId, asynchronous: bool) -> Result<()> {
        let copy =
            |source| Op::MemcpyHtod(v1::MemcpyHtoD { dst, stream: stream.0, source: Some(source), asynchronous });
        match self.host_bytes(st, src)? {
            HostBytes::Inline(p) => self.enqueue_plain(st, copy(Source::Inline(p))),
            HostBytes::Staged(staged) => {
                self.enqueue_plain(st, copy(Source::Staged(staged)))?;
                // The staged bytes wait in server memory until the copy runs.
                self.flush_locked(st)
            }
        }
    }

    /// Host bytes for a copy: inline up to the server's limit, else
    /// uploaded over bulk streams first (on this thread).
    fn host_bytes(&self, st: &mut State, src: &[u8]) -> Result<HostBytes> {
        if src.len() as u64 <= u64::from(self.inner.welcome.max_inline_bytes) {
            return Ok(HostBytes::Inline(payload::encode(Bytes::copy_from_slice(src), self.inner.compression)));
        }
        let id = st.next_transfer;
        st.next_transfer += 1;
        crate::stats::note_waited();
        crate::stats::waiting(|| self.inner.transport.bulk_put(id, src)).map_err(|e| Self::mark_dead(st, e))?;
        Ok(HostBytes::Staged(v1::StagedRef { transfer_id: id, size: src.len() as u64 }))
    }

    /// Copies device memory into `dst`; waits for the data.
    pub fn memcpy_dtoh(&self, dst: &mut [u8], src: u64, stream: StreamId) -> Result<()> {
        self.dtoh_into(dst, src, stream, false)
    }

    /// Copies device memory into `dst`, asynchronously where `dst` is
    /// pinned memory in a host region shared with the server: the copy is
    /// queued naming the region, the server's DMA writes the bytes when it
    /// runs, and the caller sees them after it synchronizes (as natively).
    /// Into any other memory it is [`Self::memcpy_dtoh`], which waits.
    pub fn memcpy_dtoh_async(&self, dst: &mut [u8], src: u64, stream: StreamId) -> Result<()> {
        self.dtoh_into(dst, src, stream, true)
    }

    fn dtoh_into(&self, dst: &mut [u8], src: u64, stream: StreamId, asynchronous: bool) -> Result<()> {
        let mut st = self.lock();
        if st.mirrors.is_empty()
            && let Some(region) = self.region_for(&st, dst.as_ptr() as usize, dst.len())
        {
            Self::check_alive(&st)?;
            st.space.check_access(src, dst.len() as u64)?;
            let size = dst.len() as u64;
            let op = Op::MemcpyDtoh(v1::MemcpyDtoH { src, size, stream: stream.0, into_region: Some(region) });
            self.enqueue(&mut st, op)?;
            if !asynchronous {
                self.call(&mut st, Op::StreamSynchronize(v1::StreamSynchronize { stream: stream.0 }))?;
            }
            return Ok(());
        }
        self.dtoh_locked(&mut st, dst, src, stream)
    }

    /// Copies `len` bytes of pinned memory at `src` (from
    /// [`Self::pinned_alloc`]) to the device, queued naming its host region
    /// (the server's DMA reads them when the copy runs; leave them alone
    /// until then). When the server maps the region no more (the session
    /// moved to another server) the bytes travel as for any other memory.
    pub fn memcpy_htod_pinned(&self, dst: u64, src: usize, len: usize, stream: StreamId) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        self.push_mirrors(&mut st, stream.0)?;
        let Some(region) = self.region_for(&st, src, len) else {
            // The server maps it no more (the session moved, or is about
            // to): the bytes go.
            drop(st);
            let mut data = vec![0u8; len];
            self.pinned_read(src, &mut data)?;
            return self.memcpy_htod(dst, &data, stream);
        };
        st.space.check_access(dst, len as u64)?;
        self.enqueue_plain(
            &mut st,
            Op::MemcpyHtod(v1::MemcpyHtoD {
                dst,
                stream: stream.0,
                source: Some(Source::Region(region)),
                asynchronous: true,
            }),
        )
    }

    /// Copies `len` bytes of device memory into pinned memory at `dst`,
    /// queued naming its host region; the bytes are there once the stream
    /// is synchronized. Falls back like [`Self::memcpy_htod_pinned`] (and
    /// then waits for the bytes).
    pub fn memcpy_dtoh_pinned(&self, dst: usize, len: usize, src: u64, stream: StreamId) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        self.push_mirrors(&mut st, stream.0)?;
        let Some(region) = self.region_for(&st, dst, len) else {
            drop(st);
            let mut data = vec![0u8; len];
            self.memcpy_dtoh(&mut data, src, stream)?;
            return self.pinned_write(dst, &data);
        };
        st.space.check_access(src, len as u64)?;
        let op = Op::MemcpyDtoh(v1::MemcpyDtoH { src, size: len as u64, stream: stream.0, into_region: Some(region) });
        self.enqueue_plain(&mut st, op)
    }

    /// The host region a call queued now may name for `[ptr, ptr + len)`:
    /// the call goes in the batch after the last one cut, which the
    /// transport notes for a server about to move the session (it revokes
    /// the regions: `None` then, and the bytes travel).
    fn region_for(&self, st: &State, ptr: usize, len: usize) -> Option<v1::HostRegionRef> {
        self.inner.transport.host_region(ptr, len, Some(st.queue.last_seq() + 1))
    }

    /// Copies `data` into pinned memory at `addr` (from
    /// [`Self::pinned_alloc`]), for callers without raw pointers.
    pub fn pinned_write(&self, addr: usize, data: &[u8]) -> Result<()> {
        self.inner.transport.pinned_copy(addr, data.len(), PinnedCopy::In(data))
    }

    /// Copies pinned memory at `addr` into `out`.
    pub fn pinned_read(&self, addr: usize, out: &mut [u8]) -> Result<()> {
        self.inner.transport.pinned_copy(addr, out.len(), PinnedCopy::Out(out))
    }

    /// `size` bytes of pinned host memory in a host region shared with the
    /// server (the address), so that copies from and to it are the
    /// server's DMA; `None` without a shared-memory attachment or beyond
    /// its bound (`ClientConfig::shm_pinned_bytes`): the caller gives plain
    /// memory then.
    pub fn pinned_alloc(&self, size: usize) -> Option<usize> {
        self.inner.transport.pinned_alloc(size)
    }

    /// Whether `[ptr, ptr + len)` of pinned memory from
    /// [`Self::pinned_alloc`] is also device memory at the same address (its
    /// host region is mapped there on the server and registered with the
    /// device), as pinned memory is under unified addressing natively:
    /// memsets, copies and kernels may then name it by that address.
    pub fn pinned_device_addressable(&self, ptr: usize, len: usize) -> bool {
        self.inner.transport.pinned_device_addressable(ptr, len)
    }

    /// Frees memory from [`Self::pinned_alloc`]; false when `ptr` is not
    /// such memory. Waits for the session's queued work first (a copy may
    /// still use the block, and a freed region is detached), as
    /// `cuMemFreeHost` synchronizes.
    pub fn pinned_free(&self, ptr: usize) -> Result<bool> {
        if !self.inner.transport.is_pinned(ptr) {
            return Ok(false);
        }
        let synced = if self.inner.transport.host_region(ptr, 1, None).is_some() { self.synchronize() } else { Ok(()) };
        let freed = self.inner.transport.pinned_free(ptr);
        synced.map(|()| freed)
    }

    fn dtoh_locked(&self, st: &mut State, dst: &mut [u8], src: u64, stream: StreamId) -> Result<()> {
        st.space.check_access(src, dst.len() as u64)?;
        let done = match self.bounce_for(st, dst.len(), false) {
            Some(bounce) => self.dtoh_bounced(st, bounce, dst, src, stream)?,
            None => 0,
        };
        st.bounced_bytes += done as u64;
        if done == dst.len() {
            return Ok(());
        }
        let (dst, src) = (&mut dst[done..], src + done as u64);
        // Pieces of a download over the network: `download_piece_bytes`;
        // through a shared region (its bytes the server's own memory
        // copies) the upload's piece, as measured before that setting.
        let shared = self.inner.transport.shared_memory_bytes().is_some();
        let piece = if shared { PIPELINE_PIECE } else { self.inner.download_piece }.min(self.copy_piece());
        if dst.len() <= piece {
            let op =
                Op::MemcpyDtoh(v1::MemcpyDtoH { src, size: dst.len() as u64, stream: stream.0, into_region: None });
            let value = self.call(st, op)?;
            return self.take_bytes(st, value, dst);
        }
        // Pieces: while one is fetched, the server reads the next from the
        // device (two staged at most; see `htod_locked`).
        let op = |i: usize, len: usize| {
            let src = src + (i * piece) as u64;
            Op::MemcpyDtoh(v1::MemcpyDtoH { src, size: len as u64, stream: stream.0, into_region: None })
        };
        let total = dst.len();
        let len = |i: usize| total.saturating_sub(i * piece).min(piece);
        let mut value = self.call(st, op(0, len(0)))?;
        for (i, part) in dst.chunks_mut(piece).enumerate() {
            let next = match len(i + 1) {
                0 => None,
                n => Some(self.call_send(st, op(i + 1, n))?),
            };
            if let Err(e) = self.take_bytes(st, value, part) {
                // The next piece's answer is nobody's now.
                st.pending = 0;
                return Err(e);
            }
            value = match next {
                Some(sent) => self.call_wait(st, sent)?,
                None => None,
            };
        }
        Ok(())
    }

    /// The bounce buffer for a pageable copy of `len` bytes, made at the
    /// first such copy; `None` for copies the server takes inline, while
    /// mapped memory is mirrored (its pushes come through here), when
    /// `held_back`, and without shared memory.
    fn bounce_for(&self, st: &mut State, len: usize, held_back: bool) -> Option<usize> {
        if held_back || len as u64 <= u64::from(self.inner.welcome.max_inline_bytes) || !st.mirrors.is_empty() {
            return None;
        }
        if st.bounce == Bounce::NotYet {
            st.bounce = match self.inner.transport.pinned_alloc(2 * BOUNCE_HALF) {
                Some(at) => Bounce::At(at),
                None => Bounce::Refused,
            };
        }
        match st.bounce {
            Bounce::At(at) => Some(at),
            Bounce::NotYet | Bounce::Refused => None,
        }
    }

    /// Uploads pageable `src` through the bounce buffer at `bounce`: each
    /// chunk is written into one half while the server copies the chunk
    /// before from the other half to the device, and each copy is answered
    /// once done (the caller may reuse its buffer when this returns, and
    /// the half is free again). A small chunk goes in pieces, each sent
    /// once written ([`bounce_piece`]), so that its DMA overlaps the
    /// client's pass over the next. Returns the bytes uploaded: all of them, or
    /// fewer when the host regions were revoked (the session is moving) and
    /// the rest must travel as bytes.
    fn htod_bounced(&self, st: &mut State, bounce: usize, dst: u64, src: &[u8], stream: StreamId) -> Result<usize> {
        let mut sent: Option<(Sent, usize)> = None;
        let mut done = 0;
        for (i, chunk) in src.chunks(BOUNCE_HALF).enumerate() {
            let half = bounce + (i % 2) * BOUNCE_HALF;
            let piece = bounce_piece(chunk.len());
            let pieces = chunk.len().div_ceil(piece);
            for (j, part) in chunk.chunks(piece).enumerate() {
                let at = half + j * piece;
                // The half's last chunk was answered before the one in
                // flight was sent.
                let written = self.inner.transport.pinned_copy(at, part.len(), PinnedCopy::In(part));
                if j == 0
                    && let Some((s, len)) = sent.take()
                {
                    self.call_wait(st, s)?;
                    done += len;
                }
                written?;
                // Revoked (the session moves): the pieces sent so far are
                // answered with the synchronization below, the rest travels
                // as bytes.
                let Some(region) = self.region_for(st, at, part.len()) else {
                    if j > 0 {
                        let s =
                            self.call_send(st, Op::StreamSynchronize(v1::StreamSynchronize { stream: stream.0 }))?;
                        self.call_wait(st, s)?;
                        done += j * piece;
                    }
                    return Ok(done);
                };
                let to = dst + (i * BOUNCE_HALF + j * piece) as u64;
                let copy = v1::MemcpyHtoD {
                    dst: to,
                    stream: stream.0,
                    source: Some(Source::Region(region)),
                    asynchronous: true,
                };
                self.enqueue_plain(st, Op::MemcpyHtod(copy))?;
                if j + 1 < pieces {
                    // Its DMA starts while the next piece is written.
                    self.flush_locked(st)?;
                }
            }
            let s = self.call_send(st, Op::StreamSynchronize(v1::StreamSynchronize { stream: stream.0 }))?;
            sent = Some((s, chunk.len()));
        }
        if let Some((s, len)) = sent {
            self.call_wait(st, s)?;
            done += len;
        }
        Ok(done)
    }

    /// Downloads into pageable `dst` through the bounce buffer at `bounce`:
    /// the server's DMA fills one half while the client reads the chunk
    /// before out of the other. Returns the bytes downloaded, as
    /// [`Self::htod_bounced`].
    fn dtoh_bounced(&self, st: &mut State, bounce: usize, dst: &mut [u8], src: u64, stream: StreamId) -> Result<usize> {
        let total = dst.len();
        let chunk_len = |i: usize| total.saturating_sub(i * BOUNCE_HALF).min(BOUNCE_HALF);
        let half = |i: usize| bounce + (i % 2) * BOUNCE_HALF;
        // Asks for chunk `i` into its half; `None` once the regions are revoked.
        let request = |st: &mut State, i: usize| -> Result<Option<Sent>> {
            let Some(region) = self.region_for(st, half(i), chunk_len(i)) else { return Ok(None) };
            let from = src + (i * BOUNCE_HALF) as u64;
            let copy =
                v1::MemcpyDtoH { src: from, size: chunk_len(i) as u64, stream: stream.0, into_region: Some(region) };
            self.enqueue_plain(st, Op::MemcpyDtoh(copy))?;
            self.call_send(st, Op::StreamSynchronize(v1::StreamSynchronize { stream: stream.0 })).map(Some)
        };
        let mut sent = request(st, 0)?;
        let mut done = 0;
        for (i, part) in dst.chunks_mut(BOUNCE_HALF).enumerate() {
            let Some(s) = sent.take() else { return Ok(done) };
            self.call_wait(st, s)?;
            // The next chunk's DMA goes on while this one is read.
            if chunk_len(i + 1) > 0 {
                sent = request(st, i + 1)?;
            }
            let read = self.inner.transport.pinned_copy(half(i), part.len(), PinnedCopy::Out(part));
            if let Err(e) = read {
                if let Some(s) = sent {
                    let _ = self.call_wait(st, s);
                }
                return Err(e);
            }
            done += part.len();
        }
        Ok(done)
    }

    /// The bytes a copy to the host answered, inline or over bulk streams.
    fn take_bytes(&self, st: &mut State, value: Option<Value>, dst: &mut [u8]) -> Result<()> {
        match value {
            Some(Value::Data(p)) => {
                let bytes = payload::decode(p, dst.len() as u64).map_err(|e| ClientError::Protocol(e.to_string()))?;
                if bytes.len() != dst.len() {
                    return Err(ClientError::Protocol("copy returned the wrong number of bytes".into()));
                }
                dst.copy_from_slice(&bytes);
                Ok(())
            }
            Some(Value::Staged(s)) if s.size == dst.len() as u64 => {
                crate::stats::waiting(|| self.inner.transport.bulk_get(s.transfer_id, dst))
                    .map_err(|e| Self::mark_dead(st, e))
            }
            other => Err(ClientError::Protocol(format!("unexpected copy result {other:?}"))),
        }
    }

    /// Device-to-device copy, queued.
    pub fn memcpy_dtod(&self, dst: u64, src: u64, size: u64, stream: StreamId) -> Result<()> {
        let mut st = self.lock();
        st.space.check_access(dst, size)?;
        st.space.check_access(src, size)?;
        self.enqueue(&mut st, Op::MemcpyDtod(v1::MemcpyDtoD { dst, src, size, stream: stream.0 }))
    }

    /// Sets `count` elements of `element_size` bytes (1, 2, 4) to `value`, queued.
    pub fn memset(&self, dst: u64, value: u32, element_size: u32, count: u64, stream: StreamId) -> Result<()> {
        let mut st = self.lock();
        let bytes = count
            .checked_mul(u64::from(element_size))
            .ok_or_else(|| ClientError::InvalidValue("memset size overflows".into()))?;
        st.space.check_access(dst, bytes)?;
        let op = Op::Memset(v1::Memset { dst, value, element_size, count, stream: stream.0 });
        self.enqueue(&mut st, op)
    }

    /// Stream memory operations (`cuStreamWaitValue*`,
    /// `cuStreamWriteValue*`, `cuStreamBatchMemOp`), queued: each word must
    /// be accessible session memory (waits read it, writes store it); the
    /// server checks the rest by CUDA's rules.
    pub fn stream_mem_ops(&self, ops: Vec<v1::StreamMemOp>, stream: StreamId) -> Result<()> {
        let mut st = self.lock();
        for op in &ops {
            // Waits and writes touch a word; flushes and barriers none.
            if let Some(size) = gpupool_proto::mem_ops::word_size(op.kind) {
                st.space.check_access(op.address, size)?;
            }
        }
        self.enqueue(&mut st, Op::StreamMemOps(v1::StreamMemOps { stream: stream.0, ops }))
    }

    // --- modules and launches --------------------------------------------

    /// Batches sent to the server so far: one per flush.
    pub fn batches_sent(&self) -> u64 {
        self.lock().queue.last_seq()
    }

    /// Loads a module image (PTX, cubin, fatbin, or
    /// [`gpupool_proto::BUILTIN_MODULE`]). Sends the hash first and the
    /// image only if the server does not hold it.
    pub fn module_load(&self, image: &[u8]) -> Result<Module> {
        let id = self.reserve_module_id();
        self.module_load_as(id, image)
    }

    /// Takes the next module id without telling the server: a library
    /// loaded lazily has its handle (the id) before its module exists, and
    /// loads it with [`Session::module_load_as`] at first use.
    pub fn reserve_module_id(&self) -> u32 {
        let mut st = self.lock();
        let id = st.next_module;
        st.next_module += 1;
        id
    }

    /// Loads a module image as module `id`, an id from
    /// [`Session::reserve_module_id`] not loaded yet (as
    /// [`Session::module_load`]).
    pub fn module_load_as(&self, id: u32, image: &[u8]) -> Result<Module> {
        let mut st = self.lock();
        if id == 0 || id >= st.next_module || st.modules.contains_key(&id) {
            return Err(ClientError::InvalidHandle(format!("module id {id} was not reserved or is loaded")));
        }
        let sha256 = Bytes::copy_from_slice(&Sha256::digest(image));
        let by_hash = Op::ModuleLoad(v1::ModuleLoad { module: id, sha256: sha256.clone(), image: None, staged: None });
        let value = match self.call(&mut st, by_hash) {
            Err(ClientError::Cuda { code: cuda::FILE_NOT_FOUND, .. }) => {
                let max_inline = self.inner.welcome.max_inline_bytes as usize;
                // Only an image that might fit inline once compressed is
                // copied and compressed to find out: cuBLAS's images (tens
                // of MB each) went through both and then the bulk path.
                let inline = (image.len() <= max_inline.saturating_mul(INLINE_IMAGE_RATIO))
                    .then(|| payload::encode(Bytes::copy_from_slice(image), self.inner.compression))
                    .filter(|p| p.data.len() <= max_inline);
                let load = if let Some(p) = inline {
                    v1::ModuleLoad { module: id, sha256, image: Some(p), staged: None }
                } else {
                    // Large images (cuBLAS's fatbins) travel like large copies.
                    let transfer_id = st.next_transfer;
                    st.next_transfer += 1;
                    self.inner.transport.bulk_put(transfer_id, image).map_err(|e| Self::mark_dead(&mut st, e))?;
                    let staged = v1::StagedRef { transfer_id, size: image.len() as u64 };
                    v1::ModuleLoad { module: id, sha256, image: None, staged: Some(staged) }
                };
                self.call(&mut st, Op::ModuleLoad(load))?
            }
            other => other?,
        };
        let Some(Value::Module(info)) = value else {
            return Err(ClientError::Protocol("module load returned no function list".into()));
        };
        let module = Module { id, functions: Arc::new(info.functions.into_iter().map(Arc::new).collect()) };
        st.modules.insert(id, module.clone());
        Ok(module)
    }

    /// Unloads a module, queued.
    pub fn module_unload(&self, module: &Module) -> Result<()> {
        let mut st = self.lock();
        st.modules
            .remove(&module.id)
            .ok_or_else(|| ClientError::InvalidHandle(format!("module {} is not loaded", module.id)))?;
        st.occupancy.retain(|(m, _), _| *m != module.id);
        let gone: Vec<(u32, String)> = st.globals.keys().filter(|(m, _)| *m == module.id).cloned().collect();
        for key in gone {
            if let Some(g) = st.globals.remove(&key) {
                st.space.remove_global(g.addr);
                // A managed variable's mirror goes with its memory.
                if st.mirrors.remove(g.addr) {
                    self.enqueue_plain(&mut st, Op::MirrorRemove(v1::MirrorRemove { addr: g.addr }))?;
                }
            }
        }
        self.enqueue(&mut st, Op::ModuleUnload(v1::ModuleUnload { module: module.id }))
    }

    /// A loaded module by id, with its functions' current attributes.
    pub fn module(&self, id: u32) -> Option<Module> {
        self.lock().modules.get(&id).cloned()
    }

    /// The module variable `name` (`cuModuleGetGlobal`): its address, size
    /// and whether it is managed memory. One round trip per variable; later
    /// lookups are answered here.
    pub fn module_get_global(&self, module: u32, name: &str) -> Result<Global> {
        let mut st = self.lock();
        if !st.modules.contains_key(&module) {
            return Err(ClientError::InvalidHandle(format!("module {module} is not loaded")));
        }
        if let Some(&found) = st.globals.get(&(module, name.to_owned())) {
            return Ok(found);
        }
        let op = Op::ModuleGetGlobal(v1::ModuleGetGlobal { module, name: name.to_owned(), at: None });
        match self.call(&mut st, op)? {
            Some(Value::Global(g)) => {
                let found = Global { addr: g.addr, size: g.size, managed: g.managed };
                st.space.add_global(g.addr, g.size);
                st.globals.insert((module, name.to_owned()), found);
                Ok(found)
            }
            other => Err(ClientError::Protocol(format!("unexpected global result {other:?}"))),
        }
    }

    /// An occupancy query about `f` (see `v1::OccupancyQuery`); returns
    /// `(value, block_size)`.
    /// A repeated query is answered from the session's cache.
    pub fn occupancy(&self, f: &Function, query: v1::Occupancy) -> Result<(i64, i32)> {
        let mut st = self.lock();
        let query = v1::Occupancy { module: f.module, function: f.index, ..query };
        let key = prost::Message::encode_to_vec(&query);
        if let Some(&hit) = st.occupancy.get(&(f.module, f.index)).and_then(|m| m.get(&key)) {
            return Ok(hit);
        }
        let answer = match self.call(&mut st, Op::Occupancy(query))? {
            Some(Value::Occupancy(o)) => (o.value, o.block_size),
            other => return Err(ClientError::Protocol(format!("unexpected occupancy result {other:?}"))),
        };
        if st.occupancy.values().map(HashMap::len).sum::<usize>() >= MAX_OCCUPANCY_ANSWERS {
            st.occupancy.clear();
        }
        st.occupancy.entry((f.module, f.index)).or_default().insert(key, answer);
        Ok(answer)
    }

    /// `f` as its module holds it now (attributes set since the load
    /// included), with its attributes: a function of a large module comes
    /// undescribed from the load (`FunctionInfo.undescribed`: reading
    /// attributes loads a function on the server) and is described here
    /// when first needed, one round trip, then kept in the module.
    pub fn described(&self, f: &Function) -> Result<Arc<v1::FunctionInfo>> {
        let mut st = self.lock();
        self.described_locked(&mut st, f)
    }

    fn described_locked(&self, st: &mut State, f: &Function) -> Result<Arc<v1::FunctionInfo>> {
        let current = st.modules.get(&f.module).and_then(|m| m.functions.get(f.index as usize)).cloned();
        let current = current.unwrap_or_else(|| f.info.clone());
        if !current.undescribed {
            return Ok(current);
        }
        let op = Op::DescribeFunction(v1::DescribeFunction { module: f.module, function: f.index });
        let info = match self.call(st, op)? {
            Some(Value::Function(info)) if !info.undescribed && info.name == current.name => Arc::new(info),
            other => {
                return Err(ClientError::Protocol(format!("DescribeFunction of {} answered {other:?}", current.name)));
            }
        };
        if let Some(slot) =
            st.modules.get_mut(&f.module).and_then(|m| Arc::make_mut(&mut m.functions).get_mut(f.index as usize))
        {
            *slot = info.clone();
        }
        Ok(info)
    }

    /// Sets a function attribute (`cuFuncSetAttribute`), queued; the cached
    /// attributes follow so that reads need no round trip.
    pub fn func_set_attribute(&self, f: &Function, attribute: u32, value: i32) -> Result<()> {
        let mut st = self.lock();
        let module = st
            .modules
            .get_mut(&f.module)
            .ok_or_else(|| ClientError::InvalidHandle(format!("module {} is not loaded", f.module)))?;
        let functions = Arc::make_mut(&mut module.functions);
        let info = functions
            .get_mut(f.index as usize)
            .ok_or_else(|| ClientError::InvalidHandle(format!("function {} of module {}", f.index, f.module)))?;
        Arc::make_mut(info).attributes.insert(attribute, value);
        st.occupancy.remove(&(f.module, f.index));
        let op = Op::FuncSetAttribute(v1::FuncSetAttribute { module: f.module, function: f.index, attribute, value });
        self.enqueue(&mut st, op)
    }

    /// `true` when `addr` is device memory of this session (its reserved
    /// range or a resolved module variable); anything else is host memory.
    pub fn is_device_ptr(&self, addr: u64) -> bool {
        self.lock().space.is_device(addr)
    }

    /// The allocation or module variable containing `addr`: `(start, size)`.
    pub fn address_range(&self, addr: u64) -> Option<(u64, u64)> {
        self.lock().space.block_of(addr)
    }

    /// The session's reserved device address range `(base, size)`.
    pub fn reserved_range(&self) -> (u64, u64) {
        self.lock().space.range()
    }

    /// Launches `f` with typed arguments, queued.
    pub fn launch(&self, f: &Function, cfg: LaunchConfig, stream: StreamId, args: &[KernelArg]) -> Result<()> {
        let params = pack_args(&f.info, args)?;
        self.launch_raw(f, cfg, stream, params)
    }

    /// Launches `f` with a ready parameter buffer, queued. The
    /// configuration is checked first, as the driver checks it
    /// ([`crate::launch_check`]): a bad one fails here and latches nothing.
    pub fn launch_raw(&self, f: &Function, cfg: LaunchConfig, stream: StreamId, params: Vec<u8>) -> Result<()> {
        self.launch_with(f, cfg, None, stream, params)
    }

    /// Launches `f` with launch attributes (`cuLaunchKernelEx`,
    /// `cuLaunchCooperativeKernel`). A cooperative launch waits for the
    /// server's answer to the launch (not for the kernel), so that a grid
    /// too large to be co-resident fails the launch call itself
    /// (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE), as natively.
    pub fn launch_with(
        &self,
        f: &Function,
        cfg: LaunchConfig,
        attributes: Option<v1::LaunchAttributes>,
        stream: StreamId,
        params: Vec<u8>,
    ) -> Result<()> {
        let (x, y, z) = cfg.grid;
        let (bx, by, bz) = cfg.block;
        let cluster = attributes.as_ref().and_then(|a| a.cluster).map_or([0; 3], |c| [c.x, c.y, c.z]);
        let shape = crate::launch_check::LaunchShape {
            grid: [x, y, z],
            block: [bx, by, bz],
            shared_mem_bytes: cfg.shared_mem_bytes,
            cluster,
        };
        let cooperative = attributes.as_ref().is_some_and(|a| a.cooperative);
        // One lock for the function's current attributes and the queue.
        let mut st = self.lock();
        let info = self.described_locked(&mut st, f)?;
        crate::launch_check::check(&self.inner.launch_limits, &info, &shape)?;
        let op = Op::Launch(v1::Launch {
            module: f.module,
            function: f.index,
            grid: dim3(cfg.grid),
            block: dim3(cfg.block),
            shared_mem_bytes: cfg.shared_mem_bytes,
            stream: stream.0,
            params: params.into(),
            attributes,
        });
        if cooperative {
            return self.call(&mut st, op).map(drop);
        }
        self.enqueue(&mut st, op)
    }

    // --- context limits --------------------------------------------------

    /// A context limit (`cuCtxGetLimit`), answered locally; `None` for a
    /// limit the server's device does not have.
    pub fn ctx_get_limit(&self, limit: u32) -> Option<u64> {
        self.lock().limits.get(&limit).copied()
    }

    /// Sets a context limit on the server (`cuCtxSetLimit`) and returns the
    /// value the driver reports afterwards, which later gets answer.
    pub fn ctx_set_limit(&self, limit: u32, value: u64) -> Result<u64> {
        let mut st = self.lock();
        match self.call(&mut st, Op::CtxSetLimit(v1::CtxSetLimit { limit, value }))? {
            Some(Value::Limit(now)) => {
                st.limits.insert(limit, now);
                Ok(now)
            }
            other => Err(ClientError::Protocol(format!("unexpected limit result {other:?}"))),
        }
    }

    // --- TMA descriptors ---------------------------------------------------

    /// Encodes a TMA descriptor with the server's driver (its format is the
    /// driver's own): one round trip, after the work queued so far.
    pub fn tensor_map(&self, request: v1::TensorMapEncode) -> Result<[u8; 128]> {
        let mut st = self.lock();
        match self.call(&mut st, Op::TensorMapEncode(request))? {
            Some(Value::TensorMap(map)) => {
                map[..].try_into().map_err(|_| ClientError::Protocol(format!("a tensor map of {} bytes", map.len())))
            }
            other => Err(ClientError::Protocol(format!("unexpected tensor map result {other:?}"))),
        }
    }

    // --- streams and events ----------------------------------------------

    /// Creates a stream, queued; the id is assigned here.
    pub fn stream_create(&self, flags: u32, priority: i32) -> Result<StreamId> {
        let mut st = self.lock();
        let id = st.next_stream;
        st.next_stream += 1;
        self.enqueue(&mut st, Op::StreamCreate(v1::StreamCreate { stream: id, flags, priority }))?;
        st.streams.insert(id);
        Ok(StreamId(id))
    }

    /// `cuStreamSetAttribute`, queued: `value` is the 64-byte
    /// `CUstreamAttrValue`.
    pub fn stream_set_attribute(&self, s: StreamId, attribute: u32, value: [u8; 64]) -> Result<()> {
        let mut st = self.lock();
        let op =
            Op::StreamSetAttribute(v1::StreamSetAttribute { stream: s.0, attribute, value: value.to_vec().into() });
        self.enqueue(&mut st, op)
    }

    /// `cuStreamGetAttribute`: the server's driver answers (one round trip,
    /// after the work queued so far, sets included).
    pub fn stream_get_attribute(&self, s: StreamId, attribute: u32) -> Result<[u8; 64]> {
        let mut st = self.lock();
        let op = Op::StreamGetAttribute(v1::StreamGetAttribute { stream: s.0, attribute });
        match self.call(&mut st, op)? {
            Some(Value::StreamAttribute(v)) => {
                v[..].try_into().map_err(|_| ClientError::Protocol(format!("a stream attribute of {} bytes", v.len())))
            }
            other => Err(ClientError::Protocol(format!("unexpected stream attribute result {other:?}"))),
        }
    }

    pub fn stream_destroy(&self, s: StreamId) -> Result<()> {
        let mut st = self.lock();
        st.streams.remove(&s.0);
        st.busy.remove(&s.0);
        self.enqueue(&mut st, Op::StreamDestroy(v1::StreamDestroy { stream: s.0 }))
    }

    /// Waits for all work on `s`; returns errors of earlier queued work.
    /// Answered without a round trip when `s` was seen idle since its last
    /// work and nothing is queued or latched.
    pub fn stream_synchronize(&self, s: StreamId) -> Result<()> {
        let mut st = self.lock();
        if Self::seen_idle(&st, s) {
            return Ok(());
        }
        self.call(&mut st, Op::StreamSynchronize(v1::StreamSynchronize { stream: s.0 })).map(drop)
    }

    /// `true` when all work on `s` has completed.
    pub fn stream_query(&self, s: StreamId) -> Result<bool> {
        let mut st = self.lock();
        if Self::seen_idle(&st, s) {
            return Ok(true);
        }
        match self.call(&mut st, Op::StreamQuery(v1::StreamQuery { stream: s.0 }))? {
            Some(Value::Ready(r)) => Ok(r),
            other => Err(ClientError::Protocol(format!("unexpected query result {other:?}"))),
        }
    }

    /// `true` when a synchronization of `s` has nothing to wait for: no
    /// work given to it since a waited call saw it idle, and no error of
    /// earlier work waiting to be returned.
    fn seen_idle(st: &State, s: StreamId) -> bool {
        st.dead.is_none()
            && (s.0 == 0 || st.streams.contains(&s.0))
            && !st.busy.contains(&s.0)
            && !st.queue.has_latched()
    }

    /// Makes `s` wait for `e`, queued.
    pub fn stream_wait_event(&self, s: StreamId, e: EventId) -> Result<()> {
        let mut st = self.lock();
        self.enqueue(&mut st, Op::StreamWaitEvent(v1::StreamWaitEvent { stream: s.0, event: e.0 }))
    }

    pub fn event_create(&self, flags: u32) -> Result<EventId> {
        // Refused at once, as the driver does, not by a later call.
        if !cuda::event_flags_valid(flags) {
            return Err(ClientError::Cuda {
                code: cuda::INVALID_VALUE,
                message: format!("event flags {flags:#x}: not a valid combination"),
            });
        }
        let mut st = self.lock();
        let id = st.next_event;
        st.next_event += 1;
        self.enqueue(&mut st, Op::EventCreate(v1::EventCreate { event: id, flags }))?;
        if flags & cuda::EVENT_INTERPROCESS != 0 {
            st.ipc_events.insert(id);
        }
        Ok(EventId(id))
    }

    pub fn event_destroy(&self, e: EventId) -> Result<()> {
        let mut st = self.lock();
        st.ipc_events.remove(&e.0);
        self.enqueue(&mut st, Op::EventDestroy(v1::EventDestroy { event: e.0 }))
    }

    /// Records `e` on `s`: queued, or, for an event other processes share,
    /// sent and answered before it returns.
    pub fn event_record(&self, e: EventId, s: StreamId) -> Result<()> {
        let mut st = self.lock();
        self.record_op(&mut st, e, Op::EventRecord(v1::EventRecord { event: e.0, stream: s.0 }))
    }

    /// `cuCtxRecordEvent`: `e` captures all work of the session so far,
    /// queued (answered first for a shared event, as [`Self::event_record`]).
    pub fn context_record_event(&self, e: EventId) -> Result<()> {
        let mut st = self.lock();
        self.record_op(&mut st, e, Op::ContextEvent(v1::ContextEvent { event: e.0, wait: false }))
    }

    fn record_op(&self, st: &mut State, e: EventId, op: Op) -> Result<()> {
        if st.ipc_events.contains(&e.0) { self.call(st, op).map(drop) } else { self.enqueue(st, op) }
    }

    /// `cuIpcGetEventHandle`: the handle another process of the same
    /// tenant, on the same server and GPU, opens with
    /// [`Self::event_ipc_open`]. The event must have been created with
    /// `CU_EVENT_INTERPROCESS`.
    pub fn event_ipc_handle(&self, e: EventId) -> Result<[u8; gpupool_proto::ipc::HANDLE_BYTES]> {
        let mut st = self.lock();
        match self.call(&mut st, Op::IpcEventExport(v1::IpcEventExport { event: e.0 }))? {
            Some(Value::IpcHandle(h)) => {
                h[..].try_into().map_err(|_| ClientError::Protocol(format!("an IPC handle of {} bytes", h.len())))
            }
            other => Err(ClientError::Protocol(format!("unexpected IPC handle result {other:?}"))),
        }
    }

    /// `cuIpcOpenEventHandle`: the event another session exported as
    /// `handle`; answered before it returns, so that a handle the server
    /// refuses fails here, as the driver's open does.
    pub fn event_ipc_open(&self, handle: &[u8]) -> Result<EventId> {
        let mut st = self.lock();
        let id = st.next_event;
        st.next_event += 1;
        let op = Op::IpcEventOpen(v1::IpcEventOpen { event: id, handle: handle.to_vec().into() });
        self.call(&mut st, op)?;
        st.ipc_events.insert(id);
        Ok(EventId(id))
    }

    /// `cuCtxWaitEvent`: all later work of the session waits for the work
    /// `e` captured, queued.
    pub fn context_wait_event(&self, e: EventId) -> Result<()> {
        let mut st = self.lock();
        self.enqueue(&mut st, Op::ContextEvent(v1::ContextEvent { event: e.0, wait: true }))
    }

    pub fn event_query(&self, e: EventId) -> Result<bool> {
        let mut st = self.lock();
        match self.call(&mut st, Op::EventQuery(v1::EventQuery { event: e.0 }))? {
            Some(Value::Ready(r)) => Ok(r),
            other => Err(ClientError::Protocol(format!("unexpected query result {other:?}"))),
        }
    }

    pub fn event_synchronize(&self, e: EventId) -> Result<()> {
        let mut st = self.lock();
        self.call(&mut st, Op::EventSynchronize(v1::EventSynchronize { event: e.0 })).map(drop)
    }

    /// Milliseconds between two recorded events.
    pub fn event_elapsed(&self, start: EventId, end: EventId) -> Result<f32> {
        let mut st = self.lock();
        match self.call(&mut st, Op::EventElapsed(v1::EventElapsed { start: start.0, end: end.0 }))? {
            Some(Value::ElapsedMs(ms)) => Ok(ms),
            other => Err(ClientError::Protocol(format!("unexpected elapsed result {other:?}"))),
        }
    }

    /// Waits for all work of the session (`cuCtxSynchronize`).
    pub fn synchronize(&self) -> Result<()> {
        let mut st = self.lock();
        self.call(&mut st, Op::ContextSynchronize(v1::ContextSynchronize {})).map(drop)
    }

    /// Ends the session; queued work is flushed first.
    pub fn close(self) -> Result<()> {
        let flushed = self.flush();
        self.inner.transport.close();
        flushed
    }
}

/// A typed device allocation that frees itself on drop. A failed free is
/// latched by the session like any queued error.
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    session: Session,
    addr: u64,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> DeviceBuffer<T> {
    /// `len` elements of uninitialized device memory.
    pub fn new(session: &Session, len: usize) -> Result<Self> {
        let bytes = (len * std::mem::size_of::<T>()) as u64;
        let addr = session.mem_alloc(bytes)?;
        Ok(Self { session: session.clone(), addr, len, _t: std::marker::PhantomData })
    }

    /// A device copy of `data`.
    pub fn from_slice(session: &Session, data: &[T]) -> Result<Self> {
        let buf = Self::new(session, data.len())?;
        session.memcpy_htod(buf.addr, bytemuck::cast_slice(data), StreamId::DEFAULT)?;
        Ok(buf)
    }

    /// Device address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address as a kernel argument.
    pub fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.addr)
    }

    /// Copies the buffer back to the host.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); self.len];
        self.session.memcpy_dtoh(bytemuck::cast_slice_mut(&mut out), self.addr, StreamId::DEFAULT)?;
        Ok(out)
    }

    /// Overwrites the buffer with `data` (same length).
    pub fn write(&self, data: &[T]) -> Result<()> {
        if data.len() != self.len {
            return Err(ClientError::InvalidValue(format!("{} elements into a buffer of {}", data.len(), self.len)));
        }
        self.session.memcpy_htod(self.addr, bytemuck::cast_slice(data), StreamId::DEFAULT)
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if let Err(e) = self.session.mem_free(self.addr) {
            tracing::debug!(error = %e, addr = self.addr, "freeing a device buffer failed");
        }
    }
}
