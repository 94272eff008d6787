#!/usr/bin/env bash
# Many small inference clients on one GPU (issue 19): N=4 and N=8 clients,
# each an unmodified PyTorch workload too small to fill the GPU
# (bench/share_workload.py: an MLP at batch 8, fp16, a fixed number of
# steps), run
#   (a) natively, one after another (the baseline),
#   (b) natively, all at once (separate processes: time-sliced),
#   (c) through gpupool with exclusive leases, all started at once (the
#       balancer queues them: one whole GPU, one exclusive lease at a time),
#   (d) through gpupool with shared leases (GPUPOOL_LEASE_CLASS=shared,
#       100/N % each), all at once: workers under the server's MPS daemon.
# Aggregate throughput = steps of all clients / time at least one step loop
# ran (process start, context, lease wait and warm-up excluded everywhere),
# and its ratio to (a). Then a fault check: one shared client stores to
# address 0; the others must end with an error within 1 s and a fresh
# shared client must run within 5 s, while an exclusive session on the
# same GPU (outside MPS: a direct session with the server's operator
# token) keeps stepping without an error. Between them, isolation: a small
# client's p99 step time alone and next to a saturating neighbour, native
# and as a 25 % share next to a 75 % one.
#
# Usage: bench/share-gpu.sh BIN_DIR OUT_DIR
#   BIN_DIR: PARTS=pool bash bench/build-device.sh (gpupool-server,
#            gpupool-balancer, stub/libcuda.so.1); python3 with torch.
# Env: SHARE_STEPS (steps per client, default 2000: at 400 the measured
#      window of 4 shared clients was 0.2-0.3 s, and one stall moved the
#      aggregate by a quarter), SHARE_NS ("4 8"),
#      SHARE_TIME_MS (the server's --time-share-ms; default 0, off; it meters
#      shared sessions that time-slice, so measure it with SHARE_MPS=off),
#      SHARE_MPS (the server's --mps: auto, the default, off or on),
#      SHARE_PARTS (what to run: "scale isolation fault", the default, or
#      any of them and "temporal": a 75 % and a 25 % share both saturating
#      for SHARE_TEMPORAL_S seconds, default 10), SHARE_BUDGET_S (seconds after which the remaining
#      parts are skipped and said so; default 420).
# Writes OUT_DIR/share.md and the logs. Budget: well under 9 minutes.
set -uo pipefail

