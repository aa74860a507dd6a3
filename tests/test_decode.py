"""The decode step (decode.py) on fixed-shape buffers: same cache, same logits, same greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from flashback.bench import run_bench
from flashback.cli import main
from flashback.config import BenchConfig, GenerationConfig
from flashback.engines.torch import load_model
from flashback.engines.torch.cache import KVCache
from flashback.engines.torch.decode import KV_BLOCK, DecodeLinear, Decoder, blocked_attention
from flashback.errors import FlashbackError
from flashback.generate import generate
from flashback.text.retrieval import Index, IndexRetriever

from .conftest import TEST_DEVICE
from .test_cache import assert_same_cache, full_logits, plain_cache

PROMPT = "Garbage collection frees memory. A lambda expression creates a function and a socket binds to a port"


def random_ids(lm, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(lm.tokenizer) - 2, (n,), generator=g).tolist()


def decode_all(cache: KVCache, tokens: list[int]) -> torch.Tensor:
    return torch.stack([cache.extend([t]) for t in tokens])


def test_fixed_buffers_keep_the_rollback_invariant(tiny_lm):
    """Prefill, decode through the Decoder, append a passage, roll back: the context's plain cache."""
    context, new, passage = random_ids(tiny_lm, 30, 1), random_ids(tiny_lm, 6, 2), random_ids(tiny_lm, 12, 3)
    decoder = Decoder(tiny_lm.model, None, None, compile=False)
    cache = KVCache(tiny_lm.model, capacity=64, decoder=decoder)
    cache.extend(context)
    decode_all(cache, new)
    assert len(cache) == len(context) + len(new)
    assert_same_cache(cache, plain_cache(tiny_lm.model, context + new), atol=1e-5)
    cache.extend(passage)
    cache.rollback(len(context))
    assert_same_cache(cache, plain_cache(tiny_lm.model, context))  # bit-identical: nothing before was touched
    with pytest.raises(FlashbackError, match="holds 64 tokens"):
        cache.extend(random_ids(tiny_lm, 40, 4))


def test_decoder_logits_equal_a_full_recomputation(tiny_lm):
    context, new = random_ids(tiny_lm, 25, 5), random_ids(tiny_lm, 8, 6)
    cache = KVCache(tiny_lm.model, capacity=40, decoder=Decoder(tiny_lm.model, None, None, compile=False))
    cache.extend(context)
    got = decode_all(cache, new)
    want = full_logits(tiny_lm.model, context + new)[len(context) - 1 + 1 : len(context) + len(new)]
    torch.testing.assert_close(got[:-1], want[: len(new) - 1], atol=1e-4, rtol=0)
    assert [f.kind for f in cache.forwards] == ["prefill"] + ["decode"] * len(new)


def test_blocked_attention_equals_sdpa_over_the_filled_keys():
    """The CPU decode attention: grouped heads, a buffer filled up to a length, two blocks' worth of keys."""
    g = torch.Generator().manual_seed(8)
    heads, kv_heads, dim, capacity, filled = 6, 2, 16, 2 * KV_BLOCK, KV_BLOCK + 37
    query = torch.randn(1, heads, 1, dim, generator=g)
    key, value = (torch.randn(1, kv_heads, capacity, dim, generator=g) for _ in range(2))
    mask = torch.zeros(1, 1, 1, capacity, dtype=torch.bool)
    mask[..., :filled] = True
    key[:, :, filled:] = 1e4  # whatever lies past the filled length must not count
    got = blocked_attention(query, key, value, mask, dim**-0.5)
    want = F.scaled_dot_product_attention(query, key[:, :, :filled], value[:, :, :filled], enable_gqa=True)
    assert got.shape == (1, 1, heads, dim)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    key[:, :, filled:] = torch.randn(1, kv_heads, capacity - filled, dim, generator=g)
    unmasked = F.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    torch.testing.assert_close(blocked_attention(query, key, value, None, dim**-0.5), unmasked.transpose(1, 2))


