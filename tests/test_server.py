"""The real server on 127.0.0.1 with a free port, spoken to with httpx and the official openai client."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from flashback.config import MODES
from flashback.server import ServerLimits, create_app
from flashback.text.retrieval import Index, IndexRetriever
from tests.conftest import TOPICS

pytest.importorskip("uvicorn")
import uvicorn  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Connected:
    """A client that stays connected (what `CompletionService.steps` asks of a request)."""

    async def is_disconnected(self):
        return False


async def consume(service, body: dict, started: asyncio.Event | None = None) -> None:
    """Run one request through the service to its end; `started` is set at its first step."""
    from flashback.server import CompletionRequest

    async for _step in service.steps(CompletionRequest(**body), Connected()):
        if started is not None:
            started.set()


def record_steps(monkeypatch, light_sleep: float = 0.0) -> list[str]:
    """The order of generation steps as they run on the model thread: "light" (mode none), else "heavy"."""
    from flashback.server import Generation

    order: list[str] = []
    step = Generation.step

    def recorded(self):
        light = self.req.mode == "none"
        order.append("light" if light else "heavy")
        if light and light_sleep:
            time.sleep(light_sleep)
        return step(self)

    monkeypatch.setattr(Generation, "step", recorded)
    return order


def serve_in_thread(app):
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


LIMITS = ServerLimits(
    max_prompt_tokens=200, max_tokens=64, max_active=4, max_body_bytes=200_000, max_request_work=30_000
)


@pytest.fixture(scope="module")
def server(tiny_lm, tiny_index_dir):
    yield from serve_in_thread(create_app(tiny_lm, IndexRetriever(Index.load(tiny_index_dir)), LIMITS, True, 4))


@pytest.fixture
def roomy_server(tiny_lm, tiny_index_dir):
    """Room for every client of the adversarial test: fairness acts among admitted generations."""
    import dataclasses

    limits = dataclasses.replace(LIMITS, max_active=16)
    yield from serve_in_thread(create_app(tiny_lm, IndexRetriever(Index.load(tiny_index_dir)), limits, True, 4))


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_and_models(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    models = httpx.get(f"{server}/v1/models").json()
    name = models["data"][0]["id"]  # the model, then the model in each mode, for clients that send only OpenAI's fields
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [name, *(f"{name}:{m}" for m in MODES)]


def test_completion_shape_and_retrievals(server, tiny_lm):
    body = {"prompt": "A socket is an endpoint", "max_tokens": 20, "stride": 3}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == tiny_lm.name
    choice = data["choices"][0]
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    generated = data["usage"]["completion_tokens"]
    assert generated == 20 or choice["finish_reason"] == "stop"
    assert generated > 3, "too short to see a second retrieval"
    assert [x["step"] for x in data["retrievals"]] == list(range(0, generated, 3))
    assert {"id", "title", "score"} <= set(data["retrievals"][0]["passages"][0])
    # Greedy and deterministic: same request, same text.
    assert httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == choice["text"]


def test_tail_comes_from_the_server_unless_the_request_sets_it(server, tiny_lm, tiny_index_dir):
    from flashback.config import GenerationConfig
    from flashback.generate import generate

    assert httpx.get(f"{server}/health").json()["tail"] == 4
    prompt = "A socket is an endpoint for network communication"
    ids = tiny_lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    retriever = IndexRetriever(Index.load(tiny_index_dir))
    for tail in (None, 0, 9):
        body = {"prompt": prompt, "max_tokens": 12, "stride": 4, **({} if tail is None else {"tail": tail})}
        data = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
        want = 4 if tail is None else tail
        cfg = GenerationConfig(mode="append", stride=4, max_new_tokens=12, markers=True, tail=want)
        assert data["choices"][0]["text"] == generate(tiny_lm, ids, retriever, cfg).text, tail
        second = data["retrievals"][1]  # stride + tail + passage + markers were encoded
        row = next(i for i, m in enumerate(retriever.index.meta) if m["id"] == second["passages"][0]["id"])
        assert second["computed_tokens"] == 4 + want + len(retriever.index.passage_tokens(row)) + 2, tail


def test_streaming_matches_non_streaming(server):
    body = {"prompt": "Unicode assigns", "max_tokens": 24, "mode": "prepend"}
    whole = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    assert sum(len(c.get("retrievals", [])) for c in chunks) == len(whole["retrievals"])


def test_token_id_prompts_may_hold_the_models_special_tokens_but_never_the_markers(server, tiny_lm):
    """Scoring clients start a window with end-of-text (lm-evaluation-harness) or BOS: accepted as the model's own
    tokens. The marking tokens are FlashBack's, and ids outside the vocabulary do not exist: refused."""
    words = tiny_lm.tokenizer("A kludge is", add_special_tokens=False)["input_ids"]
    eos = tiny_lm.tokenizer.eos_token_id
    r = httpx.post(f"{server}/v1/completions", json={"prompt": [eos, *words], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(words) + 1, r.text
    for bad, message in (([*words, tiny_lm.marker_ids[0]], "marking tokens"), ([*words, 10**6], "vocabulary")):
        r = httpx.post(f"{server}/v1/completions", json={"prompt": bad, "max_tokens": 4}, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_prompts_gets_one_choice_each_in_order(server, tiny_lm, stream):
    """Several prompts (texts or token-id lists) in one request: one choice per prompt, by index, each the text
    that prompt gets alone; the usage adds them up."""
    texts = ["A kludge is", "Unicode assigns", "A socket is an endpoint"]
    ids = tiny_lm.tokenizer(texts[2], add_special_tokens=False)["input_ids"]
    body = {"max_tokens": 10, "stride": 4}
    alone = [httpx.post(f"{server}/v1/completions", json={**body, "prompt": t}, timeout=60).json() for t in texts]
    for prompts in (texts, [tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:2]] + [ids]):
        request = {**body, "prompt": prompts, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{server}/v1/completions", json=request, timeout=60) as r:
                events = sse_events(r)
            assert events[-1] == "[DONE]"
            got = [
                "".join(c["choices"][0]["text"] for c in events[:-1] if c["choices"][0]["index"] == i) for i in range(3)
            ]
        else:
            data = httpx.post(f"{server}/v1/completions", json=request, timeout=60).json()
            assert [c["index"] for c in data["choices"]] == [0, 1, 2]
            assert all(c["retrievals"] for c in data["choices"])
            assert data["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
            got = [c["text"] for c in data["choices"]]
        assert got == [a["choices"][0]["text"] for a in alone]


def test_the_model_name_can_pick_the_mode(server, tiny_lm):
    """A client that sends only OpenAI's fields (an evaluation harness) picks the mode by model name; the `mode`
    field agrees with it or the request is refused."""
    name = tiny_lm.name
    body = {"prompt": "Unicode assigns", "max_tokens": 8}
    texts = {}
    for mode in MODES:
        by_field = httpx.post(f"{server}/v1/completions", json={**body, "mode": mode}, timeout=60).json()
        by_name = httpx.post(f"{server}/v1/completions", json={**body, "model": f"{name}:{mode}"}, timeout=60).json()
        assert by_name["choices"][0]["text"] == by_field["choices"][0]["text"]
        assert bool(by_name["retrievals"]) == (mode != "none")
        texts[mode] = by_field["choices"][0]["text"]
    default = httpx.post(f"{server}/v1/completions", json={**body, "model": name}, timeout=60).json()
    assert default["choices"][0]["text"] == texts["append"]  # the server's mode (serve --mode; append by default)
    r = httpx.post(f"{server}/v1/completions", json={**body, "model": f"{name}:none", "mode": "append"}, timeout=60)
    assert r.status_code == 400 and "contradicts" in r.json()["error"]["message"]


TOPICS_TEXT = " ".join(TOPICS.values())
HELD_OUT = (
    "Memory that a program no longer reaches is reclaimed by the collector, while a socket accepts connections "
    "from clients and a lambda returns the value of its one expression. Unicode gives every character a code point, "
    "and a kludge keeps working although nobody likes it."
)


@pytest.mark.parametrize("mode", MODES)
def test_echo_scores_the_prompt_as_flashback_eval_does(server, tiny_lm, tiny_index_dir, mode):
    """echo + logprobs (what evaluation harnesses send) scores the prompt in the request's mode: retrieval every
    stride tokens and the mode's layout, the same numbers as `flashback eval` on the same tokens, with the passages
    it used in `retrievals`. The first token has no log-probability; before the first target there is no query."""
    from flashback.config import EvalConfig
    from flashback.evaluate import ModeSpec, evaluate
    from flashback.text.corpus import Document

    ids = tiny_lm.tokenizer(HELD_OUT, add_special_tokens=False)["input_ids"]
    body = {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0, "mode": mode}
    r = httpx.post(f"{server}/v1/completions", json={**body, "stride": 8, "query_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    logprobs = data["choices"][0]["logprobs"]
    scored = logprobs["token_logprobs"][: len(ids)]
    assert scored[0] is None and all(v is not None and v <= 0 for v in scored[1:])
    tops = logprobs["top_logprobs"][1 : len(ids)]
    assert all(len(top) <= 2 and max(top.values()) >= v for top, v in zip(tops, scored[1:], strict=True))
    spec = ModeSpec.parse({"none": "none", "prepend": "prepend", "append": "append+markers"}[mode])
    cfg = EvalConfig(stride=8, query_tokens=8, tail=4)
    (want,) = evaluate(tiny_lm, [Document("held", "held out", HELD_OUT)], Index.load(tiny_index_dir), [spec], cfg)
    full = range(8, len(ids) - 8 + 1, 8)  # eval's targets: whole strides only
    got = [-v for p in full for v in scored[p : p + 8]]
    assert len(got) == want.tokens and sum(got) / len(got) == pytest.approx(want.nll, abs=1e-5)
    positions = [x["position"] for x in data["retrievals"] if "position" in x]
    assert positions == list(range(8, len(ids), 8))  # the last, shorter target too
    assert any(x["passages"] for x in data["retrievals"] if "position" in x) == (mode != "none")


def test_max_length_is_checked_in_the_requests_terms(server):
    """A max_length that leaves no room is refused naming the request's field, not eval's command-line flag; one
    sent without echo scoring is refused instead of ignored."""
    body = {"prompt": "A kludge keeps working", "max_tokens": 1, "echo": True, "logprobs": 1, "max_length": 40}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("max_length 40 leaves too little room") and "--" not in message, message
    r = httpx.post(f"{server}/v1/completions", json={**body, "echo": False, "max_length": 256}, timeout=60)
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"], r.text


def test_stop_sequence(server):
    full = httpx.post(f"{server}/v1/completions", json={"prompt": "A kludge", "max_tokens": 30}, timeout=60).json()
    text = full["choices"][0]["text"]
    stop = text[5:8]
    assert stop and stop in text
    cut = httpx.post(
        f"{server}/v1/completions", json={"prompt": "A kludge", "max_tokens": 30, "stop": [stop]}, timeout=60
    ).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    done = client.completions.create(model=client.models.list().data[0].id, prompt="A hacker is", max_tokens=12)
    assert done.choices[0].text and done.usage.completion_tokens == 12
    pieces = client.completions.create(model=done.model, prompt="A hacker is", max_tokens=12, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": "x", "mode": "sideways"}, 400, "mode"),
        ({"prompt": 3}, 400, "prompt"),
        ({"max_tokens": 5}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10_000}, 400, "at most 64"),
        ({"prompt": "word " * 400}, 400, "limit is 200"),
        ({"prompt": "  "}, 400, "empty"),
        ({"prompt": "x", "index": "/etc"}, 400, "index"),
        ({"prompt": "x", "model": "gpt-4"}, 400, "not served"),
        ({"prompt": "x", "stride": 0}, 400, "stride"),
    ],
)
def test_bad_requests(server, body, status, message):
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_invalid_json(server):
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "number too long"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_json_the_parser_refuses_is_named(server, content, message):
    r = httpx.post(f"{server}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_bounded_load(server):
    """50 requests, 8 at a time: some streaming, some hanging up early; all well-formed, server healthy."""

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, float]:
        body = {
            "prompt": f"Request {i}: garbage collection",
            "max_tokens": 16 + i % 8,
            "stride": 8,
            "mode": ("append", "prepend", "none")[i % 3],
        }
        start = time.perf_counter()
        if i % 5 == 4:  # hang up after the first chunk
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        json.loads(line[6:])
                        break
            return "dropped", time.perf_counter() - start
        if i % 2:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            last = json.loads(lines[-2][6:])
            assert last["usage"]["completion_tokens"] == body["max_tokens"] or last["choices"][0]["finish_reason"]
            return "stream", time.perf_counter() - start
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        return "whole", time.perf_counter() - start

    async def main():
        limit = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:

            async def bounded(i):
                async with limit:
                    return await one(client, i)

            start = time.perf_counter()
            results = await asyncio.gather(*(bounded(i) for i in range(50)))
            return results, time.perf_counter() - start

    results, wall = asyncio.run(main())
    latencies = sorted(t for _, t in results)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(
        f"\nload test: 50 requests, 8 concurrent: {50 / wall:.1f} req/s, "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"kinds {dict((k, sum(1 for r, _ in results if r == k)) for k in ('whole', 'stream', 'dropped'))}"
    )
    assert len(results) == 50
    deadline = time.time() + 10
    while (health := httpx.get(f"{server}/health").json())["active"] and time.time() < deadline:
        time.sleep(0.05)  # dropped streams are released as soon as the server sees the hang-up
    assert health["status"] == "ok" and health["active"] == 0


def test_stop_filter_holds_back_a_stop_string_split_across_pieces():
    from flashback.server import StopFilter

    f = StopFilter(["END", "zz"])
    assert f.push("abc E") == "abc "  # "E" might begin "END": held back
    assert f.push("N") == ""
    assert f.push("D and more") == "" and f.stopped
    assert f.flush() == ""
    g = StopFilter("END")
    assert g.push("abc E") == "abc " and g.push("x") == "Ex" and not g.stopped
    assert g.push("tail E") == "tail " and g.flush() == "E"


def test_stop_filter_matches_a_naive_search_on_random_text():
    """The incremental (KMP) matcher agrees with str.find on text built to contain near-misses."""
    import random

    from flashback.server import StopFilter

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
        f, sent = StopFilter(stops), ""
        for i in range(0, len(text), 3):
            sent += f.push(text[i : i + 3])
            if f.stopped:
                break
        sent += f.flush()
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
        assert sent == text[:cut] and f.stopped == (cut < len(text)), (stops, text)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
        ({"prompt": "x", "stop": "s" * 300}, "at most 256 characters"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty is not supported"),
        ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias is not supported"),
        ({"prompt": "x", "suffix": "tail"}, "suffix is not supported"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": ["one", "word " * 400]}, "limit is 200"),  # a batch is refused if one of its prompts is
        ({"prompt": [1, 2, 99999]}, "token ids"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "a \ud800 b"}, "not valid Unicode"),
        ({"prompt": "word " * 40, "mode": "prepend", "k": 16, "stride": 1, "max_tokens": 64}, "would compute up to"),
    ],
)
def test_hostile_or_unsupported_requests_get_a_400(server, body, message):
    content = json.dumps(body).encode()  # ASCII with escapes: a lone surrogate travels as "\ud800"
    r = httpx.post(f"{server}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_oversized_and_undecodable_bodies_get_openai_errors(server):
    big = json.dumps({"prompt": "x" * 300_000}).encode()  # the fixture allows 200,000 bytes
    r = httpx.post(f"{server}/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunks():  # no content-length: counted while it streams in
        for _ in range(40):
            yield b" " * 10_000

    r = httpx.post(f"{server}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        f"{server}/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and set(r.json()) == {"error"}


def test_extreme_sampling_settings_complete(server):
    for body in (
        {"prompt": "A kludge", "max_tokens": 4, "temperature": 1e-300, "mode": "none"},
        {"prompt": "A kludge", "max_tokens": 4, "temperature": 0.7, "seed": 2**64 - 1},
    ):
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text


def test_health_names_no_paths_and_docs_are_off(server):
    health = httpx.get(f"{server}/health").json()
    assert "/" not in json.dumps(health.get("adapters", {}))
    assert httpx.get(f"{server}/docs").status_code == 404
    assert httpx.get(f"{server}/openapi.json").status_code == 404


def test_an_expensive_request_does_not_starve_a_cheap_one(tiny_lm, tiny_index_dir, monkeypatch):
    """Fair by work: while a prepend request recomputes ~400 tokens per token (in chunks of --prefill-chunk), a
    16-token request runs to completion before the expensive one gets more than the step it was already running
    (scheduled by steps, it would get one step per step of the cheap request: 17). The order is recorded on the
    model thread, as the steps execute."""
    from flashback.server import CompletionService, Generation

    order: list[str] = []
    heavy_work: list[int] = []
    step = Generation.step

    def recorded(self):
        order.append("light" if self.req.mode == "none" else "heavy")
        before = self.priority
        out = step(self)
        if order[-1] == "heavy":
            heavy_work.append(self.priority - before)
        return out

    monkeypatch.setattr(Generation, "step", recorded)

    async def main():
        service = CompletionService(tiny_lm, IndexRetriever(Index.load(tiny_index_dir)), ServerLimits(), True, 4)
        heavy_started = asyncio.Event()
        words = "garbage collection memory program socket server port lambda function unicode hacker kludge"
        heavy_body = {"prompt": words, "mode": "prepend", "k": 16, "stride": 1, "max_tokens": 64, "stream": True}
        heavy = asyncio.create_task(consume(service, {**heavy_body, "query_tokens": 512}, heavy_started))
        await heavy_started.wait()
        await consume(service, {"prompt": "A socket", "max_tokens": 16, "mode": "none", "stream": True})
        await heavy
        service.scheduler.close()

    asyncio.run(main())
    first, last = order.index("light"), len(order) - 1 - order[::-1].index("light")
    assert order.count("light") == 16 and order.count("heavy") >= 64  # 64 tokens, their prefills in chunks
    assert sum(heavy_work) > 64 * 300, heavy_work  # every heavy token recomputes 16 passages + prompt + output
    assert max(heavy_work) <= ServerLimits().prefill_chunk, heavy_work  # a step never computes more than a chunk
    assert order[first : last + 1].count("heavy") == 0, order


@pytest.mark.parametrize("compile", [False, True])  # True: the compiled decode step, one per mode, in the server
def test_the_append_adapter_never_touches_none_or_prepend_requests(
    tiny_model_dir, tiny_index_dir, adapter_dir, compile
):
    from fastapi.testclient import TestClient

    from flashback.config import GenerationConfig
    from flashback.engines.torch import load_model
    from flashback.generate import generate

    served = load_model(str(tiny_model_dir), adapters={"append": str(adapter_dir)}, compile=compile)
    plain = load_model(str(tiny_model_dir), markers=True)
    retriever = IndexRetriever(Index.load(tiny_index_dir))
    prompt = "A lambda expression creates"
    ids = plain.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    app = create_app(served, retriever, markers=True, tail=3)
    with TestClient(app) as client:
        got = {
            mode: client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "mode": mode}).json()
            for mode in ("append", "none", "prepend", "append", "none")  # interleaved modes on one model
        }
        assert client.get("/health").json()["adapters"] == {"append": "append"}
    for mode in ("none", "prepend"):
        want = generate(plain, ids, retriever, GenerationConfig(mode=mode, max_new_tokens=12, markers=False))
        assert got[mode]["choices"][0]["text"] == want.text, mode
    tuned = generate(served, ids, retriever, GenerationConfig(mode="append", max_new_tokens=12, tail=3))
    untuned = generate(plain, ids, retriever, GenerationConfig(mode="append", max_new_tokens=12, tail=3))
    assert got["append"]["choices"][0]["text"] == tuned.text != untuned.text
    assert set(served._decoders) == ({"append", None} if compile else set())


def test_openai_client_defaults_logprobs_echo_and_usage(server, tiny_lm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    common = dict(
        model=tiny_lm.name,
        max_tokens=6,
        presence_penalty=0,
        frequency_penalty=0,
        best_of=1,
        logit_bias={},
        n=1,
        extra_body={"mode": "none"},
    )
    done = client.completions.create(prompt=["A hacker is"], logprobs=2, **common)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == 6 == len(lp.token_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    # greedy: each chosen token is the most likely one (two ids may decode to the same text, hence <= 2)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2 and chosen == pytest.approx(max(top.values()), abs=1e-5)
    assert lp.text_offset[0] == 0
    echoed = client.completions.create(prompt="A hacker is", echo=True, logprobs=0, **common)
    text = echoed.choices[0].text
    assert text.startswith("A hacker is") and text[len("A hacker is") :] == done.choices[0].text
    assert echoed.choices[0].logprobs.token_logprobs[0] is None and echoed.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(prompt="A hacker is", stream=True, stream_options={"include_usage": True}, **common)
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in chunks[:-1]) == done.choices[0].text
    ids = tiny_lm.tokenizer("A hacker is", add_special_tokens=False)["input_ids"]
    by_ids = client.completions.create(prompt=ids, **common)
    assert by_ids.choices[0].text == done.choices[0].text


def test_langchain_openai_completions_client(server, tiny_lm):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.OpenAI(
        base_url=f"{server}/v1", api_key="unused", model=tiny_lm.name, max_tokens=8, temperature=0
    )
    text = llm.invoke("A kludge is")
    streamed = "".join(llm.stream("A kludge is"))
    assert isinstance(text, str) and text and streamed == text


def test_sigterm_ends_open_streams_and_answers_waiting_requests_at_once(tiny_model_dir, tiny_index_dir, tmp_path):
    """A model without an end-of-text token streams until max_tokens; SIGTERM must not wait for it. With
    --max-active 2, two streams run and two requests wait for a slot: the streams end cleanly, the waiting requests
    get an OpenAI-shaped 503 at once (not a plain-text 500 after the grace period), and nothing logs a traceback."""
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    endless = tmp_path / "endless"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.eos_token_id = config.bos_token_id = None
    config.max_position_embeddings = 8192
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config).save_pretrained(endless)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.eos_token = None
    tok.save_pretrained(endless)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashback.cli", "serve", "--no-warm-up", "--model", str(endless)]
        + ["--index", str(tiny_index_dir), "--port", str(port), "--max-tokens", "8000", "--max-active", "2"]
        + ["--shutdown-grace", "5", "--no-adapter"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    body = {"prompt": "A socket", "max_tokens": 8000, "mode": "none"}
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with (
            httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as first,
            httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as second,
            ThreadPoolExecutor(2) as pool,
        ):
            lines = [r.iter_lines() for r in (first, second)]
            for stream in lines:
                assert next(line for line in stream if line.startswith("data: "))
            waiting = [pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60) for _ in range(2)]
            while httpx.get(f"{url}/health", timeout=5).json()["waiting"] < 2:
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            refused = [w.result() for w in waiting]
            refused_after = time.monotonic() - start
            rests = [[line for line in stream if line.startswith("data: ")] for stream in lines]
        assert time.monotonic() - start < 15, "still streaming long after SIGTERM"
        for rest in rests:  # the streams end: no cut connection
            assert rest[-1] == "data: [DONE]" and "shutting down" in rest[-2], rest[-3:]
        for r in refused:
            assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
            assert "shutting down" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
        assert refused_after < 4, f"the waiting requests were answered {refused_after:.1f} s after SIGTERM"
        assert proc.wait(timeout=30) == 143  # the model thread finished its step: no abort
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and "terminate called" not in err, err[-2000:]
    finally:
        proc.kill()


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def test_adversarial_load(roomy_server):
    """Bounded (loopback, 6 background clients, 120 requests): hostile, expensive, streaming and hanging-up
    requests in the background while normal 16-token requests run one after another in the foreground.

    Asserted: no 5xx, every answer well-formed (200/400/413 with an OpenAI error), /health always answers,
    nothing left active. Printed (for the README, run alone): /health latency, the foreground requests'
    latency against idle, RSS before and after.
    """
    import gc

    server = roomy_server
    normal = {"prompt": "A socket binds", "max_tokens": 16, "mode": "append"}
    words = "garbage collection memory program socket server port lambda function unicode hacker kludge"
    background = [
        {"prompt": words, "mode": "prepend", "k": 16, "stride": 1, "max_tokens": 32, "query_tokens": 512},
        {"prompt": "x", "stop": ["s" * 256] * 4, "max_tokens": 32},  # the largest stop list allowed
        {"prompt": "x", "stop": ["s" * 400_000] * 8},  # 3.2 MB: refused before it is parsed
        {"prompt": "x" * 150_000},  # under the body limit, over the prompt limit
        {"prompt": "a \ud800 b"},
        {**normal, "stream": True, "hang_up": True},
        {**normal, "stream": True},
    ]

    def idle_latency() -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            assert httpx.post(f"{server}/v1/completions", json=normal, timeout=60).status_code == 200
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    idle = idle_latency()
    gc.collect()
    rss_before = _rss_mb()

    async def main():
        health_times: list[float] = []
        normal_times: list[float] = []
        statuses: list[int] = []
        done = asyncio.Event()

        async with httpx.AsyncClient(base_url=server, timeout=120) as client:

            async def watch_health():
                while not done.is_set():
                    start = time.perf_counter()
                    r = await client.get("/health")
                    assert r.status_code == 200
                    health_times.append(time.perf_counter() - start)
                    await asyncio.sleep(0.05)

            async def foreground():
                while not done.is_set():
                    start = time.perf_counter()
                    r = await client.post("/v1/completions", json=normal)
                    assert r.status_code == 200
                    normal_times.append(time.perf_counter() - start)

            async def one(body: dict):
                body = dict(body)
                if body.pop("hang_up", False) or body.get("stream"):
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and "hang_up" in str(body):
                                break
                    statuses.append(r.status_code)
                    return
                content = json.dumps(body).encode()
                r = await client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
                statuses.append(r.status_code)
                if r.status_code != 200:
                    assert set(r.json()) == {"error"} and r.json()["error"]["message"]

            async def worker(w: int):
                for i in range(20):
                    await one(background[(w + i) % len(background)])

            tasks = [asyncio.create_task(watch_health()), asyncio.create_task(foreground())]
            start = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(6))), timeout=300)
            wall = time.perf_counter() - start
            done.set()
            await asyncio.gather(*tasks)
        return health_times, normal_times, statuses, wall

    health_times, normal_times, statuses, wall = asyncio.run(main())
    assert len(statuses) == 120 and normal_times
    assert all(s < 500 for s in statuses) and set(statuses) <= {200, 400, 413}, sorted(set(statuses))
    deadline = time.time() + 10
    while (health := httpx.get(f"{server}/health").json())["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert health["active"] == 0 and health["status"] == "ok"
    gc.collect()
    rss_after = _rss_mb()
    print(
        f"\nadversarial load: 120 background requests from 6 clients in {wall:.1f} s, statuses "
        f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }; /health max {max(health_times) * 1000:.0f} ms "
        f"(p50 {statistics.median(health_times) * 1000:.0f} ms, {len(health_times)} probes); normal 16-token "
        f"request idle {idle * 1000:.0f} ms, under load p50 {statistics.median(normal_times) * 1000:.0f} ms, max "
        f"{max(normal_times) * 1000:.0f} ms ({statistics.median(normal_times) / idle:.1f}x idle, "
        f"{len(normal_times)} requests); RSS {rss_before:.0f} -> {rss_after:.0f} MB"
    )


def test_serve_upstream_keeps_a_request_in_flight_per_generation(tiny_lm, tiny_index_dir):
    """serve --upstream: each admitted generation waits on its own engine request, so two requests reach the
    engine at once (which batches them). The fake engine answers only when two requests wait together: one model
    thread would hold the first request there alone until the barrier broke."""
    from concurrent.futures import ThreadPoolExecutor

    from flashback.engines.upstream import Completion, UpstreamEngine
    from flashback.text.tokenize import encode

    barrier = threading.Barrier(2, timeout=30)
    token = encode(tiny_lm.tokenizer, "hello")[0]
    prompts = []

    class TwoAtOnce:
        def complete(self, prompt, n, **options):
            prompts.append(list(prompt))
            barrier.wait()
            return Completion([token] * n, False, len(prompt), 0, 0.0, 0.0)

    lm = UpstreamEngine(
        TwoAtOnce(),
        tokenizer=tiny_lm.tokenizer,
        name="upstream-fake",
        marker_ids=tiny_lm.marker_ids,
        eos_ids=set(tiny_lm.eos_ids),
        max_positions=512,
    )
    retriever = IndexRetriever(Index.load(tiny_index_dir))
    running = serve_in_thread(create_app(lm, retriever, ServerLimits(max_active=2), True, 4))
    base = next(running)
    try:
        bodies = [
            {"prompt": "A lambda expression", "max_tokens": 4, "mode": "none"},
            {"prompt": "Garbage collection frees", "max_tokens": 4, "mode": "append", "stride": 4},
        ]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{base}/v1/completions", json=b, timeout=60), bodies))
    finally:
        next(running, None)
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in answers)
    assert len(prompts) == 2 and barrier.n_waiting == 0 and not barrier.broken


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "16"), ("max_tokens", True), ("logprobs", True), ("k", "3"), ("prompt", [3.0]), ("echo", 1)],
)
def test_request_types_are_strict(server, field, value):
    """OpenAI's types, not coercions: a string, a boolean or a float where an integer belongs is a 400."""
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 2, field: value}, timeout=30)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_a_nan_temperature_is_named_as_such(server):
    content = b'{"prompt": "x", "temperature": NaN}'
    r = httpx.post(f"{server}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text


def test_no_path_of_this_machine_reaches_a_client(monkeypatch, tiny_model_dir, corpus_file, tmp_path):
    """Served by its absolute path, the model is named after its folder; documents indexed from an absolute folder
    carry ids relative to it, so neither /health, /v1/models, answers nor retrievals show where files lie."""
    from flashback.cli import main

    from .conftest import serve_app

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "sockets.txt").write_text(TOPICS_TEXT)
    index = tmp_path / "idx"
    assert main(["index", str(docs.resolve()), "--out", str(index), "--model", str(tiny_model_dir), "--quiet"]) == 0
    app = serve_app(monkeypatch, "--model", Path(tiny_model_dir).resolve(), "--index", index)
    running = serve_in_thread(app)
    base = next(running)
    try:
        seen = [httpx.get(f"{base}/health").text, httpx.get(f"{base}/v1/models").text]
        body = {"prompt": "A server socket binds to a port", "max_tokens": 4, "stride": 2}
        seen.append(httpx.post(f"{base}/v1/completions", json=body, timeout=60).text)
        seen.append(httpx.post(f"{base}/v1/completions", json={**body, "model": "/etc"}, timeout=60).text)
    finally:
        next(running, None)
    assert all(str(tmp_path) not in text and str(Path(tiny_model_dir).parent) not in text for text in seen), seen
    assert '"docs/sockets.txt' in seen[2] and json.loads(seen[0])["model"] == Path(tiny_model_dir).name


