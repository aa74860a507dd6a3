"""Grounded question answering for chat layouts, built from the Python standard library rather than written.

Every public function of an importable standard-library module that has a docstring gives one question, "What does
module.function() do?", whose reference answer is the docstring's first sentence. The default index renders the same
modules' documentation (pydoc), so the answer lies in one of the index's passages: the question's gold passage,
the first of its module's passages that holds the whole sentence. Questions without one are dropped. The evaluation
asks only the held-out fifth of the modules: the running-text adapter never saw docstrings, and the chat adapter
learnt from the other modules' (`prepare_qa`).

A second genre comes from a glossary (`--entries FILE`, a JSONL of id/title/text such as the Jargon File): "What is
TITLE?", answered by the first sentence of the entry's definition, its gold passage the first passage titled TITLE
that holds the sentence (the index must hold the entries, or copies of them).

Each question is asked as a one-turn chat in every layout of conversation.CHAT_LAYOUTS, with the passage BM25 retrieves
for it and with its gold passage, and scored two ways: the reference answer's perplexity as the assistant's reply
(its tokens only), and the token F1 of a greedy answer against the reference (SQuAD's metric).

The `live` passages are FlashBack's as it serves a chat: retrieved again every `stride` tokens of the answer, the
later queries built as `chat_query` says (generate.retrieval_query); the reference answer is scored a stride at a
time, each stretch after the passage its query (on the reference's tokens so far) finds. Each retrieval is marked
as coming from the gold passage's document or not. The text layouts retrieve once, by the question, as RAG
front-ends do, so their live rows are their bm25 rows.
"""

from __future__ import annotations

import inspect
import math
import re
import string
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flashback.atomic import check_output
from flashback.config import GenerationConfig
from flashback.conversation import answer_turn, messages_for
from flashback.engines.base import Engine, SessionSpec
from flashback.errors import FlashbackError
from flashback.evaluate import target_nll
from flashback.generate import retrieval_query
from flashback.layout import banned_ids, layout, strip_head
from flashback.text.chat_template import render
from flashback.text.corpus import quiet_import, stdlib_modules
from flashback.text.retrieval import Index, IndexRetriever
from flashback.text.tokenize import encode

HELDOUT_MODULES = 5  # one module in five is held out
SENTENCE = re.compile(r"(.+?[.!?])(?:\s|$)")
# a glossary's sentences also hold "esp.", "e.g." and the like, which do not end them
NOT_ENDS = "".join(rf"(?<!\b{re.escape(a)})" for a in ("esp", "e.g", "i.e", "etc", "cf", "vs", "incl"))
ENTRY_SENTENCE = re.compile(rf"(.+?{NOT_ENDS}[.!?])(?:\s|$)")
PASSAGE_SOURCES = ("bm25", "gold", "live")


@dataclass(frozen=True)
class Question:
    module: str
    function: str
    question: str
    answer: str
    docstring: str = ""  # the whole docstring, its first sentence being the answer (training targets)

    @property
    def key(self) -> str:
        """module.function, or a glossary entry's title."""
        return f"{self.module}.{self.function}" if self.function else self.module

    @property
    def heldout(self) -> bool:
        """A fifth of the modules, by a hash of the name: evaluated on, never trained on (qa --prepare)."""
        return zlib.crc32(self.module.encode()) % HELDOUT_MODULES == 0


@dataclass(frozen=True)
class ChatLayout:
    """A chat layout to score; FlashBack's with or without its append adapter."""

    layout: str
    adapter: bool = False

    @classmethod
    def parse(cls, text: str) -> ChatLayout:
        name, _, extra = text.strip().partition("+")
        if name not in ("flashback", "system", "user", "none") or extra not in ("", "adapter"):
            raise FlashbackError(f"bad QA layout {text!r}: use flashback[+adapter], system, user or none")
        if extra and name != "flashback":
            raise FlashbackError(f"bad QA layout {text!r}: only flashback takes +adapter")
        return cls(name, bool(extra))

    def __str__(self) -> str:
        return self.layout + ("+adapter" if self.adapter else "")


