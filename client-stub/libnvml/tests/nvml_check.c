/*
 * Calls gpupool's libnvidia-ml.so.1 as an NVML user would and prints one
 * `key=value` line per answer; tests/nvml.rs compares the output exactly.
 *
 *   nvml_check            the whole API against the fake libcuda
 *   nvml_check init-fail  nvmlInit when cuInit fails
 *   nvml_check host       the figures of the server's host (driver version, PCIe link)
 *
 * The declarations mirror nvml.h (not installed on CI machines); the
 * library's own signature test checks them against the bindings.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

#define nvmlMemory_v2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

nvmlReturn_t nvmlInit_v2(void);
nvmlReturn_t nvmlInitWithFlags(unsigned int flags);
nvmlReturn_t nvmlShutdown(void);
const char *nvmlErrorString(nvmlReturn_t result);
nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length);
nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length);
nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version);
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version);
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count);
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device);
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device);
nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device);
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length);
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length);
nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index);
nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor);
nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci);
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory);
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory);
nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor);
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending);
nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMig);
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization);
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos);
nvmlReturn_t nvmlDeviceGetMultiGpuBoard(nvmlDevice_t device, unsigned int *multiGpu);
nvmlReturn_t nvmlDeviceGetBrand(nvmlDevice_t device, unsigned int *brand);
nvmlReturn_t nvmlDeviceGetArchitecture(nvmlDevice_t device, unsigned int *arch);
nvmlReturn_t nvmlDeviceGetNumGpuCores(nvmlDevice_t device, unsigned int *cores);
nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t device, unsigned int *mode);
nvmlReturn_t nvmlDeviceGetComputeMode(nvmlDevice_t device, unsigned int *mode);
nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(nvmlDevice_t device, unsigned int *gen);
nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(nvmlDevice_t device, unsigned int *width);
nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(nvmlDevice_t device, unsigned int *gen);
nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(nvmlDevice_t device, unsigned int *width);
nvmlReturn_t nvmlDeviceGetPcieLinkMaxSpeed(nvmlDevice_t device, unsigned int *speed);
nvmlReturn_t nvmlDeviceGetPcieSpeed(nvmlDevice_t device, unsigned int *speed);
typedef struct {
    unsigned int version;
    unsigned char clusterUuid[16];
    nvmlReturn_t status;
    unsigned int cliqueId;
    unsigned char state;
    unsigned int healthMask;
    unsigned char healthSummary;
} nvmlGpuFabricInfo_v3_t;
#define nvmlGpuFabricInfo_v3 ((unsigned int)(sizeof(nvmlGpuFabricInfo_v3_t) | (3u << 24)))
nvmlReturn_t nvmlDeviceGetGpuFabricInfoV(nvmlDevice_t device, nvmlGpuFabricInfo_v3_t *info);
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    union {
        unsigned int uiVal;
        unsigned long long ullVal;
    } value;
} nvmlFieldValue_t;
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int count, nvmlFieldValue_t *values);
/* An unimplemented one, called with its real arguments. */
nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensor, unsigned int *temp);

/* Prints `key=code (text)`. */
static void code(const char *key, nvmlReturn_t r) { printf("%s=%d (%s)\n", key, r, nvmlErrorString(r)); }

/* Prints the code of a call that must succeed, and stops the program if it did not. */
#define MUST(key, call)                                                                                                \
    do {                                                                                                               \
        nvmlReturn_t r_ = (call);                                                                                      \
        if (r_ != 0) {                                                                                                 \
            code(key, r_);                                                                                             \
            return 1;                                                                                                  \
        }                                                                                                              \
    } while (0)

/* Asks `query` for a device's figure; prints `key=value`, or `key=code (text)` when it fails. */
static void figure(const char *key, nvmlReturn_t (*query)(nvmlDevice_t, unsigned int *), nvmlDevice_t dev) {
    unsigned int value = 0;
    nvmlReturn_t r = query(dev, &value);
    if (r == 0)
        printf("%s=%u\n", key, value);
    else
        code(key, r);
}

