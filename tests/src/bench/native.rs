//! The native baseline: the same kernels and copies through cudarc on the
//! local GPU, as a CUDA program would make them (`cuLaunchKernel` on the
//! legacy stream, synchronous copies from pageable memory).
//!
//! This module is the benchmark's FFI fence: `unsafe` is allowed here only,
//! each block with a `SAFETY` line. cudarc loads `libcuda` and `libnvrtc`
//! lazily and panics when one is missing, so [`check_libraries`] runs
//! before any other call and turns that into an error.
#![allow(unsafe_code)]

use super::workloads::{COLD_START_ELEMENTS, ColdStart, Gpu, check_sum, vector_add_inputs};
use anyhow::{Context, Result, anyhow, bail};
use cudarc::driver::{CudaContext, CudaFunction, result, sys};
use cudarc::nvrtc::{self, Ptx};
use std::ffi::{CString, c_void};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The built-in kernels, the same source the server compiles.
const BUILTIN_SOURCE: &str = gpupool_server::device::builtin::SOURCE;
/// Tags the child process's answer line.
const COLD_START_TAG: &str = "gpupool-bench-native-cold-start";
/// A cold start takes well under a second; the bound catches a hang.
const COLD_START_TIMEOUT: Duration = Duration::from_secs(120);

/// Fails unless the CUDA driver and NVRTC libraries can be loaded.
fn check_libraries() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate names of libcuda.
    if !unsafe { sys::is_culib_present() } {
        bail!("libcuda.so could not be loaded: no NVIDIA driver on this machine, or not on the library path");
    }
    // SAFETY: only tries to dlopen the candidate names of libnvrtc.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        bail!("libnvrtc.so could not be loaded: install the CUDA NVRTC library or add it to LD_LIBRARY_PATH");
    }
    Ok(())
}

/// The local GPU through cudarc, with the built-in module compiled by NVRTC
/// and loaded.
#[derive(Debug)]
pub(crate) struct NativeGpu {
    ctx: Arc<CudaContext>,
    empty: CudaFunction,
    name: String,
    /// The compiled built-in module (a cubin for this GPU).
    image: Vec<u8>,
    nvrtc_compile: Duration,
}

impl NativeGpu {
    /// Opens GPU `ordinal` (its primary context, shared with an in-process
    /// server on the same GPU) and compiles the built-in kernels.
    pub(crate) fn open(ordinal: usize) -> Result<Self> {
        Self::open_inner(ordinal).context("native CUDA unavailable")
    }

    fn open_inner(ordinal: usize) -> Result<Self> {
        check_libraries()?;
        let ctx = CudaContext::new(ordinal).with_context(|| format!("opening GPU {ordinal}"))?;
        let name = ctx.name()?;
        let cc = ctx.compute_capability()?;
        let start = Instant::now();
        let image = compile_cubin(BUILTIN_SOURCE, cc)?;
        let nvrtc_compile = start.elapsed();
        let module = ctx.load_module(Ptx::from_binary(image.clone())).context("loading the built-in module")?;
        let empty = module.load_function("empty")?;
        Ok(Self { ctx, empty, name, image, nvrtc_compile })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// How long NVRTC took to compile the built-in kernels to a cubin.
    pub(crate) fn nvrtc_compile(&self) -> Duration {
        self.nvrtc_compile
    }

    /// A native cold start in a fresh process (a process can create its
    /// first context only once), from the cubin compiled at open so that
    /// NVRTC time is excluded.
    pub(crate) fn cold_start(&self) -> Result<ColdStart> {
        let path = std::env::temp_dir().join(format!("gpupool-bench-{}.cubin", std::process::id()));
        std::fs::write(&path, &self.image).with_context(|| format!("writing {}", path.display()))?;
        let result = run_cold_start_child(&path);
        let _ = std::fs::remove_file(&path);
        result.context("native cold start")
    }
}

/// An NVRTC program, destroyed on drop.
struct Program {
    raw: nvrtc::sys::nvrtcProgram,
    /// NVRTC may refer to the source until the program is destroyed.
    _source: CString,
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `create_program` and is destroyed only here.
        if let Err(e) = unsafe { nvrtc::result::destroy_program(self.raw) } {
            tracing::warn!("nvrtcDestroyProgram failed: {e}");
        }
    }
}

