//! RDMA for a session's commands and bulk copies (issue 22,
//! `docs/rdma.md`), beside QUIC: the session opens on QUIC with an offer in
//! its `Hello` (when a device is found and RDMA is not turned off); when
//! the server accepts (`Welcome.rdma`), the client connects with rdma_cm to
//! the port it names, presents the secret in its RDMA `Hello`, and waits
//! for the server's confirmation (a `Welcome` frame over RDMA). From then
//! on batches and replies go as frames over the queue pair, uploads as RDMA
//! WRITEs into the server's staging slots, downloads as the server's WRITEs
//! into this side's landing region.
//!
//! Any setup error (no device, a refused or failed connection, no
//! confirmation in time) keeps the session on QUIC, logged at `info`; the
//! program never fails for it. A connection lost later is a lost
//! attachment: the server closes the session's QUIC connection ("resume
//! here"), and the session resumes on QUIC through [`QuicTransport`]'s
//! resume, sending again the batches it did not answer. It stays on QUIC.
//!
//! The connection is driven by a thread of its own (its keepalives run
//! while the program is idle); the program's threads hand it frames and
//! copies through bounded channels.

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::transport::{QuicTransport, Transport};
use bytes::Bytes;
use gpupool_proto::rdma::negotiate;
use gpupool_proto::rdma::{CORE_VERSION, Config, Event, RdmaError, RemoteRegion, Role};
use gpupool_proto::{frame, v1};
use gpupool_rdma::endpoint::{PEER_WRITABLE, SOURCE, source};
use gpupool_rdma::nic::Wake;
use gpupool_rdma::{Endpoint, Provider, Regions};
use prost::Message;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Frames queued towards the connection's thread, and replies from it.
const QUEUED_FRAMES: usize = 64;
/// Longest idle wait of the connection's thread.
const IDLE_WAIT: Duration = Duration::from_millis(5);
/// How often a wait on the RDMA connection looks at the QUIC connection.
const QUIC_CHECK: Duration = Duration::from_millis(100);
/// Longest wait for the server's confirmation after connecting.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

/// Opens a session: over QUIC, moving to RDMA when both ends can, else
/// its commands to shared memory when both ends can (`crate::shm_commands`).
pub(crate) fn connect(config: &ClientConfig) -> Result<Box<dyn Transport>> {
    let provider = if config.rdma.enabled { probe(config) } else { None };
    let offer = provider.as_ref().map(|p| v1::RdmaOffer { device: p.device(), core_version: CORE_VERSION });
    let offered = offer.is_some();
    let quic = QuicTransport::connect_with(config, offer)?;
    let Some(provider) = provider else { return Ok(crate::shm_commands::wrap(quic, config)) };
    let accept = match negotiate::accepted(offered, quic.welcome().rdma.as_ref()) {
        Ok(Some(accept)) => accept,
        Ok(None) => {
            tracing::debug!("the server keeps the session on QUIC");
            return Ok(crate::shm_commands::wrap(quic, config));
        }
        Err(e) => {
            tracing::info!(error = %e, "RDMA answer unusable; the session stays on QUIC");
            return Ok(crate::shm_commands::wrap(quic, config));
        }
    };
    let addr = SocketAddr::new(config.server.ip(), accept.port);
    match Channel::open(&*provider, addr, config, quic.welcome().session_id, accept.secret) {
        Ok(channel) => {
            tracing::info!(device = %provider.device(), %addr, "the session's commands and copies go over RDMA");
            Ok(Box::new(RdmaTransport {
                quic,
                rdma: Mutex::new(Some(Arc::new(channel))),
                bulk: Mutex::new(()),
                reply_timeout: config.reply_timeout,
                region: config.rdma.region_bytes,
            }))
        }
        Err(e) => {
            // The server reads its first batch from QUIC then.
            tracing::info!(%addr, error = %e, "RDMA setup failed; the session stays on QUIC");
            Ok(crate::shm_commands::wrap(quic, config))
        }
    }
}

