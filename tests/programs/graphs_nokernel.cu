// graphs_nokernel: CUDA graphs, stream capture and the stream-ordered
// allocator through the runtime API, with no __global__ function (a CI
// program: it runs on the emulated device too).
//
// - an explicit graph of memset, memcpy (HtoD, DtoD, DtoH), host, child
//   graph and event nodes, launched several times, updated in place
//   (cudaGraphExecUpdate, cudaGraphExecMemsetNodeSetParams) and cloned;
// - stream capture across two streams (fork and join through events) of
//   async copies, memsets and a host function, and the errors of illegal
//   calls during a capture;
// - cudaMallocAsync/cudaFreeAsync with the default and an explicit pool:
//   release threshold, trim, attributes, access, cross-stream use;
// - graph memory nodes made by capturing cudaMallocAsync/cudaFreeAsync.
//
// Every byte that goes through the device is checked. Lines other than
// those starting with TIME or INFO are deterministic.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define NAME "graphs_nokernel"

#include "check.h"

#include "check_bytes.h"

// Host nodes and host functions count their runs and remember the first
// byte of the buffer they were given, as the device left it.
struct HostProbe {
    const unsigned char *buf;
    int runs;
    unsigned char first;
};

static void CUDART_CB probe(void *arg)
{
    HostProbe *p = (HostProbe *)arg;
    p->runs++;
    p->first = p->buf ? p->buf[0] : 0;
}

static const size_t N = 64 * 1024 + 5;

