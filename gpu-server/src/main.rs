//! `gpupool-server`: parses flags and environment, then runs the server
//! until SIGINT or SIGTERM. `gpupool-server worker` is a session worker
//! process, started by the server itself (never by hand).

use anyhow::Context;
use clap::Parser;
use gpupool_server::tls::TlsSource;
use gpupool_server::{BalancerLink, Isolation, Server, ServerConfig, WorkerCommand, mig};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(version, about = "gpupool GPU server: serves CUDA calls from remote clients over QUIC")]
struct Args {
    /// UDP address to listen on.
    #[arg(long, env = "GPUPOOL_LISTEN", default_value = "0.0.0.0:4433")]
    listen: SocketAddr,
    /// Device: `auto` (GPU 0 if present, else emulated), `cuda:N`, or `emulated`.
    #[arg(long, env = "GPUPOOL_DEVICE", default_value = "auto")]
    device: String,
    /// Session tokens accepted, comma-separated (besides the balancer's
    /// leases; required without a balancer).
    #[arg(long, env = "GPUPOOL_TOKENS", value_delimiter = ',', required_unless_present = "balancer")]
    tokens: Vec<String>,
    /// What to serve: `device` (the one device of `--device`), `nvml` (every
    /// GPU NVML lists: whole GPUs, or their MIG instances where MIG is on), or
    /// `simulated:SPEC` (a simulated NVML topology, e.g.
    /// `simulated:h100-80gb:mig,a100-80gb`, on the emulated device).
    #[arg(long, env = "GPUPOOL_INSTANCES", default_value = "device")]
    instances: String,
    /// MIG layout to bring every MIG-enabled GPU to at start, profile names
    /// separated by commas (e.g. `3g.40gb,2g.20gb,1g.10gb,1g.10gb`).
    #[arg(long, env = "GPUPOOL_MIG_LAYOUT", value_delimiter = ',')]
    mig_layout: Option<Vec<String>>,
    /// Join the pool of the balancer at this URL (e.g. `https://10.0.0.5:50051`).
    #[arg(long, env = "GPUPOOL_BALANCER", requires_all = ["advertise", "balancer_secret", "lease_key"])]
    balancer: Option<String>,
    /// This server's name in the pool (default: the host name).
    #[arg(long, env = "GPUPOOL_SERVER_ID")]
    server_id: Option<String>,
    /// `host:port` clients reach this server at (given to them in leases).
    #[arg(long, env = "GPUPOOL_ADVERTISE")]
    advertise: Option<String>,
    /// Secret the balancer expects from servers.
    #[arg(long, env = "GPUPOOL_SERVER_SECRET")]
    balancer_secret: Option<String>,
    /// The balancer's lease-signing public key (`gpupool-balancer keygen`).
    #[arg(long, env = "GPUPOOL_LEASE_KEY")]
    lease_key: Option<String>,
    /// Hex SHA-256 of the balancer's gRPC certificate (what it logs at start).
    #[arg(long, env = "GPUPOOL_BALANCER_CERT_SHA256")]
    balancer_cert_sha256: Option<String>,
    /// Or: a PEM CA bundle to verify the balancer's certificate against.
    #[arg(long, env = "GPUPOOL_BALANCER_CA_FILE")]
    balancer_ca_file: Option<PathBuf>,
    /// Name in the balancer's certificate with `--balancer-ca-file`
    /// (default: the URL's host).
    #[arg(long, env = "GPUPOOL_BALANCER_SERVER_NAME")]
    balancer_server_name: Option<String>,
    /// Talk to a balancer run with `--insecure`, in plaintext (`http://`).
    #[arg(long, env = "GPUPOOL_BALANCER_INSECURE")]
    balancer_insecure: bool,
    /// PEM client certificate for a balancer that requires one from servers.
    #[arg(long, env = "GPUPOOL_BALANCER_CLIENT_CERT", requires = "balancer_client_key")]
    balancer_client_cert: Option<PathBuf>,
    /// PEM private key of `--balancer-client-cert`.
    #[arg(long, env = "GPUPOOL_BALANCER_CLIENT_KEY", requires = "balancer_client_cert")]
    balancer_client_key: Option<PathBuf>,
    /// PEM certificate chain (a self-signed one is generated when absent).
    #[arg(long, env = "GPUPOOL_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of the certificate.
    #[arg(long, env = "GPUPOOL_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Device memory quota of each session, in MiB.
    #[arg(long, env = "GPUPOOL_SESSION_MEMORY_MIB", default_value_t = 4096)]
    session_memory_mib: u64,
    /// Most sessions at once.
    #[arg(long, env = "GPUPOOL_MAX_SESSIONS", default_value_t = 64)]
    max_sessions: usize,
    /// Directory for the module image cache.
    #[arg(long, env = "GPUPOOL_IMAGE_CACHE")]
    image_cache: Option<PathBuf>,
    /// Most MiB of module images kept in `--image-cache`; the least
    /// recently used are deleted beyond it.
    #[arg(long, env = "GPUPOOL_IMAGE_CACHE_DISK_MIB", default_value_t = 8192)]
    image_cache_disk_mib: u64,
    /// MiB of module images a waiting worker process loads into its context
    /// before its session comes: the most recently used of the image
    /// directory (a private one when `--image-cache` is not given). 0: none.
    #[arg(long, env = "GPUPOOL_IMAGE_PRELOAD_MIB", default_value_t = ServerConfig::DEFAULT_IMAGE_PRELOAD_BYTES >> 20)]
    image_preload_mib: u64,
    /// `process`: each session in its own worker process and device context
    /// (tenants cannot reach each other's memory; a fault ends one session);
    /// `in-process`: all sessions share this process's context (trusted,
    /// single-tenant use only).
    #[arg(long, env = "GPUPOOL_ISOLATION", default_value = "process", value_parser = ["process", "in-process"])]
    isolation: String,
    /// Worker processes kept started ahead of sessions (`process` isolation).
    #[arg(long, env = "GPUPOOL_WARM_WORKERS", default_value_t = 2)]
    warm_workers: usize,
    /// How long a session whose connection was lost (a frozen Lambda
    /// environment, a network outage) keeps its state for the client to
    /// reattach, in milliseconds (0: it ends at once).
    #[arg(long, env = "GPUPOOL_RESUME_GRACE_MS", default_value_t = 30_000)]
    resume_grace_ms: u64,
    /// How long a session's thread polls for its next batch before it
    /// sleeps, in microseconds (0: sleep at once; spinning spends up to that
    /// much of a core after each batch to take the next one sooner).
    /// Default: 100 on hosts with 4 CPUs or more, else 0.
    #[arg(long, env = "GPUPOOL_SESSION_SPIN_US")]
    session_spin_us: Option<u64>,
    /// How long a session's command reader and reply writer look for their
    /// next frame before they sleep, in microseconds (0: at once). On a host
    /// with cores to spare, with the client's and the session's own spin,
    /// this takes the last wake-ups off a synchronizing call's round trip
    /// (H100 host: 28.2 -> 17.9 µs through the command ring). Default: 100
    /// on hosts with 4 CPUs or more, else 0.
    #[arg(long, env = "GPUPOOL_SERVER_IO_SPIN_US", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    io_spin_us: Option<u64>,
    /// Extra QUIC endpoints for bulk copies, each on a thread of its own; a
    /// client spreads a session's copies over one connection to each (0:
    /// copies use the session's connection). On ephemeral ports, or in
    /// `--worker-ports` when set.
    #[arg(long, env = "GPUPOOL_BULK_ENDPOINTS", default_value_t = ServerConfig::DEFAULT_BULK_ENDPOINTS)]
    bulk_endpoints: usize,
    /// Directory of the unix socket through which clients on this host
    /// attach a shared-memory region to their session (copies then go
    /// through memory, not QUIC); `off` for none. Default: the system's
    /// temporary directory. Clients in containers need it mounted.
    #[arg(long, env = "GPUPOOL_SHM_DIR")]
    shm_dir: Option<String>,
    /// RDMA for the commands and copies of clients with a device
    /// (docs/rdma.md): `auto` when a device is found, `on` (an error
    /// without one), `off`. Sessions in worker processes stay on QUIC.
    #[arg(long, env = "GPUPOOL_RDMA", default_value = "auto")]
    rdma: String,
    /// rdma_cm port of the RDMA listener, on the listen address's IP (0:
    /// any free one; clients learn it in the handshake).
    #[arg(long, env = "GPUPOOL_RDMA_PORT", default_value_t = 0)]
    rdma_port: u16,
    /// A connection silent this long is lost, in milliseconds (clients send
    /// keep-alives every 2 s).
    #[arg(long, env = "GPUPOOL_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    idle_timeout_ms: u64,
    /// Connections accepted and not yet authenticated, at most (each may
    /// hold a 1 MiB receive window); later ones wait to be accepted.
    #[arg(long, env = "GPUPOOL_MAX_PENDING_HANDSHAKES", default_value_t = 1024)]
    max_pending_handshakes: usize,
    /// Decoded batches a session may hold until they ran, in MiB, each
    /// counted as it is held in memory (over 200 bytes a call, however
    /// small on the wire): past it the server stops reading the session's
    /// commands, and a larger batch alone is refused.
    #[arg(long, env = "GPUPOOL_MAX_QUEUED_BATCH_MIB", default_value_t = ServerConfig::DEFAULT_MAX_QUEUED_BATCH_BYTES >> 20)]
    max_queued_batch_mib: u64,
    /// UDP ports for session worker processes, `LOW-HIGH` (default:
    /// ephemeral ports), so that a firewall can allow exactly them. Each
    /// worker takes one for its endpoint and one for each bulk endpoint
    /// (`--bulk-endpoints`).
    #[arg(long, env = "GPUPOOL_WORKER_PORTS", value_parser = parse_port_range)]
    worker_ports: Option<(u16, u16)>,
    /// Largest UDP payload; MTU discovery probes up to it (and up to what
    /// the client accepts).
    #[arg(long, env = "GPUPOOL_MAX_UDP_PAYLOAD", default_value_t = gpupool_proto::quic::LOOPBACK_UDP_PAYLOAD)]
    max_udp_payload: u16,
    /// Host memory all sessions of this host may hold in staged bulk
    /// copies together, in MiB, whether they run in worker processes or
    /// in this one (default: a quarter of the host's memory).
    #[arg(long, env = "GPUPOOL_STAGING_HOST_MIB")]
    staging_host_mib: Option<u64>,
    /// How long a bulk chunk waits for room under `--staging-host-mib`
    /// before its copy fails with out-of-memory, in milliseconds.
    #[arg(long, env = "GPUPOOL_STAGING_WAIT_MS", default_value_t = 2_000)]
    staging_wait_ms: u64,
    /// Host memory for the contents of idle sessions swapped out when the
    /// device memory is full, in MiB (0: no swapping).
    #[arg(long, env = "GPUPOOL_SWAP_HOST_MIB", default_value_t = 0)]
    swap_host_mib: u64,
    /// Device memory all sessions may hold resident when swapping, in MiB
    /// (default: the device's total memory).
    #[arg(long, env = "GPUPOOL_SWAP_DEVICE_MIB")]
    swap_device_mib: Option<u64>,
    /// How long an allocation waits for idle sessions to swap out before it
    /// fails with out-of-memory, in milliseconds.
    #[arg(long, env = "GPUPOOL_SWAP_WAIT_MS", default_value_t = 10_000)]
    swap_wait_ms: u64,
    /// Disk for swapped contents once `--swap-host-mib` is full, in MiB
    /// (0: none), in files under `--swap-dir`.
    #[arg(long, env = "GPUPOOL_SWAP_DISK_MIB", default_value_t = 0)]
    swap_disk_mib: u64,
    /// Swap buffers each process serving sessions (each worker) keeps after
    /// a swap-in for its next swap-out, faulted in already, in MiB (0: none).
    /// Host memory on top of `--swap-host-mib`; swap-outs into them run at
    /// copy speed instead of the kernel's page-fault rate.
    #[arg(long, env = "GPUPOOL_SWAP_SPARE_MIB", default_value_t = 0)]
    swap_spare_mib: u64,
    /// Directory of the swap files (unlinked as soon as they are made);
    /// default: the system's temporary directory.
    #[arg(long, env = "GPUPOOL_SWAP_DIR")]
    swap_dir: Option<std::path::PathBuf>,
    /// Workers of shared leases on a whole GPU run as clients of this
    /// server's own MPS daemon, with their lease's share of the SMs
    /// (`docs/sharing.md`): `auto` on CUDA GPUs when the control program is
    /// found, `off` never (shared sessions are then time-sliced), `on` on
    /// every whole-GPU instance, the emulated device too (tests).
    #[arg(long, env = "GPUPOOL_MPS", default_value = "auto", value_parser = ["off", "auto", "on"])]
    mps: String,
    /// The MPS control program (a name on PATH, or a path).
    #[arg(long, env = "GPUPOOL_MPS_CONTROL", default_value = gpupool_server::mps::CONTROL)]
    mps_control: PathBuf,
    /// Where the MPS daemons' private pipe and log directories go (default:
    /// a directory of this process under the system's temporary directory).
    #[arg(long, env = "GPUPOOL_MPS_DIR")]
    mps_dir: Option<PathBuf>,
    /// The temporal share's period in milliseconds (0: off): each shared
    /// session on a whole GPU gets its lease's percentage of every period
    /// of GPU busy time while others want the GPU too (`docs/sharing.md`).
    #[arg(long, env = "GPUPOOL_TIME_SHARE_MS", default_value_t = 0)]
    time_share_ms: u64,
    /// TCP address of a Prometheus endpoint (`GET /metrics`); off when unset.
    #[arg(long, env = "GPUPOOL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Memory (MiB) a session migrating here may receive while its source
    /// still runs (pre-copy: written into its mappings as it arrives, so
    /// the pause covers only what changed since; held in host memory only
    /// for a source of the previous version); 0: no pre-copy into this server.
    #[arg(long, env = "GPUPOOL_MIGRATE_PRECOPY_MIB", default_value_t = 4096)]
    migrate_precopy_mib: u64,
    /// Modules of at most this many functions are described whole when
    /// loaded; others describe each function when a client first needs it,
    /// so only the kernels a program uses are loaded (default 0: all).
    #[arg(long, env = "GPUPOOL_DESCRIBE_EAGERLY_MAX", default_value_t = gpupool_server::device::EAGER_DESCRIBE_MAX)]
    describe_eagerly_max: usize,
}

