#!/usr/bin/env bash
# Builds what infra/examples/pool deploys, into target/infra/:
#   gpupool-server, gpupool-balancer     uploaded to the artifact bucket
#   gpupool-layer-x86_64.zip             the Lambda layer (lambda-layer/build.sh)
#   gpupool-lambda-example.zip           the example function (bootstrap)
#
# The binaries link against the build host's glibc: build on a system no newer
# than the oldest target (Amazon Linux 2023, glibc 2.34, runs the balancer and
# Lambda; the Deep Learning Base AMI is Ubuntu 22.04, glibc 2.35), e.g. in an
# amazonlinux:2023 container (infra/README.md).
#
# Usage: infra/build-artifacts.sh [OUT_DIR]   (default target/infra)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-target/infra}
mkdir -p "$out"

cargo build --release --locked -p gpupool-server -p gpupool-balancer
cargo build --release --locked -p gpupool-lambda-layer --bin gpupool-lambda-example
for bin in gpupool-server gpupool-balancer; do
    strip --strip-debug -o "$out/$bin" "target/release/$bin"
done

bash lambda-layer/build.sh "$out/layer"
cp "$out/layer/gpupool-layer-x86_64.zip" "$out/gpupool-layer-x86_64.zip"

# provided.al2023 runs the executable named bootstrap at the zip's root. Fixed
# timestamps keep the zip, and so the function's code hash, stable across builds.
python3 - "target/release/gpupool-lambda-example" "$out/gpupool-lambda-example.zip" <<'PY'
import sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
    info = zipfile.ZipInfo("bootstrap", date_time=(2020, 1, 1, 0, 0, 0))
    info.external_attr = 0o100755 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    with open(src, "rb") as f:
        z.writestr(info, f.read())
PY

glibc=$(objdump -T "$out/gpupool-server" "$out/gpupool-balancer" target/release/gpupool-lambda-example 2>/dev/null |
    grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1 || true)
echo "artifacts in $out (newest glibc symbol: ${glibc:-unknown}; Amazon Linux 2023 has GLIBC_2.34):"
ls -l "$out"
