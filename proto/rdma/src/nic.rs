//! What the protocol core's [`Connection`](gpupool_proto::rdma::Connection)
//! needs from a NIC, behind one interface: registered regions, posted
//! receives, sends and RDMA WRITEs, completions, connection-manager events.
//! The [`Endpoint`](crate::Endpoint) drives a connection over any [`Nic`];
//! [`Provider`] opens them (connect, listen).
//!
//! Two providers: verbs ([`crate::verbs_provider`], feature `verbs`: a real
//! device through rdma_cm) and the in-memory fabric ([`crate::mem`]: two
//! sides in one process, with RC's semantics and failure injection), which
//! the server's and the client's tests run whole sessions over.

use crate::Error;
use gpupool_proto::rdma::{RemoteRegion, WcError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A completion, as the core wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub status: Result<(), WcError>,
    /// Bytes a receive brought.
    pub byte_len: u32,
}

/// What the connection manager said about a queue pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmNotice {
    /// Connected: both sides accepted.
    Established,
    /// Disconnected by the peer, or the link is gone.
    Disconnected,
    /// Any other event (an error), by name: the connection is over.
    Failed(String),
}

/// A send or write to post: `len` bytes at `offset` of a region, sent,
/// or written to `remote` (address, rkey).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWr {
    pub wr_id: u64,
    pub region: usize,
    pub offset: u64,
    pub len: u32,
    pub remote: Option<(u64, u32)>,
}

/// Sizes of a queue pair's queues.
#[derive(Debug, Clone, Copy)]
pub struct Depths {
    /// Sends and writes in flight.
    pub send: u16,
    /// Receives posted.
    pub recv: u16,
}

/// Wakes an [`Endpoint`](crate::Endpoint) that waits in [`Nic::wait`]:
/// the session queued something.
#[derive(Clone)]
pub struct Wake(Arc<dyn Fn() + Send + Sync>);

impl Wake {
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Wake {
        Wake(Arc::new(wake))
    }

    pub fn wake(&self) {
        (self.0)();
    }
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wake")
    }
}

/// One reliable-connected queue pair and its registered memory. Regions are
/// named by the index [`Nic::register`] returned, in order from 0.
pub trait Nic: Send + std::fmt::Debug {
    /// Registers `len` zeroed bytes; `remote_write` lets the peer write
    /// them. Returns the region's index and how the peer names it.
    fn register(&mut self, len: usize, remote_write: bool) -> Result<(usize, RemoteRegion), Error>;
    /// Copies bytes out of a region.
    fn read(&self, region: usize, offset: u64, out: &mut [u8]) -> Result<(), Error>;
    /// Copies bytes into a region.
    fn write(&mut self, region: usize, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Posts a receive into `len` bytes of a region.
    fn post_recv(&mut self, wr_id: u64, region: usize, offset: u64, len: u32) -> Result<(), Error>;
    /// Posts a signaled send, or RDMA WRITE, of `wr`.
    fn post_send(&mut self, wr: SendWr) -> Result<(), Error>;
    /// Appends the completions that are there.
    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> Result<(), Error>;
    /// The next connection-manager event, if any.
    fn poll_cm(&mut self) -> Result<Option<CmNotice>, Error>;
    /// This side's move once its receives are posted: accept (passive
    /// side) or connect (active side).
    fn start(&mut self) -> Result<(), Error>;
    /// Disconnects the queue pair.
    fn disconnect(&mut self);
    /// Waits up to `max` for a completion or event (or a [`Nic::waker`] call).
    fn wait(&mut self, max: Duration);
    /// A handle that ends a [`Nic::wait`] early.
    fn waker(&self) -> Wake;
}

/// A listening side: connect requests in, queue pairs out.
pub trait Listen: Send + std::fmt::Debug {
    /// The port it listens on.
    fn port(&self) -> u16;
    /// The next connect request within `timeout` as a queue pair of `depths`
    /// (not accepted yet: [`Nic::start`] does), or `None` when none came.
    fn accept(&mut self, depths: Depths, timeout: Duration) -> Result<Option<Box<dyn Nic>>, Error>;
}

/// A kind of RDMA device: opens queue pairs.
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// The device, for logs and the client's offer.
    fn device(&self) -> String;
    /// Listens on `addr` (port 0 picks one).
    fn listen(&self, addr: SocketAddr) -> Result<Box<dyn Listen>, Error>;
    /// A queue pair of `depths` towards a listener at `addr` (resolved, not
    /// connected yet: [`Nic::start`] does), within `timeout`.
    fn connect(&self, addr: SocketAddr, depths: Depths, timeout: Duration) -> Result<Box<dyn Nic>, Error>;
}
