#!/usr/bin/env bash
# Generation benchmark: `grit generate` vs the bare llama-cpp-2 loop (bench/bare_decode.rs,
# none of grit's code) on the same model, prompt, thread count and context size, interleaved
# in one run (these machines are noisy). Prints absolute tokens/s and the ratio grit / bare.
#   MODEL=path N=128 ROUNDS=5 THREADS=$(nproc) bench/generate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin grit --example bare_decode >&2
T=${CARGO_TARGET_DIR:-target}
GRIT=$T/release/grit
BARE=$T/release/examples/bare_decode
MODEL=${MODEL:-$($GRIT fetch --model-only | awk '/^model/ {print $2}')}
PROMPT=${PROMPT:-"Once upon a time, in a small village by the sea, there lived an old fisherman who"}
N=${N:-128}
ROUNDS=${ROUNDS:-5}
THREADS=${THREADS:-$(nproc)}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for r in $(seq "$ROUNDS"); do
  printf 'bare %s\n' "$($BARE "$MODEL" "$PROMPT" "$N" "$THREADS")" >>"$out"
  printf 'grit %s\n' "$($GRIT generate --model "$MODEL" --prompt "$PROMPT" --max-tokens "$N" \
      --threads "$THREADS" --ctx 2048 --ignore-eos --json)" >>"$out"
done
python3 - "$out" "$MODEL" "$N" "$THREADS" "$ROUNDS" <<'PY'
import json, statistics, sys
rows = {"bare": [], "grit": []}
for line in open(sys.argv[1]):
    who, js = line.split(" ", 1)
    rows[who].append(json.loads(js))
med = lambda who, k: statistics.median(r[k] for r in rows[who])
print(f"model {sys.argv[2]}  tokens {sys.argv[3]}  threads {sys.argv[4]}  rounds {sys.argv[5]} (median)")
print(f"{'':6} {'prompt tok/s':>14} {'gen tok/s':>12}")
for who in ("bare", "grit"):
    print(f"{who:6} {med(who,'prompt_tokens_per_s'):14.1f} {med(who,'gen_tokens_per_s'):12.1f}")
pr = med("grit", "prompt_tokens_per_s") / med("bare", "prompt_tokens_per_s")
gr = med("grit", "gen_tokens_per_s") / med("bare", "gen_tokens_per_s")
print(f"ratio  {pr:14.3f} {gr:12.3f}   (grit / bare; target: generation >= 0.95)")
PY
