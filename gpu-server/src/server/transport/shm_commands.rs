//! A session's commands through shared memory (the `gpupool-shm` crate's
//! [`Ring`]): for a client on this host with a shared-memory attachment,
//! its batches and the session's replies go as frames through a ring in a
//! memfd of their own, instead of the QUIC command stream.
//!
//! How a session gets there: a fresh session in this process (or a worker
//! process) whose server offers shared memory runs as a [`ShmCmd`]
//! attachment; its `Welcome` says `shm_commands` (the registry waits for a
//! ring for it, [`Link::offer_shm_commands`]). The client attaches its
//! shared-memory region, then sends a `Commands` request with the ring's
//! memfd on the attachment's socket, which hands the checked, mapped ring
//! to the session. The attachment's first read decides where the commands
//! go, as for RDMA: the ring when it arrives first, else QUIC (a batch came
//! there first: the client turned it off or its attachment failed; or
//! nothing came within the handshake timeout, after which no ring is
//! taken). No reply exists before that read, so replies follow batches on
//! one path.
//!
//! A thread per ring reads the client's frames (a bounded spin, then a
//! futex wait with a timeout; a whole frame, at most `max_frame_bytes`, is
//! copied out before the session sees it) into a bounded channel; the
//! replies are written into the other pipe by the reply writer itself (the
//! futex wake is a system call only when the client sleeps).
//!
//! QUIC stays the control connection. A ring that ends other than by the
//! client's clean close (the attachment's socket closed: the client exited
//! or its channel broke; a bad frame or index) is a lost attachment, as a
//! lost RDMA connection is: the server closes the QUIC connection with
//! `MIGRATED` and an empty `Moved` ("resume here"), keeps the session, and
//! the client resumes it on QUIC, where it stays (also after a
//! migration). Nothing is lost or repeated: batches the session did not
//! take are in the client's replay log (resent after `resumed_seq`), and
//! replies the client did not read are in the session's.

use super::beside::{self, Beside};
use super::quic::{self, Quic};
use super::shm::ShmSlot;
use super::{Attachment, FrameReceiver, FrameSender, Link, RecvError, SendError, Transport};
use crate::server::bulk::BulkService;
use crate::server::metrics::{Metrics, add};
use bytes::Bytes;
use gpupool_proto::{close_code, frame, v1};
use gpupool_shm::ring::{Closed, Reader, Ring, Side, Writer};
use prost::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Frames queued from a ring's thread towards the session.
const QUEUED_FRAMES: usize = 64;
/// How long a ring's thread spins for the next batch before it sleeps: a
/// program that launches and synchronizes in a loop sends its next batch
/// within microseconds of a reply; an idle one costs this much CPU once.
/// None on a host with fewer than `quic::SPIN_MIN_CPUS` CPUs, where the
/// spinning thread would take the CPU the session's other threads need
/// (the rule of the client's own spin, `quic::default_spin`).
const SERVER_SPIN: Duration = Duration::from_micros(50);

fn server_spin() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        if cpus >= gpupool_proto::quic::SPIN_MIN_CPUS { SERVER_SPIN } else { Duration::ZERO }
    })
}
/// Longest sleep of a ring's thread (it looks at its stop flag this often).
const SLEEP_SLICE: Duration = Duration::from_millis(100);
/// How long a reply may wait for room in a full ring before the ring counts
/// as broken (the client stopped reading).
const FULL_RING_LIMIT: Duration = Duration::from_secs(30);

/// Sessions whose commands may go through shared memory.
#[derive(Debug)]
pub(crate) struct ShmCmd;

impl Transport for ShmCmd {
    type Link = ShmCmdLink;
    type Sender = ShmCmdSender;
    type Receiver = ShmCmdReceiver;
}

/// Where the session's commands go.
type Path = beside::Path<Attached>;

/// A ring the session took: its reader thread's end, and the pipe for
/// replies.
#[derive(Debug)]
struct Attached {
    ring: Arc<Ring>,
    /// The reply pipe, taken by the sender at its first reply.
    writer: Mutex<Option<Writer>>,
    /// How the reader thread ended (`None` while it runs).
    ended: watch::Receiver<Option<Result<(), String>>>,
    /// Stops the reader thread.
    stop: Arc<AtomicBool>,
    /// The session stopped the ring itself (it moves): its end is not the
    /// attachment's, and replies from now on go where the session goes.
    stopped: AtomicBool,
}

