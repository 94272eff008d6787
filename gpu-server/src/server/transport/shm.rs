//! Shared memory for clients on this host (the `gpupool-shm` crate): the
//! process that serves sessions (this one, or each worker process) listens
//! on a unix socket; a session's `Welcome` offers its path and a secret of
//! the session's. A client that connects, passes a sealed memfd with the
//! secret and the session id, and has it mapped here, is on this host. Its
//! bulk copies then go through that region: each request names a range of
//! the region, checked against the mapping and in sequence, and is served
//! by the session's [`BulkService`] like a chunk off QUIC (staging limits,
//! counters). The commands stay on QUIC, the control transport.
//!
//! Each attachment is served on a thread of its own (a copy runs at memory
//! speed and would hold up the I/O runtime). Everything read from the
//! socket or the region is untrusted: a bad message gets an error reply and
//! ends the attachment (the session goes on over QUIC). When the session
//! ends its slot shuts the socket, the thread ends and the region is
//! unmapped.

use crate::auth::constant_time_eq;
use crate::error::CallError;
use crate::server::bulk::BulkService;
use crate::server::metrics::{Metrics, add};
use gpupool_proto::cuda;
use gpupool_shm::region::Region;
use gpupool_shm::wire::{self, Attach, MESSAGE_LEN, Op, Reply, Request, SeqCheck};
use gpupool_shm::{ShmError, channel};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Attachments served or being set up at once, beyond one per session:
/// connections that never authenticate cannot take more threads than this.
const SPARE_ATTACHMENTS: usize = 16;

/// The unix socket of this process, and the sessions that may attach to it.
#[derive(Debug)]
pub(crate) struct Registry {
    /// The socket's path (none: no shared memory here).
    path: Option<PathBuf>,
    sessions: Mutex<HashMap<u64, Attachable>>,
    /// Attachment threads running now, and their bound.
    threads: Arc<AtomicUsize>,
    max_threads: usize,
}

#[derive(Debug)]
struct Attachable {
    secret: [u8; wire::SECRET_LEN],
    service: Arc<BulkService>,
    /// The attached client's socket, shut down when the session ends.
    attached: Option<UnixStream>,
}

impl Registry {
    /// No shared memory.
    pub(crate) fn off() -> Self {
        Self { path: None, sessions: Mutex::default(), threads: Arc::default(), max_threads: 0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Attachable>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes session `id`'s bulk transfers reachable through shared memory
    /// until the returned slot drops.
    pub(crate) fn register(&self, id: u64, service: Arc<BulkService>) -> ShmSlot<'_> {
        if self.path.is_none() {
            return ShmSlot { registry: self, id, secret: None };
        }
        let secret = rand::random::<[u8; wire::SECRET_LEN]>();
        self.lock().insert(id, Attachable { secret, service, attached: None });
        ShmSlot { registry: self, id, secret: Some(secret) }
    }

    /// The session's bulk service when `attach` carries its secret
    /// (compared in constant time).
    fn admit(&self, attach: &Attach) -> Result<Arc<BulkService>, String> {
        let sessions = self.lock();
        let refused = || format!("no session {} takes shared memory with this secret", attach.session_id);
        let entry = sessions.get(&attach.session_id).ok_or_else(refused)?;
        if !constant_time_eq(&entry.secret, &attach.secret) {
            return Err(refused());
        }
        Ok(entry.service.clone())
    }

    /// Makes `stream` session `id`'s attachment (an earlier one is shut
    /// down); false when the session has ended meanwhile.
    fn keep(&self, id: u64, stream: UnixStream) -> bool {
        let mut sessions = self.lock();
        let Some(entry) = sessions.get_mut(&id) else { return false };
        if let Some(old) = entry.attached.replace(stream) {
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        true
    }
}

/// Session `id`'s entry in the [`Registry`]: unregistered on drop, which
/// shuts its attachment's socket (its thread then ends and unmaps the
/// region).
#[derive(Debug)]
pub(crate) struct ShmSlot<'a> {
    registry: &'a Registry,
    id: u64,
    secret: Option<[u8; wire::SECRET_LEN]>,
}

impl ShmSlot<'_> {
    /// The socket's path and the hex secret for the session's `Welcome`
    /// (both empty without shared memory).
    pub(crate) fn offer(&self) -> (String, String) {
        match (&self.registry.path, &self.secret) {
            (Some(path), Some(secret)) => (path.display().to_string(), hex::encode(secret)),
            _ => (String::new(), String::new()),
        }
    }

