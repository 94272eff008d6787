"""What NVML says of the GPU's host: the driver version and the GPU's PCIe
link (issue 16: XLA reads both). Run natively and through gpupool's stub
(bench/probes/with-server.sh BIN python3 bench/probes/nvml_host.py): the
two outputs must be the same, but for the current link figures, which the
server reads when it opens the device and NVML reads at each call (a link
may train down when idle).

Usage: python3 bench/probes/nvml_host.py [LIBRARY]   (default libnvidia-ml.so.1)
"""

import ctypes
import sys

QUERIES = [
    "nvmlDeviceGetMaxPcieLinkGeneration",
    "nvmlDeviceGetMaxPcieLinkWidth",
    "nvmlDeviceGetCurrPcieLinkGeneration",
    "nvmlDeviceGetCurrPcieLinkWidth",
    "nvmlDeviceGetPcieLinkMaxSpeed",
    "nvmlDeviceGetPcieSpeed",
]


def main() -> int:
    nvml = ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else "libnvidia-ml.so.1")
    if nvml.nvmlInit_v2() != 0:
        print("nvmlInit_v2 failed")
        return 1
    buf = ctypes.create_string_buffer(96)
    print("nvmlSystemGetDriverVersion", nvml.nvmlSystemGetDriverVersion(buf, 96), buf.value.decode())
    print("nvmlSystemGetNVMLVersion", nvml.nvmlSystemGetNVMLVersion(buf, 96), buf.value.decode())
    dev = ctypes.c_void_p()
    if nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(dev)) != 0:
        print("no device 0")
        return 1
    for name in QUERIES:
        value = ctypes.c_uint(0)
        rc = getattr(nvml, name)(dev, ctypes.byref(value))
        print(name, rc, value.value if rc == 0 else "-")
    # nvmlGpuFabricInfo_v3_t: version, clusterUuid[16], status, cliqueId,
    # state (uchar), healthMask, healthSummary (uchar): 40 bytes.
    fabric = (ctypes.c_ubyte * 40)()
    ctypes.c_uint.from_buffer(fabric, 0).value = 40 | (3 << 24)
    rc = nvml.nvmlDeviceGetGpuFabricInfoV(dev, ctypes.byref(fabric))
    status = ctypes.c_int.from_buffer(fabric, 20).value
    clique = ctypes.c_uint.from_buffer(fabric, 24).value
    print("nvmlDeviceGetGpuFabricInfoV", rc, f"status {status} clique {clique} state {fabric[28]}" if rc == 0 else "-")
    # nvmlFieldValue_t: fieldId, scopeId, timestamp, latencyUsec, valueType,
    # nvmlReturn, value (8 bytes): 40 bytes. NVLink link count (91).
    field = (ctypes.c_ubyte * 40)()
    ctypes.c_uint.from_buffer(field, 0).value = 91
    rc = nvml.nvmlDeviceGetFieldValues(dev, 1, ctypes.byref(field))
    status = ctypes.c_int.from_buffer(field, 28).value
    value = ctypes.c_uint.from_buffer(field, 32).value
    print("nvmlDeviceGetFieldValues(NVLINK_LINK_COUNT)", rc, f"status {status} value {value}" if rc == 0 else "-")
    nvml.nvmlShutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
