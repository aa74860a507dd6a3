#!/usr/bin/env bash
# vLLM's OpenAI server on a `flashback export` folder, for `--upstream` (the CPU build that
# `scripts/setup_engines.sh --vllm` installs; on a GPU, run your own vLLM with the same options).
#
# usage: scripts/vllm_server.sh EXPORT PORT [more vLLM options, e.g. --enforce-eager]
#
# - prefix caching on, and the cached-token count in each answer's usage (the bench's prefix-cache table);
# - blocks of 32 tokens, the smallest vLLM's CPU attention takes: a FlashBack step recomputes the context from the
#   last full block before the previous passage;
# - development mode, for POST /reset_prefix_cache: each bench run starts cold;
# - every core computes (VLLM_CPU_NUM_OF_RESERVED_CPU=0), as llama-server -t 2 does: by default vLLM keeps one core
#   for its front end, which on a 2-core machine halves its compute.
# `vllm serve` itself fails in the vllm-cpu package (it looks up the version of a package named vllm), hence -m.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 EXPORT PORT [vLLM options]" >&2; exit 2; }
export_dir=$1 port=$2
shift 2
PY=${FLASHBACK_VLLM_PYTHON:-$(python3 -c "from flashback.engines.upstream import vllm_python; print(vllm_python() or '')")}
[[ -n $PY ]] || { echo "no vLLM: run scripts/setup_engines.sh --vllm" >&2; exit 1; }
export VLLM_SERVER_DEV_MODE=1 HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
exec "$PY" -m vllm.entrypoints.openai.api_server --model "$export_dir" --dtype float32 --block-size 32 \
    --enable-prefix-caching --enable-prompt-tokens-details --host 127.0.0.1 --port "$port" "$@"
