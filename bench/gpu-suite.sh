#!/usr/bin/env bash
# The GPU suite, run on the GPU machine from prebuilt binaries (made by
# bench/build-device.sh; that machine has no Rust toolchain):
#   1. nvidia-smi: which GPU, driver, MIG mode (read-only queries);
#   2. the GPU end-to-end tests (GPUPOOL_TEST_DEVICE=cuda, --include-ignored);
#   3. gpupool-server on the GPU: starts, serves, drains on SIGTERM;
#   4. gpupool-demo --device cuda;
#   5. gpupool-bench --device cuda (native CUDA against remote gpupool;
#      every copy row over QUIC and again through shared memory, `, shm`;
#      the sync round trip again with the commands through a ring in
#      shared memory, `, shm commands`: target <= 15 us median); then the
#      same sessions in the server's process, and the round-trip rows with
#      the server's reader and writer spinning (`--server-io-spin-us`,
#      IO_SPIN_US, default 100; step bench_io_spin);
#   6. bench/dropin.sh: unmodified programs, PyTorch and the drop-in
#      benchmark row, native and through gpupool's libcuda.so.1 (whose
#      copies go through shared memory by default on the server's host;
#      the variant `quic` runs the benchmarks again with GPUPOOL_SHM=off);
#   7. bench/pool-gpu.sh: the balancer: whole-GPU discovery through NVML,
#      a balancer and a server on the card, unmodified programs leasing
#      their GPU through it, and the balancer's gRPC benchmark;
#   8. lambda-layer/ci-test.sh on the card: the example Lambda function,
#      cold and warm, native and through the pool (binaries from
#      lambda-layer/build-device.sh, ONLY=lambda);
#      ONLY=lambda_torch: the PyTorch example function the same way
#      (FUNCTION=torch: python3's PyTorch, awslambdaric from the wheels
#      that build-device.sh carried);
#   9. live migration: a session of 1 GiB moved between two servers on the
#      card (worker processes), six times, while its program reads from it;
#      the pause the program saw (target: at most 1 s).
#  10. gpupool-rdma-check: the RDMA integration check (docs/rdma.md): a
#      session over an RDMA device where `ibv_get_device_list` finds one,
#      recorded as SKIP ("skipped: no RDMA device") where it finds none;
#  11. bench/share-gpu.sh: 4 and 8 concurrent PyTorch clients on the card,
#      one after another, at once natively, exclusive leases and shared
#      leases under the server's MPS daemon; the MPS group fault check
#      (docs/sharing.md; binaries of PARTS=pool).
#  12. bench/overcommit-gpu.sh: three tenants, each 60 % of a device bound,
#      used in turns by two CUDA programs and a PyTorch program (every word
#      checked), native and through gpupool with swap; the swap rates of a
#      4 GiB session (target >= 10 GiB/s).
#  13. bench/migrate-torch.sh: a PyTorch training loop leased through a
#      balancer, its server drained halfway (the session moves to a second
#      server on the card), against the same loop unmoved and natively
#      (binaries of PARTS=pool or all; MIGRATE_CLIENT_ENV passes client
#      settings, e.g. GPUPOOL_SHM_PINNED_MIB=0).
#  14. the same harness with gpupool-migrate-cudarc (a cudarc program: a
#      stream, buffers, the built-in module and its variable `tally`; every
#      step checked against the host's arithmetic) instead of PyTorch.
#  15. bench/share-gpu.sh's temporal part with MPS off (shares time-slice):
#      a 75 % and a 25 % share both saturating, the server's time share on.
#  16. bench/probes/share-confine.sh: a small client next to a heavy one,
#      natively: no MPS, MPS, MPS active-thread percentages, MPS green
#      contexts (issue 19's choice of SM confinement).
#  17. bench/probes/module-loading.sh: cuBLAS's first use on fresh servers
#      under eager and lazy module loading, the server's per-module
#      timings, and a device-launched grid's printf in each mode (issue 17;
#      binaries of PARTS=dropin or all).
#  18. gpupool-bench's QUIC download rows with download pieces of 64, 32
#      and 16 MiB (`--download-piece-mib`), each against native in its run
#      (issue 18).
# Results: <date>-<gpu>-<commit>.md (every step's output and a summary) and
# .json (the benchmark's figures) in $OUT when set (a device run returns only
# $OUT), else in bench/results/. The .md is written step by step, so a run cut
# short still leaves what it finished. Exits non-zero if any step failed.
#
# This script never changes MIG mode, clocks, power limits or any other
# setting of the GPU: it only queries.
#
# Usage: bench/gpu-suite.sh [BIN_DIR]    (default .device/bin; carry
#        .device/device.tar.xz and this script unpacks it first, unless
#        GPUPOOL_UNPACK=0)
# Env:   BENCH_ARGS   extra gpupool-bench flags (e.g. "--iterations 500")
#        TEST_ARGS    extra test-harness flags (e.g. a test name filter)
#        *_TIMEOUT    per-step limits in seconds: TEST_TIMEOUT (240),
#                     SMOKE_TIMEOUT (60), DEMO_TIMEOUT (120), BENCH_TIMEOUT (300),
#                     DROPIN_TIMEOUT (540), POOL_TIMEOUT (300),
#                     LAMBDA_TIMEOUT (240), LAMBDA_TORCH_TIMEOUT (420),
#                     MIGRATION_TIMEOUT (300), SHARE_TIMEOUT (360),
#                     OVERCOMMIT_TIMEOUT (300), MIGRATE_TORCH_TIMEOUT (240),
#                     MIGRATE_CUDARC_TIMEOUT (180), TEMPORAL_TIMEOUT (90),
#                     CONFINE_TIMEOUT (120), MODULE_LOADING_TIMEOUT (240),
#                     PIECES_TIMEOUT (360)
#        MIGRATION_MIB  the migrated session's size (1024)
#        ONLY         step functions to run, space-separated (gpu_info
#                     gpu_tests server_smoke demo bench bench_in_process bench_io_spin
#                     dropin pool lambda lambda_torch migration rdma share overcommit temporal confine
#                     migrate_torch migrate_cudarc module_loading download_pieces); default all. Every step together takes
#                     longer than one device run's 600 s; each part's
#                     folder serves its steps (all three travel in the one
#                     archive): ONLY="gpu_info gpu_tests server_smoke bench
#                     bench_in_process migration rdma" with .device/bin
#                     (PARTS=core), ONLY="demo dropin" with .device/dropin,
#                     ONLY="pool share" with .device/pool.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
bin_dir=${1:-.device/bin}
# The binaries travel as one archive (bench/build-device.sh packs
# .device/device.tar.xz): unpacked here, over whatever an earlier run left.
archive="$repo/.device/device.tar.xz"
if [[ -f $archive && ${GPUPOOL_UNPACK:-1} == 1 ]]; then
    echo "== unpacking $archive"
    xz -dc "$archive" | tar -C "$repo/.device" -xf - || exit 2
