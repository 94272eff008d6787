#!/usr/bin/env bash
# A PyTorch training loop across a live migration (issue 21's acceptance
# point: "keeps running across a live migration with results identical to
# an unmigrated run"). One balancer and two gpupool-servers, mig-a and
# mig-b, both on the one GPU, each registered with the balancer; then
# bench/migrate_torch.py (deterministic training, STEP lines with exact
# losses, a parameter checksum) leasing its GPU through the drop-in libcuda:
#   (a) unmigrated: it waits halfway and goes on;
#   (b) migrated: while it waits halfway, `gpupool-balancer drain` empties
#       the server holding its lease, which moves the session to the other
#       server ("session migrated" in the server's log, with pause_ms);
#   native: the same program without gpupool, for reference.
# PASS when (a) and (b) print the same STEP and CHECKSUM lines and (b)
# really moved; native against (a) is reported, not required.
#
# The balancer refuses an instance UUID registered by another server, and
# NVML gives both servers the card's UUID: mig-b reads NVML through
# bench/nvml_short_uuid.c (built here with cc), which shortens the whole
# GPU's UUID to a prefix CUDA_VISIBLE_DEVICES still takes for that GPU.
#
# Usage: bench/migrate-torch.sh BIN_DIR OUT_DIR
#   BIN_DIR: bench/build-device.sh (PARTS=pool or all: gpupool-server,
#            gpupool-balancer, stub/libcuda.so.1); python3 with torch and a
#            C compiler on the machine.
# Env: MIGRATE_STEPS (training steps, 200), MIGRATE_MEMORY_MIB (the lease's
#      memory and the servers' --session-memory-mib, 8192),
#      MIGRATE_TIMEOUT_S (longest run of the program, 600),
#      MIGRATE_DEVICE (the servers' --device, cuda:0; `emulated` serves a
#      simulated H100 on the emulated device and skips the native run),
#      MIGRATE_PROGRAM (the program, run with STEPS DIR appended; default
#      `python3 bench/migrate_torch.py`; the cudarc program
#      `BIN_DIR/gpupool-migrate-cudarc`; without a GPU:
#      `python3 bench/probes/migrate_standin.py`),
#      MIGRATE_NVML_LIB (the real libnvidia-ml.so.1; default from ldconfig),
#      MIGRATE_CLIENT_ENV (VAR=value words for the gpupool runs, e.g.
#      GPUPOOL_SHM_PINNED_MIB=0: PyTorch's pinned memory then lives outside
#      host regions shared with the server, which a session holding any
#      refuses to move with; docs/migration.md).
# Writes OUT_DIR/migrate-torch.md and the logs; exits non-zero on failure.
set -uo pipefail

# shellcheck source=bench/lib/script.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/script.sh"
device=${MIGRATE_DEVICE:-cuda:0}
steps=${MIGRATE_STEPS:-200}
memory_mib=${MIGRATE_MEMORY_MIB:-8192}
limit=${MIGRATE_TIMEOUT_S:-600}
if [[ -n ${MIGRATE_PROGRAM:-} ]]; then
    read -ra program <<<"$MIGRATE_PROGRAM"
else
    program=(python3 "$repo/bench/migrate_torch.py")
fi
start_report migrate-torch.md

secret=migrate-secret
url=https://127.0.0.1:50071
"$bin/gpupool-balancer" keygen --key-file "$work/key" >"$work/pub" 2>"$work/keygen.err" || { cat "$work/keygen.err"; exit 1; }
pub=$(cat "$work/pub")
# Tenant "migrate" and its credential (the balancer keeps its digest).
"$bin/gpupool-balancer" new-tenant migrate >"$work/new-tenant" 2>"$work/keygen.err" || { cat "$work/keygen.err"; exit 1; }
tenant_secret=$(grep '^gpt1_' "$work/new-tenant")
grep '^migrate sha256:' "$work/new-tenant" >"$work/tenants"
NO_COLOR=1 RUST_LOG=info "$bin/gpupool-balancer" serve --listen 127.0.0.1:50071 --key-file "$work/key" \
    --server-secret "$secret" --tenants "$work/tenants" --recovery-ms 0 >"$out/balancer.log" 2>&1 &
