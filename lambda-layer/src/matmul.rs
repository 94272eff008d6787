//! The example function's work: `C = A × B` in single precision on the GPU,
//! with CUDA's driver API (cudarc, loading the layer's `libcuda.so.1` at run
//! time) and the gpu-server's built-in `matmul_f32` kernel, so the function
//! ships no device code and runs on any server, the emulated one included.
//! On a local GPU (the native baseline) it compiles the same kernel's
//! source with NVRTC.
//!
//! `unsafe` is allowed here for the one kernel launch (an FFI call whose
//! argument list the compiler cannot check), with its `// SAFETY:` line.
#![allow(unsafe_code)]

use anyhow::{Context, Result, bail, ensure};
use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

/// Largest side accepted: a 1024 × 1024 product is 4 MiB per matrix, well
/// inside Lambda's 6 MiB synchronous payload once encoded for the smaller
/// shapes people send.
pub const MAX_SIDE: u32 = 1024;

/// The function's input: row-major matrices, `a` is `m × k`, `b` is `k × n`.
/// Without `a` and `b`, matrices of the given shape are generated from
/// `seed` (a payload-free way to exercise the GPU).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Request {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    #[serde(default)]
    pub a: Option<Vec<f32>>,
    #[serde(default)]
    pub b: Option<Vec<f32>>,
    #[serde(default)]
    pub seed: u64,
}

/// The function's output.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Response {
    /// `m × n`, row-major.
    pub c: Vec<f32>,
    /// Sum of `c`, for checks that do not want the whole matrix.
    pub checksum: f64,
    pub device: String,
    pub kernels: Kernels,
    /// `true` for the first invocation of this execution environment (or
    /// of a GPU worker that replaced one whose session was lost).
    pub cold: bool,
    /// `true` when the GPU session was lost (the environment was frozen past
    /// the server's grace period or its lease) and this invocation opened a
    /// new one before it ran.
    #[serde(default)]
    pub recovered: bool,
    pub timing: Timing,
}

/// Milliseconds spent in each step of this invocation.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Timing {
    /// Opening the GPU and loading the kernel (cold invocations only).
    pub setup_ms: f64,
    pub upload_ms: f64,
    pub kernel_ms: f64,
    pub download_ms: f64,
    pub total_ms: f64,
}

impl Request {
    /// The operands, checked or generated.
    pub fn operands(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        for (name, v) in [("m", self.m), ("n", self.n), ("k", self.k)] {
            ensure!((1..=MAX_SIDE).contains(&v), "{name} = {v} must be between 1 and {MAX_SIDE}");
        }
        let (m, n, k) = (self.m as usize, self.n as usize, self.k as usize);
        match (&self.a, &self.b) {
            (Some(a), Some(b)) => {
                ensure!(a.len() == m * k, "a has {} elements, m × k = {}", a.len(), m * k);
                ensure!(b.len() == k * n, "b has {} elements, k × n = {}", b.len(), k * n);
                ensure!(a.iter().chain(b).all(|x| x.is_finite()), "a and b must hold finite numbers");
                Ok((a.clone(), b.clone()))
            }
            (None, None) => Ok((generate(m * k, self.seed), generate(k * n, self.seed ^ 0x9e37_79b9_7f4a_7c15))),
            _ => bail!("give both a and b, or neither (then they are generated from seed)"),
        }
    }
}

/// Deterministic values in [-1, 1) from `seed` (SplitMix64).
pub fn generate(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// `A × B` on the CPU, in the kernel's summation order.
pub fn cpu_reference(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for row in 0..m {
        for col in 0..n {
            let mut acc = 0.0f32;
            for i in 0..k {
                acc += a[row * k + i] * b[i * n + col];
            }
            c[row * n + col] = acc;
        }
    }
    c
}

/// The GPU as the function keeps it between invocations: context, stream
/// and kernel are opened once per execution environment (its INIT, when the
/// layer's extension already holds the lease).
#[derive(Debug)]
pub struct Gpu {
    stream: Arc<CudaStream>,
    kernel: CudaFunction,
    device: String,
    kernels: Kernels,
    setup_ms: f64,
    invocations: u64,
}

/// Where the function's kernel came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernels {
    /// The gpupool server's built-in module, loaded by its name.
    Builtin,
    /// `gpupool_proto::BUILTIN_SOURCE` compiled here by NVRTC (a local GPU).
    Nvrtc,
}

/// Compiles the built-in kernels to PTX for the context's GPU.
fn compile_builtin(ctx: &CudaContext) -> Result<Ptx> {
    // SAFETY: only tries to dlopen the candidate names of libnvrtc; cudarc
    // panics on the first NVRTC call when none loads.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!(
            "the driver does not know gpupool's built-in module (a local GPU) and libnvrtc.so could not be \
             loaded to compile it: add the CUDA toolkit's lib64 to LD_LIBRARY_PATH"
        );
    }
    let (major, minor) = ctx.compute_capability().context("reading the compute capability")?;
    let opts =
        CompileOptions { options: vec![format!("--gpu-architecture=compute_{major}{minor}")], ..Default::default() };
    compile_ptx_with_opts(gpupool_proto::BUILTIN_SOURCE, opts).context("compiling the built-in kernels with NVRTC")
}

