"""--upstream: FlashBack's loop driven over HTTP against a real llama.cpp server (llama-server) started here.

The server serves the shipped adapter's f16 GGUF export; FlashBack retrieves and lays out the prompt (token ids),
the server decodes and reuses its prefix cache. Needs llama-server (scripts/setup_engines.sh builds it).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import time

import httpx
import numpy as np
import pytest

from flashback.bench import BenchConfig, run_bench
from flashback.cli import main
from flashback.export import export
from flashback.generate import GenerationConfig, Retrieved, generate
from flashback.model import encode, load_model
from flashback.retrieval import Hit
from flashback.upstream import llama_server_path, load_upstream
from tests.conftest import engine_or_skip

from .test_cli import assert_clean_error, run_cli

README_PROMPT = "A garbage collector reclaims memory that a program no longer uses. In Python, the"
TEXT = (
    "A garbage collector reclaims memory that a program no longer uses. Reference counting frees an object as soon "
    "as the last reference to it goes away, but it cannot free cycles of objects that refer to each other. A tracing "
    "collector starts from the roots, the variables a program can reach directly, and marks every object it can "
    "reach from them; whatever stays unmarked is garbage. In Python, the"
)
PASSAGES = (
    "The gc module provides an interface to the optional garbage collector. It can disable the collector, tune "
    "the collection frequency, and set debugging options.",
    "CPython uses reference counting with a cycle detector: objects whose count drops to zero are freed at once, "
    "and the generational collector finds unreachable cycles.",
    "A weak reference to an object does not keep it alive: when only weak references remain, the collector may "
    "destroy the object and reuse its memory.",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(shipped_gguf, tmp_path_factory):
    """(url, export folder) of a llama-server on the export's GGUF: one slot, 2 threads."""
    binary = llama_server_path()
    engine_or_skip(binary is not None, "llama-server")
    folder, card = shipped_gguf
    port = _free_port()
    log = tmp_path_factory.mktemp("llama-server") / "log.txt"
    # Flash attention off, as in the in-process engine: with it on (llama-server's default on this CPU) the two
    # part ways at a near-tie on this test's append layout (the 7th token).
    # No host-memory prompt cache (--cache-ram 0): the slot's own prefix cache is what FlashBack relies on.
    cmd = [binary, "-m", folder / card["gguf"], "-c", "2048", "-np", "1", "-t", "2", "-tb", "2", "-fa", "off"]
    cmd += ["--cache-ram", "0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*map(str, cmd), "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"llama-server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"llama-server did not come up in 120 s: {log.read_text()[-2000:]}")
        time.sleep(0.25)
    yield url, folder
    proc.terminate()
    proc.wait(timeout=30)


def alternating_retriever(tokenizer):
    """The passages in turn: a prepended prefix changes at every retrieval, as with real retrieval.

    (llama-server also keeps earlier prompts in host memory and restores one whose beginning matches, so a
    passage that came back would let prepend reuse that prompt.)"""
    ids = [np.array(encode(tokenizer, text)) for text in PASSAGES]
    calls = []

    def retriever(query: str, k: int) -> list[Retrieved]:
        calls.append(query)
        n = (len(calls) - 1) % len(ids)
        return [Retrieved(Hit(n, f"p{n}", f"d{n}", "t", 1.0), ids[n])]

    retriever.max_passage_tokens = 128
    return retriever


def test_upstream_generates_the_local_engines_tokens(server):
    """Same layouts, same greedy tokens on the README's prompt: llama-server == in-process llama.cpp (all 24
    tokens), == PyTorch (the first 16); the engine computes per retrieval what the local cache computes."""
    url, folder = server
    engine = load_upstream(url, folder)
    torch_lm = load_model(str(folder), markers=True)
    local = None
    if importlib.util.find_spec("llama_cpp") is not None:
        from flashback.llamacpp import load_llamacpp

        local = load_llamacpp(folder, n_ctx=1024)
    prompt = encode(torch_lm.tokenizer, README_PROMPT)
    for mode in ("append", "prepend", "none"):
        cfg = GenerationConfig(mode=mode, max_new_tokens=24, tail=32, stop_at_eos=False)
        got = generate(engine, prompt, alternating_retriever(torch_lm.tokenizer), cfg)
        want = generate(torch_lm, prompt, alternating_retriever(torch_lm.tokenizer), cfg)
        assert len(got.token_ids) == 24
        assert got.token_ids[:16] == want.token_ids[:16], mode
        if local is not None:
            same = generate(local, prompt, alternating_retriever(torch_lm.tokenizer), cfg).token_ids
            assert got.token_ids == same, mode
        if mode != "none":  # the first request also holds the prompt, which the local cache prefilled apart
            computed = [r["computed_tokens"] for r in got.trace.retrievals]
            assert computed[1:] == [r["computed_tokens"] for r in want.trace.retrievals[1:]]
            assert computed[0] == len(prompt) + len(encode(torch_lm.tokenizer, PASSAGES[0])) + 2 * (mode == "append")
        else:
            assert got.trace.retrievals == []


def test_upstream_prefix_cache_serves_append_not_prepend(server):
    """A ~240-token context: each append request reuses the context before the previous passage from the
    server's cache and computes stride + tail + passage + 2 tokens; each prepend request starts anew."""
    url, folder = server
    engine = load_upstream(url, folder)
    prompt = encode(engine.tokenizer, TEXT * 3)
    passages = [len(encode(engine.tokenizer, text)) for text in PASSAGES]
    for mode in ("append", "prepend"):
        cfg = GenerationConfig(mode=mode, max_new_tokens=48, tail=32, stop_at_eos=False)
        trace = generate(engine, prompt, alternating_retriever(engine.tokenizer), cfg).trace
        cached = [r["engine_cached_tokens"] for r in trace.retrievals]
        computed = [r["computed_tokens"] for r in trace.retrievals]
        if mode == "append":
            assert computed[1:] == [16 + 32 + n + 2 for n in passages[1:]]
            # the context up to where the previous passage began
            assert cached[1:] == [len(prompt) - 32, len(prompt) - 32 + 16]
        else:
            # recomputed: the prompt's first tokens may match an earlier test's prompt kept by the server
            assert all(c <= max(passages) + 16 for c in cached) and all(n >= len(prompt) - 16 for n in computed)


def test_upstream_cli_generate_and_bench(server, capsys, tmp_path):
    url, folder = server
    args = ["generate", "--model", str(folder), "--upstream", url, "--mode", "none", "--max-new-tokens", "8"]
    code = main([*args, "--prompt", README_PROMPT])
    assert code == 0 and capsys.readouterr().out.strip()
    engine = load_upstream(url, folder)
    bc = BenchConfig(context_lengths=(256,), new_tokens=32, stride=16, passage_tokens=32, repeats=1, tail=32)
    result = run_bench(engine, bc)
    row = result["rows"][0]
    assert result["engine"] == "upstream" and "lora" not in result
    assert row["append_step_tokens"] == 16 + 32 + 32 + 2
    a, p = row["append"], row["prepend"]
    assert a["engine_cached_tokens"] >= 256 - 32 and a["engine_prompt_tokens"] < p["engine_prompt_tokens"]
    # each run starts cold (bench makes the engine forget the previous run): the context is prefilled
    assert a["breakdown_s"]["prefill_s"] > 0 and a["engine_prompt_tokens"] > 256
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(folder), "--upstream", url, "--context-lengths", "128", "--new-tokens", "24"]
    assert main([*args, "--repeats", "1", "--beside-torch", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reused from its prefix cache" in printed
    assert "| 128 | torch |" in printed and "| 128 | upstream |" in printed  # the engines side by side
    result = json.loads(out.read_text())
    assert result["engine"] == "upstream" and result["beside_torch"]["engine"] == "torch"
    for r in (result, result["beside_torch"]):  # same schedule and layout on both engines
        assert r["rows"][0]["append_step_tokens"] == 16 + 32 + 128 + 2


def test_upstream_errors_are_clear(server, capsys, tiny_model_dir, adapter_dir, tmp_path):
    url, folder = server
    other = tmp_path / "tiny-export"
    export(adapter_dir, other, model=str(tiny_model_dir))  # another tokenizer than the served model's
    base = ["generate", "--mode", "none", "--prompt", "hi"]
    code, _, err = run_cli(capsys, *base, "--model", other, "--upstream", url)
    assert_clean_error(code, err, "tokenizes differently")
    code, _, err = run_cli(capsys, *base, "--model", folder, "--upstream", f"http://127.0.0.1:{_free_port()}")
    assert_clean_error(code, err, "does not answer as a llama.cpp server")
    code, _, err = run_cli(capsys, *base, "--model", tiny_model_dir, "--upstream", url)
    assert_clean_error(code, err, "--upstream needs --model EXPORT")
    code, _, err = run_cli(capsys, *base, "--model", folder, "--upstream", url, "--engine", "llamacpp")
    assert_clean_error(code, err, "choose one of --engine llamacpp and --upstream")
    code, _, err = run_cli(capsys, *base, "--model", folder, "--upstream", url, "--flash-attn")
    assert_clean_error(code, err, "--flash-attn applies to --engine llamacpp only")


def test_serve_upstream_is_a_retrieval_front_end(server, shipped_index, monkeypatch):
    """`flashback serve --upstream`: OpenAI completions whose decoding runs on llama-server."""
    pytest.importorskip("uvicorn")
    from flashback.generate import IndexRetriever
    from flashback.retrieval import Index

    from .conftest import check_served_text, serve_app

    url, folder = server
    app = serve_app(monkeypatch, "--upstream", url, "--model", folder, "--index", shipped_index)
    engine = load_upstream(url, folder)
    cfg = GenerationConfig(mode="append", max_new_tokens=24, tail=32)
    want = generate(engine, encode(engine.tokenizer, README_PROMPT), IndexRetriever(Index.load(shipped_index)), cfg)
    check_served_text(app, README_PROMPT, want.text, {"logprobs": 1}, "upstream")
