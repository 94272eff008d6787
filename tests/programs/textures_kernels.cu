// textures_kernels: kernels that read textures and read and write surfaces
// (a GPU program). Point-sampled reads are checked against the host's
// data exactly; filtered reads (bilinear, trilinear, mipmapped) print a
// checksum that the native and the remote run must share. 2D arrays with
// normalized and unnormalized coordinates and each address mode, linear
// memory (tex1Dfetch), pitched memory, 3D, layered and cube map arrays, a
// mipmapped array read with tex2DLod, a surface written by one kernel and
// read by another, and an image filter in the style of the CUDA samples
// (a 5x5 box blur through a texture, against the CPU).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#define NAME "textures_kernels"

#include "check.h"

// cudaMemcpyToArray is deprecated, and still what older programs call.
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

static cudaTextureObject_t make_texture(const cudaResourceDesc &r, cudaTextureAddressMode mode,
                                        cudaTextureFilterMode filter, int normalized)
{
    cudaTextureDesc t = {};
    t.addressMode[0] = t.addressMode[1] = t.addressMode[2] = mode;
    t.filterMode = filter;
    t.readMode = cudaReadModeElementType;
    t.normalizedCoords = normalized;
    t.borderColor[0] = -1.0f;
    cudaTextureObject_t tex = 0;
    CK(cudaCreateTextureObject(&tex, &r, &t, nullptr));
    return tex;
}

static cudaResourceDesc array_resource(cudaArray_t a)
{
    cudaResourceDesc r = {};
    r.resType = cudaResourceTypeArray;
    r.res.array.array = a;
    return r;
}

// Samples texture `tex` at (x * sx + ox, y * sy + oy) for each output pixel.
__global__ void sample2d(cudaTextureObject_t tex, float *out, int w, int h, float sx, float sy, float ox, float oy)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x < w && y < h)
        out[y * w + x] = tex2D<float>(tex, x * sx + ox, y * sy + oy);
}

__global__ void fetch1d(cudaTextureObject_t tex, float *out, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = tex1Dfetch<float>(tex, n - 1 - i);
}

__global__ void sample3d(cudaTextureObject_t tex, float *out, int w, int h, int d)
{
    int x = threadIdx.x, y = threadIdx.y, z = blockIdx.x;
    if (x < w && y < h && z < d)
        out[(z * h + y) * w + x] = tex3D<float>(tex, x + 0.5f, y + 0.5f, z + 0.5f);
}

__global__ void sample_layered(cudaTextureObject_t tex, float *out, int w, int h, int layers)
{
    int x = threadIdx.x, y = threadIdx.y, l = blockIdx.x;
    if (x < w && y < h && l < layers)
        out[(l * h + y) * w + x] = tex2DLayered<float>(tex, x + 0.5f, y + 0.5f, l);
}

__global__ void sample_cube(cudaTextureObject_t tex, float *out, int n)
{
    int i = threadIdx.x;
    if (i < n) {
        float a = 6.2831853f * i / n;
        out[i] = texCubemap<float>(tex, cosf(a), sinf(a), 0.3f);
    }
}

__global__ void sample_lod(cudaTextureObject_t tex, float *out, int n)
{
    int i = threadIdx.x;
    if (i < n)
        out[i] = tex2DLod<float>(tex, 0.37f, 0.61f, i * 0.5f);
}

__global__ void surface_write(cudaSurfaceObject_t s, int w, int h)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x < w && y < h)
        surf2Dwrite(make_float2(x * 0.5f, y * 2.0f), s, x * sizeof(float2), y);
}

__global__ void surface_scale(cudaSurfaceObject_t s, int w, int h)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x < w && y < h) {
        float2 v = surf2Dread<float2>(s, x * sizeof(float2), y);
        surf2Dwrite(make_float2(v.x + v.y, v.x * v.y), s, x * sizeof(float2), y);
    }
}

__global__ void box_blur(cudaTextureObject_t tex, unsigned char *out, int w, int h)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || y >= h)
        return;
    int sum = 0;
    for (int dy = -2; dy <= 2; dy++)
        for (int dx = -2; dx <= 2; dx++)
            sum += tex2D<unsigned char>(tex, x + dx, y + dy);
    out[y * w + x] = (unsigned char)(sum / 25);
}

static double checksum(const std::vector<float> &v)
{
    double s = 0;
    for (size_t i = 0; i < v.size(); i++)
        s += v[i] * (double)((i % 7) + 1);
    return s;
}

