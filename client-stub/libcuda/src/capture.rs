//! Stream capture: while a stream captures, the work queued on it becomes
//! graph nodes instead of calls to the server.
//!
//! Every stream-taking call in this library goes through [`route`]: it
//! answers "send on this stream" or "add to the capture of this stream",
//! and enforces the rules CUDA has for the legacy stream while a capture
//! is on. [`Captures`] is the sans-I/O state machine (captures, their
//! streams' current dependencies, events recorded inside a capture for
//! fork/join), tested without FFI; the exports at the end are the thin
//! C-ABI layer over it.

use crate::abi::{CuError, CuResult, get, put};
use crate::graph::{Id, Op, Store};
use crate::graph_api::{self, graph_handle, node_handle};
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUgraph, CUgraphNode, CUstream};
use gpupool_client::StreamId;
use std::collections::{HashMap, HashSet};
use std::ffi::{c_uint, c_ulonglong, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::thread::ThreadId;

pub(crate) const ILLEGAL_STATE: u32 = 401;
const UNSUPPORTED: CuError = CuError(900);
const INVALIDATED: CuError = CuError(901);
const UNMATCHED: CuError = CuError(903);
const UNJOINED: CuError = CuError(904);
const ISOLATION: CuError = CuError(905);
const IMPLICIT: CuError = CuError(906);
const WRONG_THREAD: CuError = CuError(908);

/// `CUstreamCaptureMode`.
pub(crate) const MODE_GLOBAL: u32 = 0;
pub(crate) const MODE_THREAD_LOCAL: u32 = 1;
pub(crate) const MODE_RELAXED: u32 = 2;

/// `CUstreamCaptureStatus`.
pub(crate) const STATUS_NONE: u32 = 0;
pub(crate) const STATUS_ACTIVE: u32 = 1;
pub(crate) const STATUS_INVALIDATED: u32 = 2;

#[derive(Debug)]
struct Capture {
    graph: Id,
    origin: u32,
    mode: u32,
    thread: ThreadId,
    invalidated: bool,
    /// `false` for `cuStreamBeginCaptureToGraph`: the graph is the
    /// application's and survives a failed capture.
    owns_graph: bool,
}

/// A stream taking part in a capture.
#[derive(Debug, Clone)]
struct Member {
    capture: u64,
    deps: Vec<Id>,
    /// Created without CU_STREAM_NON_BLOCKING: the legacy stream would
    /// synchronize with it.
    blocking: bool,
}

/// What `cuStreamGetCaptureInfo` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Info {
    pub(crate) status: u32,
    pub(crate) id: u64,
    pub(crate) graph: Id,
    pub(crate) deps: Vec<Id>,
}

/// Every capture in progress.
#[derive(Debug, Default)]
pub(crate) struct Captures {
    captures: HashMap<u64, Capture>,
    streams: HashMap<u32, Member>,
    /// Events recorded on a capturing stream: the capture and the nodes
    /// the record stood after.
    events: HashMap<usize, (u64, Vec<Id>)>,
    next: u64,
}

impl Captures {
    /// Number of captures in progress.
    pub(crate) fn count(&self) -> usize {
        self.captures.len()
    }

    /// Starts capturing `stream` into a new graph, or into `into` (graph,
    /// initial dependencies).
    pub(crate) fn begin(
        &mut self,
        store: &mut Store,
        stream: u32,
        blocking: bool,
        mode: u32,
        thread: ThreadId,
        into: Option<(Id, Vec<Id>)>,
    ) -> CuResult<u64> {
        if stream == StreamId::DEFAULT.0 {
            return Err(UNSUPPORTED);
        }
        if mode > MODE_RELAXED {
            return Err(CuError::INVALID_VALUE);
        }
        if self.streams.contains_key(&stream) {
            return Err(CuError(ILLEGAL_STATE));
        }
        let (graph, deps, owns_graph) = match into {
            Some((g, deps)) => {
                for d in &deps {
                    if store.graph_of(*d)? != g {
                        return Err(CuError::INVALID_VALUE);
                    }
                }
                store.graph(g)?;
                (g, deps, false)
            }
            None => (store.create(), Vec::new(), true),
        };
        self.next += 1;
        let id = self.next;
        self.captures.insert(id, Capture { graph, origin: stream, mode, thread, invalidated: false, owns_graph });
        self.streams.insert(stream, Member { capture: id, deps, blocking });
        Ok(id)
    }

