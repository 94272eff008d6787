// curand_gen: cuRAND's host API (device generators XORWOW, PHILOX4_32_10,
// MRG32K3A, MTGP32 and the SOBOL32 quasi-random one: uniform, normal,
// log-normal, Poisson and raw 32-bit draws, with offsets and orderings set)
// and its device API (curand_init/curand_uniform in a kernel estimating pi,
// as CUDA's Monte Carlo examples do). A generator's sequence is fixed by its
// seed, so the first draws are printed and must match natively and through
// gpupool; the moments are checked against the distributions.
#include <cuda_runtime.h>
#include <curand.h>
#include <curand_kernel.h>

#include <cmath>
#include <cstdio>
#include <vector>

#define NAME "curand_gen"

#include "check.h"

#define CKR(call)                                                             \
    do {                                                                      \
        curandStatus_t s_ = (call);                                           \
        if (s_ != CURAND_STATUS_SUCCESS)                                      \
            fail("line %d: %s -> cuRAND status %d", __LINE__, #call, (int)s_); \
    } while (0)

static const size_t count = 1 << 20;

static void moments(const std::vector<float> &v, double &mean, double &var)
{
    double s = 0.0, q = 0.0;
    for (float x : v) {
        s += x;
        q += (double)x * x;
    }
    mean = s / v.size();
    var = q / v.size() - mean * mean;
}

static void generators(cudaStream_t stream, float *d_f, unsigned *d_u)
{
    struct Kind {
        curandRngType_t type;
        const char *name;
    } kinds[] = {
        {CURAND_RNG_PSEUDO_XORWOW, "XORWOW"},
        {CURAND_RNG_PSEUDO_PHILOX4_32_10, "PHILOX4_32_10"},
        {CURAND_RNG_PSEUDO_MRG32K3A, "MRG32K3A"},
        {CURAND_RNG_PSEUDO_MTGP32, "MTGP32"},
        {CURAND_RNG_QUASI_SOBOL32, "SOBOL32"},
    };
    std::vector<float> h(count);
    for (const Kind &k : kinds) {
        curandGenerator_t gen;
        CKR(curandCreateGenerator(&gen, k.type));
        CKR(curandSetStream(gen, stream));
        bool quasi = k.type == CURAND_RNG_QUASI_SOBOL32;
        if (quasi)
            CKR(curandSetQuasiRandomGeneratorDimensions(gen, 1));
        else
            CKR(curandSetPseudoRandomGeneratorSeed(gen, 20261206ULL));
        if (k.type == CURAND_RNG_PSEUDO_PHILOX4_32_10)
            CKR(curandSetGeneratorOffset(gen, 1000));

        CKR(curandGenerateUniform(gen, d_f, count));
        CK(cudaMemcpyAsync(h.data(), d_f, count * sizeof(float),
                           cudaMemcpyDeviceToHost, stream));
        CK(cudaStreamSynchronize(stream));
        double mean, var;
        moments(h, mean, var);
        for (float x : h)
            if (!(x > 0.0f && x <= 1.0f)) fail("%s uniform draw %g", k.name, x);
        if (!(std::fabs(mean - 0.5) < 0.01 && std::fabs(var - 1.0 / 12) < 0.01))
            fail("%s uniform: mean %g, variance %g", k.name, mean, var);
        printf("%s uniform: first %.7f %.7f %.7f, mean %.4f\n", k.name, h[0],
               h[1], h[2], mean);

        CKR(curandGenerateNormal(gen, d_f, count, 2.0f, 3.0f));
        CK(cudaMemcpyAsync(h.data(), d_f, count * sizeof(float),
                           cudaMemcpyDeviceToHost, stream));
        CK(cudaStreamSynchronize(stream));
        moments(h, mean, var);
        if (!(std::fabs(mean - 2.0) < 0.05 && std::fabs(std::sqrt(var) - 3.0) < 0.05))
            fail("%s normal: mean %g, sd %g", k.name, mean, std::sqrt(var));
        printf("%s normal: first %.6f %.6f, mean %.3f\n", k.name, h[0], h[1],
               mean);

        if (!quasi) {
            CKR(curandGenerateLogNormal(gen, d_f, count, 0.0f, 0.5f));
            CKR(curandGenerate(gen, d_u, count));
            std::vector<unsigned> raw(4);
            CK(cudaMemcpyAsync(raw.data(), d_u, raw.size() * sizeof(unsigned),
                               cudaMemcpyDeviceToHost, stream));
            CK(cudaMemcpyAsync(h.data(), d_f, count * sizeof(float),
                               cudaMemcpyDeviceToHost, stream));
            CK(cudaStreamSynchronize(stream));
            for (float x : h)
                if (!(x > 0.0f)) fail("%s log-normal draw %g", k.name, x);
            printf("%s raw: %08x %08x %08x %08x\n", k.name, raw[0], raw[1],
                   raw[2], raw[3]);
            CKR(curandGeneratePoisson(gen, d_u, count, 4.0));
            std::vector<unsigned> p(count);
            CK(cudaMemcpyAsync(p.data(), d_u, count * sizeof(unsigned),
                               cudaMemcpyDeviceToHost, stream));
            CK(cudaStreamSynchronize(stream));
            double s = 0.0;
            for (unsigned v : p) s += v;
            if (!(std::fabs(s / count - 4.0) < 0.05))
                fail("%s Poisson(4): mean %g", k.name, s / count);
            printf("%s Poisson(4): first %u %u %u\n", k.name, p[0], p[1], p[2]);
        }
        CKR(curandDestroyGenerator(gen));
    }
}

__global__ void estimate_pi(unsigned long long seed, int per_thread,
                            unsigned long long *inside)
{
    int id = blockIdx.x * blockDim.x + threadIdx.x;
    curandStatePhilox4_32_10_t state;
    curand_init(seed, id, 0, &state);
    unsigned long long hits = 0;
    for (int i = 0; i < per_thread; i++) {
        float x = curand_uniform(&state), y = curand_uniform(&state);
        hits += x * x + y * y <= 1.0f;
    }
    atomicAdd(inside, hits);
}

__global__ void xorwow_normals(unsigned long long seed, float *out)
{
    int id = blockIdx.x * blockDim.x + threadIdx.x;
    curandState state;
    curand_init(seed, id, 0, &state);
    out[id] = curand_normal(&state);
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    int version = 0;
    CKR(curandGetVersion(&version));
    printf("INFO cuRAND version %d\n", version);
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    float *d_f;
    unsigned *d_u;
    CK(cudaMalloc(&d_f, count * sizeof(float)));
    CK(cudaMalloc(&d_u, count * sizeof(unsigned)));
    generators(stream, d_f, d_u);

    // The device API.
    unsigned long long *d_inside, inside = 0;
    CK(cudaMalloc(&d_inside, sizeof(*d_inside)));
    CK(cudaMemsetAsync(d_inside, 0, sizeof(*d_inside), stream));
    const int blocks = 256, threads = 256, per_thread = 256;
    estimate_pi<<<blocks, threads, 0, stream>>>(7, per_thread, d_inside);
    CK_LAUNCH("estimate_pi");
    CK(cudaMemcpyAsync(&inside, d_inside, sizeof(inside),
                       cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    double total = (double)blocks * threads * per_thread;
    double pi = 4.0 * inside / total;
    if (!(std::fabs(pi - M_PI) < 0.01)) fail("pi estimate %.6f", pi);
    printf("device API (Philox): %llu of %.0f inside, pi ~ %.6f\n", inside,
           total, pi);

    xorwow_normals<<<4, 128, 0, stream>>>(99, d_f);
    CK_LAUNCH("xorwow_normals");
    std::vector<float> normals(512);
    CK(cudaMemcpyAsync(normals.data(), d_f, normals.size() * sizeof(float),
                       cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    printf("device API (XORWOW normals): %.6f %.6f %.6f\n", normals[0],
           normals[1], normals[511]);

    CK(cudaFree(d_f));
    CK(cudaFree(d_u));
    CK(cudaFree(d_inside));
    CK(cudaStreamDestroy(stream));
    printf("PASS " NAME "\n");
    return 0;
}
