"""The PyTorch tenant of the GPU overcommit check (bench/overcommit-gpu.sh,
issue 21): unmodified PyTorch holding MIB MiB of device memory, used in turns
with the other tenants, so that each turn brings its memory back in after the
others swapped it out.

Usage: overcommit_torch.py MIB DIR ID ROUNDS
  Fills an int64 tensor from a hash of each index; for each round r waits for
  DIR/turn-ID-r, advances every element one step of a 32-bit recurrence, and
  checks every element against the value recomputed from its index (in
  chunks, on the device), prints "TURN ID r ms mismatches" and creates
  DIR/done-ID-r. Exits 1 at the first mismatch.
"""

import os
import sys
import time

import torch

MASK = 0xFFFFFFFF
CHUNK = 1 << 24


def start_value(i, seed):
    x = ((i * 2654435761) & MASK) ^ seed
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & MASK
    return x ^ (x >> 16)


def advance(x, r):
    return (x * 1664525 + 1013904223 + r) & MASK


def wait_for(path):
    start = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - start > 600:
            sys.exit(f"torch tenant: no {path} within 600 s")
        time.sleep(0.002)


def main():
    mib, turn_dir, tenant, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    seed = (0x9E3779B9 * (tenant + 1)) & MASK
    n = (mib << 20) // 8
    x = torch.empty(n, dtype=torch.int64, device="cuda")
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        x[lo:hi] = start_value(torch.arange(lo, hi, device="cuda", dtype=torch.int64), seed)
    torch.cuda.synchronize()
    open(os.path.join(turn_dir, f"ready-{tenant}"), "w").close()
    for r in range(rounds):
        wait_for(os.path.join(turn_dir, f"turn-{tenant}-{r}"))
        t0 = time.monotonic()
        x.mul_(1664525).add_(1013904223 + r).bitwise_and_(MASK)
        mismatches = 0
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            want = start_value(torch.arange(lo, hi, device="cuda", dtype=torch.int64), seed)
            for k in range(r + 1):
                want = advance(want, k)
            mismatches += int((x[lo:hi] != want).sum().item())
        # A sample on the host as well: the copy back after the swap-in.
        stride = 4099
        host = x[::stride].cpu()
        idx = torch.arange(0, n, stride, dtype=torch.int64)
        want = start_value(idx, seed)
        for k in range(r + 1):
            want = advance(want, k)
        mismatches += int((host != want).sum())
        print(f"TURN {tenant} {r} {(time.monotonic() - t0) * 1e3:.1f} {mismatches}", flush=True)
        if mismatches:
            sys.exit(f"torch tenant {tenant}: {mismatches} elements differ after round {r}")
        open(os.path.join(turn_dir, f"done-{tenant}-{r}"), "w").close()
    print(f"tenant {tenant} (PyTorch {torch.__version__}): {rounds} rounds of {mib} MiB, every element checked")


if __name__ == "__main__":
    main()