impl Attached {
    fn ended_with(&self) -> Option<Result<(), String>> {
        self.ended.borrow().clone()
    }

    /// Stops the reader thread (it ends at its next look).
    fn halt(&self) {
        self.stop.store(true, Ordering::Release);
        self.ring.wake_all();
    }
}

impl Beside for Attached {
    type Ended = Result<(), String>;
    fn ended(&self) -> &watch::Receiver<Option<Result<(), String>>> {
        &self.ended
    }
    fn stopped(&self) -> &AtomicBool {
        &self.stopped
    }
}

/// The session's link: its QUIC connection (control), and the ring once taken.
#[derive(Debug, Clone)]
pub(crate) struct ShmCmdLink {
    quic: quinn::Connection,
    path: watch::Receiver<Path>,
    /// Where the ring comes, once the session offered it (fresh sessions).
    offer: Option<Arc<Offer>>,
}

#[derive(Debug, Default)]
struct Offer {
    ring: Mutex<Option<oneshot::Receiver<Arc<Ring>>>>,
}

/// The sending half: QUIC until the ring was chosen.
#[derive(Debug)]
pub(crate) struct ShmCmdSender {
    quic: quinn::SendStream,
    path: watch::Receiver<Path>,
    writer: Option<Writer>,
}

/// The receiving half; its first read decides the path.
#[derive(Debug)]
pub(crate) struct ShmCmdReceiver {
    quic: quinn::RecvStream,
    conn: quinn::Connection,
    decide: Option<watch::Sender<Path>>,
    path: watch::Receiver<Path>,
    offer: Option<Arc<Offer>>,
    frames: Option<mpsc::Receiver<Bytes>>,
    timeout: Duration,
    max_frame: usize,
    /// How long to look for the ring's next frame before sleeping
    /// ([`ServerConfig::io_spin`](crate::ServerConfig::io_spin)).
    spin: Duration,
    metrics: Arc<Metrics>,
}

/// A fresh session's attachment whose commands may move to a ring.
pub(crate) fn pending(
    attachment: Attachment<Quic>,
    handshake_timeout: Duration,
    max_frame: usize,
    spin: Duration,
    metrics: Arc<Metrics>,
) -> Attachment<ShmCmd> {
    let (decide, path) = watch::channel(Path::Pending);
    let offer = Arc::new(Offer::default());
    let Attachment { link, sender, receiver } = attachment;
    Attachment {
        link: ShmCmdLink { quic: link.clone(), path: path.clone(), offer: Some(offer.clone()) },
        sender: ShmCmdSender { quic: sender, path: path.clone(), writer: None },
        receiver: ShmCmdReceiver {
            quic: receiver,
            conn: link,
            decide: Some(decide),
            path,
            offer: Some(offer),
            frames: None,
            timeout: handshake_timeout,
            max_frame,
            spin,
            metrics,
        },
    }
}

/// A reattachment arrives on QUIC and stays there.
impl From<Attachment<Quic>> for Attachment<ShmCmd> {
    fn from(a: Attachment<Quic>) -> Self {
        let (_, path) = watch::channel(Path::Quic);
        Attachment {
            link: ShmCmdLink { quic: a.link.clone(), path: path.clone(), offer: None },
            sender: ShmCmdSender { quic: a.sender, path: path.clone(), writer: None },
            receiver: ShmCmdReceiver {
                quic: a.receiver,
                conn: a.link,
                decide: None,
                path,
                offer: None,
                frames: None,
                timeout: Duration::ZERO,
                max_frame: 0,
                spin: Duration::ZERO,
                metrics: Arc::default(),
            },
        }
    }
}

/// The reason (a `Moved` with no address, under `MIGRATED`) the session's
/// QUIC connection is closed with when its ring is lost: its client
/// resumes it here, on QUIC.
fn resume_here() -> Vec<u8> {
    v1::Moved::default().encode_to_vec()
}

fn attached_of(path: &watch::Receiver<Path>) -> Option<Arc<Attached>> {
    beside::chosen(path)
}

