//! Bulk copies through shared memory, for a client on its server's host
//! (the `gpupool-shm` crate; docs/transport.md, "Shared memory").
//!
//! When the `Welcome` offers a unix socket, the client makes a sealed memfd
//! region, connects, and passes it with the session's shm secret. If the
//! socket cannot be reached (another host, another mount namespace) or the
//! server refuses, copies stay on QUIC. A copy is cut into chunks of one
//! slot each: the client writes a chunk into a free slot and sends its
//! request while the server copies earlier ones, so both sides copy at
//! memory speed at once.

use crate::error::ClientError;
use crate::transport::PinnedCopy;
use gpupool_proto::v1;
use gpupool_shm::region::Region;
use gpupool_shm::ring::Ring;
use gpupool_shm::wire::{
    ADDRESS_IN_USE, Attach, MAX_HOST_REGIONS, MAX_REGION_BYTES, Op, REPLY_LEN, Reply, Request, SECRET_LEN, Slot,
    SlotRing,
};
use gpupool_shm::{ShmError, channel};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Largest slot: the server's pooled staging buffers hold 4 MiB.
const MAX_SLOT_BYTES: usize = 4 << 20;

/// Smallest host region made for pinned memory: small allocations share
/// one (each region costs a memfd, a mapping and a registration with the
/// driver on the server).
const MIN_HOST_REGION_BYTES: usize = 64 << 20;
/// Pinned allocations are whole pages.
const PAGE: usize = 4096;
/// Addresses tried for a host region that both sides map at one address
/// before it is attached at an address of the client's alone.
const ADDRESS_TRIES: usize = 4;

/// How a copy through shared memory failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server refused a chunk (a CUDA error): the copy fails with it.
    Refused(ClientError),
    /// The channel broke; `started` says whether any chunk had been sent
    /// (then the copy cannot simply go again over QUIC: the server may
    /// have staged part of it).
    Broken { error: ShmError, started: bool },
}

/// A session's shared-memory attachment.
#[derive(Debug)]
pub(crate) struct ShmBulk {
    /// One copy at a time: the ring's sequence is the socket's.
    inner: Mutex<Inner>,
    /// Cleared once the channel broke: later copies use QUIC.
    live: AtomicBool,
    /// Bytes copied through the region.
    bytes: AtomicU64,
    /// The program's pinned memory in host regions attached to the session.
    pinned: Mutex<PinnedPool>,
}

/// Host regions holding the program's pinned memory, by first address.
#[derive(Debug, Default)]
struct PinnedPool {
    regions: BTreeMap<usize, HostRegion>,
    next_id: u32,
    /// Bytes of all regions, and their bound.
    held: usize,
    limit: usize,
    /// The server maps a region at the client's address when asked
    /// (`Welcome.shm_region_addresses`).
    same_address: bool,
}

/// One host region: its blocks in use and its free spans, by offset.
#[derive(Debug)]
struct HostRegion {
    id: u32,
    region: Region,
    used: HashMap<usize, usize>,
    free: BTreeMap<usize, usize>,
    /// Mapped at the same address by the server: the program's pointers
    /// into it are device addresses as well.
    addressable: bool,
}

impl HostRegion {
    fn new(id: u32, region: Region, addressable: bool) -> Self {
        let free = BTreeMap::from([(0, region.len())]);
        Self { id, region, used: HashMap::new(), free, addressable }
    }

    fn base(&self) -> usize {
        self.region.as_ptr() as usize
    }

    /// First fit of `len` bytes (whole pages): the block's offset.
    fn take(&mut self, len: usize) -> Option<usize> {
        let (&at, &span) = self.free.iter().find(|&(_, &span)| span >= len)?;
        self.free.remove(&at);
        if span > len {
            self.free.insert(at + len, span - len);
        }
        self.used.insert(at, len);
        Some(at)
    }