def test_a_hung_up_stream_stops_its_generation():
    """The response task of a client that hangs up is cancelled (as Starlette does, with every await inside cancelled
    too): the stream's generations must stop at once, not run to max_tokens holding their slot."""
    import anyio

    from flashback.server.protocol import Choice, CompletionRequest, Step, events

    pulled, closed = [], asyncio.Event()

    async def generation():
        try:
            for i in range(50):
                await asyncio.sleep(0.01)
                pulled.append(i)
                yield Step("x", [1], [], [], None, 1)
        finally:
            closed.set()

    async def scenario():
        choice = Choice(0, generation())
        await choice.start()
        stream = events([choice], CompletionRequest(prompt="x", stream=True), "id", 0, "m")

        async def client():
            async for _ in stream:
                pass

        async with anyio.create_task_group() as group:  # level-triggered: every await in the scope is cancelled
            group.start_soon(client)
            await asyncio.sleep(0.05)
            group.cancel_scope.cancel()  # the client hung up
        await asyncio.wait_for(closed.wait(), 2)
        return len(pulled)

    assert asyncio.run(scenario()) < 20


def test_a_batch_shares_one_work_budget(server):
    """--max-request-work bounds a request, not each of its prompts: a batch's prompts share it."""
    body = {"prompt": "A socket is", "mode": "prepend", "k": 16, "stride": 1, "max_tokens": 64}
    alone = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
    assert alone.status_code == 200, alone.text
    batch = httpx.post(f"{server}/v1/completions", json={**body, "prompt": ["A socket is"] * 2}, timeout=120)
    assert batch.status_code == 400 and "for each prompt of this batch" in batch.json()["error"]["message"]


