//! Call batching and reply matching, without I/O.
//!
//! Calls whose result the caller does not need now are queued; a batch is
//! cut when the queue passes its size bound, when a call must answer, and
//! (with a delay bound) when nothing is in flight or the oldest queued call
//! has waited that long: the GPU then works while the program issues the
//! rest, as it does natively, instead of idling until the program
//! synchronizes.
//! Every batch gets one reply, in order. Errors of queued calls are latched
//! (the first one kept, the rest counted) and returned by the next
//! synchronizing call, as CUDA returns errors of asynchronous work.

use crate::error::{ClientError, Result};
use gpupool_proto::v1::{self, call::Op};
use prost::Message;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bounds of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Encoded bytes after which the queue is flushed.
    pub max_bytes: usize,
    /// Calls after which the queue is flushed.
    pub max_calls: usize,
    /// Batches sent but not yet answered before the client waits for one.
    pub max_in_flight: usize,
    /// With `Some(d)`, a call is sent at once when no batch is in flight,
    /// and the queue is cut when its oldest call has waited `d`. With
    /// `None`, only the bounds above and synchronizing calls cut.
    pub max_delay: Option<Duration>,
}

/// The first error of queued work, and how many there were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latched {
    pub first: ClientError,
    pub count: u64,
}

/// The queue of one command stream.
#[derive(Debug)]
pub struct CallQueue {
    limits: BatchLimits,
    pending: Vec<v1::Call>,
    pending_bytes: usize,
    /// When the oldest pending call was queued.
    pending_since: Option<Instant>,
    next_seq: u64,
    in_flight: VecDeque<(u64, u32)>,
    latched: Option<Latched>,
    /// Device printf output received and not yet taken, in order.
    output: Vec<u8>,
    /// Bytes of it dropped because nobody took it.
    output_dropped: u64,
    /// What the driver wrote to the worker's stderr (device assert
    /// messages), received and not yet taken, in order.
    errors: Vec<u8>,
    /// Bytes of it dropped because nobody took it.
    errors_dropped: u64,
}

/// Device output a client holds for its application at most; more is
/// dropped (the application then never synchronizes to see it).
pub const MAX_HELD_OUTPUT: usize = 64 << 20;

/// Appends `received` to `held` up to [`MAX_HELD_OUTPUT`]; counts the rest.
fn hold(held: &mut Vec<u8>, dropped: &mut u64, received: &[u8]) {
    let room = MAX_HELD_OUTPUT.saturating_sub(held.len());
    let kept = received.len().min(room);
    held.extend_from_slice(&received[..kept]);
    *dropped += (received.len() - kept) as u64;
}

/// Takes `held`, with a line about the bytes dropped first, if any were.
fn take_held(held: &mut Vec<u8>, dropped: &mut u64, what: &str) -> Vec<u8> {
    if *dropped > 0 {
        let line = format!("[gpupool] {dropped} bytes of device {what} output dropped by the client\n");
        held.extend_from_slice(line.as_bytes());
        *dropped = 0;
    }
    std::mem::take(held)
}

