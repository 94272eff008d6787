#!/usr/bin/env bash
# Diagnosis of the lost child-grid printf (dynamic parallelism) through
# gpupool, on the GPU machine: builds the probes with the machine's CUDA,
# runs each natively and through gpupool's stub, and writes OUT_DIR/out.txt.
# Cases: the runtime program cdp_bisect (nvcc -rdc; its child printf is lost
# through gpupool from the first launch on, 2026-12-06), and the driver-API
# probe on that program's linked image as fatbin and as cubin, by module
# and library loads, parent first; natively also with every function of the
# module loaded first by name (as the server describes a module) and in
# reverse; remotely with the server's own loading mode (EAGER since
# 2026-12-06) and with CUDA_MODULE_LOADING=LAZY (the workers inherit it).
# Usage: bench/probes/cdp-printf.sh BIN_DIR OUT_DIR   (BIN_DIR as for dropin.sh)
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
B=$(cd "${1:?BIN_DIR}" && pwd) || exit 2
# shellcheck source=bench/lib/server.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/server.sh"
O=${2:?OUT_DIR}
mkdir -p "$O" && O=$(cd "$O" && pwd)
CU=${GPUPOOL_CUDA_HOME:-/usr/local/cuda}
LIB=$CU/targets/x86_64-linux/lib
[[ -d $LIB ]] || LIB=$CU/lib64
W=$(mktemp -d)
"$CU/bin/nvcc" -arch=sm_90 -rdc=true -o "$W/cdp_bisect" "$here/cdp_bisect.cu" -lcudadevrt || exit 1
"$CU/bin/nvcc" -arch=sm_90 -rdc=true -c "$here/cdp_kernels.cu" -o "$W/k.o" &&
    "$CU/bin/nvcc" -arch=sm_90 -dlink "$W/k.o" -lcudadevrt -cubin -o "$W/k.cubin" || exit 1
cc -O2 -I"$CU/include" -o "$W/cdp_probe" "$here/cdp_probe.c" -L"$B/stub" -l:libcuda.so.1 || exit 1
objcopy -O binary --only-section=.nv_fatbin "$W/cdp_bisect" "$W/cdp.fatbin" || exit 1
python3 - "$W" <<'PY'
import struct, sys
w = sys.argv[1]
d = open(f"{w}/cdp.fatbin", "rb").read()
_, _, hsize, fsize = struct.unpack_from("<IHHQ", d, 0)
open(f"{w}/cdp_full.fatbin", "wb").write(d[:hsize + fsize])
kind, _, ehs, psize = struct.unpack_from("<HHIQ", d, hsize)
open(f"{w}/cdp.cubin", "wb").write(d[hsize + ehs:hsize + ehs + psize])
PY
cases=("cdp_full.fatbin module _Z11parent_saysi 3" "cdp_full.fatbin library _Z11parent_saysi 3"
    "cdp.cubin module _Z11parent_saysi 3" "cdp.cubin module _Z11parent_saysi 1"
    "k.cubin module parent 1" "k.cubin library parent 1")
native=("${cases[@]}" "cdp.cubin module _Z11parent_saysi 1 sorted" "cdp.cubin module _Z11parent_saysi 1 reverse"
    "k.cubin module parent 1 sorted" "k.cubin module parent 1 reverse")
for c in "${native[@]}"; do
    read -r img mode kernel grid order <<<"$c"
    echo "== native: $c" >>"$O/out.txt"
    LD_LIBRARY_PATH=$LIB timeout 30 "$W/cdp_probe" "$W/$img" "$mode" "$kernel" "$grid" "${order:-none}" >>"$O/out.txt" 2>&1
done
echo "== native: cdp_bisect tail" >>"$O/out.txt"
LD_LIBRARY_PATH=$LIB timeout 30 "$W/cdp_bisect" tail >>"$O/out.txt" 2>&1
for loading in default LAZY; do
    log="$O/server-$loading.log"
    # default: the server's own choice (eager); LAZY: the operator's.
    mode=()
    [[ $loading == LAZY ]] && mode=(CUDA_MODULE_LOADING=LAZY)
    start_server "$log" env "${mode[@]}" "$B/gpupool-server" --device cuda:0 --tokens p || exit 1
    r() { LD_LIBRARY_PATH="$B/stub" GPUPOOL_SERVER=$addr GPUPOOL_TOKEN=p GPUPOOL_CERT_SHA256=$pin timeout 30 "$@"; }
    for c in "${cases[@]}"; do
        read -r img mode kernel grid <<<"$c"
        echo "== remote ($loading loading on the server): $c" >>"$O/out.txt"
        r "$W/cdp_probe" "$W/$img" "$mode" "$kernel" "$grid" >>"$O/out.txt" 2>&1
    done
    echo "== remote ($loading loading on the server): cdp_bisect tail" >>"$O/out.txt"
    r "$W/cdp_bisect" tail >>"$O/out.txt" 2>&1
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null
done
rm -rf "$W"
cat "$O/out.txt"
