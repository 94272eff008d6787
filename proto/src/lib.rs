//! Wire format of gpupool's data plane.
//!
//! The messages are defined in `proto/gpupool/v1/*.proto` and compiled at
//! build time with `protox` (no system `protoc`). This crate adds what both
//! ends need and nothing that does I/O:
//! - [`frame`]: length-prefixed frames and an incremental decoder;
//! - [`payload`]: bulk bytes, lz4-compressed when that pays;
//! - [`cuda`]: the `CUresult` codes that travel in replies;
//! - [`ipc`]: CUDA IPC handles as the server makes them;
//! - `fuzz` (feature `fuzzing`): helpers of the fuzz targets;
//! - [`rdma`]: the RDMA transport's protocol core and its negotiation, sans I/O;
//! - [`replay`]: resumption's log of frames sent and not yet acknowledged,
//!   kept by both ends and replayed after a reattach;
//! - [`balancer`] (feature `grpc`): the balancer's gRPC service (tonic);
//! - [`lease`] (feature `grpc`): signed lease tokens, made by the balancer
//!   and checked offline by gpu-servers;
//! - [`tls`] (feature `tls`): certificates of both planes, self-signed or
//!   from files, pinned by SHA-256 or checked against a CA;
//! - [`grpc_tls`] (feature `grpc-tls`): TLS on the balancer's gRPC.
#![forbid(unsafe_code)]

pub mod cuda;
#[cfg(feature = "exporter")]
pub mod exporter;
pub mod frame;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod ipc;
pub mod mem_ops;
pub mod mirror;
pub mod payload;
pub mod pool;
#[cfg(feature = "quic")]
pub mod quic;
pub mod rdma;
pub mod replay;
pub mod texture_abi;

/// Generated prost types of package `gpupool.v1`.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/gpupool.v1.rs"));
}

/// Generated prost types and tonic service of package `gpupool.balancer.v1`.
#[cfg(feature = "grpc")]
#[allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod balancer {
    include!(concat!(env!("OUT_DIR"), "/gpupool.balancer.v1.rs"));
}

#[cfg(feature = "grpc")]
pub mod lease;

#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "grpc-tls")]
pub mod grpc_tls;

/// Version of the data-plane protocol; `Hello.protocol_version` must match.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN name of the data plane on QUIC.
pub const ALPN: &[u8] = b"gpupool/1";

/// QUIC application error codes used when a connection is closed.
pub mod close_code {
    /// Normal end of a session.
    pub const NORMAL: u32 = 0;
    /// `Hello.protocol_version` differs from the server's.
    pub const VERSION_MISMATCH: u32 = 0x10;
    /// Missing, wrong or expired token.
    pub const UNAUTHORIZED: u32 = 0x11;
    /// The server is at its session limit.
    pub const BUSY: u32 = 0x12;
    /// The first frame was not a valid `Hello`.
    pub const BAD_HANDSHAKE: u32 = 0x13;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 0x14;
    /// The client violated the protocol after the handshake.
    pub const PROTOCOL_VIOLATION: u32 = 0x15;
    /// The worker process serving the session ended abnormally.
    pub const WORKER_EXITED: u32 = 0x16;
    /// A `Resume` named a session the server no longer keeps (its grace
    /// period passed, its lease ended, or the secret did not match).
    pub const SESSION_GONE: u32 = 0x17;
    /// The session moved to another server (live migration): the reason
    /// is an encoded `v1::Moved` saying where; the client resumes there.
    pub const MIGRATED: u32 = 0x18;
}

/// Image of the built-in module: every server loads it without an upload.
/// Its kernels ([`BUILTIN_SOURCE`], documented in `docs/builtin-kernels.md`)
/// run natively on a GPU and by reference code on the emulated device.
pub const BUILTIN_MODULE: &[u8] = b"gpupool-builtin-kernels/v1\n";

/// CUDA C source of the built-in module's kernels. A gpu-server compiles it
/// with NVRTC; a program that runs on a local GPU as well as through gpupool
/// compiles it itself when the driver refuses the [`BUILTIN_MODULE`] name.
pub const BUILTIN_SOURCE: &str = include_str!("builtin.cu");
