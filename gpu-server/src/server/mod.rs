//! The QUIC side of a gpu-server: endpoint, handshake, and the command and
//! bulk streams of each session. Call execution lives in [`crate::session`]
//! on one worker thread per session; this module only moves frames.

use crate::auth::{Authenticator, Grant, LeaseTokens, StaticTokens, constant_time_eq};
use crate::config::{DeviceChoice, Isolation, ServerConfig};
use crate::device::cuda::CudaDevice;
use crate::device::emulated::EmulatedDevice;
use crate::device::{Backend, DeviceDescription};
use crate::error::{CallError, ServerError};
use crate::images::ImageCache;
use crate::pool::WorkerPool;
use crate::session::{SessionLimits, SessionState};
use crate::staging::Staging;
use crate::tls::Identity;
use bytes::Bytes;
use gpupool_proto::payload::{self, Compression};
use gpupool_proto::{PROTOCOL_VERSION, close_code, cuda, frame, quic, v1};
use prost::Message;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

/// Largest `Hello` accepted.
const MAX_HELLO_BYTES: usize = 64 << 10;
/// How long a closing session waits for its last replies to be acknowledged.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// Errors listed per reply; more are only counted.
const MAX_LISTED_ERRORS: usize = 16;

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
    /// Device memory mapped by sessions now (a gauge).
    pub memory_mapped: AtomicU64,
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
}

impl Metrics {
    /// Adds what a worker process counted since its last report.
    pub(crate) fn add_worker_delta(&self, now: &v1::WorkerMetrics, before: &v1::WorkerMetrics) {
        add(&self.batches, now.batches.saturating_sub(before.batches));
        add(&self.calls, now.calls.saturating_sub(before.calls));
        add(&self.call_errors, now.call_errors.saturating_sub(before.call_errors));
        add(&self.frames_rejected, now.frames_rejected.saturating_sub(before.frames_rejected));
        add(&self.bulk_bytes_in, now.bulk_bytes_in.saturating_sub(before.bulk_bytes_in));
        add(&self.bulk_bytes_out, now.bulk_bytes_out.saturating_sub(before.bulk_bytes_out));
        gauge(&self.memory_mapped, before.memory_mapped, now.memory_mapped);
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
        }
    }
}

