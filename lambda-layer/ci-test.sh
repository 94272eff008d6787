#!/usr/bin/env bash
# The example Lambda function end to end under cargo-lambda's emulator:
# a balancer and a gpu-server on loopback, the layer's extension leasing the
# GPU during INIT, the function (lambda_runtime + cudarc over the layer's
# libcuda.so.1) invoked with `cargo lambda invoke` several times, each
# product checked against a CPU reference. Checks that later invocations
# reuse the environment's lease and QUIC session (no new lease, no new
# session), and that an environment frozen (SIGSTOP of the function and the
# extension) for longer than the QUIC idle timeout still works after the
# thaw (the session is resumed, not opened again), and that one frozen past
# the server's grace period and the lease's expiry answers its next
# invocation correctly too (a new lease, a new GPU worker and session).
#
# The emulator runs with --only-lambda-apis and the function and extension
# are started as their own processes against it, as Lambda starts them, so
# that they can be frozen like a Lambda environment between invocations.
#
# Usage: lambda-layer/ci-test.sh
# Env:
#   BIN           folder with gpupool-server, gpupool-balancer,
#                 gpupool-extension, gpupool-lambda-example and lib/ (the
#                 layer's lib/); default: build them here (debug)
#   CARGO_LAMBDA  the cargo-lambda binary (default: installed from PyPI into
#                 target/cargo-lambda-venv)
#   DEVICE        the gpu-server's --device (default emulated)
#   INSTANCES     its --instances (default: a simulated whole H100 on the
#                 emulated device, else what NVML reports)
#   OUT           folder for logs and the timing report (default
#                 target/lambda-ci)
#   NATIVE=1      also run the function on the machine's own libcuda (GPU
#                 machine): cold and warm latency native versus through the pool
#   FUNCTION      rust (default: the example function above) or python: the
#                 Python function lambda-layer/python/handler.py (cuda-python's
#                 driver bindings over the layer's libcuda) under the Python
#                 runtime interface client (awslambdaric, from PyPI into
#                 target/lambda-python-venv); four invocations and the freeze
#                 past the idle timeout (x86_64 only)
#                 or torch: the PyTorch function
#                 lambda-layer/python/torch/handler.py (a small transformer,
#                 GPU machine only: DEVICE=cuda:N) under awslambdaric: four
#                 invocations checked against the same handler on the CPU, a
#                 bad event answered with its error, the freeze past the idle
#                 timeout; with NATIVE=1 the same handler on the machine's
#                 libcuda (x86_64 only). PyTorch is not installed: the venv
#                 (target/lambda-torch-venv) sees the interpreter's own
#                 site-packages (--system-site-packages), which must have it
#   PYTHON        the interpreter the Python functions' venvs are made with
#                 (default python3)
#   PIP_WHEELS    folder of wheels to install the Python functions' packages
#                 from, offline (pip --no-index --find-links): the GPU
#                 machine has no network (lambda-layer/build-device.sh puts
#                 awslambdaric's cp312 wheels in its wheels/)
#   LAYER_ARCH    x86_64 (default) or arm64: with arm64 (and no BIN), the
#                 layer and the function come from ARCH=arm64 build.sh and run
#                 under qemu-user (qemu-aarch64-static, aarch64 glibc from
#                 libc6-arm64-cross) against the x86-64 balancer and server
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${OUT:-target/lambda-ci}
mkdir -p "$out"
out=$(cd "$out" && pwd)
device=${DEVICE:-emulated}
if [[ $device == emulated ]]; then instances=${INSTANCES:-simulated:h100-80gb}; else instances=${INSTANCES:-nvml}; fi
idle_ms=3000
freeze_s=7
# The long freeze outlasts the server's grace period and the lease (renewed
# every ttl/3, so a freeze shorter than 2/3 of it keeps the lease).
grace_ms=10000
ttl_ms=12000
long_freeze_s=16
# An invocation's limit; the PyTorch function's first one waits for its INIT
# (importing torch, and through the pool its first modules uploaded).
invoke_timeout_s=60
[[ ${FUNCTION:-rust} != torch ]] || invoke_timeout_s=300
cargo_lambda_version=1.9.2
# The Python function's runtime interface client and CUDA bindings.
awslambdaric_version=4.2.2
cuda_bindings_version=13.0.3
function_kind=${FUNCTION:-rust}
case $function_kind in
rust) ;;
python | torch) [[ ${LAYER_ARCH:-x86_64} == x86_64 ]] || { echo "lambda-ci: FUNCTION=$function_kind runs on x86_64 only" >&2; exit 2; } ;;
*) echo "lambda-ci: FUNCTION must be rust, python or torch, not $function_kind" >&2; exit 2 ;;
esac
# PyTorch's kernels need a real GPU: the emulated device has built-in ones only.
[[ $function_kind != torch || $device != emulated ]] ||
    { echo "lambda-ci: FUNCTION=torch needs a GPU (DEVICE=cuda:0)" >&2; exit 2; }
