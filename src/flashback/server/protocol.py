"""The OpenAI completions protocol as FlashBack serves it: the request schema, errors, and response shaping.

Parameters FlashBack cannot honour are accepted at their neutral values (what clients send by default) and
refused otherwise. FlashBack's own settings (mode, k, stride, ...) default to the library's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from flashback.config import GenerationConfig, defaults

GENERATION = defaults(GenerationConfig)


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
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's own default
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
    mode: Literal["append", "prepend", "none"] = GENERATION["mode"]
    stride: int = Field(GENERATION["stride"], ge=1)
    k: int = Field(GENERATION["k"], ge=1, le=16)
    query_tokens: int = Field(GENERATION["query_tokens"], ge=1, le=512)
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


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


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


async def whole(first: Step, steps, req: CompletionRequest, cid: str, created: int, model: str) -> dict:
    text, probs, retrievals, finish, completion = "", [], [], "length", 0
    async for step in _all(first, steps):
        completion += 0 if step.echo else len(step.tokens)
        text += step.text
        probs += step.logprobs
        retrievals += step.retrievals
        finish = step.finish or finish
    logprobs = logprobs_block(probs, 0) if req.logprobs is not None else None
    return {
        **_envelope(cid, created, model, text, finish, logprobs),
        "usage": _usage(first.prompt_tokens, completion),
        "retrievals": retrievals,
    }


async def events(first: Step, steps, req: CompletionRequest, cid: str, created: int, model: str):
    completion, offset = 0, 0
    try:
        async for step in _all(first, steps):
            completion += 0 if step.echo else len(step.tokens)
            logprobs = logprobs_block(step.logprobs, offset) if req.logprobs is not None else None
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