impl CallQueue {
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            limits,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_since: None,
            next_seq: 1,
            in_flight: VecDeque::new(),
            latched: None,
            output: Vec::new(),
            output_dropped: 0,
            errors: Vec::new(),
            errors_dropped: 0,
        }
    }

    /// Queues a call; returns a batch to send when the queue is full or,
    /// with a delay bound, when the batch should go now.
    pub fn push(&mut self, op: Op) -> Option<v1::Batch> {
        self.push_at(op, Instant::now())
    }

    /// [`Self::push`] at time `now`.
    pub fn push_at(&mut self, op: Op, now: Instant) -> Option<v1::Batch> {
        let call = v1::Call { op: Some(op) };
        // Field tag + length prefix, as the call will sit inside `Batch`.
        self.pending_bytes += call.encoded_len() + 4;
        self.pending.push(call);
        let since = *self.pending_since.get_or_insert(now);
        let full = self.pending_bytes >= self.limits.max_bytes || self.pending.len() >= self.limits.max_calls;
        let due = self
            .limits
            .max_delay
            .is_some_and(|d| self.in_flight.is_empty() || now.saturating_duration_since(since) >= d);
        if full || due { self.cut() } else { None }
    }

    /// Cuts a batch of everything queued, if anything is.
    pub fn cut(&mut self) -> Option<v1::Batch> {
        if self.pending.is_empty() {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back((seq, self.pending.len() as u32 - 1));
        self.pending_bytes = 0;
        self.pending_since = None;
        Some(v1::Batch { seq, calls: std::mem::take(&mut self.pending) })
    }

    /// Number of calls queued and not yet cut.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Batches sent and not answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// `true` when the client must read a reply before sending more.
    pub fn must_drain(&self) -> bool {
        self.in_flight.len() > self.limits.max_in_flight
    }

    /// Sequence number of the most recently cut batch.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    fn latch(&mut self, err: ClientError, count: u64) {
        match &mut self.latched {
            Some(l) => l.count += count,
            None => self.latched = Some(Latched { first: err, count }),
        }
    }

    /// Takes the device printf output received so far (and a line about
    /// what was dropped, if anything was).
    pub fn take_output(&mut self) -> Vec<u8> {
        take_held(&mut self.output, &mut self.output_dropped, "printf")
    }

    /// Takes the device's stderr output (assert messages) received so far
    /// (and a line about what was dropped, if anything was).
    pub fn take_errors(&mut self) -> Vec<u8> {
        take_held(&mut self.errors, &mut self.errors_dropped, "assert")
    }

    /// Whether an error is latched.
    pub fn has_latched(&self) -> bool {
        self.latched.is_some()
    }

    /// Takes the latched error, if any.
    pub fn take_latched(&mut self) -> Option<Latched> {
        self.latched.take()
    }

    /// Handles the next reply. For batch `awaited` (the one a synchronizing
    /// call waits for) the last call's own error or result is returned;
    /// every other error is latched.
    pub fn on_reply(&mut self, reply: v1::BatchReply, awaited: u64) -> Result<Answer> {
        if reply.seq == 0 {
            // The server could not read a frame of ours.
            let msg = reply.errors.first().map(|e| e.message.clone()).unwrap_or_default();
            return Err(ClientError::Protocol(format!("server rejected a frame: {msg}")));
        }
        let Some((seq, last)) = self.in_flight.pop_front() else {
            return Err(ClientError::Protocol(format!("reply {} to no batch", reply.seq)));
        };
        if seq != reply.seq {
            return Err(ClientError::Protocol(format!("reply {} does not match batch {seq}", reply.seq)));
        }
        hold(&mut self.output, &mut self.output_dropped, &reply.device_output);
        hold(&mut self.errors, &mut self.errors_dropped, &reply.device_errors);
        let listed = reply.errors.len() as u64;
        let mut own = None;
        for e in reply.errors {
            let err = ClientError::Cuda { code: e.code, message: e.message };
            if seq == awaited && e.index == last && own.is_none() {
                own = Some(err);
            } else {
                self.latch(err, 1);
            }
        }
        let unlisted = u64::from(reply.error_count).saturating_sub(listed);
        if unlisted > 0 {
            let err = ClientError::Cuda { code: gpupool_proto::cuda::UNKNOWN, message: "unlisted errors".into() };
            self.latch(err, unlisted);
        }
        let result = match own {
            Some(e) => Err(e),
            None => Ok(reply.result.and_then(|r| r.value)),
        };
        Ok(Answer { seq, result })
    }
}

/// What one reply answered.
#[derive(Debug)]
pub struct Answer {
    pub seq: u64,
    /// The last call's result, or its own error (awaited batch only).
    pub result: Result<Option<v1::call_result::Value>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BatchLimits {
        BatchLimits { max_bytes: 1 << 20, max_calls: 100_000, max_in_flight: 4, max_delay: None }
    }

    fn launch() -> Op {
        Op::Launch(v1::Launch { module: 1, function: 0, params: vec![0u8; 28].into(), ..Default::default() })
    }

