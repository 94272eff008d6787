// templated: template kernels instantiated for float, double and int
// (saxpy<T> and a two-pass block reduction<T>), so the module holds several
// mangled names of one template and kernels taking 4- and 8-byte scalars.
//
// Inputs are small integers, so every result is exact in all three types and
// the printed sums are the same on every GPU.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#define NAME "templated"

#include "check.h"

constexpr int kBlock = 256;

template <typename T>
__global__ void saxpy(T a, const T *x, T *y, int n)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x)
        y[i] = a * x[i] + y[i];
}

// One partial sum per block; a second launch with one block folds the partials.
template <typename T>
__global__ void reduce_sum(const T *in, T *out, int n)
{
    __shared__ T buf[kBlock];
    T acc = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x)
        acc += in[i];
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s /= 2) {
        if (threadIdx.x < s)
            buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        out[blockIdx.x] = buf[0];
}

template <typename T> struct TypeName;
template <> struct TypeName<float> { static constexpr const char *v = "float"; };
template <> struct TypeName<double> { static constexpr const char *v = "double"; };
template <> struct TypeName<int> { static constexpr const char *v = "int"; };

template <typename T> static void run(int n, T a)
{
    const char *tn = TypeName<T>::v;
    std::vector<T> x(n), y(n), out(n);
    for (int i = 0; i < n; i++) {
        x[i] = (T)(i % 13 - 6);
        y[i] = (T)(i % 7);
    }

    const int blocks = 120;
    T *dx, *dy, *dpart, *dsum;
    CK(cudaMalloc(&dx, n * sizeof(T)));
    CK(cudaMalloc(&dy, n * sizeof(T)));
    CK(cudaMalloc(&dpart, blocks * sizeof(T)));
    CK(cudaMalloc(&dsum, sizeof(T)));
    CK(cudaMemcpy(dx, x.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dy, y.data(), n * sizeof(T), cudaMemcpyHostToDevice));

    saxpy<T><<<blocks, kBlock>>>(a, dx, dy, n);
    CK_LAUNCH("saxpy");
    reduce_sum<T><<<blocks, kBlock>>>(dy, dpart, n);
    CK_LAUNCH("reduce_sum (blocks)");
    reduce_sum<T><<<1, kBlock>>>(dpart, dsum, blocks);
    CK_LAUNCH("reduce_sum (final)");
    CK(cudaDeviceSynchronize());

    T sum = 0;
    CK(cudaMemcpy(out.data(), dy, n * sizeof(T), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(&sum, dsum, sizeof(T), cudaMemcpyDeviceToHost));

    T want_sum = 0;
    for (int i = 0; i < n; i++) {
        const T want = a * x[i] + y[i];
        if (out[i] != want)
            fail("saxpy<%s>: y[%d] = %.17g, expected %.17g", tn, i,
                 (double)out[i], (double)want);
        want_sum += want;
    }
    if (sum != want_sum)
        fail("reduce_sum<%s> = %.17g, expected %.17g", tn, (double)sum,
             (double)want_sum);
    printf("%s: n %d, a %g, sum %.1f\n", tn, n, (double)a, (double)sum);

    CK(cudaFree(dx));
    CK(cudaFree(dy));
    CK(cudaFree(dpart));
    CK(cudaFree(dsum));
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    run<float>(100003, 2.0f);
    run<double>(100003, -3.0);
    run<int>(100003, 5);
    printf("PASS " NAME "\n");
    return 0;
}
