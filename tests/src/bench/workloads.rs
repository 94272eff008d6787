//! The measured loops, written once over [`Gpu`] so that native and remote
//! run exactly the same sequence of calls.

use super::stats::{Samples, gib_per_s};
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

/// What the benchmark needs of a GPU, native or remote. Every call uses the
/// default (legacy) stream, as the server does for stream 0.
pub(crate) trait Gpu {
    /// A device allocation, freed on drop.
    type Buffer;

    /// `native` or `remote`, for messages.
    fn label(&self) -> &'static str;
    /// Queues one launch of the built-in `empty` kernel (1 block of 1 thread).
    fn launch_empty(&self) -> Result<()>;
    /// Waits for everything queued on the default stream.
    fn synchronize(&self) -> Result<()>;
    fn alloc(&self, bytes: usize) -> Result<Self::Buffer>;
    /// Copies `src` to the device; may return before the copy completes.
    fn htod(&self, dst: &Self::Buffer, src: &[u8]) -> Result<()>;
    /// Copies device memory into `dst`; returns when `dst` holds the data.
    fn dtoh(&self, dst: &mut [u8], src: &Self::Buffer) -> Result<()>;
    /// Pinned host memory (natively `cuMemHostAlloc`; remotely in a host
    /// region shared with the server), freed on drop.
    type Pinned;
    fn alloc_pinned(&self, bytes: usize) -> Result<Self::Pinned>;
    fn write_pinned(&self, dst: &Self::Pinned, data: &[u8]) -> Result<()>;
    fn read_pinned(&self, src: &Self::Pinned, out: &mut [u8]) -> Result<()>;
    /// Queues a copy of `len` bytes from pinned memory on the default
    /// stream (`cuMemcpyHtoDAsync`); done after a synchronize.
    fn htod_pinned(&self, dst: &Self::Buffer, src: &Self::Pinned, len: usize) -> Result<()>;
    /// Queues a copy into pinned memory (`cuMemcpyDtoHAsync`).
    fn dtoh_pinned(&self, dst: &Self::Pinned, src: &Self::Buffer, len: usize) -> Result<()>;
}

/// Latencies of `empty` launch + synchronize, after `warmup` untimed ones.
pub(crate) fn sync_round_trips<G: Gpu>(gpu: &G, warmup: usize, iterations: usize) -> Result<Samples> {
    for _ in 0..warmup {
        gpu.launch_empty()?;
        gpu.synchronize()?;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        gpu.launch_empty()?;
        gpu.synchronize()?;
        samples.push(start.elapsed());
    }
    Ok(Samples::new(samples))
}

/// Time of `launches` queued `empty` launches and the one synchronize that
/// waits for them: the median of `runs` runs, after a short warm-up.
pub(crate) fn async_launches<G: Gpu>(gpu: &G, launches: usize, runs: usize) -> Result<Duration> {
    for _ in 0..launches.min(1000) {
        gpu.launch_empty()?;
    }
    gpu.synchronize()?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        for _ in 0..launches {
            gpu.launch_empty()?;
        }
        gpu.synchronize()?;
        samples.push(start.elapsed());
    }
    Ok(Samples::new(samples).median())
}

/// Median time of `launches` empty launches with `pace` of host work
/// (spinning) before each, then one synchronize: a framework that spends
/// some microseconds per operation, as PyTorch's eager mode does. Natively
/// the total is about `launches * pace`; what remoting adds per call shows.
pub(crate) fn paced_launches<G: Gpu>(gpu: &G, launches: usize, pace: Duration, runs: usize) -> Result<Duration> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        gpu.synchronize()?;
        let start = Instant::now();
        for _ in 0..launches {
            let until = Instant::now() + pace;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            gpu.launch_empty()?;
        }
        gpu.synchronize()?;
        samples.push(start.elapsed());
    }
    Ok(Samples::new(samples).median())
}

/// Median copy rates of one size, in GiB/s.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyRates {
    pub(crate) htod: f64,
    pub(crate) dtoh: f64,
}

/// Repetitions of a copy of `bytes`: enough to smooth small copies, few
/// for large ones.
fn copy_reps(bytes: usize) -> usize {
    ((256usize << 20) / bytes.max(1)).clamp(3, 20)
}

/// Copies `data` to the device and back once, checking every byte, then
/// times each direction; an HtoD copy counts as done after a synchronize.
pub(crate) fn copies<G: Gpu>(gpu: &G, data: &[u8]) -> Result<CopyRates> {
    let buffer = gpu.alloc(data.len())?;
    let mut back = vec![0u8; data.len()];
    gpu.htod(&buffer, data)?;
    gpu.synchronize()?;
    gpu.dtoh(&mut back, &buffer)?;
    verify_round_trip(gpu.label(), data, &back)?;

    let reps = copy_reps(data.len());
    let mut up = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        gpu.htod(&buffer, data)?;
        gpu.synchronize()?;
        up.push(start.elapsed());
    }
    let mut down = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        gpu.dtoh(&mut back, &buffer)?;
        down.push(start.elapsed());
    }
    Ok(CopyRates {
        htod: gib_per_s(data.len(), Samples::new(up).median()),
        dtoh: gib_per_s(data.len(), Samples::new(down).median()),
    })
}

