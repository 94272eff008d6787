//! Example Lambda function: multiplies matrices on a gpupool GPU.
//!
//! Input `{"m":…,"n":…,"k":…,"a":[…],"b":[…]}` (row-major) or
//! `{"m":…,"n":…,"k":…,"seed":…}`; output the product, its checksum, the
//! device and the time of each step (`gpupool_lambda_layer::matmul`).
//! The GPU is opened once per execution environment, in INIT.

use gpupool_lambda_layer::matmul::{Gpu, Request, Response};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::{Arc, Mutex};

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt().with_ansi(false).without_time().with_target(false).init();
    // INIT: the layer's extension has leased the GPU by now.
    let gpu = tokio::task::spawn_blocking(Gpu::open).await??;
    let gpu = Arc::new(Mutex::new(gpu));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Request>| {
        let gpu = gpu.clone();
        async move {
            tokio::task::spawn_blocking(move || -> Result<Response, Error> {
                let mut gpu = gpu.lock().map_err(|_| "the GPU state was poisoned by an earlier failure")?;
                Ok(gpu.run(&event.payload)?)
            })
            .await?
        }
    }))
    .await
}
