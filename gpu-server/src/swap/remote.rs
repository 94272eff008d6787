//! Swapping across worker processes (process isolation, `docs/swap.md`).
//!
//! Each worker process has its own context, so no worker can count the
//! device memory of the others: the supervisor holds the one
//! [`DeviceMemory`](super::DeviceMemory) of a device (or MIG instance), and
//! a worker's session reaches it through a [`RemoteMemory`]: every change
//! (memory given back, a batch begun or ended, a swap-out done) goes to the
//! supervisor as a `MemoryRequest` on the worker's event pipe, and every
//! question (may the session take these bytes?) waits for its
//! `MemoryAnswer` on the control pipe. The supervisor applies each request
//! to the worker's [`SessionMemory`] with [`serve`]; when the ledger picks
//! the worker's session as a victim, the supervisor orders a swap-out
//! (`WorkerAssign.swap_out`) and the worker queues it on its session thread
//! with [`RemoteMemory::swap_out`], exactly as an in-process session's
//! asker does.
//!
//! Both halves are plain functions of messages: the I/O (pipes, the
//! supervisor's async loop) stays with their callers, and the unit tests
//! join the halves with channels.

use super::{AskSwapOut, MemoryUse, SessionMemory, SwapPlace};
use crate::error::CallError;
use gpupool_proto::v1;
use gpupool_proto::v1::memory_request::Kind;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Sends one request to the supervisor; `false` when it cannot (the
/// supervisor is gone).
pub type SendRequest = Box<dyn Fn(v1::MemoryRequest) -> bool + Send + Sync>;

/// A worker session's view of the supervisor's ledger.
pub struct RemoteMemory {
    send: SendRequest,
    /// How long a question waits for its answer: the supervisor's own wait
    /// for victims, plus their swap-outs.
    wait: Duration,
    state: Mutex<RemoteState>,
    answered: Condvar,
}

impl std::fmt::Debug for RemoteMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteMemory").field("used", &self.used()).finish()
    }
}

#[derive(Default)]
struct RemoteState {
    last_seq: u64,
    /// The question waiting for its answer (the session thread asks one at
    /// a time) and the answer once it came.
    pending: Option<u64>,
    answer: Option<v1::MemoryAnswer>,
    /// What the session holds as the supervisor granted it.
    used: MemoryUse,
    ask: Option<AskSwapOut>,
    /// The supervisor is gone: every question fails at once.
    gone: bool,
}

impl RemoteMemory {
    /// A remote ledger that sends requests with `send` and waits up to
    /// `supervisor_wait` (the supervisor's swap wait) for the victims a
    /// question makes swap out.
    pub fn new(send: SendRequest, supervisor_wait: Duration) -> Arc<Self> {
        // Victims synchronize and copy their memory out after the
        // supervisor picked them: give that time beyond its own wait.
        let wait = supervisor_wait.saturating_mul(2).saturating_add(Duration::from_secs(10));
        Arc::new(Self { send, wait, state: Mutex::new(RemoteState::default()), answered: Condvar::new() })
    }

    /// Takes the answer to a question; answers to no pending question (a
    /// late one after a timeout) are dropped.
    pub fn answer(&self, answer: v1::MemoryAnswer) {
        let mut s = self.lock();
        if s.pending == Some(answer.seq) {
            s.answer = Some(answer);
            drop(s);
            self.answered.notify_all();
        }
    }

    /// The supervisor ordered a swap-out: queues it on the session thread.
    /// When it cannot be queued (no session yet, or its queue is full),
    /// tells the supervisor at once so that it does not wait for it.
    pub fn swap_out(&self) {
        let queued = self.lock().ask.as_ref().is_some_and(|ask| ask());
        if !queued {
            self.tell(Kind::Answered, 0, false);
        }
    }

    /// The supervisor is gone (its pipe closed): questions fail from now on.
    pub fn close(&self) {
        self.lock().gone = true;
        self.answered.notify_all();
    }

    pub(super) fn set_ask(&self, ask: Option<AskSwapOut>) {
        self.lock().ask = ask;
    }

    pub(super) fn used(&self) -> MemoryUse {
        self.lock().used
    }

    pub(super) fn reserve(&self, bytes: u64) -> Result<(), CallError> {
        self.take(Kind::Reserve, bytes, |u| &mut u.resident).map(drop)
    }

    /// The answer's `ok` says the room is on disk.
    pub(super) fn reserve_host(&self, bytes: u64) -> Result<SwapPlace, CallError> {
        let a = self.take(Kind::ReserveHost, bytes, |u| &mut u.swapped)?;
        Ok(if a.ok { SwapPlace::Disk } else { SwapPlace::Host })
    }