def test_a_cheap_request_does_not_wait_behind_prefills_that_have_not_finished(tiny_lm, tiny_index_dir, monkeypatch):
    """Three prepend requests with long prefills (16 passages), then a 16-token request: their prefills run a chunk
    at a time and a new request starts a chunk ahead of them, so the cheap request runs to its end with no chunk of
    theirs in between (behind three prefills, or a chunk of each, before)."""
    from flashback.server import CompletionService

    order = record_steps(monkeypatch)

    async def main():
        limits = ServerLimits(prefill_chunk=64)
        service = CompletionService(tiny_lm, IndexRetriever(Index.load(tiny_index_dir)), limits, True, 4)

        words = "garbage collection memory program socket server port lambda function unicode hacker kludge " * 4
        heavy = {"prompt": words, "mode": "prepend", "k": 16, "max_tokens": 1, "stream": True, "query_tokens": 512}
        started = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(consume(service, heavy, event)) for event in started]
        await asyncio.gather(*(event.wait() for event in started))  # each has computed its first chunk
        await consume(service, {"prompt": "A socket", "max_tokens": 16, "mode": "none", "stream": True})
        await asyncio.gather(*tasks)
        service.scheduler.close()

    asyncio.run(main())
    first, last = order.index("light"), len(order) - 1 - order[::-1].index("light")
    assert order.count("light") == 16 and order.count("heavy") > 3 * 6  # each prefill took several chunks
    assert order[first : last + 1].count("heavy") == 0, order


