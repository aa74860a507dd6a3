"""prepare + train on the tiny model: loss mask, frozen base, adapter round trip, learning, bad input."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from flashback.cli import main
from flashback.config import TrainConfig
from flashback.data import FORMAT, Example, Segment, load_segments
from flashback.engines.torch import load_model
from flashback.engines.torch.adapters import lora_targets
from flashback.errors import FlashbackError
from flashback.layout import layout
from flashback.text.tokenize import tokenizer_fingerprint
from flashback.train import (
    add_adapter,
    collate,
    evaluate_loss,
    pack,
    target_loss,
    target_nll,
    train,
)

TOY_CFG = dict(
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    dropout=0.0,
    batch_size=2,
    warmup_steps=5,
    eval_every=1000,
    save_every=1000,
)


def write_data(folder, lm, train_segments, val_segments):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_segments), ("val", val_segments)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(s.to_json()) + "\n" for s in rows))
    manifest = {"format": FORMAT, "tokenizer": {"name": "tiny", "fingerprint": tokenizer_fingerprint(lm.tokenizer)}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def copy_task(n: int, seed: int, targets_per_segment: int = 4) -> list[Segment]:
    """The answer is only in the passage: each target repeats its passage's token."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tokens, targets, passages = [], [], []
        for _ in range(targets_per_segment):
            a = rng.randrange(50, 70)
            tokens += [rng.randrange(100, 300) for _ in range(rng.randrange(6, 14))]
            targets.append(len(tokens))
            tokens += [a] * 6
            passages.append([[a] * 12])
        out.append(Segment(f"d{seed}-{i}", 0, 6, tokens, targets, passages, [["p"]] * targets_per_segment))
    return out


@pytest.fixture
def fresh_lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), markers=True)


def random_segment(k: int, seed: int = 0) -> Segment:
    rng = random.Random(seed)
    tokens = [rng.randrange(100, 300) for _ in range(70)]
    targets = [6, 14, 22, 38, 54]  # irregular gaps, context from 6 to 54 tokens
    passages = [[[rng.randrange(60, 300) for _ in range(rng.choice([9, 12]))] for _ in range(k)] for _ in targets]
    return Segment("d", 0, 8, tokens, targets, passages, [["p"] * k] * len(targets))


