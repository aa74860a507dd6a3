"""The cards FlashBack writes beside its artefacts, and what they say about the layout.

`flashback train` writes, beside the PEFT files of an adapter, `flashback.json`: which base model and
tokenizer the adapter was trained for and how (mode, markers, tail), and which endpoint (chat or text: whether
its data held chats). `flashback export` writes a card of the same name into the merged model folder. Engines read
cards; only their writers write them.

An engine holds its adapters by slot: the mode's name for a text adapter, `MODE-chat` for a chat adapter. A request
takes its endpoint's slot of its mode, else the other endpoint's (pick_slot), so one adapter given for a mode serves
both completions and chats.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from flashback.atomic import FolderKind
from flashback.errors import FlashbackError
from flashback.layout import Tuned

CARD = "flashback.json"
ENDPOINTS = ("text", "chat")
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


def card_mode(card: dict) -> str:
    """The mode a card's weights were tuned for: its `mode` (`position` in cards written before the key was renamed),
    append when it says neither."""
    return card.get("mode", card.get("position", "append"))


def adapter_mode(path: str | Path) -> str:
    """The mode an adapter was trained for (append unless its card says otherwise)."""
    mode = card_mode(read_card(path))
    if mode not in ("append", "prepend"):
        raise FlashbackError(f"adapter {path}: unknown mode {mode!r} in its card")
    return mode


def adapter_endpoint(path: str | Path) -> str:
    """What an adapter was trained for: "chat" when its card says so (or, for cards written before the key existed,
    when its training data held chats, `qa --prepare`'s), else "text"."""
    card = read_card(path)
    if "endpoint" in card:
        if card["endpoint"] not in ENDPOINTS:
            raise FlashbackError(f"adapter {path}: unknown endpoint {card['endpoint']!r} in its card")
        return card["endpoint"]
    return data_endpoint(card.get("data_manifest") or {})


def data_endpoint(manifest: dict) -> str:
    """ "chat" when a training data manifest (or a mix of them) holds chats, else "text"."""
    parts = manifest.get("mixed", [manifest])
    return "chat" if any(part.get("settings", {}).get("source") == "qa" for part in parts) else "text"


def slot_name(mode: str, chat: bool) -> str:
    return f"{mode}-chat" if chat else mode


def adapter_slot(path: str | Path) -> str:
    """The slot an adapter fills: its mode, and its endpoint."""
    return slot_name(adapter_mode(path), adapter_endpoint(path) == "chat")


def slot_mode(slot: str) -> str:
    return slot.removesuffix("-chat")


def pick_slot(slots: Iterable[str], mode: str | None, chat: bool) -> str | None:
    """The slot that serves `mode` for a chat (or a completion): the endpoint's own, else the other endpoint's of the
    same mode, else None."""
    if mode is None:
        return None
    held = set(slots)
    for slot in (slot_name(mode, chat), slot_name(mode, not chat)):
        if slot in held:
            return slot
    return None


def for_endpoint(tuned: dict[str, Tuned], chat: bool) -> dict[str, Tuned]:
    """Mode -> how the weights that serve it were tuned, for chats or for completions (slots read as pick_slot)."""
    modes = {slot_mode(slot) for slot in tuned}
    return {mode: tuned[pick_slot(tuned, mode, chat)] for mode in modes}


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
    """Mode -> layout the export's merged weights were tuned for (its card's mode)."""
    return {card_mode(card): Tuned(markers=bool(card.get("markers")), tail=card.get("tail"))}