static void require_equal(const char *what, const std::vector<float> &got, const std::vector<float> &want)
{
    for (size_t i = 0; i < want.size(); i++)
        if (got[i] != want[i])
            fail("%s: element %zu is %g, expected %g", what, i, got[i], want[i]);
    printf("%s: %zu values exact\n", what, want.size());
}

static void two_d()
{
    const int w = 64, h = 48;
    std::vector<float> img(w * h);
    for (int i = 0; i < w * h; i++)
        img[i] = (float)((i * 37) % 101) - 50.0f;
    cudaChannelFormatDesc f = cudaCreateChannelDesc<float>();
    cudaArray_t a;
    CK(cudaMallocArray(&a, &f, w, h));
    CK(cudaMemcpy2DToArray(a, 0, 0, img.data(), w * sizeof(float), w * sizeof(float), h, cudaMemcpyHostToDevice));
    float *out;
    CK(cudaMalloc(&out, w * h * sizeof(float)));
    std::vector<float> got(w * h);
    dim3 block(16, 16), grid((w + 15) / 16, (h + 15) / 16);

    // Point sampling at texel centres: the image itself.
    cudaTextureObject_t point = make_texture(array_resource(a), cudaAddressModeClamp, cudaFilterModePoint, 0);
    sample2d<<<grid, block>>>(point, out, w, h, 1, 1, 0.5f, 0.5f);
    CK_LAUNCH("sample2d");
    CK(cudaMemcpy(got.data(), out, w * h * sizeof(float), cudaMemcpyDeviceToHost));
    require_equal("2D point", got, img);

    // Bilinear, normalized coordinates, each address mode, off the edges.
    const cudaTextureAddressMode modes[] = {cudaAddressModeWrap, cudaAddressModeClamp, cudaAddressModeMirror,
                                            cudaAddressModeBorder};
    const char *names[] = {"wrap", "clamp", "mirror", "border"};
    for (int m = 0; m < 4; m++) {
        cudaTextureObject_t lin = make_texture(array_resource(a), modes[m], cudaFilterModeLinear, 1);
        sample2d<<<grid, block>>>(lin, out, w, h, 1.3f / w, 1.3f / h, -0.2f, -0.15f);
        CK_LAUNCH("sample2d");
        CK(cudaMemcpy(got.data(), out, w * h * sizeof(float), cudaMemcpyDeviceToHost));
        printf("2D bilinear %s: checksum %.4f\n", names[m], checksum(got));
        CK(cudaDestroyTextureObject(lin));
    }
    CK(cudaDestroyTextureObject(point));
    CK(cudaFree(out));
    CK(cudaFreeArray(a));
}

