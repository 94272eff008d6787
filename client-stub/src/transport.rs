//! Transports carry frames between the client core and a gpu-server.
//!
//! [`Transport`] is the small surface the session needs: an ordered command
//! stream (batches out, replies in) and bulk transfers. [`QuicTransport`] is
//! the default implementation; it owns a small tokio runtime so the blocking,
//! CUDA-shaped API above it works from any thread, async ones included.

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use bytes::Bytes;
use gpupool_proto::frame::{self, FrameDecoder};
use gpupool_proto::payload::{self, Compression};
use gpupool_proto::pool::BufferPool;
use gpupool_proto::replay::{ReplayLimit, ReplayLog};
use gpupool_proto::{PROTOCOL_VERSION, close_code, quic, v1};
use prost::Message;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

/// Which way [`Transport::pinned_copy`] copies.
#[derive(Debug)]
pub enum PinnedCopy<'a> {
    /// Into the pinned memory.
    In(&'a [u8]),
    /// Out of it.
    Out(&'a mut [u8]),
}

/// What a session needs from a transport.
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// The server's answer to the handshake.
    fn welcome(&self) -> &v1::Welcome;
    /// Sends a batch on the command stream; returns once it is on its way.
    fn send_batch(&self, batch: &v1::Batch) -> Result<()>;
    /// The next reply on the command stream.
    fn recv_reply(&self) -> Result<v1::BatchReply>;
    /// The next reply if it has already arrived, without waiting. A
    /// connection failure is left for [`Self::recv_reply`] to meet (and
    /// recover from).
    fn try_recv_reply(&self) -> Option<Result<v1::BatchReply>> {
        None
    }
    /// Uploads `data` as staged transfer `id`.
    fn bulk_put(&self, id: u64, data: &[u8]) -> Result<()>;
    /// Downloads staged transfer `id` into `out` (its whole size).
    fn bulk_get(&self, id: u64, out: &mut [u8]) -> Result<()>;
    /// Ends the session.
    fn close(&self);
    /// Ends the session from a thread that may have no runtime context any
    /// more (process exit), waiting up to `limit` for the close to leave.
    fn close_at_exit(&self, _limit: Duration) {
        self.close();
    }
    /// Extra connections open for bulk transfers (0: they share the
    /// command connection).
    fn bulk_connections(&self) -> usize {
        0
    }
    /// Bytes copied through a shared-memory region with the server so far;
    /// `None` when copies do not go through one (not offered, not on the
    /// server's host, turned off, or its channel failed).
    fn shared_memory_bytes(&self) -> Option<u64> {
        None
    }
    /// `size` bytes of pinned host memory in a host region shared with the
    /// server (its address), when there is a shared-memory attachment and
    /// room within its bound; `None`: the caller gives plain memory.
    fn pinned_alloc(&self, _size: usize) -> Option<usize> {
        None
    }
    /// Frees memory from [`Self::pinned_alloc`]; false when `ptr` is not
    /// such memory.
    fn pinned_free(&self, _ptr: usize) -> bool {
        false
    }
    /// Copies between `len` bytes of pinned memory at `addr` (from
    /// [`Self::pinned_alloc`]) and this process's memory.
    fn pinned_copy(&self, addr: usize, len: usize, _copy: PinnedCopy<'_>) -> Result<()> {
        Err(ClientError::InvalidValue(format!("[{addr:#x}, +{len}) is not pinned memory of this session")))
    }
    /// Whether `ptr` is a block from [`Self::pinned_alloc`] (also after
    /// the shared memory stopped).
    fn is_pinned(&self, _ptr: usize) -> bool {
        false
    }
    /// Whether `[ptr, ptr + len)` is pinned memory the server maps at the
    /// same address, which the device reaches there: the program may use
    /// the pointer as a device address.
    fn pinned_device_addressable(&self, _ptr: usize, _len: usize) -> bool {
        false
    }
    /// Where `[ptr, ptr + len)` lies in a host region the server maps, when
    /// it does and copies may name it instead of carrying its bytes. `batch`:
    /// the batch a call naming it goes in (`None`: only asking whether the
    /// server maps it); a transport whose server may revoke the regions
    /// (a session about to move) notes it and answers `None` once revoked.
    fn host_region(&self, _ptr: usize, _len: usize, _batch: Option<u64>) -> Option<v1::HostRegionRef> {
        None
    }
    /// Whether the session's commands and copies go over RDMA now.
    fn rdma_attached(&self) -> bool {
        false
    }
    /// Whether the session's commands go through a command ring in shared
    /// memory now (`crate::shm_commands`).
    fn shm_commands_attached(&self) -> bool {
        false
    }
}

/// Frames larger than this are refused from the server.
pub(crate) const MAX_REPLY_FRAME: usize = 64 << 20;

#[derive(Debug)]
struct CommandStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

/// A session over one QUIC connection (two when the session runs in a
/// worker process), replaced by new ones when the session is resumed.
#[derive(Debug)]
pub struct QuicTransport {
    /// Always `Some` until drop, which takes it to shut it down safely.
    rt: Option<tokio::runtime::Runtime>,
    endpoint: quinn::Endpoint,
    links: std::sync::Mutex<Links>,
    cmd: Arc<Mutex<CommandStream>>,
    welcome: v1::Welcome,
    /// The session's extra bulk connections, when the server offered them.
    bulk: Option<BulkLinks>,
    chunk: usize,
    parallel: Arc<Semaphore>,
    /// Buffers for chunks on their way, reused from copy to copy.
    buffers: Arc<BufferPool>,
    compression: Compression,
    reply_timeout: Duration,
    /// How to reattach; `None` when the server keeps no lost sessions.
    resume: Option<std::sync::Mutex<ResumeInfo>>,
    /// Set once the session migrated, until its bulk connections attach to
    /// the new server's ports: meanwhile copies use the session's connection.
    migrated: std::sync::atomic::AtomicBool,
    /// Batches sent whose replies have not arrived (kept for a resume), and
    /// the sequence number of the last reply received.
    replay: Arc<std::sync::Mutex<ReplayLog>>,
    /// Resumes so far, counted under the replay log's lock as the batches
    /// to send again are taken from it: another command path (the
    /// shared-memory ring) is dead once this moved (`record_unless_resumed`).
    resumes: Arc<std::sync::atomic::AtomicU64>,
    /// Keeps the I/O thread awake after a send, when configured.
    awake: Option<Arc<KeepAwake>>,
    /// Bulk copies through shared memory, when the server shares this host.
    shm: Option<crate::shm::ShmBulk>,
}

/// Keeps the I/O thread from sleeping for a while after the program began
/// to wait for a reply (`ClientConfig::io_spin`). A sleeping I/O thread
/// costs a synchronizing call two wake-ups through the kernel: the reply's
/// packet wakes it from epoll, and the next batch's send wakes it through
/// an eventfd (several microseconds each with cold caches, more on an idle
/// virtual CPU: bench/results/*-stub-time.md). A task on the I/O runtime
/// yields in a loop until `spin` has passed since the last wait began; the
/// worker thread then stays busy polling its I/O driver between turns, and
/// a wake from another thread only queues the woken task. Sends without a
/// wait (a stream of launches) do not keep it awake: there the sleeping
/// thread lets the batches that came meanwhile leave together.
#[derive(Debug)]
struct KeepAwake {
    spin: Duration,
    base: std::time::Instant,
    /// Nanoseconds after `base` until which the task keeps running.
    until: std::sync::atomic::AtomicU64,
    running: std::sync::atomic::AtomicBool,
}