# The kernels each invocation must report: the server's built-in module, or
# PyTorch's own (its wheel's CUDA libraries, sent as module images).
pool_kernels=builtin
[[ $function_kind != torch ]] || pool_kernels=pytorch

layer_arch=${LAYER_ARCH:-x86_64}
# The command prefix that runs the layer's and the function's binaries.
guest=()
case $layer_arch in
x86_64) ;;
arm64)
    sysroot=/usr/aarch64-linux-gnu
    command -v qemu-aarch64-static >/dev/null && [[ -e $sysroot/lib/ld-linux-aarch64.so.1 ]] ||
        { echo "lambda-ci: LAYER_ARCH=arm64 needs qemu-aarch64-static and $sysroot (apt-get install qemu-user-static libc6-arm64-cross)" >&2; exit 2; }
    guest=(qemu-aarch64-static -L "$sysroot")
    ;;
*) echo "lambda-ci: LAYER_ARCH must be x86_64 or arm64, not $layer_arch" >&2; exit 2 ;;
esac
if [[ -z ${BIN:-} ]]; then
    BIN="$out/bin"
    mkdir -p "$BIN"
    if [[ $layer_arch == x86_64 ]]; then
        cargo build --locked -q -p gpupool-server -p gpupool-balancer -p gpupool-lambda-layer
        for b in gpupool-extension gpupool-lambda-example; do cp target/debug/$b "$BIN/"; done
        PROFILE=debug bash client-stub/build-libs.sh "$BIN/lib" >/dev/null
    else
        cargo build --locked -q -p gpupool-server -p gpupool-balancer
        ARCH=arm64 bash lambda-layer/build.sh "$out/build"
        cp "$out/build/layer-arm64/extensions/gpupool-extension" "$BIN/"
        cp "$out/build/function-arm64/bootstrap" "$BIN/gpupool-lambda-example"
        rm -rf "$BIN/lib"
        cp -r "$out/build/layer-arm64/lib" "$BIN/lib"
    fi
    for b in gpupool-server gpupool-balancer; do cp target/debug/$b "$BIN/"; done
fi
BIN=$(cd "$BIN" && pwd)
if [[ -z ${CARGO_LAMBDA:-} ]]; then
    venv=target/cargo-lambda-venv
    if [[ ! -x $venv/bin/cargo-lambda ]]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q "cargo-lambda==$cargo_lambda_version"
    fi
    CARGO_LAMBDA="$repo/$venv/bin/cargo-lambda"
fi
# pip_install VENV PACKAGE...: from PyPI, or offline from $PIP_WHEELS; with
# the interpreter's own pip where the venv has none.
pip_install() {
    local venv=$1 pip
    shift
    pip=("$venv/bin/pip")
    [[ -x ${pip[0]} ]] || pip=("$python" -m pip --python "$venv/bin/python")
    if [[ -n ${PIP_WHEELS:-} ]]; then
        "${pip[@]}" install -q --no-index --find-links "$PIP_WHEELS" "$@"
    else
        "${pip[@]}" install -q "$@"
    fi
}
python=${PYTHON:-python3}
case $function_kind in
python)
    handler_dir=lambda-layer/python
    pyvenv=target/lambda-python-venv
    if ! "$pyvenv/bin/python" -c "import awslambdaric, cuda.bindings.driver" 2>/dev/null; then
        "$python" -m venv "$pyvenv"
        pip_install "$pyvenv" "awslambdaric==$awslambdaric_version" "cuda-bindings==$cuda_bindings_version"
    fi
    ;;