/// Moves a gauge from `before` to `now`.
fn gauge(a: &AtomicU64, before: u64, now: u64) {
    if now >= before {
        a.fetch_add(now - before, Ordering::Relaxed);
    } else {
        a.fetch_sub(before - now, Ordering::Relaxed);
    }
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// The device a server drives, chosen at start.
#[derive(Debug, Clone)]
enum AnyDevice {
    Cuda(Arc<CudaDevice>),
    Emulated(Arc<EmulatedDevice>),
}

impl AnyDevice {
    /// Opens the device warm: context created and, on a GPU, the built-in
    /// module compiled, so that no session waits for NVRTC (a worker
    /// process opens its device before it is handed a session).
    fn open(choice: DeviceChoice) -> Result<Self, ServerError> {
        let device = Self::open_cold(choice)?;
        if let Self::Cuda(d) = &device
            && let Err(e) = d.prepare_builtin()
        {
            tracing::warn!(error = %e, "built-in module not compiled ahead; its first load will try again");
        }
        Ok(device)
    }

    fn open_cold(choice: DeviceChoice) -> Result<Self, ServerError> {
        match choice {
            DeviceChoice::Cuda { ordinal } => {
                Ok(Self::Cuda(Arc::new(CudaDevice::open(ordinal).map_err(ServerError::Device)?)))
            }
            DeviceChoice::Emulated { memory } => Ok(Self::Emulated(Arc::new(EmulatedDevice::new(memory)))),
            DeviceChoice::Auto => match CudaDevice::open(0) {
                Ok(d) => Ok(Self::Cuda(Arc::new(d))),
                Err(e) => {
                    tracing::warn!(reason = %e, "no usable GPU; using the emulated device");
                    Ok(Self::Emulated(Arc::new(EmulatedDevice::new(16 << 30))))
                }
            },
        }
    }

    fn description(&self) -> &DeviceDescription {
        match self {
            Self::Cuda(d) => d.description(),
            Self::Emulated(d) => d.description(),
        }
    }
}

/// Where sessions run.
#[derive(Debug, Clone)]
enum Mode {
    /// In this process, on this device.
    Local(AnyDevice),
    /// Each in a worker process; this process only hands sessions over.
    Workers(Arc<Workers>),
}

/// Worker pools: one per served instance, or one for the server's device.
#[derive(Debug)]
struct Workers {
    /// By instance UUID (empty for the server's one device), in the order
    /// the instances were listed.
    pools: Vec<(String, Arc<WorkerPool>)>,
}

impl Workers {
    /// The pool a session runs in: its lease's instance, else the first.
    fn for_session(&self, grant: &Grant) -> Option<&Arc<WorkerPool>> {
        match &grant.lease {
            Some(lease) => self.pools.iter().find(|(uuid, _)| *uuid == lease.instance_uuid).map(|(_, p)| p),
            None => self.pools.first().map(|(_, p)| p),
        }
    }
}

/// A session opened under a balancer's lease.
#[derive(Debug)]
pub(crate) struct LeasedSession {
    /// The lease token, shown to a restarted balancer.
    pub(crate) token: String,
    /// Device memory the session has mapped, as its worker last reported.
    pub(crate) memory_used: u64,
    pub(crate) conn: quinn::Connection,
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    config: ServerConfig,
    auth: Arc<dyn Authenticator>,
    metrics: Arc<Metrics>,
    images: Arc<ImageCache>,
    sessions: Arc<Semaphore>,
    next_session: AtomicU64,
    /// Notified when a session ends (a one-session server then stops).
    session_ended: tokio::sync::Notify,
    /// Open sessions by lease id, for heartbeats and for ending the
    /// sessions of leases the balancer ended.
    leased: Mutex<HashMap<u64, LeasedSession>>,
    /// Sessions a client may reattach to, by session id.
    resumable: Mutex<HashMap<u64, Resumable>>,
}

impl Shared {
    pub(crate) fn leased(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LeasedSession>> {
        self.leased.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn resumable(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Resumable>> {
        self.resumable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the resumable sessions of `lease_id` (the lease ended): a
    /// session waiting for its client then ends.
    pub(crate) fn forget_resumable(&self, lease_id: u64) {
        self.resumable().retain(|_, r| r.lease_id != Some(lease_id));
    }
}

/// A live session a client may reattach to after losing its connection.
#[derive(Debug)]
struct Resumable {
    secret: String,
    lease_id: Option<u64>,
    subject: String,
    /// To the session's task; dropping it ends a session waiting for a resume.
    requests: mpsc::Sender<ResumeRequest>,
}

/// A client's reattachment, handed to the session's task.
#[derive(Debug)]
struct ResumeRequest {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    acked_seq: u64,
}

/// Registers session `id` as resumable (when resumption is on) and
/// unregisters it on drop.
#[derive(Debug)]
struct ResumeSlot<'a> {
    shared: &'a Shared,
    id: u64,
    secret: String,
    requests: Option<mpsc::Receiver<ResumeRequest>>,
}

impl<'a> ResumeSlot<'a> {
    fn register(shared: &'a Shared, id: u64, grant: &Grant) -> Self {
        if shared.config.resume_grace.is_zero() {
            return Self { shared, id, secret: String::new(), requests: None };
        }
        let secret = grant.resume_secret.clone().unwrap_or_else(|| hex::encode(rand::random::<[u8; 32]>()));
        let (tx, rx) = mpsc::channel(1);
        let entry = Resumable {
            secret: secret.clone(),
            lease_id: grant.lease.as_ref().map(|l| l.lease_id),
            subject: grant.subject.clone(),
            requests: tx,
        };
        shared.resumable().insert(id, entry);
        Self { shared, id, secret, requests: Some(rx) }
    }

    /// Waits up to the grace period for the client to reattach.
    async fn wait(&mut self) -> Option<ResumeRequest> {
        let grace = self.shared.config.resume_grace;
        let rx = self.requests.as_mut()?;
        tracing::info!(grace_ms = grace.as_millis() as u64, "connection lost; keeping the session for its client");
        match tokio::time::timeout(grace, rx.recv()).await {
            Ok(Some(r)) => Some(r),
            Ok(None) => {
                tracing::info!("the session's lease ended while it waited for its client");
                None
            }
            Err(_) => {
                tracing::info!("the client did not come back within the grace period");
                None
            }
        }
    }
}

impl Drop for ResumeSlot<'_> {
    fn drop(&mut self) {
        if self.requests.is_some() {
            self.shared.resumable().remove(&self.id);
        }
    }
}

/// Why a session's connection ended, when the client did not end it: an
/// idle timeout (a frozen client, a network outage) or a reset.
fn lost(conn: &quinn::Connection) -> Option<&'static str> {
    match conn.close_reason() {
        Some(quinn::ConnectionError::TimedOut) => Some("idle timeout"),
        Some(quinn::ConnectionError::Reset) => Some("connection reset"),
        _ => None,
    }
}

/// A bound, not yet running, gpu-server.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    mode: Mode,
    fingerprint: String,
    shared: Arc<Shared>,
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
        config.validate()?;
        let identity = Identity::load(&config.tls)?;
        let tls = identity.server_config()?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| ServerError::Tls(format!("TLS configuration unusable for QUIC: {e}")))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server_config.transport_config(Arc::new(transport_config(&config)?));
        let mode = match &config.isolation {
            Isolation::InProcess => {
                let device = AnyDevice::open(config.device)?;
                let d = device.description();
                tracing::info!(device = %d.name, backend = d.backend, memory = d.total_memory, "device ready");
                Mode::Local(device)
            }
            Isolation::Process { command, warm, start_timeout } => {
                let (chain, key) = identity.to_der();
                let spec = crate::worker::spec_from_config(&config, chain, key);
                let pools = if config.gpus.is_empty() {
                    vec![(String::new(), WorkerPool::new(command.clone(), &spec, *warm, *start_timeout))]
                } else {
                    let instances = config.gpus.iter().flat_map(|g| &g.instances);
                    instances
                        .map(|instance| {
                            let mut spec = spec.clone();
                            spec.memory_quota = instance.memory;
                            // Under CUDA_VISIBLE_DEVICES the instance is device 0.
                            spec.device = match config.device {
                                DeviceChoice::Emulated { .. } => format!("emulated:{}", instance.memory),
                                _ => "cuda:0".into(),
                            };
                            let env = vec![("CUDA_VISIBLE_DEVICES".to_string(), instance.visible_devices.clone())];
                            let pool = WorkerPool::with_env(command.clone(), env, &spec, *warm, *start_timeout);
                            (instance.uuid.clone(), pool)
                        })
                        .collect()
                };
                Mode::Workers(Arc::new(Workers { pools }))
            }
        };
        let socket = bind_listen(&config)?;
        let (rx, tx) = quic::buffer_sizes(&socket);
        if rx < quic::SOCKET_BUFFER_BYTES / 8 {
            tracing::warn!(
                granted = rx,
                wanted = quic::SOCKET_BUFFER_BYTES,
                "UDP receive buffer capped by net.core.rmem_max; bulk copies may lose packets (raise it with sysctl)"
            );
        }
        tracing::debug!(rx, tx, "UDP socket buffers");
        let endpoint = quic::endpoint(socket, config.max_udp_payload, Some(server_config))
            .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        let shared = Arc::new(Shared {
            images: Arc::new(
                ImageCache::new(config.image_cache_dir.clone(), config.image_cache_bytes)
                    .with_disk_limit(config.image_cache_disk_bytes),
            ),
            sessions: Arc::new(Semaphore::new(config.max_sessions)),
            config,
            auth,
            metrics: Arc::default(),
            next_session: AtomicU64::new(1),
            session_ended: tokio::sync::Notify::new(),
            leased: Mutex::new(HashMap::new()),
            resumable: Mutex::new(HashMap::new()),
        });
        Ok(Self { endpoint, mode, fingerprint: identity.fingerprint(), shared })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or(self.shared.config.listen)
    }

    /// Hex SHA-256 of the server certificate, for clients to pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
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
            for (instance, pool) in &workers.pools {
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
            Mode::Workers(w) => match w.pools.first().and_then(|(_, p)| p.probe_result()).map(|r| r.backend.as_str()) {
                Some("cuda") => "cuda",
                Some("emulated") => "emulated",
                _ => "unknown",
            },
        }
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
            Mode::Workers(w) => w.pools.first().map(|(_, p)| p.clone()),
        }
    }

    /// Serves until `shutdown` completes, then closes every session and
    /// waits up to the grace period for them to end.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        self.ready().await?;
        let (link_stop, link_stopped) = tokio::sync::watch::channel(false);
        let link = self.shared.config.balancer.clone().map(|mut link| {
            // Port 0 in the advertised address: the port bound (tests, and
            // hosts that pick the port at start).
            if let Some(host) = link.advertise.strip_suffix(":0") {
                link.advertise = format!("{host}:{}", self.local_addr().port());
            }
            let gpus = crate::link::registration_gpus(&self.shared.config.gpus);
            let fingerprint = self.fingerprint.clone();
            tokio::spawn(crate::link::run(link, gpus, fingerprint, self.shared.clone(), link_stopped))
        });
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
                    tasks.spawn(handle_connection(shared, self.mode.clone(), incoming));
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        tracing::info!("shutting down");
        let _ = link_stop.send(true);
        if let Some(link) = link {
            let _ = link.await;
        }
        if let Mode::Workers(workers) = &self.mode {
            for (_, pool) in &workers.pools {
                pool.close();
            }
        }
        self.endpoint.close(close_code::SHUTDOWN.into(), b"server shutting down");
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
        Ok(())
    }
}

