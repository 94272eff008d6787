//! Server-wide counters: the connection tasks and session threads count
//! here; a worker process reports its counters to its supervisor, which adds
//! them to its own.

use gpupool_proto::v1;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Most labels (tenants, instances) with series of their own; sessions of
/// later ones count under [`OTHER_LABELS`], so that many tenants cannot grow
/// the scrape without bound.
pub const MAX_LABELS: usize = 1024;
/// The label of sessions past [`MAX_LABELS`].
pub const OTHER_LABELS: &str = "(other)";
/// The instance label of sessions on a server's one device (served without
/// instances, `--instances device`).
pub const DEVICE_INSTANCE: &str = "device";

/// Sessions of one tenant, or on one instance, of this server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounts {
    pub active: u64,
    pub opened: u64,
    /// Device memory its sessions in worker processes hold now, the calls
    /// they executed and the time they spent executing batches, in
    /// microseconds (as their workers report them).
    pub memory: u64,
    pub calls: u64,
    pub busy_us: u64,
}

/// Which series a session counts in: its tenant (the lease's, or the
/// token's subject) and the instance it runs on (the lease's; else the
/// server's first, or [`DEVICE_INSTANCE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLabels {
    pub tenant: String,
    pub instance: String,
}

impl SessionLabels {
    /// The labels of a session of `tenant` on instance `uuid` (empty: the
    /// server's one device).
    pub fn new(tenant: &str, uuid: &str) -> Self {
        let instance = if uuid.is_empty() { DEVICE_INSTANCE } else { uuid };
        Self { tenant: tenant.to_owned(), instance: instance.to_owned() }
    }
}

/// Sessions counted by one label, at most [`MAX_LABELS`] labels.
#[derive(Debug, Default)]
struct Series(Mutex<BTreeMap<String, SessionCounts>>);

impl Series {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SessionCounts>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn opened(&self, label: &str) {
        let mut t = self.lock();
        let key = if t.contains_key(label) || t.len() < MAX_LABELS { label } else { OTHER_LABELS };
        let entry = t.entry(key.to_owned()).or_default();
        entry.active += 1;
        entry.opened += 1;
    }

    /// The entry `label` counts in, once it opened a session.
    fn update(&self, label: &str, f: impl FnOnce(&mut SessionCounts)) {
        let mut t = self.lock();
        let key = if t.contains_key(label) { label } else { OTHER_LABELS };
        if let Some(entry) = t.get_mut(key) {
            f(entry);
        }
    }

    fn closed(&self, label: &str) {
        self.update(label, |e| e.active = e.active.saturating_sub(1));
    }

    fn worker_delta(&self, label: &str, now: &v1::WorkerMetrics, before: &v1::WorkerMetrics) {
        self.update(label, |e| {
            e.memory = e.memory.saturating_add(now.memory_mapped).saturating_sub(before.memory_mapped);
            e.calls += now.calls.saturating_sub(before.calls);
            e.busy_us += now.busy_us.saturating_sub(before.busy_us);
        });
    }

    fn all(&self) -> BTreeMap<String, SessionCounts> {
        self.lock().clone()
    }
}

/// A batch that started later than this after it was read counts as one
/// that waited ([`Metrics::batches_waited`]).
pub const WAITED: std::time::Duration = std::time::Duration::from_millis(1);

/// How a session's worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Exit status 0: the session ended.
    Normal,
    /// Another exit status: the worker failed.
    Failed,
    /// Ended by a signal (killed, or a crash such as SIGSEGV).
    Signal,
    /// Its status could not be read.
    Unknown,
}

impl WorkerExit {
    pub const ALL: [Self; 4] = [Self::Normal, Self::Failed, Self::Signal, Self::Unknown];

    /// How `status` ended a worker.
    pub fn of(status: &std::io::Result<std::process::ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Ok(s) if s.success() => Self::Normal,
            Ok(s) if s.signal().is_some() => Self::Signal,
            Ok(_) => Self::Failed,
            Err(_) => Self::Unknown,
        }
    }

    /// The metric's label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Failed => "failed",
            Self::Signal => "signal",
            Self::Unknown => "unknown",
        }
    }
}

