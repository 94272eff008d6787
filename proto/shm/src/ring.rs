//! The command ring: a session's batches and replies through shared memory
//! (docs/transport.md, "Commands in shared memory").
//!
//! A sealed memfd of its own, attached over the session's attachment socket
//! (`Op::Commands`), holds two single-producer single-consumer byte pipes:
//! one towards the server (the client's frames), one towards the client
//! (the server's). Each pipe carries the same length-prefixed frames as a
//! QUIC command stream, so a frame larger than the pipe simply goes in
//! pieces. Layout (all little-endian, natural alignment):
//!
//! ```text
//! 0     pipe to the server:  head u64 @0, tail u64 @64,
//!                            data wake u32 @128, reader asleep u32 @132,
//!                            space wake u32 @192, writer asleep u32 @196
//! 1024  pipe to the client:  the same, at 1024 + offset
//! 2048  closed by the client u32; 2052 closed by the server u32
//! 2112  host regions revoked u32 (the server's)
//! 2176  the last batch naming a host region u64 (the client's)
//! 4096  the pipe to the server's bytes (capacity, a power of two)
//! 4096 + capacity  the pipe to the client's bytes
//! ```
//!
//! `head` counts the bytes ever written (by the pipe's writer), `tail` the
//! bytes ever read (by its reader). Each side keeps its own index privately
//! and reads the other one from shared memory once per operation, then
//! checks it (`head - tail` at most the capacity, with wrapping
//! arithmetic): the peer may write anything there at any time, and a value
//! that breaks the pipe's rules is a protocol error, never a read outside
//! it. Bytes are copied out before they are looked at ([`Region`]).
//!
//! Wake-up: a waiting side spins for a bounded time, then marks itself
//! asleep and waits on the pipe's futex word (shared, not private: the
//! other process wakes it), always with a timeout. A writer bumps the data
//! word after publishing `head` and makes the `futex_wake` system call only
//! when the reader said it sleeps; a reader does the same for space. With
//! sequentially consistent operations on the words, a wake-up cannot be
//! lost: either the writer sees the flag, or the reader sees the new head
//! (or the changed word, and `futex_wait` returns at once).
//!
//! Host regions revoked (a session about to move to another server, which
//! cannot map the client's host regions): before a call names a host
//! region, the client stores the sequence number of the batch the call
//! goes in, then loads the revoked word, and names the region only while it
//! reads 0 ([`Ring::region_batch`]). The server stores 1, then loads the
//! last batch ([`Ring::revoke_regions`]). Sequentially consistent on both
//! sides, so either the client sees the revocation, or the server sees
//! that batch: once the server has run every batch up to the one it read,
//! no later batch names a region.

use crate::ShmError;
use crate::region::Region;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes before the pipes' data.
pub const HEADER_BYTES: u64 = 4096;
/// Smallest and largest capacity of one pipe.
pub const MIN_CAPACITY: u64 = 4096;
pub const MAX_CAPACITY: u64 = 64 << 20;
/// The capacity a client picks by default: a launch batch is tens of
/// bytes, a full batch of small copies some hundreds of KiB.
pub const DEFAULT_CAPACITY: u64 = 1 << 20;

/// The server's word: host regions may not be named any more.
const REVOKED: usize = 2112;
/// The client's word: the last batch with a call naming a host region.
const REGION_BATCH: usize = 2176;

/// A side's `closed` word: still open.
const OPEN: u32 = 0;
/// Closed because the session ended (the client closes it); any other
/// non-zero value is a broken ring.
const CLEAN: u32 = 1;
const BROKEN: u32 = 2;

/// Which party of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    fn peer(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// How the peer left the ring, as far as its word says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The session ended.
    Clean,
    /// The ring broke (or the peer wrote a value of its own there).
    Broken,
}

/// The pipe's capacity for a ring region of `len` bytes, when that is a
/// valid length: [`HEADER_BYTES`] plus twice a power of two from
/// [`MIN_CAPACITY`] to [`MAX_CAPACITY`].
pub fn capacity_of(len: u64) -> Result<u64, ShmError> {
    let cap = len.checked_sub(HEADER_BYTES).map(|d| d / 2);
    match cap {
        Some(c) if c.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&c) && HEADER_BYTES + 2 * c == len => {
            Ok(c)
        }
        _ => Err(ShmError::Protocol(format!(
            "a command ring of {len} bytes ({HEADER_BYTES} plus twice a power of two from {MIN_CAPACITY} to {MAX_CAPACITY})"
        ))),
    }
}

