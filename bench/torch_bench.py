#!/usr/bin/env python3
"""PyTorch workloads as users run them, timed; run natively and through
gpupool's libcuda.so.1 in the same run by bench/torch-bench.sh, which
prints the ratios.

Each workload prints one line `RESULT {json}` with its figures. Through
gpupool with GPUPOOL_CALL_STATS=1 the steady-state workloads also report
the calls that waited for the server per step (`waits_per_step`), the
entry points that waited, the time the program's thread spent inside the
stub per step (`stub_us_per_step`, and `stub_us_in` by entry point), read from the stub's `gpupool_call_stats()`
over a second run of the same steps (the final synchronization, which
waits natively too, is outside the window). The timed figures are taken
with the table paused (`gpupool_call_stats_pause`): counting costs two
clock reads and a lock per call.

Usage: torch_bench.py [WORKLOAD...]   (default: all, each fresh-process
workload in its own child process)
       torch_bench.py --report NATIVE_OUT REMOTE_OUT   (a markdown table
       of both runs' figures with remote/native ratios)
"""
import ctypes
import json
import os
import subprocess
import sys
import time
import traceback

FRESH = ["first_op", "first_matmul", "first_matmul_again"]
STEADY = ["copies", "model_upload", "fp32_infer", "bf16_infer", "train_step", "item_loop", "weights_download"]


def emit(name, **fields):
    print("RESULT " + json.dumps({"workload": name, **fields}), flush=True)


class Waits:
    """The stub's call table, when the process runs through gpupool."""

    def __init__(self):
        self.fn = None
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.gpupool_call_stats
        except (OSError, AttributeError):
            return
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
        if fn(None, 0, 0) > 0:
            self.fn = fn
            # Counting costs two clock reads and a lock per call: the timed
            # steps run with it paused, and a second window is counted.
            self.pause_fn = getattr(lib, "gpupool_call_stats_pause", None)
            if self.pause_fn is not None:
                self.pause_fn.restype = ctypes.c_int
                self.pause_fn.argtypes = [ctypes.c_int]

    def pause(self, paused):
        """Stops or resumes counting; False when it cannot be paused."""
        if not self.fn or getattr(self, "pause_fn", None) is None:
            return False
        return self.pause_fn(1 if paused else 0) >= 0

    def reset(self):
        if self.fn:
            self.fn(None, 0, 1)

    def read(self):
        """(total waits, {entry point: waits}) since the last reset, or None."""
        if not self.fn:
            return None
        buf = ctypes.create_string_buffer(1 << 16)
        self.fn(buf, len(buf), 1)
        total, rows, times = 0, {}, {}
        for line in buf.value.decode().splitlines()[2:]:
            parts = line.split()
            if len(parts) >= 6 and parts[4].isdigit():
                if parts[0] == "total":
                    total = int(parts[4])
                    times["total"] = int(parts[5])
                else:
                    if int(parts[4]) > 0:
                        rows[parts[0]] = int(parts[4])
                    times[parts[0]] = int(parts[5])
        return total, rows, times