/// Server-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub sessions_opened: AtomicU64,
    pub sessions_refused: AtomicU64,
    pub sessions_active: AtomicU64,
    /// Batches received (one per client flush).
    pub batches: AtomicU64,
    pub calls: AtomicU64,
    pub call_errors: AtomicU64,
    /// Frames that could not be decoded.
    pub frames_rejected: AtomicU64,
    pub bulk_bytes_in: AtomicU64,
    pub bulk_bytes_out: AtomicU64,
    /// Device memory sessions hold on the device now (a gauge).
    pub memory_mapped: AtomicU64,
    /// Device memory of sessions swapped out to host memory now (a gauge).
    pub memory_swapped: AtomicU64,
    /// Bytes sessions swapped out, and swapped back in, so far.
    pub swapped_out_bytes: AtomicU64,
    pub swapped_in_bytes: AtomicU64,
    /// Shared-memory regions mapped now (a gauge), and bytes copied through
    /// them (counted in `bulk_bytes_in`/`_out` as well).
    pub shm_regions: AtomicU64,
    pub shm_bytes: AtomicU64,
    /// Shared-memory regions registered with the driver now (a gauge): the
    /// host regions holding programs' pinned memory (also counted in
    /// `shm_regions`; the emulated device counts them without a driver).
    pub shm_registered: AtomicU64,
    /// RDMA connections admitted to their session, command frames received
    /// over RDMA, and bulk bytes copied over it (counted in
    /// `bulk_bytes_in`/`_out` as well).
    pub rdma_attachments: AtomicU64,
    pub rdma_frames: AtomicU64,
    pub rdma_bytes: AtomicU64,
    /// Command rings in shared memory taken by their session, and command
    /// frames received through them.
    pub shm_command_rings: AtomicU64,
    pub shm_command_frames: AtomicU64,
    /// Clients reattached to their kept session, and reattachments refused
    /// (the session was gone, or the secret wrong).
    pub resumptions: AtomicU64,
    pub resumptions_refused: AtomicU64,
    /// Workers of shared sessions that died abnormally under an MPS daemon,
    /// each ending the other sessions of its group (`docs/sharing.md`).
    pub mps_group_faults: AtomicU64,
    /// MPS control daemons started: the first, and each restart after one
    /// stopped answering.
    pub mps_daemon_starts: AtomicU64,
    /// Batches of shared sessions held by the temporal share (the session
    /// was past its share of the period while another wanted the GPU).
    pub time_share_holds: AtomicU64,
    /// Calls that failed with an error that ends the context
    /// ([`crate::CallError::ends_context`]), in this process.
    pub context_lost_errors: AtomicU64,
    /// Module images workers loaded before their session came, and those of
    /// them their session used (`--image-preload-mib`).
    pub modules_preloaded: AtomicU64,
    pub modules_preloaded_used: AtomicU64,
    /// Batches read and waiting for their session's thread now (a gauge).
    pub batches_queued: AtomicU64,
    /// Bytes decoded batches hold from being read until they ran, now (a
    /// gauge): each session's at most
    /// [`ServerConfig::max_queued_batch_bytes`](crate::ServerConfig::max_queued_batch_bytes).
    pub batch_bytes_queued: AtomicU64,
    /// Time sessions' threads spent executing batches, in microseconds:
    /// the device work they issued and waited for (GPU busy time as the
    /// server sees it; asynchronous work that outlives a batch is counted
    /// in the batch that waits for it).
    pub busy_us: AtomicU64,
    /// Worker processes started (warm ones included).
    pub worker_starts: AtomicU64,
    /// Batches that waited more than [`WAITED`] between being read and
    /// starting on their session's thread (behind the session's earlier
    /// batches, or held by the temporal share), and the time all batches
    /// waited so, in microseconds.
    pub batches_waited: AtomicU64,
    pub batch_wait_us: AtomicU64,
    /// Session worker processes ended, by [`WorkerExit`] (in its order).
    worker_exits: [AtomicU64; 4],
    /// Sessions by tenant (the lease's tenant, or the token's subject) and
    /// by instance ([`SessionLabels`]).
    tenants: Series,
    instances: Series,
    /// The host's staging ledger, read at each scrape (set by the server
    /// that made it; a worker's is its supervisor's).
    pub(crate) staging: std::sync::OnceLock<std::sync::Arc<crate::staging::host::HostLedger>>,
}

