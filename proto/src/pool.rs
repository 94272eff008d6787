//! Reused buffers for bulk copies.
//!
//! A copy of a few hundred MiB through freshly allocated buffers spends as
//! much time faulting in and zeroing their pages as moving the bytes
//! (`perf` on the build machine: `clear_page_erms` and `exc_page_fault`
//! ahead of the copies themselves). A [`BufferPool`] keeps buffers of one
//! size that are already backed by memory and hands them out again; a
//! [`PooledBuf`] turned into [`Bytes`] goes back to the pool when the last
//! slice of it is dropped, wherever that happens (a QUIC send buffer, a
//! staged chunk). The pool keeps at most `max_free` buffers; more are freed.

use bytes::Bytes;
use std::sync::{Arc, Mutex, Weak};

/// Buffers of `buffer_bytes` each, at most `max_free` of them kept.
#[derive(Debug)]
pub struct BufferPool {
    buffer_bytes: usize,
    max_free: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A pool of `buffer_bytes` buffers keeping at most `max_free`.
    pub fn new(buffer_bytes: usize, max_free: usize) -> Arc<Self> {
        Arc::new(Self { buffer_bytes, max_free, free: Mutex::new(Vec::new()) })
    }

    /// Size of each buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// Buffers kept for reuse now.
    pub fn free_buffers(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer for up to `len` bytes: a reused one when `len` fits
    /// the pool's size, else (larger, or under a quarter of it) one of its
    /// own, not kept afterwards. `None` when the memory cannot be had.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<PooledBuf> {
        if len > self.buffer_bytes || len < self.buffer_bytes / 4 {
            let mut data = Vec::new();
            data.try_reserve_exact(len).ok()?;
            return Some(PooledBuf { data, pool: Weak::new() });
        }
        let data = match self.lock().pop() {
            Some(mut data) => {
                data.clear();
                data
            }
            None => {
                let mut data = Vec::new();
                data.try_reserve_exact(self.buffer_bytes).ok()?;
                data
            }
        };
        Some(PooledBuf { data, pool: Arc::downgrade(self) })
    }

    fn give_back(&self, data: Vec<u8>) {
        if data.capacity() != self.buffer_bytes {
            return;
        }
        let mut free = self.lock();
        if free.len() < self.max_free {
            free.push(data);
        }
    }
}

/// A buffer from a [`BufferPool`] (or one of its own when the request did
/// not fit), returned to the pool when dropped. Its bytes are only those
/// written into it since it was taken.
#[derive(Debug)]
pub struct PooledBuf {
    data: Vec<u8>,
    pool: Weak<BufferPool>,
}

impl PooledBuf {
    /// Appends `bytes`; beyond the buffer's capacity it grows (and is then
    /// not kept by the pool).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
    }

    /// The buffer itself, for a writer that appends in place (such as a
    /// copy out of a shared-memory region, without zeroing first).
    pub fn as_vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// `len` writable bytes (zeroed, the pages already backed when reused),
    /// for a reader that fills a slice, such as a device-to-host copy.
    pub fn filled(&mut self, len: usize) -> &mut [u8] {
        self.data.clear();
        self.data.resize(len, 0);
        &mut self.data
    }

    /// The bytes as [`Bytes`]; the buffer returns to the pool when the last
    /// slice of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(std::mem::take(&mut self.data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_slice_drops() {
        let pool = BufferPool::new(16, 2);
        let mut buf = pool.take(10).expect("memory");
        assert!(pool.take(3).is_some(), "small ones are not taken from the pool");
        buf.extend_from_slice(b"0123456789");
        let bytes = buf.freeze();
        let tail = bytes.slice(5..);
        drop(bytes);
        assert_eq!(pool.free_buffers(), 0, "a slice still holds it");
        assert_eq!(&tail[..], b"56789");
        drop(tail);
        assert_eq!(pool.free_buffers(), 1);
        let again = pool.take(12).expect("memory");
        assert!(again.is_empty(), "a reused buffer shows none of its old bytes");
        assert_eq!(pool.free_buffers(), 0);
    }

    #[test]
    fn kept_buffers_are_bounded_and_oversized_ones_not_kept() {
        let pool = BufferPool::new(8, 1);
        let (a, b) = (pool.take(8).expect("memory"), pool.take(8).expect("memory"));
        drop((a, b));
        assert_eq!(pool.free_buffers(), 1, "at most max_free kept");
        let mut big = pool.take(8).expect("memory");
        big.extend_from_slice(&[7; 20]);
        drop(big);
        drop(pool.take(100).expect("memory"));
        assert_eq!(pool.free_buffers(), 0, "grown or oversized buffers are freed");
        let mut buf = pool.take(8).expect("memory");
        assert_eq!(buf.filled(4), [0; 4]);
        assert_eq!(buf.len(), 4);
    }
}
