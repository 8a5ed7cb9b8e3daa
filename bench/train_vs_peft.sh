#!/usr/bin/env bash
# Training benchmark: `grit train --method lora` against Hugging Face PEFT LoRA
# (bench/peft_lora.py) on the same model, the same token ids, in one run.
# Both: rank 16, alpha 32, the 7 default targets, sequence 256, batch 1, 2 threads;
# warm-up 2 steps then the median of 10. grit runs its configurations one after another,
# then PEFT. Prints absolute tokens/s, peak RSS (VmHWM of the whole process) and the ratios.
#   PY=.venv-bench/bin/python THREADS=2 CONFIGS="q8_0 f16 none stock" bench/train_vs_peft.sh
#   BATCH=4 ... : 4 sequences per step on both sides; ROUNDS=3 ... : alternate 3 times (medians)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin grit >&2
T=${CARGO_TARGET_DIR:-target}
GRIT=$T/release/grit
PY=${PY:-python3}
THREADS=${THREADS:-2}
CONFIGS=${CONFIGS:-"q8_0 f16 f32 none"}
BATCH=${BATCH:-1}   # sequences per step, both sides (grit --batch-size, peft_lora.py --batch)
ROUNDS=${ROUNDS:-1} # rounds of (grit configurations, PEFT), for medians and per-round ratios
STEPS=12
$GRIT fetch >/dev/null
DATA=${DATA:-$(dirname "$($GRIT fetch --model-only | awk '/^model/ {print $2}')")/../data/shakespeare/hamlet.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tokens=$work/tokens.json
dump=(--dump-tokens "$tokens")   # the first configuration writes the token ids PEFT trains on
for r in $(seq 1 "$ROUNDS"); do
  for c in $CONFIGS; do
    steps=$STEPS
    [ "$c" = stock ] && steps=3   # the stock out_prod path takes ~15 s per step: time 1 step after warm-up
    echo "round $r: grit --weight-copies $c ($steps steps) ..." >&2
    $GRIT train --method lora --data "$DATA" --steps $steps --eval-every 0 --threads "$THREADS" \
      --lr-schedule constant --warmup 0 --weight-copies "$c" --batch-size "$BATCH" \
      --out "$work/run-$c-$r" "${dump[@]}" \
      >/dev/null 2>"$work/log-$c" || { cat "$work/log-$c" >&2; exit 1; }
    dump=()
  done
  echo "round $r: PEFT ..." >&2
  $PY bench/peft_lora.py --tokens "$tokens" --threads "$THREADS" --batch "$BATCH" --warmup-steps 2 \
    --measure-steps 10 --json >"$work/peft-$r.json" 2>"$work/peft.log" \
    || { cat "$work/peft.log" >&2; exit 1; }
done
python3 - "$work" "$CONFIGS" "$ROUNDS" <<'PY'
import json, statistics, sys, os
work, configs, rounds = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
peft_r = [json.load(open(os.path.join(work, f"peft-{r}.json"))) for r in range(1, rounds + 1)]
med_of = statistics.median
peft = dict(peft_r[0])
peft["median_step_s"] = med_of([p["median_step_s"] for p in peft_r])
peft["tokens_per_s"] = med_of([p["tokens_per_s"] for p in peft_r])
peft["peak_rss_bytes"] = max(p["peak_rss_bytes"] for p in peft_r)
rows, paired = [], {}
for c in configs:
    steps, rss = [], 0
    for r in range(1, rounds + 1):
        d = os.path.join(work, f"run-{c}-{r}")
        m = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if '"loss"' in l]
        s = json.load(open(os.path.join(d, "summary.json")))
        timed = [x["tokens"] / x["tokens_per_s"] for x in m[2:]] or [x["tokens"] / x["tokens_per_s"] for x in m]
        steps.append(med_of(timed))
        rss = max(rss, s["peak_rss_bytes"])
        loss1, tokens = m[0]["loss"], m[0]["tokens"]
    # Each round's grit and PEFT ran minutes apart: the per-round ratio pairs them.
    paired[c] = [peft_r[r]["median_step_s"] / steps[r] for r in range(rounds)]
    med = med_of(steps)
    rows.append((c, loss1, med, tokens / med, rss))
p_tps, p_rss = peft["tokens_per_s"], peft["peak_rss_bytes"]
print(f"{'':18} {'step-1 loss':>11} {'step s':>8} {'tokens/s':>9} {'peak RSS MiB':>13} {'speed/PEFT':>10} {'RSS/PEFT':>9}")
print(f"{'PEFT (fp32)':18} {peft['step1_loss']:11.4f} {peft['median_step_s']:8.3f} {p_tps:9.1f} {p_rss/2**20:13.0f} {1:10.2f} {1:9.2f}")
for c, l1, med, tps, rss in rows:
    print(f"{'grit ' + c:18} {l1:11.4f} {med:8.3f} {tps:9.1f} {rss/2**20:13.0f} {tps/p_tps:10.2f} {rss/p_rss:9.2f}")
stock = [r for r in rows if r[0] == "stock"]
if stock:
    for c, _, med, _, _ in rows:
        if c != "stock":
            print(f"speedup of --weight-copies {c} over the stock out_prod backward: {stock[0][2]/med:.1f}x")
if rounds > 1:
    print(f"PEFT step s per round: {[round(p['median_step_s'], 3) for p in peft_r]}")
    for c in configs:
        print(f"grit {c} speed/PEFT per round: {[round(x, 2) for x in paired[c]]}, median {med_of(paired[c]):.2f}")
print("targets: default (q8_0) >= 1.0x PEFT tokens/s at <= 0.4x its peak RSS; --weight-copies none >= 0.5x at <= 0.2x")
PY
