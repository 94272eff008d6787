/*
 * driver_api: CUDA driver API only, no kernels (a CI program).
 *
 * Exercises the calls a drop-in libcuda.so.1 must forward faithfully and
 * checks every byte that goes through the device: sizes that are not
 * multiples of 4, unaligned offsets, the memset widths, pitched 2D copies,
 * stream and event ordering. Output lines other than those starting with
 * TIME or INFO are deterministic for a given GPU, so a native run and a run
 * through the stub can be diffed.
 */
#include <cuda.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "driver_api"

#include "check_driver.h"

#include "check_bytes.h"

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p)
        fail("host malloc(%zu) failed", n);
    return p;
}

/* Synchronous copies of one allocation size: whole-buffer HtoD, DtoD, DtoH,
 * then copies at unaligned offsets inside the buffer. */
static void copies_of_size(size_t n, unsigned seed)
{
    unsigned char *src = xmalloc(n), *dst = xmalloc(n), *want = xmalloc(n);
    CUdeviceptr a, b;
    char what[96];

    CK(cuMemAlloc(&a, n));
    CK(cuMemAlloc(&b, n));
    REQUIRE(a != 0 && b != 0 && a != b, "cuMemAlloc(%zu) gave 0x%llx, 0x%llx",
            n, (unsigned long long)a, (unsigned long long)b);

    fill(src, n, seed);
    memset(dst, 0, n);
    CK(cuMemcpyHtoD(a, src, n));
    CK(cuMemcpyDtoD(b, a, n));
    CK(cuMemcpyDtoH(dst, b, n));
    snprintf(what, sizeof what, "HtoD+DtoD+DtoH %zu bytes", n);
    expect_bytes(what, dst, src, n);

    if (n >= 8) {
        /* Overwrite [3, n-2) of a from a second pattern, then read back all
         * of a: the head and tail must be untouched. */
        size_t off = 3, len = n - 5;
        fill(want, n, seed + 1000);
        CK(cuMemcpyHtoD(a + off, want + off, len));
        memcpy(want, src, off);
        memcpy(want + off + len, src + off + len, n - off - len);
        memset(dst, 0, n);
        CK(cuMemcpyDtoH(dst, a, n));
        snprintf(what, sizeof what, "HtoD at offset 3 of %zu bytes", n);
        expect_bytes(what, dst, want, n);

        /* Device-to-device between odd offsets, and a partial readback. */
        CK(cuMemcpyDtoD(b + 1, a + 2, n - 3));
        memcpy(want, src, 1);
        memcpy(want + 1, dst + 2, n - 3);
        memcpy(want + n - 2, src + n - 2, 2);
        memset(dst, 0, n);
        CK(cuMemcpyDtoH(dst, b, n));
        snprintf(what, sizeof what, "DtoD at offsets 2->1 of %zu bytes", n);
        expect_bytes(what, dst, want, n);

        memset(dst, 0, n);
        CK(cuMemcpyDtoH(dst + 5, b + 5, n - 7));
        snprintf(what, sizeof what, "DtoH at offset 5 of %zu bytes", n);
        expect_bytes(what, dst + 5, want + 5, n - 7);
    }

    CK(cuMemFree(a));
    CK(cuMemFree(b));
    free(src);
    free(dst);
    free(want);
}

/* cuMemsetD8/D16/D32 over element counts that are not multiples of 4, and
 * at an offset: the bytes around the set range must be untouched. */