impl KeepAwake {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// After a send: extends the deadline and starts the task if it is not
    /// running.
    fn poke(self: &Arc<Self>, rt: &tokio::runtime::Runtime) {
        use std::sync::atomic::Ordering;
        let spin = u64::try_from(self.spin.as_nanos()).unwrap_or(u64::MAX);
        self.until.store(self.now().saturating_add(spin), Ordering::Release);
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        rt.spawn(async move {
            loop {
                if me.now() >= me.until.load(Ordering::Acquire) {
                    me.running.store(false, Ordering::Release);
                    // A send may have extended the deadline while `running`
                    // was still set: take over again then.
                    if me.now() < me.until.load(Ordering::Acquire) && !me.running.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
    }
}

/// The connections of a session.
#[derive(Debug, Clone)]
struct Links {
    /// The server's connection when the session runs in a worker process:
    /// it closes with the reason when the worker fails.
    control: Option<quinn::Connection>,
    conn: quinn::Connection,
}

impl Links {
    /// Whether the session's connections were lost (idle timeout, reset)
    /// rather than closed by the server: then the server may still keep it.
    fn lost(&self) -> bool {
        let lost = |c: &quinn::Connection| {
            matches!(c.close_reason(), Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset))
        };
        let closed_by_server =
            |c: &quinn::Connection| matches!(c.close_reason(), Some(quinn::ConnectionError::ApplicationClosed(_)));
        let control_closed = self.control.as_ref().is_some_and(closed_by_server);
        !control_closed && (lost(&self.conn) || self.control.as_ref().is_some_and(lost))
    }
}

/// A session's extra bulk connections: one endpoint (UDP socket) each, all
/// driven by a runtime of their own with a thread per connection, so that
/// a copy's chunks are encrypted, sent and received on several cores.
#[derive(Debug)]
struct BulkLinks {
    /// Always `Some` until drop.
    rt: Option<tokio::runtime::Runtime>,
    endpoints: Vec<quinn::Endpoint>,
    conns: std::sync::Mutex<Vec<quinn::Connection>>,
    name: String,
    /// Where they attach: the session's server, or the one it migrated to.
    target: std::sync::Mutex<BulkTarget>,
    connect_timeout: Duration,
    /// When new connections were last attached for lost ones.
    reattached: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Least time between two attempts to replace lost bulk connections.
const BULK_REATTACH_EVERY: Duration = Duration::from_secs(5);

/// The server's host, its bulk ports and the session's attachment.
#[derive(Debug, Clone)]
struct BulkTarget {
    host: std::net::IpAddr,
    ports: Vec<u16>,
    attach: v1::BulkAttach,
    /// The QUIC configuration pinning the server the session migrated to
    /// (`None`: the endpoints' own, the first server's).
    quic: Option<quinn::ClientConfig>,
}

impl BulkLinks {
    /// Opens `wanted` bulk connections (at most one per port offered in
    /// `welcome`) to `host`; `None` when none is offered or wanted, or when
    /// they cannot be opened (copies then use the session's connection).
    fn open(
        config: &ClientConfig,
        qc: &quinn::ClientConfig,
        host: std::net::IpAddr,
        welcome: &v1::Welcome,
    ) -> Option<Self> {
        let n = config.bulk_connections.min(welcome.bulk_ports.len());
        if n == 0 || welcome.bulk_secret.is_empty() {
            return None;
        }
        let ports: Vec<u16> = welcome.bulk_ports.iter().take(n).filter_map(|&p| u16::try_from(p).ok()).collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .thread_name("gpupool-bulk-io")
            .enable_all()
            .build()
            .ok()?;
        let bind: SocketAddr =
            if host.is_ipv6() { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() } else { ([0, 0, 0, 0], 0).into() };
        let endpoints: std::io::Result<Vec<quinn::Endpoint>> = {
            let _inside = rt.enter();
            ports
                .iter()
                .map(|_| {
                    let mut e = quic::endpoint(quic::bind_udp(bind)?, config.max_udp_payload, None)?;
                    e.set_default_client_config(qc.clone());
                    Ok(e)
                })
                .collect()
        };
        let endpoints = match endpoints {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "no bulk connections: cannot bind their sockets");
                rt.shutdown_background();
                return None;
            }
        };
        let attach = v1::BulkAttach { session_id: welcome.session_id, secret: welcome.bulk_secret.clone(), index: 0 };
        let links = Self {
            rt: Some(rt),
            endpoints,
            conns: std::sync::Mutex::new(Vec::new()),
            name: config.server_name.clone(),
            target: std::sync::Mutex::new(BulkTarget { host, ports, attach, quic: None }),
            connect_timeout: config.connect_timeout,
            reattached: std::sync::Mutex::new(None),
        };
        match links.connect(config.connect_timeout) {
            Ok(()) => Some(links),
            Err(e) => {
                tracing::warn!(error = %e, "no bulk connections; copies use the session's connection");
                None
            }
        }
    }

    /// Points them at the server a session migrated to, when its `welcome`
    /// offers bulk ports (as many as there are endpoints at most); false
    /// when it offers none (copies then use the session's connection).
    fn retarget(&self, host: std::net::IpAddr, welcome: &v1::Welcome, quic: Option<quinn::ClientConfig>) -> bool {
        if welcome.bulk_ports.is_empty() || welcome.bulk_secret.is_empty() {
            return false;
        }
        let ports = welcome.bulk_ports.iter().take(self.endpoints.len()).filter_map(|&p| u16::try_from(p).ok());
        let attach = v1::BulkAttach { session_id: welcome.session_id, secret: welcome.bulk_secret.clone(), index: 0 };
        let target = BulkTarget { host, ports: ports.collect(), attach, quic };
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
        true
    }

    /// (Re)attaches one connection per bulk port, all at once.
    fn connect(&self, timeout: Duration) -> Result<()> {
        let rt = self.rt.as_ref().ok_or_else(|| ClientError::ConnectionLost("session closed".into()))?;
        let target = self.target.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut attempts = Vec::new();
        for (i, (endpoint, &port)) in self.endpoints.iter().zip(&target.ports).enumerate() {
            let hello = v1::Hello {
                protocol_version: PROTOCOL_VERSION,
                client_build: concat!("gpupool-client ", env!("CARGO_PKG_VERSION")).into(),
                token: String::new(),
                resume: None,
                bulk: Some(v1::BulkAttach { index: i as u32, ..target.attach.clone() }),
                migrate: None,
                rdma: None,
            };
            let mut endpoint = endpoint.clone();
            if let Some(quic) = &target.quic {
                // A clone shares the socket; only its default differs.
                endpoint.set_default_client_config(quic.clone());
            }
            let (addr, name) = (SocketAddr::new(target.host, port), self.name.clone());
            attempts.push(rt.spawn(async move {
                let (conn, _, _) =
                    tokio::time::timeout(timeout, open_session(&endpoint, addr, &name, &hello)).await.map_err(
                        |_| ClientError::Connect(format!("no bulk connection to {addr} within {timeout:?}")),
                    )??;
                Ok::<_, ClientError>(conn)
            }));
        }
        let conns = run_on(rt, async move {
            let mut conns = Vec::new();
            for attempt in attempts {
                conns.push(attempt.await.map_err(|e| ClientError::Connect(e.to_string()))??);
            }
            Ok(conns)
        })?;
        *self.conns.lock().unwrap_or_else(|e| e.into_inner()) = conns;
        Ok(())
    }

    /// Whether a new attempt to attach may be made now (at most one every
    /// [`BULK_REATTACH_EVERY`], so that a server that refuses them is not
    /// asked at every copy).
    fn may_reattach(&self) -> bool {
        let mut last = self.reattached.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < BULK_REATTACH_EVERY) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }

    /// Whether one of the bulk connections attached is closed or lost.
    fn lost_some(&self) -> bool {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|c| c.close_reason().is_some())
    }

    /// The bulk connections still open (none: use the session's).
    fn open_conns(&self) -> Vec<quinn::Connection> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.iter().filter(|c| c.close_reason().is_none()).cloned().collect()
    }

    fn close(&self) {
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let stats = c.stats();
            tracing::debug!(
                lost = stats.path.lost_packets,
                sent = stats.path.sent_packets,
                congestion_events = stats.path.congestion_events,
                cwnd = stats.path.cwnd,
                mtu = stats.path.current_mtu,
                "bulk connection closing"
            );
            c.close(close_code::NORMAL.into(), b"client closed the session");
        }
    }
}

impl Drop for BulkLinks {
    fn drop(&mut self) {
        self.close();
        if let Some(rt) = self.rt.take() {
            // Dropping a runtime inside another one would panic.
            rt.shutdown_background();
        }
    }
}

/// How long the client waits for the connection's close after the server
/// ended the command stream.
const STREAM_END_TO_CLOSE: Duration = Duration::from_secs(2);

