"""OpenAI-compatible HTTP completions over FlashBack generation (FastAPI + uvicorn).

One model instance serves every request. All model work runs on one scheduler thread, one token step
at a time, and the next step always goes to the generation that has computed the fewest tokens so
far: a request whose steps are expensive (prepend, large k, stride 1) cannot starve a cheap one.
With an upstream engine (serve --upstream) the model work is HTTP requests to an inference server, so the
scheduler runs one thread per admitted generation: each can have a request in flight, which the server batches.
Everything that grows with the request (tokenizing the prompt, stop strings, log-probabilities) runs
on that thread too, never on the event loop. Limits bound the body, the prompt, the stop strings and
a request's total work before any of it starts. Each mode runs with its own adapter (model.plan_adapters),
switched per step. A request chooses settings but no paths: nothing it sends reads or writes files.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashback.data import DEFAULT_TAIL
from flashback.errors import FlashbackError
from flashback.generate import GenerationConfig, Retriever, TextStreamer, Trace, planned_work, stream
from flashback.model import LoadedModel, encode

log = logging.getLogger("flashback.server")


@dataclass(frozen=True)
class ServerLimits:
    max_prompt_tokens: int = 4096
    max_tokens: int = 512
    max_active: int = 8  # generations in flight; further requests wait their turn
    max_body_bytes: int = 1 << 20
    max_stop: int = 4  # stop strings per request (OpenAI's own limit)
    max_stop_chars: int = 256
    max_request_work: int = 262_144  # token positions one request may compute (generate.planned_work)
    shutdown_grace_s: float = 5.0  # after SIGTERM, streams still open are cut after this long


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The OpenAI completions request, plus FlashBack's retrieval options.

    Parameters FlashBack cannot honour are accepted at their neutral values (what clients send by
    default) and refused otherwise.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(0.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    n: Literal[1] = 1
    best_of: Literal[1] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None
    # FlashBack options
    mode: Literal["append", "prepend", "none"] = "append"
    stride: int = Field(16, ge=1)
    k: int = Field(1, ge=1, le=16)
    query_tokens: int = Field(32, ge=1, le=512)
    tail: int | None = Field(None, ge=0, le=512)  # None: the server's tail (the adapter's own)

    def unsupported(self) -> str | None:
        """The first parameter set to a value FlashBack cannot honour, as an error message."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return f"{name} is not supported (only 0)"
        if self.logit_bias:
            return "logit_bias is not supported (only {})"
        if self.suffix:
            return "suffix is not supported (only empty)"
        return None


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class StopFilter:
    """Cuts the text at the first stop string, holding back any tail that could begin one.

    Each stop string keeps the length of its longest prefix that the text ends with, updated per
    character with a KMP failure table: linear in the text, whatever the stop strings look like.
    Without the hold-back a stop string split across two tokens would be half sent already.
    """

    def __init__(self, stop: str | list[str] | None):
        self.stops = [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]
        self.fail = [self._failure(s) for s in self.stops]
        self.matched = [0] * len(self.stops)
        self.text = ""
        self.sent = 0
        self.stopped = False

    @staticmethod
    def _failure(s: str) -> list[int]:
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        return fail

    def push(self, piece: str) -> str:
        """Add a piece; return what may be sent now. Sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        for ch in piece:
            self.text += ch
            found = 0  # the longest stop string ending here starts first
            for j, s in enumerate(self.stops):
                k = self.matched[j]
                while k and ch != s[k]:
                    k = self.fail[j][k - 1]
                k += ch == s[k]
                if k == len(s):
                    found, k = max(found, k), self.fail[j][k - 1]
                self.matched[j] = k
            if found:
                self.stopped = True
                return self._send_to(len(self.text) - found)
        return self._send_to(len(self.text) - max(self.matched, default=0))

    def flush(self) -> str:
        return "" if self.stopped else self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


class Scheduler:
    """The model thread(s). The lowest priority runs next: for generations, the tokens they have computed.

    A generation's next step is queued by the thread that ran its previous step, as soon as that step is done,
    so which generation runs next never depends on how fast the event loop picks up results, and no generation
    ever has two steps running. `workers` > 1 is for engines whose work waits on another process (upstream).
    """

    def __init__(self, workers: int = 1) -> None:
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.clock = 0.0  # priority of the work that ran last: where a new generation starts
        self._threads = [
            threading.Thread(target=self._run, name=f"flashback-model-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, priority: float, job: Callable[[], object]) -> asyncio.Future:
        """Run `job` once; its result (or exception) lands in the returned future."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._push(priority, _Once(job, loop, future))
        return future

    def stream(self, gen: Generation) -> StepStream:
        """Run `gen.step` again and again, by `gen.priority`, until a step finishes it or it is cancelled."""
        handle = StepStream(gen, asyncio.get_running_loop())
        self._push(gen.priority, handle)
        return handle

    def _push(self, priority: float, item) -> None:
        with self._cv:
            if self._closed:
                raise FlashbackError("the server is shutting down")
            heapq.heappush(self._heap, (priority, next(self._order), item))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                priority, _, item = heapq.heappop(self._heap)
            if item.cancelled:
                continue
            self.clock = max(self.clock, priority)
            again = item.run()
            if again is not None:
                with self._cv:
                    if not self._closed:
                        heapq.heappush(self._heap, (again, next(self._order), item))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending, self._heap = self._heap, []
            self._cv.notify_all()
        for _, _, item in pending:
            item.fail(FlashbackError("the server is shutting down"))


