//! Typed server configuration. Binaries parse flags and environment into a
//! [`ServerConfig`]; [`ServerConfig::validate`] reports every bad value at once.

use crate::error::ServerError;
use crate::tls::TlsSource;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Which device the server drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The GPU at ordinal 0 if a CUDA driver and GPU are present, else the
    /// emulated device (and a warning saying so).
    Auto,
    /// The GPU at this ordinal; fail if it cannot be opened.
    Cuda { ordinal: usize },
    /// The emulated device, with this much memory in bytes.
    Emulated { memory: u64 },
}

impl DeviceChoice {
    /// Memory of the emulated device when none is named (`emulated`, or
    /// `auto` without a GPU).
    pub const DEFAULT_EMULATED_MEMORY: u64 = 16 << 30;
}

/// `auto`, `cuda:N`, `emulated` (with [`DeviceChoice::DEFAULT_EMULATED_MEMORY`])
/// or `emulated:BYTES`: the `--device` flag and the device of a worker's spec.
impl std::str::FromStr for DeviceChoice {
    type Err = ServerError;

    fn from_str(s: &str) -> Result<Self, ServerError> {
        let number = |n: &str, what: &str| {
            n.parse::<u64>().map_err(|_| ServerError::Config(format!("device {s:?}: the {what} must be a number")))
        };
        if s == "auto" {
            return Ok(Self::Auto);
        }
        if s == "emulated" {
            return Ok(Self::Emulated { memory: Self::DEFAULT_EMULATED_MEMORY });
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            let ordinal = usize::try_from(number(n, "ordinal after cuda:")?)
                .map_err(|_| ServerError::Config(format!("device {s:?}: ordinal out of range")))?;
            return Ok(Self::Cuda { ordinal });
        }
        if let Some(m) = s.strip_prefix("emulated:") {
            return Ok(Self::Emulated { memory: number(m, "memory after emulated:")? });
        }
        Err(ServerError::Config(format!("unknown device {s:?}: use auto, cuda:N or emulated")))
    }
}

/// The form [`FromStr`](std::str::FromStr) reads back to the same value.
impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
            Self::Emulated { memory } => write!(f, "emulated:{memory}"),
        }
    }
}

/// How a worker process is started: `program args…`, speaking the worker
/// protocol on stdin/stdout (see `crate::worker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// Where sessions run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Every session in the server process, sharing one device context. A
    /// kernel of one session can reach another session's memory on a GPU;
    /// only for trusted single-tenant use, tests and benchmarks of the
    /// session machinery.
    InProcess,
    /// Every session in its own worker process with its own device context:
    /// kernels of one tenant cannot touch another's memory, and a fault
    /// (illegal address, sticky error, crash) ends only that session.
    Process {
        command: WorkerCommand,
        /// Workers started ahead, device open, so that a new session does
        /// not wait for context creation.
        warm: usize,
        /// Longest wait for a worker to start (device open, endpoint bound).
        start_timeout: Duration,
    },
}

/// Registration with a balancer: the server announces its instances, sends
/// heartbeats, and accepts sessions with the balancer's signed leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerLink {
    /// The balancer's gRPC URL, e.g. `https://10.0.0.5:50051`.
    pub url: String,
    /// How the balancer's certificate is verified (pin or CA), or the
    /// plaintext opt-in with an `http://` URL.
    pub trust: gpupool_proto::grpc_tls::BalancerTrust,
    /// Client certificate presented to the balancer, for a balancer that
    /// requires one from servers (`--server-client-ca`).
    pub client_identity: Option<TlsSource>,
    /// Stable name of this server in the pool.
    pub server_id: String,
    /// `host:port` clients reach this server's QUIC endpoint at.
    pub advertise: String,
    /// Secret the balancer expects from servers.
    pub secret: String,
    /// The balancer's lease-signing public key (64 hex digits).
    pub lease_key: String,
}

impl BalancerLink {
    /// A gRPC endpoint to the balancer, verifying it as configured.
    pub fn endpoint(&self) -> Result<tonic::transport::Endpoint, gpupool_proto::tls::TlsError> {
        let identity = self.client_identity.as_ref().map(gpupool_proto::tls::Identity::load).transpose()?;
        gpupool_proto::grpc_tls::endpoint(&self.url, &self.trust, identity.as_ref())
    }
}

