//! The C-ABI layer of CUDA graphs over the core in [`crate::graph`]:
//! handles, the driver's parameter structs, and the replay of an
//! executable graph as ordinary queued calls on the launch stream.
//!
//! `CUgraph`, `CUgraphNode` and `CUgraphExec` are tagged integers like the
//! other handles (kinds 0x30–0x32 in bits 40–47), looked up in the store
//! before use: a stale or forged one is `CUDA_ERROR_INVALID_VALUE`, as
//! CUDA answers for graph objects, never a read through a wild pointer.

use crate::abi::{CuError, CuResult, c_str, get, put};
use crate::capture::{self, Route, state};
use crate::graph::{Copy3D, EdgeData, End, Id, Kernel, Op, Set2D, check_conditional, kind, update};
use crate::runtime::Runtime;
use crate::{launch, mempool};
use cudarc::driver::sys::{
    CUDA_CONDITIONAL_NODE_PARAMS, CUDA_GRAPH_INSTANTIATE_PARAMS, CUDA_HOST_NODE_PARAMS, CUDA_KERNEL_NODE_PARAMS,
    CUDA_MEM_ALLOC_NODE_PARAMS, CUDA_MEMCPY3D, CUDA_MEMSET_NODE_PARAMS, CUcontext, CUdeviceptr, CUevent, CUgraph,
    CUgraphConditionalHandle, CUgraphExec, CUgraphExecUpdateResultInfo, CUgraphNode, CUgraphNodeParams, CUstream,
};
use gpupool_client::{LaunchConfig, StreamId};
use gpupool_proto::v1 as wire;
use std::collections::HashMap;
use std::ffi::{c_char, c_uint, c_void};
use std::sync::{LazyLock, Mutex};

const TAG_SHIFT: u32 = 40;
const GRAPH_TAG: u64 = 0x30;
const NODE_TAG: u64 = 0x31;
const EXEC_TAG: u64 = 0x32;

fn encode(tag: u64, id: Id) -> usize {
    ((tag << TAG_SHIFT) | (id & ((1 << TAG_SHIFT) - 1))) as usize
}

fn decode(tag: u64, h: usize) -> CuResult<Id> {
    let v = h as u64;
    if v >> TAG_SHIFT == tag { Ok(v & ((1 << TAG_SHIFT) - 1)) } else { Err(CuError::INVALID_VALUE) }
}

pub(crate) fn graph_handle(id: Id) -> CUgraph {
    encode(GRAPH_TAG, id) as CUgraph
}

pub(crate) fn graph_id(h: CUgraph) -> CuResult<Id> {
    decode(GRAPH_TAG, h as usize)
}

pub(crate) fn node_handle(id: Id) -> CUgraphNode {
    encode(NODE_TAG, id) as CUgraphNode
}

pub(crate) fn node_id(h: CUgraphNode) -> CuResult<Id> {
    decode(NODE_TAG, h as usize)
}

fn exec_handle(id: Id) -> CUgraphExec {
    encode(EXEC_TAG, id) as CUgraphExec
}

fn exec_id(h: CUgraphExec) -> CuResult<Id> {
    decode(EXEC_TAG, h as usize)
}

/// `n` node handles from the application.
///
/// # Safety
/// `p` is null (then `n` must be 0) or holds `n` handles.
pub(crate) unsafe fn node_list(p: *const CUgraphNode, n: usize) -> CuResult<Vec<Id>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: `n` handles (contract above).
    unsafe { std::slice::from_raw_parts(p, n) }.iter().map(|h| node_id(*h)).collect()
}

/// Edge data where only the default edge (full dependency, port 0) is
/// taken: dependencies of a stream capture.
///
/// # Safety
/// `p` is null or holds `n` entries.
pub(crate) unsafe fn check_edge_data(p: *const c_void, n: usize) -> CuResult {
    // SAFETY: forwarded contract.
    let entries = unsafe { read_edge_data(p, n) }?;
    if entries.iter().any(|e| *e != EdgeData::default()) {
        tracing::debug!("stream capture dependencies other than the default are not supported");
        return Err(CuError::NOT_SUPPORTED);
    }
    Ok(())
}

// `CUgraphEdgeData` fields: its bytes in order.
const EDGE_FROM_PORT: usize = 0;
const EDGE_TO_PORT: usize = 1;
const EDGE_TYPE: usize = 2;
/// `CU_GRAPH_KERNEL_NODE_PORT_LAUNCH_ORDER`, the last port a kernel node
/// defines (`_DEFAULT` 0, `_PROGRAMMATIC` 1).
const PORT_LAUNCH_ORDER: u8 = 2;
/// `CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC` (`_DEFAULT` 0).
const TYPE_PROGRAMMATIC: u8 = 1;

/// `n` edge data entries (`CUgraphEdgeData`, 8 bytes each; null: all the
/// default), checked against CUDA's rules on their own: no port into a
/// node, ports of kernel nodes only, a programmatic edge from a port other
/// than the default, reserved bytes zero. Whether the nodes are kernels is
/// [`check_edge_kinds`]'s.
///
/// # Safety
/// `p` is null or holds `n` entries.
pub(crate) unsafe fn read_edge_data(p: *const c_void, n: usize) -> CuResult<Vec<EdgeData>> {
    if p.is_null() {
        return Ok(vec![EdgeData::default(); n]);
    }
    // SAFETY: `n` 8-byte entries (contract above).
    let entries = unsafe { std::slice::from_raw_parts(p.cast::<EdgeData>(), n) }.to_vec();
    for e in &entries {
        let programmatic = e[EDGE_TYPE] == TYPE_PROGRAMMATIC;
        if e[EDGE_TO_PORT] != 0
            || e[EDGE_FROM_PORT] > PORT_LAUNCH_ORDER
            || e[EDGE_TYPE] > TYPE_PROGRAMMATIC
            || (programmatic && e[EDGE_FROM_PORT] == 0)
            || e[3..].iter().any(|b| *b != 0)
        {
            return Err(CuError::INVALID_VALUE);
        }
    }
    Ok(entries)
}

/// Whether edge data `e` fits its ends: an edge other than the default
/// starts at a kernel node, and a programmatic one ends at one too.
fn edge_fits(e: &EdgeData, from_kernel: bool, to_kernel: bool) -> bool {
    *e == EdgeData::default() || (from_kernel && (e[EDGE_TYPE] != TYPE_PROGRAMMATIC || to_kernel))
}

/// [`edge_fits`] for edges of existing nodes.
fn check_edge_kinds(store: &crate::graph::Store, edges: &[(Id, Id)], data: &[EdgeData]) -> CuResult {
    let kernel = |n: Id| store.node(n).map(|x| matches!(x.op, Op::Kernel(_)));
    for (&(from, to), e) in edges.iter().zip(data) {
        if !edge_fits(e, kernel(from)?, kernel(to)?) {
            return Err(CuError::INVALID_VALUE);
        }
    }
    Ok(())
}

/// Writes the data of `edges` into the caller's array of `room` entries
/// (null: not asked for); entries past the edges are zeroed.
///
/// # Safety
/// `out` is null or holds `room` entries.
unsafe fn put_edge_data(out: *mut c_void, room: usize, data: &[EdgeData]) {
    if out.is_null() {
        return;
    }
    for i in 0..room {
        // SAFETY: `room` 8-byte entries (contract above).
        unsafe { out.cast::<EdgeData>().add(i).write_unaligned(data.get(i).copied().unwrap_or_default()) };
    }
}

/// Writes a list the CUDA way: with a null array only the count; else up
/// to `*count` entries, the rest of the array nulled, and the real count
/// back in `*count` when smaller.
///
/// # Safety
/// `out` is null or holds `*count` entries; `count` is valid.
unsafe fn put_list<T: Copy>(out: *mut T, count: *mut usize, items: &[T], null: T) -> CuResult {
    if count.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    if out.is_null() {
        // SAFETY: non-null, per the contract.
        return unsafe { put(count, items.len()) };
    }
    // SAFETY: as above.
    let room = unsafe { get(count) }?;
    for i in 0..room {
        // SAFETY: `room` entries per the contract.
        unsafe { out.add(i).write_unaligned(items.get(i).copied().unwrap_or(null)) };
    }
    if items.len() < room {
        // SAFETY: as above.
        unsafe { put(count, items.len()) }?;
    }
    Ok(())
}

// --- parameter structs ----------------------------------------------------

/// `CUDA_KERNEL_NODE_PARAMS_v2` (v1 is its prefix, without `kern`, `ctx`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct KernelParams {
    func: usize,
    grid: [u32; 3],
    block: [u32; 3],
    shared: u32,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
    kern: usize,
    ctx: usize,
}

const _: () = assert!(std::mem::size_of::<KernelParams>() == std::mem::size_of::<CUDA_KERNEL_NODE_PARAMS>());

