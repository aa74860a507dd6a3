"""HTTP clients of the inference servers the upstream engine drives (engine.py).

An engine with a prefix cache (llama.cpp's `llama-server` with `cache_prompt`, vLLM's automatic prefix caching)
reuses the KV of any prompt that begins like the previous one. FlashBack's layout keeps the context as that
beginning, so each retrieval step is one completion request of `stride` tokens whose prompt (token ids) is
`context[:-tail] <MARK_L> passage <MARK_R> context[-tail:] generated`, and the engine recomputes only what follows
the previous passage's start. Prepending changes the prompt's first token at every retrieval, so the engine
recomputes everything. The served model is a `flashback export` (adapter merged, markers in the vocabulary); the
export folder given here supplies the same tokenizer, the marker ids and the architecture (for FLOP counts).

Two protocols, told apart by what the server answers:
- llama.cpp's native `POST /completion` (token-id prompt, `cache_prompt`, `return_tokens`, `timings`);
- the OpenAI completions API as vLLM extends it (token-id prompt, `return_token_ids`, `usage.prompt_tokens_details`
  when vLLM runs with `--enable-prompt-tokens-details`), streamed so that the first token's arrival splits prompt
  time from decode time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from flashback.engines.base import Forward
from flashback.engines.native import LLAMA_CPP_VERSION
from flashback.errors import FlashbackError
from flashback.registry import cache_root

LLAMA_SERVER_VERSION = LLAMA_CPP_VERSION  # the llama-cpp-python source package that setup_engines.sh builds it from


def llama_server_path() -> Path | None:
    """A llama-server binary: $FLASHBACK_LLAMA_SERVER, the one scripts/setup_engines.sh built, or one on PATH."""
    for candidate in (
        os.environ.get("FLASHBACK_LLAMA_SERVER"),
        cache_root() / "llama-server" / LLAMA_SERVER_VERSION / "llama-server",
        shutil.which("llama-server"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def vllm_python() -> Path | None:
    """A Python with vLLM: $FLASHBACK_VLLM_PYTHON, or the environment scripts/setup_engines.sh --vllm made."""
    for candidate in (os.environ.get("FLASHBACK_VLLM_PYTHON"), cache_root() / "vllm-venv" / "bin" / "python"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass(frozen=True)
class Completion:
    """One completion request's answer: the tokens, and what the engine says it computed."""

    tokens: list[int]
    stopped_at_eos: bool
    prompt_tokens: int  # prompt tokens the engine computed (the rest came from its prefix cache)
    cached_tokens: int  # prompt tokens reused from the prefix cache
    prompt_s: float  # engine time for the prompt
    decode_s: float  # engine time for the generated tokens


