//! Lukewarm swap: the device memory of one server process, shared by its
//! sessions, and the policy that makes room in it (issue 21).
//!
//! [`DeviceMemory`] counts what every session holds on the device
//! (resident) and in host memory (swapped), against two bounds: the device
//! memory sessions may hold resident, and the host memory swapped contents
//! may take. A session asks for device memory before it maps any
//! ([`SessionMemory::reserve`]); when the device bound would be passed, the
//! least recently used idle sessions are asked to swap out (their thread
//! gets the request in its work queue, after any work already queued) and
//! the caller waits, bounded, until enough is free. A session that cannot
//! be swapped, or a host bound that is reached, ends the wait at once with
//! `CUDA_ERROR_OUT_OF_MEMORY`, the error the allocation gave before.
//!
//! The swap itself (contents to host, mappings dropped, then re-created at
//! the same addresses) is the session's: `crate::session::SessionState`'s
//! `swap_out` and its swap-in before the next batch. This module holds no
//! device state and does no I/O; "asking" a session is a callback that
//! queues the request without blocking.

use crate::error::CallError;
pub use remote::RemoteMemory;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub mod remote;

/// Bounds of swapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapConfig {
    /// Device memory all sessions may hold resident, in bytes; beyond it,
    /// idle sessions are swapped out.
    pub device_bytes: u64,
    /// Host memory swapped contents may take, in bytes; a swap-out beyond
    /// it is refused.
    pub host_bytes: u64,
    /// How long an allocation (or a swap-in) waits for idle sessions to
    /// swap out before it fails with `OUT_OF_MEMORY`.
    pub wait: Duration,
}

/// Disk for swapped contents beyond the host bound: at most `bytes`, in
/// files under `dir` (each unlinked as soon as it is made, so that nothing
/// is left behind by a process that dies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapDisk {
    pub bytes: u64,
    pub dir: PathBuf,
}

/// Where a session's swapped-out contents are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapPlace {
    /// Host memory, within the host bound.
    Host,
    /// A file under the disk's directory, within its bound.
    Disk,
}

/// Queues a swap-out request on a session's thread without blocking;
/// `false` when it could not be queued (the session ended or its queue is
/// full, so it is busy anyway).
pub type AskSwapOut = Box<dyn Fn() -> bool + Send + Sync>;

/// Resident and swapped bytes, of one session or of all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Bytes of device memory held.
    pub resident: u64,
    /// Bytes of device contents held in host memory.
    pub swapped: u64,
}

/// The device memory of one server process and its sessions' use of it.
pub struct DeviceMemory {
    config: Option<SwapConfig>,
    /// In a worker process: the supervisor's ledger, which this one only
    /// forwards to (`remote.rs`).
    remote: Option<Arc<RemoteMemory>>,
    /// Disk beyond the host bound: its bound (counted here, in the ledger
    /// that is not remote) and the directory sessions write to.
    disk: Option<SwapDisk>,
    ledger: Mutex<Ledger>,
    /// Notified whenever memory is freed or a swap-out request is answered.
    changed: Condvar,
}

impl std::fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = self.lock();
        f.debug_struct("DeviceMemory")
            .field("config", &self.config)
            .field("total", &l.total)
            .field("sessions", &l.sessions.len())
            .finish()
    }
}

#[derive(Default)]
struct Ledger {
    total: MemoryUse,
    sessions: HashMap<u64, Entry>,
    next_id: u64,
    /// Advances at the end of every batch: the order of last use.
    clock: u64,
    /// Advances with every reserve: places in line for device memory.
    tickets: u64,
    /// Resident bytes at which the device last refused memory, and until
    /// when that is the bound (when lower than the configured one).
    refused: Option<(u64, Instant)>,
    /// The device's memory as a worker reported it, when the configured
    /// bound was not known (`DeviceMemory::cap`).
    cap: Option<u64>,
    /// Swapped bytes kept on disk (the rest of `total.swapped` is in host
    /// memory).
    on_disk: u64,
}