@pytest.mark.parametrize("tail,k", [(0, 1), (4, 1), (10, 2)])
def test_packed_loss_and_gradient_equal_one_example_per_row(fresh_lm, tail, k):
    """Tail 10 is longer than the first context (6 tokens): that row has no shared prefix at all."""
    lm = fresh_lm
    model = add_adapter(lm, TrainConfig(dropout=0.0, **{k_: v for k_, v in TOY_CFG.items() if k_ == "target_modules"}))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter do something
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                p.normal_(0, 0.05)
    segment, banned = random_segment(k), torch.tensor(lm.marker_ids)

    def loss_and_grads(batch):
        model.zero_grad()
        nll = target_nll(model, batch, banned)
        nll.mean().backward()
        return nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    packed_batch = pack(segment, lm.marker_ids, tail, 0, lm.device)
    one_per_row = collate(segment.examples(), "append", lm.marker_ids, 0, lm.device, tail)
    packed, packed_grads = loss_and_grads(packed_batch)
    plain, plain_grads = loss_and_grads(one_per_row)
    torch.testing.assert_close(packed, plain, atol=2e-5, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert packed_batch.computed < one_per_row.computed
    # Each row of the per-example batch is data.layout() of its example, target last.
    for row, ex in zip(one_per_row.input_ids.tolist(), segment.examples(), strict=True):
        ids, start = layout(ex.context, ex.passages, ex.target, "append", lm.marker_ids, tail)
        assert row[-len(ids) :] == ids and ids[start:] == ex.target


def test_layout_with_tail_moves_the_passage_before_the_last_context_tokens():
    ids, start = layout([1, 2, 3, 4, 5], [[7, 8]], [9], "append", (90, 91), tail=2)
    assert ids == [1, 2, 3, 90, 7, 8, 91, 4, 5, 9] and start == 9
    assert layout([1, 2], [[7]], [9], "append", (90, 91), tail=5)[0] == [90, 7, 91, 1, 2, 9]
    assert layout([1, 2], [[7]], [9], "append", None, tail=0)[0] == [1, 2, 7, 9]
    assert layout([1, 2], [[7]], [9], "prepend", None, tail=1)[0] == [7, 1, 2, 9]


def test_default_lora_targets_are_every_linear_layer_but_the_output_head(fresh_lm):
    """The ablations' best (README): LoRA on all linear layers; the card gets the names, not "all-linear"."""
    assert lora_targets(fresh_lm.model, TrainConfig().target_modules) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert lora_targets(fresh_lm.model, ("q_proj", "v_proj")) == ["q_proj", "v_proj"]
    with pytest.raises(FlashbackError, match="not found"):
        lora_targets(fresh_lm.model, ("q_proj", "nope"))


def test_loss_covers_target_tokens_only_and_excludes_markers(fresh_lm):
    lm = fresh_lm
    ex = Example("d", 0, [120, 130, 140, 150], [[60, 61, 62]], ["p"], [70, 71, 72])
    batch = collate([ex], "append", lm.marker_ids, 0, lm.device)
    loss, n = target_loss(lm.model, batch, torch.tensor(lm.marker_ids))
    ids, start = layout(ex.context, ex.passages, ex.target, "append", lm.marker_ids)
    assert ids[start:] == ex.target and n == 3
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    logits[:, list(lm.marker_ids)] = float("-inf")
    logp = torch.log_softmax(logits[start - 1 : -1], dim=-1)
    want = -logp[torch.arange(3), torch.tensor(ex.target)].mean()
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=0)
    # However much the model likes the markers, the loss does not change: they are out of the softmax.
    # (Checked on a layout without markers in the input, since the output rows are tied to the input rows.)
    plain = collate([ex], "append", None, 0, lm.device)
    before, _ = target_loss(lm.model, plain, torch.tensor(lm.marker_ids))
    unmasked, _ = target_loss(lm.model, plain, None)
    with torch.no_grad():  # point the marker output rows along the final hidden states: large marker logits
        hidden = lm.model(input_ids=plain.input_ids, output_hidden_states=True).hidden_states[-1][0, -4:]
        direction = torch.nn.functional.normalize(lm.model.model.norm(hidden).mean(0), dim=0)
        lm.model.get_output_embeddings().weight[list(lm.marker_ids)] = 30 * direction
    boosted, _ = target_loss(lm.model, plain, torch.tensor(lm.marker_ids))
    boosted_unmasked, _ = target_loss(lm.model, plain, None)
    torch.testing.assert_close(boosted.detach(), before.detach(), atol=1e-5, rtol=0)
    assert boosted_unmasked - unmasked > 1.0  # without the mask the markers would take probability
    # Left padding keeps every target at the end of its row.
    batch = collate([ex, Example("e", 0, [120], [[60]], ["p"], [80, 81, 82])], "append", lm.marker_ids, 0, lm.device)
    assert batch.targets.tolist() == [[70, 71, 72], [80, 81, 82]]
    assert batch.attention_mask[1, 0] == 0 and batch.position_ids[1, -1] == 6  # 7 real tokens