static void memsets(CUstream s, int async)
{
    const size_t n = 100003; /* bytes in the buffer */
    unsigned char *h = xmalloc(n), *want = xmalloc(n);
    CUdeviceptr d;
    char what[96];
    const char *mode = async ? "async" : "sync";

    CK(cuMemAlloc(&d, n));
    fill(want, n, async ? 77 : 78);
    CK(cuMemcpyHtoD(d, want, n));

    /* D8 over [1, n-1) */
    if (async)
        CK(cuMemsetD8Async(d + 1, 0xA5, n - 2, s));
    else
        CK(cuMemsetD8(d + 1, 0xA5, n - 2));
    memset(want + 1, 0xA5, n - 2);

    /* D16 over 12345 elements at offset 2 (must be 2-byte aligned) */
    const unsigned short v16 = 0xBEEF;
    if (async)
        CK(cuMemsetD16Async(d + 2, v16, 12345, s));
    else
        CK(cuMemsetD16(d + 2, v16, 12345));
    for (size_t i = 0; i < 12345; i++)
        memcpy(want + 2 + 2 * i, &v16, 2);

    /* D32 over 7777 elements at offset 40000 (4-byte aligned) */
    const unsigned int v32 = 0xDEADBEEF;
    if (async)
        CK(cuMemsetD32Async(d + 40000, v32, 7777, s));
    else
        CK(cuMemsetD32(d + 40000, v32, 7777));
    for (size_t i = 0; i < 7777; i++)
        memcpy(want + 40000 + 4 * i, &v32, 4);

    if (async)
        CK(cuStreamSynchronize(s));
    memset(h, 0, n);
    CK(cuMemcpyDtoH(h, d, n));
    snprintf(what, sizeof what, "%s memsets D8/D16/D32", mode);
    expect_bytes(what, h, want, n);

    CK(cuMemFree(d));
    free(h);
    free(want);
}

/* Async copies on a created stream, from pinned and from pageable memory. */
static void async_copies(CUstream s)
{
    const size_t n = (4u << 20) + 3;
    unsigned char *pin_src, *pin_dst;
    unsigned char *pg_dst = xmalloc(n);
    CUdeviceptr d, d2;

    CK(cuMemAllocHost((void **)&pin_src, n));
    CK(cuMemAllocHost((void **)&pin_dst, n));
    CK(cuMemAlloc(&d, n));
    CK(cuMemAlloc(&d2, n));

    fill(pin_src, n, 4242);
    memset(pin_dst, 0, n);
    CK(cuMemcpyHtoDAsync(d, pin_src, n, s));
    CK(cuMemcpyDtoDAsync(d2, d, n, s));
    CK(cuMemcpyDtoHAsync(pin_dst, d2, n, s));
    CK(cuStreamSynchronize(s));
    expect_bytes("async copies (pinned)", pin_dst, pin_src, n);

    /* Pageable host memory on the async path: the driver stages it; the data
     * must be identical once the stream is synchronized. */
    fill(pin_src, n, 4343);
    unsigned char *pg_src = xmalloc(n);
    memcpy(pg_src, pin_src, n);
    memset(pg_dst, 0, n);
    CK(cuMemcpyHtoDAsync(d + 1, pg_src, n - 1, s));
    CK(cuMemcpyDtoHAsync(pg_dst + 1, d + 1, n - 1, s));
    CK(cuStreamSynchronize(s));
    expect_bytes("async copies (pageable)", pg_dst + 1, pg_src, n - 1);

    CUresult q = cuStreamQuery(s);
    REQUIRE(q == CUDA_SUCCESS, "cuStreamQuery after synchronize -> %s",
            err_name(q));

    CK(cuMemFree(d));
    CK(cuMemFree(d2));
    CK(cuMemFreeHost(pin_src));
    CK(cuMemFreeHost(pin_dst));
    free(pg_src);
    free(pg_dst);
}

