/* check_driver.h: how the driver-API test programs report failure. A
 * program defines NAME, includes <cuda.h> and this, and wraps every driver
 * call in CK; the first failure prints `FAIL <name>: <why>` and exits 1, so
 * the native and remote runs of a program can be compared (check.h is the
 * same for runtime-API programs). */
#pragma once

#include <cuda.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef NAME
#error "define NAME before including check_driver.h"
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

static const char *err_name(CUresult r)
{
    const char *n = NULL;
    if (cuGetErrorName(r, &n) != CUDA_SUCCESS || n == NULL)
        return "(unknown error)";
    return n;
}

#define CK(call)                                                              \
    do {                                                                      \
        CUresult r_ = (call);                                                 \
        if (r_ != CUDA_SUCCESS)                                               \
            fail("line %d: %s -> %s (%d)", __LINE__, #call, err_name(r_),     \
                 (int)r_);                                                    \
    } while (0)

/* cuInit, then device 0's primary context made current, as most programs
 * start; returns the context. */
static inline CUcontext primary_context(void)
{
    CUdevice dev;
    CUcontext ctx;
    CK(cuInit(0));
    CK(cuDeviceGet(&dev, 0));
    CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));
    return ctx;
}