/// Binds the listen address; a worker (port 0) with a port range takes the
/// first free port of the range, starting at a random one so that workers
/// started together rarely collide.
fn bind_listen(config: &ServerConfig) -> Result<std::net::UdpSocket, ServerError> {
    let addr = config.listen;
    let bind_error = |source| ServerError::Bind { addr, source };
    let Some((low, high)) = config.worker_ports.filter(|_| addr.port() == 0) else {
        return quic::bind_udp(addr).map_err(bind_error);
    };
    let span = u32::from(high - low) + 1;
    let start = rand::random::<u32>() % span;
    for i in 0..span {
        let port = low + ((start + i) % span) as u16;
        match quic::bind_udp(SocketAddr::new(addr.ip(), port)) {
            Ok(socket) => return Ok(socket),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(bind_error(e)),
        }
    }
    Err(bind_error(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("every worker port in {low}-{high} is taken"),
    )))
}

/// Receive window of a connection that has not been authenticated: room
/// for its Hello.
const PRE_AUTH_RECEIVE_WINDOW: u32 = 1 << 20;

/// Receive window of an authenticated session's connection (bulk copies).
const SESSION_RECEIVE_WINDOW: u32 = 256 << 20;

/// Receive window left on a supervisor's control connection once its
/// session moved to a worker: nothing is read there any more.
const CONTROL_RECEIVE_WINDOW: u32 = 64 << 10;

/// Gives an authenticated connection its session's windows and streams.
fn open_windows(conn: &quinn::Connection, config: &ServerConfig) {
    conn.set_receive_window(quinn::VarInt::from_u32(SESSION_RECEIVE_WINDOW));
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(config.max_bulk_streams as u32 + 1));
}

fn transport_config(config: &ServerConfig) -> Result<quinn::TransportConfig, ServerError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| ServerError::Config(format!("idle_timeout: {e}")))?;
    t.max_idle_timeout(Some(idle));
    // Until its Hello is authenticated a connection gets one stream and a
    // small receive window: a connection that opens streams the server
    // never reads can make it buffer no more than this (6 such connections
    // once took the supervisor to 1.9 GiB; issue 20, finding 1).
    // `open_windows` raises both once the peer is known.
    t.max_concurrent_bidi_streams(1u8.into());
    t.max_concurrent_uni_streams(0u8.into());
    // Per stream the session's window (it cannot be raised later); the
    // connection's window bounds all streams together.
    t.stream_receive_window(quinn::VarInt::from_u32(32 << 20));
    t.receive_window(quinn::VarInt::from_u32(PRE_AUTH_RECEIVE_WINDOW));
    t.send_window(256 << 20);
    t.mtu_discovery_config(quic::mtu_discovery(config.max_udp_payload));
    Ok(t)
}

/// Reads one frame body; `Ok(None)` on a clean end of stream.
async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<Bytes>, FrameReadError> {
    let mut header = [0u8; frame::HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(FrameReadError::Frame(frame::FrameError::Truncated { have: n, want: frame::HEADER_LEN }));
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(FrameReadError::Stream(e.to_string())),
    }
    let len = frame::decode_header(header, max).map_err(FrameReadError::Frame)?;
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => Ok(Some(Bytes::from(body))),
        Err(quinn::ReadExactError::FinishedEarly(n)) => Err(FrameReadError::Frame(frame::FrameError::Truncated {
            have: frame::HEADER_LEN + n,
            want: frame::HEADER_LEN + len,
        })),
        Err(quinn::ReadExactError::ReadError(e)) => Err(FrameReadError::Stream(e.to_string())),
    }
}

#[derive(Debug, thiserror::Error)]
enum FrameReadError {
    #[error(transparent)]
    Frame(frame::FrameError),
    #[error("stream error: {0}")]
    Stream(String),
}

/// Longest text from a peer (a client's build string) that goes into a log
/// line or a close reason.
const MAX_PEER_TEXT: usize = 128;

/// `text` from a peer as it may be logged: at most [`MAX_PEER_TEXT`]
/// characters, control characters escaped, the cut marked.
pub(crate) fn peer_text(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_PEER_TEXT).flat_map(char::escape_default).collect();
    if text.chars().nth(MAX_PEER_TEXT).is_some() {
        out.push_str(&format!("… ({} bytes)", text.len()));
    }
    out
}

/// Refusals logged per second at most; the rest are counted (in the
/// metrics, and in the next line logged), so that unauthenticated
/// connections cannot flood the log (issue 20, finding 6).
const REFUSALS_LOGGED_PER_SECOND: u64 = 10;

/// Whether this refusal is logged, and how many were not since the last
/// one that was.
fn refusal_log_slot() -> Option<u64> {
    static WINDOW: std::sync::Mutex<(u64, u64, u64)> = std::sync::Mutex::new((0, 0, 0));
    let second = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut w = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
    let (start, logged, suppressed) = &mut *w;
    if *start != second {
        (*start, *logged) = (second, 0);
    }
    if *logged < REFUSALS_LOGGED_PER_SECOND {
        *logged += 1;
        Some(std::mem::take(suppressed))
    } else {
        *suppressed += 1;
        None
    }
}

