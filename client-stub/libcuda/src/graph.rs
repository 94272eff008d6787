//! CUDA graphs as client-side objects: the sans-I/O core.
//!
//! A graph is a set of nodes, each an operation the stub can already queue
//! (launch, copy, memset, host function, event record or wait) or a
//! structural one (empty, child graph, memory allocation and free), with
//! dependency edges. Instantiation takes a snapshot of one topological
//! order, child graphs flattened into it; a launch replays that order as
//! ordinary queued calls on one stream, which is a valid serialization of
//! the DAG and costs no round trip. Stream capture (`crate::capture`) builds
//! graphs through the same store.
//!
//! A graph that holds a conditional node (whose condition device code sets
//! through a handle only the driver reads) cannot be replayed that way: it
//! is instantiated as a real driver graph on the server ([`Store::device_tree`]
//! gives the tree sent there), and a launch is one queued call.
//!
//! Nothing here does I/O or touches application memory: operations are
//! plain data (handles and addresses as integers), so the logic is tested
//! as plain Rust. `crate::graph_api` is the C-ABI layer over it.

use crate::abi::{CuError, CuResult};
use gpupool_proto::v1;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Ids of graphs, nodes and executable graphs (one counter for all).
pub(crate) type Id = u64;

/// `CUgraphNodeType` values.
pub(crate) mod kind {
    pub(crate) const KERNEL: u32 = 0;
    pub(crate) const MEMCPY: u32 = 1;
    pub(crate) const MEMSET: u32 = 2;
    pub(crate) const HOST: u32 = 3;
    pub(crate) const GRAPH: u32 = 4;
    pub(crate) const EMPTY: u32 = 5;
    pub(crate) const WAIT_EVENT: u32 = 6;
    pub(crate) const EVENT_RECORD: u32 = 7;
    pub(crate) const MEM_ALLOC: u32 = 10;
    pub(crate) const MEM_FREE: u32 = 11;
    pub(crate) const BATCH_MEM_OP: u32 = 12;
    pub(crate) const CONDITIONAL: u32 = 13;
}

/// `CUgraphConditionalNodeType` values.
pub(crate) mod conditional {
    pub(crate) const IF: u32 = 0;
    pub(crate) const WHILE: u32 = 1;
    pub(crate) const SWITCH: u32 = 2;
}

/// Deepest nesting of child graphs and conditional bodies sent to the
/// server (the server's own bound).
pub(crate) const MAX_DEVICE_DEPTH: usize = 8;

/// Most bodies of a SWITCH node (the server's bound).
pub(crate) const MAX_SWITCH_BODIES: u32 = 256;

/// Checks a conditional node's type and body count as the driver does:
/// IF takes 1 or 2 bodies, WHILE 1, SWITCH at least 1.
pub(crate) fn check_conditional(kind: u32, size: u32) -> CuResult {
    let fits = match kind {
        conditional::IF => matches!(size, 1 | 2),
        conditional::WHILE => size == 1,
        conditional::SWITCH => (1..=MAX_SWITCH_BODIES).contains(&size),
        _ => false,
    };
    if fits { Ok(()) } else { Err(CuError::INVALID_VALUE) }
}

/// A kernel launch with its packed argument bytes (copied at node
/// creation, as CUDA copies them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kernel {
    /// The `CUfunction` or `CUkernel` handle the launch uses.
    pub(crate) func: usize,
    /// The `func` and `kern` fields as the application gave them (what
    /// `cuGraphKernelNodeGetParams` hands back).
    pub(crate) given: [usize; 2],
    pub(crate) grid: [u32; 3],
    pub(crate) block: [u32; 3],
    pub(crate) shared: u32,
    pub(crate) params: Vec<u8>,
    /// The launch attributes of a captured `cuLaunchKernelEx` (clusters,
    /// cooperative, ...), protobuf-encoded so that nodes stay comparable.
    pub(crate) attributes: Option<Vec<u8>>,
}

/// `new` in place of `old`: a kernel's new parameters (no attributes of
/// their own) keep the node's attributes, as `cuGraphKernelNodeSetParams`
/// leaves them (attributes set to their defaults are `Some` of none).
fn keep_attributes(old: &Op, new: Op) -> Op {
    match (old, new) {
        (Op::Kernel(o), Op::Kernel(mut k)) if k.attributes.is_none() => {
            k.attributes.clone_from(&o.attributes);
            Op::Kernel(k)
        }
        (_, new) => new,
    }
}

/// One end of a copy: its first byte (offsets already applied), whether it
/// is device memory, and its row pitch and rows per slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct End {
    pub(crate) device: bool,
    pub(crate) addr: u64,
    pub(crate) pitch: usize,
    pub(crate) height: usize,
}

/// A copy of `depth` slices of `height` rows of `width` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Copy3D {
    pub(crate) dst: End,
    pub(crate) src: End,
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) depth: usize,
}

impl Copy3D {
    /// A linear copy of `n` bytes.
    pub(crate) fn linear(dst: (bool, u64), src: (bool, u64), n: usize) -> Self {
        let end = |(device, addr)| End { device, addr, pitch: n, height: 1 };
        Self { dst: end(dst), src: end(src), width: n, height: 1, depth: 1 }
    }

    /// `true` when both ends are contiguous, so the copy is one linear run.
    pub(crate) fn is_contiguous(&self) -> bool {
        let packed = |e: &End| {
            (self.height * self.depth <= 1 || e.pitch == self.width) && (self.depth <= 1 || e.height == self.height)
        };
        packed(&self.dst) && packed(&self.src)
    }

    /// Byte offset of row `row` of slice `z` at one end.
    pub(crate) fn offset(e: &End, row: usize, z: usize) -> u64 {
        (z * e.height * e.pitch + row * e.pitch) as u64
    }
}

/// A 2D memset of `height` rows of `width` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Set2D {
    pub(crate) dst: u64,
    pub(crate) pitch: usize,
    pub(crate) value: u32,
    pub(crate) element: u32,
    pub(crate) width: usize,
    pub(crate) height: usize,
}

/// What a node does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Empty,
    Kernel(Kernel),
    Memcpy(Copy3D),
    Memset(Set2D),
    /// A host function and its argument (addresses in this process).
    Host {
        func: usize,
        data: usize,
    },
    /// A child graph, owned by the node (a copy of what the application gave).
    Child(Id),
    /// `CUevent` handles, resolved when the node runs.
    EventRecord(usize),
    EventWait(usize),
    /// Graph memory: the address is fixed when the node is created.
    MemAlloc {
        addr: u64,
        size: u64,
    },
    MemFree {
        addr: u64,
    },
    /// Stream memory operations as the application gave them (checked).
    MemOps(Vec<crate::mem_ops::RawMemOp>),
    /// A conditional node: the driver's handle, its
    /// `CUgraphConditionalNodeType` and its body graphs (owned by the node).
    Conditional {
        handle: u64,
        kind: u32,
        bodies: Vec<Id>,
    },
}

