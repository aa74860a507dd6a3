"""The engine seam: what FlashBack asks of whatever runs the model.

An `Engine` owns a model (PyTorch weights, a llama.cpp context, or an inference server over HTTP) and says
what it can do (`Capabilities`); it never gets asked which kind it is. A `Session` is one sequence's cache,
with the three verbs FlashBack's speed rests on (extend, rollback, reset) and one verb that runs a stretch
of generation between two retrievals (`begin`): a local engine implements it over its own cache and
decodes token by token; an upstream engine sends one completion request whose prompt is the layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from flashback.cards import pick_slot
from flashback.layout import StepPlan, Tuned, banned_ids, without_markers


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


def forward_kind(cached_before: int, tokens: int) -> str:
    return "prefill" if cached_before == 0 else ("decode" if tokens == 1 else "extend")


@dataclass(frozen=True)
class SessionSpec:
    """What a new session is for; the engine chooses its adapter, cache size and decode step from it."""

    mode: str | None = None  # whose adapter its forwards run with (where engines switch them); None: none
    positions: int | None = None  # the most tokens the sequence holds
    scoring: bool = False  # every position's logits are wanted (evaluation)
    salt: str | None = None  # sequences of different salts (clients) never start from each other's caches
    decode_tokens: int | None = None  # single-token steps the generation expects (it may choose the decode)
    chat: bool = False  # a chat's answer: the mode's chat adapter where there is one (cards.pick_slot)


SCORING = SessionSpec(scoring=True)  # the bare model, every position's logits


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, for the code that drives it."""

    logits: str  # "all" (every position: scoring), "last" (the last position: local sampling), "none" (tokens)
    sequences: int | None = None  # sequences it holds at once; None: as many as memory allows
    remote: bool = False  # the work waits on another process: generations may each have a request in flight
    counts_cached_tokens: bool = False  # its answers say how many prompt tokens came from its prefix cache
    adapters: bool = False  # unmerged LoRA adapters, switched per mode (else: merged into the weights)


@dataclass(frozen=True)
class Architecture:
    """The transformer's shape: what FLOP and byte accounting needs (bench)."""

    layers: int
    width: int
    kv_width: int  # key/value heads x head size
    embedding_params: int
    body_params: int  # every parameter but the embedding (and an untied output matrix)
    params: int  # all of them, a tied output matrix once
    attention_width: int = 0  # query heads x head size (0: the width)
    sliding_layers: int = 0  # layers that see only the last `window` positions
    window: int = 0

    @classmethod
    def of(cls, model: torch.nn.Module) -> Architecture:
        """Read off a transformers model (real or on the meta device)."""
        cfg = model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        emb = model.get_input_embeddings().weight.numel()
        params = sum(p.numel() for p in model.parameters())
        body = params - emb * (1 if cfg.tie_word_embeddings else 2)
        window = getattr(cfg, "sliding_window", None) or 0
        sliding = sum(t == "sliding_attention" for t in getattr(cfg, "layer_types", None) or []) if window else 0
        return cls(
            cfg.num_hidden_layers,
            cfg.hidden_size,
            heads * head_dim,
            emb,
            body,
            params,
            cfg.num_attention_heads * head_dim,
            sliding,
            window,
        )

    def kv_read(self, cached: float) -> float:
        """Cached positions whose keys and values one query reads, summed over layers, over `layers`: a sliding
        layer reads at most its window."""
        full = self.layers - self.sliding_layers
        return (full * cached + self.sliding_layers * min(cached, self.window)) / self.layers


