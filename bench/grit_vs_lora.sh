#!/usr/bin/env bash
# GRIT against plain LoRA on the same work (the quality comparison in docs/GRIT.md): the default model,
# default flags, STEPS steps on Hamlet with Macbeth as the held-out play, the same seed.
# Prints both eval-loss curves, the gains (step-0 eval loss - final eval loss), the ratio
# GRIT/LoRA, trainable parameters, GRIT's events and its final per-layer rank table.
#   STEPS=120 THREADS=2 bench/grit_vs_lora.sh            (RUNS=dir keeps the runs there)
#   REUSE=1 RUNS=dir bench/grit_vs_lora.sh               (only print, from earlier runs)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}${REUSE:-}" ] || cargo build --release --bin grit >&2
T=${CARGO_TARGET_DIR:-target}
GRIT=$T/release/grit
STEPS=${STEPS:-120}
THREADS=${THREADS:-$(nproc)}
RUNS=${RUNS:-$(mktemp -d)}
$GRIT fetch >/dev/null
P=$(dirname "$($GRIT fetch --model-only | awk '/^model/ {print $2}')")/../data/shakespeare
if [ -z "${REUSE:-}" ]; then
  for m in lora grit; do
    echo "$m: $STEPS steps ..." >&2
    $GRIT train --method $m --data "$P/hamlet.txt" --eval-data "$P/macbeth.txt" --steps "$STEPS" \
      --threads "$THREADS" --out "$RUNS/$m" --overwrite >/dev/null 2>"$RUNS/$m.log" || { cat "$RUNS/$m.log" >&2; exit 1; }
  done
fi
echo "command: grit train --method {lora,grit} --data hamlet.txt --eval-data macbeth.txt --steps $STEPS (default flags)"
python3 - "$RUNS" <<'PY'
import json, os, sys, collections
runs = sys.argv[1]
def load(m):
    rows = [json.loads(l) for l in open(os.path.join(runs, m, "metrics.jsonl"))]
    return rows, json.load(open(os.path.join(runs, m, "summary.json")))
(lr, ls), (gr, gs) = load("lora"), load("grit")
ev = lambda rows: {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
el, eg = ev(lr), ev(gr)
print(f"{'step':>5} {'LoRA eval':>10} {'GRIT eval':>10}")
for s in sorted(set(el) | set(eg)):
    print(f"{s:>5} {el.get(s, float('nan')):10.4f} {eg.get(s, float('nan')):10.4f}")
def mean_train(rows, lo, hi):
    v = [r["loss"] for r in rows if "loss" in r and "event" not in r and lo <= r["step"] <= hi]
    return sum(v) / max(len(v), 1)
last = max(el)
print(f"mean train loss over the last 20 steps: LoRA {mean_train(lr, last - 19, last):.4f}, GRIT {mean_train(gr, last - 19, last):.4f}")
gl, gg = el[0] - el[last], eg[0] - eg[last]
print(f"gain (step-0 eval - final eval): LoRA {gl:.4f}, GRIT {gg:.4f}, GRIT/LoRA = {gg / gl:.3f} (target >= 0.9)")
pl, pg = ls["trainable_params"], gs["trainable_params_final"]
print(f"trainable params: LoRA {pl}, GRIT {gs['trainable_params_initial']} -> {pg}, GRIT/LoRA = {pg / pl:.3f} (target <= 0.75)")
ranks = gs["rank_per_module"]
print(f"distinct ranks: {sorted(set(ranks.values()))} ({len(set(ranks.values()))}; target >= 3)")
print(f"inversions {gs.get('inversions')}, reprojections {gs.get('reprojections')} at steps "
      f"{[r['step'] for r in gr if r.get('event') == 'reproject']}")
print(f"tokens/s: LoRA {ls.get('tokens_per_s', float('nan')):.1f}, GRIT {gs.get('tokens_per_s', float('nan')):.1f}")
targets = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
layers = sorted({int(k.split(".")[1]) for k in ranks})
print("final rank per layer and module:")
print("layer " + " ".join(f"{t:>11}" for t in targets))
for l in layers:
    print(f"{l:>5} " + " ".join(f"{ranks.get(f'blk.{l}.{t}.weight', '-'):>11}" for t in targets))
PY
