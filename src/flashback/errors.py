"""The one exception type the CLI and server turn into a clean error message."""


class FlashbackError(Exception):
    """A user-facing error: bad input, missing files, mismatched artefacts."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors that wrap a library's."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
