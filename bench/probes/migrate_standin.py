"""A stand-in for bench/migrate_torch.py on a machine without a GPU or torch,
to try bench/migrate-torch.sh on the emulated device:

  MIGRATE_DEVICE=emulated MIGRATE_PROGRAM="python3 bench/probes/migrate_standin.py" \
      bash bench/migrate-torch.sh BIN_DIR OUT_DIR

Same protocol (usage: migrate_standin.py STEPS DIR): "STEP i X" lines,
DIR/half and DIR/go before step STEPS//2, "CHECKSUM X", "DONE". CUDA through
libcuda.so.1 (the drop-in one, on LD_LIBRARY_PATH) with ctypes: 64 MiB of
device memory filled from a seed; each step sets a slice on the device
(cuMemsetD32), reads a window back (into pinned memory, as PyTorch's
copies go) and writes a block derived from it, so
every step depends on all the memory the steps before left. The checksum is
the SHA-256 of the whole 64 MiB at the end.
"""

import ctypes
import hashlib
import os
import sys
import time

MIB = 1 << 20
SIZE = 64 * MIB
WINDOW = 64 * 1024


def check(result, what):
    if result != 0:
        sys.exit(f"migrate_standin: {what} failed: CUresult {result}")


def wait_for(path, limit_s=300):
    start = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - start > limit_s:
            sys.exit(f"migrate_standin: no {path} within {limit_s} s")
        time.sleep(0.01)


def pattern(seed, n):
    """n bytes from a seed: SHA-256 in counter mode."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def main():
    steps, work = int(sys.argv[1]), sys.argv[2]
    cuda = ctypes.CDLL("libcuda.so.1")
    check(cuda.cuInit(0), "cuInit")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    base = ctypes.c_uint64()
    check(cuda.cuMemAlloc_v2(ctypes.byref(base), ctypes.c_size_t(SIZE)), "cuMemAlloc")

    def put(offset, data):
        check(cuda.cuMemcpyHtoD_v2(ctypes.c_uint64(base.value + offset), data, ctypes.c_size_t(len(data))), "HtoD")

    # Pinned memory, as PyTorch has (its caching host allocator): the
    # windows are read through it.
    pinned = ctypes.c_void_p()
    check(cuda.cuMemAllocHost_v2(ctypes.byref(pinned), ctypes.c_size_t(WINDOW)), "cuMemAllocHost")

    def get(offset, n):
        if n <= WINDOW:
            check(cuda.cuMemcpyDtoH_v2(pinned, ctypes.c_uint64(base.value + offset), ctypes.c_size_t(n)), "DtoH")
            return ctypes.string_at(pinned, n)
        buf = ctypes.create_string_buffer(n)
        check(cuda.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(base.value + offset), ctypes.c_size_t(n)), "DtoH")
        return buf.raw

    for offset in range(0, SIZE, 4 * MIB):
        put(offset, pattern(offset, 4 * MIB))
    print("INFO 64 MiB on the device", flush=True)

    after_go = None
    for step in range(steps):
        if step == steps // 2:
            check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
            open(os.path.join(work, "half"), "w").close()
            wait_for(os.path.join(work, "go"))
            after_go = time.monotonic()
        # Where this step works, from what the previous steps left.
        where = int.from_bytes(get((step * 7919 * WINDOW) % SIZE, 8), "little")
        at = (where % (SIZE // WINDOW)) * WINDOW
        words = WINDOW // 4
        value = ctypes.c_uint(where & 0xFFFFFFFF)
        check(cuda.cuMemsetD32_v2(ctypes.c_uint64(base.value + at), value, ctypes.c_size_t(words // 2)), "memset")
        window = get(at, WINDOW)
        digest = hashlib.sha256(window).digest()
        put((at + WINDOW * 13) % SIZE, pattern(digest.hex(), WINDOW))
        print(f"STEP {step} {digest.hex()[:16]}", flush=True)
        if after_go is not None:
            print(f"AFTER_GO_MS {(time.monotonic() - after_go) * 1e3:.1f}", flush=True)
            after_go = None

    print(f"CHECKSUM {hashlib.sha256(get(0, SIZE)).hexdigest()}")
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
