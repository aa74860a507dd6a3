"""Token-level perplexity of retrieval modes on exactly the same target tokens.

Protocol (per-example, as the paper): every document is cut into targets of `stride` tokens; the query
for a target is the `query_tokens` before it; passages of the same document or title are never used
(the leakage filter of data.py). A target's context is the document text before it, starting at a
segment boundary: segments start every H = (max_length - passages - markers - stride) / 2 tokens, and
a target at position p uses the segment that gives it between H and 2H tokens of context. Fixed
segment starts (instead of a sliding window) let consecutive targets share one KV cache, so append
and none modes have a fast exact path: prefill the segment once, then per target append the passage
and the target, score, roll back, and extend with the text up to the next target. The slow path
builds every example from scratch with the same contexts; the two agree within fp32 tolerance.

Mode specs: `none`, `prepend`, `append`, `append+markers`, and `+adapter` on any of them (the adapter
is disabled for specs without it). `ensemble` scores each of the k passages separately and mixes the
next-token probabilities with softmax(BM25 score) weights (REPLUG-style) instead of concatenating.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from flashback.config import EvalConfig
from flashback.data import search_without_leakage
from flashback.engines.base import Engine, Session, SessionSpec
from flashback.errors import FlashbackError
from flashback.layout import append_parts, banned_ids, layout, split_point, without_markers
from flashback.text.corpus import Document
from flashback.text.retrieval import Index
from flashback.text.tokenize import encode_batch


@dataclass(frozen=True)
class ModeSpec:
    mode: str  # none | prepend | append
    markers: bool = False
    adapter: bool = False

    @classmethod
    def parse(cls, text: str) -> ModeSpec:
        parts = [p.strip() for p in text.split("+")]
        if parts[0] not in ("none", "prepend", "append") or not set(parts[1:]) <= {"markers", "adapter"}:
            raise FlashbackError(f"bad mode {text!r}: use none|prepend|append, optionally +markers and +adapter")
        if "markers" in parts and parts[0] != "append":
            raise FlashbackError(f"bad mode {text!r}: markers only go with append")
        return cls(parts[0], "markers" in parts, "adapter" in parts)

    def __str__(self) -> str:
        return self.mode + ("+markers" if self.markers else "") + ("+adapter" if self.adapter else "")


@dataclass(frozen=True)
class Target:
    doc_index: int
    position: int  # first target token in the document
    segment_start: int


@dataclass
class Retrieval:
    passages: list[list[int]]
    scores: list[float]
    hits: list[dict] = field(default_factory=list)  # id, document, title, score of each passage


def segment_size(cfg: EvalConfig, chunk_tokens: int) -> int:
    room = cfg.max_length - cfg.k * chunk_tokens - 2 - cfg.stride
    if room < 2 * cfg.query_tokens:
        raise FlashbackError(f"--max-length {cfg.max_length} leaves too little context room for k={cfg.k} passages")
    return room // 2


def plan_targets(docs: Sequence[list[int]], cfg: EvalConfig, half: int, partial: bool = False) -> list[Target]:
    """All target slots (every stride tokens after query_tokens) with at least --min-context tokens of context,
    limited to about --limit-tokens; with `partial`, a last, shorter target takes the tokens that remain.

    The limit keeps whole segments, evenly spread over the text, so that the targets kept still share
    their segment's KV cache in the fast path; where one segment alone holds more targets than the limit (long
    windows), evenly spaced targets over all of them instead.
    """
    least = cfg.min_context or 0
    if least >= 2 * half:
        raise FlashbackError(
            f"--min-context {least} is more than any target gets: --max-length {cfg.max_length} gives contexts of "
            f"at most {2 * half - 1} tokens"
        )
    segments: dict[tuple[int, int], list[Target]] = {}
    for d, tokens in enumerate(docs):
        last = len(tokens) - (1 if partial else cfg.stride) + 1
        for p in range(cfg.query_tokens, max(cfg.query_tokens, last), cfg.stride):
            start = 0 if p < 2 * half else (p // half - 1) * half  # context length in [half, 2 * half)
            if p - start < least:
                continue
            segments.setdefault((d, start), []).append(Target(d, p, start))
    groups = list(segments.values())
    kept = [t for g in groups for t in g]
    if cfg.limit_tokens is None or len(kept) * cfg.stride <= cfg.limit_tokens:
        return kept
    want = max(1, cfg.limit_tokens // cfg.stride)
    if max(len(g) for g in groups) > want:  # one segment holds more than the limit (long windows): spread over all
        return [kept[i * len(kept) // want] for i in range(want)]
    share = cfg.limit_tokens / (len(kept) * cfg.stride)
    picked, owed = [], 0.0
    for g in groups:  # keep a segment whenever the kept share falls behind
        owed += len(g) * share
        if owed >= len(g) / 2:
            picked.append(g)
            owed -= len(g)
    return [t for g in picked or groups[:1] for t in g]


def retrieve_all(
    targets: Sequence[Target],
    docs: Sequence[list[int]],
    documents: Sequence[Document],
    index,
    tokenizer,
    cfg: EvalConfig,
    forbid_titles: frozenset[str],
    batch: int = 512,
) -> list[Retrieval]:
    """Passages for every target: batched BM25 from an Index, or one call per query to any Retriever.

    The leakage filter is the same for both: nothing from the target's own document (by id) or with
    its title. A retriever that returns no ids or titles cannot be filtered, so use one that does.
    """
    if not isinstance(index, Index):
        return _retrieve_each(targets, docs, documents, index, tokenizer, cfg, forbid_titles)
    out = []
    for i in range(0, len(targets), batch):
        chunk = targets[i : i + batch]
        queries = [tokenizer.decode(docs[t.doc_index][t.position - cfg.query_tokens : t.position]) for t in chunk]
        hits = search_without_leakage(index, queries, [documents[t.doc_index] for t in chunk], cfg.k, forbid_titles)
        out += [
            Retrieval(
                [index.passage_tokens(h.index).tolist() for h in row],
                [h.score for h in row],
                [h.to_json() for h in row],
            )
            for row in hits
        ]
    return out


def _retrieve_each(targets, docs, documents, retriever, tokenizer, cfg: EvalConfig, forbid_titles) -> list[Retrieval]:
    out = []
    for t in targets:
        doc = documents[t.doc_index]
        query = tokenizer.decode(docs[t.doc_index][t.position - cfg.query_tokens : t.position])
        banned = forbid_titles | {doc.title} if doc.title else forbid_titles
        hits = [r for r in retriever(query, 2 * cfg.k + 4) if r.hit.doc_id != doc.id and r.hit.title not in banned]
        hits = hits[: cfg.k]
        out.append(
            Retrieval(
                [r.token_ids.tolist() for r in hits], [r.hit.score for r in hits], [r.hit.to_json() for r in hits]
            )
        )
    return out


LogpHook = Callable[[int, torch.Tensor], None]  # (target number, log-probabilities (S, V) that predict it)


def target_logp(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """Log-probabilities (S, V) without the marker ids `banned`: the distribution generation samples from."""
    logits = without_markers(logits, banned)
    return torch.log_softmax(logits.float(), dim=-1)


def target_nll(
    logits: torch.Tensor, target: Sequence[int], banned: torch.Tensor | None, hook: LogpHook | None = None, i: int = 0
) -> torch.Tensor:
    """Per-token negative log-likelihood (S,) from the logits that predict each target token (S, V), the marker
    ids `banned` from the softmax (generation never emits them). `hook` sees the log-probabilities (echo scoring)."""
    logp = target_logp(logits, banned)
    if hook is not None:
        hook(i, logp)
    return -logp[torch.arange(len(target)), torch.tensor(target)]


def _mix(nlls: list[torch.Tensor], scores: list[float]) -> torch.Tensor:
    """REPLUG-style: -log sum_i w_i p_i(y) with w = softmax(retrieval scores)."""
    log_w = torch.log_softmax(torch.tensor(scores, dtype=torch.float32), dim=0)
    return -torch.logsumexp(torch.stack([-n for n in nlls]) + log_w[:, None], dim=0)


def _passage_sets(r: Retrieval, cfg: EvalConfig) -> list[list[list[int]]]:
    return [[p] for p in r.passages] if cfg.ensemble and r.passages else [r.passages]


@torch.inference_mode()
def score_slow(
    session: Session, markers, spec: ModeSpec, docs, targets, retrievals, cfg: EvalConfig, banned, hook=None, head=()
) -> list[torch.Tensor]:
    """Every example from scratch: one forward over [head] context + passages + target (layout.layout)."""
    return list(_slow(session, markers, spec, docs, targets, retrievals, cfg, banned, hook, head))


def _slow(session: Session, markers, spec: ModeSpec, docs, targets, retrievals, cfg: EvalConfig, banned, hook, head):
    markers = markers if spec.markers else None
    for i, (t, r) in enumerate(zip(targets, retrievals, strict=True)):
        tokens = docs[t.doc_index]
        context, target = tokens[t.segment_start : t.position], tokens[t.position : t.position + cfg.stride]
        nlls = []
        for passages in _passage_sets(r, cfg) if spec.mode != "none" else [[]]:
            ids, start = layout(context, passages, target, spec.mode, markers, cfg.tail, head)
            session.reset()
            logits = session.extend(ids, last_logits=len(ids) - start + 1)  # the target's predictors only
            nlls.append(target_nll(logits[:-1], target, banned, hook, i))
        yield _mix(nlls, r.scores) if len(nlls) > 1 else nlls[0]


def score_fast(
    session: Session, markers, spec: ModeSpec, docs, targets, retrievals, cfg: EvalConfig, banned, hook=None, head=()
) -> list[torch.Tensor]:
    """Consecutive targets of a segment share its KV cache (append and none modes).

    The cache holds [head] + the segment's text up to where the layout puts the passage (layout.append_parts);
    each target extends it with the passage block and the target, is scored, and is rolled back.
    """
    if spec.mode == "prepend":
        raise FlashbackError("prepend has no fast path: its prefix changes with every passage")
    return list(_fast(session, markers, spec, docs, targets, retrievals, cfg, banned, hook, head))


def _fast(session: Session, markers, spec: ModeSpec, docs, targets, retrievals, cfg: EvalConfig, banned, hook, head):
    markers = markers if spec.markers else None
    cache, key, cached, last = session, None, 0, None  # cached: context tokens in the cache after the head
    for i, (t, r) in enumerate(zip(targets, retrievals, strict=True)):
        tokens = docs[t.doc_index]
        context = tokens[t.segment_start : t.position]
        target = tokens[t.position : t.position + cfg.stride]
        if (t.doc_index, t.segment_start) != key:  # new segment: a fresh cache
            key, cached = (t.doc_index, t.segment_start), 0
            cache.reset()
            if head:
                last = cache.extend(list(head))
        plain = spec.mode == "none" or not r.passages  # nothing retrieved: scored like none
        keep = len(context) if plain else split_point(len(context), cfg.tail)
        if keep < cached:  # the previous target kept more (it had no passage)
            cache.rollback(len(head) + keep)
            cached = keep
        if keep > cached:  # the text since the previous target joins the cached context
            last = cache.extend(context[cached:keep])
            cached = keep
        cache.keep_from(len(head) + max(0, cached - cfg.tail))  # later targets split at or after this
        if plain:
            logits = torch.cat([last[None], cache.extend(target, all_logits=True)[:-1]])
            yield target_nll(logits, target, banned, hook, i)
            cache.rollback(len(head) + cached)
            continue
        nlls = []
        for passages in _passage_sets(r, cfg):
            block = append_parts(context, passages, markers, cfg.tail)[1]
            logits = cache.extend(block + target, last_logits=len(target) + 1)
            nlls.append(target_nll(logits[:-1], target, banned, hook, i))
            cache.rollback(len(head) + cached)
        yield _mix(nlls, r.scores) if len(nlls) > 1 else nlls[0]


@dataclass
class TokenScores:
    """Log-probabilities of a token sequence under a mode's layout: one per token after the first."""

    logprobs: list[float]  # of tokens[1:]
    top: list[list[tuple[int, float]]]  # the best `top` tokens at each of those positions, best first
    retrievals: list[dict]  # per target: its first position, the query and the passages used
    work: int  # token positions the scoring ran through the model


