"""The one-object Python API, and the default index built on first use.

    from flashback import FlashBack
    fb = FlashBack.load()                       # default model, its shipped adapters, the default index
    print(fb.generate("A garbage collector", max_new_tokens=32).text)

`FlashBack` holds an engine, a retriever and the settings the CLI would use; its methods take
text and return the library's own result types. Everything it does is available below it
(engines.load_engine, text.retrieval.Index, generate.generate, evaluate.evaluate) for finer control.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flashback.config import PASSAGE_TOKENS
from flashback.engines.base import Engine
from flashback.errors import FlashbackError
from flashback.registry import DEFAULT_MODEL, default_index_dir
from flashback.text.tokenize import encode

DEFAULT_INDEX = default_index_dir()
DEFAULT_CORPUS = "python-docs"  # built in: the documentation of the running Python (corpus.python_docs)


def build_index(
    corpus: Sequence[str | Path] = (),
    out: str | Path = DEFAULT_INDEX,
    *,
    builtin: str | None = None,
    model: str | None = None,
    chunk_tokens: int = PASSAGE_TOKENS,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: bool = True,
):
    """Split documents (files, folders, JSONL, or a built-in corpus) into passages and save a BM25 index."""
    from flashback.atomic import check_output
    from flashback.config import IndexConfig
    from flashback.text.corpus import builtin_documents, expand_paths, read_documents, select, split_passages
    from flashback.text.retrieval import INDEX_FOLDER, Index
    from flashback.text.tokenize import load_tokenizer, tokenizer_fingerprint

    if not corpus and not builtin:
        raise FlashbackError("nothing to index: give corpus files or a built-in corpus (--builtin python-docs)")
    IndexConfig(builtin=builtin, chunk_tokens=chunk_tokens).validate()
    check_output(out, INDEX_FOLDER)  # before the slow part
    expand_paths(corpus)  # fail on a bad path before the slow part
    tokenizer = load_tokenizer(model)
    documents = read_documents(corpus) if corpus else iter(())
    if builtin:  # rendered first, so that its progress bar finishes before tokenizing starts
        documents = _chain(list(builtin_documents(builtin, progress)), documents)
    passages = split_passages(select(documents, include, exclude), tokenizer, chunk_tokens, progress=progress)
    # names only, no folders: an index may be copied to other machines, and where its files lay is nobody's business
    sources = [*(f"builtin:{builtin}" for _ in [builtin] if builtin), *(Path(c).resolve().name for c in corpus)]
    index = Index.build(
        passages,
        tokenizer_name=Path(model).name if model and Path(model).exists() else model or DEFAULT_MODEL,
        fingerprint=tokenizer_fingerprint(tokenizer),
        chunk_tokens=chunk_tokens,
        sources=[*sources, *(f"include:{g}" for g in include), *(f"exclude:{g}" for g in exclude)],
    )
    index.save(out)
    return index


def _chain(*parts: Iterable) -> Iterator:
    for part in parts:
        yield from part


def load_index(path: str | Path | None = None, progress: bool = True):
    """The index at `path`; without a path the default one, built from the built-in corpus on first use."""
    from flashback.text.retrieval import Index

    if path is not None:
        return Index.load(path)
    if not (DEFAULT_INDEX / "manifest.json").exists():
        print(
            f"flashback: building the default index from the built-in {DEFAULT_CORPUS} corpus into {DEFAULT_INDEX} "
            "(once, about a minute)",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        build_index(out=DEFAULT_INDEX, builtin=DEFAULT_CORPUS, progress=progress)
        print(f"flashback: default index ready in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return Index.load(DEFAULT_INDEX)


@dataclass(frozen=True)
class Passage:
    """A passage from your own retriever: text, with an id, title and score when you have them."""

    text: str
    id: str = ""
    title: str = ""
    score: float = 0.0


class TextRetriever:
    """Wraps any search function that returns text, so FlashBack can use it like its BM25 index.

    `search(query, k)` returns up to k items, best first: strings, `Passage`s, or dicts with a "text"
    key (and optional "id", "title", "score"). Each passage is tokenized as plain text (never special
    tokens) and cut to `max_passage_tokens`, the budget the layout reserves for it.
    """

    def __init__(self, search: Callable[[str, int], Iterable], tokenizer, max_passage_tokens: int = PASSAGE_TOKENS):
        if max_passage_tokens < 1:
            raise FlashbackError("max_passage_tokens must be at least 1")
        self.search, self.tokenizer, self.max_passage_tokens = search, tokenizer, max_passage_tokens

    def __call__(self, query: str, k: int) -> list:
        import numpy as np

        from flashback.text.retrieval import Hit, Retrieved

        found = []
        for rank, item in enumerate(list(self.search(query, k))[:k]):
            p = _as_passage(item)
            ids = encode(self.tokenizer, p.text)[: self.max_passage_tokens]
            if ids:
                hit = Hit(-1, p.id or f"passage#{rank}", p.id or "", p.title, float(p.score))
                found.append(Retrieved(hit, np.asarray(ids, dtype=np.int64)))
        return found


def _as_passage(item) -> Passage:
    if isinstance(item, Passage):
        return item
    if isinstance(item, str):
        return Passage(item)
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return Passage(item["text"], str(item.get("id", "")), str(item.get("title", "")), float(item.get("score", 0)))
    raise FlashbackError(f"a retriever returned {type(item).__name__}; expected text, a Passage or a dict with 'text'")


class FlashBack:
    """An engine, a retriever and generation defaults: text in, text out."""

    def __init__(self, engine: Engine, retriever, index=None, tail: int | None = None):
        from flashback.cards import for_endpoint
        from flashback.layout import layout_settings

        self.engine, self.retriever, self.index = engine, retriever, index
        self.tail = layout_settings(for_endpoint(engine.tuned, False), "append", None, tail)[1]
        self.chat_tail = layout_settings(for_endpoint(engine.tuned, True), "append", None, tail)[1]

    @classmethod
    def load(
        cls,
        model: str | None = None,
        index: str | Path | None = None,
        adapter: str | Sequence[str] | None = "auto",
        retriever: Callable[[str, int], Iterable] | None = None,
        *,
        engine: str = "torch",
        upstream: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        tail: int | None = None,
        max_passage_tokens: int = PASSAGE_TOKENS,
        compile: str | bool = "auto",
        quantize: str | None = None,
        flash_attn: bool = False,
    ) -> FlashBack:
        """Load everything the CLI would: `adapter="auto"` takes the adapters shipped for the model (each for the mode
        and endpoint its card names, never applied to another mode), None none, a folder (or several) exactly those.
        `engine="llamacpp"` runs an export's GGUF (model=EXPORT) in llama.cpp; `upstream=URL` decodes on an
        inference server that serves the export (model=EXPORT). `retriever` replaces the BM25 index with your
        own search function (see TextRetriever). `compile` ("auto", "on", "off") / `quantize="int8"` choose the
        decode step, as the CLI's --compile / --quantize."""
        from flashback.config import EngineConfig
        from flashback.engines.load import setup
        from flashback.text.retrieval import IndexRetriever
        from flashback.text.tokenize import tokenizer_fingerprint

        given = [] if adapter in (None, "auto") else [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
        cfg = EngineConfig(
            model=model or DEFAULT_MODEL,
            device=device,
            dtype=dtype,
            compile=compile,
            quantize=quantize,
            engine=engine,
            flash_attn=flash_attn,
            upstream=upstream,
            adapters=tuple(str(a) for a in given),
            shipped_adapters=adapter == "auto",
        )
        loaded = setup(cfg, tail=tail, chat=None).load(markers=True)  # every mode's layout may be asked for later
        if retriever is not None:
            return cls(loaded, TextRetriever(retriever, loaded.tokenizer, max_passage_tokens), None, tail)
        idx = load_index(index)
        idx.check_tokenizer(tokenizer_fingerprint(loaded.tokenizer))
        return cls(loaded, IndexRetriever(idx), idx, tail)

    def config(self, mode: str = "append", chat: bool = False, **settings):
        """The GenerationConfig of a request: `settings` over the layout the weights for `mode` (a chat's, with
        `chat`) were tuned with."""
        from flashback.cards import for_endpoint
        from flashback.config import GenerationConfig
        from flashback.layout import layout_settings

        tuned = for_endpoint(self.engine.tuned, chat)
        untuned = not tuned  # a bare model: markers on in append mode, as the paper lays it out
        markers, _ = layout_settings(tuned, mode, settings.pop("markers", None), None, untuned)
        tail = self.chat_tail if chat else self.tail
        return GenerationConfig(mode=mode, markers=markers, **{"tail": tail, **settings})

    def generate(self, text: str, mode: str = "append", stream: bool = False, **settings):
        """A GenerationResult; with stream=True an iterator of text pieces instead.

        settings: any GenerationConfig field (stride, k, max_new_tokens, temperature, top_p, seed, tail, ...).
        """
        from flashback.generate import TextStreamer, generate
        from flashback.generate import stream as stream_tokens

        cfg = self.config(mode, **settings)
        ids = encode(self.engine.tokenizer, text)
        retriever = self.retriever if mode != "none" else None
        if not stream:
            return generate(self.engine, ids, retriever, cfg)
        tokens = stream_tokens(self.engine, ids, retriever, cfg)  # checks the request before the first piece

        def pieces() -> Iterator[str]:
            streamer = TextStreamer(self.engine.tokenizer)
            for token in tokens:
                if piece := streamer.push(token):
                    yield piece
            if rest := streamer.flush():
                yield rest

        return pieces()

    def chat(self, messages: Sequence[dict] | str, mode: str = "append", **settings):
        """The assistant's answer to a conversation (a list of role/content messages, or one user message) as a
        GenerationResult: the chat template applied, the question as the first query, the chat adapter where one is
        shipped or given. settings: as `generate`'s (chat_query: what later retrievals' queries hold)."""
        from flashback.generate import generate
        from flashback.text.chat_template import render

        messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        cfg = self.config(mode, chat=True, **settings)
        ids, question = render(self.engine.tokenizer, messages, cfg.query_tokens)
        return generate(self.engine, ids, self.retriever if mode != "none" else None, cfg, question=question)

    def search(self, text: str, k: int = 3) -> list[dict]:
        """The top-k passages for a query: id, title, score and text."""
        decode = self.engine.tokenizer.decode
        return [{**r.hit.to_json(), "text": decode(r.token_ids.tolist())} for r in self.retriever(text, k)]

    def eval(self, documents, modes: Sequence[str] = ("none", "prepend", "append+markers+adapter"), **settings):
        """Perplexity of each mode on the same tokens (evaluate.evaluate); `documents` are texts or Documents."""
        from flashback.config import EvalConfig
        from flashback.evaluate import ModeSpec, evaluate
        from flashback.text.corpus import Document

        docs = [d if isinstance(d, Document) else Document(f"text#{i}", "", d) for i, d in enumerate(documents)]
        specs = [ModeSpec.parse(m) for m in modes]
        cfg = EvalConfig(**{"tail": self.tail, **settings})
        return evaluate(self.engine, docs, self.index if self.index is not None else self.retriever, specs, cfg)
