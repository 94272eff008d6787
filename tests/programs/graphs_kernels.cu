// graphs_kernels: CUDA graphs with kernels (a GPU program).
//
// - an explicit graph of kernel nodes with arguments between a host-to-device
//   and a device-to-host copy, launched, then changed on the executable graph
//   with cudaGraphExecKernelNodeSetParams and launched again;
// - a captured sequence over two streams (fork/join through events) of
//   several kernels, one launched with cudaLaunchKernelEx, and copies,
//   launched 100 times; every round's result is checked against the CPU.
//
// Integer arithmetic only, so the CPU reference is exact. No TIME lines
// except the one timing; everything else is deterministic.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define NAME "graphs_kernels"

#include "check.h"

constexpr int kN = (1 << 16) + 3;
constexpr int kBlock = 256;
constexpr int kGrid = (kN + kBlock - 1) / kBlock;

// y = a * x + y
__global__ void axpy(unsigned a, const unsigned *x, unsigned *y, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] = a * x[i] + y[i];
}

// y = y * m + i
__global__ void mix(unsigned *y, unsigned m, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] = y[i] * m + (unsigned)i;
}

// z = y ^ (x >> s)
__global__ void combine(const unsigned *x, const unsigned *y, unsigned *z,
                        int s, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        z[i] = y[i] ^ (x[i] >> s);
}

static void cpu_axpy(unsigned a, const unsigned *x, unsigned *y)
{
    for (int i = 0; i < kN; i++)
        y[i] = a * x[i] + y[i];
}

static void cpu_mix(unsigned *y, unsigned m)
{
    for (int i = 0; i < kN; i++)
        y[i] = y[i] * m + (unsigned)i;
}

static void expect(const char *what, const unsigned *got, const unsigned *want)
{
    for (int i = 0; i < kN; i++)
        if (got[i] != want[i])
            fail("%s: element %d is %u, expected %u", what, i, got[i],
                 want[i]);
}

static unsigned checksum(const unsigned *v)
{
    unsigned h = 2166136261u;
    for (int i = 0; i < kN; i++)
        h = (h ^ v[i]) * 16777619u;
    return h;
}

static void explicit_kernels(unsigned *hx, unsigned *hy, unsigned *dx,
                             unsigned *dy)
{
    const size_t bytes = kN * sizeof(unsigned);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaGraph_t g;
    CK(cudaGraphCreate(&g, 0));
    cudaGraphNode_t cx, cy, k1, k2, back;
    CK(cudaGraphAddMemcpyNode1D(&cx, g, nullptr, 0, dx, hx, bytes,
                                cudaMemcpyHostToDevice));
    CK(cudaGraphAddMemcpyNode1D(&cy, g, nullptr, 0, dy, hy, bytes,
                                cudaMemcpyHostToDevice));

    unsigned a = 3;
    int n = kN;
    void *axpy_args[] = {&a, &dx, &dy, &n};
    cudaKernelNodeParams kp = {};
    kp.func = (void *)axpy;
    kp.gridDim = dim3(kGrid);
    kp.blockDim = dim3(kBlock);
    kp.kernelParams = axpy_args;
    cudaGraphNode_t deps[2] = {cx, cy};
    CK(cudaGraphAddKernelNode(&k1, g, deps, 2, &kp));
    // Arguments are copied when the node is made: changing `a` now does
    // not change the node.
    a = 1000;

    unsigned m = 7;
    void *mix_args[] = {&dy, &m, &n};
    cudaKernelNodeParams mp = kp;
    mp.func = (void *)mix;
    mp.kernelParams = mix_args;
    CK(cudaGraphAddKernelNode(&k2, g, &k1, 1, &mp));
    CK(cudaGraphAddMemcpyNode1D(&back, g, &k2, 1, hy, dy, bytes,
                                cudaMemcpyDeviceToHost));

    cudaKernelNodeParams got = {};
    CK(cudaGraphKernelNodeGetParams(k1, &got));
    if (got.gridDim.x != (unsigned)kGrid || got.blockDim.x != kBlock ||
        *(unsigned *)got.kernelParams[0] != 3)
        fail("kernel node params read back as grid %u block %u a %u",
             got.gridDim.x, got.blockDim.x, *(unsigned *)got.kernelParams[0]);

    cudaGraphExec_t x;
    CK(cudaGraphInstantiate(&x, g, 0));
    std::vector<unsigned> want(kN), y0(kN);
    for (int i = 0; i < kN; i++) {
        hx[i] = (unsigned)i * 2654435761u;
        hy[i] = (unsigned)i ^ 0x5bd1e995u;
    }
    memcpy(y0.data(), hy, bytes);
    CK(cudaGraphLaunch(x, s));
    CK(cudaStreamSynchronize(s));
    memcpy(want.data(), y0.data(), bytes);
    cpu_axpy(3, hx, want.data());
    cpu_mix(want.data(), 7);
    expect("explicit graph", hy, want.data());
    printf("explicit graph checksum %08x\n", checksum(hy));

    // Change the executable graph's first kernel: a = 11.
    unsigned a2 = 11;
    void *args2[] = {&a2, &dx, &dy, &n};
    kp.kernelParams = args2;
    CK(cudaGraphExecKernelNodeSetParams(x, k1, &kp));
    memcpy(hy, y0.data(), bytes);
    CK(cudaGraphLaunch(x, s));
    CK(cudaStreamSynchronize(s));
    memcpy(want.data(), y0.data(), bytes);
    cpu_axpy(11, hx, want.data());
    cpu_mix(want.data(), 7);
    expect("after cudaGraphExecKernelNodeSetParams", hy, want.data());
    printf("exec set params checksum %08x\n", checksum(hy));

    CK(cudaGraphExecDestroy(x));
    CK(cudaGraphDestroy(g));
    CK(cudaStreamDestroy(s));
}

