//! A session's command channel over any [`Transport`](super::transport::Transport):
//! batches read into the session thread's bounded queue, and its replies
//! written back in order, kept for a replay when the session can be
//! resumed.

use super::metrics::add;
use super::state::Shared;
use super::thread::{Admitted, Work};
use super::transport::{FrameReceiver, FrameSender, Link, RecvError, recv_spinning};
use gpupool_proto::replay::{ReplayLimit, ReplayLog};
use gpupool_proto::{cuda, frame, v1};
use prost::Message;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};

/// How long a closing session waits for its last replies to be acknowledged.
pub(super) const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// The reply to a frame that is not a batch (or one refused unread).
pub(super) fn frame_error_reply(message: String) -> Box<v1::BatchReply> {
    Box::new(v1::BatchReply {
        seq: 0,
        errors: vec![v1::CallError { index: 0, code: cuda::INVALID_VALUE, message }],
        error_count: 1,
        ..Default::default()
    })
}

/// How a session's command stream ended.
#[derive(Debug)]
pub(super) enum Ended {
    /// The client finished it or closed the connection, or the server is
    /// shutting down.
    Finished,
    /// The connection was lost (the client may come back).
    Lost(&'static str),
    /// A frame could not be read: framing is lost.
    Violation(frame::FrameError),
    /// The session was ordered to move to another server.
    Migrate(Box<super::migrate::Order>),
}

/// Most calls one batch may hold (the client sends at most 65 536).
const MAX_CALLS_PER_BATCH: usize = 1 << 16;

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
/// Until it ran, each batch holds a permit of `budget` for every byte it
/// holds decoded (the budget is
/// [`ServerConfig::max_queued_batch_bytes`](crate::ServerConfig::max_queued_batch_bytes)).
pub(super) async fn read_commands(
    shared: &Shared,
    link: &impl Link,
    recv: &mut impl FrameReceiver,
    work: &mpsc::Sender<Work>,
    budget: &Arc<Semaphore>,
    received_seq: &QueuedSeq,
) -> Ended {
    let max_frame = shared.config.max_frame_bytes as usize;
    let max_queued = shared.config.max_queued_batch_bytes;
    loop {
        // The batch's sequence number counts as received once the batch is
        // in the queue: this future may be dropped while it waits for room
        // (the session stops to move), and a batch counted but not queued
        // would be neither run here nor sent again by its client.
        let mut seq = None;
        let item = match recv.recv_frame(max_frame).await {
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
                        if u64::from(permits) > max_queued {
                            add(&shared.metrics.frames_rejected, 1);
                            Work::Reply(frame_error_reply(format!(
                                "a batch of {cost} decoded bytes exceeds the queue's {max_queued}"
                            )))
                        } else {
                            // Wait for room: the client's later batches queue
                            // in QUIC flow control, not here.
                            let Ok(permit) = budget.clone().acquire_many_owned(permits).await else {
                                return Ended::Finished;
                            };
                            add(&shared.metrics.batches, 1);
                            add(&shared.metrics.calls, batch.calls.len() as u64);
                            seq = Some(batch.seq);
                            Work::Batch(batch, Admitted::new(permit, cost as u64, shared.metrics.clone()))
                        }
                    }
                    Err(e) => {
                        add(&shared.metrics.frames_rejected, 1);
                        Work::Reply(frame_error_reply(format!("malformed frame: not a Batch: {e}")))
                    }
                },
            },
            Ok(None) => return Ended::Finished,
            Err(RecvError::Frame(e)) => {
                add(&shared.metrics.frames_rejected, 1);
                return Ended::Violation(e);
            }
            Err(RecvError::Stream(e)) => {
                tracing::debug!(error = %e, "command stream ended");
                return link.lost().map_or(Ended::Finished, Ended::Lost);
            }
        };
        if work.send(item).await.is_err() {
            return Ended::Finished;
        }
        if let Some(seq) = seq {
            received_seq.set(seq);
        }
    }
}

/// The sequence number of the last batch queued for a session's thread,
/// and a wake-up for a task waiting for a given batch to be queued.
#[derive(Debug, Default)]
pub(super) struct QueuedSeq {
    seq: std::sync::atomic::AtomicU64,
    queued: tokio::sync::Notify,
}