    /// `true` when `stream` takes part in a capture.
    pub(crate) fn is_capturing(&self, stream: u32) -> bool {
        self.streams.contains_key(&stream)
    }

    fn live(&self, stream: u32) -> CuResult<(&Member, &Capture)> {
        let m = self.streams.get(&stream).ok_or(CuError(ILLEGAL_STATE))?;
        let c = self.captures.get(&m.capture).ok_or(CuError(ILLEGAL_STATE))?;
        if c.invalidated { Err(INVALIDATED) } else { Ok((m, c)) }
    }

    /// Adds `op` to the capture of `stream` after the stream's current
    /// dependencies; the new node becomes its only dependency.
    pub(crate) fn add(&mut self, store: &mut Store, stream: u32, op: Op) -> CuResult<Id> {
        let (m, c) = self.live(stream)?;
        let node = store.add(c.graph, op, &m.deps)?;
        if let Some(m) = self.streams.get_mut(&stream) {
            m.deps = vec![node];
        }
        Ok(node)
    }

    /// An event recorded on a capturing stream remembers where it stood.
    pub(crate) fn record(&mut self, stream: u32, event: usize) -> CuResult {
        let (m, _) = self.live(stream)?;
        let entry = (m.capture, m.deps.clone());
        self.events.insert(event, entry);
        Ok(())
    }

    /// An event recorded outside any capture forgets its captured position.
    pub(crate) fn forget_event(&mut self, event: usize) {
        self.events.remove(&event);
    }

    /// `stream` waits for `event`. Returns `true` when this is capture
    /// business (a join or a fork: no call to send), `false` when the wait
    /// is an ordinary one.
    pub(crate) fn wait(&mut self, stream: u32, blocking: bool, event: usize) -> CuResult<bool> {
        let recorded = self.events.get(&event).cloned();
        match (self.streams.get(&stream).map(|m| m.capture), recorded) {
            (Some(mine), Some((theirs, deps))) => {
                if mine != theirs {
                    self.invalidate(mine);
                    return Err(ISOLATION);
                }
                self.live(stream)?;
                if let Some(m) = self.streams.get_mut(&stream) {
                    for d in deps {
                        if !m.deps.contains(&d) {
                            m.deps.push(d);
                        }
                    }
                }
                Ok(true)
            }
            // A stream joins the capture the event was recorded in (fork).
            (None, Some((theirs, deps))) => {
                if self.captures.get(&theirs).is_some_and(|c| c.invalidated) {
                    return Err(INVALIDATED);
                }
                if stream == StreamId::DEFAULT.0 {
                    self.invalidate(theirs);
                    return Err(IMPLICIT);
                }
                self.streams.insert(stream, Member { capture: theirs, deps, blocking });
                Ok(true)
            }
            // Waiting on an event from outside the capture: a wait node.
            (Some(_), None) => Ok(true),
            (None, None) => Ok(false),
        }
    }

    /// Ends the capture that `stream` started; returns its graph. Every
    /// other stream that joined must have been joined back into `stream`.
    pub(crate) fn end(&mut self, store: &mut Store, stream: u32, thread: ThreadId) -> CuResult<Id> {
        let m = self.streams.get(&stream).ok_or(CuError(ILLEGAL_STATE))?.clone();
        let c = self.captures.get(&m.capture).ok_or(CuError(ILLEGAL_STATE))?;
        if c.origin != stream {
            self.invalidate(m.capture);
            return Err(UNMATCHED);
        }
        if c.mode == MODE_THREAD_LOCAL && c.thread != thread {
            return Err(WRONG_THREAD);
        }
        let (graph, owns, invalidated) = (c.graph, c.owns_graph, c.invalidated);
        let mut result = if invalidated { Err(INVALIDATED) } else { Ok(graph) };
        if result.is_ok() {
            let joined = ancestors(store, &m.deps);
            let unjoined = self
                .streams
                .values()
                .filter(|o| o.capture == m.capture)
                .any(|o| o.deps.iter().any(|d| !joined.contains(d)));
            if unjoined {
                result = Err(UNJOINED);
            }
        }
        self.captures.remove(&m.capture);
        self.streams.retain(|_, o| o.capture != m.capture);
        self.events.retain(|_, (c, _)| *c != m.capture);
        if result.is_err() && owns {
            store.destroy(graph).ok();
        }
        result
    }

