#!/usr/bin/env bash
# Builds the GPU suite's release binaries on this machine (the GPU machine has
# no Rust toolchain) and copies them into a folder that travels to it:
#   gpupool-server, gpupool-balancer, gpupool-bench, gpupool-demo,
#   gpupool-migrate-cudarc (the cudarc program of bench/migrate-torch.sh),
#   gpupool-rdma-check (the RDMA integration check, docs/rdma.md),
#   gpupool-gpu-tests (the `tests/tests/gpu.rs` test binary),
#   gpupool-server-lib-tests (for the real-NVML discovery test),
#   gpupool-balancer-grpc-bench (balancer/benches/grpc.rs), stub/ (the drop-in libcuda.so.1 and,
#   when its crate exists, libnvidia-ml.so.1, for bench/dropin.sh) and
#   cutrace/ (the call tracer, bench/cutrace) and
#   COMMIT (the commit they were built from, read by gpu-suite.sh).
# Debug info is stripped. Every folder under .device/ is then packed into one
# archive, .device/device.tar.xz (identical files stored once), which must
# stay under GPUPOOL_DEVICE_MAX_MIB (default 56: a device run carries 64 MiB
# with the working tree); carry that archive alone and gpu-suite.sh unpacks
# it on the GPU machine, so one run has every part's binaries.
#
# Usage: bench/build-device.sh [OUT_DIR]    (default .device/bin, git-ignored)
# Env:   PARTS: what to copy, `core` (server, bench, the GPU test binaries,
#        stub/), `pool` (server, balancer, its gRPC benchmark, the server's
#        unit tests, stub/), `dropin` (server, demo, bench and stub/: the demo and
#        bench/dropin.sh) or `all` (default). Everything together is
#        built in one folder, but build each part in its own folder, e.g.
#        `PARTS=core … .device/bin`, `PARTS=dropin … .device/dropin` and
#        `PARTS=pool … .device/pool`.
#        CARGO_BUILD_JOBS (default 2), GPUPOOL_DEVICE_MAX_MIB (default 60),
#        WITH_NVML (default 1; 0 leaves libnvidia-ml.so.1 out)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-.device/bin}
max_mib=${GPUPOOL_DEVICE_MAX_MIB:-56}
jobs=${CARGO_BUILD_JOBS:-2}
parts=${PARTS:-all}
case $parts in
core) bins=(gpupool-server gpupool-bench gpupool-rdma-check) ;;
pool) bins=(gpupool-server gpupool-balancer gpupool-migrate-cudarc) ;;
dropin) bins=(gpupool-server gpupool-demo gpupool-bench) ;;
all) bins=(gpupool-server gpupool-balancer gpupool-bench gpupool-demo gpupool-rdma-check gpupool-migrate-cudarc) ;;
*) echo "PARTS must be core, pool, dropin or all" >&2; exit 2 ;;
esac
gpu_test_name=gpupool-gpu-tests

# Where cargo puts what it builds (CARGO_TARGET_DIR, when set, moves it): a
# bundle once copied binaries from ./target that an earlier build left while
# this build went elsewhere, and its COMMIT file named the newer commit.
target=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
echo "== building release binaries (-j $jobs) into $target"
cargo build --release -j "$jobs" -p gpupool-server -p gpupool-balancer -p gpupool-tests --bins

echo "== building the RDMA integration check (gpupool-rdma, feature verbs)"
# Needs libibverbs-dev, librdmacm-dev and libclang-dev here (as .ci/run
# installs them); the GPU machine has the runtime libraries.
cargo build --release -j "$jobs" -p gpupool-rdma --features verbs --bin gpupool-rdma-check
echo "== building the drop-in libraries"
libs=(-p gpupool-libcuda)
[[ ${WITH_NVML:-1} == 1 ]] && libs+=(-p gpupool-libnvml)
cargo build --release -j "$jobs" "${libs[@]}"

# Prints the executable of the last test/bench artifact named $1 of kind $2.
artifact() {
    python3 -c '
import json, sys
found = ""
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("name") == sys.argv[1] and sys.argv[2] in t.get("kind", []) and m.get("executable"):
        found = m["executable"]
# Reads to the end: stopping early would break cargo'"'"'s pipe.
print(found)' "$1" "$2"
}