class _HTTPEngine:
    """What both protocols share: one HTTP connection, JSON requests, clear errors."""

    protocol: ClassVar[str]

    def __init__(self, url: str, timeout_s: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.context_size: int | None = None  # positions the server holds per sequence, once known
        self.slots: int | None = None  # llama-server: sequences held at once (vLLM: as many as its KV cache fits)

    def _check(self, response, path: str) -> None:
        if response.status_code != 200:
            try:
                error = response.json().get("error")
                message = (error.get("message") if isinstance(error, dict) else error) or response.text
            except (ValueError, AttributeError):
                message = response.text
            raise FlashbackError(f"upstream engine {self.url}{path} answered {response.status_code}: {message[:300]}")

    def _unreachable(self, exc: Exception) -> FlashbackError:
        """The error for a transport failure (refused, timed out, cut off), plain and streamed requests alike."""
        return FlashbackError(f"cannot reach the upstream engine at {self.url}: {exc}")

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            return self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def _post(self, path: str, body: dict) -> dict:
        response = self._request("POST", path, json=body)
        self._check(response, path)
        return response.json()

    def close(self) -> None:
        self.http.close()


class LlamaServerClient(_HTTPEngine):
    """A llama.cpp server (`llama-server`), which must serve the export's GGUF."""

    protocol = "llama.cpp"
    reports_cached_tokens = True  # timings.cache_n
    scopes_cache = False  # no cache salt: a scoped request's reuse is not reported (UpstreamSession)

    def read_props(self, response) -> dict:
        """What the server says of itself (GET /props, already answered): context size and slots."""
        try:
            props = response.json()
        except ValueError as exc:
            raise FlashbackError(f"{self.url} does not answer as a llama.cpp server (GET /props: {exc})") from None
        self.context_size = props.get("default_generation_settings", {}).get("n_ctx")
        self.slots = props.get("total_slots")  # sequences it holds at once, each with its own prefix cache
        return props

    def tokenize(self, text: str) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def complete(
        self,
        prompt: Sequence[int],
        n: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        banned: Sequence[int] = (),
        ignore_eos: bool = False,
        salt: str | None = None,
    ) -> Completion:
        """`n` tokens after `prompt` (n = 0: only evaluate the prompt into the engine's cache). llama-server has no
        cache salt: `salt` is ignored (scopes_cache False)."""
        body = {
            "prompt": [int(t) for t in prompt],
            "n_predict": n,
            "cache_prompt": True,
            "return_tokens": True,
            "temperature": temperature,  # <= 0: the highest logit (greedy)
            "top_p": top_p,
            "top_k": 0,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "dry_multiplier": 0.0,
            "logit_bias": [[int(t), False] for t in banned],  # never emitted
            "ignore_eos": ignore_eos,
        }
        if seed is not None:
            body["seed"] = seed % 2**32  # llama.cpp takes a 32-bit seed
        out = self._post("/completion", body)
        timings = out.get("timings", {})
        return Completion(
            tokens=[int(t) for t in out.get("tokens", [])],
            stopped_at_eos=out.get("stop_type") == "eos",
            prompt_tokens=int(timings.get("prompt_n", len(prompt))),
            cached_tokens=int(timings.get("cache_n", 0)),
            prompt_s=float(timings.get("prompt_ms", 0.0)) / 1000,
            decode_s=float(timings.get("predicted_ms", 0.0)) / 1000,
        )

    def forget(self, token: int) -> None:
        """Replace what each of the engine's slots holds by one token, so that the next request shares no prefix
        with the earlier ones (the bench: each run's context is new to the engine, as a new request's would be).
        A host-memory prompt cache (llama-server --cache-ram) may still restore older prompts."""
        for slot in range(self.slots or 1):
            self._post("/completion", {"prompt": [int(token)], "n_predict": 0, "cache_prompt": True, "id_slot": slot})


class OpenAIClient(_HTTPEngine):
    """An OpenAI-compatible completions server with vLLM's token-id extensions (`return_token_ids`)."""

    protocol = "openai"
    reports_cached_tokens = True  # until an answer comes without usage.prompt_tokens_details
    scopes_cache = True  # vLLM's cache_salt

    def models(self) -> dict:
        import httpx

        try:
            response = self.http.get("/v1/models")
            response.raise_for_status()
            served = response.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise FlashbackError(
                f"{self.url} does not answer as an OpenAI-compatible server (GET /v1/models: {exc})"
            ) from None
        if not served:
            raise FlashbackError(f"{self.url} serves no model")
        self.model = served[0]["id"]  # the first one, if several are served
        self.context_size = served[0].get("max_model_len")
        return served[0]

    def served_dtype(self) -> str | None:
        """The weights' dtype as vLLM loaded them (its GET /server_info, development mode only), e.g. "float32"."""
        import re

        import httpx

        try:
            response = self.http.get("/server_info")
            found = re.search(r"\bdtype=torch\.(\w+)", str(response.json().get("vllm_config", "")))
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return found.group(1) if response.status_code == 200 and found else None

    def tokenize(self, text: str) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return self._post("/tokenize", body)["tokens"]

    def complete(
        self,
        prompt: Sequence[int],
        n: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        banned: Sequence[int] = (),
        ignore_eos: bool = False,
        salt: str | None = None,
    ) -> Completion:
        """`n` tokens after `prompt`; n = 0 asks for one (vLLM's minimum) and drops it: the prompt's forward
        computes that token's logits anyway. `salt`: vLLM's `cache_salt` (only requests with the same salt share
        its prefix cache)."""
        body = {
            "model": self.model,
            "prompt": [int(t) for t in prompt],
            "max_tokens": max(1, n),
            "temperature": temperature,  # 0: greedy
            "top_p": top_p,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "logit_bias": {str(int(t)): -100.0 for t in banned},  # the API's floor: never chosen in practice
            "ignore_eos": ignore_eos,
            "return_token_ids": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if seed is not None:
            body["seed"] = int(seed)
        if salt is not None:
            body["cache_salt"] = salt
        t0 = time.perf_counter()
        tokens, finish, usage, first = self._stream(body)
        end = time.perf_counter()
        first = first or end
        usage = usage or {}
        details = usage.get("prompt_tokens_details")
        self.reports_cached_tokens = details is not None  # vLLM: only with --enable-prompt-tokens-details
        cached = int((details or {}).get("cached_tokens") or 0)
        return Completion(
            tokens=tokens[:n],
            # "stop" without a stop string is an end-of-sequence token (FlashBack sends no stop strings)
            stopped_at_eos=finish == "stop" and len(tokens) <= n,
            prompt_tokens=int(usage.get("prompt_tokens", len(prompt))) - cached,
            cached_tokens=cached,
            prompt_s=first - t0,  # the prompt's forward and the first token (one forward on the engine)
            decode_s=end - first,
        )

    def _stream(self, body: dict) -> tuple[list[int], str | None, dict | None, float | None]:
        """Send a streamed completion request: (token ids, finish reason, usage, when the first token came)."""
        import httpx

        tokens: list[int] = []
        finish = usage = first = None
        try:
            with self.http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    self._check(response, "/v1/completions")
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        raise FlashbackError(f"upstream engine {self.url} failed mid-stream: {chunk['error']}")
                    for choice in chunk.get("choices", []):
                        if choice.get("token_ids") is None:
                            raise FlashbackError(
                                f"{self.url} returns no token ids: FlashBack needs vLLM's `return_token_ids` "
                                "(an OpenAI-compatible server without it cannot be driven by token ids)"
                            )
                        if first is None and choice["token_ids"]:
                            first = time.perf_counter()
                        tokens += [int(t) for t in choice["token_ids"]]
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        return tokens, finish, usage, first

    def forget(self, token: int) -> None:
        """Clear the prefix cache (each bench run must start cold). vLLM offers this only in its development mode."""
        response = self._request("POST", "/reset_prefix_cache")
        if response.status_code == 404:
            raise FlashbackError(
                f"{self.url} cannot clear its prefix cache (POST /reset_prefix_cache: 404), so a bench run would "
                "find the previous run's context cached: start vLLM with VLLM_SERVER_DEV_MODE=1"
            )
        self._check(response, "/reset_prefix_cache")


UpstreamClient = LlamaServerClient | OpenAIClient


def connect(url: str) -> UpstreamClient:
    """A client for the server at `url`: llama.cpp's native protocol when it answers GET /props, else OpenAI's."""
    llama = LlamaServerClient(url)
    try:
        probe = llama._request("GET", "/props", timeout=10.0)
    except FlashbackError as exc:
        raise FlashbackError(
            f"{exc}; start one on the export, e.g. llama-server -m EXPORT/model-f16.gguf, or vLLM with --model EXPORT"
        ) from None
    if probe.status_code == 200:
        llama.read_props(probe)
        return llama
    llama.close()
    client = OpenAIClient(url)
    client.models()
    return client


def completion_forwards(done: Completion) -> list[Forward]:
    """The forwards one request stands for, in the local engines' terms (trace, bench): the prompt part the
    engine computed as one prefill/extend, then a decode per generated token after the first."""
    kind = "prefill" if done.cached_tokens == 0 else "extend"
    length = done.cached_tokens + done.prompt_tokens
    out = [Forward(kind, done.prompt_tokens, length, done.prompt_s)]
    steps = max(0, len(done.tokens) - 1)
    out += [Forward("decode", 1, length + i + 1, done.decode_s / steps) for i in range(steps)]
    return out