/// What reattaching to a session takes; where, changed when the session
/// migrated to another server.
#[derive(Debug, Clone)]
struct ResumeInfo {
    server: SocketAddr,
    name: String,
    hello: v1::Hello,
    session_id: u64,
    secret: String,
    source: crate::config::TokenSource,
    connect_timeout: Duration,
    /// The session's configuration, for the QUIC configuration of a server
    /// it migrates to.
    config: ClientConfig,
    /// The QUIC configuration pinning the server it migrated to, if it did.
    quic: Option<quinn::ClientConfig>,
    /// The token the session's old server handed over with the move, for
    /// the first reattachment after it.
    moved_token: Option<String>,
}

impl ResumeInfo {
    /// Follows the session to where `moved` says it runs now.
    fn follow(&mut self, moved: v1::Moved) -> Result<()> {
        let server: SocketAddr = moved.address.parse().map_err(|_| {
            ClientError::Protocol(format!("the session moved to an unusable address {:?}", moved.address))
        })?;
        let config = ClientConfig {
            server,
            server_name: moved.server_name.clone(),
            trust: crate::config::Trust::Fingerprint(moved.cert_sha256.clone()),
            ..self.config.clone()
        };
        self.quic = Some(quinn_client_config(&config)?);
        self.server = server;
        self.name = moved.server_name;
        // The token handed over names the new server. A renewed lease
        // (the token source) names it too once the balancer renewed it
        // after the move; until then this one opens the door.
        self.hello.token.clone_from(&moved.token);
        self.moved_token = Some(moved.token);
        self.session_id = moved.session_id;
        self.secret = moved.resume_secret;
        Ok(())
    }
}

/// Where the session went when its connection was closed because it
/// migrated (`None`: it did not; an empty address: it stays, resume here).
fn moved(links: &Links) -> Option<v1::Moved> {
    use prost::Message;
    match links.conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code.into_inner() == u64::from(close_code::MIGRATED) =>
        {
            v1::Moved::decode(&c.reason[..]).ok()
        }
        _ => None,
    }
}

/// Maps a connection failure to the client's error.
fn lost(e: &quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            let code = c.error_code.into_inner() as u32;
            if code == close_code::SHUTDOWN {
                ClientError::ConnectionLost(format!("server shut down: {reason}"))
            } else if code == close_code::WORKER_EXITED {
                ClientError::ConnectionLost(format!("the session's worker process failed: {reason}"))
            } else if code == close_code::NORMAL {
                ClientError::ConnectionLost(format!("session closed: {reason}"))
            } else {
                ClientError::Refused { code, reason }
            }
        }
        quinn::ConnectionError::TimedOut => {
            ClientError::ConnectionLost("no answer from the server within the idle timeout".into())
        }
        quinn::ConnectionError::Reset => {
            ClientError::ConnectionLost("the server no longer knows this connection (restarted?)".into())
        }
        other => ClientError::ConnectionLost(other.to_string()),
    }
}

fn write_err(e: quinn::WriteError) -> ClientError {
    match e {
        quinn::WriteError::ConnectionLost(c) => lost(&c),
        other => ClientError::ConnectionLost(other.to_string()),
    }
}

fn read_err(e: quinn::ReadError) -> ClientError {
    match e {
        quinn::ReadError::ConnectionLost(c) => lost(&c),
        other => ClientError::ConnectionLost(other.to_string()),
    }
}

/// Reads the next frame from the command stream.
async fn next_frame(cmd: &mut CommandStream) -> Result<Bytes> {
    loop {
        if let Some(f) = cmd.decoder.next_frame().map_err(|e| ClientError::Protocol(e.to_string()))? {
            return Ok(f);
        }
        match cmd.recv.read_chunk(1 << 20, true).await.map_err(read_err)? {
            Some(chunk) => cmd.decoder.push(&chunk.bytes),
            None => {
                cmd.decoder.finish().map_err(|e| ClientError::Protocol(e.to_string()))?;
                return Err(ClientError::ConnectionLost("the server ended the command stream".into()));
            }
        }
    }
}

/// Bytes of a bulk frame besides its chunk (header and request fields).
const BULK_HEADROOM: usize = 64 << 10;

/// One request on its own bulk stream and its response, at most `max`
/// bytes, as received. A lost connection is named in the error (a bulk
/// connection can time out while the session's own connection still
/// stands, and the two read alike otherwise).
async fn bulk_request(conn: &quinn::Connection, req: [Bytes; 2], max: usize) -> Result<BulkReply> {
    bulk_exchange(conn, req, max).await.map_err(|e| match e {
        ClientError::ConnectionLost(why) => {
            ClientError::ConnectionLost(format!("bulk connection to {}: {why}", conn.remote_address()))
        }
        other => other,
    })
}

async fn bulk_exchange(conn: &quinn::Connection, mut req: [Bytes; 2], max: usize) -> Result<BulkReply> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    send.write_all_chunks(&mut req).await.map_err(write_err)?;
    let _ = send.finish();
    // The chunks as QUIC delivered them, not copied together: a download's
    // bytes are copied once, from them to where they go.
    let mut reply = BulkReply { chunks: Vec::new(), len: 0 };
    while let Some(chunk) = recv.read_chunk(max - reply.len, true).await.map_err(read_err)? {
        reply.len += chunk.bytes.len();
        reply.chunks.push(chunk.bytes);
        if reply.len == max && recv.read_chunk(1, true).await.map_err(read_err)?.is_some() {
            return Err(ClientError::Protocol("bulk response too long".into()));
        }
    }
    Ok(reply)
}

/// A bulk response: one frame, the whole stream, in the chunks it arrived in.
#[derive(Debug)]
struct BulkReply {
    chunks: Vec<Bytes>,
    len: usize,
}

impl BulkReply {
    /// The response's bytes in one piece: its one chunk as it arrived, or
    /// its chunks joined; with `buffers`, in a buffer from that pool for up
    /// to `max` bytes (for a download's chunk, a reused one with its pages
    /// already backed, however well the chunk compressed).
    fn joined(self, max: usize, buffers: Option<&Arc<BufferPool>>) -> Result<Bytes> {
        match <[Bytes; 1]>::try_from(self.chunks) {
            Ok([one]) => Ok(one),
            Err(chunks) => match buffers {
                Some(pool) => {
                    let mut buf = pool
                        .take(max.max(self.len))
                        .ok_or_else(|| ClientError::Protocol(format!("cannot allocate {max} bytes")))?;
                    for c in &chunks {
                        buf.extend_from_slice(c);
                    }
                    Ok(buf.freeze())
                }
                None => Ok(Bytes::from(chunks.concat())),
            },
        }
    }

    /// The response decoded: its payload, or the error it carries.
    fn payload(self, max: usize, buffers: Option<&Arc<BufferPool>>) -> Result<Option<v1::Payload>> {
        let bytes = self.joined(max, buffers)?;
        let header = bytes.get(..frame::HEADER_LEN).and_then(|h| <[u8; frame::HEADER_LEN]>::try_from(h).ok());
        let header = header.ok_or_else(|| ClientError::Protocol("bulk response truncated".into()))?;
        let len = frame::decode_header(header, max).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if bytes.len() != frame::HEADER_LEN + len {
            return Err(ClientError::Protocol("bulk response truncated".into()));
        }
        let resp = v1::BulkResponse::decode(bytes.slice(frame::HEADER_LEN..))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Some(e) = resp.error {
            return Err(ClientError::Cuda { code: e.code, message: e.message });
        }
        Ok(resp.data)
    }

    /// The `size` bytes of data a get response carries, as slices of the
    /// received chunks where they end the frame uncompressed (the server
    /// writes them so), else decoded from the whole frame.
    fn data(self, size: usize, buffers: &Arc<BufferPool>) -> Result<Vec<Bytes>> {
        let mut head = Vec::with_capacity(frame::BULK_RESPONSE_HEAD);
        for c in &self.chunks {
            if head.len() >= frame::BULK_RESPONSE_HEAD {
                break;
            }
            head.extend_from_slice(&c[..c.len().min(frame::BULK_RESPONSE_HEAD - head.len())]);
        }
        let Some(range) = frame::bulk_response_data(&head, self.len).filter(|r| r.len() == size) else {
            let p = self
                .payload(size + BULK_HEADROOM, Some(buffers))?
                .ok_or_else(|| ClientError::Protocol("bulk get without data".into()))?;
            let bytes = payload::decode(p, size as u64).map_err(|e| ClientError::Protocol(e.to_string()))?;
            if bytes.len() != size {
                return Err(ClientError::Protocol(format!("bulk chunk of {} bytes, wanted {size}", bytes.len())));
            }
            return Ok(vec![bytes]);
        };
        let mut at = 0;
        let mut out = Vec::with_capacity(self.chunks.len());
        for c in self.chunks {
            let (from, to) = (at, at + c.len());
            at = to;
            let (lo, hi) = (from.max(range.start), to.min(range.end));
            if lo < hi {
                out.push(c.slice(lo - from..hi - from));
            }
        }
        Ok(out)
    }
}

