#!/usr/bin/env bash
# A/B on the GPU machine: the client's I/O thread kept awake (issue 17, the
# QUIC round trip), in one binary built with client-io-spin-variants.patch:
# GPUPOOL_IO_SPIN_US sets the spin (the Rust client reads it too with the
# patch), GPUPOOL_IO_SPIN_AT where it starts (`send`: after each batch sent,
# main's behaviour; `wait`: when the program begins to wait for a reply,
# client-io-spin-at-waits.patch; `both`). Variants interleaved, all with the
# commands on QUIC (--shm off, GPUPOOL_SHM=off):
#   1. gpupool-bench round trips, 2 rounds, and one in-process run;
#   2. bench_loop (its sync round-trip row) through the stub, 2 rounds;
#   3. bench/torch_bench.py fp32/bf16 inference, training step, .item()
#      loop, native and through the stub per variant (1 round): a spinning
#      I/O thread must not slow the launch-bound workloads.
# Usage: bench/experiments/client-io-spin.sh BIN_DIR OUT_DIR
#   BIN_DIR: gpupool-server, gpupool-bench, stub/libcuda.so.1 (built with the
#   patch) and bench_loop (tests/programs/bench_loop.cu, nvcc -arch=sm_90).
set -u
B=$(cd "${1:?BIN_DIR}" && pwd) || exit 2
W=${2:?OUT_DIR}
mkdir -p "$W" && W=$(cd "$W" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
{ nvidia-smi --query-gpu=name,driver_version --format=csv; nproc; cat "$B/COMMIT" 2>/dev/null; date -u; } >"$W/machine.txt" 2>&1
V=("base|GPUPOOL_IO_SPIN_AT=send" "send100|GPUPOOL_IO_SPIN_US=100 GPUPOOL_IO_SPIN_AT=send"
   "wait100|GPUPOOL_IO_SPIN_US=100 GPUPOOL_IO_SPIN_AT=wait")
for r in 1 2; do
    for v in "${V[@]}"; do
        n=${v%%|*} e=${v#*|}
        # shellcheck disable=SC2086 # settings, split on purpose
        env $e timeout 120 "$B/gpupool-bench" --device cuda --shm off --max-copy-mib 1 --launches 10000 \
            --cold-runs 1 >"$W/bench-$n-$r.txt" 2>&1
    done
done
env GPUPOOL_IO_SPIN_US=100 GPUPOOL_IO_SPIN_AT=wait timeout 120 "$B/gpupool-bench" --device cuda --shm off \
    --max-copy-mib 1 --launches 10000 --cold-runs 1 --isolation in-process >"$W/bench-wait100-inproc.txt" 2>&1
# shellcheck source=bench/lib/server.sh
. "$repo/bench/lib/server.sh"
start_server "$W/server.log" "$B/gpupool-server" --device cuda:0 --tokens x --session-memory-mib 16384 || exit 1
trap 'kill $server_pid 2>/dev/null' EXIT
cu=/usr/local/cuda/targets/x86_64-linux/lib
native() { LD_LIBRARY_PATH=$cu "$@"; }
remote() {
    LD_LIBRARY_PATH=$B/stub:$cu GPUPOOL_SERVER=$addr GPUPOOL_TOKEN=x GPUPOOL_CERT_SHA256=$pin GPUPOOL_SHM=off "$@"
}
wl="fp32_infer bf16_infer train_step item_loop"
native timeout 60 "$B/bench_loop" >"$W/loop-native.txt" 2>&1
# shellcheck disable=SC2086
native timeout 200 python3 "$repo/bench/torch_bench.py" $wl >"$W/torch-native.out" 2>"$W/torch-native.err"
for r in 1 2; do
    for v in "${V[@]}"; do
        n=${v%%|*} e=${v#*|}
        # shellcheck disable=SC2086
        remote env $e timeout 60 "$B/bench_loop" >"$W/loop-$n-$r.txt" 2>&1
        [[ $r == 1 ]] || continue
        # shellcheck disable=SC2086
        remote env $e timeout 200 python3 "$repo/bench/torch_bench.py" $wl >"$W/torch-$n.out" 2>"$W/torch-$n.err"
        python3 "$repo/bench/torch_bench.py" --report "$W/torch-native.out" "$W/torch-$n.out" >"$W/report-$n.md" 2>&1
    done
done
for f in "$W"/bench-*.txt; do echo "== $f"; grep -i "round trip\|launches" "$f"; done
for f in "$W"/loop-*.txt; do echo "== $f"; grep "TIME" "$f"; done
for f in "$W"/report-*.md; do echo "== $f"; cat "$f"; done
