// matmul_tiled: tiled SGEMM C = A * B (512 x 384 x 256) whose tiles live in
// *dynamic* shared memory (extern __shared__, size given at launch), run with
// three tile shapes; the largest needs more than the default 48 KiB and so
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize).
//
// The inputs are multiples of 1/8 in [-1, 1], so every product and partial
// sum is exact in float: any summation order gives the same bits, the result
// is compared exactly with the CPU reference (well within any tolerance), and
// the checksums are identical on every GPU and build.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define NAME "matmul_tiled"

#include "check.h"

// Block (T, T) computes a T x T tile of C; each step stages a T x kt slab of
// A and a kt x T slab of B in shared memory.
__global__ void sgemm_tiled(const float *A, const float *B, float *C, int M,
                            int N, int K, int kt)
{
    extern __shared__ float smem[];
    const int T = blockDim.x;
    float *As = smem;          // T x kt
    float *Bs = smem + T * kt; // kt x T
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * T + ty, col = blockIdx.x * T + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += kt) {
        for (int k = tx; k < kt; k += T)
            As[ty * kt + k] =
                (row < M && k0 + k < K) ? A[row * K + k0 + k] : 0.0f;
        for (int k = ty; k < kt; k += T)
            Bs[k * T + tx] =
                (col < N && k0 + k < K) ? B[(k0 + k) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < kt; k++)
            acc += As[ty * kt + k] * Bs[k * T + tx];
        __syncthreads();
    }
    if (row < M && col < N)
        C[row * N + col] = acc;
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const int M = 512, N = 384, K = 256;
    std::vector<float> A((size_t)M * K), B((size_t)K * N), C((size_t)M * N),
        ref((size_t)M * N);
    for (size_t i = 0; i < A.size(); i++)
        A[i] = (float)((int)((i * 7 + 3) % 17) - 8) / 8.0f;
    for (size_t i = 0; i < B.size(); i++)
        B[i] = (float)((int)((i * 5 + 1) % 13) - 6) / 8.0f;
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++)
                acc += (double)A[(size_t)r * K + k] * B[(size_t)k * N + c];
            ref[(size_t)r * N + c] = (float)acc;
        }

    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));

    float *dA, *dB, *dC;
    CK(cudaMalloc(&dA, A.size() * sizeof(float)));
    CK(cudaMalloc(&dB, B.size() * sizeof(float)));
    CK(cudaMalloc(&dC, C.size() * sizeof(float)));
    CK(cudaMemcpy(dA, A.data(), A.size() * sizeof(float),
                  cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dB, B.data(), B.size() * sizeof(float),
                  cudaMemcpyHostToDevice));

    static const struct {
        int T, kt;
    } shapes[] = {{16, 16}, {32, 32}, {32, 256}};
    for (const auto &s : shapes) {
        const size_t smem = 2 * (size_t)s.T * s.kt * sizeof(float);
        if (smem > prop.sharedMemPerBlock) {
            if (smem > prop.sharedMemPerBlockOptin) {
                printf("tile %dx%d: %zu bytes of shared memory exceed the "
                       "opt-in limit, skipped\n",
                       s.T, s.kt, smem);
                continue;
            }
            CK(cudaFuncSetAttribute(sgemm_tiled,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)smem));
        }
        CK(cudaMemset(dC, 0xFF, C.size() * sizeof(float)));
        dim3 block(s.T, s.T), grid((N + s.T - 1) / s.T, (M + s.T - 1) / s.T);
        sgemm_tiled<<<grid, block, smem>>>(dA, dB, dC, M, N, K, s.kt);
        CK_LAUNCH("sgemm_tiled");
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(C.data(), dC, C.size() * sizeof(float),
                      cudaMemcpyDeviceToHost));

        double sum = 0.0, weighted = 0.0;
        for (size_t i = 0; i < C.size(); i++) {
            const float want = ref[i];
            if (!(std::fabs(C[i] - want) <= 1e-4f * (1.0f + std::fabs(want))))
                fail("tile %dx%d: C[%zu][%zu] = %.9g, expected %.9g", s.T,
                     s.kt, i / N, i % N, (double)C[i], (double)want);
            sum += C[i];
            weighted += C[i] * (double)(i % 7 + 1);
        }
        printf("tile %dx%d, %zu bytes dynamic shared: checksum %.4f, "
               "weighted %.4f\n",
               s.T, s.kt, smem, sum, weighted);
    }

    CK(cudaFree(dA));
    CK(cudaFree(dB));
    CK(cudaFree(dC));
    printf("PASS " NAME "\n");
    return 0;
}
