"""The chat bench (conversation.py) and the grounded QA evaluation (qa.py) on the tiny chat model."""

from __future__ import annotations

import json
import pydoc

import pytest
import torch

from flashback.config import GenerationConfig
from flashback.conversation import messages_for, run_conversation
from flashback.errors import FlashbackError
from flashback.evaluate import target_nll
from flashback.qa import ChatLayout, Question, evaluate_qa, first_sentence, gold_passages, stdlib_questions, token_f1
from flashback.text.chat_template import render
from flashback.text.corpus import module_document
from flashback.text.retrieval import Index, IndexRetriever
from flashback.text.tokenize import encode, tokenizer_fingerprint

from .conftest import build_index
from .test_chat import chat_lm, make_chat_lm  # noqa: F401 - the fixture

QUESTIONS = [
    "What does a garbage collector do with memory?",
    "Which port does a server socket listen on?",
    "How does UTF-8 encode a code point?",
]


def test_layouts_put_the_passages_where_front_ends_put_them():
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    plain = messages_for("flashback", "Be brief.", history, "q2", "PASSAGE")
    assert plain == messages_for("none", "Be brief.", history, "q2", "PASSAGE")
    assert "PASSAGE" not in json.dumps(plain) and plain[-1] == {"role": "user", "content": "q2"}
    system = messages_for("system", "Be brief.", history, "q2", "PASSAGE")
    assert system[0]["content"].startswith("Be brief.") and "PASSAGE" in system[0]["content"]
    assert system[1:] == plain[1:]
    user = messages_for("user", "Be brief.", history, "q2", "PASSAGE")
    assert user[:-1] == plain[:-1] and user[-1]["content"].index("PASSAGE") < user[-1]["content"].index("q2")
    with pytest.raises(FlashbackError, match="unknown chat layout"):
        messages_for("middle", None, [], "q", "p")


def test_each_layout_computes_what_its_prefix_cache_allows(chat_lm, tiny_index_dir):  # noqa: F811
    """The system layout recomputes the whole conversation every turn; FlashBack's turn computes what its cache
    lacks plus the marked passage; mode none reuses the previous turn. Reuse changes no answer."""
    retriever = IndexRetriever(Index.load(tiny_index_dir))
    cfg = GenerationConfig(mode="append", k=1, tail=4, max_new_tokens=6, stop_at_eos=False)
    chat_lm.keep_prefixes(64)
    try:
        turns = run_conversation(
            chat_lm, lambda q: retriever(q, 1), QUESTIONS, ["flashback", "system", "none"], cfg, 32, "Answer."
        )
        by = {(t.layout, t.turn): t for t in turns}
        for i in (1, 2, 3):
            system = by["system", i]
            assert system.cached_tokens == 0 and system.computed_tokens == system.prompt_tokens
            fb = by["flashback", i]
            passage = len(retriever(QUESTIONS[i - 1], 1)[0].token_ids)
            assert fb.computed_tokens == fb.prompt_tokens - fb.cached_tokens + passage + 2  # the markers
            assert fb.passages == system.passages  # the same passages in every layout
        for i in (2, 3):  # the conversation before the previous turn's passage, and the whole previous turn
            assert by["flashback", i].cached_tokens == by["flashback", i - 1].prompt_tokens - cfg.tail
            assert by["none", i].cached_tokens >= by["none", i - 1].prompt_tokens
        chat_lm.keep_prefixes(0)
        cold = run_conversation(
            chat_lm, lambda q: retriever(q, 1), QUESTIONS, ["flashback", "none"], cfg, 32, "Answer."
        )
        assert all(c.cached_tokens == 0 for c in cold)
        assert [c.answer for c in cold] == [by[c.layout, c.turn].answer for c in cold]
    finally:
        chat_lm.keep_prefixes(0)


