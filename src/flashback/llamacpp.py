"""The llama.cpp engine: FlashBack's generation loop on an exported GGUF, in process.

The loop asks three verbs of an engine: extend, rollback, reset (cache.KVCache for PyTorch). llama.cpp has
all three: `Llama.eval` appends tokens to its KV cache, and setting `n_tokens` back before the next eval drops
the cells after it (eval removes them before writing). Only the last position's logits are read, straight
from the context, so nothing of size tokens x vocabulary is kept. The model is what `flashback export --gguf`
writes: the adapter merged and the markers in the vocabulary, since llama.cpp LoRAs cannot add tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from flashback.cache import Forward
from flashback.errors import FlashbackError


class LlamaCppCache:
    """KVCache's verbs over one llama.cpp context."""

    def __init__(self, llm):
        self.llm = llm
        self.llm.reset()
        self.forwards: list[Forward] = []

    def __len__(self) -> int:
        return self.llm.n_tokens

    @property
    def capacity(self) -> int:
        return len(self.llm.input_ids)  # what was asked for; llama.cpp may round its own n_ctx up

    def extend(self, token_ids: Sequence[int] | torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        import llama_cpp

        if all_logits:
            raise FlashbackError("the llama.cpp engine returns last-position logits only")
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("extend() needs at least one token")
        if len(self) + len(ids) > self.capacity:
            raise FlashbackError(f"the llama.cpp context holds {self.capacity} tokens")
        before = len(self)
        start = time.perf_counter()
        self.llm.eval(ids)
        row = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).copy())
        kind = "prefill" if before == 0 else ("decode" if len(ids) == 1 else "extend")
        self.forwards.append(Forward(kind, len(ids), len(self), time.perf_counter() - start))
        return logits

    def rollback(self, length: int) -> None:
        if length > len(self):
            raise ValueError(f"cannot roll back to {length}: only {len(self)} tokens are cached")
        self.llm.n_tokens = length  # the next eval removes the cells from here on

    def reset(self) -> None:
        self.llm.reset()


@dataclass
class LlamaCppModel:
    """What the generation loop needs of a model (model.LoadedModel's interface), served by llama.cpp."""

    llm: object
    tokenizer: object
    name: str
    marker_ids: tuple[int, int] | None
    eos: set[int]
    model: torch.nn.Module | None = None  # the architecture on the meta device: FLOP accounting (bench), no weights
    weight_bytes: int = 0  # the GGUF file: what one decode step reads of weights
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    adapters: dict = field(default_factory=dict)  # merged into the GGUF already
    dtype_name: str = "gguf"
    compile: bool = False  # PyTorch's decode options do not apply
    quantize: str | None = None
    compile_s: float = 0.0
    engine: ClassVar[str] = "llama.cpp"
    kv_value_bytes: ClassVar[int] = 2  # llama.cpp keeps keys and values in f16

    def decode_weight_bytes(self, mode: str | None) -> int:
        return self.weight_bytes

    @property
    def max_positions(self) -> int:
        return len(self.llm.input_ids)

    @property
    def eos_ids(self) -> set[int]:
        return self.eos

    def activate(self, mode: str | None) -> None:
        """Nothing to switch: the exported model has its adapter merged."""

    def decoder(self, mode: str | None):
        return None

    def new_cache(self, capacity: int | None = None, decoder=None) -> LlamaCppCache:
        return LlamaCppCache(self.llm)


def export_card(folder: str | Path) -> dict:
    """The card of a `flashback export --gguf` folder (position, markers, tail, the GGUF's name)."""
    from flashback.export import read_export_card

    card = read_export_card(folder) or {}
    if not card.get("gguf"):
        raise FlashbackError(f"{folder} is not an export with a GGUF file: run flashback export --gguf f16 --out DIR")
    return card


def load_llamacpp(
    folder: str | Path, n_ctx: int | None = None, threads: int | None = None, flash_attn: bool = False
) -> LlamaCppModel:
    """Load `flashback export --gguf` output: the GGUF its card names, the tokenizer beside it."""
    card = export_card(folder)
    try:
        from llama_cpp import Llama
    except ImportError:
        raise FlashbackError("--engine llamacpp needs llama-cpp-python (README: flashback export)") from None
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder).expanduser()
    config = AutoConfig.from_pretrained(folder)
    positions = int(getattr(config, "max_position_embeddings", 2048))
    threads = threads or torch.get_num_threads()
    llm = Llama(
        model_path=str(folder / card["gguf"]),
        n_ctx=min(n_ctx or positions, positions),
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash_attn,
        verbose=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = set() if eos is None else set(eos) if isinstance(eos, list) else {int(eos)}
    markers = tuple(card["marker_ids"]) if card.get("marker_ids") else None
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(config)
    gguf = folder / card["gguf"]
    return LlamaCppModel(
        llm,
        tokenizer,
        f"{folder.name} (llama.cpp)",
        markers,
        eos_ids,
        model=shape,
        weight_bytes=gguf.stat().st_size,
        dtype_name=f"gguf {card['gguf']}",
    )