torch)
    handler_dir=lambda-layer/python/torch
    pyvenv=target/lambda-torch-venv
    "$python" -c "import torch" 2>/dev/null ||
        { echo "lambda-ci: FUNCTION=torch needs PyTorch installed for $python (the venv uses its site-packages)" >&2; exit 2; }
    if ! "$pyvenv/bin/python" -c "import awslambdaric, torch" 2>/dev/null; then
        rm -rf "$pyvenv"
        # Without ensurepip (Debian's python3 without python3-venv), a venv
        # without pip: pip_install uses the interpreter's.
        "$python" -m venv --system-site-packages "$pyvenv" ||
            { rm -rf "$pyvenv" && "$python" -m venv --system-site-packages --without-pip "$pyvenv"; }
        pip_install "$pyvenv" "awslambdaric==$awslambdaric_version"
        # PyTorch in a user site or in the venv python3 itself runs from
        # is not among a new venv's system site-packages: that
        # interpreter's site directories go after the venv's own.
        if ! "$pyvenv/bin/python" -c "import torch" 2>/dev/null; then
            "$python" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
                >"$("$pyvenv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/interpreter-site.pth"
        fi
        "$pyvenv/bin/python" -c "import torch" 2>/dev/null ||
            { echo "lambda-ci: the venv does not see $python's PyTorch (is it in a user site, or in another venv?)" >&2; exit 2; }
    fi
    ;;
esac
[[ -z ${pyvenv:-} ]] || pyvenv="$repo/$pyvenv"

