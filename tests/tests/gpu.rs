//! GPU-only end-to-end checks, run by `bench/gpu-suite.sh` on the GPU
//! machine with `GPUPOOL_TEST_DEVICE=cuda`: kernels compiled by NVRTC on the
//! client travel to the server as PTX images (upload on a hash miss, then
//! cache hits), run on the real card and are checked against a CPU
//! reference on fresh random data. Ignored elsewhere (no GPU in CI).

use gpupool_client::{DeviceBuffer, KernelArg, LaunchConfig, Session, StreamId};
use gpupool_tests::{TestServer, fresh_seed, random_f32, rel_error, server_config};

const SOURCE: &str = r#"
extern "C" __global__ void saxpy_ptx(float a, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
// Tiled matrix multiply with dynamic shared memory: C = A * B, row-major.
extern "C" __global__ void matmul_tiled(const float* A, const float* B, float* C, int M, int N, int K) {
    extern __shared__ float tile[];
    const int T = blockDim.x;
    float* As = tile;
    float* Bs = tile + T * T;
    int row = blockIdx.y * T + threadIdx.y, col = blockIdx.x * T + threadIdx.x;
    float acc = 0.0f;
    for (int t = 0; t < (K + T - 1) / T; ++t) {
        int ak = t * T + threadIdx.x, bk = t * T + threadIdx.y;
        As[threadIdx.y * T + threadIdx.x] = (row < M && ak < K) ? A[row * K + ak] : 0.0f;
        Bs[threadIdx.y * T + threadIdx.x] = (bk < K && col < N) ? B[bk * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < T; ++k) acc += As[threadIdx.y * T + k] * Bs[k * T + threadIdx.x];
        __syncthreads();
    }
    if (row < M && col < N) C[row * N + col] = acc;
}
"#;

fn on_gpu() -> bool {
    std::env::var("GPUPOOL_TEST_DEVICE").as_deref() == Ok("cuda")
}

#[test]
#[ignore = "needs a GPU: run with GPUPOOL_TEST_DEVICE=cuda --include-ignored"]
fn nvrtc_ptx_kernels_match_a_cpu_reference() {
    assert!(on_gpu(), "set GPUPOOL_TEST_DEVICE=cuda");
    let ptx = cudarc::nvrtc::compile_ptx(SOURCE).expect("NVRTC compiles the test kernels");
    let image = ptx.to_src();
    let srv = TestServer::start(server_config()).expect("server");
    assert_eq!(srv.backend, "cuda");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(image.as_bytes()).expect("PTX module (uploaded on a miss)");
    let m2 = s.module_load(image.as_bytes()).expect("PTX module (cache hit)");
    assert_eq!(m.functions.len(), 2);
    assert_eq!(m2.functions.len(), 2);
    let seed = fresh_seed();

    let n = 1_000_003;
    let (x, y) = (random_f32(n, seed), random_f32(n, seed + 1));
    let (dx, dy) = (DeviceBuffer::from_slice(&s, &x).expect("x"), DeviceBuffer::from_slice(&s, &y).expect("y"));
    let f = m.function("saxpy_ptx").expect("saxpy");
    let args = [KernelArg::F32(-0.5), dx.arg(), dy.arg(), KernelArg::I32(n as i32)];
    s.launch(&f, LaunchConfig::for_elements(n as u32, 256), StreamId::DEFAULT, &args).expect("launch");
    let want: Vec<f64> = x.iter().zip(&y).map(|(a, b)| -0.5 * f64::from(*a) + f64::from(*b)).collect();
    let err = rel_error(&dy.to_vec().expect("y"), &want);
    assert!(err < 1e-6, "saxpy relative error {err:e}");

    let (mm, nn, kk, t) = (300usize, 257usize, 129usize, 16u32);
    let (a, b) = (random_f32(mm * kk, seed + 2), random_f32(kk * nn, seed + 3));
    let (da, db) = (DeviceBuffer::from_slice(&s, &a).expect("A"), DeviceBuffer::from_slice(&s, &b).expect("B"));
    let dc = DeviceBuffer::<f32>::from_slice(&s, &vec![f32::NAN; mm * nn]).expect("C");
    let f = m2.function("matmul_tiled").expect("matmul");
    let cfg = LaunchConfig {
        grid: ((nn as u32).div_ceil(t), (mm as u32).div_ceil(t), 1),
        block: (t, t, 1),
        shared_mem_bytes: 2 * t * t * 4,
    };
    let dims = [mm, nn, kk].map(|d| KernelArg::I32(d as i32));
    let args = [da.arg(), db.arg(), dc.arg(), dims[0], dims[1], dims[2]];
    let stream = s.stream_create(1, 0).expect("stream");
    let (e0, e1) = (s.event_create(0).expect("e0"), s.event_create(0).expect("e1"));
    s.event_record(e0, stream).expect("record");
    s.launch(&f, cfg, stream, &args).expect("launch");
    s.event_record(e1, stream).expect("record");
    s.event_synchronize(e1).expect("event sync");
    let ms = s.event_elapsed(e0, e1).expect("elapsed");
    assert!(ms > 0.0 && ms < 10_000.0, "elapsed {ms} ms");
    let mut want = vec![0f64; mm * nn];
    for r in 0..mm {
        for c in 0..nn {
            want[r * nn + c] = (0..kk).map(|i| f64::from(a[r * kk + i]) * f64::from(b[i * nn + c])).sum();
        }
    }
    let err = rel_error(&dc.to_vec().expect("C"), &want);
    assert!(err < 1e-5, "matmul relative error {err:e}");
}