def test_training_changes_only_markers_and_lora_and_reloads_exactly(fresh_lm, tiny_model_dir, tmp_path):
    lm = fresh_lm
    data = write_data(tmp_path / "data", lm, copy_task(16, 0), copy_task(4, 1))
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    vocab = torch.arange(lm.model.get_input_embeddings().weight.shape[0])
    with torch.no_grad():
        emb_before = lm.model.get_input_embeddings()(vocab).clone()
    train(
        lm, data, tmp_path / "adapter", TrainConfig(lr=1e-2, max_steps=4, **TOY_CFG), progress=False, log=lambda m: None
    )
    peft_model = lm.model
    for name, weight in peft_model.get_base_model().state_dict().items():
        clean = name.replace(".base_layer", "")
        if clean in base and "lora_" not in name:
            assert torch.equal(weight, base[clean]), f"base weight {name} changed"
    with torch.no_grad():
        emb_after = peft_model.get_input_embeddings()(vocab)
    changed = (emb_after != emb_before).any(dim=-1).nonzero().flatten().tolist()
    assert changed == sorted(lm.marker_ids)
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    assert size < 200_000, "the adapter should not carry the embedding matrix"
    files = sorted(f.name for f in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "flashback.json"], files

    reloaded = load_model(str(tiny_model_dir), adapters={"append": str(tmp_path / "adapter")})
    ids = torch.tensor([[120, 130, lm.marker_ids[0], 60, 61, lm.marker_ids[1], 70]])
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.model(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    card = json.loads((tmp_path / "adapter" / "flashback.json").read_text())
    assert card["steps"] == 4 and card["markers"] and card["mode"] == "append"


def test_switching_modes_gives_each_mode_its_own_marker_rows(fresh_lm, tiny_model_dir, tmp_path):
    """The engine keeps the adapter's trained marker rows outside PEFT (TokenRows) and writes them on a switch:
    append equals the adapter under PEFT, none equals the bare model, in any order, and so does a merged copy."""
    from peft import PeftModel

    from flashback.cards import ADAPTER_FORMAT
    from flashback.engines.torch.decode import merged_copy

    peft_model = add_adapter(fresh_lm, TrainConfig(target_modules=("q_proj", "v_proj")))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    (tmp_path / "a" / "flashback.json").write_text(
        json.dumps({"format": ADAPTER_FORMAT, "position": "append", "markers": True})
    )
    engine = load_model(str(tiny_model_dir), adapters={"append": str(tmp_path / "a")})
    bare = load_model(str(tiny_model_dir), markers=True).model
    reference = PeftModel.from_pretrained(load_model(str(tiny_model_dir), markers=True).model, str(tmp_path / "a"))
    marks = engine.marker_ids
    ids = torch.tensor([[120, 130, marks[0], 60, 61, marks[1], 70]])
    with torch.no_grad():
        want = {"append": reference.eval()(input_ids=ids).logits, "none": bare(input_ids=ids).logits}
        for mode in ("append", "none", "append", "prepend", "none"):
            engine.activate(mode)
            got = engine.model(input_ids=ids).logits
            torch.testing.assert_close(got, want.get(mode, want["none"]), atol=1e-5, rtol=0)
        for adapter, mode in (("append", "append"), (None, "none")):
            copy = merged_copy(engine.model, adapter, engine.token_rows)
            torch.testing.assert_close(copy(input_ids=ids).logits, want[mode], atol=1e-4, rtol=0)


def test_a_few_steps_learn_to_use_the_appended_passage(fresh_lm, tmp_path):
    lm = fresh_lm
    val = copy_task(12, 1)
    data = write_data(tmp_path / "data", lm, copy_task(100, 0), val)
    cfg = TrainConfig(lr=3e-3, max_steps=50, max_val_segments=12, tail=3, **TOY_CFG)
    result = train(lm, data, tmp_path / "adapter", cfg, progress=False, log=lambda m: None)
    assert result.val_loss_after < result.val_loss_before - 1.0
    assert "val_by_offset" in result.history[-1] and result.target_tokens == 50 * 2 * 4 * 6
    swapped = [
        Segment(s.doc_id, 0, s.stride, s.tokens, s.targets, val[(i + 1) % len(val)].passages, s.passage_ids)
        for i, s in enumerate(val)
    ]
    wrong = evaluate_loss(lm.model, swapped, cfg, lm.marker_ids, 0, torch.tensor(lm.marker_ids), lm.device)["loss"]
    assert result.val_loss_after < wrong - 0.3, "the model should rely on the passage, not just on token counts"


def test_resume_continues_from_the_checkpoint(fresh_lm, tiny_model_dir, tmp_path, monkeypatch):
    import flashback.train as train_mod

    data = write_data(tmp_path / "data", fresh_lm, copy_task(20, 0), copy_task(4, 1))
    cfg = TrainConfig(lr=1e-3, max_steps=4, **{**TOY_CFG, "save_every": 2})
    with pytest.raises(FlashbackError, match="nothing to resume"):
        train(fresh_lm, data, tmp_path / "a", cfg, resume=True, progress=False, log=lambda m: None)

    class Crash(Exception):
        pass

    def save_then_crash(*args, **kwargs):
        original(*args, **kwargs)
        raise Crash

    original = train_mod._save_checkpoint
    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_crash)
    with pytest.raises(Crash):  # dies right after the checkpoint of step 2
        train(
            load_model(str(tiny_model_dir), markers=True), data, tmp_path / "c", cfg, progress=False, log=lambda m: None
        )
    monkeypatch.setattr(train_mod, "_save_checkpoint", original)
    assert (tmp_path / "c.checkpoint" / "state.pt").exists() and not (tmp_path / "c").exists()

    messages: list[str] = []
    result = train(
        load_model(str(tiny_model_dir), markers=True),
        data,
        tmp_path / "c",
        cfg,
        resume=True,
        progress=False,
        log=messages.append,
    )
    assert "resumed from step 2" in messages and result.steps == 4
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert (tmp_path / "c" / "adapter_config.json").exists() and not (tmp_path / "c.checkpoint").exists()


