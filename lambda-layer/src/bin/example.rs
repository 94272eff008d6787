//! Example Lambda function: multiplies matrices on a gpupool GPU.
//!
//! Input `{"m":…,"n":…,"k":…,"a":[…],"b":[…]}` (row-major) or
//! `{"m":…,"n":…,"k":…,"seed":…}`; output the product, its checksum, the
//! device and the time of each step (`gpupool_lambda_layer::matmul`).
//!
//! Two processes: this one answers Lambda (`lambda_runtime`) and never
//! loads CUDA; a GPU worker (the same binary with `--gpu-worker`, started in
//! INIT) holds the CUDA context. A session that cannot come back (the
//! environment was frozen past the server's grace period or past its lease)
//! is a lost CUDA context for good; the worker then ends, and the invocation
//! that found it lost starts a new worker (a new session, on the lease the
//! extension took again) and runs once more, so the caller sees a correct
//! answer, marked `recovered`.

use anyhow::{Context, Result, anyhow, bail};
use gpupool_lambda_layer::lease_file;
use gpupool_lambda_layer::matmul::{Request, Response};
use gpupool_lambda_layer::worker::{Reply, WorkerProcess, serve};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an invocation that lost its session waits for a new one (the
/// extension leases again within a balancer round trip of the thaw).
fn recovery_window() -> Duration {
    let ms = std::env::var("GPUPOOL_RECOVER_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(15_000);
    Duration::from_millis(ms)
}

/// Starts a worker, retrying until `window` has passed: right after a thaw
/// the hand-off file may still hold the lease that was lost, so after a
/// failed start it waits for the extension to write the next one (or
/// [`RETRY_AFTER`] at most) and tries again.
fn start_worker(window: Duration) -> Result<WorkerProcess> {
    let deadline = Instant::now() + window;
    let path = lease_file();
    loop {
        let before = std::fs::read(&path).ok();
        match WorkerProcess::start() {
            Ok(w) => return Ok(w),
            Err(e) if Instant::now() < deadline => {
                tracing::info!(error = %format!("{e:#}"), "the GPU worker could not open the GPU yet; retrying");
                let wait_until = (Instant::now() + RETRY_AFTER).min(deadline);
                while Instant::now() < wait_until && std::fs::read(&path).ok() == before {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The longest pause between two attempts to start a worker.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Runs `req` on the worker, replacing a worker whose session is lost and
/// running the request once more on the new one.
fn invoke(slot: &mut Option<WorkerProcess>, req: &Request) -> Result<Response> {
    for attempt in 0..2 {
        let worker = match slot {
            Some(w) => w,
            None => slot.insert(start_worker(recovery_window())?),
        };
        match worker.call(req) {
            Ok(Reply::Done { mut response }) => {
                response.recovered = attempt > 0;
                return Ok(response);
            }
            Ok(Reply::Failed { message, session_lost: false }) => bail!(message),
            Ok(Reply::Failed { message, session_lost: true }) => {
                tracing::warn!(error = %message, attempt, "the GPU session is lost; starting a new GPU worker");
            }
            Ok(Reply::Opened { .. }) => bail!("the GPU worker answered out of turn"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), attempt, "the GPU worker ended; starting a new one"),
        }
        // Dropping the worker ends it.
        *slot = None;
    }
    Err(anyhow!("the GPU session was lost twice in one invocation"))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let worker_mode = std::env::args().nth(1).as_deref() == Some("--gpu-worker");
    // The worker's stdout carries its replies; its logs go to stderr.
    tracing_subscriber::fmt().with_ansi(false).without_time().with_target(false).with_writer(std::io::stderr).init();
    if worker_mode {
        return tokio::task::spawn_blocking(serve).await?.map_err(Error::from);
    }
    // INIT: the layer's extension has leased the GPU by now.
    let worker = tokio::task::spawn_blocking(|| WorkerProcess::start().context("opening the GPU")).await??;
    tracing::info!(kernels = ?worker.kernels(), "GPU opened");
    let slot = Arc::new(Mutex::new(Some(worker)));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Request>| {
        let slot = slot.clone();
        async move {
            tokio::task::spawn_blocking(move || -> Result<Response, Error> {
                let mut slot = slot.lock().map_err(|_| "the GPU state was poisoned by an earlier failure")?;
                invoke(&mut slot, &event.payload).map_err(|e| format!("{e:#}").into())
            })
            .await?
        }
    }))
    .await
}
