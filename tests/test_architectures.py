"""Sliding-window and hybrid-attention models (Gemma 2/3), and tokenizers that add BOS (Gemma, Llama).

A tiny Gemma 3 with a window of 8 tokens (three sliding layers, one full) and a tokenizer that adds <bos>:
contexts and passages run several windows long, so every check crosses the window boundary.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from flashback.cli import main
from flashback.config import EvalConfig, GenerationConfig, TrainConfig
from flashback.engines.base import SCORING
from flashback.engines.torch import load_model
from flashback.engines.torch.cache import FixedWindowLayer, KVCache, Windowed, WindowLayer
from flashback.engines.torch.decode import Decoder
from flashback.errors import FlashbackError
from flashback.evaluate import ModeSpec, plan_targets, retrieve_all, score_fast, score_slow, segment_size
from flashback.generate import Trace, generate, stream
from flashback.layout import Planner, layout
from flashback.text.corpus import read_documents
from flashback.text.retrieval import Index, IndexRetriever
from flashback.train import add_adapter, collate, pack, sliding_window, target_nll

from .conftest import TEST_DEVICE, WINDOW, corpus_records
from .test_cache import assert_same_cache, full_logits, plain_cache
from .test_train import random_segment

ATOL = 1e-4


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir):
    return load_model(str(tiny_gemma_dir), markers=True, device=TEST_DEVICE)


def random_ids(lm, n: int, seed: int) -> list[int]:
    """Ordinary tokens: not <eos> (0), <bos> (1) or the markers (the last two ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, len(lm.tokenizer) - 2, (n,), generator=g).tolist()


def test_the_tiny_model_has_a_live_window_and_a_bos_tokenizer(gemma):
    """Without both, the checks below could pass on code that ignores the window or never places BOS."""
    assert sliding_window(gemma.model.config) == (WINDOW, True)
    assert gemma.head_ids == [gemma.tokenizer.bos_token_id]
    assert gemma.tokenizer("a socket")["input_ids"][0] == gemma.tokenizer.bos_token_id
    config = gemma.model.config.to_dict() | {"sliding_window": 4096}  # same layers (and rotary bases), no window
    no_window = AutoModelForCausalLM.from_config(type(gemma.model.config).from_dict(config)).to(TEST_DEVICE).eval()
    no_window.load_state_dict(gemma.model.state_dict())
    ids = gemma.head_ids + random_ids(gemma, 5 * WINDOW, 1)
    windowed, full = full_logits(gemma.model, ids), full_logits(no_window, ids)
    torch.testing.assert_close(windowed[:WINDOW], full[:WINDOW], atol=ATOL, rtol=0)  # same weights
    assert (windowed[-WINDOW:] - full[-WINDOW:]).abs().max() > 1e-2  # the window changes what lies past it


def test_rollback_past_the_window_leaves_the_context_cache(gemma):
    """A passage longer than the window, appended to a context of several windows, then rolled back."""
    ml, mr = gemma.marker_ids
    context = gemma.head_ids + random_ids(gemma, 4 * WINDOW + 3, 2)
    cache = plain_cache(gemma.model, context)
    cache.extend([ml, *random_ids(gemma, 2 * WINDOW + 1, 3), mr])
    cache.extend(random_ids(gemma, 5, 4))
    cache.rollback(len(context))
    assert_same_cache(cache, plain_cache(gemma.model, context))  # bit-identical
    new = random_ids(gemma, 2 * WINDOW, 5)
    got = cache.extend(new, all_logits=True)
    torch.testing.assert_close(got, full_logits(gemma.model, context + new)[len(context) :], atol=ATOL, rtol=0)


def test_append_steps_equal_a_full_recomputation_across_the_window(gemma):
    """Each retrieval step's block (passage straddling the window) and each decoded token after it give the logits
    of a full forward over the same layout."""
    ml, mr = gemma.marker_ids
    kept = gemma.head_ids + random_ids(gemma, 3 * WINDOW + 5, 6)
    block = [ml, *random_ids(gemma, WINDOW + 4, 7), mr, *random_ids(gemma, 4, 8)]
    decoded = random_ids(gemma, 2 * WINDOW, 9)
    cache = plain_cache(gemma.model, kept)
    got_block = cache.extend(block, all_logits=True)
    got_decoded = torch.stack([cache.extend([t]) for t in decoded])
    want = full_logits(gemma.model, kept + block + decoded)
    torch.testing.assert_close(got_block, want[len(kept) : len(kept) + len(block)], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_decoded, want[len(kept) + len(block) :], atol=ATOL, rtol=0)


