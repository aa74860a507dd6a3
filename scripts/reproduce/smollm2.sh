#!/usr/bin/env bash
# The commands behind the README's numbers (2 CPU cores). Steps, in order:
#   index      retrieval corpus: FOLDOC + the Python library reference (~30 s)
#   prepare    training segments from the other Python pages, a tenth held out (~2 min)
#   throughput training target tokens/s: one example per row vs packed, fp32 vs bf16 (~10 min)
#   ablate     the recipe ablations, 60 steps each (scripts/reproduce/ablate.sh, ~80 min)
#   train      the shipped append adapter (~80 min; resumes from its checkpoint when re-run)
#   prepend    a prepend adapter with the ablations' budget, for the fine-tuned-vs-fine-tuned comparison (~25 min)
#   eval       perplexity on the held-out Python pages and the Jargon File (~25 min)
#   eval-prepend  the prepend adapter on the same tokens (~6 min)
#   eval-long  long contexts: 8,192-token windows (4,096 to 8,040 tokens of context before each target) on the
#              held-out Python pages (four of them are 12k-34k tokens long), LONG_TOKENS target tokens (default
#              1,024) spread over them, none / prepend / the shipped adapter (LONG_MODES; ~35 min)
#   bench      append vs prepend speed on the default index (~25 min; BENCH_LENGTHS=2048 for one length)
#   decode     the compiled decode step at L=2048,4096 (fp32, then int8), the eager one at 2048, then --compile
#              auto's choice for 48 and 1,536 tokens in fresh processes, compile time included (~55 min)
#   eval-int8  the perplexity cost of --quantize int8 on the held-out Python pages (~10 min)
#   llamacpp   the shipped adapter exported to f16 GGUF, then the bench on llama.cpp at L=2048, and the same
#              export on PyTorch in the same run, then llama.cpp with flash attention, then a q4_1 export's
#              bench and the f16 one again without PyTorch beside it (~35 min; needs scripts/setup_engines.sh)
#   upstream   that export served by llama-server (one slot, 2 threads), then the bench with --upstream at
#              L=2048, and the export on PyTorch in the same run (~12 min; needs the llamacpp step's export)
#   vllm       the same export's folder served by vLLM's CPU build (scripts/vllm_server.sh), then the bench with
#              --upstream at L=2048 beside PyTorch (~15 min; needs setup_engines.sh --vllm and the export)
#   harness    lm-evaluation-harness (local-completions) against `flashback serve` with the shipped adapter on the
#              recipe index: rolling perplexity of three held-out Python pages in modes none, prepend, append (~10 min;
#              needs the index step)
#   chat       the chat bench: a 10-turn conversation (questions from the standard library's docstrings, answered
#              from the default index) in four layouts, on PyTorch, then llama-server and vLLM on the f16 export,
#              one after the other (~40 min; the engines need the llamacpp step's export and setup_engines.sh --vllm)
#   qa         the grounded QA evaluation: 100 held-out questions, answer perplexity and F1 per layout, BM25 and gold
#              passages (~30 min)
#   qa-jargon  the same on the second genre: 100 held-out Jargon File entries ("What is TITLE?", the definition's
#              first sentence), over a glossary index of the Jargon File and FOLDOC (built first, ~1 min; ~30 min)
#   chat-adapter  an append adapter for chat: the prepare step's running text mixed with one-turn chats of both
#              genres from what the QA evaluations do not hold out (`flashback qa --prepare [--entries]`), then both
#              QA evaluations with it (~90 min; needs the index and prepare steps)
#   chat-query the chat retrieval policy: FlashBack with the chat adapter (CHAT_ADAPTER, default the shipped one)
#              answers 48 tokens of both QA genres retrieving every 16, its later queries the last tokens (the
#              paper's) or the question and the answer's last tokens (CHAT_QUERIES; ~60 min)
# Usage: bash scripts/reproduce/smollm2.sh [STEP|all]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${FLASHBACK_DATA:-../shared/data}
WORK=${FLASHBACK_WORK:-$HOME/.cache/flashback/recipe}
RUNS=${FLASHBACK_RUNS:-runs}
mkdir -p "$WORK" "$RUNS"
LIB=(--include 'foldoc:*' --include 'python:library/*' --include 'python:reference/*' --include 'python:c-api/*')
NOT_LIB=(--exclude 'python:library/*' --exclude 'python:reference/*' --exclude 'python:c-api/*')
SHIPPED=src/flashback/adapters/smollm2-135m-append
step=${1:-all}
run() { [[ $step == "$1" || $step == all ]]; }
# A server in the background for one step: started, waited for until PROBE answers (its log's tail if it dies first),
# stopped before the next step so that nothing else runs during the next timing.
start_server() {  # LOG PROBE_URL COMMAND...
  local log=$1 probe=$2
  shift 2
  "$@" >"$log" 2>&1 &
  server_pid=$!
  trap 'kill $server_pid 2>/dev/null' EXIT
  until curl -sf "$probe" >/dev/null; do
    kill -0 $server_pid 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
    sleep 1
  done
}
stop_server() { kill $server_pid; wait $server_pid 2>/dev/null || true; trap - EXIT; }
# llama-server on the f16 export: one slot, 2 threads, no host-memory prompt cache (each bench run starts cold)
start_llama_server() {  # LOG PORT
  local server
  server=$(python3 -c "from flashback.engines.upstream import llama_server_path; print(llama_server_path() or '')")
  [[ -n $server ]] || { echo "no llama-server: run scripts/setup_engines.sh" >&2; exit 1; }
  start_server "$1" "http://127.0.0.1:$2/health" "$server" -m "$WORK/export-f16/model-f16.gguf" -c 8192 -np 1 -t 2 \
    -tb 2 --cache-ram 0 --host 127.0.0.1 --port "$2"
}
start_vllm() {  # LOG PORT
  start_server "$1" "http://127.0.0.1:$2/v1/models" bash scripts/vllm_server.sh "$WORK/export-f16" "$2"
}