fn refuse(shared: &Shared, conn: &quinn::Connection, code: u32, reason: &str) {
    add(&shared.metrics.sessions_refused, 1);
    if let Some(suppressed) = refusal_log_slot() {
        tracing::info!(remote = %conn.remote_address(), code, reason, suppressed, "session refused");
    }
    conn.close(code.into(), reason.as_bytes());
}

/// Runs one connection: handshake, then the session until either side ends it.
async fn handle_connection(shared: Arc<Shared>, mode: Mode, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "connection failed during the QUIC handshake");
            return;
        }
    };
    let hs = tokio::time::timeout(shared.config.handshake_timeout, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let body = read_frame(&mut recv, MAX_HELLO_BYTES).await.map_err(|e| e.to_string())?;
        let body = body.ok_or_else(|| "command stream ended before Hello".to_string())?;
        let hello = v1::Hello::decode(body).map_err(|e| format!("undecodable Hello: {e}"))?;
        Ok::<_, String>((send, recv, hello))
    })
    .await;
    let (send, recv, hello) = match hs {
        Ok(Ok(v)) => v,
        Ok(Err(reason)) => return refuse(&shared, &conn, close_code::BAD_HANDSHAKE, &reason),
        Err(_) => return refuse(&shared, &conn, close_code::BAD_HANDSHAKE, "no Hello within the handshake timeout"),
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version mismatch: server speaks {PROTOCOL_VERSION}, client {} sent {}",
            peer_text(&hello.client_build),
            hello.protocol_version
        );
        return refuse(&shared, &conn, close_code::VERSION_MISMATCH, &reason);
    }
    let grant = match shared.auth.authenticate(&hello.token) {
        Ok(g) => g,
        Err(e) => return refuse(&shared, &conn, close_code::UNAUTHORIZED, &e.to_string()),
    };
    // A supervisor's connection only carries the Hello and the redirect
    // (the session runs on the worker's connection): it keeps its small
    // window, so a tenant cannot pin the supervisor's memory by sending on
    // it (256 MiB a session before; issue 20, finding 2).
    if !matches!(mode, Mode::Workers(_)) {
        open_windows(&conn, &shared.config);
    }
    if let Some(resume) = hello.resume {
        return hand_to_session(&shared, conn, send, recv, &grant, resume);
    }
    let Ok(permit) = shared.sessions.clone().try_acquire_owned() else {
        let reason = format!("server is at its limit of {} sessions", shared.config.max_sessions);
        return refuse(&shared, &conn, close_code::BUSY, &reason);
    };
    let id = grant.session_id.unwrap_or_else(|| shared.next_session.fetch_add(1, Ordering::Relaxed));
    let span = tracing::info_span!("session", id, remote = %conn.remote_address());
    // The span follows this task across its awaits: entered with a guard
    // instead, it stayed entered on the runtime thread while the task was
    // parked, and other sessions' lines on that thread carried this
    // session's id (issue 20, finding 12).
    async move {
        tracing::info!(client = %peer_text(&hello.client_build), subject = %grant.subject, "session opened");
        add(&shared.metrics.sessions_opened, 1);
        add(&shared.metrics.sessions_active, 1);
        // A lease grants its whole instance; other tokens get the server's quota.
        let quota = match (&grant.lease, grant.memory_quota) {
            (Some(_), Some(q)) => q,
            _ => grant.memory_quota.unwrap_or(shared.config.memory_quota).min(shared.config.memory_quota),
        };
        if let Some(lease) = &grant.lease {
            let session = LeasedSession { token: lease.token.clone(), memory_used: 0, conn: conn.clone() };
            // One session per lease: a client that reconnects (a thawed Lambda
            // environment) replaces its old session.
            if let Some(old) = shared.leased().insert(lease.lease_id, session) {
                old.conn.close(close_code::NORMAL.into(), b"replaced by a new session of the same lease");
            }
        }
        let conn = match mode {
            Mode::Local(AnyDevice::Cuda(d)) => run_session(&shared, d, conn, id, quota, &grant, send, recv).await,
            Mode::Local(AnyDevice::Emulated(d)) => run_session(&shared, d, conn, id, quota, &grant, send, recv).await,
            Mode::Workers(workers) => match workers.for_session(&grant) {
                Some(pool) => run_in_worker(&shared, pool, conn, id, quota, &grant, send).await,
                None => {
                    conn.close(close_code::UNAUTHORIZED.into(), b"the lease's instance is not served here");
                    conn
                }
            },
        };
        if let Some(lease) = &grant.lease {
            let mut leased = shared.leased();
            if leased.get(&lease.lease_id).is_some_and(|s| s.conn.stable_id() == conn.stable_id()) {
                leased.remove(&lease.lease_id);
            }
        }
        shared.metrics.sessions_active.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
        shared.session_ended.notify_one();
        tracing::info!("session ended");
    }
    .instrument(span)
    .await
}

/// A `Hello` with a `Resume`: hands the connection to the session's task
/// when the session is kept here for this client, else refuses it.
fn hand_to_session(
    shared: &Shared,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    grant: &Grant,
    resume: v1::Resume,
) {
    let lease_id = grant.lease.as_ref().map(|l| l.lease_id);
    let requests = shared.resumable().get(&resume.session_id).and_then(|r| {
        let own = constant_time_eq(r.secret.as_bytes(), resume.secret.as_bytes())
            && r.lease_id == lease_id
            && (lease_id.is_some() || r.subject == grant.subject)
            && grant.session_id.is_none_or(|id| id == resume.session_id);
        own.then(|| r.requests.clone())
    });
    let gone = format!(
        "session {} is not kept here (its grace period passed, its lease ended, or it is not this client's)",
        resume.session_id
    );
    let Some(requests) = requests else {
        return refuse(shared, &conn, close_code::SESSION_GONE, &gone);
    };
    let request = ResumeRequest { conn: conn.clone(), send, recv, acked_seq: resume.acked_seq };
    if requests.try_send(request).is_err() {
        return refuse(shared, &conn, close_code::SESSION_GONE, "the session is being resumed by another connection");
    }
    tracing::info!(session = resume.session_id, remote = %conn.remote_address(), "client reattaching");
}