/// The configured provider, or this machine's device; `None` (logged at
/// `debug`) without one.
fn probe(config: &ClientConfig) -> Option<Arc<dyn Provider>> {
    match config.rdma.provider.clone().map_or_else(gpupool_rdma::probe, Ok) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::debug!(reason = %e, "no RDMA device; not offered");
            None
        }
    }
}

/// A session over RDMA, with QUIC as its control connection and fallback.
#[derive(Debug)]
pub(crate) struct RdmaTransport {
    quic: QuicTransport,
    /// The RDMA connection; `None` once it was lost or closed.
    rdma: Mutex<Option<Arc<Channel>>>,
    /// One copy at a time over RDMA (its regions are the connection's).
    bulk: Mutex<()>,
    reply_timeout: Duration,
    region: usize,
}

/// What the program's threads ask of the connection's thread.
#[derive(Debug)]
enum Cmd {
    Frame(Vec<u8>),
    Put { id: u64, total: u64, at: u64, data: Vec<u8>, done: SyncSender<Result<()>> },
    Get { id: u64, offset: u64, len: u64, done: SyncSender<Result<Vec<u8>>> },
    Close(u32),
}

/// The connection's thread and its channels.
#[derive(Debug)]
struct Channel {
    cmds: SyncSender<Cmd>,
    replies: Mutex<Receiver<Vec<u8>>>,
    wake: Wake,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Channel {
    /// Connects, exchanges the `Hello`s, and waits for the server's
    /// confirmation; then starts the connection's thread.
    fn open(
        provider: &dyn Provider,
        addr: SocketAddr,
        config: &ClientConfig,
        session_id: u64,
        secret: Vec<u8>,
    ) -> Result<Channel> {
        let setup = |e: gpupool_rdma::Error| ClientError::Connect(format!("RDMA: {e}"));
        let region = config.rdma.region_bytes;
        let mut c = Config::new(Role::Client, RemoteRegion { addr: 0, len: region as u64, rkey: 0 });
        c.session_id = session_id;
        c.secret = secret;
        c.idle_timeout = config.rdma.idle_timeout;
        let regions = Regions { writable: region, source: region };
        let limit = config.connect_timeout.min(CONFIRM_WITHIN);
        let mut ep = Endpoint::connect(provider, addr, c, regions, limit).map_err(setup)?;
        let deadline = Instant::now() + limit;
        match ep.next_event(deadline).map_err(setup)? {
            Event::Connected { .. } => {}
            other => return Err(ClientError::Connect(format!("RDMA: {other:?} instead of the server's Hello"))),
        }
        // The server admitted this connection to the session.
        match ep.next_event(deadline).map_err(setup)? {
            Event::Frame(body) if v1::Welcome::decode(&body[..]).is_ok_and(|w| w.session_id == session_id) => {}
            other => return Err(ClientError::Connect(format!("RDMA: not admitted ({other:?})"))),
        }
        let (cmds, cmd_rx) = mpsc::sync_channel(QUEUED_FRAMES);
        let (reply_tx, replies) = mpsc::sync_channel(QUEUED_FRAMES);
        let wake = ep.waker();
        let thread = std::thread::Builder::new()
            .name("gpupool-rdma".into())
            .spawn(move || {
                let mut pump = Pump { replies: reply_tx, held: None, pending: None, op: None };
                match pump.run(&mut ep, &cmd_rx) {
                    Ok(code) => tracing::debug!(code, "RDMA connection closed"),
                    Err(e) => tracing::info!(error = %e, "RDMA connection lost"),
                }
            })
            .map_err(|e| ClientError::Connect(format!("cannot start the RDMA thread: {e}")))?;
        Ok(Channel { cmds, replies: Mutex::new(replies), wake, thread: Mutex::new(Some(thread)) })
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        self.cmds.send(cmd).map_err(|_| ClientError::ConnectionLost("the RDMA connection ended".into()))?;
        self.wake.wake();
        Ok(())
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        let queued = self.cmds.try_send(Cmd::Close(gpupool_proto::close_code::NORMAL)).is_ok();
        self.wake.wake();
        // Ends once the close went out (or the connection's timeout). With
        // its queue full the thread closes once the queue's sender is gone
        // (after this): it is left to end then, not waited for.
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread.filter(|_| queued) {
            let _ = thread.join();
        }
    }
}

/// A copy the connection's thread is serving.
enum Op {
    Put(SyncSender<Result<()>>),
    Get(usize, SyncSender<Result<Vec<u8>>>),
}

/// The connection's thread.
struct Pump {
    replies: SyncSender<Vec<u8>>,
    /// A reply the program has not taken room for yet.
    held: Option<Vec<u8>>,
    /// A command the core could not queue yet (backpressure).
    pending: Option<Cmd>,
    op: Option<Op>,
}

impl Pump {
    fn run(&mut self, ep: &mut Endpoint, cmds: &Receiver<Cmd>) -> std::result::Result<u32, String> {
        let driven = ep.drive(IDLE_WAIT, |ep| {
            let moved = self.commands(ep, cmds);
            match self.events(ep) {
                Ok(m) => ControlFlow::Continue(moved | m),
                Err(ended) => ControlFlow::Break(ended),
            }
        });
        let result = driven.map_err(|e| e.to_string()).and_then(|r| r);
        let lost = || ClientError::ConnectionLost("the RDMA connection ended".into());
        match self.op.take() {
            Some(Op::Put(done)) => {
                let _ = done.send(Err(lost()));
            }
            Some(Op::Get(_, done)) => {
                let _ = done.send(Err(lost()));
            }
            None => {}
        }
        result
    }