def test_first_sentence_and_f1():
    assert first_sentence("Return the sum.\n\nMore text.") == "Return the sum."
    assert first_sentence("Split the\npathname path. Then more.") == "Split the pathname path."
    assert first_sentence("no end mark") is None
    assert token_f1("Return the SUM!", "return the sum.") == 1.0
    assert token_f1("", "x") == 0.0 and token_f1("a b", "c d") == 0.0
    assert token_f1("the sum of values", "return the sum") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_stdlib_questions_come_from_docstrings():
    questions = stdlib_questions()
    assert len(questions) > 300 and questions == sorted(questions, key=lambda q: (q.module, q.function))
    dedent = next(q for q in questions if (q.module, q.function) == ("textwrap", "dedent"))
    assert dedent.question == "What does textwrap.dedent() do?"
    assert dedent.answer == first_sentence(pydoc.getdoc(__import__("textwrap").dedent))
    assert all(5 <= len(q.answer.split()) <= 30 for q in questions)


def test_entry_questions_come_from_a_glossarys_definitions(tmp_path):
    """Jargon File and FOLDOC shapes: the title line, part-of-speech lines and sense, usage and subject labels are
    skipped; "esp." and "e.g." do not end the answer; entries without a usable sentence give no question."""
    from flashback.qa import entry_definition, entry_questions

    jargon = (
        "bar\n /bar/, n.\n\n    1. [very common] The second {metasyntactic variable}, after {foo} and\n"
        "    before {baz}. More."
    )
    assert entry_definition(jargon, "bar").startswith("The second {metasyntactic variable}, after {foo} and before")
    foldoc = "56k line\n\n   <communications> A digital connection capable of carrying {56 kbps}.\n\n   (2000-07-16)"
    assert entry_definition(foldoc, "56k line") == "A digital connection capable of carrying {56 kbps}."
    rows = [
        {"id": "j:1", "title": "bar", "text": jargon},
        {"id": "j:2", "title": "Big Red Switch",
         "text": "Big Red Switch\n n.\n\n    The power switch on a computer, esp. the big red one on an IBM PC."},
        {"id": "j:3", "title": "x", "text": "x\n n.\n\n    Too short."},
        {"id": "j:4", "title": "", "text": "An untitled entry that has a long enough sentence here."},
    ]  # fmt: skip
    path = tmp_path / "glossary.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = entry_questions(path)
    assert [(q.question, q.key) for q in questions] == [
        ("What is bar?", "bar"),
        ("What is Big Red Switch?", "Big Red Switch"),
    ]
    assert questions[0].answer == "The second {metasyntactic variable}, after {foo} and before {baz}."
    assert questions[1].answer == "The power switch on a computer, esp. the big red one on an IBM PC."
    assert questions[1].docstring.startswith(questions[1].answer)
    path.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(FlashbackError, match="no entry with a title"):
        entry_questions(path)


@pytest.fixture(scope="module")
def docs_index(tiny_model_dir, tmp_path_factory):
    """An index of the rendered documentation of three standard-library modules, as the default index has it."""
    docs = [module_document(name) for name in ("textwrap", "fnmatch", "glob")]
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    index = Index.load(build_index(tiny_model_dir, path, 256, tmp_path_factory.mktemp("docs-index") / "idx"))
    # the chat model's tokenizer only adds special tokens, so plain text gets the same ids: stamp it as the index's
    fingerprint = tokenizer_fingerprint(make_chat_lm(tiny_model_dir).tokenizer)
    return Index(
        {**index.manifest, "tokenizer": {"name": "chat", "fingerprint": fingerprint}},
        index.meta,
        index.token_ids,
        index.offsets,
        index.bm25,
    )