    /// Whether `stream` captures into a graph the application gave
    /// (`cuStreamBeginCaptureToGraph`), whose end needs no graph out.
    pub(crate) fn captures_into_app_graph(&self, stream: u32) -> bool {
        self.streams.get(&stream).and_then(|m| self.captures.get(&m.capture)).is_some_and(|c| !c.owns_graph)
    }

    /// Marks a capture invalid: later work on its streams fails and its end
    /// returns no graph.
    pub(crate) fn invalidate(&mut self, capture: u64) {
        if let Some(c) = self.captures.get_mut(&capture) {
            c.invalidated = true;
        }
    }

    /// `cuStreamGetCaptureInfo` for `stream`.
    pub(crate) fn info(&self, stream: u32) -> Info {
        match self.streams.get(&stream) {
            None => Info { status: STATUS_NONE, id: 0, graph: 0, deps: Vec::new() },
            Some(m) => {
                let c = &self.captures[&m.capture];
                let status = if c.invalidated { STATUS_INVALIDATED } else { STATUS_ACTIVE };
                Info { status, id: m.capture, graph: c.graph, deps: m.deps.clone() }
            }
        }
    }

    /// `cuStreamUpdateCaptureDependencies`: add to (`set` false) or replace
    /// the stream's current dependencies.
    pub(crate) fn update_deps(&mut self, store: &Store, stream: u32, deps: &[Id], set: bool) -> CuResult {
        let (_, c) = self.live(stream)?;
        for d in deps {
            if store.graph_of(*d)? != c.graph {
                return Err(CuError::INVALID_VALUE);
            }
        }
        let m = self.streams.get_mut(&stream).ok_or(CuError(ILLEGAL_STATE))?;
        if set {
            m.deps.clear();
        }
        for d in deps {
            if !m.deps.contains(d) {
                m.deps.push(*d);
            }
        }
        Ok(())
    }

    /// Work on the legacy stream while a blocking stream captures would
    /// make the capture depend on it implicitly: CUDA refuses the call and
    /// invalidates the capture.
    pub(crate) fn legacy_use(&mut self) -> CuResult {
        let hit: Vec<u64> = self.streams.values().filter(|m| m.blocking).map(|m| m.capture).collect();
        if hit.is_empty() {
            return Ok(());
        }
        for c in hit {
            self.invalidate(c);
        }
        Err(IMPLICIT)
    }

    /// A potentially unsafe call (a context synchronization, a plain
    /// allocation) made by `thread` in capture interaction mode `mode`:
    /// refused while a GLOBAL capture runs anywhere or a THREAD_LOCAL one
    /// on this thread, unless the thread is RELAXED.
    pub(crate) fn unsafe_call(&mut self, thread: ThreadId, mode: u32, invalidate: bool) -> CuResult {
        if mode == MODE_RELAXED {
            return Ok(());
        }
        let hit: Vec<u64> = self
            .captures
            .iter()
            .filter(|(_, c)| c.mode == MODE_GLOBAL || (c.mode == MODE_THREAD_LOCAL && c.thread == thread))
            .map(|(id, _)| *id)
            .collect();
        if hit.is_empty() {
            return Ok(());
        }
        if invalidate {
            for c in hit {
                self.invalidate(c);
            }
        }
        Err(UNSUPPORTED)
    }

    /// Synchronizing or querying a capturing stream is illegal and
    /// invalidates its capture.
    pub(crate) fn sync_stream(&mut self, stream: u32) -> CuResult {
        if let Some(m) = self.streams.get(&stream) {
            let c = m.capture;
            self.invalidate(c);
            return Err(UNSUPPORTED);
        }
        Ok(())
    }
}

/// `deps` and every node they depend on, transitively.
fn ancestors(store: &Store, deps: &[Id]) -> HashSet<Id> {
    let mut seen: HashSet<Id> = deps.iter().copied().collect();
    let mut stack = deps.to_vec();
    while let Some(n) = stack.pop() {
        if let Ok(node) = store.node(n) {
            for d in &node.deps {
                if seen.insert(*d) {
                    stack.push(*d);
                }
            }
        }
    }
    seen
}

// --- the process-wide state and the one routing helper -------------------

/// Dependency node handles and their (default) edge data, as handed out.
type Exposed = (Box<[usize]>, Box<[[u8; 8]]>);

