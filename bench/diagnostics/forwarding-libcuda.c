// Diagnostic only (not part of gpupool): a libcuda.so.1 that forwards to
// NVIDIA's driver and logs a few calls, to compare with gpupool's trace.
// Built and run by forwarding-libcuda.sh on the GPU machine. Finding
// (2026-11-23, H100, driver 580.159.04): cuBLAS 13 fails cublasCreate
// through this shim before any logged call, most likely at the runtime's
// integrity check (this file's cuGetProcAddress_v2 is not the driver's), so
// the shim as written cannot trace past initialization; see
// docs/compatibility.md.
#define _GNU_SOURCE
#include <cuda.h>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>

static void *real;
static CUresult (*real_gpa)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);
static void init(void) {
    if (real) return;
    real = dlopen(getenv("REAL_LIBCUDA"), RTLD_NOW | RTLD_LOCAL);
    real_gpa = dlsym(real, "cuGetProcAddress_v2");
}
#define LOG(...) do { fprintf(stderr, "SHIM "); fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } while (0)

static CUresult (*r_getglobal)(CUdeviceptr *, size_t *, CUlibrary, const char *);
static CUresult w_getglobal(CUdeviceptr *p, size_t *s, CUlibrary l, const char *n) {
    CUresult r = r_getglobal(p, s, l, n);
    LOG("cuLibraryGetGlobal %s -> %d ptr=%llx size=%zu", n, r, p ? (unsigned long long)*p : 0ull, s ? *s : 0);
    return r;
}
static CUresult (*r_clusters)(int *, CUfunction, const CUlaunchConfig *);
static CUresult w_clusters(int *n, CUfunction f, const CUlaunchConfig *c) {
    CUresult r = r_clusters(n, f, c);
    unsigned cx = 0;
    for (unsigned i = 0; i < c->numAttrs; i++) if (c->attrs[i].id == CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION) cx = c->attrs[i].value.clusterDim.x;
    LOG("cuOccupancyMaxActiveClusters grid=%u block=%u smem=%u cluster=%u -> %d n=%d", c->gridDimX, c->blockDimX, c->sharedMemBytes, cx, r, n ? *n : -1);
    return r;
}
static CUresult (*r_ksetattr)(CUfunction_attribute, int, CUkernel, CUdevice);
static CUresult w_ksetattr(CUfunction_attribute a, int v, CUkernel k, CUdevice d) {
    CUresult r = r_ksetattr(a, v, k, d);
    LOG("cuKernelSetAttribute %d=%d -> %d", a, v, r);
    return r;
}
static CUresult (*r_kgetattr)(int *, CUfunction_attribute, CUkernel, CUdevice);
static CUresult w_kgetattr(int *p, CUfunction_attribute a, CUkernel k, CUdevice d) {
    CUresult r = r_kgetattr(p, a, k, d);
    LOG("cuKernelGetAttribute %d -> %d v=%d", a, r, p ? *p : -1);
    return r;
}
static CUresult (*r_fgetattr)(int *, CUfunction_attribute, CUfunction);
static CUresult w_fgetattr(int *p, CUfunction_attribute a, CUfunction f) {
    CUresult r = r_fgetattr(p, a, f);
    LOG("cuFuncGetAttribute %d -> %d v=%d", a, r, p ? *p : -1);
    return r;
}
static CUresult (*r_htoda)(CUdeviceptr, const void *, size_t, CUstream);
static CUresult w_htoda(CUdeviceptr d, const void *h, size_t n, CUstream s) {
    CUresult r = r_htoda(d, h, n, s);
    LOG("cuMemcpyHtoDAsync dst=%llx n=%zu stream=%p -> %d", (unsigned long long)d, n, (void *)s, r);
    return r;
}
static CUresult (*r_htoda2)(CUdeviceptr, const void *, size_t, CUstream);
static CUresult w_htoda2(CUdeviceptr d, const void *h, size_t n, CUstream s) {
    CUresult r = r_htoda2(d, h, n, s);
    LOG("cuMemcpyHtoDAsync_ptsz dst=%llx n=%zu -> %d", (unsigned long long)d, n, r);
    return r;
}
static CUresult (*r_ptrattr)(void *, CUpointer_attribute, CUdeviceptr);
static CUresult w_ptrattr(void *data, CUpointer_attribute a, CUdeviceptr p) {
    CUresult r = r_ptrattr(data, a, p);
    LOG("cuPointerGetAttribute %d ptr=%llx -> %d", a, (unsigned long long)p, r);
    return r;
}
static CUresult (*r_ptrattrs)(unsigned, CUpointer_attribute *, void **, CUdeviceptr);
static CUresult w_ptrattrs(unsigned n, CUpointer_attribute *a, void **d, CUdeviceptr p) {
    CUresult r = r_ptrattrs(n, a, d, p);
    LOG("cuPointerGetAttributes n=%u first=%d ptr=%llx -> %d", n, n ? a[0] : -1, (unsigned long long)p, r);
    return r;
}
static CUresult (*r_range)(CUdeviceptr *, size_t *, CUdeviceptr);
static CUresult w_range(CUdeviceptr *b, size_t *s, CUdeviceptr p) {
    CUresult r = r_range(b, s, p);
    LOG("cuMemGetAddressRange ptr=%llx -> %d", (unsigned long long)p, r);
    return r;
}

struct wrap { const char *name; void **real; void *w; };
static struct wrap wraps[] = {
    {"cuLibraryGetGlobal", (void **)&r_getglobal, (void *)w_getglobal},
    {"cuOccupancyMaxActiveClusters", (void **)&r_clusters, (void *)w_clusters},
    {"cuKernelSetAttribute", (void **)&r_ksetattr, (void *)w_ksetattr},
    {"cuKernelGetAttribute", (void **)&r_kgetattr, (void *)w_kgetattr},
    {"cuFuncGetAttribute", (void **)&r_fgetattr, (void *)w_fgetattr},
    {"cuMemcpyHtoDAsync", (void **)&r_htoda, (void *)w_htoda},
    {"cuPointerGetAttribute", (void **)&r_ptrattr, (void *)w_ptrattr},
    {"cuPointerGetAttributes", (void **)&r_ptrattrs, (void *)w_ptrattrs},
    {"cuMemGetAddressRange", (void **)&r_range, (void *)w_range},
};

CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, cuuint64_t flags, CUdriverProcAddressQueryResult *st) {
    init();
    CUresult r = real_gpa(sym, pfn, ver, flags, st);
    if (r != CUDA_SUCCESS || !pfn || !*pfn) return r;
    if (strcmp(sym, "cuMemcpyHtoDAsync") == 0 && (flags & 2)) { r_htoda2 = *pfn; *pfn = (void *)w_htoda2; return r; }
    for (size_t i = 0; i < sizeof wraps / sizeof wraps[0]; i++)
        if (strcmp(sym, wraps[i].name) == 0) { *wraps[i].real = *pfn; *pfn = wraps[i].w; }
    return r;
}
#undef cuGetProcAddress
CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, cuuint64_t flags) { return cuGetProcAddress_v2(sym, pfn, ver, flags, NULL); }
CUresult cuGetExportTable(const void **t, const CUuuid *id) {
    init();
    CUresult (*f)(const void **, const CUuuid *) = dlsym(real, "cuGetExportTable");
    return f(t, id);
}