/// A quarter of the host's memory (`MemTotal` of `/proc/meminfo`), or the
/// library's default where that cannot be read.
fn default_staging_host_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    match kib {
        Some(kib) if kib > 0 => kib.saturating_mul(1024) / 4,
        _ => ServerConfig::DEFAULT_STAGING_HOST_BYTES,
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (low, high) = s.split_once('-').ok_or_else(|| format!("{s:?} is not LOW-HIGH"))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|_| format!("{p:?} is not a UDP port"));
    let (low, high) = (port(low)?, port(high)?);
    if low == 0 || low > high {
        return Err(format!("{s:?}: need 1 <= LOW <= HIGH"));
    }
    Ok((low, high))
}

/// The GPUs and instances `--instances` names, and the control they came
/// from (none for `device`).
type Served = (Vec<mig::ServedGpu>, Option<std::sync::Arc<dyn mig::MigControl>>);

fn served_gpus(instances: &str, layout: Option<&[String]>) -> anyhow::Result<Served> {
    let ctl: std::sync::Arc<dyn mig::MigControl> = match instances {
        "device" => {
            anyhow::ensure!(layout.is_none(), "--mig-layout needs --instances nvml or simulated:SPEC");
            return Ok((Vec::new(), None));
        }
        "nvml" => std::sync::Arc::new(mig::RealNvml::open().context("opening NVML")?),
        other => match other.strip_prefix("simulated:") {
            Some(spec) => std::sync::Arc::new(mig::SimulatedNvml::from_spec(spec).context("simulated topology")?),
            None => anyhow::bail!("unknown --instances {other:?}: use device, nvml or simulated:SPEC"),
        },
    };
    let gpus = mig::prepare(ctl.as_ref(), layout).context("discovering the instances to serve")?;
    for g in &gpus {
        for i in &g.instances {
            tracing::info!(gpu = g.index, name = %g.name, instance = %i.uuid, memory = i.memory, sms = i.sms, "serving");
        }
    }
    Ok((gpus, Some(ctl)))
}

fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn main() -> anyhow::Result<()> {
    lazy_module_loading();
    // stdout belongs to the worker protocol in a worker: logs go to stderr
    // (in a worker, the original stderr: fd 2 then captures the device's
    // assert messages for the client).
    tracing_subscriber::fmt()
        .with_writer(|| gpupool_server::device_output::LogWriter)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    gpupool_server::worker::run_if_worker();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(args))
}

/// Loads each function of a module when it is first used
/// (`CUDA_MODULE_LOADING=LAZY`, CUDA's own default since 12.2) unless the
/// operator chose a mode: cuBLAS's first use loaded 300-350 ms of kernels it
/// never ran under eager loading (H100, bench/results/20261207T162500Z-*).
/// A grid launched from the device keeps its `printf` because the server
/// describes (and so loads) a function only when the program first uses it
/// ([`gpupool_server::device::EAGER_DESCRIBE_MAX`], docs/diagnosis.md).
/// Workers inherit the setting.
#[allow(unsafe_code)]
fn lazy_module_loading() {
    if std::env::var_os("CUDA_MODULE_LOADING").is_none() {
        // SAFETY: called first thing in `main`, before this process starts
        // any thread, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("CUDA_MODULE_LOADING", "LAZY") };
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let mut config = ServerConfig::new(args.listen, args.tokens);
    config.device = args.device.parse()?;
    config.memory_quota = args.session_memory_mib << 20;
    config.max_sessions = args.max_sessions;
    config.image_cache_dir = args.image_cache;
    config.image_cache_disk_bytes = args.image_cache_disk_mib.saturating_mul(1 << 20);
    config.image_preload_bytes = args.image_preload_mib.saturating_mul(1 << 20);
    config.max_udp_payload = args.max_udp_payload;
    config.staging_host_bytes =
        args.staging_host_mib.map_or_else(default_staging_host_bytes, |mib| mib.saturating_mul(1 << 20));
    config.staging_wait = std::time::Duration::from_millis(args.staging_wait_ms);
    config.resume_grace = std::time::Duration::from_millis(args.resume_grace_ms);
    if let Some(us) = args.session_spin_us {
        config.session_spin = std::time::Duration::from_micros(us);
    }
    if let Some(us) = args.io_spin_us {
        config.io_spin = std::time::Duration::from_micros(us);
    }
    config.idle_timeout = std::time::Duration::from_millis(args.idle_timeout_ms);
    config.max_pending_handshakes = args.max_pending_handshakes;
    config.max_queued_batch_bytes = args.max_queued_batch_mib.saturating_mul(1 << 20);
    config.worker_ports = args.worker_ports;
    config.bulk_endpoints = args.bulk_endpoints;
    config.migrate_precopy_bytes = args.migrate_precopy_mib.saturating_mul(1 << 20);
    config.eager_describe_max = args.describe_eagerly_max;
    config.rdma.mode = args.rdma.parse().map_err(|e: String| anyhow::anyhow!("--rdma: {e}"))?;
    config.rdma.port = args.rdma_port;
    match args.shm_dir.as_deref() {
        Some("off") => config.shm_dir = None,
        Some(dir) => config.shm_dir = Some(dir.into()),
        None => {}
    }
    config.mps = gpupool_server::MpsSettings {
        mode: args.mps.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        control: args.mps_control,
        dir: args.mps_dir,
        time_share: (args.time_share_ms > 0).then(|| std::time::Duration::from_millis(args.time_share_ms)),
    };
    if args.swap_host_mib > 0 {
        config.swap = Some(gpupool_server::Swap {
            device_bytes: args.swap_device_mib.map(|m| m.saturating_mul(1 << 20)),
            host_bytes: args.swap_host_mib.saturating_mul(1 << 20),
            wait: std::time::Duration::from_millis(args.swap_wait_ms),
        });
        config.swap_spare_bytes = args.swap_spare_mib.saturating_mul(1 << 20);
        if args.swap_disk_mib > 0 {
            let dir = args.swap_dir.clone().unwrap_or_else(std::env::temp_dir);
            config.swap_disk =
                Some(gpupool_server::SwapDisk { bytes: args.swap_disk_mib.saturating_mul(1 << 20), dir });
        }
    }
    if args.isolation == "process" {
        let program = std::env::current_exe().context("locating this executable for worker processes")?;
        config.isolation = Isolation::Process {
            command: WorkerCommand { program, args: vec![gpupool_server::worker::WORKER_ARG.into()] },
            warm: args.warm_workers,
            start_timeout: std::time::Duration::from_secs(60),
        };
    }
    (config.gpus, config.mig_control) = served_gpus(&args.instances, args.mig_layout.as_deref())?;
    if let Some(url) = args.balancer {
        let server_id = match args.server_id {
            Some(id) => id,
            None => host_name().context("no --server-id given and the host name is unknown")?,
        };
        let ca_pem = args.balancer_ca_file.as_deref().map(gpupool_proto::grpc_tls::read_bounded).transpose()?;
        let trust = gpupool_proto::grpc_tls::BalancerTrust::from_settings(
            args.balancer_cert_sha256.as_deref(),
            ca_pem,
            args.balancer_server_name.as_deref(),
            args.balancer_insecure,
        )
        .context("verifying the balancer (--balancer-cert-sha256, --balancer-ca-file or --balancer-insecure)")?;
        let client_identity = match (args.balancer_client_cert, args.balancer_client_key) {
            (Some(cert), Some(key)) => Some(TlsSource::Files { cert, key }),
            _ => None,
        };
        config.balancer = Some(BalancerLink {
            url,
            trust,
            client_identity,
            server_id,
            advertise: args.advertise.unwrap_or_default(),
            secret: args.balancer_secret.unwrap_or_default(),
            lease_key: args.lease_key.unwrap_or_default(),
        });
    }
    if let (Some(cert), Some(key)) = (args.cert, args.key) {
        config.tls = TlsSource::Files { cert, key };
    }
    let metrics_listen = args.metrics_listen;
    let server = Server::bind(config)?;
    server.ready().await?;
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let exporter = match metrics_listen {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics listener on {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
            let stopped = async {
                let _ = metrics_stopped.await;
            };
            Some(tokio::spawn(gpupool_server::server::exporter::serve(listener, server.metrics(), stopped)))
        }
        None => None,
    };
    tracing::info!(addr = %server.local_addr(), backend = server.backend(), "listening");
    println!("gpupool-server listening on {} (certificate SHA-256 {})", server.local_addr(), server.fingerprint());
    let served = server.run(shutdown_signal()).await;
    let _ = stop_metrics.send(());
    if let Some(task) = exporter {
        let _ = task.await;
    }
    served?;
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
