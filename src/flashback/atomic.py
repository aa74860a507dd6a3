"""Write a whole output folder or nothing: build it beside the target, then swap it in.

An existing folder is replaced only when it is the same kind of FlashBack output: its marker file
names the same format (any version) and it holds nothing that kind does not write, at any depth.
Anything else (someone's project that happens to have a manifest.json, an index given as --out to
`prepare`, notes left in an index's subfolder) is refused with an error and left untouched. A symbolic
link is followed to the folder it names. Temporaries left by a killed process are removed by the next
write to the same place, and an output a killed process had moved aside to swap in a new one is put
back. Commands call `check_output` before their expensive work, so a refusal costs nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from flashback.errors import FlashbackError

NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems


@dataclass(frozen=True)
class FolderKind:
    what: str  # for messages: "FlashBack index"
    marker: str  # the JSON file that carries "format"
    format: str  # "flashback-index/1": kind before the slash, version after
    files: frozenset[str]  # the top-level names this kind writes
    patterns: tuple[str, ...] = ()  # and names matching these (fnmatch), e.g. weight shards
    nested: tuple[str, ...] = ()  # relative paths (fnmatch) of the files it writes inside its subfolders

    @property
    def family(self) -> str:
        return self.format.split("/", 1)[0]


def check_replaceable(out: Path, kind: FolderKind) -> None:
    """Raise unless `out` is absent, empty, or a folder of this kind that holds only its own files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FlashbackError(f"{out} exists and is a file, not a {kind.what}; refusing to replace it")
    if not any(out.iterdir()):
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
    foreign = _foreign(out, kind)
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FlashbackError(
            f"{out} is a {kind.what} but also holds {listed}; refusing to replace it: move those away first"
        )


def _foreign(out: Path, kind: FolderKind) -> list[str]:
    """What `out` holds that this kind does not write: top-level names, then files in its subfolders."""
    found = []
    for name in sorted(p.name for p in out.iterdir()):
        if name not in kind.files and not any(fnmatch(name, p) for p in kind.patterns):
            found.append(name)
    for root, dirs, files in os.walk(out):  # links are not followed: a link is a file here
        rel = Path(root).relative_to(out)
        if rel == Path(".") or rel.parts[0] in found:
            continue
        for name in sorted(files + [d for d in dirs if (Path(root) / d).is_symlink()]):
            path = (rel / name).as_posix()
            if not any(fnmatch(path, p) for p in kind.nested):
                found.append(path)
    return found


def resolve_output(out: str | Path) -> Path:
    """The folder an --out names: absolute, a symbolic link followed; a path that cannot become a folder is an
    error now, not after the work."""
    path = Path(os.path.abspath(Path(out).expanduser()))
    for part in path.parts:
        if len(part.encode()) > NAME_MAX - len(".tmp-4194304."):  # with room for the temporary sibling's suffix
            raise FlashbackError(f"cannot write {out}: the name {part[:40]}... is too long for the file system")
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            recover(target)  # a swap of the target cut between its renames
        if not target.exists():
            raise FlashbackError(f"{out} is a symbolic link to {target}, which does not exist")
        path = target
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FlashbackError(f"cannot write {out}: {parent} is a file, not a folder")
            _probe(out, parent)
            break
    return path


def _probe(out: str | Path, folder: Path) -> None:
    """Create and remove a file in `folder`: the only check that sees read-only mounts, immutable folders and
    /proc as a root user would meet them, before the work whose results would be lost."""
    try:
        fd, name = tempfile.mkstemp(prefix=".flashback-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise FlashbackError(f"cannot write {out}: {folder} is not writable ({exc.strerror or exc})") from None


def check_file(out: str | Path) -> Path:
    """A file a command will write at its end (--json, --plot): checked before the work that fills it."""
    path = resolve_output(out)
    if path.is_dir():
        raise FlashbackError(f"{out} is a folder; give a file name to write")
    return path


def check_output(out: str | Path, kind: FolderKind) -> Path:
    """Everything atomic_folder will check, up front: the resolved folder to write."""
    path = resolve_output(out)
    recover(path)
    check_replaceable(path, kind)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out: Path) -> list[Path]:
    """Clean up after killed writers of `out`: an earlier output they had moved aside (`.NAME.old-PID`) goes back to
    `out` if nothing took its place, and their half-written temporaries (`.NAME.tmp-PID`) are deleted."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    removed = []
    if out.parent.is_dir():
        for p in sorted(out.parent.iterdir()):
            m = pattern.fullmatch(p.name)
            if not m or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
                continue
            if m.group(1) == "old" and not out.exists():
                os.replace(p, out)  # the swap was cut between its two renames: the previous output returns
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _usual_modes(folder: Path) -> None:
    """Give every file and folder of a finished output the modes a plain write would (0644 / 0755 under the usual
    umask): writers that go through a temporary file (safetensors) leave 0600, which an engine or a server running
    as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_folder(out: str | Path, kind: FolderKind) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on any error it is removed."""
    out = check_output(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
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
        _usual_modes(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