def test_prepare_writes_examples_with_leakage_filter(capsys, tiny_model_dir, tiny_index_dir, corpus_file, tmp_path):
    out = tmp_path / "data"
    code = main(
        [
            "prepare",
            str(corpus_file),
            "--index",
            str(tiny_index_dir),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--max-length",
            "128",
            "--stride",
            "8",
            "--query-tokens",
            "8",
            "--val-fraction",
            "0.3",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    lm_tok = load_model(str(tiny_model_dir)).tokenizer
    segments, manifest = load_segments(out, "train", tokenizer_fingerprint(lm_tok))
    val, _ = load_segments(out, "val")
    assert segments and val and {s.doc_id for s in segments}.isdisjoint({s.doc_id for s in val})
    examples = [ex for seg in segments for ex in seg.examples()]
    assert len(examples) > len(segments), "a segment holds several targets"
    for seg in segments:  # targets on the stride grid (a target whose query matches nothing is left out)
        assert seg.targets[0] >= 8 and all((b - a) % 8 == 0 < b - a for a, b in itertools.pairwise(seg.targets))
    for ex in examples:
        assert len(ex.target) == 8 and len(ex.context) >= 8 and len(ex.passages) == 1
        assert len(ex.context) + len(ex.passages[0]) + 2 + 8 <= 128
        assert not ex.passage_ids[0].startswith(ex.doc_id + "#"), "leakage: passage from the same document"
        title = ex.doc_id.rsplit("-", 1)[0]
        assert not ex.passage_ids[0].startswith(title + "-"), "leakage: passage with the same title"
    assert manifest["settings"]["stride"] == 8


def test_prepare_drops_the_documents_of_an_exclude_from_file(
    capsys, tiny_model_dir, tiny_index_dir, corpus_file, tmp_path
):
    """--exclude-from FILE leaves those documents out of training (and a missing FILE is a clean error)."""
    ids = [json.loads(line)["id"] for line in corpus_file.read_text().splitlines()]
    dropped = set(ids[::2])
    listing = tmp_path / "drop.txt"
    listing.write_text("\n".join(sorted(dropped)) + "\n\n")
    args = [str(corpus_file), "--index", str(tiny_index_dir), "--model", str(tiny_model_dir), "--quiet"]
    args += ["--max-length", "128", "--stride", "8", "--query-tokens", "8", "--val-fraction", "0.3"]
    code = main(["prepare", *args, "--exclude-from", str(listing), "--out", str(tmp_path / "data")])
    assert code == 0, capsys.readouterr().err
    kept = {s.doc_id for split in ("train", "val") for s in load_segments(tmp_path / "data", split)[0]}
    assert kept and kept.isdisjoint(dropped) and kept <= set(ids) - dropped

    code = main(["prepare", *args, "--exclude-from", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "d")])
    assert code == 2 and "cannot read --exclude-from file" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_bad_training_input(
    capsys, tiny_model_dir, other_tokenizer_model_dir, tiny_index_dir, corpus_file, tmp_path, fresh_lm
):
    empty = write_data(tmp_path / "empty", fresh_lm, [], [])
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(empty), "--out", str(tmp_path / "a")])
    assert code == 2 and "holds no examples" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    other = load_model(str(other_tokenizer_model_dir))
    foreign = write_data(tmp_path / "foreign", other, copy_task(4, 0), [])
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(foreign), "--out", str(tmp_path / "a")])
    assert code == 2 and "another tokenizer" in capsys.readouterr().err

    code = main(
        [
            "prepare",
            str(corpus_file),
            "--index",
            str(tmp_path / "no-index"),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "d"),
        ]
    )
    assert code == 2 and "not found" in capsys.readouterr().err and not (tmp_path / "d").exists()

    code = main(
        ["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")]
    )
    assert code == 2 and "not a prepared data folder" in capsys.readouterr().err

    base_args = ["train", "--model", str(tiny_model_dir), "--data", str(empty), "--out", str(tmp_path / "a")]
    code = main([*base_args, "--mode", "prepend", "--no-markers", "--tail", "5"])
    assert code == 2 and "--tail only makes sense" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_adapter_for_another_base_is_rejected(
    capsys, tiny_model_dir, other_tokenizer_model_dir, tiny_index_dir, fresh_lm, tmp_path
):
    data = write_data(tmp_path / "data", fresh_lm, copy_task(8, 0), [])
    train(fresh_lm, data, tmp_path / "adapter", TrainConfig(max_steps=1, **TOY_CFG), progress=False, log=lambda m: None)
    with pytest.raises(FlashbackError, match="another tokenizer"):
        load_model(str(other_tokenizer_model_dir), adapters={"append": str(tmp_path / "adapter")})
    code = main(
        [
            "generate",
            "--index",
            str(tiny_index_dir),
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "hi",
            "--adapter",
            str(tmp_path / "nope"),
        ]
    )
    assert code == 2 and "not an adapter folder" in capsys.readouterr().err


