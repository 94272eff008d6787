/*
 * migrate_pause: a driver-API program whose session moves to another gpupool
 * server halfway through (live migration, issue 21, docs/migration.md). The
 * second half uses what the first made (device memory at the same
 * addresses, a stream, an event, the module's function, memory of its own
 * virtual memory management mapped twice, once read-only, mapped host
 * memory written by both sides) and must compute
 * what it would have without the move.
 *
 * Between its halves it prints "paused" and waits for a line on stdin:
 * tests/tests/libcuda.rs moves its session then (or does not, for the run
 * it is compared with). Stub-only: it uses gpupool's built-in kernels
 * (docs/builtin-kernels.md), so it runs on the emulated device.
 *
 * All values are small integers in floats, so results are exact.
 */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "migrate_pause"

#include "../check_driver.h"

/* 4 MiB per buffer: enough that the move carries real contents. */
#define N (1 << 20)

static CUfunction saxpy;

/* y = alpha * x + y on `stream`, as steps from..to of the program. */
static void steps(CUstream stream, CUdeviceptr x, CUdeviceptr y, int from, int to)
{
    for (int step = from; step < to; step++) {
        float alpha = (float)(step % 3 + 1);
        unsigned n = N;
        void *args[] = {&alpha, &x, &y, &n};
        CK(cuLaunchKernel(saxpy, (N + 255) / 256, 1, 1, 256, 1, 1, 0, stream, args, NULL));
    }
}

static void host_steps(const float *x, float *y, int from, int to)
{
    for (int step = from; step < to; step++) {
        float alpha = (float)(step % 3 + 1);
        for (int i = 0; i < N; i++)
            y[i] = alpha * x[i] + y[i];
    }
}

static uint64_t checksum(const float *v)
{
    uint64_t sum = 0;
    for (int i = 0; i < N; i++)
        sum = sum * 31 + (uint64_t)v[i];
    return sum;
}

