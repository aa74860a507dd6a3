from __future__ import annotations

import json
from dataclasses import replace

import pytest

from flashback.bench import FullRetriever, flops, format_table, run_bench
from flashback.cli import main
from flashback.config import BenchConfig
from flashback.engines.base import Architecture
from flashback.errors import FlashbackError
from flashback.text.retrieval import Index


def test_flop_model_matches_the_formula(tiny_lm):
    model = tiny_lm.model
    cfg = model.config
    emb = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - emb
    n, c = 10, 100
    want = 2 * body * n + 2 * emb + 4 * cfg.num_hidden_layers * cfg.hidden_size * (n * c + n * n / 2)
    arch = Architecture.of(model)
    assert flops(arch, n, c) == pytest.approx(want)
    assert flops(arch, 1, 1000) > flops(arch, 1, 10)  # attention grows with the cache


@pytest.mark.parametrize("tail", [0, 4])
def test_bench_rows_and_flop_limits(tiny_lm, tail):
    bc = BenchConfig(
        context_lengths=(32, 256), new_tokens=32, stride=8, passage_tokens=16, repeats=1, lora_overhead=False, tail=tail
    )
    result = run_bench(tiny_lm, bc)
    assert [r["context_length"] for r in result["rows"]] == [32, 256]
    short, long = result["rows"]
    for row in result["rows"]:
        for mode in ("append", "prepend"):
            wall = row[mode]["wall_s"]
            assert 0 < wall["min"] <= wall["median"] <= wall["max"]
        assert row["speedup"] > 0 and row["bare_extend_s"] > 0
    # Prepend re-encodes the context at each of the 4 retrievals; append encodes it once.
    assert long["flop_limit_speedup"] > short["flop_limit_speedup"] > 1
    assert long["step_flop_limit"] > (4 if tail == 0 else 3)
    assert all(r["append_step_tokens"] == 8 + tail + 16 + 2 for r in result["rows"])  # stride + tail + passage
    assert "| 256 |" in format_table(result)


def test_bench_retrieval_steps_always_carry_k_passages(tiny_lm, tiny_index_dir):
    """A query that matches nothing would make an append step a bare 16-token extend (a real bench run once
    reported a 38x step speedup that way): such steps get random full-length passages of the same index."""
    index = Index.load(tiny_index_dir)
    retriever = FullRetriever(index, seed=0)
    assert retriever("garbage collection", 1)[0].hit.score > 0 and retriever.filled == 0
    filled = retriever(";;; %%% ###", 2)
    assert retriever.filled == 2 and all(len(r.token_ids) == index.chunk_tokens for r in filled)

    bc = BenchConfig(context_lengths=(48,), new_tokens=24, stride=8, repeats=1, lora_overhead=False, tail=4)
    result = run_bench(tiny_lm, bc, index)
    assert result["rows"][0]["append_step_tokens"] == 8 + 4 + index.chunk_tokens + 2
    assert result["filled_passages"] >= 0 and "passages: index" in format_table(result)


def test_bench_rejects_contexts_beyond_the_model(tiny_lm):
    with pytest.raises(FlashbackError, match="does not fit"):
        run_bench(tiny_lm, BenchConfig(context_lengths=(500,), new_tokens=64, repeats=1, lora_overhead=False))
    with pytest.raises(FlashbackError, match="must exceed --stride"):  # no retrieval step after the first to time
        run_bench(tiny_lm, BenchConfig(context_lengths=(64,), new_tokens=16, stride=16, lora_overhead=False))


def test_beside_torch_needs_another_engine(capsys, tiny_model_dir):
    from tests.test_cli import assert_clean_error, run_cli

    code, _, err = run_cli(capsys, "bench", "--model", tiny_model_dir, "--context-lengths", "64", "--beside-torch")
    assert_clean_error(code, err, "--beside-torch compares an engine")


