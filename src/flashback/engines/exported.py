"""What the engines that run a `flashback export` folder share: the folder's tokenizer, markers, positions,
architecture (on the meta device: no weights) and card, read once."""

from __future__ import annotations

from pathlib import Path

import torch

from flashback.cards import export_tuned, read_export_card
from flashback.engines.base import Architecture, Engine
from flashback.errors import FlashbackError
from flashback.layout import Tuned


class ExportedEngine(Engine):
    """An export's tokenizer and shape; the weights run elsewhere (llama.cpp, an inference server), with the
    adapter merged and the markers in the vocabulary."""

    def __init__(
        self,
        *,
        name: str,
        tokenizer,
        marker_ids: tuple[int, int] | None,
        eos_ids: set[int],
        max_positions: int,
        arch: Architecture | None = None,
        tuned: dict[str, Tuned] | None = None,
        weight_bytes: int = 0,
        dtype_name: str = "export",
    ):
        self.name, self.tokenizer, self.marker_ids = name, tokenizer, marker_ids
        self.eos_ids, self.max_positions, self.arch = set(eos_ids), max_positions, arch
        self.tuned = dict(tuned or {})
        self.weight_bytes = weight_bytes  # the GGUF file: what one decode step reads of weights
        self.dtype_name = dtype_name
        self.device = torch.device("cpu")

    def decode_weight_bytes(self, mode: str | None) -> int:
        return self.weight_bytes


def exported_parts(folder: str | Path, card: dict) -> dict:
    """ExportedEngine's fields that an export folder gives: tokenizer, markers, end-of-sequence ids, positions,
    the architecture (read off the model built on the meta device), the tuned layout, and the GGUF's size."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder).expanduser()
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(config)
    gguf = folder / card["gguf"] if card.get("gguf") else None
    has_gguf = gguf is not None and gguf.exists()
    return {
        "tokenizer": tokenizer,
        "marker_ids": tuple(card["marker_ids"]) if card.get("marker_ids") else None,
        "eos_ids": set() if eos is None else set(eos) if isinstance(eos, list) else {int(eos)},
        "max_positions": int(getattr(config, "max_position_embeddings", 2048)),
        "arch": Architecture.of(shape),
        "tuned": export_tuned(card),
        "weight_bytes": gguf.stat().st_size if has_gguf else 0,
        "dtype_name": f"gguf {card['gguf']}" if has_gguf else "export",
    }


def export_card(folder: str | Path, what: str) -> dict:
    """The card of an export folder, or a clear error naming what needed one."""
    card = read_export_card(folder)
    if card is None:
        raise FlashbackError(
            f"{what} needs --model EXPORT, the folder `flashback export` wrote for the served model "
            f"({folder} is not one)"
        )
    return card