/// How long the device's refusal lowers the bound: memory that other
/// processes took may come back.
const REFUSAL_HOLDS: Duration = Duration::from_secs(60);

struct Entry {
    used: MemoryUse,
    /// Inside a batch: never a victim, but idle soon unless `waiting`.
    busy: bool,
    /// In [`SessionMemory::reserve`]: its place in line and what it asks.
    waiting: Option<Claim>,
    last_used: u64,
    /// A swap-out was asked and not yet answered.
    asked: bool,
    /// Of `used.swapped`, the bytes on disk.
    on_disk: u64,
    /// The last swap-out was refused; cleared by the session's next batch.
    refused: bool,
    ask: Option<AskSwapOut>,
}

/// A session's place in line for device memory: memory freed while it
/// waits is its own before it is any later session's, so that a session in
/// a busy loop cannot take, batch after batch, what a waiting session asked
/// others to free.
#[derive(Debug, Clone, Copy)]
struct Claim {
    ticket: u64,
    bytes: u64,
}

impl Ledger {
    /// Idle sessions (not busy, not asked, not refused, holding memory)
    /// other than `except`, least recently used first.
    fn idle_lru(&self, except: u64) -> Vec<u64> {
        let mut idle: Vec<(u64, u64)> = self
            .sessions
            .iter()
            .filter(|(id, e)| **id != except && !e.busy && !e.asked && !e.refused && e.used.resident > 0)
            .filter(|(_, e)| e.ask.is_some())
            .map(|(&id, e)| (e.last_used, id))
            .collect();
        idle.sort_unstable();
        idle.into_iter().map(|(_, id)| id).collect()
    }

    /// Device bytes that swap-outs asked and not yet answered will free:
    /// of sessions other than `except` that are not waiting for memory
    /// themselves (they reach the request only after their batch).
    fn pending(&self, except: u64) -> u64 {
        let coming = |(id, e): &(&u64, &Entry)| **id != except && e.asked && e.waiting.is_none();
        self.sessions.iter().filter(coming).map(|(_, e)| e.used.resident).sum()
    }

    /// Device bytes of sessions other than `except` that are in a batch
    /// and will be idle once it ends (a client's calls run after it
    /// returned from them): those not waiting for memory, and those waiting
    /// ahead of `claim` in line, with what they will be given. Sessions
    /// behind it wait for it, so they are not counted.
    fn busy(&self, except: u64, claim: Claim) -> u64 {
        let soon = |(id, e): &(&u64, &Entry)| match e.waiting {
            _ if **id == except || e.ask.is_none() => 0,
            None if e.busy => e.used.resident,
            Some(c) if c.ticket < claim.ticket => e.used.resident.saturating_add(c.bytes),
            _ => 0,
        };
        self.sessions.iter().map(|entry| soon(&entry)).fold(0u64, u64::saturating_add)
    }

    /// Bytes asked by sessions in line before `ticket`.
    fn claimed_before(&self, ticket: u64) -> u64 {
        let ahead = self.sessions.values().filter_map(|e| e.waiting).filter(|c| c.ticket < ticket);
        ahead.fold(0u64, |sum, c| sum.saturating_add(c.bytes))
    }

    fn entry(&mut self, id: u64) -> Option<&mut Entry> {
        self.sessions.get_mut(&id)
    }
}

impl DeviceMemory {
    /// Memory with swapping as `config` says; `None`: no device bound and
    /// no swapping, only the counts.
    pub fn new(config: Option<SwapConfig>) -> Arc<Self> {
        Self::with_disk(config, None)
    }

    /// Memory with swapping as `config` says, and `disk` beyond its host
    /// bound (ignored without swapping).
    pub fn with_disk(config: Option<SwapConfig>, disk: Option<SwapDisk>) -> Arc<Self> {
        let disk = disk.filter(|_| config.is_some());
        Arc::new(Self { config, remote: None, disk, ledger: Mutex::new(Ledger::default()), changed: Condvar::new() })
    }

