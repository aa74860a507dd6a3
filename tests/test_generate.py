"""The generation loops against a naive reference that recomputes the whole layout every step."""

from __future__ import annotations

import pytest
import torch

from flashback.config import GenerationConfig
from flashback.engines.base import SCORING
from flashback.errors import FlashbackError
from flashback.generate import Trace, generate, stream
from flashback.text.retrieval import Index, IndexRetriever

PROMPT = "Garbage collection frees memory. A lambda expression creates a function and a socket binds to a port"


@pytest.fixture(scope="module")
def index(tiny_index_dir):
    return Index.load(tiny_index_dir)


def passages_by_step(index: Index, trace: Trace) -> dict[int, list[int]]:
    rows = {m["id"]: i for i, m in enumerate(index.meta)}
    return {
        r["step"]: [int(t) for p in r["passages"] for t in index.passage_tokens(rows[p["id"]])]
        for r in trace.retrievals
    }


def naive_layout(
    mode: str,
    prompt: list[int],
    generated: list[int],
    step: int,
    passages: dict,
    markers: tuple[int, int] | None,
    tail: int = 0,
) -> list[int]:
    """The token layout the model should see before emitting token `step`, built from scratch."""
    if mode == "none":
        return prompt + generated[:step]
    r = max(s for s in passages if s <= step)
    passage = passages[r]
    if mode == "prepend":
        return passage + prompt + generated[:step]
    if not passage:  # nothing matched the query: no passage, no markers
        return prompt + generated[:step]
    if markers:
        passage = [markers[0], *passage, markers[1]]
    history = prompt + generated[:r]
    cut = max(0, len(history) - tail)  # the passage goes `tail` tokens before the end of the context
    return history[:cut] + passage + history[cut:] + generated[r:step]


def run(lm, index, mode, markers=True, max_new=40, stride=16, k=1, tail=0):
    cfg = GenerationConfig(
        mode=mode, stride=stride, query_tokens=32, k=k, max_new_tokens=max_new, markers=markers, tail=tail
    )
    prompt = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    trace = Trace(mode)
    seen: dict[int, torch.Tensor] = {}
    tokens = list(
        stream(
            lm,
            prompt,
            IndexRetriever(index),
            cfg,
            trace,
            observe=lambda step, logits: seen.__setitem__(step, logits.clone()),
        )
    )
    return prompt, tokens, trace, seen


@pytest.mark.parametrize(
    ("mode", "markers", "k", "tail"),
    [
        ("append", True, 1, 0),
        ("append", False, 1, 0),
        ("prepend", False, 1, 0),
        ("append", True, 2, 0),
        ("none", False, 1, 0),
        ("append", True, 1, 5),
        ("append", True, 2, 24),  # a tail longer than the stride: tokens stay in the tail across retrievals
        ("append", True, 1, 500),  # longer than the prompt: the passage goes first
        ("prepend", False, 1, 5),  # tail is an append-mode setting: prepend ignores it
    ],
)
def test_every_step_matches_full_recomputation(tiny_lm, index, mode, markers, k, tail):
    prompt, tokens, trace, seen = run(tiny_lm, index, mode, markers, k=k, tail=tail)
    assert len(tokens) == 40, "the tiny model stopped early; the check would be too weak"
    passages = passages_by_step(index, trace)
    if mode != "none":
        assert sorted(passages) == [0, 16, 32]
        # k passages unless fewer match the query at all (passages with score 0 are no hits)
        assert all(len(r["passages"]) <= k for r in trace.retrievals)
        assert any(len(r["passages"]) == k for r in trace.retrievals)
    for step in range(len(tokens)):
        layout = naive_layout(mode, prompt, tokens, step, passages, tiny_lm.marker_ids if markers else None, tail)
        with torch.no_grad():
            want = tiny_lm.model(input_ids=torch.tensor([layout], device=tiny_lm.device)).logits[0, -1].float()
        torch.testing.assert_close(seen[step], want, atol=1e-4, rtol=0)
        want[list(tiny_lm.marker_ids)] = float("-inf")
        assert tokens[step] == int(want.argmax()), f"greedy token differs at step {step}"