class _Once:
    def __init__(self, job: Callable[[], object], loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.job, self.loop, self.future = job, loop, future

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def run(self) -> None:
        try:
            result, error = self.job(), None
        except BaseException as exc:  # handed to the waiting request, which decides
            result, error = None, exc
        self.loop.call_soon_threadsafe(_settle, self.future, result, error)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, None, error)


class StepStream:
    """A generation's steps as they come off the model thread, in an asyncio queue."""

    def __init__(self, gen: Generation, loop: asyncio.AbstractEventLoop):
        self.gen, self.loop = gen, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def run(self) -> float | None:
        """One step on the model thread; the priority to run again at, or None when done."""
        try:
            step = self.gen.step()
        except BaseException as exc:
            self.fail(exc)
            return None
        self.loop.call_soon_threadsafe(self.queue.put_nowait, step)
        return None if step.finish or self.cancelled else self.gen.priority

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, error)

    def cancel(self) -> None:
        self.cancelled = True

    async def next(self) -> Step:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "never retrieved" warning at shutdown


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


@dataclass
class Step:
    """What one scheduler step hands back to the event loop."""

    text: str
    tokens: list[int]
    logprobs: list[dict]
    retrievals: list[dict]
    finish: str | None  # None while generating
    prompt_tokens: int = 0
    echo: bool = False  # this step is the echoed prompt, not generated text


