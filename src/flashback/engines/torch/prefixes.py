"""Caches of finished sequences, kept so that a later request that starts with the same tokens skips them.

What a generation leaves behind is its cache rolled back to what stays valid: in append mode everything before the
last passage (the conversation without its passages), in mode none the whole sequence. A new session takes the
entry with the longest common token prefix, for the same adapter and buffer shape, and rolls it back to that
prefix. An entry is taken out while a session uses it, so two requests never share a mutable cache, and it comes
back (as that session's cache) when the session ends. Entries are dropped least recently used first when their
buffers exceed the budget, as llama-server's slots and vLLM's prefix cache do. Runs on the model thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

SIMILARITY = 0.5  # the share of an entry's tokens a new sequence must repeat to take it


@dataclass
class Entry:
    key: tuple  # (adapter, capacity): what the keys and values were computed with, and the buffer shape
    tokens: list[int]
    cache: object  # a transformers DynamicCache of cache.GrowableLayer / FixedLayer
    nbytes: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixStore:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.hits = self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def take(self, key: tuple, tokens: Sequence[int], fed: int = 1) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens`, removed from the store, and that prefix's length (at
        most all but the last `fed` tokens, so that a forward still gives the next logits); (None, 0) if none shares
        at least half of its tokens. The threshold keeps a request that shares only a system prompt or BOS from
        taking (and overwriting) another conversation's cache, as llama-server's slot similarity does."""
        best, length = None, 0
        for ident, entry in self.entries.items():
            if entry.key == key:
                n = min(common_prefix(entry.tokens, tokens), len(tokens) - fed)
                if n > length and n >= SIMILARITY * len(entry.tokens):
                    best, length = ident, n
        if best is None:
            return None, 0
        self.hits += 1
        self.reused_tokens += length
        return self.entries.pop(best), length

    def put(self, key: tuple, tokens: list[int], cache, nbytes: int) -> None:
        """Keep a finished sequence's cache (holding exactly `tokens`); an entry that another one extends or repeats
        is dropped, and the oldest go while the budget is exceeded."""
        if not tokens or nbytes > self.budget:
            return
        for ident in [
            i for i, e in self.entries.items() if e.key == key and common_prefix(e.tokens, tokens) == len(e.tokens)
        ]:
            del self.entries[ident]
        self.entries[id(cache)] = Entry(key, list(tokens), cache, nbytes)
        while self.nbytes > self.budget:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()

    def stats(self) -> dict:
        return {"entries": len(self.entries), "mb": round(self.nbytes / 2**20, 1), "hits": self.hits}
