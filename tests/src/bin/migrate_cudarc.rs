//! A cudarc program that a live migration must not change (issue 21): run
//! through gpupool's drop-in `libcuda.so.1` twice, once with its session
//! moved to another server halfway and once not, it prints the same lines,
//! and each line is also checked against the same arithmetic on the host.
//!
//! Usage: `gpupool-migrate-cudarc STEPS DIR` (the protocol of
//! `bench/migrate_torch.py`, so `bench/migrate-torch.sh` runs it through
//! `MIGRATE_PROGRAM`, and `tests/tests/libcuda.rs` in CI). Before step
//! STEPS/2 it synchronizes, creates DIR/half and waits, idle, until DIR/go
//! exists (at most 300 s). Each step prints `STEP i X`, X a digest of a
//! window of the device's result and of a module variable; the end prints
//! `CHECKSUM X` (a digest of everything) and `DONE`. `INFO` and
//! `AFTER_GO_MS` lines are for people, not for the comparison.
//!
//! What lives across the move: two 4 MiB buffers, a stream of the
//! program's own, the module (gpupool's built-in kernels where gpupool
//! serves them, else the same source compiled by NVRTC: natively), its
//! functions, and its variable `tally`, which one kernel bumps and another
//! writes through a pointer parameter. The values are small integers in
//! floats, so every result is exact.
#![allow(unsafe_code)]

use anyhow::{Context, Result, bail};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Elements per buffer (4 MiB of f32).
const N: usize = 1 << 20;
/// Elements read back after each step.
const WINDOW: usize = 4096;
/// Threads of each `tally_add` launch (each adds its value once).
const TALLY_THREADS: u32 = 32;
/// How long the program waits for DIR/go.
const GO_LIMIT: Duration = Duration::from_secs(300);

fn main() {
    if let Err(e) = run() {
        eprintln!("gpupool-migrate-cudarc: {e:#}");
        std::process::exit(1);
    }
}

/// The built-in kernels: gpupool's module image, or natively the same
/// source compiled by NVRTC (the image is not PTX for a real driver).
fn load_kernels(ctx: &Arc<CudaContext>) -> Result<(Arc<CudaModule>, &'static str)> {
    // A text image ends at its NUL (`cuModuleLoadData`'s contract): without
    // one the driver, or the stub, reads on into whatever follows the
    // buffer (the image then differed from run to run, and now and then
    // was not the built-in module: CUDA_ERROR_NOT_FOUND for its kernels).
    let mut image = gpupool_proto::BUILTIN_MODULE.to_vec();
    image.push(0);
    if let Ok(module) = ctx.load_module(Ptx::from_binary(image)) {
        return Ok((module, "gpupool's built-in module"));
    }
    let ptx = cudarc::nvrtc::compile_ptx(gpupool_proto::BUILTIN_SOURCE)
        .context("compiling the built-in kernels with NVRTC")?;
    Ok((ctx.load_module(ptx).context("loading the NVRTC-compiled kernels")?, "NVRTC"))
}