impl Op {
    /// The node's `CUgraphNodeType`.
    pub(crate) fn kind(&self) -> u32 {
        match self {
            Op::Empty => kind::EMPTY,
            Op::Kernel(_) => kind::KERNEL,
            Op::Memcpy(_) => kind::MEMCPY,
            Op::Memset(_) => kind::MEMSET,
            Op::Host { .. } => kind::HOST,
            Op::Child(_) => kind::GRAPH,
            Op::EventRecord(_) => kind::EVENT_RECORD,
            Op::EventWait(_) => kind::WAIT_EVENT,
            Op::MemAlloc { .. } => kind::MEM_ALLOC,
            Op::MemFree { .. } => kind::MEM_FREE,
            Op::MemOps(_) => kind::BATCH_MEM_OP,
            Op::Conditional { .. } => kind::CONDITIONAL,
        }
    }

    fn label(&self) -> String {
        match self {
            Op::Empty => "EMPTY".into(),
            Op::Kernel(k) => format!(
                "KERNEL\\nfunc {:#x}\\ngrid ({},{},{}) block ({},{},{})\\nshared {} params {} B",
                k.func,
                k.grid[0],
                k.grid[1],
                k.grid[2],
                k.block[0],
                k.block[1],
                k.block[2],
                k.shared,
                k.params.len()
            ),
            Op::Memcpy(c) => format!(
                "MEMCPY\\n{} {:#x} <- {} {:#x}\\n{}x{}x{} B",
                if c.dst.device { "device" } else { "host" },
                c.dst.addr,
                if c.src.device { "device" } else { "host" },
                c.src.addr,
                c.width,
                c.height,
                c.depth
            ),
            Op::Memset(s) => format!(
                "MEMSET\\n{:#x} value {:#x} element {}\\n{}x{} pitch {}",
                s.dst, s.value, s.element, s.width, s.height, s.pitch
            ),
            Op::Host { func, data } => format!("HOST\\nfn {func:#x} data {data:#x}"),
            Op::Child(g) => format!("GRAPH\\nchild {g}"),
            Op::EventRecord(e) => format!("EVENT_RECORD\\nevent {e:#x}"),
            Op::EventWait(e) => format!("WAIT_EVENT\\nevent {e:#x}"),
            Op::MemAlloc { addr, size } => format!("MEM_ALLOC\\n{addr:#x} {size} B"),
            Op::MemFree { addr } => format!("MEM_FREE\\n{addr:#x}"),
            Op::MemOps(ops) => format!("BATCH_MEM_OP\\n{} operations", ops.len()),
            Op::Conditional { handle, kind, bodies } => {
                format!("CONDITIONAL\\ntype {kind} handle {handle:#x}\\n{} bodies", bodies.len())
            }
        }
    }

    /// The graphs this node owns: a child graph, a conditional's bodies.
    fn owned(&self) -> Vec<Id> {
        match self {
            Op::Child(c) => vec![*c],
            Op::Conditional { bodies, .. } => bodies.clone(),
            _ => Vec::new(),
        }
    }
}

/// A node: its operation and the nodes it depends on (in the order given).
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) op: Op,
    pub(crate) deps: Vec<Id>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Graph {
    /// Nodes by id; ids grow, so this is creation order.
    nodes: BTreeMap<Id, Node>,
    /// For a clone: original node -> its copy (`cuGraphNodeFindInClone`).
    clone_of: HashMap<Id, Id>,
    /// A child graph belongs to the node that embeds it.
    owner: Option<Id>,
}

/// One step of an executable graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// The graph node it came from (for the `cuGraphExec*SetParams` calls).
    pub(crate) node: Id,
    pub(crate) op: Op,
    pub(crate) enabled: bool,
    /// Creation-order positions from the top graph down through child
    /// graphs: what matches a step to its node in another graph of the
    /// same shape (`cuGraphExecUpdate`).
    path: Vec<usize>,
}

/// An instantiated graph: one topological order, child graphs flattened.
#[derive(Debug, Clone)]
pub(crate) struct Exec {
    pub(crate) steps: Vec<Step>,
    /// The source graph's shape at instantiation: node kinds and edges,
    /// positions in creation order (what `cuGraphExecUpdate` compares).
    shape: Shape,
    /// The source nodes, in creation order, matching `shape`.
    nodes: Vec<Id>,
    pub(crate) flags: u64,
    /// Instantiated as a driver graph on the server under this exec's id
    /// (it holds conditional nodes): no steps, launched as one call.
    pub(crate) device: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    kinds: Vec<u32>,
    edges: BTreeSet<(usize, usize)>,
    /// The shapes of child graphs, by their node's position.
    children: Vec<(usize, Shape)>,
}

/// Why `cuGraphExecUpdate` refused (`CUgraphExecUpdateResult`) and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UpdateFailure {
    pub(crate) result: u32,
    pub(crate) node: Option<Id>,
}

pub(crate) mod update {
    pub(crate) const ERROR: u32 = 1;
    pub(crate) const TOPOLOGY_CHANGED: u32 = 2;
    pub(crate) const NODE_TYPE_CHANGED: u32 = 3;
    pub(crate) const PARAMETERS_CHANGED: u32 = 5;
    pub(crate) const NOT_SUPPORTED: u32 = 6;
}

/// Every graph and executable graph of the process.
#[derive(Debug, Default)]
pub(crate) struct Store {
    graphs: HashMap<Id, Graph>,
    node_graph: HashMap<Id, Id>,
    execs: HashMap<Id, Exec>,
    next: Id,
    /// The data of edges `(from, to)` other than the default (all zero):
    /// programmatic dependencies and ports (`CUgraphEdgeData`). Replay runs
    /// every edge as a full dependency, an order every edge type allows.
    edge_data: HashMap<(Id, Id), EdgeData>,
    /// Conditional handles from the server, by the graph whose server-side
    /// twin holds them (a top-level graph).
    handles: HashMap<u64, Id>,
}

/// A `CUgraphEdgeData`: from port, to port, type, five reserved bytes.
pub(crate) type EdgeData = [u8; 8];

impl Store {
    fn fresh(&mut self) -> Id {
        self.next += 1;
        self.next
    }

    pub(crate) fn create(&mut self) -> Id {
        let id = self.fresh();
        self.graphs.insert(id, Graph::default());
        id
    }

    pub(crate) fn graph(&self, g: Id) -> CuResult<&Graph> {
        self.graphs.get(&g).ok_or(CuError::INVALID_VALUE)
    }

    fn graph_mut(&mut self, g: Id) -> CuResult<&mut Graph> {
        self.graphs.get_mut(&g).ok_or(CuError::INVALID_VALUE)
    }

    /// `true` for a graph that a node embeds (not the application's to destroy).
    pub(crate) fn is_child(&self, g: Id) -> bool {
        self.graphs.get(&g).is_some_and(|x| x.owner.is_some())
    }

    /// Destroys graph `g` with its child graphs; returns every operation
    /// that went away (so the caller can let go of graph memory).
    /// The user object references it owned go with it.
    pub(crate) fn destroy(&mut self, g: Id) -> CuResult<Vec<Op>> {
        let graph = self.graphs.remove(&g).ok_or(CuError::INVALID_VALUE)?;
        crate::user_object::owners_gone(&[g]);
        let mut gone = Vec::new();
        for (id, node) in graph.nodes {
            self.node_graph.remove(&id);
            for d in &node.deps {
                self.edge_data.remove(&(*d, id));
            }
            for c in node.op.owned() {
                gone.extend(self.destroy(c)?);
            }
            gone.push(node.op);
        }
        Ok(gone)
    }

