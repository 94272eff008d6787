// How well a client confined to a share of the SMs keeps its step time next
// to a neighbour that saturates the rest (issue 19): the MPS active-thread
// percentage against a green context on a distinct SM group.
//
// One process is one client. The small client runs STEPS steps of four
// kernels of 64 blocks (an inference step at a small batch) and one stream
// synchronize, and prints its p50/p99 step time; the heavy client runs
// kernels of 8 blocks per SM until SECONDS have passed and prints its
// kernels per second. Confinement is chosen by the arguments:
//   none            the device's primary context (under MPS the daemon's
//                   CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, when set, confines it)
//   green:A-B       a green context on SM groups A..B of the device split
//                   into groups of GROUP_SMS (default: a quarter of the
//                   SMs, rounded down to a multiple of 8)
// Usage: share_confine small|heavy none|green:A-B STEPS|SECONDS [READY_FILE]
// The heavy client creates READY_FILE once its first kernels ran.
// Output: one JSON line.
#include <cuda.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CK(x)                                                                             \
    do {                                                                                  \
        CUresult r_ = (x);                                                                \
        if (r_) {                                                                         \
            const char *s_ = 0;                                                           \
            cuGetErrorName(r_, &s_);                                                      \
            printf("{\"error\": \"%s -> %s\"}\n", #x, s_ ? s_ : "?");                     \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)
#define CKR(x)                                                                            \
    do {                                                                                  \
        cudaError_t e_ = (x);                                                             \
        if (e_) {                                                                         \
            printf("{\"error\": \"%s -> %s\"}\n", #x, cudaGetErrorName(e_));             \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

// ITERS dependent multiply-adds per thread; the result is stored so that the
// loop is kept.
__global__ void work(float *out, int iters) {
    float a = threadIdx.x * 1e-3f, b = 1.0001f;
    for (int i = 0; i < iters; ++i) a = a * b + 1e-6f;
    out[blockIdx.x * blockDim.x + threadIdx.x] = a;
}

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Makes the green context on groups [first, last] current; prints its SM count.
static int enter_green(CUdevice dev, int first, int last) {
    CUdevResource all;
    CK(cuDeviceGetDevResource(dev, &all, CU_DEV_RESOURCE_TYPE_SM));
    const char *env = getenv("GROUP_SMS");
    unsigned per = env ? (unsigned)atoi(env) : (all.sm.smCount / 4) / 8 * 8;
    unsigned n = 0;
    CK(cuDevSmResourceSplitByCount(nullptr, &n, &all, nullptr, 0, per));
    std::vector<CUdevResource> groups(n);
    CUdevResource rest;
    CK(cuDevSmResourceSplitByCount(groups.data(), &n, &all, &rest, 0, per));
    if (first < 0 || last >= (int)n || first > last) {
        printf("{\"error\": \"groups %d-%d of %u\"}\n", first, last, n);
        exit(1);
    }
    CUdevResourceDesc desc;
    CK(cuDevResourceGenerateDesc(&desc, &groups[first], last - first + 1));
    CUgreenCtx green;
    CK(cuGreenCtxCreate(&green, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM));
    CUcontext ctx;
    CK(cuCtxFromGreenCtx(&ctx, green));
    CK(cuCtxSetCurrent(ctx));
    int sms = 0;
    for (int g = first; g <= last; ++g) sms += groups[g].sm.smCount;
    return sms;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s small|heavy none|green:A-B STEPS|SECONDS [READY_FILE]\n", argv[0]);
        return 2;
    }
    bool small = !strcmp(argv[1], "small");
    const char *confine = argv[2];
    double amount = atof(argv[3]);
    CK(cuInit(0));
    CUdevice dev;
    CK(cuDeviceGet(&dev, 0));
    int sm_total = 0;
    CK(cuDeviceGetAttribute(&sm_total, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
    int sms = sm_total;
    if (!strncmp(confine, "green:", 6)) {
        int a = 0, b = 0;
        if (sscanf(confine + 6, "%d-%d", &a, &b) != 2) return 2;
        sms = enter_green(dev, a, b);
    } else {
        CUcontext primary;
        CK(cuDevicePrimaryCtxRetain(&primary, dev));
        CK(cuCtxSetCurrent(primary));
    }
    cudaStream_t s;
    CKR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    int blocks = small ? 64 : 8 * sm_total, threads = 256;
    int iters = small ? 4000 : 200000;
    float *out;
    CKR(cudaMalloc(&out, (size_t)blocks * threads * sizeof(float)));
    // Warm-up: module load and first launches.
    for (int i = 0; i < 20; ++i) work<<<blocks, threads, 0, s>>>(out, small ? iters : 1000);
    CKR(cudaStreamSynchronize(s));
    if (small) {
        int steps = (int)amount;
        std::vector<double> ms(steps);
        double t0 = now_s();
        for (int i = 0; i < steps; ++i) {
            double a = now_s();
            for (int k = 0; k < 4; ++k) work<<<blocks, threads, 0, s>>>(out, iters);
            CKR(cudaStreamSynchronize(s));
            ms[i] = (now_s() - a) * 1e3;
        }
        double t1 = now_s();
        std::sort(ms.begin(), ms.end());
        printf("{\"role\": \"small\", \"confine\": \"%s\", \"sms\": %d, \"steps\": %d, \"p50_ms\": %.4f, "
               "\"p99_ms\": %.4f, \"steps_per_s\": %.1f}\n",
               confine, sms, steps, ms[steps / 2], ms[(size_t)(steps * 0.99)], steps / (t1 - t0));
    } else {
        if (argc > 4) {
            work<<<blocks, threads, 0, s>>>(out, iters);
            CKR(cudaStreamSynchronize(s));
            FILE *f = fopen(argv[4], "w");
            if (f) fclose(f);
        }
        long kernels = 0;
        double t0 = now_s();
        while (now_s() - t0 < amount) {
            for (int k = 0; k < 4; ++k) work<<<blocks, threads, 0, s>>>(out, iters);
            CKR(cudaStreamSynchronize(s));
            kernels += 4;
        }
        double t1 = now_s();
        printf("{\"role\": \"heavy\", \"confine\": \"%s\", \"sms\": %d, \"kernels\": %ld, \"kernels_per_s\": %.1f}\n",
               confine, sms, kernels, kernels / (t1 - t0));
    }
    return 0;
}