def test_long_requests_arriving_do_not_cut_into_a_running_cheap_one(tiny_lm, tiny_index_dir, monkeypatch):
    """A 48-token request, the second of two back to back (so past its credit, at the clock), is decoding when three
    prepend requests with long prefills arrive: they start a chunk behind the clock, so the cheap one runs to its end
    first (starting at the clock, each would get a chunk in between)."""
    from flashback.server import CompletionService

    order = record_steps(monkeypatch, light_sleep=0.005)  # slow enough for the long requests to arrive meanwhile
    open_ = CompletionService.open

    def opened(self, req, *args):
        order.append("open" if req.mode == "prepend" else "light open")
        return open_(self, req, *args)

    monkeypatch.setattr(CompletionService, "open", opened)

    async def main():
        limits = ServerLimits(prefill_chunk=64)
        service = CompletionService(tiny_lm, IndexRetriever(Index.load(tiny_index_dir)), limits, True, 4)

        words = "garbage collection memory program socket server port lambda function unicode hacker kludge " * 8
        heavy = {"prompt": words, "mode": "prepend", "k": 16, "max_tokens": 1, "stream": True, "query_tokens": 512}
        cheap = {"prompt": "A socket", "max_tokens": 48, "mode": "none", "stream": True}
        await consume(service, cheap)  # uses the credit: the next one runs at the clock (Scheduler.arrival)
        order.clear()
        decoding = asyncio.Event()
        light = asyncio.create_task(consume(service, cheap, decoding))
        await decoding.wait()
        await asyncio.gather(light, *(consume(service, heavy) for _ in range(3)))
        service.scheduler.close()

    asyncio.run(main())
    last = len(order) - 1 - order[::-1].index("light")
    assert order.count("light") == 48 and order.count("heavy") > 3 * 6  # the prefills took several chunks
    assert order[:last].count("open") == 3, order  # all three arrived while it decoded
    assert order[:last].count("heavy") == 0, order


