#!/usr/bin/env bash
# The drop-in libcuda on the GPU machine: unmodified programs run natively
# and through gpupool's libcuda.so.1 against a gpupool-server on the same
# card, side by side, and their outputs are compared (TIME and INFO lines
# aside). Also PyTorch (torch_check.py, torch_compat.py), CuPy, Numba and JAX
# (frameworks_check.py) both ways and the drop-in benchmark
# row (bench_loop: fixed-length kernels with small copies) and the PyTorch
# workloads of bench/torch_bench.py (TORCH_BENCH=0 skips them,
# TORCH_BENCH_WORKLOADS names some), native vs remote, with ratios and,
# through gpupool, the waits per step. PROGRAMS=none runs the benchmarks only;
# PROGRAMS="name ..." runs only those programs (names as in tests/programs'
# lists, `.sm90` builds included, or the Python checks: torch_check,
# torch_compat, torch_mallocasync, cupy_check, numba_check, jax_check) and no
# others: with GPUPOOL_LOG=debug (the stub) and RUST_LOG=debug (the server)
# set, a quick look at failures.
# VARIANTS="name:VAR=value[,VAR=value] ..." runs both benchmarks through
# gpupool once more per variant with those variables set (client settings
# such as GPUPOOL_BATCH_DELAY_US), against the same native run.
# BENCH_LOOP=0 leaves bench_loop out; with PROGRAMS=none nothing is built.
# PROGRAM_TIMEOUT: seconds each program may run, natively and remote (300).
# CUTRACE=1 runs the programs under cutrace (bench/cutrace: BIN_DIR/cutrace,
# built by build-device.sh), natively and through the stub: each call the
# CUDA runtime makes and its result land in OUT_DIR/{native,remote}/NAME.trace,
# for a diff of the two paths.
#
# Usage: bench/dropin.sh BIN_DIR OUT_DIR
#   BIN_DIR holds gpupool-server and stub/ (libcuda.so.1, libcuda.so and,
#   when built, libnvidia-ml.so.1), as bench/build-device.sh makes it.
#   OUT_DIR receives dropin.md (the table and every failure's output),
#   dropin.json (the benchmark figures) and the programs' outputs.
# Env: GPUPOOL_CUDA_HOME  toolkit to build the programs with (default
#                         /usr/local/cuda: the GPU machine has no PyPI).
# Exits non-zero when a program that passes natively fails through the stub
# or prints something else.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin_dir=$(cd "${1:?BIN_DIR}" && pwd) || exit 2
out=${2:?OUT_DIR}
mkdir -p "$out/native" "$out/remote" || exit 2
out=$(cd "$out" && pwd)
stub="$bin_dir/stub"
md="$out/dropin.md"
export GPUPOOL_CUDA_HOME=${GPUPOOL_CUDA_HOME:-/usr/local/cuda}
cuda_lib="$GPUPOOL_CUDA_HOME/targets/x86_64-linux/lib"
[[ -d $cuda_lib ]] || cuda_lib="$GPUPOOL_CUDA_HOME/lib64"

progs=$(mktemp -d)/programs # binaries stay out of OUT_DIR
bench_loop=${BENCH_LOOP:-1}
if [[ ${PROGRAMS:-all} != none || $bench_loop == 1 ]]; then
    echo "== building the programs with $GPUPOOL_CUDA_HOME"
    GPUPOOL_STUB_LIB="$stub" bash "$repo/tests/programs/build.sh" "$progs" || exit 1
else
    mkdir -p "$progs" && touch "$progs/ci.list" "$progs/gpu.list"
fi

echo "== starting gpupool-server on cuda:0"
log="$out/server.log"
# shellcheck source=bench/lib/server.sh
. "$repo/bench/lib/server.sh"
start_server "$log" "$bin_dir/gpupool-server" --device cuda:0 --tokens dropin --session-memory-mib 16384 || exit 1
trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid 2>/dev/null' EXIT
echo "server at $addr"

native_front="" remote_front=""
if [[ ${CUTRACE:-0} == 1 ]]; then
    real=$(ldconfig -p | awk '$1 == "libcuda.so.1" { print $NF; exit }')
    for side in native remote; do
        mkdir -p "$out/cutrace/$side"
        cp "$bin_dir/cutrace/libcuda.so.1" "$out/cutrace/$side/" || exit 2
    done
    ln -sf "$(readlink -f "$real")" "$out/cutrace/native/libcutrace_real.so"
    ln -sf "$stub/libcuda.so.1" "$out/cutrace/remote/libcutrace_real.so"
    native_front="$out/cutrace/native:" remote_front="$out/cutrace/remote:"
fi
native() { LD_LIBRARY_PATH="$native_front$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$@"; }
remote() {
    LD_LIBRARY_PATH="$remote_front$stub:$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        GPUPOOL_SERVER="$addr" GPUPOOL_TOKEN=dropin GPUPOOL_CERT_SHA256="$pin" "$@"
}
# What must match between the two runs.
compared() { grep -v -e '^TIME' -e '^INFO' "$1"; }

