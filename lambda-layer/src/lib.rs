//! gpupool's AWS Lambda layer.
//!
//! - `gpupool-extension` (`extensions/` in the layer): during the
//!   environment's INIT phase it leases a virtual GPU from the balancer,
//!   hands the lease to the function's drop-in libcuda through a file
//!   ([`gpupool_client::LeaseHandoff`]), renews it while the environment
//!   lives and releases it on SHUTDOWN.
//! - `gpupool-lambda-example`: a function on `lambda_runtime` that
//!   multiplies matrices on the GPU through CUDA ([`matmul`]), in a GPU
//!   worker process it replaces when the session is lost ([`worker`]).
//!
//! The layer's `lib/` holds the drop-in `libcuda.so.1` and
//! `libnvidia-ml.so.1`; `lambda-layer/build.sh` assembles the zip.

pub mod matmul;
pub mod worker;

/// Where the extension leaves the lease for the function (Lambda gives
/// both processes the same writable `/tmp`).
pub const DEFAULT_LEASE_FILE: &str = "/tmp/gpupool/lease";

/// The hand-off file: `GPUPOOL_LEASE_FILE` (as libcuda reads it), else
/// [`DEFAULT_LEASE_FILE`].
pub fn lease_file() -> std::path::PathBuf {
    std::env::var("GPUPOOL_LEASE_FILE")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map_or_else(|| DEFAULT_LEASE_FILE.into(), Into::into)
}