/// Compiles `source` to a cubin for compute capability `major.minor`.
fn compile_cubin(source: &str, (major, minor): (i32, i32)) -> Result<Vec<u8>> {
    let source = CString::new(source).context("kernel source contains a NUL byte")?;
    let raw = nvrtc::result::create_program(&source, Some(c"gpupool_builtin.cu"))?;
    let program = Program { raw, _source: source };
    let arch = format!("--gpu-architecture=sm_{major}{minor}");
    // SAFETY: `program.raw` is a live program.
    if let Err(e) = unsafe { nvrtc::result::compile_program(program.raw, &[arch.as_str()]) } {
        // SAFETY: as above; the log is read before the program is destroyed.
        let log = unsafe { nvrtc::result::get_program_log(program.raw) }
            .map(|chars| chars.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect::<String>())
            .unwrap_or_default();
        bail!("NVRTC could not compile the built-in kernels ({arch}): {e}\n{log}");
    }
    let mut size = 0usize;
    // SAFETY: a compiled program and a valid out-pointer.
    unsafe { nvrtc::sys::nvrtcGetCUBINSize(program.raw, &mut size) }.result()?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the `size` bytes NVRTC writes.
    unsafe { nvrtc::sys::nvrtcGetCUBIN(program.raw, cubin.as_mut_ptr().cast()) }.result()?;
    Ok(cubin)
}

/// Device memory from `cuMemAlloc`, freed on drop.
#[derive(Debug)]
pub(crate) struct NativeBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl NativeBuffer {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread()?;
        // SAFETY: the context is current; the memory is only copied into
        // and out of as bytes, so its initial contents do not matter.
        let ptr = unsafe { result::malloc_sync(bytes) }.with_context(|| format!("cuMemAlloc of {bytes} bytes"))?;
        Ok(Self { ctx: ctx.clone(), ptr, bytes })
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len > self.bytes {
            bail!("a copy of {len} bytes does not fit a buffer of {}", self.bytes);
        }
        Ok(())
    }
}

impl Drop for NativeBuffer {
    fn drop(&mut self) {
        let freed = self.ctx.bind_to_thread().and_then(|()| {
            // SAFETY: `ptr` came from `cuMemAlloc` in this context and is
            // freed only here; the copies that used it were synchronous.
            unsafe { result::free_sync(self.ptr) }
        });
        if let Err(e) = freed {
            tracing::warn!("cuMemFree failed: {e}");
        }
    }
}

/// Pinned host memory from `cuMemHostAlloc`, freed on drop.
#[derive(Debug)]
pub(crate) struct NativePinned {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    bytes: usize,
}

impl NativePinned {
    fn check_len(&self, len: usize) -> Result<()> {
        if len > self.bytes {
            bail!("{len} bytes do not fit pinned memory of {}", self.bytes);
        }
        Ok(())
    }
}

impl Drop for NativePinned {
    fn drop(&mut self) {
        let freed = self.ctx.bind_to_thread().map_err(anyhow::Error::from).and_then(|()| {
            // SAFETY: `ptr` came from `cuMemHostAlloc` and is freed only
            // here; the copies that used it were synchronized.
            unsafe { sys::cuMemFreeHost(self.ptr.cast()) }.result().map_err(anyhow::Error::from)
        });
        if let Err(e) = freed {
            tracing::warn!("cuMemFreeHost failed: {e}");
        }
    }
}

impl Gpu for NativeGpu {
    type Buffer = NativeBuffer;
    type Pinned = NativePinned;

