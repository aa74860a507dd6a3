"""`flashback export`: the adapter and markers merged into a plain model folder that engines load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flashback.cli import main
from flashback.config import GenerationConfig
from flashback.engines.torch import load_model
from flashback.errors import FlashbackError
from flashback.export import export
from flashback.generate import generate
from flashback.text.retrieval import Hit, Index, IndexRetriever, Retrieved
from flashback.text.tokenize import MARKERS, encode
from tests.conftest import llama_cpp_or_skip, needs_default_model

from .test_cache import full_logits


@pytest.fixture(scope="module")
def exported(tiny_model_dir, adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    card = export(adapter_dir, out, model=str(tiny_model_dir))
    return out, card


def test_an_exports_files_have_the_modes_of_a_plain_write(exported):
    """An engine or server running as another user reads every file of the export (the weights were 0600)."""
    out, _ = exported
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_exported_folder_gives_the_logits_of_base_plus_adapter(tiny_model_dir, adapter_dir, exported):
    out, card = exported
    lm = load_model(str(tiny_model_dir), adapters={"append": str(adapter_dir)})
    lm.activate("append")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no FlashBack, no PEFT
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tuple(tokenizer.convert_tokens_to_ids(list(MARKERS))) == lm.marker_ids == tuple(card["marker_ids"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(lm.tokenizer) - 2, (30,), generator=g).tolist()
    ids[10:10] = [lm.marker_ids[0], *ids[:5], lm.marker_ids[1]]  # the markers' rows are trained rows too
    torch.testing.assert_close(full_logits(plain, ids), full_logits(lm.model, ids), atol=1e-4, rtol=0)
    assert card["mode"] == "append" and card["tail"] == 3 and card["format"] == "flashback-export/1"
    assert card["adapter"] == Path(adapter_dir).name  # its name, not where it lay on the machine that exported it
    assert str(Path(adapter_dir).parent) not in (out / "flashback.json").read_text()


def test_flashback_runs_the_export_as_a_plain_model(tiny_model_dir, adapter_dir, tiny_index_dir, exported):
    retriever = IndexRetriever(Index.load(tiny_index_dir))
    tuned = load_model(str(tiny_model_dir), adapters={"append": str(adapter_dir)})
    merged = load_model(str(exported[0]), markers=True)
    assert merged.marker_ids == tuned.marker_ids and not merged.adapters
    prompt = tuned.tokenizer("A lambda expression creates a function and a socket binds to a port")["input_ids"]
    cfg = GenerationConfig(mode="append", stride=6, max_new_tokens=18, tail=3, stop_at_eos=False)
    assert generate(merged, prompt, retriever, cfg).token_ids == generate(tuned, prompt, retriever, cfg).token_ids


def test_export_cli_replaces_only_an_earlier_export(capsys, tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "m"
    args = ["export", "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out)]
    assert main(args) == 0 and main(args) == 0  # a second export replaces the first
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(out) and (out / "model.safetensors").exists()
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FlashbackError, match="refusing"):
        export(adapter_dir, foreign, model=str(tiny_model_dir))
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def gguf_export(shipped_gguf):
    """The shipped adapter's f16 GGUF export, for the in-process llama.cpp engine."""
    llama_cpp_or_skip()
    return shipped_gguf


README_PROMPT = "A garbage collector reclaims memory that a program no longer uses. In Python, the"