# shellcheck source=bench/lib/script.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/script.sh"
wl="$repo/bench/share_workload.py"
steps=${SHARE_STEPS:-2000}
start_report share.md
# The server stops its MPS daemon when it exits; should it not get to, a
# daemon left behind is told to quit here (its pipe directory is ours).
# shellcheck disable=SC2329 # script_cleanup runs it
on_exit() {
    for pipe in "$work"/mps/*/mps-pipe; do
        [[ -e $pipe/control ]] && echo quit | CUDA_MPS_PIPE_DIRECTORY=$pipe timeout 10 nvidia-cuda-mps-control >/dev/null 2>&1
    done
}
"$bin/gpupool-balancer" keygen --key-file "$work/key" >"$work/pub"
pub=$(cat "$work/pub")
# Tenant "share" and its credential (the balancer keeps its digest).
"$bin/gpupool-balancer" new-tenant share >"$work/new-tenant"
GPUPOOL_BALANCER_SECRET=$(grep '^gpt1_' "$work/new-tenant")
export GPUPOOL_BALANCER_SECRET
grep '^share sha256:' "$work/new-tenant" >"$work/tenants"
# Short leases: a client that exits without releasing frees the GPU soon.
RUST_LOG=info "$bin/gpupool-balancer" serve --listen 127.0.0.1:50061 --key-file "$work/key" \
    --server-secret share-secret --tenants "$work/tenants" --recovery-ms 0 --lease-ttl-ms 5000 \
    >"$out/balancer.log" 2>&1 &
balancer_started "$out/balancer.log"
# --mps auto: the server's own MPS daemon for shared leases (private
# directories under --mps-dir; the compute mode is left as it is).
NO_COLOR=1 RUST_LOG=info "$bin/gpupool-server" --listen 127.0.0.1:4443 --device cuda:0 --instances nvml \
    --balancer https://127.0.0.1:50061 --advertise 127.0.0.1:4443 --balancer-secret share-secret \
    --lease-key "$pub" --server-id share-gpu --warm-workers 8 --resume-grace-ms 0 --tokens bystander \
    --mps "${SHARE_MPS:-auto}" --mps-dir "$work/mps" --time-share-ms "${SHARE_TIME_MS:-0}" --metrics-listen 127.0.0.1:9465 >"$out/server.log" 2>&1 &
for _ in $(seq 1 120); do
    "$bin/gpupool-balancer" status --balancer https://127.0.0.1:50061 --secret share-secret >"$work/status" 2>/dev/null &&
        grep -q share-gpu "$work/status" && break
    sleep 0.5
done
if ! grep -q share-gpu "$work/status" 2>/dev/null; then
    tail -n 20 "$out/server.log"
    say "FAILED: the server did not join the balancer"
    exit 1
fi

native() { timeout 120 python3 "$wl" --steps "$steps" "$@"; }
pooled() {
    LD_LIBRARY_PATH="$bin/stub:$LD_LIBRARY_PATH" GPUPOOL_BALANCER=https://127.0.0.1:50061 GPUPOOL_TENANT=share \
        GPUPOOL_MEMORY_MIB=${SHARE_MEMORY_MIB:-8192} GPUPOOL_WAIT_MS=240000 timeout "${limit:-240}" python3 "$wl" --steps "$steps" "$@"
}
shared() { GPUPOOL_LEASE_CLASS=shared GPUPOOL_COMPUTE_PERCENT=$1 pooled "${@:2}"; }
# A session straight to the server with its operator token, outside the
# balancer: exclusive (never under the MPS daemon). The balancer gives an
# exclusive lease a whole GPU, so within its placement an exclusive session
# never shares a GPU with a shared group; this one does, on purpose.
direct() {
    local pin
    pin=$(sed -n 's/.*certificate SHA-256 \([0-9a-f]\{64\}\).*/\1/p' "$out/server.log" | head -n 1)
    LD_LIBRARY_PATH="$bin/stub:$LD_LIBRARY_PATH" GPUPOOL_SERVER=127.0.0.1:4443 GPUPOOL_TOKEN=bystander \
        GPUPOOL_CERT_SHA256="$pin" timeout "${limit:-240}" python3 "$wl" --steps "$steps" "$@"
}
# The server's log without colour codes (its fields are matched below).
plain_log() { sed 's/\x1b\[[0-9;]*m//g' "$out/server.log"; }
files() { local d=$1 n=$2; for i in $(seq 1 "$n"); do printf '%s,' "$d/$i.json"; done; }

say "## Many clients on one GPU ($(date -u +%F), commit $(cat "$bin/COMMIT" 2>/dev/null || echo unknown))"
say ""
say "$(nvidia-smi --query-gpu=name,compute_mode --format=csv,noheader 2>/dev/null | head -n 1);" \
    "workload: bench/share_workload.py, $steps steps of 4 forward passes of a 4-layer fp16 MLP" \
    "(hidden 2048, batch 8), one synchronize per step. Aggregate = steps of all clients / time" \
    "at least one step loop ran; p99 = worst client's p99 step time."