@pytest.mark.parametrize("tail", [0, 8])
def test_append_computes_stride_plus_tail_plus_passage_and_prepend_recomputes(tiny_lm, index, tail):
    prompt, _, append, _ = run(tiny_lm, index, "append", max_new=48, tail=tail)
    lengths = {s: len(p) + 2 for s, p in passages_by_step(index, append).items()}  # with markers
    multi = [f for f in append.forwards if f.kind != "decode"]
    per_step = [lengths[0] + tail, 16 + lengths[16] + tail, 16 + lengths[32] + tail]
    assert [f.tokens for f in multi] == [len(prompt) - tail, *per_step]
    assert [r["computed_tokens"] for r in append.retrievals] == per_step
    # The context is never recomputed: after the prefill the cache only grows by what each pass adds.
    assert all(f.kind == "extend" for f in multi[1:])
    assert multi[-1].cache_len == len(prompt) + 32 + lengths[32]

    _, _, prepend, _ = run(tiny_lm, index, "prepend", max_new=48)
    lengths = {s: len(p) for s, p in passages_by_step(index, prepend).items()}
    recomputed = [f for f in prepend.forwards if f.kind != "decode"]
    assert [f.tokens for f in recomputed] == [lengths[s] + len(prompt) + s for s in (0, 16, 32)]
    assert all(f.kind == "prefill" for f in recomputed)
    assert sum(f.tokens for f in recomputed[1:]) > sum(f.tokens for f in multi[1:])


def test_result_json_has_text_retrievals_forwards_timings(tiny_lm, index):
    prompt = tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    cfg = GenerationConfig(mode="append", max_new_tokens=20, tail=4)
    out = generate(tiny_lm, prompt, IndexRetriever(index), cfg).to_json()
    assert out["config"]["tail"] == 4 and out["retrievals"][1]["computed_tokens"] == 16 + 4 + 24 + 2
    assert out["text"] == tiny_lm.tokenizer.decode(out["token_ids"], skip_special_tokens=True)
    assert [r["step"] for r in out["retrievals"]] == [0, 16]
    first = out["retrievals"][0]
    assert first["query"] == tiny_lm.tokenizer.decode(prompt[-32:])
    assert set(first["passages"][0]) == {"id", "doc_id", "title", "score"}
    # step 0: prefill + passage; then one pass per token (the retrieval at step 16 replaces a decode)
    assert len(out["forwards"]) == 2 + 19
    assert set(out["timings"]) == {"retrieval_s", "prefill_s", "extend_s", "decode_s", "total_s"}


def test_sampling_is_reproducible_with_a_seed(tiny_lm, index):
    prompt = tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    cfg = GenerationConfig(mode="append", max_new_tokens=24, temperature=1.0, top_p=0.9, seed=7)
    a = generate(tiny_lm, prompt, IndexRetriever(index), cfg).token_ids
    b = generate(tiny_lm, prompt, IndexRetriever(index), cfg).token_ids
    greedy = generate(tiny_lm, prompt, IndexRetriever(index), GenerationConfig(max_new_tokens=24)).token_ids
    assert a == b and a != greedy


def test_too_long_prompt_keeps_its_end_with_a_warning(tiny_lm, index):
    prompt = tiny_lm.tokenizer(PROMPT * 40, add_special_tokens=False)["input_ids"]
    assert len(prompt) > tiny_lm.max_positions
    cfg = GenerationConfig(mode="append", max_new_tokens=20)
    result = generate(tiny_lm, prompt, IndexRetriever(index), cfg)
    assert len(result.token_ids) == 20
    assert result.trace.dropped_prompt_tokens > 0 and result.trace.warnings
    assert max(f.cache_len for f in result.trace.forwards) <= tiny_lm.max_positions


def test_max_new_tokens_beyond_positions_is_lowered_not_a_crash(tiny_lm, index):
    cfg = GenerationConfig(mode="prepend", max_new_tokens=5000, stride=200)
    result = generate(tiny_lm, [5, 6, 7], IndexRetriever(index), cfg)
    assert len(result.token_ids) < 512 and result.trace.warnings


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (GenerationConfig(mode="sideways"), "unknown mode"),
        (GenerationConfig(stride=0), "stride"),
        (GenerationConfig(k=0), "k must"),
        (GenerationConfig(top_p=0), "top-p"),
        (GenerationConfig(tail=-1), "tail"),
    ],
)
def test_bad_config_is_a_clear_error(tiny_lm, index, cfg, message):
    with pytest.raises(FlashbackError, match=message):
        stream(tiny_lm, [1, 2, 3], IndexRetriever(index), cfg)