/// Connects to `addr`, sends `hello` and reads the `Welcome`.
async fn open_session(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    name: &str,
    hello: &v1::Hello,
) -> Result<(quinn::Connection, CommandStream, v1::Welcome)> {
    let conn =
        endpoint.connect(addr, name).map_err(|e| ClientError::Connect(e.to_string()))?.await.map_err(|e| match e {
            quinn::ConnectionError::TimedOut => ClientError::Connect(format!("no answer from {addr}")),
            other => ClientError::Connect(other.to_string()),
        })?;
    let (mut send, recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    send.write_all(&frame::encode(hello)).await.map_err(write_err)?;
    let mut cmd = CommandStream { send, recv, decoder: FrameDecoder::new(MAX_REPLY_FRAME) };
    let body = match next_frame(&mut cmd).await {
        Ok(b) => b,
        // A refusal closes the connection; report its reason.
        Err(e) => return Err(conn.close_reason().map(|c| lost(&c)).unwrap_or(e)),
    };
    let welcome = v1::Welcome::decode(body).map_err(|e| ClientError::Protocol(format!("bad Welcome: {e}")))?;
    Ok((conn, cmd, welcome))
}

/// Runs `fut` on `rt` and waits for it, from any thread: inside another
/// runtime `block_on` would panic, so the future is handed over instead.
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        // At process exit (atexit handlers, such as CUDA runtime teardown
        // unloading modules) this thread's thread-locals, tokio's among
        // them, are gone: no runtime can be entered from here any more.
        Err(e) if e.is_thread_local_destroyed() => {
            return Err(ClientError::ConnectionLost("the process is exiting".into()));
        }
        Err(_) => return crate::wait::block_on_spinning(rt, fut, crate::wait::spin_budget()),
        Ok(_) => {}
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| ClientError::ConnectionLost("I/O runtime stopped".into()))?
}

/// The QUIC client configuration for `config`: TLS trust, timeouts, windows
/// and datagram size.
pub fn quinn_client_config(config: &ClientConfig) -> Result<quinn::ClientConfig> {
    let tls = crate::tls::client_config(&config.trust)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Config(format!("TLS configuration unusable for QUIC: {e}")))?;
    let mut qc = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(config.idle_timeout).map_err(|e| ClientError::Config(e.to_string()))?,
    ));
    t.keep_alive_interval(Some(config.keep_alive));
    t.stream_receive_window(quinn::VarInt::from_u32(32 << 20));
    t.receive_window(quinn::VarInt::from_u32(256 << 20));
    t.send_window(256 << 20);
    t.mtu_discovery_config(quic::mtu_discovery(config.max_udp_payload));
    qc.transport_config(Arc::new(t));
    Ok(qc)
}

/// Opens the session's connections: to `server`, then, when the server
/// redirects, to its worker process with the ticket.
async fn handshake(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    name: &str,
    hello: &v1::Hello,
) -> Result<(Links, CommandStream, v1::Welcome)> {
    let (conn, cmd, welcome) = open_session(endpoint, server, name, hello).await?;
    let Some(redirect) = welcome.redirect.clone() else {
        return Ok((Links { control: None, conn }, cmd, welcome));
    };
    // The session runs in a worker process: this connection becomes the
    // control connection.
    let port = u16::try_from(redirect.port)
        .map_err(|_| ClientError::Protocol(format!("redirect to port {}", redirect.port)))?;
    let worker = SocketAddr::new(server.ip(), port);
    let hello = v1::Hello { token: redirect.ticket, ..hello.clone() };
    let (data, cmd, welcome) = open_session(endpoint, worker, name, &hello).await?;
    if welcome.redirect.is_some() {
        return Err(ClientError::Protocol("redirected twice".into()));
    }
    Ok((Links { control: Some(conn), conn: data }, cmd, welcome))
}

impl QuicTransport {
    /// Connects, presents the token and waits for the server's `Welcome`.
    pub fn connect(config: &ClientConfig) -> Result<Self> {
        Self::connect_with(config, None)
    }