    /// Frees the block at `at`, merging it with free neighbours; false when
    /// no block starts there.
    fn give(&mut self, at: usize) -> bool {
        let Some(len) = self.used.remove(&at) else { return false };
        let (mut start, mut end) = (at, at + len);
        if let Some(next) = self.free.remove(&end) {
            end += next;
        }
        if let Some((&prev, &plen)) = self.free.range(..at).next_back()
            && prev + plen == at
        {
            self.free.remove(&prev);
            start = prev;
        }
        self.free.insert(start, end - start);
        true
    }

    /// Whether no block is in use.
    fn unused(&self) -> bool {
        self.used.is_empty()
    }
}

#[derive(Debug)]
struct Inner {
    stream: UnixStream,
    region: Region,
    /// Each slot in flight carries its chunk's offset in the copy.
    ring: SlotRing<usize>,
}

impl ShmBulk {
    /// Attaches a region of `region_bytes` to the session `welcome` opened,
    /// waiting up to `connect` for the server's answer, and up to `reply`
    /// for each chunk's later.
    pub(crate) fn attach(
        welcome: &v1::Welcome,
        region_bytes: usize,
        pinned_limit: usize,
        (connect, reply): (Duration, Duration),
    ) -> Result<Self, ShmError> {
        let secret = hex::decode(&welcome.shm_secret)
            .ok()
            .and_then(|s| <[u8; SECRET_LEN]>::try_from(s).ok())
            .ok_or_else(|| ShmError::Protocol("the server's shm secret is not 32 bytes of hex".into()))?;
        let max_chunk = (welcome.max_frame_bytes as usize / 2).min(MAX_SLOT_BYTES);
        let slot = (region_bytes / 2).min(max_chunk) / 4096 * 4096;
        let ring = SlotRing::new(region_bytes, slot)
            .filter(|_| slot > 0)
            .ok_or_else(|| ShmError::Region(format!("a region of {region_bytes} bytes holds no slot")))?;
        let region = Region::create("gpupool-shm", region_bytes)?;
        let stream = UnixStream::connect(&welcome.shm_socket)?;
        stream.set_read_timeout(Some(connect))?;
        stream.set_write_timeout(Some(connect))?;
        let attach = Attach { session_id: welcome.session_id, region_len: region_bytes as u64, secret };
        channel::send_with_fd(&stream, &attach.encode(), region.fd())?;
        let answer = read_reply(&stream)?;
        if answer.code != 0 || answer.seq != 0 {
            return Err(ShmError::Protocol(format!("attachment refused ({}): {}", answer.code, answer.message)));
        }
        stream.set_read_timeout(Some(reply))?;
        stream.set_write_timeout(Some(reply))?;
        Ok(Self {
            inner: Mutex::new(Inner { stream, region, ring }),
            live: AtomicBool::new(true),
            bytes: AtomicU64::new(0),
            // A server that does not take host regions gets none: it
            // would end the attachment at the first.
            pinned: Mutex::new(PinnedPool {
                next_id: 1,
                limit: if welcome.shm_host_regions { pinned_limit } else { 0 },
                same_address: welcome.shm_region_addresses,
                ..PinnedPool::default()
            }),
        })
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, PinnedPool> {
        self.pinned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `size` bytes of pinned memory in a host region attached to the
    /// session (a new one when none has room), page-aligned; `None` when
    /// the channel is down, the bound is reached or the server refused the
    /// region (the caller then gives plain memory).
    pub(crate) fn pinned_alloc(&self, size: usize) -> Option<usize> {
        if !self.live() || size == 0 {
            return None;
        }
        let len = size.checked_next_multiple_of(PAGE)?;
        let mut pool = self.pool();
        for host in pool.regions.values_mut() {
            if let Some(at) = host.take(len) {
                return Some(host.base() + at);
            }
        }
        let room = pool.limit.saturating_sub(pool.held);
        let region_len = len.max(MIN_HOST_REGION_BYTES).min(room).min(MAX_REGION_BYTES as usize);
        if region_len < len || pool.regions.len() >= MAX_HOST_REGIONS {
            tracing::debug!(
                size,
                held = pool.held,
                limit = pool.limit,
                "pinned memory beyond the shared bound: plain memory"
            );
            return None;
        }
        let id = pool.next_id;
        let (region, addressable) = self.attach_region(id, region_len, pool.same_address)?;
        pool.next_id += 1;
        pool.held += region_len;
        let mut host = HostRegion::new(id, region, addressable);
        let at = host.take(len)?;
        let base = host.base();
        pool.regions.insert(base, host);
        Some(base + at)
    }

    /// Makes host region `id` of `len` bytes and attaches it: where the
    /// server maps regions at the client's address (`same_address`), at a
    /// random address both processes have free (a few tries), so that the
    /// program's pinned pointers are device addresses too; else, or when
    /// no address tried was free on both sides, anywhere. `None` (plain
    /// memory) when the region cannot be made or is refused.
    fn attach_region(&self, id: u32, len: usize, same_address: bool) -> Option<(Region, bool)> {
        let tries = if same_address { ADDRESS_TRIES } else { 0 };
        for _ in 0..tries {
            let at = gpupool_shm::region::pick_address(len);
            let region = match Region::create_at("gpupool-pinned", len, Some(at)) {
                Ok(r) => r,
                Err(ShmError::AddressInUse(_)) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "no host region for pinned memory: plain memory");
                    return None;
                }
            };
            match self.region_op(Op::AddRegion { id, len: len as u64, at: at as u64 }, Some(region.fd())) {
                Ok(()) => return Some((region, true)),
                Err(ShmError::AddressInUse(m)) => {
                    tracing::debug!(at, reason = %m, "host region address taken on the server")
                }
                Err(e) => {
                    tracing::debug!(error = %e, "host region not attached: plain memory");
                    return None;
                }
            }
        }
        if same_address {
            tracing::debug!("no address free on both sides: pinned memory not device-addressable");
        }
        let region = Region::create("gpupool-pinned", len)
            .inspect_err(|e| tracing::debug!(error = %e, "no host region for pinned memory: plain memory"))
            .ok()?;
        match self.region_op(Op::AddRegion { id, len: len as u64, at: 0 }, Some(region.fd())) {
            Ok(()) => Some((region, false)),
            Err(e) => {
                tracing::debug!(error = %e, "host region not attached: plain memory");
                None
            }
        }
    }

