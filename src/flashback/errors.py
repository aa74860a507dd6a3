"""The one exception type the CLI and server turn into a clean error message."""


class FlashbackError(Exception):
    """A user-facing error: bad input, missing files, mismatched artefacts."""