def score_tokens(
    engine: Engine, tokens: list[int], retriever, spec: ModeSpec, cfg: EvalConfig, top: int = 0
) -> TokenScores:
    """Every token of one sequence scored as `flashback eval` scores a document (see scoring_steps)."""
    steps = scoring_steps(engine, tokens, retriever, spec, cfg, top)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def scoring_steps(
    engine: Engine, tokens: list[int], retriever, spec: ModeSpec, cfg: EvalConfig, top: int = 0, chunk: int = 0
) -> Generator[int, None, TokenScores]:
    """Every token of one sequence scored as `flashback eval` scores a document (same targets, segments, retrieval
    and layouts), so that an evaluation client talking to the server measures the method: the targets every
    `stride` tokens from `query_tokens` on, the last one as long as the tokens that remain, and before the first
    target (no query yet) the mode's model on the tokens alone. No leakage filter: the prompt is no document of
    the index. Windowing follows eval's segments: contexts of `max_length`'s budget, whatever the prompt's length.

    A generator: it yields the token positions computed so far every `chunk` of them (0: never), so that a
    scheduler can run other work within a long scoring, and returns the TokenScores."""
    cfg.validate()
    # A sequence that starts with the tokenizer's BOS keeps it first in every segment's layout, as eval does.
    lead = engine.head_ids if engine.head_ids and tokens[: len(engine.head_ids)] == engine.head_ids else []
    body = tokens[len(lead) :]
    passage_tokens = retriever.max_passage_tokens if retriever is not None else 0
    targets = plan_targets([body], cfg, segment_size(cfg, passage_tokens), partial=True)
    if spec.mode == "none":
        retrievals = [Retrieval([], []) for _ in targets]
    else:
        source = getattr(retriever, "index", retriever)  # an index retrieves all targets in one batch
        nobody = Document("\0request", "\0request", "")  # excludes nothing from the index
        retrievals = retrieve_all(targets, [body], [nobody], source, engine.tokenizer, cfg, frozenset())
    banned = banned_ids(engine.marker_ids, engine.device)
    session = engine.session(SessionSpec(spec.mode if spec.adapter else None, scoring=True))
    logprobs, best = [0.0] * (len(tokens) - 1), [[] for _ in tokens[1:]]

    def keep(first: int, logp: torch.Tensor) -> None:  # logp (S, V) predicts tokens[first : first + S]
        got = logp[torch.arange(logp.shape[0]), torch.tensor(tokens[first : first + logp.shape[0]])]
        values, ids = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
        for j in range(logp.shape[0]):
            logprobs[first + j - 1] = float(got[j])
            best[first + j - 1] = list(zip(ids[j].tolist(), values[j].tolist(), strict=True))

    # No inference_mode around the yields: it would stay on in the scheduler's thread (the forwards set their own).
    start = tokens[: len(lead) + min(cfg.query_tokens, len(body))]  # before the first target: no query yet
    if len(start) > 1:
        session.reset()
        keep(1, target_logp(session.extend(start, all_logits=True)[:-1], banned))
    hook = lambda i, logp: keep(len(lead) + targets[i].position, logp)  # noqa: E731
    scorer = _fast if spec.mode != "prepend" else _slow
    reported = 0
    for _ in scorer(session, engine.marker_ids, spec, [body], targets, retrievals, cfg, banned, hook, lead):
        work = sum(f.tokens for f in session.forwards)
        if chunk and work - reported >= chunk:
            reported = work
            yield work
    decode = engine.tokenizer.decode
    records = [
        {
            "position": len(lead) + t.position,
            "query": decode(body[t.position - cfg.query_tokens : t.position]),
            "passages": r.hits,
        }
        for t, r in zip(targets, retrievals, strict=True)
    ]
    return TokenScores(logprobs, best, records, sum(f.tokens for f in session.forwards))


