#!/usr/bin/env python3
"""Unmodified GPU frameworks other than PyTorch, checked against NumPy.

Usage: frameworks_check.py cupy|numba|jax

Each framework reaches the driver its own way: CuPy compiles its kernels
with NVRTC and loads them with cuModuleLoadData, and calls cuBLAS, cuSOLVER,
cuRAND, cuFFT and cuSPARSE; Numba compiles with NVVM and loads through the
CUDA Python bindings (every driver entry point through cuGetProcAddress);
JAX (XLA) loads its own cubins, preallocates most of the memory
cuMemGetInfo reports and replays work as CUDA graphs. With LD_LIBRARY_PATH
pointing at gpupool's libcuda.so.1 each runs unchanged against a remote GPU.

Lines starting with TIME or INFO may differ between runs; the rest is
deterministic for a given GPU. Exit status 77: the framework is not
installed (nothing was checked).
"""
import sys
import time

try:
    import numpy as np
except ImportError as missing:
    print(f"SKIP: {missing}")
    sys.exit(77)


def skip(name, missing):
    print(f"SKIP {name}: {missing}")
    sys.exit(77)


def finish(name, t0):
    print(f"TIME total {(time.perf_counter() - t0) * 1e3:.1f} ms")
    print(f"PASS {name}")


def fail(name, reason):
    print(f"FAIL {name}: {reason}", flush=True)
    sys.exit(1)


def close(name, what, got, want, rtol=1e-4, atol=1e-4):
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        fail(name, f"{what}: shape {got.shape}, expected {want.shape}")
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        fail(name, f"{what}: differs from NumPy by up to {diff:g}")
    print(f"{what}: matches NumPy")


def rounded(x, digits=4):
    return float(f"{float(x):.{digits}g}")