/* What NVML says of the server's host: its driver version and the GPU's PCIe link. */
static int host(void) {
    char buf[96];
    nvmlDevice_t dev = NULL;
    MUST("init", nvmlInit_v2());
    MUST("driver_version", nvmlSystemGetDriverVersion(buf, sizeof buf));
    printf("driver_version=%s\n", buf);
    MUST("nvml_version", nvmlSystemGetNVMLVersion(buf, sizeof buf));
    printf("nvml_version=%s\n", buf);
    MUST("handle", nvmlDeviceGetHandleByIndex_v2(0, &dev));
    figure("pcie_max_generation", nvmlDeviceGetMaxPcieLinkGeneration, dev);
    figure("pcie_max_width", nvmlDeviceGetMaxPcieLinkWidth, dev);
    figure("pcie_current_generation", nvmlDeviceGetCurrPcieLinkGeneration, dev);
    figure("pcie_current_width", nvmlDeviceGetCurrPcieLinkWidth, dev);
    figure("pcie_max_speed", nvmlDeviceGetPcieLinkMaxSpeed, dev);
    figure("pcie_speed", nvmlDeviceGetPcieSpeed, dev);
    code("pcie_null_out", nvmlDeviceGetMaxPcieLinkGeneration(dev, NULL));
    nvmlGpuFabricInfo_v3_t fabric;
    memset(&fabric, 0x55, sizeof fabric);
    fabric.version = nvmlGpuFabricInfo_v3;
    MUST("fabric", nvmlDeviceGetGpuFabricInfoV(dev, &fabric));
    printf("fabric_state=%u status=%d clique=%u\n", fabric.state, fabric.status, fabric.cliqueId);
    /* NVLink link count (91), the common NVLink speed (90), a temperature (82): none offered. */
    nvmlFieldValue_t fields[3];
    memset(fields, 0x55, sizeof fields);
    fields[0].fieldId = 91;
    fields[1].fieldId = 90;
    fields[2].fieldId = 82;
    MUST("fields", nvmlDeviceGetFieldValues(dev, 3, fields));
    for (int i = 0; i < 3; i++)
        printf("field_%u=%d type %u value %u\n", fields[i].fieldId, fields[i].nvmlReturn,
               fields[i].nvmlReturn == 0 ? fields[i].valueType : 0, fields[i].nvmlReturn == 0 ? fields[i].value.uiVal : 0);
    code("fields_null", nvmlDeviceGetFieldValues(dev, 1, NULL));
    fabric.version = 7u << 24;
    code("fabric_version_7", nvmlDeviceGetGpuFabricInfoV(dev, &fabric));
    MUST("shutdown", nvmlShutdown());
    return 0;
}

static int init_fail(void) {
    unsigned int count = 7;
    code("init", nvmlInit_v2());
    code("count", nvmlDeviceGetCount_v2(&count));
    code("shutdown", nvmlShutdown());
    return 0;
}

