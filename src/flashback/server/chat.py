"""OpenAI chat completions over the completions machinery.

A conversation becomes one prompt through the tokenizer's chat template, and its answer is generated like a
completion: retrieval before the first token (the query: the last user message) and every `stride` tokens, in the
request's mode. In append mode the passages go `tail` tokens before the end of the rendered conversation, so the
conversation stays a stable prefix from turn to turn. Responses are the completions responses reshaped. The
conversation is rendered by text.chat_template, which keeps message contents from forging turns or markers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from flashback.errors import FlashbackError
from flashback.server.protocol import CompletionRequest, RequestOptions


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ChatRequest(RequestOptions):
    """The OpenAI chat completions request, plus FlashBack's retrieval options; strict as CompletionRequest is."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    logprobs: bool | None = Field(None, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=5, strict=True)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none"] | None = None

    def completion(self, default_max_tokens: int) -> CompletionRequest:
        """The completions request that generates the answer; the conversation rides along (rendered on the
        service's front thread)."""
        if self.tools:
            raise FlashbackError("tools are not supported (only none)")
        if self.top_logprobs is not None and not self.logprobs:
            raise FlashbackError("top_logprobs needs logprobs: true")
        req = CompletionRequest(
            prompt="",
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            **self.options(),
        )
        # OpenAI's "developer" is its newer name for "system"; chat templates know "system"
        req._messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages
        ]
        return req


def _chat_logprobs(block: dict | None) -> dict | None:
    if block is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in (top or {}).items()]}
            for token, logprob, top in zip(block["tokens"], block["token_logprobs"], block["top_logprobs"], strict=True)
        ]
    }


def chat_response(done: dict) -> dict:
    """A whole completions response as a chat completion."""
    choices = [
        {
            "index": c["index"],
            "message": {"role": "assistant", "content": c["text"]},
            "logprobs": _chat_logprobs(c["logprobs"]),
            "finish_reason": c["finish_reason"],
            **({"retrievals": c["retrievals"]} if "retrievals" in c else {}),
        }
        for c in done["choices"]
    ]
    return {**done, "id": "chat" + done["id"], "object": "chat.completion", "choices": choices}


async def chat_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Completions server-sent events as chat chunks: the assistant's role in each choice's first delta, its text
    as `content`, the finish reason in a last, empty delta; usage only in the final chunk (with include_usage), as
    OpenAI sends it. Errors and [DONE] pass as they are."""
    started: set[int] = set()
    async with aclosing(events):  # closing this stream closes the completions one, which stops the generation
        async for event in events:
            yield _chat_event(event, started)


def _chat_event(event: str, started: set[int]) -> str:
    """One completions event (or several, an error and [DONE]) in chat's shape."""
    out = []
    for line in event.split("\n\n"):
        if line.startswith("data: {"):
            data = json.loads(line[len("data: ") :])
            if "choices" in data:
                data = {
                    **{k: v for k, v in data.items() if k != "usage" or not data["choices"]},
                    "id": "chat" + data["id"],
                    "object": "chat.completion.chunk",
                    "choices": [_chunk_choice(c, started) for c in data["choices"]],
                }
            line = "data: " + json.dumps(data)
        out.append(line)
    return "\n\n".join(out)


def _chunk_choice(c: dict, started: set[int]) -> dict:
    delta = {} if c["index"] in started else {"role": "assistant"}
    started.add(c["index"])
    if c["text"]:
        delta["content"] = c["text"]
    return {
        "index": c["index"],
        "delta": delta,
        "logprobs": _chat_logprobs(c["logprobs"]),
        "finish_reason": c["finish_reason"],
    }
