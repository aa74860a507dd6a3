"""How fast llama.cpp runs the three kinds of forward FlashBack's bench times, per GGUF file (e.g. f16, bf16, f32 of
one export): a 1,500-token prefill, a 160-token extend over that cache (the paper regime's retrieval step, median
of 5, rolled back each time) and single-token decode (median of 20). Random token ids, 2 threads by default.

    python scripts/lab/llamacpp_gguf_types.py EXPORT/model-f16.gguf /tmp/model-bf16.gguf [--flash-attn]

(convert an export's folder to another type with llama.cpp's convert_hf_to_gguf.py --outtype bf16|f32)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def measure(path: str, threads: int, flash_attn: bool) -> dict:
    from llama_cpp import Llama

    llm = Llama(
        model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn, verbose=False
    )
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    llm.eval(rng.integers(100, 40000, 1500).tolist())
    prefill = time.perf_counter() - start
    extends, decodes = [], []
    for _ in range(5):
        llm.n_tokens = 1500
        ids = rng.integers(100, 40000, 160).tolist()
        start = time.perf_counter()
        llm.eval(ids)
        extends.append(time.perf_counter() - start)
    for _ in range(20):
        start = time.perf_counter()
        llm.eval([int(rng.integers(100, 40000))])
        decodes.append(time.perf_counter() - start)
    return {
        "gguf": path,
        "prefill_1500_s": round(prefill, 3),
        "extend_160_s": round(statistics.median(extends), 3),
        "decode_ms": round(1000 * statistics.median(decodes), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flash-attn", action="store_true")
    args = p.parse_args()
    print(json.dumps([measure(g, args.threads, args.flash_attn) for g in args.gguf], indent=1))


if __name__ == "__main__":
    main()
