//! RDMA (issue 22, `docs/rdma.md`): a session's commands and bulk copies
//! over one reliable-connected queue pair, driven by the sans-I/O core
//! (`gpupool_proto::rdma`) through `gpupool-rdma`'s [`Endpoint`] on any
//! [`Provider`] (a verbs device, or the in-memory fabric of the tests).
//!
//! How a session gets there: the client offers RDMA in its `Hello`; the
//! server decides (`negotiate::decide`: its own device and `--rdma`, the
//! lease's `allow_rdma`, the core versions) and, when yes, runs the session
//! as an [`Rdma`] attachment. Its `Welcome` goes out on QUIC with
//! `Welcome.rdma` (this listener's port and a secret of the session's); the
//! client connects with rdma_cm and presents the secret in its RDMA
//! `Hello`. The attachment's first read decides where the session's
//! commands go: the RDMA connection when it is admitted, or QUIC when the
//! client sends a batch there first (its RDMA setup failed) or nothing came
//! within the handshake timeout. No reply exists before that read, so the
//! replies follow the batches on one path.
//!
//! Each admitted connection is served on a thread of its own (polling the
//! NIC, like the shared-memory attachments): command frames are handed to
//! the session through a bounded channel (when it is full, the core holds
//! its receive buffers and the client runs out of credits); upload chunks
//! land in the registered staging slots and are staged through the
//! session's [`BulkService`] (the same limits and counters as QUIC), each
//! slot's release carrying the verdict; download chunks are read from the
//! staging and written into the client's landing region.
//!
//! QUIC stays the control connection: the end of the session, a migration
//! and a resume happen there. A lost RDMA connection is a lost attachment:
//! the server closes the QUIC connection with `MIGRATED` and an empty
//! `Moved` ("resume here"), keeps the session, and the client resumes it
//! on QUIC (a resumed session stays on QUIC).

use super::beside::{self, Beside};
use super::quic::{self, Quic};
use super::{Attachment, FrameReceiver, FrameSender, Link, RecvError, SendError, Transport};
use crate::auth::constant_time_eq;
use crate::config::{RdmaMode, ServerConfig};
use crate::error::{CallError, ServerError};
use crate::server::bulk::BulkService;
use crate::server::metrics::{Metrics, add};
use bytes::Bytes;
use gpupool_proto::rdma::negotiate::{self, Accept, ServerRdma};
use gpupool_proto::rdma::{Config, Event, GetTicket, RdmaError, RemoteRegion, Role};
use gpupool_proto::{close_code, frame, v1};
use gpupool_rdma::endpoint::{PEER_WRITABLE, source};
use gpupool_rdma::nic::Wake;
use gpupool_rdma::{Endpoint, Listen, Provider, Regions};
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Upload slots of a connection, and the bytes of each.
const SLOTS: u16 = 4;
const SLOT_BYTES: u32 = 4 << 20;
/// Download chunks a client may have in flight, and their largest size.
const GETS_IN_FLIGHT: u16 = 4;
const GET_CHUNK: u32 = 4 << 20;
/// Bytes of a session's RDMA secret.
const SECRET_LEN: usize = 32;
/// Connection threads beyond one per session: connections that never
/// present a session's secret cannot take more threads than this.
const SPARE_CONNECTIONS: usize = 16;
/// Frames queued towards the session, and from it.
const QUEUED_FRAMES: usize = 64;
/// Longest idle wait of a connection's thread (its timers run at least this often).
const IDLE_WAIT: Duration = Duration::from_millis(5);

/// The server's RDMA listener and the sessions waiting for their connection.
#[derive(Debug)]
pub(crate) struct RdmaHost {
    device: String,
    port: u16,
    waiting: Mutex<HashMap<u64, Waiting>>,
    threads: AtomicUsize,
    max_threads: usize,
    stop: AtomicBool,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    max_frame: u32,
}

/// A bound listener and its host.
pub(crate) type Bound = (Arc<RdmaHost>, Box<dyn Listen>);

#[derive(Debug)]
struct Waiting {
    secret: Vec<u8>,
    bulk: Arc<BulkService>,
    admitted: oneshot::Sender<Attached>,
}

