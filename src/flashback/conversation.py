"""Where a retrieval-augmented chat puts its passages, and what each choice costs turn after turn.

Four layouts of the same conversation and the same retrieved passages:

    flashback  the conversation as it is; the passages appended `tail` tokens before its end, in token space,
               with the markers (and the append adapter on the PyTorch engine): what `flashback serve` does
    system     the passages in the system message, as RAG front-ends do
    user       the passages before the question in the last user message
    none       no retrieval

The history keeps each question without its passages (as front-ends store it) and the model's own answers. A
server's prefix cache (our PyTorch engine's, llama-server's, vLLM's) reuses whatever prefix the next turn shares
with what it computed before: in the system layout the passages change the first message, so every turn computes
the whole conversation; FlashBack's turn computes its new tokens, the passages and the tail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from flashback.config import GenerationConfig
from flashback.engines.base import Engine
from flashback.errors import FlashbackError
from flashback.generate import Trace, stream
from flashback.text.chat_template import render
from flashback.text.retrieval import Retrieved, Retriever

CHAT_LAYOUTS = ("flashback", "system", "user", "none")
CONTEXT_HEADER = "Use the following context to answer."


def messages_for(layout: str, system: str | None, history: Sequence[dict], question: str, passages: str) -> list[dict]:
    """The messages a client sends for one turn in `layout` (flashback and none send the plain conversation)."""
    if layout not in CHAT_LAYOUTS:
        raise FlashbackError(f"unknown chat layout {layout!r}; choose from {', '.join(CHAT_LAYOUTS)}")
    head = [{"role": "system", "content": system}] if system else []
    ask = {"role": "user", "content": question}
    if layout == "system":
        content = f"{system}\n\n" if system else ""
        head = [{"role": "system", "content": f"{content}{CONTEXT_HEADER}\n\n{passages}"}]
    elif layout == "user":
        ask = {"role": "user", "content": f"{CONTEXT_HEADER}\n\n{passages}\n\n{question}"}
    return [*head, *history, ask]


class FixedRetriever:
    """The passages retrieved once for a turn, handed to generation as its retriever (the same for every layout)."""

    def __init__(self, found: list[Retrieved], max_passage_tokens: int):
        self.found = found
        self.max_passage_tokens = max_passage_tokens

    def __call__(self, query: str, k: int) -> list[Retrieved]:
        return self.found[:k]


@dataclass
class Turn:
    layout: str
    turn: int
    prompt_tokens: int  # the rendered conversation (its passages too, in the text layouts)
    computed_tokens: int  # what the engine ran before the first new token (FlashBack: passages and tail too)
    cached_tokens: int  # what it took from its prefix cache
    ttft_s: float
    total_s: float
    new_tokens: int
    answer: str
    passages: list[str]


def answer_turn(
    engine: Engine,
    layout: str,
    messages: list[dict],
    question: str,
    found: list[Retrieved],
    passage_tokens: int,
    cfg: GenerationConfig,
    live: Retriever | None = None,
) -> tuple[list[int], Trace, float, float]:
    """Generate one answer: (tokens, trace, seconds to the first token, seconds in all). FlashBack retrieves once,
    before the first token (its stride covers the answer), so that every layout sees the same passages; given a
    `live` retriever, it retrieves from it every `cfg.stride` tokens instead, as it serves a chat."""
    ids, _ = render(engine.tokenizer, messages, cfg.query_tokens)
    flashback = layout == "flashback"
    mode = "append" if flashback else "none"
    stride = cfg.stride if live is not None else max(cfg.stride, cfg.max_new_tokens)
    gen = replace(cfg, mode=mode, stride=stride, markers=cfg.markers and flashback)
    retriever = (live or FixedRetriever(found, passage_tokens)) if flashback else None
    trace, tokens, first = Trace(mode), [], None
    start = time.perf_counter()
    for token in stream(engine, ids, retriever, gen, trace, question=question):
        if token is None:
            continue
        if first is None:
            first = time.perf_counter() - start
        tokens.append(token)
    total = time.perf_counter() - start
    if engine.capabilities.remote:  # one request: its time to the first streamed token, as the client saw it
        first = prompt_forwards(trace)[1]
    return tokens, trace, first if first is not None else total, total


def prompt_forwards(trace: Trace) -> tuple[int, float]:
    """(tokens, seconds) of the forwards that ran before the first new token: everything up to the first decode."""
    tokens = seconds = 0.0
    for f in trace.forwards:
        if f.kind == "decode":
            break
        tokens += f.tokens
        seconds += f.seconds
    return int(tokens), seconds


def run_conversation(
    engine: Engine,
    retrieve: Callable[[str], list[Retrieved]],
    questions: Sequence[str],
    layouts: Sequence[str],
    cfg: GenerationConfig,
    passage_tokens: int,
    system: str | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> list[Turn]:
    """The same questions as one conversation per layout, each layout from a cold prefix cache after one warm-up
    turn."""
    found = [retrieve(q) for q in questions]  # once: every layout gets the same passages
    texts = [[engine.tokenizer.decode(r.token_ids) for r in f] for f in found]
    turns = []
    for layout in layouts:
        first = messages_for(layout, system, [], questions[0], "\n\n".join(texts[0]))
        answer_turn(engine, layout, first, questions[0], found[0], passage_tokens, replace(cfg, max_new_tokens=2))
        engine.forget()  # after a warm-up turn (first-call allocations), from a cold prefix cache
        history: list[dict] = []
        for i, question in enumerate(questions):
            messages = messages_for(layout, system, history, question, "\n\n".join(texts[i]))
            tokens, trace, ttft, total = answer_turn(engine, layout, messages, question, found[i], passage_tokens, cfg)
            answer = engine.tokenizer.decode(tokens, skip_special_tokens=True)
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            computed, _ = prompt_forwards(trace)
            turn = Turn(
                layout,
                i + 1,
                trace.prompt_tokens,
                computed,
                trace.cached_tokens,
                ttft,
                total,
                len(tokens),
                answer,
                [r.hit.id for r in found[i]],
            )
            turns.append(turn)
            progress(
                f"{layout} turn {turn.turn}: {turn.prompt_tokens} prompt tokens, {turn.computed_tokens} computed, "
                f"first token {turn.ttft_s:.3f} s, {turn.new_tokens} new in {turn.total_s:.2f} s"
            )
    return turns


def summary(turns: Sequence[Turn], at: Sequence[int]) -> str:
    """A markdown table: per layout and chosen turn, prompt tokens, computed tokens, first-token and total time."""
    lines = [
        "| layout | turn | prompt tokens | computed | cached | first token s | total s | new tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in turns:
        if t.turn in at:
            lines.append(
                f"| {t.layout} | {t.turn} | {t.prompt_tokens} | {t.computed_tokens} | {t.cached_tokens} | "
                f"{t.ttft_s:.3f} | {t.total_s:.2f} | {t.new_tokens} |"
            )
    return "\n".join(lines)


def ratios(turns: Sequence[Turn], turn: int, against: str = "system") -> dict[str, dict[str, float]]:
    """At `turn`: each layout's computed tokens and first-token time over the `against` layout's."""
    at = {t.layout: t for t in turns if t.turn == turn}
    if against not in at:
        return {}
    base = at[against]
    return {
        name: {
            "computed": t.computed_tokens / max(1, base.computed_tokens),
            "ttft": t.ttft_s / base.ttft_s if base.ttft_s else float("nan"),
        }
        for name, t in at.items()
    }