@dataclass
class Generation:
    """One request's state; every method runs on the model thread."""

    lm: LoadedModel
    req: CompletionRequest
    prompt_ids: list[int]
    tokens: object  # the generate.stream iterator
    trace: Trace
    start: float  # scheduler clock when admitted
    streamer: TextStreamer = field(init=False)
    stops: StopFilter = field(init=False)
    count: int = 0
    reported: int = 0
    last_logits: torch.Tensor | None = None
    busy: threading.Lock = field(default_factory=threading.Lock)  # a step or close; workers > 1 may race them

    def __post_init__(self) -> None:
        self.streamer = TextStreamer(self.lm.tokenizer)
        self.stops = StopFilter(self.req.stop)

    @property
    def priority(self) -> float:
        return self.start + sum(f.tokens for f in self.trace.forwards)

    def observe(self, step: int, logits: torch.Tensor) -> None:
        self.last_logits = logits

    def echo(self) -> Step:
        """The prompt itself (echo), with its log-probabilities when asked (the first token has none)."""
        text = self.lm.tokenizer.decode(self.prompt_ids, skip_special_tokens=True)
        probs: list[dict] = []
        if self.req.logprobs is not None:
            self.lm.activate(self.req.mode)
            with torch.inference_mode():
                ids = torch.tensor([self.prompt_ids], device=self.lm.device)
                logits = self.lm.model(input_ids=ids).logits[0].float()
            probs = [self._logprob(None, self.prompt_ids[0])]
            probs += [self._logprob(logits[i], t) for i, t in enumerate(self.prompt_ids[1:])]
        return Step(text, list(self.prompt_ids), probs, [], None, len(self.prompt_ids), echo=True)

    def step(self) -> Step:
        with self.busy:
            return self._step()

    def _step(self) -> Step:
        token = next(self.tokens, None)
        if token is None:
            return Step(self._rest(), [], [], self._new_retrievals(), "length", len(self.prompt_ids))
        self.count += 1
        text = self.stops.push(self.streamer.push(token))
        probs = [self._logprob(self.last_logits, token)] if self.req.logprobs is not None else []
        finish = None
        if self.stops.stopped or token in self.lm.eos_ids:
            finish = "stop"
        elif self.count >= self.trace.max_new_tokens:
            finish = "length"
        if finish:
            text += self._rest()
        return Step(text, [token], probs, self._new_retrievals(), finish, len(self.prompt_ids))

    def _rest(self) -> str:
        """At the end: the held-back text, up to a stop string if one turns up in it."""
        text = self.stops.push(self.streamer.flush())
        return text + self.stops.flush()

    def close(self) -> None:
        with self.busy:
            self.tokens.close()  # frees the KV cache

    def _new_retrievals(self) -> list[dict]:
        new = self.trace.retrievals[self.reported :]
        self.reported = len(self.trace.retrievals)
        return new

    def _logprob(self, logits: torch.Tensor | None, token: int) -> dict:
        text = self.lm.tokenizer.decode([token])
        if logits is None:
            return {"token": text, "logprob": None, "top": {}}
        logits = logits.float().clone()
        if self.lm.marker_ids:
            logits[list(self.lm.marker_ids)] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        top = {}
        if self.req.logprobs:
            values, ids = logp.topk(self.req.logprobs)
            for v, i in zip(values.tolist(), ids.tolist(), strict=True):  # best first: ids that decode alike
                top.setdefault(self.lm.tokenizer.decode([i]), v)  # keep the best one's value
        return {"token": text, "logprob": float(logp[token]), "top": top}


def _logprobs_block(steps: list[dict], offset: int) -> dict:
    """OpenAI's completions logprobs object for consecutive tokens starting at character `offset`."""
    offsets, at = [], offset
    for s in steps:
        offsets.append(at)
        at += len(s["token"])
    return {
        "tokens": [s["token"] for s in steps],
        "token_logprobs": [s["logprob"] for s in steps],
        "top_logprobs": [s["top"] or None for s in steps],
        "text_offset": offsets,
    }


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before anyone parses it.

    The body is read here (at most `limit` bytes are ever held) and replayed to the app.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, f"request body larger than {self.limit} bytes")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
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


class LockedRetriever:
    """One search at a time: a retriever (BM25 index, tokenizer) is not promised to be thread-safe, and a search
    takes milliseconds next to an upstream request's hundreds."""

    def __init__(self, retriever: Retriever):
        self.retriever = retriever
        self.lock = threading.Lock()
        self.max_passage_tokens = retriever.max_passage_tokens

    def __call__(self, query: str, k: int):
        with self.lock:
            return self.retriever(query, k)