rows=()
failed=0
run_pair() { # name command...
    local name=$1
    shift
    # Wall time end to end (process start, CUDA's or the session's setup,
    # the work, exit), in ms.
    local t0=$EPOCHREALTIME
    CUTRACE_FILE="$out/native/$name.trace" timeout "${PROGRAM_TIMEOUT:-300}" bash -c 'native "$@"' _ "$@" \
        >"$out/native/$name.out" 2>"$out/native/$name.err"
    local nrc=$? t1=$EPOCHREALTIME
    CUTRACE_FILE="$out/remote/$name.trace" timeout "${PROGRAM_TIMEOUT:-300}" bash -c 'remote "$@"' _ "$@" \
        >"$out/remote/$name.out" 2>"$out/remote/$name.err"
    local rrc=$? t2=$EPOCHREALTIME
    local times
    times=$(awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { n = (b - a) * 1000; r = (c - b) * 1000; printf "%.0f | %.0f | %.2fx", n, r, r / (n > 0 ? n : 1) }')
    local same=no
    if diff <(compared "$out/native/$name.out") <(compared "$out/remote/$name.out") >"$out/$name.diff"; then
        same=yes
    fi
    local verdict=PASS
    if ((nrc == 77)); then
        verdict="skipped (not installed natively)"
    elif ((nrc != 0)); then
        verdict="native failed"
    elif ((rrc != 0)) || [[ $same != yes ]]; then
        verdict=FAIL
    elif grep -q "panicked at" "$out/remote/$name.err"; then
        # The stub caught a panic of its own: a bug even when the output matches.
        verdict="FAIL (stub panicked)"
    fi
    rows+=("| $name | $nrc | $rrc | $same | $verdict | $times |")
    echo "$name: native rc $nrc, remote rc $rrc, identical output: $same -> $verdict"
    if [[ $verdict != PASS ]]; then
        [[ $verdict == FAIL* ]] && failed=1
        [[ $verdict == skipped* ]] && return 0
        {
            echo "### $name: $verdict"
            echo '```'
            echo "--- diff (native < > remote)"
            head -n 40 "$out/$name.diff"
            echo "--- remote stderr (tail)"
            tail -n 40 "$out/remote/$name.err"
            echo '```'
        } >>"$out/failures.md"
    fi
}
export -f native remote
export stub cuda_lib addr pin native_front remote_front

: >"$out/failures.md"
programs=$(cat "$progs/ci.list" "$progs/gpu.list")
case ${PROGRAMS:-all} in
all) ;;
none) programs="" ;;
*) programs=$PROGRAMS ;;
esac
# The Python programs: stock PyTorch, then other frameworks (exit 77 natively:
# not installed there). PROGRAMS may name them too.
python_check() { # name -> run_pair arguments
    local checks=$repo/tests/programs
    case $1 in
    torch_check) run_pair torch_check python3 "$checks/torch_check.py" ;;
    # Transformer inference and training in fp32/bf16/fp16 autocast, cuFFT,
    # torch.compile (Inductor/Triton), CUDA graphs; then the cudaMallocAsync
    # allocator (the stream-ordered allocator end to end).
    torch_compat) run_pair torch_compat python3 "$checks/torch_compat.py" ;;
    torch_mallocasync)
        run_pair torch_mallocasync env PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync \
            TORCH_COMPAT_CASES=fp32_infer,fp32_train,graphs python3 "$checks/torch_compat.py" ;;
    cupy_check | numba_check | jax_check)
        run_pair "$1" python3 "$checks/frameworks_check.py" "${1%_check}" ;;
    esac
}
python_checks="torch_check torch_compat torch_mallocasync cupy_check numba_check jax_check"
for p in $programs; do
    [[ $p == bench_loop* ]] && continue
    if [[ " $python_checks " == *" $p "* ]]; then python_check "$p"; else run_pair "$p" "$progs/$p"; fi
done
if [[ ${PROGRAMS:-all} == all ]]; then
    for p in $python_checks; do python_check "$p"; done
fi

# Rows of bench_loop: native against one remote run (NATIVE REMOTE JSON).
loop_rows() {
    python3 - "$@" <<'PY'
import json, re, sys
def parse(path):
    rows = {}
    for line in open(path):
        m = re.match(r"TIME kernel_us=(\d+) launches=(\d+) total_ms=([\d.]+) per_launch_us=([\d.]+)", line)
        if m:
            rows[int(m[1])] = {"launches": int(m[2]), "total_ms": float(m[3]), "per_launch_us": float(m[4])}
    return rows
native, remote = parse(sys.argv[1]), parse(sys.argv[2])
out = []
for us in sorted(native):
    if us in remote:
        ratio = remote[us]["total_ms"] / native[us]["total_ms"]
        out.append({"kernel_us": us, "native": native[us], "remote": remote[us], "ratio": round(ratio, 3)})
        print(f"| {us} us kernels + 4 KiB copy every 10th | {native[us]['per_launch_us']:.1f} | {remote[us]['per_launch_us']:.1f} | {ratio:.2f}x |")
def sync(path):
    for line in open(path):
        m = re.match(r"TIME sync_round_trip iterations=(\d+) median_us=([\d.]+) p99_us=([\d.]+)", line)
        if m:
            return {"median_us": float(m[2]), "p99_us": float(m[3])}
sn, sr = sync(sys.argv[1]), sync(sys.argv[2])
sync_row = None
if sn and sr:
    sync_row = {"native": sn, "remote": sr, "ratio": round(sr["median_us"] / sn["median_us"], 3)}
    print(f"| empty launch + synchronize, median (p99) | {sn['median_us']:.1f} ({sn['p99_us']:.1f}) | "
          f"{sr['median_us']:.1f} ({sr['p99_us']:.1f}) | {sync_row['ratio']:.2f}x |")
json.dump({"bench_loop": out, "sync_round_trip": sync_row}, open(sys.argv[3], "w"), indent=2)
PY
}