impl Gpu {
    /// Opens device 0 and loads the built-in kernels: by the module's name
    /// through gpupool (every server has them compiled), or, when the
    /// driver refuses the name (a local GPU), compiled from their source
    /// with NVRTC, as a native CUDA function would ship them.
    pub fn open() -> Result<Self> {
        let start = Instant::now();
        let ctx = CudaContext::new(0).context("opening the GPU (is the gpupool layer attached?)")?;
        let device = ctx.name().context("reading the device name")?;
        let (module, kernels) =
            match ctx.load_module(Ptx::from_src(String::from_utf8_lossy(gpupool_proto::BUILTIN_MODULE).into_owned())) {
                Ok(module) => (module, Kernels::Builtin),
                Err(e) if e.0 == CUresult::CUDA_ERROR_INVALID_IMAGE => {
                    let ptx = compile_builtin(&ctx)?;
                    (ctx.load_module(ptx).context("loading the NVRTC-compiled kernels")?, Kernels::Nvrtc)
                }
                Err(e) => return Err(e).context("loading the built-in kernels"),
            };
        let kernel = module.load_function("matmul_f32").context("finding matmul_f32")?;
        Ok(Self {
            stream: ctx.default_stream(),
            kernel,
            device,
            kernels,
            setup_ms: start.elapsed().as_secs_f64() * 1e3,
            invocations: 0,
        })
    }

    /// Where the kernel came from.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Milliseconds spent opening the GPU and loading the kernel.
    pub fn setup_ms(&self) -> f64 {
        self.setup_ms
    }

    /// Runs one request.
    pub fn run(&mut self, req: &Request) -> Result<Response> {
        let start = Instant::now();
        let (a, b) = req.operands()?;
        let (m, n, k) = (req.m, req.n, req.k);
        let s = &self.stream;
        let t = Instant::now();
        let da = s.clone_htod(&a)?;
        let db = s.clone_htod(&b)?;
        let mut dc = s.alloc_zeros::<f32>(m as usize * n as usize)?;
        s.synchronize()?;
        let upload_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let cfg =
            LaunchConfig { grid_dim: (n.div_ceil(16), m.div_ceil(16), 1), block_dim: (16, 16, 1), shared_mem_bytes: 0 };
        let mut launch = s.launch_builder(&self.kernel);
        launch.arg(&da).arg(&db).arg(&mut dc).arg(&m).arg(&n).arg(&k);
        // SAFETY: matmul_f32(const float*, const float*, float*, unsigned,
        // unsigned, unsigned) with buffers of m×k, k×n and m×n floats; the
        // grid covers m × n and the kernel checks its bounds.
        unsafe { launch.launch(cfg) }.context("launching matmul_f32")?;
        s.synchronize()?;
        let kernel_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let c = s.clone_dtoh(&dc)?;
        let download_ms = t.elapsed().as_secs_f64() * 1e3;
        self.invocations += 1;
        let cold = self.invocations == 1;
        Ok(Response {
            checksum: c.iter().map(|&x| f64::from(x)).sum(),
            c,
            device: self.device.clone(),
            kernels: self.kernels,
            cold,
            recovered: false,
            timing: Timing {
                setup_ms: if cold { self.setup_ms } else { 0.0 },
                upload_ms,
                kernel_ms,
                download_ms,
                total_ms: start.elapsed().as_secs_f64() * 1e3 + if cold { self.setup_ms } else { 0.0 },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_are_checked() {
        let ok = Request { m: 2, n: 3, k: 4, a: Some(vec![1.0; 8]), b: Some(vec![1.0; 12]), seed: 0 };
        assert_eq!(ok.operands().expect("valid").0.len(), 8);
        let e = Request { a: Some(vec![1.0; 7]), ..ok.clone() }.operands().expect_err("short a");
        assert!(e.to_string().contains("a has 7 elements"), "{e}");
        let e = Request { b: None, ..ok.clone() }.operands().expect_err("a without b");
        assert!(e.to_string().contains("both a and b"), "{e}");
        let e = Request { m: 0, ..ok.clone() }.operands().expect_err("empty");
        assert!(e.to_string().contains("m = 0"), "{e}");
        let e = Request { a: Some(vec![f32::NAN; 8]), ..ok.clone() }.operands().expect_err("NaN");
        assert!(e.to_string().contains("finite"), "{e}");
        let e = Request { n: MAX_SIDE + 1, a: None, b: None, ..ok }.operands().expect_err("too big");
        assert!(e.to_string().contains("between 1 and"), "{e}");
    }

    #[test]
    fn generated_operands_are_deterministic_and_bounded() {
        let r = Request { m: 8, n: 8, k: 8, a: None, b: None, seed: 7 };
        let (a1, b1) = r.operands().expect("generated");
        let (a2, _) = r.operands().expect("generated");
        assert_eq!(a1, a2);
        assert_ne!(a1, b1);
        assert!(a1.iter().all(|x| (-1.0..1.0).contains(x)));
    }

    #[test]
    fn cpu_reference_multiplies() {
        // [1 2; 3 4] × [5 6; 7 8] = [19 22; 43 50]
        assert_eq!(cpu_reference(&[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0], 2, 2, 2), vec![19.0, 22.0, 43.0, 50.0]);
    }
}