/// Hands the session to a worker process: the client is redirected to it
/// and this connection stays open as the session's control connection
/// until the worker exits. When the client's connections are lost, the
/// worker keeps the session for the resume grace period and a reattaching
/// client is redirected to it again. Returns the last control connection.
async fn run_in_worker(
    shared: &Shared,
    pool: &Arc<WorkerPool>,
    mut conn: quinn::Connection,
    id: u64,
    quota: u64,
    grant: &Grant,
    mut send: quinn::SendStream,
) -> quinn::Connection {
    let (subject, lease) = (grant.subject.as_str(), grant.lease.as_ref().map(|l| l.lease_id));
    let mut slot = ResumeSlot::register(shared, id, grant);
    let ticket = hex::encode(rand::random::<[u8; 32]>());
    let assign = v1::WorkerAssign {
        ticket: ticket.clone(),
        subject: subject.into(),
        memory_quota: quota,
        session_id: id,
        resume_secret: slot.secret.clone(),
        resume: false,
    };
    let mut worker = match pool.assign(&assign).await {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "no session worker");
            conn.close(close_code::BUSY.into(), format!("no session worker: {e}").as_bytes());
            return conn;
        }
    };
    let pid = worker.pid();
    let port = worker.ready.port;
    tracing::info!(pid, port, "session handed to a worker process");
    let secret = slot.secret.clone();
    let redirect = |ticket: String, resumed: bool| v1::Welcome {
        session_id: id,
        server_build: concat!("gpupool-server ", env!("CARGO_PKG_VERSION")).into(),
        redirect: Some(v1::Redirect { port, ticket }),
        resume_secret: secret.clone(),
        resumed,
        ..Default::default()
    };
    if send.write_all(&frame::encode(&redirect(ticket, false))).await.is_err() {
        worker.kill().await;
        pool.finished(pid);
        return conn;
    }
    // The session lives on the worker's connection now: no new streams
    // here, and no more credit than the pre-session window gave.
    conn.set_receive_window(quinn::VarInt::from_u32(CONTROL_RECEIVE_WINDOW));
    conn.set_max_concurrent_bi_streams(0u8.into());
    let metrics = shared.metrics.clone();
    let mut events = worker.take_events();
    let mut reported = v1::WorkerMetrics::default();
    let mut apply = |event: Option<v1::worker_event::Event>| {
        if let Some(v1::worker_event::Event::Metrics(m)) = event {
            metrics.add_worker_delta(&m, &reported);
            if let Some(id) = lease
                && let Some(s) = shared.leased().get_mut(&id)
            {
                s.memory_used = m.memory_mapped;
            }
            reported = m;
        }
    };
    let status = 'session: loop {
        tokio::select! {
            event = events.recv(), if !events.is_closed() => apply(event),
            status = worker.wait() => break status,
            _ = conn.closed() => {
                if lost(&conn).is_none() {
                    break worker_end(shared, &mut worker).await;
                }
                // The worker keeps the session as long: wait for the client.
                let request = tokio::select! {
                    r = slot.wait() => r,
                    status = worker.wait() => break 'session status,
                };
                let Some(request) = request else { break worker_end(shared, &mut worker).await };
                let ticket = hex::encode(rand::random::<[u8; 32]>());
                let rearm = v1::WorkerAssign { ticket: ticket.clone(), resume: true, ..assign.clone() };
                let armed = async {
                    worker.send_control(&frame::encode(&rearm)).await?;
                    loop {
                        match events.recv().await {
                            Some(v1::worker_event::Event::Assigned(t)) if t == ticket => return Ok(()),
                            Some(other) => apply(Some(other)),
                            None => return Err(ServerError::Worker("worker exited".into())),
                        }
                    }
                };
                if let Err(e) = tokio::time::timeout(shared.config.handshake_timeout, armed)
                    .await
                    .unwrap_or_else(|_| Err(ServerError::Worker("worker did not arm the resume ticket".into())))
                {
                    tracing::warn!(error = %e, "cannot resume the session");
                    request.conn.close(close_code::SESSION_GONE.into(), format!("cannot resume: {e}").as_bytes());
                    break worker_end(shared, &mut worker).await;
                }
                let mut send = request.send;
                let _ = send.write_all(&frame::encode(&redirect(ticket, true))).await;
                conn = request.conn;
                if let Some(id) = lease
                    && let Some(s) = shared.leased().get_mut(&id)
                {
                    s.conn = conn.clone();
                }
                tracing::info!(pid, "client redirected to its kept session");
            }
        }
    };
    // The last report may arrive after the exit.
    while let Ok(event) = events.try_recv() {
        apply(Some(event));
    }
    pool.finished(pid);
    match status {
        Ok(s) if s.success() => conn.close(close_code::NORMAL.into(), b"session ended"),
        Ok(s) => {
            tracing::warn!(pid, status = %s, "session worker ended abnormally");
            conn.close(close_code::WORKER_EXITED.into(), format!("session worker {pid} {s}").as_bytes());
        }
        Err(e) => conn.close(close_code::WORKER_EXITED.into(), format!("session worker {pid}: {e}").as_bytes()),
    }
    conn
}

/// The client ended the session (or vanished): gives the worker time to see
/// its own connection end, then stops it, then kills it.
async fn worker_end(shared: &Shared, worker: &mut crate::pool::Worker) -> std::io::Result<std::process::ExitStatus> {
    if let Ok(status) = tokio::time::timeout(LINGER, worker.wait()).await {
        return status;
    }
    worker.stop();
    if let Ok(status) = tokio::time::timeout(shared.config.shutdown_grace, worker.wait()).await {
        return status;
    }
    worker.kill().await;
    worker.wait().await
}

/// Work for a session's worker thread, in command-stream order.
enum Work {
    /// A batch and its share of the queue's byte budget, given back once
    /// the batch ran.
    Batch(v1::Batch, tokio::sync::OwnedSemaphorePermit),
    /// A reply the reader made itself (a rejected frame), kept in order.
    Reply(v1::BatchReply),
}

fn frame_error_reply(message: String) -> v1::BatchReply {
    v1::BatchReply {
        seq: 0,
        errors: vec![v1::CallError { index: 0, code: cuda::INVALID_VALUE, message }],
        error_count: 1,
        ..Default::default()
    }
}

