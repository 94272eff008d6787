// vmm_kernels: CUDA virtual memory management under kernels (a GPU program),
// in the manner of the CUDA sample vectorAddMMAP.
//
// - vector add over buffers each made of two physical allocations mapped
//   side by side in one reserved range (handles released once mapped, as
//   the sample does);
// - a buffer grown in place: more of its reservation mapped later, a kernel
//   over the whole;
// - one allocation mapped at two addresses: a kernel writes through one and
//   another kernel compares through both.
// The driver's VMM entry points come from cudaGetDriverEntryPointByVersion,
// so the program links only the static runtime. Output is deterministic.
#define NAME "vmm_kernels"
#include "check.h"

#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "driver_entry.h"

static decltype(&cuMemGetAllocationGranularity) pGranularity;
static decltype(&cuMemAddressReserve) pReserve;
static decltype(&cuMemAddressFree) pAddressFree;
static decltype(&cuMemCreate) pCreate;
static decltype(&cuMemRelease) pRelease;
static decltype(&cuMemMap) pMap;
static decltype(&cuMemUnmap) pUnmap;
static decltype(&cuMemSetAccess) pSetAccess;

static CUmemAllocationProp prop;
static size_t gran;

__global__ void vec_add(const float *a, const float *b, float *c, size_t n)
{
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n)
        c[i] = a[i] + b[i];
}

__global__ void fill_idx(float *p, size_t n, float base)
{
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n)
        p[i] = base + (float)i;
}

__global__ void count_diff(const float *x, const float *y, size_t n, unsigned *bad)
{
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n && x[i] != y[i])
        atomicAdd(bad, 1u);
}

static unsigned blocks(size_t n) { return (unsigned)((n + 255) / 256); }

static void set_rw(CUdeviceptr p, size_t size)
{
    CUmemAccessDesc d;
    memset(&d, 0, sizeof d);
    d.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    d.location.id = 0;
    d.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CKD(pSetAccess(p, size, &d, 1));
}

// `chunks` allocations of one granule each, mapped side by side in a
// reservation of `reserve_chunks` granules; the handles are released at
// once (the mappings keep the memory).
static CUdeviceptr mapped_buffer(size_t chunks, size_t reserve_chunks)
{
    CUdeviceptr p = 0;
    CKD(pReserve(&p, reserve_chunks * gran, 0, 0, 0));
    for (size_t i = 0; i < chunks; i++) {
        CUmemGenericAllocationHandle h;
        CKD(pCreate(&h, gran, &prop, 0));
        CKD(pMap(p + i * gran, gran, 0, h, 0));
        CKD(pRelease(h));
    }
    set_rw(p, chunks * gran);
    return p;
}