static int check(void) {
    char buf[96];
    unsigned int u = 0, v = 0;
    int major = -1, minor = -1, cuda = 0;
    nvmlDevice_t dev = NULL, other = NULL;

    code("init", nvmlInit_v2());
    /* A second init is counted: it needs its own shutdown. */
    code("init_again", nvmlInitWithFlags(0));

    MUST("driver_version", nvmlSystemGetDriverVersion(buf, sizeof buf));
    printf("driver_version=%s\n", buf);
    MUST("nvml_version", nvmlSystemGetNVMLVersion(buf, sizeof buf));
    printf("nvml_version=%s\n", buf);
    MUST("cuda_driver_version", nvmlSystemGetCudaDriverVersion(&cuda));
    printf("cuda_driver_version=%d\n", cuda);
    MUST("cuda_driver_version_v2", nvmlSystemGetCudaDriverVersion_v2(&cuda));
    printf("cuda_driver_version_v2=%d\n", cuda);

    MUST("count", nvmlDeviceGetCount_v2(&u));
    printf("count=%u\n", u);
    MUST("handle", nvmlDeviceGetHandleByIndex_v2(0, &dev));
    code("handle_1", nvmlDeviceGetHandleByIndex_v2(1, &other));

    MUST("name", nvmlDeviceGetName(dev, buf, sizeof buf));
    printf("name=%s\n", buf);
    MUST("uuid", nvmlDeviceGetUUID(dev, buf, sizeof buf));
    printf("uuid=%s\n", buf);
    code("uuid_small_buffer", nvmlDeviceGetUUID(dev, buf, 8));
    MUST("index", nvmlDeviceGetIndex(dev, &u));
    printf("index=%u\n", u);
    MUST("minor", nvmlDeviceGetMinorNumber(dev, &u));
    printf("minor=%u\n", u);

    nvmlPciInfo_t pci;
    memset(&pci, 0x55, sizeof pci);
    MUST("pci", nvmlDeviceGetPciInfo_v3(dev, &pci));
    printf("pci.busId=%s\npci.busIdLegacy=%s\n", pci.busId, pci.busIdLegacy);
    printf("pci.domain=%u bus=%u device=%u pciDeviceId=0x%08x\n", pci.domain, pci.bus, pci.device, pci.pciDeviceId);

    nvmlMemory_t mem;
    MUST("memory", nvmlDeviceGetMemoryInfo(dev, &mem));
    printf("memory.total=%llu free=%llu used=%llu\n", mem.total, mem.free, mem.used);
    nvmlMemory_v2_t mem2;
    memset(&mem2, 0, sizeof mem2);
    code("memory_v2_unversioned", nvmlDeviceGetMemoryInfo_v2(dev, &mem2));
    mem2.version = nvmlMemory_v2;
    MUST("memory_v2", nvmlDeviceGetMemoryInfo_v2(dev, &mem2));
    printf("memory_v2.total=%llu reserved=%llu free=%llu used=%llu\n", mem2.total, mem2.reserved, mem2.free,
           mem2.used);

    MUST("cc", nvmlDeviceGetCudaComputeCapability(dev, &major, &minor));
    printf("cc=%d.%d\n", major, minor);
    MUST("mig", nvmlDeviceGetMigMode(dev, &u, &v));
    printf("mig=%u/%u\n", u, v);
    MUST("is_mig", nvmlDeviceIsMigDeviceHandle(dev, &u));
    printf("is_mig=%u\n", u);
    nvmlUtilization_t util;
    code("utilization", nvmlDeviceGetUtilizationRates(dev, &util));
    nvmlProcessInfo_t procs[4];
    u = 4;
    MUST("processes", nvmlDeviceGetComputeRunningProcesses_v3(dev, &u, procs));
    printf("processes=%u\n", u);
    u = 0;
    MUST("processes_probe", nvmlDeviceGetComputeRunningProcesses_v3(dev, &u, NULL));
    printf("processes_probe=%u\n", u);
    MUST("multi_gpu_board", nvmlDeviceGetMultiGpuBoard(dev, &u));
    printf("multi_gpu_board=%u\n", u);
    MUST("brand", nvmlDeviceGetBrand(dev, &u));
    printf("brand=%u\n", u);
    MUST("arch", nvmlDeviceGetArchitecture(dev, &u));
    printf("arch=%u\n", u);
    MUST("cores", nvmlDeviceGetNumGpuCores(dev, &u));
    printf("cores=%u\n", u);
    MUST("persistence", nvmlDeviceGetPersistenceMode(dev, &u));
    printf("persistence=%u\n", u);
    MUST("compute_mode", nvmlDeviceGetComputeMode(dev, &u));
    printf("compute_mode=%u\n", u);

    MUST("by_uuid", nvmlDeviceGetHandleByUUID("GPU-00010203-0405-0607-0809-0a0b0c0d0e0f", &other));
    printf("by_uuid_same=%d\n", other == dev);
    code("by_uuid_unknown", nvmlDeviceGetHandleByUUID("GPU-ffffffff-0405-0607-0809-0a0b0c0d0e0f", &other));
    MUST("by_pci", nvmlDeviceGetHandleByPciBusId_v2("00000000:1B:00.0", &other));
    printf("by_pci_same=%d\n", other == dev);
    MUST("by_pci_legacy", nvmlDeviceGetHandleByPciBusId_v2("0000:1b:00.0", &other));
    printf("by_pci_legacy_same=%d\n", other == dev);
    code("by_pci_unknown", nvmlDeviceGetHandleByPciBusId_v2("00000000:1C:00.0", &other));

    /* A handle NVML never gave out, and null pointers. */
    nvmlDevice_t forged = (nvmlDevice_t)(void *)&pci;
    code("forged_handle", nvmlDeviceGetName(forged, buf, sizeof buf));
    code("null_handle", nvmlDeviceGetIndex(NULL, &u));
    code("null_out", nvmlDeviceGetIndex(dev, NULL));
    code("temperature", nvmlDeviceGetTemperature(dev, 0, &u));
    printf("error_string_999=%s\n", nvmlErrorString(999));
    printf("error_string_12345=%s\n", nvmlErrorString(12345));

    /* Every primary-context reference and push NVML made was given back. */
    long (*outstanding)(void) = NULL;
    void *cuda_lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (cuda_lib)
        *(void **)&outstanding = dlsym(cuda_lib, "fake_cuda_outstanding");
    printf("fake_cuda_outstanding=%ld\n", outstanding ? outstanding() : -1L);

    code("shutdown", nvmlShutdown());
    code("still_open", nvmlDeviceGetIndex(dev, &u));
    code("shutdown_last", nvmlShutdown());
    code("after_shutdown", nvmlDeviceGetIndex(dev, &u));
    code("shutdown_extra", nvmlShutdown());
    /* The handle stays valid across a new init. */
    code("reinit", nvmlInit_v2());
    MUST("index_after_reinit", nvmlDeviceGetIndex(dev, &u));
    printf("index_after_reinit=%u\n", u);
    code("shutdown_reinit", nvmlShutdown());
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "host") == 0)
        return host();
    if (argc > 1 && strcmp(argv[1], "init-fail") == 0)
        return init_fail();
    return check();
}
