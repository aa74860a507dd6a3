"""Is --compile auto's choice right? Fresh processes, compile time included.

For each generation length (default: 48 tokens, the quickstart's size, and 1,536, the paper's runtime test) it runs
the quickstart prompt in append mode on the default model and index, each in a new Python process:

- `off`: eager decode (the default before --compile auto);
- `auto-cold`: --compile auto with an empty compile cache (no records, no Inductor graphs): what a first run pays;
- `auto-warm`: --compile auto again, with the cache the cold run left;
- `on-warm` (long runs only): --compile on with that cache.

Generations ignore end-of-sequence tokens so every run decodes the same number. Reports each process's wall time,
the generation's own time, what auto chose and why, and whether every run gave the same tokens; JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPT = "A garbage collector reclaims memory that a program no longer uses. In Python, the"
CHILD = """
import json, sys, time
from flashback import FlashBack
compile, tokens = sys.argv[1], int(sys.argv[2])
fb = FlashBack.load(compile=compile)
start = time.perf_counter()
result = fb.generate(sys.argv[3], max_new_tokens=tokens, stop_at_eos=False)
json.dump({"generation_s": time.perf_counter() - start, "timings": result.trace.timings(),
           "compile": result.trace.compile, "token_ids": result.token_ids}, sys.stdout)
"""


def run(compile: str, tokens: int, cache: str) -> dict:
    env = {**os.environ, "FLASHBACK_COMPILE_CACHE": cache}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # Inductor's graphs go under the compile cache
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, compile, str(tokens), PROMPT], env=env, check=True, capture_output=True, text=True
    ).stdout
    child = json.loads(out)
    return {"process_s": round(time.perf_counter() - start, 2), **child}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="48,1536", help="comma-separated generation lengths")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        with tempfile.TemporaryDirectory() as cache:
            names = ["off", "auto-cold", "auto-warm"] + (["on-warm"] if tokens > 512 else [])
            runs = {}
            for name in names:
                runs[name] = run(name.split("-")[0], tokens, cache)
                r = runs[name]
                chose = r["compile"]["reason"] if r["compile"] else "-"
                print(
                    f"{tokens} tokens, {name}: process {r['process_s']:.1f} s, generation {r['generation_s']:.1f} s;"
                    f" {chose}",
                    file=sys.stderr,
                )
        same = len({tuple(r.pop("token_ids")) for r in runs.values()}) == 1
        result[str(tokens)] = {"runs": runs, "same_tokens": same}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
