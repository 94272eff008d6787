// cublas_halfgemm: cuBLAS GEMMs in the precisions PyTorch's autocast uses:
// cublasGemmEx with bf16 and fp16 inputs (fp32 accumulation, fp32 and
// half outputs) and cublasLtMatmul-backed cublasGemmStridedBatchedEx, on a
// stream of our own, checked against a CPU reference. On Hopper these pick
// cluster-launched kernels and make cuBLAS ask the driver for its private
// half-precision export table: through gpupool this program once crashed
// (issue 16, item 1).
//
// Inputs are multiples of 1/8 in [-1, 1] (exact in bf16 and fp16) and the
// sizes keep every partial sum exact in fp32, so the result does not depend
// on cuBLAS's choice of kernel.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#define NAME "cublas_halfgemm"

#include "check.h"
#include "check_cublas.h"

template <typename T> static T from_float(float f);
template <> __nv_bfloat16 from_float(float f) { return __float2bfloat16(f); }
template <> __half from_float(float f) { return __float2half(f); }

template <typename T>
static void gemm_case(cublasHandle_t h, cudaStream_t s, cudaDataType_t type,
                      const char *label, int m, int n, int k, int batch)
{
    const size_t a_len = (size_t)m * k, b_len = (size_t)k * n, c_len = (size_t)m * n;
    std::vector<float> A(a_len * batch), B(b_len * batch), ref(c_len * batch);
    for (size_t i = 0; i < A.size(); i++)
        A[i] = (float)((int)((i * 7 + 3) % 17) - 8) / 8.0f;
    for (size_t i = 0; i < B.size(); i++)
        B[i] = (float)((int)((i * 5 + 1) % 13) - 6) / 8.0f;
    for (int b = 0; b < batch; b++)
        for (int c = 0; c < n; c++)
            for (int r = 0; r < m; r++) {
                double acc = 0.0;
                for (int x = 0; x < k; x++)
                    acc += (double)A[b * a_len + (size_t)x * m + r] *
                           B[b * b_len + (size_t)c * k + x];
                ref[b * c_len + (size_t)c * m + r] = (float)acc;
            }
    std::vector<T> hA(A.size()), hB(B.size());
    for (size_t i = 0; i < A.size(); i++) hA[i] = from_float<T>(A[i]);
    for (size_t i = 0; i < B.size(); i++) hB[i] = from_float<T>(B[i]);

    T *dA, *dB;
    float *dC;
    CK(cudaMalloc(&dA, hA.size() * sizeof(T)));
    CK(cudaMalloc(&dB, hB.size() * sizeof(T)));
    CK(cudaMalloc(&dC, ref.size() * sizeof(float)));
    CK(cudaMemcpyAsync(dA, hA.data(), hA.size() * sizeof(T), cudaMemcpyHostToDevice, s));
    CK(cudaMemcpyAsync(dB, hB.data(), hB.size() * sizeof(T), cudaMemcpyHostToDevice, s));
    const float alpha = 1.0f, beta = 0.0f;
    if (batch == 1)
        CKB(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA, type, m,
                         dB, type, k, &beta, dC, CUDA_R_32F, m,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    else
        CKB(cublasGemmStridedBatchedEx(
            h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA, type, m, a_len, dB,
            type, k, b_len, &beta, dC, CUDA_R_32F, m, c_len, batch,
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    std::vector<float> C(ref.size());
    CK(cudaMemcpyAsync(C.data(), dC, C.size() * sizeof(float), cudaMemcpyDeviceToHost, s));
    CK(cudaStreamSynchronize(s));
    double sum = 0.0;
    for (size_t i = 0; i < C.size(); i++) {
        if (!(std::fabs(C[i] - ref[i]) <= 1e-3f * (1.0f + std::fabs(ref[i]))))
            fail("%s: C[%zu] = %.9g, expected %.9g", label, i, (double)C[i],
                 (double)ref[i]);
        sum += C[i];
    }
    printf("%s %dx%dx%d x%d: checksum %.4f\n", label, m, n, k, batch, sum);

    // The same product with a half-precision output.
    T *dH;
    CK(cudaMalloc(&dH, c_len * sizeof(T)));
    CKB(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA, type, m, dB,
                     type, k, &beta, dH, type, m, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT));
    std::vector<T> H(c_len);
    CK(cudaMemcpyAsync(H.data(), dH, c_len * sizeof(T), cudaMemcpyDeviceToHost, s));
    CK(cudaStreamSynchronize(s));
    for (size_t i = 0; i < c_len; i++) {
        float got = (float)H[i];
        if (!(std::fabs(got - ref[i]) <= 1e-2f * (1.0f + std::fabs(ref[i]))))
            fail("%s half output: C[%zu] = %.6g, expected %.6g", label, i,
                 (double)got, (double)ref[i]);
    }
    printf("%s half-precision output matches\n", label);
    CK(cudaFree(dA));
    CK(cudaFree(dB));
    CK(cudaFree(dC));
    CK(cudaFree(dH));
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    cublasHandle_t h;
    cudaStream_t s;
    CKB(cublasCreate(&h));
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CKB(cublasSetStream(h, s));
    gemm_case<__nv_bfloat16>(h, s, CUDA_R_16BF, "bf16", 512, 384, 256, 1);
    gemm_case<__half>(h, s, CUDA_R_16F, "fp16", 512, 384, 256, 1);
    gemm_case<__nv_bfloat16>(h, s, CUDA_R_16BF, "bf16 batched", 128, 96, 64, 8);
    gemm_case<__half>(h, s, CUDA_R_16F, "fp16 batched", 128, 96, 64, 8);
    CK(cudaStreamDestroy(s));
    CKB(cublasDestroy(h));
    printf("PASS " NAME "\n");
    return 0;
}
