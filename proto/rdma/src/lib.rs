//! gpupool's RDMA transport on verbs (issue 22, `docs/rdma.md`).
//!
//! The protocol is `gpupool_proto::rdma`: a sans-I/O state machine of one
//! side of a reliable-connected queue pair. This crate runs it on real
//! verbs: rdma_cm connects, an RC queue pair carries the command channel
//! (send/receive) and the one-sided writes of bulk copies, a polled
//! completion queue feeds completions back ([`Endpoint`] over the verbs
//! [`Provider`], feature `verbs`). Its `unsafe` lives in one module, `verbs`.
//!
//! [`Endpoint`] drives a connection over any [`Nic`]: the verbs one, or the
//! in-memory fabric ([`mem`]) that runs whole sessions in one process (the
//! server's and client's tests, and machines without a device).
//!
//! Without the `verbs` feature (no libibverbs/librdmacm headers, no
//! libclang for rdma-sys's bindgen) the crate builds and says so: [`devices`]
//! answers [`Error::NotBuilt`].
//!
//! [`check`] is the integration check the tests and the GPU suite run: a
//! loopback session over the first device with an IPv4 address, or a plain
//! "skipped: no RDMA device".

pub mod check;
pub mod endpoint;
pub mod mem;
pub mod nic;
#[cfg(feature = "verbs")]
mod verbs;
#[cfg(feature = "verbs")]
pub mod verbs_provider;

pub use endpoint::{Endpoint, Regions};
pub use nic::{Listen, Nic, Provider};

use gpupool_proto::rdma::RdmaError;

/// What can go wrong below the protocol.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Built without the `verbs` feature: no RDMA here.
    #[error("built without RDMA support (cargo feature `verbs`)")]
    NotBuilt,
    /// No RDMA device, or none usable for the address.
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    /// A verbs or connection-manager call failed.
    #[error("{call} failed: {source}")]
    Verbs { call: &'static str, source: std::io::Error },
    /// The connection manager reported something other than what the setup waits for.
    #[error("connection manager: {0}")]
    Cm(String),
    /// A registration larger than memory allows.
    #[error("cannot allocate a region of {0} bytes")]
    TooLarge(u64),
    /// Bytes outside one of this side's registered regions.
    #[error("{len} bytes at {offset} are outside local region {region}")]
    LocalBounds { region: usize, offset: u64, len: usize },
    /// The protocol ended the connection.
    #[error(transparent)]
    Rdma(#[from] RdmaError),
    /// Nothing happened in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// The RDMA provider of this machine: the first verbs device, or why none.
pub fn probe() -> Result<std::sync::Arc<dyn Provider>, Error> {
    #[cfg(feature = "verbs")]
    {
        Ok(std::sync::Arc::new(verbs_provider::VerbsProvider::probe()?))
    }
    #[cfg(not(feature = "verbs"))]
    {
        Err(Error::NotBuilt)
    }
}

/// Names of the RDMA devices `ibv_get_device_list` finds.
pub fn devices() -> Result<Vec<String>, Error> {
    #[cfg(feature = "verbs")]
    {
        verbs::device_names()
    }
    #[cfg(not(feature = "verbs"))]
    {
        Err(Error::NotBuilt)
    }
}
