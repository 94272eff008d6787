//! Staging buffers for copies too large to travel inline in a batch.
//!
//! Uploads arrive as chunks on parallel bulk streams and are consumed by a
//! `MemcpyHtoD` on the command stream; downloads are filled by a `MemcpyDtoH`
//! and drained by chunk requests. The table is shared between the session's
//! worker and its bulk-stream tasks; every byte it holds counts against one
//! per-session bound, checked before anything is allocated, and against the
//! host's cap on the bytes all its sessions stage ([`host`]), reserved
//! before a chunk is kept or a download is read. An upload holds the chunks
//! received so far, not the size it announced: a 1-byte chunk that
//! announced 3 GiB once made the worker allocate and zero 3 GiB, and
//! nothing bounded the host's total (issue 20, finding 4).

pub mod host;

use crate::error::CallError;
use bytes::Bytes;
use gpupool_proto::pool::BufferPool;
use host::HostStaging;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::{Arc, LazyLock};

/// Size of the reused receive buffers: a client's default 4 MiB bulk chunk
/// and its request's header.
pub const BUFFER_BYTES: usize = (4 << 20) + (64 << 10);

/// Buffers kept for reuse in this process (~130 MiB at most): a bulk
/// chunk is received into one of them and staged as a slice of it, and the
/// buffer comes back once the copy to the device has consumed it.
const KEPT_BUFFERS: usize = 32;

static BUFFERS: LazyLock<Arc<BufferPool>> = LazyLock::new(|| BufferPool::new(BUFFER_BYTES, KEPT_BUFFERS));

/// This process's reused bulk buffers.
pub fn buffers() -> &'static Arc<BufferPool> {
    &BUFFERS
}

/// A complete staged upload: its id, its total size and its chunks by
/// offset.
pub type StagedUpload = (u64, u64, Vec<(u64, Bytes)>);

/// One session's staged transfers.
#[derive(Debug)]
pub struct Staging {
    limit: u64,
    max_transfers: usize,
    /// The host's cap, shared with every other session of the host.
    host: Arc<HostStaging>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    uploads: HashMap<u64, Upload>,
    downloads: HashMap<u64, Download>,
    bytes: u64,
    /// Bytes reserved from the host's cap for what the table holds; given
    /// back as transfers are consumed, and all of them when it drops.
    host_bytes: u64,
    next_download: u64,
}

#[derive(Debug)]
struct Upload {
    /// The size the first chunk announced.
    total: u64,
    /// Received chunks by offset, never overlapping: slices of the frames
    /// they arrived in, kept without a copy.
    chunks: BTreeMap<u64, Bytes>,
    received: u64,
}

#[derive(Debug)]
struct Download {
    /// The bytes in pieces of [`PIECE_BYTES`] (the last one shorter).
    pieces: Vec<Bytes>,
    total: u64,
    fetched: u64,
    /// Bytes reserved from the host's cap for it.
    host_bytes: u64,
}

/// What [`Staging::enter`] found for a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Stored: its bytes are held.
    Kept,
    /// Within bounds, to be stored (only checked).
    Fits,
    /// Empty, or held already: nothing to store.
    Nothing,
}

/// Size of a download's pieces: a client's default bulk chunk, so that a
/// chunk request is a slice of one piece.
pub const PIECE_BYTES: usize = 4 << 20;

/// Room reserved for a download before its bytes are read
/// ([`Staging::room`]): given back on drop unless the download is staged.
#[derive(Debug)]
pub struct Room<'a> {
    staging: &'a Staging,
    bytes: u64,
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        self.staging.host.release(self.bytes);
    }
}

impl Staging {
    /// A table holding at most `limit` bytes in at most `max_transfers`
    /// transfers, under no host cap (tests, tools).
    pub fn new(limit: u64, max_transfers: usize) -> Self {
        Self::with_host(limit, max_transfers, HostStaging::unbounded())
    }

