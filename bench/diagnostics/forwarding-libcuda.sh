#!/usr/bin/env bash
# Runs tests/programs/cublas_sgemm.cu natively through forwarding-libcuda.c
# (a logging pass-through over NVIDIA's driver). GPU machine only; writes
# native.out/native.err to $OUT. See docs/compatibility.md (cuBLAS).
set -u
B=$(cd "$(dirname "$0")" && pwd)
REAL=$(ldconfig -p | awk '/libcuda.so.1 / {print $NF; exit}'); [ -n "$REAL" ] || REAL=/usr/local/nvidia/lib64/libcuda.so.1
echo "real driver: $REAL"
mkdir -p /tmp/shim && cp "$(readlink -f $REAL)" /tmp/shim/libcuda_real.so
# Every symbol the shim does not define resolves in the real driver (a dependency).
cc -shared -fPIC -I/usr/local/cuda/include -Wl,-soname,libcuda.so.1 -o /tmp/shim/libcuda.so.1 $B/forwarding-libcuda.c -ldl -L/tmp/shim -l:libcuda_real.so -Wl,-rpath,/tmp/shim || exit 1
REAL=/tmp/shim/libcuda_real.so
P=/tmp/progs; mkdir -p $P
/usr/local/cuda/bin/nvcc -O2 -o $P/cublas_sgemm tests/programs/cublas_sgemm.cu -lcublas -gencode 'arch=compute_90,code=[sm_90,compute_90]' 2>&1 | tail -3
L=/usr/local/cuda/targets/x86_64-linux/lib
REAL_LIBCUDA=$REAL LD_LIBRARY_PATH=/tmp/shim:$L timeout 60 $P/cublas_sgemm > $OUT/native.out 2> $OUT/native.err
cat $OUT/native.out
grep -v "cuOccupancyMaxActiveClusters" $OUT/native.err | head -60
grep "cuOccupancyMaxActiveClusters" $OUT/native.err | head -40 | cut -c1-150