impl RdmaHost {
    /// Binds the listener as `config.rdma` asks: `None` when RDMA is off
    /// or (`auto`) no device is found; an error when it is `on` and cannot be.
    pub(crate) fn bind(config: &ServerConfig, metrics: Arc<Metrics>) -> Result<Option<Bound>, ServerError> {
        let settings = &config.rdma;
        if settings.mode == RdmaMode::Off {
            return Ok(None);
        }
        let provider: Arc<dyn Provider> = match settings.provider.clone().map_or_else(gpupool_rdma::probe, Ok) {
            Ok(p) => p,
            Err(e) if settings.mode == RdmaMode::Auto => {
                tracing::info!(reason = %e, "no RDMA: sessions stay on QUIC");
                return Ok(None);
            }
            Err(e) => return Err(ServerError::Config(format!("--rdma on: {e}"))),
        };
        let addr = SocketAddr::new(config.listen.ip(), settings.port);
        let listener = match provider.listen(addr) {
            Ok(l) => l,
            Err(e) if settings.mode == RdmaMode::Auto => {
                tracing::warn!(%addr, error = %e, "no RDMA: cannot listen");
                return Ok(None);
            }
            Err(e) => return Err(ServerError::Config(format!("--rdma on: cannot listen on {addr}: {e}"))),
        };
        let host = RdmaHost {
            device: provider.device(),
            port: listener.port(),
            waiting: Mutex::default(),
            threads: AtomicUsize::new(0),
            max_threads: config.max_sessions + SPARE_CONNECTIONS,
            stop: AtomicBool::new(false),
            metrics,
            handshake_timeout: config.handshake_timeout,
            idle_timeout: settings.idle_timeout.unwrap_or(Duration::from_secs(10)),
            max_frame: config.max_frame_bytes.min(gpupool_proto::rdma::MAX_FRAME),
        };
        tracing::info!(device = %host.device, port = host.port, "RDMA listener up");
        Ok(Some((Arc::new(host), listener)))
    }

