//! The remote side: a gpu-server started in-process on 127.0.0.1 port 0 and
//! client sessions on it.

use super::workloads::{ColdStart, Gpu, check_sum, vector_add_inputs};
use anyhow::{Context, Result, anyhow, bail};
use gpupool_client::{ClientConfig, DeviceBuffer, Function, KernelArg, LaunchConfig, Session, StreamId, Trust};
use gpupool_proto::BUILTIN_MODULE;
use gpupool_server::{DeviceChoice, Isolation, Server, ServerConfig, WorkerCommand};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Opening a CUDA device (context creation) takes well under a second; the
/// bound only catches a server that hangs.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// What the server thread reports once bound.
struct Bound {
    addr: SocketAddr,
    fingerprint: String,
    backend: &'static str,
}

/// Settings of the benchmark's server and client other than their defaults.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tuning {
    /// Client batch delay bound (`ClientConfig::batch.max_delay`).
    pub(crate) batch_delay: Option<Option<std::time::Duration>>,
    /// `ClientConfig::bulk_connections`.
    pub(crate) bulk_connections: Option<usize>,
    /// `ClientConfig::download_piece_bytes`.
    pub(crate) download_piece_bytes: Option<usize>,
    /// `max_udp_payload` of the server and the client.
    pub(crate) max_udp_payload: Option<u16>,
    /// The server's `io_spin`, when not its default.
    pub(crate) server_io_spin: Option<std::time::Duration>,
}

/// A gpu-server running on its own thread and tokio runtime; shut down and
/// joined on drop.
#[derive(Debug)]
pub(crate) struct LocalServer {
    addr: SocketAddr,
    fingerprint: String,
    backend: &'static str,
    token: String,
    /// Client settings other than the defaults.
    tuning: Tuning,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl LocalServer {
    /// Binds a server driving `device` and serves until dropped. With
    /// `process_isolation` each session runs in a worker process: this
    /// executable started again with `worker` (its `main` hands over to
    /// `gpupool_server::worker::run_if_worker`).
    pub(crate) fn start(device: DeviceChoice, process_isolation: bool, tuning: Tuning) -> Result<Self> {
        let token = hex_token();
        let mut config = ServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), vec![token.clone()]);
        config.device = device;
        if let Some(spin) = tuning.server_io_spin {
            config.io_spin = spin;
        }
        if let Some(payload) = tuning.max_udp_payload {
            config.max_udp_payload = payload;
        }
        if process_isolation {
            let program = std::env::current_exe().context("locating this executable for worker processes")?;
            config.isolation = Isolation::Process {
                command: WorkerCommand { program, args: vec![gpupool_server::worker::WORKER_ARG.into()] },
                warm: 2,
                start_timeout: START_TIMEOUT,
            };
        }
        let (bound_tx, bound_rx) = mpsc::channel::<Result<Bound>>();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("gpupool-server".into())
            .spawn(move || serve(config, bound_tx, shutdown_rx))
            .context("spawning the server thread")?;
        let bound = match bound_rx.recv_timeout(START_TIMEOUT) {
            Ok(bound) => bound,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the in-process gpu-server did not bind within {START_TIMEOUT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
                Ok(Err(e)) => return Err(e.context("starting the in-process gpu-server")),
                _ => bail!("the in-process gpu-server thread ended before binding"),
            },
        }
        .context("starting the in-process gpu-server")?;
        Ok(Self {
            addr: bound.addr,
            fingerprint: bound.fingerprint,
            backend: bound.backend,
            token,
            tuning,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// `cuda` or `emulated`.
    pub(crate) fn backend(&self) -> &'static str {
        self.backend
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(self.addr, Trust::Fingerprint(self.fingerprint.clone()), self.token.clone());
        if let Some(delay) = self.tuning.batch_delay {
            config.batch.max_delay = delay;
        }
        if let Some(n) = self.tuning.bulk_connections {
            config.bulk_connections = n;
        }
        if let Some(b) = self.tuning.download_piece_bytes {
            config.download_piece_bytes = b;
        }
        if let Some(payload) = self.tuning.max_udp_payload {
            config.max_udp_payload = payload;
        }
        // Copies over QUIC; `RemoteGpu::open_shm` turns shared memory on.
        config.shm_region_bytes = 0;
        config
    }

    pub(crate) fn connect(&self) -> Result<Session> {
        Session::connect(&self.client_config())
            .with_context(|| format!("connecting to the gpu-server at {}", self.addr))
    }

    /// Stops the server and waits for it to drain.
    pub(crate) fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(anyhow!("the gpu-server thread panicked")),
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!("gpu-server shutdown: {e:#}");
        }
    }
}

