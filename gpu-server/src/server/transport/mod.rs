//! The transports a session's traffic runs on, behind one interface.
//!
//! A session reaches its client through an [`Attachment`]: a command channel
//! (batches in, replies out, each one frame, in order) and a [`Link`] that
//! ends, can be lost (the client may come back), can be closed with a code,
//! and serves the client's bulk transfers with a [`BulkService`]. The
//! session code (`local.rs`, `commands.rs`) is written against
//! these traits only.
//!
//! [`quic`] is the implementation every session starts on; [`shm`] carries
//! the bulk copies of clients on this host through shared memory, and
//! [`shm_commands`] their commands; [`rdma`]
//! carries the commands and bulk copies of clients with an RDMA device. QUIC also stays the control
//! transport of every session: the handshake, the redirect to a worker
//! process and the resume of a lost session arrive there, whatever carries
//! the session's commands afterwards. A shared-memory or RDMA transport
//! implements [`Transport`] in a module of its own beside [`quic`], with its
//! `unsafe` fenced there (see `docs/transport.md`).

pub(crate) mod beside;
pub(crate) mod quic;
pub(crate) mod rdma;
pub(crate) mod shm;
pub(crate) mod shm_commands;

use super::bulk::BulkService;
use bytes::Bytes;
use gpupool_proto::frame;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A kind of transport: the types of one session's attachment.
pub(crate) trait Transport: Send + Sync + 'static {
    type Link: Link;
    type Sender: FrameSender;
    type Receiver: FrameReceiver;
}

/// A session's attachment to its client over transport `T`; a resumed
/// session gets a new one.
pub(crate) struct Attachment<T: Transport> {
    pub(crate) link: T::Link,
    pub(crate) sender: T::Sender,
    pub(crate) receiver: T::Receiver,
}

impl<T: Transport> std::fmt::Debug for Attachment<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment").field("link", &self.link).finish_non_exhaustive()
    }
}

/// The attachment as a whole.
pub(crate) trait Link: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// Completes once the attachment has ended, by either side or lost.
    fn ended(&self) -> impl Future<Output = ()> + Send;
    /// Why the attachment ended when the client did not end it (an idle
    /// timeout: a frozen client, a network outage; a reset): the client may
    /// come back. `None` while it is up or after a close.
    fn lost(&self) -> Option<&'static str>;
    /// Ends the attachment with a close code and reason for the client.
    fn end(&self, code: u32, reason: &[u8]);
    /// The client's address, for logs.
    fn peer(&self) -> String;
    /// Serves the client's bulk transfers until the attachment ends.
    fn serve_bulk(self, bulk: Arc<BulkService>) -> impl Future<Output = ()> + Send;
    /// The transport's part of a fresh session's `Welcome`, once its bulk
    /// service exists: where and how to connect over RDMA (see
    /// [`rdma`]); `None` for a transport with nothing to offer.
    fn welcome_rdma(&self, _bulk: &Arc<BulkService>) -> Option<gpupool_proto::v1::RdmaAccept> {
        None
    }
    /// Offers the client a command ring in shared memory (see
    /// [`shm_commands`]) through the session's shared-memory slot; whether
    /// the `Welcome` may say so. False for a transport that keeps its
    /// commands where they are.
    fn offer_shm_commands(&self, _slot: &shm::ShmSlot<'_>) -> bool {
        false
    }
    /// Stops the attachment's own path for commands and copies at once,
    /// before a migration reads the session's staging out: no upload may
    /// land here afterwards (the client repeats what did not finish where
    /// the session goes). QUIC's streams stop with the bulk task; RDMA
    /// ends its connection and waits for its thread.
    fn stop_copies(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// The command ring the session's batches come through now, when they
    /// do (see [`shm_commands`]): a move can revoke the client's host
    /// regions through it (`gpupool_shm::ring`).
    fn command_ring(&self) -> Option<Arc<gpupool_shm::ring::Ring>> {
        None
    }
}

/// The sending half of a command channel.
pub(crate) trait FrameSender: Send + 'static {
    /// Sends one encoded frame (length prefix included).
    fn send_frame(&mut self, frame: &[u8]) -> impl Future<Output = Result<(), SendError>> + Send;
    /// Ends the channel and waits up to `linger` for the client to have
    /// read everything sent.
    fn finish_within(self, linger: Duration) -> impl Future<Output = ()> + Send;
}

/// The receiving half of a command channel.
pub(crate) trait FrameReceiver: Send + 'static {
    /// The next frame's body, at most `max` bytes; `Ok(None)` when the
    /// client ended the channel cleanly.
    fn recv_frame(&mut self, max: usize) -> impl Future<Output = Result<Option<Bytes>, RecvError>> + Send;
}

/// The next message on `rx`, looked for without sleeping for up to `spin`
/// first (the task yields between looks, so the runtime's other tasks run):
/// a session in a launch-and-synchronize loop has its next batch or reply
/// within microseconds, and a task that went to sleep costs a wake-up
/// through the kernel to reach it. `None` once every sender is gone.
pub(crate) async fn recv_spinning<T>(rx: &mut tokio::sync::mpsc::Receiver<T>, spin: Duration) -> Option<T> {
    use tokio::sync::mpsc::error::TryRecvError;
    if !spin.is_zero() {
        let start = std::time::Instant::now();
        loop {
            match rx.try_recv() {
                Ok(message) => return Some(message),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if start.elapsed() < spin => tokio::task::yield_now().await,
                Err(TryRecvError::Empty) => break,
            }
        }
    }
    rx.recv().await
}

/// A frame could not be sent: the attachment is gone.
#[derive(Debug, thiserror::Error)]
#[error("cannot send: {0}")]
pub(crate) struct SendError(pub(crate) String);

/// A frame could not be received.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecvError {
    /// The bytes are not a frame: the channel's framing is lost.
    #[error(transparent)]
    Frame(frame::FrameError),
    /// The channel failed (its connection ended or was lost).
    #[error("stream error: {0}")]
    Stream(String),
}

#[cfg(test)]
mod tests {
    use super::recv_spinning;
    use std::time::Duration;
    use tokio::sync::mpsc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spinning_receive_takes_what_comes_during_and_after_its_spin() {
        let (tx, mut rx) = mpsc::channel(4);
        // Sends `value` from another thread after `ms` milliseconds.
        let send_later = |ms: u64, value: i32| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                tx.blocking_send(value).expect("send");
            })
        };
        let sender = send_later(2, 1);
        assert_eq!(recv_spinning(&mut rx, Duration::from_secs(10)).await, Some(1), "sent while it spins");
        sender.join().expect("sender");
        let sender = send_later(50, 2);
        assert_eq!(recv_spinning(&mut rx, Duration::from_micros(10)).await, Some(2), "sent once it sleeps");
        sender.join().expect("sender");
        tx.try_send(3).expect("room");
        assert_eq!(recv_spinning(&mut rx, Duration::ZERO).await, Some(3), "no spin at all");
        drop(tx);
        assert_eq!(recv_spinning(&mut rx, Duration::from_millis(5)).await, None, "every sender gone");
    }
}
