#!/usr/bin/env bash
# Issue 19's choice of how a shared worker is confined to its share of the
# SMs, measured natively on the GPU machine: a small client's step time
# (share_confine.cu) alone and next to a heavy neighbour, with
#   - no MPS (time-sliced processes),
#   - MPS, unconfined,
#   - MPS, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE 25 (small) / 75 (heavy),
#   - MPS, green contexts: the small client on SM group 0, the heavy one on
#     groups 1-3 (the device split into quarters),
# and the heavy neighbour's kernels per second in each pairing.
# The MPS daemon is a private one (its own pipe and log directories, quit at
# the end), as gpu-server runs it; no GPU setting is changed.
# Usage: bench/probes/share-confine.sh OUT_DIR   (writes OUT_DIR/confine.md)
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
O=${1:?OUT_DIR}
mkdir -p "$O" && O=$(cd "$O" && pwd)
CU=${GPUPOOL_CUDA_HOME:-/usr/local/cuda}
W=$(mktemp -d)
steps=${CONFINE_STEPS:-1000}
"$CU/bin/nvcc" -O2 -arch=sm_90 -o "$W/share_confine" "$here/share_confine.cu" -lcuda || exit 1
P=$W/pipe L=$W/log
mkdir -p "$P" "$L"
mps_on() { CUDA_MPS_PIPE_DIRECTORY=$P CUDA_MPS_LOG_DIRECTORY=$L nvidia-cuda-mps-control -d; }
mps_off() { echo quit | CUDA_MPS_PIPE_DIRECTORY=$P timeout 10 nvidia-cuda-mps-control >/dev/null 2>&1; sleep 1; }
trap mps_off EXIT

# tag  small-env  small-confine  heavy-env  heavy-confine  (env "-" = none)
pair() {
    local tag=$1 senv=$2 sconf=$3 henv=$4 hconf=$5
    local -a se=() he=()
    [[ $senv != - ]] && se=("$senv")
    [[ $henv != - ]] && he=("$henv")
    env "${se[@]}" "$W/share_confine" small "$sconf" "$steps" >"$O/$tag-alone.json" 2>&1
    rm -f "$W/ready"
    env "${he[@]}" "$W/share_confine" heavy "$hconf" 600 "$W/ready" >"$O/$tag-heavy.json" 2>&1 &
    local hp=$!
    for _ in $(seq 1 200); do [[ -e $W/ready ]] && break; sleep 0.05; done
    env "${se[@]}" "$W/share_confine" small "$sconf" "$steps" >"$O/$tag-next.json" 2>&1
    kill -TERM "$hp" 2>/dev/null
    wait "$hp" 2>/dev/null
    # The heavy client's own rate alone, for what the pairing cost it.
    env "${he[@]}" "$W/share_confine" heavy "$hconf" 3 >"$O/$tag-heavy-alone.json" 2>&1
}
# SIGTERM, not SIGINT: a non-interactive shell starts background commands
# with SIGINT ignored, so an interrupt never ended them and the first
# pairing waited forever.
# A heavy client killed by the pairing's end prints nothing: its rate
# while paired is measured by a second, timed run (3 s) beside a small
# client that steps until it is stopped.
pair_rate() {
    local tag=$1 senv=$2 sconf=$3 henv=$4 hconf=$5
    local -a se=() he=()
    [[ $senv != - ]] && se=("$senv")
    [[ $henv != - ]] && he=("$henv")
    env "${se[@]}" "$W/share_confine" small "$sconf" 100000000 >/dev/null 2>&1 &
    local sp=$!
    sleep 0.5
    env "${he[@]}" "$W/share_confine" heavy "$hconf" 3 >"$O/$tag-heavy-paired.json" 2>&1
    kill -TERM "$sp" 2>/dev/null
    wait "$sp" 2>/dev/null
}

pair nomps - none - none
pair_rate nomps - none - none
export CUDA_MPS_PIPE_DIRECTORY=$P
mps_on
pair mps - none - none
pair_rate mps - none - none
pair atp CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25 none CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=75 none
pair_rate atp CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25 none CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=75 none
pair green - green:0-0 - green:1-3
pair_rate green - green:0-0 - green:1-3
mps_off

python3 - "$O" "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)" <<'PY' | tee "$O/confine.md"
import json, sys
d, gpu = sys.argv[1], sys.argv[2]
def get(name):
    try:
        return [json.loads(l) for l in open(f"{d}/{name}.json") if l.startswith("{")][-1]
    except (OSError, ValueError, IndexError):
        return {}
print(f"# SM confinement of a small client next to a heavy one ({gpu})\n")
print("| setting | small SMs | small p50 / p99 ms alone | next to heavy | p99 ratio | heavy kernels/s alone | beside small |")
print("|---|---|---|---|---|---|---|")
for tag, label in [("nomps", "no MPS (time-sliced)"), ("mps", "MPS, unconfined"),
                   ("atp", "MPS, active threads 25 % / 75 %"), ("green", "MPS, green contexts (group 0 / groups 1-3)")]:
    a, n = get(f"{tag}-alone"), get(f"{tag}-next")
    ha, hp = get(f"{tag}-heavy-alone"), get(f"{tag}-heavy-paired")
    if "p99_ms" not in a or "p99_ms" not in n:
        print(f"| {label} | - | {a.get('error', a)} | {n.get('error', n)} | - | - | - |")
        continue
    print(f"| {label} | {a['sms']} | {a['p50_ms']:.3f} / {a['p99_ms']:.3f} | {n['p50_ms']:.3f} / {n['p99_ms']:.3f} | "
          f"{n['p99_ms'] / a['p99_ms']:.2f}x | {ha.get('kernels_per_s', '-')} | {hp.get('kernels_per_s', '-')} |")
PY