def first_sentence(doc: str) -> str | None:
    paragraph = " ".join(doc.split("\n\n")[0].split())
    found = SENTENCE.match(paragraph)
    return found.group(1) if found else None


def stdlib_questions() -> list[Question]:
    """One question per documented public function of the importable standard-library modules (those the default
    index renders), whose docstring opens with a sentence of 5 to 30 words; in module and name order."""
    out = []
    for name in stdlib_modules():
        module = quiet_import(name)
        if module is None:
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != name:
                continue
            doc = inspect.getdoc(obj) or ""
            answer = first_sentence(doc)
            if answer and 5 <= len(answer.split()) <= 30:
                out.append(Question(name, attr, f"What does {name}.{attr}() do?", answer, doc))
    return out


LABEL = re.compile(r"^(?:\d+\.\s+|\[[^\]]*\]\s*|<[^>]*>\s*)+")  # sense numbers, [usage] and <subject> labels


def entry_definition(text: str, title: str) -> str | None:
    """The definition of a glossary entry, from its first sentence on: the title line, part-of-speech or
    pronunciation lines ("n.", "/bar/, n.") and leading sense, usage and subject labels are skipped."""
    lines = text.strip().split("\n")
    if lines and lines[0].strip().lower() == title.strip().lower():
        lines = lines[1:]
    for paragraph in "\n".join(lines).split("\n\n"):
        flat = LABEL.sub("", " ".join(paragraph.split()))
        if len(flat.split()) >= 5:
            return flat
    return None


def entry_questions(path: str | Path) -> list[Question]:
    """One question per entry of a glossary file whose definition opens with a sentence of 5 to 30 words; the
    entry's title stands where a stdlib question has its module (held out by a hash of it, gold found by it)."""
    from flashback.text.corpus import read_documents

    out = []
    for doc in read_documents([path]):
        definition = entry_definition(doc.text, doc.title) if doc.title else None
        found = ENTRY_SENTENCE.match(definition) if definition else None
        answer = found.group(1) if found else None
        if answer and 5 <= len(answer.split()) <= 30:
            out.append(Question(doc.title, "", f"What is {doc.title}?", answer, definition))
    if not out:
        raise FlashbackError(f"{path}: no entry with a title and a definition sentence of 5 to 30 words")
    return out


def _flat(text: str) -> str:
    return " ".join(text.split())


def gold_passages(index: Index, questions: Sequence[Question]) -> list[int | None]:
    """For each question, the first passage of its module's rendered documentation that holds the whole answer."""
    by_title: dict[str, list[int]] = {}
    for i, meta in enumerate(index.meta):
        by_title.setdefault(meta["title"], []).append(i)
    texts: dict[int, str] = {}
    gold = []
    for q in questions:
        found = None
        for i in by_title.get(q.module, []):
            if i not in texts:
                texts[i] = _flat(index.passage_text(i))
            if _flat(q.answer) in texts[i]:
                found = i
                break
        gold.append(found)
    return gold


