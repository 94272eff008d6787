// Loads an image (cubin or fatbin) by cuModuleLoadData or cuLibraryLoadData, launches KERNEL(int)
// on GRID blocks of 32 threads twice, synchronizing after each: does a child grid's printf show?
// ORDER (module loads only) first loads every function of the module with cuFuncLoad, as
// gpupool's server describes them: "sorted" by name, or "reverse"; "none" (default) leaves
// them to CUDA's loading mode.
// Usage: cdp_probe IMAGE module|library KERNEL GRID [none|sorted|reverse]
#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define CK(x) do { CUresult r_ = (x); if (r_) { const char *s_ = 0; cuGetErrorName(r_, &s_); printf("FAIL %s -> %d %s\n", #x, (int)r_, s_ ? s_ : "?"); exit(1); } } while (0)
static int by_name(const void *a, const void *b) {
    const char *x = 0, *y = 0; cuFuncGetName(&x, *(CUfunction *)a); cuFuncGetName(&y, *(CUfunction *)b);
    return strcmp(x, y);
}
static void load_all(CUmodule m, const char *order) {
    unsigned n = 0; CK(cuModuleGetFunctionCount(&n, m));
    CUfunction *fs = calloc(n, sizeof *fs); CK(cuModuleEnumerateFunctions(fs, n, m));
    qsort(fs, n, sizeof *fs, by_name);
    for (unsigned i = 0; i < n; ++i) CK(cuFuncLoad(fs[strcmp(order, "reverse") ? i : n - 1 - i]));
    free(fs);
}
int main(int argc, char **argv) {
    const char *path = argv[1], *mode = argv[2], *name = argv[3]; int grid = atoi(argv[4]);
    const char *order = argc > 5 ? argv[5] : "none";
    FILE *fp = fopen(path, "rb"); fseek(fp, 0, SEEK_END); long n = ftell(fp); rewind(fp);
    char *buf = malloc(n); if (fread(buf, 1, n, fp) != (size_t)n) return 2; fclose(fp);
    CK(cuInit(0)); CUdevice d; CK(cuDeviceGet(&d, 0)); CUcontext c; CK(cuDevicePrimaryCtxRetain(&c, d)); CK(cuCtxSetCurrent(c));
    CUfunction f;
    if (!strcmp(mode, "library")) { CUlibrary l; CUkernel k; CK(cuLibraryLoadData(&l, buf, 0, 0, 0, 0, 0, 0)); CK(cuLibraryGetKernel(&k, l, name)); CK(cuKernelGetFunction(&f, k)); }
    else { CUmodule m; CK(cuModuleLoadData(&m, buf)); if (strcmp(order, "none")) load_all(m, order); CK(cuModuleGetFunction(&f, m, name)); }
    for (int i = 0; i < 2; ++i) {
        int v = 40 + i; void *args[] = { &v };
        CK(cuLaunchKernel(f, grid, 1, 1, 32, 1, 1, 0, 0, args, 0));
        CK(cuCtxSynchronize()); printf("host after sync %d\n", i); fflush(stdout);
    }
    return 0;
}