balancer_started "$out/balancer.log"
pool_status() { "$bin/gpupool-balancer" status --balancer "$url" --secret "$secret"; }

# What the servers serve: the card through NVML (mig-b through the shim),
# or a simulated H100 each (UUIDs of their own) on the emulated device.
b_env=()
if [[ $device == emulated ]]; then
    instances=simulated:h100-80gb
else
    instances=nvml
    real=${MIGRATE_NVML_LIB:-$(ldconfig -p 2>/dev/null | awk '/libnvidia-ml\.so\.1 .*x86-64/ {print $NF; exit}')}
    for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64; do
        [[ -n $real ]] && break
        [[ -e $d/libnvidia-ml.so.1 ]] && real=$d/libnvidia-ml.so.1
    done
    shim="$work/nvml"
    mkdir -p "$shim"
    # The shim needs the real library as a dependency of another name: link
    # against a placeholder of that name, then point the name at the real one.
    # shellcheck disable=SC2016 # $ORIGIN is the linker's
    if [[ -z $real ]] ||
        ! echo 'void gpupool_placeholder(void) {}' | cc -shared -fPIC -x c - -o "$shim/libnvidia-ml-real.so.1" \
            -Wl,-soname,libnvidia-ml-real.so.1 ||
        ! cc -shared -fPIC -O2 -o "$shim/libnvidia-ml.so.1" "$repo/bench/nvml_short_uuid.c" -Wl,--no-as-needed \
            -L"$shim" -l:libnvidia-ml-real.so.1 -Wl,-rpath,'$ORIGIN' -ldl; then
        say "FAILED: could not build the NVML shim for mig-b (libnvidia-ml.so.1: ${real:-not found})"
        exit 1
    fi
    ln -sf "$(readlink -f "$real")" "$shim/libnvidia-ml-real.so.1"
    b_env=(LD_LIBRARY_PATH="$shim:$LD_LIBRARY_PATH")
    # CUDA must take the shortened UUID for the card (mig-b's workers are
    # bound to it by CUDA_VISIBLE_DEVICES).
    uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i "${device#cuda:}" 2>/dev/null | head -n 1)
    count=$(CUDA_VISIBLE_DEVICES=${uuid%-*} python3 -c 'import ctypes
c = ctypes.CDLL("libcuda.so.1"); n = ctypes.c_int()
print(n.value if c.cuInit(0) == 0 and c.cuDeviceGetCount(ctypes.byref(n)) == 0 else -1)' 2>&1)
    if [[ $count != 1 ]]; then
        say "FAILED: CUDA_VISIBLE_DEVICES=${uuid%-*} (the card's UUID shortened) shows $count devices, not 1"
        exit 1
    fi
fi
# start_gpu_server ID PORT [VAR=value...]
start_gpu_server() {
    local id=$1 port=$2
    shift 2
    env "$@" NO_COLOR=1 RUST_LOG=info "$bin/gpupool-server" --listen "127.0.0.1:$port" --device "$device" \
        --instances "$instances" --balancer "$url" --advertise "127.0.0.1:$port" --balancer-secret "$secret" \
        --lease-key "$pub" --server-id "$id" --session-memory-mib "$memory_mib" --mps off \
        >"$out/server-$id.log" 2>&1 &
}
start_gpu_server mig-a 4451
start_gpu_server mig-b 4452 "${b_env[@]}"
for _ in $(seq 1 120); do
    pool_status >"$work/status" 2>&1
    # Both registered, each with its instance.
    [[ $(grep -cE '^  mig-[ab] .* 0/1 ' "$work/status") == 2 ]] && break
    sleep 0.5
done
if [[ $(grep -cE '^  mig-[ab] .* 0/1 ' "$work/status") != 2 ]]; then
    cat "$work/status"
    tail -n 10 "$out"/server-mig-*.log
    say "FAILED: the two servers did not both register an instance"
    exit 1
fi

if [[ -n ${MIGRATE_PROGRAM:-} ]]; then
    say "# ${program[0]##*/} across a live migration (issue 21)"
else
    say "# A PyTorch training loop across a live migration (issue 21)"
fi
say ""
say "- $(date -u +%FT%TZ), commit $(cat "$bin/COMMIT" 2>/dev/null || echo unknown), device $device" \
    "($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo none))"
say "- program: ${program[*]##*/} $steps steps; lease memory $memory_mib MiB; servers mig-a and mig-b on one device"
say "- client settings beyond the defaults: ${MIGRATE_CLIENT_ENV:-none}"
say ""
say '```'
sed -n '/^SERVERS/,/^LEASES/p' "$work/status" | grep -v '^LEASES' | tee -a "$report"
say '```'

# move LABEL: drains the server holding the program's lease and waits for
# its log to say the session migrated (or failed to). Sets `moved` (the
# log lines) and `pause` (pause_ms).
move() {
    local label=$1 holder="" log from t
    moved="" pause=""
    for _ in $(seq 1 60); do
        pool_status >"$work/status" 2>&1
        # LEASES rows: lease, tenant, server, ..., in use.
        holder=$(awk '/^LEASES/ {l = 1; next} l && $1 ~ /^0x/ && $NF == "yes" {print $3; exit}' "$work/status")
        [[ -n $holder ]] && break
        sleep 0.5
    done
    if [[ -z $holder ]]; then
        cat "$work/status"
        say "- $label: no lease in use"
        return 1
    fi
    log="$out/server-$holder.log"
    from=$(($(wc -l <"$log") + 1))
    t=$SECONDS
    timeout 180 "$bin/gpupool-balancer" drain "$holder" --balancer "$url" --server-secret "$secret" \
        --wait-secs 150 >"$out/$label-drain.log" 2>&1 &
    local drain=$!
    # The source's lines: the session's own (bytes, pre-copied, pause) and
    # the supervisor's report to the balancer. A session that refuses to
    # move stays, and the drain would wait for it to end: it is stopped.
    for _ in $(seq 1 300); do
        tail -n +"$from" "$log" | grep -qE "session migrated|migration failed|not migrated" && break
        sleep 0.2
    done
    sleep 1
    moved=$(tail -n +"$from" "$log" | grep -E "session migrated|migration failed|not migrated")
    local drained=0
    if [[ -n $moved ]] && ! grep -qE "migration failed|not migrated" <<<"$moved"; then
        wait "$drain" || drained=$?
    else
        # The drain gives up by itself once the balancer heard of the
        # refusal (the server's next heartbeat).
        for _ in $(seq 1 50); do
            kill -0 "$drain" 2>/dev/null || break
            sleep 0.2
        done
        kill "$drain" 2>/dev/null
        wait "$drain"
        drained=$?
    fi
    say "- $label: drained $holder (rc $drained, $((SECONDS - t)) s): $(head -n 1 "$out/$label-drain.log")"
    grep -E "stays on|still holds" "$out/$label-drain.log" | sed 's/^ */    drain: /' | tee -a "$report"
    if [[ -z $moved ]]; then
        say "- $label: no migration in $holder's log"
        return 1
    fi
    echo "$moved" | sed 's/^/    /' | tee -a "$report"
    pause=$(echo "$moved" | sed -n 's/.*pause_ms=\([0-9]*\).*/\1/p' | head -n 1)
    if [[ $drained != 0 ]] || ! grep -q "session migrated" <<<"$moved" || grep -qE "migration failed|not migrated" <<<"$moved"; then
        return 1
    fi
    pool_status >"$work/status" 2>&1
    say "- $label: the lease is now on $(awk '/^LEASES/ {l = 1; next} l && $1 ~ /^0x/ {print $3; exit}' "$work/status")"
}

# run LABEL MODE [VAR=value...]: the program with those variables; MODE
# `move` migrates it halfway, `stay` lets it go on. Output in OUT/LABEL.out.
run() {
    local label=$1 mode=$2 dir="$work/$1" pid rc=0 t=$SECONDS
    shift 2
    mkdir -p "$dir"
    env "$@" timeout "$limit" "${program[@]}" "$steps" "$dir" >"$out/$label.out" 2>"$out/$label.err" &
    pid=$!
    for _ in $(seq 1 3000); do
        [[ -e $dir/half ]] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ ! -e $dir/half ]]; then
        say "- $label: FAILED: never reached step $((steps / 2))"
        tail -n 5 "$out/$label.err" | sed 's/^/    /' | tee -a "$report"
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        return 1
    fi
    if [[ $mode == move ]] && ! move "$label"; then
        say "- $label: FAILED: the session did not migrate"
        rc=1
    fi
    touch "$dir/go"
    wait "$pid"
    local prc=$?
    local lines
    lines=$(grep -c '^STEP ' "$out/$label.out")
    if ((prc != 0)) || ! grep -q '^DONE' "$out/$label.out" || ((lines != steps)); then
        say "- $label: FAILED: rc $prc, $lines of $steps steps"
        tail -n 5 "$out/$label.err" | sed 's/^/    /' | tee -a "$report"
        rc=1
    else
        local after
        after=$(sed -n 's/^AFTER_GO_MS //p' "$out/$label.out")
        say "- $label: $steps steps in $((SECONDS - t)) s${after:+; the first step after the wait took $after ms}"
    fi
    return $rc
}
# What must match: the losses and the checksum.
results() { grep -E '^(STEP|CHECKSUM) ' "$out/$1.out" 2>/dev/null; }