/// Everything a gpu-server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// UDP address of the QUIC endpoint (port 0 picks one).
    pub listen: SocketAddr,
    pub device: DeviceChoice,
    pub tls: TlsSource,
    /// Accepted session tokens (shared secrets).
    pub tokens: Vec<String>,
    /// Most sessions at once; more are refused with `BUSY`.
    pub max_sessions: usize,
    /// Device memory quota of each session (the virtual GPU's memory).
    pub memory_quota: u64,
    /// Largest copy carried inline in a batch.
    pub max_inline_bytes: u32,
    /// Largest frame accepted.
    pub max_frame_bytes: u32,
    /// Host memory one session may hold in staged transfers.
    pub max_staging_bytes: u64,
    /// Host memory all sessions of the host may hold in staged transfers
    /// together, whichever process serves them (`staging::host`).
    pub staging_host_bytes: u64,
    /// How long a chunk waits for room under `staging_host_bytes` before its
    /// copy fails with out-of-memory.
    pub staging_wait: Duration,
    /// Most streams, events and modules (each) per session.
    pub max_handles: usize,
    /// Most bulk streams served at once per session.
    pub max_bulk_streams: usize,
    /// Extra QUIC endpoints (UDP sockets) for bulk transfers, each driven on
    /// a bulk I/O thread of its own; a session's client opens one connection
    /// to each, so several cores carry its copies. 0: bulk transfers use the
    /// session's connection only. Bound on port 0, or in `worker_ports`.
    pub bulk_endpoints: usize,
    /// Batches queued per session before the server stops reading.
    pub batch_queue: usize,
    /// Bytes of decoded batches a session may hold until they ran, each
    /// batch counted as it is held in memory (its encoding and its calls'
    /// in-memory size); past it the server stops reading the session's
    /// commands, and a batch larger than this alone is refused.
    /// `batch_queue` alone bounded nothing: an empty call is a few bytes on
    /// the wire and over 200 decoded, and 64 MiB of them behind a busy
    /// kernel took 3.7 GB (issue 20, finding 3).
    pub max_queued_batch_bytes: u64,
    /// Where module images are kept on disk (none: memory only).
    pub image_cache_dir: Option<PathBuf>,
    /// Bytes of module images kept in memory.
    pub image_cache_bytes: u64,
    /// Bytes of module images kept in `image_cache_dir`; the least recently
    /// used go first beyond it.
    pub image_cache_disk_bytes: u64,
    /// Bytes of module images a worker process loads into its context
    /// while it waits for its session: the most recently used of
    /// `image_cache_dir` (0: none). The next program to use the same
    /// libraries finds them loaded (issue 17, "fast first call").
    pub image_preload_bytes: u64,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// Largest UDP payload sent or accepted; MTU discovery probes up to it
    /// (loopback and jumbo-frame paths carry far more than 1452 bytes).
    pub max_udp_payload: u16,
    /// Time a new connection has to present its `Hello`.
    pub handshake_timeout: Duration,
    /// Connections accepted and not yet authenticated, at most: each may
    /// make the server buffer up to its pre-authentication receive window
    /// (1 MiB), so this bounds what unauthenticated peers can make it hold
    /// (issue 20, finding 1). Later ones wait, unaccepted, in the QUIC
    /// endpoint's bounded queue of incoming connections.
    pub max_pending_handshakes: usize,
    /// Time sessions get to end after a shutdown signal.
    pub shutdown_grace: Duration,
    /// lz4-compress replies when it pays.
    pub compression: bool,
    /// Sessions in this process or each in a worker process.
    pub isolation: Isolation,
    /// Serve one session, then return from `run` (a worker process).
    pub one_session: bool,
    /// The GPUs and instances served, each instance by its own worker
    /// processes (see [`crate::mig`]). Empty: one device as `device` says.
    pub gpus: Vec<crate::mig::ServedGpu>,
    /// Join a balancer's pool.
    pub balancer: Option<BalancerLink>,
    /// How long a session whose connection was lost (idle timeout: a
    /// frozen Lambda environment, a network outage) keeps its state for the
    /// client to reattach (zero: it ends at once).
    pub resume_grace: Duration,
    /// How long a session's thread polls for its next batch before it
    /// sleeps: a sleeping thread woken by the I/O thread costs tens of
    /// microseconds on an idle (virtual) CPU (zero: it sleeps at once).
    /// Default: [`gpupool_proto::quic::default_spin`].
    pub session_spin: Duration,
    /// How long a session's command reader (batches from a command ring)
    /// and reply writer look for their next frame before they sleep, after
    /// each one: with the client, the ring's thread and the session thread
    /// spinning too, a launch-and-synchronize loop then needs no wake-up
    /// through the kernel. It spends up to that much of a runtime thread
    /// after each frame (zero: they sleep at once). Default:
    /// [`gpupool_proto::quic::default_spin`], as the session's.
    pub io_spin: Duration,
    /// UDP ports worker processes bind, inclusive (none: ephemeral ports),
    /// so that a firewall can allow exactly them.
    pub worker_ports: Option<(u16, u16)>,
    /// Swap idle sessions out to host memory when the device memory is
    /// full (none: off).
    pub swap: Option<Swap>,
    /// With `swap`: disk for swapped contents once the host memory for them
    /// is full (none: host memory only).
    pub swap_disk: Option<crate::swap::SwapDisk>,
    /// With `swap`: bytes of swap buffers each process serving sessions
    /// (this one, or each worker process) keeps after a swap-in for the next
    /// swap-out, already faulted in (0: none). Host memory beyond the host
    /// bound of swapped contents, for faster swap-outs (docs/swap.md).
    pub swap_spare_bytes: u64,
    /// Where the process serving sessions (this one, or each worker
    /// process) binds its unix socket for clients on this host to attach a
    /// shared-memory region to their session (none: no shared memory; the
    /// default is the system's temporary directory). A client in a
    /// container needs this directory mounted to use it.
    pub shm_dir: Option<PathBuf>,
    /// RDMA for sessions of clients with a device (`docs/rdma.md`).
    pub rdma: RdmaSettings,
    /// Whether workers of shared leases run as clients of this server's
    /// MPS daemon (`docs/sharing.md`).
    pub mps: MpsSettings,
    /// The NVML (or simulated) control the served instances came from
    /// (`--instances nvml|simulated:…`); with it, a balancer with dynamic
    /// MIG layouts may have an idle MIG GPU laid out anew. `None`: layouts
    /// stay as they are.
    pub mig_control: Option<std::sync::Arc<dyn crate::mig::MigControl>>,
    /// Memory a session migrating here may receive while it still runs at
    /// its source (pre-copy), in bytes: written into its mappings as it
    /// arrives (held in host memory only for a source that announces no
    /// mappings, the previous version). 0: none is accepted; the source
    /// then sends everything once it stopped.
    pub migrate_precopy_bytes: u64,
    /// Modules of at most this many functions are described whole at load;
    /// larger ones describe each function when first used (reading a
    /// function's attributes loads it): [`crate::device::EAGER_DESCRIBE_MAX`].
    pub eager_describe_max: usize,
    /// What NVML says of this host (kernel driver version, each GPU's PCIe
    /// link), as a supervisor read it for its workers; `None`: the device
    /// reads them when it opens (`device/cuda/host_facts.rs`).
    pub host_facts: Option<gpupool_proto::v1::HostFacts>,
}

