// device_assert: a kernel whose assert() fails, as CUDA's assert example
// does: the launch itself succeeds, the next synchronization reports
// cudaErrorAssert, the error is sticky (later calls report it too), and
// cudaDeviceReset gives the process a fresh context in which work runs
// again. Every status is printed, so native and gpupool runs must agree on
// each step, not only on the end.
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

    report("device reset", cudaDeviceReset());
    report("last error after reset", cudaGetLastError());
    run_clean("after the reset");
    printf("PASS " NAME "\n");
    return 0;
}
