#!/usr/bin/env bash
# Lint and tests: the one test command (README). Needs scripts/setup.sh to have run once.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check src tests scripts
ruff format --check src tests scripts
python3 -m pytest "$@"