    /// Whether all of `[ptr, ptr + len)` (non-empty) lies in a host region
    /// the server maps at the same address: the program may use it as
    /// device memory, as pinned memory under unified addressing.
    pub(crate) fn device_addressable(&self, ptr: usize, len: usize) -> bool {
        let pool = self.pool();
        let Some((&base, host)) = pool.regions.range(..=ptr).next_back() else { return false };
        host.addressable && len > 0 && (ptr - base).checked_add(len).is_some_and(|end| end <= host.region.len())
    }

    /// Frees pinned memory from [`Self::pinned_alloc`]; false when `ptr`
    /// is not such a block. A region left empty is detached and unmapped
    /// (the caller synchronized first, so no copy still uses it).
    pub(crate) fn pinned_free(&self, ptr: usize) -> bool {
        let mut pool = self.pool();
        let Some((&base, host)) = pool.regions.range_mut(..=ptr).next_back() else { return false };
        if ptr - base >= host.region.len() || !host.give(ptr - base) {
            return false;
        }
        if host.unused() {
            let host = pool.regions.remove(&base).expect("found above");
            pool.held -= host.region.len();
            if self.live()
                && let Err(e) = self.region_op(Op::RemoveRegion { id: host.id }, None)
            {
                tracing::debug!(error = %e, "host region not detached");
            }
        }
        true
    }