@needs_default_model
def test_gguf_export_gives_the_same_greedy_tokens_in_llama_cpp(gguf_export):
    """llama.cpp runs the GGUF on a FlashBack layout (marked passage, 8-token tail) with transformers' tokens."""
    import llama_cpp

    out, card = gguf_export
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    context = encode(tokenizer, README_PROMPT)
    passage = encode(tokenizer, "Reference counting frees an object once its count drops to zero.")
    ml, mr = card["marker_ids"]
    ids = context[:-8] + [ml, *passage, mr] + context[-8:]
    want, seq = [], list(ids)
    with torch.inference_mode():
        for _ in range(16):
            want.append(int(merged(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(want[-1])
    llm = llama_cpp.Llama(model_path=str(out / card["gguf"]), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    assert llm.tokenize(b"<MARK_L><MARK_R>", add_bos=False, special=True) == [ml, mr]
    llm.eval(ids)
    got = []
    for _ in range(16):
        got.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(got[-1:])
    assert got == want


@needs_default_model
def test_q4_1_export_is_quantized_by_llama_cpp_and_stays_close_to_f16(gguf_export, tmp_path):
    """--gguf q4_1: the converter's f16 then llama.cpp's quantizer; a third of the bytes, logits still close."""
    import llama_cpp

    f16_out, f16_card = gguf_export
    out = tmp_path / "q4"
    from flashback.registry import SHIPPED_ADAPTER

    card = export(SHIPPED_ADAPTER, out, gguf="q4_1")
    assert card["gguf"] == "model-q4_1.gguf" and sorted(p.name for p in out.glob("*.gguf")) == [card["gguf"]]
    f16_file, q4_file = f16_out / f16_card["gguf"], out / card["gguf"]
    assert q4_file.stat().st_size < 0.4 * f16_file.stat().st_size
    tokenizer = AutoTokenizer.from_pretrained(out)
    context = encode(tokenizer, README_PROMPT)
    ids = context[:-8] + [card["marker_ids"][0], *encode(tokenizer, "Memory is freed."), card["marker_ids"][1]]
    ids += context[-8:]
    scores = {}
    for path in (f16_file, q4_file):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
        llm.eval(ids)
        scores[path] = np.array(llm.scores[: len(ids)])
    assert llm.metadata["general.file_type"] == str(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1)
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(scores[f16_file], scores[q4_file], strict=True)]
    print("q4_1 vs f16 logit correlation per position:", np.round(corr, 3).tolist())
    assert np.median(corr) > 0.93 and min(corr) > 0.8  # 4-bit weights move every logit a little, not a lot


@needs_default_model
def test_llama_cpp_engine_rollback_then_extend_equals_a_fresh_evaluation(gguf_export):
    from flashback.engines.llamacpp import load_llamacpp

    engine = load_llamacpp(gguf_export[0], n_ctx=512)
    context = encode(engine.tokenizer, README_PROMPT)
    passage = [
        engine.marker_ids[0],
        *encode(engine.tokenizer, "Memory is freed by reference counting."),
        engine.marker_ids[1],
    ]
    new = encode(engine.tokenizer, " memory of objects")
    cache = engine.session()
    cache.extend(context)
    cache.extend(passage)
    cache.rollback(len(context))
    assert len(cache) == len(context)
    got = cache.extend(new)
    fresh = engine.session()
    want = fresh.extend(context + new)
    assert int(got.argmax()) == int(want.argmax())
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)  # f16 weights; llama.cpp batches differ
    assert [f.kind for f in cache.forwards] == ["prefill", "extend", "extend"]


@needs_default_model
def test_llama_cpp_engine_generates_the_torch_engines_tokens(gguf_export):
    """Same loop, same layouts: append, prepend and none on llama.cpp agree with PyTorch on the export."""
    from flashback.engines.llamacpp import load_llamacpp

    engine = load_llamacpp(gguf_export[0], n_ctx=1024)
    torch_lm = load_model(str(gguf_export[0]), markers=True)
    passage = np.array(encode(torch_lm.tokenizer, "Reference counting frees an object once its count drops to zero."))

    def retriever(query: str, k: int) -> list[Retrieved]:
        return [Retrieved(Hit(0, "p", "d", "t", 1.0), passage)]

    retriever.max_passage_tokens = 128
    prompt = encode(torch_lm.tokenizer, README_PROMPT)
    for mode in ("append", "prepend", "none"):
        cfg = GenerationConfig(mode=mode, max_new_tokens=24, tail=32, stop_at_eos=False)
        got = generate(engine, prompt, retriever, cfg)
        want = generate(torch_lm, prompt, retriever, cfg)
        assert got.token_ids[:16] == want.token_ids[:16], mode
        assert [r["computed_tokens"] for r in got.trace.retrievals] == [
            r["computed_tokens"] for r in want.trace.retrievals
        ]


def test_llama_cpp_engine_needs_an_export_with_a_gguf(capsys, tiny_model_dir, exported):
    from tests.test_cli import assert_clean_error, run_cli

    for model in (tiny_model_dir, exported[0]):  # a plain model folder; an export without --gguf
        code, _, err = run_cli(
            capsys, "generate", "--engine", "llamacpp", "--model", model, "--mode", "none", "--prompt", "hi"
        )
        assert_clean_error(code, err, "is not an export with a GGUF file")
    code, _, err = run_cli(
        capsys, "generate", "--model", exported[0], "--adapter", "x", "--mode", "none", "--prompt", "hi"
    )
    assert_clean_error(code, err, "drop --adapter")


@needs_default_model
def test_python_api_runs_the_llama_cpp_engine_as_the_cli_does(gguf_export, shipped_index, capsys):
    """FlashBack.load(engine="llamacpp", model=EXPORT): the CLI's greedy tokens, in the layout the export's card
    names (markers on, its tail)."""
    from flashback import FlashBack

    folder, card = gguf_export
    fb = FlashBack.load(str(folder), index=shipped_index, engine="llamacpp")
    got = fb.generate(README_PROMPT, max_new_tokens=24)
    args = ["generate", "--engine", "llamacpp", "--model", folder, "--index", shipped_index, "--max-new-tokens", 24]
    assert main([*map(str, args), "--json", "--prompt", README_PROMPT]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert got.token_ids and got.token_ids == cli["token_ids"]
    assert got.config.tail == cli["config"]["tail"] == card["tail"] and got.config.markers and cli["config"]["markers"]
    assert [r["computed_tokens"] for r in got.trace.retrievals] == [r["computed_tokens"] for r in cli["retrievals"]]


@needs_default_model
def test_bench_runs_on_the_llama_cpp_engine(gguf_export):
    from flashback.bench import run_bench
    from flashback.config import BenchConfig
    from flashback.engines.llamacpp import load_llamacpp

    engine = load_llamacpp(gguf_export[0], n_ctx=512)
    bc = BenchConfig(context_lengths=(64,), new_tokens=16, stride=8, passage_tokens=16, repeats=1, lora_overhead=True)
    result = run_bench(engine, bc)
    row = result["rows"][0]
    assert result["engine"] == "llama.cpp" and "lora" not in result  # no PyTorch LoRA to time
    assert row["append"]["weight_mb"] == pytest.approx(engine.weight_bytes / 1e6)
    assert row["flop_limit_speedup"] > 1 and row["append_step_tokens"] == 8 + 32 + 16 + 2


@needs_default_model
def test_serve_runs_on_the_llama_cpp_engine(gguf_export, shipped_index, monkeypatch):
    """`flashback serve --engine llamacpp`: one generation at a time, the engine's own greedy text."""
    pytest.importorskip("uvicorn")
    from flashback.engines.llamacpp import load_llamacpp

    from .conftest import check_served_text, serve_app

    folder = gguf_export[0]
    app = serve_app(monkeypatch, "--engine", "llamacpp", "--model", folder, "--index", shipped_index)
    engine = load_llamacpp(folder, n_ctx=1024)
    cfg = GenerationConfig(mode="append", max_new_tokens=24, tail=32)
    want = generate(engine, encode(engine.tokenizer, README_PROMPT), IndexRetriever(Index.load(shipped_index)), cfg)
    check_served_text(app, README_PROMPT, want.text, {"echo": True, "logprobs": 1}, "PyTorch engine")
