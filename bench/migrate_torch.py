"""A PyTorch training loop that a live migration must not change
(bench/migrate-torch.sh, issue 21): run through gpupool twice, once with its
session moved to another server halfway and once not, it must print the
same losses and end with the same weights, bit for bit.

Usage: migrate_torch.py STEPS DIR
  Trains a 3-layer MLP (8.4 M parameters: 34 MB, with AdamW's two moments
  and the gradients ~134 MB on the device) on synthetic data drawn on the
  GPU, printing "STEP i LOSS" (LOSS as float.hex(): exact) after each step.
  Before step STEPS//2 it waits, idle, for the harness: it creates DIR/half
  and goes on once DIR/go exists (at most 300 s). At the end it prints
  "CHECKSUM X" (the sum of every parameter in float64, as float.hex()) and
  "DONE". "INFO ..." and "AFTER_GO_MS ..." lines are for people, not for
  the comparison.
"""

import os
import sys
import time

# cuBLAS is deterministic only with a fixed workspace configuration, read
# when it starts: set it before torch is imported.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

BATCH, WIDTH, HIDDEN = 256, 1024, 2048


def wait_for(path, limit_s=300):
    start = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - start > limit_s:
            sys.exit(f"migrate_torch: no {path} within {limit_s} s")
        time.sleep(0.01)


def main():
    steps, work = int(sys.argv[1]), sys.argv[2]
    # Same seeds, deterministic kernels and no TF32: two runs on the same
    # GPU compute exactly the same numbers, so any difference is the move's.
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")

    # Initialised on the CPU (seeded), then moved to the GPU.
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, WIDTH),
    ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    # The data: drawn on the GPU from a generator of its own, learning a
    # fixed random map (the "teacher").
    gen = torch.Generator(device=dev)
    gen.manual_seed(1)
    teacher = torch.randn(WIDTH, WIDTH, device=dev, generator=gen) / WIDTH**0.5
    params = sum(p.numel() for p in model.parameters())
    print(f"INFO {params} parameters, {torch.cuda.get_device_name()}", flush=True)

    after_go = None
    for step in range(steps):
        if step == steps // 2:
            # Idle at a step boundary while the harness moves the session
            # (or not): everything so far has run.
            torch.cuda.synchronize()
            open(os.path.join(work, "half"), "w").close()
            wait_for(os.path.join(work, "go"))
            after_go = time.monotonic()
        x = torch.randn(BATCH, WIDTH, device=dev, generator=gen)
        y = torch.tanh(x @ teacher)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # .item() waits for the step: each line is a finished step.
        print(f"STEP {step} {loss.item().hex()}", flush=True)
        if after_go is not None:
            # The first step after the move carries its pause (resume).
            print(f"AFTER_GO_MS {(time.monotonic() - after_go) * 1e3:.1f}", flush=True)
            after_go = None

    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    print(f"CHECKSUM {checksum.hex()}")
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