    /// The listener's port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// What the negotiation knows of this server.
    pub(crate) fn offer(host: Option<&Arc<RdmaHost>>) -> ServerRdma {
        ServerRdma { device: host.map(|h| h.device.clone()), port: host.map_or(0, |h| h.port), enabled: host.is_some() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops accepting (the accepting thread ends within its wait).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// The waiting session `id` when `secret` is its (compared in constant
    /// time); taken out: one connection per session.
    fn admit(&self, id: u64, secret: &[u8]) -> Option<Waiting> {
        let mut waiting = self.lock();
        let own = waiting.get(&id).is_some_and(|w| constant_time_eq(&w.secret, secret));
        if own { waiting.remove(&id) } else { None }
    }

    fn server_config(&self) -> Config {
        let mut c = Config::new(Role::Server, RemoteRegion { addr: 0, len: region_bytes(), rkey: 0 });
        c.slots = SLOTS;
        c.slot_size = SLOT_BYTES;
        c.max_frame = self.max_frame;
        c.max_get_chunk = GET_CHUNK;
        c.max_gets_in_flight = GETS_IN_FLIGHT;
        c.handshake_timeout = self.handshake_timeout;
        c.idle_timeout = self.idle_timeout;
        c
    }
}

fn region_bytes() -> u64 {
    u64::from(SLOTS) * u64::from(SLOT_BYTES)
}

fn regions() -> Regions {
    Regions { writable: region_bytes() as usize, source: usize::from(GETS_IN_FLIGHT) * GET_CHUNK as usize }
}

/// Accepts RDMA connections until [`RdmaHost::stop`]; each on a thread of
/// its own, at most the host's bound at once.
pub(crate) fn serve(
    host: Arc<RdmaHost>,
    mut listener: Box<dyn Listen>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("gpupool-rdma-accept".into()).spawn(move || {
        while !host.stop.load(Ordering::Acquire) {
            let accepted = Endpoint::accept(
                &mut *listener,
                host.server_config(),
                regions(),
                Duration::from_millis(100),
                host.handshake_timeout,
            );
            let endpoint = match accepted {
                Ok(Some(ep)) => ep,
                Ok(None) => continue,
                Err(e) => {
                    tracing::info!(error = %e, "RDMA connection not set up");
                    continue;
                }
            };
            if host.threads.fetch_add(1, Ordering::AcqRel) >= host.max_threads {
                host.threads.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!("RDMA connection refused: too many at once");
                continue;
            }
            let h = host.clone();
            let spawned = std::thread::Builder::new().name("gpupool-rdma".into()).spawn(move || {
                connection(&h, endpoint);
                h.threads.fetch_sub(1, Ordering::AcqRel);
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start an RDMA connection thread");
                host.threads.fetch_sub(1, Ordering::AcqRel);
            }
        }
    })
}

/// The session's half of an admitted connection.
#[derive(Debug)]
struct Attached {
    frames: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<Out>,
    wake: Wake,
    /// How the connection ended (`None` while it is up).
    ended: watch::Receiver<Option<Result<u32, String>>>,
    /// Set when the session stops the connection (it moves).
    stop: Arc<AtomicBool>,
}

/// What the session asks of its connection's thread.
#[derive(Debug)]
enum Out {
    Frame(Vec<u8>),
    Close(u32),
}

/// One connection: its `Hello` with a waiting session's secret within the
/// handshake timeout, then the session's traffic until either side ends it.
fn connection(host: &RdmaHost, mut ep: Endpoint) {
    let deadline = Instant::now() + host.handshake_timeout;
    let (session_id, secret) = match ep.next_event(deadline) {
        Ok(Event::Connected { session_id, secret }) => (session_id, secret),
        Ok(other) => return tracing::info!(event = ?other, "RDMA connection ended before its Hello"),
        Err(e) => return tracing::info!(error = %e, "RDMA connection without a Hello"),
    };
    let Some(waiting) = host.admit(session_id, &secret) else {
        add(&host.metrics.sessions_refused, 1);
        tracing::info!(session = session_id, "RDMA connection refused: no session waits for it with this secret");
        ep.conn().close(close_code::UNAUTHORIZED, Instant::now());
        let _ = ep.next_event(Instant::now() + Duration::from_millis(200));
        return;
    };
    let (frames_tx, frames) = mpsc::channel(QUEUED_FRAMES);
    let (out, mut out_rx) = mpsc::channel(QUEUED_FRAMES);
    let (ended_tx, ended) = watch::channel(None);
    let stop = Arc::new(AtomicBool::new(false));
    let attached = Attached { frames, out, wake: ep.waker(), ended, stop: stop.clone() };
    if waiting.admitted.send(attached).is_err() {
        ep.conn().close(close_code::NORMAL, Instant::now());
        let _ = ep.next_event(Instant::now() + Duration::from_millis(200));
        return;
    }
    // The client uses the connection once it knows it is admitted.
    let admitted = v1::Welcome { session_id, ..Default::default() }.encode_to_vec();
    if let Err(e) = ep.conn().send_frame(&admitted, Instant::now()) {
        tracing::warn!(error = %e, "RDMA admission not sent");
    }
    add(&host.metrics.rdma_attachments, 1);
    tracing::info!(session = session_id, "RDMA connection attached");
    let mut pump = Pump {
        bulk: waiting.bulk,
        stop,
        metrics: host.metrics.clone(),
        frames: frames_tx,
        held: None,
        outgoing: None,
        next_source: 0,
    };
    let result = pump.run(&mut ep, &mut out_rx);
    match &result {
        Ok(code) => tracing::debug!(session = session_id, code, "RDMA connection closed"),
        Err(e) => tracing::info!(session = session_id, error = %e, "RDMA connection lost"),
    }
    let _ = ended_tx.send(Some(result));
}

/// A connection's thread: the NIC, the session's frames both ways, copies.
struct Pump {
    bulk: Arc<BulkService>,
    /// The session stopped the connection: nothing more is served.
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    frames: mpsc::Sender<Vec<u8>>,
    /// An event the session could not take yet (its queue was full).
    held: Option<Event>,
    /// A frame the core could not queue yet (backpressure).
    outgoing: Option<Out>,
    /// The source-region chunk the next download answer is written from.
    next_source: u16,
}

impl Pump {
    /// Runs until the connection ends: `Ok(code)` closed, `Err` lost.
    fn run(&mut self, ep: &mut Endpoint, out: &mut mpsc::Receiver<Out>) -> Result<u32, String> {
        let driven = ep.drive(IDLE_WAIT, |ep| {
            if self.stop.load(Ordering::Acquire) {
                // No event is taken any more: an upload not staged yet
                // stays unconfirmed, and its client repeats it where the
                // session goes.
                return ControlFlow::Break(Err("stopped: the session moves".into()));
            }
            let moved = self.take_commands(ep, out);
            match self.hand_events(ep) {
                Ok(m) => ControlFlow::Continue(moved | m),
                Err(ended) => ControlFlow::Break(ended),
            }
        });
        driven.map_err(|e| e.to_string())?
    }

    /// Queues what the session sent; whether anything was.
    fn take_commands(&mut self, ep: &mut Endpoint, out: &mut mpsc::Receiver<Out>) -> bool {
        let mut moved = false;
        loop {
            let item = match self.outgoing.take() {
                Some(item) => item,
                None => match out.try_recv() {
                    Ok(item) => item,
                    Err(mpsc::error::TryRecvError::Empty) => return moved,
                    // The session let go of the attachment: end it.
                    Err(mpsc::error::TryRecvError::Disconnected) => Out::Close(close_code::NORMAL),
                },
            };
            moved = true;
            let now = Instant::now();
            match item {
                Out::Frame(body) => match ep.conn().send_frame(&body, now) {
                    Ok(()) => {}
                    Err(RdmaError::Backpressure(_)) => {
                        self.outgoing = Some(Out::Frame(body));
                        return moved;
                    }
                    Err(e) => tracing::warn!(error = %e, "a reply could not go over RDMA"),
                },
                Out::Close(code) => {
                    ep.conn().close(code, now);
                    return moved;
                }
            }
        }
    }

    /// Hands the core's events on; `Err` with the connection's end.
    fn hand_events(&mut self, ep: &mut Endpoint) -> Result<bool, Result<u32, String>> {
        let mut moved = false;
        loop {
            let Some(event) = self.held.take().or_else(|| ep.conn().poll_event()) else { return Ok(moved) };
            let now = Instant::now();
            match event {
                Event::Frame(body) => match self.frames.try_send(body) {
                    Ok(()) => add(&self.metrics.rdma_frames, 1),
                    Err(mpsc::error::TrySendError::Full(body)) => {
                        // Not a move: the thread waits (a round of
                        // IDLE_WAIT at most) until the session takes some.
                        self.held = Some(Event::Frame(body));
                        return Ok(moved);
                    }
                    // Nobody reads the session's commands any more.
                    Err(mpsc::error::TrySendError::Closed(_)) => ep.conn().close(close_code::NORMAL, now),
                },
                Event::PutChunk { id, total, offset, len, slot } => {
                    let code = match self.put(ep, id, total, offset, len, slot) {
                        Ok(()) => 0,
                        Err(e) => {
                            tracing::debug!(id, offset, error = %e.message, "RDMA upload chunk refused");
                            e.code
                        }
                    };
                    if let Err(e) = ep.conn().release_slot(slot, code, now) {
                        tracing::warn!(error = %e, "RDMA slot release failed");
                    }
                }
                Event::GetRequest(ticket) => self.answer(ep, ticket, now),
                Event::Ended(result) => return Err(result.map_err(|e| e.to_string())),
                // Client-side events never reach a server's connection.
                other => tracing::warn!(event = ?other, "unexpected RDMA event on the server"),
            }
            moved = true;
        }
    }

    fn put(
        &mut self,
        ep: &mut Endpoint,
        id: u64,
        total: u64,
        offset: u64,
        len: u32,
        slot: u16,
    ) -> Result<(), CallError> {
        let len = len as usize;
        let mut buf = crate::staging::buffers()
            .take(len)
            .ok_or_else(|| CallError::out_of_memory(format!("cannot allocate {len} bytes")))?;
        let bytes = buf.as_vec_mut();
        bytes.resize(len, 0);
        // Copied out of the slot before use: the slot is the client's to
        // write again once released.
        ep.read(PEER_WRITABLE, u64::from(slot) * u64::from(SLOT_BYTES), bytes)
            .map_err(|e| CallError::invalid_value(e.to_string()))?;
        self.bulk.put(id, total, offset, buf.freeze())?;
        add(&self.metrics.rdma_bytes, len as u64);
        Ok(())
    }

    fn answer(&mut self, ep: &mut Endpoint, ticket: GetTicket, now: Instant) {
        let staged = self.bulk.get(ticket.id, ticket.offset, u64::from(ticket.len)).and_then(|bytes| {
            if bytes.len() == ticket.len as usize {
                Ok(bytes)
            } else {
                Err(CallError::invalid_value(format!("staged {} bytes, asked {}", bytes.len(), ticket.len)))
            }
        });
        // Chunks of the source region in turn: the client asks for the
        // next one only after the answer to the one GETS_IN_FLIGHT before
        // arrived (answers go in order), so that chunk was written out.
        let chunk = u64::from(self.next_source) * u64::from(GET_CHUNK);
        let written = staged.and_then(|bytes| {
            ep.write(gpupool_rdma::endpoint::SOURCE, chunk, &bytes).map_err(|e| CallError::invalid_value(e.to_string()))
        });
        let answered = match written {
            Ok(()) => {
                self.next_source = (self.next_source + 1) % GETS_IN_FLIGHT;
                add(&self.metrics.rdma_bytes, u64::from(ticket.len));
                ep.conn().answer_get(ticket, source(chunk, ticket.len), now)
            }
            Err(e) => {
                tracing::debug!(id = ticket.id, error = %e.message, "RDMA download chunk refused");
                ep.conn().refuse_get(ticket, e.code, now)
            }
        };
        if let Err(e) = answered {
            tracing::warn!(error = %e, "RDMA download answer failed");
        }
    }
}

/// Sessions whose commands may move to RDMA.
#[derive(Debug)]
pub(crate) struct Rdma;

impl Transport for Rdma {
    type Link = RdmaLink;
    type Sender = RdmaSender;
    type Receiver = RdmaReceiver;
}

/// Where a session's commands go.
type Path = beside::Path<AttachedShared>;

/// The parts of an admitted connection the link and the sender share.
#[derive(Debug)]
struct AttachedShared {
    out: mpsc::Sender<Out>,
    wake: Wake,
    ended: watch::Receiver<Option<Result<u32, String>>>,
    stop: Arc<AtomicBool>,
    /// The session stopped the connection itself (it moves): its end is
    /// not the attachment's (QUIC's close is).
    stopped: AtomicBool,
}

impl AttachedShared {
    fn ended_with(&self) -> Option<Result<u32, String>> {
        self.ended.borrow().clone()
    }
}

impl Beside for AttachedShared {
    type Ended = Result<u32, String>;
    fn ended(&self) -> &watch::Receiver<Option<Result<u32, String>>> {
        &self.ended
    }
    fn stopped(&self) -> &AtomicBool {
        &self.stopped
    }
}

/// The session's link: its QUIC connection (control), and its RDMA
/// connection once admitted.
#[derive(Debug, Clone)]
pub(crate) struct RdmaLink {
    quic: quinn::Connection,
    path: watch::Receiver<Path>,
    /// To register the session's wait for its connection (fresh sessions).
    setup: Option<Arc<Setup>>,
}

/// A fresh session's registration with the host: the `Welcome.rdma` to
/// send, and the connection once it is admitted.
#[derive(Debug)]
struct Setup {
    host: Arc<RdmaHost>,
    id: u64,
    accept: Accept,
    admitted: Mutex<Option<oneshot::Receiver<Attached>>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.host.lock().remove(&self.id);
    }
}

/// The sending half: QUIC until the RDMA connection was chosen.
#[derive(Debug)]
pub(crate) struct RdmaSender {
    quic: quinn::SendStream,
    path: watch::Receiver<Path>,
}

/// The receiving half; its first read decides the path.
#[derive(Debug)]
pub(crate) struct RdmaReceiver {
    quic: quinn::RecvStream,
    conn: quinn::Connection,
    decide: Option<watch::Sender<Path>>,
    path: watch::Receiver<Path>,
    setup: Option<Arc<Setup>>,
    frames: Option<mpsc::Receiver<Vec<u8>>>,
    timeout: Duration,
}

/// A fresh session's attachment that may move to RDMA: `accept` is the
/// negotiation's answer for its `Welcome`. Decided by its first read.
pub(crate) fn pending(host: Arc<RdmaHost>, id: u64, accept: Accept, attachment: Attachment<Quic>) -> Attachment<Rdma> {
    let (decide, path) = watch::channel(Path::Pending);
    let timeout = host.handshake_timeout;
    let setup = Arc::new(Setup { host, id, accept, admitted: Mutex::new(None) });
    let Attachment { link, sender, receiver } = attachment;
    Attachment {
        link: RdmaLink { quic: link.clone(), path: path.clone(), setup: Some(setup.clone()) },
        sender: RdmaSender { quic: sender, path: path.clone() },
        receiver: RdmaReceiver {
            quic: receiver,
            conn: link,
            decide: Some(decide),
            path,
            setup: Some(setup),
            frames: None,
            timeout,
        },
    }
}

/// A reattachment arrives on QUIC and stays there.
impl From<Attachment<Quic>> for Attachment<Rdma> {
    fn from(a: Attachment<Quic>) -> Self {
        let (_, path) = watch::channel(Path::Quic);
        Attachment {
            link: RdmaLink { quic: a.link.clone(), path: path.clone(), setup: None },
            sender: RdmaSender { quic: a.sender, path: path.clone() },
            receiver: RdmaReceiver {
                quic: a.receiver,
                conn: a.link,
                decide: None,
                path,
                setup: None,
                frames: None,
                timeout: Duration::ZERO,
            },
        }
    }
}

/// The secret for a session's `Welcome.rdma`.
pub(crate) fn new_secret() -> Vec<u8> {
    rand::random::<[u8; SECRET_LEN]>().to_vec()
}

/// The reason (a `Moved` with no address, under `MIGRATED`) a session's
/// QUIC connection is closed with when its RDMA connection is lost: its
/// client resumes it here, on QUIC.
fn resume_here() -> Vec<u8> {
    v1::Moved::default().encode_to_vec()
}

impl RdmaLink {
    /// The session's QUIC connection (its control connection).
    pub(crate) fn quic(&self) -> &quinn::Connection {
        &self.quic
    }

    fn attached(&self) -> Option<Arc<AttachedShared>> {
        beside::chosen(&self.path)
    }
}

impl Link for RdmaLink {
    fn ended(&self) -> impl std::future::Future<Output = ()> + Send {
        beside::ended(self.quic.clone(), self.path.clone())
    }

    fn lost(&self) -> Option<&'static str> {
        if let Some(Some(Err(_))) = self.attached().map(|a| a.ended_with()) {
            return Some("RDMA connection lost");
        }
        quic_lost(&self.quic)
    }

    fn end(&self, code: u32, reason: &[u8]) {
        if let Some(a) = self.attached() {
            let _ = a.out.try_send(Out::Close(code));
            a.wake.wake();
        }
        self.quic.close(code.into(), reason);
    }

    fn peer(&self) -> String {
        match self.attached() {
            Some(_) => format!("{} (RDMA)", self.quic.remote_address()),
            None => self.quic.remote_address().to_string(),
        }
    }

    fn serve_bulk(self, bulk: Arc<BulkService>) -> impl std::future::Future<Output = ()> + Send {
        // Copies over RDMA are served by the connection's thread (with the
        // service registered in `welcome_rdma`) until `stop_copies`; QUIC
        // bulk streams as on any QUIC link.
        self.quic.serve_bulk(bulk)
    }

    fn stop_copies(&self) -> impl std::future::Future<Output = ()> + Send {
        let attached = self.attached();
        async move {
            let Some(a) = attached else { return };
            a.stopped.store(true, Ordering::Release);
            a.stop.store(true, Ordering::Release);
            a.wake.wake();
            let mut ended = a.ended.clone();
            // Bounded: the thread ends at its next round.
            let _ = tokio::time::timeout(Duration::from_secs(5), ended.wait_for(Option::is_some)).await;
        }
    }

    fn welcome_rdma(&self, bulk: &Arc<BulkService>) -> Option<v1::RdmaAccept> {
        let setup = self.setup.as_ref()?;
        let (admitted, rx) = oneshot::channel();
        let waiting = Waiting { secret: setup.accept.secret.clone(), bulk: bulk.clone(), admitted };
        setup.host.lock().insert(setup.id, waiting);
        *setup.admitted.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
        Some(v1::RdmaAccept::from(&setup.accept))
    }
}

fn quic_lost(conn: &quinn::Connection) -> Option<&'static str> {
    match conn.close_reason() {
        Some(quinn::ConnectionError::TimedOut) => Some("idle timeout"),
        Some(quinn::ConnectionError::Reset) => Some("connection reset"),
        _ => None,
    }
}

