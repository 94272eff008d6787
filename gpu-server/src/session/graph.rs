//! Client graphs with conditional nodes, built as driver graphs
//! (`GraphHandleCreate`, `GraphInstantiate`, `GraphLaunch`,
//! `GraphExecDestroy`, `GraphDestroy`).
//!
//! A conditional handle belongs to the twin of the client graph it was
//! created for; an instantiation names that graph, and every conditional
//! node in its tree must use one of the twin's handles. The tree from the
//! wire is parsed into [`crate::device::graph::Body`] here: dependency
//! indices, node and depth bounds, kernels checked as launches are, every
//! address against the session's memory. Anything else is an error reply.

use super::{CallOutcome, SessionState, stream_of};
use crate::device::graph::{Body, ConditionalKind, MAX_DEPTH, MAX_NODES, Node, NodeKind};
use crate::device::{ACCESS_READ, ACCESS_READWRITE, BackendSession};
use crate::error::CallError;
use gpupool_proto::v1::{self, call_result::Value, graph_node::Kind};
use std::collections::{HashMap, HashSet};

/// The driver graph of one client graph and the handles made on it.
struct Twin<G> {
    graph: G,
    handles: HashSet<u64>,
}

/// A session's driver graphs and instantiated graphs, by client id.
pub(super) struct Graphs<G, E> {
    twins: HashMap<u64, Twin<G>>,
    execs: HashMap<u64, E>,
}

impl<G, E> Default for Graphs<G, E> {
    fn default() -> Self {
        Self { twins: HashMap::new(), execs: HashMap::new() }
    }
}

impl<G, E> Graphs<G, E> {
    /// Whether the session holds any driver graph (which cannot migrate).
    pub(super) fn is_empty(&self) -> bool {
        self.twins.is_empty() && self.execs.is_empty()
    }
}

/// Running count of a tree's nodes, bounded by [`MAX_NODES`].
struct Budget(usize);

impl Budget {
    fn take(&mut self) -> Result<(), CallError> {
        self.0 += 1;
        if self.0 > MAX_NODES {
            return Err(CallError::invalid_value(format!("a graph of more than {MAX_NODES} nodes")));
        }
        Ok(())
    }
}

impl<S: BackendSession> SessionState<S> {
    pub(super) fn graph_handle_create(&mut self, h: v1::GraphHandleCreate) -> CallOutcome {
        if !self.graphs.twins.contains_key(&h.graph) {
            if self.graphs.twins.len() >= self.limits.max_handles {
                return Err(CallError::out_of_memory(format!(
                    "the session holds {} driver graphs already",
                    self.graphs.twins.len()
                )));
            }
            let graph = self.dev.graph_create()?;
            tracing::debug!(graph = h.graph, "driver graph created for conditional handles");
            self.graphs.twins.insert(h.graph, Twin { graph, handles: HashSet::new() });
        }
        let twin = self.graphs.twins.get_mut(&h.graph).ok_or_else(|| unknown_graph(h.graph))?;
        let handle = self.dev.graph_conditional_handle(&twin.graph, h.default_value, h.flags)?;
        twin.handles.insert(handle);
        tracing::debug!(graph = h.graph, handle, default = h.default_value, flags = h.flags, "conditional handle");
        Ok(Some(Value::ConditionalHandle(handle)))
    }

    pub(super) fn graph_instantiate(&mut self, g: v1::GraphInstantiate) -> CallOutcome {
        if g.exec == 0 || self.graphs.execs.contains_key(&g.exec) {
            return Err(CallError::invalid_value(format!("graph exec id {} is reserved or in use", g.exec)));
        }
        if self.graphs.execs.len() >= self.limits.max_handles {
            return Err(CallError::out_of_memory(format!(
                "the session holds {} instantiated graphs already",
                self.graphs.execs.len()
            )));
        }
        let handles = &self.graphs.twins.get(&g.graph).ok_or_else(|| unknown_graph(g.graph))?.handles;
        let wire = g.body.as_ref().ok_or_else(|| CallError::invalid_value("graph instantiation without a body"))?;
        let checked = self.check_body(wire, handles, 0, &mut Budget(0)).inspect_err(|e| {
            tracing::debug!(graph = g.graph, exec = g.exec, error = %e, "graph refused");
        })?;
        let modules = &self.modules;
        let body = checked.resolve(&|id| {
            modules.get(&id).map(|m| &m.module).ok_or_else(|| CallError::invalid_handle(format!("unknown module {id}")))
        })?;
        let twin = self.graphs.twins.get_mut(&g.graph).ok_or_else(|| unknown_graph(g.graph))?;
        // Only flags that need nothing of the server: AUTO_FREE_ON_LAUNCH
        // and USE_NODE_PRIORITY (an upload needs a stream; the client has
        // checked the rest).
        let exec = self.dev.graph_instantiate(&mut twin.graph, &body, g.flags & (1 | 8)).inspect_err(|e| {
            tracing::debug!(graph = g.graph, exec = g.exec, error = %e, "driver refused the graph");
        })?;
        tracing::debug!(graph = g.graph, exec = g.exec, "graph instantiated on the device");
        self.graphs.execs.insert(g.exec, exec);
        Ok(None)
    }