def sample(questions: Sequence[Question], n: int, seed: int = 0, heldout: bool = True) -> list[Question]:
    """A deterministic spread of n held-out questions (or of n others), by a hash of the name and the seed."""
    chosen = (q for q in questions if q.heldout == heldout)
    return sorted(chosen, key=lambda q: zlib.crc32(f"{seed}:{q.key}".encode()))[:n]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1: lowercased words without punctuation, as bags."""

    def words(text: str) -> list[str]:
        return text.lower().translate(str.maketrans("", "", string.punctuation)).split()

    pred, ref = words(prediction), words(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_nll(engine: Engine, session, name: str, messages: list[dict], passages, answer: str, cfg, banned):
    """Per-token NLL of `answer` as the assistant's reply to `messages`: FlashBack's layout appends the passages
    `cfg.tail` tokens before the end of the conversation (with the markers if `cfg.markers`), the text layouts
    carry them in their messages already."""
    head = engine.head_ids
    ids = strip_head(render(engine.tokenizer, messages, cfg.query_tokens)[0], head)
    target = encode(engine.tokenizer, answer)
    if name == "flashback":
        markers = engine.marker_ids if cfg.markers else None
        seq, _ = layout(ids, [r.token_ids for r in passages], target, "append", markers, cfg.tail, head)
    else:
        seq, _ = layout(ids, [], target, "none", None, 0, head)
    session.reset()
    logits = session.extend(seq, last_logits=len(target) + 1)
    return target_nll(logits[:-1], target, banned)


def answer_nll_live(engine: Engine, session, messages: list[dict], question: str, answer: str, retriever, cfg, banned):
    """Per-token NLL of `answer` as FlashBack's reply when it retrieves every `cfg.stride` tokens: each stretch
    after the passages its query finds (the question first, then as `cfg.chat_query` says on the answer so far).
    Returns the NLL and each retrieval's hits."""
    head = engine.head_ids
    ids = strip_head(render(engine.tokenizer, messages, cfg.query_tokens)[0], head)
    target = encode(engine.tokenizer, answer)
    markers = engine.marker_ids if cfg.markers else None
    nlls, found = [], []
    for start in range(0, len(target), cfg.stride):
        history = ids + target[:start]
        passages = retriever(retrieval_query(engine.tokenizer, cfg, history, start, question), cfg.k)
        found.append([r.hit for r in passages])
        stretch = target[start : start + cfg.stride]
        seq, _ = layout(history, [r.token_ids for r in passages], stretch, "append", markers, cfg.tail, head)
        session.reset()
        logits = session.extend(seq, last_logits=len(stretch) + 1)
        nlls.append(target_nll(logits[:-1], stretch, banned))
    return torch.cat(nlls), found


def _from_gold(docs: Sequence[str | None], gold_doc: str) -> list[bool]:
    """For each retrieval (its first passage's document, None when nothing matched), whether it is the gold
    passage's document."""
    return [doc == gold_doc for doc in docs]


def _score_layout(engine, index, spec, kept, found, cfg, system, generate_tokens, banned, marks, live=None) -> dict:
    """One layout over every question with the given passages (`live`: FlashBack retrieves from this retriever as
    it answers): its row, each question's scores added to `marks`."""
    session = engine.session(SessionSpec("append" if spec.adapter else None, scoring=True, chat=True))
    live = live if spec.layout == "flashback" else None
    adapted = engine.adapter_for("append", chat=True) is not None  # then generation runs FlashBack with it
    nlls, f1s, later = [], [], []
    for mark, (q, g), passages in zip(marks, kept, found, strict=True):
        text = "\n\n".join(engine.tokenizer.decode(r.token_ids) for r in passages)
        messages = messages_for(spec.layout, system, [], q.question, text)
        if live is not None:
            nll, hits = answer_nll_live(engine, session, messages, q.question, q.answer, live, cfg, banned)
            docs = [h[0].doc_id if h else None for h in hits]
            mark[str(spec)] = {"nll": round(float(nll.sum()), 4), "scored_from_gold": _from_gold(docs, _doc(index, g))}
        else:
            nll = answer_nll(engine, session, spec.layout, messages, passages, q.answer, cfg, banned)
            mark[str(spec)] = {"nll": round(float(nll.sum()), 4)}
        nlls.append(nll)
        if generate_tokens and (spec.adapter or spec.layout != "flashback" or not adapted):
            gen = replace(cfg, max_new_tokens=generate_tokens, temperature=0.0)
            tokens, trace, *_ = answer_turn(
                engine, spec.layout, messages, q.question, passages, index.chunk_tokens, gen, live
            )
            said = engine.tokenizer.decode(tokens, skip_special_tokens=True)
            f1s.append(token_f1(said, q.answer))
            mark[str(spec)].update(text=said, f1=round(f1s[-1], 4))
            if live is not None:
                firsts = [r["passages"][0] if r["passages"] else {} for r in trace.retrievals]
                mark[str(spec)]["passages"] = [p.get("id") for p in firsts]
                mark[str(spec)]["answered_from_gold"] = _from_gold([p.get("doc_id") for p in firsts], _doc(index, g))
                later.append(mark[str(spec)])
    all_nll = torch.cat(nlls)
    row = {
        "perplexity": math.exp(float(all_nll.mean())),
        "nll_per_question": float(all_nll.sum()) / len(kept),
        "answer_tokens": all_nll.numel(),
        "f1": sum(f1s) / len(f1s) if f1s else None,
    }
    if later:
        row["retrievals"] = _retrieval_stats(later)
    return row


