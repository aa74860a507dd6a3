#!/usr/bin/env bash
# Fresh machine to a FlashBack generation: install, build the default index once, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${FLASHBACK_DATA:-../shared/data}
INDEX=$(python3 -c "from flashback.cli import DEFAULT_INDEX; print(DEFAULT_INDEX)")
if [ ! -f "$INDEX/manifest.json" ]; then
  flashback index "$DATA/foldoc.jsonl.gz" "$DATA/jargon.jsonl.gz" "$DATA/python-docs.jsonl.gz" --out "$INDEX"
fi
flashback generate --mode append --max-new-tokens 48 "$@" \
  --prompt "${PROMPT:-A garbage collector reclaims memory that a program no longer uses. In Python, the}"