    /// Copies between `len` bytes at `addr` of a host region and `copy`'s
    /// buffer (through the region's checked copies: no reference to its
    /// bytes is made).
    pub(crate) fn pinned_copy(&self, addr: usize, len: usize, copy: PinnedCopy<'_>) -> crate::error::Result<()> {
        let pool = self.pool();
        let outside = || ClientError::InvalidValue(format!("[{addr:#x}, +{len}) is not in a host region"));
        let (&base, host) = pool.regions.range(..=addr).next_back().ok_or_else(outside)?;
        let start = addr - base;
        let done = match copy {
            PinnedCopy::In(data) => host.region.write(start, data),
            PinnedCopy::Out(out) => host.region.read(start, out),
        };
        done.map_err(|_| outside())
    }

    /// Whether `ptr` starts a block from [`Self::pinned_alloc`].
    pub(crate) fn is_pinned(&self, ptr: usize) -> bool {
        let pool = self.pool();
        pool.regions.range(..=ptr).next_back().is_some_and(|(&base, host)| host.used.contains_key(&(ptr - base)))
    }

    /// The host region, offset and length of `[ptr, ptr + len)` when all of
    /// it lies in one of the session's host regions and the channel is up.
    pub(crate) fn host_region(&self, ptr: usize, len: usize) -> Option<v1::HostRegionRef> {
        if !self.live() || len == 0 {
            return None;
        }
        let pool = self.pool();
        let (&base, host) = pool.regions.range(..=ptr).next_back()?;
        let offset = ptr - base;
        offset.checked_add(len).filter(|&end| end <= host.region.len())?;
        Some(v1::HostRegionRef { region: host.id, offset: offset as u64, size: len as u64 })
    }

    /// Sends a region operation (with `region`'s memfd for an addition)
    /// and waits for its answer. A refusal leaves the channel up; a broken
    /// channel stops shared memory.
    fn region_op(&self, op: Op, region: Option<BorrowedFd<'_>>) -> Result<(), ShmError> {
        let mut inner = self.lock();
        let seq = inner.ring.control().ok_or_else(|| ShmError::Protocol("copies in flight".into()))?;
        let message = Request::region(seq, op).encode();
        let sent = match region {
            Some(fd) => channel::send_with_fd(&inner.stream, &message, fd),
            None => channel::write_message(&inner.stream, &message),
        };
        let answer = sent.and_then(|()| read_reply(&inner.stream));
        match answer {
            Ok(reply) if reply.seq == seq && reply.code == 0 => Ok(()),
            Ok(reply) if reply.seq == seq && reply.code == ADDRESS_IN_USE => Err(ShmError::AddressInUse(reply.message)),
            Ok(reply) if reply.seq == seq => {
                Err(ShmError::Protocol(format!("refused ({}): {}", reply.code, reply.message)))
            }
            Ok(reply) => {
                drop(inner);
                self.broken(ShmError::Protocol(format!(
                    "reply {} to region request {seq}: {}",
                    reply.seq, reply.message
                )))
            }
            Err(e) => {
                drop(inner);
                self.broken(e)
            }
        }
    }

    /// Attaches a command ring with pipes of `capacity` bytes to the
    /// session (before its first batch): its commands go through it once
    /// this returns. A refusal leaves the attachment as it was.
    pub(crate) fn attach_commands(&self, capacity: u64) -> Result<Arc<Ring>, ShmError> {
        if !self.live() {
            return Err(ShmError::Protocol("the shared-memory channel failed".into()));
        }
        let ring = Ring::create(capacity)?;
        self.region_op(Op::Commands { len: ring.len() }, Some(ring.fd()))?;
        Ok(ring)
    }

    fn broken(&self, error: ShmError) -> Result<(), ShmError> {
        tracing::warn!(%error, "shared-memory channel failed; copies use QUIC from now on");
        self.live.store(false, Ordering::Release);
        Err(error)
    }

