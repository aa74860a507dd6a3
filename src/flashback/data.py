"""Training and evaluation examples: (context, retrieved passages, target), as the paper builds them.

Each document is walked in steps of `stride` target tokens. The query for a target is the
`query_tokens` tokens before it; passages of the same document or title are never retrieved
(leakage filter). The context is the text before the target, cut to a seeded random length so that
context + markers + passages + target fit in `max_length` positions. The token layout a model sees
is built by `layout()`, the one place that decides it for training and evaluation.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from flashback.atomic import atomic_folder
from flashback.corpus import Document, is_heldout
from flashback.errors import FlashbackError
from flashback.retrieval import Index

FORMAT = "flashback-data/1"


@dataclass(frozen=True)
class PrepareConfig:
    stride: int = 16
    query_tokens: int = 32
    k: int = 1
    max_length: int = 512
    val_fraction: float = 0.05
    max_examples: int | None = None  # keep a seeded sample of this many (training budget)
    seed: int = 0
    batch_queries: int = 512


@dataclass(frozen=True)
class Example:
    doc_id: str
    position: int  # index of the first target token in the document
    context: list[int]
    passages: list[list[int]]
    passage_ids: list[str]
    target: list[int]

    def to_json(self) -> dict:
        return asdict(self)


def layout(
    context: Sequence[int],
    passages: Sequence[Sequence[int]],
    target: Sequence[int],
    position: str,
    markers: tuple[int, int] | None,
) -> tuple[list[int], int]:
    """Token ids of one example and the index where the target starts.

    append:  context [<MARK_L>] passages [<MARK_R>] target   (FlashBack)
    prepend: passages context target                          (In-Context RALM)
    none:    context target
    """
    flat = [t for p in passages for t in p]
    if position == "append":
        middle = [markers[0], *flat, markers[1]] if markers else flat
        ids = [*context, *middle]
    elif position == "prepend":
        ids = [*flat, *context]
    elif position == "none":
        ids = list(context)
    else:
        raise FlashbackError(f"unknown position {position!r}")
    return ids + list(target), len(ids)


@dataclass(frozen=True)
class TargetSlot:
    """A target position in a document, before retrieval."""

    doc: Document
    tokens: list[int]
    position: int


def target_slots(documents: Iterable[Document], tokenizer, stride: int, query_tokens: int) -> Iterator[TargetSlot]:
    for doc in documents:
        tokens = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
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
    return index.search(
        queries, k, exclude_titles=[forbid_titles | {d.title} for d in sources], exclude_docs=[{d.id} for d in sources]
    )


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


def make_examples(
    documents: Iterable[Document],
    tokenizer,
    index: Index,
    cfg: PrepareConfig,
    forbid_titles: frozenset[str] = frozenset(),
    progress: bool = True,
) -> Iterator[Example]:
    reserve = cfg.k * index.chunk_tokens + 2 + cfg.stride
    if cfg.max_length - reserve < cfg.query_tokens:
        raise FlashbackError(
            f"--max-length {cfg.max_length} leaves no room for a context after "
            f"{cfg.k} passage(s) of {index.chunk_tokens} tokens and the target"
        )
    rng = random.Random(cfg.seed)
    slots = target_slots(documents, tokenizer, cfg.stride, cfg.query_tokens)
    bar = tqdm(desc="examples", unit="ex", disable=not progress)
    while batch := _take(slots, cfg.batch_queries):
        for slot, hits in zip(batch, retrieve_for(batch, index, tokenizer, cfg, forbid_titles), strict=True):
            longest = min(slot.position, cfg.max_length - reserve)
            length = rng.randint(min(cfg.query_tokens, longest), longest)
            yield Example(
                doc_id=slot.doc.id,
                position=slot.position,
                context=slot.tokens[slot.position - length : slot.position],
                passages=[index.passage_tokens(h.index).tolist() for h in hits],
                passage_ids=[h.id for h in hits],
                target=slot.tokens[slot.position : slot.position + cfg.stride],
            )
        bar.update(len(batch))
    bar.close()


def _take(it: Iterator, n: int) -> list:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


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
) -> dict:
    """Write train.jsonl, val.jsonl and manifest.json to `out` (atomically); return the manifest."""
    index.check_tokenizer(fingerprint)
    examples = list(make_examples(documents, tokenizer, index, cfg, forbid_titles, progress))
    if not examples:
        raise FlashbackError(
            f"no examples: the text holds no document longer than {cfg.query_tokens + cfg.stride} tokens"
        )
    if cfg.max_examples is not None and len(examples) > cfg.max_examples:
        examples = random.Random(cfg.seed).sample(examples, cfg.max_examples)
    splits: dict[str, list[Example]] = {"train": [], "val": []}
    for ex in examples:
        splits["val" if is_heldout(f"{cfg.seed}:{ex.doc_id}", cfg.val_fraction) else "train"].append(ex)
    if not splits["train"]:
        raise FlashbackError("every example fell in the validation split; lower --val-fraction")
    manifest = {
        "format": FORMAT,
        "tokenizer": {"name": tokenizer_name, "fingerprint": fingerprint},
        "index": {
            "path": str(index_path),
            "chunk_tokens": index.chunk_tokens,
            "num_passages": len(index),
            "created": index.manifest.get("created"),
        },
        "settings": asdict(cfg),
        "forbid_titles": len(forbid_titles),
        "counts": {name: len(rows) for name, rows in splits.items()},
        "documents": len({ex.doc_id for ex in examples}),
    }
    with atomic_folder(out, "manifest.json", "prepared data folder") as tmp:
        for name, rows in splits.items():
            with open(tmp / f"{name}.jsonl", "w") as fh:
                for ex in rows:
                    fh.write(json.dumps(ex.to_json(), separators=(",", ":")) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_examples(data_dir: str | Path, split: str, fingerprint: str | None = None) -> tuple[list[Example], dict]:
    """Read one split of a prepared data folder, checking it was made with this tokenizer."""
    data_dir = Path(data_dir).expanduser()
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FlashbackError(f"{data_dir} is not a prepared data folder ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise FlashbackError(f"{data_dir}: unknown data format {manifest.get('format')!r}")
    if fingerprint and manifest["tokenizer"]["fingerprint"] != fingerprint:
        raise FlashbackError(f"{data_dir} was prepared with another tokenizer ({manifest['tokenizer']['name']})")
    path = data_dir / f"{split}.jsonl"
    examples = []
    try:
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    examples.append(Example(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as exc:
                    raise FlashbackError(f"{path}:{lineno}: not an example ({exc})") from None
    except OSError as exc:
        raise FlashbackError(f"cannot read {path}: {exc}") from None
    return examples, manifest
