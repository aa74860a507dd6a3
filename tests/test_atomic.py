"""Output folders: replaced only when they are the same kind of FlashBack output, never half written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import flashback.atomic as a
from flashback.atomic import FolderKind, atomic_folder, check_output, recover
from flashback.cli import main
from flashback.errors import FlashbackError

KIND = FolderKind("test folder", "manifest.json", "flashback-test/2", frozenset({"manifest.json", "data.txt"}))


def write(out, text="new"):
    with atomic_folder(out, KIND) as tmp:
        (tmp / "data.txt").write_text(text)
        (tmp / "manifest.json").write_text(json.dumps({"format": KIND.format}))


def test_someone_elses_folder_with_a_manifest_is_never_replaced(tmp_path):
    """The reproduction from the issue: a web project with its own manifest.json."""
    w = tmp_path / "w"
    (w / "src").mkdir(parents=True)
    (w / "manifest.json").write_text('{"name": "app"}')
    (w / "index.html").write_text("x")
    with pytest.raises(FlashbackError, match="not a test folder"):
        write(w)
    assert (w / "index.html").read_text() == "x" and (w / "src").is_dir()


def test_same_kind_is_replaced_but_not_with_foreign_files_in_it(tmp_path):
    out = tmp_path / "out"
    write(out, "one")
    write(out, "two")  # same kind, only its own files: replaced
    assert (out / "data.txt").read_text() == "two"
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "flashback-test/1"}))  # older version, same kind
    write(old)
    assert (old / "data.txt").read_text() == "new"
    (out / "notes.md").write_text("mine")
    with pytest.raises(FlashbackError, match="also holds notes.md"):
        write(out)
    assert (out / "notes.md").exists()


def test_prepare_refuses_to_overwrite_an_index(capsys, tiny_model_dir, tiny_index_dir, corpus_file, tmp_path):
    import shutil

    index_copy = tmp_path / "index"
    shutil.copytree(tiny_index_dir, index_copy)
    before = sorted(p.name for p in index_copy.iterdir())
    code = main(
        ["prepare", str(corpus_file), "--index", str(tiny_index_dir), "--model", str(tiny_model_dir)]
        + ["--out", str(index_copy), "--max-length", "128", "--stride", "8", "--query-tokens", "8", "--quiet"]
    )
    assert code == 2 and "not a prepared data folder" in capsys.readouterr().err
    assert sorted(p.name for p in index_copy.iterdir()) == before


def test_a_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    write(out, "kept")
    with pytest.raises(RuntimeError), atomic_folder(out, KIND) as tmp:
        (tmp / "data.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "data.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()  # the swap finished: what was moved aside is garbage
    (tmp_path / f".out.tmp-{dead.pid}").mkdir()
    (tmp_path / f".out.old-{dead.pid}").mkdir()
    (tmp_path / f".out.tmp-{os.getppid()}").mkdir()  # a live process's: left alone
    removed = recover(out)
    assert sorted(p.name for p in removed) == [f".out.old-{dead.pid}", f".out.tmp-{dead.pid}"]
    assert (tmp_path / f".out.tmp-{os.getppid()}").exists()


def test_a_swap_cut_between_its_renames_gets_the_previous_output_back(tmp_path, monkeypatch):
    """Killed after moving the old output aside and before moving the new one in: nothing at --out. The next
    write puts the previous output back before it decides anything, so the previous index is never lost."""
    kind = FolderKind("thing", "manifest.json", "thing/1", frozenset({"manifest.json", "data.txt"}))
    out = tmp_path / "out"
    with atomic_folder(out, kind) as tmp:
        (tmp / "manifest.json").write_text('{"format": "thing/1"}')
        (tmp / "data.txt").write_text("previous")
    real_replace = a.os.replace

    def cut(src, dst):  # the first rename (old aside) happens, then the process dies
        real_replace(src, dst)
        if str(dst).endswith(f".old-{os.getpid()}"):
            raise KeyboardInterrupt

    monkeypatch.setattr(a.os, "replace", cut)
    with pytest.raises(KeyboardInterrupt), atomic_folder(out, kind) as tmp:
        (tmp / "manifest.json").write_text('{"format": "thing/1"}')
        (tmp / "data.txt").write_text("new")
    monkeypatch.undo()
    assert not out.exists()
    aside = tmp_path / f".out.old-{os.getpid()}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside.rename(tmp_path / f".out.old-{dead.pid}")  # as a later process finds it: its writer is gone
    recover(out)
    assert (out / "data.txt").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_files_in_an_outputs_subfolders_are_never_deleted(tiny_model_dir, corpus_file, tmp_path, capsys):
    """An index holds a bm25/ subfolder: a note left in it makes the index someone's folder, at every depth."""
    from flashback.cli import main

    out = tmp_path / "idx"
    args = ["index", str(corpus_file), "--out", str(out), "--model", str(tiny_model_dir), "--quiet"]
    assert main(args) == 0
    assert main(args) == 0  # an index of its own files is replaced
    (out / "bm25" / "NOTES.txt").write_text("notes")
    assert main(args) == 2
    assert "bm25/NOTES.txt" in capsys.readouterr().err and (out / "bm25" / "NOTES.txt").read_text() == "notes"


