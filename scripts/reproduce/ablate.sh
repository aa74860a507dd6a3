#!/usr/bin/env bash
# Recipe ablations for the append adapter (README "Choosing the recipe"): short packed runs on the
# prepared data, compared by validation loss. Each run resumes if a checkpoint exists and is skipped
# if its adapter is already there, so the script can be re-run after an interruption.
# Usage: bash scripts/reproduce/ablate.sh [RUN...]   (default: every run below but the tail-* ones; needs `reproduce/smollm2.sh index
# prepare`). The tail-* runs are the tail choice in the recipe of the second model (all linear layers, marker lr
# 5e-3): `reproduce/gemma.sh tails` runs them with ABLATE_MODEL=gemma3-270m on its own data.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${FLASHBACK_WORK:-$HOME/.cache/flashback/recipe}
OUT=${ABLATE_OUT:-$WORK/ablate}
STEPS=${ABLATE_STEPS:-60}
TAIL=${ABLATE_TAIL:-32}  # the tail used for the runs that vary something else
mkdir -p "$OUT"
COMMON=(--data "$WORK/data" --max-steps "$STEPS" --batch-size 1 --lr 5e-4 --warmup-steps 4 --eval-every 30
  --save-every 10 --max-val-segments 8 --quiet)
[[ -n ${ABLATE_MODEL:-} ]] && COMMON+=(--model "$ABLATE_MODEL")
QV=q_proj,v_proj
QKVO=q_proj,k_proj,v_proj,o_proj
ALL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
declare -A RUNS=(
  [tail0]="--tail 0 --target-modules $QV"
  [tail8]="--tail 8 --target-modules $QV"
  [tail16]="--tail 16 --target-modules $QV"
  [tail32]="--tail 32 --target-modules $QV"
  [qkvo]="--tail $TAIL --target-modules $QKVO"
  [all]="--tail $TAIL --target-modules $ALL"
  [markerlr]="--tail $TAIL --target-modules $QV --marker-lr 5e-3"
  [early]="--tail $TAIL --target-modules $QV --early-weight 3 --early-tokens 2"
  [tail-0]="--tail 0 --target-modules $ALL --marker-lr 5e-3"
  [tail-16]="--tail 16 --target-modules $ALL --marker-lr 5e-3"
  [tail-32]="--tail 32 --target-modules $ALL --marker-lr 5e-3"
  [tail-64]="--tail 64 --target-modules $ALL --marker-lr 5e-3"
)
ORDER=(tail0 tail32 tail16 tail8 qkvo all markerlr early)
for name in "${@:-${ORDER[@]}}"; do
  [[ -n ${RUNS[$name]+x} ]] || { echo "unknown run $name" >&2; exit 2; }
  if [[ -f $OUT/$name/flashback.json ]]; then echo "$name: done"; continue; fi
  resume=(); [[ -f $OUT/$name.checkpoint/state.pt ]] && resume=(--resume)
  echo "$name: flashback train ${RUNS[$name]}"
  # shellcheck disable=SC2086
  flashback train "${COMMON[@]}" ${RUNS[$name]} --out "$OUT/$name" "${resume[@]}" > "$OUT/$name.json" 2> "$OUT/$name.log"
done
python3 - "$OUT" "${@:-${ORDER[@]}}" <<'EOF'
import json, math, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | settings | val loss before | val loss after | val ppl after | offsets 1-3 (nll) | target tokens/s |")
print("|---|---|---|---|---|---|---|")
for name in sys.argv[2:]:
    card = out / name / "flashback.json"
    if not card.exists():
        continue
    c = json.loads(card.read_text())
    s, last = c["settings"], c["history"][-1]
    what = f"tail {s['tail']}, {'/'.join(m.split('_')[0] for m in s['target_modules'])}"
    if s.get("marker_lr"):
        what += f", marker lr {s['marker_lr']:g}"
    if s.get("early_weight", 1) != 1:
        what += f", early weight {s['early_weight']:g} x{s['early_tokens']}"
    print(f"| {name} | {what} | {c['val_loss_before']:.4f} | {c['val_loss_after']:.4f} | "
          f"{math.exp(c['val_loss_after']):.2f} | {last.get('val_by_offset', [])[:3]} | "
          f"{c['target_tokens'] / c['seconds']:.1f} |")
EOF
