// graph_conditional: CUDA graph conditional nodes (a GPU program), after
// NVIDIA's graphConditionalNodes sample.
//
// - IF: a kernel sets the condition from device data; the body (node API)
//   adds 10 to a value;
// - IF/ELSE: two bodies, one adds, the other subtracts;
// - WHILE: a counter loop to N: the body's kernel increments a counter and
//   sets the condition while it is below N (the handle's default is 1);
// - SWITCH: four bodies, each writes its own value;
// - a body captured with cudaStreamBeginCaptureToGraph (an IF whose body
//   runs two kernels and a memset captured on a stream), and a conditional
//   node added to a graph being captured (cudaStreamGetCaptureInfo).
// Each graph is instantiated once and launched twice with different
// inputs; every result is checked and printed. Through gpupool such graphs
// become real driver graphs on the server.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#define NAME "graph_conditional"

#include "check.h"

__global__ void set_if(cudaGraphConditionalHandle handle, const int *in)
{
    cudaGraphSetConditional(handle, *in != 0 ? 1 : 0);
}

__global__ void add_to(int *v, int amount)
{
    *v += amount;
}

__global__ void while_body(cudaGraphConditionalHandle handle, int *counter, int limit)
{
    *counter += 1;
    cudaGraphSetConditional(handle, *counter < limit ? 1 : 0);
}

__global__ void set_switch(cudaGraphConditionalHandle handle, const int *in)
{
    cudaGraphSetConditional(handle, (unsigned)*in);
}

__global__ void store(int *v, int value)
{
    *v = value;
}

static int read_int(const int *d)
{
    int h = 0;
    CK(cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost));
    return h;
}

static void write_int(int *d, int v)
{
    CK(cudaMemcpy(d, &v, sizeof v, cudaMemcpyHostToDevice));
}

static void expect(const char *what, int got, int want)
{
    printf("%s: %d\n", what, got);
    if (got != want)
        fail("%s is %d, expected %d", what, got, want);
}

static void add_kernel(cudaGraph_t g, cudaGraphNode_t *out, const cudaGraphNode_t *deps, size_t n, void *func,
                       void **args)
{
    cudaKernelNodeParams p = {};
    p.func = func;
    p.gridDim = dim3(1);
    p.blockDim = dim3(1);
    p.kernelParams = args;
    CK(cudaGraphAddKernelNode(out, g, deps, n, &p));
}

/// Adds a conditional node of `type` with `size` bodies after `dep`;
/// returns its bodies.
static cudaGraph_t *add_conditional(cudaGraph_t g, cudaGraphNode_t dep, cudaGraphConditionalHandle handle,
                                    cudaGraphConditionalNodeType type, unsigned size, cudaGraphNode_t *node)
{
    cudaGraphNodeParams p = {};
    p.type = cudaGraphNodeTypeConditional;
    p.conditional.handle = handle;
    p.conditional.type = type;
    p.conditional.size = size;
    CK(cudaGraphAddNode(node, g, dep ? &dep : nullptr, nullptr, dep ? 1 : 0, &p));
    return p.conditional.phGraph_out;
}

static void launch(cudaGraphExec_t exec, cudaStream_t s)
{
    CK(cudaGraphLaunch(exec, s));
    CK(cudaStreamSynchronize(s));
}

static void if_node(cudaStream_t s, int *in, int *v)
{
    cudaGraph_t g;
    CK(cudaGraphCreate(&g, 0));
    cudaGraphConditionalHandle h;
    CK(cudaGraphConditionalHandleCreate(&h, g, 0, 0));
    cudaGraphNode_t set, cond, inner;
    void *set_args[] = {&h, &in};
    add_kernel(g, &set, nullptr, 0, (void *)set_if, set_args);
    cudaGraph_t *bodies = add_conditional(g, set, h, cudaGraphCondTypeIf, 1, &cond);
    int ten = 10;
    void *add_args[] = {&v, &ten};
    add_kernel(bodies[0], &inner, nullptr, 0, (void *)add_to, add_args);
    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, g, 0));
    for (int round = 0; round < 2; round++) {
        int input = round == 0 ? 1 : 0;
        write_int(in, input);
        write_int(v, 5);
        launch(exec, s);
        char what[64];
        snprintf(what, sizeof what, "IF input %d", input);
        expect(what, read_int(v), input ? 15 : 5);
    }
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(g));
}

static void if_else_node(cudaStream_t s, int *in, int *v)
{
    cudaGraph_t g;
    CK(cudaGraphCreate(&g, 0));
    cudaGraphConditionalHandle h;
    CK(cudaGraphConditionalHandleCreate(&h, g, 0, 0));
    cudaGraphNode_t set, cond, a, b;
    void *set_args[] = {&h, &in};
    add_kernel(g, &set, nullptr, 0, (void *)set_if, set_args);
    cudaGraph_t *bodies = add_conditional(g, set, h, cudaGraphCondTypeIf, 2, &cond);
    int plus = 100, minus = -100;
    void *then_args[] = {&v, &plus};
    void *else_args[] = {&v, &minus};
    add_kernel(bodies[0], &a, nullptr, 0, (void *)add_to, then_args);
    add_kernel(bodies[1], &b, nullptr, 0, (void *)add_to, else_args);
    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, g, 0));
    for (int round = 0; round < 2; round++) {
        int input = round == 0 ? 0 : 7;
        write_int(in, input);
        write_int(v, 1);
        launch(exec, s);
        char what[64];
        snprintf(what, sizeof what, "IF/ELSE input %d", input);
        expect(what, read_int(v), input ? 101 : -99);
    }
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(g));
}

