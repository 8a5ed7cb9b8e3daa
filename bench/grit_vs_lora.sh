#!/usr/bin/env bash
# GRIT's benchmark: GRIT against plain LoRA, the parameter-matched LoRA and GRIT's own
# ablations, on two tasks, with forgetting measured as KL on general text. One table.
#
# Tasks (TASKS, default "plays chat"):
#   plays  the main job's work (scripts/demo.sh): Hamlet + Othello + King Lear, in-training
#          eval on 2048 tokens of Macbeth; general text for KL: 24 chitchat conversations.
#   chat   chitchat conversations as chat JSONL (assistant turns scored): rows 201–2200 train,
#          rows 1–200 held out for the in-training eval; general text for KL: 8 windows of
#          256 tokens of Macbeth.
# Configurations (CONFIGS, default all, in this order):
#   lora16    --method lora --rank 16 (alpha 32, scale 2)
#   grit      --method grit, default flags (rank 16; the Fisher cut, first at 70 % of the run,
#             to rank 3)
#   loram     --method lora at the uniform rank whose parameter count is nearest GRIT's final
#             count on the same task, same scale 2 (alpha = 2·rank); needs grit's run
#   grit-reg  GRIT with the curvature regularizer as a drift control (--lambda-k 3e-3)
#   grit-input GRIT with the input-signal cut (--rank-signal input): Σ_a's eigenvectors
#   grit-nopc GRIT without preconditioning (--ng-warmup beyond the run)
#   grit-nocut GRIT without rank cuts (--rank-start beyond the run: fixed rank 16)
#   grit-half GRIT with the first cut at half the run (--first-cut 0.5)
#   grit-early GRIT with the first cut at 20 % of the run (--first-cut 0.2: step 30 of 150)
#   grit-rmin4 GRIT with the previous floor (--rank-min 4)
#   grit-prev GRIT's earlier defaults (input signal, first cut at half the run, λ_K 1e-5,
#             rank-min 4)
#   grit-wide GRIT started at twice the rank (--rank 32 --alpha 64: the same scale 2)
#   lora32    --method lora --rank 32 --alpha 64 (the control for starting wider)
#   grit-wide-t85 the earlier wide setting: input signal from rank 32, τ = 0.85, first cut at
#             70 %, λ_K 1e-5
#   grit-global GRIT with one Fisher budget for the adapter (--rank-scope global)
#   grit-run  GRIT with the run budget and the input signal (--rank-budget run: later cuts do
#             not ratchet)
#   grit-output GRIT with the output-energy rank rule (--rank-signal output --rank-budget run)
#   loram-X   LoRA parameter-matched (as loram) to grit-X's final count, for any run grit-X
# Gain = step-0 eval loss − final eval loss (in-training eval, same tokens for every row).
#   STEPS=150 THREADS=2 bench/grit_vs_lora.sh           (RUNS=dir keeps the runs there)
#   TASKS=plays CONFIGS="lora16 grit" bench/grit_vs_lora.sh
#   REUSE=1 RUNS=dir bench/grit_vs_lora.sh               (only print, from earlier runs)
# Each run takes ~3–10 minutes on 2 cores (150 steps of 128 tokens, then the KL evaluation;
# 3–4 on an AMX Xeon); the whole table of both tasks ~2–3 h.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}${REUSE:-}" ] || cargo build --release --bin grit >&2
T=${CARGO_TARGET_DIR:-target}
GRIT=$T/release/grit
STEPS=${STEPS:-150}
SEQ=${SEQ:-128}
THREADS=${THREADS:-$(nproc)}
RUNS=${RUNS:-$(mktemp -d)}
TASKS=${TASKS:-plays chat}
CONFIGS=${CONFIGS:-lora16 grit loram grit-reg grit-input grit-nopc grit-nocut grit-half grit-rmin4 loram-rmin4 grit-prev loram-prev grit-wide lora32 loram-wide}
mkdir -p "$RUNS"
$GRIT fetch >/dev/null
PLAYS=$($GRIT fetch | awk '/^plays/ {print $2}')
CHAT=$($GRIT fetch | awk '/^chitchat/ {print $2}')
cat "$PLAYS/hamlet.txt" "$PLAYS/othello.txt" "$PLAYS/lear.txt" >"$RUNS/plays-train.txt"
head -n 200 "$CHAT" >"$RUNS/chat-heldout.jsonl"
sed -n '201,2200p' "$CHAT" >"$RUNS/chat-train.jsonl"

