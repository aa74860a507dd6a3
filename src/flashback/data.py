"""Training and evaluation data: text segments with their targets and retrieved passages.

The token layouts these examples are laid out in live in layout.py.

Prepared data is a list of `Segment`s: a window of a document with a target every `stride`
tokens (the query is the `query_tokens` before each target; passages of the same document or
title are never retrieved). A target's context is the window's text before it, so contexts range
from `query_tokens` to the longest that lets context + markers + passages + target fit
`max_length`. One segment trains all its targets at once (train.py packs them); `examples()`
gives the same data one example per target. The data does not depend on `tail`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from flashback.atomic import FolderKind, atomic_folder, check_output
from flashback.config import PrepareConfig
from flashback.errors import FlashbackError
from flashback.text.corpus import Document, is_heldout
from flashback.text.retrieval import Index
from flashback.text.tokenize import encode

FORMAT = "flashback-data/2"
DATA_FOLDER = FolderKind(
    "prepared data folder", "manifest.json", FORMAT, frozenset({"manifest.json", "train.jsonl", "val.jsonl"})
)


@dataclass(frozen=True)
class Example:
    """One target with its context and passages: the unpacked view of a segment."""

    doc_id: str
    position: int  # index of the first target token in the document
    context: list[int]
    passages: list[list[int]]
    passage_ids: list[str]
    target: list[int]


@dataclass(frozen=True)
class Segment:
    """A window of a document and every target in it, each with its retrieved passages."""

    doc_id: str
    start: int  # document position of tokens[0]
    stride: int  # target length
    tokens: list[int]
    targets: list[int]  # position of each target's first token in `tokens`
    passages: list[list[list[int]]]  # per target: k passages of token ids
    passage_ids: list[list[str]]

    def examples(self) -> list[Example]:
        return [
            Example(
                self.doc_id,
                self.start + q,
                self.tokens[:q],
                self.passages[j],
                self.passage_ids[j],
                self.tokens[q : q + self.stride],
            )
            for j, q in enumerate(self.targets)
        ]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TargetSlot:
    """A target position in a document, before retrieval."""

    doc: Document
    tokens: list[int]
    position: int


def target_slots(documents: Iterable[Document], tokenizer, stride: int, query_tokens: int) -> Iterator[TargetSlot]:
    for doc in documents:
        tokens = encode(tokenizer, doc.text)
        for position in range(query_tokens, len(tokens) - stride + 1, stride):
            yield TargetSlot(doc, tokens, position)


def search_without_leakage(
    index: Index,
    queries: Sequence[str],
    sources: Sequence[Document],
    k: int,
    forbid_titles: frozenset[str] = frozenset(),
):
    """Top-k hits per query, never from the query's own document or a document with its title.

    The one leakage filter, shared by `prepare` and `eval`.
    """
    titles = [forbid_titles | {d.title} if d.title else forbid_titles for d in sources]  # "" is no title
    return index.search(queries, k, exclude_titles=titles, exclude_docs=[{d.id} for d in sources])


def retrieve_for(
    slots: Sequence[TargetSlot],
    index: Index,
    tokenizer,
    cfg: PrepareConfig,
    forbid_titles: frozenset[str] = frozenset(),
) -> list[list]:
    """Batched BM25 retrieval for many target slots."""
    queries = [tokenizer.decode(s.tokens[s.position - cfg.query_tokens : s.position]) for s in slots]
    return search_without_leakage(index, queries, [s.doc for s in slots], cfg.k, forbid_titles)


def longest_context(cfg: PrepareConfig, chunk_tokens: int) -> int:
    """The longest context that leaves room for markers, k passages and the target in max_length."""
    longest = cfg.max_length - cfg.k * chunk_tokens - 2 - cfg.stride
    if longest < cfg.query_tokens:
        raise FlashbackError(
            f"--max-length {cfg.max_length} leaves no room for a context after "
            f"{cfg.k} passage(s) of {chunk_tokens} tokens and the target"
        )
    return longest


def window_of(position: int, cfg: PrepareConfig, longest: int) -> int:
    """Start of the window a target slot belongs to: windows hold consecutive targets whose contexts
    run from query_tokens to at most `longest` tokens."""
    per_window = (longest - cfg.query_tokens) // cfg.stride + 1
    m = (position - cfg.query_tokens) // cfg.stride
    return (m // per_window) * per_window * cfg.stride


def make_segments(
    documents: Iterable[Document],
    tokenizer,
    index: Index,
    cfg: PrepareConfig,
    forbid_titles: frozenset[str] = frozenset(),
    progress: bool = True,
) -> Iterator[Segment]:
    longest = longest_context(cfg, index.chunk_tokens)
    slots = target_slots(documents, tokenizer, cfg.stride, cfg.query_tokens)
    bar = tqdm(desc="targets", unit="tg", disable=not progress)
    pending: list[tuple[TargetSlot, list]] = []  # slots of the window being filled, with their hits

    def flush() -> Segment:
        first, last = pending[0][0], pending[-1][0]
        start = window_of(first.position, cfg, longest)
        segment = Segment(
            doc_id=first.doc.id,
            start=start,
            stride=cfg.stride,
            tokens=first.tokens[start : last.position + cfg.stride],
            targets=[s.position - start for s, _ in pending],
            passages=[[index.passage_tokens(h.index).tolist() for h in hits] for _, hits in pending],
            passage_ids=[[h.id for h in hits] for _, hits in pending],
        )
        pending.clear()
        return segment

    while batch := _take(slots, cfg.batch_queries):
        for slot, hits in zip(batch, retrieve_for(batch, index, tokenizer, cfg, forbid_titles), strict=True):
            if not hits:  # nothing matches the query: no passage to learn to use
                continue
            if pending and (
                pending[0][0].doc.id != slot.doc.id
                or window_of(pending[0][0].position, cfg, longest) != window_of(slot.position, cfg, longest)
            ):
                yield flush()
            pending.append((slot, hits))
        bar.update(len(batch))
    if pending:
        yield flush()
    bar.close()


def _take(it: Iterator, n: int) -> list:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


DOCS_PER_TASK = 32  # documents per unit of work: big enough to batch BM25 queries, small enough to spread
_JOB: dict = {}  # what the workers of one `prepare` run share (forked, so the index is not copied or reloaded)


def prepare(
    documents: Iterable[Document],
    tokenizer,
    tokenizer_name: str,
    fingerprint: str,
    index: Index,
    index_path: str,
    out: str | Path,
    cfg: PrepareConfig,
    forbid_titles: frozenset[str] = frozenset(),
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """Write train.jsonl, val.jsonl (one segment a line) and manifest.json to `out` (atomically), streaming: memory
    stays flat whatever the corpus size (--max-segments keeps one offset per segment). `workers` > 1 segments chunks
    of documents in forked processes, written in input order: the same folder byte for byte as with one worker."""
    check_output(out, DATA_FOLDER)  # before the slow part
    index.check_tokenizer(fingerprint)
    longest_context(cfg, index.chunk_tokens)
    if workers < 1:
        raise FlashbackError("--workers must be at least 1")
    _JOB.update(tokenizer=tokenizer, index=index, cfg=cfg, forbid=forbid_titles)
    counts, targets, docs = {"train": 0, "val": 0}, {"train": 0, "val": 0}, set()
    bar = tqdm(desc="documents", unit="doc", disable=not progress)
    try:
        with atomic_folder(out, DATA_FOLDER) as tmp:
            files = {name: open(tmp / f"{name}.jsonl", "w") for name in counts}  # noqa: SIM115
            try:
                for doc_id, n_targets, line in _sampled(_segment_stream(documents, workers, bar), cfg, tmp):
                    split = "val" if is_heldout(f"{cfg.seed}:{doc_id}", cfg.val_fraction) else "train"
                    files[split].write(line + "\n")
                    counts[split] += 1
                    targets[split] += n_targets
                    docs.add(doc_id)
            finally:
                for fh in files.values():
                    fh.close()
            if not counts["train"] and not counts["val"]:
                raise FlashbackError(
                    f"no examples: the text holds no document longer than {cfg.query_tokens + cfg.stride} tokens"
                )
            if not counts["train"]:
                raise FlashbackError("every example fell in the validation split; lower --val-fraction")
            manifest = {
                "format": FORMAT,
                "tokenizer": {"name": tokenizer_name, "fingerprint": fingerprint},
                "index": index_record(index, index_path),
                "settings": asdict(cfg),
                "forbid_titles": len(forbid_titles),
                "counts": counts,
                "targets": targets,
                "documents": len(docs),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        bar.close()
        _JOB.clear()
    return manifest


def segment_line(segment: Segment) -> str:
    """A segment as one line of train.jsonl or val.jsonl (compact JSON)."""
    return json.dumps(segment.to_json(), separators=(",", ":"))


def index_record(index: Index, path: str | Path | None = None) -> dict:
    """What a data folder's manifest says about the index its passages came from."""
    where = {"path": str(path)} if path is not None else {}
    return {
        **where,
        "chunk_tokens": index.chunk_tokens,
        "num_passages": len(index),
        "created": index.manifest.get("created"),
    }