impl ShmCmdLink {
    /// The session's QUIC connection (its control connection).
    pub(crate) fn quic(&self) -> &quinn::Connection {
        &self.quic
    }
}

impl Link for ShmCmdLink {
    fn ended(&self) -> impl std::future::Future<Output = ()> + Send {
        beside::ended(self.quic.clone(), self.path.clone())
    }

    fn lost(&self) -> Option<&'static str> {
        if let Some(a) = attached_of(&self.path)
            && !a.stopped.load(Ordering::Acquire)
            && matches!(a.ended_with(), Some(Err(_)))
        {
            return Some("shared-memory command ring lost");
        }
        self.quic.lost()
    }

    fn end(&self, code: u32, reason: &[u8]) {
        if let Some(a) = attached_of(&self.path) {
            a.halt();
            a.ring.close(Side::Server, code == close_code::NORMAL);
        }
        self.quic.close(code.into(), reason);
    }

    fn peer(&self) -> String {
        match attached_of(&self.path) {
            Some(_) => format!("{} (shared memory)", self.quic.remote_address()),
            None => self.quic.remote_address().to_string(),
        }
    }

    fn serve_bulk(self, bulk: Arc<BulkService>) -> impl std::future::Future<Output = ()> + Send {
        // Copies through shared memory are served by the attachment's
        // thread (`shm.rs`); QUIC bulk streams as on any QUIC link.
        self.quic.serve_bulk(bulk)
    }

    fn stop_copies(&self) -> impl std::future::Future<Output = ()> + Send {
        let attached = attached_of(&self.path);
        async move {
            let Some(a) = attached else { return };
            // No batch is taken from the ring any more: those in it stay in
            // the client's replay log and go where the session goes.
            a.stopped.store(true, Ordering::Release);
            a.halt();
            let mut ended = a.ended.clone();
            // Bounded: the thread ends at its next look.
            let _ = tokio::time::timeout(Duration::from_secs(5), ended.wait_for(Option::is_some)).await;
        }
    }

    fn command_ring(&self) -> Option<Arc<Ring>> {
        attached_of(&self.path).filter(|a| a.ended_with().is_none()).map(|a| a.ring.clone())
    }

    fn offer_shm_commands(&self, slot: &ShmSlot<'_>) -> bool {
        let Some(offer) = &self.offer else { return false };
        let Some(rx) = slot.offer_commands() else { return false };
        *offer.ring.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
        true
    }
}