    /// Shuts the client's attachment down (the session stops for a
    /// migration: no upload may land here after its staged ones were read
    /// out); its copies go over QUIC from then on.
    pub(crate) fn detach(&self) {
        let stream = self.registry.lock().get_mut(&self.id).and_then(|e| e.attached.take());
        if let Some(stream) = stream {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for ShmSlot<'_> {
    fn drop(&mut self) {
        if self.secret.is_none() {
            return;
        }
        let entry = self.registry.lock().remove(&self.id);
        if let Some(stream) = entry.and_then(|e| e.attached) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The listening socket; its file is removed on drop.
#[derive(Debug)]
pub(crate) struct ShmListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ShmListener {
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for ShmListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds this process's socket in `dir` (a fresh name: several servers and
/// workers share a directory) and the registry that offers it.
pub(crate) fn bind(dir: &std::path::Path, max_sessions: usize) -> std::io::Result<(ShmListener, Registry)> {
    let path = dir.join(format!("gpupool-{}-{}.sock", std::process::id(), hex::encode(rand::random::<[u8; 8]>())));
    let listener = UnixListener::bind(&path)?;
    // Any local user may connect (a client in a container runs as its own
    // user): the session's secret is what admits an attachment.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    let registry = Registry {
        path: Some(path.clone()),
        sessions: Mutex::default(),
        threads: Arc::default(),
        max_threads: max_sessions + SPARE_ATTACHMENTS,
    };
    Ok((ShmListener { listener, path }, registry))
}

/// Accepts attachments until the server stops (the task is aborted); each
/// one on a thread of its own, at most the registry's bound at once.
pub(crate) async fn serve(
    listener: ShmListener,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
) -> std::io::Result<()> {
    listener.listener.set_nonblocking(true)?;
    let accepting = tokio::net::UnixListener::from_std(listener.listener.try_clone()?)?;
    loop {
        let (stream, _) = match accepting.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "shared-memory accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if registry.threads.fetch_add(1, Ordering::AcqRel) >= registry.max_threads {
            registry.threads.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("shared-memory attachment refused: too many at once");
            continue;
        }
        let (reg, m) = (registry.clone(), metrics.clone());
        let spawned = stream.into_std().and_then(|stream| {
            std::thread::Builder::new().name("gpupool-shm".into()).spawn(move || {
                attachment(&reg, &m, stream, handshake_timeout);
                reg.threads.fetch_sub(1, Ordering::AcqRel);
            })
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a shared-memory thread");
            registry.threads.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A mapped region, counted in the metrics while it is.
struct Mapped<'a> {
    region: Region,
    metrics: &'a Metrics,
}

impl<'a> Mapped<'a> {
    fn new(region: Region, metrics: &'a Metrics) -> Self {
        add(&metrics.shm_regions, 1);
        Self { region, metrics }
    }
}

impl Drop for Mapped<'_> {
    fn drop(&mut self) {
        self.metrics.shm_regions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One client's attachment: its `Attach` with the region within the
/// handshake timeout, then its requests until the socket ends.
fn attachment(registry: &Registry, metrics: &Metrics, stream: UnixStream, handshake_timeout: Duration) {
    let refuse = |stream: &UnixStream, code, message: String| {
        add(&metrics.sessions_refused, 1);
        tracing::info!(reason = %message, "shared-memory attachment refused");
        let _ = channel::write_message(stream, &Reply { seq: 0, code, message }.encode());
    };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(handshake_timeout));
    let (attach, fd) = match channel::recv_with_fd(&stream).and_then(|(m, fd)| Ok((Attach::decode(&m)?, fd))) {
        Ok(v) => v,
        Err(e) => return refuse(&stream, cuda::INVALID_VALUE, e.to_string()),
    };
    let service = match registry.admit(&attach) {
        Ok(s) => s,
        Err(reason) => return refuse(&stream, cuda::NOT_PERMITTED, reason),
    };
    let region = match Region::open(fd, attach.region_len) {
        Ok(r) => Mapped::new(r, metrics),
        Err(e) => return refuse(&stream, cuda::INVALID_VALUE, e.to_string()),
    };
    // The session's end shuts this socket (through the clone it keeps).
    let Ok(kept) = stream.try_clone() else { return };
    if !registry.keep(attach.session_id, kept) || channel::write_message(&stream, &Reply::ok(0).encode()).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(None);
    tracing::info!(session = attach.session_id, bytes = attach.region_len, "shared-memory region attached");
    match serve_requests(&stream, &region.region, &service) {
        Ok(()) => tracing::debug!(session = attach.session_id, "shared-memory attachment ended"),
        Err(e) => {
            add(&metrics.frames_rejected, 1);
            tracing::info!(session = attach.session_id, error = %e, "shared-memory attachment ended by a bad request");
            let _ = channel::write_message(
                &stream,
                &Reply { seq: 0, code: cuda::INVALID_VALUE, message: e.to_string() }.encode(),
            );
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Serves requests until the client or the session ends the socket
/// (`Ok`), or a request breaks the protocol (`Err`: the attachment ends).
/// A request the session refuses (staging limits, an unknown transfer)
/// gets its error in the reply and the attachment goes on.
fn serve_requests(stream: &UnixStream, region: &Region, bulk: &BulkService) -> Result<(), ShmError> {
    let mut seq = SeqCheck::default();
    let max_chunk = bulk.max_chunk();
    loop {
        let message = match channel::read_message::<MESSAGE_LEN>(stream) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(ShmError::Io(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let request = Request::decode(&message)?;
        seq.next(request.seq)?;
        let (start, len) = request.check(region.len(), max_chunk)?;
        let reply = match serve_one(&request, region, start, len, bulk) {
            Ok(()) => {
                add(&bulk.metrics().shm_bytes, len as u64);
                Reply::ok(request.seq)
            }
            Err(e) => Reply { seq: request.seq, code: e.code, message: e.message },
        };
        if channel::write_message(stream, &reply.encode()).is_err() {
            return Ok(());
        }
    }
}

fn serve_one(
    request: &Request,
    region: &Region,
    start: usize,
    len: usize,
    bulk: &BulkService,
) -> Result<(), CallError> {
    let region_error = |e: ShmError| CallError::invalid_value(e.to_string());
    match request.op {
        Op::Put { total } => {
            let mut buf = crate::staging::buffers()
                .take(len)
                .ok_or_else(|| CallError::out_of_memory(format!("cannot allocate {len} bytes")))?;
            // Copied out of the region before use: the client may write
            // there again at any time.
            region.read_append(start, len, buf.as_vec_mut()).map_err(region_error)?;
            bulk.put(request.transfer, total, request.offset, buf.freeze())
        }
        Op::Get => {
            let bytes = bulk.get(request.transfer, request.offset, len as u64)?;
            if bytes.len() != len {
                return Err(CallError::invalid_value(format!("staged {} bytes, asked {len}", bytes.len())));
            }
            region.write(start, &bytes).map_err(region_error)
        }
    }
}
