/*
 * batch_ops: CUDA 12.8/13's batched memory operations through the driver
 * API, no kernels (a CI program).
 *
 * cuMemcpyBatchAsync (13.0's form) with two attribute runs, one of them
 * reading a stack buffer only during the call; cuMemcpy3DBatchAsync with
 * sub-boxes between pitched pointers and into and out of a CUDA array;
 * cuMemPrefetchBatchAsync, cuMemDiscardBatchAsync and
 * cuMemDiscardAndPrefetchBatchAsync on managed memory; cuStreamGetCtx_v2
 * (directly and as cuGetProcAddress's "cuStreamGetCtx" at 12.5); and
 * cuPointerSetAttribute(SYNC_MEMOPS). Every byte is checked; the batch
 * calls' documented refusals are printed with their codes, so a native run
 * and a run through the stub can be diffed.
 */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define NAME "batch_ops"

#include "check_driver.h"

#define N 65536

static void expect_bytes(const char *what, const unsigned char *got, const unsigned char *want, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i])
            fail("%s: byte %zu is %u, expected %u", what, i, got[i], want[i]);
}

static CUmemcpyAttributes attribute(CUmemcpySrcAccessOrder order)
{
    CUmemcpyAttributes a;
    memset(&a, 0, sizeof a);
    a.srcAccessOrder = order;
    return a;
}

static void linear_batches(CUstream s)
{
    static unsigned char h0[N], h1[N], back[N], want[N];
    CUdeviceptr d0, d1, d2;
    unsigned char *pinned;
    CK(cuMemAlloc(&d0, N));
    CK(cuMemAlloc(&d1, N));
    CK(cuMemAlloc(&d2, N));
    CK(cuMemAllocHost((void **)&pinned, N));
    for (int i = 0; i < N; i++) {
        h0[i] = (unsigned char)(i * 7 + 1);
        h1[i] = (unsigned char)(i * 13 + 5);
    }
    {
        /* A stack source, read only during the call: changed right after. */
        unsigned char stack[256];
        for (int i = 0; i < 256; i++)
            stack[i] = (unsigned char)(255 - i);
        CUdeviceptr dsts[3] = {d0, d1, d2};
        CUdeviceptr srcs[3] = {(CUdeviceptr)h0, (CUdeviceptr)h1, (CUdeviceptr)stack};
        size_t sizes[3] = {N, N, sizeof stack};
        CUmemcpyAttributes attrs[2] = {attribute(CU_MEMCPY_SRC_ACCESS_ORDER_STREAM),
                                       attribute(CU_MEMCPY_SRC_ACCESS_ORDER_DURING_API_CALL)};
        size_t idxs[2] = {0, 2};
        CK(cuMemcpyBatchAsync(dsts, srcs, sizes, 3, attrs, idxs, 2, s));
        memset(stack, 0, sizeof stack);
        CK(cuStreamSynchronize(s));
        CK(cuMemcpyDtoH(back, d2, 256));
        for (int i = 0; i < 256; i++)
            want[i] = (unsigned char)(255 - i);
        expect_bytes("stack source read during the call", back, want, 256);
    }
    /* Out of the device: into pageable and page-locked memory, and device
     * to device, in one batch (no copy depends on another). */
    {
        CUdeviceptr dsts[3] = {(CUdeviceptr)back, (CUdeviceptr)pinned, d2};
        CUdeviceptr srcs[3] = {d0, d1, d1};
        size_t sizes[3] = {N, N, N / 2};
        CUmemcpyAttributes attrs[1] = {attribute(CU_MEMCPY_SRC_ACCESS_ORDER_STREAM)};
        size_t idxs[1] = {0};
        CK(cuMemcpyBatchAsync(dsts, srcs, sizes, 3, attrs, idxs, 1, s));
        CK(cuStreamSynchronize(s));
        expect_bytes("device to pageable", back, h0, N);
        expect_bytes("device to page-locked", pinned, h1, N);
        CK(cuMemcpyDtoH(back, d2, N / 2));
        expect_bytes("device to device", back, h1, N / 2);
    }
    /* Refusals the documentation names, each printed with its code. */
    {
        CUdeviceptr dsts[2] = {d0, d1};
        CUdeviceptr srcs[2] = {d1, d0};
        size_t sizes[2] = {16, 16};
        CUmemcpyAttributes good[1] = {attribute(CU_MEMCPY_SRC_ACCESS_ORDER_STREAM)};
        CUmemcpyAttributes bad[1] = {attribute(CU_MEMCPY_SRC_ACCESS_ORDER_INVALID)};
        size_t zero[1] = {0}, one[1] = {1};
        printf("batch on the legacy stream: %d\n", (int)cuMemcpyBatchAsync(dsts, srcs, sizes, 2, good, zero, 1, CU_STREAM_LEGACY));
        printf("batch whose first attribute index is 1: %d\n", (int)cuMemcpyBatchAsync(dsts, srcs, sizes, 2, good, one, 1, s));
        printf("batch with an invalid access order: %d\n", (int)cuMemcpyBatchAsync(dsts, srcs, sizes, 2, bad, zero, 1, s));
        CK(cuStreamSynchronize(s));
    }
    /* Synchronous copies of this allocation stay synchronous. */
    unsigned int on = 1;
    CK(cuPointerSetAttribute(&on, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, d0));
    unsigned int sync = 0;
    CK(cuPointerGetAttribute(&sync, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, d0));
    printf("SYNC_MEMOPS after setting it: %u\n", sync);
    printf("SYNC_MEMOPS on host memory: %d\n", (int)cuPointerSetAttribute(&on, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, (CUdeviceptr)h0));
    CK(cuMemFreeHost(pinned));
    CK(cuMemFree(d0));
    CK(cuMemFree(d1));
    CK(cuMemFree(d2));
    printf("linear batches: ok\n");
}