/// Graphs, executable graphs and captures of the process.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) store: Store,
    pub(crate) captures: Captures,
    /// The dependency and edge arrays last handed out per stream by
    /// `cuStreamGetCaptureInfo` (valid until the next call on the stream).
    exposed: HashMap<u32, Exposed>,
}

static STATE: LazyLock<Mutex<State>> = LazyLock::new(Mutex::default);

/// Captures in progress, readable without the lock: the common case (none)
/// costs one atomic load per stream call.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn publish(st: &State) {
    ACTIVE.store(st.captures.count(), Ordering::Release);
}

thread_local! {
    /// This thread's capture interaction mode (`cuThreadExchangeStreamCaptureMode`).
    static MODE: std::cell::Cell<u32> = const { std::cell::Cell::new(MODE_GLOBAL) };
}

/// Where a stream call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Queue it on this stream as usual.
    Send(StreamId),
    /// Add it as a node to the capture this stream takes part in.
    Capture(u32),
}

/// The one "capturing?" check every stream-taking call makes.
pub(crate) fn route(rt: &Runtime, h: CUstream) -> CuResult<Route> {
    let info = rt.stream_info(h as usize)?;
    if ACTIVE.load(Ordering::Acquire) == 0 {
        return Ok(Route::Send(info.id));
    }
    let mut st = state();
    if st.captures.is_capturing(info.id.0) {
        st.captures.live(info.id.0)?;
        return Ok(Route::Capture(info.id.0));
    }
    if info.id == StreamId::DEFAULT {
        st.captures.legacy_use()?;
    }
    Ok(Route::Send(info.id))
}

/// Adds `op` to the capture of `stream` (a [`Route::Capture`]).
pub(crate) fn add(stream: u32, op: Op) -> CuResult<Id> {
    let st = &mut *state();
    st.captures.add(&mut st.store, stream, op)
}

/// A potentially unsafe call (context synchronization, `cuMemAlloc`,
/// `cuMemFree`) while captures run: see [`Captures::unsafe_call`].
pub(crate) fn check_unsafe(invalidate: bool) -> CuResult {
    if ACTIVE.load(Ordering::Acquire) == 0 {
        return Ok(());
    }
    let mode = MODE.try_with(std::cell::Cell::get).unwrap_or(0);
    state().captures.unsafe_call(std::thread::current().id(), mode, invalidate)
}

/// `cuCtxRecordEvent` and `cuCtxWaitEvent` while a stream captures:
/// refused, and the captures are invalidated (CUDA's rule for a context
/// with a capturing stream; every context here shares the session's one).
pub(crate) fn check_context_event() -> CuResult {
    if ACTIVE.load(Ordering::Acquire) == 0 {
        return Ok(());
    }
    let mut st = state();
    let ids: Vec<u64> = st.captures.captures.keys().copied().collect();
    if ids.is_empty() {
        return Ok(());
    }
    for id in ids {
        st.captures.invalidate(id);
    }
    Err(UNSUPPORTED)
}

/// Synchronizing or querying stream `h`: illegal while it captures.
pub(crate) fn check_sync(rt: &Runtime, h: CUstream) -> CuResult {
    if ACTIVE.load(Ordering::Acquire) == 0 {
        return Ok(());
    }
    let id = rt.stream(h as usize)?;
    let mut st = state();
    st.captures.sync_stream(id.0)?;
    if id == StreamId::DEFAULT {
        st.captures.legacy_use()?;
    }
    Ok(())
}

/// `cuEventRecord` on stream `h`: returns the stream to send the record on,
/// or `None` when the record was captured (`external`: as an event record
/// node, else only as a fork/join point).
pub(crate) fn event_record(rt: &Runtime, event: usize, h: CUstream, external: bool) -> CuResult<Option<StreamId>> {
    match route(rt, h)? {
        Route::Send(s) => {
            if ACTIVE.load(Ordering::Acquire) != 0 {
                state().captures.forget_event(event);
            }
            Ok(Some(s))
        }
        Route::Capture(s) => {
            let st = &mut *state();
            if external {
                st.captures.add(&mut st.store, s, Op::EventRecord(event))?;
            }
            st.captures.record(s, event)?;
            Ok(None)
        }
    }
}