/// The server thread: a runtime, the server, and its run until shutdown.
fn serve(config: ServerConfig, bound: mpsc::Sender<Result<Bound>>, shutdown: oneshot::Receiver<()>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gpupool-server-rt")
        .build()
        .context("building the server's tokio runtime")?;
    runtime.block_on(async move {
        // `Server::bind` needs a runtime context for the QUIC endpoint.
        let server = Server::bind(config).context("binding the gpu-server")?;
        server.ready().await.context("starting the gpu-server's session workers")?;
        let info = Bound {
            addr: server.local_addr(),
            fingerprint: server.fingerprint().to_string(),
            backend: server.backend(),
        };
        if bound.send(Ok(info)).is_err() {
            return Ok(());
        }
        server
            .run(async {
                // A dropped sender is a shutdown too.
                let _ = shutdown.await;
            })
            .await
            .context("running the gpu-server")
    })
}

fn hex_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One session on the local server, with the built-in module loaded.
#[derive(Debug)]
pub(crate) struct RemoteGpu {
    session: Session,
    empty: Function,
}

impl RemoteGpu {
    pub(crate) fn open(server: &LocalServer) -> Result<Self> {
        let session = server.connect()?;
        let module = session.module_load(BUILTIN_MODULE).context("loading the built-in module")?;
        let empty = module.function("empty")?;
        Ok(Self { session, empty })
    }

    /// A session whose bulk copies go through shared memory (the client's
    /// default region); an error when it cannot attach one.
    pub(crate) fn open_shm(server: &LocalServer) -> Result<Self> {
        let mut config = server.client_config();
        config.shm_region_bytes = gpupool_client::DEFAULT_SHM_REGION_BYTES;
        let session = Session::connect(&config).context("connecting with shared memory")?;
        if session.shared_memory_bytes().is_none() {
            return Err(anyhow!("the session has no shared-memory region (see the client's log)"));
        }
        let module = session.module_load(BUILTIN_MODULE).context("loading the built-in module")?;
        let empty = module.function("empty")?;
        Ok(Self { session, empty })
    }

    /// A session on shared memory whose commands go through its command
    /// ring; an error when they do not.
    pub(crate) fn open_shm_commands(server: &LocalServer) -> Result<Self> {
        let gpu = Self::open_shm(server)?;
        gpu.check_shm_commands()?;
        Ok(gpu)
    }

    /// An error unless the session's commands go through shared memory
    /// (no silent fallback to QUIC).
    pub(crate) fn check_shm_commands(&self) -> Result<()> {
        if self.session.shm_commands_attached() {
            Ok(())
        } else {
            Err(anyhow!("the session's commands do not go through shared memory (see the client's log)"))
        }
    }

    /// [`workloads::copies`] on this session, checking that every byte
    /// went through shared memory (no silent fallback to QUIC).
    pub(crate) fn copies_through_shm(&self, data: &[u8]) -> Result<super::workloads::CopyRates> {
        let before = self.session.shared_memory_bytes();
        let copies = super::workloads::copies(self, data)?;
        match (before, self.session.shared_memory_bytes()) {
            (Some(b), Some(a)) if a > b => Ok(copies),
            _ => Err(anyhow!("copies of {} bytes did not go through shared memory", data.len())),
        }
    }

    /// [`workloads::pinned_copies`] on this session, checking that the
    /// bytes went no way but the host region (none through the bulk slots).
    pub(crate) fn pinned_copies_through_shm(&self, data: &[u8]) -> Result<super::workloads::CopyRates> {
        let before = self.session.shared_memory_bytes();
        let copies = super::workloads::pinned_copies(self, data)?;
        match (before, self.session.shared_memory_bytes()) {
            (Some(b), Some(a)) if a == b => Ok(copies),
            _ => Err(anyhow!("pinned copies of {} bytes went through the bulk slots or QUIC", data.len())),
        }
    }

    /// The device name the server reports.
    pub(crate) fn device_name(&self) -> String {
        self.session.device().name
    }