# Per task: training data, in-training eval data, general-text flags for `grit eval`.
task_args() {
  case $1 in
    plays) echo "--data $RUNS/plays-train.txt --eval-data $PLAYS/macbeth.txt" ;;
    chat) echo "--data $RUNS/chat-train.jsonl --eval-data $RUNS/chat-heldout.jsonl" ;;
  esac
}
general_args() {
  case $1 in
    plays) echo "--general $RUNS/chat-heldout.jsonl --general-max-examples 24" ;;
    chat) echo "--general $PLAYS/macbeth.txt --general-max-examples 8" ;;
  esac
}
# LoRA parameters per unit of rank on the default model (every target module: d_in + d_out).
per_rank() { python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['trainable_params'] // 16)" "$1"; }

run() { # task config
  local task=$1 cfg=$2 out="$RUNS/$1-$2" extra
  case $cfg in
    lora16) extra="--method lora --rank 16" ;;
    grit) extra="--method grit" ;;
    loram*)
      local from=grit${cfg#loram}
      [ -f "$RUNS/$task-$from/summary.json" ] && [ -f "$RUNS/$task-lora16/summary.json" ] || {
        echo "$cfg needs the $from and lora16 runs of $task" >&2
        return 1
      }
      local final per r
      final=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['trainable_params_final'])" "$RUNS/$task-$from/summary.json")
      per=$(per_rank "$RUNS/$task-lora16/summary.json")
      r=$(python3 -c "import sys; print(max(1, round(int(sys.argv[1]) / int(sys.argv[2]))))" "$final" "$per")
      extra="--method lora --rank $r --alpha $((2 * r))"
      ;;
    grit-reg) extra="--method grit --lambda-k 3e-3" ;;
    grit-input) extra="--method grit --rank-signal input" ;;
    grit-nopc) extra="--method grit --ng-warmup $((STEPS + 1))" ;;
    grit-nocut) extra="--method grit --rank-start $((STEPS + 1))" ;;
    grit-half) extra="--method grit --first-cut 0.5" ;;
    grit-early) extra="--method grit --first-cut 0.2" ;;
    grit-rmin4) extra="--method grit --rank-min 4" ;;
    grit-prev) extra="--method grit --rank-signal input --first-cut 0.5 --lambda-k 1e-5 --rank-min 4" ;;
    grit-wide) extra="--method grit --rank 32 --alpha 64" ;;
    lora32) extra="--method lora --rank 32 --alpha 64" ;;
    grit-wide-t85) extra="--method grit --rank 32 --alpha 64 --rank-signal input --rank-energy 0.85 --lambda-k 1e-5" ;;
    grit-global) extra="--method grit --rank-scope global" ;;
    grit-run) extra="--method grit --rank-signal input --rank-budget run" ;;
    grit-output) extra="--method grit --rank-signal output --rank-budget run" ;;
    *)
      echo "unknown configuration $cfg" >&2
      return 1
      ;;
  esac
  echo "$task/$cfg: $extra ($STEPS steps) ..." >&2
  # shellcheck disable=SC2046,SC2086
  $GRIT train $extra $(task_args "$task") --steps "$STEPS" --max-seq-len "$SEQ" --eval-every 50 --eval-tokens 2048 \
    --threads "$THREADS" --out "$out" --overwrite >"$out.summary.json" 2>"$out.log" || {
    cat "$out.log" >&2
    return 1
  }
  # shellcheck disable=SC2046
  $GRIT eval --json --ctx 256 --threads "$THREADS" $(general_args "$task") \
    --adapter "$out/adapter.gguf" >"$out.eval.json" 2>>"$out.log"
}

if [ -z "${REUSE:-}" ]; then
  for task in $TASKS; do
    for cfg in $CONFIGS; do
      run "$task" "$cfg"
    done
  done
fi

echo "command: STEPS=$STEPS SEQ=$SEQ TASKS=\"$TASKS\" CONFIGS=\"$CONFIGS\" bench/grit_vs_lora.sh (default flags otherwise)"
python3 - "$RUNS" "$TASKS" "$CONFIGS" <<'PY'
import json, os, sys
runs, tasks, configs = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def load(task, cfg):
    d = os.path.join(runs, f"{task}-{cfg}")
    if not os.path.exists(os.path.join(d, "metrics.jsonl")):
        return None
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    summ = json.load(open(os.path.join(d, "summary.json")))
    ev = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    kl = None
    p = d + ".eval.json"
    try:  # missing or unfinished: no KL column
        adapted = [r for r in json.load(open(p))["rows"] if r.get("adapter")]
        kl = adapted[0].get("general_kl") if adapted else None
    except (OSError, ValueError, KeyError):
        pass
    params = summ.get("trainable_params_final") or summ["trainable_params"]
    return {"first": ev[min(ev)], "last": ev[max(ev)], "gain": ev[min(ev)] - ev[max(ev)], "params": params, "kl": kl,
            "ranks": sorted(set(summ.get("rank_per_module", {}).values()))}
for task in tasks:
    res = {c: load(task, c) for c in configs}
    ref = res.get("lora16")
    print(f"\n{task}: eval loss from {next((r['first'] for r in res.values() if r), float('nan')):.4f}")
    print(f"{'config':<11} {'final eval':>10} {'gain':>7} {'gain/r16':>8} {'gain/loram':>10} {'params':>9} {'params/r16':>10} {'KL':>8}  ranks")
    for c in configs:
        r = res[c]
        if r is None:
            print(f"{c:<11} (no run)")
            continue
        g16 = r["gain"] / ref["gain"] if ref else float("nan")
        gm = r["gain"] / res["loram"]["gain"] if res.get("loram") else float("nan")
        p16 = r["params"] / ref["params"] if ref else float("nan")
        kl = f"{r['kl']:.4f}" if r["kl"] is not None else "-"
        ranks = ",".join(map(str, r["ranks"])) if len(r["ranks"]) > 1 else "uniform"
        print(f"{c:<11} {r['last']:>10.4f} {r['gain']:>7.4f} {g16:>8.3f} {gm:>10.3f} {r['params']:>9} {p16:>10.3f} {kl:>8}  {ranks}")
PY