/// A copy of [`Metrics`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub sessions_opened: u64,
    pub sessions_refused: u64,
    pub sessions_active: u64,
    pub batches: u64,
    pub calls: u64,
    pub call_errors: u64,
    pub frames_rejected: u64,
    pub bulk_bytes_in: u64,
    pub bulk_bytes_out: u64,
    pub memory_mapped: u64,
    pub memory_swapped: u64,
    pub swapped_out_bytes: u64,
    pub swapped_in_bytes: u64,
    pub shm_regions: u64,
    pub shm_bytes: u64,
    pub shm_registered: u64,
    pub rdma_attachments: u64,
    pub rdma_frames: u64,
    pub rdma_bytes: u64,
    pub shm_command_rings: u64,
    pub shm_command_frames: u64,
    pub resumptions: u64,
    pub resumptions_refused: u64,
    pub modules_preloaded: u64,
    pub modules_preloaded_used: u64,
    pub batches_queued: u64,
    pub batch_bytes_queued: u64,
    pub busy_us: u64,
    pub worker_starts: u64,
    pub batches_waited: u64,
    pub batch_wait_us: u64,
}

impl Metrics {
    /// A session opened: it counts in its tenant's and its instance's
    /// series.
    pub fn session_opened(&self, labels: &SessionLabels) {
        self.tenants.opened(&labels.tenant);
        self.instances.opened(&labels.instance);
    }

    /// A session ended.
    pub fn session_closed(&self, labels: &SessionLabels) {
        self.tenants.closed(&labels.tenant);
        self.instances.closed(&labels.instance);
    }

    /// What a worker serving a session of `labels` counted since its last
    /// report: its memory and calls, into its tenant's and instance's.
    pub(crate) fn labels_worker_delta(
        &self,
        labels: &SessionLabels,
        now: &v1::WorkerMetrics,
        before: &v1::WorkerMetrics,
    ) {
        self.tenants.worker_delta(&labels.tenant, now, before);
        self.instances.worker_delta(&labels.instance, now, before);
    }

    /// A session's worker process ended.
    pub fn worker_exited(&self, how: WorkerExit) {
        add(&self.worker_exits[how as usize], 1);
    }

    /// Worker processes ended so far, by how.
    pub fn worker_exits(&self) -> [(WorkerExit, u64); 4] {
        WorkerExit::ALL.map(|w| (w, self.worker_exits[w as usize].load(Ordering::Relaxed)))
    }

    /// Sessions by tenant now.
    pub fn tenants(&self) -> BTreeMap<String, SessionCounts> {
        self.tenants.all()
    }

    /// Sessions by instance now.
    pub fn instances(&self) -> BTreeMap<String, SessionCounts> {
        self.instances.all()
    }

    /// Adds what a worker process counted since its last report.
    pub(crate) fn add_worker_delta(&self, now: &v1::WorkerMetrics, before: &v1::WorkerMetrics) {
        add(&self.batches, now.batches.saturating_sub(before.batches));
        add(&self.calls, now.calls.saturating_sub(before.calls));
        add(&self.call_errors, now.call_errors.saturating_sub(before.call_errors));
        add(&self.frames_rejected, now.frames_rejected.saturating_sub(before.frames_rejected));
        add(&self.bulk_bytes_in, now.bulk_bytes_in.saturating_sub(before.bulk_bytes_in));
        add(&self.bulk_bytes_out, now.bulk_bytes_out.saturating_sub(before.bulk_bytes_out));
        gauge(&self.memory_mapped, before.memory_mapped, now.memory_mapped);
        gauge(&self.memory_swapped, before.memory_swapped, now.memory_swapped);
        add(&self.swapped_out_bytes, now.swapped_out_bytes.saturating_sub(before.swapped_out_bytes));
        add(&self.swapped_in_bytes, now.swapped_in_bytes.saturating_sub(before.swapped_in_bytes));
        gauge(&self.shm_regions, before.shm_regions, now.shm_regions);
        gauge(&self.shm_registered, before.shm_registered, now.shm_registered);
        add(&self.shm_bytes, now.shm_bytes.saturating_sub(before.shm_bytes));
        add(&self.shm_command_rings, now.shm_command_rings.saturating_sub(before.shm_command_rings));
        add(&self.shm_command_frames, now.shm_command_frames.saturating_sub(before.shm_command_frames));
        add(&self.modules_preloaded, now.modules_preloaded.saturating_sub(before.modules_preloaded));
        add(&self.modules_preloaded_used, now.modules_preloaded_used.saturating_sub(before.modules_preloaded_used));
        gauge(&self.batches_queued, before.batches_queued, now.batches_queued);
        gauge(&self.batch_bytes_queued, before.batch_bytes_queued, now.batch_bytes_queued);
        add(&self.busy_us, now.busy_us.saturating_sub(before.busy_us));
        add(&self.batches_waited, now.batches_waited.saturating_sub(before.batches_waited));
        add(&self.batch_wait_us, now.batch_wait_us.saturating_sub(before.batch_wait_us));
    }

