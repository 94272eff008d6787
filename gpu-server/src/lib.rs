//! gpupool GPU server.
//!
//! Runs on each GPU host. A QUIC endpoint accepts sessions (one connection
//! each) that present a valid token; each session gets a reserved device
//! address range, a memory quota and its own handle tables, and its call
//! batches execute in order on a worker thread bound to the device's warm
//! context. Layers, from the wire inwards:
//! - [`server`]: endpoint, handshake, sessions' command and bulk channels
//!   behind a transport interface (QUIC today; `docs/transport.md`);
//! - [`session`]: per-session tables and call execution (no I/O);
//! - [`staging`], [`images`]: staged bulk copies and the module image cache;
//! - [`device`]: the [`device::Backend`] trait with the CUDA (cudarc) and
//!   emulated implementations.
#![deny(unsafe_code)]

pub mod auth;
pub mod config;
pub mod device;
pub mod device_output;
mod error;
#[cfg(test)]
mod fuzz;
pub mod host_buffer;
pub mod host_regions;
pub mod images;
pub mod ipc;
pub mod mig;
pub mod mps;
pub mod pool;
pub mod server;
pub mod session;
pub mod share;
pub mod staging;
pub mod swap;
pub mod tls;
pub mod worker;
mod worker_spec;

pub use config::{
    BalancerLink, DeviceChoice, Isolation, MpsMode, MpsSettings, RdmaMode, RdmaSettings, ServerConfig, Swap,
    WorkerCommand,
};
pub use error::{CallError, ServerError};
pub use server::{Metrics, MetricsSnapshot, Migrated, MigrationTarget, Migrator, Server};
pub use swap::SwapDisk;

/// Binds a server for `config` and runs it until `shutdown` completes.
pub async fn run(config: ServerConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ServerError> {
    Server::bind(config)?.run(shutdown).await
}
