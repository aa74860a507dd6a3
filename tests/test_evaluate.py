from __future__ import annotations

import json

import pytest
import torch

from flashback.cli import main
from flashback.config import EvalConfig
from flashback.engines.base import SessionSpec
from flashback.errors import FlashbackError
from flashback.evaluate import (
    ModeSpec,
    evaluate,
    plan_targets,
    retrieve_all,
    score_fast,
    score_slow,
    segment_size,
)
from flashback.text.corpus import read_documents
from flashback.text.retrieval import Index

CFG = EvalConfig(stride=8, query_tokens=8, k=1, max_length=96, tail=0)


@pytest.fixture(scope="module")
def setup(tiny_lm, tiny_index_dir, corpus_file):
    index = Index.load(tiny_index_dir)
    documents = list(read_documents([corpus_file]))[:6]
    docs = [tiny_lm.tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in documents]
    return index, documents, docs


def scored(lm, spec, setup, cfg):
    index, documents, docs = setup
    targets = plan_targets(docs, cfg, segment_size(cfg, index.chunk_tokens))
    retrievals = retrieve_all(targets, docs, documents, index, lm.tokenizer, cfg, frozenset())
    banned = torch.tensor(lm.marker_ids)
    session = lm.session(SessionSpec(spec.mode if spec.adapter else None, scoring=True))
    return (
        torch.cat(score_fast(session, lm.marker_ids, spec, docs, targets, retrievals, cfg, banned)),
        torch.cat(score_slow(session, lm.marker_ids, spec, docs, targets, retrievals, cfg, banned)),
    )


@pytest.mark.parametrize(
    ("mode", "tail"), [("none", 0), ("append", 0), ("append+markers", 0), ("append+markers", 6), ("append", 40)]
)
def test_fast_path_equals_scoring_each_example_from_scratch(tiny_lm, setup, mode, tail):
    """Tail 40 is longer than some contexts (31 tokens and up): those passages go first."""
    cfg = EvalConfig(**{**CFG.__dict__, "tail": tail})
    fast, slow = scored(tiny_lm, ModeSpec.parse(mode), setup, cfg)
    assert fast.numel() > 100
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
    if tail:  # the tail changes what append scores
        plain, _ = scored(tiny_lm, ModeSpec.parse(mode), setup, CFG)
        assert (plain - fast).abs().max() > 1e-2


def test_fast_path_with_thinned_targets_and_ensemble(tiny_lm, setup):
    cfg = EvalConfig(stride=8, query_tokens=8, k=2, max_length=120, limit_tokens=200, ensemble=True, tail=5)
    fast, slow = scored(tiny_lm, ModeSpec.parse("append+markers"), setup, cfg)
    assert 0 < fast.numel() <= 200
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)


def test_ensemble_of_one_passage_equals_concatenation(tiny_lm, setup):
    spec = ModeSpec.parse("append+markers")
    single, _ = scored(tiny_lm, spec, setup, CFG)
    mixed, _ = scored(tiny_lm, spec, setup, EvalConfig(**{**CFG.__dict__, "ensemble": True}))
    torch.testing.assert_close(single, mixed, atol=1e-5, rtol=0)


def test_contexts_fit_and_segments_give_enough_context(setup):
    index, _, docs = setup
    half = segment_size(CFG, index.chunk_tokens)
    targets = plan_targets(docs, CFG, half)
    for t in targets:
        context = t.position - t.segment_start
        assert context + index.chunk_tokens + 2 + CFG.stride <= CFG.max_length
        assert context == t.position if t.position < 2 * half else half <= context < 2 * half


def test_min_context_keeps_only_long_contexts(setup):
    index, _, docs = setup
    half = segment_size(CFG, index.chunk_tokens)
    every = plan_targets(docs, CFG, half)
    least = half + CFG.stride
    cfg = EvalConfig(**{**CFG.__dict__, "min_context": least})
    long = plan_targets(docs, cfg, half)
    assert long and len(long) < len(every)
    assert all(t.position - t.segment_start >= least for t in long)
    assert {(t.doc_index, t.position) for t in long} <= {(t.doc_index, t.position) for t in every}
    few = plan_targets(docs, EvalConfig(**{**cfg.__dict__, "limit_tokens": CFG.stride}), half)
    assert len(few) == 1 and few[0] in long  # a limit below one segment's targets: spread over it
    with pytest.raises(FlashbackError, match="--min-context"):
        plan_targets(docs, EvalConfig(**{**CFG.__dict__, "min_context": 2 * half}), half)


