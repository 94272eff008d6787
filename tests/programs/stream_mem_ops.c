/*
 * stream_mem_ops: stream memory operations through the driver API, no
 * kernels (a CI program).
 *
 * cuStreamWriteValue32/64 and cuStreamWaitValue32/64 on one stream (each
 * wait met by a write queued before it), a cuStreamBatchMemOp with writes,
 * a memory barrier and a wait, the same captured into a graph, and an
 * explicit batch-mem-op node whose parameters are read back and changed in
 * the instantiated graph. Every word is read back and checked; the output
 * is deterministic, so a native run and a run through the stub can be
 * diffed. Waits released by other streams or by kernels are in
 * mem_ops_kernels.cu (GPU).
 */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define NAME "stream_mem_ops"

#include "check_driver.h"

#define REQUIRE(cond, ...)                                                    \
    do {                                                                      \
        if (!(cond))                                                          \
            fail(__VA_ARGS__);                                                \
    } while (0)

static uint32_t word32(CUdeviceptr at)
{
    uint32_t v = 0;
    CK(cuMemcpyDtoH(&v, at, sizeof v));
    return v;
}

static uint64_t word64(CUdeviceptr at)
{
    uint64_t v = 0;
    CK(cuMemcpyDtoH(&v, at, sizeof v));
    return v;
}

static CUstreamBatchMemOpParams write32(CUdeviceptr at, uint32_t value)
{
    CUstreamBatchMemOpParams p;
    memset(&p, 0, sizeof p);
    p.writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_32;
    p.writeValue.address = at;
    p.writeValue.value = value;
    return p;
}