/// `CUDA_MEMCPY3D` with its memory types as integers.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Memcpy3D {
    src_x: usize,
    src_y: usize,
    src_z: usize,
    src_lod: usize,
    src_type: u32,
    src_host: usize,
    src_device: u64,
    src_array: usize,
    reserved0: usize,
    src_pitch: usize,
    src_height: usize,
    dst_x: usize,
    dst_y: usize,
    dst_z: usize,
    dst_lod: usize,
    dst_type: u32,
    dst_host: usize,
    dst_device: u64,
    dst_array: usize,
    reserved1: usize,
    dst_pitch: usize,
    dst_height: usize,
    width: usize,
    height: usize,
    depth: usize,
}

const _: () = assert!(std::mem::size_of::<Memcpy3D>() == std::mem::size_of::<CUDA_MEMCPY3D>());

/// `CUDA_MEM_ALLOC_NODE_PARAMS`: pool properties (88 bytes), access
/// descriptors, size and the address out.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AllocParams {
    alloc_type: u32,
    handle_types: u32,
    location_type: u32,
    location_id: i32,
    props_rest: [u8; 72],
    access: usize,
    access_count: usize,
    size: usize,
    dptr: u64,
}

const _: () = assert!(std::mem::size_of::<AllocParams>() == std::mem::size_of::<CUDA_MEM_ALLOC_NODE_PARAMS>());

/// `CUDA_CONDITIONAL_NODE_PARAMS` with its type as an integer.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ConditionalParams {
    handle: u64,
    kind: u32,
    size: u32,
    graphs_out: *mut CUgraph,
    ctx: usize,
}

const _: () = assert!(std::mem::size_of::<ConditionalParams>() == std::mem::size_of::<CUDA_CONDITIONAL_NODE_PARAMS>());

/// The body graph arrays handed out through `phGraph_out`, by node: CUDA
/// owns them and keeps them as long as the node.
static BODY_ARRAYS: LazyLock<Mutex<HashMap<Id, Box<[usize]>>>> = LazyLock::new(Mutex::default);

/// Offset of the kind's parameters in a `CUgraphNodeParams`.
const NODE_PARAMS_BODY: usize = 16;

/// A conditional node's operation, its bodies made empty: handle, type and
/// body count checked as the driver does.
fn conditional_op(p: &ConditionalParams) -> CuResult<Op> {
    check_conditional(p.kind, p.size)?;
    let bodies = state().store.create_bodies(p.size);
    Ok(Op::Conditional { handle: p.handle, kind: p.kind, bodies })
}

/// After a conditional node was added from `p` (a `CUgraphNodeParams`):
/// its body graphs go into a CUDA-owned array behind `phGraph_out`.
fn put_bodies(p: *mut CUgraphNodeParams, node: Id) -> CuResult {
    let Op::Conditional { bodies, .. } = state().store.node(node)?.op.clone() else { return Ok(()) };
    // Handles as integers (`CUgraph` is a pointer of the same size).
    let mut array: Box<[usize]> = bodies.into_iter().map(|b| graph_handle(b) as usize).collect();
    let first = array.as_mut_ptr().cast::<CUgraph>();
    BODY_ARRAYS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(node, array);
    // SAFETY: `p` is a CUgraphNodeParams holding conditional parameters
    // (read when the node was made); its `phGraph_out` field.
    unsafe {
        let cond = p.cast::<u8>().add(NODE_PARAMS_BODY).cast::<ConditionalParams>();
        put(&raw mut (*cond).graphs_out, first)
    }
}

/// One end of a 3D copy.
#[allow(clippy::too_many_arguments)]
fn end_of(
    rt: &Runtime,
    kind: u32,
    host: usize,
    device: u64,
    array: usize,
    xyz: [usize; 3],
    pitch: usize,
    height: usize,
) -> CuResult<End> {
    let device_side = match kind {
        1 => false,
        2 => true,
        4 => rt.session.is_device_ptr(if host != 0 { host as u64 } else { device }),
        3 => {
            let _ = array;
            tracing::debug!("copies to or from CUDA arrays are not supported by gpupool");
            return Err(CuError::NOT_SUPPORTED);
        }
        _ => return Err(CuError::INVALID_VALUE),
    };
    let base = match kind {
        1 => host as u64,
        2 => device,
        _ if device != 0 => device,
        _ => host as u64,
    };
    if base == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let [x, y, z] = xyz;
    let offset = z
        .checked_mul(height)
        .and_then(|r| r.checked_add(y))
        .and_then(|r| r.checked_mul(pitch))
        .and_then(|r| r.checked_add(x))
        .ok_or(CuError::INVALID_VALUE)?;
    Ok(End { device: device_side, addr: base + offset as u64, pitch, height })
}

/// A `CUDA_MEMCPY3D` as a copy the stub can run (linear memory only).
pub(crate) fn copy_from_3d(rt: &Runtime, p: *const CUDA_MEMCPY3D) -> CuResult<Copy3D> {
    // SAFETY: `p` points to a CUDA_MEMCPY3D (CUDA contract); `Memcpy3D`
    // mirrors it with integers for the enums.
    let c = unsafe { get(p.cast::<Memcpy3D>()) }?;
    if c.src_lod != 0 || c.dst_lod != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let (w, h, d) = (c.width, c.height.max(1), c.depth.max(1));
    let fix = |pitch: usize, height: usize| (if pitch == 0 { w } else { pitch }, if height == 0 { h } else { height });
    let (sp, sh) = fix(c.src_pitch, c.src_height);
    let (dp, dh) = fix(c.dst_pitch, c.dst_height);
    if (h > 1 || d > 1) && (sp < w || dp < w) || d > 1 && (sh < h || dh < h) {
        return Err(CuError::INVALID_VALUE);
    }
    let src = end_of(rt, c.src_type, c.src_host, c.src_device, c.src_array, [c.src_x, c.src_y, c.src_z], sp, sh)?;
    let dst = end_of(rt, c.dst_type, c.dst_host, c.dst_device, c.dst_array, [c.dst_x, c.dst_y, c.dst_z], dp, dh)?;
    Ok(Copy3D { dst, src, width: w, height: h, depth: d })
}

fn copy_to_3d(c: &Copy3D, out: *mut CUDA_MEMCPY3D) -> CuResult {
    let end = |e: &End| {
        if e.device { (2u32, 0usize, e.addr) } else { (1u32, e.addr as usize, 0u64) }
    };
    let (st, sh, sd) = end(&c.src);
    let (dt, dh, dd) = end(&c.dst);
    let m = Memcpy3D {
        src_type: st,
        src_host: sh,
        src_device: sd,
        src_pitch: c.src.pitch,
        src_height: c.src.height,
        dst_type: dt,
        dst_host: dh,
        dst_device: dd,
        dst_pitch: c.dst.pitch,
        dst_height: c.dst.height,
        width: c.width,
        height: c.height,
        depth: c.depth,
        ..Memcpy3D::default()
    };
    // SAFETY: out-pointer to a CUDA_MEMCPY3D, which `Memcpy3D` mirrors.
    unsafe { put(out.cast::<Memcpy3D>(), m) }
}

fn kernel_op(rt: &Runtime, p: &KernelParams, v2: bool) -> CuResult<Op> {
    let func = if v2 && p.kern != 0 { p.kern } else { p.func };
    let f = rt.function(func)?;
    if p.grid.contains(&0) || p.block.contains(&0) {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the CUDA launch contract on `kernelParams` and `extra`.
    let params = unsafe { crate::launch::pack(&f.info, p.params, p.extra) }?;
    let given = [p.func, if v2 { p.kern } else { 0 }];
    Ok(Op::Kernel(Kernel { func, given, grid: p.grid, block: p.block, shared: p.shared, params, attributes: None }))
}

/// # Safety
/// `p` points to a CUDA_KERNEL_NODE_PARAMS of version 2 (`v2`) or 1.
unsafe fn read_kernel(rt: &Runtime, p: *const c_void, v2: bool) -> CuResult<Op> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let mut k = KernelParams {
        func: 0,
        grid: [0; 3],
        block: [0; 3],
        shared: 0,
        params: std::ptr::null_mut(),
        extra: std::ptr::null_mut(),
        kern: 0,
        ctx: 0,
    };
    let len = if v2 { std::mem::size_of::<KernelParams>() } else { std::mem::offset_of!(KernelParams, kern) };
    // SAFETY: `len` bytes of the caller's struct, into a struct at least as large.
    unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&raw mut k).cast::<u8>(), len) };
    kernel_op(rt, &k, v2)
}

fn memset_op(p: &CUDA_MEMSET_NODE_PARAMS) -> CuResult<Op> {
    if !matches!(p.elementSize, 1 | 2 | 4) || p.width == 0 || p.height == 0 || p.dst == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let row = p.width * p.elementSize as usize;
    if p.height > 1 && p.pitch < row {
        return Err(CuError::INVALID_VALUE);
    }
    Ok(Op::Memset(Set2D {
        dst: p.dst,
        pitch: p.pitch,
        value: p.value,
        element: p.elementSize,
        width: p.width,
        height: p.height,
    }))
}

/// `CUDA_HOST_NODE_PARAMS` as integers.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct HostParams {
    func: usize,
    data: usize,
}

