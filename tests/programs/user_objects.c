/*
 * user_objects: CUDA user objects through the driver API, no kernels (a CI
 * program).
 *
 * References held by the program (retain, release), moved into a graph and
 * kept by its instantiated graph after the graph is gone (the programming
 * guide's pattern: the destructor runs only once the executable graph is
 * destroyed, after its launch), held by a cloned graph and by a child
 * graph, and the documented refusals, printed with their codes. A
 * destructor runs on a CUDA thread after the last release, so each is
 * waited for (at most 10 s).
 */
#define _POSIX_C_SOURCE 199309L /* nanosleep under -std=c11 */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define NAME "user_objects"

#include "check_driver.h"

/* One flag per object, set by its destructor. */
static volatile int destroyed[8];

static void CUDA_CB destroy(void *p)
{
    __atomic_store_n(&destroyed[(intptr_t)p], 1, __ATOMIC_RELEASE);
}

static int is_destroyed(int i)
{
    return __atomic_load_n(&destroyed[i], __ATOMIC_ACQUIRE);
}

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static void wait_destroyed(int i, const char *what)
{
    for (int n = 0; n < 1000 && !is_destroyed(i); n++)
        sleep_ms(10);
    if (!is_destroyed(i))
        fail("%s: the destructor did not run", what);
}

static CUuserObject object(int i, unsigned refs)
{
    CUuserObject o;
    CK(cuUserObjectCreate(&o, (void *)(intptr_t)i, destroy, refs, CU_USER_OBJECT_NO_DESTRUCTOR_SYNC));
    return o;
}

/* A graph of one memset of `d` (work a launch leaves queued). */
static CUgraph memset_graph(CUdeviceptr d, unsigned value)
{
    CUgraph g;
    CUgraphNode n;
    CUDA_MEMSET_NODE_PARAMS p;
    memset(&p, 0, sizeof p);
    p.dst = d;
    p.value = value;
    p.elementSize = 4;
    p.width = 1 << 20;
    p.height = 1;
    CUcontext ctx;
    CK(cuCtxGetCurrent(&ctx));
    CK(cuGraphCreate(&g, 0));
    CK(cuGraphAddMemsetNode(&n, g, NULL, 0, &p, ctx));
    return g;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    primary_context();
    CUstream s;
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CUdeviceptr d;
    CK(cuMemAlloc(&d, 4 << 20));

    /* The program's own references. */
    CUuserObject a = object(0, 1);
    CK(cuUserObjectRetain(a, 2));
    CK(cuUserObjectRelease(a, 2));
    sleep_ms(50);
    printf("after releasing 2 of 3 references: destroyed %d\n", is_destroyed(0));
    CK(cuUserObjectRelease(a, 1));
    wait_destroyed(0, "the last reference released");
    printf("program references: ok\n");

    /* Moved into a graph; its executable graph keeps it. */
    CUuserObject b = object(1, 1);
    CUgraph g = memset_graph(d, 7);
    CK(cuGraphRetainUserObject(g, b, 1, CU_GRAPH_USER_OBJECT_MOVE));
    CUgraphExec e;
    CK(cuGraphInstantiate(&e, g, 0));
    CK(cuGraphDestroy(g));
    sleep_ms(50);
    printf("graph destroyed, its instance alive: destroyed %d\n", is_destroyed(1));
    CK(cuGraphLaunch(e, s));
    CK(cuGraphExecDestroy(e));
    wait_destroyed(1, "the instance destroyed");
    CK(cuStreamSynchronize(s));
    unsigned word = 0;
    CK(cuMemcpyDtoH(&word, d + 4, sizeof word));
    if (word != 7)
        fail("the launched graph's memset wrote %u", word);
    printf("graph and instance references: ok\n");

    /* A graph's own reference, a clone of it, and a child graph. */
    CUuserObject c = object(2, 1);
    CUgraph g2 = memset_graph(d, 8);
    CK(cuGraphRetainUserObject(g2, c, 1, 0));
    CK(cuUserObjectRelease(c, 1));
    CUgraph g3;
    CK(cuGraphClone(&g3, g2));
    CK(cuGraphDestroy(g2));
    CK(cuGraphDestroy(g3));
    wait_destroyed(2, "the graph and its clone destroyed");
    CUuserObject k = object(3, 1);
    CUgraph child = memset_graph(d, 9), parent;
    CK(cuGraphRetainUserObject(child, k, 1, CU_GRAPH_USER_OBJECT_MOVE));
    CK(cuGraphCreate(&parent, 0));
    CUgraphNode node;
    CK(cuGraphAddChildGraphNode(&node, parent, NULL, 0, child));
    CK(cuGraphDestroy(child));
    CK(cuGraphDestroy(parent));
    wait_destroyed(3, "the child graph and its parent destroyed");
    printf("clone and child graph references: ok\n");

    /* An update from another graph: the new graph's references replace
     * the instance's. */
    CUuserObject x = object(5, 1), y = object(6, 1);
    CUgraph ga = memset_graph(d, 2), gb = memset_graph(d, 3);
    CK(cuGraphRetainUserObject(ga, x, 1, CU_GRAPH_USER_OBJECT_MOVE));
    CK(cuGraphRetainUserObject(gb, y, 1, CU_GRAPH_USER_OBJECT_MOVE));
    CUgraphExec eu;
    CK(cuGraphInstantiate(&eu, ga, 0));
    CUgraphExecUpdateResultInfo info;
    CK(cuGraphExecUpdate(eu, gb, &info));
    CK(cuGraphDestroy(ga));
    CK(cuGraphDestroy(gb));
    wait_destroyed(5, "the old graph's object after the update");
    sleep_ms(50);
    printf("after the update, the new graph's object: destroyed %d\n", is_destroyed(6));
    CK(cuGraphLaunch(eu, s));
    CK(cuGraphExecDestroy(eu));
    wait_destroyed(6, "the updated instance destroyed");
    CK(cuStreamSynchronize(s));
    CK(cuMemcpyDtoH(&word, d, sizeof word));
    if (word != 3)
        fail("the updated graph's memset wrote %u", word);
    printf("updated instance references: ok\n");

    /* Refusals. */
    CUuserObject r;
    printf("create without NO_DESTRUCTOR_SYNC: %d\n", (int)cuUserObjectCreate(&r, NULL, destroy, 1, 0));
    printf("create with no references: %d\n",
           (int)cuUserObjectCreate(&r, NULL, destroy, 0, CU_USER_OBJECT_NO_DESTRUCTOR_SYNC));
    CUuserObject f = object(4, 1);
    CUgraph g4 = memset_graph(d, 1);
    CK(cuGraphRetainUserObject(g4, f, 1, 0));
    printf("retain of count 0: %d\n", (int)cuUserObjectRetain(f, 0));
    CK(cuGraphReleaseUserObject(g4, f, 1));
    CK(cuUserObjectRelease(f, 1));
    wait_destroyed(4, "every reference released");
    CK(cuGraphDestroy(g4));

    CK(cuMemFree(d));
    CK(cuStreamDestroy(s));
    printf("PASS " NAME "\n");
    return 0;
}
