#!/usr/bin/env bash
# Hugging Face check of grit's PEFT export (see bench/hf_peft_check.py for the bounds):
# exports a grit adapter to a PEFT folder, loads it with PeftModel.from_pretrained on the GGUF
# base (transformers, gguf_file=), and compares the logits with grit's on the same tokens.
#   PY=/tmp/peft-venv/bin/python bench/hf_peft_check.sh [ADAPTER.gguf]
# Without ADAPTER it trains one first: LoRA on attn_q, attn_k, attn_v of the default model,
# a few steps on Hamlet (the adapter must touch attn_q and attn_k: llama's q/k rows are
# permuted between GGUF and Hugging Face, and this checks that the export undoes it).
# Env: MODEL (default: grit's default model), N (tokens, default 256), THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin grit --example adapter_logits >&2
T=${CARGO_TARGET_DIR:-target}
GRIT=$T/release/grit
LOGITS=$T/release/examples/adapter_logits
PY=${PY:-python3}
N=${N:-256}
THREADS=${THREADS:-2}
MODEL=${MODEL:-$($GRIT fetch --model-only | awk '/^model/ {print $2}')}
DATA=$(dirname "$MODEL")/../data/shakespeare
$GRIT fetch >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ADAPTER=${1:-}
if [ -z "$ADAPTER" ]; then
  echo "training a LoRA adapter on attn_q,attn_k,attn_v (8 steps) ..." >&2
  $GRIT train --model "$MODEL" --data "$DATA/hamlet.txt" --targets attn_q,attn_k,attn_v --rank 8 --alpha 16 \
    --lr 3e-3 --steps 8 --max-seq-len 128 --eval-every 0 --threads "$THREADS" --out "$work/run" >/dev/null 2>"$work/train.log" \
    || { cat "$work/train.log" >&2; exit 1; }
  ADAPTER=$work/run/adapter.gguf
fi
$GRIT inspect "$ADAPTER" | head -6
$GRIT export "$ADAPTER" --to peft "$work/peft" --model "$MODEL"
# The same base weights, dequantized to F32 (see hf_peft_check.py for why).
$GRIT merge --model "$MODEL" --adapter "$ADAPTER" --scale 0 --type f32 --convert-all --out "$work/base-f32.gguf"
echo "grit logits ..." >&2
$LOGITS "$work/base-f32.gguf" "$ADAPTER" "$DATA/macbeth.txt" "$N" "$work/grit"
echo "Hugging Face PEFT ..." >&2
$PY bench/hf_peft_check.py --model "$work/base-f32.gguf" --peft "$work/peft" --grit "$work/grit" --threads "$THREADS"
