/*
 * driver_features: explicit contexts, context limits, launch configuration
 * checks and device printf through the driver API (a CI program: its
 * kernels are gpupool's built-in ones; natively, where there is no built-in
 * module, the same two kernels load from PTX, so the launch codes below are
 * the native driver's own and both runs print the same lines).
 *
 * Expected: every refused launch fails at the launch call with the driver's
 * code and the next cuCtxSynchronize succeeds (nothing latched); device
 * printf lines appear at the synchronization, between the host lines
 * printed before and after it, also when stdout is a pipe.
 */
/* The deprecated execution control API (cuParamSet*, cuLaunchGrid) is
 * exercised too: no deprecation warnings for it. */
#define CUDA_ENABLE_DEPRECATED
#include <cuda.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "driver_features"

#include "check_driver.h"

#define EXPECT(call, want)                                                    \
    do {                                                                      \
        CUresult r_ = (call);                                                 \
        printf("%-28s -> %s\n", #want, err_name(r_));                         \
        if (r_ != (want))                                                     \
            fail("line %d: %s -> %s, expected %s", __LINE__, #call,           \
                 err_name(r_), #want);                                        \
        CK(cuCtxSynchronize());                                               \
    } while (0)

static void contexts(CUdevice dev)
{
    CUcontext a = NULL, b = NULL, cur = NULL, popped = NULL;
    CK(cuCtxCreate(&a, NULL, 0, dev)); /* cuCtxCreate_v4, null params */
    CK(cuCtxGetCurrent(&cur));
    if (cur != a)
        fail("the created context is not current");
    CUctxCreateParams params;
    memset(&params, 0, sizeof params);
    CK(cuCtxCreate(&b, &params, 0, dev)); /* zeroed params: as _v2 */
    unsigned long long ida = 0, idb = 0;
    CK(cuCtxGetId(a, &ida));
    CK(cuCtxGetId(b, &idb));
    if (ida == idb)
        fail("two contexts share the id %llu", ida);
    unsigned flags = 0;
    CK(cuCtxSetFlags(CU_CTX_SCHED_BLOCKING_SYNC));
    CK(cuCtxGetFlags(&flags));
    if ((flags & CU_CTX_SCHED_MASK) != CU_CTX_SCHED_BLOCKING_SYNC)
        fail("cuCtxGetFlags: %#x", flags);
    CK(cuCtxPopCurrent(&popped));
    if (popped != b)
        fail("popped the wrong context");
    CK(cuCtxGetCurrent(&cur));
    if (cur != a)
        fail("after the pop, the first context is not current");
    CK(cuCtxPushCurrent(b));
    CK(cuCtxPopCurrent(NULL));
    CK(cuCtxDestroy(b));
    CK(cuCtxDestroy(a));
    printf("contexts: create (null and zeroed params), id, flags, push/pop, destroy ok\n");
}

static void limits(void)
{
    static const struct { CUlimit limit; const char *name; } all[] = {
        {CU_LIMIT_STACK_SIZE, "STACK_SIZE"},
        {CU_LIMIT_PRINTF_FIFO_SIZE, "PRINTF_FIFO_SIZE"},
        {CU_LIMIT_MALLOC_HEAP_SIZE, "MALLOC_HEAP_SIZE"},
        {CU_LIMIT_DEV_RUNTIME_SYNC_DEPTH, "DEV_RUNTIME_SYNC_DEPTH"},
        {CU_LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT, "DEV_RUNTIME_PENDING_LAUNCH_COUNT"},
        {CU_LIMIT_MAX_L2_FETCH_GRANULARITY, "MAX_L2_FETCH_GRANULARITY"},
        {CU_LIMIT_PERSISTING_L2_CACHE_SIZE, "PERSISTING_L2_CACHE_SIZE"},
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        size_t v = 0;
        CUresult r = cuCtxGetLimit(&v, all[i].limit);
        /* DEV_RUNTIME_SYNC_DEPTH is gone on Hopper with CUDA 13 (the
           driver answers UNSUPPORTED_LIMIT), so an unsupported limit is
           reported, not a failure. */
        if (r == CUDA_ERROR_UNSUPPORTED_LIMIT) {
            printf("limit %s: unsupported\n", all[i].name);
            continue;
        }
        CK(r);
        printf("INFO limit %s = %zu\n", all[i].name, v);
    }
    size_t heap = 0, fifo = 0;
    CK(cuCtxSetLimit(CU_LIMIT_MALLOC_HEAP_SIZE, 64u << 20));
    CK(cuCtxGetLimit(&heap, CU_LIMIT_MALLOC_HEAP_SIZE));
    if (heap < (64u << 20))
        fail("MALLOC_HEAP_SIZE is %zu after setting 64 MiB", heap);
    CK(cuCtxSetLimit(CU_LIMIT_PRINTF_FIFO_SIZE, 4u << 20));
    CK(cuCtxGetLimit(&fifo, CU_LIMIT_PRINTF_FIFO_SIZE));
    if (fifo < (4u << 20))
        fail("PRINTF_FIFO_SIZE is %zu after setting 4 MiB", fifo);
    printf("limits: malloc heap and printf FIFO set ok\n");
}

static CUresult launch_ex(CUfunction f, unsigned gx, unsigned bx, CUlaunchAttribute *attrs,
                          unsigned n)
{
    CUlaunchConfig c;
    memset(&c, 0, sizeof c);
    c.gridDimX = gx, c.gridDimY = 1, c.gridDimZ = 1;
    c.blockDimX = bx, c.blockDimY = 1, c.blockDimZ = 1;
    c.attrs = attrs, c.numAttrs = n;
    return cuLaunchKernelEx(&c, f, NULL, NULL);
}

static void launches(CUfunction empty)
{
    EXPECT(cuLaunchKernel(empty, 1, 1, 1, 4096, 1, 1, 0, NULL, NULL, NULL), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(empty, 1, 1, 1, 0, 1, 1, 0, NULL, NULL, NULL), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(empty, 1, 1, 1, 1, 1, 65, 0, NULL, NULL, NULL), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(empty, 1, 65536, 1, 1, 1, 1, 0, NULL, NULL, NULL), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(empty, 1, 1, 1, 32, 1, 1, (48 << 10) + 1, NULL, NULL, NULL),
           CUDA_ERROR_INVALID_VALUE);
    CUlaunchAttribute a;
    memset(&a, 0, sizeof a);
    a.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    a.value.clusterDim.x = 3, a.value.clusterDim.y = 1, a.value.clusterDim.z = 1;
    EXPECT(launch_ex(empty, 4, 32, &a, 1), CUDA_ERROR_INVALID_CLUSTER_SIZE);
    a.value.clusterDim.x = 2;
    EXPECT(launch_ex(empty, 4, 32, &a, 1), CUDA_SUCCESS);
    memset(&a, 0, sizeof a);
    a.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    a.value.programmaticStreamSerializationAllowed = 1;
    EXPECT(launch_ex(empty, 2, 32, &a, 1), CUDA_SUCCESS);
    EXPECT(cuLaunchCooperativeKernel(empty, 1u << 20, 1, 1, 1024, 1, 1, 0, NULL, NULL),
           CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE);
    EXPECT(cuLaunchCooperativeKernel(empty, 4, 1, 1, 256, 1, 1, 0, NULL, NULL), CUDA_SUCCESS);
    EXPECT(cuLaunchKernel(empty, 1, 1, 1, 1024, 1, 1, 0, NULL, NULL, NULL), CUDA_SUCCESS);
    /* The largest cluster a launch of 16 blocks of 128 threads can have. */
    CUlaunchConfig c;
    memset(&c, 0, sizeof c);
    c.gridDimX = 16, c.gridDimY = 1, c.gridDimZ = 1;
    c.blockDimX = 128, c.blockDimY = 1, c.blockDimZ = 1;
    int cluster_size = -1;
    CK(cuOccupancyMaxPotentialClusterSize(&cluster_size, empty, &c));
    printf("potential cluster size: %d\n", cluster_size);
}

/* Instantiates and runs `g` once, prints `done`, destroys both. */
static void run_and_destroy(CUgraph g, const char *done)
{
    CUgraphExec exec;
    CK(cuGraphInstantiate(&exec, g, 0));
    CK(cuGraphLaunch(exec, 0));
    CK(cuCtxSynchronize());
    printf("%s\n", done);
    CK(cuGraphExecDestroy(exec));
    CK(cuGraphDestroy(g));
}

/* Kernel node attributes of a graph: read back as set, copied to another
 * node, applied when the graph runs. */
static void node_attributes(CUfunction empty)
{
    CUgraph g;
    CUgraphNode a, b;
    CUDA_KERNEL_NODE_PARAMS p;
    memset(&p, 0, sizeof p);
    p.func = empty;
    p.gridDimX = 4, p.gridDimY = 1, p.gridDimZ = 1;
    p.blockDimX = 32, p.blockDimY = 1, p.blockDimZ = 1;
    CK(cuGraphCreate(&g, 0));
    CK(cuGraphAddKernelNode(&a, g, NULL, 0, &p));
    CK(cuGraphAddKernelNode(&b, g, &a, 1, &p));
    CUkernelNodeAttrValue v;
    memset(&v, 0xff, sizeof v);
    CK(cuGraphKernelNodeGetAttribute(a, CU_KERNEL_NODE_ATTRIBUTE_CLUSTER_DIMENSION, &v));
    printf("node cluster (default)       -> %u %u %u\n", v.clusterDim.x, v.clusterDim.y, v.clusterDim.z);
    CK(cuGraphKernelNodeGetAttribute(a, CU_KERNEL_NODE_ATTRIBUTE_PRIORITY, &v));
    printf("node priority (default)      -> %d\n", v.priority);
    int least, greatest;
    CK(cuCtxGetStreamPriorityRange(&least, &greatest));
    memset(&v, 0, sizeof v);
    v.clusterDim.x = 2, v.clusterDim.y = 1, v.clusterDim.z = 1;
    CK(cuGraphKernelNodeSetAttribute(a, CU_KERNEL_NODE_ATTRIBUTE_CLUSTER_DIMENSION, &v));
    memset(&v, 0, sizeof v);
    v.priority = greatest;
    CK(cuGraphKernelNodeSetAttribute(a, CU_KERNEL_NODE_ATTRIBUTE_PRIORITY, &v));
    memset(&v, 0, sizeof v);
    CK(cuGraphKernelNodeGetAttribute(a, CU_KERNEL_NODE_ATTRIBUTE_CLUSTER_DIMENSION, &v));
    printf("node cluster (set)           -> %u %u %u\n", v.clusterDim.x, v.clusterDim.y, v.clusterDim.z);
    CK(cuGraphKernelNodeGetAttribute(a, CU_KERNEL_NODE_ATTRIBUTE_PRIORITY, &v));
    printf("node priority is greatest    -> %d\n", v.priority == greatest);
    CK(cuGraphKernelNodeCopyAttributes(b, a));
    memset(&v, 0, sizeof v);
    CK(cuGraphKernelNodeGetAttribute(b, CU_KERNEL_NODE_ATTRIBUTE_CLUSTER_DIMENSION, &v));
    printf("node cluster (copied)        -> %u %u %u\n", v.clusterDim.x, v.clusterDim.y, v.clusterDim.z);
    run_and_destroy(g, "graph with node attributes   -> ran");

    /* A programmatic edge between two kernel nodes: kept, reported back,
     * refused into a node that is not a kernel. */
    CUgraphNode c, d, empty_node;
    CK(cuGraphCreate(&g, 0));
    CK(cuGraphAddKernelNode(&c, g, NULL, 0, &p));
    CK(cuGraphAddKernelNode(&d, g, NULL, 0, &p));
    CK(cuGraphAddEmptyNode(&empty_node, g, NULL, 0));
    CUgraphEdgeData e;
    memset(&e, 0, sizeof e);
    e.from_port = CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC;
    e.type = CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC;
    CK(cuGraphAddDependencies_v2(g, &c, &d, &e, 1));
    EXPECT(cuGraphAddDependencies_v2(g, &c, &empty_node, &e, 1), CUDA_ERROR_INVALID_VALUE);
    CUgraphNode from[2], to[2];
    CUgraphEdgeData data[2];
    size_t count = 2;
    CK(cuGraphGetEdges_v2(g, from, to, data, &count));
    printf("programmatic edge            -> %zu edge(s), from port %u, type %u\n", count,
           (unsigned)data[0].from_port, (unsigned)data[0].type);
    /* The same edge given with a new node: refused into an empty node,
     * taken into a kernel node. */
    CUgraphNodeParams np;
    CUgraphNode added;
    memset(&np, 0, sizeof np);
    np.type = CU_GRAPH_NODE_TYPE_EMPTY;
    EXPECT(cuGraphAddNode_v2(&added, g, &c, &e, 1, &np), CUDA_ERROR_INVALID_VALUE);
    np.type = CU_GRAPH_NODE_TYPE_KERNEL;
    np.kernel.func = empty;
    np.kernel.gridDimX = 4, np.kernel.gridDimY = 1, np.kernel.gridDimZ = 1;
    np.kernel.blockDimX = 32, np.kernel.blockDimY = 1, np.kernel.blockDimZ = 1;
    CK(cuGraphAddNode_v2(&added, g, &c, &e, 1, &np));
    count = 0;
    CK(cuGraphGetEdges_v2(g, NULL, NULL, NULL, &count));
    printf("edges after cuGraphAddNode_v2 -> %zu\n", count);
    run_and_destroy(g, "graph with a programmatic edge -> ran");
}

static void device_printf(CUfunction print_ids)
{
    unsigned tag = 11;
    void *args[] = {&tag};
    printf("host line 1\n");
    CK(cuLaunchKernel(print_ids, 1, 1, 1, 2, 1, 1, 0, NULL, args, NULL));
    printf("host line 2\n");
    CK(cuCtxSynchronize());
    printf("host line 3\n");
    tag = 12;
    CK(cuLaunchKernel(print_ids, 1, 1, 1, 1, 1, 1, 0, NULL, args, NULL));
    CK(cuCtxSynchronize());
    printf("host line 4\n");
    /* The deprecated execution control API: the block shape and the
     * parameters set on the function, then a grid launch. */
    CK(cuFuncSetBlockShape(print_ids, 2, 1, 1));
    CK(cuFuncSetSharedSize(print_ids, 0));
    CK(cuParamSetSize(print_ids, sizeof tag));
    CK(cuParamSeti(print_ids, 0, 13));
    CK(cuLaunchGrid(print_ids, 1, 1));
    CK(cuCtxSynchronize());
    printf("host line 5\n");
}

/* The built-in kernels used here, for native runs: nvcc's PTX (compute_90,
 * clusters need it) of
 *   extern "C" __global__ void empty() {}
 *   extern "C" __global__ void print_ids(unsigned tag) {
 *       printf("gpupool printf %u: block %u thread %u\n", tag, blockIdx.x, threadIdx.x);
 *   }
 */
static const char native_ptx[] =
    ".version 8.0\n"
    ".target sm_90\n"
    ".address_size 64\n"
    ".extern .func  (.param .b32 func_retval0) vprintf\n"
    "(\n"
    "    .param .b64 vprintf_param_0,\n"
    "    .param .b64 vprintf_param_1\n"
    ")\n"
    ";\n"
    ".global .align 1 .b8 $str[39] = {103, 112, 117, 112, 111, 111, 108, 32, 112, 114, 105, 110, 116, 102, 32, 37, 117, 58, 32, 98, 108, 111, 99, 107, 32, 37, 117, 32, 116, 104, 114, 101, 97, 100, 32, 37, 117, 10};\n"
    ".visible .entry empty()\n"
    "{\n"
    "    ret;\n"
    "}\n"
    ".visible .entry print_ids(\n"
    "    .param .u32 print_ids_param_0\n"
    ")\n"
    "{\n"
    "    .local .align 8 .b8     __local_depot1[16];\n"
    "    .reg .b64     %SP;\n"
    "    .reg .b64     %SPL;\n"
    "    .reg .b32     %r<5>;\n"
    "    .reg .b64     %rd<5>;\n"
    "    mov.u64     %SPL, __local_depot1;\n"
    "    cvta.local.u64     %SP, %SPL;\n"
    "    add.u64     %rd1, %SP, 0;\n"
    "    add.u64     %rd2, %SPL, 0;\n"
    "    mov.u32     %r1, %tid.x;\n"
    "    mov.u32     %r2, %ctaid.x;\n"
    "    ld.param.u32     %r3, [print_ids_param_0];\n"
    "    st.local.v2.u32     [%rd2], {%r3, %r2};\n"
    "    st.local.u32     [%rd2+8], %r1;\n"
    "    mov.u64     %rd3, $str;\n"
    "    cvta.global.u64     %rd4, %rd3;\n"
    "    {\n"
    "    .reg .b32 temp_param_reg;\n"
    "    .param .b64 param0;\n"
    "    st.param.b64     [param0+0], %rd4;\n"
    "    .param .b64 param1;\n"
    "    st.param.b64     [param1+0], %rd1;\n"
    "    .param .b32 retval0;\n"
    "    call.uni (retval0),\n"
    "    vprintf,\n"
    "    (\n"
    "    param0,\n"
    "    param1\n"
    "    );\n"
    "    ld.param.b32     %r4, [retval0+0];\n"
    "    }\n"
    "    ret;\n"
    "}\n";

int main(void)
{
    CUdevice dev;
    CUcontext primary;
    CK(cuInit(0));
    CK(cuDeviceGet(&dev, 0));
    contexts(dev);
    CK(cuDevicePrimaryCtxRetain(&primary, dev));
    CK(cuCtxSetCurrent(primary));
    limits();
    CUmodule m;
    const char builtin[] = "gpupool-builtin-kernels/v1\n";
    if (cuModuleLoadData(&m, builtin) == CUDA_SUCCESS) {
        CUfunction empty, print_ids;
        CK(cuModuleGetFunction(&empty, m, "empty"));
        CK(cuModuleGetFunction(&print_ids, m, "print_ids"));
        launches(empty);
        node_attributes(empty);
        device_printf(print_ids);
        CK(cuModuleUnload(m));
    } else {
        /* Natively: the same kernels as PTX, so the output matches. */
        CUfunction empty, print_ids;
        printf("INFO no gpupool built-in module: the same kernels from PTX\n");
        CK(cuModuleLoadData(&m, native_ptx));
        CK(cuModuleGetFunction(&empty, m, "empty"));
        CK(cuModuleGetFunction(&print_ids, m, "print_ids"));
        launches(empty);
        node_attributes(empty);
        device_printf(print_ids);
        CK(cuModuleUnload(m));
    }
    CK(cuDevicePrimaryCtxRelease(dev));
    printf("PASS " NAME "\n");
    return 0;
}