    /// `g` and every graph under it (child graphs, conditional bodies).
    pub(crate) fn tree(&self, g: Id) -> CuResult<Vec<Id>> {
        let mut all = vec![g];
        let mut i = 0;
        while let Some(&at) = all.get(i) {
            for node in self.graph(at)?.nodes.values() {
                all.extend(node.op.owned());
            }
            i += 1;
        }
        Ok(all)
    }

    /// The top-level graph above `g` (through the nodes that own child
    /// graphs and conditional bodies): the one whose twin holds handles.
    pub(crate) fn root(&self, g: Id) -> CuResult<Id> {
        let mut g = g;
        for _ in 0..=self.graphs.len() {
            match self.graph(g)?.owner {
                Some(node) => g = self.graph_of(node)?,
                None => return Ok(g),
            }
        }
        Err(CuError(crate::capture::ILLEGAL_STATE))
    }

    /// Records a conditional handle made on the server for graph `g`'s
    /// top-level graph; returns that graph (the twin's client id).
    pub(crate) fn note_handle(&mut self, g: Id, handle: u64) -> CuResult<Id> {
        let root = self.root(g)?;
        self.handles.insert(handle, root);
        Ok(root)
    }

    /// Whether graph `g` has a twin on the server (a handle was made for
    /// it); forgets its handles.
    pub(crate) fn drop_twin(&mut self, g: Id) -> bool {
        let before = self.handles.len();
        self.handles.retain(|_, owner| *owner != g);
        self.handles.len() != before
    }

    /// Empty body graphs for a new conditional node (owned once the node
    /// is added).
    pub(crate) fn create_bodies(&mut self, n: u32) -> Vec<Id> {
        (0..n).map(|_| self.create()).collect()
    }

    /// The graph node `n` belongs to.
    pub(crate) fn graph_of(&self, n: Id) -> CuResult<Id> {
        self.node_graph.get(&n).copied().ok_or(CuError::INVALID_VALUE)
    }

    pub(crate) fn node(&self, n: Id) -> CuResult<&Node> {
        let g = self.graph_of(n)?;
        self.graph(g)?.nodes.get(&n).ok_or(CuError::INVALID_VALUE)
    }

    /// Adds a node depending on `deps` (nodes of the same graph, no repeats).
    pub(crate) fn add(&mut self, g: Id, op: Op, deps: &[Id]) -> CuResult<Id> {
        self.insert(g, op, deps, true)
    }

    /// [`Self::add`]; `own_handles`: a conditional node's handle must come
    /// from `g`'s top-level graph (a clone keeps the original's instead).
    fn insert(&mut self, g: Id, op: Op, deps: &[Id], own_handles: bool) -> CuResult<Id> {
        let graph = self.graph(g)?;
        let mut seen = HashSet::new();
        for d in deps {
            if !graph.nodes.contains_key(d) || !seen.insert(*d) {
                return Err(CuError::INVALID_VALUE);
            }
        }
        for c in op.owned() {
            self.graph_mut(c)?;
        }
        if let Op::Conditional { handle, kind, ref bodies } = op {
            check_conditional(kind, bodies.len() as u32)?;
            // The handle must come from this graph's top-level graph.
            if own_handles && self.handles.get(&handle) != Some(&self.root(g)?) {
                tracing::debug!(handle, graph = g, "conditional handle not created for this graph");
                return Err(CuError::INVALID_VALUE);
            }
        }
        let id = self.fresh();
        for c in op.owned() {
            self.graph_mut(c)?.owner = Some(id);
        }
        self.graph_mut(g)?.nodes.insert(id, Node { op, deps: deps.to_vec() });
        self.node_graph.insert(id, g);
        Ok(id)
    }

    /// Replaces a node's operation with one of the same kind.
    pub(crate) fn set_op(&mut self, n: Id, op: Op) -> CuResult {
        let g = self.graph_of(n)?;
        let node = self.graph_mut(g)?.nodes.get_mut(&n).ok_or(CuError::INVALID_VALUE)?;
        if node.op.kind() != op.kind() {
            return Err(CuError::INVALID_VALUE);
        }
        node.op = keep_attributes(&node.op, op);
        Ok(())
    }

    /// Removes a node and every edge that touches it; returns its operation
    /// (and those of a child graph it owned).
    pub(crate) fn destroy_node(&mut self, n: Id) -> CuResult<Vec<Op>> {
        let g = self.graph_of(n)?;
        let graph = self.graph_mut(g)?;
        let node = graph.nodes.remove(&n).ok_or(CuError::INVALID_VALUE)?;
        for other in graph.nodes.values_mut() {
            other.deps.retain(|d| *d != n);
        }
        self.edge_data.retain(|(from, to), _| *from != n && *to != n);
        self.node_graph.remove(&n);
        let mut gone = Vec::new();
        for c in node.op.owned() {
            gone.extend(self.destroy(c)?);
        }
        gone.push(node.op);
        Ok(gone)
    }

    /// `true` when `to` can be reached from `from` along dependency edges.
    fn reaches(graph: &Graph, from: Id, to: Id) -> bool {
        // Walk the dependents of `from`: a node whose deps contain a
        // visited node is reachable.
        let mut seen = HashSet::from([from]);
        let mut stack = vec![from];
        while let Some(x) = stack.pop() {
            if x == to {
                return true;
            }
            for (id, node) in &graph.nodes {
                if node.deps.contains(&x) && seen.insert(*id) {
                    stack.push(*id);
                }
            }
        }
        false
    }

    /// Adds the edges `from[i] -> to[i]`; a repeated edge or a cycle is
    /// refused and nothing is added.
    pub(crate) fn add_edges(&mut self, edges: &[(Id, Id)]) -> CuResult {
        let mut trial: HashMap<Id, Graph> = HashMap::new();
        for &(from, to) in edges {
            let g = self.graph_of(from)?;
            if self.graph_of(to)? != g || from == to {
                return Err(CuError::INVALID_VALUE);
            }
            let graph = match trial.get_mut(&g) {
                Some(x) => x,
                None => trial.entry(g).or_insert(self.graph(g)?.clone()),
            };
            if graph.nodes[&to].deps.contains(&from) || Self::reaches(graph, to, from) {
                return Err(CuError::INVALID_VALUE);
            }
            graph.nodes.get_mut(&to).ok_or(CuError::INVALID_VALUE)?.deps.push(from);
        }
        for (g, graph) in trial {
            self.graphs.insert(g, graph);
        }
        Ok(())
    }

    /// Removes the edges `from[i] -> to[i]`; a missing edge is refused and
    /// nothing is removed.
    pub(crate) fn remove_edges(&mut self, edges: &[(Id, Id)]) -> CuResult {
        for &(from, to) in edges {
            if !self.node(to)?.deps.contains(&from) || self.graph_of(from)? != self.graph_of(to)? {
                return Err(CuError::INVALID_VALUE);
            }
        }
        for &(from, to) in edges {
            let g = self.graph_of(to)?;
            if let Some(node) = self.graph_mut(g)?.nodes.get_mut(&to) {
                node.deps.retain(|d| *d != from);
            }
            self.edge_data.remove(&(from, to));
        }
        Ok(())
    }