/// Whether the server listens for RDMA connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RdmaMode {
    /// Never: every session stays on QUIC.
    Off,
    /// When a device is found (sessions in this process only).
    #[default]
    Auto,
    /// Always: no device, or a listener that cannot bind, is an error.
    On,
}

impl std::str::FromStr for RdmaMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        off_auto_on(s, "RDMA", [Self::Off, Self::Auto, Self::On])
    }
}

/// `off`, `auto` or `on` as one of `modes` (in that order).
fn off_auto_on<T: Copy>(s: &str, what: &str, modes: [T; 3]) -> Result<T, String> {
    match s {
        "off" => Ok(modes[0]),
        "auto" => Ok(modes[1]),
        "on" => Ok(modes[2]),
        other => Err(format!("unknown {what} mode {other:?} (off, auto or on)")),
    }
}

/// Settings of the server's RDMA listener.
#[derive(Debug, Clone, Default)]
pub struct RdmaSettings {
    pub mode: RdmaMode,
    /// rdma_cm port on the listen address's IP (0: any free one).
    pub port: u16,
    /// The device to use; `None`: the first verbs device (feature
    /// `rdma-verbs`). Tests put an in-memory fabric here.
    pub provider: Option<std::sync::Arc<dyn gpupool_rdma::Provider>>,
    /// How long the peer may stay silent on an RDMA connection before it is
    /// lost (the core's idle timeout; keepalives go every quarter of it).
    pub idle_timeout: Option<Duration>,
}

