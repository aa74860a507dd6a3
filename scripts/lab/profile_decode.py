"""Where a decode step's time goes: the whole step as generation runs it, the model's step alone, and the bound.

    python scripts/lab/profile_decode.py --compile --context 2048 [--model DIR] [--device cuda] [--dtype bfloat16]

- `step_ms`: KVCache.extend of one token (what `generate` pays): the decode wrapper, the step, the sync;
- `model_ms`: the decode function alone (compiled: guards + the graph), on the same cache;
- `bound_ms`: (weights + the KV buffer attended over) / the measured copy bandwidth, as in `flashback bench`.
Medians over --steps calls after warm-up. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flashback.bench import copy_bandwidth, decode_bound, synchronize
from flashback.engines.base import SessionSpec
from flashback.engines.torch import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    lm = load_model(args.model, device=args.device, dtype=args.dtype, compile=args.compile, quantize=args.quantize)
    decoder = lm.decoder(None)
    if decoder is None:
        raise SystemExit("profile_decode needs --compile or --quantize (the eager model has no separate step)")
    cache = lm.session(SessionSpec(positions=args.context + 1))
    g = torch.Generator().manual_seed(0)
    cache.extend(torch.randint(0, len(lm.tokenizer), (args.context,), generator=g).tolist())

    def whole_step() -> None:
        cache.extend([7])
        cache.rollback(args.context)

    layers = cache.cache.layers

    def model_only() -> None:
        layers[0].position.fill_(args.context)
        for layer in layers:
            layer.start_decode()
        decoder(cache.cache, 7, lm.device)
        for layer in layers:
            layer.finish_decode(False)
        synchronize(lm.device)

    result = {"device": str(lm.device), "dtype": lm.dtype_name, "compile": args.compile, "quantize": args.quantize}
    result["context"] = args.context
    result["compile_s"] = 0.0
    for name, fn in (("step_ms", whole_step), ("model_ms", model_only)):
        for _ in range(3):
            fn()  # warm-up (the first call compiles)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = 1000 * statistics.median(times)
    result["compile_s"] = round(decoder.compile_s, 1)
    bandwidth = copy_bandwidth(lm.device)
    result["copy_gb_s"] = bandwidth / 1e9
    result.update(decode_bound(lm, "none", cache.capacity, bandwidth))
    result["step_over_bound"] = result["step_ms"] / result["bound_ms"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
