#!/usr/bin/env bash
# The whole test suite, from a fresh machine with a Rust toolchain: installs missing build
# dependencies, builds once in release (one llama.cpp build), fetches the default model and
# demo data on first use, and runs every unit and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --bins --examples
# Fetch (and verify) the default model and the demo data once, before the tests use them.
target/release/grit fetch
cargo test --release --no-fail-fast -- --test-threads=1
