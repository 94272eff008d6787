//! Staging buffers for copies too large to travel inline in a batch.
//!
//! Uploads arrive as chunks on parallel bulk streams and are consumed by a
//! `MemcpyHtoD` on the command stream; downloads are filled by a `MemcpyDtoH`
//! and drained by chunk requests. The table is shared between the session's
//! worker and its bulk-stream tasks; every byte it holds counts against one
//! per-session bound, checked before anything is allocated. An upload holds
//! the chunks received so far, not the size it announced: a 1-byte chunk
//! that announced 3 GiB once made the worker allocate and zero 3 GiB
//! (issue 20, finding 4).

use crate::error::CallError;
use bytes::Bytes;
use gpupool_proto::pool::BufferPool;
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
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    uploads: HashMap<u64, Upload>,
    downloads: HashMap<u64, Download>,
    bytes: u64,
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
}

/// Size of a download's pieces: a client's default bulk chunk, so that a
/// chunk request is a slice of one piece.
pub const PIECE_BYTES: usize = 4 << 20;

impl Staging {
    /// A table holding at most `limit` bytes in at most `max_transfers` transfers.
    pub fn new(limit: u64, max_transfers: usize) -> Self {
        Self { limit, max_transfers, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores one chunk of upload `id`, whose total size is `total`.
    pub fn put(&self, id: u64, total: u64, offset: u64, chunk: Bytes) -> Result<(), CallError> {
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
            inner.uploads.insert(id, Upload { total, chunks: BTreeMap::new(), received: 0 });
        }
        if inner.bytes.saturating_add(len) > self.limit {
            return Err(CallError::out_of_memory(format!(
                "staging {len} more bytes would exceed the session's staging limit of {} bytes",
                self.limit
            )));
        }
        let up = inner.uploads.get_mut(&id).ok_or_else(|| CallError::invalid_handle("upload vanished"))?;
        if up.total != total {
            return Err(CallError::invalid_value(format!(
                "transfer {id} was started with {} bytes, not {total}",
                up.total
            )));
        }
        // The same chunk again (a client repeating a put after its session
        // moved, the upload having moved with it) changes nothing.
        if len > 0 && up.chunks.get(&offset).is_some_and(|c| *c == chunk) {
            return Ok(());
        }
        let overlaps_prev = up.chunks.range(..=offset).next_back().is_some_and(|(&o, c)| o + c.len() as u64 > offset);
        let overlaps_next = up.chunks.range(offset..).next().is_some_and(|(&o, _)| o < end);
        if len > 0 && (overlaps_prev || overlaps_next) {
            return Err(CallError::invalid_value(format!("chunk at {offset} overlaps one already received")));
        }
        if len > 0 {
            up.chunks.insert(offset, chunk);
            up.received += len;
            inner.bytes += len;
        }
        Ok(())
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
        // Complete and not overlapping: the chunks tile [0, size) in order.
        Ok(up.chunks.into_iter().collect())
    }

    /// Reserves room for a download of `size` bytes before it is read.
    pub fn check_room(&self, size: u64) -> Result<(), CallError> {
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
        Ok(())
    }

    /// Stages a download, in pieces of [`PIECE_BYTES`] tiling it, and
    /// returns its id.
    pub fn add_download(&self, pieces: Vec<Bytes>) -> u64 {
        let total = pieces.iter().map(|p| p.len() as u64).sum();
        let mut inner = self.lock();
        inner.next_download += 1;
        let id = inner.next_download;
        inner.bytes += total;
        inner.downloads.insert(id, Download { pieces, total, fetched: 0 });
        id
    }

    /// Stages `data` as a download (sliced into pieces, not copied).
    pub fn add_download_bytes(&self, data: Bytes) -> u64 {
        let pieces = (0..data.len()).step_by(PIECE_BYTES).map(|o| data.slice(o..(o + PIECE_BYTES).min(data.len())));
        self.add_download(pieces.collect())
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
            inner.downloads.remove(&id);
            inner.bytes -= total;
        }
        Ok(out)
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
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
        let id = s.add_download(pieces);
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
        let id = s.add_download_bytes(Bytes::from_static(b"0123456789"));
        assert_eq!(&s.get(id, 5, 5).expect("get")[..], b"56789");
        assert_eq!(s.bytes(), 10);
        assert_eq!(&s.get(id, 0, 5).expect("get")[..], b"01234");
        assert_eq!(s.bytes(), 0);
        assert!(s.get(id, 0, 1).is_err());
    }
}