work=$(mktemp -d)
pids=()
# A process and its children (the function's GPU worker): what Lambda
# freezes is the whole environment.
family() { for p in "$@"; do echo "$p"; pgrep -P "$p" || true; done; }
cleanup() {
    for p in $(family "${pids[@]}"); do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
fail() {
    echo "lambda-ci: FAILED: $*" >&2
    for f in "$out"/*.log; do echo "--- $f" >&2; tail -n 25 "$f" >&2; done
    exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The pool: a balancer and one gpu-server.
"$BIN/gpupool-balancer" keygen --key-file "$work/key" >"$work/pub" 2>/dev/null
# The function's tenant and its own credential: the balancer keeps the
# credential's digest (the tenants file), the function presents the secret
# (GPUPOOL_BALANCER_SECRET) and names no tenant.
"$BIN/gpupool-balancer" new-tenant lambda-ci >"$work/new-tenant" 2>/dev/null
tenant_secret=$(grep '^gpt1_' "$work/new-tenant")
grep '^lambda-ci sha256:' "$work/new-tenant" >"$work/tenants"
[[ -n $tenant_secret && -s $work/tenants ]] || fail "new-tenant made no credential"
bport=$(free_port)
RUST_LOG=info "$BIN/gpupool-balancer" serve --listen "127.0.0.1:$bport" --key-file "$work/key" \
    --server-secret ci-secret --tenants "$work/tenants" --recovery-ms 0 --lease-ttl-ms "$ttl_ms" \
    >"$out/balancer.log" 2>&1 &
pids+=($!)
# gRPC runs over TLS with a self-signed certificate: every client pins the
# fingerprint the balancer prints.
for _ in $(seq 1 100); do grep -q "certificate SHA-256" "$out/balancer.log" && break; sleep 0.1; done
bpin=$(sed -n 's/.*certificate SHA-256 \([0-9a-f]\{64\}\).*/\1/p' "$out/balancer.log" | head -n 1)
[[ -n $bpin ]] || fail "the balancer printed no certificate fingerprint"
export GPUPOOL_BALANCER_CERT_SHA256=$bpin
sport=$(free_port)
RUST_LOG=info "$BIN/gpupool-server" --listen "127.0.0.1:$sport" --device "$device" --instances "$instances" \
    --balancer "https://127.0.0.1:$bport" --advertise "127.0.0.1:$sport" --balancer-secret ci-secret \
    --lease-key "$(cat "$work/pub")" --server-id lambda-ci --idle-timeout-ms "$idle_ms" \
    --resume-grace-ms "$grace_ms" --warm-workers 1 >"$out/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
    # The servers' secret is the operator's credential: the whole pool.
    "$BIN/gpupool-balancer" status --balancer "https://127.0.0.1:$bport" --secret ci-secret >"$work/status" 2>/dev/null &&
        grep -q lambda-ci "$work/status" && break
    sleep 0.5
done
grep -q lambda-ci "$work/status" || fail "the gpu-server did not register with the balancer"
# A plaintext client is refused.
if env -u GPUPOOL_BALANCER_CERT_SHA256 "$BIN/gpupool-balancer" status --insecure \
    --balancer "http://127.0.0.1:$bport" >/dev/null 2>&1; then
    fail "the TLS balancer answered a plaintext client"
fi

# A payload and its CPU reference (reference.json: the expected numbers,
# flattened; reply_key: where the reply has them; tolerance: largest error).
if [[ $function_kind == torch ]]; then
    # A batch of token ids; the reference is the same handler on the CPU.
    python3 - "$work" <<'PY'
import json, random, sys
random.seed(20261205)
tokens = [[random.randrange(1000) for _ in range(32)] for _ in range(8)]
json.dump({"tokens": tokens}, open(sys.argv[1] + "/payload.json", "w"))
PY
    (cd "$handler_dir" && TORCH_DEVICE=cpu "$pyvenv/bin/python" - "$work" <<'PY') || fail "the CPU reference failed"
import json, sys
import handler
work = sys.argv[1]
logits = handler.handler(json.load(open(work + "/payload.json")), None)["logits"]
json.dump([x for row in logits for x in row], open(work + "/reference.json", "w"))
PY
    reply_key=logits tolerance=2e-3
else
    python3 - "$work" <<'PY'
import json, random, sys
random.seed(20261201)
m, n, k = 12, 9, 17
a = [random.uniform(-1, 1) for _ in range(m * k)]
b = [random.uniform(-1, 1) for _ in range(k * n)]
c = [sum(a[r * k + i] * b[i * n + col] for i in range(k)) for r in range(m) for col in range(n)]
json.dump({"m": m, "n": n, "k": k, "a": a, "b": b}, open(sys.argv[1] + "/payload.json", "w"))
json.dump(c, open(sys.argv[1] + "/reference.json", "w"))
PY
    reply_key=c tolerance=1e-4
fi

# The Python function under awslambdaric, in the background ($! is its
# pid). $1: label; the rest: VAR=value settings for it. awslambdaric
# crashes on the emulator's answers without a Content-Type
# (lambda-layer/python/runtime_api_proxy.py): a proxy adds it.
start_python() {
    local label=$1 pport
    shift
    pport=$(free_port)
    python3 lambda-layer/python/runtime_api_proxy.py "$pport" "$iport" >"$out/proxy-$label.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do grep -q ready "$out/proxy-$label.log" 2>/dev/null && break; sleep 0.1; done
    (cd "$handler_dir" && exec env AWS_LAMBDA_RUNTIME_API="127.0.0.1:$pport/.rt" "$@" \
        "$pyvenv/bin/python" -m awslambdaric handler.handler) >"$out/function-$label.log" 2>&1 &
}

# One Lambda environment: emulator, extension (INIT: lease), function.
# $1: label, $2: "pool" (the layer's libcuda) or "native".
start_environment() {
    local label=$1 mode=$2
    iport=$(free_port)
    "$CARGO_LAMBDA" lambda watch --only-lambda-apis --invoke-address 127.0.0.1 --invoke-port "$iport" \
        >"$out/emulator-$label.log" 2>&1 &
    emulator=$!
    pids+=($emulator)
    for _ in $(seq 1 100); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$iport),0.2)" 2>/dev/null && break
        sleep 0.2
    done
    export AWS_LAMBDA_RUNTIME_API="http://127.0.0.1:$iport/.rt"
    export AWS_LAMBDA_FUNCTION_NAME=_ AWS_LAMBDA_FUNCTION_VERSION=1 AWS_LAMBDA_FUNCTION_MEMORY_SIZE=1024
    local lease_file="$work/$label/lease"
    local init_start
    init_start=$(date +%s%N)
    if [[ $mode == pool ]]; then
        GPUPOOL_BALANCER="https://127.0.0.1:$bport" GPUPOOL_BALANCER_SECRET="$tenant_secret" GPUPOOL_LEASE_FILE="$lease_file" \
            GPUPOOL_LOG=info "${guest[@]}" "$BIN/gpupool-extension" >"$out/extension-$label.log" 2>&1 &
        extension=$!
        pids+=($extension)
        for _ in $(seq 1 100); do [[ -s $lease_file ]] && break; sleep 0.1; done
        [[ -s $lease_file ]] || fail "the extension wrote no lease"
        if [[ $function_kind != rust ]]; then
            # The layer's libraries ahead of the rest of the path (where a
            # system-wide PyTorch may find its CUDA libraries).
            start_python "$label" LD_LIBRARY_PATH="$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
                GPUPOOL_LEASE_FILE="$lease_file" GPUPOOL_MAX_UDP_PAYLOAD=1200 GPUPOOL_LOG=info
        else
            LD_LIBRARY_PATH="$BIN/lib" GPUPOOL_LEASE_FILE="$lease_file" GPUPOOL_MAX_UDP_PAYLOAD=1200 \
                GPUPOOL_WORKER_WRAPPER="${guest[*]}" GPUPOOL_LOG=info "${guest[@]}" "$BIN/gpupool-lambda-example" \
                >"$out/function-$label.log" 2>&1 &
        fi
    else
        extension=
        if [[ $function_kind != rust ]]; then
            start_python "$label"
        else
            "$BIN/gpupool-lambda-example" >"$out/function-$label.log" 2>&1 &
        fi
    fi
    function=$!
    pids+=($function)
    init_ns=$(($(date +%s%N) - init_start))
}