/// The region's length for pipes of `capacity` bytes.
pub fn region_len(capacity: u64) -> u64 {
    HEADER_BYTES + 2 * capacity
}

/// A mapped command ring, shared by its reader and writer.
#[derive(Debug)]
pub struct Ring {
    region: Region,
    capacity: u64,
}

/// The words of one pipe.
struct Words<'a> {
    head: &'a AtomicU64,
    tail: &'a AtomicU64,
    data_wake: &'a AtomicU32,
    reader_asleep: &'a AtomicU32,
    space_wake: &'a AtomicU32,
    writer_asleep: &'a AtomicU32,
}

impl Ring {
    /// A fresh ring with pipes of `capacity` bytes (the client's).
    pub fn create(capacity: u64) -> Result<Arc<Self>, ShmError> {
        let len = region_len(capacity);
        capacity_of(len)?;
        let region = Region::create("gpupool-commands", len as usize)?;
        Self::with(region, capacity)
    }

    /// Maps a ring received from the peer: a sealed memfd of exactly `len`
    /// bytes, a valid ring length.
    pub fn open(fd: OwnedFd, len: u64) -> Result<Arc<Self>, ShmError> {
        let capacity = capacity_of(len)?;
        Self::with(Region::open(fd, len)?, capacity)
    }

    fn with(region: Region, capacity: u64) -> Result<Arc<Self>, ShmError> {
        let ring = Self { region, capacity };
        // Every word is reachable (checked once, so later accesses cannot fail).
        for base in [0, 1024] {
            ring.words(base)?;
        }
        ring.region.atomic_u32(2052)?;
        ring.region.atomic_u32(REVOKED)?;
        ring.region.atomic_u64(REGION_BATCH)?;
        Ok(Arc::new(ring))
    }

    /// The memfd, to pass to the server.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.region.fd()
    }

    /// The region's length.
    pub fn len(&self) -> u64 {
        self.region.len() as u64
    }

    /// Always false (a ring has its header).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// One pipe's capacity.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn words(&self, base: usize) -> Result<Words<'_>, ShmError> {
        let r = &self.region;
        Ok(Words {
            head: r.atomic_u64(base)?,
            tail: r.atomic_u64(base + 64)?,
            data_wake: r.atomic_u32(base + 128)?,
            reader_asleep: r.atomic_u32(base + 132)?,
            space_wake: r.atomic_u32(base + 192)?,
            writer_asleep: r.atomic_u32(base + 196)?,
        })
    }

    fn pipe(&self, towards: Side) -> (Words<'_>, usize) {
        let (base, data) = match towards {
            Side::Server => (0, HEADER_BYTES),
            Side::Client => (1024, HEADER_BYTES + self.capacity),
        };
        // Checked in `with`.
        let words = self.words(base).unwrap_or_else(|_| unreachable!("ring words checked at creation"));
        (words, data as usize)
    }

    fn closed_word(&self, side: Side) -> &AtomicU32 {
        let offset = match side {
            Side::Client => 2048,
            Side::Server => 2052,
        };
        self.region.atomic_u32(offset).unwrap_or_else(|_| unreachable!("ring words checked at creation"))
    }

    /// Marks `side` gone (`clean`: the session ended) and wakes whoever
    /// waits on either pipe.
    pub fn close(&self, side: Side, clean: bool) {
        self.closed_word(side).store(if clean { CLEAN } else { BROKEN }, Ordering::SeqCst);
        self.wake_all();
    }

    /// Wakes whoever waits on either pipe (they look at their flags again).
    pub fn wake_all(&self) {
        for towards in [Side::Server, Side::Client] {
            let (w, _) = self.pipe(towards);
            for word in [w.data_wake, w.space_wake] {
                word.fetch_add(1, Ordering::SeqCst);
                // The kernel reads the count as an int: `u32::MAX` would be -1.
                let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), i32::MAX as u32);
            }
        }
    }

    /// Whether `side` left the ring, and how.
    pub fn closed(&self, side: Side) -> Option<Closed> {
        match self.closed_word(side).load(Ordering::SeqCst) {
            OPEN => None,
            CLEAN => Some(Closed::Clean),
            _ => Some(Closed::Broken),
        }
    }

    fn revoked_word(&self) -> &AtomicU32 {
        self.region.atomic_u32(REVOKED).unwrap_or_else(|_| unreachable!("ring words checked at creation"))
    }

    fn region_batch_word(&self) -> &AtomicU64 {
        self.region.atomic_u64(REGION_BATCH).unwrap_or_else(|_| unreachable!("ring words checked at creation"))
    }

    /// The client, before a call in batch `seq` names a host region: whether
    /// it may (the server has not revoked them). See the module's
    /// documentation.
    pub fn region_batch(&self, seq: u64) -> bool {
        self.region_batch_word().fetch_max(seq, Ordering::SeqCst);
        self.revoked_word().load(Ordering::SeqCst) == 0
    }

    /// The server: no call may name a host region from now on; returns the
    /// last batch whose calls may still name one (the client's word: only
    /// that client's session trusts it).
    pub fn revoke_regions(&self) -> u64 {
        self.revoked_word().store(1, Ordering::SeqCst);
        self.region_batch_word().load(Ordering::SeqCst)
    }

    /// The server: host regions may be named again (the move did not
    /// happen).
    pub fn restore_regions(&self) {
        self.revoked_word().store(0, Ordering::SeqCst);
    }

    /// The writing end of the pipe `side` writes into.
    pub fn writer(self: &Arc<Self>, side: Side) -> Writer {
        Writer { ring: self.clone(), towards: side.peer(), head: 0 }
    }

    /// The reading end of the pipe `side` reads from.
    pub fn reader(self: &Arc<Self>, side: Side) -> Reader {
        Reader { ring: self.clone(), towards: side, tail: 0, partial: Vec::new(), want: None }
    }
}