    pub(super) fn graph_launch(&mut self, l: v1::GraphLaunch) -> CallOutcome {
        let exec = self.graphs.execs.get(&l.exec).ok_or_else(|| unknown_exec(l.exec))?;
        let stream = stream_of(&self.streams, l.stream)?;
        self.dev.graph_launch(exec, stream)?;
        Ok(None)
    }

    pub(super) fn graph_exec_destroy(&mut self, exec: u64) -> CallOutcome {
        self.graphs.execs.remove(&exec).ok_or_else(|| unknown_exec(exec))?;
        Ok(None)
    }

    pub(super) fn graph_destroy(&mut self, graph: u64) -> CallOutcome {
        self.graphs.twins.remove(&graph).ok_or_else(|| unknown_graph(graph))?;
        Ok(None)
    }

    /// Parses one body of a tree: dependencies on earlier nodes only,
    /// kernels as launches are checked, memory inside the session's, each
    /// conditional node with a handle of the graph.
    fn check_body(
        &self,
        body: &v1::GraphBody,
        handles: &HashSet<u64>,
        depth: usize,
        budget: &mut Budget,
    ) -> Result<Body<u32>, CallError> {
        if depth > MAX_DEPTH {
            return Err(CallError::invalid_value(format!("graph nested deeper than {MAX_DEPTH} levels")));
        }
        let mut nodes = Vec::with_capacity(body.nodes.len().min(MAX_NODES));
        for (index, node) in body.nodes.iter().enumerate() {
            budget.take()?;
            let mut deps = Vec::with_capacity(node.deps.len());
            for &d in &node.deps {
                let d = d as usize;
                if d >= index || deps.contains(&d) {
                    return Err(CallError::invalid_value(format!(
                        "graph node {index} depends on node {d}, not an earlier one (or twice)"
                    )));
                }
                deps.push(d);
            }
            let kind = self.check_node(node.kind.as_ref(), handles, depth, budget)?;
            nodes.push(Node { deps, kind });
        }
        Ok(Body { nodes })
    }

