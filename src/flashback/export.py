"""Export a base model with a FlashBack adapter merged in, for inference engines.

vLLM and llama.cpp cannot take our adapter as it is: neither lets a LoRA add vocabulary rows, and the
two marking tokens are new rows. So the export is a plain Hugging Face model folder: the LoRA folded
into the weights, the marker rows in the embedding, the markers in the tokenizer (as special tokens,
so they keep their ids), and FlashBack's card (`flashback.json`) saying how the layout was trained.
Any engine that loads a transformers folder (vLLM, SGLang, transformers itself) serves it.
"""

from __future__ import annotations

import json
from pathlib import Path

from flashback.adapter import adapter_position, adapter_tail, read_card
from flashback.atomic import FolderKind, atomic_folder
from flashback.decode import merged_copy
from flashback.model import load_model

EXPORT_FORMAT = "flashback-export/1"
EXPORT_FOLDER = FolderKind(
    "FlashBack exported model",
    "flashback.json",
    EXPORT_FORMAT,
    frozenset(
        {
            "flashback.json",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "chat_template.jinja",
            "vocab.json",
            "merges.txt",
        }
    ),
    patterns=("model-*-of-*.safetensors",),
)


def export(adapter: str | Path, out: str | Path, model: str | None = None, dtype: str = "float32") -> dict:
    """Write the merged model to `out` (whole or nothing); return its card."""
    position = adapter_position(adapter)
    lm = load_model(model, dtype=dtype, markers=True, adapters={position: str(adapter)})
    merged = merged_copy(lm.model, position)
    source = read_card(adapter)
    card = {
        "format": EXPORT_FORMAT,
        "position": position,
        "markers": bool(source.get("markers", True)),
        "marker_ids": list(lm.marker_ids),
        "marker_tokens": lm.tokenizer.convert_ids_to_tokens(list(lm.marker_ids)),
        "tail": adapter_tail(adapter),
        "adapter": str(Path(adapter).resolve()),
        "base_model": lm.name,
        "dtype": dtype,
    }
    with atomic_folder(out, EXPORT_FOLDER) as tmp:
        merged.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / "flashback.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