    /// The data of edge `from -> to` (all zero: the default edge).
    pub(crate) fn edge_data(&self, from: Id, to: Id) -> EdgeData {
        self.edge_data.get(&(from, to)).copied().unwrap_or_default()
    }

    /// Sets the data of the existing edge `from -> to`.
    pub(crate) fn set_edge_data(&mut self, from: Id, to: Id, data: EdgeData) -> CuResult {
        if !self.node(to)?.deps.contains(&from) {
            return Err(CuError::INVALID_VALUE);
        }
        if data == EdgeData::default() {
            self.edge_data.remove(&(from, to));
        } else {
            self.edge_data.insert((from, to), data);
        }
        Ok(())
    }

    /// The nodes of `g` in creation order.
    pub(crate) fn nodes(&self, g: Id) -> CuResult<Vec<Id>> {
        Ok(self.graph(g)?.nodes.keys().copied().collect())
    }

    /// Nodes without dependencies.
    pub(crate) fn roots(&self, g: Id) -> CuResult<Vec<Id>> {
        Ok(self.graph(g)?.nodes.iter().filter(|(_, n)| n.deps.is_empty()).map(|(id, _)| *id).collect())
    }

    /// Every edge `(from, to)` of `g`, by destination in creation order.
    pub(crate) fn edges(&self, g: Id) -> CuResult<Vec<(Id, Id)>> {
        Ok(self.graph(g)?.nodes.iter().flat_map(|(to, n)| n.deps.iter().map(move |from| (*from, *to))).collect())
    }

    /// Nodes that depend on `n`.
    pub(crate) fn dependents(&self, n: Id) -> CuResult<Vec<Id>> {
        let g = self.graph_of(n)?;
        Ok(self.graph(g)?.nodes.iter().filter(|(_, x)| x.deps.contains(&n)).map(|(id, _)| *id).collect())
    }

