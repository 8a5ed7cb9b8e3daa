#!/usr/bin/env bash
# Bounded load test for `grit serve`: CLIENTS concurrent clients send REQUESTS chat requests in
# total (MAX_TOKENS each) over loopback to one server; reports completion %, errors (anything but
# 200/429), throughput and p50/p99 latency. Fails if < 90 % complete or any error other than 429.
#   CLIENTS=32 REQUESTS=256 MAX_TOKENS=32 PARALLEL=8 QUEUE=64 bench/serve_load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin grit >&2
T=${CARGO_TARGET_DIR:-target}
GRIT=$T/release/grit
MODEL=${MODEL:-$($GRIT fetch --model-only | awk '/^model/ {print $2}')}
. bench/serve_lib.sh
log=$(mktemp)
trap 'stop_server; rm -f "$log"' EXIT
start_server "$log" --model "$MODEL" --parallel "${PARALLEL:-8}" --queue "${QUEUE:-64}" --ctx 1024 ${THREADS:+--threads $THREADS}
echo "server $URL (parallel ${PARALLEL:-8}, queue ${QUEUE:-64})" >&2
python3 bench/serve_client.py load "$URL" --clients "${CLIENTS:-32}" --requests "${REQUESTS:-256}" --max-tokens "${MAX_TOKENS:-32}"
