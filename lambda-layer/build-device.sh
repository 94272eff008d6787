#!/usr/bin/env bash
# Builds what lambda-layer/ci-test.sh needs on the GPU machine (which has
# no Rust toolchain and no network) into one folder that a device run
# carries: bin/ (gpupool-server, gpupool-balancer, gpupool-extension,
# gpupool-lambda-example, lib/ with the drop-in libraries), cargo-lambda
# (from PyPI), shim/cargo, which answers cargo-lambda's `cargo metadata`
# with this workspace's metadata (the emulator asks for it at start), and
# wheels/: awslambdaric and its dependencies for CPython 3.12 on x86-64 (the
# GPU machine's Python, which has PyTorch but no network), for
# FUNCTION=torch ci-test.sh with PIP_WHEELS=.../wheels.
#
# Usage: lambda-layer/build-device.sh [OUT_DIR]   (default .device/lambda, git-ignored)
# On the GPU machine: bench/gpu-suite.sh runs it as its `lambda` step.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-.device/lambda}
cargo build --release --locked -p gpupool-server -p gpupool-balancer -p gpupool-lambda-layer \
    -p gpupool-libcuda -p gpupool-libnvml
rm -rf "$out"
mkdir -p "$out/bin/lib" "$out/shim"
for b in gpupool-server gpupool-balancer gpupool-extension gpupool-lambda-example; do
    strip --strip-all -o "$out/bin/$b" "target/release/$b"
done
bash client-stub/build-libs.sh "$out/bin/lib" >/dev/null
venv=target/cargo-lambda-venv
if [[ ! -x $venv/bin/cargo-lambda ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "cargo-lambda==1.9.2"
fi
cp "$venv/bin/cargo-lambda" "$out/cargo-lambda"
# The version ci-test.sh pins (awslambdaric_version).
"$venv/bin/pip" download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$out/wheels" "awslambdaric==$(sed -n 's/^awslambdaric_version=//p' lambda-layer/ci-test.sh)"
cargo metadata --format-version 1 --no-deps >"$out/shim/metadata.json"
cat >"$out/shim/cargo" <<'SH'
#!/bin/sh
# cargo-lambda's emulator runs `cargo metadata` at start; the GPU machine has no cargo.
exec cat "$(dirname "$0")/metadata.json"
SH
chmod +x "$out/shim/cargo"
git rev-parse --short HEAD >"$out/COMMIT"
du -sh "$out"
