"""Fine-tune a LoRA adapter and the two marker embeddings on prepared examples; the base stays frozen.

Each example is laid out by data.layout() (append or prepend, with or without markers) and
left-padded, so every target ends the sequence and only the last `target + 1` positions need logits.
The loss covers the target tokens only, and the marker tokens are removed from the softmax: the
model should never spend probability on them, and generation never emits them.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flashback.adapter import CARD
from flashback.atomic import atomic_folder
from flashback.data import Example, layout, load_examples
from flashback.errors import FlashbackError
from flashback.model import LoadedModel, tokenizer_fingerprint


@dataclass(frozen=True)
class TrainConfig:
    position: str = "append"  # append (FlashBack) or prepend (In-Context RALM)
    markers: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_steps: int = 20
    eval_every: int = 50
    save_every: int = 50
    max_val_examples: int = 64
    max_grad_norm: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.position not in ("append", "prepend"):
            raise FlashbackError("--position must be append or prepend")
        if self.markers and self.position != "append":
            raise FlashbackError("markers only make sense with --position append")
        for name in ("r", "alpha", "batch_size", "grad_accum", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise FlashbackError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.target_modules:
            raise FlashbackError("--target-modules is empty")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, S): the last S tokens of every row


def collate(
    examples: Sequence[Example], position: str, markers: tuple[int, int] | None, pad_id: int, device: torch.device
) -> Batch:
    rows = [layout(ex.context, ex.passages, ex.target, position, markers)[0] for ex in examples]
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
    return Batch(ids.to(device), mask.to(device), positions.to(device), ids[:, -s:].to(device))


def target_loss(model, batch: Batch, banned: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the target tokens (markers excluded from the softmax)."""
    s = batch.targets.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=s + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()  # (B, S, V): position t predicts token t + 1
    if banned is not None and len(banned):
        logits = logits.index_fill(-1, banned, float("-inf"))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
    return loss, batch.targets.numel()


def embedding_module_name(model) -> str:
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[-1]
    raise FlashbackError("cannot find the model's input embedding module")


def add_adapter(lm: LoadedModel, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise FlashbackError(f"target modules {missing} not found; this model's linear layers: {sorted(names)}")
    trainable_tokens = None
    if cfg.markers:
        if lm.marker_ids is None:
            raise FlashbackError("markers asked for but the model was loaded without marking tokens")
        trainable_tokens = {embedding_module_name(lm.model): list(lm.marker_ids)}
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        trainable_token_indices=trainable_tokens,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm.model, config)


@torch.no_grad()
def evaluate_loss(model, examples: Sequence[Example], cfg: TrainConfig, markers, pad_id, banned, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        loss, n = target_loss(
            model, collate(examples[i : i + cfg.batch_size], cfg.position, markers, pad_id, device), banned
        )
        total += float(loss) * n
        count += n
    model.train()
    return total / max(count, 1)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    target_tokens: int
    seconds: float
    val_loss_before: float
    val_loss_after: float
    history: list[dict] = field(default_factory=list)


def train(
    lm: LoadedModel,
    data_dir: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> TrainResult:
    cfg.validate()
    fingerprint = tokenizer_fingerprint(lm.tokenizer)
    train_set, manifest = load_examples(data_dir, "train", fingerprint)
    val_set, _ = load_examples(data_dir, "val", fingerprint)
    if not train_set:
        raise FlashbackError(f"{data_dir}/train.jsonl holds no examples")
    val_set = val_set[: cfg.max_val_examples]
    out = Path(out).expanduser()
    torch.manual_seed(cfg.seed)
    model = add_adapter(lm, cfg)
    model.train()
    device = lm.device
    markers = lm.marker_ids if cfg.markers else None
    banned = torch.tensor(lm.marker_ids, device=device) if lm.marker_ids else None
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0

    per_step = cfg.batch_size * cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_set) / per_step))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total_steps // 10 + 1), total_steps)
    ckpt = out.with_name(out.name + ".checkpoint")
    step, tokens_seen, target_tokens, history, elapsed = 0, 0, 0, [], 0.0
    val_before = None
    if resume:
        if not (ckpt / "state.pt").exists():
            raise FlashbackError(f"nothing to resume: no checkpoint at {ckpt}")
        step, tokens_seen, target_tokens, history, elapsed, val_before = _load_checkpoint(
            ckpt, model, optimizer, scheduler
        )
        log(f"resumed from step {step}")
    if val_before is None:
        val_before = evaluate_loss(model, val_set, cfg, markers, pad_id, banned, device) if val_set else float("nan")
        log(f"validation loss before training: {val_before:.4f} (ppl {math.exp(val_before):.2f})")

    order = _order(len(train_set), cfg.seed, total_steps * per_step)
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not progress)
    start = time.perf_counter() - elapsed
    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + micro) * cfg.batch_size
            batch = collate(
                [train_set[i] for i in order[first : first + cfg.batch_size]], cfg.position, markers, pad_id, device
            )
            loss, n = target_loss(model, batch, banned)
            (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
            tokens_seen += int(batch.attention_mask.sum())
            target_tokens += n
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        record = {
            "step": step,
            "loss": step_loss,
            "tokens_seen": tokens_seen,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if (step % cfg.eval_every == 0 or step == total_steps) and val_set:
            record["val_loss"] = evaluate_loss(model, val_set, cfg, markers, pad_id, banned, device)
            log(
                f"step {step}: train loss {step_loss:.4f}, val loss {record['val_loss']:.4f} "
                f"(ppl {math.exp(record['val_loss']):.2f})"
            )
        history.append(record)
        if step % cfg.save_every == 0 and step < total_steps:
            _save_checkpoint(
                ckpt,
                model,
                optimizer,
                scheduler,
                step,
                tokens_seen,
                target_tokens,
                history,
                time.perf_counter() - start,
                val_before,
            )
    bar.close()
    seconds = time.perf_counter() - start
    val_after = next((h["val_loss"] for h in reversed(history) if "val_loss" in h), float("nan"))
    result = TrainResult(step, tokens_seen, target_tokens, seconds, val_before, val_after, history)
    card = {
        "base_model": lm.name,
        "tokenizer_fingerprint": fingerprint,
        "position": cfg.position,
        "markers": cfg.markers,
        "marker_ids": list(lm.marker_ids) if cfg.markers else None,
        "settings": {**asdict(cfg), "target_modules": list(cfg.target_modules)},
        "data": str(data_dir),
        "data_manifest": manifest,
        "steps": step,
        "tokens_seen": tokens_seen,
        "target_tokens": target_tokens,
        "seconds": round(seconds, 1),
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "history": history,
    }
    with atomic_folder(out, CARD, "FlashBack adapter folder") as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)
        (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    lm.model = model
    return result


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


def _save_checkpoint(
    ckpt: Path, model, optimizer, scheduler, step, tokens_seen, target_tokens, history, elapsed, val_before
) -> None:
    from peft import get_peft_model_state_dict

    with atomic_folder(ckpt, "state.pt", "FlashBack training checkpoint") as tmp:
        torch.save(
            {
                "adapter": get_peft_model_state_dict(model, save_embedding_layers=False),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "tokens_seen": tokens_seen,
                "target_tokens": target_tokens,
                "history": history,
                "elapsed": elapsed,
                "val_before": val_before,
            },
            tmp / "state.pt",
        )


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler):
    from peft import set_peft_model_state_dict

    state = torch.load(ckpt / "state.pt", weights_only=False)
    set_peft_model_state_dict(model, state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return (
        state["step"],
        state["tokens_seen"],
        state["target_tokens"],
        state["history"],
        state["elapsed"],
        state["val_before"],
    )