fn host_op(p: *const c_void) -> CuResult<Op> {
    // SAFETY: a CUDA_HOST_NODE_PARAMS (function pointer, argument).
    let h = unsafe { get(p.cast::<HostParams>()) }?;
    if h.func == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    Ok(Op::Host { func: h.func, data: h.data })
}

fn event_op(rt: &Runtime, e: CUevent, record: bool) -> CuResult<Op> {
    rt.event(e as usize)?;
    Ok(if record { Op::EventRecord(e as usize) } else { Op::EventWait(e as usize) })
}

/// A graph allocation for an alloc node; the address goes back into the
/// caller's parameters.
fn alloc_op(rt: &Runtime, p: *mut c_void) -> CuResult<Op> {
    let p = p.cast::<AllocParams>();
    // SAFETY: a CUDA_MEM_ALLOC_NODE_PARAMS (CUDA contract).
    let a = unsafe { get(p) }?;
    if a.alloc_type != 1 || a.location_type != 1 || a.location_id != 0 || a.size == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    if a.handle_types != 0 {
        return Err(CuError::NOT_SUPPORTED);
    }
    let addr = mempool::graph_alloc(rt, a.size as u64)?;
    // SAFETY: the same struct, its address field.
    unsafe { put(&raw mut (*p).dptr, addr) }?;
    Ok(Op::MemAlloc { addr, size: a.size as u64 })
}

/// An operation from the generic `CUgraphNodeParams` (type at byte 0, the
/// kind's parameters at byte 16). `existing`: setting the parameters of
/// that node (alloc and free nodes cannot change).
fn op_from_generic(rt: &Runtime, p: *mut CUgraphNodeParams, existing: Option<Id>) -> CuResult<Op> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: a CUgraphNodeParams: its type first, the union at offset 16.
    let (kind, body) = unsafe { (get(p.cast::<u32>())?, p.cast::<u8>().add(NODE_PARAMS_BODY).cast::<c_void>()) };
    let immutable = || {
        if existing.is_some() { Err(CuError::INVALID_VALUE) } else { Ok(()) }
    };
    match kind {
        // SAFETY: the union holds CUDA_KERNEL_NODE_PARAMS_v3 (the v2 layout).
        kind::KERNEL => unsafe { read_kernel(rt, body, true) },
        // CUDA_MEMCPY_NODE_PARAMS: flags, reserved, context, then the copy.
        // SAFETY: the copy parameters start 16 bytes into it.
        kind::MEMCPY => Ok(Op::Memcpy(copy_from_3d(rt, unsafe { body.cast::<u8>().add(16) }.cast())?)),
        // SAFETY: CUDA_MEMSET_NODE_PARAMS_v2 starts with the v1 fields.
        kind::MEMSET => memset_op(&unsafe { get(body.cast::<CUDA_MEMSET_NODE_PARAMS>()) }?),
        kind::HOST => host_op(body),
        kind::GRAPH => {
            // SAFETY: CUDA_CHILD_GRAPH_NODE_PARAMS: the graph, then ownership.
            let (g, ownership) =
                unsafe { (get(body.cast::<CUgraph>())?, get(body.cast::<u8>().add(8).cast::<u32>())?) };
            let g = graph_id(g)?;
            let st = &mut *state();
            if ownership == 1 {
                // MOVE: the graph becomes the node's own.
                if st.store.is_child(g) {
                    return Err(CuError::INVALID_VALUE);
                }
                st.store.graph(g)?;
                return Ok(Op::Child(g));
            }
            let copy = clone_graph(st, g)?;
            Ok(Op::Child(copy))
        }
        kind::EMPTY => Ok(Op::Empty),
        // SAFETY: CUDA_EVENT_*_NODE_PARAMS start with the event.
        kind::WAIT_EVENT => event_op(rt, unsafe { get(body.cast::<CUevent>()) }?, false),
        // SAFETY: as above.
        kind::EVENT_RECORD => event_op(rt, unsafe { get(body.cast::<CUevent>()) }?, true),
        kind::MEM_ALLOC => {
            immutable()?;
            alloc_op(rt, body)
        }
        kind::MEM_FREE => {
            immutable()?;
            // SAFETY: CUDA_MEM_FREE_NODE_PARAMS holds the address.
            let addr = unsafe { get(body.cast::<CUdeviceptr>()) }?;
            mempool::graph_free_node(addr)?;
            Ok(Op::MemFree { addr })
        }
        kind::BATCH_MEM_OP => mem_ops_node(rt, body),
        kind::CONDITIONAL => {
            if existing.is_some() {
                tracing::debug!("a conditional node's parameters cannot be changed (gpupool)");
                return Err(CuError::NOT_SUPPORTED);
            }
            // SAFETY: the union holds CUDA_CONDITIONAL_NODE_PARAMS.
            conditional_op(&unsafe { get(body.cast::<ConditionalParams>()) }?)
        }
        _ => {
            tracing::debug!(kind, "graph node kind not supported by gpupool");
            Err(CuError::NOT_SUPPORTED)
        }
    }
}

/// `CUDA_BATCH_MEM_OP_NODE_PARAMS` (v1 and v2 alike) with plain integers.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct BatchParams {
    ctx: usize,
    count: u32,
    params: usize,
    flags: u32,
}

/// A batch-mem-op node's operations, checked as `cuStreamBatchMemOp`'s.
fn mem_ops_node(rt: &Runtime, p: *const c_void) -> CuResult<Op> {
    // SAFETY: a CUDA_BATCH_MEM_OP_NODE_PARAMS (CUDA contract).
    let b = unsafe { get(p.cast::<BatchParams>()) }?;
    if b.flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: `paramArray` holds `count` operations (CUDA contract).
    let ops = unsafe { crate::mem_ops::read(b.count, b.params as *const c_void) }?;
    crate::mem_ops::node_ops(rt, &ops)
}

// --- building graphs --------------------------------------------------------

/// Adds `op` to graph `g` after `n` dependencies and writes the node handle.
fn add_node(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, op: Op) -> CuResult {
    let rt = Runtime::get()?;
    let result = (|| {
        if out.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let g = graph_id(g)?;
        // SAFETY: `n` node handles per the CUDA API.
        let deps = unsafe { node_list(deps, n) }?;
        let node = state().store.add(g, op.clone(), &deps)?;
        // SAFETY: non-null out-pointer.
        unsafe { put(out, node_handle(node)) }
    })();
    if result.is_err() {
        // The node was not made: let go of what building its op took.
        let gone = match &op {
            Op::Child(c) => state().store.destroy(*c).unwrap_or_default(),
            Op::Conditional { bodies, .. } => {
                bodies.iter().flat_map(|b| state().store.destroy(*b).unwrap_or_default()).collect()
            }
            other => vec![other.clone()],
        };
        mempool::let_go(rt, &gone)?;
    }
    result
}

/// Builds an op, then adds it (the builder runs first so that a bad
/// parameter leaves the graph unchanged).
fn add_with(
    out: *mut CUgraphNode,
    g: CUgraph,
    deps: *const CUgraphNode,
    n: usize,
    build: impl FnOnce(&Runtime) -> CuResult<Op>,
) -> CuResult {
    let rt = Runtime::with_context()?;
    graph_id(g)?;
    let op = build(rt)?;
    add_node(out, g, deps, n, op)
}

fn child_op(child: CUgraph) -> CuResult<Op> {
    let c = graph_id(child)?;
    let copy = clone_graph(&mut state(), c)?;
    Ok(Op::Child(copy))
}

/// A copy of graph `g` (child graphs included) holding its graph memory
/// and its user object references as the original does.
fn clone_graph(st: &mut capture::State, g: Id) -> CuResult<Id> {
    let (copy, ops) = st.store.clone_graph(g)?;
    mempool::hold(&ops);
    crate::user_object::copy_references(&st.store.tree(g)?, copy);
    Ok(copy)
}

/// Runs `f` on node `h`'s current operation.
fn with_op<T>(h: CUgraphNode, f: impl FnOnce(&Op) -> CuResult<T>) -> CuResult<T> {
    Runtime::get()?;
    let n = node_id(h)?;
    let st = state();
    f(&st.store.node(n)?.op)
}

/// Replaces node `h`'s operation (same kind).
fn set_op(h: CUgraphNode, op: Op) -> CuResult {
    let rt = Runtime::get()?;
    let n = node_id(h)?;
    let old = state().store.node(n)?.op.clone();
    if old.kind() != op.kind() {
        return Err(CuError::INVALID_VALUE);
    }
    state().store.set_op(n, op)?;
    if let Op::Child(c) = old {
        let gone = state().store.destroy(c)?;
        mempool::let_go(rt, &gone)?;
    }
    Ok(())
}

/// `cuGraphAddNode(_v2)`: the node, then for a conditional node its
/// bodies written back.
fn add_generic(
    out: *mut CUgraphNode,
    g: CUgraph,
    deps: *const CUgraphNode,
    n: usize,
    p: *mut CUgraphNodeParams,
) -> CuResult {
    add_with(out, g, deps, n, |rt| op_from_generic(rt, p, None))?;
    // SAFETY: written by `add_with` just now.
    put_bodies(p, node_id(unsafe { *out })?)
}

