//! Typed client configuration.

use crate::batch::BatchLimits;
use gpupool_proto::balancer as pb;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the token for reattaching to a session comes from: a lease is
/// renewed while the session lives, so the token first presented may have
/// expired when the connection is lost.
#[derive(Debug, Clone, Default)]
pub enum TokenSource {
    /// The configured token.
    #[default]
    Fixed,
    /// The lease hand-off file another process keeps renewed (the Lambda
    /// extension's, [`crate::LeaseHandoff`]).
    LeaseFile(PathBuf),
    /// A lease this process renews ([`crate::LeasedGpu`]).
    Lease(Arc<Mutex<pb::Lease>>),
}

impl TokenSource {
    /// The newest token, `configured` when nothing newer is known.
    pub fn current(&self, configured: &str) -> String {
        match self {
            Self::Fixed => configured.to_string(),
            Self::LeaseFile(path) => match crate::LeaseHandoff::read(path) {
                Ok(h) => h.token,
                Err(e) => {
                    tracing::warn!(error = %e, "no fresher token in the lease hand-off file");
                    configured.to_string()
                }
            },
            Self::Lease(l) => l.lock().unwrap_or_else(|e| e.into_inner()).token.clone(),
        }
    }

    /// The newest token when the lease it belongs to names the server at
    /// `address` (a renewal after the session's migration); `None` when
    /// nothing renews or the lease names another server.
    pub fn current_for(&self, address: &str) -> Option<String> {
        let (leased_at, token) = match self {
            Self::Fixed => return None,
            Self::LeaseFile(path) => {
                let h = crate::LeaseHandoff::read(path).ok()?;
                (h.address, h.token)
            }
            Self::Lease(l) => {
                let l = l.lock().unwrap_or_else(|e| e.into_inner());
                (l.address.clone(), l.token.clone())
            }
        };
        (leased_at == address).then_some(token)
    }
}

/// How the client trusts the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Accept exactly the certificate with this hex SHA-256 (what the server
    /// prints at start).
    Fingerprint(String),
    /// Verify against these PEM-encoded CA certificates and the server name.
    CaPem(Vec<u8>),
}

/// Everything needed to open a session.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The gpu-server's QUIC address.
    pub server: SocketAddr,
    /// Name the certificate must carry (CA mode).
    pub server_name: String,
    pub trust: Trust,
    /// Session token (shared secret or signed lease).
    pub token: String,
    pub batch: BatchLimits,
    /// Bytes per bulk chunk.
    pub bulk_chunk_bytes: usize,
    /// Bulk streams in flight at once.
    pub bulk_parallel: usize,
    /// A large download over QUIC (not through a shared-memory region)
    /// goes in pieces of this many bytes (at most the server's copy piece):
    /// the server reads a piece from the device whole
    /// before its reply names it, then reads the next while the client
    /// fetches this one. Smaller pieces expose less of the first read;
    /// larger ones keep more chunks in flight over the bulk connections.
    pub download_piece_bytes: usize,
    /// Extra QUIC connections for bulk copies, when the server offers bulk
    /// endpoints (at most one per endpoint): chunk `i` of a copy goes on
    /// connection `i mod n`, each driven by a bulk I/O thread of its own,
    /// so that several cores carry a copy. 0: copies share the session's
    /// connection.
    pub bulk_connections: usize,
    /// lz4-compress uploads when it pays.
    pub compression: bool,
    pub connect_timeout: Duration,
    /// Longest wait for one reply. Long kernels need a generous bound; a
    /// dead server is detected sooner by the QUIC idle timeout.
    pub reply_timeout: Duration,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Largest UDP payload sent or accepted; MTU discovery probes up to it
    /// (Lambda: 1200, which turns discovery off). Bulk connections to a
    /// loopback server use 65 527 unless this is below 1472
    /// (`gpupool_proto::quic::bulk_udp_payload`).
    pub max_udp_payload: u16,
    /// When the program waits for a reply, keep the I/O thread awake this
    /// long (a task that yields in a loop): the reply's packet is then read
    /// without an epoll wake-up, and the next batch a latency-bound loop
    /// sends leaves without an eventfd wake-up. Zero lets it sleep at once.
    /// Default: 100 µs where the process may use 4 CPUs or more, else 0
    /// ([`gpupool_proto::quic::default_spin`]). Costs the I/O thread's CPU
    /// while the program waits; batches sent without a wait (a stream of
    /// launches) do not keep it awake.
    pub io_spin: Duration,
    /// Reattach to the session when its connection is lost (a frozen
    /// Lambda environment, a network outage) and the server still keeps it.
    pub resume: bool,
    /// Where the token for reattaching comes from.
    pub token_source: TokenSource,
    /// Bytes of the shared-memory region this client attaches to its
    /// session when the server offers shared memory and shares its host
    /// (bulk copies then go through memory); 0: never, copies stay on QUIC.
    /// From 4 KiB to 1 GiB otherwise.
    pub shm_region_bytes: usize,
    /// Most bytes of the program's pinned host memory (`cuMemHostAlloc`,
    /// `cuMemAllocHost`) this client keeps in host regions it shares with
    /// the server, so copies from and to it are the server's DMA (with a
    /// shared-memory attachment only); 0: none, pinned memory is plain
    /// memory and its bytes travel like any others.
    pub shm_pinned_bytes: usize,
    /// With a shared-memory attachment and a server that offers it, send
    /// the session's batches and take its replies through a command ring
    /// in shared memory instead of QUIC (docs/transport.md); false: the
    /// commands stay on QUIC (copies still go through memory).
    pub shm_commands: bool,
    /// Asynchronous copies to the device (`cuMemcpyHtoDAsync`) from memory
    /// outside a shared host region are only queued on the server, ordered
    /// on their stream as natively (`docs/transport.md`); false: each
    /// completes on the server before the next call, as synchronous ones do.
    pub async_copies: bool,
    /// RDMA: whether to offer it, and the device (`docs/rdma.md`).
    pub rdma: RdmaOptions,
}

