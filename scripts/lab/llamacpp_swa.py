"""What llama.cpp's sliding-window cache costs FlashBack at long contexts, and whether its rollback stays exact.

llama.cpp keeps a sliding-window layer's cache either full-size (`swa_full`, llama-cpp-python's default) or cut to
the window plus one batch. FlashBack appends a passage and rolls it back at every retrieval; with the cut cache
the keys a rolled-back query needs may be gone. For each setting this script measures, on a `flashback export
--gguf` folder of a sliding-window model (Gemma 3):

- the resident memory a context adds at `--sizes`, over a 512-token context with the cut cache (its KV buffers are
  cleared, so they are resident at creation; every context maps the weights again, the baseline cancels that);
- a prefill of `--context` random tokens, then decode steps (median ms/token), as in a generation;
- one FlashBack step: a 130-token block appended, 16 tokens decoded, everything after the context rolled back, and
  16 new tokens extended; their last logits against a fresh context's prefill of the same tokens (max |difference|),
  and whether llama.cpp refused the rollback.

Usage: python scripts/lab/llamacpp_swa.py EXPORT_DIR_OR_GGUF --context 32000 [--json FILE]
(a base model's GGUF: python -c "from flashback.export import write_gguf; ..." as in docs/results.md)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def last_logits(llm) -> np.ndarray:
    import llama_cpp

    row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()


def measure(gguf: str, n_ctx: int, context: list[int], block: list[int], new: list[int], swa_full: bool) -> dict:
    from llama_cpp import Llama

    before = rss_mb()
    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=2, n_threads_batch=2, swa_full=swa_full, verbose=False)
    made = rss_mb()
    t0 = time.perf_counter()
    llm.eval(context)
    prefill = time.perf_counter() - t0
    steps, refused = [], None
    llm.eval(block)
    for token in new:
        t0 = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - t0)
    try:
        llm.n_tokens = len(context)  # the rollback: the next eval removes the cells after the context
        llm.eval(new)
        rolled = last_logits(llm)
    except Exception as exc:  # noqa: BLE001 - llama.cpp refusing the rollback is a result
        refused, rolled = f"{type(exc).__name__}: {exc}", None
    peak = rss_mb()
    del llm
    gc.collect()
    return {
        "swa_full": swa_full,
        "context_mb": round(made - before, 1),
        "peak_rss_mb": round(peak, 1),
        "prefill_s": round(prefill, 2),
        "decode_ms_per_token": round(1000 * statistics.median(steps), 2),
        "refused": refused,
        "_rolled": rolled,
    }


def main() -> int:
    from flashback.engines.llamacpp import gguf_export_card

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="a `flashback export --gguf` folder of a sliding-window model, or a .gguf")
    parser.add_argument("--context", type=int, default=32000, help="context tokens (default: 32000)")
    parser.add_argument("--sizes", default="8192,16384,32768", help="context sizes whose memory to read (no prefill)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    gguf = args.export if args.export.endswith(".gguf") else f"{args.export}/{gguf_export_card(args.export)['gguf']}"
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=args.context + 130 + 32).tolist()
    context, block, new = ids[: args.context], ids[args.context : args.context + 130], ids[-16:]
    n_ctx = args.context + 130 + 32
    from llama_cpp import Llama

    memory = []  # each context maps the weights anew: the 512-token context's figure is the baseline
    for size in [512] + [int(x) for x in args.sizes.split(",")]:
        for swa_full in (True, False):
            before = rss_mb()
            llm = Llama(model_path=gguf, n_ctx=size, n_threads=2, swa_full=swa_full, verbose=False)
            memory.append({"n_ctx": size, "swa_full": swa_full, "context_mb": round(rss_mb() - before, 1)})
            del llm
            gc.collect()
    base = memory[1]["context_mb"]
    for row in memory:
        row["over_512_cut_mb"] = round(row["context_mb"] - base, 1)
    rows = [measure(gguf, n_ctx, context, block, new, swa_full) for swa_full in (True, False)]

    fresh = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=2, n_threads_batch=2, verbose=False)
    fresh.eval(context + new)
    want = last_logits(fresh)
    for row in rows:
        rolled = row.pop("_rolled")
        row["rollback_max_abs_diff"] = None if rolled is None else float(np.abs(rolled - want).max())
    result = {"export": args.export, "context": args.context, "n_ctx": n_ctx, "memory": memory, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