def test_qa_scores_the_reference_answer_in_each_layout(chat_lm, docs_index):  # noqa: F811
    """Each layout's answer NLL is the model's NLL of the answer after that layout's tokens, computed here by a plain
    forward; the gold passage holds the answer; a question whose module is not indexed is dropped."""
    questions = [q for q in stdlib_questions() if q.module in ("textwrap", "fnmatch")][:3]
    questions.append(Question("json", "dumps", "What does json.dumps() do?", "Serialize obj to a JSON string."))
    gold = gold_passages(docs_index, questions)
    assert gold[-1] is None and all(g is not None for g in gold[:-1])
    assert all(q.answer.split()[0] in docs_index.passage_text(g) for q, g in zip(questions, gold[:-1], strict=False))
    cfg = GenerationConfig(mode="append", k=1, tail=6, markers=True)
    layouts = [ChatLayout.parse(v) for v in ("none", "system", "user", "flashback")]
    got = evaluate_qa(chat_lm, docs_index, questions, layouts, cfg, ["gold", "bm25"], "Answer.", generate_tokens=4)
    assert got["questions"] == 3 and got["dropped_without_gold"] == 1
    assert got["sources"]["gold"]["answer_in_passage"] == 1.0
    tok, model = chat_lm.tokenizer, chat_lm.model
    banned = torch.tensor(chat_lm.marker_ids)
    for q, record in zip(questions, got["records"], strict=False):
        passage = docs_index.passage_tokens(gold_passages(docs_index, [q])[0]).tolist()
        answer = encode(tok, q.answer)
        for name in ("none", "system", "user", "flashback"):
            text = tok.decode(passage)
            ids, _ = render(tok, messages_for(name, "Answer.", [], q.question, text), 32)
            if name == "flashback":
                cut = len(ids) - 6
                ids = ids[:cut] + [chat_lm.marker_ids[0], *passage, chat_lm.marker_ids[1]] + ids[cut:]
            with torch.inference_mode():
                logits = model(torch.tensor([ids + answer])).logits[0, len(ids) - 1 : -1]
            want = float(target_nll(logits, answer, banned).sum())
            assert record["gold"][name]["nll"] == pytest.approx(want, abs=2e-3)
            assert 0.0 <= record["gold"][name]["f1"] <= 1.0
        assert record["bm25"]["none"] == record["gold"]["none"]  # no passage: scored once
    with pytest.raises(FlashbackError, match="append adapter"):
        evaluate_qa(chat_lm, docs_index, questions, [ChatLayout.parse("flashback+adapter")], cfg)
    with pytest.raises(FlashbackError, match="bad QA layout"):
        ChatLayout.parse("system+adapter")


def test_cli_refuses_bad_layouts_before_loading_anything(capsys, tmp_path):
    from flashback.cli import main

    assert main(["bench-chat", "--layouts", "flashback,middle", "--model", str(tmp_path / "none")]) == 2
    assert "--layouts takes" in capsys.readouterr().err
    assert main(["qa", "--layouts", "user+adapter", "--model", str(tmp_path / "none")]) == 2
    assert "only flashback takes +adapter" in capsys.readouterr().err
    assert main(["qa", "--passages", "oracle", "--model", str(tmp_path / "none")]) == 2
    assert "--passages takes" in capsys.readouterr().err


def test_qa_training_data_leaves_the_heldout_modules_out(tiny_model_dir, docs_index, tmp_path):
    """One-turn chats whose target is the docstring's first tokens, with the gold and the BM25 passage, in prepare's
    format; the held-out module (glob) gives none; train mixes it with another folder."""
    from flashback.config import TrainConfig
    from flashback.data import load_segments
    from flashback.qa import prepare_qa
    from flashback.train import train

    from .test_train import TOY_CFG, copy_task, write_data

    lm = make_chat_lm(tiny_model_dir)  # trained below: not the module's shared one
    questions = [q for q in stdlib_questions() if q.module in ("textwrap", "fnmatch", "glob")]
    assert {q.module for q in questions if q.heldout} == {"glob"}
    manifest = prepare_qa(lm, docs_index, questions, tmp_path / "qa", "Answer.", stride=6, val_fraction=0.5)
    segments = load_segments(tmp_path / "qa", "train")[0] + load_segments(tmp_path / "qa", "val")[0]
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == len(segments) > 0
    by_name = {f"qa:{q.module}.{q.function}": q for q in questions}
    names = [f"qa:{q.module}.{q.function}" for q in questions]
    gold = dict(zip(names, gold_passages(docs_index, questions), strict=True))
    seen = set()
    for seg in segments:
        q = by_name[seg.doc_id]
        assert not q.heldout and seg.stride == 6 and len(seg.targets) == 1
        ids, _ = render(lm.tokenizer, messages_for("flashback", "Answer.", [], q.question, ""), 32)
        assert seg.tokens == ids + encode(lm.tokenizer, q.docstring)[:6] and seg.targets == [len(ids)]
        if seg.doc_id not in seen:  # the first of a question's segments has its gold passage
            assert seg.passages[0][0] == docs_index.passage_tokens(gold[seg.doc_id]).tolist()
        seen.add(seg.doc_id)
    prepare_qa(lm, docs_index, questions, tmp_path / "qa8", "Answer.", stride=8)
    text = write_data(tmp_path / "text", lm, copy_task(4, 0), copy_task(2, 1))
    with pytest.raises(FlashbackError, match=r"mixes target lengths \[6, 8\]"):
        train(lm, [text, tmp_path / "qa8"], tmp_path / "a8", TrainConfig(max_steps=1, **TOY_CFG), progress=False)
    result = train(
        lm,
        [text, tmp_path / "qa"],
        tmp_path / "adapter",
        TrainConfig(max_steps=2, **TOY_CFG),
        progress=False,
        log=lambda m: None,
    )
    assert result.steps == 2
    card = json.loads((tmp_path / "adapter" / "flashback.json").read_text())
    assert card["data"] == [str(text), str(tmp_path / "qa")] and len(card["data_manifest"]["mixed"]) == 2
    assert card["endpoint"] == "chat"  # its data held chats: it serves chat requests (cards.pick_slot)
    from flashback.cards import adapter_endpoint

    del card["endpoint"]  # a card written before the key: the data manifest says it
    (tmp_path / "adapter" / "flashback.json").write_text(json.dumps(card))
    assert adapter_endpoint(tmp_path / "adapter") == "chat"


