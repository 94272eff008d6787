//! What every connection task of a server shares: where sessions run (the
//! device, or worker pools), its configuration, authenticator, counters, image cache, session limit, the sessions open
//! under a balancer's leases and those kept for a client to reattach.

use super::bulk;
use super::metrics::Metrics;
use super::resume::Registry;
use crate::auth::{Authenticator, Grant};
use crate::config::{DeviceChoice, ServerConfig};
use crate::device::cuda::CudaDevice;
use crate::device::emulated::EmulatedDevice;
use crate::device::{Backend, DeviceDescription, DeviceResult};
use crate::error::ServerError;
use crate::images::ImageCache;
use crate::pool::WorkerPool;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// The device a server drives, chosen at start.
#[derive(Debug, Clone)]
pub(super) enum AnyDevice {
    Cuda(Arc<CudaDevice>),
    Emulated(Arc<EmulatedDevice>),
}

impl AnyDevice {
    /// Opens the device warm: context created and, on a GPU, the built-in
    /// module compiled, so that no session waits for NVRTC (a worker
    /// process opens its device before it is handed a session).
    pub(super) fn open(
        choice: DeviceChoice,
        eager_describe_max: usize,
        host: Option<&gpupool_proto::v1::HostFacts>,
    ) -> Result<Self, ServerError> {
        let device = Self::open_cold(choice, host)?;
        match &device {
            Self::Cuda(d) => d.describe_eagerly_up_to(eager_describe_max),
            Self::Emulated(d) => d.describe_eagerly_up_to(eager_describe_max),
        }
        if let Self::Cuda(d) = &device
            && let Err(e) = d.prepare_builtin()
        {
            tracing::warn!(error = %e, "built-in module not compiled ahead; its first load will try again");
        }
        Ok(device)
    }

    fn open_cold(choice: DeviceChoice, host: Option<&gpupool_proto::v1::HostFacts>) -> Result<Self, ServerError> {
        match choice {
            DeviceChoice::Cuda { ordinal } => {
                Ok(Self::Cuda(Arc::new(CudaDevice::open_with(ordinal, host).map_err(ServerError::Device)?)))
            }
            DeviceChoice::Emulated { memory } => Ok(Self::Emulated(Arc::new(EmulatedDevice::new(memory)))),
            DeviceChoice::Auto => match CudaDevice::open_with(0, host) {
                Ok(d) => Ok(Self::Cuda(Arc::new(d))),
                Err(e) => {
                    tracing::warn!(reason = %e, "no usable GPU; using the emulated device");
                    Ok(Self::Emulated(Arc::new(EmulatedDevice::new(DeviceChoice::DEFAULT_EMULATED_MEMORY))))
                }
            },
        }
    }

    /// See [`crate::device::Backend::preload_module`].
    pub(super) fn preload_module(&self, key: &crate::images::ImageKey, image: &[u8]) -> DeviceResult<bool> {
        match self {
            Self::Cuda(d) => d.preload_module(key, image),
            Self::Emulated(d) => d.preload_module(key, image),
        }
    }

    pub(super) fn description(&self) -> &DeviceDescription {
        match self {
            Self::Cuda(d) => d.description(),
            Self::Emulated(d) => d.description(),
        }
    }
}

/// Where sessions run.
#[derive(Debug, Clone)]
pub(super) enum Mode {
    /// In this process, on this device.
    Local(AnyDevice),
    /// Each in a worker process; this process only hands sessions over.
    Workers(Arc<Workers>),
}

/// Worker pools: one per served instance, or one for the server's device.
/// The instances of a MIG GPU change when the balancer has it laid out anew
/// (`super::relayout`); whole GPUs and their MPS groups stay.
#[derive(Debug)]
pub(super) struct Workers {
    /// By instance UUID (empty for the server's one device), in the order
    /// the instances were listed (a GPU laid out anew: its new ones last).
    served: std::sync::RwLock<Vec<Served>>,
    /// The MPS group of each whole GPU served, by instance UUID (as
    /// `served`); none for MIG instances, whose sessions never share.
    pub(super) groups: HashMap<String, Arc<super::mps_group::MpsGroup>>,
    /// How a new instance's pool is made.
    pub(super) recipe: PoolRecipe,
}

