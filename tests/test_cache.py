"""The central invariant, at the level of the cache verbs."""

from __future__ import annotations

import pytest
import torch

from flashback.engines.torch.cache import KVCache

ATOL = 1e-4


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float()  # (T, V)


def plain_cache(model, ids: list[int]) -> KVCache:
    cache = KVCache(model)
    cache.extend(ids)
    return cache


def assert_same_cache(a: KVCache, b: KVCache, atol: float = 0.0) -> None:
    assert len(a) == len(b)
    if len(a) == 0:
        return
    for (ka, va), (kb, vb) in zip(a.key_values(), b.key_values(), strict=True):
        assert ka.shape == kb.shape
        if atol == 0.0:
            assert torch.equal(ka, kb) and torch.equal(va, vb)
        else:
            torch.testing.assert_close(ka, kb, atol=atol, rtol=0)
            torch.testing.assert_close(va, vb, atol=atol, rtol=0)


@pytest.fixture
def layout(tiny_lm):
    g = torch.Generator().manual_seed(1)
    vocab = len(tiny_lm.tokenizer) - 2
    context = torch.randint(0, vocab, (40,), generator=g).tolist()
    passage = torch.randint(0, vocab, (24,), generator=g).tolist()
    new = torch.randint(0, vocab, (16,), generator=g).tolist()
    ml, mr = tiny_lm.marker_ids
    return context, [ml, *passage, mr], new


def test_rollback_after_append_leaves_the_context_cache(tiny_lm, layout):
    context, passage, _ = layout
    cache = plain_cache(tiny_lm.model, context)
    cache.extend(passage)
    assert len(cache) == len(context) + len(passage)
    cache.rollback(len(context))
    assert_same_cache(cache, plain_cache(tiny_lm.model, context))  # bit-identical


def test_rollback_then_extend_equals_plain_forward(tiny_lm, layout):
    """After a retrieval step the cache holds context + new tokens as if computed in one pass."""
    context, passage, new = layout
    cache = plain_cache(tiny_lm.model, context)
    cache.extend(passage + new[:5])
    cache.rollback(len(context))
    cache.extend(new)
    assert_same_cache(cache, plain_cache(tiny_lm.model, context + new), atol=1e-5)


@pytest.mark.parametrize("tail", [1, 8, 40])
def test_tail_step_rolls_back_to_before_the_passage(tiny_lm, layout, tail):
    """A retrieval with a tail: the cache keeps context[:-tail]; passage + tail + new tokens follow."""
    from flashback.layout import append_parts

    context, passage, new = layout
    kept, block = append_parts(context, [passage[1:-1]], (passage[0], passage[-1]), tail)
    assert kept == context[: len(context) - tail] and block == passage + context[len(context) - tail :]
    cache = plain_cache(tiny_lm.model, kept) if kept else KVCache(tiny_lm.model)
    got = cache.extend(block + new[:5], all_logits=True)
    want = full_logits(tiny_lm.model, kept + block + new[:5])[len(kept) :]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    cache.rollback(len(kept))
    assert_same_cache(cache, plain_cache(tiny_lm.model, kept) if kept else KVCache(tiny_lm.model))
    cache.extend(context[len(kept) :] + new)  # the next retrieval: the tail and the new tokens become context
    assert_same_cache(cache, plain_cache(tiny_lm.model, context + new), atol=1e-5)


def test_append_logits_equal_full_recomputation(tiny_lm, layout):
    context, passage, new = layout
    cache = plain_cache(tiny_lm.model, context)
    got = cache.extend(new + passage, all_logits=True)  # (T, V)
    want = full_logits(tiny_lm.model, context + new + passage)[len(context) :]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    last = KVCache(tiny_lm.model)
    last.extend(context)
    torch.testing.assert_close(last.extend(new + passage), want[-1], atol=ATOL, rtol=0)


def test_prepend_equals_plain_forward_over_passage_then_context(tiny_lm, layout):
    context, passage, _ = layout
    cache = plain_cache(tiny_lm.model, context)
    cache.reset()
    got = cache.extend(passage + context)
    torch.testing.assert_close(got, full_logits(tiny_lm.model, passage + context)[-1], atol=ATOL, rtol=0)
    assert len(cache) == len(passage) + len(context)


def test_rollback_rejects_growing_and_noop_is_allowed(tiny_lm, layout):
    context, _, _ = layout
    cache = plain_cache(tiny_lm.model, context)
    cache.rollback(len(context))  # nothing to drop
    assert len(cache) == len(context)
    with pytest.raises(ValueError):
        cache.rollback(len(context) + 1)


def test_forward_kinds_are_recorded(tiny_lm, layout):
    context, passage, _ = layout
    cache = KVCache(tiny_lm.model)
    cache.extend(context)
    cache.extend(passage)
    cache.extend(passage[:1])
    assert [(f.kind, f.tokens, f.cache_len) for f in cache.forwards] == [
        ("prefill", len(context), len(context)),
        ("extend", len(passage), len(context) + len(passage)),
        ("decode", 1, len(context) + len(passage) + 1),
    ]