int main(void)
{
    CUcontext ctx = primary_context();
    CUdevice dev;
    CK(cuCtxGetDevice(&dev));
    int wide = 0;
    CK(cuDeviceGetAttribute(&wide, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, dev));

    CUstream s;
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CUdeviceptr buf;
    CK(cuMemAlloc(&buf, 4096));
    CK(cuMemsetD8(buf, 0, 4096));
    /* The memset runs on the legacy stream, which a non-blocking stream does
     * not wait for: without this the writes below could land first. */
    CK(cuCtxSynchronize());

    /* Single operations; every wait is met by a write before it. */
    CK(cuStreamWriteValue32(s, buf, 0x11223344, CU_STREAM_WRITE_VALUE_DEFAULT));
    CK(cuStreamWaitValue32(s, buf, 0x11223344, CU_STREAM_WAIT_VALUE_EQ));
    CK(cuStreamWaitValue32(s, buf, 0x11220000, CU_STREAM_WAIT_VALUE_GEQ));
    CK(cuStreamWaitValue32(s, buf, 0x4, CU_STREAM_WAIT_VALUE_AND));
    CK(cuStreamWriteValue32(s, buf + 4, 7, CU_STREAM_WRITE_VALUE_DEFAULT));
    /* The v2 operations refuse CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER. */
    REQUIRE(cuStreamWriteValue32(s, buf + 4, 8, CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER) == CUDA_ERROR_INVALID_VALUE,
            "a write without a memory barrier was accepted");
    if (wide) {
        CK(cuStreamWriteValue64(s, buf + 8, 0x0102030405060708ull, 0));
        CK(cuStreamWaitValue64(s, buf + 8, 0x0102030405060708ull, CU_STREAM_WAIT_VALUE_EQ));
    }
    /* One batch: two writes, a GPU-scope barrier, a wait on the first. */
    CUstreamBatchMemOpParams ops[4];
    ops[0] = write32(buf + 16, 99);
    ops[1] = write32(buf + 20, 100);
    memset(&ops[2], 0, sizeof ops[2]);
    ops[2].memoryBarrier.operation = CU_STREAM_MEM_OP_BARRIER;
    ops[2].memoryBarrier.flags = CU_STREAM_MEMORY_BARRIER_TYPE_GPU;
    memset(&ops[3], 0, sizeof ops[3]);
    ops[3].waitValue.operation = CU_STREAM_MEM_OP_WAIT_VALUE_32;
    ops[3].waitValue.address = buf + 16;
    ops[3].waitValue.value = 99;
    ops[3].waitValue.flags = CU_STREAM_WAIT_VALUE_EQ;
    CK(cuStreamBatchMemOp(s, 4, ops, 0));
    CK(cuStreamSynchronize(s));
    REQUIRE(word32(buf) == 0x11223344, "first word %#x", word32(buf));
    REQUIRE(word32(buf + 4) == 7, "second word %u", word32(buf + 4));
    if (wide)
        REQUIRE(word64(buf + 8) == 0x0102030405060708ull, "64-bit word %#llx",
                (unsigned long long)word64(buf + 8));
    REQUIRE(word32(buf + 16) == 99 && word32(buf + 20) == 100, "batch words %u %u",
            word32(buf + 16), word32(buf + 20));
    printf("writes and met waits ok\n");

    /* Captured: a write, a wait on it and a memset after them. */
    CK(cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    CK(cuStreamWriteValue32(s, buf + 32, 5, 0));
    CK(cuStreamWaitValue32(s, buf + 32, 5, CU_STREAM_WAIT_VALUE_EQ));
    CK(cuMemsetD32Async(buf + 36, 0xabababab, 1, s));
    CUgraph g;
    CK(cuStreamEndCapture(s, &g));
    size_t n = 0;
    CK(cuGraphGetNodes(g, NULL, &n));
    CUgraphNode nodes[8];
    REQUIRE(n > 0 && n <= 8, "%zu captured nodes", n);
    CK(cuGraphGetNodes(g, nodes, &n));
    int batch_nodes = 0;
    for (size_t i = 0; i < n; ++i) {
        CUgraphNodeType t;
        CK(cuGraphNodeGetType(nodes[i], &t));
        batch_nodes += t == CU_GRAPH_NODE_TYPE_BATCH_MEM_OP;
    }
    printf("captured %zu nodes, %d of them batch memory operations\n", n, batch_nodes);
    CUgraphExec exec;
    CK(cuGraphInstantiate(&exec, g, 0));
    for (int round = 0; round < 2; ++round) {
        CK(cuMemsetD8Async(buf + 32, 0, 8, s));
        CK(cuGraphLaunch(exec, s));
        CK(cuStreamSynchronize(s));
        REQUIRE(word32(buf + 32) == 5 && word32(buf + 36) == 0xabababab, "round %d: %u %#x", round,
                word32(buf + 32), word32(buf + 36));
    }
    CK(cuGraphExecDestroy(exec));
    CK(cuGraphDestroy(g));
    printf("captured graph ok\n");

    /* An explicit node: parameters read back, then changed in the exec. */
    CUstreamBatchMemOpParams one = write32(buf + 40, 41);
    CUDA_BATCH_MEM_OP_NODE_PARAMS np;
    memset(&np, 0, sizeof np);
    np.ctx = ctx;
    np.count = 1;
    np.paramArray = &one;
    CUgraph g2;
    CK(cuGraphCreate(&g2, 0));
    CUgraphNode node;
    CK(cuGraphAddBatchMemOpNode(&node, g2, NULL, 0, &np));
    CUDA_BATCH_MEM_OP_NODE_PARAMS got;
    memset(&got, 0, sizeof got);
    CK(cuGraphBatchMemOpNodeGetParams(node, &got));
    REQUIRE(got.count == 1 && got.paramArray != NULL &&
                got.paramArray[0].writeValue.operation == CU_STREAM_MEM_OP_WRITE_VALUE_32 &&
                got.paramArray[0].writeValue.address == buf + 40 &&
                got.paramArray[0].writeValue.value == 41,
            "node parameters read back wrong (count %u)", got.count);
    CK(cuGraphInstantiate(&exec, g2, 0));
    CK(cuGraphLaunch(exec, s));
    CK(cuStreamSynchronize(s));
    REQUIRE(word32(buf + 40) == 41, "node wrote %u", word32(buf + 40));
    one.writeValue.value = 42;
    CK(cuGraphExecBatchMemOpNodeSetParams(exec, node, &np));
    CK(cuGraphLaunch(exec, s));
    CK(cuStreamSynchronize(s));
    REQUIRE(word32(buf + 40) == 42, "changed node wrote %u", word32(buf + 40));
    CK(cuGraphExecDestroy(exec));
    CK(cuGraphDestroy(g2));
    printf("batch memory operation node ok\n");

    CK(cuMemFree(buf));
    CK(cuStreamDestroy(s));
    CK(cuDevicePrimaryCtxRelease(dev));
    printf("PASS " NAME "\n");
    return 0;
}
