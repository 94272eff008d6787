//! The host's cap on staged bytes (issue 20, finding 4): one ledger for
//! every session of a gpu-server host, whichever process serves it.
//!
//! Under process isolation each session runs in a worker process, and a
//! worker stages chunks on its own threads, several at once, each chunk a
//! few MiB. A question to the supervisor per chunk would put a pipe round
//! trip into every bulk put; so the ledger lives in a page of shared memory
//! instead. The supervisor creates it (a sealed memfd) with the cap, and
//! each worker it starts inherits the descriptor and gets a slot of its own:
//! - the page holds the cap, the wait, the bytes staged on the host (`used`)
//!   and one counter per slot (the bytes that slot's process staged);
//! - a reservation is one compare-and-swap on `used` that never passes the
//!   cap, then an add to the process's slot; a release subtracts from the
//!   slot, then from `used`. A process killed between the two (two adjacent
//!   atomic instructions) leaves `used` counting too much, never too little:
//!   the cap holds, at worst a chunk of room is lost until a restart;
//! - when a worker has exited (killed with `SIGKILL` or not), the supervisor
//!   returns its slot's bytes to `used` and frees the slot
//!   ([`SlotLease`]'s drop): a worker never gives back what it held when it
//!   crashed, so the supervisor does.
//!
//! Sessions served in the supervisor's own process (in-process isolation)
//! count in slot 0; such a server keeps its ledger in ordinary memory.
//! A reservation that does not fit waits a bounded time for room (sessions
//! drain their staging into the device all the time), polling the page,
//! then fails with `CUDA_ERROR_OUT_OF_MEMORY` and a log line
//! ([`HostStaging::reserve`]). The only `unsafe` code of staging is here:
//! the page's words as atomics, and taking the inherited descriptor.

#![allow(unsafe_code)]

use crate::error::{CallError, ServerError};
use rustix::fs::{MemfdFlags, SealFlags};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The page's first word: a ledger of this layout.
const MAGIC: u64 = u64::from_le_bytes(*b"GPSTAGE1");
/// Header words: magic, cap, wait in milliseconds, bytes staged on the host.
const CAP: usize = 1;
const WAIT_MS: usize = 2;
const USED: usize = 3;
const HEADER_WORDS: usize = 4;
/// Slots, one per live process that stages (slot 0: the creator's own
/// sessions): more than a host runs workers (sessions, warm workers of
/// every instance).
pub const SLOTS: usize = 1020;
const WORDS: usize = HEADER_WORDS + SLOTS;
/// The page's size: 8 KiB.
const BYTES: usize = WORDS * 8;

/// Longest pause between two looks for room.
const MAX_PAUSE: Duration = Duration::from_millis(16);

/// The ledger's words: in this process's memory, or in a shared page.
#[derive(Debug)]
enum Words {
    Heap(Box<[AtomicU64]>),
    Shared { map: memmap2::MmapRaw, fd: OwnedFd },
}

/// The host's staged bytes against its cap.
#[derive(Debug)]
pub struct HostLedger {
    words: Words,
    /// Slots not in use by a worker (the creator's bookkeeping; slot 0 is
    /// never handed out).
    free: Mutex<Vec<usize>>,
}

impl HostLedger {
    /// A ledger in this process's memory: for sessions served in this
    /// process only.
    pub fn local(cap: u64, wait: Duration) -> Arc<Self> {
        let words: Box<[AtomicU64]> = (0..WORDS).map(|_| AtomicU64::new(0)).collect();
        let ledger = Self { words: Words::Heap(words), free: Mutex::new(Vec::new()) };
        ledger.init(cap, wait);
        Arc::new(ledger)
    }

    /// A ledger without a cap (tests, and tables made outside a server).
    pub fn unbounded() -> Arc<Self> {
        Self::local(u64::MAX, Duration::ZERO)
    }

