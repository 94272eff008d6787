"""Where a PyTorch `.item()` spends its time (issue 17: 77 us through
gpupool against 29 natively at a3429e3, H100): the loop of
bench/torch_bench.py's item_loop taken apart, each part timed alone.

Usage: python3 bench/probes/item_parts.py [ITERATIONS]
  natively, and through the stub with bench/probes/with-server.sh (add
  GPUPOOL_CALL_STATS=1 for the stub's call table at exit).

Prints one line per part, "PART name median_us p90_us", medians of
ITERATIONS (default 2000) timed iterations after 200 untimed ones:
  sync         torch.cuda.synchronize() with nothing queued
  kernel_sync  a one-element kernel, then synchronize
  item         .item() of a one-element tensor (a copy to pageable
               memory and its wait; no kernel)
  kernel_item  a one-element kernel, then .item() of its result
  loop         (t * 2).sum().item() on 4096 floats: item_loop's body
  pinned       a one-element non_blocking copy into pinned memory, then
               the stream's synchronize
"""

import statistics
import sys
import time

import torch


def timed(body, iterations):
    for _ in range(200):
        body()
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        body()
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9)]


def main():
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    dev = torch.device("cuda")
    one = torch.ones(1, device=dev)
    vec = torch.ones(4096, device=dev)
    pinned = torch.empty(1, pin_memory=True)
    stream = torch.cuda.current_stream()

    def pinned_copy():
        pinned.copy_(one, non_blocking=True)
        stream.synchronize()

    parts = [
        ("sync", torch.cuda.synchronize),
        ("kernel_sync", lambda: (one.add_(0), torch.cuda.synchronize())),
        ("item", one.item),
        ("kernel_item", lambda: one.add_(0).item()),
        ("loop", lambda: (vec * 2).sum().item()),
        ("pinned", pinned_copy),
    ]
    print(f"INFO {torch.cuda.get_device_name()}, {iterations} iterations a part", flush=True)
    for name, body in parts:
        median, p90 = timed(body, iterations)
        print(f"PART {name} {median:.1f} {p90:.1f}", flush=True)


if __name__ == "__main__":
    main()
