"""The token layouts, decided once: generation, the eval fast path, packed training and upstream prompts
all derive their tokens from this module.

    append:  head context[:-tail] [<MARK_L>] passages [<MARK_R>] context[-tail:] target   (FlashBack)
    prepend: head passages context target                                                (In-Context RALM)
    none:    head context target

`head` is what the tokenizer puts before every text (BOS for Gemma and Llama; nothing for SmolLM2): it stays
first in every layout, so a passage never comes before it and BOS never follows a passage.

`tail` puts the passage a few tokens before the end of the context, so the model resumes a sentence it
has just seen instead of one it last saw a passage ago. `Planner` turns the layout into what each
retrieval step of a generation feeds an engine: which cached prefix stays, and which tokens follow it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flashback.config import DEFAULT_TAIL, GenerationConfig
from flashback.errors import FlashbackError


# ---- token rules: the marking tokens are FlashBack's own, and the head stays first ------------------------
def strip_head(ids: Sequence[int], head: Sequence[int]) -> list[int]:
    """`ids` without the head the tokenizer put before them (a rendered chat, a token-id prompt with BOS): the
    layout places the head itself, once."""
    ids = list(ids)
    return ids[len(head) :] if head and ids[: len(head)] == list(head) else ids


def banned_ids(marker_ids: Sequence[int] | None, device=None):
    """The marking tokens as a tensor of ids no one predicts (None without markers): FlashBack places them,
    generation never emits them, evaluation and training leave them out of the softmax."""
    import torch

    return torch.tensor(list(marker_ids), dtype=torch.long, device=device) if marker_ids else None


def without_markers(logits, banned, dim: int = -1):
    """`logits` with the ids `banned` (banned_ids) at -inf along `dim`; a new tensor, `logits` is left as it was."""
    if banned is None or not len(banned):
        return logits
    return logits.index_fill(dim, banned.to(logits.device), float("-inf"))


def split_point(context_len: int, tail: int) -> int:
    """Where the passage goes: `tail` tokens before the end of the context (never before its start)."""
    return max(0, context_len - tail)


def passage_block(passages: Sequence[Sequence[int]], markers: tuple[int, int] | None) -> list[int]:
    """[<MARK_L>] passages [<MARK_R>], passages concatenated best first (as the paper does for k > 1)."""
    flat = [int(t) for p in passages for t in p]
    return [markers[0], *flat, markers[1]] if markers else flat


def append_parts(
    context: Sequence[int],
    passages: Sequence[Sequence[int]],
    markers: tuple[int, int] | None,
    tail: int,
    head: Sequence[int] = (),
) -> tuple[list[int], list[int]]:
    """Append layout of a context as (kept, block): `kept` (head + context before the split) stays cached across
    retrievals, `block` is the marked passage followed by the context's last `tail` tokens, recomputed at each
    retrieval. Without passages (nothing was retrieved) there is no block: the layout is head + the context."""
    if not any(len(p) for p in passages):
        return [*head, *context], []
    cut = split_point(len(context), tail)
    return [*head, *context[:cut]], passage_block(passages, markers) + list(context[cut:])


def layout(
    context: Sequence[int],
    passages: Sequence[Sequence[int]],
    target: Sequence[int],
    mode: str,
    markers: tuple[int, int] | None,
    tail: int = 0,
    head: Sequence[int] = (),
) -> tuple[list[int], int]:
    """Token ids of one example and the index where the target starts (see the module docstring)."""
    if mode == "append":
        kept, block = append_parts(context, passages, markers, tail, head)
        ids = kept + block
    elif mode == "prepend":
        ids = [*head, *passage_block(passages, None), *context]
    elif mode == "none":
        ids = [*head, *context]
    else:
        raise FlashbackError(f"unknown mode {mode!r}")
    return ids + list(target), len(ids)


@dataclass(frozen=True)
class StepPlan:
    """What one retrieval step asks of a sequence's cache: keep its first `keep` tokens, then run `prefix`
    (cached for the rest of the generation: not counted as the step's work) and `feed` after them. No later
    step rolls the cache back below `floor` (None: below the end of `feed`), so a sliding-window cache may drop
    what only earlier queries could see."""

    keep: int
    prefix: list[int]
    feed: list[int]
    floor: int | None = None


class Planner:
    """The per-step plans of one generation in one mode.

    append: the cache keeps everything before the passage. At a retrieval it is cut back there, the tokens
    that left the tail since the previous retrieval join the kept context (without the old passage), and the
    new passage block and the last `tail` tokens follow: stride + tail + passages + 2 tokens per step.
    prepend: the prefix changed, so nothing cached stays. none: the prompt once.
    """

    def __init__(self, mode: str, markers: tuple[int, int] | None, tail: int, head: Sequence[int] = ()):
        self.mode, self.markers, self.tail, self.head = mode, markers, tail, list(head)
        self.cached = 0  # append: tokens before the passage (head included), cached across retrievals

    def plan(self, history: list[int], passages: list[list[int]] | None, first: bool) -> StepPlan:
        if self.mode == "none":
            return StepPlan(0, [], [*self.head, *history])
        if self.mode == "prepend":
            return StepPlan(0, [], [*self.head, *passage_block(passages or [], None), *history])
        kept, block = append_parts(history, passages or [], self.markers, self.tail, self.head)
        # Later split points lie at or after this history's (it only grows), whether or not this step has passages.
        floor = len(self.head) + split_point(len(history), self.tail)
        if first:  # the prompt's prefill, kept for the whole generation
            self.cached = len(kept)
            return StepPlan(0, kept, block, floor)
        # A step without passages cached its whole history; with a tail longer than the stride the new split
        # point then lies before what is cached, so the cache goes back to it.
        keep = min(self.cached, len(kept))
        self.cached = len(kept)
        return StepPlan(keep, [], kept[keep:] + block, floor)

    def reusable(self, held: int) -> int:
        """Of the `held` cached tokens at the end of a generation, how many a later sequence may start from: in
        append mode those before the last passage, in mode none all of them, in prepend none (a passage is first)."""
        return {"append": min(self.cached, held), "none": held}.get(self.mode, 0)


def reserved_positions(cfg: GenerationConfig, passage_tokens: int) -> int:
    """Positions a retrieval step's passages (and markers) take beside the prompt and the new tokens."""
    if cfg.mode == "none":
        return 0
    return cfg.k * passage_tokens + 2 * (cfg.mode == "append" and cfg.markers)


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


@dataclass(frozen=True)
class Tuned:
    """How an engine's weights were tuned for a mode's layout (an adapter's or an export's card)."""

    markers: bool
    tail: int | None


def layout_settings(
    tuned: dict[str, Tuned], mode: str, markers: bool | None, tail: int | None, untuned_markers: bool = False
) -> tuple[bool, int]:
    """(markers, tail) for `mode`: what the user set, else what the weights were tuned with, else the defaults
    (markers in append mode only, and only with `untuned_markers`; the package's tail)."""
    trained = tuned.get(mode)
    if markers is None:
        markers = (trained.markers if trained else untuned_markers) and mode == "append"
    if tail is None:  # an append-mode setting: another mode's card says nothing about it
        tuned_tail = trained.tail if trained and mode == "append" else None
        tail = DEFAULT_TAIL if tuned_tail is None else tuned_tail
    return bool(markers), tail