if run index; then
  flashback index "$DATA/foldoc.jsonl.gz" "$DATA/python-docs.jsonl.gz" "${LIB[@]}" --out "$WORK/index"
fi
if run prepare; then
  flashback prepare "$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" --out "$WORK/data"
fi
if run throughput; then
  flashback train --data "$WORK/data" --out "$WORK/unused" --tail 32 --batch-size 4 --throughput 2 \
    > "$RUNS/throughput.json"
fi
if run ablate; then
  bash scripts/reproduce/ablate.sh > "$RUNS/ablate.md"
fi
ALL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj  # the ablation's best LoRA targets
if run train; then  # the recipe the ablations chose: tail 32, LoRA on all linear layers, marker rows at 10x lr
  resume=(); [[ -f $WORK/adapter-append.checkpoint/state.pt ]] && resume=(--resume)
  flashback train --data "$WORK/data" --out "$WORK/adapter-append" --tail 32 --target-modules "$ALL" \
    --marker-lr 5e-3 --max-steps "${TRAIN_STEPS:-400}" --batch-size 1 --lr 5e-4 --warmup-steps 20 --eval-every 100 \
    --save-every 25 --max-val-segments 8 "${resume[@]}"
  rm -rf "$SHIPPED" && cp -r "$WORK/adapter-append" "$SHIPPED"
fi
if run prepend; then  # the same LoRA and the ablations' budget (60 steps of ~20 targets), one example per row
  resume=(); [[ -f $WORK/adapter-prepend.checkpoint/state.pt ]] && resume=(--resume)
  flashback train --data "$WORK/data" --out "$WORK/adapter-prepend" --mode prepend --no-markers --no-pack \
    --target-modules "$ALL" --max-steps 60 --batch-size 4 --grad-accum 5 --lr 5e-4 --warmup-steps 4 \
    --eval-every 30 --save-every 10 --max-val-segments 8 "${resume[@]}"
fi
EVAL_PY=("$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" --limit-tokens 4000)
EVAL_JARGON=("$DATA/jargon.jsonl.gz" --index "$WORK/index" --limit-tokens 4000)  # title leakage filter is built in
if run eval; then  # the shipped append adapter against the untuned baselines, the same tokens for every mode
  MODES=(--modes none,prepend,append+markers,append+markers+adapter --adapter "${ADAPTER:-$SHIPPED}")
  flashback eval "${EVAL_PY[@]}" "${MODES[@]}" --json "$RUNS/eval-python.json"
  flashback eval "${EVAL_JARGON[@]}" "${MODES[@]}" --json "$RUNS/eval-jargon.json"
fi
if run eval-prepend; then  # fine-tuned vs fine-tuned: the prepend adapter on the same tokens
  MODES=(--modes prepend+adapter --adapter "$WORK/adapter-prepend")
  flashback eval "${EVAL_PY[@]}" "${MODES[@]}" --json "$RUNS/eval-python-prepend.json"
  flashback eval "${EVAL_JARGON[@]}" "${MODES[@]}" --json "$RUNS/eval-jargon-prepend.json"
fi
if run eval-long; then
  MODES=(--modes "${LONG_MODES:-none,prepend,append+markers+adapter}" --adapter "$SHIPPED")
  flashback eval "$DATA/python-docs.jsonl.gz" "${NOT_LIB[@]}" --heldout 0.1 --index "$WORK/index" --max-length 8192 \
    --min-context 4096 --limit-tokens "${LONG_TOKENS:-1024}" "${MODES[@]}" --json "$RUNS/eval-python-long.json"
