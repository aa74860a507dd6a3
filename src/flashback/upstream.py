"""The upstream engine: FlashBack's retrieval and layout here, decoding on an inference server over HTTP.

An engine with a prefix cache (llama.cpp's `llama-server` with `cache_prompt`, vLLM's automatic prefix caching)
reuses the KV of any prompt that begins like the previous one. FlashBack's layout keeps the context as that
beginning, so each retrieval step is one completion request of `stride` tokens whose prompt (token ids) is
`context[:-tail] <MARK_L> passage <MARK_R> context[-tail:] generated`, and the engine recomputes only what follows
the previous passage's start. Prepending changes the prompt's first token at every retrieval, so the engine
recomputes everything. The served model is a `flashback export` (adapter merged, markers in the vocabulary); the
export folder given here supplies the same tokenizer, the marker ids and the architecture (for FLOP counts).

Protocol: llama.cpp's native `POST /completion` (token-id prompt, `return_tokens`, `cache_prompt`, `timings`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from flashback.cache import Forward
from flashback.errors import FlashbackError
from flashback.export import ExportedModel, exported_parts, read_export_card

LLAMA_SERVER_VERSION = "0.3.36"  # the llama-cpp-python source package that scripts/setup_engines.sh builds it from


def llama_server_path() -> Path | None:
    """A llama-server binary: $FLASHBACK_LLAMA_SERVER, the one scripts/setup_engines.sh built, or one on PATH."""
    from flashback.model import cache_root

    for candidate in (
        os.environ.get("FLASHBACK_LLAMA_SERVER"),
        cache_root() / "llama-server" / LLAMA_SERVER_VERSION / "llama-server",
        shutil.which("llama-server"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
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


class UpstreamClient:
    """A connection to a llama.cpp server (`llama-server`), which must serve the export's GGUF."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0))

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        try:
            response = self.http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise FlashbackError(f"cannot reach the upstream engine at {self.url}: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json().get("error", {}).get("message") or response.text
            except ValueError:
                message = response.text
            raise FlashbackError(f"upstream engine {self.url}{path} answered {response.status_code}: {message[:300]}")
        return response.json()

    def props(self) -> dict:
        import httpx

        try:
            response = self.http.get("/props")
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise FlashbackError(
                f"{self.url} does not answer as a llama.cpp server (GET /props failed: {exc}); "
                "start one with: llama-server -m EXPORT/model-f16.gguf"
            ) from None

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
    ) -> Completion:
        """`n` tokens after `prompt` (n = 0: only evaluate the prompt into the engine's cache)."""
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
        """Replace what the engine's slot holds by one token, so that the next request shares no prefix with the
        earlier ones (the bench: each run's context is new to the engine, as a new request's would be). With more
        than one slot, or a host-memory prompt cache (llama-server --cache-ram), older prompts may still be found."""
        self.complete([token], 0)

    def close(self) -> None:
        self.http.close()


def completion_forwards(done: Completion) -> list[Forward]:
    """The forwards one request stands for, in the local engines' terms (trace, bench): the prompt part the
    engine computed as one prefill/extend, then a decode per generated token after the first."""
    kind = "prefill" if done.cached_tokens == 0 else "extend"
    length = done.cached_tokens + done.prompt_tokens
    out = [Forward(kind, done.prompt_tokens, length, done.prompt_s)]
    steps = max(0, len(done.tokens) - 1)
    out += [Forward("decode", 1, length + i + 1, done.decode_s / steps) for i in range(steps)]
    return out


class UpstreamCache:
    """The three cache verbs over a prefix-caching server, for timing only (bench's bare forward).

    extend = evaluate what is held plus the new tokens (the engine reuses the held prefix); rollback = hold
    fewer tokens (the next request's prompt diverges there). No logits come back.
    """

    def __init__(self, client: UpstreamClient):
        self.client = client
        self.tokens: list[int] = []
        self.forwards: list[Forward] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, token_ids: Sequence[int] | torch.Tensor, all_logits: bool = False) -> None:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("extend() needs at least one token")
        self.tokens += ids
        done = self.client.complete(self.tokens, 0)
        self.forwards += completion_forwards(done)[:1]

    def rollback(self, length: int) -> None:
        if length > len(self.tokens):
            raise ValueError(f"cannot roll back to {length}: only {len(self.tokens)} tokens are held")
        del self.tokens[length:]

    def reset(self) -> None:
        self.tokens = []


@dataclass
class UpstreamModel(ExportedModel):
    """An export served by a llama.cpp server: decoding happens there (generate._request_loop)."""

    client: UpstreamClient | None = None
    engine: ClassVar[str] = "upstream"

    def new_cache(self, capacity: int | None = None, decoder=None) -> UpstreamCache:
        return UpstreamCache(self.client)

    def forget(self) -> None:
        """Make the server's slot hold one end-of-sequence token: the next prompt finds nothing of the earlier ones."""
        self.client.forget(min(self.eos, default=0))


def load_upstream(url: str, folder: str | Path) -> UpstreamModel:
    """Connect to `url`, which serves the export in `folder`; check that both tokenize alike, markers included."""
    card = read_export_card(folder)
    if card is None:
        raise FlashbackError(
            f"--upstream needs --model EXPORT, the folder `flashback export` wrote for the served model "
            f"({folder} is not one)"
        )
    folder = Path(folder).expanduser()
    client = UpstreamClient(url)
    props = client.props()
    parts = exported_parts(folder, card)
    tokenizer, markers = parts["tokenizer"], parts["marker_ids"]
    probe = "def f(x): return x  # FlashBack"
    if markers:
        probe = f"{tokenizer.convert_ids_to_tokens(markers[0])}{probe}{tokenizer.convert_ids_to_tokens(markers[1])}"
    if client.tokenize(probe) != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        raise FlashbackError(
            f"the model served at {url} tokenizes differently from {folder}: "
            f"serve that export's GGUF ({card.get('gguf')})"
        )
    served_ctx = props.get("default_generation_settings", {}).get("n_ctx") or parts["positions"]
    parts["positions"] = min(parts["positions"], int(served_ctx))
    return UpstreamModel(name=f"{folder.name} (upstream {client.url})", client=client, **parts)
