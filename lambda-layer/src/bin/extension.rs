//! gpupool's Lambda extension (`extensions/gpupool-extension` in the layer).
//!
//! During INIT, before it registers, it leases a virtual GPU from the
//! balancer (`GPUPOOL_BALANCER`, `GPUPOOL_TENANT`, `GPUPOOL_MEMORY_MIB`,
//! `GPUPOOL_COMPUTE_PERCENT`, `GPUPOOL_PROFILE`, `GPUPOOL_WAIT_MS`,
//! `GPUPOOL_BALANCER_SECRET` or `GPUPOOL_BALANCER_SECRET_FILE`, the
//! tenant's own credential, from which the balancer takes the tenant, so
//! `GPUPOOL_TENANT` may be left out; and `GPUPOOL_BALANCER_CERT_SHA256` or
//! `GPUPOOL_BALANCER_CA_FILE` to verify the balancer over TLS, as the
//! drop-in libcuda reads them) and writes
//! the lease to `GPUPOOL_LEASE_FILE` (default `/tmp/gpupool/lease`), where
//! the function's libcuda picks it up: the first invocation pays for
//! neither the lease nor the balancer round trip. The lease is renewed in
//! the background while the environment lives (the file follows each
//! renewal) and released on SHUTDOWN.

use anyhow::Result;
use gpupool_client::{LeaseHandoff, LeasedGpu, PoolRequest};
use gpupool_lambda_layer::lease_file;
use lambda_extension::{Extension, LambdaEvent, NextEvent, service_fn};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// How often the hand-off file is brought up to date (an in-memory check).
const FOLLOW_TICK: Duration = Duration::from_millis(100);
/// The pause after a failed attempt to lease again.
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// The environment's lease; replaced when the balancer no longer knows it.
type Held = Arc<std::sync::Mutex<Arc<LeasedGpu>>>;

fn current(held: &Held) -> Arc<LeasedGpu> {
    held.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Keeps the hand-off file equal to the lease as last renewed. When the
/// lease is gone (the environment was frozen past its expiry, or the
/// balancer ended it) it leases again, so that the next session the
/// function opens finds a valid lease.
///
/// It looks every [`FOLLOW_TICK`]: after a thaw the renewer finds the lease
/// gone within one balancer round trip, and the function, whose session is
/// gone with it, waits for the new lease.
async fn follow_renewals(held: Held, req: PoolRequest, path: PathBuf) {
    let mut written = LeaseHandoff::from(&current(&held).lease());
    loop {
        tokio::time::sleep(FOLLOW_TICK).await;
        let leased = current(&held);
        if leased.is_gone() {
            tracing::warn!(lease = leased.lease().lease_id, "gpupool: the lease is gone; leasing again");
            let req = req.clone();
            let fresh = tokio::task::spawn_blocking(move || LeasedGpu::allocate(&req))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r.map_err(anyhow::Error::from));
            match fresh {
                Ok(fresh) => *held.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh),
                Err(e) => {
                    tracing::warn!("gpupool: cannot lease again: {e}");
                    tokio::time::sleep(LEASE_RETRY).await;
                }
            }
        }
        let now = LeaseHandoff::from(&current(&held).lease());
        if now != written {
            match now.write(&path) {
                Ok(()) => written = now,
                Err(e) => tracing::warn!("cannot update the lease hand-off file: {e}"),
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .without_time()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("GPUPOOL_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let path = lease_file();
    let req = PoolRequest::from_lookup(&var).map_err(|problems| anyhow::anyhow!(problems.join("; ")))?;
    let start = std::time::Instant::now();
    let first = req.clone();
    let leased = Arc::new(tokio::task::spawn_blocking(move || LeasedGpu::allocate(&first)).await??);
    let lease = leased.lease();
    LeaseHandoff::from(&lease).write(&path)?;
    tracing::info!(
        lease = lease.lease_id,
        server = %lease.address,
        ms = start.elapsed().as_millis() as u64,
        file = %path.display(),
        "gpupool: leased a GPU for this environment"
    );
    let held: Held = Arc::new(std::sync::Mutex::new(leased));
    let follower = tokio::spawn(follow_renewals(held.clone(), req, path.clone()));

    let on_event = {
        let held = held.clone();
        let path = path.clone();
        service_fn(move |event: LambdaEvent| {
            let leased = current(&held);
            let path = path.clone();
            async move {
                if let NextEvent::Shutdown(shutdown) = event.next {
                    tracing::info!(reason = ?shutdown.shutdown_reason, "gpupool: releasing the lease");
                    tokio::task::spawn_blocking(move || leased.release()).await?;
                    let _ = std::fs::remove_file(&path);
                }
                Ok::<(), lambda_extension::Error>(())
            }
        })
    };
    let result = Extension::new().with_events(&["SHUTDOWN"]).with_events_processor(on_event).run().await;
    follower.abort();
    result.map_err(|e| anyhow::anyhow!("lambda extension: {e}"))
}
