// launch_config: bad launch configurations fail at the launch, as the
// driver checks them, and latch nothing: for each, the error of the launch
// (cudaGetLastError) and of the next cudaDeviceSynchronize are printed by
// name; then a good launch computes the right result. Through gpupool the
// checks run on the client (device attributes from the handshake, the
// kernel's attributes from its module load), so the output must match a
// native run line for line.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define NAME "launch_config"

#include "check.h"

__global__ void fill(int *out, int value)
{
    int i = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0 && i < 64)
        out[i] = value;
}

// Register-limited: at most 256 threads a block.
__global__ void __launch_bounds__(256) bounded(int *out)
{
    if (threadIdx.x == 0)
        out[0] = 1;
}

__global__ void with_shared(int *out)
{
    extern __shared__ int smem[];
    smem[threadIdx.x] = threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0)
        out[0] = smem[blockDim.x - 1];
}

static void report(const char *what)
{
    cudaError_t launch = cudaGetLastError();
    cudaError_t sync = cudaDeviceSynchronize();
    printf("%-34s launch %-32s sync %s\n", what, cudaGetErrorName(launch), cudaGetErrorName(sync));
    if (sync != cudaSuccess)
        fail("%s: the bad launch latched %s", what, cudaGetErrorName(sync));
    if (launch == cudaSuccess)
        fail("%s: the launch succeeded", what);
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    int *d = nullptr;
    CK(cudaMalloc(&d, 64 * sizeof(int)));
    CK(cudaMemset(d, 0, 64 * sizeof(int)));

    fill<<<1, 4096>>>(d, 1);
    report("block of 4096 threads");
    fill<<<1, dim3(1, 1, 65)>>>(d, 1);
    report("block z of 65");
    fill<<<1, dim3(2048, 1, 1)>>>(d, 1);
    report("block x of 2048");
    fill<<<dim3(1, 65536, 1), 1>>>(d, 1);
    report("grid y of 65536");
    fill<<<dim3(1, 1, 65536), 1>>>(d, 1);
    report("grid z of 65536");
    fill<<<0, 32>>>(d, 1);
    report("grid of 0");
    bounded<<<1, 512>>>(d);
    report("512 threads, __launch_bounds__(256)");
    with_shared<<<1, 32, (48 << 10) + 4>>>(d);
    report("dynamic smem 48 KiB + 4, no opt-in");
    with_shared<<<1, 32, 300 << 10>>>(d);
    report("dynamic smem 300 KiB");
    CK(cudaFuncSetAttribute(with_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10));
    with_shared<<<1, 32, (64 << 10) + 4>>>(d);
    report("dynamic smem over the raised 64 KiB");

    // Good launches after all that.
    with_shared<<<1, 32, 64 << 10>>>(d);
    CK_LAUNCH("with_shared");
    CK(cudaDeviceSynchronize());
    int first = 0;
    CK(cudaMemcpy(&first, d, sizeof first, cudaMemcpyDeviceToHost));
    if (first != 31)
        fail("with_shared wrote %d, expected 31", first);
    fill<<<dim3(4, 4, 4), dim3(8, 8, 16)>>>(d, 7);
    CK_LAUNCH("fill");
    int h[64];
    CK(cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost));
    for (int i = 0; i < 64; i++)
        if (h[i] != 7)
            fail("fill: element %d is %d", i, h[i]);
    printf("good launches ok\n");
    CK(cudaFree(d));
    printf("PASS " NAME "\n");
    return 0;
}
