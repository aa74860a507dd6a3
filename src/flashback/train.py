"""Fine-tune a LoRA adapter and the two marker embeddings on prepared segments; the base stays frozen.

Packed training (the default, append position): a segment's text is run once, then every target of
the segment is one row of a batch, `<MARK_L> passage <MARK_R> tail target`, that attends to the
segment's keys up to its own split point and to itself, at the positions it has in the layout of
layout.layout(). That is the sharing the evaluation fast path does at inference, and it gives the
same loss as laying out every example on its own (`--no-pack`, and the only way for prepend, whose
prefix changes with every passage), at a fraction of the tokens.

The loss covers the target tokens only, and the marker tokens are removed from the softmax: the
model should never spend probability on them, and generation never emits them.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from flashback.atomic import FolderKind, atomic_folder, check_output, check_replaceable, resolve_output
from flashback.cards import ADAPTER_FOLDER, ADAPTER_FORMAT, CARD, data_endpoint
from flashback.config import TrainConfig
from flashback.data import Example, Segment, load_segments
from flashback.distributed import ALONE, World
from flashback.engines.torch.adapters import lora_targets
from flashback.engines.torch.model import TorchEngine
from flashback.errors import FlashbackError
from flashback.layout import append_parts, banned_ids, layout, without_markers
from flashback.text.tokenize import tokenizer_fingerprint


@dataclass
class Batch:
    """Rows that end with their target; prefix/prefix_len are set when the rows share a segment prefix."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | dict  # (B, T) padding mask, or (B, 1, T, P + T) additive mask(s) when packed
    position_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, S): the last S tokens of every row
    prefix: torch.Tensor | None = None  # (1, P) segment tokens the rows attend to
    computed: int = 0  # token positions this batch runs through the model, padding included


def collate(
    examples: Sequence[Example],
    mode: str,
    markers: tuple[int, int] | None,
    pad_id: int,
    device: torch.device,
    tail: int = 0,
    head: Sequence[int] = (),
) -> Batch:
    """One example per row, each laid out by layout.layout() (`head`: BOS first), left-padded so every target ends
    its row."""
    rows = [layout(ex.context, ex.passages, ex.target, mode, markers, tail, head)[0] for ex in examples]
    span = {len(ex.target) for ex in examples}
    if len(span) != 1:
        raise FlashbackError("all targets in a batch must have the same length")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding: every target ends its row
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    s = span.pop()
    return Batch(ids.to(device), mask.to(device), positions.to(device), ids[:, -s:].to(device), computed=ids.numel())


