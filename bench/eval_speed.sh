#!/usr/bin/env bash
# Evaluation benchmark: `grit eval` against the bare llama-cpp-2 scoring loop
# (bench/bare_score.rs: windows of CTX tokens decoded in one batch each with logits at every
# position; none of grit's code) on the same model, text, windows, context and threads,
# interleaved in one run (these machines are noisy). Two cases: the base alone, and the base
# plus one adapter (grit scores both rows and the KL between them; the bare loop decodes the
# windows once without and once with the adapter, in one process). Wall time of each whole process (load,
# tokenize, score); prints tokens/s and the ratio grit / bare (target: >= 0.8).
#   MODEL=path CTX=256 WINDOWS=8 ROUNDS=3 THREADS=$(nproc) bench/eval_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin grit --example bare_score --example make_adapter >&2
T=${CARGO_TARGET_DIR:-target}
GRIT=$T/release/grit
BARE=$T/release/examples/bare_score
MODEL=${MODEL:-$($GRIT fetch --model-only | awk '/^model/ {print $2}')}
TEXT=${TEXT:-$($GRIT fetch | awk '/^plays/ {print $2}')/macbeth.txt}
CTX=${CTX:-256}
WINDOWS=${WINDOWS:-8}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-$(nproc)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ADAPTER=$tmp/adapter.gguf
$T/release/examples/make_adapter "$MODEL" "$ADAPTER" 16 all 1 >&2
secs() { local t0=$EPOCHREALTIME; "$@" >/dev/null 2>&1; awk "BEGIN {print $EPOCHREALTIME - $t0}"; }
out=$tmp/rows
for r in $(seq "$ROUNDS"); do
  echo "bare-base $(secs $BARE "$MODEL" "$TEXT" "$CTX" "$WINDOWS" "$THREADS")" >>"$out"
  echo "grit-base $(secs $GRIT eval --model "$MODEL" --data "$TEXT" --ctx "$CTX" --max-examples "$WINDOWS" --threads "$THREADS" --json)" >>"$out"
  echo "bare-adapter $(secs $BARE "$MODEL" "$TEXT" "$CTX" "$WINDOWS" "$THREADS" "$ADAPTER")" >>"$out"
  echo "grit-adapter $(secs $GRIT eval --model "$MODEL" --data "$TEXT" --ctx "$CTX" --max-examples "$WINDOWS" --threads "$THREADS" --adapter "$ADAPTER" --json)" >>"$out"
done
python3 - "$out" "$MODEL" "$CTX" "$WINDOWS" "$THREADS" "$ROUNDS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    k, v = line.split()
    rows.setdefault(k, []).append(float(v))
ctx, win = int(sys.argv[3]), int(sys.argv[4])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = open("/proc/cpuinfo").read()
isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
print(f"model {sys.argv[2]}  CPU {cpu} ({isa})  threads {sys.argv[5]}  {win} windows x {ctx} tokens  rounds {sys.argv[6]} (median wall s)")
print(f"{'case':10} {'bare s':>8} {'grit s':>8} {'bare tok/s':>11} {'grit tok/s':>11} {'grit/bare':>10}")
for case, rows_per in (("base", 1), ("adapter", 2)):
    b, g = statistics.median(rows[f"bare-{case}"]), statistics.median(rows[f"grit-{case}"])
    n = win * ctx * rows_per
    print(f"{case:10} {b:8.2f} {g:8.2f} {n/b:11.1f} {n/g:11.1f} {b/g:10.3f}")
print("target: grit/bare >= 0.8 in both cases (the adapter case includes grit's KL and drift)")
PY
