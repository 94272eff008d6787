// Times one pitched device-to-host copy (a narrow column of many rows, as
// bench/overcommit_turns.cu reads its sample) through the driver's entry
// points, into pageable and into pinned host memory, from memory of
// cuMemAlloc and from VMM memory (cuMemCreate + cuMemMap, as gpupool-server
// maps a session's memory). Natively; it says which driver call a server
// should use for such a copy.
//
// Usage: pitched_copy [MIB [WIDTH [PITCH]]]   (12288 MiB, 4 bytes, 16396 bytes)
// Build: nvcc -O2 -o pitched_copy pitched_copy.c -lcuda
#define NAME "pitched_copy"
#include "../../tests/programs/check_driver.h"
#include <string.h>
#include <time.h>


static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

enum how { COPY_2D, COPY_2D_UNALIGNED, COPY_3D_ASYNC_STREAM, COPY_3D_ASYNC_NULL, COPY_2D_ASYNC_STREAM };
static const char *how_name[] = {"cuMemcpy2D", "cuMemcpy2DUnaligned", "cuMemcpy3DAsync(stream)",
                                 "cuMemcpy3DAsync(null)", "cuMemcpy2DAsync(stream)"};

static double run(enum how how, CUdeviceptr src, size_t width, size_t pitch, size_t rows, void *dst, CUstream s) {
    double t0 = now_ms();
    if (how == COPY_3D_ASYNC_STREAM || how == COPY_3D_ASYNC_NULL) {
        CUDA_MEMCPY3D c;
        memset(&c, 0, sizeof c);
        c.srcMemoryType = CU_MEMORYTYPE_DEVICE;
        c.srcDevice = src;
        c.srcPitch = pitch;
        c.srcHeight = rows;
        c.dstMemoryType = CU_MEMORYTYPE_HOST;
        c.dstHost = dst;
        c.dstPitch = width;
        c.dstHeight = rows;
        c.WidthInBytes = width;
        c.Height = rows;
        c.Depth = 1;
        CUstream on = how == COPY_3D_ASYNC_STREAM ? s : NULL;
        CK(cuMemcpy3DAsync(&c, on));
        CK(cuStreamSynchronize(on));
    } else {
        CUDA_MEMCPY2D c;
        memset(&c, 0, sizeof c);
        c.srcMemoryType = CU_MEMORYTYPE_DEVICE;
        c.srcDevice = src;
        c.srcPitch = pitch;
        c.dstMemoryType = CU_MEMORYTYPE_HOST;
        c.dstHost = dst;
        c.dstPitch = width;
        c.WidthInBytes = width;
        c.Height = rows;
        if (how == COPY_2D) CK(cuMemcpy2D(&c));
        if (how == COPY_2D_UNALIGNED) CK(cuMemcpy2DUnaligned(&c));
        if (how == COPY_2D_ASYNC_STREAM) {
            CK(cuMemcpy2DAsync(&c, s));
            CK(cuStreamSynchronize(s));
        }
    }
    return now_ms() - t0;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 12288;
    size_t width = argc > 2 ? (size_t)atol(argv[2]) : 4;
    size_t pitch = argc > 3 ? (size_t)atol(argv[3]) : 16396;
    size_t bytes = mib << 20, rows = bytes / pitch;
    CUstream s;
    primary_context();
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));

    // Plain memory.
    CUdeviceptr plain;
    CK(cuMemAlloc(&plain, bytes));
    CK(cuMemsetD32(plain, 7, bytes / 4));

    // VMM memory: one allocation mapped in a reserved range.
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    size_t gran = 0;
    CK(cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    size_t vbytes = (bytes + gran - 1) / gran * gran;
    CUmemGenericAllocationHandle h;
    CUdeviceptr vmm;
    CK(cuMemCreate(&h, vbytes, &prop, 0));
    CK(cuMemAddressReserve(&vmm, vbytes, 0, 0, 0));
    CK(cuMemMap(vmm, vbytes, 0, h, 0));
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CK(cuMemSetAccess(vmm, vbytes, &access, 1));
    CK(cuMemsetD32(vmm, 7, bytes / 4));
    CK(cuCtxSynchronize());

    size_t out_bytes = rows * width;
    void *pageable = malloc(out_bytes), *pinned;
    memset(pageable, 0, out_bytes);
    CK(cuMemAllocHost(&pinned, out_bytes));
    printf("pitched DtoH: %zu rows of %zu bytes, %zu bytes apart (%zu MiB span)\n", rows, width, pitch, mib);
    printf("| memory | host | call | ms (best of 3) |\n|---|---|---|---|\n");
    for (int m = 0; m < 2; m++) {
        CUdeviceptr src = m ? vmm : plain;
        for (int host = 0; host < 2; host++) {
            void *dst = host ? pinned : pageable;
            for (int how = 0; how <= COPY_2D_ASYNC_STREAM; how++) {
                double best = 1e30;
                for (int k = 0; k < 3; k++) {
                    double t = run((enum how)how, src, width, pitch, rows, dst, s);
                    if (t < best) best = t;
                }
                unsigned first;
                memcpy(&first, dst, sizeof first);
                printf("| %s | %s | %s | %.2f%s |\n", m ? "VMM" : "cuMemAlloc", host ? "pinned" : "pageable",
                       how_name[how], best, first == 7 ? "" : " (WRONG BYTES)");
                fflush(stdout);
                memset(dst, 0, out_bytes);
            }
        }
    }
    return 0;
}