static void captured_sequence(unsigned *hx, unsigned *hy, unsigned *dx,
                              unsigned *dy)
{
    const size_t bytes = kN * sizeof(unsigned);
    unsigned *dz, *dw;
    CK(cudaMalloc(&dz, bytes));
    CK(cudaMalloc(&dw, bytes));
    cudaStream_t s1, s2;
    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    cudaEvent_t fork, join;
    CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    int n = kN;

    for (int i = 0; i < kN; i++)
        hx[i] = (unsigned)i * 40503u + 17u;
    CK(cudaMemcpy(dx, hx, bytes, cudaMemcpyHostToDevice));
    CK(cudaMemset(dy, 0, bytes));
    // The non-blocking streams below do not wait for the legacy stream.
    CK(cudaDeviceSynchronize());

    // Per round: y = 5x + y; fork: s2 computes w = mix(copy of y, 3);
    // s1: y = mix(y, 9) launched with cudaLaunchKernelEx; join;
    // z = y ^ (w >> 3); y = z (DtoD); copy y to the host.
    CK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
    axpy<<<kGrid, kBlock, 0, s1>>>(5u, dx, dy, n);
    CK_LAUNCH("axpy");
    CK(cudaEventRecord(fork, s1));
    CK(cudaStreamWaitEvent(s2, fork, 0));
    CK(cudaMemcpyAsync(dw, dy, bytes, cudaMemcpyDeviceToDevice, s2));
    mix<<<kGrid, kBlock, 0, s2>>>(dw, 3u, n);
    CK_LAUNCH("mix on s2");
    CK(cudaEventRecord(join, s2));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(kGrid);
    cfg.blockDim = dim3(kBlock);
    cfg.stream = s1;
    CK(cudaLaunchKernelEx(&cfg, mix, dy, 9u, n));
    CK(cudaStreamWaitEvent(s1, join, 0));
    combine<<<kGrid, kBlock, 0, s1>>>(dw, dy, dz, 3, n);
    CK_LAUNCH("combine");
    CK(cudaMemcpyAsync(dy, dz, bytes, cudaMemcpyDeviceToDevice, s1));
    CK(cudaMemcpyAsync(hy, dy, bytes, cudaMemcpyDeviceToHost, s1));
    cudaGraph_t g;
    CK(cudaStreamEndCapture(s1, &g));
    size_t count = 0;
    CK(cudaGraphGetNodes(g, nullptr, &count));
    printf("captured graph: %zu nodes\n", count);

    cudaGraphExec_t x;
    CK(cudaGraphInstantiate(&x, g, 0));
    std::vector<unsigned> y(kN, 0), w(kN);
    auto t0 = std::chrono::steady_clock::now();
    for (int round = 0; round < 100; round++) {
        CK(cudaGraphLaunch(x, s1));
        CK(cudaStreamSynchronize(s1));
        cpu_axpy(5, hx, y.data());
        w = y;
        cpu_mix(w.data(), 3);
        cpu_mix(y.data(), 9);
        for (int i = 0; i < kN; i++)
            y[i] = y[i] ^ (w[i] >> 3);
        char what[64];
        snprintf(what, sizeof what, "captured graph, launch %d", round);
        expect(what, hy, y.data());
    }
    auto ms = std::chrono::duration<double, std::milli>(
                  std::chrono::steady_clock::now() - t0)
                  .count();
    printf("captured graph after 100 launches: checksum %08x\n", checksum(hy));
    printf("TIME 100 launches of the captured graph (checked): %.3f ms\n", ms);

    CK(cudaGraphExecDestroy(x));
    CK(cudaGraphDestroy(g));
    CK(cudaEventDestroy(fork));
    CK(cudaEventDestroy(join));
    CK(cudaStreamDestroy(s1));
    CK(cudaStreamDestroy(s2));
    CK(cudaFree(dz));
    CK(cudaFree(dw));
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const size_t bytes = kN * sizeof(unsigned);
    unsigned *hx, *hy, *dx, *dy;
    CK(cudaMallocHost(&hx, bytes));
    CK(cudaMallocHost(&hy, bytes));
    CK(cudaMalloc(&dx, bytes));
    CK(cudaMalloc(&dy, bytes));
    explicit_kernels(hx, hy, dx, dy);
    captured_sequence(hx, hy, dx, dy);
    CK(cudaFree(dx));
    CK(cudaFree(dy));
    CK(cudaFreeHost(hx));
    CK(cudaFreeHost(hy));
    printf("PASS " NAME "\n");
    return 0;
}
