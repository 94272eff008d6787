// vector_add: the smallest real CUDA program. 1M-element float add, every
// element compared exactly with the CPU (the inputs are exactly representable
// and one IEEE add rounds identically on both), checksum printed.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#define NAME "vector_add"

#include "check.h"

__global__ void vadd(const float *a, const float *b, float *c, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        c[i] = a[i] + b[i];
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const int n = 1 << 20;
    const size_t bytes = n * sizeof(float);
    std::vector<float> a(n), b(n), c(n, -1.0f);
    for (int i = 0; i < n; i++) {
        a[i] = (float)(i % 1000) * 0.5f;
        b[i] = (float)(i % 777) * 0.25f - 50.0f;
    }

    float *da, *db, *dc;
    CK(cudaMalloc(&da, bytes));
    CK(cudaMalloc(&db, bytes));
    CK(cudaMalloc(&dc, bytes));
    CK(cudaMemcpy(da, a.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, b.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemset(dc, 0xFF, bytes)); // NaNs: a skipped element cannot pass

    const int block = 256;
    vadd<<<(n + block - 1) / block, block>>>(da, db, dc, n);
    CK_LAUNCH("vadd");
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(c.data(), dc, bytes, cudaMemcpyDeviceToHost));

    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        float want = a[i] + b[i];
        if (c[i] != want)
            fail("c[%d] = %.9g, expected %.9g", i, (double)c[i], (double)want);
        sum += c[i];
    }
    printf("n %d, checksum %.3f\n", n, sum);

    CK(cudaFree(da));
    CK(cudaFree(db));
    CK(cudaFree(dc));
    printf("PASS " NAME "\n");
    return 0;
}
