#!/usr/bin/env bash
# The commands behind the README's numbers (2 CPU cores: ~1 h of training, ~20 min of eval, ~20 min of bench).
# Usage: bash scripts/reproduce.sh [index|prepare|train|eval|bench|all]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FLASHBACK_DATA:-../shared/data}
WORK=${FLASHBACK_WORK:-$HOME/.cache/flashback/recipe}
RUNS=${FLASHBACK_RUNS:-runs}
mkdir -p "$WORK" "$RUNS"
LIB=(--include 'foldoc:*' --include 'python:library/*' --include 'python:reference/*' --include 'python:c-api/*')
NOT_LIB=(--exclude 'python:library/*' --exclude 'python:reference/*' --exclude 'python:c-api/*')
step=${1:-all}

if [[ $step == index || $step == all ]]; then  # retrieval corpus: FOLDOC + the Python library reference
  flashback index "$DATA/foldoc.jsonl.gz" "$DATA/python-docs.jsonl.gz" "${LIB[@]}" --out "$WORK/index"
fi
if [[ $step == prepare || $step == all ]]; then  # training text: the other Python pages, a tenth held out
  flashback prepare "$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" \
    --out "$WORK/data-all"
fi
if [[ $step == train || $step == all ]]; then
  flashback train --data "$WORK/data-all" --out "$WORK/adapter-append" --max-steps 400 --batch-size 4 \
    --lr 3e-4 --warmup-steps 20 --eval-every 50 --save-every 25 --max-val-examples 64
fi
if [[ $step == eval || $step == all ]]; then
  ADAPTER=${ADAPTER:-src/flashback/adapters/smollm2-135m-append}
  MODES=none,prepend,append,append+markers,append+markers+adapter
  flashback eval "$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" \
    --modes "$MODES" --adapter "$ADAPTER" --limit-tokens 4000 --json "$RUNS/eval-python.json"
  flashback eval "$DATA/jargon.jsonl.gz" --index "$WORK/index" \
    --modes "$MODES" --adapter "$ADAPTER" --limit-tokens 4000 --json "$RUNS/eval-jargon.json"
  # the same targets scored from scratch: the fast path's speed ratio
  flashback eval "$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" \
    --modes append+markers+adapter --adapter "$ADAPTER" --limit-tokens 4000 --slow --json "$RUNS/eval-python-slow.json"
  # where append loses: perplexity by target offset (in the JSON)
  flashback eval "$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" \
    --modes none,prepend,append+markers+adapter --adapter "$ADAPTER" --limit-tokens 1600 --json "$RUNS/eval-offsets.json"
fi
if [[ $step == bench || $step == all ]]; then
  flashback bench --index "$HOME/.cache/flashback/indexes/default" --repeats 3 \
    --json "$RUNS/bench.json" --plot docs/bench.png
fi