def test_empty_prompt_and_missing_retriever_are_errors(tiny_lm, index):
    with pytest.raises(FlashbackError, match="empty"):
        stream(tiny_lm, [], IndexRetriever(index), GenerationConfig())
    with pytest.raises(FlashbackError, match="needs an index"):
        stream(tiny_lm, [1, 2], None, GenerationConfig(mode="prepend"))


class BigPassages:
    """A retriever whose passages would not fit the tiny model's 512 positions at k=25."""

    max_passage_tokens = 24

    def __call__(self, query, k):
        raise AssertionError("never reached: the request is refused first")


def test_k_whose_passages_do_not_fit_is_a_clear_error(tiny_lm):
    with pytest.raises(FlashbackError, match="positions"):
        stream(tiny_lm, [5, 6, 7], BigPassages(), GenerationConfig(mode="append", k=25, max_new_tokens=1))


def test_tiny_temperature_and_extreme_seeds(tiny_lm, index):
    prompt = tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    cold = GenerationConfig(mode="none", max_new_tokens=12, temperature=1e-300, seed=2**64 - 1)
    greedy = GenerationConfig(mode="none", max_new_tokens=12)
    assert generate(tiny_lm, prompt, None, cold).token_ids == generate(tiny_lm, prompt, None, greedy).token_ids
    for bad in (GenerationConfig(seed=2**64), GenerationConfig(seed=-1), GenerationConfig(temperature=float("nan"))):
        with pytest.raises(FlashbackError, match="seed|temperature"):
            stream(tiny_lm, prompt, IndexRetriever(index), bad)


def test_long_max_new_tokens_lowers_max_new_tokens_not_the_prompt(tiny_lm):
    prompt = list(range(100, 400))  # 300 tokens; the tiny model has 512 positions
    result = generate(tiny_lm, prompt, None, GenerationConfig(mode="none", max_new_tokens=8000))
    out = result.to_json()
    assert out["prompt_tokens"] == 300 and out["dropped_prompt_tokens"] == 0
    assert out["max_new_tokens"] == 212 and "lowered from 8000 to 212" in out["warnings"][0]
    assert len(result.token_ids) <= 212


def test_marker_text_in_a_prompt_stays_text(tiny_lm):
    from flashback.text.tokenize import encode

    ids = encode(tiny_lm.tokenizer, "before <MARK_L> after <eos>")
    assert not set(ids) & {*tiny_lm.marker_ids, tiny_lm.tokenizer.eos_token_id}
    assert tiny_lm.tokenizer.decode(ids) == "before <MARK_L> after <eos>"
    with pytest.raises(FlashbackError, match="not valid Unicode"):
        encode(tiny_lm.tokenizer, "a \ud800 b")


def test_a_query_that_matches_nothing_skips_the_passage(tiny_lm, index):
    prompt = tiny_lm.tokenizer("zzqx qqzv " * 4, add_special_tokens=False)["input_ids"]
    cfg = GenerationConfig(mode="append", max_new_tokens=4, stride=16, query_tokens=8, tail=4)
    seen = {}
    trace = Trace("append")
    observe = lambda s, lg: seen.update({s: lg})  # noqa: E731
    tokens = list(stream(tiny_lm, prompt, IndexRetriever(index), cfg, trace, observe=observe))
    assert trace.retrievals[0]["passages"] == [] and "skipped" in trace.retrievals[0]
    with torch.no_grad():  # without a passage the layout is the plain context
        want = tiny_lm.model(input_ids=torch.tensor([prompt + tokens[:2]], device=tiny_lm.device)).logits[0, -1].float()
    torch.testing.assert_close(seen[2], want, atol=1e-4, rtol=0)


