# Shared by bench/serve_*.sh: start `grit serve` on a free loopback port, wait until it listens.
# start_server LOGFILE ARGS... sets SERVER_PID and URL.
start_server() {
  local log=$1; shift
  "$GRIT" serve --port 0 "$@" 2>"$log" &
  SERVER_PID=$!
  for _ in $(seq 600); do
    URL=$(grep -o 'on http://[0-9.:]*' "$log" | head -1 | sed 's/^on //') || true
    [ -n "$URL" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.2
  done
  echo "grit serve did not start" >&2; cat "$log" >&2; return 1
}
stop_server() {
  [ -n "${SERVER_PID:-}" ] && kill -TERM "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
