"""A Python Lambda function on a pooled GPU: `C = A x B` in single precision.

Same contract as the Rust example (`lambda-layer/src/matmul.rs`): the event
is `{"m", "n", "k", "a", "b"}` (row-major), the answer `{"c", "checksum",
"device", "kernels", "cold", "recovered", "timing"}`.

The CUDA work goes through `cuda.bindings.driver` (NVIDIA's cuda-python
driver bindings), which load `libcuda.so.1` at run time: in the layer that
is gpupool's drop-in library, so the function runs on a GPU of the pool;
the layer's extension has leased it during INIT and left the lease in
`GPUPOOL_LEASE_FILE`. The context and the module are made once, in INIT,
and kept by the execution environment between invocations; a freeze of
the environment longer than the QUIC idle timeout is survived by the
library (the session is resumed, the handler notices nothing).

The kernel is the gpu-server's built-in `matmul_f32`, so the function ships
no device code. Nothing but the bindings is needed (no numpy), so the
function's package stays small.
"""
import ctypes
import time
from array import array

from cuda.bindings import driver as cu

# The gpu-server's built-in module, named instead of sent.
BUILTIN_MODULE = b"gpupool-builtin-kernels/v1\n"
MAX_SIDE = 1024


def check(result):
    """cuda-python returns (CUresult, values...): raise on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise RuntimeError(f"CUDA error {name.decode() if name else int(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class Gpu:
    """The environment's GPU: a context and the built-in module."""

    def __init__(self):
        t0 = time.perf_counter()
        check(cu.cuInit(0))
        self.device = check(cu.cuDeviceGet(0))
        self.name = check(cu.cuDeviceGetName(64, self.device)).split(b"\0")[0].decode()
        self.context = check(cu.cuDevicePrimaryCtxRetain(self.device))
        check(cu.cuCtxSetCurrent(self.context))
        self.stream = check(cu.cuStreamCreate(0))
        image = ctypes.create_string_buffer(BUILTIN_MODULE)
        self.module = check(cu.cuModuleLoadData(ctypes.addressof(image)))
        self.kernel = check(cu.cuModuleGetFunction(self.module, b"matmul_f32"))
        self.init_ms = (time.perf_counter() - t0) * 1e3

    def matmul(self, a, b, m, n, k):
        sizes = (m * k * 4, k * n * 4, m * n * 4)
        da, db, dc = (check(cu.cuMemAlloc(s)) for s in sizes)
        try:
            check(cu.cuMemcpyHtoDAsync(da, a.buffer_info()[0], sizes[0], self.stream))
            check(cu.cuMemcpyHtoDAsync(db, b.buffer_info()[0], sizes[1], self.stream))
            args = (
                (da, db, dc, m, n, k),
                (None, None, None, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint),
            )
            grid = ((n + 15) // 16, (m + 15) // 16, 1)
            check(cu.cuLaunchKernel(self.kernel, *grid, 16, 16, 1, 0, self.stream, args, 0))
            c = array("f", bytes(sizes[2]))
            check(cu.cuMemcpyDtoHAsync(c.buffer_info()[0], dc, sizes[2], self.stream))
            check(cu.cuStreamSynchronize(self.stream))
            return c
        finally:
            for d in (da, db, dc):
                check(cu.cuMemFree(d))


# INIT: once per execution environment.
GPU = Gpu()
_invocations = 0


def handler(event, context):
    global _invocations
    _invocations += 1
    t0 = time.perf_counter()
    m, n, k = (int(event[x]) for x in ("m", "n", "k"))
    if not all(0 < v <= MAX_SIDE for v in (m, n, k)):
        raise ValueError(f"sides must be in 1..={MAX_SIDE}: {m} x {k} x {n}")
    a, b = array("f", event["a"]), array("f", event["b"])
    if len(a) != m * k or len(b) != k * n:
        raise ValueError(f"a has {len(a)} elements (want {m * k}), b {len(b)} (want {k * n})")
    c = GPU.matmul(a, b, m, n, k)
    return {
        "c": c.tolist(),
        "checksum": sum(c),
        "device": GPU.name,
        "kernels": "builtin",
        "cold": _invocations == 1,
        "recovered": False,
        "timing": {"total_ms": (time.perf_counter() - t0) * 1e3, "init_ms": GPU.init_ms},
    }