def _segment_lines(documents: list[Document]) -> list[tuple[str, int, str]]:
    """(document id, target count, JSON line) of each segment of some documents: one unit of work."""
    job = _JOB
    segments = make_segments(documents, job["tokenizer"], job["index"], job["cfg"], job["forbid"], progress=False)
    return [(s.doc_id, len(s.targets), segment_line(s)) for s in segments]


def _segment_stream(documents: Iterable[Document], workers: int, bar) -> Iterator[tuple[str, int, str]]:
    """Every segment's line, in document order; with several workers, at most two chunks each in flight."""
    docs = iter(documents)
    chunks = iter(lambda: _take(docs, DOCS_PER_TASK), [])
    if workers == 1:
        for chunk in chunks:
            yield from _segment_lines(chunk)
            bar.update(len(chunk))
        return
    import multiprocessing
    import os
    from collections import deque

    if "fork" not in multiprocessing.get_all_start_methods():
        raise FlashbackError("--workers needs the fork start method (Linux); use --workers 1 here")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked Rust tokenizers must not use their own pool
    with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_signals) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((len(chunk), pool.apply_async(_segment_lines, (chunk,))))
            while len(pending) >= 2 * workers:
                n, result = pending.popleft()
                yield from result.get()
                bar.update(n)
        while pending:
            n, result = pending.popleft()
            yield from result.get()
            bar.update(n)
        pool.close()  # done: the workers exit on their own, never by a signal
        pool.join()


