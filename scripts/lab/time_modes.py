"""Time the default path of each mode: `FlashBack.load()` (default model, shipped adapter, default index), one prompt.

    python scripts/lab/time_modes.py [--tokens 32] [--repeats 4]

Prints JSON: per mode, the median wall time of a generation, the median decode step and the text (the first run is
a warm-up and not counted). Run it on two checkouts (PYTHONPATH=CHECKOUT/src) to compare them in one sitting.
"""

from __future__ import annotations

import argparse
import json
import statistics

from flashback import FlashBack

PROMPT = "A socket binds to a port and"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    fb = FlashBack.load()
    out = {}
    for mode in ("append", "none", "prepend"):
        runs = [fb.generate(PROMPT, max_new_tokens=args.tokens, mode=mode) for _ in range(args.repeats)][1:]
        decode = [f.seconds for r in runs for f in r.trace.forwards if f.kind == "decode"]
        out[mode] = {
            "total_s": round(statistics.median(r.trace.total_s for r in runs), 3),
            "decode_ms": round(1000 * statistics.median(decode), 1),
            "text": runs[0].text,
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