def test_decoder_merges_the_adapter_of_its_mode(tiny_model_dir, adapter_dir):
    lm = load_model(str(tiny_model_dir), adapters={"append": str(adapter_dir)}, quantize="int8", device=TEST_DEVICE)
    ids = random_ids(lm, 20, 7)
    lm.activate("append")
    with_adapter = full_logits(lm.model, ids)
    lm.activate(None)
    without = full_logits(lm.model, ids)
    assert (with_adapter - without).abs().max() > 0.1  # the adapter matters
    fp32 = Decoder(lm.model, "append", None, compile=False)
    torch.testing.assert_close(full_logits(fp32.model, ids), with_adapter, atol=1e-4, rtol=0)
    torch.testing.assert_close(full_logits(Decoder(lm.model, None, None, False).model, ids), without, atol=1e-4, rtol=0)
    # int8 weights: a quarter of the bytes, logits close to the merged fp32 ones
    int8 = lm.decoder("append")
    assert int8 is lm.decoder("append") and lm.decoder("none") is not int8
    linears = [m for m in int8.model.modules() if isinstance(m, DecodeLinear)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    assert int8.weight_bytes() < 0.3 * fp32.weight_bytes()
    # int8 of a tiny random model (weights of std 0.2) is coarse: bounded by a tenth of the logits' range, and well
    # under what the merged adapter changes (the merge survives quantization)
    err = (full_logits(int8.model, ids) - with_adapter).abs().max()
    assert 0 < err < 0.1 * with_adapter.abs().max()
    assert err < 0.5 * (with_adapter - without).abs().max()


def test_compiled_decode_gives_the_eager_greedy_tokens(tiny_model_dir, tiny_index_dir, adapter_dir):
    """One compiled graph per cache capacity serves every mode."""
    index = IndexRetriever(Index.load(tiny_index_dir))
    eager = load_model(str(tiny_model_dir), adapters={"append": str(adapter_dir)}, device=TEST_DEVICE)
    compiled = load_model(str(tiny_model_dir), adapters={"append": str(adapter_dir)}, compile=True, device=TEST_DEVICE)
    prompt = eager.tokenizer(PROMPT)["input_ids"]
    for mode in ("append", "prepend", "none"):
        cfg = GenerationConfig(mode=mode, stride=6, max_new_tokens=20, tail=3, stop_at_eos=False)
        want = generate(eager, prompt, index, cfg)
        got = generate(compiled, prompt, index, cfg)
        assert got.token_ids == want.token_ids, mode
        assert [f.kind for f in got.trace.forwards] == [f.kind for f in want.trace.forwards]
        assert got.trace.cache_capacity % 512 == 0 and want.trace.cache_capacity is None
    assert compiled.decoder("append").compile_s > 0


def test_quantize_is_checked_and_reaches_eval(capsys, tiny_model_dir, tiny_index_dir, corpus_file, tmp_path):
    with pytest.raises(FlashbackError, match="int4"):
        load_model(str(tiny_model_dir), quantize="int4")
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_model_dir), "--quantize", "int4", "hello"])
    capsys.readouterr()
    results = {}
    for quantize in ([], ["--quantize", "int8"]):
        out = tmp_path / f"eval{len(quantize)}.json"
        args = ["eval", str(corpus_file), "--model", str(tiny_model_dir), "--index", str(tiny_index_dir)]
        assert main([*args, "--modes", "none,prepend", "--json", str(out), *quantize]) == 0
        results[bool(quantize)] = json.loads(out.read_text())
    assert results[True]["quantize"] == "int8" and results[False]["quantize"] is None
    for plain, int8 in zip(results[False]["results"], results[True]["results"], strict=True):
        assert plain["tokens"] == int8["tokens"]
        assert plain["perplexity"] != int8["perplexity"]
        assert abs(int8["perplexity"] / plain["perplexity"] - 1) < 0.05


def test_bench_reports_decode_against_its_bandwidth_bound(tiny_lm):
    bc = BenchConfig(context_lengths=(64,), new_tokens=16, stride=8, passage_tokens=16, repeats=1, lora_overhead=False)
    result = run_bench(tiny_lm, bc)
    assert result["copy_bandwidth_gb_s"] > 0.1 and result["compile"] == "off"
    row = result["rows"][0]
    for mode in ("append", "prepend"):
        x = row[mode]
        assert x["bound_ms"] > x["weights_bound_ms"] > 0 and x["kv_mb"] > 0
        assert x["decode_over_bound"] == pytest.approx(x["decode_ms_per_token"] / x["bound_ms"])
        assert 0 < x["decode_share"] < 1
        assert x["decode"] == "eager" and x["compile_choice"] is None