/// When sessions of shared leases run under the server's MPS daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MpsMode {
    /// Never: shared sessions run as ordinary, time-sliced workers.
    Off,
    /// On whole GPUs of the CUDA backend when the control program is found
    /// (on the emulated device MPS would change nothing).
    #[default]
    Auto,
    /// On every whole-GPU instance, the emulated device too (tests, with a
    /// stand-in control program); a daemon that cannot start is an error.
    On,
}

impl std::str::FromStr for MpsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        off_auto_on(s, "MPS", [Self::Off, Self::Auto, Self::On])
    }
}

/// Settings of the server's MPS daemon (see [`crate::mps`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpsSettings {
    pub mode: MpsMode,
    /// The control program: a name looked up on PATH, or a path.
    pub control: PathBuf,
    /// Where the daemons' private pipe and log directories go (none: a
    /// directory of this process under the system's temporary directory).
    pub dir: Option<PathBuf>,
    /// The temporal share's period: shared sessions on a whole GPU are
    /// metered, and one past its share of a period waits for the next while
    /// another within its share wants the GPU (`crate::share`; none: off).
    pub time_share: Option<std::time::Duration>,
}

impl Default for MpsSettings {
    fn default() -> Self {
        Self { mode: MpsMode::Auto, control: crate::mps::CONTROL.into(), dir: None, time_share: None }
    }
}

/// Settings of swapping (see [`crate::swap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swap {
    /// Device memory all sessions may hold resident, in bytes (none: the
    /// device's total memory).
    pub device_bytes: Option<u64>,
    /// Host memory swapped-out contents may take, in bytes.
    pub host_bytes: u64,
    /// How long an allocation waits for idle sessions to swap out.
    pub wait: Duration,
}

impl ServerConfig {
    /// The system's temporary directory, or `/tmp` where that is not an
    /// absolute path short enough for a unix socket's.
    pub fn default_shm_dir() -> PathBuf {
        let dir = std::env::temp_dir();
        if dir.is_absolute() && dir.as_os_str().len() <= 64 { dir } else { PathBuf::from("/tmp") }
    }

    /// Defaults for a server on `listen` accepting `tokens`.
    pub fn new(listen: SocketAddr, tokens: Vec<String>) -> Self {
        Self {
            listen,
            device: DeviceChoice::Auto,
            tls: TlsSource::SelfSigned { names: vec!["localhost".into(), "127.0.0.1".into()] },
            tokens,
            max_sessions: 64,
            memory_quota: 4 << 30,
            max_inline_bytes: 512 << 10,
            max_frame_bytes: (16 << 20) + (64 << 10),
            max_staging_bytes: 3 << 30,
            staging_host_bytes: Self::DEFAULT_STAGING_HOST_BYTES,
            staging_wait: Duration::from_secs(2),
            max_handles: 65_536,
            max_bulk_streams: 64,
            bulk_endpoints: Self::DEFAULT_BULK_ENDPOINTS,
            batch_queue: 64,
            max_queued_batch_bytes: Self::DEFAULT_MAX_QUEUED_BATCH_BYTES,
            image_cache_dir: None,
            image_cache_bytes: 1 << 30,
            image_cache_disk_bytes: 8 << 30,
            image_preload_bytes: Self::DEFAULT_IMAGE_PRELOAD_BYTES,
            idle_timeout: Duration::from_secs(30),
            max_udp_payload: gpupool_proto::quic::LOOPBACK_UDP_PAYLOAD,
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 1024,
            shutdown_grace: Duration::from_secs(5),
            compression: true,
            isolation: Isolation::InProcess,
            one_session: false,
            gpus: Vec::new(),
            balancer: None,
            resume_grace: Duration::from_secs(30),
            shm_dir: Some(Self::default_shm_dir()),
            rdma: RdmaSettings::default(),
            session_spin: gpupool_proto::quic::default_spin(),
            io_spin: gpupool_proto::quic::default_spin(),
            worker_ports: None,
            swap: None,
            swap_disk: None,
            swap_spare_bytes: 0,
            mps: MpsSettings::default(),
            mig_control: None,
            migrate_precopy_bytes: 4 << 30,
            eager_describe_max: crate::device::EAGER_DESCRIBE_MAX,
            host_facts: None,
        }
    }

    /// Bulk endpoints by default: a session's copies on four cores (one
    /// connection was bounded by one core at 0.4–0.7 GiB/s; the target is
    /// 3 GiB/s), without taking every core of a host that serves others.
    pub const DEFAULT_BULK_ENDPOINTS: usize = 4;