/// [`copies`] between pinned host memory and the device, asynchronous
/// copies each followed by a synchronize (as PyTorch's
/// `.to("cuda", non_blocking=True)` from pinned memory, then a sync).
pub(crate) fn pinned_copies<G: Gpu>(gpu: &G, data: &[u8]) -> Result<CopyRates> {
    let n = data.len();
    let buffer = gpu.alloc(n)?;
    let (src, back) = (gpu.alloc_pinned(n)?, gpu.alloc_pinned(n)?);
    gpu.write_pinned(&src, data)?;
    gpu.htod_pinned(&buffer, &src, n)?;
    gpu.dtoh_pinned(&back, &buffer, n)?;
    gpu.synchronize()?;
    let mut got = vec![0u8; n];
    gpu.read_pinned(&back, &mut got)?;
    verify_round_trip(gpu.label(), data, &got)?;

    let reps = copy_reps(n);
    let mut up = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        gpu.htod_pinned(&buffer, &src, n)?;
        gpu.synchronize()?;
        up.push(start.elapsed());
    }
    let mut down = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        gpu.dtoh_pinned(&back, &buffer, n)?;
        gpu.synchronize()?;
        down.push(start.elapsed());
    }
    Ok(CopyRates { htod: gib_per_s(n, Samples::new(up).median()), dtoh: gib_per_s(n, Samples::new(down).median()) })
}

fn verify_round_trip(label: &str, sent: &[u8], back: &[u8]) -> Result<()> {
    if let Some(i) = sent.iter().zip(back).position(|(a, b)| a != b) {
        bail!(
            "{label} HtoD + DtoH round trip of {} corrupted the data: first difference at byte {i} (sent {:#04x}, got {:#04x})",
            size_label(sent.len()),
            sent[i],
            back[i]
        );
    }
    if sent.len() != back.len() {
        bail!("{label} round trip returned {} bytes for {}", back.len(), sent.len());
    }
    Ok(())
}

/// `1 MiB`, `64 MiB`, `1 GiB`, or bytes.
pub(crate) fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} B"),
    }
}

/// `bytes` of reproducible pseudo-random data (lz4 cannot shrink it).
pub(crate) fn random_bytes(bytes: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; bytes];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// `bytes` of mostly zeros, one non-zero word per 4 KiB page: what sparse
/// or freshly initialised buffers look like, and what lz4 shrinks well.
pub(crate) fn compressible_bytes(bytes: usize) -> Vec<u8> {
    let mut data = vec![0u8; bytes];
    for (page, chunk) in data.chunks_mut(4096).enumerate() {
        let word = (page as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes();
        let n = chunk.len().min(word.len());
        chunk[..n].copy_from_slice(&word[..n]);
    }
    data
}

/// Phases of one cold start to a first kernel result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ColdStart {
    /// Native: driver init and context; remote: QUIC connect and session.
    pub(crate) setup: Duration,
    pub(crate) module_load: Duration,
    /// Inputs up, `vector_add`, result back.
    pub(crate) first_result: Duration,
}

impl ColdStart {
    pub(crate) fn total(&self) -> Duration {
        self.setup + self.module_load + self.first_result
    }
}

/// Elements of the cold-start `vector_add`.
pub(crate) const COLD_START_ELEMENTS: usize = 4096;

/// `a`, `b` and the expected `a + b` of the cold-start `vector_add`; exact
/// in `f32`, so the check can compare bit for bit.
pub(crate) fn vector_add_inputs() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let a: Vec<f32> = (0..COLD_START_ELEMENTS).map(|i| i as f32).collect();
    let b: Vec<f32> = (0..COLD_START_ELEMENTS).map(|i| (2 * i) as f32 + 0.5).collect();
    let sum = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    (a, b, sum)
}

/// Checks a `vector_add` result.
pub(crate) fn check_sum(label: &str, got: &[f32], want: &[f32]) -> Result<()> {
    match got.iter().zip(want).position(|(g, w)| g != w) {
        Some(i) => bail!("{label} vector_add returned {} at index {i}, expected {}", got[i], want[i]),
        None if got.len() != want.len() => {
            bail!("{label} vector_add returned {} elements", got.len())
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_reps() {
        assert_eq!(size_label(1 << 20), "1 MiB");
        assert_eq!(size_label(64 << 20), "64 MiB");
        assert_eq!(size_label(1 << 30), "1 GiB");
        assert_eq!(size_label(1000), "1000 B");
        assert_eq!(copy_reps(1 << 20), 20);
        assert_eq!(copy_reps(64 << 20), 4);
        assert_eq!(copy_reps(1 << 30), 3);
    }

    #[test]
    fn corruption_is_reported() {
        assert!(verify_round_trip("x", &[1, 2, 3], &[1, 2, 3]).is_ok());
        let e = verify_round_trip("remote", &[1, 2, 3], &[1, 9, 3]).expect_err("differs");
        assert!(e.to_string().contains("byte 1"), "{e}");
    }

    #[test]
    fn data_patterns() {
        let r = random_bytes(4096, 1);
        assert_eq!(r, random_bytes(4096, 1));
        assert!(r.iter().filter(|&&b| b == 0).count() < 100);
        let c = compressible_bytes(3 * 4096 + 5);
        assert_eq!(c.len(), 3 * 4096 + 5);
        assert!(c.iter().filter(|&&b| b != 0).count() <= 4 * 8);
    }
}