static void while_node(cudaStream_t s, int *counter)
{
    for (int round = 0; round < 2; round++) {
        int limit = round == 0 ? 10 : 37;
        cudaGraph_t g;
        CK(cudaGraphCreate(&g, 0));
        cudaGraphConditionalHandle h;
        CK(cudaGraphConditionalHandleCreate(&h, g, 1, cudaGraphCondAssignDefault));
        cudaGraphNode_t reset, cond, body;
        cudaMemsetParams m = {};
        m.dst = counter;
        m.elementSize = 4;
        m.width = 1;
        m.height = 1;
        m.value = 0;
        CK(cudaGraphAddMemsetNode(&reset, g, nullptr, 0, &m));
        cudaGraph_t *bodies = add_conditional(g, reset, h, cudaGraphCondTypeWhile, 1, &cond);
        void *args[] = {&h, &counter, &limit};
        add_kernel(bodies[0], &body, nullptr, 0, (void *)while_body, args);
        cudaGraphExec_t exec;
        CK(cudaGraphInstantiate(&exec, g, 0));
        launch(exec, s);
        char what[64];
        snprintf(what, sizeof what, "WHILE to %d", limit);
        expect(what, read_int(counter), limit);
        CK(cudaGraphExecDestroy(exec));
        CK(cudaGraphDestroy(g));
    }
}

static void switch_node(cudaStream_t s, int *in, int *v)
{
    cudaGraph_t g;
    CK(cudaGraphCreate(&g, 0));
    cudaGraphConditionalHandle h;
    CK(cudaGraphConditionalHandleCreate(&h, g, 0, 0));
    cudaGraphNode_t set, cond, inner[4];
    void *set_args[] = {&h, &in};
    add_kernel(g, &set, nullptr, 0, (void *)set_switch, set_args);
    cudaGraph_t *bodies = add_conditional(g, set, h, cudaGraphCondTypeSwitch, 4, &cond);
    int values[4] = {1000, 2000, 3000, 4000};
    void *args[4][2];
    for (int i = 0; i < 4; i++) {
        args[i][0] = &v;
        args[i][1] = &values[i];
        add_kernel(bodies[i], &inner[i], nullptr, 0, (void *)store, args[i]);
    }
    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, g, 0));
    const int inputs[3] = {2, 0, 9};
    for (int input : inputs) {
        write_int(in, input);
        write_int(v, -1);
        launch(exec, s);
        char what[64];
        snprintf(what, sizeof what, "SWITCH input %d", input);
        expect(what, read_int(v), input < 4 ? values[input] : -1);
    }
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(g));
}

/// An IF whose body is captured into it with cudaStreamBeginCaptureToGraph,
/// in a graph itself built by stream capture.
static void captured(cudaStream_t s, int *in, int *v)
{
    cudaStream_t body_stream;
    CK(cudaStreamCreateWithFlags(&body_stream, cudaStreamNonBlocking));
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    cudaStreamCaptureStatus status;
    cudaGraph_t capturing;
    const cudaGraphNode_t *deps;
    size_t ndeps;
    CK(cudaStreamGetCaptureInfo(s, &status, nullptr, &capturing, &deps, nullptr, &ndeps));
    cudaGraphConditionalHandle h;
    CK(cudaGraphConditionalHandleCreate(&h, capturing, 0, 0));
    set_if<<<1, 1, 0, s>>>(h, in);
    CK(cudaGetLastError());
    CK(cudaStreamGetCaptureInfo(s, &status, nullptr, &capturing, &deps, nullptr, &ndeps));
    cudaGraphNodeParams p = {};
    p.type = cudaGraphNodeTypeConditional;
    p.conditional.handle = h;
    p.conditional.type = cudaGraphCondTypeIf;
    p.conditional.size = 1;
    cudaGraphNode_t cond;
    CK(cudaGraphAddNode(&cond, capturing, deps, nullptr, ndeps, &p));
    CK(cudaStreamUpdateCaptureDependencies(s, &cond, nullptr, 1, cudaStreamSetCaptureDependencies));
    cudaGraph_t body = p.conditional.phGraph_out[0];
    CK(cudaStreamBeginCaptureToGraph(body_stream, body, nullptr, nullptr, 0, cudaStreamCaptureModeGlobal));
    CK(cudaMemsetAsync(v, 0, sizeof(int), body_stream));
    add_to<<<1, 1, 0, body_stream>>>(v, 21);
    add_to<<<1, 1, 0, body_stream>>>(v, 21);
    CK(cudaGetLastError());
    CK(cudaStreamEndCapture(body_stream, nullptr));
    CK(cudaStreamEndCapture(s, &g));
    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, g, 0));
    for (int round = 0; round < 2; round++) {
        int input = round == 0 ? 1 : 0;
        write_int(in, input);
        write_int(v, 3);
        launch(exec, s);
        char what[64];
        snprintf(what, sizeof what, "captured IF input %d", input);
        expect(what, read_int(v), input ? 42 : 3);
    }
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(g));
    CK(cudaStreamDestroy(body_stream));
}

int main()
{
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    int *in, *v;
    CK(cudaMalloc(&in, sizeof(int)));
    CK(cudaMalloc(&v, sizeof(int)));
    if_node(s, in, v);
    if_else_node(s, in, v);
    while_node(s, v);
    switch_node(s, in, v);
    captured(s, in, v);
    CK(cudaFree(in));
    CK(cudaFree(v));
    CK(cudaStreamDestroy(s));
    printf("PASS " NAME "\n");
    return 0;
}
