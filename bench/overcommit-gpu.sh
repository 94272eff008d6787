#!/usr/bin/env bash
# GPU memory overcommit on the card (issue 21): three tenants, each holding
# 60 % of the server's device bound, used in turns by unmodified programs:
# two CUDA runtime programs (bench/overcommit_turns.cu, built here with nvcc)
# and one PyTorch program (bench/overcommit_torch.py). Their memory together
# (180 % of the bound) does not fit, so each turn swaps the previous tenant
# out and brings this one's memory back in; every word is checked after every
# turn. The same three programs run natively in the same turns first (there
# they fit the card: the baseline of a turn's time). Then the swap-out and
# swap-in rates of a 4 GiB session on the CUDA backend
# (gpupool-server-lib-tests swap_rates_on_a_gpu; target >= 10 GiB/s).
#
# Usage: bench/overcommit-gpu.sh BIN_DIR OUT_DIR
#   BIN_DIR: bench/build-device.sh (PARTS=pool or all: gpupool-server,
#            gpupool-server-lib-tests, stub/libcuda.so.1); nvcc and python3
#            with torch on the machine.
# Env: OVERCOMMIT_DEVICE_MIB (the server's --swap-device-mib, 20480),
#      OVERCOMMIT_ROUNDS (turns per tenant, 3), SWAP_RATE_MIB (4096),
#      OVERCOMMIT_SPARE_MIB (each worker's --swap-spare-mib: one tenant's size).
# Writes OUT_DIR/overcommit.md and the logs; exits non-zero on any failure.
set -uo pipefail

# shellcheck source=bench/lib/script.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/script.sh"
device_mib=${OVERCOMMIT_DEVICE_MIB:-20480}
tenant_mib=$((device_mib * 60 / 100))
rounds=${OVERCOMMIT_ROUNDS:-3}
start_report overcommit.md

"$GPUPOOL_CUDA_HOME/bin/nvcc" -O2 -arch=native -o "$work/turns" "$repo/bench/overcommit_turns.cu" || exit 1

# tenants LABEL PREFIX...: the three tenants in turns, each started with
# PREFIX (a command prefix: env settings); their turn lines in
# $out/LABEL-*.out. Fails when a tenant fails or a turn does not end.
tenants() {
    local label=$1
    shift
    local dir="$work/$label"
    mkdir -p "$dir"
    local pids=() r i
    # One after another: each tenant's allocation swaps the earlier ones
    # out once they are idle (ready).
    for i in 0 1 2; do
        if ((i == 1)); then
            "$@" python3 "$repo/bench/overcommit_torch.py" "$tenant_mib" "$dir" 1 "$rounds" >"$out/$label-1.out" 2>"$out/$label-1.err" &
        else
            "$@" "$work/turns" "$tenant_mib" "$dir" "$i" "$rounds" >"$out/$label-$i.out" 2>"$out/$label-$i.err" &
        fi
        pids+=($!)
        for _ in $(seq 1 6000); do
            [[ -e $dir/ready-$i ]] && break
            kill -0 "${pids[$i]}" 2>/dev/null || { echo "tenant $i ended before it was ready"; tail -5 "$out/$label-$i.err"; return 1; }
            sleep 0.05
        done
        [[ -e $dir/ready-$i ]] || { echo "tenant $i not ready within 300 s"; return 1; }
    done
    for r in $(seq 0 $((rounds - 1))); do
        for i in 0 1 2; do
            touch "$dir/turn-$i-$r"
            for _ in $(seq 1 6000); do
                [[ -e $dir/done-$i-$r ]] && break
                kill -0 "${pids[$i]}" 2>/dev/null || break
                sleep 0.01
            done
            [[ -e $dir/done-$i-$r ]] || { echo "tenant $i failed in round $r"; tail -5 "$out/$label-$i.err"; return 1; }
        done
    done
    local rc=0
    for i in 0 1 2; do
        wait "${pids[$i]}" || rc=1
        tail -n 1 "$out/$label-$i.out"
    done
    return $rc
}