    /// Asks for `bytes` of the kind `held` counts; counts them when granted.
    fn take(
        &self,
        kind: Kind,
        bytes: u64,
        held: fn(&mut MemoryUse) -> &mut u64,
    ) -> Result<v1::MemoryAnswer, CallError> {
        let a = self.question(kind, bytes)?;
        if !a.error.is_empty() {
            return Err(CallError::out_of_memory(a.error));
        }
        let mut s = self.lock();
        let count = held(&mut s.used);
        *count = count.saturating_add(bytes);
        Ok(a)
    }

    pub(super) fn release(&self, bytes: u64) {
        let mut s = self.lock();
        s.used.resident = s.used.resident.saturating_sub(bytes);
        drop(s);
        self.tell(Kind::Release, bytes, false);
    }

    /// `ok` tells the supervisor the room was on disk.
    pub(super) fn release_host(&self, bytes: u64, place: SwapPlace) {
        let mut s = self.lock();
        s.used.swapped = s.used.swapped.saturating_sub(bytes);
        drop(s);
        self.tell(Kind::ReleaseHost, bytes, place == SwapPlace::Disk);
    }

    pub(super) fn begin_batch(&self) {
        self.tell(Kind::BeginBatch, 0, false);
    }

    pub(super) fn end_batch(&self) {
        self.tell(Kind::EndBatch, 0, false);
    }

    pub(super) fn answered(&self, ok: bool) {
        self.tell(Kind::Answered, 0, ok);
    }

    pub(super) fn device_refused(&self) -> bool {
        self.question(Kind::DeviceRefused, 0).is_ok_and(|a| a.ok)
    }

    fn tell(&self, kind: Kind, bytes: u64, ok: bool) {
        if !(self.send)(v1::MemoryRequest { kind: kind.into(), seq: 0, bytes, ok }) {
            tracing::debug!(?kind, "the supervisor is gone: memory change not reported");
        }
    }

