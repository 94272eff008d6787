//! Content-addressed cache of module images, shared by all sessions.
//!
//! Clients send the SHA-256 of an image first and upload it only on a miss.
//! Images live in memory (bounded, oldest evicted first) and, when a
//! directory is configured, on disk under their hex digest so they survive a
//! restart and are shared by the worker processes of one server. The disk
//! is bounded too: beyond its limit the least recently used files go (a
//! file's modification time is bumped when it is read), so distinct images
//! from clients cannot fill it (issue 20, finding 5).

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A directory of module images that only this server and its workers use,
/// deleted with it. Under process isolation without `--image-cache`, each
/// worker process would otherwise start with an empty cache, and the second
/// program to use a library (cuBLAS: hundreds of images) would send every
/// image again (issue 17, "fast first call").
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates `gpupool-images-<pid>-<n>` under `parent`, readable by this
    /// user only (module images are tenants' code).
    pub fn create(parent: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        let pid = std::process::id();
        for n in 0..1000u32 {
            let path = parent.join(format!("gpupool-images-{pid}-{n}"));
            match builder.create(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "no free image directory name"))
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove the private image directory");
        }
    }
}

/// SHA-256 of an image.
pub type ImageKey = [u8; 32];

/// Hash of `image`.
pub fn key_of(image: &[u8]) -> ImageKey {
    Sha256::digest(image).into()
}

/// The shared image cache.
#[derive(Debug)]
pub struct ImageCache {
    store: Store,
    background: Background,
}

/// Where good images are kept: memory, and the directory when there is one.
#[derive(Debug, Clone)]
struct Store {
    memory: Arc<Memory>,
    dir: Option<PathBuf>,
    disk_max_bytes: u64,
}

/// The images in memory, at most `max_bytes` of them.
#[derive(Debug)]
struct Memory {
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    images: HashMap<ImageKey, Arc<[u8]>>,
    order: VecDeque<ImageKey>,
    bytes: u64,
}

/// Images queued for the background thread beyond this many bytes are
/// handled on the caller's thread instead: the queue holds them in memory
/// meanwhile.
const MAX_QUEUED_BYTES: u64 = 512 << 20;

/// Work for the background thread.
enum Task {
    /// Write an image known to be good to the directory.
    Write { key: ImageKey, image: Arc<[u8]> },
    /// Check an image a client sent against its hash; keep it if good.
    Check { key: ImageKey, image: Bytes },
}

/// Images smaller than this are checked against their hash on the
/// caller's thread (a wrong one refused at once, tens of microseconds);
/// larger ones on the background thread.
const CHECK_INLINE_BELOW: usize = 1 << 20;

impl Task {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Write { image, .. } => image,
            Self::Check { image, .. } => image,
        }
    }

    fn len(&self) -> u64 {
        self.bytes().len() as u64
    }
}

/// Checks and writes images on a thread of its own, so that a session's
/// first use of a module waits for its load only, not for hashing,
/// copying or the file system (issue 17: cuBLAS's first use sent 256 MB of
/// images; hashing and caching them took 200-270 ms of the session's thread
/// on an H100). The thread starts with the first task;
/// [`ImageCache::flushed`] waits until everything queued is done (a worker
/// does before it exits, so the next process finds the images on disk).
#[derive(Debug)]
struct Background {
    /// At most this many bytes queued ([`MAX_QUEUED_BYTES`]).
    max_queued: u64,
    queue: Mutex<Option<std::sync::mpsc::Sender<Task>>>,
    pending: Arc<Pending>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Bytes queued and not yet handled and their count, with a wake-up for
/// whoever waits for the count to reach zero.
#[derive(Debug, Default)]
struct Pending {
    queued: Mutex<(u64, usize)>,
    done: tokio::sync::Notify,
}

impl Pending {
    /// Counts a task of `len` bytes as queued, unless the queued bytes
    /// would pass `max`; whether it did.
    fn try_add(&self, len: u64, max: u64) -> bool {
        let mut q = lock(&self.queued);
        if q.0 + len > max {
            return false;
        }
        q.0 += len;
        q.1 += 1;
        true
    }