static CUmemcpy3DOperand pointer(void *p, size_t row_length, size_t layer_height)
{
    CUmemcpy3DOperand o;
    memset(&o, 0, sizeof o);
    o.type = CU_MEMCPY_OPERAND_TYPE_POINTER;
    o.op.ptr.ptr = (CUdeviceptr)p;
    o.op.ptr.rowLength = row_length;
    o.op.ptr.layerHeight = layer_height;
    return o;
}

static CUmemcpy3DOperand in_array(CUarray a, size_t x, size_t y)
{
    CUmemcpy3DOperand o;
    memset(&o, 0, sizeof o);
    o.type = CU_MEMCPY_OPERAND_TYPE_ARRAY;
    o.op.array.array = a;
    o.op.array.offset.x = x;
    o.op.array.offset.y = y;
    return o;
}

static CUDA_MEMCPY3D_BATCH_OP op(CUmemcpy3DOperand src, CUmemcpy3DOperand dst, size_t w, size_t h, size_t d)
{
    CUDA_MEMCPY3D_BATCH_OP o;
    memset(&o, 0, sizeof o);
    o.src = src;
    o.dst = dst;
    o.extent.width = w;
    o.extent.height = h;
    o.extent.depth = d;
    o.srcAccessOrder = CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    return o;
}

static void boxes(CUstream s)
{
    /* A 48 x 20 x 3 box of bytes out of a 64 x 32 x 4 host volume into a
     * device volume of the same shape, and back into a zeroed one. */
    enum { W = 64, H = 32, D = 4, BW = 48, BH = 20, BD = 3 };
    static unsigned char vol[W * H * D], back[W * H * D], want[W * H * D];
    for (int i = 0; i < W * H * D; i++)
        vol[i] = (unsigned char)(i * 31 + 3);
    CUdeviceptr dev;
    CK(cuMemAlloc(&dev, sizeof vol));
    CK(cuMemsetD8(dev, 0, sizeof vol));
    CUDA_MEMCPY3D_BATCH_OP in[1] = {op(pointer(vol, W, H), pointer((void *)dev, W, H), BW, BH, BD)};
    CK(cuMemcpy3DBatchAsync(1, in, 0, s));
    CUDA_MEMCPY3D_BATCH_OP out[1] = {op(pointer((void *)dev, W, H), pointer(back, W, H), BW, BH, BD)};
    CK(cuMemcpy3DBatchAsync(1, out, 0, s));
    CK(cuStreamSynchronize(s));
    for (int z = 0; z < D; z++)
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                int i = (z * H + y) * W + x;
                want[i] = (x < BW && y < BH && z < BD) ? vol[i] : 0;
            }
    expect_bytes("3D box through the device", back, want, sizeof back);

    /* A 2D float array: rows 4..11 of a 32 x 16 host matrix into it at
     * (8, 2), then the array back out into device memory and read. */
    enum { AW = 32, AH = 16 };
    static float m[AW * AH], mback[AW * AH];
    for (int i = 0; i < AW * AH; i++)
        m[i] = (float)i;
    CUDA_ARRAY3D_DESCRIPTOR desc;
    memset(&desc, 0, sizeof desc);
    desc.Width = AW;
    desc.Height = AH;
    desc.Format = CU_AD_FORMAT_FLOAT;
    desc.NumChannels = 1;
    CUarray a;
    CK(cuArray3DCreate(&a, &desc));
    CUdeviceptr flat;
    CK(cuMemAlloc(&flat, sizeof m));
    CK(cuMemsetD32(flat, 0, AW * AH));
    CUDA_MEMCPY3D_BATCH_OP zero_fill[1] = {op(pointer((void *)flat, AW, AH), in_array(a, 0, 0), AW, AH, 1)};
    CK(cuMemcpy3DBatchAsync(1, zero_fill, 0, s));
    CUDA_MEMCPY3D_BATCH_OP to_array[1] = {op(pointer(m + 4 * AW, AW, AH), in_array(a, 8, 2), 16, 8, 1)};
    CK(cuMemcpy3DBatchAsync(1, to_array, 0, s));
    CUDA_MEMCPY3D_BATCH_OP from_array[1] = {op(in_array(a, 0, 0), pointer((void *)flat, AW, AH), AW, AH, 1)};
    CK(cuMemcpy3DBatchAsync(1, from_array, 0, s));
    CK(cuStreamSynchronize(s));
    CK(cuMemcpyDtoH(mback, flat, sizeof m));
    for (int y = 0; y < AH; y++)
        for (int x = 0; x < AW; x++) {
            float w = (x >= 8 && x < 24 && y >= 2 && y < 10) ? m[(y - 2 + 4) * AW + (x - 8)] : 0.0f;
            if (mback[y * AW + x] != w)
                fail("array box: (%d, %d) is %g, expected %g", x, y, (double)mback[y * AW + x], (double)w);
        }
    CUDA_MEMCPY3D_BATCH_OP empty[1] = {op(pointer(vol, W, H), pointer((void *)dev, W, H), 0, 1, 1)};
    printf("3D batch with a zero width: %d\n", (int)cuMemcpy3DBatchAsync(1, empty, 0, s));
    CK(cuArrayDestroy(a));
    CK(cuMemFree(flat));
    CK(cuMemFree(dev));
    printf("3D batches: ok\n");
}

