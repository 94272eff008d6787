//! CUDA graphs built on the device: what a client graph with conditional
//! nodes becomes once the session has checked it.
//!
//! A conditional node's condition is set by device code
//! (`cudaGraphSetConditional`) through a handle only the driver can read,
//! so such a graph cannot be replayed call by call like other client
//! graphs: it becomes a real driver graph (`BackendSession::graph_instantiate`).
//! The tree here is plain data; every address and id in it has been checked
//! against the session's tables. `K` names a kernel's module: a client
//! module id while checking, the backend's module once resolved.

use super::LaunchDims;
use bytes::Bytes;

/// Most nodes one instantiated graph may hold, bodies and child graphs
/// included.
pub const MAX_NODES: usize = 4096;

/// Deepest nesting of child graphs and conditional bodies.
pub const MAX_DEPTH: usize = 8;

/// Most bodies of a SWITCH node.
pub const MAX_SWITCH_BODIES: usize = 256;

/// `CUgraphConditionalNodeType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionalKind {
    /// Runs its first body when the condition is not zero, its second (if
    /// any) otherwise.
    If,
    /// Runs its body while the condition is not zero.
    While,
    /// Runs body `n` when the condition is `n` (none past the last).
    Switch,
}

impl ConditionalKind {
    /// The kind of a wire `type`, `None` for an unknown one.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::If),
            1 => Some(Self::While),
            2 => Some(Self::Switch),
            _ => None,
        }
    }

    /// Whether a node of this kind may have `n` bodies (the driver's rule).
    pub fn takes_bodies(self, n: usize) -> bool {
        match self {
            Self::If => matches!(n, 1 | 2),
            Self::While => n == 1,
            Self::Switch => (1..=MAX_SWITCH_BODIES).contains(&n),
        }
    }
}

/// A graph (or a body of a conditional node): nodes in a topological order.
#[derive(Debug, Clone, PartialEq)]
pub struct Body<K> {
    pub nodes: Vec<Node<K>>,
}

/// One node and the indices of the earlier nodes it depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Node<K> {
    pub deps: Vec<usize>,
    pub kind: NodeKind<K>,
}

/// What a node does.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind<K> {
    /// Function `function` of `module` with its parameter buffer (as long
    /// as the function's layout says).
    Kernel {
        module: K,
        function: usize,
        dims: LaunchDims,
        params: Bytes,
    },
    /// `height` rows of `width` elements of `element_size` bytes.
    Memset {
        dst: u64,
        pitch: u64,
        value: u32,
        element_size: u32,
        width: u64,
        height: u64,
    },
    /// A linear device-to-device copy.
    Copy {
        dst: u64,
        src: u64,
        size: u64,
    },
    Empty,
    Child(Body<K>),
    Conditional {
        handle: u64,
        kind: ConditionalKind,
        bodies: Vec<Body<K>>,
    },
}

impl<K> Body<K> {
    /// The same graph with each kernel's module resolved by `f`.
    pub fn resolve<L, E>(self, f: &impl Fn(K) -> Result<L, E>) -> Result<Body<L>, E> {
        let nodes = self
            .nodes
            .into_iter()
            .map(|n| {
                let kind = match n.kind {
                    NodeKind::Kernel { module, function, dims, params } => {
                        NodeKind::Kernel { module: f(module)?, function, dims, params }
                    }
                    NodeKind::Memset { dst, pitch, value, element_size, width, height } => {
                        NodeKind::Memset { dst, pitch, value, element_size, width, height }
                    }
                    NodeKind::Copy { dst, src, size } => NodeKind::Copy { dst, src, size },
                    NodeKind::Empty => NodeKind::Empty,
                    NodeKind::Child(b) => NodeKind::Child(b.resolve(f)?),
                    NodeKind::Conditional { handle, kind, bodies } => NodeKind::Conditional {
                        handle,
                        kind,
                        bodies: bodies.into_iter().map(|b| b.resolve(f)).collect::<Result<_, _>>()?,
                    },
                };
                Ok(Node { deps: n.deps, kind })
            })
            .collect::<Result<_, E>>()?;
        Ok(Body { nodes })
    }
}