    /// Whether copies still go through shared memory.
    pub(crate) fn live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Stops copying through shared memory (the session moved to another
    /// server, whose process never saw this region): later copies use
    /// QUIC, and the serving side sees the channel end.
    pub(crate) fn close(&self) {
        self.live.store(false, Ordering::Release);
        let _ = self.lock().stream.shutdown(std::net::Shutdown::Both);
    }

    /// Bytes copied through the region so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Uploads `data` as staged transfer `id`.
    pub(crate) fn put(&self, id: u64, data: &[u8]) -> Result<(), Failure> {
        let mut inner = self.lock();
        let total = data.len() as u64;
        let r = inner.copy(
            data.len(),
            |inner, slot| {
                let chunk = &data[slot.tag..slot.tag + slot.len];
                inner.region.write(slot.region_offset, chunk)?;
                Ok(Op::Put { total })
            },
            id,
            |_, _| Ok(()),
        );
        self.finish(r, data.len())
    }

    /// Downloads staged transfer `id` into `out`.
    pub(crate) fn get(&self, id: u64, out: &mut [u8]) -> Result<(), Failure> {
        let mut inner = self.lock();
        let len = out.len();
        let r = inner.copy(
            len,
            |_, _| Ok(Op::Get),
            id,
            |inner, slot| inner.region.read(slot.region_offset, &mut out[slot.tag..slot.tag + slot.len]),
        );
        self.finish(r, len)
    }

    fn finish(&self, r: Result<(), Failure>, len: usize) -> Result<(), Failure> {
        match &r {
            Ok(()) => {
                self.bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(Failure::Broken { error, .. }) => {
                tracing::warn!(%error, "shared-memory channel failed; copies use QUIC from now on");
                self.live.store(false, Ordering::Release);
            }
            Err(Failure::Refused(_)) => {}
        }
        r
    }
}

impl Inner {
    /// Runs a copy of `total` bytes of transfer `id` chunk by chunk:
    /// `before` fills a slot and says what to ask, `after` takes a slot
    /// whose reply came. Keeps every slot busy; a refused chunk fails the
    /// copy once the chunks in flight have been answered.
    fn copy(
        &mut self,
        total: usize,
        mut before: impl FnMut(&Self, &Slot<usize>) -> Result<Op, ShmError>,
        id: u64,
        mut after: impl FnMut(&Self, &Slot<usize>) -> Result<(), ShmError>,
    ) -> Result<(), Failure> {
        let chunk = self.ring.slot_bytes();
        let mut offset = 0;
        let mut refused = None;
        let mut started = false;
        let broken = |error, started| Failure::Broken { error, started };
        while offset < total || self.ring.in_flight() > 0 {
            let len = chunk.min(total - offset);
            let next = (offset < total && refused.is_none()).then(|| self.ring.acquire(len, offset)).flatten();
            if let Some(slot) = next {
                let op = before(self, &slot).map_err(|e| broken(e, started))?;
                let request = Request {
                    seq: slot.seq,
                    op,
                    transfer: id,
                    offset: offset as u64,
                    region_offset: slot.region_offset as u64,
                    len: len as u64,
                };
                // A request the socket did not take never reached the
                // server: nothing started when it is the first.
                channel::write_message(&self.stream, &request.encode()).map_err(|e| broken(e, started))?;
                started = true;
                offset += len;
                continue;
            }
            if self.ring.in_flight() == 0 {
                // Refused: nothing more goes, nothing is in flight.
                break;
            }
            let reply = read_reply(&self.stream).map_err(|e| broken(e, started))?;
            let slot = self.ring.complete(reply.seq).map_err(|e| {
                // A reply out of order (the server ended the attachment
                // with its reason as reply 0): the ring is void.
                let why = if reply.seq == 0 { ShmError::Protocol(reply.message.clone()) } else { e };
                broken(why, started)
            })?;
            if reply.code != 0 {
                refused.get_or_insert(ClientError::Cuda { code: reply.code, message: reply.message });
                continue;
            }
            after(self, &slot).map_err(|e| broken(e, started))?;
        }
        match refused {
            Some(e) => Err(Failure::Refused(e)),
            None => Ok(()),
        }
    }
}

fn read_reply(stream: &UnixStream) -> Result<Reply, ShmError> {
    let b = channel::read_message::<REPLY_LEN>(stream)?.ok_or_else(|| {
        ShmError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server ended the socket"))
    })?;
    Reply::decode(&b)
}
