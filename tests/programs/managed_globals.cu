// managed_globals: `__managed__` variables, as tutorials and course code
// write them (a GPU program). Scalars with and without an initial value,
// arrays the host fills and kernels read and write, a struct, a variable
// sharing a page with others, host reads after synchronizing, kernels in a
// row, cudaMemcpy to and from a managed variable, and device printf of one.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define NAME "managed_globals"

#include "check.h"

__managed__ int counter = 7;
__managed__ int unset;
__managed__ float a[256], b[256], c[256];
__managed__ int big[1000 * 500];
struct Stats {
    int min, max;
    long long sum;
};
__managed__ Stats stats = {1 << 30, -(1 << 30), 0};

__global__ void add(const float *x, const float *y, float *z, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        z[i] = x[i] + y[i];
}

__global__ void bump(int by)
{
    atomicAdd(&counter, by);
    if (threadIdx.x == 0 && blockIdx.x == 0)
        unset = 41;
}

__global__ void reduce(int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        atomicMin(&stats.min, big[i]);
        atomicMax(&stats.max, big[i]);
        atomicAdd((unsigned long long *)&stats.sum, (unsigned long long)big[i]);
    }
}

__global__ void say() { printf("device sees counter %d, unset %d\n", counter, unset); }

int main()
{
    if (counter != 7 || unset != 0)
        fail("initial values %d %d", counter, unset);
    for (int i = 0; i < 256; i++) {
        a[i] = (float)i;
        b[i] = 256.0f - i;
    }
    add<<<1, 256>>>(a, b, c, 256);
    CK_LAUNCH("add");
    CK(cudaDeviceSynchronize());
    for (int i = 0; i < 256; i++)
        if (c[i] != 256.0f)
            fail("c[%d] = %f", i, c[i]);

    bump<<<4, 64>>>(2);
    bump<<<1, 32>>>(1);
    CK(cudaDeviceSynchronize());
    if (counter != 7 + 4 * 64 * 2 + 32 || unset != 41)
        fail("counter %d unset %d", counter, unset);
    counter = 100;
    say<<<1, 1>>>();
    CK(cudaDeviceSynchronize());

    const int n = 1000 * 500;
    long long want = 0;
    for (int i = 0; i < n; i++) {
        big[i] = (i * 37) % 1001 - 500;
        want += big[i];
    }
    reduce<<<(n + 255) / 256, 256>>>(n);
    CK(cudaDeviceSynchronize());
    if (stats.min != -500 || stats.max != 500 || stats.sum != want)
        fail("stats %d %d %lld (want -500 500 %lld)", stats.min, stats.max, stats.sum, want);

    int *dev = nullptr;
    CK(cudaMalloc(&dev, sizeof(int)));
    int v = 1234;
    CK(cudaMemcpy(dev, &v, sizeof v, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(&counter, dev, sizeof(int), cudaMemcpyDeviceToDevice));
    CK(cudaDeviceSynchronize());
    if (counter != 1234)
        fail("copied counter %d", counter);
    int back = 0;
    CK(cudaMemcpyFromSymbol(&back, counter, sizeof back));
    if (back != 1234)
        fail("from symbol %d", back);
    CK(cudaFree(dev));
    printf("counter %d, stats %d..%d sum %lld\n", counter, stats.min, stats.max, stats.sum);
    printf("PASS " NAME "\n");
    return 0;
}
