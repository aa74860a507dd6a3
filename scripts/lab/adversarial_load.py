"""A bounded adversarial load against a real `flashback serve` process (loopback), with the figures a reader needs.

    python scripts/lab/adversarial_load.py [--model M] [--index DIR] [--seconds 60] [--json FILE]

The server runs alone on the machine (start nothing else). While normal 16-token append requests run one after
another in the foreground, background clients send: expensive prepend requests (16 passages, a long prompt), long
echo scoring (echo + logprobs over a ~1,000-token prompt), streams that hang up after their first event, connections
that never finish their headers, bodies that stop coming, keep-alive connections that trickle their second
request's header lines, bodies trickled a byte at a time, 1 MB chats (25,000 one-letter messages; 1,000 of 950
characters) and hostile bodies (over the limits, malformed). Then every slot holds a stream, two requests wait for
a slot, and the server gets SIGTERM.

Printed, as JSON: every status seen (no 5xx expected) and whether every error came in OpenAI's shape, the normal
request's latency idle and under load (median, max, and the requests that arrived behind an expensive one),
/health's latency, the server's RSS before and after (once the load has ended and the server holds no generation),
and how SIGTERM ended (exit status, whether the open streams ended with [DONE], what the waiting requests got and
when, a traceback in the log or not).
Figures are medians of one run on a shared machine: compare them within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

WORDS = "garbage collection memory program socket server port lambda function unicode hacker kludge thread "
MAX_ACTIVE = 8  # serve's default, given explicitly: the shutdown phase fills every slot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def start_server(args, port: int) -> subprocess.Popen:
    # no background compile at start-up: the latencies measured are the request path's, as in the quoted runs
    cmd = [sys.executable, "-m", "flashback.cli", "serve", "--port", str(port), "--read-timeout", "5", "--no-warm-up"]
    cmd += ["--max-active", str(MAX_ACTIVE)]
    cmd += ["--max-prompt-tokens", "4096"] + (["--model", args.model] if args.model else [])
    cmd += ["--index", args.index] if args.index else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if time.time() > deadline:
            raise SystemExit("the server did not start")


async def slow_headers(port: int, seconds: float) -> str:
    """A connection that sends half its request headers, then nothing: closed by the server, or not."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(100), seconds)
        return "closed" if data == b"" else data.split(b"\r\n")[0].decode()
    except TimeoutError:
        return "still open"
    finally:
        writer.close()


async def slow_body(port: int, seconds: float) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    writer.write(b'Content-Length: 100\r\n\r\n{"prompt": ')
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(100), seconds)
        return data.split(b"\r\n")[0].decode() or "closed"
    except TimeoutError:
        return "still open"
    finally:
        writer.close()


async def trickled_second_request(port: int, every: float, seconds: float) -> str:
    """A keep-alive connection: one whole GET /health, then a second request's header lines, one every `every`
    seconds. "closed after N s" when the server cuts it off, "still open" when it is still reading after `seconds`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        )
        await reader.readexactly(length)
        return await _trickle(reader, writer, b"GET /health HTTP/1.1\r\n", b"X-Slow: 1\r\n", every, seconds)
    finally:
        writer.close()


async def trickled_body(port: int, every: float, seconds: float) -> str:
    """A body declared 100,000 bytes long, sent one byte every `every` seconds: no gap is long, the whole is."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        return await _trickle(reader, writer, head, b"x", every, seconds)
    finally:
        writer.close()


async def _trickle(reader, writer, first: bytes, piece: bytes, every: float, seconds: float) -> str:
    writer.write(first)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            data = await asyncio.wait_for(reader.read(100), every)
        except asyncio.TimeoutError:
            try:
                writer.write(piece)
                await writer.drain()
            except ConnectionError:
                return f"closed after {time.monotonic() - start:.0f} s"
            continue
        what = data.split(b"\r\n")[0].decode() if data else "closed"
        return f"{what} after {time.monotonic() - start:.0f} s"
    return "still open"


def openai_error(r: httpx.Response) -> bool:
    """Whether a refusal came in OpenAI's shape: JSON {"error": {"message", "type", ...}}."""
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return r.headers.get("content-type", "").startswith("application/json") and bool(error.get("message"))


