/*
 * vmm_nokernel: the CUDA virtual memory management API, no kernels (a CI
 * program).
 *
 * Reserves address ranges, creates physical allocations, maps them (two
 * allocations side by side as one buffer; one allocation at two addresses),
 * sets access, copies and memsets across the seam, sees writes through the
 * alias, grows a buffer in place by mapping more of its reservation,
 * releases a handle while it is still mapped, asks for compressible memory
 * (which holds data whether or not the device granted compression), and
 * checks that bad requests fail and leave the context working. Output is deterministic, so a native
 * run and a run through the stub can be diffed.
 */
#include <cuda.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "vmm_nokernel"

#include "check_driver.h"
#include "check_bytes.h"

/* A call that must be refused (the exact code may differ between drivers). */
#define REFUSED(call)                                                         \
    do {                                                                      \
        if ((call) == CUDA_SUCCESS)                                           \
            fail("line %d: %s succeeded, expected an error", __LINE__,       \
                 #call);                                                      \
    } while (0)

static void set_rw(CUdeviceptr ptr, size_t size)
{
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = 0;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CK(cuMemSetAccess(ptr, size, &access, 1));
}

int main(void)
{
    CUdevice dev;
    primary_context();
    CK(cuCtxGetDevice(&dev));

    int vmm = 0;
    CK(cuDeviceGetAttribute(
        &vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev));
    REQUIRE(vmm == 1, "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is %d", vmm);
    printf("vmm supported\n");

    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    size_t g = 0, rec = 0;
    CK(cuMemGetAllocationGranularity(&g, &prop,
                                     CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    CK(cuMemGetAllocationGranularity(&rec, &prop,
                                     CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    REQUIRE(g > 0 && rec >= g && rec % g == 0, "granularity %zu / %zu", g, rec);
    printf("granularity ok\n");

    /* A buffer of two allocations, side by side in one reservation that
     * has room to grow to four granules. */
    CUdeviceptr r = 0;
    CK(cuMemAddressReserve(&r, 4 * g, 0, 0, 0));
    REQUIRE(r != 0 && r % g == 0, "reservation at %#llx", (unsigned long long)r);
    CUmemGenericAllocationHandle a, b, c;
    CK(cuMemCreate(&a, g, &prop, 0));
    CK(cuMemCreate(&b, g, &prop, 0));
    CK(cuMemMap(r, g, 0, a, 0));
    CK(cuMemMap(r + g, g, 0, b, 0));
    set_rw(r, 2 * g);

    size_t n = 2 * g;
    uint8_t *src = malloc(4 * g), *back = malloc(4 * g);
    if (!src || !back)
        fail("out of host memory");
    fill(src, n, 1);
    CK(cuMemcpyHtoD(r, src, n));
    memset(back, 0, n);
    CK(cuMemcpyDtoH(back, r, n));
    expect_bytes("two-allocation buffer", back, src, n);
    /* A memset and a small copy across the seam. */
    CK(cuMemsetD32(r + g - 64, 0x5a5a5a5a, 32));
    memset(src + g - 64, 0x5a, 128);
    CK(cuMemcpyDtoH(back, r + g - 256, 512));
    expect_bytes("memset across the seam", back, src + g - 256, 512);
    printf("two allocations, one buffer: ok\n");

    CUdeviceptr base = 0;
    size_t size = 0;
    CK(cuMemGetAddressRange(&base, &size, r + g + 100));
    REQUIRE(base <= r + g + 100 && r + g + 100 < base + size,
            "address range %#llx+%zu", (unsigned long long)base, size);
    unsigned long long flags = 0;
    CUmemLocation loc = {CU_MEM_LOCATION_TYPE_DEVICE, 0};
    CK(cuMemGetAccess(&flags, &loc, r + 5));
    REQUIRE(flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE, "access %llu", flags);
    CUmemAllocationProp got;
    memset(&got, 0xff, sizeof got);
    CK(cuMemGetAllocationPropertiesFromHandle(&got, b));
    REQUIRE(got.type == CU_MEM_ALLOCATION_TYPE_PINNED &&
                got.location.type == CU_MEM_LOCATION_TYPE_DEVICE &&
                got.location.id == 0,
            "properties of b: type %d location %d/%d", (int)got.type,
            (int)got.location.type, got.location.id);
    printf("queries ok\n");

    /* Aliasing: `a` mapped a second time elsewhere. */
    CUdeviceptr alias = 0;
    CK(cuMemAddressReserve(&alias, g, 0, 0, 0));
    CK(cuMemMap(alias, g, 0, a, 0));
    set_rw(alias, g);
    CK(cuMemcpyDtoH(back, alias + 1000, 256));
    expect_bytes("read through the alias", back, src + 1000, 256);
    uint8_t word[16];
    memset(word, 0xc3, sizeof word);
    CK(cuMemcpyHtoD(alias + 4096, word, sizeof word));
    CK(cuMemcpyDtoH(back, r + 4096, sizeof word));
    expect_bytes("write through the alias", back, word, sizeof word);
    CK(cuMemcpyDtoD(r + g + 512, alias + 4096, sizeof word));
    CK(cuMemcpyDtoH(back, r + g + 512, sizeof word));
    expect_bytes("device-to-device from the alias", back, word, sizeof word);
    memcpy(src + 4096, word, sizeof word);
    memcpy(src + g + 512, word, sizeof word);
    printf("aliasing ok\n");

    /* A retained handle is a reference of its own. */
    CUmemGenericAllocationHandle retained;
    CK(cuMemRetainAllocationHandle(&retained, (void *)(uintptr_t)(alias + 8)));
    CK(cuMemRelease(retained));

    /* Growing in place: a third allocation after the first two. */
    CK(cuMemCreate(&c, g, &prop, 0));
    CK(cuMemMap(r + 2 * g, g, 0, c, 0));
    set_rw(r + 2 * g, g);
    fill(src + 2 * g, g, 3);
    CK(cuMemcpyHtoD(r + 2 * g, src + 2 * g, g));
    CK(cuMemcpyDtoH(back, r, 3 * g));
    expect_bytes("grown buffer", back, src, 3 * g);
    printf("growth in place ok\n");

    /* Bad requests fail and change nothing. */
    CUdeviceptr mid = r + g;
    REFUSED(cuMemMap(mid, g, 0, c, 0));          /* already mapped */
    REFUSED(cuMemMap(r + 3 * g, g / 2, 0, c, 0)); /* not granular */
    REFUSED(cuMemMap(r + 3 * g, g, g, c, 0));     /* past the allocation */
    REFUSED(cuMemUnmap(r + g / 2, g));            /* cuts two mappings */
    REFUSED(cuMemAddressFree(r, g));              /* not the reservation */
    size_t odd = 0;
    REFUSED(cuMemExportToShareableHandle(&odd, a,
                                         CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                                         0));
    CK(cuMemcpyDtoH(back, r, 3 * g));
    expect_bytes("after refused requests", back, src, 3 * g);
    printf("bad requests refused\n");

    /* An allocation that may be shared later (XLA's allocator asks so):
     * made as asked, and its properties say what was requested. */
    CUmemAllocationProp sprop = prop;
    sprop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    size_t sg = 0;
    CK(cuMemGetAllocationGranularity(&sg, &sprop,
                                     CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    REQUIRE(sg > 0 && sg % g == 0, "shareable granularity %zu", sg);
    CUmemGenericAllocationHandle sh;
    CK(cuMemCreate(&sh, sg, &sprop, 0));
    memset(&got, 0, sizeof got);
    CK(cuMemGetAllocationPropertiesFromHandle(&got, sh));
    REQUIRE(got.requestedHandleTypes == CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            "requested handle types %d", (int)got.requestedHandleTypes);
    CK(cuMemRelease(sh));
    printf("shareable request ok\n");

    /* Release while mapped: the memory stays until its last mapping goes. */
    CK(cuMemRelease(a));
    CK(cuMemRelease(b));
    CK(cuMemRelease(c));
    CK(cuMemcpyDtoH(back, alias, 64));
    expect_bytes("released but mapped", back, src, 64);
    CK(cuMemUnmap(r, 3 * g));
    CK(cuMemUnmap(alias, g));
    CK(cuMemAddressFree(alias, g));
    CK(cuMemAddressFree(r, 4 * g));
    CK(cuCtxSynchronize());
    printf("released ok\n");

    /* Compressible memory, where the device offers it: the allocation
     * says whether it got compression, and holds data either way. */
    int compression = 0;
    CK(cuDeviceGetAttribute(
        &compression, CU_DEVICE_ATTRIBUTE_GENERIC_COMPRESSION_SUPPORTED, dev));
    CUmemAllocationProp cprop = prop;
    cprop.allocFlags.compressionType = CU_MEM_ALLOCATION_COMP_GENERIC;
    size_t cg = 0;
    CK(cuMemGetAllocationGranularity(&cg, &cprop,
                                     CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    REQUIRE(cg > 0, "compressible granularity %zu", cg);
    size_t csize = (2 * g + cg - 1) / cg * cg;
    CUmemGenericAllocationHandle ch;
    CK(cuMemCreate(&ch, csize, &cprop, 0));
    memset(&got, 0, sizeof got);
    CK(cuMemGetAllocationPropertiesFromHandle(&got, ch));
    int granted = got.allocFlags.compressionType == CU_MEM_ALLOCATION_COMP_GENERIC;
    REQUIRE(compression || !granted, "compression granted on a device without it");
    printf("compression supported %d, granted %d\n", compression != 0, granted);
    CUdeviceptr cr = 0;
    CK(cuMemAddressReserve(&cr, csize, 0, 0, 0));
    CK(cuMemMap(cr, csize, 0, ch, 0));
    CK(cuMemRelease(ch));
    set_rw(cr, csize);
    uint8_t *csrc = malloc(csize), *cback = malloc(csize);
    REQUIRE(csrc && cback, "out of host memory");
    fill(csrc, csize, 9);
    memset(csrc + csize / 2, 0, csize / 4); /* something to compress */
    CK(cuMemcpyHtoD(cr, csrc, csize));
    CK(cuMemsetD8(cr + csize / 2 + csize / 4, 0x5a, 4096));
    memset(csrc + csize / 2 + csize / 4, 0x5a, 4096);
    CK(cuMemcpyDtoH(cback, cr, csize));
    expect_bytes("compressible memory", cback, csrc, csize);
    CK(cuMemUnmap(cr, csize));
    CK(cuMemAddressFree(cr, csize));
    free(csrc);
    free(cback);
    printf("compressible allocation ok\n");

    /* Plain allocations still work next to all this. */
    CUdeviceptr p;
    CK(cuMemAlloc(&p, 1000));
    CK(cuMemcpyHtoD(p, src, 1000));
    CK(cuMemcpyDtoH(back, p, 1000));
    expect_bytes("cuMemAlloc afterwards", back, src, 1000);
    CK(cuMemFree(p));

    free(src);
    free(back);
    CK(cuDevicePrimaryCtxRelease(dev));
    printf("PASS " NAME "\n");
    return 0;
}