    fn remove(&self, len: u64) {
        let mut q = lock(&self.queued);
        q.0 -= len;
        q.1 -= 1;
        if q.1 == 0 {
            self.done.notify_waiters();
        }
    }

    fn count(&self) -> usize {
        lock(&self.queued).1
    }
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, key) = match self {
            Self::Write { key, .. } => ("write", key),
            Self::Check { key, .. } => ("check", key),
        };
        f.debug_struct("Task").field("what", &what).field("key", &hex::encode(key)).field("bytes", &self.len()).finish()
    }
}

impl Background {
    /// Queues `task` for the thread (started with `store` if it is not
    /// running), or gives it back when the queue is full or the thread
    /// cannot start: the caller does it itself.
    fn queue(&self, task: Task, store: &Store) -> Result<(), Task> {
        let len = task.len();
        if !self.pending.try_add(len, self.max_queued) {
            return Err(task);
        }
        let mut queue = lock(&self.queue);
        if queue.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<Task>();
            let (pending, store) = (self.pending.clone(), store.clone());
            let spawned = std::thread::Builder::new().name("gpupool-images".into()).spawn(move || {
                for task in rx {
                    let len = task.len();
                    store.run(task);
                    pending.remove(len);
                }
            });
            match spawned {
                Ok(handle) => {
                    *queue = Some(tx);
                    *lock(&self.thread) = Some(handle);
                }
                Err(e) => tracing::warn!(error = %e, "cannot start the image thread; images are handled inline"),
            }
        }
        let sent = match queue.as_ref() {
            Some(tx) => tx.send(task).map_err(|e| e.0),
            None => Err(task),
        };
        if sent.is_err() {
            self.pending.remove(len);
        }
        sent
    }

    /// Waits until every queued task is done, up to `bound`; whether they
    /// all were.
    async fn flushed(&self, bound: std::time::Duration) -> bool {
        let all_done = async {
            loop {
                let done = self.pending.done.notified();
                tokio::pin!(done);
                // Registered before the count is read: a task finishing in
                // between still wakes this wait.
                done.as_mut().enable();
                if self.pending.count() == 0 {
                    return;
                }
                done.await;
            }
        };
        tokio::time::timeout(bound, all_done).await.is_ok()
    }
}

