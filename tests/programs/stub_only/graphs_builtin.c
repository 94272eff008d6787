/*
 * graphs_builtin: kernel nodes, captured kernel launches and kernels over
 * stream-ordered allocations through the driver API, with gpupool's built-in
 * kernels (docs/builtin-kernels.md), so it runs on the emulated device.
 *
 * Stub-only: the module image "gpupool-builtin-kernels/v1\n" exists only on
 * gpupool servers, so this program is not in build.sh's lists (which are run
 * natively too); tests/tests/libcuda.rs builds and runs it.
 *
 * All values are small integers in floats, so results are exact.
 */
#include <cuda.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "graphs_builtin"

#include "../check_driver.h"

#define N 10000

static void expect(const char *what, const float *got, const float *want)
{
    for (int i = 0; i < N; i++)
        if (got[i] != want[i])
            fail("%s: element %d is %g, expected %g", what, i, (double)got[i],
                 (double)want[i]);
}

static CUDA_MEMCPY3D linear(CUmemorytype dt, void *dh, CUdeviceptr dd,
                            CUmemorytype st, const void *sh, CUdeviceptr sd,
                            size_t bytes)
{
    CUDA_MEMCPY3D c;
    memset(&c, 0, sizeof c);
    c.dstMemoryType = dt;
    c.dstHost = dh;
    c.dstDevice = dd;
    c.srcMemoryType = st;
    c.srcHost = sh;
    c.srcDevice = sd;
    c.WidthInBytes = bytes;
    c.Height = 1;
    c.Depth = 1;
    return c;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    CUmodule mod;
    CUfunction saxpy, vadd;
    CUcontext ctx = primary_context();
    CK(cuModuleLoadData(&mod, "gpupool-builtin-kernels/v1\n"));
    CK(cuModuleGetFunction(&saxpy, mod, "saxpy"));
    CK(cuModuleGetFunction(&vadd, mod, "vector_add"));

    const size_t bytes = N * sizeof(float);
    static float hx[N], hy[N], out[N], want[N];
    for (int i = 0; i < N; i++) {
        hx[i] = (float)(i % 100);
        hy[i] = (float)(i % 7);
    }
    CUdeviceptr dx, dy, dz;
    CK(cuMemAlloc(&dx, bytes));
    CK(cuMemAlloc(&dy, bytes));
    CK(cuMemAlloc(&dz, bytes));
    CUstream s;
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    unsigned n = N;

    /* Explicit graph: HtoD x, HtoD y -> saxpy(2) -> DtoH y. */
    CUgraph g;
    CUgraphNode cx, cy, k, back;
    CK(cuGraphCreate(&g, 0));
    CUDA_MEMCPY3D c = linear(CU_MEMORYTYPE_DEVICE, NULL, dx, CU_MEMORYTYPE_HOST, hx, 0, bytes);
    CK(cuGraphAddMemcpyNode(&cx, g, NULL, 0, &c, ctx));
    c = linear(CU_MEMORYTYPE_DEVICE, NULL, dy, CU_MEMORYTYPE_HOST, hy, 0, bytes);
    CK(cuGraphAddMemcpyNode(&cy, g, NULL, 0, &c, ctx));
    float alpha = 2.0f;
    void *args[] = {&alpha, &dx, &dy, &n};
    CUDA_KERNEL_NODE_PARAMS kp;
    memset(&kp, 0, sizeof kp);
    kp.func = saxpy;
    kp.gridDimX = (N + 255) / 256;
    kp.gridDimY = kp.gridDimZ = 1;
    kp.blockDimX = 256;
    kp.blockDimY = kp.blockDimZ = 1;
    kp.kernelParams = args;
    CUgraphNode deps[2] = {cx, cy};
    CK(cuGraphAddKernelNode(&k, g, deps, 2, &kp));
    alpha = 100.0f; /* copied at node creation: no effect */
    c = linear(CU_MEMORYTYPE_HOST, out, 0, CU_MEMORYTYPE_DEVICE, NULL, dy, bytes);
    CK(cuGraphAddMemcpyNode(&back, g, &k, 1, &c, ctx));

    CUDA_KERNEL_NODE_PARAMS got;
    CK(cuGraphKernelNodeGetParams(k, &got));
    if (got.func != saxpy || got.gridDimX != kp.gridDimX || *(float *)got.kernelParams[0] != 2.0f)
        fail("kernel node params read back wrong");

    CUgraphExec x;
    CK(cuGraphInstantiate(&x, g, 0));
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < N; i++)
            hy[i] = (float)((i + round) % 7);
        CK(cuGraphLaunch(x, s));
        CK(cuStreamSynchronize(s));
        for (int i = 0; i < N; i++)
            want[i] = 2.0f * hx[i] + (float)((i + round) % 7);
        expect("explicit kernel graph", out, want);
    }
    alpha = 3.0f;
    kp.kernelParams = args;
    CK(cuGraphExecKernelNodeSetParams(x, k, &kp));
    CK(cuGraphLaunch(x, s));
    CK(cuStreamSynchronize(s));
    for (int i = 0; i < N; i++)
        want[i] = 3.0f * hx[i] + hy[i];
    expect("after cuGraphExecKernelNodeSetParams", out, want);
    /* Disabled kernel node: the copies still run. */
    CK(cuGraphNodeSetEnabled(x, k, 0));
    CK(cuGraphLaunch(x, s));
    CK(cuStreamSynchronize(s));
    expect("kernel node disabled", out, hy);
    CK(cuGraphNodeSetEnabled(x, k, 1));
    printf("explicit kernel graph ok\n");

    /* Capture: z = x + y (cuLaunchKernelEx), y = 1*z + y (cuLaunchKernel),
     * y -> host; launched 10 times, y accumulating. */
    CK(cuMemcpyHtoD(dx, hx, bytes));
    CK(cuMemcpyHtoD(dy, hy, bytes));
    CK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    CUlaunchConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDimX = (N + 127) / 128;
    cfg.gridDimY = cfg.gridDimZ = 1;
    cfg.blockDimX = 128;
    cfg.blockDimY = cfg.blockDimZ = 1;
    cfg.hStream = s;
    void *vargs[] = {&dx, &dy, &dz, &n};
    CK(cuLaunchKernelEx(&cfg, vadd, vargs, NULL));
    float one = 1.0f;
    void *sargs[] = {&one, &dz, &dy, &n};
    CK(cuLaunchKernel(saxpy, (N + 255) / 256, 1, 1, 256, 1, 1, 0, s, sargs, NULL));
    CK(cuMemcpyDtoHAsync(out, dy, bytes, s));
    CUgraph cg;
    CK(cuStreamEndCapture(s, &cg));
    size_t count = 0;
    CK(cuGraphGetNodes(cg, NULL, &count));
    if (count != 3)
        fail("captured graph has %zu nodes", count);
    CUgraphExec cxg;
    CK(cuGraphInstantiate(&cxg, cg, 0));
    for (int i = 0; i < N; i++)
        want[i] = hy[i];
    for (int round = 0; round < 10; round++) {
        CK(cuGraphLaunch(cxg, s));
        CK(cuStreamSynchronize(s));
        for (int i = 0; i < N; i++)
            want[i] = (hx[i] + want[i]) + want[i];
        expect("captured kernels", out, want);
    }
    printf("captured kernels ok\n");

    /* Kernels over stream-ordered allocations, also captured. */
    CUdeviceptr pa, pb;
    CK(cuMemAllocAsync(&pa, bytes, s));
    CK(cuMemAllocAsync(&pb, bytes, s));
    CK(cuMemcpyHtoDAsync(pa, hx, bytes, s));
    CK(cuMemsetD32Async(pb, 0, N, s));
    float four = 4.0f;
    void *pargs[] = {&four, &pa, &pb, &n};
    CK(cuLaunchKernel(saxpy, (N + 255) / 256, 1, 1, 256, 1, 1, 0, s, pargs, NULL));
    CK(cuMemcpyDtoHAsync(out, pb, bytes, s));
    CK(cuMemFreeAsync(pa, s));
    CK(cuMemFreeAsync(pb, s));
    CK(cuStreamSynchronize(s));
    for (int i = 0; i < N; i++)
        want[i] = 4.0f * hx[i];
    expect("kernel over cuMemAllocAsync memory", out, want);

    CK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    CUdeviceptr gm;
    CK(cuMemAllocAsync(&gm, bytes, s));
    CK(cuMemsetD32Async(gm, 0x40000000u /* 2.0f */, N, s));
    void *gargs[] = {&one, &dx, &gm, &n};
    CK(cuLaunchKernel(saxpy, (N + 255) / 256, 1, 1, 256, 1, 1, 0, s, gargs, NULL));
    CK(cuMemcpyDtoHAsync(out, gm, bytes, s));
    CK(cuMemFreeAsync(gm, s));
    CUgraph mg;
    CK(cuStreamEndCapture(s, &mg));
    CUgraphExec mx;
    CK(cuGraphInstantiate(&mx, mg, 0));
    for (int round = 0; round < 3; round++) {
        memset(out, 0, bytes);
        CK(cuGraphLaunch(mx, s));
        CK(cuStreamSynchronize(s));
        for (int i = 0; i < N; i++)
            want[i] = hx[i] + 2.0f;
        expect("graph memory with a kernel", out, want);
    }
    printf("stream-ordered memory with kernels ok\n");

    CK(cuGraphExecDestroy(mx));
    CK(cuGraphDestroy(mg));
    CK(cuGraphExecDestroy(cxg));
    CK(cuGraphDestroy(cg));
    CK(cuGraphExecDestroy(x));
    CK(cuGraphDestroy(g));
    CK(cuStreamDestroy(s));
    CK(cuMemFree(dx));
    CK(cuMemFree(dy));
    CK(cuMemFree(dz));
    printf("PASS " NAME "\n");
    return 0;
}
