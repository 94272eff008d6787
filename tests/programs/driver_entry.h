// driver_entry.h: driver API calls from runtime-API programs that link
// only the static runtime. DRV(cuName) fetches the entry point through
// cudaGetDriverEntryPointByVersion (CUDA 13.0 signatures); CKD checks a
// CUresult. Include after check.h.
#pragma once

#include <cuda.h>

#define CKD(call)                                                             \
    do {                                                                      \
        CUresult r_ = (call);                                                 \
        if (r_ != CUDA_SUCCESS)                                               \
            fail("line %d: %s -> CUresult %d", __LINE__, #call, (int)r_);     \
    } while (0)

template <class F> static F entry(const char *symbol)
{
    void *p = nullptr;
    cudaDriverEntryPointQueryResult q;
    CK(cudaGetDriverEntryPointByVersion(symbol, &p, 13000, cudaEnableDefault, &q));
    if (p == nullptr || q != cudaDriverEntryPointSuccess)
        fail("driver entry point %s not found", symbol);
    return reinterpret_cast<F>(p);
}
#define DRV(name) entry<decltype(&name)>(#name)