static void expect(const char *what, const float *got, const float *want)
{
    for (int i = 0; i < N; i++)
        if (got[i] != want[i])
            fail("%s: element %d is %g, expected %g", what, i, (double)got[i], (double)want[i]);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    CUmodule mod;
    primary_context();
    CK(cuModuleLoadData(&mod, "gpupool-builtin-kernels/v1\n"));
    CK(cuModuleGetFunction(&saxpy, mod, "saxpy"));

    const size_t bytes = N * sizeof(float);
    float *hx = malloc(bytes), *hy = malloc(bytes), *want = malloc(bytes), *got = malloc(bytes);
    if (!hx || !hy || !want || !got)
        fail("out of host memory");
    for (int i = 0; i < N; i++) {
        hx[i] = (float)(i % 7);
        hy[i] = (float)(i % 5);
    }
    memcpy(want, hy, bytes);

    CUstream stream;
    CUevent done;
    CUdeviceptr x, y;
    CK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    CK(cuEventCreate(&done, CU_EVENT_DEFAULT));
    CK(cuMemAlloc(&x, bytes));
    CK(cuMemAlloc(&y, bytes));
    CK(cuMemcpyHtoD(x, hx, bytes));
    CK(cuMemcpyHtoD(y, hy, bytes));

    /* Memory of its own VMM: one allocation mapped read-write, and its
     * second half mapped again read-only elsewhere. */
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    size_t g = 0;
    CK(cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    CUdeviceptr vmm = 0, alias = 0;
    CUmemGenericAllocationHandle handle;
    CK(cuMemAddressReserve(&vmm, 2 * g, 0, 0, 0));
    CK(cuMemAddressReserve(&alias, g, 0, 0, 0));
    CK(cuMemCreate(&handle, 2 * g, &prop, 0));
    CK(cuMemMap(vmm, 2 * g, 0, handle, 0));
    CK(cuMemMap(alias, g, g, handle, 0));
    CK(cuMemRelease(handle)); /* mapped, so the memory stays */
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = 0;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CK(cuMemSetAccess(vmm, 2 * g, &access, 1));
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
    CK(cuMemSetAccess(alias, g, &access, 1));
    unsigned char *pattern = malloc(2 * g), *seen = malloc(g);
    if (!pattern || !seen)
        fail("out of host memory");
    for (size_t i = 0; i < 2 * g; i++)
        pattern[i] = (unsigned char)(i * 7 + 3);
    CK(cuMemcpyHtoD(vmm, pattern, 2 * g));

    /* Mapped host memory: the device writes it, the host sees it. */
    unsigned *mapped = NULL;
    CUdeviceptr dmapped;
    CK(cuMemHostAlloc((void **)&mapped, 64 * 1024, CU_MEMHOSTALLOC_DEVICEMAP));
    CK(cuMemHostGetDevicePointer(&dmapped, mapped, 0));
    CK(cuMemsetD32(dmapped, 0x11111111u, 16 * 1024));
    CK(cuCtxSynchronize());
    if (mapped[0] != 0x11111111u || mapped[16 * 1024 - 1] != 0x11111111u)
        fail("mapped memory before the pause: %#x", mapped[0]);

    /* First half. */
    steps(stream, x, y, 0, 3);
    CK(cuEventRecord(done, stream));
    CK(cuEventSynchronize(done));
    host_steps(hx, want, 0, 3);
    CK(cuMemcpyDtoH(got, y, bytes));
    expect("first half", got, want);
    printf("first half: checksum %llu\n", (unsigned long long)checksum(got));

    /* A device write the host has not seen yet when the session moves
     * (nothing synchronizes before the pause). */
    CK(cuMemsetD32Async(dmapped + 8192, 0x22222222u, 4, stream));

    /* The session may move now. */
    printf("paused\n");
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        fail("stdin closed while paused");

    /* Second half, with what the first half made. */
    CK(cuMemcpyDtoH(got, x, bytes));
    expect("x after the pause", got, hx);
    CK(cuMemcpyDtoH(seen, alias, g));
    if (memcmp(seen, pattern + g, g) != 0)
        fail("the read-only alias of the VMM allocation changed across the pause");
    printf("vmm alias: ok\n");
    CK(cuStreamSynchronize(stream));
    if (mapped[2048] != 0x22222222u || mapped[2047] != 0x11111111u)
        fail("mapped memory after the pause: %#x %#x", mapped[2047], mapped[2048]);
    /* The host writes, the device reads it. */
    mapped[100] = 0x33333333u;
    unsigned word = 0;
    CK(cuMemcpyDtoH(&word, dmapped + 400, 4));
    if (word != 0x33333333u)
        fail("a host write to mapped memory after the pause reads %#x", word);
    printf("mapped host memory: ok\n");
    steps(stream, x, y, 3, 6);
    CK(cuEventRecord(done, stream));
    CK(cuEventSynchronize(done));
    CK(cuStreamSynchronize(stream));
    host_steps(hx, want, 3, 6);
    CK(cuMemcpyDtoH(got, y, bytes));
    expect("second half", got, want);
    printf("second half: checksum %llu\n", (unsigned long long)checksum(got));

    /* New memory after the move, and a memset on it. */
    CUdeviceptr z;
    CK(cuMemAlloc(&z, bytes));
    CK(cuMemsetD32(z, 0x3f800000u, N)); /* 1.0f */
    for (int i = 0; i < N; i++)
        want[i] = 1.0f;
    CK(cuMemcpyDtoH(got, z, bytes));
    expect("new memory", got, want);

    CK(cuMemFreeHost(mapped));
    CK(cuMemUnmap(alias, g));
    CK(cuMemUnmap(vmm, 2 * g));
    CK(cuMemAddressFree(alias, g));
    CK(cuMemAddressFree(vmm, 2 * g));
    free(pattern);
    free(seen);
    CK(cuMemFree(z));
    CK(cuMemFree(y));
    CK(cuMemFree(x));
    CK(cuEventDestroy(done));
    CK(cuStreamDestroy(stream));
    CK(cuModuleUnload(mod));
    free(hx);
    free(hy);
    free(want);
    free(got);
    printf("PASS " NAME "\n");
    return 0;
}