class CompletionService:
    """Turns requests into generations on the scheduler and their steps into OpenAI responses."""

    def __init__(
        self, lm: LoadedModel, retriever: Retriever | None, limits: ServerLimits, markers: bool, tail: int
    ) -> None:
        self.lm, self.retriever, self.limits, self.markers, self.tail = lm, retriever, limits, markers, tail
        workers = 1
        if lm.engine == "upstream":  # each admitted generation may wait on its own request to the engine
            workers = limits.max_active
            if retriever is not None:
                self.retriever = LockedRetriever(retriever)
        self.scheduler = Scheduler(workers)
        self.admission = asyncio.Semaphore(limits.max_active)
        self.state = {"active": 0, "waiting": 0, "served": 0}

    # -- on the model thread ---------------------------------------------------------------------
    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 and not all(isinstance(t, int) for t in prompt):
                raise FlashbackError("prompt: one prompt per request (n and batches of prompts are not supported)")
            if prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise FlashbackError("the prompt is empty")
            ids = encode(self.lm.tokenizer, prompt)
        else:
            ids = [int(t) for t in prompt]
            special = set(self.lm.marker_ids or ()) | set(self.lm.tokenizer.all_special_ids)
            if any(t < 0 or t >= len(self.lm.tokenizer) or t in special for t in ids):
                raise FlashbackError("prompt: token ids must be ordinary tokens of this model's vocabulary")
        if not ids:
            raise FlashbackError("the prompt is empty")
        if len(ids) > self.limits.max_prompt_tokens:
            raise FlashbackError(f"the prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}")
        return ids

    def open(self, req: CompletionRequest, start: float) -> Generation:
        ids = self.prompt_ids(req)
        if req.mode != "none" and self.retriever is None:
            raise FlashbackError("this server has no index; use mode 'none'")
        cfg = GenerationConfig(
            mode=req.mode,
            stride=req.stride,
            query_tokens=req.query_tokens,
            k=req.k,
            max_new_tokens=req.max_tokens or 16,
            markers=self.markers and req.mode == "append",
            tail=self.tail if req.tail is None else req.tail,
            temperature=0.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
        )
        passage = self.retriever.max_passage_tokens if self.retriever is not None else 0
        work = planned_work(cfg, len(ids), passage)
        if work > self.limits.max_request_work:
            raise FlashbackError(
                f"this request would compute up to {work} token positions; the limit is "
                f"{self.limits.max_request_work} (fewer max_tokens, a larger stride, a smaller k, or mode append)"
            )
        trace = Trace(req.mode)
        gen = Generation(self.lm, req, ids, None, trace, start)
        observe = gen.observe if req.logprobs is not None else None  # logits are kept only when asked for
        gen.tokens = stream(self.lm, ids, self.retriever, cfg, trace, observe=observe)  # validates now
        return gen

    # -- on the event loop -----------------------------------------------------------------------
    def check(self, req: CompletionRequest) -> None:
        """Cheap checks that need no tokenizer, so a bad request costs nothing on the model thread."""
        if req.model not in (None, self.lm.name):
            raise FlashbackError(f"model {req.model!r} is not served here; this server serves {self.lm.name!r}")
        if (req.max_tokens or 16) > self.limits.max_tokens:
            raise FlashbackError(f"max_tokens may be at most {self.limits.max_tokens}")
        problem = req.unsupported()
        if problem:
            raise FlashbackError(problem)
        if req.logprobs is not None and self.lm.engine == "upstream":
            raise FlashbackError("logprobs are not available here: an upstream engine decodes (serve --upstream)")
        if req.echo and req.logprobs is not None and self.lm.engine != "torch":
            raise FlashbackError("echo with logprobs scores the prompt with the PyTorch engine only")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > self.limits.max_stop:
            raise FlashbackError(f"stop: at most {self.limits.max_stop} stop strings")
        if any(len(s) > self.limits.max_stop_chars for s in stops):
            raise FlashbackError(f"stop: each stop string may have at most {self.limits.max_stop_chars} characters")

    async def steps(self, req: CompletionRequest, request: Request) -> AsyncIterator[Step]:
        """Admit the request, then yield its steps; the echo comes first when asked."""
        self.check(req)
        self.state["waiting"] += 1
        try:
            await self.admission.acquire()
        finally:
            self.state["waiting"] -= 1
        self.state["active"] += 1
        gen, steps = None, None
        try:
            clock = self.scheduler.clock
            gen = await self.scheduler.submit(clock, lambda: self.open(req, clock))
            if req.echo:
                yield await self.scheduler.submit(gen.priority, gen.echo)
            steps = self.scheduler.stream(gen)
            while True:
                step = await steps.next()
                yield step
                if step.finish:
                    return
                if not req.stream and await request.is_disconnected():
                    return  # nobody is waiting for the answer
        finally:  # no await here: a hung-up client cancels this task, and the slot must still be freed
            if steps is not None:
                steps.cancel()
            if gen is not None:  # frees the KV cache after any step in flight (gen.busy)
                with suppress(FlashbackError):
                    self.scheduler.submit(-1.0, gen.close).add_done_callback(_ignore_result)
            self.state["active"] -= 1
            self.state["served"] += 1
            self.admission.release()


