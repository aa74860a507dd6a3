#!/usr/bin/env bash
# Lint and tests: the one test command (README). Needs scripts/setup.sh to have run once.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check src tests
ruff format --check src tests
python3 -m pytest "$@"
