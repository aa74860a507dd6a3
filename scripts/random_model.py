"""Write a randomly initialised model with a real model's tokenizer and a chosen architecture, for timings only.

Speed depends on shapes, not on weight values, so `flashback bench` on such a folder times a model that cannot
be shipped to the machine (a GPU box with no hub access, say). Its text is noise: never quote its perplexity.

    python scripts/random_model.py --like ~/.cache/flashback/models/SmolLM2-135M-Instruct --out /tmp/smol-random
    python scripts/random_model.py --like DIR --out /tmp/7b --shape llama2-7b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

SHAPES = {  # architecture fields that override the --like model's config
    "like": {},
    "llama2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", required=True, help="a Hugging Face model folder: its tokenizer and base config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="like")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster for 7B shapes)")
    args = parser.parse_args()

    start = time.perf_counter()
    config = AutoConfig.from_pretrained(args.like)
    for key, value in SHAPES[args.shape].items():
        setattr(config, key, value)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.like).save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.out}: {params / 1e6:.0f}M parameters ({args.shape}, {args.dtype}), {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
