# shellcheck shell=bash
# Sourced by the GPU scripts: starts a gpupool-server for them on 127.0.0.1.
#
# start_server LOG COMMAND...: runs COMMAND (gpupool-server and its
# arguments, optionally behind `env VAR=value`), adding `--listen
# 127.0.0.1:0`, with its output in LOG; waits up to 30 s for it to listen
# and sets `server_pid`, `addr` (host:port) and `pin` (its certificate's
# SHA-256). Returns 1, with the log's tail on stderr, when it does not.
start_server() {
    local log=$1 _
    shift
    "$@" --listen 127.0.0.1:0 >"$log" 2>&1 &
    server_pid=$!
    addr="" pin=""
    for _ in $(seq 1 150); do
        grep -q "listening on" "$log" && break
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.2
    done
    addr=$(sed -n 's/.*listening on \([0-9.:]*\) .*/\1/p' "$log" | head -n 1)
    pin=$(sed -n 's/.*SHA-256 \([0-9a-f]*\).*/\1/p' "$log" | head -n 1)
    if [[ -z $addr || -z $pin ]]; then
        tail -n 20 "$log" >&2
        echo "gpupool-server did not start" >&2
        return 1
    fi
}