static void managed(CUdevice dev, CUstream s)
{
    int concurrent = 0;
    CK(cuDeviceGetAttribute(&concurrent, CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS, dev));
    if (!concurrent) {
        printf("managed batches: skipped (no concurrent managed access)\n");
        return;
    }
    CUdeviceptr m0, m1;
    CK(cuMemAllocManaged(&m0, N, CU_MEM_ATTACH_GLOBAL));
    CK(cuMemAllocManaged(&m1, N, CU_MEM_ATTACH_GLOBAL));
    memset((void *)m0, 0x5a, N);
    memset((void *)m1, 0xa5, N);
    CUdeviceptr ptrs[2] = {m0, m1};
    size_t sizes[2] = {N, N};
    CUmemLocation locs[2];
    memset(locs, 0, sizeof locs);
    locs[0].type = CU_MEM_LOCATION_TYPE_DEVICE;
    locs[0].id = (int)dev;
    locs[1].type = CU_MEM_LOCATION_TYPE_HOST;
    size_t idxs[2] = {0, 1};
    CK(cuMemPrefetchBatchAsync(ptrs, sizes, 2, locs, idxs, 2, 0, s));
    CK(cuStreamSynchronize(s));
    unsigned char b[4];
    CK(cuMemcpyDtoH(b, m0 + 100, 4));
    if (b[0] != 0x5a || ((unsigned char *)m1)[N - 1] != 0xa5)
        fail("prefetched managed memory changed: %#x %#x", b[0], ((unsigned char *)m1)[N - 1]);
    /* Discarded, then written again: the new contents are what counts. */
    CK(cuMemDiscardBatchAsync(ptrs, sizes, 2, 0, s));
    CK(cuStreamSynchronize(s));
    CK(cuMemsetD8(m0, 0x11, N));
    CK(cuCtxSynchronize());
    if (((unsigned char *)m0)[N / 2] != 0x11)
        fail("managed memory written after a discard reads %#x", ((unsigned char *)m0)[N / 2]);
    size_t one_idx[1] = {0};
    CK(cuMemDiscardAndPrefetchBatchAsync(ptrs, sizes, 2, locs, one_idx, 1, 0, s));
    CK(cuStreamSynchronize(s));
    memset((void *)m1, 0x22, N);
    CK(cuMemcpyDtoH(b, m1 + 7, 4));
    if (b[3] != 0x22)
        fail("managed memory written after a discard and prefetch reads %#x", b[3]);
    printf("prefetch batch on the legacy stream: %d\n", (int)cuMemPrefetchBatchAsync(ptrs, sizes, 1, locs, idxs, 1, 0, CU_STREAM_LEGACY));
    CK(cuMemFree(m0));
    CK(cuMemFree(m1));
    printf("managed batches: ok\n");
}

typedef CUresult (*stream_get_ctx_v2)(CUstream, CUcontext *, CUgreenCtx *);

static void stream_contexts(CUcontext ctx, CUstream s)
{
    CUcontext got = NULL;
    CUgreenCtx green = (CUgreenCtx)1;
    CK(cuStreamGetCtx_v2(s, &got, &green));
    if (got != ctx || green != NULL)
        fail("cuStreamGetCtx_v2: context %p (expected %p), green context %p", (void *)got, (void *)ctx, (void *)green);
    void *fn = NULL;
    CUdriverProcAddressQueryResult found;
    CK(cuGetProcAddress("cuStreamGetCtx", &fn, 12050, CU_GET_PROC_ADDRESS_DEFAULT, &found));
    got = NULL;
    green = (CUgreenCtx)1;
    CK(((stream_get_ctx_v2)fn)(s, &got, &green));
    if (got != ctx || green != NULL)
        fail("cuStreamGetCtx at 12.5: context %p, green context %p", (void *)got, (void *)green);
    printf("stream contexts: ok\n");
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    CUcontext ctx = primary_context();
    CUdevice dev;
    CK(cuCtxGetDevice(&dev));
    CUstream s;
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    linear_batches(s);
    boxes(s);
    managed(dev, s);
    stream_contexts(ctx, s);
    CK(cuStreamDestroy(s));
    printf("PASS " NAME "\n");
    return 0;
}