def test_new_generations_go_first_but_never_starve_queued_ones():
    """A new generation starts a chunk of work below the clock, ahead of every queued step; what it computes there
    moves the clock on, so cheap requests arriving back to back still let a queued expensive one through."""
    import threading

    from flashback.server.protocol import Step
    from flashback.server.scheduler import Scheduler

    scheduler = Scheduler(credit=256)
    order: list[str] = []
    arrived = threading.Event()

    class Heavy:  # 256 positions a step
        priority = scheduler.arrival()

        def step(self) -> Step:
            if order.count("heavy") == 3:
                arrived.wait(10)  # the cheap requests arrive while this step runs
            order.append("heavy")
            self.priority += 256
            return Step("", [], [], [], None)

    class Cheap:  # 40 requests one after another, each 10 steps of 15 positions, arriving as the last one ends
        priority, request, steps = scheduler.arrival(), 0, 0

        def step(self) -> Step:
            order.append(f"cheap{self.request}")
            self.priority += 15
            self.steps += 1
            if self.steps % 10 == 0:
                self.request += 1
                self.priority = scheduler.arrival()
            return Step("", [], [], [], "length" if self.request == 40 else None)

    async def main():
        heavy = scheduler.stream(Heavy())
        for _ in range(3):
            await heavy.next()
        cheap = scheduler.stream(Cheap())
        arrived.set()
        while (await cheap.next()).finish is None:
            pass
        scheduler.close()

    asyncio.run(main())
    first = order.index("cheap0")
    during = order[first : len(order) - order[::-1].index("cheap39")]
    assert during[:10] == ["cheap0"] * 10, order  # the first runs ahead of the queued step
    assert 5 <= during.count("heavy") <= 25, during  # the queued one still moves, every few cheap requests


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length, read from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(rest) < length:
        rest += sock.recv(4096)
    return data