    /// [`Self::connect`] with an RDMA offer in the `Hello` (`crate::rdma`).
    pub(crate) fn connect_with(config: &ClientConfig, rdma: Option<v1::RdmaOffer>) -> Result<Self> {
        config.validate().map_err(ClientError::Config)?;
        // One I/O thread: quinn's endpoint and connection drivers then wake
        // each other without crossing threads (sync round trip 100 µs
        // against 119 µs with two, H200, bench/results/*-io-threads.md).
        // Multi-thread all the same, so that it runs while the caller is
        // not waiting in `block_on`.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gpupool-io")
            .enable_all()
            .build()
            .map_err(|e| ClientError::Connect(format!("cannot start the I/O runtime: {e}")))?;
        let qc = quinn_client_config(config)?;
        let bind: std::net::SocketAddr = if config.server.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }
            .map_err(|_| ClientError::Config("bad bind address".into()))?;
        let server = config.server;
        let name = config.server_name.clone();
        let hello = v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_build: concat!("gpupool-client ", env!("CARGO_PKG_VERSION")).into(),
            token: config.token.clone(),
            resume: None,
            bulk: None,
            migrate: None,
            rdma,
        };
        let timeout = config.connect_timeout;
        let max_udp_payload = config.max_udp_payload;
        let first = hello.clone();
        let connected = run_on(&rt, async move {
            let socket = quic::bind_udp(bind).map_err(|e| ClientError::Connect(format!("cannot bind {bind}: {e}")))?;
            let mut endpoint =
                quic::endpoint(socket, max_udp_payload, None).map_err(|e| ClientError::Connect(e.to_string()))?;
            endpoint.set_default_client_config(qc);
            let (links, cmd, welcome) = tokio::time::timeout(timeout, handshake(&endpoint, server, &name, &first))
                .await
                .map_err(|_| ClientError::Connect(format!("no session with {server} within {timeout:?}")))??;
            Ok::<_, ClientError>((endpoint, links, cmd, welcome))
        });
        let (endpoint, links, cmd, welcome) = match connected {
            Ok(v) => v,
            Err(e) => {
                // Dropping a runtime inside another one would panic.
                rt.shutdown_background();
                return Err(e);
            }
        };
        // Large datagrams on bulk connections to a loopback server.
        let bulk_config = ClientConfig {
            max_udp_payload: quic::bulk_udp_payload(server.ip(), config.max_udp_payload),
            ..config.clone()
        };
        let bulk = BulkLinks::open(&bulk_config, &quinn_client_config(&bulk_config)?, server.ip(), &welcome);
        let shm = attach_shm(config, &welcome);
        let resume = (config.resume && !welcome.resume_secret.is_empty()).then(|| ResumeInfo {
            server,
            name: config.server_name.clone(),
            hello,
            session_id: welcome.session_id,
            secret: welcome.resume_secret.clone(),
            source: config.token_source.clone(),
            connect_timeout: config.connect_timeout,
            config: config.clone(),
            quic: None,
            moved_token: None,
        });
        Ok(Self {
            rt: Some(rt),
            endpoint,
            links: std::sync::Mutex::new(links),
            cmd: Arc::new(Mutex::new(cmd)),
            welcome,
            bulk,
            chunk: config.bulk_chunk_bytes,
            parallel: Arc::new(Semaphore::new(config.bulk_parallel)),
            // Room for a chunk and its frame header; as many as can be in
            // flight, and the one being filled.
            buffers: BufferPool::new(config.bulk_chunk_bytes + BULK_HEADROOM, config.bulk_parallel + 1),
            compression: if config.compression { Compression::Auto } else { Compression::Off },
            reply_timeout: config.reply_timeout,
            resume: resume.map(std::sync::Mutex::new),
            migrated: std::sync::atomic::AtomicBool::new(false),
            // The client has at most its in-flight batches unanswered.
            replay: Arc::new(std::sync::Mutex::new(ReplayLog::new(ReplayLimit::UNBOUNDED))),
            resumes: Arc::default(),
            awake: (!config.io_spin.is_zero()).then(|| {
                Arc::new(KeepAwake {
                    spin: config.io_spin,
                    base: std::time::Instant::now(),
                    until: std::sync::atomic::AtomicU64::new(0),
                    running: std::sync::atomic::AtomicBool::new(false),
                })
            }),
            shm,
        })
    }

    /// Attaches a command ring to the session's shared-memory attachment
    /// (`crate::shm_commands`); `None` without a live attachment.
    pub(crate) fn attach_shm_commands(
        &self,
        capacity: u64,
    ) -> Option<std::result::Result<Arc<gpupool_shm::ring::Ring>, gpupool_shm::ShmError>> {
        let shm = self.shm.as_ref().filter(|s| s.live())?;
        Some(shm.attach_commands(capacity))
    }

    /// Resumes of the session so far.
    pub(crate) fn resumes(&self) -> u64 {
        self.resumes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Keeps a batch's frame for a resume, unless the session resumed since
    /// `resumes` (false): checked under the replay log's lock, so a batch
    /// kept here is one a resume sends again, and one refused must go over
    /// QUIC (its other command path is dead).
    pub(crate) fn record_unless_resumed(&self, seq: u64, frame: Bytes, resumes: u64) -> bool {
        let mut log = self.replay();
        if self.resumes.load(std::sync::atomic::Ordering::SeqCst) != resumes {
            return false;
        }
        if self.resume.is_some() {
            log.record(seq, frame);
        }
        true
    }

    /// Keeps a batch's frame for a resume (when resumption is on).
    pub(crate) fn record(&self, seq: u64, frame: Bytes) {
        if self.resume.is_some() {
            self.replay().record(seq, frame);
        }
    }

    /// After the session's other attachment (RDMA) was lost: waits up to
    /// the connect timeout for the server to close the QUIC connection
    /// (it says where to resume: here), then resumes the session on QUIC.
    pub(crate) fn recover_lost_attachment(&self, error: ClientError) -> Result<()> {
        if let Some(rt) = &self.rt {
            let (conn, limit) = (self.links().conn, self.resume_wait());
            let _ = run_on(rt, async move {
                let _ = tokio::time::timeout(limit, conn.closed()).await;
                Ok(())
            });
        }
        self.recover(error)
    }

    fn resume_wait(&self) -> Duration {
        self.resume.as_ref().map_or(Duration::ZERO, |r| r.lock().unwrap_or_else(|e| e.into_inner()).connect_timeout)
    }

    /// Decodes a reply frame and acknowledges it in the replay log; `None`
    /// for a reply already delivered. A resume on QUIC replays the replies
    /// after the last one acknowledged when it began, and a thread may
    /// have read one of them from the command ring meanwhile: whichever
    /// path delivers a reply second drops it (the check and the
    /// acknowledgement are one step under the log's lock).
    pub(crate) fn reply_of(&self, body: Bytes) -> Result<Option<v1::BatchReply>> {
        let reply = v1::BatchReply::decode(body).map_err(|e| ClientError::Protocol(format!("bad reply: {e}")))?;
        if reply.seq != 0 && !self.replay().ack_new(reply.seq) {
            tracing::debug!(seq = reply.seq, "a reply delivered before came again; dropped");
            return Ok(None);
        }
        Ok(Some(reply))
    }

    fn links(&self) -> Links {
        self.links.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replay(&self) -> std::sync::MutexGuard<'_, ReplayLog> {
        self.replay.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `fut` on the I/O runtime and waits for it, from any thread. A
    /// closed control connection (the worker failed) ends the wait with its
    /// reason.
    fn exec<T: Send + 'static>(&self, fut: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        let rt = self.rt.as_ref().ok_or_else(|| ClientError::ConnectionLost("session closed".into()))?;
        self.exec_on(rt, fut)
    }

    /// [`Self::exec`] on runtime `rt`.
    fn exec_on<T: Send + 'static>(
        &self,
        rt: &tokio::runtime::Runtime,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        run_on(rt, self.bounded(fut))
    }

    /// `fut` ended by the reply timeout, or by a closed control connection
    /// (the worker failed) with its reason.
    fn bounded<T, F: Future<Output = Result<T>>>(&self, fut: F) -> impl Future<Output = Result<T>> + use<T, F> {
        let (limit, control) = (self.reply_timeout, self.links().control);
        async move {
            let failed = async {
                match control {
                    Some(c) => lost(&c.closed().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = tokio::time::timeout(limit, fut) => r.map_err(|_| ClientError::Timeout(limit))?,
                e = failed => Err(e),
            }
        }
    }

    /// Runs a bulk copy's future on the bulk connections' runtime with the
    /// connections to spread its chunks over; on the session's own
    /// connection and runtime when there are none.
    fn exec_bulk<T: Send + 'static, F: Future<Output = Result<T>> + Send + 'static>(
        &self,
        op: impl FnOnce(Vec<quinn::Connection>) -> F,
    ) -> Result<T> {
        if let Some(bulk) = &self.bulk
            && let Some(rt) = &bulk.rt
        {
            let conns = bulk.open_conns();
            if !conns.is_empty() {
                return self.exec_on(rt, op(conns));
            }
        }
        self.exec(op(vec![self.links().conn]))
    }

    /// [`Self::exec_bulk`] for a copy that borrows the caller's memory: the
    /// copy's own future runs on this thread (the connections' I/O on their
    /// runtime), so it may read from or write into the caller's buffer
    /// without a copy of all of it first. `None` where this thread cannot
    /// wait on the runtime (inside another runtime, or at process exit):
    /// the caller then takes the owned path.
    fn exec_bulk_here<'a, T, F: Future<Output = Result<T>> + 'a>(
        &self,
        op: impl FnOnce(Vec<quinn::Connection>) -> F,
    ) -> Option<Result<T>> {
        match tokio::runtime::Handle::try_current() {
            // No runtime here: this thread may wait on the bulk runtime.
            Err(e) if !e.is_thread_local_destroyed() => {}
            _ => return None,
        }
        // The open bulk connections, read once: one may close between two
        // reads, and an empty list has no connection to send on.
        let open = self.bulk.as_ref().filter(|b| b.rt.is_some()).map(|b| (b, b.open_conns()));
        let (rt, conns) = match open {
            Some((bulk, conns)) if !conns.is_empty() => (bulk.rt.as_ref()?, conns),
            _ => (self.rt.as_ref()?, vec![self.links().conn]),
        };
        let fut = self.bounded(op(conns));
        Some(crate::wait::block_on_spinning(rt, fut, crate::wait::spin_budget()))
    }

    /// Whether the session's own connections are open (neither closed by
    /// the server nor lost).
    pub(crate) fn links_open(&self) -> bool {
        let links = self.links();
        links.conn.close_reason().is_none() && links.control.as_ref().is_none_or(|c| c.close_reason().is_none())
    }

    /// After `error`: reattaches to the session when its connections were
    /// lost and the server keeps it, sending again the batches the server
    /// did not receive. Returns `error` when the session cannot be resumed,
    /// with the reason.
    fn recover(&self, error: ClientError) -> Result<()> {
        // Only bulk connections were lost (their server end went quiet or
        // closed) while the session's own connection is fine: attach new
        // ones and go again; when none can be attached, copies use the
        // session's connection.
        if matches!(error, ClientError::ConnectionLost(_))
            && let Some(bulk) = &self.bulk
            && !self.migrated.load(std::sync::atomic::Ordering::Acquire)
            && bulk.lost_some()
            && self.links_open()
            && bulk.may_reattach()
        {
            tracing::info!(reason = %error, "a bulk connection was lost; attaching new ones");
            if let Err(e) = bulk.connect(bulk.connect_timeout) {
                tracing::warn!(error = %e, "no new bulk connections; copies use the session's connection");
            }
            return Ok(());
        }
        let Some(resume) = &self.resume else { return Err(error) };
        let links = self.links();
        // A closed control connection already gave the reason (the worker
        // failed, or was ended with its MPS group): its own connection may
        // never close (a killed worker sends nothing), so do not wait for it.
        if matches!(error, ClientError::ConnectionLost(_))
            && links.conn.close_reason().is_none()
            && links.control.as_ref().is_none_or(|c| c.close_reason().is_none())
            && let Some(rt) = &self.rt
        {
            // The command stream ended (a session that migrates ends it
            // before it closes the connection with where it went): the
            // close is on its way.
            let conn = links.conn.clone();
            let _ = run_on(rt, async move {
                let _ = tokio::time::timeout(STREAM_END_TO_CLOSE, conn.closed()).await;
                Ok(())
            });
        }
        let moved = moved(&links);
        if !links.lost() && moved.is_none() {
            return Err(error);
        }
        let info = {
            let mut info = resume.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(moved) = moved.filter(|m| !m.address.is_empty()) {
                tracing::info!(to = %moved.address, session = moved.session_id, "the session migrated; following it");
                info.follow(moved)?;
                self.migrated.store(true, std::sync::atomic::Ordering::Release);
                if let Some(bulk) = &self.bulk {
                    bulk.close();
                }
                if let Some(shm) = &self.shm {
                    shm.close();
                }
            }
            let now = info.clone();
            info.moved_token = None;
            now
        };
        let acked_seq = self.replay().acked();
        let hello = v1::Hello {
            // After a move, a renewal naming the new server is fresher than
            // the token handed over with the move.
            token: match &info.moved_token {
                Some(moved) => info.source.current_for(&info.server.to_string()).unwrap_or_else(|| moved.clone()),
                None => info.source.current(&info.hello.token),
            },
            resume: Some(v1::Resume { session_id: info.session_id, secret: info.secret.clone(), acked_seq }),
            bulk: None,
            migrate: None,
            // A resumed session stays on QUIC.
            rdma: None,
            ..info.hello.clone()
        };
        tracing::info!(session = info.session_id, acked_seq, reason = %error, "connection lost; resuming the session");
        let (mut endpoint, server, name, timeout) =
            (self.endpoint.clone(), info.server, info.name.clone(), info.connect_timeout);
        if let Some(quic) = &info.quic {
            endpoint.set_default_client_config(quic.clone());
        }
        let (cmd, replay, resumes) = (self.cmd.clone(), self.replay.clone(), self.resumes.clone());
        let rt = self.rt.as_ref().ok_or_else(|| ClientError::ConnectionLost("session closed".into()))?;
        let resumed = run_on(rt, async move {
            // The outage may still be on: try again until the connect timeout.
            let deadline = tokio::time::Instant::now() + timeout;
            let (links, mut stream, welcome) = loop {
                let attempt = tokio::time::timeout_at(deadline, handshake(&endpoint, server, &name, &hello)).await;
                match attempt {
                    Err(_) => return Err(ClientError::Connect(format!("no answer from {server} within {timeout:?}"))),
                    Ok(Err(ClientError::Connect(e))) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(error = %e, "no answer yet; trying again");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(r) => break r?,
                }
            };
            if !welcome.resumed {
                return Err(ClientError::Protocol("the server answered a resume with a new session".into()));
            }
            // Batches the server never received go again, in order.
            let again = {
                let log = replay.lock().unwrap_or_else(|e| e.into_inner());
                resumes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                log.replay_after(welcome.resumed_seq)
            };
            for bytes in &again {
                stream.send.write_all(bytes).await.map_err(write_err)?;
            }
            *cmd.lock().await = stream;
            Ok((links, welcome, again.len()))
        });
        match resumed {
            Ok((links, welcome, resent)) => {
                *self.links.lock().unwrap_or_else(|e| e.into_inner()) = links;
                let resumed_seq = welcome.resumed_seq;
                tracing::info!(session = info.session_id, resumed_seq, resent, "session resumed");
                // The bulk connections were likely lost too; new ones
                // replace them (copies use the session's connection else).
                // After a move they attach to the new server's bulk ports.
                if let Some(bulk) = &self.bulk {
                    let moved = self.migrated.load(std::sync::atomic::Ordering::Acquire);
                    if moved && bulk.retarget(info.server.ip(), &welcome, info.quic.clone()) {
                        match bulk.connect(info.connect_timeout) {
                            Ok(()) => self.migrated.store(false, std::sync::atomic::Ordering::Release),
                            Err(e) => {
                                tracing::warn!(error = %e, "no bulk connections to the server the session moved to")
                            }
                        }
                    } else if !moved && let Err(e) = bulk.connect(info.connect_timeout) {
                        tracing::warn!(error = %e, "bulk connections not reattached");
                    }
                }
                Ok(())
            }
            Err(e) => Err(ClientError::ConnectionLost(format!("{error}; the session could not be resumed: {e}"))),
        }
    }

    /// Runs `op`, and again after reattaching when a connection was lost
    /// under it.
    fn with_recovery<T>(&self, op: impl Fn() -> Result<T>) -> Result<T> {
        // Twice at most: a lost bulk connection replaced first, then the
        // session followed where it moved (its bulk connections close at
        // the move, its own connection a moment later).
        let mut recoveries = 0;
        loop {
            match op() {
                Err(e) if recoveries < 2 => {
                    self.recover(e)?;
                    recoveries += 1;
                }
                done => return done,
            }
        }
    }

    /// The QUIC connection's statistics (for diagnostics and benchmarks).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.links().conn.stats()
    }
}