/* Stream priorities, events, cross-stream ordering through cuStreamWaitEvent. */
static void streams_and_events(void)
{
    int least = 0, greatest = 0, prio = 12345;
    CUstream hi, s1, s2;
    CUevent start, stop, ready;
    const size_t n = (8u << 20) + 1;
    unsigned char *h;
    CUdeviceptr d;

    CK(cuCtxGetStreamPriorityRange(&least, &greatest));
    REQUIRE(greatest <= least, "priority range least %d greatest %d", least,
            greatest);
    printf("stream priority range: least %d, greatest %d\n", least, greatest);
    CK(cuStreamCreateWithPriority(&hi, CU_STREAM_NON_BLOCKING, greatest));
    CK(cuStreamGetPriority(hi, &prio));
    REQUIRE(prio == greatest, "cuStreamGetPriority gave %d, expected %d", prio,
            greatest);

    CK(cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING));
    CK(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING));
    CK(cuEventCreate(&start, CU_EVENT_DEFAULT));
    CK(cuEventCreate(&stop, CU_EVENT_DEFAULT));
    CK(cuEventCreate(&ready, CU_EVENT_DISABLE_TIMING));

    CK(cuMemAllocHost((void **)&h, n));
    CK(cuMemAlloc(&d, n));
    memset(h, 0, n);

    /* s1 writes the buffer; s2 may read it only after waiting on `ready`.
     * Non-blocking streams do not order with each other otherwise. */
    CK(cuEventRecord(start, s1));
    CK(cuMemsetD8Async(d, 0x11, n, s1));
    CK(cuMemsetD32Async(d, 0x5A5A5A5A, n / 4, s1));
    CK(cuEventRecord(ready, s1));
    CK(cuStreamWaitEvent(s2, ready, 0));
    CK(cuMemcpyDtoHAsync(h, d, n, s2));
    CK(cuEventRecord(stop, s2));
    CK(cuEventSynchronize(stop));

    CUresult q = cuEventQuery(stop);
    REQUIRE(q == CUDA_SUCCESS, "cuEventQuery after synchronize -> %s",
            err_name(q));
    expect_value("cuStreamWaitEvent ordering (D32 part)", h, n / 4 * 4, 0x5A);
    expect_value("cuStreamWaitEvent ordering (D8 tail)", h + n / 4 * 4,
                 n - n / 4 * 4, 0x11);

    float ms = -1.0f;
    CK(cuEventElapsedTime(&ms, start, stop));
    REQUIRE(ms >= 0.0f, "cuEventElapsedTime gave %f", (double)ms);
    printf("TIME memset+copy of %zu bytes across two streams: %.3f ms\n", n,
           (double)ms);

    /* What the driver refuses at once: flags it does not know, an
     * interprocess event that would record time; and an event that records
     * no time has no elapsed time. */
    CUevent bad = NULL;
    q = cuEventCreate(&bad, 0x8);
    REQUIRE(q == CUDA_ERROR_INVALID_VALUE, "cuEventCreate(0x8) -> %s",
            err_name(q));
    q = cuEventCreate(&bad, CU_EVENT_INTERPROCESS);
    REQUIRE(q == CUDA_ERROR_INVALID_VALUE,
            "cuEventCreate(INTERPROCESS) without DISABLE_TIMING -> %s",
            err_name(q));
    q = cuEventElapsedTime(&ms, start, ready);
    REQUIRE(q == CUDA_ERROR_INVALID_HANDLE,
            "cuEventElapsedTime with a DISABLE_TIMING event -> %s",
            err_name(q));

    /* Work on the priority stream, then a query that may still be running. */
    CK(cuMemsetD8Async(d, 0x22, n, hi));
    q = cuStreamQuery(hi);
    REQUIRE(q == CUDA_SUCCESS || q == CUDA_ERROR_NOT_READY,
            "cuStreamQuery on a busy stream -> %s", err_name(q));
    CK(cuStreamSynchronize(hi));
    CK(cuMemcpyDtoH(h, d, n));
    expect_value("memset on priority stream", h, n, 0x22);

    CK(cuMemFree(d));
    CK(cuMemFreeHost(h));
    CK(cuEventDestroy(start));
    CK(cuEventDestroy(stop));
    CK(cuEventDestroy(ready));
    CK(cuStreamDestroy(s1));
    CK(cuStreamDestroy(s2));
    CK(cuStreamDestroy(hi));
}

