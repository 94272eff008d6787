#!/usr/bin/env bash
# Builds the PyTorch example function's Lambda container image (x86_64):
# stages a Docker build context (this folder's Dockerfile, handler.py and
# model.py, and gpupool's layer as lambda-layer/build.sh unpacks it, under
# layer/) and runs `docker build`. Fails if the image is over Lambda's
# 10 GB limit for container images.
#
# Not run yet: written where there is no Docker daemon (docs/lambda.md).
#
# Usage: lambda-layer/python/torch/build-image.sh [TAG]   (default gpupool-torch-lambda:latest)
# Env:   LAYER_DIR        the unpacked x86-64 layer (default
#                         target/lambda-layer/layer-x86_64; built with
#                         lambda-layer/build.sh when missing)
#        DOCKER           the docker command (default docker)
#        TORCH_VERSION    torch version to install (default: the Dockerfile's, 2.11.0)
#        TORCH_INDEX_URL  the index to install it from (default: the Dockerfile's, PyPI)
# Then push it to ECR and deploy it (README.md, "Python functions"):
#   docker tag TAG ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:VERSION
#   docker push ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:VERSION
#   Terraform: module "lambda" { image_uri = "ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:VERSION" ... }
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cd "$repo"
tag=${1:-gpupool-torch-lambda:latest}
docker=${DOCKER:-docker}
layer=${LAYER_DIR:-target/lambda-layer/layer-x86_64}
# Lambda's limit for a container image (all its layers, uncompressed).
max_bytes=$((10 * 1024 * 1024 * 1024))

if [[ ! -e $layer/lib/libcuda.so.1 ]]; then
    [[ -z ${LAYER_DIR:-} ]] || { echo "build-image.sh: $layer has no lib/libcuda.so.1" >&2; exit 1; }
    ARCH=x86_64 bash lambda-layer/build.sh
fi
for f in lib/libcuda.so.1 lib/libnvidia-ml.so.1 extensions/gpupool-extension; do
    [[ -e $layer/$f ]] || { echo "build-image.sh: $layer/$f is missing (lambda-layer/build.sh)" >&2; exit 1; }
done

context=target/lambda-torch-image
rm -rf "$context"
mkdir -p "$context"
cp "$here/Dockerfile" "$here/handler.py" "$here/model.py" "$context/"
# -L: the layer's .so links become files, as in the layer zip.
cp -rL "$layer" "$context/layer"

args=()
[[ -z ${TORCH_VERSION:-} ]] || args+=(--build-arg "TORCH_VERSION=$TORCH_VERSION")
[[ -z ${TORCH_INDEX_URL:-} ]] || args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
# --provenance=false: Lambda accepts a single-platform image manifest, not
# the index that BuildKit writes with provenance attestations.
"$docker" build --platform linux/amd64 --provenance=false "${args[@]}" -t "$tag" "$context"

bytes=$("$docker" image inspect --format '{{.Size}}' "$tag")
echo "build-image.sh: $tag is $(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1073741824 }') GiB (Lambda's limit: 10 GiB)"
if ((bytes > max_bytes)); then
    echo "build-image.sh: $tag is over Lambda's 10 GB limit for container images" >&2
    exit 1
fi