    fn alloc_pinned(&self, bytes: usize) -> Result<NativePinned> {
        self.ctx.bind_to_thread()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the context is current.
        unsafe { sys::cuMemHostAlloc(&mut ptr, bytes, 0) }
            .result()
            .with_context(|| format!("cuMemHostAlloc of {bytes} bytes"))?;
        Ok(NativePinned { ctx: self.ctx.clone(), ptr: ptr.cast(), bytes })
    }

    fn write_pinned(&self, dst: &NativePinned, data: &[u8]) -> Result<()> {
        dst.check_len(data.len())?;
        // SAFETY: `dst` holds at least `data.len()` bytes (checked above)
        // and no copy into or out of it is in flight (each is synchronized).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.ptr, data.len()) };
        Ok(())
    }

    fn read_pinned(&self, src: &NativePinned, out: &mut [u8]) -> Result<()> {
        src.check_len(out.len())?;
        // SAFETY: as in `write_pinned`, the other way.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn htod_pinned(&self, dst: &NativeBuffer, src: &NativePinned, len: usize) -> Result<()> {
        dst.check_len(len)?;
        src.check_len(len)?;
        self.ctx.bind_to_thread()?;
        // SAFETY: both ends hold `len` bytes (checked above); `src` lives
        // until the copy is synchronized (the caller does before dropping).
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst.ptr, src.ptr.cast(), len, std::ptr::null_mut()) }.result()?;
        Ok(())
    }

    fn dtoh_pinned(&self, dst: &NativePinned, src: &NativeBuffer, len: usize) -> Result<()> {
        dst.check_len(len)?;
        src.check_len(len)?;
        self.ctx.bind_to_thread()?;
        // SAFETY: as in `htod_pinned`, the other way.
        unsafe { sys::cuMemcpyDtoHAsync_v2(dst.ptr.cast(), src.ptr, len, std::ptr::null_mut()) }.result()?;
        Ok(())
    }

    fn label(&self) -> &'static str {
        "native"
    }

    fn launch_empty(&self) -> Result<()> {
        // SAFETY: `empty` takes no parameters, so the empty parameter array
        // matches; its module belongs to this context, current on this
        // thread since `open` (the benchmark's CUDA calls stay on it).
        unsafe {
            result::launch_kernel(self.empty.cu_function(), (1, 1, 1), (1, 1, 1), 0, std::ptr::null_mut(), &mut [])
        }?;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        // SAFETY: the null stream is the context's legacy default stream.
        unsafe { result::stream::synchronize(std::ptr::null_mut()) }?;
        Ok(())
    }

    fn alloc(&self, bytes: usize) -> Result<Self::Buffer> {
        NativeBuffer::new(&self.ctx, bytes)
    }

    fn htod(&self, dst: &Self::Buffer, src: &[u8]) -> Result<()> {
        dst.check_len(src.len())?;
        self.ctx.bind_to_thread()?;
        // SAFETY: `dst` holds at least `src.len()` bytes (checked above).
        unsafe { result::memcpy_htod_sync(dst.ptr, src) }?;
        Ok(())
    }

    fn dtoh(&self, dst: &mut [u8], src: &Self::Buffer) -> Result<()> {
        src.check_len(dst.len())?;
        self.ctx.bind_to_thread()?;
        // SAFETY: `src` holds at least `dst.len()` bytes (checked above).
        unsafe { result::memcpy_dtoh_sync(dst, src.ptr) }?;
        Ok(())
    }
}

/// Runs this binary again with `--native-cold-start <image>` and reads the
/// phases it measured.
fn run_cold_start_child(image: &Path) -> Result<ColdStart> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(exe)
        .arg("--native-cold-start")
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the cold-start process")?;
    let deadline = Instant::now() + COLD_START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the cold-start process did not finish within {COLD_START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The answer is one short line, well within the pipe's buffer, so the
    // child never blocked on writing it.
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)?;
    }
    if !status.success() {
        bail!("the cold-start process failed ({status}); its error is above");
    }
    parse_cold_start(&stdout)
}