async def load(base: str, port: int, seconds: float) -> dict:
    normal = {"prompt": "A socket binds to a port and", "max_tokens": 16, "mode": "append"}
    expensive = {"prompt": WORDS * 90, "mode": "prepend", "k": 16, "max_tokens": 1}  # ~1,200 tokens + 16 passages
    echo = {"prompt": WORDS * 75, "max_tokens": 1, "echo": True, "logprobs": 1, "mode": "append"}  # ~1,000 tokens
    hostile = [
        {"prompt": "x", "stop": ["s" * 400_000] * 4},  # over the body limit
        {"prompt": "x" * 30_000},  # over the prompt limit
        {"prompt": "x", "max_tokens": "16"},
        {"prompt": "a \ud800 b"},
    ]
    many = {"messages": [{"role": ("user", "assistant")[i % 2], "content": "a"} for i in range(25_000)]}
    long = {"messages": [{"role": ("user", "assistant")[i % 2], "content": WORDS * 10} for i in range(1_000)]}
    statuses: list[int] = []
    misshapen: list[int] = []  # refusals not in OpenAI's shape
    normal_times, behind, health_times, sockets = [], [], [], []
    expensive_open = 0
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:

        async def post(body: dict, route: str = "/v1/completions") -> int:
            r = await client.post(
                route, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
            )
            statuses.append(r.status_code)
            if r.status_code != 200 and not openai_error(r):
                misshapen.append(r.status_code)
            return r.status_code

        async def foreground():
            while not done.is_set():
                was_behind = expensive_open > 0
                start = time.perf_counter()
                await post(normal)
                (behind if was_behind else normal_times).append(time.perf_counter() - start)

        async def health():
            while not done.is_set():
                start = time.perf_counter()
                await client.get("/health")
                health_times.append(time.perf_counter() - start)
                await asyncio.sleep(0.1)

        async def heavy(body: dict):
            nonlocal expensive_open
            expensive_open += 1
            try:
                await post(body)
            finally:
                expensive_open -= 1

        async def hang_up():
            async with client.stream("POST", "/v1/completions", json={**normal, "stream": True}) as r:
                statuses.append(r.status_code)
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break

        tasks = [asyncio.create_task(foreground()), asyncio.create_task(health())]
        await asyncio.sleep(1.0)
        background = [heavy(expensive) for _ in range(3)] + [heavy(echo) for _ in range(2)]
        background += [hang_up() for _ in range(6)] + [post(b) for b in hostile]
        background += [slow_headers(port, 15) for _ in range(20)] + [slow_body(port, 15) for _ in range(10)]
        background += [trickled_second_request(port, 1.0, 30) for _ in range(5)]
        background += [trickled_body(port, 1.0, 30) for _ in range(5)]
        background += [post(chat, "/v1/chat/completions") for chat in (many, long)]
        running = asyncio.gather(*background)
        await asyncio.sleep(seconds)  # the load window: normal requests compete with everything above
        done.set()
        await asyncio.gather(*tasks)
        sockets = [r for r in await running if isinstance(r, str)]  # the expensive ones finish alone
    ms = lambda xs: round(1000 * xs, 1)  # noqa: E731
    return {
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "refusals_not_in_openai_shape": len(misshapen),
        "slow_connections": {s: sockets.count(s) for s in sorted(set(sockets))},
        "normal_ms": {
            "median": ms(statistics.median(normal_times)),
            "max": ms(max(normal_times)),
            "requests": len(normal_times),
        },
        "normal_behind_expensive_ms": {
            "median": ms(statistics.median(behind)) if behind else None,
            "max": ms(max(behind)) if behind else None,
            "requests": len(behind),
        },
        "health_ms": {"median": ms(statistics.median(health_times)), "max": ms(max(health_times))},
    }


def idle_latency(base: str) -> float:
    body = {"prompt": "A socket binds to a port and", "max_tokens": 16, "mode": "append"}
    times = []
    for _ in range(6):
        start = time.perf_counter()
        httpx.post(f"{base}/v1/completions", json=body, timeout=120).raise_for_status()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def settled_rss(pid: int, base: str) -> float:
    """The server's RSS once it holds no generation (its last one ended, so it has handed freed memory back)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        health = httpx.get(f"{base}/health", timeout=10).json()
        if health["active"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.5)
    time.sleep(2)
    return rss_mb(pid)


def sigterm_with_full_slots(proc: subprocess.Popen, base: str) -> dict:
    """Every slot holds an open stream and two requests wait for a slot; then SIGTERM."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    # streams that cannot end on their own before SIGTERM comes: a passage before every token (stride 1, prepend)
    body = {"prompt": WORDS * 20, "max_tokens": 200, "mode": "prepend", "k": 2, "stride": 1}  # within the work limit
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        streams = [
            stack.enter_context(
                httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=300)
            )
            for _ in range(MAX_ACTIVE)
        ]
        for r in streams:
            if r.status_code != 200:
                raise SystemExit(f"a stream of the shutdown phase was refused: {r.status_code} {r.read()[:200]!r}")
        lines = [r.iter_lines() for r in streams]
        for stream in lines:
            next(line for line in stream if line.startswith("data: "))
        waiting = [pool.submit(httpx.post, f"{base}/v1/completions", json=body, timeout=300) for _ in range(2)]
        deadline = time.monotonic() + 300
        while (health := httpx.get(f"{base}/health", timeout=10).json())["waiting"] < 2:
            if time.monotonic() > deadline or health["active"] < MAX_ACTIVE:
                raise SystemExit(f"the slots did not stay full: {health}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        answers = [w.result() for w in waiting]
        answered_s = time.monotonic() - start
        ends = []
        for stream in lines:
            try:
                rest = [line for line in stream if line.startswith("data: ")]
                ends.append("[DONE]" if rest and rest[-1] == "data: [DONE]" else "no [DONE]")
            except httpx.HTTPError as exc:
                ends.append(f"cut: {type(exc).__name__}")
    code = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    return {
        "exit_status": code,
        "streams_end": {e: ends.count(e) for e in sorted(set(ends))},
        "waiting_answers": [
            f"{a.status_code} {a.json()['error']['message'] if openai_error(a) else a.text[:60]}" for a in answers
        ],
        "waiting_answered_s": round(answered_s, 2),
        "seconds": round(time.monotonic() - start, 2),
        "traceback": "Traceback" in err or "terminate called" in err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--index", default=None)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        idle = idle_latency(base)
        rss_before = rss_mb(proc.pid)
        figures = asyncio.run(load(base, port, args.seconds))
        figures["rss_mb"] = {"before": round(rss_before), "after": round(settled_rss(proc.pid, base))}
        figures["normal_idle_ms"] = round(1000 * idle, 1)
        figures["normal_over_idle"] = round(figures["normal_ms"]["median"] / figures["normal_idle_ms"], 2)
        behind = figures["normal_behind_expensive_ms"]["median"]
        figures["behind_expensive_over_idle"] = round(behind / figures["normal_idle_ms"], 2) if behind else None
        print(json.dumps(figures), file=sys.stderr)  # the load's figures, whatever the shutdown phase does
        figures["sigterm"] = sigterm_with_full_slots(proc, base)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