impl FrameSender for RdmaSender {
    async fn send_frame(&mut self, frame: &[u8]) -> Result<(), SendError> {
        let attached = beside::chosen(&self.path);
        let Some(a) = attached else {
            return self.quic.write_all(frame).await.map_err(|e| SendError(e.to_string()));
        };
        if a.stopped.load(Ordering::Acquire) {
            // The session moves: the reply is in its replay log (recorded
            // before the send) and goes out where the session goes.
            return Ok(());
        }
        // RDMA frames are delimited by the core: the body goes alone.
        let body = frame.get(frame::HEADER_LEN..).unwrap_or_default().to_vec();
        a.out.send(Out::Frame(body)).await.map_err(|_| SendError("the RDMA connection ended".into()))?;
        a.wake.wake();
        Ok(())
    }

    async fn finish_within(mut self, linger: Duration) {
        if matches!(&*self.path.borrow(), Path::Beside(_)) {
            // What was queued goes out before the close the session sends next.
            return;
        }
        if self.quic.finish().is_ok() {
            let _ = tokio::time::timeout(linger, self.quic.stopped()).await;
        }
    }
}

impl RdmaReceiver {
    /// The first read of a fresh session: the RDMA connection when it is
    /// admitted first, else QUIC (a batch came there, or nothing in time).
    async fn decide(&mut self, max: usize) -> Option<Result<Option<Bytes>, RecvError>> {
        let decide = self.decide.take()?;
        let admitted = self.setup.as_ref().and_then(|s| s.admitted.lock().unwrap_or_else(|e| e.into_inner()).take());
        let Some(admitted) = admitted else {
            decide.send_replace(Path::Quic);
            return None;
        };
        let decided = tokio::select! {
            Ok(attached) = admitted => {
                self.frames = Some(attached.frames);
                decide.send_replace(Path::Beside(Arc::new(AttachedShared {
                    out: attached.out,
                    wake: attached.wake,
                    ended: attached.ended,
                    stop: attached.stop,
                    stopped: AtomicBool::new(false),
                })));
                None
            }
            first = quic::read_frame(&mut self.quic, max) => {
                tracing::info!("the client sent its commands on QUIC: its RDMA setup failed");
                decide.send_replace(Path::Quic);
                Some(first)
            }
            () = tokio::time::sleep(self.timeout) => {
                tracing::info!("no RDMA connection within the handshake timeout; the session stays on QUIC");
                decide.send_replace(Path::Quic);
                None
            }
        };
        if let Some(setup) = self.setup.take() {
            // Admitted or not, no other connection is taken for the session.
            setup.host.lock().remove(&setup.id);
        }
        decided
    }
}