def create_app(
    lm: LoadedModel,
    retriever: Retriever | None,
    limits: ServerLimits = ServerLimits(),
    markers: bool = False,
    tail: int = DEFAULT_TAIL,
    docs: bool = False,
) -> FastAPI:
    """The HTTP app. `docs` serves /docs and /openapi.json (off by default)."""
    service: CompletionService | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal service
        service = CompletionService(lm, retriever, limits, markers, tail)
        yield
        service.scheduler.close()

    app = FastAPI(
        title="FlashBack",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return _error(400, "request body is not valid JSON")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = "request body is not valid UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
        return _error(exc.status_code, message, "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unexpected error")
        return _error(500, "internal error", "server_error")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": lm.name,
            "adapters": {mode: Path(path).name for mode, path in lm.adapters.items()},
            "tail": tail,
            "index_passages": len(retriever.index) if hasattr(retriever, "index") else None,
            **(service.state if service else {}),
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": lm.name, "object": "model", "created": 0, "owned_by": "flashback"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        steps = service.steps(req, request)
        try:  # run up to the first step now, so that bad requests get a status code, not a broken stream
            first = await anext(steps)
        except FlashbackError as exc:
            return _error(400, str(exc))
        if req.stream:
            return StreamingResponse(
                _events(first, steps, req, cid, created, lm.name),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _whole(first, steps, req, cid, created, lm.name)

    return app


def _envelope(cid: str, created: int, model: str, text: str, finish: str | None, logprobs=None) -> dict:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}],
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _all(first: Step, steps: AsyncIterator[Step]) -> AsyncIterator[Step]:
    yield first
    async for step in steps:
        yield step


async def _whole(first: Step, steps, req: CompletionRequest, cid: str, created: int, model: str) -> dict:
    text, probs, retrievals, finish, completion = "", [], [], "length", 0
    async for step in _all(first, steps):
        completion += 0 if step.echo else len(step.tokens)
        text += step.text
        probs += step.logprobs
        retrievals += step.retrievals
        finish = step.finish or finish
    logprobs = _logprobs_block(probs, 0) if req.logprobs is not None else None
    return {
        **_envelope(cid, created, model, text, finish, logprobs),
        "usage": _usage(first.prompt_tokens, completion),
        "retrievals": retrievals,
    }


async def _events(first: Step, steps, req: CompletionRequest, cid: str, created: int, model: str):
    completion, offset = 0, 0
    try:
        async for step in _all(first, steps):
            completion += 0 if step.echo else len(step.tokens)
            logprobs = _logprobs_block(step.logprobs, offset) if req.logprobs is not None else None
            offset += len(step.text)
            chunk = _envelope(cid, created, model, step.text, step.finish, logprobs)
            if step.retrievals:
                chunk["retrievals"] = step.retrievals
            if step.finish:  # FlashBack's own habit: the last chunk carries the usage too
                chunk["usage"] = _usage(first.prompt_tokens, completion)
            yield f"data: {json.dumps(chunk)}\n\n"
        if req.stream_options and req.stream_options.include_usage:
            usage = {
                **_envelope(cid, created, model, "", None),
                "choices": [],
                "usage": _usage(first.prompt_tokens, completion),
            }
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await steps.aclose()
