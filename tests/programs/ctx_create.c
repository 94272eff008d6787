/*
 * ctx_create: explicit contexts through the driver API (a CI program, no
 * kernels): cuCtxCreate_v4 (CUDA 13's cuCtxCreate) with NULL and with
 * zeroed CUctxCreateParams, push/pop, ids, flags, destroy, context events
 * (cuCtxRecordEvent, cuCtxWaitEvent, refused during a capture); execution
 * affinity is refused by gpupool (CUDA_ERROR_NOT_SUPPORTED) and printed,
 * not checked, since a native driver may accept it.
 */
#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "ctx_create"

#define CK(call)                                                              \
    do {                                                                      \
        CUresult r_ = (call);                                                 \
        if (r_ != CUDA_SUCCESS) {                                             \
            const char *n_ = NULL;                                            \
            cuGetErrorName(r_, &n_);                                          \
            printf("FAIL " NAME ": line %d: %s -> %s\n", __LINE__, #call,     \
                   n_ ? n_ : "?");                                            \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

#define REQUIRE(cond)                                                         \
    do {                                                                      \
        if (!(cond)) {                                                        \
            printf("FAIL " NAME ": line %d: %s\n", __LINE__, #cond);          \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

int main(void)
{
    CUdevice dev;
    CUcontext a = NULL, b = NULL, cur = NULL, popped = NULL;
    CK(cuInit(0));
    CK(cuDeviceGet(&dev, 0));

    CK(cuCtxCreate_v4(&a, NULL, 0, dev));
    CK(cuCtxGetCurrent(&cur));
    REQUIRE(cur == a);
    CUctxCreateParams params;
    memset(&params, 0, sizeof params);
    CK(cuCtxCreate_v4(&b, &params, CU_CTX_SCHED_SPIN, dev));
    CK(cuCtxGetCurrent(&cur));
    REQUIRE(cur == b);
    unsigned flags = 0;
    CK(cuCtxGetFlags(&flags));
    REQUIRE((flags & CU_CTX_SCHED_MASK) == CU_CTX_SCHED_SPIN);
    unsigned long long ida = 0, idb = 0;
    CK(cuCtxGetId(a, &ida));
    CK(cuCtxGetId(b, &idb));
    REQUIRE(ida != idb);

    CK(cuCtxPopCurrent(&popped));
    REQUIRE(popped == b);
    CK(cuCtxGetCurrent(&cur));
    REQUIRE(cur == a);
    CK(cuCtxPushCurrent(b));
    CK(cuCtxGetCurrent(&cur));
    REQUIRE(cur == b);
    CK(cuCtxPopCurrent(NULL));

    /* Memory works in a created context. */
    CUdeviceptr p = 0;
    unsigned char in[256], out[256];
    for (int i = 0; i < 256; i++)
        in[i] = (unsigned char)(i * 7 + 1);
    CK(cuMemAlloc(&p, sizeof in));
    CK(cuMemcpyHtoD(p, in, sizeof in));
    CK(cuMemcpyDtoH(out, p, sizeof out));
    REQUIRE(memcmp(in, out, sizeof in) == 0);
    /* It belongs to the context it was allocated in. */
    CUcontext owner = NULL;
    CK(cuPointerGetAttribute(&owner, CU_POINTER_ATTRIBUTE_CONTEXT, p));
    REQUIRE(owner == a);
    CK(cuMemFree(p));

    /* A stream belongs to the context current at its creation; the NULL
     * stream to the caller's current one. */
    CUstream s;
    CUcontext of = NULL;
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CK(cuStreamGetCtx(s, &of));
    REQUIRE(of == a);
    CK(cuCtxPushCurrent(b));
    CK(cuStreamGetCtx(s, &of));
    REQUIRE(of == a);
    CK(cuStreamGetCtx(NULL, &of));
    REQUIRE(of == b);
    CK(cuCtxPopCurrent(NULL));

    /* Context events (CUDA 12.5): an event capturing all work of the
     * context, and all later work waiting for one. A copy ordered after a
     * context-wide wait sees the memset recorded before it. */
    CUevent whole;
    CK(cuEventCreate(&whole, CU_EVENT_DISABLE_TIMING));
    CK(cuMemAlloc(&p, sizeof in));
    CK(cuMemsetD8Async(p, 0x5a, sizeof in, s));
    CK(cuCtxRecordEvent(a, whole));
    CK(cuEventSynchronize(whole));
    CK(cuMemcpyDtoH(out, p, sizeof out));
    REQUIRE(out[0] == 0x5a && out[255] == 0x5a);
    CK(cuMemsetD8Async(p, 0x3c, sizeof in, s));
    CK(cuCtxRecordEvent(a, whole));
    CK(cuCtxWaitEvent(a, whole));
    CK(cuMemcpyDtoHAsync(out, p, sizeof out, NULL));
    CK(cuStreamSynchronize(NULL));
    REQUIRE(out[0] == 0x3c && out[255] == 0x3c);
    printf("context events: record and wait ordered the copies\n");
    /* While a stream captures, both are refused and the capture is void. */
    CUstream cap;
    CUgraph g = NULL;
    CK(cuStreamCreate(&cap, CU_STREAM_NON_BLOCKING));
    CK(cuStreamBeginCapture(cap, CU_STREAM_CAPTURE_MODE_RELAXED));
    CK(cuMemsetD8Async(p, 1, sizeof in, cap));
    CUresult during = cuCtxRecordEvent(a, whole);
    CUresult ended = cuStreamEndCapture(cap, &g);
    const char *dn = NULL, *en = NULL;
    cuGetErrorName(during, &dn);
    cuGetErrorName(ended, &en);
    printf("context event during a capture: %s; the capture's end: %s\n", dn ? dn : "?", en ? en : "?");
    if (g)
        CK(cuGraphDestroy(g));
    CK(cuStreamDestroy(cap));
    CK(cuEventDestroy(whole));
    CK(cuMemFree(p));
    CK(cuStreamDestroy(s));

    /* Execution affinity: an SM count for the context. */
    CUexecAffinityParam affinity;
    memset(&affinity, 0, sizeof affinity);
    affinity.type = CU_EXEC_AFFINITY_TYPE_SM_COUNT;
    affinity.param.smCount.val = 8;
    params.execAffinityParams = &affinity;
    params.numExecAffinityParams = 1;
    CUcontext c = NULL;
    CUresult r = cuCtxCreate_v4(&c, &params, 0, dev);
    const char *n = NULL;
    cuGetErrorName(r, &n);
    printf("INFO cuCtxCreate_v4 with execution affinity -> %s\n", n ? n : "?");
    if (r == CUDA_SUCCESS)
        CK(cuCtxDestroy(c));

    CK(cuCtxDestroy(b));
    CK(cuCtxDestroy(a));
    printf("PASS " NAME "\n");
    return 0;
}