    /// The memory of a worker process's session: the supervisor's ledger,
    /// reached through `remote` (swapping across worker processes), with
    /// swap files (when the supervisor has disk for them) under `disk_dir`.
    pub fn remote(remote: Arc<RemoteMemory>, disk_dir: Option<PathBuf>) -> Arc<Self> {
        let disk = disk_dir.map(|dir| SwapDisk { bytes: 0, dir });
        Arc::new(Self { config: None, remote: Some(remote), disk, ledger: Mutex::default(), changed: Condvar::new() })
    }

    /// Whether swapping is on.
    pub fn swapping(&self) -> bool {
        self.config.is_some() || self.remote.is_some()
    }

    /// Registers a session; `ask` queues a swap-out request on its thread
    /// (`None`: the session is never asked).
    pub fn register(self: &Arc<Self>, ask: Option<AskSwapOut>) -> SessionMemory {
        if let Some(r) = &self.remote {
            r.set_ask(ask);
            return SessionMemory { memory: self.clone(), id: 0 };
        }
        let mut l = self.lock();
        l.next_id += 1;
        let id = l.next_id;
        let last_used = l.clock;
        l.sessions.insert(
            id,
            Entry {
                used: MemoryUse::default(),
                busy: false,
                waiting: None,
                last_used,
                asked: false,
                on_disk: 0,
                refused: false,
                ask,
            },
        );
        SessionMemory { memory: self.clone(), id }
    }

    /// Bounds the device memory sessions may hold by what the device has
    /// (`bytes`, as a worker process's driver reported it): a supervisor
    /// that does not open the device learns it from its first worker.
    pub fn cap(&self, bytes: u64) {
        if bytes > 0 && self.remote.is_none() {
            let mut l = self.lock();
            l.cap = Some(l.cap.map_or(bytes, |c| c.min(bytes)));
        }
    }

    /// What all sessions hold now.
    pub fn total(&self) -> MemoryUse {
        match &self.remote {
            Some(r) => r.used(),
            None => self.lock().total,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One session's share of [`DeviceMemory`]; dropping it gives back all the
/// session held.
pub struct SessionMemory {
    memory: Arc<DeviceMemory>,
    id: u64,
}

impl std::fmt::Debug for SessionMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionMemory").field("id", &self.id).field("used", &self.used()).finish()
    }
}

impl SessionMemory {
    /// A session of its own, unbounded memory (tests and tools).
    pub fn detached() -> Self {
        DeviceMemory::new(None).register(None)
    }

    /// What this session holds now.
    pub fn used(&self) -> MemoryUse {
        if let Some(r) = self.remote() {
            return r.used();
        }
        self.memory.lock().sessions.get(&self.id).map(|e| e.used).unwrap_or_default()
    }

    /// Takes `bytes` of device memory for this session. Beyond the device
    /// bound, asks idle sessions, least recently used first, to swap out
    /// and waits up to the configured time for them (and for sessions in a
    /// batch to become idle); `OUT_OF_MEMORY` when they cannot free enough.
    /// Sessions that asked before this one are served first.
    pub fn reserve(&self, bytes: u64) -> Result<(), CallError> {
        if let Some(r) = self.remote() {
            return r.reserve(bytes);
        }
        let mut l = self.memory.lock();
        l.tickets += 1;
        let claim = Claim { ticket: l.tickets, bytes };
        if let Some(e) = l.entry(self.id) {
            e.waiting = Some(claim);
        }
        // The session leaves the line under the same lock that grants or
        // refuses: others never see it granted and still waiting (which
        // would hide it from their count of memory soon free).
        let (mut l, result) = self.reserve_waiting(l, claim);
        if let Some(e) = l.entry(self.id) {
            e.waiting = None;
        }
        drop(l);
        if result.is_err() {
            // Those behind it in line may fit now.
            self.memory.changed.notify_all();
        }
        result
    }