# Invokes the function once; checks the product; prints "<ms> <cold> <function
# ms> <kernels> <recovered> <device>".
invoke() {
    local label=$1 i=$2 t0 t1
    t0=$(date +%s%N)
    timeout "$invoke_timeout_s" "$CARGO_LAMBDA" lambda invoke --invoke-address 127.0.0.1 --invoke-port "$iport" \
        --data-file "$work/payload.json" >"$work/reply.json" 2>"$work/invoke.err" ||
        { cat "$work/invoke.err" "$work/reply.json" >&2; fail "$label invocation $i failed"; }
    t1=$(date +%s%N)
    python3 - "$work/reply.json" "$work/reference.json" "$reply_key" "$tolerance" <<'PY' || fail "$label invocation $i: wrong result"
import json, sys
reply, ref = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
c = reply[sys.argv[3]]
if c and isinstance(c[0], list):
    c = [x for row in c for x in row]
assert len(c) == len(ref), f"{len(c)} elements, want {len(ref)}"
err = max(abs(x - y) for x, y in zip(c, ref))
assert err < float(sys.argv[4]), f"max error {err}"
PY
    # The function's own time: total_ms (rust, python) or invoke_ms (torch).
    python3 -c "import json,sys; r=json.load(open('$work/reply.json')); t=r['timing']; print(round(($t1-$t0)/1e6, 1), r['cold'], round(t.get('total_ms', t.get('invoke_ms', 0)), 1), r['kernels'], r.get('recovered', False), r['device'].replace(' ', '_'))"
}

count() { grep -c "$1" "$2" || true; }

