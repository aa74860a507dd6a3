"""The real server on 127.0.0.1 with a free port, spoken to with httpx and the official openai client."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from flashback.generate import IndexRetriever
from flashback.retrieval import Index
from flashback.server import ServerLimits, create_app

pytest.importorskip("uvicorn")
import uvicorn  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_lm, tiny_index_dir):
    app = create_app(
        tiny_lm,
        IndexRetriever(Index.load(tiny_index_dir)),
        ServerLimits(max_prompt_tokens=200, max_tokens=64, max_active=4),
        markers=True,
        tail=4,
    )
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
    assert models["object"] == "list" and len(models["data"]) == 1


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
    from flashback.generate import GenerationConfig, generate

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