def test_all_modes_score_the_same_tokens(tiny_lm, setup):
    index, documents, _ = setup
    specs = [ModeSpec.parse(m) for m in ("none", "prepend", "append", "append+markers")]
    results = evaluate(tiny_lm, documents, index, specs, CFG)
    assert len({r.tokens for r in results}) == 1 and results[0].tokens > 0
    assert [r.path for r in results] == ["fast", "from scratch", "fast", "fast"]
    assert all(r.perplexity > 1 and len(r.perplexity_by_offset) == CFG.stride for r in results)


def test_mode_spec_parsing():
    assert str(ModeSpec.parse("append+markers+adapter")) == "append+markers+adapter"
    for bad in ("sideways", "prepend+markers", "append+turbo"):
        with pytest.raises(FlashbackError):
            ModeSpec.parse(bad)


def test_eval_cli_and_bad_input(capsys, tiny_model_dir, tiny_index_dir, corpus_file, tmp_path):
    out = tmp_path / "eval.json"
    args = [
        "eval",
        str(corpus_file),
        "--index",
        str(tiny_index_dir),
        "--model",
        str(tiny_model_dir),
        "--stride",
        "8",
        "--query-tokens",
        "8",
        "--max-length",
        "96",
        "--limit-tokens",
        "160",
    ]
    assert main([*args, "--modes", "none,append+markers", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| append+markers | no | yes |" in table
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["none", "append+markers"]

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main([*args[:1], str(empty), *args[2:]]) == 2
    assert "no text to evaluate" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    assert main([*args[:1], str(short), *args[2:]]) == 2
    assert "nothing to score" in capsys.readouterr().err
    assert main(["eval", str(corpus_file), "--index", str(tmp_path / "none"), "--model", str(tiny_model_dir)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*args, "--modes", "append+adapter"]) == 2
    assert "needs --adapter" in capsys.readouterr().err


def test_eval_reads_a_datasets_dataset_as_it_reads_the_same_text_files(
    capsys, tiny_model_dir, tiny_index_dir, tmp_path
):
    """`--dataset` (a save_to_disk folder, or a parquet file) with `--text-field`: the same documents, so the
    same perplexities, as the same texts in a JSONL file; a missing column or split is a one-line error."""
    datasets = pytest.importorskip("datasets")
    from tests.conftest import corpus_records

    records = corpus_records(1)
    rows = {
        "body": [r["text"] for r in records],
        "name": [r["title"] for r in records],
        "id": [r["id"] for r in records],
    }
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(saved))
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "rows.parquet"))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"id": r["id"], "title": r["title"], "text": r["text"]}) + "\n" for r in records)
    )
    base = ["eval", "--index", str(tiny_index_dir), "--model", str(tiny_model_dir), "--modes", "none,append+markers"]
    base += ["--stride", "8", "--query-tokens", "8", "--max-length", "96"]

    def perplexities(*source) -> list[float]:
        out = tmp_path / "eval.json"
        assert main([*base, *source, "--json", str(out)]) == 0, capsys.readouterr().err
        return [r["perplexity"] for r in json.loads(out.read_text())["results"]]

    want = perplexities(str(jsonl))
    assert perplexities("--dataset", str(saved), "--text-field", "body", "--title-field", "name") == want
    assert (
        perplexities("--dataset", str(tmp_path / "rows.parquet"), "--text-field", "body", "--title-field", "name")
        == want
    )
    for extra, message in ((["--text-field", "text"], "no column 'text'"), (["--split", "train"], "no split 'train'")):
        assert main([*base, "--dataset", str(saved), "--text-field", "body", *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(base) == 2 and "give TEXT files or --dataset" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["data/my_corpus.parquet", "corpus.jsonl", "a/b/c", "./nowhere"])
def test_a_mistyped_dataset_path_is_a_local_error_not_a_hub_lookup(monkeypatch, tmp_path, source):
    datasets = pytest.importorskip("datasets")
    from flashback.text.corpus import dataset_documents

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: pytest.fail(f"looked up {a} on the hub"))
    with pytest.raises(FlashbackError, match="no such dataset file or folder"):
        list(dataset_documents(source, "text"))


def test_a_hub_name_with_the_hub_off_fails_at_once(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from flashback.text.corpus import dataset_documents

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: pytest.fail(f"looked up {a} on the hub"))
    with pytest.raises(FlashbackError, match="hub lookups are off"):
        list(dataset_documents("someone/some-corpus", "text"))
