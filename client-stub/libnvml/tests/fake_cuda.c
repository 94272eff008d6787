/*
 * A fake libcuda.so.1 for the NVML test: the driver API calls gpupool's
 * libnvidia-ml makes, with fixed answers (one "Fake GPU": 1 GiB, 256 MiB
 * free, UUID bytes 0..15, PCI 0000:1b:00, compute capability 9.0, 132 SMs,
 * CUDA 13.0). It checks what a real driver would: cuInit first, the
 * device ordinal, cuMemGetInfo only with a context pushed; and it counts
 * primary-context references and pushes so the test can see that NVML
 * gives back what it takes (fake_cuda_outstanding).
 *
 * FAKE_CUDA_INIT_ERROR=<code> makes cuInit fail with that CUresult, as
 * gpupool's libcuda does when the pool cannot be reached.
 *
 * gpupool_host_facts (gpupool-ffi's host_facts.rs) answers a kernel driver
 * 580.159.04 and a PCIe Gen 5 x16 link; FAKE_CUDA_NO_HOST_FACTS=1 makes it
 * fail, as for a server that could not read them.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201,
};

static int initialized;
static long retained;
static long pushed;
static char primary; /* its address is the primary context's handle */

#define REQUIRE_INIT()                                                                                                 \
    do {                                                                                                               \
        if (!initialized)                                                                                              \
            return NOT_INITIALIZED;                                                                                    \
    } while (0)
#define REQUIRE_DEVICE(d)                                                                                              \
    do {                                                                                                               \
        REQUIRE_INIT();                                                                                                \
        if ((d) != 0)                                                                                                  \
            return INVALID_DEVICE;                                                                                     \
    } while (0)
#define REQUIRE(p)                                                                                                     \
    do {                                                                                                               \
        if (!(p))                                                                                                      \
            return INVALID_VALUE;                                                                                      \
    } while (0)

CUresult cuInit(unsigned int flags) {
    const char *fail = getenv("FAKE_CUDA_INIT_ERROR");
    if (fail && *fail)
        return atoi(fail);
    REQUIRE(flags == 0);
    initialized = 1;
    return SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
    REQUIRE(version);
    *version = 13000;
    return SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
    REQUIRE_INIT();
    REQUIRE(count);
    *count = 1;
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    REQUIRE_INIT();
    REQUIRE(device);
    if (ordinal != 0)
        return INVALID_DEVICE;
    *device = 0;
    return SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    REQUIRE_DEVICE(dev);
    REQUIRE(name && len > 0);
    snprintf(name, (size_t)len, "%s", "Fake GPU");
    return SUCCESS;
}

CUresult cuDeviceGetUuid_v2(unsigned char *uuid, CUdevice dev) {
    REQUIRE_DEVICE(dev);
    REQUIRE(uuid);
    for (int i = 0; i < 16; i++)
        uuid[i] = (unsigned char)i;
    return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    REQUIRE_DEVICE(dev);
    REQUIRE(bytes);
    *bytes = (size_t)1 << 30;
    return SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attrib, CUdevice dev) {
    REQUIRE_DEVICE(dev);
    REQUIRE(value);
    switch (attrib) {
    case 16: /* MULTIPROCESSOR_COUNT */
        *value = 132;
        break;
    case 33: /* PCI_BUS_ID */
        *value = 0x1b;
        break;
    case 34: /* PCI_DEVICE_ID */
    case 50: /* PCI_DOMAIN_ID */
        *value = 0;
        break;
    case 75: /* COMPUTE_CAPABILITY_MAJOR */
        *value = 9;
        break;
    case 76: /* COMPUTE_CAPABILITY_MINOR */
        *value = 0;
        break;
    default:
        return INVALID_VALUE;
    }
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
    REQUIRE_DEVICE(dev);
    REQUIRE(ctx);
    retained++;
    *ctx = &primary;
    return SUCCESS;
}

CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    REQUIRE_INIT();
    if (ctx != &primary || retained <= 0)
        return INVALID_CONTEXT;
    pushed++;
    return SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    REQUIRE_INIT();
    if (pushed <= 0)
        return INVALID_CONTEXT;
    REQUIRE(free_bytes && total_bytes);
    *free_bytes = (size_t)256 << 20;
    *total_bytes = (size_t)1 << 30;
    return SUCCESS;
}

CUresult cuCtxPopCurrent_v2(CUcontext *ctx) {
    REQUIRE_INIT();
    if (pushed <= 0)
        return INVALID_CONTEXT;
    pushed--;
    if (ctx)
        *ctx = &primary;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    REQUIRE_DEVICE(dev);
    if (retained <= 0)
        return INVALID_CONTEXT;
    retained--;
    return SUCCESS;
}

/* gpupool_ffi::host_facts::HostFacts. */
typedef struct {
    char kernel_driver_version[80];
    unsigned int pcie_max_generation, pcie_max_width, pcie_current_generation, pcie_current_width, pcie_max_speed,
        pcie_current_speed;
} HostFacts;

CUresult gpupool_host_facts(CUdevice dev, HostFacts *out, size_t size) {
    const char *none = getenv("FAKE_CUDA_NO_HOST_FACTS");
    REQUIRE_DEVICE(dev);
    REQUIRE(out && size == sizeof *out);
    if (none && *none)
        return 801; /* NOT_SUPPORTED */
    snprintf(out->kernel_driver_version, sizeof out->kernel_driver_version, "%s", "580.159.04");
    out->pcie_max_generation = 5;
    out->pcie_max_width = 16;
    out->pcie_current_generation = 5;
    out->pcie_current_width = 16;
    out->pcie_max_speed = 32000;
    out->pcie_current_speed = 32000;
    return SUCCESS;
}

/* Test hook: primary-context references plus pushes not yet given back. */
long fake_cuda_outstanding(void) { return retained + pushed; }