/// `cuStreamWaitEvent`: returns the stream to send the wait on, or `None`
/// when it was capture business (a fork, a join, or a wait node).
pub(crate) fn wait_event(rt: &Runtime, h: CUstream, event: usize, external: bool) -> CuResult<Option<StreamId>> {
    let route = route(rt, h)?;
    if ACTIVE.load(Ordering::Acquire) == 0 {
        return Ok(match route {
            Route::Send(s) => Some(s),
            Route::Capture(_) => None,
        });
    }
    let info = rt.stream_info(h as usize)?;
    let st = &mut *state();
    let blocking = info.flags & 1 == 0;
    let captured_event = st.captures.events.contains_key(&event);
    if !st.captures.wait(info.id.0, blocking, event)? {
        return Ok(Some(info.id));
    }
    if external || (!captured_event && st.captures.is_capturing(info.id.0)) {
        st.captures.add(&mut st.store, info.id.0, Op::EventWait(event))?;
    }
    publish(st);
    Ok(None)
}

/// Ends every trace of a destroyed stream in the captures.
pub(crate) fn forget_stream(id: StreamId) {
    if ACTIVE.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut st = state();
    if let Some(m) = st.captures.streams.get(&id.0).map(|m| m.capture) {
        st.captures.invalidate(m);
    }
    st.exposed.remove(&id.0);
}

fn begin(h: CUstream, mode: c_uint, into: Option<(Id, Vec<Id>)>) -> CuResult {
    let rt = Runtime::with_context()?;
    if h as usize <= 2 {
        tracing::debug!("the legacy default stream cannot be captured");
        return Err(UNSUPPORTED);
    }
    let info = rt.stream_info(h as usize)?;
    let st = &mut *state();
    let thread = std::thread::current().id();
    st.captures.begin(&mut st.store, info.id.0, info.flags & 1 == 0, mode, thread, into)?;
    publish(st);
    Ok(())
}

fn end(h: CUstream, out: *mut CUgraph) -> CuResult {
    let rt = Runtime::with_context()?;
    let id = rt.stream(h as usize)?;
    let st = &mut *state();
    // A capture into the application's graph may end without a graph out
    // (NVIDIA's graphConditionalNodes sample does so).
    if out.is_null() && !st.captures.captures_into_app_graph(id.0) {
        return Err(CuError::INVALID_VALUE);
    }
    let result = st.captures.end(&mut st.store, id.0, std::thread::current().id());
    publish(st);
    st.exposed.remove(&id.0);
    let graph = result?;
    if out.is_null() {
        return Ok(());
    }
    // SAFETY: non-null out-pointer per the CUDA API.
    unsafe { put(out, graph_handle(graph)) }
}

/// Every version of `cuStreamGetCaptureInfo`; each out-pointer but
/// `status` is optional.
fn capture_info(
    h: CUstream,
    status: *mut c_uint,
    id: *mut c_ulonglong,
    graph: *mut CUgraph,
    deps: *mut *const CUgraphNode,
    edges: *mut *const c_void,
    count: *mut usize,
) -> CuResult {
    let rt = Runtime::with_context()?;
    let stream = rt.stream(h as usize)?;
    let mut st = state();
    let info = st.captures.info(stream.0);
    let nodes: Box<[usize]> = info.deps.iter().map(|n| node_handle(*n) as usize).collect();
    let zero_edges: Box<[[u8; 8]]> = vec![[0u8; 8]; nodes.len()].into_boxed_slice();
    let (nodes_ptr, edges_ptr) = {
        let slot = st.exposed.entry(stream.0).or_default();
        *slot = (nodes, zero_edges);
        (slot.0.as_ptr(), slot.1.as_ptr())
    };
    // SAFETY: out-pointers per the CUDA API; the arrays stay alive until
    // the next call for this stream.
    unsafe {
        put(status, info.status)?;
        if info.status == STATUS_NONE {
            return Ok(());
        }
        if !id.is_null() {
            put(id, info.id)?;
        }
        if !graph.is_null() {
            put(graph, graph_handle(info.graph))?;
        }
        if !deps.is_null() {
            put(deps, if info.deps.is_empty() { std::ptr::null() } else { nodes_ptr.cast() })?;
        }
        if !edges.is_null() {
            put(edges, if info.deps.is_empty() { std::ptr::null() } else { edges_ptr.cast() })?;
        }
        if !count.is_null() {
            put(count, info.deps.len())?;
        }
    }
    Ok(())
}

