// check.h: how the runtime-API test programs report failure. A program
// defines NAME, includes this, and wraps every CUDA call in CK (and every
// launch in CK_LAUNCH); the first failure prints `FAIL <name>: <why>` and
// exits 1, so the native and remote runs of a program can be compared.
#pragma once

#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>

#ifndef NAME
#error "define NAME before including check.h"
#endif

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL " NAME ": ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    exit(1);
}

#define CK(call)                                                              \
    do {                                                                      \
        cudaError_t e_ = (call);                                              \
        if (e_ != cudaSuccess)                                                \
            fail("line %d: %s -> %s (%d): %s", __LINE__, #call,               \
                 cudaGetErrorName(e_), (int)e_, cudaGetErrorString(e_));      \
    } while (0)

// A library call (cuBLAS, cuSPARSE, ...) whose status type is `type` and
// whose success is `ok`: any other status fails with its name (`name(s)`).
#define CK_STATUS(call, type, ok, name)                                       \
    do {                                                                      \
        type s_ = (call);                                                     \
        if (s_ != (ok))                                                       \
            fail("line %d: %s -> %s (%d)", __LINE__, #call, name(s_),         \
                 (int)s_);                                                    \
    } while (0)

// Launch configuration errors surface through cudaGetLastError right after
// the launch; execution errors at the next synchronizing call.
#define CK_LAUNCH(kernel)                                                     \
    do {                                                                      \
        cudaError_t e_ = cudaGetLastError();                                  \
        if (e_ != cudaSuccess)                                                \
            fail("line %d: launch of %s -> %s (%d): %s", __LINE__, kernel,    \
                 cudaGetErrorName(e_), (int)e_, cudaGetErrorString(e_));      \
    } while (0)