class Sampling:
    """How tokens are chosen: greedy at temperature 0, else nucleus sampling with a seeded generator.

    Marker ids are `banned`: FlashBack places them, the model never emits them.
    """

    def __init__(self, temperature: float, top_p: float, seed: int | None, banned: Sequence[int], stop_at_eos: bool):
        self.temperature, self.top_p, self.seed, self.stop_at_eos = temperature, top_p, seed, stop_at_eos
        self.banned = [int(t) for t in banned]
        self.generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        self._banned: torch.Tensor | None = None

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from last-position logits (V,)."""
        if self.banned:
            if self._banned is None or self._banned.device != logits.device:
                self._banned = banned_ids(self.banned, logits.device)
            logits = without_markers(logits, self._banned, 0)
        return sample(logits, self.temperature, self.top_p, self.generator)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else nucleus sampling. logits: (V,)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    # Shift before scaling, in float64 (1e-300 is 0 in float32): the best token scores 0, the others -inf
    # at worst, so a tiny temperature is greedy, never NaN. On the CPU, where the seeded generator lives,
    # so a seed draws the same tokens on every device.
    logits = logits.double().cpu()
    scaled = (logits - logits.max()) / temperature
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


Observer = Callable[[int, torch.Tensor], None]  # (generation step, last-position logits before banning)


@dataclass
class Stretch:
    """The tokens of one stretch between retrievals, and what the engine computed for them."""

    tokens: Iterator[int]
    computed_tokens: int  # positions the step's plan ran through the model (its `prefix` excluded)
    cached_tokens: int | None = None  # prompt tokens the engine reused from its own prefix cache, if it says
    stopped: Callable[[], bool] = field(default=lambda: False)  # the engine ended it at an end of sequence

    def __iter__(self) -> Iterator[int]:
        return self.tokens


class Session(ABC):
    """One sequence's cache on an engine."""

    forwards: list[Forward]
    capacity: int | None = None  # a fixed buffer size in tokens, where the engine preallocates one
    compile_choice: dict | None = None  # how the decode step was chosen, where the engine chooses (--compile auto)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def extend(self, token_ids: Sequence[int], all_logits: bool = False, last_logits: int = 0) -> torch.Tensor | None:
        """Run `token_ids` after what is cached; last-position logits (V,), every position's (T, V), the last
        `last_logits` positions' (N, V) when N > 1 (scoring: only the target's predictors), or None from an engine
        that returns none. Only an engine whose capabilities.logits is "all" returns more than the last position."""

    @abstractmethod
    def rollback(self, length: int) -> None:
        """Drop everything after the first `length` cached tokens."""

    def reset(self) -> None:
        self.rollback(0)

    def begin(
        self, plan: StepPlan, n: int, sampling: Sampling, observe: Observer | None, step: int, chunk: int | None = None
    ) -> Stretch:
        """Apply `plan` to the cache, then decode up to `n` tokens one at a time (lazily: a stretch that is
        not read further computes nothing more). With `chunk`, the plan's forwards run lazily too, `chunk` tokens at
        a time with a None between them, so that a scheduler can run other work within a long prefill."""
        reused = 0
        if plan.keep == 0:
            reused = self.start_from(plan.prefix + plan.feed)
            plan = StepPlan(reused, plan.prefix[reused:], plan.feed[max(0, reused - len(plan.prefix)) :], plan.floor)
        else:
            self.rollback(plan.keep)
        self.keep_from(plan.floor if plan.floor is not None else len(self) + len(plan.prefix) + len(plan.feed))
        if chunk is not None:
            stretch = Stretch(iter(()), 0, reused or None)
            stretch.tokens = self._chunked(plan, n, sampling, observe, step, chunk, stretch)
            return stretch
        logits = self.extend(plan.prefix) if plan.prefix else None
        before = len(self.forwards)
        if plan.feed:
            logits = self.extend(plan.feed)
        computed = sum(f.tokens for f in self.forwards[before:])
        return Stretch(self._tokens(logits, n, sampling, observe, step), computed, reused or None)

    def keep_from(self, floor: int) -> None:  # noqa: B027 - only caches that drop keys need to know
        """No later rollback goes below `floor` (sliding-window caches may drop keys only earlier queries see)."""

    def start_from(self, tokens: Sequence[int]) -> int:
        """Empty the cache for a sequence that begins with `tokens`; an engine that keeps finished sequences may
        instead start from one sharing a prefix with them. Returns how many of `tokens` are cached already."""
        self.reset()
        return 0

    def release(self, keep: int) -> None:  # noqa: B027 - most sessions keep nothing after their sequence ends
        """The sequence is done; its first `keep` cached tokens stay valid for a later one (engines that keep
        finished sequences, engines/torch/prefixes.py)."""

    def _chunked(self, plan: StepPlan, n: int, sampling, observe, step: int, chunk: int, stretch: Stretch):
        logits = None
        for part, counted in ((plan.prefix, False), (plan.feed, True)):
            for start in range(0, len(part), chunk):
                if logits is not None:
                    yield None  # a chunk is done: other work may run before the next
                logits = self.extend(part[start : start + chunk])
                stretch.computed_tokens += len(part[start : start + chunk]) if counted else 0
        yield from self._tokens(logits, n, sampling, observe, step)

    def _tokens(self, logits, n: int, sampling: Sampling, observe: Observer | None, step: int) -> Iterator[int]:
        for i in range(n):
            if observe is not None:  # tests compare these with a from-scratch recomputation
                observe(step + i, logits)
            token = sampling.pick(logits)
            yield token
            if i + 1 < n:
                logits = self.extend([token])


