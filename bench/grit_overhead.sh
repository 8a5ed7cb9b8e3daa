#!/usr/bin/env bash
# GRIT's step-time overhead over plain LoRA, measured side by side in one run.
# Both methods train the default model on the same data with the same flags (defaults of
# grit train, evaluation off); ROUNDS rounds alternate LoRA and GRIT so machine noise hits
# both. The window is steps FROM..TO; its time is the wall-clock difference of the
# `elapsed_s` of metrics rows TO and FROM, so it contains everything GRIT does in those
# steps: statistics, preconditioning, regularizers, inversions, reprojections and the
# graph rebuilds after a cut. Prints the event counts inside the window, each round's
# mean step time and the ratio of the medians.
#   ROUNDS=1 STEPS=70 FROM=20 bench/grit_overhead.sh
# GRIT_FLAGS adds flags to the GRIT runs only, e.g. GRIT_FLAGS="--rank 32 --alpha 64
# --first-cut 0.7 --rank-energy 0.85" against LoRA at its defaults (rank 16).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_BUILD:-}" ] || cargo build --release --bin grit >&2
T=${CARGO_TARGET_DIR:-target}
GRIT=$T/release/grit
STEPS=${STEPS:-70}
FROM=${FROM:-20}
TO=${TO:-$STEPS}
ROUNDS=${ROUNDS:-1}
THREADS=${THREADS:-$(nproc)}
$GRIT fetch >/dev/null
DATA=${DATA:-$(dirname "$($GRIT fetch --model-only | awk '/^model/ {print $2}')")/../data/shakespeare/hamlet.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  for m in lora grit; do
    echo "round $r: $m ($STEPS steps) ..." >&2
    extra=()
    [ "$m" = grit ] && read -r -a extra <<<"${GRIT_FLAGS:-}"
    $GRIT train --method $m --data "$DATA" --steps "$STEPS" --eval-every 0 --threads "$THREADS" \
      "${extra[@]}" --out "$work/$m-$r" >/dev/null 2>"$work/log-$m-$r" || {
      cat "$work/log-$m-$r" >&2
      exit 1
    }
  done
done
python3 - "$work" "$ROUNDS" "$FROM" "$TO" <<'PY'
import json, statistics, sys, os
work, rounds, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
res = {"lora": [], "grit": []}
for r in range(1, rounds + 1):
    for m in res:
        rows = [json.loads(l) for l in open(os.path.join(work, f"{m}-{r}", "metrics.jsonl"))]
        el = {x["step"]: x["elapsed_s"] for x in rows if "loss" in x and "event" not in x}
        ev = [x for x in rows if x.get("event") and lo < x["step"] <= hi]
        inv = sum(1 for x in ev if x["event"] == "invert")
        rep = sum(1 for x in ev if x["event"] == "reproject")
        # Events after step TO are not in the window; those after FROM are (they delay FROM+1).
        mean = (el[hi] - el[lo]) / (hi - lo)
        res[m].append(mean)
        extra = f", inversions {inv}, reprojections {rep} in the window" if m == "grit" else ""
        print(f"round {r} {m:4}: mean step time over steps {lo + 1}..{hi}: {mean:.3f} s{extra}")
        if m == "grit":
            s = json.load(open(os.path.join(work, f"{m}-{r}", "summary.json")))
            print(f"           trainable params {s.get('trainable_params_initial')} -> {s.get('trainable_params_final')}")
lm, gm = statistics.median(res["lora"]), statistics.median(res["grit"])
print(f"median mean step time: LoRA {lm:.3f} s, GRIT {gm:.3f} s, GRIT/LoRA = {gm / lm:.3f} (target <= 1.10; the reference PyTorch GRIT: 1.12-1.13)")
PY