    /// Sends a question and waits for its answer.
    fn question(&self, kind: Kind, bytes: u64) -> Result<v1::MemoryAnswer, CallError> {
        let mut s = self.lock();
        if s.gone {
            return Err(CallError::out_of_memory("the server's supervisor is gone: no device memory can be granted"));
        }
        s.last_seq += 1;
        let seq = s.last_seq;
        s.pending = Some(seq);
        s.answer = None;
        drop(s);
        if !(self.send)(v1::MemoryRequest { kind: kind.into(), seq, bytes, ok: false }) {
            self.lock().pending = None;
            return Err(CallError::out_of_memory("cannot reach the server's supervisor for device memory"));
        }
        let deadline = Instant::now() + self.wait;
        let mut s = self.lock();
        loop {
            if let Some(a) = s.answer.take() {
                s.pending = None;
                return Ok(a);
            }
            let now = Instant::now();
            if s.gone || now >= deadline {
                s.pending = None;
                let why = if s.gone { "is gone" } else { "did not answer in time" };
                return Err(CallError::out_of_memory(format!("the server's supervisor {why}: no device memory")));
            }
            s = self.answered.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, RemoteState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Applies a worker's request to its session's share of the supervisor's
/// ledger; the answer to send back, for the kinds that are answered.
/// `RESERVE` may wait up to the swap wait for victims: call this off the
/// async runtime for it ([`blocks`]).
pub fn serve(session: &SessionMemory, request: &v1::MemoryRequest) -> Option<v1::MemoryAnswer> {
    let answer = |r: Result<(), CallError>| v1::MemoryAnswer {
        seq: request.seq,
        error: r.err().map(|e| e.message).unwrap_or_default(),
        ok: false,
    };
    let Ok(kind) = Kind::try_from(request.kind) else {
        // From a newer worker: a question is refused, a change ignored.
        return (request.seq != 0).then(|| v1::MemoryAnswer {
            seq: request.seq,
            error: format!("unknown memory request kind {}", request.kind),
            ok: false,
        });
    };
    match kind {
        Kind::Reserve => Some(answer(session.reserve(request.bytes))),
        Kind::ReserveHost => Some(match session.reserve_host(request.bytes) {
            Ok(place) => v1::MemoryAnswer { seq: request.seq, error: String::new(), ok: place == SwapPlace::Disk },
            Err(e) => answer(Err(e)),
        }),
        Kind::DeviceRefused => {
            Some(v1::MemoryAnswer { seq: request.seq, error: String::new(), ok: session.device_refused() })
        }
        Kind::Release => {
            session.release(request.bytes);
            None
        }
        Kind::ReleaseHost => {
            session.release_host(request.bytes, if request.ok { SwapPlace::Disk } else { SwapPlace::Host });
            None
        }
        Kind::BeginBatch => {
            session.begin_batch();
            None
        }
        Kind::EndBatch => {
            session.end_batch();
            None
        }
        Kind::Answered => {
            session.answered(request.ok);
            None
        }
    }
}

/// Whether serving `request` may wait (for other sessions to swap out).
pub fn blocks(request: &v1::MemoryRequest) -> bool {
    Kind::try_from(request.kind) == Ok(Kind::Reserve)
}

#[cfg(test)]
mod tests {
    use super::super::{DeviceMemory, SwapConfig};
    use super::*;
    use std::sync::mpsc;

    /// A worker's remote ledger joined to a session of `memory` by a
    /// thread that serves its requests, as the supervisor does.
    fn worker(memory: &Arc<DeviceMemory>) -> (Arc<DeviceMemory>, Arc<RemoteMemory>) {
        let (tx, rx) = mpsc::channel::<v1::MemoryRequest>();
        let remote = RemoteMemory::new(Box::new(move |r| tx.send(r).is_ok()), Duration::from_millis(200));
        let session = memory.register(None);
        let r = remote.clone();
        std::thread::spawn(move || {
            for request in rx {
                if let Some(a) = serve(&session, &request) {
                    r.answer(a);
                }
            }
        });
        (DeviceMemory::remote(remote.clone(), None), remote)
    }

    #[test]
    fn a_worker_reserves_and_releases_through_the_supervisor() {
        let memory =
            DeviceMemory::new(Some(SwapConfig { device_bytes: 100, host_bytes: 100, wait: Duration::from_millis(50) }));
        let (local, _remote) = worker(&memory);
        let s = local.register(None);
        s.reserve(60).expect("fits");
        assert_eq!(s.used().resident, 60);
        let e = s.reserve(60).expect_err("over the bound, nobody to swap out");
        assert!(e.message.contains("device memory is full"), "{}", e.message);
        s.release(60);
        s.reserve_host(30).expect("host room");
        assert_eq!(s.used(), MemoryUse { resident: 0, swapped: 30 });
        // The supervisor's ledger agrees once it has served the changes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while memory.total() != (MemoryUse { resident: 0, swapped: 30 }) {
            assert!(Instant::now() < deadline, "ledger {:?}", memory.total());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_supervisor_that_is_gone_fails_questions_at_once() {
        let remote = RemoteMemory::new(Box::new(|_| true), Duration::from_secs(60));
        let local = DeviceMemory::remote(remote.clone(), None);
        let s = local.register(None);
        let r = remote.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            r.close();
        });
        let started = Instant::now();
        let e = s.reserve(1).expect_err("no supervisor");
        assert!(e.message.contains("supervisor is gone"), "{}", e.message);
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().expect("closer");
        assert!(s.reserve(1).is_err(), "still gone");
        assert!(!s.device_refused());
    }

    #[test]
    fn a_swap_out_order_reaches_the_session_or_is_refused_at_once() {
        let (tx, rx) = mpsc::channel::<v1::MemoryRequest>();
        let remote = RemoteMemory::new(Box::new(move |r| tx.send(r).is_ok()), Duration::from_millis(10));
        // No session registered yet: refused at once.
        remote.swap_out();
        let r = rx.try_recv().expect("answered");
        assert_eq!((Kind::try_from(r.kind), r.ok), (Ok(Kind::Answered), false));
        let local = DeviceMemory::remote(remote.clone(), None);
        let (asked_tx, asked_rx) = mpsc::channel();
        let _s = local.register(Some(Box::new(move || asked_tx.send(()).is_ok())));
        remote.swap_out();
        asked_rx.try_recv().expect("queued on the session");
        assert!(rx.try_recv().is_err(), "the session answers itself, later");
    }

    #[test]
    fn late_and_unknown_answers_and_requests_are_harmless() {
        let memory =
            DeviceMemory::new(Some(SwapConfig { device_bytes: 10, host_bytes: 10, wait: Duration::from_millis(10) }));
        let s = memory.register(None);
        let unknown = v1::MemoryRequest { kind: 99, seq: 4, bytes: 1, ok: false };
        let a = serve(&s, &unknown).expect("a question gets an answer");
        assert!(a.error.contains("unknown"), "{}", a.error);
        assert!(serve(&s, &v1::MemoryRequest { kind: 99, seq: 0, bytes: 1, ok: false }).is_none());
        assert!(blocks(&v1::MemoryRequest { kind: Kind::Reserve.into(), ..unknown }));
        // An answer nobody waits for is dropped.
        let remote = RemoteMemory::new(Box::new(|_| true), Duration::from_millis(10));
        remote.answer(v1::MemoryAnswer { seq: 7, error: String::new(), ok: true });
        assert!(remote.lock().answer.is_none());
    }
}
