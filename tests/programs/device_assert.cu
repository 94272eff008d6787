// device_assert: a kernel whose assert() fails, as CUDA's assert example
// does: the launch itself succeeds, the next synchronization reports
// cudaErrorAssert, the error is sticky (later calls report it too); then
// cudaDeviceReset and what work after it gives. Every status is printed,
// so native and gpupool runs must agree on each step, not only on the end.
#include <cuda_runtime.h>

#include <cassert>
#include <cstdio>

#define NAME "device_assert"

#include "check.h"

__global__ void checked_store(int limit, int *out)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    assert(i < limit);
    out[i] = 2 * i;
}

static void report(const char *what, cudaError_t e)
{
    printf("%s: %s\n", what, cudaGetErrorName(e));
}

static void run_clean(const char *when)
{
    const int n = 256;
    int *d = nullptr, h[n];
    CK(cudaMalloc(&d, n * sizeof(int)));
    checked_store<<<2, 128>>>(n, d);
    CK_LAUNCH("checked_store");
    CK(cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; i++)
        if (h[i] != 2 * i) fail("%s: out[%d] = %d", when, i, h[i]);
    CK(cudaFree(d));
    printf("%s: %d stores checked\n", when, n);
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    run_clean("before the assert");

    int *d = nullptr;
    CK(cudaMalloc(&d, 256 * sizeof(int)));
    checked_store<<<2, 128>>>(100, d); // threads 100..255 assert
    report("launch", cudaGetLastError());
    report("synchronize", cudaDeviceSynchronize());
    report("last error", cudaGetLastError());
    report("peek after", cudaPeekAtLastError());
    void *more = nullptr;
    report("allocation after the fault", cudaMalloc(&more, 1024));
    report("synchronize again", cudaDeviceSynchronize());

    // CUDA documents the process as unusable after an assert; what a reset
    // gives back is printed, not assumed.
    report("device reset", cudaDeviceReset());
    report("last error after reset", cudaGetLastError());
    int *again = nullptr;
    cudaError_t e = cudaMalloc(&again, 256 * sizeof(int));
    report("allocation after the reset", e);
    if (e == cudaSuccess) {
        checked_store<<<2, 128>>>(256, again);
        report("launch after the reset", cudaGetLastError());
        int h[256];
        e = cudaMemcpy(h, again, sizeof h, cudaMemcpyDeviceToHost);
        report("copy after the reset", e);
        if (e == cudaSuccess) {
            for (int i = 0; i < 256; i++)
                if (h[i] != 2 * i) fail("after the reset: out[%d] = %d", i, h[i]);
            printf("after the reset: 256 stores checked\n");
        }
    }
    printf("PASS " NAME "\n");
    return 0;
}