class Engine(ABC):
    """A model FlashBack can generate with. Subclasses set the attributes below in their constructors."""

    name: str
    tokenizer: object
    marker_ids: tuple[int, int] | None
    eos_ids: set[int]
    max_positions: int
    device: torch.device
    arch: Architecture
    capabilities: Capabilities
    tuned: dict[str, Tuned]  # slots whose layout the weights were tuned for (adapters or an export's card)
    kind: str  # for reports ("torch", "llama.cpp", "upstream"); code asks `capabilities`, never this

    @abstractmethod
    def session(self, spec: SessionSpec = SessionSpec()) -> Session:  # noqa: B008 - frozen
        """A new cache for one sequence, as `spec` describes it."""

    @cached_property
    def head_ids(self) -> list[int]:
        """What the tokenizer puts before every text (BOS, or nothing): first in every layout (layout.py)."""
        from flashback.text.tokenize import text_head

        return text_head(self.tokenizer)

    @property
    def adapters(self) -> dict[str, str]:
        """Slot (a mode for a text adapter, MODE-chat for a chat adapter) -> adapter folder, for engines that run
        unmerged adapters."""
        return {}

    def adapter_for(self, mode: str | None, chat: bool = False) -> str | None:
        """The folder of the adapter that serves `mode` for a chat (or a completion), or None."""
        slot = pick_slot(self.adapters, mode, chat)
        return None if slot is None else self.adapters[slot]

    def keep_prefixes(self, budget_mb: float) -> None:  # noqa: B027 - servers upstream keep their own
        """Keep finished sequences' caches (up to `budget_mb`) so that requests that start alike skip their prefix."""

    later_decode_tokens: int = 0  # tokens later generations in this process will decode (a bench announces its runs)

    def warm_up(self, mode: str | None, capacities: Sequence[int]):  # noqa: B027 - most engines have nothing to warm
        """Prepare `mode`'s decode step for these cache sizes in the background (a server at start-up); returns the
        thread doing it, or None."""
        return None

    def warming_up(self) -> list[int]:
        """Cache sizes whose decode step `warm_up` is still preparing (the server's /health says them)."""
        return []

    def forget(self) -> None:  # noqa: B027 - most engines cache nothing beyond a session
        """Drop whatever the engine cached beyond a session (a prefix cache), so the next prompt starts cold."""

    def describe(self) -> dict:
        """What a benchmark reports about the engine."""
        return {
            "engine": self.kind,
            "device": str(self.device),
            "dtype": self.dtype_name,
            "compile": None,  # the PyTorch engine's --compile setting; other engines decode their own way
            "quantize": None,
            "compile_s": 0.0,
        }

    def decode_weight_bytes(self, mode: str | None) -> int:
        """Bytes of weights one decode step reads."""
        return 0

    kv_value_bytes: int = 2  # bytes per cached key or value element
    dtype_name: str = "export"