/// Parses `TAG setup_ns=.. module_ns=.. result_ns=..`.
fn parse_cold_start(stdout: &str) -> Result<ColdStart> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(COLD_START_TAG))
        .ok_or_else(|| anyhow!("the cold-start process printed no result: {stdout:?}"))?;
    let field = |name: &str| -> Result<Duration> {
        let value = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .ok_or_else(|| anyhow!("cold-start result without {name}: {line:?}"))?;
        Ok(Duration::from_nanos(value.parse().with_context(|| format!("{name}={value}"))?))
    };
    Ok(ColdStart { setup: field("setup_ns")?, module_load: field("module_ns")?, first_result: field("result_ns")? })
}

/// The child side: in this fresh process, time the first context, the load
/// of the precompiled `image`, and `vector_add` up to its result on the
/// host, then print them on one line.
pub(crate) fn cold_start_child(image: &Path) -> Result<()> {
    let image = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let (a, b, want) = vector_add_inputs();
    check_libraries().context("native CUDA unavailable")?;

    let start = Instant::now();
    let ctx = CudaContext::new(0).context("native CUDA unavailable: creating the context")?;
    let setup = start.elapsed();
    let module = ctx.load_module(Ptx::from_binary(image)).context("loading the precompiled module")?;
    let vector_add = module.load_function("vector_add")?;
    let module_load = start.elapsed() - setup;
    let bytes = COLD_START_ELEMENTS * size_of::<f32>();
    let (da, db, dc) =
        (NativeBuffer::new(&ctx, bytes)?, NativeBuffer::new(&ctx, bytes)?, NativeBuffer::new(&ctx, bytes)?);
    // SAFETY: each buffer holds `COLD_START_ELEMENTS` floats, the length of
    // `a` and `b`.
    unsafe {
        result::memcpy_htod_sync(da.ptr, &a)?;
        result::memcpy_htod_sync(db.ptr, &b)?;
    }
    let n = u32::try_from(COLD_START_ELEMENTS)?;
    let (mut pa, mut pb, mut pc, mut pn) = (da.ptr, db.ptr, dc.ptr, n);
    let mut params: [*mut c_void; 4] =
        [(&raw mut pa).cast(), (&raw mut pb).cast(), (&raw mut pc).cast(), (&raw mut pn).cast()];
    // SAFETY: the parameters match `vector_add(const float*, const float*,
    // float*, unsigned)` and outlive the call, which copies them; the grid
    // covers `n` threads, each touching index < n of buffers of n floats.
    unsafe {
        result::launch_kernel(
            vector_add.cu_function(),
            (n.div_ceil(256), 1, 1),
            (256, 1, 1),
            0,
            std::ptr::null_mut(),
            &mut params,
        )
    }?;
    let mut got = vec![0f32; COLD_START_ELEMENTS];
    // SAFETY: `dc` holds `COLD_START_ELEMENTS` floats; the copy is ordered
    // after the kernel on the legacy stream.
    unsafe { result::memcpy_dtoh_sync(&mut got, dc.ptr) }?;
    let first_result = start.elapsed() - setup - module_load;
    check_sum("native", &got, &want)?;
    println!(
        "{COLD_START_TAG} setup_ns={} module_ns={} result_ns={}",
        setup.as_nanos(),
        module_load.as_nanos(),
        first_result.as_nanos()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_child_line() {
        let out = format!("noise\n{COLD_START_TAG} setup_ns=300000000 module_ns=2000000 result_ns=150000\n");
        let c = parse_cold_start(&out).expect("parses");
        assert_eq!(c.setup, Duration::from_millis(300));
        assert_eq!(c.module_load, Duration::from_millis(2));
        assert_eq!(c.first_result, Duration::from_micros(150));
        assert!(parse_cold_start("nothing").is_err());
        assert!(parse_cold_start(&format!("{COLD_START_TAG} setup_ns=1")).is_err());
    }
}