impl Default for Background {
    fn default() -> Self {
        Self {
            max_queued: MAX_QUEUED_BYTES,
            queue: Mutex::default(),
            pending: Arc::default(),
            thread: Mutex::default(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // The thread does what is queued, then ends with the channel.
        lock(&self.queue).take();
        if let Some(handle) = lock(&self.thread).take() {
            let _ = handle.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    fn run(&self, task: Task) {
        match task {
            Task::Write { key, image } => self.write(&key, &image),
            Task::Check { key, image } => {
                if key_of(&image) != key {
                    tracing::warn!(bytes = image.len(), "a module image does not match its SHA-256; not cached");
                    return;
                }
                let image: Arc<[u8]> = Arc::from(&image[..]);
                self.memory.insert(key, image.clone());
                self.write(&key, &image);
            }
        }
    }

    /// Writes `image` under its digest (through a temporary name, so that
    /// no process reads half a file) and trims the directory; nothing
    /// without a directory or beyond its limit.
    fn write(&self, key: &ImageKey, image: &[u8]) {
        let Some(dir) = &self.dir else { return };
        if image.len() as u64 > self.disk_max_bytes {
            return;
        }
        let path = dir.join(hex::encode(key));
        let tmp = dir.join(format!(".{}.tmp", hex::encode(key)));
        match std::fs::write(&tmp, image).and_then(|()| std::fs::rename(&tmp, &path)) {
            Ok(()) => trim_dir(dir, self.disk_max_bytes, &path),
            Err(e) => tracing::warn!(error = %e, "cannot persist module image"),
        }
    }
}

impl Memory {
    fn get(&self, key: &ImageKey) -> Option<Arc<[u8]>> {
        lock(&self.inner).images.get(key).cloned()
    }

    fn insert(&self, key: ImageKey, image: Arc<[u8]>) {
        let mut inner = lock(&self.inner);
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

impl ImageCache {
    /// A cache of at most `max_bytes` in memory, persisted to `dir` if given.
    /// The built-in module is always present.
    pub fn new(dir: Option<PathBuf>, max_bytes: u64) -> Self {
        let memory = Arc::new(Memory { max_bytes, inner: Mutex::default() });
        memory.insert(key_of(gpupool_proto::BUILTIN_MODULE), Arc::from(gpupool_proto::BUILTIN_MODULE));
        Self { store: Store { memory, dir, disk_max_bytes: u64::MAX }, background: Background::default() }
    }

    /// Keeps at most `bytes` of images on disk.
    pub fn with_disk_limit(mut self, bytes: u64) -> Self {
        self.store.disk_max_bytes = bytes;
        self
    }

    /// Waits (up to `bound`) until every image given so far is checked and
    /// on disk; whether they all are.
    pub async fn flushed(&self, bound: std::time::Duration) -> bool {
        self.background.flushed(bound).await
    }

    /// Images given and not yet checked or written.
    pub fn pending(&self) -> usize {
        self.background.pending.count()
    }

    /// The image with hash `key`, from memory or disk.
    pub fn get(&self, key: &ImageKey) -> Option<Arc<[u8]>> {
        self.read(key, true)
    }

    /// Up to `budget` bytes of the images on disk, most recently used
    /// first: what a waiting worker preloads.
    pub fn recent_on_disk(&self, budget: u64) -> Vec<ImageKey> {
        let Some(dir) = &self.store.dir else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut files: Vec<(std::time::SystemTime, u64, ImageKey)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let mut key = [0u8; 32];
                hex::decode_to_slice(e.file_name().to_str()?, &mut key).ok()?;
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), key))
            })
            .collect();
        files.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut total = 0u64;
        files
            .into_iter()
            .take_while(|(_, len, _)| {
                total = total.saturating_add(*len);
                total <= budget
            })
            .map(|(_, _, key)| key)
            .collect()
    }

    /// The image with hash `key` for preloading: like [`Self::get`], but
    /// its use is not recorded (a preload is not a use, and would reorder
    /// what the next worker preloads).
    pub fn get_for_preload(&self, key: &ImageKey) -> Option<Arc<[u8]>> {
        self.read(key, false)
    }

    fn read(&self, key: &ImageKey, used: bool) -> Option<Arc<[u8]>> {
        let path = self.store.dir.as_ref().map(|d| d.join(hex::encode(key)));
        // Recently used: trimmed last, preloaded first. Also when memory
        // answers: the disk's order is what other processes see.
        let touch = |path: &std::path::Path| {
            if used && let Ok(f) = std::fs::File::options().write(true).open(path) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
        };
        if let Some(img) = self.store.memory.get(key) {
            if let Some(path) = &path {
                touch(path);
            }
            return Some(img);
        }
        let path = path?;
        let bytes = std::fs::read(&path).ok()?;
        // A corrupt file is ignored, not served.
        if key_of(&bytes) != *key {
            return None;
        }
        touch(&path);
        let img: Arc<[u8]> = Arc::from(bytes);
        self.store.memory.insert(*key, img.clone());
        Some(img)
    }

    /// Adds an image whose hash the caller has verified: in memory at
    /// once, on disk (when the cache has a directory) by the background
    /// thread.
    pub fn insert(&self, key: ImageKey, image: Arc<[u8]>) {
        self.store.memory.insert(key, image.clone());
        if self.store.dir.is_some()
            && let Err(task) = self.background.queue(Task::Write { key, image }, &self.store)
        {
            self.store.run(task);
        }
    }

    /// Adds an image a client sent as having hash `key`, which the session
    /// loads as sent meanwhile. A large image's hash is checked by the
    /// background thread, which keeps the image only if it matches, so no
    /// other session is ever served an image under another's hash; a small
    /// one (or any when the queue is full) is checked here: `false` when
    /// it does not match.
    pub fn insert_unchecked(&self, key: ImageKey, image: Bytes) -> bool {
        if image.len() < CHECK_INLINE_BELOW {
            return self.check_and_insert(key, &image);
        }
        match self.background.queue(Task::Check { key, image }, &self.store) {
            Ok(()) => true,
            Err(task) => self.check_and_insert(key, task.bytes()),
        }
    }

    fn check_and_insert(&self, key: ImageKey, image: &[u8]) -> bool {
        if key_of(image) != key {
            return false;
        }
        self.insert(key, Arc::from(image));
        true
    }
}

/// Deletes the least recently modified images in `dir` until they take at
/// most `max_bytes`; `keep` (the one just written) stays.
fn trim_dir(dir: &std::path::Path, max_bytes: u64, keep: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    if total <= max_bytes {
        return;
    }
    files.sort();
    for (_, len, path) in files {
        if total <= max_bytes {
            break;
        }
        if path == keep {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
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

    #[tokio::test]
    async fn evicts_oldest_and_reloads_from_disk() {
        let dir = std::env::temp_dir().join(format!("gpupool-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let c = ImageCache::new(Some(dir.clone()), 100);
        let a: Arc<[u8]> = Arc::from(vec![1u8; 80]);
        let b: Arc<[u8]> = Arc::from(vec![2u8; 80]);
        c.insert(key_of(&a), a.clone());
        c.insert(key_of(&b), b.clone());
        assert!(c.flushed(std::time::Duration::from_secs(10)).await, "written");
        assert_eq!(lock(&c.store.memory.inner).images.len(), 2, "builtin + newest");
        assert_eq!(c.get(&key_of(&a)).as_deref(), Some(&a[..]), "reloaded from disk");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[tokio::test]
    async fn recent_on_disk_lists_the_newest_within_the_budget_and_preload_reads_do_not_count_as_use() {
        let dir = PrivateDir::create(&std::env::temp_dir()).expect("dir");
        let c = ImageCache::new(Some(dir.path().to_path_buf()), 1 << 20);
        let images: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
        for img in &images {
            c.insert(key_of(img), Arc::from(img.as_slice()));
            assert!(c.flushed(std::time::Duration::from_secs(10)).await, "written");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::write(dir.path().join("not-an-image"), b"x").unwrap();
        let keys = |budget| c.recent_on_disk(budget);
        assert_eq!(keys(2500), vec![key_of(&images[2]), key_of(&images[1])]);
        assert_eq!(keys(1 << 20).len(), 3);
        assert!(keys(999).is_empty());
        let fresh = ImageCache::new(Some(dir.path().to_path_buf()), 1 << 20);
        assert_eq!(fresh.get_for_preload(&key_of(&images[0])).as_deref(), Some(&images[0][..]));
        assert_eq!(fresh.recent_on_disk(2500), vec![key_of(&images[2]), key_of(&images[1])], "order kept");
        fresh.get(&key_of(&images[0])).expect("a use");
        assert_eq!(fresh.recent_on_disk(1000), vec![key_of(&images[0])], "a use moves it first");
    }

    #[test]
    fn private_dir_is_owner_only_and_goes_with_its_guard() {
        use std::os::unix::fs::PermissionsExt;
        let parent = std::env::temp_dir();
        let a = PrivateDir::create(&parent).expect("first");
        let b = PrivateDir::create(&parent).expect("second, another name");
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let c = ImageCache::new(Some(a.path().to_path_buf()), 1 << 20);
        let img = vec![3u8; 100];
        c.insert(key_of(&img), Arc::from(img.as_slice()));
        drop(c);
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "removed with its images");
        drop(b);
    }

    /// The disk write is the writer thread's: an image is there once the
    /// cache is flushed, or dropped (the thread writes what is queued).
    #[tokio::test]
    async fn images_reach_the_disk_by_a_flush_or_the_cache_s_end() {
        let dir = PrivateDir::create(&std::env::temp_dir()).expect("dir");
        let images: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 100_000]).collect();
        let on_disk = |img: &[u8]| dir.path().join(hex::encode(key_of(img))).exists();
        let c = ImageCache::new(Some(dir.path().to_path_buf()), 1 << 30);
        for img in &images[..10] {
            c.insert(key_of(img), Arc::from(img.as_slice()));
        }
        assert!(c.flushed(std::time::Duration::from_secs(10)).await, "written");
        assert_eq!(c.pending(), 0);
        assert!(images[..10].iter().all(|i| on_disk(i)));
        for img in &images[10..] {
            c.insert(key_of(img), Arc::from(img.as_slice()));
        }
        drop(c);
        assert!(images.iter().all(|i| on_disk(i)), "the rest written before the cache went");
        let fresh = ImageCache::new(Some(dir.path().to_path_buf()), 1 << 30);
        assert_eq!(fresh.get(&key_of(&images[19])).as_deref(), Some(&images[19][..]));
        assert!(fresh.flushed(std::time::Duration::ZERO).await, "nothing queued");
    }

    /// An image a client sent is kept only when it matches the hash it was
    /// sent under: never served to another session under a foreign hash,
    /// from memory or disk.
    #[tokio::test]
    async fn an_image_sent_under_a_wrong_hash_is_never_cached() {
        let dir = PrivateDir::create(&std::env::temp_dir()).expect("dir");
        let c = ImageCache::new(Some(dir.path().to_path_buf()), 1 << 30);
        let (good, bad) = (vec![1u8; CHECK_INLINE_BELOW], vec![2u8; CHECK_INLINE_BELOW]);
        assert!(c.insert_unchecked(key_of(&good), Bytes::from(good.clone())), "queued");
        assert!(c.insert_unchecked(key_of(&good), Bytes::from(bad.clone())), "queued: checked later");
        let lied = key_of(b"another image");
        assert!(c.insert_unchecked(lied, Bytes::from(bad.clone())), "queued: checked later");
        // A small image is checked at once.
        assert!(!c.insert_unchecked(lied, Bytes::from_static(b"abc")), "refused at once");
        assert!(c.insert_unchecked(key_of(b"abc"), Bytes::from_static(b"abc")));
        assert!(c.get(&key_of(b"abc")).is_some(), "in memory at once");
        assert!(c.flushed(std::time::Duration::from_secs(10)).await, "checked");
        assert_eq!(c.get(&key_of(&good)).as_deref(), Some(&good[..]), "the matching image, not the later one");
        assert!(c.get(&lied).is_none(), "not in memory");
        assert!(!dir.path().join(hex::encode(lied)).exists(), "not on disk");
        let fresh = ImageCache::new(Some(dir.path().to_path_buf()), 1 << 30);
        assert_eq!(fresh.get(&key_of(&good)).as_deref(), Some(&good[..]), "on disk for the next process");
        // With the queue full the check is the caller's, and says so.
        let mut c = ImageCache::new(None, 1 << 30);
        c.background.max_queued = CHECK_INLINE_BELOW as u64;
        let big = Bytes::from(vec![3u8; CHECK_INLINE_BELOW + 1]);
        assert!(!c.insert_unchecked(lied, big.clone()), "checked inline: no match");
        assert!(c.insert_unchecked(key_of(&big), big), "checked inline: a match");
    }

    /// Issue 20, finding 5: 4 MB of distinct images became 1 GiB on disk.
    #[tokio::test]
    async fn disk_keeps_within_its_limit_dropping_the_least_recently_used() {
        let dir = std::env::temp_dir().join(format!("gpupool-images-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let c = ImageCache::new(Some(dir.clone()), 1 << 20).with_disk_limit(3000);
        let images: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000]).collect();
        for (i, img) in images.iter().enumerate() {
            c.insert(key_of(img), Arc::from(img.as_slice()));
            assert!(c.flushed(std::time::Duration::from_secs(10)).await, "written");
            if i == 2 {
                // The first one is read again: recently used, kept.
                std::thread::sleep(std::time::Duration::from_millis(20));
                let first = dir.join(hex::encode(key_of(&images[0])));
                std::fs::File::options()
                    .write(true)
                    .open(first)
                    .unwrap()
                    .set_modified(std::time::SystemTime::now())
                    .unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let on_disk: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(on_disk <= 3000, "{on_disk} bytes on disk");
        let present = |i: usize| dir.join(hex::encode(key_of(&images[i]))).exists();
        assert!(present(4), "the newest stays");
        assert!(present(0), "the recently read one stays");
        assert!(!present(1) && !present(2), "the least recently used went");
        assert!(present(3));
        let big = vec![9u8; 4000];
        c.insert(key_of(&big), Arc::from(big.as_slice()));
        assert!(c.flushed(std::time::Duration::from_secs(10)).await, "nothing queued");
        assert!(!dir.join(hex::encode(key_of(&big))).exists(), "larger than the whole disk budget: memory only");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