fi
if run bench; then  # the default index (built on first use): real text for contexts and passages
  INDEX=$(python3 -c "from flashback.api import DEFAULT_INDEX, load_index; load_index(); print(DEFAULT_INDEX)")
  flashback bench --index "$INDEX" --context-lengths "${BENCH_LENGTHS:-512,1024,2048,4096}" --repeats 3 \
    --compile off --json "$RUNS/bench.json" --plot docs/bench.png  # eager decode, as the figures it gives are
fi
if run decode; then
  INDEX=$(python3 -c "from flashback.api import DEFAULT_INDEX, load_index; load_index(); print(DEFAULT_INDEX)")
  flashback bench --index "$INDEX" --context-lengths 2048,4096 --repeats 3 --no-lora --compile \
    --json "$RUNS/bench-compile.json"
  flashback bench --index "$INDEX" --context-lengths 2048,4096 --repeats 3 --no-lora --compile --quantize int8 \
    --json "$RUNS/bench-compile-int8.json"
  flashback bench --index "$INDEX" --context-lengths 2048 --repeats 3 --no-lora --compile off \
    --json "$RUNS/bench-eager.json"
  python3 scripts/lab/compile_default.py --json "$RUNS/compile-default.json"
fi
if run eval-int8; then
  for q in "" "--quantize int8"; do  # same tokens, same adapter; int8 = the decode step's weights
    flashback eval "${EVAL_PY[@]}" --modes append+markers+adapter --adapter "$SHIPPED" $q \
      --json "$RUNS/eval-python-int8${q:+-on}.json"
  done
fi
if run llamacpp; then
  INDEX=$(python3 -c "from flashback.api import DEFAULT_INDEX, load_index; load_index(); print(DEFAULT_INDEX)")
  flashback export --gguf f16 --out "$WORK/export-f16"
  flashback bench --engine llamacpp --model "$WORK/export-f16" --index "$INDEX" --context-lengths 2048 --repeats 3 \
    --beside-torch --compile off --json "$RUNS/bench-llamacpp.json"
  flashback bench --engine llamacpp --flash-attn --model "$WORK/export-f16" --index "$INDEX" --context-lengths 2048 \
    --repeats 3 --json "$RUNS/bench-llamacpp-flash-attn.json"
  flashback export --gguf q4_1 --out "$WORK/export-q4_1"
  for q in q4_1 f16; do  # 4-bit weights (llama.cpp's usual laptop format) beside f16, minutes apart
    flashback bench --engine llamacpp --model "$WORK/export-$q" --index "$INDEX" --context-lengths 2048 --repeats 3 \
      --json "$RUNS/bench-llamacpp-pair-$q.json"
  done
fi
if run upstream; then
  INDEX=$(python3 -c "from flashback.api import DEFAULT_INDEX, load_index; load_index(); print(DEFAULT_INDEX)")
  PORT=${UPSTREAM_PORT:-8181}
  start_llama_server "$RUNS/llama-server.log" "$PORT"  # the bench replaces the slot's prompt before each run
  flashback bench --upstream "http://127.0.0.1:$PORT" --model "$WORK/export-f16" --index "$INDEX" \
    --context-lengths 2048 --repeats 3 --beside-torch --compile off --json "$RUNS/bench-upstream.json"
  stop_server
fi
if run vllm; then
  INDEX=$(python3 -c "from flashback.api import DEFAULT_INDEX, load_index; load_index(); print(DEFAULT_INDEX)")
  PORT=${VLLM_PORT:-8182}
  start_vllm "$RUNS/vllm-server.log" "$PORT"
  flashback bench --upstream "http://127.0.0.1:$PORT" --model "$WORK/export-f16" --index "$INDEX" \
    --context-lengths 2048 --repeats 3 --beside-torch --compile off --json "$RUNS/bench-vllm.json"
  stop_server
fi
if run harness; then  # an evaluation tool researchers already use, pointed at the server: one model name per mode
  PORT=${HARNESS_PORT:-8183}
  HARNESS_DOCS="$WORK/harness-docs.jsonl"
  python3 - "$DATA/python-docs.jsonl.gz" "$HARNESS_DOCS" <<'PY'
import json, sys
from flashback.text.corpus import read_documents, select
held = select(read_documents([sys.argv[1]]), exclude=["python:library/*", "python:reference/*", "python:c-api/*"],
              heldout=0.1, split="heldout")
with open(sys.argv[2], "w") as out:
    for doc in list(held)[:3]:  # three held-out pages, their first 6,000 characters (about 1,500 tokens each)
        out.write(json.dumps({"id": doc.id, "text": doc.text[:6000]}) + "\n")
