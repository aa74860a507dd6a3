"""OpenAI-compatible HTTP completions over FlashBack generation (FastAPI + uvicorn).

One model instance serves every request. All model work runs on a single worker thread, one token
step at a time, so concurrent requests interleave token by token instead of blocking each other,
and a client that disconnects stops getting steps at once (its KV cache is dropped with its
generator). Requests can choose generation settings but never paths: nothing a request sends
reads or writes files on the server.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from flashback.data import DEFAULT_TAIL
from flashback.errors import FlashbackError
from flashback.generate import GenerationConfig, Retriever, TextStreamer, Trace, stream
from flashback.model import LoadedModel


@dataclass(frozen=True)
class ServerLimits:
    max_prompt_tokens: int = 4096
    max_tokens: int = 512
    max_active: int = 8  # generations in flight; further requests wait their turn


class CompletionRequest(BaseModel):
    """The OpenAI completions request, plus FlashBack's retrieval options."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    user: str | None = None
    # FlashBack options
    mode: Literal["append", "prepend", "none"] = "append"
    stride: int = Field(16, ge=1)
    k: int = Field(1, ge=1, le=16)
    query_tokens: int = Field(32, ge=1, le=512)
    tail: int | None = Field(None, ge=0, le=512)  # None: the server's tail (the adapter's own)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class StopFilter:
    """Cuts the text at the first stop string, holding back any tail that could begin one.

    Without the hold-back a stop string split across two tokens would be half sent already.
    """

    def __init__(self, stop: str | list[str] | None):
        self.stops = [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add a piece; return what may be sent now. Sets `stopped` once a stop string appears."""
        self.text += piece
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._send_to(min(hits))
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        return self._send_to(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


def create_app(
    lm: LoadedModel,
    retriever: Retriever | None,
    limits: ServerLimits = ServerLimits(),
    markers: bool = False,
    tail: int = DEFAULT_TAIL,
) -> FastAPI:
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashback-model")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="FlashBack", version="0.1.0", lifespan=lifespan)
    admission = asyncio.Semaphore(limits.max_active)
    state = {"active": 0, "served": 0}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return _error(400, "request body is not valid JSON")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": lm.name,
            "adapter": lm.adapter,
            "tail": tail,
            "index_passages": len(retriever.index) if hasattr(retriever, "index") else None,
            **state,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": lm.name, "object": "model", "created": 0, "owned_by": "flashback"}]}

    def _prepare(req: CompletionRequest):
        if req.model not in (None, lm.name):
            raise FlashbackError(f"model {req.model!r} is not served here; this server serves {lm.name!r}")
        if req.max_tokens > limits.max_tokens:
            raise FlashbackError(f"max_tokens may be at most {limits.max_tokens}")
        if not req.prompt.strip():
            raise FlashbackError("the prompt is empty")
        ids = lm.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > limits.max_prompt_tokens:
            raise FlashbackError(f"the prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}")
        if req.mode != "none" and retriever is None:
            raise FlashbackError("this server has no index; use mode 'none'")
        cfg = GenerationConfig(
            mode=req.mode,
            stride=req.stride,
            query_tokens=req.query_tokens,
            k=req.k,
            max_new_tokens=req.max_tokens,
            markers=markers and req.mode == "append",
            tail=tail if req.tail is None else req.tail,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
        )
        trace = Trace(req.mode)
        tokens = stream(lm, ids, retriever, cfg, trace)  # validates now, before any response starts
        return ids, tokens, trace

    async def _steps(tokens) -> AsyncIterator[int]:
        """Advance the generator one token at a time on the model thread."""
        loop = asyncio.get_running_loop()
        done = object()
        try:
            while (token := await loop.run_in_executor(worker, next, tokens, done)) is not done:
                yield token
        finally:
            await loop.run_in_executor(worker, tokens.close)  # frees the KV cache on the model thread

    async def _completion(req: CompletionRequest, request: Request) -> AsyncIterator[tuple[str, str | None, dict]]:
        """Yield (text piece, finish reason or None, extra fields); the last item carries the usage."""
        ids, tokens, trace = await asyncio.get_running_loop().run_in_executor(worker, _prepare, req)
        streamer, stops = TextStreamer(lm.tokenizer), StopFilter(req.stop)
        count, reported, finish = 0, 0, "length"
        async with admission:
            state["active"] += 1
            steps = _steps(tokens)
            try:
                async for token in steps:
                    count += 1
                    piece = stops.push(streamer.push(token))
                    new = {"retrievals": trace.retrievals[reported:]} if len(trace.retrievals) > reported else {}
                    reported = len(trace.retrievals)
                    yield piece, None, new
                    if stops.stopped:
                        finish = "stop"
                        break
                    if token in lm.eos_ids:
                        finish = "stop"
                    if not req.stream and await request.is_disconnected():
                        return  # nobody is waiting for the answer
                usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
                yield stops.flush(), finish, {"usage": usage}
            finally:
                await steps.aclose()
                state["active"] -= 1
                state["served"] += 1

    def _envelope(cid: str, created: int, text: str, finish: str | None) -> dict:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": lm.name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        parts = _completion(req, request)
        try:  # run up to the first piece now, so that bad requests get a status code, not a broken stream
            first = await anext(parts)
        except FlashbackError as exc:
            return _error(400, str(exc))
        except StopAsyncIteration:
            first = None

        async def all_parts():
            if first is not None:
                yield first
            async for part in parts:
                yield part

        if not req.stream:
            text, finish, retrievals, usage = "", "length", [], {}
            async for piece, fin, extra in all_parts():
                text += piece
                finish = fin or finish
                retrievals += extra.get("retrievals", [])
                usage = extra.get("usage", usage)
            return {**_envelope(cid, created, text, finish), "usage": usage, "retrievals": retrievals}

        async def events():
            try:
                async for piece, fin, extra in all_parts():
                    yield f"data: {json.dumps({**_envelope(cid, created, piece, fin), **extra})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await parts.aclose()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app
