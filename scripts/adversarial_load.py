"""A bounded adversarial load against a real `flashback serve` process (loopback), with the figures a reader needs.

    python scripts/adversarial_load.py [--model M] [--index DIR] [--seconds 60] [--json FILE]

The server runs alone on the machine (start nothing else). While normal 16-token append requests run one after
another in the foreground, background clients send: expensive prepend requests (16 passages, a long prompt), long
echo scoring (echo + logprobs over a ~1,000-token prompt), streams that hang up after their first event, connections
that never finish their headers, bodies that stop coming, and hostile bodies (over the limits, malformed). Then a
stream is left open and the server gets SIGTERM.

Printed, as JSON: every status seen (no 5xx expected), the normal request's latency idle and under load (median,
max, and the requests that arrived behind an expensive one), /health's latency, the server's RSS before and after
(once the load has ended and the server holds no generation), and how SIGTERM ended (exit status, whether the
open stream ended with [DONE]).
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
    statuses: list[int] = []
    normal_times, behind, health_times, sockets = [], [], [], []
    expensive_open = 0
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:

        async def post(body: dict) -> int:
            r = await client.post(
                "/v1/completions", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
            )
            statuses.append(r.status_code)
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
        running = asyncio.gather(*background)
        await asyncio.sleep(seconds)  # the load window: normal requests compete with everything above
        done.set()
        await asyncio.gather(*tasks)
        sockets = [r for r in await running if isinstance(r, str)]  # the expensive ones finish alone
    ms = lambda xs: round(1000 * xs, 1)  # noqa: E731
    return {
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
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


def sigterm_with_an_open_stream(proc: subprocess.Popen, base: str) -> dict:
    body = {"prompt": "A socket", "max_tokens": 512, "mode": "none", "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        try:
            rest = [line for line in lines if line.startswith("data: ")]
            ended = "[DONE]" if rest and rest[-1] == "data: [DONE]" else "no [DONE]"
        except httpx.HTTPError as exc:
            ended = f"cut: {type(exc).__name__}"
    code = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    return {
        "exit_status": code,
        "stream_end": ended,
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
        figures["sigterm"] = sigterm_with_an_open_stream(proc, base)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
