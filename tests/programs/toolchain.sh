#!/usr/bin/env bash
# CUDA 13.0 user-space toolchain (nvcc, headers, static cudart, optionally
# cuBLAS) for building the drop-in libcuda test programs on machines that have
# no GPU and no CUDA install: the NVIDIA wheels on PyPI carry a complete,
# relocatable toolkit layout under nvidia/cu13/ (bin, include, lib, nvvm).
#
# Usage: toolchain.sh [--with-cublas]
#   stdout: `export NAME=VALUE` lines, so callers do `eval "$(toolchain.sh)"`;
#   the same lines are written to $GPUPOOL_CUDA_DIR/env.sh (sourceable).
#   GPUPOOL_NVCC          the nvcc binary
#   GPUPOOL_CUDA_HOME     toolkit root (bin/ include/ lib/ nvvm/)
#   GPUPOOL_CUDA_INCLUDE  holds cuda.h, cuda_runtime.h (and cublas_v2.h)
#   GPUPOOL_CUDA_LIB      holds libcudart_static.a (and libcublas.so)
#
# Env:
#   GPUPOOL_CUDA_DIR   cache directory (default: <repo>/target/cuda-toolchain)
#   GPUPOOL_CUDA_HOME  use this existing toolkit instead of installing one
#                      (e.g. /usr/local/cuda on the GPU machine, which cannot
#                      reach PyPI); nothing is installed then.
#
# Versions are pinned to the newest CUDA 13.0.x builds so that the programs
# match a driver 580 (CUDA 13.0) machine; PTX from a newer nvcc would need a
# newer driver to JIT.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

with_cublas=0
for arg in "$@"; do
    case "$arg" in
        --with-cublas) with_cublas=1 ;;
        *) echo "toolchain.sh: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

# --no-deps below: the wheels' own dependencies are unpinned (nvcc requires
# plain "nvidia-nvvm"), so every package is named here with its version.
core_pkgs=(
    nvidia-cuda-nvcc==13.0.88     # nvcc, ptxas, fatbinary, nvlink, cudafe++
    nvidia-nvvm==13.0.88          # cicc + libdevice (nvcc's front end)
    nvidia-cuda-crt==13.0.88      # include/crt/* (host_config.h, ...)
    nvidia-cuda-runtime==13.0.96  # cuda.h, cuda_runtime.h, libcudart_static.a
    nvidia-cuda-cccl==13.0.85     # include/cccl, which nvcc.profile puts on -isystem
)
# cuBLAS and cuFFT are ~850 MB unpacked and only the GPU programs need them.
cublas_pkgs=(
    nvidia-cublas==13.0.2.14      # last cuBLAS of the 13.0 line
    nvidia-cufft==12.0.0.61       # cuFFT of CUDA 13.0
)

log() { echo "toolchain.sh: $*" >&2; }

emit_env() {
    local home="$1" nvcc="$2" inc="$3" lib="$4"
    printf 'export GPUPOOL_CUDA_HOME=%q\n' "$home"
    printf 'export GPUPOOL_NVCC=%q\n' "$nvcc"
    printf 'export GPUPOOL_CUDA_INCLUDE=%q\n' "$inc"
    printf 'export GPUPOOL_CUDA_LIB=%q\n' "$lib"
}

check_layout() {
    local inc="$1" lib="$2" nvcc="$3" f
    for f in "$inc/cuda.h" "$inc/cuda_runtime.h" "$lib/libcudart_static.a"; do
        [[ -e "$f" ]] || { log "missing $f"; exit 1; }
    done
    [[ -x "$nvcc" ]] || { log "missing $nvcc"; exit 1; }
    if ((with_cublas)) && [[ ! -e "$inc/cublas_v2.h" ]]; then
        log "missing $inc/cublas_v2.h (cuBLAS not installed in this toolkit)"
        exit 1
    fi
}

# An existing toolkit: just describe it.
if [[ -n "${GPUPOOL_CUDA_HOME:-}" ]]; then
    home="$GPUPOOL_CUDA_HOME"
    lib="$home/lib64"
    [[ -e "$lib/libcudart_static.a" ]] || lib="$home/lib"
    check_layout "$home/include" "$lib" "$home/bin/nvcc"
    emit_env "$home" "$home/bin/nvcc" "$home/include" "$lib"
    exit 0
fi

dir="${GPUPOOL_CUDA_DIR:-$repo/target/cuda-toolchain}"
venv="$dir/venv"
# A stable name for the toolkit root, independent of the Python version
# inside the venv path; nvcc finds everything relative to itself.
home="$dir/cuda"
inc="$home/include"
lib="$home/lib"
nvcc="$home/bin/nvcc"

# A venv rather than `pip install --target`: all the wheels share the
# nvidia/ top-level directory, and --target replaces that directory wholesale
# when a second set (cuBLAS) or a new version is installed into it.
install_set() {
    local name="$1"; shift
    # The stamp's name carries a hash of the exact pins, so changing a
    # version above forces a reinstall and an unchanged set costs one stat.
    local stamp
    stamp="$dir/.stamp-$name-$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
    [[ -e "$stamp" ]] && return 0
    local t0=$SECONDS
    if [[ ! -x "$venv/bin/python" ]]; then
        mkdir -p "$dir"
        python3 -m venv "$venv"
    fi
    log "installing $*"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-deps --only-binary=:all: "$@" >&2
    local site
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # Relative, so the cache survives being moved or copied elsewhere.
    ln -sfn "${site#"$dir"/}/nvidia/cu13" "$home"
    rm -f "$dir/.stamp-$name-"*
    touch "$stamp"
    log "$name set installed in $((SECONDS - t0)) s"
}

install_set core "${core_pkgs[@]}"
if ((with_cublas)); then
    install_set cublas "${cublas_pkgs[@]}"
fi

# nvcc.profile in the wheel adds -L$(TOP)/lib64 while the wheel ships lib/;
# the alias lets a bare `nvcc x.cu` link cudart_static without extra -L.
ln -sfn lib "$home/lib64"
# The wheels ship only versioned sonames; `-lcublas` needs the dev symlinks.
for so in libcublas.so.13 libcublasLt.so.13 libcufft.so.12; do
    if [[ -e "$lib/$so" ]]; then
        ln -sfn "$so" "$lib/${so%.so.*}.so"
    fi
done

check_layout "$inc" "$lib" "$nvcc"
emit_env "$home" "$nvcc" "$inc" "$lib" | tee "$dir/env.sh"
