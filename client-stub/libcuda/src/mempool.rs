//! The stream-ordered allocator (`cuMemAllocAsync`, memory pools) and
//! graph memory, client-side over the session's ordinary allocations.
//!
//! A pool keeps blocks it got from the session (`Session::mem_alloc`,
//! addresses in the session's reserved range, no round trip). A block
//! freed with `cuMemFreeAsync` on stream S is reused at once by later
//! allocations on S (stream order makes that safe); other streams get it
//! only after a synchronization that covers S. Blocks nobody uses go back
//! to the session at synchronizing calls, down to the pool's release
//! threshold, as CUDA releases them. [`Pool`] is the sans-I/O core.
//!
//! Graph memory (alloc and free nodes) gets its address when the node is
//! created, as CUDA fixes it, and stays mapped while any graph or
//! executable graph holds the node and the application has not freed it.

use crate::abi::{CuError, CuResult, get, put};
use crate::capture::{self, Route};
use crate::graph::Op;
use crate::runtime::Runtime;
use cudarc::driver::sys::{
    CUdevice, CUdeviceptr, CUmemAccessDesc, CUmemLocation, CUmemPoolProps, CUmemoryPool, CUstream,
};
use gpupool_client::StreamId;
use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::{LazyLock, Mutex, MutexGuard};

/// Block sizes are kept in these units, so near sizes share blocks.
const UNIT: u64 = 512;
const OUT_OF_MEMORY: CuError = CuError(2);

/// A block a pool holds that nobody uses; `stream` is where it was freed
/// until a synchronization covers that stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FreeBlock {
    addr: u64,
    size: u64,
    stream: Option<u32>,
    /// The number of this free among those on `stream` (see [`Order`]).
    seq: u64,
}

/// What each stream is known to have waited for, from event records and
/// waits outside captures: a block freed on S is safe for stream T once T
/// waited on an event recorded on S after the free
/// (REUSE_FOLLOW_EVENT_DEPENDENCIES).
#[derive(Debug, Default)]
pub(crate) struct Order {
    /// Frees so far per stream.
    frees: HashMap<u32, u64>,
    /// Event -> (stream it was recorded on, frees on it by then).
    marks: HashMap<usize, (u32, u64)>,
    /// (waiting stream, freeing stream) -> frees it is ordered after.
    known: HashMap<(u32, u32), u64>,
}

impl Order {
    /// Counts a free on `stream`; returns its number.
    pub(crate) fn next_free(&mut self, stream: u32) -> u64 {
        let c = self.frees.entry(stream).or_default();
        *c += 1;
        *c
    }

    pub(crate) fn record(&mut self, event: usize, stream: u32) {
        let q = self.frees.get(&stream).copied().unwrap_or(0);
        self.marks.insert(event, (stream, q));
    }

    pub(crate) fn wait(&mut self, stream: u32, event: usize) {
        if let Some(&(src, q)) = self.marks.get(&event)
            && src != stream
        {
            let k = self.known.entry((stream, src)).or_default();
            *k = (*k).max(q);
        }
    }

    /// `true` when work queued on `stream` now runs after free `seq` of `src`.
    pub(crate) fn covers(&self, stream: u32, src: u32, seq: u64) -> bool {
        self.known.get(&(stream, src)).is_some_and(|k| *k >= seq)
    }
}

/// One memory pool.
#[derive(Debug, Clone)]
pub(crate) struct Pool {
    pub(crate) threshold: u64,
    /// REUSE_FOLLOW_EVENT_DEPENDENCIES, ALLOW_OPPORTUNISTIC, ALLOW_INTERNAL_DEPENDENCIES.
    pub(crate) reuse: [bool; 3],
    pub(crate) reserved: u64,
    pub(crate) reserved_high: u64,
    pub(crate) used: u64,
    pub(crate) used_high: u64,
    live: HashMap<u64, u64>,
    free: Vec<FreeBlock>,
    /// Destroyed by the application; kept until its last block is freed.
    destroyed: bool,
}

impl Default for Pool {
    fn default() -> Self {
        Self {
            threshold: 0,
            reuse: [true; 3],
            reserved: 0,
            reserved_high: 0,
            used: 0,
            used_high: 0,
            live: HashMap::new(),
            free: Vec::new(),
            destroyed: false,
        }
    }
}

/// `size` in whole units.
pub(crate) fn block_size(size: u64) -> u64 {
    size.div_ceil(UNIT).max(1) * UNIT
}

