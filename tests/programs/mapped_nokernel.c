/*
 * mapped_nokernel: mapped host memory without kernels (a CI program).
 *
 * cuMemHostAlloc with DEVICEMAP (the host pointer is the device pointer
 * under unified addressing) and cuMemHostRegister with DEVICEMAP: host
 * writes reach device-side copies, device-side writes (memsets, copies)
 * are in host memory once a synchronizing call returns, small and large
 * ranges, pointer attributes, and bad requests refused. Output is
 * deterministic, so a native run and a run through the stub can be diffed.
 */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "mapped_nokernel"

#include "check_driver.h"
#include "check_bytes.h"

/* Host writes to mapped memory, read by the device (a device-to-device
 * copy out of it), and device writes (a memset and a copy into it), seen
 * by the host after `sync`. `host` is the host view, `dev` the device's. */
static void round_trip(const char *what, unsigned char *host, CUdeviceptr dev,
                       size_t n, CUstream stream)
{
    unsigned char *want = malloc(n), *got = malloc(n);
    CUdeviceptr buf;
    REQUIRE(want && got, "host memory");
    CK(cuMemAlloc(&buf, n));

    fill(want, n, (unsigned)n);
    memcpy(host, want, n);
    CK(cuMemcpyDtoDAsync(buf, dev, n, stream));
    CK(cuStreamSynchronize(stream));
    CK(cuMemcpyDtoH(got, buf, n));
    expect_bytes(what, got, want, n);

    CK(cuMemsetD8Async(dev + n / 3, 0x5a, n / 3, stream));
    CK(cuStreamSynchronize(stream));
    memset(want + n / 3, 0x5a, n / 3);
    expect_bytes(what, host, want, n);

    fill(want, n, 99);
    CK(cuMemcpyHtoD(buf, want, n));
    CK(cuMemcpyDtoD(dev, buf, n));
    CK(cuCtxSynchronize());
    expect_bytes(what, host, want, n);
    printf("%s: %zu bytes both ways\n", what, n);

    CK(cuMemFree(buf));
    free(want);
    free(got);
}

int main(void)
{
    CUdevice dev;
    CUcontext ctx;
    CUstream stream;
    CK(cuInit(0));
    CK(cuDeviceGet(&dev, 0));
    CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));
    CK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));

    int can_map = 0, uva = 0;
    CK(cuDeviceGetAttribute(&can_map, CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY, dev));
    CK(cuDeviceGetAttribute(&uva, CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, dev));
    REQUIRE(can_map == 1 && uva == 1, "CAN_MAP_HOST_MEMORY %d, UNIFIED_ADDRESSING %d", can_map, uva);
    printf("mapped host memory supported\n");

    /* cuMemHostAlloc: one status word (as libraries use), and ranges
     * larger than one reply carries. */
    size_t sizes[] = {4, 5000, 4 << 20};
    for (int i = 0; i < 3; i++) {
        void *h = NULL;
        CUdeviceptr d = 0;
        CK(cuMemHostAlloc(&h, sizes[i], CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_PORTABLE));
        CK(cuMemHostGetDevicePointer(&d, h, 0));
        REQUIRE(d == (CUdeviceptr)(uintptr_t)h, "device pointer %llx for host %p", (unsigned long long)d, h);
        unsigned int flags = 0;
        CK(cuMemHostGetFlags(&flags, h));
        REQUIRE(flags & CU_MEMHOSTALLOC_DEVICEMAP, "flags %u", flags);
        unsigned int type = 0;
        CK(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)h));
        REQUIRE(type == CU_MEMORYTYPE_HOST, "memory type %u", type);
        char what[64];
        snprintf(what, sizeof what, "cuMemHostAlloc %zu", sizes[i]);
        round_trip(what, h, d, sizes[i], stream);
        /* A pointer inside the range maps to the same offset. */
        CUdeviceptr inner = 0;
        CK(cuMemHostGetDevicePointer(&inner, (char *)h + sizes[i] / 2, 0));
        REQUIRE(inner == d + sizes[i] / 2, "inner pointer");
        CK(cuMemFreeHost(h));
    }

    /* A status word: the host resets it, the device sets it to the same
     * value each round (as a library's kernel reports "ok" every run). */
    {
        int *status = NULL;
        CK(cuMemHostAlloc((void **)&status, sizeof *status, CU_MEMHOSTALLOC_DEVICEMAP));
        for (int round = 0; round < 3; round++) {
            *status = 0;
            CK(cuMemsetD32Async((CUdeviceptr)(uintptr_t)status, 7, 1, stream));
            CK(cuStreamSynchronize(stream));
            REQUIRE(*status == 7, "status word round %d: %d", round, *status);
        }
        CK(cuMemFreeHost(status));
        printf("status word: 3 rounds\n");
    }

    /* cuMemHostRegister: the program's own memory. */
    size_t n = 3 * 4096 + 100;
    unsigned char *mine = aligned_alloc(4096, 4 * 4096);
    REQUIRE(mine != NULL, "host memory");
    CK(cuMemHostRegister(mine, n, CU_MEMHOSTREGISTER_DEVICEMAP));
    CUdeviceptr rd = 0;
    CK(cuMemHostGetDevicePointer(&rd, mine, 0));
    round_trip("cuMemHostRegister", mine, rd, n, stream);
    CK(cuMemHostUnregister(mine));
    free(mine);

    /* Refused: flags, a pointer that is not mapped, a double free. */
    void *plain = NULL;
    CUdeviceptr d = 0;
    CK(cuMemHostAlloc(&plain, 64, 0));
    REQUIRE(cuMemHostGetDevicePointer(&d, plain, 1) != CUDA_SUCCESS, "flags must be 0");
    CK(cuMemFreeHost(plain));
    int local = 0;
    REQUIRE(cuMemHostGetDevicePointer(&d, &local, 0) != CUDA_SUCCESS, "stack memory is not mapped");
    CK(cuCtxSynchronize());

    CK(cuStreamDestroy(stream));
    printf("bytes checked: %llu\n", bytes_checked);
    printf("PASS " NAME "\n");
    return 0;
}