/// Bumps `wake` and wakes its sleeper when `asleep` says there is one.
fn notify(wake: &AtomicU32, asleep: &AtomicU32) {
    wake.fetch_add(1, Ordering::SeqCst);
    if asleep.load(Ordering::SeqCst) != 0 {
        let _ = rustix::thread::futex::wake(wake, rustix::thread::futex::Flags::empty(), 1);
    }
}

/// Spins up to `spin` until `ready`, then sleeps on `wake` (marked in
/// `asleep`) until `ready` or `timeout`; whether `ready` held at the end.
fn wait(
    wake: &AtomicU32,
    asleep: &AtomicU32,
    spin: Duration,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> bool {
    if ready() {
        return true;
    }
    let start = Instant::now();
    while start.elapsed() < spin {
        std::hint::spin_loop();
        if ready() {
            return true;
        }
    }
    asleep.store(1, Ordering::SeqCst);
    let seen = wake.load(Ordering::SeqCst);
    if !ready() {
        let left = timeout.saturating_sub(start.elapsed());
        let ts = rustix::thread::futex::Timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ };
        // EAGAIN (the word moved), EINTR and the timeout all end the wait:
        // the caller looks again.
        let _ = rustix::thread::futex::wait(wake, rustix::thread::futex::Flags::empty(), seen, Some(&ts));
    }
    asleep.store(0, Ordering::SeqCst);
    ready()
}

/// The writing end of one pipe.
#[derive(Debug)]
pub struct Writer {
    ring: Arc<Ring>,
    towards: Side,
    /// Bytes written so far: this side's own count, never read back.
    head: u64,
}

impl Writer {
    /// The ring.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Room in the pipe now, from the reader's `tail` read once and checked.
    fn free(&self) -> Result<u64, ShmError> {
        let (w, _) = self.ring.pipe(self.towards);
        let tail = w.tail.load(Ordering::Acquire);
        let used = self.head.wrapping_sub(tail);
        if used > self.ring.capacity {
            return Err(ShmError::Protocol(format!(
                "the command ring's reader index {tail} is not within {} bytes before {}",
                self.ring.capacity, self.head
            )));
        }
        Ok(self.ring.capacity - used)
    }

