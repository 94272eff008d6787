//! A gpu-server's serving side: its endpoint, the handshake of each
//! connection, and the sessions it runs. Call execution lives in
//! [`crate::session`] on one thread per session; this module moves frames.
//!
//! The parts, from the wire inwards; each uses only parts listed after it:
//! - `handshake`: a connection's `Hello` and checks, then its session;
//! - `supervised`: a session handed to a worker process (redirect, control
//!   connection, resume by redirect);
//! - `local`: a session run in this process, over any transport;
//! - `commands`: a session's command channel, transport-agnostic;
//! - `link`: registration with a balancer;
//! - `state`: what the connection tasks share (config, device or worker
//!   pools, leased and resumable sessions);
//! - `resume`: sessions kept for a client that lost its connection;
//! - `transport`: the transport interface, its QUIC implementation, and
//!   shared memory for the bulk copies of clients on this host;
//! - `bulk`: a session's bulk transfers, transport-agnostic;
//! - `thread`: the session thread that executes batches;
//! - `metrics`: the counters ([`Metrics`]);
//! - `exporter`: the counters as a Prometheus endpoint (`--metrics-listen`).
//!
//! `docs/transport.md` describes the transport layer.

mod bulk;
mod commands;
pub mod exporter;
mod handshake;
mod link;
mod load;
mod local;
pub mod metrics;
mod migrate;
mod mps_group;
pub(crate) mod preload;
mod relayout;
mod resume;
mod revocation;
mod state;
mod supervised;
mod thread;
pub(crate) mod transport;

pub use metrics::{Metrics, MetricsSnapshot};
pub use migrate::{Migrated, MigrationTarget};

use crate::auth::{Authenticator, LeaseTokens, StaticTokens};
use crate::config::{DeviceChoice, Isolation, ServerConfig};
use crate::device::DeviceDescription;
use crate::error::ServerError;
use crate::pool::WorkerPool;
use crate::staging::host::{HostLedger, HostStaging};
use crate::tls::Identity;
use gpupool_proto::close_code;
use state::{AnyDevice, Mode, PoolRecipe, Served, Shared, Workers};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinSet;
use transport::{quic, rdma, shm};

/// A bound, not yet running, gpu-server.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    /// The bulk endpoints and their runtime (none with worker processes:
    /// each worker binds its own).
    bulk: BulkIo,
    /// The shared-memory socket (none: off, or worker processes bind theirs).
    shm: Option<shm::ShmListener>,
    /// The RDMA listener until `run` starts accepting on it.
    rdma: Option<Box<dyn gpupool_rdma::Listen>>,
    mode: Mode,
    fingerprint: String,
    shared: Arc<Shared>,
    /// The workers' shared image directory when none was configured.
    _images: Option<crate::images::PrivateDir>,
}