// Explicit graph:
//   set_b (memset b = v) ---------------------------> dtod (b+16 <- a) -> dtoh (out <- b) -> host -> record(done)
//   wait(ready) -> htod (a <- in) ----------------^
//   set_b -> child { memset c = 0x77 -> dtoh (out2 <- c) }
static void explicit_graph(void)
{
    unsigned char *in, *out, *out2, *a, *b, *c;
    CK(cudaMallocHost(&in, N));
    CK(cudaMallocHost(&out, N));
    CK(cudaMallocHost(&out2, N));
    CK(cudaMalloc(&a, N));
    CK(cudaMalloc(&b, N));
    CK(cudaMalloc(&c, N));
    cudaStream_t s;
    cudaEvent_t ready, done;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));

    cudaGraph_t g, child;
    CK(cudaGraphCreate(&g, 0));
    CK(cudaGraphCreate(&child, 0));

    cudaMemsetParams ms = {};
    ms.dst = b;
    ms.value = 0x11;
    ms.elementSize = 1;
    ms.width = N;
    ms.height = 1;
    ms.pitch = 0;
    cudaGraphNode_t set_b, wait, htod, dtod, dtoh, host, childn, rec;
    CK(cudaGraphAddMemsetNode(&set_b, g, nullptr, 0, &ms));
    CK(cudaGraphAddEventWaitNode(&wait, g, nullptr, 0, ready));
    CK(cudaGraphAddMemcpyNode1D(&htod, g, &wait, 1, a, in, N,
                                cudaMemcpyHostToDevice));
    cudaGraphNode_t both[2] = {set_b, htod};
    CK(cudaGraphAddMemcpyNode1D(&dtod, g, both, 2, b + 16, a, N - 32,
                                cudaMemcpyDeviceToDevice));
    CK(cudaGraphAddMemcpyNode1D(&dtoh, g, &dtod, 1, out, b, N,
                                cudaMemcpyDeviceToHost));
    HostProbe hp = {out, 0, 0};
    cudaHostNodeParams hparams = {probe, &hp};
    CK(cudaGraphAddHostNode(&host, g, &dtoh, 1, &hparams));
    CK(cudaGraphAddEventRecordNode(&rec, g, &host, 1, done));

    cudaMemsetParams cs = ms;
    cs.dst = c;
    cs.value = 0x77;
    cudaGraphNode_t cset, ccopy;
    CK(cudaGraphAddMemsetNode(&cset, child, nullptr, 0, &cs));
    CK(cudaGraphAddMemcpyNode1D(&ccopy, child, &cset, 1, out2, c, N,
                                cudaMemcpyDeviceToHost));
    CK(cudaGraphAddChildGraphNode(&childn, g, &set_b, 1, child));

    size_t count = 0;
    CK(cudaGraphGetNodes(g, nullptr, &count));
    printf("explicit graph: %zu nodes", count);
    CK(cudaGraphGetRootNodes(g, nullptr, &count));
    printf(", %zu roots", count);
    CK(cudaGraphGetEdges(g, nullptr, nullptr, nullptr, &count));
    printf(", %zu edges\n", count);
    cudaGraphNodeType t;
    CK(cudaGraphNodeGetType(childn, &t));
    REQUIRE(t == cudaGraphNodeTypeGraph, "child node type %d", (int)t);
    CK(cudaGraphNodeGetType(host, &t));
    REQUIRE(t == cudaGraphNodeTypeHost, "host node type %d", (int)t);
    CK(cudaGraphNodeGetDependencies(dtod, nullptr, nullptr, &count));
    REQUIRE(count == 2, "dtod has %zu dependencies", count);
    // A cycle is refused: when the edge is added (gpupool) or at the
    // latest when the graph is instantiated.
    {
        cudaGraph_t cyc;
        cudaGraphNode_t e1, e2;
        CK(cudaGraphCreate(&cyc, 0));
        CK(cudaGraphAddEmptyNode(&e1, cyc, nullptr, 0));
        CK(cudaGraphAddEmptyNode(&e2, cyc, &e1, 1));
        cudaError_t added = cudaGraphAddDependencies(cyc, &e2, &e1, nullptr, 1);
        (void)cudaGetLastError();
        if (added == cudaSuccess) {
            cudaGraphExec_t cx;
            cudaError_t inst = cudaGraphInstantiate(&cx, cyc, 0);
            (void)cudaGetLastError();
            REQUIRE(inst != cudaSuccess, "a graph with a cycle was instantiated");
        }
        CK(cudaGraphDestroy(cyc));
    }
    cudaError_t e;

    cudaGraphExec_t x;
    CK(cudaGraphInstantiate(&x, g, 0));
    std::vector<unsigned char> want(N);
    for (int round = 0; round < 3; round++) {
        // The copy node reads the host buffer when the graph runs.
        fill(in, N, 100 + round);
        memset(out, 0, N);
        memset(out2, 0, N);
        CK(cudaEventRecord(ready, s));
        CK(cudaGraphLaunch(x, s));
        CK(cudaEventSynchronize(done));
        CK(cudaStreamSynchronize(s));
        memset(want.data(), 0x11, N);
        memcpy(want.data() + 16, in, N - 32);
        expect_bytes("explicit graph DtoH", out, want.data(), N);
        expect_value("child graph DtoH", out2, N, 0x77);
        REQUIRE(hp.runs == round + 1, "host node ran %d times", hp.runs);
        REQUIRE(hp.first == 0x11, "host node saw 0x%02x", hp.first);
    }

    // Per-node update on the exec only.
    ms.value = 0x22;
    CK(cudaGraphExecMemsetNodeSetParams(x, set_b, &ms));
    fill(in, N, 200);
    CK(cudaEventRecord(ready, s));
    CK(cudaGraphLaunch(x, s));
    CK(cudaStreamSynchronize(s));
    memset(want.data(), 0x22, N);
    memcpy(want.data() + 16, in, N - 32);
    expect_bytes("exec memset update", out, want.data(), N);
    REQUIRE(hp.first == 0x22, "host node saw 0x%02x", hp.first);

    // Whole-graph update: same topology, other memset value.
    cudaMemsetParams ms3 = ms;
    ms3.value = 0x33;
    CK(cudaGraphMemsetNodeSetParams(set_b, &ms3));
    cudaGraphExecUpdateResultInfo info;
    CK(cudaGraphExecUpdate(x, g, &info));
    REQUIRE(info.result == cudaGraphExecUpdateSuccess, "update result %d",
            (int)info.result);
    CK(cudaEventRecord(ready, s));
    CK(cudaGraphLaunch(x, s));
    CK(cudaStreamSynchronize(s));
    memset(want.data(), 0x33, N);
    memcpy(want.data() + 16, in, N - 32);
    expect_bytes("exec update", out, want.data(), N);

    // Another topology is refused.
    cudaGraph_t other;
    cudaGraphNode_t lone;
    CK(cudaGraphCreate(&other, 0));
    CK(cudaGraphAddMemsetNode(&lone, other, nullptr, 0, &ms));
    e = cudaGraphExecUpdate(x, other, &info);
    printf("exec update with another topology -> %s, result %d\n",
           cudaGetErrorName(e), (int)info.result);
    REQUIRE(e == cudaErrorGraphExecUpdateFailure, "update gave %s",
            cudaGetErrorName(e));
    (void)cudaGetLastError();

    // A clone runs like the original (with the current node parameters).
    cudaGraph_t copy;
    CK(cudaGraphClone(&copy, g));
    cudaGraphNode_t set_b2;
    CK(cudaGraphNodeFindInClone(&set_b2, set_b, copy));
    cudaMemsetParams got;
    CK(cudaGraphMemsetNodeGetParams(set_b2, &got));
    REQUIRE(got.value == 0x33 && got.width == N, "clone memset %u x %zu",
            got.value, got.width);
    cudaGraphExec_t xc;
    CK(cudaGraphInstantiate(&xc, copy, 0));
    fill(in, N, 300);
    CK(cudaEventRecord(ready, s));
    CK(cudaGraphLaunch(xc, s));
    CK(cudaStreamSynchronize(s));
    memcpy(want.data() + 16, in, N - 32);
    expect_bytes("cloned graph", out, want.data(), N);

    const char *dot = "/tmp/gpupool_graphs_nokernel.dot";
    CK(cudaGraphDebugDotPrint(g, dot, 0));
    FILE *f = fopen(dot, "r");
    REQUIRE(f != nullptr, "no DOT file");
    fseek(f, 0, SEEK_END);
    REQUIRE(ftell(f) > 0, "empty DOT file");
    fclose(f);
    remove(dot);

    CK(cudaGraphExecDestroy(xc));
    CK(cudaGraphExecDestroy(x));
    CK(cudaGraphDestroy(copy));
    CK(cudaGraphDestroy(other));
    CK(cudaGraphDestroy(g));
    CK(cudaGraphDestroy(child));
    CK(cudaEventDestroy(ready));
    CK(cudaEventDestroy(done));
    CK(cudaStreamDestroy(s));
    CK(cudaFree(a));
    CK(cudaFree(b));
    CK(cudaFree(c));
    CK(cudaFreeHost(in));
    CK(cudaFreeHost(out));
    CK(cudaFreeHost(out2));
}