fn exec_set_op(e: CUgraphExec, h: CUgraphNode, op: Op) -> CuResult {
    Runtime::get()?;
    let (e, n) = (exec_id(e)?, node_id(h)?);
    state().store.exec_set_op(e, n, op)
}

/// Parameter bytes handed out by `cuGraphKernelNodeGetParams`: CUDA gives
/// pointers into its own copy; they stay valid until the next such call
/// for the node.
static PARAM_VIEWS: LazyLock<Mutex<HashMap<Id, ParamView>>> = LazyLock::new(Mutex::default);

/// A node's parameter bytes and a pointer to each parameter in them.
type ParamView = (Vec<u8>, Vec<usize>);

/// The kernel launch of kernel node `h`.
fn kernel_of(h: CUgraphNode) -> CuResult<Kernel> {
    with_op(h, |op| match op {
        Op::Kernel(k) => Ok(k.clone()),
        _ => Err(CuError::INVALID_VALUE),
    })
}

fn kernel_get(h: CUgraphNode, out: *mut c_void, v2: bool) -> CuResult {
    let rt = Runtime::get()?;
    let n = node_id(h)?;
    let k = kernel_of(h)?;
    if out.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let info = rt.function(k.func)?.info;
    let mut views = PARAM_VIEWS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (bytes, ptrs) = views.entry(n).or_default();
    *bytes = k.params.clone();
    *ptrs = info.params.iter().map(|p| bytes.as_ptr() as usize + p.offset as usize).collect();
    let params = if ptrs.is_empty() { std::ptr::null_mut() } else { ptrs.as_mut_ptr().cast() };
    let p = KernelParams {
        func: k.given[0],
        grid: k.grid,
        block: k.block,
        shared: k.shared,
        params,
        extra: std::ptr::null_mut(),
        kern: k.given[1],
        ctx: 0,
    };
    let len = if v2 { std::mem::size_of::<KernelParams>() } else { std::mem::offset_of!(KernelParams, kern) };
    // SAFETY: the caller's struct holds `len` bytes (v1 or v2).
    unsafe { std::ptr::copy_nonoverlapping((&raw const p).cast::<u8>(), out.cast::<u8>(), len) };
    Ok(())
}

// --- instantiation and replay ----------------------------------------------

const INSTANTIATE_AUTO_FREE_ON_LAUNCH: u64 = 1;
const INSTANTIATE_UPLOAD: u64 = 2;
const INSTANTIATE_DEVICE_LAUNCH: u64 = 4;
const INSTANTIATE_USE_NODE_PRIORITY: u64 = 8;
/// `CU_GRAPH_COND_ASSIGN_DEFAULT`: the condition takes its default at
/// each launch.
const CONDITIONAL_ASSIGN_DEFAULT: c_uint = 1;

fn instantiate(out: *mut CUgraphExec, g: CUgraph, flags: u64) -> CuResult {
    Runtime::with_context()?;
    if out.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let allowed = INSTANTIATE_AUTO_FREE_ON_LAUNCH | INSTANTIATE_UPLOAD | INSTANTIATE_USE_NODE_PRIORITY;
    if flags & INSTANTIATE_DEVICE_LAUNCH != 0 {
        tracing::debug!("device-launchable graphs are not supported by gpupool");
        return Err(CuError::NOT_SUPPORTED);
    }
    if flags & !allowed != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let g = graph_id(g)?;
    if state().store.needs_device(g)? {
        return instantiate_device(out, g, flags);
    }
    let (e, ops) = {
        let mut st = state();
        let e = st.store.instantiate(g, flags)?;
        let ops: Vec<Op> = st.store.exec(e)?.steps.iter().map(|s| s.op.clone()).collect();
        crate::user_object::copy_references(&st.store.tree(g)?, e);
        (e, ops)
    };
    // Graph memory stays mapped while the exec holds it; its addresses were
    // fixed with the nodes, so every launch (AUTO_FREE_ON_LAUNCH or not)
    // finds it in place.
    mempool::hold(&ops);
    // SAFETY: non-null out-pointer.
    unsafe { put(out, exec_handle(e)) }
}

/// A kernel node as the launch the server knows.
fn launch_of(rt: &Runtime, k: &Kernel) -> CuResult<wire::Launch> {
    let f = rt.function(k.func)?;
    let attributes = match &k.attributes {
        Some(bytes) => Some(prost::Message::decode(bytes.as_slice()).map_err(|_| CuError::INVALID_VALUE)?),
        None => None,
    };
    let dim = |d: [u32; 3]| Some(wire::Dim3 { x: d[0], y: d[1], z: d[2] });
    Ok(wire::Launch {
        module: f.module,
        function: f.index,
        grid: dim(k.grid),
        block: dim(k.block),
        shared_mem_bytes: k.shared,
        stream: 0,
        params: k.params.clone().into(),
        attributes,
    })
}

/// Instantiates graph `g`, which holds conditional nodes, as a driver
/// graph on the server (one round trip: a refused graph fails here).
fn instantiate_device(out: *mut CUgraphExec, g: Id, flags: u64) -> CuResult {
    let rt = Runtime::with_context()?;
    let (twin, body, e) = {
        let mut st = state();
        let (twin, body) = st.store.device_tree(g, &|k| launch_of(rt, k))?;
        (twin, body, st.store.instantiate_device(g, flags)?)
    };
    tracing::debug!(
        graph = g,
        twin,
        exec = e,
        nodes = body.nodes.len(),
        "instantiating a graph with conditional nodes on the server"
    );
    if let Err(err) = rt.session.graph_instantiate(twin, e, flags, body) {
        state().store.destroy_exec(e)?;
        return Err(err.into());
    }
    {
        let st = state();
        crate::user_object::copy_references(&st.store.tree(g)?, e);
    }
    // SAFETY: non-null out-pointer (checked by the caller).
    unsafe { put(out, exec_handle(e)) }
}

/// Runs one step on stream `s`, queued like the call it stands for.
fn run_step(rt: &Runtime, op: &Op, s: StreamId) -> CuResult {
    match op {
        Op::Empty | Op::Child(_) | Op::MemAlloc { .. } | Op::MemFree { .. } => Ok(()),
        // Graphs with these run on the server (`Exec::device`).
        Op::Conditional { .. } => Err(CuError::NOT_SUPPORTED),
        Op::Kernel(k) => {
            let f = rt.function(k.func)?;
            let cfg = LaunchConfig {
                grid: (k.grid[0], k.grid[1], k.grid[2]),
                block: (k.block[0], k.block[1], k.block[2]),
                shared_mem_bytes: k.shared,
            };
            let attributes = match &k.attributes {
                Some(bytes) => Some(prost::Message::decode(bytes.as_slice()).map_err(|_| CuError::INVALID_VALUE)?),
                None => None,
            };
            rt.session.launch_with(&f, cfg, attributes, s, k.params.clone()).map_err(CuError::from)
        }
        Op::Memcpy(c) => crate::memory::run_copy(rt, c, s),
        Op::MemOps(ops) => crate::mem_ops::run(rt, ops, s),
        Op::Memset(m) => crate::memory::run_memset(rt, m, s),
        Op::Host { func, data } => {
            rt.session.stream_synchronize(s)?;
            // SAFETY: a CUhostFn the application gave for this node, with
            // its own argument.
            let f: unsafe extern "C" fn(*mut c_void) = unsafe { std::mem::transmute(*func) };
            // SAFETY: as above.
            unsafe { f(*data as *mut c_void) };
            Ok(())
        }
        Op::EventRecord(e) => {
            let e = rt.event(*e)?;
            rt.session.event_record(e, s).map_err(CuError::from)
        }
        Op::EventWait(e) => {
            let e = rt.event(*e)?;
            rt.session.stream_wait_event(s, e).map_err(CuError::from)
        }
    }
}

fn launch(e: CUgraphExec, h: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    let e = exec_id(e)?;
    let (steps, device) = {
        let st = state();
        let exec = st.store.exec(e)?;
        (exec.steps.clone(), exec.device)
    };
    if device {
        return match capture::route(rt, h)? {
            Route::Send(s) => rt.session.graph_launch(e, s).map_err(CuError::from),
            Route::Capture(_) => {
                tracing::debug!("a graph with conditional nodes cannot be launched into a stream capture (gpupool)");
                Err(CuError::NOT_SUPPORTED)
            }
        };
    }
    match capture::route(rt, h)? {
        Route::Send(s) => {
            for step in steps.iter().filter(|s| s.enabled) {
                run_step(rt, &step.op, s)?;
            }
            Ok(())
        }
        // Launched into a capture: its steps join the capture in order.
        Route::Capture(s) => {
            let ops: Vec<Op> = steps.into_iter().filter(|s| s.enabled).map(|s| s.op).collect();
            mempool::hold(&ops);
            for op in ops {
                capture::add(s, op)?;
            }
            Ok(())
        }
    }
}

