// cufft_transforms: cuFFT plans and transforms (1-D complex-to-complex
// forward and inverse, batched; 2-D real-to-complex; a plan on a stream of
// our own), checked against a direct DFT on the CPU. cuFFT finds the kernel
// of each module it loads through a private driver table (TOOLS_MODULE):
// through gpupool cufftPlan1d once failed with CUFFT_INTERNAL_ERROR (issue
// 16, item 11).
#include <cufft.h>
#include <cuda_runtime.h>

#include <cmath>
#include <complex>
#include <cstdio>
#include <vector>

#define NAME "cufft_transforms"

#include "check.h"

#define CKF(call)                                                             \
    do {                                                                      \
        cufftResult r_ = (call);                                              \
        if (r_ != CUFFT_SUCCESS) fail("line %d: %s -> cufftResult %d", __LINE__, #call, (int)r_); \
    } while (0)

typedef std::complex<double> cd;

static std::vector<cd> dft(const std::vector<cd> &x, int sign)
{
    const size_t n = x.size();
    std::vector<cd> out(n);
    for (size_t k = 0; k < n; k++) {
        cd acc = 0;
        for (size_t j = 0; j < n; j++)
            acc += x[j] * std::polar(1.0, sign * 2.0 * M_PI * (double)(j * k % n) / n);
        out[k] = acc;
    }
    return out;
}

static float value(size_t i) { return (float)((int)((i * 37 + 11) % 23) - 11) / 16.0f; }

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    // 1-D C2C, batch 4, sizes with small and large prime factors.
    const int sizes[] = {256, 1000, 997};
    for (int n : sizes) {
        const int batch = 4;
        std::vector<cufftComplex> h((size_t)n * batch);
        for (size_t i = 0; i < h.size(); i++) h[i] = make_float2(value(i), value(i + 7));
        cufftComplex *d;
        CK(cudaMalloc(&d, h.size() * sizeof(cufftComplex)));
        CK(cudaMemcpy(d, h.data(), h.size() * sizeof(cufftComplex), cudaMemcpyHostToDevice));
        cufftHandle plan;
        CKF(cufftPlan1d(&plan, n, CUFFT_C2C, batch));
        CKF(cufftSetStream(plan, s));
        CKF(cufftExecC2C(plan, d, d, CUFFT_FORWARD));
        std::vector<cufftComplex> f(h.size());
        CK(cudaMemcpyAsync(f.data(), d, f.size() * sizeof(cufftComplex), cudaMemcpyDeviceToHost, s));
        CK(cudaStreamSynchronize(s));
        double max_err = 0, energy = 0;
        for (int b = 0; b < batch; b++) {
            std::vector<cd> x(n);
            for (int j = 0; j < n; j++) x[j] = cd(h[(size_t)b * n + j].x, h[(size_t)b * n + j].y);
            std::vector<cd> want = dft(x, -1);
            for (int j = 0; j < n; j++) {
                cd got(f[(size_t)b * n + j].x, f[(size_t)b * n + j].y);
                max_err = std::fmax(max_err, std::abs(got - want[j]) / (1.0 + std::abs(want[j])));
                energy += std::norm(want[j]);
            }
        }
        if (max_err > 1e-4) fail("C2C forward n=%d: relative error %.3g", n, max_err);
        // Inverse brings back n * x.
        CKF(cufftExecC2C(plan, d, d, CUFFT_INVERSE));
        CK(cudaMemcpyAsync(f.data(), d, f.size() * sizeof(cufftComplex), cudaMemcpyDeviceToHost, s));
        CK(cudaStreamSynchronize(s));
        for (size_t i = 0; i < h.size(); i++)
            if (std::fabs(f[i].x / n - h[i].x) > 1e-4 || std::fabs(f[i].y / n - h[i].y) > 1e-4)
                fail("C2C round trip n=%d: element %zu", n, i);
        printf("c2c n=%d batch=%d: forward matches the DFT, inverse round trip exact, energy %.1f\n",
               n, batch, energy);
        CKF(cufftDestroy(plan));
        CK(cudaFree(d));
    }

    // 2-D R2C, 64 x 48.
    const int nx = 64, ny = 48;
    std::vector<float> r((size_t)nx * ny);
    for (size_t i = 0; i < r.size(); i++) r[i] = value(i * 3);
    float *dr;
    cufftComplex *dc;
    CK(cudaMalloc(&dr, r.size() * sizeof(float)));
    CK(cudaMalloc(&dc, (size_t)nx * (ny / 2 + 1) * sizeof(cufftComplex)));
    CK(cudaMemcpy(dr, r.data(), r.size() * sizeof(float), cudaMemcpyHostToDevice));
    cufftHandle plan2;
    CKF(cufftPlan2d(&plan2, nx, ny, CUFFT_R2C));
    CKF(cufftExecR2C(plan2, dr, dc));
    std::vector<cufftComplex> out((size_t)nx * (ny / 2 + 1));
    CK(cudaMemcpy(out.data(), dc, out.size() * sizeof(cufftComplex), cudaMemcpyDeviceToHost));
    double max_err = 0;
    for (int u = 0; u < nx; u++)
        for (int v = 0; v <= ny / 2; v++) {
            cd acc = 0;
            for (int x = 0; x < nx; x++)
                for (int y = 0; y < ny; y++)
                    acc += (double)r[(size_t)x * ny + y] *
                           std::polar(1.0, -2.0 * M_PI * ((double)(u * x % nx) / nx + (double)(v * y % ny) / ny));
            cd got(out[(size_t)u * (ny / 2 + 1) + v].x, out[(size_t)u * (ny / 2 + 1) + v].y);
            max_err = std::fmax(max_err, std::abs(got - acc) / (1.0 + std::abs(acc)));
        }
    if (max_err > 1e-4) fail("R2C 2-D: relative error %.3g", max_err);
    printf("r2c %dx%d: matches the 2-D DFT\n", nx, ny);
    CKF(cufftDestroy(plan2));
    CK(cudaFree(dr));
    CK(cudaFree(dc));
    CK(cudaStreamDestroy(s));
    printf("PASS " NAME "\n");
    return 0;
}