    fn commands(&mut self, ep: &mut Endpoint, cmds: &Receiver<Cmd>) -> bool {
        let mut moved = false;
        loop {
            // A copy waits for the one before it (its regions are reused).
            if self.op.is_some() && matches!(self.pending, Some(Cmd::Put { .. } | Cmd::Get { .. })) {
                return moved;
            }
            let cmd = match self.pending.take() {
                Some(cmd) => cmd,
                None => match cmds.try_recv() {
                    Ok(cmd) => cmd,
                    Err(TryRecvError::Empty) => return moved,
                    Err(TryRecvError::Disconnected) => Cmd::Close(gpupool_proto::close_code::NORMAL),
                },
            };
            if self.op.is_some() && matches!(cmd, Cmd::Put { .. } | Cmd::Get { .. }) {
                self.pending = Some(cmd);
                return moved;
            }
            moved = true;
            let now = Instant::now();
            match cmd {
                Cmd::Frame(body) => match ep.conn().send_frame(&body, now) {
                    Ok(()) => {}
                    Err(RdmaError::Backpressure(_)) => {
                        self.pending = Some(Cmd::Frame(body));
                        return moved;
                    }
                    Err(e) => tracing::warn!(error = %e, "a batch could not go over RDMA"),
                },
                Cmd::Put { id, total, at, data, done } => {
                    let started =
                        ep.write(SOURCE, 0, &data).map_err(|e| ClientError::Protocol(e.to_string())).and_then(|()| {
                            let local = source(0, data.len() as u32);
                            ep.conn().put_at(id, total, at, local, now).map_err(rdma_error)
                        });
                    match started {
                        Ok(()) => self.op = Some(Op::Put(done)),
                        Err(e) => {
                            let _ = done.send(Err(e));
                        }
                    }
                }
                Cmd::Get { id, offset, len, done } => match ep.conn().get(id, offset, len, 0, now) {
                    Ok(()) => self.op = Some(Op::Get(len as usize, done)),
                    Err(e) => {
                        let _ = done.send(Err(rdma_error(e)));
                    }
                },
                Cmd::Close(code) => {
                    ep.conn().close(code, now);
                    return moved;
                }
            }
        }
    }

