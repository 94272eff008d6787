//! Content-addressed cache of module images, shared by all sessions.
//!
//! Clients send the SHA-256 of an image first and upload it only on a miss.
//! Images live in memory (bounded, oldest evicted first) and, when a
//! directory is configured, on disk under their hex digest so they survive a
//! restart.

use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// SHA-256 of an image.
pub type ImageKey = [u8; 32];

/// Hash of `image`.
pub fn key_of(image: &[u8]) -> ImageKey {
    Sha256::digest(image).into()
}

/// The shared image cache.
#[derive(Debug)]
pub struct ImageCache {
    dir: Option<PathBuf>,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    images: HashMap<ImageKey, Arc<[u8]>>,
    order: VecDeque<ImageKey>,
    bytes: u64,
}

impl ImageCache {
    /// A cache of at most `max_bytes` in memory, persisted to `dir` if given.
    /// The built-in module is always present.
    pub fn new(dir: Option<PathBuf>, max_bytes: u64) -> Self {
        let cache = Self { dir, max_bytes, inner: Mutex::default() };
        cache.insert_memory(key_of(gpupool_proto::BUILTIN_MODULE), Arc::from(gpupool_proto::BUILTIN_MODULE));
        cache
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image with hash `key`, from memory or disk.
    pub fn get(&self, key: &ImageKey) -> Option<Arc<[u8]>> {
        if let Some(img) = self.lock().images.get(key) {
            return Some(img.clone());
        }
        let path = self.dir.as_ref()?.join(hex::encode(key));
        let bytes = std::fs::read(path).ok()?;
        // A corrupt file is ignored, not served.
        if key_of(&bytes) != *key {
            return None;
        }
        let img: Arc<[u8]> = Arc::from(bytes);
        self.insert_memory(*key, img.clone());
        Some(img)
    }

    /// Adds an image whose hash the caller has verified.
    pub fn insert(&self, key: ImageKey, image: Arc<[u8]>) {
        if let Some(dir) = &self.dir {
            let path = dir.join(hex::encode(key));
            let tmp = dir.join(format!(".{}.tmp", hex::encode(key)));
            if let Err(e) = std::fs::write(&tmp, &image).and_then(|()| std::fs::rename(&tmp, &path)) {
                tracing::warn!(error = %e, "cannot persist module image");
            }
        }
        self.insert_memory(key, image);
    }

    fn insert_memory(&self, key: ImageKey, image: Arc<[u8]>) {
        let mut inner = self.lock();
        if inner.images.contains_key(&key) {
            return;
        }
        inner.bytes += image.len() as u64;
        inner.images.insert(key, image);
        inner.order.push_back(key);
        let builtin = key_of(gpupool_proto::BUILTIN_MODULE);
        // Evict oldest first; the built-in image and the newest one stay.
        let mut kept = VecDeque::new();
        while inner.bytes > self.max_bytes {
            let Some(old) = inner.order.pop_front() else { break };
            if old == builtin || old == key {
                kept.push_back(old);
                continue;
            }
            if let Some(img) = inner.images.remove(&old) {
                inner.bytes -= img.len() as u64;
            }
        }
        while let Some(k) = kept.pop_back() {
            inner.order.push_front(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_always_present() {
        let c = ImageCache::new(None, 0);
        assert!(c.get(&key_of(gpupool_proto::BUILTIN_MODULE)).is_some());
    }

    #[test]
    fn evicts_oldest_and_reloads_from_disk() {
        let dir = std::env::temp_dir().join(format!("gpupool-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let c = ImageCache::new(Some(dir.clone()), 100);
        let a: Arc<[u8]> = Arc::from(vec![1u8; 80]);
        let b: Arc<[u8]> = Arc::from(vec![2u8; 80]);
        c.insert(key_of(&a), a.clone());
        c.insert(key_of(&b), b.clone());
        assert_eq!(c.lock().images.len(), 2, "builtin + newest");
        assert_eq!(c.get(&key_of(&a)).as_deref(), Some(&a[..]), "reloaded from disk");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
