#!/usr/bin/env bash
# The GPU check for a machine with an NVIDIA GPU, in one run of at most ~10 minutes:
#   1. a CUDA build (its own target folder, target-cuda/) for this GPU's architecture only
#      (CMAKE_CUDA_ARCHITECTURES from nvidia-smi), so ggml-cuda compiles in minutes rather
#      than for every architecture;
#   2. the GPU test subset on it (the same backend-generic tests CI runs on Vulkan:
#      GRIT_DEVICE=gpu);
#   3. a side-by-side bench in the same run: training tokens/s (grit train, the default model,
#      LoRA) and generation tokens/s (grit generate) on the CPU and on the GPU;
#   4. a summary (also written to $GPU_CHECK_OUT/summary.txt).
# Needs: nvidia-smi, the CUDA toolkit (nvcc; its static cudart/cuBLAS, which the sys crate
# links), a Rust toolchain with the crates fetched, and the build dependencies of
# scripts/install-deps.sh. Everything is logged under $GPU_CHECK_OUT (default
# target-cuda/gpu-check). GPU_CHECK_STEPS (default 10) sets the bench's training steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${GPU_CHECK_OUT:-target-cuda/gpu-check}
STEPS=${GPU_CHECK_STEPS:-10}
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
say() { echo "gpu-check: $*" | tee -a "$SUMMARY" >&2; }
fail() {
  say "FAILED: $*"
  exit 1
}

command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this script needs an NVIDIA GPU and its driver"
command -v cargo >/dev/null || fail "cargo not found: install a Rust toolchain (rustup)"
if ! command -v nvcc >/dev/null; then
  for d in /usr/local/cuda/bin /opt/cuda/bin; do [ -x "$d/nvcc" ] && export PATH="$d:$PATH"; done
fi
command -v nvcc >/dev/null || fail "nvcc not found: install the CUDA toolkit (or put its bin/ on PATH)"

GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n1)
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')
[ -n "$CAP" ] || fail "nvidia-smi reported no compute capability"
say "GPU: $GPU (compute capability ${CAP:0:${#CAP}-1}.${CAP: -1}), $(nvcc --version | tail -n1)"
say "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores"

# llama-cpp-sys-2's build script passes every CMAKE_* environment variable to llama.cpp's
# CMake as -D, so this builds ggml-cuda for this GPU only. It does not rerun CMake when such a
# variable changes: a build for another architecture needs its own target folder.
export CMAKE_CUDA_ARCHITECTURES="$CAP"
export CARGO_TARGET_DIR=target-cuda/sm_$CAP
# The toolkit root: CMake finds it from nvcc; the link step searches CUDA_LIBRARY_PATH (the
# root, not its lib64/) besides /usr/local/cuda* and /opt/cuda.
ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
export CUDAToolkit_ROOT=${CUDAToolkit_ROOT:-$ROOT} CUDA_LIBRARY_PATH=${CUDA_LIBRARY_PATH:-$ROOT}
bash scripts/install-deps.sh >"$OUTDIR/install-deps.log" 2>&1 || fail "install-deps.sh (see $OUTDIR/install-deps.log)"

T=$SECONDS
if ! cargo build --release --features cuda --bins --tests >"$OUTDIR/build.log" 2>&1; then
  tail -n 30 "$OUTDIR/build.log" >&2
  fail "CUDA build (see $OUTDIR/build.log)"
fi
say "CUDA build (sm_$CAP only): $((SECONDS - T)) s"
GRIT=$CARGO_TARGET_DIR/release/grit
$GRIT info | tee "$OUTDIR/info.txt" >&2
$GRIT fetch >/dev/null 2>&1 || fail "grit fetch (the default model and data)"

T=$SECONDS
status=0
GRIT_DEVICE=gpu cargo test --release --features cuda --no-fail-fast \
  --test gpu_backend --test forward_parity --test train_gradients -- --test-threads=1 \
  >"$OUTDIR/tests.log" 2>&1 || status=1
grep -E '^test |test result' "$OUTDIR/tests.log" >&2
if [ $status = 0 ]; then say "GPU tests passed ($((SECONDS - T)) s)"; else say "GPU tests FAILED ($((SECONDS - T)) s, see $OUTDIR/tests.log)"; fi

# The bench: the same run on each device, one after the other in this process tree.
bench_train() { # device → tokens/s of the last logged step
  local dev=$1 out="$OUTDIR/train-$1"
  rm -rf "$out"
  $GRIT train --device "$dev" --method lora --steps "$STEPS" --max-seq-len 256 --eval-every 0 \
    --out "$out" >"$OUTDIR/train-$dev.log" 2>&1 || {
    echo "failed"
    return
  }
  # Median tokens/s of the steps after the first (which compiles kernels).
  tail -n +2 "$out/metrics.jsonl" | grep -o '"tokens_per_s":[0-9.]*' | cut -d: -f2 | sort -g | awk '{v[NR]=$1} END {print (NR ? v[int((NR+1)/2)] : "n/a")}'
}
bench_generate() { # device → generated tokens/s
  local dev=$1
  $GRIT generate --device "$dev" --prompt "Once upon a time" -n 128 --ignore-eos --json \
    >"$OUTDIR/generate-$dev.json" 2>"$OUTDIR/generate-$dev.log" || {
    echo "failed"
    return
  }
  grep -o '"gen_tokens_per_s":[0-9.]*' "$OUTDIR/generate-$dev.json" | cut -d: -f2
}
TC=$(bench_train cpu)
TG=$(bench_train gpu)
GC=$(bench_generate cpu)
GG=$(bench_generate gpu)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.1fx", b / a; else print "n/a" }'; }
say "train (LoRA, 256-token sequences, $STEPS steps): CPU $TC tok/s, GPU $TG tok/s, GPU/CPU $(ratio "$TC" "$TG")"
say "generate (128 tokens): CPU $GC tok/s, GPU $GG tok/s, GPU/CPU $(ratio "$GC" "$GG")"
say "summary in $SUMMARY; logs in $OUTDIR"
exit $status