// Capture across two streams: s1 forks s2 through an event, both work, s1
// joins s2 through another event.
static void capture_two_streams(void)
{
    unsigned char *in, *out, *a, *b, *c;
    CK(cudaMallocHost(&in, N));
    CK(cudaMallocHost(&out, N));
    CK(cudaMalloc(&a, N));
    CK(cudaMalloc(&b, N));
    CK(cudaMalloc(&c, N));
    cudaStream_t s1, s2, s3;
    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s3, cudaStreamNonBlocking));
    cudaEvent_t fork, join;
    CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    HostProbe hp = {nullptr, 0, 0};
    const size_t half = N / 2;

    cudaStreamCaptureStatus st;
    CK(cudaStreamIsCapturing(s1, &st));
    REQUIRE(st == cudaStreamCaptureStatusNone, "capturing before begin");
    CK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
    CK(cudaMemsetAsync(a, 0x22, N, s1));
    CK(cudaEventRecord(fork, s1));
    CK(cudaStreamWaitEvent(s2, fork, 0));
    CK(cudaStreamIsCapturing(s2, &st));
    REQUIRE(st == cudaStreamCaptureStatusActive, "s2 did not join (%d)",
            (int)st);
    CK(cudaMemcpyAsync(b, in, half, cudaMemcpyHostToDevice, s1));
    CK(cudaMemsetAsync(c, 0x33, N, s2));
    CK(cudaLaunchHostFunc(s2, probe, &hp));
    unsigned long long id1 = 0, id2 = 0;
    CK(cudaStreamGetCaptureInfo(s1, &st, &id1));
    CK(cudaStreamGetCaptureInfo(s2, &st, &id2));
    REQUIRE(id1 != 0 && id1 == id2, "capture ids %llu %llu", id1, id2);
    CK(cudaEventRecord(join, s2));
    CK(cudaStreamWaitEvent(s1, join, 0));
    CK(cudaMemcpyAsync(b + half, c, N - half, cudaMemcpyDeviceToDevice, s1));
    CK(cudaMemcpyAsync(a + 100, b, 1000, cudaMemcpyDeviceToDevice, s1));
    CK(cudaMemcpyAsync(out, a, N, cudaMemcpyDeviceToHost, s1));
    cudaGraph_t g;
    CK(cudaStreamEndCapture(s1, &g));
    CK(cudaStreamIsCapturing(s2, &st));
    REQUIRE(st == cudaStreamCaptureStatusNone, "s2 still capturing");
    REQUIRE(hp.runs == 0, "a captured host function ran");
    size_t count = 0;
    CK(cudaGraphGetNodes(g, nullptr, &count));
    printf("captured graph: %zu nodes", count);
    CK(cudaGraphGetRootNodes(g, nullptr, &count));
    printf(", %zu roots\n", count);

    cudaGraphExec_t x;
    CK(cudaGraphInstantiate(&x, g, 0));
    std::vector<unsigned char> want(N);
    for (int round = 0; round < 3; round++) {
        fill(in, N, 400 + round);
        memset(out, 0, N);
        // Launch on the capturing stream and on another one.
        cudaStream_t on = round == 2 ? s3 : s1;
        CK(cudaGraphLaunch(x, on));
        CK(cudaStreamSynchronize(on));
        memset(want.data(), 0x22, N);
        memcpy(want.data() + 100, in, 1000);
        expect_bytes("captured graph", out, want.data(), N);
        REQUIRE(hp.runs == round + 1, "host function ran %d times", hp.runs);
    }
    std::vector<unsigned char> bb(N);
    CK(cudaMemcpy(bb.data(), b, N, cudaMemcpyDeviceToHost));
    memcpy(want.data(), in, half);
    memset(want.data() + half, 0x33, N - half);
    expect_bytes("captured fork/join", bb.data(), want.data(), N);

    // Illegal during a capture: synchronizing the capturing stream. It
    // invalidates the capture, whose end then returns no graph.
    CK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
    CK(cudaMemsetAsync(a, 1, N, s1));
    cudaError_t e = cudaStreamSynchronize(s1);
    printf("cudaStreamSynchronize while capturing -> %s\n",
           cudaGetErrorName(e));
    cudaGraph_t bad = nullptr;
    e = cudaStreamEndCapture(s1, &bad);
    printf("cudaStreamEndCapture after it -> %s\n", cudaGetErrorName(e));
    REQUIRE(e == cudaErrorStreamCaptureInvalidated, "end gave %s",
            cudaGetErrorName(e));
    (void)cudaGetLastError();
    // Ending on a stream that never captured.
    e = cudaStreamEndCapture(s2, &bad);
    REQUIRE(e != cudaSuccess, "end without begin succeeded");
    (void)cudaGetLastError();
    // The same stream captures again fine afterwards.
    CK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeThreadLocal));
    CK(cudaMemsetAsync(a, 0x5C, N, s1));
    cudaGraph_t g2;
    CK(cudaStreamEndCapture(s1, &g2));
    cudaGraphExec_t x2;
    CK(cudaGraphInstantiate(&x2, g2, 0));
    CK(cudaGraphLaunch(x2, s1));
    CK(cudaMemcpyAsync(out, a, N, cudaMemcpyDeviceToHost, s1));
    CK(cudaStreamSynchronize(s1));
    expect_value("second capture", out, N, 0x5C);

    CK(cudaGraphExecDestroy(x2));
    CK(cudaGraphDestroy(g2));
    CK(cudaGraphExecDestroy(x));
    CK(cudaGraphDestroy(g));
    CK(cudaEventDestroy(fork));
    CK(cudaEventDestroy(join));
    CK(cudaStreamDestroy(s1));
    CK(cudaStreamDestroy(s2));
    CK(cudaStreamDestroy(s3));
    CK(cudaFree(a));
    CK(cudaFree(b));
    CK(cudaFree(c));
    CK(cudaFreeHost(in));
    CK(cudaFreeHost(out));
}