def _worker_signals() -> None:
    """A worker leaves Ctrl-C and SIGTERM to its parent (which stops the pool) instead of the CLI's handlers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _sampled(lines: Iterator[tuple[str, int, str]], cfg: PrepareConfig, tmp: Path) -> Iterator[tuple[str, int, str]]:
    """All lines, or --max-segments of them drawn as random.sample would draw them from the whole list: the
    lines wait in a scratch file and only their offsets stay in memory."""
    if cfg.max_segments is None:
        yield from lines
        return
    scratch = tmp / "all.scratch"
    offsets = []
    with open(scratch, "w+b") as fh:
        for doc_id, n_targets, line in lines:
            offsets.append(fh.tell())
            fh.write(json.dumps([doc_id, n_targets, line]).encode() + b"\n")
        chosen = range(len(offsets))
        if len(offsets) > cfg.max_segments:
            chosen = random.Random(cfg.seed).sample(chosen, cfg.max_segments)
        for i in chosen:
            fh.seek(offsets[i])
            doc_id, n_targets, line = json.loads(fh.readline())
            yield doc_id, n_targets, line
    scratch.unlink()


def write_data_folder(out: str | Path, splits: dict[str, list[Segment]], manifest: dict) -> None:
    """train.jsonl, val.jsonl (one segment a line) and manifest.json, written whole or not at all."""
    with atomic_folder(out, DATA_FOLDER) as tmp:
        for name, rows in splits.items():
            with open(tmp / f"{name}.jsonl", "w") as fh:
                for seg in rows:
                    fh.write(segment_line(seg) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def load_segments(data_dir: str | Path, split: str, fingerprint: str | None = None) -> tuple[list[Segment], dict]:
    """Read one split of a prepared data folder, checking it was made with this tokenizer."""
    data_dir = Path(data_dir).expanduser()
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FlashbackError(f"{data_dir} is not a prepared data folder ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise FlashbackError(
            f"{data_dir}: data format {manifest.get('format')!r}, expected {FORMAT!r}; run `flashback prepare` again"
        )
    if fingerprint and manifest["tokenizer"]["fingerprint"] != fingerprint:
        raise FlashbackError(f"{data_dir} was prepared with another tokenizer ({manifest['tokenizer']['name']})")
    path = data_dir / f"{split}.jsonl"
    segments = []
    try:
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    segments.append(Segment(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as exc:
                    raise FlashbackError(f"{path}:{lineno}: not a segment ({exc})") from None
    except OSError as exc:
        raise FlashbackError(f"cannot read {path}: {exc}") from None
    return segments, manifest
