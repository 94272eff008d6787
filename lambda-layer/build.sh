#!/usr/bin/env bash
# Builds gpupool's Lambda layer zip (provided.al2023, x86-64):
#   lib/libcuda.so.1, lib/libcuda.so        the drop-in CUDA driver
#   lib/libnvidia-ml.so.1, lib/libnvidia-ml.so
#   extensions/gpupool-extension           leases the GPU during INIT
# Lambda puts /opt/lib on LD_LIBRARY_PATH and starts /opt/extensions/*.
# Symlinks become copies (zip tools and the Lambda console treat links
# differently); entries are sorted with fixed timestamps, so the zip is
# byte-for-byte reproducible from the same binaries.
#
# Usage: lambda-layer/build.sh [OUT_DIR]   (default target/lambda-layer)
# Env:   LAYER_MAX_MIB  unzipped size budget for the layer (default 50: a
#                       function and its layers get 250 MB unzipped in all)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-target/lambda-layer}
max_mib=${LAYER_MAX_MIB:-50}
arch=$(uname -m)
[[ $arch == x86_64 ]] || { echo "build.sh: builds on x86-64 hosts only (this is $arch)" >&2; exit 2; }

stage="$out/stage"
rm -rf "$stage"
mkdir -p "$stage/lib" "$stage/extensions"
bash client-stub/build-libs.sh "$stage/lib.tmp" >/dev/null
for f in libcuda.so.1 libnvidia-ml.so.1; do
    cp "$stage/lib.tmp/$f" "$stage/lib/$f"
    cp "$stage/lib.tmp/$f" "$stage/lib/${f%.1}"
done
rm -rf "$stage/lib.tmp"
cargo build --release -p gpupool-lambda-layer --bin gpupool-extension
strip --strip-debug -o "$stage/extensions/gpupool-extension" target/release/gpupool-extension
chmod 0755 "$stage/extensions/gpupool-extension" "$stage"/lib/*

zip_path="$out/gpupool-layer-x86_64.zip"
python3 - "$stage" "$zip_path" <<'PY'
import os, sys, zipfile
stage, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
    for root, dirs, files in sorted(os.walk(stage)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            info = zipfile.ZipInfo(os.path.relpath(path, stage), date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o100755 if os.access(path, os.X_OK) else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as f:
                z.writestr(info, f.read())
PY
unzipped=$(du -cb "$stage" | tail -n 1 | cut -f 1)
mib=$(awk -v b="$unzipped" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "layer: $zip_path ($(du -h "$zip_path" | cut -f 1) zipped, $mib MiB unzipped, budget $max_mib MiB)"
if ((unzipped > max_mib * 1024 * 1024)); then
    echo "build.sh: the layer is over its budget of $max_mib MiB unzipped" >&2
    exit 1
fi
