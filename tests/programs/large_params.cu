// large_params: kernel parameters past the old 4 KiB limit (CUDA 12.1 and
// Volta or newer take up to 32 764 bytes): a kernel whose one argument is a
// 32 000-byte table, another with a small argument, the table and a trailing
// scalar, launched by <<<>>>, cudaLaunchKernel and cudaLaunchKernelEx and
// captured into a graph; each thread copies out the words it is given, and
// every word is checked on the host.
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#define NAME "large_params"

#include "check.h"

constexpr int kWords = 8000; // 32 000 bytes

struct Table {
    int w[kWords];
};

struct Mixed {
    char tag;
    Table table;
};

__global__ void copy_table(Table t, int *out)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < kWords; i += gridDim.x * blockDim.x)
        out[i] = t.w[i];
}

__global__ void copy_mixed(short small, Mixed m, int *out, int trailing)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < kWords; i += gridDim.x * blockDim.x)
        out[i] = m.table.w[i] + small + m.tag + trailing;
}

static void expect(const int *dev, int offset, const char *how)
{
    std::vector<int> host(kWords);
    CK(cudaMemcpy(host.data(), dev, sizeof(int) * kWords, cudaMemcpyDeviceToHost));
    for (int i = 0; i < kWords; ++i)
        if (host[i] != i * 7 - 3 + offset)
            fail("%s: word %d is %d, expected %d", how, i, host[i], i * 7 - 3 + offset);
    printf("%s: %d words of a %zu-byte parameter arrived\n", how, kWords, sizeof(Table));
}

int main()
{
    static Table table;
    for (int i = 0; i < kWords; ++i)
        table.w[i] = i * 7 - 3;
    static Mixed mixed;
    mixed.tag = 5;
    mixed.table = table;
    int *out;
    CK(cudaMalloc(&out, sizeof(int) * kWords));

    CK(cudaMemset(out, 0, sizeof(int) * kWords));
    copy_table<<<8, 256>>>(table, out);
    CK_LAUNCH("copy_table");
    expect(out, 0, "<<<>>>");

    CK(cudaMemset(out, 0, sizeof(int) * kWords));
    int *out_arg = out;
    void *args[] = {&table, &out_arg};
    CK(cudaLaunchKernel((const void *)copy_table, dim3(4), dim3(128), args, 0, 0));
    expect(out, 0, "cudaLaunchKernel");

    CK(cudaMemset(out, 0, sizeof(int) * kWords));
    short small = 11;
    int trailing = 1000;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(2);
    config.blockDim = dim3(64);
    CK(cudaLaunchKernelEx(&config, copy_mixed, small, mixed, out, trailing));
    expect(out, 11 + 5 + 1000, "cudaLaunchKernelEx, mixed");

    // Captured into a graph and replayed twice, with the table changed in
    // between (the graph keeps the value it captured).
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    copy_table<<<8, 256, 0, stream>>>(table, out);
    CK(cudaStreamEndCapture(stream, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < kWords; ++i)
        table.w[i] = -1;
    for (int round = 0; round < 2; ++round) {
        CK(cudaMemsetAsync(out, 0, sizeof(int) * kWords, stream));
        CK(cudaGraphLaunch(exec, stream));
        CK(cudaStreamSynchronize(stream));
        expect(out, 0, round == 0 ? "graph, first launch" : "graph, second launch");
    }
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    CK(cudaStreamDestroy(stream));
    CK(cudaFree(out));
    printf("PASS " NAME "\n");
    return 0;
}
