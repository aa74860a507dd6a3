"""FlashBack: retrieval-augmented generation that appends passages and reuses the KV cache."""

from flashback.errors import FlashbackError

__all__ = ["FlashbackError"]
__version__ = "0.1.0"