    pub(crate) fn close(self) -> Result<()> {
        self.session.close().context("closing the session")
    }
}

const ONE_THREAD: LaunchConfig = LaunchConfig { grid: (1, 1, 1), block: (1, 1, 1), shared_mem_bytes: 0 };

impl Gpu for RemoteGpu {
    type Buffer = DeviceBuffer<u8>;

    fn label(&self) -> &'static str {
        "remote"
    }

    fn launch_empty(&self) -> Result<()> {
        Ok(self.session.launch(&self.empty, ONE_THREAD, StreamId::DEFAULT, &[])?)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(self.session.stream_synchronize(StreamId::DEFAULT)?)
    }

    fn alloc(&self, bytes: usize) -> Result<Self::Buffer> {
        Ok(DeviceBuffer::new(&self.session, bytes)?)
    }

    fn htod(&self, dst: &Self::Buffer, src: &[u8]) -> Result<()> {
        Ok(self.session.memcpy_htod(dst.addr(), src, StreamId::DEFAULT)?)
    }

    fn dtoh(&self, dst: &mut [u8], src: &Self::Buffer) -> Result<()> {
        Ok(self.session.memcpy_dtoh(dst, src.addr(), StreamId::DEFAULT)?)
    }

    type Pinned = RemotePinned;

    fn alloc_pinned(&self, bytes: usize) -> Result<RemotePinned> {
        let addr = self.session.pinned_alloc(bytes).ok_or_else(|| {
            anyhow!("no pinned memory in a host region shared with the server (see the client's log)")
        })?;
        Ok(RemotePinned { session: self.session.clone(), addr })
    }

    fn write_pinned(&self, dst: &RemotePinned, data: &[u8]) -> Result<()> {
        Ok(self.session.pinned_write(dst.addr, data)?)
    }

    fn read_pinned(&self, src: &RemotePinned, out: &mut [u8]) -> Result<()> {
        Ok(self.session.pinned_read(src.addr, out)?)
    }

    fn htod_pinned(&self, dst: &Self::Buffer, src: &RemotePinned, len: usize) -> Result<()> {
        Ok(self.session.memcpy_htod_pinned(dst.addr(), src.addr, len, StreamId::DEFAULT)?)
    }

    fn dtoh_pinned(&self, dst: &RemotePinned, src: &Self::Buffer, len: usize) -> Result<()> {
        Ok(self.session.memcpy_dtoh_pinned(dst.addr, len, src.addr(), StreamId::DEFAULT)?)
    }
}

/// Pinned memory of a session in a host region shared with the server,
/// freed on drop.
#[derive(Debug)]
pub(crate) struct RemotePinned {
    session: Session,
    addr: usize,
}

impl Drop for RemotePinned {
    fn drop(&mut self) {
        if let Err(e) = self.session.pinned_free(self.addr) {
            tracing::warn!("freeing pinned memory failed: {e}");
        }
    }
}

/// One remote cold start: a new session on the warm server, the built-in
/// module, and `vector_add` up to its result on the host.
pub(crate) fn cold_start(server: &LocalServer) -> Result<ColdStart> {
    let (a, b, want) = vector_add_inputs();
    let config = server.client_config();
    let start = Instant::now();
    let session = Session::connect(&config).context("cold start: connecting")?;
    let setup = start.elapsed();
    let module = session.module_load(BUILTIN_MODULE).context("cold start: loading the built-in module")?;
    let vector_add = module.function("vector_add")?;
    let module_load = start.elapsed() - setup;
    let da = DeviceBuffer::from_slice(&session, &a)?;
    let db = DeviceBuffer::from_slice(&session, &b)?;
    let dc = DeviceBuffer::<f32>::new(&session, a.len())?;
    let n = u32::try_from(a.len())?;
    let args = [da.arg(), db.arg(), dc.arg(), KernelArg::U32(n)];
    session.launch(&vector_add, LaunchConfig::for_elements(n, 256), StreamId::DEFAULT, &args)?;
    let got = dc.to_vec()?;
    let first_result = start.elapsed() - setup - module_load;
    check_sum("remote", &got, &want)?;
    drop((da, db, dc));
    session.close().context("cold start: closing the session")?;
    Ok(ColdStart { setup, module_load, first_result })
}