def scoring_work(n: int, cfg: EvalConfig, passage_tokens: int, mode: str) -> int:
    """Token positions score_tokens computes at most for n tokens: what bounds an echo request in the server.
    Overlapping segments encode each token about twice; each target adds itself and, in its layout, passages."""
    half = segment_size(cfg, passage_tokens)
    targets = max(0, -(-(n - cfg.query_tokens) // cfg.stride))
    if mode == "prepend":  # every target from scratch, after its whole context
        return cfg.query_tokens + targets * (2 * half + cfg.k * passage_tokens + cfg.stride)
    per_target = cfg.stride + (cfg.k * passage_tokens + 2 + cfg.tail if mode == "append" else 0)
    return cfg.query_tokens + 2 * n + targets * per_target


@dataclass
class ModeResult:
    mode: str
    adapter: str | None
    markers: bool
    k: int
    ensemble: bool
    perplexity: float
    nll: float
    tokens: int
    seconds: float
    path: str
    perplexity_by_offset: list[float]  # target token 1..stride: where in the target the loss sits

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def to_json(self) -> dict:
        return {**self.__dict__, "tokens_per_s": self.tokens_per_s}


def evaluate(
    engine: Engine,
    documents: Iterable[Document],
    index: Index,
    specs: Sequence[ModeSpec],
    cfg: EvalConfig,
    forbid_titles: frozenset[str] = frozenset(),
    progress: Callable[[str], None] = lambda s: None,
) -> list[ModeResult]:
    cfg.validate()
    if engine.capabilities.logits != "all":
        raise FlashbackError(f"{engine.name} does not return every position's logits: evaluate on the PyTorch engine")
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise FlashbackError("no text to evaluate")
    for s in specs:
        if s.adapter and engine.adapter_for(s.mode) is None:
            raise FlashbackError(f"mode {s} needs an adapter trained for {s.mode} (--adapter)")
    if any(s.markers for s in specs) and engine.marker_ids is None:
        raise FlashbackError("a +markers mode needs a model loaded with marking tokens")
    docs = encode_batch(engine.tokenizer, [d.text for d in documents])
    half = segment_size(cfg, index.chunk_tokens if isinstance(index, Index) else index.max_passage_tokens)
    targets = plan_targets(docs, cfg, half)
    if not targets:
        least = cfg.min_context or 0
        raise FlashbackError(
            f"no document is longer than {'--min-context + ' if least else ''}query-tokens + stride "
            f"({least + cfg.query_tokens + cfg.stride} tokens): nothing to score"
        )
    progress(f"{len(targets)} targets ({len(targets) * cfg.stride} tokens) from {len(docs)} documents; retrieving")
    retrievals = retrieve_all(targets, docs, documents, index, engine.tokenizer, cfg, forbid_titles)
    banned = banned_ids(engine.marker_ids, engine.device)
    return [_score_mode(engine, spec, docs, targets, retrievals, cfg, banned, progress) for spec in specs]


def _score_mode(engine: Engine, spec: ModeSpec, docs, targets, retrievals, cfg: EvalConfig, banned, progress):
    fast = cfg.fast and spec.mode != "prepend"
    progress(f"scoring {spec} ({'fast' if fast else 'from scratch'})")
    session = engine.session(SessionSpec(spec.mode if spec.adapter else None, scoring=True))
    start = time.perf_counter()
    scorer = _fast if fast else _slow  # generators: one target's NLLs at a time, so the bar moves with them
    scored = scorer(session, engine.marker_ids, spec, docs, targets, retrievals, cfg, banned, None, engine.head_ids)
    bar = tqdm(scored, total=len(targets), desc=str(spec), unit="target", mininterval=5, leave=False)
    nlls = torch.cat(list(bar))
    seconds = time.perf_counter() - start
    nll = float(nlls.mean())
    progress(f"{spec}: perplexity {math.exp(nll):.3f} over {nlls.numel()} tokens in {seconds:.1f} s")
    return ModeResult(
        str(spec),
        engine.adapter_for(spec.mode) if spec.adapter else None,
        spec.markers,
        cfg.k,
        cfg.ensemble and spec.mode != "none",
        math.exp(nll),
        nll,
        nlls.numel(),
        seconds,
        "fast" if fast else "from scratch",
        [round(math.exp(float(v)), 3) for v in nlls.reshape(-1, cfg.stride).mean(dim=0)],
    )


def format_table(results: Sequence[ModeResult]) -> str:
    lines = [
        "| mode | adapter | markers | k | perplexity | tokens scored | wall s | tokens/s | path |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        k = f"{r.k} (ensemble)" if r.ensemble else str(r.k)
        lines.append(
            f"| {r.mode} | {'yes' if r.adapter else 'no'} | {'yes' if r.markers else 'no'} | {k} | "
            f"{r.perplexity:.3f} | {r.tokens} | {r.seconds:.1f} | {r.tokens_per_s:.1f} | {r.path} |"
        )
    return "\n".join(lines)
