"""The KV cache with three explicit verbs: extend, rollback, reset.

This is the only module that touches the transformers Cache. FlashBack's whole speed-up rests
on `rollback`: a passage appended after the context can be dropped by cropping the cache,
leaving exactly the keys and values a plain forward over the context would have produced.
Positions of new tokens follow the cache length, so after a rollback the next tokens take the
positions the dropped ones had.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class Forward:
    """One forward pass, as reported in generation traces."""

    kind: str  # "prefill" (empty cache), "extend" (several tokens onto a cache) or "decode" (one token)
    tokens: int
    cache_len: int  # after the pass
    seconds: float

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "tokens": self.tokens,
            "cache_len": self.cache_len,
            "seconds": round(self.seconds, 6),
        }


class KVCache:
    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        self.forwards: list[Forward] = []

    def __len__(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def extend(self, token_ids: Sequence[int] | torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run `token_ids` after what is cached; return last-position logits (V,) or all (T, V)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("extend() needs at least one token")
        before = len(self)
        start = time.perf_counter()
        out = self.model(
            input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=0 if all_logits else 1
        )
        logits = out.logits[0].float()  # (T, V) or (1, V)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        n = ids.shape[1]
        kind = "prefill" if before == 0 else ("decode" if n == 1 else "extend")
        self.forwards.append(Forward(kind, n, len(self), time.perf_counter() - start))
        return logits if all_logits else logits[-1]

    def rollback(self, length: int) -> None:
        """Drop everything after the first `length` cached tokens."""
        drop = len(self) - length
        if drop < 0:
            raise ValueError(f"cannot roll back to {length}: only {len(self)} tokens are cached")
        if drop:  # crop(0) is a no-op, and a positive argument means "keep", so pass -drop
            self.cache.crop(-drop)

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values), each (B, heads, T, head_dim); for checks and tests."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]