def test_bench_cli_writes_json_and_plot(capsys, tiny_model_dir, tmp_path):
    code = main(
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--context-lengths",
            "64",
            "--new-tokens",
            "16",
            "--stride",
            "8",
            "--passage-tokens",
            "8",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "b.json"),
            "--plot",
            str(tmp_path / "b.png"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and "random tokens" in err
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["rows"][0]["context_length"] == 64 and "lora" in data
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_the_papers_runtime_test_grows_the_sequence_to_a_total_length(capsys, tiny_model_dir, tmp_path):
    """--paper: the paper's regime (no markers, tail = stride, random passages, generation until the sequence
    reaches --total-length), each setting still the user's to change; here scaled to the tiny model's positions."""
    out = tmp_path / "paper.json"
    args = ["bench", "--paper", "--model", tiny_model_dir, "--context-lengths", 64, "--total-length", 160]
    code = main(
        [
            *map(str, args),
            "--passage-tokens",
            "16",
            "--stride",
            "8",
            "--tail",
            "8",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    config, (row,) = result["config"], result["rows"]
    assert config["markers"] is False and config["lora_overhead"] is False and "lora" not in result
    assert row["new_tokens"] == 160 - 64 and result["passages"] == "random tokens"
    assert row["append_step_tokens"] == 8 + 8 + 16  # stride + tail + passage, no markers
    assert row["flop_limit_speedup"] > 1
    code = main([*map(str, args[:-2]), "--total-length", "64"])
    assert code == 2 and "--total-length must exceed" in capsys.readouterr().err


def test_long_contexts_follow_the_models_positions():
    from flashback.bench import long_contexts

    assert long_contexts(8192, 162) == (8000,)  # SmolLM2: 8,192 positions leave 8,000 for the context
    assert long_contexts(32768, 162) == (8192, 16384, 32000)  # Gemma 3 270M
    assert long_contexts(131072, 162) == (8192, 16384, 32768)
    with pytest.raises(FlashbackError, match="no long context"):
        long_contexts(4096, 162)


def test_sliding_layers_cap_the_attention_flops_and_the_keys_a_decode_step_reads():
    full = Architecture(18, 640, 256, 1000, 10**8, 10**8 + 1000, 1024)
    hybrid = Architecture(18, 640, 256, 1000, 10**8, 10**8 + 1000, 1024, sliding_layers=15, window=512)
    n = 32768
    assert flops(hybrid, n, 0) < flops(full, n, 0) / 3  # at 32k, 15 of 18 layers see 512 keys, not up to 32k
    assert flops(hybrid, 16, 100) == flops(full, 16, 100)  # inside the window the two agree
    assert hybrid.kv_read(32768) == pytest.approx((3 * 32768 + 15 * 512) / 18)
    assert full.kv_read(32768) == 32768


def test_bench_reports_rooflines_and_peak_memory_per_mode(tiny_lm):
    """The roofline limit bounds what the FLOP model and the decode bytes allow; each mode's peak RSS is read."""
    from flashback.bench import Roofline

    bc = BenchConfig(
        context_lengths=(200, 400), new_tokens=24, stride=8, passage_tokens=16, repeats=1, lora_overhead=False
    )
    bc = replace(bc, long=True)
    result = run_bench(tiny_lm, bc)
    assert result["matmul_peak_gflop_s"] > 0
    for row in result["rows"]:
        assert row["roofline_limit"] > 1 and row["after_first_roofline_limit"] > 1
        assert row["after_first_of_roofline"] == pytest.approx(
            row["after_first_speedup"] / row["after_first_roofline_limit"]
        )
        for mode in ("append", "prepend"):
            assert 0 < row[mode]["after_first_roofline_s"] < row[mode]["roofline_s"]
            assert row[mode]["peak_rss_mb"] > 10
            assert row[mode]["warm_up_compile_choice"] is None or row is result["rows"][0]
    assert all(row["bare_extend_s"] is None for row in result["rows"])  # --long skips the extra prefill
    assert "roofline limit" in format_table(result)
    # decode steps are charged bytes, the others FLOPs
    from flashback.engines.base import Forward

    roof = Roofline(tiny_lm, "append", peak=1e9, bandwidth=1e9)
    one = roof.seconds([Forward("decode", 1, 101, 0.0)])
    assert one == pytest.approx((roof.weights + roof.per_token * 100) / 1e9)
    assert roof.seconds([Forward("extend", 10, 110, 0.0)]) == pytest.approx(flops(tiny_lm.arch, 10, 100) / 1e9)


def test_long_bench_compiles_each_lengths_decode_step_before_its_timed_runs(tiny_model_dir, monkeypatch):
    """--long --compile on: the short warm-up's cache is smaller than a long context's, so the bench compiles the
    long cache's graph first; the timed runs then decode through the compiled step and compile nothing."""
    from flashback import bench
    from flashback.engines.torch import load_model
    from flashback.engines.torch import model as torch_model

    engine = load_model(str(tiny_model_dir), compile=True)
    monkeypatch.setattr(torch_model, "CAPACITY_STEP", 128)  # the tiny model has 512 positions
    monkeypatch.setattr(bench, "WARM_UP_CONTEXT", 16)  # a 128-token cache; the timed runs need 384
    compiling = lambda: sum(d.compile_s for d in engine._decoders.values())  # noqa: E731
    timed, run = [], bench._run

    def watched(engine_, context, retriever, cfg, roofline=None):
        before = compiling()
        out = run(engine_, context, retriever, cfg, roofline)
        if roofline is not None:
            timed.append((compiling() - before, out["compiled"]))
        return out

    monkeypatch.setattr(bench, "_run", watched)
    bc = BenchConfig(context_lengths=(300,), new_tokens=16, stride=8, passage_tokens=16, repeats=1, long=True)
    result = run_bench(engine, replace(bc, lora_overhead=False))
    assert timed == [(0.0, True), (0.0, True)]
    assert {128, 384} <= set().union(*(d.capacities for d in engine._decoders.values()))
    assert result["rows"][0]["append"]["decode"] == "compiled"