    fn events(&mut self, ep: &mut Endpoint) -> std::result::Result<bool, std::result::Result<u32, String>> {
        let mut moved = false;
        loop {
            if let Some(body) = self.held.take() {
                match self.replies.try_send(body) {
                    Ok(()) => {}
                    Err(TrySendError::Full(body)) => {
                        self.held = Some(body);
                        return Ok(moved);
                    }
                    // The program let go of the session.
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
            let Some(event) = ep.conn().poll_event() else { return Ok(moved) };
            moved = true;
            match event {
                Event::Frame(body) => self.held = Some(body),
                Event::PutDone { .. } => {
                    if let Some(Op::Put(done)) = self.op.take() {
                        let _ = done.send(Ok(()));
                    }
                }
                Event::PutFailed { code, .. } => {
                    if let Some(Op::Put(done)) = self.op.take() {
                        let message = "the server refused an upload chunk".to_string();
                        let _ = done.send(Err(ClientError::Cuda { code, message }));
                    }
                }
                Event::GetDone { .. } => {
                    if let Some(Op::Get(len, done)) = self.op.take() {
                        let mut out = vec![0; len];
                        let read =
                            ep.read(PEER_WRITABLE, 0, &mut out).map_err(|e| ClientError::Protocol(e.to_string()));
                        let _ = done.send(read.map(|()| out));
                    }
                }
                Event::GetFailed { code, .. } => {
                    if let Some(Op::Get(_, done)) = self.op.take() {
                        let message = "the server refused a download chunk".to_string();
                        let _ = done.send(Err(ClientError::Cuda { code, message }));
                    }
                }
                Event::Ended(result) => return Err(result.map_err(|e| e.to_string())),
                Event::PutWritten { .. } | Event::Connected { .. } => {}
                other => tracing::warn!(event = ?other, "unexpected RDMA event on the client"),
            }
        }
    }
}

fn rdma_error(e: RdmaError) -> ClientError {
    match e {
        RdmaError::TooLarge { .. } | RdmaError::Misuse(_) => ClientError::Protocol(e.to_string()),
        other => ClientError::ConnectionLost(other.to_string()),
    }
}

impl RdmaTransport {
    fn channel(&self) -> Option<Arc<Channel>> {
        self.rdma.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The connection for a copy: none when shared memory with the server
    /// carries copies (a client on the server's host: memory is faster
    /// than a NIC), which then go through it while commands stay on RDMA.
    fn copy_channel(&self) -> Option<Arc<Channel>> {
        self.quic.shared_memory_bytes().is_none().then(|| self.channel()).flatten()
    }

    /// The RDMA connection is gone: the session resumes on QUIC.
    fn fail_over(&self, error: ClientError) -> Result<()> {
        let channel = self.rdma.lock().unwrap_or_else(|e| e.into_inner()).take();
        if channel.is_none() {
            // Another thread failed over already.
            return Ok(());
        }
        tracing::info!(reason = %error, "RDMA connection lost; the session resumes on QUIC");
        drop(channel);
        self.quic.recover_lost_attachment(error)
    }

    /// The next item of `rx` within the reply timeout. The session's QUIC
    /// connection closing (the server ended or moved the session) ends
    /// the wait as a lost connection, as the RDMA connection's end does.
    fn receive<T>(&self, rx: &Receiver<T>) -> Result<T> {
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(QUIC_CHECK)) {
                Ok(item) => return Ok(item),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ClientError::ConnectionLost("the RDMA connection ended".into()));
                }
                Err(RecvTimeoutError::Timeout) if !self.quic.links_open() => {
                    return Err(ClientError::ConnectionLost("the session's QUIC connection closed".into()));
                }
                Err(RecvTimeoutError::Timeout) if left.is_zero() => {
                    return Err(ClientError::Timeout(self.reply_timeout));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Waits for `done`'s answer.
    fn wait<T>(&self, done: Receiver<Result<T>>) -> Result<T> {
        self.receive(&done)?
    }

    fn put_rdma(&self, channel: &Channel, id: u64, data: &[u8]) -> Result<()> {
        let _one = self.bulk.lock().unwrap_or_else(|e| e.into_inner());
        for (i, piece) in data.chunks(self.region).enumerate() {
            let (done, answer) = mpsc::sync_channel(1);
            let at = (i * self.region) as u64;
            let cmd = Cmd::Put { id, total: data.len() as u64, at, data: piece.to_vec(), done };
            channel.send(cmd)?;
            self.wait(answer)?;
        }
        Ok(())
    }

    fn get_rdma(&self, channel: &Channel, id: u64, out: &mut [u8]) -> Result<()> {
        let _one = self.bulk.lock().unwrap_or_else(|e| e.into_inner());
        for (i, piece) in out.chunks_mut(self.region).enumerate() {
            let (done, answer) = mpsc::sync_channel(1);
            let offset = (i * self.region) as u64;
            channel.send(Cmd::Get { id, offset, len: piece.len() as u64, done })?;
            piece.copy_from_slice(&self.wait(answer)?);
        }
        Ok(())
    }
}

impl Transport for RdmaTransport {
    fn welcome(&self) -> &v1::Welcome {
        self.quic.welcome()
    }

    fn send_batch(&self, batch: &v1::Batch) -> Result<()> {
        let Some(channel) = self.channel() else { return self.quic.send_batch(batch) };
        let bytes = frame::encode(batch);
        // Kept for a resume, which sends it again over QUIC.
        self.quic.record(batch.seq, bytes.clone());
        match channel.send(Cmd::Frame(bytes[frame::HEADER_LEN..].to_vec())) {
            Ok(()) => Ok(()),
            Err(e) => self.fail_over(e),
        }
    }

    fn recv_reply(&self) -> Result<v1::BatchReply> {
        while let Some(channel) = self.channel() {
            let received = self.receive(&channel.replies.lock().unwrap_or_else(|e| e.into_inner()));
            match received {
                Ok(body) => {
                    if let Some(reply) = self.quic.reply_of(Bytes::from(body))? {
                        return Ok(reply);
                    }
                }
                Err(ClientError::ConnectionLost(why)) => {
                    self.fail_over(ClientError::ConnectionLost(why))?;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        self.quic.recv_reply()
    }

    fn try_recv_reply(&self) -> Option<Result<v1::BatchReply>> {
        let Some(channel) = self.channel() else { return self.quic.try_recv_reply() };
        let replies = channel.replies.try_lock().ok()?;
        // A lost connection is met by the next blocking read.
        let body = replies.try_recv().ok()?;
        drop(replies);
        self.quic.reply_of(Bytes::from(body)).transpose()
    }

    fn bulk_put(&self, id: u64, data: &[u8]) -> Result<()> {
        if let Some(channel) = self.copy_channel() {
            match self.put_rdma(&channel, id, data) {
                Err(ClientError::ConnectionLost(why)) => {
                    // Resumed on QUIC, the upload goes again there (the
                    // same chunks again change nothing in the staging).
                    self.fail_over(ClientError::ConnectionLost(why))?;
                }
                done => return done,
            }
        }
        self.quic.bulk_put(id, data)
    }

    fn bulk_get(&self, id: u64, out: &mut [u8]) -> Result<()> {
        if let Some(channel) = self.copy_channel() {
            match self.get_rdma(&channel, id, out) {
                Err(ClientError::ConnectionLost(why)) => {
                    self.fail_over(ClientError::ConnectionLost(why))?;
                }
                done => return done,
            }
        }
        self.quic.bulk_get(id, out)
    }

    fn close(&self) {
        // The channel's drop closes the RDMA connection.
        drop(self.rdma.lock().unwrap_or_else(|e| e.into_inner()).take());
        self.quic.close();
    }

    fn close_at_exit(&self, limit: Duration) {
        if let Some(channel) = self.rdma.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = channel.cmds.try_send(Cmd::Close(gpupool_proto::close_code::NORMAL));
            channel.wake.wake();
        }
        self.quic.close_at_exit(limit);
    }

    fn bulk_connections(&self) -> usize {
        self.quic.bulk_connections()
    }

    fn shared_memory_bytes(&self) -> Option<u64> {
        self.quic.shared_memory_bytes()
    }

    fn rdma_attached(&self) -> bool {
        self.channel().is_some()
    }
}