    #[test]
    fn with_a_delay_bound_the_first_call_goes_at_once_and_later_ones_by_age() {
        let delay = Duration::from_micros(40);
        let mut q = CallQueue::new(BatchLimits { max_delay: Some(delay), ..limits() });
        let t0 = Instant::now();
        let first = q.push_at(launch(), t0).expect("nothing in flight: sent at once");
        assert_eq!(first.calls.len(), 1);
        // One batch in flight: the next calls wait for company or for age.
        assert!(q.push_at(launch(), t0 + Duration::from_micros(5)).is_none());
        assert!(q.push_at(launch(), t0 + Duration::from_micros(30)).is_none());
        let second = q.push_at(launch(), t0 + Duration::from_micros(45)).expect("the oldest waited 40 µs");
        assert_eq!(second.calls.len(), 3);
        // Age counts from the oldest call of the new queue.
        assert!(q.push_at(launch(), t0 + Duration::from_micros(50)).is_none());
        assert!(q.push_at(launch(), t0 + Duration::from_micros(89)).is_none());
        // Once every batch is answered, the queue goes with the next call.
        for b in [first, second] {
            q.on_reply(v1::BatchReply { seq: b.seq, ..Default::default() }, 0).expect("reply");
        }
        let third = q.push_at(launch(), t0 + Duration::from_micros(60)).expect("idle pipe: sent at once");
        assert_eq!(third.calls.len(), 3);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn without_a_delay_bound_only_size_and_synchronization_cut() {
        let mut q = CallQueue::new(limits());
        let t0 = Instant::now();
        for i in 0..100 {
            assert!(q.push_at(launch(), t0 + Duration::from_millis(i)).is_none());
        }
        assert_eq!(q.cut().expect("batch").calls.len(), 100);
    }

    fn sync_op() -> Op {
        Op::ContextSynchronize(v1::ContextSynchronize {})
    }

    #[test]
    fn ten_thousand_launches_one_batch() {
        let mut q = CallQueue::new(limits());
        for _ in 0..10_000 {
            let launch = v1::Launch { module: 1, function: 0, params: vec![0u8; 28].into(), ..Default::default() };
            assert!(q.push(Op::Launch(launch)).is_none(), "cut early");
        }
        q.push(sync_op());
        let b = q.cut().expect("batch");
        assert_eq!(b.calls.len(), 10_001);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn size_bound_cuts() {
        let mut q = CallQueue::new(BatchLimits { max_bytes: 100, ..limits() });
        let mut cut = 0;
        for _ in 0..50 {
            cut += usize::from(q.push(sync_op()).is_some());
        }
        assert!(cut > 0);
    }

    #[test]
    fn errors_latched_until_sync() {
        let mut q = CallQueue::new(limits());
        q.push(sync_op());
        let b1 = q.cut().expect("b1");
        q.push(sync_op());
        q.push(sync_op());
        let b2 = q.cut().expect("b2");
        let err = |index, code| v1::CallError { index, code, message: "x".into() };
        let r1 = v1::BatchReply { seq: b1.seq, errors: vec![err(0, 400)], error_count: 1, ..Default::default() };
        let a = q.on_reply(r1, b2.seq).expect("reply");
        assert!(a.result.is_ok(), "an earlier batch's error is latched, not returned");
        let r2 =
            v1::BatchReply { seq: b2.seq, errors: vec![err(0, 1), err(1, 2)], error_count: 3, ..Default::default() };
        let a = q.on_reply(r2, b2.seq).expect("reply");
        assert_eq!(a.result.expect_err("own error").code(), 2);
        let l = q.take_latched().expect("latched");
        assert_eq!(l.first.code(), 400);
        assert_eq!(l.count, 3);
        assert!(q.take_latched().is_none());
    }

    #[test]
    fn device_output_is_kept_in_reply_order() {
        let mut q = CallQueue::new(limits());
        q.push(sync_op());
        let b1 = q.cut().expect("b1");
        q.push(sync_op());
        let b2 = q.cut().expect("b2");
        let reply = |seq, out: &'static [u8]| v1::BatchReply { seq, device_output: out.into(), ..Default::default() };
        q.on_reply(reply(b1.seq, b"first\n"), b2.seq).expect("reply");
        q.on_reply(reply(b2.seq, b"second\n"), b2.seq).expect("reply");
        assert_eq!(q.take_output(), b"first\nsecond\n");
        assert!(q.take_output().is_empty());
    }

    #[test]
    fn device_stderr_is_kept_apart_from_stdout() {
        let mut q = CallQueue::new(limits());
        q.push(sync_op());
        let b1 = q.cut().expect("b1");
        let reply = v1::BatchReply {
            seq: b1.seq,
            device_output: b"printf\n".as_slice().into(),
            device_errors: b"assert\n".as_slice().into(),
            ..Default::default()
        };
        q.on_reply(reply, b1.seq).expect("reply");
        assert_eq!(q.take_errors(), b"assert\n");
        assert_eq!(q.take_output(), b"printf\n");
        assert!(q.take_errors().is_empty());
    }

    #[test]
    fn mismatched_reply_is_a_protocol_error() {
        let mut q = CallQueue::new(limits());
        q.push(sync_op());
        q.cut();
        let r = v1::BatchReply { seq: 9, ..Default::default() };
        assert!(matches!(q.on_reply(r, 9), Err(ClientError::Protocol(_))));
    }
}
