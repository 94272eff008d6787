#!/usr/bin/env bash
# cuBLAS's own logs for cublas_sgemm, natively and through the drop-in
# libcuda, to see why cublasCreate gives CUBLAS_STATUS_INTERNAL_ERROR through
# the stub. cuBLAS and cuBLASLt log their API calls and internal errors with
# CUBLAS_LOGINFO_DBG / CUBLASLT_LOG_LEVEL.
#
# Usage: bench/diagnostics/cublas-log.sh BIN_DIR OUT_DIR   (on the GPU machine)
# Env:   DIAG_LOG  the stub's GPUPOOL_LOG filter (default cuda=debug)
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=$(cd "$1" && pwd)
out=$2
mkdir -p "$out"
export GPUPOOL_CUDA_HOME=${GPUPOOL_CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
GPUPOOL_STUB_LIB="$bin/stub" bash "$repo/tests/programs/build.sh" "$work/programs" >"$out/build.log" 2>&1 || {
    tail "$out/build.log"
    exit 1
}
"$bin/gpupool-server" --listen 127.0.0.1:4433 --device cuda:0 --tokens diag >"$work/server.out" 2>"$out/server.log" &
for _ in $(seq 1 60); do
    grep -q "SHA-256" "$work/server.out" 2>/dev/null && break
    sleep 0.5
done
pin=$(sed -n 's/.*SHA-256 \([0-9a-f]*\).*/\1/p' "$work/server.out")
logs=(CUBLAS_LOGINFO_DBG=1 CUBLAS_LOGDEST_DBG=stderr CUBLASLT_LOG_LEVEL=5)
env "${logs[@]}" "$work/programs/cublas_sgemm" >"$out/native.out" 2>"$out/native.err"
echo "native rc $?"
env "${logs[@]}" LD_LIBRARY_PATH="$bin/stub:$LD_LIBRARY_PATH" GPUPOOL_SERVER=127.0.0.1:4433 GPUPOOL_TOKEN=diag \
    GPUPOOL_CERT_SHA256="$pin" GPUPOOL_LOG="${DIAG_LOG:-cuda=debug}" "$work/programs/cublas_sgemm" >"$out/stub.out" 2>"$out/stub.err"
echo "stub rc $?"
echo "--- native stderr (cuBLAS log, head)"
grep -v "^\s*$" "$out/native.err" | head -40
echo "--- stub stderr (cuBLAS log lines)"
grep -i -E "cublas|error|fail" "$out/stub.err" | grep -v "gpupool_client\|quinn" | head -60
