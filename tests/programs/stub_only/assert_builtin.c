/*
 * assert_builtin: a failed device assert through the drop-in libcuda, with
 * gpupool's built-in `check_below` so that the emulated device runs it.
 * Natively (tests/programs/device_assert.cu) the driver prints each failing
 * thread's message on the process's stderr and the synchronize after the
 * launch fails with CUDA_ERROR_ASSERT; later calls fail too. Through
 * gpupool the worker captures the message and the stub writes it to this
 * program's stderr when the synchronize returns (tests/tests/libcuda.rs
 * reads it there).
 *
 * Stub-only, like library_lazy: the built-in image exists only on gpupool
 * servers.
 */
#include <cuda.h>
#include <stdio.h>

#define NAME "assert_builtin"

#include "../check_driver.h"

static const char BUILTIN[] = "gpupool-builtin-kernels/v1\n";

int main(void)
{
    CUmodule mod;
    CUfunction check;
    primary_context();
    CK(cuModuleLoadData(&mod, BUILTIN));
    CK(cuModuleGetFunction(&check, mod, "check_below"));
    unsigned limit = 8;
    void *args[] = {&limit};
    CK(cuLaunchKernel(check, 2, 1, 1, 4, 1, 1, 0, NULL, args, NULL));
    CK(cuCtxSynchronize());
    printf("no thread asserts: synchronize ok\n");
    fflush(stdout);
    limit = 6;
    CK(cuLaunchKernel(check, 2, 1, 1, 4, 1, 1, 0, NULL, args, NULL));
    CUresult r = cuCtxSynchronize();
    printf("threads 6 and 7 assert: synchronize -> %s\n", err_name(r));
    CUdeviceptr p;
    r = cuMemAlloc(&p, 64);
    printf("an allocation after the assert -> %s\n", err_name(r));
    printf("PASS " NAME "\n");
    return 0;
}
