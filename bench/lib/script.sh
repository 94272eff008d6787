# shellcheck shell=bash
# Sourced by the GPU scripts called as `SCRIPT BIN_DIR OUT_DIR [...]`, with
# their arguments: sets `repo` (the checkout), `bin` (BIN_DIR) and `out`
# (OUT_DIR, made), both absolute; puts the CUDA toolkit's libraries
# (GPUPOOL_CUDA_HOME, default /usr/local/cuda) on LD_LIBRARY_PATH; makes
# `work`, a temporary folder; sets `status=0`. At exit every background job
# is ended, `on_exit` runs when the script defined it, and `work` goes.
# `start_report NAME` starts the report OUT_DIR/NAME; `say` prints a line
# and appends it there.
# shellcheck disable=SC2034 # used by the scripts that source this
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=$(cd "${1:?BIN_DIR}" && pwd) || exit 2
out=${2:?OUT_DIR}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
export GPUPOOL_CUDA_HOME=${GPUPOOL_CUDA_HOME:-/usr/local/cuda}
cuda_lib="$GPUPOOL_CUDA_HOME/targets/x86_64-linux/lib"
[[ -d $cuda_lib ]] || cuda_lib="$GPUPOOL_CUDA_HOME/lib64"
export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0
report=/dev/null

start_report() {
    report="$out/$1"
    : >"$report"
}

say() { echo "$*" | tee -a "$report"; }

work=$(mktemp -d)
# shellcheck disable=SC2329 # the EXIT trap runs it
script_cleanup() {
    # shellcheck disable=SC2046 # one pid a word
    kill $(jobs -p) 2>/dev/null
    wait 2>/dev/null
    declare -F on_exit >/dev/null && on_exit
    rm -rf "$work"
}
trap script_cleanup EXIT

# balancer_started LOG: waits up to 10 s for the balancer logging to LOG to
# print its certificate's SHA-256 and exports it as
# GPUPOOL_BALANCER_CERT_SHA256; else shows the log's tail, says so and
# exits the script.
balancer_started() {
    local log=$1 _
    for _ in $(seq 1 100); do
        grep -q "certificate SHA-256" "$log" && break
        sleep 0.1
    done
    GPUPOOL_BALANCER_CERT_SHA256=$(sed -n 's/.*certificate SHA-256 \([0-9a-f]\{64\}\).*/\1/p' "$log" | head -n 1)
    export GPUPOOL_BALANCER_CERT_SHA256
    if [[ -z $GPUPOOL_BALANCER_CERT_SHA256 ]]; then
        tail -n 20 "$log"
        say "FAILED: the balancer did not start"
        exit 1
    fi
}