impl Server {
    /// Validates `config`, opens the device (its warm context) and binds the
    /// QUIC endpoint. Must be called inside a tokio runtime.
    pub fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        if config.tokens.is_empty() && config.balancer.is_none() {
            return Err(ServerError::Config("at least one session token (or a balancer) is required".into()));
        }
        let auth: Arc<dyn Authenticator> = match &config.balancer {
            Some(link) => {
                let verifier = gpupool_proto::lease::LeaseVerifier::from_hex(&link.lease_key)
                    .map_err(|e| ServerError::Config(format!("the balancer's lease key: {e}")))?;
                let instances = config.gpus.iter().flat_map(|g| &g.instances).map(|i| i.uuid.clone()).collect();
                Arc::new(LeaseTokens::new(verifier, link.server_id.clone(), instances, config.tokens.clone()))
            }
            None => Arc::new(StaticTokens::new(config.tokens.clone())),
        };
        Self::bind_with_auth(config, auth)
    }

    /// Like [`Server::bind`] with a custom authenticator.
    pub fn bind_with_auth(config: ServerConfig, auth: Arc<dyn Authenticator>) -> Result<Self, ServerError> {
        Self::bind_inner(config, auth, None, None)
    }

    /// A worker process's server, whose session's device memory is the
    /// supervisor's ledger (`remote`) when the supervisor swaps, and whose
    /// staged bytes count in the host's staging ledger (`staging`, the
    /// supervisor's) when it passed one.
    pub(crate) fn bind_worker(
        config: ServerConfig,
        auth: Arc<dyn Authenticator>,
        memory: Option<Arc<crate::swap::DeviceMemory>>,
        staging: Option<Arc<HostStaging>>,
    ) -> Result<Self, ServerError> {
        Self::bind_inner(config, auth, memory, staging)
    }

    fn bind_inner(
        mut config: ServerConfig,
        auth: Arc<dyn Authenticator>,
        worker_memory: Option<Arc<crate::swap::DeviceMemory>>,
        worker_staging: Option<Arc<HostStaging>>,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        // One cap on the bytes staged by every session of the host: in a
        // page the worker processes share, or in this process's memory.
        let host_staging = match (worker_staging, &config.isolation) {
            (Some(share), _) => share,
            (None, Isolation::Process { .. }) => {
                HostLedger::shared(config.staging_host_bytes, config.staging_wait)?.share(0)?
            }
            (None, Isolation::InProcess) => {
                HostLedger::local(config.staging_host_bytes, config.staging_wait).share(0)?
            }
        };
        let identity = Identity::load(&config.tls)?;
        let server_config = quic::server_config(&config, &identity)?;
        // Worker processes share module images through a directory: a
        // private one when none was configured.
        let private_images = match (&config.isolation, &config.image_cache_dir) {
            (Isolation::Process { .. }, None) => match crate::images::PrivateDir::create(&std::env::temp_dir()) {
                Ok(dir) => {
                    config.image_cache_dir = Some(dir.path().to_path_buf());
                    Some(dir)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no image directory for the workers: each loads its images anew");
                    None
                }
            },
            _ => None,
        };
        let metrics = Arc::new(Metrics::default());
        let mode = match &config.isolation {
            Isolation::InProcess => {
                let device = AnyDevice::open(config.device, config.eager_describe_max, config.host_facts.as_ref())?;
                let d = device.description();
                tracing::info!(device = %d.name, backend = d.backend, memory = d.total_memory, "device ready");
                Mode::Local(device)
            }
            Isolation::Process { command, warm, start_timeout } => {
                // Read once here for every worker (NVML's start is not
                // paid by a session's worker before its `Welcome`).
                if config.host_facts.is_none() && !matches!(config.device, DeviceChoice::Emulated { .. }) {
                    config.host_facts = Some(crate::device::cuda::host_facts::read_host());
                }
                let (chain, key) = identity.to_der();
                let spec = crate::worker_spec::spec_from_config(&config, chain, key);
                let mps_dir = config.mps.dir.clone().unwrap_or_else(mps_group::default_dir);
                let recipe = PoolRecipe {
                    command: command.clone(),
                    spec,
                    staging: host_staging.ledger().clone(),
                    warm: *warm,
                    start_timeout: *start_timeout,
                    metrics: metrics.clone(),
                };
                let mut groups = std::collections::HashMap::new();
                let served = if config.gpus.is_empty() {
                    // One device: its whole GPU, as CUDA_VISIBLE_DEVICES
                    // (or none) of this process shows it.
                    groups.insert(String::new(), mps_group::MpsGroup::new(&config.mps, mps_dir.clone(), None));
                    let staging = Some(recipe.staging.clone());
                    let pool = WorkerPool::new(command.clone(), &recipe.spec, staging, *warm, *start_timeout);
                    pool.count_in(recipe.metrics.clone());
                    vec![Served { uuid: String::new(), memory: instance_memory(&config, None), pool }]
                } else {
                    let instances = config.gpus.iter().flat_map(|g| &g.instances);
                    instances
                        .enumerate()
                        .map(|(i, instance)| {
                            if !instance.is_mig() {
                                // Short: the daemon's socket path must fit a
                                // unix socket address (108 bytes).
                                let dir = mps_dir.join(format!("i{i}"));
                                let devices = Some(instance.visible_devices.clone());
                                groups
                                    .insert(instance.uuid.clone(), mps_group::MpsGroup::new(&config.mps, dir, devices));
                            }
                            serve_instance(&config, &recipe, instance)
                        })
                        .collect()
                };
                Mode::Workers(Arc::new(Workers::new(served, groups, recipe)))
            }
        };
        let bulk = match &mode {
            Mode::Local(_) if config.bulk_endpoints > 0 => BulkIo::bind(&config, &server_config)?,
            _ => BulkIo::default(),
        };
        let endpoint = quic::endpoint(&config, server_config)?;
        // Swapping bounds the device memory of the sessions of this process
        // (with worker processes: of each pool's workers, above).
        if matches!(mode, Mode::Local(_)) && config.swap.is_some() {
            crate::host_buffer::set_spare_cap(config.swap_spare_bytes);
        }
        let swap = match (&mode, config.swap) {
            (Mode::Local(device), Some(s)) => Some(crate::swap::SwapConfig {
                device_bytes: s.device_bytes.unwrap_or(device.description().total_memory),
                host_bytes: s.host_bytes,
                wait: s.wait,
            }),
            _ => None,
        };
        let device_memory =
            worker_memory.unwrap_or_else(|| crate::swap::DeviceMemory::with_disk(swap, config.swap_disk.clone()));
        // The process that serves a session maps its client's region: this
        // one in-process, each worker process under process isolation.
        let (shm_listener, shm) = match (&mode, &config.shm_dir) {
            (Mode::Local(_), Some(dir)) => match shm::bind(dir, config.max_sessions) {
                Ok((listener, registry)) => (Some(listener), registry),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "no shared memory: cannot bind its socket");
                    (None, shm::Registry::off())
                }
            },
            _ => (None, shm::Registry::off()),
        };
        // RDMA sessions run in this process: under process isolation every
        // session stays on QUIC (a worker would need a listener of its own).
        let (rdma_host, rdma_listener) = match &mode {
            Mode::Local(_) => match rdma::RdmaHost::bind(&config, metrics.clone())? {
                Some((host, listener)) => (Some(host), Some(listener)),
                None => (None, None),
            },
            Mode::Workers(_) if config.rdma.mode == crate::config::RdmaMode::On => {
                return Err(ServerError::Config(
                    "--rdma on needs sessions in this process (process isolation keeps them on QUIC)".into(),
                ));
            }
            Mode::Workers(_) => (None, None),
        };
        let _ = metrics.staging.set(host_staging.ledger().clone());
        let shared = Arc::new(Shared::new(
            config,
            auth,
            bulk.ports(),
            Arc::new(shm),
            rdma_host,
            device_memory,
            host_staging,
            metrics,
        ));
        Ok(Self {
            endpoint,
            bulk,
            shm: shm_listener,
            rdma: rdma_listener,
            mode,
            fingerprint: identity.fingerprint(),
            shared,
            _images: private_images,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or(self.shared.config.listen)
    }

    /// Hex SHA-256 of the server certificate, for clients to pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A handle that moves this server's sessions to other servers
    /// (`docs/migration.md`); usable while the server runs.
    pub fn migrator(&self) -> Migrator {
        Migrator { shared: self.shared.clone() }
    }

    /// The module image cache of this process.
    pub(crate) fn images(&self) -> Arc<crate::images::ImageCache> {
        self.shared.images.clone()
    }

    /// What loads module images ahead of a session into this process's
    /// device: `None` with worker processes (each preloads its own), or
    /// when there is no image directory or no budget.
    pub(crate) fn preloader(&self) -> Option<preload::Preloader> {
        let budget = self.shared.config.image_preload_bytes;
        match &self.mode {
            Mode::Local(device) if budget > 0 && self.shared.config.image_cache_dir.is_some() => {
                Some(preload::Preloader {
                    device: device.clone(),
                    images: self.shared.images.clone(),
                    budget,
                    metrics: self.shared.metrics.clone(),
                })
            }
            _ => None,
        }
    }

    /// The server's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Waits until sessions can be served. With worker processes this
    /// starts the first one and fails with its reason when the device cannot
    /// be opened there; in-process the device is already open.
    pub async fn ready(&self) -> Result<(), ServerError> {
        if let Mode::Workers(workers) = &self.mode {
            for Served { uuid: instance, pool, .. } in workers.served() {
                let r = pool.probe().await?;
                tracing::info!(backend = %r.backend, device = %r.device_name, %instance, "session workers ready");
                pool.fill();
            }
        }
        Ok(())
    }

    /// `"cuda"` or `"emulated"`; with worker processes, what the first one
    /// reported (`"unknown"` before [`Server::ready`]).
    pub fn backend(&self) -> &'static str {
        match &self.mode {
            Mode::Local(d) => d.description().backend,
            Mode::Workers(w) => {
                match w.served().first().and_then(|s| s.pool.probe_result()).map(|r| r.backend.as_str()) {
                    Some("cuda") => "cuda",
                    Some("emulated") => "emulated",
                    _ => "unknown",
                }
            }
        }
    }

    /// The port of the RDMA listener (`None`: no RDMA here).
    pub fn rdma_port(&self) -> Option<u16> {
        self.shared.rdma.as_ref().map(|h| h.port())
    }

    /// The path of this process's shared-memory socket (`None`: off, or
    /// sessions run in worker processes, which bind their own).
    pub fn shm_socket(&self) -> Option<&std::path::Path> {
        self.shm.as_ref().map(|l| l.path())
    }

    /// The device of an in-process server (`None` with worker processes).
    pub fn description(&self) -> Option<&DeviceDescription> {
        match &self.mode {
            Mode::Local(d) => Some(d.description()),
            Mode::Workers(_) => None,
        }
    }

    /// The pool of worker processes (`None` in-process), for operators'
    /// views of which worker serves which session; with several instances,
    /// the first instance's.
    pub fn worker_pool(&self) -> Option<Arc<WorkerPool>> {
        match &self.mode {
            Mode::Local(_) => None,
            Mode::Workers(w) => w.served().first().map(|s| s.pool.clone()),
        }
    }

    /// Serves until `shutdown` completes, then closes every session and
    /// waits up to the grace period for them to end.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        self.ready().await?;
        let (link_stop, link_stopped) = tokio::sync::watch::channel(false);
        let link = self.shared.config.balancer.clone().map(|mut link| {
            // Port 0 in the advertised address: the port bound (tests, and
            // hosts that pick the port at start).
            if let Some(host) = link.advertise.strip_suffix(":0") {
                link.advertise = format!("{host}:{}", self.local_addr().port());
            }
            let fingerprint = self.fingerprint.clone();
            let workers = match &self.mode {
                Mode::Workers(w) => Some(w.clone()),
                Mode::Local(_) => None,
            };
            tokio::spawn(link::run(link, fingerprint, self.shared.clone(), workers, link_stopped))
        });
        self.bulk.serve(&self.shared);
        let shm = self.shm.take().map(|listener| {
            let (shared, timeout) = (self.shared.clone(), self.shared.config.handshake_timeout);
            tokio::spawn(async move {
                if let Err(e) = shm::serve(listener, shared.shm.clone(), shared.metrics.clone(), timeout).await {
                    tracing::warn!(error = %e, "no shared memory: its socket failed");
                }
            })
        });
        let rdma = match (self.rdma.take(), &self.shared.rdma) {
            (Some(listener), Some(host)) => match rdma::serve(host.clone(), listener) {
                Ok(thread) => Some(thread),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the RDMA listener's thread; sessions stay on QUIC");
                    None
                }
            },
            _ => None,
        };
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        let one = self.shared.config.one_session;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = self.shared.session_ended.notified(), if one => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let shared = self.shared.clone();
                    tasks.spawn(handshake::handle_connection(shared, self.mode.clone(), incoming));
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tracing::info!("shutting down");
        if let Some(shm) = shm {
            // Its socket file goes with the task.
            shm.abort();
        }
        if let (Some(thread), Some(host)) = (rdma, &self.shared.rdma) {
            // Connections already attached end with their sessions.
            host.stop();
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let _ = link_stop.send(true);
        if let Some(link) = link {
            let _ = link.await;
        }
        if let Mode::Workers(workers) = &self.mode {
            for s in workers.served() {
                s.pool.close();
            }
        }
        let groups = match &self.mode {
            Mode::Workers(workers) => workers.groups.values().cloned().collect(),
            Mode::Local(_) => Vec::new(),
        };
        self.endpoint.close(close_code::SHUTDOWN.into(), b"server shutting down");
        self.bulk.close();
        let grace = self.shared.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while tasks.join_next().await.is_some() {}
            self.endpoint.wait_idle().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("sessions still open after the grace period; aborting them");
            tasks.abort_all();
        }
        // The closes queued above, bulk connections' included, still have
        // to leave, or clients learn of the end only from their idle timeout
        // (and then try to resume against a server that is gone).
        let _ = tokio::time::timeout(CLOSE_FLUSH, async {
            self.endpoint.wait_idle().await;
            self.bulk.wait_idle().await;
        })
        .await;
        // After the sessions: their workers were the daemon's clients.
        for group in groups {
            group.stop().await;
        }
        Ok(())
    }
}