# The stub under both names: cudarc asks for libcuda.so before
# libcuda.so.1, and the machine's own libcuda.so would answer otherwise.
mkdir -p "$work/stub"
ln -sf "$bin/stub/libcuda.so.1" "$work/stub/libcuda.so.1"
ln -sf "$bin/stub/libcuda.so.1" "$work/stub/libcuda.so"
pooled=(LD_LIBRARY_PATH="$work/stub:$LD_LIBRARY_PATH" GPUPOOL_BALANCER="$url" GPUPOOL_BALANCER_SECRET="$tenant_secret"
    GPUPOOL_MEMORY_MIB="$memory_mib" GPUPOOL_WAIT_MS=60000)
read -ra client_env <<<"${MIGRATE_CLIENT_ENV:-}"
pooled+=("${client_env[@]}")
say ""
say "## Runs"
if [[ $device == emulated ]]; then
    say "- native: skipped (emulated device)"
else
    run native stay || status=1
fi
run unmigrated stay "${pooled[@]}" || status=1
run migrated move "${pooled[@]}" || status=1

say ""
say "## Result"
if [[ $(results unmigrated | wc -l) == $((steps + 1)) ]] && cmp -s <(results unmigrated) <(results migrated); then
    say "- migrated vs unmigrated: identical ($steps STEP lines and the checksum, bit for bit)"
else
    say "- migrated vs unmigrated: DIFFERENT"
    diff <(results unmigrated) <(results migrated) | head -n 6 | sed 's/^/    /' | tee -a "$report"
    status=1
fi
if [[ $device != emulated ]]; then
    if [[ $(results native | wc -l) == $((steps + 1)) ]] && cmp -s <(results native) <(results unmigrated); then
        say "- native vs gpupool: identical"
    else
        first=$(diff <(results native) <(results unmigrated) | grep -m 1 '^<' | cut -c 3-)
        say "- native vs gpupool: different (informational), first at: ${first:-?}"
    fi
fi
say "- pause (the source's pause_ms): ${pause:-none}"
if ((status == 0)); then
    say "PASS"
else
    say "FAIL"
fi
exit $status