def pack(
    segment: Segment,
    markers: tuple[int, int] | None,
    tail: int,
    pad_id: int,
    device: torch.device,
    dtype=torch.float32,
    head: Sequence[int] = (),
    window: int | None = None,
    mixed: bool = True,
) -> Batch:
    """All targets of a segment as rows over one shared prefix (append layout; see the module docstring).

    Row j is layout.append_parts(context_j)'s block + target_j, at positions split_j, split_j + 1, ...;
    it sees prefix keys [0, split_j) (`head`, then the segment's text) and its own earlier tokens. With a sliding
    `window` shorter than the rows, the sliding layers' mask also keeps each query within `window` positions of its
    keys, as at inference: one mask per layer type (transformers' mapping) when full and sliding layers are `mixed`
    (Gemma 2/3), else that one mask (every layer sliding, as in Mistral).
    """
    splits, rows = [], []
    for ex in segment.examples():
        kept, block = append_parts(ex.context, ex.passages, markers, tail, head)
        splits.append(len(kept))
        rows.append(block + ex.target)
    n, width, prefix_len = len(rows), max(len(r) for r in rows), max(splits)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    allowed = torch.zeros((n, width, prefix_len + width), dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for j, (row, split) in enumerate(zip(rows, splits, strict=True)):
        pad = width - len(row)
        ids[j, pad:] = torch.tensor(row)
        positions[j, pad:] = torch.arange(split, split + len(row))
        allowed[j, pad:, :split] = True
        allowed[j, pad:, prefix_len + pad :] = causal[pad:, pad:]
        allowed[j, :pad, prefix_len : prefix_len + pad] = torch.eye(pad, dtype=torch.bool)  # padding sees itself

    def additive(keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, torch.finfo(dtype).min)[:, None].to(device)

    mask = additive(allowed)
    if window is not None and prefix_len + width > window:
        key_positions = torch.cat([torch.arange(prefix_len).expand(n, -1), positions], dim=1)
        near = positions[:, :, None] - key_positions[:, None, :] < window
        sliding = additive(allowed & near)
        mask = {"full_attention": mask, "sliding_attention": sliding} if mixed else sliding
    return Batch(
        ids.to(device),
        mask,
        positions.to(device),
        ids[:, -segment.stride :].to(device),
        prefix=torch.tensor([[*head, *segment.tokens[: prefix_len - len(head)]]], dtype=torch.long, device=device),
        computed=prefix_len + ids.numel(),
    )


def sliding_window(config) -> tuple[int, bool] | None:
    """(window, whether full-attention layers are mixed in) of a model with sliding-window layers, else None."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return window, types is not None and "full_attention" in types


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 mixed precision where the hardware runs it natively (AVX512-BF16/AMX CPUs, recent GPUs).

    Weights, LoRA parameters, optimizer state and the loss stay fp32; only matmuls and attention run in
    bf16. On a CPU without native bf16 it would be emulated and slower, so "auto" leaves it off.
    """
    if cfg.autocast == "none":
        return None
    if cfg.autocast == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


FP32_ATTENTION = "sdpa_fp32"  # no "flash" in the name: transformers treats those as flash-attention kernels


def _fp32_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA with fp32 inputs inside a bf16 autocast region: on CPUs the bf16 attention kernels with a
    mask are slower than the fp32 ones (measured here: 171 vs 115 ms per layer, forward + backward)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float(), key.float(), value.float()
        out, weights = sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _register_fp32_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, _fp32_sdpa)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def mixed_precision(model, cfg: TrainConfig, device: torch.device):
    """Matmuls in bf16 (autocast_dtype), attention in fp32 on CPU; the model's own setting is restored after."""
    dtype = autocast_dtype(cfg, device)
    before = model.config._attn_implementation
    swap = dtype is not None and device.type == "cpu" and before == "sdpa"
    if swap:
        _register_fp32_attention()
        model.set_attn_implementation(FP32_ATTENTION)
    try:
        yield dtype
    finally:
        if swap:
            model.set_attn_implementation(before)


def _forward_context(cfg: TrainConfig, device: torch.device):
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _offset_weights(s: int, cfg: TrainConfig, device) -> torch.Tensor:
    w = torch.ones(s, device=device)
    w[: cfg.early_tokens] = cfg.early_weight
    return w / w.mean()


class SharedPrefix(DynamicLayer):
    """A packed segment's prefix keys and values, read by every row: `update` returns them followed by the row's
    own and stores nothing, so a layer that gradient checkpointing replays in the backward pass reads the same."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


@contextlib.contextmanager
def _checkpointing_off(model):
    """The prefix forward writes its cache, which a replay would write twice: it is never checkpointed."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant). The rows' forward reads
    the prefix cache (SharedPrefix, never written), so their layers may keep it while checkpointed."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m._can_checkpoint_with_cache = True


def target_nll(model, batch: Batch, banned: torch.Tensor | None) -> torch.Tensor:
    """Negative log-likelihood of every target token, (B, S), markers excluded from the softmax."""
    s = batch.targets.shape[1]
    cache = None
    if batch.prefix is not None and batch.prefix.shape[1]:
        cache = DynamicCache(config=model.config)
        cache.layers = [DynamicLayer() for _ in cache.layers]  # sliding layers too: the rows' mask sets the window
        with _checkpointing_off(model):
            model(input_ids=batch.prefix, cache=cache, use_cache=True, logits_to_keep=1)
        shared = []
        for layer in cache.layers:  # every row reads the same prefix keys and values
            prefix = SharedPrefix()
            prefix.lazy_initialization(layer.keys, layer.values)
            prefix.keys = layer.keys.expand(batch.input_ids.shape[0], -1, -1, -1)
            prefix.values = layer.values.expand(batch.input_ids.shape[0], -1, -1, -1)
            shared.append(prefix)
        cache.layers = shared
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        cache=cache,
        logits_to_keep=s + 1,
        use_cache=cache is not None,
    )
    logits = out.logits[:, :-1].float()  # (B, S, V): position t predicts token t + 1
    logits = without_markers(logits, banned)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), reduction="none")
    return nll.reshape(batch.targets.shape)