def test_the_decode_step_over_fixed_buffers_keeps_the_window(gemma):
    """decode.Decoder writes into fixed-shape buffers and masks past the filled length: the sliding mask holds too."""
    context, new = gemma.head_ids + random_ids(gemma, 3 * WINDOW, 10), random_ids(gemma, 2 * WINDOW, 11)
    cache = KVCache(gemma.model, capacity=64, decoder=Decoder(gemma.model, None, None, compile=False))
    cache.extend(context)
    got = torch.stack([cache.extend([t]) for t in new])
    want = full_logits(gemma.model, context + new)[len(context) :]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    cache.extend(random_ids(gemma, WINDOW + 2, 12))
    cache.rollback(len(context))
    assert_same_cache(cache, plain_cache(gemma.model, context))


class Recorder:
    """Records what every forward of the engine's sessions ran: (tokens cached before, the ids)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, list[int]]] = []
        extend = KVCache.extend

        def recording(cache, token_ids, *args, **kwargs):
            self.calls.append((len(cache), [int(t) for t in token_ids]))
            return extend(cache, token_ids, *args, **kwargs)

        monkeypatch.setattr(KVCache, "extend", recording)

    def assert_bos_first_and_only_first(self, bos: int) -> None:
        assert self.calls
        for before, ids in self.calls:
            if before == 0:
                assert ids[0] == bos, ids
                assert bos not in ids[1:], ids
            else:
                assert bos not in ids, ids


@pytest.mark.parametrize("mode", ["append", "prepend", "none"])
def test_generation_puts_bos_first_once_in_every_mode(gemma, tiny_gemma_index_dir, monkeypatch, mode):
    retriever = IndexRetriever(Index.load(tiny_gemma_index_dir))
    prompt = gemma.tokenizer("Garbage collection frees memory and a socket binds to a port", add_special_tokens=False)
    cfg = GenerationConfig(mode=mode, stride=6, max_new_tokens=18, tail=3, stop_at_eos=False)
    record = Recorder(monkeypatch)
    result = generate(gemma, prompt["input_ids"], retriever, cfg)
    record.assert_bos_first_and_only_first(gemma.tokenizer.bos_token_id)
    assert len(result.token_ids) == 18
    if mode != "none":
        assert len(result.trace.retrievals) == 3 and all(r["passages"] for r in result.trace.retrievals)
    # A token-id prompt that brings its own BOS gets the same generation, not a second BOS.
    with_bos = generate(gemma, gemma.head_ids + prompt["input_ids"], retriever, cfg)
    assert with_bos.token_ids == result.token_ids


def test_compiled_generation_gives_the_eager_greedy_tokens(tiny_gemma_dir, tiny_gemma_index_dir):
    """The compiled decode step (a 512-token buffer, blocked attention) over sliding-window layers."""
    retriever = IndexRetriever(Index.load(tiny_gemma_index_dir))
    eager = load_model(str(tiny_gemma_dir), markers=True, device=TEST_DEVICE)
    compiled = load_model(str(tiny_gemma_dir), markers=True, compile=True, device=TEST_DEVICE)
    prompt = eager.tokenizer("A lambda expression creates a function; a kludge is a workaround")["input_ids"]
    for mode in ("append", "none"):
        cfg = GenerationConfig(mode=mode, stride=6, max_new_tokens=24, tail=3, stop_at_eos=False)
        want, got = generate(eager, prompt, retriever, cfg), generate(compiled, prompt, retriever, cfg)
        assert got.token_ids == want.token_ids, mode
        assert got.trace.cache_capacity == 512
    assert compiled.compile_s > 0


@pytest.mark.parametrize(("mode", "tail"), [("none", 0), ("append+markers", 0), ("append+markers", 6), ("append", 40)])
def test_eval_fast_path_equals_scoring_each_example_from_scratch(
    gemma, tiny_gemma_index_dir, corpus_file, monkeypatch, mode, tail
):
    """Contexts of 2 to 5 windows; tail 40 is longer than some contexts: their passage goes right after BOS."""
    cfg = EvalConfig(stride=8, query_tokens=8, k=1, max_length=96, tail=tail)
    index = Index.load(tiny_gemma_index_dir)
    documents = list(read_documents([corpus_file]))[:6]
    docs = [gemma.tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in documents]
    targets = plan_targets(docs, cfg, segment_size(cfg, index.chunk_tokens))
    retrievals = retrieve_all(targets, docs, documents, index, gemma.tokenizer, cfg, frozenset())
    banned, spec, head = torch.tensor(gemma.marker_ids), ModeSpec.parse(mode), gemma.head_ids
    args = (gemma.marker_ids, spec, docs, targets, retrievals, cfg, banned)
    record = Recorder(monkeypatch)
    session = gemma.session(SCORING)
    held, extend = [], session.extend

    def watched(*a, **kw):
        out = extend(*a, **kw)
        held.append(max(la._k.shape[-2] for la in session._windows()))
        return out

    monkeypatch.setattr(session, "extend", watched)
    fast = torch.cat(score_fast(session, *args, head=head))
    slow = torch.cat(score_slow(gemma.session(SCORING), *args, head=head))
    # the fast path's sliding layers hold the window plus what its rollbacks need (passage block, tail, target),
    # with room to compact, and drop the keys before it
    assert max(held) <= 2 * (WINDOW + index.chunk_tokens + 2 + tail + cfg.stride), held
    assert tail == 40 or any(la.start > 0 for la in session._windows())
    record.assert_bos_first_and_only_first(gemma.tokenizer.bos_token_id)
    assert fast.numel() > 100
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=0)
    without_bos = torch.cat(score_fast(gemma.session(SCORING), *args))
    assert (without_bos - fast).abs().max() > 1e-3  # the head is scored with, not ignored


def test_bos_stays_first_in_every_layout():
    head, markers, context, passages, target = [1], (90, 91), [5, 6, 7], [[8, 9]], [10, 11]
    for position in ("append", "prepend", "none"):
        for tail in (0, 2, 10):  # 10: the passage would go before the context's first token
            ids, start = layout(
                context, passages, target, position, markers if position == "append" else None, tail, head
            )
            assert ids[0] == 1 and ids.count(1) == 1 and ids[start:] == target, (position, tail, ids)
    for mode in ("append", "prepend", "none"):
        planner = Planner(mode, markers if mode == "append" else None, 10, head)
        first = planner.plan(context, passages, first=True)
        assert (first.prefix + first.feed)[0] == 1 and first.keep == 0
        later = planner.plan(context + [12, 13], passages, first=False)
        if mode == "append":  # the head stays cached; what is sent holds no second BOS
            assert later.keep >= 1 and 1 not in later.feed, later
        else:  # recomputed from scratch: BOS first again
            assert later.keep == 0 and later.feed[0] == 1 and later.feed.count(1) == 1, later


@pytest.mark.parametrize("tail", [0, 4])
def test_packed_training_keeps_bos_and_the_window(tiny_gemma_dir, tail):
    """Packed rows over a shared prefix (several windows long) give the loss and gradients of one row per example;
    the window goes into the packed mask (without it the loss differs)."""
    lm = load_model(str(tiny_gemma_dir), markers=True)
    model = add_adapter(lm, TrainConfig(dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                p.normal_(0, 0.05)
    segment, banned, head = random_segment(1), torch.tensor(lm.marker_ids), lm.head_ids

    def loss_and_grads(batch):
        model.zero_grad()
        nll = target_nll(model, batch, banned)
        nll.mean().backward()
        return nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    packed_batch = pack(segment, lm.marker_ids, tail, 0, lm.device, head=head, window=WINDOW)
    one_per_row = collate(segment.examples(), "append", lm.marker_ids, 0, lm.device, tail, head)
    assert packed_batch.prefix[0, 0] == head[0] and isinstance(packed_batch.attention_mask, dict)
    assert all(row[row.index(head[0]) :].count(head[0]) == 1 for row in one_per_row.input_ids.tolist())
    packed, packed_grads = loss_and_grads(packed_batch)
    plain, plain_grads = loss_and_grads(one_per_row)
    torch.testing.assert_close(packed, plain, atol=2e-5, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    unwindowed, _ = loss_and_grads(pack(segment, lm.marker_ids, tail, 0, lm.device, head=head))
    assert (unwindowed - plain).abs().max() > 1e-3


def test_the_cli_generates_on_a_sliding_window_model(capsys, tiny_gemma_dir, tiny_gemma_index_dir, tmp_path):
    for mode in ("append", "prepend", "none"):
        main(
            ["generate", "--model", str(tiny_gemma_dir), "--index", str(tiny_gemma_index_dir), "--mode", mode]
            + ["--no-adapter", "--max-new-tokens", "8", "--prompt", "A socket binds to a port", "--json"]
        )
        assert '"token_ids"' in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["none", "append+markers", "prepend"])
def test_scoring_a_sequence_that_starts_with_bos_is_scoring_it_as_eval_does(gemma, tiny_gemma_index_dir, mode):
    """What the server's echo scoring runs: a client's [BOS] + tokens, BOS kept first in every segment's layout,
    gives eval's numbers on the same text (eval places BOS itself)."""
    from flashback.evaluate import evaluate, score_tokens
    from flashback.text.corpus import Document

    text = " ".join(r["text"] for r in corpus_records(1)[:3])
    index, spec = Index.load(tiny_gemma_index_dir), ModeSpec.parse(mode)
    ids = gemma.tokenizer(text, add_special_tokens=False)["input_ids"]
    cfg = EvalConfig(stride=8, query_tokens=8, tail=4, max_length=96)
    (want,) = evaluate(gemma, [Document("held", "held out", text)], index, [spec], cfg)
    scores = score_tokens(gemma, gemma.head_ids + ids, IndexRetriever(index), spec, cfg)
    assert len(scores.logprobs) == len(ids)  # one per token after BOS
    full = range(8, len(ids) - 8 + 1, 8)  # eval's targets: whole strides; token p of the text is logprobs[p]
    got = [-v for p in full for v in scores.logprobs[p : p + 8]]
    assert len(got) == want.tokens and sum(got) / len(got) == pytest.approx(want.nll, abs=1e-5)
    assert [r["position"] for r in scores.retrievals][:2] == [9, 17]  # positions in the client's tokens


