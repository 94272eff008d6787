"""Which form of a device assert NVRTC accepts in the built-in module's
source (proto/src/builtin.cu), and what the driver does with it: each
candidate kernel is compiled with NVRTC beside the module's source as the
server compiles it (cubin for the device's architecture), loaded with the
native driver, launched on one block of 8 threads with limit 3 and
synchronized. Prints one line per candidate (compile result and log, the
synchronize's result); the driver's assert messages go to stderr.

    python3 builtin_assert.py BASE_SOURCE [WHOLE_SOURCE]

BASE_SOURCE: the module's source without `check_below` (each candidate is
appended to it); WHOLE_SOURCE: a source that defines it already (such as
proto/src/builtin.cu now), tried as it is.
"""
import ctypes
import ctypes.util
import glob
import os
import sys

CANDIDATES = {
    "assertfail_declared": """
typedef __SIZE_TYPE__ size_t;
extern "C" __host__ __device__ void __assertfail(const char *, const char *, unsigned int, const char *, size_t);
extern "C" __global__ void check_below(unsigned limit) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (!(i < limit)) __assertfail("i < limit", "gpupool_builtin.cu", 1, "check_below", 1);
}
""",
    "assert_no_include": """
extern "C" __global__ void check_below(unsigned limit) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    assert(i < limit);
}
""",
    "assert_h": """
#include <assert.h>
extern "C" __global__ void check_below(unsigned limit) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    assert(i < limit);
}
""",
}


def nvrtc():
    home = os.environ.get("GPUPOOL_CUDA_HOME", "/usr/local/cuda")
    for path in glob.glob(f"{home}/targets/x86_64-linux/lib/libnvrtc.so*") + glob.glob(f"{home}/lib64/libnvrtc.so*"):
        try:
            return ctypes.CDLL(path)
        except OSError:
            pass
    return ctypes.CDLL(ctypes.util.find_library("nvrtc") or "libnvrtc.so")


def compile_cubin(lib, source, arch):
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"gpupool_builtin.cu", 0, None, None)
    opts = (ctypes.c_char_p * 1)(f"--gpu-architecture=sm_{arch}".encode())
    rc = lib.nvrtcCompileProgram(prog, 1, opts)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value + 1)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = None
    if rc == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetCUBIN(prog, buf)
        cubin = buf.raw
    return rc, log.value.decode(errors="replace").strip(), cubin


def main():
    base = open(sys.argv[1]).read()
    cu = ctypes.CDLL("libcuda.so.1")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    cu.cuInit(0)
    cu.cuDeviceGet(ctypes.byref(dev), 0)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    arch = major.value * 10 + minor.value
    lib = nvrtc()
    sources = {name: base + kernel for name, kernel in CANDIDATES.items()}
    if len(sys.argv) > 2:
        sources["whole_source"] = open(sys.argv[2]).read()
    for name, source in sources.items():
        rc, log, cubin = compile_cubin(lib, source, arch)
        line = f"{name}: nvrtc {rc}"
        if log:
            line += " log: " + log.replace("\n", " | ")[:400]
        if cubin:
            # A fresh context per candidate: an assert ends the context.
            cu.cuDevicePrimaryCtxReset(dev)
            cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
            cu.cuCtxSetCurrent(ctx)
            mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
            load = cu.cuModuleLoadData(ctypes.byref(mod), cubin)
            get = cu.cuModuleGetFunction(ctypes.byref(fn), mod, b"check_below") if load == 0 else -1
            limit = ctypes.c_uint(3)
            args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(limit), ctypes.c_void_p))
            launch = cu.cuLaunchKernel(fn, 1, 1, 1, 8, 1, 1, 0, None, args, None) if get == 0 else -1
            sys.stderr.flush()
            sync = cu.cuCtxSynchronize() if launch == 0 else -1
            line += f"; load {load} get {get} launch {launch} synchronize {sync}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
