"""Write a whole output folder or nothing: build it beside the target, then swap it in.

An existing folder is replaced only when it is the same kind of FlashBack output: its marker file
names the same format (any version) and it holds nothing that kind does not write. Anything else
(someone's project that happens to have a manifest.json, an index given as --out to `prepare`) is
refused with an error and left untouched. Temporaries left by a killed process are removed by the
next write to the same place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from flashback.errors import FlashbackError


@dataclass(frozen=True)
class FolderKind:
    what: str  # for messages: "FlashBack index"
    marker: str  # the JSON file that carries "format"
    format: str  # "flashback-index/1": kind before the slash, version after
    files: frozenset[str]  # the top-level names this kind writes
    patterns: tuple[str, ...] = ()  # and names matching these (fnmatch), e.g. weight shards

    @property
    def family(self) -> str:
        return self.format.split("/", 1)[0]


def check_replaceable(out: Path, kind: FolderKind) -> None:
    """Raise unless `out` is absent, empty, or a folder of this kind that holds only its own files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FlashbackError(f"{out} exists and is a file, not a {kind.what}; refusing to replace it")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    try:
        fmt = json.loads((out / kind.marker).read_text()).get("format", "")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if not isinstance(fmt, str) or fmt.split("/", 1)[0] != kind.family:
        raise FlashbackError(
            f"{out} exists and is not a {kind.what} (its {kind.marker} does not say {kind.family}); "
            "refusing to replace it: choose another --out or remove the folder"
        )
    foreign = sorted(n for n in names - kind.files if not any(fnmatch(n, p) for p in kind.patterns))
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FlashbackError(
            f"{out} is a {kind.what} but also holds {listed}; refusing to replace it: move those away first"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `out` whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    removed = []
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextmanager
def atomic_folder(out: str | Path, kind: FolderKind) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on any error it is removed."""
    out = Path(out).expanduser()
    check_replaceable(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        written = json.loads((tmp / kind.marker).read_text()).get("format")
        if written != kind.format:  # a writer bug, not a user error: never swap in an unmarked folder
            raise RuntimeError(f"{kind.what} written without {kind.marker} format {kind.format!r}")
        check_replaceable(out, kind)  # the folder may have changed while we wrote
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