impl FrameSender for ShmCmdSender {
    async fn send_frame(&mut self, frame: &[u8]) -> Result<(), SendError> {
        let Some(a) = attached_of(&self.path) else {
            return self.quic.write_all(frame).await.map_err(|e| SendError(e.to_string()));
        };
        if a.stopped.load(Ordering::Acquire) {
            // The session moves: the reply is in its replay log (recorded
            // before the send) and goes out where the session goes.
            return Ok(());
        }
        if self.writer.is_none() {
            self.writer = a.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        let writer = self.writer.as_mut().ok_or_else(|| SendError("the command ring's reply pipe is gone".into()))?;
        let broken = |e: gpupool_shm::ShmError| {
            a.halt();
            a.ring.close(Side::Server, false);
            SendError(format!("command ring: {e}"))
        };
        let mut rest = frame;
        let deadline = Instant::now() + FULL_RING_LIMIT;
        loop {
            let n = writer.try_write(rest).map_err(broken)?;
            rest = &rest[n..];
            if rest.is_empty() {
                return Ok(());
            }
            // Full (a large reply, or a client that does not read now).
            if a.ring.closed(Side::Client).is_some() || a.ring.closed(Side::Server).is_some() {
                return Err(SendError("the command ring was closed".into()));
            }
            if Instant::now() >= deadline {
                return Err(broken(gpupool_shm::ShmError::Protocol("the client does not read its replies".into())));
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    }

    async fn finish_within(mut self, linger: Duration) {
        if matches!(&*self.path.borrow(), Path::Beside(_)) {
            // What was written stays in the ring for the client.
            return;
        }
        if self.quic.finish().is_ok() {
            let _ = tokio::time::timeout(linger, self.quic.stopped()).await;
        }
    }
}

impl ShmCmdReceiver {
    /// The first read of a fresh session: the ring when it arrives first,
    /// else QUIC (a batch came there, or nothing in time).
    async fn decide(&mut self, max: usize) -> Option<Result<Option<Bytes>, RecvError>> {
        let decide = self.decide.take()?;
        let offered = self.offer.take().and_then(|o| o.ring.lock().unwrap_or_else(|e| e.into_inner()).take());
        let Some(mut rx) = offered else {
            decide.send_replace(Path::Quic);
            return None;
        };
        let (ring, first) = {
            let read = quic::read_frame(&mut self.quic, max);
            tokio::pin!(read);
            tokio::select! {
                Ok(ring) = &mut rx => (Some(ring), None),
                first = &mut read => {
                    tracing::debug!("the client sent its commands on QUIC");
                    (None, Some(first))
                }
                () = tokio::time::sleep(self.timeout) => {
                    rx.close();
                    match rx.try_recv() {
                        Ok(ring) => (Some(ring), None),
                        Err(_) => {
                            tracing::info!("no command ring within the handshake timeout; the commands stay on QUIC");
                            decide.send_replace(Path::Quic);
                            // The first frame's read goes on: one that was
                            // arriving when the offer timed out is not cut.
                            (None, Some(read.await))
                        }
                    }
                }
            }
        };
        // No ring is taken any more (its attachment is refused from now);
        // one handed over meanwhile is still taken, unless a batch came on
        // QUIC first (a client does not do both): then it is closed, so
        // that nothing waits on it.
        rx.close();
        let late = rx.try_recv().ok();
        let ring = match (ring, late) {
            (Some(ring), _) => Some(ring),
            (None, Some(late)) if first.is_some() => {
                late.close(Side::Server, false);
                None
            }
            (None, late) => late,
        };
        match ring {
            Some(ring) => {
                let attached = self.start(ring);
                decide.send_replace(attached.map_or(Path::Quic, Path::Beside));
            }
            None => {
                decide.send_replace(Path::Quic);
            }
        }
        first
    }

    /// Starts the ring's reader thread.
    fn start(&mut self, ring: Arc<Ring>) -> Option<Arc<Attached>> {
        let (frames_tx, frames) = mpsc::channel(QUEUED_FRAMES);
        let (ended_tx, ended) = watch::channel(None);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = ring.reader(Side::Server);
        let (max, stopping, metrics) = (self.max_frame, stop.clone(), self.metrics.clone());
        let spawned = std::thread::Builder::new().name("gpupool-shm-cmd".into()).spawn(move || {
            let result = read_ring(reader, &frames_tx, &stopping, max, &metrics);
            match &result {
                Ok(()) => tracing::debug!("command ring ended"),
                Err(e) => tracing::info!(error = %e, "command ring ended"),
            }
            let _ = ended_tx.send(Some(result));
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a command ring's thread; the commands stay on QUIC");
            ring.close(Side::Server, false);
            return None;
        }
        tracing::info!("the session's commands go through shared memory");
        self.frames = Some(frames);
        let writer = Mutex::new(Some(ring.writer(Side::Server)));
        Some(Arc::new(Attached { ring, writer, ended, stop, stopped: AtomicBool::new(false) }))
    }
}

/// A ring's thread: the client's frames into the session's channel, until
/// the client closes the ring (`Ok`), it breaks, or the session stops it.
fn read_ring(
    mut reader: Reader,
    frames: &mpsc::Sender<Bytes>,
    stop: &AtomicBool,
    max: usize,
    metrics: &Metrics,
) -> Result<(), String> {
    let ring = reader.ring().clone();
    loop {
        if stop.load(Ordering::Acquire) {
            return Err("stopped".into());
        }
        if ring.closed(Side::Server).is_some() {
            return Err("the shared-memory attachment ended".into());
        }
        // Read before the frame: what the client wrote before its close is
        // all there when the close is seen.
        let closed = ring.closed(Side::Client);
        match reader.try_frame(max).map_err(|e| e.to_string())? {
            Some(body) => {
                add(&metrics.shm_command_frames, 1);
                if frames.blocking_send(Bytes::from(body)).is_err() {
                    return Ok(());
                }
            }
            None => match closed {
                Some(Closed::Clean) => return Ok(()),
                Some(Closed::Broken) => return Err("the client gave the ring up".into()),
                None => {
                    reader.wait_readable(server_spin(), SLEEP_SLICE);
                }
            },
        }
    }
}

impl FrameReceiver for ShmCmdReceiver {
    async fn recv_frame(&mut self, max: usize) -> Result<Option<Bytes>, RecvError> {
        if let Some(first) = self.decide(max).await {
            return first;
        }
        let (Some(frames), Some(a)) = (self.frames.as_mut(), attached_of(&self.path)) else {
            return quic::read_frame(&mut self.quic, max).await;
        };
        tokio::select! {
            body = super::recv_spinning(frames, self.spin) => match body {
                Some(body) if body.len() > max => {
                    Err(RecvError::Frame(frame::FrameError::TooLarge { len: body.len(), max }))
                }
                Some(body) => Ok(Some(body)),
                None => match a.ended_with() {
                    Some(Ok(())) => Ok(None),
                    other => {
                        let why = other.and_then(Result::err).unwrap_or_else(|| "ended".into());
                        if !a.stopped.load(Ordering::Acquire) {
                            // The client resumes the session here, on QUIC.
                            a.ring.close(Side::Server, false);
                            self.conn.close(close_code::MIGRATED.into(), &resume_here());
                        }
                        Err(RecvError::Stream(format!("command ring lost: {why}")))
                    }
                },
            },
            _ = self.conn.closed() => {
                a.halt();
                Err(RecvError::Stream("the control connection closed".into()))
            }
        }
    }
}

impl Drop for ShmCmdReceiver {
    fn drop(&mut self) {
        // The session let go of this attachment (it ended, or a resumed
        // one replaced it): its thread ends, and a client still on the
        // ring sees it closed.
        if let Some(a) = attached_of(&self.path) {
            a.halt();
            if a.ring.closed(Side::Server).is_none() {
                a.ring.close(Side::Server, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    /// A ring's client side and the server's reading thread with its channel.
    struct Started {
        writer: Writer,
        client: Arc<Ring>,
        frames: mpsc::Receiver<Bytes>,
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<Result<(), String>>,
    }

    fn started(max: usize) -> Started {
        let client = Ring::create(4096).expect("ring");
        let fd = client.fd().try_clone_to_owned().expect("dup");
        let server = Ring::open(fd, client.len()).expect("mapped");
        // Room for every frame of a test: the test reads them after writing.
        let (tx, frames) = mpsc::channel(32);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = server.reader(Side::Server);
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || read_ring(reader, &tx, &stopping, max, &Metrics::default()));
        Started { writer: client.writer(Side::Client), client, frames, stop, thread }
    }

    #[test]
    fn frames_come_in_order_and_a_clean_close_ends_the_thread() {
        let Started { mut writer, client, mut frames, thread, .. } = started(1 << 16);
        let bodies: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1000 + usize::from(i) * 300]).collect();
        let stream: Vec<u8> = bodies.iter().flat_map(|b| frame(b)).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        writer.write_all(&stream, Duration::ZERO, Duration::from_millis(10), deadline, || None).expect("written");
        client.close(Side::Client, true);
        for body in &bodies {
            assert_eq!(frames.blocking_recv().as_deref(), Some(&body[..]));
        }
        assert_eq!(thread.join().expect("joined"), Ok(()));
        assert!(frames.blocking_recv().is_none(), "the channel ends with the thread");
    }

    #[test]
    fn a_hostile_length_or_a_broken_close_is_an_error_and_stop_ends_the_thread() {
        let mut s = started(1 << 16);
        s.writer.try_write(&(1u32 << 20).to_le_bytes()).expect("write");
        let err = s.thread.join().expect("joined").expect_err("too large");
        assert!(err.contains("a frame of"), "{err}");
        let s = started(1 << 16);
        s.client.close(Side::Client, false);
        assert!(s.thread.join().expect("joined").is_err(), "given up");
        let s = started(1 << 16);
        s.stop.store(true, Ordering::Release);
        s.client.wake_all();
        assert_eq!(s.thread.join().expect("joined"), Err("stopped".into()));
    }
}
