"""Read documents from text files and JSON Lines, and split them into passages of N model tokens.

Passages are cut on model tokens (not words) so that a passage appended at generation time
costs exactly `chunk_tokens` positions, as in the paper. Retrieval lives in retrieval.py.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import hashlib
import importlib
import io
import json
import os
import pydoc
import sys
import warnings
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from flashback.config import PASSAGE_TOKENS
from flashback.errors import FlashbackError, first_line
from flashback.text.tokenize import encode_batch

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Passage:
    id: str  # "<doc id>#<chunk number>"
    doc_id: str
    title: str
    text: str
    token_ids: np.ndarray  # (chunk_tokens,) or shorter for a document's last chunk


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


def _is_text(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly plus the readable files found (recursively, sorted) in folders."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and (_is_text(p) or _is_jsonl(p)))
            if not found:
                raise FlashbackError(f"{path}: folder holds no .txt/.md/.rst/.jsonl/.jsonl.gz files")
            files.extend(found)
        elif path.is_file():
            if not (_is_text(path) or _is_jsonl(path)):
                raise FlashbackError(f"{path}: unsupported file type (use .txt, .md, .rst, .jsonl, .jsonl.gz)")
            files.append(path)
        else:
            raise FlashbackError(f"{path}: no such file or folder")
    return files


def _read_jsonl(path: Path) -> Iterator[Document]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FlashbackError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
                except RecursionError:
                    raise FlashbackError(f"{path}:{lineno}: malformed JSON (nested too deeply)") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise FlashbackError(f'{path}:{lineno}: expected an object with a string "text" field')
                doc_id = str(record.get("id", f"{path.name}:{lineno}"))
                yield Document(id=doc_id, title=str(record.get("title", "")), text=record["text"])
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise FlashbackError(f"{path}: cannot read ({exc})") from None


def is_heldout(doc_id: str, fraction: float) -> bool:
    """A stable, seed-free split: the same documents are held out in prepare and eval."""
    bucket = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:4], "big") % 10_000
    return bucket < fraction * 10_000


def select(
    documents: Iterable[Document],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    heldout: float = 0.0,
    split: str = "all",
    exclude_ids: Collection[str] = frozenset(),
) -> Iterator[Document]:
    """Filter documents by id globs (e.g. 'python:library/*'), by exact ids and by the held-out split.

    split: "all", "train" (drop the held-out fraction) or "heldout" (keep only it).
    """
    for doc in documents:
        if doc.id in exclude_ids:
            continue
        if include and not any(fnmatch.fnmatchcase(doc.id, g) for g in include):
            continue
        if any(fnmatch.fnmatchcase(doc.id, g) for g in exclude):
            continue
        if split != "all" and is_heldout(doc.id, heldout) != (split == "heldout"):
            continue
        yield doc


# Modules whose import has side effects (a browser, a window, a printed poem) or that only exist elsewhere.
SKIP_MODULES = frozenset(
    {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "lib2to3", "test", "ensurepip"}
)


def stdlib_modules() -> list[str]:
    """The public standard-library modules the built-in corpus renders (imported or not)."""
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)


@contextlib.contextmanager
def _silenced():
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def quiet_import(name: str):
    """The module, imported with its output and warnings silenced; None if it does not import here."""
    try:
        with _silenced():
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - platform-specific modules (winreg, ...) and broken imports
        return None


def module_document(name: str) -> Document | None:
    """A standard-library module's documentation as pydoc renders it in plain text, or None."""
    module = quiet_import(name)
    if module is None:
        return None
    try:
        with _silenced():
            text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    except Exception:  # noqa: BLE001 - a module pydoc cannot render
        return None
    return Document(id=f"pydoc:module/{name}", title=name, text=_strip_gutters(text))


def python_docs(progress: bool = True) -> Iterator[Document]:
    """The Python documentation every interpreter carries: the language reference topics of `help()`
    (pydoc_data.topics) and the rendered documentation of the importable standard-library modules.

    Nothing is downloaded; the text depends on the running Python version. Module imports run with
    their output and warnings silenced; a module that fails to import is skipped.
    """
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(id=f"pydoc:topic/{name}", title=name, text=topics[name])
    for name in tqdm(stdlib_modules(), desc="rendering module docs", unit="module", disable=not progress):
        doc = module_document(name)
        if doc is not None:
            yield doc


def _strip_gutters(text: str) -> str:
    """pydoc's plain text nests class members behind " |  " gutters; a retrieved passage should read as prose
    (a model shown the gutters copies them), so each line loses its leading run of spaces and bars."""
    return "\n".join(line.lstrip(" |") for line in text.splitlines())


BUILTIN_CORPORA = {"python-docs": python_docs}