    /// Module images a waiting worker loads by default: the libraries a
    /// PyTorch process uses for its first operations (cuBLAS, cuDNN and
    /// PyTorch's own kernels, cut to the device's code) fit in it.
    pub const DEFAULT_IMAGE_PRELOAD_BYTES: u64 = 256 << 20;

    /// Decoded batches a session may hold by default: 16 of the largest a
    /// client sends (65 536 calls, ~15 MB decoded); a client with more in
    /// flight waits in flow control.
    pub const DEFAULT_MAX_QUEUED_BATCH_BYTES: u64 = 256 << 20;

    /// Most bulk endpoints.
    pub const MAX_BULK_ENDPOINTS: usize = 16;

    /// Staged bytes of all sessions of a host together by default (the
    /// binary derives its default from the host's memory instead): a few
    /// sessions' full 3 GiB each, not 64 of them.
    pub const DEFAULT_STAGING_HOST_BYTES: u64 = 8 << 30;

    /// Checks every setting and reports all problems together.
    pub fn validate(&self) -> Result<(), ServerError> {
        let mut bad = Vec::new();
        let instances = self.gpus.iter().flat_map(|g| &g.instances).count();
        if !self.gpus.is_empty() && !matches!(self.isolation, Isolation::Process { .. }) {
            bad.push("serving instances needs process isolation (one worker per instance)".into());
        }
        if !self.gpus.is_empty() && instances == 0 {
            bad.push("the GPUs listed have no instance to serve".into());
        }
        if let Some(link) = &self.balancer {
            if instances == 0 {
                bad.push("joining a balancer needs the instances to serve".into());
            }
            if link.server_id.is_empty() || link.advertise.is_empty() || link.url.is_empty() {
                bad.push("the balancer link needs a URL, a server id and an advertised address".into());
            }
            if link.secret.is_empty() {
                bad.push("the balancer's server secret must not be empty".into());
            }
            if let Err(e) = gpupool_proto::lease::LeaseVerifier::from_hex(&link.lease_key) {
                bad.push(format!("the balancer's lease key: {e}"));
            }
        }
        if self.tokens.iter().any(String::is_empty) {
            bad.push("session tokens must not be empty".to_string());
        }
        if self.max_udp_payload < 1200 {
            bad.push("max_udp_payload must be at least 1200 (QUIC's minimum)".into());
        }
        if let Isolation::Process { command, start_timeout, .. } = &self.isolation {
            if command.program.as_os_str().is_empty() {
                bad.push("the worker command needs a program".into());
            }
            if start_timeout.is_zero() {
                bad.push("the worker start timeout must be positive".into());
            }
        }
        if self.max_sessions == 0 {
            bad.push("max_sessions must be at least 1".into());
        }
        if self.staging_host_bytes == 0 {
            bad.push("staging_host_bytes must be positive".into());
        }
        if self.memory_quota == 0 {
            bad.push("memory_quota must be positive".into());
        }
        if self.max_inline_bytes == 0 || self.max_inline_bytes > self.max_frame_bytes / 2 {
            bad.push("max_inline_bytes must be positive and at most half of max_frame_bytes".into());
        }
        if self.max_frame_bytes < (1 << 20) {
            bad.push("max_frame_bytes must be at least 1 MiB".into());
        }
        if self.bulk_endpoints > Self::MAX_BULK_ENDPOINTS {
            bad.push(format!("bulk_endpoints must be at most {}", Self::MAX_BULK_ENDPOINTS));
        }
        if self.batch_queue == 0 || self.max_bulk_streams == 0 || self.max_handles == 0 {
            bad.push("batch_queue, max_bulk_streams and max_handles must be positive".into());
        }
        if self.idle_timeout.is_zero() || self.handshake_timeout.is_zero() {
            bad.push("timeouts must be positive".into());
        }
        if self.max_pending_handshakes == 0 {
            bad.push("max_pending_handshakes must be positive".into());
        }
        let most_queued = tokio::sync::Semaphore::MAX_PERMITS as u64;
        if self.max_queued_batch_bytes == 0 || self.max_queued_batch_bytes > most_queued {
            bad.push(format!("max_queued_batch_bytes must be positive and at most {most_queued}"));
        }
        if let Some((low, high)) = self.worker_ports
            && (low == 0 || low > high)
        {
            bad.push(format!("worker ports {low}-{high}: the range must be non-empty and not start at 0"));
        }
        // A unix socket path holds at most 107 bytes; the file name takes 40.
        if let Some(dir) = &self.shm_dir
            && (dir.as_os_str().len() > 64 || !dir.is_absolute())
        {
            bad.push(format!("shm_dir {} must be an absolute path of at most 64 bytes", dir.display()));
        }
        if let Some(swap) = &self.swap {
            if swap.host_bytes == 0 || swap.device_bytes == Some(0) {
                bad.push("swap needs some host memory and some device memory".into());
            }
            if swap.wait.is_zero() {
                bad.push("the swap wait must be positive".into());
            }
        }
        if let Some(disk) = &self.swap_disk {
            if self.swap.is_none() {
                bad.push("swap disk needs swapping on (some host memory for it)".into());
            }
            if disk.bytes == 0 || !disk.dir.is_absolute() {
                bad.push(format!("swap disk needs some bytes and an absolute directory, not {}", disk.dir.display()));
            }
        }
        if let DeviceChoice::Emulated { memory: 0 } = self.device {
            bad.push("the emulated device needs some memory".into());
        }
        if bad.is_empty() { Ok(()) } else { Err(ServerError::Config(bad.join("; "))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn swap_settings_are_checked() {
        let mut c = ServerConfig::new(([127, 0, 0, 1], 0).into(), vec!["t".into()]);
        c.swap = Some(Swap { device_bytes: None, host_bytes: 1 << 30, wait: Duration::from_secs(1) });
        assert!(c.validate().is_ok());
        c.swap = Some(Swap { device_bytes: Some(0), host_bytes: 0, wait: Duration::ZERO });
        let e = c.validate().expect_err("bad swap").to_string();
        assert!(e.contains("host memory") && e.contains("wait"), "{e}");
        c.swap = Some(Swap { device_bytes: None, host_bytes: 1 << 30, wait: Duration::from_secs(1) });
        c.isolation = Isolation::Process {
            command: WorkerCommand { program: "w".into(), args: Vec::new() },
            warm: 0,
            start_timeout: Duration::from_secs(1),
        };
        assert!(c.validate().is_ok(), "swapping works across worker processes too");
    }

    #[test]
    fn device_strings() {
        let parse = |s: &str| s.parse::<DeviceChoice>();
        assert_eq!(parse("auto").ok(), Some(DeviceChoice::Auto));
        assert_eq!(parse("cuda:3").ok(), Some(DeviceChoice::Cuda { ordinal: 3 }));
        assert_eq!(parse("emulated").ok(), Some(DeviceChoice::Emulated { memory: 16 << 30 }));
        assert_eq!(parse("emulated:1048576").ok(), Some(DeviceChoice::Emulated { memory: 1 << 20 }));
        for bad in ["", "gpu", "cuda", "cuda:", "cuda:x", "cuda:-1", "emulated:", "emulated:1g", "Auto", " auto"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        let msg = parse("gpu").expect_err("unknown").to_string();
        assert!(msg.contains("use auto, cuda:N or emulated"), "{msg}");
        assert!(parse("cuda:x").expect_err("bad ordinal").to_string().contains("ordinal after cuda:"));
        assert_eq!(DeviceChoice::Cuda { ordinal: 0 }.to_string(), "cuda:0");
        assert_eq!(DeviceChoice::Emulated { memory: 5 }.to_string(), "emulated:5");
    }

    fn device() -> impl Strategy<Value = DeviceChoice> {
        prop_oneof![
            Just(DeviceChoice::Auto),
            (0usize..1 << 20).prop_map(|ordinal| DeviceChoice::Cuda { ordinal }),
            any::<u64>().prop_map(|memory| DeviceChoice::Emulated { memory }),
        ]
    }

    proptest! {
        #[test]
        fn device_strings_round_trip(d in device()) {
            prop_assert_eq!(d.to_string().parse::<DeviceChoice>().ok(), Some(d));
        }
    }

    #[test]
    fn reports_every_problem() {
        let mut c = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), vec![String::new()]);
        c.max_sessions = 0;
        c.max_udp_payload = 1000;
        c.isolation = Isolation::Process {
            command: WorkerCommand { program: PathBuf::new(), args: vec![] },
            warm: 1,
            start_timeout: Duration::ZERO,
        };
        c.max_queued_batch_bytes = 0;
        let msg = c.validate().expect_err("invalid").to_string();
        let parts = ["token", "max_sessions", "max_udp_payload", "worker command", "start timeout", "max_queued_batch"];
        for part in parts {
            assert!(msg.contains(part), "{part} missing from: {msg}");
        }
    }
}
