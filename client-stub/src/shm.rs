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
use gpupool_proto::v1;
use gpupool_shm::region::Region;
use gpupool_shm::wire::{Attach, Op, REPLY_LEN, Reply, Request, SECRET_LEN, Slot, SlotRing};
use gpupool_shm::{ShmError, channel};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Largest slot: the server's pooled staging buffers hold 4 MiB.
const MAX_SLOT_BYTES: usize = 4 << 20;

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
        })
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
