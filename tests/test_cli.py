"""The command line, end to end in-process: happy paths and every bad input the core issue names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashback.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, pattern):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("flashback: error:")]
    assert len(lines) == 1 and pattern in lines[0], err
    assert "Traceback" not in err


def test_index_search_generate(capsys, tiny_model_dir, corpus_file, tmp_path):
    out_dir = tmp_path / "idx"
    code, out, _ = run_cli(
        capsys,
        "index",
        corpus_file,
        "--out",
        out_dir,
        "--model",
        tiny_model_dir,
        "--chunk-tokens",
        24,
        "--quiet",
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["documents"] == 18 and summary["passages"] > 18
    manifest = (out_dir / "manifest.json").read_text()  # names, never the folders the corpus and model lay in
    assert json.loads(manifest)["sources"] == [Path(corpus_file).name]
    assert str(Path(corpus_file).parent) not in manifest and str(tiny_model_dir) not in manifest

    code, out, _ = run_cli(capsys, "search", out_dir, "reference counting garbage collectors", "-k", 2, "--json")
    hits = json.loads(out)
    assert code == 0 and len(hits) == 2 and hits[0]["title"] == "garbage"

    code, out, _ = run_cli(
        capsys,
        "generate",
        "--index",
        out_dir,
        "--model",
        tiny_model_dir,
        "--prompt",
        "A kludge is",
        "--max-new-tokens",
        20,
        "--json",
        "--markers",
    )
    result = json.loads(out)
    assert code == 0 and len(result["token_ids"]) == 20 and result["retrievals"][0]["step"] == 0

    code, out, _ = run_cli(
        capsys,
        "generate",
        "--index",
        out_dir,
        "--model",
        tiny_model_dir,
        "--prompt",
        "A kludge is",
        "--max-new-tokens",
        20,
        "--mode",
        "prepend",
    )
    assert code == 0 and out.endswith("\n") and len(out) > 1


def test_empty_corpus(capsys, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_cli(capsys, "index", empty, "--out", tmp_path / "idx", "--model", tiny_model_dir, "--quiet")
    assert_clean_error(code, err, "no text")
    assert not (tmp_path / "idx").exists()


def test_malformed_jsonl(capsys, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops}\n')
    code, _, err = run_cli(capsys, "index", bad, "--out", tmp_path / "idx", "--model", tiny_model_dir, "--quiet")
    assert_clean_error(code, err, "bad.jsonl:2")
    assert not (tmp_path / "idx").exists()


def test_missing_and_corrupt_index(capsys, tiny_model_dir, tiny_index_dir, tmp_path):
    code, _, err = run_cli(
        capsys, "generate", "--index", tmp_path / "nope", "--model", tiny_model_dir, "--prompt", "hi"
    )
    assert_clean_error(code, err, "not found")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("garbage")
    code, _, err = run_cli(capsys, "search", corrupt, "hi")
    assert_clean_error(code, err, "corrupt")


def test_index_from_another_tokenizer(capsys, other_tokenizer_model_dir, tiny_index_dir):
    code, _, err = run_cli(
        capsys,
        "generate",
        "--index",
        tiny_index_dir,
        "--model",
        other_tokenizer_model_dir,
        "--prompt",
        "hello there",
    )
    assert_clean_error(code, err, "another tokenizer")


def test_k_larger_than_corpus(capsys, tiny_model_dir, tiny_index_dir):
    code, _, err = run_cli(
        capsys,
        "generate",
        "--index",
        tiny_index_dir,
        "--model",
        tiny_model_dir,
        "--prompt",
        "hello",
        "--k",
        100000,
    )
    assert_clean_error(code, err, "passages take 2400000 of the model's 512 positions")
    code, _, err = run_cli(capsys, "search", tiny_index_dir, "hello", "-k", 100000)
    assert_clean_error(code, err, "larger than the index")


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(capsys, tiny_model_dir, tiny_index_dir, prompt):
    code, _, err = run_cli(capsys, "generate", "--index", tiny_index_dir, "--model", tiny_model_dir, "--prompt", prompt)
    assert_clean_error(code, err, "prompt is empty")


def test_missing_prompt_file(capsys, tiny_model_dir, tiny_index_dir, tmp_path):
    code, _, err = run_cli(
        capsys,
        "generate",
        "--index",
        tiny_index_dir,
        "--model",
        tiny_model_dir,
        "--prompt-file",
        tmp_path / "none.txt",
    )
    assert_clean_error(code, err, "cannot read prompt file")


def test_missing_model(capsys, tiny_index_dir, tmp_path):
    code, _, err = run_cli(
        capsys, "generate", "--index", tiny_index_dir, "--model", tmp_path / "no-model", "--prompt", "hello"
    )
    assert_clean_error(code, err, "model folder")
    assert "does not exist" in err and "Repo id" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        capsys, "generate", "--index", tiny_index_dir, "--model", tmp_path / "empty", "--prompt", "x"
    )
    assert_clean_error(code, err, "cannot load")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", 22, "--max-new-tokens", 1], "positions: no room for a prompt"),
        (["--seed", 2**64, "--temperature", 0.7], "seed must be between"),
        (["--tail", -1], "tail must be"),
    ],
)
def test_generate_settings_that_cannot_work(capsys, tiny_model_dir, tiny_index_dir, argv, message):
    base = ["generate", "--index", tiny_index_dir, "--model", tiny_model_dir, "--prompt", "hello"]
    code, _, err = run_cli(capsys, *base, *argv)
    assert_clean_error(code, err, message)


def test_tiny_temperature_generates(capsys, tiny_model_dir, tiny_index_dir):
    args = ["--index", tiny_index_dir, "--model", tiny_model_dir, "--prompt", "A kludge", "--max-new-tokens", 5]
    code, out, err = run_cli(capsys, "generate", *args, "--mode", "none", "--temperature", "1e-300", "--json")
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", 70000], "not a TCP port"),
        (["--max-active", 0], "--max-active must be at least 1"),
        (["--max-body-bytes", 0], "--max-body-bytes must be at least 1"),
        (["--tail", -1], "tail must be >= 0"),
    ],
)
def test_serve_settings_that_cannot_work(capsys, tiny_model_dir, tiny_index_dir, argv, message):
    code, _, err = run_cli(capsys, "serve", "--index", tiny_index_dir, "--model", tiny_model_dir, *argv)
    assert_clean_error(code, err, message)


def test_an_adapter_is_not_applied_to_another_mode(capsys, tiny_model_dir, tiny_index_dir, tmp_path):
    from flashback.cards import ADAPTER_FORMAT, CARD

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / CARD).write_text(json.dumps({"format": ADAPTER_FORMAT, "position": "append"}))
    for mode in ("prepend", "none"):
        argv = ["--index", tiny_index_dir, "--model", tiny_model_dir, "--prompt", "x", "--adapter", adapter]
        code, _, err = run_cli(capsys, "generate", *argv, "--mode", mode)
        assert_clean_error(code, err, f"trained for append mode; --mode {mode} does not use it")


def test_outputs_are_checked_before_the_work(
    capsys, tiny_model_dir, tiny_index_dir, corpus_file, tmp_path, monkeypatch
):
    """A refused --out or --json costs nothing: train refuses a user's folder (or one named like its checkpoint)
    before loading anything, eval refuses a --json folder before evaluating, and the user's files stay."""
    import flashback.evaluate

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    ckpt = tmp_path / "adapter.checkpoint"
    ckpt.mkdir()
    (ckpt / "precious.txt").write_text("precious")
    data = tmp_path / "no-data-needed"  # never read: the check comes first
    for out, where in ((mine, "mine"), (tmp_path / "adapter", "adapter.checkpoint")):
        code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", data, "--out", out)
        assert_clean_error(code, err, where)
    assert (mine / "notes.txt").read_text() == "mine" and (ckpt / "precious.txt").read_text() == "precious"

    monkeypatch.setattr(flashback.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    args = ["eval", corpus_file, "--model", tiny_model_dir, "--index", tiny_index_dir, "--json", tmp_path]
    code, _, err = run_cli(capsys, *args)
    assert_clean_error(code, err, "is a folder")


def test_deep_json_and_an_unknown_device_are_one_line_errors(capsys, tiny_model_dir, tiny_index_dir, tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    code, _, err = run_cli(capsys, "index", deep, "--out", tmp_path / "idx", "--model", tiny_model_dir, "--quiet")
    assert_clean_error(code, err, "nested too deeply")
    args = ["generate", "--index", tiny_index_dir, "--model", tiny_model_dir, "--prompt", "x", "--device", "foo"]
    code, _, err = run_cli(capsys, *args)
    assert_clean_error(code, err, "unknown --device 'foo'")


def test_a_nan_heldout_fraction_is_refused(capsys, tiny_model_dir, tiny_index_dir, corpus_file, tmp_path):
    args = [corpus_file, "--index", tiny_index_dir, "--model", tiny_model_dir, "--heldout", "nan"]
    code, _, err = run_cli(capsys, "prepare", *args, "--out", tmp_path / "data")
    assert_clean_error(code, err, "--heldout must be in [0, 1)")
    code, _, err = run_cli(capsys, "eval", *args)
    assert_clean_error(code, err, "--heldout must be in [0, 1)")


def test_an_error_under_a_progress_bar_gets_its_own_line(capsys, tiny_model_dir, corpus_file, tmp_path):
    """index shows a progress bar while it tokenizes; an error then must not share the bar's line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(corpus_file.read_text() + "{broken\n")
    code, _, err = run_cli(capsys, "index", corpus_file, bad, "--out", tmp_path / "idx", "--model", tiny_model_dir)
    assert_clean_error(code, err, "bad.jsonl")  # a line that starts with the error, not with the bar
