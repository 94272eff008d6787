//! gpupool client core.
//!
//! A CPU-only process uses a remote GPU through a [`Session`]: one QUIC
//! connection to a gpu-server. The API follows the CUDA driver API's
//! semantics so the drop-in `libcuda.so.1` can sit on it as a thin layer:
//! - [`batch`]: queueing, batching and reply matching, no I/O;
//! - [`alloc`]: device addresses assigned locally from the session's range;
//! - [`transport`]: the [`transport::Transport`] trait and QUIC implementation;
//! - [`lease`]: a virtual GPU leased from the balancer, kept renewed;
//! - [`session`]: the API itself, with typed [`DeviceBuffer`]s.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod batch;
pub mod config;
mod error;
pub mod handoff;
pub mod launch_check;
pub mod lease;
pub mod mirror;
mod rdma;
pub mod session;
mod shm;
mod shm_commands;
pub mod stats;
mod tls;
pub mod transport;
mod wait;

pub use alloc::AllocationId;
pub use config::{
    ClientConfig, DEFAULT_DOWNLOAD_PIECE_BYTES, DEFAULT_SHM_PINNED_BYTES, DEFAULT_SHM_REGION_BYTES, RdmaOptions,
    TokenSource, Trust,
};
pub use error::{ClientError, Result};
pub use gpupool_proto::grpc_tls::BalancerTrust;
pub use handoff::LeaseHandoff;
pub use lease::{LeasedGpu, PoolRequest};
pub use mirror::MirrorHost;
pub use session::{
    ArrayEnd, DeviceBuffer, EventId, Function, Global, HostSide, JitInput, JitLinkOutput, JitLinkRequest, KernelArg,
    LaunchConfig, Module, OutputSink, OutputStream, Session, StreamId,
};
