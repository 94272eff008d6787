// runtime_nokernel: CUDA runtime API with no __global__ function (a CI
// program). Built with nvcc's default static cudart, which finds the driver by
// dlopen("libcuda.so.1") and cuGetProcAddress at run time, so this is the
// shape of most real CUDA applications as the drop-in libcuda sees them.
//
// Every byte that goes through the device is checked. Lines other than those
// starting with TIME or INFO are deterministic for a given GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define NAME "runtime_nokernel"

#include "check.h"

#include "check_bytes.h"

// cudaMemcpy in every direction (HtoD, DtoD, DtoH, HtoH, and cudaMemcpyDefault
// which infers the direction from the unified address space), plus cudaMemset
// at an odd offset.
static void sync_copies(size_t n, unsigned seed)
{
    std::vector<unsigned char> src(n), dst(n), want(n), hh(n);
    unsigned char *a = nullptr, *b = nullptr;
    char what[96];

    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    fill(src.data(), n, seed);

    CK(cudaMemcpy(a, src.data(), n, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy(dst.data(), b, n, cudaMemcpyDeviceToHost));
    snprintf(what, sizeof what, "cudaMemcpy H->D->D->H %zu bytes", n);
    expect_bytes(what, dst.data(), src.data(), n);

    CK(cudaMemcpy(hh.data(), src.data(), n, cudaMemcpyHostToHost));
    expect_bytes("cudaMemcpyHostToHost", hh.data(), src.data(), n);

    fill(want.data(), n, seed + 500);
    CK(cudaMemcpy(a, want.data(), n, cudaMemcpyDefault));
    CK(cudaMemcpy(b, a, n, cudaMemcpyDefault));
    std::fill(dst.begin(), dst.end(), 0);
    CK(cudaMemcpy(dst.data(), b, n, cudaMemcpyDefault));
    snprintf(what, sizeof what, "cudaMemcpyDefault %zu bytes", n);
    expect_bytes(what, dst.data(), want.data(), n);

    if (n >= 4) {
        CK(cudaMemset(b + 1, 0xC3, n - 2));
        std::memset(want.data() + 1, 0xC3, n - 2);
        std::fill(dst.begin(), dst.end(), 0);
        CK(cudaMemcpy(dst.data(), b, n, cudaMemcpyDeviceToHost));
        snprintf(what, sizeof what, "cudaMemset at offset 1 of %zu bytes", n);
        expect_bytes(what, dst.data(), want.data(), n);
    }

    CK(cudaFree(a));
    CK(cudaFree(b));
}

// Async copies and memsets on two created streams, ordered by an event.
static void async_copies(void)
{
    const size_t n = (4u << 20) + 3;
    unsigned char *pin_src = nullptr, *pin_dst = nullptr, *d = nullptr,
                  *d2 = nullptr;
    cudaStream_t s1, s2;
    cudaEvent_t start, stop, ready;

    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CK(cudaStreamCreate(&s2));
    CK(cudaEventCreate(&start));
    CK(cudaEventCreate(&stop));
    CK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    CK(cudaMallocHost(&pin_src, n));
    CK(cudaMallocHost(&pin_dst, n));
    CK(cudaMalloc(&d, n));
    CK(cudaMalloc(&d2, n));

    fill(pin_src, n, 31337);
    std::memset(pin_dst, 0, n);
    CK(cudaEventRecord(start, s1));
    CK(cudaMemcpyAsync(d, pin_src, n, cudaMemcpyHostToDevice, s1));
    CK(cudaMemsetAsync(d + 7, 0x3C, 1001, s1));
    CK(cudaEventRecord(ready, s1));
    // s2 reads what s1 wrote: only the event orders the two streams.
    CK(cudaStreamWaitEvent(s2, ready, 0));
    CK(cudaMemcpyAsync(d2, d, n, cudaMemcpyDeviceToDevice, s2));
    CK(cudaMemcpyAsync(pin_dst, d2, n, cudaMemcpyDeviceToHost, s2));
    CK(cudaEventRecord(stop, s2));
    CK(cudaStreamSynchronize(s2));
    CK(cudaEventSynchronize(stop));
    CK(cudaEventQuery(stop));

    std::vector<unsigned char> want(pin_src, pin_src + n);
    std::memset(want.data() + 7, 0x3C, 1001);
    expect_bytes("async copies across streams", pin_dst, want.data(), n);

    float ms = -1.0f;
    CK(cudaEventElapsedTime(&ms, start, stop));
    REQUIRE(ms >= 0.0f, "cudaEventElapsedTime gave %f", (double)ms);
    printf("TIME async HtoD+memset+DtoD+DtoH of %zu bytes: %.3f ms\n", n,
           (double)ms);

    // Pageable memory on the async path, then a memset-only readback.
    std::vector<unsigned char> pg(n - 1), back(n - 1);
    fill(pg.data(), n - 1, 2718);
    CK(cudaMemcpyAsync(d + 1, pg.data(), n - 1, cudaMemcpyHostToDevice, s1));
    CK(cudaMemcpyAsync(back.data(), d + 1, n - 1, cudaMemcpyDeviceToHost, s1));
    CK(cudaStreamSynchronize(s1));
    expect_bytes("async copies (pageable)", back.data(), pg.data(), n - 1);

    CK(cudaMemsetAsync(d, 0x81, n, s1));
    CK(cudaMemcpyAsync(pin_dst, d, n, cudaMemcpyDeviceToHost, s1));
    CK(cudaStreamSynchronize(s1));
    CK(cudaStreamQuery(s1));
    expect_value("cudaMemsetAsync", pin_dst, n, 0x81);

    CK(cudaFree(d));
    CK(cudaFree(d2));
    CK(cudaFreeHost(pin_src));
    CK(cudaFreeHost(pin_dst));
    CK(cudaEventDestroy(start));
    CK(cudaEventDestroy(stop));
    CK(cudaEventDestroy(ready));
    CK(cudaStreamDestroy(s1));
    CK(cudaStreamDestroy(s2));
}

// cudaMemcpy2D of one 4-byte column of a larger buffer, both ways: rows far
// apart (a sparse sample, as programs take to check a big buffer) and a
// 3D copy of two such slices.
static void sparse_columns(void)
{
    const size_t words = 2 << 20, stride = 4099, rows = words / stride;
    std::vector<unsigned char> all(words * 4), column(rows * 4), want(words * 4);
    unsigned char *d = nullptr;
    CK(cudaMalloc(&d, words * 4));
    fill(all.data(), all.size(), 77);
    CK(cudaMemcpy(d, all.data(), all.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy2D(column.data(), 4, d, stride * 4, 4, rows, cudaMemcpyDeviceToHost));
    for (size_t r = 0; r < rows; r++)
        std::memcpy(want.data() + r * 4, all.data() + r * stride * 4, 4);
    expect_bytes("cudaMemcpy2D of a sparse column to the host", column.data(), want.data(), rows * 4);

    fill(column.data(), column.size(), 91);
    CK(cudaMemcpy2D(d + 8, stride * 4, column.data(), 4, 4, rows, cudaMemcpyHostToDevice));
    want = all;
    for (size_t r = 0; r < rows; r++)
        std::memcpy(want.data() + r * stride * 4 + 8, column.data() + r * 4, 4);
    std::vector<unsigned char> back(words * 4);
    CK(cudaMemcpy(back.data(), d, back.size(), cudaMemcpyDeviceToHost));
    expect_bytes("cudaMemcpy2D of a sparse column from the host", back.data(), want.data(), back.size());

    // Two slices of 16 rows each, rows 4099 words apart, 8 bytes a row.
    const size_t slice_rows = 16, width = 8;
    std::vector<unsigned char> packed(2 * slice_rows * width), expect(2 * slice_rows * width);
    cudaMemcpy3DParms p = {};
    p.srcPtr = make_cudaPitchedPtr(d, stride * 4, stride * 4, slice_rows);
    p.dstPtr = make_cudaPitchedPtr(packed.data(), width, width, slice_rows);
    p.extent = make_cudaExtent(width, slice_rows, 2);
    p.kind = cudaMemcpyDeviceToHost;
    CK(cudaMemcpy3D(&p));
    for (size_t z = 0; z < 2; z++)
        for (size_t r = 0; r < slice_rows; r++)
            std::memcpy(expect.data() + (z * slice_rows + r) * width,
                        want.data() + (z * slice_rows + r) * stride * 4, width);
    expect_bytes("cudaMemcpy3D of sparse rows to the host", packed.data(), expect.data(), expect.size());
    CK(cudaFree(d));
}

// cudaMallocPitch + cudaMemcpy2D: host (own pitch) -> pitched device ->
// second pitched device at an offset -> packed host.
static void pitched_2d(void)
{
    const size_t width = 333, height = 77, hpitch = 350;
    size_t dpitch = 0, dpitch2 = 0;
    unsigned char *d = nullptr, *d2 = nullptr;
    std::vector<unsigned char> src(hpitch * height), dst(width * height),
        want(width * height);

    CK(cudaMallocPitch(&d, &dpitch, width, height));
    CK(cudaMallocPitch(&d2, &dpitch2, width + 16, height + 2));
    REQUIRE(dpitch >= width && dpitch2 >= width + 16,
            "cudaMallocPitch pitches %zu, %zu", dpitch, dpitch2);
    printf("INFO cudaMallocPitch(333 x 77) pitch %zu\n", dpitch);

    fill(src.data(), src.size(), 1234);
    CK(cudaMemcpy2D(d, dpitch, src.data(), hpitch, width, height,
                    cudaMemcpyHostToDevice));
    CK(cudaMemcpy2D(d2 + dpitch2 + 5, dpitch2, d, dpitch, width, height,
                    cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy2D(dst.data(), width, d2 + dpitch2 + 5, dpitch2, width, height,
                    cudaMemcpyDeviceToHost));
    for (size_t y = 0; y < height; y++)
        std::memcpy(want.data() + y * width, src.data() + y * hpitch, width);
    expect_bytes("cudaMemcpy2D host->pitched->pitched->host", dst.data(),
                 want.data(), want.size());

    CK(cudaFree(d));
    CK(cudaFree(d2));
}

// A failing call is reported by cudaGetLastError once and then cleared; it
// must not poison the context (out-of-memory is not a sticky error).
static void errors(void)
{
    CK(cudaGetLastError()); // nothing pending at this point
    void *p = nullptr;
    cudaError_t e = cudaMalloc(&p, (size_t)1 << 60);
    REQUIRE(e == cudaErrorMemoryAllocation,
            "cudaMalloc(2^60) -> %s, expected cudaErrorMemoryAllocation",
            cudaGetErrorName(e));
    printf("cudaMalloc(2^60) -> %s: %s\n", cudaGetErrorName(e),
           cudaGetErrorString(e));
    cudaError_t peek = cudaPeekAtLastError();
    cudaError_t last = cudaGetLastError();
    cudaError_t again = cudaGetLastError();
    REQUIRE(peek == e && last == e && again == cudaSuccess,
            "last error: peek %s, get %s, get again %s", cudaGetErrorName(peek),
            cudaGetErrorName(last), cudaGetErrorName(again));

    e = cudaFree((void *)0xdeadbeef000ull);
    REQUIRE(e != cudaSuccess, "cudaFree of a bogus pointer succeeded");
    printf("cudaFree(bogus) -> %s\n", cudaGetErrorName(e));
    (void)cudaGetLastError();

    printf("cudaGetErrorString(cudaErrorInvalidValue) = %s\n",
           cudaGetErrorString(cudaErrorInvalidValue));
    sync_copies(4097, 77); // still usable
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);

    int count = 0, rt = 0, drv = 0;
    CK(cudaRuntimeGetVersion(&rt));
    CK(cudaDriverGetVersion(&drv));
    printf("runtime version %d, driver version %d\n", rt, drv);
    REQUIRE(drv >= rt, "driver %d is older than the runtime %d", drv, rt);

    CK(cudaGetDeviceCount(&count));
    REQUIRE(count >= 1, "cudaGetDeviceCount gave %d", count);
    printf("INFO device count %d\n", count);

    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    REQUIRE(prop.name[0] != '\0' && prop.major >= 3 &&
                prop.multiProcessorCount > 0 && prop.warpSize == 32,
            "properties: '%s' cc %d.%d, %d SMs, warp %d", prop.name,
            prop.major, prop.minor, prop.multiProcessorCount, prop.warpSize);
    printf("device 0: %s, compute capability %d.%d, %d SMs\n", prop.name,
           prop.major, prop.minor, prop.multiProcessorCount);
    printf("maxThreadsPerBlock %d, sharedMemPerBlock %zu, "
           "sharedMemPerBlockOptin %zu, l2CacheSize %d, memoryBusWidth %d, "
           "unifiedAddressing %d\n",
           prop.maxThreadsPerBlock, prop.sharedMemPerBlock,
           prop.sharedMemPerBlockOptin, prop.l2CacheSize, prop.memoryBusWidth,
           prop.unifiedAddressing);
    printf("INFO totalGlobalMem %zu\n", prop.totalGlobalMem);

    CK(cudaSetDevice(0));
    int cur = -1;
    CK(cudaGetDevice(&cur));
    REQUIRE(cur == 0, "cudaGetDevice gave %d", cur);

    size_t mfree = 0, mtotal = 0;
    CK(cudaMemGetInfo(&mfree, &mtotal));
    REQUIRE(mtotal > 0 && mfree <= mtotal, "cudaMemGetInfo free %zu total %zu",
            mfree, mtotal);
    printf("INFO cudaMemGetInfo free %zu total %zu\n", mfree, mtotal);

    static const size_t sizes[] = {1, 3, 4, 7, 4096, 65537, (4u << 20) + 3};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        sync_copies(sizes[i], (unsigned)i + 1);
    printf("sync copies ok\n");

    async_copies();
    printf("async copies ok\n");
    pitched_2d();
    sparse_columns();
    printf("2D copies ok\n");
    errors();
    printf("errors ok\n");

    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    CK(cudaDeviceReset());

    printf("checked %llu bytes\n", bytes_checked);
    printf("PASS " NAME "\n");
    return 0;
}
