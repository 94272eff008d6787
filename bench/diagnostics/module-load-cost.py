#!/usr/bin/env python3
"""What loading cuBLAS's module images costs the native driver, step by step.

The gpu-server loads every image a client sends with cuModuleLoadData, then
enumerates its functions and, for each, forces it loaded (cuFuncLoad) and
reads its parameter layout and attributes for the reply. This times those
steps natively (ctypes on the machine's libcuda, no gpupool involved) over
the fatbins of libcublas/libcublasLt, parsed from their .nv_fatbin sections.

Usage: bench/diagnostics/module-load-cost.py [LIB ...] [--limit N]
Default libraries: libcublasLt.so.13 and libcublas.so.13 found under
/usr/local/cuda*/lib64 or a Python environment's nvidia/cu13/lib.
Run it on the GPU machine; it only loads and unloads modules.
"""

import ctypes
import glob
import struct
import sys
import time

FATBIN_MAGIC = 0xBA55ED50
ATTRIBUTES = range(0, 10)  # CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ... the common ones


def section(path, wanted):
    data = open(path, "rb").read()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strings = headers[shstrndx][4]
    for h in headers:
        name = data[strings + h[0]:data.index(b"\0", strings + h[0])].decode()
        if name == wanted:
            return data[h[4]:h[4] + h[5]]
    raise SystemExit(f"{path}: no {wanted} section")


def fatbins(blob):
    pos = 0
    while pos + 16 <= len(blob):
        magic, _version, header, size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:
            pos += 8
            continue
        yield blob[pos:pos + header + size]
        pos = (pos + header + size + 7) & ~7


def check(r, what):
    if r != 0:
        raise RuntimeError(f"{what} failed: CUresult {r}")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    limit = int(sys.argv[sys.argv.index("--limit") + 1]) if "--limit" in sys.argv else 900
    args = [a for a in args if not a.isdigit()]
    libs = args or sorted(
        {p for pat in ("/usr/local/cuda*/lib64/libcublas*.so.13", "/usr/local/lib/python3*/dist-packages/nvidia/cu13/lib/libcublas*.so.13",
                       "/usr/lib/python3*/site-packages/nvidia/cu13/lib/libcublas*.so.13", "/usr/local/lib/python3*/site-packages/nvidia/cu13/lib/libcublas*.so.13")
         for p in glob.glob(pat)}, key=lambda p: ("Lt" not in p, p))
    libs = [l for l in libs if "libcublas" in l and "nvblas" not in l]
    if not libs:
        raise SystemExit("no libcublas*.so.13 found; pass its path")
    images = []
    for lib in libs:
        images += list(fatbins(section(lib, ".nv_fatbin")))
    images = images[:limit]
    cu = ctypes.CDLL("libcuda.so.1")
    check(cu.cuInit(0), "cuInit")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    check(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    t = {"load": 0.0, "enumerate": 0.0, "cuFuncLoad": 0.0, "param info + attributes": 0.0}
    functions = failed = 0
    modules = []
    for image in images:
        buf = ctypes.create_string_buffer(image, len(image))
        mod = ctypes.c_void_p()
        s = time.perf_counter()
        r = cu.cuModuleLoadData(ctypes.byref(mod), buf)
        t["load"] += time.perf_counter() - s
        if r != 0:
            failed += 1
            continue
        modules.append(mod)
        s = time.perf_counter()
        count = ctypes.c_uint()
        check(cu.cuModuleGetFunctionCount(ctypes.byref(count), mod), "cuModuleGetFunctionCount")
        funcs = (ctypes.c_void_p * max(count.value, 1))()
        if count.value:
            check(cu.cuModuleEnumerateFunctions(funcs, count, mod), "cuModuleEnumerateFunctions")
        t["enumerate"] += time.perf_counter() - s
        for i in range(count.value):
            f = ctypes.c_void_p(funcs[i])
            s = time.perf_counter()
            cu.cuFuncLoad(f)
            t["cuFuncLoad"] += time.perf_counter() - s
            s = time.perf_counter()
            off, size = ctypes.c_size_t(), ctypes.c_size_t()
            index = 0
            while cu.cuFuncGetParamInfo(f, index, ctypes.byref(off), ctypes.byref(size)) == 0 and index < 4096:
                index += 1
            v = ctypes.c_int()
            for a in ATTRIBUTES:
                cu.cuFuncGetAttribute(ctypes.byref(v), a, f)
            t["param info + attributes"] += time.perf_counter() - s
            functions += 1
    for mod in modules:
        cu.cuModuleUnload(mod)
    total = sum(len(i) for i in images)
    print(f"libraries: {', '.join(libs)}")
    print(f"images: {len(images)} ({total / 1e6:.1f} MB), loaded {len(modules)}, refused {failed}; functions {functions}")
    for step, seconds in t.items():
        print(f"{step:>24}: {seconds * 1e3:9.1f} ms")
    print(f"{'all':>24}: {sum(t.values()) * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
