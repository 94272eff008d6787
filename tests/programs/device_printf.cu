// device_printf: kernel printf lines appear on stdout at the next host
// synchronization, between the host lines printed before and after it:
// cudaDeviceSynchronize, cudaStreamSynchronize, cudaEventSynchronize and a
// synchronous copy to the host. Several blocks print per batch, in a fixed
// order (each waits for its turn on a device counter), so the output is
// deterministic. stdout keeps its default buffering: when it is a pipe or a
// file, device and host lines still interleave as natively.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define NAME "device_printf"

#include "check.h"

__device__ unsigned int g_turn;

// Block b of batch `batch` prints when the counter reaches base + b.
__global__ void ordered(int batch, unsigned base)
{
    if (threadIdx.x != 0)
        return;
    volatile unsigned *turn = &g_turn;
    while (*turn != base + blockIdx.x) {
    }
    printf("device batch %d block %u of %u\n", batch, blockIdx.x, gridDim.x);
    __threadfence();
    atomicAdd(&g_turn, 1u);
}

int main()
{
    const int blocks = 4;
    unsigned base = 0;
    cudaStream_t s;
    cudaEvent_t ev;
    CK(cudaStreamCreate(&s));
    CK(cudaEventCreate(&ev));
    int *d = nullptr;
    CK(cudaMalloc(&d, sizeof(int)));

    printf("host: batch 0 (cudaDeviceSynchronize)\n");
    ordered<<<blocks, 32>>>(0, base);
    CK_LAUNCH("ordered");
    base += blocks;
    printf("host: batch 0 launched\n");
    CK(cudaDeviceSynchronize());
    printf("host: after cudaDeviceSynchronize\n");

    printf("host: batch 1 (cudaStreamSynchronize)\n");
    ordered<<<blocks, 32, 0, s>>>(1, base);
    CK_LAUNCH("ordered");
    base += blocks;
    CK(cudaStreamSynchronize(s));
    printf("host: after cudaStreamSynchronize\n");

    printf("host: batch 2 (cudaEventSynchronize)\n");
    ordered<<<blocks, 32, 0, s>>>(2, base);
    CK_LAUNCH("ordered");
    base += blocks;
    CK(cudaEventRecord(ev, s));
    CK(cudaEventSynchronize(ev));
    printf("host: after cudaEventSynchronize\n");

    printf("host: batch 3 (cudaMemcpy to the host)\n");
    ordered<<<blocks, 32>>>(3, base);
    CK_LAUNCH("ordered");
    base += blocks;
    int x = 0;
    CK(cudaMemcpy(&x, d, sizeof x, cudaMemcpyDeviceToHost));
    printf("host: after cudaMemcpy\n");

    // Two batches, one synchronization: both in launch order.
    ordered<<<2, 32>>>(4, base);
    base += 2;
    ordered<<<2, 32>>>(5, base);
    base += 2;
    CK_LAUNCH("ordered");
    CK(cudaDeviceSynchronize());
    printf("host: after two batches\n");

    unsigned turn = 0;
    CK(cudaMemcpyFromSymbol(&turn, g_turn, sizeof turn));
    if (turn != base)
        fail("the device counter is %u, expected %u", turn, base);
    CK(cudaFree(d));
    CK(cudaEventDestroy(ev));
    CK(cudaStreamDestroy(s));
    printf("PASS " NAME "\n");
    return 0;
}