    /// Writes as much of `src` as fits now; the bytes written.
    pub fn try_write(&mut self, src: &[u8]) -> Result<usize, ShmError> {
        let n = self.free()?.min(src.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let (w, data) = self.ring.pipe(self.towards);
        let cap = self.ring.capacity as usize;
        let at = (self.head % self.ring.capacity) as usize;
        let first = n.min(cap - at);
        self.ring.region.write(data + at, &src[..first])?;
        self.ring.region.write(data, &src[first..n])?;
        self.head = self.head.wrapping_add(n as u64);
        w.head.store(self.head, Ordering::Release);
        notify(w.data_wake, w.reader_asleep);
        Ok(n)
    }

    /// Writes all of `src`, waiting for room (spinning up to `spin`, then
    /// sleeping in slices of at most `slice`) until `deadline`; between
    /// waits `gone` says why to give up (the peer left, the session ended).
    pub fn write_all(
        &mut self,
        mut src: &[u8],
        spin: Duration,
        slice: Duration,
        deadline: Instant,
        mut gone: impl FnMut() -> Option<ShmError>,
    ) -> Result<(), ShmError> {
        while !src.is_empty() {
            let n = self.try_write(src)?;
            src = &src[n..];
            if src.is_empty() {
                break;
            }
            if let Some(e) = gone() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ShmError::Protocol("the command ring stayed full".into()));
            }
            self.wait_room(spin, slice.min(deadline - now));
        }
        Ok(())
    }

    /// Waits until the pipe has room (or the peer closed, or `timeout`).
    pub fn wait_room(&self, spin: Duration, timeout: Duration) -> bool {
        let (w, _) = self.ring.pipe(self.towards);
        let peer = self.towards;
        wait(w.space_wake, w.writer_asleep, spin, timeout, || {
            self.free().map_or(true, |f| f > 0) || self.ring.closed(peer).is_some()
        })
    }
}

/// The reading end of one pipe, assembling frames.
#[derive(Debug)]
pub struct Reader {
    ring: Arc<Ring>,
    towards: Side,
    /// Bytes read so far: this side's own count.
    tail: u64,
    /// The frame being read: its header, then its body.
    partial: Vec<u8>,
    /// The body length once the header was read.
    want: Option<usize>,
}

impl Reader {
    /// The ring.
    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Bytes waiting now, from the writer's `head` read once and checked.
    fn available(&self) -> Result<u64, ShmError> {
        let (w, _) = self.ring.pipe(self.towards);
        let head = w.head.load(Ordering::Acquire);
        let avail = head.wrapping_sub(self.tail);
        if avail > self.ring.capacity {
            return Err(ShmError::Protocol(format!(
                "the command ring's writer index {head} is not within {} bytes after {}",
                self.ring.capacity, self.tail
            )));
        }
        Ok(avail)
    }