fn exec_update(e: CUgraphExec, g: CUgraph, info: *mut CUgraphExecUpdateResultInfo) -> CuResult {
    let rt = Runtime::get()?;
    let (e, g) = (exec_id(e)?, graph_id(g)?);
    let (outcome, old, new) = {
        let mut st = state();
        let old: Vec<Op> = st.store.exec(e)?.steps.iter().map(|s| s.op.clone()).collect();
        let outcome = st.store.exec_update(e, g)?;
        let new: Vec<Op> = st.store.exec(e)?.steps.iter().map(|s| s.op.clone()).collect();
        if outcome.is_ok() {
            // The new source graph's user object references replace the
            // executable graph's, as CUDA's do.
            crate::user_object::copy_references(&st.store.tree(g)?, e);
        }
        (outcome, old, new)
    };
    mempool::hold(&new);
    mempool::let_go(rt, &old)?;
    let (result, node) = match outcome {
        Ok(()) => (0, None),
        Err(f) => (f.result, f.node),
    };
    if !info.is_null() {
        let words = info.cast::<usize>();
        // SAFETY: a CUgraphExecUpdateResultInfo: the result (padded to 8
        // bytes), the error node, the node it came from.
        unsafe {
            words.write_unaligned(0);
            put(info.cast::<u32>(), result)?;
            put(words.add(1), node.map_or(0, |n| node_handle(n) as usize))?;
            put(words.add(2), 0)?;
        }
    }
    match result {
        0 => Ok(()),
        update::ERROR | update::TOPOLOGY_CHANGED | update::NODE_TYPE_CHANGED => Err(CuError(910)),
        _ => Err(CuError(910)),
    }
}

fn destroy_graph(g: CUgraph) -> CuResult {
    let rt = Runtime::get()?;
    let g = graph_id(g)?;
    let gone = {
        let mut st = state();
        if st.store.is_child(g) {
            return Err(CuError::INVALID_VALUE);
        }
        let gone = st.store.destroy(g)?;
        if st.store.drop_twin(g) {
            rt.session.graph_destroy(g)?;
        }
        gone
    };
    mempool::let_go(rt, &gone)
}

fn dot_print(g: CUgraph, path: *const c_char, _flags: c_uint) -> CuResult {
    Runtime::get()?;
    let g = graph_id(g)?;
    // SAFETY: NUL-terminated per the CUDA API.
    let path = unsafe { c_str(path) }?;
    let dot = state().store.dot(g)?;
    std::fs::write(path, dot).map_err(|e| {
        tracing::debug!(path, error = %e, "cannot write the graph's DOT file");
        CuError(304) // OPERATING_SYSTEM
    })
}

fn list_nodes(g: CUgraph, out: *mut CUgraphNode, count: *mut usize, roots: bool) -> CuResult {
    Runtime::get()?;
    let g = graph_id(g)?;
    let ids = {
        let st = state();
        if roots { st.store.roots(g)? } else { st.store.nodes(g)? }
    };
    let handles: Vec<CUgraphNode> = ids.into_iter().map(node_handle).collect();
    // SAFETY: the CUDA contract on the array and count.
    unsafe { put_list(out, count, &handles, std::ptr::null_mut()) }
}

fn list_edges(
    g: CUgraph,
    from: *mut CUgraphNode,
    to: *mut CUgraphNode,
    edges: *mut c_void,
    count: *mut usize,
) -> CuResult {
    Runtime::get()?;
    let g = graph_id(g)?;
    let all = state().store.edges(g)?;
    if from.is_null() != to.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let froms: Vec<CUgraphNode> = all.iter().map(|(f, _)| node_handle(*f)).collect();
    let tos: Vec<CUgraphNode> = all.iter().map(|(_, t)| node_handle(*t)).collect();
    let data: Vec<EdgeData> = {
        let st = state();
        all.iter().map(|(f, t)| st.store.edge_data(*f, *t)).collect()
    };
    if from.is_null() {
        // SAFETY: count out-pointer per the CUDA API.
        return unsafe { put(count, all.len()) };
    }
    // SAFETY: `*count` entries in each array per the CUDA API.
    unsafe {
        let room = get(count)?;
        put_edge_data(edges, room, &data);
        put_list(from, count, &froms, std::ptr::null_mut())?;
        put(count, room)?;
        put_list(to, count, &tos, std::ptr::null_mut())
    }
}

fn node_neighbours(
    h: CUgraphNode,
    out: *mut CUgraphNode,
    edges: *mut c_void,
    count: *mut usize,
    dependents: bool,
) -> CuResult {
    Runtime::get()?;
    let n = node_id(h)?;
    let (ids, data) = {
        let st = state();
        let ids = if dependents { st.store.dependents(n)? } else { st.store.node(n)?.deps.clone() };
        let edge = |other: Id| if dependents { st.store.edge_data(n, other) } else { st.store.edge_data(other, n) };
        let data: Vec<EdgeData> = ids.iter().map(|x| edge(*x)).collect();
        (ids, data)
    };
    let handles: Vec<CUgraphNode> = ids.into_iter().map(node_handle).collect();
    // SAFETY: the CUDA contract on the arrays and count.
    unsafe {
        if !out.is_null() {
            put_edge_data(edges, get(count)?, &data);
        }
        put_list(out, count, &handles, std::ptr::null_mut())
    }
}

fn edit_edges(
    g: CUgraph,
    from: *const CUgraphNode,
    to: *const CUgraphNode,
    edges: *const c_void,
    n: usize,
    add: bool,
) -> CuResult {
    Runtime::get()?;
    let g = graph_id(g)?;
    // SAFETY: `n` handles in each array per the CUDA API.
    let (f, t) = unsafe { (node_list(from, n)?, node_list(to, n)?) };
    // SAFETY: as above.
    let data = unsafe { read_edge_data(edges, n) }?;
    let pairs: Vec<(Id, Id)> = f.into_iter().zip(t).collect();
    let mut st = state();
    st.store.graph(g)?;
    if pairs.iter().any(|(a, b)| st.store.graph_of(*a) != Ok(g) || st.store.graph_of(*b) != Ok(g)) {
        return Err(CuError::INVALID_VALUE);
    }
    if !add {
        // An edge is removed as it was added, its data included.
        if pairs.iter().zip(&data).any(|((a, b), e)| st.store.edge_data(*a, *b) != *e) {
            return Err(CuError::INVALID_VALUE);
        }
        return st.store.remove_edges(&pairs);
    }
    check_edge_kinds(&st.store, &pairs, &data)?;
    st.store.add_edges(&pairs)?;
    for ((a, b), e) in pairs.iter().zip(data) {
        st.store.set_edge_data(*a, *b, e)?;
    }
    Ok(())
}

fn memcpy_node(rt: &Runtime, p: *const CUDA_MEMCPY3D) -> CuResult<Op> {
    Ok(Op::Memcpy(copy_from_3d(rt, p)?))
}

fn memset_node(p: *const CUDA_MEMSET_NODE_PARAMS) -> CuResult<Op> {
    // SAFETY: a CUDA_MEMSET_NODE_PARAMS per the CUDA API.
    memset_op(&unsafe { get(p) }?)
}

