"""Attach a trained FlashBack LoRA adapter (PEFT) to a base model, checking it belongs to it.

`flashback train` writes, beside the PEFT files, `flashback.json`: the card that says which base
model and tokenizer the adapter was trained for and how. Training itself lives in train.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from flashback.atomic import FolderKind
from flashback.errors import FlashbackError

CARD = "flashback.json"
ADAPTER_FORMAT = "flashback-adapter/1"
ADAPTER_FOLDER = FolderKind(
    "FlashBack adapter folder",
    CARD,
    ADAPTER_FORMAT,
    frozenset({CARD, "adapter_config.json", "adapter_model.safetensors", "README.md"}),
)


def read_card(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FlashbackError(f"{path} is not an adapter folder (no adapter_config.json)")
    card = path / CARD
    if not card.is_file():
        return {}
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as exc:
        raise FlashbackError(f"{card} is corrupt: {exc}") from None


def adapter_tail(path: str | Path | None) -> int | None:
    """The tail an adapter was trained with: its card's `tail`, 0 for cards written before tails existed."""
    if not path:
        return None
    card = read_card(path)
    return int(card.get("tail", 0)) if card else None


def adapter_position(path: str | Path) -> str:
    """The layout an adapter was trained for (append unless its card says otherwise)."""
    position = read_card(path).get("position", "append")
    if position not in ("append", "prepend"):
        raise FlashbackError(f"adapter {path}: unknown position {position!r} in its card")
    return position


def attach_adapters(model, tokenizer, plan: dict[str, str], base_name: str):
    """Wrap `model` in the PEFT adapters of `plan` (mode -> folder), each named after its mode.

    The tokenizer must already hold the markers. Each adapter's card must match the tokenizer.
    """
    from peft import PeftModel

    from flashback.model import tokenizer_fingerprint

    for mode, path in plan.items():
        card = read_card(path)
        want = card.get("tokenizer_fingerprint")
        if want and want != tokenizer_fingerprint(tokenizer):
            raise FlashbackError(
                f"adapter {path} was trained for another tokenizer/base model ({card.get('base_model')}), "
                f"not {base_name}"
            )
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(path), adapter_name=mode)
            else:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=mode)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FlashbackError(f"cannot load adapter {path} onto {base_name}: {first}") from None
    return model