static void linear_and_pitched()
{
    const int n = 1000;
    std::vector<float> v(n), want(n), got(n);
    for (int i = 0; i < n; i++)
        v[i] = i * 0.75f;
    for (int i = 0; i < n; i++)
        want[i] = v[n - 1 - i];
    float *buf, *out;
    CK(cudaMalloc(&buf, n * sizeof(float)));
    CK(cudaMalloc(&out, n * sizeof(float)));
    CK(cudaMemcpy(buf, v.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    cudaResourceDesc r = {};
    r.resType = cudaResourceTypeLinear;
    r.res.linear.devPtr = buf;
    r.res.linear.desc = cudaCreateChannelDesc<float>();
    r.res.linear.sizeInBytes = n * sizeof(float);
    cudaTextureObject_t tex = make_texture(r, cudaAddressModeClamp, cudaFilterModePoint, 0);
    fetch1d<<<(n + 255) / 256, 256>>>(tex, out, n);
    CK_LAUNCH("fetch1d");
    CK(cudaMemcpy(got.data(), out, n * sizeof(float), cudaMemcpyDeviceToHost));
    require_equal("linear tex1Dfetch", got, want);
    CK(cudaDestroyTextureObject(tex));

    // Pitched memory, bilinear.
    const int w = 40, h = 30;
    size_t pitch;
    float *img;
    CK(cudaMallocPitch(&img, &pitch, w * sizeof(float), h));
    std::vector<float> host(w * h), sampled(w * h);
    for (int i = 0; i < w * h; i++)
        host[i] = sinf(i * 0.05f);
    CK(cudaMemcpy2D(img, pitch, host.data(), w * sizeof(float), w * sizeof(float), h, cudaMemcpyHostToDevice));
    cudaResourceDesc p = {};
    p.resType = cudaResourceTypePitch2D;
    p.res.pitch2D.devPtr = img;
    p.res.pitch2D.desc = cudaCreateChannelDesc<float>();
    p.res.pitch2D.width = w;
    p.res.pitch2D.height = h;
    p.res.pitch2D.pitchInBytes = pitch;
    cudaTextureObject_t ptex = make_texture(p, cudaAddressModeClamp, cudaFilterModeLinear, 0);
    float *o;
    CK(cudaMalloc(&o, w * h * sizeof(float)));
    sample2d<<<dim3(3, 2), dim3(16, 16)>>>(ptex, o, w, h, 0.9f, 0.9f, 0.75f, 0.75f);
    CK_LAUNCH("sample2d");
    CK(cudaMemcpy(sampled.data(), o, w * h * sizeof(float), cudaMemcpyDeviceToHost));
    printf("pitch2D bilinear: checksum %.4f\n", checksum(sampled));
    CK(cudaDestroyTextureObject(ptex));
    CK(cudaFree(o));
    CK(cudaFree(img));
    CK(cudaFree(out));
    CK(cudaFree(buf));
}

static void volumes()
{
    const int w = 8, h = 6, d = 4;
    std::vector<float> vol(w * h * d), got(w * h * d);
    for (int i = 0; i < w * h * d; i++)
        vol[i] = (float)(i * 3 % 17);
    cudaChannelFormatDesc f = cudaCreateChannelDesc<float>();
    float *out;
    CK(cudaMalloc(&out, vol.size() * sizeof(float)));
    for (int layered = 0; layered < 2; layered++) {
        cudaArray_t a;
        CK(cudaMalloc3DArray(&a, &f, make_cudaExtent(w, h, d), layered ? cudaArrayLayered : 0));
        cudaMemcpy3DParms p = {};
        p.srcPtr = make_cudaPitchedPtr(vol.data(), w * sizeof(float), w, h);
        p.dstArray = a;
        p.extent = make_cudaExtent(w, h, d);
        p.kind = cudaMemcpyHostToDevice;
        CK(cudaMemcpy3D(&p));
        cudaTextureObject_t tex = make_texture(array_resource(a), cudaAddressModeClamp, cudaFilterModePoint, 0);
        if (layered)
            sample_layered<<<d, dim3(w, h)>>>(tex, out, w, h, d);
        else
            sample3d<<<d, dim3(w, h)>>>(tex, out, w, h, d);
        CK_LAUNCH("sample3d");
        CK(cudaMemcpy(got.data(), out, vol.size() * sizeof(float), cudaMemcpyDeviceToHost));
        require_equal(layered ? "layered 2D" : "3D", got, vol);
        CK(cudaDestroyTextureObject(tex));
        CK(cudaFreeArray(a));
    }

    // A cube map: each face a constant, sampled around the equator.
    const int side = 16;
    std::vector<float> faces(side * side * 6);
    for (int face = 0; face < 6; face++)
        for (int i = 0; i < side * side; i++)
            faces[face * side * side + i] = face * 10.0f + (i % side) * 0.1f;
    cudaArray_t cube;
    CK(cudaMalloc3DArray(&cube, &f, make_cudaExtent(side, side, 6), cudaArrayCubemap));
    cudaMemcpy3DParms p = {};
    p.srcPtr = make_cudaPitchedPtr(faces.data(), side * sizeof(float), side, side);
    p.dstArray = cube;
    p.extent = make_cudaExtent(side, side, 6);
    p.kind = cudaMemcpyHostToDevice;
    CK(cudaMemcpy3D(&p));
    cudaTextureObject_t tex = make_texture(array_resource(cube), cudaAddressModeClamp, cudaFilterModeLinear, 1);
    std::vector<float> ring(32);
    sample_cube<<<1, 32>>>(tex, out, 32);
    CK_LAUNCH("sample_cube");
    CK(cudaMemcpy(ring.data(), out, 32 * sizeof(float), cudaMemcpyDeviceToHost));
    printf("cube map: checksum %.4f\n", checksum(ring));
    CK(cudaDestroyTextureObject(tex));
    CK(cudaFreeArray(cube));
    CK(cudaFree(out));
}

static void mipmaps()
{
    const int side = 64, levels = 7;
    cudaChannelFormatDesc f = cudaCreateChannelDesc<float>();
    cudaMipmappedArray_t mip;
    CK(cudaMallocMipmappedArray(&mip, &f, make_cudaExtent(side, side, 0), levels));
    for (int l = 0; l < levels; l++) {
        int s = side >> l;
        std::vector<float> level(s * s);
        for (int i = 0; i < s * s; i++)
            level[i] = l * 100.0f + (i % s);
        cudaArray_t a;
        CK(cudaGetMipmappedArrayLevel(&a, mip, l));
        CK(cudaMemcpy2DToArray(a, 0, 0, level.data(), s * sizeof(float), s * sizeof(float), s,
                               cudaMemcpyHostToDevice));
    }
    cudaResourceDesc r = {};
    r.resType = cudaResourceTypeMipmappedArray;
    r.res.mipmap.mipmap = mip;
    cudaTextureDesc t = {};
    t.addressMode[0] = t.addressMode[1] = cudaAddressModeClamp;
    t.filterMode = cudaFilterModeLinear;
    t.mipmapFilterMode = cudaFilterModeLinear;
    t.maxMipmapLevelClamp = levels - 1;
    t.normalizedCoords = 1;
    t.readMode = cudaReadModeElementType;
    cudaTextureObject_t tex;
    CK(cudaCreateTextureObject(&tex, &r, &t, nullptr));
    float *out;
    CK(cudaMalloc(&out, 14 * sizeof(float)));
    sample_lod<<<1, 14>>>(tex, out, 14);
    CK_LAUNCH("sample_lod");
    std::vector<float> got(14);
    CK(cudaMemcpy(got.data(), out, 14 * sizeof(float), cudaMemcpyDeviceToHost));
    printf("mipmap tex2DLod:");
    for (float v : got)
        printf(" %.3f", v);
    printf("\n");
    CK(cudaDestroyTextureObject(tex));
    CK(cudaFreeMipmappedArray(mip));
    CK(cudaFree(out));
}

static void surfaces()
{
    const int w = 50, h = 20;
    cudaChannelFormatDesc f = cudaCreateChannelDesc<float2>();
    cudaArray_t a;
    CK(cudaMallocArray(&a, &f, w, h, cudaArraySurfaceLoadStore));
    cudaResourceDesc r = array_resource(a);
    cudaSurfaceObject_t s;
    CK(cudaCreateSurfaceObject(&s, &r));
    dim3 block(16, 16), grid((w + 15) / 16, (h + 15) / 16);
    surface_write<<<grid, block>>>(s, w, h);
    CK_LAUNCH("surface_write");
    surface_scale<<<grid, block>>>(s, w, h);
    CK_LAUNCH("surface_scale");
    std::vector<float> got(w * h * 2), want(w * h * 2);
    CK(cudaMemcpy2DFromArray(got.data(), w * sizeof(float2), a, 0, 0, w * sizeof(float2), h,
                             cudaMemcpyDeviceToHost));
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            float vx = x * 0.5f, vy = y * 2.0f;
            want[(y * w + x) * 2] = vx + vy;
            want[(y * w + x) * 2 + 1] = vx * vy;
        }
    require_equal("surface write, read, write", got, want);
    CK(cudaDestroySurfaceObject(s));
    CK(cudaFreeArray(a));
}

static void blur()
{
    const int w = 96, h = 64;
    std::vector<unsigned char> img(w * h), got(w * h), want(w * h);
    for (int i = 0; i < w * h; i++)
        img[i] = (unsigned char)((i * 131) ^ (i >> 3));
    cudaChannelFormatDesc f = cudaCreateChannelDesc<unsigned char>();
    cudaArray_t a;
    CK(cudaMallocArray(&a, &f, w, h));
    CK(cudaMemcpyToArray(a, 0, 0, img.data(), img.size(), cudaMemcpyHostToDevice));
    cudaTextureObject_t tex = make_texture(array_resource(a), cudaAddressModeClamp, cudaFilterModePoint, 0);
    unsigned char *out;
    CK(cudaMalloc(&out, w * h));
    box_blur<<<dim3(w / 16, h / 16), dim3(16, 16)>>>(tex, out, w, h);
    CK_LAUNCH("box_blur");
    CK(cudaMemcpy(got.data(), out, w * h, cudaMemcpyDeviceToHost));
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            int sum = 0;
            for (int dy = -2; dy <= 2; dy++)
                for (int dx = -2; dx <= 2; dx++) {
                    int cx = x + dx < 0 ? 0 : (x + dx >= w ? w - 1 : x + dx);
                    int cy = y + dy < 0 ? 0 : (y + dy >= h ? h - 1 : y + dy);
                    sum += img[cy * w + cx];
                }
            want[y * w + x] = (unsigned char)(sum / 25);
        }
    if (memcmp(got.data(), want.data(), w * h) != 0)
        fail("box blur differs from the CPU");
    printf("box blur %dx%d: matches the CPU\n", w, h);
    CK(cudaDestroyTextureObject(tex));
    CK(cudaFree(out));
    CK(cudaFreeArray(a));
}

int main()
{
    two_d();
    linear_and_pitched();
    volumes();
    mipmaps();
    surfaces();
    blur();
    CK(cudaDeviceSynchronize());
    printf("PASS " NAME "\n");
    return 0;
}
