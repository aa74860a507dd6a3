"""The llama.cpp engine: FlashBack's generation loop on an exported GGUF, in process.

llama.cpp has the three cache verbs: `Llama.eval` appends tokens to its KV cache, and setting `n_tokens` back
before the next eval drops the cells after it (eval removes them before writing). Only the last position's
logits are read, straight from the context, so nothing of size tokens x vocabulary is kept. The model is what
`flashback export --gguf` writes: the adapter merged and the markers in the vocabulary, since llama.cpp LoRAs
cannot add tokens. One context holds one sequence, so the engine serves one generation at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flashback.cards import read_export_card
from flashback.engines.base import Capabilities, Forward, Session, SessionSpec, forward_kind
from flashback.engines.exported import ExportedEngine, exported_parts
from flashback.engines.native import INSTALL_LLAMA_CPP
from flashback.errors import FlashbackError


class LlamaCppSession(Session):
    """The cache verbs over the engine's one llama.cpp context."""

    def __init__(self, llm):
        self.llm = llm
        self.llm.reset()
        self.forwards: list[Forward] = []

    def __len__(self) -> int:
        return self.llm.n_tokens

    @property
    def context_size(self) -> int:
        return len(self.llm.input_ids)  # what was asked for; llama.cpp may round its own n_ctx up

    def extend(
        self, token_ids: Sequence[int] | torch.Tensor, all_logits: bool = False, last_logits: int = 0
    ) -> torch.Tensor:
        import llama_cpp

        if all_logits or last_logits > 1:
            raise FlashbackError("the llama.cpp engine returns last-position logits only")
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("extend() needs at least one token")
        if len(self) + len(ids) > self.context_size:
            raise FlashbackError(f"the llama.cpp context holds {self.context_size} tokens")
        before = len(self)
        start = time.perf_counter()
        self.llm.eval(ids)
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).copy())
        self.forwards.append(Forward(forward_kind(before, len(ids)), len(ids), len(self), time.perf_counter() - start))
        return logits

    def rollback(self, length: int) -> None:
        if length > len(self):
            raise ValueError(f"cannot roll back to {length}: only {len(self)} tokens are cached")
        self.llm.n_tokens = length  # the next eval removes the cells from here on

    def reset(self) -> None:
        self.llm.reset()


class LlamaCppEngine(ExportedEngine):
    """An export's GGUF, run in this process by llama.cpp."""

    capabilities = Capabilities(logits="last", sequences=1)
    kind = "llama.cpp"

    def __init__(self, llm, **parts):
        super().__init__(**parts)
        self.llm = llm

    def session(self, spec: SessionSpec = SessionSpec()) -> LlamaCppSession:  # noqa: B008 - frozen
        return LlamaCppSession(self.llm)


def gguf_export_card(folder: str | Path) -> dict:
    """The card of a `flashback export --gguf` folder (mode, markers, tail, the GGUF's name)."""
    card = read_export_card(folder) or {}
    if not card.get("gguf"):
        raise FlashbackError(f"{folder} is not an export with a GGUF file: run flashback export --gguf f16 --out DIR")
    return card


def load_llamacpp(
    folder: str | Path, n_ctx: int | None = None, threads: int | None = None, flash_attn: bool = False
) -> LlamaCppEngine:
    """Load `flashback export --gguf` output: the GGUF its card names, the tokenizer beside it."""
    from flashback.engines.native import ensure_llama_cpp_runs
    from flashback.registry import cache_root

    card = gguf_export_card(folder)
    try:
        from llama_cpp import Llama
    except ImportError:
        raise FlashbackError(f"--engine llamacpp needs llama-cpp-python: {INSTALL_LLAMA_CPP}") from None
    ensure_llama_cpp_runs(cache_root())  # a build for another CPU would kill this process at the first decode
    folder = Path(folder).expanduser()
    parts = exported_parts(folder, card)
    threads = threads or torch.get_num_threads()
    llm = Llama(
        model_path=str(folder / card["gguf"]),
        n_ctx=min(n_ctx or parts["max_positions"], parts["max_positions"]),
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash_attn,
        swa_full=True,  # a cut sliding-window cache accepts a rollback but leaves it inexact (docs/design.md)
        verbose=False,
    )
    parts["max_positions"] = len(llm.input_ids)  # the context asked for (llama.cpp may round its own n_ctx up)
    return LlamaCppEngine(llm, name=f"{folder.name} (llama.cpp)", **parts)
