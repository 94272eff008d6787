//! Example Lambda function: multiplies matrices on a gpupool GPU.
//!
//! Input `{"m":…,"n":…,"k":…,"a":[…],"b":[…]}` (row-major) or
//! `{"m":…,"n":…,"k":…,"seed":…}`; output the product, its checksum, the
//! device and the time of each step (`gpupool_lambda_layer::matmul`).
//! The GPU is opened once per execution environment, in INIT.

use gpupool_lambda_layer::matmul::{Gpu, Request, Response};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::{Arc, Mutex};

/// Whether `e` says the GPU session is gone (`CUDA_ERROR_DEVICE_UNAVAILABLE`).
fn session_lost(e: &anyhow::Error) -> bool {
    use cudarc::driver::{DriverError, sys::CUresult};
    e.chain().any(|c| c.downcast_ref::<DriverError>().is_some_and(|d| d.0 == CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt().with_ansi(false).without_time().with_target(false).init();
    // INIT: the layer's extension has leased the GPU by now.
    let gpu = tokio::task::spawn_blocking(Gpu::open).await??;
    tracing::info!(kernels = ?gpu.kernels(), "GPU opened");
    let gpu = Arc::new(Mutex::new(gpu));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Request>| {
        let gpu = gpu.clone();
        async move {
            tokio::task::spawn_blocking(move || -> Result<Response, Error> {
                let mut gpu = gpu.lock().map_err(|_| "the GPU state was poisoned by an earlier failure")?;
                gpu.run(&event.payload).map_err(|e| {
                    if session_lost(&e) {
                        // The session could not be resumed (frozen past the
                        // server's grace period, or the lease ended): CUDA
                        // state in this process is gone for good. Answer,
                        // then end the process so Lambda starts a fresh
                        // environment (a new INIT, a new lease) for the next
                        // invocation.
                        tracing::error!(error = %e, "the GPU session is lost; ending this environment");
                        std::thread::spawn(|| {
                            std::thread::sleep(std::time::Duration::from_millis(500));
                            std::process::exit(1);
                        });
                    }
                    e.into()
                })
            })
            .await?
        }
    }))
    .await
}