impl Pool {
    /// A free block for `size` bytes on `stream`: one freed on that stream
    /// or released to all; the smallest that fits and wastes at most half.
    pub(crate) fn take(&mut self, size: u64, stream: u32, order: &Order) -> Option<u64> {
        let need = block_size(size);
        let follow = self.reuse[0];
        let usable = |b: &FreeBlock| match b.stream {
            None => true,
            Some(s) => s == stream || (follow && order.covers(stream, s, b.seq)),
        };
        let (i, _) = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.size >= need && b.size <= need * 2 && usable(b))
            .min_by_key(|(_, b)| (b.size, b.stream.is_none()))?;
        let b = self.free.swap_remove(i);
        self.live.insert(b.addr, b.size);
        self.used += b.size;
        self.used_high = self.used_high.max(self.used);
        Some(b.addr)
    }

    /// Records a new block from the session, in use.
    pub(crate) fn add_block(&mut self, addr: u64, size: u64) {
        self.live.insert(addr, size);
        self.reserved += size;
        self.used += size;
        self.reserved_high = self.reserved_high.max(self.reserved);
        self.used_high = self.used_high.max(self.used);
    }

    /// Frees a block in stream order on `stream` (`None`: after a
    /// synchronization, free for every stream).
    pub(crate) fn free(&mut self, addr: u64, stream: Option<u32>, seq: u64) -> CuResult {
        let size = self.live.remove(&addr).ok_or(CuError::INVALID_VALUE)?;
        self.used -= size;
        self.free.push(FreeBlock { addr, size, stream, seq });
        Ok(())
    }

    /// A synchronization covered `stream` (`None`: every stream).
    pub(crate) fn synced(&mut self, stream: Option<u32>) {
        for b in &mut self.free {
            if stream.is_none() || b.stream == stream {
                b.stream = None;
            }
        }
    }

    /// Gives blocks free for every stream back until at most `keep` bytes
    /// stay reserved; returns the blocks to free in the session.
    pub(crate) fn release(&mut self, keep: u64) -> Vec<u64> {
        let mut gone = Vec::new();
        // Largest first: fewest calls to get under the limit.
        self.free.sort_by_key(|b| (b.stream.is_none(), b.size));
        while self.reserved > keep {
            match self.free.last() {
                Some(b) if b.stream.is_none() => {
                    self.reserved -= b.size;
                    gone.push(b.addr);
                    self.free.pop();
                }
                _ => break,
            }
        }
        gone
    }

    /// `true` when the pool holds nothing any more.
    fn empty(&self) -> bool {
        self.live.is_empty() && self.free.is_empty()
    }
}

/// A graph allocation.
#[derive(Debug, Clone, Copy)]
struct GraphBlock {
    size: u64,
    /// Operations (in graphs and executable graphs) that name it.
    refs: u32,
    /// Freed by a free node or by the application.
    freed: bool,
}

#[derive(Debug, Default)]
struct State {
    pools: HashMap<u64, Pool>,
    /// The pool `cuMemAllocAsync` uses (`cuDeviceSetMemPool`).
    current: u64,
    /// Which pool each live or cached block belongs to.
    owner: HashMap<u64, u64>,
    order: Order,
    next: u64,
    graph: HashMap<u64, GraphBlock>,
    graph_used_high: u64,
    graph_reserved_high: u64,
}

/// The device's default pool.
const DEFAULT_POOL: u64 = 1;