bench_rows="| (BENCH_LOOP=0: not run) | | | |"
if [[ $bench_loop == 1 ]]; then
    echo "== benchmark: bench_loop.sm90, native then remote"
    native "$progs/bench_loop.sm90" >"$out/native/bench_loop.out" 2>&1
    remote "$progs/bench_loop.sm90" >"$out/remote/bench_loop.out" 2>&1
    cat "$out/native/bench_loop.out" "$out/remote/bench_loop.out"
    bench_rows=$(loop_rows "$out/native/bench_loop.out" "$out/remote/bench_loop.out" "$out/dropin.json")
    grep -q "PASS bench_loop" "$out/remote/bench_loop.out" || failed=1
    grep -q "panicked at" "$out/remote/bench_loop.out" && { echo "bench_loop: the stub panicked"; failed=1; }
fi

torch_rows=""
if [[ ${TORCH_BENCH:-1} == 1 ]]; then
    echo "== benchmark: PyTorch workloads (bench/torch_bench.py), native then remote"
    # shellcheck disable=SC2086 # workload names, split on purpose
    timeout 300 bash -c 'native "$@"' _ python3 "$repo/bench/torch_bench.py" ${TORCH_BENCH_WORKLOADS:-} \
        >"$out/native/torch_bench.out" 2>"$out/native/torch_bench.err"
    # shellcheck disable=SC2086
    GPUPOOL_CALL_STATS=1 timeout 300 bash -c 'remote "$@"' _ python3 "$repo/bench/torch_bench.py" ${TORCH_BENCH_WORKLOADS:-} \
        >"$out/remote/torch_bench.out" 2>"$out/remote/torch_bench.err"
    torch_rows=$(python3 "$repo/bench/torch_bench.py" --report "$out/native/torch_bench.out" "$out/remote/torch_bench.out")
    echo "$torch_rows"
fi

variant_md=""
for variant in ${VARIANTS:-}; do
    name=${variant%%:*}
    IFS=, read -ra settings <<<"${variant#*:}"
    dir="$out/remote-$name"
    mkdir -p "$dir"
    echo "== variant $name (${settings[*]}): bench_loop and PyTorch workloads through gpupool"
    variant_md+=$'\n'"## Variant $name: ${settings[*]}"$'\n\n'
    if [[ $bench_loop == 1 ]]; then
        env "${settings[@]}" bash -c 'remote "$@"' _ "$progs/bench_loop.sm90" >"$dir/bench_loop.out" 2>&1
        grep -q "PASS bench_loop" "$dir/bench_loop.out" || failed=1
        grep -q "panicked at" "$dir/bench_loop.out" && { echo "bench_loop ($name): the stub panicked"; failed=1; }
        variant_md+="| row | native | remote | ratio |"$'\n'"|---|---|---|---|"$'\n'
        variant_md+=$(loop_rows "$out/native/bench_loop.out" "$dir/bench_loop.out" "$dir/dropin.json")$'\n'
    fi
    if [[ ${TORCH_BENCH:-1} == 1 ]]; then
        # shellcheck disable=SC2086
        env "${settings[@]}" GPUPOOL_CALL_STATS=1 timeout 300 bash -c 'remote "$@"' _ python3 \
            "$repo/bench/torch_bench.py" ${TORCH_BENCH_WORKLOADS:-} >"$dir/torch_bench.out" 2>"$dir/torch_bench.err"
        variant_md+=$'\n'$(python3 "$repo/bench/torch_bench.py" --report "$out/native/torch_bench.out" "$dir/torch_bench.out")$'\n'
    fi
done
echo "$variant_md"

{
    echo "## Unmodified programs, native and through gpupool's libcuda"
    echo
    echo "| program | native rc | remote rc | identical output | verdict | native ms | remote ms | wall ratio |"
    echo "|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "## Drop-in benchmark (bench_loop.sm90: per launch, and the synchronous round trip; µs)"
    echo
    echo "| row | native | remote | ratio |"
    echo "|---|---|---|---|"
    echo "$bench_rows"
    echo
    if [[ -n $torch_rows ]]; then
        echo "## PyTorch workloads (bench/torch_bench.py; gpupool run with GPUPOOL_CALL_STATS=1)"
        echo
        echo "$torch_rows"
        echo
    fi
    echo "$variant_md"
    cat "$out/failures.md"
} >"$md"
cat "$md"
exit "$failed"
