// ctx_limits: every context limit read and set (the values the driver
// reports after a set are printed: it rounds some), a 64 MiB device malloc
// heap used by a kernel with malloc and new, and a resized printf FIFO
// holding more output than the default 1 MiB would.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define NAME "ctx_limits"

#include "check.h"

struct Node {
    int value;
    Node *next;
};

// Each thread allocates `per_thread` bytes with malloc and a Node with new,
// writes them, checks them and frees them; failures are counted.
__global__ void heap_user(size_t per_thread, unsigned *failures, unsigned long long *sum)
{
    char *p = static_cast<char *>(malloc(per_thread));
    Node *n = new Node{static_cast<int>(threadIdx.x), nullptr};
    if (p == nullptr || n == nullptr) {
        atomicAdd(failures, 1u);
        return;
    }
    for (size_t i = 0; i < per_thread; i += 4096)
        p[i] = static_cast<char>(i / 4096 + threadIdx.x);
    unsigned long long s = 0;
    for (size_t i = 0; i < per_thread; i += 4096)
        s += static_cast<unsigned char>(p[i]);
    atomicAdd(sum, s + static_cast<unsigned long long>(n->value));
    free(p);
    delete n;
}

__global__ void chatty(int lines)
{
    for (int i = 0; i < lines; i++)
        printf("printf fifo line %05d: 0123456789abcdef0123456789abcdef0123456789abcdef\n", i);
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    struct { cudaLimit limit; const char *name; size_t set; } all[] = {
        {cudaLimitStackSize, "StackSize", 4096},
        {cudaLimitPrintfFifoSize, "PrintfFifoSize", 4 << 20},
        {cudaLimitMallocHeapSize, "MallocHeapSize", 64 << 20},
        {cudaLimitDevRuntimeSyncDepth, "DevRuntimeSyncDepth", 2},
        {cudaLimitDevRuntimePendingLaunchCount, "DevRuntimePendingLaunchCount", 4096},
        {cudaLimitMaxL2FetchGranularity, "MaxL2FetchGranularity", 128},
        {cudaLimitPersistingL2CacheSize, "PersistingL2CacheSize", 1 << 20},
    };
    for (auto &l : all) {
        size_t before = 0, after = 0;
        cudaError_t got = cudaDeviceGetLimit(&before, l.limit);
        // DevRuntimeSyncDepth is gone on Hopper with CUDA 13: reported,
        // not a failure.
        if (got == cudaErrorUnsupportedLimit) {
            (void)cudaGetLastError();
            printf("limit %-28s unsupported\n", l.name);
            continue;
        }
        CK(got);
        cudaError_t e = cudaDeviceSetLimit(l.limit, l.set);
        CK(cudaDeviceGetLimit(&after, l.limit));
        printf("limit %-28s default %-10zu set %-10zu -> %-28s now %zu\n", l.name, before, l.set,
               cudaGetErrorName(e), after);
    }
    size_t heap = 0;
    CK(cudaDeviceGetLimit(&heap, cudaLimitMallocHeapSize));
    if (heap < (64u << 20))
        fail("malloc heap is %zu bytes after setting 64 MiB", heap);

    // 256 threads x 128 KiB = 32 MiB: more than the default 8 MiB heap.
    unsigned *failures = nullptr;
    unsigned long long *sum = nullptr;
    CK(cudaMalloc(&failures, sizeof *failures));
    CK(cudaMalloc(&sum, sizeof *sum));
    CK(cudaMemset(failures, 0, sizeof *failures));
    CK(cudaMemset(sum, 0, sizeof *sum));
    const size_t per_thread = 128 << 10;
    heap_user<<<2, 128>>>(per_thread, failures, sum);
    CK_LAUNCH("heap_user");
    CK(cudaDeviceSynchronize());
    unsigned f = 0;
    unsigned long long got = 0, want = 0;
    CK(cudaMemcpy(&f, failures, sizeof f, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(&got, sum, sizeof got, cudaMemcpyDeviceToHost));
    for (unsigned t = 0; t < 256; t++) {
        unsigned tid = t % 128;
        for (size_t i = 0; i < per_thread; i += 4096)
            want += static_cast<unsigned char>(static_cast<char>(i / 4096 + tid));
        want += tid;
    }
    if (f != 0 || got != want)
        fail("device heap: %u allocation failures, sum %llu, expected %llu", f, got, want);
    printf("device malloc/new of 32 MiB in a 64 MiB heap ok\n");

    // ~1.9 MiB of printf output fits the 4 MiB FIFO (the default 1 MiB would drop lines).
    chatty<<<1, 1>>>(20000);
    CK_LAUNCH("chatty");
    CK(cudaDeviceSynchronize());
    printf("PASS " NAME "\n");
    return 0;
}