def _trickled(sock: socket.socket, piece: bytes, every: float, within: float = 20) -> bytes:
    """Send `piece` every `every` seconds until the server answers or closes (what it sent; b"" when it closed
    without a word); fails after `within` seconds."""
    sock.settimeout(every)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            sock.sendall(piece)
            return sock.recv(100)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return b""
    raise AssertionError(f"still open after {within} s of trickling")


def test_slow_clients_are_cut_off(tiny_lm, tiny_index_dir):
    """--read-timeout: a connection that sends no complete request headers is closed, on its first request or a later
    one; a body that stops coming, or comes too slowly, gets a 408; none holds anything for long. A normal request on
    the same server is unaffected."""
    import dataclasses

    from flashback.server import server_config

    limits = dataclasses.replace(LIMITS, read_timeout_s=1.0)
    app = create_app(tiny_lm, IndexRetriever(Index.load(tiny_index_dir)), limits, True, 4)
    port = free_port()
    srv = uvicorn.Server(server_config(app, "127.0.0.1", port, limits, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        headers = socket.create_connection(("127.0.0.1", port), timeout=10)
        headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        start = time.monotonic()
        assert headers.recv(100) == b"" and time.monotonic() - start < 8  # closed by the server
        body = socket.create_connection(("127.0.0.1", port), timeout=10)
        body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        body.sendall(b'Content-Length: 100\r\n\r\n{"prompt": ')  # then nothing
        assert body.recv(100).startswith(b"HTTP/1.1 408")
        trickle = socket.create_connection(("127.0.0.1", port), timeout=10)  # a body that keeps coming, too slowly
        trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        assert _trickled(trickle, b"x", every=0.3).startswith(b"HTTP/1.1 408")  # the whole body is bounded
        steady = socket.create_connection(("127.0.0.1", port), timeout=10)  # slow but steady (20 KB/s): accepted
        payload = b'{"prompt": "A kludge", "max_tokens": 2}' + b" " * 60_000
        steady.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        steady.sendall(b"Content-Length: %d\r\n\r\n" % len(payload))
        start = time.monotonic()
        for at in range(0, len(payload), 8_000):
            steady.sendall(payload[at : at + 8_000])
            time.sleep(0.4)
        assert time.monotonic() - start > 2 * limits.read_timeout_s  # longer than the timeout alone allows
        assert _response(steady).startswith(b"HTTP/1.1 200")
        again = socket.create_connection(("127.0.0.1", port), timeout=10)  # keep-alive: the second request's headers
        again.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(again).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert _trickled(again, b"X-Slow: 1\r\n", every=0.3) == b"" and time.monotonic() - start < 8
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "A kludge", "max_tokens": 4})
        assert ok.status_code == 200, ok.text
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_api_keys_guard_every_route_but_health_and_keep_each_keys_prefix_cache_apart(tiny_lm, tiny_index_dir):
    """serve --api-key: without a valid key a 401 in OpenAI's shape (before the body is read: a huge body is not a
    413); /health stays open. A victim's prompt cached under one key gives another key's client cached_tokens 0 for
    the same text, so the prompt cannot be probed digit by digit; the same key with another cache_salt neither."""
    app = create_app(
        tiny_lm, IndexRetriever(Index.load(tiny_index_dir)), LIMITS, True, 4, api_keys=("alpha-key", "beta-key")
    )
    alpha, beta = ({"Authorization": f"Bearer {k}"} for k in ("alpha-key", "beta-key"))
    for url in serve_in_thread(app):
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "alpha-key"}):
            r = httpx.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            assert r.headers["www-authenticate"] == "Bearer"
        huge = httpx.post(f"{url}/v1/completions", content=b"x" * 300_000, headers={"Content-Type": "text/plain"})
        assert huge.status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=beta).status_code == 200
        body = {"prompt": "My bank PIN is 4821 and my account is at the main branch", "max_tokens": 2, "mode": "none"}
        completions = f"{url}/v1/completions"
        assert _cached_tokens(completions, body, alpha) == 0  # the victim
        assert _cached_tokens(completions, body, beta) == 0  # another key: nothing to learn
        assert _cached_tokens(completions, {**body, "cache_salt": "tenant-2"}, alpha) == 0  # the same key, another salt
        assert _cached_tokens(completions, body, alpha) > 0  # the victim's own next request still reuses its cache
    tiny_lm.forget()