    /// The counters a worker process reports to its supervisor.
    pub(crate) fn worker_report(&self) -> v1::WorkerMetrics {
        let s = self.snapshot();
        v1::WorkerMetrics {
            batches: s.batches,
            calls: s.calls,
            call_errors: s.call_errors,
            frames_rejected: s.frames_rejected,
            bulk_bytes_in: s.bulk_bytes_in,
            bulk_bytes_out: s.bulk_bytes_out,
            memory_mapped: s.memory_mapped,
            shm_regions: s.shm_regions,
            shm_bytes: s.shm_bytes,
            shm_registered: s.shm_registered,
            shm_command_rings: s.shm_command_rings,
            shm_command_frames: s.shm_command_frames,
            memory_swapped: s.memory_swapped,
            swapped_out_bytes: s.swapped_out_bytes,
            swapped_in_bytes: s.swapped_in_bytes,
            modules_preloaded: s.modules_preloaded,
            modules_preloaded_used: s.modules_preloaded_used,
            batches_queued: s.batches_queued,
            batch_bytes_queued: s.batch_bytes_queued,
            busy_us: s.busy_us,
            batches_waited: s.batches_waited,
            batch_wait_us: s.batch_wait_us,
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            sessions_opened: g(&self.sessions_opened),
            sessions_refused: g(&self.sessions_refused),
            sessions_active: g(&self.sessions_active),
            batches: g(&self.batches),
            calls: g(&self.calls),
            call_errors: g(&self.call_errors),
            frames_rejected: g(&self.frames_rejected),
            bulk_bytes_in: g(&self.bulk_bytes_in),
            bulk_bytes_out: g(&self.bulk_bytes_out),
            memory_mapped: g(&self.memory_mapped),
            memory_swapped: g(&self.memory_swapped),
            swapped_out_bytes: g(&self.swapped_out_bytes),
            swapped_in_bytes: g(&self.swapped_in_bytes),
            shm_regions: g(&self.shm_regions),
            shm_bytes: g(&self.shm_bytes),
            shm_registered: g(&self.shm_registered),
            rdma_attachments: g(&self.rdma_attachments),
            rdma_frames: g(&self.rdma_frames),
            rdma_bytes: g(&self.rdma_bytes),
            shm_command_rings: g(&self.shm_command_rings),
            shm_command_frames: g(&self.shm_command_frames),
            resumptions: g(&self.resumptions),
            resumptions_refused: g(&self.resumptions_refused),
            modules_preloaded: g(&self.modules_preloaded),
            modules_preloaded_used: g(&self.modules_preloaded_used),
            batches_queued: g(&self.batches_queued),
            batch_bytes_queued: g(&self.batch_bytes_queued),
            busy_us: g(&self.busy_us),
            worker_starts: g(&self.worker_starts),
            batches_waited: g(&self.batches_waited),
            batch_wait_us: g(&self.batch_wait_us),
        }
    }
}

/// Moves a gauge from `before` to `now`.
pub(crate) fn gauge(a: &AtomicU64, before: u64, now: u64) {
    if now >= before {
        a.fetch_add(now - before, Ordering::Relaxed);
    } else {
        a.fetch_sub(before - now, Ordering::Relaxed);
    }
}

pub(crate) fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}