def guarded(name, fn):
    """Runs one workload; a failure prints `FAIL` and the others go on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - each workload reports its own failure
        print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        traceback.print_exc(file=sys.stderr)


def steady(name, waits, steps, step, sync):
    """Times `steps` calls of `step` after a warm-up; waits counted per step."""
    guarded(name, lambda: timed_steps(name, waits, steps, step, sync))


def timed_steps(name, waits, steps, step, sync):
    for _ in range(3):
        step()
    sync()
    # Timed with the call table paused (run_steady pauses it; its own cost
    # is not in the figure); then the same steps again, counted, for the
    # waits and the time in the stub. A stub that cannot pause counts the
    # timed steps.
    paused = waits.pause(True)
    waits.reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    counted = None if paused else waits.read()
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / steps
    if paused:
        waits.pause(False)
        waits.reset()
        for _ in range(steps):
            step()
        counted = waits.read()
        sync()
        waits.pause(True)
    fields = {"ms_per_step": round(ms, 4), "steps": steps}
    if counted is not None:
        fields["waits_per_step"] = round(counted[0] / steps, 3)
        fields["waited_in"] = counted[1]
        # Time the program's thread spent inside the stub per step, in µs:
        # in all, and the entry points that took most of it.
        times = counted[2]
        fields["stub_us_per_step"] = round(times.get("total", 0) / steps, 1)
        top = sorted(((k, v) for k, v in times.items() if k != "total"), key=lambda kv: -kv[1])[:5]
        fields["stub_us_in"] = {k: round(v / steps, 1) for k, v in top}
    emit(name, **fields)


def run_fresh(name):
    t0 = time.perf_counter()
    import torch

    t_import = time.perf_counter()
    if name == "first_op":
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    else:
        a = torch.ones(1024, 1024, device="cuda")
        (a @ a).sum().item()
    t1 = time.perf_counter()
    emit(name, seconds=round(t1 - t_import, 4), import_s=round(t_import - t0, 4))


def run_steady(names):
    import torch

    torch.manual_seed(0)
    torch.zeros(1, device="cuda")
    waits = Waits()
    # Every workload's figures are taken with the call table paused; only
    # timed_steps' counted windows count.
    waits.pause(True)
    sync = torch.cuda.synchronize

    def copies():
        n = 512 << 20
        host = torch.empty(n, dtype=torch.uint8).fill_(7)
        pinned = torch.empty(n, dtype=torch.uint8).pin_memory().fill_(7)
        dev = host.to("cuda")
        sync()
        figures = {}
        for what, fn in [
            ("htod", lambda: host.to("cuda")),
            ("htod_pinned", lambda: pinned.to("cuda", non_blocking=True)),
            ("dtoh", lambda: dev.cpu()),
        ]:
            fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            sync()
            figures[what + "_gib_s"] = round(3 * n / (time.perf_counter() - t0) / (1 << 30), 3)
        emit("copies", bytes=n, **figures)
        del host, pinned, dev

    def transformer():
        layer = torch.nn.TransformerEncoderLayer(1024, 16, 4096, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)

    def model_upload():
        model = transformer()  # ~300 MB of fp32 weights
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        t0 = time.perf_counter()
        model.cuda()
        sync()
        emit("model_upload", bytes=size, seconds=round(time.perf_counter() - t0, 4))
        del model

    def inference():
        model = transformer().cuda().eval()
        x = torch.randn(8, 256, 1024, device="cuda")
        with torch.no_grad():
            if "fp32_infer" in names:
                steady("fp32_infer", waits, 20, lambda: model(x), sync)
            if "bf16_infer" in names:
                def bf16():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        return model(x)

                steady("bf16_infer", waits, 20, bf16, sync)
        del model, x

    def train_step():
        mlp = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
        opt = torch.optim.SGD(mlp.parameters(), lr=0.01)
        xb = torch.randn(128, 256, device="cuda")
        yb = torch.randint(0, 10, (128,), device="cuda")
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(mlp(xb), yb).backward()
            opt.step()

        steady("train_step", waits, 200, step, sync)

    def item_loop():
        t = torch.ones(1024, device="cuda")
        for _ in range(10):
            (t * 2).sum().item()
        t0 = time.perf_counter()
        for _ in range(500):
            (t * 2).sum().item()
        emit("item_loop", us_per_item=round((time.perf_counter() - t0) * 1e6 / 500, 2))

    def weights_download():
        model = transformer().cuda()
        sync()
        t0 = time.perf_counter()
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        size = sum(v.numel() * v.element_size() for v in state.values())
        emit("weights_download", bytes=size, seconds=round(time.perf_counter() - t0, 4))

    for name, fn in [("copies", copies), ("model_upload", model_upload), ("train_step", train_step),
                     ("item_loop", item_loop), ("weights_download", weights_download)]:
        if name in names:
            guarded(name, fn)
        if name == "model_upload" and ("fp32_infer" in names or "bf16_infer" in names):
            guarded("inference", inference)


# (workload, figure, unit, ratio direction): "time" ratios are remote/native,
# "rate" ratios native/remote, so above 1 always means slower through gpupool.
FIGURES = [
    ("first_op", "seconds", "s", "time"),
    ("first_matmul", "seconds", "s", "time"),
    ("first_matmul_again", "seconds", "s", "time"),
    ("copies", "htod_gib_s", "GiB/s", "rate"),
    ("copies", "htod_pinned_gib_s", "GiB/s", "rate"),
    ("copies", "dtoh_gib_s", "GiB/s", "rate"),
    ("model_upload", "seconds", "s", "time"),
    ("fp32_infer", "ms_per_step", "ms", "time"),
    ("bf16_infer", "ms_per_step", "ms", "time"),
    ("train_step", "ms_per_step", "ms", "time"),
    ("item_loop", "us_per_item", "us", "time"),
    ("weights_download", "seconds", "s", "time"),
]


def report(native_path, remote_path):
    def load(path):
        rows = {}
        for line in open(path, errors="replace"):
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                rows[r["workload"]] = r
        return rows

    native, remote = load(native_path), load(remote_path)
    print("| workload | figure | native | gpupool | slowdown | waits per step (gpupool) | µs in the stub per step |")
    print("|---|---|---|---|---|---|---|")
    for workload, key, unit, kind in FIGURES:
        n = native.get(workload, {}).get(key)
        r = remote.get(workload, {}).get(key)
        ratio = "-"
        if n and r:
            ratio = f"{(r / n if kind == 'time' else n / r):.2f}x"
        waits = remote.get(workload, {}).get("waits_per_step", "-")
        where = remote.get(workload, {}).get("waited_in")
        if where:
            waits = f"{waits} ({', '.join(f'{k} {v}' for k, v in sorted(where.items(), key=lambda kv: -kv[1])[:4])})"
        fmt = lambda v: "missing" if v is None else f"{v} {unit}"
        stub = remote.get(workload, {}).get("stub_us_per_step", "-")
        inside = remote.get(workload, {}).get("stub_us_in")
        if inside:
            stub = f"{stub} ({', '.join(f'{k} {v}' for k, v in list(inside.items())[:3])})"
        print(f"| {workload} | {key} | {fmt(n)} | {fmt(r)} | {ratio} | {waits} | {stub} |")


def main():
    if sys.argv[1:2] == ["--report"]:
        report(sys.argv[2], sys.argv[3])
        return
    wanted = sys.argv[1:] or FRESH + STEADY
    for name in wanted:
        if name in FRESH:
            # A fresh process each: the first op's cost is the point.
            child = os.environ.get("TORCH_BENCH_CHILD") == "1"
            if child:
                run_fresh(name)
            else:
                env = dict(os.environ, TORCH_BENCH_CHILD="1")
                subprocess.run([sys.executable, __file__, name], env=env, check=False)
    steady_names = [n for n in wanted if n in STEADY]
    if steady_names:
        run_steady(steady_names)


if __name__ == "__main__":
    main()