impl Transport for QuicTransport {
    fn welcome(&self) -> &v1::Welcome {
        &self.welcome
    }

    fn send_batch(&self, batch: &v1::Batch) -> Result<()> {
        let bytes = frame::encode(batch);
        if self.resume.is_some() {
            self.replay().record(batch.seq, bytes.clone());
        }
        let cmd = self.cmd.clone();
        match self.exec(async move { cmd.lock().await.send.write_all(&bytes).await.map_err(write_err) }) {
            // A resume sends the batch again.
            Err(e) => self.recover(e),
            ok => ok,
        }
    }

    fn recv_reply(&self) -> Result<v1::BatchReply> {
        if let (Some(awake), Some(rt)) = (&self.awake, &self.rt) {
            awake.poke(rt);
        }
        loop {
            let cmd = self.cmd.clone();
            match self.exec(async move { next_frame(&mut *cmd.lock().await).await }) {
                Ok(body) => {
                    if let Some(reply) = self.reply_of(body)? {
                        return Ok(reply);
                    }
                }
                Err(e) => self.recover(e)?,
            }
        }
    }

    fn try_recv_reply(&self) -> Option<Result<v1::BatchReply>> {
        let rt = self.rt.as_ref()?;
        if tokio::runtime::Handle::try_current().is_err_and(|e| e.is_thread_local_destroyed()) {
            return None;
        }
        let mut cmd = self.cmd.try_lock().ok()?;
        // One poll: what the I/O thread has received is decoded, nothing
        // waits. A dropped pending read loses nothing (quinn's reads are
        // cancel-safe); errors are met again by the next blocking read.
        let _context = rt.enter();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let body = match std::pin::pin!(next_frame(&mut cmd)).poll(&mut cx) {
            std::task::Poll::Ready(Ok(body)) => body,
            _ => return None,
        };
        drop(cmd);
        self.reply_of(body).transpose()
    }

    fn bulk_put(&self, id: u64, data: &[u8]) -> Result<()> {
        if let Some(done) = self.shm_copy(|shm| shm.put(id, data)) {
            return done;
        }
        self.with_recovery(|| match self.bulk_put_here(id, data) {
            Some(r) => r,
            None => self.bulk_put_once(id, Bytes::copy_from_slice(data)),
        })
    }

    fn bulk_get(&self, id: u64, out: &mut [u8]) -> Result<()> {
        if let Some(done) = self.shm_copy(|shm| shm.get(id, out)) {
            return done;
        }
        let out = std::cell::RefCell::new(out);
        self.with_recovery(|| {
            let mut out = out.borrow_mut();
            if let Some(r) = self.bulk_get_here(id, &mut out) {
                return r;
            }
            for (offset, parts) in self.bulk_get_once(id, out.len())? {
                place(&mut out, offset, &parts);
            }
            Ok(())
        })
    }

