"""The retrieval-augmented generation loop, one for every engine: append (FlashBack), prepend (In-Context
RALM), none.

Retrieval happens before the first token and then every `stride` generated tokens, with the last
`query_tokens` tokens of context + generated text as the query. At each retrieval the layout module's
Planner says what the sequence's cache keeps and what it must compute (layout.py); the engine's Session
runs that stretch (engines/base.py): a local engine extends its cache and decodes token by token, an
upstream engine sends one completion request.

Everything here works on token ids; text appears only in the retrieval query and the streamer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from flashback.config import GenerationConfig
from flashback.engines.base import Engine, Observer, Sampling, Session, SessionSpec
from flashback.errors import FlashbackError
from flashback.layout import Planner, reserved_positions, strip_head
from flashback.text.retrieval import Retriever

log = logging.getLogger("flashback")


@dataclass
class Trace:
    """What happened during one generation, for --json output and the tests."""

    mode: str
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the first step reused from a finished sequence's cache
    dropped_prompt_tokens: int = 0
    max_new_tokens: int = 0  # after fitting the model's positions (may be lower than asked)
    cache_capacity: int | None = None  # fixed KV buffer size when decoding through decode.Decoder
    compile: dict | None = None  # --compile auto: what was chosen for the decode step, and why
    retrievals: list[dict] = field(default_factory=list)
    forwards: list = field(default_factory=list)
    retrieval_s: float = 0.0
    total_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    stretch_starts: list[int] = field(default_factory=list)  # len(forwards) as each stretch began (bench)

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
            "cached_tokens": self.cached_tokens,
            "dropped_prompt_tokens": self.dropped_prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "cache_capacity": self.cache_capacity,
            "compile": self.compile,
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


def stream(
    engine: Engine,
    prompt_ids: Sequence[int],
    retriever: Retriever | None,
    cfg: GenerationConfig,
    trace: Trace | None = None,
    observe: Observer | None = None,
    chunk: int | None = None,
    question: str | None = None,
    cache_salt: str | None = None,
) -> Iterator[int]:
    """Check the request, then return an iterator of generated token ids that fills `trace`.

    `question` makes it a chat's answer: the question is the first retrieval's query (not the template's tail), and
    the later ones' are what `cfg.chat_query` says (retrieval_query).
    `cache_salt` keeps the sequence from starting from the kept caches of sequences with another salt.

    Validation happens here, before the first token is asked for, so callers can reject bad input
    before they start streaming. With `chunk`, long prefills run `chunk` tokens at a time and the iterator yields
    None between chunks: the server's scheduler then interleaves other requests within them.
    """
    cfg.validate()
    trace = trace if trace is not None else Trace(cfg.mode)
    prompt = [int(t) for t in prompt_ids]
    head = engine.head_ids  # BOS for tokenizers that add one: the planner puts it first in every layout
    prompt = strip_head(prompt, head)  # token-id prompts may bring their own
    if not prompt:
        raise FlashbackError("the prompt is empty")
    if cfg.mode != "none" and retriever is None:
        raise FlashbackError(f"mode {cfg.mode} needs an index to retrieve from")
    use_markers = cfg.mode == "append" and cfg.markers
    if use_markers and engine.marker_ids is None:
        raise FlashbackError("markers were asked for but the model has no marking tokens (load it with markers)")
    if observe is not None and engine.capabilities.logits == "none":
        raise FlashbackError("an upstream engine returns tokens, not logits (no logprobs, no echo scoring)")
    reserve = len(head) + (reserved_positions(cfg, retriever.max_passage_tokens) if retriever is not None else 0)
    prompt, max_new = fit_to_positions(prompt, cfg, reserve, engine.max_positions, trace)
    trace.prompt_tokens = len(prompt)
    trace.max_new_tokens = max_new
    positions = len(prompt) + reserve + max_new  # room for the most it holds
    session = engine.session(
        SessionSpec(
            cfg.mode, positions, salt=cache_salt, decode_tokens=decode_steps(cfg, max_new), chat=question is not None
        )
    )
    planner = Planner(cfg.mode, engine.marker_ids if use_markers else None, cfg.tail, head)
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed, engine.marker_ids or (), cfg.stop_at_eos)
    return _loop(engine, session, planner, sampling, prompt, retriever, cfg, max_new, trace, observe, chunk, question)


def _loop(
    engine: Engine,
    session: Session,
    planner: Planner,
    sampling: Sampling,
    prompt: list[int],
    retriever: Retriever | None,
    cfg: GenerationConfig,
    max_new: int,
    trace: Trace,
    observe: Observer | None,
    chunk: int | None,
    question: str | None = None,
) -> Iterator[int]:
    trace.forwards = session.forwards
    retrieving = cfg.mode != "none"
    generated: list[int] = []
    start = time.perf_counter()
    try:
        while len(generated) < max_new:
            step = len(generated)
            history = prompt + generated
            query = retrieval_query(engine.tokenizer, cfg, history, len(generated), question) if retrieving else ""
            passages = _retrieve(retriever, query, cfg, step, trace) if retrieving else None
            plan = planner.plan(history, passages, first=step == 0)
            n = min(cfg.stride, max_new - step) if retrieving else max_new - step
            trace.stretch_starts.append(len(session.forwards))
            stretch = session.begin(plan, n, sampling, observe, step, chunk)
            if step == 0:
                trace.cached_tokens = stretch.cached_tokens or 0
            record = trace.retrievals[-1] if retrieving else None
            got = 0
            for token in stretch:
                if token is None:  # a chunk of the prefill is done (chunk)
                    yield None
                    continue
                if got == 0:
                    _note(record, stretch)
                generated.append(token)
                got += 1
                yield token
                if cfg.stop_at_eos and token in engine.eos_ids:
                    return
            _note(record, stretch)
            if got < n:  # only an engine that decodes elsewhere returns fewer tokens than asked
                if not stretch.stopped():
                    trace.warn(f"the upstream engine returned {got} of {n} tokens (its context may be full)")
                return
    finally:
        trace.total_s = time.perf_counter() - start
        session.release(planner.reusable(len(session)))
        trace.cache_capacity = session.capacity  # --compile auto may have moved the cache into a fixed buffer
        trace.compile = session.compile_choice


def retrieval_query(tokenizer, cfg: GenerationConfig, history: Sequence[int], generated: int, question: str | None):
    """The query of the retrieval before the next stretch, `generated` tokens into the answer: the last
    `query_tokens` tokens of `history` as text (the paper's), and, for a chat's `question`, what `cfg.chat_query` says.

    A chat's answer queried by its own last tokens can drift to generic passages; with the question in the query,
    more of the later passages come from the question's document (docs/results.md, "Chat retrieval queries")."""
    recent = lambda ids: tokenizer.decode(list(ids)[-cfg.query_tokens :], skip_special_tokens=True)  # noqa: E731
    if not question or (generated and cfg.chat_query == "recent"):  # an empty question queries the last tokens
        return recent(history)
    if not generated or cfg.chat_query == "question":
        return question
    return f"{question} {recent(history[len(history) - generated :])}"


def decode_steps(cfg: GenerationConfig, max_new: int) -> int:
    """Single-token steps a generation of `max_new` tokens runs: every token but each stretch's first, which the
    retrieval step's (or the prompt's) forward gives."""
    stretches = -(-max_new // cfg.stride) if cfg.mode != "none" else 1
    return max_new - stretches


def _note(record: dict | None, stretch) -> None:
    """What a retrieval step computed, once its forwards have run."""
    if record is not None:
        record["computed_tokens"] = stretch.computed_tokens
        if stretch.cached_tokens is not None:
            record["engine_cached_tokens"] = stretch.cached_tokens


def _retrieve(retriever: Retriever, query: str, cfg: GenerationConfig, step: int, trace: Trace) -> list[list[int]]:
    t0 = time.perf_counter()
    found = retriever(query, cfg.k)
    trace.retrieval_s += time.perf_counter() - t0
    record = {"step": step, "query": query, "passages": [r.hit.to_json() for r in found]}
    if not found:  # nothing matched the query: this step goes without a passage (and without markers)
        record["skipped"] = "no passage matches the query"
    trace.retrievals.append(record)
    return [[int(t) for t in r.token_ids] for r in found]  # in rank order, best first


def generate(
    engine: Engine,
    prompt_ids: Sequence[int],
    retriever: Retriever | None,
    cfg: GenerationConfig,
    question: str | None = None,
) -> GenerationResult:
    """The whole generation at once (`stream`'s, `question` making it a chat's answer)."""
    trace = Trace(cfg.mode)
    tokens = list(stream(engine, prompt_ids, retriever, cfg, trace, question=question))
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
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
