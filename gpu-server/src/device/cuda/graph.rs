//! Driver graphs for client graphs with conditional nodes: a twin
//! `CUgraph` per client graph holds the conditional handles; instantiation
//! fills it with the checked tree of [`crate::device::graph`] and keeps the
//! `CUgraphExec`.

use super::driver::{self, warn_on_error};
use super::resources::Context;
use super::{Module, kernel_of, param_pointers};
use crate::device::DeviceResult;
use crate::device::graph::{Body, ConditionalKind, NodeKind};
use crate::error::CallError;
use cudarc::driver::sys::{self, CUgraph, CUgraphExec, CUgraphNode};
use std::sync::Arc;

/// A driver graph; destroyed (with its conditional handles) on drop.
#[derive(Debug)]
pub struct Graph {
    raw: CUgraph,
    context: Arc<Context>,
}

impl Graph {
    pub(super) fn new(context: Arc<Context>) -> DeviceResult<Self> {
        let mut raw: CUgraph = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current on this thread.
        driver::check(unsafe { sys::cuGraphCreate(&mut raw, 0) }, "cuGraphCreate")?;
        Ok(Self { raw, context })
    }

    pub(super) fn conditional_handle(&self, default_value: u32, flags: u32) -> DeviceResult<u64> {
        let mut handle: sys::CUgraphConditionalHandle = 0;
        // SAFETY: valid out-pointer; a live graph; the session's context.
        let r = unsafe {
            sys::cuGraphConditionalHandleCreate(&mut handle, self.raw, self.context.raw, default_value, flags)
        };
        driver::check(r, "cuGraphConditionalHandleCreate")?;
        Ok(handle)
    }

    /// Removes every node (the handles stay), then adds `body`'s.
    pub(super) fn rebuild(&mut self, body: &Body<&Module>) -> DeviceResult<()> {
        let mut count = 0usize;
        // SAFETY: a live graph; a null array asks for the count.
        let r = unsafe { sys::cuGraphGetNodes(self.raw, std::ptr::null_mut(), &mut count) };
        driver::check(r, "cuGraphGetNodes")?;
        // An empty graph (the first instantiation): the driver refuses a
        // node array with a count of 0.
        if count > 0 {
            let mut nodes: Vec<CUgraphNode> = vec![std::ptr::null_mut(); count];
            // SAFETY: `count` slots.
            let r = unsafe { sys::cuGraphGetNodes(self.raw, nodes.as_mut_ptr(), &mut count) };
            driver::check(r, "cuGraphGetNodes")?;
            for node in nodes.into_iter().take(count) {
                // SAFETY: a node of this graph, destroyed once.
                driver::check(unsafe { sys::cuGraphDestroyNode(node) }, "cuGraphDestroyNode")?;
            }
        }
        fill(self.raw, &self.context, body)
    }

    pub(super) fn instantiate(&self, flags: u64) -> DeviceResult<GraphExec> {
        let mut raw: CUgraphExec = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a live graph.
        let r = unsafe { sys::cuGraphInstantiateWithFlags(&mut raw, self.raw, flags) };
        driver::check(r, "cuGraphInstantiateWithFlags")?;
        Ok(GraphExec { raw, _context: self.context.clone() })
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: the graph came from cuGraphCreate and is destroyed only here.
        warn_on_error(unsafe { sys::cuGraphDestroy(self.raw) }, "cuGraphDestroy");
    }
}

/// An instantiated graph; destroyed on drop.
#[derive(Debug)]
pub struct GraphExec {
    pub(super) raw: CUgraphExec,
    _context: Arc<Context>,
}

impl Drop for GraphExec {
    fn drop(&mut self) {
        // SAFETY: the exec came from cuGraphInstantiateWithFlags and is
        // destroyed only here.
        warn_on_error(unsafe { sys::cuGraphExecDestroy(self.raw) }, "cuGraphExecDestroy");
    }
}