/// One served instance (or the server's device): its workers, and the
/// device memory they share, the ledger that swapping across worker
/// processes keeps (`swap/remote.rs`).
#[derive(Debug, Clone)]
pub(super) struct Served {
    pub(super) uuid: String,
    pub(super) pool: Arc<WorkerPool>,
    pub(super) memory: Arc<crate::swap::DeviceMemory>,
}

/// What a worker pool of an instance is made from.
#[derive(Debug, Clone)]
pub(super) struct PoolRecipe {
    pub(super) command: crate::config::WorkerCommand,
    pub(super) spec: gpupool_proto::v1::WorkerSpec,
    /// The host's staging ledger, shared by the workers of every pool.
    pub(super) staging: Arc<crate::staging::host::HostLedger>,
    pub(super) warm: usize,
    pub(super) start_timeout: std::time::Duration,
    /// The server's counters (worker starts).
    pub(super) metrics: Arc<Metrics>,
}

impl Workers {
    pub(super) fn new(
        served: Vec<Served>,
        groups: HashMap<String, Arc<super::mps_group::MpsGroup>>,
        recipe: PoolRecipe,
    ) -> Self {
        Self { served: std::sync::RwLock::new(served), groups, recipe }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Served>> {
        self.served.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Served>> {
        self.served.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The instance a session without a lease runs on: the first served
    /// (empty: the server's one device, or none served).
    pub(super) fn first_uuid(&self) -> String {
        self.read().first().map(|s| s.uuid.clone()).unwrap_or_default()
    }

    /// Every served instance now.
    pub(super) fn served(&self) -> Vec<Served> {
        self.read().clone()
    }

    /// Takes the instances `uuids` out of service (no new session lands
    /// on them) and returns them.
    pub(super) fn withdraw(&self, uuids: &[String]) -> Vec<Served> {
        let mut served = self.write();
        let (gone, stay) = std::mem::take(&mut *served).into_iter().partition(|s| uuids.contains(&s.uuid));
        *served = stay;
        gone
    }

    /// Puts instances (back) into service.
    pub(super) fn add(&self, more: Vec<Served>) {
        self.write().extend(more);
    }

    /// The pool a session runs in (its lease's instance, else the first)
    /// and the memory its workers share.
    pub(super) fn for_session(&self, grant: &Grant) -> Option<(Arc<WorkerPool>, Arc<crate::swap::DeviceMemory>)> {
        let served = self.read();
        let s = match &grant.lease {
            Some(lease) => served.iter().find(|s| s.uuid == lease.instance_uuid)?,
            None => served.first()?,
        };
        Some((s.pool.clone(), s.memory.clone()))
    }

    /// The MPS group a session joins, and its share in percent: only a
    /// shared lease's session on a whole GPU whose group uses MPS.
    pub(super) fn group_for(&self, grant: &Grant) -> Option<(Arc<super::mps_group::MpsGroup>, u32)> {
        let lease = grant.lease.as_ref()?;
        let percent = lease.shared_percent?;
        let pool = self.read().iter().find(|s| s.uuid == lease.instance_uuid)?.pool.clone();
        let group = self.groups.get(&lease.instance_uuid)?;
        let backend = pool.probe_result().map(|r| r.backend.as_str());
        group.applies(backend).then(|| (group.clone(), percent))
    }

    /// The group whose temporal share meters a session, and its share in
    /// percent: a shared lease's session on a whole GPU (with or without
    /// MPS), when the share is on.
    pub(super) fn share_for(&self, grant: &Grant) -> Option<(Arc<super::mps_group::MpsGroup>, u32)> {
        let lease = grant.lease.as_ref()?;
        let percent = lease.shared_percent?;
        Some((self.groups.get(&lease.instance_uuid)?.clone(), percent))
    }
}

/// A session opened under a balancer's lease.
#[derive(Debug)]
pub(crate) struct LeasedSession {
    /// The lease token, shown to a restarted balancer.
    pub(crate) token: String,
    /// The session's id here (what a migration order names).
    pub(crate) session_id: u64,
    /// Device memory the session has mapped, as its worker last reported.
    pub(crate) memory_used: u64,
    /// The client's connection to this server (the session's control
    /// connection when it runs in a worker process).
    pub(crate) conn: quinn::Connection,
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) images: Arc<ImageCache>,
    pub(crate) sessions: Arc<Semaphore>,
    /// One permit per connection accepted and not yet authenticated
    /// ([`ServerConfig::max_pending_handshakes`]).
    pub(crate) pre_auth: Arc<Semaphore>,
    pub(crate) next_session: AtomicU64,
    /// Notified when a session ends (a one-session server then stops).
    pub(crate) session_ended: tokio::sync::Notify,
    /// Open sessions by lease id, for heartbeats and for ending the
    /// sessions of leases the balancer ended.
    leased: Mutex<HashMap<u64, LeasedSession>>,
    /// Sessions a client may reattach to.
    pub(crate) resumable: Registry,
    /// Sessions that take extra bulk connections on the bulk endpoints.
    pub(crate) bulk: bulk::Registry,
    /// Sessions that can be ordered to move to another server.
    pub(crate) migrations: super::migrate::Registry,
    /// Sessions whose client on this host may attach a shared-memory region.
    pub(crate) shm: Arc<super::transport::shm::Registry>,
    /// The RDMA listener and the sessions waiting for their connection
    /// (none: RDMA off, no device, or sessions in worker processes).
    pub(crate) rdma: Option<Arc<super::transport::rdma::RdmaHost>>,
    /// The device memory of the sessions in this process, resident and
    /// swapped out ([`crate::swap`]).
    pub(crate) device_memory: Arc<crate::swap::DeviceMemory>,
    /// This process's share of the host's staging cap.
    pub(crate) host_staging: Arc<crate::staging::host::HostStaging>,
    /// With a balancer: whether a lease still stands, asked before a
    /// session of it is admitted (issue 20, finding 9).
    pub(crate) lease_check: Option<super::revocation::LeaseCheck>,
    /// The GPUs and instances served now: `config.gpus` at start, then as
    /// re-layouts changed them (what the balancer is told at registration).
    served_gpus: Mutex<Vec<crate::mig::ServedGpu>>,
    /// The CUDA IPC exports of the sessions in worker processes.
    pub(crate) ipc: crate::ipc::Registry,
}

impl Shared {
    /// `bulk_ports`: the ports of the server's bulk endpoints; `shm`: the
    /// shared-memory socket's sessions; `device_memory`: the ledger of the
    /// sessions in this process (with swapping or without); `host_staging`:
    /// this process's share of the host's staging cap.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: ServerConfig,
        auth: Arc<dyn Authenticator>,
        bulk_ports: Vec<u16>,
        shm: Arc<super::transport::shm::Registry>,
        rdma: Option<Arc<super::transport::rdma::RdmaHost>>,
        device_memory: Arc<crate::swap::DeviceMemory>,
        host_staging: Arc<crate::staging::host::HostStaging>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            device_memory,
            host_staging,
            images: Arc::new(
                ImageCache::new(config.image_cache_dir.clone(), config.image_cache_bytes)
                    .with_disk_limit(config.image_cache_disk_bytes),
            ),
            sessions: Arc::new(Semaphore::new(config.max_sessions)),
            pre_auth: Arc::new(Semaphore::new(config.max_pending_handshakes)),
            lease_check: config.balancer.clone().map(super::revocation::LeaseCheck::new),
            served_gpus: Mutex::new(config.gpus.clone()),
            ipc: crate::ipc::Registry::default(),
            config,
            auth,
            metrics,
            next_session: AtomicU64::new(1),
            session_ended: tokio::sync::Notify::new(),
            leased: Mutex::new(HashMap::new()),
            resumable: Registry::default(),
            bulk: bulk::Registry::new(bulk_ports),
            migrations: super::migrate::Registry::default(),
            shm,
            rdma,
        }
    }

    /// The GPUs and instances served now.
    pub(crate) fn served_gpus(&self) -> std::sync::MutexGuard<'_, Vec<crate::mig::ServedGpu>> {
        self.served_gpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn leased(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LeasedSession>> {
        self.leased.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the resumable sessions of `lease_id` (the lease ended): a
    /// session waiting for its client then ends.
    pub(crate) fn forget_resumable(&self, lease_id: u64) {
        self.resumable.forget_lease(lease_id);
    }
}
