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
use crate::device::HostPinner;
use crate::error::CallError;
use crate::host_regions::{HostRegion, HostRegions};
use crate::server::bulk::BulkService;
use crate::server::metrics::{Metrics, add};
use gpupool_proto::cuda;
use gpupool_shm::region::Region;
use gpupool_shm::ring::{Ring, Side};
use gpupool_shm::wire::{self, Attach, Op, Reply, Request, SeqCheck};
use gpupool_shm::{ShmError, channel};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

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
    /// The session's host regions (its pinned memory) and what registers
    /// them with the driver.
    regions: Arc<HostRegions>,
    pinner: Arc<dyn HostPinner>,
    /// The attached client's socket (and its attachment's number), shut
    /// down when the session ends.
    attached: Option<(u64, UnixStream)>,
    /// Where a command ring goes while the session waits for one (see
    /// [`super::shm_commands`]).
    commands: Option<oneshot::Sender<Arc<Ring>>>,
}

impl Registry {
    /// Whether this process offers shared memory.
    pub(crate) fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// No shared memory.
    pub(crate) fn off() -> Self {
        Self { path: None, sessions: Mutex::default(), threads: Arc::default(), max_threads: 0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Attachable>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes session `id`'s bulk transfers reachable through shared memory
    /// until the returned slot drops.
    pub(crate) fn register(
        &self,
        id: u64,
        service: Arc<BulkService>,
        regions: Arc<HostRegions>,
        pinner: Arc<dyn HostPinner>,
    ) -> ShmSlot<'_> {
        if self.path.is_none() {
            return ShmSlot { registry: self, id, secret: None };
        }
        let secret = rand::random::<[u8; wire::SECRET_LEN]>();
        self.lock().insert(id, Attachable { secret, service, regions, pinner, attached: None, commands: None });
        ShmSlot { registry: self, id, secret: Some(secret) }
    }

    /// The session's bulk service and host regions when `attach` carries
    /// its secret (compared in constant time).
    fn admit(&self, attach: &Attach) -> Result<Session, String> {
        let sessions = self.lock();
        let refused = || format!("no session {} takes shared memory with this secret", attach.session_id);
        let entry = sessions.get(&attach.session_id).ok_or_else(refused)?;
        if !constant_time_eq(&entry.secret, &attach.secret) {
            return Err(refused());
        }
        Ok(Session { bulk: entry.service.clone(), regions: entry.regions.clone(), pinner: entry.pinner.clone() })
    }

    /// Hands a command ring to session `id`, when it waits for one (each
    /// session takes one at most, before its first batch).
    fn hand_commands(&self, id: u64, ring: Arc<Ring>) -> Result<(), CallError> {
        let sender = self.lock().get_mut(&id).and_then(|e| e.commands.take());
        let refused = || CallError::not_supported("the session does not take a command ring (now)");
        sender.ok_or_else(refused)?.send(ring).map_err(|_| refused())
    }

    /// Whether attachment `owner` is still session `id`'s: false once the
    /// session shut it (it ended, or stopped to move) or a newer one
    /// replaced it.
    fn holds(&self, id: u64, owner: u64) -> bool {
        self.lock().get(&id).and_then(|e| e.attached.as_ref()).is_some_and(|(o, _)| *o == owner)
    }

    /// Makes `stream` session `id`'s attachment (an earlier one is shut
    /// down); false when the session has ended meanwhile.
    fn keep(&self, id: u64, owner: u64, stream: UnixStream) -> bool {
        let mut sessions = self.lock();
        let Some(entry) = sessions.get_mut(&id) else { return false };
        if let Some((_, old)) = entry.attached.replace((owner, stream)) {
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        true
    }
}

/// What an admitted attachment serves.
struct Session {
    bulk: Arc<BulkService>,
    regions: Arc<HostRegions>,
    pinner: Arc<dyn HostPinner>,
}

/// Attachments made so far in this process: each one's host regions are
/// its own to remove when it ends (a newer attachment of the session may
/// have added others).
static ATTACHMENTS: AtomicU64 = AtomicU64::new(1);

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

    /// Lets the session's client move its commands to a ring in shared
    /// memory (with shared memory here): where the ring comes, taken by the
    /// session's first read (`None` without shared memory).
    pub(crate) fn offer_commands(&self) -> Option<oneshot::Receiver<Arc<Ring>>> {
        self.secret?;
        let (tx, rx) = oneshot::channel();
        self.registry.lock().get_mut(&self.id)?.commands = Some(tx);
        Some(rx)
    }

    /// Shuts the client's attachment down (the session stops for a
    /// migration: no upload may land here after its staged ones were read
    /// out); its copies go over QUIC from then on.
    pub(crate) fn detach(&self) {
        let stream = self.registry.lock().get_mut(&self.id).and_then(|e| e.attached.take());
        if let Some((_, stream)) = stream {
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
        if let Some((_, stream)) = entry.and_then(|e| e.attached) {
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
fn attachment(registry: &Registry, metrics: &Arc<Metrics>, stream: UnixStream, handshake_timeout: Duration) {
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
    let session = match registry.admit(&attach) {
        Ok(s) => s,
        Err(reason) => return refuse(&stream, cuda::NOT_PERMITTED, reason),
    };
    let region = match Region::open(fd, attach.region_len) {
        Ok(r) => Mapped::new(r, metrics),
        Err(e) => return refuse(&stream, cuda::INVALID_VALUE, e.to_string()),
    };
    // The session's end shuts this socket (through the clone it keeps).
    let Ok(kept) = stream.try_clone() else { return };
    let owner = ATTACHMENTS.fetch_add(1, Ordering::Relaxed);
    if !registry.keep(attach.session_id, owner, kept)
        || channel::write_message(&stream, &Reply::ok(0).encode()).is_err()
    {
        return;
    }
    let _ = stream.set_read_timeout(None);
    tracing::info!(session = attach.session_id, bytes = attach.region_len, "shared-memory region attached");
    let mut rings = Vec::new();
    let attached = Attached { id: attach.session_id, registry, owner, rings: &mut rings };
    let served = serve_requests(&stream, &region.region, &session, attached, metrics);
    // Its host regions go with it: unregistered (after the copies queued
    // with them) and unmapped, here or by the session's copy holding one.
    session.regions.clear(owner);
    // And its command ring, when the client ended the attachment (it
    // exited, its channel broke) or broke its protocol: the session's
    // commands go back to QUIC (a lost attachment). When the session shut
    // it (it ended, or stops to move) the session's own transport ends the
    // ring in order: the client then follows the close of QUIC.
    if registry.holds(attach.session_id, owner) {
        for ring in rings {
            ring.close(Side::Server, false);
        }
    }
    match served {
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

/// An attachment's own: its session, what it attached.
struct Attached<'a> {
    id: u64,
    registry: &'a Registry,
    owner: u64,
    /// The command ring handed to the session (one at most).
    rings: &'a mut Vec<Arc<Ring>>,
}

/// Serves requests until the client or the session ends the socket
/// (`Ok`), or a request breaks the protocol (`Err`: the attachment ends).
/// A request the session refuses (staging limits, an unknown transfer)
/// gets its error in the reply and the attachment goes on.
fn serve_requests(
    stream: &UnixStream,
    region: &Region,
    session: &Session,
    mut attached: Attached<'_>,
    metrics: &Arc<Metrics>,
) -> Result<(), ShmError> {
    let bulk = &session.bulk;
    let mut seq = SeqCheck::default();
    let max_chunk = bulk.max_chunk();
    loop {
        let (message, fd) = match channel::recv_message(stream) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(ShmError::Io(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let request = Request::decode(&message)?;
        seq.next(request.seq)?;
        if request.op.carries_fd() != fd.is_some() {
            return Err(ShmError::Protocol(format!(
                "request {} with a file descriptor where none belongs, or without one",
                request.seq
            )));
        }
        if let Some(reply) = serve_region_op(&request, fd, session, &mut attached, metrics) {
            if channel::write_message(stream, &reply.encode()).is_err() {
                return Ok(());
            }
            continue;
        }
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

/// Attaches or detaches a host region (`None` for any other request). A
/// refusal (a bad file, the session's bounds, a driver error) is the
/// reply's; the attachment goes on.
fn serve_region_op(
    request: &Request,
    fd: Option<std::os::fd::OwnedFd>,
    session: &Session,
    attached: &mut Attached<'_>,
    metrics: &Arc<Metrics>,
) -> Option<Reply> {
    let owner = attached.owner;
    let outcome = match (request.op, fd) {
        (Op::AddRegion { id, len, at }, Some(fd)) => session.regions.admits(id, len).and_then(|()| {
            // Checked like the bulk region: a memfd sealed against
            // shrinking, of exactly the announced size; at the client's
            // address when it names one.
            let at = (at != 0).then_some(at);
            let region = Region::open_at(fd, len, at).map_err(|e| match e {
                ShmError::AddressInUse(m) => CallError::new(wire::ADDRESS_IN_USE, m),
                e => CallError::invalid_value(e.to_string()),
            })?;
            let host = HostRegion::new(region, session.pinner.as_ref(), Some(metrics.clone()), at.is_some())?;
            tracing::debug!(id, bytes = len, at, "host region attached and registered");
            session.regions.insert(owner, id, host)
        }),
        (Op::Commands { len }, Some(fd)) => {
            // Checked like any region, and its length as a ring's.
            match Ring::open(fd, len) {
                Err(e) => Err(CallError::invalid_value(e.to_string())),
                Ok(_) if !attached.rings.is_empty() => Err(CallError::invalid_value("a second command ring")),
                Ok(ring) => attached.registry.hand_commands(attached.id, ring.clone()).map(|()| {
                    add(&metrics.shm_command_rings, 1);
                    tracing::debug!(bytes = len, "command ring attached");
                    attached.rings.push(ring);
                }),
            }
        }
        (Op::RemoveRegion { id }, None) => {
            if session.regions.remove(owner, id) {
                Ok(())
            } else {
                Err(CallError::invalid_value(format!("host region {id} is not attached")))
            }
        }
        _ => return None,
    };
    Some(match outcome {
        Ok(()) => Reply::ok(request.seq),
        Err(e) => Reply { seq: request.seq, code: e.code, message: e.message },
    })
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
        Op::AddRegion { .. } | Op::RemoveRegion { .. } | Op::Commands { .. } => {
            Err(CallError::invalid_value("a region operation served as a copy"))
        }
    }
}