def test_packed_training_on_a_model_whose_every_layer_slides(tmp_path):
    """Mistral-style: no layer types, one window for every layer; the packed mask is then one tensor with the
    window in it, and packed rows give the loss of one row per example."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    assert sliding_window(model.config) == (WINDOW, False)
    segment = random_segment(1)
    packed_batch = pack(segment, (300, 301), 4, 0, torch.device("cpu"), window=WINDOW, mixed=False)
    assert isinstance(packed_batch.attention_mask, torch.Tensor)
    with torch.no_grad():
        packed = target_nll(model, packed_batch, None)
        plain = target_nll(model, collate(segment.examples(), "append", (300, 301), 0, torch.device("cpu"), 4), None)
        unwindowed = target_nll(model, pack(segment, (300, 301), 4, 0, torch.device("cpu")), None)
    torch.testing.assert_close(packed, plain, atol=2e-5, rtol=0)
    assert (unwindowed - plain).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("mode", "tail", "decode"),
    [
        ("append", 3, "eager"),
        ("append", 12, "eager"),
        ("prepend", 0, "eager"),
        ("none", 0, "eager"),
        ("append", 12, "fixed"),
        ("none", 0, "fixed"),
        ("append", 3, "compiled"),
    ],
)
def test_sliding_layers_hold_their_window_and_stay_exact(gemma, tiny_gemma_index_dir, monkeypatch, mode, tail, decode):
    """A context of 40 windows, a passage every 4 tokens: at every step the logits equal a full forward over the
    layout (naive_layout), while each sliding layer holds at most the window plus one step's rollback distance
    (passage block, tail, stride), not the sequence. Chunked prefill (chunks of 16) runs the long prompt.

    `fixed` and `compiled` decode through the decode step's fixed buffers (FixedWindowLayer, made 128 and 256 slots
    by a smaller WINDOW_ROOM and SLOT_STEP; compiled keeps the blocked attention's multiple of 256): the buffer never
    grows, so one graph serves the whole generation."""
    from flashback.engines.torch import cache as cache_module

    from .test_generate import naive_layout, passages_by_step

    monkeypatch.setattr(cache_module, "PREFILL_CHUNK", 16)
    if decode != "eager":
        monkeypatch.setattr(cache_module, "WINDOW_ROOM", 64)
        monkeypatch.setattr(cache_module, "SLOT_STEP", 64 if decode == "fixed" else 256)
        decoder = Decoder(gemma.model, None, None, compile=decode == "compiled")
        monkeypatch.setattr(gemma, "decoder", lambda mode, build=False: decoder)
    index = Index.load(tiny_gemma_index_dir)
    retriever = IndexRetriever(index)
    stride, max_new = 4, 24
    cfg = GenerationConfig(mode=mode, stride=stride, max_new_tokens=max_new, tail=tail, stop_at_eos=False)
    text = " ".join(r["text"] for r in corpus_records())
    prompt = gemma.tokenizer(text, add_special_tokens=False)["input_ids"][: 40 * WINDOW]
    held: list[int] = []
    seen: dict[int, torch.Tensor] = {}
    sessions = []
    session = gemma.session
    monkeypatch.setattr(gemma, "session", lambda *a, **kw: sessions.append(session(*a, **kw)) or sessions[-1])

    def observe(step, logits):
        seen[step] = logits.clone()
        layers = [la for la in sessions[-1].cache.layers if isinstance(la, Windowed)]
        held.append(max(la._k.shape[-2] for la in layers))

    trace = Trace(mode)
    tokens = list(stream(gemma, prompt, retriever, cfg, trace, observe=observe))
    assert len(tokens) == max_new
    passages = passages_by_step(index, trace) if mode != "none" else {}
    assert mode == "none" or all(passages.values()), "every step should have retrieved a passage"
    markers = gemma.marker_ids if mode == "append" else None
    for step, logits in seen.items():
        ids = gemma.head_ids + naive_layout(mode, prompt, tokens, step, passages, markers, tail)
        torch.testing.assert_close(logits, full_logits(gemma.model, ids)[-1], atol=ATOL, rtol=0)
    longest = max(len(p) for p in passages.values()) if passages else 0
    horizon = {"append": longest + 2 + tail + stride, "prepend": stride, "none": max_new}[mode]
    assert len(gemma.head_ids + prompt) > 4 * (WINDOW + horizon + 16)  # the bound below is far from the length
    if decode == "eager":  # window + rollback + one chunk, with room to compact
        assert max(held) <= 2 * (WINDOW + horizon + 16), held
    layers = [la for la in sessions[-1].cache.layers if isinstance(la, Windowed)]
    assert layers and all(la.start > 0 for la in layers)
    if decode != "eager":
        assert all(type(la) is FixedWindowLayer for la in layers)
        assert set(held) == {cache_module.window_slots(WINDOW)} == {128 if decode == "fixed" else 256}, (
            held
        )  # one graph
        full = [la for la in sessions[-1].cache.layers if not isinstance(la, Windowed)]
        assert full and all(la._k.shape[-2] >= len(prompt) for la in full)  # full attention keeps every key
        assert sessions[-1].decoder is decoder and (decode == "fixed" or decoder.compile_s > 0)
        assert decoder.capacities == ({sessions[-1].capacity} if decode == "compiled" else set())


def test_a_rollback_below_the_floor_is_refused_and_one_above_is_exact(gemma):
    """Keys dropped are gone: a rollback that needs them is an error, not a silently wrong cache. A rollback to
    the floor, across the window's edge, equals a plain forward."""
    ml, mr = gemma.marker_ids
    context = gemma.head_ids + random_ids(gemma, 20 * WINDOW, 20)
    cache = KVCache(gemma.model)
    cache.extend(context)
    cache.keep_from(len(context))
    block = [ml, *random_ids(gemma, 3 * WINDOW, 21), mr]
    for _ in range(3):  # append, decode past several windows, roll back: each time the same as a fresh forward
        cache.extend(block)
        after = [cache.extend([t]) for t in random_ids(gemma, WINDOW + 3, 22)]
        assert len(after) == WINDOW + 3
        cache.rollback(len(context))
        new = random_ids(gemma, 5, 23)
        got = cache.extend(new, all_logits=True)
        torch.testing.assert_close(got, full_logits(gemma.model, context + new)[len(context) :], atol=ATOL, rtol=0)
        cache.rollback(len(context))
    sliding = [la for la in cache.cache.layers if isinstance(la, WindowLayer)]
    assert sliding and all(la.start > 0 for la in sliding)
    assert max(la._k.shape[-2] for la in sliding) < len(context)
    with pytest.raises(FlashbackError, match="sliding-window"):
        cache.rollback(len(context) - 2 * WINDOW)


