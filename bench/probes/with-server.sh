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
# shellcheck source=bench/lib/server.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/server.sh"
# shellcheck disable=SC2086 # SERVER_ARGS is a list of arguments
start_server "$log" "$B/gpupool-server" --device cuda:0 --tokens p --session-memory-mib 16384 ${SERVER_ARGS:-} || exit 1
trap 'kill $server_pid 2>/dev/null; wait $server_pid 2>/dev/null' EXIT
LD_LIBRARY_PATH="$B/stub" GPUPOOL_SERVER=$addr GPUPOOL_TOKEN=p GPUPOOL_CERT_SHA256=$pin "$@"
rc=$?
[[ $rc == 0 ]] || tail -n 20 "$log" >&2
exit $rc