    /// A ledger in a shared page, which worker processes inherit
    /// ([`HostLedger::inheritable`], [`HostLedger::inherited`]).
    pub fn shared(cap: u64, wait: Duration) -> Result<Arc<Self>, ServerError> {
        let fail = |what: &'static str| move |e: rustix::io::Errno| ServerError::Staging(format!("{what}: {e}"));
        let fd = rustix::fs::memfd_create("gpupool-staging", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(fail("memfd_create"))?;
        rustix::fs::ftruncate(&fd, BYTES as u64).map_err(fail("sizing the memfd"))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(fail("sealing the memfd"))?;
        // Never 0-2 (a server started with its stdio closed): a worker's
        // stdio is put there before its `pre_exec` runs.
        let fd = if fd.as_raw_fd() < 3 { rustix::io::fcntl_dupfd_cloexec(&fd, 3).map_err(fail("fcntl"))? } else { fd };
        let ledger = Self { words: Words::Shared { map: map(&fd)?, fd }, free: Mutex::new((1..SLOTS).rev().collect()) };
        ledger.init(cap, wait);
        Ok(Arc::new(ledger))
    }

    /// The ledger a supervisor passed to this process as descriptor `fd`.
    /// Checked before use: an open memfd sealed against shrinking, of the
    /// page's size and layout.
    pub fn inherited(fd: RawFd) -> Result<Arc<Self>, ServerError> {
        // Taking ownership of a descriptor that is not open would close
        // someone else's later: look first.
        // SAFETY: F_GETFD reads the flags of a descriptor number and
        // touches no memory; an unused number fails with EBADF.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(ServerError::Staging(format!("descriptor {fd} of the staging ledger is not open")));
        }
        // SAFETY: the supervisor left `fd` open across exec for this
        // process (its spec names it) and nothing else in this process owns
        // it: it is taken once, here, at the worker's start.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let fail = |what: &'static str| move |e: rustix::io::Errno| ServerError::Staging(format!("{what}: {e}"));
        // Not inherited further by anything this process starts.
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).map_err(fail("fcntl"))?;
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(fail("the staging ledger is not a sealable memfd"))?;
        let size = rustix::fs::fstat(&fd).map_err(fail("fstat of the staging ledger"))?.st_size;
        if !seals.contains(SealFlags::SHRINK) || u64::try_from(size).ok() != Some(BYTES as u64) {
            return Err(ServerError::Staging(format!("the staging ledger is not a sealed page of {BYTES} bytes")));
        }
        let ledger = Self { words: Words::Shared { map: map(&fd)?, fd }, free: Mutex::new(Vec::new()) };
        if ledger.word(0).load(Ordering::Acquire) != MAGIC {
            return Err(ServerError::Staging("the staging ledger has another layout".into()));
        }
        Ok(Arc::new(ledger))
    }

    fn init(&self, cap: u64, wait: Duration) {
        self.word(CAP).store(cap, Ordering::Relaxed);
        self.word(WAIT_MS).store(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.word(0).store(MAGIC, Ordering::Release);
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        match &self.words {
            Words::Heap(words) => &words[i],
            Words::Shared { map, .. } => {
                assert!(i < WORDS && map.len() >= BYTES, "staging ledger word {i} out of range");
                // SAFETY: the mapping is page-aligned and at least BYTES =
                // WORDS * 8 bytes long (asserted), so word `i` is aligned
                // for an AtomicU64 and in bounds; it stays mapped while
                // `self` lives, which the reference cannot outlive, and
                // backed (the memfd is sealed against shrinking). Every
                // process touches the page's words only as atomics.
                unsafe { &*map.as_ptr().cast::<AtomicU64>().add(i) }
            }
        }
    }

    /// Most bytes the host's sessions may stage together.
    pub fn cap(&self) -> u64 {
        self.word(CAP).load(Ordering::Relaxed)
    }

    /// Bytes staged on the host now, by every process of the ledger.
    pub fn used(&self) -> u64 {
        self.word(USED).load(Ordering::Acquire)
    }

    /// How long a reservation waits for room before it fails.
    pub fn wait(&self) -> Duration {
        Duration::from_millis(self.word(WAIT_MS).load(Ordering::Relaxed))
    }

    /// This process's share in `slot` (0 for the creator's own sessions; a
    /// worker's from its spec).
    pub fn share(self: &Arc<Self>, slot: usize) -> Result<Arc<HostStaging>, ServerError> {
        if slot >= SLOTS {
            return Err(ServerError::Staging(format!("staging ledger slot {slot} out of range")));
        }
        Ok(Arc::new(HostStaging { ledger: self.clone(), slot }))
    }

    /// A free slot for a worker process, its bytes returned when the lease
    /// drops (after the worker exited); `None` when the page has no free
    /// slot or is not shared.
    pub(crate) fn claim(self: &Arc<Self>) -> Option<SlotLease> {
        let slot = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(SlotLease { ledger: self.clone(), slot })
    }

    /// A duplicate of the shared page's descriptor without close-on-exec:
    /// a worker spawned while it lives inherits it under its number
    /// (`None`: the ledger is not shared). Dropped right after the spawn.
    ///
    /// Not a `pre_exec` hook clearing the flag in the child: any such hook
    /// makes the standard library `fork` the supervisor instead of using
    /// `posix_spawn`, and a fork of a large supervisor with many threads
    /// (page tables copied, then copy-on-write faults on every page its
    /// threads touch until the child execs) made 64 workers starting at
    /// once on 2 cores miss their 5 s hand-over (tests/tests/soak.rs).
    /// Another child spawned in the same moment inherits the page too:
    /// only processes this server starts, which it trusts with the cap.
    pub(crate) fn inheritable(&self) -> Result<Option<Inheritable>, ServerError> {
        let Words::Shared { fd, .. } = &self.words else { return Ok(None) };
        let fail = |what: &'static str| move |e: rustix::io::Errno| ServerError::Staging(format!("{what}: {e}"));
        // Never 0-2: a worker's stdio is put there.
        let dup = rustix::io::fcntl_dupfd_cloexec(fd, 3).map_err(fail("duplicating the staging ledger"))?;
        rustix::io::fcntl_setfd(&dup, rustix::io::FdFlags::empty()).map_err(fail("fcntl"))?;
        Ok(Some(Inheritable(dup)))
    }

    fn take(&self, slot: usize, bytes: u64) -> bool {
        let cap = self.cap();
        let taken = self.word(USED).fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(bytes).filter(|&after| after <= cap)
        });
        if taken.is_err() {
            return false;
        }
        // After `used`: a process killed in between over-counts.
        self.word(HEADER_WORDS + slot).fetch_add(bytes, Ordering::AcqRel);
        true
    }

    fn give(&self, slot: usize, bytes: u64) {
        // The slot first: a process killed in between over-counts.
        sub(self.word(HEADER_WORDS + slot), bytes);
        sub(self.word(USED), bytes);
    }

    /// Returns what a slot's process left staged (it exited) and frees it.
    fn reclaim(&self, slot: usize) -> u64 {
        let left = self.word(HEADER_WORDS + slot).swap(0, Ordering::AcqRel);
        sub(self.word(USED), left);
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
        left
    }
}