def test_a_cache_that_dropped_keys_moves_into_fixed_window_buffers(gemma, monkeypatch):
    """--compile auto moves an eager cache into the decode step's fixed buffers mid-generation: sliding layers that
    dropped keys keep their start there (FixedWindowLayer), and decoding on stays exact. Into buffers too small for
    a FixedWindowLayer the move is refused."""
    from flashback.engines.torch import cache as cache_module

    monkeypatch.setattr(cache_module, "WINDOW_ROOM", 64)
    monkeypatch.setattr(cache_module, "SLOT_STEP", 64)
    monkeypatch.setattr(cache_module, "PREFILL_CHUNK", 16)  # compaction runs between chunks
    context = gemma.head_ids + random_ids(gemma, 30 * WINDOW, 40)
    cache = KVCache(gemma.model)
    cache.keep_from(len(context))
    cache.extend(context)
    assert not cache.reaches(0) and cache.fits(512) and not cache.fits(128)
    starts = [la.start for la in cache._windows()]
    cache._recast(512)
    assert all(la.start >= s > 0 for la, s in zip(cache._windows(), starts, strict=True))  # nothing needed is lost
    assert all(type(la) is FixedWindowLayer and la.floor == len(context) for la in cache._windows())
    assert cache.reaches(len(context))
    cache.decoder, cache.capacity = Decoder(gemma.model, None, None, compile=False), 512
    new = random_ids(gemma, 3 * WINDOW, 41)
    got = torch.stack([cache.extend([t]) for t in new])
    torch.testing.assert_close(got, full_logits(gemma.model, context + new)[len(context) :], atol=ATOL, rtol=0)