def test_a_symlinked_out_is_followed_and_nothing_is_left_behind(tmp_path):
    kind = FolderKind("thing", "manifest.json", "thing/1", frozenset({"manifest.json", "data.txt"}))
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    for text in ("one", "two"):  # into an empty folder, then over its own output
        with atomic_folder(link, kind) as tmp:
            (tmp / "manifest.json").write_text('{"format": "thing/1"}')
            (tmp / "data.txt").write_text(text)
        assert link.is_symlink() and (real / "data.txt").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FlashbackError, match="does not exist"):
        check_output(dangling, kind)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlashbackError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "out", kind)


def test_sigterm_while_an_index_is_saved_leaves_no_temporary(tiny_model_dir, corpus_file, tmp_path):
    """The CLI turns SIGTERM into an exception, so the half-written folder is removed on the way out."""
    out = tmp_path / "idx"
    script = textwrap.dedent(
        f"""
        import sys, time
        import flashback.text.retrieval as r
        from flashback.cli import main
        original = r.Index.save
        def slow_save(self, out):
            import flashback.atomic as a
            with a.atomic_folder(out, r.INDEX_FOLDER) as tmp:
                (tmp / "started").write_text("x")
                print("saving", flush=True)
                time.sleep(60)
        r.Index.save = slow_save
        sys.exit(main(["index", {str(corpus_file)!r}, "--out", {str(out)!r}, "--model", {str(tiny_model_dir)!r},
                       "--chunk-tokens", "24", "--quiet"]))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    assert any(p.name.startswith(".idx.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    code = proc.wait(timeout=30)
    assert code == 143 and time.monotonic() - start < 30
    assert "terminated" in proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


def _immutable(folder) -> bool:
    """chattr +i: read-only even for root (chmod is not), where the file system and privileges allow it."""
    try:
        return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("command", ["index", "train", "export", "eval-json"])
def test_an_unwritable_output_is_refused_before_any_work(
    capsys, tiny_model_dir, tiny_index_dir, corpus_file, tmp_path, command
):
    """/proc/self is a folder nobody can create files in; a 300-character name fits no file system. Both are a
    one-line error (exit 2) before the model loads or a document is read."""
    model = ["--model", str(tiny_model_dir)]
    for out in ("/proc/self/flashback-out", str(tmp_path / ("x" * 300))):
        argv = {
            "index": ["index", str(corpus_file), *model, "--out", out],
            "train": ["train", "--data", str(tmp_path / "no-data"), *model, "--out", out, "--max-steps", "1"],
            "export": ["export", *model, "--adapter", str(tmp_path / "no-adapter"), "--out", out],
            "eval-json": ["eval", str(corpus_file), *model, "--index", str(tiny_index_dir), "--json", out],
        }[command]
        start = time.perf_counter()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("flashback: error: cannot write") and "Traceback" not in err, err
        assert ("not writable" in err) if out.startswith("/proc") else ("too long" in err)
        assert time.perf_counter() - start < 5


def test_an_immutable_folder_is_refused_before_the_work(capsys, tiny_model_dir, corpus_file, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _immutable(ro):
        pytest.skip("chattr +i is not available here")
    try:
        assert main(["index", str(corpus_file), "--model", str(tiny_model_dir), "--out", str(ro / "idx")]) == 2
        assert "is not writable" in capsys.readouterr().err
        assert not any(ro.iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=False)
