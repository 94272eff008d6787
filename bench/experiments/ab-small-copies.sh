#!/usr/bin/env bash
# A/B of a bench/experiments patch on a GPU host (written for small-copies.patch,
# now on main; worker-io-threads.patch uses it as is): gpupool-bench
# of the bundle (main) and of the patch, alternating, twice each, each with
# its own worker binary; then the patch's GPUPOOL_WORKER_IO_THREADS=2 and the
# transport alone (emulated device) with 1 and 2 I/O threads.
#
# Usage: bash bench/experiments/ab-small-copies.sh BASE NEW OUT
#   BASE  folder with gpupool-bench and gpupool-server built from main
#         (bench/build-device.sh's folder)
#   NEW   the same two binaries built with the patch applied
#   OUT   folder for one report per run (ab-<name>.txt) and summary.txt
set -euo pipefail
base=$(realpath "$1")
new=$(realpath "$2")
out=$3
mkdir -p "$out"

# name bench-folder io-threads device largest-copy-MiB
run() {
    local name=$1 dir=$2 threads=$3 device=$4 mib=$5 rc=0
    GPUPOOL_WORKER_IO_THREADS=$threads GPUPOOL_WORKER_EXE=$dir/gpupool-server \
        timeout 90 "$dir/gpupool-bench" --device "$device" --iterations 1000 --warmup 100 \
        --launches 1000 --max-copy-mib "$mib" --cold-runs 1 >"$out/ab-$name.txt" 2>&1 || rc=$?
    {
        echo "== $name (exit $rc)"
        grep -E "^(HtoD|DtoH) (1|64) MiB|round trip, median|async launches" "$out/ab-$name.txt" || true
    } | tee -a "$out/summary.txt"
}

: >"$out/summary.txt"
run base1 "$base" 1 cuda 64
run new1 "$new" 1 cuda 64
run base2 "$base" 1 cuda 64
run new2 "$new" 1 cuda 64
run new-io2 "$new" 2 cuda 64
run emulated-io1 "$new" 1 emulated 1
run emulated-io2 "$new" 2 emulated 1