fn is_capturing(h: CUstream, status: *mut c_uint) -> CuResult {
    capture_info(
        h,
        status,
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
}

fn update_deps(h: CUstream, deps: *mut CUgraphNode, edges: *const c_void, n: usize, flags: c_uint) -> CuResult {
    let rt = Runtime::with_context()?;
    let stream = rt.stream(h as usize)?;
    // SAFETY: `n` node handles and optional edge data (CUDA contract).
    let nodes = unsafe { graph_api::node_list(deps, n) }?;
    // SAFETY: as above.
    unsafe { graph_api::check_edge_data(edges, n) }?;
    if flags > 1 {
        return Err(CuError::INVALID_VALUE);
    }
    let st = &mut *state();
    st.captures.update_deps(&st.store, stream.0, &nodes, flags == 1)
}

fn begin_to_graph(
    h: CUstream,
    g: CUgraph,
    deps: *const CUgraphNode,
    edges: *const c_void,
    n: usize,
    mode: c_uint,
) -> CuResult {
    let graph = graph_api::graph_id(g)?;
    // SAFETY: `n` node handles and optional edge data (CUDA contract).
    let nodes = unsafe { graph_api::node_list(deps, n) }?;
    // SAFETY: as above.
    unsafe { graph_api::check_edge_data(edges, n) }?;
    begin(h, mode, Some((graph, nodes)))
}

crate::exports! {
    fn cuStreamBeginCapture_v2(h: CUstream, mode: c_uint) { begin(h, mode, None) }
    fn cuStreamBeginCapture_v2_ptsz(h: CUstream, mode: c_uint) { begin(h, mode, None) }
    fn cuStreamBeginCaptureToGraph(
        h: CUstream, g: CUgraph, deps: *const CUgraphNode, edges: *const c_void, n: usize, mode: c_uint,
    ) {
        begin_to_graph(h, g, deps, edges, n, mode)
    }
    fn cuStreamBeginCaptureToGraph_ptsz(
        h: CUstream, g: CUgraph, deps: *const CUgraphNode, edges: *const c_void, n: usize, mode: c_uint,
    ) {
        begin_to_graph(h, g, deps, edges, n, mode)
    }
    fn cuStreamEndCapture(h: CUstream, graph: *mut CUgraph) { end(h, graph) }
    fn cuStreamEndCapture_ptsz(h: CUstream, graph: *mut CUgraph) { end(h, graph) }

    fn cuStreamIsCapturing(h: CUstream, status: *mut c_uint) { is_capturing(h, status) }
    fn cuStreamIsCapturing_ptsz(h: CUstream, status: *mut c_uint) { is_capturing(h, status) }

    fn cuStreamGetCaptureInfo(h: CUstream, status: *mut c_uint, id: *mut c_ulonglong) {
        let null = std::ptr::null_mut();
        capture_info(h, status, id, null, null.cast(), null.cast(), null.cast())
    }
    fn cuStreamGetCaptureInfo_ptsz(h: CUstream, status: *mut c_uint, id: *mut c_ulonglong) {
        let null = std::ptr::null_mut();
        capture_info(h, status, id, null, null.cast(), null.cast(), null.cast())
    }
    fn cuStreamGetCaptureInfo_v2(
        h: CUstream, status: *mut c_uint, id: *mut c_ulonglong, graph: *mut CUgraph,
        deps: *mut *const CUgraphNode, count: *mut usize,
    ) {
        capture_info(h, status, id, graph, deps, std::ptr::null_mut(), count)
    }
    fn cuStreamGetCaptureInfo_v2_ptsz(
        h: CUstream, status: *mut c_uint, id: *mut c_ulonglong, graph: *mut CUgraph,
        deps: *mut *const CUgraphNode, count: *mut usize,
    ) {
        capture_info(h, status, id, graph, deps, std::ptr::null_mut(), count)
    }
    fn cuStreamGetCaptureInfo_v3(
        h: CUstream, status: *mut c_uint, id: *mut c_ulonglong, graph: *mut CUgraph,
        deps: *mut *const CUgraphNode, edges: *mut *const c_void, count: *mut usize,
    ) {
        capture_info(h, status, id, graph, deps, edges, count)
    }
    fn cuStreamGetCaptureInfo_v3_ptsz(
        h: CUstream, status: *mut c_uint, id: *mut c_ulonglong, graph: *mut CUgraph,
        deps: *mut *const CUgraphNode, edges: *mut *const c_void, count: *mut usize,
    ) {
        capture_info(h, status, id, graph, deps, edges, count)
    }

    fn cuStreamUpdateCaptureDependencies_v2(
        h: CUstream, deps: *mut CUgraphNode, edges: *const c_void, n: usize, flags: c_uint,
    ) {
        update_deps(h, deps, edges, n, flags)
    }
    fn cuStreamUpdateCaptureDependencies_v2_ptsz(
        h: CUstream, deps: *mut CUgraphNode, edges: *const c_void, n: usize, flags: c_uint,
    ) {
        update_deps(h, deps, edges, n, flags)
    }

    /// CUDA 10.0's form, without a mode.
    fn cuStreamBeginCapture(h: CUstream) { begin(h, MODE_GLOBAL, None) }
    fn cuStreamBeginCapture_ptsz(h: CUstream) { begin(h, MODE_GLOBAL, None) }
    /// The pre-CUDA-12.3 form, without edge data.
    fn cuStreamUpdateCaptureDependencies(h: CUstream, deps: *mut CUgraphNode, n: usize, flags: c_uint) {
        update_deps(h, deps, std::ptr::null(), n, flags)
    }
    fn cuStreamUpdateCaptureDependencies_ptsz(h: CUstream, deps: *mut CUgraphNode, n: usize, flags: c_uint) {
        update_deps(h, deps, std::ptr::null(), n, flags)
    }

    fn cuThreadExchangeStreamCaptureMode(mode: *mut c_uint) {
        // SAFETY: in/out pointer per the CUDA API.
        let wanted = unsafe { get(mode) }?;
        if wanted > MODE_RELAXED {
            return Err(CuError::INVALID_VALUE);
        }
        // A thread whose thread-local storage is gone (exiting) keeps GLOBAL.
        let old = MODE.try_with(|m| m.replace(wanted)).unwrap_or(0);
        // SAFETY: as above.
        unsafe { put(mode, old) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Set2D;

    fn set(v: u32) -> Op {
        Op::Memset(Set2D { dst: 0x1000, pitch: 4, value: v, element: 1, width: 4, height: 1 })
    }

    fn me() -> ThreadId {
        std::thread::current().id()
    }

    #[test]
    fn linear_capture_chains_nodes() {
        let (mut s, mut c) = (Store::default(), Captures::default());
        assert_eq!(c.begin(&mut s, 0, true, MODE_GLOBAL, me(), None), Err(UNSUPPORTED), "legacy stream");
        c.begin(&mut s, 5, false, MODE_GLOBAL, me(), None).expect("begin");
        assert!(!c.captures_into_app_graph(5), "a capture of its own graph needs a graph out");
        assert_eq!(c.begin(&mut s, 5, false, MODE_GLOBAL, me(), None), Err(CuError(ILLEGAL_STATE)));
        let a = c.add(&mut s, 5, set(1)).expect("a");
        let b = c.add(&mut s, 5, set(2)).expect("b");
        let info = c.info(5);
        assert_eq!((info.status, info.deps.clone()), (STATUS_ACTIVE, vec![b]));
        let g = c.end(&mut s, 5, me()).expect("end");
        assert_eq!(g, info.graph);
        assert_eq!(s.topological(g).expect("order"), vec![a, b]);
        assert_eq!(s.node(b).expect("b").deps, vec![a]);
        assert_eq!(c.info(5).status, STATUS_NONE);
        assert_eq!(c.count(), 0);
    }

    #[test]
    fn fork_and_join_through_events() {
        let (mut s, mut c) = (Store::default(), Captures::default());
        c.begin(&mut s, 1, false, MODE_THREAD_LOCAL, me(), None).expect("begin");
        let root = c.add(&mut s, 1, set(0)).expect("root");
        c.record(1, 0xE1).expect("fork event");
        // Stream 2 waits: it joins the capture after `root`.
        assert!(c.wait(2, false, 0xE1).expect("fork"));
        assert!(c.is_capturing(2));
        let left = c.add(&mut s, 1, set(1)).expect("left");
        let right = c.add(&mut s, 2, set(2)).expect("right");
        assert_eq!(s.node(right).expect("right").deps, vec![root]);
        // The join: stream 1 waits for an event recorded on stream 2.
        c.record(2, 0xE2).expect("join event");
        assert!(c.wait(1, false, 0xE2).expect("join"));
        let tail = c.add(&mut s, 1, set(3)).expect("tail");
        let g = c.end(&mut s, 1, me()).expect("end");
        assert_eq!(s.node(tail).expect("tail").deps, vec![left, right]);
        assert_eq!(s.roots(g).expect("roots"), vec![root]);
        assert!(!c.is_capturing(2), "the joined stream leaves with the capture");
    }

    #[test]
    fn unjoined_and_unmatched_ends_refused() {
        let (mut s, mut c) = (Store::default(), Captures::default());
        c.begin(&mut s, 1, false, MODE_GLOBAL, me(), None).expect("begin");
        c.record(1, 7).expect("record");
        c.wait(2, false, 7).expect("fork");
        c.add(&mut s, 2, set(9)).expect("work");
        // Ending before the join is refused: stream 2's work would be lost.
        assert_eq!(c.end(&mut s, 1, me()), Err(UNJOINED));
        assert_eq!(c.count(), 0);
        c.begin(&mut s, 1, false, MODE_GLOBAL, me(), None).expect("begin");
        c.record(1, 8).expect("record");
        c.wait(2, false, 8).expect("fork");
        assert_eq!(c.end(&mut s, 2, me()), Err(UNMATCHED), "only the origin ends it");
        assert_eq!(c.end(&mut s, 1, me()), Err(INVALIDATED));
    }

    #[test]
    fn illegal_calls_invalidate() {
        let (mut s, mut c) = (Store::default(), Captures::default());
        c.begin(&mut s, 3, true, MODE_GLOBAL, me(), None).expect("begin");
        c.add(&mut s, 3, set(1)).expect("add");
        assert_eq!(c.unsafe_call(me(), MODE_RELAXED, true), Ok(()), "a relaxed thread may");
        assert_eq!(c.unsafe_call(me(), MODE_GLOBAL, false), Err(UNSUPPORTED));
        assert_eq!(c.info(3).status, STATUS_ACTIVE);
        // The legacy stream would wait for the blocking capturing stream.
        assert_eq!(c.legacy_use(), Err(IMPLICIT));
        assert_eq!(c.info(3).status, STATUS_INVALIDATED);
        assert_eq!(c.add(&mut s, 3, set(2)), Err(INVALIDATED));
        assert_eq!(c.end(&mut s, 3, me()), Err(INVALIDATED));
        assert_eq!(c.count(), 0);
        // Synchronizing a capturing stream.
        c.begin(&mut s, 4, false, MODE_RELAXED, me(), None).expect("begin");
        assert_eq!(c.legacy_use(), Ok(()), "a non-blocking stream does not sync with the legacy one");
        assert_eq!(c.unsafe_call(me(), MODE_GLOBAL, true), Ok(()), "relaxed captures allow it");
        assert_eq!(c.sync_stream(4), Err(UNSUPPORTED));
        assert_eq!(c.end(&mut s, 4, me()), Err(INVALIDATED));
        // Events of another capture cannot be waited on.
        c.begin(&mut s, 5, false, MODE_GLOBAL, me(), None).expect("begin");
        c.begin(&mut s, 6, false, MODE_GLOBAL, me(), None).expect("begin");
        c.record(5, 1).expect("record");
        assert_eq!(c.wait(6, false, 1), Err(ISOLATION));
    }

    #[test]
    fn capture_into_an_existing_graph_and_update_deps() {
        let (mut s, mut c) = (Store::default(), Captures::default());
        let g = s.create();
        let pre = s.add(g, set(0), &[]).expect("pre");
        assert!(!c.captures_into_app_graph(9));
        c.begin(&mut s, 9, false, MODE_GLOBAL, me(), Some((g, vec![pre]))).expect("begin");
        assert!(c.captures_into_app_graph(9), "its end needs no graph out");
        let a = c.add(&mut s, 9, set(1)).expect("a");
        c.update_deps(&s, 9, &[pre], false).expect("add deps");
        let b = c.add(&mut s, 9, set(2)).expect("b");
        assert_eq!(s.node(b).expect("b").deps, vec![a, pre]);
        c.update_deps(&s, 9, &[pre], true).expect("set deps");
        let d = c.add(&mut s, 9, set(3)).expect("d");
        assert_eq!(s.node(d).expect("d").deps, vec![pre]);
        assert_eq!(c.end(&mut s, 9, me()), Ok(g));
        assert_eq!(s.nodes(g).expect("nodes").len(), 4);
    }
}