def _doc(index: Index, i: int) -> str:
    return index.meta[i]["doc_id"]


def _retrieval_stats(marks: list[dict]) -> dict:
    """How the answers' retrievals went: the first's and the later ones' share from the gold document, and the
    answers whose passage changed after the first retrieval."""
    first = [m["answered_from_gold"][0] for m in marks if m["answered_from_gold"]]
    later = [hit for m in marks for hit in m["answered_from_gold"][1:]]
    changed = sum(len(set(m["passages"])) > 1 for m in marks)
    return {
        "first_from_gold": sum(first) / len(first) if first else None,
        "later": len(later),
        "later_from_gold": sum(later) / len(later) if later else None,
        "answers_changed_passage": changed,
        "answers": len(marks),
    }


@torch.inference_mode()
def evaluate_qa(
    engine: Engine,
    index: Index,
    questions: Sequence[Question],
    layouts: Sequence[ChatLayout],
    cfg: GenerationConfig,
    sources: Sequence[str] = PASSAGE_SOURCES,
    system: str | None = None,
    generate_tokens: int = 32,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Perplexity of the reference answers and F1 of greedy answers, per passage source and layout."""
    if engine.capabilities.logits != "all":
        raise FlashbackError(f"{engine.name} does not return logits: run the QA evaluation on the PyTorch engine")
    for spec in layouts:
        if spec.adapter and engine.adapter_for("append", chat=True) is None:
            raise FlashbackError("layout flashback+adapter needs an append adapter (the shipped one, or --adapter)")
    if any(s not in PASSAGE_SOURCES for s in sources):
        raise FlashbackError(f"passage sources are {', '.join(PASSAGE_SOURCES)}")
    gold = gold_passages(index, questions)
    kept = [(q, g) for q, g in zip(questions, gold, strict=True) if g is not None]
    if not kept:
        raise FlashbackError("no question has its answer in a passage of this index (use the default index)")
    retriever = IndexRetriever(index)
    banned = banned_ids(engine.marker_ids, engine.device)
    results: dict = {"questions": len(kept), "dropped_without_gold": len(questions) - len(kept), "sources": {}}
    records = [{"question": q.question, "answer": q.answer, "gold": index.meta[g]["id"]} for q, g in kept]
    for source in sources:
        found = [
            [retriever.passage(g)] if source == "gold" else retriever(q.question, cfg.k) for q, g in kept
        ]  # the same passages for every layout (live: for the text layouts, and FlashBack's first retrieval)
        has_answer = [
            any(_flat(q.answer) in _flat(engine.tokenizer.decode(r.token_ids)) for r in f)
            for (q, _), f in zip(kept, found, strict=True)
        ]
        for record, has in zip(records, has_answer, strict=True):
            record[source] = {"has_answer": has}
        rows = {}
        for spec in layouts:
            if spec.layout == "none" and results["sources"]:  # no passage: the same as for the first source
                rows[str(spec)] = next(iter(results["sources"].values()))["layouts"][str(spec)]
                for record in records:
                    record[source][str(spec)] = record[sources[0]][str(spec)]
                continue
            progress(f"{source} passages, {spec}: scoring {len(kept)} answers")
            marks = [record[source] for record in records]
            live = retriever if source == "live" else None
            rows[str(spec)] = _score_layout(
                engine, index, spec, kept, found, cfg, system, generate_tokens, banned, marks, live
            )
            progress(f"{source} passages, {spec}: perplexity {rows[str(spec)]['perplexity']:.3f}")
        results["sources"][source] = {"answer_in_passage": sum(has_answer) / len(kept), "layouts": rows}
    results["records"] = records
    return results


def format_table(results: dict) -> str:
    lines = [
        "| passages | layout | answer perplexity | F1 | answer in passage | retrievals from the gold document |",
        "|---|---|---|---|---|---|",
    ]
    for source, got in results["sources"].items():
        for name, row in got["layouts"].items():
            f1 = "-" if row["f1"] is None else f"{row['f1']:.3f}"
            r = row.get("retrievals")
            gold = "-" if r is None else f"first {_share(r['first_from_gold'])}, later {_share(r['later_from_gold'])}"
            lines.append(
                f"| {source} | {name} | {row['perplexity']:.3f} | {f1} | {got['answer_in_passage']:.0%} | {gold} |"
            )
    return "\n".join(lines)


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def prepare_qa(
    engine: Engine,
    index: Index,
    questions: Sequence[Question],
    out: str | Path,
    system: str | None,
    stride: int = 16,
    val_fraction: float = 0.1,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Training data in `flashback prepare`'s format from the questions of the modules that are not held out: each
    question as a one-turn chat whose target is its docstring's first `stride` tokens, once with its gold passage and
    once with its BM25 passage (when that is another one). Mixed with running text by `flashback train --data A
    --data B`."""
    from flashback.data import DATA_FOLDER, FORMAT, Segment, index_record, write_data_folder
    from flashback.text.tokenize import tokenizer_fingerprint

    check_output(out, DATA_FOLDER)
    fingerprint = tokenizer_fingerprint(engine.tokenizer)
    index.check_tokenizer(fingerprint)
    usable = [q for q in questions if not q.heldout]
    gold = gold_passages(index, usable)
    head = engine.head_ids
    splits: dict[str, list] = {"train": [], "val": []}
    for q, g in zip(usable, gold, strict=True):
        target = encode(engine.tokenizer, q.docstring)[:stride]
        if g is None or len(target) < stride:
            continue
        ids, _ = render(engine.tokenizer, messages_for("flashback", system, [], q.question, ""), 32)
        ids = strip_head(ids, head)
        hits = [g] + [h.index for h in index.search([q.question], 1)[0] if h.index != g]
        split = "val" if zlib.crc32(f"val:{q.key}".encode()) % round(1 / val_fraction) == 0 else "train"
        for i in hits:
            splits[split].append(
                Segment(
                    f"qa:{q.key}",
                    0,
                    stride,
                    ids + target,
                    [len(ids)],
                    [[index.passage_tokens(i).tolist()]],
                    [[index.meta[i]["id"]]],
                )
            )
    if not splits["train"]:
        raise FlashbackError("no training question has a gold passage in this index (use the default index)")
    manifest = {
        "format": FORMAT,
        "tokenizer": {"name": engine.name, "fingerprint": fingerprint},
        "index": index_record(index),
        "settings": {"source": "qa", "stride": stride, "system": system, "heldout_modules": f"1 in {HELDOUT_MODULES}"},
        "counts": {name: len(rows) for name, rows in splits.items()},
        "targets": {name: len(rows) for name, rows in splits.items()},
        "documents": len({seg.doc_id for rows in splits.values() for seg in rows}),
    }
    write_data_folder(out, splits, manifest)
    progress(f"{manifest['counts']['train']} training and {manifest['counts']['val']} validation examples")
    return manifest
