"""One client of bench/share-gpu.sh: a small, unmodified PyTorch inference
workload (an MLP at batch 8, fp16) too small to fill an H200, run for a
fixed number of steps; prints one JSON line with its step loop's wall-clock
start and end, steps and p99 step time. Process start, CUDA context, lease
wait and warm-up are outside the loop, so every scenario is compared on the
same thing: the steps the GPU served.

    python3 share_workload.py [--steps N] [--barrier DIR --clients N]
    python3 share_workload.py --report TITLE_a:FILES... -- (see --report)
    python3 share_workload.py --fault   (a kernel that stores to address 0)

With --barrier, the client waits after its warm-up until N clients are
ready (files in DIR), so that concurrent loops start together.
"""

import argparse
import json
import os
import sys
import time


def workload(args):
    import torch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    layers = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.hidden, args.hidden), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers).to(dev).half().eval()
    x = torch.randn(args.batch, args.hidden, device=dev, dtype=torch.half)

    def step():
        with torch.inference_mode():
            for _ in range(args.forwards):
                y = model(x)
        torch.cuda.synchronize()
        return y

    for _ in range(10):
        step()
    if args.barrier:
        os.makedirs(args.barrier, exist_ok=True)
        open(os.path.join(args.barrier, str(os.getpid())), "w").close()
        deadline = time.time() + 60
        while len(os.listdir(args.barrier)) < args.clients and time.time() < deadline:
            time.sleep(0.002)
    times = []
    t0 = time.time()
    # --seconds: as many steps as fit in that time (a fixed window, so that
    # clients sharing a GPU are compared over the same period).
    end = time.perf_counter() + args.seconds if args.seconds else None
    while len(times) < args.steps if end is None else time.perf_counter() < end:
        s = time.perf_counter()
        y = step()
        times.append(time.perf_counter() - s)
    t1 = time.time()
    assert torch.isfinite(y.float()).all().item(), "non-finite output"
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3
    print(json.dumps({"steps": len(times), "t0": t0, "t1": t1, "p50_ms": round(times[len(times) // 2] * 1e3, 3),
                      "p99_ms": round(p99, 3), "steps_per_s": round(len(times) / (t1 - t0), 1)}), flush=True)


def fault():
    """Stores to address 0 in a kernel, through the driver API (the
    drop-in libcuda when it is first on LD_LIBRARY_PATH)."""
    import ctypes

    cu = ctypes.CDLL("libcuda.so.1")
    ptx = b"""
.version 7.0
.target sm_70
.address_size 64
.visible .entry crash() {
  .reg .b64 %rd<2>;
  .reg .b32 %r<2>;
  mov.u64 %rd1, 0;
  mov.u32 %r1, 7;
  st.global.u32 [%rd1], %r1;
  ret;
}
"""
    def check(what, rc):
        if rc != 0:
            print(json.dumps({"fault_call": what, "cuda_error": rc}), flush=True)
            sys.exit(0 if what in ("cuCtxSynchronize", "cuLaunchKernel") else 1)

    dev, ctx, mod, fn = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    check("cuInit", cu.cuInit(0))
    check("cuDeviceGet", cu.cuDeviceGet(ctypes.byref(dev), 0))
    check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    check("cuCtxSetCurrent", cu.cuCtxSetCurrent(ctx))
    check("cuModuleLoadData", cu.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(ptx)))
    check("cuModuleGetFunction", cu.cuModuleGetFunction(ctypes.byref(fn), mod, b"crash"))
    check("cuLaunchKernel", cu.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, None, None, None))
    check("cuCtxSynchronize", cu.cuCtxSynchronize())
    print(json.dumps({"fault_call": "none", "cuda_error": 0}), flush=True)
    sys.exit(1)


def union(intervals):
    """Total time covered by the intervals."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def report(scenarios):
    """scenarios: [(title, [json files])] for one N; the first is the
    one-after-another baseline. Aggregate throughput: steps of all clients
    over the time at least one step loop ran."""
    rows, base = [], None
    for title, files in scenarios:
        runs = []
        for f in files:
            try:
                with open(f) as fh:
                    lines = [json.loads(l) for l in fh if l.startswith("{")]
                runs += [r for r in lines if "steps" in r]
            except (OSError, ValueError):
                pass
        if len(runs) < len(files):
            rows.append(f"| {title} | {len(runs)}/{len(files)} clients finished | - | - | - |")
            continue
        agg = sum(r["steps"] for r in runs) / union([(r["t0"], r["t1"]) for r in runs])
        if base is None:
            base = agg
        p99 = max(r["p99_ms"] for r in runs)
        rows.append(f"| {title} | {len(runs)} | {agg:.0f} | {agg / base:.2f}x | {p99:.2f} |")
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=int(os.environ.get("SHARE_STEPS", 400)))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--forwards", type=int, default=4)
    p.add_argument("--seconds", type=float, help="step for this long instead of --steps steps")
    p.add_argument("--barrier")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--fault", action="store_true")
    p.add_argument("--report", nargs="+", help="TITLE=FILE,FILE,... per scenario, baseline first")
    args = p.parse_args()
    if args.report:
        scenarios = [(s.split("=", 1)[0], [f for f in s.split("=", 1)[1].split(",") if f]) for s in args.report]
        print("\n".join(report(scenarios)))
    elif args.fault:
        fault()
    else:
        workload(args)


if __name__ == "__main__":
    main()