PY
  mkdir -p "$WORK/harness-tasks"
  sed "s|\${HARNESS_DOCS}|$HARNESS_DOCS|" scripts/reproduce/harness/heldout.yaml > "$WORK/harness-tasks/heldout.yaml"
  start_server "$RUNS/harness-serve.log" "http://127.0.0.1:$PORT/health" \
    flashback serve --index "$WORK/index" --port "$PORT"
  MODEL=$(curl -sf "http://127.0.0.1:$PORT/v1/models" | python3 -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
  TOKENIZER=$(python3 -c "from flashback.registry import default_model_dir; print(default_model_dir())")
  for mode in none prepend append; do
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model local-completions --tasks flashback_heldout \
      --model_args "model=$MODEL:$mode,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer=$TOKENIZER,tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1" \
      --include_path "$WORK/harness-tasks" --output_path "$RUNS/harness-$mode" | tee "$RUNS/harness-$mode.txt"
  done
  stop_server
fi
if run chat; then
  CHAT=(--turns 10 --max-new-tokens "${CHAT_TOKENS:-64}")
  flashback bench-chat "${CHAT[@]}" --json "$RUNS/bench-chat-torch.json"
  [[ -f $WORK/export-f16/flashback.json ]] || flashback export --gguf f16 --out "$WORK/export-f16"
  PORT=${UPSTREAM_PORT:-8181}
  start_llama_server "$RUNS/llama-server-chat.log" "$PORT"
  flashback bench-chat --upstream "http://127.0.0.1:$PORT" --model "$WORK/export-f16" "${CHAT[@]}" \
    --json "$RUNS/bench-chat-llama-server.json"
  stop_server
  PORT=${VLLM_PORT:-8182}
  start_vllm "$RUNS/vllm-server-chat.log" "$PORT"
  flashback bench-chat --upstream "http://127.0.0.1:$PORT" --model "$WORK/export-f16" "${CHAT[@]}" \
    --json "$RUNS/bench-chat-vllm.json"
  stop_server
fi
GLOSSARY=(--entries "$DATA/jargon.jsonl.gz" --index "$WORK/index-glossary")
glossary_index() {
  [[ -f $WORK/index-glossary/manifest.json ]] ||
    flashback index "$DATA/jargon.jsonl.gz" "$DATA/foldoc.jsonl.gz" --out "$WORK/index-glossary"
}
if run qa; then
  flashback qa --questions 100 --adapter "$SHIPPED" --json "$RUNS/qa-smollm2.json"  # the running-text adapter
fi
if run qa-jargon; then
  glossary_index
  flashback qa --questions 100 "${GLOSSARY[@]}" --adapter "$SHIPPED" --json "$RUNS/qa-jargon-smollm2.json"
fi
if run chat-adapter; then
  glossary_index
  [[ -f $WORK/qa-data/manifest.json ]] || flashback qa --prepare "$WORK/qa-data"
  [[ -f $WORK/qa-jargon-data/manifest.json ]] || flashback qa --prepare "$WORK/qa-jargon-data" "${GLOSSARY[@]}" \
    --questions 250
  resume=(); [[ -f $WORK/adapter-chat2.checkpoint/state.pt ]] && resume=(--resume)
  flashback train --data "$WORK/data" --data "$WORK/qa-data" --data "$WORK/qa-jargon-data" \
    --out "$WORK/adapter-chat2" --tail 32 --target-modules "$ALL" --marker-lr 5e-3 --max-steps "${CHAT_STEPS:-200}" \
    --batch-size 1 --lr 5e-4 --warmup-steps 20 --eval-every 50 --save-every 10 --max-val-segments 16 "${resume[@]}"
  flashback qa --questions 100 --adapter "$WORK/adapter-chat2" --layouts flashback+adapter \
    --json "$RUNS/qa-smollm2-chat-adapter2.json"
  flashback qa --questions 100 "${GLOSSARY[@]}" --adapter "$WORK/adapter-chat2" --layouts flashback+adapter \
    --json "$RUNS/qa-jargon-smollm2-chat-adapter2.json"
fi
if run chat-query; then
  glossary_index
  adapter=(); [[ -n ${CHAT_ADAPTER:-} ]] && adapter=(--adapter "$CHAT_ADAPTER")
  for policy in ${CHAT_QUERIES:-recent question+recent}; do
    LIVE=(--questions 100 "${adapter[@]}" --layouts flashback+adapter --passages live --generate-tokens 48
      --chat-query "$policy")
    flashback qa "${LIVE[@]}" --json "$RUNS/qa-live-$policy.json"
    flashback qa "${LIVE[@]}" "${GLOSSARY[@]}" --json "$RUNS/qa-jargon-live-$policy.json"
  done
fi