impl QueuedSeq {
    pub(super) fn get(&self) -> u64 {
        self.seq.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(super) fn set(&self, seq: u64) {
        self.seq.store(seq, std::sync::atomic::Ordering::Release);
        self.queued.notify_waiters();
    }

    /// Waits until batch `last` (or a later one) was queued.
    pub(super) async fn reached(&self, last: u64) {
        loop {
            let queued = self.queued.notified();
            tokio::pin!(queued);
            // Registered before the check: a batch queued between the
            // check and the wait still wakes it.
            queued.as_mut().enable();
            if self.get() >= last {
                return;
            }
            queued.await;
        }
    }
}

/// Replies of a session: the queue from its thread and, when the session
/// can be resumed, the last ones sent, for a client that lost them with its
/// connection.
#[derive(Debug)]
pub(super) struct Replies {
    rx: mpsc::Receiver<v1::BatchReply>,
    sent: Option<ReplayLog>,
}

/// Replies kept for a resume: more than a client has in flight (32).
pub(super) const KEPT_REPLIES: ReplayLimit = ReplayLimit { frames: 64, bytes: 64 << 20 };

impl Replies {
    pub(super) fn new(rx: mpsc::Receiver<v1::BatchReply>, keep: bool) -> Self {
        Self { rx, sent: keep.then(|| ReplayLog::new(KEPT_REPLIES)) }
    }

    /// Replies taken over from another server (a migrated session): its
    /// log's acknowledged and forgotten sequence numbers and kept frames.
    pub(super) fn taken_over(
        rx: mpsc::Receiver<v1::BatchReply>,
        acked: u64,
        forgotten: u64,
        kept: Vec<(u64, bytes::Bytes)>,
    ) -> Self {
        let mut log = ReplayLog::taken_over(KEPT_REPLIES, acked, forgotten);
        for (seq, frame) in kept {
            log.record(seq, frame);
        }
        Self { rx, sent: Some(log) }
    }

    /// The replies kept, with the log's acknowledged and forgotten sequence
    /// numbers, for another server.
    pub(super) fn kept(&self) -> (Vec<bytes::Bytes>, u64, u64) {
        match &self.sent {
            Some(log) => (log.kept().map(|(_, b)| b.clone()).collect(), log.acked(), log.forgotten()),
            None => (Vec::new(), 0, 0),
        }
    }

    /// Whether every reply after `acked` can still be sent.
    pub(super) fn covers(&self, acked: u64) -> bool {
        self.sent.as_ref().is_none_or(|log| log.covers(acked))
    }
}

/// Sends the session's replies on `send` until the session thread ends or
/// the attachment goes; first again those after `acked` (a resumed
/// session). After each reply it looks for the next one for up to `spin`
/// before it sleeps ([`recv_spinning`]). Returns the replies for the next attachment, and the sender
/// unless it was finished: a session that stops for a migration keeps its
/// reply stream open (a finished one would tell the client the session
/// ended) until it closes the connection with where it went.
pub(super) async fn write_replies<S: FrameSender>(
    mut replies: Replies,
    mut send: S,
    link: impl Link,
    acked: Option<u64>,
    stop: Arc<tokio::sync::Notify>,
    spin: std::time::Duration,
) -> (Replies, Option<S>) {
    if let (Some(acked), Some(log)) = (acked, replies.sent.as_mut()) {
        log.ack(acked);
        for bytes in log.replay_after(acked) {
            if send.send_frame(&bytes).await.is_err() {
                return (replies, Some(send));
            }
        }
    }
    loop {
        let reply = tokio::select! {
            r = recv_spinning(&mut replies.rx, spin) => match r {
                Some(r) => r,
                None => break,
            },
            () = link.ended() => return (replies, Some(send)),
            // The session stops here (it migrates): what its thread
            // replied so far goes out, the rest is for where it goes.
            () = stop.notified() => {
                while let Ok(reply) = replies.rx.try_recv() {
                    if !send_reply(&mut replies, &mut send, &reply).await {
                        break;
                    }
                }
                return (replies, Some(send));
            }
        };
        if !send_reply(&mut replies, &mut send, &reply).await {
            return (replies, Some(send));
        }
    }
    // Let the last replies arrive before the connection is closed.
    send.finish_within(LINGER).await;
    (replies, None)
}

/// Sends one reply and keeps it for a resume; false when the send failed.
async fn send_reply(replies: &mut Replies, send: &mut impl FrameSender, reply: &v1::BatchReply) -> bool {
    let bytes = frame::encode(reply);
    if let Some(log) = replies.sent.as_mut() {
        log.record(reply.seq, bytes.clone());
    }
    send.send_frame(&bytes).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