static STATE: LazyLock<Mutex<State>> = LazyLock::new(|| {
    let mut s = State { current: DEFAULT_POOL, next: DEFAULT_POOL, ..State::default() };
    s.pools.insert(DEFAULT_POOL, Pool::default());
    Mutex::new(s)
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl State {
    fn pool(&mut self, id: u64) -> CuResult<&mut Pool> {
        self.pools.get_mut(&id).filter(|p| !p.destroyed).ok_or(CuError::INVALID_VALUE)
    }

    fn graph_totals(&self) -> u64 {
        self.graph.values().map(|b| b.size).sum()
    }
}

// --- handles ---------------------------------------------------------------

const POOL_TAG: u64 = 0x33;

fn pool_handle(id: u64) -> CUmemoryPool {
    ((POOL_TAG << 40) | id) as CUmemoryPool
}

fn pool_id(h: CUmemoryPool) -> CuResult<u64> {
    let v = h as u64;
    if v >> 40 == POOL_TAG { Ok(v & ((1 << 40) - 1)) } else { Err(CuError::INVALID_VALUE) }
}

// --- what other modules call ----------------------------------------------

/// Gives `addrs` back to the session.
fn give_back(rt: &Runtime, addrs: Vec<u64>) -> CuResult {
    for a in addrs {
        rt.session.mem_free(a)?;
    }
    Ok(())
}

/// A synchronizing call covered `stream` (`None`: the whole context):
/// blocks freed there become free for every stream, and pools above their
/// release threshold give memory back.
pub(crate) fn synced(rt: &Runtime, stream: Option<StreamId>) -> CuResult {
    let gone = {
        let mut st = state();
        let mut gone = Vec::new();
        for (id, p) in st.pools.iter_mut() {
            p.synced(stream.map(|s| s.0));
            let keep = if p.destroyed { 0 } else { p.threshold };
            for a in p.release(keep) {
                gone.push((*id, a));
            }
        }
        for (_, a) in &gone {
            st.owner.remove(a);
        }
        st.pools.retain(|_, p| !(p.destroyed && p.empty()));
        gone.into_iter().map(|(_, a)| a).collect()
    };
    give_back(rt, gone)
}

fn alloc_in(rt: &Runtime, pool: u64, size: u64, stream: StreamId) -> CuResult<u64> {
    if size == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    {
        let st = &mut *state();
        st.pool(pool)?;
        let p = st.pools.get_mut(&pool).ok_or(CuError::INVALID_VALUE)?;
        if let Some(addr) = p.take(size, stream.0, &st.order) {
            return Ok(addr);
        }
    }
    let bytes = block_size(size);
    let addr = match rt.session.mem_alloc(bytes) {
        Ok(a) => a,
        Err(e) if e.code() == OUT_OF_MEMORY.0 => {
            // Cached blocks of every pool may make room: wait for the
            // device so that blocks still pending on a stream count too.
            rt.session.synchronize()?;
            let gone: Vec<u64> = {
                let mut st = state();
                let gone: Vec<u64> = st
                    .pools
                    .values_mut()
                    .flat_map(|p| {
                        p.synced(None);
                        p.release(0)
                    })
                    .collect();
                for a in &gone {
                    st.owner.remove(a);
                }
                gone
            };
            give_back(rt, gone)?;
            rt.session.mem_alloc(bytes)?
        }
        Err(e) => return Err(e.into()),
    };
    let mut st = state();
    st.pool(pool)?.add_block(addr, bytes);
    st.owner.insert(addr, pool);
    Ok(addr)
}

/// `cuMemFree` of a pool or graph allocation (allowed by CUDA): waits for
/// the device, then frees. Returns `false` for other addresses.
pub(crate) fn free_sync(rt: &Runtime, addr: u64) -> CuResult<bool> {
    let owned = {
        let st = state();
        st.owner.contains_key(&addr) || st.graph.contains_key(&addr)
    };
    if !owned {
        return Ok(false);
    }
    rt.session.synchronize()?;
    free_ordered(rt, addr, None)?;
    synced(rt, None)?;
    Ok(true)
}

/// Frees `addr` in stream order on `stream` (`None`: already synchronized).
fn free_ordered(rt: &Runtime, addr: u64, stream: Option<StreamId>) -> CuResult {
    let mut st = state();
    if let Some(&pool) = st.owner.get(&addr) {
        let seq = stream.map_or(0, |s| st.order.next_free(s.0));
        return st.pools.get_mut(&pool).ok_or(CuError::INVALID_VALUE)?.free(addr, stream.map(|s| s.0), seq);
    }
    if let Some(b) = st.graph.get_mut(&addr) {
        b.freed = true;
        let gone = graph_collect(&mut st);
        drop(st);
        return give_back(rt, gone);
    }
    drop(st);
    // Memory from cuMemAlloc may be freed this way too.
    rt.session.mem_free(addr).map_err(CuError::from)
}

/// An event was recorded on `stream` (outside any capture).
pub(crate) fn event_recorded(event: usize, stream: StreamId) {
    state().order.record(event, stream.0);
}

/// `stream` waits for `event` (outside any capture).
pub(crate) fn event_waited(stream: StreamId, event: usize) {
    state().order.wait(stream.0, event);
}

/// Allocates graph memory for an alloc node (its address is fixed now).
pub(crate) fn graph_alloc(rt: &Runtime, size: u64) -> CuResult<u64> {
    if size == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let addr = rt.session.mem_alloc(block_size(size))?;
    let mut st = state();
    st.graph.insert(addr, GraphBlock { size: block_size(size), refs: 1, freed: false });
    let total = st.graph_totals();
    st.graph_used_high = st.graph_used_high.max(total);
    st.graph_reserved_high = st.graph_reserved_high.max(total);
    Ok(addr)
}

/// A free node for `addr`: it must be graph memory.
pub(crate) fn graph_free_node(addr: u64) -> CuResult {
    let mut st = state();
    let b = st.graph.get_mut(&addr).ok_or(CuError::INVALID_VALUE)?;
    b.freed = true;
    Ok(())
}

/// Operations were copied into a graph or an executable graph.
pub(crate) fn hold(ops: &[Op]) {
    let mut st = state();
    for op in ops {
        if let Op::MemAlloc { addr, .. } = op
            && let Some(b) = st.graph.get_mut(addr)
        {
            b.refs += 1;
        }
    }
}

/// Operations went away with a graph, node or executable graph.
pub(crate) fn let_go(rt: &Runtime, ops: &[Op]) -> CuResult {
    let gone = {
        let mut st = state();
        for op in ops {
            if let Op::MemAlloc { addr, .. } = op
                && let Some(b) = st.graph.get_mut(addr)
            {
                b.refs = b.refs.saturating_sub(1);
            }
        }
        graph_collect(&mut st)
    };
    give_back(rt, gone)
}

fn graph_collect(st: &mut State) -> Vec<u64> {
    let gone: Vec<u64> = st.graph.iter().filter(|(_, b)| b.refs == 0 && b.freed).map(|(a, _)| *a).collect();
    for a in &gone {
        st.graph.remove(a);
    }
    gone
}

// --- exports ----------------------------------------------------------------

fn alloc_async(dptr: *mut CUdeviceptr, size: usize, pool: Option<u64>, h: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    if dptr.is_null() || size == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let addr = match capture::route(rt, h)? {
        Route::Send(s) => {
            let pool = match pool {
                Some(p) => p,
                None => state().current,
            };
            alloc_in(rt, pool, size as u64, s)?
        }
        Route::Capture(s) => {
            if let Some(p) = pool {
                state().pool(p)?;
            }
            let addr = graph_alloc(rt, size as u64)?;
            capture::add(s, Op::MemAlloc { addr, size: size as u64 })?;
            addr
        }
    };
    // SAFETY: non-null out-pointer per the CUDA API.
    unsafe { put(dptr, addr) }
}

fn free_async(addr: CUdeviceptr, h: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    match capture::route(rt, h)? {
        Route::Send(s) => {
            if addr == 0 {
                return Ok(());
            }
            free_ordered(rt, addr, Some(s))
        }
        Route::Capture(s) => {
            graph_free_node(addr)?;
            capture::add(s, Op::MemFree { addr }).map(drop)
        }
    }
}

/// `CUmemPoolProps`, the fields gpupool reads.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PoolProps {
    alloc_type: u32,
    handle_types: u32,
    location_type: u32,
    location_id: c_int,
}

/// Pools here hold pinned device memory of device 0, not exportable.
fn check_props(p: &PoolProps) -> CuResult {
    if p.alloc_type != 1 || p.location_type != 1 || p.location_id != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    if p.handle_types != 0 {
        tracing::debug!(handle_types = p.handle_types, "exportable memory pools are not supported by gpupool");
        return Err(CuError::NOT_SUPPORTED);
    }
    Ok(())
}

/// A `CUmemLocation` for device 0 (`type` DEVICE = 1).
fn check_location(loc: *const CUmemLocation) -> CuResult {
    // SAFETY: a CUmemLocation (two ints) per the CUDA API.
    let [kind, id] = unsafe { get(loc.cast::<[c_int; 2]>()) }?;
    if kind == 1 && id == 0 { Ok(()) } else { Err(CuError::INVALID_VALUE) }
}

fn get_attribute(pool: CUmemoryPool, attr: c_uint, value: *mut c_void) -> CuResult {
    Runtime::get()?;
    let id = pool_id(pool)?;
    let mut st = state();
    let p = st.pool(id)?;
    // SAFETY: `value` holds the attribute's type per the CUDA API.
    unsafe {
        match attr {
            1..=3 => put(value.cast::<c_int>(), c_int::from(p.reuse[attr as usize - 1])),
            4 => put(value.cast::<u64>(), p.threshold),
            5 => put(value.cast::<u64>(), p.reserved),
            6 => put(value.cast::<u64>(), p.reserved_high),
            7 => put(value.cast::<u64>(), p.used),
            8 => put(value.cast::<u64>(), p.used_high),
            9 => put(value.cast::<c_int>(), 1),  // ALLOCATION_TYPE: pinned
            10 => put(value.cast::<c_int>(), 0), // EXPORT_HANDLE_TYPES: none
            11 => put(value.cast::<c_int>(), 0), // LOCATION_ID: device 0
            12 => put(value.cast::<c_int>(), 1), // LOCATION_TYPE: device
            13 => put(value.cast::<u64>(), 0),   // MAX_POOL_SIZE: no limit
            _ => Err(CuError::INVALID_VALUE),
        }
    }
}

fn set_attribute(pool: CUmemoryPool, attr: c_uint, value: *mut c_void) -> CuResult {
    Runtime::get()?;
    let id = pool_id(pool)?;
    let mut st = state();
    let p = st.pool(id)?;
    // SAFETY: `value` holds the attribute's type per the CUDA API.
    unsafe {
        match attr {
            1..=3 => p.reuse[attr as usize - 1] = get(value.cast::<c_int>())? != 0,
            4 => p.threshold = get(value.cast::<u64>())?,
            6 | 8 => {
                if get(value.cast::<u64>())? != 0 {
                    return Err(CuError::INVALID_VALUE);
                }
                if attr == 6 {
                    p.reserved_high = p.reserved;
                } else {
                    p.used_high = p.used;
                }
            }
            _ => return Err(CuError::INVALID_VALUE),
        }
    }
    Ok(())
}

fn trim_to(pool: CUmemoryPool, keep: usize) -> CuResult {
    let rt = Runtime::with_context()?;
    let id = pool_id(pool)?;
    let gone = {
        let mut st = state();
        let gone = st.pool(id)?.release(keep as u64);
        for a in &gone {
            st.owner.remove(a);
        }
        gone
    };
    give_back(rt, gone)
}

fn graph_mem_attribute(dev: CUdevice, attr: c_uint, value: *mut c_void, set: bool) -> CuResult {
    Runtime::get()?;
    crate::device::check_device(dev)?;
    let mut st = state();
    let total = st.graph_totals();
    if set {
        // SAFETY: a cuuint64_t per the CUDA API.
        if unsafe { get(value.cast::<u64>()) }? != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        match attr {
            1 => st.graph_used_high = total,
            3 => st.graph_reserved_high = total,
            _ => return Err(CuError::INVALID_VALUE),
        }
        return Ok(());
    }
    let v = match attr {
        0 | 2 => total,
        1 => st.graph_used_high,
        3 => st.graph_reserved_high,
        _ => return Err(CuError::INVALID_VALUE),
    };
    // SAFETY: a cuuint64_t per the CUDA API.
    unsafe { put(value.cast::<u64>(), v) }
}

fn not_exportable(what: &str) -> CuResult {
    tracing::debug!("{what}: memory pools cannot be shared with other processes through gpupool");
    Err(CuError::NOT_SUPPORTED)
}

crate::exports! {
    fn cuMemAllocAsync(dptr: *mut CUdeviceptr, size: usize, h: CUstream) { alloc_async(dptr, size, None, h) }
    fn cuMemAllocAsync_ptsz(dptr: *mut CUdeviceptr, size: usize, h: CUstream) { alloc_async(dptr, size, None, h) }
    fn cuMemAllocFromPoolAsync(dptr: *mut CUdeviceptr, size: usize, pool: CUmemoryPool, h: CUstream) {
        alloc_async(dptr, size, Some(pool_id(pool)?), h)
    }
    fn cuMemAllocFromPoolAsync_ptsz(dptr: *mut CUdeviceptr, size: usize, pool: CUmemoryPool, h: CUstream) {
        alloc_async(dptr, size, Some(pool_id(pool)?), h)
    }
    fn cuMemFreeAsync(dptr: CUdeviceptr, h: CUstream) { free_async(dptr, h) }
    fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, h: CUstream) { free_async(dptr, h) }

    fn cuDeviceGetDefaultMemPool(pool: *mut CUmemoryPool, dev: CUdevice) {
        Runtime::get()?;
        crate::device::check_device(dev)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pool, pool_handle(DEFAULT_POOL)) }
    }

    fn cuDeviceGetMemPool(pool: *mut CUmemoryPool, dev: CUdevice) {
        Runtime::get()?;
        crate::device::check_device(dev)?;
        let current = state().current;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pool, pool_handle(current)) }
    }

    fn cuDeviceSetMemPool(dev: CUdevice, pool: CUmemoryPool) {
        Runtime::get()?;
        crate::device::check_device(dev)?;
        let id = pool_id(pool)?;
        let mut st = state();
        st.pool(id)?;
        st.current = id;
        Ok(())
    }

    /// CUDA 13's location-based forms: device 0's pinned pool.
    fn cuMemGetDefaultMemPool(pool: *mut CUmemoryPool, location: *const CUmemLocation, kind: c_uint) {
        Runtime::get()?;
        check_location(location)?;
        if kind != 1 {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pool, pool_handle(DEFAULT_POOL)) }
    }

    fn cuMemGetMemPool(pool: *mut CUmemoryPool, location: *const CUmemLocation, kind: c_uint) {
        Runtime::get()?;
        check_location(location)?;
        if kind != 1 {
            return Err(CuError::INVALID_VALUE);
        }
        let current = state().current;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pool, pool_handle(current)) }
    }

    fn cuMemSetMemPool(location: *const CUmemLocation, kind: c_uint, pool: CUmemoryPool) {
        Runtime::get()?;
        check_location(location)?;
        if kind != 1 {
            return Err(CuError::INVALID_VALUE);
        }
        let id = pool_id(pool)?;
        let mut st = state();
        st.pool(id)?;
        st.current = id;
        Ok(())
    }

    fn cuMemPoolCreate(pool: *mut CUmemoryPool, props: *const CUmemPoolProps) {
        Runtime::get()?;
        // SAFETY: a CUmemPoolProps, whose first fields `PoolProps` mirrors.
        let p = unsafe { get(props.cast::<PoolProps>()) }?;
        check_props(&p)?;
        if pool.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let mut st = state();
        st.next += 1;
        let id = st.next;
        st.pools.insert(id, Pool::default());
        // SAFETY: non-null out-pointer per the CUDA API.
        unsafe { put(pool, pool_handle(id)) }
    }

    /// Blocks still in use stay valid; the pool goes when they are freed.
    fn cuMemPoolDestroy(pool: CUmemoryPool) {
        let rt = Runtime::get()?;
        let id = pool_id(pool)?;
        if id == DEFAULT_POOL {
            return Err(CuError::INVALID_VALUE);
        }
        let gone = {
            let mut st = state();
            let p = st.pool(id)?;
            p.destroyed = true;
            let gone = p.release(0);
            for a in &gone {
                st.owner.remove(a);
            }
            if st.current == id {
                st.current = DEFAULT_POOL;
            }
            st.pools.retain(|_, p| !(p.destroyed && p.empty()));
            gone
        };
        give_back(rt, gone)
    }

    fn cuMemPoolGetAttribute(pool: CUmemoryPool, attr: c_uint, value: *mut c_void) { get_attribute(pool, attr, value) }
    fn cuMemPoolSetAttribute(pool: CUmemoryPool, attr: c_uint, value: *mut c_void) { set_attribute(pool, attr, value) }
    fn cuMemPoolTrimTo(pool: CUmemoryPool, keep: usize) { trim_to(pool, keep) }

    /// One device: it always has read-write access to its own pools.
    fn cuMemPoolSetAccess(pool: CUmemoryPool, map: *const CUmemAccessDesc, count: usize) {
        Runtime::get()?;
        state().pool(pool_id(pool)?)?;
        for i in 0..count {
            // SAFETY: `count` CUmemAccessDesc (location, flags) per the CUDA API.
            let [kind, id, flags] = unsafe { get(map.add(i).cast::<[c_int; 3]>()) }?;
            if kind != 1 || id != 0 || flags != 3 {
                return Err(CuError::INVALID_VALUE);
            }
        }
        Ok(())
    }

    fn cuMemPoolGetAccess(flags: *mut c_uint, pool: CUmemoryPool, location: *const CUmemLocation) {
        Runtime::get()?;
        state().pool(pool_id(pool)?)?;
        check_location(location)?;
        // SAFETY: out-pointer per the CUDA API. READWRITE = 3.
        unsafe { put(flags, 3) }
    }

    fn cuMemPoolExportToShareableHandle() { not_exportable("cuMemPoolExportToShareableHandle") }
    fn cuMemPoolImportFromShareableHandle() { not_exportable("cuMemPoolImportFromShareableHandle") }
    fn cuMemPoolExportPointer() { not_exportable("cuMemPoolExportPointer") }
    fn cuMemPoolImportPointer() { not_exportable("cuMemPoolImportPointer") }

    fn cuDeviceGetGraphMemAttribute(dev: CUdevice, attr: c_uint, value: *mut c_void) {
        graph_mem_attribute(dev, attr, value, false)
    }
    fn cuDeviceSetGraphMemAttribute(dev: CUdevice, attr: c_uint, value: *mut c_void) {
        graph_mem_attribute(dev, attr, value, true)
    }
    /// Graph memory is given back as soon as nothing holds it: nothing is
    /// cached to trim.
    fn cuDeviceGraphMemTrim(dev: CUdevice) {
        Runtime::get()?;
        crate::device::check_device(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_stream_reuse_at_once_others_after_sync() {
        let o = Order::default();
        let mut p = Pool::default();
        p.add_block(0x1000, block_size(1000));
        assert_eq!((p.used, p.reserved), (1024, 1024));
        p.free(0x1000, Some(1), 1).expect("free");
        assert_eq!(p.used, 0);
        assert_eq!(p.take(1000, 2, &o), None, "stream 2 must not see stream 1's free before a sync");
        assert_eq!(p.take(900, 1, &o), Some(0x1000), "stream order makes reuse on stream 1 safe");
        p.free(0x1000, Some(1), 1).expect("free");
        p.synced(Some(3));
        assert_eq!(p.take(1000, 2, &o), None, "a sync of another stream does not cover it");
        p.synced(Some(1));
        assert_eq!(p.take(1000, 2, &o), Some(0x1000));
        assert_eq!(p.free(0x9999, None, 0), Err(CuError::INVALID_VALUE));
        assert_eq!(p.used_high, 1024);
    }

    #[test]
    fn reuse_follows_event_dependencies() {
        let mut o = Order::default();
        let mut p = Pool::default();
        p.add_block(0x1000, 1024);
        o.record(0xE0, 1); // before the frees: orders nothing
        let early = o.next_free(1);
        p.add_block(0x2000, 1024);
        p.free(0x1000, Some(1), early).expect("free");
        o.wait(2, 0xE0);
        let late = o.next_free(1);
        p.free(0x2000, Some(1), late).expect("free");
        assert_eq!(p.take(1000, 2, &o), None, "stream 2 waited on nothing recorded after the frees");
        o.record(0xE1, 1);
        o.wait(2, 0xE1);
        assert!(o.covers(2, 1, late) && !o.covers(3, 1, early));
        assert!(p.take(1000, 2, &o).is_some());
        assert!(p.take(1000, 2, &o).is_some(), "both frees came before the record");
        // With the reuse flag off, only a synchronization helps.
        p.free(0x1000, Some(1), o.next_free(1)).expect("free");
        o.record(0xE2, 1);
        o.wait(2, 0xE2);
        p.reuse[0] = false;
        assert_eq!(p.take(1000, 2, &o), None);
    }

    #[test]
    fn release_threshold_and_trim() {
        let o = Order::default();
        let mut p = Pool::default();
        for i in 0..4u64 {
            p.add_block(0x10_0000 * (i + 1), 1 << 20);
        }
        for i in 0..3u64 {
            p.free(0x10_0000 * (i + 1), Some(1), i + 1).expect("free");
        }
        assert!(p.release(0).is_empty(), "pending frees are not released");
        p.synced(None);
        p.threshold = 2 << 20;
        let gone = p.release(p.threshold);
        assert_eq!(gone.len(), 2, "down to the threshold: 4 MiB reserved, keep 2");
        assert_eq!(p.reserved, 2 << 20);
        assert_eq!(p.release(0).len(), 1, "trim keeps only what is in use");
        assert_eq!((p.reserved, p.used, p.reserved_high), (1 << 20, 1 << 20, 4 << 20));
        // Too large a block is not handed out for a small request.
        p.free(0x40_0000, None, 0).expect("free");
        assert_eq!(p.take(1000, 1, &o), None);
        assert_eq!(p.take(600 << 10, 1, &o), Some(0x40_0000));
    }
}