static uint64_t pool_u64(cudaMemPool_t p, cudaMemPoolAttr a)
{
    uint64_t v = 0;
    CK(cudaMemPoolGetAttribute(p, a, &v));
    return v;
}

static void stream_ordered(void)
{
    int supported = 0;
    CK(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, 0));
    printf("memory pools supported: %d\n", supported);
    REQUIRE(supported == 1, "no memory pools");

    unsigned char *out;
    CK(cudaMallocHost(&out, N));
    cudaStream_t s1, s2;
    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    cudaEvent_t ev;
    CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));

    // The default pool: allocate, use, free in stream order, reuse.
    cudaMemPool_t def;
    CK(cudaDeviceGetDefaultMemPool(&def, 0));
    cudaMemPool_t cur;
    CK(cudaDeviceGetMemPool(&cur, 0));
    REQUIRE(cur == def, "the current pool is not the default one");
    for (int round = 0; round < 3; round++) {
        unsigned char *p = nullptr;
        CK(cudaMallocAsync(&p, N, s1));
        CK(cudaMemsetAsync(p, 0x40 + round, N, s1));
        CK(cudaMemcpyAsync(out, p, N, cudaMemcpyDeviceToHost, s1));
        CK(cudaFreeAsync(p, s1));
        CK(cudaStreamSynchronize(s1));
        expect_value("cudaMallocAsync buffer", out, N, 0x40 + round);
    }
    uint64_t used = pool_u64(def, cudaMemPoolAttrUsedMemCurrent);
    uint64_t high = pool_u64(def, cudaMemPoolAttrUsedMemHigh);
    REQUIRE(used == 0, "default pool still uses %llu bytes",
            (unsigned long long)used);
    REQUIRE(high >= N, "used high %llu", (unsigned long long)high);
    uint64_t zero = 0;
    CK(cudaMemPoolSetAttribute(def, cudaMemPoolAttrUsedMemHigh, &zero));
    REQUIRE(pool_u64(def, cudaMemPoolAttrUsedMemHigh) == 0, "high not reset");

    // Across streams: s1 allocates and fills, s2 reads after an event and frees.
    unsigned char *p = nullptr, *q = nullptr;
    std::vector<unsigned char> src(N);
    fill(src.data(), N, 77);
    CK(cudaMallocAsync(&p, N, s1));
    CK(cudaMallocAsync(&q, N, s2));
    CK(cudaMemcpyAsync(p, src.data(), N, cudaMemcpyHostToDevice, s1));
    CK(cudaEventRecord(ev, s1));
    CK(cudaStreamWaitEvent(s2, ev, 0));
    CK(cudaMemcpyAsync(q, p, N, cudaMemcpyDeviceToDevice, s2));
    CK(cudaFreeAsync(p, s2));
    CK(cudaMemcpyAsync(out, q, N, cudaMemcpyDeviceToHost, s2));
    CK(cudaStreamSynchronize(s2));
    expect_bytes("cross-stream pool buffers", out, src.data(), N);
    // cudaFree of a stream-ordered allocation is allowed (it synchronizes).
    CK(cudaFree(q));

    // An explicit pool with a release threshold, trimmed at the end.
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = 0;
    cudaMemPool_t pool;
    CK(cudaMemPoolCreate(&pool, &props));
    uint64_t threshold = 64u << 20;
    CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold,
                               &threshold));
    REQUIRE(pool_u64(pool, cudaMemPoolAttrReleaseThreshold) == threshold,
            "threshold not kept");
    int reuse = 0;
    CK(cudaMemPoolGetAttribute(pool, cudaMemPoolReuseAllowOpportunistic,
                               &reuse));
    REQUIRE(reuse == 1, "opportunistic reuse %d", reuse);
    reuse = 0;
    CK(cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowOpportunistic,
                               &reuse));
    reuse = 1;
    CK(cudaMemPoolGetAttribute(pool, cudaMemPoolReuseAllowOpportunistic,
                               &reuse));
    REQUIRE(reuse == 0, "opportunistic reuse not cleared");
    cudaMemAccessDesc acc = {};
    acc.location.type = cudaMemLocationTypeDevice;
    acc.location.id = 0;
    acc.flags = cudaMemAccessFlagsProtReadWrite;
    // The owning device always has access; drivers differ on whether
    // setting it again is accepted, so only the answer below is checked.
    (void)cudaMemPoolSetAccess(pool, &acc, 1);
    (void)cudaGetLastError();
    cudaMemAccessFlags flags = cudaMemAccessFlagsProtNone;
    cudaMemLocation loc = acc.location;
    CK(cudaMemPoolGetAccess(&flags, pool, &loc));
    REQUIRE(flags == cudaMemAccessFlagsProtReadWrite, "access %d", (int)flags);

    unsigned char *bufs[4];
    for (int i = 0; i < 4; i++) {
        CK(cudaMallocFromPoolAsync(&bufs[i], N, pool, s1));
        CK(cudaMemsetAsync(bufs[i], 0x60 + i, N, s1));
    }
    REQUIRE(pool_u64(pool, cudaMemPoolAttrUsedMemCurrent) >= 4 * N,
            "pool use below what is allocated");
    for (int i = 0; i < 4; i++) {
        CK(cudaMemcpyAsync(out, bufs[i], N, cudaMemcpyDeviceToHost, s1));
        CK(cudaStreamSynchronize(s1));
        expect_value("explicit pool buffer", out, N, 0x60 + i);
        CK(cudaFreeAsync(bufs[i], s1));
    }
    CK(cudaStreamSynchronize(s1));
    REQUIRE(pool_u64(pool, cudaMemPoolAttrUsedMemCurrent) == 0, "pool in use");
    REQUIRE(pool_u64(pool, cudaMemPoolAttrReservedMemCurrent) >= 4 * N,
            "memory under the threshold was released");
    CK(cudaMemPoolTrimTo(pool, 0));
    REQUIRE(pool_u64(pool, cudaMemPoolAttrReservedMemCurrent) == 0,
            "trim kept %llu bytes",
            (unsigned long long)pool_u64(pool, cudaMemPoolAttrReservedMemCurrent));

    // The explicit pool as the device's current pool.
    CK(cudaDeviceSetMemPool(0, pool));
    CK(cudaMallocAsync(&p, 1000, s1));
    REQUIRE(pool_u64(pool, cudaMemPoolAttrUsedMemCurrent) >= 1000,
            "cudaMallocAsync did not use the current pool");
    CK(cudaFreeAsync(p, s1));
    CK(cudaDeviceSetMemPool(0, def));
    CK(cudaStreamSynchronize(s1));
    CK(cudaMemPoolDestroy(pool));

    // Pools cannot be exported.
    cudaMemPoolPtrExportData exp;
    cudaError_t e = cudaMemPoolExportPointer(&exp, out);
    REQUIRE(e != cudaSuccess, "exported a host pointer");
    (void)cudaGetLastError();

    CK(cudaEventDestroy(ev));
    CK(cudaStreamDestroy(s1));
    CK(cudaStreamDestroy(s2));
    CK(cudaFreeHost(out));
}