def test_qa_live_passages_score_each_stretch_after_what_its_query_finds(chat_lm, docs_index):  # noqa: F811
    """With live passages FlashBack's reference answer is scored a stride at a time, each stretch after the passage
    that stretch's query finds (the question, then the question and the answer so far): equal to a plain forward of
    that layout. The text layouts retrieve once, by the question, as with bm25 passages; the row counts the
    retrievals that came from the gold passage's document."""
    from flashback.generate import retrieval_query

    questions = [q for q in stdlib_questions() if q.module in ("textwrap", "fnmatch")][:2]
    cfg = GenerationConfig(mode="append", k=1, tail=6, markers=True, stride=4, chat_query="question+recent")
    layouts = [ChatLayout.parse(v) for v in ("user", "flashback")]
    got = evaluate_qa(chat_lm, docs_index, questions, layouts, cfg, ["bm25", "live"], "Answer.", generate_tokens=9)
    tok, model = chat_lm.tokenizer, chat_lm.model
    retriever, banned = IndexRetriever(docs_index), torch.tensor(chat_lm.marker_ids)
    for q, record in zip(questions, got["records"], strict=True):
        assert record["live"]["user"]["nll"] == pytest.approx(record["bm25"]["user"]["nll"], abs=1e-4)
        ids, _ = render(tok, messages_for("flashback", "Answer.", [], q.question, ""), 32)
        answer, want, gold_from = encode(tok, q.answer), 0.0, []
        gold_doc = docs_index.meta[gold_passages(docs_index, [q])[0]]["doc_id"]
        for start in range(0, len(answer), 4):
            history = ids + answer[:start]
            found = retriever(retrieval_query(tok, cfg, history, start, q.question), 1)[0]
            gold_from.append(found.hit.doc_id == gold_doc)
            cut = len(history) - 6
            seq = history[:cut] + [chat_lm.marker_ids[0], *found.token_ids.tolist(), chat_lm.marker_ids[1]]
            seq += history[cut:]
            stretch = answer[start : start + 4]
            with torch.inference_mode():
                logits = model(torch.tensor([seq + stretch])).logits[0, len(seq) - 1 : -1]
            want += float(target_nll(logits, stretch, banned).sum())
        live = record["live"]["flashback"]
        assert live["nll"] == pytest.approx(want, abs=2e-3) and live["scored_from_gold"] == gold_from
        assert len(live["passages"]) == 3 and len(live["answered_from_gold"]) == 3  # 9 tokens, stride 4
    stats = got["sources"]["live"]["layouts"]["flashback"]["retrievals"]
    assert stats["answers"] == 2 and stats["later"] == 4
    marks = [r["live"]["flashback"]["answered_from_gold"] for r in got["records"]]
    assert stats["later_from_gold"] == sum(sum(m[1:]) for m in marks) / 4
    assert "retrievals" not in got["sources"]["bm25"]["layouts"]["flashback"]