# Past this many seconds the remaining parts are skipped (and said so), to
# stay inside the 7-minute budget.
budget=${SHARE_BUDGET_S:-420}
parts=" ${SHARE_PARTS:-scale isolation fault} "
wants() { [[ $parts == *" $1 "* ]]; }
wants scale || SHARE_NS=""
for n in ${SHARE_NS-4 8}; do
    if ((SECONDS > budget - 90)); then
        say "" && say "### N=$n skipped: ${SECONDS} s spent of the ${budget} s budget"
        status=1
        continue
    fi
    pct=$((100 / n))
    d="$out/n$n"
    mkdir -p "$d"/{a,b,c,d}
    t0=$(date +%s)
    for i in $(seq 1 "$n"); do native >"$d/a/$i.json" 2>"$d/a/$i.err"; done
    # Fresh barriers: a second round of the same N (SHARE_NS="4 4") found
    # the first round's clients in them and started unaligned.
    rm -rf "$work/b$n" "$work/d$n"
    pids=()
    for i in $(seq 1 "$n"); do native --barrier "$work/b$n" --clients "$n" >"$d/b/$i.json" 2>"$d/b/$i.err" & pids+=($!); done
    wait "${pids[@]}"
    # Exclusive leases queue at the balancer: no barrier (it would wait
    # for clients that cannot start before the others end).
    pids=()
    for i in $(seq 1 "$n"); do pooled >"$d/c/$i.json" 2>"$d/c/$i.err" & pids+=($!); done
    wait "${pids[@]}"
    pids=()
    for i in $(seq 1 "$n"); do
        shared "$pct" --barrier "$work/d$n" --clients "$n" >"$d/d/$i.json" 2>"$d/d/$i.err" &
        pids+=($!)
    done
    wait "${pids[@]}"
    say ""
    say "### N=$n ($(($(date +%s) - t0)) s)"
    say ""
    say "| scenario | clients | aggregate steps/s | vs (a) | p99 step ms |"
    say "|---|---|---|---|---|"
    python3 "$wl" --report "(a) native, one after another=$(files "$d/a" "$n")" \
        "(b) native, all at once=$(files "$d/b" "$n")" \
        "(c) gpupool exclusive, all at once=$(files "$d/c" "$n")" \
        "(d) gpupool shared ${pct} % each, all at once=$(files "$d/d" "$n")" | tee -a "$report"
    grep -l . "$d"/*/*.err >/dev/null 2>&1 && say "" && say "(stderr of the clients: $d/*/*.err)"
done

say ""
say "MPS: $(plain_log | grep -c 'MPS control daemon started') daemon start(s);" \
    "$(plain_log | grep -c 'session handed to a worker process.*mps=true') shared session(s) under MPS," \
    "$(plain_log | grep -c 'session handed to a worker process.*mps=false') outside (server.log)."
# Isolation: a client's p99 step time alone and next to a neighbour that
# saturates the GPU, natively (time-sliced processes) and through gpupool
# with shares (25 % next to 75 %, under MPS). Target: within 1.3x shared.
if ! wants isolation; then
    :
elif ((SECONDS > budget - 100)); then
    say "" && say "### Isolation: skipped (${SECONDS} s spent of the ${budget} s budget)"
    status=1
else
    say ""
    say "### Isolation: p99 step time of a small client, alone and next to a saturating neighbour"
    say ""
    iso="$out/iso"
    mkdir -p "$iso"
    heavy=(--hidden 8192 --batch 512 --layers 8 --steps 1000000)
    # Runs "$@" (a small client) while a heavy one started by $neighbour runs.
    next_to() {
        local tag=$1 neighbour=$2
        shift 2
        rm -rf "$work/iso-$tag"
        $neighbour "${heavy[@]}" --barrier "$work/iso-$tag" --clients 1 >"$iso/$tag-heavy.json" 2>"$iso/$tag-heavy.err" &
        local hp=$!
        for _ in $(seq 1 240); do [[ -n $(ls "$work/iso-$tag" 2>/dev/null) ]] && break; sleep 0.25; done
        "$@" >"$iso/$tag.json" 2>"$iso/$tag.err"
        # $hp is the subshell running the function; its child (timeout,
        # which passes the signal on to python) must end too, or the heavy
        # client keeps the GPU busy through the next measurement.
        pkill -TERM -P "$hp" 2>/dev/null
        kill "$hp" 2>/dev/null
        wait "$hp" 2>/dev/null
        for _ in $(seq 1 40); do pgrep -f -- "--hidden 8192" >/dev/null || break; sleep 0.25; done
    }
    native_heavy() { timeout 120 python3 "$wl" "$@"; }
    shared_heavy() { shared 75 "$@"; }
    native --steps 300 >"$iso/native-alone.json" 2>"$iso/native-alone.err"
    next_to native-next native_heavy native --steps 300
    shared 25 --steps 300 >"$iso/shared-alone.json" 2>"$iso/shared-alone.err"
    next_to shared-next shared_heavy shared 25 --steps 300
    python3 - "$iso" <<'PY' | tee -a "$report"
