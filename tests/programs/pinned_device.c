/*
 * pinned_device: pinned host memory used as device memory (a CI program,
 * no kernels).
 *
 * Under unified addressing the driver maps every pinned allocation into the
 * device's address space at its host address, flags or not, and programs
 * rely on it: XLA (JAX) allocates pinned memory with cuMemHostAlloc(0) and
 * has the device memset and copy into it by that address. Here, for
 * cuMemHostAlloc(0), cuMemAllocHost and cuMemHostAlloc(DEVICEMAP) memory
 * of a few sizes: the device
 * pointer is the host pointer, memsets and device-to-device copies on a
 * stream write and read it there, a stream memory operation writes a word
 * of it, and the host sees every byte after the synchronization. Through
 * gpupool with shared memory the allocation lives in a host region the
 * server maps at the same address and registers with the driver
 * (docs/transport.md, "Pinned memory as device memory").
 */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "pinned_device"

#include "check_driver.h"

#include "check_bytes.h"

/* How the pinned memory is allocated. */
enum kind { HOST_ALLOC, ALLOC_HOST, HOST_ALLOC_DEVICEMAP, KINDS };

static void device_access_of_size(size_t n, enum kind kind, CUstream stream, unsigned seed)
{
    unsigned char *h, *want = malloc(n), *back = malloc(n);
    CUdeviceptr dev, d = 0;
    char what[128];
    if (!want || !back)
        fail("host malloc(%zu) failed", n);

    if (kind == ALLOC_HOST)
        CK(cuMemAllocHost((void **)&h, n));
    else
        CK(cuMemHostAlloc((void **)&h, n, kind == HOST_ALLOC_DEVICEMAP ? CU_MEMHOSTALLOC_DEVICEMAP : 0));
    CUdeviceptr hp = (CUdeviceptr)(uintptr_t)h;
    CK(cuMemHostGetDevicePointer(&d, h, 0));
    REQUIRE(d == hp, "device pointer %#llx of pinned %p", (unsigned long long)d, (void *)h);
    d = 0;
    CK(cuPointerGetAttribute(&d, CU_POINTER_ATTRIBUTE_DEVICE_POINTER, hp));
    REQUIRE(d == hp, "DEVICE_POINTER attribute %#llx of pinned %p", (unsigned long long)d, (void *)h);
    CK(cuMemAlloc(&dev, n));

    /* A memset of 32-bit words, then of bytes inside it, by the pinned
     * address on a stream. */
    memset(h, 0, n);
    size_t words = n / 4;
    if (words > 0)
        CK(cuMemsetD32Async(hp, 0x5a6b7c8du, words, stream));
    if (n > 2)
        CK(cuMemsetD8Async(hp + 1, 0x11, n - 2, stream));
    CK(cuStreamSynchronize(stream));
    memset(want, 0, n);
    for (size_t i = 0; i < words; i++) {
        uint32_t v = 0x5a6b7c8du;
        memcpy(want + 4 * i, &v, 4);
    }
    if (n > 2)
        memset(want + 1, 0x11, n - 2);
    snprintf(what, sizeof what, "memsets of %zu bytes of pinned memory", n);
    expect_bytes(what, h, want, n);

    /* Device memory into pinned memory, and back, as device-to-device
     * copies by the pinned address. */
    fill(want, n, seed);
    /* On the copies' stream: a synchronous copy from pageable memory may
     * return before its DMA lands (natively, the last bytes of 1 MiB + 4
     * were seen missing on an H100), and a non-blocking stream is not
     * ordered after it. */
    CK(cuMemcpyHtoDAsync(dev, want, n, stream));
    memset(h, 0, n);
    CK(cuMemcpyDtoDAsync(hp, dev, n, stream));
    CK(cuStreamSynchronize(stream));
    snprintf(what, sizeof what, "a device copy of %zu bytes into pinned memory", n);
    expect_bytes(what, h, want, n);
    fill(h, n, seed + 1);
    memcpy(want, h, n);
    CK(cuMemsetD8Async(dev, 0, n, stream));
    CK(cuMemcpyDtoDAsync(dev, hp, n, stream));
    CK(cuStreamSynchronize(stream));
    memset(back, 0, n);
    CK(cuMemcpyDtoH(back, dev, n));
    snprintf(what, sizeof what, "a device copy of %zu bytes out of pinned memory", n);
    expect_bytes(what, back, want, n);

    /* A stream memory operation writing a word of it. */
    if (n >= 8) {
        memset(h, 0, 8);
        CK(cuStreamWriteValue32(stream, hp + 4, 0xabcdef01u, 0));
        CK(cuStreamSynchronize(stream));
        uint32_t got;
        memcpy(&got, h + 4, 4);
        REQUIRE(got == 0xabcdef01u, "cuStreamWriteValue32 into pinned memory wrote %#x", got);
    }

    CK(cuMemFree(dev));
    CK(cuMemFreeHost(h));
    free(want);
    free(back);
}

int main(void)
{
    static const size_t sizes[] = {8, 4096 + 12, (1u << 20) + 4};
    CUstream stream;
    CUdevice device;
    int unified = 0;
    primary_context();
    CK(cuCtxGetDevice(&device));
    CK(cuDeviceGetAttribute(&unified, CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, device));
    REQUIRE(unified == 1, "unified addressing reads %d", unified);
    CK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        for (int kind = 0; kind < KINDS; kind++)
            device_access_of_size(sizes[i], (enum kind)kind, stream, 200 + KINDS * i + kind);
        printf("pinned memory of %zu bytes as device memory ok\n", sizes[i]);
    }
    CK(cuStreamDestroy(stream));
    printf("INFO bytes checked: %llu\n", bytes_checked);
    printf("PASS " NAME "\n");
    return 0;
}
