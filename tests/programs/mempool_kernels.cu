// mempool_kernels: kernels over cudaMallocAsync buffers on two streams (a
// GPU program). Stream 1 allocates and fills, stream 2 waits on an event,
// transforms into its own stream-ordered buffer and frees stream 1's buffer;
// many rounds, so freed blocks are reused within and across streams. Every
// round is checked against the CPU; the pool must end with nothing in use.
//
// Everything printed is deterministic.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define NAME "mempool_kernels"

#include "check.h"

constexpr int kBlock = 256;

__global__ void fill(unsigned *v, unsigned seed, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        v[i] = (unsigned)i * 2654435761u + seed;
}

__global__ void transform(const unsigned *in, unsigned *out, unsigned k, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = (in[i] ^ k) * 2246822519u + in[(i + 1) % n];
}

static unsigned cpu_fill(int i, unsigned seed)
{
    return (unsigned)i * 2654435761u + seed;
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    int supported = 0;
    CK(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, 0));
    if (!supported)
        fail("memory pools not supported");

    cudaMemPool_t pool;
    CK(cudaDeviceGetDefaultMemPool(&pool, 0));
    uint64_t threshold = 256u << 20;
    CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold,
                               &threshold));

    cudaStream_t s1, s2;
    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    cudaEvent_t filled;
    CK(cudaEventCreateWithFlags(&filled, cudaEventDisableTiming));

    const int max_n = (1 << 18) + 7;
    unsigned *host;
    CK(cudaMallocHost(&host, max_n * sizeof(unsigned)));
    unsigned long long checked = 0;
    unsigned summary = 0;
    for (int round = 0; round < 64; round++) {
        // Sizes vary so blocks of several sizes are cached and reused.
        int n = (round % 4 == 0) ? max_n : (1 << (12 + round % 6)) + round;
        size_t bytes = n * sizeof(unsigned);
        int grid = (n + kBlock - 1) / kBlock;
        unsigned seed = 1000u + round, k = 0x9e3779b9u * (round + 1);

        unsigned *a = nullptr, *b = nullptr;
        CK(cudaMallocAsync(&a, bytes, s1));
        fill<<<grid, kBlock, 0, s1>>>(a, seed, n);
        CK_LAUNCH("fill");
        CK(cudaEventRecord(filled, s1));
        CK(cudaStreamWaitEvent(s2, filled, 0));
        CK(cudaMallocAsync(&b, bytes, s2));
        transform<<<grid, kBlock, 0, s2>>>(a, b, k, n);
        CK_LAUNCH("transform");
        CK(cudaFreeAsync(a, s2));
        CK(cudaMemcpyAsync(host, b, bytes, cudaMemcpyDeviceToHost, s2));
        CK(cudaFreeAsync(b, s2));
        if (round % 8 == 7)
            CK(cudaDeviceSynchronize());
        else
            CK(cudaStreamSynchronize(s2));

        for (int i = 0; i < n; i++) {
            unsigned in = cpu_fill(i, seed), next = cpu_fill((i + 1) % n, seed);
            unsigned want = (in ^ k) * 2246822519u + next;
            if (host[i] != want)
                fail("round %d: element %d of %d is %u, expected %u", round,
                     i, n, host[i], want);
            summary = (summary ^ host[i]) * 16777619u;
        }
        checked += n;
    }

    CK(cudaDeviceSynchronize());
    uint64_t used = 1;
    CK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used));
    if (used != 0)
        fail("the pool still has %llu bytes in use", (unsigned long long)used);
    CK(cudaMemPoolTrimTo(pool, 0));
    uint64_t reserved = 1;
    CK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent,
                               &reserved));
    if (reserved != 0)
        fail("trim left %llu bytes reserved", (unsigned long long)reserved);
    printf("64 rounds on 2 streams, %llu values checked, summary %08x\n",
           checked, summary);

    CK(cudaEventDestroy(filled));
    CK(cudaStreamDestroy(s1));
    CK(cudaStreamDestroy(s2));
    CK(cudaFreeHost(host));
    printf("PASS " NAME "\n");
    return 0;
}