/// How long a server that gave up waiting for its sessions still lets the
/// connection closes it queued go out.
const CLOSE_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// The bulk endpoints and the runtime that drives them: threads of their
/// own, so that a worker process's one I/O thread (which keeps the command
/// path's wake-ups on one thread) does not carry the copies too.
#[derive(Debug, Default)]
struct BulkIo {
    /// Always `Some` until drop.
    runtime: Option<tokio::runtime::Runtime>,
    endpoints: Vec<quinn::Endpoint>,
}

impl BulkIo {
    fn bind(config: &ServerConfig, server_config: &quinn::ServerConfig) -> Result<Self, ServerError> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.bulk_endpoints.min(cores).max(1))
            .thread_name("gpupool-bulk-io")
            .enable_all()
            .build()
            .map_err(|e| ServerError::Config(format!("cannot start the bulk I/O runtime: {e}")))?;
        match quic::bulk_endpoints(config, server_config, runtime.handle()) {
            Ok(endpoints) => Ok(Self { runtime: Some(runtime), endpoints }),
            Err(e) => {
                // Dropped here it would panic inside the caller's runtime (a
                // worker binding in its own): the worker then died without
                // reporting why (a bulk port it could not bind).
                runtime.shutdown_background();
                Err(e)
            }
        }
    }

    fn ports(&self) -> Vec<u16> {
        self.endpoints.iter().filter_map(|e| e.local_addr().ok()).map(|a| a.port()).collect()
    }

    /// Starts accepting bulk connections on every bulk endpoint.
    fn serve(&self, shared: &Arc<Shared>) {
        if let Some(rt) = &self.runtime {
            for endpoint in &self.endpoints {
                rt.spawn(handshake::serve_bulk_endpoint(shared.clone(), endpoint.clone()));
            }
        }
    }

    fn close(&self) {
        for endpoint in &self.endpoints {
            endpoint.close(close_code::SHUTDOWN.into(), b"server shutting down");
        }
    }

    /// Waits until every bulk connection's close has left.
    async fn wait_idle(&self) {
        for endpoint in &self.endpoints {
            endpoint.wait_idle().await;
        }
    }
}