def check_cupy():
    name = "cupy"
    try:
        import cupy as cp
        import cupyx.scipy.sparse as sparse
    except ImportError as e:
        skip(name, e)
    print(f"INFO cupy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}")
    t0 = time.perf_counter()
    dev = cp.cuda.Device(0)
    cc = dev.compute_capability
    print(f"compute capability {cc[0]}.{cc[1]}")
    free, total = cp.cuda.runtime.memGetInfo()
    print(f"memory info sane: {0 < free <= total}")

    rng = np.random.default_rng(7)
    host = rng.standard_normal((512, 384)).astype(np.float32)
    x = cp.asarray(host)
    print(f"TIME first upload {(time.perf_counter() - t0) * 1e3:.1f} ms")

    # Elementwise and reduction kernels: compiled by NVRTC at first use.
    close(name, "elementwise", cp.asnumpy(cp.sin(x) * 2 + 1), np.sin(host) * 2 + 1, rtol=1e-5)
    close(name, "reduction sum", cp.asnumpy(x.sum(axis=0)), host.sum(axis=0), rtol=1e-3, atol=1e-3)
    print(f"argmax: {int(x.argmax())} (NumPy {int(host.argmax())})")

    saxpy = cp.ElementwiseKernel("float32 a, float32 x, float32 y", "float32 z",
                                 "z = a * x + y", "gpupool_saxpy")
    close(name, "ElementwiseKernel", cp.asnumpy(saxpy(np.float32(3), x, x)), 4 * host, rtol=1e-5)
    raw = cp.RawKernel(r"""
    extern "C" __global__ void scale_rows(const float* in, float* out, int cols) {
        __shared__ float tile[256];
        int row = blockIdx.x;
        float acc = 0.f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) acc += in[row * cols + c];
        tile[threadIdx.x] = acc;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) tile[threadIdx.x] += tile[threadIdx.x + s];
            __syncthreads();
        }
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            out[row * cols + c] = in[row * cols + c] - tile[0] / cols;
    }""", "scale_rows")
    out = cp.empty_like(x)
    raw((x.shape[0],), (256,), (x, out, np.int32(x.shape[1])))
    close(name, "RawKernel (shared memory)", cp.asnumpy(out),
          host - host.mean(axis=1, keepdims=True), rtol=1e-4, atol=1e-4)

    # Libraries: cuBLAS, cuSOLVER, cuFFT, cuRAND, cuSPARSE.
    a = host[:256, :256].astype(np.float64) + 16 * np.eye(256)
    b = rng.standard_normal(256)
    ga, gb = cp.asarray(a), cp.asarray(b)
    close(name, "matmul (cuBLAS)", cp.asnumpy(ga @ ga.T), a @ a.T, rtol=1e-10, atol=1e-9)
    close(name, "solve (cuSOLVER getrf/getrs)", cp.asnumpy(cp.linalg.solve(ga, gb)),
          np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    sym = a @ a.T
    close(name, "eigvalsh (cuSOLVER syevd)", cp.asnumpy(cp.linalg.eigvalsh(cp.asarray(sym))),
          np.linalg.eigvalsh(sym), rtol=1e-8, atol=1e-6)
    q, r = cp.linalg.qr(ga)
    close(name, "qr (cuSOLVER geqrf/orgqr)", cp.asnumpy(q @ r), a, rtol=1e-10, atol=1e-9)
    signal = rng.standard_normal(4096).astype(np.complex64)
    close(name, "fft (cuFFT)", cp.asnumpy(cp.fft.fft(cp.asarray(signal))), np.fft.fft(signal),
          rtol=1e-3, atol=1e-2)
    cp.random.seed(1234)
    draws = cp.asnumpy(cp.random.rand(1 << 16))
    print(f"uniform draws (cuRAND): in [0, 1): {bool(((draws >= 0) & (draws < 1)).all())}, "
          f"mean {rounded(draws.mean(), 3)}, first {rounded(draws[0], 6)}")
    dense = np.where(rng.random((300, 300)) < 0.05, rng.standard_normal((300, 300)), 0.0)
    vec = rng.standard_normal(300)
    csr = sparse.csr_matrix(cp.asarray(dense))
    print(f"sparse nonzeros: {int(csr.nnz)}")
    close(name, "sparse matrix-vector (cuSPARSE)", cp.asnumpy(csr @ cp.asarray(vec)), dense @ vec,
          rtol=1e-10, atol=1e-10)

    # Streams, events, pinned memory.
    stream = cp.cuda.Stream(non_blocking=True)
    pinned = cp.cuda.alloc_pinned_memory(host.nbytes)
    staged = np.frombuffer(pinned, np.float32, host.size).reshape(host.shape)
    staged[...] = host
    with stream:
        start = stream.record()
        y = cp.empty_like(x)
        y.set(staged, stream=stream)
        y *= 2
        back = np.empty_like(host)
        y.get(stream=stream, out=back)
        end = stream.record()
    stream.synchronize()
    print(f"event elapsed sane: {cp.cuda.get_elapsed_time(start, end) >= 0}")
    close(name, "stream round trip (pinned)", back, host * 2, rtol=0, atol=0)
    finish(name, t0)


def check_numba():
    name = "numba"
    try:
        from numba import cuda
    except ImportError as e:
        skip(name, e)
    import numba
    print(f"INFO numba {numba.__version__}")
    t0 = time.perf_counter()
    if not cuda.is_available():
        fail(name, "cuda.is_available() is False")
    dev = cuda.get_current_device()
    print(f"compute capability {dev.compute_capability[0]}.{dev.compute_capability[1]}")

    @cuda.jit
    def axpy(a, x, y, out):
        i = cuda.grid(1)
        if i < out.size:
            out[i] = a * x[i] + y[i]

    @cuda.jit
    def block_sums(x, out):
        tile = cuda.shared.array(256, numba.float32)
        i = cuda.grid(1)
        tile[cuda.threadIdx.x] = x[i] if i < x.size else 0.0
        cuda.syncthreads()
        s = 128
        while s > 0:
            if cuda.threadIdx.x < s:
                tile[cuda.threadIdx.x] += tile[cuda.threadIdx.x + s]
            cuda.syncthreads()
            s //= 2
        if cuda.threadIdx.x == 0:
            cuda.atomic.add(out, 0, tile[0])

    @cuda.jit
    def histogram(values, bins):
        i = cuda.grid(1)
        if i < values.size:
            cuda.atomic.add(bins, values[i] % bins.size, 1)

    rng = np.random.default_rng(11)
    n = 1 << 20
    x = rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    dout = cuda.device_array_like(dx)
    threads = 256
    blocks = (n + threads - 1) // threads
    axpy[blocks, threads](np.float32(2.5), dx, dy, dout)
    close(name, "axpy kernel", dout.copy_to_host(), 2.5 * x + y, rtol=1e-6, atol=1e-6)
    print(f"TIME first kernel {(time.perf_counter() - t0) * 1e3:.1f} ms")

    total = cuda.to_device(np.zeros(1, np.float32))
    block_sums[blocks, threads](dx, total)
    close(name, "shared-memory block sums + atomics", total.copy_to_host()[0], x.sum(dtype=np.float64),
          rtol=1e-3, atol=1e-1)

    values = rng.integers(0, 1 << 30, n).astype(np.int64)
    bins = cuda.to_device(np.zeros(64, np.int64))
    histogram[blocks, threads](cuda.to_device(values), bins)
    close(name, "atomic histogram", bins.copy_to_host(), np.bincount(values % 64, minlength=64),
          rtol=0, atol=0)

    stream = cuda.stream()
    pinned = cuda.pinned_array(n, np.float32)
    pinned[:] = x
    ds = cuda.to_device(pinned, stream=stream)
    axpy[blocks, threads, stream](np.float32(-1.0), ds, ds, ds)
    back = cuda.pinned_array(n, np.float32)
    ds.copy_to_host(back, stream=stream)
    stream.synchronize()
    close(name, "stream with pinned arrays", back, np.zeros(n, np.float32), rtol=0, atol=0)
    free, total_mem = cuda.current_context().get_memory_info()
    print(f"memory info sane: {0 < free <= total_mem}")
    finish(name, t0)


def check_jax():
    name = "jax"
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as e:
        skip(name, e)
    print(f"INFO jax {jax.__version__}")
    t0 = time.perf_counter()
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        fail(name, f"no GPU device: {jax.devices()}")
    print(f"gpu devices: {len(gpus)}")
    jax.config.update("jax_default_matmul_precision", "highest")

    rng = np.random.default_rng(5)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    b = rng.standard_normal((512, 512)).astype(np.float32)
    ga = jax.device_put(a, gpus[0])
    gb = jax.device_put(b, gpus[0])
    close(name, "matmul", np.asarray(ga @ gb), a @ b, rtol=1e-3, atol=1e-3)
    print(f"TIME first op {(time.perf_counter() - t0) * 1e3:.1f} ms")

    @jax.jit
    def mlp(params, x):
        for w, bias in params:
            x = jnp.tanh(x @ w + bias)
        return x.sum()

    params = [(jnp.asarray(rng.standard_normal((64, 64)).astype(np.float32) * 0.1),
               jnp.zeros(64, jnp.float32)) for _ in range(3)]
    xs = jnp.asarray(rng.standard_normal((32, 64)).astype(np.float32))

    def mlp_np(params, x):
        for w, bias in params:
            x = np.tanh(x @ np.asarray(w) + np.asarray(bias))
        return x.sum()

    close(name, "jit MLP forward", float(mlp(params, xs)), mlp_np(params, np.asarray(xs)),
          rtol=1e-3, atol=1e-3)
    grads = jax.grad(mlp)(params, xs)
    g = np.asarray(grads[0][0])
    print(f"grad finite: {bool(np.isfinite(g).all())}, shape {g.shape}")

    # A training loop with lax.scan (a while loop on the device).
    @jax.jit
    def train(w, x, y):
        def step(w, _):
            loss, grad = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
            return w - 0.1 * grad, loss
        return jax.lax.scan(step, w, None, length=50)

    x = rng.standard_normal((128, 16)).astype(np.float32)
    true_w = rng.standard_normal((16, 1)).astype(np.float32)
    w, losses = train(jnp.zeros((16, 1), jnp.float32), jnp.asarray(x), jnp.asarray(x @ true_w))
    losses = np.asarray(losses)
    print(f"scan training: loss fell {bool(losses[-1] < losses[0] * 0.1)}")
    close(name, "scan training weights", np.asarray(w), true_w, rtol=0.2, atol=0.2)
    close(name, "fft", np.asarray(jnp.fft.fft(jnp.asarray(a[0]))), np.fft.fft(a[0]), rtol=1e-3, atol=1e-3)
    finish(name, t0)


def main():
    checks = {"cupy": check_cupy, "numba": check_numba, "jax": check_jax}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        print(f"usage: {sys.argv[0]} {'|'.join(checks)}", file=sys.stderr)
        sys.exit(2)
    checks[sys.argv[1]]()


if __name__ == "__main__":
    main()