# The report is written row by row, so a failed run keeps what it measured.
report="$out/lambda.md"
{
    echo "## Lambda example function ($function_kind) under cargo-lambda ($(date -u +%FT%TZ), device $device, layer $layer_arch)"
    echo
    echo "Round trip of \`cargo lambda invoke\` (ms) and the time the function measured itself (ms);"
    echo "a ${freeze_s} s freeze is longer than the ${idle_ms} ms QUIC idle timeout, a ${long_freeze_s} s one than"
    echo "the ${grace_ms} ms grace period and the ${ttl_ms} ms lease. Kernels: \`builtin\`"
    echo "is the server's built-in module, \`nvrtc\` the same source compiled by the function (native),"
    echo "\`pytorch\` PyTorch's own kernels (its wheel's CUDA libraries). A cold invocation's round trip"
    echo "includes the environment's INIT (for PyTorch: importing torch, the model, a warm-up batch)."
    echo
    echo "| environment | invocation | cold | kernels | invoke ms | function ms |"
    echo "|---|---|---|---|---|---|"
} >"$report"
# Invokes, checks, reports. $1 label, $2 invocation, $3 the kernels expected,
# $4 whether the session must have been re-opened (default False).
invoke_row() {
    local label=$1 i=$2 want=$3 want_recovered=${4:-False} ms cold fn_ms kernels recovered dev
    read -r ms cold fn_ms kernels recovered dev < <(invoke "$label" "$i")
    [[ -n $kernels ]] || fail "$label invocation $i: no answer"
    [[ $kernels == "$want" ]] || fail "$label invocation $i ran $kernels kernels, want $want"
    [[ $recovered == "$want_recovered" ]] || fail "$label invocation $i: recovered=$recovered, want $want_recovered"
    echo "| $label | $i | $cold | $kernels | $ms | $fn_ms |" >>"$report"
    # The pool/native figures: the numbered invocations of one environment.
    if [[ $i =~ ^[0-9]+$ ]]; then echo "$label $cold $ms $fn_ms" >>"$work/figures"; fi
    # The PyTorch function's INIT, as it measured it.
    if [[ $function_kind == torch && $cold == True ]]; then
        python3 -c "import json,sys; r=json.load(open(sys.argv[1])); i=r['init']; print(f\"- INIT of {sys.argv[2]} on {r['device']}: {r['timing']['init_ms']:.0f} ms (import torch {i['import_ms']:.0f} ms, model {i['model_ms']:.0f} ms, warm-up batch {i['warmup_ms']:.0f} ms; torch {i['torch']}, weights from {i['weights']})\")" \
            "$work/reply.json" "$label" >>"$work/init-notes"
    fi
    echo "lambda-ci: $label invocation $i: ${ms} ms (function ${fn_ms} ms, cold=$cold, $kernels kernels) on $dev"
}
run_environment() {
    local label=$1 mode=$2 invocations=$3 want=$pool_kernels
    [[ $mode == native && $function_kind == rust ]] && want=nvrtc
    start_environment "$label" "$mode"
    for i in $(seq 1 "$invocations"); do invoke_row "$label" "$i" "$want"; done
}

: >"$work/figures"
run_environment pool pool 4
leases=$(count "leased a virtual GPU" "$out/extension-pool.log")
opened=$(count "session opened" "$out/server.log")
[[ $leases == 1 ]] || fail "the extension leased $leases times, want 1"
# The supervisor logs one "session opened" per session (the worker another).
[[ $opened -le 2 ]] || fail "$opened sessions opened for one environment, want one"
! grep -q "leased a virtual GPU" "$out/function-pool.log" || fail "the function leased a GPU itself"
echo "lambda-ci: 4 invocations, one lease, one session"

if [[ $function_kind == torch ]]; then
    # A bad event gets the handler's error, and the environment goes on.
    echo '{"tokens": [[1, 2, 3], [4, 5]]}' >"$work/bad.json"
    if timeout "$invoke_timeout_s" "$CARGO_LAMBDA" lambda invoke --invoke-address 127.0.0.1 --invoke-port "$iport" \
        --data-file "$work/bad.json" >"$work/bad.out" 2>&1; then
        cat "$work/bad.out" >&2
        fail "a bad event was answered without an error"
    fi
    grep -q "row 1 is not a list of 3 ids" "$work/bad.out" "$out/function-pool.log" ||
        { cat "$work/bad.out" >&2; fail "the bad event's error does not say what is wrong"; }
    invoke_row pool "after a bad event" "$pool_kernels"
    echo "lambda-ci: a bad event was answered with its error; the next invocation is correct"
