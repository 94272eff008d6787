#!/usr/bin/env bash
# Diagnostic (GPU machine): how NVIDIA's driver answers the export tables that
# PyTorch's bf16 paths and cuFFT ask for, and what the same workloads do
# through gpupool's libcuda.so.1 today.
#
#   1. builds export-table-probe.so and runs tests/programs/torch_compat.py
#      natively with PROBE_TABLES naming the tables (log: probe-native.err);
#   2. starts gpupool-server on cuda:0 and runs the same script through the
#      stub with GPUPOOL_LOG=debug (log: remote.err).
#
# Usage: bench/diagnostics/compat-probe.sh BIN_DIR OUT_DIR
#   BIN_DIR as bench/build-device.sh PARTS=dropin makes it.
# Env: PROBE_TABLES (default: 1734DC26-… and 6E163FBE-…, byte order as CUDA
#      stores the UUID); CASES: the torch_compat cases for the stub side,
#      space-separated, one process each (default: all; the native side runs
#      TORCH_COMPAT_CASES, default all, in one process); NATIVE=0 skips it.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin_dir=$(cd "${1:?BIN_DIR}" && pwd) || exit 2
out=${2:?OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 NO_COLOR=1
tables=${PROBE_TABLES:-1734dc26800d47458726c0f1e7dd8bca,6e163fbeb958444d835ce182aff1991e}

gcc -shared -fPIC -O1 -o "$out/probe.so" "$here/export-table-probe.c" -ldl || exit 1

if [[ ${NATIVE:-1} == 1 ]]; then
echo "== native, probing $tables"
PROBE_TABLES=$tables LD_PRELOAD="$out/probe.so" timeout 300 python3 "$repo/tests/programs/torch_compat.py" \
    >"$out/native.out" 2>"$out/probe-native.err"
echo "native rc $?"
cat "$out/native.out"
grep PROBE "$out/probe-native.err" | sort | uniq -c | sort -rn | head -80
fi

echo "== through the stub"
log="$out/server.log"
"$bin_dir/gpupool-server" --listen 127.0.0.1:0 --device cuda:0 --tokens probe \
    --session-memory-mib 16384 >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 1 150); do
    grep -q "listening on" "$log" && break
    sleep 0.2
done
addr=$(sed -n 's/.*listening on \([0-9.:]*\) .*/\1/p' "$log" | head -n 1)
pin=$(sed -n 's/.*SHA-256 \([0-9a-f]*\).*/\1/p' "$log" | head -n 1)
# One process per case: a crash in one does not hide the others.
for c in ${CASES:-fp32_infer bf16_infer fp16_infer fp32_train bf16_train fp16_train fft compile graphs}; do
    LD_LIBRARY_PATH="$bin_dir/stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" GPUPOOL_SERVER="$addr" \
        GPUPOOL_TOKEN=probe GPUPOOL_CERT_SHA256="$pin" GPUPOOL_LOG=${GPUPOOL_LOG:-debug} TORCH_COMPAT_CASES=$c \
        timeout 200 python3 "$repo/tests/programs/torch_compat.py" >"$out/remote-$c.out" 2>"$out/remote-$c.err"
    echo "remote $c rc $?"
    grep -v "^TIME" "$out/remote-$c.out"
    grep -iE "export table|slot|not supported|NOT_SUPPORTED|panic|error" "$out/remote-$c.err" | sed 's/^.*Z //' | sort | uniq -c | sort -rn | head -15
done
