/* libnvidia-ml.so.1 for the second gpupool-server of bench/migrate-torch.sh.
 *
 * Two servers on the one GPU of the lent machine must register different
 * instances with the balancer, which refuses an instance UUID that another
 * server registered already; both would read the same UUID from NVML. This
 * library stands in for NVML in the second server only: it is the real
 * library (its dependency libnvidia-ml-real.so.1, a link to it, beside this
 * file: dlsym on this library's handle finds every other function there)
 * except that nvmlDeviceGetUUID cuts a whole GPU's UUID before its last
 * group ("GPU-8932f937-d72c-4106-c12f"). CUDA_VISIBLE_DEVICES takes such a
 * prefix for the whole UUID, so the server's workers, bound to the instance
 * by CUDA_VISIBLE_DEVICES=<its uuid>, still get that GPU.
 *
 * Built by bench/migrate-torch.sh:
 *   cc -shared -fPIC -o DIR/libnvidia-ml.so.1 nvml_short_uuid.c \
 *      -Wl,--no-as-needed -LDIR -l:libnvidia-ml-real.so.1 -Wl,-rpath,'$ORIGIN' -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNKNOWN 999

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    static nvmlReturn_t (*real)(nvmlDevice_t, char *, unsigned int);
    if (!real)
        real = (nvmlReturn_t (*)(nvmlDevice_t, char *, unsigned int))dlsym(RTLD_NEXT, "nvmlDeviceGetUUID");
    if (!real)
        return NVML_ERROR_UNKNOWN;
    nvmlReturn_t r = real(device, uuid, length);
    /* Whole GPUs only: a MIG device's UUID stays as it is. */
    if (r == NVML_SUCCESS && strncmp(uuid, "GPU-", 4) == 0) {
        char *last = strrchr(uuid, '-');
        if (last > uuid + 3)
            *last = '\0';
    }
    return r;
}
