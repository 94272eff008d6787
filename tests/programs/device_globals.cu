// device_globals: module-scope __device__ variables and __constant__ arrays,
// written and read through the runtime's symbol API (cudaMemcpyToSymbol with
// and without an offset, cudaMemcpyFromSymbol, cudaGetSymbolAddress,
// cudaGetSymbolSize) and by kernels. The runtime resolves these through the
// driver's module globals (cuModuleGetGlobal), so a stub must map them.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#define NAME "device_globals"

#include "check.h"

constexpr int kTable = 256;

__device__ float g_scale;
__device__ unsigned int g_counter;
__device__ int g_max;
__device__ float g_table[kTable];
__constant__ float c_coeffs[16];
__constant__ int c_offsets[4];

__global__ void apply(const float *in, float *out, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = in[i] * g_scale + c_coeffs[i % 16] + g_table[i % kTable] +
                 (float)c_offsets[i % 4];
        atomicAdd(&g_counter, 1u);
        atomicMax(&g_max, (int)out[i]);
    }
}

// Writes a __device__ array from the kernel side, for cudaMemcpyFromSymbol.
__global__ void square_table()
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < kTable)
        g_table[i] = g_table[i] * g_table[i];
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const int n = 50000;

    float scale = 2.0f;
    float coeffs[16];
    for (int k = 0; k < 16; k++)
        coeffs[k] = (float)k * 0.25f;
    int offsets[4] = {1, 2, 3, 4};
    const int offsets_hi[2] = {300, 400}; // overwrite elements 2 and 3
    std::vector<float> table(kTable);
    for (int j = 0; j < kTable; j++)
        table[j] = (float)(j % 32) * 0.125f;
    const unsigned int zero = 0;
    const int minus_one = -1;

    CK(cudaMemcpyToSymbol(g_scale, &scale, sizeof scale));
    CK(cudaMemcpyToSymbol(c_coeffs, coeffs, sizeof coeffs));
    CK(cudaMemcpyToSymbol(c_offsets, offsets, sizeof offsets));
    CK(cudaMemcpyToSymbol(c_offsets, offsets_hi, sizeof offsets_hi,
                          2 * sizeof(int)));
    offsets[2] = offsets_hi[0];
    offsets[3] = offsets_hi[1];
    CK(cudaMemcpyToSymbol(g_counter, &zero, sizeof zero));
    CK(cudaMemcpyToSymbol(g_max, &minus_one, sizeof minus_one));

    // g_table through its device address, like any allocation.
    float *table_ptr = nullptr;
    size_t table_size = 0;
    CK(cudaGetSymbolAddress((void **)&table_ptr, g_table));
    CK(cudaGetSymbolSize(&table_size, g_table));
    if (table_ptr == nullptr || table_size != kTable * sizeof(float))
        fail("g_table: address %p, size %zu (expected %zu)", (void *)table_ptr,
             table_size, kTable * sizeof(float));
    CK(cudaMemcpy(table_ptr, table.data(), table_size, cudaMemcpyHostToDevice));

    // Read back what was written, before any kernel runs.
    int offsets_back[4];
    float coeffs_back[16];
    CK(cudaMemcpyFromSymbol(offsets_back, c_offsets, sizeof offsets_back));
    CK(cudaMemcpyFromSymbol(coeffs_back, c_coeffs, sizeof coeffs_back));
    for (int k = 0; k < 4; k++)
        if (offsets_back[k] != offsets[k])
            fail("c_offsets[%d] = %d, expected %d", k, offsets_back[k],
                 offsets[k]);
    for (int k = 0; k < 16; k++)
        if (coeffs_back[k] != coeffs[k])
            fail("c_coeffs[%d] = %g, expected %g", k, (double)coeffs_back[k],
                 (double)coeffs[k]);

    std::vector<float> in(n), out(n);
    for (int i = 0; i < n; i++)
        in[i] = (float)(i % 100) * 0.5f;
    float *din, *dout;
    CK(cudaMalloc(&din, n * sizeof(float)));
    CK(cudaMalloc(&dout, n * sizeof(float)));
    CK(cudaMemcpy(din, in.data(), n * sizeof(float), cudaMemcpyHostToDevice));

    apply<<<(n + 255) / 256, 256>>>(din, dout, n);
    CK_LAUNCH("apply");
    square_table<<<1, kTable>>>();
    CK_LAUNCH("square_table");
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(out.data(), dout, n * sizeof(float), cudaMemcpyDeviceToHost));

    double sum = 0.0;
    int want_max = -1;
    for (int i = 0; i < n; i++) {
        const float want = in[i] * scale + coeffs[i % 16] + table[i % kTable] +
                           (float)offsets[i % 4];
        if (out[i] != want)
            fail("out[%d] = %.9g, expected %.9g", i, (double)out[i],
                 (double)want);
        sum += out[i];
        if ((int)want > want_max)
            want_max = (int)want;
    }

    unsigned int counter = 0;
    int max = 0;
    std::vector<float> squared(kTable);
    CK(cudaMemcpyFromSymbol(&counter, g_counter, sizeof counter));
    CK(cudaMemcpyFromSymbol(&max, g_max, sizeof max));
    // With an offset: elements [128, 256) only, then [0, 128).
    CK(cudaMemcpyFromSymbol(squared.data() + 128, g_table,
                            128 * sizeof(float), 128 * sizeof(float)));
    CK(cudaMemcpyFromSymbol(squared.data(), g_table, 128 * sizeof(float)));
    if (counter != (unsigned int)n)
        fail("g_counter = %u, expected %d", counter, n);
    if (max != want_max)
        fail("g_max = %d, expected %d", max, want_max);
    double table_sum = 0.0;
    for (int j = 0; j < kTable; j++) {
        if (squared[j] != table[j] * table[j])
            fail("g_table[%d] = %g, expected %g", j, (double)squared[j],
                 (double)(table[j] * table[j]));
        table_sum += squared[j];
    }
    printf("out checksum %.4f, counter %u, max %d, squared table sum %.6f\n",
           sum, counter, max, table_sum);

    CK(cudaFree(din));
    CK(cudaFree(dout));
    printf("PASS " NAME "\n");
    return 0;
}
