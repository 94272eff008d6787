#!/usr/bin/env bash
# The balancer on the GPU machine: whole-GPU discovery through NVML on the
# real card (MIG stays as it is: off), a balancer and a gpu-server serving
# the instances NVML reports, an unmodified CUDA program leasing its GPU
# through the balancer via the drop-in libcuda (output compared with its
# native run), and the balancer's gRPC benchmark on this host's cores.
#
# Usage: bench/pool-gpu.sh BIN_DIR OUT_DIR
#   BIN_DIR: what bench/build-device.sh made (.device/bin)
# Writes OUT_DIR/pool.md and the logs.
set -uo pipefail

# shellcheck source=bench/lib/script.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/script.sh"
start_report pool.md

say "## Balancer on the GPU machine ($(date -u +%F), commit $(cat "$bin/COMMIT" 2>/dev/null || echo unknown))"
say ""
say "### Whole-GPU discovery through NVML"
say '```'
if "$bin/gpupool-server-lib-tests" --ignored --exact mig::discover::tests::real_nvml_discovers_whole_gpu --nocapture \
    >"$out/discovery.log" 2>&1 || "$bin/gpupool-server-lib-tests" --ignored real_nvml --nocapture >"$out/discovery.log" 2>&1; then
    grep -v "^$" "$out/discovery.log" | tail -n 12 | tee -a "$report"
else
    tail -n 20 "$out/discovery.log" | tee -a "$report"
    status=1
fi
say '```'

"$bin/gpupool-balancer" keygen --key-file "$work/key" >"$work/pub"
pub=$(cat "$work/pub")
# Tenant "suite" and its credential (the balancer keeps its digest).
"$bin/gpupool-balancer" new-tenant suite >"$work/new-tenant"
GPUPOOL_BALANCER_SECRET=$(grep '^gpt1_' "$work/new-tenant")
grep '^suite sha256:' "$work/new-tenant" >"$work/tenants"
RUST_LOG=info "$bin/gpupool-balancer" serve --listen 127.0.0.1:50051 --key-file "$work/key" \
    --server-secret suite-secret --tenants "$work/tenants" --recovery-ms 0 >"$out/balancer.log" 2>&1 &
# gRPC over TLS, self-signed: every client pins the fingerprint it prints.
balancer_started "$out/balancer.log"
RUST_LOG=info "$bin/gpupool-server" --listen 127.0.0.1:4433 --device cuda:0 --instances nvml \
    --balancer https://127.0.0.1:50051 --advertise 127.0.0.1:4433 --balancer-secret suite-secret \
    --lease-key "$pub" --server-id gpu-machine >"$out/server.log" 2>&1 &
for _ in $(seq 1 120); do
    "$bin/gpupool-balancer" status --balancer https://127.0.0.1:50051 --secret suite-secret >"$work/status" 2>/dev/null &&
        grep -q gpu-machine "$work/status" && break
    sleep 0.5
done
say ""
say "### Pool status with the server registered"
say '```'
tee -a "$report" <"$work/status"
say '```'

say ""
say "### An unmodified program leasing its GPU through the balancer"
progs="$work/programs"
if GPUPOOL_STUB_LIB="$bin/stub" bash "$repo/tests/programs/build.sh" "$progs" >"$out/programs-build.log" 2>&1; then
    for p in vector_add matmul_tiled streams_events; do
        [[ -x "$progs/$p" ]] || continue
        # stdout only: the stub may log warnings on stderr.
        "$progs/$p" >"$work/$p.native" 2>"$work/$p.native.err"
        native=$?
        LD_LIBRARY_PATH="$bin/stub:$LD_LIBRARY_PATH" GPUPOOL_BALANCER=https://127.0.0.1:50051 \
            GPUPOOL_BALANCER_SECRET="$GPUPOOL_BALANCER_SECRET" \
            GPUPOOL_MEMORY_MIB=1024 "$progs/$p" >"$work/$p.pooled" 2>"$work/$p.pooled.err"
        pooled=$?
        # Timing lines (TIME …) differ from run to run.
        if [[ $native == 0 && $pooled == 0 ]] && cmp -s <(grep -v '^TIME' "$work/$p.native") <(grep -v '^TIME' "$work/$p.pooled"); then
            say "- $p: passes through a leased GPU, output identical to the native run (timing lines aside)"
        else
            say "- $p: FAILED (native rc $native, pooled rc $pooled)"
            tail -n 5 "$work/$p.pooled" "$work/$p.pooled.err" | sed 's/^/    /' | tee -a "$report"
            status=1
        fi
    done
else
    say "- programs did not build: see programs-build.log"
    status=1
fi
"$bin/gpupool-balancer" status --balancer https://127.0.0.1:50051 --secret suite-secret >"$work/status-after" 2>&1
say ""
say "Pool after the programs (every lease released):"
say '```'
head -n 1 "$work/status-after" | tee -a "$report"
say '```'

say ""
say "### gRPC benchmark (balancer and clients in one process, $(nproc) cores)"
"$bin/gpupool-balancer-grpc-bench" >"$out/grpc-bench.txt" 2>&1 || status=1
grep -v "^balancer on\|^connected" "$out/grpc-bench.txt" | tee -a "$report"
exit $status
