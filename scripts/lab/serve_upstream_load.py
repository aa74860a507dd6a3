"""Concurrent clients through `flashback serve --upstream`: one generation admitted at a time vs all of them.

    python scripts/lab/serve_upstream_load.py --upstream URL --model EXPORT [--index DIR] [--clients 4]

Each client sends one append completion (`--max-tokens`, greedy) of its own `--context`-token stretch of the
index, as token ids. The same requests run against a front-end with --max-active 1 (one request in flight to
the engine) and one with --max-active CLIENTS (each generation has its own request in flight, which the engine
may batch), alternating for `--rounds`; the engine's prefix cache is cleared before each batch of requests.
Prints one JSON object: per setting, the wall seconds of each round and generated tokens per second.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import uvicorn

from flashback.api import DEFAULT_INDEX
from flashback.config import EngineConfig
from flashback.engines import load_engine
from flashback.layout import layout_settings
from flashback.server import ServerLimits, create_app
from flashback.text.retrieval import Index, IndexRetriever


def serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--model", required=True, help="the export the engine serves")
    parser.add_argument("--index", default=str(DEFAULT_INDEX))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    lm = load_engine(EngineConfig(model=args.model, upstream=args.upstream))
    markers, tail = layout_settings(lm.tuned, "append", None, None)
    index = Index.load(args.index)
    retriever = IndexRetriever(index)
    ids = index.token_ids
    prompts = [ids[i * args.context : (i + 1) * args.context].tolist() for i in range(args.clients)]
    bodies = [{"prompt": p, "max_tokens": args.max_tokens, "mode": "append", "temperature": 0} for p in prompts]
    settings = {1: [], args.clients: []}
    for r in range(args.rounds):
        for active in settings:
            limits = ServerLimits(max_active=active, max_prompt_tokens=args.context)
            app = create_app(lm, retriever, limits, markers=markers, tail=tail)
            base, server, thread = serve(app)
            lm.forget()
            print(f"[serve-load] round {r + 1}: --max-active {active}, {args.clients} clients", file=sys.stderr)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                post = lambda b, url=f"{base}/v1/completions": httpx.post(url, json=b, timeout=900)  # noqa: E731
                answers = list(pool.map(post, bodies))
            wall = time.perf_counter() - t0
            server.should_exit = True
            thread.join(timeout=30)
            bad = [a.text[:200] for a in answers if a.status_code != 200]
            if bad:
                raise SystemExit(f"requests failed: {bad}")
            tokens = sum(a.json()["usage"]["completion_tokens"] for a in answers)
            settings[active].append({"wall_s": wall, "tokens": tokens})
    out = {
        "engine": lm.name,
        "clients": args.clients,
        "context": args.context,
        "max_tokens": args.max_tokens,
        "settings": {
            f"max_active_{active}": {
                "wall_s": [round(x["wall_s"], 2) for x in runs],
                "tokens_per_s": round(statistics.median(x["tokens"] / x["wall_s"] for x in runs), 2),
            }
            for active, runs in settings.items()
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