/* Pitched allocation: HtoD from a host layout with its own pitch, DtoD into a
 * second pitched allocation at an x/y offset, DtoH into a packed layout. */
static void pitched_2d(void)
{
    const size_t width = 333, height = 77; /* bytes per row, rows */
    const size_t hpitch = 350;
    size_t dpitch = 0, dpitch2 = 0;
    CUdeviceptr d, d2;
    unsigned char *src = xmalloc(hpitch * height);
    unsigned char *dst = xmalloc(width * height);
    unsigned char *want = xmalloc(width * height);

    CK(cuMemAllocPitch(&d, &dpitch, width, height, 4));
    CK(cuMemAllocPitch(&d2, &dpitch2, width + 16, height + 2, 4));
    REQUIRE(dpitch >= width && dpitch2 >= width + 16,
            "cuMemAllocPitch pitches %zu, %zu", dpitch, dpitch2);
    printf("INFO cuMemAllocPitch(333 x 77) pitch %zu\n", dpitch);

    fill(src, hpitch * height, 99);
    CUDA_MEMCPY2D c;
    memset(&c, 0, sizeof c);
    c.srcMemoryType = CU_MEMORYTYPE_HOST;
    c.srcHost = src;
    c.srcPitch = hpitch;
    c.dstMemoryType = CU_MEMORYTYPE_DEVICE;
    c.dstDevice = d;
    c.dstPitch = dpitch;
    c.WidthInBytes = width;
    c.Height = height;
    CK(cuMemcpy2D(&c));

    /* Into d2 at x = 5 bytes, y = 1 row. */
    memset(&c, 0, sizeof c);
    c.srcMemoryType = CU_MEMORYTYPE_DEVICE;
    c.srcDevice = d;
    c.srcPitch = dpitch;
    c.dstMemoryType = CU_MEMORYTYPE_DEVICE;
    c.dstDevice = d2;
    c.dstXInBytes = 5;
    c.dstY = 1;
    c.dstPitch = dpitch2;
    c.WidthInBytes = width;
    c.Height = height;
    CK(cuMemcpy2D(&c));

    memset(&c, 0, sizeof c);
    c.srcMemoryType = CU_MEMORYTYPE_DEVICE;
    c.srcDevice = d2;
    c.srcXInBytes = 5;
    c.srcY = 1;
    c.srcPitch = dpitch2;
    c.dstMemoryType = CU_MEMORYTYPE_HOST;
    c.dstHost = dst;
    c.dstPitch = width;
    c.WidthInBytes = width;
    c.Height = height;
    memset(dst, 0, width * height);
    CK(cuMemcpy2D(&c));

    for (size_t y = 0; y < height; y++)
        memcpy(want + y * width, src + y * hpitch, width);
    expect_bytes("cuMemcpy2D host->pitched->pitched->host", dst, want,
                 width * height);

    CK(cuMemFree(d));
    CK(cuMemFree(d2));
    free(src);
    free(dst);
    free(want);
}