    fn check_node(
        &self,
        kind: Option<&Kind>,
        handles: &HashSet<u64>,
        depth: usize,
        budget: &mut Budget,
    ) -> Result<NodeKind<u32>, CallError> {
        Ok(match kind.ok_or_else(|| CallError::invalid_value("graph node without a kind"))? {
            Kind::Kernel(l) => {
                let (function, dims, attrs) = self.check_launch(l)?;
                let events = l
                    .attributes
                    .as_ref()
                    .is_some_and(|a| a.programmatic_event.is_some() || a.completion_event.is_some());
                if attrs.any() || events {
                    return Err(CallError::not_supported("launch attributes on a kernel of a device-built graph"));
                }
                NodeKind::Kernel { module: l.module, function, dims, params: l.params.clone() }
            }
            Kind::Memset(m) => {
                if !matches!(m.element_size, 1 | 2 | 4) || m.width == 0 || m.height == 0 {
                    return Err(CallError::invalid_value(format!(
                        "graph memset of {}x{} elements of {} bytes",
                        m.width, m.height, m.element_size
                    )));
                }
                let row = m.width.checked_mul(u64::from(m.element_size));
                let extent = row.and_then(|row| {
                    if m.height > 1 && m.pitch < row {
                        return None;
                    }
                    (m.height - 1).checked_mul(m.pitch)?.checked_add(row)
                });
                let extent = extent.ok_or_else(|| CallError::invalid_value("graph memset rows overflow or overlap"))?;
                self.check_range(m.dst, extent, ACCESS_READWRITE)?;
                NodeKind::Memset {
                    dst: m.dst,
                    pitch: m.pitch,
                    value: m.value,
                    element_size: m.element_size,
                    width: m.width,
                    height: m.height,
                }
            }
            Kind::Memcpy(c) => {
                if c.size == 0 {
                    return Err(CallError::invalid_value("graph copy of 0 bytes"));
                }
                self.check_range(c.dst, c.size, ACCESS_READWRITE)?;
                self.check_range(c.src, c.size, ACCESS_READ)?;
                NodeKind::Copy { dst: c.dst, src: c.src, size: c.size }
            }
            Kind::Empty(_) => NodeKind::Empty,
            Kind::Child(b) => NodeKind::Child(self.check_body(b, handles, depth + 1, budget)?),
            Kind::Conditional(c) => {
                let kind = ConditionalKind::from_raw(c.r#type)
                    .ok_or_else(|| CallError::invalid_value(format!("conditional node type {}", c.r#type)))?;
                if !kind.takes_bodies(c.bodies.len()) {
                    return Err(CallError::invalid_value(format!(
                        "a {kind:?} conditional node with {} bodies",
                        c.bodies.len()
                    )));
                }
                if !handles.contains(&c.handle) {
                    return Err(CallError::invalid_value(format!(
                        "conditional handle {:#x} was not created on this graph",
                        c.handle
                    )));
                }
                let bodies = c
                    .bodies
                    .iter()
                    .map(|b| self.check_body(b, handles, depth + 1, budget))
                    .collect::<Result<_, _>>()?;
                NodeKind::Conditional { handle: c.handle, kind, bodies }
            }
        })
    }
}

fn unknown_graph(id: u64) -> CallError {
    CallError::invalid_handle(format!("graph {id} has no driver graph (no conditional handle was made for it)"))
}

fn unknown_exec(id: u64) -> CallError {
    CallError::invalid_handle(format!("unknown graph exec {id}"))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{GRANULARITY, code, load_builtin, session};
    use super::*;
    use gpupool_proto::cuda;
    use gpupool_proto::v1::call::Op;

    fn node(deps: Vec<u32>, kind: Kind) -> v1::GraphNode {
        v1::GraphNode { deps, kind: Some(kind) }
    }

    fn empty() -> Kind {
        Kind::Empty(v1::GraphEmpty {})
    }

    fn conditional(handle: u64, r#type: u32, bodies: Vec<v1::GraphBody>) -> Kind {
        Kind::Conditional(v1::GraphConditional { handle, r#type, bodies })
    }

    /// The built-in `empty` kernel (function 0 of module 1).
    fn kernel() -> Kind {
        let d = Some(v1::Dim3 { x: 1, y: 1, z: 1 });
        Kind::Kernel(v1::Launch { module: 1, function: 0, grid: d, block: d, ..Default::default() })
    }

    fn body(nodes: Vec<v1::GraphNode>) -> v1::GraphBody {
        v1::GraphBody { nodes }
    }

    fn check(s: &SessionState<impl BackendSession>, b: &v1::GraphBody) -> Result<Body<u32>, CallError> {
        s.check_body(b, &HashSet::from([7]), 0, &mut Budget(0))
    }

    #[test]
    fn the_emulator_says_conditional_graphs_need_a_gpu() {
        let mut s = session();
        let r = s.execute(Op::GraphHandleCreate(v1::GraphHandleCreate { graph: 1, default_value: 0, flags: 0 }));
        let e = r.expect_err("no driver graphs here");
        assert_eq!(e.code, cuda::NOT_SUPPORTED);
        assert!(e.message.contains("GPU"), "{}", e.message);
        assert!(s.graphs.is_empty());
        let instantiate = v1::GraphInstantiate { graph: 1, exec: 2, flags: 0, body: Some(body(vec![])) };
        assert_eq!(code(s.execute(Op::GraphInstantiate(instantiate))), cuda::INVALID_HANDLE, "no twin");
        assert_eq!(code(s.execute(Op::GraphLaunch(v1::GraphLaunch { exec: 2, stream: 0 }))), cuda::INVALID_HANDLE);
        assert_eq!(code(s.execute(Op::GraphExecDestroy(v1::GraphExecDestroy { exec: 2 }))), cuda::INVALID_HANDLE);
        assert_eq!(code(s.execute(Op::GraphDestroy(v1::GraphDestroy { graph: 1 }))), cuda::INVALID_HANDLE);
    }

    #[test]
    fn a_tree_is_parsed_with_its_bodies() {
        let mut s = session();
        load_builtin(&mut s, 1);
        let base = s.va_base();
        assert_eq!(code(s.mem_map(base, GRANULARITY)), 0);
        let memset =
            Kind::Memset(v1::GraphMemset { dst: base, pitch: 64, value: 1, element_size: 4, width: 16, height: 4 });
        let copy = Kind::Memcpy(v1::MemcpyDtoD { dst: base, src: base + 256, size: 256, stream: 0 });
        let if_body = body(vec![node(vec![], memset), node(vec![0], kernel())]);
        let tree = body(vec![
            node(vec![], kernel()),
            node(vec![0], conditional(7, 0, vec![if_body, body(vec![node(vec![], copy)])])),
            node(vec![1], Kind::Child(body(vec![node(vec![], empty())]))),
        ]);
        let parsed = check(&s, &tree).expect("valid tree");
        assert_eq!(parsed.nodes.len(), 3);
        assert_eq!(parsed.nodes[2].deps, vec![1]);
        let NodeKind::Conditional { kind, bodies, .. } = &parsed.nodes[1].kind else { panic!("conditional") };
        assert_eq!((*kind, bodies.len()), (ConditionalKind::If, 2));
        assert!(matches!(bodies[0].nodes[1].kind, NodeKind::Kernel { module: 1, function: 0, .. }));
    }

    #[test]
    fn bad_trees_are_refused_with_typed_errors() {
        let mut s = session();
        load_builtin(&mut s, 1);
        let base = s.va_base();
        assert_eq!(code(s.mem_map(base, GRANULARITY)), 0);
        let refused = |tree: v1::GraphBody| check(&s, &tree).map(drop).map_err(|e| e.code);
        // Dependencies: later, self, repeated.
        assert_eq!(refused(body(vec![node(vec![1], empty()), node(vec![], empty())])), Err(cuda::INVALID_VALUE));
        assert_eq!(refused(body(vec![node(vec![0], empty())])), Err(cuda::INVALID_VALUE));
        let twice = body(vec![node(vec![], empty()), node(vec![0, 0], empty())]);
        assert_eq!(refused(twice), Err(cuda::INVALID_VALUE));
        // A node without a kind.
        assert_eq!(refused(body(vec![v1::GraphNode { deps: vec![], kind: None }])), Err(cuda::INVALID_VALUE));
        // Conditional nodes: an unknown handle, type or body count.
        let one = || vec![body(vec![])];
        assert_eq!(refused(body(vec![node(vec![], conditional(8, 0, one()))])), Err(cuda::INVALID_VALUE));
        assert_eq!(refused(body(vec![node(vec![], conditional(7, 3, one()))])), Err(cuda::INVALID_VALUE));
        let two = vec![body(vec![]), body(vec![])];
        assert_eq!(refused(body(vec![node(vec![], conditional(7, 1, two))])), Err(cuda::INVALID_VALUE));
        assert_eq!(refused(body(vec![node(vec![], conditional(7, 2, vec![]))])), Err(cuda::INVALID_VALUE));
        // Kernels are checked as launches are.
        let Kind::Kernel(mut l) = kernel() else { unreachable!() };
        l.function = 99;
        assert_eq!(refused(body(vec![node(vec![], Kind::Kernel(l.clone()))])), Err(cuda::INVALID_HANDLE));
        l.function = 0;
        l.grid = None;
        assert_eq!(refused(body(vec![node(vec![], Kind::Kernel(l.clone()))])), Err(cuda::INVALID_VALUE));
        let Kind::Kernel(mut l) = kernel() else { unreachable!() };
        l.attributes = Some(v1::LaunchAttributes { cooperative: true, ..Default::default() });
        assert_eq!(refused(body(vec![node(vec![], Kind::Kernel(l))])), Err(cuda::NOT_SUPPORTED));
        // Memory outside the session's, or rows that overlap.
        let outside = Kind::Memcpy(v1::MemcpyDtoD { dst: base, src: base + GRANULARITY, size: 4, stream: 0 });
        assert_eq!(refused(body(vec![node(vec![], outside)])), Err(cuda::INVALID_VALUE));
        let rows = |pitch, height| {
            Kind::Memset(v1::GraphMemset { dst: base, pitch, value: 0, element_size: 4, width: 16, height })
        };
        assert_eq!(refused(body(vec![node(vec![], rows(32, 2))])), Err(cuda::INVALID_VALUE), "overlapping rows");
        assert_eq!(refused(body(vec![node(vec![], rows(u64::MAX, 3))])), Err(cuda::INVALID_VALUE), "overflow");
        assert_eq!(refused(body(vec![node(vec![], rows(64, 0))])), Err(cuda::INVALID_VALUE), "empty");
        // Depth and size bounds.
        let mut deep = body(vec![node(vec![], empty())]);
        for _ in 0..=MAX_DEPTH {
            deep = body(vec![node(vec![], Kind::Child(deep))]);
        }
        assert_eq!(refused(deep), Err(cuda::INVALID_VALUE));
        let wide = body((0..=MAX_NODES).map(|_| node(vec![], empty())).collect());
        assert_eq!(refused(wide), Err(cuda::INVALID_VALUE));
    }
}
