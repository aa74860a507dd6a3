"""Retrieval-augmented generation loops: append (FlashBack), prepend (In-Context RALM), none.

Retrieval happens before the first token and then every `stride` generated tokens, with the last
`query_tokens` tokens of context + generated text as the query.

  append:  [context[:-tail]][<MARK_L> passage <MARK_R>][context[-tail:]][generated since the last retrieval]
           (data.append_parts). The cache keeps everything before the passage. At a retrieval it is
           rolled back there, the tokens that left the tail since the previous retrieval are encoded
           as context (without the old passage), the new passage is appended and the last `tail`
           tokens are re-encoded after it: stride + tail + passage + 2 tokens per retrieval.
  prepend: [passage][context + generated], recomputed from scratch at every retrieval.
  none:    [context][generated].

Everything here works on token ids; text appears only in the retrieval query and the streamer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

from flashback.data import DEFAULT_TAIL, append_parts, passage_block
from flashback.errors import FlashbackError
from flashback.model import LoadedModel
from flashback.retrieval import Hit, Index

log = logging.getLogger("flashback")
MODES = ("append", "prepend", "none")


@dataclass(frozen=True)
class GenerationConfig:
    mode: str = "append"
    stride: int = 16
    query_tokens: int = 32
    k: int = 1
    max_new_tokens: int = 64
    markers: bool = True  # append mode only: wrap passages in <MARK_L> ... <MARK_R>
    tail: int = DEFAULT_TAIL  # append mode only: context tokens that follow the passage (data.layout)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True  # benchmarks turn this off to generate a fixed number of tokens

    def validate(self) -> None:
        if self.mode not in MODES:
            raise FlashbackError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for name in ("stride", "query_tokens", "k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise FlashbackError(f"{name.replace('_', '-')} must be at least 1")
        if self.tail < 0:
            raise FlashbackError("tail must be >= 0")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise FlashbackError("temperature must be a finite number >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise FlashbackError("seed must be between 0 and 2**64 - 1")
        if not 0 < self.top_p <= 1:
            raise FlashbackError("top-p must be in (0, 1]")


@dataclass(frozen=True)
class Retrieved:
    hit: Hit
    token_ids: np.ndarray


class Retriever(Protocol):
    max_passage_tokens: int

    def __call__(self, query: str, k: int) -> list[Retrieved]: ...


class IndexRetriever:
    """Top-k BM25 passages from an Index, with the model token ids stored at indexing time."""

    def __init__(self, index: Index):
        self.index = index
        self.max_passage_tokens = index.chunk_tokens

    def __call__(self, query: str, k: int) -> list[Retrieved]:
        hits = self.index.search([query], k)[0]
        return [Retrieved(h, self.index.passage_tokens(h.index)) for h in hits]


@dataclass
class Trace:
    """What happened during one generation, for --json output and the tests."""

    mode: str
    prompt_tokens: int = 0
    dropped_prompt_tokens: int = 0
    max_new_tokens: int = 0  # after fitting the model's positions (may be lower than asked)
    cache_capacity: int | None = None  # fixed KV buffer size when decoding through decode.Decoder
    retrievals: list[dict] = field(default_factory=list)
    forwards: list = field(default_factory=list)
    retrieval_s: float = 0.0
    total_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    def timings(self) -> dict:
        by_kind = {"prefill_s": 0.0, "extend_s": 0.0, "decode_s": 0.0}
        for f in self.forwards:
            by_kind[f"{f.kind}_s"] += f.seconds
        return {"retrieval_s": self.retrieval_s, **by_kind, "total_s": self.total_s}

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "dropped_prompt_tokens": self.dropped_prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "cache_capacity": self.cache_capacity,
            "retrievals": self.retrievals,
            "forwards": [f.to_json() for f in self.forwards],
            "timings": {k: round(v, 6) for k, v in self.timings().items()},
            "warnings": self.warnings,
        }


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    trace: Trace
    config: GenerationConfig

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "config": asdict(self.config),
            **self.trace.to_json(),
        }


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


def fit_to_positions(
    prompt: list[int], cfg: GenerationConfig, reserve: int, max_positions: int, trace: Trace
) -> tuple[list[int], int]:
    """Make prompt + passages + new tokens fit the model's positions, saying what changed.

    The prompt is kept whole whenever it fits: max-new-tokens is lowered first (as OpenAI-style
    servers cap a completion). Only a prompt that alone leaves no room keeps its most recent tokens,
    with room for up to half the positions of new tokens.
    """
    room = max_positions - reserve
    if room < 2:
        raise FlashbackError(
            f"k={cfg.k} passages take {reserve} of the model's {max_positions} positions: no room for a prompt"
        )
    max_new = cfg.max_new_tokens
    if len(prompt) + max_new <= room:
        return prompt, max_new
    if len(prompt) < room:
        max_new = room - len(prompt)
        trace.warn(
            f"max-new-tokens lowered from {cfg.max_new_tokens} to {max_new}: the prompt ({len(prompt)} tokens) "
            f"and passages ({reserve}) take the rest of the model's {max_positions} positions"
        )
        return prompt, max_new
    max_new = min(max_new, room // 2)
    keep = room - max_new
    trace.dropped_prompt_tokens = len(prompt) - keep
    trace.warn(
        f"prompt too long for the model's {max_positions} positions: kept its last {keep} tokens "
        f"(dropped {len(prompt) - keep})"
        + (f"; max-new-tokens lowered to {max_new}" if max_new < cfg.max_new_tokens else "")
    )
    return prompt[-keep:], max_new


def planned_work(cfg: GenerationConfig, prompt_tokens: int, passage_tokens: int) -> int:
    """Token positions a generation will compute at most: what bounds one request's cost in the server.

    none: prompt + new tokens. append: the prompt once, then stride + tail + passages + markers per
    retrieval. prepend: passages + prompt + everything generated so far, recomputed at every retrieval.
    """
    new = cfg.max_new_tokens
    if cfg.mode == "none":
        return prompt_tokens + new
    retrievals = -(-new // cfg.stride)
    passages = cfg.k * passage_tokens
    if cfg.mode == "append":
        return prompt_tokens + new + retrievals * (cfg.stride + cfg.tail + passages + 2)
    return new + sum(passages + prompt_tokens + r * cfg.stride for r in range(retrievals))


def stream(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    retriever: Retriever | None,
    cfg: GenerationConfig,
    trace: Trace | None = None,
    observe: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[int]:
    """Check the request, then return an iterator of generated token ids that fills `trace`.

    Validation happens here, before the first token is asked for, so callers can reject bad input
    before they start streaming.
    """
    cfg.validate()
    trace = trace if trace is not None else Trace(cfg.mode)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise FlashbackError("the prompt is empty")
    retrieving = cfg.mode != "none"
    if retrieving and retriever is None:
        raise FlashbackError(f"mode {cfg.mode} needs an index to retrieve from")
    use_markers = cfg.mode == "append" and cfg.markers
    if use_markers and lm.marker_ids is None:
        raise FlashbackError("markers were asked for but the model has no marking tokens (load it with markers)")
    reserve = (cfg.k * retriever.max_passage_tokens + 2 * use_markers) if retrieving else 0
    prompt, max_new = fit_to_positions(prompt, cfg, reserve, lm.max_positions, trace)
    trace.prompt_tokens = len(prompt)
    trace.max_new_tokens = max_new
    positions = len(prompt) + reserve + max_new  # the most the cache will hold
    if lm.engine == "upstream":  # decoding happens on a server: one completion request per retrieval step
        if observe is not None:
            raise FlashbackError("an upstream engine returns tokens, not logits (no logprobs, no echo scoring)")
        return _request_loop(lm, prompt, retriever, cfg, max_new, use_markers, trace)
    return _loop(lm, prompt, retriever, cfg, max_new, positions, use_markers, trace, observe)


def _loop(
    lm: LoadedModel,
    prompt: list[int],
    retriever: Retriever | None,
    cfg: GenerationConfig,
    max_new: int,
    positions: int,
    use_markers: bool,
    trace: Trace,
    observe: Callable[[int, torch.Tensor], None] | None,
) -> Iterator[int]:
    retrieving = cfg.mode != "none"
    decoder = lm.decoder(cfg.mode)
    capacity = None
    if decoder is not None:  # the compiled step needs fixed-shape buffers: room for the whole generation
        capacity = -(-positions // 512) * 512  # rounded: one compiled graph per size
    cache = lm.new_cache(capacity, decoder)
    trace.cache_capacity = capacity
    trace.forwards = cache.forwards
    banned = torch.tensor(lm.marker_ids if lm.marker_ids else [], dtype=torch.long, device=lm.device)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    eos = lm.eos_ids
    markers = lm.marker_ids if use_markers else None
    generated: list[int] = []
    cached = 0  # append mode: tokens before the passage, kept in the cache across retrievals
    start = time.perf_counter()
    try:
        for step in range(max_new):
            lm.activate(cfg.mode)  # every step: other generations may share the model (server)
            if retrieving and step % cfg.stride == 0:
                passages = _retrieve(lm, retriever, prompt + generated, cfg, step, trace)
                if cfg.mode == "append":
                    kept, block = append_parts(prompt + generated, passages, markers, cfg.tail)
                    if step == 0 and kept:  # the prompt's prefill, kept for the whole generation
                        logits = cache.extend(kept)
                        cached = len(kept)
                    before = len(cache.forwards)
                    cache.rollback(cached)
                    if kept[cached:] or block:
                        logits = cache.extend(kept[cached:] + block)
                    cached = len(kept)
                else:  # prepend: the prefix changed, so nothing cached is valid any more
                    before = len(cache.forwards)
                    cache.reset()
                    logits = cache.extend(passage_block(passages, None) + prompt + generated)
                trace.retrievals[-1]["computed_tokens"] = sum(f.tokens for f in cache.forwards[before:])
            elif step == 0:
                logits = cache.extend(prompt)
            else:
                logits = cache.extend(generated[-1:])
            if observe is not None:  # tests compare these with a from-scratch recomputation
                observe(step, logits)
            if len(banned):
                logits = logits.index_fill(0, banned, float("-inf"))  # never emit a marker
            token = sample(logits, cfg.temperature, cfg.top_p, generator)
            generated.append(token)
            yield token
            if cfg.stop_at_eos and token in eos:
                break
    finally:
        trace.total_s = time.perf_counter() - start


def _request_loop(
    lm, prompt: list[int], retriever: Retriever | None, cfg: GenerationConfig, max_new: int, use_markers: bool, trace
) -> Iterator[int]:
    """_loop's schedule and layouts, with each stretch between retrievals decoded by an upstream engine
    (upstream.py) in one request: the prompt is the layout the local cache would hold at that retrieval."""
    from flashback.upstream import completion_forwards

    markers = lm.marker_ids if use_markers else None
    banned = list(lm.marker_ids or ())
    eos = lm.eos_ids
    generated: list[int] = []
    start = time.perf_counter()
    try:
        while len(generated) < max_new:
            step = len(generated)
            if cfg.mode == "none":
                layout, n = prompt + generated, max_new - step
            else:
                passages = _retrieve(lm, retriever, prompt + generated, cfg, step, trace)
                if cfg.mode == "append":
                    kept, block = append_parts(prompt + generated, passages, markers, cfg.tail)
                    layout = kept + block
                else:
                    layout = passage_block(passages, None) + prompt + generated
                n = min(cfg.stride, max_new - step)
            done = lm.client.complete(
                layout,
                n,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=cfg.seed,
                banned=banned,
                ignore_eos=not cfg.stop_at_eos,
            )
            trace.forwards += completion_forwards(done)
            if cfg.mode != "none":
                trace.retrievals[-1]["computed_tokens"] = done.prompt_tokens
                trace.retrievals[-1]["engine_cached_tokens"] = done.cached_tokens
            tokens = done.tokens[:n]
            for token in tokens:
                generated.append(token)
                yield token
                if cfg.stop_at_eos and token in eos:
                    return
            if done.stopped_at_eos:
                return
            if len(tokens) < n:  # not at an end of sequence: the engine's context is full, or it cut the request
                trace.warn(f"the upstream engine returned {len(tokens)} of {n} tokens (its context may be full)")
                return
    finally:
        trace.total_s = time.perf_counter() - start


def _retrieve(
    lm: LoadedModel, retriever: Retriever, history: list[int], cfg: GenerationConfig, step: int, trace: Trace
) -> list[list[int]]:
    t0 = time.perf_counter()
    query = lm.tokenizer.decode(history[-cfg.query_tokens :])
    found = retriever(query, cfg.k)
    trace.retrieval_s += time.perf_counter() - t0
    record = {"step": step, "query": query, "passages": [r.hit.to_json() for r in found]}
    if not found:  # nothing matched the query: this step goes without a passage (and without markers)
        record["skipped"] = "no passage matches the query"
    trace.retrievals.append(record)
    # Concatenated in rank order (best first), as the paper does for k > 1 (data.passage_block).
    return [[int(t) for t in r.token_ids] for r in found]


def generate(
    lm: LoadedModel, prompt_ids: Sequence[int], retriever: Retriever | None, cfg: GenerationConfig
) -> GenerationResult:
    trace = Trace(cfg.mode)
    tokens = list(stream(lm, prompt_ids, retriever, cfg, trace))
    text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
    return GenerationResult(text=text, token_ids=tokens, trace=trace, config=cfg)


class TextStreamer:
    """Turns a token stream into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character stays as U+FFFD, as in decode)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