impl FrameReceiver for RdmaReceiver {
    async fn recv_frame(&mut self, max: usize) -> Result<Option<Bytes>, RecvError> {
        if let Some(first) = self.decide(max).await {
            return first;
        }
        let attached = beside::chosen(&self.path);
        let (Some(frames), Some(a)) = (self.frames.as_mut(), attached) else {
            return quic::read_frame(&mut self.quic, max).await;
        };
        tokio::select! {
            body = frames.recv() => match body {
                Some(body) if body.len() > max => {
                    Err(RecvError::Frame(frame::FrameError::TooLarge { len: body.len(), max }))
                }
                Some(body) => Ok(Some(Bytes::from(body))),
                None => match a.ended_with() {
                    Some(Ok(_)) => Ok(None),
                    other => {
                        let why = other.and_then(Result::err).unwrap_or_else(|| "ended".into());
                        // The client resumes the session here, on QUIC.
                        self.conn.close(close_code::MIGRATED.into(), &resume_here());
                        Err(RecvError::Stream(format!("RDMA connection lost: {why}")))
                    }
                },
            },
            _ = self.conn.closed() => {
                let _ = a.out.try_send(Out::Close(close_code::NORMAL));
                a.wake.wake();
                Err(RecvError::Stream("the control connection closed".into()))
            }
        }
    }
}