say "# GPU memory overcommit (issue 21)"
say ""
say "- device bound (--swap-device-mib): $device_mib MiB; three tenants of $tenant_mib MiB (60 %) each, $rounds turns each"
say "- tenants 0 and 2: bench/overcommit_turns.cu (CUDA runtime); tenant 1: bench/overcommit_torch.py (PyTorch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null))"
say ""

say "## native (the three fit the card)"
if ! tenants native env | tee -a "$report"; then
    say "FAILED: native"
    status=1
fi

# shellcheck source=bench/lib/server.sh
. "$repo/bench/lib/server.sh"
if ! start_server "$out/server.log" env NO_COLOR=1 RUST_LOG="${OVERCOMMIT_LOG:-info,gpupool_server::session::swap=debug}" \
    "$bin/gpupool-server" --device cuda:0 --tokens overcommit \
    --session-memory-mib $((tenant_mib + 4096)) --swap-device-mib "$device_mib" \
    --swap-host-mib $((3 * tenant_mib + 8192)) --swap-wait-ms 60000 \
    --swap-spare-mib "${OVERCOMMIT_SPARE_MIB:-$tenant_mib}" \
    --metrics-listen 127.0.0.1:9466; then
    say "FAILED: gpupool-server did not start"
    exit 1
fi

say ""
say "## through gpupool (180 % of the device bound: every turn swaps)"
if ! tenants remote env LD_LIBRARY_PATH="$bin/stub:$LD_LIBRARY_PATH" GPUPOOL_SERVER="$addr" GPUPOOL_TOKEN=overcommit \
    GPUPOOL_CERT_SHA256="$pin" | tee -a "$report"; then
    say "FAILED: through gpupool"
    status=1
fi

say ""
say "## turn times (ms: step, full check on the device, sample copied back; remote includes the swap)"
say ""
say "| tenant | round | native ms | gpupool ms | ratio |"
say "|---|---|---|---|---|"
for i in 0 1 2; do
    for r in $(seq 0 $((rounds - 1))); do
        n=$(awk -v r="$r" '$1 == "TURN" && $3 == r {print $4}' "$out/native-$i.out" 2>/dev/null)
        g=$(awk -v r="$r" '$1 == "TURN" && $3 == r {print $4}' "$out/remote-$i.out" 2>/dev/null)
        ratio=$(awk -v n="${n:-0}" -v g="${g:-0}" 'BEGIN { if (n > 0 && g > 0) printf "%.2fx", g / n; else print "-" }')
        say "| $i | $r | ${n:--} | ${g:--} | $ratio |"
    done
done

say ""
say "## server counters"
say '```'
curl -s http://127.0.0.1:9466/metrics | grep -E '^gpupool_server_(memory_swapped_bytes|swapped_(in|out)_bytes_total|call_errors_total)' | tee -a "$report"
say '```'
swapped_in=$(curl -s http://127.0.0.1:9466/metrics | awk '/^gpupool_server_swapped_in_bytes_total/ {print $2}')
expect=$(( (3 * rounds - 1) * tenant_mib * 1048576 ))
if awk -v s="${swapped_in:-0}" -v e="$expect" 'BEGIN { exit !(s + 0 >= e * 0.9) }'; then
    say "swapped in: ${swapped_in} bytes (at least 90 % of the $expect the turns need)"
else
    say "FAILED: swapped in ${swapped_in:-none} bytes, the turns need about $expect"
    status=1
fi

say ""
say "## swap rates, CUDA backend (${SWAP_RATE_MIB:-4096} MiB session; target >= 10 GiB/s)"
say '```'
GPUPOOL_SWAP_MIB=${SWAP_RATE_MIB:-4096} "$bin/gpupool-server-lib-tests" swap_rates_on_a_gpu --ignored --nocapture --test-threads 1 2>&1 |
    grep -oE "run [0-9]+: .*|test result.*|panicked.*" | tee -a "$report"
rc=${PIPESTATUS[0]}
say '```'
((rc == 0)) || { say "FAILED: swap rates"; status=1; }
exit $status
