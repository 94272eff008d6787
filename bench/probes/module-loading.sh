#!/usr/bin/env bash
# Issue 17, cuBLAS's first use on a fresh server: where its time goes, under
# eager module loading (CUDA_MODULE_LOADING=EAGER, which the workers
# inherit; the server's default from 2026-12-06 to 2026-12-07, for the lost
# child-grid printf of docs/diagnosis.md) and under CUDA's lazy loading,
# with functions of modules up to 32 described at load (`lazy`) or all at
# first use (`lazy0`: `--describe-eagerly-max 0`, the default since
# 2026-12-07). On the GPU machine:
# - cublas_halfgemm (sm_90 build) natively three times (the first warms the
#   page cache), then per mode a fresh server and two processes through the
#   stub, with GPUPOOL_CALL_STATS=1 (the `cuLibraryGetKernel` waits) and the
#   server's per-module debug line ("module loaded": bytes, functions and
#   the microseconds of receiving, caching (a small image's hash check
#   included) and loading the image);
# - dynamic_parallelism (nvcc -rdc) natively and through the stub in each
#   mode: its child-grid printf must be there whatever the mode.
# Writes OUT_DIR/module-loading.txt (the summary) and the logs beside it.
# Usage: bench/probes/module-loading.sh BIN_DIR OUT_DIR   (BIN_DIR as for dropin.sh)
# Env: MODES (the cuBLAS runs, in order; default "eager lazy lazy0 eager lazy lazy0").
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
B=$(cd "${1:?BIN_DIR}" && pwd) || exit 2
O=${2:?OUT_DIR}
mkdir -p "$O" && O=$(cd "$O" && pwd)
CU=${GPUPOOL_CUDA_HOME:-/usr/local/cuda}
with_server="$repo/bench/probes/with-server.sh"
progs=$(mktemp -d)
F=(-O2 -std=c++17 -cudart static -I"$CU/include" -L"$CU/lib64" -Xlinker -rpath -Xlinker "$CU/lib64"
   -gencode 'arch=compute_90,code=[sm_90,compute_90]')
"$CU/bin/nvcc" "${F[@]}" -o "$progs/hg" "$repo/tests/programs/cublas_halfgemm.cu" -lcublas &
"$CU/bin/nvcc" "${F[@]}" -o "$progs/dp" "$repo/tests/programs/dynamic_parallelism.cu" -rdc=true -lcudadevrt &
wait
[[ -x $progs/hg && -x $progs/dp ]] || { echo "build failed" >&2; exit 1; }

# The server's settings per mode: its environment, then its arguments.
# eager: the server's default until 2026-12-07; lazy0: its default since.
mode_env() { case $1 in eager) echo CUDA_MODULE_LOADING=EAGER ;; lazy | lazy0) echo CUDA_MODULE_LOADING=LAZY ;; esac; }
mode_args() { case $1 in eager | lazy) echo --describe-eagerly-max 32 ;; lazy0) echo --describe-eagerly-max 0 ;; esac; }

# Totals of the server's "module loaded" lines in log $1.
module_summary() {
    sed -i 's/\x1b\[[0-9;]*m//g' "$1"
    echo "top 5 by load: load_us bytes functions receive_us cache_us"
    grep "module loaded" "$1" |
        sed -E 's/.*bytes=([0-9]+).*functions=([0-9]+).*receive_us=([0-9]+).*cache_us=([0-9]+).*load_us=([0-9]+).*/\5 \1 \2 \3 \4/' |
        sort -rn | head -5
    grep "module loaded" "$1" |
        sed -E 's/.*bytes=([0-9]+).*receive_us=([0-9]+).*cache_us=([0-9]+).*load_us=([0-9]+).*/\1 \2 \3 \4/' |
        awk '{n++; b+=$1; r+=$2; c+=$3; l+=$4}
             END {printf "modules %d, %.1f MB; receive %d us, cache %d us, load %d us\n", n, b/1e6, r, c, l}'
}

{
    echo "== cublas_halfgemm natively"
    cat "$CU"/lib64/libcublas*.so* >/dev/null 2>&1
    for _ in 1 2 3; do /usr/bin/time -f "native wall %e s" "$progs/hg" >/dev/null; done
    for mode in ${MODES:-eager lazy lazy0 eager lazy lazy0}; do
        echo "== cublas_halfgemm through the stub, $mode, fresh server"
        # shellcheck disable=SC2046 # a list of VAR=value words
        env $(mode_env $mode) RUST_LOG=info,gpupool_server::session=debug SERVER_LOG="$O/hg-$mode.log" \
            SERVER_ARGS="$(mode_args $mode)" bash "$with_server" "$B" bash -c \
            "for i in 1 2; do GPUPOOL_CALL_STATS=1 /usr/bin/time -f 'remote wall %e s' '$progs/hg' 2>&1 >/dev/null |
                 grep 'wall\|cuLibraryGetKernel '; done"
        module_summary "$O/hg-$mode.log"
    done
    echo "== dynamic_parallelism"
    "$progs/dp" >"$O/dp-native.out" 2>&1
    echo "native rc $?"
    for mode in eager lazy lazy0; do
        # shellcheck disable=SC2046
        env $(mode_env $mode) SERVER_ARGS="$(mode_args $mode)" timeout 60 bash "$with_server" "$B" "$progs/dp" \
            >"$O/dp-$mode.out" 2>&1
        rc=$?
        if diff <(grep -v '^TIME' "$O/dp-native.out") <(grep -v '^TIME' "$O/dp-$mode.out") >/dev/null; then
            echo "$mode rc $rc, output identical to native"
        else
            echo "$mode rc $rc, output DIFFERS from native"
        fi
    done
} 2>&1 | tee "$O/module-loading.txt"