/// Runs a session in this process: its calls on a thread of their own,
/// its frames on `conn`, and on later connections of the same client when
/// one is lost (see [`ResumeSlot`]). Returns the last connection.
#[allow(clippy::too_many_arguments)]
async fn run_session<B: Backend>(
    shared: &Arc<Shared>,
    device: Arc<B>,
    mut conn: quinn::Connection,
    id: u64,
    quota: u64,
    grant: &Grant,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> quinn::Connection {
    let mut slot = ResumeSlot::register(shared, id, grant);
    let cfg = &shared.config;
    let desc = device.description().clone();
    let g = desc.granularity;
    let quota = quota.div_ceil(g) * g;
    // Room for fragmentation: twice the quota, at least 64 MiB.
    let va_size = (quota * 2).max(64 << 20).div_ceil(g) * g;
    let limits = SessionLimits {
        memory_quota: quota,
        va_size,
        granularity: g,
        max_inline_bytes: u64::from(cfg.max_inline_bytes),
        // Staged images may be larger than a frame (cuBLAS's fatbins are);
        // staging itself is bounded by max_staging_bytes.
        max_image_bytes: cfg.max_staging_bytes.min(1 << 30),
        max_handles: cfg.max_handles,
        max_listed_errors: MAX_LISTED_ERRORS,
        max_output_bytes: (u64::from(cfg.max_frame_bytes) - u64::from(cfg.max_inline_bytes)) / 2,
        compression: if cfg.compression { Compression::Auto } else { Compression::Off },
    };
    let staging = Arc::new(Staging::new(cfg.max_staging_bytes, cfg.max_bulk_streams * 4));
    let (work_tx, work_rx) = mpsc::channel::<Work>(cfg.batch_queue);
    let (reply_tx, reply_rx) = mpsc::channel::<v1::BatchReply>(cfg.batch_queue);
    let (ready_tx, ready_rx) = oneshot::channel();
    let worker = {
        let staging = staging.clone();
        let images = shared.images.clone();
        let metrics = shared.metrics.clone();
        let work = WorkQueue { rx: work_rx, spin: cfg.session_spin };
        std::thread::Builder::new().name(format!("gpupool-session-{id}")).spawn(move || {
            worker(device, limits, staging, images, metrics, work, reply_tx, ready_tx);
        })
    };
    if let Err(e) = worker {
        tracing::error!(error = %e, "cannot start a session worker thread");
        conn.close(close_code::BUSY.into(), b"server cannot start a session worker");
        return conn;
    }
    let (va_base, context_limits) = match ready_rx.await {
        Ok(Ok(ready)) => ready,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot open a device session");
            conn.close(close_code::BUSY.into(), format!("device session failed: {e}").as_bytes());
            return conn;
        }
        Err(_) => {
            conn.close(close_code::BUSY.into(), b"session worker ended early");
            return conn;
        }
    };
    let welcome = v1::Welcome {
        session_id: id,
        server_build: concat!("gpupool-server ", env!("CARGO_PKG_VERSION")).into(),
        va_base,
        va_size,
        granularity: g,
        memory_quota: quota,
        device: Some(v1::DeviceInfo {
            name: desc.name.clone(),
            backend: desc.backend.into(),
            uuid: desc.uuid.clone(),
            compute_capability_major: desc.compute_capability.0,
            compute_capability_minor: desc.compute_capability.1,
            multiprocessor_count: desc.multiprocessor_count,
            attributes: desc.attributes.iter().copied().collect(),
            driver_version: desc.driver_version,
            error_strings: desc.error_strings.iter().cloned().collect(),
            limits: context_limits.into_iter().collect(),
        }),
        max_frame_bytes: cfg.max_frame_bytes,
        max_inline_bytes: cfg.max_inline_bytes,
        redirect: None,
        resume_secret: slot.secret.clone(),
        resumed: false,
        resumed_seq: 0,
    };
    if send.write_all(&frame::encode(&welcome)).await.is_err() {
        return conn;
    }
    let mut log = ReplyLog::new(reply_rx, slot.requests.is_some());
    let queue_budget = Arc::new(Semaphore::new(MAX_QUEUED_BATCH_BYTES));
    let mut received_seq = 0;
    let mut acked = None;
    loop {
        // Replies go out in order as the worker produces them.
        let writer = tokio::spawn(write_replies(log, send, conn.clone(), acked));
        let bulk = tokio::spawn(accept_bulk(conn.clone(), shared.clone(), staging.clone()));
        let ended = read_commands(shared, &conn, &mut recv, &work_tx, &queue_budget, &mut received_seq).await;
        bulk.abort();
        match ended {
            Ended::Finished => {
                drop(work_tx);
                let _ = writer.await;
                conn.close(close_code::NORMAL.into(), b"session ended");
                return conn;
            }
            Ended::Violation(e) => {
                // Framing is lost: answer, then end the session.
                let _ = work_tx.send(Work::Reply(frame_error_reply(format!("malformed frame: {e}")))).await;
                drop(work_tx);
                let _ = writer.await;
                conn.close(close_code::PROTOCOL_VIOLATION.into(), format!("malformed frame: {e}").as_bytes());
                return conn;
            }
            Ended::Lost(why) => {
                tracing::info!(why, "session connection lost");
                let Ok(kept) = writer.await else { return conn };
                log = kept;
                let Some(request) = slot.wait().await else { return conn };
                if !log.covers(request.acked_seq) {
                    request.conn.close(close_code::SESSION_GONE.into(), b"the replies the client missed are gone");
                    return conn;
                }
                (conn, send, recv, acked) = (request.conn, request.send, request.recv, Some(request.acked_seq));
                let again = v1::Welcome { resumed: true, resumed_seq: received_seq, ..welcome.clone() };
                // A failed write shows on the command stream as a lost connection.
                let _ = send.write_all(&frame::encode(&again)).await;
                tracing::info!(remote = %conn.remote_address(), received_seq, "session resumed");
            }
        }
    }
}

