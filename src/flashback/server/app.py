"""The HTTP app (FastAPI + uvicorn): routes, the body limit, errors in OpenAI's shape.

One engine serves every request; the service (generation.py) admits them and the scheduler (scheduler.py)
interleaves their steps on the model thread(s).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashback import __version__
from flashback.config import DEFAULT_TAIL, ServerLimits
from flashback.engines.base import Engine
from flashback.errors import FlashbackError
from flashback.server.chat import ChatRequest, chat_events, chat_response
from flashback.server.generation import CompletionService
from flashback.server.protocol import (
    GENERATION,
    Choice,
    CompletionRequest,
    ShuttingDown,
    error_response,
    events,
    split_prompts,
    whole,
)
from flashback.text.retrieval import Retriever

log = logging.getLogger("flashback.server")


MIN_BODY_RATE = 16 * 1024  # bytes/s: each 16 KiB received extends a body's deadline by a second (slow uplinks)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before anyone parses it, and one that has not
    all come within `timeout` seconds of its headers (plus a second per MIN_BODY_RATE bytes received) a 408: a client
    trickling a body holds no slot for long, however steadily it trickles.

    The body is read here (at most `limit` bytes are ever held) and replayed to the app.
    """

    def __init__(self, app, limit: int, timeout: float | None = None):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error_response(413, f"request body larger than {self.limit} bytes")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        loop = asyncio.get_running_loop()
        start = loop.time()  # the deadline is for the whole body, not each part
        body, more = b"", True
        while more:
            try:
                left = None
                if self.timeout is not None:  # never 0: wait_for(..., 0) would not even take what has arrived
                    left = max(0.01, start + self.timeout + len(body) / MIN_BODY_RATE - loop.time())
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:  # not the builtin on Python 3.10
                late = error_response(408, f"request body not received within {self.timeout:g} s")
                return await late(scope, receive, send)
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKeys:
    """ASGI middleware: with keys set, every route but /health needs `Authorization: Bearer KEY`, else a 401 in
    OpenAI's shape before the body is read. The key's number goes into the scope (`KEY_SCOPE`): the prefix cache is
    scoped by it, so one key's clients cannot learn another's prompts from `cached_tokens`."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, [key.encode() for key in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
        token = token.strip()
        found = None
        for number, key in enumerate(self.keys):  # compared in constant time, every key
            if hmac.compare_digest(token, key):
                found = number
        if scheme.lower() != b"bearer" or found is None:
            message = "a valid API key is needed: send Authorization: Bearer KEY" if token else "no API key given"
            refused = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await refused(scope, receive, send)
        scope[KEY_SCOPE] = found
        await self.app(scope, receive, send)


KEY_SCOPE = "flashback.api_key"  # the request's key, by number (ApiKeys)


def create_app(
    engine: Engine,
    retriever: Retriever | None,
    limits: ServerLimits | None = None,
    markers: bool = False,
    tail: int = DEFAULT_TAIL,
    docs: bool = False,
    mode: str = GENERATION["mode"],
    name: str | None = None,
    alias: str | None = None,
    api_keys: tuple[str, ...] = (),
    chat: tuple[bool, int] | None = None,
) -> FastAPI:
    """The HTTP app. `docs` serves /docs and /openapi.json (off by default); `mode` is the mode of requests that
    name none; `name` the served model's name (default: the engine's); `api_keys`, when given, the keys a client
    must send (see ApiKeys); `chat` the (markers, tail) of chat requests, their adapter's (default: as
    completions)."""
    limits = limits or ServerLimits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = CompletionService(engine, retriever, limits, markers, tail, mode, name, alias, chat)
        app.state.service = service  # what the routes serve with
        app.state.drain = service.drain  # run() calls it when a shutdown signal comes
        yield
        service.scheduler.close()
        service.front.shutdown(wait=False, cancel_futures=True)
        service.scheduler.join(limits.shutdown_grace_s + 30)  # no model thread may outlive the interpreter
        engine.keep_prefixes(0)  # the engine may outlive the app (tests, the Python API)

    app = FastAPI(
        title="FlashBack",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.api_keys = tuple(api_keys)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, timeout=limits.read_timeout_s)
    app.add_middleware(ApiKeys, keys=app.state.api_keys)  # added last, so it runs first: no body read without a key
    _add_error_handlers(app)
    app.include_router(router)
    return app


router = APIRouter()  # the routes, over the service in app.state (created at start-up, see create_app)


@router.get("/health")
async def health(request: Request):
    if request.app.state.api_keys:  # open to anyone: with keys, it says no more than that the server is up
        return {"status": "ok"}
    return request.app.state.service.health()


@router.get("/v1/models")
async def models(request: Request):
    names = request.app.state.service.model_names()  # with the mode named in the model, for OpenAI-only clients
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "flashback"} for n in names],
    }


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    return await _complete(request.app.state.service, req, request)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    service = request.app.state.service
    try:
        completion = req.completion(service.limits.max_tokens)
    except FlashbackError as exc:
        return error_response(400, str(exc))
    return await _complete(service, completion, request, chat=True)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: bad JSON and schema violations as 400s, a crash as a bare 500."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = (  # what the JSON parser refused beyond a syntax error (those are json_invalid, above)
            "request body is not JSON this server reads: not UTF-8, nested too deeply, or a number too long"
            if exc.status_code == 400
            else str(exc.detail)
        )
        return error_response(
            exc.status_code, message, "invalid_request_error" if exc.status_code < 500 else "server_error"
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, "internal error", "server_error")


async def _complete(service: CompletionService, req: CompletionRequest, request: Request, chat=False):
    """One completions request: each prompt runs as its own generation, a batch within one work budget; the
    response waits for every prompt's first step, so that a bad request gets a status code, not a broken stream.
    `chat`: a chat request's answer, reshaped as a chat completion."""
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    try:
        prompts = [req] if chat else split_prompts(req, service.limits.max_batch)
    except FlashbackError as exc:
        return error_response(400, str(exc), param="prompt")
    share = service.limits.max_request_work // len(prompts)
    key = request.scope.get(KEY_SCOPE)
    choices = [Choice(i, service.steps(one, request, share, key)) for i, one in enumerate(prompts)]
    starts = [asyncio.ensure_future(c.start()) for c in choices]
    await asyncio.wait(starts, return_when=asyncio.FIRST_EXCEPTION)  # one bad prompt stops the batch at once
    failed = next((s.exception() for s in starts if s.done() and s.exception() is not None), None)
    if failed is not None:
        for choice, start in zip(choices, starts, strict=True):
            start.cancel()
            choice.cancel()
        if isinstance(failed, ShuttingDown):
            return error_response(503, str(failed), "server_error")
        if isinstance(failed, FlashbackError):
            return error_response(400, str(failed))
        raise failed
    if req.stream:
        sse = events(choices, req, cid, created, service.name, service.drainer)
        return StreamingResponse(
            chat_events(sse) if chat else sse,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    done = await whole(choices, req, cid, created, service.name)
    return chat_response(done) if chat else done


def server_config(app: FastAPI, host: str, port: int, limits: ServerLimits, log_level: str = "info"):
    """uvicorn's settings for `app`: the shutdown grace, and a connection closed when a request's headers have not
    all come within --read-timeout of it being ready for one (opened, or its last response sent). uvicorn's own
    keep-alive timer stops at the first byte, so a client trickling header lines would hold the connection."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadersInTime(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_request()

        def _await_request(self) -> None:
            self.answered = self.cycle  # the request before the one awaited (None on a new connection)
            self.headers_late = self.loop.call_later(limits.read_timeout_s, self._close_without_request)

        def _close_without_request(self) -> None:
            if self.cycle is self.answered and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self.answered:  # the awaited request's headers are in
                self.headers_late.cancel()

        def on_response_complete(self) -> None:
            self.headers_late.cancel()
            self._await_request()  # before uvicorn reads a pipelined request, whose headers then cancel it
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self.headers_late.cancel()
            super().connection_lost(exc)

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=HeadersInTime,
        timeout_keep_alive=int(max(1, limits.read_timeout_s)),
        timeout_graceful_shutdown=limits.shutdown_grace_s,
    )


def run(app: FastAPI, host: str, port: int, limits: ServerLimits) -> None:
    """Serve `app` with uvicorn until SIGINT/SIGTERM. At the signal, open streams end at once with an error event and
    [DONE] (a clean end, not a cut connection), requests without a stream get the grace period, and the model
    threads finish their step before the process exits."""
    import uvicorn

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            drain = getattr(app.state, "drain", None)
            if drain is not None and not self.should_exit:
                drain()
            super().handle_exit(sig, frame)

    Draining(server_config(app, host, port, limits)).run()
