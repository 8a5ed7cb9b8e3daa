#!/usr/bin/env bash
# The whole test suite, from a fresh machine with a Rust toolchain: installs missing build
# dependencies, builds once in release (one llama.cpp build), fetches the default model and
# demo data on first use, and runs every unit and integration test on the CPU backend. Then
# the GPU part: a second build with ggml's Vulkan backend (its own target folder,
# target-vulkan/, so the CPU build is kept) and the GPU tests (tests/gpu_backend.rs, the
# finite-difference check, forward parity on tiny models) on a Vulkan device. Without a GPU that device is Mesa's lavapipe, a conformant Vulkan driver running
# on the CPU (GGML_VK_VISIBLE_DEVICES=0 lets ggml use a device of type CPU): slow, but it is
# ggml's real Vulkan backend, with its own kernels, buffers and scheduler splits.
# GRIT_TEST_VULKAN=0 skips the GPU part (and its packages).
set -euo pipefail
cd "$(dirname "$0")/.."
VULKAN=${GRIT_TEST_VULKAN:-1}
if [ "$VULKAN" = 1 ]; then
  bash scripts/install-deps.sh --vulkan
else
  bash scripts/install-deps.sh
fi
T0=$SECONDS
cargo build --release --bins --examples
# Fetch (and verify) the default model and the demo data once, before the tests use them.
target/release/grit fetch
echo "test.sh: CPU build $((SECONDS - T0)) s" >&2
status=0
# Formatting and lints (rustfmt.toml; clippy with warnings as errors), where the toolchain has
# the rustfmt and clippy components (rustup's default profile does).
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
  cargo fmt --check || { echo "test.sh: cargo fmt --check failed (run cargo fmt)" >&2; status=1; }
  cargo clippy --release --all-targets -- -D warnings || status=1
else
  echo "test.sh: lints skipped: this toolchain lacks rustfmt or clippy (rustup component add rustfmt clippy)" >&2
fi
T1=$SECONDS
cargo test --release --no-fail-fast -- --test-threads=1 || status=1
echo "test.sh: CPU tests $((SECONDS - T1)) s" >&2
if [ "$VULKAN" = 1 ]; then
  T2=$SECONDS
  export CARGO_TARGET_DIR=target-vulkan
  cargo build --release --features vulkan --bins
  echo "test.sh: Vulkan build $((SECONDS - T2)) s" >&2
  T3=$SECONDS
  target-vulkan/release/grit info --json >/dev/null
  # lavapipe runs its shaders on the same CPU cores, and ggml-vulkan spin-waits for a graph's
  # end on one of them: serialized submissions wait in the driver instead (3 default-model
  # steps at 16 tokens: 85 s instead of 102 s on 2 AMD EPYC cores).
  export GGML_VK_SERIALIZE_SUBMISSIONS=${GGML_VK_SERIALIZE_SUBMISSIONS:-1}
  # Device selection, no CPU-only or CPU-fallback node in GPU graphs, the GPU step against the
  # CPU's, 20 LoRA and 20 GRIT steps against the CPU's curves with export and generate, serve.
  GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0} GRIT_DEVICE=gpu \
    cargo test --release --features vulkan --no-fail-fast \
    --test gpu_backend -- --test-threads=1 || status=1
  # The GPU step's LoRA gradients against finite differences, tiny F32/Q4_0/Q4_1/Q8_0/Q4_K
  # LLaMAs, and F32/Q4_1 Qwen2, Qwen3, Phi-3 and Gemma 3.
  GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0} GRIT_DEVICE=gpu \
    cargo test --release --features vulkan --no-fail-fast \
    --test train_gradients -- --test-threads=1 lora_gradients_match other_architectures \
    || status=1
  # Forward parity against llama.cpp on the same Vulkan device, tiny models (F32 LLaMA, Qwen2,
  # fused-qkv Qwen2, Qwen3, Phi-3 and Gemma 3, Q8_0/Q4_0/Q4_1/Q4_K LLaMAs): bit-identical logits when both engines accumulate in
  # F32. GGML_VK_DISABLE_F16 makes llama.cpp's default-precision matmuls F32 like grit's
  # (with F16 accumulation the Q8_0 model differs by rms 1e-2). ~4.5 min on lavapipe; the
  # default-model cases (~7 min each there) run where the GPU is fast (scripts/gpu-check.sh).
  GGML_VK_DISABLE_F16=1 GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0} GRIT_DEVICE=gpu \
    cargo test --release --features vulkan --no-fail-fast \
    --test forward_parity tiny_ -- --test-threads=1 || status=1
  echo "test.sh: Vulkan tests $((SECONDS - T3)) s" >&2
fi
exit $status