fn map(fd: &OwnedFd) -> Result<memmap2::MmapRaw, ServerError> {
    memmap2::MmapOptions::new()
        .len(BYTES)
        .map_raw(fd.as_raw_fd())
        .map_err(|e| ServerError::Staging(format!("cannot map the staging ledger: {e}")))
}

fn sub(word: &AtomicU64, bytes: u64) {
    // Never below zero, whatever a process that died left behind.
    let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(bytes)));
}

/// A worker's slot, held by the supervisor while the worker lives: on drop
/// (the worker has exited) the bytes it still had staged go back to the
/// host and the slot is free again.
#[derive(Debug)]
pub(crate) struct SlotLease {
    ledger: Arc<HostLedger>,
    slot: usize,
}

impl SlotLease {
    /// The slot, for the worker's spec.
    pub(crate) fn slot(&self) -> usize {
        self.slot
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let left = self.ledger.reclaim(self.slot);
        if left > 0 {
            tracing::info!(slot = self.slot, bytes = left, "staged bytes of an ended worker returned to the host");
        }
    }
}

/// The shared page's descriptor as a worker spawned now inherits it
/// ([`HostLedger::inheritable`]); closed here on drop.
#[derive(Debug)]
pub(crate) struct Inheritable(OwnedFd);

impl Inheritable {
    /// The descriptor's number, the same in the spawned worker.
    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// One process's share of the host's staging: what its sessions reserve
/// before they stage bytes and release when those are consumed.
#[derive(Debug)]
pub struct HostStaging {
    ledger: Arc<HostLedger>,
    slot: usize,
}

impl HostStaging {
    /// A share of a ledger without a cap.
    pub fn unbounded() -> Arc<Self> {
        Arc::new(Self { ledger: HostLedger::unbounded(), slot: 0 })
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<HostLedger> {
        &self.ledger
    }

    /// Bytes this process has staged now.
    pub fn held(&self) -> u64 {
        self.ledger.word(HEADER_WORDS + self.slot).load(Ordering::Acquire)
    }

    /// Takes `bytes` when they fit under the cap now.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        bytes == 0 || self.ledger.take(self.slot, bytes)
    }