def test_a_step_without_passages_then_a_tail_longer_than_the_stride(tiny_lm, index):
    """Step 0 finds nothing, so the whole prompt is cached as context; step 16 finds a passage whose split point
    (tail 24 > stride 16) lies before what is cached: the cache goes back to the split point, and every step still
    equals a full recomputation of its layout."""
    found = IndexRetriever(index)
    calls: list[str] = []

    def nothing_at_first(query: str, k: int):
        calls.append(query)
        return [] if len(calls) == 1 else found(query, k)

    nothing_at_first.max_passage_tokens = found.max_passage_tokens
    cfg = GenerationConfig(mode="append", stride=16, max_new_tokens=40, markers=True, tail=24)
    prompt = tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    trace, seen = Trace("append"), {}
    observe = lambda step, logits: seen.__setitem__(step, logits.clone())  # noqa: E731
    tokens = list(stream(tiny_lm, prompt, nothing_at_first, cfg, trace, observe=observe))
    passages = passages_by_step(index, trace)
    assert len(tokens) == 40 and passages[0] == [] and passages[16] and trace.retrievals[0]["skipped"]
    for step in range(len(tokens)):
        layout = naive_layout("append", prompt, tokens, step, passages, tiny_lm.marker_ids, 24)
        with torch.no_grad():
            want = tiny_lm.model(input_ids=torch.tensor([layout], device=tiny_lm.device)).logits[0, -1].float()
        torch.testing.assert_close(seen[step], want, atol=1e-4, rtol=0)


def test_forwards_pass_the_cache_argument_transformers_keeps(tiny_model_dir, index):
    """transformers 5.24 warns that `past_key_values` goes away in 5.40: generation (eager and the decode step),
    scoring and training pass `cache` instead."""
    import warnings

    from flashback.data import Segment
    from flashback.engines.torch import load_model
    from flashback.train import pack, target_nll

    lm = load_model(str(tiny_model_dir), markers=True, quantize="int8")
    prompt = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = generate(lm, prompt, IndexRetriever(index), GenerationConfig(max_new_tokens=20, stride=8))
        lm.session(SCORING).extend(prompt, all_logits=True)
        segment = Segment("d", 0, 4, prompt[:28], [24], [[prompt[:6]]], [["p"]])  # one target after 24 tokens
        target_nll(lm.model, pack(segment, lm.marker_ids, 4, 0, lm.device), None)
    assert len(result.token_ids) == 20 and any(f.kind == "decode" for f in result.trace.forwards)
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]


def test_a_chat_queries_later_retrievals_as_its_policy_says(tiny_lm, index):
    """Completions query the last tokens at every retrieval; a chat's first query is its question, and the later
    ones the question with the answer's last tokens, the question alone, or the last tokens alone."""
    tok = tiny_lm.tokenizer
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    question = "What does a garbage collector free?"
    queries = {}
    for policy in ("recent", "question+recent", "question"):
        cfg = GenerationConfig(mode="append", max_new_tokens=20, stride=8, query_tokens=6, chat_query=policy)
        trace = Trace("append")
        tokens = list(stream(tiny_lm, prompt, IndexRetriever(index), cfg, trace, question=question))
        queries[policy] = [r["query"] for r in trace.retrievals]
        assert [r["step"] for r in trace.retrievals] == [0, 8, 16]
        assert queries[policy][0] == question
        answer_tail = [tok.decode(tokens[:step][-6:], skip_special_tokens=True) for step in (8, 16)]
        history_tail = [tok.decode((prompt + tokens[:step])[-6:], skip_special_tokens=True) for step in (8, 16)]
        want = {
            "recent": history_tail,
            "question+recent": [f"{question} {t}" for t in answer_tail],
            "question": [question, question],
        }[policy]
        assert queries[policy][1:] == want
    completion = Trace("append")
    cfg = GenerationConfig(mode="append", max_new_tokens=20, stride=8, query_tokens=6, chat_query="question")
    list(stream(tiny_lm, prompt, IndexRetriever(index), cfg, completion))
    assert completion.retrievals[0]["query"] == tok.decode(prompt[-6:])  # no question: the paper's queries
    empty = Trace("append")  # a chat whose last user message is empty: queried by its last tokens
    list(stream(tiny_lm, prompt, IndexRetriever(index), cfg, empty, question=""))
    assert empty.retrievals[0]["query"] == tok.decode(prompt[-6:])
    with pytest.raises(FlashbackError, match="unknown chat query"):
        GenerationConfig(chat_query="answer").validate()
