#!/usr/bin/env bash
# Builds the drop-in libcuda test programs (see README.md beside this file).
#
# Usage: build.sh [--ci-only | --gpu-only] [OUT_DIR]
#   OUT_DIR defaults to <repo>/target/programs. Besides the binaries it gets
#   ci.list and gpu.list, the names of the programs of each set, one a line.
#
# Env:
#   GPUPOOL_STUB_LIB  directory holding the libcuda.so (or libcuda.so.1) that
#                     the C driver-API programs link against. Unset: a
#                     link-only stub is generated from the symbols they use;
#                     which libcuda.so.1 they get is decided at run time
#                     (LD_LIBRARY_PATH) either way.
#   GPUPOOL_CUDA_HOME, GPUPOOL_CUDA_DIR: see toolchain.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

build_ci=1
build_gpu=1
out=""
for arg in "$@"; do
    case "$arg" in
        --ci-only) build_gpu=0 ;;
        --gpu-only) build_ci=0 ;;
        -*) echo "build.sh: unknown option '$arg'" >&2; exit 2 ;;
        *) out="$arg" ;;
    esac
done
out="${out:-$repo/target/programs}"

# CI programs have no kernels: they run wherever a libcuda answers (the
# emulated device included). GPU programs launch kernels.
ci_c=(driver_api vmm_nokernel mapped_nokernel pinned_copies pinned_device
      driver_features ctx_create stream_mem_ops batch_ops user_objects
      ipc_events)
ci_cu=(runtime_nokernel graphs_nokernel managed_nokernel arrays_nokernel)
gpu_cu=(vector_add matmul_tiled templated device_globals streams_events
        cublas_sgemm cublas_halfgemm cufft_transforms bench_loop
        vmm_kernels jit_link
        device_printf launch_config cooperative ctx_limits
        graphs_kernels mempool_kernels tensor_map mapped_kernels managed_kernels
        textures_kernels graph_conditional dynamic_parallelism
        large_params mem_ops_kernels managed_globals
        cusparse_cg cusolver_dense curand_gen device_assert)
declare -A extra_libs=([cublas_sgemm]="-lcublas" [cublas_halfgemm]="-lcublas"
                       [cufft_transforms]="-lcufft"
                       [cusparse_cg]="-lcusparse -lcublas"
                       [cusolver_dense]="-lcusolver -lcublas"
                       [curand_gen]="-lcurand"
                       [dynamic_parallelism]="-rdc=true -lcudadevrt")

toolchain_args=()
if ((build_gpu)); then toolchain_args+=(--with-cublas); fi
eval "$(bash "$here/toolchain.sh" "${toolchain_args[@]}")"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
log() { echo "build.sh: $*" >&2; }

# -cudart static is nvcc's default, spelled out because it is the point: the
# static runtime dlopens libcuda.so.1 at run time, so the .cu programs are
# never linked with -lcuda. The rpath only serves libcublas.so.13 (the
# toolkit's lib dir holds no libcuda), and LD_LIBRARY_PATH still wins over it.
nvcc_flags=(-O2 -std=c++17 -cudart static -Xcompiler -Wall
            -I"$GPUPOOL_CUDA_INCLUDE" -L"$GPUPOOL_CUDA_LIB"
            -Xlinker -rpath -Xlinker "$GPUPOOL_CUDA_LIB")
# nvcc's default target (sm_75 SASS + compute_75 PTX for 13.0) runs on an
# H100 only through the driver's PTX JIT; the .sm90 builds carry H100 SASS
# and compute_90 PTX, i.e. the usual "native" fat binary.
sm90_flags=(-gencode 'arch=compute_90,code=[sm_90,compute_90]')

nvcc_build() { # name output [extra nvcc flags...]
    local name="$1" output="$2"
    shift 2
    # shellcheck disable=SC2086 # extra_libs values are word lists
    "$GPUPOOL_NVCC" "${nvcc_flags[@]}" "$@" -o "$output" "$here/$name.cu" \
        ${extra_libs[$name]:-}
}

# The C programs' libcuda: what the runtime loader must look for is the
# soname, libcuda.so.1, whatever file name it was linked through.
link_cuda=()
if ((build_ci)); then
    objs=()
    for name in "${ci_c[@]}"; do
        log "cc $name.c"
        cc -std=c11 -O2 -Wall -Wextra -I"$GPUPOOL_CUDA_INCLUDE" \
            -c -o "$out/$name.o" "$here/$name.c"
        objs+=("$out/$name.o")
    done
    if [[ -n "${GPUPOOL_STUB_LIB:-}" ]]; then
        if [[ -e "$GPUPOOL_STUB_LIB/libcuda.so" ]]; then
            link_cuda=(-L"$GPUPOOL_STUB_LIB" -lcuda)
        elif [[ -e "$GPUPOOL_STUB_LIB/libcuda.so.1" ]]; then
            link_cuda=(-L"$GPUPOOL_STUB_LIB" -l:libcuda.so.1)
        else
            log "GPUPOOL_STUB_LIB=$GPUPOOL_STUB_LIB holds no libcuda.so(.1)"
            exit 1
        fi
    else
        # Linking needs only the symbol names; the driver's link stub in a
        # full toolkit (lib64/stubs/libcuda.so) is exactly this.
        stub="$out/link-stub"
        mkdir -p "$stub"
        nm -u "${objs[@]}" |
            awk '$1 == "U" && $2 ~ /^cu/ { print "void " $2 "(void) {}" }' |
            sort -u >"$stub/libcuda.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" \
            "$stub/libcuda.c"
        link_cuda=(-L"$stub" -lcuda)
    fi
    for name in "${ci_c[@]}"; do
        cc -o "$out/$name" "$out/$name.o" "${link_cuda[@]}"
        rm -f "$out/$name.o"
        if ! readelf -d "$out/$name" | grep -q 'NEEDED.*\[libcuda\.so\.1\]'; then
            rm -f "$out/$name"
            log "$name does not record libcuda.so.1 as NEEDED (does the stub" \
                "set its SONAME, -Wl,-soname,libcuda.so.1?)"
            exit 1
        fi
    done
    for name in "${ci_cu[@]}"; do
        log "nvcc $name.cu"
        nvcc_build "$name" "$out/$name"
    done
    printf '%s\n' "${ci_c[@]}" "${ci_cu[@]}" >"$out/ci.list"
fi

if ((build_gpu)); then
    : >"$out/gpu.list"
    for name in "${gpu_cu[@]}"; do
        log "nvcc $name.cu (default arch, sm_90)"
        nvcc_build "$name" "$out/$name"
        nvcc_build "$name" "$out/$name.sm90" "${sm90_flags[@]}"
        printf '%s\n%s\n' "$name" "$name.sm90" >>"$out/gpu.list"
    done
fi

log "built into $out: $(cat "$out"/*.list | tr '\n' ' ')"
