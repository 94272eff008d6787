"""How fast host memory for a swap-out can be had on this GPU host (issue 21).

Times, for SIZE bytes (GiB, default 4): the driver's pinned allocation
(cuMemHostAlloc); fresh anonymous memory registered with the driver
(cuMemHostRegister faults it in); the same after MAP_POPULATE; registering
memory that is already faulted in; and a device-to-host copy into pinned
memory (the swap-out's DMA when its memory is ready).
Usage: python3 bench/probes/host_memory.py [GIB]
"""
import ctypes
import mmap
import sys
import time

GIB = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
SIZE = int(GIB * (1 << 30))
cu = ctypes.CDLL("libcuda.so.1")
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_POPULATE = 0x8000


def ck(r, what):
    if r != 0:
        raise SystemExit(f"{what} -> {r}")


def timed(what, f):
    t = time.perf_counter()
    out = f()
    dt = time.perf_counter() - t
    print(f"{what}: {dt * 1e3:.0f} ms ({GIB / dt:.2f} GiB/s)", flush=True)
    return out


def anonymous(flags=0):
    p = libc.mmap(None, SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags, -1, 0)
    if p in (None, ctypes.c_void_p(-1).value):
        raise SystemExit("mmap failed")
    return p


ck(cu.cuInit(0), "cuInit")
dev = ctypes.c_int()
ck(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p()
ck(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
ck(cu.cuCtxSetCurrent(ctx), "set current")
dptr = ctypes.c_uint64()
ck(cu.cuMemAlloc_v2(ctypes.byref(dptr), ctypes.c_size_t(SIZE)), "cuMemAlloc")
ck(cu.cuMemsetD8_v2(dptr, ctypes.c_ubyte(7), ctypes.c_size_t(SIZE)), "memset")
ck(cu.cuCtxSynchronize(), "sync")
print(f"{GIB:g} GiB")

for run in range(2):
    host = ctypes.c_void_p()
    timed(f"[{run}] cuMemHostAlloc", lambda: ck(cu.cuMemHostAlloc(ctypes.byref(host), ctypes.c_size_t(SIZE), 0), "alloc"))
    timed(f"[{run}] DtoH into it", lambda: ck(cu.cuMemcpyDtoH_v2(host, dptr, ctypes.c_size_t(SIZE)), "dtoh"))
    timed(f"[{run}] DtoH into it again", lambda: ck(cu.cuMemcpyDtoH_v2(host, dptr, ctypes.c_size_t(SIZE)), "dtoh"))
    timed(f"[{run}] HtoD from it", lambda: ck(cu.cuMemcpyHtoD_v2(dptr, host, ctypes.c_size_t(SIZE)), "htod"))
    timed(f"[{run}] cuMemFreeHost", lambda: ck(cu.cuMemFreeHost(host), "free"))

    p = anonymous()
    timed(f"[{run}] fresh memory: cuMemHostRegister", lambda: ck(cu.cuMemHostRegister_v2(ctypes.c_void_p(p), ctypes.c_size_t(SIZE), 0), "register"))
    timed(f"[{run}] DtoH into it", lambda: ck(cu.cuMemcpyDtoH_v2(ctypes.c_void_p(p), dptr, ctypes.c_size_t(SIZE)), "dtoh"))
    timed(f"[{run}] cuMemHostUnregister", lambda: ck(cu.cuMemHostUnregister(ctypes.c_void_p(p)), "unregister"))
    timed(f"[{run}] register again (faulted in)", lambda: ck(cu.cuMemHostRegister_v2(ctypes.c_void_p(p), ctypes.c_size_t(SIZE), 0), "register"))
    ck(cu.cuMemHostUnregister(ctypes.c_void_p(p)), "unregister")
    timed(f"[{run}] pageable DtoH (faulted in)", lambda: ck(cu.cuMemcpyDtoH_v2(ctypes.c_void_p(p), dptr, ctypes.c_size_t(SIZE)), "dtoh"))
    libc.munmap(ctypes.c_void_p(p), SIZE)

    p = timed(f"[{run}] mmap MAP_POPULATE", lambda: anonymous(MAP_POPULATE))
    timed(f"[{run}] then cuMemHostRegister", lambda: ck(cu.cuMemHostRegister_v2(ctypes.c_void_p(p), ctypes.c_size_t(SIZE), 0), "register"))
    ck(cu.cuMemHostUnregister(ctypes.c_void_p(p)), "unregister")
    libc.munmap(ctypes.c_void_p(p), SIZE)
    p = anonymous()
    timed(f"[{run}] fresh memory: pageable DtoH", lambda: ck(cu.cuMemcpyDtoH_v2(ctypes.c_void_p(p), dptr, ctypes.c_size_t(SIZE)), "dtoh"))
    libc.munmap(ctypes.c_void_p(p), SIZE)