crate::exports! {
    fn cuGraphCreate(out: *mut CUgraph, flags: c_uint) {
        Runtime::get()?;
        if flags != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let g = state().store.create();
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, graph_handle(g)) }
    }

    fn cuGraphDestroy(g: CUgraph) { destroy_graph(g) }

    fn cuGraphClone(out: *mut CUgraph, g: CUgraph) {
        Runtime::get()?;
        if out.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let copy = clone_graph(&mut state(), graph_id(g)?)?;
        // SAFETY: non-null out-pointer.
        unsafe { put(out, graph_handle(copy)) }
    }

    fn cuGraphNodeFindInClone(out: *mut CUgraphNode, original: CUgraphNode, clone: CUgraph) {
        Runtime::get()?;
        let found = state().store.find_in_clone(graph_id(clone)?, node_id(original)?)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, node_handle(found)) }
    }

    fn cuGraphAddEmptyNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize) {
        add_with(out, g, deps, n, |_| Ok(Op::Empty))
    }

    fn cuGraphAddKernelNode_v2(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, p: *const CUDA_KERNEL_NODE_PARAMS) {
        // SAFETY: a CUDA_KERNEL_NODE_PARAMS (v2) per the CUDA API.
        add_with(out, g, deps, n, |rt| unsafe { read_kernel(rt, p.cast(), true) })
    }

    fn cuGraphAddMemcpyNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, p: *const CUDA_MEMCPY3D, _ctx: CUcontext) {
        add_with(out, g, deps, n, |rt| memcpy_node(rt, p))
    }

    fn cuGraphAddMemsetNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, p: *const CUDA_MEMSET_NODE_PARAMS, _ctx: CUcontext) {
        add_with(out, g, deps, n, |_| memset_node(p))
    }

    fn cuGraphAddHostNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, p: *const CUDA_HOST_NODE_PARAMS) {
        add_with(out, g, deps, n, |_| host_op(p.cast()))
    }

    fn cuGraphAddChildGraphNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, child: CUgraph) {
        add_with(out, g, deps, n, |_| child_op(child))
    }

    fn cuGraphAddEventRecordNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, e: CUevent) {
        add_with(out, g, deps, n, |rt| event_op(rt, e, true))
    }

    fn cuGraphAddEventWaitNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, e: CUevent) {
        add_with(out, g, deps, n, |rt| event_op(rt, e, false))
    }

    fn cuGraphAddMemAllocNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, p: *mut CUDA_MEM_ALLOC_NODE_PARAMS) {
        add_with(out, g, deps, n, |rt| alloc_op(rt, p.cast()))
    }

    fn cuGraphAddMemFreeNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, addr: CUdeviceptr) {
        add_with(out, g, deps, n, |_| {
            mempool::graph_free_node(addr)?;
            Ok(Op::MemFree { addr })
        })
    }

    fn cuGraphAddNode_v2(
        out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, edges: *const c_void, n: usize,
        p: *mut CUgraphNodeParams,
    ) {
        // SAFETY: `n` edge entries or null per the CUDA API.
        let data = unsafe { read_edge_data(edges, n) }?;
        if data.iter().all(|e| *e == EdgeData::default()) {
            return add_generic(out, g, deps, n, p);
        }
        // The edges must fit before the node is made. SAFETY: `n` handles
        // per the CUDA API; `p` is null or a CUgraphNodeParams, its type first.
        let (froms, to_kernel) = unsafe { (node_list(deps, n)?, !p.is_null() && get(p.cast::<u32>())? == kind::KERNEL) };
        {
            let st = state();
            for (from, e) in froms.iter().zip(&data) {
                if !edge_fits(e, matches!(st.store.node(*from)?.op, Op::Kernel(_)), to_kernel) {
                    return Err(CuError::INVALID_VALUE);
                }
            }
        }
        add_with(out, g, deps, n, |rt| op_from_generic(rt, p, None))?;
        // SAFETY: written by `add_with` just now.
        let node = node_id(unsafe { *out })?;
        let mut st = state();
        froms.iter().zip(data).try_for_each(|(from, e)| st.store.set_edge_data(*from, node, e))
    }

    fn cuGraphNodeSetParams(h: CUgraphNode, p: *mut CUgraphNodeParams) {
        let rt = Runtime::with_context()?;
        let op = op_from_generic(rt, p, Some(node_id(h)?))?;
        set_op(h, op)
    }

    fn cuGraphExecNodeSetParams(e: CUgraphExec, h: CUgraphNode, p: *mut CUgraphNodeParams) {
        let rt = Runtime::with_context()?;
        let op = op_from_generic(rt, p, Some(node_id(h)?))?;
        if let Op::Child(c) = op {
            let (e, n) = (exec_id(e)?, node_id(h)?);
            let result = state().store.exec_set_child(e, n, c);
            if result.is_ok() {
                let st = state();
                crate::user_object::add_references(&st.store.tree(c)?, e);
            }
            let gone = state().store.destroy(c).unwrap_or_default();
            mempool::let_go(rt, &gone)?;
            return result;
        }
        exec_set_op(e, h, op)
    }

    fn cuGraphConditionalHandleCreate(
        out: *mut CUgraphConditionalHandle, g: CUgraph, _ctx: CUcontext, default: c_uint, flags: c_uint,
    ) {
        let rt = Runtime::with_context()?;
        if out.is_null() || flags & !CONDITIONAL_ASSIGN_DEFAULT != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let g = graph_id(g)?;
        // The handle lives on the server's twin of the top-level graph.
        let root = state().store.root(g)?;
        let handle = rt.session.graph_handle_create(root, default, flags)?;
        state().store.note_handle(root, handle)?;
        tracing::debug!(graph = g, root, handle, "conditional handle created on the server");
        // SAFETY: non-null out-pointer.
        unsafe { put(out, handle) }
    }

    fn cuGraphDestroyNode(h: CUgraphNode) {
        let rt = Runtime::get()?;
        let n = node_id(h)?;
        let gone = state().store.destroy_node(n)?;
        BODY_ARRAYS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&n);
        mempool::let_go(rt, &gone)
    }

    fn cuGraphNodeGetType(h: CUgraphNode, out: *mut c_uint) {
        let k = with_op(h, |op| Ok(op.kind()))?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, k) }
    }

    fn cuGraphGetNodes(g: CUgraph, out: *mut CUgraphNode, count: *mut usize) { list_nodes(g, out, count, false) }
    fn cuGraphGetRootNodes(g: CUgraph, out: *mut CUgraphNode, count: *mut usize) { list_nodes(g, out, count, true) }

    fn cuGraphGetEdges_v2(g: CUgraph, from: *mut CUgraphNode, to: *mut CUgraphNode, edges: *mut c_void, count: *mut usize) {
        list_edges(g, from, to, edges, count)
    }

    fn cuGraphNodeGetDependencies_v2(h: CUgraphNode, out: *mut CUgraphNode, edges: *mut c_void, count: *mut usize) {
        node_neighbours(h, out, edges, count, false)
    }

    fn cuGraphNodeGetDependentNodes_v2(h: CUgraphNode, out: *mut CUgraphNode, edges: *mut c_void, count: *mut usize) {
        node_neighbours(h, out, edges, count, true)
    }

    fn cuGraphAddDependencies_v2(
        g: CUgraph, from: *const CUgraphNode, to: *const CUgraphNode, edges: *const c_void, n: usize,
    ) {
        edit_edges(g, from, to, edges, n, true)
    }

    fn cuGraphRemoveDependencies_v2(
        g: CUgraph, from: *const CUgraphNode, to: *const CUgraphNode, edges: *const c_void, n: usize,
    ) {
        edit_edges(g, from, to, edges, n, false)
    }

    fn cuGraphKernelNodeGetParams_v2(h: CUgraphNode, out: *mut CUDA_KERNEL_NODE_PARAMS) { kernel_get(h, out.cast(), true) }

    fn cuGraphKernelNodeSetAttribute(h: CUgraphNode, attr: c_uint, value: *const c_void) {
        if value.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: a `CUkernelNodeAttrValue` (64 bytes) per the CUDA API.
        let v = unsafe { value.cast::<[u8; launch::VALUE_BYTES]>().read_unaligned() };
        let mut k = kernel_of(h)?;
        k.attributes = Some(launch::set_node_attribute(k.attributes.as_deref(), attr, &v)?);
        set_op(h, Op::Kernel(k))
    }

    fn cuGraphKernelNodeGetAttribute(h: CUgraphNode, attr: c_uint, out: *mut c_void) {
        if out.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let v = launch::node_attribute(kernel_of(h)?.attributes.as_deref(), attr)?;
        // SAFETY: a `CUkernelNodeAttrValue` (64 bytes) per the CUDA API.
        unsafe { out.cast::<[u8; launch::VALUE_BYTES]>().write_unaligned(v) };
        Ok(())
    }

    fn cuGraphKernelNodeCopyAttributes(dst: CUgraphNode, src: CUgraphNode) {
        // `Some` even when `src` has the defaults: replaces what `dst` had.
        let attributes = kernel_of(src)?.attributes.unwrap_or_default();
        let mut k = kernel_of(dst)?;
        k.attributes = Some(attributes);
        set_op(dst, Op::Kernel(k))
    }

    fn cuGraphKernelNodeSetParams_v2(h: CUgraphNode, p: *const CUDA_KERNEL_NODE_PARAMS) {
        let rt = Runtime::with_context()?;
        // SAFETY: a CUDA_KERNEL_NODE_PARAMS (v2) per the CUDA API.
        let op = unsafe { read_kernel(rt, p.cast(), true) }?;
        set_op(h, op)
    }

    fn cuGraphExecKernelNodeSetParams_v2(e: CUgraphExec, h: CUgraphNode, p: *const CUDA_KERNEL_NODE_PARAMS) {
        let rt = Runtime::with_context()?;
        // SAFETY: a CUDA_KERNEL_NODE_PARAMS (v2) per the CUDA API.
        let op = unsafe { read_kernel(rt, p.cast(), true) }?;
        exec_set_op(e, h, op)
    }

    fn cuGraphMemcpyNodeGetParams(h: CUgraphNode, out: *mut CUDA_MEMCPY3D) {
        let c = with_op(h, |op| match op {
            Op::Memcpy(c) => Ok(*c),
            _ => Err(CuError::INVALID_VALUE),
        })?;
        copy_to_3d(&c, out)
    }

    fn cuGraphMemcpyNodeSetParams(h: CUgraphNode, p: *const CUDA_MEMCPY3D) {
        let rt = Runtime::with_context()?;
        set_op(h, memcpy_node(rt, p)?)
    }

    fn cuGraphExecMemcpyNodeSetParams(e: CUgraphExec, h: CUgraphNode, p: *const CUDA_MEMCPY3D, _ctx: CUcontext) {
        let rt = Runtime::with_context()?;
        exec_set_op(e, h, memcpy_node(rt, p)?)
    }

    fn cuGraphMemsetNodeGetParams(h: CUgraphNode, out: *mut CUDA_MEMSET_NODE_PARAMS) {
        let m = with_op(h, |op| match op {
            Op::Memset(m) => Ok(*m),
            _ => Err(CuError::INVALID_VALUE),
        })?;
        let p = CUDA_MEMSET_NODE_PARAMS {
            dst: m.dst,
            pitch: m.pitch,
            value: m.value,
            elementSize: m.element,
            width: m.width,
            height: m.height,
        };
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, p) }
    }

    fn cuGraphMemsetNodeSetParams(h: CUgraphNode, p: *const CUDA_MEMSET_NODE_PARAMS) {
        set_op(h, memset_node(p)?)
    }

    fn cuGraphExecMemsetNodeSetParams(e: CUgraphExec, h: CUgraphNode, p: *const CUDA_MEMSET_NODE_PARAMS, _ctx: CUcontext) {
        exec_set_op(e, h, memset_node(p)?)
    }

    fn cuGraphAddBatchMemOpNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, p: *const c_void) {
        add_with(out, g, deps, n, |rt| mem_ops_node(rt, p))
    }

    /// The operations array handed back is the node's own: valid until
    /// its parameters change or it is destroyed, as CUDA's.
    fn cuGraphBatchMemOpNodeGetParams(h: CUgraphNode, out: *mut c_void) {
        let (params, count) = with_op(h, |op| match op {
            Op::MemOps(ops) => Ok((ops.as_ptr() as usize, ops.len() as u32)),
            _ => Err(CuError::INVALID_VALUE),
        })?;
        let ctx = crate::runtime::current_context().unwrap_or(0);
        // SAFETY: out-pointer per the CUDA API; same layout.
        unsafe { put(out.cast::<BatchParams>(), BatchParams { ctx, count, params, flags: 0 }) }
    }

    fn cuGraphBatchMemOpNodeSetParams(h: CUgraphNode, p: *const c_void) {
        let rt = Runtime::with_context()?;
        set_op(h, mem_ops_node(rt, p)?)
    }

    fn cuGraphExecBatchMemOpNodeSetParams(e: CUgraphExec, h: CUgraphNode, p: *const c_void) {
        let rt = Runtime::with_context()?;
        exec_set_op(e, h, mem_ops_node(rt, p)?)
    }

    fn cuGraphHostNodeGetParams(h: CUgraphNode, out: *mut CUDA_HOST_NODE_PARAMS) {
        let (func, data) = with_op(h, |op| match op {
            Op::Host { func, data } => Ok((*func, *data)),
            _ => Err(CuError::INVALID_VALUE),
        })?;
        // SAFETY: out-pointer to a CUDA_HOST_NODE_PARAMS, mirrored by HostParams.
        unsafe { put(out.cast::<HostParams>(), HostParams { func, data }) }
    }

    fn cuGraphHostNodeSetParams(h: CUgraphNode, p: *const CUDA_HOST_NODE_PARAMS) { set_op(h, host_op(p.cast())?) }

    fn cuGraphExecHostNodeSetParams(e: CUgraphExec, h: CUgraphNode, p: *const CUDA_HOST_NODE_PARAMS) {
        exec_set_op(e, h, host_op(p.cast())?)
    }

    fn cuGraphChildGraphNodeGetGraph(h: CUgraphNode, out: *mut CUgraph) {
        let c = with_op(h, |op| match op {
            Op::Child(c) => Ok(*c),
            _ => Err(CuError::INVALID_VALUE),
        })?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, graph_handle(c)) }
    }

    fn cuGraphExecChildGraphNodeSetParams(e: CUgraphExec, h: CUgraphNode, child: CUgraph) {
        Runtime::get()?;
        let (e, n, c) = (exec_id(e)?, node_id(h)?, graph_id(child)?);
        let st = &mut *state();
        st.store.exec_set_child(e, n, c)?;
        crate::user_object::add_references(&st.store.tree(c)?, e);
        Ok(())
    }

    fn cuGraphEventRecordNodeGetEvent(h: CUgraphNode, out: *mut CUevent) {
        let e = with_op(h, |op| match op {
            Op::EventRecord(e) => Ok(*e),
            _ => Err(CuError::INVALID_VALUE),
        })?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, e as CUevent) }
    }

    fn cuGraphEventRecordNodeSetEvent(h: CUgraphNode, e: CUevent) {
        let rt = Runtime::get()?;
        set_op(h, event_op(rt, e, true)?)
    }

    fn cuGraphExecEventRecordNodeSetEvent(x: CUgraphExec, h: CUgraphNode, e: CUevent) {
        let rt = Runtime::get()?;
        exec_set_op(x, h, event_op(rt, e, true)?)
    }

    fn cuGraphEventWaitNodeGetEvent(h: CUgraphNode, out: *mut CUevent) {
        let e = with_op(h, |op| match op {
            Op::EventWait(e) => Ok(*e),
            _ => Err(CuError::INVALID_VALUE),
        })?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, e as CUevent) }
    }

    fn cuGraphEventWaitNodeSetEvent(h: CUgraphNode, e: CUevent) {
        let rt = Runtime::get()?;
        set_op(h, event_op(rt, e, false)?)
    }

    fn cuGraphExecEventWaitNodeSetEvent(x: CUgraphExec, h: CUgraphNode, e: CUevent) {
        let rt = Runtime::get()?;
        exec_set_op(x, h, event_op(rt, e, false)?)
    }

    fn cuGraphMemAllocNodeGetParams(h: CUgraphNode, out: *mut CUDA_MEM_ALLOC_NODE_PARAMS) {
        let (addr, size) = with_op(h, |op| match op {
            Op::MemAlloc { addr, size } => Ok((*addr, *size)),
            _ => Err(CuError::INVALID_VALUE),
        })?;
        let p = AllocParams {
            alloc_type: 1,
            handle_types: 0,
            location_type: 1,
            location_id: 0,
            props_rest: [0; 72],
            access: 0,
            access_count: 0,
            size: size as usize,
            dptr: addr,
        };
        // SAFETY: out-pointer to a CUDA_MEM_ALLOC_NODE_PARAMS, mirrored.
        unsafe { put(out.cast::<AllocParams>(), p) }
    }

    fn cuGraphMemFreeNodeGetParams(h: CUgraphNode, out: *mut CUdeviceptr) {
        let addr = with_op(h, |op| match op {
            Op::MemFree { addr } => Ok(*addr),
            _ => Err(CuError::INVALID_VALUE),
        })?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, addr) }
    }

    fn cuGraphNodeSetEnabled(e: CUgraphExec, h: CUgraphNode, enabled: c_uint) {
        Runtime::get()?;
        state().store.set_enabled(exec_id(e)?, node_id(h)?, enabled != 0)
    }

    fn cuGraphNodeGetEnabled(e: CUgraphExec, h: CUgraphNode, out: *mut c_uint) {
        Runtime::get()?;
        let on = state().store.enabled(exec_id(e)?, node_id(h)?)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, c_uint::from(on)) }
    }

    fn cuGraphInstantiateWithFlags(out: *mut CUgraphExec, g: CUgraph, flags: u64) {
        if flags & INSTANTIATE_UPLOAD != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        instantiate(out, g, flags)
    }

    fn cuGraphInstantiateWithParams(out: *mut CUgraphExec, g: CUgraph, p: *mut CUDA_GRAPH_INSTANTIATE_PARAMS) {
        instantiate_with_params(out, g, p)
    }

    fn cuGraphInstantiateWithParams_ptsz(out: *mut CUgraphExec, g: CUgraph, p: *mut CUDA_GRAPH_INSTANTIATE_PARAMS) {
        instantiate_with_params(out, g, p)
    }

    fn cuGraphExecGetFlags(e: CUgraphExec, out: *mut u64) {
        Runtime::get()?;
        let flags = state().store.exec(exec_id(e)?)?.flags;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, flags) }
    }

    fn cuGraphExecDestroy(e: CUgraphExec) {
        let rt = Runtime::get()?;
        let e = exec_id(e)?;
        let exec = state().store.destroy_exec(e)?;
        if exec.device {
            rt.session.graph_exec_destroy(e)?;
        }
        let ops: Vec<Op> = exec.steps.into_iter().map(|s| s.op).collect();
        mempool::let_go(rt, &ops)
    }

    fn cuGraphLaunch(e: CUgraphExec, h: CUstream) { launch(e, h) }
    fn cuGraphLaunch_ptsz(e: CUgraphExec, h: CUstream) { launch(e, h) }

    /// Nothing to upload: the steps are queued calls made at launch.
    fn cuGraphUpload(e: CUgraphExec, h: CUstream) { upload(e, h) }
    fn cuGraphUpload_ptsz(e: CUgraphExec, h: CUstream) { upload(e, h) }

    fn cuGraphExecUpdate_v2(e: CUgraphExec, g: CUgraph, info: *mut CUgraphExecUpdateResultInfo) {
        exec_update(e, g, info)
    }

    fn cuGraphDebugDotPrint(g: CUgraph, path: *const c_char, flags: c_uint) { dot_print(g, path, flags) }
}

