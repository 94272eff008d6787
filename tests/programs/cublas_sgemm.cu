// cublas_sgemm: cuBLAS SGEMM, 256 x 256 x 256, on a stream of our own (set
// with cublasSetStream), compared with a CPU reference. libcublas.so.13
// carries its own static runtime and finds the driver on its own (dlopen of
// libcuda.so.1), so this is two runtimes in one process talking to one
// libcuda.
//
// The inputs are multiples of 1/8 in [-1, 1]: every product and partial sum
// is exact even in TF32, so the checksum does not depend on cuBLAS's choice
// of kernel.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define NAME "cublas_sgemm"

#include "check.h"
#include "check_cublas.h"

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const int n = 256; // square; column-major as cuBLAS expects
    std::vector<float> A((size_t)n * n), B((size_t)n * n), C((size_t)n * n),
        ref((size_t)n * n);
    for (size_t i = 0; i < A.size(); i++) {
        A[i] = (float)((int)((i * 7 + 3) % 17) - 8) / 8.0f;
        B[i] = (float)((int)((i * 5 + 1) % 13) - 6) / 8.0f;
        C[i] = (float)((int)(i % 9) - 4) / 8.0f;
    }
    const float alpha = 1.0f, beta = 0.5f;
    for (int c = 0; c < n; c++)
        for (int r = 0; r < n; r++) {
            double acc = 0.0;
            for (int k = 0; k < n; k++)
                acc += (double)A[(size_t)k * n + r] * B[(size_t)c * n + k];
            ref[(size_t)c * n + r] =
                (float)(alpha * acc + beta * C[(size_t)c * n + r]);
        }

    int version = 0;
    cublasHandle_t h;
    cudaStream_t stream;
    CKB(cublasCreate(&h));
    CKB(cublasGetVersion(h, &version));
    printf("INFO cuBLAS version %d\n", version);
    // A blocking stream: it orders after the legacy-stream copies below.
    CK(cudaStreamCreate(&stream));
    CKB(cublasSetStream(h, stream));

    float *dA, *dB, *dC;
    const size_t bytes = A.size() * sizeof(float);
    CK(cudaMalloc(&dA, bytes));
    CK(cudaMalloc(&dB, bytes));
    CK(cudaMalloc(&dC, bytes));
    CKB(cublasSetMatrix(n, n, sizeof(float), A.data(), n, dA, n));
    CK(cudaMemcpy(dB, B.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dC, C.data(), bytes, cudaMemcpyHostToDevice));

    CKB(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, dA, n, dB, n,
                    &beta, dC, n));
    CK(cudaStreamSynchronize(stream));
    CKB(cublasGetMatrix(n, n, sizeof(float), dC, n, C.data(), n));

    double sum = 0.0, weighted = 0.0;
    for (size_t i = 0; i < C.size(); i++) {
        if (!(std::fabs(C[i] - ref[i]) <= 1e-4f * (1.0f + std::fabs(ref[i]))))
            fail("C[%zu][%zu] = %.9g, expected %.9g", i % n, i / n,
                 (double)C[i], (double)ref[i]);
        sum += C[i];
        weighted += C[i] * (double)(i % 7 + 1);
    }
    printf("sgemm %dx%dx%d: checksum %.4f, weighted %.4f\n", n, n, n, sum,
           weighted);

    CK(cudaFree(dA));
    CK(cudaFree(dB));
    CK(cudaFree(dC));
    CK(cudaStreamDestroy(stream));
    CKB(cublasDestroy(h));
    printf("PASS " NAME "\n");
    return 0;
}