    fn reserve_waiting<'a>(
        &'a self,
        mut l: MutexGuard<'a, Ledger>,
        claim: Claim,
    ) -> (MutexGuard<'a, Ledger>, Result<(), CallError>) {
        let bytes = claim.bytes;
        let (limit, wait) = match self.memory.config {
            Some(c) => (c.device_bytes, c.wait),
            None => (u64::MAX, Duration::ZERO),
        };
        let deadline = Instant::now() + wait;
        if bytes > limit {
            let e = format!("{bytes} bytes are more than the {limit} bytes of device memory sessions may hold");
            return (l, Err(CallError::out_of_memory(e)));
        }
        loop {
            let limit = match l.refused {
                Some((at, until)) if Instant::now() < until => limit.min(at),
                _ => limit,
            }
            .min(l.cap.unwrap_or(u64::MAX));
            // What sessions ahead in line asked counts as taken.
            let total = l.total.resident.saturating_add(l.claimed_before(claim.ticket));
            if total.checked_add(bytes).is_some_and(|t| t <= limit) {
                l.total.resident += bytes;
                if let Some(e) = l.entry(self.id) {
                    e.used.resident += bytes;
                }
                return (l, Ok(()));
            }
            let short = total.saturating_add(bytes).saturating_sub(limit);
            let mut coming = l.pending(self.id);
            let mut victims = l.idle_lru(self.id).into_iter();
            while coming < short {
                let Some(victim) = victims.next() else { break };
                let Some(e) = l.entry(victim) else { continue };
                if e.ask.as_ref().is_some_and(|ask| ask()) {
                    e.asked = true;
                    coming += e.used.resident;
                    tracing::debug!(victim, bytes = e.used.resident, "asked an idle session to swap out");
                }
            }
            let now = Instant::now();
            if coming.saturating_add(l.busy(self.id, claim)) < short || now >= deadline {
                let (resident, swapped) = (l.total.resident, l.total.swapped);
                let e = format!(
                    "device memory is full: {bytes} bytes asked, {resident} of {limit} resident, {swapped} swapped \
                     out; idle sessions cannot free enough"
                );
                return (l, Err(CallError::out_of_memory(e)));
            }
            l = self.memory.changed.wait_timeout(l, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The device refused memory this session had reserved (and gave
    /// back): the device holds less than the bound says. For a while the
    /// bound is what all sessions hold now, so that the next reserve swaps
    /// idle sessions out first. `false` when there is nothing to swap out
    /// or swapping is off (a retry would fail the same way).
    pub fn device_refused(&self) -> bool {
        if let Some(r) = self.remote() {
            return r.device_refused();
        }
        if self.memory.config.is_none() {
            return false;
        }
        let mut l = self.memory.lock();
        let resident = l.total.resident;
        if resident == 0 {
            return false;
        }
        tracing::info!(resident, "the device refused memory below the swap bound; bound lowered for a while");
        l.refused = Some((resident, Instant::now() + REFUSAL_HOLDS));
        true
    }

    /// Gives back `bytes` of device memory.
    pub fn release(&self, bytes: u64) {
        if let Some(r) = self.remote() {
            return r.release(bytes);
        }
        let mut l = self.memory.lock();
        l.total.resident = l.total.resident.saturating_sub(bytes);
        if let Some(e) = l.entry(self.id) {
            e.used.resident = e.used.resident.saturating_sub(bytes);
        }
        drop(l);
        self.memory.changed.notify_all();
    }

    /// Takes room for `bytes` of swapped contents: host memory within the
    /// host bound, else disk within its bound; refused beyond both (or when
    /// swapping is off). Says where they go.
    pub fn reserve_host(&self, bytes: u64) -> Result<SwapPlace, CallError> {
        if let Some(r) = self.remote() {
            return r.reserve_host(bytes);
        }
        let limit = self.memory.config.map_or(0, |c| c.host_bytes);
        let disk_limit = self.memory.disk.as_ref().map_or(0, |d| d.bytes);
        let mut l = self.memory.lock();
        let on_host = l.total.swapped - l.on_disk;
        let place = if on_host.checked_add(bytes).is_some_and(|t| t <= limit) {
            SwapPlace::Host
        } else if l.on_disk.checked_add(bytes).is_some_and(|t| t <= disk_limit) {
            SwapPlace::Disk
        } else {
            let on_disk = l.on_disk;
            return Err(CallError::out_of_memory(format!(
                "swap space is full: {bytes} bytes to swap out, {on_host} of {limit} host bytes and {on_disk} of \
                 {disk_limit} disk bytes in use"
            )));
        };
        l.total.swapped += bytes;
        if place == SwapPlace::Disk {
            l.on_disk += bytes;
        }
        if let Some(e) = l.entry(self.id) {
            e.used.swapped += bytes;
            if place == SwapPlace::Disk {
                e.on_disk += bytes;
            }
        }
        Ok(place)
    }

    /// Gives back room for `bytes` of swapped contents, kept at `place`.
    pub fn release_host(&self, bytes: u64, place: SwapPlace) {
        if let Some(r) = self.remote() {
            return r.release_host(bytes, place);
        }
        let mut l = self.memory.lock();
        l.total.swapped = l.total.swapped.saturating_sub(bytes);
        if place == SwapPlace::Disk {
            l.on_disk = l.on_disk.saturating_sub(bytes);
        }
        if let Some(e) = l.entry(self.id) {
            e.used.swapped = e.used.swapped.saturating_sub(bytes);
            if place == SwapPlace::Disk {
                e.on_disk = e.on_disk.saturating_sub(bytes);
            }
        }
    }

    /// Where this session's swap files go (`None`: swapping uses host
    /// memory only).
    pub fn disk_dir(&self) -> Option<&Path> {
        self.memory.disk.as_ref().map(|d| d.dir.as_path())
    }

    /// The session is in a batch: it is no victim until [`Self::end_batch`].
    pub fn begin_batch(&self) {
        // Without swapping nobody asks: the batch path stays lock-free.
        if !self.memory.swapping() {
            return;
        }
        if let Some(r) = self.remote() {
            return r.begin_batch();
        }
        if let Some(e) = self.memory.lock().entry(self.id) {
            e.busy = true;
        }
    }

    /// The session finished a batch: idle, and the most recently used.
    pub fn end_batch(&self) {
        if !self.memory.swapping() {
            return;
        }
        if let Some(r) = self.remote() {
            return r.end_batch();
        }
        let mut l = self.memory.lock();
        l.clock += 1;
        let clock = l.clock;
        if let Some(e) = l.entry(self.id) {
            e.busy = false;
            e.refused = false;
            e.last_used = clock;
        }
        drop(l);
        // A session waiting for memory may ask this one now.
        self.memory.changed.notify_all();
    }

    /// Answers a swap-out request: `ok` false when the session refused it
    /// or had nothing to free (then it is not asked again before its next
    /// batch).
    pub fn answered(&self, ok: bool) {
        if let Some(r) = self.remote() {
            return r.answered(ok);
        }
        if let Some(e) = self.memory.lock().entry(self.id) {
            e.asked = false;
            e.refused = !ok;
        }
        self.memory.changed.notify_all();
    }
}

impl SessionMemory {
    fn remote(&self) -> Option<&RemoteMemory> {
        self.memory.remote.as_deref()
    }
}

impl Drop for SessionMemory {
    fn drop(&mut self) {
        // A worker's session: the supervisor's entry goes with the worker.
        if self.remote().is_some() {
            return;
        }
        let mut l = self.memory.lock();
        if let Some(e) = l.sessions.remove(&self.id) {
            l.total.resident = l.total.resident.saturating_sub(e.used.resident);
            l.total.swapped = l.total.swapped.saturating_sub(e.used.swapped);
            l.on_disk = l.on_disk.saturating_sub(e.on_disk);
        }
        drop(l);
        self.memory.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config(device_bytes: u64, host_bytes: u64) -> Option<SwapConfig> {
        Some(SwapConfig { device_bytes, host_bytes, wait: Duration::from_millis(200) })
    }

    /// An asker that counts its requests.
    fn counting() -> (Arc<AtomicUsize>, AskSwapOut) {
        let n = Arc::new(AtomicUsize::new(0));
        let c = n.clone();
        (n, Box::new(move || c.fetch_add(1, Ordering::Relaxed) < usize::MAX))
    }

    /// A session on `m` that holds 80 bytes and is idle, with the count
    /// of the swap-out requests it got.
    fn idle_holder(m: &Arc<DeviceMemory>) -> (Arc<AtomicUsize>, SessionMemory) {
        let (asked, ask) = counting();
        let s = m.register(Some(ask));
        s.reserve(80).expect("fits");
        s.end_batch();
        (asked, s)
    }

    /// What a session's thread does when asked: its `bytes` to the host.
    fn swap_out_by_hand(s: &SessionMemory, bytes: u64) {
        s.reserve_host(bytes).expect("room");
        s.release(bytes);
        s.answered(true);
    }

    #[test]
    fn without_swap_memory_is_only_counted() {
        let m = DeviceMemory::new(None);
        let s = m.register(None);
        s.reserve(u64::MAX / 2).expect("unbounded");
        assert_eq!(m.total(), MemoryUse { resident: u64::MAX / 2, swapped: 0 });
        assert!(s.reserve_host(1).is_err(), "no swap space without swapping");
        drop(s);
        assert_eq!(m.total(), MemoryUse::default());
    }

    #[test]
    fn the_least_recently_used_idle_session_is_asked() {
        let m = DeviceMemory::new(config(100, 1000));
        let (asked_a, ask_a) = counting();
        let (asked_b, ask_b) = counting();
        let a = m.register(Some(ask_a));
        let b = m.register(Some(ask_b));
        for s in [&a, &b] {
            s.begin_batch();
            s.reserve(40).expect("fits");
            s.end_batch();
        }
        let c = m.register(None);
        c.begin_batch();
        // A swaps out on its own thread when asked: here, by hand.
        let answer = std::thread::spawn({
            let m = m.clone();
            move || {
                while asked_a.load(Ordering::Relaxed) == 0 {
                    std::thread::yield_now();
                }
                swap_out_by_hand(&a, 40);
                (a, m)
            }
        });
        c.reserve(50).expect("room once A swapped out");
        let (a, _) = answer.join().expect("thread");
        assert_eq!(asked_b.load(Ordering::Relaxed), 0, "B was used last");
        assert_eq!(a.used(), MemoryUse { resident: 0, swapped: 40 });
        assert_eq!(m.total(), MemoryUse { resident: 90, swapped: 40 });
    }

    #[test]
    fn a_busy_session_is_asked_once_its_batch_ends() {
        let m = DeviceMemory::new(config(100, 1000));
        let (asked, ask) = counting();
        let a = m.register(Some(ask));
        a.begin_batch();
        a.reserve(80).expect("fits");
        let waiter = std::thread::spawn({
            let b = m.register(None);
            move || {
                b.begin_batch();
                b.reserve(40).map(|()| b)
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(asked.load(Ordering::Relaxed), 0, "not asked while in its batch");
        a.end_batch();
        while asked.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        swap_out_by_hand(&a, 80);
        let b = waiter.join().expect("thread").expect("room once A swapped out");
        assert_eq!(b.used().resident, 40);
    }

    #[test]
    fn refusing_and_unaskable_sessions_are_not_waited_for() {
        let m = DeviceMemory::new(config(100, 1000));
        let (asked, ask) = counting();
        let a = m.register(Some(ask));
        a.reserve(80).expect("fits");
        a.answered(false);
        let b = m.register(None);
        let start = Instant::now();
        assert_eq!(b.reserve(40).expect_err("A refused").code, gpupool_proto::cuda::OUT_OF_MEMORY);
        assert!(start.elapsed() < Duration::from_millis(150), "no wait without a victim");
        assert_eq!(asked.load(Ordering::Relaxed), 0, "A refused: not asked again before its next batch");
        drop(a);
        let c = m.register(None);
        c.begin_batch();
        c.reserve(80).expect("fits");
        let start = Instant::now();
        assert!(b.reserve(40).is_err(), "C cannot be asked");
        assert!(start.elapsed() < Duration::from_millis(150), "no wait without a victim");
        assert!(b.reserve(101).is_err(), "more than the device");
    }

    #[test]
    fn a_session_asked_to_swap_out_does_not_wait_for_itself() {
        let m = DeviceMemory::new(config(100, 1000));
        let (asked, a) = idle_holder(&m);
        let b = m.register(None);
        b.begin_batch();
        b.reserve(10).expect("fits");
        let waiter = std::thread::spawn(move || b.reserve(40).map(|()| b));
        while asked.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        // A's next batch (queued before the request) needs memory: B waits
        // for A, and A must not wait for its own swap-out.
        a.begin_batch();
        let start = Instant::now();
        assert!(a.reserve(20).is_err());
        assert!(start.elapsed() < Duration::from_millis(150), "no wait for itself");
        a.end_batch();
        swap_out_by_hand(&a, 80);
        assert_eq!(waiter.join().expect("thread").expect("room once A swapped out").used().resident, 50);
    }

    #[test]
    fn memory_freed_for_a_waiting_session_is_its_own_first() {
        let wait = Duration::from_secs(30);
        let m = DeviceMemory::new(Some(SwapConfig { device_bytes: 100, host_bytes: 1000, wait }));
        let (asked, a) = idle_holder(&m);
        let w = m.register(None);
        w.begin_batch();
        let waiter = std::thread::spawn(move || w.reserve(50).map(|()| w));
        while asked.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        // W waits for A's 80 bytes. A newcomer that would not fit beside
        // W once A is out fails at once instead of taking them.
        let n = m.register(None);
        let start = Instant::now();
        let e = n.reserve(60).expect_err("W is ahead in line");
        assert!(start.elapsed() < wait / 2, "refused without waiting for A");
        assert!(e.message.contains("device memory is full"), "{e}");
        // One that fits beside W waits with it.
        let beside = std::thread::spawn(move || n.reserve(40).map(|()| n));
        swap_out_by_hand(&a, 80);
        let w = waiter.join().expect("thread").expect("room once A swapped out");
        let n = beside.join().expect("thread").expect("room beside W");
        assert_eq!((w.used().resident, n.used().resident), (50, 40));
        assert_eq!(m.total(), MemoryUse { resident: 90, swapped: 80 });
    }

    #[test]
    fn a_device_refusal_lowers_the_bound_so_idle_sessions_make_room() {
        let m = DeviceMemory::new(config(1000, 1000));
        let (asked, a) = idle_holder(&m);
        let b = m.register(None);
        b.begin_batch();
        b.reserve(10).expect("counted as free");
        // The device refused those 10 bytes: B gives them back and retries.
        b.release(10);
        assert!(b.device_refused());
        let waiter = std::thread::spawn(move || b.reserve(10).map(|()| b));
        while asked.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        swap_out_by_hand(&a, 80);
        assert_eq!(waiter.join().expect("thread").expect("room once A swapped out").used().resident, 10);
        assert!(!SessionMemory::detached().device_refused(), "without swapping a retry would fail the same way");
    }

    #[test]
    fn an_unanswered_request_times_out() {
        let m = DeviceMemory::new(config(100, 1000));
        let (asked, _a) = idle_holder(&m);
        let b = m.register(None);
        let start = Instant::now();
        let e = b.reserve(40).expect_err("A never answers");
        assert!(start.elapsed() >= Duration::from_millis(200), "waited the configured time");
        assert!(e.message.contains("device memory is full"), "{e}");
        assert_eq!(asked.load(Ordering::Relaxed), 1, "asked once, not on every wake-up");
    }

    proptest::proptest! {
        /// Whatever sessions do, the totals are the sum of the sessions'
        /// use, within both bounds, and a reservation succeeds exactly when
        /// it fits (no session here can be asked, so nothing waits).
        #[test]
        fn counts_stay_consistent_and_bounded(
            ops in proptest::collection::vec((0usize..3, 0u8..6, 0u64..60), 0..200),
        ) {
            let m = DeviceMemory::new(config(100, 80));
            let mut sessions: Vec<Option<SessionMemory>> = (0..3).map(|_| Some(m.register(None))).collect();
            for (who, op, n) in ops {
                let before = m.total();
                let Some(s) = &sessions[who] else { continue };
                match op {
                    0 => proptest::prop_assert_eq!(s.reserve(n).is_ok(), before.resident + n <= 100),
                    1 => s.release(n.min(s.used().resident)),
                    2 => proptest::prop_assert_eq!(s.reserve_host(n).is_ok(), before.swapped + n <= 80),
                    3 => s.release_host(n.min(s.used().swapped), SwapPlace::Host),
                    4 => {
                        s.begin_batch();
                        s.end_batch();
                    }
                    _ => sessions[who] = None,
                }
                let sum = sessions.iter().flatten().map(SessionMemory::used).fold(MemoryUse::default(), |a, u| {
                    MemoryUse { resident: a.resident + u.resident, swapped: a.swapped + u.swapped }
                });
                proptest::prop_assert_eq!(m.total(), sum);
                proptest::prop_assert!(sum.resident <= 100 && sum.swapped <= 80);
            }
        }
    }

    #[test]
    fn host_space_is_bounded() {
        let m = DeviceMemory::new(config(100, 50));
        let a = m.register(None);
        a.reserve_host(30).expect("fits");
        let e = a.reserve_host(30).expect_err("past the bound");
        assert!(e.message.contains("swap space is full"), "{e}");
        a.release_host(30, SwapPlace::Host);
        a.reserve_host(50).expect("fits again");
        assert_eq!(m.total().swapped, 50);
    }

    /// Past the host bound, swapped contents go to disk within its bound;
    /// room given back returns to where it was taken, and a session that
    /// ends gives back its disk too.
    #[test]
    fn disk_takes_what_the_host_bound_leaves() {
        let disk = SwapDisk { bytes: 40, dir: std::env::temp_dir() };
        let m = DeviceMemory::with_disk(config(100, 50), Some(disk));
        let a = m.register(None);
        assert_eq!(a.reserve_host(30), Ok(SwapPlace::Host));
        assert_eq!(a.reserve_host(30), Ok(SwapPlace::Disk), "30 more do not fit the host's 50");
        assert_eq!(a.reserve_host(20), Ok(SwapPlace::Host), "20 do");
        let e = a.reserve_host(20).expect_err("neither has room");
        assert!(e.message.contains("host bytes") && e.message.contains("disk bytes"), "{e}");
        assert_eq!(m.total().swapped, 80);
        a.release_host(30, SwapPlace::Disk);
        assert_eq!(a.reserve_host(40), Ok(SwapPlace::Disk), "the disk's room is back");
        assert_eq!(a.disk_dir(), Some(std::env::temp_dir().as_path()));
        drop(a);
        let b = m.register(None);
        assert_eq!(b.reserve_host(50), Ok(SwapPlace::Host), "the ended session's host memory is free again");
        assert_eq!(b.reserve_host(40), Ok(SwapPlace::Disk), "and its disk");
        assert_eq!(DeviceMemory::new(config(100, 50)).register(None).disk_dir(), None);
    }
}
