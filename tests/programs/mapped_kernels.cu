// mapped_kernels: kernels on mapped host memory (zero-copy), as programs
// and libraries use it: a vector add whose inputs and output are mapped
// host memory (through cudaHostGetDevicePointer and through the host
// pointer itself under unified addressing), a status word a kernel writes
// on a non-blocking stream and the host reads after synchronizing it (how
// cuDNN reports a run's status), a flag the host sets between launches, and
// registered memory. Every element is compared with the CPU.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define NAME "mapped_kernels"

#include "check.h"

__global__ void vadd(const float *a, const float *b, float *c, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        c[i] = a[i] + b[i];
}

// Writes how many elements of `x` are negative into `*status`.
__global__ void count_negative(const float *x, int n, int *status)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && x[i] < 0.0f)
        atomicAdd(status, 1);
}

// Scales `x` by the factor the host left in `*factor`.
__global__ void scale_by(float *x, int n, const float *factor)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        x[i] *= *factor;
}

static void check_sum(const char *what, const float *a, const float *b, const float *c, int n)
{
    for (int i = 0; i < n; i++)
        if (c[i] != a[i] + b[i])
            fail("%s: element %d is %g, expected %g", what, i, c[i], a[i] + b[i]);
    printf("%s: %d elements ok\n", what, n);
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    int can_map = 0;
    CK(cudaDeviceGetAttribute(&can_map, cudaDevAttrCanMapHostMemory, 0));
    if (!can_map)
        fail("the device cannot map host memory");

    const int n = 1 << 20;
    const size_t bytes = n * sizeof(float);
    float *a, *b, *c;
    CK(cudaHostAlloc(&a, bytes, cudaHostAllocMapped));
    CK(cudaHostAlloc(&b, bytes, cudaHostAllocMapped));
    CK(cudaHostAlloc(&c, bytes, cudaHostAllocMapped));
    for (int i = 0; i < n; i++) {
        a[i] = (float)(i % 1000) * 0.5f;
        b[i] = (float)(i % 777) * 0.25f - 50.0f;
        c[i] = -1.0f;
    }

    // Through the device pointers.
    float *da, *db, *dc;
    CK(cudaHostGetDevicePointer((void **)&da, a, 0));
    CK(cudaHostGetDevicePointer((void **)&db, b, 0));
    CK(cudaHostGetDevicePointer((void **)&dc, c, 0));
    vadd<<<(n + 255) / 256, 256>>>(da, db, dc, n);
    CK_LAUNCH("vadd");
    CK(cudaDeviceSynchronize());
    check_sum("zero-copy vector add (device pointers)", a, b, c, n);

    // Through the host pointers (unified addressing), new inputs.
    for (int i = 0; i < n; i++)
        a[i] = (float)(i % 321);
    vadd<<<(n + 255) / 256, 256>>>(a, b, c, n);
    CK_LAUNCH("vadd");
    CK(cudaDeviceSynchronize());
    check_sum("zero-copy vector add (host pointers)", a, b, c, n);

    // A status word on a non-blocking stream, read after its synchronize.
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    int *status;
    CK(cudaHostAlloc(&status, sizeof *status, cudaHostAllocMapped));
    float *x;
    CK(cudaMalloc(&x, bytes));
    CK(cudaMemcpy(x, b, bytes, cudaMemcpyHostToDevice));
    int want = 0;
    for (int i = 0; i < n; i++)
        want += b[i] < 0.0f;
    for (int round = 0; round < 3; round++) {
        *status = 0;
        count_negative<<<(n + 255) / 256, 256, 0, s>>>(x, n, status);
        CK_LAUNCH("count_negative");
        CK(cudaStreamSynchronize(s));
        if (*status != want)
            fail("status word round %d: %d, expected %d", round, *status, want);
    }
    printf("status word: %d negative elements, 3 rounds\n", want);

    // A factor the host sets between launches, read by the kernel.
    float *factor;
    CK(cudaHostAlloc(&factor, sizeof *factor, cudaHostAllocMapped));
    *factor = 2.0f;
    scale_by<<<(n + 255) / 256, 256, 0, s>>>(x, n, factor);
    CK_LAUNCH("scale_by");
    CK(cudaStreamSynchronize(s));
    *factor = 0.5f;
    scale_by<<<(n + 255) / 256, 256, 0, s>>>(x, n, factor);
    CK_LAUNCH("scale_by");
    CK(cudaMemcpyAsync(c, x, bytes, cudaMemcpyDeviceToHost, s));
    CK(cudaStreamSynchronize(s));
    for (int i = 0; i < n; i++)
        if (c[i] != b[i])
            fail("scaled twice: element %d is %g, expected %g", i, c[i], b[i]);
    printf("host-set factor: ok\n");

    // Registered memory.
    float *mine = (float *)aligned_alloc(4096, bytes);
    for (int i = 0; i < n; i++)
        mine[i] = 1.0f;
    CK(cudaHostRegister(mine, bytes, cudaHostRegisterMapped));
    float *dmine;
    CK(cudaHostGetDevicePointer((void **)&dmine, mine, 0));
    vadd<<<(n + 255) / 256, 256>>>(dmine, b, dmine, n);
    CK_LAUNCH("vadd");
    CK(cudaDeviceSynchronize());
    for (int i = 0; i < n; i++)
        if (mine[i] != 1.0f + b[i])
            fail("registered: element %d is %g, expected %g", i, mine[i], 1.0f + b[i]);
    printf("registered memory: ok\n");
    CK(cudaHostUnregister(mine));
    free(mine);

    CK(cudaFree(x));
    CK(cudaFreeHost(status));
    CK(cudaFreeHost(factor));
    CK(cudaFreeHost(a));
    CK(cudaFreeHost(b));
    CK(cudaFreeHost(c));
    CK(cudaStreamDestroy(s));
    printf("PASS " NAME "\n");
    return 0;
}
