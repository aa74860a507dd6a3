"""FlashBack: retrieval-augmented generation that appends passages and reuses the KV cache."""

from flashback.errors import FlashbackError

__all__ = ["FlashBack", "FlashbackError", "Passage", "TextRetriever"]
__version__ = "0.2.0"


def __getattr__(name: str):
    # `from flashback import FlashBack` without importing torch for every `import flashback.x`
    if name in ("FlashBack", "Passage", "TextRetriever"):
        from flashback import api

        return getattr(api, name)
    raise AttributeError(name)
