/*
 * library_lazy: the library API as the CUDA runtime uses it (many
 * libraries loaded, few used), with gpupool's built-in kernels so that it
 * runs on the emulated device. Through gpupool a library is loaded on the
 * server at its first use; tests/tests/libcuda.rs reads the call table
 * (GPUPOOL_CALL_STATS) to check that no cuLibraryLoadData waited.
 *
 * - eight libraries loaded and never used, unloaded (three before the
 *   others are used);
 * - one loaded from a heap buffer that is overwritten before its first use
 *   (the image must have been copied at the load);
 * - two threads using that library for the first time at once: one kernel
 *   handle, which launches vector_add;
 * - one used through cuLibraryGetModule and cuModuleGetFunction (saxpy).
 *
 * Stub-only, like graphs_builtin: the built-in image exists only on
 * gpupool servers.
 */
#define _POSIX_C_SOURCE 200809L /* pthread barriers under -std=c11 */
#include <cuda.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME "library_lazy"

#include "../check_driver.h"

#define N 4096
#define UNUSED 8

static const char BUILTIN[] = "gpupool-builtin-kernels/v1\n";
/* Loads natively only where PTX 8.0 compiles; never used here. */
static const char EMPTY_PTX[] = ".version 8.0\n.target sm_90\n.address_size 64\n";

static CUlibrary shared_lib;
static pthread_barrier_t start;

static void *get_kernel(void *out)
{
    pthread_barrier_wait(&start);
    CK(cuLibraryGetKernel((CUkernel *)out, shared_lib, "vector_add"));
    return NULL;
}

static void load(CUlibrary *lib, const void *image)
{
    CK(cuLibraryLoadData(lib, image, NULL, NULL, 0, NULL, NULL, 0));
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    primary_context();

    CUlibrary unused[UNUSED];
    for (int i = 0; i < UNUSED; i++)
        load(&unused[i], i % 2 ? (const void *)EMPTY_PTX : (const void *)BUILTIN);
    for (int i = 0; i < 3; i++)
        CK(cuLibraryUnload(unused[i]));
    CUlibrary bad;
    CUresult r = cuLibraryLoadData(&bad, NULL, NULL, NULL, 0, NULL, NULL, 0);
    if (r != CUDA_ERROR_INVALID_VALUE)
        fail("null image -> %s, expected CUDA_ERROR_INVALID_VALUE", err_name(r));
    r = cuLibraryLoadFromFile(&bad, "/nonexistent/library.fatbin", NULL, NULL, 0, NULL, NULL, 0);
    if (r != CUDA_ERROR_FILE_NOT_FOUND)
        fail("missing file -> %s, expected CUDA_ERROR_FILE_NOT_FOUND", err_name(r));
    if (cuLibraryUnload(unused[0]) != CUDA_ERROR_INVALID_HANDLE)
        fail("a library unloaded twice is not an invalid handle");
    printf("%d libraries loaded, 3 unloaded, bad loads refused\n", UNUSED);

    /* A heap image, overwritten before the first use. */
    char *heap = malloc(sizeof BUILTIN);
    if (!heap)
        fail("malloc");
    memcpy(heap, BUILTIN, sizeof BUILTIN);
    load(&shared_lib, heap);
    memset(heap, 'x', sizeof BUILTIN - 1);
    free(heap);

    CUkernel k[2];
    pthread_t t[2];
    pthread_barrier_init(&start, NULL, 2);
    for (int i = 0; i < 2; i++)
        if (pthread_create(&t[i], NULL, get_kernel, &k[i]) != 0)
            fail("pthread_create");
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    if (k[0] != k[1])
        fail("two first uses at once gave two kernel handles");
    unsigned count = 0;
    CK(cuLibraryGetKernelCount(&count, shared_lib));
    CUlibrary owner;
    CK(cuKernelGetLibrary(&owner, k[0]));
    /* The built-in module's kernels: empty, vector_add, saxpy, matmul_f32,
     * print_ids, tally_add, check_below. */
    if (count != 7 || owner != shared_lib)
        fail("kernel count %u, owner %p (expected 7, %p)", count, (void *)owner, (void *)shared_lib);
    CUfunction vadd;
    CK(cuKernelGetFunction(&vadd, k[0]));

    static float a[N], b[N], c[N];
    for (int i = 0; i < N; i++) {
        a[i] = (float)(i % 50);
        b[i] = (float)(i % 9);
    }
    const size_t bytes = sizeof a;
    CUdeviceptr da, db, dc;
    CK(cuMemAlloc(&da, bytes));
    CK(cuMemAlloc(&db, bytes));
    CK(cuMemAlloc(&dc, bytes));
    CK(cuMemcpyHtoD(da, a, bytes));
    CK(cuMemcpyHtoD(db, b, bytes));
    unsigned n = N;
    void *vargs[] = {&da, &db, &dc, &n};
    CK(cuLaunchKernel(vadd, N / 256, 1, 1, 256, 1, 1, 0, NULL, vargs, NULL));
    CK(cuMemcpyDtoH(c, dc, bytes));
    for (int i = 0; i < N; i++)
        if (c[i] != a[i] + b[i])
            fail("vector_add: element %d is %g", i, (double)c[i]);
    printf("kernel of a library used by two threads at once ok\n");

    /* Through the library's module: dc = 2 * da + dc. */
    CUlibrary mod_lib;
    CUmodule mod;
    CUfunction saxpy;
    load(&mod_lib, BUILTIN);
    CK(cuLibraryGetModule(&mod, mod_lib));
    CK(cuModuleGetFunction(&saxpy, mod, "saxpy"));
    float alpha = 2.0f;
    void *sargs[] = {&alpha, &da, &dc, &n};
    CK(cuLaunchKernel(saxpy, N / 256, 1, 1, 256, 1, 1, 0, NULL, sargs, NULL));
    CK(cuMemcpyDtoH(c, dc, bytes));
    for (int i = 0; i < N; i++)
        if (c[i] != 3.0f * a[i] + b[i])
            fail("saxpy: element %d is %g", i, (double)c[i]);
    printf("module of a library ok\n");

    CK(cuLibraryUnload(shared_lib));
    CK(cuLibraryUnload(mod_lib));
    for (int i = 3; i < UNUSED; i++)
        CK(cuLibraryUnload(unused[i]));
    CK(cuMemFree(da));
    CK(cuMemFree(db));
    CK(cuMemFree(dc));
    printf("PASS " NAME "\n");
    return 0;
}
