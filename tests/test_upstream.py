"""--upstream: FlashBack's loop driven over HTTP against a real llama.cpp server (llama-server) started here.

The server serves the shipped adapter's f16 GGUF export; FlashBack retrieves and lays out the prompt (token ids),
the server decodes and reuses its prefix cache. Needs llama-server (scripts/setup_engines.sh builds it).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from flashback.bench import run_bench
from flashback.cli import main
from flashback.config import BenchConfig, GenerationConfig
from flashback.engines.torch import load_model
from flashback.engines.upstream import OpenAIClient, load_upstream, vllm_python
from flashback.errors import FlashbackError
from flashback.export import export
from flashback.generate import generate
from flashback.text.retrieval import Hit, Retrieved
from flashback.text.tokenize import encode
from tests.conftest import engine_or_skip, llama_cpp_or_skip, llama_server_or_skip

from .test_cli import assert_clean_error, run_cli

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
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


@dataclass(frozen=True)
class Served:
    url: str
    folder: Path  # the export it serves
    block: int  # the prefix cache's granularity in tokens: it reuses whole blocks only


def _wait_until_up(proc, url: str, path: str, log: Path, what: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} did not come up in {limit_s:.0f} s: {log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module", params=["llama-server", "vllm"])
def server(request, shipped_gguf, tmp_path_factory):
    """A server on the shipped adapter's export, started here: llama-server on its f16 GGUF (one slot, 2 threads),
    or vLLM's CPU build on its Hugging Face folder (scripts/vllm_server.sh)."""
    folder, card = shipped_gguf
    port = _free_port()
    log = tmp_path_factory.mktemp(request.param) / "log.txt"
    if request.param == "llama-server":
        binary = llama_server_or_skip()
        # Flash attention off, as in the in-process engine: with it on (llama-server's default on this CPU) the two
        # part ways at a near-tie on this test's append layout (the 7th token).
        # No host-memory prompt cache (--cache-ram 0): the slot's own prefix cache is what FlashBack relies on.
        cmd = [binary, "-m", folder / card["gguf"], "-c", "2048", "-np", "1", "-t", "2", "-tb", "2", "-fa", "off"]
        cmd += ["--cache-ram", "0", "--host", "127.0.0.1", "--port", port]
        path, limit_s, block = "/health", 120, 1
    else:
        engine_or_skip(vllm_python() is not None, "vLLM (scripts/setup_engines.sh --vllm)")
        # eager: the same model, without the minute vLLM spends compiling it
        cmd = ["bash", SCRIPTS / "vllm_server.sh", folder, port, "--enforce-eager", "--max-model-len", "2048"]
        path, limit_s, block = "/v1/models", 600, 32
    with open(log, "w") as out:
        proc = subprocess.Popen(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_until_up(proc, url, path, log, request.param, limit_s)
    yield Served(url, folder, block)
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def floor_block(n: int, block: int) -> int:
    return n // block * block


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
    """Same layouts, same greedy tokens on the README's prompt: the first 16 equal PyTorch's, and all 24 equal
    those of the local engine on the same weights (llama-server: in-process llama.cpp on the f16 GGUF; vLLM:
    PyTorch on the fp32 folder). Per retrieval, the engine reuses what the local cache keeps, in whole blocks."""
    engine = load_upstream(server.url, server.folder)
    torch_lm = load_model(str(server.folder), markers=True)
    local = torch_lm
    if server.block == 1:  # llama-server
        llama_cpp_or_skip()
        from flashback.engines.llamacpp import load_llamacpp

        local = load_llamacpp(server.folder, n_ctx=1024)
    prompt = encode(torch_lm.tokenizer, README_PROMPT)
    for mode in ("append", "prepend", "none"):
        cfg = GenerationConfig(mode=mode, max_new_tokens=24, tail=32, stop_at_eos=False)
        engine.forget()
        got = generate(engine, prompt, alternating_retriever(torch_lm.tokenizer), cfg)
        want = generate(torch_lm, prompt, alternating_retriever(torch_lm.tokenizer), cfg)
        assert len(got.token_ids) == 24
        assert got.token_ids[:16] == want.token_ids[:16], mode
        assert got.token_ids == generate(local, prompt, alternating_retriever(torch_lm.tokenizer), cfg).token_ids
        if mode != "none":  # the first request also holds the prompt, which the local cache prefilled apart
            first, *later = got.trace.retrievals
            assert first["engine_cached_tokens"] == 0
            passage = len(encode(torch_lm.tokenizer, PASSAGES[0]))
            assert first["computed_tokens"] == len(prompt) + passage + 2 * (mode == "append")
            for r, mine in zip(later, want.trace.retrievals[1:], strict=True):
                kept = r["computed_tokens"] + r["engine_cached_tokens"] - mine["computed_tokens"]
                assert r["engine_cached_tokens"] == floor_block(kept, server.block)
        else:
            assert got.trace.retrievals == []


def test_upstream_prefix_cache_serves_append_not_prepend(server):
    """A ~240-token context: each append request reuses the context before the previous passage from the
    server's cache (in whole blocks) and computes the rest: stride + tail + passage + 2 tokens and, with blocks,
    the part of a block before; each prepend request starts anew."""
    engine = load_upstream(server.url, server.folder)
    prompt = encode(engine.tokenizer, TEXT * 3)
    passages = [len(encode(engine.tokenizer, text)) for text in PASSAGES]
    for mode in ("append", "prepend"):
        cfg = GenerationConfig(mode=mode, max_new_tokens=48, tail=32, stop_at_eos=False)
        engine.forget()
        trace = generate(engine, prompt, alternating_retriever(engine.tokenizer), cfg).trace
        cached = [r["engine_cached_tokens"] for r in trace.retrievals]
        computed = [r["computed_tokens"] for r in trace.retrievals]
        if mode == "append":
            kept = [len(prompt) - 32, len(prompt) - 32 + 16]  # the context up to where the previous passage began
            assert cached[1:] == [floor_block(k, server.block) for k in kept]
            assert computed[1:] == [16 + 32 + n + 2 + k % server.block for n, k in zip(passages[1:], kept, strict=True)]
        else:
            assert cached == [0, 0, 0] and computed == [len(prompt) + n + 16 * i for i, n in enumerate(passages)]


def test_upstream_cli_generate_and_bench(server, capsys, tmp_path):
    args = ["generate", "--model", str(server.folder), "--upstream", server.url, "--mode", "none"]
    code = main([*args, "--max-new-tokens", "8", "--prompt", README_PROMPT])
    assert code == 0 and capsys.readouterr().out.strip()
    engine = load_upstream(server.url, server.folder)
    bc = BenchConfig(context_lengths=(256,), new_tokens=32, stride=16, passage_tokens=32, repeats=1, tail=32)
    result = run_bench(engine, bc)
    row = result["rows"][0]
    assert result["engine"] == "upstream" and "lora" not in result
    # the one step after the first recomputes what follows the previous passage's start (256 - 32), in blocks
    assert row["append_step_tokens"] == 16 + 32 + 32 + 2 + 224 % server.block
    a, p = row["append"], row["prepend"]
    assert a["engine_cached_tokens"] == floor_block(224, server.block)
    assert a["engine_prompt_tokens"] < p["engine_prompt_tokens"]
    # each run starts cold (bench makes the engine forget the previous run): the context is prefilled
    assert a["breakdown_s"]["prefill_s"] > 0 and a["engine_prompt_tokens"] > 256
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(server.folder), "--upstream", server.url, "--context-lengths", "128"]
    assert main([*args, "--new-tokens", "24", "--repeats", "1", "--beside-torch", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reused from its prefix cache" in printed
    assert "| 128 | torch |" in printed and "| 128 | upstream |" in printed  # the engines side by side
    result = json.loads(out.read_text())
    assert result["engine"] == "upstream" and result["beside_torch"]["engine"] == "torch"
    # same schedule and layout on both engines; the engine recomputes from a block's start
    assert result["beside_torch"]["rows"][0]["append_step_tokens"] == 16 + 32 + 128 + 2
    assert result["rows"][0]["append_step_tokens"] == 16 + 32 + 128 + 2 + 96 % server.block


def test_python_api_runs_the_upstream_engine_as_the_cli_does(server, shipped_index, capsys):
    """FlashBack.load(upstream=URL, model=EXPORT): the CLI's greedy tokens, in the layout the export's card names."""
    from flashback import FlashBack

    fb = FlashBack.load(str(server.folder), index=shipped_index, upstream=server.url)
    fb.engine.forget()
    got = fb.generate(README_PROMPT, max_new_tokens=24)
    fb.engine.forget()
    args = ["generate", "--upstream", server.url, "--model", server.folder, "--index", shipped_index]
    assert main([*map(str, args), "--max-new-tokens", "24", "--json", "--prompt", README_PROMPT]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert got.token_ids and got.token_ids == cli["token_ids"]
    assert got.config.tail == cli["config"]["tail"] == 32 and got.config.markers and cli["config"]["markers"]
    assert [r["computed_tokens"] for r in got.trace.retrievals] == [r["computed_tokens"] for r in cli["retrievals"]]


def test_upstream_errors_are_clear(server, capsys, tiny_model_dir, adapter_dir, tmp_path):
    url, folder = server.url, server.folder
    other = tmp_path / "tiny-export"
    export(adapter_dir, other, model=str(tiny_model_dir))  # another tokenizer than the served model's
    base = ["generate", "--mode", "none", "--prompt", "hi"]
    code, _, err = run_cli(capsys, *base, "--model", other, "--upstream", url)
    assert_clean_error(code, err, "tokenizes differently")
    code, _, err = run_cli(capsys, *base, "--model", folder, "--upstream", f"http://127.0.0.1:{_free_port()}")
    assert_clean_error(code, err, "cannot reach the upstream engine")
    code, _, err = run_cli(capsys, *base, "--model", tiny_model_dir, "--upstream", url)
    assert_clean_error(code, err, "--upstream needs --model EXPORT")
    code, _, err = run_cli(capsys, *base, "--model", folder, "--upstream", url, "--engine", "llamacpp")
    assert_clean_error(code, err, "choose one of --engine llamacpp and --upstream")
    code, _, err = run_cli(capsys, *base, "--model", folder, "--upstream", url, "--flash-attn")
    assert_clean_error(code, err, "--flash-attn applies to --engine llamacpp only")


def test_serve_upstream_is_a_retrieval_front_end(server, shipped_index, monkeypatch, capsys):
    """`flashback serve --upstream`: OpenAI completions whose decoding runs on llama-server."""
    pytest.importorskip("uvicorn")
    from flashback.text.retrieval import Index, IndexRetriever

    from .conftest import check_served_text, serve_app

    url, folder = server.url, server.folder
    app = serve_app(monkeypatch, "--upstream", url, "--model", folder, "--index", shipped_index)
    if server.block == 1:  # llama-server, started with one slot: one generation in flight, not the default 8
        assert "has 1 slot(s): --max-active 1" in capsys.readouterr().err
    engine = load_upstream(url, folder)
    cfg = GenerationConfig(mode="append", max_new_tokens=24, tail=32)
    want = generate(engine, encode(engine.tokenizer, README_PROMPT), IndexRetriever(Index.load(shipped_index)), cfg)
    check_served_text(app, README_PROMPT, want.text, {"logprobs": 1}, "upstream")


def test_vllm_without_development_mode_cannot_forget():
    """vLLM clears its prefix cache only in development mode; without it the bench's cold start must fail clearly
    (a warm cache would time the append runs without their prefill)."""
    client = OpenAIClient("http://vllm.invalid")
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(lambda r: httpx.Response(404)))
    with pytest.raises(FlashbackError, match="VLLM_SERVER_DEV_MODE=1"):
        client.forget(0)


def test_openai_stream_is_read_as_tokens_and_counts():
    """The OpenAI protocol's streamed answer: token ids in order, an end of sequence from finish_reason "stop",
    the prompt split into computed and cached tokens; a server without prompt-token details reports no reuse
    and says so (the bench prints a note instead of a 0% that would look measured)."""
    sent = []

    def answer(details: dict | None):
        def handler(request: httpx.Request) -> httpx.Response:
            sent.append(json.loads(request.content))
            usage = {"prompt_tokens": 40, "completion_tokens": 2}
            if details is not None:
                usage["prompt_tokens_details"] = details
            chunks = [
                {"choices": [{"index": 0, "token_ids": [7], "finish_reason": None}]},
                {"choices": [{"index": 0, "token_ids": [2], "finish_reason": "stop"}]},
                {"choices": [], "usage": usage},
            ]
            body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

        return handler

    client = OpenAIClient("http://vllm.invalid")
    client.model = "m"
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(answer({"cached_tokens": 32})))
    done = client.complete(list(range(40)), 16, banned=[5, 6], seed=3)
    assert (done.tokens, done.stopped_at_eos, done.prompt_tokens, done.cached_tokens) == ([7, 2], True, 8, 32)
    assert client.reports_cached_tokens
    body = sent[-1]
    assert body["prompt"] == list(range(40)) and body["max_tokens"] == 16 and body["return_token_ids"] is True
    assert body["logit_bias"] == {"5": -100.0, "6": -100.0} and body["temperature"] == 0.0 and body["seed"] == 3
    assert client.complete([1], 0).tokens == [] and sent[-1]["max_tokens"] == 1  # prompt only: one token, dropped
    assert "cache_salt" not in sent[-1]
    client.complete([1], 0, salt="[0, null, null]")
    assert sent[-1]["cache_salt"] == "[0, null, null]"  # vLLM keeps the prefix caches of other salts apart
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(answer(None)))
    done = client.complete(list(range(40)), 16)
    assert (done.prompt_tokens, done.cached_tokens) == (40, 0) and not client.reports_cached_tokens