impl Drop for BulkIo {
    fn drop(&mut self) {
        // Dropping a runtime inside another one would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Moves sessions of a running server to other servers.
#[derive(Debug, Clone)]
pub struct Migrator {
    shared: Arc<Shared>,
}

impl Migrator {
    /// Ids of the sessions that can be moved now (those served in this
    /// process).
    pub fn sessions(&self) -> Vec<u64> {
        self.shared.migrations.ids()
    }

    /// Moves session `id` to `target` at its next batch boundary. On
    /// failure the session keeps running here and the error says why.
    pub async fn migrate(&self, id: u64, target: MigrationTarget) -> Result<Migrated, ServerError> {
        // Room for the batches queued before the order, then the transfer.
        let limit = migrate::TRANSFER_LIMIT * 2;
        self.shared
            .migrations
            .migrate(id, target, limit)
            .await
            .map_err(|reason| ServerError::Migration { session: id, reason })
    }
}

/// A served instance's worker pool (bound to it by `CUDA_VISIBLE_DEVICES`)
/// and its device memory ledger.
fn serve_instance(config: &ServerConfig, recipe: &PoolRecipe, instance: &crate::mig::ServedInstance) -> Served {
    let mut spec = recipe.spec.clone();
    spec.memory_quota = instance.memory;
    // Under CUDA_VISIBLE_DEVICES the instance is device 0.
    spec.device = match config.device {
        DeviceChoice::Emulated { .. } => DeviceChoice::Emulated { memory: instance.memory },
        _ => DeviceChoice::Cuda { ordinal: 0 },
    }
    .to_string();
    let env = vec![("CUDA_VISIBLE_DEVICES".to_string(), instance.visible_devices.clone())];
    let staging = Some(recipe.staging.clone());
    let pool = WorkerPool::with_env(recipe.command.clone(), env, &spec, staging, recipe.warm, recipe.start_timeout);
    pool.count_in(recipe.metrics.clone());
    Served { uuid: instance.uuid.clone(), pool, memory: instance_memory(config, Some(instance)) }
}

/// One ledger per served device or instance: its workers' sessions swap
/// against each other, not across instances.
fn instance_memory(
    config: &ServerConfig,
    instance: Option<&crate::mig::ServedInstance>,
) -> Arc<crate::swap::DeviceMemory> {
    let device = match (instance, config.device) {
        (Some(i), _) => i.memory,
        (None, DeviceChoice::Emulated { memory }) => memory,
        // Learned from the first worker's report.
        (None, _) => u64::MAX,
    };
    let swap = config.swap.map(|s| crate::swap::SwapConfig {
        device_bytes: s.device_bytes.unwrap_or(device),
        host_bytes: s.host_bytes,
        wait: s.wait,
    });
    crate::swap::DeviceMemory::with_disk(swap, config.swap_disk.clone())
}