import json, sys
d = sys.argv[1]
def p99(name):
    try:
        return [json.loads(l) for l in open(f"{d}/{name}.json") if l.startswith("{")][-1]["p99_ms"]
    except (OSError, ValueError, IndexError, KeyError):
        return None
print("| client | alone p99 ms | next to a saturating neighbour p99 ms | ratio |")
print("|---|---|---|---|")
for label, a, b in [("native (time-sliced)", "native-alone", "native-next"),
                    ("gpupool shared 25 % (neighbour 75 %)", "shared-alone", "shared-next")]:
    x, y = p99(a), p99(b)
    ratio = f"{y / x:.2f}x" if x and y else "-"
    print(f"| {label} | {x if x is not None else 'failed'} | {y if y is not None else 'failed'} | {ratio} |")
PY
fi
# Temporal share: a 75 % and a 25 % share, both saturating the GPU for the
# same window. With the server's time share on, the supervisor holds the
# batches of the session past its weighted share of each period; off, only
# MPS's active-thread percentages divide the GPU. Steps of each in the
# window, their ratio and the holds counted.
if wants temporal; then
    if ((SECONDS > budget - 60)); then
        say "" && say "### Temporal share: skipped (${SECONDS} s spent of the ${budget} s budget)"
        status=1
    else
        tdir="$out/temporal"
        mkdir -p "$tdir"
        holds0=$(curl -s 127.0.0.1:9465/metrics 2>/dev/null | awk '/^gpupool_server_time_share_holds_total/ {print $2}')
        window=${SHARE_TEMPORAL_S:-10}
        pids=()
        for pct in 75 25; do
            shared "$pct" --hidden 8192 --batch 512 --layers 8 --seconds "$window" --barrier "$work/temporal" --clients 2 \
                >"$tdir/$pct.json" 2>"$tdir/$pct.err" &
            pids+=($!)
        done
        wait "${pids[@]}"
        holds1=$(curl -s 127.0.0.1:9465/metrics 2>/dev/null | awk '/^gpupool_server_time_share_holds_total/ {print $2}')
        say ""
        say "### Temporal share (--time-share-ms ${SHARE_TIME_MS:-0}): a 75 % and a 25 % share, both saturating, ${window} s"
        say ""
        python3 - "$tdir" "${holds0:-0}" "${holds1:-0}" <<'PY' | tee -a "$report"
import json, sys
d, h0, h1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def run(pct):
    try:
        return [json.loads(l) for l in open(f"{d}/{pct}.json") if l.startswith("{")][-1]
    except (OSError, ValueError, IndexError):
        return None
a, b = run(75), run(25)
print("| share | steps | steps/s | p50 / p99 step ms |")
print("|---|---|---|---|")
for pct, r in (("75 %", a), ("25 %", b)):
    print(f"| {pct} | " + (f"{r['steps']} | {r['steps_per_s']} | {r['p50_ms']} / {r['p99_ms']} |" if r else "failed | - | - |"))
if a and b:
    print(f"\nsteps/s ratio 75 % / 25 %: {a['steps_per_s'] / b['steps_per_s']:.2f}; holds in the window: {h1 - h0:.0f}")