    /// Gives back `bytes` reserved before.
    pub fn release(&self, bytes: u64) {
        if bytes > 0 {
            self.ledger.give(self.slot, bytes);
        }
    }

    /// Takes `bytes`, waiting up to the ledger's wait for room; blocks the
    /// calling thread (a session's, or a transport's own).
    pub fn reserve(&self, bytes: u64) -> Result<(), CallError> {
        let started = Instant::now();
        for round in 0.. {
            if self.try_reserve(bytes) {
                return Ok(());
            }
            match self.pause(bytes, started, round) {
                Some(pause) => std::thread::sleep(pause),
                None => break,
            }
        }
        Err(self.full(bytes, started))
    }

    /// [`HostStaging::reserve`] for a task: sleeps on the runtime's timer.
    pub async fn reserve_async(&self, bytes: u64) -> Result<(), CallError> {
        let started = Instant::now();
        for round in 0.. {
            if self.try_reserve(bytes) {
                return Ok(());
            }
            match self.pause(bytes, started, round) {
                Some(pause) => tokio::time::sleep(pause).await,
                None => break,
            }
        }
        Err(self.full(bytes, started))
    }

    /// The next pause before another look, or `None` once the wait is over
    /// (or `bytes` can never fit).
    fn pause(&self, bytes: u64, started: Instant, round: u32) -> Option<Duration> {
        if bytes > self.ledger.cap() {
            return None;
        }
        let left = self.ledger.wait().checked_sub(started.elapsed()).filter(|d| !d.is_zero())?;
        Some(Duration::from_millis(1 << round.min(4)).min(MAX_PAUSE).min(left))
    }