static void error_names(void)
{
    static const struct {
        CUresult code;
        const char *name;
    } known[] = {
        {CUDA_SUCCESS, "CUDA_SUCCESS"},
        {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE"},
        {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY"},
        {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY"},
        {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT"},
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        const char *n = NULL, *s = NULL;
        CK(cuGetErrorName(known[i].code, &n));
        CK(cuGetErrorString(known[i].code, &s));
        REQUIRE(n && strcmp(n, known[i].name) == 0,
                "cuGetErrorName(%d) gave %s, expected %s", (int)known[i].code,
                n ? n : "NULL", known[i].name);
        REQUIRE(s && *s, "cuGetErrorString(%d) gave an empty string",
                (int)known[i].code);
        printf("error %d: %s: %s\n", (int)known[i].code, n, s);
    }
    /* An unknown code: the driver answers CUDA_ERROR_INVALID_VALUE and a NULL
     * string rather than inventing a name. */
    const char *n = "untouched";
    CUresult r = cuGetErrorName((CUresult)9999, &n);
    REQUIRE(r == CUDA_ERROR_INVALID_VALUE && n == NULL,
            "cuGetErrorName(9999) -> %s, name %s", err_name(r),
            n ? n : "NULL");
}

int main(void)
{
    CUdevice dev;
    CUcontext ctx, cur;
    int count = 0, version = 0, major = 0, minor = 0, sms = 0, warp = 0;
    char name[256];
    size_t total = 0;

    setvbuf(stdout, NULL, _IOLBF, 0);

    CK(cuInit(0));
    CK(cuDriverGetVersion(&version));
    REQUIRE(version >= 12000, "driver version %d", version);
    printf("driver version %d\n", version);

    CK(cuDeviceGetCount(&count));
    REQUIRE(count >= 1, "cuDeviceGetCount gave %d", count);
    printf("INFO device count %d\n", count);

    CK(cuDeviceGet(&dev, 0));
    memset(name, 0, sizeof name);
    CK(cuDeviceGetName(name, (int)sizeof name, dev));
    REQUIRE(name[0] != '\0', "cuDeviceGetName gave an empty name");
    CK(cuDeviceTotalMem(&total, dev));
    REQUIRE(total > 0, "cuDeviceTotalMem gave 0");
    CK(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                            dev));
    CK(cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                            dev));
    CK(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
    CK(cuDeviceGetAttribute(&warp, CU_DEVICE_ATTRIBUTE_WARP_SIZE, dev));
    REQUIRE(major >= 3 && sms > 0 && warp == 32,
            "attributes: cc %d.%d, %d SMs, warp %d", major, minor, sms, warp);
    printf("device 0: %s, compute capability %d.%d, %d SMs, warp size %d\n",
           name, major, minor, sms, warp);
    printf("INFO total memory %zu bytes\n", total);

    CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));
    CK(cuCtxGetCurrent(&cur));
    REQUIRE(cur == ctx, "cuCtxGetCurrent gave %p, expected %p", (void *)cur,
            (void *)ctx);
    CUdevice cdev = -1;
    CK(cuCtxGetDevice(&cdev));
    REQUIRE(cdev == dev, "cuCtxGetDevice gave %d, expected %d", (int)cdev,
            (int)dev);

    size_t mfree = 0, mtotal = 0;
    CK(cuMemGetInfo(&mfree, &mtotal));
    REQUIRE(mtotal > 0 && mfree <= mtotal, "cuMemGetInfo free %zu total %zu",
            mfree, mtotal);
    printf("INFO cuMemGetInfo free %zu total %zu\n", mfree, mtotal);

    static const size_t sizes[] = {1, 3, 4, 7, 4096, 65537, (4u << 20) + 3};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        copies_of_size(sizes[i], (unsigned)i + 1);
    printf("sync copies ok\n");

    CUstream s;
    CK(cuStreamCreate(&s, CU_STREAM_DEFAULT));
    memsets(NULL, 0);
    memsets(s, 1);
    printf("memsets ok\n");
    async_copies(s);
    printf("async copies ok\n");
    CK(cuStreamSynchronize(s));
    CK(cuStreamDestroy(s));

    streams_and_events();
    printf("streams and events ok\n");
    pitched_2d();
    printf("2D copies ok\n");
    error_names();

    /* A bogus pointer must be refused with an error, and the context must
     * stay usable afterwards (the error is not sticky). */
    CUresult r = cuMemFree((CUdeviceptr)0xdeadbeef000ull);
    REQUIRE(r != CUDA_SUCCESS, "cuMemFree of a bogus pointer succeeded");
    printf("cuMemFree(bogus) -> %s\n", err_name(r));
    copies_of_size(1000, 555);

    CK(cuCtxSynchronize());
    CK(cuDevicePrimaryCtxRelease(dev));

    printf("checked %llu bytes\n", bytes_checked);
    printf("PASS " NAME "\n");
    return 0;
}
