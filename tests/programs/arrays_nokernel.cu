// arrays_nokernel: CUDA arrays, 3D copies and texture and surface objects
// without kernels (a CI program). 1D, 2D, 3D, layered, cube map and
// mipmapped arrays; copies into and out of them from host memory, pitched
// device memory and other arrays (cudaMemcpy2DToArray, cudaMemcpy2DFromArray,
// cudaMemcpy2DArrayToArray, cudaMemcpy3D, async variants on a stream);
// cudaMemcpy3D between pitched device memory and the host without arrays;
// descriptors (cudaArrayGetInfo, cudaGetChannelDesc); texture objects on
// arrays, mipmapped arrays, linear and pitched memory with their
// descriptions read back; surface objects; refused shapes; stream
// attributes and peer copies within the device. Deterministic
// output, so native and remote runs can be diffed.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <vector>

#define NAME "arrays_nokernel"

#include "check.h"

#include "check_bytes.h"

// A 2D array of `w` x `h` float4 written from the host with a pitch, read
// back whole and in part, copied to another array and through pitched
// device memory.
static void two_d(size_t w, size_t h, cudaStream_t stream)
{
    cudaChannelFormatDesc f = cudaCreateChannelDesc<float4>();
    cudaArray_t a = nullptr, b = nullptr;
    CK(cudaMallocArray(&a, &f, w, h));
    CK(cudaMallocArray(&b, &f, w, h, cudaArraySurfaceLoadStore));
    size_t row = w * sizeof(float4), pitch = row + 64;
    std::vector<unsigned char> host(pitch * h), want(row * h), got(row * h);
    fill(host.data(), host.size(), (unsigned)(w * h));
    for (size_t y = 0; y < h; y++)
        memcpy(&want[y * row], &host[y * pitch], row);
    char what[96];

    CK(cudaMemcpy2DToArray(a, 0, 0, host.data(), pitch, row, h, cudaMemcpyHostToDevice));
    CK(cudaMemcpy2DFromArray(got.data(), row, a, 0, 0, row, h, cudaMemcpyDeviceToHost));
    snprintf(what, sizeof what, "2D %zux%zu: round trip", w, h);
    expect_bytes(what, got.data(), want.data(), row * h);

    // An inner rectangle: columns 1..w-1 of rows 1..h-1.
    size_t iw = (w - 2) * sizeof(float4), ih = h - 2;
    std::vector<unsigned char> inner(iw * ih), inner_want(iw * ih);
    for (size_t y = 0; y < ih; y++)
        memcpy(&inner_want[y * iw], &want[(y + 1) * row + sizeof(float4)], iw);
    CK(cudaMemcpy2DFromArray(inner.data(), iw, a, sizeof(float4), 1, iw, ih, cudaMemcpyDeviceToHost));
    snprintf(what, sizeof what, "2D %zux%zu: inner rectangle", w, h);
    expect_bytes(what, inner.data(), inner_want.data(), iw * ih);

    // Array to array, then through pitched device memory, on a stream.
    CK(cudaMemcpy2DArrayToArray(b, 0, 0, a, 0, 0, row, h, cudaMemcpyDeviceToDevice));
    void *dev = nullptr;
    size_t dpitch = 0;
    CK(cudaMallocPitch(&dev, &dpitch, row, h));
    CK(cudaMemcpy2DFromArrayAsync(dev, dpitch, b, 0, 0, row, h, cudaMemcpyDeviceToDevice, stream));
    CK(cudaMemset2DAsync(dev, dpitch, 0, 16, h, stream)); // first float4 of each row
    CK(cudaMemcpy2DToArrayAsync(a, 0, 0, dev, dpitch, row, h, cudaMemcpyDeviceToDevice, stream));
    CK(cudaStreamSynchronize(stream));
    for (size_t y = 0; y < h; y++)
        memset(&want[y * row], 0, 16);
    CK(cudaMemcpy2DFromArrayAsync(got.data(), row, a, 0, 0, row, h, cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    snprintf(what, sizeof what, "2D %zux%zu: through device memory", w, h);
    expect_bytes(what, got.data(), want.data(), row * h);

    cudaChannelFormatDesc g;
    cudaExtent e;
    unsigned flags = 0;
    CK(cudaArrayGetInfo(&g, &e, &flags, b));
    printf("2D %zux%zu: info %d,%d,%d,%d kind %d extent %zux%zux%zu flags %u\n", w, h, g.x, g.y, g.z, g.w,
           (int)g.f, e.width, e.height, e.depth, flags);
    CK(cudaGetChannelDesc(&g, a));
    printf("2D %zux%zu: channel desc %d,%d,%d,%d kind %d\n", w, h, g.x, g.y, g.z, g.w, (int)g.f);
    CK(cudaFree(dev));
    CK(cudaFreeArray(b));
    CK(cudaFreeArray(a));
}

// A 3D array (or a layered one) written and read with cudaMemcpy3D, a box
// inside it read alone.
static void three_d(size_t w, size_t h, size_t d, unsigned flags)
{
    cudaChannelFormatDesc f = cudaCreateChannelDesc<unsigned short>();
    cudaArray_t a = nullptr;
    cudaExtent ext = make_cudaExtent(w, h, d);
    CK(cudaMalloc3DArray(&a, &f, ext, flags));
    size_t row = w * 2, n = row * h * d;
    std::vector<unsigned char> want(n), got(n);
    fill(want.data(), n, (unsigned)(n + flags));
    cudaMemcpy3DParms p = {};
    p.srcPtr = make_cudaPitchedPtr(want.data(), row, w, h);
    p.dstArray = a;
    p.extent = ext;
    p.kind = cudaMemcpyHostToDevice;
    CK(cudaMemcpy3D(&p));
    cudaMemcpy3DParms q = {};
    q.srcArray = a;
    q.dstPtr = make_cudaPitchedPtr(got.data(), row, w, h);
    q.extent = ext;
    q.kind = cudaMemcpyDeviceToHost;
    CK(cudaMemcpy3D(&q));
    char what[96];
    snprintf(what, sizeof what, "3D %zux%zux%zu flags %u: round trip", w, h, d, flags);
    expect_bytes(what, got.data(), want.data(), n);

    // The box (1..3, 1..3, 1..d) into a packed host buffer.
    size_t bw = 2, bh = 2, bd = d - 1;
    std::vector<unsigned char> box(bw * 2 * bh * bd), box_want(box.size());
    for (size_t z = 0; z < bd; z++)
        for (size_t y = 0; y < bh; y++)
            memcpy(&box_want[(z * bh + y) * bw * 2], &want[((z + 1) * h + y + 1) * row + 2], bw * 2);
    cudaMemcpy3DParms r = {};
    r.srcArray = a;
    r.srcPos = make_cudaPos(1, 1, 1); // in elements: an array is involved
    r.dstPtr = make_cudaPitchedPtr(box.data(), bw * 2, bw, bh);
    r.extent = make_cudaExtent(bw, bh, bd);
    r.kind = cudaMemcpyDeviceToHost;
    CK(cudaMemcpy3D(&r));
    snprintf(what, sizeof what, "3D %zux%zux%zu flags %u: box", w, h, d, flags);
    expect_bytes(what, box.data(), box_want.data(), box.size());

    cudaChannelFormatDesc g;
    cudaExtent e;
    unsigned got_flags = 0;
    CK(cudaArrayGetInfo(&g, &e, &got_flags, a));
    printf("3D %zux%zux%zu flags %u: extent %zux%zux%zu flags %u\n", w, h, d, flags, e.width, e.height, e.depth,
           got_flags);
    CK(cudaFreeArray(a));
}

// cudaMemcpy3D without arrays: pitched device memory to and from the host.
static void pitched_3d()
{
    size_t w = 40, h = 5, d = 3;
    cudaPitchedPtr dev;
    CK(cudaMalloc3D(&dev, make_cudaExtent(w, h, d)));
    std::vector<unsigned char> want(w * h * d), got(w * h * d);
    fill(want.data(), want.size(), 3);
    cudaMemcpy3DParms p = {};
    p.srcPtr = make_cudaPitchedPtr(want.data(), w, w, h);
    p.dstPtr = dev;
    p.extent = make_cudaExtent(w, h, d);
    p.kind = cudaMemcpyHostToDevice;
    CK(cudaMemcpy3D(&p));
    CK(cudaMemset3D(dev, 0x11, make_cudaExtent(8, h, 1)));
    for (size_t y = 0; y < h; y++)
        memset(&want[y * w], 0x11, 8);
    cudaMemcpy3DParms q = {};
    q.srcPtr = dev;
    q.dstPtr = make_cudaPitchedPtr(got.data(), w, w, h);
    q.extent = make_cudaExtent(w, h, d);
    q.kind = cudaMemcpyDeviceToHost;
    CK(cudaMemcpy3D(&q));
    expect_bytes("pitched 3D: round trip", got.data(), want.data(), want.size());
    CK(cudaFree(dev.ptr));
}

static void print_tex(const char *what, cudaTextureObject_t t)
{
    cudaResourceDesc r;
    cudaTextureDesc d;
    CK(cudaGetTextureObjectResourceDesc(&r, t));
    CK(cudaGetTextureObjectTextureDesc(&d, t));
    printf("%s: resource %d address %d,%d filter %d read %d normalized %d border %.1f\n", what, (int)r.resType,
           (int)d.addressMode[0], (int)d.addressMode[1], (int)d.filterMode, (int)d.readMode,
           d.normalizedCoords, d.borderColor[0]);
}

static void objects()
{
    cudaChannelFormatDesc f = cudaCreateChannelDesc<float>();
    cudaArray_t a = nullptr;
    CK(cudaMallocArray(&a, &f, 64, 32, cudaArraySurfaceLoadStore));
    cudaResourceDesc r = {};
    r.resType = cudaResourceTypeArray;
    r.res.array.array = a;
    cudaTextureDesc t = {};
    t.addressMode[0] = cudaAddressModeWrap;
    t.addressMode[1] = cudaAddressModeClamp;
    t.filterMode = cudaFilterModeLinear;
    t.readMode = cudaReadModeElementType;
    t.normalizedCoords = 1;
    cudaTextureObject_t tex = 0;
    CK(cudaCreateTextureObject(&tex, &r, &t, nullptr));
    print_tex("array texture", tex);

    cudaSurfaceObject_t surf = 0;
    CK(cudaCreateSurfaceObject(&surf, &r));
    cudaResourceDesc sr;
    CK(cudaGetSurfaceObjectResourceDesc(&sr, surf));
    printf("surface: resource %d same array %d\n", (int)sr.resType, sr.res.array.array == a);

    float *lin = nullptr;
    CK(cudaMalloc(&lin, 1024 * sizeof(float)));
    cudaResourceDesc lr = {};
    lr.resType = cudaResourceTypeLinear;
    lr.res.linear.devPtr = lin;
    lr.res.linear.desc = f;
    lr.res.linear.sizeInBytes = 1024 * sizeof(float);
    cudaTextureDesc lt = {};
    lt.readMode = cudaReadModeElementType;
    cudaTextureObject_t ltex = 0;
    CK(cudaCreateTextureObject(&ltex, &lr, &lt, nullptr));
    print_tex("linear texture", ltex);

    size_t pitch = 0;
    float *pd = nullptr;
    CK(cudaMallocPitch((void **)&pd, &pitch, 100 * sizeof(float), 10));
    cudaResourceDesc pr = {};
    pr.resType = cudaResourceTypePitch2D;
    pr.res.pitch2D.devPtr = pd;
    pr.res.pitch2D.desc = f;
    pr.res.pitch2D.width = 100;
    pr.res.pitch2D.height = 10;
    pr.res.pitch2D.pitchInBytes = pitch;
    cudaTextureDesc pt = {};
    pt.addressMode[0] = cudaAddressModeBorder;
    pt.addressMode[1] = cudaAddressModeBorder;
    pt.borderColor[0] = 0.5f;
    pt.readMode = cudaReadModeElementType;
    cudaTextureObject_t ptex = 0;
    CK(cudaCreateTextureObject(&ptex, &pr, &pt, nullptr));
    print_tex("pitch2D texture", ptex);

    // A mipmapped array and its levels.
    cudaMipmappedArray_t mip = nullptr;
    CK(cudaMallocMipmappedArray(&mip, &f, make_cudaExtent(64, 64, 0), 7));
    cudaArray_t l0 = nullptr, l3 = nullptr, l3b = nullptr;
    CK(cudaGetMipmappedArrayLevel(&l0, mip, 0));
    CK(cudaGetMipmappedArrayLevel(&l3, mip, 3));
    CK(cudaGetMipmappedArrayLevel(&l3b, mip, 3));
    cudaExtent e;
    cudaChannelFormatDesc g;
    unsigned flags;
    CK(cudaArrayGetInfo(&g, &e, &flags, l3));
    printf("mipmap level 3: %zux%zu same handle %d\n", e.width, e.height, l3 == l3b);
    std::vector<float> level(8 * 8), back(8 * 8);
    for (int i = 0; i < 64; i++)
        level[i] = (float)i * 0.25f;
    CK(cudaMemcpy2DToArray(l3, 0, 0, level.data(), 8 * sizeof(float), 8 * sizeof(float), 8, cudaMemcpyHostToDevice));
    CK(cudaMemcpy2DFromArray(back.data(), 8 * sizeof(float), l3, 0, 0, 8 * sizeof(float), 8, cudaMemcpyDeviceToHost));
    expect_bytes("mipmap level 3: round trip", (const unsigned char *)back.data(),
                 (const unsigned char *)level.data(), 64 * sizeof(float));
    cudaResourceDesc mr = {};
    mr.resType = cudaResourceTypeMipmappedArray;
    mr.res.mipmap.mipmap = mip;
    cudaTextureDesc mt = t;
    mt.mipmapFilterMode = cudaFilterModeLinear;
    mt.maxMipmapLevelClamp = 6.0f;
    cudaTextureObject_t mtex = 0;
    CK(cudaCreateTextureObject(&mtex, &mr, &mt, nullptr));
    print_tex("mipmapped texture", mtex);

    CK(cudaDestroyTextureObject(mtex));
    CK(cudaDestroyTextureObject(ptex));
    CK(cudaDestroyTextureObject(ltex));
    CK(cudaDestroySurfaceObject(surf));
    CK(cudaDestroyTextureObject(tex));
    CK(cudaFreeMipmappedArray(mip));
    CK(cudaFree(pd));
    CK(cudaFree(lin));
    CK(cudaFreeArray(a));
}

// Stream attributes (set, read back, copied to another stream) and peer
// copies within the one device.
static void streams_and_peers(cudaStream_t stream)
{
    unsigned char *a = nullptr, *b = nullptr;
    const size_t n = 1 << 16;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    cudaStreamAttrValue v = {};
    CK(cudaStreamGetAttribute(stream, cudaStreamAttributeSynchronizationPolicy, &v));
    printf("stream attributes: default sync policy %d\n", (int)v.syncPolicy);
    v.syncPolicy = cudaSyncPolicySpin;
    CK(cudaStreamSetAttribute(stream, cudaStreamAttributeSynchronizationPolicy, &v));
    cudaStreamAttrValue w = {};
    w.accessPolicyWindow.base_ptr = a;
    w.accessPolicyWindow.num_bytes = n;
    w.accessPolicyWindow.hitRatio = 0.5f;
    w.accessPolicyWindow.hitProp = cudaAccessPropertyPersisting;
    w.accessPolicyWindow.missProp = cudaAccessPropertyStreaming;
    CK(cudaStreamSetAttribute(stream, cudaStreamAttributeAccessPolicyWindow, &w));
    cudaStream_t other;
    CK(cudaStreamCreate(&other));
    CK(cudaStreamCopyAttributes(other, stream));
    cudaStreamAttrValue r = {}, q = {};
    CK(cudaStreamGetAttribute(other, cudaStreamAttributeSynchronizationPolicy, &r));
    CK(cudaStreamGetAttribute(other, cudaStreamAttributeAccessPolicyWindow, &q));
    printf("stream attributes: copied sync policy %d, window %d bytes %zu hit %.2f props %d %d\n", (int)r.syncPolicy,
           q.accessPolicyWindow.base_ptr == a, q.accessPolicyWindow.num_bytes, q.accessPolicyWindow.hitRatio,
           (int)q.accessPolicyWindow.hitProp, (int)q.accessPolicyWindow.missProp);
    cudaError_t e = cudaStreamSetAttribute(other, (cudaStreamAttrID)2, &v);
    printf("stream attributes: cooperative on a stream: %s\n", cudaGetErrorName(e));
    cudaGetLastError();

    std::vector<unsigned char> want(n), got(n);
    fill(want.data(), n, 9);
    CK(cudaMemcpy(a, want.data(), n, cudaMemcpyHostToDevice));
    CK(cudaMemcpyPeer(b, 0, a, 0, n));
    CK(cudaMemcpy(got.data(), b, n, cudaMemcpyDeviceToHost));
    expect_bytes("peer copy", got.data(), want.data(), n);
    CK(cudaMemset(b, 0, n));
    CK(cudaMemcpyPeerAsync(b, 0, a, 0, n, other));
    CK(cudaStreamSynchronize(other));
    CK(cudaMemcpy(got.data(), b, n, cudaMemcpyDeviceToHost));
    expect_bytes("peer copy async", got.data(), want.data(), n);
    printf("peer copies within the device: done\n");
    CK(cudaStreamDestroy(other));
    CK(cudaFree(b));
    CK(cudaFree(a));
}

static void refused()
{
    cudaChannelFormatDesc f = cudaCreateChannelDesc<float>();
    cudaArray_t a = nullptr;
    cudaError_t e = cudaMalloc3DArray(&a, &f, make_cudaExtent(16, 8, 6), cudaArrayCubemap);
    printf("cube map 16x8: %s\n", cudaGetErrorName(e));
    cudaGetLastError();
    e = cudaMalloc3DArray(&a, &f, make_cudaExtent(16, 16, 6), cudaArrayCubemap);
    printf("cube map 16x16: %s\n", cudaGetErrorName(e));
    if (e == cudaSuccess)
        CK(cudaFreeArray(a));
    CK(cudaMallocArray(&a, &f, 8, 8));
    std::vector<float> big(100 * 100);
    e = cudaMemcpy2DToArray(a, 0, 0, big.data(), 100 * sizeof(float), 100 * sizeof(float), 100,
                            cudaMemcpyHostToDevice);
    printf("copy past the array: %s\n", cudaGetErrorName(e));
    cudaGetLastError();
    CK(cudaFreeArray(a));
}

int main()
{
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    two_d(16, 4, stream);
    two_d(300, 200, stream); // ~0.9 MiB: beyond an inline copy
    three_d(8, 4, 3, 0);
    three_d(8, 4, 5, cudaArrayLayered);
    pitched_3d();
    objects();
    streams_and_peers(stream);
    refused();
    CK(cudaStreamDestroy(stream));
    printf("arrays_nokernel: %llu bytes checked\n", (unsigned long long)bytes_checked);
    printf("arrays_nokernel: done\n");
    printf("PASS " NAME "\n");
    return 0;
}
