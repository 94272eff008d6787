#!/usr/bin/env bash
# Builds gpupool's Lambda layer zip and the example function's zip
# (provided.al2023, x86-64 or arm64):
#   gpupool-layer-ARCH.zip
#     lib/libcuda.so.1, lib/libcuda.so        the drop-in CUDA driver
#     lib/libnvidia-ml.so.1, lib/libnvidia-ml.so
#     extensions/gpupool-extension           leases the GPU during INIT
#   gpupool-lambda-example-ARCH.zip
#     bootstrap                              the example function
# Lambda puts /opt/lib on LD_LIBRARY_PATH and starts /opt/extensions/*.
# Symlinks become copies (zip tools and the Lambda console treat links
# differently); entries are sorted with fixed timestamps, so the zips are
# byte-for-byte reproducible from the same binaries. The unpacked trees stay
# in OUT_DIR/layer-ARCH and OUT_DIR/function-ARCH.
#
# x86-64 is built with the host's toolchain; arm64 is cross-built with
# cargo-zigbuild (zig as the linker, from PyPI into target/zig-venv) against
# glibc 2.34. The build fails if a binary is for the wrong machine or needs
# a glibc symbol newer than provided.al2023's (2.34), if the layer is over
# its budget, or if function and layer exceed Lambda's 250 MB unzipped.
#
# Usage: lambda-layer/build.sh [OUT_DIR]   (default target/lambda-layer)
# Env:   ARCH           x86_64 (default) or arm64
#        LAYER_MAX_MIB  unzipped size budget for the layer (default 50: a
#                       function and its layers get 250 MB unzipped in all)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-target/lambda-layer}
max_mib=${LAYER_MAX_MIB:-50}
arch=${ARCH:-x86_64}
# Amazon Linux 2023, which provided.al2023 runs on.
max_glibc=2.34
zigbuild_version=0.24.1
zig_version=0.17.1
[[ $(uname -m) == x86_64 ]] || { echo "build.sh: builds on x86-64 hosts only (this is $(uname -m))" >&2; exit 2; }

# build PACKAGE_ARGS...: cargo build for $arch; artifacts land in $release.
case $arch in
x86_64)
    release=target/release
    build() { cargo build --release --locked "$@"; }
    ;;
arm64)
    triple=aarch64-unknown-linux-gnu
    rustup target list --installed | grep -qx $triple || rustup target add $triple
    venv=target/zig-venv
    if [[ ! -x $venv/bin/cargo-zigbuild ]]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q "cargo-zigbuild==$zigbuild_version" "ziglang==$zig_version"
    fi
    release=target/$triple/release
    # The host's strip does not read aarch64 objects: rustc drops the debug
    # information instead (same result as strip --strip-debug).
    build() {
        PATH="$repo/$venv/bin:$PATH" CARGO_PROFILE_RELEASE_STRIP=debuginfo \
            cargo-zigbuild zigbuild --release --locked --target "$triple.$max_glibc" "$@"
    }
    ;;
*)
    echo "build.sh: ARCH must be x86_64 or arm64, not $arch" >&2
    exit 2
    ;;
esac

# shipped SRC DEST: copies a built binary without its debug information.
shipped() {
    if [[ $arch == x86_64 ]]; then strip --strip-debug -o "$2" "$1"; else cp "$1" "$2"; fi
}

stage="$out/layer-$arch"
function_dir="$out/function-$arch"
rm -rf "$stage" "$function_dir"
mkdir -p "$stage/lib" "$stage/extensions" "$function_dir"
build -p gpupool-libcuda -p gpupool-libnvml
build -p gpupool-lambda-layer --bin gpupool-extension --bin gpupool-lambda-example
shipped "$release/libcuda.so" "$stage/lib/libcuda.so.1"
shipped "$release/libnvidia_ml.so" "$stage/lib/libnvidia-ml.so.1"
shipped "$release/gpupool-extension" "$stage/extensions/gpupool-extension"
shipped "$release/gpupool-lambda-example" "$function_dir/bootstrap"
for f in libcuda.so libnvidia-ml.so; do cp "$stage/lib/$f.1" "$stage/lib/$f"; done
chmod 0755 "$stage/extensions/gpupool-extension" "$stage"/lib/* "$function_dir/bootstrap"

# Each file must be for the target machine and need no newer glibc.
want_machine=$([[ $arch == x86_64 ]] && echo "Advanced Micro Devices X86-64" || echo AArch64)
for f in "$stage"/lib/*.so.1 "$stage/extensions/gpupool-extension" "$function_dir/bootstrap"; do
    machine=$(readelf -h "$f" | sed -n 's/^ *Machine: *//p')
    [[ $machine == "$want_machine" ]] || { echo "build.sh: $f is for $machine, not $want_machine" >&2; exit 1; }
    newest=$(readelf -V --wide "$f" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
    if [[ $(printf '%s\n%s\n' "$newest" "$max_glibc" | sort -V | tail -n 1) != "$max_glibc" ]]; then
        echo "build.sh: $f needs glibc $newest, provided.al2023 has $max_glibc (build in an amazonlinux:2023 container: infra/README.md)" >&2
        exit 1
    fi
    echo "build.sh: $(basename "$f"): $machine, glibc >= $newest"
done

# zip_tree DIR ZIP: the tree under DIR, sorted, fixed timestamps and modes.
zip_tree() {
    python3 - "$1" "$2" <<'PY'
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
}
bytes_of() { du -cb "$1" | tail -n 1 | cut -f 1; }
mib_of() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

layer_zip="$out/gpupool-layer-$arch.zip"
function_zip="$out/gpupool-lambda-example-$arch.zip"
zip_tree "$stage" "$layer_zip"
zip_tree "$function_dir" "$function_zip"
layer_bytes=$(bytes_of "$stage")
function_bytes=$(bytes_of "$function_dir")
echo "layer: $layer_zip ($(du -h "$layer_zip" | cut -f 1) zipped, $(mib_of "$layer_bytes") MiB unzipped, budget $max_mib MiB)"
echo "function: $function_zip ($(du -h "$function_zip" | cut -f 1) zipped, $(mib_of "$function_bytes") MiB unzipped)"
if ((layer_bytes > max_mib * 1024 * 1024)); then
    echo "build.sh: the layer is over its budget of $max_mib MiB unzipped" >&2
    exit 1
fi
# Lambda's limit for a function and all its layers, unzipped: 250 MB.
if ((layer_bytes + function_bytes > 250 * 1000 * 1000)); then
    echo "build.sh: function and layer are $(mib_of $((layer_bytes + function_bytes))) MiB unzipped, over Lambda's 250 MB" >&2
    exit 1
fi