def target_loss(model, batch: Batch, banned: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the target tokens and their count."""
    nll = target_nll(model, batch, banned)
    return nll.mean(), nll.numel()


def embedding_module_name(model) -> str:
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[-1]
    raise FlashbackError("cannot find the model's input embedding module")


def add_adapter(engine: TorchEngine, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(engine.model, cfg.target_modules)
    trainable_tokens = None
    if cfg.markers:
        if engine.marker_ids is None:
            raise FlashbackError("markers asked for but the model was loaded without marking tokens")
        trainable_tokens = {embedding_module_name(engine.model): list(engine.marker_ids)}
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        trainable_token_indices=trainable_tokens,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(engine.model, config)


def batches(
    units: Sequence, cfg: TrainConfig, markers, pad_id: int, device, head: Sequence[int] = (), window=None
) -> list[Batch]:
    """Model inputs for a list of segments (packed) or examples (--no-pack), one micro-batch each; `window`:
    sliding_window()'s (size, mixed) or None."""
    if cfg.packed:
        size, mixed = window or (None, True)
        return [pack(seg, markers, cfg.tail, pad_id, device, head=head, window=size, mixed=mixed) for seg in units]
    return [
        collate(units[i : i + cfg.batch_size], cfg.mode, markers, pad_id, device, cfg.tail, head)
        for i in range(0, len(units), cfg.batch_size)
    ]


def training_units(segments: Sequence[Segment], cfg: TrainConfig) -> list:
    """What one step draws from: whole segments when packing, else their examples."""
    return list(segments) if cfg.packed else [ex for seg in segments for ex in seg.examples()]


def spread(items: Sequence, n: int) -> list:
    """n items evenly spread over the list (validation: many documents, not the first few)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else [items[0]]


@torch.no_grad()
def evaluate_loss(model, units: Sequence, cfg: TrainConfig, markers, pad_id, banned, device, head=()) -> dict:
    """Mean target NLL (unweighted) and its value at each target offset."""
    model.eval()
    window = sliding_window(model.config)
    rows = [target_nll(model, b, banned) for b in batches(units, cfg, markers, pad_id, device, head, window)]
    model.train()
    nll = torch.cat(rows) if rows else torch.zeros(0, 1)
    return {"loss": float(nll.mean()), "by_offset": [round(float(v), 4) for v in nll.mean(dim=0)]}


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    target_tokens: int
    seconds: float
    val_loss_before: float
    val_loss_after: float
    history: list[dict] = field(default_factory=list)

    @property
    def target_tokens_per_s(self) -> float:
        return self.target_tokens / self.seconds if self.seconds else float("nan")


def optimizer_for(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the marker rows get their own learning rate (they start as the mean embedding)."""
    marker, lora = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (marker if "trainable_tokens" in name else lora).append(p)
    groups = [{"params": lora, "lr": cfg.lr}]
    if marker:
        groups.append({"params": marker, "lr": cfg.marker_lr or cfg.lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class _Progress:
    """What a run has done so far: saved in checkpoints, restored by --resume."""

    step: int = 0
    tokens_seen: int = 0
    target_tokens: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    val_before: float | None = None

    def result(self) -> TrainResult:
        return TrainResult(
            self.step,
            self.tokens_seen,
            self.target_tokens,
            self.seconds,
            self.val_before,
            _last_val(self.history),
            self.history,
        )


class _Loop:
    """One run's moving parts: the model under its adapter, the optimizer and schedule, the batching."""

    def __init__(self, engine: TorchEngine, model, cfg: TrainConfig, total_steps: int, world: World = ALONE):
        from transformers import get_cosine_schedule_with_warmup

        self.model, self.cfg, self.device, self.world = model, cfg, engine.device, world
        self.markers = engine.marker_ids if cfg.markers else None
        self.banned = banned_ids(engine.marker_ids, engine.device)
        self.pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        self.head = engine.head_ids  # BOS first in every row, as at inference
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer_for(model, cfg)
        warmup = min(cfg.warmup_steps, total_steps // 10 + 1)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, total_steps)

    def validation(self, units: Sequence) -> dict:
        return evaluate_loss(
            self.model, units, self.cfg, self.markers, self.pad_id, self.banned, self.device, self.head
        )

    def step(self, units: Sequence, done: _Progress) -> float:
        """One optimizer step on `units` (the whole step's, every rank's share): the gradient of the mean over all
        their target tokens."""
        self.optimizer.zero_grad(set_to_none=True)
        window = sliding_window(self.model.config)
        mine = self.world.share(units)
        step_batches = batches(mine, self.cfg, self.markers, self.pad_id, self.device, self.head, window)
        (step_targets,) = self.world.sum([sum(b.targets.numel() for b in step_batches)], self.device)
        nll_sum = computed = 0.0
        for batch in step_batches:
            with _forward_context(self.cfg, self.device):
                nll = target_nll(self.model, batch, self.banned)
            weighted = (nll * _offset_weights(nll.shape[1], self.cfg, self.device)).sum() / step_targets
            weighted.backward()
            nll_sum += float(nll.detach().sum())
            computed += batch.computed
        self.world.sum_gradients(self.params)
        nll_sum, computed = self.world.sum([nll_sum, computed], self.device)
        step_loss = nll_sum / step_targets
        done.tokens_seen += int(computed)
        done.target_tokens += int(step_targets)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        done.step += 1
        return step_loss


def train(
    engine: TorchEngine,
    data_dir: str | Path | Sequence[str | Path],
    out: str | Path,
    cfg: TrainConfig,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    world: World = ALONE,
) -> TrainResult:
    """Train an adapter on prepared data. Under a launcher, `world` (distributed.join) splits each step's segments
    between the ranks; the result is the same for any number of ranks with the same global batch
    (batch_size x grad_accum x ranks segments or examples per step). Rank 0 validates, logs and writes."""
    cfg.validate()
    if not world.main:
        log, progress = (lambda msg: None), False
    else:
        check_outputs(out, resume)
    fingerprint = tokenizer_fingerprint(engine.tokenizer)
    train_segments, val_segments, manifest = _load_data(data_dir, fingerprint)
    train_set = training_units(train_segments, cfg)
    val_set = training_units(spread(val_segments, cfg.max_val_segments), cfg)
    out = resolve_output(out)
    cfg, model = _adapted(engine, cfg, world)
    per_step = cfg.batch_size * cfg.grad_accum * world.size  # units per optimizer step, all ranks together
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_set) / per_step))
    loop = _Loop(engine, model, cfg, total_steps, world)
    ckpt = out.with_name(out.name + ".checkpoint")
    done = _resume(ckpt, loop, log, per_step) if resume else _Progress()
    if done.val_before is None and world.main:
        done.val_before = loop.validation(val_set)["loss"] if val_set else float("nan")
        log(f"validation loss before training: {done.val_before:.4f} (ppl {math.exp(done.val_before):.2f})")
    batch = {"world_size": world.size, "global_batch": per_step, "per_rank": cfg.batch_size * cfg.grad_accum}
    card = partial(_card, engine, cfg, fingerprint, data_dir, manifest, batch)
    order = _order(len(train_set), cfg.seed, total_steps * per_step)
    bar = tqdm(total=total_steps, initial=done.step, desc="training", unit="step", disable=not progress)
    start = time.perf_counter() - done.seconds
    with mixed_precision(model, cfg, engine.device):
        while done.step < total_steps:
            first = done.step * per_step
            step_loss = loop.step([train_set[i] for i in order[first : first + per_step]], done)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{loop.scheduler.get_last_lr()[0]:.1e}")
            done.seconds = time.perf_counter() - start
            _record(done, step_loss, loop, val_set if world.main else (), done.step == total_steps, log)
            if done.step % cfg.save_every == 0 and done.step < total_steps and world.main:
                _save_checkpoint(ckpt, loop, done, card(done.result()))
    bar.close()
    done.seconds = time.perf_counter() - start
    result = done.result()
    if world.main:
        with atomic_folder(out, ADAPTER_FOLDER) as tmp:
            _save_adapter(model, tmp, card(result))
        _remove_checkpoint(ckpt, log)
    world.barrier()  # every rank returns once the adapter is written
    engine.model = model
    return result


def _adapted(engine: TorchEngine, cfg: TrainConfig, world: World):
    """The model under a fresh adapter, initialised alike on every rank (then each rank draws its own dropout
    masks), and the settings with the target modules resolved to names for the card."""
    torch.manual_seed(cfg.seed)
    cfg = replace(cfg, target_modules=tuple(lora_targets(engine.model, cfg.target_modules)))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(engine.model)
    model = add_adapter(engine, cfg)
    model.train()
    if world.size > 1:
        torch.manual_seed(cfg.seed + world.rank)
    return cfg, model


def _load_data(data_dir, fingerprint: str) -> tuple[list, list, dict]:
    """The train and val segments of one prepared data folder, or of several mixed (their manifests listed)."""
    folders = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    train_segments, val_segments, manifests = [], [], []
    for folder in folders:
        train_part, manifest = load_segments(folder, "train", fingerprint)
        if not train_part:
            raise FlashbackError(f"{folder}/train.jsonl holds no examples")
        train_segments += train_part
        val_segments += load_segments(folder, "val", fingerprint)[0]
        manifests.append(manifest)
    strides = sorted({seg.stride for seg in train_segments + val_segments})
    if len(strides) > 1:  # a batch and the loss by offset need one target length
        raise FlashbackError(f"the data mixes target lengths {strides}: prepare every folder with the same --stride")
    return train_segments, val_segments, manifests[0] if len(manifests) == 1 else {"mixed": manifests}


def check_outputs(out: str | Path, resume: bool) -> None:
    """The adapter folder and its checkpoint, checked before any training: a refusal after an hour loses the hour."""
    check_output(out, ADAPTER_FOLDER)
    ckpt = resolve_output(out)
    ckpt = ckpt.with_name(ckpt.name + ".checkpoint")
    if resume:
        if not (ckpt / "state.pt").exists():
            raise FlashbackError(f"nothing to resume: no checkpoint at {ckpt}")
    else:
        check_output(ckpt, CHECKPOINT_FOLDER)


def _record(done: _Progress, step_loss: float, loop: _Loop, val_set, last: bool, log) -> None:
    """The step's line in the history, validated every eval_every steps and at the end."""
    record = {
        "step": done.step,
        "loss": step_loss,
        "tokens_seen": done.tokens_seen,
        "target_tokens": done.target_tokens,
        "seconds": round(done.seconds, 1),
    }
    if (done.step % loop.cfg.eval_every == 0 or last) and val_set:
        val = loop.validation(val_set)
        record["val_loss"], record["val_by_offset"] = val["loss"], val["by_offset"]
        log(
            f"step {done.step}: train loss {step_loss:.4f}, val loss {val['loss']:.4f} "
            f"(ppl {math.exp(val['loss']):.2f}), offsets 1-3 {val['by_offset'][:3]}, "
            f"{done.target_tokens / done.seconds:.1f} target tokens/s"
        )
    done.history.append(record)


def throughput(engine: TorchEngine, data_dir: str | Path, cfg: TrainConfig, segments: int, repeats: int = 3) -> dict:
    """Target tokens/s of forward + backward: one example per row vs packed, in fp32 and bf16 autocast.

    All ways run on the same training segments, interleaved (the order rotates), after a warm-up;
    the median of `repeats` is reported. No optimizer step: only the cost of the gradient is compared.
    """
    fingerprint = tokenizer_fingerprint(engine.tokenizer)
    train_segments, _ = load_segments(data_dir, "train", fingerprint)
    chosen = spread(train_segments, segments)
    model = add_adapter(engine, cfg)
    model.train()
    markers = engine.marker_ids if cfg.markers else None
    banned = torch.tensor(engine.marker_ids, device=engine.device) if engine.marker_ids else None
    pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    ways = {
        f"{layout_name}_{precision}": TrainConfig(
            **{**asdict(cfg), "pack": layout_name == "packed", "autocast": precision}
        )
        for layout_name in ("per_example", "packed")
        for precision in ("none", "bfloat16")
    }
    head, window = engine.head_ids, sliding_window(engine.model.config)
    inputs = {
        name: batches(training_units(chosen, c), c, markers, pad_id, engine.device, head, window)
        for name, c in ways.items()
    }

    def run(name: str) -> float:
        t0 = time.perf_counter()
        with mixed_precision(model, ways[name], engine.device):
            for b in inputs[name]:
                with _forward_context(ways[name], engine.device):
                    nll = target_nll(model, b, banned)
                nll.mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    names = list(ways)
    for name in names:  # warm-up
        run(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(run(name))
    engine.model = model.unload()
    out: dict = {"segments": len(chosen), "tail": cfg.tail, "batch_size_per_example": cfg.batch_size}
    for name in names:
        targets = sum(b.targets.numel() for b in inputs[name])
        seconds = statistics.median(times[name])
        out[name] = {
            "seconds": seconds,
            "target_tokens": targets,
            "computed_tokens": sum(b.computed for b in inputs[name]),
            "target_tokens_per_s": targets / seconds,
        }
    base = out["per_example_none"]["target_tokens_per_s"]
    out["speedup_over_per_example_fp32"] = {name: out[name]["target_tokens_per_s"] / base for name in names}
    return out


def _order(n: int, seed: int, needed: int) -> list[int]:
    """Epoch-wise shuffled example indices, long enough for the whole run (resumable: deterministic)."""
    order: list[int] = []
    epoch = 0
    while len(order) < needed:
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        order += perm
        epoch += 1
    return order


CHECKPOINT_FOLDER = FolderKind(
    "FlashBack training checkpoint",
    "checkpoint.json",
    "flashback-checkpoint/1",
    frozenset({"checkpoint.json", "state.pt", "adapter"}),
    nested=tuple(f"adapter/{name}" for name in ADAPTER_FOLDER.files),
)


def _last_val(history: list[dict]) -> float:
    return next((h["val_loss"] for h in reversed(history) if "val_loss" in h), float("nan"))


def _card(
    engine: TorchEngine, cfg: TrainConfig, fingerprint: str, data_dir, manifest: dict, batch: dict, result: TrainResult
) -> dict:
    """flashback.json: what the adapter is for (base, tokenizer, layout) and how it was trained."""
    return {
        "format": ADAPTER_FORMAT,
        "base_model": engine.name,
        "tokenizer_fingerprint": fingerprint,
        "mode": cfg.mode,
        "markers": cfg.markers,
        "tail": cfg.tail if cfg.mode == "append" else 0,
        "endpoint": data_endpoint(manifest),  # chat adapters serve chats, the others completions
        "marker_ids": list(engine.marker_ids) if cfg.markers else None,
        "settings": {**asdict(cfg), "target_modules": list(cfg.target_modules)},
        "batch": batch,  # ranks, and segments (or examples) per optimizer step: all ranks', and each rank's
        "data": str(data_dir) if isinstance(data_dir, (str, Path)) else [str(d) for d in data_dir],
        "data_manifest": manifest,
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "target_tokens": result.target_tokens,
        "seconds": round(result.seconds, 1),
        "val_loss_before": result.val_loss_before,
        "val_loss_after": result.val_loss_after,
        "history": result.history,
    }


def _save_adapter(model, folder: Path, card: dict) -> None:
    """PEFT's files without the embedding matrix, and our card instead of PEFT's generated model card
    (a template that names local paths and says nothing about the layout)."""
    model.save_pretrained(folder, save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")


def _save_checkpoint(ckpt: Path, loop: _Loop, done: _Progress, card: dict) -> None:
    """Optimizer state for --resume, plus the adapter so far in ckpt/adapter (usable like a finished one)."""
    from peft import get_peft_model_state_dict

    with atomic_folder(ckpt, CHECKPOINT_FOLDER) as tmp:
        (tmp / "checkpoint.json").write_text(json.dumps({"format": CHECKPOINT_FOLDER.format, "step": done.step}) + "\n")
        _save_adapter(loop.model, tmp / "adapter", card)
        torch.save(
            {
                "adapter": get_peft_model_state_dict(loop.model, save_embedding_layers=False),
                "optimizer": loop.optimizer.state_dict(),
                "scheduler": loop.scheduler.state_dict(),
                "step": done.step,
                "tokens_seen": done.tokens_seen,
                "target_tokens": done.target_tokens,
                "history": done.history,
                "elapsed": done.seconds,
                "val_before": done.val_before,
                "global_batch": card["batch"]["global_batch"],  # the run's one figure, as its card states it
            },
            tmp / "state.pt",
        )


def _resume(ckpt: Path, loop: _Loop, log, global_batch: int) -> _Progress:
    """Every rank loads the same checkpoint; the run must keep its global batch, so that the data order's steps
    and the schedule mean what they meant."""
    from peft import set_peft_model_state_dict

    if not (ckpt / "state.pt").exists():
        raise FlashbackError(f"nothing to resume: no checkpoint at {ckpt}")
    state = torch.load(ckpt / "state.pt", weights_only=False, map_location=loop.device)
    if state.get("global_batch", global_batch) != global_batch:
        raise FlashbackError(
            f"{ckpt} was written by a run of {state['global_batch']} segments per step, and this one takes "
            f"{global_batch} (--batch-size x --grad-accum x processes): resume with the same global batch"
        )
    set_peft_model_state_dict(loop.model, state["adapter"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    log(f"resumed from step {state['step']}")
    return _Progress(
        state["step"],
        state["tokens_seen"],
        state["target_tokens"],
        state["history"],
        state["elapsed"],
        state.get("val_before"),
    )


def _remove_checkpoint(ckpt: Path, log) -> None:
    """The finished adapter replaces the run's checkpoint; a folder of that name that is not one stays."""
    try:
        check_replaceable(ckpt, CHECKPOINT_FOLDER)
    except FlashbackError:
        log(f"left {ckpt} in place: it is not a FlashBack training checkpoint")
        return
    shutil.rmtree(ckpt, ignore_errors=True)
