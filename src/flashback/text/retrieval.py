"""A BM25 passage index (bm25s, Lucene scoring): build, save atomically, load, search.

On disk an index is a folder:
  manifest.json     format, tokenizer fingerprint, chunk size, counts, sources
  passages.jsonl    one {"id", "doc_id", "title", "text"} per passage, in index order
  token_ids.npy     all passages' model token ids, concatenated (int32)
  offsets.npy       passage i is token_ids[offsets[i]:offsets[i + 1]]
  bm25/             the bm25s index
The model token ids are stored so that generation appends exactly the tokens that were indexed.

A `Retriever` is what generation asks for passages: any callable (query, k) -> list[Retrieved];
`IndexRetriever` is the one over an Index.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import bm25s
import numpy as np

from flashback.atomic import FolderKind, atomic_folder
from flashback.errors import FlashbackError
from flashback.text.corpus import Passage

FORMAT = "flashback-index/1"
INDEX_FOLDER = FolderKind(
    "FlashBack index",
    "manifest.json",
    FORMAT,
    frozenset({"manifest.json", "passages.jsonl", "token_ids.npy", "offsets.npy", "bm25"}),
    nested=("bm25/*.index.json", "bm25/*.index.npy"),  # what bm25s writes
)
BM25_PARAMS = {"method": "lucene", "k1": 1.2, "b": 0.75}


@dataclass(frozen=True)
class Hit:
    index: int  # row of the passage in the index
    id: str
    doc_id: str
    title: str
    score: float

    def to_json(self) -> dict:
        return {"id": self.id, "doc_id": self.doc_id, "title": self.title, "score": round(self.score, 4)}


def _get(record, key: str):
    return record.get(key) if isinstance(record, dict) else None


def _check(manifest: dict, meta: list, token_ids: np.ndarray, offsets: np.ndarray, bm25) -> None:
    """What every command relies on: the manifest's fields and types, one record and one token span per passage,
    a BM25 matrix over the same passages."""
    tokenizer, chunk = manifest.get("tokenizer"), manifest.get("chunk_tokens")
    if not isinstance(tokenizer, dict) or not all(isinstance(tokenizer.get(k), str) for k in ("name", "fingerprint")):
        raise FlashbackError("index {path} is corrupt: its manifest names no tokenizer")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise FlashbackError(f"index {{path}} is corrupt: chunk_tokens is {chunk!r}")
    n = len(meta)
    if n == 0 or n != manifest.get("num_passages") or offsets.ndim != 1 or len(offsets) != n + 1:
        raise FlashbackError("index {path} is corrupt: passage counts do not match the manifest")
    if token_ids.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(token_ids) or np.any(np.diff(offsets) < 0):
        raise FlashbackError("index {path} is corrupt: token ids do not match the passages")
    if not all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("id", "doc_id", "text")) for m in meta):
        raise FlashbackError("index {path} is corrupt: a passage record lacks its id or text")
    scores = getattr(bm25, "scores", None)
    if not isinstance(scores, dict) or not {"data", "indices", "indptr", "num_docs"} <= set(scores):
        raise FlashbackError("index {path} is corrupt: its BM25 matrix is damaged")
    data, indices, indptr = scores["data"], scores["indices"], scores["indptr"]
    if len(data) != len(indices) or len(indptr) == 0 or int(indptr[-1]) != len(data):
        raise FlashbackError("index {path} is corrupt: its BM25 matrix is damaged")
    if scores["num_docs"] != n:
        raise FlashbackError("index {path} is corrupt: the BM25 matrix covers another number of passages")


def _bm25_tokenize(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class Index:
    def __init__(self, manifest: dict, meta: list[dict], token_ids: np.ndarray, offsets: np.ndarray, bm25):
        self.manifest = manifest
        self.meta = meta
        self.token_ids = token_ids
        self.offsets = offsets
        self.bm25 = bm25

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def chunk_tokens(self) -> int:
        return int(self.manifest["chunk_tokens"])

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        passages: Sequence[Passage],
        *,
        tokenizer_name: str,
        fingerprint: str,
        chunk_tokens: int,
        sources: Sequence[str] = (),
    ) -> Index:
        if not passages:
            raise FlashbackError("the corpus holds no text: nothing to index")
        bm25 = bm25s.BM25(**BM25_PARAMS)
        bm25.index(_bm25_tokenize([p.text for p in passages]), show_progress=False)
        lengths = np.array([len(p.token_ids) for p in passages], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        token_ids = np.concatenate([p.token_ids for p in passages]).astype(np.int32)
        meta = [{"id": p.id, "doc_id": p.doc_id, "title": p.title, "text": p.text} for p in passages]
        manifest = {
            "format": FORMAT,
            "tokenizer": {"name": tokenizer_name, "fingerprint": fingerprint},
            "chunk_tokens": chunk_tokens,
            "num_passages": len(passages),
            "num_documents": len({p.doc_id for p in passages}),
            "num_tokens": int(offsets[-1]),
            "bm25": BM25_PARAMS,
            "sources": [str(s) for s in sources],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return cls(manifest, meta, token_ids, offsets, bm25)

    def save(self, out: str | Path) -> Path:
        """Write to a temporary sibling folder, then swap it in: a crash leaves no half index."""
        out = Path(out).expanduser()
        with atomic_folder(out, INDEX_FOLDER) as tmp:
            with open(tmp / "passages.jsonl", "w", encoding="utf-8") as fh:
                for row in self.meta:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            np.save(tmp / "token_ids.npy", self.token_ids)
            np.save(tmp / "offsets.npy", self.offsets)
            self.bm25.save(tmp / "bm25", show_progress=False)
            (tmp / "manifest.json").write_text(json.dumps(self.manifest, indent=2) + "\n")
        return out

    # ---- loading --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Index:
        """Load and validate an index once, for every command: a damaged one is a one-line error here, never a
        traceback later."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FlashbackError(f"index {path} not found (build one with: flashback index CORPUS --out {path})")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise FlashbackError(f"index {path}: unknown format {_get(manifest, 'format')!r}")
            with open(path / "passages.jsonl", encoding="utf-8") as fh:
                meta = [json.loads(line) for line in fh]
            token_ids = np.load(path / "token_ids.npy")
            offsets = np.load(path / "offsets.npy")
            bm25 = bm25s.BM25.load(path / "bm25", mmap=True, show_progress=False)
            _check(manifest, meta, token_ids, offsets, bm25)
        except FlashbackError as exc:
            raise FlashbackError(str(exc).replace("{path}", str(path))) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, RecursionError) as exc:
            raise FlashbackError(f"index {path} is missing files or corrupt ({type(exc).__name__}: {exc})") from None
        return cls(manifest, meta, token_ids, offsets, bm25)

    def check_tokenizer(self, fingerprint: str) -> None:
        built = self.manifest["tokenizer"]
        if built["fingerprint"] != fingerprint:
            raise FlashbackError(
                f"the index was built with another tokenizer ({built['name']}); "
                "rebuild it with this model: flashback index CORPUS --out DIR --model MODEL"
            )

    # ---- searching ------------------------------------------------------------------------
    def passage_tokens(self, i: int) -> np.ndarray:
        return self.token_ids[self.offsets[i] : self.offsets[i + 1]]

    def passage_text(self, i: int) -> str:
        return self.meta[i]["text"]

    def search(
        self,
        queries: Sequence[str],
        k: int = 1,
        *,
        exclude_titles: Sequence[set[str]] | None = None,
        exclude_docs: Sequence[set[str]] | None = None,
    ) -> list[list[Hit]]:
        """Top-k passages per query, best first; optional per-query title / document filters."""
        if k < 1:
            raise FlashbackError("k must be at least 1")
        if k > len(self):
            raise FlashbackError(f"k={k} is larger than the index ({len(self)} passages)")
        if not queries:
            return []
        filtered = exclude_titles is not None or exclude_docs is not None
        fetch = min(len(self), k * 4 + 16 if filtered else k)
        while True:
            docs, scores = self.bm25.retrieve(_bm25_tokenize(queries), k=fetch, show_progress=False)
            results = [
                self._keep(row_docs, row_scores, k, q, exclude_titles, exclude_docs)
                for q, (row_docs, row_scores) in enumerate(zip(docs, scores, strict=True))
            ]
            # A row is complete with k hits, or once its scores reach 0 (no further passage matches).
            if fetch == len(self) or all(len(r) == k or s[-1] <= 0 for r, s in zip(results, scores, strict=True)):
                return results
            fetch = min(len(self), fetch * 4)

    def _keep(self, row_docs, row_scores, k, q, exclude_titles, exclude_docs) -> list[Hit]:
        """Up to k hits that pass the filters; a passage that matches no query term (score 0) is no hit."""
        hits: list[Hit] = []
        for i, score in zip(row_docs.tolist(), row_scores.tolist(), strict=True):
            if score <= 0:
                break
            m = self.meta[i]
            if exclude_titles is not None and m["title"] in exclude_titles[q]:
                continue
            if exclude_docs is not None and m["doc_id"] in exclude_docs[q]:
                continue
            hits.append(Hit(i, m["id"], m["doc_id"], m["title"], float(score)))
            if len(hits) == k:
                break
        return hits


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

    def passage(self, i: int) -> Retrieved:
        """Passage i as a hit that no search scored (a chosen passage: the bench's filler, QA's gold passage)."""
        m = self.index.meta[i]
        return Retrieved(Hit(i, m["id"], m["doc_id"], m["title"], 0.0), self.index.passage_tokens(i))
