"""The cards FlashBack writes beside its artefacts, and what they say about the layout.

`flashback train` writes, beside the PEFT files of an adapter, `flashback.json`: which base model and
tokenizer the adapter was trained for and how (position, markers, tail). `flashback export` writes a
card of the same name into the merged model folder. Engines read cards; only their writers write them.
"""

from __future__ import annotations

import json
from pathlib import Path

from flashback.atomic import FolderKind
from flashback.errors import FlashbackError
from flashback.layout import Tuned

CARD = "flashback.json"
ADAPTER_FORMAT = "flashback-adapter/1"
EXPORT_FORMAT = "flashback-export/1"
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


def adapter_tuned(path: str | Path) -> Tuned:
    """The layout an adapter was tuned with: markers (on unless its card says otherwise) and tail."""
    return Tuned(markers=bool(read_card(path).get("markers", True)), tail=adapter_tail(path))


def read_export_card(folder: str | Path | None) -> dict | None:
    """The card of an export folder, or None when `folder` is not one (a hub id, a plain model folder)."""
    path = Path(folder or "").expanduser() / CARD
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and card.get("format", "").startswith("flashback-export/") else None


def export_tuned(card: dict) -> dict[str, Tuned]:
    """Mode -> layout the export's merged weights were tuned for (its card's position)."""
    position = card.get("position", "append")
    return {position: Tuned(markers=bool(card.get("markers")), tail=card.get("tail"))}