def test_compile_auto_compiles_only_when_the_tokens_left_repay_it(tmp_path, monkeypatch):
    """The rule: remaining tokens x eager step x saved share against the expected compile time."""
    from flashback.engines.torch.autocompile import EAGER_STEPS, AutoCompile, Records

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # not there yet: compiles are cold
    records = Records(tmp_path / "records.json")
    records.update("g", cold_s=10.0, ratio=0.5)
    built = []

    def choose(decode_tokens: int, later: int = 0) -> AutoCompile:
        auto = AutoCompile("g", 512, decode_tokens, lambda: built.append(1) or "decoder", lambda: False, records, later)
        for i in range(EAGER_STEPS):
            got = auto.observe_eager(0.1)
            assert got is None or i == EAGER_STEPS - 1
        return auto, got

    # 0.1 s eager, half saved (the record says): 0.05 s a token, so compiling (10 s cold) pays from 200 tokens left
    short, got = choose(EAGER_STEPS + 150)
    assert got is None and short.choice["compiled"] is False and "<= 10.0 s" in short.choice["reason"]
    long, got = choose(EAGER_STEPS + 400)
    assert got == "decoder" and long.choice["compiled"] is True and long.choice["remaining_tokens"] == 400
    assert built == [1] and long.observe_eager(0.1) is None  # chosen once
    bench, got = choose(EAGER_STEPS + 150, later=100)  # a bench's later runs decode on the same graph
    assert (
        got == "decoder" and bench.choice["remaining_tokens"] == 250 and "100 in later runs" in bench.choice["reason"]
    )
    built.clear()
    long.compiled_step(0.5, compile_s=7.0)  # the step that compiled: its time is the cold compile's
    for _ in range(EAGER_STEPS):
        long.compiled_step(0.04, compile_s=0.0)
    long.finish()
    assert records.get("g") == {"cold_s": 7.0, "ratio": 0.4}
    assert long.choice["compiled_ms"] == 40.0 and long.choice["compile_s"] == 7.0
    # once Inductor's cache has seen the graph, the warm figure counts
    (tmp_path / "inductor").mkdir()
    records.update("g", warm_s=1.0)
    warm, got = choose(EAGER_STEPS + 50)  # 50 x 0.1 x 0.6 = 3 s > 1 s warm
    assert got == "decoder" and warm.choice["warm"] and "warm" in warm.choice["reason"]


def auto_and_eager(tiny_model_dir, tiny_index_dir, tmp_path, monkeypatch):
    """(retriever, eager engine, --compile auto engine, prompt ids, config) with the compile records in tmp_path and
    no failure remembered from another test."""
    from flashback.engines.torch import autocompile

    monkeypatch.setenv("FLASHBACK_CACHE", str(tmp_path))
    monkeypatch.setattr(autocompile, "FAILED", {})
    index = IndexRetriever(Index.load(tiny_index_dir))
    eager = load_model(str(tiny_model_dir), markers=True, device=TEST_DEVICE)
    auto = load_model(str(tiny_model_dir), markers=True, compile="auto", device=TEST_DEVICE)
    prompt = eager.tokenizer(PROMPT)["input_ids"]
    cfg = GenerationConfig(mode="append", stride=12, max_new_tokens=36, tail=3, stop_at_eos=False)
    return index, eager, auto, prompt, cfg


@pytest.mark.parametrize("pays", [False, True])
def test_compile_auto_switches_mid_generation_to_the_same_tokens(
    tiny_model_dir, tiny_index_dir, tmp_path, monkeypatch, pays
):
    """A generation that starts eager and moves its cache into fixed buffers for the compiled step gives the eager
    greedy tokens; one whose tokens do not repay the compile stays eager. Either way the trace says why."""
    from flashback.engines.torch.autocompile import Records, graph_key

    index, eager, auto, prompt, cfg = auto_and_eager(tiny_model_dir, tiny_index_dir, tmp_path, monkeypatch)
    key = graph_key(auto.name, None, 512, auto.device, auto.dtype_name)
    cost = 0.0 if pays else 1e9  # cold and warm: whether a test before compiled into this Inductor cache or not
    Records().update(key, cold_s=cost, warm_s=cost)
    auto.keep_prefixes(64)
    want, got = generate(eager, prompt, index, cfg), generate(auto, prompt, index, cfg)
    assert got.token_ids == want.token_ids
    choice = got.trace.compile
    assert choice["compiled"] is pays, choice
    assert choice["remaining_tokens"] == 36 - 3 - 4
    assert got.to_json()["compile"] == choice
    decodes = [f for f in got.trace.forwards if f.kind == "decode"]
    assert len(decodes) == 33
    if pays:
        assert got.trace.cache_capacity == 512 and auto.compile_s > 0 and choice["compile_s"] > 0
        assert Records().get(key)["cold_s" if "cold" in choice["reason"] else "warm_s"] > 0
        again = generate(auto, prompt, index, cfg)  # compiled in this process now: it costs nothing
        assert again.token_ids == want.token_ids and "earlier in this process" in again.trace.compile["reason"]
        # the first generation's cache went back to the store as an auto session starts: the second reused it
        assert again.trace.cached_tokens > 0
    else:
        assert got.trace.cache_capacity is None and auto.compile_s == 0 and not auto._decoders


def test_compile_on_tells_auto_what_it_compiled(tiny_model_dir, tiny_index_dir, tmp_path, monkeypatch):
    """A --compile on run records its compile time for the graph, as cold the first time, so that a later auto run
    knows Inductor's cache has seen the graph and counts the warm cost."""
    from flashback.engines.torch.autocompile import Records, graph_key

    index, _, _, prompt, cfg = auto_and_eager(tiny_model_dir, tiny_index_dir, tmp_path, monkeypatch)
    on = load_model(str(tiny_model_dir), markers=True, compile="on", device=TEST_DEVICE)
    key = graph_key(on.name, None, 512, on.device, on.dtype_name)
    assert Records().get(key) == {}
    generate(on, prompt, index, cfg)
    assert Records().get(key)["cold_s"] > 0 and "warm_s" not in Records().get(key)


