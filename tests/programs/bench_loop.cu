// bench_loop: an unmodified program's hot loop, for the drop-in benchmark
// row: many kernels of a fixed length with a small copy now and then, the
// result read back at the end. Run natively and through gpupool's
// libcuda; the suite compares the TIME lines.
//
// The kernel spins for a given number of GPU clock cycles, so its length
// does not depend on memory or data (cycles are calibrated once per run
// from a timed launch, so a "50 us" kernel lasts ~50 us on any card).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define NAME "bench_loop"

#define CK(call)                                                              \
    do {                                                                      \
        cudaError_t e_ = (call);                                              \
        if (e_ != cudaSuccess) {                                              \
            printf("FAIL " NAME ": line %d: %s -> %s\n", __LINE__, #call,     \
                   cudaGetErrorName(e_));                                     \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

__global__ void spin(long long cycles, unsigned *counter)
{
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
    if (threadIdx.x == 0 && blockIdx.x == 0)
        atomicAdd(counter, 1u);
}

static double now_ms()
{
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// Cycles per microsecond of this GPU, from one long timed launch.
static double cycles_per_us(unsigned *counter)
{
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    const long long probe = 20000000;
    spin<<<1, 32>>>(1000, counter); // warm-up
    CK(cudaEventRecord(a));
    spin<<<1, 32>>>(probe, counter);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return probe / (ms * 1000.0);
}

int main(int argc, char **argv)
{
    const int launches = argc > 1 ? atoi(argv[1]) : 2000;
    unsigned *counter;
    CK(cudaMalloc(&counter, sizeof(unsigned)));
    CK(cudaMemset(counter, 0, sizeof(unsigned)));
    const double per_us = cycles_per_us(counter);
    printf("CALIBRATION cycles_per_us=%.1f\n", per_us);
    std::vector<float> host(1024, 1.0f), back(1024);
    float *buf;
    CK(cudaMalloc(&buf, host.size() * sizeof(float)));
    unsigned expected = 2;
    for (int us : {10, 50, 200}) {
        const long long cycles = (long long)(us * per_us);
        CK(cudaDeviceSynchronize());
        double t0 = now_ms();
        for (int i = 0; i < launches; i++) {
            spin<<<132, 128>>>(cycles, counter);
            if (i % 10 == 0)
                CK(cudaMemcpyAsync(buf, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
        }
        CK(cudaMemcpy(back.data(), buf, back.size() * sizeof(float), cudaMemcpyDeviceToHost));
        double t1 = now_ms();
        expected += launches;
        // One kernel of the row alone, timed by events: its length on the
        // GPU, apart from what the loop adds between kernels.
        cudaEvent_t a, b;
        CK(cudaEventCreate(&a));
        CK(cudaEventCreate(&b));
        CK(cudaEventRecord(a));
        spin<<<132, 128>>>(cycles, counter);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float kernel_ms = 0;
        CK(cudaEventElapsedTime(&kernel_ms, a, b));
        CK(cudaEventDestroy(a));
        CK(cudaEventDestroy(b));
        expected += 1;
        printf("KERNEL kernel_us=%d measured_us=%.2f\n", us, kernel_ms * 1000.0);
        printf("TIME kernel_us=%d launches=%d total_ms=%.3f per_launch_us=%.2f\n", us, launches, t1 - t0,
               (t1 - t0) * 1000.0 / launches);
    }
    // Synchronous round trips: one tiny kernel, then wait for it; what a
    // latency-bound loop pays per step (issue 17's "empty launch +
    // synchronize" row, through the runtime API as programs call it).
    const int warmup = 200, timed = 2000;
    std::vector<double> rtt;
    rtt.reserve(timed);
    for (int i = 0; i < warmup + timed; i++) {
        double t0 = now_ms();
        spin<<<1, 32>>>(0, counter);
        CK(cudaStreamSynchronize(0));
        if (i >= warmup)
            rtt.push_back((now_ms() - t0) * 1000.0);
    }
    expected += warmup + timed;
    std::sort(rtt.begin(), rtt.end());
    printf("TIME sync_round_trip iterations=%d median_us=%.1f p99_us=%.1f\n", timed, rtt[timed / 2],
           rtt[timed * 99 / 100]);
    unsigned got = 0;
    CK(cudaMemcpy(&got, counter, sizeof(got), cudaMemcpyDeviceToHost));
    if (got != expected || back[5] != 1.0f) {
        printf("FAIL " NAME ": counter %u, expected %u\n", got, expected);
        return 1;
    }
    printf("launches counted %u\n", got);
    printf("PASS " NAME "\n");
    return 0;
}