    /// A table holding at most `limit` bytes in at most `max_transfers`
    /// transfers, whose bytes also count against the host's cap.
    pub fn with_host(limit: u64, max_transfers: usize, host: Arc<HostStaging>) -> Self {
        Self { limit, max_transfers, host, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores one chunk of upload `id`, whose total size is `total`. When
    /// the host's cap leaves no room, the calling thread waits for it a
    /// bounded time ([`HostStaging::reserve`]).
    pub fn put(&self, id: u64, total: u64, offset: u64, chunk: Bytes) -> Result<(), CallError> {
        let len = chunk.len() as u64;
        if !self.host.try_reserve(len) {
            // Refused by the session's own bounds at once, not after the
            // wait; a chunk held already needs no room.
            if self.enter(id, total, offset, &chunk, false)? == Entry::Nothing {
                return Ok(());
            }
            self.host.reserve(len)?;
        }
        self.keep_reserved(id, total, offset, chunk)
    }

    /// [`Staging::put`] for a task: a wait for the host's room sleeps on
    /// the runtime's timer.
    pub async fn put_async(&self, id: u64, total: u64, offset: u64, chunk: Bytes) -> Result<(), CallError> {
        let len = chunk.len() as u64;
        if !self.host.try_reserve(len) {
            if self.enter(id, total, offset, &chunk, false)? == Entry::Nothing {
                return Ok(());
            }
            self.host.reserve_async(len).await?;
        }
        self.keep_reserved(id, total, offset, chunk)
    }

    /// Stores a chunk whose bytes were reserved from the host's cap; gives
    /// them back when it is refused or already held.
    fn keep_reserved(&self, id: u64, total: u64, offset: u64, chunk: Bytes) -> Result<(), CallError> {
        let len = chunk.len() as u64;
        match self.enter(id, total, offset, &chunk, true) {
            Ok(Entry::Kept) => Ok(()),
            other => {
                self.host.release(len);
                other.map(drop)
            }
        }
    }

    /// Checks one chunk against the session's bounds and the upload's
    /// chunks; with `keep`, stores it.
    fn enter(&self, id: u64, total: u64, offset: u64, chunk: &Bytes, keep: bool) -> Result<Entry, CallError> {
        let len = chunk.len() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= total).ok_or_else(|| {
            CallError::invalid_value(format!("chunk [{offset}, +{len}) lies outside transfer of {total} bytes"))
        })?;
        let mut inner = self.lock();
        let inner = &mut *inner;
        if !inner.uploads.contains_key(&id) {
            if inner.uploads.len() + inner.downloads.len() >= self.max_transfers {
                return Err(CallError::out_of_memory("too many staged transfers in flight"));
            }
            if total > self.limit {
                return Err(CallError::out_of_memory(format!(
                    "staging {total} bytes would exceed the session's staging limit of {} bytes",
                    self.limit
                )));
            }
            if keep {
                inner.uploads.insert(id, Upload { total, chunks: BTreeMap::new(), received: 0 });
            }
        }
        if inner.bytes.saturating_add(len) > self.limit {
            return Err(CallError::out_of_memory(format!(
                "staging {len} more bytes would exceed the session's staging limit of {} bytes",
                self.limit
            )));
        }
        let Some(up) = inner.uploads.get_mut(&id) else { return Ok(Entry::Fits) };
        if up.total != total {
            return Err(CallError::invalid_value(format!(
                "transfer {id} was started with {} bytes, not {total}",
                up.total
            )));
        }
        // The same chunk again (a client repeating a put after its session
        // moved, the upload having moved with it) changes nothing.
        if len == 0 || up.chunks.get(&offset).is_some_and(|c| c == chunk) {
            return Ok(Entry::Nothing);
        }
        let overlaps_prev = up.chunks.range(..=offset).next_back().is_some_and(|(&o, c)| o + c.len() as u64 > offset);
        let overlaps_next = up.chunks.range(offset..).next().is_some_and(|(&o, _)| o < end);
        if overlaps_prev || overlaps_next {
            return Err(CallError::invalid_value(format!("chunk at {offset} overlaps one already received")));
        }
        if !keep {
            return Ok(Entry::Fits);
        }
        up.chunks.insert(offset, chunk.clone());
        up.received += len;
        inner.bytes += len;
        inner.host_bytes += len;
        Ok(Entry::Kept)
    }

    /// The complete uploads held, as `(id, total, chunks by offset)`: a
    /// migrating session's, which its target stages again under the same
    /// ids (a copy naming one may be in a batch its client sends again).
    /// Incomplete ones stay behind: their puts failed, and are repeated.
    pub fn complete_uploads(&self) -> Vec<StagedUpload> {
        let inner = self.lock();
        let complete = inner.uploads.iter().filter(|(_, up)| up.received == up.total);
        complete.map(|(&id, up)| (id, up.total, up.chunks.iter().map(|(&o, c)| (o, c.clone())).collect())).collect()
    }

    /// Takes complete upload `id` of `size` bytes as one buffer (module
    /// images, link inputs: consumers that need the bytes together).
    pub fn take_upload(&self, id: u64, size: u64) -> Result<Bytes, CallError> {
        let mut chunks = self.take_upload_chunks(id, size)?;
        if chunks.len() == 1 {
            return Ok(chunks.remove(0).1);
        }
        let mut data = Vec::new();
        data.try_reserve_exact(size as usize)
            .map_err(|_| CallError::out_of_memory("cannot allocate staging memory"))?;
        for (_, chunk) in chunks {
            data.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(data))
    }

    /// Takes complete upload `id` of `size` bytes as the chunks it arrived
    /// in, `(offset, bytes)` in order, tiling `[0, size)`: a copy to the
    /// device writes them where they go, without assembling them first.
    pub fn take_upload_chunks(&self, id: u64, size: u64) -> Result<Vec<(u64, Bytes)>, CallError> {
        let mut inner = self.lock();
        let up = inner.uploads.get(&id).ok_or_else(|| CallError::invalid_handle(format!("no staged upload {id}")))?;
        if up.total != size {
            return Err(CallError::invalid_value(format!(
                "staged upload {id} holds {} bytes, the copy names {size}",
                up.total
            )));
        }
        if up.received != size {
            return Err(CallError::invalid_value(format!(
                "staged upload {id} is incomplete: {} of {size} bytes",
                up.received
            )));
        }
        let up = inner.uploads.remove(&id).ok_or_else(|| CallError::invalid_handle("upload vanished"))?;
        inner.bytes -= size;
        inner.host_bytes -= size;
        drop(inner);
        // The chunks go to the device now and are dropped right after.
        self.host.release(size);
        // Complete and not overlapping: the chunks tile [0, size) in order.
        Ok(up.chunks.into_iter().collect())
    }

    /// Reserves room for a download of `size` bytes before it is read:
    /// within the session's bounds, and from the host's cap, waiting for
    /// it a bounded time (the calling thread blocks).
    pub fn room(&self, size: u64) -> Result<Room<'_>, CallError> {
        {
            let inner = self.lock();
            if inner.uploads.len() + inner.downloads.len() >= self.max_transfers {
                return Err(CallError::out_of_memory("too many staged transfers in flight"));
            }
            if inner.bytes.saturating_add(size) > self.limit {
                return Err(CallError::out_of_memory(format!(
                    "staging {size} bytes would exceed the session's staging limit of {} bytes",
                    self.limit
                )));
            }
        }
        self.host.reserve(size)?;
        Ok(Room { staging: self, bytes: size })
    }