/// How a session's command stream ended.
#[derive(Debug)]
enum Ended {
    /// The client finished it or closed the connection, or the server is
    /// shutting down.
    Finished,
    /// The connection was lost (the client may come back).
    Lost(&'static str),
    /// A frame could not be read: framing is lost.
    Violation(frame::FrameError),
}

/// Most calls one batch may hold (the client sends at most 65 536).
const MAX_CALLS_PER_BATCH: usize = 1 << 16;

/// Bytes of decoded batches a session may have queued ahead of its worker.
/// A count of batches bounded nothing: an empty call is 2 bytes on the wire
/// and ~100 decoded, and 64 MiB of them behind a busy kernel took 3.7 GB
/// (issue 20, finding 3).
const MAX_QUEUED_BATCH_BYTES: usize = 256 << 20;

/// The number of calls (field 2) in an encoded `Batch`, counted without
/// decoding it, so that a frame of millions of empty calls is refused
/// before it is expanded; `None` when the encoding is malformed (decoding
/// then says why).
fn batch_call_count(mut body: &[u8]) -> Option<usize> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut calls = 0;
    while !body.is_empty() {
        let key = varint(&mut body)?;
        match key & 7 {
            0 => {
                varint(&mut body)?;
            }
            1 => body = body.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut body)?).ok()?;
                body = body.get(len..)?;
                if key >> 3 == 2 {
                    calls += 1;
                }
            }
            5 => body = body.get(4..)?,
            _ => return None,
        }
    }
    Some(calls)
}

/// Reads batches from the command stream into the session's work queue.
async fn read_commands(
    shared: &Shared,
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    work: &mpsc::Sender<Work>,
    budget: &Arc<Semaphore>,
    received_seq: &mut u64,
) -> Ended {
    let max_frame = shared.config.max_frame_bytes as usize;
    loop {
        let item = match read_frame(recv, max_frame).await {
            Ok(Some(body)) => match batch_call_count(&body) {
                Some(n) if n > MAX_CALLS_PER_BATCH => {
                    add(&shared.metrics.frames_rejected, 1);
                    Work::Reply(frame_error_reply(format!(
                        "a batch of {n} calls exceeds the limit of {MAX_CALLS_PER_BATCH}"
                    )))
                }
                _ => match v1::Batch::decode(body) {
                    Ok(batch) => {
                        // What the decoded batch holds in memory until it ran.
                        let cost = batch.encoded_len() + batch.calls.len() * std::mem::size_of::<v1::Call>();
                        let permits = u32::try_from(cost).unwrap_or(u32::MAX).max(1);
                        if permits as usize > MAX_QUEUED_BATCH_BYTES {
                            add(&shared.metrics.frames_rejected, 1);
                            Work::Reply(frame_error_reply(format!(
                                "a batch of {cost} decoded bytes exceeds the queue's {MAX_QUEUED_BATCH_BYTES}"
                            )))
                        } else {
                            // Wait for room: the client's later batches queue
                            // in QUIC flow control, not here.
                            let Ok(permit) = budget.clone().acquire_many_owned(permits).await else {
                                return Ended::Finished;
                            };
                            add(&shared.metrics.batches, 1);
                            add(&shared.metrics.calls, batch.calls.len() as u64);
                            *received_seq = batch.seq;
                            Work::Batch(batch, permit)
                        }
                    }
                    Err(e) => {
                        add(&shared.metrics.frames_rejected, 1);
                        Work::Reply(frame_error_reply(format!("malformed frame: not a Batch: {e}")))
                    }
                },
            },
            Ok(None) => return Ended::Finished,
            Err(FrameReadError::Frame(e)) => {
                add(&shared.metrics.frames_rejected, 1);
                return Ended::Violation(e);
            }
            Err(FrameReadError::Stream(e)) => {
                tracing::debug!(error = %e, "command stream ended");
                return lost(conn).map_or(Ended::Finished, Ended::Lost);
            }
        };
        if work.send(item).await.is_err() {
            return Ended::Finished;
        }
    }
}

/// Replies of a session: the queue from its worker thread and, when the
/// session can be resumed, the last ones sent, for a client that lost them
/// with its connection.
#[derive(Debug)]
struct ReplyLog {
    rx: mpsc::Receiver<v1::BatchReply>,
    keep: bool,
    sent: std::collections::VecDeque<(u64, Bytes)>,
    sent_bytes: usize,
    /// Sequence number of the newest reply no longer kept.
    forgotten: u64,
}

/// Replies kept for a resume: more than a client has in flight (32).
const KEPT_REPLIES: usize = 64;
const KEPT_REPLY_BYTES: usize = 64 << 20;

impl ReplyLog {
    fn new(rx: mpsc::Receiver<v1::BatchReply>, keep: bool) -> Self {
        Self { rx, keep, sent: std::collections::VecDeque::new(), sent_bytes: 0, forgotten: 0 }
    }

    fn remember(&mut self, seq: u64, bytes: Bytes) {
        if !self.keep || seq == 0 {
            return;
        }
        self.sent_bytes += bytes.len();
        self.sent.push_back((seq, bytes));
        while self.sent.len() > KEPT_REPLIES || self.sent_bytes > KEPT_REPLY_BYTES {
            let Some((seq, old)) = self.sent.pop_front() else { break };
            self.sent_bytes -= old.len();
            self.forgotten = seq;
        }
    }

    /// Whether every reply after `acked` can still be sent.
    fn covers(&self, acked: u64) -> bool {
        acked >= self.forgotten
    }
}

/// Sends the session's replies on `send` until the worker thread ends or
/// the connection goes; first again those after `acked` (a resumed
/// session). Returns the log for the next connection.
async fn write_replies(
    mut log: ReplyLog,
    mut send: quinn::SendStream,
    conn: quinn::Connection,
    acked: Option<u64>,
) -> ReplyLog {
    if let Some(acked) = acked {
        let again: Vec<Bytes> = log.sent.iter().filter(|(seq, _)| *seq > acked).map(|(_, b)| b.clone()).collect();
        for bytes in again {
            if send.write_all(&bytes).await.is_err() {
                return log;
            }
        }
    }
    loop {
        let reply = tokio::select! {
            r = log.rx.recv() => match r {
                Some(r) => r,
                None => break,
            },
            _ = conn.closed() => return log,
        };
        let bytes = frame::encode(&reply);
        log.remember(reply.seq, bytes.clone());
        if send.write_all(&bytes).await.is_err() {
            return log;
        }
    }
    // Let the last replies arrive before the connection is closed.
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(LINGER, send.stopped()).await;
    }
    log
}

/// What a session thread reports once its device session is open: the
/// first address of its range and its context's limits.
type SessionReady = (u64, Vec<(u32, u64)>);