    fn full(&self, bytes: u64, started: Instant) -> CallError {
        let (used, cap) = (self.ledger.used(), self.ledger.cap());
        let waited = started.elapsed();
        tracing::warn!(bytes, used, cap, ?waited, "host staging memory full: a bulk copy fails");
        CallError::out_of_memory(format!(
            "the server host's staging memory is full: {used} of {cap} bytes staged by its sessions; {bytes} more \
             did not fit within {waited:?} (--staging-host-mib)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_cap_and_releases_make_room() {
        let ledger = HostLedger::local(100, Duration::from_millis(20));
        let share = ledger.share(0).expect("slot 0");
        assert!(share.try_reserve(60));
        assert!(!share.try_reserve(41), "past the cap");
        assert!(share.try_reserve(40));
        assert_eq!((ledger.used(), share.held()), (100, 100));
        let started = Instant::now();
        let e = share.reserve(1).expect_err("full");
        assert_eq!(e.code, gpupool_proto::cuda::OUT_OF_MEMORY);
        assert!(e.message.contains("100 of 100 bytes"), "{}", e.message);
        assert!(started.elapsed() >= Duration::from_millis(20), "waited for room first");
        share.release(50);
        share.reserve(50).expect("room again");
        let started = Instant::now();
        assert!(share.reserve(101).is_err(), "never fits");
        assert!(started.elapsed() < Duration::from_millis(20), "refused without waiting");
    }

    #[test]
    fn a_waiting_reservation_takes_room_freed_meanwhile() {
        let ledger = HostLedger::local(10, Duration::from_secs(5));
        let share = ledger.share(0).expect("slot 0");
        assert!(share.try_reserve(10));
        let other = ledger.share(0).expect("slot 0");
        let freer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            other.release(4);
        });
        share.reserve(4).expect("room came");
        freer.join().expect("freer");
        assert_eq!(ledger.used(), 10);
    }

    #[test]
    fn concurrent_reservations_never_pass_the_cap() {
        const CAP: u64 = 1000;
        let ledger = HostLedger::shared(CAP, Duration::ZERO).expect("shared page");
        let peak = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let share = ledger.share(t % 3).expect("slot");
                let (ledger, peak) = (ledger.clone(), peak.clone());
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let bytes = 1 + (i * 7 + t as u64) % 97;
                        if share.try_reserve(bytes) {
                            peak.fetch_max(ledger.used(), Ordering::Relaxed);
                            share.release(bytes);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(peak.load(Ordering::Relaxed) <= CAP, "peak {}", peak.load(Ordering::Relaxed));
        assert!(peak.load(Ordering::Relaxed) > 0);
        assert_eq!(ledger.used(), 0, "everything released");
    }

    #[test]
    fn a_second_mapping_shares_the_counts_and_an_ended_slot_is_returned() {
        let ledger = HostLedger::shared(1 << 20, Duration::from_millis(5)).expect("shared page");
        let lease = ledger.claim().expect("a free slot");
        assert_ne!(lease.slot(), 0, "slot 0 is the creator's");
        // What a worker does with the descriptor it inherited.
        let Words::Shared { fd, .. } = &ledger.words else { panic!("shared") };
        let dup = rustix::io::fcntl_dupfd_cloexec(fd, 3).expect("dup");
        let raw = dup.as_raw_fd();
        std::mem::forget(dup);
        let worker = HostLedger::inherited(raw).expect("opened");
        assert_eq!((worker.cap(), worker.wait()), (1 << 20, Duration::from_millis(5)));
        let share = worker.share(lease.slot()).expect("its slot");
        assert!(share.try_reserve(1000));
        assert_eq!(ledger.used(), 1000, "seen through the creator's mapping");
        share.release(400);
        // The worker dies holding 600 bytes: the supervisor takes them back.
        drop(lease);
        assert_eq!(ledger.used(), 0);
        assert!(ledger.claim().is_some(), "the slot is free again");
    }

    #[test]
    fn only_a_sealed_page_of_the_layout_is_inherited() {
        assert!(HostLedger::inherited(-1).is_err());
        assert!(HostLedger::inherited(1 << 20).unwrap_err().to_string().contains("not open"));
        let file = std::fs::File::open("/proc/self/exe").expect("a file");
        let raw = file.as_raw_fd();
        std::mem::forget(file);
        assert!(HostLedger::inherited(raw).is_err(), "not a memfd");
        assert!(HostLedger::local(1, Duration::ZERO).claim().is_none(), "a local ledger has no worker slots");
    }
}