@pytest.mark.parametrize("scopes", [True, False])
def test_a_scoped_request_sees_upstream_reuse_only_where_the_upstream_keeps_scopes_apart(scopes):
    """serve --api-key (or cache_salt, user) through --upstream: vLLM gets the scope as its cache_salt and its
    cached count is reported; llama-server cannot scope its cache, so a scoped request is told of no reuse (else
    cached_tokens would reveal what other keys' clients sent)."""
    from flashback.engines.base import Sampling
    from flashback.engines.upstream.clients import Completion
    from flashback.engines.upstream.engine import UpstreamSession
    from flashback.layout import StepPlan

    salts = []

    class Upstream:
        scopes_cache = scopes

        def complete(self, prompt, n, *, salt=None, **_):
            salts.append(salt)
            return Completion([9] * n, False, prompt_tokens=2, cached_tokens=len(prompt) - 2, prompt_s=0, decode_s=0)

    sampling = Sampling(0.0, 1.0, None, (), True)
    for salt in (None, "[1, null, null]"):
        stretch = UpstreamSession(Upstream(), salt).begin(StepPlan(0, [], list(range(10))), 2, sampling, None, 0)
        assert list(stretch.tokens) == [9, 9]
        reported = stretch.cached_tokens
        assert reported == (8 if salt is None or scopes else 0)
    assert salts == [None, "[1, null, null]"]
