#!/usr/bin/env bash
# Builds the drop-in libraries and installs them under the names programs
# look for: DEST/libcuda.so.1 (+ libcuda.so) and DEST/libnvidia-ml.so.1
# (+ libnvidia-ml.so). Put DEST first on LD_LIBRARY_PATH.
#
# Usage: client-stub/build-libs.sh [DEST]   (default target/gpupool-lib)
# Env:   PROFILE (release|debug, default release)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
dest=${1:-target/gpupool-lib}
profile=${PROFILE:-release}
flag=()
[[ $profile == release ]] && flag=(--release)

cargo build "${flag[@]}" -p gpupool-libcuda -p gpupool-libnvml
mkdir -p "$dest"
# Debug line tables are for our own backtraces, not for shipping (Lambda
# counts every megabyte); the dynamic symbol table stays.
strip --strip-debug -o "$dest/libcuda.so.1" "target/$profile/libcuda.so"
strip --strip-debug -o "$dest/libnvidia-ml.so.1" "target/$profile/libnvidia_ml.so"
chmod 0755 "$dest/libcuda.so.1" "$dest/libnvidia-ml.so.1"
ln -sf libcuda.so.1 "$dest/libcuda.so"
ln -sf libnvidia-ml.so.1 "$dest/libnvidia-ml.so"
ls -l "$dest"
