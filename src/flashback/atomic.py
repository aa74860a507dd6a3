"""Write a whole output folder or nothing: build it beside the target, then swap it in."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flashback.errors import FlashbackError


@contextmanager
def atomic_folder(out: str | Path, marker: str, what: str) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on any error it is removed.

    `marker` names the file that identifies a folder we wrote (`what` describes it for the error); a
    non-empty `out` without it is someone else's and is never overwritten.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise FlashbackError(f"{out} exists and is not a {what}; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