/// FNV-1a over the bytes of `words`.
fn digest(words: impl IntoIterator<Item = u64>) -> u64 {
    words
        .into_iter()
        .flat_map(u64::to_le_bytes)
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Step `step`'s saxpy factor.
fn alpha(step: usize) -> f32 {
    (step % 3 + 1) as f32
}

/// Where step `step` reads its window.
fn window(step: usize) -> std::ops::Range<usize> {
    let at = step * 7919 % (N - WINDOW);
    at..at + WINDOW
}

/// What the device computes, computed on the host: `y` and `tally` after
/// each step.
struct Mirror {
    x: Vec<f32>,
    y: Vec<f32>,
    tally: u64,
}

impl Mirror {
    fn new() -> Self {
        let x = (0..N).map(|i| (i % 7) as f32).collect();
        let y = (0..N).map(|i| (i % 5) as f32).collect();
        Self { x, y, tally: 0 }
    }

    /// One step: `y = alpha * x + y`; `tally` takes the bits of `x[0..2] +
    /// y[0..2]` as two f32s (vector_add writing through the variable's
    /// address), then every thread of `tally_add` adds `step + 1`.
    fn step(&mut self, step: usize) {
        let a = alpha(step);
        for (y, x) in self.y.iter_mut().zip(&self.x) {
            *y += a * x;
        }
        let lo = (self.x[0] + self.y[0]).to_bits();
        let hi = (self.x[1] + self.y[1]).to_bits();
        self.tally = (u64::from(hi) << 32 | u64::from(lo)).wrapping_add(u64::from(TALLY_THREADS) * (step as u64 + 1));
    }
}

/// The program's device state.
struct Device {
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    saxpy: CudaFunction,
    vector_add: CudaFunction,
    tally_add: CudaFunction,
    x: cudarc::driver::CudaSlice<f32>,
    y: cudarc::driver::CudaSlice<f32>,
}

impl Device {
    /// The address and size of the module variable `tally`.
    fn tally(&self) -> Result<(u64, usize)> {
        let global = self.module.get_global("tally", &self.stream).context("looking up `tally`")?;
        let len = global.len();
        let (ptr, _sync) = global.device_ptr(&self.stream);
        Ok((ptr, len))
    }

    /// Runs step `step` on the stream and returns the digest of its window
    /// of `y` and of `tally`.
    fn step(&mut self, step: usize) -> Result<(Vec<f32>, u64)> {
        let n = N as u32;
        let a = alpha(step);
        let (tally, _) = self.tally()?;
        let value = step as u64 + 1;
        let two = 2u32;
        // SAFETY: the kernels' parameters are (float, const float*, float*,
        // unsigned), (const float*, const float*, float*, unsigned) and
        // (unsigned long long), as builtin.cu declares them; every pointer
        // is a live allocation of at least the `n` elements passed (tally
        // holds two floats' bytes).
        unsafe {
            self.stream
                .launch_builder(&self.saxpy)
                .arg(&a)
                .arg(&self.x)
                .arg(&mut self.y)
                .arg(&n)
                .launch(LaunchConfig::for_num_elems(n))?;
            self.stream
                .launch_builder(&self.vector_add)
                .arg(&self.x)
                .arg(&self.y)
                .arg(&tally)
                .arg(&two)
                .launch(LaunchConfig::for_num_elems(2))?;
            let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (TALLY_THREADS, 1, 1), shared_mem_bytes: 0 };
            self.stream.launch_builder(&self.tally_add).arg(&value).launch(one)?;
        }
        let seen = self.stream.clone_dtoh(&self.y.slice(window(step)))?;
        let global = self.module.get_global("tally", &self.stream)?;
        let bytes = self.stream.clone_dtoh(&global)?;
        let tally = u64::from_le_bytes(bytes.as_slice().try_into().context("`tally` is not 8 bytes")?);
        Ok((seen, tally))
    }
}

fn wait_for(path: &Path) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > GO_LIMIT {
            bail!("no {} within {} s", path.display(), GO_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, steps, dir] = args.as_slice() else {
        bail!("usage: gpupool-migrate-cudarc STEPS DIR");
    };
    let steps: usize = steps.parse().context("STEPS is not a number")?;
    let dir = Path::new(dir);

    let ctx = CudaContext::new(0).context("opening GPU 0")?;
    let stream = ctx.new_stream().context("creating a stream")?;
    let (module, source) = load_kernels(&ctx)?;
    let mut host = Mirror::new();
    let function = |name: &str| module.load_function(name).with_context(|| format!("looking up kernel `{name}`"));
    let mut device = Device {
        saxpy: function("saxpy")?,
        vector_add: function("vector_add")?,
        tally_add: function("tally_add")?,
        x: stream.clone_htod(&host.x).context("uploading x")?,
        y: stream.clone_htod(&host.y).context("uploading y")?,
        module,
        stream,
    };
    let (tally_at, tally_len) = device.tally()?;
    if tally_len != 8 {
        bail!("`tally` is {tally_len} bytes, expected 8");
    }
    // The variable starts at zero (no initializer); set it anyway, through
    // its address, so both runs start alike.
    let mut tally = device.module.get_global("tally", &device.stream).context("looking up `tally` again")?;
    device.stream.memset_zeros(&mut tally).context("zeroing `tally`")?;
    let name = ctx.name().context("the device's name")?;
    println!("INFO {} on {name}, kernels from {source}, tally at {tally_at:#x}", std::env::consts::ARCH);

    let mut after_go = None;
    for step in 0..steps {
        if step == steps / 2 {
            device.stream.synchronize()?;
            std::fs::write(dir.join("half"), b"")?;
            wait_for(&dir.join("go"))?;
            after_go = Some(Instant::now());
        }
        let (seen, tally) = device.step(step).with_context(|| format!("step {step}"))?;
        host.step(step);
        let want = &host.y[window(step)];
        if let Some(i) = (0..WINDOW).find(|&i| seen[i] != want[i]) {
            bail!("step {step}: y[{}] is {}, expected {}", window(step).start + i, seen[i], want[i]);
        }
        if tally != host.tally {
            bail!("step {step}: tally is {tally:#x}, expected {:#x}", host.tally);
        }
        let words = seen.iter().map(|v| u64::from(v.to_bits())).chain([tally]);
        println!("STEP {step} {:016x}", digest(words));
        if let Some(t) = after_go.take() {
            println!("AFTER_GO_MS {}", t.elapsed().as_millis());
        }
    }
    let y = device.stream.clone_dtoh(&device.y)?;
    if y != host.y {
        bail!("the final y differs from the host's");
    }
    println!("CHECKSUM {:016x}", digest(y.iter().map(|v| u64::from(v.to_bits())).chain([host.tally])));
    println!("DONE");
    Ok(())
}
