#!/usr/bin/env bash
# Serving speed, interleaved over ROUNDS rounds (medians):
#  1. one stream through `grit serve` vs the bare llama-cpp-2 loop (bench/bare_decode.rs),
#     decode tokens/s (first to last streamed token), same model, prompt, N and threads;
#  2. one stream with a rank-16 LoRA adapter on all 7 targets vs without (same server), and
#     where the adapter time goes: rank 1 and rank 64 on all 7 targets, rank 16 on q,v only
#     (llama.cpp's runtime LoRA adds 2 matmuls + scale + add per adapted module and token),
#     the same rank-16 adapter stored as f16 and as q8_0 (`grit export --dtype`),
#     and the same rank-16 adapter served merged (`--merge-adapters`, a second server);
#  3. 8 concurrent streams vs one: aggregate tokens/s (all tokens / wall time).
#   MODEL=path N=128 ROUNDS=3 THREADS=$(nproc) bench/serve_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin grit --example bare_decode --example make_adapter >&2
T=${CARGO_TARGET_DIR:-target}
GRIT=$T/release/grit
BARE=$T/release/examples/bare_decode
MODEL=${MODEL:-$($GRIT fetch --model-only | awk '/^model/ {print $2}')}
PROMPT="Once upon a time, in a small village by the sea, there lived an old fisherman who"
N=${N:-128}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-$(nproc)}
STREAMS=${STREAMS:-8}
. bench/serve_lib.sh
work=$(mktemp -d)
trap 'stop_server; [ -n "${MERGED_PID:-}" ] && kill -TERM "$MERGED_PID" 2>/dev/null; rm -rf "$work"' EXIT
"$T/release/examples/make_adapter" "$MODEL" "$work/r16.gguf" 16 all 1 >/dev/null
"$T/release/examples/make_adapter" "$MODEL" "$work/r1.gguf" 1 all 2 >/dev/null
"$T/release/examples/make_adapter" "$MODEL" "$work/r64.gguf" 64 all 3 >/dev/null
"$T/release/examples/make_adapter" "$MODEL" "$work/qv.gguf" 16 attn_q,attn_v 4 >/dev/null
"$GRIT" export "$work/r16.gguf" "$work/r16-f16.gguf" --to gguf --dtype f16 2>/dev/null
"$GRIT" export "$work/r16.gguf" "$work/r16-q8.gguf" --to gguf --dtype q8_0 2>/dev/null
start_server "$work/mlog" --model "$MODEL" --threads "$THREADS" --ctx 2048 --parallel 1 --adapter "r16=$work/r16.gguf" --merge-adapters
MERGED_URL=$URL MERGED_PID=$SERVER_PID
start_server "$work/log" --model "$MODEL" --threads "$THREADS" --ctx 2048 --parallel "$STREAMS" \
  --adapter "r16=$work/r16.gguf" --adapter "r1=$work/r1.gguf" --adapter "r64=$work/r64.gguf" --adapter "qv=$work/qv.gguf" \
  --adapter "r16f16=$work/r16-f16.gguf" --adapter "r16q8=$work/r16-q8.gguf"
echo "server $URL, model $MODEL, N $N, threads $THREADS, rounds $ROUNDS" >&2
out=$work/rows
for r in $(seq "$ROUNDS"); do
  printf 'bare %s\n' "$($BARE "$MODEL" "$PROMPT" "$N" "$THREADS")" >>"$out"
  printf 'serve %s\n' "$(python3 bench/serve_client.py speed "$URL" --model base --tokens "$N")" >>"$out"
  printf 'adapter %s\n' "$(python3 bench/serve_client.py speed "$URL" --model r16 --tokens "$N")" >>"$out"
  for a in r1 r64 qv r16f16 r16q8; do
    printf '%s %s\n' "$a" "$(python3 bench/serve_client.py speed "$URL" --model $a --tokens "$N")" >>"$out"
  done
  printf 'merged %s\n' "$(python3 bench/serve_client.py speed "$MERGED_URL" --model r16 --tokens "$N")" >>"$out"
  printf 'multi %s\n' "$(python3 bench/serve_client.py speed "$URL" --model base --tokens "$N" --streams "$STREAMS")" >>"$out"
done
python3 - "$out" "$STREAMS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, js = line.split(" ", 1)
    rows.setdefault(who, []).append(json.loads(js))
med = lambda who, k: statistics.median(r[k] for r in rows[who])
bare = med("bare", "gen_tokens_per_s")
serve = med("serve", "per_stream_tok_s")
adapter = med("adapter", "per_stream_tok_s")
single_agg = med("serve", "aggregate_tok_s")
multi_agg = med("multi", "aggregate_tok_s")
print(f"bare llama-cpp-2 loop        {bare:8.1f} tok/s")
print(f"grit serve, 1 stream         {serve:8.1f} tok/s   ratio {serve/bare:.3f}  (target >= 0.9)")
print(f"grit serve, r16 all-7 LoRA   {adapter:8.1f} tok/s   ratio {adapter/serve:.3f}  (vs no adapter; target >= 0.9)")
ms = lambda tps: 1000.0 / tps
for who, what in [("r1", "r1 all-7 (runtime)"), ("r64", "r64 all-7 (runtime)"), ("qv", "r16 q,v only (runtime)"), ("r16f16", "r16 all-7 f16 (runtime)"), ("r16q8", "r16 all-7 q8_0 (runtime)"), ("merged", "r16 all-7 --merge-adapters")]:
    v = med(who, "per_stream_tok_s")
    print(f"grit serve, {what:<26} {v:8.1f} tok/s   ratio {v/serve:.3f}   +{ms(v) - ms(serve):5.2f} ms/token")
print(f"  per-token cost of r16 all-7 runtime: +{ms(adapter) - ms(serve):.2f} ms on {ms(serve):.2f} ms "
      f"(r1: +{ms(med('r1', 'per_stream_tok_s')) - ms(serve):.2f} ms: the part that does not scale with the rank is per-node overhead)")
print(f"1 stream aggregate           {single_agg:8.1f} tok/s   (tokens / wall, prompt and HTTP included)")
print(f"{sys.argv[2]} streams aggregate         {multi_agg:8.1f} tok/s   ratio {multi_agg/single_agg:.3f}  (target >= 1.6)")
PY
