"""Token ids at the edges: user and corpus text to ids, the marking tokens, tokenizer identity.

Imports no torch at module level, so indexing and retrieval stay light; `load_tokenizer` imports
transformers when it is called.
"""

from __future__ import annotations

import hashlib
import json

from flashback.errors import FlashbackError, first_line
from flashback.registry import resolve_model_path

MARK_L = "<MARK_L>"
MARK_R = "<MARK_R>"
MARKERS = (MARK_L, MARK_R)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of user text or corpus text: never special tokens.

    A prompt or passage that contains the text "<MARK_L>" or "<|endoftext|>" gets the ordinary
    tokens of those characters, so only FlashBack itself places markers. Lone surrogates (text
    that is not valid Unicode) are refused with a clear error instead of a tokenizer crash.
    """
    return encode_batch(tokenizer, [text])[0]


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FlashbackError(f"the text is not valid Unicode ({exc.reason} at character {exc.start})") from None
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def text_head(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before every text when asked to (BOS for Gemma and Llama 2/3,
    nothing for SmolLM2 or GPT-2). `encode` never adds them; the layouts put them first, once."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    at = next((i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain), 0)
    return [int(t) for t in with_special[:at]]


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FlashbackError(f"cannot load tokenizer from {path!r}: {first_line(exc)}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a vocabulary, ignoring the marking tokens, so indexes can check they match."""
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if t not in MARKERS}
    blob = json.dumps(sorted(vocab.items()), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
