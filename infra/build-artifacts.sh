#!/usr/bin/env bash
# Builds what infra/examples/pool deploys, into target/infra/:
#   gpupool-server, gpupool-balancer     uploaded to the artifact bucket
#   gpupool-layer-ARCH.zip               the Lambda layer      } lambda-layer/build.sh
#   gpupool-lambda-example-ARCH.zip      the example function  } (ARCH: x86_64, arm64)
#   monitoring/prometheus-*.tar.gz,      the monitoring host's releases (fetch-monitoring.py:
#   monitoring/grafana-*.tar.gz          official URLs, sha256 pinned in monitoring/releases.json;
#                                        with MONITORING=1, for monitoring.enabled)
#
# The server and balancer link against the build host's glibc: build on a
# system no newer than the oldest target (Amazon Linux 2023, glibc 2.34, runs
# the balancer; the Deep Learning Base AMI is Ubuntu 22.04, glibc 2.35), e.g.
# in an amazonlinux:2023 container (infra/README.md). lambda-layer/build.sh
# checks the Lambda binaries against glibc 2.34 itself.
#
# Usage: infra/build-artifacts.sh [OUT_DIR]   (default target/infra)
# Env:   ARCH        the Lambda architecture (x86_64 default, or arm64; the
#                    example root's lambda_architecture)
#        MONITORING  0: skip the Prometheus and Grafana releases (the example
#                    root's monitoring = { enabled = false })
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-target/infra}
arch=${ARCH:-x86_64}
mkdir -p "$out"

cargo build --release --locked -p gpupool-server -p gpupool-balancer
for bin in gpupool-server gpupool-balancer; do
    strip --strip-debug -o "$out/$bin" "target/release/$bin"
done

ARCH=$arch bash lambda-layer/build.sh "$out/lambda"
cp "$out/lambda/gpupool-layer-$arch.zip" "$out/lambda/gpupool-lambda-example-$arch.zip" "$out/"

if [[ ${MONITORING:-0} != 0 ]]; then
    python3 infra/fetch-monitoring.py "$out"
fi

glibc=$(objdump -T "$out/gpupool-server" "$out/gpupool-balancer" 2>/dev/null |
    grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1 || true)
echo "artifacts in $out (newest glibc symbol: ${glibc:-unknown}; Amazon Linux 2023 has GLIBC_2.34):"
ls -l "$out"