fi

# Freeze the environment past the idle timeout, thaw it, invoke again.
freeze() {
    local frozen
    frozen=$(family "$function" "$extension")
    # shellcheck disable=SC2086
    kill -STOP $frozen
    sleep "$1"
    # shellcheck disable=SC2086
    kill -CONT $frozen
}
freeze "$freeze_s"
invoke_row pool "after a ${freeze_s} s freeze" "$pool_kernels"
echo "lambda-ci: after a ${freeze_s} s freeze (idle timeout ${idle_ms} ms): result correct"
grep -q "connection lost; resuming the session" "$out/function-pool.log" ||
    fail "the function's connection survived a freeze past the idle timeout: nothing was tested"
grep -q "session resumed" "$out/function-pool.log" || fail "the session was not resumed after the thaw"
[[ $(count "session opened" "$out/server.log") == "$opened" ]] || fail "a new session was opened after the thaw"
[[ $(count "leased a virtual GPU" "$out/extension-pool.log") == 1 ]] || fail "a new lease was taken after the thaw"
echo "lambda-ci: the thawed environment resumed its session (no new lease, no new session)"

if [[ $function_kind == python ]]; then
    # The Python function has no GPU worker of its own to restart: the
    # freeze past the grace period is the Rust example's to test.
    kill "$function" 2>/dev/null || true
    cat "$report"
    echo "lambda-ci: passed (python)"
    exit 0
fi

# Freeze past the grace period and the lease: the session cannot come back.
# The extension leases again; the invocation starts a new GPU worker on the
# new lease and answers correctly. The next one is warm again. (Rust only:
# the PyTorch function holds CUDA in its own process, so its environment
# would have to be replaced.)
if [[ $function_kind == rust ]]; then
    freeze "$long_freeze_s"
    invoke_row pool "after a ${long_freeze_s} s freeze" builtin True
    grep -q "the lease is gone; leasing again" "$out/extension-pool.log" || fail "the extension did not lease again"
    [[ $(count "leased a virtual GPU" "$out/extension-pool.log") == 2 ]] || fail "want exactly one new lease after the long freeze"
    grep -q "the GPU session is lost; starting a new GPU worker" "$out/function-pool.log" ||
        fail "the function did not see its session lost"
    invoke_row pool "after the recovery" builtin False
    echo "lambda-ci: after a ${long_freeze_s} s freeze (grace ${grace_ms} ms, lease ${ttl_ms} ms): new lease, new session, results correct"
fi

if [[ ${NATIVE:-0} == 1 ]]; then
    kill "$function" "$extension" "$emulator" 2>/dev/null || true
    run_environment native native 4
    # Pool against native: the cold invocation and the median of the warm
    # ones (those after a freeze excluded), invoke round trip and function time.
    python3 - "$work/figures" >>"$report" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
def pick(env, cold):
    return [(float(ms), float(fn)) for e, c, ms, fn in rows if e == env and (c.lower() == "true") == cold]
print()
print("| pool / native | invoke ms (pool, native, ratio) | function ms (pool, native, ratio) |")
print("|---|---|---|")
for name, cold in (("cold", True), ("warm, median", False)):
    pool, native = pick("pool", cold), pick("native", cold)
    p = [statistics.median(x[i] for x in pool) for i in (0, 1)]
    n = [statistics.median(x[i] for x in native) for i in (0, 1)]
    cells = [f"{p[i]:.1f}, {n[i]:.1f}, {p[i] / n[i]:.2f}×" for i in (0, 1)]
    print(f"| {name} | {cells[0]} | {cells[1]} |")
PY
fi

if [[ -s $work/init-notes ]]; then
    echo >>"$report"
    cat "$work/init-notes" >>"$report"
fi

# Each environment ends as Lambda ends it: SHUTDOWN releases the lease.
kill "$function" 2>/dev/null || true
cat "$report"
echo "lambda-ci: passed"
