"""What `serve`'s background compile at start-up buys: the same chat requests against a server started with the
warm-up (the default) and one started with --no-warm-up, each a fresh process on the default model and index.

With the warm-up: one request right after start-up (eager, beside the compiling thread), then, once /health says
nothing is warming up, two more (decoded by the compiled step). Without: three requests, eager. Each request asks a
different question (no prefix reuse between them), 64 new tokens. The compile cache is a fresh temporary folder
unless --warm-cache. Prints JSON: each request's latency and tokens, and how long the warm-up took.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

QUESTIONS = [
    "How do I read a file line by line in Python?",
    "What does a garbage collector do?",
    "How do I sort a list of dictionaries by a key?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(base: str, question: str) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 64, "temperature": 0}
    start = time.perf_counter()
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    seconds = round(time.perf_counter() - start, 2)
    return {"seconds": seconds, "completion_tokens": r.json()["usage"]["completion_tokens"]}


def run(warm_up: bool, cache: str) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "flashback.cli", "serve", "--port", str(port)] + ([] if warm_up else ["--no-warm-up"])
    env = {**os.environ, "FLASHBACK_COMPILE_CACHE": cache}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        started = time.perf_counter()
        out = {"warm_up": warm_up, "requests": [ask(base, QUESTIONS[0])]}
        while httpx.get(f"{base}/health", timeout=30).json().get("warming_up"):
            time.sleep(1)
        out["warm_up_s_after_listening"] = round(time.perf_counter() - started, 1)
        out["requests"] += [ask(base, q) for q in QUESTIONS[1:]]
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm-cache", action="store_true", help="keep the compile cache between the two servers")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        result = [run(False, cache), run(True, cache)]
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
