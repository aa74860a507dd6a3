"""lm-evaluation-harness against `flashback serve`: its own evaluation (simple_evaluate, what its CLI runs) and
client (local-completions, token-id requests) on two local tasks, a rolling perplexity task and a multiple-choice
one, in each mode picked by model name.

The harness's log-likelihoods must be what FlashBack's evaluation code gives for the same tokens: each document
is one window [end-of-text] + its tokens, scored by evaluate.score_tokens (the protocol `flashback eval` uses).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest

from flashback.config import MODES, EvalConfig
from flashback.evaluate import ModeSpec, score_tokens
from flashback.server import ServerLimits, create_app
from flashback.text.retrieval import Index, IndexRetriever
from tests.conftest import TOPICS

from .test_server import serve_in_thread

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")

DOCS = [
    "Garbage collectors reclaim memory a program can no longer reach, and reference counting frees objects early. "
    + TOPICS["socket"],
    "A kludge keeps a system running for now; a hacker explores the details of programmable systems instead. "
    + TOPICS["unicode"],
]
QUESTIONS = [
    {"question": "A socket is an endpoint for", "choices": [" network communication", " garbage"], "answer": 0},
    {"question": "UTF-8 encodes code points as", "choices": [" sockets", " one to four bytes"], "answer": 1},
]
ROLLING = """task: flashback_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""
CHOICE = """task: flashback_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    docs, questions = folder / "docs.jsonl", folder / "questions.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "rolling.yaml").write_text(ROLLING.format(docs=docs))
    (folder / "choice.yaml").write_text(CHOICE.format(questions=questions))
    return folder


def run_harness(url: str, model: str, tokenizer: str, tasks) -> dict:
    """lm_eval's own evaluation (what its CLI runs) with its local-completions client, in this process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"model": model, "base_url": f"{url}/v1/completions", "tokenizer": tokenizer}
    args |= {"tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1}
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(
        "local-completions", args, ["flashback_rolling", "flashback_choice"], task_manager=manager, log_samples=False
    )
    return out["results"]


def test_the_harness_measures_flashback_in_every_mode(tiny_lm, tiny_model_dir, tiny_index_dir, tasks, monkeypatch):
    for offline in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # local files only
        monkeypatch.setenv(offline, "1")
    retriever = IndexRetriever(Index.load(tiny_index_dir))
    limits = ServerLimits(max_prompt_tokens=1024, max_request_work=200_000)
    running = serve_in_thread(create_app(tiny_lm, retriever, limits, markers=True, tail=4))
    url = next(running)
    try:
        got = {mode: run_harness(url, f"{tiny_lm.name}:{mode}", str(tiny_model_dir), tasks) for mode in MODES}
    finally:
        next(running, None)
    eot = tiny_lm.tokenizer.eos_token_id
    words = sum(len(re.split(r"\s+", d)) for d in DOCS)
    perplexities = {}
    for mode in MODES:
        spec = ModeSpec(mode, markers=mode == "append")
        total = 0.0
        for doc in DOCS:  # one window per document: [end-of-text] + its tokens
            tokens = [eot, *tiny_lm.tokenizer(doc, add_special_tokens=False)["input_ids"]]
            total += sum(score_tokens(tiny_lm, tokens, retriever, spec, EvalConfig(tail=4)).logprobs)
        want = math.exp(-total / words)
        perplexities[mode] = got[mode]["flashback_rolling"]["word_perplexity,none"]
        assert perplexities[mode] == pytest.approx(want, rel=1e-4), mode
        assert 0 <= got[mode]["flashback_choice"]["acc,none"] <= 1
    assert len(set(perplexities.values())) == 3  # the modes measure different things