/// The pre-CUDA-12.3 (and pre-12.0) forms of the calls above, without
/// edge data or with version-1 kernel parameters: older runtimes resolve
/// these (`proc_address::VERSIONED`).
pub mod v1 {
    use super::*;

    fn exec_update_v1(e: CUgraphExec, g: CUgraph, err_node: *mut CUgraphNode, result: *mut c_uint) -> CuResult {
        let mut info = [0usize; 3];
        let r = exec_update(e, g, info.as_mut_ptr().cast());
        // SAFETY: out-pointers per the CUDA API.
        unsafe {
            put(err_node, info[1] as CUgraphNode)?;
            put(result, info[0] as u32)?;
        }
        r
    }

    fn instantiate_v1(
        out: *mut CUgraphExec,
        g: CUgraph,
        err_node: *mut CUgraphNode,
        log: *mut c_char,
        len: usize,
    ) -> CuResult {
        if !err_node.is_null() {
            // SAFETY: optional out-pointer per the CUDA API.
            unsafe { put(err_node, std::ptr::null_mut()) }?;
        }
        if !log.is_null() && len > 0 {
            // SAFETY: `len` writable bytes per the CUDA API.
            unsafe { log.write(0) };
        }
        instantiate(out, g, 0)
    }

    crate::exports! {
        fn cuGraphAddKernelNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, p: *const c_void) {
            // SAFETY: a CUDA_KERNEL_NODE_PARAMS_v1 per the CUDA API.
            add_with(out, g, deps, n, |rt| unsafe { read_kernel(rt, p, false) })
        }
        fn cuGraphKernelNodeGetParams(h: CUgraphNode, out: *mut c_void) { kernel_get(h, out, false) }
        fn cuGraphKernelNodeSetParams(h: CUgraphNode, p: *const c_void) {
            let rt = Runtime::with_context()?;
            // SAFETY: a CUDA_KERNEL_NODE_PARAMS_v1 per the CUDA API.
            let op = unsafe { read_kernel(rt, p, false) }?;
            set_op(h, op)
        }
        fn cuGraphExecKernelNodeSetParams(e: CUgraphExec, h: CUgraphNode, p: *const c_void) {
            let rt = Runtime::with_context()?;
            // SAFETY: a CUDA_KERNEL_NODE_PARAMS_v1 per the CUDA API.
            let op = unsafe { read_kernel(rt, p, false) }?;
            exec_set_op(e, h, op)
        }
        fn cuGraphAddNode(out: *mut CUgraphNode, g: CUgraph, deps: *const CUgraphNode, n: usize, p: *mut CUgraphNodeParams) {
            add_generic(out, g, deps, n, p)
        }
        fn cuGraphGetEdges(g: CUgraph, from: *mut CUgraphNode, to: *mut CUgraphNode, count: *mut usize) {
            list_edges(g, from, to, std::ptr::null_mut(), count)
        }
        fn cuGraphNodeGetDependencies(h: CUgraphNode, out: *mut CUgraphNode, count: *mut usize) {
            node_neighbours(h, out, std::ptr::null_mut(), count, false)
        }
        fn cuGraphNodeGetDependentNodes(h: CUgraphNode, out: *mut CUgraphNode, count: *mut usize) {
            node_neighbours(h, out, std::ptr::null_mut(), count, true)
        }
        fn cuGraphAddDependencies(g: CUgraph, from: *const CUgraphNode, to: *const CUgraphNode, n: usize) {
            edit_edges(g, from, to, std::ptr::null(), n, true)
        }
        fn cuGraphRemoveDependencies(g: CUgraph, from: *const CUgraphNode, to: *const CUgraphNode, n: usize) {
            edit_edges(g, from, to, std::ptr::null(), n, false)
        }
        fn cuGraphExecUpdate(e: CUgraphExec, g: CUgraph, err_node: *mut CUgraphNode, result: *mut c_uint) {
            exec_update_v1(e, g, err_node, result)
        }
        fn cuGraphInstantiate(out: *mut CUgraphExec, g: CUgraph, err_node: *mut CUgraphNode, log: *mut c_char, len: usize) {
            instantiate_v1(out, g, err_node, log, len)
        }
        fn cuGraphInstantiate_v2(out: *mut CUgraphExec, g: CUgraph, err_node: *mut CUgraphNode, log: *mut c_char, len: usize) {
            instantiate_v1(out, g, err_node, log, len)
        }
    }
}