int main()
{
    CK(cudaFree(0));
    pGranularity = DRV(cuMemGetAllocationGranularity);
    pReserve = DRV(cuMemAddressReserve);
    pAddressFree = DRV(cuMemAddressFree);
    pCreate = DRV(cuMemCreate);
    pRelease = DRV(cuMemRelease);
    pMap = DRV(cuMemMap);
    pUnmap = DRV(cuMemUnmap);
    pSetAccess = DRV(cuMemSetAccess);

    int vmm = 0;
    CK(cudaDeviceGetAttribute(&vmm, (cudaDeviceAttr)CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, 0));
    if (vmm != 1)
        fail("virtual memory management not supported");
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    CKD(pGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));

    // 1. vectorAddMMAP: A, B, C of two allocations each.
    size_t n = 2 * gran / sizeof(float);
    CUdeviceptr a = mapped_buffer(2, 2), b = mapped_buffer(2, 2), c = mapped_buffer(2, 2);
    std::vector<float> ha(n), hb(n), hc(n);
    for (size_t i = 0; i < n; i++) {
        ha[i] = (float)(i % 1000) * 0.5f;
        hb[i] = (float)(i % 777);
    }
    CK(cudaMemcpy((void *)a, ha.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemcpy((void *)b, hb.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    vec_add<<<blocks(n), 256>>>((const float *)a, (const float *)b, (float *)c, n);
    CK_LAUNCH("vec_add");
    CK(cudaMemcpy(hc.data(), (void *)c, n * sizeof(float), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++)
        if (hc[i] != ha[i] + hb[i])
            fail("vec_add: c[%zu] = %f, expected %f", i, hc[i], ha[i] + hb[i]);
    printf("vector add over two-allocation buffers: %zu elements ok\n", n);

    // 2. Growth in place: one granule mapped, then a second after it.
    CUdeviceptr g = mapped_buffer(1, 4);
    size_t per = gran / sizeof(float);
    fill_idx<<<blocks(per), 256>>>((float *)g, per, 0.0f);
    CK_LAUNCH("fill_idx");
    CUmemGenericAllocationHandle more;
    CKD(pCreate(&more, gran, &prop, 0));
    CKD(pMap(g + gran, gran, 0, more, 0));
    CKD(pRelease(more));
    set_rw(g + gran, gran);
    fill_idx<<<blocks(per), 256>>>((float *)(g + gran), per, (float)per);
    CK_LAUNCH("fill_idx");
    unsigned *bad;
    CK(cudaMalloc(&bad, sizeof(unsigned)));
    CK(cudaMemset(bad, 0, sizeof(unsigned)));
    CUdeviceptr expect = mapped_buffer(2, 2);
    fill_idx<<<blocks(2 * per), 256>>>((float *)expect, 2 * per, 0.0f);
    count_diff<<<blocks(2 * per), 256>>>((const float *)g, (const float *)expect, 2 * per, bad);
    CK_LAUNCH("count_diff");
    unsigned hbad = 1;
    CK(cudaMemcpy(&hbad, bad, sizeof hbad, cudaMemcpyDeviceToHost));
    if (hbad != 0)
        fail("grown buffer: %u elements differ", hbad);
    printf("buffer grown in place: ok\n");

    // 3. Aliasing seen by kernels.
    CUdeviceptr x = 0, y = 0;
    CKD(pReserve(&x, gran, 0, 0, 0));
    CKD(pReserve(&y, gran, 0, 0, 0));
    CUmemGenericAllocationHandle h;
    CKD(pCreate(&h, gran, &prop, 0));
    CKD(pMap(x, gran, 0, h, 0));
    CKD(pMap(y, gran, 0, h, 0));
    set_rw(x, gran);
    set_rw(y, gran);
    fill_idx<<<blocks(per), 256>>>((float *)x, per, 42.0f);
    CK(cudaMemset(bad, 0, sizeof(unsigned)));
    count_diff<<<blocks(per), 256>>>((const float *)x, (const float *)y, per, bad);
    CK_LAUNCH("count_diff");
    CK(cudaMemcpy(&hbad, bad, sizeof hbad, cudaMemcpyDeviceToHost));
    if (hbad != 0)
        fail("alias: %u elements differ", hbad);
    fill_idx<<<blocks(per), 256>>>((float *)y, per, -7.0f);
    CK_LAUNCH("fill_idx");
    float probe[4];
    CK(cudaMemcpy(probe, (void *)(x + 1000 * sizeof(float)), sizeof probe, cudaMemcpyDeviceToHost));
    for (int i = 0; i < 4; i++)
        if (probe[i] != -7.0f + (float)(1000 + i))
            fail("alias: x[%d] = %f after a write through y", 1000 + i, probe[i]);
    printf("aliasing seen by kernels: ok\n");

    // Tear down: unmaps of whole buffers, handles released while mapped.
    CK(cudaDeviceSynchronize());
    CKD(pRelease(h));
    CKD(pUnmap(x, gran));
    CKD(pUnmap(y, gran));
    CKD(pAddressFree(x, gran));
    CKD(pAddressFree(y, gran));
    for (CUdeviceptr p : {a, b, c, expect}) {
        CKD(pUnmap(p, 2 * gran));
        CKD(pAddressFree(p, 2 * gran));
    }
    CKD(pUnmap(g, 2 * gran));
    CKD(pAddressFree(g, 4 * gran));
    CK(cudaFree(bad));
    printf("PASS " NAME "\n");
    return 0;
}