    fn close(&self) {
        let links = self.links();
        links.conn.close(close_code::NORMAL.into(), b"client closed the session");
        if let Some(c) = &links.control {
            c.close(close_code::NORMAL.into(), b"client closed the session");
        }
        if let Some(bulk) = &self.bulk {
            bulk.close();
        }
    }

    fn close_at_exit(&self, limit: Duration) {
        self.close();
        // The I/O thread sends the close frames; wait for it without
        // entering the runtime (thread-locals may be gone at exit).
        let endpoint = self.endpoint.clone();
        crate::wait::block_on_until(async move { endpoint.wait_idle().await }, std::time::Instant::now() + limit);
    }

    fn bulk_connections(&self) -> usize {
        self.bulk.as_ref().map_or(0, |b| b.open_conns().len())
    }

    fn shared_memory_bytes(&self) -> Option<u64> {
        self.shm.as_ref().filter(|s| s.live()).map(|s| s.bytes())
    }

    fn pinned_alloc(&self, size: usize) -> Option<usize> {
        self.shm.as_ref()?.pinned_alloc(size)
    }

    fn pinned_free(&self, ptr: usize) -> bool {
        self.shm.as_ref().is_some_and(|s| s.pinned_free(ptr))
    }

    fn is_pinned(&self, ptr: usize) -> bool {
        self.shm.as_ref().is_some_and(|s| s.is_pinned(ptr))
    }

    fn pinned_device_addressable(&self, ptr: usize, len: usize) -> bool {
        self.shm.as_ref().is_some_and(|s| s.live() && s.device_addressable(ptr, len))
    }

    fn pinned_copy(&self, addr: usize, len: usize, copy: PinnedCopy<'_>) -> Result<()> {
        let shm =
            self.shm.as_ref().ok_or_else(|| ClientError::InvalidValue("no pinned memory in shared regions".into()))?;
        shm.pinned_copy(addr, len, copy)
    }

    fn host_region(&self, ptr: usize, len: usize, _batch: Option<u64>) -> Option<v1::HostRegionRef> {
        self.shm.as_ref()?.host_region(ptr, len)
    }
}

/// The session's shared-memory attachment when the server offers one, the
/// configuration allows it and the server's socket is reachable from here
/// (the same host); else `None` and copies use QUIC.
fn attach_shm(config: &ClientConfig, welcome: &v1::Welcome) -> Option<crate::shm::ShmBulk> {
    if config.shm_region_bytes == 0 || welcome.shm_socket.is_empty() {
        return None;
    }
    let timeouts = (config.connect_timeout, config.reply_timeout);
    match crate::shm::ShmBulk::attach(welcome, config.shm_region_bytes, config.shm_pinned_bytes, timeouts) {
        Ok(shm) => {
            tracing::debug!(socket = %welcome.shm_socket, "bulk copies through shared memory");
            Some(shm)
        }
        Err(e) => {
            tracing::info!(error = %e, "no shared memory with the server; copies use QUIC");
            None
        }
    }
}

impl QuicTransport {
    /// Runs a copy through shared memory when it is live; `None` when it
    /// is not or broke (a migration stops the attachment): the copy then
    /// goes again, whole, over QUIC. That is safe midway too: an upload's
    /// chunks are cut at the same 4 MiB offsets both ways and the server
    /// takes a chunk it holds already as a no-op; a download's bytes stay
    /// staged until all of them were fetched.
    fn shm_copy(
        &self,
        op: impl FnOnce(&crate::shm::ShmBulk) -> std::result::Result<(), crate::shm::Failure>,
    ) -> Option<Result<()>> {
        use crate::shm::Failure;
        let shm = self.shm.as_ref().filter(|s| s.live())?;
        match op(shm) {
            Ok(()) => Some(Ok(())),
            Err(Failure::Refused(e)) => Some(Err(e)),
            Err(Failure::Broken { started: false, .. }) => None,
            Err(Failure::Broken { error, started: true }) => {
                tracing::debug!(%error, "shared-memory copy broke midway; again over QUIC");
                None
            }
        }
    }
}

/// Puts one chunk of upload `id` of `total` bytes at `offset`.
async fn put_chunk(
    conn: quinn::Connection,
    (id, total, offset): (u64, u64, usize),
    part: Bytes,
    mode: Compression,
) -> Result<()> {
    let put = v1::BulkPut { transfer_id: id, total_size: total, offset: offset as u64, data: None };
    let req = frame::bulk_put_frame(&put, &payload::encode(part, mode));
    // The reply is a few bytes: no pooled buffer for it.
    bulk_request(&conn, req, 1 << 20).await?.payload(1 << 20, None).map(|_| ())
}

/// Gets `size` bytes of download `id` at `offset`: slices of the chunks
/// they arrived in.
async fn get_chunk(
    conn: quinn::Connection,
    (id, offset, size): (u64, usize, usize),
    buffers: Arc<BufferPool>,
) -> Result<(usize, Vec<Bytes>)> {
    let get = v1::BulkGet { transfer_id: id, offset: offset as u64, size: size as u64 };
    let req = [frame::encode(&v1::BulkRequest { op: Some(v1::bulk_request::Op::Get(get)) }), Bytes::new()];
    let data = bulk_request(&conn, req, size + BULK_HEADROOM).await?.data(size, &buffers)?;
    Ok((offset, data))
}