fi
if ! bin_dir=$(cd "$bin_dir" 2>/dev/null && pwd); then
    echo "gpu-suite: binary folder ${1:-.device/bin} not found (build it with bench/build-device.sh)" >&2
    exit 2
fi
results=${OUT:-$repo/bench/results}
mkdir -p "$results" || exit 2

# NVRTC (for the built-in kernels) ships with the toolkit, whose libraries
# are not always on the loader path.
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    if [[ -d $dir ]]; then
        LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
done
export LD_LIBRARY_PATH
# Plain logs in the report.
export NO_COLOR=1

commit=${GPUPOOL_COMMIT:-$(cat "$bin_dir/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export GPUPOOL_COMMIT=$commit
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
slug=$(printf '%s' "${gpu:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
stem="$results/$(date -u +%Y%m%dT%H%M%SZ)-$slug-$commit"
md="$stem.md"
json="$stem.json"

summary=()
failed=0

# step NAME TIMEOUT COMMAND...: runs COMMAND (output shown live and kept),
# appends its section to the report and records the result.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n ${ONLY:-} && " $ONLY " != *" $1 "* ]]; then
        return 0
    fi
    local log started rc seconds verdict
    log=$(mktemp)
    echo
    echo "=== $name"
    started=$(date +%s)
    # A fresh bash runs the step's function so that `timeout` can end it
    # and everything it started (timeout signals its process group).
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    seconds=$(($(date +%s) - started))
    if ((rc == 0)); then
        verdict=PASS
    elif ((rc == 77)); then
        verdict="SKIP (nothing to run it on: see its output)"
    elif ((rc == 124 || rc == 137)); then
        verdict="FAIL (timed out after ${limit}s)"
    else
        verdict="FAIL (exit $rc)"
    fi
    ((rc == 0 || rc == 77)) || failed=1
    echo "=== $name: $verdict in ${seconds}s"
    {
        echo "## $name: $verdict (${seconds}s)"
        echo
        echo '```'
        cat "$log"
        echo '```'
        echo
    } >>"$md"
    summary+=("| $name | $verdict | $seconds |")
    rm -f "$log"
}

# Fails when the binary is absent, so a missing piece is a failed step.
need() {
    if [[ ! -x "$bin_dir/$1" ]]; then
        echo "missing binary: $bin_dir/$1 (rebuild with bench/build-device.sh)"
        return 1
    fi
}

gpu_info() {
    nvidia-smi -L &&
        nvidia-smi --query-gpu=name,driver_version,memory.total,mig.mode.current,persistence_mode --format=csv &&
        echo "net.core.rmem_max=$(cat /proc/sys/net/core/rmem_max) wmem_max=$(cat /proc/sys/net/core/wmem_max)"
}

gpu_tests() {
    need gpupool-gpu-tests || return 1
    # shellcheck disable=SC2086 # TEST_ARGS is a list of flags
    GPUPOOL_TEST_DEVICE=cuda "$bin_dir/gpupool-gpu-tests" --include-ignored ${TEST_ARGS:-} || return 1
    # The CI end-to-end suites, this time on the CUDA backend.
    # Process isolation starts gpupool-server as the worker binary.
    export GPUPOOL_WORKER_EXE="$bin_dir/gpupool-server"
    for t in e2e bad-input isolation; do
        need "gpupool-$t-tests" || return 1
        # shellcheck disable=SC2086
        GPUPOOL_TEST_DEVICE=cuda "$bin_dir/gpupool-$t-tests" --test-threads 2 ${TEST_ARGS:-} || return 1
    done
}

# The real server binary on the GPU: it must come up on the CUDA backend and
# end cleanly on SIGTERM within its grace period.
server_smoke() {
    need gpupool-server || return 1
    local log pid ready=0 rc
    log=$(mktemp)
    "$bin_dir/gpupool-server" --listen 127.0.0.1:0 --device cuda:0 --tokens gpu-suite-smoke >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        if grep -q "listening on" "$log"; then
            ready=1
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if ((ready == 0)); then
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        cat "$log"
        echo "gpupool-server did not start"
        rm -f "$log"
        return 1
    fi
    kill -TERM "$pid"
    wait "$pid"
    rc=$?
    cat "$log"
    if ! grep -q 'backend.*cuda' "$log"; then
        echo "gpupool-server did not report the cuda backend"
        rc=1
    fi
    rm -f "$log"
    echo "gpupool-server exit status after SIGTERM: $rc"
    return "$rc"
}

demo() {
    need gpupool-demo || return 1
    "$bin_dir/gpupool-demo" --device cuda
}

bench() {
    need gpupool-bench || return 1
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
    "$bin_dir/gpupool-bench" --device cuda --json "$json" ${BENCH_ARGS:-}
}

# The same rows with sessions in the server's process, for the cost of the
# worker process hop (copies capped at 64 MiB to keep the run short).
bench_in_process() {
    need gpupool-bench || return 1
    # shellcheck disable=SC2086
    "$bin_dir/gpupool-bench" --device cuda --isolation in-process --max-copy-mib 64 \
        --json "${json%.json}-in-process.json" ${BENCH_ARGS:-}
}

# The round-trip rows again with the server's reader and writer spinning
# (`--io-spin-us`, off by default) next to the client's and session's spin:
# whether it takes the shared-memory round trip to issue 18's 15 us.
bench_io_spin() {
    need gpupool-bench || return 1
    # shellcheck disable=SC2086
    "$bin_dir/gpupool-bench" --device cuda --max-copy-mib 1 --server-io-spin-us "${IO_SPIN_US:-100}" \
        --json "${json%.json}-io-spin.json" ${BENCH_ARGS:-}
}

dropin() {
    VARIANTS="${VARIANTS:-quic:GPUPOOL_SHM=off}" bash "$repo/bench/dropin.sh" "$bin_dir" "$stem-dropin"
}

pool() {
    bash "$repo/bench/pool-gpu.sh" "$bin_dir" "$stem-pool"
}

# The Lambda example function under cargo-lambda on the card: cold and warm
# invocations through the pool (layer libcuda, extension, balancer, server)
# and natively (the machine's libcuda), and the freeze/thaw check.
# Binaries: lambda-layer/build-device.sh into BIN_DIR/../lambda or LAMBDA_DIR.
lambda() {
    local dir=${LAMBDA_DIR:-$bin_dir/../lambda}
    [[ -x $dir/bin/gpupool-lambda-example ]] || { echo "no $dir/bin: run lambda-layer/build-device.sh"; return 1; }
    dir=$(cd "$dir" && pwd)
    PATH="$dir/shim:$PATH" BIN="$dir/bin" CARGO_LAMBDA="$dir/cargo-lambda" DEVICE=cuda:0 NATIVE=1 \
        OUT="$stem-lambda" bash "$repo/lambda-layer/ci-test.sh"
}

# The PyTorch example function (lambda-layer/python/torch) the same way:
# through the pool and natively, cold and warm, the freeze past the idle
# timeout.
lambda_torch() {
    local dir=${LAMBDA_DIR:-$bin_dir/../lambda}
    [[ -d $dir/wheels ]] || { echo "no $dir/wheels: run lambda-layer/build-device.sh"; return 1; }
    dir=$(cd "$dir" && pwd)
    PATH="$dir/shim:$PATH" BIN="$dir/bin" CARGO_LAMBDA="$dir/cargo-lambda" DEVICE=cuda:0 NATIVE=1 \
        FUNCTION=torch PIP_WHEELS="$dir/wheels" OUT="$stem-lambda-torch" bash "$repo/lambda-layer/ci-test.sh"
}

# Live migration on the card: the pause a program sees while its 1 GiB
# session moves between two servers (each session in a worker process, as
# two servers on one GPU would run it), measured by the migration tests'
# `migration_pause`; fails above 1 s.
migration() {
    need gpupool-migration-tests || return 1
    GPUPOOL_TEST_DEVICE=cuda GPUPOOL_WORKER_EXE="$bin_dir/gpupool-server" \
        GPUPOOL_MIGRATION_MIB="${MIGRATION_MIB:-1024}" GPUPOOL_MIGRATION_MAX_PAUSE_MS=1000 \
        "$bin_dir/gpupool-migration-tests" migration_pause --ignored --nocapture
}

# The RDMA integration check: exit 77 (a SKIP in the report) when it found
# no RDMA device, so a machine without one never reads as a pass.
rdma() {
    need gpupool-rdma-check || return 1
    echo "RDMA devices in sysfs: $(find /sys/class/infiniband -mindepth 1 -maxdepth 1 -printf '%f ' 2>/dev/null)"
    local out rc
    out=$("$bin_dir/gpupool-rdma-check")
    rc=$?
    echo "$out"
    ((rc == 0)) || return 1
    [[ $out == *"skipped: "* ]] && return 77
    return 0
}

export repo stem bin_dir json
share() {
    # Its own budget ends before the step's limit, so that it skips what
    # no longer fits and says so instead of being cut off.
    SHARE_BUDGET_S=${SHARE_BUDGET_S:-$((${SHARE_TIMEOUT:-360} - 20))} bash "$repo/bench/share-gpu.sh" "$bin_dir" "$stem-share"
}

# The temporal share where it applies: shares that time-slice (MPS off).
temporal() {
    SHARE_MPS=off SHARE_TIME_MS=${SHARE_TIME_MS:-100} SHARE_PARTS=temporal \
        SHARE_BUDGET_S=$((${TEMPORAL_TIMEOUT:-90} - 10)) bash "$repo/bench/share-gpu.sh" "$bin_dir" "$stem-temporal"
}

# SM confinement of a small client next to a heavy one, natively (a
# private MPS daemon, quit at the end; no GPU setting changes).
confine() {
    bash "$repo/bench/probes/share-confine.sh" "$stem-confine"
}

# Memory overcommit: three tenants of 60 % of a device bound in turns, two
# CUDA programs and PyTorch, every word checked; swap rates of a 4 GiB
# session (binaries of PARTS=pool or all).
overcommit() {
    need gpupool-server-lib-tests || return 1
    bash "$repo/bench/overcommit-gpu.sh" "$bin_dir" "$stem-overcommit"
}

# PyTorch across a live migration: a training loop leased through a
# balancer, its server drained halfway (binaries of PARTS=pool or all).
migrate_torch() {
    need gpupool-balancer || return 1
    MIGRATE_TIMEOUT_S=${MIGRATE_TIMEOUT_S:-90} bash "$repo/bench/migrate-torch.sh" "$bin_dir" "$stem-migrate-torch"
}

# A cudarc program across a live migration, the same harness (binaries of
# PARTS=pool or all).
migrate_cudarc() {
    need gpupool-balancer || return 1
    need gpupool-migrate-cudarc || return 1
    MIGRATE_PROGRAM="$bin_dir/gpupool-migrate-cudarc" MIGRATE_TIMEOUT_S=${MIGRATE_TIMEOUT_S:-90} \
        bash "$repo/bench/migrate-torch.sh" "$bin_dir" "$stem-migrate-cudarc"
}

# cuBLAS's first use under eager and lazy module loading (issue 17).
module_loading() {
    need gpupool-server || return 1
    bash "$repo/bench/probes/module-loading.sh" "$bin_dir" "$stem-module-loading"
}

# The QUIC download rows with download pieces of 64, 32 and 16 MiB, each
# run against native on the same GPU (issue 18).
download_pieces() {
    need gpupool-bench || return 1
    local mib
    for mib in 64 32 16; do
        echo "-- --download-piece-mib $mib"
        "$bin_dir/gpupool-bench" --device cuda --shm off --max-copy-mib 1024 --iterations 200 --launches 10000 \
            --cold-runs 1 --download-piece-mib "$mib" | grep -E '^(DtoH|HtoD) ' || return 1
    done
}

export -f need gpu_info gpu_tests server_smoke demo bench bench_in_process bench_io_spin dropin pool lambda lambda_torch migration rdma share overcommit migrate_torch migrate_cudarc temporal confine module_loading download_pieces

{
    echo "# gpupool GPU suite"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- host: $(hostname 2>/dev/null || cat /proc/sys/kernel/hostname)"
    echo "- GPU: ${gpu:-none found}"
    echo "- commit: $commit"
    echo "- binaries: $bin_dir"
    echo "- benchmark JSON: $(basename "$json")"
    echo
} >"$md"

step "GPU (nvidia-smi)" 30 gpu_info
step "GPU end-to-end tests" "${TEST_TIMEOUT:-240}" gpu_tests
step "gpupool-server on the GPU" "${SMOKE_TIMEOUT:-60}" server_smoke
step "demo (--device cuda)" "${DEMO_TIMEOUT:-120}" demo
step "benchmark (--device cuda)" "${BENCH_TIMEOUT:-300}" bench
step "benchmark, sessions in-process (--device cuda)" "${BENCH_TIMEOUT:-300}" bench_in_process
step "benchmark, the server's reader and writer spinning (--server-io-spin-us)" "${BENCH_TIMEOUT:-300}" bench_io_spin
step "drop-in libcuda: unmodified programs, PyTorch, benchmark row" "${DROPIN_TIMEOUT:-540}" dropin
step "balancer: NVML discovery, leased programs, gRPC benchmark" "${POOL_TIMEOUT:-300}" pool
step "Lambda example function: cold and warm, native and through the pool, freeze/thaw" "${LAMBDA_TIMEOUT:-240}" lambda
step "Lambda PyTorch function: cold and warm, native and through the pool" "${LAMBDA_TORCH_TIMEOUT:-420}" lambda_torch
step "live migration: pause of a 1 GiB session between two servers on the card" "${MIGRATION_TIMEOUT:-300}" migration
step "RDMA integration check (gpupool-rdma-check)" "${RDMA_TIMEOUT:-90}" rdma
step "sharing: concurrent PyTorch clients, exclusive and shared (MPS) leases, group fault" "${SHARE_TIMEOUT:-360}" share
step "overcommit: three tenants of 60 % in turns (CUDA programs, PyTorch), swap rates" "${OVERCOMMIT_TIMEOUT:-300}" overcommit
step "PyTorch across a live migration (balancer drain, two servers on the card)" "${MIGRATE_TORCH_TIMEOUT:-240}" migrate_torch
step "cudarc across a live migration (the same harness)" "${MIGRATE_CUDARC_TIMEOUT:-180}" migrate_cudarc
step "temporal share: 75 % and 25 % shares time-sliced, both saturating" "${TEMPORAL_TIMEOUT:-90}" temporal
step "SM confinement natively: active-thread percentage against green contexts" "${CONFINE_TIMEOUT:-120}" confine
step "cuBLAS's first use under eager and lazy module loading" "${MODULE_LOADING_TIMEOUT:-240}" module_loading
step "QUIC downloads by download piece (64, 32, 16 MiB)" "${PIECES_TIMEOUT:-360}" download_pieces

{
    echo "## Summary"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${summary[@]}"
} >>"$md"

echo
printf '%s\n' "${summary[@]}"
echo "report: $md"
[[ -f $json ]] && echo "json:   $json"
if ((failed)); then
    echo "gpu-suite: FAILED" >&2
    exit 1
fi
if [[ " ${summary[*]} " == *"| SKIP"* ]]; then
    echo "gpu-suite: no step failed; some were skipped (see the summary)"
else
    echo "gpu-suite: all steps passed"
fi
