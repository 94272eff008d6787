// gpupool built-in kernels (module image "gpupool-builtin-kernels/v1").
// Compiled with NVRTC on CUDA servers; the emulated device runs reference
// implementations with the same parameter layouts and thread mapping.

extern "C" __global__ void empty() {}

extern "C" __global__ void vector_add(const float* a, const float* b, float* c, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}

extern "C" __global__ void saxpy(float alpha, const float* x, float* y, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = alpha * x[i] + y[i];
}

// C[M x N] = A[M x K] * B[K x N], row-major; one thread per element of C.
extern "C" __global__ void matmul_f32(const float* A, const float* B, float* C,
                                      unsigned M, unsigned N, unsigned K) {
    unsigned row = blockIdx.y * blockDim.y + threadIdx.y;
    unsigned col = blockIdx.x * blockDim.x + threadIdx.x;
    if (row < M && col < N) {
        float acc = 0.0f;
        for (unsigned k = 0; k < K; ++k) acc += A[row * K + k] * B[k * N + col];
        C[row * N + col] = acc;
    }
}

// Device printf: every thread prints one line. The emulated device buffers
// the lines like the driver's printf FIFO and writes them to stdout at the
// next synchronization, block by block, thread by thread.
extern "C" __global__ void print_ids(unsigned tag) {
    printf("gpupool printf %u: block %u thread %u\n", tag, blockIdx.x, threadIdx.x);
}

// A module variable (for lookups, copies and migration of module variables):
// every thread of `tally_add` adds `value` to it.
extern "C" __device__ unsigned long long tally;

extern "C" __global__ void tally_add(unsigned long long value) {
    atomicAdd(&tally, value);
}

// A device assert: every thread whose x index is `limit` or more fails it.
// The driver prints each failing thread's message on stderr (file, line and
// function as NVRTC saw them) and the launch ends the context with
// CUDA_ERROR_ASSERT. NVRTC declares `assert` itself (it has no <assert.h>);
// the emulated device prints the same message.
extern "C" __global__ void check_below(unsigned limit) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    assert(i < limit);
}