fn upload(e: CUgraphExec, h: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    state().store.exec(exec_id(e)?)?;
    rt.stream(h as usize).map(drop)
}

fn instantiate_with_params(out: *mut CUgraphExec, g: CUgraph, p: *mut CUDA_GRAPH_INSTANTIATE_PARAMS) -> CuResult {
    let rt = Runtime::with_context()?;
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let words = p.cast::<u64>();
    // SAFETY: a CUDA_GRAPH_INSTANTIATE_PARAMS: flags, upload stream, error
    // node out, result out (each 8 bytes).
    let (flags, stream) = unsafe { (get(words)?, get(words.add(1))? as usize) };
    if flags & INSTANTIATE_UPLOAD != 0 {
        rt.stream(stream)?;
    }
    let result = instantiate(out, g, flags);
    // SAFETY: as above; the result is an enum (4 bytes).
    unsafe {
        put(words.add(2), 0)?;
        put(words.add(3).cast::<u32>(), if result.is_ok() { 0 } else { 1 })?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_keep_kinds_apart() {
        let g = graph_handle(7);
        assert_eq!(graph_id(g), Ok(7));
        assert_eq!(node_id(g as usize as CUgraphNode), Err(CuError::INVALID_VALUE));
        assert_eq!(exec_id(exec_handle(3)), Ok(3));
        assert_eq!(graph_id(std::ptr::null_mut()), Err(CuError::INVALID_VALUE));
        assert_eq!(graph_id(0x1234 as CUgraph), Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn mirrors_match_cuda_layouts() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(Memcpy3D, dst_type), offset_of!(CUDA_MEMCPY3D, dstMemoryType));
        assert_eq!(offset_of!(Memcpy3D, depth), offset_of!(CUDA_MEMCPY3D, Depth));
        assert_eq!(offset_of!(KernelParams, kern), offset_of!(CUDA_KERNEL_NODE_PARAMS, kern));
        assert_eq!(offset_of!(AllocParams, dptr), offset_of!(CUDA_MEM_ALLOC_NODE_PARAMS, dptr));
        assert_eq!(offset_of!(AllocParams, size), offset_of!(CUDA_MEM_ALLOC_NODE_PARAMS, bytesize));
    }

    #[test]
    fn lists_are_written_the_cuda_way() {
        let items = [1usize, 2, 3];
        let mut count = 0usize;
        // SAFETY: a null array asks for the count only.
        unsafe { put_list(std::ptr::null_mut(), &raw mut count, &items, 0) }.expect("count");
        assert_eq!(count, 3);
        let mut out = [9usize; 5];
        count = 5;
        // SAFETY: five slots.
        unsafe { put_list(out.as_mut_ptr(), &raw mut count, &items, 0) }.expect("list");
        assert_eq!((out, count), ([1, 2, 3, 0, 0], 3));
        let mut edges = [7u8; 16];
        // SAFETY: two entries.
        assert_eq!(unsafe { check_edge_data(edges.as_ptr().cast(), 2) }, Err(CuError::INVALID_VALUE));
        edges = [0; 16];
        // SAFETY: as above.
        assert_eq!(unsafe { check_edge_data(edges.as_ptr().cast(), 2) }, Ok(()));
        // A programmatic edge: valid, but not for a capture's dependencies.
        let programmatic: EdgeData = [1, 0, 1, 0, 0, 0, 0, 0];
        // SAFETY: one entry.
        assert_eq!(unsafe { check_edge_data(programmatic.as_ptr().cast(), 1) }, Err(CuError::NOT_SUPPORTED));
    }

    #[test]
    fn edge_data_follows_cudas_rules() {
        let read = |e: EdgeData| {
            // SAFETY: one entry.
            unsafe { read_edge_data(e.as_ptr().cast(), 1) }
        };
        for ok in [[0; 8], [1, 0, 1, 0, 0, 0, 0, 0], [2, 0, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]] {
            assert_eq!(read(ok), Ok(vec![ok]), "{ok:?}");
        }
        for bad in [
            [0, 1, 0, 0, 0, 0, 0, 0], // a port into a node
            [3, 0, 0, 0, 0, 0, 0, 0], // no such port
            [0, 0, 1, 0, 0, 0, 0, 0], // programmatic from the default port
            [1, 0, 2, 0, 0, 0, 0, 0], // no such type
            [1, 0, 1, 0, 0, 0, 0, 9], // reserved
        ] {
            assert_eq!(read(bad), Err(CuError::INVALID_VALUE), "{bad:?}");
        }
        // SAFETY: null: two default entries.
        assert_eq!(unsafe { read_edge_data(std::ptr::null(), 2) }, Ok(vec![[0; 8]; 2]));
    }
}