/// Adds `body`'s nodes to `graph`, bodies of conditional nodes into the
/// graphs the driver made for them.
fn fill(graph: CUgraph, context: &Arc<Context>, body: &Body<&Module>) -> DeviceResult<()> {
    let ctx = context.raw;
    let mut made: Vec<CUgraphNode> = Vec::with_capacity(body.nodes.len());
    for (index, node) in body.nodes.iter().enumerate() {
        let deps: Vec<CUgraphNode> = node.deps.iter().map(|&d| made[d]).collect();
        let deps_ptr = if deps.is_empty() { std::ptr::null() } else { deps.as_ptr() };
        let mut out: CUgraphNode = std::ptr::null_mut();
        let (r, what) = match &node.kind {
            NodeKind::Kernel { module, function, dims, params } => {
                let kernel = kernel_of(module, *function)?;
                let mut pointers = param_pointers(params, &kernel.params, kernel.params_size)?;
                // SAFETY: a plain C struct; all-zero is its "unset" value.
                let mut p: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
                p.func = kernel.raw;
                [p.gridDimX, p.gridDimY, p.gridDimZ] = dims.grid;
                [p.blockDimX, p.blockDimY, p.blockDimZ] = dims.block;
                p.sharedMemBytes = dims.shared_mem_bytes;
                p.kernelParams = if pointers.is_empty() { std::ptr::null_mut() } else { pointers.as_mut_ptr() };
                // SAFETY: the pointers address the parameter bytes, laid out
                // as the kernel's layout says (checked); the driver copies
                // them into the node before returning.
                let r = unsafe { sys::cuGraphAddKernelNode_v2(&mut out, graph, deps_ptr, deps.len(), &p) };
                (r, "cuGraphAddKernelNode_v2")
            }
            NodeKind::Memset { dst, pitch, value, element_size, width, height } => {
                let size = |v: u64| usize::try_from(v).map_err(|_| CallError::invalid_value("memset size"));
                let p = sys::CUDA_MEMSET_NODE_PARAMS {
                    dst: *dst,
                    pitch: size(*pitch)?,
                    value: *value,
                    elementSize: *element_size,
                    width: size(*width)?,
                    height: size(*height)?,
                };
                // SAFETY: valid pointers for the call; the range was checked
                // against the session's memory.
                let r = unsafe { sys::cuGraphAddMemsetNode(&mut out, graph, deps_ptr, deps.len(), &p, ctx) };
                (r, "cuGraphAddMemsetNode")
            }
            NodeKind::Copy { dst, src, size } => {
                // SAFETY: a plain C struct; all-zero is its "unset" value.
                let mut p: sys::CUDA_MEMCPY3D = unsafe { std::mem::zeroed() };
                p.srcMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
                p.srcDevice = *src;
                p.dstMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
                p.dstDevice = *dst;
                p.WidthInBytes = usize::try_from(*size).map_err(|_| CallError::invalid_value("copy size"))?;
                p.Height = 1;
                p.Depth = 1;
                // SAFETY: as for the memset.
                let r = unsafe { sys::cuGraphAddMemcpyNode(&mut out, graph, deps_ptr, deps.len(), &p, ctx) };
                (r, "cuGraphAddMemcpyNode")
            }
            NodeKind::Empty => {
                // SAFETY: valid pointers for the call.
                let r = unsafe { sys::cuGraphAddEmptyNode(&mut out, graph, deps_ptr, deps.len()) };
                (r, "cuGraphAddEmptyNode")
            }
            NodeKind::Child(child) => {
                // A temporary graph: the driver copies it into the node.
                let scratch = Graph::new(context.clone())?;
                fill(scratch.raw, context, child)?;
                // SAFETY: valid pointers; the driver clones the child graph.
                let r = unsafe { sys::cuGraphAddChildGraphNode(&mut out, graph, deps_ptr, deps.len(), scratch.raw) };
                (r, "cuGraphAddChildGraphNode")
            }
            NodeKind::Conditional { handle, kind, bodies } => {
                // SAFETY: a plain C struct; all-zero is its "unset" value.
                let mut p: sys::CUgraphNodeParams = unsafe { std::mem::zeroed() };
                p.type_ = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_CONDITIONAL;
                let size = u32::try_from(bodies.len()).map_err(|_| CallError::invalid_value("conditional bodies"))?;
                // SAFETY: the union is all zero; the conditional member is
                // the one the type names.
                let cond = unsafe { &mut p.__bindgen_anon_1.conditional };
                cond.handle = *handle;
                cond.type_ = conditional_type(*kind);
                cond.size = size;
                cond.ctx = ctx;
                // SAFETY: valid pointers; no edge data (default edges).
                let r =
                    unsafe { sys::cuGraphAddNode_v2(&mut out, graph, deps_ptr, std::ptr::null(), deps.len(), &mut p) };
                driver::check(r, "cuGraphAddNode_v2 (conditional)").inspect_err(|e| {
                    tracing::debug!(index, handle, ?kind, bodies = bodies.len(), error = %e, "conditional node refused");
                })?;
                // SAFETY: on success the driver wrote the conditional member.
                let graphs = unsafe { p.__bindgen_anon_1.conditional.phGraph_out };
                if graphs.is_null() {
                    return Err(CallError::new(
                        gpupool_proto::cuda::UNKNOWN,
                        "the driver returned no body graphs for a conditional node",
                    ));
                }
                for (i, b) in bodies.iter().enumerate() {
                    // SAFETY: the driver's array holds `size` graphs, alive
                    // as long as the node.
                    let body_graph = unsafe { *graphs.add(i) };
                    fill(body_graph, context, b)?;
                }
                made.push(out);
                continue;
            }
        };
        driver::check(r, what).inspect_err(|e| tracing::debug!(index, error = %e, "graph node refused"))?;
        made.push(out);
    }
    Ok(())
}

fn conditional_type(kind: ConditionalKind) -> sys::CUgraphConditionalNodeType {
    use sys::CUgraphConditionalNodeType as T;
    match kind {
        ConditionalKind::If => T::CU_GRAPH_COND_TYPE_IF,
        ConditionalKind::While => T::CU_GRAPH_COND_TYPE_WHILE,
        ConditionalKind::Switch => T::CU_GRAPH_COND_TYPE_SWITCH,
    }
}