// Graph memory: a captured cudaMallocAsync/cudaFreeAsync becomes alloc and
// free nodes; the graph runs several times.
static void graph_memory(void)
{
    unsigned char *out, *dst;
    CK(cudaMallocHost(&out, N));
    CK(cudaMalloc(&dst, N));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    unsigned char *gp = nullptr;
    CK(cudaMallocAsync(&gp, N, s));
    REQUIRE(gp != nullptr, "no address for the graph allocation");
    CK(cudaMemsetAsync(gp, 0x44, N, s));
    CK(cudaMemsetAsync(gp + 10, 0x45, 10, s));
    CK(cudaMemcpyAsync(dst, gp, N, cudaMemcpyDeviceToDevice, s));
    CK(cudaFreeAsync(gp, s));
    cudaGraph_t g;
    CK(cudaStreamEndCapture(s, &g));
    size_t count = 0;
    CK(cudaGraphGetNodes(g, nullptr, &count));
    std::vector<cudaGraphNode_t> nodes(count);
    CK(cudaGraphGetNodes(g, nodes.data(), &count));
    int allocs = 0, frees = 0;
    for (size_t i = 0; i < count; i++) {
        cudaGraphNodeType t;
        CK(cudaGraphNodeGetType(nodes[i], &t));
        if (t == cudaGraphNodeTypeMemAlloc) {
            allocs++;
            cudaMemAllocNodeParams ap;
            CK(cudaGraphMemAllocNodeGetParams(nodes[i], &ap));
            REQUIRE(ap.dptr == gp && ap.bytesize == N,
                    "alloc node params %p %zu", ap.dptr, ap.bytesize);
        }
        if (t == cudaGraphNodeTypeMemFree)
            frees++;
    }
    printf("graph memory: %zu nodes, %d alloc, %d free\n", count, allocs,
           frees);

    cudaGraphExec_t x;
    CK(cudaGraphInstantiate(&x, g, 0));
    std::vector<unsigned char> want(N, 0x44);
    memset(want.data() + 10, 0x45, 10);
    for (int round = 0; round < 3; round++) {
        CK(cudaMemsetAsync(dst, 0, N, s));
        CK(cudaGraphLaunch(x, s));
        CK(cudaMemcpyAsync(out, dst, N, cudaMemcpyDeviceToHost, s));
        CK(cudaStreamSynchronize(s));
        expect_bytes("graph memory", out, want.data(), N);
    }
    uint64_t v = 0;
    CK(cudaDeviceGetGraphMemAttribute(0, cudaGraphMemAttrReservedMemHigh, &v));
    printf("INFO graph memory reserved high %llu\n", (unsigned long long)v);
    CK(cudaGraphExecDestroy(x));
    CK(cudaGraphDestroy(g));
    CK(cudaDeviceGraphMemTrim(0));

    CK(cudaStreamDestroy(s));
    CK(cudaFree(dst));
    CK(cudaFreeHost(out));
}

int main()
{
    CK(cudaSetDevice(0));
    explicit_graph();
    printf("explicit graphs ok\n");
    capture_two_streams();
    printf("stream capture ok\n");
    stream_ordered();
    printf("stream-ordered allocator ok\n");
    graph_memory();
    printf("graph memory ok\n");
    printf("checked %llu bytes\n", bytes_checked);
    printf("PASS " NAME "\n");
    return 0;
}
