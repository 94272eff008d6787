#!/usr/bin/env bash
# Builds cutrace (see cutrace.c) into OUT_DIR: OUT_DIR/libcuda.so.1, the
# tracer, which needs OUT_DIR/real/libcutrace_real.so at run time (link it to
# the driver library to trace through; bench/dropin.sh does so).
# Usage: bench/cutrace/build.sh OUT_DIR
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$(mkdir -p "${1:?OUT_DIR}" && cd "$1" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A placeholder to link against: at run time the name resolves to the real library.
echo 'void cutrace_placeholder(void) {}' >"$tmp/p.c"
gcc -shared -fPIC -o "$tmp/libcutrace_real.so" -Wl,-soname,libcutrace_real.so "$tmp/p.c"
gcc -O2 -shared -fPIC -Wall -Wextra -o "$out/libcuda.so.1" "$src/cutrace.c" \
    -Wl,-soname,libcuda.so.1 -Wl,--no-as-needed -L"$tmp" -lcutrace_real -ldl -lpthread
echo "built $out/libcuda.so.1"
