// dynamic_parallelism: kernels that launch kernels (CUDA dynamic
// parallelism, built with -rdc=true and linked with cudadevrt): one child
// grid per parent block filling its slice, a recursion eight launches deep,
// a tail launch that sums what the parent's children wrote (it runs only
// after they completed), fire-and-forget children, a child's printf, and a
// parent launched again after device-side launches completed (the driver's
// pending-launch pool reused). Every word is checked on the host.
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#define NAME "dynamic_parallelism"

#include "check.h"

__global__ void child_fill(int *out, int base, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[base + i] = (base + i) * 3 + 1;
}

__global__ void parent(int *out, int per_block)
{
    if (threadIdx.x == 0)
        child_fill<<<(per_block + 127) / 128, 128>>>(out, blockIdx.x * per_block, per_block);
}

__global__ void recurse(int *marks, int depth)
{
    if (threadIdx.x == 0) {
        marks[depth] = depth * 10 + 7;
        if (depth > 0)
            recurse<<<1, 32>>>(marks, depth - 1);
    }
}

__global__ void sum_after(const int *data, int n, long long *sum)
{
    long long s = 0;
    for (int i = 0; i < n; ++i)
        s += data[i];
    *sum = s;
}

__global__ void fill_then_sum(int *data, int n, long long *sum)
{
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        child_fill<<<(n + 255) / 256, 256>>>(data, 0, n);
        sum_after<<<1, 1, 0, cudaStreamTailLaunch>>>(data, n, sum);
    }
}

__global__ void set_flag(int *flags, int who)
{
    flags[who] = who + 100;
}

__global__ void forget(int *flags)
{
    if (threadIdx.x == 0)
        set_flag<<<1, 1, 0, cudaStreamFireAndForget>>>(flags, blockIdx.x);
}

__global__ void say(int blocks)
{
    printf("child says: the parent had %d blocks\n", blocks);
}

__global__ void parent_says()
{
    if (threadIdx.x == 0 && blockIdx.x == 0)
        say<<<1, 1>>>(gridDim.x);
}

int main()
{
    constexpr int blocks = 64, per_block = 1000, n = blocks * per_block;
    int *out, *marks, *flags;
    long long *sum;
    CK(cudaMalloc(&out, n * sizeof(int)));
    CK(cudaMalloc(&marks, 8 * sizeof(int)));
    CK(cudaMalloc(&flags, blocks * sizeof(int)));
    CK(cudaMalloc(&sum, sizeof(long long)));

    // A child grid per parent block; launched twice, the second time over
    // zeroed memory, so both rounds of device-side launches are seen.
    for (int round = 0; round < 2; ++round) {
        CK(cudaMemset(out, 0, n * sizeof(int)));
        parent<<<blocks, 32>>>(out, per_block);
        CK_LAUNCH("parent");
        CK(cudaDeviceSynchronize());
        std::vector<int> host(n);
        CK(cudaMemcpy(host.data(), out, n * sizeof(int), cudaMemcpyDeviceToHost));
        for (int i = 0; i < n; ++i)
            if (host[i] != i * 3 + 1)
                fail("round %d: out[%d] = %d, expected %d", round, i, host[i], i * 3 + 1);
    }
    printf("children of %d parent blocks filled %d words, twice\n", blocks, n);

    CK(cudaMemset(marks, 0, 8 * sizeof(int)));
    recurse<<<1, 32>>>(marks, 7);
    CK_LAUNCH("recurse");
    CK(cudaDeviceSynchronize());
    int m[8];
    CK(cudaMemcpy(m, marks, sizeof m, cudaMemcpyDeviceToHost));
    for (int d = 0; d < 8; ++d)
        if (m[d] != d * 10 + 7)
            fail("recursion level %d wrote %d, expected %d", d, m[d], d * 10 + 7);
    printf("recursion 8 launches deep: every level wrote its mark\n");

    CK(cudaMemset(out, 0, n * sizeof(int)));
    CK(cudaMemset(sum, 0, sizeof(long long)));
    fill_then_sum<<<1, 32>>>(out, n, sum);
    CK_LAUNCH("fill_then_sum");
    long long got = 0, want = 0;
    CK(cudaMemcpy(&got, sum, sizeof got, cudaMemcpyDeviceToHost));
    for (long long i = 0; i < n; ++i)
        want += i * 3 + 1;
    if (got != want)
        fail("tail launch summed %lld, expected %lld", got, want);
    printf("tail launch after the children: sum %lld\n", got);

    CK(cudaMemset(flags, 0, blocks * sizeof(int)));
    forget<<<blocks, 32>>>(flags);
    CK_LAUNCH("forget");
    CK(cudaDeviceSynchronize());
    std::vector<int> f(blocks);
    CK(cudaMemcpy(f.data(), flags, blocks * sizeof(int), cudaMemcpyDeviceToHost));
    for (int b = 0; b < blocks; ++b)
        if (f[b] != b + 100)
            fail("fire-and-forget child of block %d wrote %d", b, f[b]);
    printf("fire-and-forget children of %d blocks all ran\n", blocks);

    parent_says<<<3, 32>>>();
    CK_LAUNCH("parent_says");
    CK(cudaDeviceSynchronize());
    fflush(stdout);

    CK(cudaFree(out));
    CK(cudaFree(marks));
    CK(cudaFree(flags));
    CK(cudaFree(sum));
    printf("PASS " NAME "\n");
    return 0;
}