    /// Appends up to `n` waiting bytes to `partial`; the bytes taken.
    fn take(&mut self, n: usize) -> Result<usize, ShmError> {
        let n = self.available()?.min(n as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let (w, data) = self.ring.pipe(self.towards);
        let cap = self.ring.capacity as usize;
        let at = (self.tail % self.ring.capacity) as usize;
        let first = n.min(cap - at);
        self.ring.region.read_append(data + at, first, &mut self.partial)?;
        self.ring.region.read_append(data, n - first, &mut self.partial)?;
        self.tail = self.tail.wrapping_add(n as u64);
        w.tail.store(self.tail, Ordering::Release);
        notify(w.space_wake, w.writer_asleep);
        Ok(n)
    }

    /// The next whole frame's body if it has arrived, at most `max` bytes
    /// (a larger length is a protocol error); what arrived of it so far is
    /// kept for the next call.
    pub fn try_frame(&mut self, max: usize) -> Result<Option<Vec<u8>>, ShmError> {
        loop {
            match self.want {
                None => {
                    let need = gpupool_header_len() - self.partial.len();
                    if self.take(need)? < need {
                        return Ok(None);
                    }
                    let mut header = [0u8; 4];
                    header.copy_from_slice(&self.partial);
                    let len = u32::from_le_bytes(header) as usize;
                    if len > max {
                        return Err(ShmError::Protocol(format!("a frame of {len} bytes (at most {max})")));
                    }
                    self.partial.clear();
                    self.want = Some(len);
                }
                Some(len) => {
                    let need = len - self.partial.len();
                    if need > 0 && self.take(need)? < need {
                        return Ok(None);
                    }
                    self.want = None;
                    return Ok(Some(std::mem::take(&mut self.partial)));
                }
            }
        }
    }

    /// Whether a byte is waiting (a broken index counts: the next read
    /// meets it).
    pub fn readable(&self) -> bool {
        self.available().map_or(true, |a| a > 0)
    }

    /// Waits until a byte is waiting (or the peer closed, or `timeout`).
    pub fn wait_readable(&self, spin: Duration, timeout: Duration) -> bool {
        let (w, _) = self.ring.pipe(self.towards);
        let peer = self.towards.peer();
        wait(w.data_wake, w.reader_asleep, spin, timeout, || self.readable() || self.ring.closed(peer).is_some())
    }
}

/// The frame header's length (`gpupool_proto::frame::HEADER_LEN`: a
/// little-endian u32 length; this crate does not depend on the protocol's).
const fn gpupool_header_len() -> usize {
    4
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    fn pair(capacity: u64) -> (Arc<Ring>, Arc<Ring>) {
        let client = Ring::create(capacity).expect("ring");
        let fd = client.fd().try_clone_to_owned().expect("dup");
        let server = Ring::open(fd, region_len(capacity)).expect("opened");
        (client, server)
    }

    #[test]
    fn lengths_are_checked() {
        assert_eq!(capacity_of(region_len(4096)).expect("min"), 4096);
        assert_eq!(capacity_of(region_len(MAX_CAPACITY)).expect("max"), MAX_CAPACITY);
        for bad in [0, 4096, region_len(2048), region_len(MAX_CAPACITY * 2), region_len(4096) + 1, region_len(6144)] {
            assert!(capacity_of(bad).is_err(), "{bad}");
        }
        let client = Ring::create(4096).expect("ring");
        let fd = client.fd().try_clone_to_owned().expect("dup");
        assert!(Ring::open(fd, region_len(8192)).is_err(), "a length the file does not hold");
    }

    #[test]
    fn a_revocation_is_seen_by_the_client_or_names_its_last_region_batch() {
        let (client, server) = pair(4096);
        assert!(client.region_batch(3), "not revoked");
        assert!(client.region_batch(2), "an earlier batch keeps the later mark");
        assert_eq!(server.revoke_regions(), 3, "the last batch naming a region");
        assert!(!client.region_batch(4), "revoked: batch 4 names none");
        server.restore_regions();
        assert!(client.region_batch(5), "restored");
        // Racing: every batch that named a region is at most what the
        // server read, or the client saw the revocation.
        for _ in 0..200 {
            let (client, server) = pair(4096);
            let named = std::thread::spawn(move || (1..=1000u64).filter(|&s| client.region_batch(s)).max());
            std::thread::yield_now();
            let last = server.revoke_regions();
            let named = named.join().expect("client").unwrap_or(0);
            assert!(named <= last, "batch {named} named a region after the server read {last}");
        }
    }

    #[test]
    fn frames_cross_the_wrap_and_a_full_pipe() {
        let (client, server) = pair(4096);
        let mut w = client.writer(Side::Client);
        let mut r = server.reader(Side::Server);
        // 3000-byte frames: the second wraps around the 4096-byte pipe.
        for i in 0..10u8 {
            let body = vec![i; 3000];
            assert_eq!(w.try_write(&frame(&body)).expect("write"), 3004);
            assert_eq!(r.try_frame(1 << 20).expect("read"), Some(body));
            assert_eq!(r.try_frame(1 << 20).expect("nothing"), None);
        }
        // Full: nothing more fits until the reader takes some.
        let big = frame(&[7u8; 10_000]);
        assert_eq!(w.try_write(&big).expect("fill"), 4096);
        assert_eq!(w.try_write(&big[4096..]).expect("full"), 0);
        assert!(!w.wait_room(Duration::ZERO, Duration::from_millis(1)), "no room");
        assert_eq!(r.try_frame(1 << 20).expect("partial"), None, "a frame larger than the pipe comes in pieces");
        let n = w.try_write(&big[4096..]).expect("room again");
        assert_eq!(n, 4096);
        assert_eq!(r.try_frame(1 << 20).expect("partial"), None);
        w.try_write(&big[8192..]).expect("rest");
        assert_eq!(r.try_frame(1 << 20).expect("whole"), Some(vec![7u8; 10_000]));
    }

    #[test]
    fn hostile_indices_and_lengths_are_errors() {
        let (client, server) = pair(4096);
        let mut r = server.reader(Side::Server);
        let (words, _) = client.pipe(Side::Server);
        // A head more than the capacity ahead, or behind the reader.
        for head in [4097, u64::MAX, 1 << 40] {
            words.head.store(head, Ordering::SeqCst);
            assert!(r.try_frame(1 << 20).unwrap_err().to_string().contains("writer index"), "{head}");
        }
        // A length over the bound.
        words.head.store(0, Ordering::SeqCst);
        let mut w = client.writer(Side::Client);
        w.try_write(&(1u32 << 30).to_le_bytes()).expect("write");
        assert!(r.try_frame(1 << 20).unwrap_err().to_string().contains("a frame of"));
        // The server's writer meets a tail the client made up.
        let mut sw = server.writer(Side::Server);
        let (to_client, _) = client.pipe(Side::Client);
        to_client.tail.store(5, Ordering::SeqCst);
        assert!(sw.try_write(b"x").unwrap_err().to_string().contains("reader index"));
        to_client.tail.store(0, Ordering::SeqCst);
        assert_eq!(sw.try_write(b"x").expect("sane again"), 1);
    }

    #[test]
    fn a_sleeping_reader_is_woken_and_close_is_seen() {
        let (client, server) = pair(4096);
        let mut r = server.reader(Side::Server);
        let waiter = std::thread::spawn(move || {
            let woke = r.wait_readable(Duration::ZERO, Duration::from_secs(10));
            (woke, r.try_frame(64).expect("frame"))
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut w = client.writer(Side::Client);
        w.try_write(&frame(b"hi")).expect("write");
        let (woke, body) = waiter.join().expect("joined");
        assert!(woke);
        assert_eq!(body.as_deref(), Some(&b"hi"[..]));
        // A close wakes a sleeper and says how.
        let r = server.reader(Side::Server);
        let started = Instant::now();
        let closer = {
            let client = client.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                client.close(Side::Client, true);
            })
        };
        assert!(r.wait_readable(Duration::ZERO, Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(5));
        closer.join().expect("joined");
        assert_eq!(server.closed(Side::Client), Some(Closed::Clean));
        assert_eq!(server.closed(Side::Server), None);
        server.closed_word(Side::Server).store(77, Ordering::SeqCst);
        assert_eq!(client.closed(Side::Server), Some(Closed::Broken), "any other value is a broken ring");
    }

    #[test]
    fn write_all_waits_for_a_slow_reader() {
        let (client, server) = pair(4096);
        let body: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        let expected = body.clone();
        let reader = std::thread::spawn(move || {
            let mut r = server.reader(Side::Server);
            loop {
                if let Some(f) = r.try_frame(1 << 20).expect("read") {
                    return f;
                }
                r.wait_readable(Duration::from_micros(10), Duration::from_millis(100));
            }
        });
        let mut w = client.writer(Side::Client);
        let deadline = Instant::now() + Duration::from_secs(10);
        w.write_all(&frame(&body), Duration::from_micros(10), Duration::from_millis(50), deadline, || None)
            .expect("written");
        assert_eq!(reader.join().expect("joined"), expected);
    }

    proptest! {
        /// Any sequence of frames and write sizes arrives whole and in
        /// order through a small pipe, across every wrap-around.
        #[test]
        fn frames_arrive_in_order(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..9000), 1..20),
                                  step in 1usize..5000) {
            let (client, server) = pair(4096);
            let mut w = client.writer(Side::Client);
            let mut r = server.reader(Side::Server);
            let stream: Vec<u8> = bodies.iter().flat_map(|b| frame(b)).collect();
            let mut sent = 0;
            let mut got = Vec::new();
            while got.len() < bodies.len() {
                let end = (sent + step).min(stream.len());
                sent += w.try_write(&stream[sent..end]).expect("write");
                while let Some(f) = r.try_frame(1 << 20).expect("read") {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, bodies);
        }

        /// Whatever the peer writes into the shared words, a read or write
        /// is an error or stays within the pipe (no panic, no read outside).
        #[test]
        fn hostile_words_never_panic(head in any::<u64>(), tail in any::<u64>(), len in any::<u32>()) {
            let (client, server) = pair(4096);
            let (to_server, data) = client.pipe(Side::Server);
            client.region.write(data, &len.to_le_bytes()).expect("len");
            to_server.head.store(head, Ordering::SeqCst);
            let (to_client, _) = client.pipe(Side::Client);
            to_client.tail.store(tail, Ordering::SeqCst);
            let mut r = server.reader(Side::Server);
            if let Ok(Some(f)) = r.try_frame(1 << 16) {
                prop_assert!(f.len() <= 1 << 16);
            }
            let mut w = server.writer(Side::Server);
            match w.try_write(&[1u8; 100]) {
                Ok(n) => prop_assert!(n <= 100),
                Err(_) => prop_assert!(tail != 0),
            }
        }
    }
}
