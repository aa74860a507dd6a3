from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from flashback.errors import FlashbackError
from flashback.text.corpus import Document, read_documents, split_passages
from flashback.text.retrieval import Index
from flashback.text.tokenize import load_tokenizer, tokenizer_fingerprint


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def build(tokenizer, docs, chunk=24):
    passages = split_passages(docs, tokenizer, chunk, progress=False)
    return Index.build(
        passages, tokenizer_name="tiny", fingerprint=tokenizer_fingerprint(tokenizer), chunk_tokens=chunk
    )


def test_passages_cover_the_document_in_chunks(tokenizer):
    doc = Document("d", "t", "Unicode assigns a number to every character. " * 8)
    passages = split_passages([doc], tokenizer, 10, progress=False)
    ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    assert [len(p.token_ids) for p in passages[:-1]] == [10] * (len(passages) - 1)
    assert np.concatenate([p.token_ids for p in passages]).tolist() == ids
    assert [p.id for p in passages[:2]] == ["d#0", "d#1"] and passages[0].title == "t"


def test_read_text_folders_and_jsonl(tmp_path):
    (tmp_path / "a.md").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta text")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"id": "c1", "title": "Gamma", "text": "gamma text"}) + "\n\n")
    docs = list(read_documents([tmp_path]))
    assert sorted(d.text for d in docs) == ["alpha text", "beta text", "gamma text"]
    assert {d.title for d in docs} >= {"a", "Gamma"}


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "text": "fine"}\n{"id": 2, "text": \n')
    with pytest.raises(FlashbackError, match=r"bad\.jsonl:2: malformed JSON"):
        list(read_documents([bad]))
    bad.write_text('{"id": "1", "body": "no text field"}\n')
    with pytest.raises(FlashbackError, match=r"bad\.jsonl:1: .*\"text\""):
        list(read_documents([bad]))


def test_missing_or_unsupported_paths(tmp_path):
    with pytest.raises(FlashbackError, match="no such file"):
        list(read_documents([tmp_path / "nope.jsonl"]))
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(FlashbackError, match="unsupported file type"):
        list(read_documents([tmp_path / "x.pdf"]))


def test_empty_corpus_is_an_error(tokenizer):
    with pytest.raises(FlashbackError, match="no text"):
        build(tokenizer, [Document("e", "", "   \n")])


def test_save_load_search_roundtrip(tokenizer, corpus_file, tmp_path):
    index = build(tokenizer, read_documents([corpus_file]))
    out = index.save(tmp_path / "idx")
    loaded = Index.load(out)
    assert len(loaded) == len(index) and loaded.manifest == index.manifest
    hits = loaded.search(["server socket binds port accepts connections"], k=3)[0]
    assert hits[0].title == "socket" and hits[0].score >= hits[1].score >= hits[2].score
    assert np.array_equal(loaded.passage_tokens(hits[0].index), index.passage_tokens(hits[0].index))
    assert not list(tmp_path.glob(".idx*")), "temporary folders left behind"


def test_search_filters_titles_and_documents(tokenizer, corpus_file):
    index = build(tokenizer, read_documents([corpus_file]))
    query = ["server socket binds port accepts connections memory program"]
    hits = index.search(query, k=2, exclude_titles=[{"socket"}])[0]
    assert len(hits) == 2 and all(h.title != "socket" for h in hits)
    # Without "memory program" only socket passages match: the filter leaves no hit, not zero-score filler.
    assert index.search(["server socket binds port"], k=2, exclude_titles=[{"socket"}]) == [[]]
    assert index.search(["qqzzv xxyq"], k=3) == [[]]
    hits = index.search(query, k=3, exclude_docs=[{"socket-0", "socket-1"}])[0]
    assert {h.doc_id for h in hits} <= {m["doc_id"] for m in index.meta} - {"socket-0", "socket-1"}


def test_k_larger_than_corpus(tokenizer):
    index = build(tokenizer, [Document("a", "", "one small document about sockets")])
    with pytest.raises(FlashbackError, match="larger than the index"):
        index.search(["sockets"], k=len(index) + 1)


def test_failed_save_keeps_the_old_index(tokenizer, corpus_file, tmp_path, monkeypatch):
    index = build(tokenizer, read_documents([corpus_file]))
    out = index.save(tmp_path / "idx")
    before = (out / "manifest.json").read_text()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index.bm25, "save", explode)
    with pytest.raises(OSError):
        index.save(out)
    assert (out / "manifest.json").read_text() == before
    Index.load(out)  # still whole
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_refuses_to_overwrite_a_folder_that_is_not_an_index(tokenizer, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    index = build(tokenizer, [Document("a", "", "some text")])
    with pytest.raises(FlashbackError, match="not a FlashBack index"):
        index.save(tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_missing_and_corrupt_index(tokenizer, corpus_file, tmp_path):
    with pytest.raises(FlashbackError, match="not found"):
        Index.load(tmp_path / "nothing")
    out = build(tokenizer, read_documents([corpus_file])).save(tmp_path / "idx")
    (out / "offsets.npy").unlink()
    with pytest.raises(FlashbackError, match="missing files or corrupt"):
        Index.load(out)
    out = build(tokenizer, read_documents([corpus_file])).save(tmp_path / "idx2")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(FlashbackError, match="corrupt"):
        Index.load(out)


def test_tokenizer_mismatch_is_detected(tokenizer, other_tokenizer_model_dir):
    index = build(tokenizer, [Document("a", "", "some text")])
    index.check_tokenizer(tokenizer_fingerprint(tokenizer))
    other = load_tokenizer(str(other_tokenizer_model_dir))
    with pytest.raises(FlashbackError, match="another tokenizer"):
        index.check_tokenizer(tokenizer_fingerprint(other))


def _damage_manifest(edit):
    def apply(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps(edit(manifest)))

    return apply


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / "token_ids.npy").write_bytes(b""),
        lambda f: [p.write_bytes(b"") for p in (f / "bm25").glob("*.npy")],
        lambda f: (f / "bm25" / "params.index.json").write_text("null"),
        lambda f: (f / "manifest.json").write_text("[1, 2]"),
        _damage_manifest(lambda m: {k: v for k, v in m.items() if k != "tokenizer"}),
        _damage_manifest(lambda m: {**m, "chunk_tokens": "abc"}),
        lambda f: (f / "passages.jsonl").write_text('{"id": 3}\n' * 4),
    ],
    ids=["empty-token-ids", "empty-bm25", "null-params", "list-manifest", "no-tokenizer", "text-chunk", "bad-records"],
)
def test_a_damaged_index_is_one_clean_error_for_every_command(tiny_index_dir, tiny_model_dir, tmp_path, capsys, damage):
    """Validated once, on load: search and generate both answer with `flashback: error:`, never a traceback."""
    import shutil

    from tests.test_cli import assert_clean_error, run_cli

    folder = tmp_path / "idx"
    shutil.copytree(tiny_index_dir, folder)
    damage(folder)
    code, _, err = run_cli(capsys, "search", folder, "garbage collection")
    assert_clean_error(code, err, str(folder))
    code, _, err = run_cli(capsys, "generate", "--index", folder, "--model", tiny_model_dir, "--prompt", "A kludge")
    assert_clean_error(code, err, str(folder))
