"""The OpenAI completions protocol as FlashBack serves it: the request schema, errors, and response shaping.

Parameters FlashBack cannot honour are accepted at their neutral values (what clients send by default) and
refused otherwise. FlashBack's own settings (mode, k, stride, ...) default to the library's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, StrictStr

from flashback.config import GenerationConfig, defaults
from flashback.errors import FlashbackError

GENERATION = defaults(GenerationConfig)
DRAIN = ("drain", "")  # put into a stream's queue: the server is shutting down


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
    cached_tokens: int = 0  # prompt tokens reused from an earlier request's cache


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, strict=True)


# Types are strict, as OpenAI's are: "16" is no integer, true no number, 3.0 no token id, NaN no temperature.
class RequestOptions(BaseModel):
    """What completions and chat requests share: sampling, streaming, OpenAI's parameters FlashBack accepts only at
    their neutral values, and FlashBack's retrieval options."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    temperature: float | None = Field(0.0, ge=0.0, le=2.0, strict=True, allow_inf_nan=False)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, strict=True, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**64, strict=True)
    stop: StrictStr | list[StrictStr] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: float | None = Field(None, strict=True, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, strict=True, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None
    # vLLM's field: requests share a kept prefix cache only when they send the same salt (and user and API key)
    cache_salt: StrictStr | None = Field(None, min_length=1)
    # FlashBack options
    # None: the mode the model name picks (NAME:prepend), else the server's (serve --mode)
    mode: Literal["append", "prepend", "none"] | None = None
    stride: int = Field(GENERATION["stride"], ge=1, strict=True)
    k: int = Field(GENERATION["k"], ge=1, le=16, strict=True)
    query_tokens: int = Field(GENERATION["query_tokens"], ge=1, le=512, strict=True)
    tail: int | None = Field(None, ge=0, le=512, strict=True)  # None: the server's tail (the adapter's own)
    # a chat's retrievals after the first: what their query holds (completions query the last tokens)
    chat_query: Literal["recent", "question+recent", "question"] = GENERATION["chat_query"]

    def options(self) -> dict:
        """The shared fields' values, to carry into another request shape."""
        return {name: getattr(self, name) for name in RequestOptions.model_fields}


class CompletionRequest(RequestOptions):
    """The OpenAI completions request, plus FlashBack's retrieval options.

    Parameters FlashBack cannot honour are accepted at their neutral values (what clients send by
    default) and refused otherwise.
    """

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(16, ge=1, strict=True)  # OpenAI's own default
    logprobs: int | None = Field(None, ge=0, le=5, strict=True)
    echo: bool = Field(False, strict=True)
    best_of: Literal[1] | None = None
    suffix: StrictStr | None = None
    max_length: int | None = Field(None, ge=1, strict=True)  # echo scoring: eval's example length (None: eval's)
    _messages: list[dict] | None = PrivateAttr(None)  # a chat request's conversation (server/chat.py), not `prompt`

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


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def logprobs_block(steps: list[dict], offset: int) -> dict:
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


def split_prompts(req: CompletionRequest, limit: int) -> list[CompletionRequest]:
    """One request per prompt: `prompt` may be one text, one token-id list, or a list of either (a batch, answered
    with one choice per prompt in order, as the OpenAI API does)."""
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return [req]
    if not prompt:
        raise FlashbackError("the prompt is empty")
    if len(prompt) > limit:
        raise FlashbackError(f"prompt: at most {limit} prompts in one request")
    return [req.model_copy(update={"prompt": one}) for one in prompt]


class Choice:
    """One prompt of a request, run to its end by its own task; its steps wait in a queue for the response.

    Every prompt of a batch runs on its own, so a batch never holds a generation slot while it waits for another.
    """

    def __init__(self, index: int, steps: AsyncIterator[Step]):
        self.index = index
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._pump(steps))
        self.first: Step | None = None

    async def _pump(self, steps: AsyncIterator[Step]) -> None:
        try:
            async for step in steps:
                await self.queue.put(step)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # handed to whoever reads the steps
            await self.queue.put(exc)
        finally:
            await steps.aclose()
            await self.queue.put(None)

    async def start(self) -> Step:
        """Wait for the first step: a bad request fails here, before the response starts."""
        self.first = await self._next()
        if self.first is None:
            raise FlashbackError("the generation ended before its first step")
        return self.first

    async def _next(self) -> Step | None:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def steps(self) -> AsyncIterator[Step]:
        if self.first is not None:
            yield self.first
        while (step := await self._next()) is not None:
            yield step

    def cancel(self) -> None:
        """Stop the generation: synchronous, so that a cancelled caller (a client hung up) still stops it."""
        self.task.cancel()