def _cached_tokens(url: str, body: dict, headers: dict) -> int:
    r = httpx.post(url, json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_chat_requests_run_the_chat_adapter_and_completions_the_text_one(
    tiny_model_dir, tiny_index_dir, adapter_dir, tmp_path
):
    """`serve` with a text and a chat adapter for append mode: a completion generates what an engine holding only the
    text adapter generates, a chat what one holding only the chat adapter generates for that chat (its tail too);
    /health names both. A request whose endpoint has no adapter of its own takes the other's."""
    from fastapi.testclient import TestClient

    from flashback.config import GenerationConfig
    from flashback.engines.torch import load_model
    from flashback.engines.torch.adapters import plan_adapters
    from flashback.generate import Trace, generate, stream
    from flashback.text.chat_template import render

    from .conftest import random_adapter
    from .test_chat import CHATML, QUESTION

    chat_adapter = random_adapter(str(tiny_model_dir), tmp_path / "chat", 0.6, tail=5, endpoint="chat")
    plan = plan_adapters(str(tiny_model_dir), [str(adapter_dir), str(chat_adapter)])
    assert plan == {"append": str(adapter_dir), "append-chat": str(chat_adapter)}
    engines = {}
    alone = {"text": {"append": plan["append"]}, "chat": {"append-chat": plan["append-chat"]}}
    for name, adapters in {"both": plan, **alone}.items():
        engines[name] = load_model(str(tiny_model_dir), adapters=adapters)
        engines[name].tokenizer.chat_template = CHATML
    retriever = IndexRetriever(Index.load(tiny_index_dir))
    prompt, messages = "A lambda expression creates", [QUESTION]
    app = create_app(engines["both"], retriever, markers=True, tail=3)  # chats: the chat adapter's card's layout
    with TestClient(app) as client:
        completion = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "stride": 4}).json()
        body = {"messages": messages, "max_tokens": 12, "stride": 4}
        chat = client.post("/v1/chat/completions", json=body).json()
        health = client.get("/health").json()
    assert health["adapters"] == {"append": "append", "append-chat": "chat"} and health["chat_tail"] == 5
    ids = engines["text"].tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cfg = GenerationConfig(mode="append", max_new_tokens=12, stride=4, tail=3)
    assert completion["choices"][0]["text"] == generate(engines["text"], ids, retriever, cfg).text

    def answer(engine, tail: int) -> str:
        chat_ids, question = render(engine.tokenizer, messages, 32)
        gen = GenerationConfig(mode="append", max_new_tokens=12, stride=4, tail=tail)
        tokens = list(stream(engine, chat_ids, retriever, gen, Trace("append"), question=question))
        return engine.tokenizer.decode(tokens, skip_special_tokens=True)

    assert chat["choices"][0]["message"]["content"] == answer(engines["chat"], 5) != answer(engines["text"], 5)
    text_only = create_app(engines["text"], retriever, markers=True, tail=3)  # no chat adapter: chats take the text one
    with TestClient(text_only) as client:
        chat = client.post("/v1/chat/completions", json=body).json()
    assert chat["choices"][0]["message"]["content"] == answer(engines["text"], 3)


