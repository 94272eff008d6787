/*
 * pinned_copies: copies from and to pinned host memory (a CI program, no
 * kernels).
 *
 * cuMemHostAlloc and cuMemAllocHost memory, copied synchronously and
 * asynchronously in both directions, through the cuMemcpy/cuMemcpyAsync
 * unified forms too, at odd offsets and at the allocation's edges, with
 * memsets and copies ordered on one stream. Through gpupool with shared
 * memory, this memory lives in host regions the server maps and registers,
 * and these copies are the server's DMA (docs/transport.md); natively they
 * are DMA from pinned pages. Every byte is checked.
 */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "pinned_copies"

#include "check_driver.h"

#include "check_bytes.h"

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p)
        fail("host malloc(%zu) failed", n);
    return p;
}

static void copies_of_size(size_t n, CUstream stream, unsigned seed)
{
    unsigned char *src, *back, *want = xmalloc(n);
    CUdeviceptr dev;
    char what[128];

    CK(cuMemHostAlloc((void **)&src, n, CU_MEMHOSTALLOC_PORTABLE));
    CK(cuMemAllocHost((void **)&back, n));
    CK(cuMemAlloc(&dev, n));

    /* Asynchronous both ways on a stream, then its synchronization. */
    fill(src, n, seed);
    memcpy(want, src, n);
    memset(back, 0, n);
    CK(cuMemcpyHtoDAsync(dev, src, n, stream));
    CK(cuMemcpyDtoHAsync(back, dev, n, stream));
    CK(cuStreamSynchronize(stream));
    snprintf(what, sizeof what, "async round trip of %zu bytes", n);
    expect_bytes(what, back, want, n);

    /* Synchronous: the source may be reused as soon as the call returns,
     * and the destination holds the bytes when it returns. */
    fill(src, n, seed + 1);
    memcpy(want, src, n);
    CK(cuMemcpyHtoD(dev, src, n));
    memset(src, 0x5a, n);
    memset(back, 0, n);
    CK(cuMemcpyDtoH(back, dev, n));
    snprintf(what, sizeof what, "sync round trip of %zu bytes", n);
    expect_bytes(what, back, want, n);

    /* Unified forms: the direction follows from the addresses. */
    fill(src, n, seed + 2);
    memcpy(want, src, n);
    memset(back, 0, n);
    CK(cuMemcpy(dev, (CUdeviceptr)(uintptr_t)src, n));
    CK(cuMemcpyAsync((CUdeviceptr)(uintptr_t)back, dev, n, stream));
    CK(cuStreamSynchronize(stream));
    snprintf(what, sizeof what, "cuMemcpy round trip of %zu bytes", n);
    expect_bytes(what, back, want, n);

    /* Edges and odd offsets: the first and last bytes, a span ending at
     * the allocation's end, one starting at an odd offset. */
    if (n > 8) {
        size_t tail = n / 3 + 1;
        fill(src, n, seed + 3);
        memcpy(want, src, n);
        /* On the copies' stream: a non-blocking stream is not ordered
         * after the legacy default stream's (asynchronous) memset. */
        CK(cuMemsetD8Async(dev, 0, n, stream));
        CK(cuMemcpyHtoDAsync(dev, src, 1, stream));
        CK(cuMemcpyHtoDAsync(dev + n - 1, src + n - 1, 1, stream));
        CK(cuMemcpyHtoDAsync(dev + n - tail, src + n - tail, tail - 1, stream));
        CK(cuMemcpyHtoDAsync(dev + 3, src + 3, n - tail - 3 + 1, stream));
        CK(cuMemcpyHtoDAsync(dev + 1, src + 1, 2, stream));
        memset(back, 0, n);
        CK(cuMemcpyDtoHAsync(back + n - 1, dev + n - 1, 1, stream));
        CK(cuMemcpyDtoHAsync(back, dev, n - 1, stream));
        CK(cuStreamSynchronize(stream));
        snprintf(what, sizeof what, "pieces of %zu bytes at the edges", n);
        expect_bytes(what, back, want, n);
    }

    /* Stream order: a memset, then a copy into pinned memory behind it. */
    memset(back, 0, n);
    CK(cuMemsetD8Async(dev, 0x77, n, stream));
    CK(cuMemcpyDtoHAsync(back, dev, n, stream));
    CK(cuStreamSynchronize(stream));
    memset(want, 0x77, n);
    snprintf(what, sizeof what, "a copy of %zu bytes ordered after a memset", n);
    expect_bytes(what, back, want, n);

    unsigned int flags = 99;
    CK(cuMemHostGetFlags(&flags, src));
    /* With unified addressing the driver maps all pinned memory and adds
     * DEVICEMAP to the flags it reads back. */
    REQUIRE(flags == (CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP), "cuMemHostGetFlags gave %u", flags);

    CK(cuMemFree(dev));
    CK(cuMemFreeHost(src));
    CK(cuMemFreeHost(back));
    free(want);
}

int main(void)
{
    static const size_t sizes[] = {1, 4097, (1u << 20) + 3, (9u << 20) + 7, 64u << 20};
    CUstream stream;
    primary_context();
    CK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        copies_of_size(sizes[i], stream, 100 + i);
        printf("pinned copies of %zu bytes ok\n", sizes[i]);
    }
    /* Many live at once, freed out of order. */
    void *blocks[16];
    for (int i = 0; i < 16; i++)
        CK(cuMemAllocHost(&blocks[i], (size_t)(i + 1) * 65536));
    for (int i = 0; i < 16; i += 2)
        CK(cuMemFreeHost(blocks[i]));
    for (int i = 1; i < 16; i += 2)
        CK(cuMemFreeHost(blocks[i]));
    CK(cuStreamDestroy(stream));
    printf("INFO bytes checked: %llu\n", bytes_checked);
    printf("PASS " NAME "\n");
    return 0;
}