/// Copies `parts` (slices adding up to a chunk) into `out` from `offset`.
fn place(out: &mut [u8], offset: usize, parts: &[Bytes]) {
    let mut at = offset;
    for p in parts {
        out[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
}

fn joined<T>(done: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
    done.map_err(|e| ClientError::Protocol(e.to_string()))?
}

impl QuicTransport {
    /// Puts `data` from the caller's memory: each chunk is copied into a
    /// reused buffer just before it is sent, while earlier chunks are on
    /// the wire (no copy of the whole of it first, which cost a fresh
    /// buffer as large as the copy, faulted in on the caller's thread).
    fn bulk_put_here(&self, id: u64, data: &[u8]) -> Option<Result<()>> {
        let (chunk, sem, mode, buffers) = (self.chunk, self.parallel.clone(), self.compression, self.buffers.clone());
        self.exec_bulk_here(move |conns| async move {
            let start = |offset, len, conn| {
                let mut buf =
                    buffers.take(len).ok_or_else(|| ClientError::Protocol(format!("cannot allocate {len} bytes")))?;
                buf.extend_from_slice(&data[offset..offset + len]);
                Ok(put_chunk(conn, (id, data.len() as u64, offset), buf.freeze(), mode))
            };
            each_chunk(&conns, data.len(), chunk, &sem, start, |()| ()).await
        })
    }

    /// Gets download `id` into the caller's `out`, each chunk copied in as
    /// it arrives (no list of every chunk held until the last one).
    fn bulk_get_here(&self, id: u64, out: &mut [u8]) -> Option<Result<()>> {
        let (chunk, sem, buffers) = (self.chunk, self.parallel.clone(), self.buffers.clone());
        self.exec_bulk_here(move |conns| async move {
            let start = |offset, len, conn| Ok(get_chunk(conn, (id, offset, len), buffers.clone()));
            let total = out.len();
            each_chunk(&conns, total, chunk, &sem, start, |(offset, parts): (usize, Vec<Bytes>)| {
                place(out, offset, &parts)
            })
            .await
        })
    }

    /// [`Self::bulk_put_here`] with the bytes already owned, on the I/O
    /// runtime.
    fn bulk_put_once(&self, id: u64, data: Bytes) -> Result<()> {
        let (chunk, sem, mode) = (self.chunk, self.parallel.clone(), self.compression);
        self.exec_bulk(move |conns| async move {
            let total = data.len() as u64;
            let start = |offset, len, conn| {
                let part = data.slice(offset..offset + len);
                Ok(put_chunk(conn, (id, total, offset), part, mode))
            };
            each_chunk(&conns, data.len(), chunk, &sem, start, |()| ()).await
        })
    }

    /// [`Self::bulk_get_here`] collecting the chunks, on the I/O runtime.
    fn bulk_get_once(&self, id: u64, total: usize) -> Result<Vec<(usize, Vec<Bytes>)>> {
        let (chunk, sem, buffers) = (self.chunk, self.parallel.clone(), self.buffers.clone());
        self.exec_bulk(move |conns| async move {
            let mut parts = Vec::new();
            let start = |offset, len, conn| Ok(get_chunk(conn, (id, offset, len), buffers.clone()));
            each_chunk(&conns, total, chunk, &sem, start, |part| parts.push(part)).await?;
            Ok(parts)
        })
    }
}

/// The smallest piece a copy is cut into to spread it over the bulk
/// connections.
const MIN_SPREAD_CHUNK: usize = 256 << 10;

/// The chunk size for a copy of `total` bytes over `conns` connections:
/// `chunk`, or less for a copy that would leave connections idle (down to
/// [`MIN_SPREAD_CHUNK`]), so that each connection's I/O thread encrypts and
/// sends its share at once: one connection is one core's work.
fn spread_chunk(total: usize, chunk: usize, conns: usize) -> usize {
    if conns <= 1 || total >= chunk.saturating_mul(conns) {
        return chunk;
    }
    total.div_ceil(conns).clamp(MIN_SPREAD_CHUNK.min(chunk), chunk)
}

/// Runs one request per `chunk` bytes of `total` (fewer bytes each for a
/// copy smaller than a chunk per connection, [`spread_chunk`]): chunk `i` on connection
/// `i mod n`, at most `sem`'s permits in flight (`bulk_parallel`). `start`
/// makes the request of `(offset, len)` on a connection; `done` takes each
/// result as it completes, in any order. The first failure ends it.
async fn each_chunk<T, F>(
    conns: &[quinn::Connection],
    total: usize,
    chunk: usize,
    sem: &Arc<Semaphore>,
    mut start: impl FnMut(usize, usize, quinn::Connection) -> Result<F>,
    mut done: impl FnMut(T),
) -> Result<()>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    if conns.is_empty() {
        // All of them were lost (the server went away mid-copy).
        return Err(ClientError::ConnectionLost("no bulk connection is left".into()));
    }
    let chunk = spread_chunk(total, chunk, conns.len());
    let mut tasks = JoinSet::new();
    for (i, offset) in (0..total).step_by(chunk).enumerate() {
        let permit = sem.clone().acquire_owned().await.map_err(|_| ClientError::ConnectionLost("closed".into()))?;
        let request = start(offset, chunk.min(total - offset), conns[i % conns.len()].clone())?;
        tasks.spawn(async move {
            let r = request.await;
            drop(permit);
            r
        });
        // Surface a failure early instead of sending the rest.
        while let Some(finished) = tasks.try_join_next() {
            done(joined(finished)?);
        }
    }
    while let Some(finished) = tasks.join_next().await {
        done(joined(finished)?);
    }
    Ok(())
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        tracing::debug!(stats = ?self.stats(), "closing the session");
        self.close();
        // Let the close frame leave before the runtime goes away.
        let endpoint = self.endpoint.clone();
        let wait = async move {
            let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
        };
        if let Some(rt) = self.rt.take() {
            if tokio::runtime::Handle::try_current().is_err() {
                rt.block_on(wait);
            }
            // Dropping a runtime inside another one would panic.
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// `stream` cut into chunks of `cut` bytes, as QUIC might deliver it.
    fn reply_of(stream: &[u8], cut: usize) -> BulkReply {
        let chunks: Vec<Bytes> = stream.chunks(cut).map(Bytes::copy_from_slice).collect();
        BulkReply { chunks, len: stream.len() }
    }

    #[test]
    fn a_get_response_gives_its_data_however_the_stream_was_cut() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let buffers = BufferPool::new(data.len() + BULK_HEADROOM, 2);
        let raw = v1::Payload { codec: 0, raw_len: data.len() as u64, data: Bytes::from(data.clone()) };
        let lz4 = payload::encode(Bytes::from(data.clone()), Compression::Auto);
        assert_ne!(lz4.codec, 0, "compressible data is compressed");
        for payload in [raw, lz4] {
            let stream = frame::bulk_response_frame(None, &payload).concat();
            for cut in [1, 3, 17, 64, 1000, 65_536, stream.len()] {
                let parts = reply_of(&stream, cut).data(data.len(), &buffers).expect("data");
                assert_eq!(parts.concat(), data, "codec {}, chunks of {cut}", payload.codec);
            }
        }
        // A short stream or the wrong size is an error, not a panic.
        let raw = v1::Payload { codec: 0, raw_len: 3, data: Bytes::from_static(b"abc") };
        let stream = frame::bulk_response_frame(None, &raw).concat();
        assert!(reply_of(&stream[..stream.len() - 1], 2).data(3, &buffers).is_err());
        assert!(reply_of(&stream, 2).data(4, &buffers).is_err());
        let error = v1::CallError { index: 0, code: 1, message: "gone".into() };
        let stream = frame::bulk_response_frame(Some(error), &raw).concat();
        assert!(matches!(reply_of(&stream, 5).data(3, &buffers), Err(ClientError::Cuda { code: 1, .. })));
        // A compressed response cut in pieces was joined in a pooled buffer,
        // which went back to the pool.
        assert!(buffers.free_buffers() >= 1, "the joined buffer is reused");
    }

    #[test]
    fn small_copies_are_spread_over_the_connections() {
        let chunk = 4 << 20;
        assert_eq!(spread_chunk(1 << 20, chunk, 4), 256 << 10, "1 MiB over four connections");
        assert_eq!(spread_chunk(8 << 20, chunk, 4), 2 << 20);
        assert_eq!(spread_chunk(16 << 20, chunk, 4), chunk, "a chunk per connection already");
        assert_eq!(spread_chunk(1 << 30, chunk, 4), chunk);
        assert_eq!(spread_chunk(300 << 10, chunk, 4), 256 << 10, "not below the smallest piece");
        assert_eq!(spread_chunk(1 << 20, chunk, 1), chunk, "one connection");
        assert_eq!(spread_chunk(1 << 20, 64 << 10, 4), 64 << 10, "never above the chunk");
    }

    /// A session that moved is followed: the new address, pin, token, id
    /// and secret; an unusable address is a protocol error, nothing changed.
    #[test]
    fn a_moved_session_is_followed_to_its_new_server() {
        let config = ClientConfig::new(
            "127.0.0.1:4433".parse().expect("addr"),
            crate::config::Trust::Fingerprint("00".repeat(32)),
            "old-token",
        );
        let mut info = ResumeInfo {
            server: config.server,
            name: config.server_name.clone(),
            hello: v1::Hello { token: "old-token".into(), ..Default::default() },
            session_id: 1,
            secret: "s1".into(),
            source: crate::config::TokenSource::Fixed,
            connect_timeout: config.connect_timeout,
            config,
            quic: None,
            moved_token: None,
        };
        let moved = |address: &str| v1::Moved {
            address: address.into(),
            server_name: "target".into(),
            cert_sha256: "11".repeat(32),
            token: "new-token".into(),
            session_id: 7,
            resume_secret: "s7".into(),
        };
        assert!(matches!(info.follow(moved("not an address")), Err(ClientError::Protocol(_))));
        assert_eq!((info.session_id, info.hello.token.as_str()), (1, "old-token"));
        info.follow(moved("127.0.0.2:5000")).expect("follow");
        assert_eq!(info.server, "127.0.0.2:5000".parse().expect("addr"));
        assert_eq!((info.name.as_str(), info.session_id, info.secret.as_str()), ("target", 7, "s7"));
        assert_eq!(info.moved_token.as_deref(), Some("new-token"));
        assert!(info.quic.is_some(), "the new server's pin");
        assert_eq!(info.source.current_for("127.0.0.2:5000"), None, "nothing renews a fixed token");
    }

    #[test]
    fn keep_awake_runs_while_sends_come_and_stops_after_the_spin() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let awake = Arc::new(KeepAwake {
            spin: Duration::from_millis(30),
            base: std::time::Instant::now(),
            until: AtomicU64::new(0),
            running: AtomicBool::new(false),
        });
        awake.poke(&rt);
        assert!(awake.running.load(Ordering::Acquire));
        // Sends 10 ms apart keep one task running past the first spin.
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(10));
            awake.poke(&rt);
            assert!(awake.running.load(Ordering::Acquire), "still running while sends come");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while awake.running.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "the task stops once the sends stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        // And starts again with the next send.
        awake.poke(&rt);
        assert!(awake.running.load(Ordering::Acquire));
        rt.shutdown_background();
    }
}