def test_adapters_given_for_a_mode_replace_the_shipped_ones_of_both_endpoints(tiny_model_dir, adapter_dir, tmp_path):
    """The default model's plan holds its shipped text and chat adapters; an adapter given for append replaces both
    (serving both endpoints unless one is given for each); a command that serves one endpoint loads only the
    adapters that serve it."""
    from flashback.config import EngineConfig
    from flashback.engines.load import plan_adapters as plan_for
    from flashback.engines.torch.adapters import plan_adapters
    from flashback.errors import FlashbackError
    from flashback.registry import SHIPPED_ADAPTERS

    from .conftest import random_adapter

    shipped = {slot: str(path) for (model, slot), path in SHIPPED_ADAPTERS.items() if model == "smollm2-135m"}
    assert set(shipped) == {"append", "append-chat"} and plan_adapters(None) == shipped
    chat = str(random_adapter(str(tiny_model_dir), tmp_path / "chat", 0.6, endpoint="chat"))
    assert plan_adapters(None, [str(adapter_dir)]) == {"append": str(adapter_dir)}
    assert plan_adapters(None, [chat]) == {"append-chat": chat}
    with pytest.raises(FlashbackError, match="two chat adapters for append mode"):
        plan_adapters(None, [chat, chat])
    both = EngineConfig(model=str(tiny_model_dir), adapters=(str(adapter_dir), chat))
    assert plan_for(both, ["append"], chat=True) == {"append-chat": chat}
    assert plan_for(both, ["append"], chat=False) == {"append": str(adapter_dir)}
    assert plan_for(both, None, chat=None) == {"append": str(adapter_dir), "append-chat": chat}
    text = EngineConfig(model=str(tiny_model_dir), adapters=(str(adapter_dir),))
    assert plan_for(text, ["append"], chat=True) == {"append": str(adapter_dir)}  # it serves chats too