def test_prepare_with_workers_writes_what_one_process_writes(capsys, tiny_model_dir, tiny_index_dir, tmp_path):
    from flashback.data import DOCS_PER_TASK

    from .conftest import corpus_records

    records = corpus_records(copies=12)
    assert len(records) > 2 * DOCS_PER_TASK  # several chunks, so both workers get some
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["prepare", str(corpus), "--index", str(tiny_index_dir), "--model", str(tiny_model_dir), "--max-length",
              "128", "--stride", "8", "--query-tokens", "8", "--val-fraction", "0.3", "--quiet"]  # fmt: skip
    outs = {}
    for workers, extra in (("1", []), ("2", []), ("1", ["--max-segments", "40"]), ("2", ["--max-segments", "40"])):
        out = tmp_path / f"w{workers}{'-sampled' if extra else ''}"
        assert main([*common, "--out", str(out), "--workers", workers, *extra]) == 0, capsys.readouterr().err
        outs[out.name] = {name: (out / name).read_bytes() for name in ("train.jsonl", "val.jsonl", "manifest.json")}
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl", "val.jsonl"]
    assert outs["w1"] == outs["w2"] and outs["w1-sampled"] == outs["w2-sampled"]
    manifest = json.loads(outs["w1"]["manifest.json"])
    assert manifest["documents"] > DOCS_PER_TASK and sum(manifest["counts"].values()) > 40
    sampled = json.loads(outs["w1-sampled"]["manifest.json"])
    assert sum(sampled["counts"].values()) == 40
    lines = outs["w1-sampled"]["train.jsonl"].splitlines() + outs["w1-sampled"]["val.jsonl"].splitlines()
    assert set(lines) <= set(outs["w1"]["train.jsonl"].splitlines() + outs["w1"]["val.jsonl"].splitlines())
    assert main([*common, "--out", str(tmp_path / "bad"), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
