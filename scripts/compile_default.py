"""Which decode default is faster for one 128-token generation, compile time included?

Runs `flashback generate` (the quickstart prompt, append mode, default index) in fresh processes: eager, compiled
with an empty Inductor cache (what a first run pays), compiled again with that cache warm, eager again. Reports each
process's wall time and the generation's own time from its trace, as JSON.
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


def run(compile: bool, cache_dir: str, tokens: int) -> dict:
    cmd = ["flashback", "generate", "--mode", "append", "--max-new-tokens", str(tokens), "--prompt", PROMPT, "--json"]
    if compile:
        cmd.append("--compile")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    trace = json.loads(out)
    return {
        "compile": compile,
        "process_s": round(wall, 2),
        "generation_s": trace["timings"]["total_s"],
        "decode_s": trace["timings"]["decode_s"],
        "tokens": len(trace["token_ids"]),
        "token_ids": trace["token_ids"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        runs = {
            "eager": run(False, cache_dir, args.tokens),
            "compiled_cold_cache": run(True, cache_dir, args.tokens),
            "compiled_warm_cache": run(True, cache_dir, args.tokens),
            "eager_again": run(False, cache_dir, args.tokens),
        }
    same = len({tuple(r.pop("token_ids")) for r in runs.values()}) == 1
    result = {"runs": runs, "same_tokens": same}
    for name, r in runs.items():
        print(f"{name}: process {r['process_s']:.1f} s, generation {r['generation_s']:.1f} s", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