    /// Stages a download in `room`, in pieces of [`PIECE_BYTES`] tiling it,
    /// and returns its id.
    pub fn add_download(&self, mut room: Room<'_>, pieces: Vec<Bytes>) -> u64 {
        let total = pieces.iter().map(|p| p.len() as u64).sum();
        let host_bytes = std::mem::take(&mut room.bytes);
        let mut inner = self.lock();
        inner.next_download += 1;
        let id = inner.next_download;
        inner.bytes += total;
        inner.host_bytes += host_bytes;
        inner.downloads.insert(id, Download { pieces, total, fetched: 0, host_bytes });
        id
    }

    /// Stages `data` as a download in `room` (sliced into pieces, not copied).
    pub fn add_download_bytes(&self, room: Room<'_>, data: Bytes) -> u64 {
        let pieces = (0..data.len()).step_by(PIECE_BYTES).map(|o| data.slice(o..(o + PIECE_BYTES).min(data.len())));
        self.add_download(room, pieces.collect())
    }

    /// Bytes `[offset, offset + size)` of download `id`, a slice of its
    /// piece where the range lies in one (a client's chunks do), else
    /// copied together; the download is freed once every byte has been
    /// fetched.
    pub fn get(&self, id: u64, offset: u64, size: u64) -> Result<Bytes, CallError> {
        let mut inner = self.lock();
        let down = inner
            .downloads
            .get_mut(&id)
            .ok_or_else(|| CallError::invalid_handle(format!("no staged download {id}")))?;
        let total = down.total;
        let end = offset.checked_add(size).filter(|&e| e <= total).ok_or_else(|| {
            CallError::invalid_value(format!("range [{offset}, +{size}) outside download of {total} bytes"))
        })?;
        let piece = PIECE_BYTES as u64;
        let out = if size == 0 {
            Bytes::new()
        } else if offset / piece == (end - 1) / piece {
            let at = (offset % piece) as usize;
            down.pieces[(offset / piece) as usize].slice(at..at + size as usize)
        } else {
            let mut out = Vec::new();
            out.try_reserve_exact(size as usize)
                .map_err(|_| CallError::out_of_memory("cannot allocate staging memory"))?;
            let mut at = offset;
            while at < end {
                let (i, from) = ((at / piece) as usize, (at % piece) as usize);
                let take = (piece - from as u64).min(end - at) as usize;
                out.extend_from_slice(&down.pieces[i][from..from + take]);
                at += take as u64;
            }
            Bytes::from(out)
        };
        down.fetched += size;
        if down.fetched >= total {
            let host_bytes = down.host_bytes;
            inner.downloads.remove(&id);
            inner.bytes -= total;
            inner.host_bytes -= host_bytes;
            drop(inner);
            self.host.release(host_bytes);
        }
        Ok(out)
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

impl Drop for Staging {
    /// The session ended: what it still held goes back to the host.
    fn drop(&mut self) {
        let held = self.lock().host_bytes;
        self.host.release(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_proto::cuda;

    #[test]
    fn upload_in_chunks_any_order() {
        let s = Staging::new(1 << 20, 8);
        s.put(1, 10, 5, Bytes::from_static(b"world")).expect("chunk");
        assert_eq!(s.take_upload(1, 10).expect_err("incomplete").code, cuda::INVALID_VALUE);
        s.put(1, 10, 0, Bytes::from_static(b"hello")).expect("chunk");
        assert_eq!(&s.take_upload(1, 10).expect("complete")[..], b"helloworld");
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn overlap_and_bounds_refused() {
        let s = Staging::new(1 << 20, 8);
        s.put(1, 10, 0, Bytes::from_static(b"hello")).expect("chunk");
        assert!(s.put(1, 10, 4, Bytes::from_static(b"xx")).is_err());
        assert!(s.put(1, 10, 8, Bytes::from_static(b"xyz")).is_err());
        assert!(s.put(1, 12, 5, Bytes::from_static(b"a")).is_err(), "total changed");
        assert!(s.put(2, u64::MAX, u64::MAX, Bytes::from_static(b"a")).is_err());
    }

    #[test]
    fn announced_size_is_not_allocated() {
        // Issue 20, finding 4: the first chunk's announcement fixes the
        // size, but only received bytes are held and counted.
        let s = Staging::new(4 << 30, 8);
        s.put(7, 3 << 30, (3 << 30) - 1, Bytes::from_static(b"z")).expect("one byte of 3 GiB");
        assert_eq!(s.bytes(), 1);
        assert!(s.take_upload(7, 3 << 30).is_err(), "incomplete");
        s.put(8, 4, 2, Bytes::from_static(b"cd")).expect("second half first");
        s.put(8, 4, 0, Bytes::from_static(b"ab")).expect("first half");
        assert_eq!(s.bytes(), 5);
        let chunks = s.take_upload_chunks(8, 4).expect("complete");
        assert_eq!(chunks, [(0, Bytes::from_static(b"ab")), (2, Bytes::from_static(b"cd"))], "in order, uncopied");
        assert_eq!(s.bytes(), 1);
    }

    #[test]
    fn limit_checked_before_allocation() {
        let s = Staging::new(100, 8);
        assert_eq!(s.put(1, 1 << 40, 0, Bytes::from_static(b"a")).expect_err("too big").code, cuda::OUT_OF_MEMORY);
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn download_ranges_across_pieces() {
        let s = Staging::new(3 * PIECE_BYTES as u64, 8);
        let data: Vec<u8> = (0..2 * PIECE_BYTES + 10).map(|i| (i % 251) as u8).collect();
        let pieces = data.chunks(PIECE_BYTES).map(Bytes::copy_from_slice).collect();
        let id = s.add_download(s.room(data.len() as u64).expect("room"), pieces);
        let p = PIECE_BYTES as u64;
        let across = s.get(id, p - 5, 10).expect("across two pieces");
        assert_eq!(&across[..], &data[PIECE_BYTES - 5..PIECE_BYTES + 5]);
        assert_eq!(&s.get(id, 0, p - 5).expect("get")[..], &data[..PIECE_BYTES - 5]);
        assert_eq!(&s.get(id, p + 5, p + 5).expect("get")[..], &data[PIECE_BYTES + 5..]);
        assert_eq!(s.bytes(), 0, "all fetched");
    }

    #[test]
    fn download_freed_after_last_byte() {
        let s = Staging::new(100, 8);
        let id = s.add_download_bytes(s.room(10).expect("room"), Bytes::from_static(b"0123456789"));
        assert_eq!(&s.get(id, 5, 5).expect("get")[..], b"56789");
        assert_eq!(s.bytes(), 10);
        assert_eq!(&s.get(id, 0, 5).expect("get")[..], b"01234");
        assert_eq!(s.bytes(), 0);
        assert!(s.get(id, 0, 1).is_err());
    }

    /// Issue 20, finding 4: sessions of one host stage at most the host's
    /// cap together; a put past it waits for room, then fails; what a
    /// session consumes or leaves behind when it ends goes back.
    #[test]
    fn the_host_cap_bounds_every_session_together() {
        let ledger = host::HostLedger::local(100, std::time::Duration::from_millis(30));
        let table = || Staging::with_host(1 << 20, 8, ledger.share(0).expect("slot"));
        let (a, b) = (table(), table());
        a.put(1, 60, 0, Bytes::from(vec![1; 60])).expect("fits");
        let e = b.put(1, 50, 0, Bytes::from(vec![2; 50])).expect_err("past the host's cap");
        assert_eq!(e.code, cuda::OUT_OF_MEMORY);
        assert!(e.message.contains("staging memory is full"), "{}", e.message);
        assert_eq!((ledger.used(), b.bytes()), (60, 0), "nothing of the refused chunk kept");
        // The same chunk again holds nothing more.
        a.put(1, 60, 0, Bytes::from(vec![1; 60])).expect("repeated");
        assert_eq!(ledger.used(), 60);
        // A session's own refusal comes at once, without the wait.
        let started = std::time::Instant::now();
        assert!(b.put(2, 1 << 21, 0, Bytes::from(vec![2; 50])).is_err(), "past the session's limit");
        assert!(started.elapsed() < std::time::Duration::from_millis(30));
        assert!(b.room(41).is_err(), "a download past the cap too");
        a.take_upload(1, 60).expect("consumed");
        assert_eq!(ledger.used(), 0);
        b.put(1, 50, 0, Bytes::from(vec![2; 50])).expect("room again");
        let room = a.room(40).expect("room");
        assert_eq!(ledger.used(), 90);
        drop(room);
        assert_eq!(ledger.used(), 50, "an unused room goes back");
        let id = a.add_download_bytes(a.room(30).expect("room"), Bytes::from(vec![3; 30]));
        assert_eq!(ledger.used(), 80);
        a.get(id, 0, 30).expect("fetched");
        assert_eq!(ledger.used(), 50, "fetched downloads go back");
        let id = a.add_download_bytes(a.room(30).expect("room"), Bytes::from(vec![3; 30]));
        a.get(id, 0, 10).expect("partly fetched");
        drop((a, b));
        assert_eq!(ledger.used(), 0, "ended sessions give back what they held");
    }

    #[tokio::test]
    async fn an_async_put_waits_for_room_freed_meanwhile() {
        let ledger = host::HostLedger::local(100, std::time::Duration::from_secs(5));
        let a = Arc::new(Staging::with_host(1 << 20, 8, ledger.share(0).expect("slot")));
        let b = Staging::with_host(1 << 20, 8, ledger.share(0).expect("slot"));
        a.put(1, 100, 0, Bytes::from(vec![1; 100])).expect("fits");
        let taker = a.clone();
        let freer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            taker.take_upload(1, 100).expect("consumed");
        });
        b.put_async(1, 10, 0, Bytes::from(vec![2; 10])).await.expect("room came");
        freer.await.expect("freer");
        assert_eq!(ledger.used(), 10);
    }
}
