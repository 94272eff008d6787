// managed_nokernel: managed memory (cudaMallocManaged) without kernels (a CI
// program). The host writes managed memory and the device reads it (copies
// out of it); the device writes it (memsets, copies into it) and the host
// reads it after synchronizing; copies from host memory into it; prefetch,
// advice and range attributes; pointer attributes; streams attached.
// Deterministic output, so native and remote runs can be diffed.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define NAME "managed_nokernel"

#include "check.h"

#include "check_bytes.h"

static cudaMemLocation on_device() { cudaMemLocation l{}; l.type = cudaMemLocationTypeDevice; l.id = 0; return l; }
static cudaMemLocation on_host() { cudaMemLocation l{}; l.type = cudaMemLocationTypeHost; l.id = 0; return l; }

static void round_trip(size_t n, cudaStream_t stream)
{
    unsigned char *m = nullptr, *buf = nullptr;
    std::vector<unsigned char> want(n), got(n);
    char what[96];
    CK(cudaMallocManaged(&m, n));
    CK(cudaMalloc(&buf, n));

    // Host writes, device reads.
    fill(want.data(), n, (unsigned)n);
    memcpy(m, want.data(), n);
    CK(cudaMemcpyAsync(buf, m, n, cudaMemcpyDefault, stream));
    CK(cudaStreamSynchronize(stream));
    CK(cudaMemcpy(got.data(), buf, n, cudaMemcpyDeviceToHost));
    snprintf(what, sizeof what, "managed %zu: host writes", n);
    expect_bytes(what, got.data(), want.data(), n);

    // Device writes, host reads after each kind of synchronization.
    CK(cudaMemsetAsync(m + n / 4, 0x5a, n / 4, stream));
    CK(cudaStreamSynchronize(stream));
    memset(want.data() + n / 4, 0x5a, n / 4);
    snprintf(what, sizeof what, "managed %zu: memset", n);
    expect_bytes(what, m, want.data(), n);

    fill(want.data(), n, 77);
    CK(cudaMemcpy(buf, want.data(), n, cudaMemcpyHostToDevice));
    CK(cudaMemcpyAsync(m, buf, n, cudaMemcpyDeviceToDevice, stream));
    cudaEvent_t done;
    CK(cudaEventCreate(&done));
    CK(cudaEventRecord(done, stream));
    CK(cudaEventSynchronize(done));
    CK(cudaEventDestroy(done));
    snprintf(what, sizeof what, "managed %zu: device copy in", n);
    expect_bytes(what, m, want.data(), n);

    // A copy from host memory into it: the host sees it at once.
    fill(want.data(), n, 5);
    CK(cudaMemcpy(m, want.data(), n, cudaMemcpyHostToDevice));
    snprintf(what, sizeof what, "managed %zu: host copy in", n);
    expect_bytes(what, m, want.data(), n);

    // Half written by the host, half by the device, then read back both ways.
    memset(m, 1, n / 2);
    CK(cudaMemset(m + n / 2, 2, n - n / 2));
    CK(cudaDeviceSynchronize());
    memset(want.data(), 1, n / 2);
    memset(want.data() + n / 2, 2, n - n / 2);
    CK(cudaMemcpy(got.data(), m, n, cudaMemcpyDefault));
    snprintf(what, sizeof what, "managed %zu: mixed, device view", n);
    expect_bytes(what, got.data(), want.data(), n);
    snprintf(what, sizeof what, "managed %zu: mixed, host view", n);
    expect_bytes(what, m, want.data(), n);
    printf("managed %zu: both ways\n", n);

    CK(cudaFree(buf));
    CK(cudaFree(m));
}

int main()
{
    int managed = 0, concurrent = 0;
    CK(cudaDeviceGetAttribute(&managed, cudaDevAttrManagedMemory, 0));
    CK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, 0));
    REQUIRE(managed == 1, "managed memory %d", managed);
    printf("managed memory %d, concurrent access %d\n", managed, concurrent);

    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    size_t sizes[] = {4, 5000, 3 << 20};
    for (size_t n : sizes)
        round_trip(n, stream);

    // Attributes, prefetch, advice, attaching.
    size_t n = 1 << 16;
    float *f = nullptr;
    CK(cudaMallocManaged(&f, n * sizeof(float), cudaMemAttachGlobal));
    cudaPointerAttributes attr{};
    CK(cudaPointerGetAttributes(&attr, f + 10));
    REQUIRE(attr.type == cudaMemoryTypeManaged, "pointer type %d", (int)attr.type);
    REQUIRE(attr.devicePointer == f + 10 && attr.hostPointer == f + 10, "one address for both");
    printf("pointer attributes: managed, one address\n");

    for (size_t i = 0; i < n; i++)
        f[i] = (float)i;
    if (concurrent) {
        CK(cudaMemAdvise(f, n * sizeof(float), cudaMemAdviseSetReadMostly, on_device()));
        int read_mostly = 0;
        CK(cudaMemRangeGetAttribute(&read_mostly, sizeof read_mostly, cudaMemRangeAttributeReadMostly, f,
                                    n * sizeof(float)));
        REQUIRE(read_mostly == 1, "read mostly %d", read_mostly);
        CK(cudaMemAdvise(f, n * sizeof(float), cudaMemAdviseUnsetReadMostly, on_device()));
        CK(cudaMemPrefetchAsync(f, n * sizeof(float), on_device(), 0, stream));
        int last = -5;
        CK(cudaMemRangeGetAttribute(&last, sizeof last, cudaMemRangeAttributeLastPrefetchLocation, f,
                                    n * sizeof(float)));
        REQUIRE(last == 0, "last prefetch location %d", last);
        CK(cudaMemPrefetchAsync(f, n * sizeof(float), on_host(), 0, stream));
        printf("advice and prefetch accepted\n");
    }
    CK(cudaStreamAttachMemAsync(stream, f, 0, cudaMemAttachSingle));
    std::vector<float> back(n);
    CK(cudaMemcpyAsync(back.data(), f, n * sizeof(float), cudaMemcpyDefault, stream));
    CK(cudaStreamSynchronize(stream));
    for (size_t i = 0; i < n; i++)
        REQUIRE(back[i] == (float)i, "element %zu is %f", i, back[i]);
    bytes_checked += n * sizeof(float);
    CK(cudaFree(f));

    // Refused: size 0, bad flags.
    void *none = nullptr;
    REQUIRE(cudaMallocManaged(&none, 0) != cudaSuccess || none == nullptr, "size 0");
    cudaGetLastError();
    REQUIRE(cudaMallocManaged(&none, 64, 7) != cudaSuccess, "flags 7");
    cudaGetLastError();

    CK(cudaStreamDestroy(stream));
    printf("bytes checked: %llu\n", bytes_checked);
    printf("PASS " NAME "\n");
    return 0;
}