/// The negotiation for a fresh session: RDMA when the client offered it,
/// this server listens, the lease allows it and the versions match.
pub(crate) fn decide(
    host: Option<&Arc<RdmaHost>>,
    offer: Option<&v1::RdmaOffer>,
    lease_allows: bool,
) -> negotiate::Decision {
    negotiate::decide(offer, &RdmaHost::offer(host), lease_allows, new_secret())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_proto::rdma::negotiate::{Decision, Fallback};

    fn config(mode: RdmaMode, provider: Option<Arc<dyn Provider>>) -> ServerConfig {
        let mut c = ServerConfig::new(([127, 0, 0, 1], 0).into(), vec!["t".into()]);
        c.rdma.mode = mode;
        c.rdma.provider = provider;
        c
    }

    fn offer() -> v1::RdmaOffer {
        v1::RdmaOffer { device: "mem0".into(), core_version: gpupool_proto::rdma::CORE_VERSION }
    }

    #[test]
    fn the_listener_follows_the_mode_and_the_provider() {
        let metrics = Arc::new(Metrics::default());
        assert!(RdmaHost::bind(&config(RdmaMode::Off, None), metrics.clone()).expect("off").is_none());
        // No provider given and (in these tests) no verbs device.
        assert!(RdmaHost::bind(&config(RdmaMode::Auto, None), metrics.clone()).expect("auto").is_none());
        let err = RdmaHost::bind(&config(RdmaMode::On, None), metrics.clone()).expect_err("on without a device");
        assert!(err.to_string().contains("--rdma on"), "{err}");
        let fabric: Arc<dyn Provider> = Arc::new(gpupool_rdma::mem::MemFabric::new("mem0"));
        let (host, listener) =
            RdmaHost::bind(&config(RdmaMode::On, Some(fabric)), metrics).expect("on").expect("a listener");
        assert_eq!(host.port(), listener.port());
        assert_eq!(
            RdmaHost::offer(Some(&host)),
            ServerRdma { device: Some("mem0".into()), port: host.port(), enabled: true }
        );
    }

    #[test]
    fn the_decision_needs_an_offer_a_listener_and_the_lease() {
        let fabric: Arc<dyn Provider> = Arc::new(gpupool_rdma::mem::MemFabric::new("mem0"));
        let (host, _listener) =
            RdmaHost::bind(&config(RdmaMode::On, Some(fabric)), Arc::default()).expect("on").expect("a listener");
        assert_eq!(decide(Some(&host), None, true), Decision::Quic(Fallback::NotOffered));
        assert_eq!(decide(None, Some(&offer()), true), Decision::Quic(Fallback::Disabled));
        assert_eq!(decide(Some(&host), Some(&offer()), false), Decision::Quic(Fallback::LeaseForbids));
        let Decision::Rdma(accept) = decide(Some(&host), Some(&offer()), true) else { panic!("accepted") };
        assert_eq!((accept.port, accept.secret.len()), (host.port(), SECRET_LEN));
        let Decision::Rdma(again) = decide(Some(&host), Some(&offer()), true) else { panic!("accepted") };
        assert_ne!(accept.secret, again.secret, "a secret per session");
    }
}
