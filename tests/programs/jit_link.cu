// jit_link: the driver's JIT linker (a GPU program). A kernel in one PTX
// calls an `extern` device function defined in a second PTX; cuLinkCreate,
// cuLinkAddData (both), cuLinkComplete make a cubin, which is loaded with
// cuModuleLoadData and launched. Also: a link with the definition missing
// is refused with an error log. The logs' text differs between drivers, so
// only their lengths are checked. Output is deterministic.
#define NAME "jit_link"
#include "check.h"

#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "driver_entry.h"

// out[i] = twice(i), with `twice` defined elsewhere.
static const char *kMainPtx = R"(
.version 7.5
.target sm_75
.address_size 64

.extern .func (.param .b32 func_retval0) twice
(
    .param .b32 twice_param_0
)
;

.visible .entry scale(
    .param .u64 scale_param_0,
    .param .u32 scale_param_1
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<5>;

    ld.param.u64 %rd1, [scale_param_0];
    ld.param.u32 %r2, [scale_param_1];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r1, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r1, %r2;
    @%p1 bra DONE;
    {
    .param .b32 param0;
    st.param.b32 [param0], %r1;
    .param .b32 retval0;
    call.uni (retval0), twice, (param0);
    ld.param.b32 %r6, [retval0];
    }
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r1, 4;
    add.s64 %rd4, %rd2, %rd3;
    st.global.u32 [%rd4], %r6;
DONE:
    ret;
}
)";

static const char *kLibPtx = R"(
.version 7.5
.target sm_75
.address_size 64

.visible .func (.param .b32 func_retval0) twice(
    .param .b32 twice_param_0
)
{
    .reg .b32 %r<3>;

    ld.param.u32 %r1, [twice_param_0];
    shl.b32 %r2, %r1, 1;
    st.param.b32 [func_retval0], %r2;
    ret;
}
)";

int main()
{
    CK(cudaFree(0));
    auto linkCreate = DRV(cuLinkCreate);
    auto linkAddData = DRV(cuLinkAddData);
    auto linkComplete = DRV(cuLinkComplete);
    auto linkDestroy = DRV(cuLinkDestroy);
    auto moduleLoadData = DRV(cuModuleLoadData);
    auto moduleGetFunction = DRV(cuModuleGetFunction);
    auto moduleUnload = DRV(cuModuleUnload);
    auto launchKernel = DRV(cuLaunchKernel);

    static char info[8192], error[8192];
    CUjit_option keys[] = {CU_JIT_INFO_LOG_BUFFER, CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
                           CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
                           CU_JIT_LOG_VERBOSE, CU_JIT_OPTIMIZATION_LEVEL, CU_JIT_WALL_TIME};
    void *values[] = {info, (void *)(uintptr_t)sizeof info, error, (void *)(uintptr_t)sizeof error,
                      (void *)(uintptr_t)1, (void *)(uintptr_t)4, nullptr};
    const unsigned nkeys = sizeof keys / sizeof keys[0];

    CUlinkState link;
    CKD(linkCreate(nkeys, keys, values, &link));
    CKD(linkAddData(link, CU_JIT_INPUT_PTX, (void *)kMainPtx, strlen(kMainPtx) + 1, "main.ptx", 0, nullptr,
                    nullptr));
    CKD(linkAddData(link, CU_JIT_INPUT_PTX, (void *)kLibPtx, strlen(kLibPtx) + 1, "lib.ptx", 0, nullptr,
                    nullptr));
    void *cubin = nullptr;
    size_t cubin_size = 0;
    CKD(linkComplete(link, &cubin, &cubin_size));
    if (cubin == nullptr || cubin_size < 64 || memcmp(cubin, "\x7f" "ELF", 4) != 0)
        fail("cuLinkComplete gave no cubin (%zu bytes)", cubin_size);
    size_t info_len = (size_t)(uintptr_t)values[1];
    // Whether the filled size counts the NUL is the driver's business: only
    // "something was logged, within the buffer" is checked.
    if (info_len == 0 || info_len > sizeof info || strlen(info) == 0)
        fail("info log length %zu (strlen %zu)", info_len, strlen(info));
    printf("linked a cubin; info log length > 0: yes\n");
    // The driver overwrites the wall time's slot with the float's bits.
    float wall;
    uint32_t bits = (uint32_t)(uintptr_t)values[6];
    memcpy(&wall, &bits, sizeof wall);
    printf("INFO wall time %.3f ms\n", wall);

    CUmodule module;
    CKD(moduleLoadData(&module, cubin));
    CKD(linkDestroy(link)); // the module keeps its own copy
    CUfunction scale;
    CKD(moduleGetFunction(&scale, module, "scale"));
    const unsigned n = 1000;
    unsigned *out;
    CK(cudaMalloc(&out, n * sizeof(unsigned)));
    CK(cudaMemset(out, 0, n * sizeof(unsigned)));
    CUdeviceptr out_ptr = (CUdeviceptr)(uintptr_t)out;
    unsigned count = n;
    void *args[] = {&out_ptr, &count};
    CKD(launchKernel(scale, (n + 127) / 128, 1, 1, 128, 1, 1, 0, nullptr, args, nullptr));
    std::vector<unsigned> host(n);
    CK(cudaMemcpy(host.data(), out, n * sizeof(unsigned), cudaMemcpyDeviceToHost));
    for (unsigned i = 0; i < n; i++)
        if (host[i] != 2 * i)
            fail("out[%u] = %u, expected %u", i, host[i], 2 * i);
    printf("kernel calling the linked function: %u values ok\n", n);
    CKD(moduleUnload(module));
    CK(cudaFree(out));

    // The definition missing: the link is refused and says why.
    memset(error, 0, sizeof error);
    void *values2[] = {info, (void *)(uintptr_t)sizeof info, error, (void *)(uintptr_t)sizeof error,
                       (void *)(uintptr_t)1, (void *)(uintptr_t)4, nullptr};
    CKD(linkCreate(nkeys, keys, values2, &link));
    CUresult r = linkAddData(link, CU_JIT_INPUT_PTX, (void *)kMainPtx, strlen(kMainPtx) + 1, "main.ptx", 0,
                             nullptr, nullptr);
    if (r == CUDA_SUCCESS)
        r = linkComplete(link, &cubin, &cubin_size);
    if (r == CUDA_SUCCESS)
        fail("a link with an unresolved function succeeded");
    size_t error_len = (size_t)(uintptr_t)values2[3];
    if (error_len == 0 || strlen(error) == 0)
        fail("the refused link left an empty error log (length %zu)", error_len);
    printf("unresolved function refused; error log length > 0: yes\n");
    CKD(linkDestroy(link));
    printf("PASS " NAME "\n");
    return 0;
}
