//! gpupool balancer: the control plane.
//!
//! Maps each client's virtual GPU onto one instance of a shared pool (MIG
//! instances, or whole GPUs where MIG is off) across many gpu-servers.
//! - [`pool`]: the pool as a state machine without I/O or clock: servers,
//!   GPUs, instances, leases, quotas and the wait queue, fed requests and
//!   the time;
//! - [`service`]: the tonic gRPC service around it: signs leases (ed25519),
//!   parks waiting allocations, expires leases and drains silent servers;
//! - [`table`]: the operator's view of a pool status;
//! - [`exporter`]: the same status as a Prometheus endpoint;
//! - [`tenants`]: per-tenant client credentials (digests) and quotas: the
//!   tenant of a request is the one its credential belongs to;
//! - [`fleetsim`]: a trace-driven simulator of a MIG fleet on the pool
//!   (binary `gpupool-fleetsim`), and [`pool::planner`], the demand-driven
//!   MIG layout planner it exercises.
//!
//! A restarted balancer loses no lease: it rebuilds its state from the
//! servers' registrations (which carry their live sessions' lease tokens)
//! and from clients' renewals (which carry theirs), and grants nothing new
//! until every live lease has had a renewal interval to come back. See
//! `docs/balancer.md`.
#![forbid(unsafe_code)]

pub mod config;
mod convert;
pub mod exporter;
pub mod fleetsim;
#[cfg(test)]
mod fuzz;
pub mod pool;
pub mod service;
pub mod table;
pub mod tenants;

pub use config::{BalancerConfig, ClientAuth, LegacyClients, RdmaPolicy, TlsSettings};
pub use convert::gpu_to_proto;
pub use service::{Balancer, BalancerError, TenantsHandle, run};