#[allow(clippy::too_many_arguments)]
fn worker<B: Backend>(
    device: Arc<B>,
    limits: SessionLimits,
    staging: Arc<Staging>,
    images: Arc<ImageCache>,
    metrics: Arc<Metrics>,
    mut work: WorkQueue,
    replies: mpsc::Sender<v1::BatchReply>,
    ready: oneshot::Sender<Result<SessionReady, CallError>>,
) {
    let dev = match device.open_session(limits.va_size) {
        Ok(d) => d,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // Device printf output per reply: with the largest inline copy, a
    // reply stays within a frame.
    let max_output = usize::try_from(limits.max_output_bytes).unwrap_or(usize::MAX);
    let mut state = SessionState::new(dev, limits, staging, images);
    let context_limits = state.limits();
    if ready.send(Ok((state.va_base(), context_limits))).is_err() {
        return;
    }
    let mut mapped = 0;
    while let Some(item) = work.next() {
        let reply = match item {
            Work::Batch(batch, _budget) => {
                let mut reply = state.execute_batch(batch);
                if let Some(capture) = crate::device_output::installed() {
                    reply.device_output = capture.collect(max_output).into();
                }
                add(&metrics.call_errors, u64::from(reply.error_count));
                gauge(&metrics.memory_mapped, mapped, state.mapped_bytes());
                mapped = state.mapped_bytes();
                reply
            }
            Work::Reply(reply) => reply,
        };
        if replies.blocking_send(reply).is_err() {
            break;
        }
    }
    // The session's memory goes with it.
    gauge(&metrics.memory_mapped, mapped, 0);
}

/// The session thread's side of its work channel.
struct WorkQueue {
    rx: mpsc::Receiver<Work>,
    /// How long to poll for the next item before sleeping
    /// ([`ServerConfig::session_spin`]).
    spin: std::time::Duration,
}

impl WorkQueue {
    /// The next item, `None` once the session's reader is gone.
    fn next(&mut self) -> Option<Work> {
        let start = std::time::Instant::now();
        loop {
            match self.rx.try_recv() {
                Ok(item) => return Some(item),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) if start.elapsed() < self.spin => std::hint::spin_loop(),
                Err(mpsc::error::TryRecvError::Empty) => return self.rx.blocking_recv(),
            }
        }
    }
}

/// Serves the session's bulk streams, a bounded number at a time.
async fn accept_bulk(conn: quinn::Connection, shared: Arc<Shared>, staging: Arc<Staging>) {
    let limit = Arc::new(Semaphore::new(shared.config.max_bulk_streams));
    let mut tasks = JoinSet::new();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let Ok(permit) = limit.clone().acquire_owned().await else { break };
        let (shared, staging) = (shared.clone(), staging.clone());
        tasks.spawn(async move {
            bulk_stream(&shared, &staging, send, recv).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
}

async fn bulk_stream(shared: &Shared, staging: &Staging, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let max = shared.config.max_frame_bytes as usize;
    let response = match read_frame(&mut recv, max).await {
        Ok(Some(body)) => match v1::BulkRequest::decode(body) {
            Ok(req) => serve_bulk(shared, staging, req),
            Err(e) => Err(CallError::invalid_value(format!("malformed bulk request: {e}"))),
        },
        Ok(None) => Err(CallError::invalid_value("bulk stream ended before its request")),
        Err(e) => Err(CallError::invalid_value(format!("malformed bulk request: {e}"))),
    };
    let response = response.unwrap_or_else(|e| {
        add(&shared.metrics.frames_rejected, 1);
        v1::BulkResponse { error: Some(v1::CallError { index: 0, code: e.code, message: e.message }), data: None }
    });
    if send.write_all(&frame::encode(&response)).await.is_ok() {
        let _ = send.finish();
    }
}

fn serve_bulk(shared: &Shared, staging: &Staging, req: v1::BulkRequest) -> Result<v1::BulkResponse, CallError> {
    let max = u64::from(shared.config.max_frame_bytes);
    match req.op {
        Some(v1::bulk_request::Op::Put(p)) => {
            let data = p.data.ok_or_else(|| CallError::invalid_value("bulk put without data"))?;
            let bytes = payload::decode(data, max).map_err(|e| CallError::invalid_value(e.to_string()))?;
            staging.put(p.transfer_id, p.total_size, p.offset, &bytes)?;
            add(&shared.metrics.bulk_bytes_in, bytes.len() as u64);
            Ok(v1::BulkResponse::default())
        }
        Some(v1::bulk_request::Op::Get(g)) => {
            if g.size > max / 2 {
                return Err(CallError::invalid_value(format!("bulk get of {} bytes exceeds the chunk limit", g.size)));
            }
            let bytes = staging.get(g.transfer_id, g.offset, g.size)?;
            add(&shared.metrics.bulk_bytes_out, bytes.len() as u64);
            let mode = if shared.config.compression { Compression::Auto } else { Compression::Off };
            Ok(v1::BulkResponse { error: None, data: Some(payload::encode(bytes, mode)) })
        }
        None => Err(CallError::invalid_value("bulk request without an operation")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, finding 6: a 60 KiB build string once went whole into a
    /// log line for every refused connection.
    #[test]
    fn peer_text_is_cut_and_escaped() {
        let long = "x".repeat(60 << 10);
        let shown = peer_text(&long);
        assert!(shown.len() < 200, "{}", shown.len());
        assert!(shown.ends_with(&format!("({} bytes)", 60 << 10)));
        assert_eq!(peer_text("gpupool 0.1\n\u{1b}[31m"), "gpupool 0.1\\n\\u{1b}[31m");
    }

    #[test]
    fn calls_are_counted_without_decoding() {
        let batch = v1::Batch { seq: 7, calls: vec![v1::Call::default(); 1000] };
        assert_eq!(batch_call_count(&batch.encode_to_vec()), Some(1000));
        assert_eq!(batch_call_count(&[]), Some(0));
        assert_eq!(batch_call_count(&[0x12, 0x05, 0x00]), None, "length past the end");
        // Issue 20, finding 3: 8 MiB of empty calls is 4M calls.
        let flood: Vec<u8> = std::iter::repeat_n([0x12u8, 0x00], 4 << 20).flatten().collect();
        assert_eq!(batch_call_count(&flood), Some(4 << 20));
    }

    #[test]
    fn refusals_are_logged_at_a_bounded_rate() {
        let logged = (0..1000).filter(|_| refusal_log_slot().is_some()).count() as u64;
        // At most two one-second windows can be touched by the loop.
        assert!(logged <= 2 * REFUSALS_LOGGED_PER_SECOND, "{logged}");
        assert!(logged >= 1);
    }
}