/// A client's RDMA settings.
#[derive(Debug, Clone)]
pub struct RdmaOptions {
    /// Offer RDMA when a device is found (off: the session stays on QUIC).
    pub enabled: bool,
    /// The device; `None`: the first verbs device (feature `rdma-verbs`).
    /// Tests put an in-memory fabric here.
    pub provider: Option<std::sync::Arc<dyn gpupool_rdma::Provider>>,
    /// How long the server may stay silent on the RDMA connection before
    /// it is lost (and the session resumes on QUIC).
    pub idle_timeout: Duration,
    /// Bytes of the registered regions uploads are read from and
    /// downloads land in (each); larger copies go in pieces of this size.
    pub region_bytes: usize,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        Self { enabled: true, provider: None, idle_timeout: Duration::from_secs(10), region_bytes: 16 << 20 }
    }
}

/// Default size of a client's shared-memory region: eight 4 MiB slots, so
/// that the client fills some while the server copies others.
pub const DEFAULT_SHM_REGION_BYTES: usize = 32 << 20;

/// Default bound on pinned host memory kept in shared host regions.
pub const DEFAULT_SHM_PINNED_BYTES: usize = 8 << 30;

/// How long a queued call waits for company before its batch is sent while
/// earlier batches are in flight (with none in flight it goes at once).
/// Long enough that a program issuing calls back to back sends a few per
/// batch; short against the kernels a GPU runs, so that the GPU does not
/// idle while the program issues more.
/// Measured: bench/results/*-batch-delay.md.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_micros(100);

/// Default [`ClientConfig::download_piece_bytes`]: 32 MiB, the default
/// `bulk_parallel` (8) times the default chunk (4 MiB), so a piece still
/// fills every stream in flight once while a 64 MiB download is two pieces
/// (as one, its 4-5 ms device read on an H100 came before any byte went
/// out). Not yet measured on a GPU against 64 and 16.
pub const DEFAULT_DOWNLOAD_PIECE_BYTES: usize = 32 << 20;

impl ClientConfig {
    /// Defaults for a server at `server` with the given trust and token.
    pub fn new(server: SocketAddr, trust: Trust, token: impl Into<String>) -> Self {
        Self {
            server,
            server_name: "localhost".into(),
            trust,
            token: token.into(),
            batch: BatchLimits {
                max_bytes: 1 << 20,
                max_calls: 65_536,
                max_in_flight: 32,
                max_delay: Some(DEFAULT_BATCH_DELAY),
            },
            bulk_chunk_bytes: 4 << 20,
            bulk_parallel: 8,
            download_piece_bytes: DEFAULT_DOWNLOAD_PIECE_BYTES,
            // One connection is bounded by one core (0.4–0.7 GiB/s on the
            // H200 host; the target is 3 GiB/s); four match the server's
            // default bulk endpoints and keep two 4 MiB chunks in flight on
            // each with `bulk_parallel` 8.
            bulk_connections: 4,
            compression: true,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            max_udp_payload: gpupool_proto::quic::DEFAULT_UDP_PAYLOAD,
            io_spin: gpupool_proto::quic::default_spin(),
            resume: true,
            token_source: TokenSource::Fixed,
            shm_region_bytes: DEFAULT_SHM_REGION_BYTES,
            shm_pinned_bytes: DEFAULT_SHM_PINNED_BYTES,
            shm_commands: true,
            async_copies: true,
            rdma: RdmaOptions::default(),
        }
    }

    /// Defaults for sessions on leased GPUs ([`crate::Session::connect_pooled`]):
    /// the lease fills in the server, its certificate pin and the token.
    pub fn for_leases() -> Self {
        Self::new(([0, 0, 0, 0], 0).into(), Trust::Fingerprint("0".repeat(64)), "from-the-lease")
    }

    /// Checks the settings, reporting every problem.
    pub fn validate(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        if self.token.is_empty() {
            bad.push("token is empty");
        }
        if self.batch.max_bytes < 1024 || self.batch.max_calls == 0 || self.batch.max_in_flight == 0 {
            bad.push("batch limits must allow at least 1 KiB, 1 call and 1 batch in flight");
        }
        if self.bulk_chunk_bytes < 4096 || self.bulk_parallel == 0 {
            bad.push("bulk chunks must be at least 4 KiB with at least 1 stream");
        }
        if self.download_piece_bytes < 1 << 20 {
            bad.push("download_piece_bytes must be at least 1 MiB");
        }
        if self.keep_alive >= self.idle_timeout {
            bad.push("keep_alive must be shorter than idle_timeout");
        }
        if self.max_udp_payload < 1200 {
            bad.push("max_udp_payload must be at least 1200 (QUIC's minimum)");
        }
        if self.shm_region_bytes != 0 && !(4096..=1 << 30).contains(&self.shm_region_bytes) {
            bad.push("shm_region_bytes must be 0 (off) or from 4 KiB to 1 GiB");
        }
        if self.rdma.enabled && !(1 << 20..=1 << 30).contains(&self.rdma.region_bytes) {
            bad.push("rdma.region_bytes must be from 1 MiB to 1 GiB");
        }
        if let Trust::Fingerprint(f) = &self.trust
            && (f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            bad.push("the certificate fingerprint must be 64 hex digits (SHA-256)");
        }
        if bad.is_empty() { Ok(()) } else { Err(bad.join("; ")) }
    }
}
