"""The upstream engine: FlashBack's retrieval and layout here, decoding on an inference server over HTTP.

Each stretch between two retrievals is one completion request whose prompt (token ids) is the layout the
local cache would hold: `context[:-tail] <MARK_L> passage <MARK_R> context[-tail:] generated`. A server with a
prefix cache (llama-server's `cache_prompt`, vLLM's automatic prefix caching) reuses the KV of the part that
begins like the previous request, which in FlashBack's layout is the context before the old passage; a
prepended passage changes the first token, so the server recomputes everything. The served model is a
`flashback export`; the export folder given here supplies the same tokenizer, the markers and the shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from flashback.engines.base import Capabilities, Forward, Observer, Sampling, Session, SessionSpec, Stretch
from flashback.engines.exported import ExportedEngine, export_card, exported_parts
from flashback.engines.upstream.clients import Completion, UpstreamClient, completion_forwards, connect
from flashback.errors import FlashbackError
from flashback.layout import StepPlan


class UpstreamSession(Session):
    """The tokens a server holds for one sequence (its prefix cache keeps their KV).

    `begin` sends the plan's layout as one completion request. The cache verbs are for timing only (the bench's
    bare forward): extend = evaluate what is held plus the new tokens; rollback = hold fewer tokens (the next
    prompt diverges there). No logits come back.
    """

    def __init__(self, client: UpstreamClient, salt: str | None = None):
        self.client, self.salt = client, salt
        self.tokens: list[int] = []
        self.forwards: list[Forward] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, token_ids: Sequence[int] | torch.Tensor, all_logits: bool = False, last_logits: int = 0) -> None:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("extend() needs at least one token")
        self.tokens += ids
        done = self.client.complete(self.tokens, 0, salt=self.salt)
        self.forwards += completion_forwards(done)[:1]

    def rollback(self, length: int) -> None:
        if length > len(self.tokens):
            raise ValueError(f"cannot roll back to {length}: only {len(self.tokens)} tokens are held")
        del self.tokens[length:]

    def begin(
        self, plan: StepPlan, n: int, sampling: Sampling, observe: Observer | None, step: int, chunk: int | None = None
    ) -> Stretch:  # one request: the server does its own chunking
        if observe is not None:
            raise FlashbackError("an upstream engine returns tokens, not logits (no logprobs, no echo scoring)")
        self.rollback(plan.keep)
        self.tokens += plan.prefix + plan.feed
        done: Completion = self.client.complete(
            self.tokens,
            n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            banned=sampling.banned,
            ignore_eos=not sampling.stop_at_eos,
            salt=self.salt,
        )
        self.forwards += completion_forwards(done)
        tokens = done.tokens[:n]
        self.tokens += tokens
        # a server that cannot keep a scoped request's cache apart (llama-server) must not tell it what others sent
        cached = done.cached_tokens if self.salt is None or self.client.scopes_cache else 0
        return Stretch(iter(tokens), done.prompt_tokens, cached, lambda: done.stopped_at_eos)


class UpstreamEngine(ExportedEngine):
    """An export served by an inference server."""

    kind = "upstream"

    def __init__(self, client: UpstreamClient, kv_value_bytes: int = 2, **parts):
        super().__init__(**parts)
        self.client = client
        self.kv_value_bytes = kv_value_bytes  # llama.cpp keeps keys and values in f16; vLLM in the model's dtype

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            logits="none",
            sequences=getattr(self.client, "slots", None),
            remote=True,
            counts_cached_tokens=getattr(self.client, "reports_cached_tokens", False),
        )

    def session(self, spec: SessionSpec = SessionSpec()) -> UpstreamSession:  # noqa: B008 - frozen
        return UpstreamSession(self.client, spec.salt)

    def forget(self) -> None:
        """Make the server drop what it cached (llama-server: each slot then holds one end-of-sequence token; vLLM:
        its prefix cache is cleared), so that the next prompt finds nothing of the earlier ones."""
        self.client.forget(min(self.eos_ids, default=0))


def load_upstream(url: str, folder: str | Path, card: dict | None = None) -> UpstreamEngine:
    """Connect to `url`, which serves the export in `folder`; check that both tokenize alike, markers included."""
    card = card if card is not None else export_card(folder, "--upstream")
    folder = Path(folder).expanduser()
    client = connect(url)
    parts = exported_parts(folder, card)
    tokenizer, markers = parts["tokenizer"], parts["marker_ids"]
    probe = "def f(x): return x  # FlashBack"
    if markers:
        probe = f"{tokenizer.convert_ids_to_tokens(markers[0])}{probe}{tokenizer.convert_ids_to_tokens(markers[1])}"
    if client.tokenize(probe) != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        served = card.get("gguf") if client.protocol == "llama.cpp" else folder
        raise FlashbackError(f"the model served at {url} tokenizes differently from {folder}: serve {served}")
    parts["max_positions"] = min(parts["max_positions"], int(client.context_size or parts["max_positions"]))
    kv_value_bytes = 2
    if client.protocol == "openai":  # vLLM serves the folder's weights, in the dtype it was started with
        served = client.served_dtype()
        dtype = getattr(torch, served or card.get("dtype") or "float32")
        kv_value_bytes = dtype.itemsize  # vLLM's default KV cache dtype is the model's
        parts["weight_bytes"] = parts["arch"].params * dtype.itemsize
        parts["dtype_name"] = f"vLLM {str(dtype).removeprefix('torch.')}" + ("" if served else " (assumed)")
    name = f"{folder.name} (upstream {client.url}, {client.protocol})"
    return UpstreamEngine(client, kv_value_bytes, name=name, **parts)
