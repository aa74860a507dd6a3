"""The one-object API, the built-in corpus, the default index on first use, and your own retriever."""

from __future__ import annotations

import itertools
import json

import bm25s
import pytest
import torch

from flashback import FlashBack, Passage, TextRetriever
from flashback.cli import main
from flashback.config import GenerationConfig
from flashback.errors import FlashbackError
from flashback.generate import generate
from flashback.text.retrieval import Index, IndexRetriever
from tests.conftest import TOPICS


def test_python_docs_is_built_into_every_python():
    from flashback.text.corpus import python_docs

    docs = list(itertools.islice(python_docs(progress=False), 100))
    ids = {d.id for d in docs}
    assert "pydoc:topic/assert" in ids and any(i.startswith("pydoc:module/") for i in ids)
    assert all(d.text.strip() and d.title for d in docs)


@pytest.fixture
def small_builtin(monkeypatch):
    """The built-in corpus cut to 30 reference topics, so the tests stay fast."""
    import flashback.text.corpus as corpus

    def topics_only(progress=True):
        return itertools.islice(corpus.python_docs(progress), 30)

    monkeypatch.setitem(corpus.BUILTIN_CORPORA, "python-docs", topics_only)


def test_index_builtin_from_the_cli(capsys, small_builtin, tiny_model_dir, tmp_path):
    out = tmp_path / "idx"
    code = main(["index", "--builtin", "python-docs", "--out", str(out), "--model", str(tiny_model_dir), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 30 and Index.load(out).manifest["sources"][0] == "builtin:python-docs"
    assert main(["index", "--out", str(tmp_path / "none"), "--model", str(tiny_model_dir)]) == 2
    assert "nothing to index" in capsys.readouterr().err


def test_the_default_index_is_built_on_first_use(capsys, small_builtin, tiny_model_dir, tmp_path, monkeypatch):
    import flashback.api as api

    monkeypatch.setattr(api, "DEFAULT_INDEX", tmp_path / "cache" / "indexes" / "default")
    monkeypatch.setattr(api, "DEFAULT_MODEL", str(tiny_model_dir))
    monkeypatch.setattr("flashback.registry.default_model_dir", lambda: tiny_model_dir)
    first = api.load_index(progress=False)
    err = capsys.readouterr().err
    assert "building the default index from the built-in python-docs corpus" in err and "ready in" in err
    assert len(first) > 30 and (api.DEFAULT_INDEX / "manifest.json").exists()
    again = api.load_index(progress=False)
    assert "building" not in capsys.readouterr().err and len(again) == len(first)


@pytest.fixture(scope="module")
def own_search():
    """A second, independent retriever: a bm25s index over the test topics, wrapped as a plain function."""
    titles = list(TOPICS)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([TOPICS[t] for t in titles], show_progress=False), show_progress=False)

    def search(query: str, k: int):
        docs, scores = retriever.retrieve(bm25s.tokenize([query], show_progress=False), k=k, show_progress=False)
        return [
            {"text": TOPICS[titles[i]], "id": titles[i], "title": titles[i], "score": float(s)}
            for i, s in zip(docs[0].tolist(), scores[0].tolist(), strict=True)
            if s > 0
        ]

    return search


def test_text_retriever_tokenizes_and_truncates_to_the_passage_budget(tiny_lm, own_search):
    retriever = TextRetriever(own_search, tiny_lm.tokenizer, max_passage_tokens=10)
    found = retriever("garbage collectors free memory", 2)
    assert 1 <= len(found) <= 2 and found[0].hit.title == "garbage"
    assert all(len(r.token_ids) == 10 for r in found)
    plain = TextRetriever(lambda q, k: ["a <MARK_L> passage", Passage("second", id="p2")], tiny_lm.tokenizer, 64)
    first, second = plain("q", 2)
    assert not set(first.token_ids.tolist()) & set(tiny_lm.marker_ids) and second.hit.id == "p2"
    with pytest.raises(FlashbackError, match="expected text"):
        TextRetriever(lambda q, k: [42], tiny_lm.tokenizer)("q", 1)


def test_own_retriever_in_generate_matches_the_layout(tiny_lm, own_search):
    fb = FlashBack(tiny_lm, TextRetriever(own_search, tiny_lm.tokenizer, 24), tail=3)
    result = fb.generate("Garbage collection frees memory and", max_new_tokens=20, stride=8)
    assert len(result.token_ids) == 20 and result.trace.retrievals[0]["passages"][0]["title"] == "garbage"
    assert result.config.tail == 3 and result.config.markers
    pieces = list(fb.generate("Garbage collection frees memory and", max_new_tokens=20, stride=8, stream=True))
    assert "".join(pieces) == result.text
    assert fb.search("sockets bind to a port", 1)[0]["title"] == "socket"


def test_own_retriever_in_eval_applies_the_leakage_filter(tiny_lm, own_search):
    from flashback.text.corpus import Document

    fb = FlashBack(tiny_lm, TextRetriever(own_search, tiny_lm.tokenizer, 24), tail=2)
    docs = [Document(title, title, text + " " + text) for title, text in TOPICS.items()]
    results = fb.eval(docs, modes=("none", "append+markers"), stride=8, query_tokens=8, max_length=96)
    assert len({r.tokens for r in results}) == 1 and results[0].tokens > 0
    # The filter: a document never gets its own topic back, so the retriever's best hit is dropped.
    from flashback.config import EvalConfig
    from flashback.evaluate import plan_targets, retrieve_all, segment_size

    cfg = EvalConfig(stride=8, query_tokens=8, max_length=96)
    ids = [tiny_lm.tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs]
    targets = plan_targets(ids, cfg, segment_size(cfg, 24))
    got = retrieve_all(targets, ids, docs, fb.retriever, tiny_lm.tokenizer, cfg, frozenset())
    for t, r in zip(targets, got, strict=True):
        own = tiny_lm.tokenizer(TOPICS[docs[t.doc_index].title], add_special_tokens=False)["input_ids"][:24]
        assert all(p != own for p in r.passages)


def test_own_retriever_in_the_server(tiny_lm, own_search):
    from fastapi.testclient import TestClient

    from flashback.server import create_app

    retriever = TextRetriever(own_search, tiny_lm.tokenizer, 24)
    with TestClient(create_app(tiny_lm, retriever, markers=True, tail=2)) as client:
        body = {"prompt": "A socket binds to a port and", "max_tokens": 10, "stride": 5}
        data = client.post("/v1/completions", json=body).json()
    assert data["retrievals"][0]["passages"][0]["title"] == "socket"
    ids = tiny_lm.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
    want = generate(tiny_lm, ids, retriever, GenerationConfig(max_new_tokens=10, stride=5, tail=2))
    assert data["choices"][0]["text"] == want.text


def test_flashback_load_with_a_model_folder_and_index(tiny_model_dir, tiny_index_dir):
    fb = FlashBack.load(str(tiny_model_dir), index=tiny_index_dir, adapter=None)
    assert fb.engine.adapters == {} and isinstance(fb.retriever, IndexRetriever)
    out = fb.generate("A kludge is", max_new_tokens=8, mode="prepend")
    assert len(out.token_ids) == 8 and out.config.mode == "prepend"
    with torch.no_grad():
        assert fb.search("kludge workaround", 1)[0]["title"] == "kludge"