PY
    fi
fi
wants fault || exit $status
if ((SECONDS > budget - 40)); then
    say "" && say "### Fault in a shared group: skipped (${SECONDS} s spent of the ${budget} s budget)"
    exit 1
fi
say ""
say "### Fault in a shared group"
f="$out/fault"
mkdir -p "$f"
n=3
# Long runs, so that they are still stepping when the fault comes; their
# barrier files say that each finished its warm-up.
# An exclusive session on the same GPU (outside the MPS group): it must
# keep stepping, without an error, through the group's fault.
limit=240 direct --steps 100000 --barrier "$work/exclusive" --clients 1 >"$f/exclusive.json" 2>"$f/exclusive.err" &
bystander=$!
victims=()
for i in $(seq 1 "$n"); do
    shared 20 --steps 100000 --barrier "$work/fault" --clients "$n" >"$f/$i.json" 2>"$f/$i.err" &
    victims+=($!)
done
for _ in $(seq 1 240); do
    [[ $(ls "$work/fault" 2>/dev/null | wc -l) -ge $n && -n $(ls "$work/exclusive" 2>/dev/null) ]] && break
    sleep 0.25
done
sleep 1
say "- $n victims started at $(date -u +%T), warm: $(ls "$work/fault" 2>/dev/null | wc -l) of $n;" \
    "the exclusive session (operator token, outside MPS): $([[ -n $(ls "$work/exclusive" 2>/dev/null) ]] && echo warm || echo 'NOT warm')"
# The faulting client must return (with its error) well within a minute.
limit=60 shared 20 --fault >"$f/fault.json" 2>"$f/fault.err"
say "- faulting client returned with status $? at $(date -u +%T)"
t_fault=$(date +%s.%N)
ended=0
for p in "${victims[@]}"; do
    # Each victim must be gone within 1 s of the faulting launch's return.
    for _ in $(seq 1 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null; else ended=$((ended + 1)); fi
done
t_end=$(date +%s.%N)
wait "${victims[@]}" 2>/dev/null
say "- faulting client: $(cat "$f/fault.json" 2>/dev/null | tail -n 1)"
say "- victims ended by themselves within $(python3 -c "print(round($t_end - $t_fault, 2))") s: $ended of $n" \
    "(their first error lines: $(for i in $(seq 1 "$n"); do grep -E 'error|Error' "$f/$i.err" | head -n 1 | cut -c1-160; echo ' / '; done | tr -d '\n'))"
[[ $ended == "$n" ]] || status=1
t0=$(date +%s.%N)
if limit=60 shared 20 --steps 50 >"$f/fresh.json" 2>"$f/fresh.err"; then
    say "- a fresh shared client ran $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s after (start to end): $(tail -n 1 "$f/fresh.json")"
else
    say "- a fresh shared client FAILED: $(tail -n 2 "$f/fresh.err" | tr '\n' ' ')"
    status=1
fi
if [[ -z $(ls "$work/exclusive" 2>/dev/null) ]]; then
    # It never finished its warm-up: no exclusive lease beside the group?
    say "- the exclusive session on the same GPU never started stepping: $(tail -n 1 "$f/exclusive.err" | cut -c1-160)"
    status=1
elif kill -0 "$bystander" 2>/dev/null && ! grep -qE 'error|Error' "$f/exclusive.err"; then
    say "- the exclusive session on the same GPU kept stepping through the fault, without an error"
else
    say "- the exclusive session on the same GPU was affected: $(grep -E 'error|Error' "$f/exclusive.err" | head -n 1 | cut -c1-160)"
    status=1
fi
kill "$bystander" 2>/dev/null
wait "$bystander" 2>/dev/null
say "- server counters: $(curl -s 127.0.0.1:9465/metrics 2>/dev/null | grep -E '^gpupool_server_(mps_|worker_exits|time_share)' | tr '\n' ' ')"
exit $status
