#!/usr/bin/env bash
# Runs COMMAND through gpupool's stub against a gpupool-server started for it
# on cuda:0 (127.0.0.1), on the GPU machine; the server's log goes to
# SERVER_LOG (default: a temporary file, printed when COMMAND fails);
# SERVER_ARGS: more gpupool-server arguments (e.g. "--isolation in-process").
# Usage: bench/probes/with-server.sh BIN_DIR COMMAND...   (BIN_DIR as for dropin.sh)
set -uo pipefail
B=$(cd "${1:?BIN_DIR}" && pwd) || exit 2
shift
log=${SERVER_LOG:-$(mktemp)}
"$B/gpupool-server" --listen 127.0.0.1:0 --device cuda:0 --tokens p --session-memory-mib 16384 ${SERVER_ARGS:-} >"$log" 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null; wait $srv 2>/dev/null' EXIT
for _ in $(seq 1 150); do grep -q "listening on" "$log" && break; sleep 0.2; done
addr=$(sed -n 's/.*listening on \([0-9.:]*\) .*/\1/p' "$log" | head -n 1)
pin=$(sed -n 's/.*SHA-256 \([0-9a-f]*\).*/\1/p' "$log" | head -n 1)
LD_LIBRARY_PATH="$B/stub" GPUPOOL_SERVER=$addr GPUPOOL_TOKEN=p GPUPOOL_CERT_SHA256=$pin "$@"
rc=$?
[[ $rc == 0 ]] || tail -n 20 "$log" >&2
exit $rc