    /// A topological order of `g`: among ready nodes the oldest first, so
    /// the order is deterministic (and is creation order when that is one).
    pub(crate) fn topological(&self, g: Id) -> CuResult<Vec<Id>> {
        let graph = self.graph(g)?;
        let mut missing: HashMap<Id, usize> = graph.nodes.iter().map(|(id, n)| (*id, n.deps.len())).collect();
        let mut ready: BTreeSet<Id> = missing.iter().filter(|(_, m)| **m == 0).map(|(id, _)| *id).collect();
        let mut order = Vec::with_capacity(graph.nodes.len());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for (id, node) in &graph.nodes {
                let hits = node.deps.iter().filter(|d| **d == n).count();
                if hits > 0 {
                    let m = missing.get_mut(id).ok_or(CuError::INVALID_VALUE)?;
                    *m -= hits;
                    if *m == 0 {
                        ready.insert(*id);
                    }
                }
            }
        }
        if order.len() != graph.nodes.len() {
            // Edges are checked when added, so this is a broken invariant.
            return Err(CuError(crate::capture::ILLEGAL_STATE));
        }
        Ok(order)
    }

    /// A deep copy of `g` (child graphs copied too); returns the copy and
    /// every operation it holds.
    pub(crate) fn clone_graph(&mut self, g: Id) -> CuResult<(Id, Vec<Op>)> {
        let source = self.graph(g)?.clone();
        let copy = self.create();
        let mut map = HashMap::new();
        let mut ops = Vec::new();
        for (old, node) in &source.nodes {
            let mut copy_of = |c: Id| -> CuResult<Id> {
                let (c2, inner) = self.clone_graph(c)?;
                ops.extend(inner);
                Ok(c2)
            };
            let op = match node.op {
                Op::Child(c) => Op::Child(copy_of(c)?),
                // The copy keeps the handle: it is the original's twin's.
                Op::Conditional { handle, kind, ref bodies } => Op::Conditional {
                    handle,
                    kind,
                    bodies: bodies.iter().map(|b| copy_of(*b)).collect::<CuResult<_>>()?,
                },
                ref other => other.clone(),
            };
            let deps: Vec<Id> = node.deps.iter().map(|d| map[d]).collect();
            ops.push(op.clone());
            let new = self.insert(copy, op, &deps, false)?;
            for d in &node.deps {
                let data = self.edge_data(*d, *old);
                self.set_edge_data(map[d], new, data)?;
            }
            map.insert(*old, new);
        }
        self.graph_mut(copy)?.clone_of = map;
        Ok((copy, ops))
    }

    /// The copy of `original` in the clone `clone`.
    pub(crate) fn find_in_clone(&self, clone: Id, original: Id) -> CuResult<Id> {
        self.graph(clone)?.clone_of.get(&original).copied().ok_or(CuError::INVALID_VALUE)
    }

    fn shape(&self, g: Id) -> CuResult<(Shape, Vec<Id>)> {
        let graph = self.graph(g)?;
        let nodes: Vec<Id> = graph.nodes.keys().copied().collect();
        let pos: HashMap<Id, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let kinds = graph.nodes.values().map(|n| n.op.kind()).collect();
        let edges = graph.nodes.iter().flat_map(|(to, n)| n.deps.iter().map(|f| (pos[f], pos[to]))).collect();
        let mut children = Vec::new();
        for (i, n) in graph.nodes.values().enumerate() {
            if let Op::Child(c) = n.op {
                children.push((i, self.shape(c)?.0));
            }
        }
        Ok((Shape { kinds, edges, children }, nodes))
    }

    fn flatten(&self, g: Id, steps: &mut Vec<Step>) -> CuResult {
        self.flatten_at(g, &[], steps)
    }

    fn flatten_at(&self, g: Id, prefix: &[usize], steps: &mut Vec<Step>) -> CuResult {
        let pos: HashMap<Id, usize> = self.graph(g)?.nodes.keys().enumerate().map(|(i, n)| (*n, i)).collect();
        for n in self.topological(g)? {
            let mut path = prefix.to_vec();
            path.push(pos[&n]);
            match &self.node(n)?.op {
                Op::Child(c) => self.flatten_at(*c, &path, steps)?,
                // Graphs that hold these are instantiated on the server.
                Op::Conditional { .. } => return Err(CuError::NOT_SUPPORTED),
                op => steps.push(Step { node: n, op: op.clone(), enabled: true, path }),
            }
        }
        Ok(())
    }

    /// Instantiates `g`: a snapshot of one topological order.
    pub(crate) fn instantiate(&mut self, g: Id, flags: u64) -> CuResult<Id> {
        let mut steps = Vec::new();
        self.flatten(g, &mut steps)?;
        let (shape, nodes) = self.shape(g)?;
        let id = self.fresh();
        self.execs.insert(id, Exec { steps, shape, nodes, flags, device: false });
        Ok(id)
    }

    /// Whether `g` (its child graphs included) holds a conditional node,
    /// so that it must be instantiated on the server.
    pub(crate) fn needs_device(&self, g: Id) -> CuResult<bool> {
        for node in self.graph(g)?.nodes.values() {
            match &node.op {
                Op::Conditional { .. } => return Ok(true),
                Op::Child(c) if self.needs_device(*c)? => return Ok(true),
                _ => {}
            }
        }
        Ok(false)
    }

    /// An exec of `g` that the server runs (see [`Self::device_tree`]).
    pub(crate) fn instantiate_device(&mut self, g: Id, flags: u64) -> CuResult<Id> {
        let (shape, nodes) = self.shape(g)?;
        let id = self.fresh();
        self.execs.insert(id, Exec { steps: Vec::new(), shape, nodes, flags, device: true });
        Ok(id)
    }

    /// Graph `g` as the tree the server builds a driver graph from, and the
    /// graph whose twin holds its conditional handles. Node kinds are
    /// those CUDA allows in conditional bodies (kernels, memsets,
    /// device-to-device copies, empty nodes, child graphs, conditional
    /// nodes); `kernel` turns a kernel into the launch the server knows.
    pub(crate) fn device_tree(
        &self,
        g: Id,
        kernel: &impl Fn(&Kernel) -> CuResult<v1::Launch>,
    ) -> CuResult<(Id, v1::GraphBody)> {
        let mut twins = BTreeSet::new();
        let body = self.device_body(g, 0, kernel, &mut twins)?;
        match twins.into_iter().collect::<Vec<_>>()[..] {
            [twin] => Ok((twin, body)),
            [] => Err(CuError::INVALID_VALUE),
            _ => {
                tracing::debug!(graph = g, "conditional handles of several graphs in one graph are not supported");
                Err(CuError::NOT_SUPPORTED)
            }
        }
    }

    fn device_body(
        &self,
        g: Id,
        depth: usize,
        kernel: &impl Fn(&Kernel) -> CuResult<v1::Launch>,
        twins: &mut BTreeSet<Id>,
    ) -> CuResult<v1::GraphBody> {
        use v1::graph_node::Kind;
        if depth > MAX_DEVICE_DEPTH {
            tracing::debug!(graph = g, "graphs nested deeper than {MAX_DEVICE_DEPTH} levels are not supported");
            return Err(CuError::NOT_SUPPORTED);
        }
        let order = self.topological(g)?;
        let index: HashMap<Id, u32> = order.iter().enumerate().map(|(i, n)| (*n, i as u32)).collect();
        let mut nodes = Vec::with_capacity(order.len());
        for n in order {
            let node = self.node(n)?;
            let refuse = |what: &str| {
                tracing::debug!(
                    node = n,
                    "{what} nodes cannot be in a graph with conditional nodes (gpupool builds it on the GPU)"
                );
                Err(CuError::NOT_SUPPORTED)
            };
            let kind = match &node.op {
                Op::Empty => Kind::Empty(v1::GraphEmpty {}),
                Op::Kernel(k) => Kind::Kernel(kernel(k)?),
                Op::Memset(m) => Kind::Memset(v1::GraphMemset {
                    dst: m.dst,
                    pitch: m.pitch as u64,
                    value: m.value,
                    element_size: m.element,
                    width: m.width as u64,
                    height: m.height as u64,
                }),
                Op::Memcpy(c) if c.dst.device && c.src.device && c.is_contiguous() => {
                    let size = c.width * c.height * c.depth;
                    Kind::Memcpy(v1::MemcpyDtoD { dst: c.dst.addr, src: c.src.addr, size: size as u64, stream: 0 })
                }
                Op::Memcpy(_) => return refuse("host-memory or pitched copy"),
                Op::Child(c) => Kind::Child(self.device_body(*c, depth + 1, kernel, twins)?),
                Op::Conditional { handle, kind, bodies } => {
                    let twin = self.handles.get(handle).ok_or_else(|| {
                        tracing::debug!(handle, "conditional handle of a destroyed graph");
                        CuError::INVALID_VALUE
                    })?;
                    twins.insert(*twin);
                    let bodies = bodies
                        .iter()
                        .map(|b| self.device_body(*b, depth + 1, kernel, twins))
                        .collect::<CuResult<_>>()?;
                    Kind::Conditional(v1::GraphConditional { handle: *handle, r#type: *kind, bodies })
                }
                Op::Host { .. } => return refuse("host"),
                Op::EventRecord(_) | Op::EventWait(_) => return refuse("event"),
                Op::MemAlloc { .. } | Op::MemFree { .. } => return refuse("memory allocation"),
                Op::MemOps(_) => return refuse("batch memory operation"),
            };
            let deps = node.deps.iter().map(|d| index[d]).collect();
            nodes.push(v1::GraphNode { deps, kind: Some(kind) });
        }
        Ok(v1::GraphBody { nodes })
    }

    pub(crate) fn exec(&self, e: Id) -> CuResult<&Exec> {
        self.execs.get(&e).ok_or(CuError::INVALID_VALUE)
    }

    /// Destroys exec `e`; the user object references it owned go with it.
    pub(crate) fn destroy_exec(&mut self, e: Id) -> CuResult<Exec> {
        let exec = self.execs.remove(&e).ok_or(CuError::INVALID_VALUE)?;
        crate::user_object::owners_gone(&[e]);
        Ok(exec)
    }

    /// The steps of exec `e` that came from node `n` (several when `n` is
    /// a child graph node: all of its child's).
    fn steps_of(&self, e: Id, n: Id) -> CuResult<Vec<usize>> {
        let exec = self.exec(e)?;
        if exec.device {
            tracing::debug!(exec = e, "a graph with conditional nodes cannot be changed once instantiated");
            return Err(CuError::NOT_SUPPORTED);
        }
        let mut wanted = HashSet::from([n]);
        if let Ok(Node { op: Op::Child(c), .. }) = self.node(n) {
            let mut stack = vec![*c];
            while let Some(c) = stack.pop() {
                for (id, node) in &self.graph(c)?.nodes {
                    wanted.insert(*id);
                    if let Op::Child(cc) = node.op {
                        stack.push(cc);
                    }
                }
            }
        }
        let found: Vec<usize> =
            exec.steps.iter().enumerate().filter(|(_, s)| wanted.contains(&s.node)).map(|(i, _)| i).collect();
        if found.is_empty() && !exec.nodes.contains(&n) {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(found)
    }

    /// `cuGraphExec*NodeSetParams`: node `n`'s step in exec `e` gets `op`
    /// (same kind; the graph itself is unchanged).
    pub(crate) fn exec_set_op(&mut self, e: Id, n: Id, op: Op) -> CuResult {
        let idx = self.steps_of(e, n)?;
        let exec = self.execs.get_mut(&e).ok_or(CuError::INVALID_VALUE)?;
        let [i] = idx[..] else { return Err(CuError::INVALID_VALUE) };
        let step = &mut exec.steps[i];
        if step.op.kind() != op.kind() || matches!(op, Op::MemAlloc { .. } | Op::MemFree { .. }) {
            return Err(CuError::INVALID_VALUE);
        }
        step.op = keep_attributes(&step.op, op);
        Ok(())
    }

    /// `cuGraphExecChildGraphNodeSetParams`: the child's steps take the
    /// operations of `child` (same shape required).
    pub(crate) fn exec_set_child(&mut self, e: Id, n: Id, child: Id) -> CuResult {
        let Op::Child(current) = self.node(n)?.op else { return Err(CuError::INVALID_VALUE) };
        let (old, _) = self.shape(current)?;
        let (new, _) = self.shape(child)?;
        if old != new {
            return Err(CuError::INVALID_VALUE);
        }
        let idx = self.steps_of(e, n)?;
        let mut steps = Vec::new();
        self.flatten(child, &mut steps)?;
        let mut fresh = Vec::new();
        self.flatten(current, &mut fresh)?;
        if steps.len() != idx.len() || steps.iter().zip(&fresh).any(|(a, b)| a.op.kind() != b.op.kind()) {
            return Err(CuError::INVALID_VALUE);
        }
        let exec = self.execs.get_mut(&e).ok_or(CuError::INVALID_VALUE)?;
        for (i, s) in idx.into_iter().zip(steps) {
            exec.steps[i].op = s.op;
        }
        Ok(())
    }

    /// `cuGraphNodeSetEnabled` / `GetEnabled` on an exec.
    pub(crate) fn set_enabled(&mut self, e: Id, n: Id, enabled: bool) -> CuResult {
        let idx = self.steps_of(e, n)?;
        let exec = self.execs.get_mut(&e).ok_or(CuError::INVALID_VALUE)?;
        for i in idx {
            if !matches!(exec.steps[i].op, Op::Kernel(_) | Op::Memcpy(_) | Op::Memset(_)) {
                return Err(CuError::INVALID_VALUE);
            }
            exec.steps[i].enabled = enabled;
        }
        Ok(())
    }

    pub(crate) fn enabled(&self, e: Id, n: Id) -> CuResult<bool> {
        let idx = self.steps_of(e, n)?;
        let exec = self.exec(e)?;
        Ok(idx.iter().all(|i| exec.steps[*i].enabled))
    }

    /// `cuGraphExecUpdate`: when `g` has the shape exec `e` was made from
    /// (node kinds in creation order, the same edges), the exec takes `g`'s
    /// parameters; otherwise it is left as it was and the failure says why.
    pub(crate) fn exec_update(&mut self, e: Id, g: Id) -> CuResult<Result<(), UpdateFailure>> {
        let (shape, nodes) = self.shape(g)?;
        let exec = self.exec(e)?;
        if exec.device || self.needs_device(g)? {
            tracing::debug!(exec = e, "graphs with conditional nodes cannot be updated in place");
            return Err(CuError::NOT_SUPPORTED);
        }
        if shape.kinds.len() != exec.shape.kinds.len() {
            return Ok(Err(UpdateFailure { result: update::TOPOLOGY_CHANGED, node: None }));
        }
        if let Some(i) = (0..shape.kinds.len()).find(|&i| shape.kinds[i] != exec.shape.kinds[i]) {
            return Ok(Err(UpdateFailure { result: update::NODE_TYPE_CHANGED, node: Some(nodes[i]) }));
        }
        if shape.edges != exec.shape.edges || shape.children != exec.shape.children {
            return Ok(Err(UpdateFailure { result: update::TOPOLOGY_CHANGED, node: None }));
        }
        let mut fresh = Vec::new();
        self.flatten(g, &mut fresh)?;
        // Steps follow a topological order of the same DAG, maybe a
        // different one: match them by position.
        let position: HashMap<&[usize], usize> =
            exec.steps.iter().enumerate().map(|(i, s)| (s.path.as_slice(), i)).collect();
        let mut updates = Vec::new();
        for s in fresh {
            let Some(&i) = position.get(s.path.as_slice()) else {
                return Ok(Err(UpdateFailure { result: update::TOPOLOGY_CHANGED, node: Some(s.node) }));
            };
            let old = &exec.steps[i].op;
            if matches!(s.op, Op::MemAlloc { .. } | Op::MemFree { .. }) && *old != s.op {
                return Ok(Err(UpdateFailure { result: update::NOT_SUPPORTED, node: Some(s.node) }));
            }
            if let (Op::Kernel(a), Op::Kernel(b)) = (old, &s.op)
                && a.params.len() != b.params.len()
                && a.func == b.func
            {
                return Ok(Err(UpdateFailure { result: update::PARAMETERS_CHANGED, node: Some(s.node) }));
            }
            updates.push((i, s.op));
        }
        let exec = self.execs.get_mut(&e).ok_or(CuError::INVALID_VALUE)?;
        for (i, op) in updates {
            exec.steps[i].op = op;
        }
        Ok(Ok(()))
    }

    /// The graph as a DOT digraph (`cuGraphDebugDotPrint`), child graphs as
    /// clusters.
    pub(crate) fn dot(&self, g: Id) -> CuResult<String> {
        let mut out = format!("digraph gpupool_graph_{g} {{\n  compound=true;\n  node [shape=record];\n");
        self.dot_body(g, &mut out, 1)?;
        out.push_str("}\n");
        Ok(out)
    }

    fn dot_body(&self, g: Id, out: &mut String, depth: usize) -> CuResult {
        let pad = "  ".repeat(depth);
        for (id, node) in &self.graph(g)?.nodes {
            out.push_str(&format!("{pad}n{id} [label=\"{}\"];\n", node.op.label()));
            for c in node.op.owned() {
                out.push_str(&format!("{pad}subgraph cluster_{c} {{\n{pad}  label=\"graph {c}\";\n"));
                self.dot_body(c, out, depth + 1)?;
                out.push_str(&format!("{pad}}}\n"));
            }
            for d in &node.deps {
                out.push_str(&format!("{pad}n{d} -> n{id};\n"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: u32) -> Op {
        Op::Memset(Set2D { dst: 0x1000, pitch: 4, value: v, element: 1, width: 4, height: 1 })
    }

    fn kinds(s: &Store, e: Id) -> Vec<Op> {
        s.exec(e).expect("exec").steps.iter().map(|s| s.op.clone()).collect()
    }

    #[test]
    fn topological_order_follows_edges_and_creation() {
        let mut s = Store::default();
        let g = s.create();
        let a = s.add(g, set(1), &[]).expect("a");
        let b = s.add(g, set(2), &[]).expect("b");
        let c = s.add(g, set(3), &[b]).expect("c");
        // a must now come after c.
        s.add_edges(&[(c, a)]).expect("edge");
        assert_eq!(s.topological(g).expect("order"), vec![b, c, a]);
        assert_eq!(s.roots(g).expect("roots"), vec![b]);
        assert_eq!(s.dependents(b).expect("deps"), vec![c]);
        assert_eq!(s.edges(g).expect("edges"), vec![(c, a), (b, c)]);
    }

    #[test]
    fn cycles_and_bad_edges_refused() {
        let mut s = Store::default();
        let g = s.create();
        let a = s.add(g, Op::Empty, &[]).expect("a");
        let b = s.add(g, Op::Empty, &[a]).expect("b");
        let c = s.add(g, Op::Empty, &[b]).expect("c");
        assert_eq!(s.add_edges(&[(c, a)]), Err(CuError::INVALID_VALUE));
        assert_eq!(s.add_edges(&[(a, b)]), Err(CuError::INVALID_VALUE), "repeated edge");
        assert_eq!(s.add_edges(&[(a, a)]), Err(CuError::INVALID_VALUE));
        // All or nothing: the second edge closes a cycle, so the first is not kept.
        assert_eq!(s.add_edges(&[(a, c), (c, a)]), Err(CuError::INVALID_VALUE));
        assert!(!s.node(c).expect("c").deps.contains(&a));
        assert_eq!(s.add(g, Op::Empty, &[a, a]), Err(CuError::INVALID_VALUE));
        let other = s.create();
        assert_eq!(s.add(other, Op::Empty, &[a]), Err(CuError::INVALID_VALUE), "foreign dependency");
        assert_eq!(s.remove_edges(&[(a, c)]), Err(CuError::INVALID_VALUE));
        s.remove_edges(&[(b, c)]).expect("remove");
        assert_eq!(s.roots(g).expect("roots"), vec![a, c]);
        s.destroy_node(a).expect("destroy");
        assert_eq!(s.roots(g).expect("roots"), vec![b, c]);
        assert_eq!(s.node(a).map(drop), Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn clone_is_deep_and_findable() {
        let mut s = Store::default();
        let child = s.create();
        s.add(child, set(9), &[]).expect("inner");
        let g = s.create();
        let a = s.add(g, set(1), &[]).expect("a");
        let c = s.add(g, Op::Child(child), &[a]).expect("child node");
        assert!(s.is_child(child));
        let (copy, ops) = s.clone_graph(g).expect("clone");
        assert_eq!(ops.len(), 3);
        let a2 = s.find_in_clone(copy, a).expect("found");
        let c2 = s.find_in_clone(copy, c).expect("found");
        assert_ne!(a, a2);
        assert_eq!(s.node(c2).expect("c2").deps, vec![a2]);
        let Op::Child(child2) = s.node(c2).expect("c2").op else { panic!("child") };
        assert_ne!(child2, child, "the child graph is copied too");
        // Changing the original leaves the clone alone.
        s.set_op(a, set(7)).expect("set");
        assert_eq!(s.node(a2).expect("a2").op, set(1));
        let e = s.instantiate(copy, 0).expect("instantiate");
        assert_eq!(kinds(&s, e), vec![set(1), set(9)], "child flattened in place");
        assert_eq!(s.destroy(g).expect("destroy").len(), 3);
        assert!(s.graph(child).is_err(), "child destroyed with its node");
    }

    #[test]
    fn exec_update_same_topology_only() {
        let mut s = Store::default();
        let build = |s: &mut Store, v: u32| {
            let g = s.create();
            let a = s.add(g, set(v), &[]).expect("a");
            s.add(g, Op::Host { func: 1, data: v as usize }, &[a]).expect("b");
            g
        };
        let g1 = build(&mut s, 1);
        let e = s.instantiate(g1, 0).expect("exec");
        let g2 = build(&mut s, 2);
        assert_eq!(s.exec_update(e, g2).expect("call"), Ok(()));
        assert_eq!(kinds(&s, e), vec![set(2), Op::Host { func: 1, data: 2 }]);
        // Another shape: refused, the exec unchanged.
        let g3 = s.create();
        s.add(g3, set(3), &[]).expect("one node");
        assert_eq!(s.exec_update(e, g3).expect("call").map_err(|f| f.result), Err(update::TOPOLOGY_CHANGED));
        let g4 = s.create();
        s.add(g4, set(4), &[]).expect("a");
        s.add(g4, set(5), &[]).expect("b");
        assert_eq!(s.exec_update(e, g4).expect("call").map_err(|f| f.result), Err(update::NODE_TYPE_CHANGED));
        assert_eq!(kinds(&s, e)[0], set(2));
        // Per-node updates and disabling touch the exec only.
        let first = s.nodes(g1).expect("nodes")[0];
        s.exec_set_op(e, first, set(8)).expect("exec set");
        assert_eq!(kinds(&s, e)[0], set(8));
        assert_eq!(s.node(first).expect("node").op, set(1));
        s.set_enabled(e, first, false).expect("disable");
        assert!(!s.enabled(e, first).expect("enabled"));
        assert_eq!(s.exec_set_op(e, first, Op::Empty), Err(CuError::INVALID_VALUE), "kind must match");
    }

    #[test]
    fn exec_update_reaches_into_child_graphs() {
        let mut s = Store::default();
        let build = |s: &mut Store, v: u32| {
            let child = s.create();
            s.add(child, set(v), &[]).expect("inner");
            let g = s.create();
            let a = s.add(g, set(1), &[]).expect("a");
            s.add(g, Op::Child(child), &[a]).expect("child");
            g
        };
        let g1 = build(&mut s, 5);
        let e = s.instantiate(g1, 0).expect("exec");
        assert_eq!(s.exec_update(e, g1).expect("call"), Ok(()), "a graph updates its own exec");
        let g2 = build(&mut s, 6);
        assert_eq!(s.exec_update(e, g2).expect("call"), Ok(()));
        assert_eq!(kinds(&s, e), vec![set(1), set(6)]);
        let g3 = s.create();
        let a = s.add(g3, set(1), &[]).expect("a");
        let empty_child = s.create();
        s.add(g3, Op::Child(empty_child), &[a]).expect("child");
        assert_eq!(s.exec_update(e, g3).expect("call").map_err(|f| f.result), Err(update::TOPOLOGY_CHANGED));
    }

    fn launch(k: &Kernel) -> CuResult<v1::Launch> {
        Ok(v1::Launch { module: 1, function: k.func as u32, params: k.params.clone().into(), ..Default::default() })
    }

    fn kernel(func: usize) -> Op {
        Op::Kernel(Kernel {
            func,
            given: [func, 0],
            grid: [1; 3],
            block: [1; 3],
            shared: 0,
            params: vec![7; 8],
            attributes: None,
        })
    }

    #[test]
    fn conditional_type_and_size_checked_as_the_driver_does() {
        use conditional::*;
        for ok in [(IF, 1), (IF, 2), (WHILE, 1), (SWITCH, 1), (SWITCH, 5)] {
            assert_eq!(check_conditional(ok.0, ok.1), Ok(()), "{ok:?}");
        }
        for bad in [(IF, 0), (IF, 3), (WHILE, 2), (WHILE, 0), (SWITCH, 0), (3, 1), (SWITCH, MAX_SWITCH_BODIES + 1)] {
            assert_eq!(check_conditional(bad.0, bad.1), Err(CuError::INVALID_VALUE), "{bad:?}");
        }
    }

    /// A graph: kernel -> IF (body: memset -> kernel) -> WHILE (body: empty).
    fn conditional_graph(s: &mut Store) -> (Id, Vec<Id>) {
        let g = s.create();
        s.note_handle(g, 0xaa).expect("handle");
        s.note_handle(g, 0xbb).expect("handle");
        let a = s.add(g, kernel(3), &[]).expect("kernel");
        let if_bodies = s.create_bodies(1);
        let c = s.add(g, Op::Conditional { handle: 0xaa, kind: conditional::IF, bodies: if_bodies.clone() }, &[a]);
        let c = c.expect("if node");
        let m = s.add(if_bodies[0], set(5), &[]).expect("memset");
        s.add(if_bodies[0], kernel(4), &[m]).expect("body kernel");
        let while_bodies = s.create_bodies(1);
        let w = Op::Conditional { handle: 0xbb, kind: conditional::WHILE, bodies: while_bodies.clone() };
        s.add(g, w, &[c]).expect("while node");
        s.add(while_bodies[0], Op::Empty, &[]).expect("empty");
        (g, vec![if_bodies[0], while_bodies[0]])
    }

    #[test]
    fn conditional_nodes_own_their_bodies_and_check_handles() {
        let mut s = Store::default();
        let (g, bodies) = conditional_graph(&mut s);
        assert!(s.is_child(bodies[0]), "a body belongs to its node");
        assert_eq!(s.root(bodies[0]), Ok(g));
        assert!(s.needs_device(g).expect("graph"));
        // A handle of another graph, or none, is refused; so is a bad size.
        let other = s.create();
        s.note_handle(other, 0xcc).expect("handle");
        let foreign = Op::Conditional { handle: 0xcc, kind: conditional::IF, bodies: s.create_bodies(1) };
        assert_eq!(s.add(g, foreign, &[]), Err(CuError::INVALID_VALUE));
        let unknown = Op::Conditional { handle: 0x99, kind: conditional::IF, bodies: s.create_bodies(1) };
        assert_eq!(s.add(g, unknown, &[]), Err(CuError::INVALID_VALUE));
        let too_many = Op::Conditional { handle: 0xaa, kind: conditional::WHILE, bodies: s.create_bodies(2) };
        assert_eq!(s.add(g, too_many, &[]), Err(CuError::INVALID_VALUE));
        // A nested conditional node may use the top-level graph's handle.
        let nested = Op::Conditional { handle: 0xbb, kind: conditional::IF, bodies: s.create_bodies(2) };
        s.add(bodies[0], nested, &[]).expect("nested conditional");
        // Replay cannot run them: instantiation goes to the server.
        assert_eq!(s.instantiate(g, 0).map(drop), Err(CuError::NOT_SUPPORTED));
        let e = s.instantiate_device(g, 0).expect("device exec");
        assert!(s.exec(e).expect("exec").device);
        assert!(s.exec(e).expect("exec").steps.is_empty());
        let first = s.nodes(g).expect("nodes")[0];
        assert_eq!(s.set_enabled(e, first, false), Err(CuError::NOT_SUPPORTED));
        assert_eq!(s.exec_update(e, g).map(drop), Err(CuError::NOT_SUPPORTED));
        // Destroying the graph takes the bodies and the twin's handles.
        s.destroy(g).expect("destroy");
        assert!(s.graph(bodies[0]).is_err());
        assert!(s.drop_twin(g));
        assert!(!s.drop_twin(g));
    }

    #[test]
    fn device_tree_has_dependency_indices_and_nested_bodies() {
        use v1::graph_node::Kind;
        let mut s = Store::default();
        let (g, _) = conditional_graph(&mut s);
        let (twin, body) = s.device_tree(g, &launch).expect("tree");
        assert_eq!(twin, g);
        assert_eq!(body.nodes.len(), 3);
        assert!(matches!(&body.nodes[0].kind, Some(Kind::Kernel(l)) if l.function == 3 && l.params.len() == 8));
        assert_eq!(body.nodes[1].deps, vec![0]);
        assert_eq!(body.nodes[2].deps, vec![1]);
        let Some(Kind::Conditional(c)) = &body.nodes[1].kind else { panic!("conditional {:?}", body.nodes[1]) };
        assert_eq!((c.handle, c.r#type, c.bodies.len()), (0xaa, conditional::IF, 1));
        let inner = &c.bodies[0].nodes;
        assert!(matches!(&inner[0].kind, Some(Kind::Memset(m)) if m.value == 5 && m.width == 4));
        assert_eq!(inner[1].deps, vec![0]);
        let Some(Kind::Conditional(w)) = &body.nodes[2].kind else { panic!("while") };
        assert!(matches!(w.bodies[0].nodes[0].kind, Some(Kind::Empty(_))));
        // A clone keeps the handles, so it builds on the same twin.
        let (copy, _) = s.clone_graph(g).expect("clone");
        assert!(s.needs_device(copy).expect("copy"));
        assert_eq!(s.device_tree(copy, &launch).map(|t| t.0), Ok(g));
    }

    #[test]
    fn device_tree_refuses_what_conditional_bodies_cannot_hold() {
        let refused = [
            Op::Host { func: 1, data: 2 },
            Op::EventRecord(1),
            Op::EventWait(1),
            Op::MemAlloc { addr: 0x1000, size: 4 },
            Op::MemFree { addr: 0x1000 },
            Op::Memcpy(Copy3D::linear((true, 0x1000), (false, 0x2000), 4)),
        ];
        for op in refused {
            let mut s = Store::default();
            let (g, bodies) = conditional_graph(&mut s);
            s.add(bodies[1], op.clone(), &[]).expect("node");
            assert_eq!(s.device_tree(g, &launch).map(drop), Err(CuError::NOT_SUPPORTED), "{op:?}");
        }
        // A device-to-device copy is taken.
        let mut s = Store::default();
        let (g, bodies) = conditional_graph(&mut s);
        s.add(bodies[1], Op::Memcpy(Copy3D::linear((true, 0x1000), (true, 0x2000), 4)), &[]).expect("copy");
        assert!(s.device_tree(g, &launch).is_ok());
        // Nesting past the bound is refused.
        let mut s = Store::default();
        let g = s.create();
        s.note_handle(g, 1).expect("handle");
        let mut at = g;
        for _ in 0..=MAX_DEVICE_DEPTH {
            let bodies = s.create_bodies(1);
            s.add(at, Op::Conditional { handle: 1, kind: conditional::IF, bodies: bodies.clone() }, &[]).expect("node");
            at = bodies[0];
        }
        assert_eq!(s.device_tree(g, &launch).map(drop), Err(CuError::NOT_SUPPORTED));
        // Handles of two graphs in one tree cannot be built on one twin.
        let mut s = Store::default();
        let (g, _) = conditional_graph(&mut s);
        let other = s.create();
        s.note_handle(other, 0xdd).expect("handle");
        let (copy, _) = s.clone_graph(g).expect("clone");
        let moved = Op::Conditional { handle: 0xdd, kind: conditional::IF, bodies: s.create_bodies(1) };
        s.add(other, moved, &[]).expect("node in other");
        s.add(copy, Op::Child(other), &[]).expect("child");
        assert_eq!(s.device_tree(copy, &launch).map(drop), Err(CuError::NOT_SUPPORTED));
    }

    #[test]
    fn dot_lists_nodes_and_edges() {
        let mut s = Store::default();
        let g = s.create();
        let a = s.add(g, set(1), &[]).expect("a");
        let b = s.add(g, Op::Empty, &[a]).expect("b");
        let dot = s.dot(g).expect("dot");
        assert!(dot.starts_with("digraph"));
        assert!(dot.contains(&format!("n{a} -> n{b};")), "{dot}");
        assert!(dot.contains("MEMSET"));
    }
}
