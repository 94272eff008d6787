//! The RDMA transport's protocol, without I/O (issue 22).
//!
//! A [`Connection`] is the state machine of one side of a reliable-connected
//! queue pair: fed completions (`handle_*`) and time, it answers with work
//! requests to post ([`Op`], `poll_op`) and what happened ([`Event`],
//! `poll_event`). The verbs binding (crate `gpupool-rdma`, feature `verbs`)
//! posts the ops and feeds back the completions; the tests here drive two
//! connections over an in-memory fabric that models RC semantics.
//!
//! What runs over it:
//! - a command channel of send/receive messages ([`wire`]), with credits:
//!   each side posts `recv_depth` receive buffers before it connects and
//!   sends only when the peer has a buffer for it; every message returns
//!   the buffers reposted since the last one; sequence numbers are checked;
//! - uploads as one-sided RDMA WRITEs of the client into the server's
//!   registered staging, split into slots that the server hands back once
//!   consumed ([`Message::PutChunk`](wire::Message::PutChunk), `SlotFree`);
//! - downloads as RDMA WRITEs of the server into the client's registered
//!   landing region, asked for chunk by chunk (`GetRequest`, `GetDone`).
//!
//! Each side's registered region travels as a [`RemoteRegion`] (address,
//! length, remote key) in its `Hello`; everything read from the peer is
//! bounded and checked before use. [`negotiate`] decides, from the QUIC
//! handshake, whether a session uses RDMA at all.

mod conn;
#[cfg(test)]
mod fabric;
pub mod negotiate;
#[cfg(test)]
mod tests;
pub mod wire;

pub use conn::{Config, Connection, Event, GetTicket, Op, Role, State};

use std::time::Duration;

/// Version of the RDMA core's messages; both `Hello`s must carry it.
pub const CORE_VERSION: u32 = 2;

/// Fewest receive buffers a side may post: one is kept for credit returns.
pub const MIN_RECV_DEPTH: u16 = 4;
/// Most receive buffers a side may announce.
pub const MAX_RECV_DEPTH: u16 = 1024;
/// Smallest receive buffer (a `Hello` with its secret fits).
pub const MIN_RECV_BUF: u32 = 256;
/// Largest receive buffer a side may announce.
pub const MAX_RECV_BUF: u32 = 1 << 20;
/// Largest frame (a batch or a reply) either side may announce.
pub const MAX_FRAME: u32 = 256 << 20;
/// Largest registered region a peer may announce.
pub const MAX_REGION: u64 = 64 << 30;
/// Largest upload slot, and largest download chunk.
pub const MAX_CHUNK: u32 = 64 << 20;
/// Most upload slots a server may announce.
pub const MAX_SLOTS: u16 = 256;

/// A registered region of the peer: where one-sided writes may land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Virtual address of its first byte, in the owner's address space.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
    /// Remote key the owner's registration returned.
    pub rkey: u32,
}

impl RemoteRegion {
    /// The address of `len` bytes at `offset` inside the region, or why not.
    pub fn address_of(&self, offset: u64, len: u64) -> Result<u64, RdmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.addr + offset),
            _ => Err(RdmaError::Violation(format!(
                "{len} bytes at offset {offset} are outside a region of {} bytes",
                self.len
            ))),
        }
    }

    /// Checks a region announced by the peer.
    fn check(&self) -> Result<(), RdmaError> {
        if self.len > MAX_REGION {
            return Err(RdmaError::Violation(format!("region of {} bytes, above {MAX_REGION}", self.len)));
        }
        if self.addr.checked_add(self.len).is_none() {
            return Err(RdmaError::Violation("region wraps around the address space".into()));
        }
        Ok(())
    }
}

/// Bytes in one of this side's own registered regions, named by the id the
/// binding gave the registration; the binding turns it into an address and
/// local key (and a bad one completes with a local protection error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSlice {
    pub region: u32,
    pub offset: u64,
    pub len: u32,
}

/// Why a work request completed in error (`ibv_wc_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcError {
    /// A local buffer was too short for what arrived (`IBV_WC_LOC_LEN_ERR`).
    LocalLength,
    /// A local buffer was not registered for the access (`IBV_WC_LOC_PROT_ERR`).
    LocalProtection,
    /// Flushed: the queue pair was already in error (`IBV_WC_WR_FLUSH_ERR`).
    Flushed,
    /// The peer refused the remote key, bounds or access (`IBV_WC_REM_ACCESS_ERR`).
    RemoteAccess,
    /// The peer could not carry out the operation (`IBV_WC_REM_OP_ERR`).
    RemoteOperation,
    /// The peer stopped acknowledging: retries exhausted (`IBV_WC_RETRY_EXC_ERR`).
    RetryExceeded,
    /// The peer had no receive posted, retries exhausted (`IBV_WC_RNR_RETRY_EXC_ERR`).
    ReceiverNotReady,
    /// Any other status, by its number.
    Other(u32),
}

/// What went wrong on an RDMA connection. Every variant ends it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdmaError {
    /// A work request completed with an error status.
    #[error("RDMA {op} completed with {status:?}")]
    Completion { op: &'static str, status: WcError },
    /// Nothing arrived from the peer in time.
    #[error("RDMA peer did not answer within {waited:?} ({what})")]
    TimedOut { waited: Duration, what: &'static str },
    /// The peer broke the protocol (bad message, bounds, sequence, credits).
    #[error("RDMA protocol violation: {0}")]
    Violation(String),
    /// The peer's `Hello` has another core version.
    #[error("RDMA core version {theirs}, this side speaks {ours}")]
    VersionMismatch { ours: u32, theirs: u32 },
    /// The connection manager reported the connection gone.
    #[error("RDMA connection lost")]
    ConnectionLost,
    /// Too much is queued already; try again once some has gone.
    #[error("RDMA send queue full ({0} items queued)")]
    Backpressure(usize),
    /// A request larger than the connection allows.
    #[error("{what} of {len} bytes, above the limit of {max}")]
    TooLarge { what: &'static str, len: u64, max: u64 },
    /// A call that the connection's role or state does not allow.
    #[error("not allowed now: {0}")]
    Misuse(&'static str),
    /// This side's configuration is out of bounds.
    #[error("bad RDMA configuration: {0}")]
    BadConfig(String),
}
