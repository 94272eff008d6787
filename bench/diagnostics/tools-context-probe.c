/* Diagnostic: what slots 4, 39 and 51 of the private export table
 * 21318C60-9714-3248-8CA6-41FF7324C8F2 answer in NVIDIA's driver. cuBLAS
 * calls them before a GEMM (seen with export-table-probe.c and the stub's
 * trace), each with the calling thread's tools block from TOOLS_TLS[2]
 * (42D85A81-…) first: slot 4 (block, &out), slot 51 (block, stream, &obj),
 * slot 39 (block, obj, &value). This program makes the same calls for
 * several streams and prints what the driver's public API says about them.
 *
 * Build (GPU machine): gcc -O1 -I/usr/local/cuda/include -o tools-context-probe \
 *                      tools-context-probe.c -L/usr/local/cuda/lib64/stubs -lcuda
 */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef CUresult (*slot_fn)(uintptr_t, uintptr_t, uintptr_t, uintptr_t);

#define CHECK(x) do { CUresult r_ = (x); if (r_) { printf("%s -> %d\n", #x, r_); exit(1); } } while (0)

static const uintptr_t *table(const unsigned char *bytes) {
    CUuuid id;
    for (int i = 0; i < 16; i++) id.bytes[i] = (char)bytes[i];
    const void *t;
    CHECK(cuGetExportTable(&t, &id));
    return (const uintptr_t *)t;
}

static int pointer_like(uintptr_t p) { return p > 0x10000 && !(p & 7); }

int main(void) {
    static const unsigned char tls_id[16] = {0x42, 0xD8, 0x5A, 0x81, 0x23, 0xF6, 0xCB, 0x47,
                                             0x82, 0x98, 0xF6, 0xE7, 0x8A, 0x3A, 0xEC, 0xDC};
    static const unsigned char ctx_id[16] = {0x21, 0x31, 0x8C, 0x60, 0x97, 0x14, 0x32, 0x48,
                                             0x8C, 0xA6, 0x41, 0xFF, 0x73, 0x24, 0xC8, 0xF2};
    setvbuf(stdout, NULL, _IONBF, 0);
    CHECK(cuInit(0));
    CUdevice dev;
    CHECK(cuDeviceGet(&dev, 0));
    CUcontext ctx;
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));
    const uintptr_t *tls = table(tls_id), *tc = table(ctx_id);
    uintptr_t block = 0;
    CHECK(((CUresult(*)(uintptr_t *))tls[2])(&block));
    printf("context %p, tools block %#lx (*%#lx)\n", (void *)ctx, (unsigned long)block,
           (unsigned long)*(uintptr_t *)block);
    uintptr_t out = 0xdeadbeef;
    printf("slot4(block) -> %d out %#lx\n", ((slot_fn)tc[4])(block, (uintptr_t)&out, 0, 0), (unsigned long)out);

    CUstream streams[4] = {NULL};
    CHECK(cuStreamCreate(&streams[1], CU_STREAM_NON_BLOCKING));
    CHECK(cuStreamCreate(&streams[2], 0));
    CHECK(cuStreamCreateWithPriority(&streams[3], 0, -1));
    for (int i = 0; i < 4; i++) {
        unsigned long long id = 0;
        cuStreamGetId(streams[i], &id);
        unsigned int flags = 0;
        cuStreamGetFlags(streams[i], &flags);
        int prio = 0;
        cuStreamGetPriority(streams[i], &prio);
        uintptr_t obj = 0xdeadbeef, value = 0xdeadbeef;
        CUresult r51 = ((slot_fn)tc[51])(block, (uintptr_t)streams[i], (uintptr_t)&obj, 0);
        printf("stream %d %p (id %llu flags %u priority %d): slot51 -> %d obj %#lx", i, (void *)streams[i], id, flags,
               prio, r51, (unsigned long)obj);
        if (r51 == 0 && pointer_like(obj)) {
            CUresult r39 = ((slot_fn)tc[39])(block, obj, (uintptr_t)&value, 0);
            printf(" (*%#lx) | slot39 -> %d value %#lx", (unsigned long)*(uintptr_t *)obj, r39, (unsigned long)value);
        }
        printf("\n");
    }
    return 0;
}