echo "== building the test binaries to find the gpu e2e tests"
# The test binary's file name carries a hash: cargo's JSON messages name it.
messages=$(cargo test --release -j "$jobs" -p gpupool-tests --no-run --message-format=json)
# "name path" for each end-to-end test binary the suite runs.
test_bins=$(for t in bad_input e2e gpu isolation migration; do
    echo "${t//_/-} $(artifact "$t" test <<<"$messages")"
done)
gpu_test=$(awk '$1 == "gpu" {print $2}' <<<"$test_bins")

echo "== building the server's unit tests and the balancer's gRPC benchmark"
server_lib_tests=$(cargo test --release -j "$jobs" -p gpupool-server --lib --no-run --message-format=json | artifact gpupool_server lib)
grpc_bench=$(cargo bench -j "$jobs" -p gpupool-balancer --bench grpc --no-run --message-format=json | artifact grpc bench)

mkdir -p "$out"
for name in gpupool-server gpupool-balancer gpupool-bench gpupool-demo gpupool-rdma-check gpupool-migrate-cudarc "$gpu_test_name" COMMIT; do
    rm -f "$out/$name"
done
for name in "${bins[@]}"; do
    strip --strip-debug -o "$out/$name" "$target/release/$name"
done
mkdir -p "$out/stub"
rm -f "$out/stub/"*
strip --strip-debug -o "$out/stub/libcuda.so.1" "$target/release/libcuda.so"
if [[ ${WITH_NVML:-1} == 1 ]]; then
    strip --strip-debug -o "$out/stub/libnvidia-ml.so.1" "$target/release/libnvidia_ml.so"
fi
# cutrace, the call tracer bench/dropin.sh uses with CUTRACE=1.
bash bench/cutrace/build.sh "$out/cutrace"
rm -f "$out"/gpupool-*-tests "$out/gpupool-balancer-grpc-bench"
if [[ $parts == core || $parts == all ]]; then
    while read -r name exe; do
        [[ -n "$exe" ]] && strip --strip-debug -o "$out/gpupool-$name-tests" "$exe"
    done <<<"$test_bins"
fi
if [[ $parts == pool || $parts == all ]]; then
    strip --strip-debug -o "$out/gpupool-server-lib-tests" "$server_lib_tests"
    strip --strip-debug -o "$out/gpupool-balancer-grpc-bench" "$grpc_bench"
fi
if [[ -z "$gpu_test" && ($parts == core || $parts == all) ]]; then
    echo "WARNING: no test binary for tests/tests/gpu.rs was built; gpu-suite.sh will report the GPU tests as FAILED (missing)" >&2
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD -- 2>/dev/null; then
    commit="$commit-dirty"
fi
echo "$commit" >"$out/COMMIT"

ls -l "$out"
echo "$out: $(du -cb "$out" | tail -n 1 | cut -f 1) bytes, commit $commit"

# One archive of every part's folder: files that are the same in several
# folders (the server, the stub libraries) become hard links, which tar
# stores once.
echo "== packing .device/device.tar.xz"
device_root=$(dirname "$out")
( cd "$device_root" &&
    find . -name "device.tar.xz*" -prune -o -type f -print0 | xargs -0 md5sum | sort |
    awk '{ if ($1 == prev) print first, $2; else { prev = $1; first = $2 } }' |
    while read -r first dup; do ln -f "$first" "$dup"; done )
tar -C "$device_root" --exclude="./device.tar.xz*" -cf - . | xz -T"$jobs" -6 >"$device_root/device.tar.xz.new"
mv "$device_root/device.tar.xz.new" "$device_root/device.tar.xz"
total=$(stat -c %s "$device_root/device.tar.xz")
limit=$((max_mib * 1024 * 1024))
mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "$device_root/device.tar.xz: $total bytes ($mib MiB, limit $max_mib MiB)"
if ((total > limit)); then
    echo "ERROR: the archive of $device_root is larger than $max_mib MiB: remove parts not needed for this run" >&2
    exit 1
fi