class ShuttingDown(FlashbackError):
    """A request the server will not run because it is shutting down: a 503, not the client's fault."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class Drain:
    """Open streams, and whether the server is shutting down: a stream then ends at once, cleanly, and a request
    waiting for a slot is answered at once (`stopping`)."""

    def __init__(self) -> None:
        self.draining = False
        self.queues: set[asyncio.Queue] = set()
        self.stopping = asyncio.Event()


def _envelope(cid: str, created: int, model: str, choices: list[dict]) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}


def _choice(index: int, text: str, finish: str | None, logprobs=None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


async def _collect(choice: Choice, req: CompletionRequest) -> tuple[dict, dict, list[dict]]:
    """A choice's whole text, log-probabilities and retrievals: (choice, usage, retrievals)."""
    text, probs, retrievals, finish, completion, prompt_tokens, cached = "", [], [], "length", 0, 0, 0
    async for step in choice.steps():
        completion += 0 if step.echo else len(step.tokens)
        prompt_tokens, cached = step.prompt_tokens, step.cached_tokens
        text += step.text
        probs += step.logprobs
        retrievals += step.retrievals
        finish = step.finish or finish
    logprobs = logprobs_block(probs, 0) if req.logprobs is not None else None
    return _choice(choice.index, text, finish, logprobs), _usage(prompt_tokens, completion, cached), retrievals


def _total(usages: list[dict]) -> dict:
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    return _usage(sum(u["prompt_tokens"] for u in usages), sum(u["completion_tokens"] for u in usages), cached)


async def whole(choices: list[Choice], req: CompletionRequest, cid: str, created: int, model: str) -> dict:
    try:
        done = await asyncio.gather(*(_collect(c, req) for c in choices))
    finally:  # a failed or abandoned prompt stops its batch
        for choice in choices:
            choice.cancel()
    if len(done) == 1:  # one prompt: the retrievals beside the choice, as FlashBack has always answered
        choice, usage, retrievals = done[0]
        return {**_envelope(cid, created, model, [choice]), "usage": usage, "retrievals": retrievals}
    body = [{**choice, "retrievals": retrievals} for choice, _, retrievals in done]
    return {**_envelope(cid, created, model, body), "usage": _total([usage for _, usage, _ in done])}


def _error_event(message: str) -> str:
    """A stream's clean end after a failure: an error event in OpenAI's shape, then [DONE]."""
    error = {"message": message, "type": "server_error", "code": None}
    return f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n"


async def events(
    choices: list[Choice], req: CompletionRequest, cid: str, created: int, model: str, drain: Drain | None = None
):
    """Server-sent events: every choice's chunks as they come, each with its index, then [DONE]. A failure, or the
    server shutting down (`drain`), ends the stream at once with an error event and [DONE]."""
    drain = drain or Drain()
    merged: asyncio.Queue = asyncio.Queue()
    drain.queues.add(merged)

    async def forward(choice: Choice) -> None:
        try:
            async for step in choice.steps():
                await merged.put((choice.index, step))
        except Exception as exc:
            await merged.put((choice.index, exc))
        finally:
            await merged.put((choice.index, None))

    tasks = [asyncio.create_task(forward(c)) for c in choices]
    state = {c.index: {"completion": 0, "offset": 0, "prompt_tokens": 0, "cached": 0} for c in choices}
    try:
        for _ in range(len(choices)):
            while (item := await merged.get())[1] is not None:
                if item is DRAIN or drain.draining:
                    yield _error_event("the server is shutting down")
                    return
                index, step = item
                if isinstance(step, BaseException):
                    message = str(step) if isinstance(step, FlashbackError) else "internal error"
                    yield _error_event(message)
                    return
                if not (step.text or step.tokens or step.retrievals or step.finish):
                    continue  # a step that computed without producing (a chunk of a prefill)
                yield f"data: {json.dumps(_chunk(step, index, state[index], req, cid, created, model))}\n\n"
        if req.stream_options and req.stream_options.include_usage:
            usage = _total([_usage(s["prompt_tokens"], s["completion"], s["cached"]) for s in state.values()])
            yield f"data: {json.dumps({**_envelope(cid, created, model, []), 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # nothing awaited here: a hung-up client cancels this generator, and its generations must still stop
        drain.queues.discard(merged)
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.cancel()


def _chunk(step: Step, index: int, state: dict, req: CompletionRequest, cid: str, created: int, model: str) -> dict:
    state["completion"] += 0 if step.echo else len(step.tokens)
    state["prompt_tokens"], state["cached"] = step.prompt_tokens, step.cached_tokens
    logprobs = logprobs_block(step.logprobs, state["offset"]) if req.logprobs is not None else None
    state["offset"] += len(step.text)
    chunk = _envelope(cid, created, model, [_choice(index, step.text, step.finish, logprobs)])
    if step.retrievals:
        chunk["retrievals"] = step.retrievals
    if step.finish:  # FlashBack's own habit: the last chunk of a choice carries its usage too
        chunk["usage"] = _usage(step.prompt_tokens, state["completion"], state["cached"])
    return chunk
