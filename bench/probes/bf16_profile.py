"""Where the bf16 autocast inference step of bench/torch_bench.py spends its time (issue 17).

Runs the same transformer (6 layers, d 1024, 16 heads, ff 4096, batch 8x256) under
bf16 autocast: wall time per step, and the GPU's span per step (CUDA events at the
step's ends). With PROFILE=1 (natively only: the profiler reads the real driver)
also the kernels per step, their count and GPU time. Through gpupool, compare the
span with the wall time: a span much shorter than the step means the GPU waits
for launches.
Usage: [PROFILE=1] python3 bench/probes/bf16_profile.py
"""
import os
import time

import torch

layer = torch.nn.TransformerEncoderLayer(1024, 16, 4096, batch_first=True)
model = torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).cuda().eval()
x = torch.randn(8, 256, 1024, device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(x)


with torch.no_grad():
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    for dtype_label in ["bf16"]:
        spans, walls = [], []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            a.record()
            step()
            b.record()
            b.synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
            spans.append(a.elapsed_time(b))
        walls.sort()
        spans.sort()
        print(f"{dtype_label}: wall per step (synchronized) median {walls[10]:.3f} ms, GPU span median {spans[10]:.3f} ms")
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        print(f"{dtype_label}: pipelined step {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")
    if os.environ.get("PROFILE") == "1":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = kernels.setdefault(e.name, [0, 0.0])
                k[0] += 1
                k[1] += e.device_time
        total = sum(v[1] for v in kernels.values()) / 5
        count = sum(v[0] for v in kernels.values()) / 5
        print(f"kernels per step {count:.0f}, GPU time per step {total / 1e3:.3f} ms")
        for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]:
            print(f"  {n / 5:6.1f} x {us / n:8.1f} us  {name[:110]}")
        launches = {}
        for e in prof.events():
            if e.name.startswith("cuda") and "Launch" in e.name:
                launches[e.name] = launches.get(e.name, 0) + 1
        print("launch calls per step:", {k: v / 5 for k, v in launches.items()})
