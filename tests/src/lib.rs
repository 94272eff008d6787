//! Shared pieces of gpupool's end-to-end tests, demo and benchmark: start a
//! real server (its `run` on 127.0.0.1 port 0, on its own runtime thread)
//! and open clients or raw QUIC connections to it.

use gpupool_client::{ClientConfig, Trust};
use gpupool_server::{DeviceChoice, Metrics, Server, ServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Token the test servers accept.
pub const TOKEN: &str = "test-token";

/// A server running on its own thread until dropped or stopped.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub metrics: Arc<Metrics>,
    pub backend: &'static str,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The device tests run on: `GPUPOOL_TEST_DEVICE=cuda` picks GPU 0,
/// anything else the emulated device.
pub fn test_device() -> DeviceChoice {
    match std::env::var("GPUPOOL_TEST_DEVICE").as_deref() {
        Ok("cuda") => DeviceChoice::Cuda { ordinal: 0 },
        _ => DeviceChoice::Emulated { memory: 8 << 30 },
    }
}

/// A test configuration on 127.0.0.1 port 0.
pub fn server_config() -> ServerConfig {
    let mut c = ServerConfig::new(([127, 0, 0, 1], 0).into(), vec![TOKEN.into()]);
    c.device = test_device();
    c.memory_quota = 256 << 20;
    c.shutdown_grace = Duration::from_secs(2);
    c
}

impl TestServer {
    /// Starts a server with `config`.
    pub fn start(config: ServerConfig) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let server = match Server::bind(config) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!(e)));
                        return;
                    }
                };
                let info = (server.local_addr(), server.fingerprint().to_string(), server.metrics(), server.backend());
                let _ = ready_tx.send(Ok(info));
                if let Err(e) = server.run(async { drop(stop_rx.await) }).await {
                    eprintln!("server stopped with error: {e}");
                }
            });
        });
        let (addr, fingerprint, metrics, backend) = ready_rx.recv_timeout(Duration::from_secs(120))??;
        Ok(Self { addr, fingerprint, metrics, backend, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// A client configuration for this server.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.addr, Trust::Fingerprint(self.fingerprint.clone()), TOKEN);
        c.reply_timeout = Duration::from_secs(60);
        c
    }

    /// Stops the server (closing every session) and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// xorshift64 words from `seed`: fast, deterministic, never all zeros.
fn xorshift(seed: u64) -> impl Iterator<Item = u64> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    })
}

/// Deterministic pseudo-random floats in [-1, 1), fresh per seed.
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    xorshift(seed).take(n).map(|x| ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).collect()
}

/// Pseudo-random bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    xorshift(seed).take(n).map(|x| (x >> 56) as u8).collect()
}

/// A seed that differs per run, so kernels are checked on fresh data.
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}

/// Relative L2 error of `got` against `want`.
pub fn rel_error(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if got.iter().any(|g| g.is_nan()) {
        return f64::INFINITY;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