def test_compile_flag_reads_auto_on_off(capsys):
    """auto by default, --compile alone is on (as before it took a value), anything else is refused."""
    from flashback.cli import build_parser, config
    from flashback.config import EngineConfig

    parser = build_parser()
    for argv, want in (
        (["bench"], "auto"),
        (["bench", "--compile"], "on"),
        (["bench", "--compile", "off"], "off"),
    ):
        assert config(EngineConfig, parser.parse_args(argv)).compile == want
    assert EngineConfig(compile=True).compile == "on" and EngineConfig(compile=False).compile == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--compile", "sometimes"])
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
    with pytest.raises(FlashbackError, match="unknown --compile 'sometimes'"):
        EngineConfig(compile="sometimes").validate()


def test_compile_auto_goes_on_eager_when_compiling_fails(tiny_model_dir, tiny_index_dir, tmp_path, monkeypatch):
    """No C++ compiler, an Inductor error: the generation finishes eager with the same tokens, says why, and the
    process does not try that graph again."""
    from flashback.engines.torch.autocompile import Records, graph_key

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(Decoder, "__call__", broken)
    index, eager, auto, prompt, cfg = auto_and_eager(tiny_model_dir, tiny_index_dir, tmp_path, monkeypatch)
    key = graph_key(auto.name, None, 512, auto.device, auto.dtype_name)
    Records().update(key, cold_s=0.0, warm_s=0.0)
    want = generate(eager, prompt, index, cfg)
    got = generate(auto, prompt, index, cfg)
    assert got.token_ids == want.token_ids
    assert got.trace.compile["compiled"] is False and "no C++ compiler" in got.trace.compile["failed"]
    again = generate(auto, prompt, index, cfg)
    assert again.token_ids == want.token_ids and "failed earlier" in again.trace.compile["reason"]


def test_warm_up_compiles_in_the_background_while_sessions_stay_eager(
    tiny_model_dir, tiny_index_dir, tmp_path, monkeypatch
):
    """A server's start-up: the graph compiles in another thread; a generation meanwhile stays eager (only that
    thread compiles it); once it is built, auto switches to it at no cost, with the eager tokens."""
    from torch._dynamo.utils import counters

    index, eager, auto, prompt, cfg = auto_and_eager(tiny_model_dir, tiny_index_dir, tmp_path, monkeypatch)
    assert eager.warm_up("append", (300,)) is None  # --compile off: nothing to warm
    want = generate(eager, prompt, index, cfg)
    auto.warming.add((None, 512))  # as if the thread were still compiling: sessions wait eager
    assert auto.warming_up() == [512]
    waiting = generate(auto, prompt, index, cfg)
    assert waiting.token_ids == want.token_ids and "background" in waiting.trace.compile["reason"]
    auto.warming.clear()
    thread = auto.warm_up("append", (300,))  # no adapter for append here: the base model's graph, 512 tokens
    thread.join(timeout=600)
    assert not thread.is_alive() and not auto.warming and 512 in auto.decoder(None, build=True).capacities
    graphs = counters["stats"]["unique_graphs"]
    got = generate(auto, prompt, index, cfg)
    assert got.token_ids == want.token_ids
    assert got.trace.compile["compiled"] and "earlier in this process" in got.trace.compile["reason"]
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up's graph, not a recompiled one


def test_warm_up_builds_the_decode_steps_of_both_endpoints(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    """A server holding a text and a chat adapter for append mode warms both adapters' decode steps (chats decode
    on the chat adapter's merged weights), each for every capacity asked for."""
    import flashback.engines.torch.autocompile as autocompile

    from .conftest import random_adapter

    chat = random_adapter(str(tiny_model_dir), tmp_path / "chat", 0.6, endpoint="chat")
    lm = load_model(
        str(tiny_model_dir), adapters={"append": str(adapter_dir), "append-chat": str(chat)}, compile="auto"
    )
    built, failed = [], []

    def decoder(slot, build=False):
        built.append(slot)
        raise RuntimeError("not compiled in this test")

    monkeypatch.setattr(lm, "decoder", decoder)
    monkeypatch.setattr(autocompile, "remember_failure", lambda key, exc: failed.append(key))
    thread = lm.warm_up("append", (300, 700))
    thread.join(timeout=60)
    assert built == ["append", "append", "append-chat", "append-chat"] and len(failed) == 4
    assert not lm.warming  # each size is done (here: failed), so sessions stop waiting for it
