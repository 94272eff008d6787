// streams_events: four non-blocking streams, each copying its chunk in from
// pinned memory, running a kernel and copying out, with cross-stream
// dependencies through cudaStreamWaitEvent: stream j's second kernel reads
// what stream j+1's first kernel wrote, so a wait that is not honoured gives
// wrong numbers rather than just different timing.
//
// Only TIME lines (event timings) differ between runs.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#define NAME "streams_events"

#include "check.h"

constexpr int kStreams = 4;
constexpr int kChunk = 1 << 18; // floats per stream

// mid = 2 * in + 1, computed the slow way so the kernel takes long enough for
// a missing dependency to show.
__global__ void stage1(const float *in, float *mid, int n, int spin)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = in[i];
        float acc = 0.0f;
        for (int k = 0; k < spin; k++)
            acc += v; // exact: small integers
        mid[i] = 2.0f * (acc / (float)spin) + 1.0f;
    }
}

// out = own mid + the neighbour stream's mid.
__global__ void stage2(const float *mid, const float *other, float *out, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = mid[i] + other[i];
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const size_t total = (size_t)kStreams * kChunk;
    const size_t chunk_bytes = kChunk * sizeof(float);
    const int spin = 64;

    float *h_in, *h_out, *d_in, *d_mid, *d_out;
    CK(cudaMallocHost(&h_in, total * sizeof(float)));
    CK(cudaMallocHost(&h_out, total * sizeof(float)));
    CK(cudaMalloc(&d_in, total * sizeof(float)));
    CK(cudaMalloc(&d_mid, total * sizeof(float)));
    CK(cudaMalloc(&d_out, total * sizeof(float)));
    for (size_t i = 0; i < total; i++)
        h_in[i] = (float)(i % 1024);
    std::memset(h_out, 0, total * sizeof(float));
    CK(cudaMemset(d_mid, 0, total * sizeof(float)));
    // Non-blocking streams do not order with the legacy default stream.
    CK(cudaDeviceSynchronize());

    cudaStream_t s[kStreams];
    cudaEvent_t mid_ready[kStreams], t0, t1;
    for (int j = 0; j < kStreams; j++) {
        CK(cudaStreamCreateWithFlags(&s[j], cudaStreamNonBlocking));
        CK(cudaEventCreateWithFlags(&mid_ready[j], cudaEventDisableTiming));
    }
    CK(cudaEventCreate(&t0));
    CK(cudaEventCreate(&t1));

    const int block = 256, grid = (kChunk + block - 1) / block;
    CK(cudaEventRecord(t0, s[0]));
    for (int j = 1; j < kStreams; j++) // every stream starts after t0
        CK(cudaStreamWaitEvent(s[j], t0, 0));
    for (int j = 0; j < kStreams; j++) {
        const size_t off = (size_t)j * kChunk;
        CK(cudaMemcpyAsync(d_in + off, h_in + off, chunk_bytes,
                           cudaMemcpyHostToDevice, s[j]));
        stage1<<<grid, block, 0, s[j]>>>(d_in + off, d_mid + off, kChunk, spin);
        CK_LAUNCH("stage1");
        CK(cudaEventRecord(mid_ready[j], s[j]));
    }
    for (int j = 0; j < kStreams; j++) {
        const int nb = (j + 1) % kStreams;
        const size_t off = (size_t)j * kChunk, noff = (size_t)nb * kChunk;
        CK(cudaStreamWaitEvent(s[j], mid_ready[nb], 0));
        stage2<<<grid, block, 0, s[j]>>>(d_mid + off, d_mid + noff,
                                         d_out + off, kChunk);
        CK_LAUNCH("stage2");
        CK(cudaMemcpyAsync(h_out + off, d_out + off, chunk_bytes,
                           cudaMemcpyDeviceToHost, s[j]));
    }
    // Join every stream into s[0] before the closing timestamp.
    for (int j = 1; j < kStreams; j++) {
        cudaEvent_t done;
        CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        CK(cudaEventRecord(done, s[j]));
        CK(cudaStreamWaitEvent(s[0], done, 0));
        CK(cudaEventDestroy(done)); // legal: released once it completes
    }
    CK(cudaEventRecord(t1, s[0]));
    CK(cudaEventSynchronize(t1));
    for (int j = 0; j < kStreams; j++)
        CK(cudaStreamSynchronize(s[j]));

    double sum = 0.0;
    for (int j = 0; j < kStreams; j++) {
        const int nb = (j + 1) % kStreams;
        for (int i = 0; i < kChunk; i++) {
            const size_t idx = (size_t)j * kChunk + i;
            const float want = (2.0f * h_in[idx] + 1.0f) +
                               (2.0f * h_in[(size_t)nb * kChunk + i] + 1.0f);
            if (h_out[idx] != want)
                fail("stream %d element %d = %.9g, expected %.9g", j, i,
                     (double)h_out[idx], (double)want);
            sum += h_out[idx];
        }
    }
    printf("%d streams x %d floats: checksum %.1f\n", kStreams, kChunk, sum);

    float ms = -1.0f;
    CK(cudaEventElapsedTime(&ms, t0, t1));
    if (!(ms >= 0.0f))
        fail("cudaEventElapsedTime gave %f", (double)ms);
    printf("TIME all streams: %.3f ms\n", (double)ms);

    for (int j = 0; j < kStreams; j++) {
        CK(cudaEventDestroy(mid_ready[j]));
        CK(cudaStreamDestroy(s[j]));
    }
    CK(cudaEventDestroy(t0));
    CK(cudaEventDestroy(t1));
    CK(cudaFree(d_in));
    CK(cudaFree(d_mid));
    CK(cudaFree(d_out));
    CK(cudaFreeHost(h_in));
    CK(cudaFreeHost(h_out));
    printf("PASS " NAME "\n");
    return 0;
}