def builtin_documents(name: str, progress: bool = True) -> Iterator[Document]:
    if name not in BUILTIN_CORPORA:
        raise FlashbackError(f"unknown built-in corpus {name!r}; choose one of {', '.join(BUILTIN_CORPORA)}")
    return BUILTIN_CORPORA[name](progress)


def dataset_documents(
    source: str,
    text_field: str = "text",
    split: str | None = None,
    title_field: str | None = None,
    default_split: str = "test",
) -> Iterator[Document]:
    """The rows of a Hugging Face `datasets` dataset as documents: a folder written by `save_to_disk`, a
    parquet/JSON(L)/CSV file, or a hub name. Ids are `SOURCE:SPLIT:ROW`, so held-out splits stay stable."""
    try:
        import datasets
    except ImportError:
        raise FlashbackError("--dataset needs the datasets package: pip install 'flashback[datasets]'") from None
    data = _load_dataset(datasets, source)
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        split = split or (names[0] if len(names) == 1 else default_split)
        if split not in data:
            raise FlashbackError(f"{source} has no split {split!r}; it has {', '.join(names)} (--split)")
        data = data[split]
    for field in (text_field, title_field):
        if field is not None and field not in data.column_names:
            raise FlashbackError(f"{source} has no column {field!r}; it has {', '.join(data.column_names)}")
    name = Path(source).name or source
    for row, record in enumerate(data):
        text = record[text_field]
        if not isinstance(text, str):
            raise FlashbackError(f"{source}: row {row}: {text_field!r} is not text")
        title = "" if not title_field or record[title_field] is None else str(record[title_field])
        yield Document(id=f"{name}:{split or 'data'}:{row}", title=title, text=text)


_DATA_FILES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _path_like(source: str) -> bool:
    """Whether `source` names a local file or folder rather than a hub dataset ("owner/name", "name")."""
    path = Path(source).expanduser()
    return (
        source.startswith(("/", "./", "../", "~", "."))
        or path.suffix.lower() in (*_DATA_FILES, ".gz", ".arrow")
        or source.count("/") > 1
        or "\\" in source
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    )


def _load_dataset(datasets, source: str):
    path = Path(source).expanduser()
    try:
        if path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json")):
            return datasets.load_from_disk(str(path))
        if path.is_file():
            builder = _DATA_FILES.get(path.suffix.lower())
            if builder is None:
                raise FlashbackError(f"{path}: use a parquet, JSON(L) or CSV file, or a save_to_disk folder")
            return datasets.load_dataset(builder, data_files=str(path))
        if path.exists():
            raise FlashbackError(f"{source} is not a dataset folder (save_to_disk writes dataset_info.json)")
        if _path_like(source):  # a mistyped path is a local error, not a hub lookup
            raise FlashbackError(f"{source}: no such dataset file or folder")
        if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE):
            raise FlashbackError(f"{source} is not a local file or folder, and hub lookups are off ({_OFFLINE[0]})")
        return datasets.load_dataset(source)
    except FlashbackError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        raise FlashbackError(f"cannot read the dataset {source}: {first_line(exc)}") from None


def read_documents(paths: Iterable[str | Path]) -> Iterator[Document]:
    """Yield every document of the given files and folders; a text file is one document.

    A text file's id is its path as given, or, given by an absolute path, its path from the given folder's (or
    file's) parent: no machine's layout leaks into an index, its passages or a server's answers."""
    for raw in paths:
        given = Path(raw)
        for path in expand_paths([given]):
            if _is_jsonl(path):
                yield from _read_jsonl(path)
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise FlashbackError(f"{path}: cannot read ({exc})") from None
            doc_id = str(path.relative_to(given.parent)) if given.is_absolute() else str(path)
            yield Document(id=doc_id, title=path.stem, text=text)


def split_passages(
    documents: Iterable[Document],
    tokenizer,
    chunk_tokens: int = PASSAGE_TOKENS,
    batch_size: int = 256,
    progress: bool = True,
) -> list[Passage]:
    """Tokenize documents in batches and cut each into consecutive `chunk_tokens`-token passages."""
    if chunk_tokens < 1:
        raise FlashbackError("--chunk-tokens must be at least 1")
    passages: list[Passage] = []
    batch: list[Document] = []
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)

    def flush() -> None:
        encoded = encode_batch(tokenizer, [d.text for d in batch])
        for doc, ids in zip(batch, encoded, strict=True):
            ids = np.asarray(ids, dtype=np.int32)
            for n, start in enumerate(range(0, len(ids), chunk_tokens)):
                chunk = ids[start : start + chunk_tokens]
                text = tokenizer.decode(chunk.tolist())
                passages.append(Passage(f"{doc.id}#{n}", doc.id, doc.title, text, chunk))
        bar.update(len(batch))
        batch.clear()

    for doc in documents:
        if doc.text.strip():
            batch.append(doc)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return passages