def test_a_fixed_window_buffer_grows_at_most_to_the_cache(gemma, monkeypatch):
    """A floor that stays behind (mode none: nothing after the prompt may be dropped) makes the sliding buffer grow
    mid-generation; it never grows past the cache's capacity, which bounds every position, and stays exact."""
    from flashback.engines.torch import cache as cache_module

    monkeypatch.setattr(cache_module, "WINDOW_ROOM", 8)
    monkeypatch.setattr(cache_module, "SLOT_STEP", 16)
    decoder = Decoder(gemma.model, None, None, compile=False)
    cache = KVCache(gemma.model, capacity=64, decoder=decoder)
    prompt = gemma.head_ids + random_ids(gemma, 4, 50)
    cache.keep_from(len(prompt))
    cache.extend(prompt)
    new = random_ids(gemma, 64 - len(prompt), 51)
    got = torch.stack([cache.extend([t]) for t in new])
    torch.testing.assert_close(got, full_logits(gemma.model, prompt + new)[len(prompt) :], atol=ATOL, rtol=0)
    sizes = {la.capacity for la in cache._windows()}
    assert max(sizes) == 64 and all(type(la) is FixedWindowLayer for la in cache._windows())
    assert decoder.capacities == set() and len(cache) == 64  # eager step: nothing compiled, the cache full


def test_chunked_prefill_equals_one_forward(tiny_lm, gemma, monkeypatch):
    """A long extend runs in chunks: same logits (all, last, last N) and the same cache as one forward."""
    from flashback.engines.torch import cache as cache_module

    for lm in (tiny_lm, gemma):
        ids = lm.head_ids + random_ids(lm, 150, 30)
        one = KVCache(lm.model)
        want = one.extend(ids, all_logits=True)
        monkeypatch.setattr(cache_module, "PREFILL_CHUNK", 32)
        chunked = KVCache(lm.model)
        got = chunked.extend(ids, all_logits=True)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert len(chunked.forwards) == 1 and len(chunked) == len(ids)
        last = KVCache(lm.model).extend(ids, last_logits=40)  # spans two chunks
        torch.testing.assert_close(last, want[-40:], atol=ATOL, rtol=0)
        torch.testing.assert_close(KVCache(lm.model).extend(ids), want[-1], atol=ATOL, rtol=0)
        assert_same_cache(chunked, one, atol=ATOL)
        monkeypatch.setattr(cache_module, "PREFILL_CHUNK", 1024)
